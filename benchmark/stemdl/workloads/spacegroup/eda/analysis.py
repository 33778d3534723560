"""Everything `stemdl eda` computes from a data set, before anything is drawn or written.

    a = analyse(load_or_build("data/default"), Options(max_samples=500), scratch=Path("/tmp/rows.npy"))
    a.present                       # crystal systems with samples, as codes into CRYSTAL_SYSTEMS
    a.moments.mean[code]            # mean pattern of a crystal system (S*S,), from the drawn samples
    a.pca.ratio                     # explained variance ratios, or a.pca is None and a.pca_note says why

Counts and attributes cover every sample; the pattern statistics cover the `max_samples` drawn ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from stemdl.workloads.spacegroup.data import layout
from stemdl.workloads.spacegroup.eda.patterns import CHUNK, Moments, PcaResult, class_moments, fit_pca, read_samples
from stemdl.workloads.spacegroup.eda.stats import draw, system_codes
from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.preprocess import Preprocess


@dataclass(frozen=True)
class Options:
    max_samples: int = 2000  # samples in the pattern pass
    seed: int = 0  # of the draw
    draw: str = "stratified"  # or "uniform"; see stats.draw
    size: int = 64  # patterns are area-resized to size x size
    components: int = 10  # principal components asked for (capped to what the data allows)
    chunk: int = CHUNK  # patterns per IncrementalPCA step
    workers: int | None = None  # processes reading files (None: the reader's default)
    quiet: bool = False  # no progress on stderr


@dataclass(frozen=True, eq=False)
class Analysis:
    root: Path
    files: list[str]  # relative to root, as in the index
    options: Options
    labels: np.ndarray  # space group of every sample, in index order
    splits: np.ndarray  # split of every sample as an index into layout.SPLITS
    abc: np.ndarray  # (n, 3) lattice constants in angstrom
    angles: np.ndarray  # (n, 3) lattice angles in degrees
    picked: np.ndarray  # sorted entry numbers of the samples in the pattern pass
    moments: Moments | None  # None when no sample was drawn
    pca: PcaResult | None
    pca_note: str = ""  # why there is no PCA

    @cached_property
    def codes(self) -> np.ndarray:
        """The crystal system of every sample (index into CRYSTAL_SYSTEMS)."""
        return system_codes(self.labels)

    @cached_property
    def row_codes(self) -> np.ndarray:
        """The crystal system of every pattern in the pattern pass (three per drawn sample)."""
        return np.repeat(self.codes[self.picked], layout.N_PATTERNS)

    @property
    def present(self) -> list[int]:
        return [int(c) for c in np.unique(self.codes)]

    @property
    def present_splits(self) -> list[str]:
        return [s for k, s in enumerate(layout.SPLITS) if np.any(self.splits == k)]


def check_sizes(index, picked: np.ndarray, size: int) -> None:
    """Refuse, naming a sample, if a drawn sample is smaller than the size the patterns are resized to."""
    shapes = index.shape[picked]
    small = np.flatnonzero(shapes[:, 1:].min(axis=1) < size) if len(picked) else []
    if len(small):
        i = int(picked[small[0]])
        h, w = (int(n) for n in index.shape[i, 1:])
        smallest = int(shapes[:, 1:].min())
        raise StemdlError(f"--size {size}: {index.file_path(i)}:{index.group_name(i)} has {h}x{w} patterns; "
                          f"choose --size {smallest} or less")


def analyse(index, opts: Options, scratch: Path) -> Analysis:
    """Counts, attributes, and the pattern statistics of a seeded draw; `scratch` is a file to spill to."""
    if len(index) == 0:
        raise StemdlError(f"{index.root}: the data files hold no samples")
    codes = system_codes(index.label)
    picked = draw(codes, opts.max_samples, opts.seed, opts.draw)
    check_sizes(index, picked, opts.size)
    rows, abc, angles = read_samples(index, picked, Preprocess(size=opts.size), scratch, opts.workers,
                                     opts.quiet)
    row_codes = np.repeat(codes[picked], layout.N_PATTERNS)
    moments = class_moments(rows, row_codes, opts.chunk) if len(picked) else None
    pca, note = None, ""
    if moments is None:
        note = "no sample was drawn (--max-samples 0)"
    elif moments.total_variance() <= 0:
        note = "all drawn patterns are identical"
    else:
        pca = fit_pca(rows, opts.components, opts.chunk, opts.quiet)
        note = "" if pca is not None else "the drawn patterns allow no component"
    return Analysis(root=Path(index.root), files=list(index.files), options=opts, labels=index.label.astype(np.int64),
                    splits=np.asarray(index.split), abc=abc, angles=angles, picked=picked, moments=moments, pca=pca,
                    pca_note=note)
