"""Recalibration from feedback, replayed: questions from sources the artifact was never fitted on go through a real
sidecar (``--recalibration auto``) window by window, each answer is graded and its label sent to ``/v1/feedback``,
as a user who checks answers would.

The evaluation is prequential: a window is answered and scored *before* its labels reach the sidecar, so the
probability served in window ``w`` comes from a calibration that saw only windows before it. For every answer the
bench also recovers the probability the fitted artifact would have served (``p0``: the served probability through
the inverse of the promoted Platt maps the sidecar reports), so each window prints ECE and Brier of the fitted
calibration ("before") and of the one served ("after") on the same answers, with the calibration version serving.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import numpy as np
from scipy.special import expit

from valueprobe.calibration.metrics import brier_loss, expected_calibration_error
from valueprobe.server.recalibration import fitted_logit

from .cascade import _request, grade

N_BINS = 10


def fitted_probability(p: float, slot: str, from_origin: dict) -> float:
    """The fitted artifact's probability behind a served one of calibration ``slot`` (the sidecar's own inverse,
    with the maps ``/v1/admin/calibration`` reported)."""
    return float(expit(fitted_logit(p, tuple(from_origin.get(slot, (1.0, 0.0))))))


def calibration_numbers(y, p) -> dict:
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    return {"ece": expected_calibration_error(y, p, n_bins=N_BINS), "brier": brier_loss(y, p),
            "mean_p": float(p.mean()), "accuracy": float(y.mean())}


async def _report(url: str, auth: dict) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        r = await client.get("/v1/admin/calibration", headers=auth)
    r.raise_for_status()
    return r.json()


async def _replay(urls: list[str], windows, *, admin_token: str, max_tokens: int, concurrency: int, progress, echo,
                  grader=grade, done: int = 0, on_window=None) -> tuple[list, list]:
    """Windows ``done`` on (the earlier ones were replayed by an interrupted run); the questions go round-robin over
    ``urls`` (replicas sharing one store) and each label to the *next* replica, as a load balancer would send it."""
    auth = {"Authorization": f"Bearer {admin_token}"}
    gate = asyncio.Semaphore(concurrency)
    maps: dict[int, dict] = {0: {}}  # calibration version -> from_origin maps
    url = urls[0]
    slot_of_kind = (await _report(url, auth))["slot_of_kind"]
    records, rows = [], []
    turn = {"n": 0}

    def next_url() -> str:
        turn["n"] += 1
        return urls[turn["n"] % len(urls)]

    async def ask(client, q):
        served_by = next_url()
        async with gate:
            r = await client.post(f"{served_by}/v1/completions", json=_request(q, max_tokens))
        r.raise_for_status()
        body = r.json()
        conf = body["confidence"]
        text = body["choices"][0]["text"]
        progress()
        return {"id": q.id, "dataset": q.dataset, "kind": conf["kind"], "text": text, "correct": bool(grader(q, text)),
                "probability": conf["probability"], "calibration_version": conf["calibration_version"],
                "decision": conf["decision"], "request_id": conf["request_id"], "served_by": urls.index(served_by)}

    async def label(client, rec):
        labelled_by = urls[(rec["served_by"] + 1) % len(urls)]  # another replica than the one that answered
        async with gate:
            r = await client.post(f"{labelled_by}/v1/feedback", headers=auth, json={"request_id": rec["request_id"],
                                                                                    "correct": rec["correct"]})
        r.raise_for_status()
        return r.json()["recalibration"]

    async with httpx.AsyncClient(timeout=1800) as client:
        for w, questions in enumerate(windows):
            if w < done:
                continue
            answered = await asyncio.gather(*(ask(client, q) for q in questions))
            for rec in answered:  # the versions that served this window are known before its labels are sent
                version = rec["calibration_version"]
                if version not in maps:
                    report = (await client.get(f"{url}/v1/admin/calibration", headers=auth)).json()
                    maps[report["calibration_version"]] = (report.get("recalibration") or {}).get("from_origin", {})
                rec["p0"] = fitted_probability(rec["probability"], slot_of_kind[rec["kind"]], maps.get(version, {}))
                rec["window"] = w
            outcomes = await asyncio.gather(*(label(client, rec) for rec in answered))
            promoted = [o["promoted"] for o in outcomes if "promoted" in o]
            report = (await client.get(f"{url}/v1/admin/calibration", headers=auth)).json()
            maps[report["calibration_version"]] = (report.get("recalibration") or {}).get("from_origin", {})
            records.extend(answered)
            rows.append(window_row(w, answered, promoted, report))
            echo(format_row(rows[-1]))
            if on_window is not None:  # kept as soon as a window is done: an interrupted run resumes after it
                on_window(answered, rows[-1])
    return records, rows


def window_row(w: int, answered: list[dict], promoted: list[dict], report: dict) -> dict:
    y = [r["correct"] for r in answered]
    row = {"window": w, "n": len(answered), "versions_serving": sorted({r["calibration_version"] for r in answered}),
           "fitted": calibration_numbers(y, [r["p0"] for r in answered]),
           "served": calibration_numbers(y, [r["probability"] for r in answered]),
           "promotions": [{"calibration_version": p["calibration_version"], "slots": sorted(p["slots"])} for p in promoted],
           "version_after": report["calibration_version"], "drift": report.get("drift", {})}
    for kind in ("choice", "open"):
        rows = [r for r in answered if r["kind"] == kind]
        if rows and 0 < sum(r["correct"] for r in rows) < len(rows):
            ky = [r["correct"] for r in rows]
            row[kind] = {"n": len(rows), "fitted": calibration_numbers(ky, [r["p0"] for r in rows]),
                         "served": calibration_numbers(ky, [r["probability"] for r in rows])}
    return row


def format_row(row: dict) -> str:
    f, s = row["fitted"], row["served"]
    promoted = ", ".join(f"v{p['calibration_version']} ({'+'.join(p['slots'])})" for p in row["promotions"]) or "-"
    return (f"| {row['window'] + 1} | {row['n']} | {f['accuracy']:.3f} | {f['mean_p']:.3f} -> {s['mean_p']:.3f} | "
            f"{f['ece']:.3f} -> {s['ece']:.3f} | {f['brier']:.4f} -> {s['brier']:.4f} | "
            f"{'/'.join(f'v{v}' for v in row['versions_serving'])} | {promoted} |")


HEADER = ["| window | answers | accuracy | mean P(correct) fitted -> served | ECE fitted -> served | Brier fitted -> "
          "served | calibration serving | promoted on its labels |", "|---|---|---|---|---|---|---|---|"]


def summarize(records: list[dict], rows: list[dict]) -> dict:
    """Totals over the windows served after the first promotion (what recalibration could change), per kind."""
    first = next((r["window"] for r in rows if r["promotions"]), None)
    out = {"windows": rows, "first_promotion_window": first}
    if first is None:
        return out
    after = [r for r in records if r["window"] > first]
    out["after_first_promotion"] = {}
    for kind in ("all", "choice", "open"):
        rs = [r for r in after if kind == "all" or r["kind"] == kind]
        if rs and 0 < sum(r["correct"] for r in rs) < len(rs):
            y = [r["correct"] for r in rs]
            out["after_first_promotion"][kind] = {
                "n": len(rs), "fitted": calibration_numbers(y, [r["p0"] for r in rs]),
                "served": calibration_numbers(y, [r["probability"] for r in rs])}
    return out


def report_lines(summary: dict, sources: list[str]) -> list[str]:
    lines = [f"Sources the artifact was never fitted on: {', '.join(sources)}; windows answered before their labels "
             "were sent (prequential).", ""] + HEADER + [format_row(r) for r in summary["windows"]]
    totals = summary.get("after_first_promotion")
    if totals:
        lines += ["", f"After the first promotion (windows {summary['first_promotion_window'] + 2} on):", "",
                  "| kind | answers | accuracy | ECE fitted -> served | Brier fitted -> served |", "|---|---|---|---|---|"]
        for kind, t in totals.items():
            lines.append(f"| {kind} | {t['n']} | {t['fitted']['accuracy']:.3f} | {t['fitted']['ece']:.3f} -> "
                         f"{t['served']['ece']:.3f} | {t['fitted']['brier']:.4f} -> {t['served']['brier']:.4f} |")
    else:
        lines += ["", "No promotion: the shadow calibrator never beat the fitted calibration on held-out feedback."]
    return lines


def plot(summary: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["windows"]
    x = [r["window"] + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("ece", "brier")):
        ax.plot(x, [r["fitted"][metric] for r in rows], "o-", label="fitted calibration")
        ax.plot(x, [r["served"][metric] for r in rows], "s-", label="served (recalibrated from earlier windows)")
        for r in rows:
            if r["promotions"]:
                ax.axvline(r["window"] + 1.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("window (answered before its labels were sent)")
        ax.set_ylabel(metric.upper() if metric == "ece" else "Brier")
    axes[0].legend(fontsize=7)
    fig.suptitle("Recalibration from feedback on sources the artifact never saw (dotted: a promotion)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(questions, *, url: str | list[str], admin_token: str, out: Path, window: int = 100, max_tokens: int = 16,
        concurrency: int = 16, sources: list[str], echo=print, grader=grade, resume: bool = False) -> dict:
    """Replay ``questions`` (already interleaved across sources) through the sidecar(s) at ``url`` (several:
    replicas sharing one store, asked in turn, each label sent to another one) in windows, then write
    ``<out>.jsonl`` (every answer), ``.json``, ``.md`` and ``.png``. ``grader(question, text)`` grades an answer
    (default: letter for multiple choice, alias or final number otherwise).

    Every finished window is appended to ``<out>.jsonl`` and ``<out>.windows.jsonl`` at once; with ``resume`` the
    windows found there are not replayed (the sidecars must keep their state in the same store as before)."""
    from tqdm.auto import tqdm

    urls = [url] if isinstance(url, str) else list(url)
    windows = [questions[i:i + window] for i in range(0, len(questions), window)]
    out.parent.mkdir(parents=True, exist_ok=True)
    answers_path, windows_path = Path(f"{out}.jsonl"), Path(f"{out}.windows.jsonl")
    done_records, done_rows = [], []
    if resume and windows_path.exists():
        done_rows = [json.loads(x) for x in windows_path.read_text().splitlines() if x.strip()]
        done_records = [r for r in (json.loads(x) for x in answers_path.read_text().splitlines() if x.strip())
                        if r["window"] < len(done_rows)]
        echo(f"resuming after {len(done_rows)} windows ({len(done_records)} answers) kept in {answers_path}")
    else:
        answers_path.write_text("")
        windows_path.write_text("")

    def keep(answered, row):
        with open(answers_path, "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in answered))
        with open(windows_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    started = time.perf_counter()
    echo("\n".join(HEADER))
    with tqdm(total=len(questions), initial=len(done_records), desc="replay", unit="answer") as bar:
        records, rows = asyncio.run(_replay(urls, windows, admin_token=admin_token, max_tokens=max_tokens,
                                            concurrency=concurrency, progress=lambda: bar.update(1), echo=echo,
                                            grader=grader, done=len(done_rows), on_window=keep))
    records, rows = done_records + records, done_rows + rows
    summary = summarize(records, rows)
    summary["replicas"] = len(urls)
    summary["seconds"] = time.perf_counter() - started
    lines = report_lines(summary, sources)
    echo("\n".join(lines[-8:]))
    Path(f"{out}.json").write_text(json.dumps(summary, indent=2))
    Path(f"{out}.md").write_text("## Recalibration from feedback, replayed\n\n" + "\n".join(lines) + "\n")
    plot(summary, f"{out}.png")
    return summary


def sample_sources(specs: list[str], seed: int = 0):
    """The questions of each data spec, interleaved (mixed traffic), shuffled with a fixed seed."""
    from valueprobe.calibration.data import load_data

    questions = [q for spec in specs for q in load_data(spec, seed=seed)]
    random.Random(seed).shuffle(questions)
    return questions
