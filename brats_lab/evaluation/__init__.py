"""BraTS 2020 evaluation: Dice, sensitivity, specificity and HD95 per case and region, with the
challenge's rules for empty masks, and per-case tables over a folder of predictions."""

from brats_lab.evaluation.evaluate import EvaluationResult, evaluate_folder, format_summary, metric_columns
from brats_lab.evaluation.metrics import EMPTY_HD95, METRICS, RegionMetrics, case_metrics, region_metrics

__all__ = [
    "EMPTY_HD95",
    "METRICS",
    "EvaluationResult",
    "RegionMetrics",
    "case_metrics",
    "evaluate_folder",
    "format_summary",
    "metric_columns",
    "region_metrics",
]
