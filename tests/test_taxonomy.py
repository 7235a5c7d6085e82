"""The dataset taxonomy: round trip, validation, SIPaKMeD's official grouping, bare taxonomies."""

import json
import pathlib
import re

import pytest

from tfds_sipakmed.taxonomy import SIPAKMED, Taxonomy, for_dataset

CARD = pathlib.Path(__file__).resolve().parents[1] / "tfds_sipakmed" / "sipakmed" / "README.md"


def _card_row(feature: str) -> str:
    for line in CARD.read_text().splitlines():
        if line.startswith(f"| `{feature}` |"):
            return line.split("|")[3]
    raise AssertionError(f"no row for {feature} in {CARD}")


def test_round_trip_through_json():
    for tax in (SIPAKMED, Taxonomy.bare(["a", "b", "c"], "folder")):
        back = Taxonomy.from_dict(json.loads(json.dumps(tax.to_dict())))
        assert back == tax and hash(back) == hash(tax)
        assert back.to_dict() == tax.to_dict()


def test_sipakmed_label_order_is_the_cards():
    # "0 Dyskeratotic, 1 Koilocytotic, ..." in the card's `label` row.
    listed = re.findall(r"(\d) ([A-Za-z-]+)", _card_row("label"))
    assert tuple(n for _, n in sorted(listed)) == SIPAKMED.class_names
    assert SIPAKMED.num_classes == 5 and for_dataset("sipakmed") is SIPAKMED


def test_sipakmed_3class_view_is_the_official_grouping():
    # "0 normal (Superficial-Intermediate, Parabasal), 1 benign (Metaplastic), 2 abnormal (...)"
    groups = re.findall(r"(\d) (\w+) \(([^)]*)\)", _card_row("label_3class"))
    assert SIPAKMED.view_names("3class") == tuple(g for _, g, _ in groups)
    expected = {c.strip(): int(i) for i, _, cs in groups for c in cs.split(",")}
    assert set(expected) == set(SIPAKMED.class_names)
    assert SIPAKMED.view_labels("3class") == tuple(expected[n] for n in SIPAKMED.class_names)


def test_sipakmed_2class_view_and_abnormal_set():
    # The card: "0 normal (incl. Metaplastic), 1 abnormal (Koilocytotic, Dyskeratotic)".
    row = _card_row("label_2class")
    abnormal = re.search(r"1 abnormal \(([^)]*)\)", row).group(1)
    assert sorted(a.strip() for a in abnormal.split(",")) == sorted(SIPAKMED.abnormal)
    assert SIPAKMED.view_names("2class") == ("normal", "abnormal")
    assert SIPAKMED.view_labels("2class") == (1, 1, 0, 0, 0)
    assert SIPAKMED.abnormal_indices() == (0, 1)
    assert SIPAKMED.reading("Metaplastic") == "NILM (squamous metaplasia)"
    assert all(SIPAKMED.reading(n) for n in SIPAKMED.class_names)


def test_bare_taxonomy_has_no_clinical_meaning():
    tax = Taxonomy.bare(("cat", "dog"), "imagenet")
    assert tax.class_names == ("cat", "dog") and tax.dataset == "imagenet"
    assert tax.abnormal_indices() == () and tax.views == {} and tax.readings == {}
    assert tax.reading("dog") is None
    with pytest.raises(ValueError, match="no view '2class'"):
        tax.view_labels("2class")
    with pytest.raises(ValueError, match="'cow' is not a class"):
        tax.reading("cow")


def test_partial_taxonomy_from_a_user_file():
    tax = Taxonomy.from_dict({"class_names": ["b", "a", "c"], "abnormal": ["c", "b"]})
    assert tax.abnormal == ("b", "c") and tax.abnormal_indices() == (0, 2)
    assert tax.dataset == "" and tax.reading("a") is None


def _sip(**change) -> dict:
    d = SIPAKMED.to_dict()
    d.update(change)
    return d


@pytest.mark.parametrize(
    "bad, field",
    [
        ([], r"taxonomy: expected a dict"),
        ({"abnormal": []}, r"taxonomy\.class_names: missing"),
        ({"class_names": "ab"}, r"taxonomy\.class_names: expected a list"),
        ({"class_names": []}, r"taxonomy\.class_names: must not be empty"),
        ({"class_names": ["a", "a"]}, r"taxonomy\.class_names: duplicate names \['a'\]"),
        ({"class_names": ["a", ""]}, r"taxonomy\.class_names: every name"),
        ({"class_names": ["a"], "abnormals": ["a"]}, r"unknown fields \['abnormals'\]"),
        ({"class_names": ["a"], "abnormal": ["b"]}, r"taxonomy\.abnormal: \['b'\] are not"),
        ({"class_names": ["a"], "readings": {"b": "x"}}, r"taxonomy\.readings: 'b' is not"),
        ({"class_names": ["a"], "readings": {"a": ""}}, r"taxonomy\.readings\['a'\]"),
        ({"class_names": ["a"], "dataset": 3}, r"taxonomy\.dataset: expected a string"),
        ({"class_names": ["a"], "views": {"v": {"names": ["g"]}}}, r"taxonomy\.views\['v'\]:"),
    ],
)
def test_invalid_dicts_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        Taxonomy.from_dict(bad)


def test_invalid_views_name_the_view_and_the_problem():
    views = SIPAKMED.to_dict()["views"]
    missing = json.loads(json.dumps(views))
    del missing["3class"]["of"]["Parabasal"]
    with pytest.raises(ValueError, match=r"views\['3class'\]\.of: .*missing \['Parabasal'\]"):
        Taxonomy.from_dict(_sip(views=missing))
    typo = json.loads(json.dumps(views))
    typo["3class"]["of"]["Parabasal"] = "nromal"
    with pytest.raises(ValueError, match=r"groups \['nromal'\] are not in"):
        Taxonomy.from_dict(_sip(views=typo))
    unused = json.loads(json.dumps(views))
    unused["2class"]["names"].append("other")
    with pytest.raises(ValueError, match=r"views\['2class'\]\.names: groups \['other'\] have no"):
        Taxonomy.from_dict(_sip(views=unused))
    with pytest.raises(ValueError, match=r"abnormal group .* differs from abnormal"):
        Taxonomy.from_dict(_sip(abnormal=["Dyskeratotic"]))


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"no taxonomy for dataset 'nope'; known: \[.*'sipakmed'"):
        for_dataset("nope")


def test_taxonomy_is_immutable():
    with pytest.raises(AttributeError):
        SIPAKMED.class_names = ("x",)


def test_metadata_with_class_names_only_gets_the_known_taxonomy():
    from tfds_sipakmed.taxonomy import as_taxonomy, for_class_names

    assert for_class_names(list(SIPAKMED.class_names)) is SIPAKMED
    # The same names in another order are another model's classes: no clinical meaning.
    other = for_class_names(SIPAKMED.class_names[::-1])
    assert other.abnormal == () and other.readings == {}
    assert as_taxonomy(SIPAKMED) is SIPAKMED and as_taxonomy(["p", "q"]).class_names == ("p", "q")
