"""The sidecar's logic, free of FastAPI: render, score, decide, answer (locally, upstream or escalated). Its other
jobs live beside it: request preparation (``preparation.py``), the policy and the served snapshot (``policy.py``),
the answer flow's events (``outcome.py``), feedback and recalibration (``feedback.py``), gain routing
(``routing.py``).

Every request takes one :class:`Served` snapshot (probe, policy, artifact id) when it starts and uses it to
render, score, decide and report, so a hot reload (which swaps the whole snapshot at once, between requests)
never leaves a request half on one artifact and half on another.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from valueprobe.plugin import ArtifactError, ProbeResult, ValueProbe
from valueprobe.plugin.artifact import ANSWER_END, TOKEN_POSITION

from .engines.base import EngineClient, Finished, Piece, Prompt, final_generation
from .errors import (ClientError, ConflictError, ProbeFailedError, StorageError, UpstreamError,
                     UpstreamRejectedError, ValueprobeError)
from .feedback import FeedbackLoop
from .metrics import SidecarMetrics
from .outcome import Event, Final, Head, Outcome, Query, StepEvent, Text
from .preparation import SAMPLING_EPS, Preparation
from .policy import Policy, Served, check_pin, escalate_after_threshold, policy_summary, resolve_thresholds
from .recalibration import calibration_folder, next_artifact_path
from .routing import GainRouter, RouteInfo
from .settings import Settings
from .store import Store
from .upstream import make_upstream

logger = logging.getLogger("valueprobe.server")

# re-exported: what serves a request and what comes of it are imported from here by routes and tests
__all__ = ["ARTIFACTS", "Event", "Final", "Head", "Outcome", "Policy", "Query", "SAMPLING_EPS", "Served", "Sidecar",
           "StepEvent", "Text", "check_pin", "new_request_id", "now", "resolve_thresholds"]

#: the artifacts that recalibrate from feedback: the prompt-level one (Served.probe) and the answer-level one
#: (Served.answer_probe)
ARTIFACTS = ("prompt", "answer")


class Sidecar:
    def __init__(self, settings: Settings, engine: EngineClient, metrics: SidecarMetrics, model_name: str, *,
                 search_probe: ValueProbe | None = None, answer_probe: ValueProbe | None = None,
                 store: Store | None = None):
        self.settings, self.engine, self.metrics, self.model_name = settings, engine, metrics, model_name
        # the answer-level and step-value artifacts ride in every served snapshot (a reload keeps them)
        self._beside = {"answer_probe": answer_probe, "search_probe": search_probe}
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
        self.gain_router = GainRouter.from_settings(settings, answer_probe, metrics)
        self._reload_lock = asyncio.Lock()
        self._pinned_probe: ValueProbe | None = None  # the pinned artifact's own bytes, loaded when first needed
        self.preparation = Preparation(settings, engine)
        # without a store given (an embedding app, a test): one in memory, this process only
        self.store = store if store is not None else open_store(settings, metrics, url="sqlite://")
        self.calibration = FeedbackLoop(settings, metrics, engine.probe, self.store, answer_probe)
        self.served = self._make_served(engine.probe)
        self.metrics.publish_artifact(self.served.probe, model_name)
        summary = policy_summary(settings, self.served.probe.thresholds or {})
        if summary is not None:  # what --escalate-rate / --risk-alpha do, said once (a warning if most abstain)
            (logger.warning if summary[1] else logger.info)("policy from the artifact's fitted thresholds: %s", summary[0])
        self.escalate_after = escalate_after_threshold(settings, answer_probe, self.escalation is not None)

    # -- the served snapshot ------------------------------------------------------------------------------------
    @property
    def probe(self) -> ValueProbe:
        return self.served.probe

    @property
    def policy(self) -> Policy:
        return self.served.policy

    @property
    def answer_probe(self) -> ValueProbe | None:
        return self.served.answer_probe

    def _make_served(self, probe: ValueProbe) -> Served:
        abstain, escalate = resolve_thresholds(self.settings, probe.thresholds or {})
        return Served(probe, Policy(abstain, escalate, self.escalation is not None), **self._beside)

    def _pinned(self) -> ValueProbe | None:
        """With a pin (``--artifact-sha256``): the pinned bytes, the configured artifact file as loaded (once),
        that a recalibration offered by a reload, a promotion or the store is checked against (:func:`check_pin`)."""
        if not self.settings.artifact_sha256:
            return None
        if self._pinned_probe is None:
            self._pinned_probe = ValueProbe.load(self.settings.artifact_path())
        return self._pinned_probe

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
                check_pin(probe, self.settings.artifact_sha256, self._pinned())
                served = self._make_served(probe)
                await self.engine.attach(probe, strict=self.settings.check_fingerprint)
            except (ArtifactError, ValueError) as exc:
                raise ClientError(f"reload refused, still serving {old.artifact_id}: {exc}") from None
            await self._swap(served)
            return old.artifact_id, served.artifact_id

    async def _swap(self, served: Served) -> None:
        """Serve ``served`` (already attached to the engine) from the next request on: a reload or a promotion of
        either artifact. Under the reload lock. The answer-level artifact it holds is kept for later snapshots (a
        reload of the prompt-level artifact keeps a promoted answer-level one, and the other way round)."""
        self.served = served
        self._beside["answer_probe"] = served.answer_probe
        self.engine.probe = served.probe
        if served.probe.calibration_origin != self.calibration.origin:  # another fitted artifact: its own feedback
            self.calibration.reset(served.probe)
            await self.calibration.restore()
        self.metrics.publish_artifact(served.probe, self.model_name)
        await self.engine.release_unused()  # the old artifact goes once the requests using it end

    async def aclose(self):
        for client in (self.upstream, self.escalation, self.gain_router):
            if client is not None:
                await client.aclose()
        await asyncio.to_thread(self.store.close)  # what is still queued is written first

    # -- preparation (server/preparation.py) ----------------------------------------------------------------------
    def prepare(self, served: Served | None = None, **request) -> Query:
        """Any protocol's request as one :class:`Query` (:meth:`Preparation.prepare`), on the served snapshot unless
        one is given: the only way routes and consumers build one."""
        return self.preparation.prepare(served or self.served, **request)

    @property
    def serves_logprobs(self) -> bool:
        return self.preparation.serves_logprobs

    # -- scoring ------------------------------------------------------------------------------------------------
    def observe(self, served: Served, result: ProbeResult, decision: str, request_id: str | None = None) -> None:
        """Count a scored prompt (confidence histogram, decisions, OOD) and hand it to the feedback loop (the drift
        window; with ``request_id``, remembered for its label)."""
        self.metrics.confidence.labels(model=self.model_name, artifact=served.artifact_id, decision=decision).observe(
            result.probability)
        self.metrics.decisions.labels(decision=decision).inc()
        if result.ood is not None:
            self.metrics.ood.labels(kind=result.kind, flagged=str(result.ood).lower()).inc()
        self.calibration.observe(served.probe, result, decision, request_id)

    async def confidence(self, served: Served, prompts: list[Prompt],
                         request_ids: list[str] | None = None) -> list[tuple[ProbeResult, str]]:
        """Prompt-only scores and the policy's decisions; with ``request_ids`` (one per prompt) each is remembered
        and stored under its id, so that a label sent to ``/v1/feedback`` for it counts."""
        results = await self.engine.score(prompts, served.probe)
        scored = [(r, served.policy.decide(r.probability)) for r in results]
        for i, (result, decision) in enumerate(scored):
            self.observe(served, result, decision, None if request_ids is None else request_ids[i])
        return scored

    # -- answering ----------------------------------------------------------------------------------------------
    def _decided(self, query: Query, request_id: str, confidence: ProbeResult, decision: str | None = None,
                 route: RouteInfo | None = None) -> Outcome:
        """The policy's decision on a request's confidence (taken once: ``decision`` when the engine's prefill
        callback already took it), counted and remembered for feedback: the head of every answer."""
        served = query.served
        decision = decision or served.policy.decide(confidence.probability)
        self.observe(served, confidence, decision, request_id)
        return Outcome(confidence, decision, request_id, served.artifact_id, prompt_tokens=len(query.prompt.input_ids),
                       route=route)

    async def _escalate(self, query: Query):
        try:
            # every target gets the request as the user sent it, never the artifact's rendering; a gain-routing
            # target is a valueprobe sidecar: a multiple-choice question stays one there (the completions 'choices'
            # extension), rendered by its own format
            source = query.source if self.gain_router is not None else None
            answer = await self.escalation.answer(messages=query.messages, rendered=query.text_for_upstream,
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
        valued_by = query.served.search_probe or query.served.probe
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
        request_id = new_request_id()
        self._check_search(query)
        router = self.gain_router if query.search is None else None
        target = asyncio.ensure_future(router.timed_probability(query.source)) if router is not None else None
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
                    route = router.abstained(confidence.probability, "before")
                local = local and decision == "answer"
            elif local and query.answer_prompt is not None:
                # local_prompt=user: the probe scores the artifact's rendering, the model answers the request as
                # sent (a second prefill)
                confidence = (await self.engine.score([query.prompt], served.probe))[0]
                decision = served.policy.decide(confidence.probability)
                local = decision == "answer"
            if local:
                args = dict(max_new_tokens=query.max_new_tokens, temperature=query.temperature, top_p=query.top_p,
                            seed=query.seed, stop=query.stop, answer_probe=served.answer_probe, logprobs=query.logprobs,
                            stream=stream)
                # the engine takes the policy's decision at the prefill (already taken above by the router)
                generation = self.engine.generate(query.local_prompt, served.probe,
                                                  policy=served.policy if decision is None else None, **args)
                prefilled = await anext(generation)
                if decision is None:
                    confidence, decision = prefilled.confidence, prefilled.decision
            elif decision is None:  # search, or gateway mode: a prompt-only prefill decides
                confidence = (await self.engine.score([query.prompt], served.probe))[0]
            head = self._decided(query, request_id, confidence, decision, route)
            if router is not None and router.moment == "after" and head.decision != "answer":
                head = replace(head, route=router.abstained(confidence.probability, "after"))
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
                            finish_reason=gen.finish_reason, logprobs=gen.logprobs, **self._answer_fields(gen, served.answer_probe))
            if final.answer is not None:
                self.calibration.answer_read(final.request_id, served.answer_probe, final.answer)
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
                answer = await self.upstream.answer(messages=query.messages, rendered=query.text_for_upstream,
                                                    max_new_tokens=query.max_new_tokens, temperature=query.temperature,
                                                    top_p=query.top_p, seed=query.seed, stop=query.stop)
                return replace(o, text=answer.text, upstream_error=upstream_error,
                               completion_tokens=answer.completion_tokens or 0, finish_reason=answer.finish_reason)
            except UpstreamRejectedError:
                raise  # the configuration or the request, not an outage: an error, never the refusal text
            except UpstreamError as exc:
                upstream_error = str(exc) if upstream_error is None else f"{upstream_error}; {exc}"
        elif self.settings.mode == "embedded" and o.decision == "escalate":
            # Escalation failed in embedded mode: answer locally rather than not at all.
            gen = await final_generation(self.engine.generate(
                query.local_prompt, query.served.probe, max_new_tokens=query.max_new_tokens, temperature=query.temperature,
                top_p=query.top_p, seed=query.seed, stop=query.stop))
            route = o.route if o.route is None else replace(o.route, answered_by="local", reason="target_unavailable",
                                                              target_error=upstream_error)
            return replace(o, text=gen.text, upstream_error=upstream_error, completion_tokens=gen.completion_tokens,
                           finish_reason=gen.finish_reason, route=route)
        return replace(o, text=self.settings.refusal_text, upstream_error=upstream_error)

    async def answer_confidence(self, prompts: list[Prompt], answers: list[str],
                                served: Served | None = None) -> list[tuple[ProbeResult, bool | None]]:
        """Confidence in answers generated elsewhere: one prefill of prompt + answer each, read at the answer's
        last token (the state the decode step that ends it computes), by the answer-level artifact of ``served``
        (default: the served snapshot). ``(result, flagged)`` per answer."""
        answer_probe = (served or self.served).answer_probe
        if answer_probe is None:
            raise ClientError("'answer' needs an answer-level artifact (--answer-artifact, `valueprobe fit "
                              "--answer-end`); this sidecar has none")
        for a in answers:
            self.preparation.check_size(a, "answer")
        if not self.engine.supports_answer_scoring:
            raise ClientError(f"'answer': the {self.settings.engine} engine does not score answers generated "
                              "elsewhere; use the transformers engine")
        ids = [self.engine.tokenize_answer(a) for a in answers]
        results = await self.engine.score_answers(prompts, ids, answer_probe)
        out = []
        for r in results:
            flagged = None if self.settings.flag_below is None else bool(r.probability < self.settings.flag_below)
            self.metrics.answer_confidence.labels(model=self.model_name, artifact=answer_probe.artifact_id,
                                                  flagged=str(bool(flagged)).lower()).observe(r.probability)
            out.append((r, flagged))
        return out

    async def _escalated_after(self, query: Query, final: Outcome) -> Outcome:
        """A local answer whose answer-level confidence is below ``escalate_after``: the escalation target's answer
        instead (``routed``; the local text kept), or the local answer with the target's error if it failed."""
        answer, error = await self._escalate(query)
        if answer is None:
            return replace(final, upstream_error=error)
        self.calibration.not_local(final.request_id)  # the answer served is the escalation target's
        return replace(final, text=answer.text, routed=True, local_text=final.text, logprobs=None,
                       completion_tokens=answer.completion_tokens or 0, finish_reason=answer.finish_reason)

    def _answer_fields(self, gen, answer_probe: ValueProbe | None) -> dict:
        """``answer`` and ``answer_flagged`` of an outcome from the local generation that answered it, read by the
        request's ``answer_probe`` (observed in the answer-confidence histogram)."""
        if answer_probe is None:
            return {}
        if gen.answer is None:  # the engine logged why; the answer stands without its confidence, said so
            self.metrics.answer_readout_failures.inc()
            return {"answer_error": "the answer-level readout failed for this answer (logged on the server)"}
        p = gen.answer.probability
        flag = self.settings.flag_below
        flagged = None if flag is None else bool(p < flag)
        self.metrics.answer_confidence.labels(model=self.model_name, artifact=answer_probe.artifact_id,
                                              flagged=str(bool(flagged)).lower()).observe(p)
        return {"answer": gen.answer, "answer_flagged": flagged}

    # -- feedback and the calibration that follows it (server/feedback.py) ------------------------------------------
    async def feedback(self, request_id: str, correct: bool, probability: float | None,
                       kind: str | None = None) -> tuple[dict, dict]:
        """Record a label (:meth:`FeedbackLoop.label`); ``auto`` promotes either artifact's shadow when it is due
        and better (``promoted``, or the reason it did not; the answer-level artifact's under ``answer``)."""
        window, info = await self.calibration.label(self.probe, request_id, correct, probability, kind)
        # the label is kept by now: a promotion that fails (not better, another replica first, the disk or the
        # store) is said in the answer and logged, never turned into an error for the label
        if info["used"] and self.calibration.promotion_due():
            try:
                info["promoted"] = await self.promote(trigger="auto")
            except ValueprobeError as exc:
                info["reason"] = f"not promoted: {exc}"
                if not isinstance(exc, ClientError):
                    logger.warning("automatic promotion failed: %s", exc)
        answer = info.get("answer")
        if answer is not None and answer["used"] and self.calibration.promotion_due(answer=True):
            try:
                answer["promoted"] = await self.promote(trigger="auto", artifact="answer")
            except ValueprobeError as exc:
                answer["reason"] = f"not promoted: {exc}"
                if not isinstance(exc, ClientError):
                    logger.warning("automatic promotion of the answer-level artifact failed: %s", exc)
        return window, info

    async def calibration_report(self) -> dict:
        served = self.served
        return await self.calibration.report(served.probe, served.answer_probe)

    async def promote(self, *, trigger: str = "admin", artifact: str = "prompt") -> dict:
        """Promote the shadow calibration of every slot of ``artifact`` (``prompt``: the prompt-level artifact;
        ``answer``: the answer-level one) where it is better on held-out feedback: compose it into a new artifact
        (``calibration_version`` + 1), write it to ``calibration_dir`` (the old one kept), load it back
        (validated), record it in the store under its fitted artifact (one version per number, whichever replica
        records it first) and serve it, as a reload does. :class:`ConflictError` (409) when no slot qualifies or
        another replica promoted that version first (its version is then served); :class:`ClientError` (400) for
        the answer-level artifact on a sidecar without one."""
        if artifact not in ARTIFACTS:
            raise ClientError(f"artifact must be one of {', '.join(ARTIFACTS)}, not {artifact!r}")
        answer = artifact == "answer"
        async with self._reload_lock:
            old = self.served
            current = old.answer_probe if answer else old.probe
            if current is None:
                raise ClientError("this sidecar serves no answer-level artifact (--answer-artifact): there is no "
                                  "answer-level calibration to promote")
            chosen, maps, record = await self.calibration.promotion(current, trigger, answer=answer)
            try:
                probe = current.recalibrated(maps, record)
                folder = calibration_folder(self.settings.calibration_dir, current.calibration_origin)
                path = next_artifact_path(folder, probe.calibration_version)
                await asyncio.to_thread(probe.save, path)
                probe = await asyncio.to_thread(ValueProbe.load, str(path))
                served = await self._serving(probe, answer)
                # the store decides: one version per number, whichever replica records it first
                recorded = await asyncio.to_thread(
                    self.store.record_promotion, origin=current.calibration_origin, version=probe.calibration_version,
                    artifact_id=probe.artifact_id, artifact=path.read_bytes(), trigger=trigger,
                    evidence={slot: rep.to_dict() for slot, rep in chosen.items()})
            except (ArtifactError, ValueError) as exc:
                raise ConflictError(f"promotion failed, still serving {current.artifact_id}: {exc}") from None
            except OSError as exc:  # the disk, not the request: a server error
                raise StorageError(f"promotion failed writing the new calibration, still serving "
                                   f"{current.artifact_id}: {exc}") from None
            except SQLAlchemyError as exc:
                raise StorageError(f"promotion failed recording the new calibration in the store, still serving "
                                   f"{current.artifact_id}: {exc.__class__.__name__}") from None
            if recorded:
                self.metrics.store_writes.labels(table="promotions").inc()
                await self._swap(served)
                self.metrics.promotions.labels(trigger=trigger).inc()
                return {"artifact": artifact, "previous": current.artifact_id, "artifact_id": probe.artifact_id,
                        "calibration_version": probe.calibration_version, "path": str(path),
                        "slots": {slot: {"a": a, "b": b, **chosen[slot].to_dict()} for slot, (a, b) in maps.items()}}
            path.unlink(missing_ok=True)
        # another replica recorded this version first: serve theirs (outside the lock: following takes it, and an
        # asyncio.Lock is not reentrant)
        adopted = await self._follow(answer)
        now_serving = self.served.answer_probe if answer else self.served.probe
        raise ConflictError(f"another replica promoted calibration {probe.calibration_version} first; serving "
                            f"{adopted or now_serving.artifact_id} (its version) instead of promoting again")

    async def _serving(self, probe: ValueProbe, answer: bool) -> Served:
        """The served snapshot with ``probe`` in place of the prompt-level artifact (its policy resolved again), or
        with ``answer`` of the answer-level one, checked and attached to the engine; not yet served. Under the
        reload lock."""
        if answer:
            probe.require_position(ANSWER_END)
            await self.engine.attach_answer(probe, strict=self.settings.check_fingerprint)
            return replace(self.served, answer_probe=probe)
        probe.require_position(TOKEN_POSITION)
        check_pin(probe, self.settings.artifact_sha256, self._pinned())
        served = self._make_served(probe)
        await self.engine.attach(probe, strict=self.settings.check_fingerprint)
        return served

    # -- the store every replica shares (server/store.py) -----------------------------------------------------------
    async def restore(self) -> None:
        """At start: the drift and feedback windows and label counts from the store (see :meth:`FeedbackLoop.restore`)."""
        await self.calibration.restore()

    async def follow_store(self) -> None:
        """Runs for the sidecar's life: every ``store_sync_s`` serve the newest calibration another replica promoted
        of either artifact (so replicas agree on ``calibration_version`` within that time); every few minutes apply
        retention and publish the store's size. A failing store is reported (metrics, /readyz), never raised."""
        every = self.settings.store_sync_s
        upkeep_every = max(1, int(300 / every))
        tick = 0
        while True:
            try:
                if self.settings.recalibration != "off":  # off serves the fitted calibration as it is
                    await self._follow_promotions()
                await self.calibration.refresh_counts()  # labels other replicas received count here too
                if tick % upkeep_every == 0:
                    await asyncio.to_thread(self._upkeep)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store is down or a file is bad: keep serving, say so
                logger.warning("store upkeep failed: %s: %s", exc.__class__.__name__, exc)
            self.metrics.store_up.set(int(self.store.up))
            self.metrics.store_pending.set(self.store.pending)
            tick += 1
            await asyncio.sleep(every)

    async def _follow_promotions(self) -> str | None:
        """Serve the store's newest promoted calibrations of both artifacts (:meth:`_follow`). Returns the
        prompt-level artifact id now served when it changed."""
        changed = await self._follow(answer=False)
        await self._follow(answer=True)
        return changed

    async def _follow(self, answer: bool = False) -> str | None:
        """Serve the store's newest promoted calibration of the served prompt-level artifact's fitted artifact (or,
        ``answer``, the answer-level one's) when it is newer than the one served (written beside the others in
        ``calibration_dir``, loaded and checked as a reload is). Returns the artifact id now served when it
        changed."""
        def current() -> ValueProbe | None:
            return self.served.answer_probe if answer else self.served.probe

        if current() is None:
            return None
        row = await asyncio.to_thread(self.store.latest_promotion, current().calibration_origin,
                                      current().calibration_version)
        if row is None:
            return None
        async with self._reload_lock:
            served_now = current()
            if (served_now is None or row["origin"] != served_now.calibration_origin
                    or row["version"] <= served_now.calibration_version):
                return None
            probe = await asyncio.to_thread(materialize_promotion, row, self.settings.calibration_dir)
            await self._swap(await self._serving(probe, answer))
            logger.info("serving %scalibration %d of %s, promoted by %s", "answer-level " if answer else "",
                        probe.calibration_version, probe.calibration_origin[:12], row["replica"])
            return probe.artifact_id

    def _upkeep(self) -> None:
        s = self.settings
        if s.store_retention_days is not None or s.store_retention_rows is not None:
            self.store.prune(max_age_days=s.store_retention_days, max_rows=s.store_retention_rows)
        size = self.store.size()
        for table, n in size["rows"].items():
            self.metrics.store_rows.labels(table=table.removeprefix("vp_")).set(n)
        self.metrics.store_bytes.set(size["bytes"])


def open_store(settings: Settings, metrics: SidecarMetrics, *, url: str | None = None) -> Store:
    """The store these settings name, its writes and losses counted in ``metrics``."""
    return Store(url or settings.store_url(), replica=settings.replica_name(), queue_size=settings.store_queue,
                 on_written=lambda table, n: metrics.store_writes.labels(table=table).inc(n),
                 on_lost=lambda n: metrics.store_lost.inc(n))


def materialize_promotion(row: dict, calibration_dir: str | None) -> ValueProbe:
    """A promoted calibration from the store as a loaded artifact: its bytes written (once) to
    ``calibration_dir`` under the name of their content hash, then loaded and validated."""
    import hashlib

    folder = calibration_folder(calibration_dir, row["origin"])
    folder.mkdir(parents=True, exist_ok=True)
    data = bytes(row["artifact"])
    path = folder / f"v{row['version']}.{hashlib.sha256(data).hexdigest()[:12]}.safetensors"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    probe = ValueProbe.load(str(path))
    if probe.calibration_origin != row["origin"] or probe.calibration_version != row["version"]:
        raise ArtifactError(f"the store's calibration {row['version']} of {row['origin'][:12]} is another artifact "
                            f"({probe.calibration_origin[:12]} version {probe.calibration_version})")
    return probe


def now() -> int:
    return int(time.time())


def new_request_id() -> str:
    """The id of a served request (a generation or a scored prompt), for its label."""
    return f"vp-{uuid.uuid4().hex[:24]}"
