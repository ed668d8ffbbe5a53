"""One fold on two processes (DDP over gloo, launched by the real torchrun) trains what one process
trains: the same samples in the same global batches, the same losses, the same final model."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from brats_lab import DataError, tracking
from brats_lab.data.dataset import EpochSampler
from brats_lab.training.distributed import RankBatches, check_batches
from brats_lab.training.trainer import CHECKPOINT, EXPERIMENT, FINAL_MODEL
from conftest import TINY_NETWORK, free_port

# Pipeline B's InstanceNorm (per sample: no batch statistics to synchronise) with Ranger (and
# Lookahead every 2 steps) for 4 epochs, then an SWA phase (Adam, a snapshot every 2 epochs, the
# average on rank 0's unwrapped model): 12 epochs of one global batch of 2, one case per process.
# The learning rates are raised so that 12 steps learn enough for non-zero Dice to compare.
# float32: under bf16 autocast each process rounds its own case's weight gradients to bf16 where
# one process rounds the batch's sum, and the runs drift much further apart (measured: 0.13
# relative L2 in the weights after these 12 steps, 5e-3 in a training loss; one process run
# twice in bf16 is bitwise the same).
SETTINGS = [
    *TINY_NETWORK,
    "train.val_every=4",
    "train.amp=off", "optim.name=ranger", "optim.lr=3e-2", "optim.lookahead_k=2", "train.epochs=4",
    "train.swa.enabled=true", "train.swa.cycles=1", "train.swa.cycle_epochs=8", "train.swa.anneal_epochs=8",
    "train.swa.snapshot_every=2", "train.swa.lr=3e-2",
]
EPOCHS = 12

# Why not bitwise: the two runs add the same float32 numbers in another order. One process sums
# the two cases' weight gradients inside each convolution's backward and the two cases' Dice sums
# in one reduction; two processes compute each case alone and add the results in an all-reduce.
# The first epochs agree to the last printed digit; the differences grow through 12 steps at a high
# learning rate, by the same amount as between one process on 1 thread and on 2 threads (measured
# on this model: weights 1.4e-4 relative L2, 1.8e-3 at most, in both comparisons). A DDP port with
# the Dice of each process's own case, as plain DDP would have it, misses by 0.24 relative L2,
# 0.2 in a weight, 0.03 in the training loss and 0.35 in a case's Dice: far outside these.
LOSS_TOLERANCE = 5e-4  # absolute, per epoch: train_loss and val_loss
WEIGHT_TOLERANCE = 2e-3  # relative L2 over the whole state dict ...
WEIGHT_MAX_TOLERANCE = 2e-2  # ... and the largest difference of any one weight
DICE_TOLERANCE = 0.02  # absolute, per case and region: a few voxels of these small tumours


@pytest.fixture(scope="module")
def dataset(phantom_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("ddp") / "phantom"  # the cache is written inside the dataset folder
    shutil.copytree(phantom_dataset, copy)
    return copy


@pytest.fixture(scope="module")
def one_process(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the reference: the same training in one process, with the same global batch."""
    folder = tmp_path_factory.mktemp("one")
    with _train(folder, dataset) as single:
        assert single.wait(timeout=300) == 0, single.stderr_tail()
    return folder


@pytest.fixture(autouse=True)
def local_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # each run's store is mlruns/ in its folder


def test_each_process_takes_its_share_of_every_global_batch():
    order = EpochSampler(7, seed=3)
    order.set_epoch(2)
    one = [batch.tolist() for batch in DataLoader(range(7), batch_size=4, sampler=order)]
    shares = [list(RankBatches(order, 4, rank, 2)) for rank in range(2)]
    assert [len(s) for s in shares] == [len(RankBatches(order, 4, 0, 2))] * 2 == [2, 2]
    # Batch k of the one-process run is share k of rank 0 followed by share k of rank 1.
    assert [a + b for a, b in zip(*shares)] == one
    assert [len(batch) for batch in shares[0]] == [2, 2] and [len(batch) for batch in shares[1]] == [2, 1]
    assert list(RankBatches(order, 4, 0, 1)) == one


def test_a_batch_the_processes_cannot_share_is_refused():
    with pytest.raises(DataError, match="batch_size=3 cannot be shared by 2 processes"):
        check_batches(10, 3, 2)
    with pytest.raises(DataError, match="7 training cases in batches of 2 leave a last batch of 1, fewer than the 2"):
        check_batches(7, 2, 2)
    check_batches(7, 4, 2)  # a last batch of 3: shares of 2 and 1
    check_batches(8, 2, 2)


def test_two_processes_train_the_same_fold_as_one(dataset, one_process, tmp_path):
    two = tmp_path / "two"
    with _train(two, dataset, processes=2) as ddp:
        assert ddp.wait(timeout=300) == 0, ddp.stderr_tail()

    # Only rank 0 logged: one arm, one fold run, the process count on it, one report.
    (run,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=two)
    assert run.status == "FINISHED" and run.tags["processes"] == "2"
    assert len(tracking.find_runs(EXPERIMENT, {"kind": "arm"}, root=two)) == 1
    assert ddp.stdout().count("mean Dice") == 1
    (reference,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=one_process)
    assert "processes" not in reference.tags
    _assert_same_training(reference, run)


def test_two_processes_killed_mid_training_resume_from_the_checkpoint(dataset, one_process, tmp_path):
    two = tmp_path / "two"
    with _train(two, dataset, processes=2) as ddp:
        # torchrun and its two workers SIGKILLed (no clean-up anywhere) once a checkpoint is written.
        deadline = time.monotonic() + 180
        while not list((two / "mlruns").rglob(CHECKPOINT)):
            assert ddp.proc.poll() is None, ddp.stderr_tail()
            assert time.monotonic() < deadline, "no checkpoint within 3 minutes"
            time.sleep(0.02)
        ddp.kill()
    (killed,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=two)
    assert killed.status == "RUNNING"
    saved_epoch = torch.load(killed.artifact_dir() / CHECKPOINT, weights_only=True)["epoch"]
    assert saved_epoch < EPOCHS - 1

    with _train(two, dataset, processes=2, resume=True) as resumed:
        assert resumed.wait(timeout=300) == 0, resumed.stderr_tail()
    (run,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=two)
    assert run.id == killed.id and run.status == "FINISHED"
    assert sorted({step for step, _ in run.metric_history("train_loss")}) == list(range(EPOCHS))
    (reference,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=one_process)
    _assert_same_training(reference, run)


def test_torchrun_with_a_batch_it_cannot_share_gives_one_clear_error(dataset, tmp_path):
    with _train(tmp_path / "two", dataset, "train.batch_size=3", processes=2) as ddp:
        assert ddp.wait(timeout=300) != 0
    assert "brats-lab: error: train.batch_size=3 cannot be shared by 2 processes" in ddp.stderr()
    assert not (tmp_path / "two" / "mlruns").exists()  # refused before any run was opened


def _assert_same_training(reference, run) -> None:
    for key, steps in (("train_loss", range(EPOCHS)), ("val_loss", range(3, EPOCHS, 4))):
        # The latest value of each epoch: a resumed run logs again the epochs after its checkpoint.
        a, b = dict(reference.metric_history(key)), dict(run.metric_history(key))
        assert list(a) == list(b) == list(steps), key
        worst = max(abs(a[step] - b[step]) for step in steps)
        print(f"{key}: largest difference over the epochs {worst:.2e}")
        assert worst <= LOSS_TOLERANCE, key

    a = torch.load(reference.artifact_dir() / FINAL_MODEL, weights_only=True)["model"]
    b = torch.load(run.artifact_dir() / FINAL_MODEL, weights_only=True)["model"]
    assert a.keys() == b.keys()
    relative = (sum(((a[k] - b[k]) ** 2).sum() for k in a) / sum((a[k] ** 2).sum() for k in a)).sqrt().item()
    largest = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"weights: relative L2 difference {relative:.2e}, largest {largest:.2e}")
    assert relative <= WEIGHT_TOLERANCE and largest <= WEIGHT_MAX_TOLERANCE

    x, y = _per_case(reference), _per_case(run)
    assert list(x["case"]) == list(y["case"])
    dice = [c for c in x.columns if c.startswith("dice_")]
    assert (x[dice] > 0).any().any(), "nothing learnt: the Dice comparison would say nothing"
    worst = (x[dice] - y[dice]).abs().max().max()
    print(f"per-case Dice: largest difference {worst:.2e}")
    assert worst <= DICE_TOLERANCE


def _per_case(run):
    import pandas as pd

    return pd.read_csv(run.artifact_dir() / "per_case_metrics.csv")


class _Training:
    """A `brats-lab train` subprocess (under torchrun for several processes), output to files."""

    def __init__(self, folder: Path, dataset: Path, extra: tuple[str, ...], processes: int, resume: bool) -> None:
        folder.mkdir(exist_ok=True)
        argv = ["train", "--pipeline", "B", "--fold", "0", "--profile", "cpu", "--data", str(dataset)]
        for item in [*SETTINGS, *extra]:
            argv += ["--set", item]
        argv += ["--resume"] if resume else []
        launcher = ["-m", "brats_lab.cli"]
        if processes > 1:
            launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *launcher]
        # One thread per process: the thread count changes the order of float32 sums.
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store: mlruns/ in `folder`
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        self.out, self.err = folder / f"stdout{processes}.txt", folder / f"stderr{processes}.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, *launcher, *argv], cwd=folder, env=env, stdout=out, stderr=err)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def stderr_tail(self) -> str:
        return self.stderr()[-3000:]

    def __enter__(self) -> _Training:
        return self

    def kill(self) -> None:
        """SIGKILL the launcher and every process under it. torchrun starts each worker in a session
        of its own, so killing torchrun's process group would leave the workers training."""
        if self.proc.poll() is not None:  # ended (and reaped: its pid may be another's by now)
            return
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.kill()  # after a failed assert, leave no training behind; after success, nothing is left


def _train(folder: Path, dataset: Path, *extra: str, processes: int = 1, resume: bool = False) -> _Training:
    return _Training(folder, dataset, extra, processes, resume)


def _descendants(pid: int) -> list[int]:
    """The processes under `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
