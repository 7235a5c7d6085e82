"""The Herlev reader and TFDS builder on stand-ins written in the official layout.

The stand-in is what smear2005.zip holds: `smear2005/New database pictures/<class>/NAME.BMP`
with its segmentation `NAME-d.bmp`, an 8-bit palette BMP in the documented colours (red
background, dark blue cytoplasm, bright blue nucleus). Each cell's regions are drawn at known
places, so the masks the reader derives are checked against what was drawn.
"""

import functools
import os
import zipfile

import cv2
import numpy as np
import pytest
from PIL import Image

from tfds_sipakmed import datasets, folds, herlev_layout
from tfds_sipakmed.taxonomy import HERLEV

ROOT = os.path.join("smear2005", "New database pictures")
PALETTE = [(0, 0, 128), (255, 0, 0), (0, 0, 255)]  # cytoplasm, background, nucleus (indices)


def _cell(rng, index: int):
    """(image RGB, segmentation palette indices, nucleus mask, cytoplasm mask) of a cell."""
    h, w = 20 + index % 5, 26 + index % 3
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    seg = np.full((h, w), 1, np.uint8)
    top, left = 2 + index % 3, 3
    seg[top : h - 2, left : w - 3] = 0
    seg[top + 3 : top + 8, left + 4 : left + 10 + index % 4] = 2
    return image, seg, seg == 2, seg == 0


def _write_cell(folder, name, image, seg):
    cv2.imwrite(os.path.join(folder, f"{name}.BMP"), image[..., ::-1])
    pal = Image.fromarray(seg, mode="P")
    pal.putpalette([v for rgb in PALETTE for v in rgb] + [0] * (768 - 3 * len(PALETTE)))
    pal.save(os.path.join(folder, f"{name}-d.bmp"))


def write_standin(root, per_class=2, seed=0, folder_names=None):
    """The official tree under `root`; returns {file_name: (label, image, nucleus, cytoplasm)}."""
    rng = np.random.default_rng(seed)
    truth, k = {}, 0
    for label, cls in enumerate(HERLEV.class_names):
        folder = os.path.join(root, ROOT, (folder_names or {}).get(cls, cls))
        os.makedirs(folder)
        for i in range(per_class):
            name = f"1539{k:05d}-1539{k // 3:05d}-{i + 1:03d}"
            image, seg, nuc, cyt = _cell(rng, k)
            _write_cell(folder, name, image, seg)
            truth[f"{cls}/{name}.BMP"] = (label, image, nuc, cyt)
            k += 1
    return truth


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("herlev"))
    return root, write_standin(root)


def _read(root, options=None):
    reader = datasets.reader("herlev", root, {"log": lambda s: None, **(options or {})})
    return {r.file_name: reader.load_cell(r) for r in reader.list_cells()}


def test_every_cell_with_its_label_and_masks_from_the_segmentation(standin):
    root, truth = standin
    got = _read(root)
    assert sorted(got) == sorted(truth) and len(got) == 14
    for name, (label, image, nuc, cyt) in truth.items():
        ex = got[name]
        assert ex["label"] == label and HERLEV.class_names[label] == name.split("/")[0]
        np.testing.assert_array_equal(ex["image"], image)
        np.testing.assert_array_equal(ex["nucleus_mask"], nuc)
        np.testing.assert_array_equal(ex["cytoplasm_mask"], cyt)
        assert ex["annotation_valid"] and ex["annotation_issue"] == ""
        assert ex["group_id"] == name  # no slide ids: each cell its own group


def test_zip_and_renamed_folders_give_the_same_cells(standin, tmp_path):
    root, truth = standin
    archive = tmp_path / "zip" / "smear2005.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for dirpath, _, files in os.walk(os.path.join(root, "smear2005")):
            for f in files:
                path = os.path.join(dirpath, f)
                z.write(path, os.path.relpath(path, root).replace(os.sep, "/"))
    renamed = {"normal_superficiel": "Normal Superficial", "carcinoma_in_situ": "CARCINOMA_IN_SITU"}
    write_standin(str(tmp_path / "renamed"), folder_names=renamed)
    reference = _read(root)
    for other in (_read(str(archive.parent)), _read(str(tmp_path / "renamed"))):
        assert sorted(other) == sorted(reference)
        for name, ex in reference.items():
            for key in ("image", "label", "nucleus_mask", "cytoplasm_mask"):
                np.testing.assert_array_equal(other[name][key], ex[key], err_msg=f"{name} {key}")


def test_missing_segmentation_is_reported_and_the_cell_kept(tmp_path):
    truth = write_standin(str(tmp_path))
    name = sorted(truth)[3]
    os.remove(os.path.join(tmp_path, ROOT, name.replace(".BMP", "-d.bmp")))
    logs = []
    got = _read(str(tmp_path), {"log": logs.append})
    ex = got[name]
    assert not ex["annotation_valid"] and "-d.bmp" in ex["annotation_issue"]
    assert not ex["nucleus_mask"].any()
    assert any("1 cells have no -d.bmp" in line for line in logs), logs


def test_undocumented_colours_make_the_annotation_invalid(tmp_path):
    truth = write_standin(str(tmp_path))
    name = sorted(truth)[0]
    seg = np.zeros((20, 26, 3), np.uint8)
    seg[...] = (0, 255, 0)  # green: not a documented colour
    cv2.imwrite(os.path.join(tmp_path, ROOT, name.replace(".BMP", "-d.bmp")), seg)
    ex = _read(str(tmp_path))[name]
    assert not ex["annotation_valid"]
    assert (
        "none of the documented colours" in ex["annotation_issue"] or "px" in ex["annotation_issue"]
    )


def test_clear_errors(tmp_path):
    with pytest.raises(datasets.DatasetError, match="smear2005.zip"):
        _read(str(tmp_path))
    truth = write_standin(str(tmp_path / "a"))
    os.rename(
        os.path.join(tmp_path, "a", ROOT, "severe_dysplastic"),
        os.path.join(tmp_path, "a", ROOT, "unrelated"),
    )
    with pytest.raises(datasets.DatasetError, match=r"severe_dysplastic"):
        _read(str(tmp_path / "a"))
    truth = write_standin(str(tmp_path / "b"))
    broken = sorted(truth)[1]
    with open(os.path.join(tmp_path, "b", ROOT, broken), "wb") as f:
        f.write(b"BM not really")
    with pytest.raises(datasets.DatasetError, match=broken):
        _read(str(tmp_path / "b"))
    with pytest.raises(datasets.DatasetError, match="group_regex"):
        _read(str(tmp_path / "b"), {"group_regex": "^(x+)-"})


def test_folds_keep_groups_together(standin):
    root, _ = standin
    for options in ({}, {"group_regex": r"^\d+-(\d+)-"}):
        reader = datasets.reader("herlev", root, {"log": lambda s: None, **options})
        refs = reader.list_cells()
        assignment = folds.assign_folds(refs, "grouped", class_names=HERLEV.class_names)
        fold_of = {}
        for ref, f in zip(refs, assignment, strict=True):
            assert fold_of.setdefault(ref.group_id, f) == f, ref.group_id
        assert sorted(set(assignment)) == list(range(folds.NUM_FOLDS))
    assert len(fold_of) < len(refs)  # the expression did group cells


def test_published_counts_are_the_917_cells():
    assert sum(herlev_layout.PUBLISHED_COUNTS.values()) == 917
    assert tuple(herlev_layout.PUBLISHED_COUNTS) == HERLEV.class_names


@pytest.mark.slow
def test_tfds_build_matches_the_reader(standin, tmp_path):
    import tensorflow_datasets as tfds

    import tfds_sipakmed

    root, truth = standin
    build_cls = functools.partial(tfds.builder_cls, "herlev")
    builder = tfds_sipakmed.build(root, str(tmp_path), dataset="herlev")
    assert builder.builder_config.name == "grouped"
    assert datasets.tfds_config_name("herlev", root, "grouped") == "grouped"
    regex = {"group_regex": r"^(\d+)-"}
    assert datasets.tfds_config_name("herlev", root, "random_cells", regex) == (
        build_cls().config_for(root, "random_cells", regex).name
    )
    assert builder.info.metadata["taxonomy"] == HERLEV.to_dict()
    assert builder.info.metadata["grouping"]["rule"] == "file"
    reread = tfds.builder_from_directory(builder.data_dir)
    src = reread.as_data_source()
    seen = {}
    for split in src:
        for ex in src[split]:
            name = ex["file_name"].decode()
            seen[name] = split
            label, image, nuc, cyt = truth[name]
            assert ex["label"] == label and ex["group_id"].decode() == name
            np.testing.assert_array_equal(ex["image"], image)
            np.testing.assert_array_equal(ex["nucleus_mask"], nuc)
            np.testing.assert_array_equal(ex["cytoplasm_mask"], cyt)
    assert sorted(seen) == sorted(truth)
    assert reread.info.metadata["taxonomy"] == HERLEV.to_dict()
    _same_through_both_sources(root, str(tmp_path))


def _same_through_both_sources(root, data_dir):
    """Training reads the build and the raw tree alike: same examples, folds and masks."""
    from sipak_jax.input_pipeline import sources

    raw = sources.open_source(None, root, "grouped", dataset="herlev", log=lambda s: None)
    built = sources.open_source(data_dir, None, "grouped", dataset="herlev")
    assert len(raw) == len(built) == 14 and raw.taxonomy == built.taxonomy == HERLEV
    for i in range(len(raw)):
        a, b = raw[i], built[i]
        assert (a["file_name"], a["label"], a["group_id"]) == (
            b["file_name"],
            b["label"],
            b["group_id"],
        )
        for key in ("image", "nucleus_mask", "cytoplasm_mask"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{a['file_name']} {key}")


def test_masks_give_the_contours_regions_for_saliency():
    """`metrics.mask_regions` (Herlev's masks) and `metrics.cell_masks` (SIPaKMeD's contours)
    agree where the masks are the contours' own rasterisation, and masks map into the
    padded, resized input frame like the points do."""
    from sipak_jax import saliency_eval
    from sipak_jax.saliency import metrics

    nuc_xy = np.array([[15, 12], [24, 14], [22, 23], [13, 21]], np.float32)
    cyt_xy = np.array([[3, 4], [36, 2], [37, 35], [5, 37]], np.float32)
    nuc, cyt = metrics._fill(nuc_xy, 40), metrics._fill(cyt_xy, 40)
    from_contours = metrics.cell_masks(nuc_xy, cyt_xy, (40, 40), 40)
    from_masks = metrics.mask_regions(nuc, cyt & ~nuc, 40)
    for region in metrics.REGIONS:
        np.testing.assert_array_equal(from_masks[region], from_contours[region], err_msg=region)

    crop_nuc = np.zeros((10, 20), bool)  # h 10, w 20: padded to 20 x 20 (5 rows above)
    crop_nuc[2:5, 6:10] = True
    frame = metrics.mask_regions(crop_nuc, np.ones((10, 20), bool), 40, "pad")
    expected = np.zeros((40, 40), bool)
    expected[14:20, 12:20] = True  # rows (2..4 + 5) * 2, cols 6..9 * 2
    np.testing.assert_array_equal(frame["nucleus"], expected)
    assert frame["background"][:10].all() and not frame["background"][10:30].any()

    # saliency_eval takes an example's masks over its (absent) contours, and skips neither-nor
    empty = np.zeros((0, 2), np.float32)
    got = saliency_eval._regions(0, [empty], [empty], [(10, 20)], [crop_nuc], [crop_nuc], 40, "pad")
    np.testing.assert_array_equal(got["nucleus"], expected)
    assert saliency_eval._regions(0, [empty], [empty], [(10, 20)], None, None, 40, "pad") is None
