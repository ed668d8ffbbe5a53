"""Fixtures of the tests that run one study across processes and machines (test_scale_out.py,
test_slurm.py): the project's PostgreSQL and fresh databases in it, an MLflow tracking server
backed by one, and waiting for and stopping the servers they start.

PostgreSQL must answer at 127.0.0.1:5432 as user root without a password (trust), as it does on
the CI machines; each test creates fresh databases and drops them afterwards, whatever happens.
Set BRATS_LAB_SKIP_POSTGRES=1 to skip these tests on a machine without PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Postgres:
    """Where the project's PostgreSQL answers, and a password for URLs: trust auth accepts any,
    so URLs carrying it work for real (and a test can look for it where it must not be)."""

    address: str = "127.0.0.1:5432"
    password: str = "s3cret-pw"


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    return Postgres()


@pytest.fixture
def databases(postgres: Postgres):
    """A function that creates a fresh, uniquely named PostgreSQL database and returns its name;
    every database made is dropped at the end, even if the test failed."""
    if os.environ.get("BRATS_LAB_SKIP_POSTGRES") == "1":
        pytest.skip("BRATS_LAB_SKIP_POSTGRES=1")
    import psycopg

    try:
        admin = psycopg.connect(f"postgresql://root@{postgres.address}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL does not answer at {postgres.address} as user root ({e}); start it, or set BRATS_LAB_SKIP_POSTGRES=1")
    made: list[str] = []

    def create() -> str:
        name = f"brats_lab_test_{uuid.uuid4().hex[:12]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return name

    try:
        yield create
    finally:
        for name in made:  # FORCE: connections a killed worker or this process left open
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{url} did not answer within {seconds:.0f} s: {log.read_text()[-3000:]}"
        time.sleep(0.25)


def _stop(proc: subprocess.Popen) -> None:
    """End a process started in its own session, and everything it started."""
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=15)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="session")
def wait_for_url():
    """The function `wait_for_url(url, proc, log, seconds=120)`: until `url` answers 200; fails
    with the end of `log` if the server `proc` exits or the time runs out."""
    return _wait_for


@pytest.fixture(scope="session")
def stop_process():
    """The function `stop_process(proc)`: SIGTERM, then SIGKILL, to a process started in its own
    session and everything it started."""
    return _stop


@pytest.fixture
def mlflow_server(databases, postgres: Postgres, tmp_path: Path, free_port):
    """An MLflow tracking server on 127.0.0.1, its metadata in a fresh PostgreSQL database (the
    URL carrying a password), artifacts served from a local folder. Yields its http:// URL."""
    port = free_port()
    log = tmp_path / "logs" / "mlflow-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    backend = f"postgresql+psycopg://root:{postgres.password}@{postgres.address}/{databases()}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
             "--artifacts-destination", str(tmp_path / "artifact-store"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(url + "/health", proc, log)
        yield url
    finally:
        _stop(proc)
