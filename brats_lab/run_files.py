"""Every file a run keeps among its MLflow artifacts, named here once.

A fold run (written by training/trainer.py and training/scoring.py): its out-of-fold per-case
metrics, the final model, the last checkpoint, one label map per held-out case and overlay
pictures of the best and worst of them. A study run (ablation/report.py): the report and its tables.
Readers (ablation/report.py, inference/predict.py, review.py) find a file with
`tracking.Run.artifact(name)`, wherever the store keeps it.
"""

from __future__ import annotations

# A fold run
PER_CASE = "per_case_metrics.csv"  # one row per held-out case: Dice, sensitivity, specificity, HD95 per region
FINAL_MODEL = "model/model.pt"  # the weights `keep` chose and the config that rebuilds the network
CHECKPOINT = "checkpoints/last.pt"  # what --resume continues from
PREDICTIONS = "predictions"  # <case id>.nii.gz label maps in the case's original geometry
OVERLAYS = "overlays"  # <tag>_<case id>.png pictures
CONFIG = "config.json"  # a fold run's resolved config, for people (the final model carries its own)


def prediction(case_id: str) -> str:
    """The held-out case's label map."""
    return f"{PREDICTIONS}/{case_id}.nii.gz"


def overlay(tag: str, case_id: str) -> str:
    """A picture of the case's prediction over its image (`tag`: best, worst, ...)."""
    return f"{OVERLAYS}/{tag}_{case_id}.png"


# A study run
REPORT = "report.md"  # the tables as Markdown
REPORT_TEXT = "report.txt"  # what `brats-lab ablate` printed
TABLE3 = "table3.csv"  # the paper's Table 3 layout: arms x metrics, mean (std) over the runs
COMPARISON = "comparison.csv"  # each arm against the baseline: the run-level verdict per metric
COMPARISON_PER_CASE = "comparison_per_case.csv"  # the per-case description beside it
PER_CASE_OUT_OF_FOLD = "per_case_out_of_fold.csv"  # every fold run's per-case rows, with arm, fold, seed
SEED_SPREAD = "seed_spread.csv"  # the seed-to-seed SD of a run's mean, per arm
SEARCH = "search.csv"  # a [search]'s trials
REMOVED_CASES = "removed_cases.txt"  # patient removal: the cases left out of the second pass
