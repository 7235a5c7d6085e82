"""Shortcut controls: they learn what their features carry, and only from the training folds."""

import json

import numpy as np
import pytest

from sipak_jax.shortcuts import crop_stats, shortcut_controls
from tfds_sipakmed.taxonomy import SIPAKMED

K = SIPAKMED.num_classes


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    folds = rng.integers(0, 5, n)
    # Size carries the class (each class its own crop scale); colour is pure noise.
    side = 60 + 40 * labels + rng.integers(0, 15, n)
    shapes = np.stack([side, (side * rng.uniform(0.8, 1.2, n)).astype(int)], 1)
    colours = rng.uniform(0, 255, (n, 6))
    return shapes, colours, labels, folds


def test_size_control_learns_size_and_colour_control_is_at_chance():
    shapes, colours, labels, folds = _data()
    out = shortcut_controls(shapes, colours, labels, folds, test_fold=2, taxonomy=SIPAKMED)
    json.dumps(out, allow_nan=False)
    assert out["num_test"] == int((folds == 2).sum())
    assert out["num_train"] + out["num_test"] == len(labels)
    for clf in ("logistic_regression", "gradient_boosting"):
        size = out["controls"]["size"][clf]
        colour = out["controls"]["colour"][clf]
        assert size["num_examples"] == out["num_test"]
        assert size["accuracy"] > 0.9, clf
        assert colour["accuracy"] < 0.4, clf
        assert set(size) >= {
            "balanced_accuracy",
            "macro_f1",
            "confusion_matrix",
            "abnormal_vs_nilm",
            "view_2class",  # the taxonomy's views, as the CNN's metrics have them
        }
        assert size["abnormal_vs_nilm"]["tp"] + size["abnormal_vs_nilm"]["fn"] == int(
            np.isin(labels[folds == 2], SIPAKMED.abnormal_indices()).sum()
        )


def test_colour_control_learns_background():
    shapes, colours, labels, folds = _data(seed=1)
    rng = np.random.default_rng(1)
    shapes = rng.integers(50, 400, (len(labels), 2))  # size is noise now
    colours[:, 3:] = (40 * labels)[:, None] + rng.normal(0, 5, (len(labels), 3))
    out = shortcut_controls(shapes, colours, labels, folds, test_fold=0, taxonomy=SIPAKMED)
    assert out["controls"]["colour"]["gradient_boosting"]["accuracy"] > 0.9
    assert out["controls"]["size"]["gradient_boosting"]["accuracy"] < 0.4


def test_test_fold_is_never_trained_on():
    # In the test fold the size-to-class mapping is reversed: a control that saw it would
    # score well; one trained only on the other folds must score about zero.
    shapes, colours, labels, folds = _data(seed=2)
    test = folds == 4
    side = np.where(test, 60 + 40 * (K - 1 - labels), 60 + 40 * labels)
    shapes = np.stack([side, side], 1)
    out = shortcut_controls(shapes, colours, labels, folds, test_fold=4, taxonomy=SIPAKMED)
    middle = labels[test] == K // 2  # the middle class maps onto itself
    assert out["controls"]["size"]["gradient_boosting"]["accuracy"] <= middle.mean() + 0.05


def test_class_missing_from_training_folds():
    shapes, colours, labels, folds = _data(seed=3)
    keep = ~((labels == 1) & (folds != 3))  # Koilocytotic only in the test fold
    out = shortcut_controls(
        shapes[keep], colours[keep], labels[keep], folds[keep], test_fold=3, taxonomy=SIPAKMED
    )
    m = out["controls"]["size"]["logistic_regression"]
    assert m["per_class"]["Koilocytotic"]["recall"] == 0.0
    json.dumps(out, allow_nan=False)


def test_crop_stats_against_numpy():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    s = crop_stats(img)
    assert s["shape"] == (30, 20)
    np.testing.assert_allclose(s["colour"][:3], img.reshape(-1, 3).mean(0))
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    lower_median = np.sort(ring, 0)[(len(ring) - 1) // 2]  # the ring has an even length
    np.testing.assert_allclose(s["colour"][3:], lower_median)
    with pytest.raises(ValueError, match="uint8 RGB crop"):
        crop_stats(img[..., 0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shapes": np.ones((10, 3))}, r"\[N, 2\]"),
        ({"shapes": np.zeros((10, 2))}, "positive"),
        ({"colours": np.ones((10, 5))}, r"\[N, 6\]"),
        ({"folds": np.zeros(10)}, "no example in test fold 1"),
        ({"labels": np.zeros(10, int)}, "fewer than two classes"),
        ({"labels": np.zeros(9, int)}, "rows for 9 labels"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = {
        "shapes": np.full((10, 2), 50),
        "colours": np.ones((10, 6)),
        "labels": np.arange(10) % K,
        "folds": np.arange(10) % 2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        shortcut_controls(**args, test_fold=1, taxonomy=SIPAKMED)
