"""What a training run reads: where the dataset is (checked before anything is written), the
dataset prepared (synthetic, TFDS build), and one cross-validation round's subsets with their
sharded batch iterators.

`plan_dataset(config, workdir) -> DataPlan` only looks: it resolves `config.data_dir=''` to
`$TFDS_DATA_DIR` or `~/tensorflow_datasets` (TFDS's own default), checks that a built dataset,
a manual dir or a synthetic request is there, and raises `console.UserError` naming what is
missing and the command that fixes it. `prepare_dataset(plan, workdir)` then writes what the
plan needs: the synthetic SIPaKMeD (`config.synthetic.cells_per_class > 0`), the TFDS build of
a manual dir (TensorFlow is imported only there), or nothing. With `config.use_tfds=False` the
raw tree is read directly (TF-free). `Data` wraps `sipak_jax.input_pipeline` for the trainer:
the `train` / `validation` / `test` caches of one test fold, the batch iterators (global
`jax.Array`s sharded `P('data')`), the examples' names, fixed images for overlays and the
shortcut controls' inputs.
"""

import contextlib
import dataclasses
import io
import os
import time

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sipak_jax import console, fileio
from sipak_jax.console import UserError

DOWNLOAD_PAGE = "https://www.cs.uoi.gr/~marina/SIPAKMED/"
DEMO_COMMAND = "python main.py --config=configs/demo.py --workdir=workdirs/demo"


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """Where a run's data comes from. `kind`: 'tfds' (a built dataset in `data_dir`), 'build'
    (build `manual_dir` into `data_dir` first), 'raw' (read `manual_dir` directly) or
    'synthetic' (write one into `manual_dir`, then build it into `data_dir` unless raw)."""

    kind: str
    data_dir: str
    manual_dir: str
    use_tfds: bool
    builder_config: str
    cells_per_class: int = 0
    synthetic_seed: int = 0

    def reads(self) -> tuple[str, str]:
        """(TFDS data_dir, manual_dir) the input pipeline reads, one of them empty."""
        return (self.data_dir, "") if self.use_tfds else ("", self.manual_dir)

    def describe(self) -> str:
        what = {
            "tfds": "TFDS dataset",
            "build": "TFDS dataset built from",
            "raw": "raw tree",
            "synthetic": "synthetic SIPaKMeD",
        }[self.kind]
        where = self.manual_dir if self.kind in ("build", "raw", "synthetic") else self.data_dir
        return f"{what} {where}"


def default_data_dir() -> str:
    """TFDS's default data_dir: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _path(value: str) -> str:
    return os.path.abspath(os.path.expanduser(value)) if value else ""


def is_built(data_dir: str, name: str, builder_config: str) -> bool:
    """True when `data_dir` holds a built `name/builder_config/<version>` (or is one)."""
    if os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        return True
    config_dir = os.path.join(data_dir, name, builder_config)
    if not os.path.isdir(config_dir):
        return False
    return any(
        os.path.isfile(os.path.join(config_dir, v, "dataset_info.json"))
        for v in os.listdir(config_dir)
    )


def plan_dataset(config, workdir: str) -> DataPlan:
    """Where the data comes from; reads only. Raises UserError when it is not there."""
    use_tfds, cfg = bool(config.use_tfds), str(config.dataset_config)
    data_dir = _path(config.data_dir)
    if int(config.synthetic.cells_per_class) > 0:
        root = data_dir or os.path.join(os.path.abspath(workdir), "data")
        return DataPlan(
            "synthetic",
            os.path.join(root, "tfds"),
            os.path.join(root, "raw"),
            use_tfds,
            cfg,
            int(config.synthetic.cells_per_class),
            int(config.synthetic.seed),
        )
    if config.manual_dir:
        manual = _path(config.manual_dir)
        _check_manual_dir(manual)
        kind = "build" if use_tfds else "raw"
        return DataPlan(kind, data_dir or default_data_dir(), manual, use_tfds, cfg)
    if not use_tfds:
        raise UserError(
            "config.use_tfds=False reads the extracted SIPaKMeD archives directly, but "
            "config.manual_dir is empty: pass --config.manual_dir=DIR (the folder with the five "
            f"im_<Class> archives or folders from {DOWNLOAD_PAGE})"
        )
    target = data_dir or default_data_dir()
    if not is_built(target, str(config.dataset), cfg):
        raise _missing_dataset(config, target)
    return DataPlan("tfds", target, "", True, cfg)


def _check_manual_dir(manual: str) -> None:
    from tfds_sipakmed import layout  # TF-free

    try:
        layout.find_sources(manual)
    except layout.SipakmedError as e:
        raise UserError(f"config.manual_dir: {e}") from None


def _missing_dataset(config, target: str) -> UserError:
    cfg = str(config.dataset_config)
    if config.data_dir:
        where = f"config.data_dir={config.data_dir}"
        if not os.path.isdir(target):
            where += " does not exist"
    else:
        where = "config.data_dir='' means $TFDS_DATA_DIR or ~/tensorflow_datasets"
    build_cfg = "" if cfg == "grouped" else f" --config={cfg}"
    return UserError(
        f"no built {config.dataset}/{cfg} dataset in {target} ({where}). Build it from the "
        f"SIPaKMeD archives ({DOWNLOAD_PAGE}): python -m tfds_sipakmed.build "
        f"--manual_dir=DIR_WITH_THE_ARCHIVES --data_dir={target}{build_cfg} ; or pass "
        f"--config.data_dir=WHERE_IT_IS_BUILT or --config.manual_dir=DIR_WITH_THE_ARCHIVES. "
        f"Without data, try the demo: {DEMO_COMMAND}"
    )


def prepare_dataset(plan: DataPlan) -> tuple[str, str]:
    """Writes what `plan` needs (process 0; the others wait); returns (data_dir, manual_dir)
    for the input pipeline, one of them empty."""
    if jax.process_index() == 0:
        t0 = time.time()
        if plan.kind == "synthetic":
            _write_synthetic(plan)
        if plan.kind in ("synthetic", "build") and plan.use_tfds:
            _build_tfds(plan)
        if plan.kind != "tfds" and time.time() - t0 > 1:
            console.say(f"data: prepared {plan.describe()} in {time.time() - t0:.0f} s")
    _sync("dataset ready")
    return plan.reads()


def _write_synthetic(plan: DataPlan) -> None:
    """The synthetic SIPaKMeD, written whole or not at all (renamed when complete)."""
    if os.path.isdir(plan.manual_dir):
        return
    from tfds_sipakmed import synthetic

    with fileio.atomic_dir(plan.manual_dir) as partial:
        synthetic.write_synthetic(
            partial, cells_per_class=plan.cells_per_class, seed=plan.synthetic_seed
        )
    logging.info("synthetic SIPaKMeD written: %s", plan.manual_dir)


def _build_tfds(plan: DataPlan) -> None:
    """Builds through the real TFDS builder (needs TensorFlow; reused when already built).
    Quiet: the builder's own printout is kept back, except its warnings about real data."""
    marker = os.path.join(os.path.dirname(plan.data_dir), "BUILT")
    if plan.kind == "synthetic" and os.path.exists(marker):
        return
    import tfds_sipakmed

    console.disable_tfds_progress()
    out = io.StringIO()
    redirect = contextlib.nullcontext() if console.is_verbose() else contextlib.redirect_stdout(out)
    with redirect, console.native_stderr_quiet():
        tfds_sipakmed.build(plan.manual_dir, plan.data_dir, plan.builder_config)
    if plan.kind == "synthetic":
        fileio.atomic_write_text(marker, f"synthetic cells_per_class={plan.cells_per_class}\n")
        return
    for line in out.getvalue().splitlines():
        if line.startswith("warning:"):
            console.say(line)


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
            raise UserError(
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
