"""tracking.py against real MLflow: `mlflow server` subprocesses with SQLite and PostgreSQL backends, loopback only."""
from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient
from pg import free_port

from mvfouls_ab.errors import StudyError
from mvfouls_ab.metrics import compute_detailed_metrics
from mvfouls_ab.tracking import SPILL_NAME, MLflowSink, RunTracker, check_tracking_uri, replay_spill


def records(n_epochs: int, phases=("foundation", "scaling"), seed: int = 0):
    """Real DetailedMetrics records (> 100 metrics each) over two phases."""
    rng = np.random.default_rng(seed)
    out, history = [], []
    action, severity = np.arange(40) % 8, np.arange(40) % 4
    for step in range(n_epochs):
        phase = phases[min(step * len(phases) // n_epochs, len(phases) - 1)]
        logits = {"action": rng.normal(size=(40, 8)) + 2 * np.eye(8)[action],
                  "severity": rng.normal(size=(40, 4)) + 2 * np.eye(4)[severity]}
        rec = compute_detailed_metrics(step, phase, logits, {"action": action, "severity": severity},
                                       1.0 / (step + 1), 1.5 / (step + 1), history)
        rec.step = step
        history.append(rec)
        out.append(rec)
    return out


def test_bad_tracking_uris_are_one_clear_error():
    for uri in ("notascheme://x", "http://", "http://127.0.0.1:port"):
        with pytest.raises(StudyError, match="--tracking-uri"):
            check_tracking_uri(uri)
    assert check_tracking_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_batched_logging_and_server_restart_lose_nothing(mlflow_sqlite_server, tmp_path):
    server = mlflow_sqlite_server
    parent = RunTracker(server.url, "tracking-test", "parent", tags={"role": "study"})
    parent_id = parent.wait_run_id(30)
    child = RunTracker(server.url, "tracking-test", "trial-0000", tags={"variant": "simplified"},
                       parent_run_id=parent_id, run_dir=tmp_path)
    assert child.wait_run_id(30)
    child.log_params({f"p{i}": i for i in range(130)})          # > 100: two log_batch requests
    assert child.flush(30)
    sent = child.logger.requests
    sink = MLflowSink(child)
    recs = records(6)
    for rec in recs[:3]:
        sink.log(rec)
    assert child.flush(30)
    # one metrics batch + one confusion JSON per epoch, plus one phase-end pair of figures at the phase change
    assert child.logger.requests - sent <= 3 * 2 + 2
    assert len(recs[0].to_mlflow()) >= 100

    server.stop()                                                 # the server goes away mid-trial
    for rec in recs[3:]:
        sink.log(rec)                                             # training goes on; log() never blocks
    assert sink.log_s < 5.0
    assert not child.flush(3.0)
    assert (tmp_path / SPILL_NAME).is_file()                      # pending operations are on disk too
    spilled = [json.loads(line)["op"] for line in (tmp_path / SPILL_NAME).read_text().splitlines()]
    assert spilled.count("metrics") == 3
    server.start()
    sink.close()
    assert child.end("FINISHED", flush_timeout=60)
    assert not (tmp_path / SPILL_NAME).exists()

    client = MlflowClient(server.url)
    run = client.get_run(child.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert len(run.data.params) == 130
    for key in ("val/leaderboard", "val/action/macro_recall", "val/severity/recall/red_card", "train/loss"):
        steps = [m.step for m in client.get_metric_history(child.run_id, key)]
        assert sorted(steps) == list(range(6)), key
    artifacts = {a.path for a in client.list_artifacts(child.run_id, "confusion")}
    assert {f"confusion/epoch_{i:03d}.json" for i in range(6)} <= artifacts
    assert {"confusion/foundation_end.html", "confusion/scaling_end.html"} <= artifacts
    parent.end("FINISHED")


def test_statuses_on_postgres_backend(mlflow_pg_server, tmp_path):
    server = mlflow_pg_server
    client = MlflowClient(server.url)
    failed = RunTracker(server.url, "pg-test", "failed", run_dir=tmp_path / "a")
    MLflowSink(failed).log(records(1)[0])
    failed.end("FAILED", RuntimeError("loss is NaN"))
    killed = RunTracker(server.url, "pg-test", "pruned", run_dir=tmp_path / "b")
    killed.set_tags({"pruned": "true"})
    killed.end("KILLED")
    run_f, run_k = client.get_run(failed.run_id), client.get_run(killed.run_id)
    assert run_f.info.status == "FAILED" and run_f.data.tags["error"] == "RuntimeError: loss is NaN"
    assert len(run_f.data.metrics) >= 100
    assert run_k.info.status == "KILLED" and run_k.data.tags["pruned"] == "true"


def test_unreachable_server_spills_and_replays(tmp_path):
    """Nothing answers: end() gives up after its timeout, the spill file keeps every operation for a replay."""
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = RunTracker(dead, "replay-test", "offline", tags={"variant": "optimized"}, run_dir=tmp_path)
    tracker.log_params({"lr": 0.01})
    sink = MLflowSink(tracker)
    for rec in records(2):
        sink.log(rec)
    assert tracker.end("FINISHED", flush_timeout=1.0) is False
    spill = tmp_path / SPILL_NAME
    assert spill.is_file()
    store = f"sqlite:///{tmp_path / 'later.db'}"
    assert replay_spill(spill, store) >= 5
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("replay-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.01"
    assert len(client.get_metric_history(run.info.run_id, "val/leaderboard")) == 2
