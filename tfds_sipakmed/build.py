"""Build the `sipakmed` TFDS dataset from a manual dir, without the `tfds` command line.

    python -m tfds_sipakmed.build --manual_dir=M [--data_dir=D] [--config=grouped]
        [--archive_checksums=FILE]

The `tfds build` command needs apache_beam; this entry point calls `download_and_prepare`
directly, prints progress and the per-class counts, and warns when they differ from the
published 813/825/793/787/831. The dataset is stored as array_record under
`D/sipakmed/<config>/1.0.0/`; an existing build there is reused, never overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

from tfds_sipakmed.folds import CONFIGS
from tfds_sipakmed.layout import ENV_ARCHIVE_CHECKSUMS, SipakmedError, find_sources


def build(manual_dir, data_dir=None, config="grouped", archive_checksums=None, file_format=None):
    """Builds (or reuses) the `sipakmed` dataset with `config`; returns the tfds builder.

    `archive_checksums`: None (the published sha256 are required, or those in the file named
    by $SIPAKMED_ARCHIVE_CHECKSUMS), a {archive name: sha256} dict, or a `sha256sum`-style file
    (e.g. the synthetic generator's SYNTHETIC_SHA256SUMS). `file_format`: None for array_record.
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; expected one of {CONFIGS}")
    find_sources(manual_dir)  # a missing or incomplete manual dir fails here, before TF starts
    import tensorflow as tf  # noqa: PLC0415 - building needs TF; keep it off accelerators

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised
        pass
    import tensorflow_datasets as tfds

    import tfds_sipakmed  # noqa: F401 - registers the builder

    kwargs = {"config": config, "archive_checksums": archive_checksums}
    if data_dir is not None:
        kwargs["data_dir"] = os.fspath(data_dir)
    if file_format is not None:
        kwargs["file_format"] = file_format
    builder = tfds.builder("sipakmed", **kwargs)
    if builder.is_prepared():
        print(f"sipakmed/{config} is already built in {builder.data_dir}; reusing it.")
        return builder
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return builder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tfds_sipakmed.build", description="Build the sipakmed TFDS dataset."
    )
    p.add_argument("--manual_dir", required=True, help="the .7z archives or im_<Class>/ folders")
    p.add_argument("--data_dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
    p.add_argument("--config", default="grouped", choices=CONFIGS)
    p.add_argument(
        "--archive_checksums",
        default=None,
        help="sha256sum-style file replacing the published archive sums (synthetic archives); "
        f"also ${ENV_ARCHIVE_CHECKSUMS}",
    )
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        builder = build(a.manual_dir, a.data_dir, a.config, a.archive_checksums)
    except SipakmedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = builder.info.splits
    print(
        f"Built sipakmed/{a.config} in {builder.data_dir} in {time.time() - t0:.1f} s: "
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
