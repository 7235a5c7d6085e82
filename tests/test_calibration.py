"""Calibration maths against independent references: scipy, scikit-learn and loops written here."""

import cv2
import numpy as np
import pytest
from scipy import optimize, special
from sklearn import metrics as skm

from sipak_jax import calibration as cal


def _overconfident(n=2000, k=5, scale=3.0, seed=0):
    """Logits whose labels are drawn from softmax(base); the model reports base * scale."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, k)) * 1.2
    p_true = special.softmax(base, axis=1)
    labels = np.array([rng.choice(k, p=row) for row in p_true])
    return base * scale, labels


def _reference_nll(logits, labels, t):
    lp = special.log_softmax(np.asarray(logits, np.float64) / t, axis=1)
    return -lp[np.arange(len(labels)), labels].mean()


def test_log_softmax_and_nll_match_references():
    logits, labels = _overconfident(n=200)
    np.testing.assert_allclose(
        cal.log_softmax(logits), special.log_softmax(logits, axis=1), atol=1e-12
    )
    assert cal.nll(logits, labels) == pytest.approx(
        skm.log_loss(labels, special.softmax(logits, axis=1), labels=range(5)), rel=1e-9
    )
    # Huge logits stay finite.
    assert np.isfinite(cal.nll(logits * 1e4, labels))


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_temperature_is_the_nll_minimiser(seed):
    logits, labels = _overconfident(seed=seed)
    t = cal.fit_temperature(logits, labels)
    # Reference 1: scipy's bounded scalar minimiser over log T.
    res = optimize.minimize_scalar(
        lambda lt: _reference_nll(logits, labels, np.exp(lt)),
        bounds=(np.log(cal.T_MIN), np.log(cal.T_MAX)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert t == pytest.approx(np.exp(res.x), rel=1e-4)
    # Reference 2: a brute-force grid; nothing on it beats our T.
    grid = np.exp(np.linspace(np.log(0.5), np.log(10.0), 2001))
    best = min(_reference_nll(logits, labels, g) for g in grid)
    assert _reference_nll(logits, labels, t) <= best + 1e-12
    # The labels were drawn at temperature `scale` = 3: the fit recovers it (2000 examples).
    assert 2.5 < t < 3.6


def test_fit_temperature_is_deterministic_and_keeps_argmax():
    logits, labels = _overconfident(seed=2)
    t1 = cal.fit_temperature(logits, labels)
    t2 = cal.fit_temperature(logits.copy(), labels.copy())
    assert t1 == t2
    np.testing.assert_array_equal(
        cal.softmax(logits, t1).argmax(1), special.softmax(logits, axis=1).argmax(1)
    )


def test_underconfident_logits_get_t_below_one():
    logits, labels = _overconfident(scale=0.3, seed=3)
    t = cal.fit_temperature(logits, labels)
    assert 0.2 < t < 0.45


def test_temperature_bounds():
    # Perfectly separated validation logits: NLL keeps falling as T -> 0, so T hits T_MIN.
    labels = np.arange(10) % 3
    logits = np.eye(3)[labels] * 5.0
    assert cal.fit_temperature(logits, labels) == cal.T_MIN
    # All-wrong confident logits: NLL keeps falling as T grows, so T hits T_MAX.
    wrong = np.eye(3)[(labels + 1) % 3] * 5.0
    assert cal.fit_temperature(wrong, labels) == cal.T_MAX


def _reference_ece(probs, labels, n_bins):
    """Guo et al.'s loop: bins (lower, upper], weight |acc - conf| by the share in the bin."""
    conf = probs.max(1)
    acc = probs.argmax(1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lower) & (conf <= upper)
        if in_bin.any():
            ece += in_bin.mean() * abs(acc[in_bin].mean() - conf[in_bin].mean())
    return ece


@pytest.mark.parametrize("n_bins", [15, 10])
def test_ece_matches_reference_loop(n_bins):
    logits, labels = _overconfident(seed=4)
    probs = special.softmax(logits, axis=1)
    assert cal.expected_calibration_error(probs, labels, n_bins) == pytest.approx(
        _reference_ece(probs, labels, n_bins), abs=1e-12
    )


def test_ece_by_hand_and_bin_edges():
    # Two bins of 15: conf 0.6 (bin (8/15, 9/15]) right; conf 0.9 (bin (13/15, 14/15]) wrong.
    probs = np.array([[0.6, 0.4], [0.1, 0.9], [0.6, 0.4], [0.1, 0.9]])
    labels = np.array([0, 0, 0, 0])
    # bin A: acc 1, conf .6 -> .4 * 2/4; bin B: acc 0, conf .9 -> .9 * 2/4
    assert cal.expected_calibration_error(probs, labels) == pytest.approx(0.65)
    # A confidence exactly on an edge (1/3 = 5/15) belongs to the bin below it: (4/15, 5/15].
    p = np.full((1, 3), 1 / 3)
    b = cal.reliability_bins(p, np.array([0]))
    assert b["count"][4] == 1 and b["count"].sum() == 1
    # Confidence 1.0 lands in the last bin.
    b = cal.reliability_bins(np.array([[1.0, 0.0]]), np.array([0]))
    assert b["count"][14] == 1


def test_brier_score_matches_sklearn():
    rng = np.random.default_rng(5)
    # Binary: our multiclass convention is twice sklearn's positive-column binary score.
    p1 = rng.uniform(size=300)
    y = (rng.uniform(size=300) < p1).astype(int)
    probs2 = np.stack([1 - p1, p1], 1)
    assert cal.brier_score(probs2, y) == pytest.approx(2 * skm.brier_score_loss(y, p1))
    # Multiclass: sklearn's multiclass Brier (sum over classes, mean over examples).
    probs = rng.dirichlet(np.ones(5), 300)
    labels = rng.integers(0, 5, 300)
    assert cal.brier_score(probs, labels) == pytest.approx(
        skm.brier_score_loss(labels, probs, labels=range(5), scale_by_half=False)
    )
    assert cal.brier_score(np.eye(5)[labels], labels) == 0.0
    assert cal.brier_score(np.eye(5)[(labels + 1) % 5], labels) == 2.0


def test_temperature_scaling_improves_held_out_calibration():
    val_logits, val_labels = _overconfident(seed=6)
    test_logits, test_labels = _overconfident(seed=7)
    s = cal.calibration_summary(val_logits, val_labels, test_logits, test_labels)
    assert s["fitted_on"] == "validation" and s["n_bins"] == 15
    before, after = s["test"]["before"], s["test"]["after"]
    assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
    assert after["brier"] < before["brier"]
    assert after["accuracy"] == before["accuracy"]
    assert s["temperature"] == cal.fit_temperature(val_logits, val_labels)
    assert before["nll"] == pytest.approx(_reference_nll(test_logits, test_labels, 1.0))


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (np.zeros((0, 3)), np.zeros(0, int), "empty"),
        (np.zeros(3), np.zeros(3, int), r"\[N, K\]"),
        (np.zeros((2, 3)), np.zeros(3, int), "labels must be"),
        (np.array([[np.inf, 0.0]]), np.array([0]), "NaN or Inf"),
        (np.zeros((2, 3)), np.array([0, 3]), r"labels must lie in \[0, 3\)"),
    ],
)
def test_bad_inputs(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        cal.fit_temperature(logits, labels)


def test_reliability_diagram_png(tmp_path):
    logits, labels = _overconfident(n=500, seed=8)
    t = cal.fit_temperature(logits, labels)
    curves = {"before": cal.softmax(logits), f"after T={t:.2f}": cal.softmax(logits, t)}
    path = cal.write_reliability_diagram(tmp_path / "sub" / "reliability.png", curves, labels)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 400 and img.shape[1] > 400
    # Both curve colours are drawn (RGB (31,119,180) and (214,39,40); OpenCV reads BGR).
    rgb = img[..., ::-1].astype(int)
    for color in ((31, 119, 180), (214, 39, 40)):
        assert (np.abs(rgb - color).sum(axis=2) < 30).sum() > 100
    with pytest.raises(ValueError, match="at least one curve"):
        cal.reliability_diagram({}, labels)


def test_summary_keeps_t_at_one_when_validation_is_perfectly_separated():
    # Every validation example right with a margin: the NLL decreases monotonically as T -> 0.
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 5
    logits = rng.normal(size=(40, 5))
    logits[np.arange(40), labels] += 10.0
    assert cal.fit_temperature(logits, labels) == cal.T_MIN
    summary = cal.calibration_summary(logits, labels, logits, labels)
    assert summary["temperature"] == 1.0
    assert summary["temperature_fit"].startswith("not fitted")
    assert summary["test"]["after"] == summary["test"]["before"]
