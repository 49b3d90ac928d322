"""python -m mvfouls_ab.train: a real subprocess run on the tiny data set (slow), and one-line errors with exit code 2."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mvfouls_ab.cli import train as train_cli
from mvfouls_ab.config import load_config
from mvfouls_ab.evaluation.official import official_metrics

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = ("current", "progressive", "recommended", "plain_ce")


def train(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MVFOULS_AB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mvfouls_ab.train", *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_files_are_valid_configs(name):
    cfg = load_config(REPO / "experiments" / f"{name}.yaml")
    assert cfg.data_root == ""


def test_current_recipe_is_todays_recipe():
    cfg = load_config(REPO / "experiments" / "current.yaml")
    assert (cfg.variant, cfg.num_phases, cfg.loss, cfg.scheduler) == ("baseline", 1, "focal", "step")
    assert cfg.max_weight_phase1 == 10.0 and cfg.backbone_lr_mult_phase1 == 0.1
    assert "severity:3=8" in cfg.oversample and cfg.focal_gamma >= 5


@pytest.mark.slow
def test_cli_trains_and_writes_the_run_folder(tiny_mvfouls: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = train("--data", str(tiny_mvfouls), "--config", str(REPO / "experiments" / "recommended.yaml"),
                 "--set", "phase1_epochs=1", "--set", "phase2_epochs=1", "--set", "phase3_epochs=1",
                 "--set", "frame_size=32", "--set", "num_frames=8", "--set", "batch_size=4",
                 "--out", str(out), "--profile", "cpu", "--quiet", cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(epoch_lines) == 3 and "LB" in epoch_lines[0]
    assert "test: official leaderboard" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "events.jsonl", "predictions_valid.json", "predictions_test.json",
                 "official_metrics.json", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    saved = json.loads((out / "official_metrics.json").read_text())
    gt = tiny_mvfouls / "Test" / "annotations.json"
    assert saved["official"]["test"] == official_metrics(gt, out / "predictions_test.json")
    # the same command again resumes the finished run instead of training anew
    again = train("--data", str(tiny_mvfouls), "--config", str(REPO / "experiments" / "recommended.yaml"),
                  "--set", "phase1_epochs=1", "--set", "phase2_epochs=1", "--set", "phase3_epochs=1",
                  "--set", "frame_size=32", "--set", "num_frames=8", "--set", "batch_size=4",
                  "--out", str(out), "--profile", "cpu", "--quiet", cwd=tmp_path, cache=tmp_path / "cache")
    assert again.returncode == 0 and not [x for x in again.stdout.splitlines() if x.startswith("[")]

    # tracked like a trial: the default store in the working directory, one run (resumed, not duplicated)
    from mlflow import MlflowClient

    from mvfouls_ab.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mvfouls-train")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    runs = client.search_runs([exp.experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("role") != "representation"]
    (stage,) = [r for r in runs if r.data.tags.get("role") == "representation"]   # learnt once, its own run
    assert stage.info.status == "FINISHED" and client.get_metric_history(stage.info.run_id, "holdout/score")
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("train-recommended-")
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert {"variant", "phase_plan", "data_fingerprint", "git_commit", "mlflow.source.name"} <= set(run.data.tags)
    assert run.data.tags["targets_met_valid"].endswith("/6")
    assert len(client.get_metric_history(run.info.run_id, "val/leaderboard")) == 3
    assert not [k for k in run.data.metrics if "/confusion/" in k]
    assert {"summary/test/leaderboard", "best/val/leaderboard"} <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions", "checkpoint", "confusion", "learning_curves.html"} <= names
    assert [m.model_id for m in run.outputs.model_outputs] == [run.data.tags["mlflow_model_id"]]
    assert (out / "mlflow_model" / "MLmodel").is_file()
    assert "MLflow: mlflow ui --backend-store-uri sqlite:///mlflow.db" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (("--set", "no_such_key=1"), "unknown TrainingConfig key 'no_such_key'"),
    (("--set", "variant=huge"), "variant='huge' is not one of"),
    (("--config", "missing.yaml"), "missing.yaml: config file not found"),
    (("--data", "no/such/folder"), "no/such/folder"),
    (("--tracking-uri", "htp:/x"), "--tracking-uri"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MVFOULS_AB_CACHE", str(tmp_path / "cache"))
    assert train_cli.main(list(args)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"[A-Za-z]+Error: ", lines[0]) and needle in lines[0], err
