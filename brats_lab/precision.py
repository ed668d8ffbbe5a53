"""Mixed precision: the autocast dtype a setting means on a device. The one rule behind
`train.amp` and `predict --precision` (their "off" and "fp32" are the same thing: float32).

"auto" picks the fastest precision the device executes natively:
- a GPU: bf16 where it has bf16 (Ampere and newer; fp32's range, no loss scaling), fp16 before;
- a CPU: bf16 only where the CPU executes it (x86: AMX or AVX512-BF16; Arm: its BF16
  extension), float32 otherwise. On an AVX2-only CPU (most AMD ones, many Intel laptops and
  login nodes) bf16 is emulated: the demo network's step ran 5x slower than in float32.
An explicit "bf16" or "fp16" on a CPU without it still runs, with a warning that it is emulated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a precision is used: the CLI's parser reads PRECISIONS
    import torch

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
_ALIASES = {"off": "fp32"}  # train.amp's word for float32
# The CPU capabilities (torch.cpu.get_capabilities) that execute each reduced precision natively.
_NATIVE_CPU = {"bf16": ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"), "fp16": ("amx_fp16", "avx512_fp16", "fp16_arith")}


def cpu_capabilities() -> dict[str, Any]:
    """What this CPU executes (a function of its own, so that tests can pose as another CPU)."""
    import torch

    if hasattr(torch.cpu, "get_capabilities"):  # torch >= 2.10
        return dict(torch.cpu.get_capabilities())
    probe = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return {flag: bool(getattr(torch.cpu, name, lambda: False)()) for flag, name in probe.items()}


def cpu_runs_natively(precision: str) -> bool:
    """Whether this CPU executes `precision` ("bf16" or "fp16") in hardware rather than emulating it."""
    caps = cpu_capabilities()
    return any(caps.get(flag) for flag in _NATIVE_CPU[precision])


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`; None means float32 (no autocast)."""
    import torch

    name = _ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (or off), got {precision!r}")
    if name != "auto":
        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_runs_natively("bf16"):
        return torch.bfloat16
    return None


def describe(precision: str, device: torch.device) -> str:
    """One line saying which precision `precision` runs in on `device`, and why; an explicit reduced
    precision that this CPU emulates gets a warning."""
    dtype = autocast_dtype(precision, device)
    chosen = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    name = _ALIASES.get(precision, precision)
    if device.type != "cpu":
        return f"precision: {chosen} ({name} on {device.type})"
    cpu = cpu_capabilities().get("cpu_name") or "this CPU"
    if name == "auto":
        why = "this CPU executes bf16 natively" if dtype is not None else "this CPU has no native bf16"
        return f"precision: {chosen} ({why}: {cpu})"
    if name in _NATIVE_CPU and not cpu_runs_natively(name):
        return (f"precision: {chosen} as asked; warning: this CPU ({cpu}) has no native {name}: it is emulated "
                f"and several times slower than float32 (use auto or fp32)")
    return f"precision: {chosen} (as asked)"
