"""`bench ...`: benchmarks that print ratios measured side by side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import bench_app, fail, load_probe, probe_and_model


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
    answer_artifact: Annotated[str, typer.Option(help="--engine runs: the answer-level artifact on, off or "
                                                      "'on,off' (both, each engine).")] = "on,off",
    out: Annotated[Optional[Path], typer.Option(help="--engine runs: write the results as JSON here.")] = None,
):
    """Load-test the sidecar: throughput, p50/p99, errors; batched vs one-at-a-time ratio, measured side by side.
    With --engine: each engine with the answer artifact on and off at 1, 4 and 16 clients (requests/s, tokens/s,
    p50/p95; --answers long is decode-bound, short prefill-bound), vLLM / transformers per row, and the vLLM probe
    overhead."""
    from valueprobe.bench.serve import run, run_engines

    if engine:
        bad = set(engine) - {"transformers", "vllm"}
        if bad:
            fail(f"unknown engine(s) {sorted(bad)}; expected transformers or vllm")
        settings = tuple(x.strip() for x in answer_artifact.split(",") if x.strip())
        if not settings or set(settings) - {"on", "off"}:
            fail(f"--answer-artifact takes on, off or 'on,off', not {answer_artifact!r}")
        if answers not in ("short", "long"):
            fail(f"--answers must be short or long, not {answers!r}")
        results = run_engines(model, artifact, tuple(engine), tuple(int(c) for c in clients_list.split(",") if c.strip()),
                              seconds, max_tokens, overhead_reps, settings, answers)
        if out:
            import json

            out.write_text(json.dumps(results, indent=2))
        return
    if answers not in ("short", "long"):
        fail(f"--answers must be short or long, not {answers!r}")
    if repeats < 1:
        fail("--repeats must be at least 1")
    run(model, artifact, url, clients, seconds, batch, endpoint, max_tokens, answers, repeats)


@bench_app.command("store")
def bench_store(
    model: Annotated[Optional[str], typer.Option(help="Model for the two sidecars; default: the artifact's.")] = None,
    artifact: Annotated[Optional[str], typer.Option(help="Artifact; default: the shipped default.")] = None,
    clients: Annotated[int, typer.Option(help="Concurrent writers and clients.")] = 16,
    requests: Annotated[int, typer.Option(help="Scored requests written per throughput run.")] = 5000,
    labels: Annotated[int, typer.Option(help="Labels written per throughput run.")] = 1000,
    repeats: Annotated[int, typer.Option(help="Runs per store and per sidecar (ABBA order).")] = 3,
    seconds: Annotated[float, typer.Option(help="Seconds of load per sidecar run.")] = 20.0,
    max_tokens: Annotated[int, typer.Option(help="Tokens per completion in the latency runs.")] = 4,
    postgres_url: Annotated[Optional[str], typer.Option(help="A PostgreSQL server to write to (admin URL; a "
                                                          "database is created per run); default: a throwaway "
                                                          "one from the local binaries, if any.")] = None,
    latency: Annotated[bool, typer.Option(help="Also measure the latency a store adds to a sidecar's requests.")] = True,
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here.")] = None,
):
    """What the request and feedback store costs: write throughput of SQLite and PostgreSQL at --clients concurrent
    writers (scored requests through the background writer, labels as /v1/feedback writes them), and the latency a
    store adds to a sidecar's requests, side by side with a sidecar without one (p50, p99; target under 2%)."""
    from valueprobe.bench.store import run

    run(model=model, artifact=artifact, clients=clients, requests=requests, labels=labels, repeats=repeats,
        seconds=seconds, max_tokens=max_tokens, postgres_url=postgres_url, latency=latency, out=out)


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

    from valueprobe.bench.perf import random_model, run, torch_device_name

    probe = load_probe(artifact)
    if random_weights:
        if model is None:
            fail("--random-weights needs --model: a folder with the model's config and tokenizer")
        mdl, tok = random_model(model, dtype)
    else:
        probe, mdl, tok = probe_and_model(probe, model, dtype)
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
        fail("no artifacts given and none shipped")
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
        fail(str(exc))


@bench_app.command("answer")
def bench_answer(
    answer_artifact: Annotated[Path, typer.Option(help="The answer-level artifact (`fit --answer-end`).")] =
        Path("weights/qwen2.5-coder-1.5b-instruct.answer.safetensors"),
    prompt_artifact: Annotated[Optional[Path], typer.Option(help="The prompt-only artifact; default: the shipped "
                                                            "one of the answer artifact's model.")] = None,
    samples: Annotated[Optional[Path], typer.Option(help="Sampled answers (`sample-answers`) for semantic entropy; "
                                                    "default: the shipped ones of the answer artifact's model, if "
                                                    "any.")] = None,
    cache: Annotated[Path, typer.Option(help="Feature cache folder.")] = Path("runs/cache"),
    out: Annotated[Optional[Path], typer.Option(help="Write <out>.json, <out>.md and <out>.risk_coverage.png.")] = None,
    overhead_reps: Annotated[int, typer.Option(help="Also time generate with both heads vs bare (0: skip).")] = 0,
    overhead_only: Annotated[bool, typer.Option(help="Only the overhead measurement.")] = False,
    previous_artifact: Annotated[Optional[Path], typer.Option(help="The answer artifact this one replaces: scored "
                                                              "on the same questions, its leave-one-source-out "
                                                              "table beside this one's, and its readout timed "
                                                              "beside this one's in the overhead run.")] = None,
):
    """Confidence in the answer given vs the prompt-only score, the answer's token log-probabilities, P(True) and
    semantic entropy, on held-out questions: AUROC, ECE, selective accuracy at 50% and 80% coverage. With
    --overhead-reps N, also the cost of both heads: generate with them vs bare, N interleaved repetitions."""
    from valueprobe.bench.answer import check_inputs, run
    from valueprobe.plugin import ValueProbe
    from valueprobe.weights import prompt_artifact_for, samples_path

    try:
        answer_probe = ValueProbe.load(answer_artifact)
        model_name = answer_probe.model_name
        prompt_artifact = prompt_artifact or prompt_artifact_for(model_name)
        if prompt_artifact is None:
            fail(f"no prompt-only artifact ships for {model_name}: pass --prompt-artifact")
        samples = samples or samples_path(model_name)
        if overhead_only:  # run() checks its own inputs first
            check_inputs(answer_probe, ValueProbe.load(prompt_artifact),
                         ValueProbe.load(previous_artifact) if previous_artifact else None)
        else:
            run(answer_artifact=answer_artifact, prompt_artifact=prompt_artifact,
                samples_path=samples, cache_dir=cache, out=out, echo=typer.echo,
                previous_artifact=previous_artifact)
        if overhead_reps:
            import json

            from valueprobe.bench.answer import measure_overhead

            probe, mdl, tok = probe_and_model(prompt_artifact, None, "float32")
            result = measure_overhead(mdl, tok, probe, answer_probe, reps=overhead_reps, echo=typer.echo,
                                      previous_answer_probe=ValueProbe.load(previous_artifact)
                                      if previous_artifact else None)
            if out:
                Path(f"{out}.overhead.json").write_text(json.dumps(result, indent=2))
    except ValueError as exc:
        fail(str(exc))


@bench_app.command("cascade")
def bench_cascade(
    small_artifact: Annotated[Path, typer.Option(help="The small model's artifact (its test split is the question set).")] =
        Path("weights/qwen2.5-coder-0.5b-instruct.safetensors"),
    big_artifact: Annotated[Optional[Path], typer.Option(help="The big model's artifact; default: the shipped default.")] = None,
    small_url: Annotated[Optional[str], typer.Option(help="A running small sidecar instead of starting one.")] = None,
    big_url: Annotated[Optional[str], typer.Option(help="A running big sidecar instead of starting one.")] = None,
    per_kind: Annotated[int, typer.Option(help="Held-out questions per kind (a seeded sample of the test split).")] = 200,
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per answer.")] = 16,
    concurrency: Annotated[int, typer.Option(help="Requests in flight per sidecar.")] = 16,
    route_check: Annotated[int, typer.Option(help="Questions also sent through the small sidecar's real escalation "
                                                  "route to the big one (0: skip).")] = 8,
    out: Annotated[Optional[Path], typer.Option(help="Writes <out>.json, .md, .png, .gain-rates.json (and live: "
                                                     "<out>.jsonl, answers appended: a rerun resumes). Default: "
                                                     "weights/cascade/qwen2.5-coder-0.5b-to-1.5b live, "
                                                     "weights/cascade/routing offline.")] = None,
    small_predictions: Annotated[Optional[Path], typer.Option(help="Offline, no model: the small model's `eval "
                                                                   "--predictions` records (with --big-predictions).")] = None,
    big_predictions: Annotated[Optional[Path], typer.Option(help="Offline: the big model's `eval --predictions` "
                                                                 "records on the same questions.")] = None,
    records: Annotated[Optional[Path], typer.Option(help="Offline: a live run's <out>.jsonl (both models' "
                                                         "records).")] = None,
):
    """A small model answers, the big one takes what is escalated: accuracy against the share escalated (0-100%)
    for escalation ordered by the small model's confidences (lowest first), at random, by the big model's
    prompt-only P, by the expected gain P_big - P_small before decoding (the router) and after the small answer
    (the cascade), the same difference on raw max-softmax, a leave-one-source-out fitted router and the oracle;
    areas, APGR, paired bootstrap intervals, APGR per source, tokens (and seconds where measured) per question and
    the targets. Live: both real models served by sidecars. Offline (--small-predictions/--big-predictions or
    --records): no model."""
    if small_predictions or big_predictions or records:
        from valueprobe.bench.cascade import run_offline

        if records and (small_predictions or big_predictions):
            fail("give either --records or --small-predictions and --big-predictions, not both")
        if not records and not (small_predictions and big_predictions):
            fail("offline needs both --small-predictions and --big-predictions")
        out = out or Path("weights/cascade/routing")
        if records and Path(f"{out}.jsonl").resolve() == records.resolve():
            fail(f"--out {out} would overwrite the report of the records it reads; choose another --out")
        for path in (records, small_predictions, big_predictions):
            if path is not None and not path.exists():
                fail(f"{path} does not exist")
        try:
            run_offline(out=out, small_predictions=small_predictions, big_predictions=big_predictions,
                        records=records, echo=typer.echo)
        except (ValueError, KeyError) as exc:
            fail(f"cannot analyse the records: {exc!r}")
        typer.echo(f"wrote {out}.md, {out}.json, {out}.png, {out}.gain-rates.json")
        return
    out = out or Path("weights/cascade/qwen2.5-coder-0.5b-to-1.5b")
    from valueprobe.bench.cascade import check_escalation_route, held_out_per_kind, load_records, run
    from valueprobe.bench.serve import spawn_sidecar, wait_ready
    from valueprobe.calibration.evaluate import artifact_test_questions
    from valueprobe.weights import default_artifact

    small_probe = load_probe(small_artifact)
    big_artifact = big_artifact or default_artifact()
    questions = held_out_per_kind(artifact_test_questions(small_probe), per_kind, seed=0)
    procs = []
    try:
        spawned = {}
        if big_url is None:
            spawned["big"] = spawn_sidecar(None, big_artifact, max_batch_size=concurrency)
        if small_url is None:
            spawned["small"] = spawn_sidecar(None, small_artifact, max_batch_size=concurrency)
        procs = [p for p, _ in spawned.values()]
        urls = {name: wait_ready(*pu)[1] for name, pu in spawned.items()}
        small_url, big_url = small_url or urls["small"], big_url or urls["big"]
        summary = run(questions, small_url=small_url, big_url=big_url, out=out, max_tokens=max_tokens,
                      concurrency=concurrency, echo=typer.echo)
        if route_check:
            proc, url = wait_ready(*spawn_sidecar(None, small_artifact, escalate_url=big_url + "/v1",
                                                  escalate_kind="openai", escalate_below=1.0,
                                                  # the big model on shared CPUs takes minutes for 8 at once: the
                                                  # default 30 s made escalations fall back to local answers
                                                  upstream_timeout_s=1800))
            procs.append(proc)
            check = check_escalation_route(questions[:route_check // 2] + questions[-(route_check - route_check // 2):],
                                           small_url_escalating=url, big=load_records(Path(f"{out}.jsonl"))["big"],
                                           max_tokens=max_tokens)
            typer.echo(f"escalation route check: {check['routed']}/{check['n']} routed, {check['same_as_big']}/"
                       f"{check['n']} identical to the big model's own answer, {check['upstream_errors']} upstream "
                       "errors")
            summary["route_check"] = check
            import json

            with open(f"{out}.md", "a") as fh:
                fh.write(f"\nEscalation route check (the small sidecar escalating everything to the big one over the "
                         f"OpenAI protocol): {check['routed']}/{check['n']} routed, {check['same_as_big']}/{check['n']} "
                         f"identical to the big model's own answer, {check['upstream_errors']} upstream errors.\n")

            from valueprobe.bench.cascade import json_ready

            Path(f"{out}.json").write_text(json.dumps(json_ready(summary), indent=2))
    finally:
        for p in procs:
            p.terminate()


@bench_app.command("recalibrate")
def bench_recalibrate(
    data: Annotated[Optional[list[str]], typer.Option(help="Data specs the artifact was never fitted on "
                                                           "(repeatable), mixed and shuffled.")] = None,
    artifact: Annotated[Optional[Path], typer.Option(help="Artifact; default: the shipped default.")] = None,
    url: Annotated[Optional[list[str]], typer.Option(help="Running sidecars (started with --recalibration auto and "
                                                          "--admin-token; several: replicas sharing one store) "
                                                          "instead of starting them.")] = None,
    replicas: Annotated[int, typer.Option(help="Sidecars to start, sharing one store (asked in turn; each label "
                                               "goes to another replica than the one that answered).")] = 1,
    store: Annotated[Optional[str], typer.Option(help="The started sidecars' store; default: <out>.store.sqlite "
                                                      "(kept, so an interrupted run resumes).")] = None,
    resume: Annotated[bool, typer.Option(help="Skip the windows already in <out>.jsonl (an interrupted run; the "
                                              "sidecars must use the same store).")] = True,
    admin_token: Annotated[str, typer.Option(help="Its admin token.")] = "recalibrate-bench",
    window: Annotated[int, typer.Option(help="Answers per window (scored before their labels are sent).")] = 100,
    min_feedback: Annotated[int, typer.Option(help="Labels a kind needs before its shadow can be promoted.")] = 100,
    every: Annotated[int, typer.Option(help="Feedbacks between shadow-vs-live comparisons.")] = 50,
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per answer.")] = 16,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 16,
    out: Annotated[Path, typer.Option(help="Writes <out>.jsonl (every answer), .json, .md, .png.")] =
        Path("weights/recalibrate/qwen2.5-coder-1.5b-instruct"),
):
    """Replay sources the artifact never saw through sidecars with --recalibration auto, sending each graded
    answer's label to /v1/feedback (of another replica than the one that answered, with --replicas 2): ECE and
    Brier of the fitted and of the served calibration, window by window (each window answered before its labels
    are sent), and the promotions made. Resumable: finished windows are kept in <out>.jsonl and the sidecars'
    labels and promotions in their store (<out>.store.sqlite), so a rerun goes on where it stopped (--no-resume
    starts over, with a new store)."""
    import tempfile

    from valueprobe.bench.recalibrate import run, sample_sources
    from valueprobe.bench.serve import spawn_sidecar, wait_ready
    from valueprobe.weights import default_artifact

    specs = data or ["arithmetic:400", "socialiqa:400"]
    questions = sample_sources(specs)
    procs = []
    try:
        if not url:
            if replicas < 1:
                fail("--replicas must be at least 1")
            store_path = Path(f"{out}.store.sqlite")
            if not resume and store is None:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{store_path}{suffix}").unlink(missing_ok=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            store = store or f"sqlite:///{store_path.resolve()}"
            folder = tempfile.mkdtemp(prefix="valueprobe-calibrations-")
            spawned = [spawn_sidecar(None, artifact or default_artifact(), max_batch_size=concurrency,
                                     admin_token=admin_token, recalibration="auto", store=store, replica=f"bench-{i}",
                                     recalibration_min_feedback=min_feedback, recalibration_every=every,
                                     calibration_dir=folder, store_sync_s=1) for i in range(replicas)]
            procs = [p for p, _ in spawned]
            url = [wait_ready(*s)[1] for s in spawned]
            typer.echo(f"{replicas} sidecar(s) ready at {', '.join(url)}, store {store}")
        run(questions, url=url, admin_token=admin_token, out=out, window=window, max_tokens=max_tokens,
            concurrency=concurrency, sources=specs, echo=typer.echo, resume=resume)
    finally:
        for proc in procs:
            proc.terminate()


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
        fail(f"unknown strategies {unknown}; expected some of {list(KNOWN_GENERATED)}")
    if objective not in ("td", "bce"):
        fail("objective must be td or bce")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        run(traces_file, out=out, states_dir=states, model_name=model, layer=layer, folds=folds, objective=objective,
            width=width, batch=batch, limit=limit, strategies=chosen, do_generate=bool(chosen), seed=seed,
            echo=typer.echo)
    except ValueError as exc:
        fail(str(exc))


@bench_app.command("route-check")
def bench_route_check(
    small_artifact: Annotated[Path, typer.Option(help="The small model's artifact (its test split is the question set).")] =
        Path("weights/qwen2.5-coder-0.5b-instruct.safetensors"),
    big_artifact: Annotated[Optional[Path], typer.Option(help="The big model's artifact; default: the shipped default.")] = None,
    per_kind: Annotated[int, typer.Option(help="Held-out questions per kind sent through the route.")] = 8,
    cost_questions: Annotated[int, typer.Option(help="Questions the decision's cost is timed on (per round).")] = 6,
    reps: Annotated[int, typer.Option(help="Interleaved rounds of the cost measurement.")] = 3,
    gain_table: Annotated[Optional[Path], typer.Option(help="Rate -> gain threshold JSON (bench cascade's "
                                                         "<out>.gain-rates.json).")] = Path("weights/cascade/routing.gain-rates.json"),
    rate: Annotated[float, typer.Option(help="--escalate-gain-rate of the small sidecar.")] = 0.3,
    predictions: Annotated[Optional[Path], typer.Option(help="eval --predictions records with route_gain, compared "
                                                         "with the live gains.")] = None,
    max_tokens: int = 16,
    out: Annotated[Path, typer.Option(help="Writes <out>.md and <out>.json.")] = Path("weights/cascade/route-live"),
):
    """Gain routing through the real route with both real models: the big sidecar's /v1/confidence (the decision's
    cost) timed against its whole answer, interleaved; then held-out questions sent through the small sidecar with
    --escalate-gain-rate, each decision checked against the gain and threshold it reports and against the big
    sidecar's own probability (and an offline route_gain where given)."""
    import json

    from valueprobe.bench.cascade import held_out_per_kind
    from valueprobe.bench.route_live import decision_cost, routed_decisions, write
    from valueprobe.bench.serve import spawn_sidecar, wait_ready
    from valueprobe.calibration.evaluate import artifact_test_questions
    from valueprobe.weights import default_artifact

    questions = held_out_per_kind(artifact_test_questions(load_probe(small_artifact)), per_kind, seed=1)
    offline = {}
    if predictions is not None:
        records = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
        offline = {r["id"]: r for r in records}
    procs = []
    try:
        big = wait_ready(*spawn_sidecar(None, big_artifact or default_artifact(), max_batch_size=8))
        procs.append(big[0])
        extra = {"escalate_gain_table": str(gain_table)} if gain_table and gain_table.exists() else {}
        small = wait_ready(*spawn_sidecar(None, small_artifact, escalate_url=big[1] + "/v1", escalate_gain_rate=rate,
                                          escalate_confidence_timeout_s=600, upstream_timeout_s=1800, **extra))
        procs.append(small[0])
        cost = decision_cost(big[1], questions[:cost_questions // 2] + questions[-(cost_questions - cost_questions // 2):],
                             max_tokens=max_tokens, reps=reps)
        decisions = routed_decisions(small[1], big[1], questions, max_tokens=max_tokens, predictions=offline)
        typer.echo("\n".join(write(out, cost, decisions)))
    finally:
        for p in procs:
            p.terminate()
