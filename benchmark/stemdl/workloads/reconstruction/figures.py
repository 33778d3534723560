"""The figures of docs/reconstruction.md: what the network sees and what it makes of it, and how runs
converge.

    python -m stemdl.workloads.reconstruction.figures samples docs/reconstruction-samples.png \\
        --data data/reconstruction/default --checkpoint ckpt/epoch_0040.pt
    python -m stemdl.workloads.reconstruction.figures curves docs/reconstruction-curves.png \\
        logs/seed*/result_0.metrics.json --target 0.58

`samples`: one row per validation sample: the N x N probe grid's CBED patterns as one mosaic (each pattern
z-scored, as stored), the true potential, the model's prediction (the checkpoint's weights) and the
absolute error, the potential panels on one colour scale per row. `curves`: the validation MAE after each
epoch of each run's metrics file, with the target and a constant prediction's MAE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from stemdl.harness import files
from stemdl.harness.errors import StemdlError

matplotlib.use("Agg")


def mosaic(stack: np.ndarray) -> np.ndarray:
    """(N², S, S) -> (N S, N S): pattern k of the raster order at row k // N, column k % N."""
    n2, s, _ = stack.shape
    n = int(round(n2 ** 0.5))
    if n * n != n2:
        raise StemdlError(f"a stack of {n2} patterns is not a square probe grid")
    return stack.reshape(n, n, s, s).transpose(0, 2, 1, 3).reshape(n * s, n * s)


def predictions(checkpoint: Path, x: np.ndarray, out_size: int) -> np.ndarray:
    """The checkpoint's model on the stacks x (n, N², S, S): (n, T, T)."""
    import torch

    from stemdl.workloads.reconstruction.models import build_model
    from stemdl.workloads.reconstruction.workload import ReconstructionConfig, model_overrides

    from stemdl.harness.checkpoint import read

    state = read(checkpoint)
    flat, weights = state["config"], state["model"]
    section = ReconstructionConfig(**{k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("workload.")})
    model = build_model(section.model, x.shape[1], out_size, **model_overrides(section))
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x.astype(np.float32))).numpy()[:, 0]


def samples_figure(out: Path, data: Path, checkpoint: Path, count: int, split: str) -> None:
    from stemdl.workloads.reconstruction.data import H5Split, Index, screen

    index = Index.build(data)
    rows = index.select(split)[:count]
    if not len(rows):
        raise StemdlError(f"--data {data}: no {split} samples")
    bad, potentials, shapes = screen(index, rows)
    if bad:
        raise bad[0]
    chosen = H5Split(index, rows, potentials, shapes)
    x = chosen.read(np.arange(len(rows)))
    truth = potentials[:, 0].astype(np.float32)
    guess = predictions(checkpoint, x, truth.shape[-1])
    fig = Figure(figsize=(11, 2.7 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 4, squeeze=False)
    titles = ("CBED patterns of the probe grid", "true potential (z-scored)", "prediction", "|error|")
    for r in range(len(rows)):
        low, high = truth[r].min(), truth[r].max()
        mae = np.abs(guess[r] - truth[r]).mean()
        panels = [(mosaic(x[r].astype(np.float32)), "gray", None, None), (truth[r], "viridis", low, high),
                  (guess[r], "viridis", low, high), (np.abs(guess[r] - truth[r]), "magma", 0, high - low)]
        for c, (image, cmap, vmin, vmax) in enumerate(panels):
            ax = axes[r, c]
            shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
            if c == 3:
                fig.colorbar(shown, ax=ax, shrink=0.8)
        axes[r, 0].set_ylabel(chosen.groups[r] + f"\nMAE {mae:.2f}", fontsize=9)
    fig.suptitle(f"data set {data.name}: {split} samples; model {checkpoint.name}", fontsize=11)
    _save(fig, out)


def curves_figure(out: Path, metrics: list[Path], target: float | None, constant: float | None) -> None:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for path in metrics:
        try:
            history = json.loads(path.read_text())["history"]
        except (OSError, ValueError, KeyError) as exc:
            raise StemdlError(f"{path}: not a run's metrics file ({exc})") from None
        ax.plot([h["epoch"] for h in history], [h["mae"] for h in history], lw=1.2, label=_run_label(path))
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
    if constant is not None:
        ax.axhline(constant, color="gray", ls=":", lw=1, label=f"constant prediction {constant:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MAE (z-scored potential)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out)


def _run_label(metrics: Path) -> str:
    """"seed S" from the run's config file beside its metrics (result_N.config.json), else the file's name."""
    config = metrics.with_name(metrics.name.replace(".metrics.json", ".config.json"))
    try:
        return f"seed {json.loads(config.read_text())['harness']['seed']}"
    except (OSError, ValueError, KeyError, TypeError):
        return str(metrics)


def _save(fig: Figure, out: Path) -> None:
    files.write_figure(fig, out, dpi=110)
    print(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stemdl.workloads.reconstruction.figures",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    p = sub.add_parser("samples", help="inputs, targets, predictions and errors side by side")
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, default=Path("data/reconstruction/default"))
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint of a run (stemdl run --set "
                                                                  "checkpoint_dir=... --set checkpoint_every=...)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--split", default="dev")
    p = sub.add_parser("curves", help="validation MAE against epoch of several runs")
    p.add_argument("out", type=Path)
    p.add_argument("metrics", type=Path, nargs="+", help="result_N.metrics.json files of runs")
    p.add_argument("--target", type=float)
    p.add_argument("--constant", type=float, help="a constant prediction's MAE, drawn for reference")
    args = parser.parse_args(argv)
    try:
        if args.figure == "samples":
            samples_figure(args.out, args.data, args.checkpoint, args.samples, args.split)
        else:
            curves_figure(args.out, args.metrics, args.target, args.constant)
    except StemdlError as exc:
        print(f"figures: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
