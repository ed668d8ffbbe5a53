"""The trainer end to end on phantom files, with a real MLflow store, a real crash and a resume."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brats_lab import DataError, tracking
from brats_lab.config import config_hash, load_config, pipeline_path
from brats_lab.labels import REGIONS
from brats_lab.run_files import CHECKPOINT, FINAL_MODEL
from brats_lab.training.trainer import train_fold

VALIDATED = "train.val_every=1"  # after `tiny_network`'s settings: validation every epoch


@pytest.fixture
def tiny_config(tiny_network):
    """The function `tiny_config(pipeline, dataset, *extra)`: the pipeline's cpu config with
    `tiny_network`'s settings, validated every epoch, a short schedule, then `extra`."""

    def config(pipeline: str, dataset: Path, *extra: str):
        overrides = [*tiny_network, VALIDATED, f"data.dataset={dataset}"]
        if pipeline == "A":
            overrides += ["train.epochs=2", "train.swa.cycles=1", "train.swa.cycle_epochs=2", "train.swa.anneal_epochs=2", "train.swa.snapshot_every=1"]
        else:
            overrides += ["train.epochs=3"]
        return load_config(pipeline_path(pipeline), "cpu", [*overrides, *extra])

    return config


@pytest.fixture
def dataset(phantom_copy: Path) -> Path:
    return phantom_copy  # the cache is written inside the dataset folder: a copy of the shared phantoms


@pytest.mark.parametrize("pipeline", ["A", "B"])
def test_a_fold_trains_validates_and_logs_everything(pipeline, dataset, tmp_path, monkeypatch, tiny_config):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(pipeline, dataset)
    seeded = []  # torch's global seed: the initial weights
    monkeypatch.setattr(torch, "manual_seed", lambda seed, real=torch.manual_seed: seeded.append(seed) or real(seed))
    result = train_fold(cfg, 0, progress=False)

    assert list(result.per_case.columns[:1]) == ["case"] and len(result.per_case) == 2
    assert result.per_case.filter(like="dice_").notna().all().all()
    run = tracking.find_runs(tracking_experiment(), {"kind": "fold"})[0]
    assert run.id == result.run_id and run.status == "FINISHED"
    assert run.tags["config_hash"] == config_hash(cfg) and run.tags["fold"] == "0"
    assert run.tags["manifest_hash"] and run.params["model.width"] == "4"
    # The fold's own seed, drawn from (train.seed, seed index, fold), not train.seed itself.
    assert seeded == [cfg.train.run_seed(0)] != [cfg.train.seed] and run.tags["run_seed"] == str(seeded[0])
    epochs = cfg.train.epochs + (cfg.train.swa.cycles * cfg.train.swa.cycle_epochs if cfg.train.swa.enabled else 0)
    assert [step for step, _ in run.metric_history("train_loss")] == list(range(epochs))
    assert len(run.metric_history("val_dice_WT")) == epochs
    artifacts = {p for p in _all_artifacts(run)}
    assert {"config.json", "per_case_metrics.csv", CHECKPOINT, FINAL_MODEL} <= artifacts
    assert len([a for a in artifacts if a.startswith("overlays/") and a.endswith(".png")]) == 2
    assert sorted(a for a in artifacts if a.startswith("predictions/")) == sorted(
        f"predictions/{c}.nii.gz" for c in result.per_case["case"])
    arm = tracking.find_runs(tracking_experiment(), {"kind": "arm"})[0]
    assert run.tags["mlflow.parentRunId"] == arm.id
    final = torch.load(run.artifact_dir() / FINAL_MODEL, weights_only=True)
    assert final["config_hash"] == config_hash(cfg)
    if pipeline == "A":
        assert run.tags["final_model"] == "average of 2 snapshots"
    else:
        assert run.tags["final_model"].startswith("best validation loss")


def tracking_experiment() -> str:
    from brats_lab.training.trainer import EXPERIMENT

    return EXPERIMENT


def _all_artifacts(run) -> list[str]:
    root = run.artifact_dir()
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


def test_a_run_killed_mid_training_resumes_to_the_same_weights(dataset, tmp_path, monkeypatch, tiny_config, tiny_network):
    monkeypatch.chdir(tmp_path)
    # float32: the cpu profile's auto precision is bf16 on a CPU with AMX, not bitwise deterministic run to run
    extra = ["train.epochs=3", "train.swa.cycles=1", "train.swa.cycle_epochs=3", "train.amp=off"]
    cfg = tiny_config("A", dataset, *extra)
    # Both processes on one thread: a float32 conv sums in an order that depends on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_killed_and_resumed(cfg, dataset, tmp_path, [*tiny_network, VALIDATED], extra)
    finally:
        torch.set_num_threads(threads)


def _train_killed_and_resumed(cfg, dataset, tmp_path, tiny, extra):
    straight = train_fold(cfg, 1, progress=False)

    # The same training in another process, killed (SIGKILL: no clean-up at all) once it has
    # written a checkpoint and is into a later epoch.
    argv = ["train", "--pipeline", "A", "--fold", "1", "--profile", "cpu", "--data", str(dataset)]
    for item in tiny + ["train.swa.anneal_epochs=2", "train.swa.snapshot_every=1", *extra]:
        argv += ["--set", item]
    proc = subprocess.Popen([sys.executable, "-m", "brats_lab.cli", *argv], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "mlruns" / "artifacts"
    deadline = time.monotonic() + 120
    while not _killed_after_first_checkpoint(checkpoints, straight.run_id):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = tracking.latest_fold_run(tracking_experiment(), config_hash(cfg), 1, statuses=("RUNNING",))
    assert killed is not None and killed.id != straight.run_id
    saved_epoch = torch.load(killed.artifact_dir() / CHECKPOINT, weights_only=True)["epoch"]
    assert saved_epoch < 5  # killed before the end

    resumed = train_fold(cfg, 1, resume=True, progress=False)
    assert resumed.run_id == killed.id
    assert tracking.find_runs(tracking_experiment(), {"kind": "fold", "fold": "1"}, statuses=("RUNNING",)) == []
    a = torch.load(tracking_run(straight.run_id).artifact_dir() / FINAL_MODEL, weights_only=True)["model"]
    b = torch.load(killed.artifact_dir() / FINAL_MODEL, weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for region in REGIONS:
        assert resumed.per_case[f"dice_{region}"].tolist() == straight.per_case[f"dice_{region}"].tolist()
    steps = [s for s, _ in tracking_run(killed.id).metric_history("train_loss")]
    assert sorted(set(steps)) == list(range(6))


def _killed_after_first_checkpoint(root: Path, other_run: str) -> bool:
    return any(other_run not in str(p) for p in root.rglob("checkpoints/last.pt"))


def tracking_run(run_id: str):
    return tracking.get_run(run_id)


def test_a_training_killed_after_any_epoch_resumes_to_the_same_state(dataset, tmp_path, monkeypatch, empty_mlflow_store, tiny_config,
                                                                      assert_same_state):
    """Pipeline A, 2 main epochs and one averaging cycle of 2, runs straight; the same training is
    killed after every epoch's checkpoint in turn and resumed each time: in the main phase, at
    its end (resumed into the cycle's fresh Adam), after the first averaging epoch (epoch ==
    train.epochs: its checkpoint holds the averaging phase's Adam, not the main phase's Ranger),
    and after the last epoch, before the final model. Each checkpoint of the resumed training,
    read back from its file, equals the straight one's of the same epoch, tensor for tensor; so
    do the final weights, the scores and the logged losses. In one process, a kill being a
    KeyboardInterrupt once the checkpoint is written: the epoch is chosen, not raced, and the
    trainings take seconds. The test above kills a real process."""
    from brats_lab import viz
    from brats_lab.training import checkpoint

    monkeypatch.chdir(tmp_path)
    shutil.copytree(empty_mlflow_store, tmp_path / "mlruns")  # MLflow's migrations done once
    monkeypatch.setattr(viz, "render_case", lambda images, convention, path, **kwargs: Path(path).touch())  # no drawing
    cfg = tiny_config("A", dataset, "train.amp=off")  # float32
    epochs = 4
    real_save = checkpoint.save
    saved: dict[str, dict[int, dict]] = {"straight": {}, "resumed": {}}
    now, kill_after = "straight", None

    def save(path, state):
        real_save(path, state)
        if path.name == Path(CHECKPOINT).name:
            saved[now][state["epoch"]] = checkpoint.load(path, checkpoint.CHECKPOINT_KEYS)
            if state["epoch"] == kill_after:
                raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the test above: the same summation order in every training
    try:
        straight = train_fold(cfg, 1, progress=False)
        now = "resumed"
        for kill_after in range(epochs):
            with pytest.raises(KeyboardInterrupt):
                train_fold(cfg, 1, resume=kill_after > 0, progress=False)
            assert sorted(saved["resumed"]) == list(range(kill_after + 1))
            stopped = tracking.latest_fold_run(tracking_experiment(), config_hash(cfg), 1)
            assert stopped.status == "KILLED"
            if kill_after == 0:  # a failed run resumes too,
                stopped.finish("FAILED")
            elif kill_after == 1:  # and a running one, as a worker killed outright leaves it
                stopped.reopen()
        kill_after = None
        resumed = train_fold(cfg, 1, resume=True, progress=False)
        # Finished, and newer than every stopped run: nothing is left to resume.
        with pytest.raises(DataError, match=f"^nothing to resume: no unfinished run of fold 1 for this configuration "
                                            rf"\(hash {config_hash(cfg)[:12]}\)$"):
            train_fold(cfg, 1, resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)

    assert sorted(saved["straight"]) == list(range(epochs))
    for epoch in range(epochs):
        assert_same_state(saved["resumed"][epoch], saved["straight"][epoch], f"checkpoint of epoch {epoch}")
    assert saved["straight"][epochs - 1]["average"]["count"] == 2  # the averaging phase ran
    a = torch.load(tracking_run(straight.run_id).artifact_dir() / FINAL_MODEL, weights_only=True)["model"]
    b = torch.load(tracking_run(resumed.run_id).artifact_dir() / FINAL_MODEL, weights_only=True)["model"]
    assert_same_state(b, a, "final model")
    assert resumed.per_case.equals(straight.per_case)
    losses = [dict(tracking_run(r.run_id).metric_history("train_loss")) for r in (straight, resumed)]
    assert losses[0] == losses[1] and sorted(losses[0]) == list(range(epochs))


def test_resume_without_an_unfinished_run_is_a_clear_error(dataset, tmp_path, monkeypatch, tiny_config):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config("B", dataset)
    with pytest.raises(DataError, match=rf"^nothing to resume: no unfinished run of fold 0 for this configuration \(hash {config_hash(cfg)[:12]}\)$"):
        train_fold(cfg, 0, resume=True, progress=False)
    arm = tracking.arm_run(tracking_experiment(), config_hash(cfg), "pipeline B", {})
    early = tracking.fold_run(arm, 0, "pipeline B fold 0")
    early.finish("KILLED")  # stopped before it wrote a checkpoint
    with pytest.raises(DataError, match=f"^nothing to resume: run {early.id} stopped before its first checkpoint; train afresh$"):
        train_fold(cfg, 0, resume=True, progress=False)
    assert early.status == "KILLED"  # left as it was


def test_a_fold_run_is_tagged_with_what_trains_it_once_and_with_its_worker_at_every_start(tmp_path, monkeypatch, empty_mlflow_store):
    """What the network and precision were (`parameters`, `device`, `amp`) is tagged when the run
    starts; which machine and process train it (`host`, `pid`, and `processes` with several) at
    every start, a resume on another worker included."""
    from brats_lab.config import ModelConfig
    from brats_lab.models import build_model, count_parameters
    from brats_lab.training import trainer
    from brats_lab.training.step import Compute

    monkeypatch.chdir(tmp_path)
    shutil.copytree(empty_mlflow_store, tmp_path / "mlruns")
    run = tracking.fold_run(tracking.arm_run("tags", "0" * 64, "arm", {}), 0, "fold 0")
    model = build_model(ModelConfig(width=4))
    trainer._tag_run(run, False, model, Compute(torch.device("cpu"), torch.bfloat16), 1)
    first = {"parameters": str(count_parameters(model)), "device": "cpu", "amp": "bfloat16"}
    assert {k: run.tags.get(k) for k in (*first, "host", "pid", "processes")} == {
        **first, "host": socket.gethostname(), "pid": str(os.getpid()), "processes": None}
    run.set_tags({"host": "elsewhere", "pid": "1"})
    trainer._tag_run(run, True, build_model(ModelConfig(width=8)), Compute(torch.device("cpu"), None), 2)  # resumed, two processes
    assert {k: run.tags.get(k) for k in (*first, "host", "pid", "processes")} == {
        **first, "host": socket.gethostname(), "pid": str(os.getpid()), "processes": "2"}


def test_a_non_finite_loss_stops_the_run_as_failed_naming_epoch_and_step(dataset, tmp_path, monkeypatch, tiny_config):
    import dataclasses

    from brats_lab.training.trainer import TrainingDiverged

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config("B", dataset)
    # Built past the config loader (which may refuse inf itself): the trainer's own guard is tested.
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=float("inf")))
    # 2 folds of 4 cases: 2 training cases in one batch of 2, one step per epoch. The first step's
    # loss is finite; its update (inf x gradient) leaves weights that are inf or NaN, so the loss
    # of the next step, epoch 1's only one, is not finite.
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1 of 1.*optim\.lr"):
        train_fold(cfg, 0, progress=False)
    run = tracking.find_runs(tracking_experiment(), {"kind": "fold"})[0]
    assert run.status == "FAILED"
    assert tracking.find_runs(tracking_experiment(), {"kind": "arm"})[0].status == "FAILED"
    assert [step for step, _ in run.metric_history("train_loss")] == [0]  # the diverged epoch is not logged
    assert not (run.artifact_dir() / FINAL_MODEL).exists()


@pytest.mark.parametrize(("epoch_cases", "diverged"), [(0, "epoch 0, step 2 of 2"), (1, "epoch 1, step 1 of 1")])
def test_epoch_cases_sets_the_steps_of_an_epoch(dataset, tmp_path, monkeypatch, tiny_config, epoch_cases, diverged):
    """`train.epoch_cases`: patches per epoch. Seen through the divergence guard, which names the
    step and the steps of the epoch: the 2 training cases in batches of 1 make 2 steps an epoch,
    one with `epoch_cases = 1` (the step after the infinite update comes an epoch later)."""
    import dataclasses

    from brats_lab.training.trainer import TrainingDiverged

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config("B", dataset, "train.batch_size=1", f"train.epoch_cases={epoch_cases}")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=float("inf")))
    with pytest.raises(TrainingDiverged, match=diverged):
        train_fold(cfg, 0, progress=False)


def test_cli_with_an_infinite_learning_rate_does_not_finish(dataset, tmp_path, monkeypatch, capsys, tiny_network):
    from brats_lab.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["train", "--pipeline", "B", "--fold", "0", "--profile", "cpu", "--data", str(dataset)]
    for item in [*tiny_network, VALIDATED, "train.epochs=3", "optim.lr=inf"]:
        argv += ["--set", item]
    assert main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("brats-lab: error:")]
    assert len(errors) == 1 and "optim.lr" in errors[0], errors
    assert tracking.find_runs(tracking_experiment(), {"kind": "fold"}, statuses=("FINISHED", "RUNNING")) == []


def test_epochs_log_their_time_split_and_both_run_kinds_share_the_run_protocol(dataset, tmp_path, monkeypatch, tiny_config):
    from brats_lab.training.distributed import NoRun

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config("B", dataset, "train.epochs=2", "train.val_every=2")
    result = train_fold(cfg, 0, progress=False)
    run = tracking_run(result.run_id)
    assert isinstance(run, tracking.RunLog) and isinstance(NoRun(), tracking.RunLog)
    history = {key: dict(run.metric_history(key)) for key in
               ("epoch_data_seconds", "epoch_step_seconds", "epoch_val_seconds", "epoch_seconds")}
    for epoch in (0, 1):
        parts = [history[k][epoch] for k in ("epoch_data_seconds", "epoch_step_seconds", "epoch_val_seconds")]
        assert min(parts) >= 0
        # Three consecutive intervals inside the epoch's (to rounding of the subtraction).
        assert sum(parts) <= history["epoch_seconds"][epoch] + 1e-9
    assert [s for s, _ in run.metric_history("val_loss")] == [1]
