"""The weights a training leaves as its final model, rebuilt from other trainings of the same fold:
the SWA average is the mean of the weights at the snapshot epochs, and pipeline B keeps the
weights of the epoch with the lowest logged validation loss.

A training's weights after epoch k do not depend on how many epochs follow (the data order and
augmentations are seeded per epoch, the SWA learning rate depends on the epoch within the cycle
and `anneal_epochs` only, and a constant schedule on nothing), so a shorter training of the same
fold yields them. The trainings run in float64 (float64_cli.py, as the DDP tests), so the
weights compared are the same on any CPU; pipeline B's validation losses are set by the test
(float64_cli.py's BRATS_LAB_TEST_VAL_LOSSES), so its best epoch is known by construction rather
than by a trajectory that one CPU's rounding may turn another way.
Only the command line and what it writes (MLflow runs, the final model's file) are used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brats_lab import tracking
from brats_lab.training.checkpoint import Best
from brats_lab.training.optim import WeightAverage
from brats_lab.run_files import CHECKPOINT, FINAL_MODEL
from brats_lab.training.trainer import EXPERIMENT, load_final_weights

pytestmark = pytest.mark.xdist_group("final-weights")  # one worker copies the phantoms once

FLOAT64_CLI = Path(__file__).with_name("float64_cli.py")
ROOT = Path(__file__).parents[2]

# After `tiny_network`'s settings: pipeline A with one main epoch, then one SWA cycle of
# `cycle_epochs` (the lr annealing over 4).
SWA = ["train.epochs=1", "train.amp=off", "train.val_every=100", "train.swa.enabled=true",
       "train.swa.cycles=1", "train.swa.anneal_epochs=4", "train.swa.lr=1e-2"]
# Pipeline B (keep = best, validation every epoch) at a constant learning rate, so the weights keep
# moving; its validation losses are set: lowest at epoch 3 of 6, then up again. After `tiny_network`'s too.
BEST = ["train.amp=off", "train.schedule=constant", "optim.lr=3e-2", "train.val_every=1"]
VAL_LOSSES = (0.9, 0.8, 0.75, 0.5, 0.6, 0.7)
BEST_EPOCHS = len(VAL_LOSSES)


@pytest.fixture(scope="module")
def dataset(copy_phantoms, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_phantoms(tmp_path_factory.mktemp("final") / "phantom")


def _train(folder: Path, dataset: Path, pipeline: str, settings: list[str], val_losses: tuple[float, ...] = ()):
    """`brats-lab train` (in float64) of fold 0 in `folder`, with `val_losses` in place of the computed
    validation losses if given; returns its MLflow fold run."""
    folder.mkdir()
    argv = [sys.executable, str(FLOAT64_CLI), "train", "--pipeline", pipeline, "--fold", "0", "--profile", "cpu",
            "--data", str(dataset)]
    for item in settings:
        argv += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(BRATS_LAB_TEST_VAL_LOSSES=",".join(map(str, val_losses)), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=folder)
    assert run.status == "FINISHED"
    return run


def _weights(run) -> dict[str, torch.Tensor]:
    state = torch.load(run.artifact_dir() / FINAL_MODEL, weights_only=True)["model"]
    assert all(v.dtype == torch.float64 for v in state.values() if v.is_floating_point())
    return state


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


def test_the_swa_model_is_the_mean_of_the_weights_at_the_snapshot_epochs(dataset, tmp_path, tiny_network):
    # A 4-epoch cycle with a snapshot every 2 epochs averages the weights after SWA epochs 1 and 3.
    averaged = _train(tmp_path / "average", dataset, "A",
                      [*tiny_network, *SWA, "train.swa.cycle_epochs=4", "train.swa.snapshot_every=2"])
    # The same training with one snapshot at the end of a 2-epoch and of a 4-epoch cycle: its final
    # model is the weights after SWA epoch 1, resp. 3 (an average of one).
    one = _train(tmp_path / "one", dataset, "A", [*tiny_network, *SWA, "train.swa.cycle_epochs=2", "train.swa.snapshot_every=2"])
    three = _train(tmp_path / "three", dataset, "A", [*tiny_network, *SWA, "train.swa.cycle_epochs=4", "train.swa.snapshot_every=4"])
    after_1, after_3 = _weights(one), _weights(three)
    # Their one snapshot is the last epoch's weights (the checkpoint's): this pins the snapshot
    # epochs themselves, which a shift common to all three trainings would not show above.
    for run, weights in ((one, after_1), (three, after_3)):
        last = torch.load(run.artifact_dir() / CHECKPOINT, weights_only=True)["model"]
        assert _largest_difference(weights, last) <= 1e-12
    assert averaged.tags["final_model"] == "average of 2 snapshots"
    final = _weights(averaged)
    expected = {k: (after_1[k] + after_3[k]) / 2 if after_1[k].is_floating_point() else after_1[k] for k in after_1}
    moved = _largest_difference(after_1, after_3)
    print(f"weights: epoch 1 to 3 moved {moved:.2e}; the average is off by {_largest_difference(final, expected):.2e}")
    assert moved > 1e-3  # the last weights are far from the average: keeping them would show
    # float64 trainings of one fold in one configuration: the same numbers in the same order.
    assert _largest_difference(final, expected) <= 1e-12


def test_pipeline_b_keeps_the_weights_of_the_lowest_validation_loss(dataset, tmp_path, tiny_network):
    kept = _train(tmp_path / "best", dataset, "B", [*tiny_network, *BEST, f"train.epochs={BEST_EPOCHS}"], VAL_LOSSES)
    losses = dict(kept.metric_history("val_loss"))
    assert [losses[e] for e in sorted(losses)] == list(VAL_LOSSES)  # logged as the trainer saw them
    best = VAL_LOSSES.index(min(VAL_LOSSES))
    assert kept.tags["final_model"] == f"best validation loss (epoch {best})"
    # The same training stopped after the best epoch, keeping its last weights.
    last = _train(tmp_path / "last", dataset, "B", [*tiny_network, *BEST, f"train.epochs={best + 1}", "train.keep=last"])
    assert last.tags["final_model"] == "last epoch"
    kept_weights, last_weights = _weights(kept), _weights(last)
    assert _largest_difference(kept_weights, last_weights) <= 1e-12
    # ...and the last epochs moved the weights: keeping the last ones instead would show.
    longer = _train(tmp_path / "longer", dataset, "B", [*tiny_network, *BEST, f"train.epochs={BEST_EPOCHS}", "train.keep=last"])
    assert _largest_difference(_weights(longer), last_weights) > 1e-3


# --- the rule alone, on a two-parameter model whose weights are set by hand (no training) ---------


def _model(weight: float) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.fill_(-weight)
    return model


def _state(weight: float) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _model(weight).state_dict().items()}


def _weight(model: torch.nn.Module) -> tuple[float, float]:
    return model.weight.item(), model.bias.item()


NO_BEST = Best()  # before any validation: loss inf, epoch -1, no weights


@pytest.mark.parametrize("keep", ["best", "last"])
def test_snapshots_win_over_best_and_last_and_their_mean_is_loaded(keep):
    average = WeightAverage()
    for w in (1.0, 2.0, 6.0):
        average.update(_state(w))
    model = _model(10.0)  # the last epoch's weights
    said = load_final_weights(model, average, Best(loss=0.1, epoch=4, weights=_state(7.0)), keep)
    assert said == "average of 3 snapshots"
    assert _weight(model) == (3.0, -3.0)  # (1 + 2 + 6) / 3


def test_without_snapshots_keep_best_loads_the_best_weights_and_names_their_epoch():
    model = _model(10.0)
    said = load_final_weights(model, WeightAverage(), Best(loss=0.2, epoch=3, weights=_state(7.0)), "best")
    assert said == "best validation loss (epoch 3)"
    assert _weight(model) == (7.0, -7.0)


@pytest.mark.parametrize(("keep", "best"), [("last", Best(loss=0.2, epoch=3, weights=_state(7.0))), ("best", NO_BEST)])
def test_otherwise_the_last_weights_stay(keep, best):
    """keep = last; or keep = best before any validation (no best weights to load)."""
    model = _model(10.0)
    assert load_final_weights(model, WeightAverage(), best, keep) == "last epoch"
    assert _weight(model) == (10.0, -10.0)
