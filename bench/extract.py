"""Extraction throughput: questions per hour on this machine, by kind.

* ``report(cache)``: from the per-row wall times the extractor records in its cache (each row carries its share
  of its batch's time), questions/hour by kind and by path (prefill only vs generated answer);
* ``measure(...)``: the same small sample extracted with and without the shared-prefix KV reuse, interleaved
  repetitions, no cache: the ratio of the two, with spread.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def report(cache_dir: str | Path, echo=print) -> dict:
    rows = []
    for path in sorted(Path(cache_dir).glob("*/shard-*.json")):
        rows.extend(json.loads(path.read_text()))
    timed = [r for r in rows if r.get("seconds") is not None]
    out = {}
    echo(f"{len(rows)} questions in {cache_dir} ({len(timed)} with recorded timings)")
    for kind in sorted({r["kind"] for r in timed}):
        for generated in (False, True):
            sel = [r["seconds"] for r in timed if r["kind"] == kind and bool(r.get("generated")) == generated]
            if not sel:
                continue
            per_q = sum(sel) / len(sel)
            label = f"{kind}, {'generated answer' if generated else 'prefill only'}"
            out[label] = {"n": len(sel), "seconds_per_question": per_q, "questions_per_hour": 3600 / per_q}
            echo(f"  {label:32s} n={len(sel):5d}  {per_q:6.2f} s/question  {3600 / per_q:7.0f} questions/hour")
    return out


def measure(model_name: str, *, n_choice: int = 16, n_open: int = 16, reps: int = 2, max_new_tokens: int = 16,
            echo=print) -> dict:
    from valueprobe.calibration.data import load_data
    from valueprobe.calibration.extract import extract_features
    from valueprobe.plugin import PromptFormat, load_model

    model, tok = load_model(model_name)
    sets = {"choice": load_data(f"mmlu:{n_choice}", seed=123), "open": load_data(f"triviaqa:{n_open}", seed=123)}
    times = {(kind, reuse): [] for kind in sets for reuse in (True, False)}
    for _ in range(reps):
        for kind, questions in sets.items():
            for reuse in (True, False):  # interleaved, so drift hits both alike
                started = time.perf_counter()
                extract_features(model, tok, questions, PromptFormat(), reuse_prefix=reuse, max_new_tokens=max_new_tokens,
                                 progress=False)
                times[(kind, reuse)].append(time.perf_counter() - started)
    out = {}
    for kind, questions in sets.items():
        with_, without = times[(kind, True)], times[(kind, False)]
        ratio = statistics.mean(without) / statistics.mean(with_)
        out[kind] = {"with_prefix_qph": 3600 * len(questions) / statistics.mean(with_),
                     "without_prefix_qph": 3600 * len(questions) / statistics.mean(without), "speedup": ratio}
        echo(f"{kind:7s} {len(questions)} questions x {reps}: shared-prefix reuse {out[kind]['with_prefix_qph']:.0f} q/h "
             f"(sd {statistics.pstdev(with_):.1f} s), without {out[kind]['without_prefix_qph']:.0f} q/h "
             f"(sd {statistics.pstdev(without):.1f} s) -> {ratio:.2f}x")
    return out
