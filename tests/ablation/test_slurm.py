"""A study on a SLURM cluster, on a real scheduler: a one-node cluster started here (munged,
slurmctld, slurmd, from Debian's slurm-wlm and munge; a generated slurm.conf with this host as the
only node, no cgroups, no accounting database), PostgreSQL for Optuna and an MLflow server, and
`brats-lab ablate --slurm` as the README's "On a SLURM cluster" section runs it. One array task is
cancelled (scancel) and the other preempted (scancel --signal=USR2) half-way through a fold; the
study still ends with one finished run per (arm, fold, seed), the interrupted folds resumed from
their checkpoints, and the same report as on one machine.

Needs slurmctld, slurmd and munged on PATH (`.ci/run` installs them; without them the cluster tests
are skipped and say why, and CI's strict skips refuse that) and PostgreSQL (the fixtures of
tests/ablation/conftest.py, shared with test_scale_out.py). BRATS_LAB_SKIP_SLURM=1 skips them too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest

from brats_lab import tracking
from brats_lab.ablation.study import make_plan
from brats_lab.cli import main

pytestmark = pytest.mark.xdist_group("slurm")  # one cluster at a time, in one test worker

EPOCHS = 3
SLURM_TABLE = """
[slurm]
workers = 2
cpus_per_worker = 1
mem = "400M"
time = "20:00"
"""
DAEMONS = ("munged", "slurmctld", "slurmd")


@pytest.fixture(scope="module")
def ablation(tiny_ablation) -> str:
    """A two-seed ablation of tiny networks, run on SLURM."""
    return tiny_ablation("tiny-slurm", f"train.epochs={EPOCHS}", "train.amp=off", seeds=2) + SLURM_TABLE


def _slurm_conf(root: Path, host: str, cpus: int, ports: tuple[int, int]) -> str:
    return f"""\
ClusterName=bratslab
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it starts again (default 120 s)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
KillWait=15
MinJobAge=600
JobRequeue=1
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _until(check, seconds: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f} s"
        time.sleep(interval)
    return result


@pytest.fixture
def slurm_cluster(monkeypatch, free_port, stop_process):
    """A one-node SLURM cluster on this machine: munged with a fresh key, slurmctld and slurmd
    from a generated slurm.conf (SLURM_CONF is set for the test and the processes it starts).
    Yields the folder holding the conf, the state and the daemons' logs; at the end every job is
    cancelled and waited for, then the daemons are stopped."""
    if os.environ.get("BRATS_LAB_SKIP_SLURM") == "1":
        pytest.skip("BRATS_LAB_SKIP_SLURM=1")
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:  # skipped and said, as the browser test without chromium; CI's strict skips refuse it
        pytest.skip(f"{', '.join(missing)} not on PATH: install Debian's slurm-wlm and munge (.ci/run does) to run the SLURM tests")
    # A short path: the munge socket's must fit a Unix socket address (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="brats-slurm-", dir="/tmp"))
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, max(2, os.cpu_count() or 1), (free_port(), free_port())))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        with (root / "log" / f"{name}.out").open("w") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    def logs() -> str:
        return "\n".join(f"--- {p.name}:\n{_read(p)[-2000:]}" for p in sorted((root / "log").iterdir()))

    try:
        sock = root / "munge" / "munge.socket"
        munged = start("munged", ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                                  f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
                                  f"--log-file={root}/log/munged.log"])
        _until(lambda: munged.poll() is not None or subprocess.run(["munge", "-S", str(sock), "-n"], capture_output=True).returncode == 0,
               30, "munged answering")
        assert munged.poll() is None, logs()
        start("slurmctld", ["slurmctld", "-D", "-f", str(conf)])
        start("slurmd", ["slurmd", "-D", "-f", str(conf), "-N", host])

        def idle() -> bool:
            assert all(p.poll() is None for p in procs), logs()
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            return state.stdout.strip() == "idle"

        _until(idle, 60, f"the node idle in sinfo ({logs()})", interval=0.5)
        yield root
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
        try:  # the jobs' processes end with them (slurmstepd waits for them), before the daemons stop
            _until(lambda: subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip() == "",
                   60, "the jobs gone")
        finally:
            for proc in reversed(procs):
                stop_process(proc)
            shutil.rmtree(root, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _cli(args: list[str], cwd: Path, env: dict, log: Path, timeout: float) -> str:
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        proc = subprocess.run([sys.executable, "-m", "brats_lab.cli", *args], cwd=cwd, env=env, stdout=out, stderr=err, timeout=timeout)
    assert proc.returncode == 0, _read(log.with_suffix(".err"))[-3000:]
    return _read(log.with_suffix(".out"))


def _report(output: str) -> str:
    """The report `brats-lab ablate` prints: from its first line to the MLflow pointer after it."""
    start = output.index("Ablation 'tiny-slurm'")
    end = output.find("\n\nin MLflow:", start)
    return output[start:] if end < 0 else output[start:end]


def _show(task: str) -> str:
    return subprocess.run(["scontrol", "show", "job", task], capture_output=True, text=True).stdout


def _squeue_state(task: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", task, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def test_a_study_on_slurm_survives_a_cancelled_and_a_preempted_task_and_reports_as_one_machine(
    slurm_cluster, databases, mlflow_server, postgres, stop_process, copy_phantoms, ablation, tmp_path, monkeypatch, capsys
):
    cluster, alone, logs = tmp_path / "cluster", tmp_path / "one-machine", tmp_path / "logs"
    for folder in (cluster, alone):
        copy_phantoms(folder / "phantom")
        (folder / "tiny.toml").write_text(ablation)
    logs.mkdir(exist_ok=True)  # the MLflow server logs there too
    storage = f"postgresql://root@{postgres.address}/{databases()}"
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    base.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), base.get("PYTHONPATH", "")])})
    # The workers inherit the launcher's environment (sbatch exports it): the MLflow server, one
    # thread each, a 1 s heartbeat. The grace period stays long: every stop here is clean.
    env = {**base, "MLFLOW_TRACKING_URI": mlflow_server, "BRATS_LAB_HEARTBEAT_SECONDS": "1", "BRATS_LAB_GRACE_SECONDS": "120"}
    for key in ("MLFLOW_TRACKING_URI", "OMP_NUM_THREADS", "PYTHONPATH", "BRATS_LAB_HEARTBEAT_SECONDS", "BRATS_LAB_GRACE_SECONDS"):
        monkeypatch.setenv(key, env[key])  # for the commands run in this process (and the jobs they submit)
    monkeypatch.chdir(cluster)
    command = ["ablate", "tiny.toml", "--profile", "cpu", "--data", "phantom", "--storage", storage, "--slurm"]

    # The same study on one machine (embedded stores), alongside: its report is the reference.
    with (logs / "alone.out").open("w") as out, (logs / "alone.err").open("w") as err:
        reference = subprocess.Popen([sys.executable, "-m", "brats_lab.cli", "ablate", "tiny.toml", "--profile", "cpu", "--data", "phantom"],
                                     cwd=alone, env=base, stdout=out, stderr=err, start_new_session=True)
    try:
        # Submit and return: the job id and how to follow it. (In this process, to save the
        # seconds of a start; the command that waits below is a process of its own.)
        assert main([*command, "--detach"]) == 0
        submitted = capsys.readouterr().out
        job = re.search(r"submitted SLURM job array (\d+) for study (\S+):", submitted)
        assert job, submitted
        job, study_name = job.groups()
        assert f"squeue -j {job}" in submitted and "2 workers, 1 CPU, mem 400M, time 20:00" in submitted, submitted
        first, second = f"{job}_0", f"{job}_1"

        # Each task's first fold, once it has written its first checkpoint (of EPOCHS): task 0 is
        # cancelled, task 1 preempted (the signal SLURM sends before a time limit or preemption).
        interrupted: dict[str, object] = {}
        passed: set[str] = set()  # checkpointed runs not to interrupt: finished, or their task's done
        checkpoints = cluster / "mlruns" / "checkpoints"

        def interrupt() -> bool:
            for path in checkpoints.glob("*/checkpoints/last.pt") if checkpoints.is_dir() else ():
                run_id = path.parents[1].name
                if run_id in passed:
                    continue
                run = tracking.get_run(run_id)
                task = run.tags.get("slurm_job")
                if run.status == "RUNNING" and task in (first, second) and task not in interrupted:
                    argv = ["scancel", task] if task == first else ["scancel", "--signal=USR2", task]
                    subprocess.run(argv, check=True, timeout=30)
                    interrupted[task] = run
                passed.add(run_id)
            assert reference.poll() in (None, 0), _read(logs / "alone.err")[-3000:]
            return len(interrupted) == 2

        _until(interrupt, 240, "both tasks at their first checkpoint", interval=0.05)
        cancelled, preempted = interrupted[first], interrupted[second]
        # Stopped mid-fold: the runs KILLED (not FINISHED), each with the checkpoint of epoch 0 or 1.
        _until(lambda: {tracking.get_run(r.id).status for r in (cancelled, preempted)} == {"KILLED"}, 60, "both folds stopped")

        # The preempted task requeued itself (pending a few seconds, then running); the cancelled one is gone.
        _until(lambda: "Restarts=1" in _show(second), 60, f"{second} requeued")
        _until(lambda: _squeue_state(first) == "", 60, f"{first} gone")

        # The same command again (no --detach) finds one task of two at work, submits one more in
        # place of the cancelled one, waits and reports; --report then prints the same report.
        waited = _cli(command, cluster, env, logs / "wait", timeout=400)
        topped = re.search(r"submitted SLURM job array (\d+) for study \S+: 1 worker, ", waited)
        assert topped and waited.count("submitted") == 1, waited
        third = topped.group(1)  # a one-task array is a plain job
        assert main(["ablate", "tiny.toml", "--profile", "cpu", "--data", "phantom", "--storage", storage, "--report"]) == 0
        reported = capsys.readouterr().out
        assert reference.wait(timeout=400) == 0, _read(logs / "alone.err")[-3000:]
    finally:
        stop_process(reference)

    # The report equals the one-machine report, to the last digit.
    expected = _report(_read(logs / "alone.out"))
    assert "att_equiunet" in expected and "runs as the unit" in expected
    assert _report(waited) == expected
    assert reported.strip() == expected.strip()

    # Exactly one FINISHED fold run per (arm, fold, seed); nothing left RUNNING.
    plan = make_plan("tiny.toml", "cpu", None, "phantom", storage)
    assert plan.study_name == study_name
    arm_of = {(r.tags["config_hash"]): (r.tags["arm"], int(r.tags["seed"])) for r in tracking.find_runs(plan.experiment, {"kind": "arm"})}
    folds = tracking.find_runs(plan.experiment, {"kind": "fold"})
    finished = sorted((*arm_of[r.tags["config_hash"]], int(r.tags["fold"])) for r in folds if r.status == "FINISHED")
    assert finished == sorted((arm, seed, fold) for arm, fold, seed in plan.cells())
    assert len(folds) == 8 and {r.status for r in tracking.find_runs(plan.experiment, {})} == {"FINISHED"}

    # The interrupted folds: the same runs, resumed from their checkpoints by the requeued task or
    # the new one (epoch 0 logged once: not trained again), finished; their tags name the task
    # and its log.
    for run in (cancelled, preempted):
        run = tracking.get_run(run.id)
        assert run.status == "FINISHED"
        steps = [s for s, _ in run.metric_history("train_loss")]
        assert sorted(set(steps)) == list(range(EPOCHS)) and steps.count(0) == 1, steps
        assert run.tags["slurm_job"] in (second, third)
        restart = "restart 1" if run.tags["slurm_job"] == second else "restart 0"
        assert f"worker: SLURM task {run.tags['slurm_job']} ({restart})" in _read(Path(run.tags["slurm_log"]))

    # Every run trained exactly as on one machine: the same losses, epoch by epoch, to the last bit.
    def losses(root: Path | None) -> dict:
        runs = tracking.find_runs(plan.experiment, {"kind": "fold"}, statuses=("FINISHED",), root=root)
        return {(r.tags["config_hash"], r.tags["fold"], key): r.metric_history(key) for r in runs for key in ("train_loss", "val_loss")}

    on_slurm = losses(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert losses(alone) == on_slurm and len(on_slurm) == 16
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)

    # Optuna: each cell completed once; the two interrupted trials released (failed, queued again).
    study = optuna.load_study(study_name=plan.study_name, storage=storage.replace("postgresql://", "postgresql+psycopg://"))
    states = Counter(t.state.name for t in study.trials)
    assert states == {"COMPLETE": 8, "FAIL": 2}, states
    assert sorted((t.user_attrs["arm"], t.user_attrs["seed"], t.user_attrs["fold"]) for t in study.trials if t.state.name == "COMPLETE") == finished
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert sorted(t.user_attrs["slurm_job"] for t in failed) == [first, second]
    for t in study.trials:  # each names the task that ran it and its log, which exists
        assert t.user_attrs["slurm_job"] in (first, second, third) and Path(t.user_attrs["slurm_log"]).is_file()
    assert study.user_attrs["slurm_jobs"] == [job, third]

    # SLURM's side: task 1 requeued once, task 0 cancelled; each log says what happened.
    assert "Restarts=1" in _show(second) and "JobState=COMPLETED" in _show(second), _show(second)
    assert "JobState=CANCELLED" in _show(first), _show(first)
    log_first, log_second = (_read(Path(t.user_attrs["slurm_log"])) for t in sorted(failed, key=lambda t: t.user_attrs["slurm_job"]))
    assert "worker: terminated (SIGTERM); trial released" in log_first
    assert f"worker: preempted; trial released; requeueing {second}" in log_second
    assert re.search(r"worker: ran \d+ trials of .*; none left", log_second)


def test_unknown_slurm_settings_are_refused_before_anything_is_submitted(slurm_cluster, tmp_path, phantom_copy, ablation):
    """A misspelt key, a sbatch option the installed sbatch does not know, and one brats-lab sets
    itself: each one line naming it, exit 1, no job and no study."""
    (tmp_path / "tiny.toml").write_text(ablation)
    command = [sys.executable, "-m", "brats_lab.cli", "ablate", "tiny.toml", "--profile", "cpu", "--data", "phantom", "--slurm", "--detach"]
    cases = {
        "partiton=debug": "brats-lab: error: --slurm-set: unknown key 'slurm.partiton'; did you mean 'slurm.partition'?",
        "sbatch.qoss=high": "brats-lab: error: slurm.sbatch.qoss: `sbatch --help` lists no option --qoss; did you mean 'qos'?",
        "sbatch.array=0-3": "brats-lab: error: --slurm-set: slurm.sbatch.array cannot be set: brats-lab submits one array of `workers` tasks",
        "time=soon": "brats-lab: error: --slurm-set: slurm.time must be minutes or [D-]HH:MM[:SS] as sbatch --time reads it, got 'soon'",
    }
    for setting, message in cases.items():
        proc = subprocess.run([*command, "--slurm-set", setting], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
    bad_toml = ablation.replace("cpus_per_worker = 1", "cpus_per_worker = 1\ngpus = 2")
    (tmp_path / "bad.toml").write_text(bad_toml)
    proc = subprocess.run([*command[:4], "bad.toml", *command[5:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "unknown key 'slurm.gpus'" in proc.stderr, proc.stderr
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "slurm").exists()

    # What only the scheduler knows (its partitions, accounts, limits): sbatch's own words.
    proc = subprocess.run([*command, "--slurm-set", "partition=nope"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("brats-lab: error: sbatch refused the workers' job: "), proc.stderr
    assert "invalid partition specified: nope" in proc.stderr and "Traceback" not in proc.stderr
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""
