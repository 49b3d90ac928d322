"""labels.py against the real SoccerNet evaluator: the filter keeps and drops exactly what it keeps and drops,
the classes are its classes, and the counts of MVFOULS.md come out of a ground truth with the real raw counts."""
from __future__ import annotations

import ast
import contextlib
import inspect
import io
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from SoccerNet.Evaluation import MV_FoulRecognition
from SoccerNet.Evaluation.MV_FoulRecognition import evaluate as soccernet_evaluate

from mvfouls_ab import labels

RAW_ACTIONS = (*labels.ACTION_CLASSES, "Dont know", "")
RAW_OFFENCES = ("Offence", "No offence", "No Offence", "Between", "", "Foul")        # "Foul": unknown value
RAW_SEVERITIES = ("1.0", "2.0", "3.0", "4.0", "5.0", "", "6.0")                      # "6.0": unknown value


def entry(action: str, offence: str, severity: str) -> dict[str, str]:
    return {"Action class": action, "Offence": offence, "Severity": severity}


def soccernet(tmp_path: Path, gt: dict, preds: dict) -> tuple[dict[str, float], list[str]]:
    """Run the official evaluator; return its results and the ids it says were not predicted (= kept, missing)."""
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_path.write_text(json.dumps({"Actions": gt}))
    pred_path.write_text(json.dumps({"Actions": preds}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), np.errstate(divide="ignore", invalid="ignore"):
        results = soccernet_evaluate(str(gt_path), str(pred_path))
    missing = [line.split(":", 1)[1].strip() for line in out.getvalue().splitlines() if "did not predict" in line]
    return results, missing


def correct_entry(raw: dict[str, str]) -> dict[str, str]:
    label = labels.official_label(raw)
    return entry(raw["Action class"], label.gt_offence_string, label.gt_severity_string)


# Every combination of raw values: hits each filter rule, the Dive exceptions, both No-offence spellings,
# and unknown offence/severity values (which the evaluator drops through its final `else: continue`).
ALL_COMBINATIONS = {str(i): entry(*combo)
                    for i, combo in enumerate(itertools.product(RAW_ACTIONS, RAW_OFFENCES, RAW_SEVERITIES))}


def test_action_classes_in_the_evaluators_index_order() -> None:
    source = inspect.getsource(MV_FoulRecognition.evaluate)
    literal = re.search(r"EVENT_DICTIONARY_action_class\s*=\s*(\{.*?\})", source, re.DOTALL).group(1)
    official = ast.literal_eval(literal)
    assert {name: i for name, i in official.items() if name != "Dont know"} == labels.ACTION_INDEX
    assert list(labels.ACTION_CLASSES) == sorted(labels.ACTION_INDEX, key=labels.ACTION_INDEX.get)
    assert len(labels.SEVERITY_CLASSES) == 4 and labels.CLASS_SLUGS["severity"][3] == "red_card"


def test_filter_keeps_exactly_what_the_evaluator_keeps(tmp_path: Path) -> None:
    _, evaluator_kept = soccernet(tmp_path, ALL_COMBINATIONS, {})
    ours_kept = [i for i, raw in ALL_COMBINATIONS.items() if labels.official_label(raw) is not None]
    assert evaluator_kept == ours_kept
    reasons = Counter(labels.filter_reason(raw) for raw in ALL_COMBINATIONS.values())
    assert set(reasons) == {None, *labels.FILTER_RULES}  # every rule drops something here
    assert reasons[None] == len(ours_kept)
    assert all((labels.filter_reason(raw) is None) == (labels.official_label(raw) is not None)
               for raw in ALL_COMBINATIONS.values())


@pytest.mark.parametrize(("raw", "reason", "classes"), [
    (("Dont know", "Offence", "1.0"), labels.RULE_ACTION, None),
    (("", "No offence", ""), labels.RULE_ACTION, None),
    (("Tackling", "Between", "1.0"), labels.RULE_OFFENCE, None),
    (("Holding", "", "3.0"), labels.RULE_OFFENCE, None),
    (("Dive", "Between", ""), None, (7, 1)),
    (("Dive", "", "3.0"), None, (7, 2)),
    (("Challenge", "Offence", "2.0"), labels.RULE_SEVERITY, None),
    (("Challenge", "Offence", ""), labels.RULE_SEVERITY, None),
    (("Challenge", "No Offence", "4.0"), None, (6, 0)),
    (("Dive", "Offence", "4.0"), None, (7, 1)),
    (("Elbowing", "Offence", "6.0"), labels.RULE_UNMAPPED, None),
    (("Elbowing", "Foul", "1.0"), labels.RULE_UNMAPPED, None),
    (("High leg", "Offence", "5.0"), None, (2, 3)),
])
def test_filter_rule_and_classes_of_examples(raw: tuple[str, str, str], reason: str | None,
                                             classes: tuple[int, int] | None) -> None:
    assert labels.filter_reason(entry(*raw)) == reason
    label = labels.official_label(entry(*raw))
    assert (None if label is None else (label.action, label.severity)) == classes


def test_each_kept_action_gets_the_evaluators_classes_and_strings(tmp_path: Path) -> None:
    """Probe the evaluator one action at a time against anchors whose class counts are all different.

    Anchors: action class j appears j+1 times, with severity class j % 4 (severity counts 6, 8, 10, 12). Adding
    one kept action x predicted correctly (by our strings) and nothing else gives balanced accuracy
    1 / (K * count of x's class), which identifies the class the evaluator put x in.
    """
    anchor_strings = (("No offence", ""), ("Offence", "1.0"), ("Offence", "3.0"), ("Offence", "5.0"))
    anchors = {f"a{j}_{r}": entry(labels.ACTION_CLASSES[j], *anchor_strings[j % 4])
               for j in range(8) for r in range(j + 1)}
    counts = {"action": np.bincount([labels.official_label(a).action for a in anchors.values()], minlength=8),
              "severity": np.bincount([labels.official_label(a).severity for a in anchors.values()], minlength=4)}
    assert counts["action"].tolist() == list(range(1, 9)) and counts["severity"].tolist() == [6, 8, 10, 12]
    probed = 0
    for action_id, raw in ALL_COMBINATIONS.items():
        label = labels.official_label(raw)
        if label is None:
            continue
        results, missing = soccernet(tmp_path, {**anchors, action_id: raw}, {action_id: correct_entry(raw)})
        assert action_id not in missing and len(missing) == len(anchors)
        assert results["balanced_accuracy_action"] == pytest.approx(100 / (8 * (counts["action"][label.action] + 1)))
        assert results["balanced_accuracy_offence_severity"] == pytest.approx(
            100 / (4 * (counts["severity"][label.severity] + 1)))
        probed += 1
    assert probed == sum(labels.official_label(raw) is not None for raw in ALL_COMBINATIONS.values()) > 50


def test_unknown_action_class_crashes_the_evaluator_only_when_kept(tmp_path: Path) -> None:
    kept, dropped = entry("Bicycle kick", "Offence", "1.0"), entry("Bicycle kick", "Between", "1.0")
    with pytest.raises(KeyError):
        soccernet(tmp_path, {"0": kept}, {})
    with pytest.raises(KeyError):
        labels.official_label(kept)
    _, missing = soccernet(tmp_path, {"0": dropped}, {})
    assert missing == [] and labels.filter_reason(dropped) == labels.RULE_OFFENCE


def test_prediction_entries_round_trip() -> None:
    for action, severity in itertools.product(range(8), range(4)):
        encoded = labels.prediction_entry(action, severity)
        assert labels.decode_prediction_entry(encoded) == (action, severity)
    assert labels.decode_prediction_entry(entry("Dive", "Between", "1.0")) == (7, None)
    assert labels.decode_prediction_entry(entry("Dont know", "No offence", "")) == (None, 0)


# ---- The real Train split's raw counts (MVFOULS.md) reproduce its documented kept/dropped structure. ----

TRAIN_RAW = {
    "Offence": {"Offence": 2495, "No offence": 324, "Between": 96, "": 1},
    "Severity": {"1.0": 1402, "3.0": 687, "2.0": 403, "": 353, "4.0": 44, "5.0": 27},
    "Action class": {"Standing tackling": 1264, "Tackling": 448, "Challenge": 383, "Holding": 361, "Elbowing": 178,
                     "High leg": 103, "Pushing": 88, "Dont know": 52, "Dive": 28, "": 11},
}
TRAIN_KEPT = {"total": 2319, "severity": [304, 1303, 685, 27], "action": [357, 1038, 90, 273, 73, 124, 336, 28]}
TRAIN_ACTION_KEPT = dict(zip(labels.ACTION_CLASSES[:7], TRAIN_KEPT["action"][:7]))
TRAIN_ACTION_DROPPED = {name: TRAIN_RAW["Action class"][name] - TRAIN_ACTION_KEPT[name] for name in TRAIN_ACTION_KEPT}
# (offence, severity) -> count, chosen so that the joint table has every documented marginal (checked below).
TRAIN_KEPT_PATTERNS = {("No offence", ""): 225, ("No offence", "1.0"): 50, ("No offence", "2.0"): 26,
                       ("Offence", "1.0"): 1283, ("Offence", "3.0"): 681, ("Offence", "5.0"): 26}
TRAIN_DIVE_PATTERNS = {("Offence", "1.0"): 10, ("Offence", "2.0"): 3, ("Offence", ""): 2, ("Between", "1.0"): 4,
                       ("", "4.0"): 1, ("No offence", ""): 3, ("Offence", "3.0"): 3, ("Between", "3.0"): 1,
                       ("Offence", "5.0"): 1}
TRAIN_DROPPED_PATTERNS = {("Between", "1.0"): 45, ("Between", "2.0"): 20, ("Between", ""): 11, ("Between", "3.0"): 2,
                          ("Between", "4.0"): 3, ("Offence", "2.0"): 340, ("Offence", "4.0"): 40, ("Offence", ""): 73}
TRAIN_NO_ACTION_PATTERNS = {("No offence", ""): 15, ("No offence", "2.0"): 5, ("Between", "1.0"): 5,
                            ("Between", "2.0"): 5, ("Offence", "1.0"): 5, ("Offence", "2.0"): 4, ("Offence", ""): 24}


def northwest_corner(rows: dict, columns: dict) -> list[tuple]:
    """A joint table with the given row and column totals (the transportation problem's north-west corner rule)."""
    rows, columns = list(rows.items()), list(columns.items())
    assert sum(n for _, n in rows) == sum(n for _, n in columns)
    left_r, left_c = [n for _, n in rows], [n for _, n in columns]
    i = j = 0
    cells = []
    while i < len(rows) and j < len(columns):
        n = min(left_r[i], left_c[j])
        if n:
            cells.append((rows[i][0], columns[j][0], n))
        left_r[i] -= n
        left_c[j] -= n
        if left_r[i] == 0:
            i += 1
        if left_c[j] == 0:
            j += 1
    return cells


def train_ground_truth() -> dict:
    cells = (northwest_corner(TRAIN_KEPT_PATTERNS, TRAIN_ACTION_KEPT)
             + northwest_corner(TRAIN_DROPPED_PATTERNS, TRAIN_ACTION_DROPPED)
             + northwest_corner(TRAIN_NO_ACTION_PATTERNS, {"Dont know": 52, "": 11})
             + [(pattern, "Dive", n) for pattern, n in TRAIN_DIVE_PATTERNS.items()])
    raws = [entry(action, offence, severity) for (offence, severity), action, n in cells for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(raws))
    return {str(i): raws[k] for i, k in enumerate(order)}


def test_train_fixture_has_the_real_raw_counts() -> None:
    gt = train_ground_truth()
    assert len(gt) == 2916
    for field, expected in TRAIN_RAW.items():
        assert Counter(raw[field] for raw in gt.values()) == expected, field


def assert_evaluator_agrees(tmp_path: Path, gt: dict, expected: dict | None = None) -> None:
    """The evaluator keeps exactly our kept ids, and its per-class counts are ours (and `expected`, if given).

    Its class counts are read off its balanced accuracy: a single correct prediction in class c (wrong in the
    other task) gives balanced accuracy 1 / (K * count_c).
    """
    kept = {i: labels.official_label(raw) for i, raw in gt.items() if labels.official_label(raw) is not None}
    _, evaluator_kept = soccernet(tmp_path, gt, {})
    assert evaluator_kept == list(kept)
    for task, k, key in (("action", 8, "balanced_accuracy_action"),
                         ("severity", 4, "balanced_accuracy_offence_severity")):
        ours = np.bincount([getattr(label, task) for label in kept.values()], minlength=k)
        if expected is not None:
            assert ours.tolist() == expected[task]
        for c in np.flatnonzero(ours):
            action_id = next(i for i, label in kept.items() if getattr(label, task) == c)
            right = correct_entry(gt[action_id])
            pred = {**right, "Offence": "wrong"} if task == "action" else {**right, "Action class": "wrong"}
            results, _ = soccernet(tmp_path, gt, {action_id: pred})
            if ours.all():
                assert round(100 / (k * results[key])) == ours[c], (task, c)
            else:  # a class without ground truth makes the evaluator's balanced accuracy NaN
                assert np.isnan(results[key])
            assert results["accuracy_action" if task == "action" else "accuracy_offence_severity"] == (
                pytest.approx(100 / len(kept)))


def test_real_train_counts_kept_and_dropped_like_the_evaluator(tmp_path: Path) -> None:
    gt = train_ground_truth()
    kept = {i: labels.official_label(raw) for i, raw in gt.items() if labels.official_label(raw) is not None}
    assert len(kept) == TRAIN_KEPT["total"]
    assert np.bincount([k.severity for k in kept.values()], minlength=4).tolist() == TRAIN_KEPT["severity"]
    assert np.bincount([k.action for k in kept.values()], minlength=8).tolist() == TRAIN_KEPT["action"]
    assert Counter(labels.filter_reason(raw) for raw in gt.values() if labels.filter_reason(raw)) == {
        labels.RULE_ACTION: 63, labels.RULE_OFFENCE: 81, labels.RULE_SEVERITY: 453}

    assert_evaluator_agrees(tmp_path, gt, TRAIN_KEPT)


@pytest.mark.slow
def test_synthetic_train_split_is_filtered_like_the_evaluator(tmp_path: Path) -> None:
    from mvfouls_ab.data.synthetic import annotations_doc, generate, plan_split

    # The full-scale synthetic Train annotations (what generate() writes, without rendering 6,000 clips):
    # the evaluator agrees with our filter and finds MVFOULS.md's kept structure.
    gt = annotations_doc("Train", plan_split("Train", scale=1.0, seed=0))["Actions"]
    assert len(gt) == 2916
    reasons = Counter(labels.filter_reason(raw) for raw in gt.values())
    assert reasons[labels.RULE_ACTION] and reasons[labels.RULE_OFFENCE] and reasons[labels.RULE_SEVERITY]
    assert_evaluator_agrees(tmp_path, gt, TRAIN_KEPT)

    # A small generated data set: its Train/annotations.json file as written on disk.
    root = Path(generate(tmp_path / "synthetic", scale=0.01, seed=3, workers=1, min_per_class=1))
    gt = json.loads((root / "Train" / "annotations.json").read_text())["Actions"]
    kept = [i for i, raw in gt.items() if labels.official_label(raw) is not None]
    assert 0 < len(kept) < len(gt)
    assert_evaluator_agrees(tmp_path, gt)
