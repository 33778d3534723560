"""Benchmark 1, `stemdl`: space-group classification from stacks of three CBED patterns.

What is only this benchmark's: the public HDF5 layout and its reader, index, validator and screen
(`data`), the synthetic generator (`synth`), the EDA report (`eda`), preprocessing, models, heads, losses,
samplers, ablations and speed benchmarks. The contract the harness runs is `workload.WORKLOAD`.
"""
