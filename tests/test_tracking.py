"""Tracking on a real SQLite MLflow store in a temporary folder: layout, hierarchy, logging, the UI.

MLflow's first use of a new SQLite file takes seconds (schema migrations), so most tests share one
store per module and keep apart by experiment name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from brats_lab import tracking
from brats_lab.config import ExperimentConfig, config_hash, flatten
from brats_lab.tracking import TrackingError

# MLflow's own SQLAlchemy models trigger a deprecation warning on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

# The smallest valid PNG (1x1, grey): the UI must serve images our runs log.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c63680000008200815fe2d5c20000000049454e44ae426082"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root whose mlruns/ store is shared by this module's tests."""
    path = tmp_path_factory.mktemp("project")
    tracking.client(path)  # create the store once
    return path


def _later() -> None:
    time.sleep(0.003)  # runs are ordered by start time in milliseconds


def test_default_store_is_sqlite_with_artifacts_beside_it(root):
    assert tracking.tracking_uri(root) == f"sqlite:///{root.resolve().as_posix()}/mlruns/mlflow.db"
    assert tracking.artifact_root(root) == root.resolve() / "mlruns" / "artifacts"
    run = tracking.start_run("layout", "r", "study", root=root)
    run.log_text("hello", "notes/hello.txt")
    assert (root / "mlruns" / "mlflow.db").is_file()
    logged = root / "mlruns" / "artifacts" / "layout" / run.id / "artifacts" / "notes" / "hello.txt"
    assert logged.read_text() == "hello"
    # No trace of MLflow's deprecated file store, not even for the Default experiment.
    assert not list((root / "mlruns").rglob("meta.yaml"))
    assert not (root / "mlruns" / "0").exists()
    default = tracking.client(root).get_experiment("0")
    assert Path(default.artifact_location) == root.resolve() / "mlruns" / "artifacts" / "0"


def test_tracking_uri_from_the_environment_wins(tmp_path, monkeypatch):
    other = tmp_path / "shared" / "other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other.as_posix()}")
    project = tmp_path / "project"
    assert tracking.tracking_uri(project) == f"sqlite:///{other.as_posix()}"
    run = tracking.start_run("env", "r", "study", root=project)
    assert run.artifact_dir() == tmp_path / "shared" / "artifacts" / "env" / run.id / "artifacts"
    assert other.is_file() and not (project / "mlruns").exists()
    # A tracking server places artifacts itself: no local folder is promised.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri(project) == "http://127.0.0.1:1" and tracking.artifact_root(project) is None


def test_arm_run_is_get_or_create_by_config_hash(root):
    cfg = ExperimentConfig()
    study = tracking.start_run("arms", "attention", "study", {"study": "attention"}, root=root)
    arm = tracking.arm_run("arms", config_hash(cfg), "equiunet", flatten(cfg), parent=study, root=root)
    again = tracking.arm_run("arms", config_hash(cfg), "equiunet", flatten(cfg), parent=study, root=root)
    assert again.id == arm.id
    assert arm.params == flatten(cfg)
    tags = arm.tags
    assert tags["kind"] == "arm" and tags["config_hash"] == config_hash(cfg)
    assert tags["mlflow.parentRunId"] == study.id and tags["mlflow.runName"] == "equiunet"
    other_cfg = ExperimentConfig(pipeline="B")
    other = tracking.arm_run("arms", config_hash(other_cfg), "b", flatten(other_cfg), parent=study, root=root)
    assert other.id != arm.id
    assert {r.id for r in tracking.find_runs("arms", {"kind": "arm"}, root=root)} == {arm.id, other.id}
    # The UI shows runs (not GenAI traces) for experiments of this kind.
    experiment = tracking.client(root).get_experiment_by_name("arms")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The same hash with another config is a bug, and says so.
    with pytest.raises(TrackingError, match="pipeline"):
        tracking.arm_run("arms", config_hash(cfg), "equiunet", flatten(other_cfg), parent=study, root=root)


def test_fold_runs_nest_under_the_arm_and_the_newest_is_found_by_status(root):
    arm = tracking.arm_run("folds", "abc123", "arm", {"model.name": "unet"}, root=root)
    failed = tracking.fold_run(arm, 0, "fold 0")
    failed.finish("FAILED")
    _later()
    finished = tracking.fold_run(arm, 0, "fold 0 (retry)")
    finished.finish("FINISHED")
    _later()
    running = tracking.fold_run(arm, 0, "fold 0 (again)")
    _later()
    tracking.fold_run(arm, 1, "fold 1")
    tags = running.tags
    assert tags["kind"] == "fold" and tags["fold"] == "0" and tags["config_hash"] == "abc123"
    assert running.parent_id == arm.id and running.experiment_id == arm.experiment_id

    def latest(fold, statuses=None):
        run = tracking.latest_fold_run("folds", "abc123", fold, statuses, root=root)
        return run and run.id

    assert latest(0) == running.id
    assert latest(0, ["FINISHED"]) == finished.id
    assert latest(0, ["FAILED", "KILLED"]) == failed.id
    assert latest(2) is None
    assert tracking.latest_fold_run("no such experiment", "abc123", 0, root=root) is None
    assert tracking.client(root).get_experiment_by_name("no such experiment") is None  # reading creates nothing


def test_log_metrics_is_one_step_with_every_key(root):
    run = tracking.start_run("metrics", "r", "fold", root=root)
    for epoch in range(3):
        run.log_metrics({"loss": 1.0 / (epoch + 1), "lr": 1e-4, "val_dice_ET": 0.1 * epoch}, step=epoch)
    assert run.metric_history("loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert [s for s, _ in run.metric_history("val_dice_ET")] == [0, 1, 2]
    assert run.metrics() == {"loss": pytest.approx(1 / 3), "lr": 1e-4, "val_dice_ET": pytest.approx(0.2)}
    # One batch per step: every key of a step carries the same timestamp.
    history = tracking.client(root).get_metric_history
    stamps = {k: [m.timestamp for m in sorted(history(run.id, k), key=lambda m: m.step)] for k in ("loss", "lr")}
    assert stamps["loss"] == stamps["lr"]


def test_log_params_accepts_the_same_value_again_and_rejects_a_change(root):
    run = tracking.start_run("params", "r", "arm", root=root)
    run.log_params({"optim.lr": 0.0001, "model.name": "unet"})
    run.log_params({"optim.lr": 0.0001, "model.name": "unet", "train.epochs": 3})  # a resume
    assert run.params == {"optim.lr": "0.0001", "model.name": "unet", "train.epochs": "3"}
    with pytest.raises(TrackingError, match=r"optim\.lr: logged '0.0001', now '0.001'") as e:
        run.log_params({"optim.lr": 0.001})
    assert run.id in str(e.value)
    many = {f"p{i}": i for i in range(250)}  # more than one batch of MLflow's 100
    long = {"long": "x" * 10_000}  # past MLflow's length limit: cut, and still re-loggable
    run.log_params({**many, **long})
    run.log_params(long)
    assert len(run.params) == 3 + 250 + 1
    assert len(run.params["long"]) <= 10_000 and run.params["long"].endswith("...")


def test_artifacts_written_to_the_artifact_dir_are_the_runs(root, tmp_path):
    run = tracking.start_run("artifacts", "r", "fold", root=root)
    folder = run.artifact_dir()
    assert folder is not None and folder.is_dir()
    assert folder.is_relative_to(root.resolve() / "mlruns" / "artifacts")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.pt").write_bytes(b"weights")
    assert "checkpoints" in run.list_artifacts()
    assert run.list_artifacts("checkpoints") == ["checkpoints/last.pt"]
    copy = run.download_artifact("checkpoints/last.pt", tmp_path / "dl")
    assert copy.read_bytes() == b"weights"

    run.log_dict({"b": 1, "a": [1, 2]}, "config.json")
    table = pd.DataFrame({"dice_WT": [0.9, 0.8]}, index=pd.Index(["c1", "c2"], name="case"))
    run.log_table(table, "metrics/per_case.csv")
    src = tmp_path / "overlay.png"
    src.write_bytes(PNG_1X1)
    run.log_artifact(src, "overlays")
    assert json.loads((folder / "config.json").read_text()) == {"a": [1, 2], "b": 1}
    assert pd.read_csv(folder / "metrics" / "per_case.csv", index_col="case").equals(table)
    assert (folder / "overlays" / "overlay.png").read_bytes() == PNG_1X1
    with pytest.raises(TrackingError, match="no such file"):
        run.log_artifact(tmp_path / "missing.png")


def test_finish_statuses_and_the_context_manager(root):
    for status in ("FINISHED", "FAILED", "KILLED"):
        run = tracking.start_run("status", status, "fold", root=root)
        assert run.status == "RUNNING"
        run.finish(status)
        assert run.status == status and run.info.end_time
    run.reopen()  # resuming a killed run
    assert run.status == "RUNNING"
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        run.finish("DONE")  # type: ignore[arg-type]
    with tracking.start_run("status", "ok", "fold", root=root) as ok:
        pass
    assert ok.status == "FINISHED"
    with pytest.raises(RuntimeError), tracking.start_run("status", "boom", "fold", root=root) as failed:
        raise RuntimeError("boom")
    assert failed.status == "FAILED"
    with pytest.raises(ValueError, match="kind must be one of study, arm, fold"):
        tracking.start_run("status", "bad", "trial", root=root)


def test_find_runs_and_read_runs(root):
    study = tracking.start_run("reading", "s", "study", {"study": "norm"}, root=root)
    _later()
    arm = tracking.start_run("reading", "a", "arm", {"config_hash": "h"}, parent=study, root=root)
    arm.log_metrics({"dice_WT": 0.5}, 0)
    arm.log_metrics({"dice_WT": 0.7}, 1)
    arm.finish()
    assert [r.id for r in tracking.find_runs("reading", {}, root=root)] == [arm.id, study.id]
    assert [r.id for r in tracking.find_runs("reading", {"study": "norm"}, root=root)] == [study.id]
    assert [r.id for r in tracking.find_runs("reading", {}, ["FINISHED"], root=root)] == [arm.id]
    assert tracking.find_runs("reading", {"study": "it's"}, root=root) == []  # quotes in values are fine
    df = tracking.read_runs("reading", root=root)
    assert list(df["run_id"]) == [arm.id, study.id]
    row = df.set_index("run_id").loc[arm.id]
    assert row["kind"] == "arm" and row["parent_run_id"] == study.id and row["status"] == "FINISHED"
    assert row["metrics.dice_WT"] == 0.7 and row["tags.config_hash"] == "h" and row["experiment"] == "reading"
    assert tracking.read_runs("nothing here", root=root).empty
    assert arm.id in set(tracking.read_runs(root=root)["run_id"])


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, brats_lab.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


RACE = """
import sys, time
from pathlib import Path
from brats_lab import tracking
import mlflow  # imported before the start line, so both processes race on the store itself
root, me = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{me}").touch()
while not (root / "go").exists():
    time.sleep(0.005)
print(tracking.get_or_create_experiment("race", root))
"""


def test_two_processes_creating_the_same_experiment_on_a_new_store_agree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(i)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    ids = [out.strip() for out, _ in results]
    assert ids[0] == ids[1] and ids[0]
    assert [e.name for e in tracking.client(tmp_path).search_experiments()].count("race") == 1


def _get(url: str, data: bytes | None = None) -> tuple[int, bytes, str]:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as r:
        return r.status, r.read(), r.headers.get("Content-Type", "")


def test_ui_serves_our_runs_and_their_artifacts(root, tmp_path, free_port):
    run = tracking.start_run("ui", "overlay run", "fold", root=root)
    src = tmp_path / "best_case.png"
    src.write_bytes(PNG_1X1)
    run.log_artifact(src, "overlays")
    run.log_table(pd.DataFrame({"case": ["c1"], "dice_WT": [0.9]}), "per_case.csv")
    run.finish()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # Its own session, so the finally below can reach every process it started, whatever happens.
    proc = subprocess.Popen(
        [sys.executable, "-m", "brats_lab.cli", "ui", "--port", str(port)], cwd=root, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, page, _ = _get(base + "/")
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "the UI did not answer within 60 s"
                time.sleep(0.25)
        assert status == 200 and b"MLflow" in page

        _, body, _ = _get(base + "/api/2.0/mlflow/experiments/search", json.dumps({"max_results": 100}).encode())
        experiments = {e["name"]: e["experiment_id"] for e in json.loads(body)["experiments"]}
        assert experiments["ui"] == run.experiment_id
        query = json.dumps({"experiment_ids": [run.experiment_id]}).encode()
        _, body, _ = _get(base + "/api/2.0/mlflow/runs/search", query)
        assert [r["info"]["run_id"] for r in json.loads(body)["runs"]] == [run.id]
        # What the UI's artifact browser calls for a run whose artifacts are local files.
        _, body, _ = _get(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={run.id}&path=overlays")
        assert [f["path"] for f in json.loads(body)["files"]] == ["overlays/best_case.png"]
        _, body, kind = _get(f"{base}/get-artifact?path=overlays/best_case.png&run_uuid={run.id}")
        assert body == PNG_1X1 and kind.startswith("image/png")
        _, body, _ = _get(f"{base}/get-artifact?path=per_case.csv&run_uuid={run.id}")
        assert body.decode().splitlines() == ["case,dice_WT", "c1,0.9"]

        proc.terminate()  # SIGTERM to `brats-lab ui` alone: it must stop the server it started
        out, _ = proc.communicate(timeout=30)
        assert f"http://127.0.0.1:{port}/" in out.splitlines()[0]
        with pytest.raises(OSError):
            _get(base + "/")
    finally:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
