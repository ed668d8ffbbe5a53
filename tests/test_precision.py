"""The precision rule of `train.amp` and `predict --precision` (brats_lab/precision.py), with the
CPU's capabilities posed as an AVX2-only CPU (no native bf16) and as one with AMX, and the GPU's
bf16 support posed both ways: the rule is tested on every machine, whatever its own CPU."""

from __future__ import annotations

import re

import pytest
import torch

from brats_lab import precision
from brats_lab.precision import autocast_dtype, describe

CPU, GPU = torch.device("cpu"), torch.device("cuda")  # device objects only: no GPU needed
AVX2 = {"cpu_name": "AMD EPYC", "avx2": True, "avx512_bf16": False, "amx_bf16": False}
AMX = {"cpu_name": "Intel Xeon", "avx2": True, "avx512_bf16": True, "amx_bf16": True, "amx_fp16": True}
AVX512_BF16_ONLY = {"cpu_name": "AMD EPYC 9004", "avx512_bf16": True}


@pytest.fixture
def cpu_is(monkeypatch):
    def pose(capabilities: dict) -> None:
        monkeypatch.setattr(precision, "cpu_capabilities", lambda: dict(capabilities))

    return pose


def test_auto_on_a_cpu_without_native_bf16_is_float32_and_says_so(cpu_is) -> None:
    cpu_is(AVX2)
    assert autocast_dtype("auto", CPU) is None
    assert describe("auto", CPU) == "precision: float32 (this CPU has no native bf16: AMD EPYC)"


@pytest.mark.parametrize("capabilities", [AMX, AVX512_BF16_ONLY])
def test_auto_on_a_cpu_that_executes_bf16_is_bf16(cpu_is, capabilities) -> None:
    cpu_is(capabilities)
    assert autocast_dtype("auto", CPU) is torch.bfloat16
    assert describe("auto", CPU) == f"precision: bfloat16 (this CPU executes bf16 natively: {capabilities['cpu_name']})"


def test_an_explicit_bf16_on_a_cpu_that_emulates_it_runs_and_warns(cpu_is) -> None:
    cpu_is(AVX2)
    assert autocast_dtype("bf16", CPU) is torch.bfloat16  # what was asked for
    assert describe("bf16", CPU) == (
        "precision: bfloat16 as asked; warning: this CPU (AMD EPYC) has no native bf16: it is emulated and several "
        "times slower than float32 (use auto or fp32)")
    assert "warning" in describe("fp16", CPU)
    cpu_is(AMX)
    assert describe("bf16", CPU) == "precision: bfloat16 (as asked)"
    assert describe("fp16", CPU) == "precision: float16 (as asked)"


@pytest.mark.parametrize("off", ["off", "fp32"])
def test_off_and_fp32_are_float32_on_every_device(cpu_is, off) -> None:
    cpu_is(AMX)
    assert autocast_dtype(off, CPU) is None and autocast_dtype(off, GPU) is None
    assert describe(off, CPU) == "precision: float32 (as asked)"


@pytest.mark.parametrize(("bf16", "auto"), [(True, torch.bfloat16), (False, torch.float16)])
def test_on_a_gpu_auto_is_bf16_where_it_has_bf16_else_fp16(monkeypatch, bf16, auto) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert [autocast_dtype(p, GPU) for p in ("auto", "fp32", "fp16", "bf16")] == [auto, None, torch.float16, torch.bfloat16]


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("precision must be one of auto, fp32, fp16, bf16 (or off), got 'fp8'")):
        autocast_dtype("fp8", CPU)


def test_this_machines_probe_answers_with_the_flags_the_rule_reads() -> None:
    caps = precision.cpu_capabilities()
    assert isinstance(caps, dict) and any(flag in caps for flag in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))
