"""The synthetic MVFouls generator writes the real format, with the real (scaled) label counts, and clips whose
class is the pose and contact of two articulated players (data v4)."""
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
from mvfouls_ab.cli.synth import main as synth_main
from mvfouls_ab.data import synthetic
from mvfouls_ab.data.annotations import load_split
from mvfouls_ab.errors import MVFoulsError

TINY = 0.01          # with MINI: ~16 kept actions per labelled split (~190 clips in all)
MINI = 2             # least actions per class in the tiny data set (every class of both tasks, every filter rule)
ACTION_KEYS = {"UrlLocal", "Offence", "Contact", "Bodypart", "Upper body part", "Action class", "Severity",
               "Multiple fouls", "Try to play", "Touch ball", "Handball", "Handball offence", "Clips"}
CLIP_KEYS = {"Url", "Camera type", "Timestamp", "Replay speed"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth_cache")


@pytest.fixture(scope="module")
def tiny_root(cache_dir: Path) -> Path:
    """A tiny data set where default_data_root looks for it (written with MINI per class to keep the test fast)."""
    root = cache_dir / "synthetic" / synthetic.default_root_name(TINY, seed=0)
    return synthetic.generate(root, scale=TINY, seed=0, min_per_class=MINI)


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
        targets = synthetic.kept_targets(split, TINY, MINI)
        assert loaded.class_counts("action").tolist() == targets["action"].tolist()
        assert loaded.class_counts("severity").tolist() == targets["severity"].tolist()
        assert (targets["action"] >= MINI).all() and (targets["severity"] >= MINI).all()
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


def test_frame_size_is_what_the_constants_say() -> None:
    assert synthetic.WIDTH * 9 == synthetic.HEIGHT * 16 and synthetic.WIDTH % 2 == synthetic.HEIGHT % 2 == 0
    live = synthetic.ViewSpec(synthetic.LIVE_CAMERA, 1.0, 0)
    frames = synthetic.render_view(0, 1, 1.0, live, np.random.default_rng(0), (0, 75, 125))
    assert frames.shape == (3, synthetic.HEIGHT, synthetic.WIDTH, 3) and frames.dtype == np.uint8


def test_class_information_starts_with_the_event_and_only_in_views_that_show_the_foul() -> None:
    start = synthetic.EVENT_FRAME - synthetic.EVENT_HALF - synthetic.EVENT_JITTER
    end = synthetic.EVENT_FRAME + synthetic.EVENT_HALF + synthetic.EVENT_JITTER
    live = synthetic.ViewSpec("Main camera center", 1.0, 0)
    dive = synthetic.render_view(7, 3, 1.0, live, np.random.default_rng(5))
    tackle = synthetic.render_view(1, 1, 1.0, live, np.random.default_rng(5))
    differs = np.abs(dive.astype(int) - tackle.astype(int)).reshape(len(dive), -1).max(1) > 0
    assert not differs[:start].any()                   # the same run-up whatever the class
    assert differs[start:end + 1].sum() >= 15
    for camera in (name for name, cam in synthetic.CAMERAS.items() if not cam.signal):
        view = synthetic.ViewSpec(camera, 1.8, 0)
        frames = (0, 60, 70, 75, 80, 90, 125)
        assert np.array_equal(synthetic.render_view(7, 3, 1.0, view, np.random.default_rng(5), frames),
                              synthetic.render_view(1, 1, 1.0, view, np.random.default_rng(5), frames))


TAU = np.linspace(-1.5, 1.5, 61)
CONTACT = (TAU > -0.35) & (TAU < 0.35)


def _bodies(action: int, severity: int, seed: int = 0, foul: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """World joints [T, J, 3] of offender and victim over TAU (contact at 0), the intensity without its jitter."""
    scene = synthetic._draw_scene(np.random.default_rng(seed), action, severity, 1.0)
    scene.k = synthetic.INTENSITY[severity]
    offender, victim = synthetic._choreograph(scene, TAU, action if foul else None)
    return synthetic._joints(offender), synthetic._joints(victim)


def _gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Closest distance between any joint of a and any joint of b, per time step."""
    return np.linalg.norm(a[:, :, None] - b[:, None], axis=-1).min((1, 2))


def test_each_action_class_is_its_own_pose_and_contact() -> None:
    s = synthetic
    at = int(np.argmin(np.abs(TAU)))
    for seed in range(3):
        bodies = {a: _bodies(a, 2, seed) for a in range(8)}
        pelvis = {a: off[at, s.PELVIS, 2] for a, (off, _) in bodies.items()}
        foot = {a: off[at, [s.L_FOOT, s.R_FOOT], 2].max() for a, (off, _) in bodies.items()}
        assert pelvis[0] < 0.5 < min(v for a, v in pelvis.items() if a != 0)        # Tackling: slides in low
        assert foot[2] > 1.2 and max(v for a, v in foot.items() if a != 2) < 0.8     # High leg: foot up high
        assert 0.4 < foot[1] < 0.8                                                   # Standing tackling: reaching
        for a in range(7):                                                            # contact, except ...
            assert _gap(*bodies[a])[CONTACT].min() < 0.2, a
        assert _gap(*bodies[7])[TAU > -0.5].min() > 0.8                               # ... the Dive: none at all
        off, vic = bodies[7]
        assert vic[-1, s.PELVIS, 2] < 0.3 < off[-1, s.PELVIS, 2]                    # he falls, on his own
        off, vic = bodies[3]                                                          # Holding: a hand on the
        hands = off[:, [s.L_HAND, s.R_HAND]]                                          # victim's body, held
        grip = np.linalg.norm(hands[:, :, None] - vic[:, None], axis=-1).min((1, 2))
        assert (grip[TAU > 0] < 0.25).all()
        off, vic = bodies[4]                                                          # Pushing: both hands on him
        hands = np.linalg.norm(off[at, [s.L_HAND, s.R_HAND], None] - vic[at, None], axis=-1).min(1)
        assert (hands < 0.25).all()
        off, vic = bodies[5]                                                          # Elbowing: an elbow up
        elbow = off[at, [s.L_ELBOW, s.R_ELBOW], 2].max()                              # at head height
        assert elbow > off[at, s.L_SHOULDER, 2] and elbow > max(b[0][at, [s.L_ELBOW, s.R_ELBOW], 2].max()
                                                               for a, b in bodies.items() if a not in (2, 5, 7))
    # Rendered, the classes differ in a small part of the frame (the players), not globally.
    close = synthetic.ViewSpec("Close-up player or field referee", 1.0, 0)
    frames = [synthetic.render_view(a, 2, 1.0, close, np.random.default_rng(11), (75,))[0].astype(int)
              for a in range(8)]
    for i in range(8):
        for j in range(i + 1, 8):
            changed = (frames[i] != frames[j]).any(-1).mean()
            assert 0.001 < changed < 0.1, (i, j, changed)


def test_severity_is_the_intensity_of_the_contact() -> None:
    """The victim's reaction (how far he is knocked and falls, against the same run without a foul) grows with the
    severity class, for every action class but the Dive."""
    for action in range(7):
        reaction = []
        for severity in range(4):
            _, victim = _bodies(action, severity, seed=action)
            _, unfouled = _bodies(action, severity, seed=action, foul=False)
            reaction.append(np.linalg.norm(victim[-1] - unfouled[-1], axis=-1).mean())
        assert reaction[0] < 0.1 and np.all(np.diff(reaction) > 0.1), (action, reaction)


def test_window_frames_are_the_full_clip_frames() -> None:
    spec = next(s for s in synthetic.plan_split("Test", TINY) if len(s.views) >= 3)
    window = (63, 65, 66, 68, 70, 71, 73, 75, 76, 78, 79, 81, 83, 84, 86, 87)
    for full, part in zip(synthetic.render_action(spec), synthetic.render_action(spec, window), strict=True):
        assert np.array_equal(full[list(window)], part)


def test_fast_rgb_conversion_matches_a_plain_copy() -> None:
    rgba = np.random.default_rng(0).integers(0, 2**32, size=(3, 20, 36), dtype=np.uint32)
    view = rgba[:, 2:-2, 3:-3]
    assert np.array_equal(synthetic._fast_rgb(view), synthetic._slow_rgb(view))
    assert np.array_equal(synthetic._to_rgb(view), synthetic._slow_rgb(view))


def test_generation_is_deterministic_for_a_seed(tiny_root: Path, tmp_path: Path) -> None:
    """The same seed writes the same bytes: annotations, and the clips of a few actions written again."""
    for split in synthetic.LABELLED:
        doc = synthetic.annotations_doc(split, synthetic.plan_split(split, TINY, seed=0, min_per_class=MINI))
        assert json.dumps(doc, indent=1) == (tiny_root / split / "annotations.json").read_text()
    specs = synthetic.plan_split("Valid", TINY, seed=0, min_per_class=MINI)[:3]
    for spec in specs:
        synthetic._write_action((tmp_path, spec))
        for k in range(len(spec.views)):
            clip = Path(spec.split) / f"action_{spec.index}" / f"clip_{k}.mp4"
            assert hashlib.md5((tmp_path / clip).read_bytes()).digest() == \
                hashlib.md5((tiny_root / clip).read_bytes()).digest()
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
