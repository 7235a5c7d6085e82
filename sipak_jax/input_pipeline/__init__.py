"""From a dataset's TFDS splits (any of `tfds_sipakmed.datasets.NAMES`) to global, sharded
`jax.Array` batches, on grain, without TensorFlow.

TensorFlow builds the TFDS dataset (`tfds_sipakmed.build`); training, evaluation and the
benchmarks only read it. Three parts, one job each:

- `sources`: the built TFDS dataset (`as_data_source()` on array_record) or the raw tree
  (the dataset's reader, `tfds_sipakmed.datasets`), behind grain's RandomAccessDataSource
  interface (`len`, `[i]`), examples in (split, `file_name`) order in the common schema
  (`group_id`, ...); both give identical examples and the data's `taxonomy`.
- `cache`: `load_splits` / `load_folds` decode and resize every example this process keeps
  once (a grain map over worker threads) into an in-memory uint8 `Cache`; `load_folds`
  carves a grouped validation part out of the training folds (`carve_validation`);
  inside `reuse_decoded()` (a 5-fold study) each cell is decoded once for all folds.
- `batches`: `train_batches` / `eval_batches`: grain pipelines over the cache (the rows of
  each step, gather, device put, prefetch) that start at any step.

The public names are re-exported here: the trainer (`sipak_jax.train_data`), the benchmarks
and `saliency_eval` use `sipak_jax.input_pipeline.<name>`.
"""

from sipak_jax.input_pipeline.batches import (
    BatchIterator,
    TrainOrder,
    device_batches,
    eval_batches,
    eval_dataset,
    host_batch,
    num_eval_steps,
    steps_per_epoch,
    train_batches,
    train_dataset,
    train_rows,
)
from sipak_jax.input_pipeline.cache import (
    Cache,
    carve_validation,
    load_folds,
    load_splits,
    reuse_decoded,
)
from sipak_jax.input_pipeline.sources import (
    RawTreeSource,
    Record,
    TfdsSource,
    find_builder_dir,
    open_source,
)

__all__ = [
    "BatchIterator",
    "Cache",
    "RawTreeSource",
    "Record",
    "TfdsSource",
    "TrainOrder",
    "carve_validation",
    "device_batches",
    "eval_batches",
    "eval_dataset",
    "find_builder_dir",
    "host_batch",
    "load_folds",
    "load_splits",
    "num_eval_steps",
    "open_source",
    "reuse_decoded",
    "steps_per_epoch",
    "train_batches",
    "train_dataset",
    "train_rows",
]
