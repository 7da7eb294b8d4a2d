"""The request and feedback store: what feedback and recalibration need, kept outside the process so that a restart
loses nothing and every replica learns from every label.

One small interface over SQLAlchemy Core, so the same code runs on an embedded SQLite file (the default,
``$VALUEPROBE_CACHE/feedback.sqlite``: nothing to set up; replicas on one host may share it) and on PostgreSQL
(``postgresql://...``: replicas on several hosts). Four tables:

- ``vp_requests``: each scored request once (id, time, fitted artifact, calibration version, kind, calibration slot,
  served probability, the fitted artifact's logit ``z0``, local or not, OOD flag, answer-level probability, replica;
  since schema 2 also the answer-level artifact's fitted artifact, slot and logit ``answer_z0`` beside the answer's
  probability, so a label refits the answer-level calibration too).
  Written by a background thread from a bounded queue, in batches: the response path never waits for the store.
  When the store is down the rows wait in the queue (retried); when the queue is full the newest are counted as
  lost (``valueprobe_store_write_failures_total``) and the sidecar keeps answering.
- ``vp_labels``: each label once, written before the feedback is acknowledged (an acknowledged label survives a
  ``kill -9``). A retry with the same label changes nothing; a conflicting one is kept in ``vp_label_conflicts``
  and reported, the first label stays the one used. A label carries what refits the prompt-level shadow
  (``origin``, ``slot``, ``z0``, ``used``) and, for a local answer whose answer-level probability was read, the
  answer-level artifact's (``answer_origin``, ``answer_slot``, ``answer_z0``, ``answer_used``).
- ``vp_promotions``: each promoted calibration (the new artifact's bytes, its evidence, who promoted), one row per
  (fitted artifact, version): two replicas promoting at once make one version, not two.
- ``vp_schema``: the schema version; :data:`MIGRATIONS` brings an older store up to date at start (under a lock,
  so replicas starting together migrate once). A migration that adds columns lists them in :data:`ADDED_COLUMNS`
  (version 1 creates the tables without any of them, so a new store and a migrated one are the same).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import (Boolean, Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text,
                        create_engine, delete, event, false, func, insert, select, text, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

__all__ = ["LabelWrite", "RequestRecord", "RequestUpdate", "Store", "StoreError", "default_store_url"]

logger = logging.getLogger("valueprobe.server.store")

SCHEMA_VERSION = 2

metadata = MetaData()

schema = Table("vp_schema", metadata, Column("version", Integer, primary_key=True), Column("applied_at", Float))

requests_t = Table(
    "vp_requests", metadata,
    Column("request_id", String(200), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("origin", String(64), nullable=False),  # the fitted artifact (calibration_origin)
    Column("artifact_id", String(64), nullable=False),
    Column("calibration_version", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("slot", String(32), nullable=False),
    Column("probability", Float, nullable=False),
    Column("z0", Float, nullable=False),
    Column("local", Boolean, nullable=False),
    Column("ood", Boolean, nullable=True),
    Column("answer_probability", Float, nullable=True),
    Column("replica", String(200), nullable=False),
    # schema 2: the answer-level artifact that read answer_probability (its fitted artifact), slot and fitted logit
    Column("answer_origin", String(64), nullable=True),
    Column("answer_slot", String(32), nullable=True),
    Column("answer_z0", Float, nullable=True),
    Index("vp_requests_origin_kind_time", "origin", "kind", "created_at"),
    Index("vp_requests_time", "created_at"),
)

labels_t = Table(
    "vp_labels", metadata,
    Column("request_id", String(200), primary_key=True),
    Column("correct", Boolean, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("replica", String(200), nullable=False),
    Column("origin", String(64), nullable=False),
    Column("probability", Float, nullable=False),
    Column("slot", String(32), nullable=True),  # null when the label cannot refit the shadow
    Column("z0", Float, nullable=True),
    Column("used", Boolean, nullable=False),  # refits the shadow calibration of its slot
    # schema 2: the same for the answer-level artifact (a local answer whose answer-level probability was read)
    Column("answer_origin", String(64), nullable=True),
    Column("answer_slot", String(32), nullable=True),
    Column("answer_z0", Float, nullable=True),
    Column("answer_used", Boolean, nullable=False, server_default=false()),
    Index("vp_labels_origin_slot_time", "origin", "slot", "received_at"),
    Index("vp_labels_answer_origin_slot_time", "answer_origin", "answer_slot", "received_at"),
)

conflicts_t = Table(
    "vp_label_conflicts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(200), nullable=False),
    Column("correct", Boolean, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("replica", String(200), nullable=False),
)

promotions_t = Table(
    "vp_promotions", metadata,
    Column("origin", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("artifact_id", String(64), nullable=False),
    Column("artifact", LargeBinary, nullable=False),
    Column("evidence", Text, nullable=False),
    Column("trigger", String(32), nullable=False),
    Column("replica", String(200), nullable=False),
    Column("promoted_at", Float, nullable=False),
)

#: version -> (table -> columns and indexes that version added); the tables above are the newest version
ADDED_COLUMNS: dict[int, dict[str, list[str]]] = {
    2: {"vp_requests": ["answer_origin", "answer_slot", "answer_z0"],
        "vp_labels": ["answer_origin", "answer_slot", "answer_z0", "answer_used"]},
}
ADDED_INDEXES: dict[int, list[str]] = {2: ["vp_labels_answer_origin_slot_time"]}


def _create_v1(conn) -> None:
    """The tables as schema version 1 made them: today's without what later versions added."""
    later = {(table, col) for added in ADDED_COLUMNS.values() for table, cols in added.items() for col in cols}
    later_indexes = {name for names in ADDED_INDEXES.values() for name in names}
    v1 = MetaData()
    for t in (requests_t, labels_t, conflicts_t, promotions_t):
        Table(t.name, v1, *[c._copy() for c in t.columns if (t.name, c.name) not in later],
              *[Index(i.name, *[c.name for c in i.columns]) for i in t.indexes if i.name not in later_indexes])
    v1.create_all(conn)


def _add_columns(version: int) -> Callable:
    """The migration to ``version``: ``ALTER TABLE ... ADD COLUMN`` for each column it added (as each dialect
    spells the column: SQLite and PostgreSQL both take it in a transaction), then its indexes."""
    def migrate(conn) -> None:
        ddl = conn.dialect.ddl_compiler(conn.dialect, None)
        tables = {t.name: t for t in metadata.tables.values()}
        for table, columns in ADDED_COLUMNS.get(version, {}).items():
            for name in columns:
                spec = ddl.get_column_specification(tables[table].c[name])
                conn.execute(text(f"ALTER TABLE {conn.dialect.identifier_preparer.format_table(tables[table])} "
                                  f"ADD COLUMN {spec}"))
        for name in ADDED_INDEXES.get(version, []):
            next(i for t in tables.values() for i in t.indexes if i.name == name).create(conn)
    return migrate


#: version -> what brings a store from the version before to it (run in one transaction, under the migration lock)
MIGRATIONS: dict[int, Callable] = {
    1: _create_v1,
    2: _add_columns(2),  # the answer-level artifact's slot and fitted logit beside its probability and labels
}


class StoreError(RuntimeError):
    """The store cannot be opened (bad URL, a newer schema than this code knows, unreachable at start)."""


def default_store_url() -> str:
    from valueprobe.plugin.models import cache_dir

    return f"sqlite:///{cache_dir() / 'feedback.sqlite'}"


@dataclass
class RequestRecord:
    """One scored request, as feedback on it needs it."""

    request_id: str
    created_at: float
    origin: str
    artifact_id: str
    calibration_version: int
    kind: str
    slot: str
    probability: float
    z0: float
    local: bool
    replica: str
    ood: bool | None = None
    answer_probability: float | None = None
    answer_origin: str | None = None  # the answer-level artifact's fitted artifact (calibration_origin)
    answer_slot: str | None = None
    answer_z0: float | None = None  # the logit its fitted artifact would have given the answer


@dataclass
class RequestUpdate:
    """A later fact about a scored request: its answer was not the local model's (escalated or replaced), or its
    answer-level probability once the answer exists (with the answer-level artifact's origin, slot and fitted logit
    behind it). Queued behind the request's own row, so it applies to it. ``None`` fields change nothing."""

    request_id: str
    local: bool | None = None
    answer_probability: float | None = None
    answer_origin: str | None = None
    answer_slot: str | None = None
    answer_z0: float | None = None


@dataclass
class LabelWrite:
    """What writing one label did: ``new`` (first label of the request), ``repeat`` (the same label again: nothing
    changed) or ``conflict`` (a different label: kept apart and reported; the first one stays)."""

    status: str
    used: bool  # the stored label refits the shadow (for a repeat or conflict: the first label's)
    answer_used: bool = False  # ... and the answer-level artifact's shadow


class Store:
    """The store behind one URL. Writes of scored requests go through :meth:`record_request` (never blocks);
    everything else is a plain synchronous call (the sidecar runs them in a worker thread)."""

    def __init__(self, url: str, *, replica: str, queue_size: int = 10_000, batch_size: int = 500,
                 flush_interval_s: float = 0.05, on_written: Callable[[str, int], None] | None = None,
                 on_lost: Callable[[int], None] | None = None):
        # "none": nothing kept beyond this process and no scored request written (labels need probability and
        # kind); the baseline `valueprobe bench store` compares with
        self.keep_requests = url != "none"
        url = "sqlite://" if url == "none" else url
        self.url, self.replica = url, replica
        self.engine = _engine(url)
        self.dialect = self.engine.dialect.name
        self._queue: queue.Queue[RequestRecord] = queue.Queue(maxsize=queue_size)
        self._batch_size, self._flush_interval = batch_size, flush_interval_s
        self._on_written = on_written or (lambda table, n: None)
        self._on_lost = on_lost or (lambda n: None)
        self.lost = 0  # scored requests that could not be queued (store down long enough to fill the queue)
        self.last_error: str | None = None
        self.up = True
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        try:
            self.migrate()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the store {redact(url)}: {exc.__class__.__name__}: {exc}") from None
        self._writer = threading.Thread(target=self._write_loop, name="valueprobe-store-writer", daemon=True)
        self._writer.start()

    @contextlib.contextmanager
    def _writing(self):
        """A write transaction (on SQLite it takes the write lock up front, so two replicas sharing the file
        wait for each other instead of failing on a lock upgrade)."""
        with self.engine.connect().execution_options(immediate=True) as conn, conn.begin():
            yield conn

    # -- schema ---------------------------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Bring the schema to :data:`SCHEMA_VERSION` (once, however many replicas start together). Refuses a store
        written by a newer version of this code."""
        with self._writing() as conn:
            if self.dialect == "postgresql":  # one migrator at a time; the lock ends with the transaction
                conn.execute(text("SELECT pg_advisory_xact_lock(7162534)"))
            schema.create(conn, checkfirst=True)
            current = conn.execute(select(func.max(schema.c.version))).scalar() or 0
            if current > SCHEMA_VERSION:
                raise StoreError(f"the store {redact(self.url)} has schema version {current}; this valueprobe knows "
                                 f"up to {SCHEMA_VERSION}: upgrade valueprobe")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[version](conn)
                conn.execute(insert(schema).values(version=version, applied_at=time.time()))
            return SCHEMA_VERSION

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(schema.c.version))).scalar() or 0)

    # -- scored requests (never blocks the caller) ----------------------------------------------------------------
    def record_request(self, record: RequestRecord | RequestUpdate) -> bool:
        """Queue one scored request (or a later fact about one) for the writer; ``False`` (and counted as lost) when
        the queue is full."""
        if not self.keep_requests:
            return True
        try:
            self._queue.put_nowait(record)
            self._idle.clear()
            return True
        except queue.Full:
            self.lost += 1
            self._on_lost(1)
            return False

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued request is written (or ``timeout``); ``True`` when none is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.is_set():
                return True
            time.sleep(0.01)
        return False

    def _write_loop(self) -> None:
        backoff = 0.2
        batch: list[RequestRecord] = []
        while not (self._stop.is_set() and self._queue.empty() and not batch):
            if not batch:
                try:
                    batch.append(self._queue.get(timeout=self._flush_interval))
                except queue.Empty:
                    self._idle.set()
                    continue
                while len(batch) < self._batch_size:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
            try:
                self._insert_requests(batch)
            except SQLAlchemyError as exc:  # the store is down: keep the batch, retry with backoff
                self._mark_down(exc)
                if self._stop.wait(backoff) and time.monotonic() > self._stop_deadline:
                    self._on_lost(len(batch))  # shutting down and still no store: these are lost, and said so
                    self.lost += len(batch)
                    batch = []
                backoff = min(backoff * 2, 5.0)
                continue
            self._on_written("requests", sum(isinstance(r, RequestRecord) for r in batch))
            self.up, self.last_error, backoff = True, None, 0.2
            batch = []
            if self._queue.empty():
                self._idle.set()

    def _insert_requests(self, batch: list[RequestRecord | RequestUpdate]) -> None:
        """One transaction: the batch's rows, then its updates in order (an update follows its row in the queue)."""
        rows = [asdict(r) for r in batch if isinstance(r, RequestRecord)]
        with self._writing() as conn:
            if rows:
                conn.execute(self._insert_ignoring_duplicates(requests_t, ["request_id"]), rows)
            for item in batch:
                if isinstance(item, RequestUpdate):
                    values = {k: v for k, v in asdict(item).items() if k != "request_id" and v is not None}
                    conn.execute(update(requests_t).where(requests_t.c.request_id == item.request_id).values(**values))

    def _insert_ignoring_duplicates(self, table: Table, keys: list[str]):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        return dialect_insert(table).on_conflict_do_nothing(index_elements=keys)

    def _mark_down(self, exc: Exception) -> None:
        if self.up:
            logger.warning("the store %s is not answering (%s); scored requests wait in the queue",
                           redact(self.url), exc.__class__.__name__)
        self.up, self.last_error = False, f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"

    # -- reads and label writes (synchronous) ---------------------------------------------------------------------
    def request(self, request_id: str) -> RequestRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(requests_t).where(requests_t.c.request_id == request_id)).mappings().first()
        return None if row is None else RequestRecord(**row)

    def add_label(self, *, request_id: str, correct: bool, origin: str, probability: float, slot: str | None,
                  z0: float | None, used: bool, answer_origin: str | None = None, answer_slot: str | None = None,
                  answer_z0: float | None = None, answer_used: bool = False) -> LabelWrite:
        """Write one label before it is acknowledged (see :class:`LabelWrite`); the ``answer_*`` fields say what it
        refits of the answer-level artifact's calibration (``answer_origin``'s slot ``answer_slot``)."""
        now = time.time()
        with self._writing() as conn:
            inserted = conn.execute(self._insert_ignoring_duplicates(labels_t, ["request_id"]).values(
                request_id=request_id, correct=bool(correct), received_at=now, replica=self.replica, origin=origin,
                probability=float(probability), slot=slot, z0=z0, used=bool(used), answer_origin=answer_origin,
                answer_slot=answer_slot, answer_z0=None if answer_z0 is None else float(answer_z0),
                answer_used=bool(answer_used)).returning(labels_t.c.request_id)).first()
            if inserted is not None:  # (RETURNING: a rowcount is not reliable for ON CONFLICT DO NOTHING on every driver)
                return LabelWrite("new", bool(used), bool(answer_used))
            first = conn.execute(select(labels_t.c.correct, labels_t.c.used, labels_t.c.answer_used)
                                 .where(labels_t.c.request_id == request_id)).first()
            if bool(first.correct) == bool(correct):
                return LabelWrite("repeat", bool(first.used), bool(first.answer_used))
            conn.execute(insert(conflicts_t).values(request_id=request_id, correct=bool(correct), received_at=now,
                                                    replica=self.replica))
            return LabelWrite("conflict", bool(first.used), bool(first.answer_used))

    @staticmethod
    def _side(answer: bool):
        """The label columns of the prompt-level artifact's shadow, or (``answer``) of the answer-level one's:
        ``(origin, slot, z0, used)``."""
        c = labels_t.c
        return (c.answer_origin, c.answer_slot, c.answer_z0, c.answer_used) if answer else (c.origin, c.slot, c.z0, c.used)

    def labelled(self, origin: str, window: int, *, answer: bool = False) -> dict[str, list[tuple[float, int]]]:
        """Per slot, the latest ``window`` labels that refit the shadow of ``origin`` (oldest first): ``(z0, y)``.
        ``answer``: ``origin`` is an answer-level artifact's, read from the labels' ``answer_*`` fields."""
        origin_c, slot_c, z0_c, used_c = self._side(answer)
        out: dict[str, list[tuple[float, int]]] = {}
        with self.engine.connect() as conn:
            slots = conn.execute(select(slot_c).distinct().where(origin_c == origin, used_c)).scalars().all()
            for slot in slots:
                rows = conn.execute(select(z0_c, labels_t.c.correct)
                                    .where(origin_c == origin, slot_c == slot, used_c)
                                    .order_by(labels_t.c.received_at.desc(), labels_t.c.request_id.desc())
                                    .limit(window)).all()
                out[slot] = [(float(z0), int(y)) for z0, y in reversed(rows)]
        return out

    def label_counts(self, origin: str, *, answer: bool = False) -> dict[str, int]:
        """Labels that refit the shadow of ``origin`` (an answer-level artifact's with ``answer``), per slot (all
        of them, not only the window)."""
        origin_c, slot_c, _, used_c = self._side(answer)
        with self.engine.connect() as conn:
            rows = conn.execute(select(slot_c, func.count()).where(origin_c == origin, used_c)
                                .group_by(slot_c)).all()
        return {slot: int(n) for slot, n in rows}

    def recent_labels(self, limit: int) -> list[tuple[float, int]]:
        """The latest ``limit`` labels of any origin (probability served, y), oldest first: the feedback window."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(labels_t.c.probability, labels_t.c.correct)
                                .order_by(labels_t.c.received_at.desc(), labels_t.c.request_id.desc())
                                .limit(limit)).all()
        return [(float(p), int(y)) for p, y in reversed(rows)]

    def recent_scores(self, origin: str, window: int) -> dict[str, list[tuple[float, bool | None, bool, float]]]:
        """Per kind, the latest ``window`` scored requests of ``origin`` (``z0``, OOD flag, local, probability
        served), oldest first: the drift window."""
        out: dict[str, list[tuple[float, bool | None, bool, float]]] = {}
        with self.engine.connect() as conn:
            kinds = conn.execute(select(requests_t.c.kind).distinct().where(requests_t.c.origin == origin)).scalars().all()
            for kind in kinds:
                rows = conn.execute(select(requests_t.c.z0, requests_t.c.ood, requests_t.c.local,
                                           requests_t.c.probability)
                                    .where(requests_t.c.origin == origin, requests_t.c.kind == kind)
                                    .order_by(requests_t.c.created_at.desc()).limit(window)).all()
                out[kind] = [(float(z0), ood, bool(local), float(p)) for z0, ood, local, p in reversed(rows)]
        return out

    def conflicts(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(conflicts_t)).scalar() or 0)

    # -- promotions -----------------------------------------------------------------------------------------------
    def record_promotion(self, *, origin: str, version: int, artifact_id: str, artifact: bytes, evidence: dict,
                         trigger: str) -> bool:
        """Record a promoted calibration; ``False`` when another replica already promoted that version."""
        try:
            with self._writing() as conn:
                conn.execute(insert(promotions_t).values(
                    origin=origin, version=int(version), artifact_id=artifact_id, artifact=artifact,
                    evidence=json.dumps(evidence, sort_keys=True), trigger=trigger, replica=self.replica,
                    promoted_at=time.time()))
            return True
        except IntegrityError:
            return False

    def latest_promotion(self, origin: str, newer_than: int = -1) -> dict | None:
        """The newest promoted calibration of ``origin`` above ``newer_than`` (with the artifact's bytes), or
        ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(select(promotions_t).where(promotions_t.c.origin == origin,
                                                          promotions_t.c.version > newer_than)
                               .order_by(promotions_t.c.version.desc()).limit(1)).mappings().first()
        return None if row is None else dict(row)

    def promotions(self, origin: str) -> list[dict]:
        """The promotion history of ``origin`` (without the bytes), oldest first."""
        cols = [c for c in promotions_t.c if c.name != "artifact"]
        with self.engine.connect() as conn:
            rows = conn.execute(select(*cols).where(promotions_t.c.origin == origin)
                                .order_by(promotions_t.c.version)).mappings().all()
        return [{**r, "evidence": json.loads(r["evidence"])} for r in rows]

    # -- upkeep ---------------------------------------------------------------------------------------------------
    def prune(self, *, max_age_days: float | None = None, max_rows: int | None = None) -> int:
        """Forget scored requests (and their labels) older than ``max_age_days`` or beyond the newest ``max_rows``;
        promotions are kept. Returns the requests deleted."""
        deleted = 0
        with self._writing() as conn:
            cutoff = None
            if max_age_days is not None:
                cutoff = time.time() - max_age_days * 86400
            if max_rows is not None:
                nth = conn.execute(select(requests_t.c.created_at).order_by(requests_t.c.created_at.desc())
                                   .offset(max_rows).limit(1)).scalar()
                if nth is not None:
                    cutoff = nth if cutoff is None else max(cutoff, nth)
            if cutoff is not None:
                old = select(requests_t.c.request_id).where(requests_t.c.created_at <= cutoff)
                conn.execute(delete(labels_t).where(labels_t.c.request_id.in_(old)))
                deleted = conn.execute(delete(requests_t).where(requests_t.c.created_at <= cutoff)).rowcount or 0
        return deleted

    def size(self) -> dict:
        """Rows per table and bytes on disk (the SQLite file; the PostgreSQL tables)."""
        with self.engine.connect() as conn:
            rows = {t.name: int(conn.execute(select(func.count()).select_from(t)).scalar() or 0)
                    for t in (requests_t, labels_t, conflicts_t, promotions_t)}
            if self.dialect == "postgresql":
                size = sum(int(conn.execute(text(f"SELECT pg_total_relation_size('{t.name}')")).scalar() or 0)
                           for t in (requests_t, labels_t, conflicts_t, promotions_t))
            else:
                path = self.engine.url.database
                size = sum(os.path.getsize(p) for p in (path, f"{path}-wal") if path and os.path.exists(p))
        return {"rows": rows, "bytes": size}

    def status(self) -> dict:
        """For ``/readyz``: whether writes go through, what waits and what was lost."""
        return {"url": redact(self.url), "up": self.up, "pending": self.pending, "lost": self.lost,
                "last_error": self.last_error, "schema_version": SCHEMA_VERSION}

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout`` when the store is down), then close."""
        self._stop_deadline = time.monotonic() + timeout
        self._stop.set()
        self._writer.join(timeout + 1)
        self.engine.dispose()

    _stop_deadline = float("inf")


def redact(url: str) -> str:
    """The URL without its password (it goes to logs and /readyz)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported as such, never echoed
        return "<unparsable store URL>"


def _engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]  # psycopg 3, not the default psycopg2
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:"):  # one in-memory database shared by the sidecar's threads
            engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            path = url.split("///", 1)[-1]
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL: readers do not block the writer and replicas on one host can share the file; NORMAL sync in WAL
            # survives a killed process (not a power cut); busy_timeout: wait for another replica's write lock.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            # switching to WAL needs the file to itself for a moment: SQLite answers "locked" at once (no busy wait)
            # while another replica opening the same file holds it, so it is tried again
            for attempt in range(200):
                try:
                    cur.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if attempt == 199:
                        raise
                    time.sleep(0.05)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
            dbapi_conn.isolation_level = None  # SQLAlchemy issues BEGIN itself (below)

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

        return engine
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4,
                             connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {})
    except Exception as exc:  # noqa: BLE001 - a bad URL or missing driver, named
        raise StoreError(f"cannot use the store URL {redact(url)}: {exc}") from None
