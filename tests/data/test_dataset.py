"""Torch datasets over a prepared cache: patches, determinism per (seed, epoch, index), whole volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from brats_lab import DataError
from brats_lab.data.augment import flip
from brats_lab.data.cache import Cache, prepare
from brats_lab.data.dataset import EpochSampler, TrainPatches, WholeVolume, WholeVolumes
from brats_lab.data.preprocess import crop, unpad


@pytest.fixture(scope="module")
def cache(phantom_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Cache:
    """The session's phantom cases (read-only) prepared into a cache of this module's own."""
    return prepare(phantom_dataset, "minmax", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_patch_shapes_and_dtypes(cache: Cache) -> None:
    ds = TrainPatches(cache, cache.case_ids, patch_size=24, augment="A", seed=0)
    assert len(ds) == len(cache.case_ids) == 4
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (4, 24, 24, 24) and image.dtype == torch.float32
        assert target.shape == (3, 24, 24, 24) and target.dtype == torch.bool
        assert torch.isfinite(image).all()


def test_patch_is_the_crop_of_image_and_regions(cache: Cache) -> None:
    ds = TrainPatches(cache, cache.case_ids, patch_size=(16, 24, 16), augment="none", seed=1)
    for i, case_id in enumerate(cache.case_ids):
        image, target = ds[i]
        _, where, params = ds.last_params
        assert params is None
        images, labels = cache.load(case_id)
        np.testing.assert_array_equal(image.numpy(), crop(images, where))
        np.testing.assert_array_equal(target.numpy(), cache.entry(case_id).convention.to_regions(crop(labels, where)))
    # With augmentation, the target is the same crop moved by the same flips.
    aug = TrainPatches(cache, cache.case_ids, patch_size=(16, 24, 16), augment="B", seed=1)
    for i, case_id in enumerate(cache.case_ids):
        _, target = aug[i]
        _, where, params = aug.last_params
        regions = cache.entry(case_id).convention.to_regions(crop(cache.load(case_id)[1], where))
        np.testing.assert_array_equal(target.numpy(), flip(regions, None, params.flips)[0])


def test_patches_larger_than_the_volume_are_zero_padded(cache: Cache) -> None:
    size = (40, 48, 24)  # z and y exceed every phantom's brain crop (32 x 36..41 x 30..33)
    ds = TrainPatches(cache, cache.case_ids, patch_size=size, augment="none", seed=2)
    for i, case_id in enumerate(cache.case_ids):
        image, target = ds[i]
        assert image.shape == (4, *size) and target.shape == (3, *size)
        _, where, _ = ds.last_params
        (zb, za), (yb, ya), _ = where.pads
        assert zb + za == size[0] - cache.entry(case_id).shape[1] and za + zb > 0
        assert not image[:, :zb].any() and not image[:, size[0] - za :].any()
        assert not target[:, :, :yb].any() and not target[:, :, size[1] - ya :].any()


def test_deterministic_per_seed_epoch_and_index(cache: Cache) -> None:
    a = TrainPatches(cache, cache.case_ids, 24, augment="A", seed=5)
    b = TrainPatches(cache, cache.case_ids, 24, augment="A", seed=5)
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in reversed(range(len(b))):  # order of access does not matter
            assert _same(a[i], b[i])
    first = [a[i] for i in range(len(a))]  # epoch 3
    a.set_epoch(4)
    assert not any(_same(x, a[i]) for i, x in enumerate(first))
    c = TrainPatches(cache, cache.case_ids, 24, augment="A", seed=6)
    c.set_epoch(4)
    assert not _same(a[0], c[0])


def test_data_loader_and_epoch_sampler(cache: Cache) -> None:
    ds = TrainPatches(cache, cache.case_ids, 16, augment="B", seed=0)
    sampler = EpochSampler(len(ds), seed=0)

    def epoch(e: int, workers: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ds.set_epoch(e)
        sampler.set_epoch(e)
        return list(DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers))

    batches = epoch(1)
    assert len(batches) == 2
    image, target = batches[0]
    assert image.shape == (2, 4, 16, 16, 16) and target.shape == (2, 3, 16, 16, 16) and target.dtype == torch.bool
    again = epoch(1)
    assert all(_same(x, y) for x, y in zip(batches, again))
    assert all(_same(x, y) for x, y in zip(batches, epoch(1, workers=2)))  # workers draw the same
    assert not _same(batches[0], epoch(2)[0])


def test_epoch_sampler() -> None:
    s = EpochSampler(10, seed=3)
    s.set_epoch(0)
    first = list(s)
    assert sorted(first) == list(range(10)) and first != list(range(10)) and len(s) == 10
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_an_epoch_of_fewer_cases_takes_the_first_of_each_epochs_order_and_visits_them_all() -> None:
    """`train.epoch_cases`: a larger dataset keeps the schedule's epochs the same length."""
    full, short = EpochSampler(50, seed=3), EpochSampler(50, seed=3, length=8)
    seen: set[int] = set()
    for epoch in range(40):
        full.set_epoch(epoch)
        short.set_epoch(epoch)
        order = list(short)
        assert order == list(full)[:8] and len(short) == 8 and len(set(order)) == 8
        seen.update(order)
    assert seen == set(range(50))  # a different share each epoch
    assert list(EpochSampler(5, shuffle=False, length=3)) == [0, 1, 2]
    for length in (0, 51):
        with pytest.raises(ValueError, match=f"length must be between 1 and the 50 items, got {length}"):
            EpochSampler(50, length=length)


def test_whole_volumes_padded_and_unpadded(cache: Cache) -> None:
    ds = WholeVolumes(cache, cache.case_ids, pad_multiple=16)
    loader = DataLoader(ds, batch_size=None)  # volumes differ in size: no batching
    items = list(loader)
    assert [item.case_id for item in items] == list(cache.case_ids)
    for item in items:
        assert isinstance(item, WholeVolume)
        assert all(n % 16 == 0 for n in item.image.shape[1:]) and item.image.dtype == torch.float32
        assert item.target.shape == (3, *item.image.shape[1:]) and item.target.dtype == torch.bool
        assert all(before == 0 for before, _ in item.pads)  # padding at the end only
        images, labels = cache.load(item.case_id)
        np.testing.assert_array_equal(unpad(item.image.numpy(), item.pads), images)
        regions = cache.entry(item.case_id).convention.to_regions(labels)
        np.testing.assert_array_equal(unpad(item.target.numpy(), item.pads), regions)
        assert regions[2].any()  # the phantoms have tumours: the comparison is not vacuous
        assert not item.image[(..., *[slice(n - a, n) for (_, a), n in zip(item.pads, item.image.shape[1:])])].any()


def test_unlabelled_cases(tmp_path: Path, case_writer) -> None:
    root = tmp_path / "data"
    case_writer(root, "BraTS20_Validation_001", size=(20, 18, 14), with_seg=False)
    cache = prepare(root, "minmax", progress=False)
    item = WholeVolumes(cache, cache.case_ids, pad_multiple=8)[0]
    assert item.target is None and all(n % 8 == 0 for n in item.image.shape[1:])
    with pytest.raises(DataError, match="training needs labels.*BraTS20_Validation_001"):
        TrainPatches(cache, cache.case_ids, 8)
    with pytest.raises(KeyError, match="not in the cache"):
        WholeVolumes(cache, ["nope"])
    with pytest.raises(ValueError, match="unknown augmentation"):
        TrainPatches(cache, [], 8, augment="C")  # type: ignore[arg-type]
