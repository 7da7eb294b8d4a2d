"""Load test of the sidecar: N concurrent clients for a fixed time, batched vs one-at-a-time, side by side.

Starts two sidecars on loopback (``max_batch_size=B`` and ``max_batch_size=1``) with the same model and artifact,
drives each with the same load in turn, ``--repeats`` times interleaved, and prints the medians of throughput,
p50/p95 latency and errors, and the ratio in each repetition with its median and range.
With ``--url`` it drives an existing server instead (no ratio).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

QUESTIONS = [
    "What is the capital of Peru?", "Who wrote the Iliad?", "What is the boiling point of water in Kelvin?",
    "Which planet has the most moons?", "Who painted The Starry Night?", "What is the largest desert on Earth?",
    "In which year did the Berlin Wall fall?", "What is the chemical symbol for gold?",
]
#: questions whose answers run to ``max_tokens`` (the short ones above end after a few tokens, so prefill dominates)
LONG_QUESTIONS = [
    "Explain in a paragraph why the sky is blue.", "Describe how a bill becomes a law in the United States.",
    "Explain how vaccines train the immune system.", "Describe the water cycle step by step.",
    "Explain why the seasons change on Earth.", "Describe how a refrigerator keeps food cold.",
    "Explain what causes ocean tides.", "Describe how plants turn sunlight into sugar.",
]


async def drive(url: str, clients: int, seconds: float, endpoint: str, max_tokens: int, questions=QUESTIONS) -> dict:
    latencies, errors, tokens = [], 0, 0
    deadline = time.perf_counter() + seconds
    path, make = {
        "confidence": ("/v1/confidence", lambda q: {"prompt": q}),
        "completions": ("/v1/completions", lambda q: {"prompt": q, "max_tokens": max_tokens}),
    }[endpoint]

    async def client(i: int):
        nonlocal errors, tokens
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            j = i
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    r = await http.post(path, json=make(questions[j % len(questions)]))
                    ok = r.status_code == 200
                    if ok and endpoint == "completions":
                        tokens += r.json()["usage"]["completion_tokens"]
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
                    await asyncio.sleep(0.05)
                j += clients

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(latencies), "errors": errors, "throughput": len(latencies) / elapsed,
            "tokens_per_s": tokens / elapsed, "p50_ms": float(np.percentile(lat, 50) * 1000),
            "p95_ms": float(np.percentile(lat, 95) * 1000), "p99_ms": float(np.percentile(lat, 99) * 1000)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sidecar(model, artifact, **settings):
    """Start ``valueprobe serve`` on a free loopback port with ``settings`` as ``VALUEPROBE_<NAME>`` variables;
    returns ``(process, url)`` once ``/readyz`` answers 200."""
    return wait_ready(*spawn_sidecar(model, artifact, **settings))


def spawn_sidecar(model, artifact, **settings):
    """:func:`start_sidecar` without the wait, so several sidecars load their models at once."""
    port = _free_port()
    env = {**os.environ, "VALUEPROBE_PORT": str(port),
           **{f"VALUEPROBE_{name.upper()}": str(value) for name, value in settings.items()}}
    if model:
        env["VALUEPROBE_MODEL"] = model
    if artifact:
        env["VALUEPROBE_ARTIFACT"] = str(artifact)
    proc = subprocess.Popen([sys.executable, "-m", "valueprobe.cli", "serve", "--log-level", "warning"], env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc, url, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("sidecar exited during start-up")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("sidecar did not become ready")


def run(model=None, artifact=None, url=None, clients=8, seconds=20.0, batch=8, endpoint="confidence", max_tokens=16,
        answers="short", repeats=3):
    """Both sidecars run at once (idle while the other is driven); the load alternates between them ``repeats``
    times (ABBA order, so drift in the machine's speed falls on both), each run after a short warm-up of both."""
    from rich.console import Console

    console = Console()
    questions = {"short": QUESTIONS, "long": LONG_QUESTIONS}[answers]
    title = f"{endpoint}: {clients} clients x {seconds:.0f} s, {answers} answers"
    if url:
        results = {"given server": asyncio.run(drive(url, clients, seconds, endpoint, max_tokens, questions))}
        print_table(console, title, results)
        return results
    arms = {f"batched (max {batch})": batch, "one at a time": 1}
    servers, runs = {}, {label: [] for label in arms}
    try:
        for label, b in arms.items():
            servers[label] = spawn_sidecar(model, artifact, max_batch_size=b, max_wait_ms=10, max_queue=1024)
        for proc, server in servers.values():
            wait_ready(proc, server)
        for label, (_, server) in servers.items():  # warm-up
            asyncio.run(drive(server, clients, min(3.0, seconds), endpoint, max_tokens, questions))
        labels = list(arms)
        for r in range(repeats):
            for label in labels if r % 2 == 0 else labels[::-1]:
                runs[label].append(asyncio.run(drive(servers[label][1], clients, seconds, endpoint, max_tokens,
                                                     questions)))
                done = runs[label][-1]
                console.print(f"run {r + 1}/{repeats} {label}: {done['throughput']:.2f} req/s, "
                              f"{done['tokens_per_s']:.2f} tokens/s, p50 {done['p50_ms']:.0f} ms")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    summary = summarize_repeats(runs)
    print_table(console, f"{title}, {repeats} interleaved runs each (medians)", summary["arms"])
    ratio = summary["ratios"]["tokens_per_s" if endpoint == "completions" else "throughput"]
    unit = "tokens/s" if endpoint == "completions" else "requests/s"
    console.print(f"batched / one-at-a-time {unit}: median {ratio['median']:.2f}x (per run "
                  f"{', '.join(f'{x:.2f}' for x in ratio['runs'])}; min {ratio['min']:.2f}, max {ratio['max']:.2f})")
    return summary


def summarize_repeats(runs: dict[str, list[dict]]) -> dict:
    """Per arm, the median of each measure over its runs (and the runs); for the first arm against the second,
    the ratio of throughput and of tokens/s in each repetition (runs paired in order) with median, min and max."""
    keys = ("requests", "errors", "throughput", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms")
    arms = {label: {**{k: float(np.median([r[k] for r in rs])) for k in keys}, "runs": rs}
            for label, rs in runs.items()}
    (a, b) = list(runs.values())[:2]
    ratios = {}
    for k in ("throughput", "tokens_per_s"):
        per = [x[k] / y[k] if y[k] > 0 else float("nan") for x, y in zip(a, b)]
        ratios[k] = {"runs": per, "median": float(np.median(per)), "min": float(np.min(per)), "max": float(np.max(per))}
    return {"arms": arms, "ratios": ratios}


def print_table(console, title: str, results: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("server", "requests", "errors", "req/s", "tokens/s", "p50 ms", "p95 ms"):
        table.add_column(col)
    for label, r in results.items():
        table.add_row(label, f"{r['requests']:.0f}", f"{r['errors']:.0f}", f"{r['throughput']:.2f}",
                      f"{r['tokens_per_s']:.2f}", f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}")
    console.print(table)


def run_engines(model=None, artifact=None, engines=("transformers", "vllm"), clients=(1, 4, 16), seconds=60.0,
                max_tokens=32, overhead_reps=5, answer_artifact=("on", "off"), answers="long"):
    """Each engine's sidecar, with its answer-level artifact on and off, driven with completions at each client
    count (one server per arm, started once; arms run one after another, since two 1.5B engines at once do not
    fit a small machine), then vLLM over transformers per client count and answer setting, side by side in one
    run; then the in-engine probe overhead: one vLLM engine, the same batch of requests with the probe attached
    and detached, interleaved ``overhead_reps`` times. ``answers``: ``long`` (explanations that run to
    ``max_tokens``: decode-bound) or ``short`` (trivia, a few tokens: prefill-bound)."""
    from rich.console import Console

    console = Console()
    questions = {"short": QUESTIONS, "long": LONG_QUESTIONS}[answers]
    results: dict[str, dict] = {}
    for setting in answer_artifact if clients else ():
        for engine in engines:
            started = time.perf_counter()
            extra = {} if setting == "on" else {"answer_artifact": "none"}
            proc, server = start_sidecar(model, artifact, engine=engine, max_queue=1024,
                                         max_new_tokens_limit=max_tokens, **extra)
            console.print(f"{engine} sidecar (answer artifact {setting}) ready in {time.perf_counter() - started:.0f} s")
            try:
                asyncio.run(drive(server, 2, 5.0, "completions", 4, questions))  # warm-up
                for n in clients:
                    key = f"{engine}, answer artifact {setting}, {n} clients"
                    results[key] = asyncio.run(drive(server, n, seconds, "completions", max_tokens, questions))
                    console.print(f"  {key}: {results[key]['tokens_per_s']:.2f} tokens/s")
            finally:
                proc.terminate()
                proc.wait(60)
    if results:
        print_table(console, f"completions, {answers} answers, {max_tokens} new tokens at most, {seconds:.0f} s per row",
                    results)
    results["ratios"] = {}
    for setting in answer_artifact:
        for n in clients:
            a = results.get(f"vllm, answer artifact {setting}, {n} clients")
            b = results.get(f"transformers, answer artifact {setting}, {n} clients")
            if a and b:
                ratio = a["tokens_per_s"] / max(b["tokens_per_s"], 1e-9)
                results["ratios"][f"answer artifact {setting}, {n} clients"] = ratio
                console.print(f"answer artifact {setting}, {n} clients: vllm / transformers tokens/s = {ratio:.2f}x")
    if "vllm" in engines and overhead_reps:
        results["overhead"] = asyncio.run(probe_overhead(model, artifact, reps=overhead_reps, max_tokens=max_tokens,
                                                         requests=max(clients, default=16)))
        o = results["overhead"]
        console.print(f"in-engine probe overhead ({o['requests']} requests x {max_tokens} tokens, {o['reps']} "
                      f"interleaved reps): with probe {o['with_mean_s']:.2f} ± {o['with_sd_s']:.2f} s, without "
                      f"{o['without_mean_s']:.2f} ± {o['without_sd_s']:.2f} s, ratio {o['ratio']:.3f} "
                      f"(paired ratios {o['ratio_min']:.3f}..{o['ratio_max']:.3f})")
    return results


async def probe_overhead(model=None, artifact=None, *, reps=5, max_tokens=32, requests=16) -> dict:
    """Wall time of ``requests`` concurrent generations on one vLLM engine with the probe attached vs detached."""
    from vllm import SamplingParams

    from valueprobe.plugin import ValueProbe
    from valueprobe.plugin.models import resolve_model_dir
    from valueprobe.server.engines.vllm_engine import VllmEngine
    from valueprobe.weights import default_artifact

    probe = ValueProbe.load(artifact or default_artifact())
    engine = await VllmEngine.create(resolve_model_dir(model or probe.model_name), probe)
    prompts = [engine.tokenize(probe.prompt_format.render(engine.tokenizer, q), probe) for q in QUESTIONS]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def batch(tag: str) -> float:
        started = time.perf_counter()

        async def one(i):
            async for _ in engine.llm.generate({"prompt_token_ids": list(prompts[i % len(prompts)])}, params,
                                               f"{tag}-{i}"):
                pass

        await asyncio.gather(*(one(i) for i in range(requests)))
        return time.perf_counter() - started

    try:
        await batch("warm")
        with_probe, without = [], []
        for r in range(reps):
            for attached in ((True, False) if r % 2 == 0 else (False, True)):
                if attached:
                    await engine.attach(probe)
                    with_probe.append(await batch(f"on{r}"))
                else:
                    await engine.detach(probe)
                    without.append(await batch(f"off{r}"))
                await engine.llm.collective_rpc("valueprobe_take", args=(None,))  # drop readouts nobody asked for
    finally:
        await engine.stop()
    w, wo = np.array(with_probe), np.array(without)
    ratios = w / wo
    return {"requests": requests, "reps": reps, "with_mean_s": float(w.mean()), "with_sd_s": float(w.std(ddof=1)),
            "without_mean_s": float(wo.mean()), "without_sd_s": float(wo.std(ddof=1)),
            "ratio": float(w.mean() / wo.mean()), "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max())}
