"""Calibration that follows the traffic: feedback labels refit a shadow calibrator, and a drift signal says when the
traffic has left the fitting distribution.

The served probability of a prompt comes from one *calibration slot* of the artifact: the Platt of its kind's
stacker (``choice`` / ``open``) or the value calibrator (``value``; see ``ValueProbe.calibration_slot``). Every
remembered request keeps the logit of the probability the *fitted* artifact (calibration version 0) would have
served, ``z0``; the live calibration is then ``logit(p) = A * z0 + B`` with the ``(A, B)`` the promoted
recalibrations composed (``ValueProbe.origin_maps``), so feedback gathered under any version is comparable.

:class:`ShadowCalibrator` holds the last ``window`` labelled ``z0`` per slot and compares, on feedback neither was
fitted on, the live map with a Platt refitted on the window: cross-fitted over contiguous folds (each fold scored
by a Platt fitted on the others), Brier and ECE side by side. A slot whose shadow is better is *promotable*; the
sidecar then composes the Platt fitted on the whole window into a new artifact (``ValueProbe.recalibrated``).

:class:`DriftMonitor` compares the distribution of the fitted artifact's probability over the last ``window``
scored prompts with its distribution on the artifact's test split (the eval card's reliability counts), as a
population stability index per kind, and keeps the out-of-distribution rate over the same window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.special import expit

from valueprobe.calibration.calibrators import PlattCalibrator
from valueprobe.calibration.metrics import bin_index, brier_loss, expected_calibration_error
from valueprobe.plugin.readout import clipped_logit

N_BINS = 10  # the feedback metrics' and the eval card's bins
P_CLIP = 1e-6


def to_logit(p) -> np.ndarray:
    return clipped_logit(p, P_CLIP)


def fitted_logit(probability: float, origin_map: tuple[float, float] = (1.0, 0.0)) -> float:
    """The logit the fitted artifact would have served behind a served ``probability``: undo the promoted
    recalibrations' map ``logit(p) = a * logit(p0) + b`` of its slot (``ValueProbe.origin_maps``)."""
    a, b = origin_map
    return float((to_logit(probability) - b) / a)


def population_stability_index(expected_counts, actual_counts, eps: float = 1e-4) -> float:
    """PSI between two histograms over the same bins: ``sum((a - e) * ln(a / e))`` over bin shares (each share
    floored at ``eps`` so an empty bin does not make it infinite). Rule of thumb: < 0.1 stable, 0.1-0.25 moderate
    shift, > 0.25 large shift."""
    e = np.asarray(expected_counts, dtype=np.float64)
    a = np.asarray(actual_counts, dtype=np.float64)
    if e.shape != a.shape or e.sum() <= 0 or a.sum() <= 0:
        raise ValueError("two non-empty histograms over the same bins are needed")
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def histogram(p, n_bins: int = N_BINS) -> np.ndarray:
    """Counts of ``p`` in ``n_bins`` equal-width bins of [0, 1] (the last bin closed)."""
    return np.bincount(bin_index(p, n_bins), minlength=n_bins)


def card_reference(eval_card: dict, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per kind, the served probability's histogram on the artifact's test split, from the eval card's
    reliability table (``confidence`` = mean probability of each non-empty bin, ``count``). Empty for a card
    without one."""
    out = {}
    for kind, table in (eval_card or {}).get("reliability", {}).items():
        conf, count = table.get("confidence"), table.get("count")
        if not conf or not count or len(conf) != len(count):
            continue
        hist = np.zeros(n_bins)
        for c, k in zip(conf, count):
            hist[min(int(float(c) * n_bins), n_bins - 1)] += k
        if hist.sum() > 0:
            out[kind] = hist
    return out


@dataclass
class SlotReport:
    """The live and shadow calibrations of one slot, compared on held-out feedback."""

    slot: str
    n: int
    positives: int
    live_brier: float | None = None
    live_ece: float | None = None
    shadow_brier: float | None = None
    shadow_ece: float | None = None
    a: float | None = None  # the shadow, fitted on the whole window: logit(p) = a * z0 + b
    b: float | None = None
    promotable: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ShadowCalibrator:
    """Per slot, the last ``window`` labelled feedback (``z0``, correct) and a Platt refitted on them.

    ``report(live)`` compares, per slot, the live map ``live[slot] = (A, B)`` with the shadow on feedback each was
    not fitted on (``folds`` contiguous folds; the live map was fitted on none of it). A slot is promotable with at
    least ``min_feedback`` labels of both outcomes, a positive shadow slope, and a held-out Brier below the live one
    by more than ``margin``."""

    window: int = 500
    min_feedback: int = 100
    folds: int = 5
    margin: float = 0.0
    store_: dict[str, deque] = field(default_factory=dict)
    seen_: int = 0

    def add(self, slot: str, z0: float, correct: bool) -> None:
        self.store_.setdefault(slot, deque(maxlen=self.window)).append((float(z0), int(bool(correct))))
        self.seen_ += 1

    def snapshot(self) -> ShadowCalibrator:
        """A copy to compare in a worker thread while feedback keeps arriving on the event loop."""
        return ShadowCalibrator(self.window, self.min_feedback, self.folds, self.margin,
                                {slot: deque(rows, maxlen=self.window) for slot, rows in self.store_.items()}, self.seen_)

    def counts(self) -> dict[str, int]:
        return {slot: len(rows) for slot, rows in self.store_.items()}

    def report(self, live: dict[str, tuple[float, float]]) -> dict[str, SlotReport]:
        return {slot: self._slot_report(slot, live.get(slot, (1.0, 0.0))) for slot in sorted(self.store_)}

    def _slot_report(self, slot: str, live_map: tuple[float, float]) -> SlotReport:
        rows = np.array(self.store_[slot], dtype=np.float64).reshape(-1, 2)
        z0, y = rows[:, 0], rows[:, 1].astype(int)
        rep = SlotReport(slot, len(y), int(y.sum()))
        if rep.n == 0:
            rep.reason = "no feedback"
            return rep
        live_p = expit(live_map[0] * z0 + live_map[1])
        rep.live_brier = brier_loss(y, live_p)
        rep.live_ece = expected_calibration_error(y, live_p, n_bins=N_BINS)
        if rep.positives in (0, rep.n):
            rep.reason = "feedback holds one outcome only"
            return rep
        held_out = np.full(rep.n, np.nan)
        for fold in np.array_split(np.arange(rep.n), min(self.folds, rep.n)):
            train = np.setdiff1d(np.arange(rep.n), fold)
            if len(np.unique(y[train])) < 2:
                continue
            held_out[fold] = PlattCalibrator().fit(z0[train], y[train]).predict_proba(z0[fold])
        scored = ~np.isnan(held_out)
        rep.shadow_brier = brier_loss(y[scored], held_out[scored])
        rep.shadow_ece = expected_calibration_error(y[scored], held_out[scored], n_bins=N_BINS)
        live_scored = brier_loss(y[scored], live_p[scored])  # the same rows for both
        full = PlattCalibrator().fit(z0, y)
        rep.a, rep.b = full.a_, full.b_
        if rep.n < self.min_feedback:
            rep.reason = f"{rep.n} labels; promotion needs {self.min_feedback}"
        elif rep.a <= 0:
            rep.reason = "the refitted slope is not positive (the score ranks the other way on this feedback)"
        elif not rep.shadow_brier < live_scored - self.margin:
            rep.reason = f"shadow Brier {rep.shadow_brier:.4f} is not below live {live_scored:.4f} - margin {self.margin:g}"
        else:
            rep.promotable, rep.reason = True, "shadow better on held-out feedback"
        return rep


@dataclass
class DriftMonitor:
    """The fitted artifact's probability over the last ``window`` scored prompts, per kind, against a reference
    histogram (the eval card's test split; a kind without one takes its first full window), and the share of
    those prompts flagged out of distribution."""

    reference: dict[str, np.ndarray] = field(default_factory=dict)
    window: int = 1000
    min_prompts: int = 200  # PSI and OOD rate of a kind only from this many prompts in its window
    recent_: dict[str, deque] = field(default_factory=dict)
    ood_: dict[str, deque] = field(default_factory=dict)

    def observe(self, kind: str, p0: float, ood: bool | None) -> None:
        recent = self.recent_.setdefault(kind, deque(maxlen=self.window))
        recent.append(float(p0))
        if ood is not None:
            self.ood_.setdefault(kind, deque(maxlen=self.window)).append(bool(ood))
        if kind not in self.reference and len(recent) == self.window:
            self.reference[kind] = histogram(recent)

    def stats(self) -> dict[str, dict]:
        """Per kind: ``n`` (prompts in the window), ``psi`` and ``ood_rate`` (``None`` below ``min_prompts``: a
        PSI of a few prompts is noise), ``min_prompts``."""
        out = {}
        for kind, recent in self.recent_.items():
            enough = len(recent) >= self.min_prompts
            ref = self.reference.get(kind)
            psi = population_stability_index(ref, histogram(recent)) if ref is not None and enough else None
            ood = self.ood_.get(kind)
            out[kind] = {"n": len(recent), "min_prompts": self.min_prompts, "psi": psi,
                         "ood_rate": float(np.mean(ood)) if ood and enough else None}
        return out


def accuracy_agreement(served: list[float], labels: list[int], z: float = 1.96) -> dict:
    """Does the served confidence still mean what it says? The label-free accuracy estimate (mean served
    probability of ``served``, interval from the Bernoulli variances: ``sqrt(sum p(1-p)) / n``) beside the accuracy
    of ``labels`` (Wilson interval); ``disagree`` when the intervals do not overlap. ``None`` parts where a side is
    empty."""
    out: dict = {"expected": None, "observed": None, "disagree": None}
    if served:
        p = np.asarray(served, dtype=np.float64)
        mean, half = float(p.mean()), z * float(np.sqrt(np.sum(p * (1 - p)))) / len(p)
        out["expected"] = {"n": len(p), "estimate": mean, "low": max(0.0, mean - half), "high": min(1.0, mean + half)}
    if labels:
        n, k = len(labels), int(np.sum(labels))
        phat = k / n
        centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        out["observed"] = {"n": n, "estimate": phat, "low": float(max(0.0, centre - half)),
                           "high": float(min(1.0, centre + half))}
    if out["expected"] and out["observed"]:
        e, o = out["expected"], out["observed"]
        out["disagree"] = bool(e["high"] < o["low"] or o["high"] < e["low"])
    return out


def calibration_folder(configured: str | None, origin_sha256: str):
    """Where promoted calibrations of the fitted artifact ``origin_sha256`` are written and found again."""
    from pathlib import Path

    from valueprobe.plugin.models import cache_dir

    return Path(configured) if configured else cache_dir() / "calibrations" / origin_sha256[:12]


def next_artifact_path(folder, version: int):
    """``v<version>.<random>.safetensors`` in ``folder``: never an existing file, and never the name another
    replica sharing the folder is writing for the same version at the same moment (the loser of a promotion race
    deletes its own file, not the winner's)."""
    import uuid

    while True:
        path = folder / f"v{version}.{uuid.uuid4().hex[:10]}.safetensors"
        if not path.exists():
            return path
