"""Progress of long work on stderr: a line rewritten in place on a terminal, a line per ~10 % otherwise.

    with Progress(total=1200, what="samples") as bar:
        for ...: bar.update(1)

Log files and CI output stay readable because nothing is rewritten when stderr is not a terminal.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, what: str = "items", label: str = "", stream=None, quiet: bool = False):
        self.total, self.what, self.label = max(int(total), 0), what, label
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._next_step = 0

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = _clock(eta) if eta == eta else "?"
        prefix = f"{self.label}: " if self.label else ""
        return (f"{prefix}{self.done}/{self.total} {self.what} ({pct:3.0f}%) "
                f"{rate:.2f} {self.what}/s, elapsed {_clock(time.perf_counter() - self.start)}, eta {eta_text}")

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.quiet:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw > 0.2 or self.done >= self.total:
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()
                self._last_draw = now
        elif self.total and self.done * 10 // self.total >= self._next_step:
            self._next_step = self.done * 10 // self.total + 1
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tty and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
        return False
