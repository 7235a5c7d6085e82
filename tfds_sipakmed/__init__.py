"""SIPaKMeD as a TFDS dataset (`sipakmed`), plus its TF-free helpers.

`import tfds_sipakmed` registers the TFDS builder `sipakmed` when `tensorflow_datasets` is
installed. The helper modules need only numpy, OpenCV and the standard library, so they work on
machines without TFDS or TensorFlow:

- `tfds_sipakmed.layout`: find the class folders / archives in a manual dir, parse `.dat`
  contours, read the BMP crops, check annotations; `iter_cells(manual_dir)`.
- `tfds_sipakmed.folds`: the deterministic grouped (or cell-level) 5-fold assignment.
- `tfds_sipakmed.synthetic`: the procedural stand-in dataset.
- `tfds_sipakmed.taxonomy`: each dataset's classes, groupings, abnormal set and clinical
  readings (`SIPAKMED`, `for_dataset`); standard library only.
"""

try:  # Registering needs tensorflow_datasets (not TensorFlow itself: tfds imports TF lazily).
    import tensorflow_datasets as _tfds  # noqa: F401
except ImportError:  # e.g. accelerator machines: the TF-free modules still work
    _tfds = None

if _tfds is not None:
    from tfds_sipakmed.sipakmed.sipakmed_dataset_builder import Builder  # noqa: F401 (registers)


def build(manual_dir, data_dir=None, config="grouped", archive_checksums=None, file_format=None):
    """Builds the `sipakmed` TFDS dataset from `manual_dir`; returns the tfds builder.

    See `tfds_sipakmed.build.build` (TensorFlow is imported only inside).
    """
    from tfds_sipakmed.build import build as _build

    return _build(
        manual_dir,
        data_dir=data_dir,
        config=config,
        archive_checksums=archive_checksums,
        file_format=file_format,
    )
