"""Real servers on loopback for the tracking and study tests: per-test PostgreSQL databases and `mlflow server`.

Import the fixtures into a test module (``from pg import pg_url, ...  # noqa: F401``); nothing here is mocked.
PostgreSQL runs on 127.0.0.1:5432 (trust auth, user postgres); every database made here gets a unique name and is
dropped afterwards. ``MlflowServer`` starts ``mlflow server`` in its own process group (job execution off, one
worker) and can be stopped and started again on the same port and stores.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"

# straight to the server, whatever proxy the environment (or an earlier test) configured
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin(sql: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(sql))
    finally:
        engine.dispose()


@contextmanager
def pg_database(prefix: str = "mvab"):
    """A fresh, uniquely named PostgreSQL database; yields its URL and drops it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<port> with the given backend store; stop() and start() keep port and stores."""

    def __init__(self, backend_uri: str, workdir: Path, port: int | None = None) -> None:
        self.backend_uri = backend_uri
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 90.0) -> MlflowServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.workdir / f"server{self.starts}.log", "w")  # noqa: SIM115 - the server writes to it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.workdir / "artifacts"),
             "--workers", "1"],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.workdir / f'server{self.starts - 1}.log').read_text()}")
            try:
                with DIRECT.open(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        """Stop the server's whole process group (SIGTERM, then SIGKILL)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


@pytest.fixture
def pg_url():
    with pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_sqlite_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow_sqlite")
    server = MlflowServer(f"sqlite:///{d / 'mlflow.db'}", d).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_pg_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow_pg")
    with pg_database("mlflow") as url:
        server = MlflowServer(url, d).start()
        yield server
        server.stop()
