"""bench cascade: the accuracy-vs-share curve is exact (hand-computed), and the whole bench runs against two real
sidecars on loopback (the tiny model as both: plumbing, not a quality claim), resuming from its answers file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import Server

from valueprobe.bench.cascade import cascade_curve, grade, run, share_to_reach, summarize
from valueprobe.calibration.data import Question


def test_the_curve_escalates_the_lowest_scores_first():
    small = [1, 0, 0, 1]
    big = [1, 1, 0, 0]
    score = [0.9, 0.1, 0.5, 0.3]  # escalation order: q1 (0 -> 1), q3 (1 -> 0), q2 (0 -> 0), q0 (1 -> 1)
    curve = cascade_curve(small, big, score, shares=np.array([0, 0.25, 0.5, 0.75, 1.0]))
    assert curve.tolist() == [0.5, 0.75, 0.5, 0.5, 0.5]
    assert share_to_reach(curve, 0.75, shares=np.array([0, 0.25, 0.5, 0.75, 1.0])) == 0.25
    assert share_to_reach(curve, 0.9, shares=np.array([0, 0.25, 0.5, 0.75, 1.0])) is None


def test_grading_letters_and_aliases():
    mc = Question("c", "Q?", 1, ["x", "y", "z"], "choice", "t")
    assert grade(mc, " B. y") and not grade(mc, "A") and not grade(mc, "")
    assert grade(Question("o", "Q?", ["Paris"], None, "open", "t"), "It is Paris.")


QUESTIONS = [Question(f"c{i}", f"Which is letter {i}?", i % 3, ["x", "y", "z"], "choice", "toy-mc") for i in range(6)] + \
    [Question(f"o{i}", f"What is the capital of place {i}?", ["Paris"], None, "open", "toy-open") for i in range(6)]


@pytest.fixture(scope="module")
def two_sidecars(assets):
    small, big = Server(assets), Server(assets)
    try:
        yield small.wait_ready(), big.wait_ready()
    finally:
        small.stop()
        big.stop()


def test_the_bench_runs_against_two_real_sidecars_and_resumes(two_sidecars, tmp_path):
    small, big = two_sidecars
    out = tmp_path / "cascade"
    lines = []
    summary = run(QUESTIONS, small_url=small.url, big_url=big.url, out=out, max_tokens=3, concurrency=6,
                  echo=lines.append)
    records = [json.loads(x) for x in open(f"{out}.jsonl")]
    assert len(records) == 2 * len(QUESTIONS) and {r["model"] for r in records} == {"small", "big"}
    assert all(r["seconds"] > 0 and r["completion_tokens"] <= 3 for r in records)
    kinds = {r["id"]: r["kind"] for r in records}
    assert {kinds[f"c{i}"] for i in range(6)} == {"choice"}  # asked with choices: rendered as multiple choice
    assert set(summary["curves"]) >= {"prompt-only score", "random"}  # max-softmax where the artifact reads it
    for cur in summary["curves"].values():
        assert cur["accuracy"][0] == pytest.approx(summary["small_accuracy"])
        assert cur["accuracy"][-1] == pytest.approx(summary["big_accuracy"])
    assert (tmp_path / "cascade.png").exists() and "area under" in "\n".join(lines)
    again = run(QUESTIONS, small_url="http://127.0.0.1:9", big_url="http://127.0.0.1:9", out=out, max_tokens=3,
                concurrency=6, echo=lines.append)  # nothing left to ask: the dead URLs are never called
    assert again["curves"]["prompt-only score"] == summary["curves"]["prompt-only score"]
    assert summarize({r["id"]: r for r in records if r["model"] == "small"},
                     {r["id"]: r for r in records if r["model"] == "big"})["n"] == len(QUESTIONS)
