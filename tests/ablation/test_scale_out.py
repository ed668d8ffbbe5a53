"""Several machines sharing one study, for real: PostgreSQL for Optuna, an MLflow tracking server
backed by PostgreSQL (started here, on loopback), a launcher and separate worker processes, each in
its own folder as if on its own machine, two of them killed with SIGKILL half-way through a fold
and one restarted. Also: a database password appears nowhere, and the MLflow UI binds loopback.

PostgreSQL must answer at 127.0.0.1:5432 as user root without a password (trust), as it does on
the CI machines; each test creates fresh databases and drops them afterwards, whatever happens.
Set BRATS_LAB_SKIP_POSTGRES=1 to skip these tests on a machine without PostgreSQL.
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
from collections import Counter
from pathlib import Path

import optuna
import pytest

from brats_lab import tracking
from brats_lab.ablation import study as study_module
from brats_lab.ablation.study import launch, make_plan, run_study

EPOCHS = 6


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def test_a_launcher_and_workers_on_several_machines_finish_the_grid_once_despite_killed_workers(
    databases, mlflow_server, postgres, stop_process, phantom_copy, tiny_ablation, tmp_path, monkeypatch
):
    data = phantom_copy
    toml = tmp_path / "tiny.toml"
    toml.write_text(tiny_ablation("tiny-scale-out", f"train.epochs={EPOCHS}", "train.amp=off", seeds=2))
    optuna_db = databases()
    storage = f"postgresql://root:{postgres.password}@{postgres.address}/{optuna_db}"  # plain postgresql://, as users write it
    psycopg_url = f"postgresql+psycopg://root@{postgres.address}/{optuna_db}"  # the test's own reads
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    launcher = tmp_path / "launcher"
    launcher.mkdir()
    monkeypatch.chdir(launcher)

    # The launcher creates the study, its MLflow runs and the 2 arms x 2 folds x 2 seeds waiting trials.
    plan = make_plan(str(toml), "cpu", None, str(data), storage)
    launch(plan)
    cells = sorted(plan.cells())
    assert len(cells) == 8

    # Three workers, each in its own folder (its "machine": checkpoints stay there with a remote
    # artifact store). Their grace period is long, as it is by default (90 s): they do not take
    # over the trials of the workers killed below, so the restarted worker does, deterministically.
    logs = tmp_path / "logs"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "OMP_NUM_THREADS": "1",
           "BRATS_LAB_HEARTBEAT_SECONDS": "1", "BRATS_LAB_GRACE_SECONDS": "600"}
    procs: list[subprocess.Popen] = []

    def worker(machine: str, grace: int = 600) -> subprocess.Popen:
        folder = tmp_path / machine
        folder.mkdir(exist_ok=True)
        n = len(procs)
        with (logs / f"worker{n}.out").open("w") as out, (logs / f"worker{n}.err").open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "brats_lab.cli", "worker", "--study", plan.study_name, "--storage", storage, "--quiet"],
                cwd=folder, env={**env, "BRATS_LAB_GRACE_SECONDS": str(grace)}, stdout=out, stderr=err, start_new_session=True,
            )  # fmt: skip
        procs.append(proc)
        return proc

    try:
        a, b, c = worker("machine-a"), worker("machine-b"), worker("machine-c")

        # SIGKILL a and b each right after the first checkpoint of their first fold: mid-fold,
        # no clean-up, their trials and fold runs left RUNNING.
        killed: dict[str, subprocess.Popen] = {}
        deadline = time.monotonic() + 300
        while len(killed) < 2:
            for machine, proc in (("machine-a", a), ("machine-b", b)):
                if machine not in killed and list((tmp_path / machine / "mlruns" / "checkpoints").glob("*/checkpoints/last.pt")):
                    proc.send_signal(signal.SIGKILL)
                    killed[machine] = proc
            for n, (machine, proc) in enumerate((("machine-a", a), ("machine-b", b))):
                assert machine in killed or proc.poll() is None, _read(logs / f"worker{n}.err")[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        a.wait(), b.wait()
        killed_at = time.monotonic()
        assert (a.returncode, b.returncode) == (-signal.SIGKILL, -signal.SIGKILL)
        dead = {r.tags["pid"]: r for r in tracking.find_runs(plan.experiment, {"kind": "fold"}, statuses=("RUNNING",))}
        run_a, run_b = dead.get(str(a.pid)), dead.get(str(b.pid))
        assert run_a is not None and run_b is not None, "a killed worker's fold was not left RUNNING (finished before the kill?)"

        # The third worker finishes everything else and leaves the dead workers' trials alone.
        assert c.wait(timeout=600) == 0, _read(logs / "worker2.err")[-3000:]
        assert _read(logs / "worker2.out").splitlines() == [f"worker: ran 6 trials of {plan.study_name}; none left"]

        # The operator restarts the worker on machine a, after the grace period: it fails both
        # stale trials, enqueues them again and takes them. Its own fold resumes from the
        # checkpoint on this machine; b's checkpoint is on machine b, so b's fold starts afresh.
        time.sleep(max(0.0, killed_at + 4 - time.monotonic()))
        again = worker("machine-a", grace=3)

        # Once it holds the last trial, the launcher runs the study: nothing is left for it to
        # take, so it waits for that trial to finish, then reports.
        study = optuna.load_study(study_name=plan.study_name, storage=psycopg_url)
        deadline = time.monotonic() + 600
        while Counter(t.state.name for t in study.get_trials(deepcopy=False)) != {"FAIL": 2, "COMPLETE": 7, "RUNNING": 1}:
            assert again.poll() is None, _read(logs / "worker3.err")[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        monkeypatch.setattr(study_module, "HEARTBEAT_SECONDS", 1)
        result = run_study(plan, progress=False)
        assert again.wait(timeout=60) == 0, _read(logs / "worker3.err")[-3000:]
        assert _read(logs / "worker3.out").splitlines() == [f"worker: ran 2 trials of {plan.study_name}; none left"]

        # The launcher once more, as `brats-lab ablate`: nothing left to train; it reports again.
        with (logs / "ablate.out").open("w") as out, (logs / "ablate.err").open("w") as err:
            final = subprocess.run([sys.executable, "-m", "brats_lab.cli", "ablate", str(toml), "--profile", "cpu",
                                    "--data", str(data), "--storage", storage], cwd=launcher, env=env, stdout=out,
                                   stderr=err, timeout=600)  # fmt: skip
        assert final.returncode == 0, _read(logs / "ablate.err")[-3000:]
        assert "att_equiunet" in _read(logs / "ablate.out") and "runs as the unit" in _read(logs / "ablate.out")
    finally:
        for proc in procs:
            stop_process(proc)

    # Every (arm, fold, seed) has exactly one FINISHED fold run; nothing is left RUNNING.
    arm_of = {r.tags["config_hash"]: r.tags["arm"] for r in tracking.find_runs(plan.experiment, {"kind": "arm"})}
    assert sorted(arm_of.values()) == ["att_equiunet", "att_equiunet", "equiunet", "equiunet"]  # one arm run per seed
    folds = tracking.find_runs(plan.experiment, {"kind": "fold"})
    finished = sorted((arm_of[r.tags["config_hash"]], int(r.tags["fold"]), int(r.tags["seed"])) for r in folds if r.status == "FINISHED")
    assert finished == cells  # none missing, none twice
    everything = tracking.read_runs(plan.experiment)
    assert "RUNNING" not in set(everything["status"]), everything[["name", "kind", "status"]]
    assert {r.id: r.status for r in folds if r.status != "FINISHED"} == {run_b.id: "FAILED"}

    # a's fold: the same run, resumed by the restarted worker from its checkpoint (epoch 0 is
    # logged once: it was not trained from scratch), finished.
    assert tracking.get_run(run_a.id).status == "FINISHED"
    assert run_a.tags["pid"] == str(again.pid)
    steps = [s for s, _ in run_a.metric_history("train_loss")]
    assert sorted(set(steps)) == list(range(EPOCHS)) and steps.count(0) == 1, steps
    # b's fold: its dead run closed as FAILED with the reason; a new run trained it on machine a.
    assert str(tmp_path / "machine-a") in run_b.tags["abandoned"]
    cell_b = (run_b.tags["config_hash"], run_b.tags["fold"])
    (new_b,) = [r for r in folds if (r.tags["config_hash"], r.tags["fold"]) == cell_b and r.status == "FINISHED"]
    assert new_b.tags["pid"] == str(again.pid)
    assert sorted(s for s, _ in new_b.metric_history("train_loss")) == list(range(EPOCHS))

    # Optuna: every cell completed once; the two dead trials failed, then retried.
    complete = sorted((t.user_attrs["arm"], t.user_attrs["fold"], t.user_attrs["seed"]) for t in study.trials if t.state.name == "COMPLETE")
    assert complete == cells
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 8 + ["FAIL"] * 2

    # The report has every case out of fold once per arm and seed.
    assert result.per_case.groupby("arm")["case"].agg(["count", "nunique"]).values.tolist() == [[8, 4], [8, 4]]
    assert list(result.table.index) == ["equiunet", "att_equiunet"]

    # The password is nowhere: not in any run's params or tags, the study's attributes, any
    # process's output (the MLflow server's included), or any file written.
    (study_run,) = tracking.find_runs(plan.experiment, {"kind": "study"})
    assert study_run.tags["storage"] == f"postgresql://root:***@{postgres.address}/{optuna_db}"
    runs = tracking.read_runs()
    assert len(runs) == 14  # what the scan below reads: the study, 2 arms x 2 seeds, 9 fold runs (b's twice)
    texts = [str(v) for v in runs.filter(regex=r"^(params|tags)\.").to_numpy().ravel()]
    texts += [repr(study.user_attrs)] + [repr(t.user_attrs) + repr(t.system_attrs) for t in study.trials]
    assert not [t for t in texts if postgres.password in t]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow-server.log" for p in files) and any(p.suffix == ".pt" for p in files)
    assert [p for p in files if postgres.password.encode() in p.read_bytes()] == []


def test_an_unreachable_storage_is_one_clear_line_without_the_password(databases, postgres, tmp_path):
    missing = f"brats_lab_test_missing_{uuid.uuid4().hex[:12]}"  # never created
    url = f"postgresql://root:{postgres.password}@{postgres.address}/{missing}"
    proc = subprocess.run([sys.executable, "-m", "brats_lab.cli", "worker", "--study", "x", "--storage", url],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"brats-lab: error: cannot open the Optuna storage postgresql://root:***@{postgres.address}/{missing}: ")
    assert f'database "{missing}" does not exist' in line
    assert postgres.password not in proc.stdout + proc.stderr


def test_the_mlflow_ui_listens_on_loopback_only_by_default(tmp_path, free_port, wait_for_url, stop_process):
    """`brats-lab ui` with no --host: the server's listening sockets are all on 127.0.0.1."""
    port = free_port()
    log = tmp_path / "ui.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "brats_lab.cli", "ui", "--port", str(port)], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_url(f"http://127.0.0.1:{port}/health", proc, log)
        listening = _listening(port)
        assert listening and set(listening) == {"127.0.0.1"}, listening
    finally:
        stop_process(proc)


def _listening(port: int) -> list[str]:
    """The local addresses of the sockets listening on TCP `port` (from /proc, Linux)."""
    found = []
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if size == 4:
                    found.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:  # four little-endian 32-bit words
                    found.append(socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found
