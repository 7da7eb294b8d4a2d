"""Prometheus metrics of the sidecar, built on a registry passed in (tests use a fresh one).

Names: ``valueprobe_`` prefix, base units, counters end in ``_total``; labels are bounded enums (model, artifact
id, decision, outcome, bin), never prompts. Feedback is exported as counters per (confidence bin, outcome), so
reliability, ECE and Brier aggregate in PromQL across replicas:

    # observed accuracy per bin, all replicas
    sum by (bin) (valueprobe_feedback_total{outcome="correct"}) / sum by (bin) (valueprobe_feedback_total)
    # Brier score
    sum(valueprobe_feedback_brier_sum) / sum(valueprobe_feedback_brier_count)
    # ECE: sum over bins of |correct_b - sum of p_b|, over all feedback
    sum(abs(sum by (bin) (valueprobe_feedback_total{outcome="correct"}) - sum by (bin) (valueprobe_feedback_confidence_total)))
      / sum(valueprobe_feedback_total)
"""

from __future__ import annotations

from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from valueprobe.calibration.metrics import bin_index

from .errors import error_types
from .recalibration import N_BINS  # the feedback metrics' bins are the drift window's and the eval card's

CONFIDENCE_BUCKETS = tuple(round(x, 2) for x in np.linspace(0.05, 1.0, 20))
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
READOUT_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01)
DECISIONS = ("answer", "abstain", "escalate")
ERROR_TYPES = error_types()  # from server/errors.py, so a new error type starts at zero too


#: why gain routing kept or escalated a question (valueprobe.server.routing.RouteInfo.reason)
ROUTE_REASONS = ("gain_above", "gain_below", "target_unavailable", "abstained", "not_replaced_in_stream")


def confidence_bin(p: float) -> str:
    """Label of the equal-width bin holding ``p`` (``"0.0-0.1"`` … ``"0.9-1.0"``)."""
    i = int(bin_index(p, N_BINS))
    return f"{i / N_BINS:.1f}-{(i + 1) / N_BINS:.1f}"


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.confidence = Histogram("valueprobe_confidence", "Calibrated P(correct) per request.",
                                    ["model", "artifact", "decision"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.answer_confidence = Histogram(
            "valueprobe_answer_confidence", "Answer-level P(correct) of each locally generated answer (answer_end "
            "artifact, read at the answer's last token).", ["model", "artifact", "flagged"], buckets=CONFIDENCE_BUCKETS,
            registry=r)
        self.answer_readout_failures = Counter("valueprobe_answer_readout_failures_total", "Locally generated "
                                               "answers whose answer-level readout failed (served without "
                                               "confidence.answer).", registry=r)
        self.decisions = Counter("valueprobe_decisions_total", "Policy decisions.", ["decision"], registry=r)
        self.escalations = Counter("valueprobe_escalations_total", "Escalations by result.", ["result"], registry=r)
        self.probe_latency = Histogram("valueprobe_probe_latency_seconds", "Readout: k neurons to probability, per batch.",
                                       buckets=READOUT_BUCKETS, registry=r)
        self.prefill_latency = Histogram("valueprobe_prefill_duration_seconds", "Prompt-only scoring prefill per batch.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("valueprobe_batch_size", "Prompts per scoring batch.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.request_latency = Histogram("valueprobe_request_duration_seconds", "Request latency by route.",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("valueprobe_upstream_request_duration_seconds", "Upstream calls.",
                                          ["upstream"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("valueprobe_upstream_errors_total", "Failed upstream calls.", ["upstream"], registry=r)
        self.searches = Counter("valueprobe_searches_total", "Answers by value-guided step search.", ["strategy"],
                                registry=r)
        self.search_steps = Counter("valueprobe_search_steps_total", "Steps kept by value-guided search.", ["strategy"],
                                    registry=r)
        self.search_batch_size = Histogram("valueprobe_search_batch_size", "Searches run together in one batch.",
                                           buckets=(1, 2, 4, 8, 16), registry=r)
        self.generation_batch_size = Histogram("valueprobe_generation_batch_size",
                                               "Generations run together in one batched generate.",
                                               buckets=(1, 2, 4, 8, 16), registry=r)
        self.route_decisions = Counter("valueprobe_route_decisions_total", "Gain routing decisions by moment "
                                       "(before decoding / after the local answer) and reason.", ["moment", "reason"],
                                       registry=r)
        self.route_gain = Histogram("valueprobe_route_gain", "Expected gain P(target right) - P(local right) per routed "
                                    "question.", buckets=[-0.5, -0.3, -0.2, -0.1, -0.05, 0, 0.05, 0.1, 0.2, 0.3, 0.5],
                                    registry=r)
        self.route_target_latency = Histogram("valueprobe_route_target_confidence_seconds", "Seconds spent asking the "
                                              "escalation target for its probability (its prefill plus the network).",
                                              registry=r)
        self.errors = Counter("valueprobe_errors_total", "Error responses by type.", ["type"], registry=r)
        self.ood = Counter("valueprobe_ood_total", "Scored prompts by kind and out-of-distribution flag.",
                           ["kind", "flagged"], registry=r)
        self.queue_depth = Gauge("valueprobe_queue_depth", "Requests waiting for the scoring batcher.", registry=r)
        self.info = Info("valueprobe_artifact", "Loaded artifact and model.", registry=r)
        self.feedback = Counter("valueprobe_feedback_total", "Feedback outcomes by confidence bin.", ["bin", "outcome"],
                                registry=r)
        self.feedback_confidence = Counter("valueprobe_feedback_confidence", "Sum of predicted P(correct) of feedback, by bin "
                                           "(with valueprobe_feedback_total gives ECE in PromQL).", ["bin"], registry=r)
        self.feedback_brier = Histogram("valueprobe_feedback_brier", "Squared error (p - outcome)^2 of each feedback.",
                                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        self.window_ece = Gauge("valueprobe_feedback_window_ece", "ECE over the last feedback window (every replica's labels in the store).",
                                registry=r)
        self.window_brier = Gauge("valueprobe_feedback_window_brier", "Brier over the last feedback window (every replica's labels in the store).",
                                  registry=r)
        # Calibration that follows the traffic (server/recalibration.py): the version served, the shadow against the
        # live calibration on held-out feedback, promotions, and the drift of the served score.
        self.calibration_version = Gauge("valueprobe_calibration_version", "Calibration version served: 0 as "
                                         "fitted, +1 per promoted recalibration from feedback.", registry=r)
        self.calibration_brier = Gauge("valueprobe_calibration_brier", "Brier on held-out feedback of the live and "
                                       "the shadow calibration, per calibration slot.", ["slot", "calibrator"], registry=r)
        self.calibration_ece = Gauge("valueprobe_calibration_ece", "ECE on held-out feedback of the live and the "
                                     "shadow calibration, per calibration slot.", ["slot", "calibrator"], registry=r)
        self.calibration_feedback = Gauge("valueprobe_calibration_feedback", "Labels in the store that refit "
                                          "the shadow calibration, per calibration slot (every replica's, all time).",
                                          ["slot"], registry=r)
        self.promotions = Counter("valueprobe_calibration_promotions_total", "Shadow calibrations promoted to live.",
                                  ["trigger"], registry=r)
        self.score_psi = Gauge("valueprobe_score_psi", "Population stability index of the fitted artifact's "
                               "probability over the drift window against its test split (>0.25: large shift).",
                               ["kind"], registry=r)
        self.ood_rate = Gauge("valueprobe_ood_rate", "Share of the drift window's prompts flagged out of "
                              "distribution.", ["kind"], registry=r)
        self.drift_window_prompts = Gauge("valueprobe_drift_window_prompts", "Prompts in the drift window per kind "
                                          "(PSI and OOD rate are reported from drift_min_prompts on).", ["kind"],
                                          registry=r)
        # Label-free accuracy: the mean calibrated confidence of locally answered requests in the drift window, with
        # its interval, beside the accuracy of labelled feedback; an alarm when the intervals do not overlap.
        self.expected_accuracy = Gauge("valueprobe_expected_accuracy", "Label-free accuracy estimate: mean served "
                                       "P(correct) over the drift window (bound: estimate, low, high; 95%).",
                                       ["bound"], registry=r)
        self.feedback_accuracy = Gauge("valueprobe_feedback_accuracy", "Accuracy of the labelled feedback window "
                                       "(bound: estimate, low, high; Wilson 95%).", ["bound"], registry=r)
        self.accuracy_disagreement = Gauge("valueprobe_accuracy_disagreement", "1 when the label-free and the "
                                           "labelled accuracy intervals do not overlap (calibration no longer holds).",
                                           registry=r)
        # The request and feedback store (server/store.py)
        self.store_up = Gauge("valueprobe_store_up", "1 when the last write to the store went through.", registry=r)
        self.store_writes = Counter("valueprobe_store_writes_total", "Rows written to the store by this replica.",
                                    ["table"], registry=r)
        self.store_lost = Counter("valueprobe_store_write_failures_total", "Scored requests this replica could not "
                                  "write to the store (queue full while the store was down).", registry=r)
        self.store_pending = Gauge("valueprobe_store_pending", "Scored requests waiting to be written.", registry=r)
        self.store_rows = Gauge("valueprobe_store_rows", "Rows in the store per table.", ["table"], registry=r)
        self.store_bytes = Gauge("valueprobe_store_bytes", "Size of the store on disk.", registry=r)
        self.label_conflicts = Counter("valueprobe_label_conflicts_total", "Labels that contradicted the first label "
                                       "of their request (kept apart; the first is used).", registry=r)
        for table in ("requests", "labels", "promotions"):
            self.store_writes.labels(table=table)
        for trigger in ("admin", "auto"):
            self.promotions.labels(trigger=trigger)
        # Start every bounded series at zero so rates exist before the first event.
        for d in DECISIONS:
            self.decisions.labels(decision=d)
        for result in ("ok", "failed"):
            self.escalations.labels(result=result)
        for upstream in ("upstream", "escalation", "route_target"):
            self.upstream_errors.labels(upstream=upstream)
        for moment in ("before", "after"):
            for reason in ROUTE_REASONS:
                self.route_decisions.labels(moment=moment, reason=reason)
        for error_type in ERROR_TYPES:
            self.errors.labels(type=error_type)
        for kind in ("choice", "open"):
            for flagged in ("true", "false"):
                self.ood.labels(kind=kind, flagged=flagged)
        for i in range(N_BINS):
            for outcome in ("correct", "incorrect"):
                self.feedback.labels(bin=confidence_bin((i + 0.5) / N_BINS), outcome=outcome)
            self.feedback_confidence.labels(bin=confidence_bin((i + 0.5) / N_BINS))
        self._window: deque = deque()

    def publish_artifact(self, probe, model_name: str) -> None:
        """The served artifact's info and calibration version, and its confidence series started at zero."""
        for decision in DECISIONS:
            self.confidence.labels(model=model_name, artifact=probe.artifact_id, decision=decision)
        self.info.info({"artifact_id": probe.artifact_id, "model": model_name, "layer": str(probe.layer),
                        "k": str(probe.k), "served_score": probe.served_score,
                        "model_fingerprint": probe.model_fingerprint.get("layer_weights_sha256", "")[:16],
                        "calibration_version": str(probe.calibration_version),
                        "calibration_origin": probe.calibration_origin[:12]})
        self.calibration_version.set(probe.calibration_version)

    def set_window(self, size: int) -> None:
        self._window = deque(self._window, maxlen=size)

    def record_feedback(self, probability: float, correct: bool, window: list[tuple[float, int]] | None = None) -> dict:
        """Count one new label; ``window`` (the store's latest labels, every replica's) replaces the feedback
        window, else the label is appended to this process's."""
        self.feedback.labels(bin=confidence_bin(probability), outcome="correct" if correct else "incorrect").inc()
        self.feedback_confidence.labels(bin=confidence_bin(probability)).inc(probability)
        self.feedback_brier.observe((probability - float(correct)) ** 2)
        if window is None:
            self._window.append((probability, int(correct)))
        else:
            self.replace_window(window)
        return self.window_stats()

    def window_labels(self) -> list[int]:
        return [y for _, y in self._window]

    def replace_window(self, window: list[tuple[float, int]]) -> None:
        self._window.clear()
        self._window.extend(window)

    def window_stats(self) -> dict:
        from valueprobe.calibration.metrics import brier_loss, expected_calibration_error

        if not self._window:
            return {"n": 0, "ece": None, "brier": None}
        p = np.array([w[0] for w in self._window])
        y = np.array([w[1] for w in self._window])
        ece, brier = expected_calibration_error(y, p, n_bins=N_BINS), brier_loss(y, p)
        self.window_ece.set(ece)
        self.window_brier.set(brier)
        return {"n": len(p), "ece": ece, "brier": brier}
