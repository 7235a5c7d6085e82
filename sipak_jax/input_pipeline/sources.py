"""The two sources of a dataset's examples, behind one interface: grain's RandomAccessDataSource.

- `TfdsSource(data_dir, config_name, splits, dataset=NAME)`: the built TFDS dataset, stored as
  array_record and read through `builder.as_data_source()` (random access, numpy examples).
  Importing `tensorflow_datasets` and reading this way never imports TensorFlow. Images are
  read undecoded (`tfds.decode.SkipDecoding`) and decoded here with OpenCV, only when asked for.
- `RawTreeSource(manual_dir, config_name, splits, dataset=NAME, options=...)`: the manual dir
  as the user has it (SIPaKMeD's extracted tree or archives, a synthetic tree, a cell folder,
  ...), read directly through the dataset's TF-free reader (`tfds_sipakmed.datasets.reader`),
  with the folds of `tfds_sipakmed.folds`: no TFDS, no TensorFlow (e.g. on accelerator
  machines).

Both hold the examples of `splits` in (split, `file_name`) order, the same on every machine:
`records` (a light `Record` per example, no image decoded), `len(source)`, and `source[i]`, the
example in the common schema of `tfds_sipakmed.datasets` (`image` the decoded original crop,
RGB uint8 [h, w, 3]; `label`; `file_name` and `group_id` as `str`; SIPaKMeD's `cluster_id`
becomes `group_id`) plus the dataset's own keys (SIPaKMeD: contours, `cell_index`, views).
Both give identical examples for the same cells (a test compares them).

Each source also says what the data means: `taxonomy` (from the builder's DatasetInfo
metadata, `metadata.json`, or the reader; a build without one gets `for_dataset(name)`),
`grouping` (the leak-free rule: `{"rule", "value", "leak_free", "warning"}`, or None when the
dataset does not say) and `warnings` (the reader's or the build's, e.g. no grouping rule).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence

import cv2
import numpy as np

from sipak_jax import preprocessing
from tfds_sipakmed import datasets, folds
from tfds_sipakmed import taxonomy as taxonomies

DATASET_NAME = "sipakmed"
SPLITS = tuple(folds.split_name(f) for f in range(folds.NUM_FOLDS))


@dataclasses.dataclass(frozen=True)
class Record:
    """What is known of an example without decoding it."""

    file_name: str
    group_id: str
    label: int
    split: str


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _check_splits(splits: Sequence[str], available: Sequence[str]) -> tuple[str, ...]:
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    unknown = [s for s in splits if s not in available]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown}; the dataset has {list(available)}.")
    return splits


def find_builder_dir(data_dir: str, config_name: str, dataset: str = DATASET_NAME) -> str:
    """`data_dir/<dataset>/<config>/<newest version>` (or `data_dir` itself when it is one)."""
    data_dir = os.fspath(data_dir)
    if os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        return data_dir
    config_dir = os.path.join(data_dir, dataset, config_name)
    versions = []
    if os.path.isdir(config_dir):
        for v in os.listdir(config_dir):
            if re.fullmatch(r"\d+\.\d+\.\d+", v) and os.path.isfile(
                os.path.join(config_dir, v, "dataset_info.json")
            ):
                versions.append(tuple(int(x) for x in v.split(".")))
    if not versions:
        raise FileNotFoundError(
            f"No built {dataset}/{config_name} dataset in {data_dir} (looked for "
            f"{config_dir}/<version>/dataset_info.json). Build it first: python -m "
            f"tfds_sipakmed.build --dataset={dataset} --manual_dir=M --data_dir={data_dir} "
            f"--config={config_name.split('-')[0]}; or read the manual dir directly with "
            "manual_dir=M."
        )
    return os.path.join(config_dir, ".".join(map(str, max(versions))))


def to_common(ex: Mapping) -> dict:
    """An example as a builder or reader gives it -> the common schema (texts as `str`,
    SIPaKMeD's `cluster_id` as `group_id`); other keys are kept."""
    out = dict(ex)
    if "group_id" not in out and "cluster_id" in out:
        out["group_id"] = out.pop("cluster_id")
    for k in ("file_name", "group_id", "annotation_issue"):
        if k in out:
            out[k] = _text(out[k])
    return out


def _metadata_of(builder, name: str) -> tuple:
    """(taxonomy, grouping, warnings) from the builder's DatasetInfo metadata."""
    meta = dict(builder.info.metadata or {})
    if meta.get("taxonomy"):
        taxonomy = taxonomies.Taxonomy.from_dict(meta["taxonomy"])
    else:  # built before the taxonomy travelled with the data
        taxonomy = taxonomies.for_dataset(name)
    return taxonomy, meta.get("grouping"), tuple(meta.get("warnings") or ())


class TfdsSource:
    """The built TFDS dataset's `splits`, read through `as_data_source()` (no TensorFlow)."""

    def __init__(
        self,
        data_dir: str,
        config_name: str = "grouped",
        splits=SPLITS,
        *,
        dataset: str = DATASET_NAME,
    ):
        import tensorflow_datasets as tfds  # noqa: PLC0415 - optional; never imports TF here

        self.builder_dir = find_builder_dir(data_dir, config_name, dataset)
        builder = tfds.builder_from_directory(self.builder_dir)
        self.name = builder.info.name
        self.taxonomy, self.grouping, self.warnings = _metadata_of(builder, self.name)
        self.splits = _check_splits(splits, tuple(builder.info.splits))
        skip = {"image": tfds.decode.SkipDecoding()}
        self._data = {s: builder.as_data_source(split=s, decoders=skip) for s in self.splits}
        self.records: list[Record] = []
        self._position: list[int] = []  # the example's position in its split's data source
        for split in self.splits:
            rows = sorted(self._split_records(split), key=lambda r: r[0].file_name)
            self.records += [r for r, _ in rows]
            self._position += [p for _, p in rows]

    def _split_records(self, split: str) -> list[tuple[Record, int]]:
        src, out = self._data[split], []
        for start in range(0, len(src), 256):
            rows = src.__getitems__(list(range(start, min(start + 256, len(src)))))
            for j, ex in enumerate(rows):
                group = ex["group_id"] if "group_id" in ex else ex["cluster_id"]
                rec = Record(_text(ex["file_name"]), _text(group), int(ex["label"]), split)
                out.append((rec, start + j))
        return out

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        ex = dict(self._data[rec.split][self._position[i]])
        image = cv2.imdecode(np.frombuffer(ex["image"], np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(
                f"{self.builder_dir}: cannot decode the image of {rec.file_name} (split "
                f"{rec.split}); rebuild the dataset with python -m tfds_sipakmed.build."
            )
        ex["image"] = preprocessing.to_rgb_uint8(image, "BGR", name=rec.file_name)
        return _checked(ex, rec)


class RawTreeSource:
    """The manual dir's `splits`, read directly through the dataset's reader: no TFDS."""

    def __init__(
        self,
        manual_dir: str,
        config_name: str = "grouped",
        splits=SPLITS,
        *,
        dataset: str = DATASET_NAME,
        options: Mapping | None = None,
        log: Callable[[str], None] = print,
        archive_checksums=None,
    ):
        self.manual_dir = os.fspath(manual_dir)
        self.splits = _check_splits(splits, SPLITS)
        opts = {**dict(options or {}), "log": log}
        if archive_checksums is not None:
            opts["archive_checksums"] = archive_checksums
        self._reader = datasets.reader(dataset, self.manual_dir, opts)
        self.name = self._reader.name
        self.taxonomy = self._reader.taxonomy
        self.grouping = getattr(self._reader, "grouping", None)
        refs = self._reader.list_cells()
        self.warnings = tuple(getattr(self._reader, "warnings", ()))
        assignment = folds.assign_folds(refs, config_name, class_names=self.taxonomy.class_names)
        by_split = {s: [] for s in SPLITS}  # folds need every cell, whatever `splits` asks
        for ref, f in zip(refs, assignment, strict=True):
            by_split[folds.split_name(f)].append(ref)
        self._refs = [r for s in self.splits for r in by_split[s]]  # list_cells sorts by name
        self.records = [
            Record(r.file_name, r.group_id, r.label, s) for s in self.splits for r in by_split[s]
        ]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return _checked(self._reader.load_cell(self._refs[i]), self.records[i])


def _checked(ex: dict, rec: Record) -> dict:
    ex = to_common(ex)
    if ex["file_name"] != rec.file_name:
        raise RuntimeError(f"Read {ex['file_name']} where {rec.file_name} was expected.")
    return ex


def open_source(
    data_dir: str | None,
    manual_dir: str | None,
    config_name: str = "grouped",
    splits=SPLITS,
    *,
    dataset: str = DATASET_NAME,
    options: Mapping | None = None,
    log: Callable[[str], None] = print,
    archive_checksums=None,
):
    """The TFDS dataset under `data_dir`, or the raw tree in `manual_dir` (exactly one).

    `config_name`: the fold config (`grouped` / `random_cells`) for the raw tree; for a TFDS
    build, its builder config (a cell folder's is `<folds>-<digest>`, see
    `tfds_sipakmed.datasets.tfds_config_name`). The raw tree reads with the reader's
    `options`."""
    if (data_dir is None) == (manual_dir is None):
        raise ValueError("Pass exactly one of data_dir (a built TFDS dataset) and manual_dir.")
    if manual_dir is not None:
        return RawTreeSource(
            manual_dir,
            config_name,
            splits,
            dataset=dataset,
            options=options,
            log=log,
            archive_checksums=archive_checksums,
        )
    return TfdsSource(data_dir, config_name, splits, dataset=dataset)
