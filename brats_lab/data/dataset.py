"""Torch datasets over a prepared `Cache`: random training patches and whole validation volumes.

`TrainPatches` gives one random patch per case per epoch (the authors' sampling): crop, regions,
augmentation. Every random draw of item `index` in epoch `epoch` comes from a numpy Generator
seeded with (seed, epoch, index), so the samples of an epoch do not depend on worker count, on
which worker draws them, or on what ran before: a run resumed at epoch e sees exactly the patches
the uninterrupted run saw. Call `set_epoch(epoch)` before iterating each epoch; with DataLoader
workers keep `persistent_workers=False` (the default), since workers copy the dataset when an
epoch's iteration starts. `EpochSampler` gives the matching seeded order of cases per epoch.

`WholeVolumes` gives each case's whole brain crop, zero-padded at the end of each axis to a
multiple of `pad_multiple`, for validation and inference; `unpad(prediction, pads)` undoes it.
Use it with `DataLoader(..., batch_size=None)`: volumes differ in size and the target may be None.

Targets are the region channels (ET, TC, WT) as bool, derived from the cached label map with the
case's own label convention; images are float32 (4, z, y, x).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from brats_lab import DataError
from brats_lab.data import augment as aug
from brats_lab.data.cache import Cache
from brats_lab.data.preprocess import Pads, crop, pad_to_multiple, sample_crop


# Stream tags: the item draws and the epoch orders never share a stream with each other, nor with
# `default_rng(seed)` used elsewhere (numpy treats the seed lists [s, e] and [s, e, 0] alike, so
# plain lists would collide; a spawn key after the seed does not).
_ITEM_STREAM, _ORDER_STREAM = 1, 2


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The Generator of item `index` in `epoch`: independent streams per (seed, epoch, index)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_ITEM_STREAM, epoch, index)))


class TrainPatches(Dataset):
    """Random fixed-size training patches: item i of an epoch is a patch of `case_ids[i]`.

    Returns `(image, target)`: float32 (4, *patch_size) and bool (3, *patch_size), the latter the
    regions ET, TC, WT. The crop position (and the zero padding of axes shorter than the patch)
    is drawn by `sample_crop`, then the augmentation `augment` ("A", "B" or "none") is drawn and
    applied; both from `item_rng(seed, epoch, index)`. `last_params` (in the process that drew
    it) keeps the draws of the latest item for logging.
    """

    def __init__(
        self,
        cache: Cache,
        case_ids: Sequence[str],
        patch_size: int | Sequence[int],
        augment: aug.Kind = "none",
        seed: int = 0,
    ) -> None:
        if augment not in aug.KINDS:
            raise ValueError(f"unknown augmentation {augment!r}; expected one of {', '.join(aug.KINDS)}")
        self.patch_size = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be 3 positive sizes (z, y, x), got {patch_size}")
        self.cache = cache
        self.case_ids = list(case_ids)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.last_params: tuple = ()
        unlabelled = [c for c in self.case_ids if not cache.entry(c).has_labels]
        if unlabelled:
            raise DataError(f"training needs labels; no seg file for {', '.join(unlabelled)} in the cache {cache.dir}")

    def set_epoch(self, epoch: int) -> None:
        """Draw the patches of `epoch` from now on (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case_id = self.case_ids[index]
        rng = item_rng(self.seed, self.epoch, index)
        images, labels = self.cache.load(case_id, mmap=True)
        assert labels is not None  # checked in __init__
        where = sample_crop(images.shape[-3:], self.patch_size, rng)
        # Crop the memory maps first: only the patch's voxels are read from disk, and the regions
        # are computed on the patch, not the whole volume.
        image = crop(images, where)
        target = self.cache.entry(case_id).convention.to_regions(crop(labels, where))
        params = aug.sample(self.augment, rng, image.shape)
        image, target = aug.apply(image, target, params)  # type: ignore[assignment]
        self.last_params = (case_id, where, params)
        return _tensor(image, np.float32), _tensor(target, np.bool_)


class WholeVolume(NamedTuple):
    """One case for validation or inference."""

    case_id: str
    image: torch.Tensor  # float32 (4, Z, Y, X), each a multiple of pad_multiple
    target: torch.Tensor | None  # bool (3, Z, Y, X) regions ET, TC, WT; None without labels
    pads: Pads  # (before, after) per z, y, x: `unpad(prediction, pads)` gives the brain crop back


class WholeVolumes(Dataset):
    """The brain crops of `case_ids`, padded at the end of each axis to a multiple of `pad_multiple`.

    Deterministic (no random padding split, unlike the authors' validation). Items are
    `WholeVolume(case_id, image, target, pads)`; `target` is None for a case without labels.
    The prediction in original geometry: `paste_back(unpad(pred, pads), entry.bbox,
    entry.original_shape)` with `entry = cache.entry(case_id)`.
    """

    def __init__(self, cache: Cache, case_ids: Sequence[str], pad_multiple: int = 16) -> None:
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        for case_id in case_ids:
            cache.entry(case_id)  # an unknown id fails here, not in a worker mid-validation
        self.cache = cache
        self.case_ids = list(case_ids)
        self.pad_multiple = pad_multiple

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> WholeVolume:
        case_id = self.case_ids[index]
        images, labels = self.cache.load(case_id, mmap=True)
        image, pads = pad_to_multiple(np.asarray(images), self.pad_multiple)
        target = None
        if labels is not None:
            target, _ = pad_to_multiple(self.cache.entry(case_id).convention.to_regions(np.asarray(labels)), self.pad_multiple)
        return WholeVolume(
            case_id,
            _tensor(image, np.float32),
            None if target is None else _tensor(target, np.bool_),
            pads,
        )


class EpochSampler(Sampler[int]):
    """A seeded random order of `n` items per epoch (or 0..n-1 with `shuffle=False`); with
    `length` (1 to n), only its first `length` items, a different share each epoch.

    The order of epoch e depends only on (seed, e), so a resumed run visits the cases in the same
    order; call `set_epoch` with the dataset's.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, length: int | None = None) -> None:
        if length is not None and not 1 <= length <= n:
            raise ValueError(f"length must be between 1 and the {n} items, got {length}")
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.length = n if length is None else length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.length))
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_ORDER_STREAM, self.epoch)))
        order = rng.permutation(self.n)
        return iter(order[: self.length].tolist())

    def __len__(self) -> int:
        return self.length


def _tensor(array: np.ndarray, dtype: type) -> torch.Tensor:
    """A tensor that owns its memory: cache memory maps are read-only and must not be shared."""
    array = np.asarray(array, dtype=dtype)
    if not (array.flags.writeable and array.flags.c_contiguous and array.flags.owndata):
        array = np.array(array, dtype=dtype, copy=True, order="C")
    return torch.from_numpy(array)
