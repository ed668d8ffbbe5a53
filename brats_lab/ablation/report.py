"""The report of an ablation: the finished runs' out-of-fold per-case metrics gathered, the paper's
Table 3 (mean (std) over each arm's runs), the seed-to-seed noise floor, the run-level verdict of
`evaluation.stats` (each arm against the baseline, runs as the unit, Holm across regions), the
per-case description, the phantom truth of a patient removal, and the files logged to the study
run (CSV tables, report.md, report.txt). Also `--plan`: the design table that sizes a study before
it is paid for, at the noise floor a finished study measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from brats_lab import DataError, run_files, tracking
from brats_lab.config import config_hash
from brats_lab.data.cache import prepare
from brats_lab.evaluation.case_stats import compare_arms
from brats_lab.evaluation.metrics import ranking_metrics
from brats_lab.evaluation.stats import compare_runs, format_runs, minimum_detectable_effect, noise_floor, run_means
from brats_lab.labels import REGIONS

if TYPE_CHECKING:
    from brats_lab.ablation.study import Plan  # only for the annotations: study imports this module
    from brats_lab.config import ExperimentConfig


def run_per_case(run) -> pd.DataFrame:
    """A finished fold run's out-of-fold per-case metrics (its run_files.PER_CASE artifact)."""
    path = run.artifact(run_files.PER_CASE)
    if path is None:
        raise DataError(f"fold run {run.id}: no {run_files.PER_CASE} among its artifacts (did its training finish?)")
    return pd.read_csv(path)


@dataclass
class Report:
    """What `brats-lab ablate` prints (`text`) and logs to the study run (`log`)."""

    plan: Plan
    per_case: pd.DataFrame  # arm, fold, seed, case, metrics (out of fold)
    table: pd.DataFrame  # Table 3: per arm, mean (std) over the runs (folds and seeds)
    comparison: pd.DataFrame  # the verdict: each arm against the baseline, per region, runs as the unit
    search: pd.DataFrame | None = None  # the hyperparameter search's trials, best first
    seed_spread: pd.DataFrame | None = None  # per arm: the seed-to-seed SD of one run's mean (2+ seeds)
    per_case_comparison: pd.DataFrame | None = None  # a description of the cases, not the test

    def text(self) -> str:
        folds, seeds = len(self.plan.folds), len(self.plan.seeds)
        lines = [f"Ablation {self.plan.ablation.name!r}: {self.plan.ablation.description}",
                 f"{folds} folds x {seeds} seed{'s' if seeds > 1 else ''} = {folds * seeds} training runs per arm, profile {self.plan.profile}; "
                 "mean (std) over each arm's runs", *self._rules_note(), "", self.table.to_string(), ""]
        if self.seed_spread is not None:
            lines += ["Seeds apart: the seed-to-seed standard deviation of one run's mean, same arm and fold (the noise floor)", "",
                      self.seed_spread.to_string(), ""]
        else:
            lines += ["One seed: the seed-to-seed noise floor is not measured (--seeds 2 or more measures it); the verdict and "
                      "its MDE read the spread of the paired differences between folds.", ""]
        lines += [format_runs(self.comparison), ""]
        if folds == 2:
            lines += ["With 2 folds the test has one degree of freedom: it stays calibrated, but sees only differences as large "
                      "as the MDE column. More folds buy power fastest (brats-lab ablate NAME --plan).", ""]
        lines += [f"The per-case paired differences over the {self.per_case['case'].nunique()} out-of-fold cases describe the "
                  "cases (comparison_per_case.csv); they are not the test, since the cases of a run share its training noise."]
        lines += self._left_out_note()
        if self.search is not None:
            lines += ["", f"search around {self.plan.ablation.baseline!r} ({len(self.search)} trials, Optuna TPE, seed 0), best first:",
                      "", self.search.to_string(index=False)]
        if self.plan.excluded:
            lines += ["", f"left out of training in {self.plan.ablation.removal.arm!r} ({len(self.plan.excluded)}): "  # type: ignore[union-attr]
                      + ", ".join(self.plan.excluded) + _phantom_truth(self.plan)]
        return "\n".join(lines)

    def _left_out_note(self) -> list[str]:
        """What the per-case description left out (cases undefined in one arm of a pair: the
        false-positive lesions) and how counting them moves its mean difference."""
        described = self.per_case_comparison
        if described is None or "left_out" not in described.columns or not (described["left_out"] > 0).any():
            return []
        lines = ["It pairs only the cases with a value in both arms; left out (undefined in one arm, the false-positive lesions "
                 "among them, whose penalty the verdict counts), and the mean difference with them counted (mean_diff_all_cases):"]
        for r in described[described["left_out"] > 0].itertuples(index=False):
            digits = 4 if "dice" in r.metric else 2
            lines.append(f"  {r.arm} {r.metric}: {r.left_out} case{'s' if r.left_out > 1 else ''} left out, mean difference "
                         f"{r.mean_diff:.{digits}f} without them, {r.mean_diff_all_cases:.{digits}f} with them")
        return lines

    def _rules_note(self) -> list[str]:
        """How the metrics were scored: one line for lesion-wise data, none for BraTS 2020 rules."""
        if ranking_metrics(self.per_case)[0] != "lesion_dice":
            return []
        return ["Scored lesion-wise (BraTS 2023+ labels, brats-evaluation's gli rules): lesion_dice and lesion_hd95. A region "
                "absent from both the reference and the prediction is undefined (NaN) and left out of that run's mean; "
                "an arm's false-positive lesion there still counts (Dice 0, HD95 373)."]

    def log(self, study_run) -> None:
        study_run.log_table(self.per_case, run_files.PER_CASE_OUT_OF_FOLD)
        study_run.log_table(self.table.reset_index(names="arm"), run_files.TABLE3)
        study_run.log_table(self.comparison, run_files.COMPARISON)
        if self.per_case_comparison is not None:
            study_run.log_table(self.per_case_comparison, run_files.COMPARISON_PER_CASE)
        if self.seed_spread is not None:
            study_run.log_table(self.seed_spread.reset_index(names="arm"), run_files.SEED_SPREAD)
        study_run.log_text(_markdown(self.table.reset_index(names="arm")) + "\n\n" + _markdown(self.comparison) + "\n", run_files.REPORT)
        study_run.log_text(self.text() + "\n", run_files.REPORT_TEXT)
        if self.search is not None:
            study_run.log_table(self.search, run_files.SEARCH)


def gather(plan: Plan, arms: list[str]) -> pd.DataFrame:
    """Out-of-fold per-case metrics of these arms' finished runs (columns arm, fold, seed, case, ...)."""
    frames = []
    for arm in arms:
        data = data_hash(plan.config(arm, plan.seeds[0]))  # the data as it is now: never runs of other data
        for seed in plan.seeds:
            chash = config_hash(plan.config(arm, seed))
            for fold in plan.folds:
                run = tracking.latest_fold_run(plan.experiment, chash, fold, statuses=("FINISHED",), manifest_hash=data)
                if run is None:
                    raise DataError(f"({arm}, fold {fold}, seed {seed}) has no finished run; rerun the ablation to finish it")
                frames.append(run_per_case(run).assign(arm=arm, fold=fold, seed=seed))
    return pd.concat(frames, ignore_index=True)


def data_hash(cfg: "ExperimentConfig") -> str:
    """The manifest hash of the data `cfg` trains on, preprocessed as it asks (the cache is brought
    up to date first): a run is reused only for the same cases, content, preprocessing and its
    version, and so the same splits (made from this hash and `data.folds`, `data.seed`)."""
    return prepare(Path(cfg.data.dataset), cfg.data.normalization, progress=False).manifest_hash


def report(plan: Plan) -> Report:
    """Gather the finished runs' per-case metrics and compare the arms, runs as the unit, on the
    metrics of the data's rules (`ranking_metrics`)."""
    return summarise(plan, gather(plan, list(plan.ablation.arms)))


def summarise(plan: Plan, per_case: pd.DataFrame) -> Report:
    """The report of these out-of-fold per-case metrics (columns arm, fold, seed, case, metrics, as
    `gather` returns them): Table 3, the seed spread, the run-level verdict and the per-case
    description. Separate from `gather` so that a per-case table made by hand can be reported."""
    families = ranking_metrics(per_case)
    regions = [r for r in REGIONS if f"{families[0]}_{r}" in per_case.columns]
    metrics = [f"{m}_{r}" for m in families for r in regions]
    by_run = run_means(per_case, metrics)  # pandas skips NaN: each run's mean over its defined cases
    mean, std = by_run.groupby("arm").mean(), by_run.groupby("arm").std(ddof=1).fillna(0.0)
    table = pd.DataFrame(index=list(plan.ablation.arms))
    for m in metrics:
        digits = 3 if "dice" in m else 1
        table[m] = [f"{mean.loc[a, m]:.{digits}f} ({std.loc[a, m]:.{digits}f})" for a in table.index]
    # Holm corrects across the three regions of one metric, as the paper's table reads.
    lesionwise = families[0] == "lesion_dice"
    comparison = pd.concat([_compare_runs(per_case, plan.ablation.baseline, [f"{m}_{r}" for r in regions], lesionwise)
                            for m in families], ignore_index=True)
    comparison.attrs.update(baseline=plan.ablation.baseline, confidence=0.95)
    seed_spread = None
    if len(plan.seeds) >= 2:
        seed_spread = pd.DataFrame(index=list(plan.ablation.arms))
        for m in metrics:
            digits = 4 if "dice" in m else 2
            seed_spread[m] = [_seed_sd(by_run.loc[a, m].unstack("seed").to_numpy(), digits) for a in seed_spread.index]
    return Report(plan, per_case, table, comparison, seed_spread=seed_spread,
                  per_case_comparison=describe_cases(per_case, plan.ablation.baseline, families, regions))


def _seed_sd(runs, digits: int) -> str:
    """The noise floor of one arm's runs (fold, seed), or "undefined" where a lesion-wise run had no
    defined case (its mean is NaN; the verdict's row for that region says which run)."""
    return "undefined" if np.isnan(runs).any() else f"{noise_floor(runs):.{digits}f}"


def describe_cases(per_case: pd.DataFrame, baseline: str, families: tuple[str, ...], regions: list[str]) -> pd.DataFrame:
    """The per-case description (comparison_per_case.csv): each case's scores averaged over the
    seeds, each arm paired with the baseline over the cases (`compare_arms`, Holm over a metric's
    regions). Pairs need a value on both sides: lesion-wise, a case undefined in either arm of the
    pair (for any region of the metric) is left out of that metric's pairs, and those are exactly
    the false-positive lesions (undefined in one arm, the penalty in the other). So that nothing is
    dropped quietly, two more columns: `left_out`, how many cases with a value in one arm or both
    were left out of this row's pairs, and `mean_diff_all_cases`, the difference of the two arms'
    means over every case each arm has a value for (the penalties counted, as the run means count
    them); where `left_out` is 0 it equals `mean_diff`."""
    metrics = [f"{m}_{r}" for m in families for r in regions]
    cases = per_case.groupby(["arm", "case"], sort=False)[metrics].mean().reset_index()
    described = []
    for m in families:  # metric by metric, the arms in the table's order within each, as the verdict
        for arm in [a for a in pd.unique(cases["arm"]) if a != baseline]:
            pair = cases[cases["arm"].isin([baseline, arm])]
            cols = [f"{m}_{r}" for r in regions]
            undefined = set(pair.loc[pair[cols].isna().any(axis=1), "case"])
            result = compare_arms(pair[~pair["case"].isin(undefined)], baseline, cols)
            left_out, all_cases = [], []
            for col in cols:
                scored = pair[pair["case"].isin(undefined) & pair[col].notna()]
                left_out.append(int(scored["case"].nunique()))
                means = pair.groupby("arm")[col].mean()  # each arm over the cases it has a value for
                all_cases.append(float(means[arm] - means[baseline]))
            described.append(result.assign(left_out=left_out, mean_diff_all_cases=all_cases))
    if not described:
        return compare_arms(cases, baseline, metrics).assign(left_out=0, mean_diff_all_cases=0.0)
    return pd.concat(described, ignore_index=True)


def _compare_runs(per_case: pd.DataFrame, baseline: str, columns: list[str], lesionwise: bool) -> pd.DataFrame:
    """`compare_runs` on these columns; lesion-wise ones with `undefined=True`: each run's mean over
    its defined cases (as brats-evaluation's parser averages a team's cases), the cases still
    paired run by run (a run on 5 cases against a baseline run on 6 is refused, as on BraTS 2020
    data), a region with a run of no defined case not tested (its rows say why), and `n` the
    cases the arm has a value for in that column. The other arm's value on a case undefined in one
    arm is kept: a false-positive lesion there scores Dice 0 / HD95 373, the penalty is the point."""
    return compare_runs(per_case, baseline, columns, undefined=lesionwise)


def _markdown(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [" | ".join(map(str, df.columns)), " | ".join("---" for _ in df.columns)]
    rows += [" | ".join(cell(v) for v in row) for row in df.itertuples(index=False)]
    return "\n".join(f"| {r} |" for r in rows)


def _phantom_truth(plan: Plan) -> str:
    """For phantoms: which removed cases really had corrupted labels (phantom.json knows)."""
    manifest = Path(plan.dataset) / "phantom.json"
    if not manifest.is_file():
        return ""
    corrupted = {c["id"] for c in json.loads(manifest.read_text())["cases"] if c.get("corrupted")}
    hits = sorted(set(plan.excluded) & corrupted)
    return f"\n  of which {len(hits)} had deliberately corrupted labels (the dataset has {len(corrupted)} such cases)"


PLAN_SEEDS = (1, 2, 3, 5, 10)
VERDICT_ALPHA = 0.05  # the verdict's family-wise level over a metric's regions (compare_runs' default)


def measured_noise(experiment: str, profile: str) -> tuple[dict[str, float], str]:
    """The noise floor per metric column (dice_WT, ...) measured by the newest finished study of
    `experiment` and `profile` with two or more seeds, pooled over its arms, and which study that
    was; ({}, "") when there is none."""
    for run in tracking.find_runs(experiment, {"kind": "study", "profile": profile}, statuses=("FINISHED",)):
        if int(run.params.get("seeds", "1")) < 2:
            continue
        path = run.artifact(run_files.COMPARISON)
        if path is None:  # a study stopped before its report: look further back
            continue
        table = pd.read_csv(path)
        if "noise_floor" not in table.columns:
            continue
        pooled = table.groupby("metric")["noise_floor"].apply(lambda v: float(np.sqrt(np.mean(np.square(v)))))
        pooled = {m: v for m, v in pooled.items() if np.isfinite(v) and v > 0}  # a floor of 0 measured nothing
        if pooled:
            return pooled, f"study run {run.id} ({run.tags.get('study', run.name)}, {run.params.get('folds')} folds x {run.params.get('seeds')} seeds)"
    return {}, ""


def design_table(noise: float, arms: int, folds: list[int], seeds: tuple[int, ...] = PLAN_SEEDS) -> pd.DataFrame:
    """Minimum detectable effect at 80% power as the verdict tests (alpha 0.05 over the three
    regions: Holm's first step) and the training runs the study costs (arms x folds x seeds), for
    each folds x seeds design, at this noise floor."""
    table = pd.DataFrame(index=pd.Index(folds, name="folds"))
    for s in seeds:
        table[f"{s} seed{'s' if s > 1 else ''}"] = [
            f"{minimum_detectable_effect(noise, f, s, alpha=VERDICT_ALPHA / len(REGIONS)):.4f} ({arms * f * s} runs)" if f > 1
            else f"cannot tell ({arms * s} runs)"
            for f in folds]
    return table


def plan_text(plan: Plan, noise: float | None = None) -> str:
    """What `--plan` prints: the design table for the ablation's arms at the given noise floor, or
    at the one measured in the store (per metric); raises DataError when there is neither."""
    total = plan.ablation.arm_config(plan.ablation.baseline, plan.profile).data.folds
    folds = list(range(2, total + 1))
    arms = len(plan.ablation.arms)
    head = (f"Plan for {plan.ablation.name!r} ({arms} arms, profile {plan.profile}): the smallest true difference a study finds with "
            "80% power as the verdict tests (alpha 0.05 with Holm over the 3 regions; no arm-by-fold interaction assumed, so a lower "
            "bound), and the training runs it costs.")
    if noise is not None:
        return "\n".join([head, f"noise floor {noise:g} (given with --noise)", "", design_table(noise, arms, folds).to_string()])
    measured, source = measured_noise(plan.experiment, plan.profile)
    if not measured:
        raise DataError(f"no noise floor measured for {plan.ablation.name!r} with profile {plan.profile} in this store: run the study with "
                        "--seeds 2 or more first, or give one with --noise (e.g. --noise 0.01, a Dice SD)")
    lines = [head, f"noise floor per metric measured by {source}"]
    for metric, value in measured.items():
        lines += ["", f"{metric}: noise floor {value:.4g}", design_table(value, arms, folds).to_string()]
    return "\n".join(lines)
