"""Routing by expected gain, end to end: a small sidecar asks a second real sidecar (uvicorn on loopback) for its
probability through ``/v1/confidence`` and escalates on the gain, driven by the stock ``openai`` client with many
clients at once, whole and streamed; the target down; the cascade moment; metrics parsed back from Prometheus text.

Both sidecars serve the same tiny model and artifact, so every gain is 0 (the same prefill on both sides): a
threshold of -1 escalates everything and 0.5 keeps everything, which makes both branches exact. What the gain is
worth on real models is measured by ``valueprobe bench cascade`` (weights/cascade/), not here.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import Server, free_port
from prometheus_client.parser import text_string_to_metric_families

QUESTIONS = ["What is the capital of France?", "Which planet is largest?", "fox", "How many legs does a spider have?"]
CHOICE = {"prompt": "Which planet is largest?", "choices": ["Mars", "Jupiter", "Venus", "Earth"]}


@pytest.fixture(scope="module")
def sidecars(assets, answer_artifact_file, tmp_path_factory):
    answer_assets = tmp_path_factory.mktemp("answer-sidecar")
    shutil.copytree(assets / "model", answer_assets / "model")
    shutil.copy(assets / "probe.safetensors", answer_assets / "probe.safetensors")
    shutil.copy(answer_artifact_file, answer_assets / "probe.answer.safetensors")  # found beside the artifact
    target = Server(assets)
    started = [target]
    try:
        v1 = target.url + "/v1"
        servers = {
            "target": target,
            "escalate_all": Server(assets, escalate_url=v1, escalate_gain_above=-1.0, upstream_timeout_s=120),
            "keep_all": Server(assets, escalate_url=v1, escalate_gain_above=0.5),
            "down": Server(assets, escalate_url=f"http://127.0.0.1:{free_port()}/v1", escalate_gain_rate=0.3,
                           escalate_confidence_timeout_s=2),
            "cascade": Server(answer_assets, escalate_url=v1, escalate_gain_above=-1.0, escalate_gain_moment="after",
                              upstream_timeout_s=120),
        }
        started += [s for name, s in servers.items() if name != "target"]
        for s in started:
            s.wait_ready()
        yield servers
    finally:
        for s in started:
            s.stop()


def _metrics(server) -> dict:
    text = httpx.get(f"{server.url}/metrics", timeout=10, follow_redirects=True).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _route_decisions(server, moment: str, reason: str) -> float:
    return _metrics(server)[("valueprobe_route_decisions_total", (("moment", moment), ("reason", reason)))]


def test_before_decoding_escalates_on_the_gain_through_the_stock_openai_client(sidecars):
    """16 clients at once, chat and completions (multiple choice too): every answer is the target's own, each
    response carries both probabilities and the gain, and the decisions are counted by reason."""
    from openai import OpenAI

    small = OpenAI(base_url=sidecars["escalate_all"].url + "/v1", api_key="unused", max_retries=0)
    big = OpenAI(base_url=sidecars["target"].url + "/v1", api_key="unused", max_retries=0)
    before = _route_decisions(sidecars["escalate_all"], "before", "gain_above")

    def ask(i):
        q = QUESTIONS[i % len(QUESTIONS)]
        if i % 3 == 2:  # multiple choice: the target gets the question with its options (completions extension)
            r = small.completions.create(model="x", prompt=CHOICE["prompt"], max_tokens=4, temperature=0,
                                         extra_body={"choices": CHOICE["choices"]})
            return "choice", q, r.choices[0].text, r.model_extra["confidence"]
        r = small.chat.completions.create(model="x", messages=[{"role": "user", "content": q}], max_tokens=4,
                                          temperature=0)
        return "chat", q, r.choices[0].message.content, r.model_extra["confidence"]

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))
    for kind, q, text, conf in replies:
        route = conf["route"]
        assert conf["decision"] == "escalate" and conf["routed"] is True, conf
        assert route["moment"] == "before" and route["answered_by"] == "escalation" and route["reason"] == "gain_above"
        assert route["gain"] == pytest.approx(route["p_target"] - route["p_local"], abs=1e-9)
        assert abs(route["gain"]) < 1e-3  # the same model and artifact on both sides
        assert route["p_local"] == pytest.approx(conf["probability"], abs=1e-6)
        assert route["threshold"] == -1.0 and route["target_artifact_id"] == conf["artifact_id"]
        if kind == "chat":  # the target's own greedy answer to the request as the user sent it
            own = big.chat.completions.create(model="x", messages=[{"role": "user", "content": q}], max_tokens=4,
                                              temperature=0)
            assert text == own.choices[0].message.content
        else:
            own = big.completions.create(model="x", prompt=CHOICE["prompt"], max_tokens=4, temperature=0,
                                         extra_body={"choices": CHOICE["choices"]})
            assert text == own.choices[0].text
    assert _route_decisions(sidecars["escalate_all"], "before", "gain_above") - before == 16
    seconds = _metrics(sidecars["escalate_all"])[("valueprobe_route_target_confidence_seconds_count", ())]
    # one ask per distinct request: repeats (the same question from several clients) share the cached answer
    assert 1 <= seconds <= 16


def test_the_decision_is_known_before_the_first_token_of_a_stream(sidecars):
    from openai import OpenAI

    for name, routed in (("escalate_all", True), ("keep_all", False)):
        client = OpenAI(base_url=sidecars[name].url + "/v1", api_key="unused", max_retries=0)
        chunks = list(client.chat.completions.create(model="x", stream=True, max_tokens=4, temperature=0,
                                                     messages=[{"role": "user", "content": QUESTIONS[0]}]))
        head = chunks[0].model_extra["confidence"]
        assert head["routed"] is routed and head["route"]["answered_by"] == ("escalation" if routed else "local")
        assert chunks[0].choices[0].delta.content in ("", None)  # the head chunk, before any text
        assert chunks[-1].model_extra["confidence"]["route"] == head["route"]


def test_a_gain_below_the_threshold_is_answered_locally(sidecars):
    from openai import OpenAI

    client = OpenAI(base_url=sidecars["keep_all"].url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="x", messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=4, temperature=0)
    conf = raw.parse().model_extra["confidence"]
    assert conf["decision"] == "answer" and conf["routed"] is False
    assert conf["route"]["reason"] == "gain_below" and conf["route"]["answered_by"] == "local"
    assert raw.headers["x-valueprobe-route"] == "gain_below"
    assert float(raw.headers["x-valueprobe-route-gain"]) == pytest.approx(conf["route"]["gain"], abs=1e-6)


def test_a_target_that_is_down_leaves_the_question_here_flagged_and_counted(sidecars):
    """Never a stack trace: the local model answers, the route says why, and the metric counts it."""
    down = sidecars["down"]
    before = _route_decisions(down, "before", "target_unavailable")
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda q: httpx.post(f"{down.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": q}], "max_tokens": 3}), QUESTIONS * 2))
    for r in replies:
        assert r.status_code == 200, r.text
        conf = r.json()["confidence"]
        assert conf["decision"] == "answer" and conf["routed"] is False
        assert conf["route"]["reason"] == "target_unavailable" and conf["route"]["p_target"] is None
        assert "failed" in conf["route"]["target_error"]
    assert _route_decisions(down, "before", "target_unavailable") - before == len(replies)
    assert _metrics(down)[("valueprobe_upstream_errors_total", (("upstream", "route_target"),))] >= 1


def test_the_cascade_moment_replaces_the_local_answer_whole_and_flags_it_in_streams(sidecars):
    cascade = sidecars["cascade"]
    body = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 4, "temperature": 0}
    whole = httpx.post(f"{cascade.url}/v1/chat/completions", json=body, timeout=120).json()
    conf = whole["confidence"]
    assert conf["route"]["moment"] == "after" and conf["route"]["answered_by"] == "escalation"
    # the gain used the local answer's answer-level probability, and the local answer is kept beside the target's
    assert conf["route"]["p_local"] == pytest.approx(conf["answer"]["probability"], abs=1e-9)
    assert conf["routed"] is True and conf["answer"]["local_text"] is not None
    with httpx.stream("POST", f"{cascade.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    import json

    final = json.loads(lines[-1][len("data: "):])["confidence"]
    assert final["route"]["reason"] == "not_replaced_in_stream" and final["routed"] is False


def test_gain_routing_settings_are_checked_at_start():
    from valueprobe.server.settings import Settings

    with pytest.raises(ValueError, match="not both"):
        Settings(escalate_url="http://x/v1", escalate_gain_above=0.1, escalate_gain_rate=0.3)
    with pytest.raises(ValueError, match="needs escalate_url"):
        Settings(escalate_gain_above=0.1)
    with pytest.raises(ValueError, match="drop escalate_below"):
        Settings(escalate_url="http://x/v1", escalate_gain_above=0.1, escalate_below=0.4)


def test_the_rate_threshold_follows_the_traffic_after_a_seed_from_the_fitted_table():
    import numpy as np

    from valueprobe.server.routing import RATE_MIN_SEEN, GainRouter, confidence_url

    assert confidence_url("http://big:8001/v1") == "http://big:8001/v1/confidence"
    assert confidence_url("http://big:8001/") == "http://big:8001/v1/confidence"
    router = GainRouter("http://unused", rate=0.3, table={0.2: 0.15, 0.3: 0.07})
    assert router.threshold() == 0.07  # the table, until this replica has seen enough of its own traffic
    gains = np.clip(np.random.default_rng(0).normal(0.0, 0.2, 2000), -0.5, 0.5)
    escalated = [router.decide(0.5, (0.5 + g, "big", None), moment="before").answered_by == "escalation"
                 for g in gains]
    assert len(router._gains) >= RATE_MIN_SEEN
    assert np.mean(escalated[200:]) == pytest.approx(0.3, abs=0.05)  # the share asked for
    down = router.decide(0.5, (None, None, "refused"), moment="before")
    assert down.answered_by == "local" and down.reason == "target_unavailable"


def test_the_live_route_check_reads_the_real_route(sidecars, tmp_path):
    """bench route-check's two measurements against real sidecars: every decision matches the gain and threshold
    it reports, the target's probability is the big sidecar's own, and the cost ratio is a ratio of real timings."""
    from valueprobe.bench.route_live import decision_cost, routed_decisions, write
    from valueprobe.calibration.data import Question

    questions = [Question("q0", QUESTIONS[0], ["Paris"], None, "open"),
                 Question("q1", CHOICE["prompt"], 1, CHOICE["choices"], "choice")]
    big, small = sidecars["target"].url, sidecars["escalate_all"].url
    cost = decision_cost(big, questions, max_tokens=3, reps=2)
    assert cost["reps"] == 2 and len(cost["ratios"]) == 2 and all(r > 0 for r in cost["ratios"])
    decisions = routed_decisions(small, big, questions, max_tokens=3, predictions={"q0": {"route_gain": 0.0}})
    assert decisions["n"] == 2 and decisions["escalated"] == 2
    assert decisions["decision_matches_gain_and_threshold"] == 2 and decisions["p_target_matches_big_sidecar"] == 2
    assert decisions["offline_compared"] == 1 and decisions["offline_max_abs_difference"] < 1e-3
    lines = write(tmp_path / "route-live", cost, decisions)
    assert "ratio median" in lines[0] and (tmp_path / "route-live.json").exists()
