"""Score a folder of predicted label maps against a BraTS dataset: one row per case, and a summary.

The rules follow the dataset's label convention: BraTS 2020 metrics for 2020/2021 labels (the
table exactly as before), and for 2023+ labels the lesion-wise metrics of `brats-evaluation`'s
`gli` rules (`evaluation/lesionwise.py`) next to the BraTS 2020 ones; `rules=` overrides.

Nothing is skipped quietly. A case whose prediction is missing, unreadable, in another geometry
or holds unknown labels is named in `problems` and still scored, with the worst value of every
metric, so a mean over the table never looks better for what went wrong.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from brats_lab import DataError
from brats_lab.data.cases import IMAGE_EXTENSIONS, Case, discover
from brats_lab.evaluation.lesionwise import (
    LEGACY_RULES,
    RULES,
    LesionMetrics,
    lesion_columns,
    lesion_metrics,
    rules_for,
)
from brats_lab.evaluation.metrics import EMPTY_HD95, METRICS, RegionMetrics, case_metrics
from brats_lab.files import atomic_path
from brats_lab.io import Geometry, read_header, read_volume
from brats_lab.labels import REGIONS, LabelConvention, foreign_convention

STATUSES: tuple[str, ...] = ("ok", "missing", "unreadable", "geometry", "labels")

# What a case scores when its prediction could not be scored: the worst of each metric (HD95: the
# BraTS grid's diagonal, as there may be no image to take a diagonal of).
WORST = RegionMetrics(dice=0.0, sensitivity=0.0, specificity=0.0, hd95=EMPTY_HD95)

SUMMARY_ROWS: tuple[str, ...] = ("mean", "std", "median", "25%", "75%")

METRIC_NAMES = {"dice": "Dice", "sensitivity": "Sensitivity", "specificity": "Specificity", "hd95": "HD95 (mm)"}
LESION_NAMES = {
    "lesion_dice": "Lesion-wise Dice",
    "lesion_hd95": "Lesion-wise HD95 (mm)",
    "volume_dice": "Whole-volume Dice",
    "volume_hd95": "Whole-volume HD95 (mm)",
}


def metric_columns() -> list[str]:
    """`<metric>_<region>` for every metric and region, e.g. `dice_ET`, `hd95_WT`."""
    return [f"{m}_{r}" for m in METRICS for r in REGIONS]


@dataclass
class EvaluationResult:
    """Per-case metrics (`table`: columns `case`, `status`, then `metric_columns()`) and every
    problem met on the way, each a sentence naming the case and the file."""

    table: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    problem_cases: list[str] = field(default_factory=list)  # the case ids `problems` concern, sorted
    rules: str = LEGACY_RULES  # the lesion-wise rule set of the extra columns, if any

    def columns(self) -> list[str]:
        """Every metric column of the table: `metric_columns()`, then the lesion-wise ones."""
        return [*metric_columns(), *lesion_columns(self.rules)]

    def summary(self) -> pd.DataFrame:
        """Mean, std, median, 25% and 75% of every metric column over all cases (rows).

        The std is the population one (ddof=0, numpy's), so a single case gives 0, not NaN.
        A lesion-wise value that is NaN (a region absent from reference and prediction) is left
        out of its column's statistics, as brats-evaluation's parser leaves it out of its mean.
        """
        values = self.table[self.columns()].astype(float)
        rows = {
            "mean": values.mean(),
            "std": values.std(ddof=0),
            "median": values.median(),
            "25%": values.quantile(0.25),
            "75%": values.quantile(0.75),
        }
        return pd.DataFrame(rows).T.loc[list(SUMMARY_ROWS)]

    def write_csv(self, path: Path) -> None:
        """The per-case table as CSV, written atomically."""
        with atomic_path(Path(path), suffix=".csv") as tmp:
            self.table.to_csv(tmp, index=False)


def evaluate_folder(pred_dir: Path, gt_dir: Path, progress: bool = True, rules: str | None = None) -> EvaluationResult:
    """Score `pred_dir/<case id>.nii.gz` (or `.nii`) against every case of the dataset `gt_dir`
    that has a segmentation, with `case_metrics` and the case's label convention, and with
    `lesion_metrics` under `rules` (default: the convention's, see `lesionwise.rules_for`;
    none for 2020/2021 data). Unknown `rules` raise ValueError.

    Raises DataError when `pred_dir` is not a folder or `gt_dir` holds no case with a
    segmentation, and when `rules` do not fit the data's label convention (lesion-wise rules on
    BraTS 2020 labels); every other problem goes to `result.problems` and the case's `status`,
    a prediction whose labels follow another release's convention than its reference included.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    cases = discover(gt_dir)
    # A case discovery found unusable (two files for one modality, a folder that cannot be
    # listed) is scored worst-case like an unreadable reference, not left out of the mean.
    scored = [c for c in cases if c.seg is not None or c.problems]
    if not scored:
        raise DataError(f"{gt_dir}: no case has a segmentation to evaluate against")
    try:
        rules = rules_for(cases[0].convention, rules)  # one layout, so one convention, per dataset
    except ValueError as e:
        raise DataError(f"--rules {rules} does not fit {gt_dir}: {e}") from None
    unscored = [c for c in cases if c.seg is None and not c.problems]
    problems = [f"{c.id}: no reference segmentation in {c.dir}; case not evaluated" for c in unscored]
    concerned = {c.id for c in unscored}
    known = {c.id for c in cases}
    try:
        listed = sorted(pred_dir.iterdir())
    except OSError as e:
        raise DataError(f"{pred_dir}: cannot list the prediction folder ({(e.strerror or str(e)).lower()})") from None
    for path in listed:
        case_id = _case_id(path)
        if case_id is not None and case_id not in known:
            problems.append(f"{path}: prediction for '{case_id}', which is not a case of {gt_dir}")
            concerned.add(case_id)

    iterator = scored
    if progress:
        iterator = tqdm(scored, desc="evaluating", unit="case", file=sys.stderr, leave=False)
    rows = []
    for case in iterator:
        status, metrics, lesions, case_problems = _evaluate_case(case, pred_dir, rules)
        problems.extend(case_problems)
        if case_problems:
            concerned.add(case.id)
        row: dict[str, object] = {"case": case.id, "status": status}
        for region in REGIONS:
            for metric, value in metrics[region].as_dict().items():
                row[f"{metric}_{region}"] = value
        for region, values in lesions.items():
            for metric, value in values.as_dict().items():
                row[f"{metric}_{region}"] = value
        rows.append(row)
    table = pd.DataFrame(rows, columns=["case", "status", *metric_columns(), *lesion_columns(rules)])
    return EvaluationResult(table=table, problems=problems, problem_cases=sorted(concerned), rules=rules)


def _worst_lesions(rules: str) -> dict[str, LesionMetrics]:
    """What an unscored case gets lesion-wise: brats-evaluation's parser gives a missing case
    0 everywhere and 373 for HD95 (here the rule set's penalty)."""
    if rules == LEGACY_RULES:
        return {}
    penalty = RULES[rules].penalty_hd95
    return {r: LesionMetrics(0.0, penalty, 0.0, penalty, 0, 0, 0) for r in RULES[rules].regions}


def _case_id(path: Path) -> str | None:
    """The case id a file in the prediction folder stands for; None if it is no prediction."""
    if path.name.startswith(".") or not path.is_file():
        return None  # hidden files include half-written atomic temporaries
    for ext in IMAGE_EXTENSIONS:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return None


def _evaluate_case(
    case: Case, pred_dir: Path, rules: str = LEGACY_RULES
) -> tuple[str, dict[str, RegionMetrics], dict[str, LesionMetrics], list[str]]:
    worst_lesions = _worst_lesions(rules)
    status, metrics, problems, arrays = _score_legacy(case, pred_dir)
    if arrays is None or rules == LEGACY_RULES:
        return status, metrics, worst_lesions, problems
    pred, ref, spacing = arrays
    try:
        lesions = lesion_metrics(pred, ref, spacing, rules)
    except ValueError as e:
        worst = {r: WORST for r in REGIONS}
        return "labels", worst, worst_lesions, [*problems, f"{case.id}: prediction ({rules} rules): {e}"]
    return status, metrics, lesions, problems


def _score_legacy(
    case: Case, pred_dir: Path
) -> tuple[str, dict[str, RegionMetrics], list[str], tuple[np.ndarray, np.ndarray, tuple[float, ...]] | None]:
    """The BraTS 2020 metrics of a case, and the label maps they came from when it was scored."""
    worst = {r: WORST for r in REGIONS}
    try:
        case.require_usable()
    except DataError as e:
        return "unreadable", worst, [f"{case.id}: reference unusable: {e}"], None
    candidates = [pred_dir / f"{case.id}{ext}" for ext in IMAGE_EXTENSIONS]
    found = [p for p in candidates if p.is_file() or p.is_symlink()]  # a broken link is read, and named
    if not found:
        names = " or ".join(p.name for p in candidates)
        return "missing", worst, [f"{case.id}: prediction missing (expected {names} in {pred_dir})"], None
    problems = []
    if len(found) > 1:
        problems.append(f"{case.id}: both {found[0].name} and {found[1].name} in {pred_dir}; scored {found[0].name}")
    pred_path = found[0]
    try:
        ref, ref_geometry = read_volume(case.seg)  # type: ignore[arg-type]
    except DataError as e:
        return "unreadable", worst, [*problems, f"{case.id}: reference unreadable: {e}"], None
    if bad := _reference_problem(case, ref, ref_geometry):
        return "unreadable", worst, [*problems, f"{case.id}: reference {case.seg}: {bad}"], None
    try:
        pred, pred_geometry = read_volume(pred_path)
    except DataError as e:
        return "unreadable", worst, [*problems, f"{case.id}: prediction unreadable: {e}"], None
    differences = ref_geometry.differences(pred_geometry)
    if differences:
        return "geometry", worst, [
            *problems,
            f"{case.id}: prediction {pred_path} is not in the geometry of the reference {case.seg} "
            f"(reference vs prediction: {'; '.join(differences)})",
        ], None
    try:
        metrics = case_metrics(pred, ref, ref_geometry.spacing_zyx, case.convention)
    except ValueError as e:
        return "labels", worst, [*problems, f"{case.id}: prediction {pred_path}: {e}"], None
    if bad := _foreign_labels(pred, ref, case.convention):
        return "labels", worst, [*problems, f"{case.id}: prediction {pred_path}: {bad}"], None
    return "ok", metrics, problems, (pred, ref, ref_geometry.spacing_zyx)


def _foreign_labels(pred: np.ndarray, ref: np.ndarray, convention: LabelConvention) -> str | None:
    """Why a prediction's labels look like another release's than its reference's, or None: a
    2023 prediction that writes ET as 4 would be scored as resection cavity (ET Dice 0 on a perfect
    map), so it is refused rather than scored."""
    pred_labels, ref_labels = set(np.unique(pred).tolist()), set(np.unique(ref).tolist())
    other = foreign_convention(pred_labels, ref_labels, convention)
    if other is None:
        return None
    theirs, own = other.regions["ET"], convention.regions["ET"]
    return (f"labels {sorted(int(v) for v in pred_labels)} follow the {other.name} convention (ET = {', '.join(map(str, theirs))}), "
            f"not the reference's {convention.name} (ET = {', '.join(map(str, own))}; "
            f"{', '.join(f'{v} = {convention.labels[v]}' for v in theirs if v in convention.labels)}): "
            f"it holds no label {', '.join(map(str, own))} and the reference no label {', '.join(map(str, theirs))}; "
            f"relabel the map to {convention.name}")


def _reference_problem(case: Case, ref: np.ndarray, geometry: Geometry) -> str | None:
    """What makes a reference segmentation unfit to score against: labels its release does not
    have, or a geometry that none of its case's images has (headers only; a broken image is
    `data check`'s to report, evaluation needs none)."""
    if extra := sorted(set(np.unique(ref).tolist()) - case.convention.allowed):
        return f"labels {', '.join(f'{v:g}' for v in extra)} not allowed by {case.convention.name} (allowed: {sorted(case.convention.allowed)})"
    images = {}
    for path in case.images:
        try:
            images[path.name] = read_header(path)[0]
        except DataError:
            continue
    if images and all(g.differences(geometry) for g in images.values()):
        name, other = next(iter(images.items()))
        return f"geometry differs from the images ({name}): " + "; ".join(other.differences(geometry))
    return None


def format_summary(result: EvaluationResult) -> str:
    """The summary as a readable table: regions as columns; per metric, a row `mean ± std` and a
    row `median [q1, q3]`; then the case count by status and every problem."""
    summary = result.summary()
    counts = result.table["status"].value_counts()
    status_text = ", ".join(f"{int(counts[s])} {s}" for s in STATUSES if s in counts)
    lines = [f"BraTS 2020 metrics over {len(result.table)} cases ({status_text})"]
    cells: list[list[str]] = [["", *REGIONS]]
    for metric in METRICS:
        digits = 2 if metric == "hd95" else 4
        f = lambda v: f"{v:.{digits}f}"  # noqa: E731
        stats = {r: summary[f"{metric}_{r}"] for r in REGIONS}
        cells.append([METRIC_NAMES[metric], *(f"{f(s['mean'])} ± {f(s['std'])}" for s in stats.values())])
        cells.append(["  median [q1, q3]", *(f"{f(s['median'])} [{f(s['25%'])}, {f(s['75%'])}]" for s in stats.values())])
    lines.extend(_table_lines(cells))
    if result.rules != LEGACY_RULES:
        lines.extend(["", *_lesion_lines(result, summary)])
    if result.problems:
        lines.append("")
        lines.append(f"Problems ({len(result.problems)}); cases with problems are scored worst-case:")
        lines.extend(f"  - {p}" for p in result.problems)
    return "\n".join(lines)



def _table_lines(cells: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]).rstrip()
        for row in cells
    ]


def _lesion_lines(result: EvaluationResult, summary: pd.DataFrame) -> list[str]:
    """The lesion-wise block of the summary: per metric `mean ± std` and `median [q1, q3]`, then
    the lesions counted over all cases."""
    rules = RULES[result.rules]
    regions = list(rules.regions)
    lines = [f"Lesion-wise metrics, {rules.name} rules ({rules.source})"]
    cells: list[list[str]] = [["", *regions]]
    names = dict(LESION_NAMES)
    if rules.matching == "bipartite":  # panoptica measures the whole volume's HD95 without the spacing
        names["volume_hd95"] = "Whole-volume HD95 (voxels)"
    for metric, name in names.items():
        digits = 2 if metric.endswith("hd95") else 4
        f = lambda v: "n/a" if np.isnan(v) else f"{v:.{digits}f}"  # noqa: E731
        stats = {r: summary[f"{metric}_{r}"] for r in regions}
        cells.append([name, *(f"{f(s['mean'])} ± {f(s['std'])}" for s in stats.values())])
        cells.append(["  median [q1, q3]", *(f"{f(s['median'])} [{f(s['25%'])}, {f(s['75%'])}]" for s in stats.values())])
    totals = {m: {r: int(result.table[f"{m}_{r}"].sum()) for r in regions} for m in ("lesion_tp", "lesion_fp", "lesion_fn")}
    cells.append(["Lesions TP / FP / FN", *(f"{totals['lesion_tp'][r]} / {totals['lesion_fp'][r]} / {totals['lesion_fn'][r]}" for r in regions)])
    lines.extend(_table_lines(cells))
    undefined = sum(int(result.table[f"lesion_dice_{r}"].isna().sum()) for r in regions)
    if undefined:
        lines.append(f"(n/a or fewer values: {undefined} region(s) absent from both reference and prediction are left out)")
    return lines
