"""Feedback on served requests and the calibration that follows it, kept in the store every replica shares.

:class:`FeedbackLoop` writes each scored request to the store (:mod:`.store`: a background writer, never on the
response path), takes labels for any request id (served here or by another replica sharing the store), keeps the
drift window of the fitted artifact the served one descends from (:mod:`.recalibration`), refits the shadow
calibrator from the store's labels, and works out a promotion (which slots, which maps); swapping the new artifact
in, recording it in the store and following other replicas' promotions stay with the sidecar.

Both artifacts learn from the same labels: the prompt-level one (``confidence.probability``, read at the prompt's
end) and the answer-level one (``confidence.answer.probability``, read at the end of the answer actually given: the
better target for a label on that answer). A local answer's answer-level probability is kept beside its request
with its own slot and fitted logit (:meth:`FeedbackLoop.answer_read`); a label on it then refits the answer-level
artifact's shadow too, reported and promoted on its own (``answer=True``; its slots appear in the metrics as
``answer:<slot>``).
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

__all__ = ["ANSWER_SLOT", "FeedbackLoop", "Remembered"]

#: the answer-level artifact's calibration slots in the metrics' ``slot`` label: ``answer:open``, ``answer:value``
ANSWER_SLOT = "answer:{}"

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
    # the answer-level artifact's reading of the answer given, once known: its fitted artifact, slot and fitted logit
    answer_origin: str | None = None
    answer_slot: str | None = None
    answer_z0: float | None = None

    @classmethod
    def of(cls, record: RequestRecord) -> Remembered:
        return cls(record.probability, record.slot, record.z0, record.local, record.answer_origin,
                   record.answer_slot, record.answer_z0)


class FeedbackLoop:
    def __init__(self, settings, metrics, probe: ValueProbe, store: Store, answer_probe: ValueProbe | None = None):
        self.settings, self.metrics, self.store = settings, metrics, store
        self._recent: OrderedDict[str, Remembered] = OrderedDict()
        self._local_p: dict[str, list[float]] = {}  # served P of local answers in the drift window, per kind
        self._labels: int | None = None  # the store's label count for the fitted artifact, as last read
        # the answer-level artifact's fitted artifact (its promotions keep it; a reload of the prompt-level one
        # keeps the answer-level one) and its label count and auto-promotion bucket
        self.answer_origin = answer_probe.calibration_origin if answer_probe is not None else None
        self._answer_labels: int | None = None
        self._answer_bucket: int | None = None
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
        if self.answer_origin is not None:
            answer_counts = await asyncio.to_thread(self.store.label_counts, self.answer_origin, answer=True)
            self._publish_counts(answer_counts, answer=True)
            self._answer_labels = sum(answer_counts.values())
            self._answer_bucket = self._answer_labels // self.settings.recalibration_every
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

    def answer_read(self, request_id: str, answer_probe: ValueProbe, result: ProbeResult) -> None:
        """The answer-level probability of ``request_id``'s local answer, once it exists, read by ``answer_probe``:
        kept beside the request with its slot and fitted logit, so a label on it refits the answer-level shadow."""
        slot, z0 = self.slot_and_fitted_logit(answer_probe, result.kind, result.probability)
        origin = answer_probe.calibration_origin
        remembered = self._recent.get(request_id)
        if remembered is not None:
            remembered.answer_origin, remembered.answer_slot, remembered.answer_z0 = origin, slot, z0
        self.store.record_request(RequestUpdate(request_id, answer_probability=float(result.probability),
                                                answer_origin=origin, answer_slot=slot, answer_z0=float(z0)))

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
        """The store's label counts (every replica's) into the metrics, of both artifacts."""
        counts = await asyncio.to_thread(self.store.label_counts, self.origin)
        self._publish_counts(counts)
        if self.answer_origin is not None:
            self._publish_counts(await asyncio.to_thread(self.store.label_counts, self.answer_origin, answer=True),
                                 answer=True)

    def _publish_counts(self, counts: dict[str, int], answer: bool = False) -> None:
        for slot, n in counts.items():
            self.metrics.calibration_feedback.labels(slot=ANSWER_SLOT.format(slot) if answer else slot).set(n)

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
        calibration). A local answer whose answer-level probability is in the store refits the answer-level
        artifact's shadow as well. Returns the window's ECE/Brier and what recalibration did with it (``used``,
        ``reason``, ``label``: new, repeat or conflict; ``answer``: ``used`` and ``slot`` or ``reason`` for the
        answer-level artifact, when the request has an answer-level probability)."""
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
        # the answer-level side: only a request whose answer-level probability was read (a local answer, so far)
        answer = {}
        if remembered is not None and remembered.answer_z0 is not None and remembered.answer_origin is not None:
            answer = dict(answer_origin=remembered.answer_origin, answer_slot=remembered.answer_slot,
                          answer_z0=remembered.answer_z0, answer_used=self.shadow_on and remembered.local)
        write = await asyncio.to_thread(self.store.add_label, request_id=request_id, correct=bool(correct),
                                        origin=self.origin, probability=float(p), slot=slot, z0=z0,
                                        used=reason is None, **answer)
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
        info = {"used": reason is None, "label": "new", **({"slot": slot} if reason is None else {"reason": reason})}
        if answer:
            info["answer"] = ({"used": True, "slot": answer["answer_slot"]} if answer["answer_used"] else
                              {"used": False, "reason": reason or "the answer served was not the local model's"})
        if reason is None:
            counts = await asyncio.to_thread(self.store.label_counts, self.origin)
            self._publish_counts(counts)
            self._labels = sum(counts.values())
        if answer.get("answer_used") and answer["answer_origin"] == self.answer_origin:
            counts = await asyncio.to_thread(self.store.label_counts, self.answer_origin, answer=True)
            self._publish_counts(counts, answer=True)
            self._answer_labels = sum(counts.values())
        return window, info

    def promotion_due(self, answer: bool = False) -> bool:
        """``auto``: the shadow is compared with the live calibration each time the store's label count (every
        replica's) passes a multiple of ``recalibration_every``; ``answer``: the answer-level artifact's count."""
        labels = self._answer_labels if answer else self._labels
        if self.settings.recalibration != "auto" or labels is None:
            return False
        bucket = labels // self.settings.recalibration_every
        last = (self._answer_bucket if answer else self._bucket) or 0
        if answer:
            self._answer_bucket = max(bucket, last)
        else:
            self._bucket = max(bucket, last)
        return bucket > last

    async def _shadow(self, origin: str, answer: bool = False) -> ShadowCalibrator:
        """The shadow calibrator of every slot of the fitted artifact ``origin`` (an answer-level one with
        ``answer``), on the store's latest labels (every replica's)."""
        s = self.settings
        try:
            rows = await asyncio.to_thread(self.store.labelled, origin, s.recalibration_window, answer=answer)
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
    async def _compared(self, probe: ValueProbe, answer: bool = False) -> dict:
        """Per slot of ``probe``, its live calibration against the shadow on held-out feedback (the gauges are set
        from it; an answer-level artifact's slots as ``answer:<slot>``)."""
        slots = await asyncio.to_thread((await self._shadow(probe.calibration_origin, answer)).report,
                                        probe.origin_maps())
        for slot, rep in slots.items():
            label = ANSWER_SLOT.format(slot) if answer else slot
            for who in ("live", "shadow"):
                brier, ece = getattr(rep, f"{who}_brier"), getattr(rep, f"{who}_ece")
                if brier is not None:
                    self.metrics.calibration_brier.labels(slot=label, calibrator=who).set(brier)
                    self.metrics.calibration_ece.labels(slot=label, calibrator=who).set(ece)
        return slots

    @staticmethod
    def _described(probe: ValueProbe) -> dict:
        return {"artifact_id": probe.artifact_id, "calibration_version": probe.calibration_version,
                "calibration_origin": probe.calibration_origin[:12], "recalibration": probe.data.json("recalibration"),
                "slot_of_kind": {kind: probe.calibration_slot(kind) for kind in ("choice", "open")}}

    async def report(self, probe: ValueProbe, answer_probe: ValueProbe | None = None) -> dict:
        """The live calibration against the shadow on held-out feedback, per slot (``slots``; the answer-level
        artifact's under ``answer``, described in ``answer_artifact``), and the drift window (the gauges are set
        from it)."""
        slots = {} if not self.shadow_on else await self._compared(probe)
        answer = {} if not self.shadow_on or answer_probe is None else await self._compared(answer_probe, answer=True)
        return {"mode": self.settings.recalibration, **self._described(probe),
                "slots": {s: r.to_dict() for s, r in slots.items()},
                "answer": {s: r.to_dict() for s, r in answer.items()},
                "answer_artifact": None if answer_probe is None else self._described(answer_probe),
                "drift": self.publish_drift(), "accuracy": self.publish_accuracy(),
                "store": self.store.status()}

    async def promotion(self, probe: ValueProbe, trigger: str, answer: bool = False) -> tuple[dict, dict, dict]:
        """``(chosen, maps, record)`` for promoting the shadow of every slot where it beats ``probe``'s live
        calibration on held-out feedback (``answer``: ``probe`` is the answer-level artifact, refitted on the
        labels' answer-level fields): each chosen slot's report, the map ``logit' = a * logit + b`` from the
        live calibration to the shadow's, and the record the new artifact carries. :class:`ConflictError` when no
        slot qualifies (or recalibration is off)."""
        if not self.shadow_on:
            raise ConflictError("recalibration is off on this sidecar (--recalibration shadow or auto)")
        live = probe.origin_maps()
        report = await self._compared(probe, answer)
        chosen = {slot: rep for slot, rep in report.items() if rep.promotable}
        if not chosen:
            reasons = "; ".join(f"{slot}: {rep.reason}" for slot, rep in report.items()) or "no feedback yet"
            what = "the answer-level artifact " if answer else ""
            raise ConflictError(f"nothing to promote, still serving {what}{probe.artifact_id} (calibration "
                                f"{probe.calibration_version}): {reasons}")
        # from the live map to the shadow's: logit' = a * logit + b
        maps = {slot: map_between(live.get(slot, (1.0, 0.0)), (rep.a, rep.b)) for slot, rep in chosen.items()}
        record = {"trigger": trigger, "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "evidence": {slot: rep.to_dict() for slot, rep in chosen.items()},
                  "thresholds": "carried over from the fitted artifact (probabilities, not re-fitted)"}
        return chosen, maps, record
