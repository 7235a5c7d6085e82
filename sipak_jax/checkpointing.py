"""Training checkpoints: an orbax `CheckpointManager` over `DIR/checkpoints/`, and the one rule
that picks the best step.

Each checkpoint holds three items (the training-workdir format of docs/architecture.md):
`model` (`MODEL_ITEM`: the pure dict of the model's parameters and BatchNorm statistics, the
same tree as a converted-weights DIR), `opt_state` (the optax state) and `meta` (JSON: step,
epoch, fold, RNG seed, data position, validation metrics). Saves are asynchronous and atomic.

The best step: `pick_best_step(metrics_by_step, metric)` is the only function that chooses
one (the trainer, `Checkpointer.best_step`, `best_step(workdir)` and `sipak_jax.model_io`'s
loaders all call it): the highest `metric` (`BEST_METRIC`, validation macro-F1, unless a
model's metadata names another); ties go to the EARLIEST step (the same score reached sooner,
with less training); a step without the metric (an interval save, or a value that is not a
finite number) is chosen only when no step has it, and then the latest step is.

What is kept: the latest checkpoint and the best one (by that same rule, through an orbax
preservation policy that calls `pick_best_step`). Only checkpoints saved at the end of an
epoch carry metrics; interval saves in between carry none and are kept only while latest.

A checkpoint with a NaN or Inf anywhere is refused (`NonFiniteCheckpointError`): a run never
leaves one behind to resume from.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import checkpoint_managers as ocm

BEST_METRIC = "val_macro_f1"
MODEL_ITEM = "model"
ITEMS = (MODEL_ITEM, "opt_state", "meta")


class NonFiniteCheckpointError(RuntimeError):
    """Raised instead of writing a checkpoint whose arrays hold NaN or Inf."""


# ---------------------------------------------------------------------------------------------
# The best step.


def metric_value(metrics, metric: str = BEST_METRIC) -> float | None:
    """`metrics[metric]` as a float; None when it is absent or not a finite number."""
    if not isinstance(metrics, Mapping) or metrics.get(metric) is None:
        return None
    try:
        value = float(metrics[metric])
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def pick_best_step(
    metrics_by_step: Mapping[int, Mapping | None], metric: str = BEST_METRIC
) -> int | None:
    """The step with the highest `metric`; ties: the earliest step. Steps without the metric
    count only when no step has it: then the latest step. None when there are no steps."""
    if not metrics_by_step:
        return None
    scored = [
        (value, int(step))
        for step, metrics in metrics_by_step.items()
        if (value := metric_value(metrics, metric)) is not None
    ]
    if not scored:
        return max(int(step) for step in metrics_by_step)
    return min(scored, key=lambda vs: (-vs[0], vs[1]))[1]


@dataclasses.dataclass(frozen=True)
class _KeepBest:
    """orbax preservation policy: keeps the step `pick_best_step` chooses among the steps that
    carry the metric (so a tie keeps the earlier step, which orbax's `BestN` would delete)."""

    metric: str = BEST_METRIC

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        scored = {
            c.step: c.metrics
            for c in checkpoints
            if metric_value(c.metrics, self.metric) is not None
        }
        best = pick_best_step(scored, self.metric)
        return [c.step == best for c in checkpoints]


def _orbax_best_fn(metrics) -> float:
    """orbax's `best_fn` (orbax stores a step's metrics only when one is set). Nothing here
    selects with it: `pick_best_step` does."""
    value = metric_value(metrics)
    return float("-inf") if value is None else value


def checkpoint_dir(workdir: str) -> str:
    """`DIR/checkpoints`, absolute (orbax wants absolute paths)."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def all_finite(tree) -> bool:
    """True when every floating-point leaf of `tree` is finite (one device->host sync)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not leaves:
        return True
    return bool(jax.device_get(jnp.all(jnp.stack(leaves))))


class Checkpointer:
    """The manager for one training workdir.

    Args:
      workdir: the training workdir; checkpoints go to `workdir/checkpoints`.
      save_interval_steps: interval saves (in steps) between the end-of-epoch ones; 0 disables.
      async_save: write in a background thread (the default; `wait()` before reading).
      read_only: open an existing directory without saving (evaluation, `best_step`).
    """

    def __init__(
        self,
        workdir: str,
        *,
        save_interval_steps: int = 0,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = checkpoint_dir(workdir)
        policies = [ocm.LatestN(n=1), _KeepBest(BEST_METRIC)]
        save_policy = None
        if save_interval_steps and save_interval_steps > 0:
            save_policy = ocm.FixedIntervalPolicy(int(save_interval_steps))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            save_decision_policy=save_policy,
            best_fn=_orbax_best_fn,
            best_mode="max",
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
        self._interval = int(save_interval_steps or 0)

    # -- queries --------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def metrics_by_step(self) -> dict[int, dict | None]:
        """{step: the metrics saved with it (None for an interval save)} for every step."""
        return {int(step): self.manager.metrics(step) for step in self.manager.all_steps()}

    def best_step(self, metric: str = BEST_METRIC) -> int | None:
        """`pick_best_step` over the saved steps; None when there are none."""
        return pick_best_step(self.metrics_by_step(), metric)

    def all_steps(self):
        return list(self.manager.all_steps())

    def metrics(self, step: int):
        return self.manager.metrics(step)

    # -- save -----------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """True at the configured interval (orbax's `FixedIntervalPolicy`)."""
        return self._interval > 0 and step > 0 and self.manager.should_save(int(step))

    def save(self, step: int, model, opt_state, meta: dict, *, metrics=None, force=False) -> bool:
        """Saves (asynchronously) at the interval, or always with `force`; returns True if it
        saved. A step that exists already is not written again.

        `model` is the pure dict of parameters and BatchNorm statistics. Raises
        NonFiniteCheckpointError when any array is NaN or Inf.
        """
        if step in self.manager.all_steps():
            return False
        if not all_finite((model, opt_state)):
            raise NonFiniteCheckpointError(
                f"refusing to write checkpoint {step} in {self.directory}: the parameters or the "
                "optimizer state hold NaN or Inf"
            )
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        saved = self.manager.save(int(step), args=args, metrics=metrics, force=force)
        logging.info(
            "checkpoint %d %s (metrics %s)", step, "saved" if saved else "skipped", metrics
        )
        return saved

    # -- restore --------------------------------------------------------------------------
    def restore(self, step: int, model_target, opt_target, mesh):
        """Restores (model, opt_state, meta) of `step`, every array replicated on `mesh`.

        The targets give shapes and dtypes (arrays or ShapeDtypeStructs of any sharding): the
        restored arrays are placed on the current mesh, whatever device count wrote them.
        """
        replicated = NamedSharding(mesh, P())

        def abstract(x):
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated)

        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(jax.tree.map(abstract, model_target)),
            opt_state=ocp.args.StandardRestore(jax.tree.map(abstract, opt_target)),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(int(step), args=args)
        return out["model"], out["opt_state"], out["meta"]

    def restore_meta(self, step: int) -> dict:
        out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def best_step(workdir: str, metric: str = BEST_METRIC) -> int | None:
    """The best checkpoint's step of a training workdir (`pick_best_step`), or None."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.best_step(metric)
    finally:
        ckpt.close()
