"""The shapes that routers and guardrails already call, answered with the prompt-only confidence.

* ``POST /classify``: Hugging Face text-classification (the shape of TEI's ``/predict``, which vLLM Semantic
  Router's HTTP classifier and TEI clients send): ``{"inputs": text | [text]}`` -> per input the two labels
  ``confident`` / ``not_confident`` with their scores, highest first (a list for one input, a list of lists for
  several).
* ``POST /api/v1/text/contents`` and ``POST /api/v1/text/generation``: the FMS guardrails orchestrator's detector
  API (TrustyAI's guardrails): a content whose P(correct) is below the threshold is one detection
  (``detection_type: "confidence"``, ``detection: "low_confidence"``, ``score`` = 1 - P(correct)); confident
  content has none. Generation detections score the prompt (this artifact reads the prompt's end; an answer-level
  head would read the generated text too).

Every text is a question rendered with the artifact's prompt format, scored by the same engine call as
``/v1/confidence`` (so the metrics and dashboards count these requests too). Thresholds: the request's
``detector_params.threshold``, else ``confident_above``, else the probability below which the served policy would not answer locally (the higher of
``abstain_below`` and ``escalate_below`` in force), else 0.5.
"""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Header

from . import protocol as p
from .errors import ClientError
from .routes import MAX_CONFIDENCE_ITEMS, SidecarDep
from .service import Sidecar

router = APIRouter()

DETECTION_TYPE = "confidence"
DETECTION = "low_confidence"


def threshold(sidecar: Sidecar, served, asked: Optional[float] = None) -> float:
    """The P(correct) below which a text is 'not confident': the served policy's cut (see
    :meth:`~valueprobe.server.service.Policy.confident_below` for the order), the same one the chat route answers by."""
    return served.policy.confident_below(asked, sidecar.settings.confident_above)


async def probabilities(sidecar: Sidecar, served, texts: list[str]) -> list[float]:
    """Calibrated P(correct) of each question in ``texts`` (one engine call, admitted as one request)."""
    if not texts:
        raise ClientError("no inputs")
    if len(texts) > MAX_CONFIDENCE_ITEMS:
        raise ClientError(f"at most {MAX_CONFIDENCE_ITEMS} inputs per request")
    prompts = []
    for text in texts:
        if not text.strip():
            raise ClientError("an input is empty")
        prompts.append(sidecar.prepare(served, question=text, scoring_only=True).prompt)
    return [result.probability for result, _ in await sidecar.confidence(served, prompts)]


@router.post("/classify", tags=["consumers"], response_model=list[p.ClassLabel] | list[list[p.ClassLabel]])
async def classify(req: p.ClassifyRequest, sidecar: SidecarDep):
    """Hugging Face text-classification: ``confident`` / ``not_confident``, highest score first."""
    served = sidecar.served
    texts = [req.inputs] if isinstance(req.inputs, str) else list(req.inputs)
    probs = await probabilities(sidecar, served, texts)
    labels = [sorted([p.ClassLabel(label="confident", score=q), p.ClassLabel(label="not_confident", score=1 - q)],
                     key=lambda c: -c.score) for q in probs]
    return labels[0] if isinstance(req.inputs, str) else labels


@router.post("/api/v1/text/contents", tags=["consumers"], response_model=list[list[p.ContentsDetection]])
async def detect_contents(req: p.ContentsRequest, sidecar: SidecarDep,
                          detector_id: Annotated[Optional[str], Header()] = None):
    """FMS detector API: one list of detections per content (empty when the content is confident)."""
    served = sidecar.served
    below = threshold(sidecar, served, req.detector_params.threshold)
    probs = await probabilities(sidecar, served, req.contents)
    return [[p.ContentsDetection(start=0, end=len(text), text=text, detection=DETECTION,
                                 detection_type=DETECTION_TYPE, score=1 - q)] if q < below else []
            for text, q in zip(req.contents, probs)]


@router.post("/api/v1/text/generation", tags=["consumers"], response_model=list[p.GenerationDetection])
async def detect_generation(req: p.GenerationRequest, sidecar: SidecarDep,
                            detector_id: Annotated[Optional[str], Header()] = None):
    """FMS detector API, generation: a detection when P(correct) is below the threshold: the confidence in the
    generated text itself (one prefill of prompt + answer) where the sidecar has an answer-level artifact and an
    engine that reads it, else the prompt's."""
    served = sidecar.served
    below = threshold(sidecar, served, req.detector_params.threshold)
    if sidecar.answer_probe is not None and sidecar.engine.supports_answer_scoring and req.generated_text:
        if not req.prompt.strip():
            raise ClientError("the prompt is empty")
        prompt = sidecar.prepare(served, question=req.prompt, scoring_only=True).prompt
        ((result, _),) = await sidecar.answer_confidence([prompt], [req.generated_text])
        q = result.probability
    else:
        (q,) = await probabilities(sidecar, served, [req.prompt])
    return [p.GenerationDetection(detection=DETECTION, detection_type=DETECTION_TYPE, score=1 - q)] if q < below else []
