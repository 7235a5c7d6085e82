"""The dataset registry: one TF-free reader per dataset, behind one interface.

`reader(name, manual_dir, options)` gives the `Reader` of dataset `name` (one of `NAMES`) over
a manual dir as the user has it. Every reader lists its cells (`list_cells()`: `CellRef`s
sorted by `file_name`, nothing decoded) and loads one (`load_cell(ref)`: an example in the
common schema below). The TFDS builders, the TF-free training source
(`sipak_jax.input_pipeline.sources.RawTreeSource`) and the folds
(`tfds_sipakmed.folds.assign_folds`) all go through a reader, so they see the same cells.

Common example schema (every reader, every builder, every source):
- `image`: uint8 [H, W, 3] RGB, the original crop;
- `label`: int, an index into `reader.taxonomy.class_names`;
- `file_name`: str, the cell's path relative to the manual dir (unique, `/`-separated);
- `group_id`: str, the leak-free group (cells of one group never sit in two folds):
  SIPaKMeD's cluster image `<Class>/NNN`, Herlev's file (no finer rule is known), CRIC's
  image id, a cell folder's grouping rule (else the file itself);
- optional `nucleus_mask` / `cytoplasm_mask` bool [H, W] and `annotation_valid` bool.
A reader may add dataset-specific keys (SIPaKMeD: its contours and `cell_index`).

`options` (a mapping; a reader ignores what it does not use): `group_regex`, `group_csv`,
`taxonomy` (a JSON file), `crop_size` (CRIC), `archive_checksums` (SIPaKMeD), `log` (a
callable receiving progress lines and warnings; default `print`).

Readers are imported lazily, so this module needs only the standard library and works while a
dataset's module is missing or being written (asking for that dataset then fails clearly).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from tfds_sipakmed.taxonomy import Taxonomy

NAMES = ("sipakmed", "herlev", "cric", "cell_folder")

# name -> (module, class); each class is `Cls(manual_dir, options)` and satisfies `Reader`.
_READERS = {
    "sipakmed": ("tfds_sipakmed.sipakmed_reader", "SipakmedReader"),
    "herlev": ("tfds_sipakmed.herlev_layout", "HerlevReader"),
    "cric": ("tfds_sipakmed.cric_layout", "CricReader"),
    "cell_folder": ("tfds_sipakmed.cell_folder_layout", "CellFolderReader"),
}

# Option keys readers understand (any reader ignores the others; `log` is everyone's).
OPTION_KEYS = ("group_regex", "group_csv", "taxonomy", "crop_size", "archive_checksums", "log")
# The options each dataset reads (training refuses a config option its dataset ignores).
OPTIONS_READ = {
    "sipakmed": ("archive_checksums",),
    "herlev": ("group_regex",),
    "cric": ("crop_size",),
    "cell_folder": ("group_regex", "group_csv", "taxonomy"),
}


class DatasetError(ValueError):
    """Bad or missing dataset input; the message names the file or folder and the fix."""


@dataclasses.dataclass(frozen=True)
class CellRef:
    """One cell, known without decoding it. `extra`: whatever the reader needs to load it
    (paths, a crop box, ...), hashable."""

    file_name: str
    group_id: str
    label: int
    extra: tuple = ()


@runtime_checkable
class Reader(Protocol):
    """A dataset's manual dir, read without TensorFlow."""

    name: str
    taxonomy: Taxonomy

    def list_cells(self) -> list[CellRef]:
        """Every cell, sorted by `file_name`; DatasetError naming the file/folder and the fix."""
        ...

    def load_cell(self, ref: CellRef) -> dict:
        """One example in the common schema (module docstring)."""
        ...


def check_name(name: str) -> str:
    """`name` when it is a known dataset, else DatasetError listing `NAMES`."""
    if name not in _READERS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")
    return name


def reader(name: str, manual_dir, options: Mapping | None = None) -> Reader:
    """The reader of dataset `name` over `manual_dir` (see the module docstring for `options`).

    Raises DatasetError for an unknown name, a dataset whose reader is not installed, or (from
    the reader) a manual dir that does not hold the dataset.
    """
    module_name, class_name = _READERS[check_name(name)]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise DatasetError(
            f"the {name} reader ({module_name}) is not available in this checkout"
        ) from None
    return getattr(module, class_name)(manual_dir, dict(options or {}))


def tfds_config_name(name: str, manual_dir, fold_config: str, options: Mapping | None = None):
    """The TFDS builder config a build of `manual_dir` gets: `fold_config` (`grouped` or
    `random_cells`), or, for a reader with one config per folder (`config_name(refs, folds)`,
    e.g. `cell_folder`), that name. Lists the cells (no image is decoded)."""
    r = reader(name, manual_dir, {**dict(options or {}), "log": lambda s: None})
    if hasattr(r, "config_name"):
        return r.config_name(r.list_cells(), fold_config)
    return fold_config


def log_of(options: Mapping):
    """The `log` callable of `options` (default `print`)."""
    return options.get("log") or print
