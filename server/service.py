"""The sidecar's logic, free of FastAPI: render, score, decide, answer (locally, upstream or escalated).

Every request takes one :class:`Served` snapshot (probe, policy, artifact id) when it starts and uses it to
render, score, decide and report, so a hot reload (which swaps the whole snapshot at once, between requests)
never leaves a request half on one artifact and half on another.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

from scipy.special import expit

from valueprobe.plugin import ArtifactError, PromptError, ProbeResult, ValueProbe
from valueprobe.plugin.artifact import TOKEN_POSITION
from valueprobe.plugin.nexttoken import prompt_kind

from .engines.base import EngineClient, Finished, Piece, Prompt, final_generation
from .errors import ClientError, ConflictError, NotFoundError, ProbeFailedError, StorageError, UpstreamError
from .metrics import SidecarMetrics
from .routing import GainRouter, RouteInfo, confidence_url, load_gain_table
from .recalibration import (DriftMonitor, ShadowCalibrator, calibration_folder, card_reference, fitted_logit,
                            next_artifact_path)
from .settings import Settings
from .upstream import make_upstream


# Temperatures below this decode greedily (vLLM's _SAMPLING_EPS): every route and both engines go through
# Sidecar.query, so this is the one place that decides it.
SAMPLING_EPS = 1e-5


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


@dataclass(frozen=True)
class Served:
    """What serves a request: the probe, the policy resolved from its thresholds, and its id. Swapped whole."""

    probe: ValueProbe
    policy: Policy

    @property
    def artifact_id(self) -> str:
        return self.probe.artifact_id


@dataclass
class Query:
    """One request after validation: what the model sees (``rendered``, tokenized once) and what an OpenAI
    upstream gets (``messages``), with the snapshot that rendered it."""

    messages: list[dict]
    rendered: str
    prompt: Prompt
    served: Served
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    search: object | None = None  # a protocol SearchSpec: answer by value-guided step search
    logprobs: int | None = None  # None: not asked; n: each answer token's log-probability and n alternatives
    #: the request as another valueprobe sidecar's ``/v1/confidence`` takes it (``prompt``/``choices`` or
    #: ``messages``, as the user sent them): how gain routing asks the escalation target for its probability
    source: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    confidence: ProbeResult
    decision: str
    request_id: str
    artifact_id: str
    text: str = ""
    routed: bool = False
    upstream_error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    search: dict | None = None  # strategy, steps [{text, value}], tokens_generated, candidates_scored
    answer: ProbeResult | None = None  # confidence in the answer given (an answer_end artifact), local answers only
    answer_flagged: bool | None = None  # answer.probability below --flag-below
    local_text: str | None = None  # the local answer an answer-level escalation replaced
    logprobs: list | None = None  # TokenLogprob per answer token, when asked for and answered here
    route: RouteInfo | None = None  # gain routing's decision (--escalate-gain-above / --escalate-gain-rate)
    answer_error: str | None = None  # an answer-level artifact is served but its readout failed for this answer


@dataclass(frozen=True)
class Head:
    """The decision, known at the prefill: confidence, decision, routing (text empty)."""

    outcome: Outcome


@dataclass(frozen=True)
class Text:
    """A piece of the answer's text."""

    piece: str


@dataclass(frozen=True)
class StepEvent:
    """A step kept by value-guided search, with the value it was kept for."""

    step: object  # valueprobe.plugin.search.Step


@dataclass(frozen=True)
class Final:
    """The whole answer: text, usage, finish reason, routing, search record."""

    outcome: Outcome


Event = Union[Head, Text, StepEvent, Final]


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


class Sidecar:
    def __init__(self, settings: Settings, engine: EngineClient, metrics: SidecarMetrics, model_name: str, *,
                 search_probe: ValueProbe | None = None, answer_probe: ValueProbe | None = None):
        self.settings, self.engine, self.metrics, self.model_name = settings, engine, metrics, model_name
        self.search_probe = search_probe  # a step-value artifact for `search`; else the served probe's head
        self.answer_probe = answer_probe  # an answer_end artifact: confidence.answer on every generated answer
        self.upstream = None
        if settings.mode == "gateway":
            self.upstream = make_upstream(settings.upstream_kind, settings.upstream_url, timeout=settings.upstream_timeout_s,
                                          model=settings.upstream_model, api_key=settings.upstream_api_key,
                                          name="upstream", metrics=metrics)
        self.escalation = None
        if settings.escalate_url:
            self.escalation = make_upstream(settings.escalate_kind, settings.escalate_url,
                                            timeout=settings.upstream_timeout_s, model=settings.escalate_model,
                                            api_key=settings.upstream_api_key, name="escalation", metrics=metrics)
        self.gain_router = None
        if settings.escalate_gain_above is not None or settings.escalate_gain_rate is not None:
            if settings.escalate_gain_moment == "after" and answer_probe is None:
                raise ValueError("escalate_gain_moment 'after' decides on the local answer's answer-level probability: "
                                 "it needs an answer-level artifact (--answer-artifact)")
            self.gain_router = GainRouter(
                settings.escalate_confidence_url or confidence_url(settings.escalate_url),
                moment=settings.escalate_gain_moment, above=settings.escalate_gain_above,
                rate=settings.escalate_gain_rate, table=load_gain_table(settings.escalate_gain_table),
                timeout=settings.escalate_confidence_timeout_s, api_key=settings.upstream_api_key, metrics=metrics)
        self._recent: OrderedDict[str, Remembered] = OrderedDict()
        self._reload_lock = asyncio.Lock()
        metrics.set_window(settings.feedback_window)
        self._reset_calibration_state(engine.probe)
        self.served = self._make_served(engine.probe)
        self._publish(self.served)
        self.escalate_after = self._escalate_after_threshold()

    # -- the served snapshot ------------------------------------------------------------------------------------
    @property
    def probe(self) -> ValueProbe:
        return self.served.probe

    @property
    def policy(self) -> Policy:
        return self.served.policy

    def _make_served(self, probe: ValueProbe) -> Served:
        abstain, escalate = resolve_thresholds(self.settings, probe.thresholds or {})
        return Served(probe, Policy(abstain, escalate, self.escalation is not None))

    def _publish(self, served: Served) -> None:
        probe = served.probe
        for decision in ("answer", "abstain", "escalate"):  # series start at zero
            self.metrics.confidence.labels(model=self.model_name, artifact=probe.artifact_id, decision=decision)
        self.metrics.info.info({"artifact_id": probe.artifact_id, "model": self.model_name,
                                "layer": str(probe.layer), "k": str(probe.k), "served_score": probe.served_score,
                                "model_fingerprint": probe.model_fingerprint.get("layer_weights_sha256", "")[:16],
                                "calibration_version": str(probe.calibration_version),
                                "calibration_origin": probe.calibration_origin[:12]})
        self.metrics.calibration_version.set(probe.calibration_version)

    def _reset_calibration_state(self, probe: ValueProbe) -> None:
        """A new shadow and drift window for the fitted artifact ``probe`` descends from (kept across promotions
        of the same one: its feedback stays comparable; reset by a reload of another)."""
        s = self.settings
        self._origin = probe.calibration_origin
        self.shadow = None if s.recalibration == "off" else ShadowCalibrator(
            window=s.recalibration_window, min_feedback=s.recalibration_min_feedback, margin=s.recalibration_margin)
        self.drift = DriftMonitor(card_reference(probe.eval_card), window=s.drift_window)
        self._observed = 0

    def allowed_artifact_path(self, requested: str) -> Path:
        """Reload only takes ``.safetensors`` files inside the artifact folder (``artifact_dir``, default: the
        served artifact's folder). The same message for every refusal, so it reveals nothing about the disk."""
        root = Path(self.settings.artifact_dir or Path(self.settings.artifact_path()).parent).resolve()
        try:
            path = (root / requested).resolve()
        except (OSError, ValueError):
            path = None
        if path is None or root not in path.parents or path.suffix != ".safetensors" or not path.is_file():
            raise ClientError(f"reload refused, still serving {self.probe.artifact_id}: no loadable artifact by "
                              "that name in the artifact folder")
        return path

    async def reload(self, requested: str) -> tuple[str, str]:
        """Load, check, resolve thresholds, then swap probe and policy together (atomic: a refusal at any step
        leaves the old snapshot serving). Returns ``(previous id, new id)``."""
        async with self._reload_lock:
            old = self.served
            path = self.allowed_artifact_path(requested)
            try:
                probe = await asyncio.to_thread(ValueProbe.load, str(path))
                probe.require_position(TOKEN_POSITION)
                check_pin(probe, self.settings.artifact_sha256)
                served = self._make_served(probe)
                await self.engine.attach(probe, strict=self.settings.check_fingerprint)
            except (ArtifactError, ValueError) as exc:
                raise ClientError(f"reload refused, still serving {old.artifact_id}: {exc}") from None
            await self._swap(served)
            return old.artifact_id, served.artifact_id

    async def _swap(self, served: Served) -> None:
        """Serve ``served`` (already attached to the engine) from the next request on: a reload or a promotion."""
        self.served = served
        self.engine.probe = served.probe
        if served.probe.calibration_origin != self._origin:  # another fitted artifact: its feedback starts afresh
            self._reset_calibration_state(served.probe)
        self._publish(served)
        await self.engine.release_unused()  # the old artifact goes once the requests using it end

    async def aclose(self):
        for client in (self.upstream, self.escalation, self.gain_router):
            if client is not None:
                await client.aclose()

    # -- rendering ----------------------------------------------------------------------------------------------
    def check_size(self, text: str, what: str = "prompt"):
        if len(text) > self.settings.max_prompt_chars:
            raise ClientError(f"{what} is {len(text)} characters; the limit is {self.settings.max_prompt_chars}")

    def _render_question(self, served: Served, question: str, choices=None) -> tuple[list[dict], str, tuple[str, int]]:
        self.check_size(question)
        prompt = {"question": question, "choices": choices} if choices else question
        fmt = served.probe.prompt_format
        try:
            rendered = fmt.render(self.engine.tokenizer, prompt)
            user = fmt.user_text(prompt)
        except PromptError as exc:
            raise ClientError(str(exc)) from None
        return [{"role": "user", "content": user}], rendered, prompt_kind(prompt)

    def _render_messages(self, served: Served, messages: list[dict]) -> tuple[list[dict], str, tuple[str, int]]:
        """A single user message is a question and gets the artifact's format (what the probe was fitted on);
        longer conversations are rendered by the chat template as given."""
        for m in messages:
            self.check_size(m["content"])
        if len(messages) == 1 and messages[0]["role"] == "user":
            return self._render_question(served, messages[0]["content"])
        try:
            return messages, served.probe.prompt_format.render(self.engine.tokenizer, messages), ("open", 0)
        except PromptError as exc:
            raise ClientError(str(exc)) from None

    def max_new_tokens(self, requested: int | None) -> int:
        n = requested or self.settings.default_max_new_tokens
        if n > self.settings.max_new_tokens_limit:
            raise ClientError(f"max tokens {n} exceeds the limit {self.settings.max_new_tokens_limit}")
        return n

    def _tokenized(self, served: Served, rendered: str, kind=("open", 0), max_new_tokens: int = 0) -> Prompt:
        """Tokenize once, and refuse a prompt that cannot fit the model's context before any model work."""
        ids = self.engine.tokenize(rendered, served.probe)
        if not ids:
            raise ClientError("the prompt is empty after tokenization")
        context = self.engine.context_length
        if context and len(ids) + max_new_tokens > context:
            raise ClientError(f"prompt ({len(ids)} tokens) plus max tokens ({max_new_tokens}) exceeds the model's "
                              f"context of {context}")
        return Prompt(ids, kind)

    def prepare(self, served: Served | None = None, *, question: str | None = None, choices=None,
                messages: list[dict] | None = None, raw: str | None = None, max_new_tokens: int | None = None,
                temperature: float | None = None, top_p: float | None = None, seed: int | None = None, stop=None,
                search=None, logprobs: int | None = None, stream: bool = False, scoring_only: bool = False) -> Query:
        """Any protocol's request as one :class:`Query`, the only way routes and consumers build one.

        Exactly one of ``question`` (with ``choices`` for multiple choice; rendered with the artifact's format),
        ``messages`` (a single user message is a question; longer chats go through the chat template as given) or
        ``raw`` (TGI's ``inputs``: the model's text as is). ``scoring_only``: a prompt to score, nothing to
        generate (``/v1/confidence``, ``/classify``, the detectors). Greedy below a temperature of
        :data:`SAMPLING_EPS`; the prompt is tokenized once and refused if it cannot fit the context."""
        served = served or self.served
        if sum(x is not None for x in (question, messages, raw)) != 1:
            raise ClientError("a request needs exactly one of a question, messages or raw text")
        if question is not None:
            user, rendered, kind = self._render_question(served, question, choices)
            source = {"prompt": question, **({"choices": list(choices)} if choices else {})}
        elif messages is not None:
            user, rendered, kind = self._render_messages(served, messages)
            source = {"messages": [dict(m) for m in messages]}
        else:
            self.check_size(raw)
            # TGI semantics: ``raw`` is the model's text; OpenAI upstreams get it as one user message
            user, rendered, kind = [{"role": "user", "content": raw}], raw, ("open", 0)
            source = {"messages": user}
        n_new = 0 if scoring_only else self.max_new_tokens(max_new_tokens)
        if temperature is not None and temperature < SAMPLING_EPS:
            temperature = None  # greedy, as vLLM does: dividing logits by a subnormal temperature overflows them
        if logprobs is not None:
            self._check_logprobs(search)
        return Query(user, rendered, self._tokenized(served, rendered, kind, n_new), served, n_new, temperature, top_p,
                     seed, list(stop or []), search, logprobs, source)

    @property
    def serves_logprobs(self) -> bool:
        """Whether whole responses can carry token log-probabilities (embedded mode, an engine that gives them)."""
        return self.settings.mode == "embedded" and self.engine.supports_logprobs

    def _check_logprobs(self, search) -> None:
        """Token log-probabilities are served where this sidecar generates the answer, whole or streamed (a stream
        carries them in its final chunk); every other combination is refused with the reason (never answered with
        an empty field)."""
        where = None
        if self.settings.mode != "embedded":
            where = "in gateway mode (the upstream generates: ask it)"
        elif not self.engine.supports_logprobs:
            where = f"by the {self.settings.engine} engine"
        elif search is not None:
            where = "with search"
        if where:
            raise ClientError(f"token log-probabilities are not served {where}")

    # -- scoring ------------------------------------------------------------------------------------------------
    @staticmethod
    def slot_and_fitted_logit(probe: ValueProbe, kind: str, probability: float) -> tuple[str, float]:
        """``(slot, z0)``: the calibration slot that served ``probability`` and the logit the fitted artifact
        (calibration version 0) would have served, undoing the promoted recalibrations."""
        slot = probe.calibration_slot(kind)
        return slot, fitted_logit(probability, probe.origin_maps().get(slot, (1.0, 0.0)))

    def _remember(self, request_id: str, result: ProbeResult, decision: str, slot: str, z0: float):
        self._recent[request_id] = Remembered(result.probability, slot, z0, local=decision == "answer")
        while len(self._recent) > 10000:
            self._recent.popitem(last=False)

    def observe(self, served: Served, result: ProbeResult, decision: str) -> tuple[str, float]:
        """Count a scored prompt (confidence histogram, decisions, OOD, the drift window); returns its
        ``(slot, z0)`` (:meth:`slot_and_fitted_logit`) for feedback."""
        self.metrics.confidence.labels(model=self.model_name, artifact=served.artifact_id, decision=decision).observe(
            result.probability)
        self.metrics.decisions.labels(decision=decision).inc()
        if result.ood is not None:
            self.metrics.ood.labels(kind=result.kind, flagged=str(result.ood).lower()).inc()
        slot, z0 = self.slot_and_fitted_logit(served.probe, result.kind, result.probability)
        self.drift.observe(result.kind, float(expit(z0)), result.ood)
        self._observed += 1
        if self._observed % 50 == 0:
            self.publish_drift()
        return slot, z0

    def publish_drift(self) -> dict:
        stats = self.drift.stats()
        for kind, st in stats.items():
            if st["psi"] is not None:
                self.metrics.score_psi.labels(kind=kind).set(st["psi"])
            if st["ood_rate"] is not None:
                self.metrics.ood_rate.labels(kind=kind).set(st["ood_rate"])
        return stats

    async def confidence(self, served: Served, prompts: list[Prompt]) -> list[tuple[ProbeResult, str]]:
        results = await self.engine.score(prompts, served.probe)
        scored = [(r, served.policy.decide(r.probability)) for r in results]
        for result, decision in scored:
            self.observe(served, result, decision)
        return scored

    # -- answering ----------------------------------------------------------------------------------------------
    def _decided(self, query: Query, request_id: str, confidence: ProbeResult, decision: str | None = None,
                 route: RouteInfo | None = None) -> Outcome:
        """The policy's decision on a request's confidence (taken once: ``decision`` when the engine's prefill
        callback already took it), counted and remembered for feedback: the head of every answer."""
        served = query.served
        decision = decision or served.policy.decide(confidence.probability)
        self._remember(request_id, confidence, decision, *self.observe(served, confidence, decision))
        return Outcome(confidence, decision, request_id, served.artifact_id, prompt_tokens=len(query.prompt.input_ids),
                       route=route)

    async def _escalate(self, query: Query):
        try:
            # a gain-routing target is a valueprobe sidecar: it gets the request as the user sent it (a multiple-
            # choice question stays one, through the completions 'choices' extension), rendered by its own format
            source = query.source if self.gain_router is not None else None
            answer = await self.escalation.answer(messages=query.messages, rendered=query.rendered,
                                                  max_new_tokens=query.max_new_tokens, temperature=query.temperature,
                                                  top_p=query.top_p, seed=query.seed, stop=query.stop, source=source)
            self.metrics.escalations.labels(result="ok").inc()
            return answer, None
        except UpstreamError as exc:
            self.metrics.escalations.labels(result="failed").inc()
            return None, str(exc)

    def _check_search(self, query: Query) -> None:
        if query.search is None:
            return
        if self.settings.mode != "embedded" or not self.engine.supports_search:
            raise ClientError("search is served in embedded mode by the transformers engine "
                              f"(this server: mode {self.settings.mode}, engine {self.settings.engine})")

    async def _searched(self, query: Query, head: Outcome, on_step=None) -> Outcome:
        """The answer by value-guided step search, once the prompt's own confidence said to answer."""
        spec = query.search
        valued_by = self.search_probe or query.served.probe
        result = await self.engine.search(query.prompt, valued_by, spec, temperature=query.temperature,
                                          seed=query.seed, on_step=on_step)
        self.metrics.searches.labels(strategy=spec.strategy).inc()
        self.metrics.search_steps.labels(strategy=spec.strategy).inc(len(result.steps))
        info = {"strategy": result.strategy, "value_artifact": valued_by.artifact_id,
                "tokens_generated": result.tokens_generated,
                "candidates_scored": result.candidates_scored,
                "steps": [{"text": st.text, "value": st.value} for st in result.steps]}
        return replace(head, text=result.text, completion_tokens=result.tokens_generated, search=info,
                       finish_reason="stop")

    async def answer(self, query: Query) -> Outcome:
        """The whole answer: the final event of :meth:`events` (a fold over the one answer flow)."""
        async for event in self.events(query, stream=False):
            if isinstance(event, Final):
                return event.outcome
        raise RuntimeError("the answer flow ended without a final event")

    async def events(self, query: Query, *, stream: bool) -> AsyncIterator[Event]:
        """The one answer flow, for every protocol, streamed or not: :class:`Head` (the decision, taken at the
        prefill before any decoding), then :class:`Text` pieces or search :class:`StepEvent` s, then
        :class:`Final` (text, usage, routing). A local generation is stopped right after the prefill when the
        policy does not answer locally; ``stream`` asks the engine stream for pieces as they are decoded (batched with
        the others all the same). Closing the iterator (a client that went away) stops the local generation.

        With gain routing (:mod:`.routing`) the escalation target's probability is asked for beside the local
        prefill: ``before`` decides on it with a prompt-only prefill here (the local generation starts only for a
        question kept here), ``after`` on the local answer's answer-level probability."""
        served = query.served
        request_id = f"vp-{uuid.uuid4().hex[:24]}"
        self._check_search(query)
        router = self.gain_router if query.search is None else None
        target = asyncio.ensure_future(self._target_probability(query)) if router is not None else None
        route, decision, generation = None, None, None
        try:
            local = self.settings.mode == "embedded" and query.search is None
            if router is not None and router.moment == "before":
                # the router: both prompt-only probabilities decide before any decoding here
                confidence = (await self.engine.score([query.prompt], served.probe))[0]
                decision = served.policy.decide(confidence.probability)
                if decision == "answer":
                    prefill_target, waited = await target
                    route = router.decide(confidence.probability, prefill_target, moment="before", waited=waited)
                    if route.answered_by == "escalation":
                        decision = "escalate"
                else:
                    route = self._abstained_route(router, confidence, "before")
                local = local and decision == "answer"
            if local:
                args = dict(max_new_tokens=query.max_new_tokens, temperature=query.temperature, top_p=query.top_p,
                            seed=query.seed, stop=query.stop, answer_probe=self.answer_probe, logprobs=query.logprobs,
                            stream=stream)
                # the engine takes the policy's decision at the prefill (already taken above by the router)
                generation = self.engine.generate(query.prompt, served.probe,
                                                  policy=served.policy if decision is None else None, **args)
                prefilled = await anext(generation)
                if decision is None:
                    confidence, decision = prefilled.confidence, prefilled.decision
            elif decision is None:  # search, or gateway mode: a prompt-only prefill decides
                confidence = (await self.engine.score([query.prompt], served.probe))[0]
            head = self._decided(query, request_id, confidence, decision, route)
            if router is not None and router.moment == "after" and head.decision != "answer":
                head = replace(head, route=self._abstained_route(router, confidence, "after"))
            if head.decision != "answer" or (generation is None and query.search is None):
                # abstain, escalate, or the gateway's upstream: the engine stopped the local row at its prefill
                if generation is not None:
                    await generation.aclose()
                full = await self._finish_non_local(query, head)
                yield Head(replace(full, text=""))
                if full.text:
                    yield Text(full.text)
                yield Final(full)
                return
            yield Head(head)
            if query.search is not None:
                async for event in self._search_events(query, head):
                    yield event
                return
            gen = None
            async for event in generation:
                if isinstance(event, Piece):
                    yield Text(event.text)
                elif isinstance(event, Finished):
                    gen = event.generation
            if gen is None:
                raise ProbeFailedError("the generation ended without a result")
            if not stream:
                yield Text(gen.text)
            final = replace(head, text=gen.text, completion_tokens=gen.completion_tokens,
                            finish_reason=gen.finish_reason, logprobs=gen.logprobs, **self._answer_fields(gen))
            if router is not None and router.moment == "after":
                final = await self._routed_after(query, final, target, stream)
            elif (not stream and self.escalate_after is not None and final.answer is not None
                    and final.answer.probability < self.escalate_after):
                final = await self._escalated_after(query, final)
            yield Final(final)
        finally:
            if generation is not None:
                await generation.aclose()  # a client that disconnected mid-stream stops the generation here
            if target is not None and not target.done():
                target.cancel()

    async def _target_probability(self, query: Query) -> tuple:
        """The escalation target's ``(P, artifact id, error)`` for ``query``, and the seconds spent asking."""
        started = time.perf_counter()
        target = await self.gain_router.target_probability(query.source)
        return target, time.perf_counter() - started

    @staticmethod
    def _abstained_route(router, confidence: ProbeResult, moment: str):
        info = RouteInfo(moment, "local", "abstained", confidence.probability, None, None, None)
        router.count(info)
        return info

    async def _routed_after(self, query: Query, final: Outcome, target, stream: bool) -> Outcome:
        """The cascade's decision on a local answer: the gain from its answer-level probability and the target's;
        above the threshold, the target's answer replaces it (a stream has sent it already: flagged instead)."""
        if final.answer is None:  # no answer-level probability (the readout failed): the local answer stands
            return final
        answer_target, waited = await target
        route = self.gain_router.decide(final.answer.probability, answer_target, moment="after", waited=waited)
        if stream:  # decided as usual, but what was streamed stays
            if route.answered_by == "escalation":
                route = replace(route, answered_by="local", reason="not_replaced_in_stream")
            return replace(final, route=route)
        final = replace(final, route=route)
        if route.answered_by != "escalation":
            return final
        replaced = await self._escalated_after(query, final)
        if not replaced.routed:  # the target failed to answer: the local answer stands, flagged
            return replace(replaced, route=replace(route, answered_by="local", reason="target_unavailable",
                                                   target_error=replaced.upstream_error))
        return replaced

    async def _search_events(self, query: Query, head: Outcome) -> AsyncIterator[Event]:
        """Each kept step as it is chosen, with its value, then the final outcome."""
        steps: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self._searched(query, head, on_step=steps.put_nowait))
        try:
            while not (task.done() and steps.empty()):
                getter = asyncio.ensure_future(steps.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield StepEvent(getter.result())
                else:
                    getter.cancel()
            yield Final(await task)
        finally:
            task.cancel()

    async def _finish_non_local(self, query: Query, head: Outcome) -> Outcome:
        o = head
        if o.decision == "abstain":
            return replace(o, text=self.settings.refusal_text)
        upstream_error = None
        if o.decision == "escalate":
            answer, upstream_error = await self._escalate(query)
            if answer is not None:
                return replace(o, text=answer.text, routed=True, completion_tokens=answer.completion_tokens or 0,
                               finish_reason=answer.finish_reason)
        if self.upstream is not None:
            try:
                answer = await self.upstream.answer(messages=query.messages, rendered=query.rendered,
                                                    max_new_tokens=query.max_new_tokens, temperature=query.temperature,
                                                    top_p=query.top_p, seed=query.seed, stop=query.stop)
                return replace(o, text=answer.text, upstream_error=upstream_error,
                               completion_tokens=answer.completion_tokens or 0, finish_reason=answer.finish_reason)
            except UpstreamError as exc:
                upstream_error = str(exc) if upstream_error is None else f"{upstream_error}; {exc}"
        elif self.settings.mode == "embedded" and o.decision == "escalate":
            # Escalation failed in embedded mode: answer locally rather than not at all.
            gen = await final_generation(self.engine.generate(
                query.prompt, query.served.probe, max_new_tokens=query.max_new_tokens, temperature=query.temperature,
                top_p=query.top_p, seed=query.seed, stop=query.stop))
            route = o.route if o.route is None else replace(o.route, answered_by="local", reason="target_unavailable",
                                                              target_error=upstream_error)
            return replace(o, text=gen.text, upstream_error=upstream_error, completion_tokens=gen.completion_tokens,
                           finish_reason=gen.finish_reason, route=route)
        return replace(o, text=self.settings.refusal_text, upstream_error=upstream_error)

    async def answer_confidence(self, prompts: list[Prompt], answers: list[str]) -> list[tuple[ProbeResult, bool | None]]:
        """Confidence in answers generated elsewhere: one prefill of prompt + answer each, read at the answer's
        last token (the state the decode step that ends it computes). ``(result, flagged)`` per answer."""
        if self.answer_probe is None:
            raise ClientError("'answer' needs an answer-level artifact (--answer-artifact, `valueprobe fit "
                              "--answer-end`); this sidecar has none")
        for a in answers:
            self.check_size(a, "answer")
        if not self.engine.supports_answer_scoring:
            raise ClientError(f"'answer': the {self.settings.engine} engine does not score answers generated "
                              "elsewhere; use the transformers engine")
        ids = [self.engine.tokenize_answer(a) for a in answers]
        results = await self.engine.score_answers(prompts, ids, self.answer_probe)
        out = []
        for r in results:
            flagged = None if self.settings.flag_below is None else bool(r.probability < self.settings.flag_below)
            self.metrics.answer_confidence.labels(model=self.model_name, artifact=self.answer_probe.artifact_id,
                                                  flagged=str(bool(flagged)).lower()).observe(r.probability)
            out.append((r, flagged))
        return out

    def _escalate_after_threshold(self) -> float | None:
        """``--escalate-after-below``, or the answer artifact's fitted threshold for ``--escalate-after-rate``."""
        s = self.settings
        if s.escalate_after_below is None and s.escalate_after_rate is None:
            return None
        if self.answer_probe is None:
            raise ValueError("escalate_after_below / escalate_after_rate need an answer-level artifact (--answer-artifact)")
        if self.escalation is None:
            raise ValueError("escalate_after_below / escalate_after_rate need an escalation target (--escalate-url)")
        if s.escalate_after_below is not None:
            return s.escalate_after_below
        return fitted_escalation_threshold(self.answer_probe.thresholds or {}, s.escalate_after_rate)

    async def _escalated_after(self, query: Query, final: Outcome) -> Outcome:
        """A local answer whose answer-level confidence is below ``escalate_after``: the escalation target's answer
        instead (``routed``; the local text kept), or the local answer with the target's error if it failed."""
        answer, error = await self._escalate(query)
        if answer is None:
            return replace(final, upstream_error=error)
        if final.request_id in self._recent:  # the answer served is the escalation target's: no feedback on ours
            self._recent[final.request_id].local = False
        return replace(final, text=answer.text, routed=True, local_text=final.text, logprobs=None,
                       completion_tokens=answer.completion_tokens or 0, finish_reason=answer.finish_reason)

    def _answer_fields(self, gen) -> dict:
        """``answer`` and ``answer_flagged`` of an outcome from the local generation that answered it (observed in
        the answer-confidence histogram)."""
        if self.answer_probe is None:
            return {}
        if gen.answer is None:  # the engine logged why; the answer stands without its confidence, said so
            self.metrics.answer_readout_failures.inc()
            return {"answer_error": "the answer-level readout failed for this answer (logged on the server)"}
        p = gen.answer.probability
        flag = self.settings.flag_below
        flagged = None if flag is None else bool(p < flag)
        self.metrics.answer_confidence.labels(model=self.model_name, artifact=self.answer_probe.artifact_id,
                                              flagged=str(bool(flagged)).lower()).observe(p)
        return {"answer": gen.answer, "answer_flagged": flagged}

    # -- feedback and the calibration that follows it -----------------------------------------------------------
    async def feedback(self, request_id: str, correct: bool, probability: float | None,
                       kind: str | None = None) -> tuple[dict, dict]:
        """Record a label: the feedback metrics (every answer), and the shadow calibrator (answers the local model
        gave, remembered here or sent with ``probability`` and ``kind``). Returns the window's ECE/Brier and what
        recalibration did with it (``used``, ``reason``; ``promoted`` when ``auto`` promoted on this feedback)."""
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
            slot, z0 = self.slot_and_fitted_logit(self.probe, kind, p)
        else:
            return window, {"used": False, "reason": "request not served here: send 'kind' with 'probability' to "
                            "use it for recalibration"}
        self.shadow.add(slot, z0, correct)
        self.metrics.calibration_feedback.labels(slot=slot).set(self.shadow.counts()[slot])
        info: dict = {"used": True, "slot": slot}
        if self.settings.recalibration == "auto" and self.shadow.seen_ % self.settings.recalibration_every == 0:
            try:
                info["promoted"] = await self.promote(trigger="auto")
            except ConflictError as exc:
                info["reason"] = f"not promoted: {exc}"
        return window, info

    async def calibration_report(self) -> dict:
        """The live calibration against the shadow on held-out feedback, per slot, and the drift window (the
        gauges are set from it)."""
        probe = self.probe
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

    async def promote(self, *, trigger: str = "admin") -> dict:
        """Promote the shadow calibration of every slot where it is better on held-out feedback: compose it into a
        new artifact (``calibration_version`` + 1), write it to ``calibration_dir`` (the old one kept), load it
        back (validated) and serve it, as a reload does. :class:`ConflictError` (409) when no slot qualifies."""
        if self.shadow is None:
            raise ConflictError("recalibration is off on this sidecar (--recalibration shadow or auto)")
        async with self._reload_lock:
            old = self.served
            live = old.probe.origin_maps()
            report = await asyncio.to_thread(self.shadow.snapshot().report, live)
            chosen = {slot: rep for slot, rep in report.items() if rep.promotable}
            if not chosen:
                reasons = "; ".join(f"{slot}: {rep.reason}" for slot, rep in report.items()) or "no feedback yet"
                raise ConflictError(f"nothing to promote, still serving {old.artifact_id} (calibration "
                                    f"{old.probe.calibration_version}): {reasons}")
            maps = {}
            for slot, rep in chosen.items():  # from the live map to the shadow's: logit' = a * logit + b
                a_live, b_live = live.get(slot, (1.0, 0.0))
                a = rep.a / a_live
                maps[slot] = (a, rep.b - a * b_live)
            record = {"trigger": trigger, "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "evidence": {slot: rep.to_dict() for slot, rep in chosen.items()},
                      "thresholds": "carried over from the fitted artifact (probabilities, not re-fitted)"}
            try:
                probe = old.probe.recalibrated(maps, record)
                folder = calibration_folder(self.settings.calibration_dir, old.probe.calibration_origin)
                path = next_artifact_path(folder, probe.calibration_version)
                await asyncio.to_thread(probe.save, path)
                probe = await asyncio.to_thread(ValueProbe.load, str(path))
                served = self._make_served(probe)
                await self.engine.attach(probe, strict=self.settings.check_fingerprint)
            except (ArtifactError, ValueError) as exc:
                raise ConflictError(f"promotion failed, still serving {old.artifact_id}: {exc}") from None
            except OSError as exc:  # the disk, not the request: a server error
                raise StorageError(f"promotion failed writing the new calibration, still serving "
                                   f"{old.artifact_id}: {exc}") from None
            await self._swap(served)
            self.metrics.promotions.labels(trigger=trigger).inc()
            return {"previous": old.artifact_id, "artifact_id": probe.artifact_id,
                    "calibration_version": probe.calibration_version, "path": str(path),
                    "slots": {slot: {"a": a, "b": b, **chosen[slot].to_dict()} for slot, (a, b) in maps.items()}}


def now() -> int:
    return int(time.time())
