"""What decides a request's fate from its confidence, and what serves it: the one :class:`Policy` every route
answers with, the thresholds it is resolved from (explicit, or the artifact's fitted ones), the deployment's pin,
and the :class:`Served` snapshot (probe and policy, swapped whole by a reload or a promotion)."""

from __future__ import annotations

from dataclasses import dataclass

from valueprobe.plugin import ArtifactError, ValueProbe

from .settings import Settings

__all__ = ["Policy", "Served", "check_pin", "escalate_after_threshold", "fitted_escalation_threshold",
           "resolve_thresholds"]


@dataclass(frozen=True)
class Policy:
    """answer / abstain / escalate from the calibrated probability and the two thresholds: the one policy every
    route answers with (chat, completions, TGI, ``/v1/confidence``, ``/classify`` and the detector API).

    Abstention is checked first, then escalation (where a target is configured); settings refuse an
    ``escalate_below`` at or under ``abstain_below``, which could never apply."""

    abstain_below: float | None
    escalate_below: float | None
    can_escalate: bool

    def decide(self, p: float) -> str:
        if self.abstain_below is not None and p < self.abstain_below:
            return "abstain"
        if self.can_escalate and self.escalate_below is not None and p < self.escalate_below:
            return "escalate"
        return "answer"

    @property
    def answers_below(self) -> float | None:
        """The probability below which :meth:`decide` does not answer locally (the higher of the thresholds in
        force), or ``None`` when it always answers: what ``/classify`` and the detectors call 'not confident'."""
        cuts = [self.abstain_below, self.escalate_below if self.can_escalate else None]
        cuts = [c for c in cuts if c is not None]
        return max(cuts) if cuts else None

    def confident_below(self, asked: float | None = None, configured: float | None = None) -> float:
        """The cut of the consumer interfaces: a request's own threshold, else ``confident_above``, else
        :attr:`answers_below`, else 0.5 (so a text is 'confident' exactly when the chat route would answer it)."""
        for value in (asked, configured, self.answers_below):
            if value is not None:
                return value
        return 0.5


@dataclass(frozen=True)
class Served:
    """What serves a request: the probe, the policy resolved from its thresholds, the answer-level and step-value
    artifacts beside it, and its id. Swapped whole (a reload, a promotion), so a request never mixes two."""

    probe: ValueProbe
    policy: Policy
    answer_probe: ValueProbe | None = None  # confidence.answer on every generated answer
    search_probe: ValueProbe | None = None  # values steps in `search`; else the probe's own head

    @property
    def artifact_id(self) -> str:
        return self.probe.artifact_id


def fitted_escalation_threshold(artifact_thresholds: dict, rate: float) -> float:
    """The artifact's threshold (fitted on its calibration split) below which ``rate`` of the traffic falls."""
    table = artifact_thresholds.get("escalation", {})
    key = f"{rate:g}"
    if key not in table:
        raise ValueError(f"the artifact has no escalation threshold for rate {key}; it has {sorted(table)}")
    return float(table[key])


def resolve_thresholds(settings: Settings, artifact_thresholds: dict) -> tuple[float | None, float | None]:
    """Explicit thresholds win; otherwise ``escalate_rate`` / ``risk_alpha`` pick the artifact's fitted ones."""
    abstain, escalate = settings.abstain_below, settings.escalate_below
    if escalate is None and settings.escalate_rate is not None:
        escalate = fitted_escalation_threshold(artifact_thresholds, settings.escalate_rate)
    if abstain is None and settings.risk_alpha is not None:
        table = artifact_thresholds.get("risk_controlled", {})
        key = f"{settings.risk_alpha:g}"
        if key not in table:
            raise ValueError(f"the artifact has no risk-controlled threshold for alpha {key}; it has {sorted(table)}")
        t = table[key]["threshold"]
        abstain = 1.0 + 1e-9 if t is None else float(t)  # no qualifying coverage: abstain on everything
    if abstain is not None and escalate is not None and escalate <= abstain:
        # abstention is checked first: an escalation threshold at or below it would never send anything
        raise ValueError(f"escalate_below {escalate:g} is at or below abstain_below {abstain:g}: abstention is "
                         "checked first, so nothing would ever be escalated; set escalate_below above abstain_below "
                         "(escalate between the two, abstain below both)")
    return abstain, escalate


def check_pin(probe: ValueProbe, pin: str | None) -> None:
    """Refuse an artifact whose content hash differs from the deployment's pin (``--artifact-sha256``); a
    recalibration of the pinned artifact from feedback (its ``calibration_origin``) passes."""
    pinned = (probe.data.metadata["content_sha256"], probe.calibration_origin)
    if pin and not any(h.startswith(pin.lower()) for h in pinned):
        raise ArtifactError(f"artifact content_sha256 {probe.data.metadata['content_sha256'][:16]}… does not match "
                            f"the pinned {pin[:16]}… (--artifact-sha256)")


def escalate_after_threshold(settings: Settings, answer_probe: ValueProbe | None, can_escalate: bool) -> float | None:
    """``--escalate-after-below``, or the answer artifact's fitted threshold for ``--escalate-after-rate``."""
    if settings.escalate_after_below is None and settings.escalate_after_rate is None:
        return None
    if answer_probe is None:
        raise ValueError("escalate_after_below / escalate_after_rate need an answer-level artifact (--answer-artifact)")
    if not can_escalate:
        raise ValueError("escalate_after_below / escalate_after_rate need an escalation target (--escalate-url)")
    if settings.escalate_after_below is not None:
        return settings.escalate_after_below
    return fitted_escalation_threshold(answer_probe.thresholds or {}, settings.escalate_after_rate)
