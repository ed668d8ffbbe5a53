import numpy as np
import pytest

from brats_lab.labels import BRATS_2020, BRATS_2023, REGIONS


@pytest.mark.parametrize("convention", [BRATS_2020, BRATS_2023])
def test_labels_to_regions_and_back_is_identity(convention):
    rng = np.random.default_rng(0)
    tumour_labels = [v for v in convention.labels if v and any(v in r for r in convention.regions.values())]
    seg = rng.choice([0, *tumour_labels], size=(9, 10, 11)).astype(np.uint8)
    regions = convention.to_regions(seg)
    assert regions.shape == (3, 9, 10, 11) and regions.dtype == bool
    labels = convention.from_regions(regions)
    np.testing.assert_array_equal(labels, seg)
    assert labels.dtype == np.uint8  # what the label maps are written as (found by scripts/mutation.sh)


def test_regions_are_nested_as_brats_defines_them():
    seg = np.array([0, 1, 2, 4], dtype=np.uint8)
    et, tc, wt = BRATS_2020.to_regions(seg)
    assert REGIONS == ("ET", "TC", "WT")
    assert et.tolist() == [False, False, False, True]
    assert tc.tolist() == [False, True, False, True]
    assert wt.tolist() == [False, True, True, True]


def test_2023_et_is_label_3_and_resection_cavity_is_no_tumour():
    et, tc, wt = BRATS_2023.to_regions(np.array([3, 4], dtype=np.uint8))
    assert et.tolist() == [True, False] and wt.tolist() == [True, False]


def test_inner_region_wins_when_painting_labels():
    regions = np.ones((3, 2), dtype=bool)  # ET, TC and WT all set
    assert BRATS_2020.from_regions(regions).tolist() == [4, 4]
    regions[0] = False  # TC and WT only
    assert BRATS_2020.from_regions(regions).tolist() == [1, 1]


def test_from_regions_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="3 region channels"):
        BRATS_2020.from_regions(np.zeros((2, 4, 4), dtype=bool))


# One voxel per (ET, TC, WT) combination, and its label, by hand. brats-lab: the innermost region
# claimed wins. The authors (src/inference.py): ET -> 4, then TC and not ET -> 1, then WT and not
# TC -> 2, in that order, so edema is painted last.
COMBINATIONS = [(et, tc, wt) for et in (0, 1) for tc in (0, 1) for wt in (0, 1)]
OURS = [0, 2, 1, 1, 4, 4, 4, 4]
AUTHORS = [0, 2, 1, 1, 4, 2, 4, 4]  # (ET, not TC, WT) -> 2: edema overwrites ET


def _authors_label_map(regions: np.ndarray) -> np.ndarray:
    """The authors' rebuild, written again from their definition (three masks, painted in order)."""
    et, tc, wt = regions.astype(bool)
    out = np.zeros(et.shape, np.uint8)
    out[et] = 4
    out[tc & ~et] = 1
    out[wt & ~tc] = 2
    return out


def test_label_map_of_every_region_combination():
    regions = np.array(COMBINATIONS, dtype=bool).T  # (3, 8): channels ET, TC, WT; one voxel each
    assert BRATS_2020.from_regions(regions).tolist() == OURS
    assert BRATS_2023.from_regions(regions).tolist() == [3 if v == 4 else v for v in OURS]  # 2023: ET is 3
    assert _authors_label_map(regions).tolist() == AUTHORS
    # The one combination where the two rules part: ET inside WT but outside TC.
    assert [c for c, a, b in zip(COMBINATIONS, OURS, AUTHORS) if a != b] == [(1, 0, 1)]
