"""Faults caused for real: SIGTERM and Ctrl-C sent to training and worker processes, a disk that
fills half-way through a checkpoint or prediction write (RLIMIT_FSIZE in a child process), corrupt
and malicious checkpoint files, a corrupt cache entry and a dataset changed under its cache.

Each test checks what a user sees (one line naming the file, exit status non-zero, no traceback)
and what is left behind (run states, whole files, no temporary files, resumable work).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from brats_lab import tracking
from brats_lab.cli import main
from brats_lab.config import config_hash, flatten, load_config, pipeline_path, to_dict
from brats_lab.io import read_image, write_image
from brats_lab.models import build_model
from brats_lab.run_files import CHECKPOINT, FINAL_MODEL
from brats_lab.training.checkpoint import CHECKPOINT_KEYS
from brats_lab.training.checkpoint import save as _save
from brats_lab.training.trainer import EXPERIMENT

EPOCHS = 6  # enough that a signal sent after the first checkpoint finds the training still going
VALIDATED = "train.val_every=1"  # after `tiny_network`'s settings: validation every epoch


@pytest.fixture
def dataset(phantom_copy: Path, tmp_path: Path, monkeypatch) -> Path:
    # The cache is written inside the dataset folder: work on a copy of the shared phantoms.
    monkeypatch.chdir(tmp_path)  # the MLflow store is mlruns/ here, for this process and its children
    return phantom_copy


@pytest.fixture
def train_argv(tiny_network):
    """The function `train_argv(dataset, epochs=EPOCHS)`: the arguments of `brats-lab train` for
    fold 0 of pipeline B with tiny networks validated every epoch."""

    def make(dataset: Path, epochs: int = EPOCHS) -> list[str]:
        argv = ["train", "--pipeline", "B", "--fold", "0", "--profile", "cpu", "--data", str(dataset)]
        for item in [*tiny_network, VALIDATED, f"train.epochs={epochs}"]:
            argv += ["--set", item]
        return argv

    return make


@pytest.fixture
def train_config(tiny_network):
    """The function `train_config(dataset, epochs=EPOCHS)`: the configuration that
    `brats-lab train train_argv(dataset, epochs)` resolves."""
    return lambda dataset, epochs=EPOCHS: load_config(
        pipeline_path("B"), "cpu", [*tiny_network, VALIDATED, f"train.epochs={epochs}", f"data.dataset={dataset}"])


def start(argv: list[str], cwd: Path, file_size_limit: int | None = None, **kwargs) -> subprocess.Popen:
    """`brats-lab ARGV` in a child process; with `file_size_limit`, no file it writes may grow
    past that many bytes (a disk that fills up): SIGXFSZ ignored, so the write fails with EFBIG."""
    def setup():
        # Ctrl-C reaches a terminal's foreground job with SIGINT at its default; a test run started
        # in the background (`bash .ci/run &`) ignores SIGINT, and the child would inherit that.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if file_size_limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-m", "brats_lab.cli", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=setup, **kwargs)


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The first checkpoint a training under `root`/mlruns writes (fails if the process ends first)."""
    deadline = time.monotonic() + timeout
    while True:
        found = list((root / "mlruns" / "artifacts").rglob(CHECKPOINT))
        if found:
            return found[0]
        assert proc.poll() is None, f"ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.05)


def last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def error_message(stderr: str) -> str:
    """From the CLI's error line to the end (progress bars come before it)."""
    assert "brats-lab: error: " in stderr, stderr[-3000:]
    return stderr[stderr.index("brats-lab: error: "):]


def leftovers(folder: Path) -> list[str]:
    """Temporary files `brats_lab.files.atomic_path` would leave behind after a failed write."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def killed_training(argv: list[str], root: Path, how: str) -> tuple[subprocess.Popen, str, Path]:
    """`brats-lab` with `argv` (a `train_argv`) stopped by `how` (SIGTERM, or Ctrl-C as a terminal
    sends it: SIGINT to the whole process group) once its first checkpoint is on disk: (process,
    stderr, checkpoint)."""
    proc = start(argv, root, start_new_session=True)
    checkpoint = wait_for_checkpoint(root, proc)
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    return proc, stderr, checkpoint


# --- SIGTERM and Ctrl-C ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_stopped_training_is_marked_killed_keeps_a_whole_checkpoint_and_resumes(how, dataset, tmp_path, capsys, train_argv, train_config):
    proc, stderr, checkpoint = killed_training(train_argv(dataset), tmp_path, how)

    assert proc.returncode == (143 if how == "SIGTERM" else 130), stderr[-3000:]
    assert "Traceback" not in stderr
    assert last_line(stderr) == ("brats-lab: terminated (SIGTERM)" if how == "SIGTERM" else "brats-lab: interrupted")
    (run,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"})
    (arm,) = tracking.find_runs(EXPERIMENT, {"kind": "arm"})
    assert run.status == "KILLED" and arm.status == "KILLED"  # nothing left looking alive
    state = torch.load(checkpoint, weights_only=True)  # whole, and plain tensors and data
    assert set(CHECKPOINT_KEYS) <= set(state) and state["config_hash"] == config_hash(train_config(dataset))
    stopped_at = state["epoch"]
    assert 0 <= stopped_at < EPOCHS - 1
    assert leftovers(checkpoint.parent) == []

    assert main([*train_argv(dataset), "--resume"]) == 0  # the next command (in this process: quicker)
    assert f"MLflow fold run {run.id} " in capsys.readouterr().out  # the same run, continued
    assert [r.id for r in tracking.find_runs(EXPERIMENT, {"kind": "fold"})] == [run.id] and run.status == "FINISHED"
    steps = [s for s, _ in run.metric_history("train_loss")]
    assert sorted(set(steps)) == list(range(EPOCHS))
    # Continued, not restarted: the epochs the checkpoint held were not trained again.
    assert all(steps.count(s) == 1 for s in range(stopped_at + 1)), steps
    assert torch.load(checkpoint, weights_only=True)["epoch"] == EPOCHS - 1


@pytest.fixture
def tiny_ablation_file(tiny_network):
    """The function `tiny_ablation_file(folder, epochs)`: folder/tiny.toml, two arms of tiny
    networks (one trial per arm at --folds 1), written."""

    def write(tmp_path: Path, epochs: int) -> Path:
        arms = ", ".join(f'"{s}"' for s in [*tiny_network, VALIDATED, f"train.epochs={epochs}", "train.swa.enabled=false"])
        (tmp_path / "tiny.toml").write_text(
            f'name = "tiny"\npipeline = "A"\nbaseline = "equiunet"\nfolds = 2\n\n[arms]\n'
            f'equiunet = ["model.name=equiunet", {arms}]\natt_equiunet = ["model.name=att_equiunet", {arms}]\n')
        return tmp_path / "tiny.toml"

    return write


def test_a_terminated_worker_fails_its_trial_and_marks_its_fold_run_killed(dataset, tmp_path, tiny_ablation_file):
    from brats_lab.ablation.study import DEFAULT_STORAGE, launch, make_plan

    plan = make_plan(str(tiny_ablation_file(tmp_path, epochs=8)), "cpu", 1, str(dataset), DEFAULT_STORAGE)
    launch(plan)
    worker = start(["worker", "--study", plan.study_name, "--storage", DEFAULT_STORAGE, "--quiet"], tmp_path)
    wait_for_checkpoint(tmp_path, worker)
    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=120)

    assert worker.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and last_line(stderr) == "brats-lab: terminated (SIGTERM)"
    study = optuna.load_study(study_name=plan.study_name, storage=DEFAULT_STORAGE)
    assert sorted(t.state.name for t in study.trials) == ["FAIL", "WAITING"]  # not RUNNING: no grace period to wait out
    (run,) = tracking.find_runs(plan.experiment, {"kind": "fold"})
    assert run.status == "KILLED"
    launch(plan)  # the next launcher (or worker) enqueues the failed (arm, fold) again at once
    study = optuna.load_study(study_name=plan.study_name, storage=DEFAULT_STORAGE)
    assert sorted(t.state.name for t in study.trials) == ["FAIL", "WAITING", "WAITING"]


def test_a_relaunch_whose_storage_cannot_be_opened_leaves_finished_runs_finished(dataset, tmp_path, tiny_ablation_file):
    """Relaunching a finished study with a storage URL that cannot be opened (a wrong password,
    a server down) is refused by name, masked, and changes no run's state: both stores are
    opened before any run is reopened."""
    from brats_lab import DataError
    from brats_lab.ablation.study import DEFAULT_STORAGE, launch, make_plan

    toml = str(tiny_ablation_file(tmp_path, epochs=1))
    study_run = launch(make_plan(toml, "cpu", 1, str(dataset), DEFAULT_STORAGE))
    runs = [study_run, *tracking.find_runs("ablation-tiny", {"kind": "arm"})]
    assert len(runs) == 3
    for run in runs:  # as run_study leaves a study it has finished
        run.finish("FINISHED")
    down = "postgresql://user:Qm?Secret77@127.0.0.1:1/db"  # nothing listens on port 1
    with pytest.raises(DataError, match=r"cannot open the Optuna storage postgresql://user:\*\*\*@127.0.0.1:1/db") as e:
        launch(make_plan(toml, "cpu", 1, str(dataset), down))
    assert "Secret77" not in str(e.value)
    assert [tracking.get_run(r.id).status for r in runs] == ["FINISHED"] * 3


def test_a_terminated_ablation_stops_its_helper_workers_too(dataset, tmp_path, tiny_ablation_file):
    from brats_lab.ablation.study import DEFAULT_STORAGE, make_plan

    toml = tiny_ablation_file(tmp_path, epochs=40)  # stopped long before: time for both to be training
    launcher = start(["ablate", str(toml), "--workers", "2", "--folds", "1", "--data", str(dataset)], tmp_path)
    deadline = time.monotonic() + 180
    while len(list((tmp_path / "mlruns" / "artifacts").rglob(CHECKPOINT))) < 2:  # both processes training
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the two workers did not both reach a checkpoint"
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # the launcher only, as `kill PID` would
    _, stderr = launcher.communicate(timeout=120)

    assert launcher.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and last_line(stderr) == "brats-lab: terminated (SIGTERM)"
    plan = make_plan(str(toml), "cpu", 1, str(dataset), DEFAULT_STORAGE)
    runs = tracking.find_runs(plan.experiment, {"kind": "fold"})
    assert len({r.tags["pid"] for r in runs}) == 2 and {r.status for r in runs} == {"KILLED"}
    for pid in {int(r.tags["pid"]) for r in runs}:  # the helper was stopped and waited for
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    study = optuna.load_study(study_name=plan.study_name, storage=DEFAULT_STORAGE)
    assert sorted(t.state.name for t in study.trials) == ["FAIL", "FAIL"]
    # The study run and its arm runs end KILLED too, not RUNNING for good (issue 27 item 8) ...
    (study_run,) = tracking.find_runs(plan.experiment, {"kind": "study"})
    arms = tracking.find_runs(plan.experiment, {"kind": "arm"})
    assert study_run.status == "KILLED" and len(arms) == 2 and {a.status for a in arms} == {"KILLED"}
    # ... and a relaunch reopens the same ones.
    from brats_lab.ablation.study import launch

    assert launch(plan).id == study_run.id
    assert study_run.status == "RUNNING" and {a.status for a in arms} == {"RUNNING"}


LAUNCHERS = 3


def test_launchers_started_at_once_share_one_study_run_one_set_of_arm_runs_and_train_each_fold_once(dataset, tmp_path, tiny_ablation_file):
    """Several `brats-lab ablate` of one study started together (issue 27 item 8: two study runs,
    two sets of arm runs, the dashboard listing the study twice): every launcher finishes with the
    report, and the store holds one study run, one arm run per arm and one fold run per trial."""
    from brats_lab.ablation.study import DEFAULT_STORAGE, make_plan

    toml = tiny_ablation_file(tmp_path, epochs=1)
    argv = ["ablate", str(toml), "--folds", "1", "--data", str(dataset)]
    launchers = [start(argv, tmp_path) for _ in range(LAUNCHERS)]
    outputs = [proc.communicate(timeout=600) for proc in launchers]
    for proc, (stdout, stderr) in zip(launchers, outputs):
        assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
        assert "Each arm against 'equiunet'" in stdout, stdout[-3000:]
    plan = make_plan(str(toml), "cpu", 1, str(dataset), DEFAULT_STORAGE)
    studies = tracking.find_runs(plan.experiment, {"kind": "study"})
    assert len(studies) == 1 and studies[0].status == "FINISHED"
    arms = tracking.find_runs(plan.experiment, {"kind": "arm"})
    assert sorted(a.name for a in arms) == ["att_equiunet", "equiunet"] and {a.parent_id for a in arms} == {studies[0].id}
    assert {a.status for a in arms} == {"FINISHED"}
    folds = tracking.find_runs(plan.experiment, {"kind": "fold"})
    assert len(folds) == 2 and {f.status for f in folds} == {"FINISHED"}  # each trained once
    assert {f.parent_id for f in folds} == {a.id for a in arms}
    study = optuna.load_study(study_name=plan.study_name, storage=DEFAULT_STORAGE)
    assert sorted(t.state.name for t in study.trials if t.state.name != "PRUNED") == ["COMPLETE", "COMPLETE"]


# --- a write that fails half-way (the disk fills up) -------------------------------------------


def test_a_checkpoint_write_that_fails_half_way_keeps_the_previous_checkpoint(dataset, tmp_path, train_argv, train_config):
    _, _, checkpoint = killed_training(train_argv(dataset), tmp_path, "SIGTERM")
    before = checkpoint.read_bytes()

    # Resume where a file may grow to half a checkpoint only: the next checkpoint write fails.
    proc = start([*train_argv(dataset), "--resume"], tmp_path, file_size_limit=len(before) // 2)
    _, stderr = proc.communicate(timeout=300)

    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    assert last_line(stderr) == f"brats-lab: error: {checkpoint}: could not write (File too large)"
    assert checkpoint.read_bytes() == before and leftovers(checkpoint.parent) == []
    (run,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"})
    assert run.status == "FAILED"  # and resumable again once there is room:
    assert tracking.latest_fold_run(EXPERIMENT, config_hash(train_config(dataset)), 0, statuses=("FAILED",)).id == run.id


@pytest.fixture
def small_disk(tmp_path: Path):
    """A function that mounts a tmpfs of `size` bytes on a new folder and returns it: a disk that
    fills up for real (ENOSPC, as a full disk says it), unmounted at the end whatever happens."""
    mounted: list[Path] = []

    def mount(size: int, name: str = "disk") -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill a disk for real: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_disk_while_the_mlflow_store_is_first_created_leaves_no_half_migrated_store(dataset, small_disk, train_argv):
    """The store's schema migrations run out of room half-way (issue 27 item 7: a SQLAlchemy
    traceback, and a half-migrated mlflow.db that broke every later command until deleted by
    hand): one line naming the file and saying disk full, nothing left in mlruns/, and once space
    is freed the same command works."""
    disk = small_disk(512 * 1024)  # the migrated store takes about 950 kB
    proc = start(train_argv(dataset, epochs=1), disk)
    _, stderr = proc.communicate(timeout=300)

    db = disk / "mlruns" / "mlflow.db"
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert last_line(stderr) == (f"brats-lab: error: {db}: could not create the MLflow store (disk full (no space left on device)); "
                                 "nothing was left behind: free some space and run the command again")
    assert sorted(p.name for p in (disk / "mlruns").iterdir()) == ["mlflow.db.lock"]
    subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)  # space freed
    proc = start(train_argv(dataset, epochs=1), disk)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    (run,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=disk)
    assert run.status == "FINISHED"


def test_a_full_disk_in_data_prepare_names_the_file_and_says_disk_full(dataset, small_disk):
    """The cache on a disk that fills up while the first array is written (issue 27 item 7: "12000
    requested and 3968 written", without the file): the file and "disk full" on one line, no
    manifest, no temporary file; with room, the same command prepares every case."""
    disk = small_disk(64 * 1024)
    out = disk / "cache"
    proc = start(["data", "prepare", str(dataset), "--pipeline", "B", "--out", str(out)], dataset.parent)
    _, stderr = proc.communicate(timeout=300)

    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    line = last_line(stderr)
    assert re.fullmatch(rf"brats-lab: error: {re.escape(str(out))}/cases/BraTS20_Training_001/\w+/images\.npy: "
                        r"could not write the cached array \(\d+ bytes\) \(disk full.*\)", line), line
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name == "manifest.json" or ".tmp" in p.name], files
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    proc = start(["data", "prepare", str(dataset), "--pipeline", "B", "--out", str(out)], dataset.parent)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert (out / "manifest.json").is_file()


def fold_run_with_model(cfg, model_file: bytes | None = None):
    """A finished fold run whose final model is an untrained tiny network of `cfg` (the
    `train_config` of the dataset: enough to predict with) or, given `model_file`, those bytes."""
    arm = tracking.arm_run(EXPERIMENT, config_hash(cfg), "pipeline B", flatten(cfg))
    run = tracking.fold_run(arm, 0, "pipeline B fold 0")
    path = run.artifact_dir() / FINAL_MODEL
    torch.manual_seed(0)
    _save(path, {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg), "config_hash": config_hash(cfg), "fold": 0})
    if model_file is not None:
        path.write_bytes(model_file)
    run.finish("FINISHED")
    return run, path


def test_a_prediction_write_that_fails_half_way_keeps_the_previous_prediction(dataset, tmp_path, capsys, train_config):
    one_case = tmp_path / "one"
    shutil.copytree(dataset / "BraTS20_Training_001", one_case / "BraTS20_Training_001")
    run, _ = fold_run_with_model(train_config(dataset))
    argv = ["predict", "--run", run.id, "--input", str(one_case), "--output", str(tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    prediction = tmp_path / "out" / "BraTS20_Training_001.nii.gz"
    before = prediction.read_bytes()

    proc = start([*argv, "--overwrite"], tmp_path, file_size_limit=len(before) // 2)
    _, stderr = proc.communicate(timeout=300)

    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    assert last_line(stderr).startswith(f"brats-lab: error: {prediction}: could not write the image")
    assert prediction.read_bytes() == before and leftovers(prediction.parent) == []
    read_image(prediction, full_check=True)  # still a whole image


# --- corrupt and malicious checkpoints ---------------------------------------------------------


class _RunsCode:
    """Unpickled by a loader that allows arbitrary objects, this creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def bad_checkpoint(kind: str, tmp_path: Path, marker: Path, cfg) -> bytes:
    """A bad model file of `kind`; "truncated" cuts a model of `cfg` (a `train_config`) in half."""
    good = tmp_path / "good.pt"
    torch.save({"epoch": 0, "model": build_model(cfg.model).state_dict()}, good)
    if kind == "truncated":
        return good.read_bytes()[: good.stat().st_size // 2]
    if kind == "random bytes":
        return np.random.default_rng(0).bytes(4096)
    if kind == "text":
        return b"model weights: see the shared drive\n"
    evil = tmp_path / "evil.pt"
    torch.save({"epoch": 0, "model": _RunsCode(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is live: unsafe loading runs it
    assert marker.is_file()
    marker.unlink()
    return evil.read_bytes()


KINDS = ["truncated", "random bytes", "text", "runs code when unpickled"]


def test_train_resume_refuses_a_bad_checkpoint_by_name_without_running_it(dataset, tmp_path, capsys, train_argv, train_config):
    cfg = train_config(dataset)
    arm = tracking.arm_run(EXPERIMENT, config_hash(cfg), "pipeline B", flatten(cfg))
    for kind in KINDS:
        marker = tmp_path / "marker"
        run = tracking.fold_run(arm, 0, "pipeline B fold 0")
        checkpoint = run.artifact_dir() / CHECKPOINT
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(bad_checkpoint(kind, tmp_path, marker, train_config(tmp_path)))
        run.finish("KILLED")

        assert main([*train_argv(dataset), "--resume"]) == 1, kind
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert error_message(err).startswith(f"brats-lab: error: {checkpoint}: ") and error_message(err).count("\n") == 1, err
        assert not marker.exists(), kind
        assert run.status == "KILLED", kind  # left as it was, not reopened and stuck RUNNING


def test_predict_refuses_a_bad_model_file_by_name_without_running_it(dataset, tmp_path, capsys, train_config):
    for kind in KINDS:
        marker = tmp_path / "marker"
        run, path = fold_run_with_model(train_config(dataset), bad_checkpoint(kind, tmp_path, marker, train_config(tmp_path)))

        assert main(["predict", "--run", run.id, "--input", str(dataset), "--output", str(tmp_path / "out")]) == 1, kind
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert error_message(err).startswith(f"brats-lab: error: {path}: ") and error_message(err).count("\n") == 1, err
        assert not marker.exists(), kind
        assert not (tmp_path / "out").exists(), kind


# --- the data cache ----------------------------------------------------------------------------


def test_train_rebuilds_a_corrupt_cache_entry_and_refuses_a_dataset_changed_under_its_folds(dataset, capsys, train_argv):
    from brats_lab.data.cache import open_cache

    assert main(train_argv(dataset, epochs=1)) == 0
    cache = open_cache(dataset, "zscore")
    images = cache.dir / cache.entry("BraTS20_Training_002").dir / "images.npy"
    with open(images, "r+b") as f:  # same size, same header, other voxels: only the hash can tell
        f.seek(images.stat().st_size // 2)
        f.write(b"\x7f" * 64)
    capsys.readouterr()

    assert main(train_argv(dataset, epochs=1)) == 0
    err = capsys.readouterr().err
    assert "rebuilt BraTS20_Training_002 (corrupt: images.npy changed (sha256 differs))" in err
    open_cache(dataset, "zscore").load("BraTS20_Training_002")  # whole again
    assert len(tracking.find_runs(EXPERIMENT, {"kind": "fold"}, statuses=("FINISHED",))) == 2

    # The same case id with other labels: the folds were drawn for the old data.
    seg = dataset / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz"
    labels, geometry = read_image(seg)
    write_image(np.where(labels == 2, 0, labels).astype(np.uint8), geometry, seg)
    assert main(train_argv(dataset, epochs=1)) == 1
    err = capsys.readouterr().err
    splits = next(cache.dir.glob("splits_*.json"))
    assert "Traceback" not in err
    assert error_message(err).startswith(f"brats-lab: error: {splits}: splits were made for data with manifest hash"), err
    assert error_message(err).count("\n") == 1
    assert len(tracking.find_runs(EXPERIMENT, {"kind": "fold"})) == 2  # no run started on the changed data
