"""The synthetic MVFouls generator writes the real format, with the real (scaled) label counts and learnable clips."""
from __future__ import annotations

import fcntl
import hashlib
import json
import threading
import time
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from mvfouls_ab import labels
from mvfouls_ab.data import synthetic
from mvfouls_ab.data.annotations import load_split
from mvfouls_ab.errors import MVFoulsError
from mvfouls_ab.synth import main as synth_main

TINY = 0.01          # with MIN_PER_CLASS: ~40 kept actions per labelled split
ACTION_KEYS = {"UrlLocal", "Offence", "Contact", "Bodypart", "Upper body part", "Action class", "Severity",
               "Multiple fouls", "Try to play", "Touch ball", "Handball", "Handball offence", "Clips"}
CLIP_KEYS = {"Url", "Camera type", "Timestamp", "Replay speed"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth_cache")


@pytest.fixture(scope="module")
def tiny_root(cache_dir: Path) -> Path:
    return synthetic.default_data_root(cache_dir, scale=TINY, seed=0, progress=False)


def test_layout_and_keys_match_the_real_format(tiny_root: Path) -> None:
    assert tiny_root == cache_dir_of(tiny_root) / "synthetic" / f"scale{TINY:g}_seed0_v{synthetic.VERSION}"
    for split in synthetic.LABELLED:
        doc = json.loads((tiny_root / split / "annotations.json").read_text())
        assert set(doc) == {"Set", "Number of actions", "Actions"}
        assert doc["Set"] == split.lower() and doc["Number of actions"] == len(doc["Actions"])
        assert list(doc["Actions"]) == [str(i) for i in range(len(doc["Actions"]))]
        folders = sorted(p.name for p in (tiny_root / split).iterdir() if p.is_dir())
        assert folders == sorted(f"action_{i}" for i in range(len(doc["Actions"])))
        for key, action in doc["Actions"].items():
            assert set(action) == ACTION_KEYS
            assert all(isinstance(v, str) for k, v in action.items() if k != "Clips")
            assert 2 <= len(action["Clips"]) <= 4
            for k, clip in enumerate(action["Clips"]):
                assert set(clip) == CLIP_KEYS
                assert clip["Url"] == f"Dataset/{split}/action_{key}/clip_{k}"
                assert (tiny_root / split / f"action_{key}" / f"clip_{k}.mp4").is_file()
                assert isinstance(clip["Timestamp"], int) and isinstance(clip["Replay speed"], float)
            live, *replays = action["Clips"]
            assert live["Camera type"] == "Main camera center" and live["Replay speed"] == 1.0
            assert all(c["Camera type"] in synthetic.CAMERAS for c in replays)
            assert all(c["Replay speed"] in dict(synthetic.REPLAY_SPEEDS) for c in replays)
        values = {name: {a[name] for a in doc["Actions"].values()} for name in ("Offence", "Severity", "Action class")}
        assert {"Between"} <= values["Offence"] and {"2.0", "4.0"} & values["Severity"]
        assert "Dont know" in values["Action class"] or "" in values["Action class"]
    assert not (tiny_root / "Chall" / "annotations.json").exists()
    assert all(len(list(p.glob("clip_*.mp4"))) >= 2 for p in (tiny_root / "Chall").iterdir())
    assert not [p for p in tiny_root.parent.iterdir() if ".tmp-" in p.name]


def cache_dir_of(root: Path) -> Path:
    return root.parent.parent


def test_annotations_load_and_filtered_counts_match_the_targets(tiny_root: Path) -> None:
    for split in synthetic.LABELLED:
        loaded = load_split(tiny_root, split)
        targets = synthetic.kept_targets(split, TINY)
        assert loaded.class_counts("action").tolist() == targets["action"].tolist()
        assert loaded.class_counts("severity").tolist() == targets["severity"].tolist()
        assert (targets["action"] >= min(synthetic.MIN_PER_CLASS, 3)).all()
        assert all(n >= 1 for rule, n in loaded.dropped.items() if rule != labels.RULE_UNMAPPED)
    chall = load_split(tiny_root, "Chall")
    assert len(chall.actions) >= 2 and chall.actions[0].action is None


def test_full_scale_train_has_the_real_raw_counts() -> None:
    """At scale 1 (labels only, no videos) Train reproduces MVFOULS.md's raw value counts and kept counts."""
    specs = synthetic.plan_split("Train", 1.0, seed=3)
    raw = [s.raw for s in specs]
    assert Counter(r["Offence"] for r in raw) == {"Offence": 2495, "No offence": 324, "Between": 96, "": 1}
    assert Counter(r["Severity"] for r in raw) == {"1.0": 1402, "3.0": 687, "2.0": 403, "": 353, "4.0": 44,
                                                  "5.0": 27}
    assert Counter(r["Action class"] for r in raw) == {
        "Standing tackling": 1264, "Tackling": 448, "Challenge": 383, "Holding": 361, "Elbowing": 178,
        "High leg": 103, "Pushing": 88, "Dont know": 52, "Dive": 28, "": 11}
    kept = [x for x in map(labels.official_label, raw) if x is not None]
    assert np.bincount([x.severity for x in kept]).tolist() == [304, 1303, 685, 27]
    assert np.bincount([x.action for x in kept]).tolist() == [357, 1038, 90, 273, 73, 124, 336, 28]
    assert Counter(len(s.views) for s in specs) == {2: 2241, 3: 561, 4: 114}
    test = [x for x in map(labels.official_label, (s.raw for s in synthetic.plan_split("Test", 1.0))) if x]
    assert np.bincount([x.severity for x in test]).tolist() == [21, 157, 68, 5]
    assert np.bincount([x.action for x in test]).tolist() == [43, 107, 6, 28, 5, 11, 46, 5]


def test_videos_are_h264_25fps_with_126_frames(tiny_root: Path) -> None:
    for clip in sorted((tiny_root / "Test").glob("action_*/clip_*.mp4"))[:3]:
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.average_rate == 25
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(frames) == synthetic.NUM_FRAMES
        assert frames[0].shape == (synthetic.HEIGHT, synthetic.WIDTH, 3)


def test_class_information_only_inside_the_event_and_only_in_informative_views() -> None:
    start = synthetic.EVENT_FRAME - synthetic.EVENT_HALF - synthetic.EVENT_JITTER
    end = synthetic.EVENT_FRAME + synthetic.EVENT_HALF + synthetic.EVENT_JITTER
    live = synthetic.ViewSpec("Main camera center", 1.0, 0)
    dive = synthetic.render_view(7, 3, 1.0, live, np.random.default_rng(5))
    tackle = synthetic.render_view(1, 1, 1.0, live, np.random.default_rng(5))
    differs = np.abs(dive.astype(int) - tackle.astype(int)).reshape(len(dive), -1).max(1) > 0
    assert not differs[:start].any() and not differs[end + 1:].any()
    assert differs[start:end + 1].sum() >= 15
    public = synthetic.ViewSpec("Public", 1.8, 0)
    assert np.array_equal(synthetic.render_view(7, 3, 1.0, public, np.random.default_rng(5)),
                          synthetic.render_view(1, 1, 1.0, public, np.random.default_rng(5)))


def test_generation_is_deterministic_for_a_seed(tiny_root: Path, tmp_path: Path) -> None:
    again = synthetic.generate(tmp_path / "again", scale=TINY, seed=0)

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != "synthetic.json"}

    assert digest(again) == digest(tiny_root)
    other = synthetic.plan_split("Train", TINY, seed=1)
    assert [s.raw for s in other] != [s.raw for s in synthetic.plan_split("Train", TINY, seed=0)]


def test_default_root_is_reused_and_generation_is_locked(tiny_root: Path, cache_dir: Path) -> None:
    stamp = (tiny_root / "synthetic.json").stat().st_mtime_ns
    assert synthetic.default_data_root(cache_dir, scale=TINY, seed=0) == tiny_root
    assert (tiny_root / "synthetic.json").stat().st_mtime_ns == stamp
    # While another process holds the lock, a caller waits, then sees that process's result.
    other = cache_dir / "synthetic" / synthetic.default_root_name(TINY, seed=7)
    result: list[Path] = []
    with open(other.parent / f"{other.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.append(
            synthetic.default_data_root(cache_dir, scale=TINY, seed=7, progress=False)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not other.exists()
        other.mkdir()          # the holder "finishes" a generation
        (other / "synthetic.json").write_text("{}")
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(10)
    assert result == [other] and not list(other.glob("Train"))   # reused, not regenerated


def test_generate_refuses_a_non_empty_folder_and_cli_reports_it(tmp_path: Path, capsys) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(MVFoulsError, match="not empty"):
        synthetic.generate(target, scale=TINY)
    assert synth_main(["--out", str(target), "--scale", str(TINY)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_scaled_targets_keep_every_class_and_equal_totals() -> None:
    for scale in (0.003, 0.1, 0.5, 1.0):
        for split in synthetic.LABELLED:
            t = synthetic.kept_targets(split, scale)
            assert t["action"].sum() == t["severity"].sum()
            assert (t["action"] > 0).all() and (t["severity"] > 0).all()
            table = synthetic.joint_counts(t["action"], t["severity"])
            assert table.sum(1).tolist() == t["action"].tolist()
            assert table.sum(0).tolist() == t["severity"].tolist()
    assert synthetic.kept_targets("Valid", 1.0)["severity"].tolist() == [32, 182, 104, 3]
