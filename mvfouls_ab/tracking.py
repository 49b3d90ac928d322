"""Everything MLflow: experiments, parent/child runs, batched logging that survives an unreachable server, figures.

Layout in MLflow: one experiment per study (named after the study); one parent run per study; one nested child run
per trial (tag ``mlflow.parentRunId``). A child run gets the flat TrainingConfig as params (batches of <= 100), tags
(variant, phase plan, trial number, data fingerprint, git commit), every DetailedMetrics record as step metrics
(step = epoch; the background thread merges the metrics of consecutive epochs into as few ``log_batch`` requests as
fit, see :class:`RunLogger`), confusion matrices per epoch as JSON, plotly HTML for the
confusion matrices at each phase end and for the best epoch, learning curves and the class distribution as plotly
HTML, and the final prediction files and best checkpoint as artifacts.

Default tracking URI: ``sqlite:///mlflow.db`` in the working directory, next to the default Optuna storage
``sqlite:///optuna.db``, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` run from the same directory shows
it. (Artifacts of a SQLite store go to ``./mlruns``.)

Unreachable server: every operation of a run goes through a background thread (:class:`RunLogger`) in order
(metrics may overtake the artifacts, params and tags submitted after them, never a run's create or terminate).
When a request fails for a transient reason the thread keeps the operation (and everything after it) in memory,
appends them to ``<run_dir>/mlflow_spill.jsonl``, and retries with exponential backoff (capped at 5 s); training
never waits. ``end()`` flushes; if the server is still down after ``flush_timeout`` seconds the spill file stays and
``python -m mvfouls_ab.tracking replay <run_dir>/mlflow_spill.jsonl --tracking-uri URI`` sends it later.
"""
from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

# plotly is imported here, in the importing (main) thread: figures are built in the logger thread, and two threads
# importing plotly's lazy dependencies (narwhals) at once can raise a _DeadlockError.
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .errors import StudyError, located
from .fsutil import atomic_write, jsonable
from .labels import ACTION_CLASSES, SEVERITY_CLASSES, TASKS
from .urls import normalize_db_url

log = logging.getLogger(__name__)

# MLflow's usage telemetry starts its own consumer thread (CPU taken from training) and phones home; the platform runs
# on offline machines. Set before any MLflow call is made (mlflow checks it per call); MLFLOW_DISABLE_TELEMETRY=false
# in the environment turns it back on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks")
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000          # MLflow's own log_batch limit
DEFAULT_LINGER_S = 3.0                # see RunLogger
# operations that order everything around them: nothing may be sent before a create/resume/bind (no run id yet), and a
# terminate goes after every metric of its run
BARRIERS = frozenset({"create", "resume", "bind", "terminate"})
METRIC_OPS = frozenset({"metrics", "metrics_multi"})
SPILL_NAME = "mlflow_spill.jsonl"
CREATE_TOKEN_TAG = "mvfouls_create_token"   # a run's creation is never repeated by a retry or a replay
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow error codes that retrying cannot fix: the operation is dropped with a warning.
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                              "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"})


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


def claim_run(study: Any, key: str, run_id: str, discard: Callable[[str], None] | None = None,
              settle_s: float = 0.5) -> str:
    """The one claim protocol for runs that several workers may create at the same time (the study's parent run,
    an A/B experiment's parent and arm runs): the run every one of them adopts is the first claim written.

    Each worker claims its new run under the same Optuna study user attribute ``key``, written only when absent;
    Optuna's RDB storage inserts an attribute once (a racing insert's IntegrityError is ignored), so the first
    claim stays. Only a claim that found the key absent microseconds before another's commit can overwrite it;
    reading back after ``settle_s`` makes every worker see the last write. A loser passes its own run to
    ``discard`` (end and delete it), so no orphaned run is left RUNNING. Returns the winner's run id.
    """
    if key not in study.user_attrs:
        study.set_user_attr(key, run_id)
        time.sleep(settle_s)
    winner = study.user_attrs[key]
    if winner != run_id and discard is not None:
        with contextlib.suppress(Exception):     # best effort: the run is unused either way
            discard(run_id)
    return winner


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


@functools.cache
def context_tags() -> dict[str, str]:
    """MLflow's standard run tags for this process (``mlflow.user``, ``mlflow.source.name``/``type`` and, inside a
    git checkout, ``mlflow.source.git.commit``/``repoURL``/``branch``), as ``mlflow.start_run`` sets them; our runs
    are created with MlflowClient, which does not. Resolved once per process."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        tags = {k: str(v) for k, v in resolve_tags({}).items()}
    except Exception as exc:  # noqa: BLE001 - tags are a nicety: never fail a run for them
        log.info("MLflow context tags unavailable: %s", exc)
        tags = {}
    if "mlflow.source.git.commit" not in tags:    # the entry point is outside the checkout (pytest, a notebook)
        commit = git_commit()
        if commit != "unknown":
            tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_fingerprint(root: Path | str) -> str:
    """Short content hash of the split annotation files (which data a run saw)."""
    h = hashlib.sha1()
    for split in ("Train", "Valid", "Test"):
        p = Path(root) / split / "annotations.json"
        if p.is_file():
            h.update(split.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _is_transient(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    return not (isinstance(code, str) and code in PERMANENT_ERRORS)


# ---- the ordered, retrying background logger ----------------------------------------------------------------
def metric_items(op: dict) -> list[list]:
    """``[[key, value, ts, step], ...]`` of a ``metrics`` or ``metrics_multi`` op (non-finite values left out)."""
    if op["op"] == "metrics_multi":
        return op["items"]
    return [[k, float(v), op["ts"], op["step"]] for k, v in op["values"].items()
            if v is not None and np.isfinite(float(v))]


def _n_values(op: dict) -> int:
    return len(op["items"]) if op["op"] == "metrics_multi" else len(op["values"])


def coalesce_metrics(pending: Iterable[dict], limit: int = MAX_METRICS_PER_BATCH) -> deque[dict]:
    """``pending`` (whose first op is a metric op) with its leading metric ops merged into one ``metrics_multi`` op.

    Merged: the metric ops before the first barrier, skipping over the non-metric ops between them (those keep their
    order, after the merged op), while their values fit in ``limit`` (one request). Whole ops only: an epoch's
    metrics reach MLflow all or none, which MLflowSink.backfill relies on after a worker is killed (the first op is
    always taken; one > ``limit`` is chunked by execute). ``ops`` of the merged op = how many submitted operations it
    completes. Returns a new deque and leaves ``pending`` as it is (a concurrent spill sees every op either way).
    """
    ops = list(pending)
    items: list[list] = []
    n = 0
    rest: deque[dict] = deque()
    for i, op in enumerate(ops):
        if op["op"] in BARRIERS:
            rest.extend(ops[i:])
            break
        if op["op"] not in METRIC_OPS:
            rest.append(op)
            continue
        new = metric_items(op)
        if n and len(items) + len(new) > limit:      # full: this op and everything after it wait for the next one
            rest.extend(ops[i:])
            break
        items += new
        n += op.get("ops", 1)
    rest.appendleft({"op": "metrics_multi", "items": items, "ops": n})
    return rest


class RunLogger:
    """Sends the operations of one MLflow run from a background thread, in order except that metrics are merged.

    Operations are plain JSON-able dicts (so they can be spilled to disk and replayed):
    ``create`` (experiment, run_name, tags, parent), ``resume`` (run_id), ``metrics`` (step, values, ts),
    ``metrics_multi`` (items ``[[key, value, ts, step], ...]``, ops: merged metrics ops), ``params``, ``tags``,
    ``text`` (artifact file + content), ``figure``, ``artifact`` (local path), ``terminate`` (status).

    Coalescing: every ``log_batch`` costs the tracking store a fixed amount of work (an ORM flush, the latest-metric
    update, a run lookup; a server round trip), whatever its size, so the metrics of consecutive epochs are sent
    together (:func:`coalesce_metrics`: whole epochs, up to MAX_METRICS_PER_BATCH values, MLflow's limit, per
    request). Metric ops
    may overtake the ``text``/``figure``/``artifact``/``params``/``tags`` ops submitted after them (none depend on
    metrics) but never a barrier: ``create``/``resume``/``bind`` go first, ``terminate`` after every metric before it.
    When a metric op reaches the front with fewer values pending than one full request, the thread waits up to
    ``linger_s`` for more; ``flush()``, ``close()``, a queued barrier or a full request send at once.
    ``linger_s`` = 3 s (DEFAULT_LINGER_S): longer than an epoch of a study trial (~0.5 s on the cpu profile), so a
    request carries several epochs (at 150-165 metrics per epoch, 6 fill a request); short enough that the UI's
    curves lag by a few seconds only, and that a worker killed hard loses at most ~3 s of metrics that were not yet
    sent (a resumed trial backfills them from its checkpoint, see MLflowSink.backfill). 0 = no waiting (ops that
    are already queued are still merged).

    While the server is unreachable the pending operations (a merged op included) are rewritten to the spill file
    after every failed attempt, so a crash loses nothing either (replaying may repeat already-sent operations; MLflow
    de-duplicates identical metrics, params and artifacts). A permanent error drops the whole (merged) op.
    Counters: ``requests`` write requests sent (log_batch chunks, artifacts, run create/update), ``failures`` failed
    attempts, ``busy_s`` wall time spent sending, ``cpu_s`` CPU time of the thread (time.thread_time).
    """

    def __init__(self, client, spill_path: Path | None = None, max_backoff: float = 5.0,
                 linger_s: float = DEFAULT_LINGER_S) -> None:
        self.client = client
        self.spill_path = Path(spill_path) if spill_path else None
        self.run_id: str | None = None
        self.created = threading.Event()
        self.max_backoff = max_backoff
        self.linger_s = linger_s
        self.requests = 0            # requests sent
        self.failures = 0            # failed attempts
        self.busy_s = 0.0            # time the thread spent sending
        self.cpu_s = 0.0             # CPU time of the thread
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[dict] = deque()
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0               # submitted ops sent (a merged op counts its parts)
        self._flush_upto = 0         # ops up to this count are sent without lingering
        self._stop = False
        self._spill_failed = False   # the last spill attempt raised OSError (logged once per streak)
        self._found = self._adopt_spills()
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    def _adopt_spills(self) -> list[Path]:
        """Spill files another process left where this logger spills (a dead or stopped worker of the same trial):
        renamed aside (never overwritten) and replayed by the thread before this logger's own operations."""
        if self.spill_path is None:
            return []
        found = sorted(self.spill_path.parent.glob(f"{self.spill_path.stem}.found-*.jsonl"))
        if self.spill_path.is_file():
            aside = self.spill_path.with_name(f"{self.spill_path.stem}.found-{time.time_ns()}-{os.getpid()}.jsonl")
            try:
                os.replace(self.spill_path, aside)
                found.append(aside)
            except OSError as exc:
                log.warning("%s: cannot set the found spill file aside (%s); it is replayed in place and this run "
                            "spills nowhere", self.spill_path, exc)
                found.append(self.spill_path)
                self.spill_path = None
        return found

    # -- producer side (training thread) --
    def submit(self, op: dict) -> None:
        with self._cond:
            self._submitted += 1
        self._inbox.put(op)

    def wait_run_id(self, timeout: float = 0.0) -> str | None:
        self.created.wait(timeout)
        return self.run_id

    @property
    def backlog(self) -> int:
        with self._cond:
            return self._submitted - self._done

    def flush(self, timeout: float = 60.0) -> bool:
        """Send every submitted operation now (no lingering) and wait for it; False if the server stayed unreachable.
        ``timeout=0`` only asks the thread to send what it holds."""
        with self._cond:
            self._flush_upto = self._submitted
        self._inbox.put(None)        # wake the thread if it lingers
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= self._submitted, timeout)

    def close(self, timeout: float = 60.0) -> bool:
        ok = self.flush(timeout)
        self._stop = True
        self._inbox.put(None)
        self._thread.join(5.0)
        if not ok:
            if self._spill():
                log.warning("MLflow unreachable: %d operations kept in %s; replay with "
                            "`python -m mvfouls_ab.tracking replay %s --tracking-uri URI`",
                            len(self._pending), self.spill_path, self.spill_path)
            else:
                log.warning("MLflow unreachable and no spill file could be written: %d operations of run %s "
                            "are lost", len(self._pending), self.run_id)
        return ok

    # -- consumer side (background thread) --
    def _work(self) -> None:
        cpu0 = time.thread_time()
        if not self._replay_found():
            return
        backoff = 0.25
        failing = False
        linger_until = None
        while True:
            if not self._pending:
                op = self._inbox.get()
                if op is None:
                    if self._stop:
                        return
                    continue
                self._pending.append(op)
            arrived = self._drain_inbox()
            if failing and arrived:
                self._spill()
            if self._pending[0]["op"] in METRIC_OPS:
                if not failing:
                    if linger_until is None:
                        linger_until = time.monotonic() + self.linger_s
                    if self._linger(linger_until):
                        continue
                self._pending = coalesce_metrics(self._pending)
                linger_until = None
            op = self._pending[0]
            t0 = time.perf_counter()
            try:
                self.requests += execute(self.client, op, self)
                sent = True
            except Exception as exc:   # noqa: BLE001 - the server's problem must never stop training
                self.failures += 1
                sent = not _is_transient(exc)
                if sent:
                    log.warning("MLflow dropped %s: %s", op.get("op"), exc)
            self.busy_s += time.perf_counter() - t0
            self.cpu_s = time.thread_time() - cpu0      # before notifying: flush() returns with it up to date
            if sent:
                self._pending.popleft()
                backoff = 0.25
                with self._cond:
                    self._done += op.get("ops", 1)
                    self._cond.notify_all()
                if not self._pending and failing:
                    failing = False
                    if self.spill_path and self.spill_path.exists():
                        with contextlib.suppress(OSError):
                            self.spill_path.unlink()    # everything in it has been delivered
                continue
            failing = True
            self._spill()
            if self._stop:
                return
            time.sleep(backoff)
            backoff = min(self.max_backoff, backoff * 2)

    def _linger(self, until: float) -> bool:
        """Wait (until ``until`` at most) for more ops when the pending metrics are fewer than one request and nothing
        asks for them; True if it waited (the caller looks again), False to send now."""
        with self._cond:
            urgent = self._stop or self._done < self._flush_upto
        self._drain_inbox()          # after reading urgent: every op submitted before a flush() is pending now
        values = 0
        for op in self._pending:
            if op["op"] in BARRIERS:
                return False
            if op["op"] in METRIC_OPS:
                values += _n_values(op)
        left = until - time.monotonic()
        if urgent or values >= MAX_METRICS_PER_BATCH or left <= 0:
            return False
        try:
            op = self._inbox.get(timeout=left)
        except queue.Empty:
            return True
        if op is not None:
            self._pending.append(op)
        return True

    def _drain_inbox(self) -> int:
        n = 0
        while True:
            try:
                op = self._inbox.get_nowait()
            except queue.Empty:
                return n
            if op is not None:
                self._pending.append(op)
                n += 1

    def _replay_found(self) -> bool:
        """Send the found spill files (see _adopt_spills) before anything else, retrying while the server is down;
        False if the logger was closed meanwhile (the files stay for the next attempt)."""
        backoff = 0.25
        for path in self._found:
            while True:
                try:
                    replay_spill(path, client=self.client)
                    break
                except Exception as exc:  # noqa: BLE001 - transient: wait for the server, like every other op
                    self.failures += 1
                    log.info("replaying %s: %s", path, exc)
                    with self._cond:
                        stop = self._stop
                    if stop:
                        return False
                    if self._drain_inbox():
                        self._spill()
                    time.sleep(backoff)
                    backoff = min(self.max_backoff, backoff * 2)
        return True

    def _spill(self) -> bool:
        """Atomically rewrite the spill file with the run id (when known) and every pending operation. An OSError
        (a full or read-only disk) is logged once per streak and the operations stay queued in memory."""
        if self.spill_path is None:
            return False
        for _ in range(3):
            try:
                pending = list(self._pending)     # may race with the thread (close() after a join timeout)
                break
            except RuntimeError:
                time.sleep(0.01)
        else:
            return False
        ops = ([{"op": "bind", "run_id": self.run_id}] if self.run_id else []) + pending
        try:
            atomic_write(self.spill_path, "".join(json.dumps(op) + "\n" for op in ops))
        except OSError as exc:
            if not self._spill_failed:
                log.warning("cannot write the MLflow spill file %s (%s): %d operations stay queued in memory and "
                            "are sent when the server answers", self.spill_path, exc, len(ops))
            self._spill_failed = True
            return False
        if self._spill_failed:
            log.warning("MLflow spill file %s written again", self.spill_path)
        self._spill_failed = False
        return True


class _RunRef:
    """What execute() needs to know about a run when no RunLogger thread is involved (replay)."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.created = threading.Event()


def execute(client, op: dict, state: RunLogger | _RunRef) -> int:
    """Send one operation (one request, or a few for > 100 params or > 1000 metrics); returns the requests sent."""
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "bind":
        state.run_id = op["run_id"]
        state.created.set()
    elif kind == "create":
        exp_id = get_or_create_experiment(client, op["experiment"])
        tags = dict(op.get("tags") or {})
        if op.get("parent"):
            tags["mlflow.parentRunId"] = op["parent"]
        token = tags.get(CREATE_TOKEN_TAG)
        existing = _run_with_token(client, exp_id, token) if token and op.get("attempted") else None
        if existing is None:
            op["attempted"] = True      # a retry of this op (a timeout after the server made the run) looks first
            existing = client.create_run(exp_id, run_name=op.get("run_name"), tags=tags).info.run_id
        state.run_id = existing
        state.created.set()
    elif kind == "resume":      # continue an existing run (a retried trial)
        state.run_id = op["run_id"]
        client.update_run(op["run_id"], status="RUNNING")
        state.created.set()
    elif kind in METRIC_OPS:
        items = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in metric_items(op)]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            client.log_batch(state.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])
        return -(-len(items) // MAX_METRICS_PER_BATCH)
    elif kind == "params":
        items = [Param(k, str(v)[:6000]) for k, v in op["values"].items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(state.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
        return -(-len(items) // MAX_PARAMS_PER_BATCH)
    elif kind == "tags":
        client.log_batch(state.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in op["values"].items()])
    elif kind == "text":
        client.log_text(state.run_id, op["text"], op["file"])
    elif kind == "figure":
        fig = FIGURES[op["kind"]](**op["data"])
        client.log_text(state.run_id, figure_html(fig), op["file"])
    elif kind == "artifact":
        if not Path(op["path"]).exists():
            return 0
        client.log_artifact(state.run_id, op["path"], op.get("artifact_path"))
    elif kind == "table":
        client.log_table(state.run_id, op["data"], op["file"])
        return 3                                  # the file, a run read, the loggedArtifacts tag
    elif kind == "model":
        if not Path(op["dir"]).is_dir():
            return 0
        return log_model_dir(client, state.run_id, op["dir"], op.get("name", "model"), int(op.get("step", 0)),
                             op.get("tags"))
    elif kind == "backfill":      # a resumed run's checkpointed epochs that the run does not have yet
        have = {m.step for m in client.get_metric_history(state.run_id, op["key"])}
        items = [Metric(k, float(v), int(rec["ts"]), int(rec["step"])) for rec in op["records"]
                 if int(rec["step"]) not in have for k, v in rec["values"].items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            client.log_batch(state.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])
        return 1 + -(-len(items) // MAX_METRICS_PER_BATCH)
    elif kind == "terminate":
        client.set_terminated(state.run_id, status=op["status"])
    else:
        raise ValueError(f"unknown tracking operation {kind!r}")
    return 0 if kind == "bind" else 1


def log_model_dir(client, run_id: str, model_dir: str, name: str = "model", step: int = 0,
                  tags: Mapping[str, str] | None = None) -> int:
    """Upload a saved MLflow model folder as a LoggedModel of the run (create, upload, READY, link as the run's
    output), the MLflow 3 equivalent of ``mlflow.pyfunc.log_model`` without the fluent API's active run and without
    its per-metric history copy. Returns the requests made."""
    from mlflow.entities import LoggedModelOutput

    run = client.get_run(run_id)
    for m in (getattr(run.outputs, "model_outputs", None) or []):    # a replayed op: logged already
        if client.get_logged_model(m.model_id).name == name:
            return 1
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       tags=dict(tags or {}), model_type="mvfouls-multiview")
    client.log_model_artifacts(model.model_id, model_dir)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    client.set_tag(run_id, "mlflow_model_id", model.model_id)
    return 6


def _run_with_token(client, experiment_id: str, token: str) -> str | None:
    """The run a create op with this token made already (None if none): creates are not repeated."""
    found = client.search_runs([experiment_id], filter_string=f"tags.{CREATE_TOKEN_TAG} = '{token}'", max_results=1)
    return found[0].info.run_id if found else None


def read_spill(path: Path | str) -> list[dict]:
    """The operations of a spill file; a last line cut short (a writer killed mid-write) is left out."""
    ops = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: unreadable line left out", path)
    return ops


def replay_spill(path: Path | str, tracking_uri: str | None = None, client=None, checkpoint_every: int = 20) -> int:
    """Send the operations of a spill file (left by a run whose server was down, or by a dead worker), then delete
    it. Returns the operations sent.

    Idempotent: the file is rewritten as it goes (what is left, behind a ``bind`` to the run once it is known), so
    a replay that is interrupted and started again repeats at most ``checkpoint_every`` operations, and MLflow keeps
    one copy of a metric, param, tag or artifact sent twice; a run is created once (a create op carries a token
    tag, and a create whose run exists already binds to it). A transient error raises (the file keeps what is
    left); an operation MLflow refuses for good is dropped with a warning, as the live logger does."""
    path = Path(path)
    ops = read_spill(path)
    state = _RunRef()
    client = client or make_client(tracking_uri or DEFAULT_TRACKING_URI)
    for i, op in enumerate(ops):
        if op["op"] == "create":
            op = {**op, "attempted": True}          # look for the run a previous replay may have made
        try:
            execute(client, op, state)
        except Exception as exc:
            if _is_transient(exc):
                raise
            log.warning("replay of %s dropped %s: %s", path, op.get("op"), exc)
        done = i + 1
        if done < len(ops) and (op["op"] in BARRIERS or done % checkpoint_every == 0):
            rest = ([{"op": "bind", "run_id": state.run_id}] if state.run_id else []) + [
                o for o in ops[done:] if o["op"] != "bind" or not state.run_id]
            atomic_write(path, "".join(json.dumps(o) + "\n" for o in rest))
    path.unlink(missing_ok=True)
    return len(ops)


# ---- one run ------------------------------------------------------------------------------------------------
class RunTracker:
    """One MLflow run (a study's parent run or a trial's child run), logged through a RunLogger."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None,
                 parent_run_id: str | None = None, run_dir: Path | str | None = None,
                 resume_run_id: str | None = None, client=None, linger_s: float = DEFAULT_LINGER_S,
                 spill_path: Path | str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = client or make_client(tracking_uri)
        spill = Path(spill_path) if spill_path else (Path(run_dir) / SPILL_NAME if run_dir else None)
        self.logger = RunLogger(self.client, spill, linger_s=linger_s)
        if resume_run_id:       # the id is known at once; the RUNNING status is sent in order with the rest
            self.logger.run_id = resume_run_id
            self.logger.created.set()
            self.logger.submit({"op": "resume", "run_id": resume_run_id})
        else:
            tags = {**context_tags(), **(tags or {}), CREATE_TOKEN_TAG: uuid.uuid4().hex}
            self.logger.submit({"op": "create", "experiment": experiment, "run_name": run_name,
                                "tags": {k: str(v) for k, v in tags.items()}, "parent": parent_run_id})
        self.ended = False

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id

    def wait_run_id(self, timeout: float = 30.0) -> str | None:
        return self.logger.wait_run_id(timeout)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.logger.submit({"op": "params", "values": {k: jsonable(v) for k, v in params.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.logger.submit({"op": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        """One op for the whole dict (one epoch's >= 100 metrics), merged with its neighbours into few requests."""
        self.logger.submit({"op": "metrics", "step": int(step), "ts": int(time.time() * 1000),
                            "values": {k: float(v) for k, v in values.items()}})

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.logger.submit({"op": "text", "file": artifact_file, "text": json.dumps(data, indent=1, default=jsonable)})

    def log_plot(self, kind: str, artifact_file: str, **data: Any) -> None:
        """A figure of FIGURES[kind] built from plain data by the background thread (not the training thread)."""
        self.logger.submit({"op": "figure", "kind": kind, "file": artifact_file,
                            "data": json.loads(json.dumps(data, default=jsonable))})

    def log_figure(self, fig, artifact_file: str) -> None:
        """A plotly figure as a standalone HTML artifact (plotly.js from the CDN, like mlflow.log_figure)."""
        self.logger.submit({"op": "text", "file": artifact_file,
                            "text": figure_html(fig)})

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self.logger.submit({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        """Columns of equal length as an MLflow table artifact (``MlflowClient.log_table``: the UI lists and shows
        it as a table). Log a table once: a second call with the same file appends to it."""
        self.logger.submit({"op": "table", "file": artifact_file,
                            "data": json.loads(json.dumps(dict(data), default=jsonable))})

    def log_model(self, model_dir: Path | str, name: str = "model", step: int = 0,
                  tags: Mapping[str, Any] | None = None) -> None:
        """A saved MLflow model folder (``mlflow.pyfunc.save_model``) as the run's logged model ``name`` (an
        MLflow 3 LoggedModel linked to the run as an output at ``step``: ``models:/<model_id>``, and the run
        page's model list)."""
        self.logger.submit({"op": "model", "dir": str(Path(model_dir).resolve()), "name": name, "step": int(step),
                            "tags": {k: str(v) for k, v in (tags or {}).items()}})

    def flush(self, timeout: float = 60.0) -> bool:
        return self.logger.flush(timeout)

    def end(self, status: str = "FINISHED", error: BaseException | str | None = None,
            flush_timeout: float = 120.0, wait: bool = True) -> bool:
        """Set the final status (FINISHED, FAILED with the error as a tag, KILLED) and flush everything.

        wait=False: the flush (the last metrics, figures, artifacts, the status) goes on in a closing thread while
        the caller moves on (a study's next trial); `wait_closed()` waits for those threads, and runs at exit.
        Returns False when the server stayed unreachable (the spill file keeps the rest); True when not waiting.
        """
        if self.ended:
            return True
        assert status in TERMINAL_STATUSES, status
        if error is not None:
            text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            self.set_tags({"error": text[:4900]})
        self.logger.submit({"op": "terminate", "status": status})
        self.ended = True
        if wait:
            return self.logger.close(flush_timeout)
        closing = threading.Thread(target=self.logger.close, args=(flush_timeout,), name="mlflow-close",
                                   daemon=True)
        closing.start()
        closing.logger = self.logger     # type: ignore[attr-defined] - wait_closed spills what it could not send
        with _CLOSING_LOCK:
            _CLOSING.append(closing)
        return True


_CLOSING: list[threading.Thread] = []       # runs ended with wait=False that are still sending
_CLOSING_LOCK = threading.Lock()


def wait_closed(timeout: float = 120.0) -> None:
    """Wait until every run ended with ``end(wait=False)`` has sent everything; what a run could not send within
    ``timeout`` (all runs together) is written to its spill file before the process may exit (the thread is a
    daemon: without this, its operations would die with the process)."""
    deadline = time.monotonic() + timeout
    while True:
        with _CLOSING_LOCK:
            if not _CLOSING:
                return
            closing = _CLOSING.pop()
        closing.join(max(0.0, deadline - time.monotonic()))
        logger = getattr(closing, "logger", None)
        if closing.is_alive() and logger is not None and logger.backlog and logger._spill():
            log.warning("MLflow run %s: %d operations not sent in time, kept in %s", logger.run_id,
                        logger.backlog, logger.spill_path)


atexit.register(wait_closed)


# ---- figures ------------------------------------------------------------------------------------------------
def figure_html(fig) -> str:
    """A plotly figure as a standalone HTML page, plotly.js from the CDN with its integrity hash, as
    ``include_plotlyjs="cdn"`` writes it (like mlflow.log_figure). That option re-reads and re-hashes the 4.6 MB
    plotly.js bundle for every figure (~25 ms); the script tag is made once per process here instead."""
    url, integrity = _plotly_cdn()
    html = pio.to_html(fig, include_plotlyjs=url, full_html=True)
    return html.replace(f'src="{url}"></script>', f'src="{url}" integrity="{integrity}" crossorigin="anonymous">'
                        "</script>", 1)


@functools.cache
def _plotly_cdn() -> tuple[str, str]:
    """(URL, SRI hash) of the plotly.js build that plotly's "cdn" option links: the same as its HTML."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    digest = hashlib.sha256(get_plotlyjs().encode("utf-8")).digest()
    return (f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js",
            "sha256-" + base64.b64encode(digest).decode("ascii"))


def confusion_figure(matrices: Mapping[str, Any], title: str):
    """Side-by-side heatmaps of the confusion matrices (rows = true class, columns = predicted)."""

    keys = list(matrices)
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=keys, horizontal_spacing=0.15)
    for i, key in enumerate(keys, start=1):
        cm = np.asarray(matrices[key])
        names = _class_names(key, cm.shape[0])
        fig.add_trace(go.Heatmap(z=cm, x=names, y=names, text=cm, texttemplate="%{text}", colorscale="Blues",
                                 showscale=False), row=1, col=i)
        fig.update_yaxes(autorange="reversed", title_text="true", row=1, col=i)
        fig.update_xaxes(title_text="predicted", row=1, col=i)
    fig.update_layout(title=title, width=520 * len(keys), height=520)
    return fig


def _class_names(key: str, n: int) -> list[str]:
    for task, names in TASKS.items():
        if task in key and len(names) == n:
            return list(names)
    return [str(i) for i in range(n)]


def learning_curves_figure(history: list[dict[str, float]], title: str = "Learning curves"):
    """Losses, leaderboard and macro recalls per epoch, from the logged metric dicts."""

    groups = {"loss": ["train/loss", "val/loss"],
              "scores": ["val/leaderboard", "val/action/macro_recall", "val/severity/macro_recall",
                         "val/action/macro_f1", "val/severity/macro_f1"]}
    fig = make_subplots(rows=1, cols=2, subplot_titles=list(groups))
    steps = [h["_step"] for h in history]
    for col, keys in enumerate(groups.values(), start=1):
        for key in keys:
            ys = [h.get(key) for h in history]
            if any(y is not None for y in ys):
                fig.add_trace(go.Scatter(x=steps, y=ys, mode="lines+markers", name=key), row=1, col=col)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(title=title, width=1100, height=450)
    return fig


def class_distribution(data) -> dict[str, dict[str, list[int]]]:
    """{split: {task: counts per class}} from a DataBundle's labelled splits."""
    out: dict[str, dict[str, list[int]]] = {}
    for split in ("train", "valid", "test"):
        sa = getattr(data, split, None)
        if sa is None:
            continue
        out[split] = {task: np.bincount([getattr(a, task) for a in sa.actions if getattr(a, task) is not None],
                                        minlength=len(names)).astype(int).tolist()
                      for task, names in TASKS.items()}
    return out


def class_distribution_figure(dist: Mapping[str, Mapping[str, list[int]]]):

    fig = make_subplots(rows=1, cols=2, subplot_titles=("action", "severity"))
    for split, tasks in dist.items():
        for col, (task, names) in enumerate((("action", ACTION_CLASSES), ("severity", SEVERITY_CLASSES)), start=1):
            fig.add_trace(go.Bar(x=list(names), y=tasks[task], name=f"{split} {task}"), row=1, col=col)
    fig.update_layout(title="Class distribution", barmode="group", width=1200, height=450)
    return fig


def confusion_epochs_figure(epochs: Mapping[str, Any]):
    """The confusion matrices of every epoch in one figure, an epoch slider below (rows = true class)."""
    steps = sorted(epochs, key=int)
    if not steps:
        return go.Figure()
    tasks = list(epochs[steps[0]][1])
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, horizontal_spacing=0.15)
    for n, step in enumerate(steps):
        for col, task in enumerate(tasks, start=1):
            cm = np.asarray(epochs[step][1][task])
            names = _class_names(task, cm.shape[0])
            fig.add_trace(go.Heatmap(z=cm, x=names, y=names, text=cm, texttemplate="%{text}", colorscale="Blues",
                                     showscale=False, visible=n == len(steps) - 1), row=1, col=col)
    for col in range(1, len(tasks) + 1):
        fig.update_yaxes(autorange="reversed", title_text="true", row=1, col=col)
        fig.update_xaxes(title_text="predicted", row=1, col=col)
    k = len(tasks)
    slider = [{"label": f"{int(step) + 1} ({epochs[step][0]})", "method": "update",
               "args": [{"visible": [i // k == n for i in range(k * len(steps))]},
                        {"title": f"Confusion matrices, epoch {int(step) + 1} ({epochs[step][0]})"}]}
              for n, step in enumerate(steps)]
    fig.update_layout(title=f"Confusion matrices, epoch {int(steps[-1]) + 1} ({epochs[steps[-1]][0]})",
                      width=520 * k, height=600,
                      sliders=[{"active": len(steps) - 1, "currentvalue": {"prefix": "epoch "}, "steps": slider}])
    return fig


FIGURES = {"confusion": lambda matrices, title: confusion_figure(matrices, title),
           "confusion_epochs": lambda epochs: confusion_epochs_figure(epochs),
           "learning_curves": lambda history, title="Learning curves": learning_curves_figure(history, title),
           "class_distribution": lambda dist: class_distribution_figure(dist)}


# ---- the training sink --------------------------------------------------------------------------------------
class MLflowSink:
    """Sink (monitoring.Sink protocol) that logs DetailedMetrics records to one child run.

    log(record): all of ``record.to_mlflow()`` as one metrics op (step = epoch; the RunLogger merges the ops of
    consecutive epochs into few requests) and the epoch's confusion matrices as
    JSON. At each phase change and at close: confusion matrices of the phase's last epoch and the learning curves as
    plotly HTML. ``log_result(result)`` adds the best epoch's confusion matrices, summary metrics ``best/...``, the
    prediction files and the best checkpoint. ``close()`` flushes but does not end the run (``tracker.end`` does).
    """

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker
        self.history: list[dict[str, float]] = []
        self.confusion: dict[int, tuple[str, dict[str, list]]] = {}   # step -> (phase, task -> matrix)
        self.last = None
        self.log_s = 0.0          # time the training thread spent inside log()/close()

    def log(self, record) -> None:
        t0 = time.perf_counter()
        metrics = run_metrics(record.to_mlflow())
        step = int(record.step)   # global epoch index (record.epoch restarts at 0 in every phase)
        if self.last is not None and str(self.last.phase) != str(record.phase):
            self._phase_end(self.last)
        self.tracker.log_metrics(metrics, step=step)
        cms = getattr(record, "confusion_matrices", None) or {}
        if cms:
            matrices = {k: np.asarray(v).tolist() for k, v in cms.items()}
            self.tracker.log_dict(matrices, f"confusion/epoch_{step:03d}.json")
            self.confusion[step] = (str(record.phase), matrices)
        self.history.append({**metrics, "_step": step})
        self.last = record
        self.log_s += time.perf_counter() - t0

    def backfill(self, records: list) -> int:
        """Log the records of a resumed run that MLflow does not have yet (a worker killed after writing an epoch's
        checkpoint but before its metrics were sent). Steps already in the run are skipped, so nothing repeats."""
        if not records:
            return 0
        # one op, sent by the logger thread in order and retried like every other: it reads the run's history
        # there (also when the server is down now) and logs the missing steps only, so nothing is logged twice
        ts = int(time.time() * 1000)
        self.tracker.logger.submit({"op": "backfill", "key": f"{records[0].split}/leaderboard", "records": [
            {"step": int(r.step), "ts": ts, "values": {k: float(v) for k, v in run_metrics(r.to_mlflow()).items()
                                                       if v is not None and np.isfinite(float(v))}}
            for r in records]})
        missing = records
        if records:
            self.history = [{**run_metrics(r.to_mlflow()), "_step": int(r.step)} for r in records]
            self.confusion = {int(r.step): (str(r.phase), {k: np.asarray(v).tolist() for k, v in cms.items()})
                              for r in records if (cms := getattr(r, "confusion_matrices", None) or {})}
            self.last = records[-1]
        return len(missing)

    def _phase_end(self, record) -> None:
        cms = getattr(record, "confusion_matrices", None) or {}
        if cms:
            self.tracker.log_plot("confusion", f"confusion/{_slug(record.phase)}_end.html",
                                  matrices={k: np.asarray(v).tolist() for k, v in cms.items()},
                                  title=f"{record.phase}: epoch {record.step + 1}")
        if self.history:
            self.tracker.log_plot("learning_curves", "learning_curves.html", history=self.history)

    def log_result(self, result) -> None:
        """The run's final artifacts: best epoch confusion HTML, best/... metrics, predictions, checkpoint."""
        best = getattr(result, "best", None)
        if best is not None:
            step = int(best.step)
            self.tracker.log_metrics({f"best/{k}": v for k, v in run_metrics(best.to_mlflow()).items()}, step=step)
            self.tracker.set_tags({"best_epoch": step + 1, "best_phase": best.phase})
            cms = getattr(best, "confusion_matrices", None) or {}
            if cms:
                self.tracker.log_plot("confusion", "confusion/best.html",
                                      matrices={k: np.asarray(v).tolist() for k, v in cms.items()},
                                      title=f"best epoch {step + 1} ({best.phase})")
        parameters = getattr(result, "parameters", None) or {}
        if parameters:
            self.tracker.log_params({f"parameters_{k}": v for k, v in parameters.items()})
        for path in (getattr(result, "predictions", None) or {}).values():
            self.tracker.log_artifact(path, "predictions")
        checkpoint = getattr(result, "checkpoint", None)
        if checkpoint:
            self.tracker.log_artifact(checkpoint, "checkpoint")

    def close(self) -> None:
        t0 = time.perf_counter()
        if self.last is not None:
            self._phase_end(self.last)
            self.last = None
        if self.confusion:
            self.tracker.log_table(confusion_table(self.confusion), "confusion/confusion_matrices.json")
            self.tracker.log_plot("confusion_epochs", "confusion/per_epoch.html",
                                  epochs={str(k): v for k, v in sorted(self.confusion.items())})
            self.confusion = {}
        self.tracker.flush(timeout=0.0)   # non-blocking: the run is ended (and fully flushed) by tracker.end
        self.log_s += time.perf_counter() - t0


# Per-epoch values that are not compared as curves: the confusion matrix cells (80 series per epoch), the class
# supports (constant) and the predicted counts (the matrix's column sums). They go into one table per run
# (confusion/confusion_matrices.json) and a figure with an epoch slider (confusion/per_epoch.html) instead.
_TABLE_ONLY = ("/confusion/", "/support/", "/predicted/")


def run_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a run logs as series: DetailedMetrics.to_mlflow() without the table-only keys."""
    return {k: v for k, v in metrics.items() if not any(part in k for part in _TABLE_ONLY)}


def confusion_table(confusion: Mapping[int, tuple[str, Mapping[str, list]]]) -> dict[str, list]:
    """Long format of every epoch's confusion matrices: one row per (epoch, task, true class, predicted class)."""
    cols: dict[str, list] = {"epoch": [], "phase": [], "task": [], "true_class": [], "predicted_class": [],
                             "count": []}
    for step, (phase, matrices) in sorted(confusion.items()):
        for task, cm in matrices.items():
            cm = np.asarray(cm)
            names = _class_names(task, cm.shape[0])
            for i, true_name in enumerate(names):
                for j, pred_name in enumerate(names):
                    for col, value in zip(cols, (step + 1, phase, task, true_name, pred_name, int(cm[i, j]))):
                        cols[col].append(value)
    return cols


def _slug(value: Any) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(value)).strip("_").lower() or "phase"


# ---- CLI: replay a spill file -------------------------------------------------------------------------------
def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mvfouls_ab.tracking",
                                 description="Replay MLflow operations a run could not send.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay", help="send a run folder's mlflow_spill.jsonl")
    rp.add_argument("spill", type=Path)
    rp.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    args = ap.parse_args(list(argv) if argv is not None else None)
    if not args.spill.is_file():
        print(f"StudyError: {located(args.spill, 'spill file not found', 'pass <run_dir>/' + SPILL_NAME)}",
              file=sys.stderr)
        return 2
    n = replay_spill(args.spill, args.tracking_uri)
    print(f"replayed {n} operations to {args.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
