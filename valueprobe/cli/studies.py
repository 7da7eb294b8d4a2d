"""Research commands: `sample-answers`, `traces`, `dopamine`, `ablate`, `ablate-dopamine`, `answer-study`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import app, fail, load_model, load_probe, probe_and_model


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

    probe = load_probe(artifact)
    questions = [q for q in artifact_test_questions(probe, data, seed=seed) if q.kind == "open"]
    by_source: dict[str, list] = {}
    for q in questions:
        by_source.setdefault(q.dataset, []).append(q)
    questions = interleave_sources(list(by_source.values()))[:n]
    if not questions:
        fail("no open questions in the test split")
    probe, mdl, tok = probe_and_model(probe, model, dtype)
    name = model or probe.model_name
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
    from valueprobe.calibration.trajectories import generate_traces, limit_heap_fragmentation

    limit_heap_fragmentation()  # long batched generations: keep the KV cache's re-allocations off the heap

    try:
        problems = load_data(data, seed=seed)
    except DataError as exc:
        fail(str(exc))
    random.Random(seed).shuffle(problems)
    problems = problems[:n]
    mdl, tok = load_model(model, dtype)
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
    from valueprobe.calibration.dopamine import report
    from valueprobe.calibration.trajectories import load_traces, recorded_states

    traces_ = [t for f in traces_files for t in load_traces(f)]
    if not traces_:
        fail(f"no traces in {', '.join(map(str, traces_files))}")
    ts = recorded_states(traces_, states_dir=states, load_model=lambda: load_model(model or traces_[0]["model_name"]))
    probe = load_probe(artifact)
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
):
    """Causal check of the value neurons: accuracy drop when they are ablated vs k random magnitude-matched
    neurons. (The dopamine neurons' check is `ablate-dopamine`.)"""
    from valueprobe.calibration.ablate import ablation_study
    from valueprobe.calibration.data import DataError, load_data

    probe = load_probe(artifact)
    try:
        questions = [q for spec in data for q in load_data(spec, seed=seed)]
    except DataError as exc:
        fail(str(exc))
    probe, mdl, tok = probe_and_model(probe, model, dtype)
    try:
        result = ablation_study(mdl, tok, probe, questions, seeds=seeds, mode=mode, batch_size=batch_size)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(
        f"n={result['n']} layer {result['layer']} k={result['k']} ({mode} ablation)\n"
        f"accuracy {result['accuracy']:.3f} -> value neurons ablated {result['accuracy_value_ablated']:.3f} "
        f"(drop {result['value_drop']:+.3f}, McNemar p={result['p_mcnemar_value']:.3g})\n"
        f"random magnitude-matched k: drop {result['random_drop_mean']:+.3f} ± {result['random_drop_std']:.3f} "
        f"over {seeds} seeds; P(random drop >= value drop) = {result['p_empirical_vs_random']:.3f}"
    )
    if out:
        out.write_text(json.dumps(result, indent=2))


@app.command("ablate-dopamine")
def ablate_dopamine(
    study: Annotated[Path, typer.Option(help="The dopamine study's JSON (`valueprobe dopamine --out`).")],
    traces: Annotated[Path, typer.Option(help="Traces JSONL the study was run on.")] =
        Path("weights/traces/qwen2.5-coder-1.5b-instruct.gsm8k.jsonl"),
    states: Annotated[Path, typer.Option(help="States recorded by `valueprobe traces`.")] = Path("runs/traces"),
    n_traces: Annotated[int, typer.Option(help="Held-out traces re-read per condition.")] = 16,
    model: Annotated[Optional[str], typer.Option(help="Model; default: the traces' own.")] = None,
    seeds: Annotated[int, typer.Option(help="Random magnitude-matched ablations to compare with.")] = 5,
    mode: Annotated[str, typer.Option(help="zero or mean ablation.")] = "zero",
    seed: int = 0,
    dtype: str = "float32",
    out: Annotated[Optional[Path], typer.Option(help="Write the result (with the study's provenance) as JSON here.")] = None,
):
    """Causal check of the dopamine neurons: how much worse the model predicts its own held-out reasoning traces
    (teacher-forced NLL) with them ablated, against magnitude-matched random neuron sets."""
    from valueprobe.calibration.ablate import dopamine_ablation
    from valueprobe.calibration.trajectories import load_traces

    traces_ = load_traces(traces)
    if not traces_:
        fail(f"no traces in {traces}")
    mdl, tok = load_model(model or traces_[0]["model_name"], dtype)
    try:
        r = dopamine_ablation(mdl, tok, study, traces_, states_dir=states, n_traces=n_traces, seeds=seeds, mode=mode,
                              seed=seed)
    except ValueError as exc:
        fail(str(exc))
    for j, column in enumerate(r["columns"]):
        typer.echo(f"{column}: NLL {r['nll_base'][j]:.4f}; dopamine neurons ablated ({mode}) "
                   f"{r['delta_nll_chosen'][j]:+.4f}; {seeds} magnitude-matched random sets "
                   f"{r['delta_nll_random_mean'][j]:+.4f} ± {r['delta_nll_random_std'][j]:.4f}; "
                   f"P(random >= dopamine) = {r['p_empirical_vs_random'][j]:.3f}")
    typer.echo(f"({r['n_traces']} held-out traces, layer {r['layer']}, k={r['k']})")
    if out:
        out.write_text(json.dumps(r, indent=2))


@app.command("answer-study")
def answer_study(
    cache: Annotated[Path, typer.Option(help="An answer-end cache folder (<cache>/<key>-answer_end) written by "
                                             "`extract --answer-end`.")],
    out: Annotated[Path, typer.Option(help="Writes <out>.json and <out>.md.")] = Path("weights/answer-study/study"),
    layer: Annotated[Optional[list[int]], typer.Option(help="Layers to compare (1-based); default 12, 18, 23.")] = None,
    k: Annotated[int, typer.Option(help="Size of the sparse value-neuron set (and of the random sets).")] = 4,
    random_draws: Annotated[int, typer.Option(help="Random sets per left-out source.")] = 20,
):
    """Which answer-level features transfer: a leave-one-source-out study over the answer-end cache (the last
    answer token, the answer's tokens averaged, the state at its least likely token, several layers; the free
    signals of the same pass; a stack monotone in the log-probabilities; the served score chosen by a nested
    leave-one-source-out; ECE on left-out sources; the sparse value-neuron set against random ones)."""
    from tqdm.auto import tqdm

    from valueprobe.calibration.answer_study import load_answer_cache, report_markdown, study
    from valueprobe.calibration.data import BUILTIN

    layers = layer or [12, 18, 23]
    choice_sources = {r["dataset"] for f in sorted(cache.glob("shard-*.json")) for r in json.loads(f.read_text())
                      if r["kind"] == "choice" and r["dataset"] in BUILTIN}
    options = {q.id: len(q.choices) for name in sorted(choice_sources) for q in BUILTIN[name]()}  # per question id
    try:
        data = load_answer_cache(cache, layers, n_options=options)
    except ValueError as exc:
        fail(str(exc))
    reads = [(r, layer_) for layer_ in layers for r in ("last", "answer_mean", "answer_min_token", "last+mean")]
    reads.append(("answer_mean", "middle"))
    sources = len({r["dataset"] for r in data.rows})
    with tqdm(total=sources * (len(reads) + 1), desc="answer study") as bar:
        result = study(data, reads=reads, k_sparse=k, random_draws=random_draws, progress=lambda: bar.update(1))
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2))
    text = report_markdown(result)
    Path(f"{out}.md").write_text("## Answer-level features that transfer (leave-one-source-out)\n\n" + text)
    typer.echo(text)
