"""The end of a run: the best checkpoint, then what `config.evaluators` asks for, once.

`finalize(run, state, writer, timing)` restores the best checkpoint (validation macro-F1; ties:
the earliest step, `checkpointing.pick_best_step`), computes the validation and, when asked,
test logits, and runs the evaluators named in `config.evaluators`, always in this order:

- `calibration`: temperature scaling fitted on validation, scored on the test fold
  (`results["calibration"]`, `reliability.png`, the temperature in `metadata.json`);
- `test`: the test fold's metrics and per-example predictions (`results["test"]`,
  `results["predictions"]`), both after the fitted temperature (1 without calibration);
- `shortcuts`: size-only and colour-only classifiers on the same folds (`results["shortcuts"]`);
- then `results.json` is written, and after it:
- `artifacts`: saliency overlays of selected test calls for the report
  (`sipak_jax.run_artifacts`, `workdir/artifacts/`);
- `report`: `report.html` (`sipak_jax.report`, which only renders the files above).

`calibration`, `artifacts` and `report` need `test` (`check_evaluators`). A re-evaluation of a
finished run (`primary=False`) writes only its own results file: `results.json`,
`metadata.json`, the report and its artifacts stay the first run's.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from absl import logging

from sipak_jax import evaluation, fileio, metrics, model_io
from sipak_jax.calibration import softmax
from sipak_jax.console import UserError
from sipak_jax.train_setup import Run, restore_best
from sipak_jax.train_step import TrainState

NEEDS_TEST = ("calibration", "artifacts", "report")
SELECTION = "best validation macro-F1 (val_macro_f1); the test fold read once"


@dataclasses.dataclass
class Final:
    """What the evaluators read and fill in."""

    run: Run
    state: TrainState
    results: dict
    val: tuple  # (logits, labels)
    test: tuple | None  # (logits, labels, index)
    results_path: str
    primary: bool
    temperature: float = 1.0


def _calibration(f: Final) -> None:
    from sipak_jax import calibration

    (val_logits, val_labels), (test_logits, test_labels, _) = f.val, f.test
    if not len(val_labels):
        f.results["calibration"] = None
        return
    cal = calibration.calibration_summary(val_logits, val_labels, test_logits, test_labels)
    f.temperature = float(cal["temperature"])
    f.results["calibration"] = cal
    if f.primary and f.run.is_main:
        calibration.write_reliability_diagram(
            os.path.join(f.run.workdir, "reliability.png"),
            {
                "before": softmax(test_logits),
                f"after T={f.temperature:.2f}": softmax(test_logits, f.temperature),
            },
            test_labels,
            title=f"Reliability, test fold {f.run.fold}",
        )
        cal["diagram"] = "reliability.png"


def _test(f: Final) -> None:
    logits, labels, index = f.test
    # The fitted temperature, as `predict` and the predictions below use it: the grouped
    # calls (abnormal vs NILM) are those a user of the model gets.
    f.results["test"] = evaluation.eval_summary(logits, labels, f.run.taxonomy, f.temperature)
    f.results["test"]["temperature"] = f.temperature
    examples = f.run.data.examples("test")
    probs = softmax(logits, f.temperature)
    f.results["predictions"] = [
        {
            "index": int(index[i]),
            **examples.get(int(index[i]), {}),
            "label": int(labels[i]),
            "prediction": int(np.argmax(probs[i])),
            "probabilities": [round(float(p), 6) for p in probs[i]],
            "logits": [round(float(z), 5) for z in logits[i]],
        }
        for i in range(len(labels))
    ]
    f.results["predictions_note"] = "probabilities after temperature scaling"


def _shortcuts(f: Final) -> None:
    """Size-only and colour-only controls on the same folds (sipak_jax.shortcuts)."""
    from sipak_jax import shortcuts

    inputs = f.run.data.shortcut_inputs()
    if inputs is None:
        f.results["shortcuts"] = {"skipped": "several processes: each holds only its share"}
        return
    shapes, colours, labels, is_test = inputs
    folds = np.where(is_test, f.run.fold, -1)
    f.results["shortcuts"] = shortcuts.shortcut_controls(
        shapes, colours, labels, folds, f.run.fold,
        taxonomy=f.run.taxonomy, seed=int(f.run.config.seed),
    )  # fmt: skip


def _artifacts(f: Final) -> None:
    from sipak_jax import run_artifacts

    run = f.run
    cache = run.data.caches["test"]
    images = {int(i): img for i, img in zip(cache.index, cache.image, strict=True)}
    roots = run_artifacts.image_roots(run.workdir, run.config.to_dict(), run.metadata)
    cells = run_artifacts.cells_for_run(
        f.results["predictions"], run.taxonomy, image_roots=roots, images=images
    )
    metadata = dataclasses.replace(run.metadata, temperature=f.temperature)
    run_artifacts.write_run_artifacts(run.workdir, run.model(f.state), metadata, cells)


def _report(f: Final) -> None:
    from sipak_jax import report

    report.write_report(f.run.workdir)


EVALUATORS = {
    "calibration": _calibration,
    "test": _test,
    "shortcuts": _shortcuts,
    "artifacts": _artifacts,
    "report": _report,
}
_AFTER_RESULTS = ("artifacts", "report")  # they read the files written before them


def check_evaluators(evaluators) -> tuple[str, ...]:
    """The configured evaluators in run order; UserError for an unknown or unmet name."""
    names = tuple(evaluators)
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise UserError(f"config.evaluators: unknown {unknown}; known: {', '.join(EVALUATORS)}")
    if "test" not in names and any(n in names for n in NEEDS_TEST):
        needing = [n for n in names if n in NEEDS_TEST]
        raise UserError(f"config.evaluators: {', '.join(needing)} need 'test' in the list too")
    return tuple(n for n in EVALUATORS if n in names)


def _logits(run: Run, state: TrainState, split: str, with_index=False):
    return evaluation.run_eval(
        run.eval_step,
        state,
        run.data.eval_batches(split),
        num_classes=run.taxonomy.num_classes,
        with_index=with_index,
    )


def _evaluate(f: Final, name: str) -> None:
    """Runs one evaluator; one that only adds pictures or pages must not lose a finished run."""
    if name not in _AFTER_RESULTS:
        EVALUATORS[name](f)
        return
    try:
        EVALUATORS[name](f)
    except Exception as e:  # noqa: BLE001 - results.json is written; say how to redo this part
        redo = (
            "python -m sipak_jax.run_artifacts"
            if name == "artifacts"
            else "python -m sipak_jax.report"
        )
        logging.error(
            "%s failed (%r); results.json is intact; rerun: %s --workdir=%s",
            name,
            e,
            redo,
            f.run.workdir,
        )


def finalize(
    run: Run, state: TrainState, writer, timing: dict, *, results_path: str, primary=True
) -> dict:
    """Evaluates the best checkpoint as `config.evaluators` asks; writes `results_path`
    (process 0) and returns the results dict."""
    names = check_evaluators(run.config.evaluators)
    state, best, best_meta = restore_best(run, state)
    results = {
        "fold": run.fold,
        "best_step": best,
        "best_epoch": best_meta.get("epoch"),
        "selection": SELECTION,
        "class_names": list(run.taxonomy.class_names),
        "dataset": _dataset_record(run),
    }
    val = _logits(run, state, "validation")
    results["validation"] = evaluation.eval_summary(*val, run.taxonomy)
    test = _logits(run, state, "test", with_index=True) if "test" in names else None
    f = Final(run, state, results, val, test, results_path, primary)
    for name in (n for n in names if n not in _AFTER_RESULTS):
        _evaluate(f, name)
    results["timing"] = timing
    if run.is_main:
        if primary:
            metadata = dataclasses.replace(run.metadata, temperature=f.temperature)
            model_io.write_metadata(run.workdir, metadata)
        fileio.atomic_write_json(results_path, results)
    if primary:
        _write_test_summaries(run, writer, results)
        for name in (n for n in names if n in _AFTER_RESULTS and run.is_main):
            _evaluate(f, name)
    return results


def _dataset_record(run: Run) -> dict:
    """results.json's `dataset`: which data, its taxonomy, its grouping rule (is the protocol
    leak-free?) and the reader's warnings (e.g. no grouping rule given)."""
    data = run.data
    return {
        "name": str(run.config.dataset),
        "config": str(run.config.dataset_config),
        "taxonomy": run.taxonomy.to_dict(),
        "grouping": data.grouping,
        "leak_free": bool(data.grouping["leak_free"]) if data.grouping else None,
        "warnings": list(data.warnings),
    }


def _write_test_summaries(run: Run, writer, results: dict) -> None:
    if writer is None or "test" not in results:
        return
    step = int(run.total_steps)
    writer.write_scalars(step, evaluation.eval_scalars(results["test"], "test"))
    image = metrics.confusion_matrix_image(
        results["test"]["confusion_matrix"],
        run.taxonomy.class_names,
        as_float=True,
        title=f"test fold {run.fold}",
    )
    writer.write_images(step, {"test/confusion_matrix": image[None]})
    writer.flush()


def timing_record(loop_timing: dict, wall_s: float, steps: int, batch_size: int) -> dict:
    """results.json's `timing`: wall time, steps run in this process and the loop's timing."""
    return {
        "wall_s": round(wall_s, 2),
        "steps": steps,
        "batch_size": int(batch_size),
        "devices": jax.device_count(),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in loop_timing.items()},
    }
