"""Gain routing through the real route, with both real models: what the decision costs and what it decides.

Two sidecars on loopback: the big model's (the escalation target) and the small model's with gain routing on
(``--escalate-gain-above`` or ``--escalate-gain-rate``, ``--escalate-url`` the big one). Two measurements, one run:

* **cost of the decision**: the big model's ``/v1/confidence`` (one prefill: what the router asks for) against its
  whole answer to the same question (``/v1/completions``, greedy), one question at a time, interleaved, ``reps``
  rounds; the median ratio of seconds with its range, and the prompt/answer tokens of both.
* **decisions end to end**: questions sent through the small sidecar's completions route, the stock way (a
  multiple-choice question with the ``choices`` extension); each response's ``confidence.route`` (both
  probabilities, the gain, the threshold, who answered) is recorded, checked against the big sidecar's own
  ``/v1/confidence`` for the same request, and, where offline predictions are given, against their ``route_gain``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import httpx


def _body(question, max_tokens: int) -> dict:
    body = {"prompt": question.question, "max_tokens": max_tokens, "temperature": 0}
    if question.kind == "choice":
        body["choices"] = list(question.choices)
    return body


def decision_cost(big_url: str, questions, *, max_tokens: int = 16, reps: int = 3) -> dict:
    """Seconds of the big model's prefill (``/v1/confidence``) against its whole answer, interleaved per question,
    ``reps`` rounds; the ratio is taken per round over the same questions."""
    ratios, prefill_s, answer_s, tokens = [], [], [], []
    with httpx.Client(base_url=big_url, timeout=1800) as client:
        for _ in range(reps):
            t_prefill = t_answer = 0.0
            for q in questions:
                body = _body(q, max_tokens)
                started = time.perf_counter()
                client.post("/v1/confidence", json={k: body[k] for k in ("prompt", "choices") if k in body}
                            ).raise_for_status()
                t_prefill += time.perf_counter() - started
                started = time.perf_counter()
                r = client.post("/v1/completions", json=body)
                r.raise_for_status()
                t_answer += time.perf_counter() - started
                usage = r.json()["usage"]
                tokens.append((usage["prompt_tokens"], usage["completion_tokens"]))
            prefill_s.append(t_prefill / len(questions))
            answer_s.append(t_answer / len(questions))
            ratios.append(t_prefill / t_answer)
    return {"questions": len(questions), "reps": reps, "prefill_seconds": statistics.median(prefill_s),
            "answer_seconds": statistics.median(answer_s), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios,
            "prompt_tokens": statistics.mean(t[0] for t in tokens),
            "completion_tokens": statistics.mean(t[1] for t in tokens)}


def routed_decisions(small_url: str, big_url: str, questions, *, max_tokens: int = 16,
                     predictions: dict | None = None) -> dict:
    """Each question through the small sidecar's gain route; its ``confidence.route`` against the big sidecar's own
    probability for the same request and (``predictions``: id -> record with ``route_gain``) the offline gain."""
    records = []
    with httpx.Client(timeout=1800) as client:
        for q in questions:
            body = _body(q, max_tokens)
            reply = client.post(f"{small_url}/v1/completions", json=body)
            reply.raise_for_status()
            conf = reply.json()["confidence"]
            route = conf["route"]
            own = client.post(f"{big_url}/v1/confidence",
                              json={k: body[k] for k in ("prompt", "choices") if k in body}).json()["probability"]
            rec = {"id": q.id, "kind": q.kind, "decision": conf["decision"], "routed": conf["routed"], **route,
                   "big_own_probability": own}
            if predictions and q.id in predictions and predictions[q.id].get("route_gain") is not None:
                rec["offline_route_gain"] = predictions[q.id]["route_gain"]
            records.append(rec)
    answered = [r for r in records if r["gain"] is not None]
    consistent = [r for r in answered if (r["answered_by"] == "escalation") == (r["gain"] > r["threshold"])]
    same_target = [r for r in answered if abs(r["p_target"] - r["big_own_probability"]) < 1e-3]
    offline = [r for r in answered if "offline_route_gain" in r]
    return {"n": len(records), "escalated": sum(r["answered_by"] == "escalation" for r in records),
            "target_unavailable": sum(r["reason"] == "target_unavailable" for r in records),
            "decision_matches_gain_and_threshold": len(consistent),
            "p_target_matches_big_sidecar": len(same_target),
            "offline_compared": len(offline),
            "offline_max_abs_difference": max((abs(r["gain"] - r["offline_route_gain"]) for r in offline), default=None),
            "records": records}


def report(cost: dict, decisions: dict) -> list[str]:
    lines = [f"Decision cost (the big model's prefill, /v1/confidence, against its whole answer to the same question, "
             f"{cost['questions']} questions x {cost['reps']} interleaved rounds): {cost['prefill_seconds']:.2f} s vs "
             f"{cost['answer_seconds']:.2f} s per question, ratio median **{100 * cost['ratio_median']:.1f}%** "
             f"(range {100 * cost['ratio_min']:.1f}–{100 * cost['ratio_max']:.1f}%); {cost['prompt_tokens']:.0f} "
             f"prompt tokens, {cost['completion_tokens']:.1f} answer tokens on average.",
             "",
             f"Decisions through the real route ({decisions['n']} questions sent to the small sidecar): "
             f"{decisions['escalated']} escalated, {decisions['target_unavailable']} with the target unavailable; "
             f"decision = (gain > threshold) on {decisions['decision_matches_gain_and_threshold']}; the target's "
             f"probability equal (1e-3) to the big sidecar's own on {decisions['p_target_matches_big_sidecar']}"]
    if decisions["offline_compared"]:
        lines[-1] += (f"; gain against the offline `route_gain` on {decisions['offline_compared']}: largest "
                      f"difference {decisions['offline_max_abs_difference']:.4f}")
    lines[-1] += "."
    return lines


def write(out: Path, cost: dict, decisions: dict) -> list[str]:
    lines = report(cost, decisions)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"cost": cost, "decisions": decisions}, indent=2))
    Path(f"{out}.md").write_text("## Gain routing through the real route\n\n" + "\n".join(lines) + "\n")
    return lines
