"""Training throughput of the real trainer: samples/s for end-to-end small 3D CNN and for cached-feature mode.

    python benchmarks/train_throughput.py [--data DIR] [--epochs 2] [--limit 256] [--threads 1]

Both modes run Trainer on the same data (the cached synthetic set without --data), single phase, and report the
median of the per-epoch `samples_per_s` the trainer records (training steps only; evaluation, feature extraction
and first-time clip decoding are outside the timed part: the clip cache is warmed first). End-to-end runs on the
first --limit training actions to keep it short; cached-feature mode uses the whole Train split.
Also prints the wall time of one default 3-phase frozen trial (10/15/15 epochs) once features are cached.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.data.dataset import load_data
from mvfouls_ab.training.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=256, help="training actions for the end-to-end run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 oversubscribes a shared 2-core box)")
    p.add_argument("--skip-trial", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = TrainingConfig(data_root=args.data, device="cpu", num_phases=1, phase1_epochs=args.epochs,
                          sampler_phase1="none", posthoc_adjust=False, threads=args.threads)
    data = load_data(base)
    data.warm(workers=0, progress=True)
    print(f"data: {data.root} | torch threads {torch.get_num_threads()} | {data.summary()}")

    def measure(cfg: TrainingConfig, bundle) -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as tmp:
            result = Trainer(cfg, bundle, [], Path(tmp), resume=False).run()
        rates = [r.samples_per_s for r in result.history]
        return statistics.median(rates), int(result.history[0].extra["train_samples"])

    small = dataclasses.replace(data, train=dataclasses.replace(data.train, actions=data.train.actions[:args.limit]))
    e2e = base.replace(feature_mode="end_to_end", batch_size=8, backbone_lr_mult_phase1=1.0)
    rate, n = measure(e2e, small)
    print(f"end-to-end small3d ({e2e.frame_size}px x {e2e.num_frames} frames, {e2e.train_views} views, batch "
          f"{e2e.batch_size}): {rate:8.1f} training samples/s ({n} samples/epoch)")
    frozen = base.replace(feature_mode="frozen")
    rate, n = measure(frozen, data)
    print(f"cached features (frozen small3d, batch {frozen.batch_size}):          {rate:8.1f} training samples/s "
          f"({n} samples/epoch)")
    if not args.skip_trial:
        trial = TrainingConfig(data_root=args.data, device="cpu", threads=args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            Trainer(trial, data, [], Path(tmp), resume=False).run()
            wall = time.perf_counter() - t0
        print(f"one default 3-phase frozen trial (10/15/15 epochs, features cached): {wall:.1f} s wall")


if __name__ == "__main__":
    main()
