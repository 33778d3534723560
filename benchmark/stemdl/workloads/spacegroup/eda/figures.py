"""The figures of the EDA report, as PNG bytes; each function takes plain arrays and returns a Figure.

    png(space_groups_figure({"train": index.class_counts("train")}))   # bytes of a PNG

Crystal systems keep one colour in every figure (tab10, in the order of CRYSTAL_SYSTEMS), and only the
systems passed in `present` are drawn, so a system without samples leaves no empty panel or legend entry.
matplotlib's object API (Figure, not pyplot) keeps no global state between figures.
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from stemdl.workloads.spacegroup.eda.stats import CRYSTAL_SYSTEMS, system_codes

matplotlib.use("Agg")  # no display on a compute node; the Figure API below does not need one anyway

COLOURS = {name: matplotlib.colormaps["tab10"](i) for i, name in enumerate(CRYSTAL_SYSTEMS)}
LATTICE = (("a", "a (Å)"), ("b", "b (Å)"), ("c", "c (Å)"), ("alpha", "α (°)"), ("beta", "β (°)"),
           ("gamma", "γ (°)"))
SPLIT_COLOURS = {"train": "0.25", "dev": "0.55", "test": "0.8"}  # greys: the colours belong to the systems
SHOW_COMPONENTS = 8


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _system_of_groups() -> list[str]:
    """The crystal system of space groups 1..230, by number."""
    return [CRYSTAL_SYSTEMS[c] for c in system_codes(np.arange(1, 231))]


def space_groups_figure(counts: dict[str, np.ndarray]) -> Figure:
    """One panel per split: samples per space group (counts indexed by space group, length 231), log scale."""
    systems = _system_of_groups()
    fig = Figure(figsize=(10, 2.4 * len(counts) + 0.6), layout="constrained")
    axes = fig.subplots(len(counts), 1, squeeze=False, sharex=True)[:, 0]
    for ax, (split, c) in zip(axes, counts.items()):
        groups = np.flatnonzero(c[1:]) + 1
        shown = sorted({systems[g - 1] for g in groups}, key=CRYSTAL_SYSTEMS.index)
        for name in shown:
            mine = [g for g in groups if systems[g - 1] == name]
            ax.bar(mine, c[mine], width=1.0, color=COLOURS[name], label=name)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
        title = f"{split}: {_count(int(c.sum()), 'sample')} in {_count(len(groups), 'space group')}"
        ax.set(ylabel="samples (log)", title=title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=4, loc="upper right")
    axes[-1].set(xlabel="space group number", xlim=(0, 231))
    return fig


def crystal_systems_figure(counts: dict[str, np.ndarray], present: list[int]) -> Figure:
    """Grouped bars: samples per crystal system (counts indexed by system code), one bar per split."""
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(present))
    width = 0.8 / len(counts)
    for j, (split, c) in enumerate(counts.items()):
        bars = ax.bar(x + (j - (len(counts) - 1) / 2) * width, c[present], width=width, label=split,
                      color=SPLIT_COLOURS.get(split, "0.5"), edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, [CRYSTAL_SYSTEMS[s] for s in present], rotation=20)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(ylabel="samples", title="samples per crystal system and split")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def lattice_figure(abc: np.ndarray, angles: np.ndarray, codes: np.ndarray, present: list[int]) -> Figure:
    """Box plots of a, b, c and alpha, beta, gamma per crystal system (one value per sample)."""
    values = np.concatenate([abc, angles], axis=1)
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    names = [CRYSTAL_SYSTEMS[s] for s in present]
    for col, (ax, (_, label)) in enumerate(zip(axes, LATTICE)):
        data = [values[codes == s, col] for s in present]
        box = ax.boxplot(data, positions=np.arange(len(present)), widths=0.6, patch_artist=True,
                         flierprops={"markersize": 2}, medianprops={"color": "black"})
        for patch, name in zip(box["boxes"], names):
            patch.set_facecolor(COLOURS[name])
        ax.set_xticks(np.arange(len(present)), names, rotation=30, fontsize=8)
        ax.set(ylabel=label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("lattice constants and angles per crystal system (all samples)")
    return fig


def patterns_figure(samples: np.ndarray, mean: np.ndarray, var: np.ndarray, present: list[int],
                    size: int) -> Figure:
    """Mean (top) and variance (bottom) pattern per crystal system, one colour scale per row; `samples`
    (per system) is only for the titles."""
    fig = Figure(figsize=(2.3 * len(present) + 1.2, 5), layout="constrained")
    axes = fig.subplots(2, len(present), squeeze=False)
    for row, (field, label) in enumerate(((mean, "mean (0..255)"), (var, "variance"))):
        top = max(float(field[present].max()), 1e-12)
        for ax, s in zip(axes[row], present):
            im = ax.imshow(field[s].reshape(size, size), cmap="magma", vmin=0, vmax=top)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{CRYSTAL_SYSTEMS[s]}: {label.split()[0]}\n{_count(int(samples[s]), 'sample')}",
                         fontsize=8)
        fig.colorbar(im, ax=list(axes[row]), shrink=0.9, label=label)
    return fig


def pca_variance_figure(ratio: np.ndarray) -> Figure:
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.add_subplot()
    k = np.arange(1, len(ratio) + 1)
    ax.bar(k, ratio, label="per component")
    ax.plot(k, np.cumsum(ratio), "o-", color="C1", label="cumulative")
    ax.set(xlabel="principal component", ylabel="explained variance ratio", ylim=(0, 1.02),
           title="PCA of the preprocessed patterns")
    ax.set_xticks(k)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def pca_components_figure(components: np.ndarray, ratio: np.ndarray, size: int) -> Figure:
    """The first components as images, on a symmetric diverging scale (sign is arbitrary in PCA)."""
    n = min(len(components), SHOW_COMPONENTS)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.4 * cols + 0.8, 2.5 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.set_visible(False)
            continue
        lim = max(float(np.abs(components[i]).max()), 1e-12)
        im = ax.imshow(components[i].reshape(size, size), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"PC{i + 1} ({100 * ratio[i]:.1f} %)", fontsize=9)
    fig.colorbar(im, ax=list(axes[:n]), shrink=0.8, label="loading")
    return fig


def pca_scatter_figure(coords: np.ndarray, codes: np.ndarray, present: list[int], ratio: np.ndarray) -> Figure:
    """Every pattern on the first two components, coloured by its crystal system."""
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.add_subplot()
    for s in present:
        mine = coords[codes == s]
        ax.scatter(mine[:, 0], mine[:, 1], s=6, alpha=0.6, color=COLOURS[CRYSTAL_SYSTEMS[s]],
                   label=f"{CRYSTAL_SYSTEMS[s]} ({len(mine)} patterns)")
    ax.set(xlabel=f"PC1 ({100 * ratio[0]:.1f} % of the variance)",
           ylabel=f"PC2 ({100 * ratio[1]:.1f} % of the variance)", title="patterns on the first two components")
    ax.legend(fontsize=8, markerscale=2)
    ax.grid(True, alpha=0.3)
    return fig
