"""Thin HTTP layer: validate, delegate to the Sidecar on ``app.state``, shape the response."""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Union

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import protocol as p
from .errors import AuthError, ClientError, ProbeNotLoadedError
from .service import Outcome, Query, Sidecar, now

ERRORS = {400: {"description": "Malformed request"}, 422: {"description": "Invalid request"},
          503: {"description": "Not ready or overloaded (Retry-After)"}}


def get_sidecar(request: Request) -> Sidecar:
    sidecar = getattr(request.app.state, "sidecar", None)
    if sidecar is None:
        error = getattr(request.app.state, "load_error", None)
        raise ProbeNotLoadedError(f"model and artifact failed to load: {error}" if error else "model and artifact are still loading")
    return sidecar


SidecarDep = Annotated[Sidecar, Depends(get_sidecar)]


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    token = request.app.state.settings.admin_token
    if not token:
        return
    supplied = (authorization or "").removeprefix("Bearer ").strip()
    if not supplied or not secrets.compare_digest(supplied, token):
        raise AuthError("this route needs 'Authorization: Bearer <admin token>'")


AdminDep = Depends(require_admin)
router = APIRouter(responses=ERRORS)


def _confidence(o: Outcome, artifact_id: str) -> p.Confidence:
    return p.Confidence(probability=o.confidence.probability, raw=o.confidence.raw, decision=o.decision,
                        artifact_id=artifact_id, routed=o.routed, upstream_error=o.upstream_error, request_id=o.request_id)


def _headers(o: Outcome, artifact_id: str) -> dict:
    h = {
        "x-valueprobe-confidence": f"{o.confidence.probability:.6f}",
        "x-valueprobe-raw": f"{o.confidence.raw:.6f}",
        "x-valueprobe-decision": o.decision,
        "x-valueprobe-artifact": artifact_id,
        "x-valueprobe-routed": str(o.routed).lower(),
        "x-valueprobe-request-id": o.request_id,
    }
    if o.upstream_error:
        h["x-valueprobe-upstream-error"] = "true"
    return h


def _usage(o: Outcome) -> p.Usage:
    return p.Usage(prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens,
                   total_tokens=o.prompt_tokens + o.completion_tokens)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _query(sidecar: Sidecar, messages, rendered, req: p._GenerationParams) -> Query:
    return sidecar.query(messages, rendered, req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p,
                         req.seed, req.stop_list())


async def _stream(sidecar: Sidecar, query: Query, chunk):
    """Run the stream far enough to know the confidence (before the first token), then hand back a response."""
    events = sidecar.answer_stream(query)
    kind, head = await events.__anext__()
    artifact_id = sidecar.probe.artifact_id

    async def body():
        yield _sse(chunk(head, None, first=True))
        async for kind, value in events:
            if kind == "text":
                yield _sse(chunk(head, value))
            elif kind == "done":
                yield _sse(chunk(value, None, last=True))
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=_headers(head, artifact_id))


@router.post("/v1/chat/completions", response_model=p.ChatCompletionResponse, tags=["openai"])
async def chat_completions(req: p.ChatCompletionRequest, sidecar: SidecarDep):
    messages, rendered = sidecar.render_messages([m.model_dump() for m in req.messages])
    query = _query(sidecar, messages, rendered, req)
    artifact_id = sidecar.probe.artifact_id
    cid = f"chatcmpl-{artifact_id}-{now()}"
    if req.stream:
        def chunk(o: Outcome, text, first=False, last=False):
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            out = {"id": cid, "object": "chat.completion.chunk", "created": now(), "model": sidecar.model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": o.finish_reason if last else None}]}
            if first or last:
                out["confidence"] = _confidence(o, artifact_id).model_dump()
            return out

        return await _stream(sidecar, query, chunk)
    o = await sidecar.answer(query)
    body = p.ChatCompletionResponse(id=cid, created=now(), model=sidecar.model_name, usage=_usage(o),
                                    choices=[p.ChatChoice(message=p.Message(role="assistant", content=o.text),
                                                          finish_reason=o.finish_reason)],
                                    confidence=_confidence(o, artifact_id))
    return JSONResponse(body.model_dump(), headers=_headers(o, artifact_id))


@router.post("/v1/completions", response_model=p.CompletionResponse, tags=["openai"])
async def completions(req: p.CompletionRequest, sidecar: SidecarDep):
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ClientError("exactly one prompt per request is supported")
    messages, rendered = sidecar.render_question(prompts[0])
    query = _query(sidecar, messages, rendered, req)
    artifact_id = sidecar.probe.artifact_id
    cid = f"cmpl-{artifact_id}-{now()}"
    if req.stream:
        def chunk(o: Outcome, text, first=False, last=False):
            out = {"id": cid, "object": "text_completion", "created": now(), "model": sidecar.model_name,
                   "choices": [{"index": 0, "text": text or "", "finish_reason": o.finish_reason if last else None,
                                "logprobs": None}]}
            if first or last:
                out["confidence"] = _confidence(o, artifact_id).model_dump()
            return out

        return await _stream(sidecar, query, chunk)
    o = await sidecar.answer(query)
    body = p.CompletionResponse(id=cid, created=now(), model=sidecar.model_name, usage=_usage(o),
                                choices=[p.CompletionChoice(text=o.text, finish_reason=o.finish_reason)],
                                confidence=_confidence(o, artifact_id))
    return JSONResponse(body.model_dump(), headers=_headers(o, artifact_id))


# -- TGI ---------------------------------------------------------------------------------------------------------
def _tgi_query(sidecar: Sidecar, req: p.TGIRequest) -> Query:
    sidecar._check_size(req.inputs)
    prm = req.parameters
    temperature = prm.temperature if prm.do_sample else None
    # TGI semantics: `inputs` is the raw model text; OpenAI upstreams get it as one user message.
    return sidecar.query([{"role": "user", "content": req.inputs}], req.inputs, prm.max_new_tokens, temperature,
                         prm.top_p, prm.seed, list(prm.stop))


def _tgi_details(o: Outcome, seed):
    return {"finish_reason": "length" if o.finish_reason == "length" else "eos_token",
            "generated_tokens": o.completion_tokens, "seed": seed, "prefill": [], "tokens": []}


def _tgi_response(o: Outcome, sidecar: Sidecar, req: p.TGIRequest) -> dict:
    text = (req.inputs + o.text) if req.parameters.return_full_text else o.text
    return {"generated_text": text, "details": _tgi_details(o, req.parameters.seed),
            "confidence": _confidence(o, sidecar.probe.artifact_id).model_dump()}


async def _tgi_stream(sidecar: Sidecar, req: p.TGIRequest):
    query = _tgi_query(sidecar, req)
    events = sidecar.answer_stream(query)
    kind, head = await events.__anext__()
    artifact_id = sidecar.probe.artifact_id

    async def body():
        index = 0
        first = True
        async for kind, value in events:
            if kind == "text":
                event = {"index": index, "token": {"id": 0, "text": value, "logprob": None, "special": False},
                         "generated_text": None, "details": None}
                if first:
                    event["confidence"] = _confidence(head, artifact_id).model_dump()
                    first = False
                index += 1
                yield _sse(event)
            elif kind == "done":
                event = {"index": index, "token": {"id": 0, "text": "", "logprob": None, "special": True},
                         "generated_text": value.text,
                         "details": {"finish_reason": _tgi_details(value, None)["finish_reason"],
                                     "generated_tokens": value.completion_tokens, "seed": req.parameters.seed},
                         "confidence": _confidence(value, artifact_id).model_dump()}
                yield _sse(event)

    return StreamingResponse(body(), media_type="text/event-stream", headers=_headers(head, artifact_id))


@router.post("/", tags=["tgi"])
async def tgi_root(req: p.TGIRequest, sidecar: SidecarDep):
    """What ``text_generation.Client`` posts to: a one-element list, or SSE when ``stream`` is true."""
    if req.stream:
        return await _tgi_stream(sidecar, req)
    o = await sidecar.answer(_tgi_query(sidecar, req))
    return JSONResponse([_tgi_response(o, sidecar, req)], headers=_headers(o, sidecar.probe.artifact_id))


@router.post("/generate", tags=["tgi"])
async def tgi_generate(req: p.TGIRequest, sidecar: SidecarDep):
    o = await sidecar.answer(_tgi_query(sidecar, req))
    return JSONResponse(_tgi_response(o, sidecar, req), headers=_headers(o, sidecar.probe.artifact_id))


@router.post("/generate_stream", tags=["tgi"])
async def tgi_generate_stream(req: p.TGIRequest, sidecar: SidecarDep):
    return await _tgi_stream(sidecar, req)


# -- valueprobe -----------------------------------------------------------------------------------------------
@router.post("/v1/confidence", tags=["valueprobe"], response_model=Union[p.ConfidenceResult, p.ConfidenceBatch])
async def confidence(req: Union[p.ConfidenceItem, list[p.ConfidenceItem]], sidecar: SidecarDep):
    """Prompt-only confidence, no generation: ``{"prompt": ...}``, ``{"messages": [...]}`` or a list of either."""
    items = req if isinstance(req, list) else [req]
    if not items:
        raise ClientError("empty list")
    if len(items) > 256:
        raise ClientError("at most 256 prompts per request")
    rendered = []
    for item in items:
        if (item.prompt is None) == (item.messages is None):
            raise ClientError("each item needs exactly one of 'prompt' or 'messages'")
        if item.prompt is not None:
            rendered.append(sidecar.render_question(item.prompt, item.choices)[1])
        else:
            rendered.append(sidecar.render_messages([m.model_dump() for m in item.messages])[1])
    scored = await sidecar.confidence(rendered)
    for result, decision in scored:
        sidecar._observe(result, decision)
    artifact_id = sidecar.probe.artifact_id
    results = [p.ConfidenceResult(probability=r.probability, raw=r.raw, decision=d, artifact_id=artifact_id)
               for r, d in scored]
    return results[0] if not isinstance(req, list) else p.ConfidenceBatch(results=results)


@router.post("/v1/feedback", tags=["valueprobe"], response_model=p.FeedbackResponse, dependencies=[AdminDep])
async def feedback(req: p.FeedbackRequest, sidecar: SidecarDep):
    window = sidecar.feedback(req.request_id, req.correct, req.probability)
    return p.FeedbackResponse(recorded=True, window=window)


@router.post("/v1/admin/reload", tags=["valueprobe"], dependencies=[AdminDep])
async def reload_artifact(req: p.ReloadRequest, sidecar: SidecarDep):
    from valueprobe.plugin import ArtifactError

    old = sidecar.probe.artifact_id
    try:
        await sidecar.engine.reload(req.artifact, check_fingerprint=sidecar.settings.check_fingerprint)
        sidecar.refresh_policy()
    except (ArtifactError, ValueError) as exc:
        raise ClientError(f"reload refused, still serving {old}: {exc}") from None
    return {"previous": old, "artifact_id": sidecar.probe.artifact_id}


@router.get("/v1/models", tags=["openai"])
async def models(sidecar: SidecarDep):
    return {"object": "list", "data": [{"id": sidecar.model_name, "object": "model", "created": 0,
                                        "owned_by": "valueprobe", "artifact_id": sidecar.probe.artifact_id}]}


@router.get("/v1/artifact", tags=["valueprobe"])
async def artifact(sidecar: SidecarDep):
    probe = sidecar.probe
    return {"artifact_id": probe.artifact_id, "model_name": probe.model_name, "layer": probe.layer, "k": probe.k,
            "head": probe.head, "calibrator": probe.calibrator, "prompt_format": json.loads(probe.prompt_format.to_json()),
            "thresholds": probe.thresholds,
            "policy": {"abstain_below": sidecar.policy.abstain_below, "escalate_below": sidecar.policy.escalate_below,
                       "escalation_configured": sidecar.policy.can_escalate},
            "eval_card": probe.eval_card}


@router.get("/healthz", tags=["ops"])
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
async def readyz(sidecar: SidecarDep):
    return {"status": "ready", "artifact_id": sidecar.probe.artifact_id}
