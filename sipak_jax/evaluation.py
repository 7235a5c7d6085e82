"""The numbers of one evaluation during training: logits of a split, their summary, the
scalars written every epoch, and the cross-validation summary over folds.

The figures themselves come from `sipak_jax.metrics` (classification) and
`sipak_jax.calibration` (softmax); what the end of a run evaluates and writes is
`sipak_jax.finalize`'s.
"""

import jax
import numpy as np

from sipak_jax import metrics
from sipak_jax.calibration import softmax


def run_eval(eval_step, state, batches, *, num_classes: int, with_index=False):
    """Logits [N, K] and labels [N] of every real (unmasked) example, ordered by the
    example's index in the split (the same order for any number of processes); with
    `with_index`, the indices [N] too. One device->host transfer at the end."""
    outs = [eval_step(state.params, state.batch_stats, b) for b in batches]
    if not outs:
        empty = (np.zeros((0, num_classes), np.float32), np.zeros(0, np.int32))
        return (*empty, np.zeros(0, np.int32)) if with_index else empty
    logits, labels, masks, index = (
        np.concatenate(x) for x in zip(*jax.device_get(outs), strict=True)
    )
    keep = masks.astype(bool)
    order = np.argsort(index[keep], kind="stable")
    logits, labels, index = logits[keep][order], labels[keep][order], index[keep][order]
    return (logits, labels, index) if with_index else (logits, labels)


def eval_summary(logits: np.ndarray, labels: np.ndarray, taxonomy, temperature=1.0) -> dict:
    """`metrics.classification_metrics` of softmax(logits / temperature) plus the mean
    cross-entropy. The temperature never changes the class argmax; it does change the
    summed-group views (abnormal vs NILM, 2- and 3-class), the AUCs' ties and the loss."""
    probs = softmax(logits, temperature)
    out = metrics.classification_metrics(labels, probs, taxonomy)
    logp = np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    out["loss"] = float(-logp.mean()) if len(labels) else None
    return out


def eval_scalars(summary: dict, prefix: str) -> dict:
    """The scalars of an eval summary for the writer (None left out)."""
    out = {
        f"{prefix}/{k}": summary[k]
        for k in ("loss", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro")
    }
    for name, pc in summary["per_class"].items():
        for k in ("precision", "recall", "f1", "roc_auc"):
            out[f"{prefix}_per_class/{name}/{k}"] = pc[k]
    for key, view in summary.items():
        if key.startswith("view_") and view:
            out[f"{prefix}/{key[5:]}_accuracy"] = view.get("accuracy")
            out[f"{prefix}/{key[5:]}_balanced_accuracy"] = view.get("balanced_accuracy")
    if summary.get("abnormal_vs_nilm"):
        out[f"{prefix}/abnormal_sensitivity"] = summary["abnormal_vs_nilm"]["sensitivity"]
        out[f"{prefix}/abnormal_specificity"] = summary["abnormal_vs_nilm"]["specificity"]
    return {k: v for k, v in out.items() if v is not None}


def brief(summary: dict) -> dict:
    """The validation figures stored with a checkpoint (JSON, no None for the best metric)."""
    return {
        "macro_f1": float(summary["macro_f1"] or 0.0),
        "accuracy": summary["accuracy"],
        "balanced_accuracy": summary["balanced_accuracy"],
        "loss": summary["loss"],
    }


_CV_FIELDS = (
    ("accuracy", lambda t: t.get("accuracy")),
    ("balanced_accuracy", lambda t: t.get("balanced_accuracy")),
    ("macro_f1", lambda t: t.get("macro_f1")),
    ("roc_auc_macro", lambda t: t.get("roc_auc_macro")),
    ("3class_accuracy", lambda t: (t.get("view_3class") or {}).get("accuracy")),
    ("2class_accuracy", lambda t: (t.get("view_2class") or {}).get("accuracy")),
    ("abnormal_sensitivity", lambda t: (t.get("abnormal_vs_nilm") or {}).get("sensitivity")),
    ("abnormal_specificity", lambda t: (t.get("abnormal_vs_nilm") or {}).get("specificity")),
)


def _mean_std(values) -> dict:
    values = [float(v) for v in values]
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "per_fold": values,
    }


def summarize_folds(results: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1) over folds of the test figures."""
    rows = {}
    for name, get in _CV_FIELDS:
        values = [get(r.get("test") or {}) for r in results]
        values = [v for v in values if v is not None]
        if values:
            rows[name] = _mean_std(values)
    ece = [r["calibration"]["test"]["after"]["ece"] for r in results if r.get("calibration")]
    if ece:
        rows["ece_after_temperature"] = _mean_std(ece)
    folds = [r["fold"] for r in results]
    lines = [
        "| metric (test folds) | mean | std | " + " | ".join(f"fold {f}" for f in folds) + " |",
        "|---|---:|---:|" + "---:|" * len(folds),
    ]
    for name, row in rows.items():
        per = " | ".join(f"{v:.4f}" for v in row["per_fold"])
        lines.append(f"| {name} | {row['mean']:.4f} | {row['std']:.4f} | {per} |")
    return {"folds": folds, "metrics": rows, "table": "\n".join(lines) + "\n"}
