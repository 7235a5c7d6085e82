"""`python -m sipak_jax.evaluate`: tiny ResNets (width 8, 32 px) on a synthetic SIPaKMeD tree
and on a cell folder with another taxonomy; every figure checked against scikit-learn."""

import json

import cv2
import numpy as np
import pytest
from sklearn import metrics as skm

from sipak_jax import calibration, ensemble, evaluate
from tfds_sipakmed.taxonomy import SIPAKMED

SIZE = 32


def _save(path, seed):
    from flax import nnx

    from sipak_jax import model_io, preprocessing
    from sipak_jax.models import ResNet

    model = ResNet(18, SIPAKMED.num_classes, width=8, rngs=nnx.Rngs(seed))
    meta = model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=SIPAKMED,
        preprocessing=preprocessing.spec_for("scratch", image_size=SIZE),
        temperature=1.3,
    )
    model_io.save_model_dir(path, model, meta)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tfds_sipakmed import synthetic

    root = tmp_path_factory.mktemp("evaluate")
    synthetic.write_synthetic(str(root / "sipakmed"), 5, seed=1)
    # A lab's cell folder with its own classes; LSIL and HSIL count as abnormal.
    rng = np.random.default_rng(0)
    for cls in ("HSIL", "LSIL", "NILM"):
        (root / "lab" / cls).mkdir(parents=True)
        for i in range(6):
            img = np.full((30 + i, 34, 3), rng.integers(0, 255, 3), np.uint8)
            cv2.circle(img, (17, 15), 6 + i, tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
            assert cv2.imwrite(str(root / "lab" / cls / f"slide{i % 3}_cell {i}.png"), img)
    (root / "lab_taxonomy.json").write_text(json.dumps({"abnormal": ["LSIL", "HSIL"]}))
    return {
        "root": root,
        "a": _save(root / "a", 0),
        "b": _save(root / "b", 1),
    }


def _run(args):
    return evaluate.main([str(a) for a in args])


def _check_against_sklearn(result):
    preds = result["predictions"]
    truth = np.array([p["abnormal"] for p in preds])
    p_ab = np.array([p["p_abnormal"] for p in preds])
    call = p_ab > 0.5
    t = result["two_class"]
    assert t["num_examples"] == len(preds) and t["num_abnormal"] == truth.sum()
    assert t["accuracy"] == pytest.approx(skm.accuracy_score(truth, call))
    assert t["sensitivity"] == pytest.approx(skm.recall_score(truth, call, pos_label=True))
    assert t["specificity"] == pytest.approx(skm.recall_score(truth, call, pos_label=False))
    assert t["roc_auc"] == pytest.approx(skm.roc_auc_score(truth, p_ab))
    assert t["confusion_matrix"] == skm.confusion_matrix(truth, call, labels=[0, 1]).tolist()
    p2 = np.stack([1 - p_ab, p_ab], 1)
    assert t["ece"] == pytest.approx(calibration.expected_calibration_error(p2, truth.astype(int)))
    assert t["brier"] == pytest.approx(2 * skm.brier_score_loss(truth, p_ab))


def test_two_class_metrics_equal_sklearn():
    rng = np.random.default_rng(3)
    truth = rng.random(200) < 0.4
    p = np.clip(truth * 0.3 + rng.random(200) * 0.7, 0, 1)
    t = evaluate.two_class_metrics(truth, p)
    call = p > 0.5
    assert t["sensitivity"] == pytest.approx(skm.recall_score(truth, call))
    assert t["specificity"] == pytest.approx(skm.recall_score(~truth, ~call))
    assert t["roc_auc"] == pytest.approx(skm.roc_auc_score(truth, p))
    assert t["accuracy"] == pytest.approx(skm.accuracy_score(truth, call))
    assert t["confusion_matrix"] == skm.confusion_matrix(truth, call).tolist()
    # ECE by hand: 15 equal-width bins over the top-label confidence max(p, 1 - p).
    conf = np.maximum(p, 1 - p)
    right = call == truth
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ece = sum(
        (bins == b).mean() * abs(right[bins == b].mean() - conf[bins == b].mean())
        for b in range(15)
        if (bins == b).any()
    )
    assert t["ece"] == pytest.approx(ece)


def test_ensemble_on_the_same_taxonomy(setup, capsys):
    from sipak_jax.input_pipeline import cache

    root = setup["root"]
    spec = f"{setup['a']},{setup['b']}"
    out, html = root / "same.json", root / "same.html"
    args = [f"--checkpoint={spec}", "--dataset=sipakmed", f"--manual_dir={root / 'sipakmed'}"]
    assert _run(args + ["--view=2class", f"--output={out}", f"--report={html}"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and "sensitivity" in printed[1], printed
    result = json.loads(out.read_text())
    assert result["model"]["ensemble"] and result["model"]["members"] == [setup["a"], setup["b"]]
    assert result["data"]["num_examples"] == 25
    _check_against_sklearn(result)
    # The predictions are the ensemble's on the evaluation's preprocessing of the same cells.
    data = cache.load_splits(
        None, "grouped", evaluate._splits("all"), SIZE, "pad", manual_dir=str(root / "sipakmed")
    )
    probs, u = ensemble.load_predictor(spec).predict_with_uncertainty(data.image)
    by_name = {p["file_name"]: p for p in result["predictions"]}
    for i, name in enumerate(data.file_name):
        np.testing.assert_allclose(by_name[name]["probabilities"], probs[i], atol=1e-9)
        assert by_name[name]["uncertainty"] == pytest.approx(u[i])
    full = result["full_class"]
    labels = np.array([p["label"] for p in result["predictions"]])
    pred = np.array([np.argmax(p["probabilities"]) for p in result["predictions"]])
    assert full["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert full["macro_f1"] == pytest.approx(
        skm.f1_score(labels, pred, average="macro", zero_division=0)
    )
    assert result["uncertainty"]["mean"] == pytest.approx(u.mean())
    page = html.read_text()
    assert "ensemble of 2 models" in page and setup["a"] in page and setup["b"] in page
    assert "data:image/png;base64," in page and "All classes" in page
    assert (root / "same.reliability.png").is_file()
    # Nothing is overwritten.
    before = out.read_text()
    assert _run(args + [f"--output={out}"]) == 2
    assert out.read_text() == before and "exist" in capsys.readouterr().err


def test_another_taxonomy_through_the_2class_view(setup, capsys):
    root = setup["root"]
    out = root / "lab.json"
    rc = _run(
        [
            f"--checkpoint={setup['a']}",
            "--dataset=cell_folder",
            f"--manual_dir={root / 'lab'}",
            f"--taxonomy={root / 'lab_taxonomy.json'}",
            "--view=2class",
            f"--output={out}",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    _check_against_sklearn(result)
    assert result["full_class"] is None and result["uncertainty"] is None
    assert any("classes differ" in n for n in result["notes"])
    names = result["data"]["taxonomy"]["class_names"]
    assert sorted(names) == ["HSIL", "LSIL", "NILM"]
    truth = {p["file_name"]: p["abnormal"] for p in result["predictions"]}
    assert all(v == (not k.startswith("NILM/")) for k, v in truth.items())
    per = result["per_class"]
    assert per["NILM"]["abnormal"] is False and per["LSIL"]["abnormal"] is True
    assert sum(c["n"] for c in per.values()) == 18
    for name, c in per.items():
        rows = [p for p in result["predictions"] if p["file_name"].startswith(name + "/")]
        assert c["flagged"] == sum(p["p_abnormal"] > 0.5 for p in rows)


def test_user_errors(setup, capsys):
    root = setup["root"]
    base = [f"--checkpoint={setup['a']}", "--dataset=cell_folder", f"--output={root / 'x.json'}"]
    # A folder without a taxonomy names no abnormal class: no 2-class view.
    assert _run(base + [f"--manual_dir={root / 'lab'}"]) == 2
    assert "names no abnormal class" in capsys.readouterr().err
    assert _run(base + [f"--manual_dir={root / 'lab'}", f"--data_dir={root}"]) == 2
    assert _run(base + [f"--manual_dir={root / 'nope'}"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (root / "x.json").exists()


def test_a_model_on_its_own_training_folds_is_noted(setup):
    import dataclasses

    from sipak_jax import model_io

    meta = dataclasses.replace(model_io.read_metadata(setup["a"]), fold=2)
    notes = evaluate._seen_notes([("m", meta)], "sipakmed", ("fold1", "fold2"))
    assert len(notes) == 1 and "fold1" in notes[0] and "test fold 2" in notes[0]
    assert evaluate._seen_notes([("m", meta)], "sipakmed", ("fold2",)) == []
    assert evaluate._seen_notes([("m", meta)], "herlev", ("fold1",)) == []


def test_two_class_temperature_is_the_nll_minimum():
    import scipy.optimize
    import scipy.special

    rng = np.random.default_rng(5)
    x = rng.normal(0, 2, 300)
    truth = rng.random(300) < scipy.special.expit(x)  # calibrated at logit x ...
    p = scipy.special.expit(3 * x)  # ... reported three times too sharp: T near 3
    t, how = evaluate.fit_two_class_temperature(truth, p)
    z = np.stack([np.log1p(-p), np.log(p)], 1)

    def nll(temp):
        return -scipy.special.log_softmax(z / temp, axis=1)[
            np.arange(300), truth.astype(int)
        ].mean()

    ref = scipy.optimize.minimize_scalar(nll, bounds=(0.05, 20), method="bounded").x
    assert t == pytest.approx(ref, rel=1e-3) and 2 < t < 4.5 and how.startswith("fitted")
    np.testing.assert_allclose(
        evaluate.scale_two_class(p, t), scipy.special.softmax(z / t, axis=1)[:, 1], rtol=1e-9
    )


def test_recalibration_on_held_out_folds(setup, capsys):
    root = setup["root"]
    out = root / "recal.json"
    args = [f"--checkpoint={setup['a']}", "--dataset=sipakmed", f"--manual_dir={root / 'sipakmed'}"]
    assert _run(args + ["--calibrate_split=fold0", f"--output={out}"]) == 2
    assert "share fold0" in capsys.readouterr().err and not out.exists()
    split = "--split=fold1,fold2,fold3,fold4"
    assert _run(args + ["--calibrate_split=fold0", split, f"--output={out}"]) == 0
    result = json.loads(out.read_text())
    recal = result["recalibration"]
    assert recal["splits"] == ["fold0"] and recal["num_examples"] > 0
    t = recal["temperature"]
    preds = result["predictions"]
    assert result["data"]["num_examples"] + recal["num_examples"] == 25
    p = np.array([r["p_abnormal"] for r in preds])
    p_cal = np.array([r["p_abnormal_recalibrated"] for r in preds])
    np.testing.assert_allclose(p_cal, evaluate.scale_two_class(p, t), rtol=1e-9)
    truth = np.array([r["abnormal"] for r in preds])
    p2 = np.stack([1 - p_cal, p_cal], 1)
    two = result["two_class"]
    assert two["ece"] == pytest.approx(calibration.expected_calibration_error(p2, truth))
    assert two["roc_auc"] == pytest.approx(skm.roc_auc_score(truth, p))
    before = result["two_class_before_recalibration"]
    assert before["ece"] == pytest.approx(
        calibration.expected_calibration_error(np.stack([1 - p, p], 1), truth)
    )
    assert before["confusion_matrix"] == two["confusion_matrix"]  # calls never change
