"""The TFDS builder `cell_folder`: a lab's `ROOT/<class>/<images>` tree, 5 folds, array_record.

One builder config per folder state: `cell_folder/<folds>-<digest>/1.0.0`, where `<folds>` is
`grouped` or `random_cells` and `<digest>` covers every cell (name, group, label, size,
modification time), the taxonomy and the fold config
(`tfds_sipakmed.cell_folder_layout.CellFolderReader.config_name`). Two lab folders, or one
folder before and after a change, never share a build in one data_dir; the same folder built
twice reuses its build. The class names, taxonomy and grouping rule live in the DatasetInfo
metadata (`metadata.json` in the builder dir: `taxonomy`, `grouping`, `warnings`).

Build with `python -m tfds_sipakmed.build --dataset=cell_folder --manual_dir=ROOT
[--group_regex=R | --group_csv=F] [--taxonomy=T.json]`, or `cell_folder_config(...)` and
`tfds.builder("cell_folder", config=..., data_dir=D)`. Read with
`tfds.builder_from_directory(dir).as_data_source()` (no TensorFlow).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from tfds_sipakmed import folds as folds_lib
from tfds_sipakmed.cell_folder_layout import CellFolderReader
from tfds_sipakmed.datasets import DatasetError

_DESCRIPTION = """\
A folder of cell crops, one subfolder per class (ROOT/<class>/<image files>), as a lab exports
them. Examples: every image (BMP, PNG, JPEG, TIFF; 8/16-bit, gray, RGB or RGBA, stored as RGB
uint8), its class (`label`), its path under ROOT (`file_name`) and its leak-free group
(`group_id`: from the grouping rule, else the file itself). Splits fold0..fold4: see
tfds_sipakmed.folds.
"""


@dataclasses.dataclass(eq=False)
class CellFolderConfig(tfds.core.BuilderConfig):
    """One folder with its options; `name` is `<folds>-<digest>` (see the module docstring)."""

    root: str = ""
    folds: str = "grouped"
    group_regex: str = ""
    group_csv: str = ""
    taxonomy: str = ""

    def options(self) -> dict:
        return {
            "group_regex": self.group_regex,
            "group_csv": self.group_csv,
            "taxonomy": self.taxonomy,
        }


def cell_folder_config(root: str, folds: str = "grouped", options=None, log=print):
    """The builder config of `root` with `options` (group_regex, group_csv, taxonomy)."""
    if folds not in folds_lib.CONFIGS:
        raise DatasetError(f"unknown fold config {folds!r}; expected one of {folds_lib.CONFIGS}")
    opts = {k: (options or {}).get(k) or "" for k in ("group_regex", "group_csv", "taxonomy")}
    reader = CellFolderReader(root, {**opts, "log": log})
    name = reader.config_name(reader.list_cells(), folds)
    return CellFolderConfig(
        name=name,
        version="1.0.0",
        description=f"{reader.root}, folds {folds}",
        root=reader.root,
        folds=folds,
        **opts,
    )


class Builder(tfds.core.GeneratorBasedBuilder):
    """A folder of class folders; the config (`cell_folder_config`) says which."""

    name = "cell_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = []  # one per folder state, made by cell_folder_config
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder itself: ROOT/<class name>/<image files>."
    # `tfds_sipakmed.build` asks a builder with dynamic configs for the config of a manual dir.
    config_for = staticmethod(cell_folder_config)

    def __init__(self, *, file_format=None, **kwargs):
        if not isinstance(kwargs.get("config"), CellFolderConfig):
            raise DatasetError(
                "cell_folder needs its folder: build it with python -m tfds_sipakmed.build "
                "--dataset=cell_folder --manual_dir=ROOT"
            )
        self._reader = None  # before super().__init__, which calls _info
        super().__init__(file_format=file_format, **kwargs)
        if file_format is None and not self.is_prepared():
            self.info.set_file_format("array_record", override=True)

    def reader(self, log=print) -> CellFolderReader:
        if self._reader is None:
            cfg = self.builder_config
            self._reader = CellFolderReader(cfg.root, {**cfg.options(), "log": log})
        return self._reader

    def _info(self) -> tfds.core.DatasetInfo:
        reader = self.reader(log=lambda s: None)
        metadata = tfds.core.MetadataDict(
            taxonomy=reader.taxonomy.to_dict(),
            grouping={k: v for k, v in reader.grouping.items()},
            warnings=[],
            root=reader.root,
        )
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(reader.taxonomy.class_names)),
                    "file_name": tfds.features.Text(),
                    "group_id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=metadata,
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        self._reader = None
        reader = self.reader(log=lambda s: print(s, flush=True))
        refs = reader.list_cells()
        if reader.config_name(refs, cfg.folds) != cfg.name:
            raise DatasetError(
                f"{cfg.root} changed since its build config {cfg.name} was made; run the "
                "build again"
            )
        self.info.metadata["warnings"] = list(reader.warnings)
        assignment = folds_lib.assign_folds(
            refs, cfg.folds, class_names=reader.taxonomy.class_names
        )
        per_fold = [[] for _ in range(folds_lib.NUM_FOLDS)]
        for ref, fold in zip(refs, assignment, strict=True):
            per_fold[fold].append(ref)
        print(
            f"Folds ({cfg.folds}, grouping {reader.grouping['rule']}): "
            + ", ".join(f"fold{k}={len(v)}" for k, v in enumerate(per_fold)),
            flush=True,
        )
        return {folds_lib.split_name(k): self._generate_examples(v) for k, v in enumerate(per_fold)}

    def _generate_examples(self, refs):
        reader = self.reader()
        for ref in refs:
            ex = reader.load_cell(ref)
            yield ref.file_name, {k: ex[k] for k in ("image", "label", "file_name", "group_id")}
