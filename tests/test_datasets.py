"""The dataset registry (`tfds_sipakmed.datasets`) and the dataset-agnostic folds: the names,
the errors, SIPaKMeD through the registry, and SIPaKMeD's folds pinned to the first release's
assignment. No TensorFlow needed."""

import collections
import hashlib
import json
import os
import sys

import numpy as np
import pytest

from tfds_sipakmed import datasets, folds, layout, synthetic
from tfds_sipakmed.taxonomy import SIPAKMED

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_folds import fake_cells  # noqa: E402

# sha256 of json.dumps(assign_folds(...)) computed with the first release's SIPaKMeD-only
# function (tfds_sipakmed/folds.py at a89a926), before it became dataset-agnostic.
PINNED = {
    ("synthetic", "grouped"): "8226f304a19e03c83d1408b278a0c2770aa6738925b432d85e467ab847ae72ef",
    ("synthetic", "random_cells"): (
        "bc4025df8a9a9f98a24f5c86cfffe26e56cdb572470a9e8689eafbf8304c5b13"
    ),
    ("fake", "grouped"): "f15502733b72583e3e664c6560b8d65525a6b34e07d533613a1e0ae561f0362e",
    ("fake", "random_cells"): "f2a8a101ef7502de123c6694f099a8d517f8205eea5844685ad0412742827f27",
}


def _digest(assignment) -> str:
    return hashlib.sha256(json.dumps(assignment).encode()).hexdigest()


@pytest.fixture(scope="module")
def synthetic_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sipakmed_tree"))
    synthetic.write_synthetic(root, cells_per_class=12, seed=0)
    return root


def test_names_and_unknown_dataset():
    assert datasets.NAMES == ("sipakmed", "herlev", "cric", "cell_folder")
    with pytest.raises(datasets.DatasetError, match="unknown dataset 'mnist'.*sipakmed, herlev"):
        datasets.reader("mnist", "/nowhere", {})
    ref = datasets.CellRef("a/b.png", "slide1", 0)
    assert ref.extra == () and hash(ref) == hash(datasets.CellRef("a/b.png", "slide1", 0))


@pytest.mark.parametrize("config", folds.CONFIGS)
def test_sipakmed_folds_are_the_first_releases(synthetic_tree, config):
    """The generalised assign_folds gives SIPaKMeD exactly the folds it had: on the synthetic
    tree (layout refs and registry refs) and on cells shaped like the real dataset."""
    refs = layout.list_cells(synthetic_tree, log=lambda s: None)
    assert _digest(folds.assign_folds(refs, config)) == PINNED[("synthetic", config)]
    reader = datasets.reader("sipakmed", synthetic_tree, {"log": lambda s: None})
    generic = reader.list_cells()
    got = folds.assign_folds(generic, config, class_names=reader.taxonomy.class_names)
    assert _digest(got) == PINNED[("synthetic", config)]
    assert _digest(folds.assign_folds(fake_cells(), config)) == PINNED[("fake", config)]


def test_sipakmed_reader_matches_the_layout(synthetic_tree):
    reader = datasets.reader("sipakmed", synthetic_tree, {"log": lambda s: None})
    assert isinstance(reader, datasets.Reader)
    assert reader.name == "sipakmed" and reader.taxonomy == SIPAKMED
    refs = reader.list_cells()
    old = layout.list_cells(synthetic_tree, log=lambda s: None)
    assert (
        [r.file_name for r in refs]
        == [r.file_name for r in old]
        == sorted(r.file_name for r in old)
    )
    assert [r.group_id for r in refs] == [r.cluster_id for r in old]
    ex, want = reader.load_cell(refs[5]), layout.load_cell(old[5])
    assert ex["group_id"] == want["cluster_id"].decode() and ex["file_name"] == refs[5].file_name
    np.testing.assert_array_equal(ex["image"], want["image"])
    np.testing.assert_array_equal(ex["nucleus_contour"], want["nucleus_contour"])
    with pytest.raises(datasets.DatasetError, match="does not exist"):
        datasets.reader("sipakmed", os.path.join(synthetic_tree, "nope"), {})


def _cells(groups):
    """Cells from {group: [labels]}."""
    return [
        {"file_name": f"{g}/{i}.png", "group_id": g, "label": lab}
        for g, labels in groups.items()
        for i, lab in enumerate(labels)
    ]


def test_groups_that_mix_classes_stay_in_one_fold():
    """A lab's slide holds cells of several classes: the whole slide is one fold."""
    rng = np.random.default_rng(0)
    groups = {f"slide{k:02d}": list(rng.integers(0, 3, rng.integers(2, 9))) for k in range(23)}
    cells = _cells(groups)
    got = folds.assign_folds(cells, "grouped", class_names=("a", "b", "c"))
    by_group = collections.defaultdict(set)
    for c, f in zip(cells, got, strict=True):
        by_group[c["group_id"]].add(f)
    assert all(len(s) == 1 for s in by_group.values())
    assert set(got) == set(range(folds.NUM_FOLDS))
    sizes = collections.Counter(got)
    assert max(sizes.values()) - min(sizes.values()) <= 8  # the greedy keeps folds close
    # Order-free and deterministic.
    perm = rng.permutation(len(cells))
    again = folds.assign_folds([cells[i] for i in perm], "grouped", class_names=("a", "b", "c"))
    assert [got[i] for i in perm] == again


def test_grouped_algorithm_by_hand_with_labels():
    """Class 0 first: g1 (3 cells) -> fold 0, g2 (2) -> fold 1, g3 (1) -> fold 2. Class 1
    (g5 is class 1 by majority, with one class-0 cell), largest first: g5 (3 cells) -> fold 3
    (no class-1 cells anywhere; fewest cells overall: folds 3 and 4, lowest index), then g4
    -> fold 4 (fold 3 already has two class-1 cells)."""
    cells = _cells({"g1": [0, 0, 0], "g2": [0, 0], "g3": [0], "g4": [1, 1], "g5": [1, 1, 0]})
    got = folds.assign_folds(cells, "grouped", class_names=("x", "y"))
    want = {"g1": 0, "g2": 1, "g3": 2, "g4": 4, "g5": 3}
    assert got == [want[c["group_id"]] for c in cells]


def test_fold_errors():
    with pytest.raises(ValueError, match="label 3 is not an index"):
        folds.assign_folds(_cells({"g": [3]}), class_names=("a", "b"))
    with pytest.raises(ValueError, match="duplicate file_name"):
        folds.assign_folds(_cells({"g": [0]}) * 2, class_names=("a",))


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"dataset": "mnist"}, "config.dataset='mnist' is not a dataset; expected one of "
         "sipakmed, herlev, cric, cell_folder"),
        ({"dataset_config": "random"}, "config.dataset_config must be one of"),
        ({"dataset": "cell_folder"}, "writes a synthetic SIPaKMeD"),
        ({"group_csv": "x"}, "config.group_csv applies to config.dataset='cell_folder', not "
         "'sipakmed'"),
        ({"synthetic.cells_per_class": 0, "dataset": "cric", "taxonomy": "t.json"},
         "config.taxonomy applies to config.dataset='cell_folder', not 'cric'"),
        ({"synthetic.cells_per_class": 0, "dataset": "cell_folder", "group_regex": "a",
          "group_csv": "b"}, "not both"),
        ({"crop_size": -1}, "config.crop_size must be >= 0"),
    ],
)  # fmt: skip
def test_training_config_checks_the_dataset_fields(overrides, pattern):
    from configs import demo
    from sipak_jax.console import UserError
    from sipak_jax.train import check_config

    config = demo.get_config()
    for key, value in overrides.items():
        target, *path = key.split(".")
        if path:
            config[target][path[0]] = value
        else:
            config[key] = value
    with pytest.raises(UserError, match=pattern):
        check_config(config)


class _MaskSource:
    """A source in the common schema whose second example has masks (as Herlev's do)."""

    taxonomy, grouping, warnings = SIPAKMED, None, ("w",)

    def __init__(self, with_masks: bool):
        from sipak_jax.input_pipeline import Record

        self.records = [Record(f"c/{i}.png", f"g{i}", i % 2, "fold0") for i in range(3)]
        self.with_masks = with_masks

    def __getitem__(self, i):
        ex = {"image": np.full((6, 4, 3), 10 * i, np.uint8), "label": i % 2,
              "file_name": f"c/{i}.png", "group_id": f"g{i}"}  # fmt: skip
        if self.with_masks and i == 1:
            ex["nucleus_mask"] = np.eye(6, 4, dtype=bool)
            ex["cytoplasm_mask"] = np.ones((6, 4), bool)
        return ex


def test_cache_keeps_masks_where_a_dataset_has_them():
    from sipak_jax.input_pipeline import cache

    subsets = {"all": range(3)}
    c = cache._materialise(_MaskSource(True), subsets, 8, "pad", 0, 1, 1)["all"]
    assert c.nucleus_mask[0] is None and c.nucleus_mask[2] is None
    np.testing.assert_array_equal(c.nucleus_mask[1], np.eye(6, 4, dtype=bool))
    assert c.cytoplasm_mask[1].all() and c.taxonomy == SIPAKMED and c.warnings == ("w",)
    assert list(c.group_id) == ["g0", "g1", "g2"] and not c.annotation_valid.any()
    assert all(x.shape == (0, 2) for x in c.nucleus_contour)  # no contours in this dataset
    plain = cache._materialise(_MaskSource(False), subsets, 8, "pad", 0, 1, 1)["all"]
    assert plain.nucleus_mask is None and plain.cytoplasm_mask is None


def test_a_workdir_written_before_the_dataset_fields_still_resumes(tmp_path):
    """config.json without group_regex/group_csv/taxonomy/crop_size (older runs): resumed
    when the new config keeps their neutral values, refused when it sets one."""
    from configs import demo
    from sipak_jax import workdir
    from sipak_jax.console import UserError

    config = demo.get_config()
    old = workdir.config_dict(config)
    for key in workdir.ADDED_FIELDS:  # dotted paths: model.name is old["model"]["name"]
        *parents, leaf = key.split(".")
        d = old
        for parent in parents:
            d = d[parent]
        del d[leaf]
    os.makedirs(tmp_path / "w")
    (tmp_path / "w" / workdir.CONFIG_FILE).write_text(json.dumps(old))
    plan = workdir.decide(str(tmp_path / "w"), config)
    assert plan.action == "resume"
    assert sorted(c.field for c in plan.changes) == sorted(workdir.ADDED_FIELDS)
    config.crop_size = 64
    with pytest.raises(UserError, match=r"crop_size: \(absent\) -> 64"):
        workdir.decide(str(tmp_path / "w"), config)
