"""Training and evaluation: `train_and_evaluate(config, workdir)`, the one call main.py makes.

One fold is set-up -> loop -> finalize:

- checks first, before anything is created (`_preflight`): the config's values, the workdir
  (`sipak_jax.workdir`: start, resume, refuse a changed config, or say where a finished run's
  results are), the data (`train_data.plan_dataset`) and the weights
  (`train_setup.locate_weights`); a problem is a `console.UserError` naming the fix;
- `train_setup.setup`: mesh, data, model, optimizer, replicated state, jitted steps (from
  `sipak_jax.train_step`), checkpointer, restore;
- `train_loop.train_loop`: the steps and the periodic actions (logging, validation,
  overlays, checkpoints, the per-epoch console line, profiling); SIGTERM saves and stops;
- `finalize.finalize`: the best checkpoint, then `config.evaluators` (calibration, test,
  shortcuts, `results.json`, artifacts, report).

`config.fold = 'all'` trains the five folds in `DIR/fold<k>/` (a finished fold is kept as it
is) and writes `DIR/cv_results.json` and `DIR/cv_results.md` (mean and standard deviation).
Randomness is a pure function of (seed, step) and the input pipeline can start at any step, so
a resumed run ends bitwise equal to an uninterrupted one (CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap
import time

import jax

from sipak_jax import (
    augment,
    console,
    evaluation,
    fileio,
    finalize,
    input_pipeline,
    train_data,
    train_setup,
)
from sipak_jax import workdir as workdirs
from sipak_jax.console import UserError
from sipak_jax.models import registry
from sipak_jax.train_loop import NonFiniteLossError, train_loop
from sipak_jax.train_step import DTYPES
from sipak_jax.writers import WRITER_KINDS, create_writer
from tfds_sipakmed.folds import NUM_FOLDS

__all__ = ["NonFiniteLossError", "check_config", "train_and_evaluate", "train_one_fold"]


@dataclasses.dataclass(frozen=True)
class _Checked:
    """What `_preflight` found: the workdir plan, where the data is, the weights' path."""

    plan: workdirs.Plan
    data: train_data.DataPlan | None = None
    init_path: str = ""


# ---- Entry points ----------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains on the configured fold(s) and evaluates the best checkpoint on the test fold.

    Returns the `results.json` dict (for `fold='all'`, the cross-validation summary).
    Raises `console.UserError` for a mistake the user can fix, before creating anything.
    """
    check_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if str(config.fold) == "all":
        return _cross_validate(config, workdir)
    return train_one_fold(config, workdir, int(config.fold))


def train_one_fold(config, workdir: str, fold: int) -> dict:
    """Trains with `fold` as the test fold (checks first); returns the results dict."""
    check_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    checked = _preflight(config, workdir, workdir)
    if checked.plan.action == "finished":
        return _finished(checked.plan)
    _show_config(config)
    return _run_fold(config, fold, checked)


def check_config(config) -> None:
    """Field values that can be checked without touching anything; UserError otherwise."""
    fold = str(config.fold)
    if fold != "all" and (not fold.isdigit() or not 0 <= int(fold) < NUM_FOLDS):
        raise UserError(f"config.fold must be 0..{NUM_FOLDS - 1} or 'all', got {config.fold!r}")
    if config.compute_dtype not in DTYPES:
        raise UserError(
            f"config.compute_dtype must be one of {sorted(DTYPES)}, got {config.compute_dtype!r}"
        )
    if config.head_epochs >= config.num_epochs and config.num_epochs > 0:
        raise UserError(
            f"config.head_epochs ({config.head_epochs}) must be smaller than config.num_epochs "
            f"({config.num_epochs}): the whole network must train for at least one epoch"
        )
    if config.writer not in WRITER_KINDS:
        raise UserError(f"config.writer must be one of {WRITER_KINDS}, got {config.writer!r}")
    train_data.check_dataset_config(config)
    try:
        augment.build_ops(tuple(config.augment))  # a misspelt op fails now, not after set-up
    except (KeyError, ValueError) as e:
        raise UserError(f"config: {e}") from None
    finalize.check_evaluators(config.evaluators)
    try:  # the model section (family, sizes, head) before anything is built
        registry.training_config(config.model, 2)
    except ValueError as e:
        raise UserError(f"config: {e}") from None
    _check_finite(config.to_dict(), "config")


def _check_finite(d: dict, prefix: str) -> None:
    """NaN and Inf have no place in a config (and no JSON form for config.json)."""
    for k, v in d.items():
        if isinstance(v, dict):
            _check_finite(v, f"{prefix}.{k}")
        elif isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{prefix}.{k} must be a finite number, got {v}")


def _show_config(config) -> None:
    """The config, once (process 0), as wrapped `key=value` pairs."""
    if jax.process_index() != 0:
        return
    flat = workdirs.flatten(workdirs.config_dict(config))
    pairs = [f"{k}={json.dumps(v) if isinstance(v, str | list) else v}" for k, v in flat.items()]
    console.say(
        textwrap.fill("  ".join(pairs), 100, initial_indent="config: ", subsequent_indent="  ")
    )


# ---- Checks before anything is created -------------------------------------------------------


def _preflight(config, workdir: str, data_root: str) -> _Checked:
    """Reads only: the workdir's plan, then (unless finished) the data and the weights."""
    plan = workdirs.decide(workdir, config)
    if plan.action == "finished":
        return _Checked(plan)
    return _Checked(
        plan, train_data.plan_dataset(config, data_root), train_setup.locate_weights(config)
    )


def _finished(plan: workdirs.Plan) -> dict:
    """A finished run: say where its results are; the test fold is not read again."""
    with open(plan.results_path, encoding="utf-8") as f:
        results = json.load(f)
    if jax.process_index() == 0:
        test = results.get("test") or {}
        console.say(
            f"{plan.workdir} is finished (test accuracy {_fmt(test.get('accuracy'))}, macro-F1 "
            f"{_fmt(test.get('macro_f1'))}); its test fold is not read again."
        )
        _where(plan.workdir, results_file=plan.results_path)
        console.say(
            "To evaluate it again (a second look at the test fold), add "
            "--config.reevaluate=True: it writes results.reeval<k>.json beside results.json."
        )
    return results


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ---- One fold --------------------------------------------------------------------------------


def _run_fold(config, fold: int, checked: _Checked) -> dict:
    """Set-up -> loop -> finalize for one fold whose checks passed."""
    t_start, plan = time.time(), checked.plan
    if jax.process_index() == 0:
        workdirs.record(plan, config)
    run = train_setup.setup(
        config, plan.workdir, fold, checked.data, checked.init_path,
        write_metadata=plan.action != "reevaluate",
    )  # fmt: skip
    try:
        if plan.action == "reevaluate":
            return _reevaluate(run, plan, t_start)
        return _train(run, plan, t_start)
    finally:
        run.ckpt.close()


def _train(run, plan, t_start: float) -> dict:
    _announce(run, plan)
    writer, uses_clu = create_writer(run.workdir, run.config.writer, just_logging=not run.is_main)
    try:
        if run.start_step == 0:
            writer.write_hparams(workdirs.flatten(workdirs.config_dict(run.config)))
        loop = train_loop(run, writer)
        if loop.stopped:
            return _stopped(run, loop)
        steps = run.total_steps - run.start_step
        timing = finalize.timing_record(
            loop.timing, time.time() - t_start, steps, run.config.batch_size
        )
        path = os.path.join(run.workdir, workdirs.RESULTS_FILE)
        results = finalize.finalize(run, loop.state, writer, timing, results_path=path)
    finally:
        writer.close()
    if run.is_main:
        _summary(run, results, path, uses_clu)
    return results


def _reevaluate(run, plan, t_start: float) -> dict:
    """A finished run evaluated again on request: a new results file beside results.json."""
    if run.is_main:
        console.say(f"re-evaluating {run.workdir} (config.reevaluate=True)")
    timing = finalize.timing_record({}, time.time() - t_start, 0, run.config.batch_size)
    results = finalize.finalize(
        run, run.state, None, timing, results_path=plan.results_path, primary=False
    )
    if run.is_main:
        console.say(f"{_test_line(run, results)}\nresults:     {plan.results_path}")
    return results


def _announce(run, plan) -> None:
    if not run.is_main:
        return
    data = run.data
    if run.start_step:
        what = f"resuming at step {run.start_step} (epoch {run.start_step // run.steps_per_epoch})"
    else:
        what = "new run"
    init = f"from {run.config.init_from}" if run.config.init_from else "from scratch"
    console.say(
        f"fold {run.fold} of {run.config.dataset}/{run.config.dataset_config} in {run.workdir} "
        f"({what})\n"
        f"data: {run.data_plan.describe()}: {data.num('train')} train, "
        f"{data.num('validation')} validation, {data.num('test')} test cells; "
        f"{run.steps_per_epoch} steps of {run.config.batch_size} per epoch\n"
        f"model: {registry.describe(run.metadata.model)}, {init}, {run.config.compute_dtype} on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
    )
    for line in data.warnings:  # e.g. a cell folder without a grouping rule: not leak-free
        console.say(f"warning: {line}")
    for change in plan.changes:
        console.say(f"config change accepted: {change}")


def _stopped(run, loop) -> dict:
    if run.is_main:
        console.say(
            f"stopped by {loop.stopped} at step {loop.step} of {run.total_steps}; the checkpoint "
            "is saved: rerun the same command to resume"
        )
    return {"stopped_early": True, "step": loop.step, "signal": loop.stopped}


def _test_line(run, results: dict) -> str:
    test = results.get("test")
    if not test:
        return f"fold {run.fold}: best step {results['best_step']} (no test evaluator)"
    line = (
        f"test fold {run.fold} (best epoch {results['best_epoch']}): accuracy "
        f"{_fmt(test['accuracy'])}  macro-F1 {_fmt(test['macro_f1'])}"
    )
    abnormal = test.get("abnormal_vs_nilm")
    if abnormal:
        line += (
            f"  abnormal sensitivity {_fmt(abnormal['sensitivity'])} specificity "
            f"{_fmt(abnormal['specificity'])}"
        )
    return line


def _summary(run, results: dict, results_path: str, uses_clu: bool) -> None:
    console.say(_test_line(run, results))
    _where(run.workdir, results_file=results_path, tensorboard=uses_clu)


def _where(workdir: str, *, results_file: str, tensorboard: bool | None = None) -> None:
    """The last lines: where the results, the report and the logs are."""
    console.say(f"results:     {results_file}")
    report = os.path.join(workdir, "report.html")
    if os.path.isfile(report):
        console.say(f"report:      {report}")
    if tensorboard is None:  # event files here or in the folds' directories
        tensorboard = any(
            n.startswith("events.out.tfevents") for _, _, files in os.walk(workdir) for n in files
        )
    metrics = os.path.join(workdir, "metrics.jsonl")
    if tensorboard:
        console.say(f"TensorBoard: tensorboard --logdir={workdir}")
    elif os.path.isfile(metrics):
        console.say(f"metrics:     {metrics}")


# ---- Cross-validation ------------------------------------------------------------------------


def _cross_validate(config, workdir: str) -> dict:
    """The five folds in `workdir/fold<k>` (every fold checked before any starts), then their
    mean and standard deviation."""
    top = workdirs.decide(workdir, config)  # the whole run's config, fold 'all'
    configs, checked = [], []
    for fold in range(NUM_FOLDS):
        fold_config = config.copy_and_resolve_references()
        with fold_config.unlocked():
            fold_config.fold = str(fold)
        configs.append(fold_config)
        checked.append(_preflight(fold_config, os.path.join(workdir, f"fold{fold}"), workdir))
    summary_path = os.path.join(workdir, "cv_results.json")
    finished = all(c.plan.action == "finished" for c in checked)
    if finished and os.path.isfile(summary_path):
        if jax.process_index() == 0:
            console.say(f"{workdir}: all {NUM_FOLDS} folds are finished; nothing is read again")
            _where(workdir, results_file=summary_path)
        with open(summary_path, encoding="utf-8") as f:
            return json.load(f)
    _show_config(config)
    if jax.process_index() == 0:
        workdirs.record(top, config)
    results = []
    with input_pipeline.reuse_decoded():  # each cell decoded once for the five folds
        for fold, (fold_config, c) in enumerate(zip(configs, checked, strict=True)):
            if jax.process_index() == 0:
                console.say(f"=== fold {fold} of {NUM_FOLDS} ===")
            finished = c.plan.action == "finished"
            result = _finished(c.plan) if finished else _run_fold(fold_config, fold, c)
            if result.get("stopped_early"):
                return {"stopped_early": True, "fold": fold}
            results.append(result)
    return _write_cv_summary(workdir, results, any(c.plan.action == "reevaluate" for c in checked))


def _write_cv_summary(workdir: str, results: list[dict], reevaluated: bool) -> dict:
    summary = evaluation.summarize_folds(results)
    name = "cv_results"
    if reevaluated:  # the first summary stays; the re-evaluation's goes beside it
        k = 1
        while os.path.exists(os.path.join(workdir, f"cv_results.reeval{k}.json")):
            k += 1
        name = f"cv_results.reeval{k}"
    if jax.process_index() == 0:
        fileio.atomic_write_json(os.path.join(workdir, f"{name}.json"), summary)
        fileio.atomic_write_text(os.path.join(workdir, f"{name}.md"), summary["table"])
        console.say(f"cross-validation over {len(results)} folds:\n{summary['table']}")
        console.say(f"results:     {os.path.join(workdir, name + '.json')}")
    return summary
