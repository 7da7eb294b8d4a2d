"""bench recalibrate against a real sidecar on loopback (the tiny model: plumbing, not a quality claim). The grader
here says "correct" for 85% of questions, whatever the tiny model answered, so the fitted calibration is wrong by a
known amount and the sidecar must promote; the same questions asked again after the promotions must map back to
the probability the fitted artifact served them in the first window."""

from __future__ import annotations

import json
import time
import zlib

import httpx
import pytest
from conftest import Server

from valueprobe.bench.recalibrate import calibration_numbers, fitted_probability, run
from valueprobe.calibration.data import Question


def test_fitted_probability_undoes_the_promoted_maps():
    assert fitted_probability(0.3, "value", {}) == pytest.approx(0.3)
    from scipy.special import expit, logit

    served = float(expit(2.0 * logit(0.3) + 0.7))
    assert fitted_probability(served, "open", {"open": [2.0, 0.7]}) == pytest.approx(0.3)
    assert calibration_numbers([1, 0, 1, 1], [0.9, 0.2, 0.6, 0.8])["accuracy"] == 0.75


@pytest.fixture(scope="module")
def sidecar(assets, tmp_path_factory):
    server = Server(assets, admin_token="t", recalibration="auto", recalibration_min_feedback=20,
                    recalibration_every=20, calibration_dir=tmp_path_factory.mktemp("calibrations"))
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_the_bench_replays_windows_and_promotes(sidecar, tmp_path):
    asked = [Question(f"o{i}", f"What is the name of river {i}?", ["Nile"], None, "open", "toy-open") for i in range(60)]
    questions = asked + asked[:20]  # the first window again, after the promotions
    out = tmp_path / "recal"
    lines = []
    summary = run(questions, url=sidecar.url, admin_token="t", out=out, window=20, max_tokens=2, concurrency=8,
                  sources=["toy-open"], echo=lines.append,
                  grader=lambda q, text: zlib.crc32(q.id.encode()) % 100 < 85)
    records = [json.loads(x) for x in open(f"{out}.jsonl")]
    assert len(records) == 80 and [r["window"] for r in records[::20]] == [0, 1, 2, 3]
    assert {r["calibration_version"] for r in records if r["window"] == 0} == {0}
    assert summary["first_promotion_window"] is not None and records[-1]["calibration_version"] >= 1
    first = {r["id"]: r for r in records if r["window"] == 0}
    for r in (r for r in records if r["window"] == 3):  # asked again under a promoted calibration
        assert r["probability"] != pytest.approx(first[r["id"]]["probability"], abs=1e-3)
        assert r["p0"] == pytest.approx(first[r["id"]]["probability"], abs=1e-4)
    last = summary["windows"][-1]
    assert last["served"]["brier"] < last["fitted"]["brier"]  # the promoted calibration learned the 85%
    assert (tmp_path / "recal.png").exists() and "ECE fitted -> served" in (tmp_path / "recal.md").read_text()


def test_the_bench_resumes_and_runs_against_two_replicas(assets, tmp_path):
    """Two replicas sharing one store: questions go to both in turn and each label to the other one; an
    interrupted run (here: one that stopped after two windows) resumes from <out>.jsonl and the store, replaying
    only the windows it had not finished."""
    store = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    common = dict(admin_token="t", recalibration="auto", recalibration_min_feedback=20, recalibration_every=20,
                  store=store, store_sync_s=0.5, calibration_dir=tmp_path / "calibrations")
    servers = [Server(assets, replica=f"r{i}", **common) for i in range(2)]
    try:
        urls = [s.wait_ready().url for s in servers]
        asked = [Question(f"o{i}", f"What is the name of river {i}?", ["Nile"], None, "open", "toy-open")
                 for i in range(60)]
        out = tmp_path / "recal"
        kw = dict(url=urls, admin_token="t", out=out, window=20, max_tokens=2, concurrency=8, sources=["toy-open"],
                  echo=lambda *_: None, grader=lambda q, text: zlib.crc32(q.id.encode()) % 100 < 85)
        run(asked[:40], **kw)  # "interrupted" after two windows
        first = [json.loads(x) for x in open(f"{out}.jsonl")]
        assert len(first) == 40 and {r["served_by"] for r in first} == {0, 1}
        summary = run(asked, resume=True, **kw)
        records = [json.loads(x) for x in open(f"{out}.jsonl")]
        assert len(records) == 60 and records[:40] == first  # the first two windows were not asked again
        assert [r["window"] for r in summary["windows"]] == [0, 1, 2] and summary["replicas"] == 2
        assert summary["first_promotion_window"] is not None
        versions = {httpx.get(f"{u}/v1/artifact").json()["calibration_version"] for u in urls}
        deadline = time.time() + 10
        while len(versions) > 1 and time.time() < deadline:  # the replicas agree within store_sync_s
            time.sleep(0.2)
            versions = {httpx.get(f"{u}/v1/artifact").json()["calibration_version"] for u in urls}
        assert len(versions) == 1
    finally:
        for s in servers:
            s.stop()
