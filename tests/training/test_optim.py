"""Ranger, the optimizer factory, the schedules and the weight averaging."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from brats_lab.config import ExperimentConfig, OptimConfig, SwaConfig, TrainConfig
from brats_lab.training.optim import (
    Ranger,
    WeightAverage,
    average_weights,
    build_optimizer,
    build_swa_optimizer,
    centralize_gradient,
    is_swa_cycle_start,
    lr_at,
    main_lr,
    set_lr,
    swa_lr,
    swa_snapshot_epochs,
    total_epochs,
)

# --- Ranger ----------------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(2, 2, 4, 4, 4, generator=g), torch.randn(2, 3, generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_ranger_minimizes_a_quadratic() -> None:
    target = torch.tensor([3.0, -2.0, 0.5, 10.0])
    x = nn.Parameter(torch.zeros(4))
    opt = Ranger([x], lr=0.3)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = ((x - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]


def test_ranger_trains_a_small_network() -> None:
    model = _net()
    opt = Ranger(model.parameters(), lr=1e-2)
    x, y = _batch(0)
    before = nn.functional.mse_loss(model(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert nn.functional.mse_loss(model(x), y).item() < 0.5 * before


def test_state_dict_round_trip_is_bit_exact() -> None:
    # 5 + 5 steps with k=6: the resumed run syncs Lookahead (step 6) from slow weights saved at
    # step 1, and RAdam's rectification switches on at step 6 (betas 0.95/0.999).
    cfg = OptimConfig()
    straight = _net()
    opt = build_optimizer(straight.parameters(), cfg)
    _train(straight, opt, range(5))

    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all("slow" in s and "exp_avg" in s for s in saved["optim"]["state"].values())
    assert saved["optim"]["param_groups"][0]["lookahead_step"] == 5

    _train(straight, opt, range(5, 10))  # uninterrupted

    resumed = _net()
    with torch.no_grad():  # other weights first: loading must restore them all
        for p in resumed.parameters():
            p.add_(1.0)
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed.parameters(), cfg)
    opt2.load_state_dict(saved["optim"])
    _train(resumed, opt2, range(5, 10))

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["slow"], b["slow"]) and torch.equal(a["step"], b["step"])


def test_lookahead_with_alpha_one_is_radam() -> None:
    a, b = _net(), _net()
    _train(a, Ranger(a.parameters(), lr=1e-3, k=1, alpha=1.0, grad_centralization=False), range(8))
    _train(b, torch.optim.RAdam(b.parameters(), lr=1e-3, betas=(0.95, 0.999), eps=1e-5), range(8))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_lookahead_interpolates_every_k_steps() -> None:
    a, b = _net(), _net()
    start = [p.detach().clone() for p in b.parameters()]
    _train(a, Ranger(a.parameters(), lr=1e-2, k=2, alpha=0.5, grad_centralization=False), range(2))
    _train(b, torch.optim.RAdam(b.parameters(), lr=1e-2, betas=(0.95, 0.999), eps=1e-5), range(2))
    for p, q, w0 in zip(a.parameters(), b.parameters(), start):
        torch.testing.assert_close(p, w0 + 0.5 * (q - w0), rtol=0, atol=1e-7)
        assert not torch.equal(p, q)


def test_gradient_centralization() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, 3, 3, 3, generator=g) + 5.0  # a conv weight's gradient, biased
    centralize_gradient(weight)
    assert weight.mean(dim=(1, 2, 3, 4)).abs().max() < 1e-5  # zero mean over each filter's fan-in
    assert weight.abs().sum() > 0
    bias = torch.randn(8, generator=g) + 5.0
    assert torch.equal(centralize_gradient(bias.clone()), bias)  # 1-D: untouched

    model = _net()
    opt = Ranger(model.parameters(), lr=1e-3)
    _train(model, opt, range(1))  # Ranger centralizes the gradients in place before its step
    conv, linear = model[0].weight.grad, model[4].weight.grad
    assert conv.mean(dim=(1, 2, 3, 4)).abs().max() < 1e-6
    assert linear.mean(dim=1).abs().max() < 1e-6
    assert model[0].bias.grad.abs().sum() > 0


def test_ranger_rejects_bad_lookahead() -> None:
    with pytest.raises(ValueError, match=r"^Lookahead k must be >= 1, got 0$"):
        Ranger([nn.Parameter(torch.zeros(1))], k=0)
    with pytest.raises(ValueError, match=r"^Lookahead alpha must be in \(0, 1\], got 0.0$"):
        Ranger([nn.Parameter(torch.zeros(1))], alpha=0.0)
    with pytest.raises(ValueError, match=r"got 1.5$"):  # alpha above 1 would overshoot the fast weights
        Ranger([nn.Parameter(torch.zeros(1))], alpha=1.5)


def test_ranger_defaults_are_lessw2020s() -> None:
    # lessw2020's Ranger (seed_code.md, "Optimizer"): lr 1e-3, Lookahead k=6 and alpha 0.5, betas
    # (0.95, 0.999), eps 1e-5, no weight decay, gradient centralization on.
    group = Ranger([nn.Parameter(torch.zeros(1))]).param_groups[0]
    assert {key: group[key] for key in ("lr", "lookahead_k", "lookahead_alpha", "betas", "eps", "weight_decay",
                                        "grad_centralization", "lookahead_step")} == {
        "lr": 1e-3, "lookahead_k": 6, "lookahead_alpha": 0.5, "betas": (0.95, 0.999), "eps": 1e-5, "weight_decay": 0.0,
        "grad_centralization": True, "lookahead_step": 0}


def test_ranger_passes_weight_decay_and_foreach_to_radam() -> None:
    # With k=1, alpha=1 and no centralization Ranger is RAdam: so with weight decay too, step for
    # step, when both take the same (single-tensor, foreach=False) code path.
    a, b = _net(), _net()
    ranger = Ranger(a.parameters(), lr=1e-2, weight_decay=0.1, k=1, alpha=1.0, grad_centralization=False, foreach=False)
    assert ranger.param_groups[0]["foreach"] is False
    _train(a, ranger, range(3))
    _train(b, torch.optim.RAdam(b.parameters(), lr=1e-2, betas=(0.95, 0.999), eps=1e-5, weight_decay=0.1, foreach=False), range(3))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c = _net()
    _train(c, Ranger(c.parameters(), lr=1e-2, k=1, alpha=1.0, grad_centralization=False), range(3))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))  # the decay did something


def test_build_optimizer() -> None:
    params = list(_net().parameters())
    ranger = build_optimizer(params, OptimConfig())
    assert isinstance(ranger, Ranger)
    group = ranger.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["lookahead_k"], group["lookahead_alpha"]) == (
        1e-4,
        (0.95, 0.999),
        1e-5,
        6,
        0.5,
    )
    adam = build_optimizer(params, OptimConfig(name="adam", betas=(0.9, 0.999), eps=1e-4))
    assert type(adam) is torch.optim.Adam
    assert (adam.param_groups[0]["betas"], adam.param_groups[0]["eps"]) == ((0.9, 0.999), 1e-4)
    swa = build_swa_optimizer(params, SwaConfig())
    assert swa.param_groups[0]["lr"] == 5e-5 and swa.param_groups[0]["weight_decay"] == 0.0
    set_lr(swa, 1e-3)
    assert swa.param_groups[0]["lr"] == 1e-3


def test_build_optimizer_uses_every_setting_of_the_config() -> None:
    # Values unlike both Ranger's and Adam's defaults, so a setting dropped on the way shows.
    params = list(_net().parameters())
    want = {"lr": 3e-4, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.01, "lookahead_k": 3, "lookahead_alpha": 0.8,
            "grad_centralization": False}
    group = build_optimizer(params, OptimConfig(**want)).param_groups[0]
    assert {k: group[k] for k in want} == want  # False, not None: == tells them apart
    adam_cfg = OptimConfig(name="adam", lr=3e-4, betas=(0.85, 0.99), eps=1e-4, weight_decay=0.01)
    group = build_optimizer(params, adam_cfg, fused=False).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"], group["fused"]) == (3e-4, (0.85, 0.99), 1e-4, 0.01, False)
    assert build_swa_optimizer(params, SwaConfig(), fused=False).param_groups[0]["fused"] is False
    with pytest.raises(ValueError, match=r"^unknown optimizer 'sgd'; expected 'ranger' or 'adam'$"):
        build_optimizer(params, OptimConfig(name="sgd"))  # type: ignore[arg-type]


# --- schedules -------------------------------------------------------------------------------


def _torch_cosine_lrs(epochs: int, lr: float, t_max: int, steps_after) -> list[float]:
    """The lr of each epoch from torch's CosineAnnealingLR(T_max = t_max), stepped at the end of
    every epoch for which `steps_after(epoch)` holds."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, t_max)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        if steps_after(epoch):
            optimizer.step()  # no gradient, no update: only so that torch does not warn about the order
            scheduler.step()
    return lrs


@pytest.mark.parametrize("epochs", [8, 40, 200])  # the CPU demo's, the cpu profile's, the paper's
def test_pipeline_a_schedule_is_the_authors_loop(epochs: int) -> None:
    """The authors' Ranger loop (src/train.py): CosineAnnealingLR(T_max = round(epochs * 0.5)),
    stepped at the end of each epoch with `epoch / epochs > 0.5`."""
    train = TrainConfig(epochs=epochs)  # decay_start 0.5
    authors = _torch_cosine_lrs(epochs, 1e-4, round(epochs * 0.5), lambda e: e / epochs > 0.5)
    assert [main_lr(e, train, 1e-4) for e in range(epochs)] == pytest.approx(authors, rel=1e-9, abs=1e-16)


def test_pipeline_a_schedule_at_the_boundary_epochs() -> None:
    train = TrainConfig()  # 200 epochs, decay_start 0.5
    # By hand: 1e-4 through epoch 101 (100 / 200 is not past the half; the first cosine step ends
    # epoch 101), then 1e-4 * (1 + cos(pi * (epoch - 101) / 100)) / 2.
    assert [main_lr(e, train, 1e-4) for e in (0, 99, 100, 101)] == [1e-4] * 4
    assert main_lr(102, train, 1e-4) == pytest.approx(9.997532801828658e-05, rel=1e-12)
    assert main_lr(151, train, 1e-4) == pytest.approx(5e-5, rel=1e-12)
    assert main_lr(199, train, 1e-4) == pytest.approx(9.866357858642205e-08, rel=1e-9)  # the last epoch
    with_floor = TrainConfig(min_lr=1e-6)
    assert main_lr(199, with_floor, 1e-4) == pytest.approx(1e-6 + 99e-6 * 9.866357858642205e-04, rel=1e-9)


def test_pipeline_b_schedule_is_torchs_cosine_annealing() -> None:
    # The paper's "cosine annealing": CosineAnnealingLR(T_max = epochs) stepped after every epoch.
    train = TrainConfig(epochs=400, decay_start=0.0)
    torchs = _torch_cosine_lrs(400, 1e-4, 400, lambda e: True)
    assert [main_lr(e, train, 1e-4) for e in range(400)] == pytest.approx(torchs, rel=1e-9, abs=1e-16)
    assert main_lr(1, train, 1e-4) == pytest.approx(1e-4 * (1 + math.cos(math.pi / 400)) / 2, rel=1e-12)


def test_the_cosine_ends_at_min_lr_through_the_midpoint_between() -> None:
    # Halfway down (epoch 151 of A's cosine over 101-201) the lr is the mean of base and floor:
    # (1e-4 + 1e-6) / 2 = 5.05e-5.
    assert main_lr(151, TrainConfig(min_lr=1e-6), 1e-4) == pytest.approx(5.05e-5, rel=1e-12)
    assert main_lr(201, TrainConfig(min_lr=1e-6), 1e-4) == pytest.approx(1e-6, rel=1e-12)
    # decay_start 1.0: the cosine would start at the end, so the lr stays at base_lr throughout.
    late = TrainConfig(epochs=10, decay_start=1.0)
    assert [main_lr(e, late, 1e-4) for e in (0, 9, 9.5)] == [1e-4, 1e-4, 1e-4]
    with pytest.raises(ValueError, match=r"^epoch must be >= 0, got -1$"):
        main_lr(-1, TrainConfig(), 1e-4)


def test_pipeline_b_schedule_and_variants() -> None:
    train = TrainConfig(epochs=400, decay_start=0.0)
    assert main_lr(0, train, 1e-4) == pytest.approx(1e-4)
    assert main_lr(200, train, 1e-4) == pytest.approx(5e-5)
    assert main_lr(399.5, train, 1e-4) < 1e-9  # fractional epochs, for per-step schedules
    constant = TrainConfig(schedule="constant")
    assert main_lr(199, constant, 1e-4) == 1e-4
    warm = TrainConfig(epochs=10, decay_start=0.0, warmup_epochs=3)
    assert [main_lr(e, warm, 3e-4) for e in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert main_lr(3, warm, 3e-4) == pytest.approx(3e-4)  # the cosine starts after the warm-up
    assert main_lr(4, warm, 3e-4) < 3e-4  # at once: no constant phase, so no delay
    assert main_lr(10, warm, 3e-4) == pytest.approx(0.0, abs=1e-15)


def test_swa_schedule() -> None:
    swa = SwaConfig()  # 5 cycles of 30 epochs at 5e-5, cosine of period 40, snapshot every 3
    end = 5e-5 * 0.5 * (1 + math.cos(math.pi * 29 / 40))
    assert swa_lr(0, swa) == pytest.approx(5e-5)
    assert swa_lr(29, swa) == pytest.approx(end)
    assert 0.15 < end / 5e-5 < 0.2  # the authors' code stops about 15-20% of the way down
    assert swa_lr(30, swa) == pytest.approx(5e-5)  # restart
    assert swa_lr(149, swa) == pytest.approx(end)
    assert [is_swa_cycle_start(e, swa) for e in (0, 1, 29, 30, 60)] == [True, False, False, True, True]
    to_zero = SwaConfig(cycle_epochs=10, anneal_epochs=10)
    assert swa_lr(5, to_zero) == pytest.approx(2.5e-5)
    short = SwaConfig(cycle_epochs=10, anneal_epochs=5)
    assert swa_lr(7, short) == pytest.approx(0.0, abs=1e-15)  # held at 0, not rising again
    with pytest.raises(ValueError, match="outside"):
        swa_lr(150, swa)


def test_swa_snapshot_epochs() -> None:
    snaps = swa_snapshot_epochs(SwaConfig())
    assert len(snaps) == 50
    assert snaps[:10] == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]  # the last at the end of the cycle
    assert snaps[10] == 32 and snaps[-1] == 149
    assert swa_snapshot_epochs(SwaConfig(cycles=2, cycle_epochs=5, snapshot_every=2)) == [1, 3, 6, 8]
    assert swa_snapshot_epochs(SwaConfig(enabled=False)) == []


def test_lr_at_spans_both_phases() -> None:
    cfg = ExperimentConfig()
    assert total_epochs(cfg.train) == 350
    assert lr_at(0, cfg) == 1e-4
    assert lr_at(199, cfg) < 1e-7
    assert lr_at(200, cfg) == pytest.approx(5e-5)
    assert lr_at(230, cfg) == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="past the end"):
        lr_at(350, cfg)
    no_swa = ExperimentConfig(train=TrainConfig(swa=SwaConfig(enabled=False)))
    assert total_epochs(no_swa.train) == 200
    with pytest.raises(ValueError, match="past the end"):
        lr_at(200, no_swa)


# --- weight averaging ------------------------------------------------------------------------


def test_average_of_known_tensors() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 5.0]), "h": torch.tensor([2.0], dtype=torch.float16), "n": torch.tensor(7)}
    avg = average_weights([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 3.5]))
    assert avg["h"].dtype == torch.float16 and avg["h"].item() == 1.5
    assert avg["n"].item() == 7  # not floating: the latest snapshot's


def test_average_is_the_correctly_rounded_mean() -> None:
    g = torch.Generator().manual_seed(0)
    snaps = [{"w": torch.randn(1000, generator=g) * 1e3 + 1e4} for _ in range(50)]
    exact = torch.stack([s["w"].double() for s in snaps]).mean(0).float()
    assert torch.equal(average_weights(snaps)["w"], exact)


def test_weight_average_resumes_and_loads_into_a_model() -> None:
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Conv3d(1, 4, 3), nn.GroupNorm(2, 4)))
    running = WeightAverage()
    running.update(models[0].state_dict())
    running.update(models[1].state_dict())
    state = copy.deepcopy(running.state_dict())
    again = WeightAverage()
    again.load_state_dict(state)
    again.update(models[2].state_dict())
    assert again.count == 3
    expected = average_weights(m.state_dict() for m in models)
    result = again.average()
    assert all(torch.equal(result[k], expected[k]) for k in expected)
    target = nn.Sequential(nn.Conv3d(1, 4, 3), nn.GroupNorm(2, 4))
    target.load_state_dict(result)  # strict: same keys, shapes and dtypes
    with pytest.raises(ValueError, match="keys differ"):
        again.update({"other": torch.zeros(1)})
    with pytest.raises(ValueError, match="^no snapshot to average$"):
        WeightAverage().average()


def test_weight_average_never_changes_the_snapshots_it_reads() -> None:
    # A float64 snapshot is already in the accumulation dtype: the running sum must be a copy of
    # it, not the model's own tensor that the next update adds into.
    first = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    running = WeightAverage()
    running.update(first)
    running.update({"w": torch.tensor([3.0, 6.0], dtype=torch.float64)})
    assert torch.equal(first["w"], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.equal(running.average()["w"], torch.tensor([2.0, 4.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^w: snapshot shape \(3,\) differs from \(2,\)$"):
        running.update({"w": torch.zeros(3, dtype=torch.float64)})
