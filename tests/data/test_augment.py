"""Augmentations A and B: seeded, replayable, flips shared with the target, the paper's probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from brats_lab.data.augment import (
    ParamsA,
    ParamsB,
    apply,
    apply_A,
    apply_B,
    augment,
    flip,
    gamma_correct,
    sample,
    sample_A,
    sample_B,
)

SHAPE = (4, 12, 10, 8)  # (C, z, y, x): anisotropic, so a wrong axis shows
NO_FLIP = (False, False, False)


def _case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 'brain' (non-zero ellipsoid in each channel) and an asymmetric target (3, z, y, x)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE[1:])
    brain = ((z - 6) / 5.5) ** 2 + ((y - 5) / 4.5) ** 2 + ((x - 4) / 3.5) ** 2 < 1
    images = np.where(brain, rng.normal(0.5, 0.1, SHAPE), 0).astype(np.float32)
    target = np.zeros((3, *SHAPE[1:]), dtype=bool)
    target[:, 2:5, 1:4, 4:7] = True  # off-centre on every axis
    target[0, 3, 2, 5] = False  # and the channels differ
    return images, target


def _readonly(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flags.writeable = False  # as the cache's memory maps are
    return array


@pytest.mark.parametrize("kind", ["A", "B"])
def test_same_seed_same_output_and_params_replay(kind: str) -> None:
    images, target = _case()
    images, target = _readonly(images), _readonly(target)
    runs = [augment(kind, images, target, np.random.default_rng(7)) for _ in range(2)]
    (i1, t1, p1), (i2, t2, p2) = runs
    assert p1 == p2
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(t1, t2)
    i3, t3 = apply(images, target, p1)  # the recorded parameters alone reproduce the sample
    np.testing.assert_array_equal(i1, i3)
    np.testing.assert_array_equal(t1, t3)
    assert i1.dtype == np.float32 and t1.dtype == bool and i1.flags.c_contiguous and t1.flags.c_contiguous
    other, _, _ = augment(kind, images, target, np.random.default_rng(8))
    assert not np.array_equal(i1, other)
    np.testing.assert_array_equal(images, _case()[0])  # inputs untouched


@pytest.mark.parametrize("kind", ["A", "B"])
def test_flips_move_image_and_target_together(kind: str) -> None:
    _, target = _case()
    # Every channel marks the ET region: 11 inside, 1 elsewhere (non-zero, so all of it is brain).
    images = np.repeat(1.0 + 10.0 * target[:1].astype(np.float32), 4, axis=0)
    seen = set()
    for seed in range(60):
        out, out_target, params = augment(kind, images, target, np.random.default_rng(seed))
        seen.add(params.flips)
        # A dropped channel is all zeros: the max over channels still shows the marker.
        np.testing.assert_array_equal(out.max(axis=0) > 6.0, out_target[0])
        np.testing.assert_array_equal(out_target, flip(target, None, params.flips)[0])
    assert len(seen) == 8  # every combination of the three axes occurred


def test_flip_axes() -> None:
    images, target = _case()
    out, out_target = flip(images, target, (False, True, False))
    np.testing.assert_array_equal(out, images[:, :, ::-1, :])
    np.testing.assert_array_equal(out_target, target[:, :, ::-1, :])
    labels = target[0].astype(np.uint8)  # a (z, y, x) target works too
    assert np.array_equal(flip(images, labels, (True, False, True))[1], labels[::-1, :, ::-1])
    with pytest.raises(ValueError, match="3 spatial axes"):
        flip(images, target, (True, False))  # type: ignore[arg-type]


def test_probabilities_of_a() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_A(rng, SHAPE) for _ in range(2000)]
    applied = [p for p in draws if p.scales is not None]
    assert len(applied) / 2000 == pytest.approx(0.8, abs=0.03)
    assert sum(p.drop_channel is not None for p in draws) / 2000 == pytest.approx(0.16, abs=0.025)
    for axis in range(3):
        assert sum(p.flips[axis] for p in draws) / 2000 == pytest.approx(0.4, abs=0.03)  # 0.8 x 0.5
    skipped = [p for p in draws if p.scales is None]
    assert all(p == ParamsA(None, None, NO_FLIP, None) for p in skipped)
    scales = np.array([p.scales for p in applied])
    assert scales.shape == (len(applied), 4) and scales.min() >= 0.9 and scales.max() <= 1.1
    assert np.all(scales.std(axis=1) > 0)  # one factor per channel, not one for all
    drops = np.bincount([p.drop_channel for p in draws if p.drop_channel is not None], minlength=4)
    assert drops.min() > 0.6 * drops.mean()


def test_probabilities_of_b() -> None:
    rng = np.random.default_rng(1)
    draws = [sample_B(rng, SHAPE) for _ in range(2000)]
    for field in ("noise_seed", "gamma", "shift"):
        assert sum(getattr(p, field) is not None for p in draws) / 2000 == pytest.approx(0.2, abs=0.025)
    for axis in range(3):
        assert sum(p.flips[axis] for p in draws) / 2000 == pytest.approx(0.5, abs=0.03)
    gammas = [p.gamma for p in draws if p.gamma is not None]
    shifts = [p.shift for p in draws if p.shift is not None]
    assert 0.5 <= min(gammas) and max(gammas) <= 2.5 and -0.1 <= min(shifts) and max(shifts) <= 0.1


def test_a_noise_is_relative_to_each_channels_brain_std() -> None:
    images, _ = _case()
    stds = [0.05, 0.1, 0.2, 0.4]
    rng = np.random.default_rng(3)
    brain = images[0] != 0
    for c, s in enumerate(stds):
        images[c][brain] = rng.normal(1.0, s, brain.sum())
    params = ParamsA(scales=(1.0, 1.0, 2.0, 1.0), noise_seed=5, flips=NO_FLIP, drop_channel=None)
    out, _ = apply_A(images, None, params)
    noise = out - images * np.array(params.scales, dtype=np.float32)[:, None, None, None]
    for c in range(4):
        expected = 0.1 * params.scales[c] * images[c][brain].std()  # std after the rescale
        assert noise[c].std() == pytest.approx(expected, rel=0.1)
        assert np.all(noise[c][~brain] != 0)  # noise everywhere, background included


def test_a_drop_channel_and_scales() -> None:
    images, target = _case()
    out, out_target = apply_A(images, target, ParamsA((0.9, 1.0, 1.05, 1.1), None, NO_FLIP, 2))
    assert not out[2].any()
    np.testing.assert_allclose(out[3], images[3] * 1.1, rtol=1e-6)
    np.testing.assert_array_equal(out_target, target)


def test_b_noise_is_absolute() -> None:
    images, _ = _case()
    out, _ = apply_B(images, None, ParamsB(noise_seed=9, gamma=None, shift=None, flips=NO_FLIP))
    assert (out - images).std() == pytest.approx(0.1, rel=0.05)


def test_b_gamma_keeps_background_zero_and_brain_range() -> None:
    images, _ = _case()
    images[1] = images[1] * 4 - 2  # negative values too, as z-scores have
    brain = images != 0
    out, _ = apply_B(images, None, ParamsB(noise_seed=None, gamma=2.0, shift=None, flips=NO_FLIP))
    assert np.all(out[~brain] == 0)  # the background is exactly 0 still
    for c in range(4):
        before, after = images[c][brain[c]], out[c][brain[c]]
        assert after.min() == pytest.approx(before.min()) and after.max() == pytest.approx(before.max())
        unit = (before - before.min()) / (before.max() - before.min())
        np.testing.assert_allclose(after, before.min() + (before.max() - before.min()) * unit**2, rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(after[np.argsort(before)]) >= 0)  # monotone: the order of voxels kept
    same, _ = apply_B(images, None, ParamsB(None, 1.0, None, NO_FLIP))
    np.testing.assert_allclose(same, images, atol=1e-6)
    np.testing.assert_array_equal(gamma_correct(np.full(5, 3.0, np.float32), 2.0), np.full(5, 3.0))


def test_b_shift_moves_the_brain_only() -> None:
    images, _ = _case()
    brain = images != 0
    out, _ = apply_B(images, None, ParamsB(noise_seed=None, gamma=None, shift=-0.05, flips=NO_FLIP))
    np.testing.assert_allclose(out[brain], images[brain] - 0.05, atol=1e-6)
    assert np.all(out[~brain] == 0)


def test_none_and_errors() -> None:
    images, target = _case()
    out, out_target, params = augment("none", _readonly(images), target, np.random.default_rng(0))
    assert params is None
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(out_target, target)
    with pytest.raises(ValueError, match="unknown augmentation"):
        sample("C", np.random.default_rng(0), SHAPE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(C, z, y, x\)"):
        sample_A(np.random.default_rng(0), SHAPE[1:])
    with pytest.raises(ValueError, match="differ in"):
        augment("A", images, target[:, :-1], np.random.default_rng(0))
