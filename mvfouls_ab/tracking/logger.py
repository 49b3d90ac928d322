"""The ordered, retrying background logger of one MLflow run (RunLogger), its spill file and replay.

See the package docstring for what happens while the server is unreachable."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write
from ..reporting.figures import FIGURES, figure_html  # imports plotly in this (the main) thread
from .client import DEFAULT_TRACKING_URI, get_or_create_experiment, make_client

log = logging.getLogger(__name__)

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
        self._write_ahead = False    # keep_until_sent(): pending operations stay in the spill file until sent
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

    def keep_until_sent(self) -> None:
        """Write-ahead for a run ended without waiting (RunTracker.end(wait=False): a study's next trial trains
        while the last one's figures, artifacts and status are sent): from now on the thread keeps the pending
        operations in the spill file until every one is sent, then deletes it. A worker killed meanwhile leaves
        them for a replay (the study's recover_spills; replays are idempotent)."""
        self._write_ahead = True
        self._inbox.put(None)        # wake the thread: it writes the spill file before it sends anything else

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
        ahead_written = False        # the spill file holds every pending operation (write-ahead)
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
            elif self._write_ahead and (arrived or not ahead_written):
                ahead_written = self._spill()
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
                if not self._pending and (failing or self._write_ahead):
                    failing = ahead_written = False
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
