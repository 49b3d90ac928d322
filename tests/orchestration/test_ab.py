"""The A/B runner end to end on tiny real data: folds, cells in a real Optuna storage, nested MLflow runs, resume."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mvfouls_ab.cli import ab
from mvfouls_ab.data import load_data
from mvfouls_ab.errors import ConfigError, StudyError
from mvfouls_ab.orchestration import ab as abtest
from mvfouls_ab.orchestration.storage import open_storage
from mvfouls_ab.reporting.report import write_experiment_report

torch.set_num_threads(1)

EXPERIMENT = """
description: tiny two-arm experiment for the tests
base: {num_frames: 4, frame_size: 32, phase1_epochs: 1, phase2_epochs: 1, phase3_epochs: 0, batch_size: 4,
       device: cpu, threads: 1, backbone: small3d, feature_mode: frozen, rep_holdout: 0.0}
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


def test_inner_split_is_stratified_and_the_same_for_every_arm() -> None:
    rng = np.random.default_rng(1)
    action = rng.choice(8, size=400, p=[.15, .45, .04, .12, .03, .05, .14, .02])
    severity = rng.choice(4, size=400, p=[.13, .56, .29, .02])
    outer = abtest.fold_assignment(action, severity, 5, seed=2)
    training = np.flatnonzero(outer != 0)
    inner = abtest.inner_split(action[training], severity[training], seed=2, fold=0)
    assert abs(inner.mean() - 1 / abtest.INNER_FOLDS) < 0.02          # one part in INNER_FOLDS
    for labels, k in ((action[training], 8), (severity[training], 4)):
        share = np.bincount(labels[inner], minlength=k) / np.maximum(np.bincount(labels, minlength=k), 1)
        common = np.bincount(labels, minlength=k) >= 20
        assert np.all(np.abs(share[common] - 0.2) < 0.06), share      # every common class ~1/5 in inner Valid
    # a function of (seed, fold) only: every arm gets the same inner split; other cells get other ones
    assert (abtest.inner_split(action[training], severity[training], 2, 0) == inner).all()
    assert (abtest.inner_split(action[training], severity[training], 2, 1) != inner).any()
    assert (abtest.inner_split(action[training], severity[training], 3, 0) != inner).any()


def test_fold_bundle_scores_the_held_out_fold_and_selects_on_the_training_folds(setup) -> None:
    """Nested selection, structurally: Test = the held-out fold; Train and the inner Valid (what selects epochs
    and tau) come only from the other folds; every pooled action is scored exactly once per seed."""
    exp, tmp, _, _ = setup
    data = load_data(exp.base.replace(**exp.final))
    scored = []
    for fold in range(2):
        b = abtest.fold_bundle(data, 2, 0, fold, tmp / "folds")
        assert b.chall is data.chall and b.test is not data.test
        source = {name: json.loads(split.annotations_path.read_text())["Source"]
                  for name, split in (("Train", b.train), ("Valid", b.valid), ("Test", b.test))}
        for name, split in (("Train", b.train), ("Valid", b.valid), ("Test", b.test)):
            assert [a.action_id for a in split.actions] == [str(i) for i in range(len(split.actions))]
            assert set(source[name]) == {a.action_id for a in split.actions}
        train, valid, test = (set(source[n].values()) for n in ("Train", "Valid", "Test"))
        assert valid and train and test
        assert not (test & (train | valid)) and not (train & valid)   # no scored action selects or trains
        assert len(train | valid | test) == len(data.train.actions) + len(data.valid.actions)
        doc = json.loads(b.test.annotations_path.read_text())
        assert "held-out" in doc["Fold"] and doc["Actions"]["0"]["Clips"][0]["Url"].startswith("Dataset/")
        scored += list(test)
    assert sorted(scored) == sorted([f"Train/{a.action_id}" for a in data.train.actions]
                                    + [f"Valid/{a.action_id}" for a in data.valid.actions])  # each once scored


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
    with pytest.raises(StudyError, match="is not a storage URL"):
        open_storage("optuna.db")


def test_every_shipped_experiment_loads() -> None:
    files = sorted(Path(__file__).resolve().parents[2].glob("experiments/ab_*.yaml"))
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
    assert abtest.finish(exp, storage, tracking, out, report=write_experiment_report) == 0
    text = capsys.readouterr().out
    assert "(complete)" in text and abtest.PRIMARY_METRIC in text and "no detectable difference" in text
    assert "corrected resampled t" in text
    verdicts = json.loads((out / "verdicts.json").read_text())
    quality = [v for v in verdicts if v["family"] == "quality"]
    assert len(quality) == len(abtest.quality_metrics())  # one treatment arm x every quality metric
    assert {v["metric"] for v in verdicts if v["family"] == "efficiency"} == {"system/wall_s", "system/peak_rss_mb"}
    assert all(v["n"] == 4 and v["folds"] == 2 for v in verdicts)
    assert (out / "report.html").stat().st_size > 1_000_000
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "verdict.dual" in parent.data.tags
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "verdicts"} <= names

    # every cell: scored on its held-out fold, its own wall time and peak memory, the epoch chosen on inner Valid
    finished = abtest.CellStore(exp, storage).finished()
    for cell in finished.values():
        assert 0 <= cell["metrics"][abtest.PRIMARY_METRIC] <= 1
        assert cell["metrics"]["system/wall_s"] > 0 and cell["metrics"]["system/peak_rss_mb"] > 50
        assert cell["rss_method"] in ("hwm", "sampled") and 1 <= cell["selected"]["epoch"] <= cell["epochs"]
        assert set(cell["official"]) >= {"valid", "test"}   # the trainer scored inner Valid and the held-out fold

    # `ab analyze` on the CSV of cells the runner wrote reproduces the runner's verdicts
    assert ab.main(["analyze", "--cells", str(out / "cells.csv"), "--control", exp.control,
                    "--out", str(tmp / "reanalysis"), "--no-report"]) == 0
    again = json.loads((tmp / "reanalysis" / "verdicts.json").read_text())
    assert [(v["arm"], v["metric"], v["verdict"]) for v in again] == [(v["arm"], v["metric"], v["verdict"])
                                                                      for v in verdicts]
    for a, b in zip(again, verdicts):
        assert a.keys() == b.keys()
        for key, value in b.items():
            assert a[key] == (pytest.approx(value) if isinstance(value, float) else value), key


@pytest.mark.slow
def test_no_scored_fold_example_chooses_an_epoch_or_tau(setup) -> None:
    """Black box: scrambling the held-out fold's labels changes nothing the cell selects (every epoch's inner
    validation record, the chosen epoch, the post-hoc tau), only its scores; scrambling the inner Valid's labels
    does change the selection signal, so the check has teeth."""
    import dataclasses

    from mvfouls_ab.training.trainer import Trainer

    exp, tmp, _, _ = setup
    cfg = exp.config("plain", 0).replace(phase1_epochs=3, phase2_epochs=0, num_phases=1, posthoc_adjust=True)
    data = load_data(exp.base.replace(**exp.final))
    bundle = abtest.fold_bundle(data, 2, 0, 0, tmp / "nested_folds")
    abtest.prefill_fold_features(cfg, data, bundle)

    def scrambled(split):
        actions = [dataclasses.replace(a, action=(a.action + 3) % 8, severity=(a.severity + 1) % 4)
                   for a in split.actions]
        return dataclasses.replace(split, actions=actions)

    def run(b, name):
        result = Trainer(cfg, b, [], run_dir=tmp / "nested" / name, resume=False, progress=False).run()
        inner = [(r.step, r.leaderboard, r.val_loss, r.action_per_class_recall) for r in result.history]
        return result, inner, abtest.scored_record(result, b)

    base, inner, scored = run(bundle, "base")
    other, inner_other, scored_other = run(dataclasses.replace(bundle, test=scrambled(bundle.test)), "test")
    assert inner_other == inner                                   # the selection signal never saw the scored fold
    assert other.best.step == base.best.step and other.taus == base.taus
    assert scored_other.leaderboard != scored.leaderboard         # ... which was scored (with other labels)
    _, inner_valid, _ = run(dataclasses.replace(bundle, valid=scrambled(bundle.valid)), "valid")
    assert inner_valid != inner                                   # the inner Valid is what selects


@pytest.mark.slow
def test_dead_worker_cell_is_rerun(setup, monkeypatch) -> None:
    """A worker that claimed a cell and died (no heartbeat) loses it after the grace period; the next worker runs it."""
    exp, tmp, _, _ = setup
    exp = abtest.Experiment(exp.name + "_dead", exp.description, exp.base, exp.arms, exp.control, 1, 2,
                            final=exp.final)
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
    ran = []   # the cell itself is not what this tests (the end-to-end test trains cells): record, do not train

    def fake_cell(experiment, c, data, out, tracking_uri, arm_run_id):
        ran.append(c.key)
        return 0.5, {"metrics": {}, "epochs": 1, "wall_s": 0.0}

    monkeypatch.setattr(abtest, "run_cell", fake_cell)
    summary = abtest.run_worker(exp, storage, None, tmp / "dead_out", data=object())
    assert summary.ran == [cell.key] == ran and not summary.failed   # only the dead worker's cell is rerun
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


# ---- `ab analyze`: verdicts for a CSV of cells made anywhere -------------------------------------------------
def _cells_csv(path: Path, arms=("A", "B"), seeds=3, folds=4, effect=0.0, rows_extra: str = "",
               metrics=("heldout/leaderboard", "heldout/action/macro_recall", "system/wall_s")) -> Path:
    rng = np.random.default_rng(0)
    lines = ["arm,seed,fold,metric,value"]
    for arm in arms:
        for s in range(seeds):
            for f in range(folds):
                for m in metrics:
                    base = 10.0 if m.endswith("_s") else 0.5
                    lines.append(f"{arm},{s},{f},{m},{base + (effect if arm != arms[0] else 0) + rng.normal(0, .02)}")
    path.write_text("\n".join(lines) + "\n" + rows_extra)
    return path


def _analyze(capsys, *args: str) -> tuple[int, str]:
    rc = ab.main(["analyze", *args])
    return rc, capsys.readouterr().err


def test_analyze_writes_verdicts_on_each_metrics_direction(tmp_path: Path, capsys) -> None:
    csv = _cells_csv(tmp_path / "cells.csv", effect=0.1, seeds=5, folds=5)
    rc = ab.main(["analyze", "--cells", str(csv), "--control", "A", "--out", str(tmp_path / "out"), "--no-report"])
    assert rc == 0
    verdicts = json.loads((tmp_path / "out" / "verdicts.json").read_text())
    assert isinstance(verdicts, list) and len(verdicts) == 3
    required = {"arm", "metric", "n", "diff", "ci_low", "ci_high", "p_value", "p_adjusted", "verdict"}
    assert all(required <= set(v) for v in verdicts)
    by = {v["metric"]: v for v in verdicts}
    assert by["heldout/leaderboard"]["verdict"] == "B better" and by["heldout/leaderboard"]["n"] == 25
    assert by["system/wall_s"]["verdict"] == "B worse"          # +0.1 s: lower is better
    assert by["system/wall_s"]["family"] == "efficiency" and by["heldout/leaderboard"]["folds"] == 5
    assert by["heldout/leaderboard"]["ci_low"] < by["heldout/leaderboard"]["diff"] < by["heldout/leaderboard"]["ci_high"]


@pytest.mark.slow
def test_analyze_imports_no_torch_and_answers_quickly(tmp_path: Path) -> None:
    import subprocess
    import sys

    csv = _cells_csv(tmp_path / "cells.csv", arms=("A", "B", "C"))
    code = ("import sys, time; t = time.perf_counter(); from mvfouls_ab import ab; "
            f"rc = ab.main(['analyze', '--cells', {str(csv)!r}, '--control', 'A', '--out', {str(tmp_path / 'o')!r}]); "
            "print(rc, 'torch' in sys.modules, time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    rc, torch_loaded, seconds = proc.stdout.split()[-3:]
    assert rc == "0" and torch_loaded == "False", proc.stdout + proc.stderr
    assert (tmp_path / "o" / "report.html").stat().st_size > 1_000_000 and (tmp_path / "o" / "verdicts.json").is_file()
    assert float(seconds) < 30   # a few seconds on a quiet machine (import pandas/scipy/plotly, write the report)


@pytest.mark.parametrize("case", ["missing column", "control absent", "arm absent", "unpaired", "one fold",
                                  "non-numeric", "missing file", "duplicate"])
def test_analyze_bad_input_names_the_file_the_problem_and_the_fix(tmp_path: Path, capsys, case: str) -> None:
    csv = tmp_path / f"{case.replace(' ', '_')}.csv"
    control, expect = "A", ""
    if case == "missing column":
        csv.write_text("arm,seed,fold,value\nA,0,0,0.5\n")
        expect = "missing column metric"
    elif case == "control absent":
        _cells_csv(csv)
        control, expect = "Z", "control arm 'Z' is absent (arms: A, B)"
    elif case == "arm absent":
        _cells_csv(csv, arms=("A",))
        expect = "only the control arm 'A' is present"
    elif case == "unpaired":
        _cells_csv(csv, rows_extra="B,7,0,heldout/leaderboard,0.4\n")
        text = csv.read_text().replace("A,1,2,heldout/leaderboard", "A,1,2,heldout/removed", 1)
        csv.write_text(text)
        expect = "3 unpaired cells: "
    elif case == "one fold":
        _cells_csv(csv, folds=1)
        expect = "fewer than 2 folds"
    elif case == "non-numeric":
        _cells_csv(csv, rows_extra="A,9,0,heldout/leaderboard,high\n")
        expect = "non-numeric value (line 74: 'high')"
    elif case == "missing file":
        expect = "file not found"
    elif case == "duplicate":
        _cells_csv(csv, rows_extra="A,0,0,heldout/leaderboard,0.4\n")
        expect = "repeat an (arm, seed, fold, metric): A seed 0 fold 0 heldout/leaderboard"
    rc, err = _analyze(capsys, "--cells", str(csv), "--control", control, "--out", str(tmp_path / "out"))
    assert rc == 2
    assert err.startswith("AnalysisError: ") and str(csv) in err and "Fix:" in err, err
    assert expect in err, err
    assert not (tmp_path / "out" / "verdicts.json").exists()
    if case == "unpaired":   # every unpaired cell is listed, from both sides
        assert "A lacks seed 7 fold 0 of heldout/leaderboard (which B has)" in err
        assert "A lacks seed 1 fold 2 of heldout/leaderboard (which B has)" in err
        assert "B lacks seed 1 fold 2 of heldout/removed" in err
