"""Physics-based synthetic CBED data written in the public STEMDL layout."""
