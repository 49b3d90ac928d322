"""Official SoccerNet MVFouls labels: class maps, the official filter, and prediction strings.

Everything here mirrors ``SoccerNet.Evaluation.MV_FoulRecognition.evaluate`` exactly (see MVFOULS.md),
including its quirks, so that training labels and the official metric agree on every action.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

ACTION_CLASSES: tuple[str, ...] = (
    "Tackling", "Standing tackling", "High leg", "Holding", "Pushing", "Elbowing", "Challenge", "Dive",
)
SEVERITY_CLASSES: tuple[str, ...] = (
    "No offence", "Offence + No card", "Offence + Yellow card", "Offence + Red card",
)
TASKS: dict[str, tuple[str, ...]] = {"action": ACTION_CLASSES, "severity": SEVERITY_CLASSES}
NUM_CLASSES: dict[str, int] = {task: len(names) for task, names in TASKS.items()}

ACTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(ACTION_CLASSES)}

# Raw values the real annotations contain (MVFOULS.md); anything else is rejected by the loader.
RAW_ACTION_VALUES = frozenset(ACTION_CLASSES) | {"Dont know", ""}
RAW_OFFENCE_VALUES = frozenset({"Offence", "No offence", "No Offence", "Between", ""})
RAW_SEVERITY_VALUES = frozenset({"1.0", "2.0", "3.0", "4.0", "5.0", ""})

# Filter rules, in the order the official evaluator applies them.
RULE_ACTION = "action_empty_or_dont_know"        # rule 1
RULE_OFFENCE = "offence_empty_or_between"        # rule 2
RULE_SEVERITY = "severity_empty_or_borderline"   # rule 3
RULE_UNMAPPED = "offence_severity_unmapped"      # the evaluator's final `else: continue`
FILTER_RULES: tuple[str, ...] = (RULE_ACTION, RULE_OFFENCE, RULE_SEVERITY, RULE_UNMAPPED)

_NO_OFFENCE = ("No offence", "No Offence")
_SEVERITY_OF_OFFENCE = {"1.0": 1, "3.0": 2, "5.0": 3}


def slug(name: str) -> str:
    """'Offence + Red card' -> 'offence_red_card' (used in metric names)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


CLASS_SLUGS: dict[str, tuple[str, ...]] = {
    "action": tuple(slug(n) for n in ACTION_CLASSES),
    "severity": ("no_offence", "no_card", "yellow_card", "red_card"),
}


@dataclass(frozen=True)
class OfficialLabel:
    """The labels the official evaluator derives from one raw annotation."""

    action: int
    severity: int
    # The strings a prediction must carry to be scored correct by the official evaluator
    # (it compares Offence with the *raw* string and Severity with the normalized one).
    gt_offence_string: str
    gt_severity_string: str


def filter_reason(raw: Mapping[str, str]) -> str | None:
    """Return the official rule that drops this raw annotation, or None when it is kept."""
    return _apply_filter(raw)[0]


def official_label(raw: Mapping[str, str]) -> OfficialLabel | None:
    """Return the (action, severity) labels of a kept action, or None when the official filter drops it."""
    return _apply_filter(raw)[1]


def _apply_filter(raw: Mapping[str, str]) -> tuple[str | None, OfficialLabel | None]:
    action = raw.get("Action class", "")
    offence = raw.get("Offence", "")
    severity = raw.get("Severity", "")
    if action in ("", "Dont know"):
        return RULE_ACTION, None
    if offence in ("", "Between") and action != "Dive":
        return RULE_OFFENCE, None
    if severity in ("", "2.0", "4.0") and action != "Dive" and offence not in _NO_OFFENCE:
        return RULE_SEVERITY, None
    if offence in ("", "Between"):
        offence = "Offence"
    if severity in ("", "2.0", "4.0"):
        severity = "1.0"
    if offence in _NO_OFFENCE:
        sev_class = 0
    elif offence == "Offence" and severity in _SEVERITY_OF_OFFENCE:
        sev_class = _SEVERITY_OF_OFFENCE[severity]
    else:
        return RULE_UNMAPPED, None
    if action not in ACTION_INDEX:
        # Unknown action strings make the official evaluator crash (KeyError); the loader rejects them first.
        raise KeyError(action)
    gt_severity = "" if sev_class == 0 else ("1.0" if action == "Dive" else severity)
    return None, OfficialLabel(ACTION_INDEX[action], sev_class, raw.get("Offence", ""), gt_severity)


# Severity class -> (Offence, Severity) strings written in an official prediction file.
SEVERITY_PREDICTION_STRINGS: tuple[tuple[str, str], ...] = (
    ("No offence", ""), ("Offence", "1.0"), ("Offence", "3.0"), ("Offence", "5.0"),
)


def prediction_entry(action: int, severity: int) -> dict[str, str]:
    """Encode predicted class indices as one entry of an official prediction file."""
    offence, sev = SEVERITY_PREDICTION_STRINGS[int(severity)]
    return {"Action class": ACTION_CLASSES[int(action)], "Offence": offence, "Severity": sev}


def decode_prediction_entry(entry: Mapping[str, str]) -> tuple[int | None, int | None]:
    """Inverse of prediction_entry; None where a string is not one we write."""
    action = ACTION_INDEX.get(entry.get("Action class", ""))
    key = (entry.get("Offence", ""), entry.get("Severity", ""))
    severity = next((i for i, s in enumerate(SEVERITY_PREDICTION_STRINGS) if s == key), None)
    return action, severity
