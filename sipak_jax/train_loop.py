"""The training loop: steps, then periodic actions after each, in the style of clu's
`periodic_actions` (which need TensorFlow through clu's writers; these do not).

`train_loop(run, writer) -> Loop` runs `run.full_step` (or `run.head_step` during the
head-only epochs) from `run.start_step` to the end, and after every step calls, in order:

- `LogTrainMetrics` (every `config.log_every_steps` and at epoch ends): reads the metrics
  accumulated on device, writes them with the learning rates; `config.max_nonfinite_steps`
  non-finite losses in a row stop the run (`NonFiniteLossError`, no checkpoint holds them);
- `Validate` (epoch ends): the validation split, its scalars and confusion-matrix image;
- `Overlays` (epoch ends): saliency overlays of fixed validation cells (`config.overlay_method`);
- `Checkpoint` (epoch ends, with the validation macro-F1, and every
  `config.checkpoint_every_steps`);
- `EpochLine` (epoch ends): the console line `epoch k/N  train loss .. acc ..  val macro-F1 ..
  best .. (epoch j)  NNN img/s  ETA mm:ss` and the epoch's timing;
- `Heartbeat` (at most once a minute, only when an epoch is slow): `step k/N` with the ETA;
- `Profile` (`config.profile_steps` steps after 10 steps of warm-up): a jax.profiler trace.

SIGTERM saves a checkpoint and stops between steps (with several processes, all agree at log
steps and epoch ends); `Loop.stopped` names the signal. Only process 0 prints and writes.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from sipak_jax import checkpointing, console, evaluation, metrics
from sipak_jax.console import UserError
from sipak_jax.train_setup import Run
from sipak_jax.train_step import TrainState, model_dict


class NonFiniteLossError(UserError):
    """The loss was NaN or Inf for `max_nonfinite_steps` steps in a row."""


@dataclasses.dataclass
class Loop:
    """What the loop and its actions share."""

    run: Run
    writer: Any
    state: TrainState
    metrics: Any
    step: int
    val: dict | None = None  # the last validation summary
    best: tuple[float, int] | None = None  # (validation macro-F1, epoch)
    epoch_sums: dict = dataclasses.field(default_factory=dict)  # host totals for the line
    timing: dict = dataclasses.field(
        default_factory=lambda: {
            "data_wait_s": 0.0,
            "dispatch_s": 0.0,
            "first_step_s": None,
            "epochs": [],
        }
    )
    t_epoch: float = 0.0  # when this epoch's timed training began
    step_at_t_epoch: int = 0
    t_train_end: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    stopped: str | None = None

    @property
    def epoch_end(self) -> bool:
        return self.step % self.run.steps_per_epoch == 0

    @property
    def epoch(self) -> int:
        return self.step // self.run.steps_per_epoch

    @property
    def last_step(self) -> bool:
        return self.step == self.run.total_steps

    @property
    def sync_point(self) -> bool:
        return self.step % int(self.run.config.log_every_steps) == 0 or self.epoch_end


# ---- Periodic actions ------------------------------------------------------------------------


class PeriodicAction:
    """Calls `apply(loop)` every `every_steps` steps and/or at epoch ends."""

    def __init__(self, every_steps: int = 0, at_epoch_end: bool = True):
        self.every_steps = int(every_steps)
        self.at_epoch_end = at_epoch_end

    def due(self, loop: Loop) -> bool:
        if self.at_epoch_end and loop.epoch_end:
            return True
        return self.every_steps > 0 and loop.step % self.every_steps == 0

    def __call__(self, loop: Loop) -> None:
        if self.due(loop):
            self.apply(loop)

    def apply(self, loop: Loop) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LogTrainMetrics(PeriodicAction):
    def due(self, loop):
        return super().due(loop) or loop.last_step

    def apply(self, loop):
        host = jax.device_get(loop.metrics)
        step, schedules = loop.step, loop.run.schedules
        scalars = {}
        for name in ("loss", "accuracy", "grad_norm", "skipped"):
            m = getattr(host, name)  # an Average; all steps skipped: no loss to show
            scalars[f"train/{name}"] = float(m.total / m.count) if m.count else float("nan")
        scalars["train/learning_rate"] = float(schedules["backbone"](step - 1))
        scalars["train/head_learning_rate"] = float(schedules["head"](step - 1))
        loop.writer.write_scalars(step, scalars)
        for name in ("loss", "accuracy"):
            m = getattr(host, name)
            total, count = loop.epoch_sums.get(name, (0.0, 0.0))
            loop.epoch_sums[name] = (total + float(m.total), count + float(m.count))
        loop.metrics = loop.run.empty_metrics()
        _check_nonfinite(loop)


def _check_nonfinite(loop: Loop) -> None:
    streak, limit = int(jax.device_get(loop.state.max_streak)), loop.run.config.max_nonfinite_steps
    if streak >= int(limit):
        ckpt = loop.run.ckpt
        raise NonFiniteLossError(
            f"the loss was NaN or Inf for {streak} steps in a row (limit "
            f"config.max_nonfinite_steps={limit}) before step {loop.step}; those updates were "
            "skipped and no checkpoint holds them. Lower config.learning_rate or check the "
            f"data; the last good checkpoint in {ckpt.directory} is step {ckpt.latest_step()}."
        )


class Validate(PeriodicAction):
    def apply(self, loop):
        run = loop.run
        loop.t_train_end = time.perf_counter()
        logits, labels = evaluation.run_eval(
            run.eval_step,
            loop.state,
            run.data.eval_batches("validation"),
            num_classes=run.taxonomy.num_classes,
        )
        loop.val = evaluation.eval_summary(logits, labels, run.taxonomy)
        loop.writer.write_scalars(loop.step, evaluation.eval_scalars(loop.val, "val"))
        image = metrics.confusion_matrix_image(
            loop.val["confusion_matrix"],
            run.taxonomy.class_names,
            as_float=True,
            title=f"validation, epoch {loop.epoch}",
        )
        loop.writer.write_images(loop.step, {"val/confusion_matrix": image[None]})
        f1 = float(loop.val["macro_f1"] or 0.0)
        if loop.best is None or f1 > loop.best[0]:  # ties: the earlier epoch, as pick_best_step
            loop.best = (f1, loop.epoch)


class Overlays(PeriodicAction):
    """Saliency overlays of the first `config.num_overlay_cells` validation cells, for their
    true class, after every epoch (process 0; an error disables them, never the run)."""

    def __init__(self, run: Run):
        super().__init__()
        self.n, self.method, self.fns = int(run.config.num_overlay_cells), None, None
        self.enabled = self.n > 0 and run.is_main
        if self.enabled:
            self.method = run.config.overlay_method
            self.images, self.labels = run.data.fixed_images("validation", self.n)
            self.enabled = len(self.images) > 0

    def apply(self, loop):
        if not self.enabled:
            return
        from sipak_jax.saliency import core, overlay

        model = loop.run.model(loop.state)
        if self.fns is None:
            self.fns = core.ModelFunctions(model)
        else:
            self.fns.update_state(model)
        try:
            images = overlay.overlay_batch(
                self.fns, self.images, loop.run.spec, self.method, target=self.labels
            )
        except Exception as e:  # noqa: BLE001 - an overlay must never stop training
            logging.warning("overlays disabled after an error: %r", e)
            self.enabled = False
            return
        loop.writer.write_images(loop.step, {f"val_overlays/{self.method}": np.asarray(images)})


def save_checkpoint(loop: Loop, *, force: bool) -> bool:
    run, val = loop.run, (None if not loop.epoch_end else loop.val)
    meta = {
        "step": loop.step,
        "epoch": loop.epoch,
        "fold": run.fold,
        "seed": int(run.config.seed),
        "data_position": loop.step,
        "steps_per_epoch": run.steps_per_epoch,
        "val_metrics": None if val is None else evaluation.brief(val),
    }
    score = None if val is None else {run.metadata.best_metric: meta["val_metrics"]["macro_f1"]}
    return run.ckpt.save(
        loop.step, model_dict(loop.state), loop.state.opt_state, meta, metrics=score, force=force
    )


def epoch_save_due(loop: Loop) -> bool:
    """An epoch end is saved when its validation is a new best, when it is the last, or every
    `config.checkpoint_every_epochs` epochs (0: only those two). The best checkpoint is never
    missed (every new best is saved); a crash loses at most that many epochs, replayed exactly
    on resume."""
    every = int(loop.run.config.checkpoint_every_epochs)
    new_best = loop.best is not None and loop.best[1] == loop.epoch
    return new_best or loop.last_step or (every > 0 and loop.epoch % every == 0)


class Checkpoint(PeriodicAction):
    def due(self, loop):
        return loop.epoch_end or loop.run.ckpt.should_save(loop.step)

    def apply(self, loop):
        t0 = time.perf_counter()
        loop.eval_s = t0 - loop.t_train_end if loop.epoch_end else 0.0
        if not loop.epoch_end:
            save_checkpoint(loop, force=False)
        elif epoch_save_due(loop):
            save_checkpoint(loop, force=True)
        loop.checkpoint_s = time.perf_counter() - t0


def saved_best(run: Run) -> tuple[float, int] | None:
    """(validation macro-F1, epoch) of the best saved checkpoint: where a resumed run's
    `Loop.best` starts."""
    by_step = run.ckpt.metrics_by_step()
    step = checkpointing.pick_best_step(by_step, run.metadata.best_metric)
    value = checkpointing.metric_value(by_step.get(step), run.metadata.best_metric)
    return None if value is None else (value, step // run.steps_per_epoch)


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class EpochLine(PeriodicAction):
    """The per-epoch console line (process 0) and the epoch's timing record."""

    def apply(self, loop):
        run, now = loop.run, time.perf_counter()
        train_s = loop.t_train_end - loop.t_epoch
        steps = loop.step - loop.step_at_t_epoch
        loop.timing["epochs"].append(
            {
                "epoch": loop.epoch,
                "steps": min(run.steps_per_epoch, loop.step - run.start_step),
                "train_s": round(train_s, 4),
                "eval_s": round(loop.eval_s, 4),
                "checkpoint_s": round(loop.checkpoint_s, 4),
            }
        )
        images_s = steps * int(run.config.batch_size) / max(train_s, 1e-9)
        loop.writer.write_scalars(loop.step, {"train/images_per_sec": images_s})
        # The first epoch's evaluation compiles: its time says nothing of the next ones.
        other_s = loop.eval_s + loop.checkpoint_s if len(loop.timing["epochs"]) > 1 else 0.0
        epoch_s = train_s / max(steps, 1) * run.steps_per_epoch + other_s
        if run.is_main:
            console.say(self._line(loop, images_s, epoch_s))
        loop.t_epoch, loop.step_at_t_epoch, loop.epoch_sums = now, loop.step, {}

    @staticmethod
    def _line(loop: Loop, images_s: float, epoch_s: float) -> str:
        run = loop.run
        num_epochs = int(run.config.num_epochs)

        def mean(name):
            total, count = loop.epoch_sums.get(name, (0.0, 0.0))
            return total / count if count else float("nan")

        head = "  (head only)" if loop.step <= run.head_steps else ""
        val_f1 = float(loop.val["macro_f1"] or 0.0) if loop.val else float("nan")
        best = f"best {loop.best[0]:.3f} (epoch {loop.best[1]})" if loop.best else ""
        eta = _clock(epoch_s * (num_epochs - loop.epoch))
        return (
            f"epoch {loop.epoch}/{num_epochs}  train loss {mean('loss'):.3f} acc "
            f"{mean('accuracy'):.3f}  val macro-F1 {val_f1:.3f}  {best}  {images_s:.0f} img/s  "
            f"ETA {eta}{head}"
        )


class Heartbeat(PeriodicAction):
    """`step k/N` at most once a minute, for epochs too slow for the epoch line alone."""

    def __init__(self, run: Run, every_secs: float = 60.0):
        super().__init__(at_epoch_end=False)
        self.every_secs, self.enabled = every_secs, run.is_main
        self.last = time.perf_counter()

    def due(self, loop):
        since = time.perf_counter() - max(self.last, loop.t_epoch)  # the epoch line resets it
        return self.enabled and since >= self.every_secs

    def apply(self, loop):
        now, run = time.perf_counter(), loop.run
        done = loop.step - loop.step_at_t_epoch
        rate = done / max(now - loop.t_epoch, 1e-9)
        eta = _clock((run.total_steps - loop.step) / max(rate, 1e-9))
        images_s = rate * int(run.config.batch_size)
        console.say(f"  step {loop.step}/{run.total_steps}  {images_s:.1f} img/s  ETA {eta}")
        self.last = now


class Profile(PeriodicAction):
    """A jax.profiler trace of `config.profile_steps` steps after 10 steps of warm-up, into
    `workdir/plugins/profile` (TensorBoard's profile tab; also as Perfetto JSON, which
    `benchmarks/profile_summary.py` reads); process 0 only."""

    def __init__(self, run: Run):
        super().__init__(at_epoch_end=False)
        n = int(run.config.profile_steps)
        self.window = (run.start_step + 10, run.start_step + 10 + n) if n and run.is_main else None
        self.logdir = os.path.join(run.workdir, "plugins", "profile")
        self.tracing = False

    def due(self, loop):
        return self.window is not None and loop.step in self.window

    def apply(self, loop):
        if loop.step == self.window[0] and not self.tracing:
            jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
            self.tracing = True
        elif self.tracing:
            self.close()

    def close(self):
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def default_actions(run: Run) -> list[PeriodicAction]:
    """The actions after each step, in the order they run."""
    return [
        LogTrainMetrics(every_steps=int(run.config.log_every_steps)),
        Validate(),
        Overlays(run),
        Checkpoint(),
        EpochLine(),
        Heartbeat(run),
        Profile(run),
    ]


# ---- Signals and the loop --------------------------------------------------------------------


class StopSignal:
    """SIGTERM sets a flag the loop checks between steps."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
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


def _train_step(loop: Loop, batches) -> None:
    run, t0 = loop.run, time.perf_counter()
    batch = next(batches)
    t1 = time.perf_counter()
    step_fn = run.head_step if loop.step < run.head_steps else run.full_step
    with jax.profiler.StepTraceAnnotation("train", step_num=loop.step):
        loop.state, loop.metrics = step_fn(loop.state, loop.metrics, batch)
    t2 = time.perf_counter()
    loop.timing["data_wait_s"] += t1 - t0
    loop.timing["dispatch_s"] += t2 - t1
    if loop.step == run.start_step:  # compilation, timed apart with one sync
        jax.block_until_ready(loop.state.step)
        loop.timing["first_step_s"] = time.perf_counter() - loop.t_epoch
        loop.t_epoch, loop.step_at_t_epoch = time.perf_counter(), loop.step + 1
    loop.step += 1


def train_loop(run: Run, writer, actions: list[PeriodicAction] | None = None) -> Loop:
    """Trains from `run.start_step` to the end (or a signal); returns the final `Loop`."""
    actions = default_actions(run) if actions is None else actions
    loop = Loop(run, writer, run.state, run.empty_metrics(), run.start_step)
    loop.best = saved_best(run) if run.start_step else None
    t_loop = loop.t_epoch = time.perf_counter()
    batches = run.data.train_batches(run.start_step)
    try:
        with StopSignal() as stop:
            while loop.step < run.total_steps:
                _train_step(loop, batches)
                for action in actions:
                    action(loop)
                if stop.should_stop(sync_point=loop.sync_point):
                    save_checkpoint(loop, force=True)
                    loop.stopped = stop.received or "signal"
                    break
    finally:
        batches.close()
        for action in actions:
            action.close()
    run.ckpt.wait()
    loop.timing["loop_s"] = time.perf_counter() - t_loop
    writer.flush()
    return loop
