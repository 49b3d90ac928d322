"""Nothing lost, nobody let in (issue 15), the fast part: run folders --fresh may delete, atomic writes, weights-only
checkpoints, passwords kept out of argv and error messages, the MLflow logger's spill file under a full or read-only
disk, spill files found and replayed (once), the A/B parent-run claim, experiment names, and the stop signal.

Real MLflow stores (SQLite-backed MlflowClient) and a real PostgreSQL server; nothing here is mocked. A dead MLflow
server is a TCP port nothing listens on."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from pg import free_port

from mvfouls_ab import shutdown
from mvfouls_ab import train as train_mod
from mvfouls_ab.cli import study as study_cli
from mvfouls_ab.errors import ConfigError, MVFoulsError, StudyError
from mvfouls_ab.evaluation.metrics import DetailedMetrics
from mvfouls_ab.fsutil import RUN_MARKER, atomic_write, check_removable, claim_run_folder, remove_run_folder
from mvfouls_ab.orchestration import study as study_mod
from mvfouls_ab.tracking import SPILL_NAME, RunLogger, RunTracker, make_client, replay_spill
from mvfouls_ab.training import checkpoint as ckpt
from mvfouls_ab.urls import redact, redact_text, without_password

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "p@ss:w/rd%x"                       # every character that needs percent-encoding in a URL
ENCODED = "p%40ss%3Aw%2Frd%25x"


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made once (the migrations take seconds); each test copies it."""
    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(store_template, tmp_path) -> str:
    import shutil

    shutil.copy(store_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


# ---- run folders ----------------------------------------------------------------------------------------------
def test_fresh_refuses_a_folder_it_did_not_make(tmp_path, tiny_mvfouls, capsys):
    """`train --fresh --out D` with D holding a file the tool did not make: exit 2, one line naming D, D intact."""
    d = tmp_path / "precious"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    code = train_mod.main(["--fresh", "--out", str(d), "--data", str(tiny_mvfouls), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(d) in err and RUN_MARKER in err and len(err.splitlines()) == 1
    assert (d / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(d)) == ["thesis.tex"]
    # the home and working folders are named as such
    with pytest.raises(MVFoulsError, match="home, the working or a parent folder"):
        check_removable(Path.cwd())
    # without --fresh a foreign folder is not adopted as a run folder either (it could be deleted later)
    with pytest.raises(MVFoulsError, match="no run of this tool made"):
        claim_run_folder(d)
    assert not (d / RUN_MARKER).exists()


def test_run_folders_the_tool_made_are_deleted(tmp_path):
    run = claim_run_folder(tmp_path / "run")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    assert remove_run_folder(run) and not run.exists()
    assert not remove_run_folder(tmp_path / "absent")
    legacy = tmp_path / "legacy"                      # a run folder written before markers existed: adopted
    (legacy / "checkpoints").mkdir(parents=True)
    (legacy / "config.yaml").write_text("seed: 0\n")
    claim_run_folder(legacy)
    assert (legacy / RUN_MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    check_removable(empty)                            # an empty folder holds nothing to lose


def test_atomic_write_never_shows_half_a_file(tmp_path):
    path = tmp_path / "leaderboard.csv"
    atomic_write(path, "a,b\n1,2\n", mode=0o600)
    assert path.read_text() == "a,b\n1,2\n" and oct(path.stat().st_mode & 0o777) == "0o600"
    stop, seen = threading.Event(), set()

    def reader():
        while not stop.is_set():
            if path.exists():
                seen.add(path.read_text())

    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        atomic_write(path, f"row,{i}\n" * 500)
    stop.set()
    t.join()
    assert all(text.count("\n") == 500 and len(set(text.splitlines())) == 1 for text in seen if text != "a,b\n1,2\n")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---- checkpoints ----------------------------------------------------------------------------------------------
class Payload:                     # what a tampered checkpoint could name: a full unpickler would build (and run) it
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoints_load_weights_only(tmp_path):
    gen, rng = torch.Generator().manual_seed(3), np.random.default_rng(3)
    record = DetailedMetrics(epoch=1, phase="foundation", train_loss=0.5,
                             confusion_matrices={"action": np.eye(8, dtype=np.int64)})
    state = {"model": {"w": torch.ones(2, 3)}, "rng": ckpt.rng_state(gen, rng), "history": [record],
             "phase_state": {"weights": {"action": np.linspace(1, 3, 8)}, "pseudo": None, "pool": np.arange(5)},
             "top": [{"score": [0.5, -1.0], "path": tmp_path / "m.pt"}]}
    ckpt.save_atomic(state, tmp_path / "last.pt")
    raw = torch.load(tmp_path / "last.pt", weights_only=True)          # loadable by the safe unpickler itself
    assert isinstance(raw["model"]["w"], torch.Tensor)
    back = ckpt.load(tmp_path / "last.pt")
    assert isinstance(back["history"][0], DetailedMetrics) and back["history"][0].train_loss == 0.5
    assert np.array_equal(back["history"][0].confusion_matrices["action"], np.eye(8))
    assert back["phase_state"]["pool"].dtype == np.arange(5).dtype and back["top"][0]["path"] == tmp_path / "m.pt"
    ckpt.set_rng_state(back["rng"], gen, rng)                          # the RNG state round-trips
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(MVFoulsError, match="cannot read checkpoint"):
        ckpt.load(tmp_path / "evil.pt")
    with pytest.raises(TypeError, match="SAFE_DATACLASSES"):
        from dataclasses import dataclass

        @dataclass
        class Other:
            x: int = 1
        ckpt.save_atomic({"x": Other()}, tmp_path / "other.pt")


# ---- secrets ----------------------------------------------------------------------------------------------------
def test_redaction_catches_every_encoding():
    url = f"postgresql+psycopg2://mvfouls:{ENCODED}@db.lan:5432/optuna"
    assert redact(url) == "postgresql+psycopg2://mvfouls:***@db.lan:5432/optuna"
    message = f"could not connect with password {PASSWORD} to {url} (also {ENCODED})"
    cleaned = redact_text(message, [url])
    assert PASSWORD not in cleaned and ENCODED not in cleaned and "mvfouls:***@db.lan" in cleaned
    assert without_password(url) == ("postgresql+psycopg2://mvfouls@db.lan:5432/optuna", PASSWORD)
    assert redact("sqlite:///optuna.db") == "sqlite:///optuna.db"


@pytest.mark.parametrize("storage", [
    f"postgresql://postgres:{ENCODED}@127.0.0.1:{{port}}/nope",
    f"postgresql://postgres:{ENCODED}@127.0.0.1:port/nope",
    f"nodb://postgres:{ENCODED}@127.0.0.1/x",
])
def test_storage_errors_print_no_password(tmp_path, capsys, storage):
    code = study_cli.main(["--trials", "1", "--out", str(tmp_path), "--storage", storage.format(port=free_port()),
                           "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert code == 2 and "StudyError" in err
    for form in (PASSWORD, ENCODED, "p@ss", "w/rd"):
        assert form not in err, err


def test_worker_children_get_passwords_through_the_environment():
    storage = f"postgresql+psycopg2://mvfouls:{ENCODED}@db.lan:5432/optuna"
    args = study_cli.parse_args(["--storage", storage, "--tracking-uri", "http://127.0.0.1:5000", "--workers", "2"])
    argv = study_mod._child_argv(args)
    assert not any(ENCODED in a or PASSWORD in a for a in argv) and "--storage" not in argv
    env = study_mod.child_env(args)
    assert env["MVFOULS_STORAGE"] == storage
    os.environ["MVFOULS_STORAGE"] = storage
    try:                                                # the child reads it back as its default
        assert study_cli.parse_args([]).storage == storage
    finally:
        del os.environ["MVFOULS_STORAGE"]


# ---- the MLflow logger ------------------------------------------------------------------------------------------
def _dead_client():
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return make_client(f"http://127.0.0.1:{free_port()}")


@pytest.mark.slow
def test_spill_on_a_full_or_read_only_disk_keeps_the_operations(tmp_path, caplog, store):
    """An OSError while spilling (here: the spill folder is a file, ENOTDIR; the chaos run uses a full tmpfs) is
    logged once and the operations stay queued; the thread lives on and sends them when the server answers."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("spill")).info.run_id
    logger = RunLogger(_dead_client(), blocker / SPILL_NAME, max_backoff=0.2, linger_s=0.0)
    logger.submit({"op": "bind", "run_id": run_id})
    for step in range(3):
        logger.submit({"op": "metrics", "step": step, "ts": 1000 + step, "values": {"val/leaderboard": step / 10}})
    with caplog.at_level(logging.WARNING, logger="mvfouls_ab.tracking"):
        assert logger.flush(timeout=1.5) is False
    assert logger._thread.is_alive() and logger.backlog == 3 and logger.failures >= 2
    assert sum("cannot write the MLflow spill file" in r.message for r in caplog.records) == 1
    logger.client = make_client(store)                  # the server answers again
    assert logger.flush(timeout=30)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/leaderboard")) == [0, 1, 2]
    assert logger.close(5) is True


def test_close_with_an_unwritable_spill_does_not_raise(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    tracker = RunTracker(f"http://127.0.0.1:{free_port()}", "x", "y", spill_path=blocker / SPILL_NAME,
                         client=_dead_client(), linger_s=0.0)
    tracker.log_metrics({"a": 1.0}, step=0)
    assert tracker.end("FAILED", RuntimeError("the trial's own error"), flush_timeout=0.5) is False


def test_found_spill_is_replayed_first_never_overwritten_and_replay_is_idempotent(tmp_path, store):
    client = MlflowClient(store)
    exp = client.create_experiment("found")
    run_dir = tmp_path / "trial_0000"
    run_dir.mkdir()
    # a dead worker's spill: its run's creation was never sent (create op with its token), then two epochs
    dead = RunTracker(f"http://127.0.0.1:{free_port()}", "found", "trial-0000", run_dir=run_dir,
                      client=_dead_client(), linger_s=0.0)
    dead.log_metrics({"val/leaderboard": 0.1}, step=0)
    dead.log_metrics({"val/leaderboard": 0.2}, step=1)
    dead.end("KILLED", flush_timeout=0.5)
    spill = run_dir / SPILL_NAME
    ops = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [op["op"] for op in ops][:1] == ["create"]
    backup = spill.read_text()
    # replayed twice (a replay killed after the create, then started again): one run, each step once
    (tmp_path / "copy.jsonl").write_text(backup)
    replay_spill(spill, store)
    replay_spill(tmp_path / "copy.jsonl", store)
    runs = client.search_runs([exp])
    assert len(runs) == 1
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val/leaderboard")) == [0, 1]
    assert runs[0].info.status == "KILLED"
    # a retry that finds a spill where it spills: set aside under another name, replayed before its own ops
    first = runs[0].info.run_id
    spill.write_text("".join(json.dumps(op) + "\n" for op in [{"op": "bind", "run_id": first},
                     {"op": "metrics", "step": 2, "ts": 5, "values": {"val/leaderboard": 0.3}}]))
    retry = RunTracker(store, "found", "", run_dir=run_dir, resume_run_id=first, linger_s=0.0)
    retry.log_metrics({"val/leaderboard": 0.4}, step=3)
    assert retry.end("FINISHED", flush_timeout=30)
    assert sorted(m.step for m in client.get_metric_history(first, "val/leaderboard")) == [0, 1, 2, 3]
    assert client.get_run(first).info.status == "FINISHED"
    assert not list(run_dir.glob("mlflow_spill*"))           # everything delivered, nothing left behind


@pytest.mark.slow
def test_only_a_missing_run_means_the_parent_is_gone(store):
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("p")).info.run_id
    assert study_mod.run_exists(client, run_id, "sqlite:///m.db")
    assert not study_mod.run_exists(client, "0" * 32, "sqlite:///m.db")
    client.delete_run(run_id)
    assert not study_mod.run_exists(client, run_id, "sqlite:///m.db")
    # a server that does not answer (a timeout): an error, not "deleted" (no second parent run)
    with pytest.raises(StudyError, match="did not answer"):
        study_mod.run_exists(_dead_client(), run_id, "http://127.0.0.1:1", attempts=2)


# ---- A/B experiments --------------------------------------------------------------------------------------------
def test_experiment_names_are_validated(tmp_path):
    from mvfouls_ab.orchestration.ab import load_experiment

    doc = (ROOT / "experiments" / "ab_seeds.yaml").read_text()
    for bad in ("../../x", "a/b", "x y", ".hidden"):
        path = tmp_path / "ab_bad.yaml"
        path.write_text(f"name: {json.dumps(bad)}\n" + "\n".join(
            line for line in doc.splitlines() if not line.startswith("name:")))
        with pytest.raises(ConfigError, match="odd characters"):
            load_experiment(path)


@pytest.mark.slow
def test_ab_workers_racing_adopt_one_parent_and_one_run_per_arm(pg_url, store):
    """Four workers call ensure_parent_runs at once: one parent run and one run per arm survive (the others are
    deleted, none left RUNNING), and every worker got the same ids."""
    from mlflow.entities import ViewType

    from mvfouls_ab.orchestration.ab import CellStore, ensure_parent_runs, load_experiment

    experiment = load_experiment(ROOT / "experiments" / "ab_seeds.yaml", seeds=1, folds=2)
    tracking = store
    stores = [CellStore(experiment, pg_url) for _ in range(4)]
    barrier, got, errors = threading.Barrier(4), [], []

    def worker(store):
        try:
            barrier.wait()
            got.append(ensure_parent_runs(store, tracking))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 4 and all(g == got[0] for g in got), (errors, got)
    client = MlflowClient(tracking)
    exp_id = client.get_experiment_by_name(experiment.study_name).experiment_id
    active = client.search_runs([exp_id])
    assert sorted(r.info.run_id for r in active) == sorted(v for k, v in got[0].items() if k != "_tracking_uri")
    deleted = [r for r in client.search_runs([exp_id], run_view_type=ViewType.DELETED_ONLY)]
    assert all(r.info.status == "KILLED" for r in deleted)


# ---- stop signals -----------------------------------------------------------------------------------------------
STOPPER = """
import os, signal, sys, time
from mvfouls_ab import shutdown
shutdown.install()
os.kill(os.getpid(), signal.SIGTERM)
assert shutdown.requested() and shutdown.signal_received() == signal.SIGTERM
try:
    shutdown.StopSink().log(type("R", (), {"step": 4})())
except shutdown.GracefulStop as exc:
    print("graceful:", exc, flush=True)
try:
    os.kill(os.getpid(), signal.SIGTERM)       # the second signal: at once
    time.sleep(5)
except KeyboardInterrupt as exc:
    print("at once:", type(exc).__name__, flush=True)
sys.exit(shutdown.exit_code())
"""


def test_first_signal_asks_second_stops_at_once():
    out = subprocess.run([sys.executable, "-c", STOPPER], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    assert "graceful: stop requested; epoch 5 is checkpointed" in out.stdout
    assert "at once: KeyboardInterrupt" in out.stdout
    assert "SIGTERM received" in out.stderr
    assert issubclass(shutdown.GracefulStop, KeyboardInterrupt)      # no `except Exception` swallows it


def test_hand_back_enqueues_the_same_trial_and_does_not_use_up_retries(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db")
    study = optuna.create_study(storage=storage, study_name="hb")
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1e-2, log=True)
    trial.set_user_attr("mlflow_run_id", "abc")
    trial.report(0.5, 0)
    assert study_mod.hand_back(study, trial._trial_id) == 0
    first, retry = study.trials
    assert first.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.WAITING
    assert retry.params == first.params and retry.user_attrs["mlflow_run_id"] == "abc"
    assert retry.intermediate_values == {0: 0.5}
    assert retry.system_attrs["retry_history"] == [0] and retry.system_attrs["handed_back_retries"] == 1
    assert study_mod.hand_back(study, trial._trial_id) is None           # once
    # graceful hand-backs do not count against the stale-heartbeat retries (max_retry=1 here)
    again = study.ask()
    assert again.number == 1
    study_mod.hand_back(study, again._trial_id)
    third = study.ask()
    storage.set_trial_state_values(third._trial_id, state=optuna.trial.TrialState.FAIL)
    study_mod.StaleTrialRetry(max_retry=1)(study, storage.get_trial(third._trial_id))
    assert study.trials[-1].state == optuna.trial.TrialState.WAITING
    assert study.trials[-1].system_attrs["retry_history"] == [0, 1, 2]


# ---- out of memory outside the training step ---------------------------------------------------------------------
@pytest.mark.slow
def test_oom_degrades_batch_then_cpu_before_failing():
    """Fault injection: an evaluation that runs out of memory above 16 samples on the accelerator, or always on it."""
    from mvfouls_ab.oom import degrade, is_oom

    events, calls = [], []

    def record(kind, **detail):
        events.append((kind, detail))

    def evaluate(batch, device):
        calls.append((batch, device.type))
        if device.type == "cuda" and batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch, device.type

    assert degrade(evaluate, 64, "cuda", on_event=record) == (16, "cuda")
    assert [e[0] for e in events] == ["oom_eval_batch", "oom_eval_batch"] and calls[-1] == (16, "cuda")

    events.clear()

    def never_fits(batch, device):
        if device.type == "cuda":
            raise RuntimeError("CUDA error: out of memory")
        return device.type

    assert degrade(never_fits, 8, "cuda", min_batch=2, on_event=record) == "cpu"
    assert [e[0] for e in events] == ["oom_eval_batch", "oom_eval_batch", "oom_eval_cpu"]

    def always(batch, device):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        degrade(always, 4, "cpu")
    with pytest.raises(ValueError):                   # anything else is not an OOM: raised at once
        degrade(lambda b, d: (_ for _ in ()).throw(ValueError("bad")), 4, "cuda")
    assert is_oom(torch.OutOfMemoryError("x")) and not is_oom(RuntimeError("shape mismatch"))
