import dataclasses
import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score

from mvfouls_ab.evaluation.metrics import DetailedMetrics, compute_detailed_metrics, compute_task_metrics
from mvfouls_ab.labels import CLASS_SLUGS, NUM_CLASSES


def one_hot_logits(pred: np.ndarray, n: int) -> np.ndarray:
    z = np.zeros((pred.size, n))
    z[np.arange(pred.size), pred] = 1.0
    return z


def test_task_metrics_hand_computed():
    y_true = [0, 0, 0, 1, 1, 2, 3, 3]
    y_pred = [0, 0, 1, 1, 2, 2, 0, 3]
    m = compute_task_metrics("severity", y_true, y_pred)
    # recalls by hand: class0 2/3, class1 1/2, class2 1/1, class3 1/2
    assert m["per_class_recall"] == pytest.approx([2 / 3, 1 / 2, 1.0, 1 / 2])
    # precisions by hand: class0 2/3 (pred 0 at 3 places), class1 1/2, class2 1/2, class3 1/1
    assert m["per_class_precision"] == pytest.approx([2 / 3, 1 / 2, 1 / 2, 1.0])
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1 + 0.5) / 4)
    assert m["macro_recall"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["support"] == [3, 2, 1, 2]
    assert m["confusion"].tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1]]


def test_absent_class_counts_as_zero_recall():
    # action has 8 classes; only 0 and 1 occur: macro recall averages over all 8 (zero_division=0)
    m = compute_task_metrics("action", [0, 1, 1], [0, 1, 7])
    assert m["per_class_recall"][:2] == pytest.approx([1.0, 0.5])
    assert m["macro_recall"] == pytest.approx(1.5 / 8)
    assert m["macro_precision"] == pytest.approx(
        precision_score([0, 1, 1], [0, 1, 7], labels=range(8), average="macro", zero_division=0))


def make_record(seed: int = 0, history=(), n: int = 120, **extras) -> DetailedMetrics:
    rng = np.random.default_rng(seed)
    targets = {"action": rng.integers(0, 8, n), "severity": rng.integers(0, 4, n)}
    logits = {"action": rng.normal(size=(n, 8)), "severity": rng.normal(size=(n, 4))}
    logits["action"][targets["action"] == 3, 3] += 5.0      # class 3 easy
    return compute_detailed_metrics(epoch=len(history), phase="phase1_basic", split_logits=logits, targets=targets,
                                    train_loss=1.5 - 0.1 * len(history), val_loss=1.7 - 0.1 * len(history),
                                    history=history, step=len(history), lr=1e-4, grad_norm=2.5, epoch_time_s=3.0,
                                    samples_per_s=40.0, **extras), logits, targets


def test_detailed_metrics_fields_match_sklearn():
    record, logits, targets = make_record(events=[{"kind": "loss_spike", "epoch": 0, "step": 5, "detail": "x"}])
    design_fields = {"epoch", "phase", "train_loss", "val_loss", "action_accuracy", "action_macro_f1",
                     "action_per_class_recall", "severity_accuracy", "severity_macro_f1", "severity_per_class_recall",
                     "confusion_matrices", "learning_curves"}
    assert design_fields <= {f.name for f in dataclasses.fields(record)}
    for task in ("action", "severity"):
        y, p = targets[task], logits[task].argmax(1)
        assert record.task_value(task, "macro_recall") == pytest.approx(balanced_accuracy_score(y, p))
        assert record.task_value(task, "macro_f1") == pytest.approx(
            f1_score(y, p, labels=range(NUM_CLASSES[task]), average="macro", zero_division=0))
        assert len(record.task_value(task, "per_class_precision")) == NUM_CLASSES[task]
        assert record.confusion_matrices[task].shape == (NUM_CLASSES[task],) * 2
        assert record.confusion_matrices[task].sum() == len(y)
    assert record.action_per_class_recall[3] == 1.0
    assert record.leaderboard == pytest.approx(0.5 * (record.action_macro_recall + record.severity_macro_recall))
    assert record.peak_rss_mb > 10 and record.cuda_max_mb is None
    assert record.events[0]["kind"] == "loss_spike"


def test_to_mlflow_names_and_values():
    record, _, _ = make_record(events=[{"kind": "rollback"}, {"kind": "rollback"}], extra={"val/posthoc_tau": 0.5})
    metrics = record.to_mlflow()
    assert len(metrics) >= 100
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["val/action/macro_recall"] == pytest.approx(record.action_macro_recall)
    assert metrics["val/severity/recall/red_card"] == pytest.approx(record.severity_per_class_recall[3])
    assert metrics["val/action/precision/dive"] == pytest.approx(record.action_per_class_precision[7])
    assert metrics["val/action/f1/dive"] == pytest.approx(record.action_per_class_f1[7])
    assert metrics["val/action/confusion/holding/holding"] == record.confusion_matrices["action"][3, 3]
    for name in ("train/loss", "val/loss", "lr", "grad_norm", "val/leaderboard", "system/epoch_time_s",
                 "system/samples_per_s", "system/peak_rss_mb"):
        assert name in metrics
    assert "system/cuda_max_mb" not in metrics                  # None on CPU: left out
    assert metrics["stability/rollback"] == 2.0 and metrics["stability/events"] == 2.0
    assert metrics["val/posthoc_tau"] == 0.5
    for task, slugs in CLASS_SLUGS.items():
        assert {f"val/{task}/recall/{s}" for s in slugs} <= set(metrics)


def test_learning_curves_and_json_round_trip(tmp_path):
    history = []
    for _ in range(3):
        record, _, _ = make_record(history=history)
        history.append(record)
    last = history[-1]
    assert last.learning_curves["train_loss"] == pytest.approx([1.5, 1.4, 1.3])
    assert last.learning_curves["action_macro_recall"] == pytest.approx([r.action_macro_recall for r in history])
    text = last.to_json()
    json.loads(text)                                            # valid JSON
    back = DetailedMetrics.from_json(text)
    assert back.to_dict() == last.to_dict()
    assert isinstance(back.confusion_matrices["action"], np.ndarray)
    assert np.array_equal(back.confusion_matrices["severity"], last.confusion_matrices["severity"])
    assert back.to_mlflow() == last.to_mlflow()


def test_event_dataclasses_and_unknown_fields():
    @dataclasses.dataclass
    class Event:
        kind: str
        epoch: int
        step: int
        detail: str

    record, _, _ = make_record(events=[Event("nan_loss", 0, 3, "loss=nan")])
    assert record.events == [{"kind": "nan_loss", "epoch": 0, "step": 3, "detail": "loss=nan"}]
    with pytest.raises(TypeError, match="unknown fields"):
        make_record(not_a_field=1)


def test_leaderboard_matches_official_evaluator(tmp_path):
    """Our fraction x 100 equals the SoccerNet evaluator's percent on the same labels and predictions."""
    from SoccerNet.Evaluation.MV_FoulRecognition import evaluate

    from mvfouls_ab.labels import prediction_entry

    rng = np.random.default_rng(5)
    n = 80
    action = np.r_[np.arange(8), rng.integers(0, 8, n - 8)]
    severity = np.r_[np.arange(4), rng.integers(0, 4, n - 4)]
    severity[action == 7] = rng.integers(0, 2, (action == 7).sum())   # Dives: no offence / no card only
    raw_strings = [("No offence", ""), ("Offence", "1.0"), ("Offence", "3.0"), ("Offence", "5.0")]
    names = ["Tackling", "Standing tackling", "High leg", "Holding", "Pushing", "Elbowing", "Challenge", "Dive"]
    gt = {"Set": "test", "Number of actions": n, "Actions": {
        str(i): {"Action class": names[a], "Offence": raw_strings[s][0], "Severity": raw_strings[s][1]}
        for i, (a, s) in enumerate(zip(action, severity))}}
    logits = {"action": rng.normal(size=(n, 8)), "severity": rng.normal(size=(n, 4))}
    logits["action"][np.arange(n), action] += 1.0
    logits["severity"][np.arange(n), severity] += 1.0
    preds = {"Actions": {str(i): prediction_entry(a, s) for i, (a, s) in
                         enumerate(zip(logits["action"].argmax(1), logits["severity"].argmax(1)))}}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    official = evaluate(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"))
    record = compute_detailed_metrics(0, "single", logits, {"action": action, "severity": severity}, 1.0, 1.0)
    assert 100 * record.leaderboard == pytest.approx(official["leaderboard_value"])
    assert 100 * record.action_macro_recall == pytest.approx(official["balanced_accuracy_action"])
    assert 100 * record.severity_macro_recall == pytest.approx(official["balanced_accuracy_offence_severity"])
    assert 100 * record.action_accuracy == pytest.approx(official["accuracy_action"])
    assert 0.2 < record.leaderboard < 0.9
