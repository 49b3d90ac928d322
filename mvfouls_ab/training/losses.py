"""Loss functions for the two heads, registered by name, and post-hoc logit adjustment.

Each registered builder turns (cfg, class counts, class weights, phase) into ``loss(logits [B, C], target [B])``
returning the mean loss (a weighted mean, as ``F.cross_entropy`` does, when class weights apply).

Losses (``cfg.loss``):
- ``ce``: plain cross-entropy; never weighted (the "plain CE" control).
- ``weighted_ce``: cross-entropy with class weights; ``class_weights=None`` -> ``rebalance.class_weights(counts,
  cfg.max_weight_phase{phase})``.
- ``focal`` (Lin et al. 2017): ``alpha * (1 - p_t)^gamma * CE``, gamma = ``cfg.focal_gamma``, alpha =
  ``cfg.focal_alpha`` when >= 0 (a scalar); per-class weighting comes from ``class_weights`` when given.
  gamma = 0, alpha < 0 is exactly (weighted) CE.
- ``logit_adjusted`` (Menon et al. 2021): CE on ``logits + tau * log(prior)``, tau = ``cfg.la_tau``.
- ``balanced_softmax`` (Ren et al. 2020): CE on ``logits + log(n_c)`` (= logit adjustment with tau = 1).
- ``ldam`` (Cao et al. 2019): CE on ``s * (logits - m_y * onehot(y))`` with margins ``m_c ~ n_c^(-1/4)`` scaled
  so the largest margin is ``cfg.ldam_max_margin``, s = ``cfg.ldam_scale``; deferred re-weighting (DRW): class
  weights (given, or computed as for weighted_ce) only from phase ``cfg.drw_phase`` on. The paper applies s to
  cosine logits in [-1, 1]; with unnormalized linear heads use a small ``ldam_scale`` (e.g. 1).

Losses that already rebalance through the class prior (``logit_adjusted``, ``balanced_softmax``) and ``ce`` ignore
``class_weights``: ``LOSSES[name].reweights`` says which losses use them. Label smoothing (``cfg.label_smoothing``)
applies to every loss. A class with count 0 is treated as count 1 in priors and margins.
Per-task loss weights (``cfg.loss_weight_action``/``loss_weight_severity``) are applied by ``multitask_loss``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from ..config import TrainingConfig
from ..errors import ConfigError
from . import rebalance

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Builder = Callable[[TrainingConfig, np.ndarray, "torch.Tensor | None", int], LossFn]


@dataclass(frozen=True)
class LossSpec:
    name: str
    build: Builder
    reweights: bool       # whether the loss uses class weights at all


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, reweights: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_loss("focal", reweights=True)`` over ``build(cfg, counts, weights, phase) -> loss``."""
    def decorate(build: Builder) -> Builder:
        LOSSES[name] = LossSpec(name, build, reweights)
        return build
    return decorate


# ---- functional forms ----------------------------------------------------------------------------------------
def class_prior(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Class frequencies n_c / N, with empty classes counted as 1 so that log(prior) stays finite."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return c / c.sum()


def ldam_margins(counts: Sequence[int] | np.ndarray, max_margin: float) -> np.ndarray:
    """m_c = K / n_c^(1/4) with K such that max_c m_c = max_margin (Cao et al. 2019, eq. 13)."""
    m = 1.0 / np.sqrt(np.sqrt(np.maximum(np.asarray(counts, dtype=np.float64), 1.0)))
    return m * (max_margin / m.max())


def _weighted_mean(per_sample: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_sample.mean()
    w = weight.to(per_sample.device, per_sample.dtype)[target]
    return (per_sample * w).sum() / w.sum()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float | None = None,
               weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Multi-class focal loss: sum_c q_c * (1 - p_c)^gamma * (-log p_c), q = (smoothed) one-hot target.

    Scaled by ``alpha`` when given and averaged with ``weight[target]`` like ``F.cross_entropy``.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    n = logits.shape[1]
    q = F.one_hot(target, n).to(log_p.dtype)
    if label_smoothing > 0:
        q = q * (1.0 - label_smoothing) + label_smoothing / n
    modulation = (1.0 - log_p.exp()).clamp(min=0.0).pow(gamma) if gamma != 0 else 1.0
    per_sample = -(q * modulation * log_p).sum(dim=1)
    if alpha is not None:
        per_sample = alpha * per_sample
    return _weighted_mean(per_sample, target, weight)


def ldam_loss(logits: torch.Tensor, target: torch.Tensor, margins: torch.Tensor, scale: float,
              weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """LDAM: cross-entropy on scale * (logits - margin of the true class on the true class's logit)."""
    m = margins.to(logits.device, logits.dtype)[target]
    shifted = logits - F.one_hot(target, logits.shape[1]).to(logits.dtype) * m[:, None]
    return F.cross_entropy(scale * shifted, target, weight=_on(weight, logits), label_smoothing=label_smoothing)


def _on(weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if weight is None else weight.to(like.device, like.dtype)


def _ce(shift: torch.Tensor | None, weight: torch.Tensor | None, smoothing: float) -> LossFn:
    """CE on logits + shift (a per-class constant, e.g. tau * log prior)."""
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = logits if shift is None else logits + shift.to(logits.device, logits.dtype)
        return F.cross_entropy(z, target, weight=_on(weight, logits), label_smoothing=smoothing)
    return loss


def _default_weights(cfg: TrainingConfig, counts: np.ndarray, phase: int) -> torch.Tensor:
    cap = cfg.phase_value("max_weight", phase) if 1 <= phase <= 3 else cfg.max_weight_phase3
    return torch.as_tensor(rebalance.class_weights(counts, cap), dtype=torch.float32)


# ---- the registry ------------------------------------------------------------------------------------------
@register_loss("ce")
def _build_ce(cfg: TrainingConfig, counts: np.ndarray, weights: torch.Tensor | None, phase: int) -> LossFn:
    return _ce(None, None, cfg.label_smoothing)


@register_loss("weighted_ce", reweights=True)
def _build_weighted_ce(cfg: TrainingConfig, counts: np.ndarray, weights: torch.Tensor | None, phase: int) -> LossFn:
    return _ce(None, weights if weights is not None else _default_weights(cfg, counts, phase), cfg.label_smoothing)


@register_loss("focal", reweights=True)
def _build_focal(cfg: TrainingConfig, counts: np.ndarray, weights: torch.Tensor | None, phase: int) -> LossFn:
    alpha = cfg.focal_alpha if cfg.focal_alpha >= 0 else None

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, target, cfg.focal_gamma, alpha, weights, cfg.label_smoothing)
    return loss


@register_loss("logit_adjusted")
def _build_logit_adjusted(cfg: TrainingConfig, counts: np.ndarray, weights: torch.Tensor | None,
                          phase: int) -> LossFn:
    shift = torch.as_tensor(cfg.la_tau * np.log(class_prior(counts)), dtype=torch.float32)
    return _ce(shift, None, cfg.label_smoothing)


@register_loss("balanced_softmax")
def _build_balanced_softmax(cfg: TrainingConfig, counts: np.ndarray, weights: torch.Tensor | None,
                            phase: int) -> LossFn:
    shift = torch.as_tensor(np.log(np.maximum(np.asarray(counts, dtype=np.float64), 1.0)), dtype=torch.float32)
    return _ce(shift, None, cfg.label_smoothing)


@register_loss("ldam", reweights=True)
def _build_ldam(cfg: TrainingConfig, counts: np.ndarray, weights: torch.Tensor | None, phase: int) -> LossFn:
    margins = torch.as_tensor(ldam_margins(counts, cfg.ldam_max_margin), dtype=torch.float32)
    drw = None
    if phase >= cfg.drw_phase:
        drw = weights if weights is not None else _default_weights(cfg, counts, phase)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ldam_loss(logits, target, margins, cfg.ldam_scale, drw, cfg.label_smoothing)
    return loss


def build_loss(cfg: TrainingConfig, task: str, class_counts: Sequence[int] | np.ndarray,
               class_weights: torch.Tensor | np.ndarray | None, phase: int) -> LossFn:
    """The loss ``cfg.loss`` for one task's head in ``phase`` (1-based), from that task's training class counts."""
    if cfg.loss not in LOSSES:
        raise ConfigError(f"loss={cfg.loss!r} is not registered; known: {', '.join(LOSSES)}")
    counts = np.asarray(class_counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"{task}: class_counts must be a 1-D array with one count per class, got {counts.shape}")
    weights = None if class_weights is None else torch.as_tensor(np.asarray(class_weights), dtype=torch.float32)
    if weights is not None and weights.numel() != counts.size:
        raise ValueError(f"{task}: {weights.numel()} class weights for {counts.size} classes")
    return LOSSES[cfg.loss].build(cfg, counts, weights, phase)


def multitask_loss(losses: Mapping[str, LossFn], outputs: Mapping[str, torch.Tensor],
                   targets: Mapping[str, torch.Tensor], cfg: TrainingConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``sum_task cfg.loss_weight_{task} * losses[task](outputs[task], targets[task])``.

    Samples whose target is negative (unknown for that task, e.g. a pseudo-label kept for one task only) are left
    out of that task's loss. Returns (total loss tensor, {task: loss value as float}).
    """
    total: torch.Tensor | None = None
    parts: dict[str, float] = {}
    for task, loss_fn in losses.items():
        logits, target = outputs[task], targets[task].to(outputs[task].device).long()
        keep = target >= 0
        if not bool(keep.any()):
            continue
        value = loss_fn(logits[keep], target[keep]) if not bool(keep.all()) else loss_fn(logits, target)
        parts[task] = float(value.detach())
        weighted = getattr(cfg, f"loss_weight_{task}") * value
        total = weighted if total is None else total + weighted
    if total is None:
        any_logits = next(iter(outputs.values()))
        total = any_logits.sum() * 0.0
    return total, parts


# ---- post-hoc logit adjustment ------------------------------------------------------------------------------
def posthoc_adjust(logits: torch.Tensor | np.ndarray, class_prior: Sequence[float] | np.ndarray,
                   tau: float) -> torch.Tensor | np.ndarray:
    """logits - tau * log(prior) (Menon et al. 2021); returns the same type as ``logits``."""
    log_prior = np.log(np.maximum(np.asarray(class_prior, dtype=np.float64), 1e-12))
    if isinstance(logits, torch.Tensor):
        return logits - tau * torch.as_tensor(log_prior, dtype=logits.dtype, device=logits.device)
    return np.asarray(logits) - tau * log_prior


def tau_grid(tau_max: float, step: float = 0.25) -> np.ndarray:
    """0, step, ..., tau_max (the grid choose_tau searches; cfg.posthoc_tau_max)."""
    return np.round(np.arange(0.0, tau_max + step / 2, step), 10)


def choose_tau(val_logits: torch.Tensor | np.ndarray, val_targets: Sequence[int] | np.ndarray,
               class_prior: Sequence[float] | np.ndarray, taus: Sequence[float] | np.ndarray) -> float:
    """The tau of ``taus`` whose adjusted Valid predictions have the highest balanced accuracy (macro recall).

    Ties go to the smallest tau (the least adjustment). Uses ``sklearn.metrics.balanced_accuracy_score``.
    """
    taus = [float(t) for t in taus]
    if not taus:
        raise ValueError("choose_tau needs at least one tau")
    logits = val_logits.detach().cpu().numpy() if isinstance(val_logits, torch.Tensor) else np.asarray(val_logits)
    y = np.asarray(val_targets, dtype=np.int64)
    if y.size == 0:
        return min(taus)
    best_tau, best_score = min(taus), -math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "y_pred contains classes not in y_true"
        for tau in sorted(taus):
            score = balanced_accuracy_score(y, np.asarray(posthoc_adjust(logits, class_prior, tau)).argmax(axis=1))
            if score > best_score + 1e-12:
                best_tau, best_score = tau, score
    return best_tau
