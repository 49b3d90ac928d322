"""ranking.py on a real Optuna study (in-memory storage) holding hand-made finished trials."""
from __future__ import annotations

import json

import optuna
import pytest

from mvfouls_ab import labels
from mvfouls_ab.evaluation.metrics import compute_detailed_metrics
from mvfouls_ab.evaluation.official import official_metrics, write_predictions
from mvfouls_ab.orchestration import ranking


def split_values(mr: float, f1: float, worst: float, loss: float, lb: float) -> dict:
    return {"leaderboard": lb, "action_macro_recall": mr, "severity_macro_recall": mr, "action_macro_f1": f1,
            "severity_macro_f1": f1, "worst_class_recall": worst, "worst_class": "severity/red_card", "loss": loss}


def add(study, value, valid, state=optuna.trial.TrialState.COMPLETE, **attrs):
    study.add_trial(optuna.trial.create_trial(
        state=state, value=value if state == optuna.trial.TrialState.COMPLETE else None,
        params={"phase1_lr": 1e-3}, distributions={"phase1_lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
        user_attrs={"summary": {"valid": valid}, **attrs},
        intermediate_values={0: value} if state == optuna.trial.TrialState.PRUNED else None))


def test_targets_and_constraints():
    good = split_values(0.5, 0.45, 0.3, 2.0, 0.5)
    assert all(ranking.checks(good).values())
    assert all(c <= 0 for c in ranking.constraint_values(good))
    edge = split_values(0.45, 0.40, 0.25, 5.0, 0.45)        # the targets are strict inequalities
    assert not any(ranking.checks(edge).values())
    assert all(c > 0 for c in ranking.constraint_values(edge))
    assert ranking.constraint_values(None) == [1.0] * len(ranking.TARGETS)


def test_record_summary_matches_detailed_metrics():
    import numpy as np

    y = {"action": np.arange(16) % 8, "severity": np.arange(16) % 4}
    logits = {"action": np.eye(8)[y["action"]], "severity": np.eye(4)[(y["severity"] + 1) % 4]}
    rec = compute_detailed_metrics(0, "foundation", logits, y, 1.0, 6.0)
    s = ranking.record_summary(rec)
    assert s["action_macro_recall"] == pytest.approx(1.0) and s["severity_macro_recall"] == 0.0
    assert s["worst_class_recall"] == 0.0 and s["worst_class"].startswith("severity/")
    checks = ranking.checks(s)
    assert checks["action_macro_recall"] and not checks["severity_macro_recall"] and not checks["loss"]


def test_leaderboard_puts_targets_met_first_then_value(tmp_path):
    study = optuna.create_study(direction="maximize")
    add(study, 60.0, split_values(0.6, 0.30, 0.30, 2.0, 0.60))   # trial 0: high value, F1 targets missed
    add(study, 50.0, split_values(0.5, 0.45, 0.30, 2.0, 0.50))   # trial 1: all targets
    add(study, 55.0, split_values(0.55, 0.45, 0.30, 2.0, 0.55))  # trial 2: all targets, higher
    add(study, 0.0, split_values(0.2, 0.1, 0.0, 9.0, 0.2), state=optuna.trial.TrialState.PRUNED)
    add(study, 0.0, {}, state=optuna.trial.TrialState.FAIL)        # failed trials are not ranked
    df = ranking.leaderboard(study)
    assert list(df["trial"]) == [2, 1, 0, 3]
    assert list(df["all_targets"]) == [True, True, False, False]
    assert df.iloc[2]["targets_met"] == 4 and df.iloc[3]["state"] == "PRUNED"
    assert ranking.best_trial_number(df) == 2
    text = ranking.format_leaderboard(df)
    assert "6/6" in text and "--" in text


def test_best_trial_rescored_on_test_with_official_file(tmp_path, tiny_mvfouls):
    from mvfouls_ab.data.annotations import load_split

    test = load_split(tiny_mvfouls, "Test")
    targets = test.targets()
    pred = tmp_path / "run" / "predictions_test.json"
    write_predictions(pred, [a.action_id for a in test.actions], targets["action"], targets["severity"])
    study = optuna.create_study(direction="maximize")
    gt = str(tiny_mvfouls / "Test" / "annotations.json")
    add(study, 70.0, split_values(0.7, 0.6, 0.5, 1.0, 0.7), predictions={"test": str(pred)},
        annotations={"test": gt}, summary={"valid": split_values(0.7, 0.6, 0.5, 1.0, 0.7), "test": {"loss": 0.5}})
    saved = ranking.save_ranking(study, tmp_path / "out")
    res = saved["test"]
    official = official_metrics(gt, pred)     # the Dive/"Between" quirk keeps a perfect file below 100
    assert res["trial"] == 0 and res["summary"]["official"] == official
    assert res["summary"]["leaderboard"] == pytest.approx(official["leaderboard_value"] / 100)
    assert res["summary"]["action_macro_recall"] == pytest.approx(official["balanced_accuracy_action"] / 100)
    kept = json.loads((tmp_path / "out" / "best_trial_0000_predictions_test.json").read_text())
    assert set(kept["Actions"]) == {a.action_id for a in test.actions}
    assert (tmp_path / "out" / "leaderboard.csv").read_text().startswith("rank,trial,state")
    assert f"official leaderboard {official['leaderboard_value']:.2f}" in ranking.format_test(res)
    assert labels.NUM_CLASSES["action"] == 8
