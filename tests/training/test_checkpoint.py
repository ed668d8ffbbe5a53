"""The checkpoint format (`training/checkpoint.py`): what a checkpoint holds and how a training
state is written into one and restored from it."""

from __future__ import annotations

import torch


def test_a_checkpoint_in_the_format_written_before_the_train_state_restores_and_is_written_again_alike(assert_same_state):
    """The checkpoint format did not change with `checkpoint.TrainState`: a checkpoint spelled as
    the trainer wrote it before (plain keys, `best` as {"loss", "epoch", "state"}) restores into a
    state, and that state's checkpoint is the same dict, tensor for tensor."""
    from brats_lab.training.checkpoint import TrainState, restore, training_state
    from brats_lab.training.optim import WeightAverage

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
    restore(state, old, torch.device("cpu"))
    assert state.epoch == 6 and state.best.loss == 0.25 and state.best.epoch == 4 and state.average.count == 2
    assert_same_state(training_state(state, {"config": {"pipeline": "A"}, "config_hash": "abc"}, torch.device("cpu")), old, "checkpoint")
