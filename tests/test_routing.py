"""Routing by expected gain (issue 28): the curves are exact on hand-computed examples, random recovers half the gap
and the oracle the most, bootstrap intervals hold their point, bad input raises, the gain threshold escalates the
share asked for, the fitted router scores out of source, eval's route_gain merge, and bench cascade offline (Python
and CLI) writes its report from predictions or records files. No model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from valueprobe.bench.cascade import (
    analyze,
    cascade_curve,
    questions_from_records,
    run_offline,
    summarize,
)
from valueprobe.calibration.evaluate import add_route_gain
from valueprobe.calibration.routing import (
    SHARES,
    accuracy_at,
    apgr,
    curve_area,
    escalation_curve,
    expected_gain,
    gain_rates,
    gain_threshold_for_rate,
    loso_router,
    oracle_score,
    paired_bootstrap,
    random_band,
    router_features,
    share_to_reach,
)
from valueprobe.cli import app

GRID = np.array([0, 0.25, 0.5, 0.75, 1.0])
REPO = Path(__file__).resolve().parents[1]


# --- curves -----------------------------------------------------------------------------------------------------

def test_the_curve_escalates_the_highest_scores_first():
    small, big = [1, 0, 0, 1], [1, 1, 0, 0]
    score = [0.1, 0.9, 0.5, 0.7]  # order: q1 (0 -> 1), q3 (1 -> 0), q2 (0 -> 0), q0 (1 -> 1)
    curve = escalation_curve(small, big, score, shares=GRID)
    assert curve.tolist() == [0.5, 0.75, 0.5, 0.5, 0.5]
    assert curve_area(curve, GRID) == pytest.approx(0.25 * (0.625 + 0.625 + 0.5 + 0.5))
    assert accuracy_at(curve, 0.125, GRID) == pytest.approx(0.625)  # linear between grid points
    assert share_to_reach(curve, 0.75, GRID) == 0.25 and share_to_reach(curve, 0.9, GRID) is None
    # "lowest confidence first" is the same function on -confidence
    assert cascade_curve(small, big, -np.asarray(score), GRID).tolist() == curve.tolist()


def test_ties_are_escalated_in_input_order():
    small, big = [1, 0, 0, 1], [1, 1, 0, 0]
    curve = escalation_curve(small, big, [0.3, 0.3, 0.3, 0.3], shares=GRID)
    assert curve.tolist() == [0.5, 0.5, 0.75, 0.75, 0.5]  # q0 (1 -> 1), q1 (0 -> 1), q2, q3 (1 -> 0)


def test_apgr_by_hand():
    assert apgr(0.3, 0.2, 0.4) == pytest.approx(0.5)
    assert apgr(0.4, 0.2, 0.4) == pytest.approx(1.0)
    assert np.isnan(apgr(0.3, 0.3, 0.3))  # no gap to recover


def _synthetic(n=2000, seed=1, sources=("a", "b", "c")):
    """Calibrated probabilities: P_small and P_big drawn per question, outcomes drawn from them."""
    rng = np.random.default_rng(seed)
    p_small = rng.beta(2, 5, n)
    p_big = np.clip(p_small + rng.beta(2, 3, n) * (1 - p_small) * rng.random(n), 0, 1)
    small_ok = (rng.random(n) < p_small).astype(int)
    big_ok = (rng.random(n) < p_big).astype(int)
    src = np.array([sources[i % len(sources)] for i in range(n)])
    return p_small, p_big, small_ok, big_ok, src


def test_random_recovers_half_the_gap_and_the_oracle_the_most():
    p_small, p_big, s, b = _synthetic()[:4]
    sa, ba = s.mean(), b.mean()
    band = random_band(s, b, draws=200, seed=0)
    assert apgr(band["area_mean"], sa, ba) == pytest.approx(0.5, abs=0.02)
    assert band["area_low"] < band["area_mean"] < band["area_high"]
    assert band["curve_mean"][0] == pytest.approx(sa) and band["curve_mean"][-1] == pytest.approx(ba)
    oracle = curve_area(escalation_curve(s, b, oracle_score(s, b)))
    others = {"router": expected_gain(p_big, p_small), "small lowest first": -p_small, "big alone": p_big,
              "anti-oracle": -oracle_score(s, b)}
    areas = {k: curve_area(escalation_curve(s, b, v)) for k, v in others.items()}
    assert all(oracle >= a for a in areas.values()) and apgr(oracle, sa, ba) > 1
    # calibrated probabilities: the expected gain beats random here and beats the small model's confidence alone
    assert apgr(areas["router"], sa, ba) > 0.6 and areas["router"] > areas["small lowest first"]


def test_paired_bootstrap_interval_holds_its_point():
    p_small, p_big, s, b = _synthetic(n=400)[:4]
    gain = expected_gain(p_big, p_small)
    vs_random = paired_bootstrap(s, b, gain, None, n=300, seed=0)
    lo, hi = vs_random["ci95"]
    assert lo <= vs_random["point"] <= hi and lo > 0
    assert lo <= vs_random["ci90"][0] <= vs_random["ci90"][1] <= hi
    area = curve_area(escalation_curve(s, b, gain))
    assert vs_random["point"] == pytest.approx(area - (s.mean() + b.mean()) / 2)
    same = paired_bootstrap(s, b, gain, gain, n=50, seed=0)
    assert same["point"] == 0 and same["ci95"] == [0.0, 0.0]
    vs_small = paired_bootstrap(s, b, gain, -p_small, n=300, seed=0)
    assert vs_small["ci95"][0] <= vs_small["point"] <= vs_small["ci95"][1]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="questions"):
        escalation_curve([1, 0], [1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="score"):
        escalation_curve([1, 0], [1, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        escalation_curve([1, 0], [1, 0], [0.1, float("nan")])
    with pytest.raises(ValueError, match="0/1"):
        escalation_curve([1, 2], [1, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="shares"):
        escalation_curve([1, 0], [1, 0], [0.1, 0.2], shares=[0, 1.5])
    with pytest.raises(ValueError, match="no questions"):
        escalation_curve([], [], [])
    with pytest.raises(ValueError, match="shape"):
        expected_gain([0.5, 0.6], [0.5])
    with pytest.raises(ValueError, match="probabilities"):
        expected_gain([1.5], [0.5])
    with pytest.raises(ValueError, match="shape"):
        curve_area([0.1, 0.2], GRID)
    with pytest.raises(ValueError, match="rate"):
        gain_threshold_for_rate([0.1, 0.2], 1.5)
    with pytest.raises(ValueError, match="score_b"):
        paired_bootstrap([1, 0], [1, 1], [0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="two sources"):
        loso_router(np.zeros((4, 2)), [0, 1, 0, 1], ["a"] * 4)
    with pytest.raises(ValueError, match="integers"):
        loso_router(np.zeros((4, 2)), [0, 0.5, 0, 1], ["a", "a", "b", "b"])


def test_expected_gain_is_the_difference():
    assert expected_gain(0.7, 0.2) == pytest.approx(0.5) and isinstance(expected_gain(0.7, 0.2), float)
    assert expected_gain(np.array([0.1, 0.9]), np.array([0.3, 0.3])).tolist() == pytest.approx([-0.2, 0.6])


def test_gain_threshold_escalates_the_share_asked_for():
    gains = np.random.default_rng(0).normal(size=1000)
    for rate in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0):
        t = gain_threshold_for_rate(gains, rate)
        assert np.mean(gains > t) == pytest.approx(rate)
    rates = gain_rates(gains)
    assert list(rates) == ["0.1", "0.2", "0.3", "0.4", "0.5"]
    assert all(rates[a] > rates[b] for a, b in zip(list(rates), list(rates)[1:]))
    assert gain_threshold_for_rate([0.0, 1.0, 2.0, 3.0], 0.5) == pytest.approx(1.5)


def test_loso_router_scores_out_of_source():
    p_small, p_big, s, b, src = _synthetic(n=600)
    kinds = np.where(np.arange(600) % 2, "choice", "open")
    X = router_features(p_big, p_small, kinds, max_softmax_big=p_big, max_softmax_small=p_small)
    assert X.shape == (600, 6)
    score = loso_router(X, b - s, src)
    assert score.shape == (600,) and np.all(score >= -1) and np.all(score <= 1)
    assert np.corrcoef(score, expected_gain(p_big, p_small))[0, 1] > 0.5
    rescue = loso_router(X, (b == 1) & (s == 0), src)
    assert np.all((rescue >= 0) & (rescue <= 1))
    # a fold whose training target holds one class scores that class's value
    constant = loso_router(X[:6], [0, 0, 0, 0, 1, 1], ["a", "a", "b", "b", "c", "c"])
    assert constant[4:].tolist() == [0.0, 0.0]


# --- eval --route-to-artifact's merge ---------------------------------------------------------------------------

def test_route_gain_merges_by_id():
    records = [{"id": "q1", "probability": 0.2, "answer_probability": 0.1},
               {"id": "q2", "probability": 0.6, "answer_probability": 0.7}]
    big = {"q2": 0.9, "q1": 0.5, "other": 0.3}
    prompt = add_route_gain(records, big, answer_level=False)
    assert [r["route_gain"] for r in prompt] == pytest.approx([0.3, 0.3])
    answer = add_route_gain(records, big, answer_level=True)
    assert [r["route_gain"] for r in answer] == pytest.approx([0.4, 0.2])
    assert answer[0]["route_big_probability"] == 0.5 and answer[0]["route_small_field"] == "answer_probability"
    assert "route_gain" not in records[0]  # copies
    with pytest.raises(ValueError, match="no big-model probability"):
        add_route_gain(records, {"q1": 0.5}, answer_level=False)
    with pytest.raises(ValueError, match="answer_probability"):
        add_route_gain([{"id": "q1", "probability": 0.2}], big, answer_level=True)


# --- bench cascade offline --------------------------------------------------------------------------------------

def _predictions(n=90, seed=3):
    """Synthetic `eval --predictions` records of a small and a big model on the same questions."""
    p_small, p_big, s, b, src = _synthetic(n=n, seed=seed)
    small, big = [], []
    for i in range(n):
        kind = "choice" if i % 2 else "open"
        common = {"id": f"q{i}", "dataset": src[i], "kind": kind, "served_score": "stacked", "raw": 0.0,
                  "value_probability": 0.5, "neg. question length": -(40 + i % 7)}
        text = "B" if kind == "choice" else "an answer " * (1 + i % 3)
        small.append({**common, "label": int(s[i]), "prediction": text, "probability": float(p_small[i]),
                      "max-softmax": float(np.clip(p_small[i] + 0.1, 0, 1)), "answer": text,
                      "answer_probability": float(p_small[i]),
                      "neg. answer length": -(1 if kind == "choice" else 3 * (1 + i % 3))})
        big.append({**common, "label": int(b[i]), "prediction": text, "probability": float(p_big[i]),
                    "max-softmax": float(np.clip(p_big[i] - 0.1, 0, 1))})
    return small, big


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _strict_json(path):
    def no_nan(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(Path(path).read_text(), parse_constant=no_nan)


def test_offline_bench_writes_its_report(tmp_path):
    small, big = _predictions()
    sp, bp = _write_jsonl(tmp_path / "small.jsonl", small), _write_jsonl(tmp_path / "big.jsonl", big[::-1])
    lines = []
    summary = run_offline(out=tmp_path / "routing", small_predictions=sp, big_predictions=bp, echo=lines.append)
    for suffix in (".md", ".json", ".png", ".gain-rates.json"):
        assert (tmp_path / f"routing{suffix}").stat().st_size > 0
    assert not (tmp_path / "routing.jsonl").exists()
    written = _strict_json(tmp_path / "routing.json")
    assert written["n"] == 90
    assert set(written["curves"]) >= {"prompt-only score", "answer-level score", "max-softmax", "random", "big P alone",
                                      "gain router", "gain cascade", "gain max-softmax", "fitted router", "oracle"}
    for cur in summary["curves"].values():
        assert cur["accuracy"][0] == pytest.approx(summary["small_accuracy"])
        assert cur["accuracy"][-1] == pytest.approx(summary["big_accuracy"])
    assert set(_strict_json(tmp_path / "routing.gain-rates.json")) == {"0.1", "0.2", "0.3", "0.4", "0.5"}
    text = "\n".join(lines)
    assert "the router" in text and "APGR per source" in text and "Targets" in text and "Cost per question" in text
    assert set(summary["per_source"]) == {"a", "b", "c"}
    assert summary["fitted_vs_plain"]["fitted router"]["versus"] == "gain router"
    # choice answers cost 1 token, open ones were estimated from text at the small model's characters per token
    assert "estimated from their text" in " ".join(summary["notes"])
    cost = summary["cost"]
    assert cost["big_prompt_tokens"] == pytest.approx(np.mean([-r["neg. question length"] for r in big]))
    assert 0 < cost["decision_share_of_big_answer"] < 1
    router_50 = next(r for r in cost["rows"] if r["policy"].startswith("router") and r["share"] == 0.5)
    cascade_50 = next(r for r in cost["rows"] if r["policy"].startswith("cascade") and r["share"] == 0.5)
    assert router_50["small_tokens"] < cascade_50["small_tokens"]  # the router saves the escalated small answers


def test_live_records_with_equal_models_and_missing_signals(tmp_path):
    recs = {m: {f"q{i}": {"model": m, "id": f"q{i}", "dataset": "s1" if i < 4 else "s2", "kind": "choice",
                          "correct": bool(i % 2), "probability": 0.1 * (i + 1), "answer_probability": None,
                          "max_softmax": None, "prompt_tokens": 10, "completion_tokens": 1, "seconds": 0.5}
                for i in range(8)} for m in ("small", "big")}
    summary = summarize(recs["small"], recs["big"])
    assert "max-softmax" not in summary["curves"] and "gain cascade" not in summary["curves"]
    assert summary["curves"]["gain router"]["apgr"] is None  # no gap to recover
    assert summarize(recs["small"], recs["big"]) == summary  # deterministic, and comparable (no NaN)
    rows, _ = questions_from_records(recs["small"], recs["big"])
    assert analyze(rows, boot=20, draws=20)["n"] == 8


runner = CliRunner()


def test_cli_offline_from_predictions_and_records(tmp_path):
    small, big = _predictions(n=60, seed=5)
    sp, bp = _write_jsonl(tmp_path / "small.jsonl", small), _write_jsonl(tmp_path / "big.jsonl", big)
    out = tmp_path / "cli" / "routing"
    r = runner.invoke(app, ["bench", "cascade", "--small-predictions", str(sp), "--big-predictions", str(bp),
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "gain before decoding" in r.output and Path(f"{out}.png").exists() and Path(f"{out}.md").exists()
    records = tmp_path / "live.jsonl"
    _write_jsonl(records, [{"model": m, "id": x["id"], "dataset": x["dataset"], "kind": x["kind"],
                            "correct": bool(x["label"]), "probability": x["probability"],
                            "answer_probability": x.get("answer_probability"), "max_softmax": x["max-softmax"],
                            "prompt_tokens": 40, "completion_tokens": 2, "seconds": 1.0}
                           for m, xs in (("small", small), ("big", big)) for x in xs])
    r = runner.invoke(app, ["bench", "cascade", "--records", str(records), "--out", str(tmp_path / "from-records")])
    assert r.exit_code == 0, r.output
    assert _strict_json(tmp_path / "from-records.json")["cost"]["small_seconds"] == 1.0
    r = runner.invoke(app, ["bench", "cascade", "--small-predictions", str(sp), "--out", str(out)])
    assert r.exit_code == 2 and "both" in r.output
    r = runner.invoke(app, ["bench", "cascade", "--records", str(records), "--out", str(tmp_path / "live")])
    assert r.exit_code == 2 and "overwrite" in r.output


def test_the_committed_records_give_the_committed_areas():
    """The offline path on the committed 200-question records reproduces the live bench's committed areas."""
    stem = REPO / "weights" / "cascade" / "qwen2.5-coder-0.5b-to-1.5b"
    from valueprobe.bench.cascade import load_records

    recs = load_records(Path(f"{stem}.jsonl"))
    rows, _ = questions_from_records(recs["small"], recs["big"])
    summary = analyze(rows, boot=20, draws=20)
    committed = json.loads(Path(f"{stem}.json").read_text())["curves"]
    for key in ("prompt-only score", "max-softmax", "answer-level score"):
        assert summary["curves"][key]["area"] == pytest.approx(committed[key]["area"], abs=1e-9)
    assert summary["n"] == 200 and len(SHARES) == 101


def test_the_reader_takes_what_eval_writes(tmp_path):
    """Records made by eval's own writer (prediction_records) go through the offline bench unchanged."""
    from types import SimpleNamespace

    from valueprobe.bench.cascade import questions_from_predictions
    from valueprobe.calibration.evaluate import prediction_records

    n = 12
    rng = np.random.default_rng(0)

    def model_records(answers: bool):
        rows = [{"id": f"q{i}", "dataset": "a" if i < 6 else "b", "kind": "choice" if i % 2 else "open",
                 "label": int(rng.random() < 0.5), "prediction": "C" if i % 2 else "Paris, France",
                 "max_softmax": float(rng.random()), "answer_logprob": -1.0, "option_entropy": 0.5,
                 "question_tokens": 30 + i, "seq_logprob": None} for i in range(n)]
        pred = {"probability": rng.random(n), "value_raw": rng.normal(size=n), "value_probability": rng.random(n)}
        fs = SimpleNamespace(rows=rows)
        probe = SimpleNamespace(served_score="stacked")
        if not answers:
            return prediction_records(probe, fs, pred)
        arows = [{**r, "answer": r["prediction"], "answer_tokens": 1 if r["kind"] == "choice" else 4,
                  "answer_mean_logprob": -0.5, "answer_sum_logprob": -1.0, "answer_min_logprob": -2.0,
                  "prompt_probability": 0.4} for r in rows]
        apred = {"probability": rng.random(n), "value_raw": rng.normal(size=n)}
        return prediction_records(probe, fs, pred, SimpleNamespace(rows=arows), apred)

    small, big = model_records(True), model_records(False)
    rows, notes = questions_from_predictions(small, big)
    assert [r["big_prompt_tokens"] for r in rows] == [30 + i for i in range(n)]
    assert [r["small_completion_tokens"] for r in rows] == [1 if i % 2 else 4 for i in range(n)]
    # the big model's open answers: 13 characters at the small model's 13/4 characters per token
    assert [r["big_completion_tokens"] for r in rows] == [1 if i % 2 else 4 for i in range(n)]
    assert rows[0]["p_small_answer"] == small[0]["answer_probability"] and rows[0]["ms_big"] == big[0]["max-softmax"]
    summary = analyze(rows, boot=20, draws=20, notes=notes)
    assert {"gain router", "gain cascade", "fitted router"} <= set(summary["curves"])
