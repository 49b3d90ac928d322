"""tracking.py against real MLflow: `mlflow server` subprocesses with SQLite and PostgreSQL backends, loopback only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from pg import free_port

from mvfouls_ab.errors import StudyError
from mvfouls_ab.evaluation.metrics import compute_detailed_metrics
from mvfouls_ab.tracking import (
    MAX_METRICS_PER_BATCH,
    SPILL_NAME,
    MLflowSink,
    RunTracker,
    check_tracking_uri,
    coalesce_metrics,
    make_client,
    metric_items,
    replay_spill,
    wait_closed,
)

N_METRICS = 158                                                   # one epoch of a study trial


def epoch_metrics(step: int) -> dict[str, float]:
    """N_METRICS distinct values, unique per (key, step)."""
    return {f"m/{j:03d}": step * 1000.0 + j + 0.25 for j in range(N_METRICS)}


class Recording:
    """A real MlflowClient that also records the write calls the logger makes (name, metric count or file)."""

    def __init__(self, client) -> None:
        self.client = client
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def create_run(self, *args, **kwargs):
        self.calls.append(("create_run",))
        return self.client.create_run(*args, **kwargs)

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.calls.append(("log_batch", len(metrics), len(params), len(tags)))
        return self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)

    def log_text(self, run_id, text, artifact_file):
        self.calls.append(("log_text", artifact_file))
        return self.client.log_text(run_id, text, artifact_file)

    def set_terminated(self, run_id, status=None):
        self.calls.append(("set_terminated", status))
        return self.client.set_terminated(run_id, status=status)

    def metric_batches(self) -> list[int]:
        return [c[1] for c in self.calls if c[0] == "log_batch" and c[1]]


def assert_all_metrics(client, run_id: str, steps) -> None:
    for j in range(N_METRICS):
        key = f"m/{j:03d}"
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert got == [(s, s * 1000.0 + j + 0.25) for s in steps], key


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path: an in-process store puts its artifacts under ./mlruns."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(params=["sqlite", "postgresql"])
def store_uri(request, in_tmp, tmp_path):
    """A real MLflow tracking store opened in-process: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        yield request.getfixturevalue("pg_url")


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


@pytest.mark.slow
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
    # the 3 epochs' metrics merged into one log_batch (logged well within linger_s; 2 if the machine stalls for
    # longer) + one confusion JSON each
    assert child.logger.requests - sent <= 2 + 3
    assert len(recs[0].to_mlflow()) >= 100

    server.stop()                                                 # the server goes away mid-trial
    for rec in recs[3:]:
        sink.log(rec)                                             # training goes on; log() never blocks
    assert sink.log_s < 5.0
    assert not child.flush(3.0)
    assert (tmp_path / SPILL_NAME).is_file()                      # pending operations are on disk too
    spilled = [json.loads(line) for line in (tmp_path / SPILL_NAME).read_text().splitlines()]
    spilled_steps = {item[3] for op in spilled if op["op"] in ("metrics", "metrics_multi") for item in metric_items(op)}
    assert spilled_steps == {3, 4, 5}                             # merged or not, every pending epoch is in the file
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


@pytest.mark.slow
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
    assert len(run_f.data.metrics) >= 50      # one epoch's scalars (confusion cells go to a table, not metrics)
    assert run_k.info.status == "KILLED" and run_k.data.tags["pruned"] == "true"


@pytest.mark.slow
def test_unreachable_server_spills_and_replays(in_tmp, tmp_path):
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


# ---- coalescing --------------------------------------------------------------------------------------------------
def test_coalesce_metrics_keeps_order_limit_and_barriers():
    def metrics(step, n):
        return {"op": "metrics", "step": step, "ts": 7, "values": {f"k{j}": float(j) for j in range(n)}}

    text, terminate = {"op": "text", "file": "a.json", "text": "{}"}, {"op": "terminate", "status": "FINISHED"}
    pending = [metrics(0, 400), text, metrics(1, 400), metrics(2, 400), terminate, metrics(3, 10)]
    out = list(coalesce_metrics(pending, limit=1000))
    assert len(pending) == 6                                      # the input is left as it is
    assert out[0]["op"] == "metrics_multi" and out[0]["ops"] == 2  # epochs 0 and 1; epoch 2 would exceed the limit
    assert [item[3] for item in out[0]["items"]] == [0] * 400 + [1] * 400
    assert out[0]["items"][:2] == [["k0", 0.0, 7, 0], ["k1", 1.0, 7, 0]]
    assert out[1:] == pending[1:2] + pending[3:]                  # the text was overtaken; nothing crosses the barrier
    out = list(coalesce_metrics([metrics(0, 5), terminate, metrics(1, 5)]))
    assert out[0]["ops"] == 1 and len(out[0]["items"]) == 5 and out[1:] == [terminate, metrics(1, 5)]
    big = list(coalesce_metrics([metrics(0, 1500), metrics(1, 5)], limit=1000))  # one epoch > limit: taken whole
    assert len(big[0]["items"]) == 1500 and big[1:] == [metrics(1, 5)]
    nan = {"op": "metrics", "step": 0, "ts": 7, "values": {"a": float("nan"), "b": float("inf"), "c": 1.0}}
    assert coalesce_metrics([nan])[0]["items"] == [["c", 1.0, 7, 0]]


@pytest.mark.slow
def test_epochs_are_merged_into_few_requests(store_uri):
    """26 epochs x 158 metrics submitted at once: 5 log_batch requests of whole epochs (6 x 158 <= 1000), not 26."""
    client = Recording(make_client(store_uri))
    tracker = RunTracker(store_uri, "coalesce", "trial", client=client, linger_s=60.0)
    assert tracker.wait_run_id(60)
    for step in range(26):
        tracker.log_metrics(epoch_metrics(step), step=step)
    t0 = time.monotonic()
    assert tracker.flush(60)
    assert time.monotonic() - t0 < 30                             # never waited for linger_s
    assert MAX_METRICS_PER_BATCH // N_METRICS == 6
    assert client.metric_batches() == [6 * N_METRICS] * 4 + [2 * N_METRICS]
    assert tracker.logger.requests == 1 + 5                       # create_run + metrics
    assert tracker.end("FINISHED")
    assert_all_metrics(client, tracker.run_id, range(26))


def lingering_run(tmp_path, experiment):
    """(recording client, tracker) of a new run in a SQLite store whose logger lingers 60 s over metrics."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = Recording(make_client(store))
    tracker = RunTracker(store, experiment, "trial", client=client, linger_s=60.0)
    assert tracker.wait_run_id(60)
    return client, tracker


@pytest.mark.slow
def test_metrics_overtake_artifacts_but_not_terminate(in_tmp, tmp_path):
    client, tracker = lingering_run(tmp_path, "ordering")
    for step in range(3):
        tracker.log_metrics(epoch_metrics(step), step=step)
        tracker.log_dict({"step": step}, f"confusion/epoch_{step:03d}.json")
    tracker.set_tags({"best_epoch": 2})
    time.sleep(0.5)                                               # the thread holds them all, lingering
    assert tracker.logger.backlog == 7
    assert tracker.end("FINISHED", flush_timeout=60)              # terminate: a barrier, sent without lingering
    assert client.calls == [("create_run",), ("log_batch", 3 * N_METRICS, 0, 0),
                            ("log_text", "confusion/epoch_000.json"), ("log_text", "confusion/epoch_001.json"),
                            ("log_text", "confusion/epoch_002.json"), ("log_batch", 0, 0, 1),
                            ("set_terminated", "FINISHED")]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["best_epoch"] == "2"
    assert_all_metrics(client, tracker.run_id, range(3))
    for step in range(3):
        path = client.download_artifacts(tracker.run_id, f"confusion/epoch_{step:03d}.json", str(tmp_path))
        assert json.loads(Path(path).read_text()) == {"step": step}


@pytest.mark.slow
def test_end_without_waiting_sends_the_rest_in_the_background(in_tmp, tmp_path):
    """A study trial ends its run with wait=False: end() returns at once, the closing thread sends the lingering
    metrics, the artifact and the status; wait_closed() waits for it (the study calls it before ranking)."""
    client, tracker = lingering_run(tmp_path, "closing")
    for step in range(4):
        tracker.log_metrics(epoch_metrics(step), step=step)
    tracker.log_dict({"best": 3}, "best.json")
    t0 = time.monotonic()
    assert tracker.end("FINISHED", wait=False)
    assert time.monotonic() - t0 < 0.5                            # the caller did not wait for the sends
    wait_closed(60)
    assert not tracker.logger.backlog and not tracker.logger._thread.is_alive()
    assert client.calls[-1] == ("set_terminated", "FINISHED")
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert_all_metrics(client, tracker.run_id, range(4))
    path = client.download_artifacts(tracker.run_id, "best.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == {"best": 3}


@pytest.mark.slow
def test_linger_holds_metrics_until_flush_or_timeout(in_tmp, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = make_client(store)
    held = RunTracker(store, "linger", "held", client=client, linger_s=60.0)
    assert held.wait_run_id(60)
    for step in range(3):
        held.log_metrics(epoch_metrics(step), step=step)
    time.sleep(1.0)
    assert held.logger.backlog == 3                               # fewer than one request: waiting for more
    assert client.get_metric_history(held.run_id, "m/000") == []
    t0 = time.monotonic()
    assert held.flush(60)
    assert time.monotonic() - t0 < 10                             # well under linger_s
    assert held.logger.requests == 1 + 1
    assert_all_metrics(client, held.run_id, range(3))
    held.end("FINISHED")

    short = RunTracker(store, "linger", "short", client=client, linger_s=0.3)
    assert short.wait_run_id(60)
    short.log_metrics(epoch_metrics(0), step=0)
    deadline = time.monotonic() + 30
    while short.logger.backlog and time.monotonic() < deadline:  # no flush: sent once linger_s has passed
        time.sleep(0.05)
    assert short.logger.backlog == 0
    assert_all_metrics(client, short.run_id, [0])
    short.end("FINISHED")


@pytest.mark.slow
def test_merged_metrics_are_spilled_and_replayed(mlflow_sqlite_server, tmp_path):
    """The server goes away after the run exists: the epochs are merged into one op, which is what the spill file
    holds (with the artifacts and the terminate after it), and a replay after the restart stores all of it."""
    server = mlflow_sqlite_server
    tracker = RunTracker(server.url, "spill-merge", "trial", run_dir=tmp_path, linger_s=60.0)
    run_id = tracker.wait_run_id(30)
    assert run_id and tracker.flush(30)
    server.stop()
    try:
        for step in range(5):
            tracker.log_metrics(epoch_metrics(step), step=step)
            tracker.log_dict({"step": step}, f"epoch_{step}.json")
        assert not tracker.flush(2.0)
        assert tracker.end("FINISHED", flush_timeout=1.0) is False
    finally:
        server.start()
    spill = tmp_path / SPILL_NAME
    ops = [json.loads(line) for line in spill.read_text().splitlines()]
    assert ops[0] == {"op": "bind", "run_id": run_id}
    assert [op["op"] for op in ops[1:]] == ["metrics_multi"] + ["text"] * 5 + ["terminate"]
    assert ops[1]["ops"] == 5 and len(ops[1]["items"]) == 5 * N_METRICS
    assert replay_spill(spill, server.url) == len(ops)
    client = MlflowClient(server.url)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_all_metrics(client, run_id, range(5))
    assert {f"epoch_{i}.json" for i in range(5)} <= {a.path for a in client.list_artifacts(run_id)}


# ---- a worker killed while a run ended without waiting is still sending ------------------------------------------
KILLED_WHILE_CLOSING = """
import os, sys, threading, time
from pathlib import Path
from mvfouls_ab.tracking import RunTracker, logger
send = logger.execute
def slow_send(client, op, state):      # the server takes its time with the run's last request
    if op["op"] == "terminate":
        threading.Event().wait()
    return send(client, op, state)
logger.execute = slow_send
tracker = RunTracker("sqlite:///" + sys.argv[1], "killed", "trial", run_dir=Path(sys.argv[2]), linger_s=30.0)
print(tracker.wait_run_id(60), flush=True)
for step in range(3):
    tracker.log_metrics({"val/loss": 1.0 / (step + 1)}, step=step)
tracker.log_dict({"best": 2}, "best.json")
tracker.end("FINISHED", wait=False)
deadline = time.monotonic() + 30
while not (Path(sys.argv[2]) / "mlflow_spill.jsonl").is_file() and time.monotonic() < deadline:
    time.sleep(0.01)
os._exit(0)                            # a SIGKILL, as far as the closing thread is concerned
"""


@pytest.mark.slow
def test_a_run_ended_without_waiting_survives_a_killed_worker_on_disk(tmp_path):
    """end(wait=False) writes the pending operations ahead to the run's spill file: a worker killed while the run
    is still sending (the next trial trains meanwhile) leaves them for recover_spills, which finishes the run."""
    db, run_dir = tmp_path / "m.db", tmp_path / "trial_0000"
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_CLOSING, str(db), str(run_dir)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = proc.stdout.split()[0]
    client = MlflowClient(f"sqlite:///{db}")
    spill = run_dir / SPILL_NAME
    assert spill.is_file()
    replay_spill(spill, client=client)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [0, 1, 2]
    assert "best.json" in {a.path for a in client.list_artifacts(run_id)}


# ---- MLflow telemetry ------------------------------------------------------------------------------------------
TELEMETRY_PROBE = """
import json, os, sys, threading
started = []
_start = threading.Thread.start
def start(self):
    started.append(self.name)
    return _start(self)
threading.Thread.start = start
from mvfouls_ab.tracking import RunTracker
tracker = RunTracker("sqlite:///" + sys.argv[1], "telemetry", "trial", linger_s=0.0)
tracker.log_params({"lr": 0.1})
tracker.log_metrics({"loss": 1.0}, step=0)
assert tracker.end("FINISHED", flush_timeout=60)
print(json.dumps({"env": os.environ.get("MLFLOW_DISABLE_TELEMETRY"), "threads": started}))
"""


@pytest.mark.slow
def test_mlflow_telemetry_is_off_by_default(tmp_path):
    """No MLflowTelemetryConsumer thread in our processes unless MLFLOW_DISABLE_TELEMETRY=false asks for one."""
    # MLflow also turns telemetry off under CI or pytest: the probes run without those markers
    ci = {"PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "TF_BUILD",
          "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION",
          "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY"}
    env = {k: v for k, v in os.environ.items() if k not in ci}
    probes = {name: subprocess.Popen([sys.executable, "-c", TELEMETRY_PROBE, str(tmp_path / f"{name}.db")],
                                     env={**env, **extra}, cwd=tmp_path, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
              for name, extra in (("default", {}), ("opted_in", {"MLFLOW_DISABLE_TELEMETRY": "false"}))}
    out = {}
    for name, proc in probes.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    assert out["default"]["env"] == "true"
    assert not [t for t in out["default"]["threads"] if t.startswith("MLflowTelemetry")], out["default"]
    # the probe does see the thread when telemetry is on (so the check above can fail)
    assert out["opted_in"]["env"] == "false"
    assert any(t.startswith("MLflowTelemetryConsumer") for t in out["opted_in"]["threads"]), out["opted_in"]


def test_figure_html_is_plotlys_cdn_page():
    """figure_html makes the script tag once per process; the page is what include_plotlyjs="cdn" writes, SRI
    hash included (only the random div id differs)."""
    import re

    import plotly.io as pio

    from mvfouls_ab.reporting.figures import confusion_figure, figure_html

    fig = confusion_figure({"run": {"action": np.eye(8, dtype=int) * 3, "severity": np.ones((4, 4), dtype=int)}}, "t")
    ours, plotlys = figure_html(fig), pio.to_html(fig, include_plotlyjs="cdn", full_html=True)
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    assert 'integrity="sha256-' in plotlys and 'crossorigin="anonymous"' in plotlys
    assert uuid.sub("ID", ours) == uuid.sub("ID", plotlys)


# ---- MLflow UI conventions: experiment kind, standard run tags, table-only values, logged models ----------------
@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One SQLite store for the tests below (creating MLflow's tables takes seconds); artifacts in its folder."""
    d = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        uri = f"sqlite:///{d / 'm.db'}"
        MlflowClient(uri).search_experiments()          # creates the tables
        yield uri


def test_experiments_open_as_custom_model_development_and_runs_carry_context_tags(shared_store):
    from mvfouls_ab.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, context_tags, experiment_url

    uri = shared_store
    client = MlflowClient(uri)
    tracker = RunTracker(uri, "kind-test", "trial-0000-simplified")
    tracker.end("FINISHED")
    exp = client.get_experiment_by_name("kind-test")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    run = client.search_runs([exp.experiment_id])[0]
    assert run.info.run_name == "trial-0000-simplified"
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= set(run.data.tags)
    assert run.data.tags.get("mlflow.source.git.commit") == context_tags().get("mlflow.source.git.commit")
    # an experiment created elsewhere without a kind gets one; one with a kind keeps it
    bare = client.create_experiment("bare")
    other = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    RunTracker(uri, "bare", "r").end("FINISHED")
    RunTracker(uri, "genai", "r").end("FINISHED")
    assert client.get_experiment(bare).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(other).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert experiment_url("http://h:5000/", "7") == "http://h:5000/#/experiments/7?workflowType=machine_learning"


def test_confusion_cells_go_to_a_table_not_to_metric_series(shared_store, tmp_path):
    from mvfouls_ab.tracking import MLflowSink, confusion_table, run_metrics

    recs = records(3)
    full = recs[0].to_mlflow()
    kept = run_metrics(full)
    assert len(full) - len(kept) == (64 + 16) + (8 + 4) + (8 + 4)     # matrix cells, supports, predicted counts
    assert not [k for k in kept if "/confusion/" in k or "/support/" in k or "/predicted/" in k]
    assert {"val/action/recall/dive", "val/severity/f1/red_card", "val/action/macro_recall", "val/loss"} <= set(kept)
    table = confusion_table({0: ("p1", {"action": np.eye(8, dtype=int).tolist()})})
    assert len(table["count"]) == 64 and table["true_class"][9] == "Standing tackling"

    uri = shared_store
    tracker = RunTracker(uri, "table-test", "trial-0000-simplified", run_dir=tmp_path)
    sink = MLflowSink(tracker)
    for rec in recs:
        sink.log(rec)
    sink.close()
    assert tracker.end("FINISHED")
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert not [k for k in run.data.metrics if "/confusion/" in k]
    assert len(run.data.metrics) == len(kept)
    files = {a.path for a in client.list_artifacts(run.info.run_id, "confusion")}
    assert {"confusion/confusion_matrices.json", "confusion/per_epoch.html", "confusion/epoch_002.json"} <= files
    assert {"path": "confusion/confusion_matrices.json", "type": "table"} in json.loads(
        run.data.tags["mlflow.loggedArtifacts"])
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "confusion/confusion_matrices.json",
                                                      str(tmp_path / "dl"))).read_text())
    assert table["columns"] == ["epoch", "phase", "task", "true_class", "predicted_class", "count"]
    assert len(table["data"]) == 3 * (64 + 16)


def test_a_saved_model_folder_becomes_the_runs_logged_model(shared_store, tmp_path):
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    folder = tmp_path / "mlflow_model"
    mlflow.pyfunc.save_model(str(folder), python_model=Echo(), pip_requirements=["mlflow"])
    uri = shared_store
    tracker = RunTracker(uri, "model-test", "train-x", run_dir=tmp_path)
    tracker.log_model(folder, "model", step=4, tags={"trial": 3})
    assert tracker.end("FINISHED")
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert (model.name, str(model.status), output.step, model.tags["trial"]) == ("model", "READY", 4, "3")
    assert run.data.tags["mlflow_model_id"] == model.model_id
    mlflow.set_tracking_uri(uri)
    try:
        assert mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict([1, 2]) == [1, 2]
    finally:
        mlflow.set_tracking_uri("")
