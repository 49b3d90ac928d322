"""Everything MLflow: experiments, parent/child runs, batched logging that survives an unreachable server.

client.py      tracking URIs, the fast-failing client, experiments
provenance.py  context tags, git commit, data fingerprint
logger.py      RunLogger: the ordered, retrying background thread of a run; the spill file and its replay
runs.py        RunTracker (one run), claim_run (the one protocol for runs several workers create at once)
sinks.py       MLflowSink (the trainer's sink) and what it logs
The figures a run carries are built by reporting/figures.py; the replay command is cli/tracking.py.

Layout in MLflow: one experiment per study (named after the study); one parent run per study; one nested child run
per trial (tag ``mlflow.parentRunId``). A child run gets the flat TrainingConfig as params (batches of <= 100), tags
(variant, phase plan, trial number, data fingerprint, git commit), every DetailedMetrics record as step metrics
(step = epoch; the background thread merges the metrics of consecutive epochs into as few ``log_batch`` requests as
fit, see logger.RunLogger), confusion matrices per epoch as JSON, plotly HTML for the
confusion matrices at each phase end and for the best epoch, learning curves and the class distribution as plotly
HTML, and the final prediction files and best checkpoint as artifacts.

Default tracking URI: ``sqlite:///mlflow.db`` in the working directory, next to the default Optuna storage
``sqlite:///optuna.db``, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` run from the same directory shows
it. (Artifacts of a SQLite store go to ``./mlruns``.)

Unreachable server: every operation of a run goes through a background thread (logger.RunLogger) in order
(metrics may overtake the artifacts, params and tags submitted after them, never a run's create or terminate).
When a request fails for a transient reason the thread keeps the operation (and everything after it) in memory,
appends them to ``<run_dir>/mlflow_spill.jsonl``, and retries with exponential backoff (capped at 5 s); training
never waits. ``end()`` flushes; if the server is still down after ``flush_timeout`` seconds the spill file stays and
``python -m mvfouls_ab.tracking replay <run_dir>/mlflow_spill.jsonl --tracking-uri URI`` sends it later.
"""
from __future__ import annotations

from ..urls import normalize_db_url
from .client import (
    DEFAULT_TRACKING_URI,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    check_tracking_uri,
    experiment_url,
    get_or_create_experiment,
    init_store,
    make_client,
)
from .logger import (
    DEFAULT_LINGER_S,
    MAX_METRICS_PER_BATCH,
    SPILL_NAME,
    RunLogger,
    coalesce_metrics,
    log_model_dir,
    metric_items,
    read_spill,
    replay_spill,
)
from .provenance import context_tags, data_fingerprint, git_commit
from .runs import RunTracker, claim_run, wait_closed
from .sinks import MLflowSink, class_distribution, confusion_table, run_metrics

__all__ = [
    "DEFAULT_LINGER_S", "DEFAULT_TRACKING_URI", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "MAX_METRICS_PER_BATCH",
    "SPILL_NAME", "MLflowSink", "RunLogger", "RunTracker", "check_tracking_uri", "claim_run", "class_distribution",
    "coalesce_metrics", "confusion_table", "context_tags", "data_fingerprint", "experiment_url",
    "get_or_create_experiment", "git_commit", "init_store", "log_model_dir", "make_client", "metric_items",
    "normalize_db_url", "read_spill", "replay_spill", "run_metrics", "wait_closed",
]
