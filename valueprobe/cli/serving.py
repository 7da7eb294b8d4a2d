"""`serve`: the sidecar."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import app, fail


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help="Model name or folder; default: the artifact's own model.")] = None,
    artifact: Annotated[Optional[str], typer.Option(help="Artifact; default: the shipped default.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="embedded (generate here) or gateway (answers from --upstream-url).")] = None,
    engine: Annotated[Optional[str], typer.Option(help="Embedded engine: transformers, or vllm (vLLM's async engine "
                                                      "in-process; the probe is read inside its forward pass).")] = None,
    upstream_url: Annotated[Optional[str], typer.Option(help="Gateway mode: TGI or OpenAI-compatible server that answers.")] = None,
    upstream_kind: Annotated[Optional[str], typer.Option(help="tgi or openai.")] = None,
    upstream_model: Annotated[Optional[str], typer.Option(help="Model name for an OpenAI-compatible upstream (default: "
                                                        "the one its /v1/models lists; several or none stops the "
                                                        "start).")] = None,
    escalate_url: Annotated[Optional[str], typer.Option(help="Bigger model for escalated questions.")] = None,
    escalate_kind: Annotated[Optional[str], typer.Option(help="tgi or openai.")] = None,
    escalate_model: Annotated[Optional[str], typer.Option(help="Model name for an OpenAI-compatible escalation target "
                                                        "(default: the one its /v1/models lists).")] = None,
    local_prompt: Annotated[Optional[str], typer.Option(help="What the local model answers for a prompt or a single "
                                                      "user message: 'artifact' (default: the prompt the probe "
                                                      "scored, in the artifact's format, one prefill) or 'user' (the "
                                                      "message as sent, through the chat template: a second "
                                                      "prefill). Upstreams always get the request as sent.")] = None,
    abstain_below: Annotated[Optional[float], typer.Option(help="Abstain when P(correct) is below this.")] = None,
    escalate_below: Annotated[Optional[float], typer.Option(help="Escalate when P(correct) is below this.")] = None,
    escalate_rate: Annotated[Optional[float], typer.Option(help="Use the artifact's threshold escalating this share (0.1, 0.2, 0.3).")] = None,
    risk_alpha: Annotated[Optional[float], typer.Option(help="Abstain below the artifact's risk-controlled threshold at this error rate.")] = None,
    confident_above: Annotated[Optional[float], typer.Option(help="The guardrails detector routes' metadata.confident: "
                                                             "P(correct) at or above this is 'confident' (default: "
                                                             "the policy's threshold, else 0.5); it filters nothing "
                                                             "(the orchestrator cuts on the score).")] = None,
    admin_token: Annotated[Optional[str], typer.Option(help="Bearer token for /v1/feedback and /v1/admin/* "
                                                       "(unset: those routes answer 403).")] = None,
    artifact_sha256: Annotated[Optional[str], typer.Option(help="Pin: refuse an artifact whose content hash does "
                                                           "not start with this (at start and on reload).")] = None,
    artifact_dir: Annotated[Optional[str], typer.Option(help="Folder reload may load from (default: the artifact's).")] = None,
    search_artifact: Annotated[Optional[str], typer.Option(help="Step-value artifact (`valueprobe fit-steps`) that "
                                                           "values steps in `search` (default: the served head).")] = None,
    answer_artifact: Annotated[Optional[str], typer.Option(help="Answer-level artifact (`valueprobe fit --answer-end`): "
                                                           "confidence.answer on every generated answer (default: "
                                                           "<artifact stem>.answer.safetensors beside the artifact; "
                                                           "'none': off).")] = None,
    flag_below: Annotated[Optional[float], typer.Option(help="Mark answers whose answer-level P(correct) is below this.")] = None,
    escalate_after_below: Annotated[Optional[float], typer.Option(help="After a local answer whose answer-level "
                                                                  "P(correct) is below this, return the escalation "
                                                                  "target's answer instead (whole responses).")] = None,
    escalate_after_rate: Annotated[Optional[float], typer.Option(help="Take --escalate-after-below from the answer "
                                                                 "artifact's threshold for this share of answers.")] = None,
    escalate_gain_above: Annotated[Optional[float], typer.Option(help="Route by expected gain (--escalate-url a "
                                                                 "valueprobe sidecar): escalate when P(target right) "
                                                                 "- P(this model right) is above this.")] = None,
    escalate_gain_rate: Annotated[Optional[float], typer.Option(help="Route by expected gain, escalating this share "
                                                                "of the traffic (a rolling quantile of the gains "
                                                                "seen here).")] = None,
    escalate_gain_table: Annotated[Optional[str], typer.Option(help="Rate -> gain threshold JSON (`bench cascade` "
                                                               "writes <out>.gain-rates.json) seeding "
                                                               "--escalate-gain-rate.")] = None,
    escalate_gain_moment: Annotated[Optional[str], typer.Option(help="before: decide on both prompt-only "
                                                                "probabilities before decoding (router); after: on "
                                                                "this model's answer-level probability (cascade).")] = None,
    recalibration: Annotated[Optional[str], typer.Option(help="Feedback refits a shadow calibrator per question kind, "
                                                         "of the prompt-level and of the answer-level artifact: "
                                                         "'shadow' (default) promotes it on POST "
                                                         "/v1/admin/calibration/promote[?artifact=answer] when it is "
                                                         "better on held-out feedback, 'auto' also by itself, 'off' "
                                                         "neither.")] = None,
    calibration_dir: Annotated[Optional[str], typer.Option(help="Where promoted calibrations are written as new "
                                                           "artifacts (promotions themselves live in the store); default: "
                                                           "$VALUEPROBE_CACHE/calibrations/<artifact id>.")] = None,
    store: Annotated[Optional[str], typer.Option(help="Where scored requests, labels and promoted calibrations are "
                                                 "kept, shared by replicas: sqlite:///path, postgresql://user@host/db, "
                                                 "sqlite:// (memory) or none; default: "
                                                 "sqlite:///$VALUEPROBE_CACHE/feedback.sqlite.")] = None,
    replica: Annotated[Optional[str], typer.Option(help="This replica's name in the store (default host:port).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Settings file (KEY=value lines, VALUEPROBE_ prefix).")] = None,
    log_level: str = "info",
):
    """Run the sidecar: OpenAI and TGI routes with calibrated confidence, abstain/escalate, Prometheus metrics.

    Exits with status 1, the reason on stderr, when the model or the artifact cannot be loaded (a refused hot
    reload later on keeps the old artifact serving).

    Every option can also come from the environment as VALUEPROBE_<OPTION> (e.g. VALUEPROBE_ESCALATE_URL) or from
    --config; flags win. Other settings (max_batch_size, max_wait_ms, max_queue, upstream_timeout_s,
    upstream_start_timeout_s, upstream_api_key,
    refusal_text, max_prompt_chars, max_new_tokens_limit, default_max_new_tokens, feedback_window,
    recalibration_window, recalibration_min_feedback, recalibration_every, recalibration_margin, drift_window,
    drift_min_prompts, store_queue, store_sync_s, store_retention_days, store_retention_rows, dtype,
    device, check_fingerprint, escalate_confidence_url, escalate_confidence_timeout_s, vllm_max_model_len, vllm_max_num_seqs, vllm_max_num_batched_tokens) are environment/config
    only; see server/settings.py.
    """
    from pydantic import ValidationError

    from valueprobe.server.app import serve as run_sidecar
    from valueprobe.server.settings import Settings

    given = {k: v for k, v in dict(model=model, artifact=artifact, mode=mode, engine=engine, upstream_url=upstream_url,
                                   upstream_kind=upstream_kind, upstream_model=upstream_model, escalate_url=escalate_url,
                                   escalate_kind=escalate_kind, escalate_model=escalate_model, local_prompt=local_prompt,
                                   abstain_below=abstain_below, escalate_below=escalate_below,
                                   escalate_rate=escalate_rate, risk_alpha=risk_alpha, confident_above=confident_above,
                                   admin_token=admin_token,
                                   artifact_sha256=artifact_sha256, artifact_dir=artifact_dir,
                                   search_artifact=search_artifact, answer_artifact=answer_artifact,
                                   flag_below=flag_below, escalate_after_below=escalate_after_below,
                                   escalate_after_rate=escalate_after_rate, escalate_gain_above=escalate_gain_above,
                                   escalate_gain_rate=escalate_gain_rate, escalate_gain_table=escalate_gain_table,
                                   escalate_gain_moment=escalate_gain_moment, recalibration=recalibration,
                                   calibration_dir=calibration_dir, store=store, replica=replica, host=host,
                                   port=port).items() if v is not None}
    try:
        settings = Settings(_env_file=str(config), **given) if config else Settings(**given)
    except ValidationError as exc:
        fail(str(exc))
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failure = run_sidecar(settings, log_level=log_level)
    if failure is not None:
        what = ("choose its upstream's model" if failure.startswith("UpstreamModelError")
                else "load its model or artifact")
        fail(f"the sidecar could not {what}, so it stopped: {failure}", code=1)
