"""evaluate.py against the real SoccerNet evaluator: randomized parity, hand-made quirks, bad input, writer, CLI."""
from __future__ import annotations

import contextlib
import io
import json
import math
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from SoccerNet.Evaluation.MV_FoulRecognition import evaluate as soccernet_evaluate

from mvfouls_ab import labels
from mvfouls_ab.cli.evaluate import main
from mvfouls_ab.errors import AnnotationError
from mvfouls_ab.evaluation.official import (
    METRIC_KEYS,
    UNSCORED,
    detailed_report,
    official_metrics,
    predictions_from_logits,
    write_predictions,
)

# The full raw vocabulary of the real annotations (MVFOULS.md) plus "No Offence", the spelling the evaluator accepts.
RAW_ACTIONS = (*labels.ACTION_CLASSES, "Dont know", "")
RAW_OFFENCES = ("Offence", "No offence", "No Offence", "Between", "")
RAW_SEVERITIES = ("1.0", "2.0", "3.0", "4.0", "5.0", "")


def entry(action: str, offence: str, severity: str) -> dict[str, str]:
    return {"Action class": action, "Offence": offence, "Severity": severity}


def write(path: Path, actions: dict) -> Path:
    path.write_text(json.dumps({"Actions": actions}))
    return path


def soccernet(gt: Path, pred: Path) -> tuple[dict[str, float], str]:
    """The official evaluator's results and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), np.errstate(divide="ignore", invalid="ignore"):
        return soccernet_evaluate(str(gt), str(pred)), out.getvalue()


def ours(gt: Path, pred: Path) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return official_metrics(gt, pred)


def assert_same(expected: dict, actual: dict) -> None:
    """Same keys in the same order, and bit-identical values (NaN where the evaluator gives NaN)."""
    assert list(actual) == list(expected) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        e, a = float(expected[key]), actual[key]
        assert type(a) is float
        assert (math.isnan(e) and math.isnan(a)) or e == a, (key, e, a)


def correct_entry(raw: dict[str, str]) -> dict[str, str]:
    """The prediction the official evaluator scores correct on both tasks for a kept raw annotation."""
    label = labels.official_label(raw)
    return entry(raw["Action class"], label.gt_offence_string, label.gt_severity_string)


def random_gt(rng: random.Random, n: int) -> dict:
    weights = (rng.random(), rng.random(), rng.random())  # how noisy this ground truth is
    actions = {}
    for i in range(n):
        action = rng.choice(RAW_ACTIONS) if rng.random() < weights[0] else rng.choice(labels.ACTION_CLASSES)
        offence = rng.choice(RAW_OFFENCES) if rng.random() < weights[1] else rng.choice(("Offence", "No offence"))
        severity = rng.choice(RAW_SEVERITIES) if rng.random() < weights[2] else rng.choice(("1.0", "3.0", "5.0"))
        actions[str(i)] = {**entry(action, offence, severity), "Contact": "With contact", "Clips": []}
    return actions


def random_predictions(rng: random.Random, gt: dict) -> dict:
    p_missing, p_correct = rng.choice((0.0, 0.1, 0.5)), rng.random()
    preds = {}
    for action_id, raw in gt.items():
        r = rng.random()
        if r < p_missing:
            continue
        if labels.official_label(raw) is not None and rng.random() < p_correct:
            preds[action_id] = correct_entry(raw)
        elif rng.random() < 0.5:  # what our writer emits
            preds[action_id] = labels.prediction_entry(rng.randrange(8), rng.randrange(4))
        else:  # raw-string variants the evaluator compares verbatim
            preds[action_id] = entry(rng.choice(RAW_ACTIONS), rng.choice(RAW_OFFENCES), rng.choice(RAW_SEVERITIES))
    preds["999999"] = labels.prediction_entry(0, 1)  # an id the ground truth does not have: ignored
    return preds


def test_parity_on_randomized_ground_truth_and_predictions(tmp_path: Path) -> None:
    rng = random.Random(2024)
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred.json"
    kinds = {"nan": 0, "finite": 0, "missing": 0}
    for trial in range(250):
        gt = random_gt(rng, rng.choice((0, 1, 5, 20, 60, 150)))
        preds = random_predictions(rng, gt)
        write(gt_path, gt)
        write(pred_path, preds)
        expected, printed = soccernet(gt_path, pred_path)
        assert_same(expected, ours(gt_path, pred_path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = detailed_report(gt_path, pred_path)
        assert_same(expected, report["metrics"])
        # The ids we report missing are exactly those the evaluator complains about.
        complained = [line.split(":", 1)[1].strip() for line in printed.splitlines() if "did not predict" in line]
        assert report["missing"] == complained
        assert len([w for w in caught if "no prediction" in str(w.message)]) == (1 if complained else 0)
        for task, key in (("action", "balanced_accuracy_action"),
                          ("severity", "balanced_accuracy_offence_severity")):
            table = report["tasks"][task]
            recall = np.array(table["recall"], dtype=float)
            # Per-class recall is the evaluator's: its mean (NaN-propagating) is the balanced accuracy.
            np.testing.assert_allclose(np.mean(recall) * 100, expected[key], equal_nan=True, rtol=1e-12)
            matrix = np.array(table["confusion_matrix"])
            assert matrix.sum(axis=1).tolist() == table["support"]
            assert np.diag(matrix[:, :-1]).tolist() == table["correct"]
        kinds["nan" if math.isnan(expected["leaderboard_value"]) else "finite"] += 1
        kinds["missing"] += bool(complained)
    assert min(kinds.values()) >= 20, kinds  # the random draws covered every situation


# Hand-made edge cases: (name, ground truth {id: raw}, predictions {id: entry}, expected official results).
EDGE_CASES = [
    ("dive_between_offence_needs_raw_string",
     {"0": entry("Dive", "Between", "1.0"), "1": entry("Dive", "Between", ""), "2": entry("Dive", "Between", "2.0")},
     {"0": entry("Dive", "Offence", "1.0"), "1": entry("Dive", "Between", "1.0"), "2": entry("Dive", "Between", "1.0")},
     {"accuracy_offence_severity": 200 / 3, "accuracy_action": 100.0}),
    ("dive_empty_offence_needs_empty_string",
     {"0": entry("Dive", "", "3.0"), "1": entry("Dive", "", "4.0"), "2": entry("Dive", "", "")},
     {"0": entry("Dive", "", "1.0"), "1": labels.prediction_entry(7, 1), "2": entry("Dive", "", "1.0")},
     {"accuracy_offence_severity": 200 / 3, "accuracy_action": 100.0}),
    ("dive_yellow_card_is_matched_by_severity_1",
     {"0": entry("Dive", "Offence", "3.0"), "1": entry("Dive", "Offence", "5.0")},
     {"0": labels.prediction_entry(7, 2), "1": labels.prediction_entry(7, 1)},
     {"accuracy_offence_severity": 50.0}),
    ("dive_no_offence_expects_empty_severity",
     {"0": entry("Dive", "No offence", "2.0"), "1": entry("Dive", "No offence", "")},
     {"0": entry("Dive", "No offence", "1.0"), "1": labels.prediction_entry(7, 0)},
     {"accuracy_offence_severity": 50.0}),
    ("no_offence_capital_spelling",
     {"0": entry("Holding", "No Offence", ""), "1": entry("Holding", "No Offence", "3.0"),
      "2": entry("Pushing", "No offence", ""), "3": entry("Pushing", "No Offence", "")},
     {"0": labels.prediction_entry(3, 0), "1": entry("Holding", "No Offence", ""),
      "2": labels.prediction_entry(4, 0), "3": entry("Pushing", "No Offence", "")},
     {"accuracy_offence_severity": 75.0, "accuracy_action": 100.0}),
    ("borderline_severities",
     {"0": entry("Tackling", "Offence", "2.0"), "1": entry("Tackling", "Offence", "4.0"),
      "2": entry("Tackling", "No offence", "4.0"), "3": entry("Tackling", "Offence", "3.0"),
      "4": entry("Dive", "Offence", "2.0")},
     {"0": labels.prediction_entry(0, 1), "1": labels.prediction_entry(0, 2), "2": labels.prediction_entry(0, 0),
      "3": labels.prediction_entry(0, 2), "4": labels.prediction_entry(7, 1)},
     {"accuracy_offence_severity": 100.0, "accuracy_action": 100.0}),
    ("missing_predictions_count_as_wrong",
     {"0": entry("Challenge", "Offence", "1.0"), "1": entry("Challenge", "Offence", "3.0"),
      "2": entry("Elbowing", "Offence", "5.0"), "3": entry("Dont know", "Offence", "1.0")},
     {"0": labels.prediction_entry(6, 1)},
     {"accuracy_offence_severity": 100 / 3, "accuracy_action": 100 / 3}),
    ("every_class_present_and_the_red_card_dive_quirk",
     {str(i): entry(labels.ACTION_CLASSES[i], "Offence" if i % 4 else "No offence", ("", "1.0", "3.0", "5.0")[i % 4])
      for i in range(8)},
     {str(i): labels.prediction_entry(i, i % 4) for i in range(8)},
     # the Dive (Offence, "5.0") expects Severity "1.0", so our red-card prediction for it is scored wrong
     {"accuracy_offence_severity": 87.5, "balanced_accuracy_offence_severity": 87.5,
      "balanced_accuracy_action": 100.0, "leaderboard_value": 93.75}),
    ("nothing_kept_is_nan_everywhere",
     {"0": entry("", "Offence", "1.0"), "1": entry("Tackling", "Between", "1.0")},
     {"0": labels.prediction_entry(0, 1)},
     {"accuracy_offence_severity": math.nan, "leaderboard_value": math.nan}),
    ("unknown_action_class_in_a_dropped_action_is_ignored",
     {"0": entry("Bicycle kick", "Between", "1.0"), "1": entry("Holding", "Offence", "1.0")},
     {"1": labels.prediction_entry(3, 1)},
     {"accuracy_offence_severity": 100.0, "accuracy_action": 100.0}),
]


@pytest.mark.parametrize(("gt", "preds", "expected"), [case[1:] for case in EDGE_CASES],
                         ids=[case[0] for case in EDGE_CASES])
def test_edge_cases_match_the_official_evaluator(tmp_path: Path, gt: dict, preds: dict, expected: dict) -> None:
    gt_path, pred_path = write(tmp_path / "gt.json", gt), write(tmp_path / "pred.json", preds)
    official, _ = soccernet(gt_path, pred_path)
    assert_same(official, ours(gt_path, pred_path))
    for key, value in expected.items():  # the quirk each case documents
        assert official[key] == pytest.approx(value, nan_ok=True), key


def test_missing_predictions_warn_once_listing_the_ids(tmp_path: Path) -> None:
    gt = {str(i): entry("Holding", "Offence", "1.0") for i in range(6)}
    gt["6"] = entry("Dont know", "Offence", "1.0")  # dropped by the filter: never reported missing
    gt_path = write(tmp_path / "gt.json", gt)
    pred_path = write(tmp_path / "pred.json", {"1": labels.prediction_entry(3, 1), "4": labels.prediction_entry(3, 1)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = official_metrics(gt_path, pred_path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "4 of 6 kept actions" in message and "0, 2, 3, 5" in message and str(pred_path) in message
    assert metrics["accuracy_action"] == pytest.approx(100 * 2 / 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = detailed_report(gt_path, pred_path)["tasks"]["severity"]
    assert table["confusion_matrix"][1] == [0, 2, 0, 0, 4]  # missing ones land in the UNSCORED column
    assert table["confusion_columns"][-1] == UNSCORED


def test_confusion_matrix_separates_wrong_class_from_unmatched_strings(tmp_path: Path) -> None:
    gt_path = write(tmp_path / "gt.json", {
        "0": entry("Dive", "Between", "1.0"),       # class (7, 1)
        "1": entry("Dive", "Offence", "3.0"),       # class (7, 2), official severity string "1.0"
        "2": entry("High leg", "Offence", "5.0"),   # class (2, 3)
    })
    pred_path = write(tmp_path / "pred.json", {
        "0": labels.prediction_entry(7, 1),   # right class index, but the evaluator wants Offence "Between"
        "1": labels.prediction_entry(7, 1),   # class 1 strings, yet the evaluator scores it correct for class 2
        "2": labels.prediction_entry(0, 2),   # plainly wrong classes
    })
    report = detailed_report(gt_path, pred_path)
    severity = np.array(report["tasks"]["severity"]["confusion_matrix"])
    assert severity[1].tolist() == [0, 0, 0, 0, 1]
    assert severity[2].tolist() == [0, 0, 1, 0, 0]
    assert severity[3].tolist() == [0, 0, 1, 0, 0]
    action = np.array(report["tasks"]["action"]["confusion_matrix"])
    assert action[7, 7] == 2 and action[2, 0] == 1
    assert report["tasks"]["severity"]["recall"][1:] == [0.0, 1.0, 0.0]
    assert report["tasks"]["severity"]["precision"][2] == 0.5
    assert math.isnan(report["tasks"]["severity"]["recall"][0])  # no ground truth for No offence
    json.dumps(report)  # plain Python types only


@pytest.mark.parametrize(("which", "content", "message"), [
    ("gt", "{not json", "not valid JSON"),
    ("pred", '{"Actions": {"0": ', "not valid JSON"),
    ("gt", '{"Set": "test"}', 'no top-level "Actions"'),
    ("pred", '[1, 2]', 'no top-level "Actions"'),
    ("pred", '{"Actions": [{"Action class": "Dive"}]}', '"Actions" is a list'),
    ("gt", '{"Actions": {"0": "Tackling"}}', "entry is a str"),
    ("pred", '{"Actions": {"0": null}}', "entry is a NoneType"),
    ("gt", '{"Actions": {"0": {"Action class": "Tackling", "Offence": "Offence"}}}', "lacks 'Severity'"),
    ("pred", '{"Actions": {"0": {"Action class": "Tackling", "Severity": "1.0"}}}', "lacks 'Offence'"),
    ("gt", '{"Actions": {"0": {"Action class": "Tackling", "Offence": "Offence", "Severity": 3.0}}}',
     "must be strings"),
    ("gt", '{"Actions": {"0": {"Action class": "Bicycle kick", "Offence": "Offence", "Severity": "1.0"}}}',
     "unknown Action class 'Bicycle kick'"),
])
def test_bad_files_raise_annotation_error_naming_file_action_and_fix(tmp_path: Path, which: str, content: str,
                                                                     message: str) -> None:
    good = '{"Actions": {"0": {"Action class": "Tackling", "Offence": "Offence", "Severity": "1.0"}}}'
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_path.write_text(content if which == "gt" else good)
    pred_path.write_text(content if which == "pred" else good)
    with pytest.raises(AnnotationError) as err:
        official_metrics(gt_path, pred_path)
    text = str(err.value)
    bad_path = gt_path if which == "gt" else pred_path
    assert text.startswith(str(bad_path)) and message in text and "Fix:" in text
    if '"0": ' in content and "not valid JSON" not in message and "Actions" not in message:
        assert "action 0" in text
    with pytest.raises(AnnotationError):
        detailed_report(gt_path, pred_path)


def test_missing_file_is_an_annotation_error(tmp_path: Path) -> None:
    pred_path = write(tmp_path / "pred.json", {})
    with pytest.raises(AnnotationError, match="cannot read the annotations file"):
        official_metrics(tmp_path / "absent.json", pred_path)


def test_written_predictions_score_like_the_model_outputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gt = random_gt(random.Random(1), 200)
    kept = {i: labels.official_label(raw) for i, raw in gt.items() if labels.official_label(raw) is not None}
    ids = list(kept)
    action_logits = rng.normal(size=(len(ids), 8))
    severity_logits = rng.normal(size=(len(ids), 4))
    # Make half of the logits point at the true class.
    for row, action_id in enumerate(ids[::2]):
        action_logits[2 * row, kept[action_id].action] += 10
        severity_logits[2 * row, kept[action_id].severity] += 10
    content = predictions_from_logits(ids, action_logits, severity_logits, set_name="test")
    assert content["Set"] == "test" and len(content["Actions"]) == len(ids)
    path = write_predictions(tmp_path / "sub" / "predictions.json", ids, action_logits.argmax(1),
                             severity_logits.argmax(1), set_name="test")
    assert json.loads(path.read_text()) == content
    assert [p.name for p in path.parent.iterdir()] == ["predictions.json"]  # no temporary file left behind
    gt_path = write(tmp_path / "gt.json", gt)
    official, printed = soccernet(gt_path, path)
    assert_same(official, official_metrics(gt_path, path))
    assert "did not predict" not in printed
    # The official action accuracy is exactly the argmax accuracy (action strings have no quirks).
    truth = np.array([kept[i].action for i in ids])
    assert official["accuracy_action"] == pytest.approx(100 * np.mean(action_logits.argmax(1) == truth))


def test_write_predictions_rejects_bad_input_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_predictions(tmp_path / "p.json", ["0", "1"], [0, 7], [0, 3])
    before = path.read_text()
    for args in ((["0", "1"], [0], [0, 1]), (["0", "0"], [0, 1], [0, 1]), (["0", "1"], [0, 8], [0, 1]),
                 (["0", "1"], [0, 1], [-1, 1]), (["0", "1"], [0.5, 1.0], [0, 1])):
        with pytest.raises(ValueError):
            write_predictions(path, *args)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        predictions_from_logits(["0"], np.zeros((1, 8)), np.zeros((1, 5)))
    assert json.loads(before)["Actions"]["1"] == {"Action class": "Dive", "Offence": "Offence", "Severity": "5.0"}


def test_cli_prints_the_five_numbers_and_tables(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt = random_gt(random.Random(3), 80)
    gt_path = write(tmp_path / "gt.json", gt)
    pred_path = write(tmp_path / "pred.json", random_predictions(random.Random(4), gt))
    out_json = tmp_path / "report.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--annotations", str(gt_path), "--predictions", str(pred_path), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    official, _ = soccernet(gt_path, pred_path)
    for key in METRIC_KEYS:
        assert key in text
        if not math.isnan(official[key]):
            assert f"{official[key]:8.3f}" in text
    assert "per class" in text and "Offence + Red card" in text and "confusion matrix" in text
    saved = json.loads(out_json.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    for key in METRIC_KEYS:
        assert saved["metrics"][key] == (None if math.isnan(official[key]) else pytest.approx(official[key]))


@pytest.mark.slow
def test_cli_module_exit_codes(tmp_path: Path) -> None:
    gt_path = write(tmp_path / "gt.json", {"0": entry("Pushing", "Offence", "3.0")})
    pred_path = write(tmp_path / "pred.json", {"0": labels.prediction_entry(4, 2)})
    ok = subprocess.run([sys.executable, "-m", "mvfouls_ab.evaluate", "--annotations", str(gt_path),
                         "--predictions", str(pred_path)], capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "accuracy_offence_severity" in ok.stdout and "100.000" in ok.stdout
    (tmp_path / "bad.json").write_text("{oops")
    bad = subprocess.run([sys.executable, "-m", "mvfouls_ab.evaluate", "--annotations", str(gt_path),
                          "--predictions", str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.json" in lines[0] and "not valid JSON" in lines[0] and "Fix:" in lines[0]
