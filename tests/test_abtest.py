"""The A/B runner end to end on tiny real data: folds, cells in a real Optuna storage, nested MLflow runs, resume."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mvfouls_ab import ab, abtest
from mvfouls_ab.data import load_data
from mvfouls_ab.errors import ConfigError, StudyError

torch.set_num_threads(1)

EXPERIMENT = """
description: tiny two-arm experiment for the tests
base: {num_frames: 4, frame_size: 32, phase1_epochs: 1, phase2_epochs: 1, phase3_epochs: 0, batch_size: 4,
       device: cpu, threads: 1, backbone: small3d, feature_mode: frozen}
arms:
  plain: {variant: simplified}
  dual: {variant: baseline, description: today's dual attention}
seeds: 2
folds: 2
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_mvfouls: Path):
    tmp = tmp_path_factory.mktemp("ab")
    path = tmp / "ab_tiny.yaml"
    path.write_text(EXPERIMENT)
    exp = abtest.load_experiment(path, overrides=[f"data_root={tiny_mvfouls}", f"cache_dir={tmp / 'cache'}"])
    return exp, tmp, f"sqlite:///{tmp / 'optuna.db'}", f"sqlite:///{tmp / 'mlflow.db'}"


def test_stratified_folds_cover_both_tasks() -> None:
    rng = np.random.default_rng(0)
    action = rng.choice(8, size=400, p=[.15, .45, .04, .12, .03, .05, .14, .02])
    severity = rng.choice(4, size=400, p=[.13, .56, .29, .02])
    assign = abtest.fold_assignment(action, severity, 5, seed=3)
    assert set(assign) == set(range(5)) and np.bincount(assign).min() >= 78  # 400 / 5, nearly equal
    plain = np.random.default_rng(3).permutation(np.arange(400) % 5)   # unstratified folds, for comparison
    for labels, k in ((action, 8), (severity, 4)):
        spread = {}
        for name, folds in (("stratified", assign), ("plain", plain)):
            counts = np.stack([np.bincount(labels[folds == f], minlength=k) for f in range(5)])
            spread[name] = counts.max(axis=0) - counts.min(axis=0)
        # every class of both tasks spread evenly over the folds, far more evenly than unstratified folds
        assert spread["stratified"].max() <= 3 and spread["stratified"].sum() < spread["plain"].sum() / 2, spread
    assert (abtest.fold_assignment(action, severity, 5, seed=3) == assign).all()  # deterministic
    assert (abtest.fold_assignment(action, severity, 5, seed=4) != assign).any()   # reshuffled per seed
    merged = abtest.stratification_labels(action, severity, 5)
    assert Counter(merged).most_common()[-1][1] >= 5  # rare combinations merged upward


def test_fold_bundle_repartitions_train_and_valid_only(setup) -> None:
    exp, tmp, _, _ = setup
    data = load_data(exp.base)
    seen = []
    for fold in range(2):
        b = abtest.fold_bundle(data, 2, 0, fold, tmp / "folds")
        assert b.test is data.test and b.chall is data.chall
        src = json.loads(b.valid.annotations_path.read_text())["Source"]
        assert [a.action_id for a in b.valid.actions] == [str(i) for i in range(len(b.valid.actions))]
        assert len(b.train.actions) + len(b.valid.actions) == len(data.train.actions) + len(data.valid.actions)
        doc = json.loads(b.train.annotations_path.read_text())
        assert set(doc["Actions"]) == {a.action_id for a in b.train.actions}
        assert doc["Actions"]["0"]["Clips"][0]["Url"].startswith("Dataset/")
        seen += list(src.values())
    assert sorted(seen) == sorted([f"Train/{a.action_id}" for a in data.train.actions]
                                  + [f"Valid/{a.action_id}" for a in data.valid.actions])  # each once held out


def test_experiment_file_errors(tmp_path: Path) -> None:
    bad = {"unknown top key": "arms: {a: {}, b: {}}\nwhatever: 1\n",
           "one arm": "arms: {a: {}}\n",
           "unknown config key": "arms: {a: {}, b: {no_such_knob: 1}}\n",
           "bad control": "control: z\narms: {a: {}, b: {}}\n",
           "bad value": "arms: {a: {}, b: {variant: huge}}\n"}
    for text in bad.values():
        p = tmp_path / "ab_bad.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match="ab_bad.yaml|variant"):
            abtest.load_experiment(p)
    with pytest.raises(ConfigError, match="not found"):
        abtest.load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(StudyError, match="not a database URL"):
        abtest.open_storage("optuna.db")


def test_every_shipped_experiment_loads() -> None:
    files = sorted(Path(__file__).resolve().parent.parent.glob("experiments/ab_*.yaml"))
    assert len(files) >= 6
    for f in files:
        exp = abtest.load_experiment(f)
        assert len(exp.arms) >= 2 and exp.control in [a.name for a in exp.arms]
        assert len({exp.config_hash(a.name) for a in exp.arms}) == len(exp.arms) or "seeds" in f.name


@pytest.mark.slow
def test_end_to_end_nested_runs_and_resume(setup, capsys) -> None:
    from mlflow import MlflowClient

    exp, tmp, storage, tracking = setup
    out = tmp / "out"
    first = abtest.run_worker(exp, storage, tracking, out)
    assert len(first.ran) == 8 and not first.failed  # 2 arms x 2 seeds x 2 folds
    assert first.counts["finished"] == 8

    # MLflow: parent run -> one run per arm -> one run per cell, every cell FINISHED with per-epoch metrics
    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name(exp.study_name).experiment_id], max_results=100)
    by_level = Counter(r.data.tags.get("ab_level") for r in runs)
    assert by_level == {"experiment": 1, "arm": 2, "cell": 8}
    parent = next(r for r in runs if r.data.tags["ab_level"] == "experiment")
    arm_runs = {r.data.tags["ab_arm"]: r.info.run_id for r in runs if r.data.tags["ab_level"] == "arm"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs
               if r.data.tags["ab_level"] == "arm")
    for r in (r for r in runs if r.data.tags["ab_level"] == "cell"):
        assert r.data.tags["mlflow.parentRunId"] == arm_runs[r.data.tags["ab_arm"]]
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "val/leaderboard")) == 2  # one per epoch

    # second invocation: nothing is rerun, verdicts and report come out, runs are closed
    t0 = time.perf_counter()
    second = abtest.run_worker(exp, storage, tracking, out)
    assert second.ran == [] and second.counts["finished"] == 8 and time.perf_counter() - t0 < 20
    assert ab.finish(exp, storage, tracking, out) == 0
    text = capsys.readouterr().out
    assert "(complete)" in text and "val/leaderboard" in text and "no detectable difference" in text
    verdicts = json.loads((out / "verdicts.json").read_text())["verdicts"]
    assert len(verdicts) == len(abtest.verdict_metrics())  # one treatment arm x every metric
    assert all(v["n"] == 4 and v["mde"] in (None, float("inf")) for v in verdicts)  # n = 4: no power
    assert (out / "report.html").stat().st_size > 1_000_000
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "verdict.dual" in parent.data.tags
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "verdicts"} <= names


def test_dead_worker_cell_is_rerun(setup, monkeypatch) -> None:
    """A worker that claimed a cell and died (no heartbeat) loses it after the grace period; the next worker runs it."""
    exp, tmp, _, _ = setup
    exp = abtest.Experiment(exp.name + "_dead", exp.description, exp.base, exp.arms, exp.control, 1, 2)
    storage = f"sqlite:///{tmp / 'dead.db'}"
    monkeypatch.setattr(abtest, "HEARTBEAT_S", 1)
    monkeypatch.setattr(abtest, "GRACE_S", 2)
    store = abtest.CellStore(exp, storage)
    store.prepare()
    trial_id, cell = store.claim()
    store.storage.record_heartbeat(trial_id)   # the "dead" worker beat once, then vanished
    while (other := store.claim()) is not None:  # the other cells finish normally (results made up: not used)
        store.complete(other[0], 0.5, {"metrics": {}, "arm": other[1].arm})
    time.sleep(3)
    summary = abtest.run_worker(exp, storage, None, tmp / "dead_out")
    assert summary.ran == [cell.key] and not summary.failed   # only the dead worker's cell is rerun
    assert summary.counts["finished"] == 4 and summary.counts["failed_attempts"] == 1


@pytest.mark.slow
def test_cli_two_workers_share_the_storage(setup) -> None:
    """`--workers 2`: two processes claim cells from one storage; every cell finishes exactly once."""
    import subprocess
    import sys

    exp, tmp, _, _ = setup
    storage = f"sqlite:///{tmp / 'par.db'}"
    cmd = [sys.executable, "-m", "mvfouls_ab.ab", "--experiment", exp.source, "--seeds", "1", "--storage", storage,
           "--no-mlflow", "--no-report", "--workers", "2", "--out", str(tmp / "par_out"),
           "--set", f"data_root={exp.final['data_root']}", "--set", f"cache_dir={exp.final['cache_dir']}"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(complete)" in proc.stdout
    import optuna

    study = optuna.load_study(study_name=exp.study_name, storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and len({t.user_attrs["cell"] for t in done}) == 4
    workers = {t.system_attrs.get("worker") for t in done}
    assert len(workers) == 2, workers  # both processes ran cells
