"""Evaluate a model (or an ensemble) on a dataset, also one it was not trained on.

    python -m sipak_jax.evaluate --checkpoint=workdirs/r50_cv --dataset=herlev \\
        --manual_dir=~/herlev --view=2class --output=herlev.json --report=herlev.html
    python -m sipak_jax.evaluate --checkpoint=runs/a,runs/b --dataset=cell_folder \\
        --manual_dir=LAB_ROOT --taxonomy=lab_taxonomy.json --view=2class --output=lab.json
    python -m sipak_jax.evaluate --checkpoint=DIR --dataset=cric --data_dir=D \\
        --calibrate_split=fold0 --split=fold1,fold2,fold3,fold4 --view=2class --output=c.json

`--checkpoint`: a model DIR, `A,B,C` or a `fold=all` workdir (`sipak_jax.ensemble`). The data:
any dataset of the registry (`tfds_sipakmed.datasets.NAMES`), read from its TFDS build
(`--data_dir`; for a cell folder the builder directory the build printed, or
`--dataset_config=<its config>`) or directly from the manual dir (`--manual_dir`, with the
reader's options `--taxonomy`, `--group_regex`, `--group_csv`, `--crop_size`), through
`sipak_jax.input_pipeline.cache.load_splits`: exactly the evaluation's preprocessing (the
crop resized by the model's policy to its size, normalised inside the model's function).
`--split`: `all` (default: every fold; right for a dataset the model never saw) or a
comma-separated list of folds. A model evaluated on folds of the dataset it was trained on,
other than its own test fold, has seen those cells: the result's `notes` say so.

The view (`--view=2class`, the only one): normal vs abnormal, through each side's own
taxonomy. The model's abnormal probability is the sum of its `abnormal` classes' probabilities
(`metrics.abnormal_probabilities`); the truth is whether the cell's class is in the dataset
taxonomy's `abnormal` set; the call is abnormal when p_abnormal > 1/2 (normal on a tie, as in
`sipak_jax.metrics`). Both taxonomies must name abnormal classes (a cell folder gets one from
`--taxonomy=FILE`). Figures (`two_class` in the JSON): accuracy, sensitivity (recall of
abnormal cells), specificity (recall of normal cells), ROC-AUC of p_abnormal
(`metrics.binary_roc_auc`), the 2x2 confusion (rows true normal/abnormal, columns called
normal/abnormal), and calibration of the 2-class probabilities [1 - p, p]: top-label ECE (15
equal-width bins, `calibration.expected_calibration_error`), the Brier score summed over the
two classes (range 0-2, twice scikit-learn's binary one) and the reliability diagram
(`OUT.reliability.png`, `calibration.reliability_diagram`). `per_class`: for each of the
dataset's classes, how many cells and how many the model called abnormal. When the model and
the dataset have the same class names in the same order, `full_class` holds
`metrics.classification_metrics` too (else null, with the reason in `notes`). An ensemble adds
`uncertainty`: the mean mutual information (nats) over all cells and over the right and wrong
calls. `predictions`: per cell `file_name`, `label` (the dataset's class index), `abnormal`
(truth), `p_abnormal`, `uncertainty`, `probabilities` (the model's classes).

Calibration for the evaluated data: `--calibrate_split=FOLDS` (disjoint from `--split`) fits
one temperature on the normal/abnormal probabilities of those folds (`scale_two_class`:
softmax(log([1 - p, p]) / T), the NLL minimum of `calibration.fit_temperature`; T = 1 when they
are perfectly separated) and scores `--split` with it: a recalibration to the new site, and for
an ensemble its own calibration (its members stay temperature-scaled as trained). It changes
ECE, Brier and the diagram, never a call, sensitivity, specificity or AUC (it is monotone);
`recalibration` gives T and the folds, `two_class_before_recalibration` the model's own
figures, `predictions[i].p_abnormal_recalibrated` the scaled value. Without it nothing is
fitted (an ensemble keeps the mean of its members' calibrated probabilities;
`sipak_jax.ensemble` says why a fold ensemble has no held-out split of its own data).

Outputs: `--output` JSON (format `sipak_jax.evaluate/1`, atomic), its reliability diagram
beside it, and with `--report=OUT.html` a self-contained HTML page
(`sipak_jax.evaluation_report`). Existing files are refused unless `--overwrite`. Console: a
line on what is read and predicted, then the result summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from sipak_jax import calibration, console, fileio, metrics
from tfds_sipakmed.taxonomy import Taxonomy

FORMAT = "sipak_jax.evaluate/1"
VIEWS = ("2class",)

__all__ = ["FORMAT", "evaluate_probabilities", "main", "run", "two_class_metrics"]


# ---------------------------------------------------------------------------------------------
# The figures (numpy only; tests compare them with scikit-learn).


def two_class_metrics(is_abnormal, p_abnormal, n_bins: int = calibration.DEFAULT_BINS) -> dict:
    """Normal-vs-abnormal figures of `p_abnormal` [N] against the truth `is_abnormal` [N]."""
    truth = np.asarray(is_abnormal, bool)
    p = np.clip(np.asarray(p_abnormal, np.float64), 0.0, 1.0)
    call = p > 0.5
    tp, fn = int(np.sum(truth & call)), int(np.sum(truth & ~call))
    tn, fp = int(np.sum(~truth & ~call)), int(np.sum(~truth & call))
    n = int(truth.size)
    p2 = np.stack([1.0 - p, p], axis=1)
    return {
        "num_examples": n,
        "num_abnormal": int(truth.sum()),
        "num_normal": int(n - truth.sum()),
        "accuracy": (tp + tn) / n if n else None,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "roc_auc": metrics.binary_roc_auc(truth, p),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "confusion_labels": ["normal", "abnormal"],
        "threshold": 0.5,
        "ece": calibration.expected_calibration_error(p2, truth.astype(int), n_bins) if n else None,
        "brier": calibration.brier_score(p2, truth.astype(int)) if n else None,
        "n_bins": n_bins,
    }


def _per_class(labels, p_abnormal, taxonomy: Taxonomy) -> dict:
    abnormal = set(taxonomy.abnormal)
    out = {}
    for i, name in enumerate(taxonomy.class_names):
        rows = labels == i
        flagged = int(np.sum(p_abnormal[rows] > 0.5))
        n = int(rows.sum())
        out[name] = {
            "n": n,
            "abnormal": name in abnormal,
            "flagged": flagged,
            "flagged_rate": flagged / n if n else None,
            "mean_p_abnormal": float(p_abnormal[rows].mean()) if n else None,
        }
    return out


def _uncertainty_summary(uncertainty, correct) -> dict | None:
    if uncertainty is None:
        return None
    u = np.asarray(uncertainty, np.float64)

    def mean(mask):
        return float(u[mask].mean()) if mask.any() else None

    return {
        "measure": "mutual information between the prediction and the member (nats)",
        "mean": mean(np.ones_like(correct)),
        "mean_correct": mean(correct),
        "mean_wrong": mean(~correct),
    }


def scale_two_class(p_abnormal, temperature: float) -> np.ndarray:
    """Temperature scaling of the normal/abnormal probabilities: softmax(log([1-p, p]) / T)."""
    p = np.clip(np.asarray(p_abnormal, np.float64), 1e-300, 1.0)
    q = np.clip(1.0 - p, 1e-300, 1.0)
    return calibration.softmax(np.stack([np.log(q), np.log(p)], axis=1), temperature)[:, 1]


def fit_two_class_temperature(is_abnormal, p_abnormal) -> tuple[float, str]:
    """(T, how) fitted on held-out normal/abnormal truths: the NLL minimum of
    `scale_two_class` (`calibration.fit_temperature`); T = 1 when the held-out cells are
    perfectly separated (the NLL then falls towards the lower bound), as in training."""
    p = np.clip(np.asarray(p_abnormal, np.float64), 1e-300, 1.0)
    logits = np.stack([np.log(np.clip(1.0 - p, 1e-300, 1.0)), np.log(p)], axis=1)
    t = calibration.fit_temperature(logits, np.asarray(is_abnormal, int))
    if t <= calibration.T_MIN:
        return 1.0, "not fitted: the calibration cells are perfectly separated; T kept at 1"
    if t >= calibration.T_MAX:
        return t, f"at the upper bound {calibration.T_MAX:g}: the calibration cells pull p to 1/2"
    return t, "fitted: NLL minimum inside the bounds"


def evaluate_probabilities(
    probs,
    labels,
    model_taxonomy: Taxonomy,
    data_taxonomy: Taxonomy,
    uncertainty=None,
    temperature: float = 1.0,
) -> dict:
    """Every figure of the result (module docstring) from the model's probabilities [N, K]
    and the dataset's labels [N]: {"two_class", "per_class", "uncertainty", "full_class",
    "notes"}, the normal/abnormal probabilities scaled by `temperature` (`scale_two_class`;
    then also "two_class_before_recalibration"). Raises console.UserError when a taxonomy
    names no abnormal class."""
    for who, tax in (("the model", model_taxonomy), ("the dataset", data_taxonomy)):
        if not tax.abnormal:
            raise console.UserError(
                f"{who}'s taxonomy ({tax.dataset or 'unnamed'}: {', '.join(tax.class_names)}) "
                "names no abnormal class, so there is no normal/abnormal view; for a cell "
                "folder pass --taxonomy=FILE with an 'abnormal' list"
            )
    labels = np.asarray(labels, np.int64)
    p_model = metrics.abnormal_probabilities(probs, model_taxonomy)[:, 1]
    p_ab = p_model if temperature == 1.0 else scale_two_class(p_model, temperature)
    truth = np.isin(labels, data_taxonomy.abnormal_indices())
    notes = []
    full = None
    if tuple(model_taxonomy.class_names) == tuple(data_taxonomy.class_names):
        full = metrics.classification_metrics(labels, probs, model_taxonomy)
    else:
        notes.append(
            "the model's classes differ from the dataset's: only the normal/abnormal view is "
            "scored (no full-class metrics)"
        )
    out = {
        "two_class": two_class_metrics(truth, p_ab),
        "per_class": _per_class(labels, p_ab, data_taxonomy),
        "uncertainty": _uncertainty_summary(uncertainty, (p_ab > 0.5) == truth),
        "full_class": full,
        "notes": notes,
    }
    if temperature != 1.0:
        out["two_class_before_recalibration"] = two_class_metrics(truth, p_model)
    return out


# ---------------------------------------------------------------------------------------------
# The data and the model.


def _reader_options(args) -> dict:
    options = {}
    for key in ("taxonomy", "group_regex", "group_csv", "crop_size"):
        value = getattr(args, key)
        if value not in (None, ""):
            options[key] = value
    return options


def _splits(split: str) -> tuple[str, ...]:
    from sipak_jax.input_pipeline.sources import SPLITS

    if split == "all":
        return SPLITS
    return tuple(s.strip() for s in split.split(",") if s.strip())


def load_data(args, predictor, log: list, splits: Sequence[str]):
    """The dataset's `splits` as a `cache.Cache` at the model's input size and resize policy."""
    from sipak_jax.input_pipeline import cache

    try:
        return cache.load_splits(
            os.path.expanduser(args.data_dir) if args.data_dir else None,
            args.dataset_config,
            tuple(splits),
            predictor.image_size,
            predictor.spec.get("resize", "pad"),
            manual_dir=os.path.expanduser(args.manual_dir) if args.manual_dir else None,
            dataset=args.dataset,
            options=_reader_options(args),
            log=log.append,
        )
    except (FileNotFoundError, ValueError) as e:
        where = (
            f"--data_dir={args.data_dir}" if args.data_dir else f"--manual_dir={args.manual_dir}"
        )
        raise console.UserError(f"{args.dataset} at {where}: {e}") from None


def _seen_notes(members_metadata, dataset: str, splits: Sequence[str]) -> list[str]:
    """Notes for members evaluated on folds of their own training data."""
    from tfds_sipakmed.folds import split_name

    notes = []
    for path, meta in members_metadata:
        if meta.taxonomy is None or meta.taxonomy.dataset != dataset or meta.fold is None:
            continue
        seen = [s for s in splits if s != split_name(int(meta.fold))]
        if seen:
            notes.append(
                f"{path} was trained on {dataset} with test fold {meta.fold}: it has seen the "
                f"cells of {', '.join(seen)} (training or validation); those figures are "
                "optimistic"
            )
    return notes


def _model_info(spec: str, predictor) -> dict:
    tax = predictor.taxonomy
    members = list(getattr(predictor, "members", []))
    return {
        "checkpoint": spec,
        "ensemble": len(members) > 1,
        "members": members,
        "temperature": predictor.temperature,
        "member_temperatures": getattr(predictor, "member_temperatures", None),
        "taxonomy": tax.to_dict(),
        "image_size": predictor.image_size,
        "resize": predictor.spec.get("resize"),
    }


def _data_info(args, data) -> dict:
    return {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "manual_dir": args.manual_dir,
        "dataset_config": args.dataset_config,
        "splits": list(_splits(args.split)),
        "num_examples": len(data),
        "taxonomy": data.taxonomy.to_dict(),
        "grouping": data.grouping,
        "warnings": list(data.warnings),
    }


def _predictions(data, probs, p_abnormal, truth, uncertainty) -> list[dict]:
    return [
        {
            "file_name": str(data.file_name[i]),
            "label": int(data.label[i]),
            "abnormal": bool(truth[i]),
            "p_abnormal": float(p_abnormal[i]),
            "uncertainty": None if uncertainty is None else float(uncertainty[i]),
            "probabilities": [float(v) for v in probs[i]],
        }
        for i in range(len(data))
    ]


def _recalibration(args, predictor, log: list) -> dict | None:
    """With `--calibrate_split`: the normal/abnormal temperature fitted on those cells."""
    if not args.calibrate_split:
        return None
    splits = _splits(args.calibrate_split)
    cal = load_data(args, predictor, log, splits)
    p_ab = metrics.abnormal_probabilities(predictor.probabilities(cal.image), predictor.taxonomy)
    p_ab = p_ab[:, 1]
    truth = np.isin(cal.label, cal.taxonomy.abnormal_indices())
    t, how = fit_two_class_temperature(truth, p_ab)
    return {"splits": list(splits), "num_examples": len(cal), "temperature": t, "fit": how}


def _score(args, predictor, data, recal, members) -> dict:
    """The result dict (module docstring) of the model's predictions on `data`."""
    from sipak_jax import model_io

    probs, uncertainty = predictor.predict_with_uncertainty(data.image)
    t = recal["temperature"] if recal else 1.0
    result = {"format": FORMAT, "view": args.view}
    result["model"] = _model_info(args.checkpoint, predictor)
    result["data"] = _data_info(args, data)
    result["recalibration"] = recal
    result.update(
        evaluate_probabilities(
            probs, data.label, predictor.taxonomy, data.taxonomy, uncertainty, temperature=t
        )
    )
    metas = [(m, model_io.read_metadata(m)) for m in members if os.path.isdir(m)]
    result["notes"] = _seen_notes(metas, args.dataset, _splits(args.split)) + result["notes"]
    p_ab = metrics.abnormal_probabilities(probs, predictor.taxonomy)[:, 1]
    truth = np.isin(data.label, data.taxonomy.abnormal_indices())
    result["predictions"] = _predictions(data, probs, p_ab, truth, uncertainty)
    if recal:
        for row, p in zip(result["predictions"], scale_two_class(p_ab, t), strict=True):
            row["p_abnormal_recalibrated"] = float(p)
    return result


def run(args, say=console.say) -> dict:
    """Loads the model and the data, evaluates, writes the outputs; returns the result."""
    from sipak_jax import predict

    outputs = _check_outputs(args)
    predictor = predict.load_checkpoint(args.checkpoint, args.batch_size)
    members = list(getattr(predictor, "members", [])) or [args.checkpoint]
    reader_log: list[str] = []
    start = time.perf_counter()
    data = load_data(args, predictor, reader_log, _splits(args.split))
    if not len(data):
        raise console.UserError(f"{args.dataset} {args.split}: no cells to evaluate")
    say(
        f"evaluating {args.checkpoint} ({len(members)} member{'s' * (len(members) > 1)}) on "
        f"{args.dataset} {','.join(_splits(args.split))}: {len(data)} cells at "
        f"{predictor.image_size} px"
    )
    recal = _recalibration(args, predictor, reader_log)
    result = _score(args, predictor, data, recal, members)
    result["data"]["reader_log"] = reader_log
    result["seconds"] = round(time.perf_counter() - start, 1)
    _write_outputs(result, outputs)
    say(summary_line(result))
    say("wrote " + ", ".join(p for p in outputs.values() if p))
    return result


def summary_line(result: dict) -> str:
    t = result["two_class"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    auc = "n/a" if t["roc_auc"] is None else f"{t['roc_auc']:.3f}"
    line = (
        f"normal/abnormal on {t['num_examples']} cells ({t['num_abnormal']} abnormal): accuracy "
        f"{pct(t['accuracy'])}, sensitivity {pct(t['sensitivity'])}, specificity "
        f"{pct(t['specificity'])}, AUC {auc}, ECE {t['ece']:.3f}"
    )
    if result.get("full_class"):
        f = result["full_class"]
        line += f"; all classes: accuracy {pct(f['accuracy'])}, macro-F1 {f['macro_f1']:.3f}"
    return line


# ---------------------------------------------------------------------------------------------
# Outputs and the command line.


def _check_outputs(args) -> dict:
    """{"json", "diagram", "report"} paths; raises UserError on a clash (nothing written)."""
    if not args.output.lower().endswith(".json"):
        raise console.UserError(f"--output must end in .json, got {args.output!r}")
    if args.report and not args.report.lower().endswith((".html", ".htm")):
        raise console.UserError(f"--report must end in .html, got {args.report!r}")
    outputs = {
        "json": args.output,
        "diagram": os.path.splitext(args.output)[0] + ".reliability.png",
        "report": args.report,
    }
    existing = [p for p in outputs.values() if p and os.path.exists(p)]
    if existing and not args.overwrite:
        raise console.UserError(
            f"{', '.join(existing)} exist(s); choose another --output/--report or pass --overwrite"
        )
    return outputs


def _diagram(result: dict) -> np.ndarray:
    """The reliability diagram of the scored normal/abnormal probabilities (and the model's
    own before a recalibration)."""
    preds = result["predictions"]
    truth = np.array([p["abnormal"] for p in preds], int)
    curves = {}
    for key, name in (("p_abnormal", "model"), ("p_abnormal_recalibrated", "recalibrated")):
        if preds and key in preds[0]:
            p = np.array([row[key] for row in preds])
            curves[name] = np.stack([1.0 - p, p], axis=1)
    if "recalibrated" in curves:
        t = result["recalibration"]["temperature"]
        curves = {f"recalibrated T={t:.2f}": curves["recalibrated"], "model": curves["model"]}
    return calibration.reliability_diagram(curves, truth, title="Reliability, normal vs abnormal")


def _write_outputs(result: dict, outputs: dict) -> None:
    import cv2

    image = _diagram(result)
    ok, png = cv2.imencode(".png", image[..., ::-1])
    if not ok:
        raise OSError("could not encode the reliability diagram")
    fileio.atomic_write_bytes(outputs["diagram"], png.tobytes())
    result["two_class"]["reliability_diagram"] = os.path.basename(outputs["diagram"])
    fileio.atomic_write_json(outputs["json"], result)
    if outputs["report"]:
        from sipak_jax import evaluation_report

        html = evaluation_report.render(result, png.tobytes())
        fileio.atomic_write_text(outputs["report"], html)


def _parser() -> argparse.ArgumentParser:
    from sipak_jax.predictor import DEFAULT_BATCH_SIZE

    p = argparse.ArgumentParser(
        prog="python -m sipak_jax.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", required=True, help="model DIR, A,B,C or a fold=all workdir")
    p.add_argument("--dataset", required=True, help="sipakmed, herlev, cric or cell_folder")
    p.add_argument("--data_dir", default=None, help="where the TFDS build is")
    p.add_argument("--manual_dir", default=None, help="the dataset as the user has it")
    p.add_argument("--dataset_config", default="grouped", help="fold config (or builder config)")
    p.add_argument("--split", default="all", help="all, or folds: fold0,fold1,...")
    p.add_argument("--view", default="2class", choices=VIEWS)
    p.add_argument(
        "--calibrate_split",
        default=None,
        help="folds held out from --split to fit a normal/abnormal temperature on",
    )
    p.add_argument("--taxonomy", default=None, help="cell_folder: the taxonomy JSON")
    p.add_argument("--group_regex", default=None, help="cell_folder: the grouping rule")
    p.add_argument("--group_csv", default=None, help="cell_folder: file,group CSV")
    p.add_argument("--crop_size", type=int, default=None, help="cric: the crop size")
    p.add_argument("--output", required=True, help="OUT.json")
    p.add_argument("--report", default=None, help="OUT.html (optional)")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--verbosity", type=int, default=0, help="1: show the libraries' log lines")
    return p


def _check_args(args) -> None:
    from tfds_sipakmed import datasets

    if (args.data_dir is None) == (args.manual_dir is None):
        raise console.UserError("give exactly one of --data_dir (a TFDS build) and --manual_dir")
    if args.dataset not in datasets.NAMES:
        raise console.UserError(f"--dataset={args.dataset!r}: one of {', '.join(datasets.NAMES)}")
    if args.batch_size < 1:
        raise console.UserError("--batch_size must be at least 1")
    if args.data_dir and (args.taxonomy or args.group_regex or args.group_csv or args.crop_size):
        raise console.UserError(
            "--taxonomy, --group_regex, --group_csv and --crop_size apply when reading "
            "--manual_dir; a TFDS build (--data_dir) carries its own"
        )
    if args.split != "all" and not _splits(args.split):
        raise console.UserError("--split is empty: give all or fold0,fold1,...")
    if args.calibrate_split:
        both = set(_splits(args.calibrate_split)) & set(_splits(args.split))
        if both:
            raise console.UserError(
                f"--calibrate_split and --split share {', '.join(sorted(both))}: calibrate on "
                "folds that are not evaluated, e.g. --calibrate_split=fold0 "
                "--split=fold1,fold2,fold3,fold4"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.quiet_libraries(args.verbosity)
    try:
        _check_args(args)
        run(args)
    except console.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return console.EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
