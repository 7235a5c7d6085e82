"""Ensembles of model DIRs: one predictor over several members, with their disagreement.

    predictor = ensemble.load_predictor("workdirs/r50_cv")           # a fold=all workdir
    predictor = ensemble.load_predictor("runs/r50,runs/convnext,runs/vit")
    probs, uncertainty = predictor.predict_with_uncertainty(images_uint8)

A checkpoint SPEC (`--checkpoint=` of predict, explain, evaluate and the server) is one model
DIR, a comma-separated list of them (`A,B,C`), or a `fold=all` training workdir, whose
`fold<k>/` subdirectories are the members (`resolve_members`). One member gives a plain
`predictor.Predictor`; several give an `EnsemblePredictor` with the same attributes and methods.

What the ensemble computes (images: uint8 [N, S, S, 3], the same input frame for every member):
- Each member is a `predictor.Predictor`: its own weights in one jitted function, its own
  normalisation (mean/std/channel order are applied inside that function) and its own
  temperature (fitted on its validation split when it was trained). Members are loaded once
  and run back to back on each batch.
- `member_probabilities(images)` -> [M, N, K]: each member's temperature-scaled softmax.
- `probabilities(images)` -> [N, K]: their mean, p = mean_m p_m. With an ensemble temperature
  T_e != 1 (`calibrate`), p = softmax(log(mean_m p_m) / T_e); by default T_e = 1 (`temperature`).
- Uncertainty, `predict_with_uncertainty(images)` -> (p [N, K], u [N]): the members'
  disagreement as the mutual information between the prediction and the member (the BALD
  score): u = H(mean_m p_m) - mean_m H(p_m) = mean_m KL(p_m || mean_m p_m), in nats, natural
  log, computed on the members' probabilities before any ensemble temperature. It is 0 exactly
  when every member gives the same probabilities and grows as they disagree; it is at most
  log(M) and at most log(K). A single model has no such measure: None (the `uncertainty`
  column is null).
- `explain(images, method, targets)`: the mean of the members' normalised maps (each in
  [0, 1], each at its member's own overlay stage) for the same target classes. Where members
  look at different places the mean is dimmer and wider: the overlay shows their consensus.

Calibration of the ensemble itself: each member is already temperature-scaled. `calibrate(
images, labels)` fits T_e on labelled held-out images (NLL of softmax(log(mean p) / T_e), the
bisection of `calibration.fit_temperature`) and sets `temperature`; nothing calls it unless
such data is given (`python -m sipak_jax.evaluate --calibrate_split=...`). A `fold=all`
ensemble has no such split: every cell was in the training or validation data of at least
four of its five members, so its T_e stays 1 (the mean of the members' calibrated
probabilities) and the evaluation says so.

Members must agree on the taxonomy (class names, views, abnormal set, readings) and on the
input frame (`preprocessing.image_size` and `resize`); otherwise `EnsembleError` names the
member and the field, before any weights are loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from sipak_jax.predictor import DEFAULT_BATCH_SIZE, Predictor

__all__ = [
    "EnsembleError",
    "EnsemblePredictor",
    "load_members",
    "load_predictor",
    "mutual_information",
    "resolve_members",
]

_FOLD_DIR = re.compile(r"fold(\d+)")
_METADATA = "metadata.json"


class EnsembleError(ValueError):
    """A checkpoint spec that cannot make one predictor (its message names the member)."""


# ---------------------------------------------------------------------------------------------
# Members.


def _fold_dirs(path: str) -> list[str]:
    """`path/fold<k>` subdirectories, ordered by k."""
    found = []
    for name in os.listdir(path):
        m = _FOLD_DIR.fullmatch(name)
        if m and os.path.isdir(os.path.join(path, name)):
            found.append((int(m.group(1)), os.path.join(path, name)))
    return [p for _, p in sorted(found)]


def _expand(item: str) -> list[str]:
    """One spec item -> its member DIRs (itself, or a fold=all workdir's folds)."""
    if not os.path.exists(item):
        raise FileNotFoundError(f"--checkpoint: {item} does not exist")
    if not os.path.isdir(item):
        raise EnsembleError(f"--checkpoint: {item} is not a directory (a model DIR is one)")
    if os.path.isfile(os.path.join(item, _METADATA)):
        return [item]
    folds = _fold_dirs(item)
    if not folds:
        raise EnsembleError(
            f"--checkpoint: {item} is neither a model DIR (no {_METADATA}) nor a fold=all "
            "workdir (no fold<k>/ subdirectories); give a training workdir, a converted DIR "
            "or DIR/fold<k>"
        )
    no_model = [f for f in folds if not os.path.isfile(os.path.join(f, _METADATA))]
    unfinished = [
        f
        for f in folds
        if f not in no_model
        and os.path.isdir(os.path.join(f, "checkpoints"))
        and not os.path.isfile(os.path.join(f, "results.json"))
    ]
    if no_model or unfinished:
        bad = ", ".join(os.path.basename(f) for f in no_model + unfinished)
        raise EnsembleError(
            f"--checkpoint: the fold=all workdir {item} has unfinished folds ({bad}): finish "
            "them by running the same training command again, or name the finished folds "
            f"yourself, e.g. --checkpoint={folds[0]},..."
        )
    return folds


def resolve_members(spec: str) -> list[str]:
    """The member DIRs of a checkpoint spec: "DIR", "A,B,C" or a fold=all workdir (its
    `fold<k>/` subdirectories, ordered by k; each must be a finished model DIR). Paths come
    back as given (joined with `fold<k>` for a fold=all workdir). Raises FileNotFoundError for
    a missing path and EnsembleError for anything else (empty spec, duplicates, a directory
    that is no model DIR, unfinished folds)."""
    items = [s.strip() for s in os.fspath(spec).split(",")]
    if not any(items):
        raise EnsembleError("--checkpoint is empty: give a model DIR, A,B,C or a fold=all workdir")
    if not all(items):
        raise EnsembleError(f"--checkpoint={spec!r} has an empty entry between commas")
    members = [m for item in items for m in _expand(item)]
    seen: dict[str, str] = {}
    for m in members:
        key = os.path.realpath(m)
        if key in seen:
            raise EnsembleError(f"--checkpoint names {m} twice (also as {seen[key]})")
        seen[key] = m
    return members


def _frame(spec: dict) -> tuple:
    from sipak_jax import preprocessing

    return int(spec["image_size"]), spec.get("resize", preprocessing.DEFAULT_RESIZE)


def check_compatible(metadata: Sequence, members: Sequence[str]) -> None:
    """Raises EnsembleError naming the first member whose taxonomy or input frame (image size,
    resize policy) differs from the first member's."""
    for meta, path in zip(metadata, members, strict=True):
        if meta.taxonomy is None:
            raise EnsembleError(f"ensemble member {path} is headless: it cannot classify")
    first, ref = metadata[0], members[0]
    for meta, path in zip(metadata[1:], members[1:], strict=True):
        if meta.taxonomy != first.taxonomy:
            a, b = first.taxonomy.to_dict(), meta.taxonomy.to_dict()
            fields = [k for k in a if a[k] != b.get(k)]
            raise EnsembleError(
                f"ensemble member {path} has another taxonomy than {ref} (differs in "
                f"{', '.join(fields)}: {b[fields[0]]!r} vs {a[fields[0]]!r}); members must "
                "classify the same classes"
            )
        if _frame(meta.preprocessing) != _frame(first.preprocessing):
            (s1, r1), (s2, r2) = _frame(first.preprocessing), _frame(meta.preprocessing)
            raise EnsembleError(
                f"ensemble member {path} takes {s2} px images resized by {r2!r}, {ref} takes "
                f"{s1} px by {r1!r}; members must share the input size and resize policy"
            )


# ---------------------------------------------------------------------------------------------
# The predictor.


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats (0 log 0 = 0)."""
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def mutual_information(member_probs: np.ndarray) -> np.ndarray:
    """[M, N, K] -> [N]: H(mean_m p_m) - mean_m H(p_m) (>= 0; 0 iff the members agree)."""
    member_probs = np.asarray(member_probs, np.float64)
    mi = entropy(member_probs.mean(0)) - entropy(member_probs).mean(0)
    return np.maximum(mi, 0.0)  # rounding can leave -1e-17 where members agree


class EnsemblePredictor:
    """Several `predictor.Predictor`s as one (module docstring). Attributes as `Predictor`:
    `spec` (the shared preprocessing of the first member), `image_size`, `taxonomy`,
    `class_names`, `temperature` (the ensemble's own, 1.0 unless `calibrate`d), `batch_size`,
    `members` (the member DIRs); plus `predictors` and `member_temperatures`."""

    def __init__(self, predictors: Sequence, members: Sequence[str], temperature: float = 1.0):
        if len(predictors) < 2 or len(predictors) != len(members):
            raise ValueError("an ensemble needs two or more predictors, one per member DIR")
        first = predictors[0]
        self.predictors = list(predictors)
        self.members = [os.fspath(m) for m in members]
        self.spec = dict(first.spec)
        self.image_size = first.image_size
        self.taxonomy = first.taxonomy
        self.class_names = first.class_names
        self.member_temperatures = [p.temperature for p in self.predictors]
        self.temperature = float(temperature)

    @property
    def batch_size(self) -> int:
        """The members' batch size (setting it sets every member's)."""
        return self.predictors[0].batch_size

    @batch_size.setter
    def batch_size(self, size: int) -> None:
        for p in self.predictors:
            p.batch_size = int(size)

    def member_probabilities(self, images: np.ndarray) -> np.ndarray:
        """[M, N, K]: each member's temperature-scaled probabilities, members back to back."""
        return np.stack([p.probabilities(images) for p in self.predictors])

    def _combine(self, member_probs: np.ndarray) -> np.ndarray:
        from sipak_jax.calibration import softmax

        mean = member_probs.mean(0)
        if self.temperature == 1.0:
            return mean
        return softmax(np.log(np.maximum(mean, np.finfo(np.float64).tiny)), self.temperature)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """The ensemble's probabilities [N, K], float64 (module docstring)."""
        return self._combine(self.member_probabilities(images))

    def predict_with_uncertainty(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, K], mutual information [N] in nats)."""
        member_probs = self.member_probabilities(images)
        return self._combine(member_probs), mutual_information(member_probs)

    def explain(self, images: np.ndarray, method: str, targets: np.ndarray) -> np.ndarray:
        """The mean of the members' normalised maps of `targets`, [N, S, S] in [0, 1]."""
        maps = [p.explain(images, method, targets) for p in self.predictors]
        return np.mean(np.stack(maps), axis=0)

    def calibrate(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Fits the ensemble temperature on held-out labelled images; sets and returns it."""
        from sipak_jax.calibration import fit_temperature

        mean = self.member_probabilities(images).mean(0)
        logits = np.log(np.maximum(mean, np.finfo(np.float64).tiny))
        self.temperature = float(fit_temperature(logits, labels))
        return self.temperature


def load_members(spec: str) -> list[tuple]:
    """[(member DIR, model, metadata)] of a checkpoint spec, each loaded once
    (`model_io.load_model_dir`). With several members every metadata is read and checked
    (`check_compatible`) before any weights are loaded."""
    from sipak_jax import model_io

    members = resolve_members(spec)
    if len(members) > 1:
        check_compatible([model_io.read_metadata(m) for m in members], members)
    return [(m, *model_io.load_model_dir(m)) for m in members]


def load_predictor(spec: str, batch_size: int = DEFAULT_BATCH_SIZE):
    """A `predictor.Predictor` for a one-member spec, else an `EnsemblePredictor`.

    Every member's metadata is read and checked (taxonomy, input frame) before any weights are
    loaded; then each member is loaded once. Raises FileNotFoundError, EnsembleError or
    `model_io`'s errors (ValueError), each naming the member.
    """
    predictors = [
        Predictor(model, meta, batch_size=batch_size, path=path)
        for path, model, meta in load_members(spec)
    ]
    if len(predictors) == 1:
        return predictors[0]
    return EnsemblePredictor(predictors, [p.members[0] for p in predictors])
