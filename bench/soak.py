"""Soak test: N clients for T seconds against one sidecar, every route mixed, a hot reload in the middle and a
client that disconnects mid-stream. Prints requests by status, p50/p95 latency, polite 503s (with Retry-After)
and the server's RSS at start and end.

A polite client honours ``Retry-After`` and retries; after the load window every request still waiting for an
answer is retried until it gets one (up to a grace period), so "every request eventually answered" is checked,
not assumed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from .serve import QUESTIONS, start_sidecar

ADMIN = "soak-admin"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _requests(rng: random.Random, max_tokens: int, max_list: int):
    """(name, method, path, json, stream) for one mixed request."""
    q = rng.choice(QUESTIONS)
    kind = rng.choices(["chat", "chat-stream", "completions", "tgi", "confidence", "confidence-list", "feedback"],
                       weights=[3, 2, 2, 2, 4, 1, 1])[0]
    if kind == "chat":
        return kind, "/v1/chat/completions", {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens}, False
    if kind == "chat-stream":
        return kind, "/v1/chat/completions", {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                                              "stream": True}, True
    if kind == "completions":
        return kind, "/v1/completions", {"prompt": q, "max_tokens": max_tokens}, False
    if kind == "tgi":
        return kind, "/generate", {"inputs": q, "parameters": {"max_new_tokens": max_tokens}}, False
    if kind == "confidence":
        return kind, "/v1/confidence", {"prompt": q}, False
    if kind == "confidence-list":
        n = rng.choice([2, 16, max_list])
        return kind, "/v1/confidence", [{"prompt": f"{rng.choice(QUESTIONS)} ({i})"} for i in range(n)], False
    return kind, "/v1/feedback", {"request_id": f"soak-{rng.random()}", "correct": rng.random() < 0.5,
                                  "probability": rng.random()}, False


async def run_soak(url: str, pid: int | None, *, clients: int = 16, seconds: float = 60.0, max_tokens: int = 4,
                   max_list: int = 256, reload_artifact: str | None = None, grace_s: float = 300.0,
                   seed: int = 0) -> dict:
    statuses: Counter = Counter()
    by_kind: Counter = Counter()
    latencies: list[float] = []
    polite_503 = impolite_503 = unanswered = 0
    rss_start = _rss_mb(pid) if pid else float("nan")
    deadline = time.perf_counter() + seconds
    hard_deadline = deadline + grace_s
    auth = {"Authorization": f"Bearer {ADMIN}"}

    async def one(http, rng):
        nonlocal polite_503, impolite_503, unanswered
        name, path, body, stream = _requests(rng, max_tokens, max_list)
        headers = auth if path == "/v1/feedback" else {}
        started = time.perf_counter()
        while True:
            try:
                if stream:
                    async with http.stream("POST", path, json=body, headers=headers) as r:
                        async for _ in r.aiter_lines():
                            pass
                else:
                    r = await http.post(path, json=body, headers=headers)
            except httpx.HTTPError:
                statuses["transport error"] += 1
                await asyncio.sleep(0.2)
                if time.perf_counter() > hard_deadline:
                    unanswered += 1
                    return
                continue
            statuses[r.status_code] += 1
            if r.status_code == 503:
                if "retry-after" in r.headers:
                    polite_503 += 1
                else:
                    impolite_503 += 1
                if time.perf_counter() > hard_deadline:
                    unanswered += 1
                    return
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                continue
            by_kind[name] += 1
            latencies.append(time.perf_counter() - started)
            return

    async def client(i: int):
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while time.perf_counter() < deadline:
                await one(http, rng)

    async def disconnecting_client():
        """Opens a long stream, reads the first chunk, hangs up; repeatedly."""
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while time.perf_counter() < deadline:
                try:
                    async with http.stream("POST", "/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 64,
                            "stream": True}) as r:
                        async for _ in r.aiter_lines():
                            break
                    statuses["disconnected mid-stream"] += 1
                except httpx.HTTPError:
                    statuses["transport error"] += 1
                await asyncio.sleep(1.0)

    async def reloader():
        await asyncio.sleep(seconds / 2)
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            r = await http.post("/v1/admin/reload", json={"artifact": reload_artifact}, headers=auth)
            statuses[f"reload {r.status_code}"] += 1

    tasks = [client(i) for i in range(clients)] + [disconnecting_client()]
    if reload_artifact:
        tasks.append(reloader())
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    rss_end = _rss_mb(pid) if pid else float("nan")
    lat = np.array(latencies) if latencies else np.array([np.nan])
    server_errors = sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500 and k != 503)
    return {"clients": clients, "seconds": seconds, "elapsed": elapsed, "answered": len(latencies),
            "statuses": dict(statuses), "by_kind": dict(by_kind), "p50_ms": float(np.percentile(lat, 50) * 1000),
            "p95_ms": float(np.percentile(lat, 95) * 1000), "polite_503": polite_503, "impolite_503": impolite_503,
            "server_errors": server_errors, "unanswered": unanswered, "rss_start_mb": rss_start, "rss_end_mb": rss_end,
            "rss_growth": (rss_end - rss_start) / rss_start if rss_start == rss_start and rss_start else float("nan")}


def run(*, model=None, artifact=None, url=None, clients=16, seconds=60.0, max_tokens=4, max_queue=64, echo=print):
    from valueprobe.weights import default_artifact

    proc = None
    artifact_path = Path(artifact) if artifact else default_artifact()
    if url is None:
        proc, url = start_sidecar(model, artifact_path, admin_token=ADMIN, max_queue=max_queue,
                                  default_max_new_tokens=4)
    try:
        # Warm-up, so start-up allocations do not count as growth.
        httpx.post(url + "/v1/confidence", json={"prompt": "warm up?"}, timeout=600)
        httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "warm?"}],
                                                       "max_tokens": 2}, timeout=600)
        result = asyncio.run(run_soak(url, proc.pid if proc else None, clients=clients, seconds=seconds,
                                      max_tokens=max_tokens, reload_artifact=artifact_path.name))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    echo(f"soak: {result['clients']} clients + 1 disconnecting, {result['seconds']:.0f} s of load "
         f"({result['elapsed']:.0f} s until every request was answered)")
    echo("statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(result["statuses"].items(), key=lambda kv: str(kv[0]))))
    echo("answered by kind: " + ", ".join(f"{k}: {v}" for k, v in sorted(result["by_kind"].items())))
    echo(f"latency p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms; 503 with Retry-After: "
         f"{result['polite_503']}, without: {result['impolite_503']}; other 5xx: {result['server_errors']}; "
         f"never answered: {result['unanswered']}")
    echo(f"server RSS {result['rss_start_mb']:.0f} MB -> {result['rss_end_mb']:.0f} MB "
         f"({100 * result['rss_growth']:+.1f}%)")
    ok = result["server_errors"] == 0 and result["impolite_503"] == 0 and result["unanswered"] == 0 and (
        not result["rss_growth"] == result["rss_growth"] or result["rss_growth"] < 0.05)
    echo("target (no 5xx but polite 503s, all answered, RSS growth < 5%): " + ("MET" if ok else "MISSED"))
    return result
