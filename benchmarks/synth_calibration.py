"""Calibration of the synthetic MVFouls generator on the product's CPU pipeline (issue 2, item 7).

Pipeline: the default synthetic data set -> clips decoded with the baseline window (frames 63..87 at 17 fps = 16
frames, resized to cfg.frame_size=112) -> the frozen, seeded, randomly initialised `small3d` backbone gives
per-view embeddings (models/features.py, cached) -> a small head (the `simplified` variant's head) is trained on
Train and scored on Test. For each task:

  (a) plain cross-entropy on the imbalanced Train: the two rarest classes must stay below 10% recall;
  (b) the same head trained on a class-balanced sample of Train of the same size (drawn with replacement, equal
      numbers per class of that task) must reach >= 70% macro recall.

Each head is trained on one task's loss (plain CE, no class weights) with early stopping: up to `--epochs` epochs,
keeping the epoch with the lowest Valid loss (for (b) the class-balanced Valid loss, its own objective). Same
epochs/steps/seed for (a) and (b).

The default data set's Valid and Test hold only 5 Dives, 5 Pushes and 5 Red cards each (one action = 20 points of a
rare class's recall). `--source memory --eval-seeds 0 1 2 3` scores on the Valid and Test splits of four generator
seeds pooled (20 of each rare class), same generator and pipeline, Train as the default.

    python benchmarks/synth_calibration.py                      # default data set (generated on first use)
    python benchmarks/synth_calibration.py --source memory      # render in memory, no files (generator tuning)
    python benchmarks/synth_calibration.py --source memory --eval-seeds 0 1 2 3 --seeds 0 1 2   # README figures
    python benchmarks/synth_calibration.py --data DIR --seeds 0 1 2

Prints per-class Test recall for every head and whether (a) and (b) hold; exit status 1 when they do not.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import recall_score

from mvfouls_ab import labels
from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.data import synthetic
from mvfouls_ab.data.video import ClipWindow
from mvfouls_ab.models.backbones import build_backbone, normalize_clips
from mvfouls_ab.models.variants import build_model

MAX_VIEWS = 4


# ---- features ------------------------------------------------------------------------------------------------
def _render_window(spec: synthetic.ActionSpec, indices: tuple[int, ...]) -> np.ndarray:
    """uint8 [V, T, H, W, 3] of the window frames of every view of an action (no file written)."""
    return np.stack(synthetic.render_action(spec, indices))


def memory_features(cfg: TrainingConfig, scale: float, seed: int, split: str,
                    workers: int = 2) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Render a split in memory and embed it: (feats [N,4,D], mask [N,4], targets) for kept actions only."""
    window = ClipWindow.from_config(cfg)
    specs = [s for s in synthetic.plan_split(split, scale, seed) if labels.official_label(s.raw)]
    backbone, dim = build_backbone(cfg.backbone, cfg.weights)
    backbone.eval()
    feats = np.zeros((len(specs), MAX_VIEWS, dim), np.float32)
    mask = np.zeros((len(specs), MAX_VIEWS), bool)
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool, torch.no_grad():
        views = pool.map(_render_window, specs, [window.indices] * len(specs), chunksize=16)
        for i, video in enumerate(views):
            clips = torch.from_numpy(video).permute(0, 4, 1, 2, 3)              # [V, C, T, H, W]
            v, c, t, h, w = clips.shape
            flat = clips.permute(0, 2, 1, 3, 4).reshape(v * t, c, h, w).float()
            flat = F.interpolate(flat, size=(window.size, window.size), mode="bilinear", align_corners=False)
            clips = flat.reshape(v, t, c, window.size, window.size).permute(0, 2, 1, 3, 4)
            feats[i, :v] = backbone(normalize_clips(clips.round().clamp(0, 255) / 255.0)).numpy()
            mask[i, :v] = True
    lab = [labels.official_label(s.raw) for s in specs]
    targets = {"action": np.array([x.action for x in lab]), "severity": np.array([x.severity for x in lab])}
    return feats, mask, targets


def cached_memory_features(cfg: TrainingConfig, scale: float, seed: int, split: str,
                           prefix: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """memory_features, kept in <prefix>_<split>_s<seed>.npz when a prefix is given (generator tuning loops)."""
    cached = Path(f"{prefix}_{split}_s{seed}.npz") if prefix else None
    if cached is not None and cached.is_file():
        z = np.load(cached)
        return z["feats"], z["mask"], {"action": z["action"], "severity": z["severity"]}
    feats, mask, targets = memory_features(cfg, scale, seed, split)
    if cached is not None:
        np.savez(cached, feats=feats, mask=mask, **targets)
    return feats, mask, targets


def file_features(cfg: TrainingConfig, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The product's path: annotations -> clip cache -> frozen backbone feature cache."""
    from mvfouls_ab.data.dataset import load_data
    from mvfouls_ab.models.features import load_features

    bundle = load_data(cfg)
    fs = load_features(cfg, bundle.splits()[split], bundle.cache)
    return (np.asarray(fs.feats), np.asarray(fs.view_mask),
            {"action": np.asarray(fs.action), "severity": np.asarray(fs.severity)})


def standardize(data: dict[str, tuple]) -> None:
    """Each embedding dimension scaled with Train's statistics over real views, as the trainer does."""
    f, m, _ = data["Train"]
    views = f[m]
    mean, std = views.mean(axis=0), np.maximum(views.std(axis=0, ddof=1), 1e-6)
    for split, (feats, mask, y) in data.items():
        data[split] = (np.where(mask[..., None], (feats - mean) / std, 0.0).astype(np.float32), mask, y)


# ---- heads ---------------------------------------------------------------------------------------------------
def valid_loss(model: torch.nn.Module, feats: np.ndarray, mask: np.ndarray, target: np.ndarray, task: str,
               balanced: bool) -> float:
    """Cross-entropy on Valid; balanced: every class weighted to count the same (the objective of head (b))."""
    classes = len(labels.TASKS[task])
    weight = None
    if balanced:
        counts = np.maximum(np.bincount(target, minlength=classes), 1)
        weight = torch.from_numpy((len(target) / (classes * counts)).astype(np.float32))
    with torch.no_grad():
        logits = model.forward_features(torch.from_numpy(feats), torch.from_numpy(mask))[task]
        return float(F.cross_entropy(logits, torch.from_numpy(target), weight=weight))


def train_head(cfg: TrainingConfig, train: tuple, valid: tuple, task: str, index: np.ndarray, seed: int,
               epochs: int, lr: float, batch: int, balanced: bool) -> tuple[torch.nn.Module, int]:
    """Train the variant's head with plain cross-entropy on the Train samples `index` (repeats allowed) and keep
    the epoch with the lowest Valid loss (early stopping, as anyone training the model would). Returns
    (model at that epoch, the epoch)."""
    (feats, mask, targets), (vfeats, vmask, vtargets) = train, valid
    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    x, m, y = torch.from_numpy(feats), torch.from_numpy(mask), torch.from_numpy(targets[task])
    gen = torch.Generator().manual_seed(seed)
    best, best_epoch, best_state = float("inf"), 0, None
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.from_numpy(index)[torch.randperm(len(index), generator=gen)]
        for start in range(0, len(order), batch):
            b = order[start:start + batch]
            loss = F.cross_entropy(model.forward_features(x[b], m[b])[task], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        loss = valid_loss(model, vfeats, vmask, vtargets[task], task, balanced)
        if loss < best:
            best, best_epoch = loss, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return model, best_epoch


def predict(model: torch.nn.Module, feats: np.ndarray, mask: np.ndarray, task: str) -> np.ndarray:
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(feats), torch.from_numpy(mask))[task].argmax(1).numpy()


def balanced_sample(target: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` indices drawn with replacement, the same number from every class present."""
    classes = np.unique(target)
    per = np.array_split(np.arange(size), len(classes))
    return np.concatenate([rng.choice(np.flatnonzero(target == c), len(p)) for c, p in zip(classes, per)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("files", "memory"), default="files")
    p.add_argument("--data", default="", help="data root (default: the cached default synthetic data set)")
    p.add_argument("--scale", type=float, default=synthetic.DEFAULT_SCALE, help="memory source: scale")
    p.add_argument("--data-seed", type=int, default=synthetic.DEFAULT_SEED, help="memory source: generator seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="head training seeds")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variant", default="simplified")
    p.add_argument("--frame-size", type=int, default=112)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-cache", default="", help="memory source: keep features in this .npz prefix")
    p.add_argument("--eval-seeds", type=int, nargs="*", default=[],
                   help="memory source: Valid and Test of these generator seeds pooled (larger than the default "
                        "ones, which hold only 5 Dives, 5 Pushes and 5 Red cards)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainingConfig(data_root=args.data, variant=args.variant, frame_size=args.frame_size, backbone="small3d",
                         weights="none", feature_mode="frozen", device="cpu")
    started = time.perf_counter()
    data = {}
    if args.eval_seeds and args.source != "memory":
        p.error("--eval-seeds needs --source memory")
    for split in ("Train", "Valid", "Test"):
        if args.source == "memory":
            seeds = args.eval_seeds if split != "Train" and args.eval_seeds else [args.data_seed]
            parts = [cached_memory_features(cfg, args.scale, seed, split, args.memory_cache) for seed in seeds]
            data[split] = (np.concatenate([f for f, _, _ in parts]), np.concatenate([m for _, m, _ in parts]),
                           {task: np.concatenate([y[task] for _, _, y in parts]) for task in labels.TASKS})
        else:
            data[split] = file_features(cfg, split)
    standardize(data)
    print(f"features: Train {len(data['Train'][0])} / Valid {len(data['Valid'][0])} / Test {len(data['Test'][0])} "
          f"kept actions "
          f"({time.perf_counter() - started:.0f} s, source={args.source})")
    ok = True
    for task, names in labels.TASKS.items():
        ytr, (fte, mte, yte) = data["Train"][2], data["Test"]
        counts = np.bincount(ytr[task], minlength=len(names))
        rarest = [int(c) for c in np.argsort(counts, kind="stable")[:2]]
        print(f"\n{task}: Train counts {counts.tolist()}, Test counts "
              f"{np.bincount(yte[task], minlength=len(names)).tolist()}; rarest: "
              f"{', '.join(names[c] for c in rarest)}")
        print(f"  {'head':<24}" + "".join(f"{labels.CLASS_SLUGS[task][c][:10]:>11}" for c in range(len(names)))
              + f"{'macro':>8}")
        macros: dict[str, list[float]] = {"a": [], "b": []}
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            for kind, index in (("(a) plain CE, imbalanced", np.arange(len(ytr[task]))),
                                ("(b) plain CE, balanced", balanced_sample(ytr[task], len(ytr[task]), rng))):
                model, epoch = train_head(cfg, data["Train"], data["Valid"], task, index, seed, args.epochs,
                                          args.lr, args.batch, balanced=kind.startswith("(b)"))
                pred = predict(model, fte, mte, task)
                rec = recall_score(yte[task], pred, labels=range(len(names)), average=None, zero_division=0)
                macro = float(rec.mean())
                macros[kind[1]].append(macro)
                print(f"  {kind:<24}" + "".join(f"{r:>11.2f}" for r in rec) + f"{macro:>8.3f}  seed {seed}, epoch {epoch}")
                if kind.startswith("(a)"):
                    holds = all(rec[c] < 0.10 for c in rarest)
                    ok &= holds
                    print(f"    (a) rarest below 10% recall: {holds}")
                else:
                    ok &= macro >= 0.70
                    print(f"    (b) macro recall >= 70%: {macro >= 0.70}")
        print(f"  mean over {len(args.seeds)} seed(s): (a) macro {np.mean(macros['a']):.3f}, "
              f"(b) macro {np.mean(macros['b']):.3f}")
    print(f"\ncalibration {'holds' if ok else 'FAILS'} ({time.perf_counter() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
