"""The MLflow UI on the project's store (`brats-lab ui`): the `mlflow ui` command line, a link
into its model-training view for every experiment, and the server run in the foreground.

It reads the store through `brats_lab.tracking` (where it is, what experiments it has) and starts
MLflow's own server as a subprocess (`python -m mlflow ui`), so it imports no mlflow itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from brats_lab.serve import run_foreground
from brats_lab.tracking import artifact_root, client, tracking_uri
from brats_lab.urls import safe_url


def ui_command(host: str = "127.0.0.1", port: int = 5000, root: Path | str | None = None) -> list[str]:
    """The `mlflow ui` command line for the project's store.

    Runs logged here keep local artifact URIs (`mlruns/artifacts/...`), which the server reads
    directly from disk for its UI (`get-artifact`, `artifacts/list`), so PNGs and CSVs show; the
    default artifact root only applies to experiments created from the UI itself.
    """
    uri = tracking_uri(root)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    artifacts = artifact_root(root)
    if artifacts is not None:
        cmd += ["--default-artifact-root", str(artifacts)]
    # One server process is plenty for one person browsing, and light on a 2-core machine.
    return cmd + ["--host", host, "--port", str(port), "--workers", "1"]


# MLflow 3.x opens an experiment on its GenAI pages (traces) unless told otherwise; this query
# opens the runs table of the "Model training" view, where brats-lab's runs are.
RUNS_VIEW = "runs?workflowType=machine_learning"


def ui_links(base_url: str, root: Path | str | None = None) -> list[tuple[str, str]]:
    """(experiment name, URL of its runs in the UI's model-training view) for every experiment of
    the store but MLflow's empty `Default`, by name: `<base_url>/#/experiments/<id>/runs?workflowType=machine_learning`."""
    experiments = client(root).search_experiments()
    base = base_url.rstrip("/")
    return sorted(
        (e.name, f"{base}/#/experiments/{e.experiment_id}/{RUNS_VIEW}") for e in experiments if e.name != "Default"
    )


def serve_ui(host: str = "127.0.0.1", port: int = 5000, root: Path | str | None = None) -> int:
    """Run the MLflow UI in the foreground until Ctrl-C (or SIGTERM); returns its exit status.

    With `MLFLOW_TRACKING_URI` pointing at a tracking server there is nothing to start: that
    server is the UI, and its address is printed.
    """
    uri = tracking_uri(root)
    if urlparse(uri).scheme in ("http", "https"):
        print(f"runs are on the tracking server {safe_url(uri)}; open it in a browser")
        _print_links(ui_links(uri, root))
        return 0
    cmd = ui_command(host, port, root)
    artifacts = artifact_root(root)
    if artifacts is not None:  # a SQLite store: its folder (mlruns/), for the database the server creates
        artifacts.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The server's job runner (GenAI evaluation jobs) starts ~8 worker processes we never use.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # MLflow's own use of a deprecated Starlette module warns on every start; nothing to act on.
    quiet = "ignore:starlette.middleware.wsgi is deprecated"
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), quiet]))
    print(f"MLflow UI on http://{host}:{port}/  (store: {safe_url(uri)}; Ctrl-C stops it)", flush=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is no address to open
    _print_links(ui_links(f"http://{shown}:{port}", root))
    return run_foreground(cmd, env)


def _print_links(links: list[tuple[str, str]]) -> None:
    if not links:
        print("no experiments yet: train or ablate first", flush=True)
        return
    print("the runs of each experiment (the model-training view):", flush=True)
    width = max(len(name) for name, _ in links)
    for name, url in links:
        print(f"  {name:<{width}}  {url}", flush=True)
