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

from valueprobe.plugin import ArtifactError, PromptError, ProbeResult, ValueProbe
from valueprobe.plugin.artifact import TOKEN_POSITION
from valueprobe.plugin.nexttoken import prompt_kind

from .engines.base import EngineClient, Prompt
from .errors import ClientError, NotFoundError, UpstreamError
from .metrics import SidecarMetrics
from .settings import Settings
from .upstream import make_upstream


# Temperatures below this decode greedily (vLLM's _SAMPLING_EPS): every route and both engines go through
# Sidecar.query, so this is the one place that decides it.
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class Policy:
    """answer / abstain / escalate from the calibrated probability and the two thresholds."""

    abstain_below: float | None
    escalate_below: float | None
    can_escalate: bool

    def decide(self, p: float) -> str:
        if self.abstain_below is not None and p < self.abstain_below:
            return "abstain"
        if self.can_escalate and self.escalate_below is not None and p < self.escalate_below:
            return "escalate"
        return "answer"


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
    return abstain, escalate


def check_pin(probe: ValueProbe, pin: str | None) -> None:
    """Refuse an artifact whose content hash differs from the deployment's pin (``--artifact-sha256``)."""
    if pin and not probe.data.metadata["content_sha256"].startswith(pin.lower()):
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
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._reload_lock = asyncio.Lock()
        metrics.set_window(settings.feedback_window)
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
                                "model_fingerprint": probe.model_fingerprint.get("layer_weights_sha256", "")[:16]})

    def allowed_artifact_path(self, requested: str) -> Path:
        """Reload only takes ``.safetensors`` files inside the artifact folder (``artifact_dir``, default: the
        served artifact's folder). The same message for every refusal, so it reveals nothing about the disk."""
        root = Path(self.settings.artifact_dir or Path(self.probe.data.path or ".").parent).resolve()
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
            self.served = served
            self.engine.probe = probe
            self._publish(served)
            await self.engine.release_unused()  # the old artifact goes once the requests using it end
            return old.artifact_id, served.artifact_id

    async def aclose(self):
        for client in (self.upstream, self.escalation):
            if client is not None:
                await client.aclose()

    # -- rendering ----------------------------------------------------------------------------------------------
    def check_size(self, text: str, what: str = "prompt"):
        if len(text) > self.settings.max_prompt_chars:
            raise ClientError(f"{what} is {len(text)} characters; the limit is {self.settings.max_prompt_chars}")

    def render_question(self, served: Served, question: str, choices=None) -> tuple[list[dict], str, tuple[str, int]]:
        self.check_size(question)
        prompt = {"question": question, "choices": choices} if choices else question
        fmt = served.probe.prompt_format
        try:
            rendered = fmt.render(self.engine.tokenizer, prompt)
            user = fmt.user_text(prompt)
        except PromptError as exc:
            raise ClientError(str(exc)) from None
        return [{"role": "user", "content": user}], rendered, prompt_kind(prompt)

    def render_messages(self, served: Served, messages: list[dict]) -> tuple[list[dict], str, tuple[str, int]]:
        """A single user message is a question and gets the artifact's format (what the probe was fitted on);
        longer conversations are rendered by the chat template as given."""
        for m in messages:
            self.check_size(m["content"])
        if len(messages) == 1 and messages[0]["role"] == "user":
            return self.render_question(served, messages[0]["content"])
        try:
            return messages, served.probe.prompt_format.render(self.engine.tokenizer, messages), ("open", 0)
        except PromptError as exc:
            raise ClientError(str(exc)) from None

    def max_new_tokens(self, requested: int | None) -> int:
        n = requested or self.settings.default_max_new_tokens
        if n > self.settings.max_new_tokens_limit:
            raise ClientError(f"max tokens {n} exceeds the limit {self.settings.max_new_tokens_limit}")
        return n

    def prompt(self, served: Served, rendered: str, kind=("open", 0), max_new_tokens: int = 0) -> Prompt:
        """Tokenize once, and refuse a prompt that cannot fit the model's context before any model work."""
        ids = self.engine.tokenize(rendered, served.probe)
        if not ids:
            raise ClientError("the prompt is empty after tokenization")
        context = self.engine.context_length
        if context and len(ids) + max_new_tokens > context:
            raise ClientError(f"prompt ({len(ids)} tokens) plus max tokens ({max_new_tokens}) exceeds the model's "
                              f"context of {context}")
        return Prompt(ids, kind)

    def query(self, served: Served, messages, rendered: str, kind, max_new_tokens: int | None, temperature=None,
              top_p=None, seed=None, stop=None, search=None, logprobs: int | None = None, stream: bool = False) -> Query:
        n_new = self.max_new_tokens(max_new_tokens)
        if temperature is not None and temperature < SAMPLING_EPS:
            temperature = None  # greedy, as vLLM does: dividing logits by a subnormal temperature overflows them
        if logprobs is not None:
            self._check_logprobs(stream, search)
        return Query(messages, rendered, self.prompt(served, rendered, kind, n_new), served, n_new, temperature, top_p,
                     seed, list(stop or []), search, logprobs)

    @property
    def serves_logprobs(self) -> bool:
        """Whether whole responses can carry token log-probabilities (embedded mode, an engine that gives them)."""
        return self.settings.mode == "embedded" and self.engine.supports_logprobs

    def _check_logprobs(self, stream: bool, search) -> None:
        """Token log-probabilities are served where this sidecar computes the answer in one generate call; every
        other combination is refused with the reason (never answered with an empty field)."""
        where = None
        if self.settings.mode != "embedded":
            where = "in gateway mode (the upstream generates: ask it)"
        elif not self.engine.supports_logprobs:
            where = f"by the {self.settings.engine} engine"
        elif stream:
            where = "in streams yet (ask for a whole response)"
        elif search is not None:
            where = "with search"
        if where:
            raise ClientError(f"token log-probabilities are not served {where}")

    # -- scoring ------------------------------------------------------------------------------------------------
    def _remember(self, request_id: str, p: float):
        self._recent[request_id] = p
        while len(self._recent) > 10000:
            self._recent.popitem(last=False)

    def observe(self, served: Served, result: ProbeResult, decision: str):
        self.metrics.confidence.labels(model=self.model_name, artifact=served.artifact_id, decision=decision).observe(
            result.probability)
        self.metrics.decisions.labels(decision=decision).inc()
        if result.ood is not None:
            self.metrics.ood.labels(kind=result.kind, flagged=str(result.ood).lower()).inc()

    async def confidence(self, served: Served, prompts: list[Prompt]) -> list[tuple[ProbeResult, str]]:
        results = await self.engine.score(prompts, served.probe)
        scored = [(r, served.policy.decide(r.probability)) for r in results]
        for result, decision in scored:
            self.observe(served, result, decision)
        return scored

    # -- answering ----------------------------------------------------------------------------------------------
    def _decided(self, query: Query, request_id: str, confidence: ProbeResult, decision: str | None = None) -> Outcome:
        """The policy's decision on a request's confidence (taken once: ``decision`` when the engine's prefill
        callback already took it), counted and remembered for feedback: the head of every answer."""
        served = query.served
        decision = decision or served.policy.decide(confidence.probability)
        self.observe(served, confidence, decision)
        self._remember(request_id, confidence.probability)
        return Outcome(confidence, decision, request_id, served.artifact_id, prompt_tokens=len(query.prompt.input_ids))

    async def _escalate(self, query: Query):
        try:
            answer = await self.escalation.answer(messages=query.messages, rendered=query.rendered,
                                                  max_new_tokens=query.max_new_tokens, temperature=query.temperature,
                                                  top_p=query.top_p, seed=query.seed, stop=query.stop)
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
        policy does not answer locally; ``stream`` asks the engine for pieces as they are decoded (a streamed
        generation runs alone) instead of one batched generation. Closing the iterator (a client that went away)
        stops the local generation."""
        served = query.served
        request_id = f"vp-{uuid.uuid4().hex[:24]}"
        self._check_search(query)
        taken: dict[str, str] = {}  # the decision, taken once, by the engine at the prefill

        def answers_locally(result: ProbeResult) -> bool:
            taken["decision"] = served.policy.decide(result.probability)
            return taken["decision"] == "answer"

        gen = pieces = stop_flag = done = None
        try:
            if self.settings.mode == "embedded" and query.search is None:
                args = dict(max_new_tokens=query.max_new_tokens, temperature=query.temperature, top_p=query.top_p,
                            seed=query.seed, stop=query.stop, answer_probe=self.answer_probe)
                if query.logprobs is not None:  # refused with streams (see _check_logprobs)
                    args["logprobs"] = query.logprobs
                if stream:
                    confidence, pieces, stop_flag, done = await self.engine.generate_stream(
                        query.prompt, served.probe, decide=answers_locally, **args)
                else:
                    gen = await self.engine.generate(query.prompt, served.probe, on_confidence=answers_locally, **args)
                    confidence = gen.confidence
            else:  # search, or gateway mode: a prompt-only prefill decides
                confidence = (await self.engine.score([query.prompt], served.probe))[0]
            head = self._decided(query, request_id, confidence, taken.get("decision"))
            answered_here = query.search is not None or gen is not None or pieces is not None
            if head.decision != "answer" or not answered_here:  # abstain, escalate, or the gateway's upstream
                if pieces is not None:
                    async for _ in pieces:  # drain the generation the prefill decision already stopped
                        pass
                    await done
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
            elif pieces is not None:
                async for piece in pieces:
                    yield Text(piece)
                gen = await done
            if gen is not None:
                if not stream:
                    yield Text(gen.text)
                final = replace(head, text=gen.text, completion_tokens=gen.completion_tokens,
                                finish_reason=gen.finish_reason, logprobs=gen.logprobs, **self._answer_fields(gen))
                if (not stream and self.escalate_after is not None and final.answer is not None
                        and final.answer.probability < self.escalate_after):
                    final = await self._escalated_after(query, final)
                yield Final(final)
        finally:
            if stop_flag is not None:
                stop_flag.event.set()  # a client that disconnected mid-stream stops the generation here

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
            gen = await self.engine.generate(query.prompt, query.served.probe, max_new_tokens=query.max_new_tokens,
                                             temperature=query.temperature, top_p=query.top_p, seed=query.seed,
                                             stop=query.stop)
            return replace(o, text=gen.text, upstream_error=upstream_error, completion_tokens=gen.completion_tokens,
                           finish_reason=gen.finish_reason)
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
        return replace(final, text=answer.text, routed=True, local_text=final.text, logprobs=None,
                       completion_tokens=answer.completion_tokens or 0, finish_reason=answer.finish_reason)

    def _answer_fields(self, gen) -> dict:
        """``answer`` and ``answer_flagged`` of an outcome from the local generation that answered it (observed in
        the answer-confidence histogram)."""
        if gen.answer is None or self.answer_probe is None:
            return {}
        p = gen.answer.probability
        flag = self.settings.flag_below
        flagged = None if flag is None else bool(p < flag)
        self.metrics.answer_confidence.labels(model=self.model_name, artifact=self.answer_probe.artifact_id,
                                              flagged=str(bool(flagged)).lower()).observe(p)
        return {"answer": gen.answer, "answer_flagged": flagged}

    # -- feedback -----------------------------------------------------------------------------------------------
    def feedback(self, request_id: str, correct: bool, probability: float | None) -> dict:
        p = probability if probability is not None else self._recent.get(request_id)
        if p is None:
            raise NotFoundError(f"unknown request_id {request_id!r} on this replica: send 'probability' with the feedback")
        return self.metrics.record_feedback(p, correct)


def now() -> int:
    return int(time.time())
