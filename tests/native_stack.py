"""The session fixture `native_stack`: the docker-compose stack started natively by tracking/stack.py.

PostgreSQL on 127.0.0.1:5432 (fresh, uniquely named MLflow and Optuna databases, each with a role of its own,
dropped afterwards), a real `mlflow server` published on 127.0.0.2 as if it were another machine's address (extra
allowed host names, MLflow's basic-auth app on), the Optuna dashboard behind its Host check, and two study workers
on a tiny data set (real mp4 clips). The admin URL carries a (percent-encoded) password that trust auth ignores:
it, the roles' passwords and MLflow's admin password must never show in `ps` (snapshot taken while all run).

While the study runs, worker 1 is killed with SIGKILL mid-trial, after its trial has checkpointed at least one
epoch; then worker 2 gets SIGTERM mid-trial (a trial that is not a retry): it stops after the epoch's checkpoint,
hands its trial back and exits. A third worker (started like the stack's, recorded in its state) retries both
trials, resuming each from its checkpoint, and finishes the study. tests/test_stack.py checks the outcome through
the servers' HTTP APIs; tests/test_notebooks.py runs the notebooks against the same stores. Registered in
conftest.py so both modules share one stack.
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
# what a user with a password would pass (trust auth on the test server ignores it); %40 is "@"
ADMIN_PASSWORD = "Adm1n@Secret-pw"
PG_URL_WITH_PASSWORD = "postgresql://postgres:Adm1n%40Secret-pw@127.0.0.1:5432/postgres"
REMOTE_HOST = "127.0.0.2"        # a second loopback address standing in for another machine's
EXTRA_HOSTS = "tracking.lan,tracking.lan:*"
MLFLOW_ADMIN_PASSWORD = "mlflow-Adm1n-test-pw"
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
TRIAL_LINE = re.compile(r"^trial (\d+)(?: \(retry of \d+\))?:.*$", re.MULTILINE)   # a trial starts


def load_stack():
    spec = importlib.util.spec_from_file_location("mvfouls_stack", ROOT / "tracking" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
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
    stopped_trial: int = -1   # the trial worker 2 was running when it got SIGTERM
    stopped_after: int = 0    # epochs it had reported then
    stopped_rc: int | None = None      # worker 2's exit status
    secrets: tuple[str, ...] = ()      # passwords that must never show on a command line
    ps_snapshot: str = ""              # `ps -eo args` while every service and both workers ran
    auth: tuple[str, str] = ("", "")   # MLflow user and password (basic-auth app)


def current_trial(text: str) -> tuple[int, int, int, bool] | None:
    """(trial number, epochs reported, epochs in the trial, retry?) of the last trial a worker log shows."""
    trials = list(TRIAL_LINE.finditer(text))
    if not trials:
        return None
    current = trials[-1]
    epochs = [(int(m.group(1)), int(m.group(2))) for m in EPOCH_LINE.finditer(text, current.end())]
    done, total = epochs[-1] if epochs else (0, 0)
    return int(current.group(1)), done, total, "retry of" in current.group(0)


def signal_mid_trial(stack, worker: dict, sig: int = signal.SIGKILL, timeout: float = 240.0,
                     retries_too: bool = True) -> tuple[int, int]:
    """Send `sig` to the worker's process group once its current trial has finished >= 1 epoch but not the last
    two (and, unless retries_too, is not a retry)."""
    log = Path(worker["log"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = current_trial(log.read_text(errors="replace") if log.exists() else "")
        if found:
            number, done, total, retry = found
            if 1 <= done <= total - 2 and (retries_too or not retry):
                os.killpg(worker["pgid"], sig)
                return number, done
        if not stack.alive(worker):
            raise AssertionError(f"{worker['name']} ended before it got {signal.Signals(sig).name} mid-trial:\n"
                                 f"{stack.tail(log)}")
        time.sleep(0.02)
    raise AssertionError(f"{worker['name']} did not reach the middle of a trial in {timeout:.0f} s:\n"
                         f"{stack.tail(log)}")


def kill_mid_trial(stack, worker: dict, timeout: float = 240.0) -> tuple[int, int]:
    """SIGKILL the worker's process group once its current trial has finished >= 1 epoch but not the last two."""
    return signal_mid_trial(stack, worker, signal.SIGKILL, timeout)


def wait_exit(stack, worker: dict, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while stack.alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not stack.alive(worker), f"{worker['name']} did not stop:\n{stack.tail(worker['log'])}"


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
    env = {**os.environ, "MVFOULS_AB_CACHE": str(root / "cache"), "MLFLOW_ADMIN_PASSWORD": MLFLOW_ADMIN_PASSWORD}
    directory = root / "stack"
    worker_args = ["--search-space", str(space), "--heartbeat", "1", "--pruner", "none"]
    t0 = time.monotonic()
    state = stack.up(directory, workers=2, pg_url=PG_URL_WITH_PASSWORD, mlflow_db=f"stk_{tag}_mlflow",
                     optuna_db=f"stk_{tag}_optuna", host=REMOTE_HOST, mlflow_port=free_port(REMOTE_HOST),
                     dashboard_port=free_port(REMOTE_HOST), study_name=study_name, trials=TRIALS, profile="cpu",
                     data=str(data), worker_threads=1, worker_args=worker_args, env=env,
                     extra_allowed_hosts=EXTRA_HOSTS, auth="on")
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSFILE")}
    # this process (and the notebooks' kernels) read the stores as the workers do: credentials in the environment
    os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": MLFLOW_ADMIN_PASSWORD,
                       "PGPASSFILE": str(directory / "pgpass")})
    try:
        import subprocess

        ps_snapshot = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
        pgpass = (directory / "pgpass").read_text().splitlines()
        secrets = (ADMIN_PASSWORD, "Adm1n%40Secret-pw", MLFLOW_ADMIN_PASSWORD,
                   *[line.rsplit(":", 1)[1] for line in pgpass])
        workers = [s for s in state["services"] if s["name"].startswith("worker")]
        killed_trial, killed_after = kill_mid_trial(stack, workers[0])
        # worker 2: SIGTERM in the middle of a trial of its own; it hands the trial back and exits
        stopped_trial, stopped_after = signal_mid_trial(stack, workers[1], signal.SIGTERM, retries_too=False)
        wait_exit(stack, workers[1])
        stopped_rc = _exit_status(Path(workers[1]["log"]))
        # a third worker, started as the stack starts its workers, takes both trials back and ends the study
        cmd = stack.worker_command(state["storage"], state["tracking_uri"], study_name, TRIALS, "cpu", str(data),
                                   str(directory / "runs"), 1, worker_args)
        worker_env = {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                      "PGPASSFILE": str(directory / "pgpass"), "MLFLOW_TRACKING_USERNAME": "admin",
                      "MLFLOW_TRACKING_PASSWORD": MLFLOW_ADMIN_PASSWORD}
        third = stack.spawn("worker-3", cmd, directory / "logs" / "worker-3.log", worker_env)
        state["services"].append(third)
        stack.write_state(directory, state)
        wait_exit(stack, third, timeout=300)
        yield NativeStack(stack, state, directory, study_name, state["storage"], state["tracking_uri"],
                          state["urls"]["dashboard"], TRIALS, sum(EPOCHS), killed_trial, killed_after,
                          time.monotonic() - t0, stopped_trial, stopped_after, stopped_rc, secrets, ps_snapshot,
                          ("admin", MLFLOW_ADMIN_PASSWORD))
    finally:
        stack.down(directory, drop=True, pg_url=PG_URL)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _exit_status(log: Path) -> int | None:
    """Worker 2's way out, as its log tells it: 143 when it stopped on SIGTERM (the study prints 'stopped on')."""
    text = log.read_text(errors="replace")
    return 143 if "stopped on SIGTERM" in text else None
