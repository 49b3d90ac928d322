"""The three-phase trainer. Trainer.run() is the whole story, top to bottom:

  sources = build_sources(cfg, data)        train (fit part) / holdout / valid / test (/ chall): cached embeddings
                                            (frozen or learned by the representation stage) or clips (end to end)
  for each phase of phase_plan(cfg):        (phases are data: training/phases.py)
      set up the phase: training pool (balanced subset / full / + pseudo-labels), capped class weights
      (targeted in phase 3 at classes still weak on the held-out part of Train), curriculum difficulty from a
      scoring pass, a fresh AdamW + scheduler
      for each epoch:
          sample the epoch's order -> train one epoch -> evaluate Valid -> DetailedMetrics
          StabilityGuard: NaN / spike -> rollback + LR backoff (or fallback variant); OOM -> smaller batch
          checkpoint (atomic), then the sinks (a sink may raise optuna.TrialPruned; it propagates), then a
          requested graceful stop (shutdown.GracefulStop) takes effect
  select the best epoch on Valid, choose the post-hoc logit-adjustment tau on Valid,
  predict Valid / Test (/ Chall), write the official prediction files and the official metrics.

The loop never asks which feature mode it is in: a Source yields (forward thunk, targets) batches
(training/sources.py). One seeded torch.Generator and one numpy Generator per run: same seed, same CPU metrics.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .. import labels, oom, shutdown
from ..config import TrainingConfig
from ..errors import MVFoulsError, located
from ..fsutil import atomic_write, atomic_write_jsonl, claim_run_folder
from ..models.variants import has_levels
from . import checkpoint as ckpt
from .losses import multitask_loss
from .phases import PhaseSpec, phase_plan
from .registry import check_registered
from .sources import Source, Sources, build_sources
from .stability import Event, StabilityGuard

if TYPE_CHECKING:
    from ..data.dataset import DataBundle


TASKS = ("action", "severity")
EVAL_FEATURES = 4096       # embeddings per evaluation batch (halved on out-of-memory)


class _Diverged(Exception):
    """Raised inside an epoch when the guard reports a NaN or exploding step loss."""

    def __init__(self, events: list[Event]) -> None:
        super().__init__(events[0].kind)
        self.events = events


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


@dataclass
class RunResult:
    best: Any                                       # DetailedMetrics of the selected epoch
    history: list[Any]
    checkpoint: Path
    predictions: dict[str, Path]                    # split -> official prediction file
    official: dict[str, dict[str, float]]           # split -> official metrics (5 keys, percent)
    per_class_recall: dict[str, dict[str, list[float]]]  # split -> task -> recall per class
    logits: dict[str, dict[str, np.ndarray]]        # split -> task -> final (adjusted) logits
    taus: dict[str, float]
    events: list[dict[str, Any]]
    run_dir: Path
    variant: str = ""
    parameters: dict[str, int] = field(default_factory=dict)  # models.count_parameters of the final model
    # What a saved model needs: backbone_weights (file / "none" / "DEFAULT"), feature_key, feature_norm
    # ({"mean", "std"} tensors or None), ensemble (checkpoint paths, best first), train_counts, representation.
    extras: dict[str, Any] = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: TrainingConfig, data: DataBundle, sinks: list[Any] | None = None,
                 run_dir: Path | str = "runs/run", resume: bool = True, progress: bool = True,
                 representation_log: Callable[[int, dict[str, float]], None] | None = None) -> None:
        self.cfg = check_registered(cfg)
        self.data = data
        self.sinks = list(sinks or [])
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resume = resume
        self.progress = progress
        self.representation_log = representation_log   # per-epoch metrics of the representation stage, if it runs
        self.device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                                   else "cpu")
        self.amp = cfg.amp and self.device.type == "cuda"
        self.eval_batch = EVAL_FEATURES            # evaluation batch; halved (and kept) on out-of-memory

    # =====================================================================================================
    def run(self) -> RunResult:
        from ..data.dataset import resolve_frame_size
        from ..tracking.sinks import TrainingMonitor

        self.cfg = cfg = resolve_frame_size(self.cfg, self.data)   # frame_size 0: the clips' native size
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        claim_run_folder(self.run_dir)          # a new, empty or earlier run folder; never a user's folder
        atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(cfg.flat(), sort_keys=False))
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.np_rng = np.random.default_rng(cfg.seed)
        self.guard = StabilityGuard(cfg)
        self.monitor = TrainingMonitor(self.sinks)
        self.plan = phase_plan(cfg)
        if not self.plan:
            raise MVFoulsError(located("config", "every phase has 0 epochs", "set phase1_epochs (and others) > 0"))

        self.inputs: Sources = build_sources(cfg, self.data, self.progress, self.representation_log)
        self.sources = self.inputs.splits
        train = self.sources["train"]
        assert train is not None
        self.train_counts = {t: np.bincount(train.targets[t][train.targets[t] >= 0],
                                            minlength=labels.NUM_CLASSES[t]) for t in TASKS}
        self.trains_backbone = train.trains_backbone
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None   # one per run, checkpointed

        self.variant, self.complexity = cfg.variant, cfg.complexity_level
        self.model = self._build_model(self.variant, self.complexity)
        self.history: list[Any] = []
        self.top: list[dict[str, Any]] = []      # best-so-far first: {score, epoch, path, variant, complexity}
        self.global_epoch = 0
        self.last_subset: tuple[int, int] | None = None   # (size, hash) of the previous epoch's training samples
        start_phase, start_epoch, state = 0, 0, None
        last = self.ckpt_dir / ckpt.LAST
        if self.resume and last.is_file():
            state = ckpt.load(last)
            if state["fingerprint"] != cfg.fingerprint():
                raise MVFoulsError(located(last, "checkpoint was written by a different config",
                                           "use another --out folder, or resume=False to start over"))
            start_phase, start_epoch = self._restore(state)
            print(f"resumed from {last} after {len(self.history)} epochs "
                  f"(phase {start_phase + 1}, epoch {start_epoch})", file=sys.stderr, flush=True)

        try:
            return self._train(start_phase, start_epoch, state)
        finally:
            self.monitor.close()

    def _train(self, start_phase: int, start_epoch: int, state: dict[str, Any] | None) -> RunResult:
        """The loop. Phases are data (phases.py); one epoch = sample, step, evaluate, record. An epoch the guard
        rejects (NaN or spiking loss, out of memory) is rolled back to the snapshot taken before it and repeated
        (with a lower LR, a smaller batch or a simpler variant: _recover)."""
        for pi in range(start_phase, len(self.plan)):
            spec = self.plan[pi]
            first = start_epoch if state is not None and pi == start_phase else 0   # resumed mid-phase
            if first == 0:
                self._setup_phase(spec)
                self.optimizer, self.scheduler = self._make_optimizer(spec)
            for e in range(first, spec.epochs):
                self.global_epoch += 1
                self.guard.begin_epoch(self.global_epoch)
                while True:
                    snapshot = self._snapshot()
                    t0 = time.perf_counter()
                    try:
                        order = self._epoch_order(spec, e)                                    # sample
                        train_loss, grad_norm, n_seen = self._train_epoch(spec, order)        # step
                    except _Diverged as div:
                        self._recover(spec, e, div.events[0].kind, snapshot)
                        continue
                    except Exception as exc:
                        if not is_oom(exc):
                            raise
                        self._recover_oom(exc, snapshot)
                        continue
                    elapsed = time.perf_counter() - t0
                    val_logits, val_loss = self._predict(self.sources["valid"], with_loss=True)   # evaluate
                    events = self._check_epoch(val_logits, val_loss, train_loss)
                    if self.guard.needs_rollback(events):
                        self._recover(spec, e, events[0].kind, snapshot)
                        continue
                    self._respond(spec, events)
                    break
                record = self._record(spec, e, val_logits, train_loss, val_loss, grad_norm, n_seen, elapsed)
                self.scheduler_step()
                self.history.append(record)                                                   # record
                self._update_best(record)
                self._save_checkpoint(pi, e + 1)
                self.monitor.log(record)   # may raise optuna.TrialPruned: the checkpoint is already written
                if shutdown.requested():   # SIGTERM/SIGINT: stop here; any worker resumes from this checkpoint
                    raise shutdown.GracefulStop(f"stopped after epoch {self.global_epoch} ({self.run_dir})")
        return self._finish()

    # ---- the guard's checks and responses ------------------------------------------------------------
    def _snapshot(self) -> tuple:
        """The state an epoch starts from (model, optimizer, scheduler), restored when the epoch is rolled back."""
        return ckpt.cpu_state_dict(self.model), ckpt.cpu_state_dict(self.optimizer), self._sched_state()

    def _check_epoch(self, val_logits: dict[str, np.ndarray], val_loss: float, train_loss: float) -> list[Event]:
        """The guard's end-of-epoch checks (loss spike, class collapse); a changed training subset (curriculum) is
        not a spike."""
        recalls = self._recalls(val_logits, self.sources["valid"].targets)
        subset = (len(self.epoch_subset), hash(self.epoch_subset.tobytes()))
        changed = self.last_subset is not None and subset != self.last_subset
        events = self.guard.end_epoch(val_loss, train_loss, recalls, subset_changed=changed)
        if not self.guard.needs_rollback(events):
            self.last_subset = subset
        return events

    def _respond(self, spec: PhaseSpec, events: list[Event]) -> None:
        for ev in events:
            if ev.kind == "class_collapse" and self.cfg.collapse_response:
                self._boost_class(spec, ev)

    def _recover_oom(self, exc: BaseException, snapshot: tuple) -> None:
        """Out of memory in a training step: the guard halves the batch (grad_accum keeps the effective batch);
        the epoch restarts from its snapshot."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.guard.on_oom(exc)
        self._restore_snapshot(snapshot)

    def _recover(self, spec: PhaseSpec, e: int, reason: str, snapshot: tuple) -> None:
        events = self.guard.recover(reason)
        fallback = next((ev for ev in events if ev.kind == "fallback_variant"), None)
        if fallback is not None:
            target = self._simpler_variant()
            if target is None:
                raise MVFoulsError(located(self.run_dir, f"training keeps diverging ({reason}) and variant "
                                           f"{self.variant!r} has no simpler variant to fall back to",
                                           "lower the learning rates or the class-weight caps"))
            self._restore_snapshot(snapshot)          # the last stable weights, then carried into the new model
            old, self.variant = self.model, target
            self.model = self._build_model(self.variant, self.complexity)
            fallback.detail.update(variant=target, kept_tensors=transfer_weights(old, self.model))
            self.optimizer, self.scheduler = self._make_optimizer(spec)
            with warnings.catch_warnings():   # fast-forward the fresh schedule to this epoch (no optimizer step yet)
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(e):
                    self.scheduler_step()
            return
        self._restore_snapshot(snapshot)
        self._scale_lr(self.cfg.lr_backoff)

    def _simpler_variant(self) -> str | None:
        """The fallback: cfg.fallback_variant when it is strictly simpler (fewer head parameters) than the current
        variant, else the most complex variant that is; None when the current one is the simplest."""
        from ..models.variants import VARIANT_REGISTRY, build_model

        def size(name: str) -> int:
            level = self.complexity if name == self.variant else self.cfg.complexity_level
            cfg = self.cfg.replace(variant=name, complexity_level=level, feature_mode="frozen", weights="none")
            return sum(p.numel() for p in build_model(cfg).head.parameters())

        current = size(self.variant)
        smaller = {name: n for name in VARIANT_REGISTRY if name != self.variant and (n := size(name)) < current}
        if self.cfg.fallback_variant in smaller:
            return self.cfg.fallback_variant
        return max(smaller, key=smaller.get) if smaller else None

    def _restore_snapshot(self, snapshot: tuple) -> None:
        model_state, optim_state, sched_state = snapshot
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optim_state)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(sched_state)

    def _scale_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if self.scheduler is not None:
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]

    def _boost_class(self, spec: PhaseSpec, ev: Event) -> None:
        """Targeted response to a collapsed class: raise its weight to the phase cap (cap x the smallest weight)."""
        task, cls = ev.detail["task"], ev.detail["cls"]
        weights = self.phase_state["weights"][task]
        before, lowest = float(weights[cls]), float(np.min(weights))
        weights[cls] = max(before, spec.cap * lowest)
        self._build_losses(spec)
        self.guard.record("collapse_response", task=task, cls=cls, weight_before=before, weight=float(weights[cls]),
                          weight_min=lowest)

    # ---- training ------------------------------------------------------------------------------------
    def _train_epoch(self, spec: PhaseSpec, order: np.ndarray) -> tuple[float, float, int]:
        """One pass over ``order`` (indices into the pool source): forward, loss, backward, an optimizer step every
        grad_accum batches; the guard checks every step. Returns (mean loss, mean grad norm, samples seen)."""
        cfg, guard, model = self.cfg, self.guard, self.model
        bs, accum = guard.batch_size, guard.grad_accum
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, seen, norms = 0.0, 0, []
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        scaler = self.scaler
        n_batches = math.ceil(len(order) / bs)
        batches = self.pool_source.train_batches(order, bs, spec.aug_strength, cfg.train_views, self.gen,
                                                 self.device, self.global_epoch)
        for i, (forward, y) in enumerate(batches):
            with torch.autocast(self.device.type, enabled=self.amp):
                out = forward(model)
                loss, _ = multitask_loss(self.losses, {t: out[t].float() for t in TASKS}, y, cfg)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise _Diverged(guard.check_step(value))
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
            n = len(y["action"])
            total += value * n
            seen += n
            if (i + 1) % accum == 0 or i + 1 == n_batches:
                if scaler:
                    scaler.unscale_(self.optimizer)
                norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
                norms.append(norm)
                events = guard.check_step(value, norm)
                if guard.needs_rollback(events):
                    raise _Diverged(events)
                if scaler:
                    scaler.step(self.optimizer)
                    scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            else:
                events = guard.check_step(value)
                if guard.needs_rollback(events):
                    raise _Diverged(events)
        return total / max(seen, 1), float(np.mean(norms)) if norms else 0.0, seen

    def _epoch_order(self, spec: PhaseSpec, e: int) -> np.ndarray:
        """Indices into the pool source for this epoch: curriculum selection, then the phase's sampler."""
        from .curriculum import curriculum_indices
        from .rebalance import sample_weights

        ps, y = self.phase_state, self.pool_source.targets
        candidates = ps["pool"]
        if ps.get("difficulty") is not None:
            sel = curriculum_indices(ps["difficulty"], y["action"][candidates], y["severity"][candidates], e,
                                     spec.epochs, self.cfg.curriculum_start, self.cfg.curriculum_pacing,
                                     self.cfg.curriculum_full_at, self.np_rng)
            candidates = candidates[np.asarray(sel, dtype=np.int64)]
        self.epoch_subset = np.sort(candidates)      # what this epoch trains on (the spike check compares it)
        progress = e / max(spec.epochs - 1, 1)
        w = np.asarray(sample_weights(y["action"][candidates], y["severity"][candidates], spec.sampler,
                                      progress=progress, oversample=self.cfg.oversample), dtype=np.float64)
        if w.size == 0 or np.allclose(w, w[0]):
            return self.np_rng.permutation(candidates)
        return self.np_rng.choice(candidates, size=len(candidates), replace=True, p=w / w.sum())

    # ---- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _predict(self, src: Source, with_loss: bool = False, model: nn.Module | None = None
                 ) -> tuple[dict[str, np.ndarray], float]:
        """All views; logits per task as numpy, and the plain (unweighted) CE of both tasks on labelled samples."""
        model = model or self.model
        start = min(self.eval_batch, self.guard.batch_size if self.trains_backbone else EVAL_FEATURES)

        def once(bs: int, dev: torch.device) -> dict[str, torch.Tensor]:   # out of memory: half the batch, then CPU
            model.to(dev).eval()
            try:
                outs: dict[str, list[torch.Tensor]] = {t: [] for t in TASKS}
                for forward in src.eval_batches(bs, dev):
                    with torch.autocast(dev.type, enabled=self.amp and dev.type == "cuda"):
                        o = forward(model)
                    for t in TASKS:
                        outs[t].append(o[t].float().cpu())
                self.eval_batch = bs                 # what fits: later passes start there
                return {t: torch.cat(outs[t]) for t in TASKS}
            finally:
                model.to(self.device)

        logits = oom.degrade(once, start, self.device, on_event=self.guard.record, what=src.name)
        loss = float("nan")
        if with_loss:
            loss = 0.0
            for t in TASKS:
                y = torch.from_numpy(src.targets[t])
                ok = y >= 0
                loss += float(F.cross_entropy(logits[t][ok], y[ok])) if ok.any() else 0.0
        return {t: logits[t].numpy() for t in TASKS}, loss

    @staticmethod
    def _recalls(logits: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> dict[str, list[float]]:
        out = {}
        for t in TASKS:
            y, p = targets[t], logits[t].argmax(1)
            out[t] = [float((p[y == c] == c).mean()) if (y == c).any() else float("nan")
                      for c in range(labels.NUM_CLASSES[t])]
        return out

    def _record(self, spec: PhaseSpec, e: int, val_logits: dict[str, np.ndarray], train_loss: float, val_loss: float,
                grad_norm: float, n_seen: int, elapsed: float) -> Any:
        from ..evaluation.metrics import compute_detailed_metrics

        events = [ev.to_dict() for ev in self.guard.epoch_events(self.global_epoch)]
        return compute_detailed_metrics(
            e, spec.name, val_logits, self.sources["valid"].targets, train_loss, val_loss,
            self.history, step=self.global_epoch - 1, phase_number=spec.number,
            lr=float(self.optimizer.param_groups[0]["lr"]), grad_norm=grad_norm, epoch_time_s=elapsed,
            samples_per_s=n_seen / max(elapsed, 1e-9), events=events,
            extra={"batch_size": self.guard.batch_size, "grad_accum": self.guard.grad_accum,
                   "lr_scale": self.guard.lr_scale, "train_samples": n_seen})

    # ---- phase set-up --------------------------------------------------------------------------------
    def _setup_phase(self, spec: PhaseSpec) -> None:
        """Pool, class weights, curriculum difficulty (all saved in phase_state for resume)."""
        from .curriculum import difficulty
        from .rebalance import balanced_subset, class_weights, targeted_weights

        cfg = self.cfg
        self.guard.new_phase()
        self.last_subset = None                      # a new phase: new data, new loss; nothing to compare with
        if cfg.progressive_grow and has_levels(self.model) and self.complexity != spec.number:
            from ..models.variants import set_complexity

            self.complexity = spec.number
            set_complexity(self.model, self.complexity)
        ps: dict[str, Any] = {"pseudo": None, "difficulty": None}
        if spec.pseudo_labels and self.sources.get("chall") is not None:
            ps["pseudo"] = self._pseudo_labels()
        self._set_pool_source(ps["pseudo"])
        y = self.pool_source.targets
        labelled = np.flatnonzero(y["action"] >= 0)
        if spec.subset == "balanced":
            pool = labelled[np.asarray(balanced_subset(y["action"][labelled], y["severity"][labelled], self.np_rng),
                                       dtype=np.int64)]
        else:
            pool = labelled
        ps["pool"] = pool
        counts = {t: np.bincount(y[t][pool], minlength=labels.NUM_CLASSES[t]) for t in TASKS}
        ps["counts"] = counts
        if spec.targeted and self.history:   # weak classes measured on held-out Train, never on Valid
            judge = self.sources.get("holdout") or self.pool_source.subset(pool)
            recalls = {t: np.nan_to_num(np.asarray(r, float), nan=1.0)
                       for t, r in self._recalls(self._predict(judge)[0], judge.targets).items()}
            ps["weights"] = {t: np.asarray(targeted_weights(counts[t], recalls[t], spec.cap), float) for t in TASKS}
        else:
            ps["weights"] = {t: np.asarray(class_weights(counts[t], spec.cap), float) for t in TASKS}
        if spec.curriculum:
            logits, _ = self._predict(self.pool_source.subset(pool))
            ps["difficulty"] = np.asarray(difficulty(logits, {t: y[t][pool] for t in TASKS},
                                                     score=cfg.curriculum_score))
        self.phase_state = ps
        self._build_losses(spec)

    def _build_losses(self, spec: PhaseSpec) -> None:
        from .losses import build_loss

        ps = self.phase_state
        self.losses = {t: build_loss(self.cfg, t, ps["counts"][t],
                                     torch.as_tensor(ps["weights"][t], dtype=torch.float32, device=self.device),
                                     spec.number)
                       for t in TASKS}

    def _pseudo_labels(self) -> dict[str, np.ndarray]:
        """Chall actions the current model labels with confidence >= pseudo_threshold on both tasks."""
        logits, _ = self._predict(self.sources["chall"])
        probs = {t: torch.softmax(torch.from_numpy(logits[t]), 1) for t in TASKS}
        conf = torch.minimum(probs["action"].max(1).values, probs["severity"].max(1).values).numpy()
        keep = np.flatnonzero(conf >= self.cfg.pseudo_threshold)
        return {"index": keep, **{t: probs[t].argmax(1).numpy()[keep].astype(np.int64) for t in TASKS}}

    def _set_pool_source(self, pseudo: dict[str, np.ndarray] | None) -> None:
        """The training pool: Train, plus pseudo-labelled Chall actions when configured."""
        train = self.sources["train"]
        if pseudo is None or len(pseudo["index"]) == 0:
            self.pool_source = train
            return
        chall, idx = self.sources["chall"], pseudo["index"]
        assert chall is not None
        self.pool_source = train.concat(chall, idx, {t: pseudo[t] for t in TASKS})

    # ---- model and optimizer -------------------------------------------------------------------------
    def _build_model(self, variant: str, complexity: int) -> nn.Module:
        from ..models.variants import build_model, set_complexity

        model = build_model(self.cfg.replace(variant=variant, complexity_level=complexity))
        if has_levels(model):
            set_complexity(model, complexity)
        if not self.trains_backbone:
            for p in model.backbone.parameters():
                p.requires_grad_(False)
        return model.to(self.device)

    def _make_optimizer(self, spec: PhaseSpec) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.cfg
        scale = self.guard.lr_scale
        backbone = {id(p) for p in self.model.backbone.parameters()}
        head = [p for p in self.model.parameters() if id(p) not in backbone and p.requires_grad]
        groups = [{"params": head, "lr": spec.lr * scale}]
        if self.trains_backbone and spec.backbone_lr_mult > 0:
            groups.append({"params": list(self.model.backbone.parameters()),
                           "lr": spec.lr * spec.backbone_lr_mult * scale})
        # fused: one kernel per step over all parameters instead of a Python loop per tensor (~1 ms of ~10 ms per
        # step for the CPU heads); available for float parameters on CPU and CUDA.
        fused = self.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused)
        if cfg.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(spec.epochs, 1))
        elif cfg.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.step_gamma)
        else:
            scheduler = None
        return optimizer, scheduler

    def scheduler_step(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def _sched_state(self) -> dict[str, Any] | None:
        return None if self.scheduler is None else self.scheduler.state_dict()

    # ---- best-so-far, checkpoints, resume ------------------------------------------------------------
    @staticmethod
    def _score(record: Any) -> tuple[float, float]:
        """Model selection on Valid: best leaderboard, ties broken by lower val loss."""
        return (float(record.leaderboard), -float(record.val_loss))

    def _update_best(self, record: Any) -> None:
        k = max(1, self.cfg.ensemble_top_k)
        score = self._score(record)
        if len(self.top) >= k and score <= tuple(self.top[-1]["score"]):
            return
        path = self.ckpt_dir / f"model_epoch{self.global_epoch:03d}.pt"
        ckpt.save_atomic({"model": self._model_state(), "variant": self.variant,
                          "complexity": self.complexity, "epoch": self.global_epoch}, path)
        self.top.append({"score": list(score), "epoch": self.global_epoch, "path": str(path)})
        self.top.sort(key=lambda d: tuple(d["score"]), reverse=True)
        self.top = self.top[:k]   # files that fell out are deleted after the next checkpoint (_prune_models)

    def _save_checkpoint(self, pi: int, epochs_done: int) -> None:
        state = {
            "fingerprint": self.cfg.fingerprint(), "phase_index": pi, "epochs_done": epochs_done,
            "global_epoch": self.global_epoch, "variant": self.variant, "complexity": self.complexity,
            "model": self._model_state(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self._sched_state(), "guard": self.guard.state_dict(), "phase_state": self.phase_state,
            "rng": ckpt.rng_state(self.gen, self.np_rng), "history": self.history, "top": self.top,
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }
        ckpt.save_atomic(state, self.ckpt_dir / ckpt.LAST)
        # metrics.jsonl mirrors the checkpoint's history; both files are replaced whole (atomic: a reader never
        # sees half a line), a few KB per epoch
        atomic_write_jsonl(self.run_dir / "metrics.jsonl", [r.to_dict() for r in self.history])
        atomic_write_jsonl(self.run_dir / "events.jsonl", [e.to_dict() for e in self.guard.events])
        keep = {Path(e["path"]).name for e in self.top}
        for path in self.ckpt_dir.glob("model_epoch*.pt"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def _model_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the model: everything that trains. A frozen backbone is left out (its
        weights are `Sources.weights`: 125 MB per file for a torchvision network, for nothing)."""
        state = ckpt.cpu_state_dict(self.model)
        if not self.trains_backbone:
            state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return state

    def _load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        wrong = [k for k in missing if not (k.startswith("backbone.") and not self.trains_backbone)] + unexpected
        if wrong:
            raise MVFoulsError(located(self.ckpt_dir, f"checkpoint does not match the model ({', '.join(wrong[:3])})",
                                       "use another --out folder, or start over with --fresh"))

    def _restore(self, state: dict[str, Any]) -> tuple[int, int]:
        """Load a checkpoint; returns (phase index, epochs already done in it) to continue from."""
        self.variant, self.complexity = state["variant"], state["complexity"]
        self.model = self._build_model(self.variant, self.complexity)
        self._load_model_state(self.model, state["model"])
        self.guard.load_state_dict(state["guard"])
        self.history, self.top, self.global_epoch = state["history"], state["top"], state["global_epoch"]
        pi, done = state["phase_index"], state["epochs_done"]
        spec = self.plan[pi]
        self.phase_state = state["phase_state"]
        self._set_pool_source(self.phase_state["pseudo"])
        self._build_losses(spec)
        self.optimizer, self.scheduler = self._make_optimizer(spec)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"], self.gen, self.np_rng)
        if done >= spec.epochs:
            return pi + 1, 0
        return pi, done

    # ---- final predictions ---------------------------------------------------------------------------
    def _finish(self) -> RunResult:
        """The deployed model (the top checkpoints' mean logits), its prediction files and official scores
        (finalize.py), the RunResult."""
        from ..models.variants import count_parameters
        from .finalize import deploy, write_summary

        splits = {"valid": self.sources["valid"], "test": self.sources["test"]}
        if self.sources.get("chall") is not None:
            splits["chall"] = self.sources["chall"]
        models = []
        for entry in self.top:
            saved = ckpt.load(Path(entry["path"]))
            m = self._build_model(saved["variant"], saved["complexity"])
            self._load_model_state(m, saved["model"])
            models.append(m)
        raw: dict[str, dict[str, np.ndarray]] = {}
        for name, src in splits.items():
            per_model = [self._predict(src, model=m)[0] for m in models]
            raw[name] = {t: np.mean([p[t] for p in per_model], axis=0) for t in TASKS}
        out = deploy(self.cfg, raw, splits, self.train_counts, self.run_dir)
        write_summary(self.run_dir, {"best_epoch": self.top[0]["epoch"], "ensemble": [e["epoch"] for e in self.top],
                                     "taus": out.taus, "variant": self.variant, "official": out.official,
                                     "per_class_recall": out.per_class_recall})
        best = next(r for r in self.history if r.step + 1 == self.top[0]["epoch"])
        return RunResult(best=best, history=self.history, checkpoint=Path(self.top[0]["path"]),
                         predictions=out.predictions, official=out.official, per_class_recall=out.per_class_recall,
                         logits=out.logits, taus=out.taus, events=[e.to_dict() for e in self.guard.events],
                         run_dir=self.run_dir, variant=self.variant, parameters=count_parameters(self.model),
                         extras={"backbone_weights": self.inputs.weights, "feature_key": self.inputs.feature_key,
                                 "feature_norm": self.inputs.feature_norm,
                                 "ensemble": [Path(e["path"]) for e in self.top],
                                 "train_counts": {t: c.tolist() for t, c in self.train_counts.items()},
                                 "representation": self.inputs.representation})


def transfer_weights(old: nn.Module, new: nn.Module) -> int:
    """Copy every tensor whose name and shape match from `old` into `new` (a fallback keeps what was learnt where
    the architectures agree: the backbone, shared blocks, the task heads); returns how many were copied."""
    target = new.state_dict()
    kept = {k: v for k, v in old.state_dict().items() if k in target and target[k].shape == v.shape}
    new.load_state_dict(kept, strict=False)
    return len(kept)
