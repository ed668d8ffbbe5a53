"""Where an ablation's Optuna study lives: opening the storage URL, and that URL without its password.

    sqlite:///mlruns/optuna.db             the embedded default (one machine)
    postgresql://user@host:5432/db         shared by workers on several machines (psycopg 3)

A password written in the URL (`user:secret@host`, or `?password=secret`) never reaches a log, a
message or an MLflow tag: `safe_url` replaces it with `***`, and a connection error has it removed.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from urllib.parse import unquote

from brats_lab import DataError
from brats_lab.files import file_lock
from brats_lab.urls import _QUERY_PASSWORD, _split_credentials, safe_url, url_password  # noqa: F401 (re-exported)

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"


def open_storage(url: str, heartbeat_seconds: int, grace_seconds: int, create: bool = True):
    """Optuna's storage at `url`, its workers' heartbeat every `heartbeat_seconds` and a trial
    silent for `grace_seconds` stale; with `create` false (a worker), refuse a SQLite file or an
    empty database instead of creating it: a worker given a wrong URL must leave nothing behind.
    Any failure is one DataError line, the URL and the driver's words without the password."""
    import optuna  # here, not at the top: a second of imports that only opening a study needs
    from sqlalchemy.exc import SQLAlchemyError

    given = url
    lock = contextlib.nullcontext()
    if url.startswith("sqlite:///"):
        file = Path(url.removeprefix("sqlite:///").partition("?")[0])
        if not create and not file.is_file():
            raise DataError(f"no Optuna storage at {file} (a worker does not create one); "
                            "start the study with `brats-lab ablate`, and give workers its --storage")
        file.parent.mkdir(parents=True, exist_ok=True)
        # Launchers started at once would each create Optuna's tables, and all but one fail half-way
        # (UNIQUE constraint failed: alembic_version): one at a time, the others find them made.
        lock = claim_lock(url)  # type: ignore[assignment]
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
            with lock:
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_seconds, grace_period=grace_seconds,
                                                  skip_table_creation=not create, **callback)
        except (SQLAlchemyError, ImportError, optuna.exceptions.StorageInternalError) as e:
            if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
                e = e.__cause__  # type: ignore[assignment]  # Optuna's own words say nothing of the cause
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            if not create and "version_info" in reason:  # a database without Optuna's tables
                reason += " (a worker does not create a storage: start the study with `brats-lab ablate`)"
            password = url_password(given)
            for form in {password, unquote(password)} - {""}:  # drivers may echo it decoded
                reason = reason.replace(form, "***")
            raise DataError(f"cannot open the Optuna storage {safe_url(given)}: {reason}") from None


def claim_lock(url: str) -> contextlib.AbstractContextManager:
    """A lock for a read-then-write on the storage at `url` that must be atomic across workers.

    PostgreSQL needs none (Optuna reads the trial row FOR UPDATE); SQLite ignores FOR UPDATE and
    Python's sqlite3 begins the transaction at the write, after the read: two workers would both
    read a trial WAITING and both claim it. A file lock beside the database makes it one at a time."""
    if not url.startswith("sqlite:///"):
        return contextlib.nullcontext()
    file = Path(url.removeprefix("sqlite:///").partition("?")[0])
    return file_lock(file.with_name(file.name + ".lock"))


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
