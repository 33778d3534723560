"""Benchmark 2 (issue 15), `stemdl_reconstruction`: from the CBED patterns of an N x N probe grid over a
region of a crystal, predict the projected potential of that region.

`workload` (the contract: config, presets, MAE to a target), `steps` (loss, evaluator sums), `models`
(the FC-DenseNet), `target` (the target and the CBED normalization), `generate` (one sample from the
multislice engine), `synth` (the data set writer: HDF5, reproducible, resumable, MPI), `layout` (the
files' names and the checks of one sample), `data` (index, screen, splits, `validate`).
"""
