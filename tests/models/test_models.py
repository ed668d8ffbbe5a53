"""brats_lab.models: one contract over every registered model, plus the paper's parameter counts."""

from __future__ import annotations

import time

import pytest
import torch

from brats_lab.config import MODEL_NAMES, ExperimentConfig, ModelConfig, from_dict, load_config, pipeline_path, to_dict
from brats_lab.models import MODELS, build_model, count_parameters, group_count, parameter_count
from brats_lab.models.layers import CBAM, SpatialGate

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


def _authors_group_count(planes: int) -> int:
    """The group count of the authors' `default_norm_layer` (lescientifik/open_brats2020,
    src/models/layers.py at e21edb7, default groups=16), written again from its definition:
    min(16, planes) groups if that divides `planes`; otherwise groups of the first size in
    16, 8, 4, 2, 1 that divides `planes`."""
    groups = min(16, planes)
    if planes % groups == 0:
        return groups
    size = next(s for s in (16, 8, 4, 2, 1) if planes % s == 0)
    return planes // size


def test_group_norm_group_count_is_the_authors():
    assert [group_count(c) for c in range(1, 1025)] == [_authors_group_count(c) for c in range(1, 1025)]
    # By hand: one group per channel up to 16, 16 groups for multiples of 16, else groups of the
    # largest power of two dividing the count. 8 and 12 are where an older brats-lab rule differed.
    hand = {1: 1, 2: 2, 4: 4, 8: 8, 12: 12, 16: 16, 18: 9, 20: 5, 24: 3, 40: 5, 48: 16, 100: 25, 384: 16}
    assert {c: group_count(c) for c in hand} == hand
    with pytest.raises(ValueError, match=r"^channels must be >= 1, got 0$"):
        group_count(0)
    unet = build_model(ModelConfig(name="unet", width=48))
    norms = {m.num_channels: m.num_groups for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert norms == {24: 3, 48: 16, 96: 16, 192: 16, 384: 16}
    narrow = build_model(ModelConfig(name="equiunet", width=8))  # the cpu profile's width
    assert {m.num_channels: m.num_groups for m in narrow.modules() if isinstance(m, torch.nn.GroupNorm)} == {8: 8, 16: 16, 32: 16, 64: 16}


# --- the authors' CBAM and Att_EquiUnet, written again here from their definition ------------------
# (lescientifik/open_brats2020, src/models/layers.py and unet.py at e21edb7): an independent,
# deliberately plain reimplementation, so that a change to brats_lab.models cannot change the oracle.
# Their CBAM: channel gate = sigmoid(MLP(avgpool) + MLP(maxpool)) with MLP Linear(C, C//16), ReLU,
# Linear(C//16, C); spatial gate = sigmoid(ReLU(norm(conv7(cat(max_c, mean_c))))), no conv bias.


class _RefCBAM(torch.nn.Module):
    def __init__(self, c: int, norm) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(c, c // 16), torch.nn.Linear(c // 16, c)
        self.conv = torch.nn.Conv3d(2, 1, 7, padding=3, bias=False)
        self.norm = norm(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def mlp(v: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(v.flatten(1))))

        size = x.shape[2:]
        att = mlp(torch.nn.functional.avg_pool3d(x, size)) + mlp(torch.nn.functional.max_pool3d(x, size))
        x = x * torch.sigmoid(att)[:, :, None, None, None]
        pooled = torch.cat([x.max(dim=1, keepdim=True)[0], x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(torch.relu(self.norm(self.conv(pooled))))


def _ref_block(cin: int, cout: int, norm, dilation: int = 1) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv3d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False), norm(cout), torch.nn.ReLU()
    )


class _RefAttEquiUnet(torch.nn.Module):
    """Their Att_EquiUnet (`attention=False`: their EquiUnet) with deep supervision: returns
    (logits, [aux from bottom, bottom_2, decoder3, decoder2]), each a 1x1 conv upsampled x8, x8,
    x4, x2 (trilinear, align_corners)."""

    def __init__(self, width: int, norm, attention: bool = True) -> None:
        super().__init__()
        f = [width * 2**i for i in range(4)]
        cbam = (lambda c: _RefCBAM(c, norm)) if attention else (lambda c: torch.nn.Identity())

        def ublock(cin, cmid, cout, dilation=1):
            return torch.nn.Sequential(_ref_block(cin, cmid, norm, dilation), _ref_block(cmid, cout, norm, dilation))

        self.enc = torch.nn.ModuleList([ublock(4, f[0], f[0]), ublock(f[0], f[1], f[1]), ublock(f[1], f[2], f[2]), ublock(f[2], f[3], f[3])])
        self.enc_cbam = torch.nn.ModuleList([cbam(c) for c in f])
        self.bottom, self.bottom_cbam = ublock(f[3], f[3], f[3], dilation=2), cbam(f[3])
        self.bottom_2, self.bottom_2_cbam = _ref_block(2 * f[3], f[2], norm), cbam(f[2])
        self.dec3, self.dec2, self.dec1 = ublock(2 * f[2], f[2], f[1]), ublock(2 * f[1], f[1], f[0]), ublock(2 * f[0], f[0], f[0])
        self.out = torch.nn.Conv3d(f[0], 3, 1)
        self.deep = torch.nn.ModuleList([torch.nn.Conv3d(c, 3, 1) for c in (f[3], f[2], f[1], f[0])])

    def ordered_parameters(self) -> list[torch.nn.Parameter]:
        """In the order brats_lab registers the same tensors."""
        groups = [m for i in range(4) for m in (self.enc[i], self.enc_cbam[i])]
        groups += [self.bottom, self.bottom_cbam, self.bottom_2, self.bottom_2_cbam, self.dec3, self.dec2, self.dec1, self.out, self.deep]
        return [p for g in groups for p in g.parameters()]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        def up(v, factor=2):
            return torch.nn.functional.interpolate(v, scale_factor=factor, mode="trilinear", align_corners=True)

        skips = []
        for i in range(4):
            x = self.enc_cbam[i](self.enc[i](x if i == 0 else torch.nn.functional.max_pool3d(x, 2)))
            skips.append(x)
        bottom = self.bottom_cbam(self.bottom(x))
        bottom_2 = self.bottom_2_cbam(self.bottom_2(torch.cat([skips[3], bottom], dim=1)))
        d3 = self.dec3(torch.cat([skips[2], up(bottom_2)], dim=1))
        d2 = self.dec2(torch.cat([skips[1], up(d3)], dim=1))
        d1 = self.dec1(torch.cat([skips[0], up(d2)], dim=1))
        deeps = [up(head(v), factor) for head, v, factor in zip(self.deep, (bottom, bottom_2, d3, d2), (8, 8, 4, 2))]
        return self.out(d1), deeps


REF_NORMS = {"group": lambda c: torch.nn.GroupNorm(_authors_group_count(c), c), "instance": lambda c: torch.nn.InstanceNorm3d(c, affine=True)}


def _randomise(params) -> None:
    """Weights away from the init, norms included, so every tensor matters to the output."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.3) + (1.0 if p.ndim == 1 else 0.0))


def _copy(src: list[torch.nn.Parameter], dst: list[torch.nn.Parameter]) -> None:
    assert len(src) == len(dst)
    with torch.no_grad():
        for a, b in zip(src, dst, strict=True):
            assert a.shape == b.shape
            b.copy_(a)


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_cbam_block_is_the_authors(norm):
    ours = CBAM(32, norm)
    ref = _RefCBAM(32, REF_NORMS[norm])
    _randomise(ours.parameters())
    _copy(list(ours.parameters()), list(ref.parameters()))
    x = torch.randn(2, 32, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The CBAM paper's gate (no ReLU) is another function of the same weights: the test can fail.
    woo = CBAM(32, norm, spatial_relu=False)
    _copy(list(ours.parameters()), list(woo.parameters()))
    with torch.no_grad():
        assert (woo(x) - expected).abs().max() > 1e-2


# Width 16: 16 groups everywhere. Widths 8 and 20 hold the counts where group rules part (8 and
# 20 channels: 8 and 5 groups in the authors' rule); at width 8 their CBAM's MLP would have 0 hidden
# units (8 // 16), ours 1, so the attention network is compared at 16 and 20 only.
AUTHORS_CASES = [("equiunet", 8, "group"), ("equiunet", 16, "group"), ("att_equiunet", 16, "group"), ("att_equiunet", 20, "group"),
                 ("equiunet", 16, "instance"), ("att_equiunet", 16, "instance")]


@pytest.mark.parametrize("name, width, norm", AUTHORS_CASES)
def test_network_is_the_authors(name, width, norm):
    """With the same weights, `att_equiunet` computes the authors' Att_EquiUnet and `equiunet` their
    EquiUnet, deep-supervision outputs included (16^3 input); `att_equiunet_woo` does not."""
    ours = build_model(ModelConfig(name=name, width=width, norm=norm, deep_supervision=True)).train()  # no dropout, no running stats
    ref = _RefAttEquiUnet(width, REF_NORMS[norm], attention=name == "att_equiunet").train()
    _randomise(ours.parameters())
    _copy(list(ours.parameters()), ref.ordered_parameters())
    x = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, expected_aux = ref(x)
        logits, aux = ours(x)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        for got, want in zip(aux, expected_aux, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if name == "att_equiunet":
            woo = build_model(ModelConfig(name="att_equiunet_woo", width=width, norm=norm, deep_supervision=True)).train()
            woo.load_state_dict(ours.state_dict())
            assert (woo(x)[0] - expected).abs().max() > 1e-2


def test_spatial_gate_of_the_authors_never_goes_below_half():
    torch.manual_seed(0)
    x = torch.rand(2, 8, 8, 8, 8) + 0.5
    for relu, lowest in ((True, 0.5), (False, 0.0)):
        gate = SpatialGate("group", relu=relu)
        ratio = gate(x) / x  # the spatial weights, broadcast over channels
        assert ratio.min() >= lowest - 1e-6
    assert (SpatialGate("group", relu=False)(x) / x).min() < 0.5  # it can suppress, not only halve
    assert all(g.relu for g in build_model(ModelConfig(name="att_equiunet_tiny")).modules() if isinstance(g, SpatialGate))
    assert not any(g.relu for g in build_model(ModelConfig(name="att_equiunet_woo_tiny")).modules() if isinstance(g, SpatialGate))


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
