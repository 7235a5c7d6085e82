"""`python -m sipak_jax.export --format=onnx`: ONNX Runtime's probabilities equal the JAX model's.

Tiny models of every family (ResNet v1.5 and v1 with non-trivial BatchNorm statistics, ConvNeXt,
ViT), saved as model DIRs at a temperature != 1, exported, then run in ONNX Runtime (the
reference runtime) on synthetic SIPaKMeD crops preprocessed as `predict` does, beside
`predict.Predictor.probabilities` on the same model DIR.
"""

import collections
import json
import os
import subprocess
import sys

import export_fixtures as fx
import numpy as np
import pytest

from sipak_jax import export
from tfds_sipakmed.taxonomy import SIPAKMED, Taxonomy


@pytest.fixture(scope="module")
def crops_dir(tmp_path_factory):
    return fx.synthetic_crops(tmp_path_factory.mktemp("synthetic"))


# ResNet (the recipe's family) in the quick loop; ConvNeXt and ViT, whose exports take longer
# on a loaded 2-core machine, with the slow tests.
_SLOW = ("convnext", "vit")


@pytest.fixture(
    scope="module",
    params=[pytest.param(c, marks=[pytest.mark.slow] if c in _SLOW else []) for c in fx.CASES],
)
def exported(request, tmp_path_factory, crops_dir):
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    checkpoint = fx.model_dir(root / "model", request.param, crops_dir)
    output = str(root / "out" / "cells.onnx")
    done = export.export(checkpoint, output)
    return request.param, checkpoint, done


def test_onnx_runtime_equals_the_jax_model(exported, crops_dir):
    import onnxruntime as ort

    from sipak_jax import model_io, predict

    case, checkpoint, done = exported
    model, meta = model_io.load_model_dir(checkpoint)
    predictor = predict.Predictor(model, meta, batch_size=4)
    images = fx.images(crops_dir, meta.preprocessing)
    session = ort.InferenceSession(done["output"], providers=["CPUExecutionProvider"])
    for batch in (images[:1], images[:7], images):  # batch sizes 1, 7, all (>= 10)
        got = session.run(["probabilities"], {"images": batch})[0]
        want = predictor.probabilities(batch)
        assert got.shape == want.shape == (len(batch), 5)
        np.testing.assert_allclose(got, want, rtol=0, atol=fx.TOLERANCE, err_msg=case)
    # Not a trivial agreement: the probabilities vary between cells, and so do the calls.
    probs = predictor.probabilities(images)
    assert np.ptp(probs, axis=0).max() > 0.3, probs
    assert len(set(probs.argmax(1))) >= 2, probs
    assert done["max_difference"] <= fx.TOLERANCE


def test_the_graph_is_ordinary_onnx(exported):
    import onnx
    from flax import nnx

    from sipak_jax import model_io

    case, checkpoint, done = exported
    proto = onnx.load(done["output"])
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.op_type for node in proto.graph.node}
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}, case
    model, _ = model_io.load_model_dir(checkpoint)
    convs = sum(isinstance(m, nnx.Conv) for _, m in nnx.iter_modules(model))
    if case == "vit":
        convs = 0  # its patch embedding's convolution is computed as a reshape and a matmul
    # Every convolution is one Conv node, not the matrix products XLA:CPU is given.
    assert sum(node.op_type == "Conv" for node in proto.graph.node) == convs, (case, ops)
    if case.startswith("resnet"):
        assert "MaxPool" in ops
        # BatchNorm as Add/Mul of precomputed constants and ReLU as Relu: the forms ONNX
        # Runtime folds into the convolutions (with Sub, Sqrt and Max left in, ResNet-50 ran
        # 2.5x slower than torchvision's own ONNX export).
        counts = collections.Counter(node.op_type for node in proto.graph.node)
        # (One Max and one Sub are the softmax's; BGR's channel reversal indexes with two Subs.)
        assert counts["Sqrt"] == 0 and counts["Max"] <= 1 and counts["Sub"] <= 3, counts
        assert counts["Relu"] > 0, counts
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    size = fx.CASES[case][2]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", size, size, 3]
    assert out.name == "probabilities" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 5]


def test_the_metadata_round_trips(exported):
    from sipak_jax import model_io

    case, checkpoint, done = exported
    meta = model_io.read_metadata(checkpoint)
    stored = export.read_onnx_metadata(done["output"])
    with open(done["sidecar"], encoding="utf-8") as f:
        sidecar = json.load(f)
    assert stored == sidecar == done["metadata"]
    assert stored["format"] == export.FORMAT
    assert Taxonomy.from_dict(stored["taxonomy"]) == SIPAKMED
    assert stored["preprocessing"] == meta.preprocessing
    assert stored["temperature"] == fx.TEMPERATURE
    assert stored["model"] == meta.model
    assert stored["source"]["checkpoint"] == os.path.abspath(checkpoint)
    assert stored["source"]["weights"] == {"framework": "test", "file": f"{case}.random"}
    size = meta.preprocessing["image_size"]
    assert stored["input"]["shape"] == ["batch", size, size, 3]
    assert stored["input"]["before_the_graph"].startswith(meta.preprocessing["resize"])
    assert stored["output"]["shape"] == ["batch", 5]


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory, crops_dir):
    return fx.model_dir(tmp_path_factory.mktemp("cli") / "model", "resnet_v1_bgr", crops_dir)


def test_command_line_prints_one_line_and_refuses_to_overwrite(resnet_dir, tmp_path, capfd):
    output = tmp_path / "deploy" / "sipak.onnx"
    args = [f"--checkpoint={resnet_dir}", "--format=onnx", f"--output={output}"]
    assert export.main(args) == 0
    out, err = capfd.readouterr()
    assert err == "" and out.count("\n") == 1, (out, err)
    assert str(output) in out and f"{output}.json" in out
    written = output.read_bytes()
    assert export.main(args) == 2  # the same output again
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert f"{output} exists" in err
    assert output.read_bytes() == written
    os.remove(output)  # only the sidecar is left: still refused, nothing written
    assert export.main(args) == 2
    assert f"{output}.json exists" in capfd.readouterr().err
    assert not output.exists()


def _bad_metadata_dir(tmp_path):
    bad = tmp_path / "bad_meta"
    bad.mkdir()
    (bad / "metadata.json").write_text('{"format": "sipak_jax.model/2", "kind": "converted"}')
    return bad


@pytest.mark.parametrize(
    "checkpoint, fmt, name, expected",
    [
        ("missing", "onnx", "m.onnx", "metadata.json not found"),
        ("empty", "onnx", "m.onnx", "metadata.json not found"),
        ("bad_meta", "onnx", "m.onnx", "missing fields"),
        ("no_weights", "onnx", "m.onnx", "No orbax checkpoint directory"),
        ("good", "tflite", "m.onnx", "--format='tflite' is not supported"),
        ("good", "onnx", "m.pb", "must end in .onnx"),
        ("ensemble", "onnx", "m.onnx", "not an ensemble"),
        ("good --tolerance=0", "onnx", "m.onnx", "--tolerance must be a positive number"),
    ],
)
def test_user_mistakes_end_in_one_line(
    resnet_dir, tmp_path, capfd, checkpoint, fmt, name, expected
):
    import shutil

    dirs = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "good": resnet_dir}
    (tmp_path / "empty").mkdir()
    dirs["bad_meta"] = _bad_metadata_dir(tmp_path)
    dirs["no_weights"] = tmp_path / "no_weights"
    dirs["no_weights"].mkdir()
    shutil.copy(os.path.join(resnet_dir, "metadata.json"), dirs["no_weights"])
    dirs["ensemble"] = f"{resnet_dir},{resnet_dir}"
    checkpoint, *more = checkpoint.split()
    output = tmp_path / "out" / name
    args = [f"--checkpoint={dirs[checkpoint]}", f"--format={fmt}", f"--output={output}", *more]
    assert export.main(args) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_a_graph_that_disagrees_with_jax_is_not_written(resnet_dir, tmp_path, capfd):
    output = tmp_path / "out" / "m.onnx"
    args = [f"--checkpoint={resnet_dir}", f"--output={output}", "--tolerance=1e-30"]
    assert export.main(args) == 1  # float rounding alone is more than 1e-30
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("error: the ONNX graph differs from the JAX model by")
    assert err.count("\n") == 1 and "nothing was written" in err
    assert not output.exists() and not os.path.exists(f"{output}.json")


def test_module_entry_point(tmp_path):
    output = tmp_path / "m.onnx"
    output.write_bytes(b"mine")
    proc = subprocess.run(
        [sys.executable, "-m", "sipak_jax.export", "--checkpoint=x", f"--output={output}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr == f"error: {output} exists; export never overwrites: choose another "
        "--output or move it.\n"
    )
    assert output.read_bytes() == b"mine"
