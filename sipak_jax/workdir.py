"""What starting a run on a workdir does: start, resume, refuse, or report a finished run.

A training workdir remembers the config it was started with (`config.json`). Before anything
is created or read, `decide(workdir, config)` compares it with the new config:

- no `config.json`: **start** (the workdir may exist, e.g. empty; a workdir holding checkpoints
  or results but no `config.json` is refused: it was not made by this trainer);
- same config: **resume** exactly where the checkpoints stop (bitwise on a CPU);
- changed config: **refused** with the fields that differ (`old -> new`) and the ways out,
  unless every change is safe:
  - `SAFE_FIELDS` change how a run is watched, logged, cached or checkpointed, never what it
    computes (`log_every_steps`, `writer`, `prefetch`, `evaluators`, ...): accepted;
  - `num_epochs` may grow with `--config.allow_more_epochs=True`, before the run has finished
    (the learning-rate schedule is then the longer run's from the current step on, so the
    result is not the one a fresh run of that length would give);
- finished (`results.json` present): the test fold is **not** read again; `decide` returns
  `finished` and the caller says where the results are. `--config.reevaluate=True` asks for a
  re-evaluation explicitly: it writes `results.reeval<k>.json` beside the first run's
  `results.json`, which is never overwritten.

`ACTION_FIELDS` (`reevaluate`, `allow_more_epochs`) say what to do this time and are never
compared. `record(plan, config)` then writes the new `config.json` and, when safe changes were
accepted, appends them to `config_changes.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from sipak_jax import fileio
from sipak_jax.console import UserError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
CHANGES_FILE = "config_changes.jsonl"
CHECKPOINTS = "checkpoints"

ACTION_FIELDS = ("reevaluate", "allow_more_epochs")
SAFE_FIELDS = (
    "log_every_steps",
    "checkpoint_every_steps",
    "async_checkpoints",
    "writer",
    "profile_steps",
    "prefetch",
    "compilation_cache_dir",
    "checkpoint_every_epochs",
    "num_overlay_cells",
    "overlay_method",
    "evaluators",
)
_ABSENT = "(absent)"
# Fields added after workdirs were written, with the value that keeps the old behaviour: a
# workdir whose config.json lacks one resumes when the new config has exactly that value.
ADDED_FIELDS = {
    "group_regex": "",
    "group_csv": "",
    "taxonomy": "",
    "crop_size": 0,
    "model.name": "resnet",
    "model.drop_path": 0.0,
    "model.head": "gap",
    "optimizer.layer_decay": 1.0,
}


@dataclasses.dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """`action` is 'start', 'resume', 'finished' or 'reevaluate'; `results_path` is the
    finished run's results.json ('finished') or the file a re-evaluation writes."""

    action: str
    workdir: str
    changes: tuple[Change, ...] = ()
    results_path: str | None = None


def _show(v) -> str:
    return v if v is _ABSENT else json.dumps(v)


def config_dict(config) -> dict:
    """The config as `config.json` holds it (JSON types: tuples become lists)."""
    return json.loads(fileio.to_json(config.to_dict()))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(old: dict, new: dict) -> list[Change]:
    """The fields (dotted paths) whose values differ, action fields left out."""
    a, b = flatten(old), flatten(new)
    return [
        Change(k, a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(set(a) | set(b))
        if k not in ACTION_FIELDS and a.get(k, _ABSENT) != b.get(k, _ABSENT)
    ]


def read_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path} cannot be read ({e}); this workdir cannot be resumed: start the run with "
            "another --workdir"
        ) from None


def is_finished(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, RESULTS_FILE))


def _is_safe(change: Change, config, finished: bool) -> bool:
    if change.field in SAFE_FIELDS:
        return True
    if change.old is _ABSENT and ADDED_FIELDS.get(change.field, _ABSENT) == change.new:
        return True
    if change.field == "num_epochs" and config.get("allow_more_epochs", False):
        return not finished and isinstance(change.old, int) and change.new > change.old
    return False


def _refusal(workdir: str, changes: list[Change], finished: bool) -> UserError:
    listed = "; ".join(str(c) for c in changes)
    more = (
        "the run has finished and its test fold was read: a longer run is a new run"
        if finished
        else "to train longer, add --config.allow_more_epochs=True (only num_epochs may grow)"
    )
    return UserError(
        f"{workdir} was started with another config ({CONFIG_FILE}): {listed}. Rerun with the "
        f"same config to resume, or pass a new --workdir for the new config; {more}"
    )


def next_reevaluation_path(workdir: str) -> str:
    k = 1
    while os.path.exists(os.path.join(workdir, f"results.reeval{k}.json")):
        k += 1
    return os.path.join(workdir, f"results.reeval{k}.json")


def decide(workdir: str, config) -> Plan:
    """What running `config` on `workdir` does (reads only; raises UserError when refused)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a directory; pass a directory")
    old = read_config(workdir)
    finished = is_finished(workdir)
    if old is None:
        if finished or os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
            raise UserError(
                f"{workdir} holds checkpoints or results but no {CONFIG_FILE}: it was not made "
                "by this trainer and cannot be resumed; pass a new --workdir"
            )
        return Plan("start", workdir)
    changes = diff(old, config_dict(config))
    unsafe = [c for c in changes if not _is_safe(c, config, finished)]
    if unsafe:
        raise _refusal(workdir, unsafe, finished)
    if finished and config.get("reevaluate", False):
        return Plan("reevaluate", workdir, tuple(changes), next_reevaluation_path(workdir))
    if finished:
        return Plan("finished", workdir, tuple(changes), os.path.join(workdir, RESULTS_FILE))
    return Plan("resume", workdir, tuple(changes))


def record(plan: Plan, config) -> None:
    """Writes `config.json` (the config this run uses) and logs accepted changes (process 0)."""
    if plan.action in ("finished", "reevaluate"):
        return
    os.makedirs(plan.workdir, exist_ok=True)
    fileio.atomic_write_json(os.path.join(plan.workdir, CONFIG_FILE), config_dict(config))
    if plan.changes:
        line = {"time": round(time.time(), 3), "changes": [str(c) for c in plan.changes]}
        with open(os.path.join(plan.workdir, CHANGES_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
