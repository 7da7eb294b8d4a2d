"""Sidecar behaviour that needs no second process: abstain, overload, hot reload, readiness."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conftest import poisoned, run_app

from valueprobe.plugin import save_artifact
from valueprobe.plugin.artifact import ArtifactData
from valueprobe.server.settings import Settings


def test_abstain_returns_refusal_with_confidence(artifact_file, qwen_model, tokenizer):
    settings = Settings(artifact=str(artifact_file), abstain_below=1.0, refusal_text="Not sure.")

    async def scenario(client, app):
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Capital of France?"}]})
        body = r.json()
        assert r.status_code == 200 and body["choices"][0]["message"]["content"] == "Not sure."
        assert body["confidence"]["decision"] == "abstain" and 0 <= body["confidence"]["probability"] <= 1
        r = await client.post("/v1/chat/completions", json={"stream": True, "messages": [{"role": "user", "content": "Capital of France?"}]})
        assert r.headers["x-valueprobe-decision"] == "abstain" and "Not sure." in r.text and r.text.rstrip().endswith("[DONE]")

    run_app(settings, qwen_model, tokenizer, scenario)


def test_overload_answers_503_with_retry_after(artifact_file, qwen_model, tokenizer):
    settings = Settings(artifact=str(artifact_file), max_queue=1, max_batch_size=1, max_wait_ms=0)

    async def scenario(client, app):
        rs = await asyncio.gather(*(client.post("/v1/confidence", json={"prompt": f"question {i}?"}) for i in range(40)))
        codes = [r.status_code for r in rs]
        assert 200 in codes and 503 in codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "overloaded"

    run_app(settings, qwen_model, tokenizer, scenario)


def test_hot_reload_swaps_and_refuses_bad_files(artifact_file, tmp_path, fitted, qwen_model, tokenizer):
    data, *_ = fitted
    other = tmp_path / "other.safetensors"
    save_artifact(ArtifactData(dict(data.tensors), {**data.metadata, "calibrator": "identity"}), other)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")
    settings = Settings(artifact=str(artifact_file), admin_token="t", artifact_dir=str(tmp_path))

    async def scenario(client, app):
        auth = {"Authorization": "Bearer t"}
        before = (await client.get("/v1/artifact")).json()["artifact_id"]
        assert (await client.post("/v1/admin/reload", json={"artifact": "other.safetensors"})).status_code == 401
        bad = await client.post("/v1/admin/reload", json={"artifact": "broken.safetensors"}, headers=auth)
        assert bad.status_code == 400 and before in bad.json()["error"]["message"]
        # outside the artifact folder and missing files get one and the same refusal (no existence oracle)
        outside = await client.post("/v1/admin/reload", json={"artifact": str(artifact_file)}, headers=auth)
        missing = await client.post("/v1/admin/reload", json={"artifact": "nope.safetensors"}, headers=auth)
        assert outside.status_code == missing.status_code == 400
        assert outside.json()["error"]["message"] == missing.json()["error"]["message"]
        # requests in flight during the swap all complete, each on one artifact
        inflight = [client.post("/v1/confidence", json={"prompt": f"q{i}?"}) for i in range(6)]
        swap = client.post("/v1/admin/reload", json={"artifact": "other.safetensors"}, headers=auth)
        results = await asyncio.gather(*inflight, swap)
        assert all(r.status_code == 200 for r in results)
        after = (await client.get("/v1/artifact")).json()
        assert after["artifact_id"] != before and after["calibrator"] == "identity"
        assert {r.json()["artifact_id"] for r in results[:-1]} <= {before, after["artifact_id"]}

    run_app(settings, qwen_model, tokenizer, scenario)


def test_not_ready_and_load_failure_are_503(tmp_path, qwen_model, tokenizer):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    settings = Settings(artifact=str(bad))

    async def scenario(client, app):
        await asyncio.sleep(0.2)
        r = await client.get("/readyz")
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
        assert (await client.get("/healthz")).status_code == 200
        r = await client.post("/v1/completions", json={"prompt": "x?"})
        assert r.status_code == 503

    run_app(settings, qwen_model, tokenizer, scenario)


def test_thresholds_from_artifact(artifact_file, fitted, qwen_model, tokenizer):
    from valueprobe.server.service import resolve_thresholds

    data, *_ = fitted
    import json

    thresholds = json.loads(data.metadata["thresholds"])
    abstain, escalate = resolve_thresholds(Settings(escalate_rate=0.2), thresholds)
    assert escalate == thresholds["escalation"]["0.2"] and abstain is None
    risk = thresholds["risk_controlled"]["0.2"]["threshold"]
    abstain, escalate = resolve_thresholds(Settings(risk_alpha=0.2), thresholds)
    assert escalate is None and abstain == (1.0 + 1e-9 if risk is None else risk)
    with pytest.raises(ValueError, match="no escalation threshold"):
        resolve_thresholds(Settings(escalate_rate=0.25), thresholds)
    with pytest.raises(ValueError, match="upstream_url"):
        Settings(mode="gateway")


def test_grafana_dashboard_uses_exported_metric_names():
    import json
    import re
    from importlib.resources import files

    from prometheus_client import generate_latest

    from valueprobe.server.dashboard import build
    from valueprobe.server.metrics import SidecarMetrics

    shipped = json.loads((files("valueprobe.server") / "grafana-dashboard.json").read_text())
    assert shipped == build(), "regenerate with: python -m valueprobe.server.dashboard"
    metrics = SidecarMetrics(CollectorRegistry())
    exported = set()
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "info": ("_info",)}
    for family in metrics.registry.collect():
        exported |= {family.name + s for s in suffixes.get(family.type, ("",))}
    # bounded label sets start at zero, so the series exist before the first event
    text = generate_latest(metrics.registry).decode()
    assert 'valueprobe_decisions_total{decision="escalate"} 0.0' in text
    assert 'valueprobe_errors_total{type="overloaded"} 0.0' in text
    used = {name for panel in shipped["panels"] for t in panel["targets"] for name in re.findall(r"valueprobe_\w+", t["expr"])}
    missing = used - exported
    assert not missing, f"dashboard names metrics the sidecar does not export: {missing}"


def test_a_prompt_whose_state_is_not_finite_fails_alone_and_cleanly(artifact_file, qwen_model, tokenizer):
    """A prompt whose hidden state overflows (NaN) gets a named 500 on every route; the clean requests batched with
    it (scoring, greedy and sampled generation) are answered as usual; no NaN is ever served or crashes a response."""
    settings = Settings(artifact=str(artifact_file), max_wait_ms=100, default_max_new_tokens=4)
    clean = ["Capital of France?", "Who wrote Hamlet?", "What is 2+2?"]
    bad = "zebra zebra?"

    def chat(q, **extra):
        return {"messages": [{"role": "user", "content": q}], "max_tokens": 4, **extra}

    async def scenario(client, app):
        scored = await asyncio.gather(*(client.post("/v1/confidence", json={"prompt": q}) for q in [*clean, bad]))
        greedy = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat(q)) for q in [*clean, bad]))
        sampled = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat(q, temperature=0.9))
                                         for q in [bad, *clean]))
        streamed = await client.post("/v1/chat/completions", json=chat(bad, stream=True))
        listed = await client.post("/v1/confidence", json=[{"prompt": clean[0]}, {"prompt": bad}])
        metrics = (await client.get("/metrics")).text
        return scored, greedy, sampled[1:] + sampled[:1], streamed, listed, metrics

    with poisoned(qwen_model, tokenizer):
        scored, greedy, sampled, streamed, listed, metrics = run_app(settings, qwen_model, tokenizer, scenario)
    for responses in (scored, greedy, sampled):
        *ok, failed = responses
        assert [r.status_code for r in ok] == [200] * len(clean)
        for r in ok:
            body = r.json()
            p = body["probability"] if "probability" in body else body["confidence"]["probability"]
            assert 0 <= p <= 1
        assert failed.status_code == 500, failed.text
        error = failed.json()["error"]
        assert error["type"] == "probe_error" and "not finite" in error["message"]
    assert streamed.status_code == 500 and "not finite" in streamed.json()["error"]["message"]
    assert listed.status_code == 500
    assert listed.json()["error"]["message"].startswith("prompt 1 of the 2 in this request")
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    errors = {s.labels["type"]: s.value for s in families["valueprobe_errors"].samples if s.name.endswith("_total")}
    assert errors["probe_error"] >= 5
    sizes = {s.name: s.value for s in families["valueprobe_generation_batch_size"].samples}
    assert sizes["valueprobe_generation_batch_size_sum"] > sizes["valueprobe_generation_batch_size_count"]  # batched


def test_a_wrong_method_is_a_405_that_names_the_allowed_ones(artifact_file, qwen_model, tokenizer):
    """RFC 9110 (15.5.6): a 405 carries Allow. The error handler used to drop the framework's headers."""
    from conftest import run_app

    async def scenario(client, app):
        return await client.get("/v1/chat/completions"), await client.delete("/v1/confidence")

    chat, confidence = run_app(Settings(artifact=str(artifact_file)), qwen_model, tokenizer, scenario)
    for r in (chat, confidence):
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["error"]["type"] == "invalid_request_error"
