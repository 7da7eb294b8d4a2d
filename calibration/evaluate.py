"""The eval card: every score side by side on held-out data, plus plots and a markdown report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .metrics import (
    auroc_confidence_interval,
    aurc_loss,
    auprc_score,
    auroc_score,
    brier_loss,
    expected_calibration_error,
    prr_score,
    reliability_curve,
)

__all__ = ["score_metrics", "BASELINES", "ANSWER_BASELINES", "evaluate_answers", "render_markdown", "write_plots", "write_report", "format_table",
           "evaluate_artifact", "prediction_records", "artifact_test_questions", "route_big_probabilities",
           "add_route_gain"]

# Prompt-only baselines read from extraction rows, oriented so that higher = more confident.
BASELINES = {
    "max-softmax": lambda rows: [r.get("max_softmax") for r in rows],
    "answer log-prob": lambda rows: [r.get("answer_logprob") for r in rows],
    "neg. entropy": lambda rows: [None if r.get("option_entropy") is None else -r["option_entropy"] for r in rows],
    "neg. question length": lambda rows: [-r["question_tokens"] for r in rows],
    # Needs the whole generated answer (not prompt-only): open questions only.
    "seq log-prob (post-gen)": lambda rows: [r.get("seq_logprob") for r in rows],
}
# Answer-side baselines, from rows read at the answer's end (the same pass: prompt + the model's answer).
ANSWER_BASELINES = {
    "answer mean token log-prob": lambda rows: [r.get("answer_mean_logprob") for r in rows],
    "answer sum log-prob": lambda rows: [r.get("answer_sum_logprob") for r in rows],
    "answer min token log-prob": lambda rows: [r.get("answer_min_logprob") for r in rows],
    "neg. answer length": lambda rows: [None if r.get("answer_tokens") is None else -r["answer_tokens"] for r in rows],
    "prompt max-softmax": lambda rows: [r.get("max_softmax") for r in rows],
    "prompt-only served score": lambda rows: [r.get("prompt_probability") for r in rows],
    "P(True)": lambda rows: [r.get("p_true") for r in rows],
}


def _nan(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def score_metrics(y, score, prob=None) -> dict:
    """AUROC/AUPRC/AURC/PRR on ``score``; Brier and ECE (equal-width and equal-mass) on ``prob`` when given."""
    y = np.asarray(y)
    score = np.asarray(score, dtype=np.float64)
    out = {"n": int(len(y)), "accuracy": float(y.mean())}
    try:
        out.update(auroc=auroc_score(y, score), auprc=auprc_score(y, score), prr=prr_score(y, score),
                   auroc_ci=list(auroc_confidence_interval(y, score)))
    except ValueError:
        out.update(auroc=None, auprc=None, prr=None, auroc_ci=None)
    out["aurc"] = aurc_loss(y, score)
    if prob is not None:
        prob = np.asarray(prob, dtype=np.float64)
        out.update(
            brier=brier_loss(y, prob),
            ece=expected_calibration_error(y, prob, n_bins=15, strategy="uniform"),
            ece_equal_mass=expected_calibration_error(y, prob, n_bins=10, strategy="quantile"),
        )
    else:
        out.update(brier=None, ece=None, ece_equal_mass=None)
    return out


def _fmt(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(rows: list[dict], columns=("auroc", "auroc_ci", "auprc", "brier", "ece", "ece_equal_mass", "aurc", "prr")) -> str:
    """Markdown table of named metric rows (``auroc_ci``: 95% bootstrap interval over questions)."""
    head = "| score | " + " | ".join(columns) + " |"
    sep = "|---|" + "---|" * len(columns)
    lines = [head, sep]
    for row in rows:
        name = row["name"] + (f" (sd over seeds {row['auroc_std']:.3f})" if row.get("auroc_std") is not None else "")
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(f"{v[0]:.2f}–{v[1]:.2f}" if c == "auroc_ci" and v else _fmt(_nan(v)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loso_table(card: dict) -> list[str]:
    rows = card.get("loso", {}).get("rows", {})
    if not rows:
        return []
    head = card["head"]
    answer_end = card.get("token_position") == "answer_end"
    free = "free stack" if answer_end else "next-token stack"
    cols = [("kind", "kind"), ("n", "n"), ("accuracy", "model acc."), ("served_mode", "serves"), ("served", "**served**"),
            ("served_ece", "served ECE (eq. mass)"), ("max_softmax", "max-softmax"),
            ("next_token_stack", free), (f"served_{head}", f"value + {free}"),
            (f"value_{head}", "value neurons"), ("dense", "dense, same layer"),
            ("random_mean", "random-k mean"), ("random_sd", "random-k sd"), ("value_percentile", "value pct. of random"),
            ("ood_auroc", "OOD AUROC")]
    if answer_end:  # the answer's free signals on the same left-out sources
        cols[7:7] = [(f"baseline:{name}", name) for name in ("answer sum log-prob", "answer mean token log-prob",
                                                            "answer min token log-prob", "prompt-only served score")]
    out = ["| left-out source | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for s, r in rows.items():
        out.append(f"| {s} | " + " | ".join(_fmt(r.get(c[0]), 1 if c[0] == "value_percentile" else 3) for c in cols) + " |")
    return out


def _options_table(card: dict) -> list[str]:
    """Multiple choice with one option count left out at a time (answer-level fits)."""
    block = card.get("loso_by_options") or {}
    rows = block.get("rows", {})
    if not rows:
        return []
    out = ["## Left-out option count (multiple choice)", "",
           "Multiple-choice questions grouped by how many options they show; each group scored by everything fitted "
           "on the other groups only (chosen layer, k and head; stack with the chance level `log options`).", "",
           "| left-out count | sources | n | model acc. | serves | **served** | served ECE (eq. mass) | max-softmax | "
           "answer sum log-prob |", "|---|---|---|---|---|---|---|---|---|"]
    for g, r in rows.items():
        out.append(f"| {g} | {', '.join(block.get('sources', {}).get(g, []))} | {r['n']} | {_fmt(r['accuracy'])} | "
                   f"{r.get('served_mode')} | {_fmt(r.get('served'))} | {_fmt(r.get('served_ece'))} | "
                   f"{_fmt(r.get('max_softmax'))} | {_fmt(r.get('baseline:answer sum log-prob'))} |")
    return out + [""]


def served_label(served_by_kind: dict, free: str) -> str:
    """What the served score is, in words: ``value neurons + <free>, per kind`` when every kind stacks them, else
    per kind (``choice: answer_sum_logprob alone, open: ...``), so no row or header claims neurons a kind does not
    serve."""
    modes = dict(served_by_kind or {})
    if not modes or all(m == "stacked" for m in modes.values()):
        return f"value neurons + {free}, per kind"
    if all(m.startswith("value") for m in modes.values()):
        return "value neurons, calibrated"
    words = {"stacked": f"value neurons + {free}", "next_token": "free signals stacked", "value": "value neurons",
             "value (no stacker)": "value neurons"}
    return ", ".join(f"{k}: {words.get(m, m.removeprefix('free:') + ' alone')}" for k, m in sorted(modes.items()))


def render_markdown(card: dict) -> str:
    """The card as a human report: transfer first (the headline), then the within-distribution test split."""
    sel = card["selection"]
    s = card["splits"]
    answer_end = card.get("token_position") == "answer_end"
    names = card.get("stack_features") or []
    free = (("the prompt's next-token features and the answer's " +
             ("sum, min and mean token log-probability and the chance level (log options)"
              if "log_options" in names else "sum and min token log-probability")) if answer_end
            else "next-token features")
    lines = [
        f"# Eval card: {card['model_name']}" + (" — confidence in the answer given (answer_end)" if answer_end else ""),
        "",
        f"- served score: **{card.get('served_score', 'value')}** ({served_label(card.get('served_by_kind'), free)}; "
        "Platt-calibrated per kind)" if card.get("served_score") == "stacked" else
        f"- served score: **{card.get('served_score', 'value')}** (value neurons, calibrated)",
        *([("- read at the last token of the model's own answer" if card.get("answer_read", "last") == "last" else
            "- read as the mean over the tokens of the model's own answer (`answer_read: mean`)")
           + " (greedy answers from the labels file; the letter chosen "
           "for multiple choice); `prompt-only served score` is the shipped prompt-only artifact on the same "
           "questions (fitted on every source's train split, so its leave-one-source-out column is not held out)"]
          if answer_end else []),
        *([f"- how the answer is read, chosen by the leave-one-source-out layer scan (dense probe, mean and minimum "
           "over left-out sources averaged): " + "; ".join(
               f"{r}: best {max(sc.values()):.3f} at layer {max(sc, key=sc.get)}" for r, sc in card["read_scan"].items())]
          if len(card.get("read_scan") or {}) > 1 else []),
        *([f"- served per kind: {', '.join(f'{k}: `{v}`' for k, v in card.get('served_by_kind', {}).items())}; stack "
           "monotone in the free signals (a column whose weight comes out negative is dropped)"]
          if card.get("monotone_stack") else []),
        f"- layer **{sel['layer']}** of {sel['n_layers']}, **k = {sel['k']}** value neurons "
        f"({100 * sel['fraction']:.2f}% of width {sel['width']}), head `{card['head']}`; chosen by {sel.get('criterion', '')}",
        "- data: " + ", ".join(f"{d} ({v.get('kind', '')}, n={v['n']}, model accuracy {v['accuracy']:.2f})"
                               for d, v in card["data"].items()),
        f"- splits by question (seed {s['seed']}): train {s['n_train']}, calibration {s['n_calibration']}, "
        f"test {s['n_test']} ({', '.join(f'{k} {v}' for k, v in s.get('n_test_by_kind', {}).items())})",
        "",
        "## Verdict",
        "",
        card.get("verdict", ""),
        "",
    ]
    if card.get("loso", {}).get("rows"):
        lines += ["## Leave-one-source-out (headline robustness)", "",
                  "Each row: everything (neurons, heads, stackers, calibrators, OOD model) fitted on the other sources "
                  "only, then every question of the left-out source scored. AUROC unless named.", ""]
        lines += _loso_table(card) + ["",
                  ("`serves`: the score (value + free stack, free stack alone, one free signal alone (`free:`), or "
                   "value neurons alone) with the best mean over the *other* left-out sources of that kind: the mode "
                   "is chosen without the source it is scored on (nested). The read, layer, k, head and calibration "
                   "were chosen on every source's left-out numbers, this one's included, so the **served** column "
                   "stays mildly optimistic. The " if card["loso"].get("nested_mode") else
                   "`serves`: per kind, the score (value + next-token stack, next-token stack alone, or value neurons "
                   "alone) with the best mean over that kind's left-out sources. That choice is made on these same "
                   "numbers, so the **served** column is slightly optimistic; the other columns are not chosen on it. "
                   "The ") +
                  "artifact serves, per kind, the mode with the best mean over all of that kind's sources. Random-k: draws of k neurons of the same layer (the "
                  "smallest k of the curve when the served head is dense), same (linear) head, same weighting; "
                  "`value pct. of random` is the value set's percentile among them.", ""]
        lines += _options_table(card)
        kc = card["selection"].get("k_curve", {})
        if kc:
            lines += ["### AUROC vs k (value neurons, linear head, mean over left-out sources)", "",
                      "| k | share of width | mean LOSO AUROC |", "|---|---|---|"]
            for k, per in sorted(kc.items(), key=lambda kv: -int(kv[0])):
                vals = [v for v in per.values() if v is not None]
                lines.append(f"| {k} | {100 * int(k) / sel['width']:.2f}% | {_fmt(sum(vals) / len(vals) if vals else None)} |")
            lines.append("")
    for key, title in (("all", "all kinds"), ("choice", "multiple choice"), ("open", "open questions")):
        if key in card["test"]:
            lines += [f"## Test split (within distribution), {title}", "", format_table(card["test"][key]), ""]
    for dataset, rows in card.get("test_by_dataset", {}).items():
        lines += [f"### Test split, {dataset}", "", format_table(rows), ""]
    ood = card.get("ood", {})
    if ood:
        lines += ["## Out-of-distribution flag", "",
                  f"Mahalanobis distance on the {ood.get('space')}, flagged above the {ood.get('quantile')} quantile "
                  f"of the calibration split ({_fmt(ood.get('threshold'))}); {100 * ood.get('test_flagged', 0):.1f}% of "
                  "the test split is flagged.", ""]
        if ood.get("loso_auroc"):
            lines += ["| left-out source | AUROC of the distance (left-out vs fitted sources' test rows) |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in ood["loso_auroc"].items()]
            lines.append("")
        if "loso_ece_flagged" in ood:
            lines += [f"Calibration of the served score on left-out sources: ECE (equal mass) "
                      f"{_fmt(ood['loso_ece_flagged'])} on flagged prompts (n={ood['loso_n_flagged']}) vs "
                      f"{_fmt(ood.get('loso_ece_not_flagged'))} on the rest (n={ood.get('loso_n_not_flagged')}).", ""]
    lines += ["Plots: `reliability.png` (per kind), `loso.png`, `layers.png`.", ""]
    return "\n".join(lines)


def write_plots(card: dict, folder: str | Path) -> list[str]:
    """Reliability diagram per kind, the leave-one-source-out bars and the layer scan, as PNGs in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    rel = card.get("reliability", {})
    if rel:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], color="grey", lw=1)
        for kind, r in rel.items():
            ax.plot(r["confidence"], r["accuracy"], marker="o", label=kind)
        ax.set(xlabel="served P(correct)", ylabel="observed accuracy", title="Reliability per kind (test split)",
               xlim=(0, 1), ylim=(0, 1))
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "reliability.png", dpi=120)
        plt.close(fig)
        written.append("reliability.png")
    rows = card.get("loso", {}).get("rows", {})
    if rows:
        head = card["head"]
        names = list(rows)
        series = [("served", "served"), ("max-softmax", "max_softmax"), ("next-token stack", "next_token_stack"),
                  ("value neurons", f"value_{head}"), ("dense", "dense"), ("random-k mean", "random_mean")]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        width = 0.8 / len(series)
        for j, (label, key) in enumerate(series):
            ax.bar([i + j * width for i in range(len(names))], [rows[n].get(key) or 0 for n in names], width, label=label)
        ax.axhline(0.72, color="grey", ls=":", lw=1)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20, fontsize=8)
        ax.set(ylim=(0.4, 1.0), ylabel="AUROC on the left-out source", title="Leave-one-source-out")
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(folder / "loso.png", dpi=120)
        plt.close(fig)
        written.append("loso.png")
    scores = card["selection"].get("layer_scores", {})
    if scores:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ls = sorted((int(k), v) for k, v in scores.items())
        ax.plot([x for x, _ in ls], [v for _, v in ls], marker="o", ms=3)
        ax.axvline(card["selection"]["layer"], color="grey", ls="--", lw=1)
        ax.set(xlabel="layer", ylabel="dense probe AUROC", title=card["selection"].get("criterion", "layer scan"))
        fig.tight_layout()
        fig.savefig(folder / "layers.png", dpi=120)
        plt.close(fig)
        written.append("layers.png")
    return written


def reliability_dict(y, prob, n_bins: int = 10) -> dict:
    conf, acc, counts = reliability_curve(y, prob, n_bins=n_bins)
    return {"confidence": conf.tolist(), "accuracy": acc.tolist(), "count": counts.tolist()}


def evaluate_artifact(probe, model, tokenizer, questions, *, cache_dir=None, batch_size: int = 8,
                      max_new_tokens: int = 16, labels: dict | None = None, progress: bool = True):
    """Label ``questions`` with the model on the artifact's prompt format and score the artifact's served
    probability, its parts and the prompt-only baselines. Returns ``(rows, featureset, predictions)`` where
    ``predictions`` holds per-question arrays (``probability``, ``value_raw``, ``value_probability``, and
    ``ood_distance`` / ``ood`` when the artifact has an OOD model). ``labels`` (``id -> row`` of a labels file)
    supplies answers generated earlier, so open questions found there get a prefill only."""
    from .extract import extract_features

    fs = extract_features(model, tokenizer, questions, probe.prompt_format, cache_dir=cache_dir, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, labels=labels, progress=progress)
    values = fs.features[:, probe.layer - 1, :][:, probe.neuron_indices]
    kinds = ["choice" if r["kind"] == "choice" else "open" for r in fs.rows]
    pred = probe.predict(values, fs.column("max_softmax"), fs.column("option_entropy"), kinds)
    y = fs.labels
    rows = [{"name": f"served score ({probe.served_score})", **score_metrics(y, pred["probability"], pred["probability"])},
            {"name": "value neurons, calibrated", **score_metrics(y, pred["value_raw"], pred["value_probability"])}]
    for name, getter in BASELINES.items():
        vals = getter(fs.rows)
        if all(v is not None for v in vals):
            rows.append({"name": name, **score_metrics(y, np.asarray(vals, dtype=np.float64))})
    return rows, fs, pred


def evaluate_answers(answer_probe, model, tokenizer, fs, questions, *, cache_dir=None, batch_size: int = 8,
                     max_new_tokens: int = 16, progress: bool = True):
    """Confidence in the answers of ``fs`` (a prompt-only extraction of ``questions``, whose open answers were
    generated or read from a labels file): one more pass per question reads ``answer_probe`` at each answer's end.
    Returns ``(rows, answer featureset, predictions)`` like :func:`evaluate_artifact`, with the answer-side
    baselines."""
    from .extract import extract_features
    from .transfer import Side

    answer_probe.require_position("answer_end")
    labels = {r["id"]: r for r in fs.rows if r["kind"] != "choice"}
    answers = {i: r["prediction"] for i, r in labels.items()}
    afs = extract_features(model, tokenizer, questions, answer_probe.prompt_format, cache_dir=cache_dir,
                           batch_size=batch_size, max_new_tokens=max_new_tokens, labels=labels, answers=answers,
                           progress=progress)
    from .fit import served_answer_predictions

    pred = served_answer_predictions(answer_probe, afs)
    y = afs.labels
    rows = [{"name": "answer-level served score", **score_metrics(y, pred["probability"], pred["probability"])}]
    for name, getter in ANSWER_BASELINES.items():
        vals = getter(afs.rows)
        if all(v is not None for v in vals):
            rows.append({"name": name, **score_metrics(y, np.asarray(vals, dtype=np.float64))})
    return rows, afs, pred


def write_report(card: dict, artifact_path: str | Path) -> list[str]:
    """Beside an artifact ``<stem>.safetensors``: its card as ``<stem>.md`` and the plots in ``<stem>.plots/``.
    Returns the plot file names."""
    artifact_path = Path(artifact_path)
    stem = artifact_path.name.removesuffix(".safetensors")
    plots = write_plots(card, artifact_path.parent / f"{stem}.plots")
    markdown = render_markdown(card)
    for plot in plots:
        markdown = markdown.replace(f"`{plot}`", f"`{stem}.plots/{plot}`")
    (artifact_path.parent / f"{stem}.md").write_text(markdown)
    return plots


def prediction_records(probe, fs, pred, answer_fs=None, answer_pred=None) -> list[dict]:
    """One JSON-ready record per question of :func:`evaluate_artifact`: label, the model's answer, the served
    probability and its parts, the out-of-distribution flag where the artifact has one, and every baseline; with
    :func:`evaluate_answers`' results also ``answer_probability``, ``answer_raw`` and the answer-side baselines."""
    records = []
    for i, row in enumerate(fs.rows):
        rec = {"id": row["id"], "dataset": row["dataset"], "kind": row["kind"], "label": row["label"],
               "prediction": row["prediction"], "probability": float(pred["probability"][i]),
               "served_score": probe.served_score, "raw": float(pred["value_raw"][i]),
               "value_probability": float(pred["value_probability"][i])}
        if "ood" in pred:
            rec.update(ood=bool(pred["ood"][i]), ood_distance=float(pred["ood_distance"][i]))
        rec.update({name: getter([row])[0] for name, getter in BASELINES.items()})
        if answer_fs is not None:
            arow = answer_fs.rows[i]
            rec.update(answer=arow["answer"], answer_probability=float(answer_pred["probability"][i]),
                       answer_raw=float(answer_pred["value_raw"][i]))
            rec.update({name: getter([arow])[0] for name, getter in ANSWER_BASELINES.items() if name != "P(True)"})
        records.append(rec)
    return records


def route_big_probabilities(fs, pred) -> dict[str, float]:
    """``id -> the big model's served prompt-only probability`` from :func:`evaluate_artifact`'s ``(fs, pred)`` of
    the big model's artifact: P_big of the expected gain."""
    return {row["id"]: float(pred["probability"][i]) for i, row in enumerate(fs.rows)}


def add_route_gain(records: list[dict], big_probability: dict[str, float], *, answer_level: bool) -> list[dict]:
    """Copies of the small model's :func:`prediction_records` with the routing score: ``route_big_probability``
    (P_big, from :func:`route_big_probabilities`), ``route_small_field`` (the record field used as P_small:
    ``answer_probability`` when ``answer_level``, else the prompt-only ``probability``) and ``route_gain`` =
    :func:`valueprobe.calibration.routing.expected_gain` (P_big, P_small), the score the served policy escalates
    on (higher first). Raises ``ValueError`` when a record's question has no P_big or no answer-level
    probability."""
    from .routing import expected_gain

    field = "answer_probability" if answer_level else "probability"
    missing = [r["id"] for r in records if r["id"] not in big_probability]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no big-model probability, e.g. {missing[:3]}")
    out = []
    for rec in records:
        if rec.get(field) is None:
            raise ValueError(f"record {rec['id']} has no {field}")
        p_big = float(big_probability[rec["id"]])
        out.append({**rec, "route_big_probability": p_big, "route_small_field": field,
                    "route_gain": expected_gain(p_big, float(rec[field]))})
    return out


def artifact_test_questions(probe, specs=None, *, seed: int = 0):
    """Questions to evaluate on, never ones the artifact was fitted or calibrated on.

    Default: the artifact's own test split (its recorded data specs, split seed and fractions). Given ``specs``
    from a data set the artifact was fitted on are reduced to that test split too; other data sets are used whole.
    """
    from .data import load_data
    from .splits import split_labels

    card = probe.eval_card
    fitted_specs = card.get("config", {}).get("extra", {}).get("data_specs") or []
    fitted_names = {spec.partition(":")[0] for spec in fitted_specs}
    specs = specs or fitted_specs
    if not specs:
        raise ValueError("no data given and the artifact records no data specs")
    s = card.get("splits")
    out = []
    for spec in specs:
        questions = load_data(spec, seed=seed)
        if s and spec.partition(":")[0] in fitted_names:
            labels = split_labels([q.id for q in questions], seed=s["seed"], train_fraction=s["fractions"][0],
                                  calibration_fraction=s["fractions"][1])
            questions = [q for q, lab in zip(questions, labels) if lab == "test"]
        out.extend(questions)
    return out
