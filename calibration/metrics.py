"""Metrics for confidence scores, as pure functions.

Naming follows scikit-learn: ``*_score`` is higher-is-better, ``*_loss`` / ``*_error`` lower-is-better. Inputs
are ``y_true`` in {0, 1} (1 = the model's answer was correct) and a score where higher means "more likely
correct". Degenerate input (one class only for ranking metrics, mismatched lengths, probabilities outside
[0, 1]) raises ``ValueError``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score

__all__ = [
    "mcnemar_p",
    "bin_index",
    "auroc_score",
    "auprc_score",
    "brier_loss",
    "expected_calibration_error",
    "reliability_curve",
    "risk_coverage_curve",
    "aurc_loss",
    "prr_score",
    "auroc_confidence_interval",
]


def _check(y_true, y_score, *, probabilities: bool = False, both_classes: bool = False):
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 1 or y_score.ndim != 1:
        raise ValueError("y_true and y_score must be 1-D")
    if len(y_true) != len(y_score):
        raise ValueError(f"length mismatch: {len(y_true)} labels, {len(y_score)} scores")
    if len(y_true) == 0:
        raise ValueError("empty input")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score has non-finite values")
    if probabilities and ((y_score < 0).any() or (y_score > 1).any()):
        raise ValueError("probabilities must lie in [0, 1]")
    if both_classes and len(np.unique(y_true)) < 2:
        raise ValueError("only one class present in y_true; the metric is undefined")
    return y_true.astype(np.int64), y_score


def _auroc_rows(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``[b, n]`` labels and scores (every row holds both classes): Mann-Whitney U on average
    ranks, ties counted half, which is what ``roc_auc_score`` computes, without its per-call input validation
    (fits and bootstraps call this thousands of times)."""
    from scipy.stats import rankdata

    n_pos = y_true.sum(axis=1).astype(np.float64)
    ranks = rankdata(y_score, axis=1)
    return ((ranks * y_true).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * (y_true.shape[1] - n_pos))


def auroc_score(y_true, y_score) -> float:
    """Area under the ROC curve (equal to scikit-learn's ``roc_auc_score``)."""
    y_true, y_score = _check(y_true, y_score, both_classes=True)
    return float(_auroc_rows(y_true[None], y_score[None])[0])


def auprc_score(y_true, y_score) -> float:
    """Average precision for the *correct* class (scikit-learn's ``average_precision_score``)."""
    y_true, y_score = _check(y_true, y_score, both_classes=True)
    return float(average_precision_score(y_true, y_score))


def brier_loss(y_true, y_prob) -> float:
    """Mean squared error between the probability and the outcome."""
    y_true, y_prob = _check(y_true, y_prob, probabilities=True)
    return float(np.mean((y_prob - y_true) ** 2))


def bin_index(y_prob, n_bins: int) -> np.ndarray:
    """Each probability's equal-width bin of [0, 1] (``0 .. n_bins - 1``; 1.0 falls in the last bin)."""
    return np.minimum((np.asarray(y_prob, dtype=np.float64) * n_bins).astype(int), n_bins - 1)


def _bin_edges(y_prob: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        edges = np.quantile(y_prob, np.linspace(0.0, 1.0, n_bins + 1))
        edges[0], edges[-1] = 0.0, 1.0
        return np.unique(edges)
    raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")


def reliability_curve(y_true, y_prob, *, n_bins: int = 15, strategy: str = "uniform"):
    """Per non-empty bin: ``(mean predicted probability, observed accuracy, count)`` as three arrays."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y_true, y_prob = _check(y_true, y_prob, probabilities=True)
    edges = _bin_edges(y_prob, n_bins, strategy)
    # Right-closed last bin so that p = 1.0 lands in it.
    ids = np.clip(np.searchsorted(edges, y_prob, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(ids, minlength=len(edges) - 1)
    conf = np.bincount(ids, weights=y_prob, minlength=len(edges) - 1)
    acc = np.bincount(ids, weights=y_true, minlength=len(edges) - 1)
    keep = counts > 0
    return conf[keep] / counts[keep], acc[keep] / counts[keep], counts[keep]


def expected_calibration_error(y_true, y_prob, *, n_bins: int = 15, strategy: str = "uniform") -> float:
    """ECE: count-weighted mean |accuracy − confidence| over bins.

    ``strategy="uniform"`` uses equal-width bins, ``"quantile"`` equal-mass bins.
    """
    conf, acc, counts = reliability_curve(y_true, y_prob, n_bins=n_bins, strategy=strategy)
    return float(np.sum(counts * np.abs(acc - conf)) / np.sum(counts))


def risk_coverage_curve(y_true, y_score):
    """Selective prediction: accept the ``c`` most confident answers, for c = 1..n.

    Returns ``(coverage, risk)`` where risk is the error rate among accepted answers. Ties in the score are
    accepted together (their risk is averaged), so the curve does not depend on the input order.
    """
    y_true, y_score = _check(y_true, y_score)
    order = np.argsort(-y_score, kind="mergesort")
    errors = 1 - y_true[order]
    scores = y_score[order]
    cum_err = np.cumsum(errors)
    n = len(y_true)
    # At a tie block's end, every member is accepted; inside a block use the block-end value, interpolated.
    last_of_block = np.r_[scores[1:] != scores[:-1], True]
    block_end = np.flatnonzero(last_of_block)
    block_id = np.searchsorted(block_end, np.arange(n))
    start = np.r_[0, block_end[:-1] + 1][block_id]
    end = block_end[block_id]
    err_before = np.r_[0, cum_err][start]
    block_err = cum_err[end] - err_before
    within = np.arange(n) - start + 1
    expected_err = err_before + block_err * within / (end - start + 1)
    coverage = np.arange(1, n + 1) / n
    return coverage, expected_err / np.arange(1, n + 1)


def aurc_loss(y_true, y_score) -> float:
    """Area under the risk-coverage curve (mean selective risk over coverages 1/n..1). Lower is better."""
    _, risk = risk_coverage_curve(y_true, y_score)
    return float(np.mean(risk))


def prr_score(y_true, y_score) -> float:
    """Prediction rejection ratio: (AURC_random − AURC) / (AURC_random − AURC_oracle).

    1 is an oracle, 0 is no better than random rejection, negative is worse than random.
    """
    y_true, y_score = _check(y_true, y_score, both_classes=True)
    error_rate = 1 - y_true.mean()
    random_aurc = error_rate
    oracle_aurc = aurc_loss(y_true, y_true.astype(np.float64))
    if random_aurc - oracle_aurc <= 0:
        raise ValueError("PRR undefined: oracle and random rejection coincide")
    return float((random_aurc - aurc_loss(y_true, y_score)) / (random_aurc - oracle_aurc))


def auroc_confidence_interval(y_true, y_score, *, level: float = 0.95, n_boot: int = 500, seed: int = 0):
    """Percentile bootstrap interval for AUROC (resampling questions). Resamples with one class are skipped.

    All resamples are scored at once (Mann-Whitney U on average ranks, ties counted half, which is what
    ``roc_auc_score`` computes): a fit draws a few dozen intervals, and scoring 500 resamples one by one through
    scikit-learn's input validation was nearly all of a small fit's time."""
    y_true, y_score = _check(y_true, y_score, both_classes=True)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    idx = rng.integers(0, n, (n_boot, n))  # the same draws, in the same order, as n_boot calls of size n
    yt, ys = y_true[idx], y_score[idx]
    n_pos = yt.sum(axis=1)
    keep = (n_pos > 0) & (n_pos < n)
    stats = _auroc_rows(yt[keep], ys[keep])
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def mcnemar_p(before, after) -> float:
    """McNemar's exact test (two-sided binomial on the discordant pairs) for two paired 0/1 outcome vectors."""
    from scipy.stats import binomtest

    before, after = np.asarray(before), np.asarray(after)
    lost = int(((before == 1) & (after == 0)).sum())
    gained = int(((before == 0) & (after == 1)).sum())
    if lost + gained == 0:
        return 1.0
    return float(binomtest(lost, lost + gained, 0.5, alternative="two-sided").pvalue)
