"""Predict on new cell images: `python -m sipak_jax.predict --checkpoint=DIR --output=FILE`.

    python -m sipak_jax.predict --checkpoint=WORKDIR --output=preds.jsonl cells/ extra.png
    python -m sipak_jax.predict --checkpoint=WORKDIR --output=preds.csv \
        --explain=gradcam --overlays=overlays/ cells/
    python -m sipak_jax.predict --checkpoint=runs/a,runs/b,runs/c --output=preds.jsonl cells/
    python -m sipak_jax.predict --checkpoint=workdirs/r50_cv --output=preds.jsonl cells/

`--checkpoint` is a model DIR (a training workdir: its best checkpoint; or a converted-weights
DIR), loaded by `sipak_jax.model_io.load_model_dir`; or an ensemble: several DIRs separated by
commas, or a `fold=all` training workdir (its `fold<k>/` are the members), whose probabilities
are the mean of the members' temperature-scaled probabilities (`sipak_jax.ensemble`, which
also defines the `uncertainty` column). Each image goes through exactly the
evaluation's preprocessing (`sipak_jax.preprocessing`: `read_image` converts BMP/PNG/JPEG/TIFF,
grayscale, RGBA and 16-bit to uint8 RGB; `preprocess_image` resizes with the model's policy and
size; `normalize` inside the jitted forward pass), in batches through one compiled function
(the last batch is padded, so it compiles once). Probabilities are softmax(logits / T) with the
model's `metadata.temperature` (fitted on validation at the end of training; 1 if none).

Output, one row per input file (`.jsonl`: one JSON object a line; `.csv`: the same as columns):
- `path`: the file as given, or found under a given directory (walked recursively, sorted;
  files with an image extension, see `sipak_jax.imageio.IMAGE_EXTENSIONS`; others are listed
  on stderr);
- `label`, `label_index`: the predicted class (argmax) and its index;
- `probabilities`: the full vector in class-index order (CSV: one `p_<class>` column each);
- `class_names` (jsonl only; the CSV names the classes in its `p_<class>` headers);
- what the classes mean, from the model's taxonomy (`metadata.taxonomy`, see
  `tfds_sipakmed.taxonomy`): `label_3class` and `label_2class`: the argmax of the
  probabilities summed per group of its "3class" / "2class" view, as `sipak_jax.metrics`
  computes them (SIPaKMeD: normal / benign / abnormal and normal / abnormal; null when the
  taxonomy has no such view); `p_abnormal`: the summed probability of its abnormal classes
  (SIPaKMeD: Koilocytotic + Dyskeratotic) and `flagged`: whether that beats the rest (both
  null when it names no abnormal class, e.g. an ImageNet model); `bethesda`: the clinical
  reading of the predicted class (SIPaKMeD: its Bethesda System category), or "no clinical
  reading defined". When the probability mass is split, `label` (class argmax) and `flagged`
  (summed groups) can disagree, e.g. Dyskeratotic 0.35 but abnormal 0.45: read `flagged` for
  the screening call;
- `temperature` (an ensemble's own, 1 unless calibrated; each member applies its own first);
- `uncertainty`: an ensemble's disagreement, the mutual information between the prediction
  and the member in nats (0: the members agree; see `sipak_jax.ensemble`), null for one model;
- `members` (jsonl only): an ensemble's member DIRs, null for one model;
- `overlay`: the saliency overlay PNG (with `--explain`: the map of the predicted class drawn
  over the original image at its own size; an ensemble's is the mean of its members' maps),
  else null;
- `error`: null, or why the file could not be read. Such a row has only `path` and `error`;
  the other files are still processed and the exit status is 1.

Output safety: the output file (and every overlay) is refused if it exists, unless
`--overwrite`. Overlay files are named from the input's stem (characters outside
`[A-Za-z0-9._-]` replaced, `-2`, `-3` ... appended on collisions) and always lie inside
`--overlays`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from sipak_jax import fileio
from sipak_jax.imageio import IMAGE_EXTENSIONS, is_image_file, read_for_model
from sipak_jax.predictor import DEFAULT_BATCH_SIZE, Predictor
from tfds_sipakmed.taxonomy import NO_READING, Taxonomy, as_taxonomy

OUTPUT_FORMATS = (".jsonl", ".csv")

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Predictor",
    "collect_inputs",
    "main",
    "make_row",
    "overlay_name",
    "overlay_on_original",
    "predict_files",
    "reading",
    "write_rows",
]


# ---------------------------------------------------------------------------------------------
# Inputs.


def collect_inputs(inputs: Iterable[str], exclude: Iterable[str] = ()) -> tuple[list, list]:
    """Expand files and directories into what to predict, in command-line order.

    Returns (entries, skipped). Each entry is a file path (str; a directory's image files
    sorted by path) or an error row ({"path", "error"}) for an input that does not exist or a
    directory without any image file. `skipped`: files found under directories without an
    image extension. Paths under `exclude` (e.g. the overlay directory) are left out.
    """
    excluded = [os.path.abspath(e) for e in exclude]

    def is_excluded(p):
        ap = os.path.abspath(p)
        return any(ap == e or ap.startswith(e + os.sep) for e in excluded)

    entries, skipped = [], []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = []
            for root, dirs, names in os.walk(item):
                dirs.sort()
                for name in names:
                    p = os.path.join(root, name)
                    if is_excluded(p):
                        continue
                    if is_image_file(name):
                        found.append(p)
                    else:
                        skipped.append(p)
            if not found:
                entries.append(
                    {
                        "path": item,
                        "error": f"directory holds no image file ({', '.join(IMAGE_EXTENSIONS)})",
                    }
                )
            entries.extend(sorted(found))
        elif os.path.exists(item):
            entries.append(item)  # given explicitly: tried whatever its extension
        else:
            entries.append({"path": item, "error": "no such file or directory"})
    return entries, skipped


# ---------------------------------------------------------------------------------------------
# Rows.


def _view_label(probs: np.ndarray, taxonomy: Taxonomy, view: str) -> str | None:
    """The group of `view` with the largest summed probability; None without that view."""
    from sipak_jax.metrics import grouped_probabilities

    if view not in taxonomy.views:
        return None
    names = taxonomy.view_names(view)
    grouped = grouped_probabilities(probs[None], taxonomy.view_labels(view), len(names))
    return names[int(np.argmax(grouped[0]))]


def reading(probs: np.ndarray, taxonomy: Taxonomy | Sequence[str]) -> dict:
    """The fields of one prediction (probabilities [K] in the taxonomy's class order): the
    label and what it means under `taxonomy` (module docstring). Plain class names are a
    taxonomy without clinical meaning."""
    from sipak_jax.metrics import abnormal_probabilities

    taxonomy = as_taxonomy(taxonomy)
    probs = np.asarray(probs, dtype=np.float64)
    idx = int(np.argmax(probs))
    label = taxonomy.class_names[idx]
    row = {
        "label": label,
        "label_index": idx,
        "probabilities": [float(p) for p in probs],
        "class_names": list(taxonomy.class_names),
        "label_3class": _view_label(probs, taxonomy, "3class"),
        "label_2class": _view_label(probs, taxonomy, "2class"),
        "p_abnormal": None,
        "flagged": None,
        "bethesda": taxonomy.reading(label) or NO_READING,
    }
    if taxonomy.abnormal:
        normal_abnormal = abnormal_probabilities(probs[None], taxonomy)[0]
        row["p_abnormal"] = float(normal_abnormal[1])
        row["flagged"] = bool(np.argmax(normal_abnormal) == 1)
    return row


def make_row(path: str, probs: np.ndarray, predictor, uncertainty: float | None = None) -> dict:
    """One prediction row (module docstring): `path`, `reading(probs, predictor.taxonomy)`,
    `temperature`, `uncertainty` (the ensemble's mutual information; None for one model),
    `members` (an ensemble's member DIRs; None for one model), `overlay` None, `error` None.
    `predictor` is a `Predictor` or an `ensemble.EnsemblePredictor`."""
    members = list(getattr(predictor, "members", None) or [])
    row = {"path": path, **reading(probs, predictor.taxonomy)}
    row["temperature"] = float(predictor.temperature)
    row["uncertainty"] = None if uncertainty is None else float(uncertainty)
    row["members"] = members if len(members) > 1 else None
    row["overlay"] = None
    row["error"] = None
    return row


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def overlay_name(path: str, suffix: str, taken: set) -> str:
    """A file name for `path`'s overlay: its sanitised stem + `suffix`, unique within `taken`
    (which it updates). Never contains a path separator or starts with a dot."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    stem = _SAFE.sub("_", stem).lstrip(".") or "image"
    stem = stem[:120]
    name, n = f"{stem}{suffix}", 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}-{n}{suffix}"
    taken.add(name.lower())
    return name


def _inside(directory: str, path: str) -> bool:
    d, p = os.path.realpath(directory), os.path.realpath(path)
    return os.path.commonpath([d, p]) == d and p != d


def overlay_on_original(original_rgb: np.ndarray, frame_map: np.ndarray, policy: str):
    """The saliency map (in the network's S x S input frame) drawn over the original image at
    its own size (`saliency.overlay.map_to_crop` undoes the pad/stretch resize)."""
    from sipak_jax.saliency import overlay

    m = overlay.map_to_crop(frame_map, original_rgb.shape[:2], policy)
    return overlay.overlay(original_rgb, np.clip(m, 0.0, 1.0))


def _with_overlay(row, target, original, frame_map, predictor, overwrite) -> dict:
    """`row` with its overlay written to `target`, or an error row."""
    from sipak_jax import preprocessing
    from sipak_jax.saliency import overlay

    path = row["path"]
    if os.path.exists(target) and not overwrite:
        return {"path": path, "error": f"overlay {target} exists; pass --overwrite to replace it"}
    policy = predictor.spec.get("resize", preprocessing.DEFAULT_RESIZE)
    img = overlay_on_original(original, frame_map, policy)
    try:
        overlay.save_png(target, img, overwrite=overwrite)
    except (OSError, ValueError) as e:
        return {"path": path, "error": f"could not write overlay: {e}"}
    return {**row, "overlay": target}


def predict_files(
    predictor,
    paths: Sequence[str],
    *,
    explain: str | None = None,
    overlays_dir: str | None = None,
    overwrite: bool = False,
    workers: int = 4,
) -> list[dict]:
    """One row per path (module docstring); unreadable files get {"path", "error"} rows.
    `predictor`: a `Predictor` or an `ensemble.EnsemblePredictor`."""
    if explain and not overlays_dir:
        raise ValueError("--explain needs --overlays=DIR for the overlay images")
    if overlays_dir:
        os.makedirs(overlays_dir, exist_ok=True)
    taken: set = set()
    rows: list[dict] = []
    step = predictor.batch_size
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(paths), step):
            batch_paths = list(paths[start : start + step])
            decoded = list(
                pool.map(lambda p: read_for_model(p, predictor.spec, bool(explain)), batch_paths)
            )
            ok = [i for i, d in enumerate(decoded) if d[0] is not None]
            probs, uncertainty = np.zeros((0, len(predictor.class_names))), None
            if ok:
                images = np.stack([decoded[i][0] for i in ok])
                probs, uncertainty = predictor.predict_with_uncertainty(images)
            maps = None
            if explain and ok:
                maps = predictor.explain(images, explain, probs.argmax(1))
            by_index = {i: j for j, i in enumerate(ok)}
            for i, path in enumerate(batch_paths):
                if i not in by_index:
                    rows.append({"path": path, "error": decoded[i][2]})
                    continue
                j = by_index[i]
                u = None if uncertainty is None else uncertainty[j]
                row = make_row(path, probs[j], predictor, u)
                if maps is not None:
                    name = overlay_name(path, f"_{_SAFE.sub('_', explain)}.png", taken)
                    target = os.path.join(overlays_dir, name)
                    if not _inside(overlays_dir, target):  # cannot happen with overlay_name
                        raise RuntimeError(f"overlay path {target} escapes {overlays_dir}")
                    row = _with_overlay(row, target, decoded[i][1], maps[j], predictor, overwrite)
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Output.


def _csv_fields(class_names: Sequence[str]) -> list[str]:
    return (
        ["path", "label", "label_index", "label_3class", "label_2class", "bethesda"]
        + ["p_abnormal", "flagged", "temperature", "uncertainty"]
        + [f"p_{n}" for n in class_names]
        + ["overlay", "error"]
    )


def write_rows(rows: Sequence[dict], output: str, class_names: Sequence[str], overwrite=False):
    """Write rows as `.jsonl` or `.csv` (by extension), atomically; refuse to overwrite."""
    ext = os.path.splitext(output)[1].lower()
    if ext not in OUTPUT_FORMATS:
        raise ValueError(f"--output must end in .jsonl or .csv, got {output!r}")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists; choose another --output or pass --overwrite")
    with fileio.atomic_path(output) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        if ext == ".jsonl":
            for row in rows:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        else:
            fields = _csv_fields(class_names)
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                flat = {k: row.get(k) for k in fields}
                for name, p in zip(class_names, row.get("probabilities") or (), strict=False):
                    flat[f"p_{name}"] = repr(float(p))
                writer.writerow({k: ("" if v is None else v) for k, v in flat.items()})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sipak_jax.predict",
        description="Classify cell images with a trained model DIR.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="model DIR (training workdir or converted), A,B,C (an ensemble) or a fold=all workdir",
    )
    p.add_argument("--output", required=True, help="FILE.jsonl or FILE.csv")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--explain", default=None, help="saliency method for overlays, e.g. gradcam")
    p.add_argument("--overlays", default=None, help="directory for the overlay PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--verbosity", type=int, default=0, help="1: show the libraries' log lines")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    return p


def _check_args(args) -> None:
    """Raises `console.UserError` for a command line that cannot run (nothing loaded yet)."""
    from sipak_jax.console import UserError

    ext = os.path.splitext(args.output)[1].lower()
    if ext not in OUTPUT_FORMATS:
        raise UserError(f"--output must end in .jsonl or .csv, got {args.output!r}")
    if os.path.exists(args.output) and not args.overwrite:
        raise UserError(f"{args.output} exists; pass --overwrite to replace it")
    if args.explain and not args.overlays:
        raise UserError("--explain needs --overlays=DIR")
    if args.overlays and not args.explain:
        raise UserError("--overlays needs --explain=METHOD (e.g. gradcam)")
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if args.overlays and os.path.exists(args.overlays) and not os.path.isdir(args.overlays):
        raise UserError(f"--overlays={args.overlays} exists and is not a directory")
    if args.explain:
        from sipak_jax import saliency

        if args.explain not in saliency.METHODS:
            methods = sorted(saliency.METHODS)
            raise UserError(f"unknown --explain={args.explain!r}; one of {methods}")


def _note_skipped(skipped: Sequence[str]) -> None:
    if skipped:
        kinds = Counter(os.path.splitext(p)[1].lower() or "(none)" for p in skipped)
        print(
            f"note: skipped {len(skipped)} files without an image extension under the given "
            f"directories ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))})",
            file=sys.stderr,
        )


def load_checkpoint(spec: str, batch_size: int = DEFAULT_BATCH_SIZE):
    """`ensemble.load_predictor(spec)`, its errors as one `console.UserError` naming the spec."""
    from sipak_jax import console, ensemble

    try:
        return ensemble.load_predictor(spec, batch_size=batch_size)
    except (FileNotFoundError, ValueError, console.UserError) as e:
        raise console.UserError(f"--checkpoint={spec}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 some file failed, 2 usage error)."""
    args = _parser().parse_args(argv)
    from sipak_jax import console

    console.quiet_libraries(args.verbosity)
    try:
        _check_args(args)
        exclude = [args.overlays, args.output] if args.overlays else [args.output]
        entries, skipped = collect_inputs(args.inputs, exclude=exclude)
        _note_skipped(skipped)
        predictor = load_checkpoint(args.checkpoint, args.batch_size)
    except console.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return console.EXIT_USER_ERROR
    files = [e for e in entries if isinstance(e, str)]
    predicted = iter(
        predict_files(
            predictor,
            files,
            explain=args.explain,
            overlays_dir=args.overlays,
            overwrite=args.overwrite,
        )
    )
    rows = [next(predicted) if isinstance(e, str) else e for e in entries]
    write_rows(rows, args.output, predictor.class_names, overwrite=args.overwrite)
    failed = [r for r in rows if r.get("error")]
    print(
        f"wrote {len(rows)} rows to {args.output} ({len(rows) - len(failed)} predicted, "
        f"{len(failed)} failed)",
        file=sys.stderr,
    )
    for r in failed:
        print(f"  failed: {r['path']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
