"""stemdl: an MLPerf-style HPC benchmark harness for space-group classification from CBED patterns."""

__version__ = "0.1.0"
