"""The Optuna RDB storage: one factory for the study, the A/B runner, `rank` and `report`.

``--storage`` defaults to ``$MVFOULS_STORAGE`` or ``sqlite:///optuna.db`` (working directory); use PostgreSQL
(``postgresql://USER@HOST:PORT/DB``) for workers on several machines. Every storage has a heartbeat: a trial whose
worker stops beating for ``grace`` seconds is stale; the study passes a callback that retries it, the A/B runner
fails it and enqueues its cell again.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from ..errors import StudyError, located
from ..urls import STORAGE_ENV, normalize_db_url, redact, redact_text

DEFAULT_STORAGE = "sqlite:///optuna.db"
STORAGE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql")


def default_storage() -> str:
    """$MVFOULS_STORAGE (a URL with a password goes there, or to ~/.pgpass, not on a command line), else the
    SQLite file in the working directory."""
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def check_storage_url(url: str) -> str:
    """url, or a StudyError (naming --storage) when it is not a database URL this tool supports."""
    parsed = urlparse(url) if isinstance(url, str) else None
    scheme = parsed.scheme.split("+")[0] if parsed else ""
    if scheme not in STORAGE_SCHEMES or (scheme == "sqlite" and not url.startswith("sqlite:///")):
        raise StudyError(located("--storage", f"{redact(str(url))!r} is not a storage URL this tool supports",
                                 "use sqlite:///optuna.db or postgresql://USER@HOST:PORT/DB"))
    if scheme != "sqlite":
        try:
            _ = parsed.port
        except ValueError:
            raise StudyError(located("--storage", f"{redact(url)!r} has an invalid port",
                                     "write postgresql://USER@HOST:PORT/DB with a numeric port")) from None
        if not parsed.hostname or not parsed.path.strip("/"):
            raise StudyError(located("--storage", f"{redact(url)!r} needs a host and a database name",
                                     "write postgresql://USER@HOST:PORT/DB"))
    return url


def open_storage(url: str, heartbeat: int = 10, grace: int | None = None,
                 stale_trial_callback: Callable[[Any, Any], None] | None = None):
    """An Optuna RDBStorage: heartbeat every ``heartbeat`` s, stale after ``grace`` s (default 2 x heartbeat),
    ``stale_trial_callback(study, frozen_trial)`` for each stale trial found. Errors name --storage."""
    import optuna
    from optuna.storages import RDBStorage

    check_storage_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
    try:
        with warnings.catch_warnings():     # heartbeats are "experimental" in Optuna's sense since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(normalize_db_url(url), engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                              grace_period=grace if grace is not None else 2 * heartbeat,
                              heartbeat_stale_trial_callback=stale_trial_callback)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy OperationalError / ArgumentError / missing driver
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = redact_text(first, [url])
        raise StudyError(located("--storage", f"cannot open storage {redact(url)!r} ({type(exc).__name__}: {first})",
                                 "start the database server / create the database, or use sqlite:///optuna.db"
                                 )) from None
