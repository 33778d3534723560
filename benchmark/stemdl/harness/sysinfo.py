"""The MLPerf HPC system description (`<org>/systems/<system>.json`), filled in from the machine.

    stemdl sysinfo --org results/myorg --system dgx-a100x8 --submitter MyOrg --nodes 8 \
        --field cooling=liquid --field host_networking_topology="fat tree"

What the node can tell comes from it: CPUs (/proc/cpuinfo, os.cpu_count, /sys/devices/system/cpu),
memory (/proc/meminfo), disks (/sys/block), networks (/sys/class/infiniband, /sys/class/net), GPUs (NVML),
the OS (/etc/os-release, platform) and the software (torch, CUDA, cuDNN, NCCL, mpi4py and its MPI, DALI,
stemdl). What it cannot tell (the submitter, the node count, cooling, topologies) comes from flags, and
is "" where nobody said; fields that do not apply (accelerator ones on a CPU system) are "N/A".
Every value is a string, as in published MLPerf results and as the result summarizer expects
(it joins some of them with ","). `--field KEY=VALUE` sets any field last.

The file is written atomically (a temporary file, then a link or rename) and an existing one is kept
unless `--force`. The result is then checked with mlperf_logging's system_desc_checker (usage hpc).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from stemdl import __version__
from stemdl.harness import files, mlperf
from stemdl.harness.errors import StemdlError

# The fields mlperf_logging's system_desc_checker requires (hpc and training share the list), in its order.
REQUIRED_FIELDS = (
    "submitter", "division", "status", "system_name", "number_of_nodes", "host_processors_per_node",
    "host_processor_model_name", "host_processor_core_count", "host_processor_vcpu_count",
    "host_processor_frequency", "host_processor_caches", "host_processor_interconnect", "host_memory_capacity",
    "host_storage_type", "host_storage_capacity", "host_networking", "host_networking_topology",
    "host_memory_configuration", "accelerators_per_node", "accelerator_model_name",
    "accelerator_host_interconnect", "accelerator_frequency", "accelerator_on-chip_memories",
    "accelerator_memory_configuration", "accelerator_memory_capacity", "accelerator_interconnect",
    "accelerator_interconnect_topology", "cooling", "hw_notes", "framework", "other_software_stack",
    "operating_system", "sw_notes",
)
CHECKER_RULESET = "3.0.0"  # the newest hpc ruleset mlperf_logging knows

_PROC = Path("/proc")
_SYS = Path("/sys")


def collect(*, submitter: str = "", division: str = mlperf.CLOSED, status: str = mlperf.ONPREM,
            system_name: str = "", nodes: int = 1, framework: str = "", notes: str = "",
            fields: dict[str, str] | None = None, nvml=None) -> dict[str, object]:
    """The system description of this machine, flags applied; `fields` override anything, last.
    nvml: a module-like object replacing pynvml (tests)."""
    if division not in mlperf.DIVISIONS:
        raise StemdlError(f"division {division!r} is not one of {', '.join(mlperf.DIVISIONS)}")
    if status not in mlperf.STATUSES:
        raise StemdlError(f"status {status!r} is not one of {', '.join(mlperf.STATUSES)}")
    if nodes < 1:
        raise StemdlError(f"--nodes must be at least 1, not {nodes}")
    software = software_stack(nvml)
    desc = {
        "submitter": submitter, "division": division, "status": status, "system_name": system_name,
        "number_of_nodes": str(nodes),
        **host_cpu(), **host_memory(), **host_storage(), **host_network(), **accelerators(nvml),
        "cooling": "", "hw_notes": "",
        "framework": framework or (f"PyTorch {software['torch']}" if software.get("torch") else ""),
        "other_software_stack": software,
        "operating_system": operating_system(),
        "sw_notes": notes,
    }
    desc.update(fields or {})
    return desc


# ---- the host ---------------------------------------------------------------------------------------------

def host_cpu() -> dict[str, str]:
    """Sockets, model, cores per socket, hardware threads, max frequency and caches (x86 and Arm)."""
    blocks = [dict(_colon_pairs(b)) for b in _read(_PROC / "cpuinfo").split("\n\n") if b.strip()]
    procs = [b for b in blocks if "processor" in b] or [{}]
    first = procs[0]
    model = first.get("model name") or first.get("cpu model") or first.get("Hardware") or platform.processor()
    sockets = len({b.get("physical id") for b in procs if "physical id" in b}) or 1
    vcpus = os.cpu_count() or len(procs)
    cores = first.get("cpu cores") or str(vcpus // sockets)  # "cpu cores" is per socket; Arm lacks it
    khz = _read(_SYS / "devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    mhz = f"{int(khz) // 1000} MHz" if khz.isdigit() else (f"{float(first['cpu MHz']):.0f} MHz"
                                                             if "cpu MHz" in first else "")
    return {
        "host_processors_per_node": str(sockets),
        "host_processor_model_name": model or platform.machine(),
        "host_processor_core_count": str(cores),
        "host_processor_vcpu_count": str(vcpus),
        "host_processor_frequency": mhz,
        "host_processor_caches": _caches(),
        "host_processor_interconnect": "",
    }


def _caches() -> str:
    """'L1d 48K, L1i 32K, L2 2048K, L3 107520K' from cpu0's cache entries (per core or per shared domain)."""
    out = []
    for index in sorted((_SYS / "devices/system/cpu/cpu0/cache").glob("index*")):
        level, kind, size = (_read(index / f).strip() for f in ("level", "type", "size"))
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        if level and size:
            out.append(f"L{level}{suffix} {size}")
    return ", ".join(out)


def host_memory() -> dict[str, str]:
    kib = int(dict(_colon_pairs(_read(_PROC / "meminfo"))).get("MemTotal", "0 kB").split()[0])
    return {"host_memory_capacity": _gb(kib * 1024), "host_memory_configuration": ""}


def host_storage() -> dict[str, str]:
    """Local block devices: kinds (NVMe/SSD/HDD) and total capacity; partitions and virtual devices skipped."""
    kinds, total = set(), 0
    for dev in sorted((_SYS / "block").glob("*")):
        if re.match(r"(loop|ram|zram|dm-|md|sr|nbd)", dev.name) or not (dev / "device").exists():
            continue
        size = _read(dev / "size").strip()
        total += int(size) * 512 if size.isdigit() else 0
        rot = _read(dev / "queue/rotational").strip()
        kinds.add("NVMe" if dev.name.startswith("nvme") else "HDD" if rot == "1" else "SSD")
    return {"host_storage_type": ", ".join(sorted(kinds)), "host_storage_capacity": _gb(total) if total else ""}


def host_network() -> dict[str, str]:
    """InfiniBand ports with their rates, else the up Ethernet interfaces with their speeds."""
    ib = []
    for port in sorted((_SYS / "class/infiniband").glob("*/ports/*")):
        if "ACTIVE" in _read(port / "state"):
            ib.append(f"{port.parent.parent.name}: {_read(port / 'rate').strip()}")
    eth = []
    for iface in sorted((_SYS / "class/net").glob("*")):
        if iface.name == "lo" or not (iface / "device").exists() or _read(iface / "operstate").strip() != "up":
            continue
        speed = _read(iface / "speed").strip()
        eth.append(f"{iface.name}: {speed} Mb/s" if speed.lstrip("-").isdigit() and int(speed) > 0 else iface.name)
    nets = ib or eth
    return {"host_networking": f"{'InfiniBand' if ib else 'Ethernet'} ({'; '.join(nets)})" if nets else "",
            "host_networking_topology": ""}


# ---- the accelerators -------------------------------------------------------------------------------------

def accelerators(nvml=None) -> dict[str, str]:
    """GPUs from NVML: count, model, memory, max SM clock, PCIe link, active NVLinks; "N/A" without GPUs."""
    from stemdl.harness.energy import open_nvml
    fields = {"accelerators_per_node": "0", "accelerator_model_name": "N/A", "accelerator_host_interconnect": "N/A",
              "accelerator_frequency": "N/A", "accelerator_on-chip_memories": "N/A",
              "accelerator_memory_configuration": "N/A", "accelerator_memory_capacity": "N/A",
              "accelerator_interconnect": "N/A", "accelerator_interconnect_topology": "N/A"}
    lib, _ = open_nvml(nvml)
    if lib is None:
        return fields
    try:
        count = lib.nvmlDeviceGetCount()
        if count == 0:
            return fields
        h = lib.nvmlDeviceGetHandleByIndex(0)
        name = lib.nvmlDeviceGetName(h)
        fields.update({
            "accelerators_per_node": str(count),
            "accelerator_model_name": name.decode() if isinstance(name, bytes) else name,
            "accelerator_memory_capacity": _gb(lib.nvmlDeviceGetMemoryInfo(h).total),
            "accelerator_frequency": _try(lambda: f"{lib.nvmlDeviceGetMaxClockInfo(h, lib.NVML_CLOCK_SM)} MHz"),
            "accelerator_host_interconnect": _try(lambda: f"PCIe Gen{lib.nvmlDeviceGetMaxPcieLinkGeneration(h)} "
                                                          f"x{lib.nvmlDeviceGetMaxPcieLinkWidth(h)}"),
            "accelerator_on-chip_memories": "", "accelerator_memory_configuration": "",
            "accelerator_interconnect": _nvlinks(lib, h), "accelerator_interconnect_topology": "",
        })
    finally:
        _try(lib.nvmlShutdown)
    return fields


def _nvlinks(lib, h) -> str:
    links = 0
    for link in range(getattr(lib, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            links += lib.nvmlDeviceGetNvLinkState(h, link) == 1
        except Exception:  # noqa: BLE001 -- NotSupported past the last link, or no NVLink at all
            break
    return f"NVLink ({links} links per GPU)" if links else "PCIe"


# ---- the software -----------------------------------------------------------------------------------------

def software_stack(nvml=None) -> dict[str, str]:
    """Versions of what a run depends on; "" where a component is absent."""
    sw = {"python": platform.python_version(), "stemdl": __version__, "torch": "", "cuda": "", "cudnn": "",
          "nccl": "", "nvidia_driver": "", "mpi4py": "", "mpi": "", "dali": ""}
    try:
        import torch
        sw["torch"] = torch.__version__
        sw["cuda"] = torch.version.cuda or ""
        sw["cudnn"] = _try(lambda: str(torch.backends.cudnn.version() or ""))
        if torch.cuda.is_available():
            sw["nccl"] = _try(lambda: ".".join(map(str, torch.cuda.nccl.version())))
    except ImportError:
        pass
    from stemdl.harness.energy import open_nvml
    lib, _ = open_nvml(nvml)
    if lib is not None:
        driver = _try(lib.nvmlSystemGetDriverVersion)
        sw["nvidia_driver"] = driver.decode() if isinstance(driver, bytes) else driver
        _try(lib.nvmlShutdown)
    sw["mpi4py"], sw["mpi"] = _mpi_versions()
    sw["dali"] = _try(lambda: importlib.import_module("nvidia.dali").__version__)
    return sw


def _mpi_versions() -> tuple[str, str]:
    """mpi4py's version and its MPI library's first line. Importing mpi4py.MPI here would initialize MPI
    (and a later dist.setup() could not choose how), so unless it is imported already, ask a subprocess."""
    try:
        import mpi4py
    except ImportError:
        return "", ""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        return mpi4py.__version__, _first_line(mpi.Get_library_version())
    code = "import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; print(MPI.Get_library_version())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return mpi4py.__version__, _first_line(out)


def operating_system() -> str:
    pretty = dict(_pairs(_read(Path("/etc/os-release")), "=")).get("PRETTY_NAME", "").strip('"')
    return f"{pretty or platform.system()} (kernel {platform.release()})"


# ---- writing and checking ---------------------------------------------------------------------------------

def write(desc: dict, path: Path, force: bool = False) -> Path:
    """Write desc atomically; an existing file is kept (StemdlError) unless force."""
    files.check_folder(path.parent, "system description folder")
    try:
        files.write_atomic(path, json.dumps(desc, indent=2) + "\n", durable=True, replace=force)
    except FileExistsError:
        raise StemdlError(f"{path} exists; pass --force to replace it") from None
    return path


def check(path: Path, ruleset: str = CHECKER_RULESET) -> tuple[bool, list[str]]:
    """(valid, problems): mlperf_logging's system_desc_checker (usage hpc), plus our own list of fields."""
    from mlperf_logging.system_desc_checker.system_desc_checker import check_system_desc
    desc = json.loads(path.read_text())
    problems = [f"missing field {f}" for f in REQUIRED_FIELDS if f not in desc]
    problems += [f"{f} is not a string" for f, v in desc.items() if f in REQUIRED_FIELDS and
                 f != "other_software_stack" and not isinstance(v, str)]
    try:
        valid = check_system_desc(str(path), "hpc", ruleset)[0]
    except Exception as exc:  # noqa: BLE001 -- the checker crashes (e.g. joins a non-string) rather than report
        valid = False
        problems.append(f"system_desc_checker failed: {type(exc).__name__}: {exc}")
    if not valid and not problems:
        problems.append("system_desc_checker rejected it (see its log line)")
    return valid and not problems, problems


# ---- the command ------------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--org", required=True, type=Path, help="the submitter's folder; writes ORG/systems/NAME.json")
    parser.add_argument("--system", required=True, help="the system name (file name and system_name)")
    parser.add_argument("--submitter", default="", help="the submitting organization (default: ORG's name)")
    parser.add_argument("--division", default=mlperf.CLOSED, choices=mlperf.DIVISIONS)
    parser.add_argument("--status", default=mlperf.ONPREM, choices=mlperf.STATUSES)
    parser.add_argument("--nodes", type=int, default=1, help="number_of_nodes (default 1)")
    parser.add_argument("--framework", default="", help="default: PyTorch <installed version>")
    parser.add_argument("--notes", default="", help="sw_notes")
    parser.add_argument("--field", action="append", default=[], metavar="KEY=VALUE",
                        help="set any field (last, over what was found); repeatable")
    parser.add_argument("--force", action="store_true", help="replace an existing file")


def run(args: argparse.Namespace) -> int:
    fields = {}
    for item in args.field:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StemdlError(f"--field {item!r}: expected KEY=VALUE")
        fields[key] = value
    desc = collect(submitter=args.submitter or args.org.resolve().name, division=args.division,
                   status=args.status, system_name=args.system, nodes=args.nodes, framework=args.framework,
                   notes=args.notes, fields=fields)
    path = write(desc, args.org / "systems" / f"{args.system}.json", force=args.force)
    valid, problems = check(path)
    print(f"{path}: written; system_desc_checker (hpc {CHECKER_RULESET}): {'passed' if valid else 'FAILED'}")
    for p in problems:
        print(f"  {p}")
    unknown = [k for k in REQUIRED_FIELDS if desc.get(k) == ""]
    if unknown:
        print(f"  to fill in (--field KEY=VALUE): {', '.join(unknown)}")
    return 0 if valid else 1


# ---- helpers ----------------------------------------------------------------------------------------------

def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _pairs(text: str, sep: str):
    for line in text.splitlines():
        key, found, value = line.partition(sep)
        if found:
            yield key.strip(), value.strip()


def _colon_pairs(text: str):
    return _pairs(text, ":")


def _first_line(text: str) -> str:
    return " ".join((text.strip().splitlines() or [""])[0].split())


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.0f} GB"


def _try(fn) -> str:
    try:
        return fn()
    except Exception:  # noqa: BLE001 -- a figure one device or build does not give: "" rather than no description
        return ""
