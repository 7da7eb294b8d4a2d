"""A cascade of two real models, measured: a small model answers first, a bigger one takes what the policy escalates.

Both models are served by valueprobe sidecars on loopback (started here, or given by URL). Every held-out question
(the small artifact's test split, both kinds) is asked of each sidecar once through ``/v1/completions`` (multiple
choice with valueprobe's ``choices`` extension, so it is rendered and calibrated as such), greedy, many at once; each
answer is graded and kept with the small model's confidences (prompt-only, answer-level where its sidecar has that
artifact, the max-softmax component), its tokens and its wall time, appended to ``<out>.jsonl`` as it comes (a rerun
resumes). The curves are then exact: escalating the share ``s`` of questions with the lowest score gives the
accuracy ``mean(big correct if escalated else small correct)``, for ``s`` from 0 to 1, per ordering (prompt-only
score, answer-level score, max-softmax, random), with the compute spent per question (tokens; seconds measured per
request under the same concurrency). A last check sends a few questions through the small sidecar's real
escalation route (``--escalate-url`` the big sidecar over the OpenAI protocol) and compares the routed answers with
the big model's own.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np

SHARES = np.linspace(0, 1, 101)


def cascade_curve(small_ok, big_ok, score, shares=SHARES) -> np.ndarray:
    """Accuracy when the ``s`` share of questions with the lowest ``score`` goes to the big model (ties in input
    order), for each ``s`` in ``shares``."""
    small_ok, big_ok = np.asarray(small_ok, dtype=float), np.asarray(big_ok, dtype=float)
    order = np.argsort(np.asarray(score, dtype=float), kind="mergesort")
    n = len(order)
    gain = np.r_[0.0, np.cumsum((big_ok - small_ok)[order])]  # accuracy change after escalating the first j
    return np.array([(small_ok.sum() + gain[int(round(s * n))]) / n for s in shares])


def share_to_reach(curve, target: float, shares=SHARES) -> float | None:
    """The smallest share escalated whose accuracy reaches ``target`` (``None`` if none does)."""
    hits = np.flatnonzero(np.asarray(curve) >= target - 1e-12)
    return float(shares[hits[0]]) if len(hits) else None


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


def summarize(small: dict, big: dict, *, seed: int = 0) -> dict:
    """Curves, areas and the share that reaches the big model's accuracy within 1 point, per ordering."""
    ids = [i for i in small if i in big]
    s_ok = np.array([small[i]["correct"] for i in ids], dtype=float)
    b_ok = np.array([big[i]["correct"] for i in ids], dtype=float)
    orders = {"prompt-only score": [small[i]["probability"] for i in ids],
              "max-softmax": [small[i]["max_softmax"] for i in ids],
              "random": np.random.default_rng(seed).random(len(ids))}
    if all(small[i]["answer_probability"] is not None for i in ids):
        orders["answer-level score"] = [small[i]["answer_probability"] for i in ids]
    orders = {k: np.asarray(v, dtype=float) for k, v in orders.items() if all(x is not None for x in v)}
    big_acc = float(b_ok.mean())
    out = {"n": len(ids), "small_accuracy": float(s_ok.mean()), "big_accuracy": big_acc, "curves": {}}
    tokens_small = np.mean([small[i]["prompt_tokens"] + small[i]["completion_tokens"] for i in ids])
    tokens_big = np.mean([big[i]["prompt_tokens"] + big[i]["completion_tokens"] for i in ids])
    sec_small = np.mean([small[i]["seconds"] for i in ids])
    sec_big = np.mean([big[i]["seconds"] for i in ids])
    out["cost"] = {"small_tokens": float(tokens_small), "big_tokens": float(tokens_big),
                   "small_seconds": float(sec_small), "big_seconds": float(sec_big)}
    for name, score in orders.items():
        curve = cascade_curve(s_ok, b_ok, score)
        reach = share_to_reach(curve, big_acc - 0.01)
        out["curves"][name] = {"accuracy": curve.tolist(), "area": float(np.trapezoid(curve, SHARES)),
                               "share_to_big_within_1pt": reach}
    out["shares"] = SHARES.tolist()
    return out


def report(summary: dict) -> list[str]:
    c = summary["cost"]
    lines = [f"{summary['n']} held-out questions; small model accuracy {summary['small_accuracy']:.3f}, big "
             f"{summary['big_accuracy']:.3f}. Per question: small {c['small_tokens']:.0f} tokens, "
             f"{c['small_seconds']:.2f} s; big {c['big_tokens']:.0f} tokens, {c['big_seconds']:.2f} s (a question "
             "escalated at share s costs the small answer plus the big one: tokens = small + s x big).", "",
             "| escalation ordered by | area under accuracy-vs-share | accuracy at 20% / 50% escalated | share reaching "
             "the big model's accuracy within 1 point |", "|---|---|---|---|"]
    for name, cur in summary["curves"].items():
        acc = cur["accuracy"]
        reach = cur["share_to_big_within_1pt"]
        lines.append(f"| {name} | {cur['area']:.4f} | {acc[20]:.3f} / {acc[50]:.3f} | "
                     f"{'—' if reach is None else f'{100 * reach:.0f}%'} |")
    return lines


def plot(summary: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, cur in summary["curves"].items():
        ax.plot(summary["shares"], cur["accuracy"], label=f"{name} (area {cur['area']:.3f})")
    ax.axhline(summary["big_accuracy"], color="grey", linestyle=":", label="big model alone")
    ax.set_xlabel("share of questions escalated to the big model")
    ax.set_ylabel("accuracy of the cascade")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    lines = report(summary)
    echo("\n".join(lines))
    Path(f"{out}.json").write_text(json.dumps({k: v for k, v in summary.items()}, indent=2))
    Path(f"{out}.md").write_text("## Cascade: small model first, the big one takes what is escalated\n\n"
                                 + "\n".join(lines) + "\n")
    plot(summary, f"{out}.png")
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
