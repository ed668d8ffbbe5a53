"""Run an ablation as an Optuna study: one trial is one (arm, fold, seed), trained and validated by
the trainer, tracked in MLflow as study run -> arm runs (one per arm and seed) -> fold runs.

Seed k of an arm is the arm's config with `train.seed_index` = k: its own config hash, so it is
found, reused and resumed like any configuration. Each fold run trains with its own seed, drawn
from (the arm's `train.seed`, k, fold) (`TrainConfig.run_seed`): the folds, the verdict's
replicates, share no seed, and two arms with the same `train.seed` share each (k, fold)'s seed,
which makes their paired difference less noisy. Its arm run and fold runs carry the tags `arm` and
`seed` (k); the fold runs also carry `run_seed`, the seed they trained with (the params
`train.seed` and `train.seed_index` are the arm's and k). Seed 0 is the arm's config as written
(a plain `brats-lab train` of it trains the same runs). Runs seeded the old way (`train.seed` + k
in every fold) have no `train.seed_index` in their config hash, so they are never taken for these.

The launcher creates the MLflow study and arm runs and enqueues every (arm, fold, seed) not done yet as a
waiting Optuna trial; workers (this process, `--workers` local processes, or `brats-lab worker`
on other machines sharing the storage) claim waiting trials one at a time. Claiming is Optuna's
own atomic WAITING -> RUNNING transition, so no (arm, fold, seed) is trained twice; launchers
started at once share one study run (the oldest, `tracking.study_run`), and a cell two of them
enqueued is trained by its first live trial only (`_duplicate`). A launcher stopped (Ctrl-C,
SIGTERM) or failing ends its study run and arm runs KILLED or FAILED, unless other workers still
hold trials; the next launch reopens them. A worker records a
heartbeat while it trains; a trial whose worker died is failed by the next launcher or worker and
enqueued again, and its fold resumes from its last checkpoint where the worker taking it can read
that checkpoint (always with the embedded store; with an MLflow server serving artifacts, only on
the machine that wrote it); elsewhere the dead run is closed as FAILED and the fold is trained
again in a new run. A finished (arm, fold, seed) is found by config hash (which includes
`train.seed` and the seed index, so the same hash and fold is the same run seed) and fold in MLflow
and reused, so running the same command twice does no work twice.

The storage URL (and its password masking) is `ablation/storage.py`; gathering the finished runs
into Table 3, the verdict and the files of the study run is `ablation/report.py`.

Optuna (with SQLAlchemy), torch and the trainer are imported inside the functions that use them:
a plan, `--plan` or a report imports none of them (a few seconds of imports, DESIGN.md's lazy
heavy imports).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import pandas as pd

from brats_lab import DataError, run_files, tracking
from brats_lab.ablation.report import Report, data_hash, gather, report, run_per_case
from brats_lab.ablation.spec import Ablation, load_ablation, parse_ablation, refuse_shared_runs
from brats_lab.ablation.storage import DEFAULT_STORAGE, claim_lock, open_storage, safe_url  # noqa: F401 (DEFAULT_STORAGE: callers import it from here)
from brats_lab.config import config_hash, flatten
from brats_lab.evaluation.metrics import lower_is_better

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
    seeds: tuple[int, ...] = (0,)  # seed k trains with train.seed_index = k

    @functools.cached_property
    def study_name(self) -> str:
        # The grid's identity: the arms' config hashes (before any removal), the folds and the data
        # as it is now (its cache manifest hash: cases, content, preprocessing), so another
        # profile, dataset, content or fold count is another study - a study never mixes runs of
        # two datasets - and the same command finds its own again.
        hashes = ",".join(f"{a}:{config_hash(self._base_config(a))[:12]}" for a in self.ablation.arms)
        data = ",".join(sorted({data_hash(self._base_config(a))[:12] for a in self.ablation.arms}))
        seeds = f"|seeds={len(self.seeds)}" if self.seeds != (0,) else ""  # one seed: the name it had before seeds
        digest = hashlib.sha256(f"{hashes}|{self.folds}{seeds}|data={data}".encode()).hexdigest()[:10]
        return f"{self.ablation.name}-{self.profile}-{digest}"

    @property
    def experiment(self) -> str:
        return f"ablation-{self.ablation.name}"

    def _base_config(self, arm: str):
        return self.ablation.arm_config(arm, self.profile, [f"data.dataset={self.dataset}"])

    def config(self, arm: str, seed: int = 0):
        """The resolved config of `arm` trained with seed index `seed` (`train.seed_index`)."""
        extra = [f"data.dataset={self.dataset}"]
        removal = self.ablation.removal
        if removal is not None and arm == removal.arm:
            if not self.excluded:
                raise DataError(f"arm {arm!r} has no configuration before the baseline's pass decides what to remove")
            extra.append(f"data.exclude={json.dumps(list(self.excluded))}")  # a TOML array of strings
        cfg = self.ablation.arm_config(arm, self.profile, extra)
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed_index=seed))

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
    n = ablation.seed_count(profile) if seeds is None else seeds  # --seeds 0 is refused, not the default
    if n < 1:
        raise DataError(f"--seeds must be at least 1, got {n}")
    refuse_shared_runs(ablation, profile, k, n)  # loading checked the TOML's counts; --folds and --seeds may differ
    return Plan(ablation, profile, tuple(range(k)), str(dataset), storage, seeds=tuple(range(n)))


def _storage(url: str, create: bool = True):
    """The study's Optuna storage, with this module's heartbeat and grace period (read when called,
    so the tests can shorten them)."""
    return open_storage(url, HEARTBEAT_SECONDS, GRACE_SECONDS, create)


def launch(plan: Plan):
    """Create (or find) the study, its MLflow runs and the waiting trials; return the study run."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Both stores open before any run changes state: a relaunch with a storage that cannot be
    # opened must leave finished runs FINISHED.
    store = _storage(plan.storage)
    study_run, created = tracking.study_run(plan.experiment, plan.study_name, plan.ablation.name,
                                            {"storage": safe_url(plan.storage), "profile": plan.profile})
    if created:
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
    pending = {_cell(t) for t in study.get_trials(deepcopy=False, states=_live_states())}
    for arm, fold, seed in plan.cells():
        if (arm, fold, seed) not in pending:
            # Two launchers at once may both enqueue a cell; a worker drops the later trial (`_duplicate`).
            study.enqueue_trial({}, user_attrs={"arm": arm, "fold": fold, "seed": seed})
    return study_run


def _cell(trial) -> tuple:
    return trial.user_attrs.get("arm"), trial.user_attrs.get("fold"), trial.user_attrs.get("seed", 0)


def _duplicate(study, trial) -> bool:
    """Whether another live trial of the same (arm, fold, seed) came first: the one with the lowest
    number of those waiting, running or complete does the cell's work, so two launchers that
    enqueued the same cell at once never train it twice (nor take each other's run for a dead one)."""
    cell = _cell(trial)
    return any(t.number < trial.number and _cell(t) == cell for t in study.get_trials(deepcopy=False, states=_live_states()))


def _live_states():
    from optuna.trial import TrialState

    return (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)


def _arm_run(plan: Plan, study_run, arm: str, seed: int):
    """The arm run of (arm, seed) under the study run, tagged with both (fold runs copy `seed`)."""
    cfg = plan.config(arm, seed)
    name = arm if seed == 0 else f"{arm} seed {seed}"
    run = tracking.arm_run(plan.experiment, config_hash(cfg), name, flatten(cfg), parent=study_run)
    if run.tags.get("arm") != arm or run.tags.get("seed") != str(seed):
        run.set_tags({"arm": arm, "seed": seed})
    return run


def work(study_name: str, storage: str, progress: bool = True, release: bool = False, tags: dict[str, str] | None = None) -> int:
    """Claim and run waiting trials until none is left; returns how many this worker ran.

    `release`: a worker stopped (SIGTERM, Ctrl-C, a scheduler's preemption signal: any
    KeyboardInterrupt) puts its (arm, fold, seed) back in the queue, a new waiting trial, so the
    workers still running take it at once and resume its fold from the checkpoint; otherwise the
    trial fails and waits for the next launch. `tags` go on each trial (user attributes) and its
    fold run: where this worker runs and logs (a SLURM job)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from sqlalchemy.exc import SQLAlchemyError

    store = _storage(storage, create=False)
    try:
        study = optuna.load_study(study_name=study_name, storage=store)
    except (KeyError, SQLAlchemyError):  # no such study, or no Optuna tables at all
        raise DataError(f"no study {study_name!r} in {safe_url(storage)}; start it with `brats-lab ablate`") from None
    attrs = study.user_attrs
    plan = Plan(parse_ablation(attrs["ablation_toml"], attrs["ablation"]), attrs["profile"], tuple(attrs["folds"]), attrs["dataset"], storage,
                tuple(attrs.get("excluded", ())), tuple(attrs.get("seeds", (0,))))
    parent = tracking.get_run(attrs["mlflow_study_run"])
    done = 0
    while True:
        _fail_stale(study)
        trial = _claim(study, store, storage)
        if trial is None:
            return done
        if _duplicate(study, trial):
            store.set_trial_state_values(trial._trial_id, state=TrialState.PRUNED)  # done by the first, not here
            continue
        arm, fold, seed = trial.user_attrs["arm"], trial.user_attrs["fold"], trial.user_attrs.get("seed", 0)
        for key, value in (tags or {}).items():
            store.set_trial_user_attr(trial._trial_id, key, value)
        beat = _Heartbeat(store, trial._trial_id)
        try:
            table = run_cell(plan, parent, arm, fold, progress, seed, tags)
        except BaseException as e:
            beat.stop()
            store.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            if release and isinstance(e, KeyboardInterrupt):
                study.enqueue_trial({}, user_attrs={"arm": arm, "fold": fold, "seed": seed})
            raise
        beat.stop()
        try:
            store.set_trial_state_values(trial._trial_id, state=TrialState.COMPLETE, values=[float(table["dice_WT"].mean())])
        except optuna.exceptions.UpdateFinishedTrialError:
            # Failed as stale while this worker was silent (a machine too loaded to send its
            # heartbeat) and queued again: the fold run is in MLflow, where the retry finds it.
            print(f"brats-lab: trial {trial.number} ({arm}, fold {fold}, seed {seed}) was marked failed while it ran; "
                  "its fold run stays in MLflow for the retry to find", file=sys.stderr)
            continue
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
    import optuna

    with warnings.catch_warnings():  # "experimental" since Optuna 2.9, and what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _claim(study, store, storage: str):
    """A waiting trial, now RUNNING and ours, or None. Optuna refuses the WAITING -> RUNNING
    transition to all but one of several workers asking for the same trial, on SQLite only under
    `claim_lock` (without it, two launchers started at once both trained trial 0)."""
    from optuna.trial import TrialState

    with claim_lock(storage):
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


def run_cell(plan: Plan, study_run, arm: str, fold: int, progress: bool, seed: int,
             tags: dict[str, str] | None = None) -> pd.DataFrame:
    """The per-case metrics of (arm, fold, seed): reused if a finished run exists, resumed if an
    unfinished one has a checkpoint this machine can read, trained afresh otherwise (`tags` on
    the fold run)."""
    from brats_lab.training.checkpoint import checkpoint_path
    from brats_lab.training.trainer import train_fold

    cfg = plan.config(arm, seed)
    chash, data = config_hash(cfg), data_hash(cfg)
    finished = tracking.latest_fold_run(plan.experiment, chash, fold, statuses=("FINISHED",), manifest_hash=data)
    if finished is not None:
        return run_per_case(finished)
    unfinished = tracking.latest_fold_run(plan.experiment, chash, fold, statuses=("RUNNING", "FAILED", "KILLED"), manifest_hash=data)
    resume = unfinished is not None and checkpoint_path(unfinished).is_file()
    if unfinished is not None and not resume and unfinished.status == "RUNNING":
        # This worker holds the trial, so the run's own worker is dead; its checkpoint, if any,
        # is on the machine that trained it (a remote artifact store keeps checkpoints local).
        # Close the dead run, so none is left RUNNING, and train the fold in a new one.
        unfinished.set_tags({"abandoned": f"its worker died; {socket.gethostname()} found no checkpoint at "
                                          f"{checkpoint_path(unfinished)} and trained the fold again in a new run"})
        unfinished.finish("FAILED")
    arm_run = _arm_run(plan, study_run, arm, seed)
    return train_fold(cfg, fold, resume=resume, experiment=plan.experiment, parent=arm_run, progress=progress, tags=tags).per_case  # type: ignore[union-attr]


def default_workers(plan: Plan) -> int:
    """With the cpu profile, one worker per core (at most one per trial), each on one thread: the
    small 3D convolutions of a CPU run leave much of a second thread idle, two runs side by side do
    not (benchmarks/bench_cpu_workers.py); else one."""
    import torch

    if plan.profile != "cpu" or torch.cuda.is_available():
        return 1
    return max(1, min(os.cpu_count() or 1, len(plan.ablation.arms) * len(plan.folds) * len(plan.seeds)))


def run_study(plan: Plan, workers: int = 1, progress: bool = True) -> "Report":
    """Launch, work (with `workers` processes on this machine), wait for the trials that other
    workers still run, and report."""
    study_run = launch(plan)
    try:
        return _run_launched(plan, study_run, workers, progress)
    except BaseException as e:
        # Stopped (Ctrl-C, SIGTERM) or failed after the runs were opened: the fold runs are KILLED
        # or FAILED by the trainer; the study run and its arm runs end the same way, unless other
        # workers still hold trials (their folds go on, and the next launcher reports).
        _close_runs(plan, study_run, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def _close_runs(plan: Plan, study_run, status: str) -> None:
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=plan.study_name, storage=_storage(plan.storage, create=False))
        _fail_stale(study)
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        for arm_run in tracking.find_runs(plan.experiment, {"kind": "arm", "mlflow.parentRunId": study_run.id}, statuses=("RUNNING",)):
            arm_run.finish(status)  # type: ignore[arg-type]
        study_run.finish(status)
    except Exception as e:  # the stores themselves failing: say so, and let the first error speak
        print(f"brats-lab: warning: could not mark the study run {study_run.id} {status}: {e}", file=sys.stderr)


def _run_launched(plan: Plan, study_run, workers: int, progress: bool) -> "Report":
    import torch

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
        study_run.log_text("\n".join(plan.excluded) + "\n", run_files.REMOVED_CASES)
        launch(plan)
        _work_until_done(plan.study_name, plan.storage, progress)
    return conclude(plan, study_run, progress)


def conclude(plan: Plan, study_run, progress: bool = True) -> "Report":
    """The report of a study whose trials are done (and its search, if any), logged to the study
    run; the study and arm runs finished."""
    result = report(plan)
    if plan.ablation.search is not None:
        result.search = search(plan, study_run, progress)
    result.log(study_run)
    for arm_run in tracking.find_runs(plan.experiment, {"kind": "arm", "mlflow.parentRunId": study_run.id}):
        arm_run.finish("FINISHED")
    study_run.finish("FINISHED")
    return result


def report_when_done(plan: Plan) -> "Report":
    """`brats-lab ablate NAME --report`: the report of a study whose runs are all done (concluded
    now if no launcher has yet), or a DataError saying how far it is."""
    counts, attrs = progress_of(plan)
    total = sum(counts.values())
    if counts["done"] < total:
        jobs = attrs.get("slurm_jobs", [])
        raise DataError(f"study {plan.study_name} is not done: {counts['done']} of {total} runs done, {counts['running']} running, "
                        f"{counts['waiting']} waiting" + (f", {counts['not queued']} not queued (rerun the command without --report)"
                                                          if counts["not queued"] else "")
                        + (f"; its SLURM jobs: {', '.join(jobs)} (squeue -j {','.join(jobs)})" if jobs else ""))
    study_run = tracking.get_run(attrs["mlflow_study_run"])
    return report(plan) if study_run.status == "FINISHED" else conclude(plan, study_run, progress=False)


def load(plan: Plan):
    """The plan's Optuna study, which must exist (a DataError says how to start it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return optuna.load_study(study_name=plan.study_name, storage=_storage(plan.storage, create=False))
    except (KeyError, SQLAlchemyError):
        raise DataError(f"no study {plan.study_name} in {safe_url(plan.storage)} yet: start it with `brats-lab ablate` "
                        "(the same arguments, without --report)") from None


def progress_of(plan: Plan, study=None) -> tuple[dict[str, int], dict]:
    """(how many of the plan's (arm, fold, seed) are done, running, waiting and not queued; the
    study's user attributes), read from the Optuna storage (`study`, if given) without changing it."""
    from optuna.trial import TrialState

    study = study or load(plan)
    state: dict[tuple[Any, ...], TrialState] = {}
    rank: dict[TrialState | None, int] = {TrialState.COMPLETE: 3, TrialState.RUNNING: 2, TrialState.WAITING: 1}
    for t in study.get_trials(deepcopy=False):
        cell = (t.user_attrs.get("arm"), t.user_attrs.get("fold"), t.user_attrs.get("seed", 0))
        if rank.get(t.state, 0) > rank.get(state.get(cell), 0):
            state[cell] = t.state
    names: dict[TrialState | None, str] = {TrialState.COMPLETE: "done", TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    counts = {"done": 0, "running": 0, "waiting": 0, "not queued": 0}
    for cell in plan.cells():
        counts[names.get(state.get(cell), "not queued")] += 1
    return counts, study.user_attrs


def search(plan: Plan, study_run, progress: bool = True) -> pd.DataFrame:
    """The ablation's hyperparameter search: a TPE study over `search.params` around the baseline
    arm; each trial trains the folds of one sampled configuration (reused by config hash). Returns
    one row per trial, best first."""
    import optuna

    spec = plan.ablation.search
    assert spec is not None
    sampler = optuna.samplers.TPESampler(seed=spec.seed)
    lower = lower_is_better(spec.metric)
    study = optuna.create_study(study_name=f"{plan.study_name}-search", storage=_storage(plan.storage),
                                sampler=sampler, direction="minimize" if lower else "maximize", load_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        values = {k: trial.suggest_float(k, low, high, log=log) for k, (low, high, log) in spec.params.items()}
        cfg = plan.ablation.arm_config(plan.ablation.baseline, plan.profile,
                                       [f"data.dataset={plan.dataset}", *(f"{k}={v!r}" for k, v in values.items())])
        name = "search " + ", ".join(f"{k}={v:.3g}" for k, v in values.items())
        arm_run = tracking.arm_run(plan.experiment, config_hash(cfg), name, flatten(cfg), parent=study_run)
        scores = []
        for fold in plan.folds:
            finished = tracking.latest_fold_run(plan.experiment, config_hash(cfg), fold, statuses=("FINISHED",),
                                                manifest_hash=data_hash(cfg))
            table = run_per_case(finished) if finished is not None else train_fold(  # type: ignore[union-attr]
                cfg, fold, experiment=plan.experiment, parent=arm_run, progress=progress).per_case
            scores.append(float(table[spec.metric].mean()))
        return sum(scores) / len(scores)

    from brats_lab.training.trainer import train_fold

    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if done < spec.trials:
        study.optimize(objective, n_trials=spec.trials - done)
    rows = [{**t.params, f"mean_{spec.metric}": t.value} for t in study.trials if t.value is not None]
    return pd.DataFrame(rows).sort_values(f"mean_{spec.metric}", ascending=lower, ignore_index=True)


def choose_removed(plan: Plan) -> tuple[str, ...]:
    """The baseline's worst `fraction` of cases (at least one) by their out-of-fold `metric`,
    averaged over seeds, in the metric's direction: the lowest Dice, the highest HD95. Ties are
    broken by case id, the smaller removed first; a case whose score is undefined (NaN: a
    lesion-wise region absent from both maps) is never removed. Returned sorted by case id."""
    removal = plan.ablation.removal
    assert removal is not None
    table = gather(plan, [plan.ablation.baseline])
    if removal.metric not in table.columns:
        raise DataError(f"removal.metric {removal.metric!r}: the baseline's per-case tables have no such column "
                        f"(they have {', '.join(c for c in table.columns if c not in ('arm', 'fold', 'seed', 'case'))})")
    scores = table.groupby("case")[removal.metric].mean()
    worse = -1 if lower_is_better(removal.metric) else 1  # sort key: worst first
    ranked = sorted(scores.dropna().index, key=lambda case: (worse * scores[case], case))
    count = max(1, round(removal.fraction * len(scores)))
    return tuple(sorted(ranked[:count]))


# --- sizing a study before paying for it (`brats-lab ablate NAME --plan`) ------------------------


