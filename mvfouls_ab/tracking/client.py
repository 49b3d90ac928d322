"""MLflow URIs, clients and experiments: which tracking URIs are accepted, a fast-failing client, the
experiment of a study / A/B experiment (custom-model kind), and its URL."""
from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

from ..errors import StudyError, located
from ..urls import normalize_db_url

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks")

# MLflow's usage telemetry starts its own consumer thread (CPU taken from training) and phones home; the platform runs
# on offline machines. Set before any MLflow call is made (mlflow checks it per call); MLFLOW_DISABLE_TELEMETRY=false
# in the environment turns it back on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")



# ---- URIs and clients ---------------------------------------------------------------------------------------
def check_tracking_uri(uri: str) -> str:
    """Return the URI unchanged, or raise StudyError for one MLflow cannot use."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in TRACKING_SCHEMES:
        raise StudyError(located("--tracking-uri", f"{uri!r} is not a tracking URI MLflow understands",
                                 f"use {DEFAULT_TRACKING_URI}, http://127.0.0.1:5000 or postgresql://user@host/db"))
    if scheme in ("http", "https") and not parsed.hostname:
        raise StudyError(located("--tracking-uri", f"{uri!r} has no host", "write http://HOST:PORT"))
    if scheme in ("http", "https"):
        try:
            _ = parsed.port
        except ValueError:
            raise StudyError(located("--tracking-uri", f"{uri!r} has an invalid port",
                                     "write http://HOST:PORT with a numeric port")) from None
    return uri


def init_store(uri: str) -> None:
    """Create a database-backed MLflow store's tables once, before several worker processes open it at the same
    time (concurrent first opens race on the schema migration)."""
    if check_tracking_uri(uri).startswith(("http://", "https://")):
        return                                          # a tracking server migrates its own store
    make_client(uri).search_experiments(max_results=1)


def make_client(uri: str):
    """An MlflowClient whose HTTP requests fail fast (our own thread retries, with backoff, without blocking)."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return MlflowClient(tracking_uri=normalize_db_url(check_tracking_uri(uri)))


# MLflow 3's UI opens an experiment on the page its kind names; without the tag it may infer a GenAI experiment and
# open on traces. Every experiment this project creates is a custom model's (the training runs table).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(client, name: str) -> str:
    """Experiment id for ``name``, tagged as custom model development; safe when several workers race to create
    it. An existing experiment without a kind gets the tag (one that has a kind keeps it)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:   # another worker created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def experiment_url(base: str, experiment_id: str | None) -> str:
    """The MLflow UI page of an experiment's training runs. MLflow 3's UI picks its page set from a global
    GenAI / Model training switch (stored in the browser, GenAI by default), not from the experiment's kind tag;
    ``workflowType=machine_learning`` in the URL selects Model training, so the page opens on the runs table."""
    base = base.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else base
