"""Load test of the sidecar: N concurrent clients for a fixed time, batched vs one-at-a-time, side by side.

Starts two sidecars on loopback (``max_batch_size=B`` and ``max_batch_size=1``) with the same model and artifact,
drives each with the same load in turn, and prints throughput, p50/p99 latency, errors, and the ratio.
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


async def drive(url: str, clients: int, seconds: float, endpoint: str, max_tokens: int) -> dict:
    latencies, errors = [], 0
    deadline = time.perf_counter() + seconds
    path, make = {
        "confidence": ("/v1/confidence", lambda q: {"prompt": q}),
        "completions": ("/v1/completions", lambda q: {"prompt": q, "max_tokens": max_tokens}),
    }[endpoint]

    async def client(i: int):
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            j = i
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    r = await http.post(path, json=make(QUESTIONS[j % len(QUESTIONS)]))
                    ok = r.status_code == 200
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
            "p50_ms": float(np.percentile(lat, 50) * 1000), "p99_ms": float(np.percentile(lat, 99) * 1000)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sidecar(model, artifact, **settings):
    """Start ``valueprobe serve`` on a free loopback port with ``settings`` as ``VALUEPROBE_<NAME>`` variables;
    returns ``(process, url)`` once ``/readyz`` answers 200."""
    port = _free_port()
    env = {**os.environ, "VALUEPROBE_PORT": str(port),
           **{f"VALUEPROBE_{name.upper()}": str(value) for name, value in settings.items()}}
    if model:
        env["VALUEPROBE_MODEL"] = model
    if artifact:
        env["VALUEPROBE_ARTIFACT"] = str(artifact)
    proc = subprocess.Popen([sys.executable, "-m", "valueprobe.cli", "serve", "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
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


def run(model=None, artifact=None, url=None, clients=8, seconds=20.0, batch=8, endpoint="confidence", max_tokens=16):
    from rich.console import Console
    from rich.table import Table

    console = Console()
    results = {}
    if url:
        results["given server"] = asyncio.run(drive(url, clients, seconds, endpoint, max_tokens))
    else:
        for label, b in ((f"batched (max {batch})", batch), ("one at a time", 1)):
            proc, server = start_sidecar(model, artifact, max_batch_size=b, max_wait_ms=10, max_queue=1024)
            try:
                asyncio.run(drive(server, clients, min(3.0, seconds), endpoint, max_tokens))  # warm-up
                results[label] = asyncio.run(drive(server, clients, seconds, endpoint, max_tokens))
            finally:
                proc.terminate()
                proc.wait(30)
    table = Table(title=f"{endpoint}: {clients} clients x {seconds:.0f} s")
    for col in ("server", "requests", "errors", "req/s", "p50 ms", "p99 ms"):
        table.add_column(col)
    for label, r in results.items():
        table.add_row(label, str(r["requests"]), str(r["errors"]), f"{r['throughput']:.2f}", f"{r['p50_ms']:.0f}",
                      f"{r['p99_ms']:.0f}")
    console.print(table)
    if len(results) == 2:
        a, b = results.values()
        console.print(f"batched / one-at-a-time throughput: {a['throughput'] / max(b['throughput'], 1e-9):.2f}x")
    return results
