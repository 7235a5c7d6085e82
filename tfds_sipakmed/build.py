"""Build a dataset of the registry as TFDS array_record, without the `tfds` command line.

    python -m tfds_sipakmed.build --manual_dir=M [--data_dir=D] [--config=grouped]
        [--dataset=sipakmed|herlev|cric|cell_folder] [--archive_checksums=FILE]
        [--group_regex=R | --group_csv=F] [--taxonomy=T.json] [--crop_size=N]

The `tfds build` command needs apache_beam; this entry point calls `download_and_prepare`
directly and prints progress, the counts and the reader's warnings (SIPaKMeD: when the
per-class counts differ from the published 813/825/793/787/831; a cell folder: when no
grouping rule is given). The dataset is stored as array_record under
`D/<dataset>/<config>/<version>/`; an existing build there is reused, never overwritten.
`--config` is the fold config (`grouped` or `random_cells`); a builder with one config per
manual dir (`cell_folder`) derives its config name from it (`Builder.config_for`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

from tfds_sipakmed import datasets
from tfds_sipakmed.folds import CONFIGS
from tfds_sipakmed.layout import ENV_ARCHIVE_CHECKSUMS

_OPTIONS = ("group_regex", "group_csv", "taxonomy", "crop_size")


def _import_tfds():
    import tensorflow as tf  # noqa: PLC0415 - building needs TF; keep it off accelerators

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised
        pass
    import tensorflow_datasets as tfds

    import tfds_sipakmed  # noqa: F401 - registers the builders

    return tfds


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
    """Builds (or reuses) `dataset` with the fold config `config`; returns the tfds builder.

    `archive_checksums` (SIPaKMeD): None (the published sha256 are required, or those in the
    file named by $SIPAKMED_ARCHIVE_CHECKSUMS), a {archive name: sha256} dict, or a
    `sha256sum`-style file. `options`: the reader's options (`tfds_sipakmed.datasets`).
    `file_format`: None for array_record. A bad manual dir raises `datasets.DatasetError`
    before TensorFlow starts.
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; expected one of {CONFIGS}")
    options = dict(options or {})
    # A bad manual dir fails here, before TensorFlow starts (SIPaKMeD's archives are checked,
    # sha256, when the build reads them).
    reader = datasets.reader(dataset, manual_dir, {**options, "log": lambda s: None})
    if dataset != "sipakmed":
        reader.list_cells()
    tfds = _import_tfds()
    kwargs = {"config": config}
    cls = tfds.builder_cls(dataset)
    if hasattr(cls, "config_for"):  # one config per manual dir (cell_folder)
        kwargs["config"] = cls.config_for(os.fspath(manual_dir), config, options)
    if dataset == "sipakmed":
        kwargs["archive_checksums"] = archive_checksums
    if data_dir is not None:
        kwargs["data_dir"] = os.fspath(data_dir)
    if file_format is not None:
        kwargs["file_format"] = file_format
    builder = tfds.builder(dataset, **kwargs)
    name = f"{dataset}/{builder.builder_config.name}"
    if builder.is_prepared():
        print(f"{name} is already built in {builder.data_dir}; reusing it.")
        return builder
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return builder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tfds_sipakmed.build", description="Build a dataset as TFDS array_record."
    )
    p.add_argument("--manual_dir", required=True, help="the dataset as downloaded / the folder")
    p.add_argument("--data_dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
    p.add_argument("--dataset", default="sipakmed", choices=datasets.NAMES)
    p.add_argument("--config", default="grouped", choices=CONFIGS, help="the fold config")
    p.add_argument(
        "--archive_checksums",
        default=None,
        help="sipakmed: sha256sum-style file replacing the published archive sums (synthetic "
        f"archives); also ${ENV_ARCHIVE_CHECKSUMS}",
    )
    p.add_argument("--group_regex", default="", help="cell_folder: group id from the file name")
    p.add_argument("--group_csv", default="", help="cell_folder: CSV file,group")
    p.add_argument("--taxonomy", default="", help="cell_folder: taxonomy JSON")
    p.add_argument("--crop_size", default=None, type=int, help="cric: crop size in pixels")
    a = p.parse_args(argv)
    options = {k: getattr(a, k) for k in _OPTIONS if getattr(a, k) not in (None, "")}
    t0 = time.time()
    try:
        builder = build(
            a.manual_dir,
            a.data_dir,
            a.config,
            a.archive_checksums,
            dataset=a.dataset,
            options=options,
        )
    except datasets.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = builder.info.splits
    print(
        f"Built {a.dataset}/{builder.builder_config.name} in {builder.data_dir} in "
        f"{time.time() - t0:.1f} s: "
        + ", ".join(f"{k}={splits[k].num_examples}" for k in sorted(splits))
    )
    return 0


class _CallableModule(types.ModuleType):
    """Importing this submodule rebinds the package attribute `tfds_sipakmed.build` to the
    module; making the module callable keeps `tfds_sipakmed.build(manual_dir, ...)` working."""

    def __call__(self, *args, **kwargs):
        return build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
