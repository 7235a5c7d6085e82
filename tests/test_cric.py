"""The CRIC Cervix reader and TFDS builder on stand-ins written in the official layout.

The stand-in is what the CRIC platform's download holds: PNG images and
`classifications.csv` (`image_id,image_filename,image_doi,cell_id,bethesda_system,nucleus_x,
nucleus_y`, NILM written "Negative for intraepithelial lesion") and `classifications.json`.
Crops are checked against the image itself: centred on the nucleus, and padded with the
image's border colour (`sipak_jax.preprocessing.border_colour`, the project's one statistic)
where they reach past the edge.
"""

import csv
import json
import os

import cv2
import numpy as np
import pytest

from sipak_jax.preprocessing import border_colour
from tfds_sipakmed import cric_layout, datasets, folds
from tfds_sipakmed.taxonomy import CRIC

NAMES = ["Negative for intraepithelial lesion", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC"]
HEADER = ["image_id", "image_filename", "image_doi", "cell_id", "bethesda_system"]
HEADER += ["nucleus_x", "nucleus_y"]
W, H, CROP = 64, 48, 16


def write_standin(root, num_images=6, seed=0, subdir="images"):
    """Images and both tables; returns the rows as dicts (with the image array under 'array')."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, subdir), exist_ok=True)
    rows, cell = [], 100
    for i in range(num_images):
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        name = f"{i:032x}.png"
        cv2.imwrite(os.path.join(root, subdir, name), image[..., ::-1])
        points = [(20 + i, 20), (40, 30 - i)]
        if i == 0:
            points += [(2, 3), (W - 1, H - 1), (W, H)]  # near and at the border
        for j, (x, y) in enumerate(points):
            cell += 1
            label = NAMES[(i + j) % len(NAMES)]
            rows.append(
                dict(zip(HEADER, [1000 + i, name, f"doi/{i}", cell, label, x, y], strict=True))
                | {"array": image}
            )
    _write_tables(root, rows)
    return rows


def _write_tables(root, rows):
    with open(os.path.join(root, "classifications.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for r in rows:
            w.writerow([r[k] for k in HEADER])
    images = {}
    for r in rows:
        img = images.setdefault(
            r["image_id"],
            {
                "image_id": r["image_id"],
                "image_doi": r["image_doi"],
                "image_name": r["image_filename"],
                "classifications": [],
            },
        )
        img["classifications"].append(
            {k: r[k] for k in ("cell_id", "bethesda_system", "nucleus_x", "nucleus_y")}
        )
    with open(os.path.join(root, "classifications.json"), "w") as f:
        json.dump(list(images.values()), f)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cric"))
    return root, write_standin(root)


def _reader(root, **options):
    return datasets.reader("cric", root, {"log": lambda s: None, "crop_size": CROP, **options})


def _expected_crop(image, x, y):
    padded = np.empty((H + 2 * CROP, W + 2 * CROP, 3), np.uint8)
    padded[...] = border_colour(image)
    padded[CROP : CROP + H, CROP : CROP + W] = image
    x, y = min(x, W - 1) + CROP, min(y, H - 1) + CROP
    return padded[y - CROP // 2 : y + CROP // 2, x - CROP // 2 : x + CROP // 2]


def test_every_cell_cropped_around_its_nucleus(standin):
    root, rows = standin
    reader = _reader(root)
    refs = reader.list_cells()
    assert len(refs) == len(rows) and [r.file_name for r in refs] == sorted(
        r.file_name for r in refs
    )
    by_cell = {str(r["cell_id"]): r for r in rows}
    padded = 0
    for ref in refs:
        ex = reader.load_cell(ref)
        row = by_cell[ex["cell_id"]]
        assert ex["label"] == NAMES.index(row["bethesda_system"])
        assert ex["group_id"] == str(row["image_id"])
        assert ex["file_name"] == f"images/{row['image_filename']}#cell{row['cell_id']}"
        x, y = row["nucleus_x"], row["nucleus_y"]
        assert ex["image"].shape == (CROP, CROP, 3)
        np.testing.assert_array_equal(ex["image"], _expected_crop(row["array"], x, y))
        # centred: the nucleus pixel is the crop's centre pixel
        np.testing.assert_array_equal(
            ex["image"][CROP // 2, CROP // 2], row["array"][min(y, H - 1), min(x, W - 1)]
        )
        padded += ex["border_padded"]
        near = not (CROP // 2 <= x <= W - CROP // 2 and CROP // 2 <= y <= H - CROP // 2)
        assert ex["border_padded"] == near, (x, y)
        assert not ex["annotation_valid"] and ex["annotation_issue"] == cric_layout.NO_MASK_ISSUE
    assert padded == 3  # the border nuclei are kept, and reported


def test_json_table_gives_the_same_cells(standin, tmp_path):
    root, rows = standin
    write_standin(str(tmp_path), subdir="nested/png")
    os.remove(tmp_path / "classifications.csv")
    a, b = _reader(root), _reader(str(tmp_path))
    ra, rb = a.list_cells(), b.list_cells()
    assert [(r.group_id, r.label) for r in ra] == [(r.group_id, r.label) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        np.testing.assert_array_equal(a.load_cell(x)["image"], b.load_cell(y)["image"])


def test_crop_size_option_and_default():
    assert cric_layout.crop_size_of({}) == cric_layout.DEFAULT_CROP_SIZE == 90
    assert cric_layout.crop_size_of({"crop_size": "32"}) == 32
    for bad in (0, 1, "abc", 12.5):
        with pytest.raises(datasets.DatasetError, match="crop_size"):
            cric_layout.crop_size_of({"crop_size": bad})


def test_ring_median_is_the_projects_border_colour():
    rng = np.random.default_rng(3)
    for shape in ((5, 7, 3), (48, 64, 3), (2, 9, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(cric_layout.ring_median(image), border_colour(image))


def _bad(tmp_path, mutate):
    rows = write_standin(str(tmp_path))
    mutate(rows)
    _write_tables(str(tmp_path), rows)
    os.remove(tmp_path / "classifications.json")
    reader = _reader(str(tmp_path))
    return [reader.load_cell(r) for r in reader.list_cells()]


def test_unknown_label_names_the_row(tmp_path):
    def mutate(rows):
        rows[4]["bethesda_system"] = "AGC"

    with pytest.raises(datasets.DatasetError, match=r"classifications.csv:6: unknown .*'AGC'"):
        _bad(tmp_path, mutate)


def test_missing_image_names_the_file_and_row(tmp_path):
    def mutate(rows):
        os.remove(tmp_path / "images" / rows[-1]["image_filename"])

    with pytest.raises(datasets.DatasetError, match=r"00005\.png \(.*classifications.csv:\d+\)"):
        _bad(tmp_path, mutate)


def test_nucleus_outside_the_image_names_the_row(tmp_path):
    def mutate(rows):
        rows[2]["nucleus_x"] = W + 5

    with pytest.raises(datasets.DatasetError, match=r"classifications.csv:4: nucleus .* outside"):
        _bad(tmp_path, mutate)


def test_no_table_says_what_to_download(tmp_path):
    with pytest.raises(datasets.DatasetError, match="classifications.csv"):
        _reader(str(tmp_path)).list_cells()


def test_no_image_in_two_folds(tmp_path):
    write_standin(str(tmp_path), num_images=15, seed=1)
    refs = _reader(str(tmp_path)).list_cells()
    for config in ("grouped",):
        assignment = folds.assign_folds(refs, config, class_names=CRIC.class_names)
        fold_of = {}
        for ref, f in zip(refs, assignment, strict=True):
            assert fold_of.setdefault(ref.group_id, f) == f, ref.group_id
        assert sorted(set(assignment)) == list(range(folds.NUM_FOLDS))


def test_published_counts_are_the_11534_cells():
    assert sum(cric_layout.PUBLISHED_COUNTS.values()) == 11534
    assert tuple(cric_layout.PUBLISHED_COUNTS) == CRIC.class_names


@pytest.mark.slow
def test_tfds_build_matches_the_reader(standin, tmp_path):
    import tensorflow_datasets as tfds

    import tfds_sipakmed

    root, rows = standin
    builder = tfds_sipakmed.build(root, str(tmp_path), dataset="cric", options={"crop_size": CROP})
    assert builder.builder_config.name == f"grouped-crop{CROP}"
    # the training side finds the build under the same name (no TFDS needed to compute it)
    assert datasets.tfds_config_name("cric", root, "grouped", {"crop_size": CROP}) == (
        builder.builder_config.name
    )
    reread = tfds.builder_from_directory(builder.data_dir)
    assert reread.info.metadata["taxonomy"] == CRIC.to_dict()
    assert reread.info.metadata["crop_size"] == CROP
    reader = _reader(root)
    expected = {r.file_name: reader.load_cell(r) for r in reader.list_cells()}
    src = reread.as_data_source()
    seen = {}
    for split in src:
        for ex in src[split]:
            name = ex["file_name"].decode()
            seen.setdefault(ex["group_id"].decode(), set()).add(split)
            want = expected.pop(name)
            np.testing.assert_array_equal(ex["image"], want["image"])
            assert (
                ex["label"] == want["label"] and bool(ex["border_padded"]) == want["border_padded"]
            )
    assert not expected
    assert all(len(s) == 1 for s in seen.values())
    _same_through_both_sources(root, str(tmp_path), builder.builder_config.name)


def _same_through_both_sources(root, data_dir, config):
    """Training reads the build and the raw tree alike: same examples, same folds."""
    from sipak_jax.input_pipeline import sources

    opts = {"crop_size": CROP}
    raw = sources.open_source(None, root, "grouped", dataset="cric", options=opts, log=print)
    built = sources.open_source(data_dir, None, config, dataset="cric")
    assert len(raw) == len(built) and raw.taxonomy == built.taxonomy == CRIC
    for i in range(len(raw)):
        a, b = raw[i], built[i]
        assert (a["file_name"], a["label"], a["group_id"]) == (
            b["file_name"],
            b["label"],
            b["group_id"],
        )
        np.testing.assert_array_equal(a["image"], b["image"])
        assert bool(a["border_padded"]) == bool(b["border_padded"])
