"""Classification metrics for SIPaKMeD, in numpy: the numbers every evaluation reports.

`classification_metrics(labels, probs)` is what training (validation after every epoch, the
test fold at the end), `predict`-based evaluations and the report all use, so that a figure
means the same thing everywhere. It needs only numpy (no scikit-learn, no TensorFlow: it runs
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
- Grouped views (only when `class_names` are the five SIPaKMeD classes): probabilities are
  summed per group (`classes.LABEL_3CLASS`, `classes.LABEL_2CLASS`) and the grouped
  prediction is the argmax of the summed probabilities (this can differ from mapping the
  5-class argmax when the mass is split). The 2-class view is normal (NILM: Superficial-
  Intermediate, Parabasal, Metaplastic) vs abnormal (Koilocytotic, Dyskeratotic).
- `abnormal_vs_nilm`: from the 2-class view, sensitivity = TP / (TP + FN) on abnormal cells,
  specificity = TN / (TN + FP) on NILM cells, and the ROC-AUC of the summed abnormal
  probability.

`confusion_matrix_image(cm, class_names)` renders a confusion matrix as a uint8 RGB image with
OpenCV (no matplotlib) for TensorBoard (`image / 255.0`, or `as_float=True`) and the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from sipak_jax import classes

__all__ = [
    "binary_roc_auc",
    "classification_metrics",
    "confusion_matrix",
    "confusion_matrix_image",
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


def classification_metrics(labels, probs, class_names: Sequence[str] = classes.CLASS_NAMES) -> dict:
    """Every classification figure for one evaluation, as a JSON-serialisable dict.

    Args:
      labels: int [N], true class indices in `class_names` order.
      probs: float [N, K], predicted probabilities (after softmax, and temperature if any).
      class_names: the K class names; the grouped views and `abnormal_vs_nilm` are computed
        only when these are `classes.CLASS_NAMES` (else they are None).

    Returns:
      {"num_examples", "class_names", "accuracy", "balanced_accuracy", "macro_f1",
       "roc_auc_macro", "per_class": {name: {"precision", "recall", "f1", "support",
       "roc_auc"}}, "confusion_matrix": [[int]], "view_3class", "view_2class",
       "abnormal_vs_nilm": {"sensitivity", "specificity", "roc_auc", "tp", "fn", "tn", "fp"}}.
      See the module docstring for the conventions; undefined values are None.
    """
    class_names = [str(c) for c in class_names]
    labels, probs = _check_inputs(labels, probs, len(class_names))
    k = len(class_names)
    n = labels.shape[0]
    pred = np.argmax(probs, axis=1) if n else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(labels, pred, k)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)

    per_class = {}
    precisions, recalls, f1s, aucs = [], [], [], []
    for i, name in enumerate(class_names):
        precision = _ratio(tp[i], predicted[i])
        recall = _ratio(tp[i], support[i])
        f1 = _ratio(2 * tp[i], 2 * tp[i] + (predicted[i] - tp[i]) + (support[i] - tp[i]))
        auc = binary_roc_auc(labels == i, probs[:, i]) if n else None
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(support[i]),
            "roc_auc": auc,
        }
        precisions.append(precision)
        recalls.append(recall)
        f1s.append(f1)
        aucs.append(auc)

    out = {
        "num_examples": int(n),
        "class_names": class_names,
        "accuracy": _ratio(np.trace(cm), n),
        "balanced_accuracy": _mean_defined(recalls),
        "macro_f1": _mean_defined(f1s),
        "roc_auc_macro": _mean_defined(aucs),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "view_3class": None,
        "view_2class": None,
        "abnormal_vs_nilm": None,
    }
    if tuple(class_names) != classes.CLASS_NAMES:
        return out

    labels3 = np.asarray(classes.LABEL_3CLASS)[labels]
    probs3 = grouped_probabilities(probs, classes.LABEL_3CLASS, len(classes.CLASS_NAMES_3))
    out["view_3class"] = _view(labels3, probs3, classes.CLASS_NAMES_3)

    labels2 = np.asarray(classes.LABEL_2CLASS)[labels]
    probs2 = grouped_probabilities(probs, classes.LABEL_2CLASS, len(classes.CLASS_NAMES_2))
    view2 = _view(labels2, probs2, classes.CLASS_NAMES_2)
    out["view_2class"] = view2
    ab = classes.CLASS_NAMES_2.index("abnormal")
    no = classes.CLASS_NAMES_2.index("normal")
    cm2 = np.asarray(view2["confusion_matrix"])
    tp2, fn2, tn2, fp2 = cm2[ab, ab], cm2[ab, no], cm2[no, no], cm2[no, ab]
    out["abnormal_vs_nilm"] = {
        "sensitivity": _ratio(tp2, tp2 + fn2),
        "specificity": _ratio(tn2, tn2 + fp2),
        "roc_auc": binary_roc_auc(labels2 == ab, probs2[:, ab]) if n else None,
        "tp": int(tp2),
        "fn": int(fn2),
        "tn": int(tn2),
        "fp": int(fp2),
    }
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

    label_scale, label_thick = 0.45, 1
    pad = 8
    label_w = max(_text_size(str(n), label_scale, label_thick)[0] for n in class_names) + 2 * pad
    axis_h = 22  # room for the axis names
    title_h = 28 if title else 0
    grid = k * cell
    width = label_w + grid + pad + axis_h
    height = title_h + axis_h + grid + label_w
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, y0 = label_w + axis_h, title_h + axis_h

    if title:
        tw, th, _ = _text_size(title, 0.55, 1)
        _put_text(img, title, max((width - tw) // 2, 2), 6 + th, 0.55, (0, 0, 0))
    tw, th, _ = _text_size("predicted", 0.45, 1)
    _put_text(img, "predicted", x0 + (grid - tw) // 2, title_h + th + 4, 0.45, (60, 60, 60))

    colors = _blues(shade)
    for i in range(k):
        for j in range(k):
            ys, xs = y0 + i * cell, x0 + j * cell
            img[ys : ys + cell, xs : xs + cell] = colors[i, j]
            text_color = (255, 255, 255) if shade[i, j] > 0.55 else (20, 20, 20)
            lines = [str(int(cm[i, j]))]
            if normalize and rows[i, 0] > 0:
                lines.append(f"{100.0 * shade[i, j]:.0f}%")
            scale = 0.5 if cell >= 48 else 0.35
            total_h = len(lines) * (_text_size("0", scale, 1)[1] + 6)
            ty = ys + (cell - total_h) // 2
            for line in lines:
                lw, lh, _ = _text_size(line, scale, 1)
                ty += lh + 6
                _put_text(img, line, xs + (cell - lw) // 2, ty - 3, scale, text_color)
    # Grid lines.
    for t in range(k + 1):
        cv2.line(img, (x0, y0 + t * cell), (x0 + grid, y0 + t * cell), (200, 200, 200), 1)
        cv2.line(img, (x0 + t * cell, y0), (x0 + t * cell, y0 + grid), (200, 200, 200), 1)

    # Row labels (true class), right-aligned against the grid.
    for i, name in enumerate(class_names):
        lw, lh, _ = _text_size(str(name), label_scale, label_thick)
        cy = y0 + i * cell + (cell + lh) // 2
        _put_text(img, str(name), x0 - pad - lw, cy, label_scale, (0, 0, 0), label_thick)
    # Column labels: drawn horizontally on a strip, then rotated to read bottom-up.
    strip = np.full((cell * k, label_w, 3), 255, dtype=np.uint8)  # rotated later
    for j, name in enumerate(class_names):
        lw, lh, _ = _text_size(str(name), label_scale, label_thick)
        # np.rot90 (counter-clockwise) turns strip row band j into grid column j, with the
        # right end of the text against the grid.
        cy = j * cell + (cell + lh) // 2
        _put_text(strip, str(name), label_w - pad - lw, cy, label_scale, (0, 0, 0), label_thick)
    rotated = np.rot90(strip, k=1)  # [label_w, cell*k]; text now reads bottom to top
    img[y0 + grid : y0 + grid + label_w, x0 : x0 + grid] = rotated
    # "true" axis name, rotated, at the far left.
    tw, th, _ = _text_size("true", 0.45, 1)
    tstrip = np.full((axis_h, grid, 3), 255, dtype=np.uint8)
    _put_text(tstrip, "true", (grid - tw) // 2, (axis_h + th) // 2, 0.45, (60, 60, 60))
    img[y0 : y0 + grid, 0:axis_h] = np.rot90(tstrip, k=1)
    if as_float:
        return img.astype(np.float32) / 255.0
    return img
