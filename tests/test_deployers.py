"""What a platform engineer relies on when the sidecar sits in front of a serving stack (issue 29, "Deployers").

A fake OpenAI-compatible and TGI upstream runs under uvicorn on loopback and records every request it receives, so
the tests read what the upstream and the escalation target were actually sent: the request as the user sent it,
never the artifact's prompt format. Gateway start-up asks the upstream's ``GET /v1/models`` for the model to send
and stops with the reason when it cannot choose; an upstream's refusal is an error, never a refusal text with 200.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import uvicorn
from conftest import Server, free_port, run_app
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from valueprobe.server.settings import Settings

QUESTION = "What is the capital of France?"
SUFFIX = "Answer the question briefly, with just the answer."  # the default artifact format's instruction
MODELS = {"one": ["served-model"], "two": ["model-a", "model-b"], "none": []}


class FakeUpstream:
    """An OpenAI-compatible server (``/<variant>/v1/...``, listing ``MODELS[variant]`` and refusing any other model
    name with vLLM's 404) and a TGI server (``POST /tgi``) in a uvicorn thread; ``received`` holds every request
    body with its path."""

    def __init__(self):
        app = FastAPI()
        self.received: list[tuple[str, dict]] = []

        @app.get("/{variant}/v1/models")
        async def models(variant: str):
            if variant == "locked":
                return JSONResponse({"error": {"message": "bad api key", "type": "auth"}}, status_code=401)
            return {"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS[variant]]}

        async def openai(variant: str, request: Request, kind: str):
            body = await request.json()
            self.received.append((request.url.path, body))
            if body.get("model") not in MODELS.get(variant, []):
                # vLLM's answer to a model it does not serve (vllm/entrypoints/openai/serving_engine.py)
                return JSONResponse({"object": "error", "message": f"The model `{body.get('model')}` does not exist.",
                                     "type": "NotFoundError", "param": None, "code": 404}, status_code=404)
            choice = ({"index": 0, "message": {"role": "assistant", "content": "fake answer"}, "finish_reason": "stop"}
                      if kind == "chat" else {"index": 0, "text": "fake answer", "finish_reason": "stop"})
            return {"id": "x", "object": kind, "model": body["model"], "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}

        @app.post("/{variant}/v1/chat/completions")
        async def chat(variant: str, request: Request):
            return await openai(variant, request, "chat")

        @app.post("/{variant}/v1/completions")
        async def completions(variant: str, request: Request):
            return await openai(variant, request, "text_completion")

        @app.post("/tgi")
        async def tgi(request: Request):
            body = await request.json()
            self.received.append((request.url.path, body))
            return [{"generated_text": "fake tgi answer", "details": {
                "finish_reason": "eos_token", "generated_tokens": 3, "seed": None, "prefill": [], "tokens": []}}]

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise TimeoutError("the fake upstream did not start")
            time.sleep(0.05)

    def last(self, path_end: str) -> dict:
        """The body of the latest request whose path ends with ``path_end``."""
        return next(body for path, body in reversed(self.received) if path.endswith(path_end))

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def fake():
    upstream = FakeUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gateway(assets, fake):
    """A real sidecar in gateway mode in front of the fake OpenAI upstream, no --upstream-model given."""
    server = Server(assets, mode="gateway", upstream_url=f"{fake.url}/one", upstream_kind="openai")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _chat(url: str, messages, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": messages, "max_tokens": 4, **extra})


# -- 1. the upstream and the escalation target get the request as the user sent it ----------------------------------
def test_the_gateway_upstream_gets_the_users_messages_and_the_served_model(gateway, fake):
    """A single user message is scored in the artifact's format, but the upstream receives it exactly as sent, with
    the one model its /v1/models lists (no --upstream-model)."""
    messages = [{"role": "user", "content": QUESTION}]
    r = _chat(gateway.url, messages)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "fake answer"
    sent = fake.last("/one/v1/chat/completions")
    assert sent["messages"] == messages and sent["model"] == "served-model"
    assert SUFFIX not in str(sent)
    # a completions prompt is a question: the upstream gets it as one user message, as asked
    r = httpx.post(f"{gateway.url}/v1/completions", timeout=60, json={"prompt": QUESTION, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "fake answer"
    assert fake.last("/one/v1/chat/completions")["messages"] == [{"role": "user", "content": QUESTION}]
    # the probe still scored the artifact's rendering: the same probability /v1/confidence gives the question
    scored = httpx.post(f"{gateway.url}/v1/confidence", json={"prompt": QUESTION}, timeout=60).json()
    assert r.json()["confidence"]["probability"] == pytest.approx(scored["probability"], abs=1e-6)


def test_escalation_targets_get_the_request_as_sent(artifact_file, qwen_model, tokenizer, fake):
    """OpenAI-compatible and TGI escalation targets alike: the user's messages (TGI: through the chat template as
    sent), not the artifact's rewritten question."""
    from valueprobe.plugin import ValueProbe

    fmt = ValueProbe.load(str(artifact_file)).prompt_format
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    for kind, url in (("openai", f"{fake.url}/one"), ("tgi", f"{fake.url}/tgi")):
        settings = Settings(artifact=str(artifact_file), escalate_url=url, escalate_kind=kind, escalate_below=1.0,
                            escalate_model="served-model" if kind == "openai" else None)

        async def scenario(client, app, kind=kind):
            for messages in ([{"role": "user", "content": QUESTION}], conversation):
                r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
                body = r.json()
                assert r.status_code == 200 and body["confidence"]["routed"] is True, body
                if kind == "openai":
                    assert fake.last("/one/v1/chat/completions")["messages"] == messages
                else:
                    assert fake.last("/tgi")["inputs"] == fmt.render(tokenizer, messages)
                    assert SUFFIX not in fake.last("/tgi")["inputs"]
            # a multiple-choice question keeps its options: lettered as the artifact's format lists them
            r = await client.post("/v1/completions", json={"prompt": "Which planet is largest?", "max_tokens": 2,
                                                           "choices": ["Mars", "Jupiter"]})
            assert r.status_code == 200
            if kind == "openai":
                content = fake.last("/one/v1/chat/completions")["messages"][0]["content"]
                assert "A. Mars" in content and "B. Jupiter" in content

        run_app(settings, qwen_model, tokenizer, scenario)


def test_local_prompt_user_answers_the_message_as_sent_and_scores_the_artifacts_rendering(
        artifact_file, qwen_model, tokenizer):
    """local_prompt=user: the local model answers the user's message through the chat template (what the TGI route
    answers for that exact text), while the confidence is the artifact format's (what the default serves)."""
    messages = [{"role": "user", "content": QUESTION}]
    as_sent = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    answers = {}
    for local_prompt in ("artifact", "user"):
        async def scenario(client, app):
            engine, generated = app.state.sidecar.engine, []
            generate = engine.generate

            def spy(prompt, *args, **kwargs):  # what the local model is asked to answer
                generated.append(list(prompt.input_ids))
                return generate(prompt, *args, **kwargs)

            engine.generate = spy
            chat = (await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6})).json()
            raw = (await client.post("/generate", json={"inputs": as_sent,
                                                        "parameters": {"max_new_tokens": 6}})).json()
            return chat, raw, generated

        answers[local_prompt] = run_app(Settings(artifact=str(artifact_file), local_prompt=local_prompt), qwen_model,
                                        tokenizer, scenario)
    (chat_artifact, _, artifact_generated), (chat_user, raw_user, user_generated) = answers["artifact"], answers["user"]
    sent_ids = tokenizer(as_sent, add_special_tokens=False)["input_ids"]
    assert user_generated[0] == sent_ids and SUFFIX not in tokenizer.decode(user_generated[0])
    assert artifact_generated[0] != sent_ids and SUFFIX in tokenizer.decode(artifact_generated[0])
    assert chat_user["choices"][0]["message"]["content"] == raw_user["generated_text"]
    assert chat_user["confidence"]["probability"] == pytest.approx(chat_artifact["confidence"]["probability"], abs=1e-6)
    assert chat_user["confidence"]["decision"] == "answer"


# -- 2. the upstream's model: discovered at start, or the start stops with the reason ------------------------------
@pytest.mark.parametrize("variant, expected", [
    ("two", "serves 2 models ('model-a', 'model-b'); choose one with --upstream-model"),
    ("none", "lists no model at /v1/models; name one with --upstream-model"),
    ("locked", "answered HTTP 401 (bad api key)"),
    ("down", "could not list the upstream's models within 1 s"),
])
def test_a_gateway_whose_upstream_model_cannot_be_chosen_stops_at_start(assets, fake, variant, expected):
    url = f"http://127.0.0.1:{free_port()}" if variant == "down" else f"{fake.url}/{variant}"
    server = Server(assets, mode="gateway", upstream_url=url, upstream_kind="openai", upstream_start_timeout_s=1)
    try:
        code = server.proc.wait(timeout=120)
    finally:
        server.stop()
    log = open(server.log.name).read()
    assert code == 1, log[-2000:]
    assert "could not choose its upstream's model, so it stopped" in log and expected in log, log[-2000:]


def test_an_upstream_that_refuses_the_configured_model_is_an_error_not_a_refusal(artifact_file, qwen_model, tokenizer,
                                                                                fake):
    """vLLM answers 404 to a model it does not serve: the gateway answers 502 upstream_rejected with vLLM's message
    (never the refusal text with 200); an escalation target that refuses leaves the local answer, flagged."""
    gateway = Settings(artifact=str(artifact_file), mode="gateway", upstream_url=f"{fake.url}/one",
                       upstream_model="default")
    embedded = Settings(artifact=str(artifact_file), escalate_url=f"{fake.url}/one", escalate_model="default",
                        escalate_below=1.0)

    async def refused(client, app):
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}]})
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["type"] == "upstream_rejected" and "The model `default` does not exist." in error["message"]
        r = await client.post("/generate", json={"inputs": QUESTION, "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 502 and r.json()["error_type"] == "generation"
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                            "stream": True})
        assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_rejected"

    async def flagged(client, app):
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                            "max_tokens": 3})
        body = r.json()
        assert r.status_code == 200 and body["confidence"]["routed"] is False
        assert "does not exist" in body["confidence"]["upstream_error"]
        assert body["choices"][0]["message"]["content"] != Settings().refusal_text  # the local model's answer

    run_app(gateway, qwen_model, tokenizer, refused)
    run_app(embedded, qwen_model, tokenizer, flagged)


# -- 3. --escalate-rate / --risk-alpha: only the fitted values, each said with what it does -------------------------
SHIPPED = "weights/qwen2.5-coder-1.5b-instruct.safetensors"


def test_a_rate_the_artifact_was_not_fitted_for_is_refused_with_the_values_and_their_coverage():
    """The shipped 1.5B artifact: --risk-alpha 0.1 answers 6.5% of its calibration split (abstains on 93.5%), as its
    thresholds metadata records; another alpha or rate is refused with every fitted value and what it does."""
    from pathlib import Path

    from valueprobe.plugin import ValueProbe
    from valueprobe.server.policy import fitted_choices, policy_summary, resolve_thresholds

    thresholds = ValueProbe.load(str(Path(__file__).parents[1] / SHIPPED)).thresholds
    risk = thresholds["risk_controlled"]
    assert risk["0.1"]["coverage"] == pytest.approx(0.065, abs=5e-4)
    lines = fitted_choices(thresholds)
    assert "--risk-alpha 0.1: abstain below P 0.944: answers 6.5% of the calibration split, abstains on 93.5%" in lines[3]
    assert len(lines) == 6 and lines[0].startswith("--escalate-rate 0.1: escalate below P 0.077")
    with pytest.raises(ValueError) as refused:
        resolve_thresholds(Settings(risk_alpha=0.15), thresholds)
    message = str(refused.value)
    assert "--risk-alpha takes 0.1, 0.2, 0.3" in message and "answers 20.3%" in message and "interpolated" in message
    with pytest.raises(ValueError, match=r"no escalation threshold for rate 0.25; --escalate-rate takes 0.1, 0.2, 0.3"):
        resolve_thresholds(Settings(escalate_rate=0.25), thresholds)
    summary, most = policy_summary(Settings(risk_alpha=0.1), thresholds)
    assert most and "abstains on 93.5%" in summary
    assert policy_summary(Settings(risk_alpha=0.3, escalate_rate=0.2), thresholds)[0].startswith("--escalate-rate 0.2")


def test_serve_refuses_an_unfitted_rate_before_loading_the_model(assets, tmp_path):
    """The refusal comes at start, before the model is loaded (a model that does not exist is never reached)."""
    server = Server(assets, risk_alpha=0.15, model=str(tmp_path / "never-loaded"))
    try:
        code = server.proc.wait(timeout=120)
    finally:
        server.stop()
    log = open(server.log.name).read()
    assert code == 1 and "--risk-alpha takes" in log and "never-loaded" not in log, log[-2000:]


def test_inspect_says_what_each_fitted_value_does():
    from typer.testing import CliRunner

    from valueprobe.cli import app

    out = CliRunner().invoke(app, ["inspect", SHIPPED]).output
    assert "serve --risk-alpha 0.1: abstain below P 0.944: answers 6.5%" in out


# -- 4. the pin checks a recalibration against the pinned bytes, not against what the file says ---------------------
def _recalibration_and_forgery(artifact_file, folder):
    """A genuine recalibration of ``artifact_file`` and a forgery: other head weights, claiming the same origin."""
    import torch

    from valueprobe.plugin import ValueProbe, save_artifact
    from valueprobe.plugin.artifact import ArtifactData

    pinned = ValueProbe.load(str(artifact_file))
    genuine = pinned.recalibrated({pinned.calibration_slot("open"): (1.3, -0.2)})
    genuine.save(folder / "genuine.safetensors")
    genuine = ValueProbe.load(str(folder / "genuine.safetensors"))
    tensors = dict(genuine.data.tensors)
    head = next(name for name in tensors if name.startswith("head."))
    tensors[head] = tensors[head] * 2 + 0.5
    metadata = {k: v for k, v in genuine.data.metadata.items() if k != "content_sha256"}
    save_artifact(ArtifactData(tensors, metadata), folder / "forged.safetensors")
    forged = ValueProbe.load(str(folder / "forged.safetensors"))
    assert forged.calibration_origin == pinned.data.metadata["content_sha256"]  # it claims the pinned origin
    return pinned, genuine, forged, head


def test_the_pin_accepts_a_recalibration_of_the_pinned_bytes_and_refuses_a_file_that_only_claims_it(
        artifact_file, tmp_path):
    from valueprobe.plugin import ArtifactError
    from valueprobe.server.policy import check_pin

    pinned, genuine, forged, head = _recalibration_and_forgery(artifact_file, tmp_path)
    pin = pinned.data.metadata["content_sha256"][:16]
    check_pin(pinned, pin)
    check_pin(genuine, pin, pinned)
    with pytest.raises(ArtifactError, match=f"not a recalibration of the pinned artifact: its tensor '{head}'"):
        check_pin(forged, pin, pinned)
    with pytest.raises(ArtifactError, match="does not match the pinned"):  # without the pinned bytes: refused
        check_pin(genuine, pin)
    with pytest.raises(ArtifactError, match="is not the pinned one either"):  # the bytes at hand are not the pin's
        check_pin(forged, pin, genuine)


def test_a_pinned_sidecar_reloads_a_recalibration_and_refuses_a_forgery(artifact_file, tmp_path, qwen_model, tokenizer):
    import shutil

    folder = tmp_path / "artifacts"
    folder.mkdir()
    shutil.copy(artifact_file, folder / "probe.safetensors")
    pinned, genuine, forged, head = _recalibration_and_forgery(folder / "probe.safetensors", folder)
    pin = pinned.data.metadata["content_sha256"][:16]
    auth = {"Authorization": "Bearer t"}

    async def scenario(client, app):
        r = await client.post("/v1/admin/reload", json={"artifact": "forged.safetensors"}, headers=auth)
        assert r.status_code == 400 and head in r.json()["error"]["message"], r.text
        r = await client.post("/v1/admin/reload", json={"artifact": "genuine.safetensors"}, headers=auth)
        assert r.status_code == 200 and r.json()["artifact_id"] == genuine.artifact_id, r.text
        assert (await client.get("/v1/artifact")).json()["calibration_version"] == 1

    run_app(Settings(artifact=str(folder / "probe.safetensors"), artifact_sha256=pin, admin_token="t"), qwen_model,
            tokenizer, scenario)

    async def not_ready(client, app):
        await asyncio.sleep(0.3)
        return (await client.get("/readyz")).json()["error"]["message"]

    # a recalibration served as --artifact cannot be checked without the pinned bytes: refused at start
    message = run_app(Settings(artifact=str(folder / "genuine.safetensors"), artifact_sha256=pin), qwen_model,
                      tokenizer, not_ready)
    assert "does not match the pinned" in message


# -- 5. /v1/confidence gives each scored prompt a request_id that /v1/feedback takes ---------------------------------
def test_confidence_results_carry_a_request_id_that_feedback_accepts(artifact_file, qwen_model, tokenizer):
    """The documented promise (docs/sidecar.md, routes): score with /v1/confidence (the answer generated elsewhere), then label it by its id, with
    no probability or kind sent along (the store kept them); an unknown id is a 404."""
    auth = {"Authorization": "Bearer t"}

    async def scenario(client, app):
        one = (await client.post("/v1/confidence", json={"prompt": QUESTION})).json()
        batch = (await client.post("/v1/confidence", json=[{"prompt": QUESTION}, {"prompt": "Which planet?",
                                                                              "choices": ["Mars", "Jupiter"]}])).json()
        ids = [one["request_id"]] + [r["request_id"] for r in batch["results"]]
        assert len(set(ids)) == 3 and all(i.startswith("vp-") for i in ids)
        for request_id in ids:
            r = await client.post("/v1/feedback", json={"request_id": request_id, "correct": True}, headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["recalibration"]["label"] == "new" and r.json()["recalibration"]["used"] is True
        r = await client.post("/v1/feedback", json={"request_id": "vp-unknown", "correct": True}, headers=auth)
        assert r.status_code == 404

    run_app(Settings(artifact=str(artifact_file), admin_token="t"), qwen_model, tokenizer, scenario)
