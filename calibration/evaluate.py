"""The eval card: every score side by side on held-out data, plus plots and a markdown report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .calibrators import PlattCalibrator
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

__all__ = ["score_metrics", "BASELINES", "baseline_scores", "render_markdown", "write_plots", "format_table"]

# Prompt-only baselines read from extraction rows, oriented so that higher = more confident.
BASELINES = {
    "max-softmax": lambda rows: [r.get("max_softmax") for r in rows],
    "answer log-prob": lambda rows: [r.get("answer_logprob") for r in rows],
    "neg. entropy": lambda rows: [None if r.get("option_entropy") is None else -r["option_entropy"] for r in rows],
    "neg. question length": lambda rows: [-r["question_tokens"] for r in rows],
    # Needs the whole generated answer (not prompt-only): open questions only.
    "seq log-prob (post-gen)": lambda rows: [r.get("seq_logprob") for r in rows],
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


def baseline_scores(rows, calib_rows, y_calib) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Each available baseline on ``rows``: raw score, and a Platt-calibrated probability fitted on the
    calibration rows (so Brier/ECE compare like with like)."""
    out = {}
    for name, getter in BASELINES.items():
        raw = getter(rows)
        cal = getter(calib_rows)
        if any(v is None for v in raw) or any(v is None for v in cal):
            continue
        raw, cal = np.asarray(raw, dtype=np.float64), np.asarray(cal, dtype=np.float64)
        try:
            prob = PlattCalibrator().fit(cal, y_calib).predict_proba(raw)
        except ValueError:
            prob = None
        out[name] = (raw, prob)
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


def render_markdown(card: dict) -> str:
    """The card as a human report."""
    lines = [f"# Eval card: {card['model_name']}", ""]
    sel = card["selection"]
    lines += [
        f"- layer **{sel['layer']}** of {sel['n_layers']}, **k = {sel['k']}** value neurons "
        f"({100 * sel['fraction']:.2f}% of width {sel['width']}), head `{card['head']}`, calibrator `{card['calibrator']}`",
        "- data: " + ", ".join(f"{d} (n={v['n']}, model accuracy {v['accuracy']:.2f})" for d, v in card["data"].items()),
        f"- splits by question (seed {card['splits']['seed']}): train {card['splits']['n_train']}, "
        f"calibration {card['splits']['n_calibration']}, test {card['splits']['n_test']}; every number below is on the test split",
        f"- sparse vs random: {card['verdict']}",
        "",
        "## Test split, all data",
        "",
        format_table(card["test"]),
        "",
    ]
    for dataset, rows in card.get("test_by_dataset", {}).items():
        lines += [f"## Test split, {dataset}", "", format_table(rows), ""]
    if card.get("transfer"):
        lines += ["## Transfer (value-neuron probe AUROC; fit on row, test on column)", ""]
        cols = sorted({c for r in card["transfer"].values() for c in r})
        lines.append("| fit on \\ test on | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for src, r in card["transfer"].items():
            lines.append(f"| {src} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lines.append("")
    lines += ["## Calibrators on the test split", "", "| calibrator | brier | ece | ece (equal mass) |", "|---|---|---|---|"]
    for kind, m in card["calibrators"].items():
        lines.append(f"| {kind} | {_fmt(m['brier'])} | {_fmt(m['ece'])} | {_fmt(m['ece_equal_mass'])} |")
    random_by_k = {r["k"]: r for r in card.get("random_k_curve", [])}
    lines += ["", "## AUROC vs k (chosen layer)", "",
              "| k | share of width | pruned, nested CV on train | pruned, test | random k, test (mean ± sd) |",
              "|---|---|---|---|---|"]
    for p in card["selection"]["path"]:
        r = random_by_k.get(p["k"])
        rand = f"{r['auroc_mean']:.3f} ± {r['auroc_std']:.3f}" if r else "—"
        lines.append(f"| {p['k']} | {100 * p['fraction']:.2f}% | {p['auroc']:.3f} | {_fmt(p.get('test_auroc'))} | {rand} |")
    lines += ["", "Plots: `layers.png`, `pruning.png`, `reliability.png`.", ""]
    return "\n".join(lines)


def write_plots(card: dict, folder: str | Path) -> list[str]:
    """Layer scan, pruning path (with random-k) and reliability diagram as PNGs in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    sel = card["selection"]
    if sel.get("layer_auroc"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(sel["layer_auroc"]) + 1), sel["layer_auroc"], marker="o", ms=3)
        ax.axvline(sel["layer"], color="grey", ls="--", lw=1)
        ax.set(xlabel="layer", ylabel="dense probe CV AUROC (train)", title="Where the signal lives")
        fig.tight_layout()
        fig.savefig(folder / "layers.png", dpi=120)
        plt.close(fig)
        written.append("layers.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for layer, path in sel["paths"].items():
        ax.plot([p["k"] for p in path], [p["auroc"] for p in path], marker="o", ms=3, ls=":",
                label=f"layer {layer}, pruned (nested CV, train)")
    chosen = sel["path"]
    if chosen and "test_auroc" in chosen[0]:
        ax.plot([p["k"] for p in chosen], [p["test_auroc"] for p in chosen], marker="o", color="crimson",
                label=f"layer {sel['layer']}, pruned (test)")
    rk = card.get("random_k_curve") or []
    if rk:
        ax.errorbar([r["k"] for r in rk], [r["auroc_mean"] for r in rk], yerr=[r["auroc_std"] for r in rk],
                    color="black", fmt="s--", ms=3, capsize=2, label="random k (test)")
    ax.axvline(sel["k"], color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set(xlabel="k neurons", ylabel="AUROC", title="AUROC vs k")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "pruning.png", dpi=120)
    plt.close(fig)
    written.append("pruning.png")
    rel = card["reliability"]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="grey", lw=1)
    ax.plot(rel["confidence"], rel["accuracy"], marker="o")
    ax.set(xlabel="predicted P(correct)", ylabel="observed accuracy", title="Reliability (test)", xlim=(0, 1), ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(folder / "reliability.png", dpi=120)
    plt.close(fig)
    written.append("reliability.png")
    return written


def reliability_dict(y, prob, n_bins: int = 10) -> dict:
    conf, acc, counts = reliability_curve(y, prob, n_bins=n_bins)
    return {"confidence": conf.tolist(), "accuracy": acc.tolist(), "count": counts.tolist()}


def dump_card(card: dict) -> str:
    return json.dumps(card, sort_keys=True, default=float)


def evaluate_artifact(probe, model, tokenizer, questions, *, cache_dir=None, batch_size: int = 8,
                      max_new_tokens: int = 16, progress: bool = True):
    """Label ``questions`` with the model on the artifact's prompt format and score the artifact and the
    prompt-only baselines. Returns ``(rows, featureset, raw, prob)``."""
    from .extract import extract_features

    fs = extract_features(model, tokenizer, questions, probe.prompt_format, cache_dir=cache_dir, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, progress=progress)
    values = fs.features[:, probe.layer - 1, :][:, probe.neuron_indices]
    raw = probe.raw_scores(values)
    prob = probe.predict_proba(values)
    y = fs.labels
    rows = [{"name": "value neurons, calibrated", **score_metrics(y, raw, prob)}]
    for name, getter in BASELINES.items():
        vals = getter(fs.rows)
        if all(v is not None for v in vals):
            rows.append({"name": name, **score_metrics(y, np.asarray(vals, dtype=np.float64))})
    return rows, fs, raw, prob


def artifact_test_questions(probe, specs=None, *, seed: int = 0):
    """Questions to evaluate on, never ones the artifact was fitted or calibrated on.

    Default: the artifact's own test split (its recorded data specs, split seed and fractions). Given ``specs``
    from a data set the artifact was fitted on are reduced to that test split too; other data sets are used whole.
    """
    from .data import load_data
    from .fit import split_labels

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
