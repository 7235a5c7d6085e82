"""`sipak_jax.ensemble`: several tiny ResNet model DIRs (width 8, 32 px) as one predictor."""

import csv
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import scipy.stats

from sipak_jax import ensemble, predict
from tfds_sipakmed.taxonomy import SIPAKMED, Taxonomy

SIZE = 32


def _save(path, seed, temperature=1.0, taxonomy=SIPAKMED, size=SIZE):
    from flax import nnx

    from sipak_jax import model_io, preprocessing
    from sipak_jax.models import ResNet

    model = ResNet(18, taxonomy.num_classes, width=8, rngs=nnx.Rngs(seed))
    meta = model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=taxonomy,
        preprocessing=preprocessing.spec_for("scratch", image_size=size),
        temperature=temperature,
    )
    model_io.save_model_dir(path, model, meta)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    out = {
        "a": _save(root / "a", 0, 1.0),
        "b": _save(root / "b", 1, 1.7),
        "c": _save(root / "c", 2, 0.8),
    }
    out["a_copy"] = str(root / "a_copy")
    shutil.copytree(out["a"], out["a_copy"])
    cv_dir = root / "cv"  # the layout of a fold=all workdir: fold<k>/ model DIRs
    for k, name in enumerate(("a", "b", "c")):
        shutil.copytree(out[name], cv_dir / f"fold{k}")
    (cv_dir / "cv_results.json").write_text("{}")
    out["cv"] = str(cv_dir)
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def members(dirs):
    return {k: ensemble.load_predictor(dirs[k], batch_size=4) for k in ("a", "b", "c")}


def test_resolve_members(dirs, tmp_path):
    a, b, c = dirs["a"], dirs["b"], dirs["c"]
    assert ensemble.resolve_members(a) == [a]
    assert ensemble.resolve_members(f"{a},{b}, {c}") == [a, b, c]
    cv = dirs["cv"]
    assert ensemble.resolve_members(cv) == [os.path.join(cv, f"fold{k}") for k in range(3)]
    with pytest.raises(FileNotFoundError, match="nope"):
        ensemble.resolve_members(f"{a},{tmp_path / 'nope'}")
    with pytest.raises(ensemble.EnsembleError, match="twice"):
        ensemble.resolve_members(f"{a},{a}/")
    with pytest.raises(ensemble.EnsembleError, match="empty entry"):
        ensemble.resolve_members(f"{a},,{b}")
    with pytest.raises(ensemble.EnsembleError, match="neither a model DIR"):
        ensemble.resolve_members(str(tmp_path))
    # A fold=all workdir whose fold1 is still training (checkpoints, no results.json).
    half = tmp_path / "half"
    shutil.copytree(cv, half)
    (half / "fold1" / "checkpoints").mkdir()
    with pytest.raises(ensemble.EnsembleError, match=r"unfinished folds \(fold1\)"):
        ensemble.resolve_members(str(half))


def test_one_member_is_a_plain_predictor(members, dirs, images):
    p = members["a"]
    assert isinstance(p, predict.Predictor) and p.members == [dirs["a"]]
    probs, u = p.predict_with_uncertainty(images)
    assert u is None
    np.testing.assert_array_equal(probs, p.probabilities(images))


def test_probabilities_are_the_mean_of_the_members(members, dirs, images):
    ens = ensemble.load_predictor(f"{dirs['a']},{dirs['b']},{dirs['c']}", batch_size=4)
    assert isinstance(ens, ensemble.EnsemblePredictor)
    assert ens.members == [dirs["a"], dirs["b"], dirs["c"]]
    assert ens.member_temperatures == [1.0, 1.7, 0.8]
    assert ens.class_names == SIPAKMED.class_names and ens.image_size == SIZE
    each = [members[k].probabilities(images) for k in ("a", "b", "c")]
    np.testing.assert_allclose(ens.member_probabilities(images), np.stack(each), atol=1e-12)
    probs, u = ens.predict_with_uncertainty(images)
    np.testing.assert_allclose(probs, np.mean(each, axis=0), atol=1e-12)
    np.testing.assert_allclose(ens.probabilities(images), probs, atol=1e-12)
    # The uncertainty is the members' mean KL divergence from their mean (scipy's entropy),
    # which is the mutual information H(mean) - mean H.
    kl = np.mean([scipy.stats.entropy(p.T, probs.T) for p in each], axis=0)
    np.testing.assert_allclose(u, kl, rtol=1e-9, atol=1e-12)
    h = scipy.stats.entropy(probs.T) - np.mean([scipy.stats.entropy(p.T) for p in each], axis=0)
    np.testing.assert_allclose(u, h, rtol=1e-9, atol=1e-12)
    assert (u > 1e-6).all() and (u <= np.log(3)).all()


def test_identical_members_have_zero_uncertainty(members, dirs, images):
    ens = ensemble.load_predictor(f"{dirs['a']},{dirs['a_copy']}", batch_size=4)
    probs, u = ens.predict_with_uncertainty(images)
    np.testing.assert_allclose(probs, members["a"].probabilities(images), atol=1e-12)
    np.testing.assert_allclose(u, 0.0, atol=1e-12)


def test_a_fold_all_workdir_is_an_ensemble(members, dirs, images):
    ens = ensemble.load_predictor(dirs["cv"], batch_size=4)
    assert [os.path.basename(m) for m in ens.members] == ["fold0", "fold1", "fold2"]
    each = [members[k].probabilities(images) for k in ("a", "b", "c")]
    np.testing.assert_allclose(ens.probabilities(images), np.mean(each, axis=0), atol=1e-12)


def test_calibrate_fits_a_temperature_on_the_mean(members, dirs, images):
    from sipak_jax import calibration

    ens = ensemble.EnsemblePredictor([members["a"], members["b"]], [dirs["a"], dirs["b"]])
    mean = ens.probabilities(images)
    labels = np.array([0, 1, 2, 3, 4])
    t = ens.calibrate(images, labels)
    assert t == pytest.approx(calibration.fit_temperature(np.log(mean), labels))
    assert ens.temperature == t
    np.testing.assert_allclose(ens.probabilities(images), calibration.softmax(np.log(mean), t))
    np.testing.assert_array_equal(ens.probabilities(images).argmax(1), mean.argmax(1))


def test_members_must_share_taxonomy_and_input(dirs, tmp_path):
    other = Taxonomy.bare([f"c{i}" for i in range(5)], "other")
    odd = _save(tmp_path / "odd_taxonomy", 3, taxonomy=other)
    with pytest.raises(ensemble.EnsembleError, match=f"member {odd} has another taxonomy"):
        ensemble.load_predictor(f"{dirs['a']},{odd}")
    big = _save(tmp_path / "big", 3, size=48)
    with pytest.raises(ensemble.EnsembleError, match=f"member {big} takes 48 px"):
        ensemble.load_predictor(f"{dirs['a']},{big}")
    # On the command line: one error line naming the member, exit 2, no output.
    out = tmp_path / "out.jsonl"
    rc = predict.main([f"--checkpoint={dirs['a']},{odd}", f"--output={out}", str(tmp_path)])
    assert rc == 2 and not out.exists()


def _cell(seed):
    rng = np.random.default_rng(seed)
    img = np.full((40, 36, 3), rng.integers(0, 255, 3), np.uint8)
    cv2.circle(img, (18, 20), 9, tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
    return img


def test_predict_cli_writes_the_uncertainty_column(members, dirs, tmp_path):
    d = tmp_path / "cells"
    d.mkdir()
    for i in range(3):
        assert cv2.imwrite(str(d / f"cell{i}.png"), _cell(i)[..., ::-1])
    spec = f"{dirs['a']},{dirs['b']},{dirs['c']}"
    rc = predict.main([f"--checkpoint={spec}", f"--output={tmp_path / 'e.jsonl'}", str(d)])
    assert rc == 0
    rows = [json.loads(line) for line in open(tmp_path / "e.jsonl")]
    assert len(rows) == 3
    predict.write_rows(rows, str(tmp_path / "e.csv"), SIPAKMED.class_names)  # the CSV writer
    with open(tmp_path / "e.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert "uncertainty" in csv_rows[0]
    from sipak_jax.imageio import read_for_model

    x = np.stack([read_for_model(r["path"], members["a"].spec)[0] for r in rows])
    each = np.stack([members[k].probabilities(x) for k in ("a", "b", "c")])
    ref_u = ensemble.mutual_information(each)
    for i, (r, c) in enumerate(zip(rows, csv_rows, strict=True)):
        np.testing.assert_allclose(r["probabilities"], each[:, i].mean(0), atol=1e-9)
        assert r["uncertainty"] == pytest.approx(ref_u[i]) and r["uncertainty"] > 0
        assert float(c["uncertainty"]) == pytest.approx(r["uncertainty"])
        assert r["members"] == [dirs["a"], dirs["b"], dirs["c"]]
    # The report names the ensemble, lists its members and shows the uncertainty column.
    from sipak_jax import report

    page = report._section_predictions(report.read_predictions(tmp_path / "e.jsonl"), "e.jsonl")
    assert "ensemble of 3 models" in page and '<th class="l">uncertainty</th>' in page
    assert all(f"<code>{m}</code>" in page for m in (dirs["a"], dirs["b"], dirs["c"]))
    assert f"{rows[0]['uncertainty']:.4f}" in page
    page = report._section_predictions(report.read_predictions(tmp_path / "e.csv"), "e.csv")
    assert "ensemble of several models" in page and "the .jsonl does" in page
    # One model: the column is there and empty.
    rc = predict.main([f"--checkpoint={dirs['a']}", f"--output={tmp_path / 's.csv'}", str(d)])
    assert rc == 0
    with open(tmp_path / "s.csv", newline="") as f:
        assert [r["uncertainty"] for r in csv.DictReader(f)] == ["", "", ""]
    row = predict.make_row("x.png", rows[0]["probabilities"], members["a"])
    assert row["uncertainty"] is None and row["members"] is None and row["error"] is None


def test_explain_is_the_mean_of_the_members_maps(members, dirs, images):
    ens = ensemble.EnsemblePredictor([members["a"], members["b"]], [dirs["a"], dirs["b"]])
    targets = ens.probabilities(images).argmax(1)
    maps = ens.explain(images, "gradcam", targets)
    ref = np.mean([members[k].explain(images, "gradcam", targets) for k in ("a", "b")], axis=0)
    np.testing.assert_allclose(maps, ref, atol=1e-6)
    assert maps.shape == (len(images), SIZE, SIZE) and 0 <= maps.min() and maps.max() <= 1


def test_explain_cli_averages_the_members_maps(members, dirs, tmp_path):
    from sipak_jax import explain, preprocessing, saliency

    img = tmp_path / "cell.png"
    assert cv2.imwrite(str(img), _cell(7)[..., ::-1])
    out = tmp_path / "maps"
    stage = saliency.overlay_stage(saliency.ModelFunctions(members["a"].model), SIZE)
    (rec,) = explain.run(
        f"{dirs['a']},{dirs['b']}", [str(img)], str(out), ["gradcam"], save_raw=True,
        stage=stage, log=id,
    )  # fmt: skip
    saved = np.load(out / "cell.gradcam.npy")
    x = preprocessing.resize_crop(_cell(7), SIZE, "pad")[None]
    # The reference: each member's own map (`Predictor.explain`, at the overlay stage) of the
    # class the mean of their temperature-scaled probabilities picks.
    target = (members["a"].probabilities(x) + members["b"].probabilities(x)).argmax(1)
    assert rec["target"] == SIPAKMED.class_names[int(target[0])]
    ref = np.mean([members[k].explain(x, "gradcam", target)[0] for k in ("a", "b")], axis=0)
    np.testing.assert_allclose(saved, ref, atol=1e-6)
    assert (out / "cell.gradcam.png").is_file()
