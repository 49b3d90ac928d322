"""Read and validate MVFouls `annotations.json` files into typed records, applying the official filter.

Layout (MVFOULS.md): `<root>/<Split>/annotations.json` and `<root>/<Split>/action_<id>/clip_<k>.mp4`.
Chall has no annotations.json: its actions come from the `action_*` folders, with labels None.

Everything is checked before anything is returned (class strings, clips, files on disk), so a bad file fails
with one AnnotationError/VideoError naming the file, the action id and the fix, and nothing downstream (cache,
features, runs) is ever written from half-read annotations.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .. import labels
from ..errors import AnnotationError, VideoError, located

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("Train", "Valid", "Test", "Chall")
LABELLED_SPLITS: tuple[str, ...] = ("Train", "Valid", "Test")
# Annotation field -> the raw values the real data set uses (anything else is rejected).
RAW_VALUES: dict[str, frozenset[str]] = {
    "Action class": labels.RAW_ACTION_VALUES,
    "Offence": labels.RAW_OFFENCE_VALUES,
    "Severity": labels.RAW_SEVERITY_VALUES,
}
_TAIL = re.compile(r"^action_(\d+)/clip_(\d+)(\.mp4)?$")
_ACTION_DIR = re.compile(r"^action_(\d+)$")
_CLIP_FILE = re.compile(r"^clip_(\d+)\.mp4$")


@dataclass(frozen=True)
class Clip:
    """One view of an action."""

    url: str                      # as written in annotations.json ("Dataset/Train/action_0/clip_0")
    path: Path                    # the mp4 on disk
    camera_type: str              # "Main camera center", "Close-up player or field referee", ...
    replay_speed: float | None    # 1.0 for live views; replays are slowed down
    timestamp: int | None


@dataclass(frozen=True)
class Action:
    """One foul: its official labels (None for Chall), its raw annotation fields, and 2-4 clips."""

    action_id: str
    action: int | None            # index into labels.ACTION_CLASSES
    severity: int | None          # index into labels.SEVERITY_CLASSES
    raw: dict[str, Any]           # every annotation field except "Clips"
    clips: tuple[Clip, ...]


@dataclass
class SplitAnnotations:
    """The actions of one split that the official filter keeps, and what it dropped (counts per rule)."""

    split: str
    root: Path
    actions: list[Action]
    dropped: dict[str, int]
    total: int
    annotations_path: Path | None = None   # None for Chall
    extra: dict[str, Any] = field(default_factory=dict)  # top-level fields other than "Actions"

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def labelled(self) -> bool:
        return self.annotations_path is not None

    def targets(self) -> dict[str, np.ndarray]:
        """int64 label arrays per task, -1 where unknown (Chall)."""
        return {
            "action": np.array([-1 if a.action is None else a.action for a in self.actions], np.int64),
            "severity": np.array([-1 if a.severity is None else a.severity for a in self.actions], np.int64),
        }

    def class_counts(self, task: str) -> np.ndarray:
        """Kept actions per class of `task` ("action" or "severity")."""
        y = self.targets()[task]
        return np.bincount(y[y >= 0], minlength=labels.NUM_CLASSES[task])

    def summary(self) -> str:
        if not self.labelled:
            return f"{self.split}: {len(self.actions)} unlabelled actions"
        drops = ", ".join(f"{rule} {n}" for rule, n in self.dropped.items() if n) or "none"
        return f"{self.split}: kept {len(self.actions)} of {self.total} actions (dropped: {drops})"


def load_split(root: Path | str, split: str) -> SplitAnnotations:
    """Load one split of an MVFouls data set rooted at `root` (the folder holding Train/ Valid/ Test/ Chall/)."""
    if split not in SPLITS:
        raise AnnotationError(located(root, f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}"))
    root = Path(os.path.abspath(Path(root).expanduser()))
    split_dir = root / split
    if not split_dir.is_dir():
        raise AnnotationError(located(split_dir, "split folder not found",
                                      f"point data_root at the folder that holds {'/ '.join(SPLITS)}/ "
                                      "(download with SoccerNet, or generate with python -m mvfouls_ab.synth)"))
    if split == "Chall":
        result = _load_unlabelled(root, split_dir)
    else:
        result = _load_labelled(root, split_dir)
    log.info(result.summary())
    return result


# ---- labelled splits -------------------------------------------------------------------------------------
def _load_labelled(root: Path, split_dir: Path) -> SplitAnnotations:
    path = split_dir / "annotations.json"
    if not path.is_file():
        raise AnnotationError(located(path, "annotations.json not found",
                                      "download the split's annotations (SoccerNet mvfouls) or regenerate the data set"))
    data = _read_json(path)
    if not isinstance(data, dict) or "Actions" not in data:
        raise AnnotationError(located(path, 'missing the top-level "Actions" object',
                                      'the file must look like {"Set": ..., "Actions": {"0": {...}, ...}}'))
    entries = data["Actions"]
    if not isinstance(entries, dict):
        raise AnnotationError(located(path, f'"Actions" is a {type(entries).__name__}, not an object',
                                      'write "Actions" as an object keyed by action id ("0", "1", ...)'))
    expected = data.get("Number of actions")
    if isinstance(expected, int) and expected != len(entries):
        log.warning("%s: 'Number of actions' says %d but 'Actions' holds %d", path, expected, len(entries))

    for action_id in entries:
        if not (isinstance(action_id, str) and action_id.isdigit()):
            raise AnnotationError(located(path, f"action key {action_id!r} is not a number",
                                          'key actions by their folder number: "0" for action_0', str(action_id)))
    actions: list[Action] = []
    dropped = {rule: 0 for rule in labels.FILTER_RULES}
    for action_id in sorted(entries, key=int):
        entry = entries[action_id]
        if not isinstance(entry, dict):
            raise AnnotationError(located(path, f"the action is a {type(entry).__name__}, not an object",
                                          "write each action as an object of annotation fields", action_id))
        raw = {k: v for k, v in entry.items() if k != "Clips"}
        _check_classes(path, action_id, raw)
        clips = _parse_clips(path, root, split_dir.name, action_id, entry.get("Clips"))
        label = labels.official_label(raw)
        if label is None:
            dropped[labels.filter_reason(raw)] += 1
            continue
        actions.append(Action(action_id, label.action, label.severity, raw, clips))
    if not actions:
        raise AnnotationError(located(path, f"no action left after the official filter ({len(entries)} in the "
                                      f"file, dropped per rule: {dropped})",
                                      "check that this is the real annotations.json of the split and that it "
                                      "has labelled actions"))
    extra = {k: v for k, v in data.items() if k != "Actions"}
    return SplitAnnotations(split_dir.name, root, actions, dropped, len(entries), path, extra)


def _read_json(path: Path) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen = Counter(k for k, _ in pairs)
        dup = [k for k, n in seen.items() if n > 1]
        if dup:
            raise AnnotationError(located(path, f"duplicate key {dup[0]!r}", "keep one entry per key",
                                          dup[0] if dup[0].isdigit() else None))
        return dict(pairs)

    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise AnnotationError(located(path, f"malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg})",
                                      "repair the file or download it again")) from None
    except UnicodeDecodeError as exc:
        raise AnnotationError(located(path, f"not UTF-8 text ({exc.reason})", "download the file again")) from None


def _check_classes(path: Path, action_id: str, raw: dict[str, Any]) -> None:
    for name, allowed in RAW_VALUES.items():
        if name not in raw:
            raise AnnotationError(located(path, f'the action has no "{name}" field',
                                          f'add "{name}" (use "" where it is unknown)', action_id))
        value = raw[name]
        if not isinstance(value, str) or value not in allowed:
            shown = ", ".join(repr(v) for v in sorted(allowed))
            raise AnnotationError(located(path, f'unknown {name} value {value!r}',
                                          f"use one of the official strings: {shown}", action_id))


def _parse_clips(path: Path, root: Path, split: str, action_id: str, clips: Any) -> tuple[Clip, ...]:
    if not isinstance(clips, list) or not clips:
        raise AnnotationError(located(path, 'the action has no "Clips" (every action has 2 to 4 views)',
                                      'list the action\'s clips under "Clips" with their "Url"', action_id))
    out = []
    for k, clip in enumerate(clips):
        if not isinstance(clip, dict) or not isinstance(clip.get("Url"), str) or not clip["Url"].strip():
            raise AnnotationError(located(path, f"clip {k} has no Url",
                                          'give every clip a "Url" like "Dataset/Train/action_0/clip_0"', action_id))
        url = clip["Url"]
        out.append(Clip(url=url, path=resolve_clip(path, root, split, action_id, url),
                        camera_type=str(clip.get("Camera type", "")),
                        replay_speed=_number(path, action_id, clip, "Replay speed", float),
                        timestamp=_number(path, action_id, clip, "Timestamp", int)))
    return tuple(out)


def _number(path: Path, action_id: str, clip: dict[str, Any], name: str, kind: type) -> Any:
    value = clip.get(name)
    if value is None or value == "":
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise AnnotationError(located(path, f"clip {name} {value!r} is not a number",
                                      f'write "{name}" as a number or leave it out', action_id)) from None


def resolve_clip(source: Path, root: Path, split: str, action_id: str, url: str) -> Path:
    """Map a clip Url to its mp4 under `root`.

    Real Urls look like "Dataset/Train/action_0/clip_0" (no extension; the prefix varies by release). The clip
    is looked for at `<root>/<split>/action_<n>/clip_<k>.mp4`, then at the Url itself with leading folders
    stripped one by one (so Urls relative to the root or to its parent work too). A Url with ".." or an
    absolute path outside the root is rejected. The check is on the path as written: a data set whose folders
    are symbolic links to another disk still loads.
    """
    text = url.strip().replace("\\", "/")
    parts = PurePosixPath(text).parts
    if ".." in parts or text.startswith("/") or re.match(r"^[A-Za-z]:/", text):
        inside = None if ".." in parts else Path(os.path.normpath(text))
        if inside is None or not inside.is_relative_to(root):
            raise AnnotationError(located(source, f"clip Url {url!r} points outside the data root {root}",
                                          'use a relative Url like "Dataset/Train/action_0/clip_0" without ".."',
                                          action_id))
        candidates = [_with_mp4(inside)]
    else:
        parts = tuple(p for p in parts if p not in ("", "."))
        candidates = []
        tail = "/".join(parts[-2:])
        if _TAIL.match(tail):
            candidates.append(_with_mp4(root / split / parts[-2] / parts[-1]))
        candidates += [_with_mp4(root.joinpath(*parts[i:])) for i in range(max(len(parts) - 1, 1))]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise VideoError(located(candidates[0], f"clip file for Url {url!r} not found",
                             "finish the download of this split's videos (or regenerate the data set)", action_id))


def _with_mp4(path: Path) -> Path:
    return path if path.suffix == ".mp4" else path.with_name(path.name + ".mp4")


# ---- Chall (videos only) -----------------------------------------------------------------------------------
def _load_unlabelled(root: Path, split_dir: Path) -> SplitAnnotations:
    folders = sorted((int(m.group(1)), p) for p in split_dir.iterdir()
                     if p.is_dir() and (m := _ACTION_DIR.match(p.name)))
    actions = []
    for number, folder in folders:
        files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _CLIP_FILE.match(p.name)))
        if not files:
            raise AnnotationError(located(folder, "action folder holds no clip_<k>.mp4",
                                          "download this action's clips again or remove the folder", str(number)))
        clips = tuple(Clip(url=f"{split_dir.name}/{folder.name}/{p.stem}", path=p, camera_type="",
                           replay_speed=None, timestamp=None) for _, p in files)
        actions.append(Action(str(number), None, None, {}, clips))
    if not actions:
        raise AnnotationError(located(split_dir, "no action_<n> folders found",
                                      "download the challenge videos into this folder"))
    return SplitAnnotations(split_dir.name, root, actions, {rule: 0 for rule in labels.FILTER_RULES},
                            len(actions), None)
