"""Reading, indexing and validating the public STEMDL HDF5 layout (`stemdl.data.layout` defines it)."""
