"""One fold on two processes (DDP over gloo, launched by the real torchrun) trains what one process
trains: the same samples in the same global batches, the same losses, the same final model."""

from __future__ import annotations

import os
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
from brats_lab.run_files import CHECKPOINT, FINAL_MODEL
from brats_lab.training.trainer import EXPERIMENT

# One xdist worker runs them all: the one-process reference is trained once, and each two-process
# training already keeps both cores busy.
pytestmark = pytest.mark.xdist_group("ddp")

FLOAT64_CLI = Path(__file__).with_name("float64_cli.py")
ROOT = Path(__file__).parents[2]  # the repository, for `import brats_lab` from the script

# Pipeline B's InstanceNorm (per sample: no batch statistics to synchronise) with Ranger (and
# Lookahead every 2 steps) for 4 epochs, then an SWA phase (Adam, a snapshot every 2 epochs, the
# average on rank 0's unwrapped model): 12 epochs of one global batch of 2, one case per process.
# The learning rates are raised so that 12 steps learn enough for non-zero Dice to compare; the
# whole-volume validation pads to 16 (not the configs' 8): after 12 steps this network's outputs
# sit near the threshold, and in float64 (the same on every CPU) only the padding of 16 puts some
# voxels above it on these phantoms. Whether 12 steps get there depends on the run's seed: with
# train.seed 0, fold 0 (run seed TrainConfig.run_seed) reaches Dice 0.35 to 0.57; pipeline B's own
# 16111990 learnt nothing above the threshold (measured for train.seed 0 to 5: 2 of 6 nothing).
# After `tiny_network`'s settings:
SETTINGS = [
    "train.seed=0",
    "train.val_every=4", "data.pad_multiple=16",
    "train.amp=off", "optim.name=ranger", "optim.lr=3e-2", "optim.lookahead_k=2", "train.epochs=4",
    "train.swa.enabled=true", "train.swa.cycles=1", "train.swa.cycle_epochs=8", "train.swa.anneal_epochs=8",
    "train.swa.snapshot_every=2", "train.swa.lr=3e-2",
]
EPOCHS = 12

# Every training here runs in float64 (tests/training/float64_cli.py), so the tolerances do not
# depend on the CPU. The two runs add the same numbers in another order (one process sums the two
# cases inside each convolution's backward and the Dice's sums; two processes add per-case results
# in gloo's all-reduce), and every CPU rounds each float64 operation to within 1.1e-16 relative
# (IEEE 754; a vendor's kernels change only the order and grouping of the sums). In float32 the
# same reordering, 1e-7 at the start, grew through these 12 steps to 5e-4 in a loss on one CPU and
# 2.4e-3 on another (an AMD EPYC): an amplification of about 2e4. In float64, measured here (Intel,
# AVX-512): losses 9e-16, weights 1.3e-14 relative L2 and 1.7e-13 at most, Dice identical. The
# tolerances below sit 1e5 above those, and still 400x above 1.1e-16 amplified 2e4 times, the
# worst seen in float32. A wrong sharing of the gradients (test_a_wrong_gradient_sharing_is_caught)
# moves the training losses by 0.02 to 0.04 and the weights by 0.1 to 0.55 relative L2: 7 orders
# of magnitude above the tolerances, on any CPU.
LOSS_TOLERANCE = 1e-9  # absolute, per epoch: train_loss and val_loss
WEIGHT_TOLERANCE = 1e-9  # relative L2 over the whole state dict ...
WEIGHT_MAX_TOLERANCE = 1e-8  # ... and the largest difference of any one weight
DICE_TOLERANCE = 1e-9  # absolute, per case and region: the same voxels


@pytest.fixture(scope="module")
def dataset(copy_phantoms, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_phantoms(tmp_path_factory.mktemp("ddp") / "phantom")


@pytest.fixture(scope="module")
def train(tiny_network, free_port):
    """The function `train(folder, dataset, *extra, processes=1, resume=False, fault="")`: a
    `brats-lab train` of fold 0 with `tiny_network`'s settings, SETTINGS and `extra`, started."""

    def start(folder: Path, dataset: Path, *extra: str, processes: int = 1, resume: bool = False, fault: str = "") -> _Training:
        port = free_port() if processes > 1 else None
        return _Training(folder, dataset, (*tiny_network, *SETTINGS, *extra), processes, resume, fault, port)

    return start


@pytest.fixture(scope="module")
def one_process(dataset: Path, train, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the reference: the same training in one process, with the same global batch."""
    folder = tmp_path_factory.mktemp("one")
    with train(folder, dataset) as single:
        assert single.wait(timeout=300) == 0, single.stderr_tail()
    return folder


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


def test_two_processes_train_the_same_fold_as_one(dataset, one_process, tmp_path, train):
    two = tmp_path / "two"
    with train(two, dataset, processes=2) as ddp:
        assert ddp.wait(timeout=300) == 0, ddp.stderr_tail()

    # Only rank 0 logged: one arm, one fold run, the process count on it, one report.
    (run,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=two)
    assert run.status == "FINISHED" and run.tags["processes"] == "2"
    assert len(tracking.find_runs(EXPERIMENT, {"kind": "arm"}, root=two)) == 1
    assert ddp.stdout().count("mean Dice") == 1
    (reference,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=one_process)
    assert "processes" not in reference.tags
    _assert_same_training(reference, run)


def test_two_processes_killed_mid_training_resume_from_the_checkpoint(dataset, one_process, tmp_path, train):
    two = tmp_path / "two"
    with train(two, dataset, processes=2) as ddp:
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

    with train(two, dataset, processes=2, resume=True) as resumed:
        assert resumed.wait(timeout=300) == 0, resumed.stderr_tail()
    (run,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=two)
    assert run.id == killed.id and run.status == "FINISHED"
    assert sorted({step for step, _ in run.metric_history("train_loss")}) == list(range(EPOCHS))
    (reference,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=one_process)
    _assert_same_training(reference, run)


def test_torchrun_with_a_batch_it_cannot_share_gives_one_clear_error(dataset, tmp_path, train):
    with train(tmp_path / "two", dataset, "train.batch_size=3", processes=2) as ddp:
        assert ddp.wait(timeout=300) != 0
    assert "brats-lab: error: train.batch_size=3 cannot be shared by 2 processes" in ddp.stderr()
    assert not (tmp_path / "two" / "mlruns").exists()  # refused before any run was opened


@pytest.mark.parametrize("fault", ["not_shared", "summed", "dice_not_shared"])
def test_a_wrong_gradient_sharing_is_caught(dataset, one_process, tmp_path, fault, train):
    """The equivalence check is not vacuous: the same two-process training with the sharing broken
    on purpose (float64_cli.py: gradients not all-reduced, summed instead of averaged, or each
    process's loss the Dice of its own case) lies far outside every tolerance."""
    two = tmp_path / "two"
    with train(two, dataset, processes=2, fault=fault) as ddp:
        assert ddp.wait(timeout=300) == 0, ddp.stderr_tail()
    (run,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=two)
    (reference,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=one_process)
    found = _differences(reference, run)
    # Measured: train_loss 0.022-0.036, weights 0.12-0.55 relative L2 and 0.14-0.21 at most.
    assert found["train_loss"] > 1000 * LOSS_TOLERANCE, found
    assert found["relative"] > 1000 * WEIGHT_TOLERANCE and found["largest"] > 1000 * WEIGHT_MAX_TOLERANCE, found


def _differences(reference, run) -> dict[str, float]:
    """The largest differences between two trainings of the same fold: per-epoch losses, final
    weights (relative L2 and largest), per-case Dice of the final model."""
    found = {}
    for key, steps in (("train_loss", range(EPOCHS)), ("val_loss", range(3, EPOCHS, 4))):
        # The latest value of each epoch: a resumed run logs again the epochs after its checkpoint.
        a, b = dict(reference.metric_history(key)), dict(run.metric_history(key))
        assert list(a) == list(b) == list(steps), key
        found[key] = max(abs(a[step] - b[step]) for step in steps)

    a = torch.load(reference.artifact_dir() / FINAL_MODEL, weights_only=True)["model"]
    b = torch.load(run.artifact_dir() / FINAL_MODEL, weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(a[k].dtype == torch.float64 for k in a if a[k].is_floating_point())  # the float64 program ran
    found["relative"] = (sum(((a[k] - b[k]) ** 2).sum() for k in a) / sum((a[k] ** 2).sum() for k in a)).sqrt().item()
    found["largest"] = max((a[k] - b[k]).abs().max().item() for k in a)

    x, y = _per_case(reference), _per_case(run)
    assert list(x["case"]) == list(y["case"])
    dice = [c for c in x.columns if c.startswith("dice_")]
    assert (x[dice] > 0).any().any(), "nothing learnt: the Dice comparison would say nothing"
    found["dice"] = (x[dice] - y[dice]).abs().max().max()
    print(", ".join(f"{k}: {v:.2e}" for k, v in found.items()))
    return found


def _assert_same_training(reference, run) -> None:
    found = _differences(reference, run)
    assert found["train_loss"] <= LOSS_TOLERANCE and found["val_loss"] <= LOSS_TOLERANCE, found
    assert found["relative"] <= WEIGHT_TOLERANCE and found["largest"] <= WEIGHT_MAX_TOLERANCE, found
    assert found["dice"] <= DICE_TOLERANCE, found


def _per_case(run):
    import pandas as pd

    return pd.read_csv(run.artifact_dir() / "per_case_metrics.csv")


class _Training:
    """A `brats-lab train` subprocess (under torchrun for several processes), output to files."""

    def __init__(self, folder: Path, dataset: Path, settings: tuple[str, ...], processes: int, resume: bool, fault: str,
                 port: int | None) -> None:
        folder.mkdir(exist_ok=True)
        argv = ["train", "--pipeline", "B", "--fold", "0", "--profile", "cpu", "--data", str(dataset)]
        for item in settings:
            argv += ["--set", item]
        argv += ["--resume"] if resume else []
        launcher = [str(FLOAT64_CLI)]  # `brats-lab` in float64 (module docstring of float64_cli.py)
        if processes > 1:
            launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                        "--master_addr", "127.0.0.1", "--master_port", str(port), *launcher]
        # One thread per process: two processes on the cores of a small machine.
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store: mlruns/ in `folder`
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", BRATS_LAB_TEST_FAULT=fault)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # the script's own folder would replace the cwd
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
