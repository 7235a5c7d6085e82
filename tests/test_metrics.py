"""sipak_jax.metrics against scikit-learn, the reference implementation of every number."""

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from sipak_jax.metrics import (
    binary_roc_auc,
    classification_metrics,
    confusion_matrix_image,
)
from tfds_sipakmed.taxonomy import SIPAKMED, Taxonomy

K = SIPAKMED.num_classes

# A second taxonomy shaped like Herlev's (7 classes, a 2-class view, 4 abnormal), so that
# nothing in the metrics depends on SIPaKMeD's five classes.
SEVEN = ("sup", "int", "col", "light", "moderate", "severe", "cis")
HERLEV_LIKE = Taxonomy(
    class_names=SEVEN,
    abnormal=SEVEN[3:],
    views={
        "2class": {
            "names": ["normal", "abnormal"],
            "of": {c: "abnormal" if c in SEVEN[3:] else "normal" for c in SEVEN},
        }
    },
    dataset="herlev_like",
)


def _random_case(n=300, seed=0, strength=1.5, quantize=None, k=K):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += strength
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if quantize:  # coarse probabilities give many ties for the AUC
        probs = np.round(probs * quantize) / quantize
        probs = probs + 1e-12
        probs /= probs.sum(1, keepdims=True)
    return labels, probs


def _sk(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _check_against_sklearn(labels, probs, tax=SIPAKMED):
    m = classification_metrics(labels, probs, tax)
    K = tax.num_classes
    pred = probs.argmax(1)
    present = set(labels.tolist())
    assert m["num_examples"] == len(labels)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["balanced_accuracy"] == pytest.approx(_sk(skm.balanced_accuracy_score, labels, pred))
    assert m["macro_f1"] == pytest.approx(
        _sk(skm.f1_score, labels, pred, average="macro", zero_division=0)
    )
    np.testing.assert_array_equal(
        m["confusion_matrix"], skm.confusion_matrix(labels, pred, labels=range(K))
    )
    p, r, f, s = _sk(
        skm.precision_recall_fscore_support,
        labels,
        pred,
        labels=range(K),
        zero_division=np.nan,
    )
    aucs = []
    for i, name in enumerate(tax.class_names):
        row = m["per_class"][name]
        assert row["support"] == s[i]
        for key, ref in (("precision", p[i]), ("recall", r[i])):
            if np.isnan(ref):
                assert row[key] is None, (name, key)
            else:
                assert row[key] == pytest.approx(ref), (name, key)
        if i in present or i in set(pred.tolist()):
            ref_f1 = _sk(skm.f1_score, labels == i, pred == i, zero_division=0)
            assert row["f1"] == pytest.approx(ref_f1), name
        else:
            assert row["f1"] is None
        if 0 < (labels == i).sum() < len(labels):
            ref_auc = skm.roc_auc_score(labels == i, probs[:, i])
            assert row["roc_auc"] == pytest.approx(ref_auc, abs=1e-12), name
            aucs.append(ref_auc)
        else:
            assert row["roc_auc"] is None
    if aucs:
        assert m["roc_auc_macro"] == pytest.approx(np.mean(aucs))
    else:
        assert m["roc_auc_macro"] is None

    # Grouped views: probabilities summed per group, argmax of the sums.
    assert sorted(k for k in m if k.startswith("view_")) == sorted(f"view_{v}" for v in tax.views)
    for key, mapping, names in (
        (f"view_{v}", tax.view_labels(v), tax.view_names(v)) for v in tax.views
    ):
        g = len(names)
        glabels = np.array(mapping)[labels]
        gprobs = np.stack(
            [probs[:, [c for c in range(K) if mapping[c] == j]].sum(1) for j in range(g)], 1
        )
        gpred = gprobs.argmax(1)
        view = m[key]
        assert view["class_names"] == list(names)
        np.testing.assert_array_equal(
            view["confusion_matrix"], skm.confusion_matrix(glabels, gpred, labels=range(g))
        )
        assert view["accuracy"] == pytest.approx(skm.accuracy_score(glabels, gpred))
        assert view["balanced_accuracy"] == pytest.approx(
            _sk(skm.balanced_accuracy_score, glabels, gpred)
        )

    ab_cols = [i for i, n in enumerate(tax.class_names) if n in tax.abnormal]
    abnormal = np.isin(labels, ab_cols)
    normal_cols = [c for c in range(K) if c not in ab_cols]
    p_abnormal = probs[:, ab_cols].sum(1)
    p_normal = probs[:, normal_cols].sum(1)
    called = p_abnormal > p_normal  # a tie goes to "normal", the lower index, like argmax
    avn = m["abnormal_vs_nilm"]
    if abnormal.any():
        assert avn["sensitivity"] == pytest.approx(skm.recall_score(abnormal, called))
    if (~abnormal).any():
        assert avn["specificity"] == pytest.approx(skm.recall_score(~abnormal, ~called))
    if abnormal.any() and (~abnormal).any():
        assert avn["roc_auc"] == pytest.approx(skm.roc_auc_score(abnormal, p_abnormal))
    assert avn["tp"] + avn["fn"] == abnormal.sum()
    assert avn["tn"] + avn["fp"] == (~abnormal).sum()
    # Strict JSON: no NaN anywhere.
    json.dumps(m, allow_nan=False)
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_numbers_match_sklearn(seed):
    labels, probs = _random_case(seed=seed)
    m = _check_against_sklearn(labels, probs)
    # With every class present the macro AUC is sklearn's multiclass one-vs-rest macro AUC.
    assert m["roc_auc_macro"] == pytest.approx(
        skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )


def test_ties_in_scores_match_sklearn_auc():
    labels, probs = _random_case(n=400, seed=3, quantize=4)
    _check_against_sklearn(labels, probs)
    # The binary helper on a hand-made case with a tie (0.5 vs 0.5 counts one half).
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.5, 0.5, 0.9])
    assert binary_roc_auc(y == 1, s) == pytest.approx(skm.roc_auc_score(y, s)) == 0.875


def test_class_absent_from_labels_does_not_crash():
    labels, probs = _random_case(seed=4)
    keep = labels != 2  # no Metaplastic example, but the model still predicts it sometimes
    labels, probs = labels[keep], probs[keep]
    assert (probs.argmax(1) == 2).any()
    m = _check_against_sklearn(labels, probs)
    row = m["per_class"]["Metaplastic"]
    assert row["support"] == 0 and row["recall"] is None and row["roc_auc"] is None
    assert row["precision"] == 0.0 and row["f1"] == 0.0


def test_class_never_predicted_has_undefined_precision():
    labels, probs = _random_case(seed=5)
    probs[:, 4] = 0.0
    probs /= probs.sum(1, keepdims=True)
    m = _check_against_sklearn(labels, probs)
    row = m["per_class"]["Superficial-Intermediate"]
    assert row["precision"] is None and row["recall"] == 0.0 and row["f1"] == 0.0


def test_single_class_labels():
    labels, probs = _random_case(seed=6)
    labels = np.zeros_like(labels)  # only Dyskeratotic
    m = _check_against_sklearn(labels, probs)
    assert m["roc_auc_macro"] is None
    assert m["abnormal_vs_nilm"]["specificity"] is None
    assert m["abnormal_vs_nilm"]["roc_auc"] is None


def test_empty_evaluation():
    m = classification_metrics(np.zeros(0, int), np.zeros((0, K)), SIPAKMED)
    assert m["num_examples"] == 0 and m["accuracy"] is None and m["macro_f1"] is None
    assert m["confusion_matrix"] == [[0] * K] * K
    json.dumps(m, allow_nan=False)


def test_perfect_and_known_values():
    labels = np.array([0, 1, 2, 3, 4, 0])
    probs = np.eye(K)[labels] * 0.9 + 0.02
    m = classification_metrics(labels, probs, SIPAKMED)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["roc_auc_macro"] == 1.0
    assert m["abnormal_vs_nilm"]["sensitivity"] == 1.0
    assert m["abnormal_vs_nilm"]["tp"] == 3 and m["abnormal_vs_nilm"]["tn"] == 3


def test_metaplastic_counts_as_normal_in_2class_view():
    # A Metaplastic cell called Metaplastic is a true negative (NILM), not an abnormal call.
    labels = np.array([2, 1])
    probs = np.array([[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    m = classification_metrics(labels, probs, SIPAKMED)
    assert m["abnormal_vs_nilm"]["tn"] == 1 and m["abnormal_vs_nilm"]["tp"] == 1
    assert m["view_3class"]["confusion_matrix"][1][1] == 1  # benign


def test_grouped_argmax_uses_summed_probabilities():
    # 5-class argmax is Metaplastic (normal) but the abnormal classes together hold 0.6.
    probs = np.array([[0.3, 0.3, 0.4, 0.0, 0.0]])
    m = classification_metrics(np.array([0]), probs, SIPAKMED)
    assert m["per_class"]["Dyskeratotic"]["recall"] == 0.0
    assert m["view_2class"]["accuracy"] == 1.0
    assert m["abnormal_vs_nilm"]["sensitivity"] == 1.0


def test_bare_taxonomy_omits_abnormal_figures_with_a_note():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    probs = rng.dirichlet(np.ones(3), 50)
    for tax in (("a", "b", "c"), Taxonomy.bare(("a", "b", "c"), "folder")):
        m = classification_metrics(labels, probs, tax)
        assert not [k for k in m if k.startswith("view_")] and m["abnormal_vs_nilm"] is None
        assert len(m["notes"]) == 1 and "no clinical reading defined" in m["notes"][0]
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
    # Class names alone are never taken for SIPaKMeD's: the taxonomy says what they mean.
    m = classification_metrics(labels, np.eye(K)[labels], SIPAKMED.class_names)
    assert m["abnormal_vs_nilm"] is None and "view_2class" not in m
    assert classification_metrics(labels, np.eye(K)[labels], SIPAKMED)["notes"] == []


@pytest.mark.parametrize("seed", [0, 1])
def test_another_taxonomy_matches_sklearn(seed):
    labels, probs = _random_case(seed=seed, k=len(SEVEN))
    m = _check_against_sklearn(labels, probs, HERLEV_LIKE)
    assert set(m["per_class"]) == set(SEVEN) and m["view_2class"]["class_names"] == [
        "normal",
        "abnormal",
    ]
    assert m["abnormal_vs_nilm"]["tp"] + m["abnormal_vs_nilm"]["fn"] == int((labels >= 3).sum())


@pytest.mark.parametrize(
    "labels, probs, match",
    [
        (np.zeros(3, int), np.full((4, K), 0.2), "labels must be"),
        (np.array([0, 5]), np.full((2, K), 0.2), r"labels must lie in \[0, 5\)"),
        (np.array([0, -1]), np.full((2, K), 0.2), "labels must lie"),
        (np.array([0, 1]), np.full((2, 3), 0.2), "3 columns but there are 5"),
        (np.array([0, 1]), np.array([[np.nan] * K, [0.2] * K]), "NaN"),
        (np.array([0.5, 1]), np.full((2, K), 0.2), "integer"),
        (np.array([0, 1]), np.full(2, 0.2), r"\[N, K\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(labels, probs, SIPAKMED)


def test_confusion_matrix_image():
    cm = np.array([[50, 3, 0], [10, 20, 0], [0, 0, 0]])
    img = confusion_matrix_image(cm, ["alpha", "beta", "gamma"], cell=60, title="t")
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    f = confusion_matrix_image(cm, ["alpha", "beta", "gamma"], cell=60, title="t", as_float=True)
    assert f.dtype == np.float32 and f.min() >= 0.0 and f.max() <= 1.0
    np.testing.assert_allclose(f * 255.0, img, atol=1e-3)
    # Darker cells for larger row shares: find the cells by their colour (their corners carry
    # no text). The (0, 0) cell (50/53) is darker than (1, 1) (20/30), which is darker than the
    # empty row's cells (white-ish).
    dark = img.sum(axis=2)
    h, w = dark.shape
    # The grid is the only big block of non-white colour; locate its bounding box.
    blue = (img[..., 2].astype(int) - img[..., 0].astype(int)) > 5
    ys, xs = np.nonzero(blue)
    y0, x0 = ys.min(), xs.min()
    c = 60

    def corner(i, j):
        return dark[y0 + i * c + 3, x0 + j * c + 3]

    assert corner(0, 0) < corner(1, 1) < corner(1, 0) < corner(0, 1)
    assert corner(2, 2) >= corner(0, 1)
    # Labels are drawn: dark text pixels exist left of the grid and below it.
    assert (dark[y0 : y0 + 3 * c, : x0 - 2] < 300).sum() > 50
    assert (dark[y0 + 3 * c + 2 :, x0 : x0 + 3 * c] < 300).sum() > 50
    with pytest.raises(ValueError, match="does not match 2 class names"):
        confusion_matrix_image(cm, ["a", "b"])
