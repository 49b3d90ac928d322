"""Calibration of the synthetic MVFouls generator on the product's default CPU pipeline (issue 11, item 3).

Pipeline (the defaults, `python -m mvfouls_ab.train` without flags): the synthetic data set -> clips decoded
around the event (3 frames, 112x200, aspect kept) -> the representation stage trains the frame2d backbone on the
fit part of Train (training/representation.py) -> its per-view embeddings (cached, standardised with the fit
part's statistics) -> a small head (the `simplified` variant's head) trained on one task, early-stopped on the
held-out part of Train, scored on Test. Three pipelines per task:

  (a) plain: the stage with rep_recipe=plain and the head with plain cross-entropy on the imbalanced fit part:
      the two rarest classes must stay below 10% recall on Test (the MVFouls collapse);
  (b) balanced: the stage with rep_recipe=balanced and the head trained on a class-balanced sample of the fit
      part of the same size (drawn with replacement): >= 70% macro recall on Test;
  (c) lucky-feature-map check: a frozen, randomly initialised frame2d (feature_mode=frozen, weights=none) and the
      same balanced head as (b): at least 25 points of macro recall below (b), so the benchmark tells a learner
      from a lucky feature map.

    python benchmarks/synth_calibration.py --data-seeds 0 1 --seeds 0 1 2     # the benchmarks/README.md table
    python benchmarks/synth_calibration.py --data DIR --seeds 0 1 2            # any data set in the MVFouls layout

Prints per-class Test recall for every head and whether (a), (b), (c) hold; exit status 1 when they do not.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import recall_score

from mvfouls_ab import labels
from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.data import synthetic
from mvfouls_ab.data.dataset import default_cache_dir, load_data
from mvfouls_ab.models.variants import build_model
from mvfouls_ab.training.sources import FeatureSource, build_sources

PIPELINES = {   # name -> (TrainingConfig overrides, head trained on a balanced sample)
    "(a) plain": ({"rep_recipe": "plain"}, False),
    "(b) balanced": ({"rep_recipe": "balanced"}, True),
    "(c) frozen random": ({"feature_mode": "frozen", "weights": "none"}, True),
}


def features(cfg: TrainingConfig) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """fit / holdout / valid / test embeddings of the product's path (standardised), as numpy."""
    sources = build_sources(cfg, load_data(cfg), progress=True)
    out = {}
    for name in ("train", "holdout", "test"):
        src = sources[name]
        assert isinstance(src, FeatureSource)
        out[name] = (src.feats.numpy(), src.mask.numpy(), src.targets)
    return out


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
    p.add_argument("--data", default="", help="data root (default: the synthetic data set of each --data-seeds)")
    p.add_argument("--data-seeds", type=int, nargs="+", default=[synthetic.DEFAULT_SEED],
                   help="generator seeds of the default-scale synthetic data sets (generated and cached on first use)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="head training seeds")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variant", default="simplified")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainingConfig overrides for all three")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mvfouls_ab.config import load_config

    started = time.perf_counter()
    ok = True
    roots = [args.data] if args.data else [str(synthetic.default_data_root(default_cache_dir(), seed=s))
                                            for s in args.data_seeds]
    summary: list[str] = []
    for root in roots:
        base = load_config(None, args.set, base=TrainingConfig(variant=args.variant, device="cpu")).replace(data_root=root)
        data = {name: features(base.replace(**over)) for name, (over, _) in PIPELINES.items()}
        print(f"\ndata {root}: fit {len(data['(a) plain']['train'][0])} / held-out {len(data['(a) plain']['holdout'][0])}"
              f" / Test {len(data['(a) plain']['test'][0])} actions ({time.perf_counter() - started:.0f} s)")
        for task, names in labels.TASKS.items():
            ytr = data["(a) plain"]["train"][2][task]
            counts = np.bincount(ytr, minlength=len(names))
            rarest = [int(c) for c in np.argsort(counts, kind="stable")[:2]]
            print(f"\n{task}: fit counts {counts.tolist()}; rarest: {', '.join(names[c] for c in rarest)}")
            print(f"  {'pipeline':<20}" + "".join(f"{labels.CLASS_SLUGS[task][c][:10]:>11}" for c in range(len(names)))
                  + f"{'macro':>8}")
            macros: dict[str, list[float]] = {name: [] for name in PIPELINES}
            for seed in args.seeds:
                for name, (_, balanced) in PIPELINES.items():
                    tr, ho, te = data[name]["train"], data[name]["holdout"], data[name]["test"]
                    y = tr[2][task]
                    rng = np.random.default_rng(seed)
                    index = balanced_sample(y, len(y), rng) if balanced else np.arange(len(y))
                    model, epoch = train_head(base, tr, ho, task, index, seed, args.epochs, args.lr, args.batch,
                                              balanced)
                    pred = predict(model, te[0], te[1], task)
                    rec = recall_score(te[2][task], pred, labels=range(len(names)), average=None, zero_division=0)
                    macros[name].append(float(rec.mean()))
                    print(f"  {name:<20}" + "".join(f"{r:>11.2f}" for r in rec)
                          + f"{rec.mean():>8.3f}  head seed {seed}, epoch {epoch}")
                    if name.startswith("(a)"):
                        holds = all(rec[c] < 0.10 for c in rarest)
                        ok &= holds
                        print(f"    (a) rarest two below 10% recall: {holds}")
                b, c = macros["(b) balanced"][-1], macros["(c) frozen random"][-1]
                print(f"    (b) macro >= 70%: {b >= 0.70}; (c) >= 25 points below (b): {b - c >= 0.25}")
                ok &= b >= 0.70 and b - c >= 0.25
            summary.append(f"{root} {task}: " + ", ".join(f"{n} {np.mean(m):.3f}" for n, m in macros.items()))
    print("\n" + "\n".join(summary))
    print(f"\ncalibration {'holds' if ok else 'FAILS'} ({time.perf_counter() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
