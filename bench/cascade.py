"""Routing between two real models, measured: a small model answers, a bigger one takes what is escalated.

Two ways in. Live (resumable): both models are served by valueprobe sidecars on loopback (started here, or given
by URL); every held-out question (the small artifact's test split, both kinds) is asked of each sidecar once through
``/v1/completions`` (multiple choice with valueprobe's ``choices`` extension, so it is rendered and calibrated as
such), greedy, many at once; each answer is graded and kept with the model's confidences (prompt-only, answer-level
where its sidecar has that artifact, the max-softmax component), its tokens and its wall time, appended to
``<out>.jsonl`` as it comes (a rerun resumes). Offline (no model): the records of two ``valueprobe eval
--predictions`` runs (small, big) on the same questions, or a live run's records file.

The curves are then exact (:mod:`valueprobe.calibration.routing`): escalating the share ``s`` of questions with the
highest score gives the accuracy ``mean(big correct if escalated else small correct)``, for ``s`` from 0 to 1, per
ordering: the small model's confidences (lowest first), random (a band of draws), the big model's prompt-only P, the
expected gain ``P_big - P_small`` before decoding (the router: prompt-only P_small) and after the small answer (the
cascade: answer-level P_small), the same difference on raw max-softmax, a fitted router (leave-one-source-out) and
the oracle; with areas, APGR, paired bootstrap intervals, APGR per source, the tokens (and seconds where measured)
per question of the router and the cascade, and the issue's targets. A last live check sends a few questions
through the small sidecar's real escalation route (``--escalate-url`` the big sidecar over the OpenAI protocol) and
compares the routed answers with the big model's own.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import httpx
import numpy as np

from valueprobe.calibration.routing import SHARES, escalation_curve, share_to_reach  # noqa: F401 (re-exported)


def cascade_curve(small_ok, big_ok, score, shares=SHARES) -> np.ndarray:
    """Accuracy when the ``s`` share of questions with the LOWEST ``score`` goes to the big model (ties in input
    order): :func:`valueprobe.calibration.routing.escalation_curve` on ``-score``."""
    return escalation_curve(small_ok, big_ok, -np.asarray(score, dtype=float), shares)


def held_out_per_kind(questions, per_kind: int, *, seed: int) -> list:
    """A seeded sample of ``per_kind`` questions of each kind (multiple choice first, then open), the whole kind
    where it has fewer."""
    import random

    rng = random.Random(seed)
    out = []
    for kind in ("choice", "open"):
        pool = [q for q in questions if q.kind == kind]
        out += rng.sample(pool, min(per_kind, len(pool)))
    return out


def grade(question, text: str, letters: str = "ABCDEFGHIJ") -> bool:
    from valueprobe.calibration.data import grade_numeric, grade_open

    if question.kind == "choice":
        first = next((c for c in text.strip() if c.isalnum()), "")
        return first.upper() == letters[question.answer]
    if question.kind == "numeric":
        return grade_numeric(text, question.answer)
    return grade_open(text, question.answer)


def _request(question, max_tokens: int) -> dict:
    body = {"prompt": question.question, "max_tokens": max_tokens, "temperature": 0}
    if question.kind == "choice":
        body["choices"] = list(question.choices)
    return body


async def ask_all(url: str, questions, *, max_tokens: int, concurrency: int, done: dict, sink, tag: str,
                  progress=None) -> None:
    """Ask every question not in ``done`` of the sidecar at ``url``, ``concurrency`` at a time; each record is
    passed to ``sink`` as it comes."""
    todo = [q for q in questions if q.id not in done]
    gate = asyncio.Semaphore(concurrency)

    async def one(client, q):
        async with gate:
            started = time.perf_counter()
            r = await client.post("/v1/completions", json=_request(q, max_tokens))
            seconds = time.perf_counter() - started
        r.raise_for_status()
        body = r.json()
        conf = body["confidence"]
        text = body["choices"][0]["text"]
        rec = {"model": tag, "id": q.id, "dataset": q.dataset, "kind": q.kind, "text": text, "correct": grade(q, text),
               "probability": conf["probability"], "answer_probability": (conf.get("answer") or {}).get("probability"),
               "max_softmax": (conf.get("components") or {}).get("max_softmax"),
               "prompt_tokens": body["usage"]["prompt_tokens"], "completion_tokens": body["usage"]["completion_tokens"],
               "seconds": seconds}
        sink(rec)
        if progress:
            progress(tag)

    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        await asyncio.gather(*(one(client, q) for q in todo))


# --- one table of questions from either source ------------------------------------------------------------------

def questions_from_records(small: dict, big: dict) -> tuple[list[dict], list[str]]:
    """Per-question rows from the live mode's records (``id -> record`` per model, as :func:`load_records`
    reads them): outcomes, both models' prompt-only probabilities and max-softmax, the small model's answer-level
    probability, tokens and seconds as measured. Returns ``(rows, notes)``; questions answered by one model only
    are left out."""
    rows = []
    for i in small:
        if i not in big:
            continue
        s, b = small[i], big[i]
        rows.append({"id": i, "dataset": s["dataset"], "kind": s["kind"], "small_ok": bool(s["correct"]),
                     "big_ok": bool(b["correct"]), "p_small": s["probability"],
                     "p_small_answer": s.get("answer_probability"), "ms_small": s.get("max_softmax"),
                     "p_big": b["probability"], "ms_big": b.get("max_softmax"),
                     "small_prompt_tokens": s["prompt_tokens"], "small_completion_tokens": s["completion_tokens"],
                     "big_prompt_tokens": b["prompt_tokens"], "big_completion_tokens": b["completion_tokens"],
                     "small_seconds": s.get("seconds"), "big_seconds": b.get("seconds")})
    notes = ["Tokens as each sidecar's usage reported them; seconds per request as measured under the bench's "
             "concurrency (answers only: the decision prefills were not timed separately)."]
    return rows, notes


def load_predictions(path) -> list[dict]:
    """The records of ``valueprobe eval --predictions`` (one JSON object per line)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _answer_tokens(rec: dict) -> int | None:
    n = rec.get("neg. answer length")
    return None if n is None else int(-n)


def questions_from_predictions(small: list[dict], big: list[dict]) -> tuple[list[dict], list[str]]:
    """Per-question rows from two ``eval --predictions`` files (small model, big model), joined by id.

    Prompt tokens: each model's own (``-neg. question length``: the rendered prompt's tokens). Completion tokens:
    a record's ``completion_tokens`` where it has one; else the answer pass's count (``-neg. answer length``, the
    small model's records with ``--answer-artifact``); else 1 for multiple choice (the letter) and, for open
    questions, the answer text's characters over the characters per token measured on the small model's own open
    answers (4.0 where none are known), rounded up, at least 1. No seconds are known. Returns ``(rows, notes)``."""
    big_by_id = {r["id"]: r for r in big}
    pairs = [(s, big_by_id[s["id"]]) for s in small if s["id"] in big_by_id]
    if not pairs:
        raise ValueError("the two predictions files share no question id")
    measured = [(len(s.get("answer") or s.get("prediction") or ""), _answer_tokens(s)) for s, _ in pairs
                if s["kind"] != "choice" and _answer_tokens(s)]
    chars_per_token = (sum(c for c, _ in measured) / sum(t for _, t in measured)) if measured else 4.0
    used = {"record": 0, "answer pass": 0, "choice letter": 0, "estimated": 0}

    def completion(rec):
        if rec.get("completion_tokens") is not None:
            used["record"] += 1
            return int(rec["completion_tokens"])
        if _answer_tokens(rec) is not None:
            used["answer pass"] += 1
            return max(1, _answer_tokens(rec))
        if rec["kind"] == "choice":
            used["choice letter"] += 1
            return 1
        used["estimated"] += 1
        return max(1, math.ceil(len(rec.get("prediction") or "") / chars_per_token))

    rows = []
    for s, b in pairs:
        for rec in (s, b):
            if rec.get("neg. question length") is None:
                raise ValueError(f"record {rec['id']} has no prompt length ('neg. question length')")
        rows.append({"id": s["id"], "dataset": s["dataset"], "kind": s["kind"], "small_ok": bool(s["label"]),
                     "big_ok": bool(b["label"]), "p_small": s["probability"],
                     "p_small_answer": s.get("answer_probability"), "ms_small": s.get("max-softmax"),
                     "p_big": b["probability"], "ms_big": b.get("max-softmax"),
                     "small_prompt_tokens": int(-s["neg. question length"]), "small_completion_tokens": completion(s),
                     "big_prompt_tokens": int(-b["neg. question length"]), "big_completion_tokens": completion(b),
                     "small_seconds": None, "big_seconds": None})
    notes = [f"Prompt tokens: each model's rendered prompt (the records' question length). Completion tokens "
             f"({2 * len(rows)} answers): {used['record']} from the records, {used['answer pass']} from the answer "
             f"pass's token count (the small model's answer-level records), {used['choice letter']} multiple-choice "
             f"letters counted as 1, {used['estimated']} open answers estimated from their text at "
             f"{chars_per_token:.2f} characters per token (measured on the small model's own open answers"
             f"{'' if measured else ': none known, 4.0 assumed'}; the end-of-answer token not counted). No seconds "
             "in predictions files."]
    if len(rows) < len(small) or len(rows) < len(big):
        notes.append(f"{len(small)} small and {len(big)} big records; {len(rows)} questions in both are used.")
    return rows, notes


# --- the analysis -----------------------------------------------------------------------------------------------

LABELS = {
    "prompt-only score": "small prompt-only confidence (lowest first)",
    "answer-level score": "small answer-level confidence (lowest first)",
    "max-softmax": "small max-softmax (lowest first)",
    "random": "random (mean of draws, 5–95% band)",
    "big P alone": "big prompt-only P (highest first)",
    "gain router": "**gain before decoding: P_big − P_small prompt-only (the router)**",
    "gain cascade": "gain cascade: P_big − P_small answer-level",
    "gain max-softmax": "the same difference on raw max-softmax (uncalibrated)",
    "fitted router": "fitted router (LOSO logistic regression; prompt-only P_small)",
    "fitted cascade": "fitted cascade (LOSO logistic regression; answer-level P_small)",
    "oracle": "oracle (big right and small wrong first)",
}
GAIN_ORDERINGS = ("gain router", "gain cascade", "gain max-softmax", "fitted router", "fitted cascade")


def _col(rows, key) -> np.ndarray | None:
    vals = [r.get(key) for r in rows]
    return None if any(v is None for v in vals) else np.asarray(vals, dtype=float)


def orderings(rows: list[dict]) -> dict[str, np.ndarray]:
    """Escalation scores ``[n]`` per ordering (higher escalates first; "lowest confidence first" as
    ``-confidence``), those the rows carry the inputs for. Random and oracle are added by :func:`analyze`."""
    from valueprobe.calibration.routing import clipped_logit, expected_gain, loso_router, router_features

    p_small, p_big = _col(rows, "p_small"), _col(rows, "p_big")
    p_ans, ms_small, ms_big = _col(rows, "p_small_answer"), _col(rows, "ms_small"), _col(rows, "ms_big")
    small_ok, big_ok = _col(rows, "small_ok"), _col(rows, "big_ok")
    kinds = np.asarray([r["kind"] for r in rows])
    sources = np.asarray([r["dataset"] for r in rows])
    out = {"prompt-only score": -p_small}
    if p_ans is not None:
        out["answer-level score"] = -p_ans
    if ms_small is not None:
        out["max-softmax"] = -ms_small
    out["big P alone"] = p_big
    out["gain router"] = expected_gain(p_big, p_small)
    if p_ans is not None:
        out["gain cascade"] = expected_gain(p_big, p_ans)
    if ms_small is not None and ms_big is not None:
        out["gain max-softmax"] = ms_big - ms_small
    if len(set(sources.tolist())) >= 2:
        target = big_ok - small_ok
        X = router_features(p_big, p_small, kinds, ms_big, ms_small)
        out["fitted router"] = loso_router(X, target, sources)
        if p_ans is not None:
            Xa = router_features(p_big, p_ans, kinds, ms_big, ms_small, extra=[clipped_logit(p_small)])
            out["fitted cascade"] = loso_router(Xa, target, sources)
    return out


def _select(curve, big_acc: float, shares=SHARES) -> dict:
    from valueprobe.calibration.routing import accuracy_at

    return {"acc20": accuracy_at(curve, 0.2, shares), "acc50": accuracy_at(curve, 0.5, shares),
            "share_to_big_within_1pt": share_to_reach(curve, big_acc - 0.01, shares)}


def _escalated(score: np.ndarray, share: float) -> np.ndarray:
    from valueprobe.calibration.routing import escalation_order

    mask = np.zeros(len(score), dtype=bool)
    mask[escalation_order(score)[: int(np.rint(share * len(score)))]] = True
    return mask


def cost_table(rows: list[dict], scores: dict[str, np.ndarray], shares=(0.2, 0.5)) -> dict:
    """Tokens (and seconds where known) per question, mean over the questions: each model alone, the router
    (before decoding) and the cascade at each share escalated, each escalating its own ordering's top share.

    Router: the small model's prefill for every question (P_small), the big model's prefill for every question
    (P_big: the decision), the small model's completion for the kept ones, the big model's whole answer (prompt
    again: no prefix cache assumed, plus completion) for the escalated ones. Cascade: the small model's whole
    answer for every question, the big prefill for every question, the big whole answer for the escalated."""
    sp, sc = _col(rows, "small_prompt_tokens"), _col(rows, "small_completion_tokens")
    bp, bc = _col(rows, "big_prompt_tokens"), _col(rows, "big_completion_tokens")
    ss, bs = _col(rows, "small_seconds"), _col(rows, "big_seconds")
    s_ok, b_ok = _col(rows, "small_ok"), _col(rows, "big_ok")
    n = len(rows)

    def line(name, share, small_tok, big_tok, seconds, acc):
        return {"policy": name, "share": share, "small_tokens": float(small_tok / n), "big_tokens": float(big_tok / n),
                "tokens": float((small_tok + big_tok) / n), "seconds": None if seconds is None else float(seconds / n),
                "accuracy": float(acc)}

    out = [line("small model alone", 0.0, (sp + sc).sum(), 0.0, None if ss is None else ss.sum(), s_ok.mean()),
           line("big model alone", 1.0, 0.0, (bp + bc).sum(), None if bs is None else bs.sum(), b_ok.mean())]
    for share in shares:
        for name, key in (("router (before decoding)", "gain router"), ("cascade (after the small answer)", "gain cascade")):
            if key not in scores:
                continue
            esc = _escalated(scores[key], share)
            acc = np.where(esc, b_ok, s_ok).mean()
            if key == "gain router":
                small_tok = sp.sum() + sc[~esc].sum()
                secs = None if ss is None or bs is None else ss[~esc].sum() + bs[esc].sum()
            else:
                small_tok = (sp + sc).sum()
                secs = None if ss is None or bs is None else ss.sum() + bs[esc].sum()
            big_tok = bp.sum() + (bp + bc)[esc].sum()
            out.append(line(name, share, small_tok, big_tok, secs, acc))
    decision = float(bp.mean() / (bp + bc).mean())
    return {"rows": out, "decision_share_of_big_answer": decision, "big_prompt_tokens": float(bp.mean()),
            "big_completion_tokens": float(bc.mean()), "small_prompt_tokens": float(sp.mean()),
            "small_completion_tokens": float(sc.mean()),
            "small_seconds": None if ss is None else float(ss.mean()),
            "big_seconds": None if bs is None else float(bs.mean()),
            # the keys the first version of this bench wrote
            "small_tokens": float((sp + sc).mean()), "big_tokens": float((bp + bc).mean())}


def analyze(rows: list[dict], *, seed: int = 0, draws: int = 200, boot: int = 2000, notes=()) -> dict:
    """Every ordering's curve, area, APGR, accuracy at 20% / 50% escalated, share reaching the big model's accuracy
    within 1 point and paired bootstrap interval of its area against random; the fitted routers against the plain
    differences; APGR per source; the cost table; the targets; the gain thresholds per escalation rate."""
    from valueprobe.calibration.routing import (apgr, curve_area, escalation_curve, gain_rates, oracle_score,
                                                paired_bootstrap, random_band)

    if not rows:
        raise ValueError("no questions")
    s_ok, b_ok = _col(rows, "small_ok"), _col(rows, "big_ok")
    small_acc, big_acc = float(s_ok.mean()), float(b_ok.mean())
    scores = orderings(rows)
    scores["oracle"] = oracle_score(s_ok, b_ok)
    band = random_band(s_ok, b_ok, draws=draws, seed=seed)
    out = {"n": len(rows), "small_accuracy": small_acc, "big_accuracy": big_acc, "shares": SHARES.tolist(),
           "notes": list(notes), "curves": {}, "random_expected_area": (small_acc + big_acc) / 2}

    def entry(key, curve, area):
        return {"label": LABELS[key], "accuracy": [float(x) for x in curve], "area": float(area),
                "apgr": _none_if_nan(apgr(area, small_acc, big_acc)), **_select(curve, big_acc)}

    curves = {"random": {**entry("random", np.asarray(band["curve_mean"]), band["area_mean"]),
                         "area_low": band["area_low"], "area_high": band["area_high"],
                         "accuracy_low": band["curve_low"], "accuracy_high": band["curve_high"], "draws": draws}}
    for key, score in scores.items():
        curve = escalation_curve(s_ok, b_ok, score)
        curves[key] = {**entry(key, curve, curve_area(curve)),
                       "vs_random": paired_bootstrap(s_ok, b_ok, score, None, n=boot, seed=seed)}
    out["curves"] = {key: curves[key] for key in LABELS if key in curves}  # the table's order
    fitted = {}
    for fit_key, plain_key in (("fitted router", "gain router"), ("fitted cascade", "gain cascade")):
        if fit_key in scores and plain_key in scores:
            bs = paired_bootstrap(s_ok, b_ok, scores[fit_key], scores[plain_key], n=boot, seed=seed)
            fitted[fit_key] = {"versus": plain_key, "area_difference": bs, "served": bool(bs["ci95"][0] > 0)}
    out["fitted_vs_plain"] = fitted
    out["per_source"] = per_source(rows, scores)
    out["cost"] = cost_table(rows, scores)
    out["targets"] = targets(out)
    out["gain_rates"] = gain_rates(scores["gain router"])
    if "gain cascade" in scores:
        out["gain_rates_cascade"] = gain_rates(scores["gain cascade"])
    return out


def per_source(rows, scores) -> dict:
    """APGR per source with each ordering ranked within that source alone (router, cascade, big P alone, small
    prompt-only confidence, oracle)."""
    from valueprobe.calibration.routing import apgr, curve_area, escalation_curve

    sources = np.asarray([r["dataset"] for r in rows])
    s_ok, b_ok = _col(rows, "small_ok"), _col(rows, "big_ok")
    out = {}
    for name in dict.fromkeys(sources.tolist()):
        m = sources == name
        sa, ba = float(s_ok[m].mean()), float(b_ok[m].mean())
        r = {"n": int(m.sum()), "small_accuracy": sa, "big_accuracy": ba}
        for key in ("gain router", "gain cascade", "big P alone", "prompt-only score", "oracle"):
            if key in scores:
                r[key] = _none_if_nan(apgr(curve_area(escalation_curve(s_ok[m], b_ok[m], scores[key][m])), sa, ba))
        out[name] = r
    return out


def targets(summary: dict) -> dict:
    """The issue's targets for the router and the cascade: area >= random + 0.05 with the paired 95% interval
    above random; APGR >= 0.80; the big model's accuracy within 1 point at <= 50% escalated; the decision (the
    big model's prefill) <= 10% of the big model's answer cost in tokens."""
    out = {}
    rand = summary["random_expected_area"]
    for key in ("gain router", "gain cascade"):
        cur = summary["curves"].get(key)
        if cur is None:
            continue
        reach = cur["share_to_big_within_1pt"]
        out[key] = {
            "area >= random + 0.05, 95% interval above random": {
                "value": f"{cur['area']:.4f} vs {rand:.4f} + 0.05; interval {cur['vs_random']['ci95'][0]:+.4f}"
                         f"..{cur['vs_random']['ci95'][1]:+.4f}",
                "met": bool(cur["area"] >= rand + 0.05 and cur["vs_random"]["ci95"][0] > 0)},
            "APGR >= 0.80": {"value": _f(cur["apgr"]), "met": bool(_finite(cur["apgr"]) and cur["apgr"] >= 0.80)},
            "big accuracy within 1 point at <= 50% escalated": {
                "value": "never" if reach is None else f"{100 * reach:.0f}%",
                "met": bool(reach is not None and reach <= 0.5)},
            "decision cost (big prefill) <= 10% of the big answer (tokens)": {
                "value": f"{100 * summary['cost']['decision_share_of_big_answer']:.0f}%",
                "met": bool(summary["cost"]["decision_share_of_big_answer"] <= 0.10)},
        }
    return out


def _none_if_nan(x: float) -> float | None:
    """APGR is NaN where both models are equally accurate: ``None`` in the summary (JSON-ready, comparable)."""
    return None if x != x else x


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _f(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "—"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def report(summary: dict) -> list[str]:
    """The markdown report: the orderings table, fitted vs plain, APGR per source, the cost table, the targets."""
    c = summary["cost"]
    lines = [f"{summary['n']} questions; small model accuracy {summary['small_accuracy']:.3f}, big "
             f"{summary['big_accuracy']:.3f} (random ordering: expected area {summary['random_expected_area']:.4f}, "
             "APGR 0.5). Higher scores escalate first; the small model's confidences escalate lowest first.", "",
             "| escalation ordered by | area under accuracy-vs-share | APGR | accuracy at 20% / 50% escalated | "
             "share reaching the big model's accuracy within 1 point | area − random, paired 95% bootstrap |",
             "|---|---|---|---|---|---|"]
    for key, cur in summary["curves"].items():
        if key == "random":
            vs = f"band of {cur['draws']} draws {cur['area_low']:.4f}..{cur['area_high']:.4f}"
        else:
            v = cur["vs_random"]
            vs = f"{v['point']:+.4f} ({v['ci95'][0]:+.4f}..{v['ci95'][1]:+.4f})"
        lines.append(f"| {cur['label']} | {cur['area']:.4f} | {_f(cur['apgr'])} | {cur['acc20']:.3f} / "
                     f"{cur['acc50']:.3f} | {_pct(cur['share_to_big_within_1pt'])} | {vs} |")
    lines.append("")
    for fit_key, f in summary["fitted_vs_plain"].items():
        bs = f["area_difference"]
        plain = summary["curves"][f["versus"]]
        fit = summary["curves"][fit_key]
        winner = (f"the {fit_key} wins and is served" if f["served"] else
                  f"the plain difference wins: the {fit_key} is not served")
        lines.append(f"- {fit_key} vs the plain difference ({f['versus']}): area {fit['area']:.4f} vs "
                     f"{plain['area']:.4f}, APGR {_f(fit['apgr'])} vs {_f(plain['apgr'])}; area difference "
                     f"{bs['point']:+.4f}, paired 95% interval {bs['ci95'][0]:+.4f}..{bs['ci95'][1]:+.4f} (90% "
                     f"{bs['ci90'][0]:+.4f}..{bs['ci90'][1]:+.4f}): {winner} (served only if the 95% interval is "
                     "above 0).")
    if summary["fitted_vs_plain"]:
        lines.append("")
    ps = summary["per_source"]
    keys = [k for k in ("gain router", "gain cascade", "big P alone", "prompt-only score", "oracle")
            if any(k in r for r in ps.values())]
    names = {"gain router": "router", "gain cascade": "gain cascade", "big P alone": "big P alone",
             "prompt-only score": "small confidence", "oracle": "oracle"}
    lines += ["APGR per source (each ordering ranked within the source; — where both models are equally accurate "
              "there):", "", "| source | n | small acc. | big acc. | " + " | ".join(names[k] for k in keys) + " |",
              "|---|---|---|---|" + "---|" * len(keys)]
    for name, r in ps.items():
        lines.append(f"| {name} | {r['n']} | {r['small_accuracy']:.3f} | {r['big_accuracy']:.3f} | "
                     + " | ".join(_f(r.get(k)) for k in keys) + " |")
    lines += ["", f"Cost per question (mean; prompt tokens: small {c['small_prompt_tokens']:.1f}, big "
                  f"{c['big_prompt_tokens']:.1f}; completion tokens: small {c['small_completion_tokens']:.1f}, big "
                  f"{c['big_completion_tokens']:.1f}). Router: small prefill (P_small) and big prefill (P_big) for "
                  "every question, small completion for the kept, the big model's whole answer (prompt again, no "
                  "prefix cache assumed) for the escalated. Cascade: the small model's whole answer for every "
                  "question, big prefill for every question, the big whole answer for the escalated.", "",
              "| policy | escalated | small-model tokens | big-model tokens | all tokens | seconds (answers) | "
              "accuracy |", "|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        secs = "—" if r["seconds"] is None else f"{r['seconds']:.2f}"
        lines.append(f"| {r['policy']} | {100 * r['share']:.0f}% | {r['small_tokens']:.1f} | {r['big_tokens']:.1f} | "
                     f"{r['tokens']:.1f} | {secs} | {r['accuracy']:.3f} |")
    lines += ["", f"Decision cost: the big model's prefill is {c['big_prompt_tokens']:.1f} tokens of its "
                  f"{c['big_prompt_tokens'] + c['big_completion_tokens']:.1f}-token answer "
                  f"({100 * c['decision_share_of_big_answer']:.0f}%, in tokens; a prefill token costs far less time "
                  "than a decoded one, which this count does not weigh).", ""]
    for note in summary.get("notes", []):
        lines.append(f"- {note}")
    if summary.get("notes"):
        lines.append("")
    for key, t in summary["targets"].items():
        lines += [f"Targets, {LABELS[key].strip('*')}:", "", "| target | value | |", "|---|---|---|"]
        lines += [f"| {name} | {v['value']} | {'met' if v['met'] else '**missed**'} |" for name, v in t.items()]
        lines.append("")
    lines.append("Gain thresholds per escalation rate (router gain; escalate above): "
                 + ", ".join(f"{r}: {t:+.4f}" for r, t in summary["gain_rates"].items()))
    return lines


def plot(summary: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    shares = summary["shares"]
    for key, cur in summary["curves"].items():
        label = f"{cur['label'].strip('*')} (area {cur['area']:.3f})"
        style = {"lw": 2.2} if key == "gain router" else {"lw": 1.1}
        if key == "random":
            ax.fill_between(shares, cur["accuracy_low"], cur["accuracy_high"], color="grey", alpha=0.25)
            style = {"color": "grey", "ls": "--", "lw": 1}
        if key == "oracle":
            style = {"color": "black", "ls": ":", "lw": 1}
        ax.plot(shares, cur["accuracy"], label=label, **style)
    ax.axhline(summary["big_accuracy"], color="grey", linestyle=":", lw=0.8, label="big model alone")
    ax.set_xlabel("share of questions escalated to the big model")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Escalation, {summary['n']} questions")
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def json_ready(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, np.generic):
        return json_ready(x.item())
    return x


def summarize(small: dict, big: dict, *, seed: int = 0) -> dict:
    """The analysis of the live mode's records (``id -> record`` per model)."""
    rows, notes = questions_from_records(small, big)
    return analyze(rows, seed=seed, notes=notes)


def write_outputs(summary: dict, out, *, title: str, echo=print) -> list[str]:
    """Print the report and write ``<out>.md``, ``<out>.json``, ``<out>.png`` and ``<out>.gain-rates.json``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = report(summary)
    echo("\n".join(lines))
    summary = json_ready(summary)
    Path(f"{out}.json").write_text(json.dumps(summary, indent=2))
    Path(f"{out}.gain-rates.json").write_text(json.dumps(summary["gain_rates"], indent=2))
    Path(f"{out}.md").write_text(f"## {title}\n\n" + "\n".join(lines) + f"\n\nPlot: `{out.name}.png`.\n")
    plot(summary, f"{out}.png")
    return lines


def run_offline(*, out, small_predictions=None, big_predictions=None, records=None, seed: int = 0,
                echo=print) -> dict:
    """No model: the analysis from two ``eval --predictions`` files (``small_predictions``, ``big_predictions``)
    or from a live run's records file (``records``, both models' records), printed and written beside ``out``."""
    if records is not None:
        recs = load_records(Path(records))
        if not {"small", "big"} <= set(recs):
            raise ValueError(f"{records} needs records of both models ('small' and 'big')")
        rows, notes = questions_from_records(recs["small"], recs["big"])
        source = f"the records of `{Path(records).name}`"
    else:
        if small_predictions is None or big_predictions is None:
            raise ValueError("give both predictions files (small and big) or a records file")
        rows, notes = questions_from_predictions(load_predictions(small_predictions), load_predictions(big_predictions))
        source = f"`{Path(small_predictions).name}` and `{Path(big_predictions).name}` (`valueprobe eval --predictions`)"
    summary = analyze(rows, seed=seed, notes=[f"Input: {source}."] + notes)
    write_outputs(summary, out, title="Routing by expected gain: the small model answers, the big one takes what is "
                                      "escalated", echo=echo)
    return summary


def load_records(path: Path) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["model"], {})[rec["id"]] = rec
    return out


def run(questions, *, small_url: str, big_url: str, out: Path, max_tokens: int = 16, concurrency: int = 16,
        echo=print) -> dict:
    """Ask both sidecars (resuming from ``<out>.jsonl``), then print, plot and write the curves."""
    from tqdm.auto import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    records_path = Path(f"{out}.jsonl")
    records = load_records(records_path)
    with open(records_path, "a") as fh, tqdm(total=2 * len(questions), desc="cascade", unit="answer",
                                              initial=sum(len(v) for v in records.values())) as bar:
        def sink(rec):
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            records.setdefault(rec["model"], {})[rec["id"]] = rec

        for tag, url in (("small", small_url), ("big", big_url)):
            asyncio.run(ask_all(url, questions, max_tokens=max_tokens, concurrency=concurrency,
                                done=records.get(tag, {}), sink=sink, tag=tag, progress=lambda _: bar.update(1)))
    summary = summarize(records["small"], records["big"])
    write_outputs(summary, out, title="Cascade: small model first, the big one takes what is escalated", echo=echo)
    return summary


def check_escalation_route(questions, *, small_url_escalating: str, big: dict, max_tokens: int = 16) -> dict:
    """Send ``questions`` through a small sidecar started with ``escalate_below=1.0`` and ``--escalate-url`` the big
    sidecar: every answer must come back routed and equal to the big model's own answer."""
    async def main():
        async with httpx.AsyncClient(base_url=small_url_escalating, timeout=1800) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=_request(q, max_tokens))
                                          for q in questions))

    replies = [r.json() for r in asyncio.run(main())]
    routed = [r["confidence"]["routed"] for r in replies]
    errors = [r["confidence"].get("upstream_error") for r in replies]
    same = [r["choices"][0]["text"].strip() == big[q.id]["text"].strip() for q, r in zip(questions, replies)]
    return {"n": len(questions), "routed": int(sum(routed)), "same_as_big": int(sum(same)),
            "upstream_errors": sum(e is not None for e in errors), "errors": sorted({e for e in errors if e})[:3]}
