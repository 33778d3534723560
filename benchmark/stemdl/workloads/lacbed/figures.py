"""The montage of docs/lacbed.md: the test materials the surrogate does best, median and worst on.

    python -m stemdl.workloads.lacbed.figures docs/lacbed-montage.png --data data/lacbed/default \\
        --checkpoint ckpt/epoch_0060.pt

One row per chosen sample: its projected potential (the input), the Bloch-wave pattern and the
checkpoint's prediction (each on its own colour scale: Z is blind to gain and offset), titled with the
material and its Z.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from stemdl.harness import files
from stemdl.harness.errors import StemdlError

matplotlib.use("Agg")


def load_model(checkpoint: Path):
    """(model in evaluation mode, thickness index) from a run's checkpoint."""
    from stemdl.workloads.lacbed.models import build_model
    from stemdl.workloads.lacbed.workload import LacbedConfig, _overrides

    from stemdl.harness.checkpoint import read

    state = read(checkpoint)
    flat, weights = state["config"], state["model"]
    section = LacbedConfig(**{k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("workload.")})
    model = build_model(section.model, section.size, **_overrides(section))
    model.load_state_dict(weights)
    return model.eval(), section.thickness_index


def montage(out: Path, data: Path, checkpoint: Path, split: str = "test") -> dict:
    from stemdl.workloads.lacbed.data import load_split
    from stemdl.workloads.lacbed.models import z_values

    model, thickness = load_model(checkpoint)
    pairs = load_split(data, split, thickness)
    x = torch.from_numpy(pairs.read(np.arange(len(pairs))))
    with torch.no_grad():
        out_ = model(x)
        predicted = (out_[0] if isinstance(out_, tuple) else out_).numpy()
    z = z_values(torch.from_numpy(predicted), torch.from_numpy(pairs.fields["pattern"])).numpy()
    order = np.argsort(z)
    chosen = [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]
    fig = Figure(figsize=(8, 2.8 * len(chosen)), layout="constrained")
    axes = fig.subplots(len(chosen), 3, squeeze=False)
    for r, (label, i) in enumerate(chosen):
        panels = [(pairs.potentials[i, 0], "projected potential (V·Å)", "viridis"),
                  (pairs.fields["pattern"][i, 0], "Bloch waves", "gray"), (predicted[i, 0], "surrogate", "gray")]
        for c, (image, title, cmap) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(image, cmap=cmap, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=10)
        material = pairs.name_of(int(i)).rsplit("/", 1)[-1]
        axes[r, 0].set_ylabel(f"{label}: Z {z[i]:.2f}\n{material}", fontsize=8)
    fig.suptitle(f"{split} split of {data.name}: {len(z)} materials, mean Z {z.mean():.3f}", fontsize=11)
    files.write_figure(fig, out, dpi=110)
    return {"z": z.tolist(), "chosen": [(label, int(i)) for label, i in chosen]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stemdl.workloads.lacbed.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/lacbed/default"))
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    try:
        result = montage(args.out, args.data, args.checkpoint, args.split)
    except StemdlError as exc:
        print(f"figures: error: {exc}", file=sys.stderr)
        return 2
    z = np.asarray(result["z"])
    print(f"{args.out}: Z best {z.min():.3f}, median {np.median(z):.3f}, mean {z.mean():.3f}, worst {z.max():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
