"""Model DIRs: converted DIRs and training workdirs load through `load_model_dir`; `init_from`
loads a backbone strictly and keeps the new head."""

import json

import jax
import numpy as np
import pytest

from sipak_jax import model_io

TINY = {"depth": 18, "variant": "v1.5", "num_classes": 7, "width": 8, "stage_sizes": [1, 1, 1, 1]}


def _random_weights(config, seed):
    """Random float32 weights for every tensor of `config`'s model, built without compiling
    anything (tests on a shared CPU stay fast)."""
    rng = np.random.default_rng(seed)
    abstract = model_io.abstract_model(config)
    flat = model_io.flatten(model_io.weights_state(abstract))
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat.items()}


def _model(config, seed):
    return model_io.model_with_weights(config, _random_weights(config, seed))


def _flat_np(model):
    return {k: np.asarray(v) for k, v in model_io.flatten(model_io.weights_state(model)).items()}


def _assert_same(a, b, keys=None):
    for k in keys or a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _converted_dir(tmp_path, config=TINY, seed=0, name="converted"):
    model = _model(config, seed)
    path = tmp_path / name
    meta = {
        "kind": "converted",
        "preprocessing": {"channel_order": "RGB", "mean": [0] * 3, "std": [1] * 3},
    }
    model_io.save_model_dir(path, model, meta)
    return path, model


def test_converted_dir_round_trip_and_refusals(tmp_path):
    path, model = _converted_dir(tmp_path)
    loaded, meta = model_io.load_model_dir(path)
    assert meta["model"] == TINY and meta["kind"] == "converted"
    _assert_same(_flat_np(model), _flat_np(loaded))
    sharding = jax.tree.leaves(model_io.weights_state(loaded))[0].sharding
    assert isinstance(sharding, jax.sharding.NamedSharding)
    assert loaded.bn1.use_running_average is not False  # eval mode
    with pytest.raises(FileExistsError, match="not empty"):
        model_io.save_model_dir(path, model, {"kind": "converted"})

    # A DIR whose checkpoint does not fit its metadata: every mismatch is listed.
    meta_file = path / "metadata.json"
    m = json.loads(meta_file.read_text())
    m["model"]["width"] = 16
    meta_file.write_text(json.dumps(m))
    with pytest.raises(model_io.WeightMismatchError, match=r"conv1/kernel: checkpoint .* has"):
        model_io.load_model_dir(path)
    meta_file.write_text("{}")
    with pytest.raises(ValueError, match="metadata.json: 'format'"):
        model_io.load_model_dir(path)
    with pytest.raises(FileNotFoundError, match="not a model DIR"):
        model_io.load_model_dir(tmp_path / "nowhere")


def _training_workdir(tmp_path, scores):
    """A training workdir written with orbax directly (the contract of docs/architecture.md):
    one step per score (None: an interval save without metrics)."""
    import orbax.checkpoint as ocp

    workdir = tmp_path / "workdir"
    workdir.mkdir()
    meta = {
        "format": model_io.FORMAT,
        "kind": "training",
        "model": TINY,
        "class_names": [f"c{i}" for i in range(7)],
        "preprocessing": {"channel_order": "RGB", "mean": [0] * 3, "std": [1] * 3},
        "best_metric": "val_macro_f1",
    }
    (workdir / "metadata.json").write_text(json.dumps(meta))
    models = {}
    # orbax stores a step's metrics only when the manager tracks a best_fn.
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m.get("val_macro_f1", float("-inf")), best_mode="max"
    )
    mngr = ocp.CheckpointManager(
        str(workdir / "checkpoints"), item_names=("model", "opt_state", "meta"), options=options
    )
    for step, score in enumerate(scores, start=1):
        model = _model(TINY, seed=step)
        models[step] = _flat_np(model)
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model_io.weights_state(model)),
            opt_state=ocp.args.StandardSave({"count": np.int32(step)}),
            meta=ocp.args.JsonSave({"step": step}),
        )
        metrics = None if score is None else {"val_macro_f1": score}
        mngr.save(step, args=args, metrics=metrics)
    mngr.wait_until_finished()
    mngr.close()
    return workdir, models


def test_training_workdir_loads_the_best_step(tmp_path):
    workdir, models = _training_workdir(tmp_path, [0.2, 0.9, 0.5, None])
    model, meta = model_io.load_model_dir(workdir)
    assert meta["step"] == 2 and "val_macro_f1" in meta["step_reason"]
    _assert_same(models[2], _flat_np(model))
    model4, meta4 = model_io.load_model_dir(workdir, step=4)
    assert meta4["step"] == 4
    _assert_same(models[4], _flat_np(model4))
    with pytest.raises(FileNotFoundError, match="Step 9"):
        model_io.load_model_dir(workdir, step=9)


def test_init_from_loads_the_backbone_and_keeps_the_new_head(tmp_path):
    source_dir, source = _converted_dir(tmp_path)
    new_cfg = dict(TINY, num_classes=5)
    model = _model(new_cfg, seed=42)
    head_before = {k: v for k, v in _flat_np(model).items() if k.startswith("fc/")}
    summary = model_io.init_from(model, source_dir)
    after, src = _flat_np(model), _flat_np(source)
    assert sorted(summary["kept"]) == ["fc/bias", "fc/kernel"]
    assert summary["loaded"] == len(after) - 2
    assert summary["metadata"]["model"] == TINY
    _assert_same(src, after, [k for k in after if not k.startswith("fc/")])
    _assert_same(head_before, after, list(head_before))
    # BatchNorm statistics came along too.
    assert np.array_equal(after["layer2/0/bn1/var"], src["layer2/0/bn1/var"])


@pytest.mark.parametrize(
    "change, match",
    [
        ({"variant": "v1"}, "variant"),
        ({"width": 16}, "width"),
        ({"depth": 50}, "depth"),
    ],
)
def test_init_from_refuses_another_architecture(tmp_path, change, match):
    source_dir, _ = _converted_dir(tmp_path)
    model = _model(dict(TINY, num_classes=5, **change), seed=1)
    with pytest.raises(model_io.WeightMismatchError, match=match):
        model_io.init_from(model, source_dir)


def test_merge_weights_lists_every_mismatch():
    model = _model(TINY, 0)
    flat = _random_weights(TINY, 1)
    del flat["layer1/0/bn1/mean"]
    flat["layer9/0/conv1/kernel"] = np.zeros((1,), np.float32)
    flat["fc/kernel"] = np.zeros((3, 3), np.float32)
    flat["dropout/rngs/count"] = np.zeros((), np.uint32)  # saved RNG state: ignored
    with pytest.raises(model_io.WeightMismatchError) as err:
        model_io.merge_weights(model, flat)
    msg = str(err.value)
    assert "layer1/0/bn1/mean (8,)" in msg
    assert "layer9/0/conv1/kernel" in msg
    assert "fc/kernel: checkpoint has (3, 3), model expects (64, 7)" in msg
    assert "dropout" not in msg
