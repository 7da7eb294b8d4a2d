"""Decision thresholds on calibrated confidence.

* :func:`escalation_threshold`: the threshold that escalates (or abstains on) a target fraction of traffic.
* :func:`risk_controlled_threshold`: the largest coverage whose one-sided Clopper–Pearson upper bound on the
  error rate among accepted answers is at most ``alpha``, at confidence ``1 - delta``.

Convention everywhere: an answer is **accepted** when ``p >= threshold`` and escalated/abstained when
``p < threshold``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest

__all__ = ["escalation_threshold", "clopper_pearson_upper", "min_accepted", "risk_controlled_threshold", "RiskControlledThreshold"]


def _scores(p) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if len(p) == 0:
        raise ValueError("no scores")
    if not np.isfinite(p).all():
        raise ValueError("scores must be finite")
    return p


def escalation_threshold(p, target_rate: float) -> float:
    """Threshold ``t`` such that escalating ``p < t`` sends at most ``target_rate`` of ``p`` onward.

    ``t`` is the ``(m+1)``-th smallest score with ``m = floor(target_rate * n)``, so without ties exactly ``m``
    scores fall below it; ties at ``t`` are all accepted (the rate can only fall short, never overshoot).
    ``target_rate = 1`` returns a value above every score.
    """
    if not 0.0 <= target_rate <= 1.0:
        raise ValueError(f"target_rate must lie in [0, 1], got {target_rate}")
    p = np.sort(_scores(p))
    m = int(math.floor(target_rate * len(p) + 1e-12))
    if m >= len(p):
        return float(np.nextafter(p[-1], np.inf))
    return float(p[m])


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """One-sided (1 − delta) Clopper–Pearson upper bound on a binomial rate with ``errors`` out of ``n``:
    the upper end of SciPy's exact two-sided interval at confidence 1 − 2·delta (delta < 0.5)."""
    if n <= 0 or errors >= n:
        return 1.0
    if not 0 < delta < 0.5:
        raise ValueError(f"delta must be in (0, 0.5), got {delta}")
    return float(binomtest(int(errors), int(n)).proportion_ci(confidence_level=1.0 - 2.0 * delta, method="exact").high)


def min_accepted(alpha: float, delta: float) -> int:
    """Smallest n whose zero-error Clopper–Pearson bound ``1 - delta**(1/n)`` is at most ``alpha``."""
    return max(1, math.ceil(math.log(delta) / math.log(1.0 - alpha) - 1e-12))


@dataclass(frozen=True)
class RiskControlledThreshold:
    """Result of :func:`risk_controlled_threshold`. ``threshold`` is ``inf`` when no coverage qualifies."""

    threshold: float
    coverage: float
    n_accepted: int
    empirical_risk: float
    risk_upper_bound: float
    alpha: float
    delta: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["threshold"] = None if math.isinf(self.threshold) else self.threshold
        return d


def risk_controlled_threshold(
    p, y_true, *, alpha: float, delta: float = 0.05, fixed_sequence: bool = True
) -> RiskControlledThreshold:
    """Largest coverage whose Clopper–Pearson upper bound on the accepted error rate is ``<= alpha``.

    Candidate thresholds are the distinct scores, scanned from the most confident down (coverage rising). With
    ``fixed_sequence=True`` (default) the scan stops at the first threshold whose bound exceeds ``alpha``: this
    is fixed-sequence testing (as in Learn-then-Test), which keeps the guarantee valid although many thresholds
    are tried. The scan starts at ``min_accepted(alpha, delta)`` accepted answers, the fewest with which even zero
    errors can pass (it depends only on alpha and delta, so the sequence stays fixed in advance); starting at one
    answer would stop every scan at its first step. ``fixed_sequence=False`` returns the largest qualifying coverage anywhere on the curve (more
    coverage, but the 1 − delta guarantee no longer strictly holds after the search).
    """
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError("alpha and delta must lie in (0, 1)")
    p = _scores(p)
    y = np.asarray(y_true).reshape(-1)
    if len(y) != len(p) or not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be 0/1 with one label per score")
    order = np.argsort(-p, kind="mergesort")
    p_sorted, err_sorted = p[order], 1 - y[order].astype(np.int64)
    cum_err = np.cumsum(err_sorted)
    # Accepting p >= t takes whole tie blocks: evaluate at each block's last index.
    ends = np.flatnonzero(np.r_[p_sorted[1:] != p_sorted[:-1], True])
    best = RiskControlledThreshold(math.inf, 0.0, 0, 0.0, 1.0, alpha, delta)
    n_min = min_accepted(alpha, delta)
    for end in ends:
        n_acc = int(end + 1)
        if n_acc < n_min:
            continue
        errors = int(cum_err[end])
        bound = clopper_pearson_upper(errors, n_acc, delta)
        if bound <= alpha:
            best = RiskControlledThreshold(
                float(p_sorted[end]), n_acc / len(p), n_acc, errors / n_acc, bound, alpha, delta
            )
        elif fixed_sequence:
            break
    return best
