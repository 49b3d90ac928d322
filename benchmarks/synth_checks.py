"""Checks of the synthetic MVFouls generator (data v4) that are not tests: cost per clip, and the "should fail" check.

    python benchmarks/synth_checks.py cost                 # CPU ms per clip: render, encode (x264 auto / 1 thread)
    python benchmarks/synth_checks.py shortcuts            # global colour + motion energy -> logistic regression
    python benchmarks/synth_checks.py shortcuts --seeds 0 1 2 3 --cache /tmp/synth_feats

`cost` renders actions of a small Train plan (`render_action`) and encodes each clip with `write_clip`, timing CPU
(process time, so x264's threads count) per clip; medians are printed. At a second frame size (`--also 224x126`)
the same clips are resized with PIL and encoded too.

`shortcuts`: the class must not be readable from global statistics. Per view, over the baseline window 63..87
(16 frames): mean RGB, std RGB, mean |frame difference| and its 15-step time profile; per action, the live view's
features and their mean over its views. A class-balanced logistic regression is trained on the default data set's
Train (scale 0.5, seed 0) and scored on Valid+Test of the generator seeds given (pooled), per feature set. Prints
balanced accuracy (macro recall); chance is 12.5% (action) and 25% (severity). Rendering is in memory (no mp4s).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from mvfouls_ab import labels
from mvfouls_ab.data import synthetic
from mvfouls_ab.data.video import write_clip

WINDOW = tuple(int(i) for i in np.rint(np.linspace(63, 87, 16)))
FEATURE_SETS = {   # columns of the 44 features: live view 0..21, mean over views 22..43
    "mean colour + mean motion (brief)": np.r_[0:7, 22:29],
    "mean + std colour": np.r_[0:6, 22:28],
    "motion time profile": np.r_[6:22, 28:44],
    "all": np.r_[0:44],
}


def cost(n_actions: int, also: str | None) -> None:
    specs = synthetic.plan_split("Train", 0.05, 1)[:n_actions]
    folder = Path(tempfile.mkdtemp())
    times: dict[str, list[float]] = {"render": [], "encode threads=1": [], "encode auto": []}
    other: list[float] = []
    size = tuple(int(v) for v in also.split("x")) if also else None
    for spec in specs:
        t = time.process_time()
        clips = synthetic.render_action(spec)
        times["render"].append((time.process_time() - t) / len(clips))
        for clip in clips:
            for name, threads in (("encode threads=1", 1), ("encode auto", 0)):
                t = time.process_time()
                write_clip(folder / "clip.mp4", clip, threads=threads)
                times[name].append(time.process_time() - t)
            if size:
                from PIL import Image

                small = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in clip])
                t = time.process_time()
                write_clip(folder / "small.mp4", small, threads=1)
                other.append(time.process_time() - t)
    kb = (folder / "clip.mp4").stat().st_size / 1024
    print(f"{synthetic.WIDTH}x{synthetic.HEIGHT}, {len(times['render'])} actions, {len(times['encode auto'])} clips "
          f"(CPU ms per clip, median): " + ", ".join(f"{k} {np.median(v) * 1000:.1f}" for k, v in times.items())
          + f"; last mp4 {kb:.0f} KB")
    if other:
        print(f"{also}: encode threads=1 {np.median(other) * 1000:.1f} ms")


def _features(spec: synthetic.ActionSpec) -> np.ndarray:
    out = []
    for video in synthetic.render_action(spec, WINDOW):
        v = video.astype(np.float32)
        diff = np.abs(np.diff(v, axis=0)).mean(axis=(1, 2, 3))
        out.append(np.concatenate([v.mean(axis=(0, 1, 2)), v.std(axis=(0, 1, 2)), [diff.mean()], diff]))
    views = np.array(out)
    return np.concatenate([views[0], views.mean(0)])


def _split(name: str, seed: int, cache: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = Path(cache) / f"v{synthetic.VERSION}_{name}_{seed}.npz" if cache else None
    if path is not None and path.is_file():
        z = np.load(path)
        return z["X"], z["action"], z["severity"]
    specs = [s for s in synthetic.plan_split(name, synthetic.DEFAULT_SCALE, seed) if labels.official_label(s.raw)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        X = np.array(list(pool.map(_features, specs, chunksize=16)))
    kept = [labels.official_label(s.raw) for s in specs]
    action, severity = np.array([k.action for k in kept]), np.array([k.severity for k in kept])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, X=X, action=action, severity=severity)
    return X, action, severity


def shortcuts(seeds: list[int], cache: str) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, recall_score
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    train = _split("Train", synthetic.DEFAULT_SEED, cache)
    tests = [_split(name, seed, cache) for seed in seeds for name in ("Valid", "Test")]
    test = [np.concatenate([t[i] for t in tests]) for i in range(3)]
    print(f"Train {len(train[0])} / Test {len(test[0])} kept actions, {train[0].shape[1]} features, "
          f"{time.perf_counter() - started:.0f} s")
    scaler = StandardScaler().fit(train[0])
    xtr, xte = scaler.transform(train[0]), scaler.transform(test[0])
    for t, task in enumerate(("action", "severity"), start=1):
        for name, cols in FEATURE_SETS.items():
            clf = LogisticRegression(max_iter=5000, class_weight="balanced").fit(xtr[:, cols], train[t])
            pred = clf.predict(xte[:, cols])
            recall = recall_score(test[t], pred, average=None, labels=range(labels.NUM_CLASSES[task]),
                                  zero_division=0)
            print(f"{task:8s} {name:34s} balanced accuracy {balanced_accuracy_score(test[t], pred):.3f}  "
                  f"per class {np.round(recall, 2).tolist()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost", help="CPU ms per clip: render and encode")
    c.add_argument("--actions", type=int, default=40)
    c.add_argument("--also", default=None, help="a second frame size to encode, e.g. 224x126")
    s = sub.add_parser("shortcuts", help="the 'should fail' check")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="generator seeds of Valid+Test")
    s.add_argument("--cache", default=os.environ.get("SYNTH_CHECKS_CACHE", ""), help="folder for feature files")
    args = p.parse_args(argv)
    if args.what == "cost":
        cost(args.actions, args.also)
    else:
        shortcuts(args.seeds, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
