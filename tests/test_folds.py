"""`tfds_sipakmed.folds`: grouped folds keep every cluster image in one fold, stay stratified,
and are deterministic; the leaky `random_cells` folds split clusters. No TensorFlow needed."""

import collections
import random

import pytest

from tfds_sipakmed import folds
from tfds_sipakmed.taxonomy import SIPAKMED

CLASS_NAMES = SIPAKMED.class_names

# The real dataset's shape: cluster images and cells per class (dataset notes).
REAL = {
    "Dyskeratotic": (223, 813),
    "Koilocytotic": (238, 825),
    "Metaplastic": (271, 793),
    "Parabasal": (108, 787),
    "Superficial-Intermediate": (126, 831),
}


def fake_cells(seed=0):
    """Cells with the real number of clusters and cells per class, uneven cluster sizes."""
    rng = random.Random(seed)
    cells = []
    for cls, (n_clusters, n_cells) in REAL.items():
        sizes = [1] * n_clusters
        for _ in range(n_cells - n_clusters):
            sizes[rng.randrange(n_clusters)] += 1
        for k, size in enumerate(sizes, start=1):
            for j in range(1, size + 1):
                cells.append(
                    {
                        "cluster_id": f"{cls}/{k:03d}",
                        "file_name": f"im_{cls}/CROPPED/{k:03d}_{j:02d}.bmp",
                    }
                )
    return cells


def test_each_cluster_in_exactly_one_fold():
    cells = fake_cells()
    f = folds.assign_folds(cells)
    by_cluster = collections.defaultdict(set)
    for c, k in zip(cells, f, strict=True):
        by_cluster[c["cluster_id"]].add(k)
    assert len(by_cluster) == sum(n for n, _ in REAL.values())
    assert all(len(s) == 1 for s in by_cluster.values())
    assert set(f) == set(range(5))


def test_grouped_folds_are_stratified():
    cells = fake_cells()
    f = folds.assign_folds(cells)
    for cls, (_, n_cells) in REAL.items():
        per_fold = collections.Counter(
            k for c, k in zip(cells, f, strict=True) if c["cluster_id"].startswith(cls + "/")
        )
        for k in range(5):
            # each fold holds a fifth of every class, within one percentage point
            assert per_fold[k] / n_cells == pytest.approx(0.2, abs=0.01), (cls, per_fold)
    sizes = collections.Counter(f)
    assert max(sizes.values()) - min(sizes.values()) <= 10


def test_deterministic_and_independent_of_order():
    cells = fake_cells()
    f = folds.assign_folds(cells)
    assert folds.assign_folds(cells) == f
    shuffled = list(zip(cells, f, strict=True))
    random.Random(1).shuffle(shuffled)
    g = folds.assign_folds([c for c, _ in shuffled])
    assert g == [k for _, k in shuffled]
    # bytes (as `as_data_source()` returns texts) give the same folds
    as_bytes = [{k: v.encode() for k, v in c.items()} for c in cells]
    assert folds.assign_folds(as_bytes) == f


def test_grouped_algorithm_by_hand():
    """Largest cluster first; each goes to the fold with fewest cells of its class."""
    cells = []
    for k, size in enumerate([5, 3, 3, 2, 1, 1, 1], start=1):
        for j in range(size):
            cells.append(
                {"cluster_id": f"Parabasal/{k:03d}", "file_name": f"im_Parabasal/{k:03d}_{j}.bmp"}
            )
    f = folds.assign_folds(cells)
    per_cluster = {c["cluster_id"]: k for c, k in zip(cells, f, strict=True)}
    assert per_cluster["Parabasal/001"] == 0  # the largest first, into the empty fold 0
    # the next four clusters (3, 3, 2, and one of size 1) fill folds 1-4
    assert sorted(per_cluster[f"Parabasal/{k:03d}"] for k in (2, 3, 4)) == [1, 2, 3]


def test_random_cells_is_stratified_and_leaks():
    cells = fake_cells()
    f = folds.assign_folds(cells, "random_cells")
    for cls, (_, n_cells) in REAL.items():
        per_fold = collections.Counter(
            k for c, k in zip(cells, f, strict=True) if c["cluster_id"].startswith(cls + "/")
        )
        assert max(per_fold.values()) - min(per_fold.values()) <= 1
        assert sum(per_fold.values()) == n_cells
    by_cluster = collections.defaultdict(set)
    for c, k in zip(cells, f, strict=True):
        by_cluster[c["cluster_id"]].add(k)
    assert sum(len(s) > 1 for s in by_cluster.values()) > 300  # clusters straddle folds


def test_bad_config_and_duplicates():
    with pytest.raises(ValueError, match="unknown fold config"):
        folds.assign_folds(fake_cells()[:3], "cells")
    c = fake_cells()[:2]
    with pytest.raises(ValueError, match="duplicate file_name"):
        folds.assign_folds([c[0], c[0]])


def test_names():
    assert [folds.split_name(k) for k in range(5)] == [f"fold{k}" for k in range(5)]
    assert CLASS_NAMES[0] == "Dyskeratotic"
