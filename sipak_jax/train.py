"""Training and evaluation: `train_and_evaluate(config, workdir)`, the one call main.py makes.

Reads top to bottom in sections, as big_vision's trainer does: set-up, mesh, input, model,
optimizer, sharding and state, update step, checkpoint, evals, loop, final evaluation. What
it reads is prepared by `sipak_jax.train_data`; what it records at evaluation time is decided
by `sipak_jax.evaluation`; checkpoints go through `sipak_jax.checkpointing` and numbers through
`sipak_jax.writers`.

- One `jax.jit` step over a 1-D mesh `data` of every device of every process: the state
  (parameters, optimizer state, BatchNorm statistics) replicated `P()`, the batch sharded
  `P('data')`, the state donated. BatchNorm statistics are computed over the global batch.
- Augmentation (`sipak_jax.augment`) and normalisation run inside the step on uint8 batches;
  the step has no host sync. Training metrics accumulate on device in a clu `Collection` and
  are read every `log_every_steps`.
- A non-finite loss or gradient leaves parameters, optimizer state and BatchNorm statistics
  untouched; `max_nonfinite_steps` in a row stop the run (`NonFiniteLossError`).
- Randomness is a pure function of (seed, step), and the input pipeline can start at any
  step, so a run resumed from a checkpoint ends bitwise equal to an uninterrupted one (CPU).
- Every epoch: the validation split (grouped by cluster image, carved from the training
  folds) is evaluated; metrics, the confusion matrix image and Grad-CAM overlays of fixed
  validation cells go to the writer; a checkpoint is saved with `val_macro_f1`.
- At the end, the best checkpoint (validation macro-F1) is evaluated once on the test fold:
  `DIR/results.json` (metrics, confusion matrix, calibration, per-example predictions), the
  temperature in `DIR/metadata.json`, `DIR/reliability.png`, and `DIR/report.html`.
- `config.fold = 'all'` trains the five folds in `DIR/fold<k>/` and writes
  `DIR/cv_results.json` and `DIR/cv_results.md` (mean and standard deviation over folds).
"""

import contextlib
import os
import signal
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sipak_jax import augment, checkpointing, classes, evaluation, metrics, preprocessing, writers
from sipak_jax.models import ResNet
from sipak_jax.train_data import Data, prepare_dataset

METADATA_FORMAT = "sipak_jax.model/1"
BEST_METRIC = checkpointing.BEST_METRIC
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or Inf for `max_nonfinite_steps` steps in a row."""


# =============================================================================================
# Entry point.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains on the configured fold(s) and evaluates the best checkpoint on the test fold.

    Returns the `results.json` dict (or, for `fold='all'`, the cross-validation summary).
    """
    _check_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if str(config.fold) != "all":
        return train_one_fold(config, workdir, int(config.fold))
    results = []
    for fold in range(int(config.num_folds)):
        fold_config = config.copy_and_resolve_references()
        with fold_config.unlocked():
            fold_config.fold = str(fold)
        logging.info("=== fold %d of %d ===", fold, config.num_folds)
        result = train_one_fold(fold_config, os.path.join(workdir, f"fold{fold}"), fold)
        if result.get("stopped_early"):
            logging.warning("fold %d stopped before the end; cross-validation paused", fold)
            return {"stopped_early": True, "fold": fold}
        results.append(result)
    summary = evaluation.summarize_folds(results)
    if jax.process_index() == 0:
        evaluation.write_json(os.path.join(workdir, "cv_results.json"), summary)
        with open(os.path.join(workdir, "cv_results.md"), "w") as f:
            f.write(summary["table"])
    logging.info("cross-validation over %d folds:\n%s", len(results), summary["table"])
    return summary


def _check_config(config):
    fold = str(config.fold)
    if fold != "all" and (not fold.isdigit() or not 0 <= int(fold) < int(config.num_folds)):
        raise ValueError(
            f"config.fold must be 0..{config.num_folds - 1} or 'all', got {config.fold!r}"
        )
    if config.compute_dtype not in _DTYPES:
        raise ValueError(
            f"config.compute_dtype must be one of {sorted(_DTYPES)}, got {config.compute_dtype!r}"
        )
    if config.head_epochs >= config.num_epochs and config.num_epochs > 0:
        raise ValueError(
            f"config.head_epochs ({config.head_epochs}) must be smaller than config.num_epochs "
            f"({config.num_epochs}): the whole network must train for at least one epoch"
        )
    augment.build_ops(tuple(config.augment))  # a misspelt op fails now, not after set-up


# =============================================================================================
# Mesh.


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh `data` over every device of every process (Auto axis: gathers allowed)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


# =============================================================================================
# Model.


def create_model(config, num_classes: int, *, seed: int) -> ResNet:
    """The configured ResNet, randomly initialised (float32 parameters)."""
    m = config.model
    return ResNet(
        int(m.depth),
        num_classes,
        variant=m.variant,
        width=int(m.width),
        dropout_rate=float(m.dropout_rate),
        dtype=_DTYPES[config.compute_dtype],
        stage_sizes=tuple(m.stage_sizes) if m.stage_sizes else None,
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
    )


def _init_weights(config, model) -> tuple[dict, dict | None]:
    """Loads `config.init_from` (all but the head) into `model`; returns (preprocessing spec,
    source info). From scratch: the 'scratch' normalisation."""
    if not config.init_from:
        spec = preprocessing.spec_for("scratch", config.image_size, config.resize)
        return spec, None
    from sipak_jax import model_io

    source = os.path.expanduser(config.init_from)
    summary = model_io.init_from(model, source)
    meta = summary["metadata"]
    spec = dict(meta.get("preprocessing") or {})
    preprocessing.validate_spec(spec)  # the weights' own normalisation
    spec.update(image_size=int(config.image_size), resize=config.resize)
    logging.info(
        "init_from %s: %d tensors loaded, kept %s", source, summary["loaded"], summary["kept"]
    )
    return spec, {"init_from": source, "source": meta.get("source"), "loaded": summary["loaded"]}


# =============================================================================================
# Optimizer.


def _is_head(path) -> bool:
    return jax.tree_util.keystr(path).startswith("['fc']")


def _decays(path, leaf) -> bool:
    """Weight decay on kernels only (not on biases nor BatchNorm scale/bias)."""
    return jnp.ndim(leaf) > 1


def make_schedules(config, steps_per_epoch: int) -> dict:
    """Learning-rate schedules of the head and the backbone (functions of the step)."""
    total = int(config.num_epochs) * steps_per_epoch
    head_steps = int(config.head_epochs) * steps_per_epoch
    full_steps = max(total - head_steps, 1)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), full_steps - 1)
    full = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=max(warmup, 0),
        decay_steps=full_steps,
        end_value=config.learning_rate * config.end_learning_rate_factor,
    )
    if head_steps == 0:
        return {"head": full, "backbone": full}
    head = optax.join_schedules(
        [optax.constant_schedule(config.head_learning_rate), full], [head_steps]
    )
    backbone = optax.join_schedules([optax.constant_schedule(0.0), full], [head_steps])
    return {"head": head, "backbone": backbone}


def make_optimizer(config, steps_per_epoch: int):
    """Clipping, then AdamW per group (head / backbone) with its own schedule."""

    def group(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "head" if _is_head(p) else "backbone", params
        )

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(_decays, params)

    schedules = make_schedules(config, steps_per_epoch)
    groups = {
        name: optax.adamw(sched, weight_decay=config.weight_decay, mask=decay_mask)
        for name, sched in schedules.items()
    }
    parts = []
    if config.grad_clip_norm and config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.partition(groups, group))
    return optax.chain(*parts), schedules


# =============================================================================================
# Sharding and state.


@flax.struct.dataclass
class TrainState:
    """Everything the update step changes (all replicated over the mesh)."""

    step: jax.Array
    params: Any  # pure dict (nnx.Param)
    batch_stats: Any  # pure dict (nnx.BatchStat)
    opt_state: Any
    nonfinite_streak: jax.Array  # non-finite steps in a row, now
    max_streak: jax.Array  # the longest such run since the last check


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Accumulated on device inside the step; skipped (non-finite) steps count only in
    `skipped`."""

    loss: clu_metrics.Average
    accuracy: clu_metrics.Average
    grad_norm: clu_metrics.Average
    skipped: clu_metrics.Average


def _replicate(tree, mesh):
    """Host values (equal on every process) -> global arrays replicated over `mesh`."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def _merge_dicts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_dicts(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def _split_like(tree: dict, like: dict) -> dict:
    """The sub-tree of `tree` with the keys of `like` (the inverse of `_merge_dicts`)."""
    return {
        k: (_split_like(tree[k], v) if isinstance(v, dict) else tree[k]) for k, v in like.items()
    }


def model_dict(state: TrainState) -> dict:
    """The checkpoint's `model` item: parameters and BatchNorm statistics, one pure dict."""
    return _merge_dicts(state.params, state.batch_stats)


# =============================================================================================
# Update step.


def make_train_step(config, graphdef, rest, tx, spec, *, head_only: bool, num_classes: int):
    """The pure update: (state, metrics, batch) -> (state, metrics). `head_only` runs the
    backbone in inference mode under stop_gradient (frozen, BatchNorm statistics untouched)."""
    base_key = jax.random.key(int(config.seed))
    augment_fn = augment.make_augment(tuple(config.augment))
    dtype = _DTYPES[config.compute_dtype]
    smoothing = float(config.label_smoothing)
    inject = jnp.asarray(tuple(config.inject_nonfinite_steps) or (-1,), jnp.int32)
    has_dropout = float(config.model.dropout_rate) > 0

    def step_fn(state: TrainState, train_metrics, batch):
        key = jax.random.fold_in(base_key, state.step)
        aug_key, drop_key = jax.random.split(key)
        images = augment_fn(aug_key, batch["image"])
        x = preprocessing.normalize(images, spec, dtype=dtype)
        labels = batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.batch_stats, *rest)
            if has_dropout:
                nnx.reseed(model, dropout=drop_key)
            if head_only:
                model.eval()
                logits = model.classify(jax.lax.stop_gradient(model.features(x)))
            else:
                model.train()
                logits = model(x)
            loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
            loss = loss * jnp.where(jnp.isin(state.step, inject), jnp.nan, 1.0)
            new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
            return loss, (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        def keep_if_ok(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
        new_state = TrainState(
            step=state.step + 1,
            params=keep_if_ok(new_params, state.params),
            batch_stats=keep_if_ok(new_stats, state.batch_stats),
            opt_state=keep_if_ok(new_opt, state.opt_state),
            nonfinite_streak=streak,
            max_streak=jnp.maximum(state.max_streak, streak),
        )
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        mask = ok[None]

        def avg(v, m=mask):
            return clu_metrics.Average.from_model_output(v[None], mask=m)

        step_metrics = TrainMetrics.empty().replace(
            loss=avg(loss),
            accuracy=avg(accuracy),
            grad_norm=avg(grad_norm),
            skipped=avg((~ok).astype(jnp.float32), None),
        )
        return new_state, train_metrics.merge(step_metrics)

    return step_fn


def make_eval_step(config, graphdef, rest, spec):
    """(params, batch_stats, batch) -> (logits float32, label, mask, index), inference mode."""
    dtype = _DTYPES[config.compute_dtype]

    def eval_fn(params, batch_stats, batch):
        model = nnx.merge(graphdef, params, batch_stats, *rest)
        model.eval()
        logits = model(preprocessing.normalize(batch["image"], spec, dtype=dtype))
        return logits.astype(jnp.float32), batch["label"], batch["mask"], batch["index"]

    return eval_fn


# =============================================================================================
# Checkpoint (sipak_jax.checkpointing) and the run's metadata.


class _StopSignal:
    """SIGTERM (and SIGINT when asked) set a flag the loop checks between steps."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM,):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint and stopping", self.received)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def should_stop(self, sync_point: bool) -> bool:
        """True when a signal arrived. With several processes all must stop at the same step,
        so they agree (a small all-gather) only at `sync_point`s (log steps, epoch ends)."""
        flag = self.received is not None
        if jax.process_count() > 1:
            if not sync_point:
                return False
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return flag


# =============================================================================================
# Loop.


class _Progress:
    """clu's ReportProgress and Profile when clu's writers are available, else a small
    stand-in that logs steps/s and ETA and traces with jax.profiler."""

    def __init__(self, config, workdir, writer, total_steps, start_step, use_clu):
        self.hooks = []
        self.report = None
        if use_clu:
            from clu import periodic_actions

            self.report = periodic_actions.ReportProgress(
                num_train_steps=total_steps, writer=writer, every_secs=30.0
            )
            self.hooks.append(self.report)
            if config.profile_steps and jax.process_index() == 0:
                self.hooks.append(
                    periodic_actions.Profile(
                        logdir=workdir,
                        num_profile_steps=int(config.profile_steps),
                        profile_duration_ms=None,
                        first_profile=start_step + 10,
                    )
                )
        else:
            self._writer = writer
            self._total = total_steps
            self._t0, self._s0 = time.time(), start_step
            self._last = time.time()
            self._profile = (
                (start_step + 10, start_step + 10 + int(config.profile_steps))
                if config.profile_steps and jax.process_index() == 0
                else None
            )
            self._workdir = workdir
            self._tracing = False

    def __call__(self, step: int):
        for hook in self.hooks:
            hook(step)
        if self.report is not None:
            return
        if self._profile and step == self._profile[0]:
            jax.profiler.start_trace(os.path.join(self._workdir, "plugins", "profile"))
            self._tracing = True
        if self._tracing and step >= self._profile[1]:
            jax.profiler.stop_trace()
            self._tracing = False
        now = time.time()
        if now - self._last >= 30.0 or step == self._total:
            rate = (step - self._s0) / max(now - self._t0, 1e-9)
            eta = (self._total - step) / max(rate, 1e-9)
            self._writer.write_scalars(step, {"steps_per_sec": rate})
            logging.info("step %d/%d, %.2f steps/s, ETA %.0f s", step, self._total, rate, eta)
            self._last = now

    def timed(self, name: str):
        if self.report is not None:
            return self.report.timed(name)
        return contextlib.nullcontext()

    def close(self):
        if self.report is None and self._tracing:
            jax.profiler.stop_trace()


def _flat_config(config) -> dict:
    out = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = v

    walk("", config.to_dict())
    return out


def train_one_fold(config, workdir: str, fold: int, *, final_state_callback=None) -> dict:
    """Trains with `fold` as the test fold; returns the results.json dict.

    `final_state_callback(state)`, if given, sees the last TrainState before the best
    checkpoint is restored (tests compare runs with it).
    """
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    if config.compilation_cache_dir:
        jax.config.update(
            "jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir)
        )
    is_main = jax.process_index() == 0
    class_names = list(classes.CLASS_NAMES)
    num_classes = len(class_names)

    # ---- Mesh -------------------------------------------------------------------------
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    logging.info(
        "mesh: %d devices over %d processes (%s)",
        jax.device_count(),
        jax.process_count(),
        jax.devices()[0].platform,
    )
    if config.batch_size % jax.device_count():
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the {jax.device_count()} "
            "devices of the mesh; choose a multiple"
        )

    # ---- Input ------------------------------------------------------------------------
    data_dir, manual_dir = prepare_dataset(config, workdir)
    data = Data(config, data_dir, manual_dir, fold, mesh)
    steps_per_epoch = data.steps_per_epoch
    total_steps = int(config.num_epochs) * steps_per_epoch
    head_steps = int(config.head_epochs) * steps_per_epoch
    logging.info(
        "fold %d: %d train, %d validation, %d test examples; %d steps per epoch",
        fold,
        data.num("train"),
        data.num("validation"),
        data.num("test"),
        steps_per_epoch,
    )

    # ---- Model ------------------------------------------------------------------------
    model = create_model(config, num_classes, seed=int(config.seed))
    spec, init_info = _init_weights(config, model)
    graphdef, params, batch_stats, *rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)

    metadata = {
        "format": METADATA_FORMAT,
        "kind": "training",
        "model": model.config(),
        "class_names": class_names,
        "preprocessing": spec,
        "source": init_info,
        "temperature": 1.0,
        "best_metric": BEST_METRIC,
        "fold": fold,
        "dataset": {
            "name": config.dataset,
            "config": config.dataset_config,
            "data_dir": data_dir,
            "manual_dir": manual_dir,
        },
    }
    del model

    # ---- Optimizer --------------------------------------------------------------------
    tx, schedules = make_optimizer(config, steps_per_epoch)

    # ---- Sharding and state -----------------------------------------------------------
    params = _replicate(params, mesh)
    batch_stats = _replicate(batch_stats, mesh)
    state = TrainState(
        step=_replicate(np.int32(0), mesh),
        params=params,
        batch_stats=batch_stats,
        opt_state=jax.jit(tx.init, out_shardings=replicated)(params),
        nonfinite_streak=_replicate(np.int32(0), mesh),
        max_streak=_replicate(np.int32(0), mesh),
    )
    empty_metrics = jax.jit(TrainMetrics.empty, out_shardings=replicated)  # fresh buffers

    # ---- Update step ------------------------------------------------------------------
    def jitted(head_only):
        fn = make_train_step(
            config, graphdef, rest, tx, spec, head_only=head_only, num_classes=num_classes
        )
        return jax.jit(
            fn,
            in_shardings=(replicated, replicated, data.batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=(0, 1),
        )

    full_step = jitted(False)
    head_step = jitted(True) if head_steps > 0 else None
    eval_step = jax.jit(
        make_eval_step(config, graphdef, rest, spec),
        in_shardings=(replicated, replicated, data.batch_sharding),
        out_shardings=replicated,
    )

    # ---- Checkpoint -------------------------------------------------------------------
    ckpt = checkpointing.Checkpointer(
        workdir,
        save_interval_steps=int(config.checkpoint_every_steps),
        async_save=bool(config.async_checkpoints),
    )
    start_step = 0
    latest = ckpt.latest_step()
    if latest is not None:
        restored_model, restored_opt, meta = ckpt.restore(
            latest, model_dict(state), state.opt_state, mesh
        )
        state = state.replace(
            step=_replicate(np.int32(meta["step"]), mesh),
            params=_split_like(restored_model, state.params),
            batch_stats=_split_like(restored_model, state.batch_stats),
            opt_state=restored_opt,
        )
        start_step = int(meta["step"])
        logging.info("resumed from checkpoint %d (epoch %d)", start_step, meta["epoch"])
    if is_main:
        evaluation.write_json(os.path.join(workdir, "metadata.json"), metadata)
        evaluation.write_json(os.path.join(workdir, "config.json"), config.to_dict())

    def save(step, epoch, *, val_metrics=None, force=False):
        meta = {
            "step": int(step),
            "epoch": int(epoch),
            "fold": fold,
            "seed": int(config.seed),
            "data_position": int(step),
            "steps_per_epoch": steps_per_epoch,
            "val_metrics": val_metrics,
        }
        orbax_metrics = None if val_metrics is None else {BEST_METRIC: val_metrics["macro_f1"]}
        return ckpt.save(
            step, model_dict(state), state.opt_state, meta, metrics=orbax_metrics, force=force
        )

    # ---- Writers ----------------------------------------------------------------------
    writer, use_clu = writers.create_writer(workdir, config.writer, just_logging=not is_main)
    if start_step == 0:
        writer.write_hparams(_flat_config(config))
    progress = _Progress(config, workdir, writer, total_steps, start_step, use_clu)
    overlay = _OverlayWriter(config, data, graphdef, rest, spec, writer)

    # ---- Loop -------------------------------------------------------------------------
    train_metrics = empty_metrics()
    stopped = None
    max_nonfinite = int(config.max_nonfinite_steps)
    # Host-side timing: the time blocked on the input pipeline, the time spent dispatching
    # steps, and per epoch the training time (up to the epoch-end metrics sync), eval and
    # checkpoint time. The first step (compilation) is timed apart, with one sync.
    timing = {"data_wait_s": 0.0, "dispatch_s": 0.0, "first_step_s": None, "epochs": []}
    train_iter = data.train_batches(start_step)
    t_loop = t_epoch = time.perf_counter()
    with _StopSignal() as stop:
        step = start_step
        while step < total_steps:
            t0 = time.perf_counter()
            batch = next(train_iter)
            t1 = time.perf_counter()
            step_fn = head_step if step < head_steps else full_step
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, train_metrics = step_fn(state, train_metrics, batch)
            t2 = time.perf_counter()
            timing["data_wait_s"] += t1 - t0
            timing["dispatch_s"] += t2 - t1
            if step == start_step:
                jax.block_until_ready(state.step)
                timing["first_step_s"] = time.perf_counter() - t_loop
                t_epoch = time.perf_counter()  # epoch timings exclude compilation
            step += 1
            progress(step)
            epoch_end = step % steps_per_epoch == 0
            log_step = step % int(config.log_every_steps) == 0 or epoch_end
            if log_step or step == total_steps:
                computed = jax.device_get(train_metrics.compute())
                streak = int(jax.device_get(state.max_streak))
                scalars = {f"train/{k}": float(v) for k, v in computed.items()}
                scalars["train/learning_rate"] = float(schedules["backbone"](step - 1))
                scalars["train/head_learning_rate"] = float(schedules["head"](step - 1))
                writer.write_scalars(step, scalars)
                train_metrics = empty_metrics()
                if streak >= max_nonfinite:
                    writer.flush()
                    ckpt.close()
                    raise NonFiniteLossError(
                        f"the loss was NaN or Inf for {streak} steps in a row (limit "
                        f"config.max_nonfinite_steps={max_nonfinite}) before step {step}; "
                        "those updates were skipped and no checkpoint holds them. Lower "
                        "config.learning_rate or check the data; the last good checkpoint "
                        f"in {ckpt.directory} is step {ckpt.latest_step()}."
                    )
            if epoch_end:
                epoch = step // steps_per_epoch
                t_train_end = time.perf_counter()
                with progress.timed("eval"):
                    logits, labels = evaluation.run_eval(
                        eval_step, state, data.eval_batches("validation")
                    )
                    summary = evaluation.eval_summary(logits, labels, class_names)
                    writer.write_scalars(step, evaluation.eval_scalars(summary, "val"))
                    cm_image = metrics.confusion_matrix_image(
                        summary["confusion_matrix"],
                        class_names,
                        as_float=True,
                        title=f"validation, epoch {epoch}",
                    )
                    writer.write_images(step, {"val/confusion_matrix": cm_image[None]})
                    overlay(step, state)
                t_eval_end = time.perf_counter()
                with progress.timed("checkpoint"):
                    save(step, epoch, val_metrics=evaluation.brief(summary), force=True)
                t_epoch_end = time.perf_counter()
                timing["epochs"].append(
                    {
                        "epoch": epoch,
                        "steps": min(steps_per_epoch, step - start_step),
                        "train_s": round(t_train_end - t_epoch, 4),
                        "eval_s": round(t_eval_end - t_train_end, 4),
                        "checkpoint_s": round(t_epoch_end - t_eval_end, 4),
                    }
                )
                t_epoch = t_epoch_end
            elif ckpt.should_save(step):
                with progress.timed("checkpoint"):
                    save(step, step // steps_per_epoch)
            if stop.should_stop(sync_point=log_step):
                with progress.timed("checkpoint"):
                    save(step, step // steps_per_epoch, force=True)
                stopped = stop.received or "signal"
                break
    train_iter.close()
    progress.close()
    ckpt.wait()
    timing["loop_s"] = time.perf_counter() - t_loop
    writer.flush()
    if stopped:
        ckpt.close()
        writer.close()
        logging.warning(
            "stopped by %s at step %d of %d; the checkpoint is saved: rerun the same command "
            "to resume",
            stopped,
            step,
            total_steps,
        )
        return {"stopped_early": True, "step": step, "signal": stopped}

    # ---- Final evaluation: the best checkpoint, once, on the test fold ----------------
    if final_state_callback is not None:
        final_state_callback(state)
    best = ckpt.best_step()
    if best is not None and best != int(jax.device_get(state.step)):
        restored_model, _, _ = ckpt.restore(best, model_dict(state), state.opt_state, mesh)
        state = state.replace(
            params=_split_like(restored_model, state.params),
            batch_stats=_split_like(restored_model, state.batch_stats),
        )
    best_meta = ckpt.restore_meta(best) if best is not None else {}
    ckpt.close()
    val_logits, val_labels = evaluation.run_eval(eval_step, state, data.eval_batches("validation"))
    test_logits, test_labels, test_index = evaluation.run_eval(
        eval_step, state, data.eval_batches("test"), with_index=True
    )
    results = evaluation.final_results(
        config,
        workdir,
        fold=fold,
        best_step=best,
        best_epoch=best_meta.get("epoch"),
        val=(val_logits, val_labels),
        test=(test_logits, test_labels, test_index),
        data=data,
        class_names=class_names,
        metadata=metadata,
    )
    results["timing"] = {
        "wall_s": round(time.time() - t_start, 2),
        "steps": total_steps - start_step,
        "batch_size": int(config.batch_size),
        "devices": jax.device_count(),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in timing.items()},
    }
    test_scalars = evaluation.eval_scalars(
        evaluation.eval_summary(test_logits, test_labels, class_names), "test"
    )
    writer.write_scalars(total_steps, test_scalars)
    cm_image = metrics.confusion_matrix_image(
        results["test"]["confusion_matrix"], class_names, as_float=True, title=f"test fold {fold}"
    )
    writer.write_images(total_steps, {"test/confusion_matrix": cm_image[None]})
    writer.flush()
    writer.close()
    if is_main:
        evaluation.write_json(os.path.join(workdir, "results.json"), results)
        if config.report:
            evaluation.write_report(workdir)
    logging.info(
        "fold %d: test accuracy %.4f, macro-F1 %.4f (best step %s); %s",
        fold,
        results["test"]["accuracy"] or 0.0,
        results["test"]["macro_f1"] or 0.0,
        best,
        os.path.join(workdir, "results.json"),
    )
    return results


# =============================================================================================
# Overlays (sipak_jax.saliency) of fixed validation cells.


class _OverlayWriter:
    """Writes saliency overlays (Grad-CAM by default) of the first `num_overlay_cells`
    validation cells after every epoch, for the true class (`sipak_jax.saliency.overlay`)."""

    def __init__(self, config, data, graphdef, rest, spec, writer):
        self.n = int(config.num_overlay_cells)
        self.enabled = self.n > 0 and jax.process_index() == 0
        self.method = config.overlay_method
        self.graphdef, self.rest, self.spec = graphdef, rest, spec
        self.writer = writer
        self.fns = None
        if self.enabled:
            self.images, self.labels = data.fixed_images("validation", self.n)
            self.enabled = len(self.images) > 0

    def __call__(self, step: int, state: TrainState):
        if not self.enabled:
            return
        from sipak_jax.saliency import core, overlay

        params, stats = jax.device_get((state.params, state.batch_stats))
        model = nnx.merge(self.graphdef, params, stats, *self.rest)
        model.eval()
        if self.fns is None:
            self.fns = core.ModelFunctions(model)
        else:
            self.fns.update_state(model)
        try:
            images = overlay.overlay_batch(
                self.fns, self.images, self.spec, self.method, target=self.labels
            )
        except Exception as e:  # noqa: BLE001 - an overlay must never stop training
            logging.warning("overlays disabled after an error: %r", e)
            self.enabled = False
            return
        self.writer.write_images(step, {f"val_overlays/{self.method}": np.asarray(images)})
