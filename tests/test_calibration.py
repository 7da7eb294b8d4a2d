"""Calibrators, metrics and thresholds: checked against scikit-learn, hand-computed cases and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from valueprobe.calibration.calibrators import CALIBRATOR_CLASSES, IsotonicCalibrator, PlattCalibrator, TemperatureCalibrator
from valueprobe.calibration.metrics import (
    aurc_loss,
    auprc_score,
    auroc_score,
    brier_loss,
    expected_calibration_error,
    prr_score,
    risk_coverage_curve,
)
from valueprobe.calibration.probes import MLPProbe
from valueprobe.calibration.thresholds import (
    clopper_pearson_upper,
    escalation_threshold,
    min_accepted,
    risk_controlled_threshold,
)


@pytest.fixture()
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    raw = 1.5 * (y - 0.5) + rng.standard_normal(400) + 0.7  # informative, miscalibrated
    return raw, y


# -- calibrators ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(CALIBRATOR_CLASSES))
def test_calibrator_round_trip_is_lossless(kind, scores):
    raw, y = scores
    cal = CALIBRATOR_CLASSES[kind]().fit(raw, y)
    again = CALIBRATOR_CLASSES[kind].from_params(cal.to_params())
    probe_points = np.r_[raw, -100.0, 100.0]
    assert np.array_equal(cal.predict_proba(probe_points), again.predict_proba(probe_points))
    p = cal.predict_proba(probe_points)
    assert ((p >= 0) & (p <= 1)).all()


def test_calibrators_improve_calibration():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 4000)
    raw = 3.0 * (y - 0.5) + rng.standard_normal(4000) + 1.5  # informative, shifted and overconfident
    uncalibrated = expected_calibration_error(y, 1 / (1 + np.exp(-raw)))
    for kind in ("platt", "isotonic"):
        p = CALIBRATOR_CLASSES[kind]().fit(raw, y).predict_proba(raw)
        assert expected_calibration_error(y, p) < uncalibrated / 2, kind


def test_isotonic_matches_sklearn(scores):
    raw, y = scores
    ours = IsotonicCalibrator().fit(raw, y)
    ref = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(raw, y)
    grid = np.linspace(raw.min() - 1, raw.max() + 1, 301)
    np.testing.assert_allclose(ours.predict_proba(grid), ref.predict(grid), atol=1e-12)


def test_temperature_recovers_known_scale():
    rng = np.random.default_rng(1)
    z = rng.standard_normal(20000) * 3
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-z / 2.5))).astype(int)
    assert TemperatureCalibrator().fit(z, y).temperature_ == pytest.approx(2.5, rel=0.08)


def test_calibrator_input_checks(scores):
    raw, y = scores
    with pytest.raises(NotFittedError):
        PlattCalibrator().predict_proba(raw)
    with pytest.raises(ValueError, match="one class"):
        PlattCalibrator().fit(raw, np.ones_like(y))
    with pytest.raises(ValueError, match="length"):
        PlattCalibrator().fit(raw[:-1], y)


# -- metrics ----------------------------------------------------------------------------------------------------
def test_ranking_metrics_match_sklearn(scores):
    raw, y = scores
    assert auroc_score(y, raw) == pytest.approx(roc_auc_score(y, raw))
    tied = np.round(raw, 1)  # ties count half, as in scikit-learn
    assert auroc_score(y, tied) == pytest.approx(roc_auc_score(y, tied), abs=1e-12)
    assert auprc_score(y, raw) == pytest.approx(average_precision_score(y, raw))
    p = 1 / (1 + np.exp(-raw))
    assert brier_loss(y, p) == pytest.approx(brier_score_loss(y, p))


def test_ece_hand_computed():
    y = np.array([1, 0, 1, 1])
    p = np.array([0.2, 0.2, 0.9, 0.7])
    # uniform 10 bins: {0.2, 0.2} acc 0.5 conf 0.2 -> 0.3*2; {0.7} acc 1 -> 0.3; {0.9} acc 1 -> 0.1
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx((0.6 + 0.3 + 0.1) / 4)
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0
    # equal-mass: 2 bins -> {0.2, 0.2} and {0.7, 0.9}: |0.5-0.2|*2 + |1-0.8|*2
    assert expected_calibration_error(y, p, n_bins=2, strategy="quantile") == pytest.approx((0.6 + 0.4) / 4)


def test_aurc_and_prr_hand_computed():
    y = np.array([1, 1, 0, 0])
    perfect = np.array([4, 3, 2, 1.0])
    # risks at coverage 1..4: 0, 0, 1/3, 1/2
    assert aurc_loss(y, perfect) == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
    assert prr_score(y, perfect) == pytest.approx(1.0)
    assert prr_score(y, -perfect) < 0
    # all-tied scores: every coverage has the base error rate
    cov, risk = risk_coverage_curve(y, np.zeros(4))
    np.testing.assert_allclose(risk, 0.5)


def test_metric_input_checks():
    with pytest.raises(ValueError, match="one class"):
        auroc_score([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="length"):
        brier_loss([1, 0], [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1, 0], [1.2, 0.1])


# -- thresholds (properties) ------------------------------------------------------------------------------------
probabilities = st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=200)


@given(p=probabilities, rate=st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_escalation_threshold_never_overshoots(p, rate):
    p = np.asarray(p)
    t = escalation_threshold(p, rate)
    escalated = np.mean(p < t)
    assert escalated <= rate + 1e-12
    if rate < 1:
        assert np.mean(p <= t) > rate - 1e-12  # t is the (m+1)-th smallest: no tighter threshold exists
    else:
        assert escalated == 1.0


@given(p=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=200, unique=True), rate=st.floats(0, 1))
@settings(max_examples=100, deadline=None)
def test_escalation_threshold_exact_without_ties(p, rate):
    p = np.asarray(p)
    assert np.sum(p < escalation_threshold(p, rate)) == math.floor(rate * len(p) + 1e-12)


@given(
    data=st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.integers(0, 1)), min_size=1, max_size=150),
    alpha=st.floats(0.05, 0.5),
    delta=st.floats(0.01, 0.3),
    fixed=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_risk_controlled_threshold_bound_holds(data, alpha, delta, fixed):
    p = np.array([d[0] for d in data])
    y = np.array([d[1] for d in data])
    res = risk_controlled_threshold(p, y, alpha=alpha, delta=delta, fixed_sequence=fixed)
    accepted = p >= res.threshold
    assert accepted.sum() == res.n_accepted
    if res.n_accepted:
        errors = int((1 - y[accepted]).sum())
        assert clopper_pearson_upper(errors, res.n_accepted, delta) <= alpha + 1e-12
        assert res.empirical_risk == pytest.approx(errors / res.n_accepted)
    # maximality: no larger coverage qualifies (scan to the first violation in fixed-sequence mode)
    for t in sorted(set(p), reverse=True):
        acc = p >= t
        if acc.sum() < min_accepted(alpha, delta):
            assert clopper_pearson_upper(0, int(acc.sum()), delta) > alpha  # too few to ever pass
            continue
        bound = clopper_pearson_upper(int((1 - y[acc]).sum()), int(acc.sum()), delta)
        if bound > alpha:
            if fixed:
                break
            continue
        assert acc.sum() <= res.n_accepted


def test_risk_control_finds_coverage_on_a_good_model():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=2000)
    y = (rng.uniform(size=2000) < p).astype(int)  # calibrated scores
    res = risk_controlled_threshold(p, y, alpha=0.2, delta=0.1)
    assert 0.3 < res.coverage < 0.7 and res.risk_upper_bound <= 0.2
    assert min_accepted(0.1, 0.1) == 22


def test_clopper_pearson_known_values():
    # zero errors in n: upper bound is 1 - delta**(1/n)
    assert clopper_pearson_upper(0, 50, 0.05) == pytest.approx(1 - 0.05 ** (1 / 50))
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0


# -- probes ----------------------------------------------------------------------------------------------------
def test_td_objective_reduces_to_bce_for_single_states():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 6))
    y = (X[:, 0] > 0).astype(int)
    a = MLPProbe(objective="td", epochs=15).fit(X, y)
    b = MLPProbe(objective="bce", epochs=15).fit(X, y)
    np.testing.assert_allclose(a.decision_function(X), b.decision_function(X), atol=1e-6)
    assert auroc_score(y, a.decision_function(X)) > 0.95


def test_td_objective_bootstraps_along_trajectories():
    rng = np.random.default_rng(0)
    n_traj, steps = 150, 3
    reward = rng.integers(0, 2, n_traj)
    # only the final state carries the reward signal; TD must propagate it backwards through the value of s_{t+1}
    X = rng.standard_normal((n_traj * steps, 4)) * 0.1
    X[steps - 1 :: steps, 0] += 2 * reward - 1
    X[:, 1] = np.repeat(2 * reward - 1, steps) * 0.5  # earlier states see a weaker cue
    traj = np.repeat(np.arange(n_traj), steps)
    probe = MLPProbe(objective="td", epochs=40).fit(X, np.repeat(reward, steps), trajectory_index=traj)
    first = probe.decision_function(X[0::steps])
    assert auroc_score(reward, first) > 0.9


def test_leave_one_source_out_selection_finds_a_planted_sparse_signal_that_transfers():
    """Three sources share a signal on three neurons (their base rates differ): pruning on the fitting rows keeps
    those neurons, and every left-out source is scored well by a small k."""
    from valueprobe.calibration.transfer import Side, loso_study, prune_path

    rng = np.random.default_rng(0)
    n, width = 900, 200
    X = rng.standard_normal((n, width))
    sources = np.array(["a", "b", "c"])[np.arange(n) % 3]
    shift = np.select([sources == "a", sources == "b"], [-0.8, 0.0], 0.8)
    y = (X[:, [5, 17, 42]].sum(1) + shift + 0.5 * rng.standard_normal(n) > 0).astype(int)
    side = Side(rng.uniform(0.3, 1, n), rng.uniform(0, 1.3, n), np.array(["open"] * n))
    split = np.array(["train", "train", "train", "calibration", "test"])[np.arange(n) % 5]
    study = loso_study(X, y, sources, side, split, max_fraction=0.05, heads=("linear",), random_draws=3,
                       progress=False)
    assert study.k <= 0.05 * width
    assert min(study.k_curve[study.k].values()) > 0.8  # each source, scored by neurons pruned without it
    tr = split == "train"
    assert {5, 17, 42} <= set(prune_path(X[tr], y[tr], [16, 8, 4])[4].tolist())


def test_auroc_interval_covers_the_estimate_and_shrinks_with_n():
    from valueprobe.calibration.metrics import auroc_confidence_interval

    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 2000):
        y = rng.integers(0, 2, n)
        s = y + rng.standard_normal(n)
        lo, hi = auroc_confidence_interval(y, s)
        assert lo < auroc_score(y, s) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_probes_are_sklearn_estimators_and_clone():
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    from valueprobe.calibration.probes import LinearProbe, MLPProbe

    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 3))
    y = (X[:, 0] > 0).astype(int)
    fitted = LinearProbe(C=0.3).fit(X, y)
    copy = clone(fitted)
    assert copy.get_params()["C"] == 0.3 and not hasattr(copy, "coef_")
    with pytest.raises(NotFittedError):
        copy.decision_function(X)
    np.testing.assert_allclose(copy.fit(X, y).decision_function(X), fitted.decision_function(X))
    mlp = clone(MLPProbe(hidden=4, epochs=3, seed=1))
    with pytest.raises(NotFittedError):
        mlp.head_params()
    assert mlp.fit(X, y).decision_function(X).shape == (80,)


def test_clopper_pearson_matches_the_beta_quantile():
    from scipy.stats import beta

    from valueprobe.calibration.thresholds import clopper_pearson_upper

    for errors, n, delta in [(0, 10, 0.1), (3, 50, 0.05), (10, 200, 0.1), (49, 50, 0.2)]:
        assert clopper_pearson_upper(errors, n, delta) == pytest.approx(beta.ppf(1 - delta, errors + 1, n - errors), rel=1e-9)
    assert clopper_pearson_upper(5, 5, 0.1) == 1.0


def test_calibrators_are_scikit_learn_estimators():
    import numpy as np
    from sklearn.base import clone

    from valueprobe.calibration.calibrators import IsotonicCalibrator, PlattCalibrator, TemperatureCalibrator

    for est in (PlattCalibrator(C=10.0), TemperatureCalibrator(bounds=(0.1, 10.0)), IsotonicCalibrator(y_min=0.05)):
        copy = clone(est)
        assert copy.get_params() == est.get_params() and not hasattr(copy, "fitted_")
    raw = np.linspace(-3, 3, 200)
    y = (raw + np.random.default_rng(0).normal(0, 1, 200) > 0).astype(int)
    fitted = PlattCalibrator().fit(raw, y)
    assert clone(fitted).get_params() == {"C": 1e6} and fitted.predict_proba([0.0]).shape == (1,)


def test_bootstrap_auroc_interval_equals_scoring_each_resample_with_sklearn():
    """The vectorised interval (ranks of every resample at once) is the loop over roc_auc_score it replaced: same
    draws, ties counted half, one-class resamples skipped."""
    from sklearn.metrics import roc_auc_score

    from valueprobe.calibration.metrics import auroc_confidence_interval

    rng = np.random.default_rng(5)
    for n in (10, 80):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        score = np.round(rng.normal(size=n) + y, 1)  # rounded: many ties
        draws = np.random.default_rng(0)
        stats = []
        for _ in range(200):
            idx = draws.integers(0, n, n)
            if y[idx].min() != y[idx].max():
                stats.append(roc_auc_score(y[idx], score[idx]))
        want = np.percentile(stats, [2.5, 97.5])
        assert auroc_confidence_interval(y, score, n_boot=200, seed=0) == pytest.approx(tuple(want), abs=1e-12)
