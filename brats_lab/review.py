"""Data shaping for the review dashboard (`dashboard/app.py`): runs and per-case tables in, the
frames the pages show out.

Everything here reads the store through `brats_lab.tracking` and never writes to it. The shaping
functions take the run table of `tracking.read_runs()` (or per-case frames) and are plain pandas,
so they are tested without Streamlit.

A "study" is what the Studies page lists: an ablation's study run (experiment `ablation-<name>`),
or a plain training, i.e. an arm run with no parent (experiment `brats-lab`), shown as a study of
one arm.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brats_lab import DataError, run_files, tracking
from brats_lab.data.cases import discover
from brats_lab.evaluation.metrics import lower_is_better, ranking_metrics  # ranking_metrics: for the dashboard
from brats_lab.io import read_image
from brats_lab.labels import BRATS_2020, REGIONS, LabelConvention

_HASH = "tags.config_hash"
_FOLD = "tags.fold"


def store_exists(root: Path | str | None = None) -> bool:
    """False when the default SQLite store has not been made yet (opening it would create it)."""
    artifacts = tracking.artifact_root(root)
    return artifacts is None or (artifacts.parent / tracking.DB_NAME).is_file()


def _col(runs: pd.DataFrame, name: str) -> pd.Series:
    """A column of the run table, or all-missing when no run has that tag or param."""
    return runs[name] if name in runs.columns else pd.Series(None, index=runs.index, dtype=object)


def fold_runs(runs: pd.DataFrame, study_id: str) -> pd.DataFrame:
    """The fold runs that make up a study: columns arm, arm_run_id, fold, seed, run_id, status.

    One row per (arm, fold, seed) (an ablation's arm run is one seed of one arm: its tags say
    which; a run without them is seed 0 of the arm its name says): the newest FINISHED fold run with the arm's config hash in the
    study's experiment (an ablation reuses finished folds of the same configuration, whichever
    arm run they hang under), else the newest unfinished one. `runs` is newest first.
    """
    cols = ["arm", "arm_run_id", "fold", "seed", "run_id", "status"]
    study = runs[runs["run_id"] == study_id]
    if study.empty:
        return pd.DataFrame(columns=cols)
    same_exp = runs[runs["experiment_id"] == study["experiment_id"].iloc[0]]
    if study["kind"].iloc[0] == "arm":  # a plain training: the arm is the study
        arms = study
    else:
        arms = same_exp[(same_exp["kind"] == "arm") & (same_exp["parent_run_id"] == study_id)]
    folds = same_exp[same_exp["kind"] == "fold"]
    rows = []
    for _, arm in arms.iterrows():
        mine = folds[_col(folds, _HASH) == arm.get(_HASH)]
        for fold, group in mine.groupby(_col(mine, _FOLD)):
            finished = group[group["status"] == "FINISHED"]
            best = (finished if not finished.empty else group).iloc[0]
            name, seed = arm.get("tags.arm"), arm.get("tags.seed")
            rows.append({"arm": name if isinstance(name, str) else arm["name"], "arm_run_id": arm["run_id"], "fold": int(fold),
                         "seed": int(seed) if isinstance(seed, str) else 0, "run_id": best["run_id"], "status": best["status"]})
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["arm", "seed", "fold"], ignore_index=True)


def studies(runs: pd.DataFrame, now: pd.Timestamp | None = None) -> pd.DataFrame:
    """One row per ablation study and plain training, newest first.

    Columns: run_id, type ("ablation" or "training"), experiment, name, state, folds_done (finished
    (arm, fold) cells), folds_planned (arms x folds for an ablation, when its params say; else
    missing), started, wall_time (end - start, or so far for a run still going).
    """
    cols = ["run_id", "type", "experiment", "name", "state", "folds_done", "folds_planned", "started", "wall_time"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    now = now if now is not None else pd.Timestamp.now(tz="UTC")
    chosen = runs[(runs["kind"] == "study") | ((runs["kind"] == "arm") & runs["parent_run_id"].isna())]
    rows = []
    for _, run in chosen.iterrows():
        cells = fold_runs(runs, run["run_id"])
        planned = None
        if run["kind"] == "study":
            n_arms = len(str(run.get("params.arms") or "").split(",")) if pd.notna(run.get("params.arms")) else None
            n_folds = pd.to_numeric(run.get("params.folds"), errors="coerce")
            n_seeds = pd.to_numeric(run.get("params.seeds", 1), errors="coerce")  # studies from before seeds: 1
            if n_arms and pd.notna(n_folds):
                planned = int(n_arms * n_folds * (n_seeds if pd.notna(n_seeds) else 1))
        end = run["end_time"] if pd.notna(run["end_time"]) else now
        rows.append({
            "run_id": run["run_id"], "type": "ablation" if run["kind"] == "study" else "training",
            "experiment": run["experiment"], "name": run["name"], "state": run["status"],
            "folds_done": int((cells["status"] == "FINISHED").sum()), "folds_planned": planned,
            "started": run["start_time"], "wall_time": (end - run["start_time"]).floor("s"),
        })
    return pd.DataFrame(rows, columns=cols)


def metric_long(per_case: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Per-case metrics (arm, fold, case, dice_ET, ...) -> one row per (arm, fold, case, region)
    with the `metric`'s value in a `value` column: the shape a box/strip chart wants."""
    value_vars = [f"{metric}_{r}" for r in REGIONS if f"{metric}_{r}" in per_case.columns]
    long = per_case.melt(id_vars=["arm", "fold", "case"], value_vars=value_vars, var_name="region", value_name="value")
    long["region"] = long["region"].str.removeprefix(f"{metric}_")
    return long


def run_table(per_case: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """One row per training run (arm, fold, seed) and region: the run's mean `metric` over its
    cases (columns arm, fold, seed, region, value): the seeds as their own marks."""
    table = per_case if "seed" in per_case.columns else per_case.assign(seed=0)
    cols = [f"{metric}_{r}" for r in REGIONS if f"{metric}_{r}" in table.columns]
    means = table.groupby(["arm", "fold", "seed"])[cols].mean().reset_index()
    long = means.melt(id_vars=["arm", "fold", "seed"], value_vars=cols, var_name="region", value_name="value")
    long["region"] = long["region"].str.removeprefix(f"{metric}_")
    return long


def fold_table(per_case: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Table 3 layout: one row per arm, one column per region, "mean (std)" over the runs' means
    (every fold and seed; std is blank with a single run), plus the number of folds and seeds."""
    table = per_case if "seed" in per_case.columns else per_case.assign(seed=0)
    cols = [f"{metric}_{r}" for r in REGIONS if f"{metric}_{r}" in table.columns]
    by_run = table.groupby(["arm", "fold", "seed"])[cols].mean()
    mean, std = by_run.groupby("arm").mean(), by_run.groupby("arm").std()
    table = pd.DataFrame(index=mean.index)
    for c in cols:
        table[c.removeprefix(f"{metric}_")] = [
            f"{m:.3f}" + (f" ({s:.3f})" if pd.notna(s) else "") for m, s in zip(mean[c], std[c])
        ]
    runs = by_run.reset_index().groupby("arm")
    table["folds"], table["seeds"] = runs["fold"].nunique(), runs["seed"].nunique()
    return table


def worst_cases(per_case: pd.DataFrame, arm: str, region: str, n: int = 10, by: str = "dice") -> pd.DataFrame:
    """The `n` cases of `arm` worst for `region` by `by` (lowest Dice, or highest HD95; lesion-wise
    too) first, a case where `by` is undefined (NaN: the region absent from both maps) last: fold,
    case, run_id (when given), and that case's Dice and HD95 (lesion-wise ones first) of every region."""
    rows = per_case[per_case["arm"] == arm].sort_values(
        [f"{by}_{region}", "case"], ascending=[not lower_is_better(by), True], kind="stable", na_position="last")
    keep = [c for c in ["fold", "case", "run_id"] if c in rows.columns]
    keep += [f"{m}_{r}" for m in ("lesion_dice", "lesion_hd95", "dice", "hd95") for r in REGIONS if f"{m}_{r}" in rows.columns]
    return rows[keep].head(n).reset_index(drop=True)


# --- reading artifacts (through tracking, into a local cache) -----------------------------------


DOWNLOADS = Path(tempfile.gettempdir()) / "brats-lab-dashboard"  # remote stores' artifacts, copied for the dashboard


def read_artifact_table(run_id: str, name: str, root: Path | str | None = None) -> pd.DataFrame | None:
    """A CSV artifact of a run as a DataFrame; None when the run has no such artifact."""
    path = tracking.get_run(run_id, root).artifact(name, DOWNLOADS)
    return None if path is None else pd.read_csv(path)


def load_per_case(cells: pd.DataFrame, root: Path | str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The per-case metrics of the finished fold runs in `cells` (from `fold_runs`), with columns
    arm, fold, seed, run_id added; and a note for each cell that has none to show."""
    frames, notes = [], []
    for cell in cells.itertuples():
        if cell.status != "FINISHED":
            notes.append(f"{cell.arm} fold {cell.fold}: {cell.status.lower()}, no metrics yet")
            continue
        table = read_artifact_table(cell.run_id, run_files.PER_CASE, root)
        if table is None:
            notes.append(f"{cell.arm} fold {cell.fold}: run {cell.run_id} has no {run_files.PER_CASE}")
            continue
        frames.append(table.assign(arm=cell.arm, fold=cell.fold, seed=getattr(cell, "seed", 0), run_id=cell.run_id))
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


CURVE_KEYS = ("train_loss", "val_loss", "lr")  # offered first; every per-epoch metric can be chosen


def curve_keys(runs: pd.DataFrame, run_ids: list[str]) -> list[str]:
    """Per-epoch metrics the fold runs `run_ids` logged (`final_*` summaries and timings left out)."""
    chosen = runs[runs["run_id"].isin(run_ids)]
    keys = [c.removeprefix("metrics.") for c in chosen.columns
            if c.startswith("metrics.") and chosen[c].notna().any()]
    keys = [k for k in keys if not k.startswith("final_") and k != "epoch_seconds"]
    return sorted(keys, key=lambda k: (CURVE_KEYS.index(k) if k in CURVE_KEYS else len(CURVE_KEYS), k))


def fold_curves(cells: pd.DataFrame, key: str, root: Path | str | None = None) -> pd.DataFrame:
    """The per-epoch history of metric `key` of each fold run in `cells`: arm, fold, run_id, epoch, value."""
    rows = []
    for cell in cells.itertuples():
        for step, value in tracking.get_run(cell.run_id, root).metric_history(key):
            rows.append({"arm": cell.arm, "fold": cell.fold, "run_id": cell.run_id, "epoch": step, "value": value})
    return pd.DataFrame(rows, columns=["arm", "fold", "run_id", "epoch", "value"])


def comparison_rows(comparison: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of an ablation's comparison.csv for one metric (`dice`, `hd95`, ...), with a
    `region` column and a short `label` for the chart: "<arm> <region>"."""
    rows = comparison[comparison["metric"].str.startswith(f"{metric}_")].copy()
    rows["region"] = rows["metric"].str.removeprefix(f"{metric}_")
    rows["label"] = rows["arm"] + " " + rows["region"]
    return rows.reset_index(drop=True)


@dataclass
class CaseVolumes:
    """What the Cases page shows of one case: the images (4, z, y, x) in MODALITIES order, the
    ground truth and each arm's prediction (z, y, x), and a note for each thing that is missing."""

    case: str
    images: np.ndarray | None
    reference: np.ndarray | None
    predictions: dict[str, np.ndarray]  # arm -> label map
    convention: LabelConvention
    notes: list[str]

    @property
    def shape(self) -> tuple[int, ...] | None:
        for volume in (self.images, self.reference, *self.predictions.values()):
            if volume is not None:
                return volume.shape[-3:]
        return None


def case_volumes(dataset: str | None, case: str, fold_run_ids: dict[str, str],
                 root: Path | str | None = None) -> CaseVolumes:
    """The images and ground truth of `case` from the training's dataset folder, and the prediction
    each arm's fold run logged (`predictions/<case>.nii.gz`). Only files that case discovery finds
    in `dataset`, and artifacts of the given runs, are read: nothing is taken from a typed path."""
    notes: list[str] = []
    images = reference = None
    convention = BRATS_2020
    found = None
    if not dataset:
        notes.append("the runs do not record their dataset folder, so no images are shown")
    else:
        try:
            found = next((c for c in discover(Path(dataset)) if c.id == case), None)
        except DataError as e:
            notes.append(f"cannot read the dataset: {e}")
        if found is None and not notes:
            notes.append(f"{case} is not in the dataset {dataset} any more")
    if found is not None:
        convention = found.convention
        try:
            images = np.stack([read_image(p, np.float32)[0] for p in found.images])
            if found.seg is not None:
                reference = read_image(found.seg, np.uint8)[0]
        except DataError as e:
            notes.append(str(e))
    predictions = {}
    for arm, run_id in fold_run_ids.items():
        path = prediction_path(run_id, case, root)
        if path is None:
            notes.append(f"{arm}: run {run_id[:8]} logged no prediction of {case}")
            continue
        try:
            predictions[arm] = read_image(path, np.uint8)[0]
        except DataError as e:
            notes.append(f"{arm}: {e}")
    return CaseVolumes(case, images, reference, predictions, convention, notes)


def prediction_path(run_id: str, case: str, root: Path | str | None = None) -> Path | None:
    """A local copy of the fold run's `predictions/<case>.nii.gz`, or None when it has none."""
    return tracking.get_run(run_id, root).artifact(run_files.prediction(case), DOWNLOADS)
