"""Sidecar settings: environment (``VALUEPROBE_*``), an optional ``.env``/settings file, or constructor args."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every option of ``valueprobe serve``; each can be set as ``VALUEPROBE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="VALUEPROBE_", env_file=".env", env_ignore_empty=True, extra="ignore")

    model: Optional[str] = Field(None, description="Model name or folder; default: the artifact's own model.")
    artifact: Optional[str] = Field(None, description="Artifact path; default: the shipped default artifact.")
    mode: Literal["embedded", "gateway"] = Field("embedded", description="embedded: generate here; gateway: answers come from the upstream.")
    engine: Literal["transformers", "vllm"] = Field("transformers", description="transformers: generate loop in this process; vllm: vLLM's async engine in-process (continuous batching, prefix caching), probe read inside its forward pass (needs the [vllm] extra).")
    vllm_max_model_len: Optional[int] = Field(None, ge=16, description="vLLM engine: context length (default: the model's).")
    vllm_max_num_seqs: Optional[int] = Field(None, ge=1, description="vLLM engine: most sequences in one step.")
    vllm_max_num_batched_tokens: Optional[int] = Field(None, ge=16, description="vLLM engine: most tokens in one step (chunked prefill beyond it).")
    vllm_kv_cache_gb: float = Field(2.0, gt=0, description="vLLM engine on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE), unless that variable is set.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Model dtype.")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$", description="Where the transformers engine runs the model: cpu, cuda, cuda:N (vLLM places its own).")
    check_fingerprint: bool = Field(True, description="Refuse an artifact fitted on another checkpoint.")

    upstream_url: Optional[str] = Field(None, description="Gateway mode: the serving stack that answers (TGI or OpenAI-compatible).")
    upstream_kind: Literal["tgi", "openai"] = "openai"
    upstream_model: Optional[str] = Field(None, description="Model name sent to an OpenAI-compatible upstream; default: the one model its GET /v1/models lists, asked at start-up (several or none stops the start, naming them).")
    escalate_url: Optional[str] = Field(None, description="Bigger model that takes escalated questions (TGI or OpenAI-compatible).")
    escalate_kind: Literal["tgi", "openai"] = "openai"
    escalate_model: Optional[str] = Field(None, description="Model name sent to an OpenAI-compatible escalation target; default: the one model its GET /v1/models lists (asked at start-up, or at the first escalation if it is down then).")
    upstream_timeout_s: float = Field(30.0, gt=0, description="Timeout for upstream and escalation calls.")
    upstream_start_timeout_s: float = Field(120.0, ge=0, description="Gateway mode without upstream_model: how long start-up waits for the OpenAI-compatible upstream to list its models (it may be loading as well) before it stops with the reason.")
    local_prompt: Literal["artifact", "user"] = Field("artifact", description="What the local model answers when a question comes as a prompt or a single user message (the probe always scores it in the artifact's prompt format, which its calibration was fitted on; the upstream and the escalation target always get the request as the user sent it). artifact: the answer comes from that same prefill (no extra forward pass; the confidence is about the very prompt answered, as in fitting, where the labels are the model's answers to that format); user: the user's message through the chat template as sent, a second prefill, and the confidence is then about the artifact's rendering of the question, not the one answered.")
    upstream_api_key: Optional[str] = None

    abstain_below: Optional[float] = Field(None, ge=0, le=1, description="Abstain when P(correct) is below this.")
    escalate_below: Optional[float] = Field(None, ge=0, le=1, description="Escalate when P(correct) is below this (and not abstaining).")
    escalate_rate: Optional[float] = Field(None, gt=0, lt=1, description="Take escalate_below from the artifact's fitted threshold for this traffic share (e.g. 0.2).")
    risk_alpha: Optional[float] = Field(None, gt=0, lt=1, description="Take abstain_below from the artifact's risk-controlled threshold at this error rate (e.g. 0.2).")
    refusal_text: str = "I am not confident enough to answer this question."
    confident_above: Optional[float] = Field(None, ge=0, le=1, description="The guardrails detector routes' metadata.confident (/api/v1/text/*): P(correct) at or above this is 'confident'; default: the threshold in force (escalate_below, else abstain_below), else 0.5. It filters nothing: the orchestrator cuts on the score (1 - P).")

    artifact_sha256: Optional[str] = Field(None, min_length=12, description="Pin: refuse (at start and on reload) an artifact whose content_sha256 does not start with this.")
    answer_artifact: Optional[str] = Field(None, description="Answer-level artifact (`valueprobe fit --answer-end`, token_position answer_end): every generated answer gets confidence.answer, read during generation (at its last token, or as the mean over its tokens: the artifact's answer_read). Default: `<artifact stem>.answer.safetensors` beside the served artifact when there is one; 'none' turns it off.")
    flag_below: Optional[float] = Field(None, ge=0, le=1, description="Mark answers whose answer-level P(correct) is below this (confidence.answer.flagged, x-valueprobe-answer-flagged).")
    escalate_after_below: Optional[float] = Field(None, ge=0, le=1, description="After a local answer whose answer-level P(correct) is below this, send the question to the escalation target and return its answer (routed; the local answer kept in confidence.answer.local_text). Whole responses only: a stream has already sent the local answer.")
    escalate_after_rate: Optional[float] = Field(None, gt=0, lt=1, description="Take escalate_after_below from the answer artifact's fitted threshold for this share of answers (e.g. 0.2).")
    escalate_gain_above: Optional[float] = Field(None, ge=-1, le=1, description="Route by expected gain (the escalation target must be a valueprobe sidecar): escalate when P(target right) - P(this model right) is above this. P(target right) comes from the target's /v1/confidence (one prefill there, asked beside the local prefill).")
    escalate_gain_rate: Optional[float] = Field(None, gt=0, lt=1, description="Route by expected gain, escalating this share of the traffic (the highest gains): the threshold is the rolling quantile of this replica's last 1000 gains, taken from escalate_gain_table until 50 were seen.")
    escalate_gain_table: Optional[str] = Field(None, description="JSON of rate -> gain threshold (`valueprobe bench cascade` writes <out>.gain-rates.json) that seeds escalate_gain_rate.")
    escalate_gain_moment: Literal["before", "after"] = Field("before", description="before: decide on both prompt-only probabilities before any decoding (a router: an escalated question is not answered here); after: decide on this model's answer-level probability once its answer exists (a cascade; needs --answer-artifact; whole responses only).")
    escalate_confidence_url: Optional[str] = Field(None, description="The target's /v1/confidence; default: derived from escalate_url.")
    escalate_confidence_timeout_s: float = Field(10.0, gt=0, description="Gain routing: how long to wait for the target's probability; past it the question is answered here, flagged (confidence.route.reason target_unavailable).")
    search_artifact: Optional[str] = Field(None, description="Step-value artifact (`valueprobe fit-steps`, token_position step_end) that values candidate steps in `search`; default: the served artifact's own head read at step ends.")
    artifact_dir: Optional[str] = Field(None, description="Folder /v1/admin/reload may load artifacts from; default: the served artifact's folder.")
    admin_token: Optional[str] = Field(None, description="Bearer token for /v1/feedback and /v1/admin/*; unset = those routes are disabled (403).")
    max_batch_size: int = Field(8, ge=1, description="Most prompts scored in one prefill batch; also the most "
                                "generations, or searches, run together in one batch.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the batcher waits to fill a batch.")
    max_queue: int = Field(64, ge=1, description="Pending requests before answering 503 with Retry-After.")
    max_prompt_chars: int = Field(16000, ge=1)
    max_new_tokens_limit: int = Field(512, ge=1)
    default_max_new_tokens: int = Field(64, ge=1)
    feedback_window: int = Field(1000, ge=10, description="Feedback outcomes kept for the windowed ECE/Brier.")
    recalibration: Literal["off", "shadow", "auto"] = Field("shadow", description="Calibration that follows the traffic: feedback on locally answered requests refits a shadow Platt per calibration slot (question kind) of the prompt-level artifact and, for answers whose answer-level probability was read, of the answer-level artifact, each compared with its live one on held-out feedback (GET /v1/admin/calibration). shadow: promote on POST /v1/admin/calibration/promote (?artifact=answer for the answer-level artifact); auto: also promote by itself when the shadow is better (checked every recalibration_every feedbacks); off: neither. A promoted calibration is recorded in the store (served by every replica sharing it, and again after a restart, unless off) and written as a new artifact in calibration_dir.")
    recalibration_window: int = Field(500, ge=20, description="Labelled feedbacks per slot the shadow is fitted and compared on (the latest).")
    recalibration_min_feedback: int = Field(100, ge=10, description="Labelled feedbacks a slot needs before its shadow can be promoted.")
    recalibration_every: int = Field(50, ge=1, description="auto: compare shadow and live after this many feedbacks.")
    recalibration_margin: float = Field(0.0, ge=0, description="Promote only when the shadow's held-out Brier is lower by more than this.")
    calibration_dir: Optional[str] = Field(None, description="Where promoted calibrations are written as artifact files (this replica's copies; the store holds the promotions); default: $VALUEPROBE_CACHE/calibrations/<fitted artifact id>.")
    drift_window: int = Field(1000, ge=50, description="Scored prompts per kind in the drift window (score PSI, OOD rate).")
    drift_min_prompts: int = Field(200, ge=10, description="Score PSI and OOD rate are reported for a kind only once its drift window holds this many prompts.")
    store: Optional[str] = Field(None, description="Where scored requests, labels and promoted calibrations are kept (a restart loses none; replicas sharing one store learn from every label and serve one calibration): sqlite:///path (replicas on one host may share the file), postgresql://user:pass@host/db (replicas on several hosts), sqlite:// (in memory: this process only), or none (no scored request is kept: feedback must carry probability and kind; a benchmark baseline). Default: sqlite:///$VALUEPROBE_CACHE/feedback.sqlite.")
    store_queue: int = Field(10_000, ge=10, description="Scored requests waiting to be written before new ones are counted as lost (writes never hold a response).")
    store_sync_s: float = Field(5.0, gt=0, le=30, description="How often this replica looks in the store for a calibration another replica promoted (it serves it within this time).")
    store_retention_days: Optional[float] = Field(30.0, gt=0, description="Forget scored requests (and their labels) older than this; promotions are kept.")
    store_retention_rows: Optional[int] = Field(None, ge=1000, description="Keep at most this many scored requests (the newest).")
    replica: Optional[str] = Field(None, description="This replica's name in the store; default: host:port.")
    host: str = "127.0.0.1"
    port: int = 8000

    def store_url(self) -> str:
        """The store these settings name (``store``, else the SQLite file in the model cache)."""
        from .store import default_store_url

        return self.store or default_store_url()

    def replica_name(self) -> str:
        import socket

        return self.replica or f"{socket.gethostname()}:{self.port}"

    def artifact_path(self) -> str:
        """The artifact these settings name (``artifact``, else the shipped default), before any recalibration."""
        if self.artifact:
            return self.artifact
        from valueprobe.weights import default_artifact

        return str(default_artifact())

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "gateway" and not self.upstream_url:
            raise ValueError("mode=gateway needs upstream_url")
        if self.escalate_gain_above is not None or self.escalate_gain_rate is not None:
            if (self.escalate_gain_above is None) == (self.escalate_gain_rate is None):
                raise ValueError("gain routing takes one of escalate_gain_above or escalate_gain_rate, not both")
            if not self.escalate_url:
                raise ValueError("gain routing (escalate_gain_above / escalate_gain_rate) needs escalate_url: a "
                                 "valueprobe sidecar serving the bigger model")
            if self.mode != "embedded":
                raise ValueError("gain routing compares this sidecar's own model with the target: embedded mode only")
            clashing = [name for name in ("escalate_below", "escalate_rate", "escalate_after_below",
                                          "escalate_after_rate") if getattr(self, name) is not None]
            if clashing:
                raise ValueError(f"gain routing decides escalation by itself; drop {', '.join(clashing)}")
        return self

