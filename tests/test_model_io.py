"""Model DIRs: the metadata type (validated on write and on read, format /1 read too),
converted DIRs and training workdirs through `load_model_dir` (the best step by
`checkpointing.pick_best_step`), and `pretrained.init_from` (backbone loaded strictly, the new
head kept)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from sipak_jax import model_io, preprocessing, pretrained
from tfds_sipakmed.taxonomy import SIPAKMED, Taxonomy

TINY = {"depth": 18, "variant": "v1.5", "num_classes": 7, "width": 8, "stage_sizes": [1, 1, 1, 1]}
SPEC = preprocessing.spec_for("scratch", image_size=32, resize="pad")
NAMES = [f"c{i}" for i in range(7)]


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


def _metadata(config=TINY, **changes):
    fields = {
        "kind": "converted",
        "model": dict(config),
        "preprocessing": dict(SPEC),
        "source": {"file": "random"},
    }
    if "taxonomy" not in changes:
        fields["taxonomy"] = Taxonomy.bare([f"c{i}" for i in range(config["num_classes"])], "t")
    return model_io.ModelMetadata(**{**fields, **changes})


def _converted_dir(tmp_path, config=TINY, seed=0, name="converted"):
    model = _model(config, seed)
    path = tmp_path / name
    model_io.save_model_dir(path, model, _metadata(config))
    return path, model


def test_converted_dir_round_trip_and_refusals(tmp_path):
    path, model = _converted_dir(tmp_path)
    loaded, meta = model_io.load_model_dir(path)
    assert isinstance(meta, model_io.ModelMetadata)
    assert meta == _metadata() and meta.class_names == tuple(NAMES)
    assert meta.step is None  # a converted DIR has no steps
    on_disk = json.loads((path / "metadata.json").read_text())
    assert on_disk["format"] == "sipak_jax.model/2" == model_io.FORMAT
    assert on_disk["taxonomy"]["class_names"] == NAMES and "step" not in on_disk
    _assert_same(_flat_np(model), _flat_np(loaded))
    sharding = jax.tree.leaves(model_io.weights_state(loaded))[0].sharding
    assert isinstance(sharding, jax.sharding.NamedSharding)
    assert loaded.bn1.use_running_average is True  # eval mode
    with pytest.raises(FileExistsError, match="not empty"):
        model_io.save_model_dir(path, model, _metadata())
    with pytest.raises(ValueError, match="kind 'training'"):
        model_io.save_model_dir(tmp_path / "other", model, _metadata(kind="training"))
    assert not (tmp_path / "other").exists()

    # A DIR whose checkpoint does not fit its metadata: every mismatch is listed.
    meta_file = path / "metadata.json"
    m = json.loads(meta_file.read_text())
    m["model"]["width"] = 16
    meta_file.write_text(json.dumps(m))
    with pytest.raises(model_io.WeightMismatchError, match=r"conv1/kernel: checkpoint .* has"):
        model_io.load_model_dir(path)
    meta_file.write_text("{}")
    with pytest.raises(model_io.MetadataError, match=r"metadata.json: field 'format'"):
        model_io.load_model_dir(path)
    meta_file.write_text("{not json")
    with pytest.raises(model_io.MetadataError, match="metadata.json is not valid JSON"):
        model_io.load_model_dir(path)
    with pytest.raises(FileNotFoundError, match="not a model DIR"):
        model_io.load_model_dir(tmp_path / "nowhere")


def _training_workdir(tmp_path, scores):
    """A training workdir written with orbax directly (the contract of docs/architecture.md):
    one step per score (None: an interval save without metrics)."""
    import orbax.checkpoint as ocp

    workdir = tmp_path / "workdir"
    workdir.mkdir()
    meta = _metadata(kind="training", best_metric="val_macro_f1", fold=0)
    model_io.write_metadata(workdir, meta)
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
    # Steps 2 and 4 tie at the best score: the earlier one is the best step.
    workdir, models = _training_workdir(tmp_path, [0.2, 0.9, 0.5, 0.9, None])
    model, meta = model_io.load_model_dir(workdir)
    assert meta.kind == "training" and meta.fold == 0
    assert meta.step == 2 and meta.step_reason == "best val_macro_f1=0.9"
    _assert_same(models[2], _flat_np(model))
    flat, init_meta = pretrained.load_weights(workdir)  # the init_from loader: the same step
    _assert_same(models[2], {k: np.asarray(v) for k, v in flat.items()})
    assert init_meta.kind == "training"
    model5, meta5 = model_io.load_model_dir(workdir, step=5)
    assert meta5.step == 5 and meta5.step_reason == "requested"
    _assert_same(models[5], _flat_np(model5))
    with pytest.raises(FileNotFoundError, match="Step 9"):
        model_io.load_model_dir(workdir, step=9)


def test_training_workdir_without_any_metric_loads_the_latest_step(tmp_path):
    workdir, models = _training_workdir(tmp_path, [None, None, None])
    model, meta = model_io.load_model_dir(workdir)
    assert meta.step == 3 and "no step saved the metric 'val_macro_f1'" in meta.step_reason
    _assert_same(models[3], _flat_np(model))


def test_init_from_loads_the_backbone_and_keeps_the_new_head(tmp_path):
    source_dir, source = _converted_dir(tmp_path)
    new_cfg = dict(TINY, num_classes=5)
    model = _model(new_cfg, seed=42)
    head_before = {k: v for k, v in _flat_np(model).items() if k.startswith("fc/")}
    summary = pretrained.init_from(model, source_dir)
    after, src = _flat_np(model), _flat_np(source)
    assert sorted(summary["kept"]) == ["fc/bias", "fc/kernel"]
    assert summary["loaded"] == len(after) - 2
    assert summary["metadata"].model == TINY
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
        pretrained.init_from(model, source_dir)


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


# --- The metadata type ------------------------------------------------------------------------


def test_metadata_round_trips_through_json():
    for meta in (
        _metadata(),
        _metadata(kind="training", temperature=1.7, best_metric="val_acc", fold=3, dataset={}),
        _metadata(config=dict(TINY, num_classes=5), taxonomy=SIPAKMED, source=None, temperature=2),
        _metadata(config=dict(TINY, num_classes=0), taxonomy=None),  # headless
    ):
        text = json.dumps(meta.validate().to_dict())
        back = model_io.ModelMetadata.from_dict(json.loads(text))
        assert back == meta and back.to_dict() == meta.to_dict()
    assert _metadata(config=dict(TINY, num_classes=0), taxonomy=None).class_names == ()


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"kind": "finetuned"}, "kind"),
        ({"model": dict(TINY, depth=20)}, "model.depth"),
        ({"model": dict(TINY, variant="v2")}, "model.variant"),
        ({"model": dict(TINY, width=0)}, "model.width"),
        ({"model": dict(TINY, stage_sizes=[1, 1])}, "model.stage_sizes"),
        ({"model": {"depth": 18}}, "model"),
        ({"taxonomy": Taxonomy.bare(["a", "b"])}, "taxonomy.class_names"),
        ({"taxonomy": None}, "taxonomy"),
        ({"preprocessing": dict(SPEC, std=[0, 1, 1])}, "preprocessing"),
        (
            {"preprocessing": {k: v for k, v in SPEC.items() if k != "image_size"}},
            "preprocessing.image_size",
        ),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"fold": -1}, "fold"),
        ({"best_metric": ""}, "best_metric"),
        ({"source": "a file"}, "source"),
    ],
)
def test_invalid_metadata_is_refused_on_write_naming_the_file_and_field(tmp_path, changes, field):
    with pytest.raises(model_io.MetadataError) as err:
        model_io.write_metadata(tmp_path, _metadata(**changes))
    assert str(tmp_path / "metadata.json") in str(err.value)
    assert f"field {field!r}" in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written, no temporary file left


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(temperature=-1), "field 'temperature'"),
        (lambda d: d.update(format="sipak_jax.model/9"), "field 'format'"),
        (lambda d: d.update(extra=1), r"unknown fields \['extra'\]"),
        (lambda d: d.pop("preprocessing"), r"missing fields \['preprocessing'\]"),
        (lambda d: d["taxonomy"].update(abnormal=["zz"]), "field 'taxonomy'.*abnormal"),
        (lambda d: d["model"].update(num_classes=5), "field 'taxonomy.class_names'"),
    ],
)
def test_invalid_metadata_is_refused_on_read_naming_the_file_and_field(tmp_path, edit, match):
    model_io.write_metadata(tmp_path, _metadata())
    file = tmp_path / "metadata.json"
    d = json.loads(file.read_text())
    edit(d)
    file.write_text(json.dumps(d))
    with pytest.raises(model_io.MetadataError, match=match) as err:
        model_io.read_metadata(tmp_path)
    assert str(err.value).startswith(f"{file}: ")


def _v1(**changes):
    d = {
        "format": "sipak_jax.model/1",
        "kind": "training",
        "model": dict(TINY, num_classes=5),
        "class_names": list(SIPAKMED.class_names),
        "preprocessing": dict(SPEC),
        "source": None,
        "temperature": 1.3,
        "best_metric": "val_macro_f1",
        "fold": 2,
        "dataset": {"name": "sipakmed"},
    }
    d.update(changes)
    return {k: v for k, v in d.items() if v is not ...}


def test_format_1_is_read_its_class_names_becoming_a_taxonomy(tmp_path):
    meta = model_io.ModelMetadata.from_dict(_v1())
    assert meta.taxonomy == SIPAKMED and meta.temperature == 1.3 and meta.fold == 2
    other = model_io.ModelMetadata.from_dict(_v1(class_names=list("abcde")))
    assert other.taxonomy == Taxonomy.bare(list("abcde"))
    assert other.taxonomy.abnormal == () and other.taxonomy.readings == {}
    headless = model_io.ModelMetadata.from_dict(
        _v1(kind="converted", model=dict(TINY, num_classes=0), class_names=...)
    )
    assert headless.taxonomy is None
    with pytest.raises(model_io.MetadataError, match="field 'class_names': missing"):
        model_io.ModelMetadata.from_dict(_v1(class_names=...))
    with pytest.raises(model_io.MetadataError, match="field 'taxonomy.class_names'"):
        model_io.ModelMetadata.from_dict(_v1(class_names=["a", "b"]))
    # Written back, a /1 file becomes /2.
    model_io.write_metadata(tmp_path, meta)
    assert json.loads((tmp_path / "metadata.json").read_text())["format"] == model_io.FORMAT
    assert model_io.read_metadata(tmp_path) == meta


def test_write_metadata_takes_only_the_type(tmp_path):
    with pytest.raises(TypeError, match="ModelMetadata"):
        model_io.write_metadata(tmp_path, _metadata().to_dict())
    assert dataclasses.replace(_metadata(), step=4) == _metadata()  # step: not part of the file
