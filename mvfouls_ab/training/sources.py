"""Where the trainer's batches come from: one interface for cached embeddings and for clips.

    build_sources(cfg, data) -> Sources: train / holdout / valid / test (/ chall), each a FeatureSource or a
                                ClipSource, plus how the features were made (weights, normalisation)

- feature_mode=frozen: per-view embeddings of cfg.backbone with cfg.weights, computed once and cached
  (models/features.py), standardised with the fit part of Train's statistics.
- feature_mode=learned: the representation stage (training/representation.py) trains the backbone on Train
  once; then exactly as frozen, with its weights.
- feature_mode=end_to_end: clips through the backbone in every step (MultiViewDataset over the packed clip cache).

Train is split once, stratified on the joint label (data/folds.py): the fit part is what the heads train on; the
held-out part ("holdout", cfg.rep_holdout of Train) is what the representation stops on and what phase-3 targeted
weights are measured on, so Valid only selects epochs and trials. Every source yields (forward thunk, targets)
per training batch and forward thunks for evaluation: the loop never asks which mode it is in.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ..config import TrainingConfig
from ..data.dataset import ClipCache, DataBundle, MultiViewDataset, default_cache_dir, resolve_frame_size
from ..data.folds import holdout_split
from ..data.video import ClipWindow
from ..errors import MVFoulsError, located
from ..models.backbones import normalize_clips
from ..models.features import load_features

TASKS = ("action", "severity")
FEATURE_NOISE = 0.1        # features: gaussian noise std = FEATURE_NOISE * aug_strength (standardized features)
VIEW_DROP = 0.25           # features: each extra view dropped with prob VIEW_DROP * aug_strength

Forward = Callable[[nn.Module], dict[str, torch.Tensor]]
Batch = tuple[Forward, dict[str, torch.Tensor]]


@dataclass
class Source:
    """One split as the trainer sees it: ids and labels, and how to turn indices into model outputs."""

    name: str
    action_ids: list[str]
    targets: dict[str, np.ndarray]                  # task -> int64 [N], -1 unknown
    annotations_path: Path | None = None
    trains_backbone = False                         # True when a step back-propagates into the backbone

    def __len__(self) -> int:
        return len(self.action_ids)

    def _picked(self, idx: np.ndarray) -> dict[str, Any]:
        return {"name": self.name, "action_ids": [self.action_ids[i] for i in idx],
                "targets": {t: self.targets[t][idx] for t in TASKS}, "annotations_path": None}

    def labels_of(self, idx: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        return {t: torch.from_numpy(self.targets[t][idx]).to(device) for t in TASKS}


@dataclass
class FeatureSource(Source):
    """Cached per-view embeddings held in memory: feats [N, V, D] (standardised), mask [N, V]."""

    feats: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    mask: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def subset(self, idx: np.ndarray) -> FeatureSource:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return FeatureSource(**self._picked(idx), feats=self.feats[t], mask=self.mask[t])

    def concat(self, other: Source, idx: np.ndarray, targets: dict[str, np.ndarray]) -> FeatureSource:
        """self + the `idx` actions of `other` with the given `targets` (pseudo-labels)."""
        assert isinstance(other, FeatureSource)
        t = torch.from_numpy(idx)
        return FeatureSource(f"{self.name}+pseudo", self.action_ids + [other.action_ids[i] for i in idx],
                             {k: np.concatenate([self.targets[k], targets[k]]) for k in TASKS},
                             feats=torch.cat([self.feats, other.feats[t]]), mask=torch.cat([self.mask, other.mask[t]]))

    def train_batches(self, order: np.ndarray, bs: int, aug: float, views: int, gen: torch.Generator,
                      device: torch.device, epoch: int) -> Iterator[Batch]:
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            x, m = augment_features(self.feats[torch.from_numpy(idx)], self.mask[torch.from_numpy(idx)], aug, views, gen)
            x, m = x.to(device), m.to(device)
            yield (lambda model, x=x, m=m: model.forward_features(x, m)), self.labels_of(idx, device)

    def eval_batches(self, bs: int, device: torch.device) -> Iterator[Forward]:
        for s in range(0, len(self), bs):
            x, m = self.feats[s:s + bs].to(device), self.mask[s:s + bs].to(device)
            yield lambda model, x=x, m=m: model.forward_features(x, m)


def augment_features(x: torch.Tensor, m: torch.Tensor, aug: float, views: int,
                     g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`views` random views per action, then view dropout and gaussian noise scaled by aug_strength."""
    r = torch.rand(m.shape, generator=g)
    r[~m] = 2.0
    rank = r.argsort(dim=1).argsort(dim=1)
    keep = m & (rank < views)
    if aug > 0:
        drop = (torch.rand(m.shape, generator=g) < VIEW_DROP * aug) & (rank > 0)  # never the first kept view
        keep = keep & ~drop
        x = x + torch.randn(x.shape, generator=g) * (FEATURE_NOISE * aug)   # features are standardized
    return x, keep


def _set_epoch(ds: Dataset | None, epoch: int) -> None:
    """MultiViewDataset.set_epoch through Subset / ConcatDataset wrappers (it seeds the random views)."""
    if isinstance(ds, ConcatDataset):
        for part in ds.datasets:
            _set_epoch(part, epoch)
    elif isinstance(ds, Subset):
        _set_epoch(ds.dataset, epoch)
    elif ds is not None:
        ds.set_epoch(epoch)


@dataclass
class ClipSource(Source):
    """Clips read through the packed clip cache: train_ds gives `train_views` random views, eval_ds all views."""

    train_ds: Dataset | None = None
    eval_ds: Dataset | None = None
    num_workers: int = 0
    pin_memory: bool = False
    trains_backbone = True

    def subset(self, idx: np.ndarray) -> ClipSource:
        rows = list(map(int, idx))
        return ClipSource(**self._picked(idx), train_ds=None if self.train_ds is None else Subset(self.train_ds, rows),
                          eval_ds=Subset(self.eval_ds or self.train_ds, rows),
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def concat(self, other: Source, idx: np.ndarray, targets: dict[str, np.ndarray]) -> ClipSource:
        assert isinstance(other, ClipSource)
        both = ConcatDataset([self.train_ds, Subset(other.train_ds, idx.tolist())])
        return ClipSource(f"{self.name}+pseudo", self.action_ids + [other.action_ids[i] for i in idx],
                          {k: np.concatenate([self.targets[k], targets[k]]) for k in TASKS}, train_ds=both,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def _loader(self, ds: Dataset, bs: int) -> DataLoader:
        return DataLoader(ds, batch_size=bs, shuffle=False, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_batches(self, order: np.ndarray, bs: int, aug: float, views: int, gen: torch.Generator,
                      device: torch.device, epoch: int) -> Iterator[Batch]:
        assert self.train_ds is not None
        _set_epoch(self.train_ds, epoch)
        for s, batch in zip(range(0, len(order), bs), self._loader(Subset(self.train_ds, order.tolist()), bs)):
            clips = augment_clips(batch["clips"].to(device, non_blocking=True), aug, gen)
            mask = batch["view_mask"].to(device)
            yield (lambda model, c=clips, m=mask: model(c, m)), self.labels_of(order[s:s + bs], device)

    def eval_batches(self, bs: int, device: torch.device) -> Iterator[Forward]:
        for batch in self._loader(self.eval_ds or self.train_ds, max(1, bs)):
            clips, mask = augment_clips(batch["clips"].to(device), 0.0, None), batch["view_mask"].to(device)
            yield lambda model, c=clips, m=mask: model(c, m)


def augment_clips(clips: torch.Tensor, aug: float, g: torch.Generator | None) -> torch.Tensor:
    """uint8 [B,V,C,T,H,W] -> normalized float; with aug > 0: flips, random crops (resized back), brightness."""
    x = normalize_clips(clips)
    if aug <= 0 or g is None:
        return x
    b, v, c, t, h, w = x.shape
    flip = (torch.rand(b, generator=g) < 0.5 * min(aug, 1.0)).to(x.device)
    x = torch.where(flip.view(b, 1, 1, 1, 1, 1), x.flip(-1), x)
    scale = 1.0 - 0.2 * min(aug, 1.0) * float(torch.rand(1, generator=g))
    ch, cw = max(1, int(h * scale)), max(1, int(w * scale))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
    if (ch, cw) != (h, w):
        crop = x[..., top:top + ch, left:left + cw].reshape(b * v * c, t, ch, cw)
        x = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False).reshape(b, v, c, t, h, w)
    shift = (torch.rand(b, generator=g) * 2 - 1).to(x.device) * (0.4 * aug)
    return x + shift.view(b, 1, 1, 1, 1, 1)


@dataclass
class Sources:
    """The splits of a run, and how their inputs were made (what a saved model needs to reproduce them)."""

    splits: dict[str, Source | None]          # train (fit part), holdout, valid, test, chall
    weights: str                              # the backbone weights behind the features ("none", "DEFAULT", a file)
    feature_key: str = ""                     # models.features key of the cached embeddings ("" end to end)
    feature_norm: dict[str, torch.Tensor] | None = None   # {"mean", "std"} of the fit part's view embeddings
    representation: dict[str, Any] = field(default_factory=dict)   # the learned stage: key, history, seconds

    def __getitem__(self, name: str) -> Source | None:
        return self.splits.get(name)


def feature_config(cfg: TrainingConfig, data: DataBundle, progress: bool = True,
                   log_epoch: Callable[[int, dict[str, float]], None] | None = None
                   ) -> tuple[TrainingConfig, dict[str, Any]]:
    """The config whose frozen features a run uses: for feature_mode=learned, the representation stage's backbone
    (trained once, cached) as `weights`; otherwise cfg itself. Also returns the stage's summary ({} if none)."""
    cfg = resolve_frame_size(cfg, data)
    if cfg.feature_mode != "learned":
        return cfg, {}
    from .representation import learn_representation

    rep = learn_representation(cfg, data, progress=progress, log_epoch=log_epoch)
    best = max(rep.history, key=lambda h: h.get("holdout/score", -1.0), default={})
    return cfg.replace(weights=str(rep.weights)), {"key": rep.key, "weights": str(rep.weights),
                                                   "seconds": rep.seconds, "computed": rep.computed,
                                                   "epochs": len(rep.history), "best": best}


def build_sources(cfg: TrainingConfig, data: DataBundle, progress: bool = True,
                  log_epoch: Callable[[int, dict[str, float]], None] | None = None) -> Sources:
    """Every split of `data` as a Source (see the module docstring); Train split into fit and held-out parts."""
    if data.cache is None:
        data.cache = ClipCache(default_cache_dir(cfg))
    cfg = resolve_frame_size(cfg, data)
    splits = {"train": data.train, "valid": data.valid, "test": data.test, "chall": data.chall}
    for name in ("train", "valid", "test"):
        if splits[name] is None or len(splits[name]) == 0:
            raise MVFoulsError(located(getattr(data, "root", "data"), f"the {name} split is empty",
                                       "check the data folder (Train/, Valid/, Test/ with annotations.json)"))
    feat_cfg, rep = feature_config(cfg, data, progress, log_epoch)
    out: dict[str, Source | None] = {}
    keys = []
    for name, split in splits.items():
        if split is None or len(split) == 0:
            out[name] = None
            continue
        base = {"name": name, "action_ids": [a.action_id for a in split.actions], "targets": split.targets(),
                    "annotations_path": split.annotations_path}
        if cfg.feature_mode == "end_to_end":
            window = ClipWindow.from_config(cfg)
            # Decode what is missing once and consolidate the split into one memory-mapped pack.
            data.cache.pack(split.actions, window, workers=int(cfg.num_workers))
            out[name] = ClipSource(**base, train_ds=MultiViewDataset(split, window, data.cache, cfg.train_views,
                                                                     cfg.seed),
                                   eval_ds=MultiViewDataset(split, window, data.cache, None, cfg.seed),
                                   num_workers=cfg.num_workers, pin_memory=cfg.pin_memory)
        else:
            fs = load_features(feat_cfg, split, data.cache, progress=progress)
            keys.append(fs.key)
            out[name] = FeatureSource(**base, feats=torch.as_tensor(np.asarray(fs.feats), dtype=torch.float32),
                                      mask=torch.as_tensor(np.asarray(fs.view_mask), dtype=torch.bool))
    train = out["train"]
    assert train is not None
    fit, held = holdout_split(train.targets["action"], train.targets["severity"], cfg.rep_holdout)
    out["train"], out["holdout"] = train.subset(fit), (train.subset(held) if len(held) else None)
    norm = None
    if isinstance(out["train"], FeatureSource):     # standardize each dimension with the fit part's statistics
        views = out["train"].feats[out["train"].mask]
        norm = {"mean": views.mean(dim=0), "std": views.std(dim=0).clamp_min(1e-6)}
        for src in out.values():
            if isinstance(src, FeatureSource):
                src.feats = ((src.feats - norm["mean"]) / norm["std"]).masked_fill(~src.mask.unsqueeze(-1), 0.0)
    return Sources(out, feat_cfg.weights, keys[0] if keys else "", norm, rep)
