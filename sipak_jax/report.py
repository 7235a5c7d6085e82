"""One self-contained HTML report of a training run: `python -m sipak_jax.report --workdir=DIR`.

    python -m sipak_jax.report --workdir=WORKDIR                       # -> WORKDIR/report.html
    python -m sipak_jax.report --workdir=WORKDIR --predictions=preds.jsonl --output=r.html

`write_report(workdir, predictions=None) -> path` is the same from Python (training calls it at
the end of a run). The page holds everything inline (images as base64 PNG, CSS inline, no
script, no external resource): it can be mailed or archived as one file. It shows the run
(data, protocol, folds, configuration), the per-class table, the 5-, 3- and 2-class confusion
matrices, abnormal-vs-NILM sensitivity and specificity, calibration (temperature, ECE, Brier,
NLL, the reliability diagram), the most confident and the most doubtful abnormal calls with
their Grad-CAM overlays, the shortcut controls beside the CNN and, given a `predict` output,
a per-image table sorted by abnormal probability, flagged cells first.

What it reads from the workdir (written by `sipak_jax.train`):

- `results.json` (required):
    fold: int                  the test fold
    best_step, best_epoch      the checkpoint evaluated; selection: how it was chosen (str)
    class_names: [str]         label index order (what they mean: the model's taxonomy, below)
    validation, test: dict     `metrics.classification_metrics` output (+ `loss`)
    calibration: dict          `calibration.calibration_summary` output, plus optional
                               `diagram` (a PNG file name in the workdir)
    dataset: dict              the data's record: name, config, taxonomy, grouping,
                               leak_free, warnings (the Protocol line says them)
    predictions: [{index, file_name, group_id, label: int, prediction: int,
                   probabilities: [K] (after temperature), logits: [K]}]   test fold
    shortcuts: dict            `shortcuts.shortcut_controls` output, or {"skipped"|"error": str}
    timing: dict               optional
  Every key but `test` may be missing; the section then says so.
- `config.json` (the run's config), `metadata.json` (the model DIR metadata, with
  `temperature` and `dataset`: {data_dir, manual_dir}), `cv_results.json` (fold=all: in the
  parent of the fold directories `DIR/fold<k>/`): optional.

- `artifacts/index.json` and its PNGs (`sipak_jax.run_artifacts`, written when the run ends):
  the overlays of the selected calls and where each map was computed (method, layer, map
  size, input size), which the page states under each overlay. The report only renders: it
  loads no model and imports no JAX. Without stored overlays the section lists the calls and
  says how to compute them (`python -m sipak_jax.run_artifacts --workdir=DIR`).

Output: `workdir/report.html` by default. An existing file is replaced only when it is a report
this module wrote (it carries `<meta name="generator" content="sipak_jax.report">`); any other
file is refused.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime
import html
import json
import os
import sys
from collections.abc import Sequence

import cv2
import numpy as np

from sipak_jax import fileio, run_artifacts
from tfds_sipakmed.taxonomy import NO_READING, Taxonomy, for_class_names

GENERATOR = "sipak_jax.report"
_MARKER = f'<meta name="generator" content="{GENERATOR}">'
DEFAULT_CALLS = run_artifacts.DEFAULT_CALLS

__all__ = ["main", "map_description", "read_predictions", "write_report"]


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v, digits: int = 3, pct: bool = False) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    if not np.isfinite(f):
        return "&ndash;"
    return f"{100 * f:.1f}%" if pct else f"{f:.{digits}f}"


def png_data_uri(image_rgb: np.ndarray) -> str:
    """uint8 RGB (or gray) image -> 'data:image/png;base64,...'."""
    img = np.asarray(image_rgb)
    if img.ndim == 3:
        img = img[..., ::-1]
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("could not encode an image as PNG")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _img(uri: str, alt: str, cls: str = "") -> str:
    return f'<img src="{uri}" alt="{_e(alt)}" class="{cls}">'


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _optional_json(path: str, notes: list):
    if not os.path.isfile(path):
        return None
    try:
        return _read_json(path)
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"{os.path.basename(path)} could not be read: {e}")
        return None


def read_predictions(path: str) -> list[dict]:
    """Rows of a `sipak_jax.predict` output (.jsonl or .csv) as dicts like the jsonl rows."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"predictions file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    rows = []
    if ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n} is not a JSON line: {e}") from None
    elif ext == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                names = [k[2:] for k in r if k.startswith("p_") and k != "p_abnormal"]
                row = {k: (v if v != "" else None) for k, v in r.items()}
                if row.get("label") is not None:
                    row["probabilities"] = [float(r[f"p_{n}"]) for n in names]
                    row["class_names"] = names
                    row["p_abnormal"] = (
                        float(row["p_abnormal"]) if row.get("p_abnormal") is not None else None
                    )
                    row["flagged"] = row.get("flagged") == "True"
                    if row.get("uncertainty") is not None:
                        row["uncertainty"] = float(row["uncertainty"])
                rows.append(row)
    else:
        raise ValueError(f"--predictions must be a .jsonl or .csv from sipak_jax.predict: {path}")
    for n, row in enumerate(rows, 1):
        if "path" not in row:
            raise ValueError(f"{path}: row {n} has no 'path'; is this a sipak_jax.predict output?")
    return rows


# ---------------------------------------------------------------------------------------------
# The calls to show, with the overlays the run stored (`sipak_jax.run_artifacts`).


def _stored_overlays(workdir: str, index: dict | None) -> dict:
    """{test index: index entry} of the overlays in workdir/artifacts whose PNG exists."""
    out = {}
    for entry in (index or {}).get("images", []):
        if os.path.isfile(run_artifacts.image_path(workdir, entry)):
            out[int(entry["index"])] = entry
    return out


def _png_file_uri(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"\x89PNG"):
        raise ValueError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def map_description(entry: dict) -> str:
    """Where a map was computed, e.g. "Grad-CAM at layer2, 8x8 map on a 64 px input"."""
    title = entry.get("method_title") or entry.get("method") or "saliency"
    h, w = (entry.get("map_size") or ["?", "?"])[:2]
    size = entry.get("input_size", "?")
    if entry.get("layer"):
        return f"{title} at {entry['layer']}, {h}x{w} map on a {size} px input"
    return f"{title}, {h}x{w} map on a {size} px input"


# ---------------------------------------------------------------------------------------------
# Sections.

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;
 margin:24px auto;max-width:1180px;color:#1b1b1b;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:2px solid #dde3ea;padding-bottom:4px;
 margin-top:2em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d5dbe1;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f1f4f7}td.l,th.l{text-align:left}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:.6em 0}
.muted{color:#666;font-size:.9em}.bad{color:#b00020;font-weight:600}
.good{color:#0b6e2e;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0;text-align:center}figcaption{font-size:.85em;color:#444;max-width:240px}
img.cm{max-width:540px}img.cell{width:200px;height:auto;border:1px solid #ccc}
img.thumb{max-width:72px;max-height:72px}
tr.flagged td{background:#fdecea}tr.error td{background:#eee;color:#555}
details{margin:.5em 0}code{background:#f4f4f4;padding:0 3px}
"""


def _table(header, rows: Sequence[Sequence[str]], left=1) -> str:
    """An HTML table; `left`: the number of leading left-aligned columns, or a set of column
    indices; `header` None for none. Cells are HTML already (escape before)."""
    is_left = (lambda i: i in left) if isinstance(left, set | frozenset) else (lambda i: i < left)

    def cls(i):
        return ' class="l"' if is_left(i) else ""

    h = ""
    if header is not None:
        h = "<thead><tr>" + "".join(f"<th{cls(i)}>{c}</th>" for i, c in enumerate(header))
        h += "</tr></thead>"
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table>{h}<tbody>{body}</tbody></table>"


def _flatten(d, prefix=""):
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _model_name(model: dict) -> str:
    """'ResNet-50 v1.5, width 64'; other families by `sipak_jax.models.registry.describe`
    (imported only then: it needs JAX, which rendering a ResNet run does not)."""
    if model.get("name", "resnet") == "resnet":
        return (
            f"ResNet-{model.get('depth', '?')} {model.get('variant', '')}, width "
            f"{model.get('width', 64)}"
        )
    from sipak_jax.models import registry

    try:
        return registry.describe(model)
    except (KeyError, ValueError):
        return str(model.get("name"))


def _section_run(workdir, results, config, metadata, cv) -> str:
    config = config or {}
    metadata = metadata or {}
    test = results.get("test") or {}
    model = metadata.get("model") or config.get("model") or {}
    data_source, protocol = _data_and_protocol(results, config)
    counts = {n: pc.get("support") for n, pc in (test.get("per_class") or {}).items()}
    rows = [
        ("Workdir", f"<code>{_e(os.path.abspath(workdir))}</code>"),
        ("Data", data_source),
        ("Protocol", protocol),
        (
            "Test examples",
            f"{_fmt(test.get('num_examples'))} ("
            + ", ".join(f"{_e(n)} {_fmt(c)}" for n, c in counts.items())
            + ")",
        ),
        (
            "Model",
            _e(f"{_model_name(model)}, {model.get('num_classes', '?')} classes"),
        ),
        ("Initialised from", _e(config.get("init_from") or "random (scratch)")),
        (
            "Input",
            _e(
                f"{config.get('image_size', (metadata.get('preprocessing') or {}).get('image_size'))}"  # noqa: E501
                f" px, resize policy {config.get('resize', '?')}, augmentation "
                f"{', '.join(config.get('augment') or ()) or 'none'}"
            ),
        ),
        (
            "Checkpoint",
            _e(f"step {results.get('best_step')} (epoch {results.get('best_epoch')})"),
        ),
        ("Temperature", _fmt(metadata.get("temperature"), 3)),
    ]
    out = '<h2 id="run">The run</h2>' + _table(None, [(f"<b>{a}</b>", b) for a, b in rows], 2)
    if config:
        cfg_rows = [(f"<code>{_e(k)}</code>", _e(json.dumps(v))) for k, v in _flatten(config)]
        out += "<details><summary>Full configuration (config.json)</summary>"
        out += _table(["key", "value"], cfg_rows, 2) + "</details>"
    if cv and cv.get("metrics"):
        folds = cv.get("folds", [])
        head = ["metric (test folds)", "mean", "std"] + [f"fold {f}" for f in folds]
        rows = [
            [_e(name), _fmt(m.get("mean"), 4), _fmt(m.get("std"), 4)]
            + [_fmt(v, 4) for v in m.get("per_fold", [])]
            for name, m in cv["metrics"].items()
        ]
        out += "<h3>Cross-validation over folds</h3>" + _table(head, rows)
    return out


_DATASET_NAMES = {"sipakmed": "SIPaKMeD", "herlev": "Herlev", "cric": "CRIC Cervix"}


def _group_words(name: str, grouping: dict) -> str:
    """What one leak-free group is, in words."""
    rule, value = grouping.get("rule"), grouping.get("value") or ""
    if name == "sipakmed" or rule == "cluster image":
        return "cluster image (one slide, stain and background)"
    if rule == "regex":
        return f"group (the file-name rule <code>{_e(value)}</code>)"
    if rule == "csv":
        return f"group (the CSV <code>{_e(os.path.basename(value))}</code>)"
    return f"group ({_e(rule or 'the dataset')})"


def _data_and_protocol(results: dict, config: dict) -> tuple[str, str]:
    """The report's Data and Protocol cells, from `results["dataset"]` (the data's own record
    of its grouping rule) or, for older results, the config (SIPaKMeD)."""
    record = results.get("dataset") or {}
    name = record.get("name") or config.get("dataset", "sipakmed")
    fold_config = record.get("config") or config.get("dataset_config", "grouped")
    grouping = record.get("grouping") or {"rule": "cluster image", "leak_free": True}
    synthetic = (config.get("synthetic") or {}).get("cells_per_class") or 0
    if synthetic:
        data = f"synthetic SIPaKMeD stand-in ({synthetic} cells per class; not real cells)"
    elif name == "cell_folder":
        root = config.get("manual_dir") or "(built)"
        data = f"cell folder <code>{_e(root)}</code>, folds <code>{_e(fold_config)}</code>"
    else:
        data = f"{_e(_DATASET_NAMES.get(name, name))}, TFDS config <code>{_e(fold_config)}</code>"
    unit = _group_words(name, grouping)
    if fold_config != "grouped":
        protocol = (
            '<span class="bad">Cell-level random folds: cells of one source image appear on '
            "both sides; figures are optimistic and only comparable with published random-split "
            "numbers.</span> "
        )
    elif not grouping.get("leak_free", True):
        protocol = (
            '<span class="bad">Not leak-free: no grouping rule was given, so every file is its '
            "own group and cells of one slide can sit in the training and the test folds; the "
            "test figures may be optimistic.</span> "
        )
    else:
        protocol = (
            f"Five folds grouped by {unit}: all cells of one group fall in one fold, so no test "
            "cell shares its group with a training cell. "
        )
    protocol += (
        f"Test fold: <b>{_e(results.get('fold'))}</b>, read once at the end. Model selection on "
        "a validation part carved from the training folds by whole groups "
        f"({_e(results.get('selection', 'best validation macro-F1'))})."
    )
    return data, protocol


def _headline_rows(m: dict) -> list[str]:
    avn = m.get("abnormal_vs_nilm") or {}
    return [
        _fmt(m.get("accuracy"), pct=True),
        _fmt(m.get("balanced_accuracy"), pct=True),
        _fmt(m.get("macro_f1"), 3),
        _fmt(m.get("roc_auc_macro"), 3),
        _fmt((m.get("view_3class") or {}).get("accuracy"), pct=True),
        _fmt((m.get("view_2class") or {}).get("accuracy"), pct=True),
        _fmt(avn.get("sensitivity"), pct=True),
        _fmt(avn.get("specificity"), pct=True),
    ]


_HEADLINE = [
    "",
    "accuracy",
    "balanced acc.",
    "macro-F1",
    "macro AUC",
    "3-class acc.",
    "2-class acc.",
    "abnormal sensitivity",
    "NILM specificity",
]


def _section_summary(results: dict) -> str:
    test = results["test"]
    rows = [["<b>CNN</b> (test fold)"] + _headline_rows(test)]
    val = results.get("validation")
    if val:
        rows.append(['<span class="muted">CNN (validation)</span>'] + _headline_rows(val))
    sc = results.get("shortcuts") or {}
    for feat, by_clf in (sc.get("controls") or {}).items():
        for clf, m in by_clf.items():
            rows.append(
                [f"{_e(feat)}-only control ({_e(clf.replace('_', ' '))})"] + _headline_rows(m)
            )
    return (
        '<h2 id="summary">Summary</h2>'
        + _table(_HEADLINE, rows)
        + '<p class="muted">Shortcut controls (below) see only the crop size or only the '
        "colours, trained on the same training folds: what they reach is reachable without "
        "looking at the cell.</p>"
    )


def _view_title(view: str) -> str:
    """The view "3class" as "3 classes"; other view names as they are."""
    return f"{view[:-5]} classes" if view.endswith("class") and view[:-5].isdigit() else view


def _section_per_class(results: dict, taxonomy: Taxonomy) -> str:
    test = results["test"]
    views = list(taxonomy.views)
    head = ["class", "precision", "recall", "F1", "ROC-AUC", "support"]
    head += [_view_title(v) for v in views] + ["clinical reading"]
    rows = []
    for n in taxonomy.class_names:
        pc = (test.get("per_class") or {}).get(n, {})
        row = [
            _e(n),
            _fmt(pc.get("precision")),
            _fmt(pc.get("recall")),
            _fmt(pc.get("f1")),
            _fmt(pc.get("roc_auc")),
            _fmt(pc.get("support")),
        ]
        row += [_e(taxonomy.views[v]["of"][n]) for v in views]
        row.append(_e(taxonomy.reading(n) or NO_READING))
        rows.append(row)
    left = {0, *range(6, len(head))}
    out = '<h2 id="per-class">Per class (test fold)</h2>' + _table(head, rows, left)
    out += (
        '<p class="muted">Precision is undefined (&ndash;) for a class never predicted, recall '
        "for a class with no test cell.</p>"
    )
    return out


def _groupings(taxonomy: Taxonomy) -> str:
    """One sentence per view: which classes each group holds."""
    parts = []
    for view, spec in taxonomy.views.items():
        groups = "; ".join(
            f"{g} = {', '.join(c for c in taxonomy.class_names if spec['of'][c] == g)}"
            for g in spec["names"]
        )
        parts.append(f"{_view_title(view)}: {groups}.")
    return f"<p>Groupings (the model's taxonomy): {_e(' '.join(parts))}</p>" if parts else ""


def _section_confusion(results: dict, taxonomy: Taxonomy) -> str:
    from sipak_jax.metrics import confusion_matrix_image

    test = results["test"]
    names = list(taxonomy.class_names)
    figs = []
    cm = test.get("confusion_matrix")
    if cm is not None:
        title = f"{len(names)} classes"
        img = confusion_matrix_image(cm, names, title=title)
        figs.append(
            f"<figure>{_img(png_data_uri(img), f'{title} confusion matrix', 'cm')}"
            "<figcaption>Rows: true class; columns: predicted. Shade and percentage: share of "
            "the row.</figcaption></figure>"
        )
    for key, title in ((f"view_{v}", _view_title(v)) for v in taxonomy.views):
        view = test.get(key)
        if view:
            img = confusion_matrix_image(view["confusion_matrix"], view["class_names"], title=title)
            acc = _fmt(view.get("accuracy"), pct=True)
            figs.append(
                f"<figure>{_img(png_data_uri(img), f'{title} confusion matrix', 'cm')}"
                f"<figcaption>{title}: accuracy {acc}; probabilities summed per group."
                "</figcaption></figure>"
            )
    return (
        '<h2 id="confusion">Confusion matrices</h2>'
        + _groupings(taxonomy)
        + f'<div class="grid">{"".join(figs)}</div>'
    )


def _section_abnormal(results: dict, taxonomy: Taxonomy) -> str:
    avn = (results["test"] or {}).get("abnormal_vs_nilm")
    if not taxonomy.abnormal or not avn:
        why = (
            f"{NO_READING}: the model's taxonomy names no abnormal class"
            if not taxonomy.abnormal
            else "results.json holds no abnormal-vs-normal figures"
        )
        return f'<h2 id="abnormal">Abnormal vs NILM</h2><p class="note">Not available: {why}.</p>'
    abnormal = ", ".join(taxonomy.abnormal)
    normal = ", ".join(n for n in taxonomy.class_names if n not in taxonomy.abnormal)
    rows = [
        ["Sensitivity (abnormal cells called abnormal)", _fmt(avn.get("sensitivity"), pct=True),
         f"{_fmt(avn.get('tp'))} of {_fmt((avn.get('tp') or 0) + (avn.get('fn') or 0))}"],
        ["Specificity (NILM cells called NILM)", _fmt(avn.get("specificity"), pct=True),
         f"{_fmt(avn.get('tn'))} of {_fmt((avn.get('tn') or 0) + (avn.get('fp') or 0))}"],
        ["False negatives (abnormal called NILM)", _fmt(avn.get("fn")), ""],
        ["False positives (NILM called abnormal)", _fmt(avn.get("fp")), ""],
        ["ROC-AUC of the abnormal probability", _fmt(avn.get("roc_auc")), ""],
    ]  # fmt: skip
    return (
        '<h2 id="abnormal">Abnormal vs NILM</h2>'
        + _table(["", "value", "count"], rows)
        + f'<p class="muted">Abnormal = {_e(abnormal)}; NILM (normal) = {_e(normal or "none")}. '
        "A call is abnormal when the summed abnormal probability exceeds 0.5. False negatives "
        "are the costly errors.</p>"
    )


def _section_calibration(workdir: str, results: dict) -> str:
    cal = results.get("calibration")
    out = '<h2 id="calibration">Calibration</h2>'
    if not cal:
        return out + (
            '<p class="note">No calibration in results.json ("calibration" not in '
            "config.evaluators?).</p>"
        )
    t = cal.get("temperature")
    rows = []
    for split in ("validation", "test"):
        for when in ("before", "after"):
            s = (cal.get(split) or {}).get(when)
            if s:
                rows.append(
                    [f"{split}, {when} (T={_fmt(1.0 if when == 'before' else t, 2)})",
                     _fmt(s.get("ece"), 4), _fmt(s.get("brier"), 4), _fmt(s.get("nll"), 4),
                     _fmt(s.get("accuracy"), pct=True)]
                )  # fmt: skip
    out += (
        f"<p>Temperature scaling: logits divided by <b>T = {_fmt(t, 3)}</b>, fitted on the "
        f"{_e(cal.get('fitted_on', 'validation'))} split by minimising the negative "
        "log-likelihood; it changes the confidences, never the predicted class. The "
        "probabilities in this report and in <code>predict</code> are after scaling.</p>"
    )
    out += _table(["", f"ECE ({_e(cal.get('n_bins', 15))} bins)", "Brier", "NLL", "accuracy"], rows)
    out += (
        f'<p class="muted">ECE: {_e(cal.get("ece_convention", "top-label, equal-width bins"))}. '
        f"Brier: {_e(cal.get('brier_convention', 'sum over classes, mean over examples'))}.</p>"
    )
    img = None
    diagram = cal.get("diagram")
    if diagram:
        path = os.path.join(workdir, os.path.basename(str(diagram)))
        if os.path.isfile(path):
            bgr = cv2.imread(path, cv2.IMREAD_COLOR)
            if bgr is not None:
                img = bgr[..., ::-1]
    if img is None:
        preds = results.get("predictions") or []
        logits = [p.get("logits") for p in preds]
        if preds and all(z is not None for z in logits):
            from sipak_jax import calibration

            z = np.asarray(logits, np.float64)
            y = np.asarray([p["label"] for p in preds])
            curves = {"before": calibration.softmax(z)}
            if t:
                curves[f"after T={float(t):.2f}"] = calibration.softmax(z, float(t))
            img = calibration.reliability_diagram(curves, y, title="Reliability, test fold")
    if img is None:
        return out + '<p class="note">No reliability diagram: neither the PNG nor logits.</p>'
    return out + (
        f"<figure>{_img(png_data_uri(img), 'reliability diagram')}<figcaption>Accuracy against "
        "confidence per bin (the diagonal is perfect calibration); bars and histogram: before "
        "scaling.</figcaption></figure>"
    )


def _call_picture(workdir: str, c: dict, entry: dict | None) -> str:
    if entry is None:
        return '<div class="muted">(no overlay)</div>'
    try:
        uri = _png_file_uri(run_artifacts.image_path(workdir, entry))
    except (OSError, ValueError) as e:
        return f'<div class="muted">(overlay unreadable: {_e(e)})</div>'
    where = map_description(entry)
    if entry.get("blank"):
        where += ": no positive evidence at this layer (the picture is the cell alone)"
    alt = f"{map_description(entry)} of {c.get('file_name')}"
    return _img(uri, alt, "cell") + f'<br><span class="muted">{_e(where)}</span>'


def _call_cards(workdir, calls, overlays, taxonomy) -> str:
    names = taxonomy.class_names
    cards = []
    for c in calls:
        pred = names[int(np.argmax(c["probabilities"]))]
        label = c.get("label")
        true = names[int(label)] if label is not None else "?"
        verdict = (
            '<span class="good">truly abnormal</span>'
            if true in taxonomy.abnormal
            else '<span class="bad">false positive</span>'
        )
        picture = _call_picture(workdir, c, overlays.get(int(c["index"])))
        cards.append(
            f"<figure>{picture}<figcaption><b>{_e(pred)}</b> &middot; p(abnormal) "
            f"{_fmt(c['p_abnormal'], 3)}<br>true: {_e(true)} &middot; {verdict}<br>"
            f'<span class="muted">{_e(c.get("file_name", ""))}</span><br>'
            f"{_e(taxonomy.reading(pred) or '')}</figcaption></figure>"
        )
    return f'<div class="grid">{"".join(cards)}</div>' if cards else "<p>None.</p>"


def _call_overlays(workdir: str, calls: list, with_overlays: bool) -> tuple[dict, list[str]]:
    """({test index: artifacts index entry}, notes) for the selected calls."""
    if not with_overlays:
        return {}, ["overlays not requested (--nooverlays)"]
    try:
        index = run_artifacts.read_index(workdir)
    except ValueError as e:
        return {}, [str(e)]
    if index is None:
        return {}, [
            f"this run stored none ({run_artifacts.ARTIFACTS_DIR}/{run_artifacts.INDEX_FILE} "
            "is missing); compute them once with python -m sipak_jax.run_artifacts "
            f"--workdir={workdir}"
        ]
    stored = _stored_overlays(workdir, index)
    found = {int(c["index"]): stored[int(c["index"])] for c in calls if int(c["index"]) in stored}
    notes = []
    missing = [m.get("file_name") or str(m.get("index")) for m in index.get("missing", [])]
    if missing:
        notes.append(f"no image was found for {len(missing)} cell(s): {', '.join(missing[:5])}")
    if len(found) < len(calls):
        notes.append(
            f"{len(calls) - len(found)} of the {len(calls)} calls shown have no stored overlay "
            f"(the run stored {len(stored)})"
        )
    return found, notes


def _calls_intro(num_calls: int, overlays: dict) -> str:
    text = f"<p>{num_calls} test cells were called abnormal."
    where = sorted({map_description(e) for e in overlays.values()})
    if where:
        e = next(iter(overlays.values()))
        h, w = (e.get("map_size") or [0, 0])[:2]
        cell = f"{int(e['input_size']) // max(int(h), 1)} px" if e.get("input_size") else "?"
        text += (
            f" Each overlay is a map of the predicted class's evidence ({_e('; '.join(where))}"
            f"), drawn over the cell: warm colours mark the regions that raised the call, "
            f"located only as finely as the map resolves (one map cell spans about {cell} of "
            "the network's input)."
        )
    return text + "</p>"


def _section_calls(workdir, results, taxonomy: Taxonomy, with_overlays, k) -> str:
    out = '<h2 id="calls">Abnormal calls: the most confident and the most doubtful</h2>'
    preds = results.get("predictions")
    if not taxonomy.abnormal:
        return out + (
            f'<p class="note">Not available: {NO_READING}: the model\'s taxonomy names no '
            "abnormal class.</p>"
        )
    if not preds:
        return out + '<p class="note">results.json holds no per-example predictions.</p>'
    sel = run_artifacts.select_calls(preds, taxonomy, k)
    overlays, notes = _call_overlays(workdir, sel["confident"] + sel["doubtful"], with_overlays)
    out += _calls_intro(sel["num_calls"], overlays)
    for note in notes:
        out += f'<p class="note">Overlays: {_e(note)}</p>'
    out += "<h3>Most confident</h3>" + _call_cards(workdir, sel["confident"], overlays, taxonomy)
    out += "<h3>Most doubtful (nearest the 0.5 threshold)</h3>"
    out += _call_cards(workdir, sel["doubtful"], overlays, taxonomy)
    return out


def _section_shortcuts(results: dict) -> str:
    out = '<h2 id="shortcuts">Shortcut controls</h2>'
    sc = results.get("shortcuts")
    if not sc:
        return out + '<p class="note">No shortcut controls in results.json.</p>'
    if "controls" not in sc:
        why = sc.get("skipped") or sc.get("error") or "unknown reason"
        return out + f'<p class="note">Shortcut controls were not run: {_e(why)}</p>'
    cnn = results["test"]
    cnn_sens = (cnn.get("abnormal_vs_nilm") or {}).get("sensitivity")
    rows = [["<b>CNN</b>", _fmt(cnn.get("accuracy"), pct=True), _fmt(cnn.get("macro_f1")),
             _fmt(cnn_sens, pct=True), "the cell image"]]  # fmt: skip
    feats = sc.get("features") or {}
    for feat, by_clf in sc["controls"].items():
        for clf, m in by_clf.items():
            rows.append(
                [f"{_e(feat)}-only, {_e(clf.replace('_', ' '))}",
                 _fmt(m.get("accuracy"), pct=True), _fmt(m.get("macro_f1")),
                 _fmt((m.get("abnormal_vs_nilm") or {}).get("sensitivity"), pct=True),
                 _e(", ".join(feats.get(feat, [])))]
            )  # fmt: skip
    n = len(cnn.get("class_names") or [])
    chance = f"{100.0 / n:.0f}%" if n else "?"
    return out + (
        "<p>Where classes were imaged separately (SIPaKMeD's were), crop size and background "
        "colour differ by class. These classifiers see only those, trained on the same training "
        "folds "
        f"({_fmt(sc.get('num_train'))} cells) and scored on the same test fold "
        f"({_fmt(sc.get('num_test'))} cells). Chance is about {chance}. The closer a control "
        "comes to the CNN, the more of the CNN's accuracy could be such a shortcut.</p>"
        + _table(["", "accuracy", "macro-F1", "abnormal sensitivity", "features"], rows, {0, 4})
    )


def _thumb(r: dict, base: str) -> str:
    """The overlay thumbnail cell of a prediction row ("" without an overlay)."""
    ov = r.get("overlay")
    if not ov:
        return ""
    # predict writes the overlay path as given to --overlays: absolute, or relative to where
    # predict ran (tried first) or to the predictions file.
    tries = [ov] if os.path.isabs(ov) else [ov, os.path.join(base, ov)]
    path = next((t for t in tries if os.path.isfile(t)), None)
    img = cv2.imread(path, cv2.IMREAD_COLOR) if path else None
    if img is None:
        return '<span class="muted">missing</span>'
    img = img[..., ::-1]
    s = 96 / max(img.shape[:2])
    if s < 1:
        img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    return _img(png_data_uri(img), f"overlay of {r['path']}", "thumb")


def _ensemble_note(ok: list[dict]) -> str:
    """Which model made the predictions, when it was an ensemble (rows with `uncertainty`)."""
    if not any(r.get("uncertainty") is not None for r in ok):
        return ""
    members = next((r["members"] for r in ok if r.get("members")), None)
    out = (
        f"<p>Predicted by an <b>ensemble of {len(members) if members else 'several'} models</b>"
        ": the mean of the members' temperature-scaled probabilities. <i>Uncertainty</i> is "
        "the members' disagreement, the mutual information between the prediction and the "
        "member in nats (0: they agree).</p>"
    )
    if not members:
        return out + '<p class="muted">A CSV does not list the members; the .jsonl does.</p>'
    return out + "<ul>" + "".join(f"<li><code>{_e(m)}</code></li>" for m in members) + "</ul>"


def _section_predictions(rows: list[dict], source: str, max_thumbs: int = 500) -> str:
    out = '<h2 id="predictions">Per-image predictions</h2>'
    out += f'<p class="muted">From <code>{_e(source)}</code>.</p>'
    ok = [r for r in rows if not r.get("error")]
    out += _ensemble_note(ok)
    has_u = any(r.get("uncertainty") is not None for r in ok)
    bad = [r for r in rows if r.get("error")]
    has_pab = any(r.get("p_abnormal") is not None for r in ok)

    def key(r):
        if has_pab:
            return (not r.get("flagged"), -(r.get("p_abnormal") or 0.0), str(r["path"]))
        return (0, -max(r.get("probabilities") or [0.0]), str(r["path"]))

    ok.sort(key=key)
    base = os.path.dirname(os.path.abspath(source))
    head = [
        "image",
        "overlay",
        "label",
        "3-class",
        "2-class",
        "p(abnormal)",
        "top p",
        "clinical reading",
    ] + (["uncertainty"] if has_u else [])
    body, thumbs = [], 0
    for r in ok:
        cell = _thumb(r, base) if thumbs < max_thumbs else ""
        thumbs += cell.startswith("<img")
        cls = "flagged" if r.get("flagged") else ""
        probs = r.get("probabilities") or []
        two = "<b>abnormal</b>" if r.get("flagged") else _e(r.get("label_2class") or "")
        cells = [
            _e(r["path"]),
            cell,
            _e(r.get("label")),
            _e(r.get("label_3class") or ""),
            two,
            _fmt(r.get("p_abnormal")),
            _fmt(max(probs) if probs else None),
            _e(r.get("bethesda") or ""),
        ] + ([_fmt(r.get("uncertainty"), 4)] if has_u else [])
        tds = "".join(
            f'<td class="{"" if i in (5, 6, 8) else "l"}">{c}</td>' for i, c in enumerate(cells)
        )
        body.append(f'<tr class="{cls}">{tds}</tr>')
    for r in bad:
        body.append(
            f'<tr class="error"><td class="l">{_e(r["path"])}</td>'
            f'<td class="l" colspan="{len(head) - 1}">could not be read: {_e(r["error"])}</td></tr>'
        )
    flagged = sum(1 for r in ok if r.get("flagged"))
    out += (
        f"<p>{len(ok)} images predicted, <b>{flagged} flagged abnormal</b> (listed first, "
        f"highlighted), {len(bad)} unreadable. Sorted by abnormal probability.</p>"
    )
    if thumbs >= max_thumbs:
        out += f'<p class="note">Overlay thumbnails shown for the first {max_thumbs} rows only.</p>'
    hrow = "".join(f'<th class="l">{h}</th>' for h in head)
    return out + f"<table><thead><tr>{hrow}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ---------------------------------------------------------------------------------------------
# The page.


def _read_metadata(workdir: str, notes: list[str]):
    """The run's `model_io.ModelMetadata` (the one reader of metadata.json), or None with a
    note when it is missing or unusable."""
    from sipak_jax import model_io

    try:
        return model_io.read_metadata(workdir)
    except (FileNotFoundError, ValueError) as e:
        notes.append(str(e))
        return None


def _run_taxonomy(results: dict, metadata, notes: list[str]) -> Taxonomy:
    """The model's taxonomy from its metadata; for a run without one (older or damaged), the
    known taxonomy of results.json's class names, or those names alone."""
    if metadata is not None and metadata.taxonomy is not None:
        return metadata.taxonomy
    return for_class_names(results.get("class_names") or results["test"]["class_names"])


def render_report(
    workdir: str,
    predictions: str | None = None,
    *,
    overlays: bool = True,
    num_calls: int = DEFAULT_CALLS,
) -> str:
    """The report's HTML as a string (see the module docstring)."""
    workdir = os.fspath(workdir)
    results_path = os.path.join(workdir, "results.json")
    if not os.path.isfile(results_path) and os.path.isfile(
        os.path.join(workdir, "cv_results.json")
    ):
        folds = sorted(d for d in os.listdir(workdir) if d.startswith("fold"))
        raise FileNotFoundError(
            f"{workdir} is a fold=all workdir (cv_results.json, {', '.join(folds)}): run the "
            f"report on one fold's directory, e.g. --workdir={os.path.join(workdir, 'fold0')}; "
            "each fold's report shows the cross-validation table too."
        )
    if not os.path.isfile(results_path):
        raise FileNotFoundError(
            f"{results_path} not found: the report needs a finished training run "
            "(python main.py --config=... --workdir=DIR writes it)."
        )
    try:
        results = _read_json(results_path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{results_path} is not valid JSON: {e}") from None
    if not isinstance(results, dict) or not isinstance(results.get("test"), dict):
        raise ValueError(f"{results_path} has no 'test' metrics dict; is it a sipak_jax run?")
    notes: list[str] = []
    config = _optional_json(os.path.join(workdir, "config.json"), notes)
    metadata = _read_metadata(workdir, notes)
    cv = _optional_json(os.path.join(workdir, "cv_results.json"), notes) or _optional_json(
        os.path.join(os.path.dirname(os.path.abspath(workdir)), "cv_results.json"), notes
    )
    pred_rows = read_predictions(predictions) if predictions else None
    taxonomy = _run_taxonomy(results, metadata, notes)

    sections = [
        _section_run(workdir, results, config, metadata and metadata.to_dict(), cv),
        _section_summary(results),
        _section_per_class(results, taxonomy),
        _section_confusion(results, taxonomy),
        _section_abnormal(results, taxonomy),
        _section_calibration(workdir, results),
        _section_calls(workdir, results, taxonomy, overlays, num_calls),
        _section_shortcuts(results),
    ]
    if pred_rows is not None:
        sections.append(_section_predictions(pred_rows, predictions))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    notes_html = "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    dataset = _DATASET_NAMES.get(taxonomy.dataset, taxonomy.dataset) or "Cell"
    title = f"{dataset} cell classification: test fold {results.get('fold', '?')}"
    nav = " &middot; ".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in [
            ("run", "run"),
            ("summary", "summary"),
            ("per-class", "per class"),
            ("confusion", "confusion"),
            ("abnormal", "abnormal vs NILM"),
            ("calibration", "calibration"),
            ("calls", "calls"),
            ("shortcuts", "shortcuts"),
        ]
        + ([("predictions", "per image")] if pred_rows is not None else [])
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'{_MARKER}<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_e(title)}</h1><p class="muted">Written {stamp} by <code>{GENERATOR}</code>. '
        "Research software, not a medical device: every call needs a cytopathologist's review."
        f"</p><p>{nav}</p>{notes_html}{''.join(sections)}</body></html>\n"
    )


def write_report(
    workdir: str,
    predictions: str | None = None,
    *,
    output: str | None = None,
    overlays: bool = True,
    num_calls: int = DEFAULT_CALLS,
) -> str:
    """Write the report (default `workdir/report.html`) and return its path."""
    output = os.fspath(output) if output else os.path.join(os.fspath(workdir), "report.html")
    if os.path.exists(output):
        if not os.path.isfile(output):
            raise FileExistsError(f"{output} exists and is not a file; choose another --output")
        with open(output, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
        if _MARKER not in head:
            raise FileExistsError(
                f"{output} exists and was not written by {GENERATOR}; not replacing it. "
                "Choose another --output or move the file."
            )
    page = render_report(workdir, predictions, overlays=overlays, num_calls=num_calls)
    fileio.atomic_write_text(output, page)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sipak_jax.report", description=__doc__.split("\n")[0]
    )
    p.add_argument("--workdir", required=True, help="a training workdir with results.json")
    p.add_argument("--predictions", default=None, help="a sipak_jax.predict .jsonl or .csv")
    p.add_argument("--output", default=None, help="HTML file (default WORKDIR/report.html)")
    p.add_argument("--nooverlays", action="store_true", help="leave out the stored overlays")
    p.add_argument("--num_calls", type=int, default=DEFAULT_CALLS)
    p.add_argument("--verbosity", type=int, default=0, help="1: show the libraries' log lines")
    args = p.parse_args(argv)
    from sipak_jax import console

    console.quiet_libraries(args.verbosity)
    try:
        path = write_report(
            args.workdir,
            args.predictions,
            output=args.output,
            overlays=not args.nooverlays,
            num_calls=args.num_calls,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
