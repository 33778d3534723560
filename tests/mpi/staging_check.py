"""Run by tests/test_staging.py under `mpiexec -n N` on one machine:

    mpiexec -n 2 python tests/mpi/staging_check.py MANIFEST.json SRC STAGE_DIR TAG

Every rank stages the manifest's files (a JSON list of [relative path, bytes, sha256]) and prints
`rank R/N copied F files B bytes, node F files B bytes, owner O`. Rank 0 then checks that the staged
tree equals the source (`complete`), every rank cleans up, and rank 0 checks the folder is gone
(`removed`). A staging error prints `rank R/N error: MESSAGE` and exits 3 on that rank; anything else
aborts the job, so no rank waits for another.
"""

import json
import sys
import traceback
from pathlib import Path

from stemdl.harness import dist, staging
from stemdl.harness.errors import StemdlError


def check(manifest: Path, src: Path, stage_dir: Path, tag: str) -> int:
    env = dist.setup(timeout_s=60)
    who = f"rank {env.rank}/{env.world_size}"
    entries = [(rel, size, sha) for rel, size, sha in json.loads(manifest.read_text())]
    try:
        staged = staging.stage(src, entries, stage_dir, tag)
    except StemdlError as exc:
        print(f"{who} error: {exc}", flush=True)
        dist.teardown()
        return 3
    print(f"{who} copied {staged.rank_files} files {staged.rank_bytes} bytes, node {staged.files} files "
          f"{staged.bytes} bytes, owner {staged.owner}", flush=True)
    if env.is_root:
        for rel, _, _ in entries:
            assert (staged.root / rel).read_bytes() == (src / rel).read_bytes(), rel
        assert sorted(p.name for p in staged.root.rglob("*") if p.is_file()) == \
            sorted(Path(rel).name for rel, _, _ in entries), "no temporary files left"
        print("complete", flush=True)
    dist.barrier()  # the run's final barrier: no rank reads staged files any more
    staging.cleanup(staged)
    staging.cleanup(staged)
    dist.barrier()
    if env.is_root:
        assert not staged.root.exists(), staged.root
        print("removed", flush=True)
    dist.teardown()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(check(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]))
    except Exception:
        traceback.print_exc()
        dist.abort(1)
