"""BraTS evaluation: Dice, sensitivity, specificity and HD95 per case and region with the 2020
challenge's rules, lesion-wise Dice and HD95 with the 2023+ rules, and per-case tables over a
folder of predictions. The statistics of an ablation are imported from their modules: `stats`
(the run-level verdict) and `case_stats` (the per-case description)."""

from brats_lab.evaluation.evaluate import EvaluationResult, evaluate_folder, format_summary, metric_columns
from brats_lab.evaluation.lesionwise import (
    LESION_METRICS,
    RULE_NAMES,
    LesionMetrics,
    case_scores,
    lesion_columns,
    lesion_metrics,
    rules_for,
)
from brats_lab.evaluation.metrics import EMPTY_HD95, METRICS, RegionMetrics, case_metrics, empty_hd95, region_metrics

__all__ = [
    "EMPTY_HD95",
    "LESION_METRICS",
    "RULE_NAMES",
    "LesionMetrics",
    "case_scores",
    "lesion_columns",
    "lesion_metrics",
    "rules_for",
    "METRICS",
    "EvaluationResult",
    "RegionMetrics",
    "case_metrics",
    "empty_hd95",
    "evaluate_folder",
    "format_summary",
    "metric_columns",
    "region_metrics",
]
