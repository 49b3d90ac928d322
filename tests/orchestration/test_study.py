"""The Optuna study end to end on a tiny data set: SQLite and PostgreSQL storages, real MLflow stores and server,
two worker processes, pruning, a worker killed with SIGKILL whose trial is retried and resumes from its checkpoint,
and one clear error per bad input."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from pg import free_port

from mvfouls_ab.cli import rank
from mvfouls_ab.cli import study as study_cli
from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.orchestration import ranking
from mvfouls_ab.orchestration import study as study_mod
from mvfouls_ab.tracking import normalize_db_url

ROOT = Path(__file__).resolve().parents[2]
TINY_SPACE = """
fixed: {num_phases: 3, phase1_epochs: 1, phase2_epochs: 2, phase3_epochs: 1, batch_size: 4, hidden_dim: 32,
        curriculum: false, rep_epochs: 3}
params:
  variant: {type: categorical, choices: [simplified, optimized]}
  phase2_lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""
SLOW_SPACE = TINY_SPACE.replace("phase2_epochs: 2", "phase2_epochs: 4")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_mvfouls):
    d = tmp_path_factory.mktemp("study")
    (d / "tiny.yaml").write_text(TINY_SPACE)
    (d / "slow.yaml").write_text(SLOW_SPACE)
    return {"dir": d, "data": tiny_mvfouls, "cache": d / "cache"}


def argv(setup, tmp_path, name, storage, tracking, *extra, space="tiny.yaml", trials=2):
    return ["--trials", str(trials), "--study-name", name, "--storage", storage, "--tracking-uri", tracking,
            "--data", str(setup["data"]), "--search-space", str(setup["dir"] / space), "--pruner", "none",
            "--out", str(tmp_path / "runs"), "--heartbeat", "1", "--threads", "1", "--quiet",
            "--set", f"cache_dir={setup['cache']}", *extra]


def children(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_default_search_space_file_equals_embedded_defaults():
    assert study_mod.load_search_space(ROOT / "experiments" / "search_space.yaml") == \
        study_mod.load_search_space(None)
    space = study_mod.load_search_space(None)
    assert {"variant", "complexity_level", "max_weight_phase2", "sampler_phase2", "curriculum_pacing",
            "curriculum_start", "phase1_epochs", "phase3_lr", "loss", "focal_gamma", "posthoc_tau_max"} \
        <= set(space["params"])


@pytest.mark.parametrize("bad, match", [
    (["--search-space", "{space}"], "unknown search-space key 'learning_rate'"),
    (["--storage", "notadb://x"], "is not a storage URL"),
    (["--storage", "postgresql://postgres@127.0.0.1:{port}/nope"], "cannot open storage"),
    (["--storage", "postgresql://postgres@127.0.0.1:port/db"], "invalid port"),
    (["--tracking-uri", "htp:/x"], "--tracking-uri"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, bad, match):
    space = tmp_path / "bad.yaml"
    space.write_text("params:\n  learning_rate: {type: float, low: 0.1, high: 1.0}\n")
    bad = [b.format(space=space, port=free_port()) for b in bad]
    code = study_cli.main(["--trials", "1", "--out", str(tmp_path), "--storage", f"sqlite:///{tmp_path}/o.db",
                           "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *bad])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("StudyError: ") and match in err


@pytest.mark.slow
def test_sqlite_study_tracks_ranks_and_prunes(setup, tmp_path, capsys):
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    result = study_mod.run(study_cli.parse_args(argv(setup, tmp_path, "sq", storage, tracking)))
    study = result["study"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    assert all(set(t.constraints) == {tg.name for tg in ranking.TARGETS} for t in done)
    for t in done:
        assert t.value == pytest.approx(100 * t.user_attrs["summary"]["valid"]["leaderboard"])
        assert set(t.user_attrs["predictions"]) >= {"valid", "test"}
        assert len(t.intermediate_values) == 4                  # trial.report every epoch
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri " + tracking in out and "optuna-dashboard " + storage in out
    assert out.index("watch it in") < out.index("trial 0 COMPLETE")            # where to look, at the start
    assert re.search(r"^trial 1 COMPLETE \| valid leaderboard [\d.]+ \| targets \d/6 \| best trial \d \([\d.]+\) "
                     r"\| 2/2 finished$", out, re.MULTILINE), out
    assert f"Model:   models:/mvfouls-sq@champion (version 1, trial {result['best']})" in out
    assert (tmp_path / "runs" / "sq" / "leaderboard.csv").is_file()
    assert Path(result["test"]["predictions"]).is_file()

    client = MlflowClient(tracking)
    (parent,), kids = children(client, "sq")
    assert parent.info.run_id == study.user_attrs["mlflow_parent_run_id"] and parent.info.status == "FINISHED"
    assert len(kids) == 2 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in kids)
    assert client.get_experiment_by_name("sq").tags["mlflow.experimentKind"] == "custom_model_development"
    champion = client.get_model_version_by_alias("mvfouls-sq", "champion")
    assert champion.run_id == study.trials[result["best"]].user_attrs["mlflow_run_id"]
    for run in kids:
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"trial-{int(run.data.tags['optuna.trial_number']):04d}-{run.data.tags['variant']}"
        assert {"mlflow.user", "mlflow.source.name", "mlflow.source.git.commit"} <= set(run.data.tags)
        assert run.outputs.model_outputs and not [k for k in run.data.metrics if "/confusion/" in k]
        assert {"variant", "phase_plan", "optuna.trial_number", "data_fingerprint", "git_commit"} <= set(run.data.tags)
        counts = {k: int(v) for k, v in run.data.params.items() if k.startswith("parameters_")}
        assert run.data.params["phase2_epochs"] == "2" and len(run.data.params) == len(TrainingConfig().flat()) + 4
        assert counts["parameters_trainable"] == counts["parameters_head"] > 0
        assert len(client.get_metric_history(run.info.run_id, "val/leaderboard")) == 4
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"predictions", "checkpoint", "confusion", "learning_curves.html"} <= names
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/optimization_history.html", "optuna/parallel_coordinate.html"} <= parent_files
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "ranking")} >= {"ranking/leaderboard.csv"}

    # A pruned trial: PRUNED in Optuna, KILLED + pruned=true in MLflow (a pruner that prunes every trial).
    args = study_cli.parse_args(argv(setup, tmp_path, "sq", storage, tracking))
    st, ctx, tracker, _ = study_mod.open_study(args, pruner=optuna.pruners.ThresholdPruner(lower=1000.0))
    st.optimize(lambda t: study_mod.objective(t, ctx), n_trials=1)
    study_mod.wait_closed()                         # objective() ends trial runs without waiting; run() waits
    pruned = st.trials[-1]
    assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.user_attrs["epochs_done"] == 1
    run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["pruned"] == "true"
    tracker.end("FINISHED")

    # python -m mvfouls_ab.rank: the same leaderboard (now with the pruned trial last), or one clear error.
    capsys.readouterr()
    assert rank.main(["--study", "sq", "--storage", storage, "--out", str(tmp_path / "ranked")]) == 0
    printed = capsys.readouterr().out
    assert "PRUNED" in printed and "best trial" in printed
    assert (tmp_path / "ranked" / "leaderboard.csv").read_text().count("\n") == 4
    assert rank.main(["--study", "nope", "--storage", storage]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_workers_share_a_postgres_study(setup, tmp_path, pg_url, mlflow_pg_server):
    cmd = [sys.executable, "-m", "mvfouls_ab.study",
           *argv(setup, tmp_path, "pg2", pg_url, mlflow_pg_server.url, "--workers", "2", trials=6)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="pg2", storage=normalize_db_url(pg_url))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 6
    assert len({t.user_attrs["worker"] for t in done}) == 2      # both processes ran trials
    client = MlflowClient(mlflow_pg_server.url)
    parents, kids = children(client, "pg2")
    assert len(parents) == 1
    assert len(kids) == len(study.trials), ([t.state for t in study.trials], proc.stdout[-3000:], proc.stderr[-3000:])
    assert "leaderboard CSV" in proc.stdout


KILLABLE_WORKER = textwrap.dedent("""
    import sys, time
    from mvfouls_ab.cli.study import parse_args
    from mvfouls_ab.orchestration import study

    class SlowSink:          # paces the epochs so the test can kill the worker mid-trial
        def log(self, record):
            time.sleep(1.0)
        def close(self):
            pass

    study.run(parse_args(sys.argv[1:]), extra_sinks=[SlowSink()])
""")


@pytest.mark.slow
def test_killed_worker_trial_is_retried_and_resumes(setup, tmp_path, pg_url):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    args = argv(setup, tmp_path, "kill", pg_url, tracking, space="slow.yaml", trials=1)
    worker = subprocess.Popen([sys.executable, "-c", KILLABLE_WORKER, *args], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = tmp_path / "runs" / "kill" / "trial_0000" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert worker.poll() is None, "worker ended before it could be killed"
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    killed_ms = time.time() * 1000
    killed_at = len(metrics.read_text().splitlines())            # epochs checkpointed before the kill
    assert 2 <= killed_at < 6

    time.sleep(2.5)                                   # > grace period (2 x heartbeat): the trial is stale
    proc = subprocess.run([sys.executable, "-m", "mvfouls_ab.study", *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="kill", storage=normalize_db_url(pg_url))
    first, retry = study.trials[0], study.trials[1]
    assert first.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == first.params
    assert retry.system_attrs["retry_history"] == [0]
    assert retry.user_attrs["run_dir"].endswith("trial_0000")
    assert sorted(retry.intermediate_values) == list(range(6))
    assert len(metrics.read_text().splitlines()) == 6
    # Continued from the checkpoint, not restarted: the retry trains only the epochs after it.
    assert re.search(rf"resumed from \S+ after {killed_at} epochs", proc.stderr), proc.stderr[-2000:]
    # Same MLflow run: every epoch logged exactly once. The epochs before the kill were sent by the killed worker,
    # or, when it died within the logger's linger window (metrics are sent a few epochs at a time), backfilled from
    # the checkpoint's records; the epochs after it come from the retry.
    client = MlflowClient(tracking)
    run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["retry_of_trial"] == "0"
    history = client.get_metric_history(run.info.run_id, "val/leaderboard")
    assert sorted(m.step for m in history) == list(range(6))
    assert all(m.timestamp > killed_ms for m in history if m.step >= killed_at)


def test_workers_started_together_adopt_one_parent_run(tmp_path, pg_url, mlflow_pg_server):
    """Independently started workers (compose replicas) race to create the study's MLflow parent run: all adopt
    the first claim, the others' runs are deleted. First a forced loss, then four threads released at once."""
    import threading

    from mlflow.entities import ViewType

    client = MlflowClient(mlflow_pg_server.url)
    storage = normalize_db_url(pg_url)

    def args(name):
        return study_cli.parse_args(["--study-name", name, "--storage", pg_url,
                                     "--tracking-uri", mlflow_pg_server.url, "--out", str(tmp_path)])

    # A worker that finds another's claim (made after it looked for a parent run) loses and deletes its own run.
    st = optuna.create_study(study_name="claimed", storage=storage)
    other = client.create_run(client.create_experiment("claimed"), tags={"role": "study"}).info.run_id
    st.set_user_attr("mlflow_parent_claim:none", other)
    tracker = study_mod.parent_run(st, args("claimed"), {})
    assert tracker.run_id == other == st.user_attrs["mlflow_parent_run_id"]
    assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("claimed").experiment_id])] \
        == [other]
    assert len(client.search_runs([client.get_experiment_by_name("claimed").experiment_id],
                                  run_view_type=ViewType.ALL)) == 2      # its own run was created, then deleted

    # Four workers released together: one parent run, the same for all of them.
    optuna.create_study(study_name="race", storage=storage)
    barrier, got, errors = threading.Barrier(4), [], []

    def worker():
        try:
            mine = optuna.load_study(study_name="race", storage=storage)
            barrier.wait()
            got.append(study_mod.parent_run(mine, args("race"), {}).run_id)
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 4 and len(set(got)) == 1, (errors, got)
    parents, _ = children(client, "race")
    assert [r.info.run_id for r in parents] == got[:1]
    assert optuna.load_study(study_name="race", storage=storage).user_attrs["mlflow_parent_run_id"] == got[0]


@pytest.mark.slow
def test_workers_stop_when_the_coordinator_fails_before_the_parent_run(setup, tmp_path, pg_url):
    """--workers 2 whose coordinator fails after starting the other worker (a data folder it cannot load): one
    exit code 2, the started worker ends too (its stdin closes) rather than waiting for a parent run."""
    bad = tmp_path / "not_mvfouls"
    (bad / "Train").mkdir(parents=True)
    cmd = [sys.executable, "-m", "mvfouls_ab.study",
           *argv(setup, tmp_path, "fail2", pg_url, f"sqlite:///{tmp_path}/m.db", "--workers", "2", "--data", str(bad))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not_mvfouls" in proc.stderr
    assert not subprocess.run(["pgrep", "-f", "fail2"], capture_output=True, check=False).stdout  # none left
