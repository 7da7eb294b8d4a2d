"""Issue 31: does knowing how many options a question shows calibrate multiple choice out of distribution?

On the free signals of the answer-end cache (no hidden state: the served v2 artifact serves a free signal per kind),
each calibrator is fitted on all multiple-choice questions but one group and scored on the group left out:

- a left-out *option count* (2: BoolQ, WinoGrande; 4: ARC, MMLU, SciQ, HellaSwag; 5: CommonsenseQA; the exact
  count of each question is read from its choices);
- a left-out *source*.

Calibrators: Platt on logit(max-softmax); the same with log(options) as a second input; max-softmax measured from
the chance level (logit(p) − logit(1/options)), with and without log(options); and the free stack (max-softmax and
the answer's sum, min and mean log-probability), with and without log(options). ECE is equal-mass, 10 bins.

    .venv/bin/python weights/answer/option_calibration.py            # 1.5B: runs/cache/answer31-1.5b
    .venv/bin/python weights/answer/option_calibration.py 0.5b       # after extract.sh 0.5b

Writes weights/answer/option-calibration.<size>.md and prints it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from valueprobe.calibration.data import load_data
from valueprobe.calibration.metrics import auroc_score, expected_calibration_error
from valueprobe.plugin.readout import clipped_logit

SPECS = ["arc-challenge:300", "arc-easy:300", "commonsenseqa:300", "mmlu:600", "sciq:300", "boolq:300",
         "winogrande:300", "hellaswag:300"]  # the multiple-choice sources of weights/answer-study/extract.sh


def load(size: str):
    options = {q.id: len(q.choices) for spec in SPECS for q in load_data(spec, seed=0)}
    rows = []
    for shard in sorted(Path(f"runs/cache/answer31-{size}").glob("*-answer_end/shard-*.json")):
        rows += [r for r in json.loads(shard.read_text()) if r["kind"] == "choice" and r["id"] in options]
    if not rows:
        raise SystemExit(f"no multiple-choice rows in runs/cache/answer31-{size}: "
                         f"run weights/answer-study/extract.sh {size}")
    y = np.array([r["label"] for r in rows])
    source = np.array([r["dataset"] for r in rows])
    k = np.array([options[r["id"]] for r in rows])
    msp = clipped_logit([r["max_softmax"] for r in rows])
    answer = np.array([[r[c] for c in ("answer_sum_logprob", "answer_min_logprob", "answer_mean_logprob")]
                       for r in rows])
    return y, source, k, msp, np.maximum(answer, -30.0)


def calibrators(k, msp, answer) -> dict[str, np.ndarray]:
    log_k, above_chance = np.log(k), msp - clipped_logit(1 / k)
    return {"Platt on max-softmax": msp[:, None],
            "+ log(options)": np.c_[msp, log_k],
            "max-softmax above chance": above_chance[:, None],
            "above chance + log(options)": np.c_[above_chance, log_k],
            "free stack": np.c_[msp, answer],
            "free stack + log(options)": np.c_[msp, answer, log_k]}


def left_out(X, y, groups) -> dict:
    out = {}
    for g in np.unique(groups):
        held = groups == g
        fitted = LogisticRegression(C=1e4, max_iter=2000).fit(X[~held], y[~held])
        p = fitted.predict_proba(X[held])[:, 1]
        out[str(g)] = {"ece": float(expected_calibration_error(y[held], p, n_bins=10, strategy="quantile")),
                       "auroc": float(auroc_score(y[held], p)), "n": int(held.sum()),
                       "accuracy": float(y[held].mean()), "mean_p": float(p.mean())}
    return out


def main(size: str = "1.5b") -> str:
    y, source, k, msp, answer = load(size)
    counts = sorted(set(k.tolist()))
    common = [c for c in counts if (k == c).sum() >= 50]
    keep = np.isin(k, common)
    y, source, k, msp, answer = y[keep], source[keep], k[keep], msp[keep], answer[keep]
    lines = [f"# Calibrating multiple choice out of distribution ({size}; {len(y)} questions, option counts "
             f"{', '.join(f'{c}: {(k == c).sum()}' for c in common)})", "",
             "Printed by `.venv/bin/python weights/answer/option_calibration.py"
             + ("" if size == "1.5b" else f" {size}") + "`. ECE equal-mass, 10 bins; each group left out in turn.", "",
             "| calibrator | " + " | ".join(f"{c} options left out" for c in common)
             + " | mean over counts | mean over left-out sources | max over sources |",
             "|---|" + "---|" * (len(common) + 3)]
    for name, X in calibrators(k, msp, answer).items():
        by_k, by_source = left_out(X, y, k), left_out(X, y, source)
        per_k = [by_k[str(c)]["ece"] for c in common]
        src = [v["ece"] for v in by_source.values()]
        lines.append(f"| {name} | " + " | ".join(f"{e:.3f}" for e in per_k)
                     + f" | {np.mean(per_k):.3f} | {np.mean(src):.3f} | {max(src):.3f} |")
    accuracy = {s: float(y[source == s].mean()) for s in np.unique(source)}
    lines += ["", "Accuracy by source (what a calibrator fitted elsewhere must guess): "
              + ", ".join(f"{s} {a:.2f}" for s, a in sorted(accuracy.items(), key=lambda sa: sa[1])) + "."]
    text = "\n".join(lines) + "\n"
    Path(f"weights/answer/option-calibration.{size}.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
