"""Deterministic 5-fold assignment of SIPaKMeD cells (no TensorFlow needed).

SIPaKMeD has no official split and no patient or slide ids. Cells of one cluster image share
slide, stain, focus and background, so a cell-level random split puts near-duplicates on both
sides. The leak-free protocol groups by cluster image, `cluster_id = <Class>/NNN`.

`grouped` (the default, leak-free), for each class in label order (`SIPAKMED.class_names`):
  1. count the class's cells per cluster;
  2. order its clusters by decreasing cell count, ties by `sha256(cluster_id)` (hex, UTF-8);
  3. give each cluster in turn to the fold with the fewest cells of this class; ties go to the
     fold with the fewest cells overall (all classes so far), then to the lowest fold index.
  Every cluster lands in exactly one fold; each fold holds close to 1/5 of every class.

`random_cells` (leaks; only to compare with published cell-level numbers), for each class in
label order (class index c): order its cells by `sha256(file_name)`; the cell of rank
r goes to fold `(r + c) % 5`.

Both are pure functions of the set of (cluster_id, file_name) pairs: the same data gives the same
folds on any machine, in any order the cells are listed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from tfds_sipakmed.taxonomy import SIPAKMED

CONFIGS = ("grouped", "random_cells")
NUM_FOLDS = 5


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _get(cell, key) -> str:
    v = cell[key] if isinstance(cell, Mapping) else getattr(cell, key)
    return v.decode("utf-8") if isinstance(v, bytes) else v


def _class_of(cell) -> str:
    cls = _get(cell, "cluster_id").rsplit("/", 1)[0]
    if cls not in SIPAKMED.class_names:
        raise ValueError(f"cluster_id {_get(cell, 'cluster_id')!r} does not start with a class")
    return cls


def assign_folds(cells: Sequence, config: str = "grouped", num_folds: int = NUM_FOLDS) -> list[int]:
    """Fold index (0..num_folds-1) of each cell, in the order given.

    `cells`: dicts (e.g. from `layout.iter_cells` or `as_data_source()`) or `layout.CellRef`s;
    only `cluster_id` (`<Class>/NNN`, str or bytes) and `file_name` are used. `config`:
    'grouped' or 'random_cells' (see the module docstring for the exact algorithms).
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown fold config {config!r}; expected one of {CONFIGS}")
    names = [_get(c, "file_name") for c in cells]
    if len(set(names)) != len(names):
        raise ValueError("assign_folds: duplicate file_name among the cells")
    by_class: dict[str, list[int]] = {c: [] for c in SIPAKMED.class_names}
    for i, c in enumerate(cells):
        by_class[_class_of(c)].append(i)
    folds = [-1] * len(names)
    if config == "random_cells":
        for ci, cls in enumerate(SIPAKMED.class_names):
            for rank, i in enumerate(sorted(by_class[cls], key=lambda i: _hash(names[i]))):
                folds[i] = (rank + ci) % num_folds
        return folds

    total = [0] * num_folds
    for cls in SIPAKMED.class_names:
        clusters: dict[str, list[int]] = {}
        for i in by_class[cls]:
            clusters.setdefault(_get(cells[i], "cluster_id"), []).append(i)
        order = sorted(clusters, key=lambda cid: (-len(clusters[cid]), _hash(cid)))
        per_class = [0] * num_folds
        for cid in order:
            f = min(range(num_folds), key=lambda f: (per_class[f], total[f], f))
            for i in clusters[cid]:
                folds[i] = f
            per_class[f] += len(clusters[cid])
            total[f] += len(clusters[cid])
    return folds


def split_name(fold: int) -> str:
    """The TFDS split name of a fold index."""
    return f"fold{fold}"
