"""The session fixture `native_stack`: the docker-compose stack started natively by tracking/stack.py.

PostgreSQL on 127.0.0.1:5432 (fresh, uniquely named MLflow and Optuna databases, dropped afterwards), a real
`mlflow server`, `optuna-dashboard` and two study workers on a tiny data set (real mp4 clips). While the study runs,
worker 1 is killed with SIGKILL mid-trial, after its trial has checkpointed at least one epoch; the surviving worker
notices the stale heartbeat, retries the trial (resuming from the checkpoint) and finishes the study.
tests/test_stack.py checks the outcome through the servers' HTTP APIs; tests/test_notebooks.py runs the notebooks
against the same stores. Registered in conftest.py so both modules share one stack.
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TRIALS = 4
EPOCHS = (1, 6, 1)          # per phase: one trial runs 8 short epochs, long enough to be killed in the middle
SEARCH_SPACE = f"""
fixed: {{num_phases: 3, phase1_epochs: {EPOCHS[0]}, phase2_epochs: {EPOCHS[1]}, phase3_epochs: {EPOCHS[2]},
        batch_size: 4, hidden_dim: 32, posthoc_adjust: false}}
params:
  variant: {{type: categorical, choices: [simplified, optimized]}}
  loss: {{type: categorical, choices: [weighted_ce, focal]}}
  dropout: {{type: float, low: 0.0, high: 0.3}}
  phase2_lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
"""
EPOCH_LINE = re.compile(r"^\[\S+ \d+/\d+ \| (\d+)/(\d+)\]", re.MULTILINE)
TRIAL_LINE = re.compile(r"^trial (\d+)\b.*$", re.MULTILINE)


def load_stack():
    spec = importlib.util.spec_from_file_location("mvfouls_stack", ROOT / "tracking" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NativeStack:
    module: object            # tracking/stack.py
    state: dict
    directory: Path
    study_name: str
    storage: str
    tracking_uri: str
    dashboard_url: str
    trials: int
    epochs_per_trial: int
    killed_trial: int         # the trial worker 1 was running when it was killed
    killed_after: int         # epochs that trial had reported (and checkpointed) before the kill
    elapsed_s: float


def kill_mid_trial(stack, worker: dict, timeout: float = 240.0) -> tuple[int, int]:
    """SIGKILL the worker's process group once its current trial has finished >= 1 epoch but not the last two."""
    log = Path(worker["log"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        trials = list(TRIAL_LINE.finditer(text))
        if trials:
            current = trials[-1]
            epochs = [(int(m.group(1)), int(m.group(2))) for m in EPOCH_LINE.finditer(text, current.end())]
            if epochs and 1 <= epochs[-1][0] <= epochs[-1][1] - 2:
                os.killpg(worker["pgid"], signal.SIGKILL)
                return int(current.group(1)), epochs[-1][0]
        if not stack.alive(worker):
            raise AssertionError(f"worker 1 ended before it could be killed mid-trial:\n{stack.tail(log)}")
        time.sleep(0.02)
    raise AssertionError(f"worker 1 did not reach the middle of a trial in {timeout:.0f} s:\n{stack.tail(log)}")


@pytest.fixture(scope="session")
def native_stack(tmp_path_factory: pytest.TempPathFactory):
    import psycopg2
    from conftest import make_tiny_dataset

    try:
        psycopg2.connect(PG_URL, connect_timeout=5).close()
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL} ({exc}); start it (see .ci/run)")
    stack = load_stack()
    root = tmp_path_factory.mktemp("native_stack")
    data = make_tiny_dataset(root / "data")
    space = root / "search_space.yaml"
    space.write_text(SEARCH_SPACE)
    tag = uuid.uuid4().hex[:10]
    study_name = f"stack-{tag}"
    env = {**os.environ, "MVFOULS_AB_CACHE": str(root / "cache")}
    t0 = time.monotonic()
    state = stack.up(root / "stack", workers=2, pg_url=PG_URL, mlflow_db=f"stk_{tag}_mlflow",
                     optuna_db=f"stk_{tag}_optuna", mlflow_port=free_port(), dashboard_port=free_port(),
                     study_name=study_name, trials=TRIALS, profile="cpu", data=str(data), worker_threads=1,
                     worker_args=["--search-space", str(space), "--heartbeat", "1", "--pruner", "none"], env=env)
    try:
        workers = [s for s in state["services"] if s["name"].startswith("worker")]
        killed_trial, killed_after = kill_mid_trial(stack, workers[0])
        deadline = time.monotonic() + 240
        while stack.alive(workers[1]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not stack.alive(workers[1]), f"worker 2 did not finish the study:\n{stack.tail(workers[1]['log'])}"
        yield NativeStack(stack, state, root / "stack", study_name, state["storage"], state["tracking_uri"],
                          state["urls"]["dashboard"], TRIALS, sum(EPOCHS), killed_trial, killed_after,
                          time.monotonic() - t0)
    finally:
        stack.down(root / "stack", drop=True, pg_url=PG_URL)
