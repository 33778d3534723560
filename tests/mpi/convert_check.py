"""Run by tests/test_convert.py under `mpiexec -n N`: `stemdl convert ARGS...` through the module's own parser,
as the `stemdl` command runs it, printing a StemdlError as one line and exiting 2."""

import argparse
import sys

from stemdl.workloads.spacegroup.data import convert
from stemdl.harness.errors import StemdlError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stemdl convert")
    convert.configure(parser)
    try:
        return convert.run(parser.parse_args(argv))
    except StemdlError as exc:
        print(f"stemdl convert: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
