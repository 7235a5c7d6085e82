"""The best step: one rule (`pick_best_step`) for the trainer's Checkpointer, what orbax keeps,
`best_step(workdir)` and the model loaders."""

import numpy as np
import pytest

from sipak_jax import checkpointing
from sipak_jax.checkpointing import BEST_METRIC, pick_best_step


def _m(value):
    return {BEST_METRIC: value}


@pytest.mark.parametrize(
    "metrics_by_step, best",
    [
        ({}, None),
        ({5: _m(0.3)}, 5),
        ({1: _m(0.2), 2: _m(0.9), 3: _m(0.5)}, 2),
        # Ties: the earliest step, whatever the order of the dict.
        ({1: _m(0.2), 2: _m(0.9), 3: _m(0.9), 4: _m(0.9)}, 2),
        ({4: _m(0.9), 3: _m(0.9), 2: _m(0.1)}, 3),
        # Steps without the metric never beat a step with it, even when later.
        ({1: _m(0.1), 2: None, 3: {"val_loss": 0.1}, 4: {}}, 1),
        # A value that is not a finite number counts as missing.
        ({1: _m(0.1), 2: _m(float("nan")), 3: _m(float("inf")), 4: _m(None)}, 1),
        ({1: _m(0.4), 2: _m(np.float32(0.7)), 3: _m("0.5")}, 2),
        # No step has the metric: the latest.
        ({3: None, 1: None, 2: {"val_loss": 1.0}}, 3),
        ({7: _m(float("nan"))}, 7),
        # Negative scores are scores.
        ({1: _m(-2.0), 2: _m(-1.0), 3: None}, 2),
    ],
)
def test_pick_best_step(metrics_by_step, best):
    assert pick_best_step(metrics_by_step) == best


def test_pick_best_step_reads_the_named_metric():
    steps = {1: {"a": 0.1, "b": 0.9}, 2: {"a": 0.5, "b": 0.2}}
    assert pick_best_step(steps, "a") == 2
    assert pick_best_step(steps, "b") == 1
    assert pick_best_step(steps, "c") == 2  # nobody has it: the latest


def _save(ckpt, step, score):
    model = {"w": np.full((2,), float(step), np.float32)}
    metrics = None if score is None else _m(score)
    assert ckpt.save(step, model, {"count": np.int32(step)}, {"step": step}, metrics=metrics)


def test_checkpointer_keeps_and_picks_the_earliest_of_tied_best_steps(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
    for step, score in [(10, 0.5), (20, 0.8), (25, None), (30, 0.8), (40, 0.6)]:
        _save(ckpt, step, score)
    ckpt.wait()
    # Kept: the best step (the earlier of the tie) and the latest; 30 tied but came later.
    assert ckpt.all_steps() == [20, 40]
    assert ckpt.best_step() == 20
    assert ckpt.metrics_by_step() == {20: _m(0.8), 40: _m(0.6)}
    ckpt.close()
    assert checkpointing.best_step(str(tmp_path)) == 20
    assert checkpointing.best_step(str(tmp_path / "nowhere")) is None


def test_checkpointer_without_metrics_picks_the_latest(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
    assert ckpt.best_step() is None
    _save(ckpt, 1, None)
    _save(ckpt, 2, None)
    ckpt.wait()
    assert ckpt.best_step() == 2 == ckpt.latest_step()
    ckpt.close()
