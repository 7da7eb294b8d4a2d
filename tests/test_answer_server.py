"""confidence.answer end to end: a real sidecar (uvicorn on loopback) that finds the answer-level artifact beside
the served one (read at the answer's last token, and averaged over its tokens), driven by many clients at once
through the stock openai and text_generation clients, whole and streamed, with --flag-below, its header, and the
Prometheus histogram parsed back."""

from __future__ import annotations

import asyncio
import os
import shutil

import httpx
import pytest
from conftest import Server
from prometheus_client.parser import text_string_to_metric_families

from valueprobe.plugin import ArtifactData, ValueProbe, load_artifact, save_artifact

QUESTIONS = ["What is the capital of France?", "Which planet is largest?", "Who wrote the Iliad?",
             "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def server(assets, answer_artifact_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("answer-sidecar")
    os.symlink(assets / "model", folder / "model")
    shutil.copy(assets / "probe.safetensors", folder / "probe.safetensors")
    shutil.copy(answer_artifact_file, folder / "probe.answer.safetensors")  # found beside the served artifact
    s = Server(folder, flag_below=0.5)
    try:
        yield s.wait_ready(), ValueProbe.load(answer_artifact_file).artifact_id
    finally:
        s.stop()


@pytest.fixture(scope="module", params=["last", "mean"])
def any_read_server(request, assets, answer_artifact_file, tmp_path_factory):
    """The sidecar above, and one serving the same answer artifact marked ``answer_read: mean`` (the answer's tokens
    averaged in the decoding hook): ``(server, artifact id, answer artifact path)``."""
    if request.param == "last":
        sidecar, artifact_id = request.getfixturevalue("server")
        yield sidecar, artifact_id, answer_artifact_file
        return
    data = load_artifact(answer_artifact_file)
    folder = tmp_path_factory.mktemp("answer-sidecar-mean")
    os.symlink(assets / "model", folder / "model")
    shutil.copy(assets / "probe.safetensors", folder / "probe.safetensors")
    save_artifact(ArtifactData(dict(data.tensors), {**data.metadata, "answer_read": "mean"}),
                  folder / "probe.answer.safetensors")
    probe = ValueProbe.load(folder / "probe.answer.safetensors")
    assert probe.answer_read == "mean"
    s = Server(folder, flag_below=0.5)
    try:
        yield s.wait_ready(), probe.artifact_id, folder / "probe.answer.safetensors"
    finally:
        s.stop()


def _check(answer: dict, artifact_id: str, max_tokens: int):
    assert 0 <= answer["probability"] <= 1 and answer["artifact_id"] == artifact_id
    assert answer["flagged"] == (answer["probability"] < 0.5)
    comps = answer["components"]
    assert 0 < comps["answer_tokens"] <= max_tokens and comps["min_token_logprob"] <= comps["mean_token_logprob"] <= 0


def test_every_answer_shape_carries_confidence_in_the_answer_under_concurrency(any_read_server):
    from openai import AsyncOpenAI
    from text_generation import AsyncClient

    sidecar, artifact_id, _ = any_read_server
    openai = AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="unused")
    tgi = AsyncClient(sidecar.url, timeout=120)

    async def chat(q, n):
        raw = await openai.chat.completions.with_raw_response.create(
            model="x", messages=[{"role": "user", "content": q}], max_tokens=n)
        body = raw.parse()
        answer = body.model_extra["confidence"]["answer"]
        assert float(raw.headers["x-valueprobe-answer-confidence"]) == pytest.approx(answer["probability"], abs=1e-5)
        assert raw.headers["x-valueprobe-answer-flagged"] == str(answer["flagged"]).lower()
        return answer, n

    async def completion(q, n):
        body = await openai.completions.create(model="x", prompt=q, max_tokens=n)
        return body.model_extra["confidence"]["answer"], n

    async def stream(q, n):
        chunks = [c async for c in await openai.chat.completions.create(
            model="x", messages=[{"role": "user", "content": q}], max_tokens=n, stream=True)]
        assert chunks[0].model_extra["confidence"]["answer"] is None  # known only when the answer has ended
        return chunks[-1].model_extra["confidence"]["answer"], n

    async def tgi_generate(q, n):
        async with httpx.AsyncClient(timeout=120) as client:
            body = (await client.post(sidecar.url + "/generate", json={"inputs": q, "parameters": {"max_new_tokens": n}})).json()
        return body["confidence"]["answer"], n

    async def tgi_stream(q, n):
        last = None
        async for event in tgi.generate_stream(q, max_new_tokens=n):
            last = event
        assert last.details is not None
        async with httpx.AsyncClient(timeout=120) as client:  # the stock client drops extra fields: read the raw final event
            lines = [l async for l in (await client.send(client.build_request(
                "POST", sidecar.url + "/generate_stream", json={"inputs": q, "parameters": {"max_new_tokens": n}}),
                stream=True)).aiter_lines() if l.startswith("data:")]
        import json
        return json.loads(lines[-1][5:])["confidence"]["answer"], n

    async def main():
        calls = [f(q, 3 + i % 4) for i, q in enumerate(QUESTIONS) for f in (chat, completion, stream, tgi_generate)]
        calls.append(tgi_stream(QUESTIONS[0], 4))
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    for answer, n in results:
        _check(answer, artifact_id, n)
    text = httpx.get(sidecar.url + "/metrics").text
    counts = {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
              if f.name == "valueprobe_answer_confidence" for s in f.samples if s.name.endswith("_count")}
    assert sum(counts.values()) == len(results) + 1  # tgi_stream answered twice
    assert all(dict(k)["artifact"] == artifact_id for k in counts)


def test_confidence_in_an_answer_generated_elsewhere_is_the_prefill_readout(any_read_server, qwen_model, tokenizer,
                                                                           artifact_file):
    """Gateway mode's path: POST /v1/confidence with answers, many at once, equals the readout of one prefill of
    prompt + answer computed here; and an answer the sidecar generated scores as it was served (where its text
    re-tokenizes to the generated tokens)."""
    from test_answer_level import _prefill_readout

    sidecar, artifact_id, answer_artifact = any_read_server
    probe, answer_probe = ValueProbe.load(artifact_file), ValueProbe.load(answer_artifact)
    given = ["Paris", "Jupiter, the largest", "eight", "Homer"]

    async def main():
        async with httpx.AsyncClient(base_url=sidecar.url, timeout=120) as client:
            # one-token answers too: a single token's text re-tokenizes to itself, so some rows always compare below
            generated = await asyncio.gather(*(client.post("/v1/completions", json={"prompt": q, "max_tokens": n})
                                               for n in (4, 1) for q in QUESTIONS))
            texts = [g.json()["choices"][0]["text"] for g in generated]
            served = [g.json()["confidence"]["answer"] for g in generated]
            batch = await client.post("/v1/confidence", json=[{"prompt": q, "answer": t}
                                                              for q, t in zip(QUESTIONS * 2, texts)])
            bad = await client.post("/v1/confidence", json={"prompt": "x", "answer": "y" * 20000})
            mine = await client.post("/v1/confidence", json=[{"prompt": q, "answer": a} for q, a in zip(QUESTIONS, given)])
            return texts, served, batch, bad, mine

    texts, served, batch, bad, mine = asyncio.run(main())
    assert batch.status_code == 200 and mine.status_code == 200, batch.text + mine.text
    for q, a, r in zip(QUESTIONS, given, mine.json()["results"]):
        prompt_ids = probe.encode(tokenizer, [q])["input_ids"][0].tolist()
        expected, lps = _prefill_readout(qwen_model, answer_probe, prompt_ids,
                                         tokenizer(a, add_special_tokens=False)["input_ids"], ("open", 0), tokenizer)
        assert r["answer"]["probability"] == pytest.approx(expected.probability, abs=1e-4)
        assert r["answer"]["components"]["mean_token_logprob"] == pytest.approx(sum(lps) / len(lps), abs=1e-4)
    results = batch.json()["results"]
    assert len(results) == len(texts) == 2 * len(QUESTIONS)
    compared = 0
    for text, s, r in zip(texts, served, results):
        assert r["answer"]["artifact_id"] == artifact_id and 0 <= r["probability"] <= 1
        if r["answer"]["components"]["answer_tokens"] != s["components"]["answer_tokens"]:
            continue  # the text does not re-tokenize to the generated tokens (the tiny model's byte soup)
        assert r["answer"]["probability"] == pytest.approx(s["probability"], abs=1e-4)
        compared += 1
    assert compared >= 1, "no served answer re-tokenized to its own tokens: nothing was compared"
    assert bad.status_code == 400 and "answer is 20000 characters" in bad.text


def test_an_answer_without_an_answer_artifact_is_a_400_that_says_so(assets):
    s = Server(assets, answer_artifact="none")
    try:
        s.wait_ready()
        r = httpx.post(s.url + "/v1/confidence", json={"prompt": "What is 2+2?", "answer": "4"}, timeout=60)
        assert r.status_code == 400 and "answer-level artifact" in r.text
        chat = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                                 "max_tokens": 2}, timeout=60).json()
        assert chat["confidence"]["answer"] is None
    finally:
        s.stop()


def test_escalate_after_a_low_confidence_local_answer(server, tmp_path):
    """--escalate-after-below sends the question on after a local answer below the threshold and returns the
    target's answer (routed, the local text kept); with the target down, the local answer stands, flagged."""
    from conftest import free_port

    sidecar, artifact_id = server
    folder = tmp_path / "assets"
    folder.mkdir()
    for name in ("model", "probe.safetensors", "probe.answer.safetensors"):
        os.symlink(sidecar.assets / name, folder / name)
    always = Server(folder, escalate_url=sidecar.url, escalate_kind="tgi", escalate_after_below=1.0)
    down = Server(folder, escalate_url=f"http://127.0.0.1:{free_port()}", escalate_after_below=1.0,
                  upstream_timeout_s=2)
    by_rate = Server(folder, escalate_url=sidecar.url, escalate_after_rate=0.2)
    try:
        for s in (always, down, by_rate):
            s.wait_ready()

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                def chat(s, q):
                    return client.post(s.url + "/v1/chat/completions",
                                       json={"messages": [{"role": "user", "content": q}], "max_tokens": 4})
                return await asyncio.gather(*(chat(s, q) for s in (always, down) for q in QUESTIONS))

        replies = [r.json() for r in asyncio.run(main())]
        for r in replies[: len(QUESTIONS)]:
            conf = r["confidence"]
            assert conf["routed"] is True and conf["decision"] == "answer"
            assert conf["answer"]["local_text"] is not None and conf["answer"]["artifact_id"] == artifact_id
        for r in replies[len(QUESTIONS):]:
            conf = r["confidence"]
            assert conf["routed"] is False and conf["upstream_error"] and conf["answer"]["local_text"] is None
            assert r["choices"][0]["message"]["content"] is not None
        # the rate picks the answer artifact's fitted threshold: some answers go on, not all (tiny data: loose)
        rate = ValueProbe.load(sidecar.assets / "probe.answer.safetensors").thresholds["escalation"]["0.2"]
        assert 0 < rate < 1
    finally:
        for s in (always, down, by_rate):
            s.stop()


def test_the_generation_detector_scores_the_generated_text_where_an_answer_artifact_is_served(server):
    """FMS guardrails' /api/v1/text/generation: with an answer-level artifact the detection score is 1 - the
    confidence in the generated text (as /v1/confidence scores it), not the prompt's."""
    sidecar, _ = server
    body = {"prompt": QUESTIONS[0], "answer": "Paris"}
    want = httpx.post(sidecar.url + "/v1/confidence", json=body, timeout=60).json()
    got = httpx.post(sidecar.url + "/api/v1/text/generation", headers={"detector-id": "valueprobe"}, timeout=60,
                     json={"prompt": QUESTIONS[0], "generated_text": "Paris"}).json()
    assert got[0]["score"] == pytest.approx(1 - want["answer"]["probability"], abs=1e-5)
    assert got[0]["metadata"]["scored"] == "answer"
    assert want["answer"]["probability"] != pytest.approx(want["probability"], abs=1e-6)  # not the prompt's number


def test_a_failed_answer_readout_is_said_and_counted_not_hidden(artifact_file, answer_artifact_file, qwen_model,
                                                                tokenizer, monkeypatch):
    """With an answer-level artifact served, an answer whose readout failed carries answer_error (not a bare null,
    which reads as "no answer artifact") and counts in valueprobe_answer_readout_failures_total."""
    from conftest import run_app

    from valueprobe.plugin import ValueProbe
    from valueprobe.server.settings import Settings

    def broken(self, *args, **kwargs):
        raise RuntimeError("readout exploded")

    monkeypatch.setattr(ValueProbe, "readout_answer", broken)
    settings = Settings(artifact=str(artifact_file), answer_artifact=str(answer_artifact_file))

    async def scenario(client, app):
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a?"}],
                                                            "max_tokens": 3})
        return r, (await client.get("/metrics", follow_redirects=True)).text

    r, text = run_app(settings, qwen_model, tokenizer, scenario)
    conf = r.json()["confidence"]
    assert r.status_code == 200 and conf["answer"] is None and "readout failed" in conf["answer_error"]
    assert "valueprobe_answer_readout_failures_total 1.0" in text
