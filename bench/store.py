"""``valueprobe bench store``: what the request and feedback store costs.

1. **Write throughput** of each store (SQLite file, PostgreSQL) at ``--clients`` concurrent writers: scored requests
   through the background writer (rows/s until all are written) and labels written synchronously as
   ``/v1/feedback`` writes them (labels/s), ``--repeats`` times, median and range.
2. **Added latency per request**: two real sidecars on loopback, one with the store (``--store``, default a SQLite
   file) and one with none (``--store none``: nothing written), the same model and artifact, driven in turn by
   ``--clients`` concurrent clients (ABBA order, ``--repeats`` times); p50 and p99 of each, and the difference as a
   share of a request's time per repetition (target: under 2%).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from valueprobe.server.store import RequestRecord, Store


def _record(i: int, run: str) -> RequestRecord:
    return RequestRecord(request_id=f"{run}-{i}", created_at=time.time(), origin="bench" * 12, artifact_id="bench",
                         calibration_version=0, kind="open", slot="open", probability=0.5, z0=0.0, local=True,
                         replica="bench", ood=False)


def _in_threads(part, clients: int) -> None:
    """``part(k)`` for k in 0..clients-1, each on its own thread, all at once; returns when every one ended."""
    threads = [threading.Thread(target=part, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def write_throughput(url: str, clients: int, requests: int, labels: int) -> dict:
    """One run: ``requests`` scored requests queued by ``clients`` threads, timed until written; then ``labels``
    labels written by ``clients`` threads at once."""
    store = Store(url, replica="bench", queue_size=requests + 1)
    run = uuid.uuid4().hex[:8]
    try:
        def queue_part(k: int):
            for i in range(k, requests, clients):
                store.record_request(_record(i, run))

        started = time.perf_counter()
        _in_threads(queue_part, clients)
        queued = time.perf_counter() - started
        if not store.flush(120):
            raise RuntimeError("the store did not take the rows in time")
        written = time.perf_counter() - started

        def label_part(k: int):
            for i in range(k, labels, clients):
                store.add_label(request_id=f"{run}-{i}", correct=bool(i % 2), origin="bench" * 12, probability=0.5,
                                slot="open", z0=0.0, used=True)

        started = time.perf_counter()
        _in_threads(label_part, clients)
        labelled = time.perf_counter() - started
        return {"requests_per_s": requests / written, "queue_us_per_request": queued / requests * 1e6,
                "labels_per_s": labels / labelled, "lost": store.lost}
    finally:
        store.close()


def latency_arms(model, artifact, store_url: str, clients: int, seconds: float, repeats: int, max_tokens: int) -> dict:
    """Both sidecars at once, driven in turn (ABBA); per arm the runs, and per repetition the added share."""
    from valueprobe.bench.serve import QUESTIONS, drive, spawn_sidecar, wait_ready

    arms = {"store": store_url, "no store": "none"}
    servers, runs = {}, {label: [] for label in arms}
    try:
        for label, url in arms.items():
            servers[label] = spawn_sidecar(model, artifact, store=url, max_queue=1024, replica=label)
        for label in arms:
            wait_ready(*servers[label])
        for label in arms:  # warm-up
            asyncio.run(drive(servers[label][1], clients, min(5.0, seconds), "completions", max_tokens, QUESTIONS))
        order = []
        for r in range(repeats):
            order += list(arms) if r % 2 == 0 else list(reversed(list(arms)))
        for label in order:
            runs[label].append(asyncio.run(drive(servers[label][1], clients, seconds, "completions", max_tokens,
                                                 QUESTIONS)))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    added = {q: [(s[q] - n[q]) / n[q] for s, n in zip(runs["store"], runs["no store"])] for q in ("p50_ms", "p99_ms")}
    return {"runs": runs, "added_share": added}


def run(*, model=None, artifact=None, clients: int = 16, requests: int = 5000, labels: int = 1000, repeats: int = 3,
        seconds: float = 20.0, max_tokens: int = 4, postgres_url: str | None = None, latency: bool = True,
        out: Path | None = None, echo=print) -> dict:
    from valueprobe.bench.pgserver import PostgresServer, new_database, postgres_bindir

    results: dict = {"clients": clients, "throughput": {}, "latency": None}
    pg = None
    with tempfile.TemporaryDirectory() as tmp:
        backends = {"sqlite file": lambda: f"sqlite:///{Path(tmp) / f'{uuid.uuid4().hex}.sqlite'}"}
        if postgres_url or postgres_bindir():
            if not postgres_url:
                pg = PostgresServer()
            admin = postgres_url or pg.url
            backends["postgresql"] = lambda: new_database(admin)
        try:
            for name, make_url in backends.items():
                reps = [write_throughput(make_url(), clients, requests, labels) for _ in range(repeats)]
                summary = {k: {"median": float(np.median([r[k] for r in reps])), "min": float(min(r[k] for r in reps)),
                               "max": float(max(r[k] for r in reps))} for k in reps[0]}
                results["throughput"][name] = summary
                echo(f"{name}: {summary['requests_per_s']['median']:,.0f} scored requests/s "
                     f"({summary['requests_per_s']['min']:,.0f}-{summary['requests_per_s']['max']:,.0f}), "
                     f"{summary['labels_per_s']['median']:,.0f} labels/s "
                     f"({summary['labels_per_s']['min']:,.0f}-{summary['labels_per_s']['max']:,.0f}) at {clients} "
                     f"writers; {summary['queue_us_per_request']['median']:.1f} us to queue a request; "
                     f"{repeats} runs")
        finally:
            if pg is not None:
                pg.close()
        if latency:
            arms = latency_arms(model, artifact, backends["sqlite file"](), clients, seconds, repeats, max_tokens)
            results["latency"] = arms
            for label, runs in arms["runs"].items():
                echo(f"sidecar, {label}: p50 {np.median([r['p50_ms'] for r in runs]):.0f} ms, p99 "
                     f"{np.median([r['p99_ms'] for r in runs]):.0f} ms, {np.median([r['throughput'] for r in runs]):.2f}"
                     f" req/s, errors {sum(r['errors'] for r in runs)} ({len(runs)} runs of {seconds:.0f} s, "
                     f"{clients} clients)")
            for q, shares in arms["added_share"].items():
                echo(f"added by the store, {q[:3]}: median {100 * np.median(shares):+.2f}% of a request "
                     f"(per repetition {', '.join(f'{100 * s:+.2f}%' for s in shares)}; target < 2%)")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results
