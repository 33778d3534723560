"""Reading, indexing and validating the public STEMDL HDF5 layout (`stemdl.workloads.spacegroup.data.layout` defines it)."""
