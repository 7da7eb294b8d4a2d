"""Thin HTTP layer: validate, delegate to the Sidecar on ``app.state``, shape the response."""

from __future__ import annotations

import json
import logging
import secrets
from typing import Annotated, Literal, Union

from fastapi import APIRouter, Depends, Header, Query as QueryParam, Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import protocol as p
from .errors import AuthError, ClientError, ForbiddenError, ProbeNotLoadedError
from .http_errors import exception_body
from .service import Outcome, Query, Sidecar, StepEvent, Text, new_request_id, now
from .settings import Settings

logger = logging.getLogger("valueprobe.server")
ERRORS = {400: {"description": "Malformed request"}, 422: {"description": "Invalid request"},
          503: {"description": "Not ready or overloaded (Retry-After)"}}


def get_sidecar(request: Request) -> Sidecar:
    sidecar = getattr(request.app.state, "sidecar", None)
    if sidecar is None:
        error = getattr(request.app.state, "load_error", None)
        raise ProbeNotLoadedError(f"model and artifact failed to load: {error}" if error else "model and artifact are still loading")
    return sidecar


SidecarDep = Annotated[Sidecar, Depends(get_sidecar)]


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def require_admin(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Admin routes are closed unless the server was started with an admin token (``--admin-token``)."""
    token = settings.admin_token
    if not token:
        raise ForbiddenError("admin routes are disabled: start the server with --admin-token (VALUEPROBE_ADMIN_TOKEN)")
    supplied = (authorization or "").removeprefix("Bearer ").strip()
    if not supplied or not secrets.compare_digest(supplied, token):
        raise AuthError("this route needs 'Authorization: Bearer <admin token>'")


AdminDep = Depends(require_admin)
router = APIRouter(responses=ERRORS)


def _scored(result, served) -> dict:
    """The confidence fields every response shares: served probability, kind, components, OOD."""
    probe = served.probe
    ood = None
    if result.ood is not None:
        ood = p.OOD(flagged=result.ood, distance=result.ood_distance, threshold=probe.ood_threshold)
    return dict(probability=result.probability, raw=result.raw, kind=result.kind, served_score=probe.served_score,
                calibration_version=probe.calibration_version,
                components=p.Components(**result.components) if result.components else None, ood=ood)


def _answer_confidence(a, flagged: bool | None, answer_probe, local_text: str | None = None) -> p.AnswerConfidence | None:
    """``confidence.answer`` from an answer-level readout (``None`` when there is none)."""
    if a is None or answer_probe is None:
        return None
    ood = None if a.ood is None else p.OOD(flagged=a.ood, distance=a.ood_distance, threshold=answer_probe.ood_threshold)
    return p.AnswerConfidence(probability=a.probability, raw=a.raw, kind=a.kind, components=p.AnswerComponents(**a.components),
                              flagged=flagged, artifact_id=answer_probe.artifact_id,
                              calibration_version=answer_probe.calibration_version, ood=ood, local_text=local_text)


def _confidence(o: Outcome, served, answer_probe=None) -> p.Confidence:
    return p.Confidence(**_scored(o.confidence, served), answer=_answer_confidence(o.answer, o.answer_flagged, answer_probe, o.local_text),
                        decision=o.decision, artifact_id=o.artifact_id, routed=o.routed,
                        upstream_error=o.upstream_error, request_id=o.request_id,
                        route=None if o.route is None else p.Route(**o.route.to_dict()), answer_error=o.answer_error)


def _headers(o: Outcome) -> dict:
    h = {
        "x-valueprobe-confidence": f"{o.confidence.probability:.6f}",
        "x-valueprobe-raw": f"{o.confidence.raw:.6f}",
        "x-valueprobe-decision": o.decision,
        "x-valueprobe-artifact": o.artifact_id,
        "x-valueprobe-routed": str(o.routed).lower(),
        "x-valueprobe-request-id": o.request_id,
    }
    if o.upstream_error:
        h["x-valueprobe-upstream-error"] = "true"
    if o.route is not None:  # gain routing: known at the head for a decision before decoding
        h["x-valueprobe-route"] = o.route.reason
        if o.route.gain is not None:
            h["x-valueprobe-route-gain"] = f"{o.route.gain:.6f}"
    if o.confidence.ood:
        h["x-valueprobe-ood"] = "true"
    if o.answer is not None:  # whole responses only: a stream's headers leave before the answer exists
        h["x-valueprobe-answer-confidence"] = f"{o.answer.probability:.6f}"
        if o.answer_flagged is not None:
            h["x-valueprobe-answer-flagged"] = str(o.answer_flagged).lower()
    return h


def _usage(o: Outcome) -> p.Usage:
    return p.Usage(prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens,
                   total_tokens=o.prompt_tokens + o.completion_tokens)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _asked_logprobs(req) -> int | None:
    """How many alternatives per token a request asks for (0: the chosen token's only), or ``None``."""
    if isinstance(req, p.ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise ClientError("top_logprobs needs logprobs: true")
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs  # completions: null, or how many alternatives


def _generation(req: p._GenerationParams) -> dict:
    """The generation parameters of an OpenAI request, as :meth:`Sidecar.prepare` takes them."""
    return dict(max_new_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature,
                top_p=req.top_p, seed=req.seed, stop=req.stop_list(), search=getattr(req, "search", None),
                logprobs=_asked_logprobs(req), stream=req.stream)


def _openai_token(token) -> dict:
    return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode("utf-8"))}


def _chat_logprobs(o: Outcome) -> dict | None:
    if o.logprobs is None:
        return None
    return {"content": [{**_openai_token(t), "top_logprobs": [_openai_token(_Alt(*a)) for a in t.top]}
                        for t in o.logprobs], "refusal": None}


def _completion_logprobs(o: Outcome, asked: int | None) -> dict | None:
    if o.logprobs is None:
        return None
    offsets, at = [], 0
    for t in o.logprobs:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in o.logprobs], "token_logprobs": [t.logprob for t in o.logprobs],
            "top_logprobs": [{a[1]: a[2] for a in t.top} for t in o.logprobs] if asked else None,
            "text_offset": offsets}


class _Alt:
    """One alternative ``(id, text, logprob)`` with the attribute names of a token record."""

    def __init__(self, id, text, logprob):
        self.id, self.text, self.logprob = id, text, logprob


class _Serialiser:
    """One protocol's rendering of the answer events (:meth:`Sidecar.events`): SSE chunks for a stream, or the
    whole response (a fold over the same events). ``None`` from a chunk method sends nothing for that event."""

    sentinel: str | None = "data: [DONE]\n\n"

    def __init__(self, sidecar: Sidecar, served):
        self.sidecar, self.served = sidecar, served

    def confidence(self, o: Outcome) -> dict:
        return _confidence(o, self.served, self.served.answer_probe).model_dump()

    def head(self, o: Outcome) -> dict | None: ...

    def text(self, o: Outcome, piece: str) -> dict | None: ...

    def step(self, o: Outcome, step) -> dict | None:
        out = self.text(o, step.text + "\n")
        out["search_step"] = {"text": step.text, "value": step.value}
        return out

    def final(self, o: Outcome) -> dict | None: ...

    def error(self, exc: Exception) -> dict:
        """The in-band error event of a stream whose status line is already sent (counted like any error)."""
        return exception_body(exc, tgi=False, metrics=self.sidecar.metrics)[1]

    def response(self, o: Outcome): ...


class _ChatSerialiser(_Serialiser):
    def __init__(self, sidecar, served):
        super().__init__(sidecar, served)
        self.id = f"chatcmpl-{served.artifact_id}-{now()}"

    def _chunk(self, delta: dict, finish_reason=None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": now(), "model": self.sidecar.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def head(self, o):
        return {**self._chunk({"role": "assistant", "content": ""}), "confidence": self.confidence(o)}

    def text(self, o, piece):
        return self._chunk({"content": piece} if piece else {})

    def final(self, o):
        chunk = self._chunk({}, o.finish_reason)
        chunk["choices"][0]["logprobs"] = _chat_logprobs(o)  # every token's, in the last chunk
        return {**chunk, "confidence": self.confidence(o)}

    def response(self, o):
        body = p.ChatCompletionResponse(id=self.id, created=now(), model=self.sidecar.model_name, usage=_usage(o),
                                        choices=[p.ChatChoice(message=p.Message(role="assistant", content=o.text),
                                                              finish_reason=o.finish_reason, logprobs=_chat_logprobs(o))],
                                        confidence=_confidence(o, self.served, self.served.answer_probe),
                                        search=p.SearchInfo(**o.search) if o.search else None)
        payload = body.model_dump()
        if payload["search"] is None:
            del payload["search"]  # the plain OpenAI shape unless a search was asked for
        return payload


class _CompletionSerialiser(_Serialiser):
    def __init__(self, sidecar, served, logprobs: int | None = None):
        super().__init__(sidecar, served)
        self.logprobs = logprobs
        self.id = f"cmpl-{served.artifact_id}-{now()}"

    def _chunk(self, text: str, finish_reason=None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": now(), "model": self.sidecar.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}

    def head(self, o):
        return {**self._chunk(""), "confidence": self.confidence(o)}

    def text(self, o, piece):
        return self._chunk(piece or "")

    def final(self, o):
        chunk = self._chunk("", o.finish_reason)
        chunk["choices"][0]["logprobs"] = _completion_logprobs(o, self.logprobs)  # every token's, in the last chunk
        return {**chunk, "confidence": self.confidence(o)}

    def response(self, o):
        return p.CompletionResponse(id=self.id, created=now(), model=self.sidecar.model_name, usage=_usage(o),
                                    choices=[p.CompletionChoice(text=o.text, finish_reason=o.finish_reason,
                                                logprobs=_completion_logprobs(o, self.logprobs))],
                                    confidence=_confidence(o, self.served, self.served.answer_probe)).model_dump()


class _TGISerialiser(_Serialiser):
    """TGI streams have no head chunk and no ``[DONE]`` sentinel; the first token event carries the confidence."""

    sentinel = None

    def __init__(self, sidecar, served, req: p.TGIRequest):
        super().__init__(sidecar, served)
        self.req = req
        self.index = 0  # token events sent so far

    def head(self, o):
        return None

    def text(self, o, piece):
        event = {"index": self.index, "token": {"id": 0, "text": piece, "logprob": None, "special": False},
                 "generated_text": None, "details": None}
        if self.index == 0:
            event["confidence"] = self.confidence(o)
        self.index += 1
        return event

    def final(self, o):
        return {"index": self.index, "token": {"id": 0, "text": "", "logprob": None, "special": True},
                "generated_text": o.text,
                "details": {"finish_reason": _tgi_details(o, None)["finish_reason"],
                            "generated_tokens": o.completion_tokens, "seed": self.req.parameters.seed},
                "confidence": self.confidence(o)}

    def error(self, exc):
        return exception_body(exc, tgi=True, metrics=self.sidecar.metrics)[1]  # its own error_type, as TGI's

    def response(self, o):
        text = (self.req.inputs + o.text) if self.req.parameters.return_full_text else o.text
        return {"generated_text": text, "details": _tgi_details(o, self.req.parameters.seed),
                "confidence": self.confidence(o)}


async def _respond(sidecar: Sidecar, query: Query, serialiser: _Serialiser, *, stream: bool, wrap=None):
    """Run the answer flow and render it with ``serialiser``: the whole response, or an SSE stream started as soon
    as the decision is known (before the first token). An error after that point ends the stream with an error
    event (never a silent cut); a client that goes away closes the flow, which stops the generation."""
    if not stream:
        o = await sidecar.answer(query)
        payload = serialiser.response(o)
        return JSONResponse(wrap(payload) if wrap else payload, headers=_headers(o))
    events = sidecar.events(query, stream=True)
    head = (await events.__anext__()).outcome

    async def body():
        try:
            first = serialiser.head(head)
            if first is not None:
                yield _sse(first)
            async for event in events:
                if isinstance(event, Text):
                    chunk = serialiser.text(head, event.piece)
                elif isinstance(event, StepEvent):  # a search step, with the value it was kept for
                    chunk = serialiser.step(head, event.step)
                else:
                    chunk = serialiser.final(event.outcome)
                if chunk is not None:
                    yield _sse(chunk)
        except Exception as exc:  # noqa: BLE001 - reported in-band: the status line is already sent
            logger.exception("error in a stream")
            yield _sse(serialiser.error(exc))
        finally:
            await events.aclose()
        if serialiser.sentinel:
            yield serialiser.sentinel

    return StreamingResponse(body(), media_type="text/event-stream", headers=_headers(head))


@router.post("/v1/chat/completions", response_model=p.ChatCompletionResponse, tags=["openai"])
async def chat_completions(req: p.ChatCompletionRequest, sidecar: SidecarDep):
    served = sidecar.served
    query = sidecar.prepare(served, messages=[m.model_dump() for m in req.messages], **_generation(req))
    return await _respond(sidecar, query, _ChatSerialiser(sidecar, served), stream=req.stream)


@router.post("/v1/completions", response_model=p.CompletionResponse, tags=["openai"])
async def completions(req: p.CompletionRequest, sidecar: SidecarDep):
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ClientError("exactly one prompt per request is supported")
    served = sidecar.served
    query = sidecar.prepare(served, question=prompts[0], choices=req.choices, **_generation(req))
    return await _respond(sidecar, query, _CompletionSerialiser(sidecar, served, req.logprobs), stream=req.stream)


# -- TGI ---------------------------------------------------------------------------------------------------------
def _tgi_query(sidecar: Sidecar, served, req: p.TGIRequest, stream: bool) -> Query:
    prm = req.parameters
    if prm.decoder_input_details:
        raise ClientError("decoder_input_details: the prompt's token log-probabilities are not served (they would "
                          "need a pass over the whole prompt's logits); send the request without it")
    # The stock client sends details=true on every request: tokens are filled where this sidecar generates the
    # answer in one whole response; elsewhere (gateway mode, vLLM engine, streams) details.tokens stays empty
    # unless top_n_tokens asks for them explicitly, which is then refused with the reason.
    logprobs = None
    if prm.top_n_tokens:
        if stream:
            raise ClientError("top_n_tokens is not served in TGI streams (their token events are text pieces, not "
                              "tokens); ask /generate for the whole response")
        logprobs = prm.top_n_tokens
    elif prm.details and not stream and sidecar.serves_logprobs:
        logprobs = 0
    return sidecar.prepare(served, raw=req.inputs, max_new_tokens=prm.max_new_tokens,
                           temperature=prm.temperature if prm.do_sample else None, top_p=prm.top_p, seed=prm.seed,
                           stop=list(prm.stop), logprobs=logprobs, stream=stream)


def _tgi_token(t) -> dict:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": False}


def _tgi_details(o: Outcome, seed):
    details = {"finish_reason": "length" if o.finish_reason == "length" else "eos_token",
               "generated_tokens": o.completion_tokens, "seed": seed, "prefill": [],
               "tokens": [_tgi_token(t) for t in o.logprobs or []]}
    if o.logprobs and any(t.top for t in o.logprobs):
        details["top_tokens"] = [[_tgi_token(_Alt(*a)) for a in t.top] for t in o.logprobs]
    return details


async def _tgi(sidecar: Sidecar, req: p.TGIRequest, *, stream: bool, wrap=None):
    served = sidecar.served
    return await _respond(sidecar, _tgi_query(sidecar, served, req, stream), _TGISerialiser(sidecar, served, req),
                          stream=stream, wrap=wrap)


@router.post("/", tags=["tgi"])
async def tgi_root(req: p.TGIRequest, sidecar: SidecarDep):
    """What ``text_generation.Client`` posts to: a one-element list, or SSE when ``stream`` is true."""
    return await _tgi(sidecar, req, stream=req.stream, wrap=lambda payload: [payload])


@router.post("/generate", tags=["tgi"])
async def tgi_generate(req: p.TGIRequest, sidecar: SidecarDep):
    return await _tgi(sidecar, req, stream=False)


@router.post("/generate_stream", tags=["tgi"])
async def tgi_generate_stream(req: p.TGIRequest, sidecar: SidecarDep):
    return await _tgi(sidecar, req, stream=True)


# -- valueprobe -----------------------------------------------------------------------------------------------
MAX_CONFIDENCE_ITEMS = 256


@router.post("/v1/confidence", tags=["valueprobe"], response_model=Union[p.ConfidenceResult, p.ConfidenceBatch])
async def confidence(req: Union[p.ConfidenceItem, list[p.ConfidenceItem]], sidecar: SidecarDep):
    """Prompt-only confidence, no generation: ``{"prompt": ...}`` (with ``choices`` for multiple choice),
    ``{"messages": [...]}`` or a list of up to 256 of them (admitted as one request). An item with ``answer``
    (generated elsewhere: gateway mode) also gets ``answer``, the confidence in that answer from one prefill of
    prompt + answer (needs an answer-level artifact; 400 otherwise). Every result carries a ``request_id`` for
    ``/v1/feedback``."""
    items = req if isinstance(req, list) else [req]
    if not items:
        raise ClientError("empty list")
    if len(items) > MAX_CONFIDENCE_ITEMS:
        raise ClientError(f"at most {MAX_CONFIDENCE_ITEMS} prompts per request")
    served = sidecar.served
    prompts = []
    for item in items:
        if (item.prompt is None) == (item.messages is None):
            raise ClientError("each item needs exactly one of 'prompt' or 'messages'")
        messages = None if item.messages is None else [m.model_dump() for m in item.messages]
        prompts.append(sidecar.prepare(served, question=item.prompt, choices=item.choices, messages=messages,
                                       scoring_only=True).prompt)
    given = [i for i, item in enumerate(items) if item.answer is not None]
    answers = {}
    if given:
        scored_answers = await sidecar.answer_confidence([prompts[i] for i in given], [items[i].answer for i in given],
                                                         served)
        answers = {i: _answer_confidence(r, flagged, served.answer_probe) for i, (r, flagged) in zip(given, scored_answers)}
    ids = [new_request_id() for _ in items]  # each scored prompt can be labelled (/v1/feedback)
    scored = await sidecar.confidence(served, prompts, ids)
    results = [p.ConfidenceResult(**_scored(r, served), decision=d, artifact_id=served.artifact_id, answer=answers.get(i),
                                  request_id=ids[i]) for i, (r, d) in enumerate(scored)]
    return results[0] if not isinstance(req, list) else p.ConfidenceBatch(results=results)


@router.post("/v1/feedback", tags=["valueprobe"], response_model=p.FeedbackResponse, dependencies=[AdminDep])
async def feedback(req: p.FeedbackRequest, sidecar: SidecarDep):
    """Label a served answer: feeds the feedback metrics and, for answers the local model gave, the shadow
    calibrator (which ``--recalibration auto`` promotes by itself when it is better)."""
    window, recalibration = await sidecar.feedback(req.request_id, req.correct, req.probability, req.kind)
    return p.FeedbackResponse(recorded=True, window=window, recalibration=recalibration)


@router.get("/v1/admin/calibration", tags=["valueprobe"], dependencies=[AdminDep])
async def calibration(sidecar: SidecarDep):
    """Live against shadow calibration per slot on held-out feedback (Brier, ECE, promotable and why): the
    prompt-level artifact's under ``slots``, the answer-level artifact's under ``answer`` (described in
    ``answer_artifact``, null without one); the calibration version served and the drift window (score PSI, OOD
    rate per kind)."""
    return await sidecar.calibration_report()


@router.post("/v1/admin/calibration/promote", tags=["valueprobe"], dependencies=[AdminDep])
async def promote_calibration(sidecar: SidecarDep, artifact: Annotated[Literal["prompt", "answer"], QueryParam(
        description="Which artifact's calibration: the prompt-level one (confidence.probability) or the "
                    "answer-level one (confidence.answer.probability).")] = "prompt"):
    """Serve the shadow calibration of every slot of ``artifact`` where it beats the live one on held-out
    feedback, written as a new artifact and recorded in the store for every replica (409 when none does, with each
    slot's reason, or when another replica promoted that version first)."""
    return await sidecar.promote(trigger="admin", artifact=artifact)


@router.post("/v1/admin/reload", tags=["valueprobe"], dependencies=[AdminDep])
async def reload_artifact(req: p.ReloadRequest, sidecar: SidecarDep):
    previous, current = await sidecar.reload(req.artifact)
    return {"previous": previous, "artifact_id": current}


@router.get("/v1/models", tags=["openai"])
async def models(sidecar: SidecarDep):
    return {"object": "list", "data": [{"id": sidecar.model_name, "object": "model", "created": 0,
                                        "owned_by": "valueprobe", "artifact_id": sidecar.probe.artifact_id}]}


@router.get("/v1/artifact", tags=["valueprobe"])
async def artifact(sidecar: SidecarDep):
    served = sidecar.served
    probe, policy = served.probe, served.policy
    return {"artifact_id": probe.artifact_id, "model_name": probe.model_name, "layer": probe.layer, "k": probe.k,
            "head": probe.head, "calibrator": probe.calibrator, "served_score": probe.served_score,
            "calibration_version": probe.calibration_version, "calibration_origin": probe.calibration_origin[:12],
            "prompt_format": json.loads(probe.prompt_format.to_json()), "thresholds": probe.thresholds,
            "policy": {"abstain_below": policy.abstain_below, "escalate_below": policy.escalate_below,
                       "escalation_configured": policy.can_escalate},
            "eval_card": probe.eval_card,
            "answer_artifact": None if served.answer_probe is None else {
                "artifact_id": served.answer_probe.artifact_id,
                "calibration_version": served.answer_probe.calibration_version,
                "calibration_origin": served.answer_probe.calibration_origin[:12]}}


@router.get("/healthz", tags=["ops"])
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
async def readyz(sidecar: SidecarDep):
    # ready even when the store is down (answers go on; what could not be written is counted): said here
    return {"status": "ready", "artifact_id": sidecar.probe.artifact_id,
            "calibration_version": sidecar.probe.calibration_version, "store": sidecar.store.status()}
