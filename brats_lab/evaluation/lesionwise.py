"""Lesion-wise Dice and HD95 per region, as BraTS has ranked since 2023, with two named rule sets.

Each region (ET, TC, WT for glioma) of the reference and of the prediction is split into lesions:
connected components, 26-connectivity. Lesions are matched, and a missed or unmatched lesion
counts against the case. Two rule sets exist and they differ; both are implemented, and the
settings of every task are data (`RULES`):

- `gli` (the default for 2023+ data) and the other `brats-evaluation` configs: the organisers'
  current package `brats-evaluation` 0.0.10 on `panoptica` 2.1.7. Maximum bipartite matching on
  lesion Dice (scipy's `linear_sum_assignment` on the cost 1 - Dice, pairs with Dice below 1e-6
  unmatchable), no dilation, no minimum lesion size. Per region it reports the lesion counts,
  `pq_dsc` = mean Dice of the matched lesions x recognition quality tp / (tp + (fp + fn) / 2),
  which we call the lesion-wise Dice, `sq_hd95` = mean HD95 of the matched lesions, which we call
  the lesion-wise HD95, and the whole-volume Dice and HD95. Values equal the package's (tests
  compare them on hard cases). Where the package is surprising we match it:
  * the whole-volume HD95 of two masks that do not overlap at all is infinite (panoptica treats
    "no voxel in common" as its zero-true-positive edge case), not their actual distance;
  * the whole-volume HD95 ignores the voxel spacing: panoptica passes none to its global
    metrics, so it is measured in voxels (1 mm on BraTS data, where it makes no difference),
    while the lesion-wise HD95 uses the spacing;
  * an infinite HD95 (nothing matched, or no overlap) is written as 373 by the package's own
    result parser (`parse_seg_results`, "diameter of the cube in SRI space") for the whole volume
    only; it leaves the lesion-wise HD95 infinite. We write 373 for both, so a mean stays finite;
  * a region empty in both reference and prediction is NaN for every value (nothing to score).
    We keep NaN there, and the per-case summary skips it, as the package's parser does when it
    averages over cases. Lesion counts are 0 there.
  One behaviour we do not copy: given file paths, the package reads NIfTI with SimpleITK, whose
  arrays are (z, y, x), and pairs them with `GetSpacing()`, which is (x, y, z); on anisotropic
  images its lesion-wise HD95 is then measured with the spacings swapped (a 1-voxel shift along
  a 3 mm z axis reads 1 mm). We pair each axis with its own spacing, which is what the package
  computes when given the arrays and their spacing (the tests do so); on 1 mm BraTS data the
  two agree.
- `brats2023-gli` and the other `brats2023-*`: the 2023 challenge's scorer (organisers'
  repository BraTS-2023-Metrics, `get_lesion_wise_results`). The reference is dilated (3 times
  with the 18-neighbourhood for GLI) and reference lesions whose dilations touch are merged into
  one; every predicted lesion touching a reference lesion's dilation is a true positive for it,
  and the lesion's Dice and HD95 are taken against the union of those predicted lesions.
  Reference lesions of at most 50 mm^3 are left out (neither counted nor scored), every
  false-negative lesion scores Dice 0 and HD95 374, every false-positive lesion adds a Dice 0 and
  an HD95 374 to the case's average; a region with nothing to score gets Dice 1 and HD95 0.
  Departure, written down: that scorer's HD95 is DeepMind's `surface-distance` robust Hausdorff
  (distances between surface elements weighted by their area, the larger of the two directed
  95th percentiles). Here every HD95 is the one of the rest of the project (medpy's, pooled
  distances between surface voxels), so the 2023 rule set's HD95 values of partly overlapping
  lesions are close to, not equal to, that scorer's; its counts, Dice values and the 374 / 0
  penalties follow its rules exactly. (Checked once against the scorer's own logic run on 40
  random multi-lesion cases, anisotropic spacing included: every count and Dice equal, 61% of
  the lesion-wise HD95 values equal, the others within 1 mm.)

Speed: all work happens inside the bounding box of the case's tumour, and components are
labelled in pieces of it cut apart at empty planes (`_pieces`), then numbered as labelling the
whole array would number them; lesion pairs are scored from one overlap table per piece
(`np.unique` over encoded label pairs), and each HD95 runs in the box of its two lesions with
`metrics._hd95`, the project's fast exact surface-distance code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from brats_lab.evaluation.metrics import (
    METRICS,
    _bbox,
    _check_arguments,
    _hd95,
    _isin,
    _nonzero_union,
    case_metrics,
)
from brats_lab.labels import BRATS_2023, LabelConvention

LEGACY_RULES = "brats2020"  # the BraTS 2020 metrics alone (evaluation/metrics.py)

# Which rules a dataset gets when none is asked for, by label convention name.
DEFAULT_RULES: dict[str, str] = {"brats2020": LEGACY_RULES, "brats2023": "gli"}

LESION_METRICS: tuple[str, ...] = (
    "lesion_dice",
    "lesion_hd95",
    "volume_dice",
    "volume_hd95",
    "lesion_tp",
    "lesion_fp",
    "lesion_fn",
)

_GLI_REGIONS = dict(BRATS_2023.regions)  # ET 3, TC 1 or 3, WT 1, 2 or 3: the 2023+ glioma labels
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class LesionRules:
    """One rule set of lesion-wise scoring.

    `matching` is "bipartite" (brats-evaluation / panoptica) or "dilation" (the 2023 scorer);
    `dilation` and `min_volume_mm3` only apply to "dilation" (reference lesions with a volume
    <= `min_volume_mm3` are ignored). `penalty_hd95` is what an infinite HD95 is written as.
    `labels` are the non-zero labels a prediction may hold. `conventions` are the label
    conventions (`labels.CONVENTIONS`) of the data these rules were written for: every rule set
    here reads 2023+ labels (ET = 3 for glioma), so none fits BraTS 2020/2021 data (ET = 4).
    """

    name: str
    source: str
    regions: dict[str, tuple[int, ...]]
    labels: tuple[int, ...]
    matching: str
    dilation: int = 0
    min_volume_mm3: float = 0.0
    penalty_hd95: float = 373.0
    conventions: tuple[str, ...] = ("brats2023",)


def _panoptica(name: str, config: str, regions: dict[str, tuple[int, ...]], labels: tuple[int, ...]) -> LesionRules:
    return LesionRules(name, f"brats-evaluation 0.0.10, config_{config}.yaml", regions, labels, "bipartite")


def _scorer2023(task: str, dilation: int, min_volume_mm3: float) -> LesionRules:
    return LesionRules(
        f"brats2023-{task.lower()}",
        f"BraTS 2023 challenge scorer (BraTS-{task})",
        _GLI_REGIONS,
        (1, 2, 3, 4),
        "dilation",
        dilation=dilation,
        min_volume_mm3=min_volume_mm3,
        penalty_hd95=374.0,
    )


# Region names and labels of every task, from the packages' configs; only the groups the
# challenge ranks are scored (brats-evaluation also reports NETC, SNFH and RC for GLI).
RULES: dict[str, LesionRules] = {
    r.name: r
    for r in (
        _panoptica("gli", "gli", _GLI_REGIONS, (1, 2, 3, 4)),
        _panoptica("mets", "mets", _GLI_REGIONS, (1, 2, 3, 4)),
        _panoptica("men-pre", "MenPre", _GLI_REGIONS, (1, 2, 3)),  # no label 4: brats-evaluation refuses it
        _panoptica("goat", "GoAT", _GLI_REGIONS, (1, 2, 3)),  # nor does its GoAT config
        _panoptica("men-rt", "MenRT", {"GTV": (1,)}, (1,)),
        # Pediatric 2024+: 1 ET, 2 NET, 3 CC, 4 ED.
        _panoptica("ped", "ped", {"ET": (1,), "TC": (1, 2, 3), "WT": (1, 2, 3, 4)}, (1, 2, 3, 4)),
        _scorer2023("GLI", dilation=3, min_volume_mm3=50.0),
        _scorer2023("SSA", dilation=3, min_volume_mm3=50.0),
        _scorer2023("MEN", dilation=1, min_volume_mm3=50.0),
        _scorer2023("PED", dilation=3, min_volume_mm3=50.0),
        _scorer2023("MET", dilation=1, min_volume_mm3=2.0),
    )
}

RULE_NAMES: tuple[str, ...] = (LEGACY_RULES, *RULES)


@dataclass(frozen=True)
class LesionMetrics:
    """Lesion-wise scores of one region of one case (HD95 in mm), and the whole-volume Dice and
    HD95 under the same rules. NaN where the rules leave a value undefined (see module doc)."""

    lesion_dice: float
    lesion_hd95: float
    volume_dice: float
    volume_hd95: float
    lesion_tp: int
    lesion_fp: int
    lesion_fn: int

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def rules_for(convention: LabelConvention, rules: str | None = None) -> str:
    """The rule-set name to score data of `convention` with: `rules` when given (checked), else
    the convention's default (BraTS 2020 metrics for 2020/2021 labels, `gli` for 2023+).

    Rules written for another label convention are refused (ValueError): lesion-wise rules on
    BraTS 2020 data would read its ET (label 4) as resection cavity and look for ET as label 3,
    so a prediction without any ET would score a perfect lesion-wise ET.
    """
    if rules is None:
        return DEFAULT_RULES.get(convention.name, LEGACY_RULES)
    if rules not in RULE_NAMES:
        raise ValueError(f"unknown rules '{rules}' (expected one of: {', '.join(RULE_NAMES)})")
    if rules != LEGACY_RULES and convention.name not in RULES[rules].conventions:
        fitting = [LEGACY_RULES, *(n for n, r in RULES.items() if convention.name in r.conventions)]
        raise ValueError(
            f"rules '{rules}' are written for {' or '.join(RULES[rules].conventions)} labels and the data's labels are "
            f"{convention.name} ({_label_text(convention)}); rules that fit: {', '.join(fitting)}"
        )
    return rules


def _label_text(convention: LabelConvention) -> str:
    return ", ".join(f"{v} {n}" for v, n in sorted(convention.labels.items()) if v)


def lesion_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing_zyx: Sequence[float],
    rules: LesionRules | str = "gli",
) -> dict[str, LesionMetrics]:
    """Lesion-wise metrics of every region of `rules`, keyed by region name.

    Both label maps are (z, y, x) in the same geometry, `spacing_zyx` in mm. A prediction
    holding a label the rules do not know raises ValueError naming the labels (brats-evaluation
    refuses such a map too).
    """
    if isinstance(rules, str):
        if rules not in RULES:
            raise ValueError(f"unknown lesion-wise rules '{rules}' (expected one of: {', '.join(RULES)})")
        rules = RULES[rules]
    pred_labels = np.asarray(pred_labels)
    ref_labels = np.asarray(ref_labels)
    _check_arguments(pred_labels, ref_labels, spacing_zyx)
    if pred_labels.ndim != 3:
        raise ValueError(f"lesion-wise metrics need 3-d label maps, got shape {pred_labels.shape}")
    union = _nonzero_union(pred_labels, ref_labels)
    box = _bbox(union)
    if box is not None:
        # Room for the reference's dilation: binary dilation at the image border stops there,
        # inside a box it must not stop earlier.
        box = _grow(box, rules.dilation, union.shape)
        pred_labels, ref_labels = pred_labels[box], ref_labels[box]
    else:
        pred_labels, ref_labels = pred_labels[:0, :0, :0], ref_labels[:0, :0, :0]
    unknown = _unknown_labels(pred_labels, (0, *rules.labels))
    if unknown.size:
        raise ValueError(
            f"prediction holds labels {[v.item() for v in unknown]} unknown to the {rules.name} rules "
            f"(expected {sorted((0, *rules.labels))})"
        )
    score = _bipartite if rules.matching == "bipartite" else _dilation
    out = {}
    for region, labels in rules.regions.items():
        pred, ref = _isin(pred_labels, labels), _isin(ref_labels, labels)
        out[region] = score(pred, ref, spacing_zyx, rules)
    return out


def lesion_columns(rules: str) -> list[str]:
    """`<metric>_<region>` for every lesion-wise metric and region of `rules` (none for the
    BraTS 2020 rules), e.g. `lesion_dice_ET`."""
    if rules == LEGACY_RULES:
        return []
    return [f"{m}_{r}" for m in LESION_METRICS for r in RULES[rules].regions]


def case_scores(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing_zyx: Sequence[float],
    convention: LabelConvention,
    rules: str | None = None,
) -> dict[str, float]:
    """Every metric of one case as a flat `{column: value}` dict, with the rules of the data.

    The BraTS 2020 metrics (`dice_ET`, ..., `hd95_WT`) always; the lesion-wise ones
    (`lesion_dice_ET`, ...) too when the rules (by default those of `convention`: `gli` for
    2023+ labels) are lesion-wise. This is the one call training, ablations and the dashboard
    need to score a case the way `brats-lab evaluate` does.
    """
    name = rules_for(convention, rules)
    # Columns metric-major, as `evaluate.metric_columns()` and `lesion_columns()` list them.
    legacy = case_metrics(pred_labels, ref_labels, spacing_zyx, convention)
    out: dict[str, float] = {f"{m}_{r}": getattr(legacy[r], m) for m in METRICS for r in legacy}
    if name != LEGACY_RULES:
        lesions = lesion_metrics(pred_labels, ref_labels, spacing_zyx, name)
        out.update({f"{m}_{r}": getattr(lesions[r], m) for m in LESION_METRICS for r in lesions})
    return out


# --------------------------------------------------------------------------------------------
# brats-evaluation (panoptica): components, maximum bipartite matching on Dice


def _bipartite(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], rules: LesionRules) -> LesionMetrics:
    nan = math.nan
    if not pred.any() and not ref.any():
        return LesionMetrics(nan, nan, nan, nan, 0, 0, 0)
    # Lesions are labelled piece by piece (see `_pieces`), then numbered as labelling the whole
    # array numbers them, so the assignment below sees panoptica's cost matrix, row for row.
    pieces = _pieces(pred | ref)
    # The region's own box (with the 1-voxel margin `_hd95` needs), from the pieces' boxes.
    box = _union_box(pieces, pred.shape)
    pred, ref = pred[box], ref[box]
    pieces = [tuple(slice(p.start - b.start, p.stop - b.start) for p, b in zip(piece, box)) for piece in pieces]
    # Unit spacing for the whole volume: panoptica's global metrics are computed without it.
    volume_dice, volume_hd95 = _volume_metrics(pred, ref, (1.0,) * ref.ndim, rules.penalty_hd95)
    pred_lesions, ref_lesions = _Lesions(pred, pieces), _Lesions(ref, pieces)
    n_pred, n_ref = pred_lesions.n, ref_lesions.n
    if n_pred == 0 or n_ref == 0:
        return LesionMetrics(0.0, rules.penalty_hd95, volume_dice, volume_hd95, 0, n_pred, n_ref)

    pairs = [_overlaps(r, p, len(pred_lesions.box_list(i))) for i, (r, p) in enumerate(zip(ref_lesions.labels, pred_lesions.labels))]
    pairs_ref = np.concatenate([ref_lesions.ids[i][r] for i, (r, _, _) in enumerate(pairs)])
    pairs_pred = np.concatenate([pred_lesions.ids[i][q] for i, (_, q, _) in enumerate(pairs)])
    inter = np.concatenate([c for _, _, c in pairs])
    ref_area, pred_area = ref_lesions.area, pred_lesions.area
    dice = 2.0 * inter.astype(np.float64) / (ref_area[pairs_ref] + pred_area[pairs_pred]).astype(np.float64)
    # panoptica's cost matrix, value for value: pairs below the threshold keep a cost above 1
    # (they may be assigned, then are dropped), so ties break as its assignment breaks them.
    cost = np.full((n_ref, n_pred), 1.0 + 1e-6)
    usable = dice >= 1e-6
    cost[pairs_ref[usable] - 1, pairs_pred[usable] - 1] = 1.0 - dice[usable]
    rows, cols = linear_sum_assignment(cost)
    matched = [(int(i) + 1, int(j) + 1) for i, j in zip(rows, cols) if cost[i, j] < 1.0]  # ascending reference lesion
    tp = len(matched)
    fp, fn = n_pred - tp, n_ref - tp
    if tp == 0:
        return LesionMetrics(0.0, rules.penalty_hd95, volume_dice, volume_hd95, 0, fp, fn)

    dices, hd95s = [], []
    for r, p in matched:
        # Lesions that overlap lie in one piece.
        piece, r_local = ref_lesions.where[r]
        _, p_local = pred_lesions.where[p]
        r_cc, p_cc = ref_lesions.labels[piece], pred_lesions.labels[piece]
        box = _union_box((ref_lesions.box(piece, r_local), pred_lesions.box(piece, p_local)), r_cc.shape)
        a, b = p_cc[box] == p_local, r_cc[box] == r_local
        overlap = int(np.count_nonzero(a & b))
        dices.append(2 * overlap / (int(ref_area[r]) + int(pred_area[p])))
        hd95s.append(0.0 if overlap == ref_area[r] == pred_area[p] else _hd95(a, b, spacing))
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    # np.average over the matched lesions in ascending reference order, as panoptica sums them.
    return LesionMetrics(
        lesion_dice=float(np.average(dices)) * rq,
        lesion_hd95=float(np.average(hd95s)),
        volume_dice=volume_dice,
        volume_hd95=volume_hd95,
        lesion_tp=tp,
        lesion_fp=fp,
        lesion_fn=fn,
    )


def _volume_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], penalty: float) -> tuple[float, float]:
    """panoptica's global Dice and HD95 of two masks, not both empty: with no voxel in common
    both are its zero-true-positive edge case (Dice 0, HD95 infinite, written as `penalty`)."""
    overlap = int(np.count_nonzero(pred & ref))
    if overlap == 0:
        return 0.0, penalty
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    hd95 = 0.0 if overlap == n_pred == n_ref else _hd95(pred, ref, spacing)  # already in their box
    return 2 * overlap / (n_pred + n_ref), hd95


# --------------------------------------------------------------------------------------------
# The 2023 challenge scorer: reference dilated and merged, minimum size, FP/FN penalties


def _dilation(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], rules: LesionRules) -> LesionMetrics:
    penalty = rules.penalty_hd95
    n_pred_vox, n_ref_vox = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    overlap = int(np.count_nonzero(pred & ref))
    if n_pred_vox == 0 and n_ref_vox == 0:
        volume_dice, volume_hd95 = 1.0, 0.0
    else:
        volume_dice = 2 * overlap / (n_pred_vox + n_ref_vox)
        if n_pred_vox == 0 or n_ref_vox == 0:
            volume_hd95 = penalty
        elif overlap == n_pred_vox == n_ref_vox:
            volume_hd95 = 0.0
        else:
            volume_hd95 = _hd95_in_box(pred, ref, spacing)

    pred_cc, n_pred = ndimage.label(pred, structure=_CONNECTIVITY_26)
    # Reference lesions whose dilations touch are one lesion: label the dilated reference and
    # give each reference voxel the label of the dilated component it lies in. The dilation of
    # such a merged lesion is exactly its dilated component, so "predicted lesions touching the
    # lesion's dilation" are those overlapping that component.
    if n_ref_vox:
        dilated = ndimage.binary_dilation(ref, ndimage.generate_binary_structure(3, 2), iterations=rules.dilation)
        lesions, n_lesions = ndimage.label(dilated, structure=_CONNECTIVITY_26)
    else:
        lesions, n_lesions = np.zeros(ref.shape, np.int32), 0
    ref_lesions = np.where(ref, lesions, 0)
    lesion_voxels = np.bincount(ref_lesions.ravel(), minlength=n_lesions + 1)
    pred_area = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    touch_lesion, touch_pred, _ = _overlaps(lesions, pred_cc, n_pred)
    inter_lesion, inter_pred, inter = _overlaps(ref_lesions, pred_cc, n_pred)
    intersection = dict(zip(zip(inter_lesion.tolist(), inter_pred.tolist()), inter.tolist()))
    fp = n_pred - len(set(touch_pred.tolist()))

    lesion_boxes = ndimage.find_objects(lesions) if n_lesions else []
    pred_boxes = ndimage.find_objects(pred_cc) if n_pred else []
    dices, hd95s, kept, found = [], [], [], []
    sx, sy, sz = spacing[2], spacing[1], spacing[0]
    for k in range(1, n_lesions + 1):
        comps = touch_pred[touch_lesion == k].tolist()
        inter_k = sum(intersection.get((k, c), 0) for c in comps)
        pred_k = int(sum(int(pred_area[c]) for c in comps))
        dices.append(2 * inter_k / (int(lesion_voxels[k]) + pred_k))
        if not comps:
            hd95s.append(penalty)
        elif inter_k == lesion_voxels[k] == pred_k:
            hd95s.append(0.0)
        else:
            box = _union_box((lesion_boxes[k - 1], *(pred_boxes[c - 1] for c in comps)), ref.shape)
            hd95s.append(_hd95(np.isin(pred_cc[box], comps), ref_lesions[box] == k, spacing))
        # The scorer's volume: voxel count times the spacings, in its order (x, y, z).
        kept.append(int(lesion_voxels[k]) * sx * sy * sz > rules.min_volume_mm3)
        found.append(bool(comps))
    kept_a, found_a = np.array(kept, dtype=bool), np.array(found, dtype=bool)
    tp = int(np.count_nonzero(kept_a & found_a))
    fn = int(np.count_nonzero(kept_a & ~found_a))
    denominator = int(kept_a.sum()) + fp
    if denominator == 0:  # nothing to score: the scorer's NaN, which it then writes as 1 and 0
        return LesionMetrics(1.0, 0.0, volume_dice, volume_hd95, tp, fp, fn)
    lesion_dice = float(np.sum(np.array(dices)[kept_a])) / denominator
    lesion_hd95 = (float(np.sum(np.array(hd95s)[kept_a])) + fp * penalty) / denominator
    return LesionMetrics(lesion_dice, lesion_hd95, volume_dice, volume_hd95, tp, fp, fn)


# --------------------------------------------------------------------------------------------
# Helpers


def _overlaps(a: np.ndarray, b: np.ndarray, n_b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of labels (a > 0, b > 0) that share voxels, and how many: (a labels, b labels,
    counts), sorted by a then b; one pass over the voxels both hold."""
    both = (a > 0) & (b > 0)
    codes = a[both].astype(np.int64) * (n_b + 1) + b[both]
    pairs, counts = np.unique(codes, return_counts=True)
    return pairs // (n_b + 1), pairs % (n_b + 1), counts


def _pieces(union: np.ndarray) -> list[tuple[slice, ...]]:
    """Tight boxes that hold every voxel of `union`, cut apart along planes empty in `union`.

    A 26-connected component never crosses an empty plane, so every component of a mask inside
    `union` lies in one piece, and labelling the pieces finds the components of the whole array
    in a fraction of its voxels when lesions lie far apart (a false positive across the brain).
    The face neighbours of a piece's voxels outside its box are empty (a voxel there would touch
    the piece, so belong to it), which is what `_hd95` needs of a box cut from it.
    """
    todo, done = [tuple(slice(0, n) for n in union.shape)], []
    while todo:
        box = todo.pop()
        sub = union[box]
        profiles = [sub.any(axis=tuple(a for a in range(union.ndim) if a != axis)) for axis in range(union.ndim)]
        if not profiles[0].any():
            continue
        # Tighten the box, then cut it at its first inner empty plane, if any.
        spans = [(int(np.argmax(p)), len(p) - int(np.argmax(p[::-1]))) for p in profiles]  # type: ignore[arg-type, index]
        tight = tuple(slice(b.start + lo, b.start + hi) for b, (lo, hi) in zip(box, spans))
        for axis, (p, (lo, hi)) in enumerate(zip(profiles, spans)):
            empty = np.flatnonzero(~p[lo:hi])  # type: ignore[index]
            if empty.size:
                cut = tight[axis].start + int(empty[0])
                for part in (slice(tight[axis].start, cut), slice(cut + 1, tight[axis].stop)):
                    todo.append(tight[:axis] + (part,) + tight[axis + 1 :])
                break
        else:
            done.append(tight)
    return done


class _Lesions:
    """The 26-connected components of a mask, labelled piece by piece and numbered 1..n in the
    raster order of their first voxel: the numbers scipy's (and panoptica's cc3d) labelling of
    the whole array gives them. `labels[i]` holds piece i's local labels, `ids[i]` maps them to
    the numbers, `where[k]` is (piece, local label) of lesion k, `area[k]` its voxel count."""

    def __init__(self, mask: np.ndarray, pieces: list[tuple[slice, ...]]) -> None:
        self.labels: list[np.ndarray] = []
        keys, owners = [], []
        self._boxes: dict[int, list] = {}
        for i, box in enumerate(pieces):
            cc, n = ndimage.label(mask[box], structure=_CONNECTIVITY_26)
            self.labels.append(cc)
            if n:
                # A lesion's first voxel in raster order lies in the first plane of its box, at
                # the first of its voxels there; the piece's corner makes it a whole-array index.
                first = []
                for local in range(1, n + 1):
                    zs, ys, xs = self.box(i, local)
                    y, x = np.unravel_index(int(np.argmax(cc[zs.start, ys, xs] == local)), (ys.stop - ys.start, xs.stop - xs.start))
                    first.append((box[0].start + zs.start, box[1].start + ys.start + y, box[2].start + xs.start + x))
                keys.append(np.ravel_multi_index(np.array(first).T, mask.shape))
                owners.append(np.stack([np.full(n, i), np.arange(1, n + 1)], axis=1))
        self.n = int(sum(len(k) for k in keys))  # type: ignore[arg-type, misc]
        self.where = np.zeros((self.n + 1, 2), dtype=np.int64)
        self.area = np.zeros(self.n + 1, dtype=np.int64)
        self.ids = [np.zeros(len(self.box_list(i)) + 1, dtype=np.int64) for i in range(len(self.labels))]
        if self.n:
            order = np.argsort(np.concatenate(keys), kind="stable")
            self.where[1:] = np.concatenate(owners)[order]
            for k, (piece, local) in enumerate(self.where[1:], start=1):
                self.ids[piece][local] = k
            for piece, cc in enumerate(self.labels):
                self.area[self.ids[piece][1:]] = np.bincount(cc.ravel(), minlength=len(self.ids[piece]))[1:]

    def box(self, piece: int, local: int) -> tuple[slice, ...]:
        """The bounding box of a lesion within its piece's label array."""
        return self.box_list(piece)[local - 1]

    def box_list(self, piece: int) -> list:
        if piece not in self._boxes:
            self._boxes[piece] = ndimage.find_objects(self.labels[piece])
        return self._boxes[piece]


def _unknown_labels(labels: np.ndarray, allowed: tuple[int, ...]) -> np.ndarray:
    """The values of `labels` not in `allowed`, sorted. Counting the allowed labels is several
    times faster than np.unique; the unknown values are only looked up when there are some."""
    known = sum(int(np.count_nonzero(labels == v)) for v in allowed if v != 0)
    if known == int(np.count_nonzero(labels)):
        return np.array([], dtype=labels.dtype)
    return np.setdiff1d(np.unique(labels), allowed)


def _grow(box: tuple[slice, ...], margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union_box(boxes: Sequence[tuple[slice, ...]], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The box holding all `boxes` plus a 1-voxel margin, clipped to `shape`: what `_hd95` needs
    (its masks' outer layer empty, or on the border of an array whose outer layer is)."""
    return tuple(
        slice(max(min(b[axis].start for b in boxes) - 1, 0), min(max(b[axis].stop for b in boxes) + 1, shape[axis]))
        for axis in range(len(shape))
    )


def _hd95_in_box(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    box = _bbox(pred | ref)
    return _hd95(pred[box], ref[box], spacing)
