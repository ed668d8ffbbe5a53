"""TTA views: exact inverses, 16 different transforms, and the averaging really applies them."""

from __future__ import annotations

import itertools

import pytest
import torch

from brats_lab.inference.tta import VIEWS, View, apply, invert, predict_tta, view_shape

NON_CUBIC = (1, 4, 16, 32, 48)  # (B, C, Z, Y, X), Y != X so quarter turns change the shape


def _arange(shape: tuple[int, ...]) -> torch.Tensor:
    # Every voxel a different value: two transforms agree on it only if they are the same permutation.
    return torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape)


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_inverse_is_exact_on_non_cubic_volumes(view: View) -> None:
    x = torch.randn(NON_CUBIC, generator=torch.Generator().manual_seed(0))
    y = apply(view, x)
    assert tuple(y.shape) == view_shape(view, x.shape)
    assert torch.equal(invert(view, y), x)


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_view_stays_in_axial_plane(view: View) -> None:
    # A view permutes voxels within each axial slice (up to a Z flip): the multiset of values of
    # slice z comes from slice z or slice Z-1-z, never mixed across slices.
    x = _arange((1, 1, 4, 6, 6))
    y = apply(view, x)
    for z in range(4):
        src = 3 - z if "Z" in view.flip else z
        assert torch.equal(y[0, 0, z].flatten().sort().values, x[0, 0, src].flatten().sort().values)


def test_sixteen_distinct_transforms() -> None:
    assert len(VIEWS) == 16
    assert len(set(VIEWS)) == 16
    assert VIEWS[0] == View()  # identity first
    # Square in (Y, X) so that every view has the same shape and only the values can tell them apart.
    x = _arange((1, 1, 3, 5, 5))
    outs = [apply(v, x) for v in VIEWS]
    for (i, a), (j, b) in itertools.combinations(enumerate(outs), 2):
        assert not torch.equal(a, b), f"{VIEWS[i].name} and {VIEWS[j].name} are the same transform"


def test_views_are_closed_under_composition() -> None:
    # The 16 views are the whole group made by flips and axial quarter turns: composing any two
    # lands on one of them (in particular flipping Y, or Y and X together, is already present).
    x = _arange((1, 1, 3, 5, 5))
    outs = [apply(v, x) for v in VIEWS]
    for extra in (View(flip=("Y",)), View(flip=("Y", "X")), View(k=1, flip=("Y",))):
        assert any(torch.equal(apply(extra, x), o) for o in outs), extra.name
    for a, b in itertools.product(VIEWS[:8], VIEWS[8:]):
        composed = apply(b, apply(a, x))
        assert any(torch.equal(composed, o) for o in outs)


def test_flip_y_with_quarter_turn_is_not_undone_flip_first() -> None:
    # The authors' bug: undoing a Y/X flip before the rotation returns the volume rotated 180 degrees.
    view = View(k=1, flip=("Y",))
    x = _arange((1, 1, 2, 4, 4))
    wrong = torch.rot90(torch.flip(apply(view, x), dims=[-2]), -1, dims=(-2, -1))
    assert not torch.equal(wrong, x)
    assert torch.equal(wrong, torch.rot90(x, 2, dims=(-2, -1)))
    assert torch.equal(invert(view, apply(view, x)), x)


def test_view_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="quarter turns"):
        View(k=4)
    with pytest.raises(ValueError, match="distinct axes"):
        View(flip=("W",))
    assert View(flip=("X", "Z")) == View(flip=("Z", "X"))


class Counting:
    """A model function that records how many times and on what shapes it is called."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.fn(x)


def _per_voxel(x: torch.Tensor) -> torch.Tensor:
    # Logits of each voxel from that voxel's channels alone: commutes with every voxel permutation.
    w = torch.tensor([[1.0, -2.0, 0.5, 0.3], [0.2, 0.1, -1.0, 2.0], [-0.7, 0.4, 0.9, -0.2]])
    return torch.einsum("kc,bczyx->bkzyx", w, x) + 0.1


def _position_dependent(x: torch.Tensor) -> torch.Tensor:
    # Logits that depend on where a voxel sits in the array the model sees: not equivariant.
    z, y, x_ = (torch.arange(n, dtype=torch.float32) for n in x.shape[2:])
    ramp = z[:, None, None] * 0.3 + y[None, :, None] * 0.1 - x_[None, None, :] * 0.05
    return x[:, :3] + ramp


def test_equivariant_model_gives_same_output_with_and_without_tta() -> None:
    x = torch.randn((2, 4, 8, 16, 24), generator=torch.Generator().manual_seed(1))
    plain = torch.sigmoid(_per_voxel(x))
    tta = predict_tta(_per_voxel, x)
    assert tta.shape == (2, 3, 8, 16, 24)
    assert tta.dtype == torch.float32
    torch.testing.assert_close(tta, plain, atol=1e-6, rtol=0)


def test_non_equivariant_model_sees_the_views() -> None:
    x = torch.randn((1, 4, 8, 16, 24), generator=torch.Generator().manual_seed(2))
    plain = torch.sigmoid(_position_dependent(x))
    tta = predict_tta(_position_dependent, x)
    assert tta.shape == plain.shape
    assert (tta - plain).abs().max() > 0.05
    # ...and the average is the one over the views, each brought back, computed by hand.
    by_hand = torch.stack([invert(v, torch.sigmoid(_position_dependent(apply(v, x)))) for v in VIEWS]).mean(0)
    torch.testing.assert_close(tta, by_hand, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(2, 4, 8, 16, 24), (2, 4, 8, 16, 16)], ids=["y!=x", "y==x"])
def test_batched_equals_one_at_a_time(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    one = predict_tta(_position_dependent, x, batch_views=1)
    for batch_views in (None, 3, 16):
        torch.testing.assert_close(predict_tta(_position_dependent, x, batch_views=batch_views), one, atol=1e-6, rtol=0)


def test_forward_calls_and_grouping_by_shape() -> None:
    x = torch.randn((2, 4, 8, 16, 24))
    model = Counting(_per_voxel)
    predict_tta(model, x, batch_views=None)
    # Y != X: the 8 even-turn views share one call, the 8 odd-turn views (Y and X swapped) another.
    assert sorted(model.calls) == [(16, 4, 8, 16, 24), (16, 4, 8, 24, 16)]

    model = Counting(_per_voxel)
    predict_tta(model, x, batch_views=1)
    assert len(model.calls) == 16 and all(c[0] == 2 for c in model.calls)

    model = Counting(_per_voxel)
    predict_tta(model, x, batch_views=3)
    assert len(model.calls) == 2 * 3  # 8 views per shape in chunks of 3, 3, 2

    square = torch.randn((1, 4, 8, 16, 16))
    model = Counting(_per_voxel)
    predict_tta(model, square, batch_views=None)
    assert model.calls == [(16, 4, 8, 16, 16)]  # all 16 views in one call when Y == X


def test_low_precision_model_output_is_averaged_in_float32() -> None:
    x = torch.randn((1, 4, 8, 16, 24))
    out = predict_tta(lambda t: _per_voxel(t).to(torch.bfloat16), x, views=VIEWS[:4])
    assert out.dtype == torch.float32


def test_subset_of_views_and_bad_arguments() -> None:
    x = torch.randn((1, 4, 8, 16, 24))
    identity_only = predict_tta(_position_dependent, x, views=[VIEWS[0]])
    torch.testing.assert_close(identity_only, torch.sigmoid(_position_dependent(x)))
    with pytest.raises(ValueError, match="at least one view"):
        predict_tta(_per_voxel, x, views=[])
    with pytest.raises(ValueError, match="batch_views"):
        predict_tta(_per_voxel, x, batch_views=0)
    with pytest.raises(ValueError, match=r"\(B, C, Z, Y, X\)"):
        predict_tta(_per_voxel, x[0])
    with pytest.raises(TypeError, match="eval mode"):
        predict_tta(lambda t: (_per_voxel(t), []), x)
    with pytest.raises(ValueError, match="model_fn returned shape"):
        predict_tta(lambda t: _per_voxel(t)[..., :-1], x)


def test_with_a_real_tiny_model_batched_equals_one_at_a_time() -> None:
    # The models need sizes that are multiples of 8; a quarter turn of a padded volume stays valid.
    # GroupNorm works per sample, so stacking views in one batch must not change any view's output.
    from brats_lab.config import ModelConfig
    from brats_lab.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="equiunet_tiny", deep_supervision=True)).eval()
    x = torch.randn((1, 4, 8, 16, 24), generator=torch.Generator().manual_seed(4))
    batched = predict_tta(model, x)
    one = predict_tta(model, x, batch_views=1)
    assert batched.shape == (1, 3, 8, 16, 24)
    torch.testing.assert_close(batched, one, atol=1e-6, rtol=0)


def test_a_view_of_a_bare_volume_and_the_checks_of_its_arguments() -> None:
    # (Found by scripts/mutation.sh: no test gave a bare (Z, Y, X) volume, a 2-D array or View(k=2).)
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    half_turn = View(k=2)
    torch.testing.assert_close(apply(half_turn, x), x.flip(-1).flip(-2), rtol=0, atol=0)  # 180° in (Y, X)
    torch.testing.assert_close(invert(half_turn, apply(half_turn, x)), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ending in \(Z, Y, X\), got shape \(3, 4\)"):
        apply(half_turn, x[0])
    with pytest.raises(ValueError, match="View.k must be 0, 1, 2 or 3"):
        View(k=4)
