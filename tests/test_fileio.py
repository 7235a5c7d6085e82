"""Atomic writes: the file (or tree) appears whole or not at all, and nothing is left behind."""

import json
import os

import numpy as np
import pytest

from sipak_jax import fileio


def test_json_is_strict_and_numpy_aware(tmp_path):
    path = tmp_path / "a.json"
    fileio.atomic_write_json(path, {"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(2)})
    assert json.loads(path.read_text()) == {"n": 3, "x": 0.5, "a": [0, 1]}
    with pytest.raises(ValueError, match="JSON"):
        fileio.atomic_write_json(path, {"x": float("nan")})
    assert json.loads(path.read_text())["n"] == 3  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    fileio.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), fileio.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "tree"
    with pytest.raises(RuntimeError), fileio.atomic_dir(target) as tmp:
        with open(os.path.join(tmp, "a"), "w") as f:
            f.write("x")
        assert not target.exists()
        raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []
    with fileio.atomic_dir(target) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        with open(os.path.join(tmp, "sub", "b"), "w") as f:
            f.write("y")
    assert (target / "sub" / "b").read_text() == "y" and os.listdir(tmp_path) == ["tree"]
