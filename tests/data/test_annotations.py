from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from mvfouls_ab import labels
from mvfouls_ab.data.annotations import SPLITS, load_split
from mvfouls_ab.errors import AnnotationError, VideoError


def edited_copy(source: Path, tmp_path: Path, edit: Callable[[dict], object] | None = None,
                text: str | None = None, split: str = "Train") -> tuple[Path, Path]:
    """Copy the tiny data set, change one split's annotations.json; return (root, annotations path)."""
    root = tmp_path / "data"
    shutil.copytree(source, root)
    path = root / split / "annotations.json"
    if text is None:
        doc = json.loads(path.read_text())
        if edit is not None:
            edit(doc)
        text = json.dumps(doc)
    path.write_text(text)
    return root, path


def assert_located(exc: pytest.ExceptionInfo, path: Path, action_id: str | None) -> None:
    text = str(exc.value)
    assert str(path) in text, text
    assert "Fix:" in text and text.split("Fix:")[1].strip(), text
    if action_id is not None:
        assert f"action {action_id}:" in text, text


def test_train_split_is_parsed_into_typed_records(tiny_mvfouls):
    split = load_split(tiny_mvfouls, "Train")
    raw = json.loads((tiny_mvfouls / "Train" / "annotations.json").read_text())["Actions"]
    assert split.split == "Train" and split.total == 11 and len(split) == 8 and split.labelled
    assert split.dropped == {labels.RULE_ACTION: 1, labels.RULE_OFFENCE: 1, labels.RULE_SEVERITY: 1,
                             labels.RULE_UNMAPPED: 0}
    assert [a.action_id for a in split.actions] == [str(i) for i in range(8)]
    for action in split.actions:
        entry = raw[action.action_id]
        expected = labels.official_label(entry)
        assert (action.action, action.severity) == (expected.action, expected.severity)
        assert "Clips" not in action.raw and action.raw["Offence"] == entry["Offence"]
        assert len(action.clips) == len(entry["Clips"]) == 2 + int(action.action_id) % 3
        for k, clip in enumerate(action.clips):
            assert clip.path == tiny_mvfouls / "Train" / f"action_{action.action_id}" / f"clip_{k}.mp4"
            assert clip.url == entry["Clips"][k]["Url"]
            assert clip.replay_speed == (1.0 if k == 0 else 1.8)
            assert clip.timestamp == 1000 * int(action.action_id) + k
            assert clip.camera_type == ("Main camera center" if k == 0 else "Close-up player or field referee")
    assert split.class_counts("action").tolist() == [1] * 8
    assert split.class_counts("severity").tolist() == [2, 3, 2, 1]
    assert "kept 8 of 11" in split.summary() and "severity_empty_or_borderline 1" in split.summary()


def test_chall_loads_from_folders_without_labels(tiny_mvfouls):
    split = load_split(tiny_mvfouls, "Chall")
    assert not split.labelled and split.total == len(split) == 8
    assert all(a.action is None and a.severity is None for a in split.actions)
    assert split.targets()["action"].tolist() == [-1] * 8
    assert [len(a.clips) for a in split.actions] == [2 + i % 3 for i in range(8)]
    assert all(c.path.is_file() for a in split.actions for c in a.clips)


@pytest.mark.parametrize("url", [
    "Dataset/Train/action_1/clip_1",            # the real form
    "SomeRelease/Dataset/Train/action_1/clip_1",  # a different prefix
    "Train/action_1/clip_1.mp4",                 # relative to the root, with extension
    "Dataset\\Train\\action_1\\clip_1",          # Windows separators
    "./Train/action_1/clip_1",
])
def test_clip_urls_resolve_to_the_split_folder(tiny_mvfouls, tmp_path, url):
    def edit(doc):
        doc["Actions"]["1"]["Clips"][1]["Url"] = url
    root, _ = edited_copy(tiny_mvfouls, tmp_path, edit)
    clip = load_split(root, "Train").actions[1].clips[1]
    assert clip.path == root / "Train" / "action_1" / "clip_1.mp4" and clip.url == url


def test_absolute_url_inside_the_root_is_accepted(tiny_mvfouls, tmp_path):
    def edit(doc):
        doc["Actions"]["2"]["Clips"][0]["Url"] = str(tmp_path / "data" / "Train" / "action_2" / "clip_0")
    root, _ = edited_copy(tiny_mvfouls, tmp_path, edit)
    assert load_split(root, "Train").actions[2].clips[0].path == root / "Train" / "action_2" / "clip_0.mp4"


# ---- bad input: one test per case, each naming the file, the action and the fix ----------------------------
def test_malformed_json(tiny_mvfouls, tmp_path):
    root, path = edited_copy(tiny_mvfouls, tmp_path, text='{"Actions": {"0": {"Offence": "Offence",}}')
    with pytest.raises(AnnotationError, match="malformed JSON at line 1") as exc:
        load_split(root, "Train")
    assert_located(exc, path, None)


def test_missing_actions(tiny_mvfouls, tmp_path):
    root, path = edited_copy(tiny_mvfouls, tmp_path, lambda doc: doc.pop("Actions"))
    with pytest.raises(AnnotationError, match='missing the top-level "Actions"') as exc:
        load_split(root, "Train")
    assert_located(exc, path, None)


@pytest.mark.parametrize("clips", ["missing", [], None])
def test_action_without_clips(tiny_mvfouls, tmp_path, clips):
    def edit(doc):
        if clips == "missing":
            del doc["Actions"]["3"]["Clips"]
        else:
            doc["Actions"]["3"]["Clips"] = clips
    root, path = edited_copy(tiny_mvfouls, tmp_path, edit)
    with pytest.raises(AnnotationError, match='no "Clips"') as exc:
        load_split(root, "Train")
    assert_located(exc, path, "3")


@pytest.mark.parametrize("field,value", [
    ("Action class", "Headbutt"), ("Offence", "offence"), ("Severity", "3"), ("Severity", 3.0),
])
def test_unknown_class_string(tiny_mvfouls, tmp_path, field, value):
    def edit(doc):
        doc["Actions"]["4"][field] = value
    root, path = edited_copy(tiny_mvfouls, tmp_path, edit)
    with pytest.raises(AnnotationError, match=f"unknown {field} value") as exc:
        load_split(root, "Train")
    assert_located(exc, path, "4")
    assert "official strings" in str(exc.value)


def test_missing_label_field(tiny_mvfouls, tmp_path):
    root, path = edited_copy(tiny_mvfouls, tmp_path, lambda doc: doc["Actions"]["5"].pop("Severity"))
    with pytest.raises(AnnotationError, match='no "Severity" field') as exc:
        load_split(root, "Train")
    assert_located(exc, path, "5")


@pytest.mark.parametrize("url", [
    "Dataset/Train/../../../etc/passwd", "../outside/action_0/clip_0", "/etc/passwd", "C:/Windows/clip_0",
])
def test_url_escaping_the_data_root(tiny_mvfouls, tmp_path, url):
    def edit(doc):
        doc["Actions"]["6"]["Clips"][0]["Url"] = url
    root, path = edited_copy(tiny_mvfouls, tmp_path, edit)
    with pytest.raises(AnnotationError, match="outside the data root") as exc:
        load_split(root, "Train")
    assert_located(exc, path, "6")


def test_missing_clip_file(tiny_mvfouls, tmp_path):
    root, _ = edited_copy(tiny_mvfouls, tmp_path)
    missing = root / "Train" / "action_7" / "clip_1.mp4"
    missing.unlink()
    with pytest.raises(VideoError, match="not found") as exc:
        load_split(root, "Train")
    assert_located(exc, missing, "7")


def test_empty_split_after_filtering(tiny_mvfouls, tmp_path):
    def edit(doc):
        for entry in doc["Actions"].values():
            entry["Action class"] = "Dont know"
    root, path = edited_copy(tiny_mvfouls, tmp_path, edit)
    with pytest.raises(AnnotationError, match="no action left after the official filter") as exc:
        load_split(root, "Train")
    assert_located(exc, path, None)
    assert "action_empty_or_dont_know': 11" in str(exc.value)


def test_missing_annotations_file_and_split_folder(tiny_mvfouls, tmp_path):
    root, path = edited_copy(tiny_mvfouls, tmp_path)
    path.unlink()
    with pytest.raises(AnnotationError, match="annotations.json not found") as exc:
        load_split(root, "Train")
    assert_located(exc, path, None)
    with pytest.raises(AnnotationError, match="split folder not found") as exc:
        load_split(tmp_path / "nowhere", "Valid")
    assert_located(exc, tmp_path / "nowhere" / "Valid", None)
    with pytest.raises(AnnotationError, match="unknown split"):
        load_split(root, "Validation")
    assert SPLITS == ("Train", "Valid", "Test", "Chall")


def test_duplicate_action_ids(tiny_mvfouls, tmp_path):
    text = (tiny_mvfouls / "Train" / "annotations.json").read_text()
    first = text.index('"1": {')
    second = text.index('"2": {')
    duplicated = text[:second] + text[first:second] + text[second:]
    root, path = edited_copy(tiny_mvfouls, tmp_path, text=duplicated)
    with pytest.raises(AnnotationError, match="duplicate key '1'") as exc:
        load_split(root, "Train")
    assert_located(exc, path, "1")


def test_chall_action_folder_without_clips(tiny_mvfouls, tmp_path):
    root, _ = edited_copy(tiny_mvfouls, tmp_path)
    (root / "Chall" / "action_8").mkdir()
    with pytest.raises(AnnotationError, match="no clip_") as exc:
        load_split(root, "Chall")
    assert_located(exc, root / "Chall" / "action_8", "8")
