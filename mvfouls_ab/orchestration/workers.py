"""The one launcher of worker processes: ``--workers N`` of the study and of the A/B runner.

A worker is ``python -m <module> <argv>``, the same command a user would start in another shell. URLs that hold a
password reach the workers through the environment (``MVFOULS_STORAGE``, ``MVFOULS_TRACKING_URI``: see urls.py),
never their argv, which ``ps`` shows to every user. A SIGTERM to this process is passed on to them
(shutdown.forward_to). With ``stdin=True`` each worker reads one line from its stdin when it needs it
(:func:`hand_over`: the study's parent run id, written once the coordinator has made it).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from .. import shutdown
from ..urls import password_of


def child_env(urls: Mapping[str, str | None]) -> dict[str, str]:
    """This process's environment plus, for each (variable, URL) whose URL holds a password, variable=URL."""
    env = dict(os.environ)
    for var, url in urls.items():
        if url and password_of(url):
            env[var] = url
    return env


def start_workers(module: str, argvs: Sequence[Sequence[str]], env: Mapping[str, str] | None = None,
                  stdin: bool = False) -> list[subprocess.Popen]:
    """One ``python -m module *argv`` process per argv, signals forwarded; ``stdin``: a pipe for hand_over."""
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv], stdin=subprocess.PIPE if stdin else None,
                              text=True, env=dict(env) if env is not None else None) for argv in argvs]
    shutdown.forward_to(p.pid for p in procs)
    return procs


def hand_over(procs: Sequence[subprocess.Popen], line: str | None) -> None:
    """Write ``line`` to each worker's stdin and close it (None: close it only, the worker then stops)."""
    for proc in procs:
        with contextlib.suppress(OSError), proc.stdin:   # a worker that ended already: its error is on stderr
            if line:
                proc.stdin.write(f"{line}\n")


def read_handed_over() -> str | None:
    """In a worker: the line its coordinator handed over, or None when the coordinator closed stdin first."""
    return sys.stdin.readline().strip() or None


def wait_all(procs: Sequence[subprocess.Popen], timeout: float | None = None) -> list[int | None]:
    """Every worker's exit code (None for one still running after ``timeout`` seconds)."""
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes
