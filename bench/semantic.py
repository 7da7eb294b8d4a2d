"""Semantic entropy beside the prompt-only score, on the same held-out open questions, with its cost.

Reads the samples file written by ``valueprobe sample-answers`` (5 answers per question at temperature 1), the
labels file (the greedy answer's grade: what the confidence is about) and scores the shipped artifact on the same
questions with one prefill each. Prints AUROC (with a 95% bootstrap interval) of the served probability, the free
max-softmax, and semantic entropy (discrete and likelihood-weighted), a paired bootstrap of the AUROC difference,
and seconds per question of each, and writes the same as JSON and a markdown section.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _paired_bootstrap(y, a, b, n_boot=2000, seed=0) -> tuple[float, float, float]:
    """AUROC(a) - AUROC(b): mean, and the 2.5/97.5 percentiles over paired resamples."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    d = np.asarray(diffs)
    return float(d.mean()), float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def measure_cost(model, tokenizer, probe, questions, *, n_samples: int = 5, reps: int = 2) -> dict:
    """Seconds per question, side by side in one run (interleaved reps): the prompt-only score (one prefill, what
    the probe costs when the sidecar is not answering anyway) vs sampling ``n_samples`` answers (what semantic
    entropy adds on top of answering)."""
    import tempfile
    import time

    from valueprobe.calibration.semantic import sample_answers

    prompts = [q.prompt() for q in questions]
    score_s, sample_s = [], []
    for rep in range(reps):
        for job in (("score", "sample") if rep % 2 == 0 else ("sample", "score")):
            started = time.perf_counter()
            if job == "score":
                probe.score(model, tokenizer, prompts)
                score_s.append((time.perf_counter() - started) / len(questions))
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    sample_answers(model, tokenizer, questions, probe.prompt_format, Path(tmp) / "s.jsonl",
                                   model_name=probe.model_name, n_samples=n_samples, seed=rep, progress=False)
                sample_s.append((time.perf_counter() - started) / len(questions))
    a, b = np.array(score_s), np.array(sample_s)
    return {"questions": len(questions), "reps": reps, "score_s": float(a.mean()), "score_sd": float(a.std()),
            "sample_s": float(b.mean()), "sample_sd": float(b.std()), "ratio": float(b.mean() / a.mean())}


def run(samples_path: Path, *, artifact=None, cache_dir="runs/cache", out: Path | None = None, echo=print,
        cost_questions: int = 12, cost_reps: int = 2) -> dict:
    from valueprobe.calibration.data import load_data
    from valueprobe.calibration.evaluate import evaluate_artifact, format_table, score_metrics
    from valueprobe.calibration.extract import load_labels
    from valueprobe.calibration.semantic import load_samples, score_rows
    from valueprobe.plugin import ValueProbe, load_model
    from valueprobe.weights import default_artifact, labels_path

    probe = ValueProbe.load(artifact or default_artifact())
    samples = load_samples(samples_path)
    if not samples:
        raise ValueError(f"no samples in {samples_path}: run `valueprobe sample-answers` first")
    labels_file = labels_path(probe.model_name)
    labels = load_labels(labels_file, model_name=probe.model_name) if labels_file and labels_file.exists() else {}
    by_id = {}
    for name in sorted({rec["dataset"] for rec in samples.values()}):
        by_id.update({q.id: q for q in load_data(name)})
    questions = [by_id[i] for i in samples if i in by_id]
    model, tok = load_model(probe.model_name)
    _, fs, pred = evaluate_artifact(probe, model, tok, questions, cache_dir=cache_dir, labels=labels)
    ids = [r["id"] for r in fs.rows]
    y = fs.labels
    se = score_rows(samples, ids)
    served = np.asarray(pred["probability"])
    rows = [{"name": "served score (prompt-only)", **score_metrics(y, served, served)},
            {"name": "max-softmax (prompt-only)", **score_metrics(y, fs.column("max_softmax"))}]
    rows += [{"name": name, **score_metrics(y, score)} for name, score in se.items()]
    tokens = float(np.mean([sum(samples[i]["tokens"]) for i in ids]))
    cost = measure_cost(model, tok, probe, questions[:cost_questions], n_samples=len(next(iter(samples.values()))["answers"]),
                        reps=cost_reps)
    prefill_s, sample_s = cost["score_s"], cost["sample_s"]
    n_samples = len(next(iter(samples.values()))["answers"])
    diff = _paired_bootstrap(y, served, se["semantic entropy (discrete)"])
    result = {"n": len(ids), "accuracy": float(y.mean()), "samples_per_question": n_samples,
              "by_source": {d: int(sum(r["dataset"] == d for r in fs.rows)) for d in sorted({r["dataset"] for r in fs.rows})},
              "rows": rows, "served_minus_se_auroc": diff, "cost": cost, "sampled_tokens_per_question": tokens}
    head = (f"Semantic entropy vs the prompt-only score: {len(ids)} held-out open questions ({result['by_source']}), "
            f"greedy accuracy {y.mean():.3f}; {n_samples} samples at temperature 1 per question, clustered by answer "
            f"equivalence")
    lines = [head, "", format_table(rows, columns=("auroc", "auroc_ci", "auprc", "aurc", "prr")), "",
             f"AUROC(served) - AUROC(semantic entropy, discrete): {diff[0]:+.3f} (95% paired bootstrap "
             f"{diff[1]:+.3f} .. {diff[2]:+.3f})",
             f"Cost per question, measured side by side ({cost['questions']} questions, {cost['reps']} interleaved "
             f"reps, 2-core CPU, fp32): prompt-only score {prefill_s:.2f} ± {cost['score_sd']:.2f} s (one prefill; "
             f"free when the sidecar answers, since the answer's own prefill carries it); {n_samples} sampled answers "
             f"{sample_s:.2f} ± {cost['sample_sd']:.2f} s ({tokens:.0f} sampled tokens on average) on top of answering: "
             f"{cost['ratio']:.1f}x the prompt-only score."]
    echo("\n".join(lines))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        # <out>.json / <out>.md: appended, not with_suffix (a dotted name such as "model-1.5b" keeps its stem)
        Path(f"{out}.json").write_text(json.dumps(result, indent=2, default=float))
        Path(f"{out}.md").write_text("## Semantic entropy (the costly anchor)\n\n" + "\n".join(lines) + "\n")
    return result
