"""The shapes that routers and guardrails already call, answered as each peer's own client parses them.

* ``POST /classify`` (and ``POST /predict``, TEI's own path): Hugging Face text-classification as TEI's ``/predict``
  takes it (``PredictRequest`` in text-embeddings-inference ``router/src/http/types.rs``): ``inputs`` is a text,
  ``[text]``, one pair ``[question, answer]`` (scored as the confidence in that answer, which needs an answer-level
  artifact) or a batch ``[[text], [question, answer], ...]``. A single input gets one flat list of the two labels
  ``confident`` / ``not_confident`` (what vLLM Semantic Router's ``http_classify`` client and TEI clients parse), a
  batch one list per input. A request carrying the Inference API's ``parameters`` (what ``huggingface_hub``'s
  ``InferenceClient.text_classification`` sends) gets that API's nested answer, ``[[labels]]``, which is what that
  client reads. ``truncate: true`` cuts a question that does not fit, from the left by default (the question's end,
  where the probe reads, is kept); ``raw_scores`` / ``function_to_apply`` act on the two-class logits
  ``[logit P, 0]``.
* ``POST /api/v1/text/contents`` and ``POST /api/v1/text/generation``: the FMS guardrails orchestrator's detector
  API (``docs/api/openapi_detector_api.yaml`` in fms-guardrails-orchestrator), header ``detector-id`` required as
  the spec says. Every scored content gets one detection (``detection_type: "confidence"``, ``detection:
  "low_confidence"``, ``score`` = 1 - P(correct)): the orchestrator removes ``threshold`` from ``detector_params``
  and keeps detections whose score is at or above its own threshold (``src/orchestrator/common/tasks.rs``), so the
  sidecar must not cut first. A ``threshold`` that does reach the sidecar (a direct caller) is applied by the same
  rule, so a direct call and one through the orchestrator agree. A blank content has no question and gets ``[]``;
  the others are still scored. A content too long to fit is cut from the left (``metadata.truncated``).
  Generation detections score the generated text after the prompt where the sidecar has an answer-level artifact
  and an engine that scores given answers, else the prompt (``metadata.scored``).
* ``GET /health``: the orchestrator's health check (``src/clients/http.rs``): 200 ``{"status": "HEALTHY"}`` once
  loaded, 503 ``{"status": "UNHEALTHY", "reason"}`` before (or when loading failed).

Errors on these routes come in each peer's shape (:mod:`.http_errors`). Every text is a question rendered with the
artifact's prompt format and scored by the same engine call as ``/v1/confidence`` (the metrics count these too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Optional

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from valueprobe.plugin import PromptError

from . import protocol as p
from .engines.base import Prompt
from .errors import ClientError
from .routes import MAX_CONFIDENCE_ITEMS, SidecarDep
from .service import Sidecar

router = APIRouter()

DETECTION_TYPE = "confidence"
DETECTION = "low_confidence"
# the orchestrator sends every chunk of a document in one request: scored in admissions of MAX_CONFIDENCE_ITEMS
MAX_CONTENTS = 16 * MAX_CONFIDENCE_ITEMS
LOGIT_EPS = 1e-7

_FMS_ERRORS = {code: {"model": p.DetectorError, "description": what} for code, what in
               ((404, "Resource Not Found"), (422, "Validation Error"), (503, "Not ready or overloaded"))}
_TEI_ERRORS = {422: {"description": "Validation error: {\"error\", \"error_type\"} (TEI's ErrorResponse)"},
               503: {"description": "Not ready or overloaded"}}
DetectorId = Annotated[str, Header(alias="detector-id", description="The orchestrator's name for this detector "
                                   "(required by the detector API; any value is accepted).")]


class Unprocessable(ClientError):
    """A request the peer's spec documents as a validation error (422)."""

    status_code = 422


def threshold(sidecar: Sidecar, served, asked: Optional[float] = None) -> float:
    """The P(correct) below which a text is 'not confident' by the sidecar's own policy (see
    :meth:`~valueprobe.server.policy.Policy.confident_below` for the order): a detection's ``metadata.confident``.
    It never filters a detector's answer (the orchestrator's threshold does)."""
    return served.policy.confident_below(asked, sidecar.settings.confident_above)


@dataclass(frozen=True)
class Scored:
    probability: float
    scored: str  # "prompt" | "answer"
    truncated: bool
    artifact_id: str


def question_prompt(sidecar: Sidecar, served, text: str, truncate: Optional[str] = None) -> tuple[Prompt, bool]:
    """``text`` as a question, rendered and tokenized by :meth:`Sidecar.prepare`; with ``truncate`` (``"left"`` or
    ``"right"``) first cut at that end to fit ``max_prompt_chars`` and the model's context (the prompt format's own
    tokens are kept whole). ``(prompt, truncated)``."""
    cut = False
    if truncate is not None:
        limit = sidecar.settings.max_prompt_chars
        if len(text) > limit:
            text, cut = (text[-limit:] if truncate == "left" else text[:limit]), True
        engine, context = sidecar.engine, sidecar.engine.context_length
        for attempt in range(4):  # a cut between tokens can merge them differently: re-measure
            if not context:
                break
            try:
                n = len(engine.tokenize(served.probe.prompt_format.render(engine.tokenizer, text), served.probe))
            except PromptError:
                break  # prepare says why
            if n <= context:
                break
            ids = engine.tokenize_answer(text)
            drop = n - context + attempt
            if drop >= len(ids):
                break  # the format alone does not fit: prepare refuses it with the numbers
            text, cut = engine.decode(ids[drop:] if truncate == "left" else ids[: len(ids) - drop]), True
    return sidecar.prepare(served, question=text, scoring_only=True).prompt, cut


async def score_questions(sidecar: Sidecar, served, texts: list[str], truncate: Optional[str]) -> list[Optional[Scored]]:
    """Calibrated P(correct) of each question (``None`` for a blank one), in admissions of at most
    ``MAX_CONFIDENCE_ITEMS`` prompts."""
    todo = [(i, *question_prompt(sidecar, served, text, truncate)) for i, text in enumerate(texts) if text.strip()]
    out: list[Optional[Scored]] = [None] * len(texts)
    for start in range(0, len(todo), MAX_CONFIDENCE_ITEMS):
        group = todo[start : start + MAX_CONFIDENCE_ITEMS]
        results = await sidecar.confidence(served, [prompt for _, prompt, _ in group])
        for (i, _, cut), (result, _) in zip(group, results):
            out[i] = Scored(result.probability, "prompt", cut, served.artifact_id)
    return out


def answers_scorable(sidecar: Sidecar) -> bool:
    return sidecar.answer_probe is not None and sidecar.engine.supports_answer_scoring


async def score_answers(sidecar: Sidecar, served, pairs: list[tuple[str, str]], truncate: Optional[str]) -> list[Scored]:
    """Calibrated P(the answer is correct) of each ``(question, answer)``: one prefill of prompt + answer each."""
    prompts = [question_prompt(sidecar, served, question, truncate) for question, _ in pairs]
    results = await sidecar.answer_confidence([prompt for prompt, _ in prompts], [answer for _, answer in pairs])
    return [Scored(result.probability, "answer", cut, sidecar.answer_probe.artifact_id)
            for (_, cut), (result, _) in zip(prompts, results)]


# -- Hugging Face text-classification (TEI /predict, Semantic Router http_classify, InferenceClient) ------------------
def labels(probability: float, req: p.ClassifyRequest) -> list[p.ClassLabel]:
    """The two labels, highest first, from the two-class logits ``[logit P, 0]``: softmax gives P and 1 - P (the
    default: every label once, summing to 1), sigmoid P and 0.5, raw scores / ``none`` the logits themselves."""
    q = min(max(probability, LOGIT_EPS), 1 - LOGIT_EPS)
    function = "none" if req.raw_scores else (req.parameters and req.parameters.function_to_apply) or "softmax"
    if function == "softmax":
        scores = (probability, 1 - probability)
    elif function == "sigmoid":
        scores = (probability, 0.5)
    else:
        scores = (math.log(q / (1 - q)), 0.0)
    out = sorted([p.ClassLabel(label="confident", score=scores[0]), p.ClassLabel(label="not_confident", score=scores[1])],
                 key=lambda c: -c.score)
    top_k = req.parameters.top_k if req.parameters else None
    return out[:top_k] if top_k else out


async def _classify(req: p.ClassifyRequest, sidecar: Sidecar):
    sequences = req.sequences
    if len(sequences) > MAX_CONFIDENCE_ITEMS:  # TEI: "batch size N > maximum allowed batch size", a validation error
        raise Unprocessable(f"batch size {len(sequences)} > maximum allowed batch size {MAX_CONFIDENCE_ITEMS}")
    for i, seq in enumerate(sequences):
        where = f"inputs[{i}]" if req.batch else "inputs"
        if any(not part.strip() for part in seq):
            raise Unprocessable(f"{where}: {'the question' if not seq[0].strip() else 'the answer'} is empty")
    pairs = [i for i, seq in enumerate(sequences) if len(seq) == 2]
    if pairs and not answers_scorable(sidecar):
        raise Unprocessable("a pair [question, answer] is scored as the confidence in that answer, which needs an "
                            "answer-level artifact (--answer-artifact) and the transformers engine; this sidecar has "
                            "none: send [question] alone")
    truncate = (req.truncation_direction or "left").lower() if req.truncate else None
    served = sidecar.served
    singles = [i for i, seq in enumerate(sequences) if len(seq) == 1]
    scored: dict[int, Scored] = {}
    if singles:
        scored.update(zip(singles, await score_questions(sidecar, served, [sequences[i][0] for i in singles], truncate)))
    if pairs:
        scored.update(zip(pairs, await score_answers(sidecar, served, [sequences[i] for i in pairs], truncate)))
    out = [labels(scored[i].probability, req) for i in range(len(sequences))]
    if req.batch or req.parameters is not None:  # a batch; or the Inference API's shape, nested for one text too
        return out
    return out[0]  # TEI's PredictResponse::Single: one flat list


_CLASSIFY_DOC = dict(tags=["consumers"], response_model=list[p.ClassLabel] | list[list[p.ClassLabel]],
                     responses=_TEI_ERRORS)


@router.post("/classify", **_CLASSIFY_DOC)
async def classify(req: p.ClassifyRequest, sidecar: SidecarDep):
    """Hugging Face text-classification: ``confident`` / ``not_confident``, highest score first (one flat list for
    one input, as TEI and Semantic Router's ``http_classify`` read it; ``[[...]]`` when the request carries the
    Inference API's ``parameters``, as ``InferenceClient.text_classification`` reads it)."""
    return await _classify(req, sidecar)


@router.post("/predict", **_CLASSIFY_DOC)
async def predict(req: p.ClassifyRequest, sidecar: SidecarDep):
    """TEI's own path for ``/classify``: the same request and answer."""
    return await _classify(req, sidecar)


# -- FMS guardrails detector API -----------------------------------------------------------------------------------
def orchestrator_threshold(params: dict) -> Optional[float]:
    """``detector_params.threshold`` as the orchestrator reads it (fms-guardrails-orchestrator ``src/models.rs``,
    ``DetectorParams::pop_threshold``: serde_json's ``as_f64``, so any JSON number and nothing else)."""
    value = params.get("threshold")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _metadata(sidecar: Sidecar, served, s: Scored) -> p.DetectionMetadata:
    return p.DetectionMetadata(probability=s.probability, scored=s.scored, truncated=s.truncated,
                               confident=s.probability >= threshold(sidecar, served), artifact_id=s.artifact_id)


def _kept(score: float, params: dict) -> bool:
    cut = orchestrator_threshold(params)
    return cut is None or score >= cut  # tasks.rs: `.filter(|detection| detection.score >= threshold)`


@router.post("/api/v1/text/contents", tags=["consumers"], response_model=list[list[p.ContentsDetection]],
             responses=_FMS_ERRORS)
async def detect_contents(req: p.ContentsRequest, sidecar: SidecarDep, detector_id: DetectorId):
    """FMS detector API, text contents: per content, in order, one ``low_confidence`` detection scored 1 - P(correct)
    (``[]`` for a blank content, or one whose score is under a ``detector_params.threshold`` sent directly)."""
    if len(req.contents) > MAX_CONTENTS:
        raise Unprocessable(f"{len(req.contents)} contents; at most {MAX_CONTENTS} per request")
    served = sidecar.served
    out = []
    for text, s in zip(req.contents, await score_questions(sidecar, served, req.contents, "left")):
        if s is None or not _kept(1 - s.probability, req.detector_params):
            out.append([])
            continue
        out.append([p.ContentsDetection(start=0, end=len(text), text=text, detection=DETECTION,
                                        detection_type=DETECTION_TYPE, score=1 - s.probability,
                                        metadata=_metadata(sidecar, served, s))])
    return out


@router.post("/api/v1/text/generation", tags=["consumers"], response_model=list[p.GenerationDetection],
             responses=_FMS_ERRORS)
async def detect_generation(req: p.GenerationRequest, sidecar: SidecarDep, detector_id: DetectorId):
    """FMS detector API, generation: one ``low_confidence`` detection scored 1 - P(correct): the confidence in the
    generated text itself (one prefill of prompt + answer) where the sidecar has an answer-level artifact and an
    engine that scores given answers and the answer fits, else the prompt's. ``[]`` for a blank prompt."""
    if not req.prompt.strip():
        return []
    served = sidecar.served
    answer = req.generated_text
    if answers_scorable(sidecar) and answer.strip() and len(answer) <= sidecar.settings.max_prompt_chars:
        prompt, cut = question_prompt(sidecar, served, req.prompt, "left")
        context = sidecar.engine.context_length
        if not context or len(prompt.input_ids) + len(sidecar.engine.tokenize_answer(answer)) <= context:
            ((result, _),) = await sidecar.answer_confidence([prompt], [answer])
            s = Scored(result.probability, "answer", cut, sidecar.answer_probe.artifact_id)
        else:
            s = (await score_questions(sidecar, served, [req.prompt], "left"))[0]
    else:
        s = (await score_questions(sidecar, served, [req.prompt], "left"))[0]
    if not _kept(1 - s.probability, req.detector_params):
        return []
    return [p.GenerationDetection(detection=DETECTION, detection_type=DETECTION_TYPE, score=1 - s.probability,
                                  metadata=_metadata(sidecar, served, s))]


@router.get("/health", tags=["consumers"], response_model=p.Health, response_model_exclude_none=True,
            responses={503: {"model": p.Health, "description": "Loading, or loading failed"}})
async def health(request: Request):
    """The detector API's health check (what the orchestrator's health client reads): HEALTHY once the model and
    artifact are loaded."""
    if getattr(request.app.state, "sidecar", None) is not None:
        return p.Health(status="HEALTHY")
    error = getattr(request.app.state, "load_error", None)
    reason = f"model and artifact failed to load: {error}" if error else "model and artifact are still loading"
    return JSONResponse(p.Health(status="UNHEALTHY", reason=reason).model_dump(exclude_none=True), status_code=503)
