"""Deterministic 5-fold assignment of a dataset's cells, grouped and stratified (no TensorFlow).

Cells cut from one source (SIPaKMeD's cluster image, CRIC's slide image, a lab's slide) share
slide, stain, focus and background, so a cell-level random split puts near-duplicates on both
sides. The leak-free protocol keeps every `group_id` in one fold (SIPaKMeD: its cluster image,
`<Class>/NNN`, given as `group_id` or, in SIPaKMeD's own examples, `cluster_id`).

`grouped` (the default, leak-free):
  1. each group's class is its most frequent label (ties: the lowest label index); for
     SIPaKMeD every group holds one class;
  2. for each class in label order: order the groups of that class by decreasing cell count,
     ties by `sha256(group_id)` (hex, UTF-8);
  3. give each group in turn to the fold with the fewest cells of this class; ties go to the
     fold with the fewest cells overall (all classes so far), then to the lowest fold index.
  Every group lands in exactly one fold; with one class per group each fold holds close to
  1/5 of every class (groups that mix classes make the per-class balance approximate).

`random_cells` (leaks; only to compare with published cell-level numbers), for each class in
label order (class index c): order its cells by `sha256(file_name)`; the cell of rank r goes
to fold `(r + c) % 5`.

Both are pure functions of the set of (group_id, label, file_name) triples: the same data gives
the same folds on any machine, in any order the cells are listed. For SIPaKMeD this is exactly
the assignment of the first release (a test pins it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from tfds_sipakmed.taxonomy import SIPAKMED

CONFIGS = ("grouped", "random_cells")
NUM_FOLDS = 5


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _get(cell, key, default=None):
    if isinstance(cell, Mapping):
        v = cell.get(key, default)
    else:
        v = getattr(cell, key, default)
    return v.decode("utf-8") if isinstance(v, bytes) else v


def _group(cell) -> str:
    group = _get(cell, "group_id")
    return _get(cell, "cluster_id") if group is None else group


def _label(cell, class_names: Sequence[str]) -> int:
    """The cell's `label`; SIPaKMeD examples without one: the class in `cluster_id`."""
    label = _get(cell, "label")
    if label is None:
        cls = str(_get(cell, "cluster_id", "")).rsplit("/", 1)[0]
        if cls not in class_names:
            raise ValueError(f"cell {_get(cell, 'file_name')!r} has no label and no class prefix")
        return class_names.index(cls)
    if not 0 <= int(label) < len(class_names):
        raise ValueError(
            f"cell {_get(cell, 'file_name')!r}: label {label} is not an index into "
            f"{len(class_names)} classes"
        )
    return int(label)


def assign_folds(
    cells: Sequence,
    config: str = "grouped",
    num_folds: int = NUM_FOLDS,
    class_names: Sequence[str] = SIPAKMED.class_names,
) -> list[int]:
    """Fold index (0..num_folds-1) of each cell, in the order given.

    `cells`: dicts or objects with `file_name`, `group_id` (or SIPaKMeD's `cluster_id`) and
    `label` (an index into `class_names`; SIPaKMeD dicts without one take the class from
    `cluster_id`), str or bytes: `datasets.CellRef`s, `layout.CellRef`s, examples. `config`:
    'grouped' or 'random_cells' (see the module docstring for the exact algorithms).
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown fold config {config!r}; expected one of {CONFIGS}")
    names = [_get(c, "file_name") for c in cells]
    if len(set(names)) != len(names):
        raise ValueError("assign_folds: duplicate file_name among the cells")
    class_names = tuple(class_names)
    labels = [_label(c, class_names) for c in cells]
    if config == "random_cells":
        return _random_cells(names, labels, len(class_names), num_folds)
    return _grouped([_group(c) for c in cells], labels, len(class_names), num_folds)


def _random_cells(names, labels, num_classes: int, num_folds: int) -> list[int]:
    folds = [-1] * len(names)
    for ci in range(num_classes):
        members = [i for i, lab in enumerate(labels) if lab == ci]
        for rank, i in enumerate(sorted(members, key=lambda i: _hash(names[i]))):
            folds[i] = (rank + ci) % num_folds
    return folds


def _grouped(groups, labels, num_classes: int, num_folds: int) -> list[int]:
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    main_class = {}
    for g, rows in members.items():
        counts = [sum(labels[i] == c for i in rows) for c in range(num_classes)]
        main_class[g] = max(range(num_classes), key=lambda c: (counts[c], -c))
    folds = [-1] * len(groups)
    total = [0] * num_folds
    per_class = [[0] * num_folds for _ in range(num_classes)]
    for cls in range(num_classes):
        mine = [g for g in members if main_class[g] == cls]
        for g in sorted(mine, key=lambda g: (-len(members[g]), _hash(g))):
            f = min(range(num_folds), key=lambda f: (per_class[cls][f], total[f], f))
            for i in members[g]:
                folds[i] = f
                per_class[labels[i]][f] += 1
            total[f] += len(members[g])
    return folds


def split_name(fold: int) -> str:
    """The TFDS split name of a fold index."""
    return f"fold{fold}"
