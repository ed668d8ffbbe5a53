"""The review dashboard's app (`dashboard/app.py`) and the `brats-lab dashboard` command, on a real
SQLite MLflow store (conftest's `review_store`); its data shaping is tests/test_review.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from brats_lab import review as db
from brats_lab import tracking

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


def test_app_pages_run_on_the_store(in_review_store):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert not at.exception, at.exception
    shown = at.dataframe[0].value
    assert {"attention", "norm", "pipeline A"} <= set(shown["name"])

    for page in ("Compare", "Cases"):
        for name in ("attention", "norm", "seeds", "pipeline A"):
            at.sidebar.radio[0].set_value(page)
            at.sidebar.selectbox[0].select(db.studies(tracking.read_runs()).set_index("name").loc[name, "run_id"])
            at.run()
            assert not at.exception, (page, name, at.exception)
    # The last page shown: the worst cases of the training; what it cannot draw is explained.
    assert at.dataframe[0].value["case"].iloc[0] == "BraTS20_Training_003"
    warnings = [w.value for w in at.warning]
    assert "the runs do not record their dataset folder, so no images are shown" in warnings
    assert any("logged no prediction of BraTS20_Training_003" in w for w in warnings)
    assert any("Nothing to draw for BraTS20_Training_003" in i.value for i in at.info)


def test_app_on_an_empty_project_says_so(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert not at.exception
    assert any("No runs yet" in i.value for i in at.info)
    assert not (tmp_path / "mlruns").exists()  # looking does not create a store


def test_dashboard_command_serves_the_app_on_localhost(in_review_store):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from brats_lab.cli import build_parser

    defaults = build_parser().parse_args(["dashboard"])
    assert (defaults.host, defaults.port) == ("127.0.0.1", 8501)  # this machine only, unless told otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "brats_lab.cli", "dashboard", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.monotonic() + 20, ""
        while time.monotonic() < deadline and not body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).read().decode()
            except OSError:
                time.sleep(0.2)
        assert body == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert f"http://127.0.0.1:{port}/" in out
    assert os.path.isfile(in_review_store / "mlruns" / "mlflow.db")


def test_a_password_in_the_tracking_uri_is_never_shown(tmp_path, monkeypatch, free_port):
    # A database URI (which MLflow accepts) with a password: the page, `ui` and `dashboard` mask it.
    import subprocess
    import sys
    import uuid

    import psycopg
    from streamlit.testing.v1 import AppTest

    # The project's PostgreSQL (trust auth: the password is accepted and ignored), in a database of its own.
    database = f"brats_lab_masked_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://127.0.0.1:5432/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    uri = f"postgresql://root:s3cret@127.0.0.1:5432/{database}"
    masked = f"postgresql://root:***@127.0.0.1:5432/{database}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    try:
        at = AppTest.from_file(str(APP), default_timeout=120).run()
        assert not at.exception
        shown = [e.value for e in at.sidebar.caption] + [e.value for e in at.error] + [e.value for e in at.info]
        assert any(masked in text for text in shown), shown
        assert not any("s3cret" in text for text in shown), shown
        # `brats-lab ui` prints the store before it starts the server: read that line, then stop it.

        # A real port: 0 is refused up front, as the address printed would not be the server's.
        proc = subprocess.Popen([sys.executable, "-m", "brats_lab.cli", "ui", "--port", str(free_port())], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            first = proc.stdout.readline()
        finally:
            proc.kill()
            rest = proc.communicate(timeout=30)[0]
        assert masked in first and "s3cret" not in first + rest, first
    finally:
        with psycopg.connect("postgresql://127.0.0.1:5432/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
