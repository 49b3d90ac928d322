"""Frozen-backbone mode: per-view embeddings computed once and cached on disk, so trials train only the head.

`load_features(cfg, split, cache)` returns a `FeatureSet` for one split. The embeddings are stored in
`<cache_dir>/features/<key>/<split>.npz`, where key hashes everything that determines them: the backbone, its
weights (a local file by the sha1 of its bytes, DEFAULT by the torchvision weights it names), the split's data
fingerprint (action ids, clip files with size and modification time, view order), the frame window, frame size and
resize mode. Labels are not part of the file: they are read from the annotations on every call. Files are written
to a temporary name and renamed (atomic). The `pretrained` profile (config.PROFILES) uses this with a frozen
Kinetics-400 torchvision backbone on CPU: a one-off extraction per data set, then every trial trains heads only
(benchmarks/feature_extraction.py measures the cost).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import oom
from ..config import TrainingConfig
from ..data.annotations import SplitAnnotations
from ..data.dataset import MAX_VIEWS, ClipCache
from ..data.video import ClipWindow
from ..fsutil import atomic_path, atomic_write
from .backbones import (
    BACKBONE_VERSION,
    TORCHVISION_BACKBONES,
    backbone_from_config,
    default_weights,
    normalize_clips,
)

FEATURE_BATCH = 32  # clips per backbone forward pass (small CPU backbones)
TORCHVISION_FEATURE_BATCH = 8  # torchvision video nets: ~same clips/s on CPU, a quarter of the activation memory


@dataclass
class FeatureSet:
    """Per-view embeddings of one split: feats float32 [N, V, D] (V = 4, zeros where view_mask is False)."""

    feats: torch.Tensor
    view_mask: torch.Tensor
    action: torch.Tensor
    severity: torch.Tensor
    action_ids: list[str]
    key: str = ""
    computed: bool = False   # True when this call ran the backbone, False when it read the cache

    def __len__(self) -> int:
        return len(self.action_ids)


def weights_id(weights: str) -> str:
    """'none', 'DEFAULT' or 'sha1:<hash of the file's bytes>'."""
    if weights in ("", "none", "DEFAULT"):
        return weights or "none"
    digest = hashlib.sha1()
    with open(Path(weights).expanduser(), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha1:{digest.hexdigest()}"


def data_fingerprint(split: SplitAnnotations) -> str:
    """Hash of the split's actions and clip files (absolute path, size, mtime) in view order."""
    digest = hashlib.sha1(split.split.encode())
    for action in split.actions:
        digest.update(f"\n{action.action_id}".encode())
        for clip in action.clips:
            path = Path(os.path.abspath(clip.path))
            stat = path.stat()
            digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def feature_key(cfg: TrainingConfig, split: SplitAnnotations) -> tuple[str, dict[str, str]]:
    """(short key, the values it hashes)."""
    window = ClipWindow.from_config(cfg)
    weights = weights_id(cfg.weights)
    if weights == "DEFAULT" and cfg.backbone in TORCHVISION_BACKBONES:   # which weights DEFAULT names today
        weights = f"DEFAULT:{default_weights(cfg.backbone)[0]}"
    parts = {"backbone": cfg.backbone, "backbone_version": BACKBONE_VERSION, "weights": weights,
             "data": data_fingerprint(split), "window": window.key()}
    if feature_precision(cfg) != "fp32":   # fp32 keys stay what they were
        parts["precision"] = feature_precision(cfg)
    key = hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.backbone}-{key}", parts


def feature_path(cache: ClipCache, key: str, split: str) -> Path:
    """<cache_dir>/features/<key>/<split>.npz (the ClipCache lives in <cache_dir>/clips)."""
    return cache.root.parent / "features" / key / f"{split}.npz"


def _device(cfg: TrainingConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def feature_precision(cfg: TrainingConfig) -> str:
    """"bf16" or "fp32": the precision of the backbone's forward pass when extracting features.

    cfg.feature_precision: "fp32", "bf16", or "auto": a torchvision backbone on a CPU with native
    bfloat16 (AVX512-BF16 / AMX, `torch.ops.mkldnn._is_mkldnn_bf16_supported()`) runs under bfloat16 autocast,
    2.3-2.9x faster for r2plus1d_18 / s3d on this machine's AMD EPYC with features within ~1% of fp32
    (benchmarks/README.md); otherwise, and for the small CPU backbones, fp32. Part of the cache key when bf16.
    """
    choice = cfg.feature_precision
    if cfg.backbone not in TORCHVISION_BACKBONES or choice == "fp32":
        return "fp32"
    if choice == "bf16":
        return "bf16"
    return "bf16" if _device(cfg).type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def compute_features(cfg: TrainingConfig, split: SplitAnnotations, cache: ClipCache,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Run the backbone over every view of every action: (feats float32 [N, V, D], view_mask bool [N, V])."""
    window = ClipWindow.from_config(cfg)
    cache.warm(split.actions, window, workers=cfg.num_workers, progress=progress)  # decode misses in parallel
    device = _device(cfg)
    backbone, dim = backbone_from_config(cfg)
    backbone.to(device).eval()
    step = TORCHVISION_FEATURE_BATCH if cfg.backbone in TORCHVISION_BACKBONES else FEATURE_BATCH
    # torchvision video nets: channels-last 3D convolutions (~1.3-1.5x on CPU, same results) and bf16 if chosen
    layout = torch.channels_last_3d if cfg.backbone in TORCHVISION_BACKBONES else torch.contiguous_format
    backbone.to(memory_format=layout)
    bf16 = feature_precision(cfg) == "bf16"
    width = max([MAX_VIEWS, *(len(a.clips) for a in split.actions)])
    feats = np.zeros((len(split.actions), width, dim), np.float32)
    mask = np.zeros((len(split.actions), width), bool)
    jobs = [(i, v, clip, action.action_id) for i, action in enumerate(split.actions)
            for v, clip in enumerate(action.clips)]
    bar = tqdm(total=len(jobs), desc=f"{split.split} features ({cfg.backbone})", unit="clip", disable=not progress)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(jobs), step):
            batch = jobs[start:start + step]
            clips = torch.from_numpy(np.stack([cache.get(clip, window, aid) for _, _, clip, aid in batch]))

            def embed(bs: int, dev: torch.device, clips: torch.Tensor = clips) -> np.ndarray:
                net = backbone.to(dev)       # out of memory: half the batch, then the CPU (oom.degrade)
                return np.concatenate([net(normalize_clips(clips[s:s + bs].to(dev)).contiguous(memory_format=layout))
                                       .float().cpu().numpy() for s in range(0, len(clips), bs)])

            out = oom.degrade(embed, len(batch), device, what=f"{split.split} features")
            for (i, v, _, _), row in zip(batch, out):
                feats[i, v] = row
                mask[i, v] = True
            bar.update(len(batch))
    bar.close()
    return feats, mask


def _save(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:       # the name ends in .npz: np.savez adds nothing
        np.savez(tmp, **arrays)


def _load(path: Path, action_ids: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when missing, unreadable or not for these actions (then recomputed)."""
    try:
        with np.load(path) as data:
            if list(data["action_ids"]) != action_ids:
                return None
            return data["feats"], data["view_mask"]
    except (FileNotFoundError, OSError, KeyError, ValueError):
        return None


def _write_meta(meta: Path, info: dict) -> None:
    if not meta.exists():
        atomic_write(meta, json.dumps(info, indent=1))


def load_features(cfg: TrainingConfig, split: SplitAnnotations, cache: ClipCache,
                  progress: bool = True) -> FeatureSet:
    """Per-view embeddings of `split` with cfg's backbone: read from the feature cache, or computed once and cached."""
    key, parts = feature_key(cfg, split)
    path = feature_path(cache, key, split.split)
    action_ids = [a.action_id for a in split.actions]
    loaded = _load(path, action_ids)
    computed = False
    if loaded is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f"{split.split}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # one process computes; workers started with it wait, then read it
            loaded = _load(path, action_ids)
            if loaded is None:
                computed = True
                loaded = compute_features(cfg, split, cache, progress)
                _save(path, feats=loaded[0], view_mask=loaded[1], action_ids=np.array(action_ids, dtype=str))
                _write_meta(path.parent / "meta.json", {**parts, "frame_size": cfg.frame_size,
                                                        "frame_width": cfg.frame_width, "resize": cfg.resize,
                                                        "num_frames": cfg.num_frames})
    feats, mask = loaded
    targets = split.targets()
    return FeatureSet(torch.from_numpy(np.ascontiguousarray(feats, np.float32)), torch.from_numpy(mask.astype(bool)),
                      torch.from_numpy(targets["action"]), torch.from_numpy(targets["severity"]), action_ids,
                      key=key, computed=computed)
