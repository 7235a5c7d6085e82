"""`tfds.testing.DatasetBuilderTestCase` over `dummy_data/` (both configs).

`dummy_data/` is a tiny synthetic SIPaKMeD (the real on-disk tree: cluster images, both levels
of `.dat` contours, CROPPED/ crops; 3 cells per class, one with a bad annotation), made with:

    python -c "from tfds_sipakmed.synthetic import write_synthetic; write_synthetic(
        'tfds_sipakmed/sipakmed/dummy_data', 3, seed=2, scale=0.15, bad_annotation_rate=0.15)"

The test case reads through `as_dataset()`, which array_record does not implement, so it builds
TFRecord here; `tests/test_builder.py` covers the default array_record build and
`as_data_source()`.
"""

import pytest
import tensorflow_datasets as tfds

from tfds_sipakmed.sipakmed import sipakmed_dataset_builder

pytestmark = pytest.mark.slow  # about 50 s on 2 busy cores (TensorFlow start-up, two configs)


class SipakmedTest(tfds.testing.DatasetBuilderTestCase):
    """Builds both configs from dummy_data and checks splits, examples and metadata."""

    DATASET_CLASS = sipakmed_dataset_builder.Builder
    SPLITS = {f"fold{k}": 3 for k in range(5)}  # 15 cells: 3 per fold in both configs
    SKIP_CHECKSUMS = True  # manual download only: checksums.tsv is checked by the builder

    def _make_builder(self, config=None):
        return self.dataset_class(
            data_dir=self.tmp_dir, config=config, version=self.VERSION, file_format="tfrecord"
        )


if __name__ == "__main__":
    tfds.testing.test_main()
