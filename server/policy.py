"""What decides a request's fate from its confidence, and what serves it: the one :class:`Policy` every route
answers with, the thresholds it is resolved from (explicit, or the artifact's fitted ones), the deployment's pin,
and the :class:`Served` snapshot (probe and policy, swapped whole by a reload or a promotion)."""

from __future__ import annotations

from dataclasses import dataclass

from valueprobe.plugin import ArtifactError, ValueProbe

from .settings import Settings

__all__ = ["Policy", "RECALIBRATION_METADATA", "Served", "check_pin", "escalate_after_threshold", "fitted_choices", "fitted_escalation_threshold",
           "policy_summary", "recalibration_differences", "resolve_thresholds"]


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


def fitted_choices(artifact_thresholds: dict) -> list[str]:
    """What each fitted value of ``--escalate-rate`` and ``--risk-alpha`` does, on the artifact's calibration split
    (where the thresholds were fitted): one line each, for refusals, the start-up log and ``valueprobe inspect``."""
    lines = []
    for key, t in sorted(artifact_thresholds.get("escalation", {}).items(), key=lambda kv: float(kv[0])):
        lines.append(f"--escalate-rate {key}: escalate below P {float(t):.3f} ({float(key):.0%} of the calibration "
                     "split)")
    for key, entry in sorted(artifact_thresholds.get("risk_controlled", {}).items(), key=lambda kv: float(kv[0])):
        lines.append(f"--risk-alpha {key}: {_risk_text(entry)}")
    return lines


def _risk_text(entry: dict) -> str:
    if entry.get("threshold") is None:
        return "no share of the calibration split qualifies: abstains on every request"
    cover = float(entry.get("coverage", 0.0))
    text = f"abstain below P {float(entry['threshold']):.3f}: answers {cover:.1%} of the calibration split, abstains on {1 - cover:.1%}"
    if entry.get("empirical_risk") is not None and entry.get("risk_upper_bound") is not None:
        confidence = f" at {1 - float(entry['delta']):.0%} confidence" if entry.get("delta") is not None else ""
        text += (f" (error among those answered {float(entry['empirical_risk']):.3f}, upper bound "
                 f"{float(entry['risk_upper_bound']):.3f}{confidence})")
    return text


def _not_fitted(flag: str, value: str, artifact_thresholds: dict) -> ValueError:
    """The refusal of a ``--escalate-rate`` / ``--risk-alpha`` the artifact has no threshold for: the values it has,
    with what each does, and why none is interpolated."""
    table = "escalation" if flag == "--escalate-rate" else "risk_controlled"
    have = sorted(artifact_thresholds.get(table, {}), key=float)
    what = "escalation threshold for rate" if table == "escalation" else "risk-controlled threshold for alpha"
    why = ("a risk-controlled threshold holds its error bound only at the alpha it was tested at, so none is "
           "interpolated; set --abstain-below P to choose a threshold yourself" if table == "risk_controlled" else
           "the artifact keeps its calibration split's quantiles only at these shares, so none is interpolated; set "
           "--escalate-below P to choose a threshold yourself, or --escalate-gain-rate to follow the traffic")
    choices = "; ".join(line for line in fitted_choices(artifact_thresholds) if line.startswith(flag))
    return ValueError(f"the artifact has no {what} {value}; {flag} takes {', '.join(have) or 'no value'} "
                      f"({choices or 'none fitted'}): {why}")


def fitted_escalation_threshold(artifact_thresholds: dict, rate: float) -> float:
    """The artifact's threshold (fitted on its calibration split) below which ``rate`` of the traffic falls."""
    table = artifact_thresholds.get("escalation", {})
    key = f"{rate:g}"
    if key not in table:
        raise _not_fitted("--escalate-rate", key, artifact_thresholds)
    return float(table[key])


def resolve_thresholds(settings: Settings, artifact_thresholds: dict) -> tuple[float | None, float | None]:
    """Explicit thresholds win; otherwise ``escalate_rate`` / ``risk_alpha`` pick the artifact's fitted ones (only
    the values it was fitted for: :func:`fitted_choices`)."""
    abstain, escalate = settings.abstain_below, settings.escalate_below
    if escalate is None and settings.escalate_rate is not None:
        escalate = fitted_escalation_threshold(artifact_thresholds, settings.escalate_rate)
    if abstain is None and settings.risk_alpha is not None:
        table = artifact_thresholds.get("risk_controlled", {})
        key = f"{settings.risk_alpha:g}"
        if key not in table:
            raise _not_fitted("--risk-alpha", key, artifact_thresholds)
        t = table[key]["threshold"]
        abstain = 1.0 + 1e-9 if t is None else float(t)  # no qualifying coverage: abstain on everything
    if abstain is not None and escalate is not None and escalate <= abstain:
        # abstention is checked first: an escalation threshold at or below it would never send anything
        raise ValueError(f"escalate_below {escalate:g} is at or below abstain_below {abstain:g}: abstention is "
                         "checked first, so nothing would ever be escalated; set escalate_below above abstain_below "
                         "(escalate between the two, abstain below both)")
    return abstain, escalate


def policy_summary(settings: Settings, artifact_thresholds: dict) -> tuple[str, bool] | None:
    """What the rate-based settings in force do on the artifact's calibration split, and whether it abstains on
    most of it (worth a warning), for the start-up log; ``None`` when neither is set."""
    parts, most = [], False
    if settings.escalate_below is None and settings.escalate_rate is not None:
        parts += [line for line in fitted_choices(artifact_thresholds)
                  if line.startswith(f"--escalate-rate {settings.escalate_rate:g}:")]
    if settings.abstain_below is None and settings.risk_alpha is not None:
        entry = artifact_thresholds.get("risk_controlled", {}).get(f"{settings.risk_alpha:g}", {})
        parts.append(f"--risk-alpha {settings.risk_alpha:g}: {_risk_text(entry)}")
        most = entry.get("threshold") is None or float(entry.get("coverage", 0.0)) < 0.5
    return ("; ".join(parts), most) if parts else None


#: the metadata a recalibration from feedback writes or changes (:meth:`ValueProbe.recalibrated`); ``calibrator``
#: only from temperature or identity to Platt
RECALIBRATION_METADATA = frozenset({"calibration_version", "recalibrated_from", "calibration_origin", "recalibration",
                                    "content_sha256", "calibrator"})


def _calibration_tensor(name: str) -> bool:
    """A tensor a recalibration may change: a Platt calibrator's parameters (value or per-kind stack), or the
    temperature it replaces."""
    return name in ("calibrator.a", "calibrator.b", "calibrator.temperature") or (
        name.startswith("stack.") and name.split(".")[-2] == "calibrator")


def recalibration_differences(pinned: ValueProbe, candidate: ValueProbe) -> list[str]:
    """What makes ``candidate`` more than a recalibration of ``pinned``: empty when it has the same fitted origin, a
    later calibration version, and every tensor and metadata field equal to ``pinned``'s except the calibrators'
    Platt parameters and the fields that record the recalibration. Checked against ``pinned``'s own bytes, never
    against what ``candidate`` says about itself."""
    import torch

    diffs = []
    if candidate.calibration_origin != pinned.calibration_origin:
        diffs.append(f"calibration_origin ({candidate.calibration_origin[:12]}…, not the pinned artifact's "
                     f"{pinned.calibration_origin[:12]}…)")
    if candidate.calibration_version <= pinned.calibration_version:
        diffs.append(f"calibration_version ({candidate.calibration_version}, not above the pinned "
                     f"{pinned.calibration_version})")
    mp, mc = pinned.data.metadata, candidate.data.metadata
    for key in sorted((set(mp) | set(mc)) - RECALIBRATION_METADATA):
        if mp.get(key) != mc.get(key):
            diffs.append(f"metadata {key!r}")
    if mc.get("calibrator") != mp.get("calibrator") and not (
            mc.get("calibrator") == "platt" and mp.get("calibrator") in ("temperature", "identity")):
        diffs.append("metadata 'calibrator'")
    tp, tc = pinned.data.tensors, candidate.data.tensors
    for name in sorted(set(tp) | set(tc)):
        if _calibration_tensor(name):
            continue
        if name not in tp or name not in tc or tp[name].shape != tc[name].shape or not torch.equal(tp[name], tc[name]):
            diffs.append(f"tensor {name!r}")
    return diffs


def check_pin(probe: ValueProbe, pin: str | None, pinned: ValueProbe | None = None) -> None:
    """Refuse an artifact that the deployment's pin (``--artifact-sha256``) does not vouch for: one whose content
    hash does not start with the pin, unless it is a recalibration (from feedback) of ``pinned``, the pinned file's
    own loaded bytes (the configured artifact; its content hash must match the pin): same fitted origin, and equal
    to it but for the calibrators' Platt parameters (:func:`recalibration_differences`). What an artifact says about
    its own origin is never enough: a crafted file can claim any."""
    if not pin:
        return
    pin = pin.lower()
    content = probe.data.metadata["content_sha256"]
    if content.startswith(pin):
        return
    refused = f"artifact content_sha256 {content[:16]}… does not match the pinned {pin[:16]}… (--artifact-sha256)"
    if pinned is None:
        raise ArtifactError(refused)
    if not pinned.data.metadata["content_sha256"].startswith(pin):
        raise ArtifactError(f"{refused}, and the configured artifact ({pinned.artifact_id}) is not the pinned one "
                            "either, so no recalibration can be checked against it: serve the pinned file as "
                            "--artifact (its promoted calibrations are found in the store)")
    diffs = recalibration_differences(pinned, probe)
    if diffs:
        raise ArtifactError(f"{refused} and it is not a recalibration of the pinned artifact: its "
                            f"{', '.join(diffs)} differ from the pinned file's")


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
