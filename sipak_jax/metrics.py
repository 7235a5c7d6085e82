"""Classification metrics, in numpy: the numbers every evaluation reports.

`classification_metrics(labels, probs, taxonomy)` is what training (validation after every
epoch, the test fold at the end), `predict`-based evaluations and the report all use, so that a
figure means the same thing everywhere. It needs only numpy (no scikit-learn, no TensorFlow: it runs
on accelerator machines that have neither); tests/test_metrics.py checks every number against
scikit-learn.

Conventions (each checked against scikit-learn in the tests):
- `labels` int [N] in `range(K)`; `probs` float [N, K] (softmax outputs, rows summing to 1).
  Pass only real examples: drop evaluation padding (the batch `mask`) before calling.
- The predicted class is `argmax(probs)` (lowest index on ties, like `np.argmax`).
- `confusion_matrix[i][j]` counts examples of true class i predicted as class j
  (sklearn.metrics.confusion_matrix with `labels=range(K)`).
- Undefined values are `None` (JSON `null`), never NaN, so that `json.dumps(strict)` works:
  a class's precision is None when it is never predicted; its recall is None when it has no
  example (support 0); its F1 = 2TP / (2TP + FP + FN) is None only when both are true; its
  one-vs-rest ROC-AUC is None when the labels hold no positive or no negative for it.
- `balanced_accuracy`: mean recall over the classes present in `labels`
  (sklearn.metrics.balanced_accuracy_score).
- `macro_f1`: mean F1 over the classes present in `labels` or predictions
  (sklearn.metrics.f1_score(average='macro', zero_division=0)).
- `roc_auc_macro`: mean of the defined one-vs-rest AUCs (with every class present this is
  sklearn.metrics.roc_auc_score(multi_class='ovr', average='macro')). Ties are handled as
  sklearn does (a tie counts one half).
- The classes, their grouped views and the abnormal set come from the model's taxonomy
  (`tfds_sipakmed.taxonomy.Taxonomy`, in the model metadata), never from one dataset's
  constants. Each view `V` of the taxonomy gives `view_V`: probabilities are summed per group
  (`taxonomy.view_labels(V)`) and the grouped prediction is the argmax of the summed
  probabilities (this can differ from mapping the class argmax when the mass is split). For
  SIPaKMeD these are `view_3class` (normal / benign / abnormal, the official grouping) and
  `view_2class` (normal, Metaplastic included, vs abnormal).
- `abnormal_vs_nilm`: abnormal (the taxonomy's `abnormal` classes) vs the rest (normal, NILM):
  the summed probabilities of the two, the call is the larger (normal on a tie);
  sensitivity = TP / (TP + FN) on abnormal cells, specificity = TN / (TN + FP) on normal
  cells, and the ROC-AUC of the summed abnormal probability. None, with a line in `notes`,
  when the taxonomy names no abnormal class (no clinical reading defined).

`confusion_matrix_image(cm, class_names)` renders a confusion matrix as a uint8 RGB image with
OpenCV (no matplotlib) for TensorBoard (`image / 255.0`, or `as_float=True`) and the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from tfds_sipakmed.taxonomy import NO_READING, Taxonomy, as_taxonomy

__all__ = [
    "binary_roc_auc",
    "classification_metrics",
    "confusion_matrix",
    "confusion_matrix_image",
    "abnormal_probabilities",
    "grouped_probabilities",
]


def _check_inputs(labels, probs, num_classes: int | None = None):
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, K], got shape {probs.shape}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must be [N] matching probs [N, K]: labels {labels.shape}, probs {probs.shape}"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError("labels must be integer class indices")
    labels = labels.astype(np.int64)
    k = probs.shape[1]
    if num_classes is not None and k != num_classes:
        raise ValueError(f"probs has {k} columns but there are {num_classes} class names")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}); got min {labels.min()}, max {labels.max()}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or Inf")
    return labels, probs


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """[K, K] int64 counts; row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, predictions), 1)
    return cm


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x with ties given their average rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values.
    boundaries = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])
    ranks_sorted = np.empty(len(x), dtype=np.float64)
    for start, stop in zip(boundaries[:-1], boundaries[1:], strict=True):
        ranks_sorted[start:stop] = 0.5 * (start + 1 + stop)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def binary_roc_auc(is_positive, scores) -> float | None:
    """ROC-AUC of `scores` for the boolean `is_positive`; None without both classes.

    The Mann-Whitney statistic with average ranks: equal to the trapezoidal area under the ROC
    curve that sklearn.metrics.roc_auc_score computes, ties included.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(is_positive.sum())
    n_neg = int(is_positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores)
    u = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def grouped_probabilities(probs, group_of_class: Sequence[int], num_groups: int) -> np.ndarray:
    """Sum class probabilities into groups: [N, K] -> [N, num_groups]."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.zeros((probs.shape[1], num_groups), dtype=np.float64)
    onehot[np.arange(probs.shape[1]), np.asarray(group_of_class)] = 1.0
    return probs @ onehot


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _mean_defined(values) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _view(labels, probs, group_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy and confusion matrix of a grouped view."""
    k = len(group_names)
    pred = np.argmax(probs, axis=1)
    cm = confusion_matrix(labels, pred, k)
    support = cm.sum(axis=1)
    recalls = [_ratio(cm[i, i], support[i]) for i in range(k)]
    return {
        "class_names": list(group_names),
        "accuracy": _ratio(np.trace(cm), cm.sum()),
        "balanced_accuracy": _mean_defined(recalls),
        "confusion_matrix": cm.tolist(),
    }


def abnormal_probabilities(probs, taxonomy: Taxonomy) -> np.ndarray:
    """[N, K] -> [N, 2]: the summed probabilities of (normal, abnormal), abnormal being the
    taxonomy's `abnormal` classes and normal all the others."""
    abnormal = set(taxonomy.abnormal_indices())
    groups = [int(i in abnormal) for i in range(taxonomy.num_classes)]
    return grouped_probabilities(probs, groups, 2)


def _grouped_view(labels, probs, taxonomy: Taxonomy, view: str) -> dict:
    groups = taxonomy.view_labels(view)
    names = taxonomy.view_names(view)
    grouped = grouped_probabilities(probs, groups, len(names))
    return _view(np.asarray(groups, dtype=np.int64)[labels], grouped, names)


def _abnormal_vs_normal(labels, probs, taxonomy: Taxonomy) -> dict:
    """Sensitivity, specificity and ROC-AUC of the abnormal-vs-normal call (module docstring)."""
    p2 = abnormal_probabilities(probs, taxonomy)
    truth = np.isin(labels, taxonomy.abnormal_indices())
    call = np.argmax(p2, axis=1) == 1
    tp, fn = int(np.sum(truth & call)), int(np.sum(truth & ~call))
    tn, fp = int(np.sum(~truth & ~call)), int(np.sum(~truth & call))
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "roc_auc": binary_roc_auc(truth, p2[:, 1]) if labels.size else None,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }


def _per_class(labels, probs, cm, class_names: Sequence[str]) -> dict:
    """{name: {precision, recall, f1, support, roc_auc}} from the confusion matrix."""
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    out = {}
    for i, name in enumerate(class_names):
        out[name] = {
            "precision": _ratio(tp[i], predicted[i]),
            "recall": _ratio(tp[i], support[i]),
            "f1": _ratio(2 * tp[i], 2 * tp[i] + (predicted[i] - tp[i]) + (support[i] - tp[i])),
            "support": int(support[i]),
            "roc_auc": binary_roc_auc(labels == i, probs[:, i]) if labels.size else None,
        }
    return out


def classification_metrics(labels, probs, taxonomy: Taxonomy | Sequence[str]) -> dict:
    """Every classification figure for one evaluation, as a JSON-serialisable dict.

    Args:
      labels: int [N], true class indices in the taxonomy's class order.
      probs: float [N, K], predicted probabilities (after softmax, and temperature if any).
      taxonomy: the model's `Taxonomy` (its metadata's), or just its K class names (then no
        grouped view and no abnormal-vs-normal figures).

    Returns:
      {"num_examples", "class_names", "accuracy", "balanced_accuracy", "macro_f1",
       "roc_auc_macro", "per_class": {name: {"precision", "recall", "f1", "support",
       "roc_auc"}}, "confusion_matrix": [[int]], "view_<V>" for each view V of the taxonomy
       (SIPaKMeD: "view_3class", "view_2class"), "abnormal_vs_nilm": {"sensitivity",
       "specificity", "roc_auc", "tp", "fn", "tn", "fp"} or None, "notes": [str]}.
      See the module docstring for the conventions; undefined values are None.
    """
    taxonomy = as_taxonomy(taxonomy)
    class_names = list(taxonomy.class_names)
    labels, probs = _check_inputs(labels, probs, len(class_names))
    n = labels.shape[0]
    pred = np.argmax(probs, axis=1) if n else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(labels, pred, len(class_names))
    per_class = _per_class(labels, probs, cm, class_names)
    out = {
        "num_examples": int(n),
        "class_names": class_names,
        "accuracy": _ratio(np.trace(cm), n),
        "balanced_accuracy": _mean_defined(c["recall"] for c in per_class.values()),
        "macro_f1": _mean_defined(c["f1"] for c in per_class.values()),
        "roc_auc_macro": _mean_defined(c["roc_auc"] for c in per_class.values()),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }
    for view in taxonomy.views:
        out[f"view_{view}"] = _grouped_view(labels, probs, taxonomy, view)
    out["abnormal_vs_nilm"] = None
    out["notes"] = []
    if taxonomy.abnormal:
        out["abnormal_vs_nilm"] = _abnormal_vs_normal(labels, probs, taxonomy)
    else:
        out["notes"].append(
            f"{NO_READING}: the model's taxonomy names no abnormal class, so the "
            "abnormal-vs-normal figures (sensitivity, specificity) are omitted."
        )
    return out


# ---------------------------------------------------------------------------------------------
# Confusion-matrix image.

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _blues(x: np.ndarray) -> np.ndarray:
    """Map x in [0, 1] to RGB uint8 from near-white to dark blue."""
    lo = np.array([247.0, 251.0, 255.0])
    mid = np.array([107.0, 174.0, 214.0])
    hi = np.array([8.0, 48.0, 107.0])
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)[..., None]
    rgb = np.where(x < 0.5, lo + (mid - lo) * (x / 0.5), mid + (hi - mid) * ((x - 0.5) / 0.5))
    return np.round(rgb).astype(np.uint8)


def _text_size(text: str, scale: float, thickness: int) -> tuple[int, int, int]:
    (w, h), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    return w, h, baseline


def _put_text(img, text, x, y, scale, color, thickness=1):
    cv2.putText(img, text, (int(x), int(y)), _FONT, scale, color, thickness, cv2.LINE_AA)


_LABEL_SCALE, _LABEL_THICK, _PAD, _AXIS_H = 0.45, 1, 8, 22


def _confusion_canvas(class_names, cell: int, title: str | None):
    """A white image with room for the grid, the labels, the axis names and the title (drawn);
    returns (image, grid x0, grid y0, label width, axis height)."""
    k = len(class_names)
    sizes = [_text_size(str(n), _LABEL_SCALE, _LABEL_THICK)[0] for n in class_names]
    label_w = max(sizes) + 2 * _PAD
    title_h = 28 if title else 0
    grid = k * cell
    width = label_w + grid + _PAD + _AXIS_H
    height = title_h + _AXIS_H + grid + label_w
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, y0 = label_w + _AXIS_H, title_h + _AXIS_H
    if title:
        tw, th, _ = _text_size(title, 0.55, 1)
        _put_text(img, title, max((width - tw) // 2, 2), 6 + th, 0.55, (0, 0, 0))
    tw, th, _ = _text_size("predicted", 0.45, 1)
    _put_text(img, "predicted", x0 + (grid - tw) // 2, title_h + th + 4, 0.45, (60, 60, 60))
    return img, x0, y0, label_w, _AXIS_H


def _draw_confusion_cells(img, cm, shade, rows, x0: int, y0: int, cell: int, normalize: bool):
    """The shaded cells with their counts (and row percentages), then the grid lines."""
    k = cm.shape[0]
    colors = _blues(shade)
    scale = 0.5 if cell >= 48 else 0.35
    for i in range(k):
        for j in range(k):
            ys, xs = y0 + i * cell, x0 + j * cell
            img[ys : ys + cell, xs : xs + cell] = colors[i, j]
            text_color = (255, 255, 255) if shade[i, j] > 0.55 else (20, 20, 20)
            lines = [str(int(cm[i, j]))]
            if normalize and rows[i, 0] > 0:
                lines.append(f"{100.0 * shade[i, j]:.0f}%")
            total_h = len(lines) * (_text_size("0", scale, 1)[1] + 6)
            ty = ys + (cell - total_h) // 2
            for line in lines:
                lw, lh, _ = _text_size(line, scale, 1)
                ty += lh + 6
                _put_text(img, line, xs + (cell - lw) // 2, ty - 3, scale, text_color)
    grid = k * cell
    for t in range(k + 1):
        cv2.line(img, (x0, y0 + t * cell), (x0 + grid, y0 + t * cell), (200, 200, 200), 1)
        cv2.line(img, (x0 + t * cell, y0), (x0 + t * cell, y0 + grid), (200, 200, 200), 1)


def _draw_confusion_labels(img, class_names, x0, y0, cell, label_w, axis_h):
    """Row labels (true class) left of the grid, column labels rotated under it, and the
    rotated "true" axis name at the far left."""
    grid = len(class_names) * cell
    for i, name in enumerate(class_names):
        lw, lh, _ = _text_size(str(name), _LABEL_SCALE, _LABEL_THICK)
        cy = y0 + i * cell + (cell + lh) // 2
        _put_text(img, str(name), x0 - _PAD - lw, cy, _LABEL_SCALE, (0, 0, 0), _LABEL_THICK)
    # Drawn horizontally on a strip, then rotated counter-clockwise: strip row band j becomes
    # grid column j, with the right end of the text against the grid.
    strip = np.full((grid, label_w, 3), 255, dtype=np.uint8)
    for j, name in enumerate(class_names):
        lw, lh, _ = _text_size(str(name), _LABEL_SCALE, _LABEL_THICK)
        cy = j * cell + (cell + lh) // 2
        _put_text(strip, str(name), label_w - _PAD - lw, cy, _LABEL_SCALE, (0, 0, 0), _LABEL_THICK)
    img[y0 + grid : y0 + grid + label_w, x0 : x0 + grid] = np.rot90(strip, k=1)
    tw, th, _ = _text_size("true", 0.45, 1)
    tstrip = np.full((axis_h, grid, 3), 255, dtype=np.uint8)
    _put_text(tstrip, "true", (grid - tw) // 2, (axis_h + th) // 2, 0.45, (60, 60, 60))
    img[y0 : y0 + grid, 0:axis_h] = np.rot90(tstrip, k=1)


def confusion_matrix_image(
    cm,
    class_names: Sequence[str],
    *,
    normalize: bool = True,
    cell: int = 64,
    title: str | None = None,
    as_float: bool = False,
) -> np.ndarray:
    """Render a confusion matrix: rows = true class, columns = predicted class.

    Each cell is shaded by its row-normalised value (the recall share; `normalize=False`
    shades by count over the largest count) and shows the count and, when normalised, the row
    percentage. Class names are written with cv2.putText: row labels on the left, column labels
    rotated underneath.

    Returns uint8 RGB [H, W, 3], or float32 in [0, 1] with `as_float=True` (for
    `clu.metric_writers` `write_images`, after adding a batch axis).
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {k} class names")
    rows = cm.sum(axis=1, keepdims=True)
    if normalize:
        shade = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    else:
        shade = cm / max(int(cm.max()), 1)

    img, x0, y0, label_w, axis_h = _confusion_canvas(class_names, cell, title)
    _draw_confusion_cells(img, cm, shade, rows, x0, y0, cell, normalize)
    _draw_confusion_labels(img, class_names, x0, y0, cell, label_w, axis_h)
    if as_float:
        return img.astype(np.float32) / 255.0
    return img
