"""Experiment tracking in MLflow: the store, the study -> arm -> fold run hierarchy, logging, reading back.

This is the only module that imports mlflow, and it does so inside functions, so importing it (for
the `Run` type, say) costs nothing until a run is touched.

Store. By default everything lives under `mlruns/` in the project root (the current folder):

    mlruns/mlflow.db                       MLflow metadata (SQLite; not the deprecated file store)
    mlruns/artifacts/<experiment>/<run id>/artifacts/...

`MLFLOW_TRACKING_URI` overrides it: another SQLite file (its artifacts go to `artifacts/` beside
it), or an `http://` tracking server backed by PostgreSQL when several machines share the work.

Hierarchy (DESIGN.md, "Run hierarchy in MLflow"): every run has a `kind` tag, "study", "arm" or
"fold", and points at its parent with the `mlflow.parentRunId` tag, so the MLflow UI nests them.
An arm is identified by the content hash of its resolved config (`config_hash` tag); a fold run
carries the arm's hash and its `fold`, so a retried piece of work finds what was already done.

Every call goes through `MlflowClient` with an explicit run id, never the fluent
`mlflow.start_run` and its global "active run": several runs can be open in one process, and
worker processes stay independent.

The MLflow UI on this store (`brats-lab ui`) is `brats_lab/mlflow_ui.py`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import getpass
import json
import logging
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, runtime_checkable
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from brats_lab.files import file_lock, write_error

if TYPE_CHECKING:  # annotations only: mlflow and pandas are imported when a function needs them
    import pandas as pd
    from mlflow import MlflowClient

KINDS: tuple[str, ...] = ("study", "arm", "fold")
FINAL_STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")
STORE_DIR = "mlruns"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
# The package's own checkout: the code that ran, whose commit every run records.
_CODE_ROOT = Path(__file__).resolve().parents[1]
_PARENT_TAG = "mlflow.parentRunId"
_NAME_TAG = "mlflow.runName"
_GIT_COMMIT_TAG = "mlflow.source.git.commit"


class TrackingError(RuntimeError):
    """A tracking operation that cannot be done as asked; the message names the run and the key."""


# --- the store -------------------------------------------------------------------------------


def tracking_uri(root: Path | str | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `sqlite:///<root>/mlruns/mlflow.db` (root: current folder)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    db = (Path(root) if root is not None else Path.cwd()).resolve() / STORE_DIR / DB_NAME
    return "sqlite:///" + db.as_posix()  # an absolute posix path gives sqlite://// (four slashes)


def artifact_root(root: Path | str | None = None) -> Path | None:
    """The local folder new experiments keep their artifacts in: `artifacts/` beside the SQLite
    file (`mlruns/artifacts/` by default). None for other stores (a tracking server decides)."""
    db = _sqlite_path(tracking_uri(root))
    return None if db is None else db.parent / ARTIFACTS_DIR


def client(root: Path | str | None = None) -> MlflowClient:
    """An `MlflowClient` on the project's store (see `tracking_uri`), the store made ready on first use."""
    mlflow = _import_mlflow()
    uri = tracking_uri(root)
    if _sqlite_path(uri) is not None:
        _prepare_sqlite(uri)
    return mlflow.MlflowClient(tracking_uri=uri)  # type: ignore[no-any-return]  # mlflow's own annotation is lost in functools.cache


def get_or_create_experiment(name: str, root: Path | str | None = None) -> str:
    """The id of the active experiment `name`, created if there is none.

    Safe when several processes create it at once: the loser of the race gets MLflow's
    RESOURCE_ALREADY_EXISTS and reads the winner's experiment.
    """
    return _experiment_id(client(root), name, create=True)  # type: ignore[return-value]


# --- runs ------------------------------------------------------------------------------------


@runtime_checkable
class RunLog(Protocol):
    """What a training writes to its runs on every process: `Run` on rank 0, and
    `training.distributed.NoRun` on the other processes of a `torchrun` group, which log nothing.
    Every method the trainer (and `training.checkpoint.workdir`) calls on a run is declared here
    (mypy checks the calls)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None: ...

    def log_dict(self, obj: Any, name: str) -> None: ...

    def log_table(self, df: pd.DataFrame, name: str) -> None: ...

    def artifact_dir(self) -> Path | None: ...

    def reopen(self) -> None: ...

    @property
    def id(self) -> str: ...

    def finish(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None: ...


@dataclass(frozen=True)
class Run:
    """One MLflow run, addressed by id through its own client (no global active run).

    Reads (`status`, `tags`, `params`, ...) go to the store each time, so they see what other
    processes wrote. Use as a context manager to finish it: FINISHED on success, KILLED on
    Ctrl-C, FAILED on any other exception.
    """

    client: MlflowClient = field(compare=False, repr=False)
    id: str
    experiment_id: str

    # -- writing

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values as text, cut to MLflow's length limit), in batches.

        MLflow params are immutable. A key already logged with the same value is skipped, so a
        resumed run can log its config again; a different value raises `TrackingError`.
        """
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        limit = _limits()["param"]
        new = {str(k): _cut(str(v), limit) for k, v in params.items()}
        for attempt in range(3):
            logged = self.params
            conflicts = {k: (logged[k], v) for k, v in new.items() if k in logged and logged[k] != v}
            if conflicts:
                lines = "; ".join(f"{k}: logged {old!r}, now {v!r}" for k, (old, v) in sorted(conflicts.items()))
                raise TrackingError(f"run {self.id}: params cannot change once logged ({lines})")
            todo = [Param(k, v) for k, v in new.items() if k not in logged]
            try:
                for chunk in _chunks(todo, _limits()["batch_params"]):
                    self.client.log_batch(self.id, params=chunk, synchronous=True)
                return
            except MlflowException:
                # Two processes logging the same arm's params at once: the second insert of a
                # key fails its unique constraint. Read what is there now and compare again.
                if attempt == 2:
                    raise

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text); unlike params, tags can be overwritten."""
        from mlflow.entities import RunTag

        limit = _limits()["tag"]
        todo = [RunTag(str(k), _cut(str(v), limit)) for k, v in tags.items()]
        for chunk in _chunks(todo, _limits()["batch_params"]):
            self.client.log_batch(self.id, tags=chunk, synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log all metrics of one step (an epoch) in one `log_batch` call: one database
        transaction per epoch rather than one per value."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        todo = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()]
        for chunk in _chunks(todo, _limits()["batch_metrics"]):
            self.client.log_batch(self.id, metrics=chunk, synchronous=True)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's contents, into the run's artifacts (under `artifact_path`)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.id, str(path), artifact_path)
        else:
            raise TrackingError(f"run {self.id}: cannot log artifact {path}: no such file or folder")

    def log_text(self, text: str, name: str) -> None:
        """Write `text` as the artifact `name` (a path inside the run's artifacts, e.g. `notes/a.md`)."""
        self.client.log_text(self.id, text, name)

    def log_dict(self, obj: Any, name: str) -> None:
        """Write `obj` as JSON (indented, keys sorted) to the artifact `name`."""
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", name)

    def log_table(self, df: pd.DataFrame, name: str) -> None:
        """Write a DataFrame as CSV to the artifact `name`; a meaningful index (not 0..n-1) is kept."""
        import pandas as pd

        self.log_text(df.to_csv(index=not isinstance(df.index, pd.RangeIndex)), name)

    def artifact_dir(self) -> Path | None:
        """The run's artifact folder when the artifact store is a local (or mounted) file system,
        created if missing; None for remote stores (`mlflow-artifacts:`, `s3:`, ...).

        Files written here are the run's artifacts, with no copy: the trainer writes checkpoints
        straight into it (atomically, with `brats_lab.files.atomic_path`).
        """
        path = _local_path(self.info.artifact_uri)
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def artifact(self, name: str, downloads: Path | str = Path("mlruns") / "downloads") -> Path | None:
        """A local path of the run's artifact file `name` (named in brats_lab/run_files.py): the
        file itself in a local store, else a fresh copy downloaded into `downloads`/<run id>; None
        when the run has no such file."""
        local = self.artifact_dir()
        if local is not None:
            return local / name if (local / name).is_file() else None
        if name not in self.list_artifacts(str(Path(name).parent) if "/" in name else ""):
            return None
        return self.download_artifact(name, Path(downloads) / self.id)

    def download_artifact(self, path: str, dst: Path | str) -> Path:
        """Copy the artifact `path` (file or folder) into the folder `dst`; returns the local copy."""
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(self.id, path, str(dst)))

    def finish(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """End the run with `status`."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"run {self.id}: status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        self.client.set_terminated(self.id, status)

    def reopen(self) -> None:
        """Mark a finished, failed or killed run RUNNING again, to resume it."""
        self.client.update_run(self.id, status="RUNNING")

    # -- reading

    @property
    def info(self) -> Any:
        """MLflow's `RunInfo` (status, times, artifact URI, ...), read now."""
        return self.client.get_run(self.id).info

    @property
    def name(self) -> str:
        return cast(str, self.info.run_name)

    @property
    def status(self) -> str:
        """RUNNING, SCHEDULED, FINISHED, FAILED or KILLED."""
        return cast(str, self.info.status)

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.id).data.tags)

    @property
    def params(self) -> dict[str, str]:
        return dict(self.client.get_run(self.id).data.params)

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(_PARENT_TAG)

    def metrics(self) -> dict[str, float]:
        """The latest value of every metric."""
        return dict(self.client.get_run(self.id).data.metrics)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """Every logged value of `key` as (step, value), by step (then time)."""
        history = sorted(self.client.get_metric_history(self.id, key), key=lambda m: (m.step, m.timestamp))
        return [(m.step, m.value) for m in history]

    def list_artifacts(self, path: str = "") -> list[str]:
        """Artifact paths directly under `path` (one level, like MLflow's own listing)."""
        return [f.path for f in self.client.list_artifacts(self.id, path or None)]

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def start_run(
    experiment: str,
    name: str,
    kind: str,
    tags: Mapping[str, Any] | None = None,
    parent: Run | None = None,
    *,
    root: Path | str | None = None,
) -> Run:
    """Create a RUNNING run of `kind` ("study", "arm" or "fold") in `experiment` (created if
    needed), nested under `parent`. Tags: kind, run name, parent, git commit, plus `tags`."""
    mlc = parent.client if parent is not None else client(root)
    experiment_id = _experiment_id(mlc, experiment, create=True)
    if parent is not None and parent.experiment_id != experiment_id:
        # The MLflow UI nests runs only within one experiment.
        raise TrackingError(
            f"run {name!r}: its parent {parent.id} is in experiment {parent.experiment_id}, "
            f"not {experiment!r} ({experiment_id})"
        )
    return _create_run(mlc, experiment_id, name, kind, tags or {}, parent)  # type: ignore[arg-type]


def find_runs(
    experiment: str,
    tags: Mapping[str, Any],
    statuses: Iterable[str] | None = None,
    *,
    root: Path | str | None = None,
) -> list[Run]:
    """Active (not deleted) runs of `experiment` whose tags equal `tags`, newest first; only those
    with a status in `statuses` when given. An experiment that does not exist has no runs."""
    mlc = client(root)
    experiment_id = _experiment_id(mlc, experiment, create=False)
    if experiment_id is None:
        return []
    return _search(mlc, experiment_id, tags, statuses)


def study_run(
    experiment: str,
    study: str,
    name: str,
    tags: Mapping[str, Any] | None = None,
    *,
    root: Path | str | None = None,
) -> tuple[Run, bool]:
    """The study run of `study` in `experiment`, created (with `tags`) if there is none; returns
    (run, whether this call created it).

    Two launchers of one study started at once both find none and both create one: each then
    looks again and keeps the oldest, and the younger one is deleted by its creator, so the study
    has one study run, and one set of arm runs under it (issue 27)."""
    mlc = client(root)
    experiment_id = _experiment_id(mlc, experiment, create=True)
    match = {"kind": "study", "study": study}
    found = _search(mlc, experiment_id, match)  # type: ignore[arg-type]
    if found:
        return found[-1], False  # the oldest: every launcher converges on the same one
    mine = _create_run(mlc, experiment_id, name, "study", {**(tags or {}), "study": study}, None)  # type: ignore[arg-type]
    oldest = _search(mlc, experiment_id, match)[-1]  # type: ignore[arg-type]
    if oldest.id != mine.id:  # lost a creation race
        mlc.delete_run(mine.id)
        return oldest, False
    return mine, True


def arm_run(
    experiment: str,
    config_hash: str,
    name: str,
    params: Mapping[str, Any],
    parent: Run | None = None,
    *,
    root: Path | str | None = None,
) -> Run:
    """The arm run of `config_hash` in `experiment` (under `parent`, when given), created with
    `params` if there is none.

    `params` are logged on an existing arm too: identical values are skipped, a difference raises
    `TrackingError` (the same hash with another config is a bug), and missing ones are added (a
    creator that died between creating the run and logging them). Two processes creating the same
    arm at once both end up with the older run: the younger one is deleted.
    """
    mlc = parent.client if parent is not None else client(root)
    experiment_id = _experiment_id(mlc, experiment, create=True)
    match = {"kind": "arm", "config_hash": config_hash}
    if parent is not None:
        match[_PARENT_TAG] = parent.id
    found = _search(mlc, experiment_id, match)  # type: ignore[arg-type]
    if found:
        arm = found[-1]  # the oldest: every process converges on the same one
    else:
        mine = _create_run(mlc, experiment_id, name, "arm", {"config_hash": config_hash}, parent)  # type: ignore[arg-type]
        arm = _search(mlc, experiment_id, match)[-1]  # type: ignore[arg-type]
        if arm.id != mine.id:  # lost a creation race
            mlc.delete_run(mine.id)
    arm.log_params(params)
    return arm


def fold_run(arm: Run, fold: int, name: str) -> Run:
    """A new RUNNING fold run under `arm` (tags: kind=fold, fold, the arm's config_hash, and the
    arm's training `seed` index when it has one: an ablation's seeds are their own arm runs)."""
    arm_tags = arm.tags
    tags = {"fold": int(fold), "config_hash": arm_tags.get("config_hash", "")}
    if "seed" in arm_tags:
        tags["seed"] = arm_tags["seed"]
    return _create_run(arm.client, arm.experiment_id, name, "fold", tags, arm)


def latest_fold_run(
    experiment: str,
    config_hash: str,
    fold: int,
    statuses: Iterable[str] | None = None,
    *,
    manifest_hash: str | None = None,
    root: Path | str | None = None,
) -> Run | None:
    """The newest fold run of (`config_hash`, `fold`) with a status in `statuses` (any, if None),
    trained on the data whose cache manifest hash is `manifest_hash` when given (the trainer tags
    it: the cases' content, the preprocessing and its version)."""
    tags: dict[str, Any] = {"kind": "fold", "config_hash": config_hash, "fold": int(fold)}
    if manifest_hash is not None:
        tags["manifest_hash"] = manifest_hash
    runs = find_runs(experiment, tags, statuses, root=root)
    return runs[0] if runs else None


def get_run(run_id: str, root: Path | str | None = None) -> Run:
    """The run with this id."""
    mlc = client(root)
    return Run(mlc, run_id, mlc.get_run(run_id).info.experiment_id)


def read_runs(experiment: str | None = None, *, root: Path | str | None = None) -> pd.DataFrame:
    """One row per active run of `experiment` (all experiments if None), newest first.

    Columns: run_id, experiment_id, experiment, name, kind, parent_run_id, status, start_time,
    end_time (UTC), artifact_uri, then `params.<key>`, `metrics.<key>` (latest value) and
    `tags.<key>`, as `mlflow.search_runs` names them.
    """
    import pandas as pd

    mlc = client(root)
    if experiment is None:
        experiments = {e.experiment_id: e.name for e in mlc.search_experiments()}
    else:
        experiment_id = _experiment_id(mlc, experiment, create=False)
        experiments = {} if experiment_id is None else {experiment_id: experiment}
    rows = []
    for r in _search_raw(mlc, list(experiments), ""):
        tags = r.data.tags
        rows.append({
            "run_id": r.info.run_id,
            "experiment_id": r.info.experiment_id,
            "experiment": experiments.get(r.info.experiment_id),
            "name": r.info.run_name,
            "kind": tags.get("kind"),
            "parent_run_id": tags.get(_PARENT_TAG),
            "status": r.info.status,
            "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
            "end_time": pd.to_datetime(r.info.end_time, unit="ms", utc=True) if r.info.end_time else pd.NaT,
            "artifact_uri": r.info.artifact_uri,
            **{f"params.{k}": v for k, v in sorted(r.data.params.items())},
            **{f"metrics.{k}": v for k, v in sorted(r.data.metrics.items())},
            **{f"tags.{k}": v for k, v in sorted(tags.items())},
        })
    base = ["run_id", "experiment_id", "experiment", "name", "kind", "parent_run_id", "status",
            "start_time", "end_time", "artifact_uri"]  # fmt: skip
    return pd.DataFrame(rows, columns=None if rows else base)


# --- implementation --------------------------------------------------------------------------


def _import_mlflow() -> Any:
    import mlflow

    _quiet_mlflow()
    return mlflow


@functools.cache
def _quiet_mlflow() -> None:
    # First use of a new SQLite store prints schema-migration chatter at INFO level ("Creating
    # initial MLflow database tables...", alembic's "Running upgrade ..."); warnings and errors
    # from the same loggers still show.
    for name in ("mlflow.store.db.utils", "mlflow.store.db", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # With a tracking server, MLflow prints two "View run ... at" lines for every run ended and a
    # progress bar for every artifact read: noise in a worker's output (set either to see them).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@functools.cache
def _limits() -> dict[str, int]:
    from mlflow.utils import validation as v

    return {
        "param": getattr(v, "MAX_PARAM_VAL_LENGTH", 500),
        "tag": getattr(v, "MAX_TAG_VAL_LENGTH", 5000),
        "batch_params": getattr(v, "MAX_PARAMS_TAGS_PER_BATCH", 100),
        "batch_metrics": getattr(v, "MAX_METRICS_PER_BATCH", 1000),
    }


_prepared: set[str] = set()


def _prepare_sqlite(uri: str) -> None:
    """Create the SQLite store once per process: tables, the Default experiment with its
    artifacts under `artifacts/0`, and write-ahead logging.

    Done under a file lock because two processes that find no database both run MLflow's schema
    migrations, and the second fails half-way. WAL lets readers (the UI, the dashboard) read while
    a trainer writes, and writers wait for each other rather than fail.
    """
    if uri in _prepared:
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = _sqlite_path(uri)
    assert db is not None
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(db.with_name(db.name + ".lock")):
        if not db.exists():
            _create_sqlite(db)
        # MLflow caches one engine per URI, so the client's store later reuses this one. The
        # artifact root given here only places the Default experiment (ours name their own).
        SqlAlchemyStore(uri, str(db.parent / ARTIFACTS_DIR))
    _prepared.add(uri)


def _create_sqlite(db: Path) -> None:
    """Make a new MLflow store: tables migrated, the Default experiment, WAL, in a file beside `db`
    renamed into place once complete. A failure (a full disk half-way through the migrations)
    leaves nothing: a half-migrated `mlflow.db` would break every later command until deleted by
    hand (issue 27). Raises OSError naming the file and why ("disk full")."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    parts = [tmp, *(tmp.with_name(tmp.name + end) for end in ("-wal", "-shm", "-journal"))]
    uri = "sqlite:///" + tmp.as_posix()
    try:
        # Before the migrations: they are a few hundred small transactions, faster in WAL.
        conn = sqlite3.connect(tmp, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
        SqlAlchemyStore(uri, str(db.parent / ARTIFACTS_DIR))
        _forget_engine(uri)
        conn = sqlite3.connect(tmp, timeout=30)
        try:  # everything into the database file itself before it is renamed (its WAL is not)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        os.replace(tmp, db)
    except BaseException as e:  # OSError, sqlite3.Error, SQLAlchemyError, MlflowException over them; Ctrl-C
        for part in parts:
            part.unlink(missing_ok=True)
        _forget_engine(uri)
        if not isinstance(e, Exception):
            raise
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "disk is full" in reason or "No space left" in reason
        error = write_error(db, OSError(errno.ENOSPC if full else getattr(e, "errno", None), reason), "could not create the MLflow store")
        raise OSError(f"{error}; nothing was left behind: free some space and run the command again") from None


def _forget_engine(uri: str) -> None:
    """Drop MLflow's cached engine of a temporary database, so nothing holds its file open."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engines = getattr(SqlAlchemyStore, "_engine_map", None)  # MLflow 3's per-URI cache
    if isinstance(engines, dict):
        engine = engines.pop(uri, None)
        if engine is not None:
            engine.dispose()


_KIND_TAG = "mlflow.experimentKind"


def _experiment_id(mlc: MlflowClient, name: str, create: bool) -> str | None:
    from mlflow.exceptions import MlflowException

    experiment = mlc.get_experiment_by_name(name)
    if experiment is None:
        if not create:
            return None
        location = _experiment_artifact_location(mlc.tracking_uri, name)
        try:
            # MLflow 3's UI opens an experiment without this tag as a GenAI one (traces, no runs).
            return mlc.create_experiment(name, artifact_location=location, tags={_KIND_TAG: "custom_model_development"})
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = mlc.get_experiment_by_name(name)  # another process created it first
            assert experiment is not None
    if experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"experiment {name!r} ({experiment.experiment_id}) is deleted: restore it in the MLflow UI, "
            f"or remove it for good with `mlflow gc --backend-store-uri {mlc.tracking_uri} "
            f"--experiment-ids {experiment.experiment_id}`"
        )
    return experiment.experiment_id


def _experiment_artifact_location(uri: str, name: str) -> str | None:
    db = _sqlite_path(uri)
    if db is None:
        return None  # a tracking server (or a shared database) decides where artifacts go
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "experiment"
    return str(db.parent / ARTIFACTS_DIR / slug)


def _create_run(
    mlc: MlflowClient, experiment_id: str, name: str, kind: str, tags: Mapping[str, Any], parent: Run | None
) -> Run:
    if kind not in KINDS:
        raise ValueError(f"run {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    all_tags = {**_standard_tags(), **{str(k): str(v) for k, v in tags.items()}, "kind": kind, _NAME_TAG: name}
    if parent is not None:
        all_tags[_PARENT_TAG] = parent.id
    run = mlc.create_run(experiment_id, run_name=name, tags=all_tags)
    return Run(mlc, run.info.run_id, run.info.experiment_id)


def _search(
    mlc: MlflowClient, experiment_id: str, tags: Mapping[str, Any], statuses: Iterable[str] | None = None
) -> list[Run]:
    clauses = [f"tags.`{k}` = {_quote(str(v))}" for k, v in tags.items()]
    wanted = None if statuses is None else {s.upper() for s in statuses}
    return [
        Run(mlc, r.info.run_id, r.info.experiment_id)
        for r in _search_raw(mlc, [experiment_id], " and ".join(clauses))
        if wanted is None or r.info.status in wanted
    ]


def _search_raw(mlc: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Any]:
    if not experiment_ids:
        return []
    runs: list[Any] = []
    token = None
    while True:
        page = mlc.search_runs(
            experiment_ids, filter_string, max_results=1000, order_by=["attributes.start_time DESC"], page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    # Newest first; the run id breaks ties in the millisecond clock, so every process agrees.
    runs.sort(key=lambda r: (r.info.start_time, r.info.run_id), reverse=True)
    return runs


def _quote(value: str) -> str:
    # MLflow's filter grammar has no escapes: pick the quote the value does not contain.
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"cannot search for a tag value containing both quote characters: {value!r}")


@functools.cache
def _standard_tags() -> dict[str, str]:
    """Git commit and dirtiness of the code's checkout, and the user. Computed once per process:
    the code that runs is the code imported at start, whatever is committed later."""
    tags: dict[str, str] = {}
    with contextlib.suppress(Exception):  # no user name in some containers (getuser raises)
        tags["mlflow.user"] = getpass.getuser()
    commit, dirty = _git_state(_CODE_ROOT)
    if commit:
        tags[_GIT_COMMIT_TAG] = commit
        tags["git_dirty"] = "true" if dirty else "false"
    return tags


def _git_state(path: Path) -> tuple[str | None, bool]:
    """(HEAD commit, any tracked file modified) if `path` is the top of a git checkout, else (None, False).

    Only the top counts: a package installed into a virtual environment inside some other
    repository must not record that repository's commit.
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != path.resolve():
        return None, False
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, bool(status)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(path).resolve() if path and path != ":memory:" else None


def _local_path(uri: str) -> Path | None:
    """A local folder for a `file:` URI or a plain path, else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a path ("C:\\..." on Windows)
        return Path(uri)
    return None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
