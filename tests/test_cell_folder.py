"""`cell_folder`: any lab's `ROOT/<class>/<images>` tree, on tiny trees written here.

The reader (odd formats against Pillow's decoding, grouping by regex or CSV or none, the
taxonomy file, every user mistake as a clear error naming the file), the TFDS build and the
TF-free source agreeing, and training end to end (`train_and_evaluate`, as `main.py` runs it)
with and without a taxonomy.
"""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from tfds_sipakmed import datasets, folds
from tfds_sipakmed.datasets import DatasetError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Class folder names with a space and non-ASCII letters, as labs name them.
CLASSES = ("Ñormal cells", "high grade", "low grade")


def _cell(rng, cls_index: int, size=(20, 24)) -> np.ndarray:
    """An RGB crop whose brightness says its class (learnable by a tiny model)."""
    img = rng.integers(0, 60, (*size, 3), dtype=np.uint8) + np.uint8(80 * cls_index)
    return img


def write_tree(root, slides=6, per_slide=2, classes=CLASSES, seed=0) -> dict:
    """ROOT/<class>/slideNN_cell K.png, PNG RGB; returns {relative path: RGB array}."""
    rng, out = np.random.default_rng(seed), {}
    for ci, cls in enumerate(classes):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for s in range(slides):
            for k in range(per_slide):
                rel = f"{cls}/slide{s:02d}_cell {k}.png"
                img = _cell(rng, ci)
                cv2.imencode(".png", img[..., ::-1])[1].tofile(os.path.join(root, rel))
                out[rel] = img
    return out


def _reader(root, **options):
    lines = []
    r = datasets.reader("cell_folder", str(root), {**options, "log": lines.append})
    return r, lines


def test_reads_every_format_and_mode_as_predict_does(tmp_path):
    """16-bit PNG, grayscale JPEG, TIFF, RGBA PNG, BMP: uint8 RGB, compared with Pillow."""
    write_tree(tmp_path, slides=5, per_slide=1)
    rng = np.random.default_rng(1)
    folder = tmp_path / "high grade"
    rgb16 = rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    cv2.imwrite(str(folder / "p16.png"), rgb16[..., ::-1])
    gray = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    Image.fromarray(gray, "L").save(folder / "gray.jpg", quality=95)
    rgb = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "t.tif")
    Image.fromarray(rgb).save(folder / "b.bmp")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (8, 9, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    reader, _ = _reader(tmp_path)
    refs = {r.file_name: r for r in reader.list_cells()}
    got = {n: reader.load_cell(refs[f"high grade/{n}"])["image"] for n in
           ("p16.png", "gray.jpg", "t.tif", "b.bmp", "a.png")}  # fmt: skip
    for image in got.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    ref16 = np.asarray(Image.open(folder / "p16.png").convert("RGB"))  # Pillow: high byte
    assert np.abs(got["p16.png"].astype(int) - ref16).max() <= 1  # ours: x / 257, rounded
    gray_ref = np.asarray(Image.open(folder / "gray.jpg"))
    assert np.abs(got["gray.jpg"].astype(int) - gray_ref[..., None]).max() <= 2  # decoders
    np.testing.assert_array_equal(got["t.tif"], np.asarray(Image.open(folder / "t.tif")))
    np.testing.assert_array_equal(got["b.bmp"], rgb)
    white = Image.new("RGBA", (9, 8), (255, 255, 255, 255))
    over_white = np.asarray(Image.alpha_composite(white, Image.open(folder / "a.png")))[..., :3]
    assert np.abs(got["a.png"].astype(int) - over_white).max() <= 1


def test_classes_names_groups_and_hidden_files(tmp_path):
    images = write_tree(tmp_path)
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "low grade" / "._slide00_cell 0.png").write_bytes(b"\0\5\26\7")
    (tmp_path / "notes.txt").write_text("the lab's notes, beside the class folders")
    reader, lines = _reader(tmp_path, group_regex=r"^(slide\d+)_")
    assert reader.taxonomy.class_names == tuple(sorted(CLASSES))
    assert reader.taxonomy.abnormal == () and reader.taxonomy.readings == {}
    refs = reader.list_cells()
    assert [r.file_name for r in refs] == sorted(images)
    assert {r.group_id for r in refs} == {f"slide{s:02d}" for s in range(6)}
    ex = reader.load_cell(refs[0])
    np.testing.assert_array_equal(ex["image"], images[refs[0].file_name])
    assert (ex["file_name"], ex["group_id"]) == (refs[0].file_name, refs[0].group_id)
    assert ex["label"] == reader.taxonomy.class_names.index(refs[0].file_name.split("/")[0])
    said = "\n".join(lines)
    assert ".DS_Store" in said and "._slide00_cell 0.png" in said and "notes.txt" in said
    assert reader.grouping["leak_free"]
    assert reader.warnings == [
        "cell_folder: ignored 2 hidden or system entr(ies): .DS_Store, "
        "low grade/._slide00_cell 0.png"
    ]
    # Without groups in the regex, the whole match is the group id.
    reader, _ = _reader(tmp_path, group_regex=r"slide0\d")
    assert {r.group_id for r in reader.list_cells()} == {f"slide{s:02d}" for s in range(6)}


def test_regex_errors_name_the_file(tmp_path):
    write_tree(tmp_path)
    cv2.imwrite(str(tmp_path / "high grade" / "IMG_0001.png"), np.zeros((4, 4, 3), np.uint8))
    reader, _ = _reader(tmp_path, group_regex=r"^(slide\d+)_")
    with pytest.raises(DatasetError, match=r"does not match high grade/IMG_0001.png .*'IMG_0001'"):
        reader.list_cells()
    with pytest.raises(DatasetError, match=r"config.group_regex='\(slide' is not a valid regex"):
        _reader(tmp_path, group_regex="(slide")
    with pytest.raises(DatasetError, match="not both"):
        _reader(tmp_path, group_regex="x", group_csv="y.csv")


def test_group_csv(tmp_path):
    images = write_tree(tmp_path / "root", slides=5, per_slide=1)
    table = tmp_path / "groups.csv"
    rows = [(rel if i % 2 else rel.split("/")[1], f"patient {i % 5}") for i, rel in
            enumerate(sorted(images))]  # fmt: skip
    # Bare names repeat across classes here: each needs its path, except the unique ones.
    rows = [(rel, g) for (_, g), rel in zip(rows, sorted(images), strict=True)]
    table.write_text("file,group\n" + "".join(f"{f},{g}\n" for f, g in rows), encoding="utf-8")
    reader, _ = _reader(tmp_path / "root", group_csv=str(table))
    got = {r.file_name: r.group_id for r in reader.list_cells()}
    assert got == dict(rows)
    # A bare file name that names several files, a file with no row, a file given two groups.
    table.write_text("file,group\nslide00_cell 0.png,p1\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"line 2: 'slide00_cell 0.png' names 3 files"):
        _reader(tmp_path / "root", group_csv=str(table))[0].list_cells()
    table.write_text("file,group\n" + "".join(f"{f},{g}\n" for f, g in rows[1:]))
    with pytest.raises(DatasetError, match=r"no group for 1 image\(s\), e.g. " + rows[0][0]):
        _reader(tmp_path / "root", group_csv=str(table))[0].list_cells()
    table.write_text("file,group\n" + "".join(f"{f},{g}\n" for f, g in rows) + f"{rows[0][0]},x\n")
    with pytest.raises(DatasetError, match="is given two groups"):
        _reader(tmp_path / "root", group_csv=str(table))[0].list_cells()
    table.write_text("name;slide\n")
    with pytest.raises(DatasetError, match="expected a header with the columns file,group"):
        _reader(tmp_path / "root", group_csv=str(table))[0].list_cells()


def test_no_grouping_rule_warns_that_the_protocol_is_not_leak_free(tmp_path):
    write_tree(tmp_path, slides=3)
    reader, lines = _reader(tmp_path)
    refs = reader.list_cells()
    assert all(r.group_id == r.file_name for r in refs)
    assert reader.grouping == {**reader.grouping, "rule": "none", "leak_free": False}
    assert any(line.startswith("warning:") and "NOT leak-free" in line for line in lines)
    assert "NOT leak-free" in reader.warnings[0]


def test_user_mistakes_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        _reader(tmp_path / "missing")
    (tmp_path / "loose.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="holds no class folders"):
        _reader(tmp_path)
    write_tree(tmp_path)
    os.makedirs(tmp_path / "empty class")
    (tmp_path / "empty class" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(DatasetError, match="class folder .*empty class holds no images"):
        _reader(tmp_path)[0].list_cells()
    (tmp_path / "empty class" / "report.pdf").write_bytes(b"%PDF-1.4 not an image")
    with pytest.raises(DatasetError, match=r"empty class/report.pdf is not an image"):
        _reader(tmp_path)[0].list_cells()
    (tmp_path / "empty class" / "report.pdf").unlink()
    fake = tmp_path / "empty class" / "cell.png"
    fake.write_text("not a PNG at all")
    with pytest.raises(DatasetError, match=r"empty class/cell.png is not an image"):
        _reader(tmp_path)[0].list_cells()
    # A truncated PNG: listed (its header is right), then its decode names it.
    good = cv2.imencode(".png", np.zeros((30, 30, 3), np.uint8))[1].tobytes()
    fake.write_bytes(good[:40])
    reader, _ = _reader(tmp_path)
    ref = next(r for r in reader.list_cells() if r.file_name == "empty class/cell.png")
    with pytest.raises(DatasetError, match=r"Cannot decode .*empty class/cell.png"):
        reader.load_cell(ref)


def test_a_class_with_one_image_warns_and_too_few_groups_fail(tmp_path):
    write_tree(tmp_path, slides=6)
    os.makedirs(tmp_path / "rare")
    cv2.imwrite(str(tmp_path / "rare" / "slide00_only.png"), np.zeros((5, 5, 3), np.uint8))
    reader, lines = _reader(tmp_path, group_regex=r"^(slide\d+)")
    reader.list_cells()
    assert any("class 'rare' has 1 image(s) in 1 group(s)" in w for w in reader.warnings)
    assert any("stratified folds are impossible" in line for line in lines)
    write_tree(tmp_path / "small", slides=4)
    reader, _ = _reader(tmp_path / "small", group_regex=r"^(slide\d+)")
    with pytest.raises(DatasetError, match="holds 4 group"):
        reader.list_cells()


def _taxonomy(tmp_path, d) -> str:
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    return str(path)


BETHESDA = {
    "abnormal": ["high grade", "low grade"],
    "class_names": ["Ñormal cells", "low grade", "high grade"],
    "views": {
        "2class": {
            "names": ["normal", "abnormal"],
            "of": {"Ñormal cells": "normal", "low grade": "abnormal", "high grade": "abnormal"},
        }
    },
    "readings": {"Ñormal cells": "NILM", "low grade": "LSIL", "high grade": "HSIL"},
}


def test_taxonomy_file(tmp_path):
    write_tree(tmp_path / "root")
    reader, _ = _reader(tmp_path / "root", taxonomy=_taxonomy(tmp_path, BETHESDA))
    tax = reader.taxonomy
    assert tax.class_names == ("Ñormal cells", "low grade", "high grade")  # the file's order
    assert tax.abnormal_indices() == (1, 2) and tax.reading("high grade") == "HSIL"
    assert tax.dataset == "cell_folder"
    labels = {r.file_name.split("/")[0]: r.label for r in reader.list_cells()}
    assert labels == {"Ñormal cells": 0, "low grade": 1, "high grade": 2}
    # Only `abnormal`: the folders sorted, no readings.
    reader, _ = _reader(tmp_path / "root", taxonomy=_taxonomy(tmp_path, {"abnormal": []}))
    assert reader.taxonomy.class_names == tuple(sorted(CLASSES))


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"abnormal": None}, "the field 'abnormal' is required"),
        ({"abnormal": ["cancer"]}, r"taxonomy.abnormal: \['cancer'\] are not in class_names"),
        ({"class_names": ["Ñormal cells", "low grade"]}, r"folders that are not classes \['high"),
        ({"class_names": [*CLASSES, "atypical"]}, r"classes without a folder \['atypical'\]"),
        ({"readings": {"low grade": ""}}, r"taxonomy.readings\['low grade'\]: must be a non-empty"),
        ({"views": {"2class": {"names": ["n", "a"], "of": {}}}}, r"views\['2class'\].of"),
        ({"colour": "blue"}, r"unknown fields \['colour'\]"),
    ],
)
def test_taxonomy_file_errors_name_the_field(tmp_path, change, pattern):
    write_tree(tmp_path / "root")
    d = {**BETHESDA, **change}
    d = {k: v for k, v in d.items() if v is not None}
    path = _taxonomy(tmp_path, d)
    with pytest.raises(DatasetError, match=f"config.taxonomy={path}: .*{pattern}"):
        _reader(tmp_path / "root", taxonomy=path)


def test_taxonomy_file_that_is_not_json(tmp_path):
    write_tree(tmp_path / "root")
    path = tmp_path / "t.json"
    path.write_text("{'abnormal': []}")
    with pytest.raises(DatasetError, match="not valid JSON"):
        _reader(tmp_path / "root", taxonomy=str(path))
    with pytest.raises(DatasetError, match="cannot read it"):
        _reader(tmp_path / "root", taxonomy=str(tmp_path / "none.json"))


def test_config_name_is_a_digest_of_the_folder_state(tmp_path):
    write_tree(tmp_path / "a")
    write_tree(tmp_path / "b", seed=1)
    reader, _ = _reader(tmp_path / "a", group_regex=r"^(slide\d+)")
    name = reader.config_name(reader.list_cells(), "grouped")
    assert name.startswith("grouped-") and len(name) == len("grouped-") + 12
    assert reader.config_name(reader.list_cells(), "random_cells").startswith("random_cells-")
    other, _ = _reader(tmp_path / "b", group_regex=r"^(slide\d+)")
    assert other.config_name(other.list_cells(), "grouped") != name  # another lab's folder
    plain, _ = _reader(tmp_path / "a")
    assert plain.config_name(plain.list_cells(), "grouped") != name  # another grouping
    assert (
        datasets.tfds_config_name(
            "cell_folder", str(tmp_path / "a"), "grouped", {"group_regex": r"^(slide\d+)"}
        )
        == name
    )
    cv2.imwrite(str(tmp_path / "a" / "low grade" / "slide05_new.png"), np.zeros((3, 3, 3)))
    again, _ = _reader(tmp_path / "a", group_regex=r"^(slide\d+)")
    assert again.config_name(again.list_cells(), "grouped") != name  # the folder changed


def _build(root, data_dir, **options):
    code = (
        "import sys, tfds_sipakmed\n"
        "b = tfds_sipakmed.build(sys.argv[1], sys.argv[2], dataset='cell_folder', "
        f"options={options!r})\n"
        "print('BUILDER_DIR', b.data_dir)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(root), str(data_dir)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.split("BUILDER_DIR ")[1].split()[0], proc.stdout


def test_tfds_build_and_the_raw_tree_give_the_same_examples(tmp_path):
    """Built in a subprocess (TensorFlow stays out of this process), read back without it."""
    from sipak_jax import input_pipeline as ip

    write_tree(tmp_path / "root", slides=7)
    options = {"group_regex": r"^(slide\d+)_", "taxonomy": _taxonomy(tmp_path, BETHESDA)}
    builder_dir, out = _build(tmp_path / "root", tmp_path / "data", **options)
    name = datasets.tfds_config_name("cell_folder", str(tmp_path / "root"), "grouped", options)
    assert builder_dir == str(tmp_path / "data" / "cell_folder" / name / "1.0.0")
    meta = json.loads((tmp_path / "data" / "cell_folder" / name / "1.0.0" / "metadata.json")
                      .read_text())  # fmt: skip
    assert meta["taxonomy"]["readings"]["low grade"] == "LSIL"
    assert meta["grouping"]["rule"] == "regex" and meta["grouping"]["leak_free"]
    built = ip.TfdsSource(str(tmp_path / "data"), name, dataset="cell_folder")
    raw = ip.RawTreeSource(
        str(tmp_path / "root"), "grouped", dataset="cell_folder", options=options,
        log=lambda s: None,
    )  # fmt: skip
    assert built.taxonomy == raw.taxonomy and built.taxonomy.reading("high grade") == "HSIL"
    assert built.records == raw.records and len(raw) == 3 * 7 * 2
    for i in (0, len(raw) // 2, len(raw) - 1):
        a, b = built[i], raw[i]
        assert sorted(a) == sorted(b) == ["file_name", "group_id", "image", "label"]
        for k in ("image", "label", "file_name", "group_id"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    by_group = {}
    for r in raw.records:
        assert by_group.setdefault(r.group_id, r.split) == r.split  # a slide in one fold
    assert "Folds (grouped, grouping regex)" in out  # the build says its folds
    assert folds.NUM_FOLDS == len({r.split for r in raw.records})


# ---------------------------------------------------------------------------------------------
# Training end to end.


def _report_text(workdir) -> str:
    import html
    import re

    with open(os.path.join(workdir, "report.html"), encoding="utf-8") as f:
        text = re.sub(r"<[^>]+>", " ", f.read())
    return html.unescape(re.sub(r"\s+", " ", text))


def test_training_on_a_folder_without_taxonomy_or_grouping(tmp_path, capsys):
    """Read TF-free (use_tfds=False): the model, results and report use the folder's class
    names, say that no clinical reading is defined and that the protocol is not leak-free."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from train_worker import tiny_config

    from sipak_jax import model_io, train

    write_tree(tmp_path / "root", slides=6)
    config = tiny_config(
        "", dataset="cell_folder", manual_dir=str(tmp_path / "root"), use_tfds=False,
        num_epochs=1, warmup_epochs=0, evaluators=("calibration", "test", "report"),
    )  # fmt: skip
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "warning: cell_folder: no grouping rule" in out and "NOT leak-free" in out
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["class_names"] == sorted(CLASSES)
    record = results["dataset"]
    assert record["name"] == "cell_folder" and record["leak_free"] is False
    assert record["grouping"]["rule"] == "none" and "NOT leak-free" in record["warnings"][0]
    assert results["test"]["abnormal_vs_nilm"] is None
    meta = model_io.read_metadata(workdir)
    assert meta.taxonomy.class_names == tuple(sorted(CLASSES)) and not meta.taxonomy.readings
    assert meta.taxonomy.dataset == "cell_folder"
    text = _report_text(workdir)
    assert "no clinical reading defined" in text and "Not leak-free" in text
    assert "SIPaKMeD" not in text.split("Shortcut controls")[0]
    assert "high grade" in text and "Ñormal cells" in text


@pytest.mark.slow
def test_main_command_with_a_taxonomy_builds_trains_and_reports_its_readings(tmp_path):
    """The README's command (configs/resnet50.py, TFDS build, a grouping regex, a taxonomy
    with Bethesda-like readings), with the demo's tiny model."""
    write_tree(tmp_path / "root", slides=6)
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, "main.py", "--config=configs/resnet50.py", f"--workdir={workdir}",
        "--config.dataset=cell_folder", f"--config.manual_dir={tmp_path / 'root'}",
        f"--config.data_dir={tmp_path / 'tfds'}", "--config.group_regex=^(slide\\d+)_",
        f"--config.taxonomy={_taxonomy(tmp_path, BETHESDA)}", "--config.init_from=",
        "--config.model.depth=18", "--config.model.width=8", "--config.model.stage_sizes=(1,1,1,1)",
        "--config.image_size=32", "--config.num_epochs=1", "--config.head_epochs=0",
        "--config.warmup_epochs=0", "--config.batch_size=8", "--config.eval_batch_size=16",
        "--config.compute_dtype=float32", "--config.num_overlay_cells=2",
        "--config.profile_steps=0", "--config.writer=jsonl",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning" not in proc.stdout  # grouped: no leak warning; 6 slides: no small class
    results = json.loads((workdir / "results.json").read_text(encoding="utf-8"))
    assert results["class_names"] == BETHESDA["class_names"]
    assert results["dataset"]["leak_free"] is True
    assert results["test"]["abnormal_vs_nilm"]["sensitivity"] is not None
    meta = json.loads((workdir / "metadata.json").read_text(encoding="utf-8"))
    assert meta["taxonomy"]["readings"] == BETHESDA["readings"]
    assert meta["dataset"]["tfds_config"].startswith("grouped-")
    text = _report_text(workdir)
    assert "HSIL" in text and "LSIL" in text and "no clinical reading defined" not in text
    assert "Five folds grouped by group (the file-name rule ^(slide\\d+)_" in text


def test_build_command_names_a_bad_file_before_tensorflow_starts(tmp_path):
    write_tree(tmp_path / "root")
    (tmp_path / "root" / "low grade" / "scan.pdf").write_bytes(b"%PDF-1.7")
    proc = subprocess.run(
        [sys.executable, "-m", "tfds_sipakmed.build", "--dataset=cell_folder",
         f"--manual_dir={tmp_path / 'root'}", f"--data_dir={tmp_path / 'data'}",
         "--group_regex=^(slide\\d+)_"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO),
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: cell_folder: {tmp_path / 'root' / 'low grade' / 'scan.pdf'} is not an image "
        "(expected BMP, PNG, JPEG or TIFF); remove it or move it out of the class folder"
    )
    assert not (tmp_path / "data").exists()


def test_training_stops_with_one_line_on_an_image_that_does_not_decode(tmp_path):
    """Its header looks right (so listing passes); decoding it fails: a UserError naming it."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from train_worker import tiny_config

    from sipak_jax import train
    from sipak_jax.console import UserError

    write_tree(tmp_path / "root")
    png = cv2.imencode(".png", np.zeros((30, 30, 3), np.uint8))[1].tobytes()
    (tmp_path / "root" / "low grade" / "slide03_bad.png").write_bytes(png[:40])
    config = tiny_config(
        "", dataset="cell_folder", manual_dir=str(tmp_path / "root"), use_tfds=False,
        group_regex=r"^(slide\d+)_",
    )  # fmt: skip
    bad = tmp_path / "root" / "low grade" / "slide03_bad.png"
    with pytest.raises(UserError, match=f"config.manual_dir: cell_folder: Cannot decode {bad}"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
