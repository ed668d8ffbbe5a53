"""Optimizers, learning-rate schedules and the weight averaging of the self-ensembling phase.

Optimizers (`build_optimizer`):

- `Ranger` (pipeline A): RAdam + Lookahead + gradient centralization, as in lessw2020's Ranger that
  the authors used (k=6, alpha=0.5, betas (0.95, 0.999), eps 1e-5). Built on `torch.optim.RAdam`
  (its state, its functional update), so it is an ordinary `torch.optim.Optimizer`: `state_dict()`
  holds the RAdam moments and step counts, Lookahead's slow weights and its step counter, and a
  fresh `Ranger` that loads it continues bit-for-bit as if never interrupted.
  Written here because no maintained package fits: pytorch-optimizer 4.1.0 (2026-10) has a Ranger,
  but on the quadratic of `tests/training/test_optim.py` (lr 0.3, 400 steps) it diverges to a loss
  of 456 from 113, where its own RAdam, torch's RAdam and Lookahead over torch's RAdam all converge;
  pytorch-ranger (2020) is unmaintained.
- `torch.optim.Adam` (pipeline B, and the self-ensembling phase of A).

Schedules are pure functions of the epoch, so resuming needs no scheduler state: at the start of
each epoch (or step, with a fractional epoch) call `set_lr(optimizer, lr_at(epoch, cfg))`.

- main phase (`main_lr`): optional linear warm-up, constant until `decay_start` x epochs, then a
  cosine of period `epochs` x (1 - `decay_start`) (A: constant through epoch 101, as the authors'
  loop, then cosine over 100; B: `decay_start = 0`, cosine annealing from the first epoch).
- self-ensembling phase of A (`swa_lr`, `swa_snapshot_epochs`): `cycles` cycles of `cycle_epochs`
  epochs, each restarting at `swa.lr` with a cosine of period `anneal_epochs`; a snapshot at the end
  of every `snapshot_every`-th epoch of each cycle; `WeightAverage` / `average_weights` average them.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch.optim import Adam, Optimizer, RAdam
from torch.optim.radam import radam

from brats_lab.config import ExperimentConfig, OptimConfig, SwaConfig, TrainConfig

# --- optimizers ------------------------------------------------------------------------------

_RADAM_OPTIONS = ("maximize", "foreach", "capturable", "differentiable", "decoupled_weight_decay")


def centralize_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Gradient centralization (Yong et al. 2020), in place: subtract from a weight's gradient its
    mean over all axes but the first (the output channel), i.e. over each filter's fan-in.

    Only for tensors with more than one axis (conv and linear weights); biases and norm scales are
    returned unchanged. Returns `grad`.
    """
    if grad.dim() > 1:
        grad.sub_(grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))
    return grad


class Ranger(RAdam):
    """RAdam + Lookahead + gradient centralization (lessw2020's Ranger, the paper's reference [21-23]).

    Each `step()`:
    1. centralizes the gradients of multi-axis weights in place (`centralize_gradient`), if
       `grad_centralization`, before anything else sees them (RAdam's moments, weight decay);
    2. takes one RAdam step (torch's own update, variance rectification included);
    3. every `k`-th step, Lookahead: slow += alpha * (fast - slow), then fast = slow.

    The slow weights start as the weights before the first step (Lookahead's and Ranger's rule).
    They live in `self.state[p]["slow"]` beside RAdam's `step`, `exp_avg`, `exp_avg_sq`; the step
    counter of Lookahead is `param_group["lookahead_step"]`, so `state_dict()` captures all of it.
    A step skipped by `GradScaler` (inf/NaN gradients) never reaches `step()` and so does not count.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        k: int = 6,
        alpha: float = 0.5,
        grad_centralization: bool = True,
        foreach: bool | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"Lookahead k must be >= 1, got {k}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must be in (0, 1], got {alpha}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
        extra = {"lookahead_k": k, "lookahead_alpha": alpha, "grad_centralization": grad_centralization}
        self.defaults.update(extra)
        for group in self.param_groups:
            for key, value in extra.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Also the constructor's path: torch's Optimizer.__init__ adds each group through it.
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("lookahead_step", 0)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Ranger step; `closure` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["grad_centralization"]:
                for p in group["params"]:
                    if p.grad is not None:
                        centralize_gradient(p.grad)
            # Lookahead's slow weights are the weights before the first step. They are stored
            # after RAdam's update because RAdam initializes a parameter's state only when empty.
            fresh = [p for p in group["params"] if p.grad is not None and "slow" not in self.state[p]]
            initial = [p.detach().clone() for p in fresh]
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            exp_avgs: list[torch.Tensor] = []
            exp_avg_sqs: list[torch.Tensor] = []
            steps: list[Any] = []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            # The functional update rather than super().step(): the base class's step is wrapped
            # with the optimizer hooks, which would then run twice per Ranger step.
            radam(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                has_complex=has_complex,
                # Only the options this torch's RAdam has (they grew over releases).
                **{key: group[key] for key in _RADAM_OPTIONS if key in group},
            )
            for p, slow in zip(fresh, initial):
                self.state[p]["slow"] = slow
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"] == 0:
                for p in group["params"]:
                    slow = self.state[p].get("slow")
                    if slow is not None:
                        slow.lerp_(p.detach(), group["lookahead_alpha"])  # slow + alpha (fast - slow)
                        p.copy_(slow)
        return loss


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], cfg: OptimConfig, fused: bool | None = None
) -> Optimizer:
    """The main-phase optimizer of `cfg`: `Ranger` or `torch.optim.Adam`, with the config's lr,
    betas, eps and weight decay (and k, alpha, gradient centralization for Ranger).

    `fused` goes to Adam (the fused CUDA kernel; None lets torch choose). Ranger ignores it.
    """
    if cfg.name == "ranger":
        return Ranger(
            params,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            k=cfg.lookahead_k,
            alpha=cfg.lookahead_alpha,
            grad_centralization=cfg.grad_centralization,
        )
    if cfg.name == "adam":
        return Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.name!r}; expected 'ranger' or 'adam'")


def build_swa_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], swa: SwaConfig, fused: bool | None = None
) -> Optimizer:
    """A fresh Adam for one self-ensembling cycle: lr `swa.lr`, no weight decay (paper 3.3), and
    torch's default betas (0.9, 0.999) and eps 1e-8 (neither the paper nor `SwaConfig` sets them)."""
    return Adam(params, lr=swa.lr, weight_decay=0.0, fused=fused)


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (schedules here are pure functions of the epoch)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- schedules -------------------------------------------------------------------------------


def _cosine(fraction: float, high: float, low: float) -> float:
    """high at fraction 0, low at fraction 1, half a cosine in between."""
    fraction = min(max(fraction, 0.0), 1.0)
    return low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def decay_start_epoch(train: TrainConfig) -> int:
    """First epoch of the cosine decay: `decay_start` x `epochs` (rounded), not before the warm-up ends."""
    return max(round(train.decay_start * train.epochs), train.warmup_epochs)


def main_lr(epoch: float, train: TrainConfig, base_lr: float) -> float:
    """Learning rate during (0-based, possibly fractional) `epoch` of the main phase.

    - warm-up: `base_lr * (epoch + 1) / warmup_epochs` for epoch < `warmup_epochs` (none by default);
    - `schedule = "constant"`: `base_lr` afterwards;
    - `schedule = "cosine"`: `base_lr`, then a half cosine from `base_lr` to `min_lr` over
      `epochs - decay_start_epoch` epochs. With a constant phase (`decay_start > 0`, pipeline A)
      the cosine starts one epoch after `decay_start_epoch`, as in the authors' loop, which steps
      `CosineAnnealingLR(T_max = epochs / 2)` at the end of each epoch with `epoch / epochs > 0.5`
      (the first step ends epoch 101; the same lr as theirs for any even number of epochs);
      without one (B) it starts at once, a cosine stepped every epoch.

    Pipeline A (200 epochs, decay_start 0.5): 1e-4 for epochs 0-101, 5e-5 at 151, ~9.9e-8 at 199.
    Pipeline B (decay_start 0): cosine annealing from the first epoch.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch < train.warmup_epochs:
        return base_lr * (epoch + 1) / train.warmup_epochs
    if train.schedule == "constant":
        return base_lr
    start = decay_start_epoch(train)
    if start >= train.epochs:
        return base_lr
    # The authors' test is strict (`>`): epoch 100 of 200 is not past the half, so their first
    # step comes at the end of epoch 101, one epoch after a step at the end of epoch 100 would.
    delay = 1 if train.decay_start > 0 else 0
    return _cosine((epoch - start - delay) / (train.epochs - start), base_lr, train.min_lr)


def swa_epochs(swa: SwaConfig) -> int:
    """Length of the self-ensembling phase in epochs (0 when disabled)."""
    return swa.cycles * swa.cycle_epochs if swa.enabled else 0


def swa_lr(epoch: float, swa: SwaConfig) -> float:
    """Learning rate during `epoch` of the self-ensembling phase (0-based from the phase's start).

    Each cycle restarts at `swa.lr` and follows a cosine of period `anneal_epochs` (annealing to 0
    at `anneal_epochs`): with the defaults (30-epoch cycles, anneal 40, as the authors' code) the
    last epoch of a cycle trains at about 17% of `swa.lr`. An `anneal_epochs` shorter than the cycle
    holds 0 after it rather than rising again.
    """
    if not 0 <= epoch < swa.cycles * swa.cycle_epochs:
        raise ValueError(f"SWA epoch {epoch} outside the phase's {swa.cycles} x {swa.cycle_epochs} epochs")
    within = epoch % swa.cycle_epochs
    return _cosine(within / swa.anneal_epochs, swa.lr, 0.0)


def is_swa_cycle_start(epoch: int, swa: SwaConfig) -> bool:
    """Whether SWA-phase `epoch` begins a cycle: build a fresh optimizer (`build_swa_optimizer`)."""
    return epoch % swa.cycle_epochs == 0


def swa_snapshot_epochs(swa: SwaConfig) -> list[int]:
    """SWA-phase epochs (0-based) at whose END a snapshot of the weights joins the average.

    Every `snapshot_every`-th epoch of each cycle, counted within the cycle, so every cycle gives
    the same number: the defaults give epochs 2, 5, ..., 29 of each cycle, 10 per cycle and 50 in
    all, the last at the end of each cycle (its lowest lr). The authors' code also counted the
    weights from before the phase (51 in all); the paper speaks only of the saved snapshots.
    """
    if not swa.enabled:
        return []
    per_cycle = [t for t in range(swa.cycle_epochs) if (t + 1) % swa.snapshot_every == 0]
    return [c * swa.cycle_epochs + t for c in range(swa.cycles) for t in per_cycle]


def total_epochs(train: TrainConfig) -> int:
    """Main phase plus the self-ensembling phase."""
    return train.epochs + swa_epochs(train.swa)


def lr_at(epoch: float, cfg: ExperimentConfig) -> float:
    """Learning rate at global (0-based) `epoch`: `main_lr` for the first `train.epochs` epochs,
    then `swa_lr` through the self-ensembling phase (if enabled)."""
    train = cfg.train
    if epoch < train.epochs:
        return main_lr(epoch, train, cfg.optim.lr)
    if epoch < total_epochs(train):
        return swa_lr(epoch - train.epochs, train.swa)
    raise ValueError(f"epoch {epoch} is past the end of training ({total_epochs(train)} epochs)")


# --- weight averaging ------------------------------------------------------------------------


class WeightAverage:
    """Equal-weight running average of model state dicts (the self-ensembling of pipeline A).

    Floating-point entries are summed in float64 (default `accumulate_dtype`) and divided once at
    the end, so the average of 50 float32 snapshots is the correctly rounded mean, whatever the
    order. Buffers are averaged like parameters. With our models this is all there is: GroupNorm
    and InstanceNorm (with torch's default `track_running_stats=False`) have no running statistics.
    A BatchNorm model would need its running statistics re-estimated on data after averaging
    (`torch.optim.swa_utils.update_bn`), not averaged. Non-floating entries (e.g. BatchNorm's
    `num_batches_tracked`) are taken from the latest snapshot.

    Snapshots are summed as they come: memory is one float64 copy of the model, not one per
    snapshot. `state_dict()` / `load_state_dict()` carry the running sum into a checkpoint.
    """

    def __init__(self, accumulate_dtype: torch.dtype = torch.float64) -> None:
        self.accumulate_dtype = accumulate_dtype
        self.count = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def update(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Add one snapshot, e.g. `model.state_dict()` (read immediately: no copy needs keeping)."""
        if self.count and set(state_dict) != set(self._sums):
            missing, extra = sorted(set(self._sums) - set(state_dict)), sorted(set(state_dict) - set(self._sums))
            raise ValueError(f"snapshot keys differ from the first snapshot's: missing {missing}, unexpected {extra}")
        for key, value in state_dict.items():
            value = value.detach()
            if self.count == 0:
                self._dtypes[key] = value.dtype
                if value.is_floating_point():
                    self._sums[key] = value.to(self.accumulate_dtype, copy=True)
                else:
                    self._sums[key] = value.clone()
                continue
            total = self._sums[key]
            if value.shape != total.shape:
                raise ValueError(f"{key}: snapshot shape {tuple(value.shape)} differs from {tuple(total.shape)}")
            if value.is_floating_point():
                total.add_(value.to(device=total.device, dtype=self.accumulate_dtype))
            else:
                total.copy_(value)
        self.count += 1

    def average(self) -> dict[str, torch.Tensor]:
        """The mean of the snapshots so far, each entry in its original dtype (load it with
        `model.load_state_dict`)."""
        if self.count == 0:
            raise ValueError("no snapshot to average")
        return {
            key: (total / self.count).to(self._dtypes[key]) if total.is_floating_point() else total.clone()
            for key, total in self._sums.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """The running sum and count, for a resumable checkpoint."""
        return {"count": self.count, "sums": dict(self._sums), "dtypes": {k: str(v) for k, v in self._dtypes.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self._sums = {k: v.clone() for k, v in state["sums"].items()}
        self._dtypes = {k: getattr(torch, v.removeprefix("torch.")) for k, v in state["dtypes"].items()}


def average_weights(state_dicts: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Equal-weight average of state dicts (float64 accumulation; see `WeightAverage`)."""
    avg = WeightAverage()
    for sd in state_dicts:
        avg.update(sd)
    return avg.average()
