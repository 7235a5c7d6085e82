"""The HTML page of a `sipak_jax.evaluate` result: one self-contained file, rendered only.

`render(result, diagram_png=None) -> str` takes the result dict `evaluate` writes (format
`sipak_jax.evaluate/1`) and the reliability diagram's PNG bytes, and returns the page: the
model (the ensemble named, its members listed), the data, the normal/abnormal figures, the 2x2
confusion, calibration with the diagram inline, the per-class calls and, when the classes
match, the full-class figures. Styles and helpers are the training report's
(`sipak_jax.report`); nothing here loads a model or imports JAX.
"""

from __future__ import annotations

import base64
import datetime

from sipak_jax.report import _CSS, _MARKER, GENERATOR, _e, _fmt, _table

__all__ = ["render"]


def _model_section(model: dict) -> str:
    members = model.get("members") or []
    if model.get("ensemble"):
        temps = model.get("member_temperatures") or [None] * len(members)
        rows = [(f"<code>{_e(m)}</code>", _fmt(t, 3)) for m, t in zip(members, temps, strict=False)]
        what = (
            f"<p>An <b>ensemble of {len(members)} models</b> (<code>{_e(model['checkpoint'])}"
            "</code>): the mean of the members' temperature-scaled probabilities; ensemble "
            f"temperature {_fmt(model.get('temperature'), 3)}.</p>"
            + _table(["member", "its temperature"], rows, 1)
        )
    else:
        what = (
            f"<p>One model: <code>{_e(model['checkpoint'])}</code>, temperature "
            f"{_fmt(model.get('temperature'), 3)}.</p>"
        )
    tax = model.get("taxonomy") or {}
    return (
        '<h2 id="model">Model</h2>'
        + what
        + f"<p>Trained on <b>{_e(tax.get('dataset') or 'unnamed data')}</b>; its classes "
        f"{_e(', '.join(tax.get('class_names', [])))}; abnormal: "
        f"{_e(', '.join(tax.get('abnormal', [])) or 'none')}. Input "
        f"{_e(model.get('image_size'))} px, resize {_e(model.get('resize'))}.</p>"
    )


def _data_section(data: dict) -> str:
    tax = data.get("taxonomy") or {}
    where = data.get("data_dir") or data.get("manual_dir")
    out = (
        '<h2 id="data">Data</h2>'
        f"<p><b>{_e(data['dataset'])}</b> from <code>{_e(where)}</code>, splits "
        f"{_e(', '.join(data.get('splits', [])))}: {_fmt(data.get('num_examples'))} cells. "
        f"Its classes {_e(', '.join(tax.get('class_names', [])))}; abnormal: "
        f"{_e(', '.join(tax.get('abnormal', [])))}.</p>"
    )
    for w in data.get("warnings") or []:
        out += f'<p class="note">{_e(w)}</p>'
    return out


def _two_class_section(t: dict, diagram_png: bytes | None) -> str:
    rows = [
        ["accuracy", _fmt(t.get("accuracy"), pct=True)],
        ["sensitivity (abnormal cells called abnormal)", _fmt(t.get("sensitivity"), pct=True)],
        ["specificity (normal cells called normal)", _fmt(t.get("specificity"), pct=True)],
        ["ROC-AUC of p(abnormal)", _fmt(t.get("roc_auc"))],
        ["ECE (top label, 15 bins)", _fmt(t.get("ece"))],
        ["Brier (sum over the two classes, 0-2)", _fmt(t.get("brier"))],
    ]
    (tn, fp), (fn, tp) = t["confusion_matrix"]
    cm = _table(
        ["true \\ called", "normal", "abnormal"],
        [["normal", _fmt(tn), _fmt(fp)], ["abnormal", _fmt(fn), _fmt(tp)]],
    )
    out = (
        '<h2 id="two-class">Normal vs abnormal</h2>'
        f"<p>{_fmt(t['num_examples'])} cells, {_fmt(t['num_abnormal'])} abnormal by the "
        "dataset's taxonomy. Called abnormal when the model's summed probability of its "
        "abnormal classes exceeds 0.5.</p>" + _table(None, rows, 1) + cm
    )
    if diagram_png:
        uri = "data:image/png;base64," + base64.b64encode(diagram_png).decode("ascii")
        out += f'<figure><img src="{uri}" alt="reliability diagram" class="cm"></figure>'
    return out


def _per_class_section(per_class: dict) -> str:
    rows = [
        [
            _e(name),
            "abnormal" if c["abnormal"] else "normal",
            _fmt(c["n"]),
            _fmt(c["flagged"]),
            _fmt(c["flagged_rate"], pct=True),
            _fmt(c["mean_p_abnormal"]),
        ]
        for name, c in per_class.items()
    ]
    head = ["dataset class", "counts as", "cells", "called abnormal", "rate", "mean p(abnormal)"]
    return '<h2 id="per-class">Calls per class of the dataset</h2>' + _table(head, rows, 2)


def _recalibration_note(result: dict) -> str:
    recal = result.get("recalibration")
    if not recal:
        return (
            '<p class="muted">No recalibration: the probabilities are the model\'s own '
            "(temperature-scaled on its training data's validation split).</p>"
        )
    before = result.get("two_class_before_recalibration") or {}
    return (
        f"<p>Recalibrated on {_e(', '.join(recal['splits']))} ({_fmt(recal['num_examples'])} "
        f"cells, not scored): temperature {_fmt(recal['temperature'], 3)} on the normal/"
        f"abnormal probabilities ({_e(recal['fit'])}). The model's own: ECE "
        f"{_fmt(before.get('ece'))}, Brier {_fmt(before.get('brier'))}. Calls, sensitivity, "
        "specificity and AUC do not change.</p>"
    )


def _extra_sections(result: dict) -> str:
    out = ""
    u = result.get("uncertainty")
    if u:
        out += (
            '<h2 id="uncertainty">Disagreement between the members</h2>'
            f"<p>{_e(u['measure'])}: mean {_fmt(u['mean'], 4)}; on right calls "
            f"{_fmt(u['mean_correct'], 4)}, on wrong calls {_fmt(u['mean_wrong'], 4)}.</p>"
        )
    full = result.get("full_class")
    if full:
        rows = [
            [_e(n), _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), _fmt(c["support"])]
            for n, c in full["per_class"].items()
        ]
        out += (
            '<h2 id="full-class">All classes (same taxonomy)</h2>'
            f"<p>Accuracy {_fmt(full['accuracy'], pct=True)}, balanced accuracy "
            f"{_fmt(full['balanced_accuracy'], pct=True)}, macro-F1 {_fmt(full['macro_f1'])}, "
            f"macro AUC {_fmt(full['roc_auc_macro'])}.</p>"
            + _table(["class", "precision", "recall", "F1", "support"], rows)
        )
    return out


def render(result: dict, diagram_png: bytes | None = None) -> str:
    """The page of one evaluation result (module docstring)."""
    data, model = result["data"], result["model"]
    title = f"Evaluation on {data['dataset']}: normal vs abnormal"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in result.get("notes", []))
    body = (
        _model_section(model)
        + _data_section(data)
        + _two_class_section(result["two_class"], diagram_png)
        + _recalibration_note(result)
        + _per_class_section(result["per_class"])
        + _extra_sections(result)
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'{_MARKER}<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_e(title)}</h1><p class="muted">Written {stamp} by <code>{GENERATOR}</code> '
        "from <code>sipak_jax.evaluate</code>. Research software, not a medical device.</p>"
        f"{notes}{body}</body></html>\n"
    )
