"""The dashboard on a real SQLite MLflow store in a temporary folder: an ablation of two arms x two
folds and a plain training, made with `tracking` as the trainer and the ablation make them (no
training: small per-case tables are logged directly)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from brats_lab import review as db
from brats_lab import run_files, tracking

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


def _per_case(offset: float, fold: int) -> pd.DataFrame:
    cases = [f"BraTS20_Training_{fold * 3 + i:03d}" for i in range(1, 4)]
    return pd.DataFrame({
        "case": cases,
        **{f"dice_{r}": [0.9 - offset - 0.3 * i - 0.01 * k for i in range(3)] for k, r in enumerate(("ET", "TC", "WT"))},
        **{f"hd95_{r}": [2.0 + 5 * i for i in range(3)] for r in ("ET", "TC", "WT")},
    })


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root whose mlruns/ holds one finished ablation, one half-done and one training."""
    root = tmp_path_factory.mktemp("project")
    study = tracking.start_run("ablation-attention", "attention", "study", {"study": "attention-abc"}, root=root)
    study.log_params({"arms": "baseline,attention", "folds": "2", "baseline": "baseline"})
    for arm_name, chash, offset in (("baseline", "h0", 0.0), ("attention", "h1", 0.05)):
        arm = tracking.arm_run("ablation-attention", chash, arm_name, {"model": arm_name}, parent=study)
        for fold in range(2):
            with tracking.fold_run(arm, fold, f"{arm_name} fold {fold}") as run:
                run.log_table(_per_case(offset, fold), run_files.PER_CASE)
        arm.finish()
    study.log_table(pd.DataFrame({  # as compare_arms writes it
        "arm": ["attention"], "metric": ["dice_ET"], "n": [6], "mean_baseline": [0.6], "mean_arm": [0.55],
        "mean_diff": [-0.05], "ci_low": [-0.06], "ci_high": [-0.04], "p_value": [0.03], "p_holm": [0.03],
        "verdict": ["worse (p=0.03)"]}),
                    run_files.COMPARISON)
    study.finish()

    # A second study still going: one fold finished, one running.
    half = tracking.start_run("ablation-norm", "norm", "study", {"study": "norm-def"}, root=root)
    half.log_params({"arms": "baseline,instance", "folds": "1"})
    arm = tracking.arm_run("ablation-norm", "n0", "baseline", {}, parent=half)
    with tracking.fold_run(arm, 0, "baseline fold 0") as run:
        run.log_table(_per_case(0.1, 0), run_files.PER_CASE)
    arm2 = tracking.arm_run("ablation-norm", "n1", "instance", {}, parent=half)
    tracking.fold_run(arm2, 0, "instance fold 0")  # left RUNNING, no metrics

    # An A/A study with seeds, as the ablation makes it: one arm run per (arm, seed), tagged.
    from brats_lab.evaluation.stats import compare_runs

    aa = tracking.start_run("ablation-seeds", "seeds", "study", {"study": "seeds-xyz"}, root=root)
    aa.log_params({"arms": "equiunet,reseeded", "folds": "2", "seeds": "2", "baseline": "equiunet"})
    frames = []
    for k, arm_name in enumerate(("equiunet", "reseeded")):
        for seed in range(2):
            arm = tracking.arm_run("ablation-seeds", f"s{k}{seed}", arm_name if seed == 0 else f"{arm_name} seed {seed}",
                                   {}, parent=aa)
            arm.set_tags({"arm": arm_name, "seed": seed})
            for fold in range(2):
                table = _per_case(0.01 * seed + 0.004 * k * fold, fold)
                with tracking.fold_run(arm, fold, f"{arm_name} seed {seed} fold {fold}") as run:
                    run.log_table(table, run_files.PER_CASE)
                frames.append(table.assign(arm=arm_name, fold=fold, seed=seed))
            arm.finish()
    aa.log_table(compare_runs(pd.concat(frames), "equiunet", ["dice_ET", "dice_TC", "dice_WT"]), run_files.COMPARISON)
    aa.finish()

    training = tracking.arm_run("brats-lab", "t0", "pipeline A", {"pipeline": "A"}, root=root)
    with tracking.fold_run(training, 0, "pipeline A fold 0") as run:
        run.log_table(_per_case(0.2, 0), run_files.PER_CASE)
    training.finish()
    return root


@pytest.fixture
def in_store(store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run with the store's project root as the current folder, as `brats-lab dashboard` does."""
    monkeypatch.chdir(store)
    return store


def _study_id(runs: pd.DataFrame, name: str) -> str:
    return db.studies(runs).set_index("name").loc[name, "run_id"]


def test_studies_lists_ablations_and_trainings_with_progress(in_store):
    runs = tracking.read_runs()
    table = db.studies(runs).set_index("name")
    assert set(table.index) == {"attention", "norm", "seeds", "pipeline A"}
    assert (table.loc["seeds", "folds_done"], table.loc["seeds", "folds_planned"]) == (8, 8)  # 2 arms x 2 folds x 2 seeds
    assert table.loc["attention", "type"] == "ablation"
    assert table.loc["attention", "state"] == "FINISHED"
    assert (table.loc["attention", "folds_done"], table.loc["attention", "folds_planned"]) == (4, 4)
    assert (table.loc["norm", "folds_done"], table.loc["norm", "folds_planned"]) == (1, 2)
    assert table.loc["norm", "state"] == "RUNNING"
    assert table.loc["pipeline A", "type"] == "training"
    assert table.loc["pipeline A", "folds_done"] == 1
    assert (table["wall_time"] >= pd.Timedelta(0)).all()


def test_studies_of_an_empty_store_is_empty():
    empty = pd.DataFrame(columns=["run_id", "experiment_id", "experiment", "name", "kind", "parent_run_id", "status",
                                  "start_time", "end_time", "artifact_uri"])
    assert db.studies(empty).empty


def test_fold_runs_and_per_case_of_a_study(in_store):
    runs = tracking.read_runs()
    cells = db.fold_runs(runs, _study_id(runs, "attention"))
    assert list(zip(cells["arm"], cells["fold"])) == [("attention", 0), ("attention", 1), ("baseline", 0), ("baseline", 1)]
    assert (cells["status"] == "FINISHED").all()
    per_case, notes = db.load_per_case(cells)
    assert notes == []
    assert len(per_case) == 12 and {"arm", "fold", "run_id", "case", "dice_ET"} <= set(per_case.columns)

    half = db.fold_runs(runs, _study_id(runs, "norm"))
    per_case, notes = db.load_per_case(half)
    assert len(per_case) == 3
    assert notes == ["instance fold 0: running, no metrics yet"]


def test_fold_table_metric_long_and_worst_cases():
    per_case = pd.concat([_per_case(off, f).assign(arm=arm, fold=f, run_id=f"r{arm}{f}")
                          for arm, off in (("a", 0.0), ("b", 0.1)) for f in range(2)], ignore_index=True)
    table = db.fold_table(per_case)
    assert list(table.columns) == ["ET", "TC", "WT", "folds", "seeds"]
    assert table.loc["a", "ET"] == "0.600 (0.000)"  # fold means 0.9, 0.6, 0.3 -> 0.6 each fold
    assert table.loc["b", "folds"] == 2

    long = db.metric_long(per_case)
    assert len(long) == 3 * len(per_case) and set(long["region"]) == {"ET", "TC", "WT"}
    hd95 = db.metric_long(per_case, "hd95")
    assert hd95["value"].max() == 12.0 and set(hd95["region"]) == {"ET", "TC", "WT"}

    worst = db.worst_cases(per_case, "b", "ET", n=2)
    assert worst["dice_ET"].tolist() == sorted(worst["dice_ET"].tolist())
    assert worst["dice_ET"].iloc[0] == pytest.approx(0.9 - 0.1 - 0.6)
    assert {"fold", "case", "run_id", "hd95_WT"} <= set(worst.columns)
    by_hd95 = db.worst_cases(per_case, "b", "WT", n=3, by="hd95")
    assert by_hd95["hd95_WT"].tolist() == [12.0, 12.0, 7.0]  # the largest distances first


def test_a_study_with_seeds_shows_each_seed_as_its_own_run(in_store):
    runs = tracking.read_runs()
    cells = db.fold_runs(runs, _study_id(runs, "seeds"))
    assert list(zip(cells["arm"], cells["seed"], cells["fold"])) == [
        (arm, seed, fold) for arm in ("equiunet", "reseeded") for seed in (0, 1) for fold in (0, 1)]
    fold_seed = {r.id: r.tags["seed"] for r in tracking.find_runs("ablation-seeds", {"kind": "fold"})}
    assert [fold_seed[r] for r in cells["run_id"]] == [str(s) for s in cells["seed"]]  # the fold run's own tag agrees
    per_case, notes = db.load_per_case(cells)
    assert notes == [] and len(per_case) == 24 and set(per_case["seed"]) == {0, 1}
    table = db.fold_table(per_case)
    assert table.loc["equiunet", "folds"] == 2 and table.loc["equiunet", "seeds"] == 2
    marks = db.run_table(per_case)
    assert len(marks) == 2 * 2 * 2 * 3  # one mark per run and region: the seeds are not averaged away
    # equiunet, ET: runs (fold, seed) have means 0.6 and 0.59 (seed 1 is 0.01 lower) in both folds.
    equi = marks[(marks["arm"] == "equiunet") & (marks["region"] == "ET")].sort_values(["fold", "seed"])
    assert [round(v, 10) for v in equi["value"]] == [0.6, 0.59, 0.6, 0.59]
    comparison = db.read_artifact_table(_study_id(runs, "seeds"), run_files.COMPARISON)
    assert {"noise_floor", "mde", "folds", "seeds"} <= set(comparison.columns)
    assert (comparison["verdict"] == "no evidence of a difference").all()


def test_comparison_table(in_store):
    runs = tracking.read_runs()
    comparison = db.read_artifact_table(_study_id(runs, "attention"), run_files.COMPARISON)
    assert comparison is not None and comparison["arm"].tolist() == ["attention"]
    assert db.read_artifact_table(_study_id(runs, "norm"), run_files.COMPARISON) is None
    rows = db.comparison_rows(comparison, "dice")
    assert rows[["region", "label"]].values.tolist() == [["ET", "attention ET"]]
    assert db.comparison_rows(comparison, "hd95").empty


def test_app_pages_run_on_the_store(in_store):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert not at.exception, at.exception
    shown = at.dataframe[0].value
    assert {"attention", "norm", "pipeline A"} <= set(shown["name"])

    for page in ("Compare", "Cases"):
        for name in ("attention", "norm", "seeds", "pipeline A"):
            at.sidebar.radio[0].set_value(page)
            at.sidebar.selectbox[0].select(_study_id(tracking.read_runs(), name))
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


def test_dashboard_command_serves_the_app_on_localhost(in_store):
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
    assert os.path.isfile(in_store / "mlruns" / "mlflow.db")


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
