"""The native stack end to end: PostgreSQL, a real `mlflow server`, `optuna-dashboard`, study workers.

The session fixture `native_stack` (tests/native_stack.py) starts it on 127.0.0.2 (standing in for another
machine's address, MLflow's basic auth on), kills worker 1 with SIGKILL mid-trial, stops worker 2 with SIGTERM
mid-trial and lets a third worker finish the study. These tests read the result through the servers' HTTP APIs
(and the Optuna storage for what only it knows), then tracking/stack.py's process handling on its own.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from native_stack import load_stack

pytestmark = pytest.mark.slow


def mlflow_api(stack, method: str, path: str, **kwargs) -> dict:
    r = requests.request(method, f"{stack.tracking_uri}/api/2.0/mlflow/{path}", timeout=30, auth=stack.auth,
                         **kwargs)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:500]}"
    return r.json()


def search_runs(stack, experiment_id: str, filter_string: str = "") -> list[dict]:
    runs, token = [], None
    while True:
        body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000}
        if token:
            body["page_token"] = token
        page = mlflow_api(stack, "POST", "runs/search", json=body)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def history(stack, run_id: str, key: str) -> list[dict]:
    return mlflow_api(stack, "GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key})["metrics"]


@pytest.fixture(scope="module")
def study(native_stack):
    import optuna

    return optuna.load_study(study_name=native_stack.study_name, storage=native_stack.storage)


@pytest.fixture(scope="module")
def experiment_id(native_stack) -> str:
    exp = mlflow_api(native_stack, "GET", "experiments/get-by-name",
                     params={"experiment_name": native_stack.study_name})["experiment"]
    return exp["experiment_id"]


def test_servers_healthy_and_workers_done(native_stack):
    rows = {r["name"]: r for r in native_stack.module.status(native_stack.directory)}
    assert set(rows) == {"mlflow", "optuna-dashboard", "worker-1", "worker-2", "worker-3"}
    for name in ("mlflow", "optuna-dashboard"):
        assert rows[name]["running"] and rows[name]["healthy"], name
    assert not any(rows[f"worker-{i}"]["running"] for i in (1, 2, 3))
    assert requests.get(f"{native_stack.tracking_uri}/health", timeout=10).text.strip() == "OK"
    print(f"stack up, study with a killed worker done in {native_stack.elapsed_s:.0f} s")


def test_study_ends_with_the_requested_finished_trials(native_stack, study):
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # --until: each worker stops once the study has TRIALS finished trials; one still running may add one more
    assert native_stack.trials <= len(finished) <= native_stack.trials + 1
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for t in finished:
        assert t.state == TrialState.COMPLETE and t.value is not None
        assert sorted(t.intermediate_values) == list(range(native_stack.epochs_per_trial)) or \
            t.system_attrs.get("retry_history")


def worker_logs(stack) -> str:
    return "".join(Path(s["log"]).read_text(errors="replace") for s in stack.state["services"]
                   if s["name"].startswith("worker"))


def resumed_after(stack, run_dir: str) -> int | None:
    """Epochs the retry of the trial in run_dir resumed after, as the worker that took it printed (None: no resume)."""
    found = re.findall(rf"resumed from {re.escape(run_dir)}\S* after (\d+) epochs", worker_logs(stack))
    return int(found[0]) if found else None


def test_killed_trial_resumed_from_its_checkpoint(native_stack, study, experiment_id):
    from optuna.trial import TrialState

    killed = study.trials[native_stack.killed_trial]
    assert killed.state == TrialState.FAIL, "the stale heartbeat marks the killed worker's trial failed"
    retries = [t for t in study.trials if (t.system_attrs.get("retry_history") or [None])[0] == killed.number]
    assert len(retries) == 1, [t.system_attrs for t in study.trials]
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    # same run folder (so the same checkpoint) and the same MLflow run
    assert retry.user_attrs["run_dir"] == killed.user_attrs["run_dir"]
    assert retry.user_attrs["mlflow_run_id"] == killed.user_attrs["mlflow_run_id"]
    # it continued after the checkpointed epochs instead of starting over at epoch 0
    # (the retry inherits the killed trial's intermediate values, so the resume is read from the workers' logs)
    resumed = resumed_after(native_stack, retry.user_attrs["run_dir"])
    assert resumed is not None and resumed >= native_stack.killed_after >= 1, worker_logs(native_stack)[-2000:]
    assert max(retry.intermediate_values) == native_stack.epochs_per_trial - 1
    run = mlflow_api(native_stack, "GET", "runs/get", params={"run_id": retry.user_attrs["mlflow_run_id"]})["run"]
    assert run["info"]["status"] == "FINISHED"
    assert tags(run)["retry_of_trial"] == str(killed.number)
    logged = {m["step"] for m in history(native_stack, run["info"]["run_id"], "val/leaderboard")}
    assert set(range(native_stack.killed_after, native_stack.epochs_per_trial)) <= logged


def test_no_mlflow_run_left_running(native_stack, experiment_id):
    runs = search_runs(native_stack, experiment_id)
    assert runs
    assert [r["info"]["run_name"] for r in runs if r["info"]["status"] == "RUNNING"] == []
    assert search_runs(native_stack, experiment_id, "attributes.status = 'RUNNING'") == []


def test_mlflow_lists_nested_trial_runs_with_step_metrics_and_confusion_matrices(native_stack, study,
                                                                                 experiment_id):
    from optuna.trial import TrialState

    parent_id = study.user_attrs["mlflow_parent_run_id"]
    runs = search_runs(native_stack, experiment_id)
    children = {r["info"]["run_id"]: r for r in runs if tags(r).get("mlflow.parentRunId") == parent_id}
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert {t.user_attrs["mlflow_run_id"] for t in complete} <= set(children)
    for t in complete:
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run["info"]["status"] == "FINISHED"
        assert tags(run)["variant"] == t.params["variant"] and tags(run)["optuna.trial_number"] in (
            str(t.number), str((t.system_attrs.get("retry_history") or [None])[0]))
        for key in ("val/action/macro_recall", "val/severity/recall/red_card", "val/leaderboard", "train/loss",
                    "val/loss"):
            steps = sorted(m["step"] for m in history(native_stack, run["info"]["run_id"], key))
            assert set(steps) == set(range(native_stack.epochs_per_trial)), (key, steps)
        listed = mlflow_api(native_stack, "GET", "artifacts/list",
                            params={"run_id": run["info"]["run_id"], "path": "confusion"})["files"]
        names = {Path(f["path"]).name for f in listed}
        # a retried trial's run holds the epochs run after the resume for sure (what the killed worker had not
        # sent yet died with it: it may have checkpointed one more epoch than its log showed when it was killed);
        # every other run holds all of them
        retried = t.system_attrs.get("retry_history")
        first = (resumed_after(native_stack, t.user_attrs["run_dir"]) or 0) if retried else 0
        expected = {f"epoch_{step:03d}.json" for step in range(first, native_stack.epochs_per_trial)}
        assert expected | {"best.html"} <= names, names
        r = requests.get(f"{native_stack.tracking_uri}/get-artifact", timeout=30, auth=native_stack.auth,
                         params={"run_uuid": run["info"]["run_id"], "path": f"confusion/epoch_{first:03d}.json"})
        assert r.status_code == 200
        cms = r.json()
        assert len(cms["action"]) == 8 and all(len(row) == 8 for row in cms["action"])
        assert len(cms["severity"]) == 4 and sum(map(sum, cms["severity"])) > 0
    # the artifacts were uploaded through the server (--serve-artifacts) into the stack's folder
    assert any((native_stack.directory / "mlartifacts").rglob("epoch_000.json"))


def test_dashboard_api_lists_the_study_and_its_trials(native_stack, study):
    r = requests.get(f"{native_stack.dashboard_url}/api/studies", timeout=30)
    assert r.status_code == 200
    summaries = {s["study_name"]: s for s in r.json()["study_summaries"]}
    assert native_stack.study_name in summaries
    study_id = summaries[native_stack.study_name]["study_id"]
    detail = requests.get(f"{native_stack.dashboard_url}/api/studies/{study_id}", params={"after": 0}, timeout=30)
    assert detail.status_code == 200
    served = {t["number"]: t["state"] for t in detail.json()["trials"]}
    assert served == {t.number: t.state.name.capitalize() for t in study.trials}
    assert "Fail" in served.values() and "Complete" in served.values()


def test_sigterm_trial_is_handed_back_and_resumed_from_its_checkpoint(native_stack, study):
    """Worker 2 got SIGTERM mid-trial: it finished the epoch, flushed MLflow, handed the trial back and exited
    (143); worker 3 took the retry first and resumed it from its checkpoint, in the same MLflow run, every epoch
    logged once."""
    from optuna.trial import TrialState

    log2 = Path(native_stack.state["services"][3]["log"]).read_text(errors="replace")
    assert native_stack.stopped_rc == 143, log2[-2000:]
    assert f"trial {native_stack.stopped_trial} handed back" in log2, log2[-2000:]
    stopped = study.trials[native_stack.stopped_trial]
    assert stopped.state == TrialState.FAIL
    retries = [t for t in study.trials if (t.system_attrs.get("retry_history") or [None])[-1] == stopped.number]
    assert len(retries) == 1, [t.system_attrs for t in study.trials]
    retry = retries[0]
    assert retry.system_attrs["handed_back_retries"] == 1
    assert retry.state == TrialState.COMPLETE and retry.params == stopped.params
    assert retry.user_attrs["run_dir"] == stopped.user_attrs["run_dir"]
    assert retry.user_attrs["mlflow_run_id"] == stopped.user_attrs["mlflow_run_id"]
    log3 = Path(native_stack.state["services"][4]["log"]).read_text(errors="replace")
    resumed = re.findall(rf"resumed from {re.escape(retry.user_attrs['run_dir'])}\S* after (\d+) epochs", log3)
    assert resumed and int(resumed[0]) >= native_stack.stopped_after >= 1, log3[-2000:]
    run = mlflow_api(native_stack, "GET", "runs/get", params={"run_id": retry.user_attrs["mlflow_run_id"]})["run"]
    assert run["info"]["status"] == "FINISHED" and tags(run)["handed_back"] == "true"
    steps = [m["step"] for m in history(native_stack, run["info"]["run_id"], "val/leaderboard")]
    assert sorted(steps) == list(range(native_stack.epochs_per_trial)), steps     # none missing, none twice


def test_no_password_on_any_command_line(native_stack):
    """The admin URL's password (as given and percent-decoded), the roles' and MLflow's admin password: in no
    process's arguments while everything ran, nor in state.json; the secrets files are private."""
    assert native_stack.ps_snapshot.count("mvfouls_ab.study") >= 2, native_stack.ps_snapshot[-2000:]
    assert "mlflow" in native_stack.ps_snapshot and "dashboard.py" in native_stack.ps_snapshot
    for secret in native_stack.secrets:
        assert secret and secret not in native_stack.ps_snapshot, secret[:3]
    state_text = (native_stack.directory / "state.json").read_text()
    for secret in native_stack.secrets:
        assert secret not in state_text
    for name in ("pgpass", "state.json", "basic_auth.ini"):
        assert oct((native_stack.directory / name).stat().st_mode & 0o777) == "0o600", name
    logs = "".join(p.read_text(errors="replace") for p in (native_stack.directory / "logs").glob("*.log"))
    for secret in native_stack.secrets:
        assert secret not in logs


def test_remote_address_allowed_hosts_and_basic_auth(native_stack, study):
    """MLflow published on 127.0.0.2 (another machine's address, as far as Host headers go): the workers, which
    use that address, logged every run (no 403); a name from --allowed-hosts is served; a foreign Host header is
    refused (403); no credentials: 401. The dashboard refuses a foreign Host header too (DNS rebinding)."""
    from native_stack import REMOTE_HOST

    assert native_stack.tracking_uri.startswith(f"http://{REMOTE_HOST}:")
    assert all(t.user_attrs.get("mlflow_run_id") for t in study.trials)
    port = native_stack.tracking_uri.rsplit(":", 1)[1]
    url = f"{native_stack.tracking_uri}/api/2.0/mlflow/experiments/get-by-name"
    params = {"experiment_name": native_stack.study_name}
    ok = requests.get(url, params=params, auth=native_stack.auth, timeout=30, headers={"Host": f"tracking.lan:{port}"})
    assert ok.status_code == 200, ok.text[:300]
    evil = requests.get(url, params=params, auth=native_stack.auth, timeout=30, headers={"Host": "evil.example"})
    assert evil.status_code == 403
    assert requests.get(url, params=params, timeout=30).status_code == 401
    assert requests.get(f"{native_stack.tracking_uri}/health", timeout=30).status_code == 200
    dash = native_stack.dashboard_url
    assert requests.get(f"{dash}/api/meta", timeout=30).status_code == 200
    assert requests.get(f"{dash}/api/meta", timeout=30, headers={"Host": "evil.example:8080"}).status_code == 403
    assert requests.delete(f"{dash}/api/studies/1", timeout=30, headers={"Host": "evil.example"}).status_code == 403


def test_each_database_has_its_own_role(native_stack):
    """MLflow and Optuna each use a login role of their own (no superuser) that can open its database only."""
    import psycopg2

    state = native_stack.state
    mlflow_db, optuna_db = state["databases"]
    assert state["roles"] == [mlflow_db, optuna_db]
    assert f"//{optuna_db}@" in native_stack.storage
    for role, other in ((mlflow_db, optuna_db), (optuna_db, mlflow_db)):
        conn = psycopg2.connect(f"postgresql://{role}@127.0.0.1:5432/{role}")
        with conn.cursor() as cur:
            cur.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == (False, False, False)
        conn.close()
        with pytest.raises(psycopg2.OperationalError, match="permission denied"):
            psycopg2.connect(f"postgresql://{role}@127.0.0.1:5432/{other}")


def test_stop_ends_exactly_the_recorded_process_groups(tmp_path):
    """down() kills each recorded process group (children included) and nothing else, not even a reused PID."""
    stack = load_stack()
    directory = tmp_path / "stack"
    # a service whose shell starts a child in its process group
    service = stack.spawn("svc", ["sh", "-c", "sleep 120 & wait"], directory / "logs" / "svc.log")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        # a record whose PID now belongs to another process (the bystander) must be left alone
        reused = {"name": "old", "pid": bystander.pid, "pgid": bystander.pid, "start_ticks": 1, "cmd": [],
                  "log": str(directory / "logs" / "old.log")}
        stack.write_state(directory, {"dir": str(directory), "services": [reused, service], "databases": []})
        time.sleep(0.3)
        assert [r["running"] for r in stack.status(directory)] == [False, True]
        children = subprocess.run(["pgrep", "-g", str(service["pgid"])], capture_output=True, text=True,
                                  check=False).stdout.split()
        assert len(children) >= 2
        assert stack.main(["status", "--dir", str(directory)]) == 0
        assert stack.down(directory, timeout=5) == ["svc"]
        assert not stack._group_exists(service["pgid"])
        assert bystander.poll() is None, "a process the stack did not start was killed"
        assert stack.main(["status", "--dir", str(directory)]) == 1
        assert json.loads((directory / "state.json").read_text())["services"][1]["name"] == "svc"
        assert oct((directory / "state.json").stat().st_mode & 0o777) == "0o600"
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()
        if stack._group_exists(service["pgid"]):
            os.killpg(service["pgid"], signal.SIGKILL)
