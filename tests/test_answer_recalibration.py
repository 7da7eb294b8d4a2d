"""The answer-level artifact recalibrates from feedback too: a label on a local answer refits the shadow of the
answer-level artifact that scored it (its probability is about the answer actually given), reported under
``answer`` in GET /v1/admin/calibration, promoted with ``?artifact=answer`` (or by ``auto``), recorded in the store
under the answer-level artifact's origin, served (confidence.answer), followed by another replica and restored at
a restart. The tiny model's probabilities carry no meaning: labels are drawn from the answers' rank so that the
live answer-level calibration is wrong by a known amount."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from scipy.special import expit, logit

from conftest import run_app
from test_recalibration import metric
from test_store import pg_admin  # noqa: F401 - the PostgreSQL server fixture (skips without its binaries)

from valueprobe.plugin import ValueProbe, save_artifact
from valueprobe.plugin.artifact import ArtifactData
from valueprobe.server.settings import Settings
from valueprobe.server.store import Store, promotions_t

AUTH = {"Authorization": "Bearer t"}


async def ask(client, i: int, n: int = 3) -> dict:
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"Question {i}?"}],
                                                          "max_tokens": n})
    assert r.status_code == 200, r.text
    body = r.json()
    return {**body["confidence"], "text": body["choices"][0]["message"]["content"]}


def ranked_labels(confidences: list[dict]) -> list[bool]:
    """The answer-level score ranks the answers (the 20% least confident wrong, one swap against separation) while
    the model is right far more often than the live answer-level calibration says."""
    rank = np.argsort(np.argsort([c["answer"]["probability"] for c in confidences], kind="stable"))
    labels = [bool(r >= len(rank) // 5) for r in rank]
    low, high = int(np.flatnonzero(rank == 0)[0]), int(np.flatnonzero(rank == len(rank) - 1)[0])
    labels[low], labels[high] = True, False
    return labels


async def label_all(client, confidences: list[dict]) -> list[dict]:
    replies = await asyncio.gather(*(client.post("/v1/feedback", headers=AUTH,
                                                 json={"request_id": c["request_id"], "correct": y})
                                     for c, y in zip(confidences, ranked_labels(confidences))))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    return [r.json()["recalibration"] for r in replies]


@pytest.fixture(scope="module")
def answer_artifact_file(tmp_path_factory, answer_fitted):
    """The tiny answer-level artifact (conftest's ``answer_fitted``) with a gentler value calibrator: fitted on
    planted labels its Platt is so steep that most answers read below 1e-6, where a fitted logit is clipped, and
    feedback could not tell them apart. Here the answers spread over (0.05, 0.95)."""
    data, _ = answer_fitted
    tensors = {**data.tensors, "calibrator.a": torch.tensor([0.5], dtype=torch.float64),
               "calibrator.b": torch.tensor([1.0], dtype=torch.float64)}
    path = tmp_path_factory.mktemp("gentle-answer-artifact") / "answer.safetensors"
    save_artifact(ArtifactData(tensors, dict(data.metadata)), path)
    return path


@pytest.fixture
def answer_settings(artifact_file, answer_artifact_file, tmp_path):
    return Settings(artifact=str(artifact_file), answer_artifact=str(answer_artifact_file), admin_token="t",
                    recalibration="shadow", recalibration_min_feedback=20, calibration_dir=str(tmp_path / "calibrations"),
                    default_max_new_tokens=3)


def test_labels_on_answers_refit_the_answer_level_calibration_promoted_served_and_restored(
        answer_settings, answer_artifact_file, qwen_model, tokenizer):
    """40 answers at once, a label each: the answer shadow is reported (answer:<slot> in the metrics), promoted
    with ?artifact=answer; the same questions are then answered with confidence.answer on calibration 1 (each
    probability moved by the promoted map), the prompt-level artifact untouched, and a reload of the prompt-level
    artifact keeps the promoted answer-level one; a restart on the same store serves
    calibration 1 of the answer-level artifact again, recalibration off the fitted one."""
    fitted = ValueProbe.load(answer_artifact_file)

    async def scenario(client, app):
        first = await asyncio.gather(*(ask(client, i) for i in range(40)))
        assert {c["answer"]["calibration_version"] for c in first} == {0}
        assert {c["answer"]["artifact_id"] for c in first} == {fitted.artifact_id}
        slot = fitted.calibration_slot(first[0]["answer"]["kind"])
        early = await client.post("/v1/admin/calibration/promote?artifact=answer", headers=AUTH)
        assert early.status_code == 409 and "answer-level artifact" in early.json()["error"]["message"]
        recal = await label_all(client, first)
        assert all(r["label"] == "new" and r["answer"] == {"used": True, "slot": slot} for r in recal), recal
        report = (await client.get("/v1/admin/calibration", headers=AUTH)).json()
        assert report["answer"][slot]["n"] == 40 and report["answer"][slot]["promotable"], str(report["answer"])
        assert report["answer_artifact"]["artifact_id"] == fitted.artifact_id
        assert report["answer_artifact"]["calibration_version"] == 0
        bad = await client.post("/v1/admin/calibration/promote?artifact=both", headers=AUTH)
        assert bad.status_code == 422
        promoted = await client.post("/v1/admin/calibration/promote?artifact=answer", headers=AUTH)
        assert promoted.status_code == 200, promoted.text
        body = promoted.json()
        assert body["artifact"] == "answer" and body["previous"] == fitted.artifact_id
        assert body["calibration_version"] == 1 and set(body["slots"]) == {slot}
        a, b = body["slots"][slot]["a"], body["slots"][slot]["b"]
        artifact = (await client.get("/v1/artifact")).json()
        assert artifact["calibration_version"] == 0  # the prompt-level artifact is another calibration
        assert artifact["answer_artifact"] == {"artifact_id": body["artifact_id"], "calibration_version": 1,
                                               "calibration_origin": fitted.calibration_origin[:12]}
        again = [await ask(client, i) for i in range(8)]  # one at a time: the batches of the first round differ
        assert {c["answer"]["artifact_id"] for c in again} == {body["artifact_id"]}
        assert {c["answer"]["calibration_version"] for c in again} == {1}
        assert {c["calibration_version"] for c in again} == {0}
        same = [(old["answer"]["probability"], new["answer"]["probability"]) for old, new in zip(first, again)
                if old["text"] == new["text"]]
        assert len(same) >= 4
        for old, new in same:  # the promoted Platt map on top of the live calibration, nothing else
            assert new == pytest.approx(float(expit(a * logit(old) + b)), abs=2e-3)
        assert np.mean([n for _, n in same]) > np.mean([o for o, _ in same])  # right more often than it said
        # a reload of the prompt-level artifact keeps the promoted answer-level one in the new snapshot
        reloaded = await client.post("/v1/admin/reload", headers=AUTH, json={"artifact": "probe.safetensors"})
        assert reloaded.status_code == 200, reloaded.text
        assert (await client.get("/v1/artifact")).json()["answer_artifact"]["calibration_version"] == 1
        assert (await ask(client, 0))["answer"]["artifact_id"] == body["artifact_id"]
        report = (await client.get("/v1/admin/calibration", headers=AUTH)).json()
        assert report["answer_artifact"]["calibration_version"] == 1
        assert report["answer_artifact"]["recalibration"]["trigger"] == "admin"
        text = (await client.get("/metrics")).text
        assert metric(text, "valueprobe_calibration_feedback", slot=f"answer:{slot}") == 40
        assert metric(text, "valueprobe_calibration_brier", slot=f"answer:{slot}", calibrator="shadow") is not None
        assert metric(text, "valueprobe_calibration_promotions_total", trigger="admin") == 1
        assert metric(text, "valueprobe_calibration_version") == 0
        return body, slot

    body, slot = run_app(answer_settings, qwen_model, tokenizer, scenario)
    written = ValueProbe.load(body["path"])
    assert written.artifact_id == body["artifact_id"] and written.calibration_origin == fitted.calibration_origin
    assert answer_artifact_file.exists()  # the fitted answer-level artifact is kept

    async def restarted(client, app):
        artifact = (await client.get("/v1/artifact")).json()
        answered = await ask(client, 0)
        report = (await client.get("/v1/admin/calibration", headers=AUTH)).json()
        return artifact, answered, report, (await client.get("/metrics")).text

    artifact, answered, report, text = run_app(answer_settings, qwen_model, tokenizer, restarted)
    assert artifact["answer_artifact"]["artifact_id"] == body["artifact_id"]
    assert answered["answer"]["calibration_version"] == 1 and answered["answer"]["artifact_id"] == body["artifact_id"]
    assert report["answer"][slot]["n"] == 40  # the labels are the store's
    assert metric(text, "valueprobe_calibration_feedback", slot=f"answer:{slot}") == 40
    off = run_app(answer_settings.model_copy(update={"recalibration": "off"}), qwen_model, tokenizer, restarted)
    assert off[0]["answer_artifact"]["calibration_version"] == 0 and off[1]["answer"]["calibration_version"] == 0


def test_auto_promotes_the_answer_level_calibration_when_due_and_better(answer_settings, qwen_model, tokenizer):
    """--recalibration auto: at the 20th label on local answers the answer-level shadow is compared and promoted
    (said in that label's response under recalibration.answer.promoted); answers not given by the local model
    (abstained) refit neither artifact."""
    settings = answer_settings.model_copy(update={"recalibration": "auto", "recalibration_every": 20})

    async def scenario(client, app):
        first = await asyncio.gather(*(ask(client, i) for i in range(40)))
        recal = await label_all(client, first)
        # labels go concurrently: the responses that carry the promotions may come in any order
        promoted = sorted((r["answer"]["promoted"] for r in recal if "promoted" in r["answer"]),
                          key=lambda p: p["calibration_version"])
        assert promoted and promoted[0]["artifact"] == "answer" and promoted[0]["calibration_version"] == 1
        assert sorted(p["calibration_version"] for p in promoted) == list(range(1, len(promoted) + 1))
        served = app.state.sidecar.served
        assert served.answer_probe.calibration_version == len(promoted)
        return (await client.get("/metrics")).text

    text = run_app(settings, qwen_model, tokenizer, scenario)
    assert metric(text, "valueprobe_calibration_promotions_total", trigger="auto") >= 1

    abstaining = answer_settings.model_copy(update={"abstain_below": 1.0})

    async def abstained(client, app):
        r = await ask(client, 1)
        assert r["decision"] == "abstain" and r["answer"] is None
        return (await client.post("/v1/feedback", headers=AUTH, json={"request_id": r["request_id"],
                                                                      "correct": True})).json()["recalibration"]

    recal = run_app(abstaining, qwen_model, tokenizer, abstained)
    assert not recal["used"] and "answer" not in recal  # no answer-level probability was read: nothing to refit


def run_replicas(settings: list[Settings], model, tokenizer, scenario, *, timeout: float = 60):
    """Run ``scenario([client, ...], [app, ...])`` against several sidecars in this process (one event loop), each
    with its own engine on the shared model. The scenario must not generate on two of them at once (the engines'
    forward hooks would see each other's passes)."""
    from valueprobe.server.app import create_app

    apps = [create_app(s, registry=CollectorRegistry(), model=model, tokenizer=tokenizer) for s in settings]

    async def main():
        from contextlib import AsyncExitStack

        async with AsyncExitStack() as stack:
            clients = []
            for app in apps:
                await stack.enter_async_context(app.router.lifespan_context(app))
                client = await stack.enter_async_context(httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://sidecar", timeout=timeout))
                for _ in range(200):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                clients.append(client)
            return await scenario(clients, apps)

    return asyncio.run(main())


def test_two_replicas_on_postgresql_promote_the_answer_level_calibration_once_and_both_serve_it(
        answer_settings, answer_artifact_file, qwen_model, tokenizer, tmp_path, request):
    """Two replicas on one PostgreSQL store: answers on A, their labels sent to B (its shadow reads them from the
    store), a promotion asked of both at once makes one version of the answer-level artifact (one 200, one 409
    naming the other replica) and both serve it; the store holds one promotion row under the answer-level
    artifact's origin."""
    from valueprobe.bench.pgserver import new_database

    url = new_database(request.getfixturevalue("pg_admin"))
    fitted = ValueProbe.load(answer_artifact_file)
    replicas = [answer_settings.model_copy(update={"store": url, "replica": name, "store_sync_s": 0.2,
                                                   "calibration_dir": str(tmp_path / name)}) for name in ("a", "b")]

    async def scenario(clients, apps):
        a, b = clients
        first = await asyncio.gather(*(ask(a, i) for i in range(40)))
        assert apps[0].state.sidecar.store.flush()  # A's rows (and their answer-level fields) are in the store
        recal = await label_all(b, first)
        assert all(r["answer"]["used"] for r in recal)
        report = (await b.get("/v1/admin/calibration", headers=AUTH)).json()
        slot = fitted.calibration_slot(first[0]["answer"]["kind"])
        assert report["answer"][slot]["n"] == 40 and report["answer"][slot]["promotable"]
        both = await asyncio.gather(*(c.post("/v1/admin/calibration/promote?artifact=answer", headers=AUTH)
                                      for c in clients))
        assert sorted(r.status_code for r in both) == [200, 409], [r.text for r in both]
        loser = next(r for r in both if r.status_code == 409)
        assert "another replica promoted calibration 1" in loser.json()["error"]["message"]
        won = next(r for r in both if r.status_code == 200).json()
        for client in clients:  # the loser serves the winner's version at once; both answer with it
            artifact = (await client.get("/v1/artifact")).json()
            assert artifact["answer_artifact"]["artifact_id"] == won["artifact_id"]
            answered = await ask(client, 0)
            assert answered["answer"]["calibration_version"] == 1 and answered["answer"]["artifact_id"] == won["artifact_id"]
        return won

    won = run_replicas(replicas, qwen_model, tokenizer, scenario)
    store = Store(url, replica="check")
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(promotions_t.select()).all()
        assert [(r.origin, r.version, r.artifact_id) for r in rows] == [(fitted.calibration_origin, 1,
                                                                         won["artifact_id"])]
        assert store.label_counts(fitted.calibration_origin, answer=True) == {
            fitted.calibration_slot("open"): 40}
    finally:
        store.close()
