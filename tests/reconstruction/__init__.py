"""Tests of the reconstruction workload (a package: its module names repeat the top level's)."""
