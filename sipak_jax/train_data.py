"""What a training run reads: the dataset prepared (synthetic, TFDS build) and one
cross-validation round's subsets with their sharded batch iterators.

`prepare_dataset(config, workdir)` writes the synthetic SIPaKMeD when configured and builds
the TFDS dataset through the real builder (TensorFlow is imported only there), or, with
`config.use_tfds=False`, leaves the raw tree to be read directly (TF-free). `Data` wraps
`sipak_jax.input_pipeline` for `sipak_jax.train`: the `train` / `validation` / `test` caches
of one test fold, the batch iterators (global `jax.Array`s sharded `P('data')`), the
examples' names, fixed validation images for overlays and the shortcut controls' inputs.
"""

import os
import time

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def prepare_dataset(config, workdir: str) -> tuple[str, str]:
    """(TFDS data_dir, manual_dir) to read, one of them empty.

    With `config.synthetic.cells_per_class > 0` the synthetic SIPaKMeD is written first
    (`<data_dir or WORKDIR/data>/raw`; process 0 writes, the others wait). With
    `config.use_tfds` (the default) the raw tree (synthetic or `config.manual_dir`) is built
    into a TFDS dataset through the real builder (needs TensorFlow) unless built already;
    without it the raw tree is read directly (TF-free, e.g. on accelerator machines).
    """
    data_dir = os.path.expanduser(config.data_dir) if config.data_dir else ""
    use_tfds = bool(config.use_tfds)
    if config.synthetic.cells_per_class > 0:
        root = data_dir or os.path.join(workdir, "data")
        raw = os.path.join(root, "raw")
        tfds_dir = os.path.join(root, "tfds")
        marker = os.path.join(root, "BUILT")
        if jax.process_index() == 0:
            t0 = time.time()
            if not os.path.isdir(raw):
                import shutil

                from tfds_sipakmed import synthetic

                partial = raw + ".partial"  # renamed when complete: a crash leaves no half tree
                shutil.rmtree(partial, ignore_errors=True)
                synthetic.write_synthetic(
                    partial,
                    cells_per_class=int(config.synthetic.cells_per_class),
                    seed=int(config.synthetic.seed),
                )
                os.replace(partial, raw)
                logging.info("synthetic SIPaKMeD written in %.1f s: %s", time.time() - t0, raw)
            if use_tfds and not os.path.exists(marker):
                _build_tfds(raw, tfds_dir, config.dataset_config)
                with open(marker, "w") as f:
                    f.write(f"synthetic cells_per_class={config.synthetic.cells_per_class}\n")
                logging.info("TFDS dataset built in %s (%.1f s)", tfds_dir, time.time() - t0)
        _sync("synthetic dataset ready")
        return (tfds_dir, "") if use_tfds else ("", raw)
    if config.manual_dir:
        manual = os.path.expanduser(config.manual_dir)
        if not use_tfds:
            return "", manual
        target = data_dir or os.path.expanduser("~/tensorflow_datasets")
        if jax.process_index() == 0:
            _build_tfds(manual, target, config.dataset_config)
        _sync("dataset built")
        return target, ""
    return data_dir, ""


def _build_tfds(manual_dir: str, data_dir: str, builder_config: str):
    """Builds through the real TFDS builder (needs TensorFlow; skipped when already built)."""
    import tfds_sipakmed

    tfds_sipakmed.build(manual_dir, data_dir, builder_config)


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Data:
    """The three subsets of one cross-validation round and their batch iterators
    (`sipak_jax.input_pipeline`): `train` (the four training folds less the validation
    clusters), `validation` (whole cluster images carved from them), `test` (the held-out
    fold, read only at the end)."""

    def __init__(self, config, data_dir: str, manual_dir: str, fold: int, mesh):
        from sipak_jax import input_pipeline

        self._ip = input_pipeline
        self.config = config
        self.mesh = mesh
        kwargs = {"manual_dir": manual_dir} if manual_dir else {}
        self.caches = input_pipeline.load_folds(
            data_dir or None,
            config.dataset_config,
            fold,
            int(config.image_size),
            config.resize,
            os.path.expanduser(config.cache_dir) if config.cache_dir else None,
            validation_fraction=float(config.val_fraction),
            validation_seed=int(config.seed),
            log=logging.info,
            **kwargs,
        )
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self.steps_per_epoch = input_pipeline.steps_per_epoch(
            self.caches["train"], int(config.batch_size)
        )
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{self.num('train')} training examples do not fill one batch of "
                f"config.batch_size={config.batch_size}; use a smaller batch"
            )

    def num(self, split: str) -> int:
        return int(self.caches[split].num_examples)

    def train_batches(self, start_step: int):
        return self._ip.train_batches(
            self.caches["train"],
            int(self.config.batch_size),
            self.mesh,
            int(self.config.seed),
            start_step,
            prefetch=int(self.config.prefetch),
        )

    def eval_batches(self, split: str):
        return self._ip.eval_batches(
            self.caches[split],
            int(self.config.eval_batch_size),
            self.mesh,
            prefetch=int(self.config.prefetch),
        )

    def examples(self, split: str) -> dict:
        """{index: {file_name, cluster_id}} of this process's share of `split`."""
        c = self.caches[split]
        return {
            int(i): {"file_name": str(f), "cluster_id": str(k)}
            for i, f, k in zip(c.index, c.file_name, c.cluster_id, strict=True)
        }

    def fixed_images(self, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `n` images (uint8) and labels of `split` in this process's share."""
        c = self.caches[split]
        return c.image[:n], c.label[:n]

    def shortcut_inputs(self):
        """(shapes, colours, labels, is_test) over every example of every fold, or None with
        several processes (each holds only its share)."""
        if jax.process_count() > 1:
            return None
        parts = [self.caches[k] for k in ("train", "validation", "test")]
        shapes = np.concatenate([c.crop_shape for c in parts])
        colours = np.concatenate(
            [np.concatenate([c.mean_colour, c.border_colour.astype(np.float32)], 1) for c in parts]
        )
        labels = np.concatenate([c.label for c in parts])
        is_test = np.concatenate([np.full(len(c), k == 2) for k, c in enumerate(parts)])
        return shapes, colours, labels, is_test
