"""The system description: read from this machine, flags over it, written once (or --force), and accepted
by mlperf_logging's system_desc_checker."""

import argparse
import json
from types import SimpleNamespace

import pytest
from stemdl.harness import energy, sysinfo
from stemdl.harness.errors import StemdlError


@pytest.fixture
def no_mpi_probe(monkeypatch):
    """Skip the mpi4py subprocess (about a second) in tests that are not about it."""
    monkeypatch.setattr(sysinfo, "_mpi_versions", lambda: ("9.9", "FakeMPI 1.0"))


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    sysinfo.configure(parser)
    return sysinfo.run(parser.parse_args(list(argv)))


def _number(text):
    return float(text.split()[0])


def test_collect_describes_this_machine():
    desc = sysinfo.collect(submitter="Org", system_name="box")
    assert set(sysinfo.REQUIRED_FIELDS) <= set(desc)
    assert desc["host_processor_model_name"].strip()
    assert int(desc["host_processor_vcpu_count"]) >= 1 and int(desc["host_processor_core_count"]) >= 1
    assert _number(desc["host_memory_capacity"]) > 0 and desc["host_memory_capacity"].endswith(" GB")
    assert all(isinstance(desc[f], str) for f in sysinfo.REQUIRED_FIELDS if f != "other_software_stack")
    sw = desc["other_software_stack"]
    import mpi4py
    import torch
    assert sw["torch"] == torch.__version__ and desc["framework"] == f"PyTorch {torch.__version__}"
    assert sw["python"] and sw["stemdl"] and sw["mpi4py"] == mpi4py.__version__ and sw["mpi"]
    probe, _ = energy.open_nvml()
    if probe is None:  # this machine: no GPU
        assert desc["accelerators_per_node"] == "0" and desc["accelerator_model_name"] == "N/A"
    else:
        probe.nvmlShutdown()
        assert int(desc["accelerators_per_node"]) >= 1


def test_gpus_come_from_nvml(no_mpi_probe):
    class FakeNvml:
        NVML_CLOCK_SM = 1
        shutdowns = 0

        def nvmlInit(self): pass
        def nvmlShutdown(self): FakeNvml.shutdowns += 1
        def nvmlDeviceGetCount(self): return 4
        def nvmlDeviceGetHandleByIndex(self, i): return i
        def nvmlDeviceGetName(self, h): return b"NVIDIA H100 80GB HBM3"
        def nvmlDeviceGetMemoryInfo(self, h): return SimpleNamespace(total=80 * 2**30)
        def nvmlDeviceGetMaxClockInfo(self, h, clock): return 1980
        def nvmlDeviceGetMaxPcieLinkGeneration(self, h): return 5
        def nvmlDeviceGetMaxPcieLinkWidth(self, h): return 16
        def nvmlSystemGetDriverVersion(self): return "550.54.15"

        def nvmlDeviceGetNvLinkState(self, h, link):
            if link >= 18:
                raise RuntimeError("not supported")
            return 1

    desc = sysinfo.collect(nvml=FakeNvml())
    assert desc["accelerators_per_node"] == "4"
    assert desc["accelerator_model_name"] == "NVIDIA H100 80GB HBM3"
    assert desc["accelerator_memory_capacity"] == "80 GB"
    assert desc["accelerator_frequency"] == "1980 MHz"
    assert desc["accelerator_host_interconnect"] == "PCIe Gen5 x16"
    assert desc["accelerator_interconnect"] == "NVLink (18 links per GPU)"
    assert desc["other_software_stack"]["nvidia_driver"] == "550.54.15"
    assert FakeNvml.shutdowns == 2  # every init is paired


def test_flags_and_fields_override_what_was_found(no_mpi_probe):
    desc = sysinfo.collect(submitter="Org", division="open", status="research", system_name="s", nodes=16,
                           framework="PyTorch NGC 24.03", notes="AMP",
                           fields={"cooling": "liquid", "host_processor_model_name": "Custom CPU"})
    assert desc["submitter"] == "Org" and desc["division"] == "open" and desc["status"] == "research"
    assert desc["number_of_nodes"] == "16" and desc["framework"] == "PyTorch NGC 24.03"
    assert desc["sw_notes"] == "AMP" and desc["cooling"] == "liquid"
    assert desc["host_processor_model_name"] == "Custom CPU"
    with pytest.raises(StemdlError, match="division"):
        sysinfo.collect(division="closedish")
    with pytest.raises(StemdlError, match="nodes"):
        sysinfo.collect(nodes=0)


def test_the_command_writes_a_description_the_checker_accepts(tmp_path, no_mpi_probe, capsys):
    org = tmp_path / "MyOrg"
    assert run_cli("--org", str(org), "--system", "box", "--nodes", "2", "--field", "cooling=air") == 0
    path = org / "systems" / "box.json"
    desc = json.loads(path.read_text())
    assert desc["submitter"] == "MyOrg" and desc["system_name"] == "box" and desc["number_of_nodes"] == "2"
    assert desc["cooling"] == "air"
    assert "passed" in capsys.readouterr().out
    assert sysinfo.check(path) == (True, [])
    assert [p.name for p in path.parent.iterdir()] == ["box.json"]  # no temporary file left


def test_an_existing_file_is_kept_unless_force(tmp_path, no_mpi_probe):
    path = tmp_path / "systems" / "box.json"
    path.parent.mkdir()
    path.write_text('{"hand": "edited"}\n')
    with pytest.raises(StemdlError, match="--force"):
        run_cli("--org", str(tmp_path), "--system", "box")
    assert path.read_text() == '{"hand": "edited"}\n'
    assert [p.name for p in path.parent.iterdir()] == ["box.json"]
    assert run_cli("--org", str(tmp_path), "--system", "box", "--force", "--field", "hw_notes=x") == 0
    assert json.loads(path.read_text())["hw_notes"] == "x"


def test_the_checker_reports_a_missing_field(tmp_path, no_mpi_probe):
    desc = sysinfo.collect(submitter="Org", system_name="box")
    del desc["cooling"]
    path = sysinfo.write(desc, tmp_path / "box.json")
    valid, problems = sysinfo.check(path)
    assert not valid and "missing field cooling" in problems


def test_a_malformed_field_flag_is_refused(tmp_path, no_mpi_probe):
    with pytest.raises(StemdlError, match="KEY=VALUE"):
        run_cli("--org", str(tmp_path), "--system", "box", "--field", "cooling")
    assert not (tmp_path / "systems" / "box.json").exists()
