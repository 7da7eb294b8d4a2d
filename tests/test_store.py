"""The request and feedback store (server/store.py) against a real PostgreSQL server and SQLite: labels once,
conflicts kept, one version per promotion, writes that never block, and two real sidecar replicas sharing one store
while one of them is killed with SIGKILL and restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import zlib

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from valueprobe.bench.pgserver import PostgresServer, new_database, postgres_bindir, postgres_server
from sqlalchemy import create_engine, inspect, text

from valueprobe.server.store import (MIGRATIONS, SCHEMA_VERSION, RequestRecord, RequestUpdate, Store, StoreError,
                                     labels_t, promotions_t, schema)

from conftest import Server

AUTH = {"Authorization": "Bearer t"}


@pytest.fixture(scope="module")
def pg_admin():
    if postgres_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries missing in CI: .ci/run runs scripts/install-postgres.sh")
        pytest.skip("PostgreSQL server binaries missing: run scripts/install-postgres.sh")
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.sqlite'}"
    return new_database(request.getfixturevalue("pg_admin"))


def record(rid: str, **kw) -> RequestRecord:
    base = dict(request_id=rid, created_at=time.time(), origin="o" * 64, artifact_id="a" * 12, calibration_version=0,
                kind="open", slot="open", probability=0.4, z0=-0.4, local=True, replica="r1")
    return RequestRecord(**{**base, **kw})


def test_labels_count_once_and_a_conflict_is_kept_apart(store_url):
    store = Store(store_url, replica="r1")
    other = Store(store_url, replica="r2")  # a second replica on the same store
    try:
        store.record_request(record("q1"))
        store.record_request(RequestUpdate("q1", answer_probability=0.25))
        assert store.flush()
        seen = other.request("q1")
        assert seen.probability == 0.4 and seen.answer_probability == 0.25 and seen.local
        args = dict(origin="o" * 64, probability=0.4, slot="open", z0=-0.4, used=True)
        assert other.add_label(request_id="q1", correct=True, **args).status == "new"
        assert store.add_label(request_id="q1", correct=True, **args).status == "repeat"  # a retry
        assert store.add_label(request_id="q1", correct=False, **args).status == "conflict"
        assert store.label_counts("o" * 64) == {"open": 1} and store.conflicts() == 1
        assert store.labelled("o" * 64, 10) == {"open": [(-0.4, 1)]}
        assert store.size()["rows"]["vp_labels"] == 1
    finally:
        store.close()
        other.close()


def test_two_replicas_promoting_the_same_version_make_one(store_url):
    stores = [Store(store_url, replica=f"r{i}") for i in range(4)]
    results = [None] * 4
    barrier = threading.Barrier(4)

    def promote(i):
        barrier.wait()
        results[i] = stores[i].record_promotion(origin="o", version=1, artifact_id=f"v1-{i}", artifact=b"x" * 1000,
                                                evidence={"by": i}, trigger="auto")

    threads = [threading.Thread(target=promote, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(results) == [False, False, False, True]
        winner = results.index(True)
        assert stores[0].latest_promotion("o")["artifact_id"] == f"v1-{winner}"
        assert [p["version"] for p in stores[1].promotions("o")] == [1]
        assert stores[2].latest_promotion("o", newer_than=1) is None
    finally:
        for s in stores:
            s.close()


def test_migrations_run_once_and_a_newer_schema_is_refused(store_url):
    stores = []
    threads = [threading.Thread(target=lambda: stores.append(Store(store_url, replica="r"))) for _ in range(3)]
    for t in threads:  # replicas starting together migrate once
        t.start()
    for t in threads:
        t.join()
    assert len(stores) == 3 and all(s.schema_version() == SCHEMA_VERSION for s in stores)
    with stores[0].engine.begin() as conn:
        assert [r.version for r in conn.execute(schema.select()).all()] == list(range(1, SCHEMA_VERSION + 1))
        conn.execute(schema.insert().values(version=SCHEMA_VERSION + 1, applied_at=0.0))
    for s in stores:
        s.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Store(store_url, replica="r")


def test_a_version_1_store_with_rows_is_migrated_in_place(store_url):
    """A store written by schema 1 (before the answer-level artifact recalibrated: no answer_* columns) is brought
    to the current schema at start by ALTER TABLE, its rows kept: an old request and label read back, and the new
    columns take answer-level labels."""
    engine = create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:  # what a valueprobe of schema 1 left behind
        schema.create(conn)
        MIGRATIONS[1](conn)
        conn.execute(schema.insert().values(version=1, applied_at=0.0))
        conn.execute(text("INSERT INTO vp_requests (request_id, created_at, origin, artifact_id, calibration_version, "
                          "kind, slot, probability, z0, local, replica, answer_probability) VALUES ('old', 1.0, 'o', "
                          "'a', 0, 'open', 'open', 0.4, -0.4, true, 'r0', 0.3)"))
        conn.execute(text("INSERT INTO vp_labels (request_id, correct, received_at, replica, origin, probability, "
                          "slot, z0, used) VALUES ('old', true, 2.0, 'r0', 'o', 0.4, 'open', -0.4, true)"))
    assert "answer_z0" not in {c["name"] for c in inspect(engine).get_columns("vp_labels")}
    engine.dispose()
    store = Store(store_url, replica="r1")
    try:
        assert store.schema_version() == SCHEMA_VERSION == 2
        columns = {t: {c["name"] for c in inspect(store.engine).get_columns(t)} for t in ("vp_requests", "vp_labels")}
        assert {"answer_origin", "answer_slot", "answer_z0"} <= columns["vp_requests"]
        assert {"answer_origin", "answer_slot", "answer_z0", "answer_used"} <= columns["vp_labels"]
        old = store.request("old")
        assert old.probability == 0.4 and old.answer_probability == 0.3 and old.answer_z0 is None
        assert store.label_counts("o") == {"open": 1} and store.label_counts("o", answer=True) == {}
        # the old label reads as one that refits no answer-level shadow (answer_used defaults to false)
        assert store.add_label(request_id="old", correct=True, origin="o", probability=0.4, slot="open", z0=-0.4,
                               used=True).answer_used is False
        store.record_request(record("new"))
        store.record_request(RequestUpdate("new", answer_probability=0.7, answer_origin="ans", answer_slot="value",
                                           answer_z0=0.85))
        assert store.flush()
        new = store.request("new")
        assert (new.answer_origin, new.answer_slot, new.answer_z0) == ("ans", "value", 0.85)
        write = store.add_label(request_id="new", correct=False, origin="o", probability=0.4, slot="open", z0=-0.4,
                                used=True, answer_origin="ans", answer_slot="value", answer_z0=0.85, answer_used=True)
        assert write.status == "new" and write.answer_used
        assert store.labelled("ans", 10, answer=True) == {"value": [(0.85, 0)]}
        assert store.label_counts("o") == {"open": 2} and store.label_counts("ans", answer=True) == {"value": 1}
    finally:
        store.close()
    again = Store(store_url, replica="r2")  # migrated once: a second start changes nothing
    try:
        with again.engine.connect() as conn:
            assert [r.version for r in conn.execute(schema.select()).all()] == [1, 2]
        assert again.request("old").probability == 0.4
    finally:
        again.close()


def test_writes_never_block_and_a_store_that_is_down_is_counted(tmp_path):
    """Scored requests are queued, never written on the caller's thread; when the store cannot take them they wait,
    and beyond the queue they are counted as lost (the sidecar keeps answering)."""
    path = tmp_path / "s.sqlite"
    lost = []
    store = Store(f"sqlite:///{path}", replica="r", queue_size=50, on_lost=lost.append)
    lock = store.engine.raw_connection()  # another writer holds the SQLite write lock: the store is "down"
    lock.cursor().execute("BEGIN IMMEDIATE")
    try:
        started = time.perf_counter()
        for i in range(200):
            store.record_request(record(f"q{i}"))
        assert time.perf_counter() - started < 1.0  # queued, not written (a write would wait 30 s for the lock)
        assert sum(lost) >= 149 and store.lost == sum(lost)  # the queue holds 50 (+1 batch in the writer)
    finally:
        lock.rollback()
        lock.close()
    assert store.flush(30)
    assert store.size()["rows"]["vp_requests"] == 200 - store.lost
    store.close()


def test_retention_forgets_old_requests_and_their_labels(store_url):
    store = Store(store_url, replica="r")
    try:
        for i in range(30):
            store.record_request(record(f"q{i}", created_at=time.time() - (39.5 - i) * 86400))
        store.flush()
        store.add_label(request_id="q0", correct=True, origin="o" * 64, probability=0.4, slot="open", z0=0.0, used=True)
        assert store.prune(max_age_days=30) == 10
        assert store.size()["rows"]["vp_labels"] == 0 and store.request("q0") is None
        assert store.prune(max_rows=5) == 15 and store.size()["rows"]["vp_requests"] == 5
        assert store.size()["bytes"] > 0
    finally:
        store.close()


def metric_sum(text: str, name: str, **labels) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def origins(store: Store) -> list[str]:
    with store.engine.connect() as conn:
        return sorted({r.origin for r in conn.execute(labels_t.select()).all()})


def grade(rid: str, probability: float, median: float) -> bool:
    """Labels the tiny probe ranks right but calibrates wrong (its scores say ~50%; 85% above the median and 40%
    below are right), so a shadow refitted on them is better and promotable."""
    u = zlib.crc32(rid.encode()) % 100
    return u < (85 if probability >= median else 40)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_two_replicas_share_one_store_through_a_kill_and_a_restart(assets, backend, tmp_path, request):
    """Two real sidecars on loopback, one store. 16 clients ask both and label every answer on the *other*
    replica; replica A is killed with SIGKILL mid-run and restarted on the same store. Then every label sent is in
    the store exactly once, both report the store's label count, a promotion asked of both at once makes one
    version, and both serve it."""
    url = (new_database(request.getfixturevalue("pg_admin")) if backend == "postgresql"
           else f"sqlite:///{tmp_path / 'shared.sqlite'}")
    common = dict(store=url, admin_token="t", recalibration="shadow", recalibration_min_feedback=20,
                  store_sync_s=0.5, calibration_dir=tmp_path / "calibrations", max_queue=256)
    a = Server(assets, replica="a", **common)
    b = Server(assets, replica="b", **common)
    replicas = {"a": a, "b": b}
    sent: dict[str, bool] = {}
    try:
        a.wait_ready()
        b.wait_ready()
        warm = [httpx.post(f"{b.url}/v1/confidence", json={"prompt": f"Name river number {i}."}, timeout=60).json()
                for i in range(0, 300, 15)]
        median = sorted(w["probability"] for w in warm)[len(warm) // 2]

        async def one(client, name: str, i: int) -> None:
            try:
                r = await client.post(f"{replicas[name].url}/v1/completions",
                                      json={"prompt": f"Name river number {i}.", "max_tokens": 2})
            except httpx.TransportError:
                return  # the replica was killed under this request: nothing was accepted
            if r.status_code != 200:
                return
            conf = r.json()["confidence"]
            rid, other = conf["request_id"], "b" if name == "a" else "a"
            body = {"request_id": rid, "correct": grade(rid, conf["probability"], median)}
            for target in (other, name):  # the other replica first; if it is the killed one, the serving one
                try:
                    fb = await client.post(f"{replicas[target].url}/v1/feedback", headers=AUTH, json=body)
                except httpx.TransportError:
                    continue
                if fb.status_code == 404:  # served in the instant before a kill, its row never written: as told
                    fb = await client.post(f"{replicas[target].url}/v1/feedback", headers=AUTH,
                                           json={**body, "probability": conf["probability"], "kind": conf["kind"]})
                assert fb.status_code == 200, fb.text
                assert fb.json()["recalibration"]["label"] == "new"
                sent[rid] = body["correct"]
                return

        async def clients(names: list[str], per_client: int, offset: int, during=None) -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                work = [one(client, names[(c + j) % len(names)], offset + c * per_client + j)
                        for c in range(16) for j in range(per_client)]
                tasks = [asyncio.create_task(w) for w in work]
                if during is not None:
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(during)
                await asyncio.gather(*tasks)

        asyncio.run(clients(["a", "b"], 2, 0))
        os.kill(a.proc.pid, signal.SIGKILL)  # mid-run: clients in flight on both
        a.proc.wait()
        asyncio.run(clients(["a", "b"], 1, 100))  # a is down: its labels go to b
        a_again = Server(assets, replica="a", **common)
        replicas["a"] = a_again
        a_again.wait_ready()
        asyncio.run(clients(["a", "b"], 1, 200))
        assert len(sent) >= 48

        # every label sent is in the store exactly once, whoever received it
        store = Store(url, replica="check")
        try:
            assert store.size()["rows"]["vp_labels"] == len(sent)
            with store.engine.connect() as conn:
                stored = dict(conn.execute(labels_t.select().with_only_columns(labels_t.c.request_id,
                                                                               labels_t.c.correct)).all())
            assert stored == sent
            [origin] = origins(store)  # one fitted artifact served by both
            used = sum(store.label_counts(origin).values())
        finally:
            store.close()
        assert used >= len(sent) - 4  # abstained or routed answers do not refit the shadow; the rest do
        for server in (a_again, b):  # the restarted replica counts the store's labels (every replica's)
            deadline = time.time() + 5
            while metric_sum(httpx.get(f"{server.url}/metrics").text, "valueprobe_calibration_feedback") != used:
                assert time.time() < deadline, "the replica does not report the store's label count"
                time.sleep(0.2)

        # a promotion asked of both at once makes one version; both serve it
        async def promote_both():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(f"{s.url}/v1/admin/calibration/promote", headers=AUTH)
                                              for s in (a_again, b)))
        answers = asyncio.run(promote_both())
        assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
        loser = next(r for r in answers if r.status_code == 409)
        assert "another replica promoted" in loser.json()["error"]["message"]
        version = next(r for r in answers if r.status_code == 200).json()["calibration_version"]
        deadline = time.time() + 10
        while time.time() < deadline:
            served = {httpx.get(f"{s.url}/v1/artifact").json()["calibration_version"] for s in (a_again, b)}
            if served == {version}:
                break
            time.sleep(0.2)
        assert served == {version}
        store = Store(url, replica="check")
        try:
            with store.engine.connect() as conn:
                assert [r.version for r in conn.execute(promotions_t.select()).all()] == [version]
        finally:
            store.close()
    finally:
        for server in (replicas["a"], b, a):
            if server.proc.poll() is None:
                server.stop()


def test_a_store_that_goes_down_costs_no_answer_and_is_said(assets, pg_admin):
    """The store (PostgreSQL) stops mid-run: answers go on (200), /readyz and the metrics say the store is down and
    how many writes wait, a label is refused with 503 and Retry-After (not acknowledged, so not lost); when the
    store is back the waiting rows are written and the label goes through."""
    pg = PostgresServer()
    server = None
    try:
        url = new_database(pg.url)
        server = Server(assets, store=url, admin_token="t", store_sync_s=0.5).wait_ready()
        ask = lambda i: httpx.post(f"{server.url}/v1/completions", json={"prompt": f"River {i}?", "max_tokens": 2},
                                   timeout=60)
        assert all(ask(i).status_code == 200 for i in range(3))
        pg.stop()
        answered = [ask(i) for i in range(3, 9)]
        assert [r.status_code for r in answered] == [200] * 6
        deadline = time.time() + 20
        while (ready := httpx.get(f"{server.url}/readyz").json())["store"]["up"]:
            assert time.time() < deadline, ready
            time.sleep(0.3)
        assert ready["status"] == "ready" and ready["store"]["pending"] >= 1 and "password" not in json.dumps(ready)
        deadline = time.time() + 5
        while metric_sum(httpx.get(f"{server.url}/metrics").text, "valueprobe_store_up") != 0:
            assert time.time() < deadline
            time.sleep(0.2)
        rid = answered[-1].json()["confidence"]["request_id"]
        refused = httpx.post(f"{server.url}/v1/feedback", headers=AUTH, json={"request_id": rid, "correct": True},
                             timeout=60)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["type"] == "store_unavailable"
        pg.start()
        deadline = time.time() + 30
        while not (ready := httpx.get(f"{server.url}/readyz").json())["store"]["up"] or ready["store"]["pending"]:
            assert time.time() < deadline, ready
            time.sleep(0.3)
        ok = httpx.post(f"{server.url}/v1/feedback", headers=AUTH, json={"request_id": rid, "correct": True},
                        timeout=60)
        assert ok.status_code == 200, ok.text
        check = Store(url, replica="check")
        try:
            assert check.size()["rows"]["vp_requests"] == 9 and check.size()["rows"]["vp_labels"] == 1
        finally:
            check.close()
    finally:
        if server is not None:
            server.stop()
        pg.close()


def test_a_store_unreachable_at_start_stops_the_sidecar_with_the_reason(assets):
    """A store that cannot be opened at start stops the sidecar (exit 1, the reason printed, the password not)."""
    server = Server(assets, store="postgresql://vp:s3cret@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(RuntimeError, match="server exited with 1") as failure:
            server.wait_ready(timeout=120)
        message = str(failure.value)
        assert "cannot open the store postgresql://vp:***@127.0.0.1:1/nowhere" in message
        assert "s3cret" not in message
    finally:
        server.stop()
