"""`stemdl bench io-reconstruction`: what the reconstruction input path costs, against the read limit and
the training step, in one run (figures printed, never judged by the exit status).

    stemdl bench io-reconstruction                         # data/reconstruction/default, shards in a temp folder
    stemdl bench io-reconstruction --data DIR --rounds 5 --json io.json

Rows, each measured --rounds times in alternating order (this machine's speed drifts within minutes) and
reported by the fastest round:
  bytes   a sample on disk: the stack's float16 payload (N² S² 2 bytes), in the HDF5 files, in the shards
  limit   the shards' stack files read sequentially from the page cache: the most any pipeline can move
  h5      the HDF5 set through the `torch` pipeline (h5py reads in the training process)
  torch   the shards through the `torch` pipeline (gathers from memory maps)
  dali    the shards through the `dali` pipeline (DALI's CPU operators here; its GPU ones with --device cuda)
  step    the training step of the run's model alone (batches already in memory): what the input must feed
The pipelines' fraction of the limit, and their rate over the step's, say whether the input path can
starve training: on this data it needs the step's rate, not the limit's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.bench.io import epoch_rate, read_files

MB = 1e6


@dataclass
class Row:
    name: str
    what: str
    samples_per_s: list  # one per round
    bytes_per_sample: int

    @property
    def best(self) -> float:
        return max(self.samples_per_s)

    @property
    def mb_per_s(self) -> float:
        return self.best * self.bytes_per_sample / MB


def _note(text: str) -> None:
    print(f"stemdl bench io-reconstruction: {text}", file=sys.stderr, flush=True)


def _timed_pipeline(name: str, train, evaluation, cfg, env, epochs: int) -> float:
    from stemdl.harness.pipelines import build_pipeline

    pipe = build_pipeline(name, train, evaluation, cfg, env)
    samples, seconds, *_ = epoch_rate(pipe, epochs)
    return samples / seconds


def _step_rate(cfg, shape: tuple, out_size: int, batch: int, steps: int, device: str) -> float:
    """Samples/s of the run's training step (forward, L1 loss, backward, Adam) on one batch in memory."""
    from stemdl.workloads.reconstruction.models import build_model
    from stemdl.workloads.reconstruction.workload import model_overrides

    torch.manual_seed(0)
    model = build_model(cfg.workload.model, shape[0], out_size, **model_overrides(cfg.workload)).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, *shape, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randn(batch, 1, out_size, out_size, device=device)
    gpu = device.startswith("cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda" if gpu else "cpu", dtype=torch.bfloat16, enabled=gpu):
            out = model(x)
        torch.nn.functional.l1_loss(out.float(), y).backward()
        optimizer.step()

    for _ in range(2):
        step()
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if gpu:
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def measure(args) -> dict:
    from stemdl.harness import dist
    from stemdl.harness.config import load_config
    from stemdl.harness.shards import ShardSet
    from stemdl.workloads.reconstruction.convert import convert
    from stemdl.workloads.reconstruction.data import load_splits
    from stemdl.workloads.reconstruction.workload import WORKLOAD

    data = Path(args.data)
    cfg = load_config(WORKLOAD, args.config, {"data": str(data), "synth_preset": "", "batch_size": args.batch,
                                              "loader_workers": args.workers})
    gpu = args.device == "cuda"
    env = dist.setup(backend="nccl" if gpu else "gloo", device="cuda" if gpu else "cpu")
    if env.world_size > 1:
        raise StemdlError("stemdl bench io-reconstruction measures one process: run it without mpiexec")
    tmp = Path(tempfile.mkdtemp(prefix="stemdl-bench-io-reconstruction-"))
    try:
        _note(f"converting {data} to shards in {tmp}")
        start = time.perf_counter()
        manifest = convert(data, tmp / "shards", splits=("train", "dev"), quiet=True)
        convert_s = time.perf_counter() - start
        h5_train, h5_eval, _ = load_splits(data, cfg, env)
        shards = ShardSet.open(tmp / "shards")
        sh_train, sh_eval = shards.split("train"), shards.split("dev")
        n = len(sh_train)
        shape, out_size = tuple(sh_train.image_shape), int(sh_train.fields["potential"].shape[-1])
        payload = int(np.prod(shape)) * 2
        h5_files = sorted(data.glob("train/*.h5"))
        h5_bytes = sum(p.stat().st_size for p in h5_files) // len(h5_train)
        stack_files = [tmp / "shards" / s["files"]["cbed"]["path"] for s in manifest["splits"]["train"]["shards"]]
        shard_bytes = sum(p.stat().st_size for p in stack_files) // n
        rows = {"limit": Row("limit", "shards' stack files, page cache", [], shard_bytes),
                "h5": Row("h5", "HDF5 set, torch pipeline", [], h5_bytes),
                "torch": Row("torch", "shards, torch pipeline", [], shard_bytes)}
        try:
            import nvidia.dali  # noqa: F401

            rows["dali"] = Row("dali", f"shards, dali pipeline ({'GPU' if gpu else 'CPU'} operators)", [], shard_bytes)
        except ImportError:
            _note("no NVIDIA DALI: its row is left out (pip install nvidia-dali-cuda130)")
        rows["step"] = Row("step", f"training step, model {cfg.workload.model}, batch {args.batch}", [], payload)
        read_files(stack_files)  # into the page cache
        for r in range(args.rounds):
            _note(f"round {r + 1}/{args.rounds}")
            names = list(rows) if r % 2 == 0 else list(reversed(rows))
            for name in names:
                if name == "limit":
                    start = time.perf_counter()
                    moved = read_files(stack_files)
                    rate = moved / shard_bytes / (time.perf_counter() - start)
                elif name == "h5":
                    rate = _timed_pipeline("torch", h5_train, h5_eval, cfg, env, args.epochs)
                elif name == "step":
                    rate = _step_rate(cfg, shape, out_size, args.batch, args.steps, env.device)
                else:
                    rate = _timed_pipeline(name, sh_train, sh_eval, cfg, env, args.epochs)
                rows[name].samples_per_s.append(rate)
        return {"samples": n, "shape": list(shape), "target": [1, out_size, out_size], "payload_bytes": payload,
                "h5_bytes_per_sample": h5_bytes, "shard_bytes_per_sample": shard_bytes,
                "convert_samples_per_s": (len(h5_train) + len(h5_eval)) / convert_s, "rows": list(rows.values())}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        dist.teardown()


def table(result: dict, args) -> list[str]:
    rows = {r.name: r for r in result["rows"]}
    limit, step = rows["limit"].best, rows["step"].best
    shape = "x".join(map(str, result["shape"]))
    lines = [f"stemdl bench io-reconstruction: {args.data}, {result['samples']} training samples of {shape} float16, "
             f"batch {args.batch}, {args.rounds} rounds, {torch.get_num_threads()} torch threads, "
             f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
             f"bytes a sample: payload {result['payload_bytes']:,}, HDF5 {result['h5_bytes_per_sample']:,}, "
             f"shards {result['shard_bytes_per_sample']:,}; convert {result['convert_samples_per_s']:,.0f} samples/s",
             "", "| row | what | samples/s (best) | MB/s | of the limit | over the step | rounds |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        rounds = ", ".join(f"{v:,.0f}" for v in r.samples_per_s)
        of_limit = f"{r.best / limit:.2f}" if r.name not in ("limit", "step") else "-"
        over = f"{r.best / step:.1f}x" if r.name != "step" else "-"
        mb = f"{r.mb_per_s:,.0f}" if r.name != "step" else "-"
        lines.append(f"| {r.name} | {r.what} | {r.best:,.0f} | {mb} | {of_limit} | {over} | {rounds} |")
    return lines


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/reconstruction/default",
                        help="a reconstruction data folder (default: %(default)s, what `stemdl run --benchmark "
                             "stemdl_reconstruction` generates)")
    parser.add_argument("--config", default="default", help="the run preset whose model steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers / DALI threads (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per pipeline and round (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads (default: every core, as `stemdl run` on one rank)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where DALI and the step run")
    parser.add_argument("--json", help="also write the figures here (never overwritten)")


def run(args: argparse.Namespace) -> int:
    if args.json and Path(args.json).exists():
        raise StemdlError(f"--json {args.json}: exists; results are never overwritten, choose another name")
    if min(args.batch, args.epochs, args.steps, args.rounds) < 1 or args.workers < 0:
        raise StemdlError("need --batch, --epochs, --steps, --rounds >= 1 and --workers >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise StemdlError("--device cuda: no CUDA GPU visible to torch")
    if not Path(args.data).is_dir():
        raise StemdlError(f"--data {args.data}: no such folder (make one: stemdl synth {args.data} "
                          f"--benchmark stemdl_reconstruction)")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    result = measure(args)
    print("\n".join(table(result, args)), flush=True)
    if args.json:
        report = {**result, "rows": [{**asdict(r), "best": r.best, "mb_per_s": r.mb_per_s} for r in result["rows"]],
                  "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
        from stemdl.harness import files

        files.write_atomic(args.json, json.dumps(report, indent=1), replace=False)
    return 0
