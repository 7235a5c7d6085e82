"""Calibration: temperature scaling, ECE, Brier score and a reliability diagram (numpy + OpenCV).

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides
the logits by one scalar T > 0 fitted on the *validation* split (never the test fold) at the end
of training; T is stored in the model DIR's `metadata.json` (`temperature`) and `predict`
applies it. It changes confidences, never the argmax.

Conventions:
- `fit_temperature` minimises the mean negative log-likelihood of softmax(logits / T). The NLL is
  convex in beta = 1/T, so its derivative is monotone and a bisection on it (in log beta, 200
  halvings at most, float64) finds the unique minimiser deterministically. T is bounded to
  [`T_MIN`, `T_MAX`]; a bound is returned when the optimum lies beyond it (e.g. perfectly
  separated validation logits push T towards 0).
- `expected_calibration_error`: top-label ECE with `n_bins` (default 15) equal-width bins over
  (0, 1]; bin b holds the examples with confidence in (b/n, (b+1)/n] (the first bin also holds
  0); ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|.
- `brier_score`: multiclass Brier score, the squared error summed over the K classes and
  averaged over examples: mean_i sum_k (p_ik - [y_i = k])^2, in [0, 2]. (For two classes it is
  twice sklearn's binary `brier_score_loss`, which scores only the positive column.)
- `nll`: mean negative log-likelihood of the true class, natural log.

`calibration_summary(val_logits, val_labels, test_logits, test_labels)` is the dict training
writes under `results.json["calibration"]`; `reliability_diagram` draws the PNG the report shows.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "T_MAX",
    "T_MIN",
    "brier_score",
    "calibration_summary",
    "expected_calibration_error",
    "fit_temperature",
    "log_softmax",
    "nll",
    "reliability_bins",
    "reliability_diagram",
    "softmax",
    "write_reliability_diagram",
]

T_MIN = 0.05
T_MAX = 20.0
DEFAULT_BINS = 15


def _check(logits_or_probs, labels, what: str):
    x = np.asarray(logits_or_probs, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"{what} must be [N, K], got shape {x.shape}")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be [N] matching {what} {x.shape}, got {labels.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty: calibration needs at least one example")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contain NaN or Inf")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= x.shape[1]:
        raise ValueError(f"labels must lie in [0, {x.shape[1]})")
    return x, labels


def log_softmax(logits) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature), float64."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / float(temperature)))


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature) at the true labels."""
    z, labels = _check(logits, labels, "logits")
    lp = log_softmax(z / float(temperature))
    return float(-lp[np.arange(len(labels)), labels].mean())


def _nll_grad_beta(z: np.ndarray, labels: np.ndarray, beta: float) -> float:
    """d/d(beta) of mean NLL(softmax(beta * z)) = mean(E_p[z] - z_y); increasing in beta."""
    p = np.exp(log_softmax(beta * z))
    return float(((p * z).sum(axis=1) - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits, labels, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """The temperature T in [t_min, t_max] that minimises the NLL of softmax(logits / T).

    Fit on validation logits (float [N, K], before softmax) and labels (int [N]). Deterministic.
    """
    z, labels = _check(logits, labels, "logits")
    if not 0 < t_min < t_max:
        raise ValueError(f"need 0 < t_min < t_max, got {t_min}, {t_max}")
    lo, hi = np.log(1.0 / t_max), np.log(1.0 / t_min)  # bracket in log(beta)
    if _nll_grad_beta(z, labels, np.exp(lo)) >= 0.0:
        return float(t_max)  # NLL already increasing at the smallest beta: T at its upper bound
    if _nll_grad_beta(z, labels, np.exp(hi)) <= 0.0:
        return float(t_min)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _nll_grad_beta(z, labels, np.exp(mid)) > 0.0:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-12:
            break
    return float(1.0 / np.exp(0.5 * (lo + hi)))


def reliability_bins(probs, labels, n_bins: int = DEFAULT_BINS) -> dict:
    """Per-bin counts, mean confidence and accuracy of the top-label prediction."""
    p, labels = _check(probs, labels, "probs")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    # Bin b = (b/n, (b+1)/n]; confidence 0 goes to bin 0.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf_sum / np.maximum(counts, 1), np.nan)
        accuracy = np.where(counts > 0, acc_sum / np.maximum(counts, 1), np.nan)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": counts,
        "confidence": mean_conf,
        "accuracy": accuracy,
    }


def expected_calibration_error(probs, labels, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE with `n_bins` equal-width bins (see the module docstring)."""
    b = reliability_bins(probs, labels, n_bins)
    n = b["count"].sum()
    filled = b["count"] > 0
    gap = np.abs(b["accuracy"][filled] - b["confidence"][filled])
    return float((b["count"][filled] / n * gap).sum())


def brier_score(probs, labels) -> float:
    """Multiclass Brier score: mean over examples of the squared error summed over classes."""
    p, labels = _check(probs, labels, "probs")
    onehot = np.zeros_like(p)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def _scores(logits, labels, temperature: float, n_bins: int) -> dict:
    p = softmax(logits, temperature)
    return {
        "nll": nll(logits, labels, temperature),
        "ece": expected_calibration_error(p, labels, n_bins),
        "brier": brier_score(p, labels),
        "accuracy": float((p.argmax(1) == np.asarray(labels)).mean()),
    }


def calibration_summary(
    val_logits, val_labels, test_logits, test_labels, n_bins: int = DEFAULT_BINS
) -> dict:
    """Fit T on validation, score the test fold before and after: results.json["calibration"].

    Returns {"temperature", "fitted_on": "validation", "n_bins", "brier_convention",
    "validation": {"before", "after"}, "test": {"before", "after"}}, each with nll, ece,
    brier, accuracy.
    """
    t = fit_temperature(val_logits, val_labels)
    note = "fitted: NLL minimum inside the bounds"
    if t <= T_MIN:
        # Perfectly separated validation logits: the NLL keeps falling as T -> 0, so the "fit"
        # would only sharpen every probability towards 0/1. Nothing is learnt about
        # calibration from such a split: keep the model's own probabilities.
        t = 1.0
        note = (
            f"not fitted: the validation split is perfectly separated (the NLL falls towards "
            f"T={T_MIN}, the lower bound); T kept at 1"
        )
    return {
        "temperature": t,
        "temperature_fit": note,
        "fitted_on": "validation",
        "n_bins": n_bins,
        "ece_convention": "top-label, equal-width bins over (0, 1]",
        "brier_convention": "sum over classes, mean over examples (range 0-2)",
        "validation": {
            "before": _scores(val_logits, val_labels, 1.0, n_bins),
            "after": _scores(val_logits, val_labels, t, n_bins),
        },
        "test": {
            "before": _scores(test_logits, test_labels, 1.0, n_bins),
            "after": _scores(test_logits, test_labels, t, n_bins),
        },
    }


# ---------------------------------------------------------------------------------------------
# Reliability diagram (OpenCV; no matplotlib).

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(img, s, x, y, scale=0.45, color=(40, 40, 40), thickness=1):
    cv2.putText(img, s, (int(x), int(y)), _FONT, scale, color, thickness, cv2.LINE_AA)


_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]  # RGB


class _Frame:
    """The geometry of the reliability diagram: a square plot of `size` px, margins, and a
    histogram strip underneath; `px`/`py` map confidence/accuracy in [0, 1] to pixels."""

    def __init__(self, size: int):
        self.size, self.hist_h = size, 60
        self.x0, self.y0 = 56, 34  # left and top margins
        self.width = self.x0 + size + 16
        self.height = self.y0 + size + 12 + self.hist_h + 44

    def px(self, c) -> int:
        return int(round(self.x0 + c * self.size))

    def py(self, a) -> int:
        return int(round(self.y0 + (1.0 - a) * self.size))

    def axes(self, title: str) -> np.ndarray:
        """A white image with the title, the grid, the tick labels, the diagonal and the axis
        names."""
        img = np.full((self.height, self.width, 3), 255, dtype=np.uint8)
        x0, y0, size, px, py = self.x0, self.y0, self.size, self.px, self.py
        _text(img, title, x0, 22, 0.55, (0, 0, 0))
        for t in np.linspace(0, 1, 6):
            cv2.line(img, (px(t), y0), (px(t), y0 + size), (230, 230, 230), 1)
            cv2.line(img, (x0, py(t)), (x0 + size, py(t)), (230, 230, 230), 1)
            _text(img, f"{t:.1f}", x0 - 30, py(t) + 4, 0.38)
            _text(img, f"{t:.1f}", px(t) - 10, y0 + size + 12 + self.hist_h + 16, 0.38)
        cv2.rectangle(img, (x0, y0), (x0 + size, y0 + size), (120, 120, 120), 1)
        cv2.line(img, (px(0), py(0)), (px(1), py(1)), (150, 150, 150), 1, cv2.LINE_AA)
        _text(img, "confidence", x0 + size // 2 - 36, self.height - 8, 0.45)
        strip = np.full((22, size, 3), 255, dtype=np.uint8)
        _text(strip, "accuracy", size // 2 - 30, 16, 0.45)
        img[y0 : y0 + size, 2:24] = np.rot90(strip, k=1)
        return img

    def bars_and_histogram(self, img, b: dict, filled, color) -> None:
        """A light bar per filled bin (its accuracy) and the confidence histogram (scaled to
        the fullest bin) in the strip underneath."""
        edges, px, py = b["edges"], self.px, self.py
        light = tuple(int(255 - 0.35 * (255 - c)) for c in color)
        hy0 = self.y0 + self.size + 12
        cmax = max(int(b["count"].max()), 1)
        for i in filled:
            left, right = px(edges[i]) + 1, px(edges[i + 1]) - 1
            cv2.rectangle(img, (left, py(b["accuracy"][i])), (right, py(0)), light, -1)
            hgt = int(round(self.hist_h * b["count"][i] / cmax))
            cv2.rectangle(
                img, (left, hy0 + self.hist_h - hgt), (right, hy0 + self.hist_h), light, -1
            )
        cv2.rectangle(
            img, (self.x0, hy0), (self.x0 + self.size, hy0 + self.hist_h), (120, 120, 120), 1
        )
        _text(img, "count", 4, hy0 + self.hist_h // 2 + 4, 0.38)


def reliability_diagram(
    curves: dict,
    labels=None,
    *,
    n_bins: int = DEFAULT_BINS,
    size: int = 420,
    title: str = "Reliability (top label)",
) -> np.ndarray:
    """Draw accuracy against confidence per bin, one curve per entry of `curves`.

    Args:
      curves: {name: probs [N, K]} (e.g. {"before": p, "after T=1.4": p_t}); all share `labels`.
      labels: int [N].
    Returns uint8 RGB [H, W, 3]: the diagonal (perfect calibration), a bar per filled bin for
    the first curve, points joined by lines for every curve, the ECE of each in the legend, and
    a histogram strip of the first curve's confidences underneath.
    """
    if not curves:
        raise ValueError("reliability_diagram needs at least one curve")
    frame = _Frame(size)
    img = frame.axes(title)
    for ci, (name, probs) in enumerate(curves.items()):
        color = _PALETTE[ci % len(_PALETTE)]
        b = reliability_bins(probs, labels, n_bins)
        filled = np.flatnonzero(b["count"] > 0)
        if ci == 0:
            frame.bars_and_histogram(img, b, filled, color)
        pts = [(frame.px(b["confidence"][i]), frame.py(b["accuracy"][i])) for i in filled]
        for a, c in zip(pts[:-1], pts[1:], strict=True):
            cv2.line(img, a, c, color, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, p, 4, color, -1, cv2.LINE_AA)
        ece = expected_calibration_error(probs, labels, n_bins)
        legend_y = frame.y0 + 18 + 18 * ci
        cv2.line(img, (frame.x0 + 10, legend_y - 4), (frame.x0 + 30, legend_y - 4), color, 2)
        _text(img, f"{name}: ECE {ece:.3f}", frame.x0 + 36, legend_y, 0.45, (0, 0, 0))
    return img


def write_reliability_diagram(path, curves: dict, labels, **kwargs) -> Path:
    """Draw `reliability_diagram(curves, labels, **kwargs)` and save it as PNG at `path`."""
    path = Path(path)
    img = reliability_diagram(curves, labels, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img[..., ::-1]):
        raise OSError(f"could not write the reliability diagram to {path}")
    return path
