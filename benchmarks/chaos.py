"""A chaos run: a 2-worker study on PostgreSQL with a real MLflow server, disturbed the way production disturbs it.

    python benchmarks/chaos.py [--trials 8] [--epochs 1 5 2] [--outage 30] [--outage-kind stop|freeze]
                               [--data DIR] [--scale 0.05] [--no-baseline] [--set KEY=VALUE ...] [--json OUT]

Set-up: fresh PostgreSQL databases on 127.0.0.1:5432 (Optuna storage, MLflow store), `mlflow server` on loopback,
the same fixed trials enqueued (half `simplified`, half `optimized`, pruning off), and two workers
(`python -m mvfouls_ab.study --until TRIALS --spill-dir SPILL`) under a supervisor that, like docker compose's
`restart: on-failure:5` (or an autoscaler putting capacity back), starts a new worker in a slot whose worker died
or was stopped. MLflow spill files go to SPILL, a 256 KiB tmpfs (a size-limited loop file or a read-only folder
where tmpfs cannot be mounted).

While the study runs, in this order:
  1. SIGKILL worker 1 in the middle of a trial (>= 1 epoch checkpointed);
  2. SIGTERM worker 2 in the middle of a trial (it must finish the epoch, hand the trial back and exit 143);
  3. stop the MLflow server for --outage seconds, and fill the spill folder's disk when it goes down
     (--outage-kind stop: the server process ends and a new one starts on the same port and stores, so requests are
     refused; freeze: SIGSTOP / SIGCONT, so requests hang until the client's timeout).

At the end it prints: trials finished / requested, trials lost (failed with no finished retry, or left running or
waiting), MLflow runs left RUNNING, epochs whose metrics are missing or duplicated in MLflow (per finished trial,
`val/leaderboard` must hold each epoch's step exactly once), and the wall time against an undisturbed run of the
same trials (--no-baseline skips it). Target: every requested trial finished, 0 lost, 0 RUNNING, 0 missing,
0 duplicated. tests/test_chaos.py runs it at a small size.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
SPACE = """
fixed: {{num_phases: 3, phase1_epochs: {e1}, phase2_epochs: {e2}, phase3_epochs: {e3}, curriculum: false,
        batch_size: 8, hidden_dim: 32, posthoc_adjust: false}}
params:
  variant: {{type: categorical, choices: [simplified, optimized]}}
  phase2_lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
"""
EPOCH_LINE = re.compile(r"^\[\S+ \d+/\d+ \| (\d+)/(\d+)\]", re.MULTILINE)
TRIAL_LINE = re.compile(r"^trial (\d+)(?: \(retry of \d+\))?:.*$", re.MULTILINE)   # a trial starts
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
MAX_RESTARTS = 5                    # per slot, as restart: on-failure:5


# ---- PostgreSQL, MLflow server, spill disk ----------------------------------------------------------------------
def admin(sql: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(sql))
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on loopback in its own process group; stop() and start() keep the port and the stores."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend, self.workdir, self.port = backend, workdir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.workdir / "mlflow.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", self.backend, "--serve-artifacts", "--artifacts-destination",
                 str(self.workdir / "artifacts"), "--workers", "1"],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {self.workdir / 'mlflow.log'}")
            try:
                with DIRECT.open(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


class SpillDisk:
    """A tiny file system for the spill files that can be filled up: tmpfs (root), else a loop file, else a folder
    that is made unwritable (read-only bind mount, or for non-root a mode 0555 folder)."""

    def __init__(self, path: Path, size_kb: int = 256) -> None:
        self.path, self.kind = path, "folder"
        path.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True, check=False).returncode == 0:
            self.kind = "tmpfs"

    def fill(self) -> str:
        if self.kind == "tmpfs":
            with contextlib.suppress(OSError), open(self.path / ".filler", "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            return f"tmpfs {self.path} filled (no space left)"
        if subprocess.run(["mount", "--bind", "-o", "ro", str(self.path), str(self.path)], capture_output=True,
                          check=False).returncode == 0:
            self.kind = "ro-bind"
            return f"{self.path} remounted read-only"
        os.chmod(self.path, 0o555)
        return f"{self.path} made read-only (mode 0555)"

    def close(self) -> None:
        if self.kind in ("tmpfs", "ro-bind"):
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o755)


# ---- workers ------------------------------------------------------------------------------------------------------
@dataclass
class Slot:
    index: int
    proc: subprocess.Popen | None = None
    log: Path | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)
    done: bool = False


def current_trial(log: Path) -> tuple[int, int, int, bool] | None:
    """(trial, epochs reported, epochs in the trial, retry?) of the last trial the worker log shows."""
    text = log.read_text(errors="replace") if log and log.exists() else ""
    trials = list(TRIAL_LINE.finditer(text))
    if not trials:
        return None
    current = trials[-1]
    epochs = [(int(m.group(1)), int(m.group(2))) for m in EPOCH_LINE.finditer(text, current.end())]
    done, total = epochs[-1] if epochs else (0, 0)
    return int(current.group(1)), done, total, "retry of" in current.group(0)


class Supervisor:
    def __init__(self, cmd: list[str], env: dict[str, str], logs: Path, slots: int = 2) -> None:
        self.cmd, self.env, self.logs = cmd, env, logs
        self.slots = [Slot(i) for i in range(slots)]
        self.events: list[str] = []
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f} s] {text}"
        self.events.append(line)
        print(line, flush=True)

    def start(self, slot: Slot) -> None:
        slot.starts += 1
        slot.log = self.logs / f"worker{slot.index + 1}-{slot.starts}.log"
        with open(slot.log, "wb") as log:
            slot.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)

    def poll(self) -> None:
        """Restart a slot whose worker ended with an error (at most MAX_RESTARTS times); 0 means the study is done."""
        for slot in self.slots:
            if slot.proc is None or slot.done or slot.proc.poll() is None:
                continue
            rc = slot.proc.returncode
            slot.exits.append(rc)
            if rc == 0:
                slot.done = True
                self.note(f"worker {slot.index + 1}.{slot.starts} finished (exit 0)")
            elif slot.starts > MAX_RESTARTS:
                slot.done = True
                self.note(f"worker {slot.index + 1}.{slot.starts} exit {rc}: no restarts left")
            else:
                self.note(f"worker {slot.index + 1}.{slot.starts} exit {rc}: restarted")
                self.start(slot)

    def running(self) -> bool:
        return not all(s.done for s in self.slots)

    def signal_mid_trial(self, slot: Slot, sig: int, own_trial: bool, timeout: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            found = current_trial(slot.log)
            if found and slot.proc.poll() is None:
                number, done, total, retry = found
                if 1 <= done <= total - 1 and not (own_trial and retry):
                    os.killpg(slot.proc.pid, sig)
                    self.note(f"{signal.Signals(sig).name} worker {slot.index + 1}.{slot.starts} in trial {number} "
                              f"after {done}/{total} epochs")
                    return number, done
            time.sleep(0.05)
        raise RuntimeError(f"worker {slot.index + 1} did not reach the middle of a trial in {timeout:.0f} s")

    def stop_all(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(slot.proc.pid, signal.SIGKILL)
                slot.proc.wait()


# ---- one run --------------------------------------------------------------------------------------------------------
def fixed_trials(n: int) -> list[dict]:
    return [{"variant": ("simplified", "optimized")[i % 2], "phase2_lr": 10 ** (-3 + i / max(n, 1))} for i in range(n)]


def run_study(tmp: Path, data: str, space: Path, trials: int, epochs: int, cache: Path, chaos: bool,
              outage: float, timeout: float = 1800.0, outage_kind: str = "stop", sets: list[str] | None = None) -> dict:
    import optuna

    tag = uuid.uuid4().hex[:8]
    dbs = (f"chaos_{tag}_optuna", f"chaos_{tag}_mlflow")
    for db in dbs:
        admin(f'CREATE DATABASE "{db}"')
    storage = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{dbs[0]}"
    workdir = tmp / ("chaos" if chaos else "baseline")
    (workdir / "logs").mkdir(parents=True)
    server = Server(f"postgresql+psycopg2://postgres@127.0.0.1:5432/{dbs[1]}", workdir)
    disk = SpillDisk(workdir / "spill") if chaos else None
    sup = None
    try:
        server.start()
        study = optuna.create_study(study_name="chaos", storage=storage, direction="maximize")
        for params in fixed_trials(trials):
            study.enqueue_trial(params)
        cmd = [sys.executable, "-m", "mvfouls_ab.study", "--study-name", "chaos", "--storage", storage,
               "--tracking-uri", server.url, "--until", str(trials), "--data", data, "--search-space", str(space),
               "--pruner", "none", "--heartbeat", "1", "--threads", "1", "--out", str(workdir / "runs"),
               "--set", f"cache_dir={cache}", *(sets or [])]
        if disk is not None:
            cmd += ["--spill-dir", str(disk.path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MVFOULS_AB_CACHE": str(cache)}
        sup = Supervisor(cmd, env, workdir / "logs")
        t0 = time.monotonic()
        sup.start(sup.slots[0])
        sup.start(sup.slots[1])
        killed = stopped = None
        if chaos:
            killed = sup.signal_mid_trial(sup.slots[0], signal.SIGKILL, False, timeout)
            stopped = sup.signal_mid_trial(sup.slots[1], signal.SIGTERM, False, timeout)
            stopping = sup.slots[1].proc
            stop_rc = stopping.wait(120)
            sup.note(f"worker 2 stopped with exit {stop_rc} (143: SIGTERM, trial handed back)")
            sup.poll()
            if outage_kind == "freeze":
                os.killpg(server.proc.pid, signal.SIGSTOP)
            else:
                server.stop()
            sup.note(f"MLflow server {'frozen' if outage_kind == 'freeze' else 'down'} for {outage:.0f} s; "
                     f"{disk.fill()}")
            deadline = time.monotonic() + outage
            while time.monotonic() < deadline:
                sup.poll()
                time.sleep(0.2)
            if outage_kind == "freeze":
                os.killpg(server.proc.pid, signal.SIGCONT)
            else:
                server.start()
            sup.note("MLflow server up again")
        deadline = t0 + timeout
        while sup.running() and time.monotonic() < deadline:
            sup.poll()
            time.sleep(0.2)
        wall = time.monotonic() - t0
        if sup.running():
            raise RuntimeError(f"the study did not finish within {timeout:.0f} s; logs in {workdir / 'logs'}")
        result = check(storage, server.url, trials, epochs)
        result.update({"wall_s": round(wall, 1), "events": sup.events, "restarts": sum(s.starts - 1 for s in sup.slots),
                       "spill_disk": disk.kind if disk else None,
                       "sigterm_exit": stop_rc if chaos else None, "killed": killed, "stopped": stopped})
        return result
    finally:
        if sup is not None:
            sup.stop_all()
        server.stop()
        if disk is not None:
            disk.close()
        for db in dbs:
            with contextlib.suppress(Exception):
                admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def check(storage: str, tracking_uri: str, requested: int, epochs: int) -> dict:
    """What the study and MLflow hold at the end (see the module docstring)."""
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    study = optuna.load_study(study_name="chaos", storage=storage)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    completed_roots = {(t.system_attrs.get("retry_history") or [t.number])[0] for t in finished}
    lost = [t.number for t in trials if t.state == TrialState.FAIL
            and (t.system_attrs.get("retry_history") or [t.number])[0] not in completed_roots]
    lost += [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("chaos")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    running = [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    missing = duplicated = 0
    per_trial = {}
    for t in finished:
        run_id = t.user_attrs.get("mlflow_run_id") or _run_of(client, exp.experiment_id, t.number)
        steps = [m.step for m in client.get_metric_history(run_id, "val/leaderboard")] if run_id else []
        miss = len(set(range(epochs)) - set(steps))
        dup = len(steps) - len(set(steps))
        missing, duplicated = missing + miss, duplicated + dup
        per_trial[t.number] = {"retry_of": (t.system_attrs.get("retry_history") or [None])[0], "epochs": len(steps),
                               "missing": miss, "duplicated": dup}
    return {"requested": requested, "finished": len(finished), "lost": len(lost), "lost_trials": lost,
            "mlflow_running": len(running), "running_runs": running, "epochs_missing": missing,
            "epochs_duplicated": duplicated, "failed_attempts": sum(t.state == TrialState.FAIL for t in trials),
            "trials": per_trial}


def _run_of(client, experiment_id: str, number: int) -> str | None:
    """A trial's run when the trial ended before MLflow had answered (its id was not known then): by its tag."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`optuna.trial_number` = '{number}'")
    return runs[0].info.run_id if runs else None


def warm(tmp: Path, data: str, space: Path, cache: Path, sets: list[str] | None = None) -> None:
    """One throw-away trial (SQLite stores): decodes the clips and caches the features both timed runs reuse."""
    subprocess.run([sys.executable, "-m", "mvfouls_ab.study", "--trials", "1", "--study-name", "warm",
                    "--storage", f"sqlite:///{tmp}/warm.db", "--tracking-uri", f"sqlite:///{tmp}/warm_mlflow.db",
                    "--data", data, "--search-space", str(space), "--pruner", "none", "--threads", "1",
                    "--out", str(tmp / "warm"), "--set", f"cache_dir={cache}", *(sets or []), "--quiet"], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "MVFOULS_AB_CACHE": str(cache)})


def make_data(root: Path, scale: float) -> str:
    subprocess.run([sys.executable, "-m", "mvfouls_ab.synth", "--out", str(root), "--scale", str(scale)], check=True,
                   stdout=subprocess.DEVNULL)
    return str(root)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, nargs=3, default=(1, 5, 2), help="epochs of the three phases")
    ap.add_argument("--outage", type=float, default=30.0, help="seconds the MLflow server is down")
    ap.add_argument("--outage-kind", choices=("stop", "freeze"), default="stop",
                    help="stop: the server ends and restarts (refused); freeze: SIGSTOP/SIGCONT (requests hang)")
    ap.add_argument("--data", default=None, help="MVFouls root (default: a synthetic one of --scale, made here)")
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--cache", default=None, help="feature cache folder (default: one in the work folder)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the undisturbed run")
    ap.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="TrainingConfig overrides for every trial (passed to the workers' --set)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    try:
        data = args.data or make_data(tmp / "data", args.scale)
        cache = Path(args.cache) if args.cache else tmp / "cache"
        space = tmp / "space.yaml"
        space.write_text(SPACE.format(e1=args.epochs[0], e2=args.epochs[1], e3=args.epochs[2]))
        epochs = sum(args.epochs)
        out: dict = {"trials": args.trials, "epochs": list(args.epochs), "outage_s": args.outage,
                     "outage_kind": args.outage_kind}
        if not args.no_baseline:
            warm(tmp, data, space, cache, args.sets)   # features computed once: neither timed run pays for them
            out["baseline"] = run_study(tmp, data, space, args.trials, epochs, cache, False, 0.0, args.timeout,
                                        sets=args.sets)
        out["chaos"] = run_study(tmp, data, space, args.trials, epochs, cache, True, args.outage, args.timeout,
                                 args.outage_kind, args.sets)
        report(out)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(out: dict) -> None:
    c = out["chaos"]
    print(f"\nchaos run: {out['trials']} trials x {sum(out['epochs'])} epochs, 2 workers; SIGKILL, SIGTERM (exit "
          f"{c['sigterm_exit']}), MLflow {out['outage_kind']} {out['outage_s']:.0f} s, spill disk {c['spill_disk']} "
          f"filled; "
          f"{c['restarts']} worker restarts")
    print(f"  trials finished / requested : {c['finished']} / {c['requested']}")
    print(f"  trials lost                 : {c['lost']} {c['lost_trials'] or ''}")
    print(f"  MLflow runs left RUNNING    : {c['mlflow_running']} {c['running_runs'] or ''}")
    print(f"  epochs missing in MLflow    : {c['epochs_missing']}")
    print(f"  epochs duplicated in MLflow : {c['epochs_duplicated']}")
    print(f"  failed attempts (retried)   : {c['failed_attempts']}")
    if "baseline" in out:
        b = out["baseline"]
        print(f"  wall time                   : {c['wall_s']:.1f} s, undisturbed {b['wall_s']:.1f} s "
              f"({c['wall_s'] / b['wall_s']:.2f}x); undisturbed: {b['finished']}/{b['requested']} finished, "
              f"{b['epochs_missing']} missing, {b['epochs_duplicated']} duplicated")
    else:
        print(f"  wall time                   : {c['wall_s']:.1f} s")
    met = (c["finished"] >= c["requested"] and c["lost"] == 0 and c["mlflow_running"] == 0
           and c["epochs_missing"] == 0 and c["epochs_duplicated"] == 0)
    print(f"  target                      : {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
