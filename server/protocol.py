"""Request and response shapes: OpenAI (chat/completions, completions), TGI (generate), and valueprobe's own."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


def _seed():
    return Field(None, ge=0, le=2**63 - 1, description="Sampling seed (0 to 2^63-1).")


class OOD(BaseModel):
    flagged: bool = Field(description="The prompt's neuron values lie outside the fitting distribution.")
    distance: float = Field(description="Mahalanobis distance from the fitting data.")
    threshold: float = Field(description="Distance above which a prompt is flagged (calibration split quantile).")


class Components(BaseModel):
    model_config = ConfigDict(extra="allow")

    value_raw: float = Field(description="Value-neuron head logit.")
    value_probability: float = Field(description="Value neurons alone, calibrated.")
    max_softmax: Optional[float] = Field(None, description="Next-token max-softmax (over the option letters for multiple choice).")
    entropy: Optional[float] = Field(None, description="Next-token entropy (nats).")


class _Scored(BaseModel):
    probability: float = Field(description="Calibrated P(the answer is correct): the artifact's served score.")
    raw: float = Field(description="The value head's raw logit.")
    kind: Literal["choice", "open"] = Field("open", description="Question kind the score was calibrated for.")
    served_score: Literal["value", "stacked"] = "value"
    calibration_version: int = Field(0, description="0 as fitted; +1 per recalibration from feedback promoted since.")
    components: Optional[Components] = None
    ood: Optional[OOD] = None


class AnswerComponents(Components):
    """The parts of an answer-level score: the value neurons read at the answer's last token, the prompt's
    next-token signal (inherited fields) and the answer's own token log-probabilities."""

    mean_token_logprob: Optional[float] = Field(None, description="Mean log-probability of the answer's tokens.")
    min_token_logprob: Optional[float] = Field(None, description="Lowest log-probability among the answer's tokens.")
    answer_tokens: int = Field(description="Tokens in the answer scored.")
    read_at: Optional[Literal["last_token", "before_last_token"]] = Field(
        None, description="Where the values were read: at the answer's last token (as fitting reads them), or, where "
        "an engine never feeds back the last token it samples (vLLM, an answer stopped at max tokens), the token "
        "before it.")


class AnswerConfidence(BaseModel):
    """Confidence in the answer given, read at its last token during generation (no extra forward pass)."""

    probability: float = Field(description="Calibrated P(this answer is correct): the answer artifact's served score.")
    raw: float = Field(description="The answer head's raw logit.")
    kind: Literal["choice", "open"] = "open"
    components: AnswerComponents
    flagged: Optional[bool] = Field(None, description="probability below the sidecar's --flag-below (null: no flag set).")
    artifact_id: str = Field(description="Id of the answer-level artifact that scored it.")
    calibration_version: int = Field(0, description="The answer-level artifact's calibration: 0 as fitted; +1 per "
                                     "recalibration from feedback promoted since.")
    ood: Optional[OOD] = None
    local_text: Optional[str] = Field(None, description="Set when this low-confidence local answer was replaced by "
                                      "the escalation target's (--escalate-after-below; confidence.routed is true).")


class Route(BaseModel):
    """Gain routing's decision (``--escalate-gain-above`` / ``--escalate-gain-rate``)."""

    moment: Literal["before", "after"] = Field(description="before: decided on both prompt-only probabilities before "
                                               "any decoding; after: on the local answer's answer-level probability.")
    answered_by: Literal["local", "escalation"]
    reason: Literal["gain_above", "gain_below", "target_unavailable", "abstained", "not_replaced_in_stream"]
    p_local: Optional[float] = Field(None, description="This model's calibrated P(correct) the gain used.")
    p_target: Optional[float] = Field(None, description="The escalation target's calibrated P(correct) (its prefill).")
    gain: Optional[float] = Field(None, description="p_target - p_local: the expected gain of escalating.")
    threshold: Optional[float] = Field(None, description="The gain above which a question is escalated.")
    target_artifact_id: Optional[str] = None
    target_error: Optional[str] = Field(None, description="Why the target's probability is missing (the question "
                                        "was answered here).")
    seconds: float = Field(0.0, description="Seconds this request waited for the target's probability.")


class Confidence(_Scored):
    answer: Optional[AnswerConfidence] = Field(None, description="Confidence in the answer given, when the sidecar "
                                               "has an answer-level artifact and the answer was generated here.")
    decision: Literal["answer", "abstain", "escalate"]
    artifact_id: str
    routed: bool = Field(False, description="True when the answer came from the escalation model.")
    upstream_error: Optional[str] = Field(None, description="Set when an upstream failed; the answer is a fallback.")
    request_id: str
    route: Optional[Route] = Field(None, description="Gain routing's decision, when the sidecar routes by gain.")
    answer_error: Optional[str] = Field(None, description="Why 'answer' is missing although the sidecar serves an "
                                        "answer-level artifact (its readout failed for this answer).")


class _GenerationParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = _seed()
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class SearchSpec(BaseModel):
    """Step-level search scored by a value read at every candidate step's last token: the step-value artifact
    (``--search-artifact``) when the server has one, else the served probe's head."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["value-beam", "best-of-n", "random", "self-consistency"] = "value-beam"
    width: int = Field(4, ge=1, le=16, description="Candidates per step (value-beam, random) or answers (best-of-n, self-consistency).")
    beam: int = Field(1, ge=1, le=4, description="Prefixes kept per step.")
    max_steps: int = Field(8, ge=1, le=32)
    step_tokens: int = Field(64, ge=1, le=256, description="Most tokens per step.")


class SearchStep(BaseModel):
    text: str
    value: Optional[float] = None


class SearchInfo(BaseModel):
    strategy: str
    value_artifact: str = Field(description="Id of the artifact whose value scored the steps.")
    steps: list[SearchStep]
    tokens_generated: int = Field(description="Every sampled token, kept or not.")
    candidates_scored: int


class ChatCompletionRequest(_GenerationParams):
    messages: list[Message] = Field(min_length=1)
    logprobs: Optional[bool] = Field(None, description="Return each answer token's log-probability (transformers engine, whole responses).")
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, description="With logprobs: the most likely tokens at each position.")
    search: Optional[SearchSpec] = Field(None, description="Answer by value-guided step search (transformers engine, embedded mode).")


class CompletionRequest(_GenerationParams):
    prompt: Union[str, list[str]]
    choices: Optional[list[str]] = Field(None, min_length=2, description="valueprobe extension: the options of a "
                                         "multiple-choice question, rendered and calibrated as such (the answer is a letter).")
    logprobs: Optional[int] = Field(None, ge=0, le=5, description="Each answer token's log-probability and this many alternatives.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int = 0
    message: Message
    finish_reason: str
    logprobs: Optional[Any] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    confidence: Confidence
    search: Optional[SearchInfo] = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: Optional[Any] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    confidence: Confidence


# -- TGI --------------------------------------------------------------------------------------------------------
class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    max_new_tokens: Optional[int] = Field(None, ge=1)
    do_sample: bool = False
    temperature: Optional[float] = Field(None, gt=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = _seed()
    stop: list[str] = Field(default_factory=list)
    details: bool = False
    return_full_text: bool = False
    top_n_tokens: Optional[int] = Field(None, ge=0, le=5, description="With details: the most likely tokens at each position.")
    decoder_input_details: bool = False


class TGIRequest(BaseModel):
    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


# -- valueprobe ------------------------------------------------------------------------------------------------
class ConfidenceItem(BaseModel):
    prompt: Optional[str] = Field(None, min_length=1, description="A question, rendered with the artifact's format.")
    messages: Optional[list[Message]] = Field(None, min_length=1, description="A chat, rendered by the chat template.")
    choices: Optional[list[str]] = Field(None, min_length=2, description="Options for a multiple-choice question.")
    answer: Optional[str] = Field(None, description="An answer generated elsewhere (gateway mode): also score "
                                  "confidence in it (one prefill of prompt + answer; needs an answer-level artifact).")


class ConfidenceResult(_Scored):
    decision: Literal["answer", "abstain", "escalate"]
    artifact_id: str
    answer: Optional[AnswerConfidence] = None
    request_id: str = Field(description="This scored prompt's id: send it to /v1/feedback with the label of the "
                            "answer given to it (generated elsewhere, by the model the artifact was fitted for).")


class ConfidenceBatch(BaseModel):
    results: list[ConfidenceResult]


class FeedbackRequest(BaseModel):
    request_id: str = Field(min_length=1)
    correct: bool = Field(description="Whether the answer served was correct.")
    probability: Optional[float] = Field(None, ge=0, le=1, description="Needed when another replica served the request.")
    kind: Optional[Literal["choice", "open"]] = Field(None, description="With 'probability' (another replica served "
                                                      "it): the question kind, so the label also refits the shadow "
                                                      "calibrator.")


class FeedbackResponse(BaseModel):
    recorded: bool
    window: dict = Field(description="ECE and Brier of the served probability over the feedback window.")
    recalibration: dict = Field(description="Whether the label refits the shadow calibrator (used, slot, reason) "
                                "and, when --recalibration auto promoted on it, the promotion.")


class ReloadRequest(BaseModel):
    artifact: str = Field(min_length=1)


# -- the shapes routers and guardrails call (server/consumers.py) ---------------------------------------------------
class ClassifyParameters(BaseModel):
    """The Hugging Face Inference API's text-classification ``parameters`` (what ``huggingface_hub``'s
    ``InferenceClient.text_classification`` sends): applied to the two-class logits ``[logit P, 0]``."""

    model_config = ConfigDict(extra="ignore")

    function_to_apply: Optional[Literal["softmax", "sigmoid", "none"]] = Field(
        None, description="softmax (default): P and 1 - P; sigmoid: P and 0.5; none: the logits logit(P) and 0.")
    top_k: Optional[int] = Field(None, ge=1, description="Only the k highest labels.")


class ClassifyRequest(BaseModel):
    """TEI's ``/predict`` request (``PredictRequest`` in text-embeddings-inference ``router/src/http/types.rs``): a
    text, a list of one text, a pair ``[question, answer]``, or a batch ``[[text], [question, answer], ...]``; and
    the Inference API's ``parameters`` (its presence asks for the Inference API's nested answer)."""

    model_config = ConfigDict(extra="ignore")

    inputs: Union[str, list[str], list[list[str]]] = Field(
        description="A question; [question]; a pair [question, answer] (confidence in that answer); or a batch "
        "[[question], [question, answer], ...].")
    truncate: Optional[bool] = Field(None, description="Cut a question that is too long to fit instead of refusing it.")
    truncation_direction: Optional[Literal["left", "right", "Left", "Right"]] = Field(
        None, description="Which end of the question is cut: left by default (the question's end, where the probe "
        "reads, is kept); TEI's default is right.")
    raw_scores: bool = Field(False, description="The two-class logits logit(P) and 0 instead of P and 1 - P.")
    parameters: Optional[ClassifyParameters] = Field(
        None, description="Hugging Face Inference API parameters; when present the answer is nested as that API's "
        "([[labels]] for one text).")

    @model_validator(mode="after")
    def _sequences(self):
        self.sequences  # noqa: B018 - raises on a shape TEI refuses
        return self

    @property
    def batch(self) -> bool:
        return bool(self.inputs) and isinstance(self.inputs, list) and isinstance(self.inputs[0], list)

    @property
    def sequences(self) -> list[tuple[str, ...]]:
        """The inputs as TEI reads them (``PredictInput``'s visitor): each a ``(question,)`` or ``(question, answer)``."""
        if isinstance(self.inputs, str):
            return [(self.inputs,)]
        if not self.inputs:
            raise ValueError("inputs is empty")
        if not self.batch:
            if len(self.inputs) > 2:
                raise ValueError(f"a list of {len(self.inputs)} strings: a list of strings is one input, [text] or a "
                                 "pair [question, answer]; a batch is [[text], [question, answer], ...] (as in TEI)")
            return [tuple(self.inputs)]
        for i, item in enumerate(self.inputs):
            if len(item) not in (1, 2):
                raise ValueError(f"inputs[{i}] has {len(item)} strings: each is [text] or [question, answer]")
        return [tuple(item) for item in self.inputs]


class ClassLabel(BaseModel):
    label: Literal["confident", "not_confident"]
    score: float = Field(description="P(label): the calibrated P(correct) for 'confident', its complement otherwise.")


class DetectionMetadata(BaseModel):
    probability: float = Field(description="Calibrated P(correct); the detection's score is 1 - this.")
    scored: Literal["prompt", "answer"] = Field(description="prompt: the question's end (prompt-only); answer: the "
                                                "generated text after the prompt (answer-level artifact).")
    confident: bool = Field(description="probability at or above the sidecar's own cut (--confident-above, else "
                            "where chat would not answer locally); informative: the orchestrator filters on score.")
    truncated: bool = Field(description="The text was too long and was cut from the left before scoring.")
    artifact_id: str


class ContentsRequest(BaseModel):
    """FMS guardrails detector API, text contents (``POST /api/v1/text/contents``, header ``detector-id``):
    ``ContentAnalysisHttpRequest`` of the orchestrator's ``docs/api/openapi_detector_api.yaml``."""

    contents: list[str] = Field(description="Texts to score, each a question; the answer keeps their order.")
    detector_params: dict[str, Any] = Field(default_factory=dict, description="Free-form; a numeric 'threshold' "
                                            "keeps the detections whose score is at or above it (the orchestrator's "
                                            "rule; the orchestrator itself removes it before calling).")


class ContentsDetection(BaseModel):
    start: int
    end: int
    text: str
    detection: str
    detection_type: str
    score: float = Field(description="1 - P(correct): how likely the model is to answer this content wrongly.")
    metadata: DetectionMetadata


class GenerationRequest(BaseModel):
    """FMS guardrails detector API, generation (``POST /api/v1/text/generation``): ``GenerationAnalysisHttpRequest``."""

    prompt: str
    generated_text: str
    detector_params: dict[str, Any] = Field(default_factory=dict)


class GenerationDetection(BaseModel):
    detection: str
    detection_type: str
    score: float = Field(description="1 - P(correct) of the generated text (or of the prompt, see metadata.scored).")
    metadata: DetectionMetadata


class DetectorError(BaseModel):
    """The detector API's ``Error``: what the orchestrator parses from any non-200 answer."""

    code: int
    message: str


class Health(BaseModel):
    """The orchestrator's optional health body (``OptionalHealthCheckResponseBody``)."""

    status: Literal["HEALTHY", "UNHEALTHY"]
    reason: Optional[str] = None
