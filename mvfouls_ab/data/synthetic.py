"""A synthetic SoccerNet MVFouls data set: the real layout and annotation format, with learnable videos.

`generate(out, scale, seed)` writes `Train/ Valid/ Test/ Chall/` exactly like the real release (MVFOULS.md):
`annotations.json` with the real keys and raw values (noise values included, so the official filter drops what it
drops on the real Train split) and `action_<id>/clip_<k>.mp4` H.264 clips at 25 fps, 126 frames, event near 75.

Labels. At scale 1 the raw value counts of Train are the real ones, and after the official filter every split
keeps the real class counts (Valid's action counts, unpublished, are Train's proportions). Action and severity are
sampled jointly (IPF of an affinity table to both marginals: Dives and Pushes rarely get cards, Elbowing often
does). With `scale < 1` every count is scaled, but each class keeps at least `min_per_class` actions in every
labelled split, so tiny data sets still hold every class of both tasks.

Videos (data v4: what a model can learn from). Each action is one scene, filmed by each of its cameras: two
articulated stick figures (head, torso, arms and legs drawn as thick segments a few pixels wide; team-coloured shirt,
shorts and socks; both kits drawn from one list `KITS` whatever the class) run up together, the offender 1.3-1.8 m
behind the victim, among 2-4 other players (teammates of either, sometimes the referee) on a pitch with mowing
stripes, lines, ad boards and stands. Before the event (frame `EVENT_FRAME - EVENT_HALF`, +- `EVENT_JITTER`) nothing
depends on the class. The action class is the pose and the contact over the event:
Tackling: slides in low, the leading leg along the ground into the victim's legs. Standing tackling: upright, one leg
reaching to his feet. High leg: leaning back, a leg raised to his chest or head (he jumps for a header). Holding: an
arm gripping his back, held, pulling him back. Pushing: both arms driven into his back. Elbowing: alongside, a bent
arm raised and swung at his head. Challenge: shoulder to shoulder, both leaning in. Dive: the victim falls with no
contact while the offender stays more than 0.8 m away (and protests).
Severity is the intensity of the contact (`INTENSITY`, +- `INTENSITY_JITTER`): how deep and how fast the limb goes
in, how high, how far it follows through, and the victim's reaction: none (a light or fair contact: he hurdles a fair
slide), a stumble, a fall, flat on the ground and knocked furthest. After the event the players stop (the whistle)
and stay as they are. Nothing is a colour flash: colour statistics, the foul's position in the frame and global
motion energy carry (almost) no class information (the "should fail" check in benchmarks/README.md).
Cameras (`CAMERAS`): each type has its zoom, elevation and range of angles to the foul. Side-on close-ups (zoom 1.5)
show the most detail; the live main camera is wide (players ~40 px tall); behind-the-goal cameras see the contact
end-on, foreshortened; the spider camera from above and small; sometimes a player crosses in front; goal-line,
public and other cameras never show the foul. Replays are slowed (the scene runs `replay speed` times slower, so the
baseline window 63..87 sees the contact itself in slow motion: severity is most legible in close-up replays). The
foul is not centred (+- 25% of the width, +- 20% of the height); the camera follows the play with a lag, drifts,
re-frames once at a random time and shakes (class-independent global motion). Each action's gain (`GAIN_RANGE`)
scales the zoom of all its views (difficulty). Rendering is plain numpy: poses by forward kinematics, segments
stamped as discs into uint32 frames over a background canvas panned per frame (~20 ms a clip, benchmarks/README.md).

Imbalance that is real but solvable. Some actions of a frequent class *look like* a rare class (referees
disagree too): `LOOKALIKES`, e.g. 65% of "no card" fouls are played with the intensity of no offence, half of the
standing tackles look like a push. In the look-alike region a frequent class then outnumbers the rare one, so a
plain cross-entropy model never predicts the rare class, while a model trained on class-balanced data does (at the
cost of the frequent class's look-alikes). benchmarks/synth_calibration.py measures both (README there).
"""
from __future__ import annotations

import fcntl
import functools
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import labels
from ..errors import MVFoulsError, located
from .video import write_clip

VERSION = 4                    # bump whenever generated content changes (cache folders carry it)
DEFAULT_SCALE = 0.5            # ~1,950 actions / ~4,430 clips: ~2 min on 2 cores (benchmarks/README.md)
DEFAULT_SEED = 0
MIN_PER_CLASS = 5              # every class of both tasks in every labelled split, whatever the scale
WIDTH, HEIGHT = 256, 144       # 16:9 like the real 398x224 release; limbs stay 2-6 px wide (benchmarks/README.md)
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


class Camera(NamedTuple):
    """How a camera type films the foul. `share`: its share among replays (clip_1.. ; clip_0 is always live)."""

    share: float
    zoom: float                     # pixels per metre relative to PX_PER_M
    elevation: float                # degrees the camera looks down (spider camera: from above)
    angle: tuple[float, float]      # range of the angle (degrees) between the line of sight and the foul's
    #                                 normal: 0 = side-on (the contact in profile), 90 = end-on (foreshortened)
    occlusion: float                # chance that a player crosses between the camera and the foul
    signal: bool                    # False: the camera never shows the foul (it films something else)


CAMERAS = {
    "Main camera center": Camera(0.00, 0.80, 24.0, (0.0, 50.0), 0.15, True),
    "Close-up player or field referee": Camera(0.45, 1.50, 10.0, (0.0, 60.0), 0.20, True),
    "Close-up behind the goal": Camera(0.12, 1.30, 14.0, (40.0, 80.0), 0.25, True),
    "Main behind the goal": Camera(0.12, 0.75, 22.0, (50.0, 88.0), 0.20, True),
    "Main camera left": Camera(0.07, 0.70, 24.0, (15.0, 60.0), 0.15, True),
    "Main camera right": Camera(0.07, 0.70, 24.0, (15.0, 60.0), 0.15, True),
    "Spider camera": Camera(0.06, 0.50, 62.0, (0.0, 90.0), 0.00, True),
    "Goal line technology camera": Camera(0.04, 0.90, 12.0, (0.0, 90.0), 0.00, False),
    "Public": Camera(0.04, 0.45, 20.0, (0.0, 90.0), 0.00, False),
    "Other": Camera(0.03, 1.00, 18.0, (0.0, 90.0), 0.00, False),
}
LIVE_CAMERA = "Main camera center"
REPLAY_SPEEDS = ((1.0, 0.10), (1.4, 0.20), (1.6, 0.20), (1.8, 0.30), (2.0, 0.20))

PX_PER_M = 28.0               # pixels per metre at zoom 1 (a player is ~50 px tall; limbs 2-4 px wide)
GAIN_RANGE = (0.7, 1.0)       # per-action clarity: scales every view's zoom by 0.8 + 0.2 * gain
# Contact intensity per severity class (no offence, no card, yellow, red) +- INTENSITY_JITTER: how deep and how
# fast the limb goes in, how high, how far it follows through, how far the victim is knocked and how hard he falls.
INTENSITY = (0.12, 0.42, 0.70, 0.98)
INTENSITY_JITTER = 0.07
CLUTTER = 1.0                 # scales class-independent nuisance: other players (0: none), pitch tone, camera motion
# Kits (shirt, shorts, socks). Both teams of every action come from the same list, whatever the class.
KITS = np.array([
    [(200, 30, 40), (245, 245, 245), (200, 30, 40)],      # red
    [(30, 60, 190), (245, 245, 245), (30, 60, 190)],      # blue
    [(238, 238, 238), (25, 25, 35), (238, 238, 238)],     # white
    [(245, 205, 30), (30, 55, 150), (245, 205, 30)],      # yellow
    [(110, 180, 235), (245, 245, 245), (25, 25, 35)],     # sky blue
    [(125, 25, 60), (125, 25, 60), (235, 235, 235)],      # claret
    [(240, 120, 20), (25, 25, 35), (240, 120, 20)],       # orange
    [(100, 40, 150), (235, 235, 235), (100, 40, 150)],    # purple
    [(30, 30, 35), (30, 30, 35), (200, 30, 40)],          # black
], np.float32)
REFEREE_KIT = np.array([(200, 240, 60), (25, 25, 30), (25, 25, 30)], np.float32)
SKINS = np.array([(238, 198, 168), (205, 152, 112), (150, 100, 68), (95, 62, 42)], np.float32)
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

# ---- rendering: figures ------------------------------------------------------------------------------------------
# Skeleton joints (a stick figure: pelvis, waist, neck, head, shoulders/elbows/hands, hips/knees/feet).
(PELVIS, WAIST, NECK, HEAD, L_SHOULDER, L_ELBOW, L_HAND, R_SHOULDER, R_ELBOW, R_HAND,
 L_HIP, L_KNEE, L_FOOT, R_HIP, R_KNEE, R_FOOT) = range(16)
N_JOINTS = 16
# limb -> (root, middle, end joints), segment lengths (m), side (+1 left, -1 right), arm or leg
_LIMBS = {
    "la": ((L_SHOULDER, L_ELBOW, L_HAND), (0.29, 0.29), +1.0, "arm"),
    "ra": ((R_SHOULDER, R_ELBOW, R_HAND), (0.29, 0.29), -1.0, "arm"),
    "ll": ((L_HIP, L_KNEE, L_FOOT), (0.45, 0.46), +1.0, "leg"),
    "rl": ((R_HIP, R_KNEE, R_FOOT), (0.45, 0.46), -1.0, "leg"),
}
# Radius (m) of the body around each joint: the lowest point of the body touches the ground.
_BODY_RADIUS = np.array([0.09, 0.10, 0.07, 0.11, 0.07, 0.05, 0.04, 0.07, 0.05, 0.04,
                         0.08, 0.06, 0.05, 0.08, 0.06, 0.05])
SHIRT, SHORTS, SOCKS, SKIN, BOOTS = range(5)
# Thick segments (joint, joint, radius in m, colour slot), drawn far limbs first, near limbs last.
_ARM_SEGMENTS = ((0, 1, 0.055, SHIRT), (1, 2, 0.045, SKIN))           # indices into the limb's joints
_LEG_SEGMENTS = ((0, 1, 0.075, SHORTS), (1, 2, 0.055, SOCKS), (2, 2, 0.06, BOOTS))
_CORE_SEGMENTS = ((WAIST, NECK, 0.14, SHIRT), (L_HIP, R_HIP, 0.09, SHORTS), (L_SHOULDER, R_SHOULDER, 0.075, SHIRT),
                  (HEAD, HEAD, 0.115, SKIN))
_CORE_LENGTHS = (0.34, 0.18, 0.34, 0.0)       # metres, from _joints
STRIDE = 2.6                  # metres per gait cycle
STOP = 1.4                    # players stop (whistle) by event time +STOP (units of EVENT_HALF, scene time)
BOOT_COLOUR = (25, 25, 25)


@dataclass
class _Pose:
    """One figure over time: position (m, the pair's frame: +x is where the pair runs), facing, lean, limbs."""

    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray        # facing (rad; 0 = +x)
    pitch: np.ndarray      # forward lean (rad; negative = leaning back; pi/2 = lying face down)
    roll: np.ndarray       # sideways lean (rad; positive = towards the figure's left)
    lift: np.ndarray       # height above the ground of the body's lowest point (jumps)
    limbs: dict            # "la"/"ra"/"ll"/"rl" -> [T, 2, 3] segment directions in the body frame
    #                        (forward, outward, up), unit vectors


def _ease(tau: np.ndarray, a: float, b: float) -> np.ndarray:
    """0 before a, 1 after b, smooth in between."""
    u = _clip((tau - a) / max(b - a, 1e-6), 0.0, 1.0)
    return u * u * (3 - 2 * u)


def _bump(tau: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return _ease(tau, a, b) * (1 - _ease(tau, b, c))


def _kf(tau: np.ndarray, keys, values) -> np.ndarray:
    """Keyframes: `values` at times `keys` (increasing), eased in between, held outside."""
    keys = np.asarray(keys, np.float64)
    values = np.asarray(values, np.float64)
    pos = np.interp(tau, keys, np.arange(len(keys), dtype=np.float64))
    i = np.minimum(np.floor(pos).astype(np.int64), len(keys) - 2)
    u = pos - i
    u = u * u * (3 - 2 * u)
    return values[i] + (values[i + 1] - values[i]) * u


def _clip(x, low, high):
    """np.clip without its Python-level overhead (called on small arrays thousands of times per clip)."""
    return np.minimum(np.maximum(x, low), high)


def _sph(a, b) -> np.ndarray:
    """Body-frame direction [..., 3]: swung forward by `a` from hanging down, out to the side by `b`."""
    cb = np.cos(b)
    out = np.empty(np.broadcast_shapes(np.shape(a), np.shape(b)) + (3,))
    out[..., 0] = np.sin(a) * cb
    out[..., 1] = np.sin(b)
    out[..., 2] = -np.cos(a) * cb
    return out


def _segments(a, b, c, sign: float) -> np.ndarray:
    """[..., 2, 3] directions of a limb aimed at `a`, abducted by `b`, bent by `c`; the first segment swung by
    sign * c / 2 (knees forward: +1; elbows back: -1), the second by the opposite."""
    a, b, c = (np.asarray(v, np.float64) for v in (a, b, c))
    half = sign * c / 2
    return _sph(np.stack(np.broadcast_arrays(a + half, a - half), -1), np.asarray(b)[..., None])


def _leg(a, b, c) -> np.ndarray:
    """Leg aimed at `a` (forward from hanging down, body frame), abducted by `b`, knee bent by `c` (knee forward)."""
    return _segments(a, b, c, 1.0)


def _arm(a, b, c) -> np.ndarray:
    """Arm aimed at `a`, abducted by `b`, elbow bent by `c` (forearm forward/up)."""
    return _segments(a, b, c, -1.0)


def _set(pose: _Pose, w, **values) -> None:
    for name, value in values.items():
        cur = getattr(pose, name)
        setattr(pose, name, cur + (np.asarray(value, np.float64) - cur) * w)


def _limb(pose: _Pose, name: str, w, dirs: np.ndarray) -> None:
    cur = pose.limbs[name]
    new = cur + (np.broadcast_to(dirs, cur.shape) - cur) * np.asarray(w, np.float64)[..., None, None]
    pose.limbs[name] = new / np.maximum(np.linalg.norm(new, axis=-1, keepdims=True), 1e-9)


def _reach(pose: _Pose, name: str, target: np.ndarray) -> np.ndarray:
    """Body-frame directions [T, 2, 3] that put the end of limb `name` on the world points `target` [T, 3] (or as
    close as it reaches), the middle joint bent down and out (two-bone inverse kinematics)."""
    (root, _, _), (l1, l2), side, _ = _LIMBS[name]
    F, L, U = _axes(pose.yaw, pose.pitch, pose.roll)
    d = target - _joints(pose)[:, root]
    local = np.stack([(d * F).sum(-1), side * (d * L).sum(-1), (d * U).sum(-1)], -1)
    dist = np.linalg.norm(local, axis=-1, keepdims=True)
    e = local / np.maximum(dist, 1e-9)
    reach = np.clip(dist, 0.1, 0.995 * (l1 + l2))
    bend = np.arccos(np.clip(reach / (l1 + l2), -1.0, 1.0))
    hint = np.array([0.0, 0.5, -1.0])
    n = hint - (e @ hint)[:, None] * e
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
    return np.stack([e * np.cos(bend) + n * np.sin(bend), e * np.cos(bend) - n * np.sin(bend)], -2)


def _travel(tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance run (in units of speed x EVENT_HALF) and speed factor: constant speed, then a stop after the event."""
    u = _clip(tau, 0.0, STOP)
    return np.where(tau < 0, tau, u - u * u / (2 * STOP)), _clip(1 - u / STOP, 0.0, 1.0)


def _run_pose(x, y, yaw, phase, m) -> _Pose:
    """Running (m = 1) or standing (m = 0): legs and arms swing in opposition with the gait phase."""
    n = len(phase)
    m = np.broadcast_to(m, n)
    s, c = np.sin(phase) * m, np.cos(phase) * m
    aim = np.stack([0.05 + 0.55 * s, 0.05 - 0.55 * s, 0.1 - 0.5 * s, 0.1 + 0.5 * s])        # ll, rl, la, ra
    half = np.stack([0.25 + 0.45 * m + 0.45 * c, 0.25 + 0.45 * m - 0.45 * c, 0.4 + m, 0.4 + m]) / 2
    half *= np.array([1.0, 1.0, -1.0, -1.0])[:, None]                                          # knees fwd, elbows back
    dirs = _sph(np.stack([aim + half, aim - half], -1), np.array([0.06, 0.06, 0.18, 0.18])[:, None, None])
    limbs = dict(zip(("ll", "rl", "la", "ra"), dirs))
    return _Pose(np.broadcast_to(x, n).astype(np.float64), np.broadcast_to(y, n).astype(np.float64),
                 np.broadcast_to(yaw, n).astype(np.float64), 0.04 + 0.16 * m, np.zeros(n), np.zeros(n), limbs)


def _axes(yaw, pitch, roll) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World [T,3] forward, left and up axes of a body leaning by pitch/roll and facing yaw."""
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    zero = np.zeros_like(cr)
    local = (np.stack([cp, -sp * sr, -sp * cr], -1),      # forward
             np.stack([zero, cr, -sr], -1),               # left
             np.stack([sp, cp * sr, cp * cr], -1))        # up

    def turn(v):
        return np.stack([v[:, 0] * cy - v[:, 1] * sy, v[:, 0] * sy + v[:, 1] * cy, v[:, 2]], -1)

    return turn(local[0]), turn(local[1]), turn(local[2])


def _joints(pose: _Pose) -> np.ndarray:
    """World joint positions [T, N_JOINTS, 3] (m); the body's lowest point rests on the ground (+ lift)."""
    F, L, U = _axes(pose.yaw, pose.pitch, pose.roll)
    n = len(pose.x)
    J = np.zeros((n, N_JOINTS, 3))
    J[:, PELVIS, 0], J[:, PELVIS, 1] = pose.x, pose.y
    pel = J[:, PELVIS]
    J[:, WAIST] = pel + 0.16 * U
    J[:, NECK] = pel + 0.50 * U
    J[:, HEAD] = pel + 0.66 * U
    J[:, L_SHOULDER] = pel + 0.47 * U + 0.17 * L
    J[:, R_SHOULDER] = pel + 0.47 * U - 0.17 * L
    J[:, L_HIP] = pel + 0.09 * L
    J[:, R_HIP] = pel - 0.09 * L
    for name, ((root, mid, end), (l1, l2), side, _) in _LIMBS.items():
        d = pose.limbs[name]
        world = (F[:, None] * d[..., 0:1] + L[:, None] * (side * d[..., 1:2]) + U[:, None] * d[..., 2:3])
        J[:, mid] = J[:, root] + l1 * world[:, 0]
        J[:, end] = J[:, mid] + l2 * world[:, 1]
    J[..., 2] += (-(J[..., 2] - _BODY_RADIUS).min(axis=1) + pose.lift)[:, None]
    return J


# ---- rendering: the scene (class-independent draws) --------------------------------------------------------------
@dataclass
class _Scene:
    """What one action looks like, whatever the camera: the two players, their run-up, the pitch, the others."""

    action: int | None
    severity: int
    gain: float
    k: float               # contact intensity
    speed: float           # run-up speed (m/s)
    gap: float             # how far the offender runs behind the victim before the event (m)
    lat: float             # his lateral offset (m; the victim is on his left when < 0)
    phase: np.ndarray      # [2] gait phases of offender, victim
    kits: np.ndarray       # [2, 3, 3] offender's and victim's kits
    skins: np.ndarray      # [2, 3]
    others: np.ndarray     # [n, 7] distractors: dx, dy, heading, speed, phase, kit (0/1/2 referee), skin
    pitch: np.ndarray      # [8] stripe width (m), stripe angle, grass r/g/b, two line offsets, stands (m)
    lag: float


def _draw_scene(rng: np.random.Generator, action: int | None, severity: int, gain: float) -> _Scene:
    """All random draws of an action, in a fixed order and number whatever its class (so that views of different
    classes drawn from the same seed are identical before the event and in views that never show the foul)."""
    speed = rng.uniform(3.5, 7.0)
    gap = rng.uniform(1.3, 1.8)
    lat = rng.uniform(0.25, 0.55) * rng.choice([-1.0, 1.0])
    phase = rng.uniform(0, 2 * np.pi, 2)
    teams = rng.choice(len(KITS), 2, replace=False)
    skins = SKINS[rng.integers(len(SKINS), size=2 + 4)]
    k = float(np.clip(INTENSITY[severity] + rng.uniform(-INTENSITY_JITTER, INTENSITY_JITTER), 0.0, 1.0))
    n_others = round(CLUTTER * int(rng.integers(2, 5)))
    others = np.column_stack([
        rng.uniform(-9, 9, 4) * CLUTTER + rng.choice([-1.0, 1.0], 4) * 2.5,   # never on top of the pair
        rng.uniform(-6, 6, 4) * CLUTTER,
        rng.uniform(0, 2 * np.pi, 4), rng.uniform(0.5, 6.0, 4) * CLUTTER, rng.uniform(0, 2 * np.pi, 4),
        rng.choice([0, 0, 1, 1, 2], 4), np.arange(4) + 2])[:n_others]
    pitch = np.array([rng.uniform(4.0, 8.0), rng.uniform(0, np.pi),
                      *(np.array([55.0, 135.0, 55.0]) + rng.uniform(-15, 15, 3) * CLUTTER),
                      rng.uniform(-25, 25), rng.uniform(-25, 25), rng.uniform(5, 35)])
    return _Scene(action, severity, gain, k, speed, gap, lat, phase, KITS[teams], skins, others, pitch,
                  float(rng.uniform(0.0, 0.25)))


def _fall(k: float) -> float:
    """How far (rad) a victim goes down for a contact of intensity k: none, a stumble, a fall, flat on the ground."""
    return 1.5 * float(np.clip((k - 0.3) / 0.65, 0.0, 1.0)) ** 0.9


def _choreograph(sc: _Scene, tau: np.ndarray, action: int | None) -> tuple[_Pose, _Pose]:
    """Offender and victim over scene time tau (units of EVENT_HALF, 0 = contact). Before tau = -1 both run
    the same way whatever the class; `action` None: no foul at all (they run, then stop at the whistle)."""
    trav, m = _travel(tau)
    X = sc.speed * EVENT_HALF / FPS * trav
    A = _run_pose(X - sc.gap, sc.lat, 0.0, sc.phase[0] + 2 * np.pi * X / STRIDE, m)
    V = _run_pose(X, 0.0, 0.0, sc.phase[1] + 2 * np.pi * X / STRIDE, m)
    if action is None:
        return A, V
    k, hit, lat, gap = sc.k, sc.severity > 0, sc.lat, sc.gap
    sg = float(np.sign(lat))                  # the offender's side of the victim (y)
    a_near, a_far = ("l", "r") if sg < 0 else ("r", "l")
    v_near = "r" if sg < 0 else "l"           # the victim's side facing the offender
    def e(a: float, b: float) -> np.ndarray:
        return _ease(tau, a, b)

    def kf(keys, values) -> np.ndarray:
        return _kf(tau, keys, values)

    fall = _fall(k) if hit else 0.0

    def trip(start: float, push: float = 0.0) -> None:   # the victim's legs are taken (or he is shoved): he falls
        if not hit:
            return
        w = e(start, start + 0.65 - 0.35 * k)
        _set(V, w, pitch=0.15 + fall)
        V.x += (0.1 + push + (0.9 + push) * k * k) * e(start, start + 0.6)
        wl = w * min(1.0, fall / 0.6)
        _limb(V, "la", wl, _arm(1.7, 0.5, 0.3))
        _limb(V, "ra", wl, _arm(1.5, 0.5, 0.4))
        _limb(V, "ll", wl, _leg(-0.45, 0.1, 1.1))
        _limb(V, "rl", wl, _leg(-0.1, 0.1, 0.3))

    if action == 0:      # Tackling: slides in low, the leading leg along the ground into the victim's legs
        w = e(-0.7, -0.4)
        lean = kf([-0.7, -0.35, 0.7, 1.4], [0.2, -1.0, -1.0, -0.7])
        _set(A, w, pitch=lean)
        into = 0.12 * k if hit else -0.45
        A.x += kf([-1, -0.45, 0.0, 0.6], [0, 0.15, gap - 0.95 + into, gap - 0.75 + into + 0.5 * k])
        A.y += kf([-1, -0.1], [0, -0.7 * lat])
        studs = 0.55 * k * e(-0.05, 0.25) if hit else 0.0
        _limb(A, a_near + "l", w, _leg(1.5 + lean + studs, 0.12, 0.05))
        _limb(A, a_far + "l", w, _leg(0.8 + lean, 0.15, 1.9))
        _limb(A, a_near + "a", w, _arm(-0.9, 0.35, 0.1))
        _limb(A, a_far + "a", w, _arm(1.6, 0.8, 0.6))
        if hit:
            trip(0.0)
        else:                                  # a fair slide: the victim hurdles it
            hop = _bump(tau, -0.3, -0.05, 0.25)
            V.lift += 0.3 * hop
            _limb(V, "ll", hop, _leg(0.7, 0.1, 1.6))
            _limb(V, "rl", hop, _leg(0.2, 0.1, 1.2))
    elif action == 1:    # Standing tackling: upright, one leg reaching to the ball / the victim's feet
        w = e(-0.65, -0.4)
        wind = -0.2 - 0.25 * (1 - k)
        lean = kf([-0.65, wind, 0.05, 0.5, 1.2], [0.2, 0.1, -0.2, -0.1, 0.05])
        _set(A, w, pitch=lean)
        into = 0.1 * k if hit else -0.35
        A.x += kf([-1, wind, 0.0, 0.6], [0, gap - 1.1, gap - 0.8 + into, gap - 0.75 + into + 0.15 * k])
        A.y += kf([-1, -0.1], [0, -0.5 * lat])
        swing = kf([-0.65, wind, 0.0, 0.3, 1.0], [0.3, -0.4, 0.95 + 0.3 * k, 0.95 + 0.6 * k, 0.15])
        knee = kf([-0.65, wind, 0.0, 1.0], [0.5, 1.2, 0.12, 0.2])
        _limb(A, a_near + "l", w, _leg(swing + lean, 0.22, knee))
        _limb(A, a_far + "l", w, _leg(lean + 0.05, 0.08, 0.25))
        _limb(A, a_near + "a", w, _arm(0.6, 0.8, 0.8))
        _limb(A, a_far + "a", w, _arm(-0.4, 0.7, 0.5))
        trip(0.0)
    elif action == 2:    # High leg: leaning back, a leg raised to the victim's upper body / head
        w = e(-0.6, -0.35)
        wind = -0.15 - 0.2 * (1 - k)
        lean = kf([-0.6, wind, 0.0, 0.4, 1.1], [0.2, -0.25, -0.5 - 0.15 * k, -0.45, 0.0])
        _set(A, w, pitch=lean)
        into = 0.1 * k if hit else -0.3
        A.x += kf([-1, wind, 0.0, 0.6], [0, gap - 1.1, gap - 0.85 + into, gap - 0.85 + into])
        A.y += kf([-1, -0.1], [0, -0.6 * lat])
        swing = kf([-0.6, wind, 0.0, 0.3, 1.0], [0.3, 1.2, 1.9 + 0.6 * k, 1.9 + 0.85 * k, 0.2])
        knee = kf([-0.6, wind, 0.0, 1.0], [0.5, 1.9, 0.1, 0.25])
        _limb(A, a_near + "l", w, _leg(swing + lean, 0.12, knee))
        _limb(A, a_far + "l", w, _leg(lean + 0.05, 0.08, 0.2))
        _limb(A, a_near + "a", w, _arm(0.9, 1.0, 0.4))
        _limb(A, a_far + "a", w, _arm(-0.2, 1.1, 0.4))
        jump = _bump(tau, -0.45, -0.05, 0.3)             # the victim jumps for a header
        V.lift += 0.22 * jump
        _limb(V, "la", jump, _arm(2.2, 0.5, 0.9))
        _limb(V, "ra", jump, _arm(2.2, 0.5, 0.9))
        trip(0.0, push=0.1)
    elif action == 3:    # Holding: an arm gripping the victim's shirt, held; he is pulled back
        w = e(-0.6, -0.35)
        A.x += kf([-1, -0.35, 0.0, 1.0], [0, gap - 0.6, gap - 0.5, gap - 0.45] if hit else
                  [0, gap - 0.6, gap - 0.7, gap - 1.0])
        A.y += kf([-1, -0.35], [0, -0.45 * lat])
        grip = e(-0.55, -0.3) if hit else _bump(tau, -0.55, -0.3, 0.05)
        tug = np.sin(2 * np.pi * 2.5 * tau) * e(-0.3, 0.0)
        lean = -0.1 - 0.25 * k + 0.08 * k * tug
        _set(A, w, pitch=lean)
        _limb(A, a_far + "a", w, _arm(0.2, 0.35, 1.3))
        brace = w * e(-0.4, -0.1)
        _limb(A, a_near + "l", brace, _leg(0.35 + lean, 0.1, 0.3))
        _limb(A, a_far + "l", brace, _leg(-0.35 + lean, 0.1, 0.4))
        if hit:
            wv = e(-0.3, 0.1)
            _set(V, wv, pitch=-(0.15 + 0.35 * k) + 0.1 * k * tug - 0.35 * fall)
            drag = 0.3 * k * e(-0.2, 0.6)
            V.x -= drag
            A.x -= drag
            _limb(V, "la", wv, _arm(-0.7, 0.6, 0.3))
            _limb(V, "ra", wv, _arm(-0.7, 0.6, 0.3))
        # The hand on the victim's shirt: the middle of his back, on the offender's side.
        JV = _joints(V)
        back = (JV[:, WAIST] + 2 * JV[:, NECK]) / 3
        towards = _joints(A)[:, PELVIS] - back
        towards[:, 2] = 0.0
        back += 0.13 * towards / np.maximum(np.linalg.norm(towards, axis=-1, keepdims=True), 1e-9)
        _limb(A, a_near + "a", grip, _reach(A, a_near + "a", back))
    elif action == 4:    # Pushing: both arms extended into the victim's back, who is shoved away
        w = e(-0.55, -0.3)
        shove = 0.05
        load = shove - (0.35 - 0.2 * k)
        lean = kf([-0.55, load, shove, 0.5, 1.2], [0.2, 0.15, 0.35 + 0.25 * k, 0.3 + 0.3 * k, 0.1])
        _set(A, w, pitch=lean)
        A.x += kf([-1, load, shove, 0.6], [0, gap - 0.75, gap - 0.55, gap - 0.5 + 0.3 * k])
        A.y += kf([-1, -0.2], [0, -0.75 * lat])
        bend = kf([-0.55, load, shove, 0.7, 1.2], [0.6, 1.6, 0.05, 0.05, 1.0] if hit else [0.6, 1.2, 0.7, 0.7, 1.0])
        _limb(A, "la", w, _arm(1.45 + lean, -0.1, bend))
        _limb(A, "ra", w, _arm(1.45 + lean, -0.1, bend))
        _limb(A, a_near + "l", w, _leg(0.5, 0.1, 0.4))
        _limb(A, a_far + "l", w, _leg(-0.45, 0.1, 0.2))
        if hit:
            trip(shove, push=0.5)
        else:
            V.x += 0.04 * e(shove, shove + 0.3)
    elif action == 5:    # Elbowing: alongside, a bent arm raised and swung at the victim's head
        w = e(-0.55, -0.3)
        wind = -0.05 - 0.3 * (1 - k)
        A.x += kf([-1, -0.3, 0.0, 0.6], [0, gap - 0.35, gap - 0.18, gap - 0.15])
        A.y += kf([-1, -0.3], [0, sg * 0.5 - lat])
        _set(A, w, yaw=-sg * 0.3 * _bump(tau, wind, 0.0, 0.6))
        if hit:
            swing = kf([-0.55, wind, 0.0, 0.3, 1.0], [0.1, -0.9, 0.0, 0.6 + 0.5 * k, 0.2])
            raised = kf([-0.55, wind, 0.0, 1.0], [0.25, 1.15 + 0.45 * k, 1.25 + 0.55 * k, 0.3])
        else:
            swing = kf([-0.55, wind, 0.0, 0.3, 1.0], [0.1, -0.3, 0.1, 0.2, 0.1])
            raised = kf([-0.55, wind, 0.0, 1.0], [0.25, 1.0, 1.05, 0.3])
        upper = np.stack([np.sin(raised) * np.sin(swing), np.sin(raised) * np.cos(swing), -np.cos(raised)], -1)
        fore = np.stack([0.7 - 0.8 * np.sin(swing), -0.8 * np.cos(swing), np.full_like(swing, 0.25)], -1)
        fore /= np.linalg.norm(fore, axis=-1, keepdims=True)
        _limb(A, a_near + "a", w, np.stack([upper, fore], -2))
        if hit:
            wr = e(0.0, 0.45 - 0.15 * k)
            _set(V, wr, roll=-sg * (0.15 + 1.2 * k), pitch=0.15 - 0.25 * k)
            V.y -= sg * (0.05 + 0.6 * k * k) * e(0.0, 0.6)
            _limb(V, v_near + "a", wr * k, _arm(2.4, 0.2, 2.0))
    elif action == 6:    # Challenge: shoulder to shoulder, leaning into each other
        w = e(-0.55, -0.3)
        A.x += kf([-1, -0.35, 0.0, 0.6], [0, gap - 0.3, gap - 0.1, gap - 0.05])
        A.y += kf([-1, -0.35, 0.0, 0.5], [0, sg * 0.6 - lat, sg * (0.38 - 0.06 * k) - lat, sg * 0.45 - lat])
        lean = kf([-0.55, -0.1, 0.1, 0.7], [0, 0.22 + 0.15 * k, 0.22 + 0.15 * k, 0.05])
        _set(A, w, roll=-sg * lean)
        _limb(A, a_near + "a", w, _arm(0.1, -0.1, 1.8))
        _limb(V, v_near + "a", w, _arm(0.1, -0.1, 1.8))
        _set(V, w, roll=sg * 0.18 * (1 - e(0.0, 0.2)))
        if hit:
            wr = e(0.0, 0.45 - 0.15 * k)
            _set(V, wr, roll=-sg * (0.1 + 0.9 * k))
            V.y -= sg * (0.05 + 0.5 * k * k) * e(0.0, 0.5)
    elif action == 7:    # Dive: the victim falls with no contact; the offender stays away (and protests)
        A.x += kf([-1, -0.3, 0.3, 1.0], [0, -0.1, -0.45, -0.55])
        A.y += kf([-1, 0.2], [0, sg * 0.4])
        protest = e(0.25, 0.55)
        _limb(A, "la", protest, _arm(2.5, 0.45, 0.3))
        _limb(A, "ra", protest, _arm(2.5, 0.45, 0.3))
        wf = e(-0.2, 0.25 - 0.2 * k)
        _set(V, wf, pitch=1.45)
        V.x += (0.3 + 0.4 * k) * e(-0.2, 0.5)
        V.roll += 0.6 * k * np.sin(2 * np.pi * 1.3 * (tau - 0.3)) * e(0.3, 0.5)
        _limb(V, "la", wf, _arm(2.6, 0.5, 0.2))
        _limb(V, "ra", wf, _arm(2.6, 0.5, 0.2))
        _limb(V, "ll", wf, _leg(-0.7, 0.1, 1.0))
        _limb(V, "rl", wf, _leg(-0.4, 0.1, 0.3))
    return A, V

# ---- rendering: cameras and pixels -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=128)
def _disc(r10: int) -> np.ndarray:
    """Offsets (in the drawing buffer's flat index) of the pixels of a filled disc of radius r10 / 10 pixels."""
    r = r10 / 10
    R = int(np.ceil(r))
    dy, dx = np.mgrid[-R:R + 1, -R:R + 1]
    keep = dx * dx + dy * dy <= r * r + 1e-9
    return (dy[keep] * (WIDTH + 2 * BORDER) + dx[keep]).astype(np.int32)


def _rgba(colour) -> int:
    r, g, b = (int(np.clip(round(float(c)), 0, 255)) for c in colour)
    return r | (g << 8) | (b << 16) | (255 << 24)


BORDER = 16                   # off-frame margin of the drawing buffer (> twice the largest disc radius)
_MAX_DISC = 7.0               # largest disc radius drawn (pixels)
_LINSPACE: dict[int, np.ndarray] = {}


def _stamp(flat: np.ndarray, base: np.ndarray, p0: np.ndarray, p1: np.ndarray, r_px: float, length_px: float,
           colour: int) -> None:
    """Draw a thick segment p0-p1 ([T, 2] pixels, one per frame) as discs stamped along it into the uint32
    frames `flat` (each frame BORDER pixels larger on every side; base: each frame's offset). Disc centres are
    clamped so that what lies off the frame lands in the border."""
    r_px = min(r_px, _MAX_DISC)
    n = 1 if length_px <= 0 else int(np.ceil(length_px / max(0.8, 0.9 * r_px))) + 1
    if n == 1:
        pts = p0[:, None, :]
    else:
        lin = _LINSPACE.get(n)
        if lin is None:
            lin = _LINSPACE.setdefault(n, np.linspace(0.0, 1.0, n, dtype=np.float32)[None, :, None])
        pts = p0[:, None, :] + (p1 - p0)[:, None, :] * lin
    c = np.rint(pts).astype(np.int32)
    margin = BORDER - int(np.ceil(r_px))
    cx = _clip(c[..., 0], -margin, WIDTH - 1 + margin)
    cy = _clip(c[..., 1], -margin, HEIGHT - 1 + margin)
    centre = base[:, None] + (cy + BORDER) * (WIDTH + 2 * BORDER) + (cx + BORDER)
    flat[(centre[..., None] + _disc(round(r_px * 10))).ravel()] = colour


def _to_rgb(rgba: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] RGB of uint32 RGBA pixels [T, H, W] (R in the low byte)."""
    global _FAST_RGB
    if _FAST_RGB is None:
        probe = np.arange(2 * 3 * 5, dtype=np.uint32).reshape(2, 3, 5) * np.uint32(0x01030507) + np.uint32(11)
        _FAST_RGB = sys.byteorder == "little" and np.array_equal(_fast_rgb(probe[:, :, 1:4]),
                                                                 _slow_rgb(probe[:, :, 1:4]))
    return _fast_rgb(rgba) if _FAST_RGB else _slow_rgb(rgba)


def _fast_rgb(rgba: np.ndarray) -> np.ndarray:
    """Every pixel stored as 4 bytes at a 3-byte stride in increasing address order: each pixel's alpha byte is
    then overwritten by the next pixel's red (numpy copies in order; _to_rgb checks it once against _slow_rgb)."""
    t, h, w = rgba.shape
    raw = np.empty(t * h * w * 3 + 1, np.uint8)
    np.ndarray((t, h, w), dtype="<u4", buffer=raw, strides=(h * w * 3, w * 3, 3))[...] = rgba
    return raw[:-1].reshape(t, h, w, 3)


def _slow_rgb(rgba: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgba.view(np.uint8).reshape(*rgba.shape, 4)[..., :3])


_FAST_RGB: bool | None = None


def _background(sc: _Scene, right: np.ndarray, depth: np.ndarray, scale: float, sin_el: float, light: float,
                x0: float, y0: float, width: int, height: int) -> np.ndarray:
    """uint32 canvas of the ground plane: mowing stripes, pitch lines, ad boards and stands beyond the touchline.
    Canvas pixel (cx, cy) shows the ground point (cx + x0) / scale along `right`, -(cy + y0) / (scale sin_el) along
    `depth`: a function of ground coordinates only, so any window of frames gets the same pixels."""
    stripe_w, ang, gr, gg, gb, line_u, line_v, stands = (float(p) for p in sc.pitch)
    e = np.array([np.cos(ang), np.sin(ang)])
    eperp = np.array([-np.sin(ang), np.cos(ang)])
    gx = (np.arange(width, dtype=np.float32) + np.float32(x0)) / np.float32(scale)
    gy = -(np.arange(height, dtype=np.float32) + np.float32(y0)) / np.float32(scale * sin_el)
    # u: along the pitch (stripes, a line across it); v: across it (a line along it, then the touchline).
    u = gx[None, :] * np.float32(right @ e) + gy[:, None] * np.float32(depth @ e)
    v = gx[None, :] * np.float32(right @ eperp) + gy[:, None] * np.float32(depth @ eperp)
    grass = np.array([_rgba(np.array([gr, gg, gb]) * light * f) for f in (1.0, 1.08)], np.uint32)
    img = grass[(np.floor(u * np.float32(1 / stripe_w)).astype(np.int32) & 1)]
    img[(np.abs(u - np.float32(line_u)) < 0.07) | (np.abs(v - np.float32(line_v)) < 0.07)] = \
        _rgba(np.array([235, 240, 235]) * light)
    beyond = v > stands
    if beyond.any():
        ub, vb = u[beyond], v[beyond]
        boards = np.array([_rgba(np.array(c) * light) for c in ((20, 40, 130), (230, 230, 230), (200, 40, 30))],
                          np.uint32)
        tones = np.array([_rgba(np.array(c) * light) for c in
                          ((60, 60, 70), (90, 80, 80), (45, 50, 60), (120, 110, 100), (70, 75, 90))], np.uint32)
        crowd = ((np.floor(ub / 0.6) * 7 + np.floor(vb / 0.6) * 13) % 5).astype(np.int64)
        img[beyond] = np.where(vb < stands + 1.0, boards[(np.floor(ub / 5.0) % 3).astype(np.int64)], tones[crowd])
    return img


@functools.lru_cache(maxsize=2)
def _figure_segments(left_far: bool) -> tuple[tuple[int, int, float, int, float], ...]:
    """(joint, joint, radius m, colour slot, length m) of a figure in drawing order: far leg and arm, the core,
    near leg and arm."""
    def limb(name: str) -> list:
        joints, lengths, _, kind = _LIMBS[name]
        return [(joints[i0], joints[i1], radius, slot, 0.0 if i0 == i1 else lengths[min(i0, i1)])
                for i0, i1, radius, slot in (_ARM_SEGMENTS if kind == "arm" else _LEG_SEGMENTS)]

    far, near = ("l", "r") if left_far else ("r", "l")
    core = [(j0, j1, radius, slot, length) for (j0, j1, radius, slot), length in zip(_CORE_SEGMENTS, _CORE_LENGTHS)]
    return tuple(limb(far + "l") + limb(far + "a") + core + limb(near + "l") + limb(near + "a"))


def _render_view(sc: _Scene, view: ViewSpec, rng: np.random.Generator,
                 frames: tuple[int, ...] | None = None) -> np.ndarray:
    """uint8 [T, HEIGHT, WIDTH, 3] frames of one camera's clip of the scene (all NUM_FRAMES, or `frames`)."""
    cam = CAMERAS[view.camera]
    # Per-view draws, a fixed number of them.
    event = EVENT_FRAME + int(rng.integers(-EVENT_JITTER, EVENT_JITTER + 1))
    yaw = np.radians(rng.uniform(*cam.angle)) * rng.choice([-1.0, 1.0]) + np.pi * int(rng.integers(2))
    elevation = np.radians(cam.elevation + rng.uniform(-4.0, 4.0))
    scale = PX_PER_M * cam.zoom * (0.8 + 0.2 * sc.gain) * rng.uniform(0.9, 1.1)
    spread = 1.0 if cam.signal else 2.5                         # cameras that film something else
    frame_x = rng.uniform(-0.25, 0.25) * WIDTH * spread       # where the foul is in the frame (not always centred)
    frame_y = rng.uniform(-0.2, 0.2) * HEIGHT * spread + 0.9 * scale * np.cos(elevation)
    light = rng.uniform(0.85, 1.1)
    drift = rng.uniform(0, 2 * np.pi, 4)
    jolt = rng.uniform(0, 1, 4)          # the operator re-frames once, at a random time (class-independent motion)
    shake = rng.uniform(0, 1, 3)         # hand-held shake
    occ = rng.random() < cam.occlusion
    occ_draw = rng.uniform(0, 1, 5)
    # Time: scene time tau in units of EVENT_HALF (slowed in replays); the event frame is appended to fix the
    # drawing order, so that any window of frames is drawn like the full clip.
    t = np.arange(NUM_FRAMES) if frames is None else np.asarray(frames)
    tau = (np.append(t, event).astype(np.float64) - event) / (view.replay_speed * EVENT_HALF)
    n = len(tau)
    per_tau = EVENT_HALF / FPS                                  # seconds per unit of tau
    A, V = _choreograph(sc, tau, sc.action if cam.signal else None)
    figures = [(A, sc.kits[0], sc.skins[0]), (V, sc.kits[1], sc.skins[1])]
    trav, m = _travel(tau)
    for dx, dy, heading, speed, phase, kit, skin in sc.others:
        dist = speed * per_tau * trav
        x = dx + (sc.speed * per_tau * trav) * 0.6 + np.cos(heading) * dist   # loosely following the play
        y = dy + np.sin(heading) * dist
        pose = _run_pose(x, y, heading, phase + 2 * np.pi * dist / STRIDE, m * min(1.0, speed / 3))
        figures.append((pose, sc.kits[int(kit)] if kit < 2 else REFEREE_KIT, sc.skins[int(skin)]))
    right = np.array([np.cos(yaw), np.sin(yaw)])
    depth = np.array([-np.sin(yaw), np.cos(yaw)])
    # The camera follows the pair with a lag, plus a slow drift.
    cam_tau = tau - sc.lag
    cx = sc.speed * per_tau * _travel(cam_tau)[0] - sc.gap / 2 + CLUTTER * 0.5 * np.sin(0.3 * tau + drift[0])
    cy = sc.lat / 2 + CLUTTER * 0.4 * np.sin(0.25 * tau + drift[1])
    reframe = CLUTTER * 2.5 * jolt[0] * _ease(tau, -1.3 + 2.6 * jolt[1], -1.1 + 2.6 * jolt[1] + 0.4 * jolt[2])
    cx = cx + reframe * np.cos(2 * np.pi * jolt[3])
    cy = cy + reframe * np.sin(2 * np.pi * jolt[3])
    if occ:   # a player crossing between the camera and the foul, close to the camera
        near = -(2.0 + 2.5 * occ_draw[0])
        along = (occ_draw[1] - 0.5) * 1.2 + (occ_draw[2] * 2 - 1) * 4.0 * per_tau * (tau - (occ_draw[3] - 0.5) * 0.6)
        ox = -sc.gap / 2 + sc.speed * per_tau * trav + right[0] * along + depth[0] * near
        oy = sc.lat / 2 + right[1] * along + depth[1] * near
        heading = np.arctan2(right[1], right[0]) + (0.0 if occ_draw[2] > 0.5 else np.pi)
        figures.append((_run_pose(ox, oy, heading, 2 * np.pi * (along / STRIDE + occ_draw[4]), np.ones(n)),
                        sc.kits[int(occ_draw[4] * 2)], sc.skins[5]))
    sx_exact = scale * (cx * right[0] + cy * right[1])
    sy_exact = -scale * np.sin(elevation) * (cx * depth[0] + cy * depth[1])
    frame_t = np.append(t, event).astype(np.float64)
    wobble = CLUTTER * 1.5 * shake[0] * np.sin(2 * np.pi * (0.23 + 0.2 * shake[1]) * frame_t + 7 * shake[2])
    shift_x = np.rint(sx_exact + wobble).astype(np.int64)
    shift_y = np.rint(sy_exact + 0.7 * wobble * np.cos(1.7 * frame_t)).astype(np.int64)
    sin_el, cos_el = float(np.sin(elevation)), float(np.cos(elevation))

    def project(P: np.ndarray) -> np.ndarray:   # [n, ..., 3] world -> [n, ..., 2] pixels of the frame
        gr = P[..., 0] * right[0] + P[..., 1] * right[1]
        gd = P[..., 0] * depth[0] + P[..., 1] * depth[1]
        shape = (n,) + (1,) * (P.ndim - 2)
        px = WIDTH / 2 + frame_x + scale * gr - shift_x.reshape(shape)
        py = HEIGHT / 2 + frame_y - scale * (P[..., 2] * cos_el + gd * sin_el) - shift_y.reshape(shape)
        return np.stack([px, py], -1).astype(np.float32)

    # Background: one canvas for the clip, each frame a window of it.
    nt = len(t)
    sx0, sy0 = int(shift_x[:nt].min()), int(shift_y[:nt].min())
    bh, bw = HEIGHT + 2 * BORDER, WIDTH + 2 * BORDER
    canvas = _background(sc, right, depth, scale, sin_el, light,
                         x0=sx0 - WIDTH / 2 - frame_x, y0=sy0 - HEIGHT / 2 - frame_y,
                         width=WIDTH + int(shift_x[:nt].max()) - sx0, height=HEIGHT + int(shift_y[:nt].max()) - sy0)
    buf = np.empty((nt, bh, bw), np.uint32)          # the border only catches what is drawn off the frame
    inner = buf[:, BORDER:-BORDER, BORDER:-BORDER]
    for i in range(nt):
        ox, oy = int(shift_x[i]) - sx0, int(shift_y[i]) - sy0
        inner[i] = canvas[oy:oy + HEIGHT, ox:ox + WIDTH]
    flat = buf.reshape(-1)
    base = np.arange(nt, dtype=np.int32) * np.int32(bh * bw)
    # The ball rolls on ahead of the victim (whatever the class).
    bx = sc.speed * per_tau * (trav + 0.5 * np.clip(tau + 0.5, 0.0, None) * (tau > -0.5)) + 0.5
    ball = project(np.stack([bx, np.full(n, -0.05), np.full(n, 0.11)], -1))
    items = [(float((np.array([bx[-1], -0.05]) - [cx[-1], cy[-1]]) @ depth), "ball", ball)]
    for pose, kit, skin in figures:
        J = _joints(pose)
        rel = J[-1, PELVIS, :2] - [cx[-1], cy[-1]]
        items.append((float(rel @ depth), "figure", (J, kit, skin)))
    items.sort(key=lambda item: -item[0])              # far first
    for _, kind, data in items:
        if kind == "ball":
            _stamp(flat, base, data[:nt], data[:nt], 0.11 * scale, 0.0, _rgba(np.array([245, 245, 245]) * light))
            continue
        J, kit, skin = data
        P = project(J)
        lo, hi = P[:nt].min(1), P[:nt].max(1)
        pad = 0.2 * scale
        vis = (hi[:, 0] > -pad) & (lo[:, 0] < WIDTH + pad) & (hi[:, 1] > -pad) & (lo[:, 1] < HEIGHT + pad)
        if not vis.any():
            continue
        Pv, bv = P[:nt][vis], base[vis]
        colours = [_rgba(c * light) for c in (*kit, skin)] + [_rgba(np.array(BOOT_COLOUR) * light)]
        # The side of the body facing the camera is drawn last.
        left_far = float((J[-1, L_SHOULDER, :2] - J[-1, R_SHOULDER, :2]) @ depth) > 0
        for j0, j1, radius, slot, length in _figure_segments(left_far):
            _stamp(flat, bv, Pv[:, j0], Pv[:, j1], radius * scale, length * scale, colours[slot])
    return _to_rgb(inner)


def render_view(look_action: int, look_severity: int, gain: float, view: ViewSpec,
                rng: np.random.Generator, frames: tuple[int, ...] | None = None) -> np.ndarray:
    """uint8 frames [T, HEIGHT, WIDTH, 3] of one view of a fresh scene drawn from `rng`: all NUM_FRAMES, or only
    the frame indices `frames` (the same pixels as in the full clip, for quick in-memory use)."""
    return _render_view(_draw_scene(rng, look_action, look_severity, gain), view, rng, frames)


def render_action(spec: ActionSpec, frames: tuple[int, ...] | None = None) -> list[np.ndarray]:
    """Frames of every view of an action (deterministic for its seed): one scene, filmed by each of its cameras;
    `frames`: only these indices."""
    rng = np.random.default_rng(spec.seed)
    scene = _draw_scene(rng, spec.look_action, spec.look_severity, spec.gain)
    return [_render_view(scene, view, rng, frames) for view in spec.views]


def _write_action(job: tuple[Path, ActionSpec]) -> int:
    root, spec = job
    folder = root / spec.split / f"action_{spec.index}"
    for k, frames in enumerate(render_action(spec)):
        write_clip(folder / f"clip_{k}.mp4", frames, fps=FPS, threads=1)   # one encoder thread per worker process
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


def default_data_root(cache_dir: Path | str, scale: float = DEFAULT_SCALE,
                      seed: int = DEFAULT_SEED, progress: bool = True) -> Path:
    """The default synthetic data set under <cache_dir>/synthetic/ (data.paths.default_cache_dir: the cache
    folder a config names), generated on first use.

    A file lock (fcntl.flock) makes concurrent callers wait for one generation instead of racing; the folder
    appears only once complete (atomic rename), so its existence means it is usable.
    """
    base = Path(cache_dir).expanduser()
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
