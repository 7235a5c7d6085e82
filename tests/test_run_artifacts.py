"""Run artifacts: the overlays the report shows, computed once with the model when a run ends."""

import json

import cv2
import numpy as np
import pytest
from saliency_fixtures import draw_cells, tiny_model, train_tiny

from sipak_jax import model_io, preprocessing, run_artifacts, saliency
from sipak_jax.run_artifacts import Cell
from tfds_sipakmed.taxonomy import SIPAKMED, Taxonomy

SIZE = 64  # the demo's input size: the overlay stage rule picks layer2 (8x8)


def _metadata(model, size=SIZE, resize="pad", taxonomy=SIPAKMED):
    return model_io.ModelMetadata(
        kind="converted",
        model=model.config(),
        taxonomy=taxonomy,
        preprocessing=preprocessing.spec_for("scratch", image_size=size, resize=resize),
    )


def _crop(h, w, seed):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), rng.integers(170, 230, 3), np.uint8)
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 5, (60, 40, 90), -1)
    return img


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_classes=5)


def test_overlay_stage_rule(model):
    sizes = saliency.stage_map_sizes(model, 64)
    assert sizes == {1: (16, 16), 2: (8, 8), 3: (4, 4), 4: (2, 2)}
    # The deepest stage whose map is at least 7x7: the demo's 64 px -> layer2 (8x8), not the
    # last stage's 2x2; ResNet at 224 px keeps the textbook layer4 (7x7).
    assert saliency.overlay_stage(model, 64) == 2
    assert saliency.overlay_stage(model, 224) == 4
    assert saliency.overlay_stage(model, 112) == 3
    assert saliency.overlay_stage(model, 16) == 1  # nothing reaches 7x7: the finest stage
    assert saliency.layer_name(2) == "layer2"


def test_select_calls():
    p_ab = [0.9, 0.55, 0.2, 0.99, 0.51, 0.7]
    preds = []
    for i, pa in enumerate(p_ab):
        probs = [pa / 2, pa / 2, (1 - pa) / 3, (1 - pa) / 3, (1 - pa) / 3]
        preds.append({"index": i, "probabilities": probs, "label": 0})
    sel = run_artifacts.select_calls(preds, SIPAKMED, k=2)
    assert sel["num_calls"] == 5
    assert [c["index"] for c in sel["confident"]] == [3, 0]
    assert [c["index"] for c in sel["doubtful"]] == [4, 1]
    assert sel["confident"][0]["p_abnormal"] == pytest.approx(0.99)
    # Classes without an abnormal set (e.g. ImageNet): no calls.
    assert run_artifacts.select_calls(preds, Taxonomy.bare(list("abcde")), k=2)["num_calls"] == 0


def test_writes_overlays_and_index(model, tmp_path):
    crop = _crop(50, 70, 0)
    cached = preprocessing.preprocess_image(_crop(90, 60, 1), _metadata(model).preprocessing)
    cells = [
        Cell(7, crop, label=0, prediction=1, file_name="im_Dyskeratotic/CROPPED/001_01.bmp",
             group="confident"),
        Cell(12, cached, label=3, prediction=0, file_name="im_Parabasal/CROPPED/002_01.bmp",
             group="doubtful"),
        Cell(30, None, label=1, prediction=1, file_name="im_Koilocytotic/CROPPED/003_01.bmp"),
    ]  # fmt: skip
    index = run_artifacts.write_run_artifacts(tmp_path, model, _metadata(model), cells)
    assert run_artifacts.read_index(tmp_path) == json.loads(json.dumps(index))
    assert index["format"] == run_artifacts.FORMAT and index["method"] == "gradcam"
    first, second = index["images"]
    assert first["file"] == "cell00007_gradcam.png" and first["index"] == 7
    assert (first["true_class"], first["predicted_class"]) == ("Dyskeratotic", "Koilocytotic")
    assert first["group"] == "confident" and second["group"] == "doubtful"
    for entry, image in ((first, crop), (second, cached)):
        assert entry["method_title"] == "Grad-CAM"
        assert (entry["layer"], entry["stage"], entry["map_size"]) == ("layer2", 2, [8, 8])
        assert entry["input_size"] == SIZE
        assert entry["image_size"] == list(image.shape[:2])  # drawn on the image as given
        png = cv2.imread(str(tmp_path / "artifacts" / entry["file"]), cv2.IMREAD_COLOR)
        assert png.shape == image.shape
        if entry["blank"]:  # an untrained model may have no positive evidence at layer2
            assert entry["peak"] is None
            np.testing.assert_array_equal(png[..., ::-1], image)
        else:
            assert not np.array_equal(png[..., ::-1], image)  # a map was drawn on it
            y, x = entry["peak"]
            assert 0 <= y < image.shape[0] and 0 <= x < image.shape[1]
    assert not (first["blank"] and second["blank"])
    assert index["missing"] == [{"index": 30, "file_name": "im_Koilocytotic/CROPPED/003_01.bmp"}]
    files = sorted(p.name for p in (tmp_path / "artifacts").iterdir())
    assert files == ["cell00007_gradcam.png", "cell00012_gradcam.png", "index.json"]


def test_an_explicit_stage_and_a_map_without_layer(model, tmp_path):
    meta = _metadata(model)
    cells = [Cell(1, _crop(40, 40, 2), label=0, prediction=0)]
    index = run_artifacts.write_run_artifacts(tmp_path, model, meta, cells, stage=4)
    assert index["images"][0]["layer"] == "layer4" and index["images"][0]["map_size"] == [2, 2]
    index = run_artifacts.write_run_artifacts(tmp_path, model, meta, cells, method="gradient")
    entry = index["images"][0]  # a map at the input's resolution: no layer
    assert entry["layer"] is None and entry["map_size"] == [SIZE, SIZE]
    assert (entry["file"], entry["method_title"]) == ("cell00001_gradient.png", "vanilla gradient")
    # The gradcam PNG of the first call is gone: the index lists only what is there.
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == [
        "cell00001_gradient.png",
        "index.json",
    ]


def test_never_replaces_files_it_did_not_write(model, tmp_path):
    meta = _metadata(model)
    cells = [Cell(3, _crop(40, 50, 3), label=0, prediction=0)]
    mine = tmp_path / "artifacts" / "cell00003_gradcam.png"
    mine.parent.mkdir()
    mine.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError, match="not listed in index.json"):
        run_artifacts.write_run_artifacts(tmp_path, model, meta, cells)
    assert mine.read_bytes() == b"the user's file"
    mine.unlink()
    (tmp_path / "artifacts" / "index.json").write_text('{"my": "notes"}')
    with pytest.raises(FileExistsError, match="not a sipak_jax.run_artifacts/1 index"):
        run_artifacts.write_run_artifacts(tmp_path, model, meta, cells)
    assert (tmp_path / "artifacts" / "index.json").read_text() == '{"my": "notes"}'


def test_rejects_bad_cells_and_bad_indexes(model, tmp_path):
    meta = _metadata(model)
    with pytest.raises(ValueError, match="label 5 is not a class index"):
        run_artifacts.write_run_artifacts(tmp_path, model, meta, [Cell(0, _crop(9, 9, 0), 5, 0)])
    float_image = _crop(20, 20, 0).astype(np.float32)
    with pytest.raises(ValueError, match="must be uint8 RGB"):
        run_artifacts.write_run_artifacts(tmp_path, model, meta, [Cell(0, float_image, 0, 0)])
    (tmp_path / "artifacts").mkdir(exist_ok=True)
    bad = {"format": run_artifacts.FORMAT, "images": [{"file": "../../secret.png", "index": 1}]}
    (tmp_path / "artifacts" / "index.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="is not a file name in artifacts/"):
        run_artifacts.read_index(tmp_path)


def test_cells_for_run_reads_the_original_crops(tmp_path):
    roots = [tmp_path / "a", tmp_path / "b"]
    crop = _crop(33, 47, 4)
    # A Kaggle-style mirror nests each class folder once more.
    path = roots[1] / "im_Koilocytotic" / "im_Koilocytotic" / "CROPPED" / "001_01.bmp"
    path.parent.mkdir(parents=True)
    assert cv2.imwrite(str(path), crop[..., ::-1])
    preds = [
        {"index": 0, "file_name": "im_Koilocytotic/CROPPED/001_01.bmp", "label": 1,
         "prediction": 1, "probabilities": [0.05, 0.9, 0.05, 0.0, 0.0]},
        {"index": 1, "file_name": "im_Dyskeratotic/CROPPED/002_01.bmp", "label": 2,
         "prediction": 0, "probabilities": [0.6, 0.0, 0.4, 0.0, 0.0]},
        {"index": 2, "file_name": "../outside.bmp", "label": 0,
         "prediction": 0, "probabilities": [0.55, 0.0, 0.45, 0.0, 0.0]},
        {"index": 3, "file_name": "x", "label": 3, "prediction": 3,
         "probabilities": [0.1, 0.0, 0.1, 0.8, 0.0]},
    ]  # fmt: skip
    cached = {1: np.zeros((SIZE, SIZE, 3), np.uint8)}
    cells = run_artifacts.cells_for_run(
        preds, SIPAKMED, image_roots=[str(r) for r in roots], images=cached, k=1
    )
    by_index = {c.index: c for c in cells}
    assert [c.group for c in cells] == ["confident", "doubtful"]
    assert set(by_index) == {0, 2}  # 3 is no abnormal call; 1 is neither the top nor the edge
    np.testing.assert_array_equal(by_index[0].image, crop)
    assert by_index[2].image is None  # never read outside the dataset's folders
    cells = run_artifacts.cells_for_run(preds, SIPAKMED, images=cached, k=3)
    assert {c.index: c.image is not None for c in cells} == {0: False, 1: True, 2: False}


def test_command_line_for_a_finished_run(model, tmp_path, capsys):
    assert run_artifacts.main([f"--workdir={tmp_path / 'none'}"]) == 2
    assert "results.json not found" in capsys.readouterr().err
    workdir, images = tmp_path / "run", tmp_path / "images"
    model_io.save_model_dir(workdir, model, _metadata(model))
    crop_path = images / "im_Koilocytotic" / "CROPPED" / "001_01.bmp"
    crop_path.parent.mkdir(parents=True)
    assert cv2.imwrite(str(crop_path), _crop(52, 61, 5)[..., ::-1])
    pred = {"index": 4, "file_name": "im_Koilocytotic/CROPPED/001_01.bmp", "label": 1,
            "prediction": 1, "probabilities": [0.1, 0.8, 0.1, 0.0, 0.0]}  # fmt: skip
    (workdir / "results.json").write_text(json.dumps({"test": {}, "predictions": [pred]}))
    assert run_artifacts.main([f"--workdir={workdir}", f"--images_dir={images}"]) == 0
    assert "1 overlays in" in capsys.readouterr().out
    index = run_artifacts.read_index(workdir)
    assert [e["image_size"] for e in index["images"]] == [[52, 61]]


# ---------------------------------------------------------------------------------------------
# On a trained model: the maps follow the evidence.

CELL = 40  # a synthetic cell drawn at 40 px, placed anywhere in the 64 px input


def _place(cell, nucleus, oy, ox):
    """`cell` (CELL x CELL) pasted at (oy, ox) on a SIZE x SIZE slide of its own background;
    returns (image, the nucleus centre (y, x) in the image)."""
    canvas = np.empty((SIZE, SIZE, 3), np.uint8)
    canvas[...] = cell[0, 0]
    canvas[oy : oy + CELL, ox : ox + CELL] = cell
    return canvas, nucleus.mean(0)[::-1] + (oy, ox)


def _placed_cells(n, seed):
    """n synthetic cells (class 1: large nucleus, class 0: small) at random places:
    (images, labels, nucleus centres [n, 2] (y, x))."""
    cells, labels, nucs, _ = draw_cells(n, CELL, seed=seed)
    offsets = np.random.default_rng(seed + 1000).integers(0, SIZE - CELL + 1, (n, 2))
    placed = [_place(c, nuc, oy, ox) for c, nuc, (oy, ox) in zip(cells, nucs, offsets, strict=True)]
    return np.stack([p[0] for p in placed]), labels, np.stack([p[1] for p in placed])


@pytest.fixture(scope="module")
def trained():
    two = Taxonomy.bare(["small nucleus", "large nucleus"])
    meta = _metadata(tiny_model(num_classes=2), resize="stretch", taxonomy=two)
    x, y, _ = _placed_cells(256, 0)
    model = train_tiny(x, y, meta.preprocessing, steps=80)
    return model, meta


def _peaks(model, meta, images, centres, stage=None):
    """(predictions, map peaks [n, 2] (y, x), peak-to-nucleus distances, where)."""
    fns = saliency.ModelFunctions(model)
    pred = np.asarray(fns.predict(preprocessing.normalize(images, meta.preprocessing)))
    cells = [Cell(i, images[i], 1, int(pred[i])) for i in range(len(images))]
    maps, where = run_artifacts.explain_cells(model, meta.preprocessing, cells, stage=stage)
    peaks = np.asarray([np.unravel_index(np.argmax(m), m.shape) for m in maps])
    return pred, peaks, np.linalg.norm(peaks - centres, axis=1), where


def test_maps_follow_the_nucleus_on_a_trained_model(trained):
    model, meta = trained
    # One large-nucleus cell, at the top left and at the bottom right of the input.
    cells, labels, nucs, _ = draw_cells(2, CELL, seed=7)
    assert labels[1] == 1
    far = SIZE - CELL
    pair = [_place(cells[1], nucs[1], 0, 0), _place(cells[1], nucs[1], far, far)]
    images, centres = np.stack([p[0] for p in pair]), np.stack([p[1] for p in pair])
    pred, peaks, dist, where = _peaks(model, meta, images, centres)
    assert where["layer"] == "layer2" and where["map_size"] == [8, 8]
    assert list(pred) == [1, 1], "the tiny model did not learn the synthetic task"
    assert np.linalg.norm(peaks[0] - peaks[1]) > 16, peaks  # the map moved with the cell
    assert dist.max() < 12, (peaks, centres)  # each peak on its nucleus (a map cell: 8 px)

    # Over many large-nucleus cells anywhere in the input, layer2's map lands on the nucleus;
    # the last stage's 2x2 map (what the demo showed before) cannot.
    test, labels, centres = _placed_cells(48, 5)
    big = labels == 1
    pred, _, dist, _ = _peaks(model, meta, test[big], centres[big])
    assert np.mean(pred == 1) >= 0.9
    _, _, dist4, _ = _peaks(model, meta, test[big], centres[big], stage=4)
    assert np.median(dist) < 8 and np.median(dist) < np.median(dist4) / 2, (dist, dist4)
