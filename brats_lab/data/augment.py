"""Training augmentations of pipelines A and B (paper section 3.2), in numpy, in the data workers.

Each augmentation is a pair, as TorchIO does it: `sample_X(rng, shape)` draws every random choice
with a numpy Generator into a small frozen dataclass, and `apply_X(images, target, params)` is a
deterministic function of its inputs and those parameters. So a sample can be replayed exactly
from its recorded parameters, and the same seed gives the same output.

Arrays: `images` float (C, z, y, x); `target` any (..., z, y, x) array (regions (3, z, y, x), or a
label map (z, y, x)), or None. Spatial changes (flips) are applied to images and target together;
intensity changes touch the images only. Inputs are never modified (they may be read-only memory
maps of the cache); outputs are new, C-contiguous arrays.

Pipeline A (the paper, and the authors' code where the paper is silent). With probability 0.8 the
whole block runs, otherwise nothing happens:
  1. multiply each channel by its own factor from U(0.9, 1.1);
  2. add Gaussian noise to each channel, everywhere (background and padding included, as the
     authors' code did), of std 0.1 x the std of that channel's non-zero voxels after step 1;
  3. flip each spatial axis with probability 0.5;
  4. with probability 0.2 (0.16 overall) zero one channel chosen uniformly.
  The authors' code also swapped two random spatial axes and flipped one; the paper describes
  per-axis flips only, which is what this does (and it keeps non-cubic patches valid).

Pipeline B. Each of these with probability 0.2, independently, in this order:
  1. Gaussian noise of std 0.1 (the inputs are z-scores, so 0.1 of the brain's std), everywhere;
  2. gamma correction, one gamma from U(0.5, 2.5) for all channels, on the brain voxels only: per
     channel, the brain voxels are min-max rescaled to [0, 1], raised to gamma and mapped back to
     their original [min, max]. The background (voxels that were exactly 0 in that channel of the
     input, the crop padding included) is left as it is, i.e. exactly 0 unless noise was added;
  3. an intensity shift, one value from U(-0.1, 0.1) added to the brain voxels of every channel
     (background kept, as for gamma);
  then each spatial axis is flipped with probability 0.5.
  "Brain" means non-zero in that channel of the input, before any step: z-scored inputs have
  exact zeros only outside the brain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Kind = Literal["A", "B", "none"]
KINDS: tuple[str, ...] = ("A", "B", "none")

# Pipeline A
A_PROBABILITY = 0.8  # of the whole block
A_SCALE_RANGE = (0.9, 1.1)
A_NOISE_RELATIVE_STD = 0.1  # x the std of the channel's non-zero voxels
A_DROP_PROBABILITY = 0.2  # inside the block: 0.16 overall
# Pipeline B
B_PROBABILITY = 0.2  # of each intensity transform
B_NOISE_STD = 0.1
B_GAMMA_RANGE = (0.5, 2.5)
B_SHIFT_RANGE = (-0.1, 0.1)
FLIP_PROBABILITY = 0.5  # per spatial axis (inside A's block; always considered in B)

Flips = tuple[bool, bool, bool]  # z, y, x


@dataclass(frozen=True)
class ParamsA:
    """One draw of pipeline A. All None/False when the 80% block did not run."""

    scales: tuple[float, ...] | None  # per channel; None: not rescaled
    noise_seed: int | None  # seed of the noise field; None: no noise
    flips: Flips
    drop_channel: int | None  # the channel zeroed, if any


@dataclass(frozen=True)
class ParamsB:
    """One draw of pipeline B; None marks a transform that was not drawn."""

    noise_seed: int | None
    gamma: float | None
    shift: float | None
    flips: Flips


Params = ParamsA | ParamsB | None


# --- pipeline A ------------------------------------------------------------------------------


def sample_A(rng: np.random.Generator, shape: Sequence[int]) -> ParamsA:
    """Draw pipeline A's parameters for images of `shape` (C, z, y, x)."""
    channels = _channels(shape)
    if rng.random() >= A_PROBABILITY:
        return ParamsA(scales=None, noise_seed=None, flips=(False, False, False), drop_channel=None)
    scales = tuple(float(s) for s in rng.uniform(*A_SCALE_RANGE, size=channels))
    noise_seed = int(rng.integers(2**63 - 1))
    flips = _sample_flips(rng)
    drop = int(rng.integers(channels)) if rng.random() < A_DROP_PROBABILITY else None
    return ParamsA(scales=scales, noise_seed=noise_seed, flips=flips, drop_channel=drop)


def apply_A(
    images: np.ndarray, target: np.ndarray | None, params: ParamsA
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply a pipeline A draw (deterministic). Returns new (images float32, target) arrays."""
    out = np.array(images, dtype=np.float32, copy=True)
    if params.scales is not None:
        if len(params.scales) != out.shape[0]:
            raise ValueError(f"{len(params.scales)} scales for {out.shape[0]} channels")
        out *= np.asarray(params.scales, dtype=np.float32)[:, None, None, None]
    if params.noise_seed is not None:
        # The std of each channel's brain after rescaling (the paper's "normalized rescaled image").
        stds = np.array([_nonzero_std(channel) for channel in out], dtype=np.float32)
        noise = np.random.default_rng(params.noise_seed).standard_normal(out.shape, dtype=np.float32)
        out += noise * (A_NOISE_RELATIVE_STD * stds)[:, None, None, None]
    out, target = flip(out, target, params.flips)
    if params.drop_channel is not None:
        out[params.drop_channel] = 0.0
    return out, target


# --- pipeline B ------------------------------------------------------------------------------


def sample_B(rng: np.random.Generator, shape: Sequence[int]) -> ParamsB:
    """Draw pipeline B's parameters for images of `shape` (C, z, y, x)."""
    _channels(shape)
    noise_seed = int(rng.integers(2**63 - 1)) if rng.random() < B_PROBABILITY else None
    gamma = float(rng.uniform(*B_GAMMA_RANGE)) if rng.random() < B_PROBABILITY else None
    shift = float(rng.uniform(*B_SHIFT_RANGE)) if rng.random() < B_PROBABILITY else None
    return ParamsB(noise_seed=noise_seed, gamma=gamma, shift=shift, flips=_sample_flips(rng))


def apply_B(
    images: np.ndarray, target: np.ndarray | None, params: ParamsB
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply a pipeline B draw (deterministic). Returns new (images float32, target) arrays."""
    out = np.array(images, dtype=np.float32, copy=True)
    brain = out != 0  # per channel, of the input: the background that gamma and shift keep
    if params.noise_seed is not None:
        noise = np.random.default_rng(params.noise_seed).standard_normal(out.shape, dtype=np.float32)
        out += noise * np.float32(B_NOISE_STD)
    if params.gamma is not None:
        for channel, mask in zip(out, brain):
            channel[mask] = gamma_correct(channel[mask], params.gamma)
    if params.shift is not None:
        out[brain] += np.float32(params.shift)
    return flip(out, target, params.flips)


def gamma_correct(values: np.ndarray, gamma: float) -> np.ndarray:
    """Min-max rescale `values` to [0, 1], raise to `gamma`, map back to [min, max] (float32).

    Works for any sign (z-scores): the power acts on the rescaled values. Constant or empty input
    is returned unchanged.
    """
    if values.size == 0:
        return values.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return values.astype(np.float32)
    unit = (values.astype(np.float64) - low) / (high - low)
    return (low + (high - low) * unit**gamma).astype(np.float32)


# --- shared ----------------------------------------------------------------------------------


def flip(images: np.ndarray, target: np.ndarray | None, flips: Flips) -> tuple[np.ndarray, np.ndarray | None]:
    """Flip the spatial axes marked in `flips` (z, y, x) of images (C, z, y, x) and target
    (..., z, y, x) alike. Contiguous copies, so torch can take them without negative strides."""
    if len(flips) != 3:
        raise ValueError(f"flips must name the 3 spatial axes (z, y, x), got {flips}")
    axes = [axis for axis, f in enumerate(flips) if f]
    if axes:
        images = np.flip(images, axis=tuple(images.ndim - 3 + a for a in axes))
        if target is not None:
            target = np.flip(target, axis=tuple(target.ndim - 3 + a for a in axes))
    return np.ascontiguousarray(images), None if target is None else np.ascontiguousarray(target)


def sample(kind: Kind, rng: np.random.Generator, shape: Sequence[int]) -> Params:
    """Draw the parameters of augmentation `kind` ("A", "B" or "none": None)."""
    if kind == "A":
        return sample_A(rng, shape)
    if kind == "B":
        return sample_B(rng, shape)
    if kind == "none":
        return None
    raise ValueError(f"unknown augmentation {kind!r}; expected one of {', '.join(KINDS)}")


def apply(
    images: np.ndarray, target: np.ndarray | None, params: Params
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply any draw of `sample` (None: images as float32 and target, unchanged, contiguous)."""
    if isinstance(params, ParamsA):
        return apply_A(images, target, params)
    if isinstance(params, ParamsB):
        return apply_B(images, target, params)
    if params is None:
        return np.ascontiguousarray(images, dtype=np.float32), None if target is None else np.ascontiguousarray(target)
    raise TypeError(f"expected ParamsA, ParamsB or None, got {type(params).__name__}")


def augment(
    kind: Kind, images: np.ndarray, target: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None, Params]:
    """Sample and apply in one call; returns the parameters too, to log or replay the sample."""
    if target is not None and target.shape[-3:] != images.shape[-3:]:
        raise ValueError(f"images {images.shape} and target {target.shape} differ in (z, y, x)")
    params = sample(kind, rng, images.shape)
    return (*apply(images, target, params), params)


def _channels(shape: Sequence[int]) -> int:
    if len(shape) != 4:
        raise ValueError(f"expected images of shape (C, z, y, x), got {tuple(shape)}")
    return int(shape[0])


def _sample_flips(rng: np.random.Generator) -> Flips:
    return tuple(bool(f) for f in rng.random(3) < FLIP_PROBABILITY)  # type: ignore[return-value]


def _nonzero_std(channel: np.ndarray) -> float:
    values = channel[channel != 0]
    # float64: float32 sums over millions of voxels lose digits.
    return float(values.std(dtype=np.float64)) if values.size else 0.0
