"""Commands that build artifacts: `extract`, `fit` (a prompt confidence), `fit-steps` (a value over
reasoning steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import app, fail, load_model, load_probe


@app.command()
def extract(
    model: Annotated[str, typer.Option(help="Model: a known name (see README), a local HF folder, or a hub name.")],
    data: Annotated[list[str], typer.Option(help="Data spec, repeatable: file.jsonl[:N] or a built-in[:N].")],
    cache: Annotated[Path, typer.Option(help="Feature cache folder; a rerun resumes from it.")] = Path("runs/cache"),
    labels: Annotated[Optional[Path], typer.Option(help="Labels JSONL: answers generated earlier are read from it "
                                                   "(a prefill only) and every newly generated one is added to it.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per prefill batch.")] = 8,
    generate_batch_size: Annotated[int, typer.Option(help="Open questions generated together.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens for labelling open questions.")] = 16,
    wave_size: Annotated[int, typer.Option(help="Questions per wave (sources interleaved; sorted by length inside).")] = 280,
    reuse_prefix: Annotated[bool, typer.Option(help="Reuse the KV cache of the prompt prefix all questions share.")] = True,
    answer_end: Annotated[bool, typer.Option("--answer-end", help="Also read every layer at the end of the model's "
                                             "own answer (one prefill of prompt + answer; open answers from "
                                             "--labels, never generated here; the letter chosen for multiple "
                                             "choice), with the answer's token log-probabilities.")] = False,
    seed: int = 0,
    dtype: str = "float32",
):
    """Extract features, labels and next-token baselines into the resumable cache (what `fit` reads), and keep
    the generated answers in a labels file so that a later run only repeats the prefill."""
    from valueprobe.calibration.data import DataError, interleave_sources, load_data
    from valueprobe.calibration.extract import extract_answer_end, extract_features, load_labels, save_labels
    from valueprobe.plugin import PromptFormat

    try:
        questions = interleave_sources([load_data(spec, seed=seed) for spec in data])
    except DataError as exc:
        fail(str(exc))
    mdl, tok = load_model(model, dtype)
    known = load_labels(labels, model_name=model) if labels and labels.exists() else {}
    if answer_end:
        try:
            _, fs = extract_answer_end(mdl, tok, questions, PromptFormat(), labels=known, cache_dir=cache,
                                       batch_size=batch_size, max_new_tokens=max_new_tokens, reuse_prefix=reuse_prefix,
                                       wave_size=wave_size)
        except ValueError as exc:
            fail(str(exc))
        for kind in sorted({r["kind"] for r in fs.rows}):
            rows = [r for r in fs.rows if r["kind"] == kind]
            typer.echo(f"{kind}: {len(rows)} questions read at the answer's end, model accuracy "
                       f"{sum(r['label'] for r in rows) / len(rows):.3f}")
        return
    fs = extract_features(mdl, tok, questions, PromptFormat(), cache_dir=cache, batch_size=batch_size,
                          generate_batch_size=generate_batch_size, max_new_tokens=max_new_tokens, labels=known,
                          reuse_prefix=reuse_prefix, wave_size=wave_size)
    if labels:
        merged = {**known, **{r["id"]: r for r in fs.rows if r["kind"] != "choice" and r.get("generated", True)}}
        n = save_labels(list(merged.values()), labels, model_name=model, max_new_tokens=max_new_tokens)
        typer.echo(f"wrote {n} generated answers to {labels}")
    y = fs.labels
    for kind in sorted({r["kind"] for r in fs.rows}):
        m = [r["kind"] == kind for r in fs.rows]
        typer.echo(f"{kind}: {sum(m)} questions, model accuracy {y[m].mean():.3f}")


@app.command()
def fit(
    model: Annotated[str, typer.Option(help="Model: a known name (see README), a local HF folder, or a hub name.")],
    out: Annotated[Path, typer.Option(help="Artifact to write (.safetensors); report and plots go beside it.")],
    data: Annotated[list[str], typer.Option(help="Data spec, repeatable: file.jsonl[:N] or a built-in "
                                            "(mmlu, arc-easy, arc-challenge, commonsenseqa, sciq, triviaqa, nq-open, "
                                            "gsm8k)[:N]. Each spec is one source for leave-one-source-out selection.")],
    cache: Annotated[Path, typer.Option(help="Feature cache folder; a rerun resumes from it.")] = Path("runs/cache"),
    labels: Annotated[Optional[Path], typer.Option(help="Labels JSONL of earlier generated answers (see `extract`).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per prefill batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens for labelling open questions.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed for splits, sampling and probes.")] = 0,
    tolerance: Annotated[float, typer.Option(help="Chosen k: smallest whose LOSO AUROC is within this of the best.")] = 0.01,
    max_fraction: Annotated[float, typer.Option(help="Cap k at this share of the hidden width.")] = 0.01,
    layer: Annotated[Optional[list[int]], typer.Option(help="Candidate layers (1-based); default: a grid.")] = None,
    head: Annotated[list[str], typer.Option(help="Heads to compare by LOSO AUROC (linear, mlp).")] = ["linear", "mlp"],
    random_draws: Annotated[int, typer.Option(help="Random-k neuron sets for the baseline.")] = 100,
    dtype: Annotated[str, typer.Option(help="Model dtype.")] = "float32",
    name: Annotated[Optional[str], typer.Option(help="Model name recorded in the artifact (default: --model).")] = None,
    answer_end: Annotated[bool, typer.Option("--answer-end", help="Fit confidence in the model's own answer: "
                                             "states read at the answer's last token (open answers from --labels, "
                                             "the chosen letter for multiple choice; no generation), stacked with "
                                             "the answer's token log-probabilities (token_position answer_end).")] = False,
    prompt_artifact: Annotated[Optional[Path], typer.Option(help="With --answer-end: the prompt-only artifact of the "
                                                            "same model, compared as a baseline on the same questions.")] = None,
    answer_read: Annotated[str, typer.Option(help="With --answer-end: read the answer at its last token (last), as "
                                                  "the mean over its tokens (mean; a running sum in the serving "
                                                  "hooks, no extra pass), or whichever the leave-one-source-out "
                                                  "layer scan prefers (auto).")] = "auto",
):
    """Find value neurons by leave-one-source-out AUROC, stack them with the free next-token signal per question
    kind, calibrate, evaluate against baselines (transfer and test split) and write the artifact and its card.
    With --answer-end the same recipe at the end of the model's own answer (served as `confidence.answer`).
    (A value over reasoning steps is `fit-steps`.)"""
    from valueprobe.calibration.data import DataError, interleave_sources, load_data
    from valueprobe.calibration.evaluate import format_table, write_report
    from valueprobe.calibration.extract import extract_answer_end, extract_features, load_labels
    from valueprobe.calibration.fit import FitConfig, fit_artifact, served_predictions
    from valueprobe.calibration.transfer import Side
    from valueprobe.plugin import PromptFormat, ValueProbe, save_artifact
    from valueprobe.plugin.artifact import ANSWER_END, TOKEN_POSITION

    try:
        questions = interleave_sources([load_data(spec, seed=seed) for spec in data])
    except DataError as exc:
        fail(str(exc))
    mdl, tok = load_model(model, dtype)
    fmt = PromptFormat()
    known = load_labels(labels, model_name=model) if labels and labels.exists() else {}
    extra = {"data_specs": list(data), "max_new_tokens": max_new_tokens}
    if answer_end:
        try:
            prompt_features, features = extract_answer_end(mdl, tok, questions, fmt, labels=known, cache_dir=cache,
                                                           batch_size=batch_size, max_new_tokens=max_new_tokens)
        except ValueError as exc:
            fail(str(exc))
        if prompt_artifact is not None:
            probe = load_probe(prompt_artifact)
            X = prompt_features.features[:, probe.layer - 1, :].numpy().astype("float64")
            served = served_predictions(probe, X, Side.from_rows(prompt_features.rows))["probability"]
            for row, p in zip(features.rows, served):
                row["prompt_probability"] = float(p)
            extra["prompt_artifact"] = f"{prompt_artifact.name} (id {probe.artifact_id})"
    else:
        features = extract_features(mdl, tok, questions, fmt, cache_dir=cache, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, labels=known)
    if answer_read not in ("last", "mean", "auto"):
        fail(f"--answer-read must be last, mean or auto, not {answer_read!r}")
    cfg = FitConfig(seed=seed, tolerance=tolerance, max_fraction=max_fraction, layers=layer, heads=tuple(head),
                    random_draws=random_draws, extra=extra, answer_read=answer_read)
    try:
        artifact, card = fit_artifact(mdl, tok, features, model_name=name or model, prompt_format=fmt, config=cfg,
                                      token_position=ANSWER_END if answer_end else TOKEN_POSITION)
    except ValueError as exc:
        fail(str(exc))
    save_artifact(artifact, out)
    plots = write_report(card, out)
    typer.echo(format_table(card["test"]["all"]))
    typer.echo(card["verdict"])
    typer.echo(f"wrote {out} (id {artifact.metadata['content_sha256'][:12]}), its card and {len(plots)} plots")


@app.command("fit-steps")
def fit_steps(
    model: Annotated[str, typer.Option(help="Model: a known name (see README), a local HF folder, or a hub name.")],
    traces: Annotated[Path, typer.Option(help="Reasoning traces (`valueprobe traces`) to fit the value over steps on.")],
    out: Annotated[Path, typer.Option(help="Step-value artifact to write (.safetensors); its card goes beside it.")],
    states: Annotated[Path, typer.Option(help="States recorded by `valueprobe traces` (else re-read by prefill).")] =
        Path("runs/traces"),
    layer: Annotated[int, typer.Option(help="The layer read (1-based; the dopamine study's choice).")] = 16,
    objective: Annotated[str, typer.Option(help="td (temporal difference) or bce (final reward).")] = "td",
    seed: Annotated[int, typer.Option(help="Seed for the problem split and the head.")] = 0,
    dtype: Annotated[str, typer.Option(help="Model dtype.")] = "float32",
    name: Annotated[Optional[str], typer.Option(help="Model name recorded in the artifact (default: --model).")] = None,
):
    """Fit a value over reasoning steps (the PRM the sidecar's search uses): an MLP head on the whole layer at step
    ends, trained on problems split from the ones it is scored on; writes a step_end artifact and its card."""
    from valueprobe.calibration.step_value import fit_steps_from_traces, render_markdown
    from valueprobe.calibration.trajectories import load_traces
    from valueprobe.plugin import save_artifact

    traces_ = load_traces(traces)
    if not traces_:
        fail(f"no traces in {traces}")
    mdl, tok = load_model(model, dtype)
    try:
        artifact, card = fit_steps_from_traces(mdl, tok, traces_, states_dir=states, layer=layer,
                                               model_name=name or model, objective=objective, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    save_artifact(artifact, out)
    markdown = render_markdown(card)
    (out.parent / f"{out.name.removesuffix('.safetensors')}.md").write_text(markdown)
    typer.echo(markdown)
    typer.echo(f"wrote {out} (id {artifact.metadata['content_sha256'][:12]})")
