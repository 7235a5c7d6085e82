"""The HTML report: built from a small fake run, then opened in a real headless Chromium."""

import json
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from sipak_jax import calibration, classes, metrics, predict, report, shortcuts

K = len(classes.CLASS_NAMES)
SIZE = 32
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _crop(label, seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    img = np.full((h, w, 3), rng.integers(150, 230, 3), np.uint8)
    colour = tuple(int(v) for v in rng.integers(0, 200, 3))
    cv2.ellipse(img, (w // 2, h // 2), (w // 3, h // 4), 10 * label, 0, 360, colour, -1)
    return img


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A workdir as training leaves it: model DIR files, results.json, config.json, PNGs."""
    from flax import nnx

    from sipak_jax import model_io, preprocessing
    from sipak_jax.models import ResNet

    root = tmp_path_factory.mktemp("run")
    workdir = root / "workdir"
    images = root / "manual"
    model = ResNet(18, K, width=8, rngs=nnx.Rngs(0))
    meta = {
        "kind": "converted",
        "class_names": list(classes.CLASS_NAMES),
        "preprocessing": preprocessing.spec_for("scratch", image_size=SIZE),
        "temperature": 1.3,
    }
    model_io.save_model_dir(workdir, model, meta)

    rng = np.random.default_rng(0)
    n = 40
    labels = np.arange(n) % K
    logits = rng.normal(size=(n, K)) * 2
    logits[np.arange(n), labels] += 2.5
    preds = []
    for i in range(n):
        name = classes.CLASS_NAMES[labels[i]]
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
    )
    results = {
        "fold": 1,
        "best_step": 120,
        "best_epoch": 3,
        "selection": "best validation macro-F1",
        "class_names": list(classes.CLASS_NAMES),
        "validation": metrics.classification_metrics(val_labels, calibration.softmax(val_logits)),
        "test": metrics.classification_metrics(labels, calibration.softmax(logits, 1.3)),
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

    # A predict output: readable rows (one with an overlay), one unreadable file.
    rows = []
    ov_dir = root / "overlays"
    ov_dir.mkdir()
    for i in range(6):
        probs = calibration.softmax(logits[i : i + 1], 1.3)[0]
        row = {"path": f"cells/c{i}.png", **predict.reading(probs, classes.CLASS_NAMES)}
        row.update(temperature=1.3, overlay=None, error=None)
        if i == 0:
            ov = ov_dir / "c0_gradcam.png"
            cv2.imwrite(str(ov), _crop(0, 99))
            row["overlay"] = str(ov)
        rows.append(row)
    rows.append({"path": "cells/broken.png", "error": "Cannot decode cells/broken.png"})
    pred_file = root / "preds.jsonl"
    predict.write_rows(rows, str(pred_file), classes.CLASS_NAMES)
    return {"workdir": workdir, "predictions": pred_file, "images": images, "results": results}


@pytest.fixture(scope="module")
def report_path(run_dir):
    return report.write_report(str(run_dir["workdir"]), str(run_dir["predictions"]))


def _chromium_check(html_path, tmp_path):
    """Open the page in headless Chromium; a script added to a copy records, after load, how
    many <img> elements decoded (complete and naturalWidth > 0). Returns (total, ok, dom)."""
    assert CHROMIUM, "chromium is not installed (apt-get install -y chromium); .ci/run installs it"
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
        CHROMIUM,
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


@pytest.mark.slow  # Chromium start-up and a model build + Grad-CAM on a busy CPU
def test_every_image_renders_in_chromium(report_path, tmp_path):
    page = open(report_path, encoding="utf-8").read()
    n_img = len(re.findall(r"<img\b", page))
    # 3 confusion matrices + reliability + 8 call overlays + 1 thumbnail.
    assert n_img == 3 + 1 + 8 + 1, n_img
    total, ok, dom = _chromium_check(report_path, tmp_path)
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
    for name in classes.CLASS_NAMES:
        assert classes.BETHESDA[name] in page or classes.BETHESDA[name].replace("/", "/") in page
    assert "size-only control (gradient boosting)" in page
    assert "Metaplastic counts as normal (NILM)" in page
    assert "Grad-CAM overlays:" not in page  # overlays were computed: no degradation note
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


def test_select_calls():
    p_ab = [0.9, 0.55, 0.2, 0.99, 0.51, 0.7]
    preds = []
    for i, pa in enumerate(p_ab):
        probs = [pa / 2, pa / 2, (1 - pa) / 3, (1 - pa) / 3, (1 - pa) / 3]
        preds.append({"index": i, "probabilities": probs, "label": 0})
    sel = report.select_calls(preds, classes.CLASS_NAMES, k=2)
    assert sel["num_calls"] == 5
    assert [c["index"] for c in sel["confident"]] == [3, 0]
    assert [c["index"] for c in sel["doubtful"]] == [4, 1]
    assert report.select_calls(preds, ["a"] * 5, k=2)["num_calls"] == 0


def test_degrades_without_images(run_dir, tmp_path):
    # No images_dir and no manual_dir in the config: nowhere to read the crops from.
    work2 = tmp_path / "w2"
    shutil.copytree(run_dir["workdir"], work2)
    cfg = json.loads((work2 / "config.json").read_text())
    cfg["manual_dir"] = ""
    (work2 / "config.json").write_text(json.dumps(cfg))
    (work2 / "reliability.png").unlink()  # redrawn from the logits in results.json
    path = report.write_report(str(work2), overlays=True)
    page = open(path).read()
    assert "Grad-CAM overlays: no image folder is known" in page and "--images_dir" in page
    assert "(no overlay)" in page
    assert len(re.findall(r"<img\b", page)) == 4  # 3 confusion matrices + redrawn reliability


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
