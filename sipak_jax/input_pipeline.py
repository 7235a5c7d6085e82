"""From the SIPaKMeD TFDS splits to global, sharded `jax.Array` batches, without TensorFlow.

TensorFlow builds the TFDS dataset (`tfds_sipakmed.build`); training, evaluation and the
benchmarks only read it. The dataset is stored as array_record and read through
`tfds.builder_from_directory(...).as_data_source()` (random access, numpy examples): importing
`tensorflow_datasets` and reading this way never imports TensorFlow, even where it is
installed (a test checks `sys.modules`). Images are read undecoded (`tfds.decode.SkipDecoding`)
and decoded here with OpenCV, only for the examples this process keeps. Machines without TFDS
(e.g. the GPU benchmark machine) read the manual dir itself (`manual_dir=`) through the TF-free
`tfds_sipakmed.layout` and `tfds_sipakmed.folds`, and get identical arrays.

Loading
-------
`load_splits(data_dir, config_name, splits, image_size, resize, cache_dir=None, *,
manual_dir=None)` -> `Cache`: the union of the named TFDS splits (`'fold0'` ... `'fold4'`).
`load_folds(data_dir, config_name, test_fold, ..., validation_fraction=0.15)` ->
`{'train', 'validation', 'test'}`: the test fold, and the other four folds split into
training and a validation part carved out by cluster image (`carve_validation`: grouped,
stratified by class, deterministic), so model selection never looks at the test fold.

Examples are ordered by (split, `file_name`), the same on every machine and for both readers.
With several JAX processes, each keeps only its share of every subset (rows `p::P` of that
order, `p = jax.process_index()`, `P = jax.process_count()`), and decodes only those images.

A `Cache` holds, per example of this process's share: `image` uint8 [n, S, S, 3] (decoded and
resized once, `preprocessing.resize_crop` with policy `pad` or `stretch`), `label`,
`label_3class`, `label_2class`, `cell_index` (int32), `cluster_id`, `file_name`, `split`
(str), `annotation_valid` (bool), `crop_shape` (int32 [n, 2], original (h, w)), `mean_colour`
(float32 [n, 3], RGB mean of the original crop), `border_colour` (uint8 [n, 3], the pad
colour), `nucleus_contour` / `cytoplasm_contour` (lists of float32 [K, 2], x, y in crop
pixels; `Cache.contour_in_frame(i, 'nucleus')` maps them into the resized frame) and `index`
(int32, the row in the whole subset over all processes). With `cache_dir`, the cache is also
written to `cache_dir/<key>.npz` (no pickle) and reused; the key hashes the dataset identity
(TFDS name/config/version and files, or the manual dir's crops with their sizes and times),
the examples, `image_size`, `resize` and the cache format, so a changed input never reuses a
stale file.

Batches
-------
`train_batches(cache, global_batch_size, mesh, seed, start_step=0)`: an endless iterator of
dicts of global `jax.Array`s sharded `P('data')` over the 1-D mesh (`make_mesh()`):
`image` uint8 [B, S, S, 3], `label` int32 [B], `mask` bool [B] (all True), `index` int32 [B].
Epoch `e`'s order is a permutation drawn from `(seed, e, process_index)`; step `s` is batch
`s % steps_per_epoch` of epoch `s // steps_per_epoch`; the remainder is dropped. The batch of a
step therefore depends only on (cache, batch size, seed, step): a run resumed at step k sees
exactly the batches an uninterrupted one would. `eval_batches(cache, global_batch_size, mesh)`
walks the examples once in order; the last batch is padded (zero images, `mask` False,
`index` -1). Both prefetch into device memory on a background thread (queue of 2) and move
uint8, not float. Augmentation (`sipak_jax.augment`) and normalisation
(`preprocessing.normalize`) happen inside the jitted step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import queue
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence

import cv2
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sipak_jax import preprocessing
from sipak_jax.classes import CLASS_NAMES

CACHE_FORMAT = 1
DATASET_NAME = "sipakmed"
DEFAULT_VALIDATION_FRACTION = 0.15
NUM_FOLDS = 5

_INT_FIELDS = ("label", "label_3class", "label_2class", "cell_index", "index")
_STR_FIELDS = ("cluster_id", "file_name", "split")
_CONTOURS = ("nucleus_contour", "cytoplasm_contour")


# ---------------------------------------------------------------------------------------------
# The cache.


@dataclasses.dataclass
class Cache:
    """Decoded, resized examples of one subset (this process's share); see the module doc."""

    image: np.ndarray
    label: np.ndarray
    label_3class: np.ndarray
    label_2class: np.ndarray
    cell_index: np.ndarray
    index: np.ndarray
    cluster_id: np.ndarray
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

    def __len__(self) -> int:
        return len(self.label)

    def contour_in_frame(self, i: int, which: str = "nucleus") -> np.ndarray:
        """Example `i`'s 'nucleus' or 'cytoplasm' contour in the resized image's pixels."""
        if which not in ("nucleus", "cytoplasm"):
            raise ValueError(f"which must be 'nucleus' or 'cytoplasm', got {which!r}.")
        pts = getattr(self, f"{which}_contour")[i]
        return preprocessing.crop_to_frame(pts, self.crop_shape[i], self.image_size, self.resize)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.label, minlength=len(CLASS_NAMES))
        return {name: int(c) for name, c in zip(CLASS_NAMES, counts, strict=True)}


def _empty_arrays(n, size):
    return {
        "image": np.zeros((n, size, size, 3), np.uint8),
        "crop_shape": np.zeros((n, 2), np.int32),
        "mean_colour": np.zeros((n, 3), np.float32),
        "border_colour": np.zeros((n, 3), np.uint8),
    }


def _save_npz(path: str, cache: Cache) -> None:
    arrays = {
        f.name: getattr(cache, f.name)
        for f in dataclasses.fields(cache)
        if isinstance(getattr(cache, f.name), np.ndarray)
    }
    for name in _CONTOURS:
        pts = getattr(cache, name)
        arrays[name + "_points"] = (
            np.concatenate(pts, 0) if pts else np.zeros((0, 2), np.float32)
        ).astype(np.float32)
        arrays[name + "_offsets"] = np.cumsum([0] + [len(p) for p in pts]).astype(np.int64)
    meta = {k: getattr(cache, k) for k in ("num_examples", "image_size", "resize")}
    meta.update(process_index=cache.process_index, process_count=cache.process_count)
    arrays["meta"] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # atomic: readers never see half a file
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_npz(path: str) -> Cache:
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data.pop("meta")))
    for name in _CONTOURS:
        pts, off = data.pop(name + "_points"), data.pop(name + "_offsets")
        data[name] = [pts[off[i] : off[i + 1]] for i in range(len(off) - 1)]
    return Cache(**data, **meta)


# ---------------------------------------------------------------------------------------------
# Sources: the TFDS array_record dataset, or the manual dir itself.


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class _TfdsSource:
    """The built TFDS dataset, read through `as_data_source()` (no TensorFlow)."""

    def __init__(self, data_dir: str, config_name: str):
        import tensorflow_datasets as tfds  # noqa: PLC0415 - optional; never imports TF here

        self._tfds = tfds
        builder_dir = find_builder_dir(data_dir, config_name)
        self.builder = tfds.builder_from_directory(builder_dir)
        self.builder_dir = builder_dir
        self.splits = tuple(self.builder.info.splits)
        self._sources = {}

    def _source(self, split):
        if split not in self._sources:
            self._sources[split] = self.builder.as_data_source(
                split=split, decoders={"image": self._tfds.decode.SkipDecoding()}
            )
        return self._sources[split]

    def fingerprint(self) -> dict:
        info = os.path.join(self.builder_dir, "dataset_info.json")
        st = os.stat(info)
        return {
            "reader": "tfds",
            "name": self.builder.info.full_name,
            "dir": os.path.abspath(self.builder_dir),
            "info_mtime_ns": st.st_mtime_ns,
            "info_size": st.st_size,
        }

    def keys(self, split: str) -> list[dict]:
        """Light records of every example of `split`: file_name, cluster_id, label, position."""
        src = self._source(split)
        out = []
        for start in range(0, len(src), 256):
            rows = src.__getitems__(list(range(start, min(start + 256, len(src)))))
            for j, ex in enumerate(rows):
                out.append(
                    {
                        "file_name": _text(ex["file_name"]),
                        "cluster_id": _text(ex["cluster_id"]),
                        "label": int(ex["label"]),
                        "split": split,
                        "_pos": start + j,
                    }
                )
        return out

    def load(self, key: dict) -> dict:
        ex = dict(self._source(key["split"])[key["_pos"]])
        data = np.frombuffer(ex["image"], np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(
                f"{self.builder_dir}: cannot decode the image of {key['file_name']} "
                f"(split {key['split']}); rebuild the dataset with python -m tfds_sipakmed.build."
            )
        ex["image"] = preprocessing.to_rgb_uint8(image, "BGR", name=key["file_name"])
        return ex


class _ManualSource:
    """The manual dir read directly (tfds_sipakmed.layout + folds): no TFDS, no TensorFlow."""

    def __init__(
        self, manual_dir: str, config_name: str, log: Callable[[str], None], archive_checksums=None
    ):
        from tfds_sipakmed import folds, layout  # noqa: PLC0415 - TF-free helpers

        self._layout = layout
        self.manual_dir = os.fspath(manual_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix="sipakmed_extract_")
        self.refs = layout.list_cells(
            self.manual_dir, self._tmp.name, archive_checksums=archive_checksums, log=log
        )
        fold = folds.assign_folds(self.refs, config_name)
        self.config_name = config_name
        self.splits = tuple(folds.split_name(f) for f in range(NUM_FOLDS))
        self._by_split = {s: [] for s in self.splits}
        for ref, f in zip(self.refs, fold, strict=True):
            self._by_split[folds.split_name(f)].append(ref)

    def fingerprint(self) -> dict:
        return {
            "reader": "manual",
            "dir": os.path.abspath(self.manual_dir),
            "config": self.config_name,
        }

    def file_stamp(self, key) -> list:
        st = os.stat(key["_ref"].bmp_path)
        return [st.st_size, st.st_mtime_ns]

    def keys(self, split: str) -> list[dict]:
        return [
            {
                "file_name": r.file_name,
                "cluster_id": r.cluster_id,
                "label": r.label,
                "split": split,
                "_ref": r,
            }
            for r in self._by_split[split]
        ]

    def load(self, key: dict) -> dict:
        return self._layout.load_cell(key["_ref"])


def find_builder_dir(data_dir: str, config_name: str) -> str:
    """`data_dir/sipakmed/<config>/<newest version>` (or `data_dir` itself when it is one)."""
    data_dir = os.fspath(data_dir)
    if os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        return data_dir
    config_dir = os.path.join(data_dir, DATASET_NAME, config_name)
    versions = []
    if os.path.isdir(config_dir):
        for v in os.listdir(config_dir):
            if re.fullmatch(r"\d+\.\d+\.\d+", v) and os.path.isfile(
                os.path.join(config_dir, v, "dataset_info.json")
            ):
                versions.append(tuple(int(x) for x in v.split(".")))
    if not versions:
        raise FileNotFoundError(
            f"No built sipakmed/{config_name} dataset in {data_dir} (looked for "
            f"{config_dir}/<version>/dataset_info.json). Build it first: python -m "
            f"tfds_sipakmed.build --manual_dir=M --data_dir={data_dir} --config={config_name}; "
            "or read the manual dir directly with manual_dir=M."
        )
    return os.path.join(config_dir, ".".join(map(str, max(versions))))


def _open_source(data_dir, manual_dir, config_name, log, archive_checksums=None):
    if (data_dir is None) == (manual_dir is None):
        raise ValueError("Pass exactly one of data_dir (a built TFDS dataset) and manual_dir.")
    if manual_dir is not None:
        return _ManualSource(manual_dir, config_name, log, archive_checksums)
    return _TfdsSource(data_dir, config_name)


# ---------------------------------------------------------------------------------------------
# Loading.


def _process(process_index, process_count):
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} must lie in [0, {pc}).")
    return pi, pc


def _decode_resize(source, key, image_size, resize):
    ex = source.load(key)
    if _text(ex["file_name"]) != key["file_name"]:
        raise RuntimeError(f"Read {_text(ex['file_name'])} where {key['file_name']} was expected.")
    crop = ex["image"]
    small = preprocessing.resize_crop(crop, image_size, resize)
    return ex, small, crop.shape[:2], crop.reshape(-1, 3).mean(0), preprocessing.border_colour(crop)


def _build_cache(source, keys, subset_size, image_size, resize, pi, pc, log, num_threads):
    n = len(keys)
    arrays = _empty_arrays(n, image_size)
    fields = {k: np.zeros(n, np.int32) for k in _INT_FIELDS}
    strs = {k: [""] * n for k in _STR_FIELDS}
    valid = np.zeros(n, bool)
    contours = {k: [None] * n for k in _CONTOURS}
    threads = num_threads or min(8, os.cpu_count() or 1)

    def work(i):
        ex, small, shape, mean, border = _decode_resize(source, keys[i], image_size, resize)
        arrays["image"][i] = small
        arrays["crop_shape"][i] = shape
        arrays["mean_colour"][i] = mean
        arrays["border_colour"][i] = border
        for k in ("label", "label_3class", "label_2class", "cell_index"):
            fields[k][i] = int(ex[k])
        fields["index"][i] = keys[i]["_index"]
        strs["cluster_id"][i] = _text(ex["cluster_id"])
        strs["file_name"][i] = keys[i]["file_name"]
        strs["split"][i] = keys[i]["split"]
        valid[i] = bool(ex["annotation_valid"])
        for k in _CONTOURS:
            contours[k][i] = np.asarray(ex[k], np.float32).reshape(-1, 2)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(work, range(n)):  # OpenCV releases the GIL
            pass
    return Cache(
        **arrays,
        **fields,
        **{k: np.asarray(v, dtype=str) for k, v in strs.items()},
        annotation_valid=valid,
        **contours,
        num_examples=subset_size,
        image_size=int(image_size),
        resize=resize,
        process_index=pi,
        process_count=pc,
    )


def _cache_key(source, keys, image_size, resize, pi, pc) -> str:
    h = hashlib.sha256()
    ident = {
        "format": CACHE_FORMAT,
        "source": source.fingerprint(),
        "image_size": int(image_size),
        "resize": resize,
        "process": [pi, pc],
    }
    h.update(json.dumps(ident, sort_keys=True).encode())
    for k in keys:
        h.update(f"{k['split']}\0{k['file_name']}\0{k['_index']}\0".encode())
        if isinstance(source, _ManualSource):
            h.update(json.dumps(source.file_stamp(k)).encode())
    return h.hexdigest()[:24]


def _materialise(source, keys, subset_size, image_size, resize, cache_dir, pi, pc, log, threads):
    """This process's share of `keys` (already in subset order, with `_index`) as a Cache."""
    share = keys[pi::pc]
    path = None
    if cache_dir is not None:
        key = _cache_key(source, share, image_size, resize, pi, pc)
        path = os.path.join(os.fspath(cache_dir), f"sipakmed_{image_size}_{resize}_{key}.npz")
        if os.path.isfile(path):
            try:
                cache = _load_npz(path)
                if list(cache.file_name) == [k["file_name"] for k in share]:
                    return cache
                log(f"warning: {path} does not match the dataset; rebuilding it.")
            except (OSError, ValueError, KeyError) as e:
                log(f"warning: cannot read the cache {path} ({e}); rebuilding it.")
    cache = _build_cache(source, share, subset_size, image_size, resize, pi, pc, log, threads)
    if path is not None:
        _save_npz(path, cache)
    return cache


def _collect_keys(source, splits):
    unknown = [s for s in splits if s not in source.splits]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown}; the dataset has {list(source.splits)}.")
    keys = []
    for split in splits:
        keys.extend(sorted(source.keys(split), key=lambda k: k["file_name"]))
    return keys


def _index(keys):
    out = []
    for i, k in enumerate(keys):
        k = dict(k)
        k["_index"] = i
        out.append(k)
    return out


def load_splits(
    data_dir: str | None,
    config_name: str = "grouped",
    splits: Sequence[str] = ("fold0",),
    image_size: int = 224,
    resize: str = preprocessing.DEFAULT_RESIZE,
    cache_dir: str | None = None,
    *,
    manual_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    archive_checksums=None,
    log: Callable[[str], None] = print,
) -> Cache:
    """The union of TFDS `splits` as this process's `Cache` (see the module docstring).

    Reads the built dataset under `data_dir` (`data_dir/sipakmed/<config_name>/<version>`, or a
    versioned builder dir itself), or, with `data_dir=None, manual_dir=M`, the manual dir
    directly (same folds, same arrays, no TFDS; `.7z` archives there are checked against
    `archive_checksums`, see `tfds_sipakmed.layout.resolve_checksums`).
    """
    preprocessing._check_policy(resize)
    if isinstance(splits, str):
        splits = (splits,)
    pi, pc = _process(process_index, process_count)
    source = _open_source(data_dir, manual_dir, config_name, log, archive_checksums)
    keys = _index(_collect_keys(source, tuple(splits)))
    return _materialise(
        source, keys, len(keys), image_size, resize, cache_dir, pi, pc, log, num_threads
    )


def carve_validation(
    cluster_id: Sequence[str],
    label: Sequence[int],
    fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
) -> np.ndarray:
    """bool [n]: True for the examples set aside for validation.

    Grouped and stratified: whole cluster images go to validation (cells of one cluster share
    slide, stain and background, so splitting a cluster would leak), chosen per class so that
    each class gives about `fraction` of its cells. Per class, clusters are visited in the
    order of `sha256(f"{seed}/{cluster_id}")`; a cluster is taken when it brings the class's
    validation count closer to `fraction * class count`. Each class with at least two
    clusters gives at least one and keeps at least one for training. Deterministic: a pure
    function of the (cluster_id, label) pairs, `fraction` and `seed`, whatever their order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {fraction}.")
    cluster_id = [str(c) for c in cluster_id]
    label = np.asarray(label)
    mask = np.zeros(len(cluster_id), bool)
    if fraction == 0:
        return mask
    for c in np.unique(label):
        rows = np.nonzero(label == c)[0]
        clusters: dict[str, list[int]] = {}
        for r in rows:
            clusters.setdefault(cluster_id[r], []).append(int(r))
        order = sorted(
            clusters, key=lambda cid: hashlib.sha256(f"{seed}/{cid}".encode()).hexdigest()
        )
        target = fraction * len(rows)
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
        for cid in taken:
            mask[clusters[cid]] = True
    return mask


def load_folds(
    data_dir: str | None,
    config_name: str = "grouped",
    test_fold: int = 0,
    image_size: int = 224,
    resize: str = preprocessing.DEFAULT_RESIZE,
    cache_dir: str | None = None,
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    validation_seed: int = 0,
    manual_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    archive_checksums=None,
    log: Callable[[str], None] = print,
) -> dict[str, Cache]:
    """{'train', 'validation', 'test'} Caches for one cross-validation round.

    'test' is fold `test_fold`; the four other folds are split by `carve_validation` into
    'validation' (whole cluster images, about `validation_fraction` of each class) and
    'train'. With `validation_fraction=0` the 'validation' cache is empty.
    """
    preprocessing._check_policy(resize)
    if not 0 <= int(test_fold) < NUM_FOLDS:
        raise ValueError(f"test_fold must lie in [0, {NUM_FOLDS}), got {test_fold}.")
    pi, pc = _process(process_index, process_count)
    source = _open_source(data_dir, manual_dir, config_name, log, archive_checksums)
    test_split = f"fold{int(test_fold)}"
    rest = tuple(f"fold{f}" for f in range(NUM_FOLDS) if f != int(test_fold))
    test_keys = _collect_keys(source, (test_split,))
    rest_keys = _collect_keys(source, rest)
    val = carve_validation(
        [k["cluster_id"] for k in rest_keys],
        [k["label"] for k in rest_keys],
        validation_fraction,
        validation_seed,
    )
    subsets = {
        "train": [k for k, v in zip(rest_keys, val, strict=True) if not v],
        "validation": [k for k, v in zip(rest_keys, val, strict=True) if v],
        "test": test_keys,
    }
    out = {}
    for name, keys in subsets.items():
        keys = _index(keys)
        out[name] = _materialise(
            source, keys, len(keys), image_size, resize, cache_dir, pi, pc, log, num_threads
        )
    return out


# ---------------------------------------------------------------------------------------------
# Batches.


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over all (or the given) devices with the axis `data` (Auto axis type)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),),
        ("data",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=devices,
    )


def _local_batch(cache: Cache, global_batch_size: int, mesh) -> int:
    pc = cache.process_count
    if pc != jax.process_count():
        raise ValueError(
            f"The cache was loaded for {pc} process(es) but jax.process_count() is "
            f"{jax.process_count()}; load it in this run."
        )
    if global_batch_size < 1 or global_batch_size % pc:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"number of processes ({pc})."
        )
    if mesh is not None and global_batch_size % mesh.devices.size:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a multiple of the number of "
            f"devices in the mesh ({mesh.devices.size})."
        )
    return global_batch_size // pc


def steps_per_epoch(cache: Cache, global_batch_size: int) -> int:
    """Training steps per epoch (the remainder is dropped), the same on every process."""
    local = global_batch_size // cache.process_count
    return (cache.num_examples // cache.process_count) // max(local, 1)


def epoch_permutation(cache: Cache, seed: int, epoch: int) -> np.ndarray:
    """This process's order of its rows in `epoch`: a permutation from (seed, epoch, process)."""
    ss = np.random.SeedSequence([int(seed), int(epoch), int(cache.process_index)])
    return np.random.Generator(np.random.PCG64(ss)).permutation(len(cache))


def train_rows(cache: Cache, global_batch_size: int, seed: int, step: int) -> np.ndarray:
    """The cache rows of this process's part of training step `step`'s batch."""
    local = global_batch_size // cache.process_count
    spe = steps_per_epoch(cache, global_batch_size)
    if spe == 0:
        raise ValueError(
            f"{cache.num_examples} examples over {cache.process_count} process(es) do not "
            f"fill one batch of {global_batch_size}; use a smaller batch."
        )
    epoch, pos = divmod(int(step), spe)
    return epoch_permutation(cache, seed, epoch)[pos * local : (pos + 1) * local]


def num_eval_steps(cache: Cache, global_batch_size: int) -> int:
    """Evaluation steps to see every example once (the last batch padded), on every process."""
    local = global_batch_size // cache.process_count
    per_process = -(-cache.num_examples // cache.process_count)
    return -(-per_process // max(local, 1))


def _host_batch(cache: Cache, rows: np.ndarray, local: int) -> dict:
    n = len(rows)
    if n == local:
        image, label, index = cache.image[rows], cache.label[rows], cache.index[rows]
        mask = np.ones(local, bool)
    else:  # padded evaluation batch
        image = np.zeros((local, *cache.image.shape[1:]), np.uint8)
        label = np.zeros(local, np.int32)
        index = np.full(local, -1, np.int32)
        mask = np.zeros(local, bool)
        image[:n], label[:n], index[:n], mask[:n] = (
            cache.image[rows],
            cache.label[rows],
            cache.index[rows],
            True,
        )
    return {"image": image, "label": label, "mask": mask, "index": index}


def _to_global(batch: dict, mesh) -> dict:
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


_END = object()


def _produce_into(produce, mesh, q: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread's loop. It holds no reference to its BatchIterator, so an
    iterator that is dropped without `close()` is collected and its thread stops."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for host in produce:
            if not put(_to_global(host, mesh)):
                return
        put(_END)
    except BaseException as e:  # handed to the consumer
        put(e)


class BatchIterator:
    """Batches produced on a background thread (queue of `prefetch`), already on device.

    Iterate it, or call `next()`; `close()` (or leaving a `with` block) stops the thread.
    """

    def __init__(self, produce: Iterator[dict], mesh, prefetch: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce_into, args=(produce, mesh, self._queue, self._stop), daemon=True
        )
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._stop.set()
            raise StopIteration
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self._stop.set()


def train_batches(
    cache: Cache,
    global_batch_size: int,
    mesh,
    seed: int,
    start_step: int = 0,
    *,
    num_steps: int | None = None,
    prefetch: int = 2,
) -> BatchIterator:
    """Training batches from global step `start_step` on (endless, or `num_steps` of them)."""
    local = _local_batch(cache, global_batch_size, mesh)
    train_rows(cache, global_batch_size, seed, 0)  # raises now if one batch cannot be filled
    start = int(start_step)
    if start < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")

    def produce():
        step, perm, perm_epoch = start, None, None
        spe = steps_per_epoch(cache, global_batch_size)
        while num_steps is None or step < start + num_steps:
            epoch, pos = divmod(step, spe)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(cache, seed, epoch), epoch
            yield _host_batch(cache, perm[pos * local : (pos + 1) * local], local)
            step += 1

    return BatchIterator(produce(), mesh, prefetch)


def eval_batches(cache: Cache, global_batch_size: int, mesh, *, prefetch: int = 2) -> BatchIterator:
    """Every example once, in cache order; the last batch padded (`mask` False)."""
    local = _local_batch(cache, global_batch_size, mesh)
    steps = num_eval_steps(cache, global_batch_size)

    def produce():
        for s in range(steps):
            rows = np.arange(s * local, min((s + 1) * local, len(cache)))
            yield _host_batch(cache, rows, local)

    return BatchIterator(produce(), mesh, prefetch)
