"""A throwaway PostgreSQL server for the store's tests and ``valueprobe bench store``: Debian's ``postgresql``
package (the server teams run in production; installed by ``scripts/install-postgres.sh``, which ``.ci/run``
calls), a fresh cluster in a temporary folder, listening on loopback only, stopped at the end. Run as the ``postgres`` user when the tests run as root
(the server refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager


def postgres_bindir() -> str | None:
    """The folder with ``initdb`` and ``postgres`` (Debian keeps them out of PATH), or ``None``."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A new cluster in a temporary folder (trust auth, loopback only); :meth:`stop` and :meth:`start` take the
    server down and bring it back on the same data and port (a store that goes away and returns)."""

    def __init__(self):
        self.bindir = postgres_bindir()
        if self.bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries not found: run scripts/install-postgres.sh")
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.root = tempfile.mkdtemp(prefix="valueprobe-pg-")
        self.data = os.path.join(self.root, "data")
        if self.run_as:
            shutil.chown(self.root, "postgres")
        self.port = _free_port()
        self.url = f"postgresql://vp@127.0.0.1:{self.port}/postgres"
        subprocess.run([*self.run_as, f"{self.bindir}/initdb", "-D", self.data, "-U", "vp", "-A", "trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
        self.proc = None
        self.start()

    def start(self) -> None:
        self.log = open(os.path.join(self.root, "server.log"), "ab")
        self.proc = subprocess.Popen([*self.run_as, f"{self.bindir}/postgres", "-D", self.data, "-p", str(self.port),
                                      "-k", self.root, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                      "-c", "max_connections=200"], stdout=self.log, stderr=subprocess.STDOUT)
        _wait_ready(self.url, self.proc, self.root)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # fast shutdown (open connections are cut), by pg_ctl: runuser does not pass signals on to the server
            subprocess.run([*self.run_as, f"{self.bindir}/pg_ctl", "stop", "-D", self.data, "-m", "fast", "-w"],
                           capture_output=True, timeout=60)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_server():
    """Yield an admin URL ``postgresql://vp@127.0.0.1:PORT/postgres`` of a new cluster."""
    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.close()


def _wait_ready(url: str, proc: subprocess.Popen, root: str, timeout: float = 60.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("postgres exited: " + open(os.path.join(root, "server.log")).read()[-2000:])
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            time.sleep(0.2)
    raise TimeoutError("postgres did not accept connections in time")


def new_database(admin_url: str) -> str:
    """A fresh database on the server of ``admin_url``; its URL."""
    import psycopg

    name = f"vp_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin_url.rsplit("/", 1)[0] + f"/{name}"
