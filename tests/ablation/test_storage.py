"""Optuna storage URLs (`ablation/storage.py`): what is shown of them."""

from __future__ import annotations

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
