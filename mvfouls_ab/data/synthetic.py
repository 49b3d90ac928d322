"""A synthetic SoccerNet MVFouls data set: the real layout and annotation format, with learnable videos.

`generate(out, scale, seed)` writes `Train/ Valid/ Test/ Chall/` exactly like the real release (MVFOULS.md):
`annotations.json` with the real keys and raw values (noise values included, so the official filter drops what it
drops on the real Train split) and `action_<id>/clip_<k>.mp4` H.264 clips at 25 fps, 126 frames, event near 75.

Labels. At scale 1 the raw value counts of Train are the real ones, and after the official filter every split
keeps the real class counts (Valid's action counts, unpublished, are Train's proportions). Action and severity are
sampled jointly (IPF of an affinity table to both marginals: Dives and Pushes rarely get cards, Elbowing often
does). With `scale < 1` every count is scaled, but each class keeps at least `min_per_class` actions in every
labelled split, so tiny data sets still hold every class of both tasks.

Videos (what a model can learn from). A pitch with mowing stripes, a slowly panning camera, distractor players,
and the main player, a blob. Inside the event (frames `EVENT_FRAME` +- `EVENT_HALF`, about 63..87) the main blob
moves along its action class's motion pattern (sweep direction, shaking, stretching, an opponent stuck to it) and
flashes towards its
severity's colour while it grows (no offence: nothing, no card: white, yellow, red). Outside the event nothing
depends on the class. Views differ: the live "Main camera center" view and close-ups carry the full signal, wide
replays a weaker one, some camera types none at all; replays are slowed (the pattern runs `replay speed` times
slower, so the window sees only its middle). Each action has its own signal gain (difficulty). `CLUTTER` (0.1)
shrinks everything that does not depend on the class (pitch tone, stripe width, pan, drift, position/size/colour
jitter, a third distractor): with full clutter a head memorises the few rare-class examples by their clutter instead
of learning what they share, and calibration (below) becomes a matter of luck.

Imbalance that is real but solvable. Some actions of a frequent class *look like* a rare class (referees
disagree too): `LOOKALIKES`, e.g. 65% of "no card" fouls show no flash, like "no offence". In the look-alike
region a frequent class then outnumbers the rare one, so a plain cross-entropy model never predicts the rare class,
while a model trained on class-balanced data does (at the cost of the frequent class's look-alikes).
benchmarks/synth_calibration.py measures both on the product's CPU pipeline (README there).
"""
from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import labels
from ..errors import MVFoulsError, located
from .video import write_clip

VERSION = 3                    # bump whenever generated content changes (cache folders carry it)
DEFAULT_SCALE = 0.5            # ~1,950 actions / ~4,450 clips: ~1 min on 2 cores (benchmarks/README.md)
DEFAULT_SEED = 0
MIN_PER_CLASS = 5              # every class of both tasks in every labelled split, whatever the scale
WIDTH, HEIGHT = 128, 72        # 16:9 like the real 398x224 release; the pipeline resizes to 112x112 anyway
FPS = 25
NUM_FRAMES = 126
EVENT_FRAME = 75
EVENT_HALF = 12                # the event (and all class information) spans EVENT_FRAME +- EVENT_HALF (+- jitter)
EVENT_JITTER = 2

LABELLED = ("Train", "Valid", "Test")
SPLIT_NAMES = ("Train", "Valid", "Test", "Chall")
SPLIT_SIZES = {"Train": 2916, "Valid": 411, "Test": 301, "Chall": 273}

# Official class counts kept after the filter (MVFOULS.md). Valid's action counts are not published: Train's
# proportions of its 321 kept actions.
KEPT = {
    "Train": {"action": (357, 1038, 90, 273, 73, 124, 336, 28), "severity": (304, 1303, 685, 27)},
    "Valid": {"action": (49, 144, 12, 38, 10, 17, 47, 4), "severity": (32, 182, 104, 3)},
    "Test": {"action": (43, 107, 6, 28, 5, 11, 46, 5), "severity": (21, 157, 68, 5)},
}
# Action x severity affinity (rows: official action order; columns: no offence, no card, yellow, red), fitted to
# both marginals by IPF. Zeros stay zero.
AFFINITY = np.array([
    [0.10, 0.50, 0.38, 0.020],   # Tackling
    [0.12, 0.62, 0.25, 0.010],   # Standing tackling
    [0.10, 0.40, 0.45, 0.050],   # High leg
    [0.10, 0.55, 0.34, 0.010],   # Holding
    [0.25, 0.60, 0.15, 0.000],   # Pushing: never red
    [0.08, 0.30, 0.50, 0.120],   # Elbowing: often carded
    [0.25, 0.55, 0.19, 0.010],   # Challenge
    [0.15, 0.65, 0.20, 0.000],   # Dive: mostly no card, never red
])

# Raw values of the actions the filter drops, as on the real Train split (they reproduce its raw value counts at
# scale 1 together with the kept actions): rule 1 (no usable action class), rule 2 ("Between" offence),
# rule 3 (offence with an empty or borderline severity).
DROP_RULES = {labels.RULE_ACTION: 63, labels.RULE_OFFENCE: 94, labels.RULE_SEVERITY: 440}
RULE1_ACTION = {"Dont know": 52, "": 11}
RULE1_OFFENCE = {"Offence": 43, "No offence": 20}
RULE3_SEVERITY = {"2.0": 300, "": 96, "4.0": 44}
# Severity strings shared by rule 1/2 drops (157 at scale 1).
RULE12_SEVERITY = {"": 36, "1.0": 61, "2.0": 58, "3.0": 2}
# Action classes of rule 2/3 drops: real raw count minus kept count per class (Dives are never dropped).
DROPPED_ACTION = (91, 226, 13, 88, 15, 54, 47, 0)
# Raw severity of kept "No offence" actions (the filter ignores it).
NO_OFFENCE_SEVERITY = {"": 220, "1.0": 40, "2.0": 44}
# Kept Train Dives with raw noise (the official evaluator's quirks): (offence, severity).
NOISY_DIVES = (("", ""), ("Between", "1.0"), ("Between", "2.0"))

VIEW_COUNTS = {2: 2241, 3: 561, 4: 114}
# camera type -> (share among replays, signal gain, zoom)
CAMERAS = {
    "Main camera center": (0.00, 1.00, 1.0),
    "Close-up player or field referee": (0.45, 1.00, 1.5),
    "Close-up behind the goal": (0.12, 0.80, 1.4),
    "Main behind the goal": (0.12, 0.60, 1.0),
    "Main camera left": (0.07, 0.70, 0.9),
    "Main camera right": (0.07, 0.70, 0.9),
    "Spider camera": (0.06, 0.30, 0.8),
    "Goal line technology camera": (0.04, 0.00, 1.0),
    "Public": (0.04, 0.00, 0.8),
    "Other": (0.03, 0.00, 1.0),
}
LIVE_CAMERA = "Main camera center"
REPLAY_SPEEDS = ((1.0, 0.10), (1.4, 0.20), (1.6, 0.20), (1.8, 0.30), (2.0, 0.20))

# Motion pattern per action class, chosen for cues a random 3D CNN picks up: sweep (vx, vy), shaking (sx, sy),
# shape (stretch: + flat, - tall), and a partner (an opponent stuck to the player).
ACTION_PATTERNS = np.array([
    # vx    vy    sx    sy  stretch partner
    [1.0, 0.3, 0.0, 0.0, +0.7, 0.0],    # Tackling: fast horizontal slide, flat
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],     # Standing tackling: fast horizontal sweep, round
    [0.0, -1.0, 0.0, 0.0, -0.7, 0.0],   # High leg: vertical sweep, tall
    [0.0, 0.0, 0.0, 0.4, 0.0, 1.0],     # Holding: an opponent stuck to the player, a tug
    [0.7, 0.7, 0.0, 0.0, 0.0, 0.0],     # Pushing: diagonal sweep, round
    [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],     # Elbowing: shaking sideways
    [1.0, 0.0, 0.0, 0.0, 0.0, 1.0],     # Challenge: horizontal sweep with an opponent against the player
    [0.0, 1.0, 0.0, 0.0, +0.9, 0.0],    # Dive: falls, flat
])
SWEEP_PX = 24.0       # sweep amplitude (pixels at zoom 1, full gain)
SHAKE_PX = 7.0        # shaking amplitude
SHAKE_CYCLES = 3.0    # shakes over the event
# Severity at the event: colour it flashes towards, blend strength, growth.
SEVERITY_COLOURS = np.array([[0, 0, 0], [235, 235, 235], [240, 215, 30], [215, 25, 30]], np.float32)
SEVERITY_BLEND = (0.0, 0.75, 0.90, 1.00)
SEVERITY_GROWTH = (0.0, 0.35, 0.70, 1.20)
MAIN_COLOUR = np.array([30, 60, 200], np.float32)    # the main player's team (blue)
TEAM_COLOURS = np.array([[25, 25, 30], [90, 160, 230], [120, 40, 150], [0, 110, 110],
                         [150, 90, 40]], np.float32)
BLOB_RADIUS = 10.0
DISTRACTOR_RADIUS = (3.0, 5.0)
STRIPE_CONTRAST = 1.06
PAN_SPEED = 0.15
GAIN_RANGE = (0.7, 1.0)   # per-action signal gain (difficulty)
CLUTTER = 0.1             # scales every class-independent variation (pitch tone, stripes, pan, drift, jitter)
# Ambiguity: (task, frequent class) -> (rare class it looks like, share of the frequent class that does).
LOOKALIKES = {
    ("action", 1): (4, 0.50),    # Standing tackling that looks like Pushing
    ("action", 6): (7, 0.45),    # Challenge that looks like a Dive
    ("severity", 1): (0, 0.65),  # no-card foul that looks like no offence
    ("severity", 2): (3, 0.20),  # yellow that looks like red
}


# ---- counts --------------------------------------------------------------------------------------------------
def apportion(total: int, weights, minimum=0) -> np.ndarray:
    """Split `total` into integers proportional to `weights` (largest remainders), each part >= its `minimum`
    (an int or one per part; only where the weight is > 0), taking what the minimum adds from the largest parts."""
    w = np.asarray(weights, np.float64)
    if total <= 0 or w.sum() <= 0:
        return np.zeros(len(w), np.int64)
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    floor = np.where(w > 0, np.broadcast_to(np.asarray(minimum, np.int64), w.shape), 0)
    for i in np.flatnonzero(out < floor):
        while out[i] < floor[i]:
            spare = out - np.maximum(floor, 0)
            spare[i] = 0
            j = int(np.argmax(spare))
            if spare[j] <= 0:
                break
            out[j] -= 1
            out[i] += 1
    return out


def kept_targets(split: str, scale: float = 1.0, min_per_class: int = MIN_PER_CLASS) -> dict[str, np.ndarray]:
    """Class counts the official filter keeps in a labelled split at this scale: {"action": [8], "severity": [4]}."""
    counts = KEPT[split]
    floor = max(len(c) * min_per_class for c in counts.values())
    total = max(round(sum(counts["action"]) * scale), floor)
    # The minimum never exceeds a class's real count: at scale 1 the counts are exactly the real ones.
    return {task: apportion(total, c, np.minimum(c, min_per_class)) for task, c in counts.items()}


def joint_counts(action: np.ndarray, severity: np.ndarray) -> np.ndarray:
    """Integer action x severity table with exactly these marginals, shaped by AFFINITY (IPF, then rounding)."""
    table = AFFINITY.copy()
    for _ in range(200):
        table *= (action / np.maximum(table.sum(1), 1e-12))[:, None]
        table *= (severity / np.maximum(table.sum(0), 1e-12))[None, :]
    out = np.floor(table).astype(np.int64)
    frac = table - out
    while True:
        rows = action - out.sum(1)
        cols = severity - out.sum(0)
        if not rows.any():
            break
        open_cells = (rows[:, None] > 0) & (cols[None, :] > 0)
        score = np.where(open_cells & (AFFINITY > 0), frac + 1, np.where(open_cells, frac, -1))
        r, c = np.unravel_index(int(np.argmax(score)), score.shape)
        out[r, c] += 1
        frac[r, c] = -0.5
    return out


def _expand(counts: dict[str, int] | np.ndarray, total: int, rng: np.random.Generator,
            minimum: int = 0) -> list:
    """`total` values in the proportions of `counts` ({value: count}), shuffled."""
    keys = list(counts) if isinstance(counts, dict) else list(range(len(counts)))
    weights = list(counts.values()) if isinstance(counts, dict) else list(counts)
    n = apportion(total, weights, minimum)
    values = [k for k, m in zip(keys, n) for _ in range(m)]
    rng.shuffle(values)
    return values


# ---- the plan of a split (labels, views, render parameters) --------------------------------------------------
@dataclass(frozen=True)
class ViewSpec:
    camera: str
    replay_speed: float
    timestamp: int


@dataclass(frozen=True)
class ActionSpec:
    """Everything needed to write one action: its raw annotation fields and how its clips look."""

    split: str
    index: int
    raw: dict            # annotation fields without "Clips" (empty for Chall)
    look_action: int     # the class the video shows (the label, or the rare class it looks like)
    look_severity: int
    gain: float
    views: tuple[ViewSpec, ...]
    seed: int


def _raw(action: str, offence: str, severity: str, rng: np.random.Generator, game: int) -> dict:
    upper = action in ("Holding", "Pushing", "Elbowing")
    return {
        "UrlLocal": f"synthetic/game_{game:03d}", "Offence": offence,
        "Contact": "Without contact" if action == "Dive" else "With contact",
        "Bodypart": "Upper body" if upper else ("Under body" if action else ""),
        "Upper body part": ("Use of arms" if action != "Pushing" else "Use of shoulder") if upper else "",
        "Action class": action, "Severity": severity, "Multiple fouls": "",
        "Try to play": "Yes" if action in ("Tackling", "Standing tackling", "Challenge") and rng.random() < 0.3
        else "", "Touch ball": "", "Handball": "No handball", "Handball offence": "",
    }


def _label_rows(split: str, scale: float, min_per_class: int, rng: np.random.Generator) -> list[tuple]:
    """(raw action, raw offence, raw severity, action class shown, severity class shown) per action, unshuffled."""
    source = "Test" if split == "Chall" else split
    targets = kept_targets(source, scale if split != "Chall" else scale * SPLIT_SIZES["Chall"] / 251,
                           min_per_class)
    table = joint_counts(targets["action"], targets["severity"])
    rows: list[tuple] = []
    noisy = 0
    n_noisy = max(1, round(len(NOISY_DIVES) * scale)) if split == "Train" else 0
    for a in range(len(labels.ACTION_CLASSES)):
        for s in range(len(labels.SEVERITY_CLASSES)):
            for _ in range(table[a, s]):
                name = labels.ACTION_CLASSES[a]
                if s == 0:
                    rows.append([name, "No offence", None, a, s])
                elif name == "Dive" and s == 1 and noisy < min(n_noisy, len(NOISY_DIVES)):
                    rows.append([name, *NOISY_DIVES[noisy], a, s])
                    noisy += 1
                else:
                    rows.append([name, "Offence", ("1.0", "3.0", "5.0")[s - 1], a, s])
    no_off = [r for r in rows if r[2] is None]
    for row, sev in zip(no_off, _expand(NO_OFFENCE_SEVERITY, len(no_off), rng)):
        row[2] = sev
    if split == "Chall":
        return [tuple(r) for r in rows]

    kept = len(rows)
    n_drop = max(SPLIT_SIZES[split] * scale, kept * SPLIT_SIZES[split] / sum(KEPT[split]["action"])) - kept
    per_rule = apportion(round(n_drop), tuple(DROP_RULES.values()), 1)
    n1, n2, n3 = (int(n) for n in per_rule)
    shared_sev = _expand(RULE12_SEVERITY, n1 + n2, rng)
    drop_actions = _expand(DROPPED_ACTION, n2 + n3, rng)

    def shown(a: int) -> tuple[int, int]:  # what a dropped action's video shows: its class (if any), a severity
        return a, int(rng.choice(4, p=np.asarray(KEPT["Train"]["severity"]) / 2319))

    for act, off in zip(_expand(RULE1_ACTION, n1, rng, 1), _expand(RULE1_OFFENCE, n1, rng)):
        rows.append((act, off, shared_sev.pop(), *shown(int(rng.integers(8)))))
    for _ in range(n2):
        a = drop_actions.pop()
        rows.append((labels.ACTION_CLASSES[a], "Between", shared_sev.pop(), *shown(a)))
    for sev in _expand(RULE3_SEVERITY, n3, rng, 1):
        a = drop_actions.pop()
        rows.append((labels.ACTION_CLASSES[a], "Offence", sev, *shown(a)))
    return [tuple(r) for r in rows]


def plan_split(split: str, scale: float = DEFAULT_SCALE, seed: int = DEFAULT_SEED,
               min_per_class: int = MIN_PER_CLASS) -> list[ActionSpec]:
    """The actions of one split in id order: raw labels, what their videos show, their views."""
    split_index = SPLIT_NAMES.index(split)
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_index, 0]))
    rows = _label_rows(split, scale, min_per_class, rng)
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    n_views = _expand({k: v for k, v in VIEW_COUNTS.items()}, len(rows), rng)
    replay_cams = list(CAMERAS)
    replay_p = np.array([c[0] for c in CAMERAS.values()])
    speeds = np.array([s for s, _ in REPLAY_SPEEDS])
    speed_p = np.array([p for _, p in REPLAY_SPEEDS])
    specs = []
    for i, ((action, offence, severity, look_a, look_s), v) in enumerate(zip(rows, n_views)):
        for task, key in (("action", look_a), ("severity", look_s)):
            rare, share = LOOKALIKES.get((task, key), (key, 0.0))
            if rng.random() < share:
                look_a, look_s = (rare, look_s) if task == "action" else (look_a, rare)
        game = int(rng.integers(200))
        stamp = int(rng.integers(60_000, 2_700_000))
        views = [ViewSpec(LIVE_CAMERA, 1.0, stamp)]
        for k in range(1, v):
            cam = replay_cams[int(rng.choice(len(replay_cams), p=replay_p))]
            speed = float(speeds[int(rng.choice(len(speeds), p=speed_p))])
            views.append(ViewSpec(cam, speed, stamp + int(rng.integers(8_000, 40_000)) * k))
        raw = {} if split == "Chall" else _raw(action, offence, severity, rng, game)
        specs.append(ActionSpec(split, i, raw, int(look_a), int(look_s), float(rng.uniform(*GAIN_RANGE)),
                                tuple(views), int(rng.integers(2**31))))
    return specs


def annotations_doc(split: str, specs: list[ActionSpec]) -> dict:
    """The annotations.json document of a labelled split, in the real format."""
    actions = {}
    for spec in specs:
        clips = [{"Url": f"Dataset/{split}/action_{spec.index}/clip_{k}", "Camera type": view.camera,
                  "Timestamp": view.timestamp, "Replay speed": view.replay_speed}
                 for k, view in enumerate(spec.views)]
        actions[str(spec.index)] = {**spec.raw, "Clips": clips}
    return {"Set": split.lower(), "Number of actions": len(actions), "Actions": actions}


# ---- rendering -----------------------------------------------------------------------------------------------
def _smooth_path(rng: np.random.Generator, t: np.ndarray, amplitude: float) -> np.ndarray:
    """A smooth random walk-like 1D path (sum of slow sinusoids)."""
    out = np.zeros_like(t)
    for _ in range(3):
        out += CLUTTER * amplitude * rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * (t / rng.uniform(60, 200) + rng.random()))
    return out


def _jitter(rng: np.random.Generator, low: float, high: float) -> float:
    """A uniform draw in [low, high] shrunk towards the middle by CLUTTER (one draw either way: same stream)."""
    mid = (low + high) / 2
    return mid + (rng.uniform(low, high) - mid) * CLUTTER


def render_view(look_action: int, look_severity: int, gain: float, view: ViewSpec,
                rng: np.random.Generator, frames: tuple[int, ...] | None = None) -> np.ndarray:
    """uint8 frames [T, HEIGHT, WIDTH, 3] of one view: all NUM_FRAMES, or only the frame indices `frames`
    (the same pixels as in the full clip, for quick in-memory use)."""
    _, view_gain, zoom = CAMERAS[view.camera]
    g = gain * view_gain
    t = np.arange(NUM_FRAMES, dtype=np.float32) if frames is None else np.asarray(frames, np.float32)
    n = len(t)
    event = EVENT_FRAME + int(rng.integers(-EVENT_JITTER, EVENT_JITTER + 1))
    u = np.clip((t - event) / EVENT_HALF, -1.0, 1.0)
    env = np.cos(np.pi * u / 2) ** 2                       # 0 outside the event, 1 at its peak
    w = u / view.replay_speed                              # replays: the pattern runs slower
    # Pitch: mowing stripes that pan with the camera; a few tones, as palette indices 0/1.
    pan = _jitter(rng, -PAN_SPEED, PAN_SPEED) * t + _smooth_path(rng, t, 2.0)
    stripe = _jitter(rng, 12, 22) / zoom
    xs = np.arange(WIDTH, dtype=np.float32)
    ys = np.arange(HEIGHT, dtype=np.float32)
    index = ((np.floor((xs[None, :] + pan[:, None]) / stripe) % 2).astype(np.uint8))[:, None, :]
    index = np.broadcast_to(index, (n, HEIGHT, WIDTH)).copy()
    green = np.array([_jitter(rng, 50, 70), _jitter(rng, 125, 145), _jitter(rng, 50, 70)], np.float32)
    palette = [np.broadcast_to(green, (n, 3)), np.broadcast_to(green * STRIPE_CONTRAST, (n, 3))]

    def blob(cx: np.ndarray, cy: np.ndarray, rx: np.ndarray, ry: np.ndarray, colour: np.ndarray) -> None:
        fx = ((xs[None, :] - cx[:, None]) / rx[:, None]) ** 2
        fy = ((ys[None, :] - cy[:, None]) / ry[:, None]) ** 2
        rows, cols = np.flatnonzero((fy <= 1.0).any(0)), np.flatnonzero((fx <= 1.0).any(0))
        if len(rows) and len(cols):     # only the band of rows/columns the blob ever covers
            r, c = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
            mask = (fy[:, r, None] + fx[:, None, c]) <= 1.0
            np.putmask(index[:, r, c], mask, len(palette))
        palette.append(np.broadcast_to(colour, (n, 3)))

    teams = rng.choice(len(TEAM_COLOURS), size=2, replace=False)
    for k in range(2 + int(rng.random() < 0.5 * CLUTTER)):  # distractor players around a formation
        cx = WIDTH * (0.15 + 0.35 * k) + _jitter(rng, -20, 20) + _smooth_path(rng, t, 14.0) - pan * 0.5
        cy = HEIGHT * (0.25 if k % 2 == 0 else 0.75) + _jitter(rng, -10, 10) + _smooth_path(rng, t, 6.0)
        r = np.full(n, rng.uniform(*DISTRACTOR_RADIUS) * zoom, np.float32)
        blob(cx, cy, r, r, TEAM_COLOURS[teams[k % 2]] * _jitter(rng, 0.85, 1.15))
    # The main player: a class-independent drift, plus the event's motion pattern.
    vx, vy, sx, sy, stretch, partner = ACTION_PATTERNS[look_action]
    sweep = np.sin(np.pi * w) * g * SWEEP_PX * zoom
    shake = np.sin(2 * np.pi * SHAKE_CYCLES * w) * env * g * SHAKE_PX * zoom
    cx = WIDTH / 2 + _jitter(rng, -12, 12) + _smooth_path(rng, t, 6.0) + vx * sweep + sx * shake
    cy = HEIGHT / 2 + _jitter(rng, -6, 6) + _smooth_path(rng, t, 3.0) + vy * sweep + sy * shake
    size = BLOB_RADIUS * zoom * _jitter(rng, 0.85, 1.15) * (1 + SEVERITY_GROWTH[look_severity] * g * env)
    rx = size * (1 + stretch * 0.6 * g * env)
    ry = size * (1 - stretch * 0.45 * g * env)
    # The partner (holding): an opponent attached to the player's side while the event lasts.
    side = rng.choice([-1.0, 1.0])
    shown = env * g * partner > 0.2
    blob(np.where(shown, cx + side * size * 1.1, -1000.0), cy, size, size,
         TEAM_COLOURS[teams[1]] * _jitter(rng, 0.85, 1.15))
    base = MAIN_COLOUR * _jitter(rng, 0.85, 1.15)
    blend = (SEVERITY_BLEND[look_severity] * g * _jitter(rng, 0.8, 1.2) * env)[:, None]
    colour = base[None, :] * (1 - blend) + SEVERITY_COLOURS[look_severity][None, :] * blend
    blob(cx, cy, rx, ry, colour)
    pal = np.clip(np.stack(palette, axis=1), 0, 255).astype(np.uint8)       # [T, K, 3]
    flat = index.astype(np.int32) + (np.arange(n, dtype=np.int32) * pal.shape[1])[:, None, None]
    return np.take(pal.reshape(-1, 3), flat, axis=0)


def render_action(spec: ActionSpec, frames: tuple[int, ...] | None = None) -> list[np.ndarray]:
    """Frames of every view of an action (deterministic for its seed); `frames`: only these indices."""
    rng = np.random.default_rng(spec.seed)
    return [render_view(spec.look_action, spec.look_severity, spec.gain, view, rng, frames) for view in spec.views]


def _write_action(job: tuple[Path, ActionSpec]) -> int:
    root, spec = job
    folder = root / spec.split / f"action_{spec.index}"
    for k, frames in enumerate(render_action(spec)):
        write_clip(folder / f"clip_{k}.mp4", frames, fps=FPS)
    return len(spec.views)


# ---- generation ----------------------------------------------------------------------------------------------
def generate(out: Path | str, scale: float = DEFAULT_SCALE, seed: int = DEFAULT_SEED, workers: int = 2,
             min_per_class: int = MIN_PER_CLASS, progress: bool = False) -> Path:
    """Write a synthetic MVFouls data set into `out` (which must not exist or be empty); returns `out`.

    Everything is written into a temporary sibling folder that is renamed to `out` at the end, so `out` either
    holds a complete data set or nothing.
    """
    out = Path(out).expanduser().absolute()
    if scale <= 0:
        raise MVFoulsError(located(out, f"scale={scale} must be > 0", "pass a scale such as 0.5 or 1.0"))
    if out.exists() and any(out.iterdir()):
        raise MVFoulsError(located(out, "output folder exists and is not empty",
                                   "remove it or pass another --out folder"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    started = time.perf_counter()
    try:
        plans = {split: plan_split(split, scale, seed, min_per_class) for split in SPLIT_NAMES}
        for split, specs in plans.items():
            (tmp / split).mkdir()
            if split in LABELLED:
                doc = annotations_doc(split, specs)
                (tmp / split / "annotations.json").write_text(json.dumps(doc, indent=1))
        jobs = [(tmp, spec) for specs in plans.values() for spec in specs]
        jobs.sort(key=lambda j: -len(j[1].views))        # big actions first: better load balance
        if workers > 1:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                clips = _consume(pool.map(_write_action, jobs, chunksize=8), len(jobs), progress)
        else:
            clips = _consume(map(_write_action, jobs), len(jobs), progress)
        info = {"generator": "mvfouls_ab.data.synthetic", "version": VERSION, "scale": scale, "seed": seed,
                "min_per_class": min_per_class, "frame_size": [WIDTH, HEIGHT], "fps": FPS,
                "num_frames": NUM_FRAMES, "event_frame": EVENT_FRAME, "clips": clips,
                "actions": {split: len(specs) for split, specs in plans.items()},
                "seconds": round(time.perf_counter() - started, 1)}
        (tmp / "synthetic.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _consume(results, total: int, progress: bool) -> int:
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=total, desc="synthetic MVFouls", unit="action")
    return sum(results)


def default_root_name(scale: float = DEFAULT_SCALE, seed: int = DEFAULT_SEED) -> str:
    return f"scale{scale:g}_seed{seed}_v{VERSION}"


def default_data_root(cache_dir: Path | str | None = None, scale: float = DEFAULT_SCALE,
                      seed: int = DEFAULT_SEED, progress: bool = True) -> Path:
    """The default synthetic data set under <cache_dir or ~/.cache/mvfouls_ab>/synthetic/, generated on first use.

    A file lock (fcntl.flock) makes concurrent callers wait for one generation instead of racing; the folder
    appears only once complete (atomic rename), so its existence means it is usable.
    """
    from .dataset import default_cache_dir

    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root = base / "synthetic" / default_root_name(scale, seed)
    if (root / "synthetic.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / "synthetic.json").is_file():
                generate(root, scale, seed, progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root
