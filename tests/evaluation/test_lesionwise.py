"""Lesion-wise metrics: every value against the organisers' package on hand-built hard cases, and
the 2023 scorer's rules on cases whose answers follow from them by hand."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
import warnings

import numpy as np
import pytest
from scipy import ndimage

from brats_lab.evaluation.lesionwise import (
    LESION_METRICS,
    RULES,
    case_scores,
    lesion_columns,
    lesion_metrics,
    rules_for,
    RULE_NAMES,
)
from brats_lab.evaluation.metrics import METRICS
from brats_lab.labels import BRATS_2020, BRATS_2023, REGIONS

SHAPE = (20, 24, 28)  # (z, y, x)
NETC, SNFH, ET = 1, 2, 3


def volume(*boxes: tuple[tuple[int, int, int], tuple[int, int, int], int], shape=SHAPE) -> np.ndarray:
    """A label map painted with boxes ((z0, y0, x0), (z1, y1, x1), label), later boxes on top."""
    out = np.zeros(shape, np.uint8)
    for lo, hi, label in boxes:
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = label
    return out


def tumour(z: int, y: int, x: int, size: int = 6) -> list:
    """A tumour at (z, y, x): edema, with a core of NETC and an enhancing rim inside."""
    return [
        ((z, y, x), (z + size, y + size, x + size), SNFH),
        ((z + 1, y + 1, x + 1), (z + size - 1, y + size - 1, x + size - 1), ET),
        ((z + 2, y + 2, x + 2), (z + size - 2, y + size - 2, x + size - 2), NETC),
    ]


# Hard cases for the oracle: (prediction, reference, spacing (z, y, x)).
CASES = {
    "several lesions, shifted and shrunk": (
        volume(*tumour(2, 2, 2), *tumour(3, 13, 3, 7), *tumour(11, 4, 17, 5)),
        volume(*tumour(2, 3, 2), *tumour(2, 13, 4, 8), *tumour(12, 4, 16, 6)),
        (1.0, 1.0, 1.0),
    ),
    "lesion split in two by the prediction": (
        volume(((4, 4, 4), (12, 10, 11), ET), ((4, 4, 13), (12, 10, 20), ET)),
        volume(((4, 4, 4), (12, 10, 20), ET)),
        (1.0, 1.0, 1.0),
    ),
    "two lesions merged by the prediction": (
        volume(((4, 4, 3), (12, 10, 22), ET)),
        volume(((4, 4, 4), (12, 10, 11), ET), ((5, 4, 14), (12, 9, 21), ET)),
        (1.0, 1.0, 1.0),
    ),
    "false-positive islands and a missed lesion": (
        volume(*tumour(3, 3, 3, 8), ((16, 18, 22), (18, 20, 24), ET), ((1, 20, 1), (2, 21, 2), SNFH)),
        volume(*tumour(3, 3, 3, 8), *tumour(12, 14, 14, 5)),
        (1.0, 1.0, 1.0),
    ),
    "lesions just under and over 50 voxels": (
        volume(((2, 2, 2), (7, 7, 4), ET), ((10, 10, 10), (15, 15, 13), ET), ((14, 2, 20), (18, 5, 24), SNFH)),
        volume(((2, 2, 2), (7, 7, 4), ET), ((10, 10, 11), (13, 14, 15), ET), ((2, 15, 15), (4, 20, 20), NETC)),
        (1.0, 1.0, 1.0),
    ),
    "enhancing tumour only in the reference": (
        volume(((4, 4, 4), (12, 12, 12), NETC)),
        volume(((4, 4, 4), (12, 12, 12), NETC), ((6, 6, 6), (9, 9, 9), ET)),
        (1.0, 1.0, 1.0),
    ),
    "enhancing tumour only in the prediction": (
        volume(((4, 4, 4), (12, 12, 12), SNFH), ((6, 6, 6), (9, 9, 9), ET)),
        volume(((4, 4, 4), (12, 12, 12), SNFH)),
        (1.0, 1.0, 1.0),
    ),
    "no tumour core anywhere, one lesion missed entirely": (
        volume(((2, 2, 2), (6, 6, 6), SNFH)),
        volume(((2, 2, 2), (6, 6, 6), SNFH), ((12, 14, 16), (17, 20, 22), SNFH)),
        (1.0, 1.0, 1.0),
    ),
    "masks that do not overlap at all": (
        volume(((2, 2, 2), (6, 6, 6), ET)),
        volume(((12, 14, 16), (17, 20, 22), ET)),
        (1.0, 1.0, 1.0),
    ),
    # 26-connectivity: a lesion is one lesion through a shared corner or edge (6-connectivity
    # would see two here, and score the prediction's second cube as a true positive).
    "ET cubes touching only at a corner, the prediction's apart": (
        volume(((4, 4, 4), (7, 7, 7), ET), ((8, 7, 7), (11, 10, 10), ET)),
        volume(((4, 4, 4), (7, 7, 7), ET), ((7, 7, 7), (10, 10, 10), ET)),
        (1.0, 1.0, 1.0),
    ),
    "ET cubes touching only along an edge, the prediction's apart": (
        volume(((4, 4, 4), (7, 7, 7), ET), ((8, 7, 4), (11, 10, 7), ET)),
        volume(((4, 4, 4), (7, 7, 7), ET), ((7, 7, 4), (10, 10, 7), ET)),
        (1.0, 1.0, 1.0),
    ),
    # Matching R1-P1 (Dice 0.76) leaves R2 and P2, which do not overlap; matching R1-P2 (0.15)
    # and R2-P1 (0.10) pairs everything up at a lower total Dice. The package keeps the good match.
    "one good match rather than two poor ones": (
        volume(((4, 4, 7), (8, 8, 18), ET), ((4, 4, 3), (8, 8, 6), ET)),
        volume(((4, 4, 5), (8, 8, 15), ET), ((4, 4, 17), (8, 8, 27), ET)),
        (1.0, 1.0, 1.0),
    ),
    "anisotropic spacing, lesions on the image border": (
        volume(*tumour(0, 0, 0, 7), *tumour(14, 17, 22, 6), ((9, 10, 10), (11, 14, 12), SNFH)),
        volume(*tumour(0, 1, 0, 7), *tumour(13, 18, 21, 7)),
        (3.0, 0.9, 1.2),
    ),
}


@functools.cache
def _official_evaluator():
    import brats_evaluation  # the README's test command installs it: missing, the test fails rather than skips
    from panoptica import Panoptica_Evaluator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Panoptica_Evaluator.load_from_config(brats_evaluation.config_path("gli"))


def _official(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """brats-evaluation's `gli` results per region, mapped to our names: TP/FP/FN, pq_dsc,
    sq_hd95 and the global Dice and HD95; inf written as 373, as its result parser does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = _official_evaluator().evaluate(pred, ref, voxelspacing=tuple(spacing), verbose=False)
    out = {}
    for region in REGIONS:
        r = results[region.lower()]
        values = {
            "lesion_tp": r.tp,
            "lesion_fp": r.fp,
            "lesion_fn": r.fn,
            "lesion_dice": r.pq_dsc,
            "lesion_hd95": r.sq_hd95,
            "volume_dice": r.global_bin_dsc,
            "volume_hd95": r.global_bin_hd95,
        }
        out[region] = {k: 373.0 if isinstance(v, float) and math.isinf(v) else v for k, v in values.items()}
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_every_value_equals_brats_evaluation(name: str) -> None:
    pred, ref, spacing = CASES[name]
    assert_equals_brats_evaluation(pred, ref, spacing, name)


def assert_equals_brats_evaluation(pred: np.ndarray, ref: np.ndarray, spacing, name: str) -> dict:
    """Every value of every region under the `gli` rules equals the package's; returns ours."""
    expected = _official(pred, ref, spacing)
    ours = lesion_metrics(pred, ref, spacing, "gli")
    assert list(ours) == list(REGIONS)
    for region in REGIONS:
        got = ours[region].as_dict()
        assert list(got) == list(LESION_METRICS)
        for metric, want in expected[region].items():
            value = got[metric]
            if isinstance(want, float) and math.isnan(want):
                assert math.isnan(value), f"{name}: {region} {metric} = {value}, official NaN"
            else:
                assert value == want, f"{name}: {region} {metric} = {value}, official {want}"
    return ours


def test_the_hard_cases_are_hard() -> None:
    """The oracle cases exercise what they are named for (independent of either implementation)."""
    results = {name: lesion_metrics(p, r, s, "gli") for name, (p, r, s) in CASES.items()}
    split = results["lesion split in two by the prediction"]["ET"]
    assert (split.lesion_tp, split.lesion_fp, split.lesion_fn) == (1, 1, 0)
    merged = results["two lesions merged by the prediction"]["ET"]
    assert (merged.lesion_tp, merged.lesion_fp, merged.lesion_fn) == (1, 0, 1)
    several = results["several lesions, shifted and shrunk"]
    assert all(several[r].lesion_tp == 3 for r in REGIONS)
    only_ref = results["enhancing tumour only in the reference"]["ET"]
    assert (only_ref.lesion_tp, only_ref.lesion_fn, only_ref.lesion_dice, only_ref.lesion_hd95) == (0, 1, 0.0, 373.0)
    only_pred = results["enhancing tumour only in the prediction"]["ET"]
    assert (only_pred.lesion_fp, only_pred.volume_dice, only_pred.volume_hd95) == (1, 0.0, 373.0)
    nowhere = results["no tumour core anywhere, one lesion missed entirely"]["TC"]
    assert all(math.isnan(getattr(nowhere, m)) for m in ("lesion_dice", "lesion_hd95", "volume_dice", "volume_hd95"))
    apart = results["masks that do not overlap at all"]["ET"]
    assert apart.volume_hd95 == 373.0  # official: no voxel in common is "no true positive", not a distance
    good = results["one good match rather than two poor ones"]["ET"]
    assert (good.lesion_tp, good.lesion_fp, good.lesion_fn) == (1, 1, 1)
    assert good.lesion_dice == pytest.approx(2 * 8 / 21 / 2)  # R1-P1's Dice 16/21, times tp / (tp + (fp + fn) / 2)
    for name in ("ET cubes touching only at a corner, the prediction's apart",
                 "ET cubes touching only along an edge, the prediction's apart"):
        et = results[name]["ET"]  # one reference lesion; the prediction's second cube is a false positive
        assert (et.lesion_tp, et.lesion_fp, et.lesion_fn) == (1, 1, 0)
        assert et.lesion_dice == pytest.approx(2 * 27 / (54 + 27) / 1.5)


def test_whole_volume_hd95_ignores_spacing_as_the_official_package_does() -> None:
    """panoptica computes its global metrics without the spacing; the lesion-wise HD95 uses it.
    One lesion shifted by one voxel along z: 3 mm apart lesion-wise, 1 voxel whole-volume."""
    ref = volume(((4, 4, 4), (10, 10, 10), ET))
    pred = volume(((5, 4, 4), (11, 10, 10), ET))
    et = lesion_metrics(pred, ref, (3.0, 1.0, 1.0), "gli")["ET"]
    assert et.lesion_hd95 == 3.0
    assert et.volume_hd95 == 1.0


# --------------------------------------------------------------------------------------------
# The 2023 challenge scorer's rules, by hand: dilation 3 (18-neighbourhood), lesions of at most
# 50 mm^3 ignored, FP and FN lesions scored Dice 0 and HD95 374, nothing to score = Dice 1, HD95 0.


def wt(pred: np.ndarray, ref: np.ndarray, spacing=(1.0, 1.0, 1.0)):
    return lesion_metrics(pred, ref, spacing, "brats2023-gli")


def test_2023_false_positive_island_counts_dice_0_and_hd95_374() -> None:
    ref = volume(((2, 2, 2), (7, 7, 7), SNFH))
    pred = volume(((2, 2, 2), (7, 7, 7), SNFH), ((14, 16, 18), (17, 19, 21), SNFH))
    m = wt(pred, ref)["WT"]
    assert (m.lesion_tp, m.lesion_fp, m.lesion_fn) == (1, 1, 0)
    assert m.lesion_dice == (1.0 + 0.0) / 2
    assert m.lesion_hd95 == (0.0 + 374.0) / 2
    assert m.volume_dice == 2 * 125 / (125 + 125 + 27)
    # No ET or TC in either map: nothing to score is Dice 1 and HD95 0, for lesions and volume.
    for region in ("ET", "TC"):
        e = wt(pred, ref)[region]
        assert (e.lesion_dice, e.lesion_hd95, e.volume_dice, e.volume_hd95) == (1.0, 0.0, 1.0, 0.0)
        assert (e.lesion_tp, e.lesion_fp, e.lesion_fn) == (0, 0, 0)


@pytest.mark.parametrize(("voxels", "spacing", "counted"), [
    (50, (1.0, 1.0, 1.0), False),  # 50 mm^3: at most 50, ignored
    (51, (1.0, 1.0, 1.0), True),
    (26, (2.0, 1.0, 1.0), True),  # 52 mm^3: the limit is a volume, not a voxel count
    (25, (2.0, 1.0, 1.0), False),
    (51, (1.0, 2.0, 0.5), True),  # (z, y, x) spacings all different: 51 mm^3
    (50, (1.0, 2.0, 0.5), False),
])
def test_2023_missed_lesions_at_the_size_limit(voxels: int, spacing, counted: bool) -> None:
    big = ((2, 2, 2), (8, 8, 8), SNFH)
    ref = volume(big)
    # A missed lesion of exactly `voxels` voxels: a 3 x 5 x 5 block filled in raster order up to
    # that count (connected), 7 voxels from the big one along y (their dilations do not touch).
    block = np.zeros(75, np.uint8)
    block[:voxels] = SNFH
    ref[13:16, 15:20, 18:23] = block.reshape(3, 5, 5)
    assert np.count_nonzero(ref) == 216 + voxels
    pred = volume(big)
    m = wt(pred, ref, spacing)["WT"]
    if counted:
        assert (m.lesion_tp, m.lesion_fn) == (1, 1)
        assert (m.lesion_dice, m.lesion_hd95) == (0.5, 187.0)
    else:
        assert (m.lesion_tp, m.lesion_fn) == (1, 0)
        assert (m.lesion_dice, m.lesion_hd95) == (1.0, 0.0)


@pytest.mark.parametrize(("gap", "merged"), [(6, True), (7, False)])
def test_2023_reference_lesions_merge_when_their_dilations_touch(gap: int, merged: bool) -> None:
    """Two 5 x 5 x 5 lesions `gap` empty voxels apart along x: dilated 3 voxels each, they touch
    (26-connected) when the gap is at most 6. The prediction finds only the first."""
    a = ((4, 4, 2), (9, 9, 7), SNFH)
    b = ((4, 4, 7 + gap), (9, 9, 12 + gap), SNFH)
    m = wt(volume(a), volume(a, b))["WT"]
    if merged:  # one lesion of 250 voxels, half found
        assert (m.lesion_tp, m.lesion_fp, m.lesion_fn) == (1, 0, 0)
        assert m.lesion_dice == 2 * 125 / (250 + 125)
    else:
        assert (m.lesion_tp, m.lesion_fp, m.lesion_fn) == (1, 0, 1)
        assert (m.lesion_dice, m.lesion_hd95) == (0.5, 187.0)


def test_2023_each_lesion_is_scored_against_its_own_predicted_components() -> None:
    """Two reference lesions far apart (their dilations do not touch) and a false positive made of
    two cubes touching at a corner (one component, 26-connected), at spacings that differ per
    axis. Lesion A (6^3 voxels) is predicted without its two lowest x layers (Dice 2 x 144 / 360);
    lesion B with one extra layer along z and a 2 x 2 x 13 bar reaching out of its dilation
    along -x (Dice 2 x 216 / (216 + 216 + 36 + 52)); each HD95 is medpy's on the lesion and its
    component. The false positive scores 0 and 374. The whole-volume Dice and HD95 are medpy's."""
    from medpy.metric import binary as medpy_binary

    def hd95(pred_mask, ref_mask):
        return float(medpy_binary.hd95(pred_mask > 0, ref_mask > 0, voxelspacing=spacing))

    spacing = (1.0, 1.5, 2.0)  # (z, y, x)
    shape = (30, 30, 40)
    a, b = [((2, 2, 2), (8, 8, 8), SNFH)], [((18, 18, 28), (24, 24, 34), SNFH)]
    a_pred = [((2, 2, 4), (8, 8, 8), SNFH)]
    b_pred = [((18, 18, 28), (25, 24, 34), SNFH), ((20, 20, 15), (22, 22, 28), SNFH)]
    false_positive = [((10, 10, 18), (12, 12, 20), SNFH), ((12, 12, 20), (14, 14, 22), SNFH)]
    ref = volume(*a, *b, shape=shape)
    pred = volume(*a_pred, *b_pred, *false_positive, shape=shape)
    hd95_a = hd95(volume(*a_pred, shape=shape), volume(*a, shape=shape))
    hd95_b = hd95(volume(*b_pred, shape=shape), volume(*b, shape=shape))
    assert hd95_a > 0 and hd95_b > 0
    m = wt(pred, ref, spacing)["WT"]
    assert (m.lesion_tp, m.lesion_fp, m.lesion_fn) == (2, 1, 0)
    assert m.lesion_dice == pytest.approx((288 / 360 + 432 / 520 + 0.0) / 3, rel=1e-12, abs=0)
    assert m.lesion_hd95 == pytest.approx((hd95_a + hd95_b + 374.0) / 3, rel=1e-12, abs=0)
    # The whole-volume Dice and HD95 (with the spacing, unlike the package's): medpy's on the two masks,
    # for these maps, a prediction inside the reference (B missed), one of as many voxels (all shifted)
    # and the reference itself.
    assert m.volume_dice == pytest.approx(float(medpy_binary.dc(pred > 0, ref > 0)), rel=1e-12, abs=0)
    for other in (pred, volume(*a, shape=shape), np.roll(ref, 1, axis=2)):
        assert wt(other, ref, spacing)["WT"].volume_hd95 == pytest.approx(hd95(other, ref), rel=1e-12, abs=0)
    assert (wt(ref, ref, spacing)["WT"].volume_dice, wt(ref, ref, spacing)["WT"].volume_hd95) == (1.0, 0.0)


def test_2023_prediction_near_a_lesion_is_a_true_positive_with_dice_0() -> None:
    """A predicted lesion 2 voxels beside the reference lesion touches its dilation: a true
    positive (not a false positive), scored Dice 0. Under brats-evaluation it is FP + FN."""
    ref = volume(((4, 4, 4), (9, 9, 9), SNFH))
    pred = volume(((4, 4, 11), (9, 9, 16), SNFH))
    m = wt(pred, ref)["WT"]
    assert (m.lesion_tp, m.lesion_fp, m.lesion_fn, m.lesion_dice) == (1, 0, 0, 0.0)
    assert 0 < m.lesion_hd95 < 374
    g = lesion_metrics(pred, ref, (1.0, 1.0, 1.0), "gli")["WT"]
    assert (g.lesion_tp, g.lesion_fp, g.lesion_fn) == (0, 1, 1)


def test_2023_empty_prediction_and_empty_reference() -> None:
    ref = volume(((4, 4, 4), (9, 9, 9), SNFH))
    empty = np.zeros(SHAPE, np.uint8)
    missed = wt(empty, ref)["WT"]
    assert (missed.lesion_tp, missed.lesion_fn, missed.lesion_dice, missed.lesion_hd95) == (0, 1, 0.0, 374.0)
    assert (missed.volume_dice, missed.volume_hd95) == (0.0, 374.0)
    invented = wt(ref, empty)["WT"]
    assert (invented.lesion_fp, invented.lesion_dice, invented.lesion_hd95) == (1, 0.0, 374.0)
    # Both empty: nothing to score, which the scorer writes as a perfect score.
    assert wt(empty, empty)["WT"].as_dict() == {"lesion_dice": 1.0, "lesion_hd95": 0.0, "volume_dice": 1.0, "volume_hd95": 0.0,
                                                "lesion_tp": 0, "lesion_fp": 0, "lesion_fn": 0}


# --------------------------------------------------------------------------------------------
# Rules chosen from the data, and the flat per-case dict


def test_rules_follow_the_label_convention(monkeypatch) -> None:
    assert rules_for(BRATS_2020) == "brats2020"
    assert rules_for(BRATS_2023) == "gli"
    assert rules_for(BRATS_2023, "brats2023-gli") == "brats2023-gli"
    with pytest.raises(ValueError, match=re.escape(f"unknown rules 'gly' (expected one of: {', '.join(RULE_NAMES)})")):
        rules_for(BRATS_2023, "gly")
    with pytest.raises(ValueError, match=re.escape("rules 'gli' are written for brats2023 labels and the data's labels are brats2020 "
                                                   "(1 NCR/NET, 2 ED, 4 ET); rules that fit: brats2020") + "$"):
        rules_for(BRATS_2020, "gli")
    two = dataclasses.replace(RULES["gli"], conventions=("brats2023", "brats2024"))
    monkeypatch.setitem(RULES, "gli", two)  # rules written for two conventions name both
    with pytest.raises(ValueError, match="^rules 'gli' are written for brats2023 or brats2024 labels and"):
        rules_for(BRATS_2020, "gli")
    monkeypatch.undo()
    # Lesion-wise rules read 2023+ labels (ET = 3): on 2020 labels they would score ET from label 3.
    assert rules_for(BRATS_2020, "brats2020") == "brats2020"
    for name in RULE_NAMES[1:]:
        assert rules_for(BRATS_2023, name) == name
        with pytest.raises(ValueError, match=f"rules '{name}' are written for brats2023 labels.*rules that fit: brats2020$"):
            rules_for(BRATS_2020, name)
    assert lesion_columns("brats2020") == []
    assert lesion_columns("gli")[:3] == ["lesion_dice_ET", "lesion_dice_TC", "lesion_dice_WT"]
    assert {r.dilation for r in RULES.values() if r.name.startswith("brats2023-")} == {1, 3}


def test_case_scores_carry_legacy_and_lesion_wise_columns() -> None:
    pred, ref, spacing = CASES["several lesions, shifted and shrunk"]
    scores = case_scores(pred, ref, spacing, BRATS_2023)
    legacy = [f"{m}_{r}" for m in METRICS for r in REGIONS]
    assert list(scores) == legacy + lesion_columns("gli")
    assert scores["lesion_tp_WT"] == 3
    old = case_scores(pred.clip(0, 2), ref.clip(0, 2), spacing, BRATS_2020)
    assert list(old) == legacy


def test_unknown_prediction_label_is_named() -> None:
    pred, ref, spacing = CASES["several lesions, shifted and shrunk"]
    bad = pred.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"^prediction holds labels \[7\] unknown to the gli rules \(expected \[0, 1, 2, 3, 4\]\)$"):
        lesion_metrics(bad, ref, spacing, "gli")
    with pytest.raises(ValueError, match=r"^prediction holds labels \[2\] unknown to the men-rt rules \(expected \[0, 1\]\)$"):
        lesion_metrics(pred.clip(0, 2), ref.clip(0, 1), spacing, "men-rt")
    with pytest.raises(ValueError, match=re.escape(f"unknown lesion-wise rules 'gly' (expected one of: {', '.join(RULES)})") + "$"):
        lesion_metrics(pred, ref, spacing, "gly")
    with pytest.raises(ValueError, match=r"^lesion-wise metrics need 3-d label maps, got shape \(4, 20, 24, 28\)$"):
        lesion_metrics(np.stack([pred] * 4), np.stack([ref] * 4), (1.0,) * 4)


def test_the_default_rules_are_gli_and_case_scores_use_the_rules_asked_for() -> None:
    pred, ref, spacing = CASES["several lesions, shifted and shrunk"]
    assert lesion_metrics(pred, ref, spacing) == lesion_metrics(pred, ref, spacing, "gli")
    scores = case_scores(pred, ref, spacing, BRATS_2023, "brats2023-gli")
    expected = lesion_metrics(pred, ref, spacing, "brats2023-gli")
    assert {k: v for k, v in scores.items() if k.startswith("lesion_")} == {
        f"{m}_{r}": getattr(expected[r], m) for m in LESION_METRICS for r in expected if m.startswith("lesion_")}
    assert scores["lesion_hd95_ET"] != case_scores(pred, ref, spacing, BRATS_2023)["lesion_hd95_ET"]  # not gli's


# --------------------------------------------------------------------------------------------
# `brats-lab data synth --layout 2023` and `brats-lab evaluate` on it


@pytest.fixture(scope="module")
def dataset_2023(tmp_path_factory: pytest.TempPathFactory):
    from brats_lab.cli import main

    root = tmp_path_factory.mktemp("gli") / "phantom"
    assert main(["data", "synth", "--out", str(root), "--cases", "2", "--shape", "48", "48", "32", "--layout", "2023"]) == 0
    return root


def test_synth_2023_layout_has_several_lesions(dataset_2023) -> None:
    from scipy import ndimage

    from brats_lab.data.cases import discover
    from brats_lab.io import read_image

    cases = discover(dataset_2023)
    assert [c.id for c in cases] == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    assert {c.layout.name for c in cases} == {"brats2023"}
    assert [p.name for p in cases[0].images] == [f"BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f")]
    lesions = []
    for case in cases:
        seg, _ = read_image(case.seg)
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3} and (seg == 3).any()
        lesions.append(ndimage.label(seg > 0, np.ones((3, 3, 3)))[1])
    assert max(lesions) >= 2  # seed 0: the first case has satellites


def test_evaluate_2023_folder_prints_lesion_wise_and_legacy(dataset_2023, tmp_path, capsys) -> None:
    import pandas as pd

    from brats_lab.cli import main
    from brats_lab.data.cases import discover
    from brats_lab.evaluation import case_metrics, evaluate_folder
    from brats_lab.io import read_image, write_image

    pred_dir = tmp_path / "pred"
    expected = {}
    for i, case in enumerate(discover(dataset_2023)):
        seg, geometry = read_image(case.seg)
        pred = seg.copy()
        if i == 0:  # miss the smallest lesion, add a false positive far away
            cc, n = ndimage_label(seg > 0)
            smallest = 1 + int(np.argmin(np.bincount(cc.ravel())[1:]))
            pred[cc == smallest] = 0
            pred[1:3, 1:3, 1:3] = SNFH
        write_image(pred, geometry, pred_dir / f"{case.id}.nii.gz")
        expected[case.id] = (
            case_metrics(pred, seg, geometry.spacing_zyx, BRATS_2023),
            lesion_metrics(pred, seg, geometry.spacing_zyx, "gli"),
        )
    out = tmp_path / "metrics.csv"
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(dataset_2023), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "BraTS 2020 metrics over 2 cases" in text and "Lesion-wise metrics, gli rules" in text
    assert "Lesions TP / FP / FN" in text
    table = pd.read_csv(out).set_index("case")
    assert list(table.columns) == ["status", *[f"{m}_{r}" for m in METRICS for r in REGIONS], *lesion_columns("gli")]
    for case_id, (legacy, lesions) in expected.items():
        for region in REGIONS:
            assert table.loc[case_id, f"dice_{region}"] == legacy[region].dice
            for metric, value in lesions[region].as_dict().items():
                assert table.loc[case_id, f"{metric}_{region}"] == value
    first = table.iloc[0]
    assert first["lesion_fn_WT"] == 1 and first["lesion_fp_WT"] == 1
    # --rules overrides the dataset's default; unknown rules are one clear error.
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(dataset_2023), "--out", str(out), "--rules", "brats2023-gli"]) == 0
    assert "brats2023-gli rules" in capsys.readouterr().out
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(dataset_2023), "--rules", "gly"]) == 1
    assert "--rules gly: unknown rules" in capsys.readouterr().err
    # A missing prediction scores as brats-evaluation's parser scores a missing case.
    (pred_dir / "BraTS-GLI-00002-000.nii.gz").unlink()
    result = evaluate_folder(pred_dir, dataset_2023, progress=False)
    missing = result.table.set_index("case").loc["BraTS-GLI-00002-000"]
    assert missing["status"] == "missing"
    assert [missing[f"{m}_ET"] for m in LESION_METRICS] == [0.0, 373.0, 0.0, 373.0, 0, 0, 0]


def ndimage_label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    return ndimage.label(mask, np.ones((3, 3, 3)))


def test_official_file_reader_swaps_the_spacing_which_we_do_not_copy(tmp_path) -> None:
    """Documents why the oracle gets arrays and spacing, not files: brats-evaluation reads NIfTI
    with SimpleITK ((z, y, x) arrays) and pairs them with GetSpacing() ((x, y, z)). A lesion
    shifted by one voxel along a 3 mm z axis reads 1 mm through files, 3 mm through arrays."""
    _official(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.uint8), (1.0, 1.0, 1.0))  # skips without it
    import SimpleITK as sitk
    import brats_evaluation
    from panoptica import Panoptica_Evaluator

    ref = volume(((4, 4, 4), (10, 10, 10), ET))
    pred = volume(((5, 4, 4), (11, 10, 10), ET))
    for array, name in ((ref, "ref"), (pred, "pred")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 3.0))  # x, y, z
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = Panoptica_Evaluator.load_from_config(brats_evaluation.config_path("gli"))
        from_files = evaluator.evaluate(str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), verbose=False)
    assert from_files["et"].sq_hd95 == 1.0
    assert lesion_metrics(pred, ref, (3.0, 1.0, 1.0), "gli")["ET"].lesion_hd95 == 3.0


# --------------------------------------------------------------------------------------------
# Drawn label maps (seeded): brats-evaluation's values on many, and values known by hand where
# the maps are built for it. Tiny volumes, so each draw takes milliseconds.

PAINT = (NETC, SNFH, ET)


def _touching(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """A box beside [lo, hi) that touches it only at a corner, or only along an edge: diagonally
    past it on every axis (on all but one axis, for an edge, where it shares the box's span)."""
    size = rng.integers(1, 4, 3)
    sides = rng.choice([-1, 1], 3)
    b_lo = np.where(sides > 0, hi, lo - size)
    if how == "edge":
        axis = int(rng.integers(3))
        b_lo[axis] = lo[axis]
    return b_lo, b_lo + size


def _drawn_maps(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(prediction, reference, spacing): 1 to 4 reference lesions, boxes of any label, some with a
    second box touching them only at a corner or along an edge; the prediction made from them
    box by box (kept, shifted one voxel, grown, shrunk, relabelled or missed), plus false
    positives. Boxes may overlap: later ones are painted on top."""
    shape = np.array((14, 14, 14))
    boxes = []
    for _ in range(int(rng.integers(1, 5))):
        size = rng.integers(1, 5, 3)
        lo = rng.integers(0, shape - size + 1)
        boxes.append((lo, lo + size, int(rng.choice(PAINT))))
        how = rng.choice(["alone", "corner", "edge"])
        if how != "alone":
            b_lo, b_hi = _touching(rng, lo, lo + size, how)
            if (b_lo >= 0).all() and (b_hi <= shape).all():
                boxes.append((b_lo, b_hi, int(rng.choice(PAINT))))
    ref, pred = np.zeros(tuple(shape), np.uint8), np.zeros(tuple(shape), np.uint8)
    for lo, hi, label in boxes:
        ref[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = label
        lo, hi, axis = lo.copy(), hi.copy(), int(rng.integers(3))
        action = rng.choice(["keep", "shift", "grow", "shrink", "relabel", "miss"])
        if action == "miss":
            continue
        if action == "shift":
            step = int(rng.choice([-1, 1]))
            lo[axis] += step
            hi[axis] += step
        elif action == "grow":
            hi[axis] += 1
        elif action == "shrink" and hi[axis] - lo[axis] > 1:
            lo[axis] += 1
        elif action == "relabel":
            label = int(rng.choice(PAINT))
        lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
        pred[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = label
    for _ in range(int(rng.integers(0, 3))):  # false-positive islands
        size = rng.integers(1, 3, 3)
        lo = rng.integers(0, shape - size + 1)
        pred[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = rng.choice(PAINT)
    spacing = (1.0, 1.0, 1.0) if rng.random() < 0.5 else tuple(float(v) for v in rng.choice([0.8, 1.0, 1.5, 3.0], 3))
    return pred, ref, spacing


def test_drawn_multi_lesion_maps_equal_brats_evaluation() -> None:
    """80 drawn maps with lesions that touch only at a corner or along an edge (26-connectivity
    makes them one), shifted, split, merged, missed and invented lesions: every value of every
    region equals the organisers' package."""
    rng = np.random.default_rng(2023)
    touching = 0
    for draw in range(80):
        pred, ref, spacing = _drawn_maps(rng)
        ours = assert_equals_brats_evaluation(pred, ref, spacing, f"draw {draw}")
        # The draws reach what they are for: fewer 26- than 6-connected reference lesions.
        wt = np.isin(ref, PAINT)
        touching += ndimage_label(wt)[1] < ndimage.label(wt)[1]
        assert ours["WT"].lesion_tp + ours["WT"].lesion_fn == ndimage_label(wt)[1]
    assert touching >= 10


def test_one_voxel_shifts_have_the_spacing_as_hd95() -> None:
    """Drawn lesions far apart (boxes of 2 to 4 voxels a side, 3 voxels between), each kept or
    shifted by one voxel along one axis. By hand: a shifted box's two surfaces are at most one
    voxel apart, and at exactly one voxel over a whole face (a quarter or more of the surface, far
    above the 5% the 95th percentile skips): its HD95 is that axis's spacing, its Dice the
    overlap; a kept box scores 0 and 1. The lesion-wise HD95 is their mean, as the package's."""
    rng = np.random.default_rng(95)
    for draw in range(40):
        spacing = tuple(float(v) for v in rng.choice([0.7, 1.0, 1.2, 2.5, 3.0], 3))
        ref, pred = np.zeros((18, 18, 18), np.uint8), np.zeros((18, 18, 18), np.uint8)
        hd95s, dices = [], []
        # One lesion in each of 1 to 4 of the eight 7-voxel cells of the volume: a box, its
        # shift and 2 empty voxels fit in one.
        cells = [np.unravel_index(i, (2, 2, 2)) for i in rng.choice(8, size=int(rng.integers(1, 5)), replace=False)]
        for cell in cells:
            size = rng.integers(2, 5, 3)
            lo = 1 + 7 * np.array(cell) + rng.integers(0, 5 - size + 1)
            ref[tuple(slice(a, b) for a, b in zip(lo, lo + size))] = ET
            shift = np.zeros(3, int)
            axis = int(rng.integers(3))
            if rng.random() < 0.7:
                shift[axis] = rng.choice([-1, 1])
            pred[tuple(slice(a, b) for a, b in zip(lo + shift, lo + size + shift))] = ET
            hd95s.append(spacing[axis] if shift.any() else 0.0)
            dices.append((size[axis] - 1) / size[axis] if shift.any() else 1.0)
        ours = assert_equals_brats_evaluation(pred, ref, spacing, f"draw {draw}")
        for region in REGIONS:  # ET only: the three regions are the same masks
            m = ours[region]
            assert (m.lesion_tp, m.lesion_fp, m.lesion_fn) == (len(cells), 0, 0)
            assert m.lesion_hd95 == pytest.approx(np.mean(hd95s), rel=1e-12, abs=0)
            assert m.lesion_dice == pytest.approx(np.mean(dices), rel=1e-12, abs=0)


def _dilation_reach() -> np.ndarray:
    """Every voxel offset between two reference voxels whose lesions the 2023 GLI rules merge:
    each dilated 3 times with the 18-neighbourhood, the dilations then touching (26-neighbours).
    As sets of offsets, from the rules' words, without scipy: a (15, 15, 15) mask around 0."""
    n18 = [d for d in itertools.product((-1, 0, 1), repeat=3) if sum(map(abs, d)) <= 2]
    n26 = list(itertools.product((-1, 0, 1), repeat=3))
    reach = {(0, 0, 0)}
    for steps in [n18] * 6 + [n26]:  # 3 dilations of each lesion, then one step to touch
        reach = {tuple(a + b for a, b in zip(r, s)) for r in reach for s in steps}
    out = np.zeros((15, 15, 15), bool)
    out[tuple(np.array(sorted(reach)).T + 7)] = True
    return out


def test_lesions_merged_only_by_the_2023_dilation_along_a_diagonal() -> None:
    """Two 4 x 4 x 4 reference lesions (64 mm^3, over the 50 mm^3 limit) apart along a diagonal
    by a drawn number of voxels; the prediction finds the first. Under brats-evaluation (no
    dilation) they are two lesions, one missed, as the package says. Under the 2023 GLI rules they
    are one lesion when their dilations touch (hand-computed offsets: `_dilation_reach`), found
    with Dice 2 x 64 / (128 + 64); else two, one missed: (1 + 0) / 2, HD95 (0 + 374) / 2."""
    reach = _dilation_reach()
    rng = np.random.default_rng(18)
    outcomes = set()
    for draw in range(30):
        direction = np.array(rng.choice([-1, 1], 3))
        if rng.random() < 0.4:  # a diagonal of two axes
            direction[rng.integers(3)] = 0
        gap = int(rng.integers(2, 8))  # voxels from corner to corner along the diagonal
        a_lo = np.where(direction < 0, 14, 1)
        b_lo = a_lo + direction * (3 + gap)  # offset 0 on an axis the diagonal does not cross
        ref = volume(((*a_lo,), (*(a_lo + 4),), SNFH), ((*b_lo,), (*(b_lo + 4),), SNFH), shape=(26, 26, 26))
        pred = volume(((*a_lo,), (*(a_lo + 4),), SNFH), shape=(26, 26, 26))
        # Merged if some offset from a voxel of A to one of B is within reach.
        nearest = np.where(direction > 0, b_lo - (a_lo + 3), np.where(direction < 0, (b_lo + 3) - a_lo, 0))
        merged = bool(reach[tuple(np.clip(nearest, -7, 7) + 7)]) and (np.abs(nearest) <= 7).all()
        outcomes.add(merged)
        gli = assert_equals_brats_evaluation(pred, ref, (1.0, 1.0, 1.0), f"draw {draw}")["WT"]
        assert (gli.lesion_tp, gli.lesion_fn) == (1, 1)
        m = lesion_metrics(pred, ref, (1.0, 1.0, 1.0), "brats2023-gli")["WT"]
        if merged:
            assert (m.lesion_tp, m.lesion_fp, m.lesion_fn, m.lesion_dice) == (1, 0, 0, 2 * 64 / (128 + 64)), f"draw {draw}"
        else:
            assert (m.lesion_tp, m.lesion_fp, m.lesion_fn, m.lesion_dice, m.lesion_hd95) == (1, 0, 1, 0.5, 187.0), f"draw {draw}"
    assert outcomes == {True, False}


def _config_groups(config: str) -> dict[str, tuple[int, ...]]:
    """The label groups of one brats-evaluation config file, read as plain YAML (its tags ignored)."""
    import brats_evaluation
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def untagged(loader, suffix, node):
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_scalar(node)

    Loader.add_multi_constructor("!", untagged)
    groups = yaml.load(brats_evaluation.config_path(config).read_text(), Loader=Loader)["segmentation_class_groups"]["groups"]
    return {name.upper(): tuple(group["value_labels"]) for name, group in groups.items()}


def test_each_rule_set_has_the_regions_and_labels_of_its_source() -> None:
    """The brats-evaluation rule sets against the config file each names (its ranked groups, and
    every label its groups hold); the 2023 scorer's against its settings per task (the challenge's
    scorer: lesions dilated by 3 voxels, 1 for MEN and MET; lesions of 50 voxels or fewer ignored,
    2 for MET; an infinite HD95 written 374)."""
    scorer = {"brats2023-gli": (3, 50.0), "brats2023-ssa": (3, 50.0), "brats2023-men": (1, 50.0), "brats2023-ped": (3, 50.0),
              "brats2023-met": (1, 2.0)}
    assert RULE_NAMES == ("brats2020", "gli", "mets", "men-pre", "goat", "men-rt", "ped", *scorer)
    for name, rules in RULES.items():
        assert rules.name == name and rules.conventions == ("brats2023",)
        if name in scorer:
            assert (rules.source, rules.matching, (rules.dilation, rules.min_volume_mm3), rules.penalty_hd95) == (
                f"BraTS 2023 challenge scorer (BraTS-{name.removeprefix('brats2023-').upper()})", "dilation", scorer[name], 374.0)
            assert rules.regions == {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)} and rules.labels == (1, 2, 3, 4)
            continue
        config = re.fullmatch(r"brats-evaluation 0\.0\.10, config_(\w+)\.yaml", rules.source).group(1)
        groups = _config_groups(config)
        assert rules.matching == "bipartite" and rules.penalty_hd95 == 373.0, name
        assert {region: tuple(sorted(groups[region])) for region in rules.regions} == rules.regions, name
        assert rules.labels == tuple(sorted({label for labels in groups.values() for label in labels})), name
