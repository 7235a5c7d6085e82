"""`tfds_sipakmed.layout`: the .dat parser on the real format, BMP reading, annotation checks,
finding classes in flat / nested / archive manual dirs, and every bad input naming its file.
No TensorFlow needed."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tfds_sipakmed import layout, synthetic
from tfds_sipakmed.layout import SipakmedError
from tfds_sipakmed.taxonomy import SIPAKMED

CLASS_NAMES = SIPAKMED.class_names

# Modelled on the real cluster-level files (Superficial-Intermediate cluster 007): five
# significant digits, floats and integers mixed, first vertex repeated, LF endings.
REAL_CYT = "1146.5,489\n1133.5,509\n1123.5,525\n1103.5,548\n1157.5,463\n1146.5,489\n"
REAL_NUC = "1108.3,366.25\n1100.3,370.25\n1095.3,374.25\n1831,466\n1108.3,366.25\n"


def test_parse_dat_real_format():
    cyt = layout.parse_dat(REAL_CYT)
    assert cyt.dtype == np.float32 and cyt.shape == (6, 2)
    np.testing.assert_array_equal(cyt[0], [1146.5, 489])
    np.testing.assert_array_equal(cyt[-1], cyt[0])  # kept as in the file
    nuc = layout.parse_dat(REAL_NUC)
    np.testing.assert_allclose(
        nuc[:4], [[1108.3, 366.25], [1100.3, 370.25], [1095.3, 374.25], [1831, 466]]
    )


def test_parse_dat_tolerates_crlf_blank_lines_negatives_and_empty():
    np.testing.assert_array_equal(
        layout.parse_dat("1.5,2\r\n-3,4.25\r\n\r\n"), np.array([[1.5, 2], [-3, 4.25]], np.float32)
    )
    assert layout.parse_dat("").shape == (0, 2)
    assert layout.parse_dat("\n").shape == (0, 2)
    np.testing.assert_array_equal(layout.parse_dat("1e2,5"), [[100, 5]])


@pytest.mark.parametrize("bad", ["1146.5;489", "1146.5", "a,b", "1,2,3", "1146.5 489", "nan,1"])
def test_parse_dat_malformed_names_file_and_line(bad):
    with pytest.raises(SipakmedError, match=r"001_01_nuc\.dat, line 2"):
        layout.parse_dat(f"1,2\n{bad}\n3,4\n", "im_X/CROPPED/001_01_nuc.dat")


def test_read_dat_non_ascii(tmp_path):
    p = tmp_path / "001_01_cyt.dat"
    p.write_bytes(b"\xff\xfe1,2\n")
    with pytest.raises(SipakmedError, match="001_01_cyt.dat"):
        layout.read_dat(str(p))


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    out = tmp_path_factory.mktemp("flat")
    synthetic.write_synthetic(str(out), 3, seed=5, scale=0.15, bad_annotation_rate=0.3)
    return str(out)


def test_read_bmp_matches_pillow(flat):
    p = os.path.join(flat, "im_Koilocytotic", "CROPPED", "001_01.bmp")
    img = layout.read_bmp(p)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    np.testing.assert_array_equal(img, np.asarray(Image.open(p).convert("RGB")))


def test_truncated_and_garbage_bmp(tmp_path, flat):
    src = os.path.join(flat, "im_Koilocytotic", "CROPPED", "001_01.bmp")
    data = open(src, "rb").read()
    trunc = tmp_path / "001_01.bmp"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(SipakmedError, match=r"001_01\.bmp.*truncated"):
        layout.read_bmp(str(trunc))
    junk = tmp_path / "002_01.bmp"
    junk.write_bytes(b"not an image at all" * 10)
    with pytest.raises(SipakmedError, match=r"002_01\.bmp.*not a BMP"):
        layout.read_bmp(str(junk))


def test_check_annotation():
    square = np.array([[0, 0], [40, 0], [40, 40], [0, 40]], np.float32)
    inner = square * 0.25 + 10
    assert layout.check_annotation(square, inner, 50, 50) == ""
    assert layout.check_annotation(square, np.zeros((0, 2), np.float32), 50, 50) == (
        "empty nucleus contour"
    )
    assert layout.check_annotation(square[:2], inner, 50, 50) == "empty cytoplasm contour"
    assert layout.check_annotation(square, inner + 45, 200, 200) == "nucleus outside the cell"
    assert layout.check_annotation(square, inner - 15, 50, 50) == "nucleus outside the crop"
    # a nucleus poking a little over the cell border is still fine
    assert layout.check_annotation(square, inner + (20.5, 5), 50, 50) == ""


def test_iter_cells_keys_types_and_invalid_annotations(flat):
    cells = list(layout.iter_cells(flat, log=lambda s: None))
    assert len(cells) == 15
    assert [c["file_name"] for c in cells] == sorted(c["file_name"] for c in cells)
    c = cells[0]
    assert c["file_name"] == b"im_Dyskeratotic/CROPPED/001_01.bmp"
    assert c["cluster_id"] == b"Dyskeratotic/001" and c["cell_index"] == 1
    assert (c["label"], c["label_3class"], c["label_2class"]) == (0, 2, 1)
    assert c["image"].dtype == np.uint8 and c["nucleus_contour"].dtype == np.float32
    assert isinstance(c["annotation_valid"], bool)
    invalid = [c for c in cells if not c["annotation_valid"]]
    assert invalid and all(c["annotation_issue"] for c in invalid)
    assert all(c["annotation_issue"] == b"" for c in cells if c["annotation_valid"])
    assert {c["label"] for c in cells} == set(range(5))


def _nest(src, dst, classes):
    for cls in classes:
        shutil.copytree(os.path.join(src, f"im_{cls}"), os.path.join(dst, f"im_{cls}", f"im_{cls}"))


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_flat_nested_and_archives_give_identical_cells(tmp_path, flat):
    quiet = {"log": lambda s: None}
    ref = list(layout.iter_cells(flat, **quiet))
    nested = tmp_path / "nested"
    _nest(flat, nested, CLASS_NAMES)
    _same(ref, list(layout.iter_cells(str(nested), **quiet)))
    arch = tmp_path / "arch"
    synthetic.write_synthetic(
        str(arch), 3, seed=5, scale=0.15, bad_annotation_rate=0.3, archives=True
    )
    sums = str(arch / synthetic.SYNTHETIC_CHECKSUMS)
    _same(ref, list(layout.iter_cells(str(arch), archive_checksums=sums, **quiet)))
    # a mix: two archives, two nested folders, one flat folder
    mix = tmp_path / "mix"
    mix.mkdir()
    for cls in CLASS_NAMES[:2]:
        shutil.copy(arch / f"im_{cls}.7z", mix)
    _nest(flat, mix, CLASS_NAMES[2:4])
    shutil.copytree(os.path.join(flat, f"im_{CLASS_NAMES[4]}"), mix / f"im_{CLASS_NAMES[4]}")
    _same(ref, list(layout.iter_cells(str(mix), archive_checksums=sums, **quiet)))


def test_missing_and_empty_manual_dir(tmp_path):
    with pytest.raises(SipakmedError, match=r"does not exist.*im_Dyskeratotic\.7z.*sipakmed\.html"):
        layout.find_sources(str(tmp_path / "nope"))
    with pytest.raises(SipakmedError, match=r"is empty.*im_Parabasal\.7z.*sipakmed\.html"):
        layout.find_sources(str(tmp_path))


def test_missing_class(tmp_path, flat):
    m = tmp_path / "m"
    shutil.copytree(flat, m)
    shutil.rmtree(m / "im_Parabasal")
    with pytest.raises(SipakmedError, match=r"lacks class\(es\) Parabasal.*im_Parabasal\.7z"):
        layout.find_sources(str(m))


def test_folder_without_cropped_and_archive_plus_folder(tmp_path, flat):
    m = tmp_path / "m"
    shutil.copytree(flat, m)
    shutil.rmtree(m / "im_Metaplastic" / "CROPPED")
    with pytest.raises(SipakmedError, match=r"im_Metaplastic has no CROPPED"):
        layout.find_sources(str(m))
    m2 = tmp_path / "m2"
    shutil.copytree(flat, m2)
    (m2 / "im_Metaplastic.7z").write_bytes(b"x")
    with pytest.raises(SipakmedError, match=r"both .*im_Metaplastic\.7z and the folder"):
        layout.find_sources(str(m2))


def test_missing_contour_file_is_named(tmp_path, flat):
    m = tmp_path / "m"
    shutil.copytree(flat, m)
    os.remove(m / "im_Parabasal" / "CROPPED" / "001_02_nuc.dat")
    with pytest.raises(SipakmedError, match=r"001_02_nuc\.dat is missing"):
        layout.list_cells(str(m), log=lambda s: None)


def test_unexpected_files_are_reported_not_dropped_silently(tmp_path, flat):
    m = tmp_path / "m"
    shutil.copytree(flat, m)
    (m / "im_Parabasal" / "CROPPED" / "Thumbs.db").write_bytes(b"x")
    seen = []
    refs = layout.list_cells(str(m), log=seen.append)
    assert len(refs) == 15
    assert any("Thumbs.db" in s and "ignoring 1 file" in s for s in seen)


def test_cluster_images_never_become_cells(flat):
    refs = layout.list_cells(flat, log=lambda s: None)
    assert all("/CROPPED/" in r.file_name for r in refs)
    assert all(os.path.dirname(r.bmp_path).endswith("CROPPED") for r in refs)


def test_checksum_mismatch_names_the_archive(tmp_path, monkeypatch):
    monkeypatch.delenv(layout.ENV_ARCHIVE_CHECKSUMS, raising=False)
    synthetic.write_synthetic(str(tmp_path), 1, scale=0.15, archives=True)
    with pytest.raises(
        SipakmedError, match=r"im_Dyskeratotic\.7z: sha256 .* differs .*sipakmed\.html"
    ):
        list(layout.iter_cells(str(tmp_path), log=lambda s: None))
    # the explicit escape hatches: a dict, a file, the environment variable
    sums = layout.read_checksums_file(str(tmp_path / synthetic.SYNTHETIC_CHECKSUMS))
    assert len(list(layout.iter_cells(str(tmp_path), archive_checksums=sums, log=print))) == 5
    monkeypatch.setenv(layout.ENV_ARCHIVE_CHECKSUMS, str(tmp_path / synthetic.SYNTHETIC_CHECKSUMS))
    assert len(list(layout.iter_cells(str(tmp_path), log=lambda s: None))) == 5
    # a wrong override is still an error
    bad = dict(sums, **{"im_Parabasal.7z": "0" * 64})
    with pytest.raises(SipakmedError, match=r"im_Parabasal\.7z: sha256"):
        list(layout.iter_cells(str(tmp_path), archive_checksums=bad, log=lambda s: None))


def test_published_checksums_are_the_notes():
    sums = layout.published_checksums()
    assert sums["im_Parabasal.7z"] == (
        548667699,
        "13e9c29f016a5b83731e038cfe518671a7815df28836dee706acba6ecd2369a8",
    )
    assert sorted(sums) == sorted(layout.ARCHIVE_NAMES)


def test_corrupt_archive_with_matching_override(tmp_path):
    synthetic.write_synthetic(str(tmp_path), 1, scale=0.15, archives=True)
    p = tmp_path / "im_Koilocytotic.7z"
    p.write_bytes(p.read_bytes()[:100])
    sums = layout.read_checksums_file(str(tmp_path / synthetic.SYNTHETIC_CHECKSUMS))
    sums["im_Koilocytotic.7z"] = layout.sha256_file(str(p))
    with pytest.raises(SipakmedError, match=r"im_Koilocytotic\.7z: cannot read"):
        list(layout.iter_cells(str(tmp_path), archive_checksums=sums, log=lambda s: None))


def test_count_report_warns_on_unpublished_counts():
    lines, warnings = layout.count_report(layout.PUBLISHED_COUNTS)
    assert not warnings and "4049" in lines[-1]
    _, warnings = layout.count_report(dict(layout.PUBLISHED_COUNTS, Parabasal=700))
    assert len(warnings) == 1 and "Parabasal has 700" in warnings[0] and "787" in warnings[0]


def test_tf_free_modules_import_without_tfds_or_tensorflow(tmp_path):
    """GPU machines lack tensorflow_datasets and TensorFlow: the helpers must still work."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'py7zr'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import tfds_sipakmed\n"
        "from tfds_sipakmed import folds, layout, synthetic\n"
        f"synthetic.write_synthetic({str(tmp_path)!r}, 2, scale=0.15)\n"
        f"cells = list(layout.iter_cells({str(tmp_path)!r}, log=lambda s: None))\n"
        "print(len(cells), sorted(set(folds.assign_folds(cells))))\n"
        "assert not hasattr(tfds_sipakmed, 'Builder')\n"
    )
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "10 [0, 1, 2, 3, 4]"
