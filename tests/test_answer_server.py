"""confidence.answer end to end: a real sidecar (uvicorn on loopback) that finds the answer-level artifact beside
the served one, driven by many clients at once through the stock openai and text_generation clients, whole and
streamed, with --flag-below, its header, and the Prometheus histogram parsed back."""

from __future__ import annotations

import asyncio
import os
import shutil

import httpx
import pytest
from conftest import Server
from prometheus_client.parser import text_string_to_metric_families

from valueprobe.plugin import ValueProbe

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


def _check(answer: dict, artifact_id: str, max_tokens: int):
    assert 0 <= answer["probability"] <= 1 and answer["artifact_id"] == artifact_id
    assert answer["flagged"] == (answer["probability"] < 0.5)
    comps = answer["components"]
    assert 0 < comps["answer_tokens"] <= max_tokens and comps["min_token_logprob"] <= comps["mean_token_logprob"] <= 0


def test_every_answer_shape_carries_confidence_in_the_answer_under_concurrency(server):
    from openai import AsyncOpenAI
    from text_generation import AsyncClient

    sidecar, artifact_id = server
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
