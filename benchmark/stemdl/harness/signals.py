"""Stopping a distributed run on SIGTERM or SIGINT (scheduler time limits, scancel, bkill, Ctrl-C).

    stop = StopSignal(env).install()    # during setup a signal raises Interrupted on the rank it reached
    stop.defer()                        # from run_start on it is only recorded...
    if stop.agreed(): ...               # ...and every rank learns of it at the same step (collective)
    stop.reason(), stop.exit_status()   # "SIGTERM on rank 1", 143

The flag is summed over MPI (one integer, microseconds a step); torch collectives would cost a device
round trip per step on GPUs.
"""

from __future__ import annotations

import signal
import threading

from stemdl.harness import dist


class Interrupted(BaseException):
    """A stop signal that arrived during setup (BaseException: no `except Exception` swallows it)."""

    def __init__(self, signum: int, rank: int):
        super().__init__(f"{signal.Signals(signum).name} on rank {rank}")
        self.signum = signum


class StopSignal:
    """SIGTERM and SIGINT on this rank. Installed, a signal raises `Interrupted` (setup); after `defer()`
    it is only recorded, and the ranks learn of it together at `agreed()` (the run)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, env: dist.DistributedEnv):
        self.env = env
        self.signum = 0  # the first signal this rank received
        self.deferred = False
        self.stopped_by = 0  # after reason(): the signal every rank exits with
        self.reason_text = ""
        self._previous: dict = {}

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def defer(self) -> None:
        self.deferred = True

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if not self.deferred:
            raise Interrupted(signum, self.env.rank)

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        return dist.sum_ints([1 if self.signum else 0])[0] > 0

    def reason(self) -> str:
        """Collective, after agreed(): which signal reached which ranks, e.g. "SIGTERM on rank 1"."""
        per_rank = [0] * self.env.world_size
        per_rank[self.env.rank] = self.signum
        per_rank = dist.sum_ints(per_rank)
        self.stopped_by = next(s for s in per_rank if s)
        by_signal: dict[str, list[int]] = {}
        for rank, signum in enumerate(per_rank):
            if signum:
                by_signal.setdefault(signal.Signals(signum).name, []).append(rank)
        parts = []
        for name, ranks in by_signal.items():
            shown = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
            parts.append(f"{name} on rank{'s' if len(ranks) > 1 else ''} {shown}")
        self.reason_text = "; ".join(parts)
        return self.reason_text

    def exit_status(self) -> int:
        """128 + the signal that stopped the run (the same on every rank), or this rank's late one, or 0."""
        signum = self.stopped_by or self.signum
        return 128 + signum if signum else 0
