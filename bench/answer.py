"""Confidence in the answer given, beside the prompt-only score, the answer's free signals, P(True) and semantic
entropy, on the same held-out questions.

Two question sets, both never used to fit either artifact:

* the answer artifact's test split, per kind (its recorded data specs, split seed and fractions);
* the held-out open questions of the semantic-entropy table (``weights/labels/<model>.samples.jsonl``: 5 sampled
  answers per question), where semantic entropy is the costly anchor.

Features come from the extraction cache (one pass per question: the prompt's prefill, then the model's own answer
fed on its KV cache; see :func:`valueprobe.calibration.extract.extract_answer_end`). P(True) costs one more prefill
per question (the question, the proposed answer and "is it true?" as a two-option question); it is computed for
the semantic-entropy questions only and cached like every extraction. Prints AUROC, ECE and selective accuracy at
50% and 80% coverage, writes JSON, a markdown section and a risk–coverage plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COVERAGES = (0.5, 0.8)


def selective_accuracy(y, score, coverage: float) -> float:
    """Accuracy on the ``coverage`` share of questions with the highest score (ties broken by order)."""
    y, score = np.asarray(y), np.asarray(score, dtype=np.float64)
    keep = max(1, int(round(coverage * len(y))))
    order = np.argsort(-score, kind="mergesort")[:keep]
    return float(y[order].mean())


def p_true_questions(questions, answers: dict[str, str]):
    """Kadavath et al.'s P(True) as two-option questions: "Question ... Proposed answer ... Is the proposed answer
    true?" with choices True / False; P(True) is the model's probability of the first letter."""
    from valueprobe.calibration.data import Question

    return [Question(f"ptrue-{q.id}", f"{q.question}\nProposed answer: {answers[q.id]}\nIs the proposed answer true?",
                     0, ["True", "False"], "choice", f"ptrue-{q.dataset}") for q in questions]


def _p_true(rows) -> np.ndarray:
    """P(first letter) from extraction rows of the two-option questions (max-softmax is over the two letters)."""
    return np.array([r["max_softmax"] if r["prediction"] == "A" else 1 - r["max_softmax"] for r in rows])


def run(*, answer_artifact: Path, prompt_artifact: Path, samples_path: Path | None, cache_dir="runs/cache",
        out: Path | None = None, echo=print, previous_artifact: Path | None = None) -> dict:
    from valueprobe.calibration.data import interleave_sources, load_data
    from valueprobe.calibration.evaluate import ANSWER_BASELINES, format_table, score_metrics
    from valueprobe.calibration.extract import extract_answer_end, extract_features, load_labels
    from valueprobe.calibration.fit import served_answer_predictions, served_predictions
    from valueprobe.calibration.semantic import load_samples, score_rows
    from valueprobe.calibration.splits import split_labels
    from valueprobe.calibration.transfer import Side
    from valueprobe.plugin import PromptFormat, ValueProbe, load_model
    from valueprobe.weights import labels_paths

    answer_probe, prompt_probe = ValueProbe.load(answer_artifact), ValueProbe.load(prompt_artifact)
    previous = ValueProbe.load(previous_artifact) if previous_artifact is not None else None
    check_inputs(answer_probe, prompt_probe, previous, samples_path)
    card = answer_probe.eval_card
    specs = card["config"]["extra"]["data_specs"]
    seed, fractions = card["splits"]["seed"], card["splits"]["fractions"]
    if previous is not None:  # its test split must be this one's, or its fitting questions could be scored here
        old_splits = previous.eval_card.get("splits", {})
        if (old_splits.get("seed"), old_splits.get("fractions")) != (seed, fractions):
            raise ValueError(f"the previous artifact's split (seed {old_splits.get('seed')}, fractions "
                             f"{old_splits.get('fractions')}) is not this one's (seed {seed}, fractions {fractions}): "
                             "its fitting questions could be in this test split")
    questions = interleave_sources([load_data(s, seed=seed) for s in specs])
    labels = {}
    for path in labels_paths(answer_probe.model_name):  # every shipped set of the model's own answers
        labels.update(load_labels(path, model_name=answer_probe.model_name))
    model, tok = load_model(answer_probe.model_name)
    fmt = PromptFormat()
    prompt_fs, answer_fs = extract_answer_end(model, tok, questions, fmt, labels=labels, cache_dir=cache_dir)
    y = answer_fs.labels
    kind = np.array([r["kind"] for r in answer_fs.rows])
    ids = [r["id"] for r in answer_fs.rows]
    answer_p = served_answer_predictions(answer_probe, answer_fs)["probability"]
    prompt_p = served_predictions(prompt_probe, prompt_fs.features[:, prompt_probe.layer - 1].numpy().astype(np.float64),
                                  Side.from_rows(prompt_fs.rows))["probability"]
    scores = {"answer-level served score": answer_p, "prompt-only served score": prompt_p}
    if previous is not None:  # the artifact this one replaces, on the same questions
        scores[PREVIOUS] = served_answer_predictions(previous, answer_fs)["probability"]
    for name, getter in ANSWER_BASELINES.items():
        vals = getter(answer_fs.rows)
        if all(v is not None for v in vals):
            scores[name] = np.asarray(vals, dtype=np.float64)
    calibrated = {"answer-level served score", "prompt-only served score", PREVIOUS}

    def table(mask, extra: dict | None = None):
        rows = []
        for name, s in {**scores, **(extra or {})}.items():
            s = np.asarray(s)[mask] if len(s) == len(y) else np.asarray(s)
            m = score_metrics(y[mask], s, s if name in calibrated else None)
            m.update({f"selective_acc@{c:g}": selective_accuracy(y[mask], s, c) for c in COVERAGES})
            rows.append({"name": name, **m})
        return rows

    split = split_labels(ids, seed=seed, train_fraction=fractions[0], calibration_fraction=fractions[1])
    test = split == "test"
    result = {"answer_artifact": answer_probe.artifact_id, "prompt_artifact": prompt_probe.artifact_id,
              "test_split": {k: table(test & (kind == k)) for k in ("choice", "open")}}
    columns = ("auroc", "auroc_ci", "ece_equal_mass", "brier", "selective_acc@0.5", "selective_acc@0.8")
    lines = [f"Answer-level ({answer_probe.artifact_id}) vs prompt-only ({prompt_probe.artifact_id}) and the free "
             "answer-side signals, on the answer artifact's test split (never fitted or calibrated on)."]
    for k, rows in result["test_split"].items():
        lines += ["", f"{k} (n={int((test & (kind == k)).sum())}, accuracy {y[test & (kind == k)].mean():.3f}):", "",
                  format_table(rows, columns=columns)]
    result["test_split"]["all"] = table(test)
    lines += ["", f"all kinds (n={int(test.sum())}, accuracy {y[test].mean():.3f}):", "",
              format_table(result["test_split"]["all"], columns=columns)]
    if previous is not None:
        result["previous_artifact"] = previous.artifact_id
        result["loso_previous_vs_new"] = loso_comparison(previous.eval_card, card)
        lines += ["", f"The previous answer artifact ({previous.artifact_id}, `{Path(previous_artifact).name}`) is "
                  f"the row `{PREVIOUS}` above: the same questions (this artifact's test split; a question's split "
                  "is a hash of its id, so the previous artifact never fitted on them either, and the sources it "
                  "did not know it never saw at all).", "", "Leave-one-source-out, each from its own card (every "
                  "source scored by what was fitted on the others; the previous card chose its served mode on all "
                  "sources, this one without the source scored, so `change` leans against the new artifact):", "",
                  "| left-out source | previous served | new served | change | best free signal (new card) | "
                  "new − best free |", "|---|---|---|---|---|---|"]
        for s_, r in result["loso_previous_vs_new"].items():
            lines.append(f"| {s_} | {_f(r['previous'])} | {_f(r['new'])} | {_f(r['change'], '+.3f')} | "
                         f"{_f(r['best_free'])} | {_f(r['new_minus_best_free'], '+.3f')} |")
        source = np.array([r["dataset"] for r in answer_fs.rows])
        by_source = by_source_on_test_split(y, source, test, scores["answer-level served score"], scores[PREVIOUS],
                                         fitted_by_previous=set(previous.eval_card.get("data", {})))
        result["test_split_by_source"] = by_source
        lines += ["", "The test split by source, and pooled over the sources the previous artifact was fitted on and "
                  "those it never saw (this artifact was fitted on other questions of every source, so the second "
                  "group is in distribution for it only: a transfer comparison is the table above):", "",
                  "| test questions | n | new served | previous served | change |", "|---|---|---|---|---|"]
        for s_, r in by_source.items():
            lines.append(f"| {s_} | {r['n']} | {_f(r['new'])} | {_f(r['previous'])} | {_f(r['change'], '+.3f')} |")

    if samples_path is not None:
        samples = load_samples(samples_path)
        index = {i: n for n, i in enumerate(ids)}
        se_ids = [i for i in samples if i in index]
        rows_idx = np.array([index[i] for i in se_ids])
        mask = np.zeros(len(y), dtype=bool)
        mask[rows_idx] = True
        order = np.argsort(rows_idx)  # the table reads rows in feature order
        se = {name: s[order] for name, s in score_rows(samples, se_ids).items()}
        by_id = {q.id: q for q in questions}
        ptrue_q = p_true_questions([by_id[i] for i in np.asarray(se_ids)[order]],
                                   {r["id"]: r["answer"] for r in answer_fs.rows})
        ptrue_fs = extract_features(model, tok, ptrue_q, fmt, cache_dir=cache_dir)
        se["P(True) (one extra prefill)"] = _p_true(ptrue_fs.rows)
        se_rows = table(mask, se)
        result["semantic_entropy_questions"] = {"n": int(mask.sum()), "accuracy": float(y[mask].mean()), "rows": se_rows}
        lines += ["", f"The {int(mask.sum())} held-out open questions of the semantic-entropy table (accuracy "
                  f"{y[mask].mean():.3f}; semantic entropy from 5 sampled answers each, P(True) from one extra prefill):",
                  "", format_table(se_rows, columns=columns)]
        auroc = {r["name"]: r["auroc"] for r in se_rows}
        ours, se_auroc = auroc["answer-level served score"], auroc["semantic entropy (discrete)"]
        lines += ["", f"Target (answer-level ≥ semantic entropy on these questions, zero extra generations): "
                  f"{ours:.3f} vs {se_auroc:.3f}: {'met' if ours >= se_auroc else 'MISSED'}."]
        result["plot"] = _plot(y[mask], {n: (np.asarray(s)[mask] if len(s) == len(y) else s)
                                         for n, s in {**scores, **se}.items()
                                         if n in ("answer-level served score", "prompt-only served score",
                                                  "semantic entropy (discrete)", "answer mean token log-prob",
                                                  "P(True) (one extra prefill)")}, out)
    echo("\n".join(lines))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(result, indent=2, default=float))
        section = SECTION + "\n\n" + "\n".join(lines) + "\n"
        Path(f"{out}.md").write_text(section)
        update_card(Path(answer_artifact), section)
    return result


def check_inputs(answer_probe, prompt_probe, previous=None, samples_path=None) -> None:
    """Refuse, before any model is loaded, what would be read against another model: a prompt artifact, a previous
    answer artifact or a samples file (semantic entropy) whose ``model_name`` is not the answer artifact's; and a
    previous artifact that does not read the answer's end. Samples rows without ``model_name`` are accepted."""
    answer_probe.require_position("answer_end")
    want = answer_probe.model_name
    if prompt_probe is not None and prompt_probe.model_name != want:
        raise ValueError(f"the prompt artifact's model_name is {prompt_probe.model_name!r}, the answer artifact's "
                         f"{want!r}: both must read the same model")
    if previous is not None:
        previous.require_position("answer_end")
        if previous.model_name != want:
            raise ValueError(f"the previous artifact's model_name is {previous.model_name!r}, this one's {want!r}")
    if samples_path is not None:
        if not Path(samples_path).exists():
            raise ValueError(f"{samples_path}: no such samples file")
        from valueprobe.calibration.semantic import load_samples

        other = {r.get("model_name") for r in load_samples(samples_path).values()} - {want, None}
        if other:
            raise ValueError(f"{samples_path}: the samples' model_name is {sorted(other)}, the answer artifact's "
                             f"{want!r}: semantic entropy must come from the same model's answers")


PREVIOUS = "answer-level served score (previous artifact)"
FREE_BASELINES = ("baseline:answer mean token log-prob", "baseline:answer sum log-prob",
                  "baseline:answer min token log-prob", "baseline:prompt max-softmax")


def _f(v, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def loso_comparison(previous_card: dict, card: dict) -> dict:
    """Per left-out source of either card: the previous and the new served AUROC (each from its own
    leave-one-source-out), the change, and the new card's best free signal of that source."""
    old = previous_card.get("loso", {}).get("rows", {})
    new = card.get("loso", {}).get("rows", {})
    out = {}
    for s in sorted(set(old) | set(new)):
        o, n = old.get(s, {}).get("served"), new.get(s, {}).get("served")
        free = [new.get(s, {}).get(c) for c in FREE_BASELINES]
        best = max((v for v in free if v is not None), default=None)
        out[s] = {"previous": o, "new": n, "change": None if o is None or n is None else n - o, "best_free": best,
                  "new_minus_best_free": None if n is None or best is None else n - best}
    return out


def by_source_on_test_split(y, source, test, new, previous, *, fitted_by_previous: set) -> dict:
    """AUROC of the new and the previous served score on the test split, per source (marked where the previous
    artifact was fitted on it) and pooled over the sources the previous artifact was fitted on / never saw."""
    from valueprobe.calibration.metrics import auroc_score

    groups = {f"{s}{' (previous fitted on it)' if s in fitted_by_previous else ''}": test & (source == s)
              for s in sorted(set(source.tolist()))}
    seen = np.isin(source, sorted(fitted_by_previous))
    groups["all sources the previous artifact was fitted on"] = test & seen
    groups["all sources it never saw"] = test & ~seen
    out = {}
    for name, m in groups.items():
        two = m.sum() > 0 and len(np.unique(y[m])) == 2
        n_, p_ = ((auroc_score(y[m], new[m]), auroc_score(y[m], previous[m])) if two else (None, None))
        out[name] = {"n": int(m.sum()), "new": n_, "previous": p_, "change": None if n_ is None else n_ - p_}
    return out


SECTION = "## Held-out comparison with the prompt-only score, P(True) and semantic entropy (bench answer)"


def update_card(answer_artifact: Path, section: str) -> None:
    """Put ``section`` at the end of the answer artifact's card (``<stem>.md``), replacing an earlier one, so the
    card carries the semantic-entropy target's evidence next to the fit's own tables."""
    card = answer_artifact.with_name(answer_artifact.name.removesuffix(".safetensors") + ".md")
    if not card.exists():
        return
    text = card.read_text()
    if SECTION in text:
        text = text[: text.index(SECTION)].rstrip() + "\n"
    card.write_text(text + "\n" + section)


def _plot(y, scores: dict, out: Path | None) -> str | None:
    """Selective accuracy against coverage for each score (higher is better), next to ``out``."""
    if out is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from valueprobe.calibration.metrics import risk_coverage_curve

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in scores.items():
        coverage, risk = risk_coverage_curve(y, s)
        ax.plot(coverage, 1 - risk, label=name)
    ax.axhline(float(np.mean(y)), color="grey", linestyle=":", label="answer everything")
    ax.set_xlabel("coverage (share of questions answered)")
    ax.set_ylabel("accuracy on the answered share")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = f"{out}.risk_coverage.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def measure_overhead(model, tokenizer, probe, answer_probe, *, reps: int = 5, new_tokens: int = 16, batch: int = 8,
                     echo=print, previous_answer_probe=None) -> dict:
    """Seconds per batched greedy generation, side by side in one run (interleaved, rotating order): plain
    ``model.generate`` (bare), the sidecar's transformers engine with the prompt-only probe, and with both heads
    (prompt-only + answer-level, which also asks generate for its logits), and with ``previous_answer_probe`` as
    the answer head (the artifact this one replaces). Median and spread of each, the overhead of both heads over
    bare and the answer readout's own cost (both heads over the prompt-only probe) as medians of per-repetition
    ratios."""
    import time

    from valueprobe.plugin.nexttoken import prompt_kind
    from valueprobe.plugin.prompting import pad_left
    from valueprobe.server.engines.base import Prompt
    from valueprobe.server.engines.transformers_engine import TransformersEngine, _GenerateJob

    from .perf import PROMPTS

    engine = TransformersEngine(model, tokenizer, probe, max_batch_size=batch)
    prompts = [Prompt(tuple(probe.encode(tokenizer, [q])["input_ids"][0].tolist()), prompt_kind(q)) for q in PROMPTS[:batch]]
    enc = pad_left([list(p.input_ids) for p in prompts], engine.pad_id)
    eos = sorted(engine.eos_ids)

    def bare():
        # the same stopping rule as the engine (every end-of-answer token), nothing read
        model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                       pad_token_id=engine.pad_id, eos_token_id=eos)

    def engine_run(answer):
        jobs = [_GenerateJob(p, probe, new_tokens, None, None, None, [], answer_probe=answer) for p in prompts]
        engine._generate_batch(jobs)

    runs = {"bare generate": bare, "engine, prompt-only probe": lambda: engine_run(None),
            "engine, both heads": lambda: engine_run(answer_probe)}
    if previous_answer_probe is not None:
        runs["engine, both heads (previous answer artifact)"] = lambda: engine_run(previous_answer_probe)
    times = {name: [] for name in runs}
    names = list(runs)
    bare()  # warm-up
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
        echo(f"rep {rep + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names))
    ratios = np.array(times["engine, both heads"]) / np.array(times["bare generate"])
    prompt_only = np.array(times["engine, prompt-only probe"]) / np.array(times["bare generate"])
    result = {"reps": reps, "batch": batch, "new_tokens": new_tokens,
              "seconds": {n: {"median": float(np.median(t)), "min": float(np.min(t)), "max": float(np.max(t))}
                          for n, t in times.items()},
              "both_heads_over_bare": {"median": float(np.median(ratios)), "min": float(ratios.min()),
                                       "max": float(ratios.max())},
              "prompt_only_over_bare": {"median": float(np.median(prompt_only)), "min": float(prompt_only.min()),
                                        "max": float(prompt_only.max())}}
    base = np.array(times["engine, prompt-only probe"])
    for name, key in (("engine, both heads", "answer_readout_over_prompt_only"),
                      ("engine, both heads (previous answer artifact)", "previous_answer_readout_over_prompt_only")):
        if name in times:
            r = np.array(times[name]) / base
            result[key] = {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}
            echo(f"{name} vs engine with the prompt-only probe (the answer readout's own cost): "
                 f"{100 * (result[key]['median'] - 1):+.1f}% (range {100 * (r.min() - 1):+.1f}% .. "
                 f"{100 * (r.max() - 1):+.1f}%)")
    echo(f"both heads vs bare generate: {100 * (result['both_heads_over_bare']['median'] - 1):+.1f}% (median of "
         f"{reps} interleaved reps; range {100 * (ratios.min() - 1):+.1f}% .. {100 * (ratios.max() - 1):+.1f}%); "
         f"prompt-only probe vs bare: {100 * (result['prompt_only_over_bare']['median'] - 1):+.1f}%")
    return result
