"""Small pieces the Herlev and CRIC TFDS builders share (TF-free).

- `split_by_fold(refs, folds, class_names)`: the refs of each fold (`folds.assign_folds`).
- `config_name(folds, suffix_parts)`: `grouped`, or `grouped-<part>-<part>` for a non-default
  option (a CRIC crop size, a Herlev grouping rule).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from tfds_sipakmed import folds as folds_lib
from tfds_sipakmed.datasets import DatasetError


def check_folds(folds: str) -> str:
    if folds not in folds_lib.CONFIGS:
        raise DatasetError(f"unknown fold config {folds!r}; expected one of {folds_lib.CONFIGS}")
    return folds


def split_by_fold(refs: Sequence, folds: str, class_names: Sequence[str]) -> list[list]:
    """[refs of fold 0, ..., refs of fold NUM_FOLDS-1], each in the order given."""
    assignment = folds_lib.assign_folds(refs, check_folds(folds), class_names=class_names)
    per_fold = [[] for _ in range(folds_lib.NUM_FOLDS)]
    for ref, fold in zip(refs, assignment, strict=True):
        per_fold[fold].append(ref)
    return per_fold


def short_digest(text: str) -> str:
    """8 hex digits of sha256(text): a stable config-name part for a free-form option."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def config_name(folds: str, *parts: str) -> str:
    """`folds` alone, or `folds-part-part` (non-empty parts only)."""
    return "-".join([check_folds(folds), *[p for p in parts if p]])
