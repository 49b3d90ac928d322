"""Shared test fixtures: a tiny MVFouls data set in the real layout, with real H.264 clips written by PyAV."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mvfouls_ab import labels
from mvfouls_ab.data.video import write_clip

torch.set_num_threads(1)

# Kept (action class, offence, severity) triples: together they hit every action and every severity class.
TINY_KEPT = (
    ("Tackling", "Offence", "1.0"), ("Standing tackling", "Offence", "3.0"), ("High leg", "Offence", "5.0"),
    ("Holding", "No offence", ""), ("Pushing", "Offence", "1.0"), ("Elbowing", "Offence", "3.0"),
    ("Challenge", "No Offence", ""), ("Dive", "Between", ""),
)
# One action per filter rule 1, 2, 3 (added to each labelled split when dropped=True).
TINY_DROPPED = (("Dont know", "Offence", "1.0"), ("Tackling", "Between", "3.0"), ("Holding", "Offence", "2.0"))


def tiny_frames(action: int, severity: int, view: int, rng: np.random.Generator, frames: int = 100,
                size: tuple[int, int] = (64, 36)) -> np.ndarray:
    """uint8 [T,H,W,3]: a square whose colour encodes the action class and whose speed encodes the severity."""
    width, height = size
    video = np.empty((frames, height, width, 3), np.uint8)
    video[:] = rng.integers(30, 60, size=3, dtype=np.uint8)
    colour = np.array([40 + 26 * action, 200 - 40 * (view % 4), 90 + 30 * severity], np.uint8)
    for t in range(frames):
        x = (t * (1 + severity)) % (width - 8)
        y = (height - 8) // 2
        video[t, y:y + 8, x:x + 8] = colour
    return video


def make_tiny_dataset(root: Path | str, n_per_split: int = 8, seed: int = 0, *, frames: int = 100,
                      size: tuple[int, int] = (64, 36), dropped: bool = True,
                      splits: tuple[str, ...] = ("Train", "Valid", "Test", "Chall")) -> Path:
    """Write a tiny MVFouls data set (real layout, annotations.json keys, mp4 clips) under `root`.

    Each labelled split holds `n_per_split` kept actions cycling through TINY_KEPT (offset by split), with 2, 3,
    4 views in turn, plus (dropped=True) three actions the official filter drops, one per rule 1-3, at the end.
    Chall holds `n_per_split` unlabelled actions and no annotations.json.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for s, split in enumerate(splits):
        triples = [TINY_KEPT[(i + s) % len(TINY_KEPT)] for i in range(n_per_split)]
        if dropped and split != "Chall":
            triples += list(TINY_DROPPED)
        actions = {}
        for i, (action_class, offence, severity) in enumerate(triples):
            label = labels.official_label({"Action class": action_class, "Offence": offence, "Severity": severity})
            a, sev = (label.action, label.severity) if label else (0, 0)
            clips = []
            for k in range(2 + i % 3):
                write_clip(root / split / f"action_{i}" / f"clip_{k}.mp4",
                           tiny_frames(a, sev, k, rng, frames, size))
                clips.append({"Url": f"Dataset/{split}/action_{i}/clip_{k}",
                              "Camera type": "Main camera center" if k == 0 else "Close-up player or field referee",
                              "Timestamp": 1000 * i + k, "Replay speed": 1.0 if k == 0 else 1.8})
            actions[str(i)] = {
                "UrlLocal": f"Dataset/{split}/action_{i}", "Offence": offence, "Contact": "With contact",
                "Bodypart": "Under body", "Upper body part": "", "Action class": action_class,
                "Severity": severity, "Multiple fouls": "", "Try to play": "", "Touch ball": "",
                "Handball": "No handball", "Handball offence": "", "Clips": clips,
            }
        if split != "Chall":
            doc = {"Set": split.lower(), "Number of actions": len(actions), "Actions": actions}
            (root / split / "annotations.json").write_text(json.dumps(doc, indent=1))
    return root


@pytest.fixture(scope="session")
def tiny_mvfouls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MVFouls data set shared by the whole session (read-only: copy it before changing anything)."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_mvfouls"))


@pytest.fixture(scope="session")
def r2plus1d_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict of a randomly initialised torchvision r2plus1d_18 (classifier included), as a local file."""
    from torchvision.models import video as tv_video

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("weights") / "r2plus1d_18.pth"
    torch.save(tv_video.r2plus1d_18(weights=None).state_dict(), path)
    return path


# The native tracking stack (tracking/stack.py), shared by tests/test_stack.py and tests/test_notebooks.py.
from native_stack import native_stack  # noqa: F401

# Real PostgreSQL databases and `mlflow server` subprocesses for the tracking and study tests (tests/pg.py).
from pg import mlflow_pg_server, mlflow_sqlite_server, pg_url  # noqa: F401
