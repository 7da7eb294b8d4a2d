"""Reliability under concurrency and hostile input: each test here failed before its fix (issue 10)."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest
import torch
import conftest
from conftest import build_tokenizer

from valueprobe.plugin import ArtifactError, FingerprintMismatchError, ValueProbe, load_artifact, save_artifact
from valueprobe.plugin.artifact import ArtifactData, _content_sha256
from valueprobe.server.engines.base import final_generation
from valueprobe.server.settings import Settings


def run_app(settings, model, tokenizer, scenario):
    return conftest.run_app(settings, model, tokenizer, scenario, timeout=120)


def test_many_concurrent_chat_and_confidence_clients_get_no_500(artifact_file, qwen_model, tmp_path):
    # A fresh tokenizer: the model thread, the scoring thread and the event loop all use it at once.
    tok = conftest.as_served(build_tokenizer(), tmp_path)
    settings = Settings(artifact=str(artifact_file), default_max_new_tokens=4)

    async def scenario(client, app):
        for round_ in range(2):
            chats = [client.post("/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": f"Capital {round_} {i}?"}],
                                       "max_tokens": 4, "stream": i % 2 == 0}) for i in range(16)]
            confs = [client.post("/v1/confidence", json={"prompt": f"question {round_} {i}?"}) for i in range(8)]
            rs = await asyncio.gather(*chats, *confs)
            assert [r.status_code for r in rs] == [200] * 24, [r.text for r in rs if r.status_code != 200]

    run_app(settings, qwen_model, tok, scenario)


def test_a_list_longer_than_the_queue_is_admitted(artifact_file, qwen_model, tokenizer):
    settings = Settings(artifact=str(artifact_file), max_queue=4, max_batch_size=8)

    async def scenario(client, app):
        r = await client.post("/v1/confidence", json=[{"prompt": f"question {i}?"} for i in range(100)])
        assert r.status_code == 200 and len(r.json()["results"]) == 100

    run_app(settings, qwen_model, tokenizer, scenario)


def test_admin_routes_are_closed_without_a_token(artifact_file, qwen_model, tokenizer):
    settings = Settings(artifact=str(artifact_file))

    async def scenario(client, app):
        r = await client.post("/v1/admin/reload", json={"artifact": "probe.safetensors"})
        assert r.status_code == 403 and "--admin-token" in r.json()["error"]["message"]
        r = await client.post("/v1/feedback", json={"request_id": "x", "correct": True, "probability": 0.5})
        assert r.status_code == 403
        # request durations are observed per route template (the metric used to be declared but never observed)
        text = (await client.get("/metrics")).text
        assert 'valueprobe_request_duration_seconds_count{route="/v1/admin/reload"} 1.0' in text
        assert 'valueprobe_errors_total{type="permission_error"} 2.0' in text

    run_app(settings, qwen_model, tokenizer, scenario)


def test_bad_seed_and_refusing_chat_template_are_4xx(artifact_file, qwen_model):
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                         "{{ raise_exception('roles must alternate') }}{% endif %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    settings = Settings(artifact=str(artifact_file), check_fingerprint=False)

    async def scenario(client, app):
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}],
                                                            "seed": 2**64})
        assert r.status_code == 422 and "seed" in r.json()["error"]["message"]
        r = await client.post("/generate", json={"inputs": "x", "parameters": {"seed": -1}})
        assert r.status_code == 422
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"},
                                                                         {"role": "user", "content": "b"}]})
        assert r.status_code == 400 and "alternate" in r.json()["error"]["message"]

    run_app(settings, qwen_model, tok, scenario)


def test_probe_failure_is_500_probe_error_not_503(artifact_file, qwen_model, tokenizer, monkeypatch):
    settings = Settings(artifact=str(artifact_file))

    async def scenario(client, app):
        probe = app.state.sidecar.probe

        def broken(*a, **k):
            raise RuntimeError("boom")

        monkeypatch.setattr(probe, "readout", broken)
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a?"}], "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["type"] == "probe_error" and "boom" in r.json()["error"]["message"]
        r = await client.post("/v1/confidence", json={"prompt": "a?"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "probe_error"

    run_app(settings, qwen_model, tokenizer, scenario)


def test_stream_closed_by_the_client_stops_generation(artifact_file, qwen_model, tokenizer):
    settings = Settings(artifact=str(artifact_file))

    async def scenario(client, app):
        sidecar = app.state.sidecar
        served = sidecar.served
        query = sidecar.prepare(served, question="Capital of France?", max_new_tokens=200)
        events = sidecar.events(query, stream=True)
        head = await events.__anext__()
        assert type(head).__name__ == "Head"
        engine = sidecar.engine
        await events.aclose()  # what Starlette does when the client goes away
        # the generation thread comes free (it would hang here if the stopped generation held it) and the slot is back
        await asyncio.get_running_loop().run_in_executor(engine.generate_executor, lambda: None)
        return engine.admission.in_flight

    assert run_app(settings, qwen_model, tokenizer, scenario) == 0


def test_abstain_decides_before_decoding(artifact_file, qwen_model, tokenizer):
    """Non-streaming abstain: the local generation stops right after the prefill (one token at most)."""
    settings = Settings(artifact=str(artifact_file), abstain_below=1.0)

    async def scenario(client, app):
        sidecar = app.state.sidecar
        served = sidecar.served
        query = sidecar.prepare(served, question="Capital of France?", max_new_tokens=64)
        gen = await final_generation(sidecar.engine.generate(query.prompt, served.probe, max_new_tokens=64,
                                                             policy=served.policy))
        outcome = await sidecar.answer(query)
        return gen, outcome

    gen, outcome = run_app(settings, qwen_model, tokenizer, scenario)
    assert gen.completion_tokens <= 1 and gen.finish_reason in ("aborted", "stop")
    assert outcome.decision == "abstain"


def test_reload_is_atomic_when_the_policy_cannot_be_resolved(artifact_file, tmp_path, fitted, qwen_model, tokenizer):
    data, *_ = fitted
    no_thresholds = json.dumps({"escalation": {}, "risk_controlled": {}, "source": "none"})
    save_artifact(ArtifactData(dict(data.tensors), {**data.metadata, "thresholds": no_thresholds}),
                  tmp_path / "bare.safetensors")
    settings = Settings(artifact=str(artifact_file), admin_token="t", artifact_dir=str(tmp_path), risk_alpha=0.2)

    async def scenario(client, app):
        before = (await client.get("/v1/artifact")).json()
        r = await client.post("/v1/admin/reload", json={"artifact": "bare.safetensors"},
                              headers={"Authorization": "Bearer t"})
        after = (await client.get("/v1/artifact")).json()
        return r, before, after

    r, before, after = run_app(settings, qwen_model, tokenizer, scenario)
    assert r.status_code == 400 and "risk-controlled" in r.json()["error"]["message"]
    assert after["artifact_id"] == before["artifact_id"] and after["policy"] == before["policy"]


def test_pinned_artifact_hash_refuses_another_file(artifact_file, qwen_model, tokenizer):
    settings = Settings(artifact=str(artifact_file), artifact_sha256="0" * 16)

    async def scenario(client, app):
        await asyncio.sleep(0.3)
        r = await client.get("/readyz")
        return r

    r = run_app(settings, qwen_model, tokenizer, scenario)
    assert r.status_code == 503 and "artifact-sha256" in r.json()["error"]["message"]


def _rehashed(data: ArtifactData, tensors=None, metadata=None) -> ArtifactData:
    """A crafted artifact whose content hash was recomputed, so only field validation can catch it."""
    from valueprobe.plugin.artifact import FORMAT_VERSION, HOOK_POINT, TOKEN_POSITION

    ts = {**data.tensors, **(tensors or {})}
    md = {"format_version": FORMAT_VERSION, "hook_point": HOOK_POINT, "token_position": TOKEN_POSITION,
          **data.metadata, **(metadata or {})}
    md["content_sha256"] = _content_sha256(ts, md)
    return ArtifactData(ts, md)


@pytest.mark.parametrize("change,field", [
    (dict(tensors={"calibrator.a": torch.tensor([1.0, 2.0], dtype=torch.float64)}), "calibrator.a"),
    (dict(tensors={"calibrator.a": torch.tensor([-1.0], dtype=torch.float64)}), "calibrator.a"),
    (dict(metadata={"prompt_format": json.dumps({"open_template": "{question} {secret}"})}), "open_template"),
    (dict(metadata={"thresholds": json.dumps({"escalation": {"0.1": "high"}})}), "thresholds.escalation"),
    (dict(metadata={"thresholds": json.dumps({"risk_controlled": {"0.1": {"threshold": 7}}})}), "risk_controlled"),
    (dict(metadata={"served_score": "magic"}), "served_score"),
])
def test_crafted_rehashed_artifacts_are_refused_at_load_naming_the_field(fitted, tmp_path, change, field):
    data, *_ = fitted
    crafted = _rehashed(data, **change)
    path = tmp_path / "crafted.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in crafted.tensors.items()}, str(path), metadata=crafted.metadata)
    with pytest.raises(ArtifactError, match=field.replace(".", r"\.")):
        load_artifact(path)


def test_stacked_and_ood_tensors_are_validated(fitted, tmp_path):
    data, *_ = fitted
    from safetensors.torch import save_file

    kinds = json.loads(data.metadata.get("stack_kinds", "[]"))
    assert "ood.precision" in data.tensors
    k = data.k
    for change, field in ((dict(tensors={"ood.precision": torch.ones(k + 1, k + 1, dtype=torch.float64)}), "ood.precision"),
                          (dict(tensors={"ood.mean": torch.zeros(k + 2, dtype=torch.float64)}), "ood.mean")):
        crafted = _rehashed(data, **change)
        path = tmp_path / f"{field}.safetensors"
        save_file({kk: v.contiguous() for kk, v in crafted.tensors.items()}, str(path), metadata=crafted.metadata)
        with pytest.raises(ArtifactError, match=field.replace(".", r"\.")):
            load_artifact(path)
    if kinds:
        name = f"stack.{kinds[0]}.calibrator.a"
        crafted = _rehashed(data, tensors={name: torch.tensor([-2.0], dtype=torch.float64)})
        path = tmp_path / "slope.safetensors"
        save_file({kk: v.contiguous() for kk, v in crafted.tensors.items()}, str(path), metadata=crafted.metadata)
        with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
            load_artifact(path)


def test_score_works_with_a_tokenizer_without_pad_token_and_leaves_it_unchanged(fitted, qwen_model):
    data, _, prompts, _ = fitted
    probe = ValueProbe(data)
    tok = build_tokenizer()
    tok.pad_token = None
    side = tok.padding_side
    results = probe.score(qwen_model, tok, prompts[:5], check_fingerprint=False)
    assert len(results) == 5 and all(0 <= r.probability <= 1 for r in results)
    assert tok.pad_token is None and tok.padding_side == side
    # the same numbers as a tokenizer that has one (padding is masked)
    again = probe.score(qwen_model, build_tokenizer(), prompts[:5], check_fingerprint=False)
    assert [round(a.probability, 5) for a in results] == [round(b.probability, 5) for b in again]


def test_fingerprint_cache_does_not_trust_a_reused_object_id(fitted, qwen_model, tmp_path):
    data, *_ = fitted
    probe = ValueProbe(data)
    good = conftest.as_served(build_tokenizer(), tmp_path / "good")
    probe.check_compatible(qwen_model, good)
    del good
    gc.collect()
    # Another tokenizer (a different vocabulary) may land at the same address: it must be checked, not trusted.
    other = conftest.as_served(build_tokenizer(), tmp_path / "other")
    other.add_tokens(["<extra_token_a>", "<extra_token_b>"])
    with pytest.raises(FingerprintMismatchError):
        probe.check_compatible(qwen_model, other)


def test_error_after_a_stream_started_ends_it_with_an_error_event(artifact_file, qwen_model, tokenizer, monkeypatch):
    settings = Settings(artifact=str(artifact_file))

    async def scenario(client, app):
        engine = app.state.sidecar.engine

        def broken_decode(ids):
            raise RuntimeError("decoder exploded")

        monkeypatch.setattr(engine, "decode", broken_decode)
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a?"}],
                                                            "max_tokens": 3, "stream": True})
        tgi = await client.post("/generate_stream", json={"inputs": "a?", "parameters": {"max_new_tokens": 3}})
        counted = (await client.get("/metrics", follow_redirects=True)).text
        return r, tgi, counted

    r, tgi, counted = run_app(settings, qwen_model, tokenizer, scenario)
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["type"] == "server_error" and "confidence" in json.loads(events[0])
    # TGI's in-band error carries the error's own TGI type, and both in-band errors are counted like any other
    tgi_events = [json.loads(line.removeprefix("data:")) for line in tgi.text.splitlines() if line.startswith("data:")]
    assert tgi_events[-1]["error_type"] == "generation" and "internal error" in tgi_events[-1]["error"]
    assert 'valueprobe_errors_total{type="server_error"} 2.0' in counted


def test_a_long_generation_does_not_hold_up_prompt_only_scoring(artifact_file, qwen_model, tokenizer):
    settings = Settings(artifact=str(artifact_file))

    async def scenario(client, app):
        loop = asyncio.get_running_loop()
        done = {}

        async def timed(name, coro):
            r = await coro
            done[name] = loop.time()
            return r

        gen = asyncio.create_task(timed("generate", client.post("/v1/completions", json={
            "prompt": "Tell me.", "max_tokens": 150})))  # the tiny model has a 256-token context
        await asyncio.sleep(0.1)  # the generation is running on its thread
        conf = await timed("confidence", client.post("/v1/confidence", json={"prompt": "Quick one?"}))
        long = await gen
        return conf, long, done

    conf, long, done = run_app(settings, qwen_model, tokenizer, scenario)
    assert conf.status_code == 200 and long.status_code == 200
    if long.json()["usage"]["completion_tokens"] >= 100:  # the generation really was long
        assert done["confidence"] < done["generate"]
