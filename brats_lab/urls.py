"""A URL without its password, for whatever is printed, logged or shown: Optuna storage URLs
(ablation/storage.py) and MLflow tracking URIs (`ui`, `dashboard`), which may both be database
URLs with a password in them (`user:secret@host`, or `?password=secret`). Stdlib only, so that
every layer can use it."""

from __future__ import annotations

import re


def safe_url(url: str) -> str:
    """A storage URL without its password (after the user name, or a `password=` parameter),
    for logs, messages and tags."""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    credentials, at, host = _split_credentials(rest)
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return scheme + sep + credentials + at + host


def url_password(url: str) -> str:
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


