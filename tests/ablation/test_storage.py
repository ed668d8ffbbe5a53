"""Optuna storage URLs (`ablation/storage.py`): what is shown of them."""

from __future__ import annotations

import threading

import pytest

SECRET = "Secret77"  # the part of each password that must never be shown


@pytest.mark.parametrize("char", list("?#/@%:"))
def test_storage_urls_are_masked_whatever_the_password_holds(char):
    """What the study run's `storage` tag and every message show of a storage URL."""
    from brats_lab.ablation.storage import safe_url as _safe, url_password as _password

    url = f"postgresql://user:Qm{char}{SECRET}@db.example:5432/optuna?sslmode=require"
    assert _safe(url) == "postgresql://user:***@db.example:5432/optuna?sslmode=require"
    assert _password(url) == f"Qm{char}{SECRET}"
    query = f"postgresql://user@db.example/optuna?sslmode=require&password=Qm{char.replace('&', '')}{SECRET}"
    assert SECRET not in _safe(query) and _safe(query).startswith("postgresql://user@db.example/optuna?sslmode=require&password=***")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_workers_claiming_at_once_each_get_a_trial_of_their_own(backend, request, tmp_path):
    """Four workers, each with its own connection, claim from one queue of trials until it is empty:
    each trial is claimed once. On SQLite without the claim lock, 60 trials gave 90 claims (two
    launchers started together both trained trial 0)."""
    import optuna

    from brats_lab.ablation.study import _claim, _storage

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/optuna.db"
    else:
        postgres = request.getfixturevalue("postgres")
        url = f"postgresql://root@{postgres.address}/{request.getfixturevalue('databases')()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    queue = optuna.create_study(study_name="claims", storage=_storage(url))
    for i in range(60):
        queue.enqueue_trial({}, user_attrs={"i": i})
    claimed: list[int] = []

    def worker() -> None:
        store = _storage(url, create=False)
        study = optuna.load_study(study_name="claims", storage=store)
        while (trial := _claim(study, store, url)) is not None:
            claimed.append(trial.number)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == list(range(60))
