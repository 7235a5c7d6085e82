"""SIPaKMeD as a TFDS dataset (`sipakmed`), plus its TF-free helpers.

`import tfds_sipakmed` registers the TFDS builder `sipakmed` when `tensorflow_datasets` is
installed. The helper modules need only numpy, OpenCV and the standard library, so they work on
machines without TFDS or TensorFlow:

- `tfds_sipakmed.layout`: find the class folders / archives in a manual dir, parse `.dat`
  contours, read the BMP crops, check annotations; `iter_cells(manual_dir)`.
- `tfds_sipakmed.folds`: the deterministic grouped (or cell-level) 5-fold assignment.
- `tfds_sipakmed.synthetic`: the procedural stand-in dataset.
- `tfds_sipakmed.datasets`: the registry (`NAMES`, `reader(name, manual_dir, options)`,
  `CellRef`, `DatasetError`): one TF-free reader per dataset; `cell_folder_layout` reads any
  lab's `ROOT/<class>/<images>` tree (TFDS builder `cell_folder`); `herlev_layout` and
  `cric_layout` read the Herlev and CRIC Cervix downloads (builders `herlev`, `cric`).
- `tfds_sipakmed.taxonomy`: each dataset's classes, groupings, abnormal set and clinical
  readings (`SIPAKMED`, `for_dataset`); standard library only.
"""

try:  # Registering needs tensorflow_datasets (not TensorFlow itself: tfds imports TF lazily).
    import tensorflow_datasets as _tfds  # noqa: F401
except ImportError:  # e.g. accelerator machines: the TF-free modules still work
    _tfds = None

if _tfds is not None:
    from tfds_sipakmed.cell_folder.cell_folder_dataset_builder import (  # noqa: F401 (registers)
        Builder as _CellFolderBuilder,
    )
    from tfds_sipakmed.cric.cric_dataset_builder import (  # noqa: F401 (registers)
        Builder as _CricBuilder,
    )
    from tfds_sipakmed.herlev.herlev_dataset_builder import (  # noqa: F401 (registers)
        Builder as _HerlevBuilder,
    )
    from tfds_sipakmed.sipakmed.sipakmed_dataset_builder import Builder  # noqa: F401 (registers)


def build(
    manual_dir,
    data_dir=None,
    config="grouped",
    archive_checksums=None,
    file_format=None,
    *,
    dataset="sipakmed",
    options=None,
):
    """Builds a registry dataset (default `sipakmed`) from `manual_dir`; returns the builder.

    See `tfds_sipakmed.build.build` (TensorFlow is imported only inside).
    """
    from tfds_sipakmed.build import build as _build

    return _build(
        manual_dir,
        data_dir=data_dir,
        config=config,
        archive_checksums=archive_checksums,
        file_format=file_format,
        dataset=dataset,
        options=options,
    )
