"""Which epoch ends are saved (`train_loop.epoch_save_due`): every new best, the last epoch and
every `checkpoint_every_epochs`; so the best checkpoint (by `pick_best_step`) is always on disk.
"""

import types

import numpy as np
import pytest

from sipak_jax.checkpointing import BEST_METRIC, pick_best_step
from sipak_jax.train_loop import epoch_save_due

STEPS_PER_EPOCH = 3


def _saved_epochs(f1s, every):
    """Runs the loop's bookkeeping over per-epoch validation macro-F1s; the epochs saved."""
    run = types.SimpleNamespace(
        config=types.SimpleNamespace(checkpoint_every_epochs=every),
        steps_per_epoch=STEPS_PER_EPOCH,
        total_steps=STEPS_PER_EPOCH * len(f1s),
    )
    loop = types.SimpleNamespace(run=run, best=None, epoch=0, last_step=False)
    saved = []
    for epoch, f1 in enumerate(f1s, start=1):
        loop.epoch, loop.last_step = epoch, epoch == len(f1s)
        if loop.best is None or f1 > loop.best[0]:  # as train_loop.Validate
            loop.best = (f1, epoch)
        if epoch_save_due(loop):
            saved.append(epoch)
    return saved


def test_new_bests_the_interval_and_the_last_epoch_are_saved():
    f1s = [0.2, 0.5, 0.5, 0.4, 0.6, 0.6, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    assert _saved_epochs(f1s, every=5) == [1, 2, 5, 10, 12]
    assert _saved_epochs(f1s, every=0) == [1, 2, 5, 12]
    assert _saved_epochs(f1s, every=1) == list(range(1, 13))


@pytest.mark.parametrize("every", [0, 1, 3, 5])
def test_the_best_epoch_is_always_among_the_saved(every):
    rng = np.random.default_rng(every)
    for _ in range(200):
        f1s = list(np.round(rng.uniform(0, 1, rng.integers(1, 20)), 1))  # rounding makes ties
        saved = _saved_epochs(f1s, every)
        by_step = {e * STEPS_PER_EPOCH: {BEST_METRIC: f1s[e - 1]} for e in saved}
        all_steps = {(e + 1) * STEPS_PER_EPOCH: {BEST_METRIC: f} for e, f in enumerate(f1s)}
        assert pick_best_step(by_step) == pick_best_step(all_steps)
        assert saved[-1] == len(f1s)
