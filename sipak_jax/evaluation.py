"""Evaluation for training: logits of a split, the metrics written every epoch, and the
final `results.json` (test metrics, calibration, per-example predictions, shortcut controls),
the report, and the cross-validation summary over folds.

The numbers themselves come from `sipak_jax.metrics` (classification), `sipak_jax.calibration`
(temperature scaling, ECE, Brier) and `sipak_jax.shortcuts`; this module decides what training
records and where.
"""

import json
import os

import jax
import numpy as np
from absl import logging

from sipak_jax import classes, metrics
from sipak_jax.checkpointing import BEST_METRIC


def write_json(path: str, obj) -> None:
    """Writes strict JSON (no NaN) atomically: a temporary file, then a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def run_eval(eval_step, state, batches, *, with_index=False):
    """Logits [N, K] and labels [N] of every real (unmasked) example, ordered by the
    example's index in the split (the same order for any number of processes); with
    `with_index`, the indices [N] too. One device->host transfer at the end."""
    outs = [eval_step(state.params, state.batch_stats, b) for b in batches]
    if not outs:
        k = len(classes.CLASS_NAMES)
        empty = (np.zeros((0, k), np.float32), np.zeros(0, np.int32))
        return (*empty, np.zeros(0, np.int32)) if with_index else empty
    logits, labels, masks, index = (
        np.concatenate(x) for x in zip(*jax.device_get(outs), strict=True)
    )
    keep = masks.astype(bool)
    order = np.argsort(index[keep], kind="stable")
    logits, labels, index = logits[keep][order], labels[keep][order], index[keep][order]
    return (logits, labels, index) if with_index else (logits, labels)


def eval_summary(logits: np.ndarray, labels: np.ndarray, class_names) -> dict:
    """`metrics.classification_metrics` plus the mean cross-entropy."""
    probs = softmax(logits)
    out = metrics.classification_metrics(labels, probs, class_names)
    logp = np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    out["loss"] = float(-logp.mean()) if len(labels) else None
    return out


def eval_scalars(summary: dict, prefix: str) -> dict:
    """The scalars of an eval summary for the writer (None left out)."""
    out = {
        f"{prefix}/loss": summary["loss"],
        f"{prefix}/accuracy": summary["accuracy"],
        f"{prefix}/balanced_accuracy": summary["balanced_accuracy"],
        f"{prefix}/macro_f1": summary["macro_f1"],
        f"{prefix}/roc_auc_macro": summary["roc_auc_macro"],
    }
    for name, pc in summary["per_class"].items():
        for k in ("precision", "recall", "f1", "roc_auc"):
            out[f"{prefix}_per_class/{name}/{k}"] = pc[k]
    if summary.get("view_3class"):
        out[f"{prefix}/3class_accuracy"] = summary["view_3class"]["accuracy"]
        out[f"{prefix}/3class_balanced_accuracy"] = summary["view_3class"]["balanced_accuracy"]
    if summary.get("view_2class"):
        out[f"{prefix}/2class_accuracy"] = summary["view_2class"]["accuracy"]
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


def final_results(
    config, workdir, *, fold, best_step, best_epoch, val, test, data, class_names, metadata
) -> dict:
    """The results.json dict; also writes the temperature into metadata.json and the
    reliability diagram (process 0)."""
    val_logits, val_labels = val
    test_logits, test_labels, test_index = test
    test_examples = data.examples("test")
    results = {
        "fold": fold,
        "best_step": best_step,
        "best_epoch": best_epoch,
        "selection": f"best validation macro-F1 ({BEST_METRIC}); the test fold read once",
        "class_names": class_names,
        "validation": eval_summary(val_logits, val_labels, class_names),
        "test": eval_summary(test_logits, test_labels, class_names),
    }
    temperature = 1.0
    if config.calibrate and len(val_labels):
        from sipak_jax import calibration

        cal = calibration.calibration_summary(val_logits, val_labels, test_logits, test_labels)
        temperature = float(cal["temperature"])
        results["calibration"] = cal
        if jax.process_index() == 0:
            calibration.write_reliability_diagram(
                os.path.join(workdir, "reliability.png"),
                {
                    "before": softmax(test_logits),
                    f"after T={temperature:.2f}": softmax(test_logits, temperature),
                },
                test_labels,
                title=f"Reliability, test fold {fold}",
            )
            results["calibration"]["diagram"] = "reliability.png"
    probs = softmax(test_logits, temperature)
    predictions = []
    for i in range(len(test_labels)):
        row = {
            "index": int(test_index[i]),
            **test_examples.get(int(test_index[i]), {}),
            "label": int(test_labels[i]),
            "prediction": int(np.argmax(probs[i])),
            "probabilities": [round(float(p), 6) for p in probs[i]],
            "logits": [round(float(z), 5) for z in test_logits[i]],
        }
        predictions.append(row)
    results["predictions"] = predictions
    results["predictions_note"] = "probabilities after temperature scaling"
    if config.shortcuts:
        results["shortcuts"] = _shortcuts(data, fold, int(config.seed))
    if jax.process_index() == 0:
        metadata = {**metadata, "temperature": temperature}
        write_json(os.path.join(workdir, "metadata.json"), metadata)
    return results


def _shortcuts(data, fold: int, seed: int):
    """Size-only and colour-only controls on the same folds (sipak_jax.shortcuts)."""
    from sipak_jax import shortcuts

    inputs = data.shortcut_inputs()
    if inputs is None:
        return {"skipped": "several processes: each holds only its share of the folds"}
    shapes, colours, labels, is_test = inputs
    folds = np.where(is_test, fold, -1)
    try:
        return shortcuts.shortcut_controls(shapes, colours, labels, folds, fold, seed=seed)
    except Exception as e:  # noqa: BLE001 - the controls must not lose a finished run
        logging.warning("shortcut controls failed: %r", e)
        return {"error": repr(e)}


def write_report(workdir):
    try:
        from sipak_jax import report
    except ImportError:
        logging.warning("sipak_jax.report is not available; no report.html")
        return
    try:
        report.write_report(workdir)
    except Exception as e:  # noqa: BLE001 - the report must not lose a finished run
        logging.warning("report failed: %r", e)


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


def summarize_folds(results: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1) over folds of the test figures."""
    rows = {}
    for name, get in _CV_FIELDS:
        values = [get(r["test"]) for r in results]
        values = [float(v) for v in values if v is not None]
        if values:
            rows[name] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "per_fold": values,
            }
    ece = [r["calibration"]["test"]["after"]["ece"] for r in results if r.get("calibration")]
    if ece:
        rows["ece_after_temperature"] = {
            "mean": float(np.mean(ece)),
            "std": float(np.std(ece, ddof=1)) if len(ece) > 1 else 0.0,
            "per_fold": [float(v) for v in ece],
        }
    folds = [r["fold"] for r in results]
    lines = [
        "| metric (test folds) | mean | std | " + " | ".join(f"fold {f}" for f in folds) + " |",
        "|---|---:|---:|" + "---:|" * len(folds),
    ]
    for name, row in rows.items():
        per = " | ".join(f"{v:.4f}" for v in row["per_fold"])
        lines.append(f"| {name} | {row['mean']:.4f} | {row['std']:.4f} | {per} |")
    return {"folds": folds, "metrics": rows, "table": "\n".join(lines) + "\n"}
