"""The benchmarks on the harness, one folder each, found by name through REGISTRY.

    from stemdl.workloads import REGISTRY
    workload = REGISTRY["stemdl"]            # imports stemdl.workloads.spacegroup.workload on first use

Adding a benchmark: its folder here with a module holding `WORKLOAD` (a `stemdl.harness.workload.Workload`),
and one line below. One outside the package: `STEMDL_WORKLOADS=name=module` in the environment.
"""

from stemdl.harness.workload import Registry

REGISTRY = Registry({
    "stemdl": "stemdl.workloads.spacegroup.workload",  # benchmark 1: space-group classification
    "stemdl_reconstruction": "stemdl.workloads.reconstruction.workload",  # benchmark 2: the projected potential
    "stemdl_lacbed": "stemdl.workloads.lacbed.workload",  # the learned LACBED simulator (open division)
}, default="stemdl")
