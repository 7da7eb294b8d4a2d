"""The sidecar's logic, free of FastAPI: render, score, decide, answer (locally, upstream or escalated)."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from valueprobe.plugin import PromptError, ProbeResult

from .engine import Engine
from .errors import ClientError, NotFoundError, UpstreamError
from .metrics import SidecarMetrics
from .settings import Settings
from .upstream import make_upstream


@dataclass
class Query:
    """One request after validation: what the model sees (``rendered``) and what an OpenAI upstream gets."""

    messages: list[dict]
    rendered: str
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None


@dataclass
class Outcome:
    text: str
    confidence: ProbeResult
    decision: str
    routed: bool
    upstream_error: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    request_id: str


class Policy:
    """answer / abstain / escalate from the calibrated probability and the two thresholds."""

    def __init__(self, abstain_below: float | None, escalate_below: float | None, can_escalate: bool):
        self.abstain_below, self.escalate_below, self.can_escalate = abstain_below, escalate_below, can_escalate

    def decide(self, p: float) -> str:
        if self.abstain_below is not None and p < self.abstain_below:
            return "abstain"
        if self.can_escalate and self.escalate_below is not None and p < self.escalate_below:
            return "escalate"
        return "answer"


def resolve_thresholds(settings: Settings, artifact_thresholds: dict) -> tuple[float | None, float | None]:
    """Explicit thresholds win; otherwise ``escalate_rate`` / ``risk_alpha`` pick the artifact's fitted ones."""
    abstain, escalate = settings.abstain_below, settings.escalate_below
    if escalate is None and settings.escalate_rate is not None:
        table = artifact_thresholds.get("escalation", {})
        key = f"{settings.escalate_rate:g}"
        if key not in table:
            raise ValueError(f"the artifact has no escalation threshold for rate {key}; it has {sorted(table)}")
        escalate = float(table[key])
    if abstain is None and settings.risk_alpha is not None:
        table = artifact_thresholds.get("risk_controlled", {})
        key = f"{settings.risk_alpha:g}"
        if key not in table:
            raise ValueError(f"the artifact has no risk-controlled threshold for alpha {key}; it has {sorted(table)}")
        t = table[key]["threshold"]
        abstain = 1.0 + 1e-9 if t is None else float(t)  # no qualifying coverage: abstain on everything
    return abstain, escalate


class Sidecar:
    def __init__(self, settings: Settings, engine: Engine, metrics: SidecarMetrics, model_name: str):
        self.settings, self.engine, self.metrics, self.model_name = settings, engine, metrics, model_name
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
        metrics.set_window(settings.feedback_window)
        self.refresh_policy()

    @property
    def probe(self):
        return self.engine.probe

    def refresh_policy(self):
        abstain, escalate = resolve_thresholds(self.settings, self.probe.thresholds or {})
        self.policy = Policy(abstain, escalate, self.escalation is not None)
        for decision in ("answer", "abstain", "escalate"):  # series start at zero
            self.metrics.confidence.labels(model=self.model_name, artifact=self.probe.artifact_id, decision=decision)
        self.metrics.info.info({"artifact_id": self.probe.artifact_id, "model": self.model_name,
                                "layer": str(self.probe.layer), "k": str(self.probe.k),
                                "model_fingerprint": self.probe.model_fingerprint.get("layer_weights_sha256", "")[:16]})

    async def aclose(self):
        for client in (self.upstream, self.escalation):
            if client is not None:
                await client.aclose()

    # -- rendering ----------------------------------------------------------------------------------------------
    def _check_size(self, text: str):
        if len(text) > self.settings.max_prompt_chars:
            raise ClientError(f"prompt is {len(text)} characters; the limit is {self.settings.max_prompt_chars}")

    def render_question(self, question: str, choices=None) -> tuple[list[dict], str]:
        self._check_size(question)
        prompt = {"question": question, "choices": choices} if choices else question
        fmt = self.probe.prompt_format
        try:
            rendered = fmt.render(self.engine.tokenizer, prompt)
            user = fmt.user_text(prompt)
        except PromptError as exc:
            raise ClientError(str(exc)) from None
        return [{"role": "user", "content": user}], rendered

    def render_messages(self, messages: list[dict]) -> tuple[list[dict], str]:
        """A single user message is a question and gets the artifact's format (what the probe was fitted on);
        longer conversations are rendered by the chat template as given."""
        for m in messages:
            self._check_size(m["content"])
        if len(messages) == 1 and messages[0]["role"] == "user":
            return self.render_question(messages[0]["content"])
        try:
            return messages, self.probe.prompt_format.render(self.engine.tokenizer, messages)
        except PromptError as exc:
            raise ClientError(str(exc)) from None

    def max_new_tokens(self, requested: int | None) -> int:
        n = requested or self.settings.default_max_new_tokens
        if n > self.settings.max_new_tokens_limit:
            raise ClientError(f"max tokens {n} exceeds the limit {self.settings.max_new_tokens_limit}")
        return n

    def query(self, messages, rendered: str, max_new_tokens: int | None, temperature=None, top_p=None, seed=None,
              stop=None) -> Query:
        """Validate a request's size against the model's context before any model work is queued."""
        n_new = self.max_new_tokens(max_new_tokens)
        context = getattr(self.engine.model.config, "max_position_embeddings", None)
        if context:
            n_prompt = len(self.engine.tokenizer(rendered, add_special_tokens=False)["input_ids"])
            if n_prompt + n_new > context:
                raise ClientError(f"prompt ({n_prompt} tokens) plus max tokens ({n_new}) exceeds the model's context of {context}")
        return Query(messages, rendered, n_new, temperature, top_p, seed, stop or [])

    # -- scoring ------------------------------------------------------------------------------------------------
    def _remember(self, request_id: str, p: float):
        self._recent[request_id] = p
        while len(self._recent) > 10000:
            self._recent.popitem(last=False)

    def _observe(self, result: ProbeResult, decision: str):
        self.metrics.confidence.labels(model=self.model_name, artifact=self.probe.artifact_id, decision=decision).observe(
            result.probability)
        self.metrics.decisions.labels(decision=decision).inc()

    async def confidence(self, rendered: list[str]) -> list[tuple[ProbeResult, str]]:
        import asyncio

        results = await asyncio.gather(*(self.engine.score(t) for t in rendered))
        return [(r, self.policy.decide(r.probability)) for r in results]

    # -- answering ----------------------------------------------------------------------------------------------
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

    async def answer(self, query: Query) -> Outcome:
        request_id = f"vp-{uuid.uuid4().hex[:24]}"
        upstream_error = None
        local_text, prompt_tokens, completion_tokens, finish = None, 0, 0, "stop"
        if self.settings.mode == "embedded":
            gen = await self.engine.generate(query.rendered, max_new_tokens=query.max_new_tokens,
                                             temperature=query.temperature, top_p=query.top_p, seed=query.seed,
                                             stop=query.stop)
            confidence = gen.confidence
            local_text, prompt_tokens, completion_tokens, finish = gen.text, gen.prompt_tokens, gen.completion_tokens, gen.finish_reason
        else:
            confidence = await self.engine.score(query.rendered)
            prompt_tokens = len(self.engine.tokenizer(query.rendered, add_special_tokens=False)["input_ids"])
        decision = self.policy.decide(confidence.probability)
        routed = False
        text = None
        if decision == "escalate":
            answer, upstream_error = await self._escalate(query)
            if answer is not None:
                text, completion_tokens, finish, routed = answer.text, answer.completion_tokens or 0, answer.finish_reason, True
        if decision == "abstain":
            text, completion_tokens, finish = self.settings.refusal_text, 0, "stop"
        if text is None:
            if local_text is None:
                try:
                    answer = await self.upstream.answer(messages=query.messages, rendered=query.rendered,
                                                        max_new_tokens=query.max_new_tokens,
                                                        temperature=query.temperature, top_p=query.top_p,
                                                        seed=query.seed, stop=query.stop)
                    local_text, completion_tokens, finish = answer.text, answer.completion_tokens or 0, answer.finish_reason
                except UpstreamError as exc:
                    # Graceful: keep the confidence, say what failed, refuse rather than invent an answer.
                    upstream_error = str(exc) if upstream_error is None else f"{upstream_error}; {exc}"
                    local_text, finish = self.settings.refusal_text, "stop"
            text = local_text
        self._observe(confidence, decision)
        self._remember(request_id, confidence.probability)
        return Outcome(text, confidence, decision, routed, upstream_error, prompt_tokens, completion_tokens, finish,
                       request_id)

    async def answer_stream(self, query: Query):
        """Yields ``("confidence", Outcome-without-text)`` first, then ``("text", piece)``, then ``("done", Outcome)``."""
        request_id = f"vp-{uuid.uuid4().hex[:24]}"
        if self.settings.mode == "embedded":
            confidence, pieces, stop_flag, done = await self.engine.generate_stream(
                query.rendered, max_new_tokens=query.max_new_tokens, temperature=query.temperature, top_p=query.top_p,
                seed=query.seed, stop=query.stop)
        else:
            confidence, pieces, stop_flag, done = await self.engine.score(query.rendered), None, None, None
        decision = self.policy.decide(confidence.probability)
        self._observe(confidence, decision)
        self._remember(request_id, confidence.probability)
        head = Outcome("", confidence, decision, False, None, 0, 0, "stop", request_id)
        if decision != "answer" and stop_flag is not None:
            stop_flag.event.set()  # the local answer will not be used: stop generating it
        if decision == "answer" and pieces is not None:
            yield "confidence", head
            async for piece in pieces:
                yield "text", piece
            gen = await done
            yield "done", Outcome(gen.text, confidence, decision, False, None, gen.prompt_tokens, gen.completion_tokens,
                                  gen.finish_reason, request_id)
            return
        if pieces is not None:
            async for _ in pieces:  # drain the stopped generation
                pass
            await done
        full = await self._finish_non_local(query, head)
        yield "confidence", Outcome("", confidence, decision, full.routed, full.upstream_error, 0, 0, "stop", request_id)
        if full.text:
            yield "text", full.text
        yield "done", full

    async def _finish_non_local(self, query: Query, head: Outcome) -> Outcome:
        o = head
        if o.decision == "abstain":
            return Outcome(self.settings.refusal_text, o.confidence, o.decision, False, None, 0, 0, "stop", o.request_id)
        upstream_error = None
        if o.decision == "escalate":
            answer, upstream_error = await self._escalate(query)
            if answer is not None:
                return Outcome(answer.text, o.confidence, o.decision, True, None, 0, answer.completion_tokens or 0,
                               answer.finish_reason, o.request_id)
        if self.upstream is not None:
            try:
                answer = await self.upstream.answer(messages=query.messages, rendered=query.rendered,
                                                    max_new_tokens=query.max_new_tokens, temperature=query.temperature,
                                                    top_p=query.top_p, seed=query.seed, stop=query.stop)
                return Outcome(answer.text, o.confidence, o.decision, False, upstream_error, 0,
                               answer.completion_tokens or 0, answer.finish_reason, o.request_id)
            except UpstreamError as exc:
                upstream_error = str(exc) if upstream_error is None else f"{upstream_error}; {exc}"
        elif self.settings.mode == "embedded" and o.decision == "escalate":
            # Escalation failed in embedded mode: answer locally rather than not at all.
            gen = await self.engine.generate(query.rendered, max_new_tokens=query.max_new_tokens,
                                             temperature=query.temperature, top_p=query.top_p, seed=query.seed,
                                             stop=query.stop)
            return Outcome(gen.text, o.confidence, o.decision, False, upstream_error, gen.prompt_tokens,
                           gen.completion_tokens, gen.finish_reason, o.request_id)
        return Outcome(self.settings.refusal_text, o.confidence, o.decision, False, upstream_error, 0, 0, "stop",
                       o.request_id)

    # -- feedback -----------------------------------------------------------------------------------------------
    def feedback(self, request_id: str, correct: bool, probability: float | None) -> dict:
        p = probability if probability is not None else self._recent.get(request_id)
        if p is None:
            raise NotFoundError(f"unknown request_id {request_id!r} on this replica: send 'probability' with the feedback")
        return self.metrics.record_feedback(p, correct)


def now() -> int:
    return int(time.time())
