"""`python main.py` trains a tiny ViT (configs/vit_b16.py) and a tiny ResNet with the attention
head (configs/resnet50_attention.py) for one epoch end to end on a synthetic SIPaKMeD read
TF-free, with the test evaluation and the report's overlays (Grad-CAM on the ViT's token
grid), then the model DIR they leave explains itself with the new methods."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = (
    "--config.synthetic.cells_per_class=8",
    "--config.use_tfds=False",
    "--config.image_size=32",
    "--config.augment=('flip',)",
    "--config.init_from=",
    "--config.compute_dtype=float32",
    "--config.batch_size=16",
    "--config.num_epochs=1",
    "--config.head_epochs=0",
    "--config.warmup_epochs=0",
    "--config.num_overlay_cells=2",
    "--config.profile_steps=0",
    "--config.writer=jsonl",
    "--config.evaluators=('test','artifacts')",
)
VIT = (
    "--config.model.patch_size=8",
    "--config.model.embed_dim=16",
    "--config.model.depth=4",
    "--config.model.num_heads=2",
    "--config.model.mlp_dim=32",
)
RESNET = (
    "--config.model.depth=18",
    "--config.model.width=4",
    "--config.model.stage_sizes=(1,1,1,1)",
)


def _main(config, workdir, *flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "main.py", f"--config={config}", *TINY, *flags, f"--workdir={workdir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _check_run(proc, workdir, model_line):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = proc.stdout.splitlines()
    assert any(line.startswith("model: " + model_line) for line in out), out
    assert any(line.startswith("epoch 1/1  train loss ") for line in out), out
    results = json.loads((workdir / "results.json").read_text())
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    # Grad-CAM overlays of validation cells were drawn during training (the ViT's on tokens).
    overlays = workdir / "images" / "val_overlays_gradcam"
    assert any(overlays.glob("*.png")), sorted(p.name for p in workdir.iterdir())
    # The artifacts evaluator ran (a one-epoch model may make no abnormal call to show).
    index = json.loads((workdir / "artifacts" / "index.json").read_text())
    assert index["method"] == "gradcam"


@pytest.mark.slow
def test_tiny_vit_trains_one_epoch_and_explains_itself(tmp_path):
    from sipak_jax import model_io, saliency

    workdir = tmp_path / "vit"
    proc = _main("configs/vit_b16.py", workdir, *VIT, "--config.model.drop_path=0.1")
    _check_run(proc, workdir, "ViT (patch 8, dim 16, depth 4, heads 2) at 32 px")
    model, meta = model_io.load_model_dir(workdir)
    assert meta.model["name"] == "vit" and meta.model["image_size"] == 32
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    for method in ("rollout", "gradcam", "ig"):
        r = (
            saliency.explain(model, x, method, stage=3, steps=8)
            if method == "ig"
            else (saliency.explain(model, x, method, stage=3))
        )
        assert r.maps.shape == (2, 32, 32) and np.isfinite(r.maps).all()


@pytest.mark.slow
def test_tiny_resnet_with_the_attention_head_trains_one_epoch(tmp_path):
    from sipak_jax import model_io, saliency

    workdir = tmp_path / "r18att"
    proc = _main("configs/resnet50_attention.py", workdir, *RESNET)
    _check_run(proc, workdir, "ResNet-18 v1.5, width 4, stages (1, 1, 1, 1), attention head")
    model, meta = model_io.load_model_dir(workdir)
    assert meta.model["head"] == "attention"
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    r = saliency.explain(model, x, "attention_head")
    np.testing.assert_allclose(r.low_res.sum((1, 2)), 1.0, rtol=1e-5)
    assert r.maps.shape == (2, 32, 32)
