"""Run an ablation as an Optuna study: one trial is one (arm, fold, seed), trained and validated by
the trainer, tracked in MLflow as study run -> arm runs (one per arm and seed) -> fold runs.

Seed k of an arm is the arm's config with `train.seed` + k: its own config hash, so it is found,
reused and resumed like any configuration; its arm run and fold runs carry the tags `arm` and
`seed` (k), and `train.seed` is a param. Seed 0 is the arm as written, so a study run before seeds
existed is reused as seed 0.

The launcher creates the MLflow study and arm runs and enqueues every (arm, fold, seed) not done yet as a
waiting Optuna trial; workers (this process, `--workers` local processes, or `brats-lab worker`
on other machines sharing the storage) claim waiting trials one at a time. Claiming is Optuna's
own atomic WAITING -> RUNNING transition, so no (arm, fold, seed) is trained twice. A worker records a
heartbeat while it trains; a trial whose worker died is failed by the next launcher or worker and
enqueued again, and its fold resumes from its last checkpoint where the worker taking it can read
that checkpoint (always with the embedded store; with an MLflow server serving artifacts, only on
the machine that wrote it); elsewhere the dead run is closed as FAILED and the fold is trained
again in a new run. A finished (arm, fold, seed) is found by
config hash (which includes the seed) and fold in MLflow and reused, so running the same command twice does no work twice.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pandas as pd

from brats_lab import DataError
from brats_lab.ablation.spec import Ablation, load_ablation, parse_ablation
from brats_lab.config import config_hash, flatten
from brats_lab.labels import REGIONS

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
# A worker silent for GRACE_SECONDS is dead: its trial fails and is enqueued again. (Environment
# overrides exist for the tests, which kill a worker and cannot wait minutes.)
HEARTBEAT_SECONDS = int(os.environ.get("BRATS_LAB_HEARTBEAT_SECONDS", "20"))
GRACE_SECONDS = int(os.environ.get("BRATS_LAB_GRACE_SECONDS", "90"))


@dataclass(frozen=True)
class Plan:
    ablation: Ablation
    profile: str
    folds: tuple[int, ...]
    dataset: str
    storage: str
    excluded: tuple[str, ...] = ()  # patient removal: decided after the baseline's pass
    seeds: tuple[int, ...] = (0,)  # seed k trains with the arm's train.seed + k

    @property
    def study_name(self) -> str:
        # The grid's identity: the arms' config hashes (before any removal) and the folds, so
        # another profile, dataset or fold count is another study, and the same command finds its
        # own again.
        hashes = ",".join(f"{a}:{config_hash(self._base_config(a))[:12]}" for a in self.ablation.arms)
        import hashlib

        seeds = f"|seeds={len(self.seeds)}" if self.seeds != (0,) else ""  # one seed: the name it had before seeds
        digest = hashlib.sha256(f"{hashes}|{self.folds}{seeds}".encode()).hexdigest()[:10]
        return f"{self.ablation.name}-{self.profile}-{digest}"

    @property
    def experiment(self) -> str:
        return f"ablation-{self.ablation.name}"

    def _base_config(self, arm: str):
        return self.ablation.arm_config(arm, self.profile, [f"data.dataset={self.dataset}"])

    def config(self, arm: str, seed: int = 0):
        """The resolved config of `arm` trained with seed index `seed` (train.seed + seed)."""
        extra = [f"data.dataset={self.dataset}"]
        removal = self.ablation.removal
        if removal is not None and arm == removal.arm:
            if not self.excluded:
                raise DataError(f"arm {arm!r} has no configuration before the baseline's pass decides what to remove")
            extra.append(f"data.exclude={list(self.excluded)}".replace("'", '"'))
        cfg = self.ablation.arm_config(arm, self.profile, extra)
        if seed:  # offset from the arm's own seed, so two arms with other seeds (an A/A study) stay apart
            cfg = self.ablation.arm_config(arm, self.profile, [*extra, f"train.seed={cfg.train.seed + seed}"])
        return cfg

    def ready_arms(self) -> list[str]:
        """The arms whose configuration is known now (a removal arm only after the first pass)."""
        removal = self.ablation.removal
        return [a for a in self.ablation.arms if removal is None or a != removal.arm or self.excluded]

    def cells(self) -> list[tuple[str, int, int]]:
        return [(arm, fold, seed) for arm in self.ready_arms() for seed in self.seeds for fold in self.folds]

    def attrs(self) -> dict:
        return {"ablation": self.ablation.source, "ablation_toml": self.ablation.text, "profile": self.profile, "folds": list(self.folds),
                "dataset": self.dataset, "excluded": list(self.excluded), "seeds": list(self.seeds)}


def make_plan(name_or_path: str, profile: str, folds: int | None, dataset: str, storage: str, seeds: int | None = None) -> Plan:
    ablation = load_ablation(name_or_path)
    k = ablation.fold_count(profile) if folds is None else folds  # --folds 0 is refused, not the default
    total = ablation.arm_config(ablation.baseline, profile).data.folds
    if not 1 <= k <= total:
        raise DataError(f"--folds must be between 1 and {total} (the data is split in {total} folds), got {k}")
    n = seeds or ablation.seed_count(profile)
    if n < 1:
        raise DataError(f"--seeds must be at least 1, got {n}")
    return Plan(ablation, profile, tuple(range(k)), str(dataset), storage, seeds=tuple(range(n)))


def _storage(url: str, create: bool = True):
    """Optuna's storage at `url`; with `create` false (a worker), refuse a SQLite file or an
    empty database instead of creating it: a worker given a wrong URL must leave nothing behind."""
    import warnings

    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    given = url
    if url.startswith("sqlite:///"):
        file = Path(url.removeprefix("sqlite:///").partition("?")[0])
        if not create and not file.is_file():
            raise DataError(f"no Optuna storage at {file} (a worker does not create one); "
                            "start the study with `brats-lab ablate`, and give workers its --storage")
        file.parent.mkdir(parents=True, exist_ok=True)
    url = _quote_at(url)  # a raw '@' in the password would end it early for SQLAlchemy
    # The driver we depend on is psycopg 3; SQLAlchemy before 2.1 reads a plain postgresql:// as
    # psycopg2, and never accepts postgres://.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url.removeprefix(prefix)
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9, and what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            # A stale trial (its worker died) is failed by whichever worker or launcher sees it
            # first, and that one process enqueues it again, so the workers still running finish
            # the grid without a new launch. Three retries: a fold that kills every worker taking
            # it (out of memory, say) waits for the launcher to be run again.
            retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
            callback = ({"heartbeat_stale_trial_callback": retry(max_retry=3)} if retry is not None
                        else {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3)})
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                              skip_table_creation=not create, **callback)
        except (SQLAlchemyError, ImportError, optuna.exceptions.StorageInternalError) as e:
            if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
                e = e.__cause__  # Optuna's own words say nothing of the cause
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            if not create and "version_info" in reason:  # a database without Optuna's tables
                reason += " (a worker does not create a storage: start the study with `brats-lab ablate`)"
            password = _password(given)
            for form in {password, unquote(password)} - {""}:  # drivers may echo it decoded
                reason = reason.replace(form, "***")
            raise DataError(f"cannot open the Optuna storage {_safe(given)}: {reason}") from None


def launch(plan: Plan):
    """Create (or find) the study, its MLflow runs and the waiting trials; return the study run."""
    import optuna
    from optuna.trial import TrialState

    from brats_lab import tracking

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Both stores open before any run changes state: a relaunch with a storage that cannot be
    # opened must leave finished runs FINISHED.
    store = _storage(plan.storage)
    study_run = next(iter(tracking.find_runs(plan.experiment, {"kind": "study", "study": plan.study_name})), None)
    if study_run is None:
        study_run = tracking.start_run(plan.experiment, plan.ablation.name, "study",
                                       {"study": plan.study_name, "storage": _safe(plan.storage), "profile": plan.profile})
        study_run.log_params({"ablation": plan.ablation.name, "baseline": plan.ablation.baseline,
                              "arms": ",".join(plan.ablation.arms), "folds": str(len(plan.folds)), "seeds": str(len(plan.seeds)),
                              "profile": plan.profile})
    elif study_run.status != "RUNNING":
        study_run.reopen()
    for arm in plan.ready_arms():
        for seed in plan.seeds:
            arm_run = _arm_run(plan, study_run, arm, seed)
            if arm_run.status != "RUNNING":  # the arm runs while its folds may
                arm_run.reopen()

    study = optuna.create_study(study_name=plan.study_name, storage=store, load_if_exists=True,
                                direction="maximize")
    for key, value in {**plan.attrs(), "mlflow_study_run": study_run.id}.items():
        study.set_user_attr(key, value)
    _fail_stale(study)  # workers that died: their trials fail here, then are enqueued again
    pending = {(t.user_attrs.get("arm"), t.user_attrs.get("fold"), t.user_attrs.get("seed", 0))
               for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE))}
    for arm, fold, seed in plan.cells():
        if (arm, fold, seed) not in pending:
            study.enqueue_trial({}, user_attrs={"arm": arm, "fold": fold, "seed": seed})
    return study_run


def _arm_run(plan: Plan, study_run, arm: str, seed: int):
    """The arm run of (arm, seed) under the study run, tagged with both (fold runs copy `seed`)."""
    from brats_lab import tracking

    cfg = plan.config(arm, seed)
    name = arm if seed == 0 else f"{arm} seed {seed}"
    run = tracking.arm_run(plan.experiment, config_hash(cfg), name, flatten(cfg), parent=study_run)
    if run.tags.get("arm") != arm or run.tags.get("seed") != str(seed):
        run.set_tags({"arm": arm, "seed": seed})
    return run


def work(study_name: str, storage: str, progress: bool = True) -> int:
    """Claim and run waiting trials until none is left; returns how many this worker ran."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from sqlalchemy.exc import SQLAlchemyError

    store = _storage(storage, create=False)
    try:
        study = optuna.load_study(study_name=study_name, storage=store)
    except (KeyError, SQLAlchemyError):  # no such study, or no Optuna tables at all
        raise DataError(f"no study {study_name!r} in {_safe(storage)}; start it with `brats-lab ablate`") from None
    attrs = study.user_attrs
    plan = Plan(parse_ablation(attrs["ablation_toml"], attrs["ablation"]), attrs["profile"], tuple(attrs["folds"]), attrs["dataset"], storage,
                tuple(attrs.get("excluded", ())), tuple(attrs.get("seeds", (0,))))
    from brats_lab import tracking

    parent = tracking.get_run(attrs["mlflow_study_run"])
    done = 0
    while True:
        _fail_stale(study)
        trial = _claim(study, store)
        if trial is None:
            return done
        arm, fold, seed = trial.user_attrs["arm"], trial.user_attrs["fold"], trial.user_attrs.get("seed", 0)
        beat = _Heartbeat(store, trial._trial_id)
        try:
            table = run_cell(plan, parent, arm, fold, progress, seed)
        except BaseException:
            beat.stop()
            store.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            raise
        beat.stop()
        store.set_trial_state_values(trial._trial_id, state=TrialState.COMPLETE, values=[float(table["dice_WT"].mean())])
        done += 1


def _work_until_done(study_name: str, storage: str, progress: bool) -> None:
    """Work, then wait for the trials other workers (here or on other machines) still run, so the
    report finds every fold; the trial of a worker that dies meanwhile is retried here."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=_storage(storage))
    while True:
        work(study_name, storage, progress=progress)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            return
        time.sleep(HEARTBEAT_SECONDS)


def _fail_stale(study) -> None:
    import warnings

    import optuna

    with warnings.catch_warnings():  # "experimental" since Optuna 2.9, and what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _claim(study, store):
    """A waiting trial, now RUNNING and ours, or None. Optuna refuses the WAITING -> RUNNING
    transition to all but one of several workers asking for the same trial."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if store.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
            return trial
    return None


class _Heartbeat:
    def __init__(self, store, trial_id: int) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(store, trial_id), daemon=True)
        self._thread.start()

    def _run(self, store, trial_id: int) -> None:
        while not self._stop.is_set():
            store.record_heartbeat(trial_id)
            self._stop.wait(HEARTBEAT_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_cell(plan: Plan, study_run, arm: str, fold: int, progress: bool = True, seed: int = 0) -> pd.DataFrame:
    """The per-case metrics of (arm, fold, seed): reused if a finished run exists, resumed if an
    unfinished one has a checkpoint this machine can read, trained afresh otherwise."""
    from brats_lab import tracking
    from brats_lab.training.checkpoint import checkpoint_path
    from brats_lab.training.trainer import train_fold

    cfg = plan.config(arm, seed)
    chash = config_hash(cfg)
    finished = tracking.latest_fold_run(plan.experiment, chash, fold, statuses=("FINISHED",))
    if finished is not None:
        return _per_case(finished)
    unfinished = tracking.latest_fold_run(plan.experiment, chash, fold, statuses=("RUNNING", "FAILED", "KILLED"))
    resume = unfinished is not None and checkpoint_path(unfinished).is_file()
    if unfinished is not None and not resume and unfinished.status == "RUNNING":
        # This worker holds the trial, so the run's own worker is dead; its checkpoint, if any,
        # is on the machine that trained it (a remote artifact store keeps checkpoints local).
        # Close the dead run, so none is left RUNNING, and train the fold in a new one.
        unfinished.set_tags({"abandoned": f"its worker died; {socket.gethostname()} found no checkpoint at "
                                          f"{checkpoint_path(unfinished)} and trained the fold again in a new run"})
        unfinished.finish("FAILED")
    arm_run = _arm_run(plan, study_run, arm, seed)
    return train_fold(cfg, fold, resume=resume, experiment=plan.experiment, parent=arm_run, progress=progress).per_case


def _per_case(run) -> pd.DataFrame:
    local = run.artifact_dir()
    path = local / "per_case_metrics.csv" if local is not None else run.download_artifact("per_case_metrics.csv", Path("mlruns/downloads") / run.id)
    return pd.read_csv(path)


def run_study(plan: Plan, workers: int = 1, progress: bool = True) -> "Report":
    """Launch, work (with `workers` processes on this machine), wait for the trials that other
    workers still run, and report."""
    import torch

    study_run = launch(plan)
    helpers = []
    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        for _ in range(workers - 1):
            helpers.append(subprocess.Popen(
                [sys.executable, "-m", "brats_lab.cli", "worker", "--study", plan.study_name, "--storage", plan.storage, "--quiet"],
                env=env,
            ))
        time.sleep(1)  # let them claim first: this process takes what is left
    try:
        _work_until_done(plan.study_name, plan.storage, progress)
    except BaseException:
        # Stopped (Ctrl-C, SIGTERM, an error): stop the helpers too, the same clean way (their
        # trials failed, their fold runs KILLED, ready to resume), rather than leave them running.
        for helper in helpers:
            helper.terminate()
        for helper in helpers:
            helper.wait()
        raise
    finally:
        torch.set_num_threads(threads)  # the caller's process is left as it was
    failed = [p for p in helpers if p.wait() != 0]
    if failed:
        raise DataError(f"{len(failed)} worker process(es) failed; rerun the same command to retry their trials")
    if plan.ablation.removal is not None and not plan.excluded:
        # Second pass: the cases the baseline scored worst out of fold, left out of training.
        plan = dataclasses.replace(plan, excluded=choose_removed(plan))
        study_run.set_tags({"removed_cases": ",".join(plan.excluded)})
        study_run.log_text("\n".join(plan.excluded) + "\n", "removed_cases.txt")
        launch(plan)
        _work_until_done(plan.study_name, plan.storage, progress)
    result = report(plan)
    if plan.ablation.search is not None:
        result.search = search(plan, study_run, progress)
    result.log(study_run)
    from brats_lab import tracking

    for arm_run in tracking.find_runs(plan.experiment, {"kind": "arm", "mlflow.parentRunId": study_run.id}):
        arm_run.finish("FINISHED")
    study_run.finish("FINISHED")
    return result


def search(plan: Plan, study_run, progress: bool = True) -> pd.DataFrame:
    """The ablation's hyperparameter search: a TPE study over `search.params` around the baseline
    arm; each trial trains the folds of one sampled configuration (reused by config hash). Returns
    one row per trial, best first."""
    import optuna

    from brats_lab import tracking

    spec = plan.ablation.search
    assert spec is not None
    sampler = optuna.samplers.TPESampler(seed=spec.seed)
    study = optuna.create_study(study_name=f"{plan.study_name}-search", storage=_storage(plan.storage),
                                sampler=sampler, direction="maximize", load_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        values = {k: trial.suggest_float(k, low, high, log=log) for k, (low, high, log) in spec.params.items()}
        cfg = plan.ablation.arm_config(plan.ablation.baseline, plan.profile,
                                       [f"data.dataset={plan.dataset}", *(f"{k}={v!r}" for k, v in values.items())])
        name = "search " + ", ".join(f"{k}={v:.3g}" for k, v in values.items())
        arm_run = tracking.arm_run(plan.experiment, config_hash(cfg), name, flatten(cfg), parent=study_run)
        scores = []
        for fold in plan.folds:
            finished = tracking.latest_fold_run(plan.experiment, config_hash(cfg), fold, statuses=("FINISHED",))
            table = _per_case(finished) if finished is not None else train_fold(
                cfg, fold, experiment=plan.experiment, parent=arm_run, progress=progress).per_case
            scores.append(float(table[spec.metric].mean()))
        return sum(scores) / len(scores)

    from brats_lab.training.trainer import train_fold

    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if done < spec.trials:
        study.optimize(objective, n_trials=spec.trials - done)
    rows = [{**t.params, f"mean_{spec.metric}": t.value} for t in study.trials if t.value is not None]
    return pd.DataFrame(rows).sort_values(f"mean_{spec.metric}", ascending=False, ignore_index=True)


def choose_removed(plan: Plan) -> tuple[str, ...]:
    """The baseline's worst `fraction` of cases by their out-of-fold `metric` (at least one)."""
    removal = plan.ablation.removal
    assert removal is not None
    table = _gather(plan, [plan.ablation.baseline])
    scores = table.groupby("case")[removal.metric].mean().sort_values(kind="stable")
    count = max(1, round(removal.fraction * len(scores)))
    return tuple(sorted(scores.index[:count]))


@dataclass
class Report:
    plan: Plan
    per_case: pd.DataFrame  # arm, fold, seed, case, metrics (out of fold)
    table: pd.DataFrame  # Table 3: per arm, mean (std) over the runs (folds and seeds)
    comparison: pd.DataFrame  # the verdict: each arm against the baseline, per region, runs as the unit
    search: pd.DataFrame | None = None  # the hyperparameter search's trials, best first
    seed_spread: pd.DataFrame | None = None  # per arm: the seed-to-seed SD of one run's mean (2+ seeds)
    per_case_comparison: pd.DataFrame | None = None  # a description of the cases, not the test

    def text(self) -> str:
        from brats_lab.evaluation.stats import format_runs

        folds, seeds = len(self.plan.folds), len(self.plan.seeds)
        lines = [f"Ablation {self.plan.ablation.name!r}: {self.plan.ablation.description}",
                 f"{folds} folds x {seeds} seed{'s' if seeds > 1 else ''} = {folds * seeds} training runs per arm, profile {self.plan.profile}; "
                 "mean (std) over each arm's runs", *self._rules_note(), "", self.table.to_string(), ""]
        if self.seed_spread is not None:
            lines += ["Seeds apart: the seed-to-seed standard deviation of one run's mean, same arm and fold (the noise floor)", "",
                      self.seed_spread.to_string(), ""]
        else:
            lines += ["One seed: the noise floor is not measured and the minimum detectable effect is unknown "
                      "(--seeds 2 or more measures them).", ""]
        lines += [format_runs(self.comparison), ""]
        if folds == 2:
            lines += ["With 2 folds the test has one degree of freedom: it stays calibrated, but sees only differences as large "
                      "as the MDE column. More folds buy power fastest (brats-lab ablate NAME --plan).", ""]
        lines += [f"The per-case paired differences over the {self.per_case['case'].nunique()} out-of-fold cases describe the "
                  "cases (comparison_per_case.csv); they are not the test, since the cases of a run share its training noise."]
        if self.search is not None:
            lines += ["", f"search around {self.plan.ablation.baseline!r} ({len(self.search)} trials, Optuna TPE, seed 0), best first:",
                      "", self.search.to_string(index=False)]
        if self.plan.excluded:
            lines += ["", f"left out of training in {self.plan.ablation.removal.arm!r} ({len(self.plan.excluded)}): "
                      + ", ".join(self.plan.excluded) + _phantom_truth(self.plan)]
        return "\n".join(lines)

    def _rules_note(self) -> list[str]:
        """How the metrics were scored: one line for lesion-wise data, none for BraTS 2020 rules."""
        if ranking_metrics(self.per_case)[0] != "lesion_dice":
            return []
        return ["Scored lesion-wise (BraTS 2023+ labels, brats-evaluation's gli rules): lesion_dice and lesion_hd95. A region "
                "absent from both the reference and the prediction is undefined (NaN) and left out of that run's mean; "
                "an arm's false-positive lesion there still counts (Dice 0, HD95 373)."]

    def log(self, study_run) -> None:
        study_run.log_table(self.per_case, "per_case_out_of_fold.csv")
        study_run.log_table(self.table.reset_index(), "table3.csv")
        study_run.log_table(self.comparison, "comparison.csv")
        if self.per_case_comparison is not None:
            study_run.log_table(self.per_case_comparison, "comparison_per_case.csv")
        if self.seed_spread is not None:
            study_run.log_table(self.seed_spread.reset_index(names="arm"), "seed_spread.csv")
        study_run.log_text(_markdown(self.table.reset_index(names="arm")) + "\n\n" + _markdown(self.comparison) + "\n", "report.md")
        study_run.log_text(self.text() + "\n", "report.txt")
        if self.search is not None:
            study_run.log_table(self.search, "search.csv")


def _gather(plan: Plan, arms: list[str]) -> pd.DataFrame:
    """Out-of-fold per-case metrics of these arms' finished runs (columns arm, fold, seed, case, ...)."""
    from brats_lab import tracking

    frames = []
    for arm in arms:
        for seed in plan.seeds:
            chash = config_hash(plan.config(arm, seed))
            for fold in plan.folds:
                run = tracking.latest_fold_run(plan.experiment, chash, fold, statuses=("FINISHED",))
                if run is None:
                    raise DataError(f"({arm}, fold {fold}, seed {seed}) has no finished run; rerun the ablation to finish it")
                frames.append(_per_case(run).assign(arm=arm, fold=fold, seed=seed))
    return pd.concat(frames, ignore_index=True)


def ranking_metrics(per_case: pd.DataFrame) -> tuple[str, ...]:
    """The metrics an ablation's Table 3 and verdict compare, by the rules of the data: lesion-wise
    Dice and HD95 (`lesion_dice`, `lesion_hd95`) when the per-case table has them (2023+ labels,
    see `evaluation/lesionwise.py`), else the BraTS 2020 `dice` and `hd95`."""
    if any(c.startswith("lesion_dice_") for c in per_case.columns):
        return ("lesion_dice", "lesion_hd95")
    return ("dice", "hd95")


def _defined_run_means(per_case: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row per run (arm, fold, seed) with each column's mean over the run's cases where it is
    defined, as a per-case table with one pseudo-case per run: what `compare_runs` tests.

    A lesion-wise value is NaN where a region is absent from both the reference and the
    prediction (nothing to score). Each run's mean skips those cases, as brats-evaluation's
    parser skips them when it averages a team's cases; the cases are not dropped from the other
    arm, since an arm that predicts a false-positive lesion there scores Dice 0 / HD95 373 and
    that penalty is the point. `compare_runs` refuses NaN on purpose, so the dropping happens
    here, explicitly. A run with no defined case in a column cannot be compared: DataError.
    """
    means = per_case.groupby(["arm", "fold", "seed"], sort=False)[columns].mean().reset_index()
    for col in columns:
        empty = means[means[col].isna()]
        if not empty.empty:
            first = empty.iloc[0]
            raise DataError(f"{col}: run ({first['arm']}, fold {first['fold']}, seed {first['seed']}) has no case where the region "
                            "is present in the reference or the prediction; it cannot be compared")
    return means.assign(case="(run mean)")


def report(plan: Plan) -> Report:
    """Gather the finished runs' per-case metrics and compare the arms, runs as the unit, on the
    metrics of the data's rules (`ranking_metrics`)."""
    from brats_lab.evaluation.stats import compare_arms, noise_floor, run_means

    per_case = _gather(plan, list(plan.ablation.arms))
    families = ranking_metrics(per_case)
    regions = [r for r in REGIONS if f"{families[0]}_{r}" in per_case.columns]
    metrics = [f"{m}_{r}" for m in families for r in regions]
    by_run = run_means(per_case, metrics)  # pandas skips NaN: each run's mean over its defined cases
    mean, std = by_run.groupby("arm").mean(), by_run.groupby("arm").std(ddof=1).fillna(0.0)
    table = pd.DataFrame(index=list(plan.ablation.arms))
    for m in metrics:
        digits = 3 if "dice" in m else 1
        table[m] = [f"{mean.loc[a, m]:.{digits}f} ({std.loc[a, m]:.{digits}f})" for a in table.index]
    seed_spread = None
    if len(plan.seeds) >= 2:
        seed_spread = pd.DataFrame(index=list(plan.ablation.arms))
        for m in metrics:
            digits = 4 if "dice" in m else 2
            seed_spread[m] = [f"{noise_floor(by_run.loc[a, m].unstack('seed').to_numpy()):.{digits}f}" for a in seed_spread.index]
    # Holm corrects across the three regions of one metric, as the paper's table reads.
    lesionwise = families[0] == "lesion_dice"
    comparison = pd.concat([_compare_runs(per_case, plan.ablation.baseline, [f"{m}_{r}" for r in regions], lesionwise)
                            for m in families], ignore_index=True)
    comparison.attrs.update(baseline=plan.ablation.baseline, confidence=0.95)
    # The description: each case's scores averaged over the seeds, paired over cases. Pairs need a
    # value on both sides: with lesion-wise metrics the cases undefined in any arm (for any region
    # of the metric) are left out of that metric's description; its n column counts the rest.
    cases = per_case.groupby(["arm", "case"], sort=False)[metrics].mean().reset_index()
    described = []
    for m in families:
        cols = [f"{m}_{r}" for r in regions]
        undefined = set(cases.loc[cases[cols].isna().any(axis=1), "case"])
        described.append(compare_arms(cases[~cases["case"].isin(undefined)], plan.ablation.baseline, cols))
    return Report(plan, per_case, table, comparison, seed_spread=seed_spread,
                  per_case_comparison=pd.concat(described, ignore_index=True))


def _compare_runs(per_case: pd.DataFrame, baseline: str, columns: list[str], lesionwise: bool) -> pd.DataFrame:
    """`compare_runs` on these columns; lesion-wise ones on the run means over their defined cases
    (`_defined_run_means`), with `n` still the number of distinct cases the arm was scored on."""
    from brats_lab.evaluation.stats import compare_runs

    if not lesionwise:
        return compare_runs(per_case, baseline, columns)
    result = compare_runs(_defined_run_means(per_case, columns), baseline, columns)
    defined = {(arm, col): int(part.loc[part[col].notna(), "case"].nunique()) for arm, part in per_case.groupby("arm") for col in columns}
    result["n"] = [defined[(r.arm, r.metric)] for r in result.itertuples(index=False)]
    return result


def _markdown(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [" | ".join(map(str, df.columns)), " | ".join("---" for _ in df.columns)]
    rows += [" | ".join(cell(v) for v in row) for row in df.itertuples(index=False)]
    return "\n".join(f"| {r} |" for r in rows)


def _phantom_truth(plan: Plan) -> str:
    """For phantoms: which removed cases really had corrupted labels (phantom.json knows)."""
    import json

    manifest = Path(plan.dataset) / "phantom.json"
    if not manifest.is_file():
        return ""
    corrupted = {c["id"] for c in json.loads(manifest.read_text())["cases"] if c.get("corrupted")}
    hits = sorted(set(plan.excluded) & corrupted)
    return f"\n  of which {len(hits)} had deliberately corrupted labels (the dataset has {len(corrupted)} such cases)"


def _safe(url: str) -> str:
    """A storage URL without its password (after the user name, or a `password=` parameter),
    for logs, messages and tags."""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    credentials, at, host = _split_credentials(rest)
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return scheme + sep + credentials + at + host


def _password(url: str) -> str:
    """The password written in a database URL ('' if none)."""
    credentials, at, _ = _split_credentials(_QUERY_PASSWORD.sub(r"\1", url).partition("://")[2])
    if at and ":" in credentials:
        return credentials.split(":", 1)[1]
    found = _QUERY_PASSWORD.search(url)
    return found.group(2) if found else ""


# A `password=` query parameter, masked first: its value may hold an '@' too.
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&]*)", flags=re.IGNORECASE)


def _split_credentials(rest: str) -> tuple[str, str, str]:
    """`user:password@host/db?query` -> (`user:password`, `@`, `host/db?query`). The credentials
    end at the last '@': a password may hold '?', '#', '/', ':', '%' and even a raw '@', none of
    which a host holds."""
    return rest.rpartition("@") if "@" in rest else ("", "", rest)


def _quote_at(url: str) -> str:
    """The URL with each raw '@' of its password written %40, as SQLAlchemy expects."""
    found = _QUERY_PASSWORD.search(url)
    head, tail = (url[: found.start()], url[found.start():]) if found else (url, "")
    scheme, sep, rest = head.partition("://")
    credentials, at, host = _split_credentials(rest)
    if not at or ":" not in credentials:
        return url
    user, password = credentials.split(":", 1)
    return f"{scheme}{sep}{user}:{password.replace('@', '%40')}@{host}{tail}"


# --- sizing a study before paying for it (`brats-lab ablate NAME --plan`) ------------------------

PLAN_SEEDS = (1, 2, 3, 5, 10)


def measured_noise(experiment: str, profile: str) -> tuple[dict[str, float], str]:
    """The noise floor per metric column (dice_WT, ...) measured by the newest finished study of
    `experiment` and `profile` with two or more seeds, pooled over its arms, and which study that
    was; ({}, "") when there is none."""
    import numpy as np

    from brats_lab import tracking

    for run in tracking.find_runs(experiment, {"kind": "study", "profile": profile}, statuses=("FINISHED",)):
        if int(run.params.get("seeds", "1")) < 2:
            continue
        local = run.artifact_dir()
        try:
            path = local / "comparison.csv" if local is not None else run.download_artifact("comparison.csv", Path("mlruns/downloads") / run.id)
            table = pd.read_csv(path)
        except Exception:  # a study stopped before its report: look further back
            continue
        if "noise_floor" not in table.columns:
            continue
        pooled = table.groupby("metric")["noise_floor"].apply(lambda v: float(np.sqrt(np.mean(np.square(v)))))
        pooled = {m: v for m, v in pooled.items() if np.isfinite(v)}
        if pooled:
            return pooled, f"study run {run.id} ({run.tags.get('study', run.name)}, {run.params.get('folds')} folds x {run.params.get('seeds')} seeds)"
    return {}, ""


def design_table(noise: float, arms: int, folds: list[int], seeds: tuple[int, ...] = PLAN_SEEDS) -> pd.DataFrame:
    """Minimum detectable effect at 80% power (alpha 0.05, before Holm) and the training runs the
    study costs (arms x folds x seeds), for each folds x seeds design, at this noise floor."""
    from brats_lab.evaluation.stats import minimum_detectable_effect

    table = pd.DataFrame(index=pd.Index(folds, name="folds"))
    for s in seeds:
        table[f"{s} seed{'s' if s > 1 else ''}"] = [
            f"{minimum_detectable_effect(noise, f, s):.4f} ({arms * f * s} runs)" if f > 1 else f"cannot tell ({arms * s} runs)"
            for f in folds]
    return table


def plan_text(plan: Plan, noise: float | None = None) -> str:
    """What `--plan` prints: the design table for the ablation's arms at the given noise floor, or
    at the one measured in the store (per metric); raises DataError when there is neither."""
    total = plan.ablation.arm_config(plan.ablation.baseline, plan.profile).data.folds
    folds = list(range(2, total + 1))
    arms = len(plan.ablation.arms)
    head = (f"Plan for {plan.ablation.name!r} ({arms} arms, profile {plan.profile}): the smallest true difference a study finds with "
            "80% power (alpha 0.05, before Holm; no arm-by-fold interaction assumed, so a lower bound), and the training runs it costs.")
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
