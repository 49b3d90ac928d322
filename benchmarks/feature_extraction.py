"""Feature extraction cost of the frozen-backbone path: clips/s and minutes per 1,000 clips on this machine.

    python benchmarks/feature_extraction.py                      # small3d, r2plus1d_18, s3d; 8 actions x 2 views
    python benchmarks/feature_extraction.py --backbones r2plus1d_18 mvit_v2_s --actions 4 --threads 2

Writes `--actions` actions x 2 views of 398x224 H.264 clips (126 frames, 25 fps, the broadcast-like content of
data_pipeline.py, libx264 preset medium, a silent audio track, as the real 224p release) in the MVFouls layout, and
for each torchvision backbone a local weights file (the state dict of a randomly initialised torchvision network:
the same architecture, so the same cost, as the Kinetics-400 file `weights=DEFAULT` downloads). Then, per backbone,
with the `pretrained` profile's window (frames 63..87, 16 frames, aspect-preserving resize + centre crop to
112x112; 224x224 for mvit_v2_s):

  decode      decode_clip (PyAV decode + crop of the window), one process, clips/s
  forward     the backbone on already-decoded clips in memory (models.features' batch size; one warm-up batch
              first): fp32 as is, fp32 channels-last 3D, and bf16 autocast + channels-last where the CPU has native
              bfloat16 (what models.features uses for torchvision backbones, `feature_precision`)
  end to end  models.features.load_features on a cold cache: build the backbone from the weights file (sha1 of the
              file included), decode the clips (ClipCache.warm, `--workers` processes), run the backbone, write the
              feature cache: what `--profile pretrained` pays once per data set

Each line gives wall-clock clips/s, CPU seconds per clip (all threads; the steadier figure on a shared machine) and
minutes per 1,000 clips: measured (wall) and estimated for idle cores (CPU time / min(threads, cores)). The real
224p release has ~8,900 clips in its four splits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import broadcast_like

from mvfouls_ab.config import PROFILES, TrainingConfig
from mvfouls_ab.data.annotations import load_split
from mvfouls_ab.data.dataset import ClipCache
from mvfouls_ab.data.video import ClipWindow, decode_clip, write_clip
from mvfouls_ab.models.backbones import TORCHVISION_BACKBONES, build_backbone, normalize_clips
from mvfouls_ab.models.features import (
    FEATURE_BATCH,
    TORCHVISION_FEATURE_BATCH,
    feature_precision,
    load_features,
)

REAL_CLIPS = 8_900  # clips of the real release, all splits


def write_dataset(root: Path, actions: int, seed: int = 0) -> Path:
    """Train/ of an MVFouls-layout data set: `actions` kept actions x 2 views of 398x224 clips."""
    rng = np.random.default_rng(seed)
    doc = {"Set": "train", "Number of actions": actions, "Actions": {}}
    for i in range(actions):
        clips = []
        for k in range(2):
            write_clip(root / "Train" / f"action_{i}" / f"clip_{k}.mp4", broadcast_like(126, 224, 398, rng),
                       preset="medium", audio=True)
            clips.append({"Url": f"Dataset/Train/action_{i}/clip_{k}", "Camera type": "Main camera center",
                          "Timestamp": i, "Replay speed": 1.0})
        doc["Actions"][str(i)] = {"UrlLocal": f"Dataset/Train/action_{i}", "Offence": "Offence",
                                  "Contact": "With contact", "Bodypart": "Under body", "Upper body part": "",
                                  "Action class": "Tackling", "Severity": "1.0", "Multiple fouls": "",
                                  "Try to play": "", "Touch ball": "", "Handball": "No handball",
                                  "Handball offence": "", "Clips": clips}
    (root / "Train" / "annotations.json").write_text(json.dumps(doc))
    return root


def weights_file(name: str, folder: Path) -> str:
    """A local weights file for `name` ('none' for small3d, whose random init is its frozen product weights)."""
    if name not in TORCHVISION_BACKBONES:
        return "none"
    from torchvision.models import video as tv_video

    path = folder / f"{name}.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(getattr(tv_video, TORCHVISION_BACKBONES[name][0])(weights=None).state_dict(), path)
    return str(path)


def config(name: str, weights: str, cache_dir: Path, workers: int, threads: int) -> TrainingConfig:
    cfg = TrainingConfig().replace(**PROFILES["pretrained"]).replace(
        backbone=name, weights=weights, cache_dir=str(cache_dir), num_workers=workers, threads=threads)
    return cfg.replace(frame_size=224) if name == "mvit_v2_s" else cfg


def line(label: str, clips: int, wall: float, cpu: float, threads: int) -> dict[str, float]:
    cores = min(threads, os.cpu_count() or 1)
    rate, cpu_per = clips / wall, cpu / clips
    minutes, idle = 1000 / rate / 60, 1000 * cpu_per / cores / 60
    print(f"  {label:<17} {rate:8.2f} clips/s | {cpu_per:7.3f} CPU s/clip | per 1,000 clips {minutes:6.1f} min "
          f"measured, {idle:6.1f} min on {cores} idle core(s)")
    return {"clips_s": rate, "cpu_s_per_clip": cpu_per, "min_per_1000": minutes, "min_per_1000_idle": idle}


def cpu_time() -> float:
    """CPU seconds of this process and of its finished children (the decoding processes), all threads."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), cpu_time()
    out = fn()
    return out, time.perf_counter() - wall, cpu_time() - cpu


def measure(name: str, root: Path, work: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    split = load_split(root, "Train")
    paths = [c.path for a in split.actions for c in a.clips]
    weights = weights_file(name, work)
    cfg = config(name, weights, work / f"cache_{name}", args.workers, args.threads)
    window = ClipWindow.from_config(cfg)
    print(f"\n{name} (weights {Path(weights).name if weights != 'none' else 'none: seeded random, frozen'}), "
          f"{len(paths)} clips 398x224 -> {window.num_frames} x {window.height}x{window.out_width} ({window.resize})")
    result = {}
    decoded, wall, cpu = timed(lambda: [decode_clip(p, window) for p in paths])
    result["decode"] = line("decode", len(paths), wall, cpu, 1)
    (backbone, _), wall, _ = timed(lambda: build_backbone(name, weights, cfg.num_frames, cfg.frame_size,
                                                          cfg.frame_width))
    print(f"  {'load':<17} {wall:8.2f} s to build the backbone from its weights file")
    backbone.eval()
    step = TORCHVISION_FEATURE_BATCH if name in TORCHVISION_BACKBONES else FEATURE_BATCH
    clips = torch.from_numpy(np.stack(decoded))
    precision = feature_precision(cfg)
    variants = [("forward", torch.contiguous_format, False)]
    if name in TORCHVISION_BACKBONES:   # what compute_features does: channels-last 3D, bf16 autocast if chosen
        variants = [("fp32 plain", torch.contiguous_format, False), ("fp32 cl3d", torch.channels_last_3d, False)]
        if precision == "bf16":
            variants.append(("bf16 cl3d", torch.channels_last_3d, True))
    for label, layout, bf16 in variants:
        backbone.to(memory_format=layout)

        def forward(x: torch.Tensor, layout=layout) -> torch.Tensor:
            return backbone(normalize_clips(x).contiguous(memory_format=layout))

        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            forward(clips[:min(step, 2)])   # warm-up
            _, wall, cpu = timed(lambda: [forward(clips[i:i + step]) for i in range(0, len(clips), step)])
        result[label] = line(label, len(paths), wall, cpu, args.threads)
    fs, wall, cpu = timed(lambda: load_features(cfg, split, ClipCache(cfg.cache_dir), progress=False))
    assert fs.computed
    result["end_to_end"] = line(f"end to end ({precision})", len(paths), wall, cpu, args.threads)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["small3d", "r2plus1d_18", "s3d"],
                        choices=["small3d", *TORCHVISION_BACKBONES])
    parser.add_argument("--actions", type=int, default=8, help="actions of 2 views each (clips = 2 x actions)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--workers", type=int, default=PROFILES["pretrained"].get("num_workers", 0),
                        help="decoding processes of the end-to-end path (the pretrained profile's num_workers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} core(s), load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="mvfouls_bench_features_") as tmp:
        work = Path(tmp)
        (root := work / "data").mkdir()
        _, wall, _ = timed(lambda: write_dataset(root, args.actions))
        print(f"wrote {2 * args.actions} clips (398x224, 126 frames, H.264 preset medium) in {wall:.1f} s")
        results = {name: measure(name, root, work, args) for name in args.backbones}
    print(f"\none-off cost of the real release (~{REAL_CLIPS:,} clips), end to end:")
    for name, r in results.items():
        e2e = r["end_to_end"]
        print(f"  {name:<12} {e2e['min_per_1000'] * REAL_CLIPS / 1000:7.1f} min measured, "
              f"{e2e['min_per_1000_idle'] * REAL_CLIPS / 1000:7.1f} min on idle cores")
    print(f"load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
