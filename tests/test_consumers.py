"""The shapes routers and guardrails call, against a real sidecar (uvicorn on loopback, tiny model): Hugging Face
text-classification as TEI's ``/predict`` takes it (what TEI clients and vLLM Semantic Router's HTTP classifier
send), the FMS guardrails detector API (contents and generation), and the NeMo Guardrails action in ``docs/``."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import httpx
import pytest
from conftest import Server, free_port


QUESTIONS = ["What is the capital of France?", "Which planet is largest?", "How many legs does a spider have?",
             "the lazy fox?"]


@pytest.fixture(scope="module")
def sidecar(assets):
    server = Server(assets).wait_ready()
    try:
        yield server
    finally:
        server.stop()


def served_probability(sidecar, question: str) -> float:
    r = httpx.post(sidecar.url + "/v1/confidence", json={"prompt": question}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["probability"]


def test_classify_answers_the_text_classification_shape_with_the_served_probability(sidecar):
    """TEI's request shape (``inputs``, ``truncate``, ``raw_scores``), one input -> one list of labels."""
    r = httpx.post(sidecar.url + "/classify", json={"inputs": QUESTIONS[0], "truncate": False, "raw_scores": False},
                   timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    want = served_probability(sidecar, QUESTIONS[0])
    labels = {o["label"]: o["score"] for o in out}
    assert set(labels) == {"confident", "not_confident"} and out[0]["score"] >= out[1]["score"]  # highest first
    assert labels["confident"] == pytest.approx(want, abs=1e-6)
    assert labels["not_confident"] == pytest.approx(1 - want, abs=1e-6)


def test_classify_batches_keep_order_and_concurrent_clients_get_their_own(sidecar):
    """TEI's batch form ``[[text], [text], ...]`` (a flat list of two strings is one pair in TEI)."""
    want = [served_probability(sidecar, q) for q in QUESTIONS]

    async def one(client, i):
        inputs = QUESTIONS[i % len(QUESTIONS):] + QUESTIONS[: i % len(QUESTIONS)]  # a rotation per client
        r = await client.post("/classify", json={"inputs": [[q] for q in inputs]})
        assert r.status_code == 200, r.text
        return inputs, r.json()

    async def main():
        async with httpx.AsyncClient(base_url=sidecar.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    for inputs, body in asyncio.run(main()):
        assert len(body) == len(inputs)
        for question, labels in zip(inputs, body):
            score = {x["label"]: x["score"] for x in labels}["confident"]
            assert score == pytest.approx(want[QUESTIONS.index(question)], abs=1e-5)


@pytest.mark.parametrize("body", [{"inputs": []}, {"inputs": "  "}, {}, {"inputs": [["x?"]] * 257}, {"inputs": 3},
                                  {"inputs": ["a?", "b?", "c?"]}, {"inputs": [["a?", "b?", "c?"]]}])
def test_classify_refuses_bad_input_with_a_reason_in_teis_error_shape(sidecar, body):
    r = httpx.post(sidecar.url + "/classify", json=body, timeout=60)
    assert r.status_code == 422 and r.json()["error_type"] == "Validation" and r.json()["error"], r.text


def test_fms_detector_contents_and_generation(sidecar):
    """Every content gets its detection (score = 1 - P) whatever its P: the orchestrator cuts by its own threshold;
    a threshold sent directly keeps the detections scored at or above it, as the orchestrator would."""
    want = [served_probability(sidecar, q) for q in QUESTIONS]
    headers = {"detector-id": "valueprobe-confidence"}
    everything = httpx.post(sidecar.url + "/api/v1/text/contents", headers=headers, timeout=60,
                            json={"contents": QUESTIONS}).json()
    assert len(everything) == len(QUESTIONS)
    for text, detections, p in zip(QUESTIONS, everything, want):
        (d,) = detections
        assert (d["start"], d["end"], d["text"]) == (0, len(text), text)
        assert d["detection_type"] == "confidence" and d["detection"] == "low_confidence"
        assert d["score"] == pytest.approx(1 - p, abs=1e-5) and d["metadata"]["probability"] == pytest.approx(p, abs=1e-5)
    cut = sorted(1 - p for p in want)[2] - 1e-9  # exactly the two least confident are kept
    some = httpx.post(sidecar.url + "/api/v1/text/contents", headers=headers, timeout=60,
                      json={"contents": QUESTIONS, "detector_params": {"threshold": cut}}).json()
    assert [bool(d) for d in some] == [1 - p >= cut for p in want] and sum(map(bool, some)) == 2
    generation = httpx.post(sidecar.url + "/api/v1/text/generation", headers=headers, timeout=60,
                            json={"prompt": QUESTIONS[0], "generated_text": "Paris"}).json()
    assert [g["detection"] for g in generation] == ["low_confidence"]
    assert generation[0]["score"] == pytest.approx(1 - want[0], abs=1e-5)
    assert generation[0]["metadata"]["scored"] == "prompt"  # this sidecar has no answer-level artifact
    assert httpx.post(sidecar.url + "/api/v1/text/generation", headers=headers, timeout=60,
                      json={"prompt": QUESTIONS[0], "generated_text": "Paris",
                            "detector_params": {"threshold": 1.01}}).json() == []
    assert httpx.post(sidecar.url + "/api/v1/text/contents", json={"contents": []}, headers=headers,
                      timeout=60).json() == []


def test_nemo_guardrails_action_from_the_docs_calls_the_sidecar(sidecar):
    path = Path(__file__).parents[1] / "docs" / "nemo_guardrails_action.py"
    spec = importlib.util.spec_from_file_location("nemo_guardrails_action", path)
    action = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(action)
    p = served_probability(sidecar, QUESTIONS[0])
    context = {"user_message": QUESTIONS[0]}

    async def main():
        return (await action.check_confidence(context, threshold=p - 1e-6, url=sidecar.url),
                await action.check_confidence(context, threshold=p + 1e-6, url=sidecar.url),
                await action.check_confidence(context, url=f"http://127.0.0.1:{free_port()}"),  # nothing listens
                await action.check_confidence(context, url=f"http://127.0.0.1:{free_port()}", on_error=True))

    assert asyncio.run(main()) == (True, False, False, True)


def test_the_threshold_comes_from_the_request_then_the_setting_then_the_policy_then_one_half():
    from types import SimpleNamespace

    from valueprobe.server.consumers import threshold
    from valueprobe.server.service import Policy

    def case(setting=None, abstain=None, escalate=None, can_escalate=False, asked=None):
        sidecar = SimpleNamespace(settings=SimpleNamespace(confident_above=setting))
        served = SimpleNamespace(policy=Policy(abstain, escalate, can_escalate))
        return threshold(sidecar, served, asked)

    assert case(asked=0.9, setting=0.7, abstain=0.3) == 0.9
    assert case(setting=0.7, abstain=0.3) == 0.7
    assert case(abstain=0.3, escalate=0.6, can_escalate=True) == 0.6
    assert case(abstain=0.3, escalate=0.6, can_escalate=False) == 0.3  # no target: escalation is not in force
    assert case() == 0.5


def test_classify_and_chat_agree_on_every_probability():
    """One policy answers every route: a text is 'confident' on /classify exactly when the chat route would answer
    it locally (the bug this replaced: /classify cut at escalate_below while chat abstained below abstain_below)."""
    import numpy as np

    from valueprobe.server.service import Policy

    for policy in (Policy(0.3, 0.5, True), Policy(0.5, None, True), Policy(None, 0.4, True), Policy(0.2, 0.6, False)):
        cut = policy.confident_below()
        for q in np.linspace(0, 1, 101):
            assert (q >= cut) == (policy.decide(float(q)) == "answer"), (policy, q)


def test_contradictory_thresholds_are_refused_at_start():
    """abstain_below 0.5 with escalate_below 0.3: abstention is checked first, so escalation could never apply."""
    from valueprobe.server.service import resolve_thresholds
    from valueprobe.server.settings import Settings

    with pytest.raises(ValueError, match="escalate_below 0.3 is at or below abstain_below 0.5"):
        resolve_thresholds(Settings(abstain_below=0.5, escalate_below=0.3), {})
    assert resolve_thresholds(Settings(abstain_below=0.3, escalate_below=0.5), {}) == (0.3, 0.5)
