"""The HTML report: built from cells stored in a real Optuna storage, opened in headless Chromium offline."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mvfouls_ab.cli import report as report_cli
from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.labels import CLASS_SLUGS, TASKS
from mvfouls_ab.orchestration import ab as abtest
from mvfouls_ab.orchestration import stats
from mvfouls_ab.orchestration.storage import open_storage
from mvfouls_ab.reporting import report


def _fake_cell_attrs(rng: np.random.Generator, level: float, cell_effect: float) -> dict:
    """What abtest.cell_attrs stores for a finished cell, with recalls around `level` (+ a shared cell effect)."""
    best = {"epoch": 2, "step": 2, "phase": "optimization", "val_loss": 1.2, "train_loss": 1.0, "num_samples": 40}
    metrics = {"heldout/loss": 1.2}
    for task in TASKS:
        k = len(TASKS[task])
        recall = np.clip(level + cell_effect + rng.normal(0, 0.02, k), 0, 1)
        cm = np.diag((recall * 10).round().astype(int)) + 1
        best[f"{task}_per_class_recall"] = recall.tolist()
        best[f"{task}_macro_recall"] = float(recall.mean())
        best[f"{task}_macro_f1"] = float(recall.mean() - 0.05)
        best["confusion_matrices"] = {**best.get("confusion_matrices", {}), task: cm.tolist()}
        metrics[f"heldout/{task}/macro_recall"] = float(recall.mean())
        metrics[f"heldout/{task}/macro_f1"] = float(recall.mean() - 0.05)
        metrics.update({f"heldout/{task}/recall/{s}": float(r) for s, r in zip(CLASS_SLUGS[task], recall)})
    metrics["heldout/leaderboard"] = 0.5 * (metrics["heldout/action/macro_recall"]
                                            + metrics["heldout/severity/macro_recall"])
    metrics["system/wall_s"] = float(20 + rng.normal(0, 2))
    metrics["system/peak_rss_mb"] = float(900 + rng.normal(0, 20))
    best["leaderboard"] = metrics["heldout/leaderboard"]
    curves = {"leaderboard": [0.2, 0.3, metrics["heldout/leaderboard"]], "val_loss": [2.0, 1.5, 1.2],
              "train_loss": [2.2, 1.4, 1.0]}
    events = [{"kind": "loss_spike", "epoch": 1, "step": 7, "detail": {"loss": "9.1"}}] if rng.random() < 0.3 else []
    return {"metrics": metrics, "best": best, "curves": curves, "events": events, "epochs": 3, "variant": "x",
            "wall_s": metrics["system/wall_s"], "selected": {"epoch": 3, "taus": {"action": 0.5, "severity": 0.0}},
            "official": {"test": {"leaderboard_value": 100 * metrics["heldout/leaderboard"]}}}


@pytest.fixture(scope="module")
def stored_experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """An experiment whose arm 'better' beats the control by 0.06 recall everywhere, 'same' does not."""
    tmp = tmp_path_factory.mktemp("report")
    storage = f"sqlite:///{tmp / 'optuna.db'}"
    exp = abtest.Experiment("reporttest", "control vs a better and an equal arm", TrainingConfig(),
                            (abtest.Arm("control", {}), abtest.Arm("better", {"dropout": 0.3}),
                             abtest.Arm("same", {"dropout": 0.1})), "control", 4, 3)
    store = abtest.CellStore(exp, storage)
    store.prepare()
    rng = np.random.default_rng(0)
    cell_effects = {(s, f): rng.normal(0, 0.05) for s in range(4) for f in range(3)}
    while (claimed := store.claim()) is not None:
        trial_id, cell = claimed
        level = {"control": 0.40, "better": 0.46, "same": 0.40}[cell.arm]
        attrs = _fake_cell_attrs(rng, level, cell_effects[(cell.seed, cell.fold)])
        store.complete(trial_id, attrs["metrics"]["heldout/leaderboard"], attrs)
    return storage, tmp


def test_report_content_and_verdicts(stored_experiment: tuple[str, Path]) -> None:
    storage, tmp = stored_experiment
    out = report.write_experiment_report("reporttest", storage, tmp / "report.html")
    page = out.read_text()
    assert not re.search(r"<script[^>]+src=", page)  # no external script: plotly.js is inlined
    assert "plotly.js v" in page or "Plotly" in page[:5_000_000]
    assert page.count("Plotly.newPlot") >= 6  # verdict forest, targets, per-class, confusion, curves, events
    for heading in ("Verdicts", "Leaderboard against targets", "Per-class recall per arm", "Confusion matrices",
                    "Learning curves", "Stability events"):
        assert f"<h2>{heading}</h2>" in page
    headline = re.search(r"<b>better</b> vs control: ([a-zA-Z ]+) on heldout/leaderboard", page)
    assert headline and headline.group(1) == stats.BETTER
    headline = re.search(r"<b>same</b> vs control: ([a-zA-Z ]+) on heldout/leaderboard", page)
    assert headline and headline.group(1) == stats.NO_DIFFERENCE
    assert "<h3>Efficiency metrics</h3>" in page and "corrected resampled t" in page
    # the same verdicts through the library
    exp = abtest.stored_experiment("reporttest", storage)
    table = abtest.results_table(exp, abtest.CellStore(exp, storage).finished())
    assert len(table) == 36
    frame = abtest.verdict_frame(abtest.analyze(exp, table))
    lb = frame[(frame.metric == abtest.PRIMARY_METRIC)].set_index("arm")
    assert lb.loc["better", "verdict"] == stats.BETTER and lb.loc["same", "verdict"] == stats.NO_DIFFERENCE
    assert lb.loc["better", "diff"] == pytest.approx(0.06, abs=0.01)
    assert set(frame[frame.family == stats.EFFICIENCY].metric) == {"system/wall_s", "system/peak_rss_mb"}


def test_ab_analyze_reproduces_the_runners_verdicts(stored_experiment: tuple[str, Path], capsys) -> None:
    """The runner's files (cells.csv, verdicts.json) and `ab analyze` on that cells.csv: the same verdicts."""
    import json

    from mvfouls_ab import ab

    storage, tmp = stored_experiment
    exp = abtest.stored_experiment("reporttest", storage)
    assert abtest.finish(exp, storage, None, tmp / "runner") == 0
    written = json.loads((tmp / "runner" / "verdicts.json").read_text())
    assert len(written) == 2 * len(abtest.verdict_metrics()) - 2   # 2 arms x (quality + wall + rss; no CUDA)
    assert ab.main(["analyze", "--cells", str(tmp / "runner" / "cells.csv"), "--control", "control",
                    "--out", str(tmp / "analyze")]) == 0
    again = json.loads((tmp / "analyze" / "verdicts.json").read_text())
    assert [(v["arm"], v["metric"]) for v in again] == [(v["arm"], v["metric"]) for v in written]
    for a, b in zip(again, written):
        assert a.keys() == b.keys()
        for key, value in b.items():
            assert a[key] == (pytest.approx(value) if isinstance(value, float) else value), (b["metric"], key)
    page = (tmp / "analyze" / "report.html").read_text()
    assert "<h2>Verdicts</h2>" in page and "<h2>Arm means</h2>" in page and page.count("Plotly.newPlot") == 2
    assert "<b>better</b> vs control: B better on heldout/leaderboard" in page
    assert "B better" in capsys.readouterr().out


def test_report_cli_and_unknown_experiment(stored_experiment: tuple[str, Path], capsys) -> None:
    storage, tmp = stored_experiment
    assert report_cli.main(["--experiment", "reporttest", "--storage", storage, "--no-mlflow",
                        "--out", str(tmp / "cli.html")]) == 0
    assert (tmp / "cli.html").stat().st_size > 1_000_000  # plotly.js inside
    assert report_cli.main(["--experiment", "nope", "--storage", storage, "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "ab-nope" in err and "ab-reporttest" in err and "Fix:" in err


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
def test_report_renders_offline_in_headless_chromium(stored_experiment: tuple[str, Path]) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed and could not be (install with: apt-get install -y chromium)")
    storage, tmp = stored_experiment
    out = report.write_experiment_report("reporttest", storage, tmp / "offline.html")
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-extensions", "--no-first-run", "--virtual-time-budget=10000",
         f"--user-data-dir={tmp / 'chrome-profile'}", "--dump-dom", out.resolve().as_uri()],
        check=False, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    # every figure became a rendered plotly graph: a plot-container with its SVG layers
    figures = page_figures = out.read_text().count("Plotly.newPlot")
    assert dom.count('class="plot-container plotly"') == figures, (figures, dom.count("plot-container"))
    assert dom.count('class="main-svg"') >= 2 * page_figures
    assert "heatmaplayer" in dom or "hm" in dom  # the confusion heatmaps drew


def test_study_report_reads_trial_summaries_and_run_folders(tmp_path: Path) -> None:
    """A study as study.py stores it: `summary` user attribute per trial, run folder with metrics/events JSONL."""
    import optuna

    from mvfouls_ab.evaluation.metrics import compute_detailed_metrics

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="hpo", storage=open_storage(storage), direction="maximize")
    rng = np.random.default_rng(1)
    for number in range(3):
        trial = study.ask()
        trial.suggest_float("dropout", 0.0, 0.5)
        run_dir = tmp_path / f"trial_{number}"
        run_dir.mkdir()
        history = []
        for epoch in range(3):
            targets = {"action": np.arange(40) % 8, "severity": np.arange(40) % 4}
            logits = {t: rng.normal(size=(40, len(TASKS[t]))) + 2 * np.eye(len(TASKS[t]))[targets[t]] for t in TASKS}
            history.append(compute_detailed_metrics(epoch, "scaling", logits, targets, 1.0, 1.1, history))
        (run_dir / "metrics.jsonl").write_text("".join(r.to_json() + "\n" for r in history))
        (run_dir / "events.jsonl").write_text('{"kind": "loss_spike", "epoch": 1, "step": 3, "detail": {}}\n')
        valid = {"leaderboard": 0.5, "loss": 1.1, "action_macro_recall": 0.5, "severity_macro_recall": 0.5,
                 "action_macro_f1": 0.45, "severity_macro_f1": 0.45, "worst_class_recall": 0.3,
                 "action_recall": [0.5] * 8, "severity_recall": [0.5] * 4}
        trial.set_user_attr("summary", {"valid": valid})
        trial.set_user_attr("run_dir", str(run_dir))
        study.tell(trial, 50.0 + number)
    out = report.write_study_report("hpo", storage, tmp_path / "study.html")
    page = out.read_text()
    assert "<h2>Confusion matrices</h2>" in page and "3 events" in page and "trial 2" in page
    assert page.count("Plotly.newPlot") == 5
    assert report_cli.main(["--study", "missing", "--storage", storage, "--no-mlflow"]) == 2
