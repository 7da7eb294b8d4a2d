"""Feedback on served requests and the calibration that follows it, kept in the store every replica shares.

:class:`FeedbackLoop` writes each scored request to the store (:mod:`.store`: a background writer, never on the
response path), takes labels for any request id (served here or by another replica sharing the store), keeps the
drift window of the fitted artifact the served one descends from (:mod:`.recalibration`), refits the shadow
calibrator from the store's labels, and works out a promotion (which slots, which maps); swapping the new artifact
in, recording it in the store and following other replicas' promotions stay with the sidecar.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from scipy.special import expit
from sqlalchemy.exc import SQLAlchemyError

from valueprobe.plugin import ProbeResult, ValueProbe
from valueprobe.plugin.readout import map_between

from .errors import ConflictError, NotFoundError, StoreUnavailableError
from .recalibration import DriftMonitor, ShadowCalibrator, accuracy_agreement, card_reference, fitted_logit
from .store import RequestRecord, RequestUpdate, Store

__all__ = ["FeedbackLoop", "Remembered"]

#: this replica's requests also kept in memory (the newest), so a label right after the answer needs no read
REMEMBERED = 10_000
#: how long a label waits for its request's row to reach the store (written by the serving replica's writer)
ROW_WAIT_S = 1.0


@dataclass
class Remembered:
    """What feedback on a request needs: the probability served, the calibration slot and the fitted artifact's
    logit behind it (``z0``, comparable across calibration versions), and whether the answer was the local
    model's (abstained, escalated and replaced answers say nothing about the probe's calibration)."""

    probability: float
    slot: str
    z0: float
    local: bool

    @classmethod
    def of(cls, record: RequestRecord) -> Remembered:
        return cls(record.probability, record.slot, record.z0, record.local)


class FeedbackLoop:
    def __init__(self, settings, metrics, probe: ValueProbe, store: Store):
        self.settings, self.metrics, self.store = settings, metrics, store
        self._recent: OrderedDict[str, Remembered] = OrderedDict()
        self._local_p: dict[str, list[float]] = {}  # served P of local answers in the drift window, per kind
        self._labels: int | None = None  # the store's label count for the fitted artifact, as last read
        metrics.set_window(settings.feedback_window)
        self.reset(probe)

    def reset(self, probe: ValueProbe) -> None:
        """A new drift window for the fitted artifact ``probe`` descends from (kept across promotions of the same
        one: its feedback stays comparable; reset by a reload of another). :meth:`restore` fills it from the store."""
        s = self.settings
        self.origin = probe.calibration_origin
        self.drift = DriftMonitor(card_reference(probe.eval_card), window=s.drift_window, min_prompts=s.drift_min_prompts)
        self._local_p = {}
        self._observed = 0
        self._bucket: int | None = None  # auto promotion: the multiple of recalibration_every last seen

    async def restore(self) -> None:
        """After a start or a reload: the drift window, the feedback window and the label counts from the store
        (every replica's), so a restart forgets none of them."""
        scores, window, counts = await asyncio.gather(
            asyncio.to_thread(self.store.recent_scores, self.origin, self.settings.drift_window),
            asyncio.to_thread(self.store.recent_labels, self.settings.feedback_window),
            asyncio.to_thread(self.store.label_counts, self.origin))
        for kind, rows in scores.items():
            for z0, ood, local, probability in rows:
                self._observe_window(kind, z0, ood, local, probability)
        self.metrics.replace_window(window)
        self.metrics.window_stats()
        self._publish_counts(counts)
        self._labels = sum(counts.values())
        self._bucket = self._labels // self.settings.recalibration_every
        self.publish_drift()

    @property
    def shadow_on(self) -> bool:
        return self.settings.recalibration != "off"

    @staticmethod
    def slot_and_fitted_logit(probe: ValueProbe, kind: str, probability: float) -> tuple[str, float]:
        """``(slot, z0)``: the calibration slot that served ``probability`` and the logit the fitted artifact
        (calibration version 0) would have served, undoing the promoted recalibrations."""
        slot = probe.calibration_slot(kind)
        return slot, fitted_logit(probability, probe.origin_maps().get(slot, (1.0, 0.0)))

    # -- what was served --------------------------------------------------------------------------------------------
    def _observe_window(self, kind: str, z0: float, ood: bool | None, local: bool, probability: float) -> None:
        self.drift.observe(kind, float(expit(z0)), ood)
        if local:
            served = self._local_p.setdefault(kind, [])
            served.append(float(probability))
            del served[:-self.settings.drift_window]

    def observe(self, probe: ValueProbe, result: ProbeResult, decision: str,
                request_id: str | None = None) -> tuple[str, float]:
        """A scored prompt into the drift window and the store (queued; with ``request_id`` also remembered here for
        its label); returns its ``(slot, z0)``."""
        slot, z0 = self.slot_and_fitted_logit(probe, result.kind, result.probability)
        local = decision == "answer"
        self._observe_window(result.kind, z0, result.ood, local, result.probability)
        self._observed += 1
        if self._observed % 50 == 0:
            self.publish_drift()
        if request_id is not None:
            self._recent[request_id] = Remembered(result.probability, slot, z0, local=local)
            while len(self._recent) > REMEMBERED:
                self._recent.popitem(last=False)
        self.store.record_request(RequestRecord(
            request_id=request_id or f"unlabelled-{uuid.uuid4().hex}", created_at=time.time(), origin=self.origin,
            artifact_id=probe.artifact_id, calibration_version=probe.calibration_version, kind=result.kind, slot=slot,
            probability=float(result.probability), z0=float(z0), local=local, replica=self.store.replica,
            ood=None if result.ood is None else bool(result.ood)))
        return slot, z0

    def not_local(self, request_id: str) -> None:
        """The answer served for ``request_id`` was replaced by the escalation target's: no feedback on ours."""
        if request_id in self._recent:
            self._recent[request_id].local = False
        self.store.record_request(RequestUpdate(request_id, local=False))

    def answer_read(self, request_id: str, probability: float) -> None:
        """The answer-level probability of ``request_id``'s answer, once it exists (kept beside the request)."""
        self.store.record_request(RequestUpdate(request_id, answer_probability=float(probability)))

    def publish_drift(self) -> dict:
        stats = self.drift.stats()
        for kind, st in stats.items():
            self.metrics.drift_window_prompts.labels(kind=kind).set(st["n"])
            if st["psi"] is not None:
                self.metrics.score_psi.labels(kind=kind).set(st["psi"])
            if st["ood_rate"] is not None:
                self.metrics.ood_rate.labels(kind=kind).set(st["ood_rate"])
        self.publish_accuracy()
        return stats

    def publish_accuracy(self) -> dict:
        """The label-free accuracy estimate of local answers beside the labelled feedback's accuracy, and the
        alarm when they disagree (:func:`accuracy_agreement`)."""
        served = [p for ps in self._local_p.values() for p in ps]
        check = accuracy_agreement(served, self.metrics.window_labels())
        for side, gauge in (("expected", self.metrics.expected_accuracy), ("observed", self.metrics.feedback_accuracy)):
            if check[side] is not None:
                for bound in ("estimate", "low", "high"):
                    gauge.labels(bound=bound).set(check[side][bound])
        if check["disagree"] is not None:
            self.metrics.accuracy_disagreement.set(int(check["disagree"]))
        return check

    async def refresh_counts(self) -> None:
        """The store's label counts (every replica's) into the metrics."""
        counts = await asyncio.to_thread(self.store.label_counts, self.origin)
        self._publish_counts(counts)

    def _publish_counts(self, counts: dict[str, int]) -> None:
        for slot, n in counts.items():
            self.metrics.calibration_feedback.labels(slot=slot).set(n)

    # -- labels ---------------------------------------------------------------------------------------------------
    async def _remembered(self, request_id: str, wait: bool) -> Remembered | None:
        """The request as served: this replica's memory, else the store (another replica's row may still be in
        its writer's queue: with ``wait`` it is looked for again for up to :data:`ROW_WAIT_S`)."""
        if request_id in self._recent:
            return self._recent[request_id]
        deadline = time.monotonic() + (ROW_WAIT_S if wait else 0.0)
        while True:
            record = await asyncio.to_thread(self.store.request, request_id)
            if record is not None:
                return Remembered.of(record)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.1)

    async def label(self, probe: ValueProbe, request_id: str, correct: bool, probability: float | None,
                    kind: str | None = None) -> tuple[dict, dict]:
        """See :meth:`_label`; a store that does not answer is :class:`StoreUnavailableError` (503, retry): a label
        is acknowledged only once it is kept."""
        try:
            return await self._label(probe, request_id, correct, probability, kind)
        except SQLAlchemyError as exc:
            raise StoreUnavailableError(f"the feedback store does not answer ({exc.__class__.__name__}); the label "
                                        "was not kept: send it again") from None

    async def _label(self, probe: ValueProbe, request_id: str, correct: bool, probability: float | None,
                     kind: str | None = None) -> tuple[dict, dict]:
        """Record a label in the store (written before it is acknowledged) for a request served by any replica
        sharing it: the feedback metrics (every answer, once), and the shadow calibration (answers the local model
        gave, found in the store or sent with ``probability`` and ``kind``, assumed served by ``probe``'s
        calibration). Returns the window's ECE/Brier and what recalibration did with it (``used``, ``reason``,
        ``label``: new, repeat or conflict)."""
        remembered = await self._remembered(request_id, wait=probability is None)
        p = probability if probability is not None else (remembered.probability if remembered else None)
        if p is None:
            raise NotFoundError(f"unknown request_id {request_id!r}: no replica sharing this store served it (or "
                                "retention forgot it); send 'probability' with the feedback")
        slot = z0 = None
        if not self.shadow_on:
            reason = "recalibration is off"
        elif remembered is not None and not remembered.local:
            reason = ("the answer served was not the local model's (abstained, escalated or replaced): it says "
                      "nothing about this probe's calibration")
        elif remembered is not None:
            slot, z0, reason = remembered.slot, remembered.z0, None
        elif kind is not None:  # not in the store (retention, another store): assumed on this calibration version
            (slot, z0), reason = self.slot_and_fitted_logit(probe, kind, p), None
        else:
            reason = "request not in the store: send 'kind' with 'probability' to use it for recalibration"
        write = await asyncio.to_thread(self.store.add_label, request_id=request_id, correct=bool(correct),
                                        origin=self.origin, probability=float(p), slot=slot, z0=z0,
                                        used=reason is None)
        if write.status == "new":
            self.metrics.store_writes.labels(table="labels").inc()
            window = self.metrics.record_feedback(
                p, correct, await asyncio.to_thread(self.store.recent_labels, self.settings.feedback_window))
        else:
            window = self.metrics.window_stats()
        self.publish_accuracy()
        if write.status == "conflict":
            self.metrics.label_conflicts.inc()
            return window, {"used": False, "label": "conflict", "reason": "this request was labelled before with the "
                            "other outcome: the first label stays; this one is kept apart and counted "
                            "(valueprobe_label_conflicts_total)"}
        if write.status == "repeat":
            return window, {"used": False, "label": "repeat", "reason": "this request was labelled already; the "
                            "first label counts, once"}
        if reason is not None:
            return window, {"used": False, "label": "new", "reason": reason}
        counts = await asyncio.to_thread(self.store.label_counts, self.origin)
        self._publish_counts(counts)
        self._labels = sum(counts.values())
        return window, {"used": True, "label": "new", "slot": slot}

    def promotion_due(self) -> bool:
        """``auto``: the shadow is compared with the live calibration each time the store's label count (every
        replica's) passes a multiple of ``recalibration_every``."""
        if self.settings.recalibration != "auto" or self._labels is None:
            return False
        bucket = self._labels // self.settings.recalibration_every
        due = bucket > (self._bucket or 0)
        self._bucket = max(bucket, self._bucket or 0)
        return due

    async def _shadow(self) -> ShadowCalibrator:
        """The shadow calibrator of every slot, on the store's latest labels (every replica's)."""
        s = self.settings
        try:
            rows = await asyncio.to_thread(self.store.labelled, self.origin, s.recalibration_window)
        except SQLAlchemyError as exc:
            raise StoreUnavailableError(f"the feedback store does not answer ({exc.__class__.__name__}): the shadow "
                                        "calibration cannot be read") from None
        shadow = ShadowCalibrator(window=s.recalibration_window, min_feedback=s.recalibration_min_feedback,
                                  margin=s.recalibration_margin)
        for slot, labelled in rows.items():
            for z0, y in labelled:
                shadow.add(slot, z0, y)
        return shadow

    # -- the calibration that follows -----------------------------------------------------------------------------
    async def report(self, probe: ValueProbe) -> dict:
        """The live calibration against the shadow on held-out feedback, per slot, and the drift window (the
        gauges are set from it)."""
        slots = {} if not self.shadow_on else await asyncio.to_thread((await self._shadow()).report, probe.origin_maps())
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
                "drift": self.publish_drift(), "accuracy": self.publish_accuracy(),
                "store": self.store.status()}

    async def promotion(self, probe: ValueProbe, trigger: str) -> tuple[dict, dict, dict]:
        """``(chosen, maps, record)`` for promoting the shadow of every slot where it beats ``probe``'s live
        calibration on held-out feedback: each chosen slot's report, the map ``logit' = a * logit + b`` from the
        live calibration to the shadow's, and the record the new artifact carries. :class:`ConflictError` when no
        slot qualifies (or recalibration is off)."""
        if not self.shadow_on:
            raise ConflictError("recalibration is off on this sidecar (--recalibration shadow or auto)")
        live = probe.origin_maps()
        report = await asyncio.to_thread((await self._shadow()).report, live)
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
