"""One MLflow run (RunTracker: every call returns at once, a background RunLogger sends), the runs still sending
at exit, and the one claim protocol for runs several workers may create at the same time (the study's parent run,
an A/B experiment's parent and arm runs)."""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..fsutil import jsonable
from ..reporting.figures import figure_html  # imports plotly in this (the main) thread
from .client import make_client
from .logger import CREATE_TOKEN_TAG, DEFAULT_LINGER_S, SPILL_NAME, TERMINAL_STATUSES, RunLogger
from .provenance import context_tags

log = logging.getLogger(__name__)


def claim_run(study: Any, key: str, run_id: str, discard: Callable[[str], None] | None = None,
              settle_s: float = 1.0) -> str:
    """The one claim protocol for runs that several workers may create at the same time (the study's parent run,
    an A/B experiment's parent and arm runs): the run every one of them adopts is the first claim written.

    Each worker claims its new run under the same Optuna study user attribute ``key``, written only when absent;
    Optuna's RDB storage inserts an attribute once (a racing insert's IntegrityError is ignored), so the first
    claim stays. Only a claim that found the key absent microseconds before another's commit can overwrite it;
    reading back after ``settle_s``, until two reads agree (a loaded machine can delay a racing write), makes every
    worker see the last write. A loser passes its own run to
    ``discard`` (end and delete it), so no orphaned run is left RUNNING. Returns the winner's run id.
    """
    wrote = key not in study.user_attrs
    if wrote:
        study.set_user_attr(key, run_id)
        time.sleep(settle_s)
    winner = study.user_attrs[key]
    for _ in range(5 if wrote else 0):      # a racing write may land late on a loaded machine: read until stable
        time.sleep(settle_s / 2)
        again = study.user_attrs[key]
        if again == winner:
            break
        winner = again
    if winner != run_id and discard is not None:
        with contextlib.suppress(Exception):     # best effort: the run is unused either way
            discard(run_id)
    return winner


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
        self.logger.keep_until_sent()    # a worker killed while the run is still sending leaves the rest on disk
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
