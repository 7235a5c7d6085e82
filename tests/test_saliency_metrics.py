"""Saliency metrics on a tiny model trained a minute on synthetic cells: real methods must beat
a random map on localisation, deletion/insertion and ROAD, and must fail the randomised
model (Adebayo et al.'s sanity check)."""

import jax
import numpy as np
import pytest
from saliency_fixtures import draw_cells, train_tiny

from sipak_jax import preprocessing, saliency
from sipak_jax.saliency import metrics

SIZE = 48


@pytest.fixture(scope="module")
def trained():
    spec = preprocessing.spec_for("scratch", image_size=SIZE, resize="stretch")
    imgs, labels, _, _ = draw_cells(256, SIZE, seed=0)
    model = train_tiny(imgs, labels, spec, steps=150)
    test_imgs, test_labels, nucs, cells = draw_cells(16, SIZE, seed=1)
    x = np.asarray(preprocessing.normalize(test_imgs, spec))
    fns = saliency.ModelFunctions(model)
    acc = float(np.mean(np.asarray(fns.predict(x)) == test_labels))
    masks = [
        metrics.cell_masks(n, c, (SIZE, SIZE), SIZE, "stretch")
        for n, c in zip(nucs, cells, strict=True)
    ]
    return fns, x, test_labels, masks, acc


def _random_maps(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def test_cell_masks_partition_the_frame():
    _, _, nucs, cells = draw_cells(2, SIZE, seed=3)
    m = metrics.cell_masks(nucs[0], cells[0], (SIZE, SIZE), SIZE, "stretch")
    total = sum(m[r].astype(int) for r in metrics.REGIONS)
    np.testing.assert_array_equal(total, 1)
    assert m["nucleus"].sum() > 10 and m["ring"].sum() > 0 and m["cytoplasm"].sum() > 0


@pytest.mark.slow
def test_real_methods_beat_a_random_map(trained):
    fns, x, labels, masks, acc = trained
    assert acc >= 0.9, f"the tiny model did not learn the synthetic task (accuracy {acc})"
    target = labels
    ig = saliency.explain(fns, x, "ig", target=target, steps=32, baseline="background")
    rand = _random_maps(ig.maps.shape)

    def nucleus_share(maps):
        loc = [metrics.localisation(maps[i], masks[i]) for i in range(len(maps))]
        return (
            np.mean([r["nucleus"]["share"] for r in loc]),
            np.mean([r["nucleus"]["chance"] for r in loc]),
            np.mean([r["nucleus"]["pointing"] for r in loc]),
        )

    share, chance, pointing = nucleus_share(ig.maps)
    r_share, _, _ = nucleus_share(rand)
    assert share > 3 * chance and share > 2 * r_share, (share, chance, r_share)
    assert abs(r_share - chance) < 0.05
    assert pointing > chance

    di = metrics.deletion_insertion(fns, x, ig.maps, target, steps=16)
    dr = metrics.deletion_insertion(fns, x, rand, target, steps=16)
    assert di["deletion"].mean() < dr["deletion"].mean()
    assert di["insertion"].mean() > dr["insertion"].mean()

    ro = metrics.road(fns, x[:6], ig.maps[:6], target[:6], fractions=(0.1, 0.3, 0.5))
    rr = metrics.road(fns, x[:6], rand[:6], target[:6], fractions=(0.1, 0.3, 0.5))
    assert ro["morf"].mean() < rr["morf"].mean()

    # Grad-CAM at an inner stage also localises better than chance.
    gc = saliency.explain(fns, x, "gradcam", target=target, stage=2)
    g_share, g_chance, _ = nucleus_share(gc.maps)
    assert g_share > g_chance


@pytest.mark.slow
def test_randomisation_sanity_decorrelates_ig(trained):
    fns, x, labels, _, _ = trained
    state_before = [np.asarray(a).copy() for a in jax.tree.leaves(fns.state)]
    rho = metrics.randomization_sanity(
        fns, x[:4], "ig", target=labels[:4], absolute=False, steps=16
    )
    assert list(rho) == [name for name, _ in metrics.RESNET_CASCADE]
    assert rho["stage4"].mean() < 0.5, rho
    assert rho["stem"].mean() < 0.3, rho
    # The check works on copies: the model explained afterwards is the trained one.
    for a, b in zip(state_before, jax.tree.leaves(fns.state), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.slow
def test_ig_completeness_reported_and_adaptive():
    from saliency_fixtures import images, tiny_model

    fns = saliency.ModelFunctions(tiny_model())
    x = images(2, 32, seed=9)
    res = saliency.explain(
        fns, x, "ig", adaptive=True, target_gap=0.05, start_steps=16, max_steps=256
    )
    assert res.info["converged"]
    assert np.all(res.info["gap"] <= 0.05)
    # The gap is what it says: sum of attributions against f(x) - f(baseline).
    total = res.attributions.reshape(2, -1).sum(1)
    np.testing.assert_allclose(total, res.info["sum"], rtol=1e-4)
    gaps = metrics.ig_completeness(fns, x, res.target, steps=res.info["steps"])
    np.testing.assert_allclose(gaps, res.info["gap"], rtol=1e-4, atol=1e-6)


def test_auc_and_imputation_reference_values():
    # Trapezoid AUC of a straight line from 1 to 0 is 1/2.
    np.testing.assert_allclose(metrics.auc(np.linspace(1, 0, 11)), 0.5)
    # Linear imputation reproduces a linear ramp exactly (noise off).
    ramp = np.tile(np.linspace(0, 1, 12)[None, :, None], (12, 1, 3))
    hole = np.zeros((12, 12), bool)
    hole[4:8, 3:9] = True
    filled = metrics.noisy_linear_impute(ramp, hole, noise=0.0)
    np.testing.assert_allclose(filled, ramp, atol=1e-6)


@pytest.mark.slow
def test_evaluate_reports_every_metric_beside_a_random_map(trained):
    from sipak_jax import saliency_eval

    fns, _, _, _, _ = trained
    imgs, labels, nucs, cells = draw_cells(6, SIZE, seed=5)
    spec = preprocessing.spec_for("scratch", image_size=SIZE, resize="stretch")
    valid = np.array([True] * 5 + [False])
    res = saliency_eval.evaluate(
        fns.model(),
        spec,
        imgs,
        labels,
        [(SIZE, SIZE)] * 6,
        nucs,
        cells,
        valid,
        ["small", "large"],
        ["gradient"],
        sanity_examples=2,
        road_examples=2,
        log=lambda s: None,
    )
    assert res["invalid_annotations_skipped"] == 1
    assert set(res["methods"]) == {"gradient", "random"}
    g = res["methods"]["gradient"]
    for key in (
        "deletion_auc",
        "insertion_auc",
        "road_morf",
        "road_lerf",
        "randomization_spearman",
    ):
        assert key in g, key
    loc = g["localisation"]
    assert loc["all"]["n"] == 5 and set(loc) >= {"all", "small", "large"}
    for region in metrics.REGIONS:
        assert 0 <= loc["all"][region]["chance"] <= 1


@pytest.mark.slow
def test_saliency_eval_command_on_the_synthetic_manual_dir(tmp_path):
    import os
    import subprocess
    import sys

    from saliency_fixtures import tiny_model

    from sipak_jax import model_io
    from tfds_sipakmed import synthetic

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    manual = tmp_path / "manual"
    synthetic.write_synthetic(str(manual), cells_per_class=6, seed=0)
    from tfds_sipakmed.taxonomy import Taxonomy

    spec = preprocessing.spec_for("scratch", image_size=64, resize="pad")
    model = tiny_model()
    meta = model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=Taxonomy.bare([f"c{i}" for i in range(5)]),
        preprocessing=spec,
    )
    model_io.save_model_dir(tmp_path / "m", model, meta)
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "sipak_jax.saliency_eval",
        f"--checkpoint={tmp_path / 'm'}",
        f"--manual_dir={manual}",
        "--split=fold0",
        "--methods=gradcam",
        f"--output={out}",
        "--max_examples=4",
        "--sanity_examples=1",
        "--road_examples=1",
    ]
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=repo),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = json.loads(out.read_text())
    assert res["examples"] == 4 and "gradcam" in res["methods"]
    r2 = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=repo),
    )
    assert r2.returncode == 2 and "not overwriting" in r2.stderr
