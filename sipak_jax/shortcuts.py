"""Shortcut controls: how far crop size alone, or colour alone, predicts the cell's class.

SIPaKMeD's classes were imaged separately, so the slide background and the crop size differ
by class (crop size alone reached about 62% on a grouped sample of the real data).
A CNN can learn those instead of the cell's morphology. These controls train small classifiers
on the *same* folds as the CNN and score them on the same test fold with the same metrics
(`sipak_jax.metrics.classification_metrics`), so the report can set them beside the CNN:

- `size`: the original crop's height, width, aspect h/w and area (log-scaled for the linear
  model): what the crop's bounding box says, nothing about its pixels;
- `colour`: the crop's mean RGB and its background colour (the per-channel median of the
  outermost pixel ring, `preprocessing.border_colour`): what the stain and the slide say,
  nothing about shape or texture.

Each set is fit with two scikit-learn classifiers, a standardised multinomial logistic
regression and a histogram gradient-boosted tree ensemble (fixed seed), on every example of
the training folds (training + validation: these controls select no model), and evaluated on
the test fold.

Inputs are plain numpy arrays, so this module does not depend on the input pipeline:
`crop_stats(image)` gives one crop's numbers (call it on the original, un-resized crop);
`shortcut_controls(shapes, colours, labels, folds, test_fold, taxonomy=...)` (the model's
taxonomy, or its class names) returns the dict training writes
under `results.json["shortcuts"]`:

    {"test_fold": int, "num_train": int, "num_test": int,
     "features": {"size": [...names], "colour": [...names]},
     "controls": {"size": {"logistic_regression": <metrics>, "gradient_boosting": <metrics>},
                  "colour": {...}}}

where <metrics> is `classification_metrics` output on the test fold. scikit-learn is needed
(it is in requirements.txt); where it is missing (a lean accelerator image) the dict is
{"skipped": "<reason>"} instead, and the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sipak_jax.metrics import classification_metrics
from tfds_sipakmed.taxonomy import Taxonomy, as_taxonomy

SIZE_FEATURES = ("height", "width", "aspect_h_over_w", "area")
COLOUR_FEATURES = (
    "mean_r",
    "mean_g",
    "mean_b",
    "background_r",
    "background_g",
    "background_b",
)
CLASSIFIERS = ("logistic_regression", "gradient_boosting")

__all__ = [
    "CLASSIFIERS",
    "COLOUR_FEATURES",
    "SIZE_FEATURES",
    "colour_features",
    "crop_stats",
    "shortcut_controls",
    "size_features",
]


def crop_stats(image) -> dict:
    """One original crop (uint8 RGB [H, W, 3]) -> {"shape": (H, W), "colour": [6 floats]}.

    colour = mean R, G, B over the crop, then the background colour (median of the border
    ring, as `preprocessing.border_colour`)."""
    from sipak_jax.preprocessing import border_colour

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"crop_stats needs a uint8 RGB crop [H, W, 3], got {image.dtype} {image.shape}"
        )
    mean = image.reshape(-1, 3).mean(axis=0)
    border = border_colour(image).astype(np.float64)
    return {
        "shape": (int(image.shape[0]), int(image.shape[1])),
        "colour": [float(v) for v in np.concatenate([mean, border])],
    }


def size_features(shapes) -> np.ndarray:
    """Crop shapes [N, 2] (height, width) -> float64 [N, 4]: h, w, h/w, area."""
    s = np.asarray(shapes, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 2:
        raise ValueError(f"shapes must be [N, 2] (height, width), got shape {s.shape}")
    if np.any(s <= 0):
        raise ValueError("crop shapes must be positive")
    h, w = s[:, 0], s[:, 1]
    return np.stack([h, w, h / w, h * w], axis=1)


def colour_features(colours) -> np.ndarray:
    """Colour stats [N, 6] (mean RGB, background RGB; `crop_stats`) -> float64 [N, 6]."""
    c = np.asarray(colours, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != len(COLOUR_FEATURES):
        raise ValueError(f"colours must be [N, 6] ({', '.join(COLOUR_FEATURES)}), got {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("colours contain NaN or Inf")
    return c


def _classifiers(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    return {
        "logistic_regression": lambda log_cols: make_pipeline(
            FunctionTransformer(lambda x: _log_columns(x, log_cols)),
            StandardScaler(),
            LogisticRegression(max_iter=2000, C=1.0),
        ),
        "gradient_boosting": lambda log_cols: HistGradientBoostingClassifier(
            max_iter=100, learning_rate=0.1, random_state=seed
        ),
    }


def _log_columns(x, cols):
    x = np.array(x, dtype=np.float64, copy=True)
    if cols:
        x[:, cols] = np.log(x[:, cols])
    return x


def _fit_predict(model, x_train, y_train, x_test, num_classes):
    model.fit(x_train, y_train)
    probs_seen = model.predict_proba(x_test)
    # Classes absent from the training folds get probability 0 (keep class-index columns).
    probs = np.zeros((len(x_test), num_classes))
    probs[:, np.asarray(model.classes_, dtype=np.int64)] = probs_seen
    return probs


def shortcut_controls(
    shapes,
    colours,
    labels,
    folds,
    test_fold: int,
    *,
    taxonomy: Taxonomy | Sequence[str],
    seed: int = 0,
) -> dict:
    """Train the size-only and colour-only controls on folds != `test_fold`, score on it.

    Args:
      shapes: int [N, 2] original crop (height, width) of every example of every fold.
      colours: float [N, 6] mean RGB and background RGB of each original crop (`crop_stats`).
      labels: int [N] class indices.
      folds: int [N] fold of each example (the CNN's folds).
      test_fold: the held-out fold.
      taxonomy: the model's classes (`Taxonomy`, or the class names), for the metrics.
    Returns the `results.json["shortcuts"]` dict (module docstring).
    """
    taxonomy = as_taxonomy(taxonomy)
    labels = np.asarray(labels, dtype=np.int64)
    folds = np.asarray(folds)
    n = labels.shape[0]
    feats = {"size": size_features(shapes), "colour": colour_features(colours)}
    for name, f in feats.items():
        if f.shape[0] != n:
            raise ValueError(f"{name} features have {f.shape[0]} rows for {n} labels")
    if folds.shape != (n,):
        raise ValueError(f"folds must be [N] = [{n}], got {folds.shape}")
    test = folds == test_fold
    train = ~test
    if not test.any():
        raise ValueError(
            f"no example in test fold {test_fold} (folds present: {sorted(set(folds.tolist()))})"
        )
    if len(set(labels[train].tolist())) < 2:
        raise ValueError("the training folds hold fewer than two classes; cannot fit a control")
    try:
        makers = _classifiers(seed)
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    except ImportError as e:
        return {"skipped": f"scikit-learn is not installed ({e}); pip install scikit-learn"}

    log_cols = {"size": [0, 1, 2, 3], "colour": []}
    controls = {}
    # One thread: these fits are small, and OpenMP threads fighting over busy cores (training
    # runs beside them) made them ten times slower here.
    with threadpool_limits(1):
        for name, x in feats.items():
            controls[name] = {}
            for clf_name, make in makers.items():
                probs = _fit_predict(
                    make(log_cols[name]), x[train], labels[train], x[test], taxonomy.num_classes
                )
                controls[name][clf_name] = classification_metrics(labels[test], probs, taxonomy)
    return {
        "test_fold": int(test_fold),
        "num_train": int(train.sum()),
        "num_test": int(test.sum()),
        "features": {"size": list(SIZE_FEATURES), "colour": list(COLOUR_FEATURES)},
        "controls": controls,
    }
