"""Feedback on served requests and the calibration that follows it, held for one sidecar.

:class:`FeedbackLoop` keeps what a label needs (the requests served here, :class:`Remembered`), the shadow calibrator
and the drift window of the fitted artifact the served one descends from (:mod:`.recalibration`), and works out a
promotion (which slots, which maps); swapping the new artifact in stays with the sidecar, as a reload does.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

from scipy.special import expit

from valueprobe.plugin import ProbeResult, ValueProbe
from valueprobe.plugin.readout import map_between

from .errors import ConflictError, NotFoundError
from .recalibration import DriftMonitor, ShadowCalibrator, card_reference, fitted_logit

__all__ = ["FeedbackLoop", "Remembered"]

#: requests remembered for a label (the oldest forgotten first)
REMEMBERED = 10_000


@dataclass
class Remembered:
    """What feedback on a request needs: the probability served, the calibration slot and the fitted artifact's
    logit behind it (``z0``, comparable across calibration versions), and whether the answer was the local
    model's (abstained, escalated and replaced answers say nothing about the probe's calibration)."""

    probability: float
    slot: str
    z0: float
    local: bool
    labelled: bool = False  # a repeated label (a client's retry) must not count twice in the shadow


class FeedbackLoop:
    def __init__(self, settings, metrics, probe: ValueProbe):
        self.settings, self.metrics = settings, metrics
        self._recent: OrderedDict[str, Remembered] = OrderedDict()
        metrics.set_window(settings.feedback_window)
        self.reset(probe)

    def reset(self, probe: ValueProbe) -> None:
        """A new shadow and drift window for the fitted artifact ``probe`` descends from (kept across promotions
        of the same one: its feedback stays comparable; reset by a reload of another)."""
        s = self.settings
        self.origin = probe.calibration_origin
        self.shadow = None if s.recalibration == "off" else ShadowCalibrator(
            window=s.recalibration_window, min_feedback=s.recalibration_min_feedback, margin=s.recalibration_margin)
        self.drift = DriftMonitor(card_reference(probe.eval_card), window=s.drift_window)
        self._observed = 0

    @staticmethod
    def slot_and_fitted_logit(probe: ValueProbe, kind: str, probability: float) -> tuple[str, float]:
        """``(slot, z0)``: the calibration slot that served ``probability`` and the logit the fitted artifact
        (calibration version 0) would have served, undoing the promoted recalibrations."""
        slot = probe.calibration_slot(kind)
        return slot, fitted_logit(probability, probe.origin_maps().get(slot, (1.0, 0.0)))

    # -- what was served --------------------------------------------------------------------------------------------
    def observe(self, probe: ValueProbe, result: ProbeResult, decision: str,
                request_id: str | None = None) -> tuple[str, float]:
        """A scored prompt into the drift window (and, with ``request_id``, remembered for its label); returns its
        ``(slot, z0)``."""
        slot, z0 = self.slot_and_fitted_logit(probe, result.kind, result.probability)
        self.drift.observe(result.kind, float(expit(z0)), result.ood)
        self._observed += 1
        if self._observed % 50 == 0:
            self.publish_drift()
        if request_id is not None:
            self._recent[request_id] = Remembered(result.probability, slot, z0, local=decision == "answer")
            while len(self._recent) > REMEMBERED:
                self._recent.popitem(last=False)
        return slot, z0

    def not_local(self, request_id: str) -> None:
        """The answer served for ``request_id`` was replaced by the escalation target's: no feedback on ours."""
        if request_id in self._recent:
            self._recent[request_id].local = False

    def publish_drift(self) -> dict:
        stats = self.drift.stats()
        for kind, st in stats.items():
            if st["psi"] is not None:
                self.metrics.score_psi.labels(kind=kind).set(st["psi"])
            if st["ood_rate"] is not None:
                self.metrics.ood_rate.labels(kind=kind).set(st["ood_rate"])
        return stats

    # -- labels ---------------------------------------------------------------------------------------------------
    def label(self, probe: ValueProbe, request_id: str, correct: bool, probability: float | None,
              kind: str | None = None) -> tuple[dict, dict]:
        """Record a label: the feedback metrics (every answer), and the shadow calibrator (answers the local model
        gave, remembered here or sent with ``probability`` and ``kind``, assumed served by ``probe``'s
        calibration). Returns the window's ECE/Brier and what recalibration did with it (``used``, ``reason``)."""
        remembered = self._recent.get(request_id)
        p = probability if probability is not None else (remembered.probability if remembered else None)
        if p is None:
            raise NotFoundError(f"unknown request_id {request_id!r} on this replica: send 'probability' with the feedback")
        window = self.metrics.record_feedback(p, correct)
        if self.shadow is None:
            return window, {"used": False, "reason": "recalibration is off"}
        if remembered is not None:
            if not remembered.local:
                return window, {"used": False, "reason": "the answer served was not the local model's (abstained, "
                                "escalated or replaced): it says nothing about this probe's calibration"}
            if remembered.labelled:
                return window, {"used": False, "reason": "this request was labelled already; the shadow keeps the first label"}
            remembered.labelled = True
            slot, z0 = remembered.slot, remembered.z0
        elif kind is not None:  # served by another replica, assumed on this calibration version
            slot, z0 = self.slot_and_fitted_logit(probe, kind, p)
        else:
            return window, {"used": False, "reason": "request not served here: send 'kind' with 'probability' to "
                            "use it for recalibration"}
        self.shadow.add(slot, z0, correct)
        self.metrics.calibration_feedback.labels(slot=slot).set(self.shadow.counts()[slot])
        return window, {"used": True, "slot": slot}

    def promotion_due(self) -> bool:
        """``auto``: the shadow is compared with the live calibration every ``recalibration_every`` labels."""
        return (self.settings.recalibration == "auto" and self.shadow is not None
                and self.shadow.seen_ % self.settings.recalibration_every == 0)

    # -- the calibration that follows -----------------------------------------------------------------------------
    async def report(self, probe: ValueProbe) -> dict:
        """The live calibration against the shadow on held-out feedback, per slot, and the drift window (the
        gauges are set from it)."""
        slots = {} if self.shadow is None else await asyncio.to_thread(self.shadow.snapshot().report, probe.origin_maps())
        for slot, rep in slots.items():
            for who in ("live", "shadow"):
                brier, ece = getattr(rep, f"{who}_brier"), getattr(rep, f"{who}_ece")
                if brier is not None:
                    self.metrics.calibration_brier.labels(slot=slot, calibrator=who).set(brier)
                    self.metrics.calibration_ece.labels(slot=slot, calibrator=who).set(ece)
        return {"mode": self.settings.recalibration, "artifact_id": probe.artifact_id,
                "calibration_version": probe.calibration_version, "calibration_origin": probe.calibration_origin[:12],
                "recalibration": probe.data.json("recalibration"),
                "slot_of_kind": {kind: probe.calibration_slot(kind) for kind in ("choice", "open")},
                "slots": {s: r.to_dict() for s, r in slots.items()},
                "drift": self.publish_drift()}

    async def promotion(self, probe: ValueProbe, trigger: str) -> tuple[dict, dict, dict]:
        """``(chosen, maps, record)`` for promoting the shadow of every slot where it beats ``probe``'s live
        calibration on held-out feedback: each chosen slot's report, the map ``logit' = a * logit + b`` from the
        live calibration to the shadow's, and the record the new artifact carries. :class:`ConflictError` when no
        slot qualifies (or recalibration is off)."""
        if self.shadow is None:
            raise ConflictError("recalibration is off on this sidecar (--recalibration shadow or auto)")
        live = probe.origin_maps()
        report = await asyncio.to_thread(self.shadow.snapshot().report, live)
        chosen = {slot: rep for slot, rep in report.items() if rep.promotable}
        if not chosen:
            reasons = "; ".join(f"{slot}: {rep.reason}" for slot, rep in report.items()) or "no feedback yet"
            raise ConflictError(f"nothing to promote, still serving {probe.artifact_id} (calibration "
                                f"{probe.calibration_version}): {reasons}")
        # from the live map to the shadow's: logit' = a * logit + b
        maps = {slot: map_between(live.get(slot, (1.0, 0.0)), (rep.a, rep.b)) for slot, rep in chosen.items()}
        record = {"trigger": trigger, "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "evidence": {slot: rep.to_dict() for slot, rep in chosen.items()},
                  "thresholds": "carried over from the fitted artifact (probabilities, not re-fitted)"}
        return chosen, maps, record
