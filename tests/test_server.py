"""The sidecar end to end: real uvicorn processes on loopback, the stock openai and text_generation clients,
Prometheus text parsed back, escalation to a second valueprobe instance over TGI and over OpenAI, upstream down,
bad inputs, auth."""

from __future__ import annotations


import httpx
import pytest
from conftest import Server, free_port
from prometheus_client.parser import text_string_to_metric_families



@pytest.fixture(scope="module")
def servers(assets):
    dead_port = free_port()  # nothing listens here: an upstream that is down
    upstream = Server(assets)
    started = [upstream]
    try:
        tgi_escalating = Server(assets, escalate_url=upstream.url, escalate_kind="tgi", escalate_below=1.0)
        gateway = Server(assets, mode="gateway", upstream_url=upstream.url, upstream_kind="tgi",
                         escalate_url=upstream.url + "/v1", escalate_kind="openai", escalate_below=0.0)
        openai_escalating = Server(assets, mode="gateway", upstream_url=upstream.url, upstream_kind="openai",
                                   escalate_url=upstream.url, escalate_kind="openai", escalate_below=1.0)
        down = Server(assets, escalate_url=f"http://127.0.0.1:{dead_port}", escalate_below=1.0,
                      admin_token="s3cret", upstream_timeout_s=2)
        gateway_down = Server(assets, mode="gateway", upstream_url=f"http://127.0.0.1:{dead_port}", upstream_kind="tgi",
                              upstream_timeout_s=2)
        started += [tgi_escalating, gateway, openai_escalating, down, gateway_down]
        for s in started:
            s.wait_ready()
        yield {"upstream": upstream, "tgi_escalating": tgi_escalating, "gateway": gateway,
               "openai_escalating": openai_escalating, "down": down, "gateway_down": gateway_down}
    finally:
        for s in started:
            s.stop()


def test_openai_client_chat_and_completions(servers):
    from openai import OpenAI

    client = OpenAI(base_url=servers["upstream"].url + "/v1", api_key="unused")
    chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                          max_tokens=6)
    conf = chat.model_extra["confidence"]
    assert 0 <= conf["probability"] <= 1 and conf["decision"] == "answer" and conf["routed"] is False
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens <= 6
    raw = client.chat.completions.with_raw_response.create(
        model="x", messages=[{"role": "user", "content": "Which planet is largest?"}], max_tokens=3)
    assert raw.headers["x-valueprobe-decision"] == "answer"
    assert float(raw.headers["x-valueprobe-confidence"]) == pytest.approx(raw.parse().model_extra["confidence"]["probability"], abs=1e-5)
    comp = client.completions.create(model="x", prompt="What is the capital of France?", max_tokens=4)
    assert comp.model_extra["confidence"]["probability"] == pytest.approx(conf["probability"], abs=1e-5)
    # streaming: the confidence rides on the first chunk, before any token
    chunks = list(client.chat.completions.create(model="x", stream=True, max_tokens=5,
                                                 messages=[{"role": "user", "content": "What is the capital of France?"}]))
    assert chunks[0].model_extra["confidence"]["probability"] == pytest.approx(conf["probability"], abs=1e-5)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    direct = client.chat.completions.create(model="x", max_tokens=5,
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert streamed == direct.choices[0].message.content


def test_text_generation_client(servers):
    from text_generation import Client

    client = Client(servers["upstream"].url, timeout=60)
    response = client.generate("What is the capital of France?", max_new_tokens=5)
    assert isinstance(response.generated_text, str) and response.details.generated_tokens <= 5
    tokens = list(client.generate_stream("What is the capital of France?", max_new_tokens=5))
    assert tokens[-1].generated_text == response.generated_text
    body = httpx.post(servers["upstream"].url + "/generate", json={"inputs": "Paris?", "parameters": {"max_new_tokens": 3}},
                      timeout=60).json()
    assert "generated_text" in body and 0 <= body["confidence"]["probability"] <= 1


def test_escalation_over_tgi_and_openai(servers):
    from openai import OpenAI

    question = [{"role": "user", "content": "What is the capital of France?"}]
    for name, kind in (("tgi_escalating", "tgi"), ("openai_escalating", "openai")):
        chat = OpenAI(base_url=servers[name].url + "/v1", api_key="x").chat.completions.create(
            model="x", messages=question, max_tokens=5)
        conf = chat.model_extra["confidence"]
        assert conf["decision"] == "escalate" and conf["routed"] is True, (kind, conf)
        assert conf["upstream_error"] is None
    # gateway mode answers through the TGI upstream with prompt-only confidence; the escalation threshold is 0
    chat = OpenAI(base_url=servers["gateway"].url + "/v1", api_key="x").chat.completions.create(
        model="x", messages=question, max_tokens=5)
    assert chat.model_extra["confidence"]["decision"] == "answer" and chat.model_extra["confidence"]["routed"] is False
    local = OpenAI(base_url=servers["upstream"].url + "/v1", api_key="x").chat.completions.create(
        model="x", messages=question, max_tokens=5)
    assert chat.choices[0].message.content == local.choices[0].message.content  # same model behind the TGI upstream


def test_upstream_down_is_flagged_not_a_stack_trace(servers):
    r = httpx.post(servers["down"].url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 4})
    assert r.status_code == 200
    conf = r.json()["confidence"]
    assert conf["decision"] == "escalate" and conf["routed"] is False and "failed" in conf["upstream_error"]
    assert r.headers["x-valueprobe-upstream-error"] == "true"
    r = httpx.post(servers["gateway_down"].url + "/v1/completions", json={"prompt": "Capital of France?"}, timeout=60)
    assert r.status_code == 200 and r.json()["confidence"]["upstream_error"]
    assert r.json()["choices"][0]["text"].startswith("I am not confident")
    metrics = httpx.get(servers["down"].url + "/metrics").text
    assert 'valueprobe_escalations_total{result="failed"} 1.0' in metrics


def test_bad_inputs_get_4xx_with_reasons(servers):
    url = servers["upstream"].url
    cases = [
        ("/v1/chat/completions", {"messages": []}, 422),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 422),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400),
        ("/v1/completions", {"prompt": "   "}, 400),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400),
        ("/v1/confidence", {}, 400),
        ("/v1/confidence", [], 400),
        ("/v1/completions", {"prompt": "x" * 20000}, 400),
        ("/v1/completions", {"prompt": "word " * 300, "max_tokens": 8}, 400),  # beyond the tiny model's 256 positions
    ]
    for path, body, status in cases:
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["message"], r.text
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/generate", json={"inputs": ""})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"  # TGI's error shape
    assert httpx.get(url + "/nope").status_code == 404


def test_confidence_feedback_metrics_and_auth(servers):
    url = servers["down"].url
    single = httpx.post(url + "/v1/confidence", json={"prompt": "What is the capital of France?"}, timeout=30).json()
    batch = httpx.post(url + "/v1/confidence", timeout=30, json=[
        {"prompt": "What is the capital of France?"},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        {"prompt": "Which planet is largest?", "choices": ["Mars", "Jupiter"]}]).json()["results"]
    assert len(batch) == 3
    assert batch[0]["probability"] == pytest.approx(single["probability"], abs=1e-4)
    assert batch[1]["probability"] == pytest.approx(single["probability"], abs=1e-4)  # one user message = a question
    answered = httpx.post(url + "/v1/completions", json={"prompt": "Capital of France?"}, timeout=60).json()
    rid = answered["confidence"]["request_id"]
    assert httpx.post(url + "/v1/feedback", json={"request_id": rid, "correct": True}).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert httpx.post(url + "/v1/feedback", json={"request_id": rid, "correct": True}, headers={"Authorization": "Bearer no"}).status_code == 401
    ok = httpx.post(url + "/v1/feedback", json={"request_id": rid, "correct": True}, headers=auth)
    assert ok.status_code == 200 and ok.json()["window"]["n"] == 1
    assert httpx.post(url + "/v1/feedback", json={"request_id": "vp-unknown", "correct": False}, headers=auth).status_code == 404
    assert httpx.post(url + "/v1/feedback", json={"request_id": "other-replica", "correct": False, "probability": 0.9},
                      headers=auth).status_code == 200
    text = httpx.get(url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    conf = families["valueprobe_confidence"]
    counts = [s for s in conf.samples if s.name == "valueprobe_confidence_count"]
    assert sum(s.value for s in counts) >= 5 and {s.labels["decision"] for s in counts} <= {"answer", "abstain", "escalate"}
    feedback = {(s.labels["bin"], s.labels["outcome"]): s.value for s in families["valueprobe_feedback"].samples
                if s.name == "valueprobe_feedback_total"}
    assert sum(feedback.values()) == 2 and feedback[("0.9-1.0", "incorrect")] == 1
    assert "valueprobe_feedback_window_ece" in families and "valueprobe_queue_depth" in families
    info = [s for s in families["valueprobe_artifact_info"].samples][0]
    assert info.labels["artifact_id"] == single["artifact_id"]
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    card = httpx.get(url + "/v1/artifact").json()
    assert card["artifact_id"] == single["artifact_id"] and "eval_card" in card
    assert httpx.get(url + "/v1/models").json()["data"][0]["artifact_id"] == single["artifact_id"]


@pytest.mark.slow  # a wall-clock bench run end to end (its output is checked, not its timings)
def test_bench_serve_interleaves_repeated_runs_and_reports_each_ratio(assets):
    """`valueprobe bench serve` on two real sidecars: every repetition of each arm answers, and the printed ratio
    is the median of the per-run ratios it lists."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "valueprobe.cli", "bench", "serve", "--model", str(assets / "model"),
                          "--artifact", str(assets / "probe.safetensors"), "--clients", "3", "--seconds", "3",
                          "--repeats", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if "batched / one-at-a-time requests/s" in x)
    median, runs = re.search(r"median ([\d.]+)x \(per run ([\d., ]+);", line).groups()
    per_run = [float(x) for x in runs.split(",")]
    assert len(per_run) == 3 and all(x > 0 for x in per_run)
    assert float(median) == pytest.approx(sorted(per_run)[1], abs=0.006)


def test_summarize_repeats_pairs_runs_in_order():
    from valueprobe.bench.serve import summarize_repeats

    def run(req, tps):
        return {"requests": req, "errors": 0, "throughput": req / 10, "tokens_per_s": tps, "p50_ms": 1.0,
                "p95_ms": 2.0, "p99_ms": 3.0}

    s = summarize_repeats({"a": [run(20, 4), run(30, 6), run(10, 5)], "b": [run(10, 2), run(10, 4), run(10, 5)]})
    assert s["ratios"]["throughput"]["runs"] == pytest.approx([2.0, 3.0, 1.0])
    assert s["ratios"]["throughput"]["median"] == pytest.approx(2.0)
    assert s["ratios"]["tokens_per_s"]["runs"] == pytest.approx([2.0, 1.5, 1.0])
    assert (s["ratios"]["tokens_per_s"]["min"], s["ratios"]["tokens_per_s"]["max"]) == pytest.approx((1.0, 2.0))
    assert s["arms"]["a"]["requests"] == 20 and len(s["arms"]["a"]["runs"]) == 3


@pytest.mark.parametrize("broken", ["artifact", "model"])
def test_a_sidecar_that_cannot_load_exits_non_zero_with_the_reason(assets, tmp_path, broken):
    """Fail fast, as vLLM and TGI do: a supervisor sees the exit and restarts it; a person reads why on stderr."""

    if broken == "artifact":
        tampered = tmp_path / "tampered.safetensors"
        raw = bytearray((assets / "probe.safetensors").read_bytes())
        raw[-8:] = b"\x00" * 8  # a changed tensor byte: the content hash no longer matches
        tampered.write_bytes(bytes(raw))
        server = Server(assets, artifact=str(tampered))
    else:
        server = Server(assets, model=str(tmp_path / "no-such-model"))
    try:
        code = server.proc.wait(timeout=120)
    finally:
        server.stop()
    log = open(server.log.name).read()
    assert code == 1, log[-2000:]
    assert "could not load its model or artifact, so it stopped" in log
    assert ("ArtifactError" in log) if broken == "artifact" else ("no-such-model" in log)


def test_token_logprobs_are_served_in_every_answer_shape_and_refused_where_they_cannot_be(servers):
    """OpenAI chat (logprobs, top_logprobs), completions (logprobs=n) and TGI (details tokens, top_n_tokens) carry
    each answer token's log-probability under the model, many requests at once through the stock clients;
    combinations that cannot be served are a 400 that says why, never an empty field."""
    import asyncio

    import openai
    from openai import AsyncOpenAI, OpenAI
    from text_generation import Client

    url = servers["upstream"].url
    questions = ["What is the capital of France?", "Which planet is largest?", "Who wrote the Iliad?"]

    async def main():
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        chats = [client.chat.completions.create(model="x", messages=[{"role": "user", "content": q}], max_tokens=4,
                                                logprobs=True, top_logprobs=3) for q in questions]
        comps = [client.completions.create(model="x", prompt=q, max_tokens=4, logprobs=2) for q in questions]
        return await asyncio.gather(*chats, *comps)

    replies = asyncio.run(main())
    for chat in replies[: len(questions)]:
        content = chat.choices[0].logprobs.content
        assert len(content) == chat.usage.completion_tokens and "".join(t.token for t in content) == \
            chat.choices[0].message.content
        for t in content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 3
            tops = [a.logprob for a in t.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            assert t.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy: the chosen token is the most likely
    for comp in replies[len(questions):]:
        lp = comp.choices[0].logprobs
        assert "".join(lp.tokens) == comp.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
        assert all(len(alt) <= 2 for alt in lp.top_logprobs) and lp.text_offset[0] == 0
    tgi = Client(url, timeout=60).generate("What is the capital of France?", max_new_tokens=3, top_n_tokens=2)
    assert len(tgi.details.tokens) == tgi.details.generated_tokens
    assert all(t.logprob <= 0 for t in tgi.details.tokens) and len(tgi.details.top_tokens[0]) == 2
    assert Client(url, timeout=60).generate("Hi", max_new_tokens=2).details.tokens[0].logprob <= 0  # details alone

    sync = OpenAI(base_url=url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    # streams serve them too (one engine stream for both shapes): every token's in the final chunk, the same as
    # the whole response's for the same greedy request
    whole = sync.chat.completions.create(model="x", messages=messages, max_tokens=3, logprobs=True, top_logprobs=2)
    chunks = list(sync.chat.completions.create(model="x", messages=messages, max_tokens=3, logprobs=True,
                                               top_logprobs=2, stream=True))
    streamed = chunks[-1].choices[0].logprobs.content
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in whole.choices[0].logprobs.content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    comp_chunks = list(sync.completions.create(model="x", prompt=messages[0]["content"], max_tokens=3, logprobs=1,
                                               stream=True))
    assert len(comp_chunks[-1].choices[0].logprobs.tokens) == whole.usage.completion_tokens
    r = httpx.post(url + "/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2,
                                                                                "top_n_tokens": 2}})
    assert r.status_code == 400 and "TGI streams" in r.json()["error"]
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        sync.chat.completions.create(model="x", messages=messages, max_tokens=2, top_logprobs=2)
    gateway = OpenAI(base_url=servers["gateway"].url + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="gateway mode"):
        gateway.chat.completions.create(model="x", messages=messages, max_tokens=2, logprobs=True)
    assert sync.chat.completions.create(model="x", messages=messages, max_tokens=2, logprobs=False).choices[0].logprobs is None
    r = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2,
                                                                         "decoder_input_details": True}})
    assert r.status_code == 400 and "decoder_input_details" in r.json()["error"]  # TGI's error shape
    r = httpx.post(servers["gateway"].url + "/generate", timeout=60,
                   json={"inputs": "Hi", "parameters": {"max_new_tokens": 2, "details": True}})
    assert r.status_code == 200 and r.json()["details"]["tokens"] == []  # the stock client's default, in gateway mode


@pytest.mark.slow  # two sidecars started and driven in turn
def test_bench_serve_engines_runs_each_answer_setting(assets):
    """`bench serve --engine`: an arm per engine and answer-artifact setting, each answering under load."""
    from valueprobe.bench.serve import run_engines

    results = run_engines(str(assets / "model"), str(assets / "probe.safetensors"), engines=("transformers",),
                          clients=(2,), seconds=2.0, max_tokens=4, overhead_reps=0, answer_artifact=("on", "off"),
                          answers="short")
    for setting in ("on", "off"):
        row = results[f"transformers, answer artifact {setting}, 2 clients"]
        assert row["requests"] > 0 and row["errors"] == 0
    assert results["ratios"] == {}  # one engine: nothing to compare it with
