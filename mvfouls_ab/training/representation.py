"""The representation stage: train the per-view backbone on the data once, then every run reuses its embeddings.

Decoupling representation and classifier (Kang et al., ICLR 2020): stage 1 learns the backbone end to end with a
plain linear head per task on the max over views; stage 2 (the three-phase trainer, every study trial and A/B
cell) trains the variants' heads, rebalancing and curriculum on the frozen, cached embeddings of that backbone.

    learn_representation(cfg, data) -> Representation (the backbone's weights file, its history)

- Data: Train minus its stratified held-out part (`data.folds.holdout_split`, share cfg.rep_holdout); the epoch
  kept is the one with the best mean balanced accuracy of both tasks on the held-out part. Valid and Test are
  never seen.
- Steps: `rep_batch_size` actions, every view of each at the clip window's middle frame (the event), a brightness
  jitter; the view embeddings of an action are max-pooled; loss = CE(action) + CE(severity). AdamW at `rep_lr`,
  cosine to 0 over the stage, no warm-up.
- Recipe (`rep_recipe`): plain (instance-balanced, the decoupling paper's choice), sqrt or balanced
  (class-balanced sampling, `rebalance.sample_weights`), inverse_weights (today's 1/frequency class weights).
- Cached once per (Train's data fingerprint, held-out actions, clip window, backbone and width, recipe, epochs,
  learning rate, batch, seed) in `<cache_dir>/representations/<key>/`: `backbone.pt` (a state dict, the
  `weights` of the feature extractor), `meta.json` (what the key hashes, per-epoch history, seconds). A
  `stage.pt` checkpoint after every epoch lets an interrupted stage resume. One process trains; the others wait
  on a file lock and read the result. The features of that backbone are then cached by `models.features`
  like any other (their key holds the weights file's sha1).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from tqdm import tqdm

from .. import labels, shutdown
from ..config import TrainingConfig
from ..data.dataset import DataBundle
from ..data.folds import holdout_split
from ..data.video import ClipWindow
from ..errors import MVFoulsError
from ..fsutil import atomic_write
from ..models.backbones import backbone_from_config, normalize_clips
from ..models.features import data_fingerprint
from . import checkpoint as ckpt
from .rebalance import sample_weights

REP_VERSION = "3"       # bump when the stage's training procedure changes (part of the cache key)
TASKS = ("action", "severity")
BRIGHTNESS = 0.2        # brightness jitter: x * U(1 - b, 1 + b)
EVAL_BATCH = 64         # views per forward pass when embedding

EpochLogger = Callable[[int, dict[str, float]], None]


@dataclass
class Representation:
    weights: Path                      # the backbone's state dict: use as TrainingConfig.weights
    key: str
    parts: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    computed: bool = False             # True when this call trained it, False when it came from the cache


def stage_seed(cfg: TrainingConfig) -> int:
    return cfg.seed if cfg.rep_seed < 0 else cfg.rep_seed


def representation_key(cfg: TrainingConfig, data: DataBundle) -> tuple[str, dict[str, Any]]:
    """(key, the values it hashes): what determines the learned backbone."""
    _fit, holdout = split_train(cfg, data)
    held_ids = [data.train.actions[i].action_id for i in holdout]
    parts = {"data": data_fingerprint(data.train), "holdout": hashlib.sha1(",".join(held_ids).encode()).hexdigest(),
             "window": ClipWindow.from_config(cfg).key(), "backbone": cfg.backbone, "width": cfg.rep_width,
             "recipe": cfg.rep_recipe, "epochs": cfg.rep_epochs, "lr": cfg.rep_lr, "batch": cfg.rep_batch_size,
             "weight_decay": cfg.rep_weight_decay, "seed": stage_seed(cfg),
             "version": REP_VERSION}
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.backbone}-{cfg.rep_recipe}-{digest}", parts


def split_train(cfg: TrainingConfig, data: DataBundle) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices into data.train.actions (labelled only), the same for every run on the data."""
    y = data.train.targets()
    return holdout_split(y["action"], y["severity"], cfg.rep_holdout)


def representation_dir(data: DataBundle, key: str) -> Path:
    assert data.cache is not None
    return data.cache.root.parent / "representations" / key


class _Views:
    """The cached clip windows of a split's views as memory-mapped arrays: rows[action][view] = uint8 [C,T,H,W]."""

    def __init__(self, data: DataBundle, split: Any, window: ClipWindow, progress: bool) -> None:
        assert data.cache is not None
        data.cache.pack(split.actions, window, workers=max(1, os.cpu_count() or 1), progress=progress)
        self.rows = [[data.cache.get(c, window, a.action_id) for c in a.clips] for a in split.actions]


class _Heads(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.out = nn.ModuleDict({t: nn.Linear(dim, labels.NUM_CLASSES[t]) for t in TASKS})

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.drop(pooled)
        return {t: head(x) for t, head in self.out.items()}


def _augment(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [M, C, H, W] -> float32 in [0, 1] with a brightness jitter per frame. No shifts or crops: the
    spatial max of frame2d does not care where a pattern is, and a shift's filled border only added edges the
    network learned instead of the foul (README.md, "Results")."""
    gain = rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS, size=(len(frames), 1, 1, 1)) / 255.0
    return (frames * gain).astype(np.float32)


def _normalize_frames(x: torch.Tensor) -> torch.Tensor:
    """float [M, C, H, W] in [0, 1] -> Kinetics-normalized, via normalize_clips on a T=1 clip."""
    return normalize_clips(x.unsqueeze(2)).squeeze(2)


@torch.no_grad()
def embed_views(backbone: nn.Module, rows: list[list[np.ndarray]], indices: np.ndarray) -> list[torch.Tensor]:
    """Per-view embeddings (all frames, max over time) of the given actions: a list of [V_i, D] tensors."""
    backbone.eval()
    flat = [(k, v) for k, i in enumerate(indices) for v in range(len(rows[i]))]
    out: list[list[torch.Tensor]] = [[] for _ in indices]
    for s in range(0, len(flat), EVAL_BATCH):
        batch = flat[s:s + EVAL_BATCH]
        clips = torch.from_numpy(np.stack([rows[indices[k]][v] for k, v in batch]))
        emb = backbone(normalize_clips(clips))
        for (k, _), e in zip(batch, emb):
            out[k].append(e)
    return [torch.stack(e) for e in out]


@torch.no_grad()
def _evaluate(backbone: nn.Module, heads: _Heads, rows: list[list[np.ndarray]], indices: np.ndarray,
              y: dict[str, np.ndarray]) -> dict[str, float]:
    heads.eval()
    pooled = torch.stack([e.amax(dim=0) for e in embed_views(backbone, rows, indices)])
    out = heads(pooled)
    metrics: dict[str, float] = {}
    for t in TASKS:
        target = torch.from_numpy(y[t][indices])
        metrics[f"holdout/{t}/loss"] = float(F.cross_entropy(out[t], target))
        pred = out[t].argmax(1).numpy()
        metrics[f"holdout/{t}/macro_recall"] = float(balanced_accuracy_score(target.numpy(), pred))
        for c, slug in enumerate(labels.CLASS_SLUGS[t]):
            present = target.numpy() == c
            if present.any():
                metrics[f"holdout/{t}/recall/{slug}"] = float((pred[present] == c).mean())
    metrics["holdout/score"] = 0.5 * (metrics["holdout/action/macro_recall"] + metrics["holdout/severity/macro_recall"])
    return metrics


def _order(cfg: TrainingConfig, fit: np.ndarray, y: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    kind = {"plain": "none", "inverse_weights": "none"}.get(cfg.rep_recipe, cfg.rep_recipe)
    w = sample_weights(y["action"][fit], y["severity"][fit], kind)
    if np.allclose(w, w[0]):
        return rng.permutation(fit)
    return rng.choice(fit, size=len(fit), replace=True, p=w / w.sum())


def _loss_weights(cfg: TrainingConfig, fit: np.ndarray, y: dict[str, np.ndarray]) -> dict[str, torch.Tensor | None]:
    if cfg.rep_recipe != "inverse_weights":
        return {t: None for t in TASKS}
    out: dict[str, torch.Tensor | None] = {}
    for t in TASKS:
        counts = np.bincount(y[t][fit], minlength=labels.NUM_CLASSES[t]).astype(np.float64)
        inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
        out[t] = torch.tensor(inv / inv[counts > 0].mean(), dtype=torch.float32)
    return out


def _train(cfg: TrainingConfig, data: DataBundle, folder: Path, progress: bool,
           log_epoch: EpochLogger | None) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train the stage (resuming `stage.pt` when present); returns (best backbone state dict, history)."""
    window = ClipWindow.from_config(cfg)
    views = _Views(data, data.train, window, progress)
    y = data.train.targets()
    fit, holdout = split_train(cfg, data)
    evaluate_on = holdout if len(holdout) else fit
    seed = stage_seed(cfg)
    backbone, dim = backbone_from_config(cfg, weights="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in backbone.modules():           # the stage's own init, drawn from its seed
            if isinstance(module, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        heads = _Heads(dim)                         # PyTorch's default init: small logits, a loss near chance
    params = list(backbone.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.rep_lr, weight_decay=cfg.rep_weight_decay)
    steps_per_epoch = math.ceil(len(fit) / cfg.rep_batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.rep_epochs * steps_per_epoch)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"score": -1.0, "state": None}
    start = 0
    stage = folder / "stage.pt"
    if stage.is_file():
        try:
            state = ckpt.load(stage)
            backbone.load_state_dict(state["backbone"])
            heads.load_state_dict(state["heads"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            rng.bit_generator.state = json.loads(state["np_rng"])
            gen.set_state(state["torch_rng"])
            history, best, start = json.loads(state["history"]), {"score": state["best_score"],
                                                                  "state": state["best_state"]}, state["epoch"]
        except (MVFoulsError, RuntimeError, KeyError, ValueError) as exc:   # damaged, or another code version's
            warnings.warn(f"{stage}: cannot resume the stage ({type(exc).__name__}); it starts over", stacklevel=2)
            stage.unlink(missing_ok=True)
            return _train(cfg, data, folder, progress, log_epoch)
    loss_weights = _loss_weights(cfg, fit, y)
    t_frames = window.num_frames
    bar = tqdm(total=cfg.rep_epochs * steps_per_epoch, initial=start * steps_per_epoch, unit="step",
               desc=f"representation ({cfg.backbone}, {cfg.rep_recipe})", disable=not progress)
    for epoch in range(start, cfg.rep_epochs):
        t0 = time.perf_counter()
        torch.manual_seed(seed * 10_000 + epoch)    # dropout: the same draws whether or not the stage resumed
        backbone.train()
        heads.train()
        order = _order(cfg, fit, y, rng)
        total, seen = 0.0, 0
        for s in range(0, len(order), cfg.rep_batch_size):
            batch = order[s:s + cfg.rep_batch_size]
            frames, owner = [], []
            for k, i in enumerate(batch):       # every view, at the window's middle frame (the event)
                for view in views.rows[i]:
                    frames.append(view[:, t_frames // 2])
                    owner.append(k)
            x = _normalize_frames(torch.from_numpy(_augment(np.stack(frames), rng)))
            emb = backbone.frames(x) if hasattr(backbone, "frames") else backbone(x.unsqueeze(2))
            owner_t = torch.tensor(owner)
            pooled = torch.stack([emb[owner_t == k].amax(dim=0) for k in range(len(batch))])
            out = heads(pooled)
            loss = sum(F.cross_entropy(out[t], torch.from_numpy(y[t][batch]), weight=loss_weights[t]) for t in TASKS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
            bar.update(1)
        train_s = time.perf_counter() - t0
        metrics = {"train/loss": total / max(seen, 1), "lr": float(scheduler.get_last_lr()[0]),
                   **_evaluate(backbone, heads, views.rows, evaluate_on, y),
                   "system/epoch_time_s": time.perf_counter() - t0, "system/samples_per_s": seen / max(train_s, 1e-9)}
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", holdout=f"{metrics['holdout/score']:.3f}")
        if metrics["holdout/score"] > best["score"]:
            best = {"score": metrics["holdout/score"], "state": ckpt.cpu_state_dict(backbone)}
        ckpt.save_atomic({"backbone": backbone.state_dict(), "heads": heads.state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "np_rng": json.dumps(rng.bit_generator.state), "torch_rng": gen.get_state(),
                          "history": json.dumps(history), "best_score": best["score"], "best_state": best["state"],
                          "epoch": epoch + 1}, stage)
        if log_epoch is not None:
            log_epoch(epoch, metrics)
        if shutdown.requested():    # SIGTERM/SIGINT: stop at this epoch; the next run resumes from stage.pt
            raise shutdown.GracefulStop(f"representation stage stopped after epoch {epoch + 1} ({stage})")
    bar.close()
    return best["state"], history


def learn_representation(cfg: TrainingConfig, data: DataBundle, progress: bool = True,
                         log_epoch: EpochLogger | None = None) -> Representation:
    """The learned backbone of cfg on data.train: read from the cache, or trained once (file-locked) and cached."""
    key, parts = representation_key(cfg, data)
    folder = representation_dir(data, key)
    weights, meta = folder / "backbone.pt", folder / "meta.json"
    folder.mkdir(parents=True, exist_ok=True)
    computed, started = False, time.perf_counter()
    with open(folder / "stage.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # one process trains; others started with it wait, then read it
        if not (weights.is_file() and meta.is_file()):
            computed = True
            with torch.random.fork_rng(devices=[]):     # the caller's global RNG is left as it was
                state, history = _train(cfg, data, folder, progress, log_epoch)
            ckpt.save_atomic(state, weights)
            info = {**parts, "key": key, "history": history, "seconds": round(time.perf_counter() - started, 1),
                    "fit_actions": len(split_train(cfg, data)[0])}
            atomic_write(meta, json.dumps(info, indent=1))
            (folder / "stage.pt").unlink(missing_ok=True)
    info = json.loads(meta.read_text())
    return Representation(weights, key, parts, info.get("history", []), float(info.get("seconds", 0.0)), computed)


def learned_representation(cfg: TrainingConfig, data: DataBundle) -> Representation:
    """The cached stage of cfg on data (MVFoulsError when it has not been learned yet)."""
    key, parts = representation_key(cfg, data)
    meta = representation_dir(data, key) / "meta.json"
    if not meta.is_file():
        from ..errors import MVFoulsError, located

        raise MVFoulsError(located(meta, "the representation has not been learned yet",
                                   "run learn_representation (any train or study run on this data does)"))
    info = json.loads(meta.read_text())
    return Representation(meta.parent / "backbone.pt", key, parts, info.get("history", []),
                          float(info.get("seconds", 0.0)), False)


def log_representation_run(rep: Representation, tracking_uri: str, experiment: str,
                           parent_run_id: str | None = None) -> str:
    """Log a finished stage to MLflow as its own run (params, per-epoch holdout metrics, time); returns its id.

    Logged once, by the process that trained it (rep.computed), after the stage: runs that read the stage from
    the cache point at it through the `representation_key` tag of their own runs."""
    from mlflow.entities import Metric, Param, RunTag

    from ..tracking import context_tags, get_or_create_experiment, make_client

    client = make_client(tracking_uri)
    tags = {**context_tags(), "role": "representation", "representation_key": rep.key}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(get_or_create_experiment(client, experiment), run_name=f"representation {rep.key}",
                            tags=tags)
    run_id = run.info.run_id
    params = [Param(f"rep/{k}", str(v)[:500]) for k, v in rep.parts.items()]
    stamp = int(time.time() * 1000)
    metrics = [Metric(k, float(v), stamp, step) for step, epoch in enumerate(rep.history) for k, v in epoch.items()]
    metrics.append(Metric("system/stage_s", rep.seconds, stamp, 0))
    for i in range(0, max(len(metrics), 1), 900):
        client.log_batch(run_id, metrics=metrics[i:i + 900], params=params if i == 0 else [],
                         tags=[RunTag("representation_epochs", str(len(rep.history)))] if i == 0 else [])
    client.set_terminated(run_id)
    return run_id
