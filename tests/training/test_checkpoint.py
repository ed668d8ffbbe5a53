"""The checkpoint format in the test process (the trainings that write and resume checkpoints run
in subprocesses, in test_faults.py and test_trainer.py): where the files go, what a resumable
state and a model file hold, an atomic write that fails half-way, and every file `load` refuses."""

from __future__ import annotations

import errno
import io
import os
import re
import resource
import signal
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brats_lab import DataError
from brats_lab.config import config_hash, load_config, pipeline_path, to_dict
from brats_lab.training import checkpoint
from brats_lab.training.checkpoint import CHECKPOINT_KEYS, MODEL_KEYS, Best, TrainState
from brats_lab.training.optim import WeightAverage

CPU = torch.device("cpu")


def whole(message: str) -> str:
    """A `match` pattern for exactly this message."""
    return f"^{re.escape(message)}$"


def run(artifacts: Path | None, run_id: str = "r123") -> SimpleNamespace:
    """What `workdir` reads of a tracking run: its local artifact folder (None: a remote store) and id."""
    return SimpleNamespace(id=run_id, artifact_dir=lambda: artifacts)


def test_a_runs_files_are_in_its_artifact_folder_or_under_the_project_root(tmp_path: Path, monkeypatch) -> None:
    local = tmp_path / "mlruns" / "1" / "r123" / "artifacts"
    assert checkpoint.workdir(run(local)) == local
    assert checkpoint.checkpoint_path(run(local), tmp_path / "elsewhere") == local / "checkpoints" / "last.pt"
    remote = run(None, "abc")  # a server's artifact store: a folder of this machine
    assert checkpoint.workdir(remote, tmp_path) == tmp_path / "mlruns" / "checkpoints" / "abc"
    assert checkpoint.checkpoint_path(remote, tmp_path) == tmp_path / "mlruns" / "checkpoints" / "abc" / "checkpoints" / "last.pt"
    monkeypatch.chdir(tmp_path / "..")
    assert checkpoint.workdir(remote) == Path.cwd() / "mlruns" / "checkpoints" / "abc"
    assert checkpoint.checkpoint_path(remote) == Path.cwd() / "mlruns" / "checkpoints" / "abc" / "checkpoints" / "last.pt"


class Average:
    """What `training_state` and `restore` use of `optim.WeightAverage`."""

    def __init__(self, count: int = 3) -> None:
        self.count = count

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, saved: dict) -> None:
        self.count = saved["count"]


def _state(average_count: int = 3, scale: float = 2.0**10, **kwargs) -> TrainState:
    """A training state of a tiny model with an SGD optimizer with momentum and a loss scaler."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return TrainState(model, optimizer, torch.amp.GradScaler("cpu", init_scale=scale), Average(average_count), **kwargs)


def test_a_resumable_state_and_a_model_file_hold_what_they_are_read_for(tmp_path: Path) -> None:
    cfg = load_config(pipeline_path("B"), "cpu", [])
    best = Best(0.5, 2, {"w": torch.zeros(1)})
    train = _state(best=best, epoch=4)
    train.model(torch.ones(1, 2)).sum().backward()
    train.optimizer.step()
    torch.manual_seed(11)
    state = checkpoint.training_state(train, checkpoint.config_entries(cfg), CPU)
    assert set(state) == {*CHECKPOINT_KEYS, "config"}
    assert state["epoch"] == 4 and state["best"] == {"loss": 0.5, "epoch": 2, "state": best.weights}
    assert state["average"] == {"count": 3} and state["scaler"] == train.scaler.state_dict()
    assert state["optimizer"]["state"][0]["momentum_buffer"].shape == (1, 2)
    assert all(torch.equal(state["model"][k], v) for k, v in train.model.state_dict().items())
    assert state["config"] == to_dict(cfg) and state["config_hash"] == config_hash(cfg)
    assert state["rng"]["cuda"] is None
    expected = torch.rand(5)  # what the RNG draws next from the saved state

    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save(path, state)
    loaded = checkpoint.load(path, CHECKPOINT_KEYS)
    assert loaded["epoch"] == 4 and loaded["config_hash"] == config_hash(cfg)
    torch.manual_seed(0)
    resumed = _state(average_count=0, scale=2.0)
    checkpoint.restore(resumed, loaded, CPU)
    assert torch.equal(torch.rand(5), expected)
    assert resumed.epoch == 4 and resumed.average.count == 3 and resumed.scaler.state_dict() == train.scaler.state_dict()
    assert (resumed.best.loss, resumed.best.epoch) == (0.5, 2) and torch.equal(resumed.best.weights["w"], best.weights["w"])
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in train.model.state_dict().items())
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["momentum_buffer"], train.optimizer.state_dict()["state"][0]["momentum_buffer"])

    model = train.model
    final = checkpoint.model_state(model, cfg, 3)
    assert set(final) == {*MODEL_KEYS, "config_hash", "fold"}
    assert final["fold"] == 3 and final["config"] == to_dict(cfg) and final["config_hash"] == config_hash(cfg)
    assert all(torch.equal(final["model"][k], v) for k, v in model.state_dict().items())
    checkpoint.save(tmp_path / "model" / "model.pt", final)
    assert checkpoint.load(tmp_path / "model" / "model.pt", MODEL_KEYS)["fold"] == 3
    with pytest.raises(DataError, match="no epoch, optimizer"):  # a model file is not a checkpoint
        checkpoint.load(tmp_path / "model" / "model.pt", CHECKPOINT_KEYS)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_restoring_on_the_cpu_leaves_the_cuda_generator_alone(monkeypatch) -> None:
    """A checkpoint written on a GPU carries a CUDA RNG state; resumed on the CPU, it is not set."""
    set_states = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: set_states.append(state))
    torch.manual_seed(5)
    saved = checkpoint.training_state(_state(), {}, CPU)
    saved["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    expected = torch.rand(3)
    checkpoint.restore(_state(), saved, CPU)
    assert torch.equal(torch.rand(3), expected) and set_states == []
    checkpoint.restore(_state(), saved, torch.device("cuda"))  # on a GPU it is (the call is all that is checked)
    assert len(set_states) == 1 and set_states[0] is saved["rng"]["cuda"]
    checkpoint.restore(_state(), {**saved, "rng": {"torch": saved["rng"]["torch"], "cuda": None}}, torch.device("cuda"))
    assert len(set_states) == 1  # a CPU checkpoint resumed on a GPU: nothing to set


def test_a_state_saved_on_a_gpu_keeps_its_cuda_generator_too(monkeypatch) -> None:
    cuda_state = torch.arange(16, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: cuda_state)  # only the call is checked
    assert checkpoint.training_state(_state(), {}, torch.device("cuda"))["rng"]["cuda"] is cuda_state
    assert checkpoint.training_state(_state(), {}, CPU)["rng"]["cuda"] is None


def on_a_gpu(path: Path) -> None:
    """Rewrite a file saved by torch.save as if its tensors had been on cuda:0 when it was saved."""
    saved = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as moved:
        for info in saved.infolist():
            data = saved.read(info)
            if info.filename.endswith("/data.pkl"):  # each storage's location, a pickled string
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            moved.writestr(info.filename, data)
    path.write_bytes(out.getvalue())


def test_a_checkpoint_written_on_a_gpu_loads_on_the_cpu(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 3, "model": {"w": torch.arange(3.0)}})
    on_a_gpu(path)
    if not torch.cuda.is_available():  # the file does hold CUDA tensors: torch alone refuses it here
        with pytest.raises(RuntimeError, match="on a CUDA device"):
            torch.load(path, weights_only=True)
    weights = checkpoint.load(path, ("epoch", "model"))["model"]["w"]
    assert weights.device == CPU and torch.equal(weights, torch.arange(3.0))


def test_a_write_that_fails_half_way_keeps_the_previous_file_and_names_it(tmp_path: Path) -> None:
    """A file size limit (as a full disk) stops the write in torch's writer, which raises a
    RuntimeError over the OSError: the error is the OSError's, one line naming the file."""
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1})
    before = path.read_bytes()
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError, match=whole(f"{path}: could not write (File too large)")) as raised:
            checkpoint.save(path, {"epoch": 2, "model": torch.zeros(10_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert raised.value.errno == errno.EFBIG
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_write_refused_by_the_file_system_names_the_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "last.pt"  # its folder is a file
    with pytest.raises(OSError, match=f"^{re.escape(str(path))}: could not write \\((File exists|Not a directory)\\)$"):
        checkpoint.save(path, {"epoch": 1})

    def fsync_fails(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync_fails)  # an OSError of Python's own, not under torch's RuntimeError
    with pytest.raises(OSError, match=whole(f"{tmp_path / 'last.pt'}: could not write (Input/output error)")):
        checkpoint.save(tmp_path / "last.pt", {"epoch": 1})
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_an_error_of_torch_that_is_not_a_write_error_is_raised_as_it_is(tmp_path: Path) -> None:
    class NotSaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match=whole("cannot pickle this")):
        checkpoint.save(tmp_path / "last.pt", {"epoch": 1, "thing": NotSaveable()})
    assert list(tmp_path.iterdir()) == []


class _RunsCode:
    """Unpickled by a loader that allows arbitrary objects, this creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_load_refuses_what_is_not_a_checkpoint_with_one_line_naming_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    checkpoint.save(good, {"epoch": 0, "model": {"w": torch.ones(300)}})
    path = tmp_path / "bad.pt"

    refused = f"^{re.escape(str(path))}: not a brats-lab checkpoint, refused by the loader that unpickles only tensors and plain data "
    # In parentheses, the line of torch's message that says what it does not unpickle (its words vary between versions).
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match=refused + r"\(Unsupported operand \d+\)$"):
        checkpoint.load(path, ("epoch",))
    marker = tmp_path / "marker"
    torch.save({"epoch": 0, "model": _RunsCode(marker)}, path)
    with pytest.raises(DataError, match=refused + r"\(WeightsUnpickler error: Unsupported global: GLOBAL io.open [^\n]*\)$"):
        checkpoint.load(path, ("epoch",))
    assert not marker.exists()

    path.write_bytes(b"\x80\x02]K\x01K\x02s.")  # a pickle that stores an item into a list: refused, not "unsupported"
    with pytest.raises(DataError, match=refused + r"\(not tensors and plain data\)$"):
        checkpoint.load(path, ("epoch",))

    # Other errors: their type and the first sentence of their first line.
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: unreadable checkpoint, cut short or not a checkpoint "
                                        r"\(RuntimeError: [^.\n]+\)$"):
        checkpoint.load(path, ("epoch",))
    with pytest.raises(DataError, match=whole(f"{tmp_path / 'missing.pt'}: unreadable checkpoint, cut short or not a "
                                              "checkpoint (FileNotFoundError: [Errno 2] No such file or directory: "
                                              f"'{tmp_path / 'missing.pt'}')")):
        checkpoint.load(tmp_path / "missing.pt", ("epoch",))
    path.write_bytes(b"")  # an error without a message: its type alone
    with pytest.raises(DataError, match=whole(f"{path}: unreadable checkpoint, cut short or not a checkpoint (EOFError)")):
        checkpoint.load(path, ("epoch",))

    torch.save([1, 2], path)
    with pytest.raises(DataError, match=whole(f"{path}: not a brats-lab checkpoint (no dict in it)")):
        checkpoint.load(path, ("epoch",))
    torch.save({"epoch": 1, "config": {}}, path)
    with pytest.raises(DataError, match=whole(f"{path}: not a brats-lab checkpoint (no model, optimizer in it)")):
        checkpoint.load(path, ("epoch", "model", "config", "optimizer"))
    assert checkpoint.load(path, ("epoch",)) == {"epoch": 1, "config": {}}
    assert checkpoint.load(good, ())["epoch"] == 0
    assert torch.equal(checkpoint.load(good, ("model",))["model"]["w"], torch.ones(300))


def test_a_checkpoint_in_the_format_written_before_the_train_state_restores_and_is_written_again_alike(assert_same_state):
    """The checkpoint format did not change with `checkpoint.TrainState`: a checkpoint spelled as
    the trainer wrote it before (plain keys, `best` as {"loss", "epoch", "state"}) restores into a
    state, and that state's checkpoint is the same dict, tensor for tensor."""
    def fresh() -> TrainState:
        model = torch.nn.Linear(3, 2)
        return TrainState(model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.amp.GradScaler("cpu", enabled=False),
                          WeightAverage())

    torch.manual_seed(3)
    trained = fresh()
    for _ in range(2):  # an optimizer with moments, an average with two snapshots
        trained.model(torch.randn(4, 3)).square().mean().backward()
        trained.optimizer.step()
        trained.average.update(trained.model.state_dict())
    best = {k: v.clone() + 1 for k, v in trained.model.state_dict().items()}
    old = {
        "epoch": 6, "model": trained.model.state_dict(), "optimizer": trained.optimizer.state_dict(),
        "scaler": trained.scaler.state_dict(), "average": trained.average.state_dict(),
        "best": {"loss": 0.25, "epoch": 4, "state": best},
        "rng": {"torch": torch.get_rng_state(), "cuda": None}, "config": {"pipeline": "A"}, "config_hash": "abc",
    }
    state = fresh()
    checkpoint.restore(state, old, torch.device("cpu"))
    assert state.epoch == 6 and state.best.loss == 0.25 and state.best.epoch == 4 and state.average.count == 2
    assert_same_state(checkpoint.training_state(state, {"config": {"pipeline": "A"}, "config_hash": "abc"}, torch.device("cpu")), old, "checkpoint")
