"""The TFDS builder `cric`: CRIC Cervix cells cropped around their nuclei, 5 folds, array_record.

Build with `python -m tfds_sipakmed.build --dataset=cric --manual_dir=M [--data_dir=D]
[--config=grouped|random_cells] [--crop_size=N]` (TensorFlow is needed to build, not to read);
read with `tfds.builder_from_directory(dir).as_data_source()`. Configs: `grouped` (default)
and `random_cells` with the default 90 px crop, `<folds>-crop<N>` for another crop size
(`Builder.config_for`, `cric_config`). The taxonomy, the grouping and the crop size are in the
DatasetInfo metadata (`metadata.json`: `taxonomy`, `grouping`, `crop_size`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from tfds_sipakmed import builder_util, cric_layout
from tfds_sipakmed.taxonomy import CRIC

_DESCRIPTION = """\
CRIC Cervix Cell Classification (Rezende et al. 2021): 11,534 cells marked on 400
conventional Pap smear images (1376 x 1020 px) and classified in the Bethesda System (label
order: NILM, ASC-US, LSIL, ASC-H, HSIL, SCC). Each example is a square crop centred on the
marked nucleus (size in the config); crops that reach past the image edge are padded with the
image's border colour (`border_padded`). Folds fold0..fold4 keep all cells of one image
together (group = image id).
"""

_NO_SLIDES = (
    "CRIC gives image ids, not slide ids: no image has cells in two folds, but two images of one "
    "slide may."
)


@dataclasses.dataclass(eq=False)
class CricConfig(tfds.core.BuilderConfig):
    """A fold config and the crop size in pixels."""

    folds: str = "grouped"
    crop_size: int = cric_layout.DEFAULT_CROP_SIZE


def cric_config(manual_dir: str = "", folds: str = "grouped", options=None) -> CricConfig:
    """The builder config for `folds` and `options['crop_size']` (`manual_dir` unused: the
    name depends on the options only, so the reading side can compute it too)."""
    size = cric_layout.crop_size_of(options or {})
    return CricConfig(
        name=cric_layout.config_name(folds, size),
        version="1.0.0",
        description=f"{folds} folds; {size} x {size} px crops centred on the nucleus",
        folds=folds,
        crop_size=size,
    )


class Builder(tfds.core.GeneratorBasedBuilder):
    """CRIC Cervix nucleus-centred crops; manual download (the extracted zip)."""

    name = "cric"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: nucleus-centred crops, grouped by image."}
    BUILDER_CONFIGS = [cric_config(folds="grouped"), cric_config(folds="random_cells")]
    DEFAULT_BUILDER_CONFIG_NAME = "grouped"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download "CRIC Cervix Cell Classification" (the images and the classifications) from
{cric_layout.DOWNLOAD_PAGE} (or figshare, doi:10.6084/m9.figshare.c.4960286) and extract the
zip into the manual dir: classifications.csv (or .json) and the PNG images, in any subfolder.
"""

    @classmethod
    def config_for(cls, manual_dir: str, folds: str, options=None) -> tfds.core.BuilderConfig:
        """The config of `folds` and the options (a predefined one when it has that name)."""
        config = cric_config(manual_dir, folds, options)
        return {c.name: c for c in cls.BUILDER_CONFIGS}.get(config.name, config)

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format, **kwargs)
        if file_format is None and not self.is_prepared():
            self.info.set_file_format("array_record", override=True)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(cfg.crop_size, cfg.crop_size, 3), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=list(CRIC.class_names)),
                    "file_name": tfds.features.Text(),
                    "group_id": tfds.features.Text(),
                    "cell_id": tfds.features.Text(),
                    "nucleus_xy": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "border_padded": tfds.features.Scalar(dtype=np.bool_),
                    "annotation_valid": tfds.features.Scalar(dtype=np.bool_),
                    "annotation_issue": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=cric_layout.DOWNLOAD_PAGE,
            metadata=tfds.core.MetadataDict(
                taxonomy=CRIC.to_dict(),
                grouping={
                    "rule": "image id",
                    "value": "image_id",
                    "leak_free": cfg.folds == "grouped",
                    "warning": _NO_SLIDES,
                },
                crop_size=cfg.crop_size,
            ),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        reader = cric_layout.CricReader(
            os.fspath(dl_manager.manual_dir),
            {"crop_size": cfg.crop_size, "log": lambda s: print(s, flush=True)},
        )
        print(f"Reading CRIC from {reader.manual_dir} ...", flush=True)
        refs = reader.list_cells()
        lines, warnings = cric_layout.count_report(refs)
        print("Cells per class:", *lines, *warnings, sep="\n", flush=True)
        per_fold = builder_util.split_by_fold(refs, cfg.folds, CRIC.class_names)
        print(
            f"Folds ({cfg.name}): "
            + ", ".join(f"fold{k}={len(v)}" for k, v in enumerate(per_fold)),
            flush=True,
        )
        return {
            f"fold{k}": self._generate_examples(reader, f"fold{k}", v)
            for k, v in enumerate(per_fold)
        }

    def _generate_examples(self, reader, split, refs):
        padded = 0
        for ref in refs:
            ex = reader.load_cell(ref)
            padded += bool(ex["border_padded"])
            yield ref.file_name, ex
        if padded:
            print(
                f"  {split}: {padded} of {len(refs)} crops reach past the image edge "
                "(padded with the image's border colour; border_padded=True)",
                flush=True,
            )
