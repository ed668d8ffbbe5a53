"""brats_lab.models: one contract over every registered model, plus the paper's parameter counts."""

from __future__ import annotations

import time

import pytest
import torch

from brats_lab.config import MODEL_NAMES, ExperimentConfig, ModelConfig, from_dict, load_config, pipeline_path, to_dict
from brats_lab.models import MODELS, build_model, count_parameters, group_count, parameter_count
from brats_lab.models.layers import SpatialGate

# Tiny models run at 32^3; the full-width ones at 16^3 (bottleneck 2^3), which keeps the whole
# contract at a few seconds on 2 cores while still running the real width-48 networks.
SIZE = {True: 32, False: 16}


def _contract_cfg(name: str, norm: str = "group", deep_supervision: bool = True) -> ModelConfig:
    return ModelConfig(name=name, norm=norm, deep_supervision=deep_supervision)


def _input(name: str, batch: int = 1) -> torch.Tensor:
    n = SIZE[name.endswith("_tiny")]
    return torch.randn(batch, 4, n, n, n, generator=torch.Generator().manual_seed(0))


def test_registry_is_what_the_config_accepts():
    assert tuple(MODELS) == MODEL_NAMES
    for name in MODELS:
        assert f"{name}_tiny" in MODELS or name.endswith("_tiny")  # every model has a tiny variant


# Every registered model with GroupNorm; InstanceNorm on the tiny variants only (the full-width
# networks are the same code with another norm, and each costs a second or more here).
CONTRACT = [(name, "group") for name in MODELS] + [(n, "instance") for n in MODELS if n.endswith("_tiny")]


@pytest.mark.parametrize("name, norm", CONTRACT)
def test_model_contract(name, norm):
    torch.manual_seed(0)
    cfg = _contract_cfg(name, norm)
    model = build_model(cfg)
    x = _input(name)
    expected = (x.shape[0], 3, *x.shape[2:])

    # Training mode with deep supervision: (logits, [4 aux logits]), all at full size.
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    logits, aux = out
    assert logits.shape == expected and isinstance(aux, list) and len(aux) == 4
    assert all(a.shape == expected for a in aux)
    assert all(torch.isfinite(t).all() for t in (logits, *aux))
    # Logits, not probabilities (a sigmoid output could not be negative), starting near the
    # "no tumour" prior of the heads, with some spread from the features.
    assert logits.min() < 0 and logits.std() > 0
    assert all(0.005 < t.sigmoid().mean() < 0.05 for t in (logits, *aux))

    loss = logits.sigmoid().mean() + sum(a.sigmoid().mean() for a in aux)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"

    # Eval mode: a tensor only, whatever deep_supervision says.
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == expected and torch.isfinite(out).all()

    # Config round trip: the config a run logs rebuilds the same network.
    again = from_dict(to_dict(ExperimentConfig(model=cfg))).model
    assert again == cfg
    assert MODELS[again.name] is type(model)
    assert parameter_count(again) == count_parameters(model)  # rebuilt on the meta device: cheap


@pytest.mark.parametrize("name", [n for n in MODELS if n.endswith("_tiny")])
def test_without_deep_supervision_training_mode_returns_a_tensor(name):
    model = build_model(_contract_cfg(name, deep_supervision=False)).train()
    assert not any("deep" in n for n, _ in model.named_parameters())
    out = model(_input(name))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 32, 32, 32)


# The authors' models at width 48, counted by instantiating them (reference/seed_code.md, section 2).
PAPER_COUNTS = {
    ("unet", False): 19_167_819,
    ("unet", True): 19_169_991,
    ("equiunet", False): 23_152_563,
    ("equiunet", True): 23_154_735,
    ("att_equiunet", False): 23_205_588,
    ("att_equiunet", True): 23_207_760,
}


@pytest.mark.parametrize("norm", ["group", "instance"])
@pytest.mark.parametrize("name, deep_supervision", list(PAPER_COUNTS))
def test_parameter_counts_match_the_authors_models(name, deep_supervision, norm):
    cfg = ModelConfig(name=name, width=48, norm=norm, deep_supervision=deep_supervision)
    assert parameter_count(cfg) == PAPER_COUNTS[name, deep_supervision]  # meta device: no forward, no memory


def test_tiny_variants_are_width_4():
    for name in (n for n in MODELS if n.endswith("_tiny")):
        model = build_model(ModelConfig(name=name))
        assert model.width == 4 and model.encoder1[0][0][0].out_channels in (2, 4)


def test_input_sizes_must_be_multiples_of_8():
    model = build_model(ModelConfig(name="equiunet_tiny")).eval()
    with pytest.raises(ValueError, match=r"multiples of 8.*\(1, 4, 32, 32, 36\)"):
        model(torch.zeros(1, 4, 32, 32, 36))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        model(torch.zeros(4, 32, 32, 32))


def test_group_norm_group_count_rule():
    assert group_count(48) == 16 and group_count(384) == 16
    assert group_count(24) == 3  # the authors' code: groups of 8 channels when 16 does not divide
    assert group_count(8) == 1 and group_count(40) == 5
    assert group_count(4) == 4 and group_count(12) == 4 and group_count(1) == 1
    model = build_model(ModelConfig(name="unet", width=48))
    norms = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert norms[24] == 3 and norms[48] == 16


def test_cbam_spatial_relu_is_the_authors_quirk_and_off_by_default():
    torch.manual_seed(0)
    x = torch.rand(2, 8, 8, 8, 8) + 0.5
    for relu, lowest in ((True, 0.5), (False, 0.0)):
        gate = SpatialGate("group", relu=relu)
        ratio = gate(x) / x  # the spatial weights, broadcast over channels
        assert ratio.min() >= lowest - 1e-6
    assert (SpatialGate("group", relu=False)(x) / x).min() < 0.5  # it can suppress, not only halve
    assert ModelConfig().cbam_spatial_relu is False
    model = build_model(ModelConfig(name="att_equiunet_tiny", cbam_spatial_relu=True))
    assert all(g.relu for g in model.modules() if isinstance(g, SpatialGate))
    with pytest.raises(ValueError, match="cbam_spatial_relu applies to models with attention"):
        build_model(ModelConfig(name="equiunet_tiny", cbam_spatial_relu=True))


def test_dropout_is_built_only_when_asked():
    plain = build_model(ModelConfig(name="equiunet_tiny"))
    dropped = build_model(ModelConfig(name="equiunet_tiny", dropout=0.1))
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    assert sum(isinstance(m, torch.nn.Dropout) for m in dropped.modules()) == 17  # one per 3x3x3 conv


def test_paper_profile_model_trains_one_step_on_cpu_at_32_cubed():
    """The published network (width 48, deep supervision) runs a forward + backward on CPU.

    At 32^3 rather than 128^3: 128^3 takes minutes and several GB here (see the slow test)."""
    cfg = load_config(pipeline_path("A"), "paper").model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    logits, aux = model(torch.randn(1, 4, 32, 32, 32))
    (logits.mean() + sum(a.mean() for a in aux)).backward()
    assert logits.shape == (1, 3, 32, 32, 32) and len(aux) == 4
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_paper_profile_model_trains_one_step_on_cpu_at_128_cubed():
    """The published setting end to end: width 48, 128^3, deep supervision, one step of Adam."""
    cfg = load_config(pipeline_path("A"), "paper")
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    start = time.perf_counter()
    logits, aux = model(torch.randn(1, 4, *cfg.data.patch_size))
    (logits.sigmoid().mean() + sum(a.sigmoid().mean() for a in aux)).backward()
    opt.step()
    assert logits.shape == (1, 3, 128, 128, 128) and torch.isfinite(logits).all()
    print(f"one paper-scale training step on CPU: {time.perf_counter() - start:.1f} s")
