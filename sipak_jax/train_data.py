"""What a training run reads: where the dataset is (checked before anything is written), the
dataset prepared (synthetic, TFDS build), and one cross-validation round's subsets with their
sharded batch iterators.

`plan_dataset(config, workdir) -> DataPlan` only looks: it resolves `config.data_dir=''` to
`$TFDS_DATA_DIR` or `~/tensorflow_datasets` (TFDS's own default), checks that a built dataset,
a manual dir (read through the dataset's reader, `tfds_sipakmed.datasets`, with
`dataset_options(config)`) or a synthetic request is there, and raises `console.UserError`
naming what is missing and the command that fixes it. `prepare_dataset(plan, workdir)` then
writes what the plan needs: the synthetic SIPaKMeD (`config.synthetic.cells_per_class > 0`),
the TFDS build of a manual dir (TensorFlow is imported only there), or nothing. With
`config.use_tfds=False` the raw tree is read directly (TF-free). `config.dataset` is any name of
`tfds_sipakmed.datasets.NAMES`; a `cell_folder` build lives in its own builder config
(`<folds>-<digest>`, `DataPlan.tfds_config`), so two lab folders never share one.

`Data` wraps `sipak_jax.input_pipeline` for the trainer: the `train` / `validation` / `test`
caches of one test fold, the batch iterators (global `jax.Array`s sharded `P('data')`), the
examples' names, fixed images for overlays, the shortcut controls' inputs, and what the data
means (`taxonomy`, `grouping`, `warnings`, from the build's metadata or the reader).
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
from tfds_sipakmed import datasets, folds
from tfds_sipakmed import taxonomy as taxonomies

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
    builder_config: str  # the fold config: 'grouped' or 'random_cells'
    cells_per_class: int = 0
    synthetic_seed: int = 0
    dataset: str = "sipakmed"
    options: tuple = ()  # the reader's options, (key, value) pairs (`dataset_options`)
    tfds_config: str = ""  # the TFDS builder config read; '' = builder_config

    def reads(self) -> tuple[str, str]:
        """(TFDS data_dir, manual_dir) the input pipeline reads, one of them empty."""
        return (self.data_dir, "") if self.use_tfds else ("", self.manual_dir)

    def describe(self) -> str:
        what = {
            "tfds": f"TFDS dataset {self.dataset}",
            "build": f"TFDS dataset {self.dataset} built from",
            "raw": f"raw tree ({self.dataset})",
            "synthetic": "synthetic SIPaKMeD",
        }[self.kind]
        where = self.manual_dir if self.kind in ("build", "raw", "synthetic") else self.data_dir
        return f"{what} {where}"


def dataset_options(config) -> dict:
    """The reader's options from the config (`tfds_sipakmed.datasets`): the non-empty ones of
    `group_regex`, `group_csv`, `taxonomy` (paths made absolute) and `crop_size` (> 0)."""
    out = {}
    for key in ("group_regex", "group_csv", "taxonomy"):
        value = str(config.get(key, "") or "")
        if value:
            out[key] = _path(value) if key != "group_regex" else value
    if int(config.get("crop_size", 0) or 0) > 0:
        out["crop_size"] = int(config.crop_size)
    return out


def check_dataset_config(config) -> None:
    """The data fields that can be checked without reading anything; UserError otherwise."""
    name = str(config.dataset)
    if name not in datasets.NAMES:
        raise UserError(
            f"config.dataset={name!r} is not a dataset; expected one of {', '.join(datasets.NAMES)}"
        )
    if str(config.dataset_config) not in folds.CONFIGS:
        raise UserError(
            f"config.dataset_config must be one of {folds.CONFIGS}, got {config.dataset_config!r}"
        )
    if name != "sipakmed" and int(config.synthetic.cells_per_class) > 0:
        raise UserError(
            "config.synthetic.cells_per_class > 0 writes a synthetic SIPaKMeD; it needs "
            f"config.dataset='sipakmed', not {name!r}"
        )
    if int(config.get("crop_size", 0) or 0) < 0:
        raise UserError(f"config.crop_size must be >= 0 (0: the default), got {config.crop_size}")
    for key in ("group_regex", "group_csv", "taxonomy", "crop_size"):
        if config.get(key) and key not in datasets.OPTIONS_READ[name]:
            users = [n for n, keys in datasets.OPTIONS_READ.items() if key in keys]
            raise UserError(
                f"config.{key} applies to config.dataset={' or '.join(map(repr, users))}, not "
                f"{name!r} (which reads {', '.join(datasets.OPTIONS_READ[name])})"
            )
    if config.get("group_regex") and config.get("group_csv"):
        raise UserError("give one grouping rule: config.group_regex or config.group_csv, not both")
    if name != "cell_folder":
        try:
            taxonomies.for_dataset(name)  # a fixed dataset has its taxonomy in the package
        except ValueError as e:
            raise UserError(f"config.dataset: {e}") from None


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
    plan = _plan(config, workdir)
    if plan.kind != "build":
        return plan
    name = str(config.dataset)
    tfds_config = datasets.tfds_config_name(
        name, plan.manual_dir, plan.builder_config, dict(plan.options)
    )
    return dataclasses.replace(plan, tfds_config=tfds_config)


def _plan(config, workdir: str) -> DataPlan:
    use_tfds, cfg = bool(config.use_tfds), str(config.dataset_config)
    name, options = str(config.dataset), dataset_options(config)
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
    extra = {"dataset": name, "options": tuple(sorted(options.items()))}
    if config.manual_dir:
        manual = _path(config.manual_dir)
        _check_manual_dir(name, manual, options)
        kind = "build" if use_tfds else "raw"
        return DataPlan(kind, data_dir or default_data_dir(), manual, use_tfds, cfg, **extra)
    if not use_tfds:
        raise UserError(
            f"config.use_tfds=False reads the {name} manual dir directly, but config.manual_dir "
            f"is empty: pass --config.manual_dir=DIR ({_where_to_get(name)})"
        )
    target = data_dir or default_data_dir()
    if name == "cell_folder" and not os.path.isfile(os.path.join(target, "dataset_info.json")):
        raise UserError(
            "config.dataset=cell_folder needs its folder: pass --config.manual_dir=ROOT "
            "(ROOT/<class name>/<image files>), or --config.data_dir=the built "
            "cell_folder/<config>/<version> dir"
        )
    if not is_built(target, name, cfg):
        raise _missing_dataset(config, target)
    return DataPlan("tfds", target, "", True, cfg, **extra)


def _where_to_get(name: str) -> str:
    if name == "sipakmed":
        return f"the folder with the five im_<Class> archives or folders from {DOWNLOAD_PAGE}"
    if name == "cell_folder":
        return "ROOT holding one folder of images per class"
    return f"the {name} download, see the dataset card tfds_sipakmed/{name}/README.md"


def _check_manual_dir(name: str, manual: str, options: dict) -> None:
    """Lists the manual dir's cells through its reader (nothing decoded): a missing dataset,
    a file that is not an image, an unmatched grouping rule or a bad taxonomy fail here."""
    try:
        reader = datasets.reader(name, manual, {**options, "log": lambda s: None})
        if name != "sipakmed":  # SIPaKMeD's archives are checked (sha256) when read
            reader.list_cells()
    except datasets.DatasetError as e:
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
    name = str(config.dataset)
    flag = "" if name == "sipakmed" else f" --dataset={name}"
    return UserError(
        f"no built {name}/{cfg} dataset in {target} ({where}). Build it from "
        f"{_where_to_get(name)}: python -m tfds_sipakmed.build{flag} "
        f"--manual_dir=MANUAL_DIR --data_dir={target}{build_cfg} ; or pass "
        f"--config.data_dir=WHERE_IT_IS_BUILT or --config.manual_dir=MANUAL_DIR. "
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
            try:
                _build_tfds(plan)
            except datasets.DatasetError as e:  # e.g. an image that does not decode
                raise UserError(f"config.manual_dir: {e}") from None
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
        tfds_sipakmed.build(
            plan.manual_dir,
            plan.data_dir,
            plan.builder_config,
            dataset=plan.dataset,
            options=dict(plan.options),
        )
    if plan.kind == "synthetic":
        fileio.atomic_write_text(marker, f"synthetic cells_per_class={plan.cells_per_class}\n")
        return
    if plan.dataset == "cell_folder":  # its warnings travel in the build's metadata: said later
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

    def __init__(self, config, plan: DataPlan, fold: int, mesh):
        from sipak_jax import input_pipeline

        self._ip = input_pipeline
        self.config = config
        self.mesh = mesh
        data_dir, manual_dir = plan.reads()
        kwargs = {"manual_dir": manual_dir, "options": dict(plan.options)} if manual_dir else {}
        try:
            self.caches = input_pipeline.load_folds(
                data_dir or None,
                plan.builder_config if manual_dir else (plan.tfds_config or plan.builder_config),
                fold,
                int(config.image_size),
                config.resize,
                validation_fraction=float(config.val_fraction),
                validation_seed=int(config.seed),
                dataset=plan.dataset,
                log=logging.info,
                **kwargs,
            )
        except datasets.DatasetError as e:  # e.g. an image of the raw tree that does not decode
            raise UserError(f"config.manual_dir: {e}") from None
        train = self.caches["train"]
        # What the data means travels with it (the build's metadata.json or the reader).
        self.taxonomy, self.grouping, self.warnings = train.taxonomy, train.grouping, train.warnings
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
        """{index: {file_name, group_id}} of this process's share of `split`."""
        c = self.caches[split]
        return {
            int(i): {"file_name": str(f), "group_id": str(k)}
            for i, f, k in zip(c.index, c.file_name, c.group_id, strict=True)
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
