"""Graceful stop: SIGTERM / SIGINT ask a worker to stop at the next safe point; a second signal stops it at once.

``docker compose stop``, scaling workers down and ``tracking/stack.py down`` send SIGTERM; Ctrl-C sends SIGINT.
After :func:`install`, the first of them only sets a flag (:func:`requested`); the training loop looks at it once per
epoch, after the epoch's checkpoint is written and its metrics are handed to MLflow, and raises :class:`GracefulStop`.
The study catches it, flushes MLflow and hands the trial back to the study (another worker resumes it from that
checkpoint, with the same parameters and the same MLflow run). A second signal raises KeyboardInterrupt wherever the
process is (stop now; the trial is still handed back, from its last checkpoint).

:class:`StopSink` is a training sink that raises GracefulStop when a stop was requested: placed last among the
sinks, it is called after the checkpoint is written and after the other sinks have the record.

``GracefulStop`` derives from KeyboardInterrupt, not Exception: code that swallows a failing sink's or step's
Exception (tracking.sinks.TrainingMonitor, the trainer's OOM handling, Optuna's ``catch``) lets it through, and everything that
cleans up on Ctrl-C cleans up on it too.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_requested = threading.Event()
_signal_received: int | None = None
_forward: list[int] = []          # child process ids that get the same signal (a coordinator's workers)
_installed = False


class GracefulStop(KeyboardInterrupt):
    """Raised at a safe point (an epoch's checkpoint written and logged) after a stop was requested."""

    def __init__(self, message: str = "stop requested", signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum if signum is not None else _signal_received


def _handler(signum: int, frame: Any) -> None:
    global _signal_received
    if signum == signal.SIGTERM:      # Ctrl-C's SIGINT reaches the whole process group already
        for pid in _forward:
            try:
                os.kill(pid, signum)
            except OSError:
                pass
    if _requested.is_set():                 # the second signal: stop now
        raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
    _signal_received = signum
    _requested.set()
    print(f"{signal.Signals(signum).name} received: stopping after the current epoch's checkpoint "
          "(send it again to stop at once)", file=sys.stderr, flush=True)


def install(signals: Iterable[int] = STOP_SIGNALS) -> None:
    """Route the stop signals to the flag (main thread only; a no-op elsewhere)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        signal.signal(sig, _handler)
    _installed = True


def uninstall() -> None:
    """Back to Python's defaults (SIGINT -> KeyboardInterrupt, SIGTERM -> terminate) and a cleared flag."""
    global _installed
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _installed = False
    reset()


def installed() -> bool:
    return _installed


def requested() -> bool:
    """True once a stop signal has arrived (or :func:`request` was called)."""
    return _requested.is_set()


def request(signum: int = signal.SIGTERM) -> None:
    """Ask for a graceful stop from inside the process (tests, a failure budget)."""
    global _signal_received
    _signal_received = signum
    _requested.set()


def reset() -> None:
    global _signal_received
    _requested.clear()
    _signal_received = None
    _forward.clear()


def signal_received() -> int | None:
    return _signal_received


def forward_to(pids: Iterable[int]) -> None:
    """Pass every later SIGTERM on to these processes too (a coordinator's worker children; `docker stop` signals
    PID 1 only, while a terminal's Ctrl-C reaches the whole process group by itself)."""
    _forward.extend(int(p) for p in pids)


def check(where: str = "") -> None:
    """Raise GracefulStop if a stop was requested."""
    if _requested.is_set():
        raise GracefulStop(f"stop requested{f' ({where})' if where else ''}")


def exit_code() -> int:
    """128 + the signal's number, as a shell reports a process ended by that signal (130 for SIGINT)."""
    return 128 + int(_signal_received or signal.SIGINT)


class StopSink:
    """A training sink that raises GracefulStop after an epoch's record when a stop was requested. Put it last:
    the trainer calls the sinks after writing the epoch's checkpoint, so the stop loses no finished epoch."""

    def log(self, record: Any) -> None:
        if _requested.is_set():
            raise GracefulStop(f"stop requested; epoch {int(getattr(record, 'step', -1)) + 1} is checkpointed")

    def close(self) -> None:
        return None
