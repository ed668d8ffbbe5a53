"""A study's workers as one SLURM job array (`brats-lab ablate NAME --slurm`), submitted with
submitit: each array task is a `brats-lab worker` on the study, with the launcher's environment
(MLFLOW_TRACKING_URI, the Optuna storage, the checkout and its Python), in the launcher's folder.

Settings, each layer over the one before: the profile's `[slurm]` table, the ablation's `[slurm]`
table, then `--slurm-set KEY=VALUE` on the command line:

    partition, account          where the jobs run and who pays
    workers                     array tasks (workers running at once); default 1
    gpus_per_worker             --gpus-per-node of each task; default 0
    cpus_per_worker             --cpus-per-task; default 1 (OMP_NUM_THREADS unless set)
    mem                         --mem of each task, e.g. "32G"
    time                        --time of each task: minutes, or [D-]HH:MM[:SS]; default 1:00:00
    signal_delay                seconds before the time limit that SLURM signals the task; default 120
    [slurm.sbatch]              any other sbatch option by its long name: qos = "high", exclusive = true

Every key and every sbatch option is checked before anything is created or submitted: a key we do
not know, an option the installed `sbatch --help` does not list, or one that brats-lab sets itself
(array, output, signal, ...) is refused by name.

Preemption and time limits. The array is submitted with `--requeue` and `--signal=USR2@delay`
(SLURM sends USR2 `delay` seconds before the time limit; with `PreemptParameters=send_user_signal`
also on preemption). A task that gets USR2 stops its fold (the fold run KILLED, its checkpoint of
the last finished epoch kept), puts its (arm, fold, seed) back in the queue, then requeues itself
with `scontrol requeue`; on SIGTERM (`scancel`, a preemption without the user signal) it does the
same but does not requeue. The next worker to take the trial resumes the fold from that
checkpoint: workers share the launcher's folder (`mlruns/checkpoints/`), so it must be on a file
system every node mounts. A worker killed outright (SIGKILL) is found by its silent heartbeat, as
on any machine. We handle the signal ourselves rather than through submitit's checkpointing,
which requeues first and then exits from inside the signal handler: the trial must be released
before SLURM starts killing the task.

Each task records its job id and log file on every trial it takes (user attributes `slurm_job`,
`slurm_log`) and on the fold run (tags of the same names): where to look when a fold failed.

submitit and torch are imported where a job is submitted or run: reading an ablation file checks
its `[slurm]` table with this module, and needs neither.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from brats_lab import DataError
from brats_lab.config import EXPERIMENTS_DIR, profile_path

KEYS = ("partition", "account", "workers", "gpus_per_worker", "cpus_per_worker", "mem", "time", "signal_delay", "sbatch")
# sbatch options brats-lab sets itself, or that a key above sets: refused in [slurm.sbatch].
_MANAGED = {
    "array": "brats-lab submits one array of `workers` tasks", "output": "brats-lab writes each task's log in the job folder",
    "error": "brats-lab writes each task's log in the job folder", "open-mode": "logs are appended across requeues",
    "signal": "use signal_delay", "requeue": "brats-lab requeues preempted tasks itself", "no-requeue": "preempted tasks must requeue",
    "wrap": "each task runs `brats-lab worker`", "parsable": "brats-lab reads the job id itself", "job-name": "the job is named after the study",
    "chdir": "workers run in the launcher's folder, where the checkpoints are", "partition": "use partition", "account": "use account",
    "time": "use time", "mem": "use mem", "cpus-per-task": "use cpus_per_worker", "gpus-per-node": "use gpus_per_worker",
    "nodes": "one worker is one task on one node", "ntasks": "one worker is one task on one node",
    "ntasks-per-node": "one worker is one task on one node",
}
PREEMPT_SIGNAL = signal.SIGUSR2  # submitit's default (NCCL may catch USR1)
MAX_RESTARTS = 20  # a task requeued this often stops requeueing (an epoch longer than the time limit?)


@dataclass(frozen=True)
class SlurmSettings:
    partition: str | None = None
    account: str | None = None
    workers: int = 1
    gpus_per_worker: int = 0
    cpus_per_worker: int = 1
    mem: str | None = None
    time: str = "1:00:00"
    signal_delay: int = 120
    sbatch: tuple[tuple[str, Any], ...] = ()

    @property
    def minutes(self) -> int:
        return time_minutes(self.time)


def check_table(table: Any, source: str) -> None:
    """Refuse a `[slurm]` table with an unknown key or a value of the wrong kind, naming it."""
    settings(({source: table}))


def settings(layers: dict[str, Any]) -> SlurmSettings:
    """The settings of `layers` (source -> [slurm] table), each over the ones before."""
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for source, table in layers.items():
        if not isinstance(table, dict):
            raise DataError(f"{source}: slurm must be a table ([slurm]), got {table!r}")
        for key, value in table.items():
            where = f"{source}: slurm.{key}"
            if key not in KEYS:
                close = difflib.get_close_matches(key, KEYS, n=1)
                raise DataError(f"{source}: unknown key 'slurm.{key}'" + (f"; did you mean 'slurm.{close[0]}'?" if close else "")
                                + f" (allowed: {', '.join(KEYS)}; other sbatch options go in [slurm.sbatch])")
            if key == "sbatch":
                if not isinstance(value, dict):
                    raise DataError(f"{where} must be a table of sbatch options ([slurm.sbatch] qos = \"high\"), got {value!r}")
                for option, v in value.items():
                    extra[_option(option, v, source)] = v
                continue
            values[key] = _value(key, value, where)
    return SlurmSettings(**values, sbatch=tuple(sorted(extra.items())))


def override(item: str) -> dict[str, Any]:
    """`--slurm-set KEY=VALUE` as a one-key table: `partition=gpu`, `sbatch.qos=high`; the value a
    TOML literal where it is one (`workers=4`, `sbatch.exclusive=true`), a string otherwise."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise DataError(f"--slurm-set {item!r}: expected KEY=VALUE, e.g. --slurm-set partition=gpu")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    key = key.strip()
    if key.startswith("sbatch."):
        return {"sbatch": {key.removeprefix("sbatch."): value}}
    return {key: value}


def _value(key: str, value: Any, where: str) -> Any:
    if key in ("partition", "account", "mem"):
        if not isinstance(value, str) or not value:
            raise DataError(f"{where} must be a non-empty string, got {value!r}")
        if key == "mem" and not re.fullmatch(r"\d+[KMGT]?", value):
            raise DataError(f"{where} must be a size such as \"32G\" or \"500M\" (sbatch --mem), got {value!r}")
        return value
    if key == "time":
        time_minutes(value, where)
        return str(value)
    least = {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1, "signal_delay": 1}[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise DataError(f"{where} must be an integer >= {least}, got {value!r}")
    return value


def time_minutes(value: Any, where: str = "slurm.time") -> int:
    """SLURM's --time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, at least 1."""
    text = str(value)
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if isinstance(value, bool) or match is None:
        raise DataError(f"{where} must be minutes or [D-]HH:MM[:SS] as sbatch --time reads it, got {value!r}")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)  # type: ignore[operator]
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c  # type: ignore[operator]
    elif b is not None:  # MM:SS
        seconds = a * 60 + b  # type: ignore[operator]
    else:  # minutes
        seconds = a * 60  # type: ignore[operator]
    if seconds < 60:
        raise DataError(f"{where} must be at least one minute, got {value!r}")
    return -(-seconds // 60)


def _option(option: str, value: Any, source: str) -> str:
    name = str(option).removeprefix("--")
    if name in _MANAGED:
        raise DataError(f"{source}: slurm.sbatch.{name} cannot be set: {_MANAGED[name]}")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise DataError(f"{source}: slurm.sbatch.{option!r} is not an sbatch option name (long form without dashes, e.g. qos)")
    if not (isinstance(value, (str, int)) and not isinstance(value, bool)) and value is not True:
        raise DataError(f"{source}: slurm.sbatch.{name} must be a string, an integer or true, got {value!r}")
    return name


def sbatch_options() -> set[str]:
    """The long options the installed `sbatch` knows (from its --help)."""
    if shutil.which("sbatch") is None:
        raise DataError("--slurm needs SLURM's commands (sbatch, squeue, scontrol) on this machine: no sbatch on PATH")
    proc = subprocess.run(["sbatch", "--help"], capture_output=True, text=True, timeout=60)
    options = set(re.findall(r"^\s+(?:-\w, )?--([a-z][a-z0-9-]*)", proc.stdout, re.MULTILINE))
    if proc.returncode != 0 or not options:
        raise DataError(f"`sbatch --help` failed ({(proc.stderr or proc.stdout).strip()[:300]}); is this a SLURM login node?")
    return options


def check_options(s: SlurmSettings) -> None:
    """Every extra sbatch option is one the installed sbatch knows: refused before anything is submitted."""
    known = sbatch_options()
    for name, _ in s.sbatch:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            raise DataError(f"slurm.sbatch.{name}: `sbatch --help` lists no option --{name}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))


def job_folder(study_name: str) -> Path:
    """Where the tasks' logs and submitit's files go: `slurm/<study>/` in the launcher's folder."""
    return Path.cwd() / "slurm" / study_name


def submit(study_name: str, storage: str, s: SlurmSettings, tasks: int) -> tuple[str, list[Path]]:
    """Submit `tasks` workers (an array; one task is a plain job) on the study; returns (the job
    id, each task's log file)."""
    import submitit

    folder = job_folder(study_name)
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder)
    extra = {"requeue": True, **dict(s.sbatch)}
    params: dict[str, Any] = dict(job_name=study_name, time=s.minutes, cpus_per_task=s.cpus_per_worker, signal_delay_s=s.signal_delay,
                                  array_parallelism=tasks, additional_parameters=extra, wckey=None)  # no submitit wckey
    if s.gpus_per_worker:
        params["gpus_per_node"] = s.gpus_per_worker
    for key in ("partition", "account", "mem"):
        if getattr(s, key) is not None:
            params[key] = getattr(s, key)
    executor.update_parameters(**params)
    from submitit.core.utils import FailedJobError

    try:
        jobs = executor.map_array(ArrayTask(study_name, storage), list(range(tasks)))
    except FailedJobError as e:  # sbatch refused (a partition, account or limit): its own words
        raise DataError(f"sbatch refused the workers' job: {' '.join(str(e).split())}") from None
    return jobs[0].job_id.partition("_")[0], [job.paths.stderr for job in jobs]


def live_tasks(job_ids: list[str]) -> dict[str, str]:
    """Array task id (`12_0`) -> state, for the tasks of these jobs that are pending, running or
    requeued (squeue: it needs no accounting database)."""
    if not job_ids:
        return {}
    proc = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return {}  # gone from slurmctld's memory: long finished
        raise DataError(f"squeue failed: {proc.stderr.strip()[:300]}")
    tasks = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines() if line.strip())
    return {task: state for task, state in tasks.items() if state not in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT")}


class _Preempted(KeyboardInterrupt):
    """USR2 from SLURM: the time limit is near, or the job is preempted."""


class _Cancelled(KeyboardInterrupt):
    """SIGTERM: scancel, or the end of the job."""


@dataclass(frozen=True)
class ArrayTask:
    """One array task: `brats-lab worker` on the study until no trial waits, then exit. Pickled by
    submitit and called on the node."""

    study: str
    storage: str

    def __call__(self, index: int) -> str:
        import submitit

        env = submitit.JobEnvironment()
        job_id, log = env.job_id, env.paths.stderr  # `12_1` in an array, `13` alone (a one-task array is a plain job)
        if "OMP_NUM_THREADS" not in os.environ and os.environ.get("SLURM_CPUS_PER_TASK"):
            import torch

            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))

        def stop(signum, frame):
            if isinstance(sys.exc_info()[1], KeyboardInterrupt):
                return  # already stopping: let the clean-up finish
            raise (_Preempted if signum == PREEMPT_SIGNAL else _Cancelled)()

        signal.signal(PREEMPT_SIGNAL, stop)
        signal.signal(signal.SIGTERM, stop)
        from brats_lab.ablation.study import work  # here: study imports spec, which imports this module

        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        print(f"worker: SLURM task {job_id} (restart {restarts}) on {os.uname().nodename}, study {self.study}", file=sys.stderr, flush=True)
        try:
            done = work(self.study, self.storage, progress=False, release=True, tags={"slurm_job": job_id, "slurm_log": str(log)})
        except _Preempted:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue's own SIGTERM: we are on our way out
            if restarts >= MAX_RESTARTS:
                print(f"worker: preempted; trial released; not requeued: {restarts} restarts already", file=sys.stderr, flush=True)
                return "preempted"
            print(f"worker: preempted; trial released; requeueing {job_id}", file=sys.stderr, flush=True)
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
            return "requeued"
        except _Cancelled:
            print("worker: terminated (SIGTERM); trial released", file=sys.stderr, flush=True)
            return "cancelled"
        print(f"worker: ran {done} trials of {self.study}; none left", file=sys.stderr, flush=True)
        return f"ran {done}"


def overrides_layer(items: list[str]) -> dict[str, Any]:
    """`--slurm-set` items as one table (sbatch options merged)."""
    table: dict[str, Any] = {}
    for item in items:
        for key, value in override(item).items():
            if key == "sbatch":
                table.setdefault("sbatch", {}).update(value)
            else:
                table[key] = value
    return table


def profile_table(profile: str) -> dict[str, Any]:
    """The `[slurm]` table of a profile (a name in experiments/profiles/, or a TOML path), or {}."""
    path = profile_path(profile, EXPERIMENTS_DIR)
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text()).get("slurm", {})
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"{path} is not valid TOML: {e}") from None


def describe(s: SlurmSettings) -> str:
    parts = [f"{s.workers} worker{'s' if s.workers > 1 else ''}", f"{s.cpus_per_worker} CPU{'s' if s.cpus_per_worker > 1 else ''}"]
    if s.gpus_per_worker:
        parts.append(f"{s.gpus_per_worker} GPU{'s' if s.gpus_per_worker > 1 else ''}")
    parts += [f"{k} {getattr(s, k)}" for k in ("mem", "partition", "account") if getattr(s, k)]
    parts.append(f"time {s.time}")
    parts += [f"--{k}" + ("" if v is True else f"={v}") for k, v in s.sbatch]
    return ", ".join(parts)




# --- the launcher: `brats-lab ablate NAME --slurm` ---------------------------------------------

def run_on_slurm(plan, s: SlurmSettings, detach: bool = False, say=print):
    """Create (or find) the study and keep `workers` array tasks on it: submit an array unless
    enough tasks of the study's arrays are still queued or running, and top it up when some ended
    early (cancelled, failed, killed) while trials wait. Then (unless `detach`) wait for the trials
    and return the report (None when detached). Stale trials of dead tasks go back in the queue
    after their grace period, as anywhere."""
    from brats_lab.ablation import study as study_module  # here: study imports spec, which imports this module

    if plan.ablation.removal is not None or plan.ablation.search is not None:
        raise DataError(f"--slurm does not run ablations with a [removal] or [search] table yet ({plan.ablation.source}); "
                        "run them on one machine, or with `brats-lab worker` by hand")
    check_options(s)  # refused before anything is created or submitted
    study_run = study_module.launch(plan)
    study = study_module.load(plan)  # one connection pool for the whole wait
    submitted, most = 0, max(4, 2 * s.workers)  # tasks that keep dying: give up, say where to look
    last = None
    while True:
        counts, attrs = study_module.progress_of(plan, study)
        total = sum(counts.values())
        if counts["done"] == total:
            break
        jobs = list(attrs.get("slurm_jobs", []))
        alive = live_tasks(jobs)
        if not alive and last is not None:  # no task left and runs not done: stale trials (past their
            study_run = study_module.launch(plan)  # grace period) and failed cells go back in the queue
            counts, attrs = study_module.progress_of(plan, study)
        short = min(s.workers, counts["waiting"] + counts["running"]) - len(alive)
        if short > 0 and counts["waiting"]:
            if submitted >= most:
                raise DataError(f"{submitted} array tasks submitted and {total - counts['done']} of {total} runs still not done; "
                                f"see the tasks' logs in {job_folder(plan.study_name)}/ and rerun the command")
            job, logs = submit(plan.study_name, plan.storage, s, short)
            submitted += short
            jobs.append(job)
            study.set_user_attr("slurm_jobs", jobs)  # the same command again finds it, submits no other
            alive = live_tasks(jobs)
            say(f"submitted SLURM job array {job} for study {plan.study_name}: {describe(replace(s, workers=short))}")
            say(f"  follow it: squeue -j {job}; the log of each task: {', '.join(map(str, logs))}")
        elif last is None and alive:
            say(f"study {plan.study_name}: SLURM job{'s' if len(jobs) > 1 else ''} {', '.join(jobs)} still at work "
                f"({', '.join(f'{t} {st}' for t, st in sorted(alive.items()))}); not submitting another")
        elif last is None and not alive:
            say(f"study {plan.study_name}: {counts['running']} runs held by workers that stopped answering; "
                f"they go back in the queue after their grace period ({study_module.GRACE_SECONDS} s)")
        if detach:
            say(f"{counts['done']} of {total} runs done. Detached: rerun this command without --detach to wait for the report, "
                "or with --report to print it once the runs are done")
            return None
        line = f"{counts['done']} of {total} runs done, {counts['running']} running, {counts['waiting']} waiting; tasks " + (
            ", ".join(f"{t} {st}" for t, st in sorted(alive.items())) or "none")
        if line != last:
            say(line)
            last = line
        time.sleep(max(1, min(study_module.HEARTBEAT_SECONDS, 10)))
    return study_module.conclude(plan, study_run, progress=False)

