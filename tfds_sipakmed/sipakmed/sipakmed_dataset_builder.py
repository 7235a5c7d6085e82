"""The TFDS builder `sipakmed`: SIPaKMeD cropped cells, 5 leak-free folds, array_record.

Build (TensorFlow is needed to build, not to read):

    import tensorflow_datasets as tfds, tfds_sipakmed
    tfds.builder('sipakmed', data_dir=D).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=M))

or `python -m tfds_sipakmed.build --manual_dir=M [--data_dir=D]`. Read without TensorFlow with
`tfds.builder('sipakmed', data_dir=D).as_data_source()`.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from tfds_sipakmed import folds as folds_lib
from tfds_sipakmed import layout
from tfds_sipakmed.taxonomy import SIPAKMED

_DESCRIPTION = """\
SIPaKMeD (Plissiti et al., ICIP 2018): 4049 cropped cervical cells from Pap smear images, five
classes (in label order: Dyskeratotic, Koilocytotic, Metaplastic, Parabasal,
Superficial-Intermediate), with nucleus and cytoplasm contours. Examples are the crops
`im_<Class>/CROPPED/NNN_KK.bmp` only, never the cluster images. There is no official split:
the five splits `fold0`..`fold4` are deterministic stratified folds; see the config's
description and the dataset README for the exact algorithm.
"""

_GROUPED = (
    "Leak-free (default): 5 folds stratified by class and grouped by cluster image "
    "(cluster_id = <Class>/NNN), so no cluster image has cells in two folds."
)
_RANDOM = (
    "LEAKS, for comparison with published numbers only: 5 folds stratified by class at the "
    "cell level, so cells of one cluster image (same slide, stain, focus and background) land "
    "in different folds and test scores are inflated."
)


def _view_label(view: str) -> tfds.features.ClassLabel:
    return tfds.features.ClassLabel(names=list(SIPAKMED.view_names(view)))


class Builder(tfds.core.GeneratorBasedBuilder):
    """SIPaKMeD cropped cells; manual download (the five .7z archives or their folders)."""

    name = "sipakmed"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: cropped cells, grouped and random_cells folds."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="grouped", description=_GROUPED),
        tfds.core.BuilderConfig(name="random_cells", description=_RANDOM),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "grouped"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the five archives {", ".join(layout.ARCHIVE_NAMES)} from {layout.DOWNLOAD_PAGE}
and place them (or their extracted im_<Class>/ folders, flat im_<Class>/CROPPED/ or nested
im_<Class>/im_<Class>/CROPPED/) directly in the manual dir. The archives' sha256 are checked
against the published ones; other archives (e.g. the synthetic stand-in) need their sums passed
explicitly: `archive_checksums=` (builder kwarg), `--archive_checksums=FILE` or the environment
variable {layout.ENV_ARCHIVE_CHECKSUMS}=FILE.
"""

    def __init__(self, *, file_format=None, archive_checksums=None, **kwargs):
        super().__init__(file_format=file_format, **kwargs)
        self._archive_checksums = archive_checksums
        self._extract_dir = None
        if file_format is None and not self.is_prepared():
            # Stored as array_record by default: read with `as_data_source()`, no TensorFlow.
            self.info.set_file_format("array_record", override=True)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(SIPAKMED.class_names)),
                    "label_3class": _view_label("3class"),
                    "label_2class": _view_label("2class"),
                    "cluster_id": tfds.features.Text(),
                    "cell_index": tfds.features.Scalar(dtype=np.int32),
                    "file_name": tfds.features.Text(),
                    "nucleus_contour": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
                    "cytoplasm_contour": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
                    "annotation_valid": tfds.features.Scalar(dtype=np.bool_),
                    "annotation_issue": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=layout.DOWNLOAD_PAGE,
            # The taxonomy travels with the data (`metadata.json` in the builder dir).
            metadata=tfds.core.MetadataDict(
                taxonomy=SIPAKMED.to_dict(),
                grouping={
                    "rule": "cluster image",
                    "value": "<Class>/NNN",
                    "leak_free": self.builder_config.name == "grouped",
                    "warning": "",
                },
            ),
        )

    def _download_and_prepare(self, dl_manager, download_config=None):
        # Archives are extracted (CROPPED/ members only) into a scratch dir that lives until
        # every split is written.
        with tempfile.TemporaryDirectory(prefix="sipakmed_extract_") as tmp:
            self._extract_dir = tmp
            try:
                return super()._download_and_prepare(dl_manager, download_config)
            finally:
                self._extract_dir = None

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        print(f"Reading SIPaKMeD from {manual_dir} ...", flush=True)
        extract_dir = self._extract_dir or tempfile.mkdtemp(prefix="sipakmed_extract_")
        refs = layout.list_cells(
            manual_dir, extract_dir, self._archive_checksums, lambda s: print(s, flush=True)
        )
        lines, warnings = layout.count_report(layout.count_by_class(refs))
        print("Cells per class:", *lines, *warnings, sep="\n", flush=True)
        assignment = folds_lib.assign_folds(refs, self.builder_config.name)
        per_fold = [[] for _ in range(folds_lib.NUM_FOLDS)]
        for ref, fold in zip(refs, assignment, strict=True):
            per_fold[fold].append(ref)
        print(
            f"Folds ({self.builder_config.name}): "
            + ", ".join(f"fold{k}={len(v)}" for k, v in enumerate(per_fold)),
            flush=True,
        )
        return {folds_lib.split_name(k): self._generate_examples(v) for k, v in enumerate(per_fold)}

    def _generate_examples(self, refs):
        for ref in refs:
            yield ref.file_name, layout.load_cell(ref)
