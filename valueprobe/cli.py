"""The ``valueprobe`` command line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="valueprobe: calibrated confidence for LLM answers from a sparse set of value neurons.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks that print measured ratios (quality, perf).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

from valueprobe.weights import default_artifact


def _fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load_probe(path: Path, position: Optional[str] = "last_prompt_token"):
    """Load and validate an artifact; with ``position``, refuse one read at another token position."""
    from valueprobe.plugin import ArtifactError, ValueProbe

    try:
        probe = ValueProbe.load(path)
        if position is not None:
            probe.require_position(position)
        return probe
    except ArtifactError as exc:
        _fail(str(exc))


def limit_heap_fragmentation(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes or more by mmap, so that freed ones go back to the OS at once.
    Decoding grows every layer's KV cache by re-allocating it each step; under glibc's adaptive threshold those
    blocks land on the heap and fragment it (`traces`, one batch of 16 rows x 256 new tokens of the 1.5B model:
    past 23.5 GB RSS on a 24 GB machine before it was stopped, and a 7.3 GB peak with this). It costs time
    (every large block is fresh pages: 16 x 128 tokens took 2:42 vs 2:16 and 3:05 vs 2:15 in two paired runs,
    peaks 7.1 vs 16.3 and 8.5 GB), so only `traces` uses it. glibc on Linux only; ``MALLOC_MMAP_THRESHOLD_`` in
    the environment wins (glibc then uses that value). Returns whether it took effect."""
    import ctypes
    import sys

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, int(threshold)))


def _load_model(name: str, dtype: str):
    import torch

    from valueprobe.plugin.models import ModelNotInstalledError, load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        return load_model(name, dtype=dtype)
    except ModelNotInstalledError as exc:
        _fail(str(exc))


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact (.safetensors) to describe.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw metadata as JSON.")] = False,
):
    """Print an artifact's metadata and eval card (validates the whole file first)."""
    from valueprobe.calibration.evaluate import render_markdown

    probe = _load_probe(artifact, position=None)
    md = probe.data.metadata
    if as_json:
        typer.echo(json.dumps({k: (json.loads(v) if k in ("eval_card", "thresholds", "prompt_format", "model_fingerprint",
                                                          "tokenizer_fingerprint", "library_versions") else v) for k, v in md.items()},
                              indent=2, sort_keys=True))
        return
    typer.echo(f"artifact      {artifact}  (id {probe.artifact_id}, format {md['format_version']})")
    typer.echo(f"model         {md['model_name']}")
    typer.echo(f"layer         {probe.layer} ({md['hook_point']}, {md['token_position']})")
    typer.echo(f"neurons       k={probe.k} of {probe.hidden_size} ({100 * probe.k / probe.hidden_size:.2f}%)")
    typer.echo(f"head          {probe.head}, calibrator {probe.calibrator}, objective {md['objective']}")
    typer.echo(f"served score  {probe.served_score}" + (f" (stacked per kind: {', '.join(probe.stack_kinds)})"
                                                       if probe.served_score == "stacked" else ""))
    typer.echo(f"prompt format {md['prompt_format']}")
    if probe.thresholds:
        typer.echo(f"thresholds    {json.dumps(probe.thresholds, sort_keys=True)}")
    if probe.eval_card:
        typer.echo("")
        if probe.token_position == "step_end":
            from valueprobe.calibration.step_value import render_markdown as render_steps

            typer.echo(render_steps(probe.eval_card))
        else:
            typer.echo(render_markdown(probe.eval_card))


@app.command()
def score(
    prompts: Annotated[list[str], typer.Argument(help="Questions to score (prompt-only, no generation).")],
    artifact: Annotated[Optional[Path], typer.Option(help="Artifact; default: the shipped default.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model name or folder; default: the artifact's model.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 (fastest on CPU), bfloat16 or float16.")] = "float32",
    check_fingerprint: Annotated[bool, typer.Option(help="Refuse a model whose fingerprint differs.")] = True,
):
    """Score questions with an artifact: prints raw score and calibrated P(correct) per question."""
    probe = _load_probe(artifact or default_artifact())
    mdl, tok = _load_model(model or probe.model_name, dtype)
    from valueprobe.plugin import FingerprintMismatchError

    try:
        results = probe.score(mdl, tok, list(prompts), check_fingerprint=check_fingerprint)
    except FingerprintMismatchError as exc:
        _fail(str(exc))
    for prompt, r in zip(prompts, results):
        typer.echo(f"{r.probability:.3f}  (raw {r.raw:+.3f})  {prompt}")


@app.command()
def restamp(
    artifact: Annotated[Path, typer.Argument(help="Artifact (.safetensors) whose fingerprint to record anew.")],
    out: Annotated[Optional[Path], typer.Option(help="Write here instead of replacing ARTIFACT.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model name or folder; default: the artifact's model.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 (fastest on CPU), bfloat16 or float16.")] = "float32",
):
    """Record an artifact's tokenizer fingerprint in the current scheme, for the checkpoint it was fitted on.

    For artifacts stamped before scheme 2, whose fingerprint hashed special-token attributes that transformers
    releases read differently from one checkpoint. Refused unless the layer weights, config, vocabulary and chat
    template all match; tensors, card and thresholds are kept (a new content hash, ``restamped_from`` the old)."""
    from valueprobe.plugin import FingerprintMismatchError

    probe = _load_probe(artifact, position=None)
    mdl, tok = _load_model(model or probe.model_name, dtype)
    try:
        fresh = probe.restamped(mdl, tok)
    except FingerprintMismatchError as exc:
        _fail(str(exc))
    fresh.save(out or artifact)
    typer.echo(f"restamped {artifact} (id {probe.artifact_id}, scheme {probe.fingerprint_scheme}) -> {out or artifact} "
               f"(id {fresh.artifact_id}, scheme {fresh.fingerprint_scheme})")


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
        _fail(str(exc))
    mdl, tok = _load_model(model, dtype)
    known = load_labels(labels, model_name=model) if labels and labels.exists() else {}
    if answer_end:
        try:
            _, fs = extract_answer_end(mdl, tok, questions, PromptFormat(), labels=known, cache_dir=cache,
                                       batch_size=batch_size, max_new_tokens=max_new_tokens, reuse_prefix=reuse_prefix,
                                       wave_size=wave_size)
        except ValueError as exc:
            _fail(str(exc))
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
    data: Annotated[Optional[list[str]], typer.Option(help="Data spec, repeatable: file.jsonl[:N] or a built-in "
                                            "(mmlu, arc-easy, arc-challenge, commonsenseqa, sciq, triviaqa, nq-open, "
                                            "gsm8k)[:N]. Each spec is one source for leave-one-source-out selection.")] = None,
    traces: Annotated[Optional[Path], typer.Option(help="Trajectory mode: fit a value over reasoning steps on these "
                                                   "traces (`valueprobe traces`) instead of a prompt confidence on "
                                                   "--data; writes a step_end artifact for the sidecar's search.")] = None,
    states: Annotated[Path, typer.Option(help="Trajectory mode: states recorded by `valueprobe traces`.")] =
        Path("runs/traces"),
    objective: Annotated[str, typer.Option(help="Trajectory mode: td (temporal difference) or bce (final reward).")] =
        "td",
    cache: Annotated[Path, typer.Option(help="Feature cache folder; a rerun resumes from it.")] = Path("runs/cache"),
    labels: Annotated[Optional[Path], typer.Option(help="Labels JSONL of earlier generated answers (see `extract`).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per prefill batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens for labelling open questions.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed for splits, sampling and probes.")] = 0,
    tolerance: Annotated[float, typer.Option(help="Chosen k: smallest whose LOSO AUROC is within this of the best.")] = 0.01,
    max_fraction: Annotated[float, typer.Option(help="Cap k at this share of the hidden width.")] = 0.01,
    layer: Annotated[Optional[list[int]], typer.Option(help="Candidate layers (1-based); default: a grid. With --traces: the one layer read (default 16).")] = None,
    head: Annotated[list[str], typer.Option(help="Heads to compare by LOSO AUROC (linear, mlp).")] = ["linear", "mlp"],
    random_draws: Annotated[int, typer.Option(help="Random-k neuron sets for the baseline.")] = 100,
    dtype: Annotated[str, typer.Option(help="Model dtype.")] = "float32",
    name: Annotated[Optional[str], typer.Option(help="Model name recorded in the artifact (default: --model).")] = None,
):
    """Find value neurons by leave-one-source-out AUROC, stack them with the free next-token signal per question
    kind, calibrate, evaluate against baselines (transfer and test split) and write the artifact and its card."""
    from valueprobe.calibration.data import DataError, interleave_sources, load_data
    from valueprobe.calibration.evaluate import format_table, render_markdown, write_plots
    from valueprobe.calibration.extract import extract_features, load_labels
    from valueprobe.calibration.fit import FitConfig, fit_artifact
    from valueprobe.plugin import PromptFormat, save_artifact

    if (traces is None) == (not data):
        _fail("give --data (a prompt confidence) or --traces (a value over reasoning steps), not both")
    if traces is not None:
        _fit_steps(model, traces, out, states=states, objective=objective, layer=(layer or [16])[0], seed=seed,
                   dtype=dtype, name=name)
        return
    try:
        questions = interleave_sources([load_data(spec, seed=seed) for spec in data])
    except DataError as exc:
        _fail(str(exc))
    mdl, tok = _load_model(model, dtype)
    fmt = PromptFormat()
    known = load_labels(labels, model_name=model) if labels and labels.exists() else {}
    features = extract_features(mdl, tok, questions, fmt, cache_dir=cache, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, labels=known)
    cfg = FitConfig(seed=seed, tolerance=tolerance, max_fraction=max_fraction, layers=layer, heads=tuple(head),
                    random_draws=random_draws, extra={"data_specs": list(data), "max_new_tokens": max_new_tokens})
    try:
        artifact, card = fit_artifact(mdl, tok, features, model_name=name or model, prompt_format=fmt, config=cfg)
    except ValueError as exc:
        _fail(str(exc))
    save_artifact(artifact, out)
    report_dir = out.parent
    stem = out.name.removesuffix(".safetensors")
    plots = write_plots(card, report_dir / f"{stem}.plots")
    markdown = render_markdown(card)
    for plot in plots:
        markdown = markdown.replace(f"`{plot}`", f"`{stem}.plots/{plot}`")
    (report_dir / f"{stem}.md").write_text(markdown)
    typer.echo(format_table(card["test"]["all"]))
    typer.echo(card["verdict"])
    typer.echo(f"wrote {out} (id {artifact.metadata['content_sha256'][:12]}), {stem}.md and {len(plots)} plots")


def _fit_steps(model: str, traces_file: Path, out: Path, *, states: Path, objective: str, layer: int, seed: int,
               dtype: str, name: Optional[str]) -> None:
    from valueprobe.calibration.data import load_data
    from valueprobe.calibration.step_value import fit_step_value, render_markdown
    from valueprobe.calibration.trajectories import TRACE_FORMAT, load_traces, trace_states
    from valueprobe.plugin import save_artifact

    traces_ = load_traces(traces_file)
    if not traces_:
        _fail(f"no traces in {traces_file}")
    mdl, tok = _load_model(model, dtype)
    try:
        ts = trace_states(None, None, traces_, states_dir=states, layers=[layer], progress=False)
    except ValueError:  # states not recorded (or not this layer): re-read them by one prefill per trace
        problems = {q.id: q for ds in sorted({t["dataset"] for t in traces_}) for q in load_data(ds)}
        ts = trace_states(mdl, tok, traces_, states_dir=states, layers=[layer], problems=problems)
    try:
        artifact, card = fit_step_value(mdl, tok, ts, layer=layer, model_name=name or model, objective=objective,
                                        prompt_format=TRACE_FORMAT, seed=seed)
    except ValueError as exc:
        _fail(str(exc))
    save_artifact(artifact, out)
    markdown = render_markdown(card)
    (out.parent / f"{out.name.removesuffix('.safetensors')}.md").write_text(markdown)
    typer.echo(markdown)
    typer.echo(f"wrote {out} (id {artifact.metadata['content_sha256'][:12]})")


@app.command(name="eval")
def eval_(
    artifact: Annotated[Optional[Path], typer.Option(help="Artifact; default: the shipped default.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="Data spec(s); default: the artifact's test split data.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model; default: the artifact's own model.")] = None,
    predictions: Annotated[Optional[Path], typer.Option(help="Write one JSON line per item here.")] = None,
    cache: Annotated[Path, typer.Option(help="Feature cache folder.")] = Path("runs/cache"),
    batch_size: int = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens for open questions (default: the fit's).")] = 16,
    seed: int = 0,
    dtype: str = "float32",
    test_split_only: Annotated[bool, typer.Option(help="Keep only questions in the artifact's test split.")] = True,
    labels: Annotated[Optional[Path], typer.Option(help="Labels JSONL of answers generated earlier (see `extract`): "
                                                   "those questions need a prefill only.")] = None,
    check_fingerprint: Annotated[bool, typer.Option(help="Refuse a model whose fingerprint differs (default: on "
                                                    "for the artifact's own model).")] = True,
):
    """Score an artifact on labelled data: labels come from the model on the artifact's prompt format.

    With no --data, the artifact's own test split (data specs, split seed and fractions recorded in its card).
    """
    from valueprobe.calibration.data import DataError, load_data
    from valueprobe.calibration.evaluate import BASELINES, artifact_test_questions, evaluate_artifact, format_table

    path = artifact or default_artifact()
    probe = _load_probe(path)
    try:
        if data and not test_split_only:
            questions = [q for spec in data for q in load_data(spec, seed=seed)]
        else:
            questions = artifact_test_questions(probe, data, seed=seed)
    except (DataError, ValueError) as exc:
        _fail(str(exc))
    mdl, tok = _load_model(model or probe.model_name, dtype)
    from valueprobe.calibration.extract import load_labels
    from valueprobe.plugin import FingerprintMismatchError

    try:
        probe.check_compatible(mdl, tok, strict=check_fingerprint and model is None)
    except FingerprintMismatchError as exc:
        _fail(str(exc))
    max_new = probe.eval_card.get("config", {}).get("extra", {}).get("max_new_tokens", max_new_tokens)
    known = load_labels(labels, model_name=probe.model_name) if labels else None
    rows, fs, pred = evaluate_artifact(probe, mdl, tok, questions, cache_dir=cache, batch_size=batch_size,
                                       max_new_tokens=max_new, labels=known)
    y = fs.labels
    typer.echo(f"{len(y)} questions, model accuracy {y.mean():.3f}")
    typer.echo(format_table(rows))
    if predictions:
        with open(predictions, "w") as fh:
            for i, row in enumerate(fs.rows):
                rec = {"id": row["id"], "dataset": row["dataset"], "kind": row["kind"], "label": row["label"],
                       "prediction": row["prediction"], "probability": float(pred["probability"][i]),
                       "served_score": probe.served_score, "raw": float(pred["value_raw"][i]),
                       "value_probability": float(pred["value_probability"][i])}
                if "ood" in pred:
                    rec.update(ood=bool(pred["ood"][i]), ood_distance=float(pred["ood_distance"][i]))
                rec.update({name: getter([row])[0] for name, getter in BASELINES.items()})
                fh.write(json.dumps(rec) + "\n")
        typer.echo(f"wrote {predictions}")


@app.command(name="sample-answers")
def sample_answers_cmd(
    out: Annotated[Path, typer.Option(help="Samples JSONL (appended; a rerun resumes).")],
    artifact: Annotated[Optional[Path], typer.Option(help="Artifact whose test split is sampled; default: shipped.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="Data specs instead of the artifact's own (reduced to "
                                                           "its test split when it was fitted on them).")] = None,
    n: Annotated[int, typer.Option(help="Open questions to sample (sources interleaved).")] = 400,
    samples: Annotated[int, typer.Option(help="Answers sampled per question.")] = 5,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    rows_per_batch: Annotated[int, typer.Option(help="Sequences generated together.")] = 16,
    model: Annotated[Optional[str], typer.Option(help="Override the artifact's model.")] = None,
    seed: int = 0,
    dtype: str = "float32",
):
    """Sample answers to held-out open questions for the semantic-entropy baseline (`bench semantic-entropy`)."""
    from valueprobe.calibration.evaluate import artifact_test_questions
    from valueprobe.calibration.data import interleave_sources
    from valueprobe.calibration.semantic import sample_answers

    probe = _load_probe(artifact or default_artifact())
    questions = [q for q in artifact_test_questions(probe, data, seed=seed) if q.kind == "open"]
    by_source: dict[str, list] = {}
    for q in questions:
        by_source.setdefault(q.dataset, []).append(q)
    questions = interleave_sources(list(by_source.values()))[:n]
    if not questions:
        _fail("no open questions in the test split")
    name = model or probe.model_name
    mdl, tok = _load_model(name, dtype)
    probe.check_compatible(mdl, tok, strict=model is None)
    done = sample_answers(mdl, tok, questions, probe.prompt_format, out, model_name=name, n_samples=samples,
                          temperature=temperature, max_new_tokens=max_new_tokens, rows_per_batch=rows_per_batch,
                          seed=seed)
    typer.echo(f"{sum(q.id in done for q in questions)}/{len(questions)} questions sampled in {out}")


@app.command()
def traces(
    out: Annotated[Path, typer.Option(help="Traces JSONL (appended; a rerun resumes).")],
    model: Annotated[str, typer.Option(help="Model: a known name, a local HF folder, or a hub name.")] =
        "Qwen2.5-Coder-1.5B-Instruct",
    data: Annotated[str, typer.Option(help="Multi-step problems with numeric answers: a built-in, a JSONL file, or "
                                           "gym/<task>[?config] from reasoning-gym (e.g. gym/gsm_symbolic).")] = \
        "gsm8k",
    n: Annotated[int, typer.Option(help="Problems (a seeded shuffle, always in the same order).")] = 200,
    samples: Annotated[int, typer.Option(help="Traces sampled per problem.")] = 4,
    temperature: float = 0.8,
    max_new_tokens: int = 256,
    rows_per_batch: Annotated[int, typer.Option(help="Sequences generated together.")] = 16,
    layers: Annotated[str, typer.Option(help="Layers whose states are recorded at step ends (comma list or 'all').")] =
        "8,12,16,20,23,25,28",
    states: Annotated[Path, typer.Option(help="Folder for the recorded states (float16 safetensors).")] =
        Path("runs/traces"),
    seed: int = 0,
    dtype: str = "float32",
):
    """Sample step-by-step reasoning traces (the dopamine / PRM data): text, generated tokens, steps and their end
    tokens, final answer and grade, and the states at s_0 and every step end, recorded during generation."""
    import random

    from valueprobe.calibration.data import DataError, load_data
    from valueprobe.calibration.trajectories import generate_traces

    limit_heap_fragmentation()  # long batched generations: keep the KV cache's re-allocations off the heap

    try:
        problems = load_data(data, seed=seed)
    except DataError as exc:
        _fail(str(exc))
    random.Random(seed).shuffle(problems)
    problems = problems[:n]
    mdl, tok = _load_model(model, dtype)
    chosen = None if layers == "all" else [int(x) for x in layers.split(",")]
    done = generate_traces(mdl, tok, problems, out, model_name=model, n_samples=samples, temperature=temperature,
                           max_new_tokens=max_new_tokens, rows_per_batch=rows_per_batch, layers=chosen,
                           states_dir=states, seed=seed)
    by_problem: dict[str, list[int]] = {}
    for t in done:
        by_problem.setdefault(t["problem"], []).append(t["label"])
    mixed = sum(0 < sum(v) < len(v) for v in by_problem.values())
    typer.echo(f"{len(done)} traces of {len(by_problem)} problems in {out}: accuracy "
               f"{sum(t['label'] for t in done) / max(len(done), 1):.3f}, {mixed} problems with right and wrong traces, "
               f"{sum(len(t['steps']) for t in done) / max(len(done), 1):.1f} steps per trace")


@app.command()
def dopamine(
    traces_files: Annotated[list[Path], typer.Option("--traces", help="Traces JSONL from `valueprobe traces`; "
                                                      "repeat it to study several files (e.g. GSM8K and gym) as one.")],
    states: Annotated[Path, typer.Option(help="States recorded by `valueprobe traces` (else re-read by prefill).")] =
        Path("runs/traces"),
    model: Annotated[Optional[str], typer.Option(help="Model for re-reading states missing from --states.")] = None,
    artifact: Annotated[Optional[Path], typer.Option(help="Value-neuron artifact to compare with; default: shipped.")] = None,
    k: Annotated[Optional[int], typer.Option(help="Dopamine neurons (default 1% of the width).")] = None,
    random_draws: int = 200,
    out: Annotated[Optional[Path], typer.Option(help="Write <out>.md, <out>.json and <out>.png.")] = None,
    seed: int = 0,
):
    """Value over reasoning steps (final-reward vs TD heads) and the dopamine neurons tracking the TD error, on
    traces split by problem; prints the tables and writes the card section and the surprise plot."""
    from valueprobe.calibration.data import load_data
    from valueprobe.calibration.dopamine import report
    from valueprobe.calibration.trajectories import load_traces, trace_states

    traces_ = [t for f in traces_files for t in load_traces(f)]
    if not traces_:
        _fail(f"no traces in {', '.join(map(str, traces_files))}")
    try:
        ts = trace_states(None, None, traces_, states_dir=states, progress=False)
    except ValueError:
        mdl, tok = _load_model(model or traces_[0]["model_name"], "float32")
        problems = {q.id: q for name in sorted({t["dataset"] for t in traces_}) for q in load_data(name)}
        ts = trace_states(mdl, tok, traces_, states_dir=states, problems=problems)
    probe = _load_probe(artifact or default_artifact())
    plot = Path(f"{out}.png") if out else None
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
    result, md = report(ts, value_neurons=probe.neuron_indices.tolist(), value_layer=probe.layer, k=k,
                        random_draws=random_draws, seed=seed, plot_path=plot)
    typer.echo(md)
    if out:
        Path(f"{out}.md").write_text("## Value over steps and dopamine neurons\n\n" + md + "\n")
        Path(f"{out}.json").write_text(json.dumps(result, indent=2, default=float))


@app.command()
def ablate(
    artifact: Annotated[Optional[Path], typer.Option(help="Artifact; default: the shipped default.")] = None,
    data: Annotated[list[str], typer.Option(help="Multiple-choice data spec(s), e.g. mmlu:200.")] = ["mmlu:100"],
    model: Annotated[Optional[str], typer.Option(help="Model; default: the artifact's own model.")] = None,
    seeds: Annotated[int, typer.Option(help="Random magnitude-matched ablations to compare with.")] = 5,
    mode: Annotated[str, typer.Option(help="zero or mean ablation.")] = "zero",
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    out: Annotated[Optional[Path], typer.Option(help="Write the result as JSON here.")] = None,
    dopamine: Annotated[Optional[Path], typer.Option(help="Step mode: the dopamine study's JSON (`valueprobe "
                                                     "dopamine --out`); ablate its neurons while the model re-reads "
                                                     "held-out reasoning traces (teacher-forced NLL).")] = None,
    traces: Annotated[Path, typer.Option(help="Step mode: traces JSONL.")] =
        Path("weights/traces/qwen2.5-coder-1.5b-instruct.gsm8k.jsonl"),
    states: Annotated[Path, typer.Option(help="Step mode: states recorded by `valueprobe traces`.")] = Path("runs/traces"),
    n_traces: Annotated[int, typer.Option(help="Step mode: held-out traces re-read per condition.")] = 16,
):
    """Causal check: accuracy drop when the value neurons are ablated vs k random magnitude-matched neurons; with
    --dopamine, the dopamine neurons' effect on predicting held-out reasoning traces, against the same control."""
    from valueprobe.calibration.ablate import ablation_study
    from valueprobe.calibration.data import DataError, load_data

    if dopamine is not None:
        _ablate_dopamine(dopamine, traces, states, n_traces=n_traces, seeds=seeds, mode=mode, model=model, dtype=dtype,
                         seed=seed, out=out)
        return

    probe = _load_probe(artifact or default_artifact())
    try:
        questions = [q for spec in data for q in load_data(spec, seed=seed)]
    except DataError as exc:
        _fail(str(exc))
    mdl, tok = _load_model(model or probe.model_name, dtype)
    try:
        result = ablation_study(mdl, tok, probe, questions, seeds=seeds, mode=mode, batch_size=batch_size)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(
        f"n={result['n']} layer {result['layer']} k={result['k']} ({mode} ablation)\n"
        f"accuracy {result['accuracy']:.3f} -> value neurons ablated {result['accuracy_value_ablated']:.3f} "
        f"(drop {result['value_drop']:+.3f}, McNemar p={result['p_mcnemar_value']:.3g})\n"
        f"random magnitude-matched k: drop {result['random_drop_mean']:+.3f} ± {result['random_drop_std']:.3f} "
        f"over {seeds} seeds; P(random drop >= value drop) = {result['p_empirical_vs_random']:.3f}"
    )
    if out:
        out.write_text(json.dumps(result, indent=2))


def _ablate_dopamine(study: Path, traces_file: Path, states: Path, *, n_traces: int, seeds: int, mode: str,
                     model: Optional[str], dtype: str, seed: int, out: Optional[Path]) -> None:
    from valueprobe.calibration.ablate import trace_ablation_study
    from valueprobe.calibration.data import load_data
    from valueprobe.calibration.dopamine import split_problems
    from valueprobe.calibration.trajectories import TRACE_FORMAT, load_traces, trace_states

    result = json.loads(study.read_text())
    layer, neurons = result["layer"], result["dopamine"]["neurons"]
    traces_ = load_traces(traces_file)
    if not traces_:
        _fail(f"no traces in {traces_file}")
    # the study's own held-out problems (its neurons were ranked on the others)
    held = [t for t, h in zip(traces_, split_problems([t["problem"] for t in traces_], seed=seed)) if h]
    held = held[:n_traces]
    mdl, tok = _load_model(model or traces_[0]["model_name"], dtype)
    problems = {q.id: q for ds in sorted({t["dataset"] for t in traces_}) for q in load_data(ds)}
    ts = trace_states(mdl, tok, traces_, states_dir=states, layers=[layer], problems=problems)
    try:
        r = trace_ablation_study(mdl, tok, held, problems, layer=layer, neurons=neurons, states=ts.layer(layer),
                                 fmt=TRACE_FORMAT, seeds=seeds, mode=mode, seed=seed)
    except ValueError as exc:
        _fail(str(exc))
    for j, column in enumerate(r["columns"]):
        typer.echo(f"{column}: NLL {r['nll_base'][j]:.4f}; dopamine neurons ablated ({mode}) "
                   f"{r['delta_nll_chosen'][j]:+.4f}; {seeds} magnitude-matched random sets "
                   f"{r['delta_nll_random_mean'][j]:+.4f} ± {r['delta_nll_random_std'][j]:.4f}; "
                   f"P(random >= dopamine) = {r['p_empirical_vs_random'][j]:.3f}")
    typer.echo(f"({r['n_traces']} held-out traces, layer {layer}, k={r['k']})")
    if out:
        out.write_text(json.dumps({**r, "study": study_provenance(study)}, indent=2))


def study_provenance(study: Path) -> dict:
    """Which dopamine study's neurons an ablation record is about: the study file, its sha256 and size."""
    import hashlib

    result = json.loads(study.read_text())
    return {"file": str(study), "sha256": hashlib.sha256(study.read_bytes()).hexdigest(),
            "n_traces": result.get("n_traces"), "n_problems": result.get("n_problems"), "layer": result.get("layer")}


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help="Model name or folder; default: the artifact's own model.")] = None,
    artifact: Annotated[Optional[str], typer.Option(help="Artifact; default: the shipped default.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="embedded (generate here) or gateway (answers from --upstream-url).")] = None,
    engine: Annotated[Optional[str], typer.Option(help="Embedded engine: transformers, or vllm (vLLM's async engine "
                                                      "in-process; the probe is read inside its forward pass).")] = None,
    upstream_url: Annotated[Optional[str], typer.Option(help="Gateway mode: TGI or OpenAI-compatible server that answers.")] = None,
    upstream_kind: Annotated[Optional[str], typer.Option(help="tgi or openai.")] = None,
    upstream_model: Annotated[Optional[str], typer.Option(help="Model name for an OpenAI-compatible upstream.")] = None,
    escalate_url: Annotated[Optional[str], typer.Option(help="Bigger model for escalated questions.")] = None,
    escalate_kind: Annotated[Optional[str], typer.Option(help="tgi or openai.")] = None,
    escalate_model: Annotated[Optional[str], typer.Option(help="Model name for an OpenAI-compatible escalation target.")] = None,
    abstain_below: Annotated[Optional[float], typer.Option(help="Abstain when P(correct) is below this.")] = None,
    escalate_below: Annotated[Optional[float], typer.Option(help="Escalate when P(correct) is below this.")] = None,
    escalate_rate: Annotated[Optional[float], typer.Option(help="Use the artifact's threshold escalating this share (0.1, 0.2, 0.3).")] = None,
    risk_alpha: Annotated[Optional[float], typer.Option(help="Abstain below the artifact's risk-controlled threshold at this error rate.")] = None,
    admin_token: Annotated[Optional[str], typer.Option(help="Bearer token for /v1/feedback and /v1/admin/reload "
                                                       "(unset: those routes answer 403).")] = None,
    artifact_sha256: Annotated[Optional[str], typer.Option(help="Pin: refuse an artifact whose content hash does "
                                                           "not start with this (at start and on reload).")] = None,
    artifact_dir: Annotated[Optional[str], typer.Option(help="Folder reload may load from (default: the artifact's).")] = None,
    search_artifact: Annotated[Optional[str], typer.Option(help="Step-value artifact (`valueprobe fit --traces`) that "
                                                           "values steps in `search` (default: the served head).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Settings file (KEY=value lines, VALUEPROBE_ prefix).")] = None,
    log_level: str = "info",
):
    """Run the sidecar: OpenAI and TGI routes with calibrated confidence, abstain/escalate, Prometheus metrics.

    Exits with status 1, the reason on stderr, when the model or the artifact cannot be loaded (a refused hot
    reload later on keeps the old artifact serving).

    Every option can also come from the environment as VALUEPROBE_<OPTION> (e.g. VALUEPROBE_ESCALATE_URL) or from
    --config; flags win. Other settings (max_batch_size, max_wait_ms, max_queue, upstream_timeout_s,
    refusal_text, max_prompt_chars, max_new_tokens_limit, default_max_new_tokens, feedback_window, dtype, device,
    check_fingerprint, vllm_max_model_len, vllm_max_num_seqs, vllm_max_num_batched_tokens) are environment/config
    only; see server/settings.py.
    """
    from pydantic import ValidationError

    from valueprobe.server.app import serve as run_sidecar
    from valueprobe.server.settings import Settings

    given = {k: v for k, v in dict(model=model, artifact=artifact, mode=mode, engine=engine, upstream_url=upstream_url,
                                   upstream_kind=upstream_kind, upstream_model=upstream_model, escalate_url=escalate_url,
                                   escalate_kind=escalate_kind, escalate_model=escalate_model,
                                   abstain_below=abstain_below, escalate_below=escalate_below,
                                   escalate_rate=escalate_rate, risk_alpha=risk_alpha, admin_token=admin_token,
                                   artifact_sha256=artifact_sha256, artifact_dir=artifact_dir,
                                   search_artifact=search_artifact,
                                   host=host, port=port).items() if v is not None}
    try:
        settings = Settings(_env_file=str(config), **given) if config else Settings(**given)
    except ValidationError as exc:
        _fail(str(exc))
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failure = run_sidecar(settings, log_level=log_level)
    if failure is not None:
        _fail(f"the sidecar could not load its model or artifact, so it stopped: {failure}", code=1)


@bench_app.command("extract")
def bench_extract(
    cache: Annotated[Path, typer.Option(help="Feature cache to report from.")] = Path("runs/cache"),
    model: Annotated[Optional[str], typer.Option(help="Also measure a small sample with and without the "
                                                      "shared-prefix reuse on this model.")] = None,
    n: Annotated[int, typer.Option(help="Questions per kind for the measurement.")] = 16,
    reps: Annotated[int, typer.Option(help="Interleaved repetitions.")] = 2,
):
    """Extraction throughput: questions/hour by kind from the cache's recorded timings, and (with --model) the
    shared-prefix KV reuse measured side by side."""
    from valueprobe.bench.extract import measure, report

    report(cache, echo=typer.echo)
    if model:
        measure(model, n_choice=n, n_open=n, reps=reps, echo=typer.echo)


@bench_app.command("soak")
def bench_soak(
    model: Annotated[Optional[str], typer.Option(help="Model for the sidecar; default: the artifact's.")] = None,
    artifact: Annotated[Optional[str], typer.Option(help="Artifact; default: the shipped default.")] = None,
    url: Annotated[Optional[str], typer.Option(help="Drive this running server (started with admin token "
                                                    "'soak-admin') instead of starting one.")] = None,
    clients: Annotated[int, typer.Option(help="Concurrent clients (plus one that disconnects mid-stream).")] = 16,
    seconds: Annotated[float, typer.Option(help="Seconds of load.")] = 60.0,
    max_tokens: Annotated[int, typer.Option(help="Tokens per generation request.")] = 4,
    max_queue: Annotated[int, typer.Option(help="Server's max_queue.")] = 64,
):
    """N clients for T seconds mixing every route, a hot reload halfway and a disconnecting streamer: statuses,
    p50/p95 latency, polite 503s and server RSS growth."""
    from valueprobe.bench.soak import run

    result = run(model=model, artifact=artifact, url=url, clients=clients, seconds=seconds, max_tokens=max_tokens,
                 max_queue=max_queue, echo=typer.echo)
    if result["server_errors"] or result["unanswered"]:
        raise typer.Exit(1)


@bench_app.command("serve")
def bench_serve(
    model: Annotated[Optional[str], typer.Option(help="Model for the sidecars; default: the artifact's.")] = None,
    artifact: Annotated[Optional[str], typer.Option(help="Artifact; default: the shipped default.")] = None,
    url: Annotated[Optional[str], typer.Option(help="Drive this running server instead of starting two.")] = None,
    clients: Annotated[int, typer.Option(help="Concurrent clients.")] = 8,
    seconds: Annotated[float, typer.Option(help="Seconds of load per server and run.")] = 20.0,
    repeats: Annotated[int, typer.Option(help="Interleaved runs per server (ABBA order); the ratio is given per "
                                              "run with median and range.")] = 3,
    batch: Annotated[int, typer.Option(help="max_batch_size of the batched server.")] = 8,
    endpoint: Annotated[str, typer.Option(help="confidence (prompt-only) or completions.")] = "confidence",
    max_tokens: Annotated[int, typer.Option(help="Tokens per completion (completions endpoint).")] = 16,
    answers: Annotated[str, typer.Option(help="short (trivia: a few tokens, prefill-bound) or long (explanations "
                                              "that run to --max-tokens: decode-bound).")] = "short",
    engine: Annotated[Optional[list[str]], typer.Option(help="Compare engines instead (repeatable: transformers, "
                                                             "vllm): completions at --clients-list, then vLLM's "
                                                             "in-engine probe overhead.")] = None,
    clients_list: Annotated[str, typer.Option(help="Client counts for --engine runs.")] = "1,4,16",
    overhead_reps: Annotated[int, typer.Option(help="Interleaved with/without-probe repetitions (vllm).")] = 5,
):
    """Load-test the sidecar: throughput, p50/p99, errors; batched vs one-at-a-time ratio, measured side by side.
    With --engine: each engine at 1, 4 and 16 clients (requests/s, tokens/s, p50/p95) and the vLLM probe overhead."""
    from valueprobe.bench.serve import run, run_engines

    if engine:
        bad = set(engine) - {"transformers", "vllm"}
        if bad:
            _fail(f"unknown engine(s) {sorted(bad)}; expected transformers or vllm")
        run_engines(model, artifact, tuple(engine), tuple(int(c) for c in clients_list.split(",") if c.strip()), seconds,
                    max_tokens, overhead_reps)
        return
    if answers not in ("short", "long"):
        _fail(f"--answers must be short or long, not {answers!r}")
    if repeats < 1:
        _fail("--repeats must be at least 1")
    run(model, artifact, url, clients, seconds, batch, endpoint, max_tokens, answers, repeats)


def _random_model(folder: str, dtype: str):
    """A model of ``folder``'s config with random weights (seeded), and its tokenizer: timings without the
    checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def torch_device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device


@bench_app.command("perf")
def bench_perf(
    artifact: Annotated[Optional[Path], typer.Option(help="Artifact; default: the shipped default.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model; default: the artifact's.")] = None,
    reps: Annotated[int, typer.Option(help="Interleaved repetitions per measurement.")] = 5,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt in the generate comparison.")] = 16,
    dtype: str = "float32",
    device: Annotated[str, typer.Option(help="Where the model runs: cpu, cuda, cuda:1, ...")] = "cpu",
    random_weights: Annotated[bool, typer.Option(help="Timing only: build --model's architecture from its config "
                                                 "(a folder with config and tokenizer, no weights needed) with random "
                                                 "weights; the fingerprint is not checked.")] = False,
):
    """Probe overhead on generate, scoring vs bare prefill, readout microseconds, throughput at batch 1/4/16."""
    from rich.console import Console
    from rich.table import Table

    from valueprobe.bench.perf import run

    probe = _load_probe(artifact or default_artifact())
    if random_weights:
        if model is None:
            _fail("--random-weights needs --model: a folder with the model's config and tokenizer")
        mdl, tok = _random_model(model, dtype)
    else:
        mdl, tok = _load_model(model or probe.model_name, dtype)
        probe.check_compatible(mdl, tok, strict=model is None)
    mdl.to(device)
    rows = run(mdl, tok, probe, reps=reps, new_tokens=new_tokens, progress=lambda r: typer.echo(" | ".join(r), err=True),
               check_fingerprint=model is None)
    where = (torch_device_name(device) if device != "cpu" else f"{os.cpu_count()} CPU threads")
    table = Table(title=f"valueprobe perf: {probe.model_name}, layer {probe.layer}, k={probe.k}, {reps} reps, "
                        f"{dtype}, {where}")
    for col in ("measurement", "value", "reference", "ratio"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@bench_app.command("quality")
def bench_quality(
    artifact: Annotated[Optional[list[Path]], typer.Option(help="Artifacts; default: every shipped one.")] = None,
    cache: Annotated[Path, typer.Option(help="Feature cache folder.")] = Path("runs/cache"),
    out: Annotated[Path, typer.Option(help="Folder for quality.md and the cards.")] = Path("runs/quality"),
    model: Annotated[Optional[str], typer.Option(help="Override the artifact's model.")] = None,
    refit: Annotated[bool, typer.Option(help="Also refit from the card's recipe and print both tables.")] = True,
):
    """Score shipped artifacts on their held-out test splits and reproduce their cards (leave-one-source-out and
    per-kind tables, refitted from the recorded recipe) side by side; writes a report."""
    from valueprobe.bench.quality import run
    from valueprobe.weights import shipped_artifacts

    paths = artifact or shipped_artifacts()
    if not paths:
        _fail("no artifacts given and none shipped")
    run(paths, cache_dir=cache, out=out, model_override=model, refit=refit, echo=typer.echo)


@bench_app.command("semantic-entropy")
def bench_semantic_entropy(
    samples: Annotated[Path, typer.Option(help="Samples JSONL from `valueprobe sample-answers`.")] =
        Path("weights/labels/qwen2.5-coder-1.5b-instruct.samples.jsonl"),
    artifact: Annotated[Optional[Path], typer.Option(help="Artifact; default: the shipped default.")] = None,
    cache: Annotated[Path, typer.Option(help="Feature cache folder.")] = Path("runs/cache"),
    out: Annotated[Optional[Path], typer.Option(help="Write <out>.json and <out>.md.")] = None,
):
    """Semantic entropy (5 sampled answers) vs the prompt-only score on the same held-out open questions: AUROC
    with intervals, a paired bootstrap of the difference, and the cost per question."""
    from valueprobe.bench.semantic import run

    try:
        run(samples, artifact=artifact, cache_dir=cache, out=out, echo=typer.echo)
    except ValueError as exc:
        _fail(str(exc))


@bench_app.command("search")
def bench_search(
    traces_file: Annotated[Path, typer.Option("--traces", help="Traces JSONL from `valueprobe traces`: the problems, "
                                                               "the value heads' training data and the sampled answers.")] =
        Path("weights/traces/qwen2.5-coder-1.5b-instruct.gsm8k.jsonl"),
    out: Annotated[Path, typer.Option(help="Writes <out>.jsonl (generated answers, appended: a rerun resumes), "
                                           "<out>.md, <out>.json, <out>.png.")] =
        Path("weights/search/qwen2.5-coder-1.5b-instruct.gsm8k"),
    states: Annotated[Path, typer.Option(help="States recorded by `valueprobe traces` (else re-read by prefill).")] =
        Path("runs/traces"),
    model: Annotated[Optional[str], typer.Option(help="Model; default: the traces' own.")] = None,
    layer: Annotated[int, typer.Option(help="Layer the value head reads (the dopamine study's choice).")] = 16,
    folds: Annotated[int, typer.Option(help="Problem folds: each problem's head is fitted on the other folds.")] = 5,
    objective: Annotated[str, typer.Option(help="Value head objective: td or bce (final reward).")] = "td",
    width: Annotated[int, typer.Option(help="Candidate lines per step for value-beam.")] = 4,
    batch: Annotated[int, typer.Option(help="Problems searched together (value-beam: batch x width rows).")] = 8,
    limit: Annotated[Optional[int], typer.Option(help="Generate for the first N traced problems only.")] = None,
    strategies: Annotated[str, typer.Option(help="Generated strategies (comma list of greedy, value-beam, "
                                                 "value-beam-centered; '' for the report alone).")] = "greedy,value-beam",
    seed: int = 0,
):
    """Value-guided step search vs greedy, self-consistency, best-of-n and random step selection at an equal
    token budget, on traced GSM8K problems scored by out-of-fold value heads: accuracy, tokens, McNemar tests,
    plot. Resumable; the report covers the problems every strategy has answered so far."""
    import torch

    from valueprobe.bench.search import KNOWN_GENERATED, run

    chosen = [s for s in strategies.split(",") if s]
    unknown = [s for s in chosen if s not in KNOWN_GENERATED]
    if unknown:
        _fail(f"unknown strategies {unknown}; expected some of {list(KNOWN_GENERATED)}")
    if objective not in ("td", "bce"):
        _fail("objective must be td or bce")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        run(traces_file, out=out, states_dir=states, model_name=model, layer=layer, folds=folds, objective=objective,
            width=width, batch=batch, limit=limit, strategies=chosen, do_generate=bool(chosen), seed=seed,
            echo=typer.echo)
    except ValueError as exc:
        _fail(str(exc))


def main():  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
