"""The HTML report: built from a small fake run, then opened in a real headless Chromium."""

import html
import json
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from sipak_jax import calibration, metrics, predict, report, shortcuts
from tfds_sipakmed.taxonomy import SIPAKMED

K = SIPAKMED.num_classes
SIZE = 32


def _crop(label, seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    img = np.full((h, w, 3), rng.integers(150, 230, 3), np.uint8)
    colour = tuple(int(v) for v in rng.integers(0, 200, 3))
    cv2.ellipse(img, (w // 2, h // 2), (w // 3, h // 4), 10 * label, 0, 360, colour, -1)
    return img


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A workdir as training leaves it: metadata.json, results.json, config.json, PNGs and the
    overlays of the selected calls (`run_artifacts`); no checkpoint: the report needs none."""
    from flax import nnx

    from sipak_jax import model_io, preprocessing, run_artifacts
    from sipak_jax.models import ResNet

    root = tmp_path_factory.mktemp("run")
    workdir = root / "workdir"
    images = root / "manual"
    model = ResNet(18, K, width=8, stage_sizes=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    meta = model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=SIPAKMED,
        preprocessing=preprocessing.spec_for("scratch", image_size=SIZE),
        temperature=1.3,
    )
    model_io.write_metadata(workdir, meta)

    rng = np.random.default_rng(0)
    n = 40
    labels = np.arange(n) % K
    logits = rng.normal(size=(n, K)) * 2
    logits[np.arange(n), labels] += 2.5
    preds = []
    for i in range(n):
        name = SIPAKMED.class_names[labels[i]]
        file_name = f"im_{name}/CROPPED/{i:03d}_01.bmp"
        path = images / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), _crop(labels[i], i)[..., ::-1])
        p = calibration.softmax(logits[i : i + 1], 1.3)[0]
        preds.append(
            {
                "index": i,
                "file_name": file_name,
                "cluster_id": f"{name}/{i:03d}",
                "label": int(labels[i]),
                "prediction": int(p.argmax()),
                "probabilities": p.round(6).tolist(),
                "logits": logits[i].round(5).tolist(),
            }
        )
    val_logits = rng.normal(size=(n, K)) * 2
    val_labels = rng.integers(0, K, n)
    val_logits[np.arange(n), val_labels] += 2.5
    cal = calibration.calibration_summary(val_logits, val_labels, logits, labels)
    calibration.write_reliability_diagram(
        workdir / "reliability.png",
        {"before": calibration.softmax(logits), "after": calibration.softmax(logits, 1.3)},
        labels,
    )
    cal["diagram"] = "reliability.png"
    m = 200
    sc = shortcuts.shortcut_controls(
        rng.integers(40, 400, (m, 2)),
        rng.uniform(0, 255, (m, 6)),
        rng.integers(0, K, m),
        rng.integers(0, 5, m),
        test_fold=1,
        taxonomy=SIPAKMED,
    )
    results = {
        "fold": 1,
        "best_step": 120,
        "best_epoch": 3,
        "selection": "best validation macro-F1",
        "class_names": list(SIPAKMED.class_names),
        "validation": metrics.classification_metrics(
            val_labels, calibration.softmax(val_logits), SIPAKMED
        ),
        "test": metrics.classification_metrics(labels, calibration.softmax(logits, 1.3), SIPAKMED),
        "calibration": cal,
        "predictions": preds,
        "shortcuts": sc,
    }
    (workdir / "results.json").write_text(json.dumps(results, allow_nan=False))
    config = {
        "dataset_config": "grouped",
        "manual_dir": str(images),
        "image_size": SIZE,
        "resize": "pad",
        "augment": ["rot90", "flip"],
        "fold": "1",
        "model": {"depth": 18, "width": 8, "variant": "v1.5"},
    }
    (workdir / "config.json").write_text(json.dumps(config))
    # What the trainer's finalize step stores for the report.
    cells = run_artifacts.cells_for_run(preds, SIPAKMED, image_roots=[str(images)])
    run_artifacts.write_run_artifacts(workdir, model, meta, cells)

    # A predict output: readable rows (one with an overlay), one unreadable file.
    rows = []
    ov_dir = root / "overlays"
    ov_dir.mkdir()
    for i in range(6):
        probs = calibration.softmax(logits[i : i + 1], 1.3)[0]
        row = {"path": f"cells/c{i}.png", **predict.reading(probs, SIPAKMED)}
        row.update(temperature=1.3, overlay=None, error=None)
        if i == 0:
            ov = ov_dir / "c0_gradcam.png"
            cv2.imwrite(str(ov), _crop(0, 99))
            row["overlay"] = str(ov)
        rows.append(row)
    rows.append({"path": "cells/broken.png", "error": "Cannot decode cells/broken.png"})
    pred_file = root / "preds.jsonl"
    predict.write_rows(rows, str(pred_file), SIPAKMED.class_names)
    return {"workdir": workdir, "predictions": pred_file, "images": images, "results": results}


@pytest.fixture(scope="module")
def report_path(run_dir):
    return report.write_report(str(run_dir["workdir"]), str(run_dir["predictions"]))


def _chromium_check(chromium, html_path, tmp_path):
    """Open the page in headless Chromium (the executable `chromium`); a script added to a copy
    records, after load, how many <img> elements decoded (complete and naturalWidth > 0).
    Returns (total, ok, dom)."""
    page = open(html_path, encoding="utf-8").read()
    probe = (
        "<script>window.addEventListener('load',function(){var im=document.images,ok=0;"
        "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}"
        "document.body.setAttribute('data-images-total',im.length);"
        "document.body.setAttribute('data-images-ok',ok);});</script>"
    )
    copy = tmp_path / "probe.html"
    copy.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    profile = tmp_path / "profile"
    profile.mkdir()
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        copy.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    dom = proc.stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    ok = re.search(r'data-images-ok="(\d+)"', dom)
    assert total and ok, (
        f"no probe result in Chromium's DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    )
    return int(total.group(1)), int(ok.group(1)), dom


@pytest.mark.slow  # Chromium's start-up and rendering on a busy CPU
def test_every_image_renders_in_chromium(chromium, report_path, tmp_path):
    """`chromium` (conftest.py): an installed browser, or this test is skipped with how to get
    one (failed under SIPAK_REQUIRE_BROWSER=1, as .ci/run sets)."""
    page = open(report_path, encoding="utf-8").read()
    n_img = len(re.findall(r"<img\b", page))
    # 3 confusion matrices + reliability + 8 call overlays + 1 thumbnail.
    assert n_img == 3 + 1 + 8 + 1, n_img
    total, ok, dom = _chromium_check(chromium, report_path, tmp_path)
    assert total == n_img and ok == total, (total, ok)
    assert "Abnormal vs NILM" in dom


def test_page_is_self_contained(report_path):
    page = open(report_path, encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>")
    for m in re.finditer(r'\b(?:src|href)\s*=\s*"([^"]*)"', page):
        assert m.group(1).startswith(("data:image/png;base64,", "#")), m.group(1)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "<script" not in page


def test_page_content(report_path, run_dir):
    page = open(report_path, encoding="utf-8").read()
    results = run_dir["results"]
    # Sections.
    for heading in (
        "The run",
        "Per class (test fold)",
        "Confusion matrices",
        "Abnormal vs NILM",
        "Calibration",
        "Most confident",
        "Most doubtful",
        "Shortcut controls",
        "Per-image predictions",
    ):
        assert heading in page, heading
    # Figures match results.json.
    acc = results["test"]["accuracy"]
    assert f"{100 * acc:.1f}%" in page
    sens = results["test"]["abnormal_vs_nilm"]["sensitivity"]
    assert f"{100 * sens:.1f}%" in page
    assert f"T = {results['calibration']['temperature']:.3f}" in page
    for name in SIPAKMED.class_names:
        assert html.escape(SIPAKMED.readings[name]) in page, name
    assert "size-only control (gradient boosting)" in page
    # The groupings come from the model's taxonomy: Metaplastic is normal in the 2-class view.
    assert (
        "2 classes: normal = Metaplastic, Parabasal, Superficial-Intermediate; "
        "abnormal = Dyskeratotic, Koilocytotic." in page
    )
    assert "Overlays:" not in page  # every call has its stored overlay: no degradation note
    # Each map says where it was computed: at 32 px the stage rule picks layer1 (8x8), not
    # layer4's 1x1 map.
    where = "Grad-CAM at layer1, 8x8 map on a 32 px input"
    assert page.count(f'<span class="muted">{where}') == 8  # under each of the 8 overlays
    assert f"evidence ({where})" in page  # and in the section's text
    assert "one map cell spans about 4 px of the network's input" in page
    # Per-image table: flagged rows first, sorted by p(abnormal), the unreadable file last.
    table = page[page.index('id="predictions"') :]
    paths = re.findall(r'<td class="l">(cells/[^<]+)</td>', table)
    rows = [json.loads(line) for line in open(run_dir["predictions"])]
    ok = [r for r in rows if not r.get("error")]
    expected = [
        r["path"] for r in sorted(ok, key=lambda r: (not r["flagged"], -r["p_abnormal"], r["path"]))
    ]
    assert paths == expected + ["cells/broken.png"]
    assert "could not be read: Cannot decode" in table


def test_degrades_without_stored_overlays(run_dir, tmp_path):
    # A run finished before overlays were stored (or whose finalize failed): the calls are
    # listed, with the command that computes their overlays.
    work2 = tmp_path / "w2"
    shutil.copytree(run_dir["workdir"], work2)
    shutil.rmtree(work2 / "artifacts")
    (work2 / "reliability.png").unlink()  # redrawn from the logits in results.json
    path = report.write_report(str(work2), overlays=True)
    page = open(path).read()
    assert "Overlays: this run stored none" in page
    assert f"python -m sipak_jax.run_artifacts --workdir={work2}" in page
    assert "(no overlay)" in page and "Most confident" in page
    assert len(re.findall(r"<img\b", page)) == 4  # 3 confusion matrices + redrawn reliability


def test_report_imports_no_model_code():
    # The report only renders: importing it (and so rendering) loads neither JAX nor Flax.
    code = (
        "import sys, sipak_jax.report; "
        "assert not {'jax', 'flax'} & set(sys.modules), sorted({'jax', 'flax'} & set(sys.modules))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_refuses_to_replace_a_file_it_did_not_write(run_dir, tmp_path):
    out = tmp_path / "mine.html"
    out.write_text("<html>the user's own page</html>")
    with pytest.raises(FileExistsError, match="not written by sipak_jax.report"):
        report.write_report(str(run_dir["workdir"]), output=str(out), overlays=False)
    assert out.read_text() == "<html>the user's own page</html>"
    # Its own report is replaced (a rerun after training).
    out2 = tmp_path / "again.html"
    report.write_report(str(run_dir["workdir"]), output=str(out2), overlays=False)
    report.write_report(str(run_dir["workdir"]), output=str(out2), overlays=False)


def test_command_line_errors(tmp_path, capsys):
    assert report.main([f"--workdir={tmp_path}"]) == 2
    assert "results.json not found" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{not json")
    assert report.main([f"--workdir={tmp_path}"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_fold_all_workdir_points_to_the_fold_directories(tmp_path, capsys):
    (tmp_path / "cv_results.json").write_text('{"folds": [0, 1], "metrics": {}}')
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold1").mkdir()
    assert report.main([f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "fold=all workdir" in err and "fold0" in err


def test_a_model_without_clinical_meaning_says_so(tmp_path):
    """A taxonomy with no abnormal class and no readings (a folder of crops, ImageNet): the
    report shows its own classes and says that no clinical reading is defined."""
    from tfds_sipakmed.taxonomy import Taxonomy

    tax = Taxonomy.bare(("round", "long", "flat"), "cell_folder")
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    logits = rng.normal(size=(30, 3))
    logits[np.arange(30), labels] += 2.0
    results = {
        "fold": 0,
        "class_names": list(tax.class_names),
        "test": metrics.classification_metrics(labels, calibration.softmax(logits), tax),
    }
    (tmp_path / "results.json").write_text(json.dumps(results, allow_nan=False))
    from sipak_jax import model_io, preprocessing

    model = {"depth": 18, "variant": "v1.5", "num_classes": 3, "width": 8}
    spec = preprocessing.spec_for("scratch", image_size=32)
    model_io.write_metadata(tmp_path, model_io.ModelMetadata("training", model, tax, spec, fold=0))
    page = report.render_report(str(tmp_path))
    per_class = page[page.index('id="per-class"') : page.index('id="confusion"')]
    for name in tax.class_names:
        assert f">{name}<" in per_class
    assert per_class.count("no clinical reading defined") == 3
    assert "Dyskeratotic" not in page and "Bethesda" not in page
    assert "<title>cell_folder cell classification" in page
    abnormal = page[page.index('id="abnormal"') : page.index('id="calibration"')]
    assert "no clinical reading defined" in abnormal and "Sensitivity" not in abnormal
