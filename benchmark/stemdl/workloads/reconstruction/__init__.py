"""Benchmark 2 (issue 15), reconstruction: from the CBED patterns of an N x N probe grid over a region of a
crystal, predict the projected potential of that region. `models` (the FC-DenseNet), `target` (the target
and the CBED normalization), `generate` (one sample from the multislice engine); the workload contract
is still to come."""
