"""Routing between a small and a big model by expected gain: which questions to escalate, and what that is worth.

A small model answers; a big one can take escalated questions. The score that pays is the *expected gain*
``g = P_big - P_small`` (the big model's calibrated probability of being right minus the small model's), higher
escalating first. ``P_small`` is the small model's prompt-only probability for a *router* (decided before the small
model decodes) or its answer-level probability for a *cascade* (decided after its answer); ``P_big`` is always the
big model's prompt-only probability (one prefill of the big model).

Everything here is pure numpy (and scikit-learn for :func:`loso_router`) on per-question arrays of length ``n``:
``small_ok`` / ``big_ok`` (1 where that model's answer is right), scores (higher = escalate first), and curves of
accuracy against the share escalated, one value per share in ``shares`` (default :data:`SHARES`, 101 points 0..1).
A curve starts at the small model's accuracy (nothing escalated) and ends at the big model's (everything escalated);
its area (trapezoid over the shares) is ``(small + big) / 2`` for a random ordering, which makes APGR
(RouteLLM's average performance gap recovered, ``(area - small) / (big - small)``) 0.5 for random.
"""

from __future__ import annotations

import math

import numpy as np

from valueprobe.plugin.readout import clipped_logit as _clipped_logit

__all__ = ["SHARES", "GAIN_RATES", "expected_gain", "escalation_order", "escalation_curve", "curve_area", "apgr",
           "accuracy_at", "share_to_reach", "random_band", "oracle_score", "paired_bootstrap",
           "gain_threshold_for_rate", "gain_rates", "router_features", "loso_router"]

SHARES = np.linspace(0, 1, 101)
GAIN_RATES = (0.1, 0.2, 0.3, 0.4, 0.5)


# --- validation -------------------------------------------------------------------------------------------------

def _outcomes(small_ok, big_ok) -> tuple[np.ndarray, np.ndarray]:
    """Both outcome vectors as float arrays ``[n]`` of 0/1; raises on other shapes, lengths or values."""
    s = np.asarray(small_ok, dtype=float)
    b = np.asarray(big_ok, dtype=float)
    if s.ndim != 1 or b.ndim != 1:
        raise ValueError(f"outcomes must be 1-D, got shapes {s.shape} and {b.shape}")
    if len(s) != len(b):
        raise ValueError(f"small_ok has {len(s)} questions, big_ok {len(b)}")
    if len(s) == 0:
        raise ValueError("no questions")
    for name, v in (("small_ok", s), ("big_ok", b)):
        if not np.all((v == 0) | (v == 1)):
            raise ValueError(f"{name} must hold only 0/1 (or booleans)")
    return s, b


def _vector(x, n: int, name: str) -> np.ndarray:
    """``x`` as a finite float array ``[n]``; raises otherwise."""
    v = np.asarray(x, dtype=float)
    if v.ndim != 1 or len(v) != n:
        raise ValueError(f"{name} must be 1-D of length {n}, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return v


def _grid(shares) -> np.ndarray:
    g = np.asarray(shares, dtype=float)
    if g.ndim != 1 or len(g) == 0 or np.any(g < 0) or np.any(g > 1) or not np.all(np.isfinite(g)):
        raise ValueError("shares must be a non-empty 1-D array of values in [0, 1]")
    return g


def _probabilities(p, name: str) -> np.ndarray:
    v = np.asarray(p, dtype=float)
    if not np.all(np.isfinite(v)) or np.any(v < 0) or np.any(v > 1):
        raise ValueError(f"{name} must hold probabilities in [0, 1]")
    return v


# --- the score --------------------------------------------------------------------------------------------------

def expected_gain(p_big, p_small):
    """The expected gain of escalating: ``p_big - p_small``.

    ``p_big``: the big model's calibrated prompt-only P(right); ``p_small``: the small model's calibrated P(right)
    (prompt-only for a router, answer-level for a cascade). Scalars or arrays of one shape (``[n]`` -> ``[n]``);
    a float for scalars. Raises on mismatched shapes or values outside [0, 1]. This is the one definition the
    sidecar and the benches use: higher escalates first.
    """
    b = _probabilities(p_big, "p_big")
    s = _probabilities(p_small, "p_small")
    if b.shape != s.shape:
        raise ValueError(f"p_big has shape {b.shape}, p_small {s.shape}")
    g = b - s
    return float(g) if g.ndim == 0 else g


# --- curves -----------------------------------------------------------------------------------------------------

def escalation_order(score) -> np.ndarray:
    """Indices ``[n]`` in escalation order: highest ``score`` first, ties in input order (a stable sort)."""
    v = np.asarray(score, dtype=float)
    return np.argsort(-v, kind="stable")


def _curve(s: np.ndarray, b: np.ndarray, score: np.ndarray, grid: np.ndarray) -> np.ndarray:
    n = len(s)
    order = escalation_order(score)
    gain = np.r_[0.0, np.cumsum((b - s)[order])]  # accuracy change (in questions) after escalating the first j
    j = np.rint(grid * n).astype(int)
    return (s.sum() + gain[j]) / n


def escalation_curve(small_ok, big_ok, score, shares=SHARES) -> np.ndarray:
    """Accuracy ``[len(shares)]`` when the share ``s`` of questions with the HIGHEST ``score`` is escalated.

    ``small_ok``, ``big_ok``, ``score``: ``[n]``. Escalating ``round(s * n)`` questions, highest score first (ties
    broken stably: the earlier question first), gives ``mean(big_ok if escalated else small_ok)``. For
    "lowest confidence first" pass ``-confidence``. Raises on mismatched lengths, non-0/1 outcomes, non-finite
    scores or shares outside [0, 1].
    """
    s, b = _outcomes(small_ok, big_ok)
    return _curve(s, b, _vector(score, len(s), "score"), _grid(shares))


def curve_area(curve, shares=SHARES) -> float:
    """Area under an accuracy-vs-share curve (trapezoid over ``shares``); ``curve`` and ``shares``: ``[m]``."""
    c = np.asarray(curve, dtype=float)
    g = _grid(shares)
    if c.shape != g.shape:
        raise ValueError(f"curve has shape {c.shape}, shares {g.shape}")
    if np.any(np.diff(g) < 0):
        raise ValueError("shares must be non-decreasing")
    return float(np.trapezoid(c, g))


def apgr(area: float, small_acc: float, big_acc: float) -> float:
    """Average performance gap recovered: ``(area - small_acc) / (big_acc - small_acc)``; 0.5 for a random
    ordering, 1 for escalating ahead of the big model's accuracy on average. NaN when the two accuracies are
    equal (there is no gap to recover)."""
    for name, v in (("area", area), ("small_acc", small_acc), ("big_acc", big_acc)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite")
    gap = float(big_acc) - float(small_acc)
    if abs(gap) < 1e-12:
        return float("nan")
    return (float(area) - float(small_acc)) / gap


def accuracy_at(curve, share: float, shares=SHARES) -> float:
    """The curve's accuracy at ``share`` escalated (linear between grid points); ``curve``, ``shares``: ``[m]``."""
    c = np.asarray(curve, dtype=float)
    g = _grid(shares)
    if c.shape != g.shape:
        raise ValueError(f"curve has shape {c.shape}, shares {g.shape}")
    if not 0 <= share <= 1:
        raise ValueError("share must be in [0, 1]")
    return float(np.interp(share, g, c))


def share_to_reach(curve, target: float, shares=SHARES) -> float | None:
    """The smallest share escalated whose accuracy reaches ``target`` (``None`` if none does); ``curve``,
    ``shares``: ``[m]``."""
    c = np.asarray(curve, dtype=float)
    g = _grid(shares)
    if c.shape != g.shape:
        raise ValueError(f"curve has shape {c.shape}, shares {g.shape}")
    hits = np.flatnonzero(c >= target - 1e-12)
    return float(g[hits[0]]) if len(hits) else None


# --- references -------------------------------------------------------------------------------------------------

def random_band(small_ok, big_ok, draws: int = 200, seed: int = 0, shares=SHARES, band=(5.0, 95.0)) -> dict:
    """Random orderings: ``draws`` random permutations of the ``[n]`` questions.

    Returns ``area_mean``, ``area_low`` / ``area_high`` (the ``band`` percentiles of the areas, 5-95% by default),
    ``curve_mean``, ``curve_low``, ``curve_high`` (``[len(shares)]`` lists) and ``areas`` (``[draws]``)."""
    s, b = _outcomes(small_ok, big_ok)
    g = _grid(shares)
    if draws < 1:
        raise ValueError("draws must be >= 1")
    rng = np.random.default_rng(seed)
    curves = np.stack([_curve(s, b, rng.random(len(s)), g) for _ in range(draws)])
    areas = np.trapezoid(curves, g, axis=1)
    lo, hi = band
    return {"draws": draws, "area_mean": float(areas.mean()), "area_low": float(np.percentile(areas, lo)),
            "area_high": float(np.percentile(areas, hi)), "curve_mean": curves.mean(0).tolist(),
            "curve_low": np.percentile(curves, lo, axis=0).tolist(),
            "curve_high": np.percentile(curves, hi, axis=0).tolist(), "areas": areas.tolist()}


def oracle_score(small_ok, big_ok) -> np.ndarray:
    """The ordering that knows the answers, ``[n]``: ``big_ok - small_ok`` (1 where the big model is right and the
    small one wrong: escalated first; -1 where escalating loses a right answer: last)."""
    s, b = _outcomes(small_ok, big_ok)
    return b - s


def paired_bootstrap(small_ok, big_ok, score_a, score_b=None, n: int = 2000, seed: int = 0, shares=SHARES) -> dict:
    """Area of ordering ``a`` minus area of ordering ``b`` over questions resampled with replacement (paired: both
    orderings on the same resample). ``score_b=None``: the expected area of a random ordering on that resample,
    ``(small_acc + big_acc) / 2``. All arrays ``[n_questions]``.

    Returns ``point`` (the difference on all questions), ``ci95`` and ``ci90`` (percentile intervals, ``[low,
    high]``), ``p_not_above`` (share of resamples with a difference <= 0) and ``draws``."""
    s, b = _outcomes(small_ok, big_ok)
    g = _grid(shares)
    m = len(s)
    a = _vector(score_a, m, "score_a")
    other = None if score_b is None else _vector(score_b, m, "score_b")
    if n < 1:
        raise ValueError("n must be >= 1")

    def diff(idx):
        ss, bb = s[idx], b[idx]
        area_a = np.trapezoid(_curve(ss, bb, a[idx], g), g)
        area_b = (ss.mean() + bb.mean()) / 2 if other is None else np.trapezoid(_curve(ss, bb, other[idx], g), g)
        return float(area_a - area_b)

    rng = np.random.default_rng(seed)
    point = diff(np.arange(m))
    diffs = np.array([diff(rng.integers(0, m, m)) for _ in range(n)])
    return {"point": point, "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
            "ci90": [float(np.percentile(diffs, 5)), float(np.percentile(diffs, 95))],
            "p_not_above": float(np.mean(diffs <= 0)), "draws": n}


# --- thresholds -------------------------------------------------------------------------------------------------

def gain_threshold_for_rate(gains, rate: float) -> float:
    """The gain above which (strictly) the share ``rate`` of ``gains`` (``[n]``) lies: escalating ``gain >
    threshold`` escalates ``round(rate * n)`` of these questions (fewer where gains tie across the cut). The
    threshold is the midpoint between the last escalated and the first kept gain; above every gain for rate 0,
    below every gain for rate 1."""
    g = np.asarray(gains, dtype=float)
    if g.ndim != 1 or len(g) == 0:
        raise ValueError("gains must be a non-empty 1-D array")
    if not np.all(np.isfinite(g)):
        raise ValueError("gains hold NaN or infinite values")
    if not 0 <= rate <= 1:
        raise ValueError("rate must be in [0, 1]")
    desc = np.sort(g)[::-1]
    k = int(round(rate * len(g)))
    if k == 0:
        return float(desc[0] + 1e-9)
    if k == len(g):
        return float(desc[-1] - 1e-9)
    return float((desc[k - 1] + desc[k]) / 2)


def gain_rates(gains, rates=GAIN_RATES) -> dict[str, float]:
    """``{str(rate): gain_threshold_for_rate(gains, rate)}`` for each rate (JSON-ready)."""
    return {f"{r:g}": gain_threshold_for_rate(gains, r) for r in rates}


# --- a fitted router --------------------------------------------------------------------------------------------

def clipped_logit(p, eps: float = 1e-4) -> np.ndarray:
    """The router features' logit (:func:`valueprobe.plugin.readout.clipped_logit` clipped at ``eps``)."""
    return _clipped_logit(p, eps)


def router_features(p_big, p_small, kinds, max_softmax_big=None, max_softmax_small=None, extra=None) -> np.ndarray:
    """Features ``[n, d]`` for :func:`loso_router`: logit P_big, logit P_small, each model's max-softmax where
    given, any ``extra`` columns (``[n]`` each, e.g. a second P_small as a logit) and a one-hot of ``kinds``
    (``[n]`` strings; one column per kind seen)."""
    b = _probabilities(p_big, "p_big")
    if b.ndim != 1 or len(b) == 0:
        raise ValueError(f"p_big must be a non-empty 1-D array, got shape {b.shape}")
    n = len(b)
    cols = [clipped_logit(b), clipped_logit(_vector(_probabilities(p_small, "p_small"), n, "p_small"))]
    for name, v in (("max_softmax_big", max_softmax_big), ("max_softmax_small", max_softmax_small)):
        if v is not None:
            cols.append(_vector(v, n, name))
    for j, v in enumerate(extra or []):
        cols.append(_vector(v, n, f"extra[{j}]"))
    kinds = np.asarray(kinds)
    if kinds.shape != (n,):
        raise ValueError(f"kinds must have shape ({n},), got {kinds.shape}")
    for k in sorted(set(kinds.tolist())):
        cols.append((kinds == k).astype(float))
    return np.column_stack(cols)


def loso_router(features, target, sources, *, C: float = 1.0) -> np.ndarray:
    """Out-of-source scores ``[n]`` of a fitted router, leave-one-source-out.

    ``features``: ``[n, d]`` (see :func:`router_features`); ``target``: ``[n]`` integers, either the gain
    ``big_ok - small_ok`` in {-1, 0, 1} or the rescue indicator (big right and small wrong) in {0, 1};
    ``sources``: ``[n]`` source names (at least two). For each source a standardised logistic regression
    (multinomial over the target's classes) is fitted on the other sources and scores the left-out one with the
    expected target ``sum_c c * P(c)`` (= P(rescue) for the 0/1 target, the expected gain for the -1/0/1 one).
    A fold whose training target holds one class scores that class's value."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(features, dtype=float)
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(f"features must be 2-D [n, d], got shape {X.shape}")
    n = len(X)
    if not np.all(np.isfinite(X)):
        raise ValueError("features hold NaN or infinite values")
    y = _vector(target, n, "target")
    if not np.all(y == np.round(y)):
        raise ValueError("target must hold integers (the gain -1/0/1 or the rescue 0/1)")
    y = y.astype(int)
    src = np.asarray(sources)
    if src.shape != (n,):
        raise ValueError(f"sources must have shape ({n},), got {src.shape}")
    names = list(dict.fromkeys(src.tolist()))
    if len(names) < 2:
        raise ValueError("leave-one-source-out needs at least two sources")
    out = np.empty(n)
    for name in names:
        test = src == name
        ytr = y[~test]
        classes = np.unique(ytr)
        if len(classes) == 1:
            out[test] = float(classes[0])
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        model.fit(X[~test], ytr)
        proba = model.predict_proba(X[test])
        out[test] = proba @ model.classes_.astype(float)
    return out
