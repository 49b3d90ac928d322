"""A stand-in for a data set the project has never seen: MVFouls layout, the class in a small glyph on a player.

    python benchmarks/glyph_standin.py --out DIR [--scale 0.3] [--seed 0] [--workers 2]

Issue 11 describes an independent data set the learner is judged on: the real annotation keys, Train class counts,
raw-label noise and view proportions (all taken from mvfouls_ab.data.synthetic's plan, so ~875 Train actions at
scale 0.3), 126-frame mp4s at 25 fps, 398x224, the event near frame 75, whose class signal is fine spatial structure:
a small glyph drawn on the players around the event, the severity legible mainly in the replay views.

This script writes one such set so the learner can be checked on data it was not shaped for: the pitch, players and
camera motion here share nothing with the v4 generator's articulated figures. The glyphs: a fixed random 7x7 binary
pattern per action class (2 px cells) on the offender's shirt, and a 5x5 pattern per severity class on the other
player's shirt in the replay views only, both for frames 69-81 of each clip. It is a benchmark input, never a
default or a test fixture, and a figure measured on it counts only next to the frozen random control
(benchmarks/synth_calibration.py --data DIR).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvfouls_ab.data import synthetic  # noqa: E402
from mvfouls_ab.data.video import write_clip  # noqa: E402

WIDTH, HEIGHT = 398, 224
FRAMES, EVENT, HALF = 126, 75, 6
CELL = 2                                   # pixels per glyph cell
ACTION_GLYPHS = np.random.default_rng(1234).integers(0, 2, (8, 7, 7)).astype(bool)
SEVERITY_GLYPHS = np.random.default_rng(4321).integers(0, 2, (4, 5, 5)).astype(bool)
KITS = np.array([(200, 30, 30), (30, 60, 200), (240, 240, 240), (20, 20, 20), (230, 200, 30), (120, 30, 160)])


def _player(img: np.ndarray, x: float, y: float, kit, scale: float) -> tuple[int, int, int, int]:
    """A player: shirt, shorts, head, legs (rectangles) with feet at (x, y); returns the shirt box."""
    h, w = int(40 * scale), int(14 * scale)
    x0, y0 = int(x - w / 2), int(y - h)
    boxes = [(x0 + w // 4, y0, w // 2, h // 6, (225, 185, 150)),            # head
             (x0, y0 + h // 6, w, int(h * 0.4), kit),                        # shirt
             (x0, y0 + int(h * 0.56), w, h // 6, (30, 30, 30)),              # shorts
             (x0 + 1, y0 + int(h * 0.72), w // 3, int(h * 0.28), (225, 185, 150)),
             (x0 + w - 1 - w // 3, y0 + int(h * 0.72), w // 3, int(h * 0.28), (225, 185, 150))]
    for bx, by, bw, bh, colour in boxes:
        ys, xs = slice(max(by, 0), max(min(by + bh, HEIGHT), 0)), slice(max(bx, 0), max(min(bx + bw, WIDTH), 0))
        img[ys, xs] = colour
    return x0, y0 + h // 6, w, int(h * 0.4)


def _glyph(img: np.ndarray, pattern: np.ndarray, box: tuple[int, int, int, int]) -> None:
    x0, y0, w, h = box
    gh, gw = pattern.shape[0] * CELL, pattern.shape[1] * CELL
    cx, cy = x0 + w // 2 - gw // 2, y0 + h // 2 - gh // 2
    cells = np.kron(pattern, np.ones((CELL, CELL), bool))
    ys, xs = slice(cy, cy + gh), slice(cx, cx + gw)
    if cy < 0 or cx < 0 or cy + gh > HEIGHT or cx + gw > WIDTH:
        return
    patch = img[ys, xs]
    patch[cells] = 250
    patch[~cells] = 10


def render_view(action: int, severity: int, view: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames [126, 224, 398, 3] of one view."""
    tone = rng.uniform(0.8, 1.1)
    grass = np.array([60, 130, 60]) * tone
    stripes = (np.arange(WIDTH)[None, :] // rng.integers(30, 60)) % 2
    base = np.clip(grass[None, None] * (1 + 0.08 * stripes[..., None]) + rng.normal(0, 6, (HEIGHT, WIDTH, 3)), 0, 255)
    base = base.astype(np.uint8)
    kits = KITS[rng.choice(len(KITS), 2, replace=False)]
    zoom = rng.uniform(0.9, 1.4) if view else rng.uniform(0.8, 1.1)
    n_other = rng.integers(2, 7)
    start = rng.uniform([40, 90], [WIDTH - 40, HEIGHT - 10], (n_other + 2, 2))
    start[1] = start[0] + rng.uniform([18, -8], [30, 8])
    start[:, 1] = np.clip(start[:, 1], 70, HEIGHT - 4)
    vel = rng.normal(0, 0.8, (n_other + 2, 2))
    vel[1] = vel[0]
    pan = rng.normal(0, 0.6)
    frames = np.empty((FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(FRAMES):
        img = np.roll(base, int(pan * t) % WIDTH, axis=1)
        dt = t - EVENT
        pos = start + vel * dt
        boxes = [_player(img, *pos[k], kits[k % 2], zoom) for k in range(n_other + 2)][:2]   # 0: offender
        if abs(dt) <= HALF:
            _glyph(img, ACTION_GLYPHS[action], boxes[0])
            if view > 0:
                _glyph(img, SEVERITY_GLYPHS[severity], boxes[1])
        frames[t] = img
    return frames


def _write_action(job) -> int:
    root, spec = job
    rng = np.random.default_rng(spec.seed)
    for k in range(len(spec.views)):
        write_clip(root / spec.split / f"action_{spec.index}" / f"clip_{k}.mp4",
                   render_view(spec.look_action, spec.look_severity, k, rng), fps=25, threads=1)
    return len(spec.views)


def generate(out: Path, scale: float, seed: int, workers: int) -> None:
    if out.exists():
        raise SystemExit(f"{out}: exists; remove it or pass another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    plans = {split: synthetic.plan_split(split, scale, seed) for split in synthetic.SPLIT_NAMES}
    for split, specs in plans.items():
        (tmp / split).mkdir(parents=True)
        if split in synthetic.LABELLED:
            (tmp / split / "annotations.json").write_text(json.dumps(synthetic.annotations_doc(split, specs)))
    jobs = [(tmp, spec) for specs in plans.values() for spec in specs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        clips = sum(pool.map(_write_action, jobs, chunksize=8))
    (tmp / "glyph_standin.json").write_text(json.dumps({"scale": scale, "seed": seed, "clips": clips,
                                                         "actions": {s: len(p) for s, p in plans.items()},
                                                         "seconds": round(time.perf_counter() - started, 1)}))
    os.rename(tmp, out)
    print(f"{out}: {clips} clips, {sum(len(p) for p in plans.values())} actions in "
          f"{time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scale", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    generate(args.out.expanduser().absolute(), args.scale, args.seed, args.workers)


if __name__ == "__main__":
    main()
