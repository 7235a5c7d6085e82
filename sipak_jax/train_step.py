"""The update step and what it updates: model, optimizer, `TrainState`, metrics, eval step.

- `create_model(config, num_classes, seed)`: the configured model of any family
  (`config.model.name`, `sipak_jax.models.registry`; float32 parameters,
  `config.compute_dtype` computation, `config.model.drop_path` stochastic depth).
- `make_optimizer(config, steps_per_epoch, model=None) -> (tx, schedules)`: global-norm
  clipping, then AdamW per group (the `fc` head and the backbone) with its own schedule; during
  the first `head_epochs` only the head learns. With `config.optimizer.layer_decay` < 1 each
  parameter's update is scaled by `layer_decay ** (model.num_layer_ids - 1 -
  model.layer_id(path))` (layer-wise learning-rate decay, BEiT / ConvNeXt fine-tuning).
- `TrainState`: step, parameters, BatchNorm statistics, optimizer state and the non-finite
  streak, all replicated over the mesh. `init_state(...)` builds it from host values.
- `make_train_step(...)`: the pure update (state, metrics, batch) -> (state, metrics) that the
  trainer jits once over the mesh. Augmentation and normalisation run inside it on uint8
  batches. A non-finite loss or gradient leaves parameters, optimizer state and BatchNorm
  statistics untouched and counts in `nonfinite_streak` / `max_streak`.
- `make_eval_step(...)`: (params, batch_stats, batch) -> (float32 logits, label, mask, index).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sipak_jax import augment, preprocessing
from sipak_jax.models import registry

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ---- Model -----------------------------------------------------------------------------------


def create_model(config, num_classes: int, *, seed: int) -> nnx.Module:
    """The configured model (`config.model`, any registry family), randomly initialised
    (float32 parameters)."""
    m = config.model
    return registry.create(
        registry.training_config(m, num_classes),
        dtype=DTYPES[config.compute_dtype],
        dropout_rate=float(m.dropout_rate),
        drop_path=float(m.get("drop_path", 0.0) or 0.0),
        seed=seed,
    )


# ---- Optimizer -------------------------------------------------------------------------------


def _is_head(path) -> bool:
    """The new head: the classifier `fc` and, with `model.head='attention'`, its pool."""
    return jax.tree_util.keystr(path).startswith(("['fc']", "['attention_pool']"))


# Multi-dimensional parameters that are not weights: a ViT's position embeddings and class
# token (timm's `no_weight_decay()`, MAE / BEiT fine-tuning).
_NO_DECAY = frozenset({"pos_embed", "cls_token"})


def _decays(path, leaf) -> bool:
    """Weight decay on kernels only (not on biases, normalisation scales and biases, nor
    `_NO_DECAY`)."""
    names = {str(getattr(k, "key", k)) for k in path}
    return jnp.ndim(leaf) > 1 and not names & _NO_DECAY


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


def layer_decay_scales(model, decay: float):
    """A function (param path tuple, leaf) -> the update scale of that parameter:
    `decay ** (model.num_layer_ids - 1 - model.layer_id("a/b/c"))` (the head 1, the stem
    the smallest)."""
    top = model.num_layer_ids - 1

    def scale(path, _):
        return float(decay) ** (top - model.layer_id(_path_str(path)))

    return scale


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def scale_by_layer(scale_fn) -> optax.GradientTransformation:
    """Multiplies each update by `scale_fn(path, leaf)` (a Python float per parameter)."""

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda p, u: u * jnp.asarray(scale_fn(p, u), u.dtype), updates
        )
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config, steps_per_epoch: int, model=None):
    """Clipping, then AdamW per group (head / backbone) with its own schedule, then the
    layer-wise decay of `config.optimizer.layer_decay` (needs `model`'s layer ids)."""

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
    layer_decay = float(config.optimizer.layer_decay) if "optimizer" in config else 1.0
    if layer_decay != 1.0:
        if model is None:
            raise ValueError("config.optimizer.layer_decay != 1 needs the model's layer ids")
        parts.append(scale_by_layer(layer_decay_scales(model, layer_decay)))
    return optax.chain(*parts), schedules


# ---- State and metrics -----------------------------------------------------------------------


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


def replicate(tree, mesh):
    """Host values (equal on every process) -> global arrays replicated over `mesh`."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def init_state(params: dict, batch_stats: dict, tx, mesh) -> TrainState:
    """Step 0: host parameters and statistics replicated, the optimizer state built on the
    mesh."""
    params = replicate(params, mesh)
    return TrainState(
        step=replicate(np.int32(0), mesh),  # three buffers: the step donates each one
        params=params,
        batch_stats=replicate(batch_stats, mesh),
        opt_state=jax.jit(tx.init, out_shardings=NamedSharding(mesh, P()))(params),
        nonfinite_streak=replicate(np.int32(0), mesh),
        max_streak=replicate(np.int32(0), mesh),
    )


def _merge_dicts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_dicts(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def split_like(tree: dict, like: dict) -> dict:
    """The sub-tree of `tree` with the keys of `like` (the inverse of merging two dicts)."""
    return {
        k: (split_like(tree[k], v) if isinstance(v, dict) else tree[k]) for k, v in like.items()
    }


def model_dict(state: TrainState) -> dict:
    """The checkpoint's `model` item: parameters and BatchNorm statistics, one pure dict."""
    return _merge_dicts(state.params, state.batch_stats)


def with_model_dict(state: TrainState, model: dict) -> TrainState:
    """`state` with the parameters and statistics of a checkpoint's `model` item."""
    return state.replace(
        params=split_like(model, state.params), batch_stats=split_like(model, state.batch_stats)
    )


# ---- Update step -----------------------------------------------------------------------------


def _classify_frozen(model, x):
    """Logits with no gradient into the features (a ViT's class token travels beside its
    token grid: `features_with_context`)."""
    if hasattr(model, "features_with_context"):
        h, context = jax.lax.stop_gradient(model.features_with_context(x))
        return model.classify(h, model.num_stages, context)
    return model.classify(jax.lax.stop_gradient(model.features(x)))


def _make_loss_fn(config, graphdef, rest, *, head_only: bool):
    """(params, batch_stats, x, targets, dropout key) -> (loss, (logits, new batch_stats)).
    `head_only` runs the backbone in inference mode under stop_gradient (frozen, BatchNorm
    statistics untouched)."""
    m = config.model
    has_dropout = float(m.dropout_rate) > 0 or float(m.get("drop_path") or 0.0) > 0

    def loss_fn(params, batch_stats, x, targets, drop_key):
        # copy=True: fresh Variables inside this trace; `reseed` may not mutate the RNG state's
        # own Variables, created outside it (flax TraceContextError with dropout or drop_path).
        model = nnx.merge(graphdef, params, batch_stats, *rest, copy=True)
        if has_dropout:
            nnx.reseed(model, dropout=drop_key)
        if head_only:
            model.eval()
            logits = _classify_frozen(model, x)
        else:
            model.train()
            logits = model(x)
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
        return loss, (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    return loss_fn


def _step_metrics(loss, logits, labels, grad_norm, ok) -> TrainMetrics:
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))

    def avg(v, mask=ok[None]):
        return clu_metrics.Average.from_model_output(v[None], mask=mask)

    return TrainMetrics.empty().replace(
        loss=avg(loss),
        accuracy=avg(accuracy),
        grad_norm=avg(grad_norm),
        skipped=avg((~ok).astype(jnp.float32), None),
    )


def make_train_step(config, graphdef, rest, tx, spec, *, head_only: bool, num_classes: int):
    """The pure update: (state, metrics, batch) -> (state, metrics)."""
    base_key = jax.random.key(int(config.seed))
    augment_fn = augment.make_augment(tuple(config.augment))
    dtype = DTYPES[config.compute_dtype]
    smoothing = float(config.label_smoothing)
    loss_fn = _make_loss_fn(config, graphdef, rest, head_only=head_only)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state: TrainState, train_metrics, batch):
        aug_key, drop_key = jax.random.split(jax.random.fold_in(base_key, state.step))
        x = preprocessing.normalize(augment_fn(aug_key, batch["image"]), spec, dtype=dtype)
        labels = batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
        (loss, (logits, new_stats)), grads = grad_fn(
            state.params, state.batch_stats, x, targets, drop_key
        )
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)

        def keep_if_ok(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
        new_state = TrainState(
            step=state.step + 1,
            params=keep_if_ok(optax.apply_updates(state.params, updates), state.params),
            batch_stats=keep_if_ok(new_stats, state.batch_stats),
            opt_state=keep_if_ok(new_opt, state.opt_state),
            nonfinite_streak=streak,
            max_streak=jnp.maximum(state.max_streak, streak),
        )
        step_metrics = _step_metrics(loss, logits, labels, grad_norm, ok)
        return new_state, train_metrics.merge(step_metrics)

    return step_fn


def make_eval_step(config, graphdef, rest, spec):
    """(params, batch_stats, batch) -> (logits float32, label, mask, index), inference mode."""
    dtype = DTYPES[config.compute_dtype]

    def eval_fn(params, batch_stats, batch):
        model = nnx.merge(graphdef, params, batch_stats, *rest)
        model.eval()
        logits = model(preprocessing.normalize(batch["image"], spec, dtype=dtype))
        return logits.astype(jnp.float32), batch["label"], batch["mask"], batch["index"]

    return eval_fn


def jit_steps(config, graphdef, rest, tx, spec, mesh, batch_sharding, *, num_classes, head):
    """(full train step, head-only train step or None, eval step), jitted over `mesh`: the
    state replicated and donated, the batch sharded."""
    replicated = NamedSharding(mesh, P())

    def train_step(head_only):
        fn = make_train_step(
            config, graphdef, rest, tx, spec, head_only=head_only, num_classes=num_classes
        )
        return jax.jit(
            fn,
            in_shardings=(replicated, replicated, batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=(0, 1),
        )

    eval_step = jax.jit(
        make_eval_step(config, graphdef, rest, spec),
        in_shardings=(replicated, replicated, batch_sharding),
        out_shardings=replicated,
    )
    return train_step(False), (train_step(True) if head else None), eval_step
