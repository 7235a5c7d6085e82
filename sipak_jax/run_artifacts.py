"""What the report shows that needs the model, computed once when a run ends.

The report (`sipak_jax.report`) only renders files; it never loads a model. When training ends,
its finalize step calls

    cells = run_artifacts.cells_for_run(results["predictions"], metadata.taxonomy,
                                        image_roots=[manual_dir], images={index: image})
    run_artifacts.write_run_artifacts(workdir, model, metadata, cells)

which explains each cell's predicted class (Grad-CAM at `saliency.overlay_stage`: the deepest
ResNet stage whose map is at least 7x7, layer2 at 64 px, layer4 at 224 px), draws the map over
the cell's image at that image's own size, and writes

    workdir/artifacts/cell<index>_<method>.png   one overlay per cell
    workdir/artifacts/index.json                 what each PNG shows:

    {"format": "sipak_jax.run_artifacts/1",
     "method": "gradcam", "method_title": "Grad-CAM", "score": "logit",
     "images": [{"file": "cell00042_gradcam.png",   # in workdir/artifacts/
                 "index": 42, "file_name": "im_Koilocytotic/CROPPED/012_03.bmp",
                 "group": "confident" | "doubtful" | "",
                 "true_class": "Koilocytotic", "predicted_class": "Dyskeratotic",
                 "method": "gradcam", "method_title": "Grad-CAM",
                 "layer": "layer2", "stage": 2,      # null for maps at the input (IG, ...)
                 "map_size": [8, 8],                 # [h, w] the map was computed at
                 "input_size": 64,                   # the network's S x S input
                 "image_size": [93, 120],            # [H, W] of the overlay (the cell image)
                 "peak": [40, 71],                   # [y, x] of the map's maximum, image pixels
                 "blank": false}],                   # true: no positive evidence (peak null)
     "missing": [{"index": 7, "file_name": "..."}]}  # selected cells without an image

The map explains the predicted class. The selection (`select_calls`: the most confident and
the most doubtful abnormal calls of the test fold) is the report's; the report computes it from
`results.json` again and shows the overlay of each call found in the index.

A cell (`Cell`) is one test cell: its row `index` in the test split (the `index` of
`results.json`'s predictions), its uint8 RGB `image` (the original crop at its own size, or the
cached network input S x S; both work: the map is drawn back through the resize policy), `label`
and `prediction` (class indices), `file_name` and `group`.

For a finished run without artifacts (finished before they existed, or a finalize that failed):

    python -m sipak_jax.run_artifacts --workdir=DIR [--images_dir=D]

reads the model and `results.json` from DIR and the crops by their `file_name` under the first
folder that holds them (`--images_dir`, the run's `manual_dir`, the synthetic build's `raw/`).

Files: PNGs and index.json are written atomically (`sipak_jax.fileio`); a file in `artifacts/`
that the previous index does not list (not ours) is never replaced. This module imports JAX only
inside the functions that explain (the report imports it to read the index).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from sipak_jax import console, fileio, preprocessing
from tfds_sipakmed.taxonomy import Taxonomy

FORMAT = "sipak_jax.run_artifacts/1"
ARTIFACTS_DIR = "artifacts"
INDEX_FILE = "index.json"
DEFAULT_CALLS = 4
DEFAULT_METHOD = "gradcam"
GROUPS = ("confident", "doubtful")
_BATCH = 32
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")

__all__ = [
    "ARTIFACTS_DIR",
    "Cell",
    "DEFAULT_CALLS",
    "FORMAT",
    "INDEX_FILE",
    "cells_for_run",
    "image_path",
    "image_roots",
    "main",
    "read_index",
    "select_calls",
    "write_run_artifacts",
]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One selected test cell (see the module docstring). `image` None: no image was found;
    the index lists the cell under `missing`."""

    index: int
    image: np.ndarray | None
    label: int
    prediction: int
    file_name: str = ""
    group: str = ""


# ---------------------------------------------------------------------------------------------
# Which cells: the abnormal calls worth a look.


def select_calls(predictions: Sequence[dict], taxonomy: Taxonomy, k: int = DEFAULT_CALLS) -> dict:
    """The abnormal calls of the test fold worth a look.

    An abnormal call is a prediction whose summed probability of the taxonomy's abnormal
    classes is above 0.5 (the 2-class reading is abnormal). `confident`: the `k` with the
    highest abnormal probability; `doubtful`: the `k` closest to the 0.5 threshold (not among
    the confident ones). Ties are broken by `index`. Returns {"confident": [...],
    "doubtful": [...], "num_calls": int}, each entry the prediction dict plus `p_abnormal`.
    A taxonomy without abnormal classes has no calls.
    """
    abnormal = list(taxonomy.abnormal_indices())
    calls = []
    for p in predictions if abnormal else ():
        probs = np.asarray(p.get("probabilities", ()), np.float64)
        if probs.shape != (taxonomy.num_classes,):
            continue
        pa = float(np.sum(probs[abnormal]))
        if pa > 0.5:
            calls.append({**p, "p_abnormal": pa})
    by_conf = sorted(calls, key=lambda c: (-c["p_abnormal"], c.get("index", 0)))
    confident = by_conf[:k]
    chosen = {id(c) for c in confident}
    rest = [c for c in calls if id(c) not in chosen]
    doubtful = sorted(rest, key=lambda c: (c["p_abnormal"], c.get("index", 0)))[:k]
    return {"confident": confident, "doubtful": doubtful, "num_calls": len(calls)}


def image_roots(
    workdir: str, config: Mapping | None, metadata, images_dir: str | None = None
) -> list[str]:
    """Folders that may hold the crops named by `file_name`, most specific first: `images_dir`,
    the run's `manual_dir` (metadata `dataset` or config), a synthetic build's `raw/`."""
    roots = [os.path.expanduser(images_dir)] if images_dir else []
    dataset = metadata.dataset or {}
    if dataset.get("manual_dir"):
        roots.append(os.path.expanduser(dataset["manual_dir"]))
    if dataset.get("data_dir"):  # a synthetic build: <root>/tfds next to <root>/raw
        roots.append(os.path.join(os.path.dirname(os.path.expanduser(dataset["data_dir"])), "raw"))
    config = config or {}
    if config.get("manual_dir"):
        roots.append(os.path.expanduser(config["manual_dir"]))
    synthetic = config.get("synthetic") or {}
    if isinstance(synthetic, Mapping) and int(synthetic.get("cells_per_class") or 0) > 0:
        root = os.path.expanduser(config["data_dir"]) if config.get("data_dir") else None
        roots.append(os.path.join(root or os.path.join(workdir, "data"), "raw"))
        # fold=all: the data lies beside the fold directories
        roots.append(os.path.join(os.path.dirname(os.path.abspath(workdir)), "data", "raw"))
    return list(dict.fromkeys(r for r in roots if r))


def _find_crop(file_name: str, roots: Sequence[str]) -> str | None:
    parts = file_name.replace("\\", "/").split("/")
    if not file_name or ".." in parts or file_name.startswith("/"):
        return None  # results.json names files inside the dataset, never outside it
    for root in roots:
        candidates = [os.path.join(root, *parts)]
        if len(parts) > 1:  # mirrors (Kaggle) nest each class folder once more
            candidates.append(os.path.join(root, parts[0], *parts))
        for c in candidates:
            if os.path.isfile(c):
                return c
    return None


def cells_for_run(
    predictions: Sequence[dict],
    taxonomy: Taxonomy,
    *,
    image_roots: Sequence[str] = (),
    images: Mapping[int, np.ndarray] | None = None,
    k: int = DEFAULT_CALLS,
) -> list[Cell]:
    """The `Cell`s of `select_calls(predictions, taxonomy, k)`, each with the original crop
    found by its `file_name` under `image_roots`, else `images[index]` (e.g. the cached test
    images, S x S), else None (listed as missing)."""
    sel = select_calls(predictions, taxonomy, k)
    cells = []
    for group in GROUPS:
        for p in sel[group]:
            path = _find_crop(str(p.get("file_name") or ""), image_roots)
            image = preprocessing.read_image(path) if path else None
            if image is None and images is not None:
                image = images.get(int(p["index"]))
            prediction = p.get("prediction", int(np.argmax(p["probabilities"])))
            cells.append(
                Cell(
                    index=int(p["index"]),
                    image=None if image is None else np.asarray(image),
                    label=int(p["label"]),
                    prediction=int(prediction),
                    file_name=str(p.get("file_name") or ""),
                    group=group,
                )
            )
    return cells


# ---------------------------------------------------------------------------------------------
# Computing the maps (the only part that needs JAX).


def _check_cells(cells: Sequence[Cell], num_classes: int) -> None:
    seen = set()
    for c in cells:
        if not isinstance(c, Cell):
            raise TypeError(f"cells must be run_artifacts.Cell, got {type(c).__name__}")
        if c.index in seen:
            raise ValueError(f"cell index {c.index} appears twice in cells")
        seen.add(c.index)
        for what, v in (("label", c.label), ("prediction", c.prediction)):
            if not 0 <= v < num_classes:
                raise ValueError(
                    f"cell {c.index}: {what} {v} is not a class index 0..{num_classes - 1}"
                )
        img = c.image
        if img is not None and (img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3):
            raise ValueError(
                f"cell {c.index}: image must be uint8 RGB [H, W, 3], got {img.dtype} {img.shape}"
            )


def _method_title(description: str) -> str:
    return description.split(" (")[0]


def _where(fns, method: str, stage: int | None, size: int) -> dict:
    """What a map of `method` is computed at: method, layer, stage, map size, input size."""
    from sipak_jax import saliency

    if method not in saliency.METHODS:
        raise ValueError(
            f"unknown saliency method {method!r}; available: {sorted(saliency.METHODS)}"
        )
    m = saliency.METHODS[method]
    out = {"method": method, "method_title": _method_title(m.description), "input_size": size}
    if m.kind != "cam":
        return {**out, "layer": None, "stage": None, "map_size": [size, size]}
    if stage is None:
        stage = saliency.overlay_stage(fns, size)
    h, w = saliency.stage_map_sizes(fns, size)[stage]
    return {**out, "layer": saliency.layer_name(stage, fns), "stage": stage, "map_size": [h, w]}


def explain_cells(model, spec: dict, cells: Sequence[Cell], method=DEFAULT_METHOD, stage=None):
    """(maps, where): each cell's map of its predicted class, in [0, 1] on the cell image's own
    pixels (float32 [H, W]), and `where` (method, layer, stage, map_size, input_size)."""
    from sipak_jax import saliency
    from sipak_jax.saliency import overlay

    size = int(spec["image_size"])
    policy = spec.get("resize", preprocessing.DEFAULT_RESIZE)
    fns = saliency.ModelFunctions(model)
    where = _where(fns, method, stage, size)
    maps = []
    for start in range(0, len(cells), _BATCH):
        chunk = cells[start : start + _BATCH]
        inputs = np.stack([preprocessing.preprocess_image(c.image, spec) for c in chunk])
        x = preprocessing.normalize(inputs, spec)
        target = np.asarray([c.prediction for c in chunk], np.int32)
        res = saliency.explain(fns, x, method, target=target, stage=where["stage"] or 4, spec=spec)
        for i, c in enumerate(chunk):
            m = overlay.map_to_crop(res.normalized[i], c.image.shape[:2], policy)
            maps.append(np.clip(m, 0.0, 1.0).astype(np.float32))
    return maps, where


# ---------------------------------------------------------------------------------------------
# Files.


def _index_path(workdir) -> str:
    return os.path.join(os.fspath(workdir), ARTIFACTS_DIR, INDEX_FILE)


def read_index(workdir) -> dict | None:
    """The run's artifacts/index.json, or None when the run has none. ValueError (naming the
    file) when it is not an index this module wrote."""
    path = _index_path(workdir)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} could not be read: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} index")
    images = index.get("images")
    if not isinstance(images, list) or not all(isinstance(e, dict) for e in images):
        raise ValueError(f"{path}: 'images' must be a list of objects")
    for e in images:
        if not _is_plain_name(e.get("file")):
            raise ValueError(f"{path}: {e.get('file')!r} is not a file name in {ARTIFACTS_DIR}/")
    return index


def _is_plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name


def image_path(workdir, entry: dict) -> str:
    """The PNG of an index entry (a plain file name inside workdir/artifacts)."""
    if not _is_plain_name(entry.get("file")):
        raise ValueError(f"{entry.get('file')!r} is not a file name in {ARTIFACTS_DIR}/")
    return os.path.join(os.fspath(workdir), ARTIFACTS_DIR, entry["file"])


def _ours(workdir) -> set[str]:
    """Files the previous index lists (ours to replace). Refuses an index.json not ours."""
    path = _index_path(workdir)
    if not os.path.exists(path):
        return set()
    try:
        index = read_index(workdir)
    except ValueError as e:
        raise FileExistsError(f"{e}; not replacing it: move it away first") from None
    return {e["file"] for e in index["images"]}


def _write_png(path: str, rgb: np.ndarray, ours: set[str]) -> None:
    if os.path.exists(path) and os.path.basename(path) not in ours:
        raise FileExistsError(
            f"{path} exists and is not listed in {INDEX_FILE}; not replacing it: move it away"
        )
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    fileio.atomic_write_bytes(path, buf.tobytes())


def _entry(cell: Cell, name: str, frame_map: np.ndarray, where: dict, taxonomy) -> dict:
    blank = not bool(np.any(frame_map > 0))
    peak = np.unravel_index(int(np.argmax(frame_map)), frame_map.shape)
    return {
        "file": name,
        "index": cell.index,
        "file_name": cell.file_name,
        "group": cell.group,
        "true_class": taxonomy.class_names[cell.label],
        "predicted_class": taxonomy.class_names[cell.prediction],
        **where,
        "image_size": [int(frame_map.shape[0]), int(frame_map.shape[1])],
        "peak": None if blank else [int(peak[0]), int(peak[1])],
        "blank": blank,
    }


def write_run_artifacts(
    workdir, model, metadata, cells: Sequence[Cell], *, method: str = DEFAULT_METHOD, stage=None
) -> dict:
    """Explain `cells` with `model` (eval mode; a ResNet) and write their overlays and
    `artifacts/index.json` under `workdir` (see the module docstring); returns the index.

    metadata: the model's `model_io.ModelMetadata` (its `preprocessing` and
      taxonomy). stage: the CAM stage; None: `saliency.overlay_stage`.
    """
    from sipak_jax.saliency import overlay

    spec = metadata.preprocessing
    if not spec or "image_size" not in spec:
        raise ValueError("model metadata lacks 'preprocessing' with an 'image_size'")
    taxonomy = metadata.taxonomy
    cells = list(cells)
    _check_cells(cells, taxonomy.num_classes)
    out_dir = os.path.join(os.fspath(workdir), ARTIFACTS_DIR)
    ours = _ours(workdir)
    present = [c for c in cells if c.image is not None]
    maps, where = explain_cells(model, dict(spec), present, method, stage)
    entries = []
    for c, m in zip(present, maps, strict=True):
        name = f"cell{c.index:05d}_{_SAFE.sub('_', method)}.png"
        _write_png(os.path.join(out_dir, name), overlay.overlay(c.image, m), ours)
        entries.append(_entry(c, name, m, where, taxonomy))
    index = {
        "format": FORMAT,
        "method": method,
        "method_title": where["method_title"],
        "score": "logit",
        "images": entries,
        "missing": [{"index": c.index, "file_name": c.file_name} for c in cells if c.image is None],
    }
    fileio.atomic_write_json(_index_path(workdir), index)
    for stale in ours - {e["file"] for e in entries}:
        path = os.path.join(out_dir, stale)
        if os.path.isfile(path):
            os.remove(path)
    return index


# ---------------------------------------------------------------------------------------------
# Command line: artifacts for a finished run.


def _read_json(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is this a finished training workdir?")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def artifacts_for_workdir(workdir, *, images_dir=None, k=DEFAULT_CALLS, method=DEFAULT_METHOD):
    """Load the model and results of a finished run in `workdir` and write its artifacts."""
    from sipak_jax import model_io

    results = _read_json(os.path.join(workdir, "results.json"))
    config_path = os.path.join(workdir, "config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else None
    model, metadata = model_io.load_model_dir(workdir)
    roots = image_roots(workdir, config, metadata, images_dir)
    cells = cells_for_run(
        results.get("predictions") or [], metadata.taxonomy, image_roots=roots, k=k
    )
    return write_run_artifacts(workdir, model, metadata, cells, method=method)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sipak_jax.run_artifacts",
        description="Write the report's overlays of a finished run into WORKDIR/artifacts/.",
    )
    p.add_argument("--workdir", required=True, help="a finished training workdir")
    p.add_argument("--images_dir", default=None, help="folder with im_<Class>/CROPPED/*.bmp")
    p.add_argument("--num_calls", type=int, default=DEFAULT_CALLS)
    p.add_argument("--method", default=DEFAULT_METHOD, help="a sipak_jax.saliency method")
    p.add_argument("--verbosity", type=int, default=0, help="1: show library logs (orbax, ...)")
    args = p.parse_args(argv)
    console.quiet_libraries(args.verbosity)
    try:
        index = artifacts_for_workdir(
            args.workdir, images_dir=args.images_dir, k=args.num_calls, method=args.method
        )
    except (FileNotFoundError, FileExistsError, ValueError, console.UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return console.EXIT_USER_ERROR
    n, missing = len(index["images"]), len(index["missing"])
    where = os.path.join(args.workdir, ARTIFACTS_DIR)
    print(f"{n} overlays in {where}" + (f"; {missing} cells without an image" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
