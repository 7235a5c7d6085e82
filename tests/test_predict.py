"""`python -m sipak_jax.predict` on a tiny ResNet saved as a model DIR (model_io.save_model_dir)."""

import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from sipak_jax import predict
from tfds_sipakmed.taxonomy import SIPAKMED, Taxonomy

SIZE = 32
TEMPERATURE = 1.7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from flax import nnx

    from sipak_jax import model_io, preprocessing
    from sipak_jax.models import ResNet

    path = tmp_path_factory.mktemp("model") / "tiny"
    model = ResNet(18, SIPAKMED.num_classes, width=8, rngs=nnx.Rngs(0))
    meta = model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=SIPAKMED,
        preprocessing=preprocessing.spec_for("scratch", image_size=SIZE),
        temperature=TEMPERATURE,
    )
    model_io.save_model_dir(path, model, meta)
    return str(path)


def _cell(h=50, w=40, seed=0):
    """A colourful RGB test image with structure (so resizing and channels matter)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = rng.integers(0, 255, 3, dtype=np.uint8)
    cv2.circle(
        img, (w // 2, h // 2), min(h, w) // 3, tuple(int(v) for v in rng.integers(0, 255, 3)), -1
    )
    img[: h // 4] = rng.integers(0, 255, (h // 4, w, 3), dtype=np.uint8)
    return img


def _write(path, rgb_or_raw, bgr=True):
    a = (
        rgb_or_raw[..., ::-1]
        if (bgr and rgb_or_raw.ndim == 3 and rgb_or_raw.shape[2] == 3)
        else rgb_or_raw
    )
    assert cv2.imwrite(str(path), a), path


def _run(args):
    return predict.main([str(a) for a in args])


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def formats_run(model_dir, tmp_path_factory):
    """One prediction run over every format and odd image kind (compiles once)."""
    d = tmp_path_factory.mktemp("imgs")
    rgb = _cell()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    _write(d / "rgb.bmp", rgb)
    _write(d / "rgb.png", rgb)
    _write(d / "rgb.tif", rgb)
    _write(d / "rgb.jpg", rgb)
    _write(d / "gray8.png", gray, bgr=False)
    _write(d / "gray8_as_rgb.png", np.repeat(gray[..., None], 3, 2))
    # 16-bit: v * 257 maps exactly back to v (65535 / 255 = 257).
    _write(d / "rgb16.png", rgb.astype(np.uint16) * 257)
    _write(d / "rgb16.tif", rgb.astype(np.uint16) * 257)
    _write(d / "gray16.tif", gray.astype(np.uint16) * 257, bgr=False)
    bgra = np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 255, np.uint8)])
    _write(d / "rgba_opaque.png", bgra, bgr=False)
    _write(d / "big.png", cv2.resize(rgb, (1600, 1200), interpolation=cv2.INTER_NEAREST))
    _write(d / "one_pixel.png", rgb[:1, :1])
    sub = d / "nested" / "deeper"
    sub.mkdir(parents=True)
    _write(sub / "rgb.bmp", rgb)  # same stem as ../rgb.bmp: overlay names must not collide
    (d / "nested" / "notes.dat").write_text("1,2\n")
    out = d.parent / f"{d.name}_out.jsonl"
    overlays = d.parent / f"{d.name}_overlays"
    rc = _run(
        [
            f"--checkpoint={model_dir}",
            f"--output={out}",
            "--batch_size=4",
            "--explain=gradcam",
            f"--overlays={overlays}",
            d,
        ]
    )
    return {"dir": d, "rc": rc, "rows": _jsonl(out), "overlays": overlays, "rgb": rgb}


@pytest.mark.slow  # a model build, a compile and Grad-CAM: minutes on a busy 2-core CPU
def test_every_format_predicts(formats_run):
    assert formats_run["rc"] == 0
    rows = formats_run["rows"]
    d = formats_run["dir"]
    paths = [r["path"] for r in rows]
    # The directory walk is recursive and sorted; the .dat file is not an image input.
    expected = sorted(
        os.path.join(root, n)
        for root, _, names in os.walk(d)
        for n in names
        if not n.endswith(".dat")
    )
    assert paths == expected
    for r in rows:
        assert r["error"] is None, r
        assert r["class_names"] == list(SIPAKMED.class_names)
        p = np.array(r["probabilities"])
        assert p.shape == (5,) and abs(p.sum() - 1) < 1e-6 and (p > 0).all()
        assert (
            r["label"]
            == SIPAKMED.class_names[int(p.argmax())]
            == SIPAKMED.class_names[r["label_index"]]
        )
        assert r["bethesda"] == SIPAKMED.readings[r["label"]]
        p_ab = p[list(SIPAKMED.abnormal_indices())].sum()
        assert r["p_abnormal"] == pytest.approx(p_ab)
        assert r["flagged"] == (p_ab > 1 - p_ab) == (r["label_2class"] == "abnormal")
        assert r["label_3class"] in ("normal", "benign", "abnormal")
        assert r["temperature"] == TEMPERATURE


@pytest.mark.slow  # a model build, a compile and Grad-CAM: minutes on a busy 2-core CPU
def test_conversions_give_the_same_prediction(formats_run):
    by = {os.path.basename(r["path"]): np.array(r["probabilities"]) for r in formats_run["rows"]}
    # Lossless formats and 16-bit / opaque-RGBA versions of one image: identical inputs.
    for name in ("rgb.png", "rgb.tif", "rgb16.png", "rgb16.tif", "rgba_opaque.png"):
        np.testing.assert_allclose(by[name], by["rgb.bmp"], atol=1e-6, err_msg=name)
    for name in ("gray8_as_rgb.png", "gray16.tif"):
        np.testing.assert_allclose(by[name], by["gray8.png"], atol=1e-6, err_msg=name)
    assert not np.allclose(by["gray8.png"], by["rgb.bmp"], atol=1e-6)  # colour matters


@pytest.mark.slow  # a model build, a compile and Grad-CAM: minutes on a busy 2-core CPU
def test_probabilities_equal_the_models_softmax_at_the_stored_temperature(formats_run, model_dir):
    """The reference: the loaded model applied by hand, softmax at T from metadata.json."""
    import jax
    import jax.numpy as jnp

    from sipak_jax import model_io, preprocessing

    model, meta = model_io.load_model_dir(model_dir)
    assert meta.temperature == TEMPERATURE
    rgb = formats_run["rgb"]
    x = preprocessing.resize_crop(rgb, SIZE, meta.preprocessing["resize"])
    logits = model(preprocessing.normalize(jnp.asarray(x[None]), meta.preprocessing))
    ref = np.asarray(jax.nn.softmax(logits / TEMPERATURE, axis=-1))[0]
    row = next(r for r in formats_run["rows"] if os.path.basename(r["path"]) == "rgb.bmp")
    np.testing.assert_allclose(row["probabilities"], ref, atol=1e-5)


@pytest.mark.slow  # a model build, a compile and Grad-CAM: minutes on a busy 2-core CPU
def test_overlays_inside_their_directory_and_unique(formats_run):
    rows = formats_run["rows"]
    overlays = formats_run["overlays"]
    names = [r["overlay"] for r in rows]
    assert len(set(names)) == len(names)
    for r in rows:
        path = r["overlay"]
        assert os.path.realpath(os.path.dirname(path)) == os.path.realpath(overlays)
        img = cv2.imread(path)
        original = cv2.imread(r["path"], cv2.IMREAD_UNCHANGED)
        assert img is not None and img.shape[:2] == original.shape[:2]  # drawn on the original
    stems = sorted(os.path.basename(r["overlay"]) for r in rows if r["path"].endswith("rgb.bmp"))
    assert stems == ["rgb-2_gradcam.png", "rgb_gradcam.png"]


def test_unreadable_files_get_error_rows_and_exit_1(model_dir, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _write(d / "good.png", _cell(seed=1))
    (d / "zero.png").write_bytes(b"")
    ok, buf = cv2.imencode(".png", _cell(seed=2))
    (d / "truncated.png").write_bytes(buf.tobytes()[: len(buf) // 2])
    ok, buf = cv2.imencode(".jpg", _cell(seed=3))
    (d / "truncated.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    (d / "text.jpg").write_text("not an image at all\n")
    (d / "empty_dir").mkdir()
    missing = tmp_path / "missing.bmp"
    out = tmp_path / "out.csv"
    rc = _run(
        [
            f"--checkpoint={model_dir}",
            f"--output={out}",
            "--batch_size=4",
            d,
            d / "empty_dir",
            missing,
        ]
    )
    assert rc == 1
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    by = {os.path.basename(r["path"]): r for r in rows}
    assert set(by) == {
        "good.png",
        "zero.png",
        "truncated.png",
        "truncated.jpg",
        "text.jpg",
        "empty_dir",
        "missing.bmp",
    }
    assert by["good.png"]["error"] == "" and by["good.png"]["label"] in SIPAKMED.class_names
    for name in ("zero.png", "truncated.png", "truncated.jpg", "text.jpg"):
        assert name in by[name]["error"] and "Cannot decode" in by[name]["error"], by[name]
        assert by[name]["label"] == "" and by[name]["p_Dyskeratotic"] == ""
    assert "no image file" in by["empty_dir"]["error"]
    assert "no such file" in by["missing.bmp"]["error"]
    # The CSV holds the jsonl fields as columns, probabilities as p_<class>.
    good = by["good.png"]
    p = np.array([float(good[f"p_{n}"]) for n in SIPAKMED.class_names])
    assert abs(p.sum() - 1) < 1e-6
    assert good["label"] == SIPAKMED.class_names[int(p.argmax())]
    assert good["bethesda"] == SIPAKMED.readings[good["label"]]
    assert float(good["p_abnormal"]) == pytest.approx(p[list(SIPAKMED.abnormal_indices())].sum())
    # The CSV columns of a SIPaKMeD model: those of earlier versions plus `uncertainty`.
    assert list(rows[0]) == [
        "path",
        "label",
        "label_index",
        "label_3class",
        "label_2class",
        "bethesda",
        "p_abnormal",
        "flagged",
        "temperature",
        "uncertainty",
        *(f"p_{n}" for n in SIPAKMED.class_names),
        "overlay",
        "error",
    ]


def test_refuses_to_overwrite_output(model_dir, tmp_path, capsys):
    img = tmp_path / "cell.png"
    _write(img, _cell())
    out = tmp_path / "out.jsonl"
    out.write_text("the user's file\n")
    assert _run([f"--checkpoint={model_dir}", f"--output={out}", img]) == 2
    assert out.read_text() == "the user's file\n"
    assert "exists" in capsys.readouterr().err
    assert _run([f"--checkpoint={model_dir}", f"--output={out}", "--overwrite", img]) == 0
    assert _jsonl(out)[0]["path"] == str(img)


def test_usage_errors(model_dir, tmp_path):
    img = tmp_path / "cell.png"
    _write(img, _cell())
    base = [f"--checkpoint={model_dir}"]
    assert _run(base + [f"--output={tmp_path / 'x.txt'}", img]) == 2
    assert _run(base + [f"--output={tmp_path / 'x.csv'}", "--explain=gradcam", img]) == 2
    assert (
        _run(
            base
            + [f"--output={tmp_path / 'x.csv'}", "--explain=nope", f"--overlays={tmp_path}", img]
        )
        == 2
    )
    assert not (tmp_path / "x.csv").exists()


def test_overlay_name_is_safe_and_unique():
    taken = set()
    assert predict.overlay_name("/a/b/cell 1.png", "_gradcam.png", taken) == "cell_1_gradcam.png"
    assert predict.overlay_name("/c/cell 1.bmp", "_gradcam.png", taken) == "cell_1-2_gradcam.png"
    assert predict.overlay_name("..png", "_g.png", taken) == "png_g.png"
    assert predict.overlay_name("...", "_g.png", taken) == "image_g.png"
    assert predict.overlay_name("/x/.hidden.png", "_g.png", taken) == "hidden_g.png"
    name = predict.overlay_name("/x/..\\..\\evil.png", "_g.png", taken)
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert predict.overlay_name("/x/ÄÖ.png", "_g.png", taken) == "__g.png"


def test_other_models_get_null_clinical_fields():
    names = [f"class{i}" for i in range(1000)]
    p = np.full(1000, 1e-4)
    p[7] = 1 - p.sum() + p[7]
    for tax in (names, Taxonomy.bare(names, "imagenet")):
        row = predict.reading(p, tax)
        assert row["label"] == "class7" and row["label_index"] == 7
        for key in ("label_3class", "label_2class", "p_abnormal", "flagged"):
            assert row[key] is None
        assert row["bethesda"] == "no clinical reading defined"


def test_the_models_taxonomy_gives_the_reading():
    """Another dataset's taxonomy: its own abnormal set, view and readings, no SIPaKMeD."""
    tax = Taxonomy(
        class_names=("NILM", "LSIL", "HSIL"),
        abnormal=("LSIL", "HSIL"),
        views={
            "2class": {
                "names": ["normal", "abnormal"],
                "of": {"NILM": "normal", "LSIL": "abnormal", "HSIL": "abnormal"},
            }
        },
        readings={"NILM": "Negative for intraepithelial lesion", "HSIL": "HSIL"},
        dataset="cric_like",
    )
    row = predict.reading(np.array([0.5, 0.3, 0.2]), tax)
    assert row["label"] == "NILM" and row["bethesda"] == "Negative for intraepithelial lesion"
    assert row["p_abnormal"] == pytest.approx(0.5) and row["flagged"] is False
    assert row["label_2class"] == "normal" and row["label_3class"] is None
    row = predict.reading(np.array([0.4, 0.35, 0.25]), tax)
    assert row["label"] == "NILM" and row["flagged"] is True and row["label_2class"] == "abnormal"
    row = predict.reading(np.array([0.1, 0.8, 0.1]), tax)
    assert row["bethesda"] == "no clinical reading defined"  # LSIL has none in this taxonomy


@pytest.mark.slow  # a fresh Python process imports jax, restores and compiles
def test_command_line_entry_point(model_dir, tmp_path):
    img = tmp_path / "cell.tif"
    _write(img, _cell())
    (tmp_path / "broken.bmp").write_bytes(b"BM\x00\x01")
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # The real entry point (`python -m sipak_jax.predict`, via runpy), then a look at which
    # modules it imported: TensorFlow must stay out of the predict path.
    script = (
        "import runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('sipak_jax.predict', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    print('TENSORFLOW_IMPORTED', 'tensorflow' in sys.modules, file=sys.stderr)\n"
        "    raise\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "sipak_jax.predict",
            f"--checkpoint={model_dir}",
            f"--output={out}",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "broken.bmp" in proc.stderr
    rows = _jsonl(out)
    assert [os.path.basename(r["path"]) for r in rows] == ["broken.bmp", "cell.tif"]
    assert rows[0]["error"] and rows[1]["error"] is None
    assert "TENSORFLOW_IMPORTED False" in proc.stderr
