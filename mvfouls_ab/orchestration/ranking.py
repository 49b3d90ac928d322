"""The design's targets and the study leaderboard.

Targets (DESIGN.md "Evaluation Metrics"), all rates as fractions:
  macro recall > 0.45 on both tasks, macro F1 > 0.40 on both tasks, every class recall > 0.25, loss < 5.0.

Each trial stores a ``summary`` user attribute (see :func:`summarize`): per split (``valid``, ``test``) the official
leaderboard value and balanced accuracies scored from the trial's official prediction file, macro F1 and per-class
recall from the same file, and the loss. On Valid the loss is the trainer's validation loss of the selected epoch
(the training criterion); on Test it is the unweighted cross-entropy sum of both tasks on the final logits.

The leaderboard sorts trials with all targets met first, then by the official Valid leaderboard value; it is saved
as CSV and logged to the study's MLflow parent run. The best trial is re-scored on Test from its official prediction
file with the official evaluator, and that file is kept next to the CSV.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..evaluation.metrics import cross_entropy
from ..evaluation.official import detailed_report
from ..evaluation.targets import TARGETS, Target  # noqa: F401 - re-exported (notebooks, study)
from ..fsutil import atomic_write, json_default
from ..labels import CLASS_SLUGS, TASKS

if TYPE_CHECKING:
    import optuna

    from ..data.dataset import DataBundle
    from ..training.trainer import RunResult



def split_summary(report: dict[str, Any], loss: float | None) -> dict[str, Any]:
    """Targets' inputs for one split from an ``evaluate.detailed_report`` (official scoring of a prediction file)."""
    out: dict[str, Any] = {"leaderboard": report["metrics"]["leaderboard_value"] / 100.0,
                           "loss": None if loss is None else float(loss)}
    worst = (math.inf, "")
    for task in TASKS:
        t = report["tasks"][task]
        recall = np.asarray(t["recall"], float)
        f1 = np.asarray(t["f1"], float)
        present = np.asarray(t["support"]) > 0
        out[f"{task}_macro_recall"] = float(np.mean(np.nan_to_num(recall[present]))) if present.any() else 0.0
        out[f"{task}_macro_f1"] = float(np.mean(np.nan_to_num(f1[present]))) if present.any() else 0.0
        out[f"{task}_recall"] = [None if not p else float(np.nan_to_num(r)) for r, p in zip(recall, present)]
        for slug, r, p in zip(CLASS_SLUGS[task], recall, present):
            if p and float(np.nan_to_num(r)) < worst[0]:
                worst = (float(np.nan_to_num(r)), f"{task}/{slug}")
    out["worst_class_recall"] = worst[0] if worst[1] else 0.0
    out["worst_class"] = worst[1]
    return out


def trial_summary(result: RunResult, data: DataBundle) -> dict[str, dict[str, Any]]:
    """Targets' inputs on Valid and Test, scored from the trial's official prediction files."""

    out = {}
    for split, sa in (("valid", data.valid), ("test", data.test)):
        report = detailed_report(sa.annotations_path, result.predictions[split])
        logits = result.logits.get(split)
        loss = float(result.best.val_loss) if split == "valid" else (
            cross_entropy(logits, sa.targets()) if logits else None)
        out[split] = split_summary(report, loss)
    return out


def record_summary(record: Any) -> dict[str, Any]:
    """Targets' inputs from a DetailedMetrics record (used for pruned trials, which have no prediction file)."""
    task, slug, recall = record.worst_class()
    out = {"leaderboard": float(record.leaderboard), "loss": float(record.val_loss),
           "worst_class_recall": float(recall) if task else 0.0, "worst_class": f"{task}/{slug}"}
    for t in TASKS:
        out[f"{t}_macro_recall"] = float(record.task_value(t, "macro_recall"))
        out[f"{t}_macro_f1"] = float(record.task_value(t, "macro_f1"))
    return out


def checks(split: dict[str, Any] | None) -> dict[str, bool]:
    return {t.name: bool(split) and t.passed(split.get(t.name)) for t in TARGETS}


def constraint_values(split: dict[str, Any] | None) -> list[float]:
    return [t.constraint((split or {}).get(t.name)) for t in TARGETS]


# ---- the leaderboard ----------------------------------------------------------------------------------------
def leaderboard(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial (COMPLETE or PRUNED), targets-met first, then by Valid leaderboard value."""
    from optuna.trial import TrialState

    rows = []
    for tr in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        summary = tr.user_attrs.get("summary") or {}
        valid = summary.get("valid") or {}
        passed = checks(valid)
        row: dict[str, Any] = {
            "trial": tr.number, "state": tr.state.name,
            "valid_leaderboard": valid.get("leaderboard", (tr.value or 0.0) / 100.0),
            "targets_met": sum(passed.values()), "all_targets": all(passed.values()),
        }
        for t in TARGETS:
            row[t.name] = valid.get(t.name)
            row[f"pass_{t.name}"] = passed[t.name]
        row["worst_class"] = valid.get("worst_class", "")
        row["epochs"] = tr.user_attrs.get("epochs_done")
        row["mlflow_run_id"] = tr.user_attrs.get("mlflow_run_id", "")
        row["retry_of"] = (tr.system_attrs.get("retry_history") or [None])[0]
        row.update({f"param_{k}": v for k, v in tr.params.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["_complete"] = df["state"] == "COMPLETE"
    df = df.sort_values(["all_targets", "targets_met", "_complete", "valid_leaderboard"],
                        ascending=[False, False, False, False], kind="stable").drop(columns="_complete")
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def best_trial_number(df: pd.DataFrame) -> int | None:
    complete = df[df["state"] == "COMPLETE"] if not df.empty else df
    return None if complete.empty else int(complete.iloc[0]["trial"])


def rescore_on_test(study: optuna.Study, trial_number: int, out_dir: Path | str) -> dict[str, Any]:
    """Score the trial's official Test prediction file with the official metric; keep a copy in out_dir."""
    from ..evaluation.official import detailed_report

    trial = study.trials[trial_number]
    predictions = trial.user_attrs.get("predictions") or {}
    gt = (trial.user_attrs.get("annotations") or {}).get("test")
    pred = predictions.get("test")
    if not pred or not gt or not Path(pred).is_file() or not Path(gt).is_file():
        return {"trial": trial_number, "error": f"no Test prediction file for trial {trial_number} ({pred})"}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = out_dir / f"best_trial_{trial_number:04d}_predictions_test.json"
    shutil.copyfile(pred, kept)
    loss = ((trial.user_attrs.get("summary") or {}).get("test") or {}).get("loss")
    summary = split_summary(detailed_report(gt, kept), loss)
    summary["official"] = detailed_report(gt, kept)["metrics"]
    passed = checks(summary)
    return {"trial": trial_number, "predictions": str(kept), "annotations": str(gt), "summary": summary,
            "checks": passed, "all_targets": all(passed.values())}


def format_leaderboard(df: pd.DataFrame, top: int = 10) -> str:
    if df.empty:
        return "(no finished trials)"
    cols = ["rank", "trial", "state", "valid_leaderboard", "targets_met"] + [t.name for t in TARGETS] + ["worst_class"]
    shown = df[cols].head(top).copy()
    for t in TARGETS:
        shown[t.name] = [("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                          (f"{v:.2f}" if t.name == "loss" else f"{100 * v:.1f}%")) + (" ok" if ok else " --")
                         for v, ok in zip(shown[t.name], df[f"pass_{t.name}"].head(top))]
    shown["valid_leaderboard"] = [f"{100 * v:.1f}%" for v in shown["valid_leaderboard"]]
    shown["targets_met"] = [f"{n}/{len(TARGETS)}" for n in shown["targets_met"]]
    return shown.to_string(index=False)


def format_test(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"Test re-score: {result['error']}"
    s = result["summary"]
    marks = ", ".join(f"{t.label}: {'ok' if result['checks'][t.name] else 'FAIL'}" for t in TARGETS)
    return (f"best trial {result['trial']} on Test: official leaderboard {s['official']['leaderboard_value']:.2f} | "
            f"BA action {s['official']['balanced_accuracy_action']:.2f} severity "
            f"{s['official']['balanced_accuracy_offence_severity']:.2f} | worst class {s['worst_class']} "
            f"{100 * s['worst_class_recall']:.1f}%\n  {marks}\n  prediction file: {result['predictions']}")


def save_ranking(study: optuna.Study, out_dir: Path | str, tracker: Any | None = None) -> dict[str, Any]:
    """Leaderboard CSV + Test re-score of the best trial in out_dir; both logged to the parent run if given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = leaderboard(study)
    csv = out_dir / "leaderboard.csv"
    atomic_write(csv, df.to_csv(index=False))     # every compose worker writes it; readers see a whole file
    best = best_trial_number(df)
    test = rescore_on_test(study, best, out_dir) if best is not None else {"error": "no completed trial"}
    atomic_write(out_dir / "best_trial_test.json", json.dumps(test, indent=2, default=json_default))
    if tracker is not None:
        tracker.log_artifact(csv, "ranking")
        tracker.log_artifact(out_dir / "best_trial_test.json", "ranking")
        if "predictions" in test:
            tracker.log_artifact(test["predictions"], "ranking")
        metrics = {"ranking/trials": len(df), "ranking/all_targets_met": int(df["all_targets"].sum()) if len(df) else 0}
        if best is not None:
            row = df[df["trial"] == best].iloc[0]
            metrics.update({"best/trial": best, "best/valid_leaderboard": float(row["valid_leaderboard"])})
            if "summary" in test:
                metrics.update({f"best/test/{k}": float(v) for k, v in test["summary"].items()
                                if isinstance(v, (int, float)) and v is not None})
            tracker.set_tags({"best_trial": best, "best_trial_all_targets_valid": bool(row["all_targets"]),
                              "best_trial_all_targets_test": bool(test.get("all_targets", False))})
        tracker.log_metrics(metrics)
    return {"frame": df, "csv": csv, "best": best, "test": test}
