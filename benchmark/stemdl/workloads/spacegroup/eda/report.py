"""The EDA report's files from an `Analysis`: eda.json (every number), report.md, PNG figures, an .npz of patterns.

    doc = document(a)                 # the JSON document; report.md is written from it, not from `a`
    figs = figures(a)                 # {name.png: (caption, png bytes)}, only the figures the data allow
    files = report_files(a)           # {file name: bytes}: everything `stemdl eda` writes

The Markdown is made from the JSON document, so both always say the same.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from stemdl import __version__
from stemdl.workloads.spacegroup.data import layout
from stemdl.workloads.spacegroup.eda import figures as fg
from stemdl.workloads.spacegroup.eda.analysis import Analysis
from stemdl.workloads.spacegroup.eda.stats import CRYSTAL_SYSTEMS, TOP, describe, imbalance, system_codes

PATTERNS_NPZ = "eda_patterns.npz"
LATTICE_KEYS = ("a", "b", "c", "alpha", "beta", "gamma")
EFFECTIVE = "exp(H), H the Shannon entropy (natural log) of the class distribution"


# ---- numbers --------------------------------------------------------------------------------------------

def _split_block(labels: np.ndarray, files: int) -> dict:
    counts = np.bincount(labels, minlength=layout.N_SPACE_GROUPS + 1)
    systems = np.bincount(system_codes(labels), minlength=len(CRYSTAL_SYSTEMS))
    groups = np.flatnonzero(counts)
    order = groups[np.argsort(-counts[groups], kind="stable")]
    return {"files": files, "samples": int(len(labels)), "imbalance": asdict(imbalance(counts)),
            "crystal_systems": {name: int(n) for name, n in zip(CRYSTAL_SYSTEMS, systems) if n},
            "space_groups_per_system": {CRYSTAL_SYSTEMS[s]: int(np.count_nonzero(system_codes(groups) == s))
                                        for s in np.unique(system_codes(groups))},
            "largest": [[int(g), int(counts[g])] for g in order[:TOP]],
            "space_groups": {str(g): int(counts[g]) for g in groups}}


def _lattice(a: Analysis) -> dict:
    values = np.concatenate([a.abc, a.angles], axis=1)
    return {CRYSTAL_SYSTEMS[s]: {key: describe(values[a.codes == s, j]) for j, key in enumerate(LATTICE_KEYS)}
            for s in a.present}


def _patterns(a: Analysis) -> dict | None:
    m = a.moments
    if m is None:
        return None
    per = {CRYSTAL_SYSTEMS[s]: {"samples": int(m.count[s] // layout.N_PATTERNS), "patterns": int(m.count[s]),
                                "mean_intensity": float(m.mean[s].mean()), "mean_variance": float(m.var[s].mean())}
           for s in range(len(CRYSTAL_SYSTEMS)) if m.count[s]}
    return {"samples": int(len(a.picked)), "of": int(len(a.labels)), "patterns": int(m.count.sum()),
            "size": a.options.size, "draw": a.options.draw, "seed": a.options.seed, "per_crystal_system": per,
            "arrays": PATTERNS_NPZ}


def _pca(a: Analysis) -> dict:
    if a.pca is None:
        return {"skipped": a.pca_note}
    p, o = a.pca, a.options
    return {"n_components": int(len(p.ratio)), "requested": o.components, "rows": int(len(p.coords)),
            "features": int(p.components.shape[1]), "chunk": o.chunk, "chunks": p.chunks, "tracked": p.tracked,
            "explained_variance_ratio": p.ratio.tolist(), "explained_variance": p.variance.tolist(),
            "cumulative": float(p.ratio.sum())}


def document(a: Analysis, captions: dict[str, str] | None = None) -> dict:
    """Every number of the report, JSON-ready."""
    split_of_file = [layout.split_of(Path(f).name) for f in a.files]
    splits = {s: _split_block(a.labels[a.splits == layout.SPLITS.index(s)], split_of_file.count(s))
              for s in a.present_splits}
    o = a.options
    return {"data": str(a.root), "generator": f"stemdl {__version__}",
            "options": {k: getattr(o, k) for k in ("max_samples", "seed", "draw", "size", "components", "chunk")},
            "effective_classes": EFFECTIVE,
            "splits": splits, "all": _split_block(a.labels, len(a.files)),
            "lattice": _lattice(a), "patterns": _patterns(a), "pca": _pca(a), "figures": captions or {}}


# ---- figures --------------------------------------------------------------------------------------------

def figures(a: Analysis) -> dict[str, tuple[str, bytes]]:
    """{file name: (one-sentence caption, PNG)} for every figure the data allow."""
    out = {}
    by_split = {s: np.bincount(a.labels[a.splits == layout.SPLITS.index(s)], minlength=layout.N_SPACE_GROUPS + 1)
                for s in a.present_splits}
    out["space_groups.png"] = ("Samples per space group in each split, on a log scale, coloured by crystal system.",
                               fg.png(fg.space_groups_figure(by_split)))
    systems = {s: np.bincount(a.codes[a.splits == layout.SPLITS.index(s)], minlength=len(CRYSTAL_SYSTEMS))
               for s in a.present_splits}
    out["crystal_systems.png"] = ("Samples per crystal system, one bar per split.",
                                  fg.png(fg.crystal_systems_figure(systems, a.present)))
    out["lattice.png"] = ("Box plots of the lattice constants a, b, c (Å) and angles α, β, γ (°) of every sample, "
                          "per crystal system.", fg.png(fg.lattice_figure(a.abc, a.angles, a.codes, a.present)))
    m = a.moments
    if m is not None:
        drawn = [s for s in range(len(CRYSTAL_SYSTEMS)) if m.count[s]]
        out["patterns.png"] = (
            f"Mean (top) and variance (bottom) of the preprocessed {a.options.size}x{a.options.size} patterns per "
            "crystal system, over all three patterns of each drawn sample.",
            fg.png(fg.patterns_figure(m.count // layout.N_PATTERNS, m.mean, m.var, drawn, a.options.size)))
    if a.pca is not None:
        out.update(_pca_figures(a))
    return out


def _pca_figures(a: Analysis) -> dict[str, tuple[str, bytes]]:
    p, size = a.pca, a.options.size
    out = {"pca_variance.png": ("Explained variance ratio of each principal component of the patterns (bars) "
                                "and its cumulative sum (line).", fg.png(fg.pca_variance_figure(p.ratio))),
           "pca_components.png": (f"The first {min(len(p.ratio), fg.SHOW_COMPONENTS)} principal components as "
                                  f"{size}x{size} images (red positive, blue negative; the sign is arbitrary).",
                                  fg.png(fg.pca_components_figure(p.components, p.ratio, size)))}
    if p.coords.shape[1] >= 2:
        drawn = sorted({int(c) for c in a.row_codes})
        out["pca_scatter.png"] = ("Every drawn pattern projected on the first two principal components, "
                                  "coloured by crystal system.",
                                  fg.png(fg.pca_scatter_figure(p.coords, a.row_codes, drawn, p.ratio)))
    return out


def patterns_npz(a: Analysis) -> bytes | None:
    """The pattern arrays behind the figures: per-system mean and variance, PCA components and coordinates."""
    m, s = a.moments, a.options.size
    if m is None:
        return None
    drawn = np.flatnonzero(m.count)
    arrays = {"systems": np.array([CRYSTAL_SYSTEMS[c] for c in drawn]), "patterns": m.count[drawn],
              "mean": m.mean[drawn].reshape(-1, s, s), "var": m.var[drawn].reshape(-1, s, s),
              "picked": a.picked, "row_system": a.row_codes}
    if a.pca is not None:
        arrays.update(pca_ratio=a.pca.ratio, pca_components=a.pca.components.reshape(-1, s, s),
                      pca_mean=a.pca.mean.reshape(s, s), pca_coords=a.pca.coords)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def report_files(a: Analysis) -> dict[str, bytes]:
    """Every file of the report, by name."""
    figs = figures(a)
    doc = document(a, {name: caption for name, (caption, _) in figs.items()})
    files = {"report.md": markdown(doc).encode(),
             "eda.json": (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode()}
    files.update({name: data for name, (_, data) in figs.items()})
    npz = patterns_npz(a)
    if npz is not None:
        files[PATTERNS_NPZ] = npz
    return files


# ---- Markdown -------------------------------------------------------------------------------------------

def _figure(doc: dict, name: str) -> list[str]:
    caption = doc["figures"].get(name)
    return [f"![{name}]({name})", "", f"*{caption}*", ""] if caption else []


def _samples_section(doc: dict) -> list[str]:
    lines = ["## Samples", "",
             "| split | files | samples | space groups | largest / smallest class | top-10 share | effective classes |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for name, block in [*doc["splits"].items(), ("all", doc["all"])]:
        imb = block["imbalance"]
        lines.append(f"| {name} | {block['files']} | {block['samples']} | {imb['classes']} | "
                     f"{imb['largest']} / {imb['smallest']} = {imb['max_min_ratio']:.1f} | "
                     f"{100 * imb['top10_share']:.1f} % | {imb['effective_classes']:.2f} |")
    lines += ["", f"Effective classes: {doc['effective_classes']}; it equals the number of classes when they are "
              "balanced and falls towards 1 as one class dominates.", ""]
    lines += _figure(doc, "space_groups.png")
    for name, block in doc["splits"].items():
        lines += [f"### {name}", "", "| crystal system | space groups | samples | share |", "|---|--:|--:|--:|"]
        for system, n in block["crystal_systems"].items():
            lines.append(f"| {system} | {block['space_groups_per_system'][system]} | {n} | "
                         f"{100 * n / block['samples']:.1f} % |")
        largest = ", ".join(f"{g} ({n})" for g, n in block["largest"])
        lines += ["", f"Largest space groups (samples): {largest}.", ""]
    return lines + _figure(doc, "crystal_systems.png")


def _lattice_section(doc: dict) -> list[str]:
    lines = ["## Lattice constants and angles", "", "Medians over every sample of each crystal system.", "",
             "| crystal system | samples | a (Å) | b (Å) | c (Å) | α (°) | β (°) | γ (°) |", "|---|--:|" + "--:|" * 6]
    for system, stats in doc["lattice"].items():
        cells = " | ".join(f"{stats[k]['median']:.2f}" for k in LATTICE_KEYS)
        lines.append(f"| {system} | {stats['a']['n']} | {cells} |")
    return lines + [""] + _figure(doc, "lattice.png")


def _patterns_section(doc: dict) -> list[str]:
    p = doc["patterns"]
    if p is None:
        return ["## Patterns", "", "No sample was drawn for the pattern statistics (--max-samples 0).", ""]
    lines = ["## Patterns", "",
             f"From {p['samples']} of {p['of']} samples ({p['draw']} draw, seed {p['seed']}): each of the three "
             f"patterns of a sample log-scaled, clipped to 0..255 and area-resized to {p['size']}x{p['size']} by "
             f"the harness's preprocessing ({p['patterns']} patterns). Arrays: `{p['arrays']}`.", "",
             "| crystal system | samples | mean intensity | mean variance |", "|---|--:|--:|--:|"]
    for system, s in p["per_crystal_system"].items():
        lines.append(f"| {system} | {s['samples']} | {s['mean_intensity']:.2f} | {s['mean_variance']:.1f} |")
    return lines + [""] + _figure(doc, "patterns.png")


def _pca_section(doc: dict) -> list[str]:
    p = doc["pca"]
    if "skipped" in p:
        return ["## PCA", "", f"No PCA: {p['skipped']}.", ""]
    lines = ["## PCA", "",
             f"IncrementalPCA of {p['rows']} patterns ({p['features']} pixels each) in {p['chunks']} step(s) of "
             f"about {p['chunk']} patterns, tracking {p['tracked']} components: the first {p['n_components']} "
             f"(of {p['requested']} asked for) explain {100 * p['cumulative']:.1f} % of the variance.", "",
             "| component | explained variance ratio | cumulative |", "|--:|--:|--:|"]
    cumulative = np.cumsum(p["explained_variance_ratio"])
    for i, (r, c) in enumerate(zip(p["explained_variance_ratio"], cumulative)):
        lines.append(f"| PC{i + 1} | {r:.4f} | {c:.4f} |")
    lines.append("")
    for name in ("pca_variance.png", "pca_components.png", "pca_scatter.png"):
        lines += _figure(doc, name)
    return lines


def markdown(doc: dict) -> str:
    o = doc["options"]
    head = ["# STEMDL exploratory data analysis", "",
            f"Data: `{doc['data']}`: {doc['all']['samples']} samples in {doc['all']['files']} files, "
            f"{doc['all']['imbalance']['classes']} space groups. Made by {doc['generator']} with "
            f"--max-samples {o['max_samples']} --seed {o['seed']} --draw {o['draw']} --size {o['size']} "
            f"--components {o['components']}. Every number is in `eda.json`.", ""]
    body = _samples_section(doc) + _lattice_section(doc) + _patterns_section(doc) + _pca_section(doc)
    return "\n".join(head + body).rstrip("\n") + "\n"
