"""The power sampler with a fake NVML (counters, integration, several GPUs, the thread, the log) and the
no-NVML path of this machine."""

import threading
import time
from types import SimpleNamespace

import pytest
from stemdl.harness import energy, mlperf
from stemdl.harness.dist import DistributedEnv


class NotSupported(Exception):
    pass


class FakeNvml:
    """The NVML functions the sampler calls, over GPUs whose readings the test sets.
    power_mw[i] / energy_mj[i]: a number, or None for a device that does not support the reading."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, power_mw, energy_mj):
        self.power_mw, self.energy_mj = list(power_mw), list(energy_mj)
        self.init_calls = self.shutdown_calls = 0

    def nvmlInit(self):
        self.init_calls += 1

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self):
        return len(self.power_mw)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def _get(self, values, i):
        if values[i] is None:
            raise NotSupported(f"GPU {i}")
        return values[i]

    def nvmlDeviceGetPowerUsage(self, h):
        return self._get(self.power_mw, h)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self._get(self.energy_mj, h)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=50 + h, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 * 2**30, used=2**30 * (h + 1), free=0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 40 + h


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_energy_is_the_counter_difference_summed_over_gpus():
    nvml = FakeNvml(power_mw=[100_000, 200_000, 300_000], energy_mj=[1_000_000, 5_000_000, 0])
    s = energy.PowerSampler(nvml=nvml, clock=Clock())
    assert s.available and s.gpus == 3 and nvml.init_calls == 1
    s.mark(mlperf.RUN_START)
    nvml.energy_mj = [1_500_000, 5_250_000, 2_000_000]  # +500 J, +250 J, +2000 J
    s.mark(mlperf.RUN_STOP)
    assert s.energy_joules() == pytest.approx(2750.0)
    assert [m for _, m in s.energy_by_gpu()] == ["counter"] * 3
    first = s.samples[0]
    assert first.power_w == (100.0, 200.0, 300.0) and first.total_power_w == 600.0
    assert first.util_pct == (50, 51, 52) and first.temp_c == (40, 41, 42)
    assert first.mem_used_bytes == (2**30, 2 * 2**30, 3 * 2**30)


def test_without_a_counter_power_is_integrated_between_the_marks_only():
    nvml = FakeNvml(power_mw=[100_000, 50_000], energy_mj=[None, None])
    clock = Clock()
    s = energy.PowerSampler(nvml=nvml, clock=clock)
    s.sample()                       # t=0, before run_start: not counted
    clock.t = 1.0
    s.mark(mlperf.RUN_START)         # 150 W
    clock.t = 3.0
    nvml.power_mw = [300_000, 50_000]
    s.sample()                       # 350 W
    clock.t = 4.0
    s.mark(mlperf.RUN_STOP)          # 350 W
    clock.t = 9.0
    s.sample()                       # after run_stop: not counted
    # GPU 0: trapezoids (100+300)/2*2 + 300*1 = 700 J; GPU 1: 50 W * 3 s = 150 J
    assert s.energy_by_gpu() == [(pytest.approx(700.0), "integrated"), (pytest.approx(150.0), "integrated")]
    assert s.energy_joules() == pytest.approx(850.0)
    assert s.energy_joules(between=("nope", mlperf.RUN_STOP)) is None


def test_a_gpu_without_counter_is_integrated_while_others_use_theirs():
    nvml = FakeNvml(power_mw=[100_000, 200_000], energy_mj=[0, None])
    clock = Clock()
    s = energy.PowerSampler(nvml=nvml, clock=clock)
    s.mark("a")
    clock.t = 10.0
    nvml.energy_mj = [4_000_000, None]
    s.mark("b")
    assert s.energy_by_gpu(("a", "b")) == [(4000.0, "counter"), (pytest.approx(2000.0), "integrated")]


def test_the_thread_samples_and_stops_promptly():
    nvml = FakeNvml(power_mw=[100_000], energy_mj=[0])
    s = energy.PowerSampler(interval_s=0.01, nvml=nvml)
    assert s.start() is None
    deadline = time.monotonic() + 5
    while len(s.samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.stop()
    assert len(s.samples) >= 3
    assert not any(t.name == "stemdl-power" for t in threading.enumerate())
    assert nvml.shutdown_calls == 1
    n = len(s.samples)
    time.sleep(0.05)
    assert len(s.samples) == n  # nothing samples after stop()

    slow = energy.PowerSampler(interval_s=60, nvml=FakeNvml([1], [1]))
    slow.start()
    t0 = time.monotonic()
    slow.stop()
    assert time.monotonic() - t0 < 1.0  # wakes at once, not after the interval


def test_a_failing_reading_does_not_stop_the_thread():
    nvml = FakeNvml(power_mw=[None], energy_mj=[None])
    s = energy.PowerSampler(interval_s=0.01, nvml=nvml)
    s.start()
    time.sleep(0.05)
    nvml.power_mw = [123_000]
    deadline = time.monotonic() + 5
    while not any(x.power_w == (123.0,) for x in s.samples) and time.monotonic() < deadline:
        time.sleep(0.01)
    s.stop()
    assert s.samples[0].power_w == (None,) and s.samples[0].total_power_w == 0
    assert any(x.power_w == (123.0,) for x in s.samples)


def test_only_the_first_local_rank_samples():
    nvml = FakeNvml(power_mw=[1], energy_mj=[1])
    s = energy.PowerSampler(env=DistributedEnv(rank=5, local_rank=1), nvml=nvml)
    assert not s.available and nvml.init_calls == 0
    assert s.start() is None  # not a problem worth a message: the node's rank 0 samples
    s.mark(mlperf.RUN_START)
    s.stop()
    assert s.samples == [] and s.energy_joules() is None
    assert energy.PowerSampler(env=DistributedEnv(rank=4, local_rank=0), nvml=nvml).available


def test_no_nvml_on_this_machine_is_a_quiet_no_op():
    probe, _ = energy.open_nvml()
    if probe is not None:
        probe.nvmlShutdown()
        pytest.skip("this machine has NVML")
    threads = threading.active_count()
    s = energy.PowerSampler()
    assert not s.available and s.gpus == 0
    msg = s.start()
    assert isinstance(msg, str) and "NVML" in msg
    assert s.start() is None  # said once
    assert threading.active_count() == threads
    s.mark(mlperf.RUN_START)
    assert s.sample() is None
    s.mark(mlperf.RUN_STOP)
    s.stop()
    assert s.samples == [] and s.marks == {} and s.energy_joules() is None


def test_an_nvml_that_cannot_start_is_reported():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise RuntimeError("driver not loaded")

    s = energy.PowerSampler(nvml=Broken([1], [1]))
    assert not s.available and "driver not loaded" in s.start()


def test_log_power_writes_the_node_file_the_summarizer_reads(tmp_path):
    from mlperf_logging.compliance_checker.mlp_parser import parse_file
    from mlperf_logging.result_summarizer.result_summarizer import _compute_power_node

    nvml = FakeNvml(power_mw=[100_000, 100_000], energy_mj=[None, 0])
    clock = Clock()
    s = energy.PowerSampler(nvml=nvml, clock=clock)
    s.mark(mlperf.RUN_START)
    for t in (1.0, 2.0):
        clock.t = t
        s.sample()
    clock.t = 3.0
    nvml.energy_mj = [None, 300_000]
    s.mark(mlperf.RUN_STOP)
    # fixed wall times, 1 s apart, so the summarizer's arithmetic is known
    s.samples[:] = [x.__class__(**{**x.__dict__, "time_ms": 1_000_000 + 1000 * i}) for i, x in enumerate(s.samples)]
    s.marks = {mlperf.RUN_START: s.samples[0], mlperf.RUN_STOP: s.samples[-1]}
    path = tmp_path / "power" / "node_3.txt"
    assert energy.log_power(path, s, node=3)

    lines, _ = parse_file(str(path), "3.0.0")
    assert [ln.key for ln in lines] == (["power_measurement_start"] + ["power_reading"] * 4
                                        + ["power_measurement_stop", energy.GPU_ENERGY])
    readings = [ln for ln in lines if ln.key == "power_reading"]
    assert [ln.timestamp for ln in readings] == [1_000_000, 1_001_000, 1_002_000, 1_003_000]
    assert all(ln.value["value"] == 200.0 and ln.value["metadata"]["host"] == "node_3" for ln in readings)
    total = lines[-1].value
    assert total["value"] == pytest.approx(600.0)  # 300 J integrated on GPU 0 + 300 J counted on GPU 1
    assert total["metadata"]["method"] == ["counter", "integrated"]
    # the summarizer's node energy: mean power (200 W) times the time to train (3 s here)
    assert _compute_power_node(lines, 3000) == pytest.approx(600.0)


def test_log_power_without_marks_writes_nothing(tmp_path):
    s = energy.PowerSampler(nvml=FakeNvml([1], [1]))
    assert not energy.log_power(tmp_path / "node_0.txt", s, node=0)
    assert not (tmp_path / "node_0.txt").exists()
