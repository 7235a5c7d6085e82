"""The uint8 cache: every example this process keeps, decoded and resized once, in memory.

`load_splits(...)` -> `Cache` of the union of TFDS splits; `load_folds(...)` ->
`{'train', 'validation', 'test'}` Caches of one cross-validation round (the test fold, and the
other folds split by `carve_validation` into training and a validation part carved out by
whole groups (`group_id`: SIPaKMeD's cluster images, a lab's slides), so model selection
never looks at the test fold). Any dataset of the registry (`dataset=`, `options=`; see
`tfds_sipakmed.datasets`); each Cache carries the data's `taxonomy` and grouping rule.

With several JAX processes each keeps only its share of every subset: rows `p::P` of the
subset's (split, `file_name`) order (`p = jax.process_index()`, `P = jax.process_count()`),
and decodes only those. Decoding and resizing run as a grain `MapDataset.map` over the
source, read with worker threads (`grain.ReadOptions(num_threads=...)`; OpenCV and numpy
release the GIL), in one pass for all subsets.

There is no disk cache (the `.npz` cache of earlier versions, off by default, is gone). Measured
with benchmarks/input_pipeline.py on the shared 2-core CPU (1,000 synthetic cells at 224,
median of 3 alternated runs): filling the cache takes 5.5 s through grain (6.4 s with the old
thread pool); the old warm start from `.npz` took 1.0 s. So a process start costs about 4.5 s
more per 1,000 cells (about 11 s for all 4,049 SIPaKMeD cells on 2 cores; on the 16-core GPU
host the whole fill took 5.8 s), once per run or fold, against training that takes minutes on
a GPU and hours on a CPU; in exchange there is no cache key to get wrong and no stale file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence

import grain
import jax
import numpy as np

from sipak_jax import preprocessing
from sipak_jax.input_pipeline.sources import open_source
from tfds_sipakmed.folds import NUM_FOLDS, split_name
from tfds_sipakmed.taxonomy import Taxonomy

_CONTOURS = ("nucleus_contour", "cytoplasm_contour")
_MASKS = ("nucleus_mask", "cytoplasm_mask")


@dataclasses.dataclass(repr=False)
class Cache:
    """Decoded, resized examples of one subset (this process's share), one row per example.

    `image` uint8 [n, S, S, 3] (`preprocessing.resize_crop`, policy `pad` or `stretch`);
    `label`, `index` int32 [n] (`index`: the row in the whole subset over all processes);
    `group_id`, `file_name`, `split` str [n]; `annotation_valid` bool [n] (False where the
    dataset has no annotation); `crop_shape` int32 [n, 2] (original (h, w)); `mean_colour`
    float32 [n, 3] (RGB mean of the original crop); `border_colour` uint8 [n, 3] (the pad
    colour); `nucleus_contour` / `cytoplasm_contour`: lists of float32 [K, 2] (x, y in crop
    pixels, [0, 2] where the dataset has none; `contour_in_frame` maps them into the resized
    frame). `nucleus_mask` / `cytoplasm_mask`: lists of crop-level bool [h, w] masks (None for
    an example without one), or None when the dataset has no masks (only Herlev has them).
    `taxonomy`, `grouping`, `warnings`: what the source says the data means
    (`sipak_jax.input_pipeline.sources`).
    """

    image: np.ndarray
    label: np.ndarray
    index: np.ndarray
    group_id: np.ndarray
    file_name: np.ndarray
    split: np.ndarray
    annotation_valid: np.ndarray
    crop_shape: np.ndarray
    mean_colour: np.ndarray
    border_colour: np.ndarray
    nucleus_contour: list
    cytoplasm_contour: list
    num_examples: int  # size of the whole subset, all processes together
    image_size: int
    resize: str
    process_index: int = 0
    process_count: int = 1
    nucleus_mask: list | None = None
    cytoplasm_mask: list | None = None
    taxonomy: Taxonomy | None = None
    grouping: dict | None = None
    warnings: tuple = ()

    def __len__(self) -> int:
        return len(self.label)

    def __repr__(self) -> str:  # short: grain names its transforms by their repr
        return (
            f"Cache({len(self)} of {self.num_examples} examples, {self.image_size}px "
            f"{self.resize}, process {self.process_index}/{self.process_count})"
        )

    def contour_in_frame(self, i: int, which: str = "nucleus") -> np.ndarray:
        """Example `i`'s 'nucleus' or 'cytoplasm' contour in the resized image's pixels."""
        if which not in ("nucleus", "cytoplasm"):
            raise ValueError(f"which must be 'nucleus' or 'cytoplasm', got {which!r}.")
        pts = getattr(self, f"{which}_contour")[i]
        return preprocessing.crop_to_frame(pts, self.crop_shape[i], self.image_size, self.resize)


# ---------------------------------------------------------------------------------------------
# Filling: decode + resize once, with grain worker threads.


def _prepare(source, row: int, *, image_size: int, resize: str) -> dict:
    """The cache row of `source[row]`: the resized image and what the model must not see."""
    ex = source[row]
    crop = ex["image"]
    ex.update(
        image=preprocessing.resize_crop(crop, image_size, resize),
        crop_shape=crop.shape[:2],
        mean_colour=crop.reshape(-1, 3).mean(0),
        border_colour=preprocessing.border_colour(crop),
    )
    return ex


def _empty_columns(n: int, image_size: int) -> dict:
    cols = {
        "image": np.zeros((n, image_size, image_size, 3), np.uint8),
        "crop_shape": np.zeros((n, 2), np.int32),
        "mean_colour": np.zeros((n, 3), np.float32),
        "border_colour": np.zeros((n, 3), np.uint8),
        "annotation_valid": np.zeros(n, bool),
        "label": np.zeros(n, np.int32),
    }
    cols.update({k: [None] * n for k in (*_CONTOURS, *_MASKS, "group_id", "file_name")})
    return cols


# Rows decoded for one fold of a study, reused by the next (`reuse_decoded`).
_DECODED: dict = {"on": False, "key": None, "rows": {}}


@contextlib.contextmanager
def reuse_decoded():
    """Inside the block each cell is decoded and resized once: the folds of a cross-validation
    study read the same cells, and a later fold takes the rows an earlier one prepared (same
    source, image size and resize policy; the memory is freed when the block ends). Saves
    about 5.8 s per fold for 4,050 cells at 224 on a 16-core host."""
    _DECODED.update(on=True, key=None, rows={})
    try:
        yield
    finally:
        _DECODED.update(on=False, key=None, rows={})


def _decoded_rows(source, image_size: int, resize: str) -> dict:
    """{file_name: prepared example} shared inside `reuse_decoded`, else a fresh dict."""
    if not _DECODED["on"]:
        return {}
    where = getattr(source, "builder_dir", None) or getattr(source, "manual_dir", None)
    key = (type(source).__name__, where, int(image_size), resize)
    if _DECODED["key"] != key:
        _DECODED.update(key=key, rows={})
    return _DECODED["rows"]


def _prepared(source, rows: Sequence[int], image_size: int, resize: str, num_threads):
    """The prepared examples of `source[rows]`, in order: those not decoded yet by a grain
    map over worker threads."""
    done = _decoded_rows(source, image_size, resize)
    todo = [r for r in rows if source.records[r].file_name not in done]
    threads = int(num_threads or min(8, os.cpu_count() or 1))
    prepare = functools.partial(_prepare, source, image_size=int(image_size), resize=resize)
    examples = grain.MapDataset.source(todo).map(prepare)
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)
    fresh = iter(examples.to_iter_dataset(read))
    for r in rows:
        name = source.records[r].file_name
        ex = done[name] if name in done else next(fresh)
        if _DECODED["on"]:
            done[name] = ex
        yield ex


def _fill(source, rows: Sequence[int], image_size: int, resize: str, num_threads) -> dict:
    """Columns of `source[rows]`, decoded and resized (`_prepared`)."""
    cols = _empty_columns(len(rows), image_size)
    for i, ex in enumerate(_prepared(source, rows, image_size, resize, num_threads)):
        for k in ("image", "crop_shape", "mean_colour", "border_colour", "label"):
            cols[k][i] = ex[k]
        cols["annotation_valid"][i] = bool(ex.get("annotation_valid", False))
        cols["group_id"][i], cols["file_name"][i] = ex["group_id"], ex["file_name"]
        for k in _CONTOURS:
            cols[k][i] = np.asarray(ex.get(k, ()), np.float32).reshape(-1, 2)
        for k in _MASKS:
            cols[k][i] = None if ex.get(k) is None else np.asarray(ex[k], bool)
    return cols


def _process(process_index, process_count) -> tuple[int, int]:
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} must lie in [0, {pc}).")
    return pi, pc


def _materialise(source, subsets: dict, image_size, resize, pi, pc, num_threads) -> dict:
    """{name: Cache} of this process's share of each subset (rows of `source`), one pass."""
    shares = {name: list(rows)[pi::pc] for name, rows in subsets.items()}
    cols = _fill(source, [r for s in shares.values() for r in s], image_size, resize, num_threads)
    out, start = {}, 0
    for name, share in shares.items():
        stop = start + len(share)
        part = {k: v[start:stop] for k, v in cols.items()}  # views of the arrays: no copy
        for k in ("group_id", "file_name"):
            part[k] = np.asarray(part[k], dtype=str).reshape(-1)
        for k in _MASKS:  # None for a dataset without masks
            part[k] = part[k] if any(m is not None for m in cols[k]) else None
        out[name] = Cache(
            **part,
            split=np.asarray([source.records[r].split for r in share], dtype=str).reshape(-1),
            index=np.arange(pi, len(subsets[name]), pc, dtype=np.int32),
            num_examples=len(subsets[name]),
            image_size=int(image_size),
            resize=resize,
            process_index=pi,
            process_count=pc,
            taxonomy=source.taxonomy,
            grouping=source.grouping,
            warnings=tuple(source.warnings),
        )
        start = stop
    return out


# ---------------------------------------------------------------------------------------------
# Loading.


def load_splits(
    data_dir: str | None,
    config_name: str = "grouped",
    splits: Sequence[str] = ("fold0",),
    image_size: int = 224,
    resize: str = preprocessing.DEFAULT_RESIZE,
    *,
    manual_dir: str | None = None,
    dataset: str = "sipakmed",
    options: Mapping | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    archive_checksums=None,
    log: Callable[[str], None] = print,
) -> Cache:
    """The union of TFDS `splits` ('fold0' ... 'fold4') as this process's `Cache`.

    Reads the built dataset under `data_dir` (`data_dir/<dataset>/<config_name>/<version>`, or
    a versioned builder dir itself), or, with `data_dir=None, manual_dir=M`, the raw tree
    directly through the dataset's reader with `options` (same folds, same arrays, no TFDS;
    SIPaKMeD's `.7z` archives there are checked against `archive_checksums`, see
    `tfds_sipakmed.layout.resolve_checksums`).
    """
    preprocessing._check_policy(resize)
    pi, pc = _process(process_index, process_count)
    source = open_source(
        data_dir,
        manual_dir,
        config_name,
        splits,
        dataset=dataset,
        options=options,
        log=log,
        archive_checksums=archive_checksums,
    )
    subsets = {"all": range(len(source))}
    return _materialise(source, subsets, image_size, resize, pi, pc, num_threads)["all"]


def carve_validation(
    group_id: Sequence[str],
    label: Sequence[int],
    fraction: float,
    seed: int = 0,
) -> np.ndarray:
    """bool [n]: True for the examples set aside for validation.

    Grouped and stratified: whole groups (SIPaKMeD's cluster images, a lab's slides) go to
    validation (cells of one group share slide, stain and background, so splitting a group
    would leak), chosen per class so that each class gives about `fraction` of its cells. Per
    class, groups are visited in the order of `sha256(f"{seed}/{group_id}")`; a group is taken
    when it brings the class's validation count closer to `fraction * class count`. Each class
    with at least two groups gives at least one and keeps at least one for training. A group
    holding several classes is decided by the first class (lowest label) it has; its cells
    of other classes follow it. Deterministic: a pure function of the (group_id, label) pairs,
    `fraction` and `seed`, whatever their order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {fraction}.")
    group_id = [str(c) for c in group_id]
    label = np.asarray(label)
    mask = np.zeros(len(group_id), bool)
    if fraction == 0:
        return mask
    rows_of: dict[str, list[int]] = {}
    for r, g in enumerate(group_id):
        rows_of.setdefault(g, []).append(r)
    decided: set[str] = set()
    for c in np.unique(label):
        groups: dict[str, list[int]] = {}
        for r in np.nonzero(label == c)[0]:
            if group_id[r] not in decided:
                groups.setdefault(group_id[r], []).append(int(r))
        for gid in _carve_class(groups, fraction, seed):
            mask[rows_of[gid]] = True
        decided.update(groups)
    return mask


def _carve_class(clusters: dict[str, list[int]], fraction: float, seed: int) -> list[str]:
    """The cluster ids of one class that go to validation (see `carve_validation`)."""
    order = sorted(clusters, key=lambda cid: hashlib.sha256(f"{seed}/{cid}".encode()).hexdigest())
    target = fraction * sum(len(v) for v in clusters.values())
    taken, count = [], 0
    for cid in order:
        size = len(clusters[cid])
        if abs(count + size - target) < abs(count - target):
            taken.append(cid)
            count += size
    if not taken and len(order) >= 2:
        taken = [min(order, key=lambda cid: len(clusters[cid]))]
    if len(taken) == len(order) and len(order) >= 2:
        taken = taken[:-1]
    return taken


def load_folds(
    data_dir: str | None,
    config_name: str = "grouped",
    test_fold: int = 0,
    image_size: int = 224,
    resize: str = preprocessing.DEFAULT_RESIZE,
    *,
    validation_fraction: float,
    validation_seed: int = 0,
    manual_dir: str | None = None,
    dataset: str = "sipakmed",
    options: Mapping | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    archive_checksums=None,
    log: Callable[[str], None] = print,
) -> dict[str, Cache]:
    """{'train', 'validation', 'test'} Caches for one cross-validation round.

    'test' is fold `test_fold`; the other folds are split by `carve_validation` into
    'validation' (whole groups, about `validation_fraction` of each class) and
    'train'. With `validation_fraction=0` the 'validation' cache is empty.
    """
    preprocessing._check_policy(resize)
    if not 0 <= int(test_fold) < NUM_FOLDS:
        raise ValueError(f"test_fold must lie in [0, {NUM_FOLDS}), got {test_fold}.")
    pi, pc = _process(process_index, process_count)
    test = split_name(int(test_fold))
    rest = tuple(split_name(f) for f in range(NUM_FOLDS) if f != int(test_fold))
    source = open_source(
        data_dir,
        manual_dir,
        config_name,
        (*rest, test),
        dataset=dataset,
        options=options,
        log=log,
        archive_checksums=archive_checksums,
    )
    records = source.records
    rest_rows = [i for i, r in enumerate(records) if r.split != test]
    val = carve_validation(
        [records[i].group_id for i in rest_rows],
        [records[i].label for i in rest_rows],
        validation_fraction,
        validation_seed,
    )
    subsets = {
        "train": [i for i, v in zip(rest_rows, val, strict=True) if not v],
        "validation": [i for i, v in zip(rest_rows, val, strict=True) if v],
        "test": [i for i, r in enumerate(records) if r.split == test],
    }
    return _materialise(source, subsets, image_size, resize, pi, pc, num_threads)
