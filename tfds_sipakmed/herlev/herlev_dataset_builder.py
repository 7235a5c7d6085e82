"""The TFDS builder `herlev`: the Herlev Pap smear benchmark (smear2005), 5 folds, array_record.

Build with `python -m tfds_sipakmed.build --dataset=herlev --manual_dir=M [--data_dir=D]
[--config=grouped|random_cells] [--group_regex=R]` (TensorFlow is needed to build, not to
read); read with `tfds.builder_from_directory(dir).as_data_source()`. The taxonomy and the
grouping rule are in the DatasetInfo metadata (`metadata.json`: `taxonomy`, `grouping`).
Configs: `grouped` (default) and `random_cells`; with `--group_regex` the config is
`<folds>-regex-<sha8 of the expression>` (`Builder.config_for`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from tfds_sipakmed import builder_util, herlev_layout
from tfds_sipakmed.taxonomy import HERLEV

_DESCRIPTION = """\
Herlev Pap smear benchmark (Jantzen et al. 2005, the "new" database smear2005): 917 single
cervical cells, BMP images of varying size, 7 classes (label order: carcinoma_in_situ,
light_dysplastic, moderate_dysplastic, normal_columnar, normal_intermediate, normal_superficiel,
severe_dysplastic; the 2-class view puts the three normal classes in "normal"). Each cell has
masks of its nucleus and cytoplasm from its -d.bmp segmentation. There is no official split
and no slide id: fold0..fold4 are stratified folds in which each cell is its own group.
"""

_NO_SLIDES = (
    "Herlev gives no slide or source-image ids: each cell is its own group, so cells from one "
    "slide may sit in two folds (cell-level folds)."
)


@dataclasses.dataclass(eq=False)
class HerlevConfig(tfds.core.BuilderConfig):
    """A fold config, optionally with a grouping expression over the file names."""

    folds: str = "grouped"
    group_regex: str = ""


def herlev_config(manual_dir: str = "", folds: str = "grouped", options=None) -> HerlevConfig:
    """The builder config for `folds` and `options['group_regex']` (`manual_dir` unused: the
    name depends on the options only, so the reading side can compute it too)."""
    regex = (options or {}).get("group_regex") or ""
    rule = f"group_regex {regex!r}" if regex else "each cell its own group"
    return HerlevConfig(
        name=herlev_layout.config_name(folds, regex),
        version="1.0.0",
        description=f"{folds} folds; {rule}",
        folds=folds,
        group_regex=regex,
    )


class Builder(tfds.core.GeneratorBasedBuilder):
    """Herlev cells with their masks; manual download (smear2005.zip or its class folders)."""

    name = "herlev"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 7 classes, masks from the -d.bmp images."}
    BUILDER_CONFIGS = [herlev_config(folds="grouped"), herlev_config(folds="random_cells")]
    DEFAULT_BUILDER_CONFIG_NAME = "grouped"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download {herlev_layout.ARCHIVE_NAME} ("New Pap-smear Database (images)") from
{herlev_layout.DOWNLOAD_PAGE} and put the zip, or its extracted class folders (e.g.
smear2005/New database pictures/<class>/), in the manual dir.
"""

    @classmethod
    def config_for(cls, manual_dir: str, folds: str, options=None) -> tfds.core.BuilderConfig:
        """The config of `folds` and the options (a predefined one when it has that name)."""
        config = herlev_config(manual_dir, folds, options)
        return {c.name: c for c in cls.BUILDER_CONFIGS}.get(config.name, config)

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format, **kwargs)
        if file_format is None and not self.is_prepared():
            self.info.set_file_format("array_record", override=True)

    def _info(self) -> tfds.core.DatasetInfo:
        regex = self.builder_config.group_regex
        mask = tfds.features.Tensor(
            shape=(None, None), dtype=np.bool_, encoding=tfds.features.Encoding.ZLIB
        )
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(HERLEV.class_names)),
                    "file_name": tfds.features.Text(),
                    "group_id": tfds.features.Text(),
                    "nucleus_mask": mask,
                    "cytoplasm_mask": mask,
                    "annotation_valid": tfds.features.Scalar(dtype=np.bool_),
                    "annotation_issue": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=herlev_layout.DOWNLOAD_PAGE,
            metadata=tfds.core.MetadataDict(
                taxonomy=HERLEV.to_dict(),
                grouping={
                    "rule": "group_regex" if regex else "file",
                    "value": regex or "<class>/<file name>",
                    "leak_free": False,
                    "warning": "" if regex else _NO_SLIDES,
                },
            ),
        )

    def _reader(self, manual_dir) -> herlev_layout.HerlevReader:
        options = {"group_regex": self.builder_config.group_regex}
        return herlev_layout.HerlevReader(os.fspath(manual_dir), options)

    def _split_generators(self, dl_manager):
        reader = self._reader(dl_manager.manual_dir)
        print(f"Reading Herlev from {reader.manual_dir} ...", flush=True)
        refs = reader.list_cells()
        lines, warnings = herlev_layout.count_report(refs)
        print("Cells per class:", *lines, *warnings, sep="\n", flush=True)
        if not self.builder_config.group_regex:
            print(f"warning: {_NO_SLIDES}", flush=True)
        cfg = self.builder_config
        per_fold = builder_util.split_by_fold(refs, cfg.folds, HERLEV.class_names)
        print(
            f"Folds ({cfg.name}): "
            + ", ".join(f"fold{k}={len(v)}" for k, v in enumerate(per_fold)),
            flush=True,
        )
        return {f"fold{k}": self._generate_examples(reader, v) for k, v in enumerate(per_fold)}

    def _generate_examples(self, reader, refs):
        invalid = 0
        for ref in refs:
            ex = reader.load_cell(ref)
            invalid += not ex["annotation_valid"]
            yield ref.file_name, ex
        if invalid:
            print(f"  {invalid} of {len(refs)} cells without usable masks", flush=True)
