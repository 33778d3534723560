"""GPU power and energy of a run, read through NVML on each node's first local rank.

    sampler = energy.PowerSampler(interval_s=1.0, env=env)   # env: dist.DistributedEnv; only local rank 0 samples
    if (msg := sampler.start()):                              # a one-time note when NVML is missing
        print(msg)
    sampler.mark(mlperf.RUN_START)  ...  sampler.mark(mlperf.RUN_STOP)
    sampler.stop()
    joules = sampler.energy_joules()                          # this node's GPUs; None without NVML
    energy.log_power(run_dir / "power" / f"node_{env.node_rank}.txt", sampler, node=env.node_rank)

A background thread reads, every `interval_s`, each NVML device's power draw, total-energy counter (Volta
and later), utilization, memory used and temperature. `mark(name)` takes one reading at once and names it,
so the energy between two marks comes from the counter difference; a GPU whose counter is unsupported falls
back to integrating its sampled power (trapezoids) between the marks. The node's energy is the sum over its
GPUs, so each node's first local rank owns its node's figure and a summarizer sums the nodes.

NVML sits behind a module-like object with the handful of functions `_Nvml` calls, so tests pass a fake
one (`nvml=`). Without pynvml or the NVML library the sampler is `available == False`: `start()` returns its
reason once, starts no thread, and every other method is a cheap no-op (`energy_joules()` is None).

These are GPU readings only: MLPerf's power track asks for wall power of whole nodes (and switches), so
the figures here are for comparing runs, not a compliant power submission.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlperf_logging.mllog.constants import (
    POWER_MEASUREMENT_START,
    POWER_MEASUREMENT_STOP,
    POWER_READING,
)

from stemdl.harness import mlperf

GPU_ENERGY = mlperf.GPU_ENERGY
POWER_SOURCE = "nvml_gpu"  # where the power figures come from (metadata of the power lines)


@dataclass(frozen=True)
class Sample:
    """One reading of every sampled GPU: one entry per GPU; None where the device does not support it."""
    t: float                              # seconds on the sampler's clock (monotonic): for integration
    time_ms: int                          # ms since the epoch: for the log
    power_w: tuple[float | None, ...]
    energy_j: tuple[float | None, ...]    # the total-energy counter since the driver loaded
    util_pct: tuple[int | None, ...]
    mem_used_bytes: tuple[int | None, ...]
    temp_c: tuple[int | None, ...]

    @property
    def total_power_w(self) -> float:
        return sum(p for p in self.power_w if p is not None)


def open_nvml(module=None):
    """(initialized NVML module, None) or (None, why not). `module` replaces pynvml (tests)."""
    if module is None:
        try:
            import pynvml as module
        except ImportError as exc:
            return None, f"GPU power not sampled: pynvml is not installed ({exc})"
    try:
        module.nvmlInit()
    except Exception as exc:  # noqa: BLE001 -- pynvml.NVMLError (library not found, driver not loaded) and its subclasses
        return None, f"GPU power not sampled: NVML is unavailable ({exc})"
    return module, None


class _Nvml:
    """The NVML calls the sampler makes, each returning None where the device does not support it."""

    def __init__(self, nvml, indices: Sequence[int] | None = None):
        self.nvml = nvml
        count = nvml.nvmlDeviceGetCount()
        self.indices = list(range(count)) if indices is None else list(indices)
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]

    def _read(self, fn, *args):
        try:
            return getattr(self.nvml, fn)(*args)
        except Exception:  # noqa: BLE001 -- NVMLError_NotSupported and kin: one missing figure must not stop the thread
            return None

    def read(self, clock) -> Sample:
        power, energy, util, mem, temp = [], [], [], [], []
        for h in self.handles:
            mw = self._read("nvmlDeviceGetPowerUsage", h)
            mj = self._read("nvmlDeviceGetTotalEnergyConsumption", h)
            u = self._read("nvmlDeviceGetUtilizationRates", h)
            m = self._read("nvmlDeviceGetMemoryInfo", h)
            power.append(None if mw is None else mw / 1000.0)
            energy.append(None if mj is None else mj / 1000.0)
            util.append(None if u is None else u.gpu)
            mem.append(None if m is None else m.used)
            temp.append(self._read("nvmlDeviceGetTemperature", h, getattr(self.nvml, "NVML_TEMPERATURE_GPU", 0)))
        return Sample(clock(), int(time.time() * 1000), tuple(power), tuple(energy), tuple(util), tuple(mem),
                      tuple(temp))

    def close(self) -> None:
        self._read("nvmlShutdown")


class PowerSampler:
    """Samples this node's GPUs on a background thread (node leader only); see the module docstring.

    env: a DistributedEnv (or anything with local_rank); None samples in this process.
    nvml: a module-like object replacing pynvml (tests). indices: NVML device indices (default: all the
    node's GPUs, which is the node's energy whatever CUDA_VISIBLE_DEVICES each rank sees).
    clock: seconds, monotonic (tests drive it).
    """

    def __init__(self, interval_s: float = 1.0, *, env=None, nvml=None, indices: Sequence[int] | None = None,
                 clock=time.monotonic):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.marks: dict[str, Sample] = {}
        self.message: str | None = None   # why this node samples nothing, until start() has returned it
        self._clock = clock
        self._dev: _Nvml | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        if env is not None and env.local_rank != 0:
            return  # another rank of this node samples it
        module, self.message = open_nvml(nvml)
        if module is not None:
            self._dev = _Nvml(module, indices)

    @property
    def available(self) -> bool:
        return self._dev is not None

    @property
    def gpus(self) -> int:
        return len(self._dev.handles) if self._dev else 0

    def start(self) -> str | None:
        """Start the thread; return the reason once if there is nothing to sample (None otherwise)."""
        if self._dev is None:
            msg, self.message = self.message, None
            return msg
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="stemdl-power", daemon=True)
            self._thread.start()
        return None

    def stop(self) -> None:
        """Stop and join the thread (it wakes at once, not at the next interval); release NVML."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._dev is not None:
            self._dev.close()

    def sample(self) -> Sample | None:
        """Take one reading now and keep it (the thread calls this; tests may too)."""
        if self._dev is None:
            return None
        s = self._dev.read(self._clock)
        with self._lock:
            self.samples.append(s)
        return s

    def mark(self, name: str) -> None:
        """Read now and name the reading (run_start, run_stop): energy is measured between marks."""
        s = self.sample()
        if s is not None:
            self.marks[name] = s

    def energy_joules(self, between: tuple[str, str] = (mlperf.RUN_START, mlperf.RUN_STOP)) -> float | None:
        """Energy of this node's GPUs between two marks, J; None without NVML or without both marks."""
        parts = self.energy_by_gpu(between)
        return None if parts is None else sum(j for j, _ in parts)

    def energy_by_gpu(self, between=(mlperf.RUN_START, mlperf.RUN_STOP)) -> list[tuple[float, str]] | None:
        """[(joules, "counter" or "integrated")] per GPU between two marks; None if a mark is missing."""
        a, b = (self.marks.get(name) for name in between)
        if a is None or b is None:
            return None
        with self._lock:
            window = sorted((s for s in self.samples if a.t <= s.t <= b.t), key=lambda s: s.t)
        out = []
        for i in range(len(a.power_w)):
            if a.energy_j[i] is not None and b.energy_j[i] is not None:
                out.append((b.energy_j[i] - a.energy_j[i], "counter"))
            else:
                out.append((_integrate([(s.t, s.power_w[i]) for s in window]), "integrated"))
        return out

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return


def _integrate(points: list[tuple[float, float | None]]) -> float:
    """Trapezoidal integral of (t s, power W) over time, skipping readings the device did not give."""
    pts = [(t, p) for t, p in points if p is not None]
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in itertools.pairwise(pts))


def log_power(path: Path | str, sampler: PowerSampler, node: int,
              between: tuple[str, str] = (mlperf.RUN_START, mlperf.RUN_STOP)) -> bool:
    """Write this node's power log (MLPerf's power-file layout, power/<result>/node_N.txt): power_measurement_start
    at the first mark, one power_reading per sample in between (W summed over the node's GPUs, at the sample's
    time), power_measurement_stop at the second mark, then gpu_energy (J). Written after the run, so nothing
    is logged inside the timed region. False (nothing written) when the sampler has no marks."""
    a, b = (sampler.marks.get(name) for name in between)
    if a is None or b is None:
        return False
    now = [a.time_ms]
    host = f"node_{node}"
    meta = {"host": host, "source": POWER_SOURCE, "gpus": sampler.gpus}
    with mlperf.MLLogger(path, rank=0, clock=lambda: now[0]) as log:
        log.start(POWER_MEASUREMENT_START, None, meta)
        for s in sorted((s for s in sampler.samples if a.t <= s.t <= b.t), key=lambda s: s.t):
            now[0] = s.time_ms
            log.event(POWER_READING, round(s.total_power_w, 3),
                      {"host": host, "gpu_power_w": [None if p is None else round(p, 3) for p in s.power_w]})
        now[0] = b.time_ms
        log.end(POWER_MEASUREMENT_STOP, None, meta)
        parts = sampler.energy_by_gpu(between)
        log.event(GPU_ENERGY, round(sum(j for j, _ in parts), 3),
                  {**meta, "between": list(between), "method": sorted({m for _, m in parts}),
                   "gpu_energy_j": [round(j, 3) for j, _ in parts]})
    return True
