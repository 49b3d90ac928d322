"""Model variants: one composition, `MVFoulsModel(backbone, head)`, and a registry of heads (what sits above the
backbone), one decorated builder per variant:

  baseline     the control arm, today's model: a shared LayerNorm/Linear block over the per-view features, then a
               SEPARATE multi-head attention over the views for action and for severity (8 heads), one MLP head each.
  simplified   (A) one shared attention, shared features, task-specific layers only at the very end.
  progressive  (B) level 1: shared features, mean over views, shared MLP; level 2 adds attention over the views;
               level 3 adds task-specific processing. `set_complexity` grows it between phases (the trainer does
               with progressive_grow: level = phase number), keeping the trained weights; the new blocks are
               residual with a zero-initialised output, so growing does not change the model's predictions at the
               moment it grows.
  optimized    (C) today's dual attention with 4 heads, a single projection as feature processing, stronger
               regularization (dropout >= 0.3 on features, 0.1 on attention weights, LayerNorm before every head).

Every head maps (feats [B, V, D], view_mask [B, V]) -> {"action": [B, 8], "severity": [B, 4]}; padded views
(mask False) never influence the output.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import TrainingConfig
from ..errors import ConfigError, located
from ..labels import NUM_CLASSES
from .aggregation import AttentionPool, ViewAttention, masked_mean
from .backbones import backbone_from_config, normalize_clips

HeadBuilder = Callable[[TrainingConfig, int], nn.Module]
VARIANT_REGISTRY: dict[str, HeadBuilder] = {}


def register_variant(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Register `builder(cfg, feature_dim) -> head module` under `name`."""
    def decorate(builder: HeadBuilder) -> HeadBuilder:
        if name in VARIANT_REGISTRY:
            raise ValueError(f"variant {name!r} is already registered")
        VARIANT_REGISTRY[name] = builder
        return builder
    return decorate


# ---- building blocks ---------------------------------------------------------------------------------------------
def shared_block(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """Per-view LayerNorm/Linear block shared by both tasks."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))


def mlp_head(hidden: int, classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, classes))


def linear_head(hidden: int, classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(hidden), nn.Dropout(dropout), nn.Linear(hidden, classes))


class Residual(nn.Module):
    """x + f(x) where f = LayerNorm -> Linear -> GELU -> Dropout -> Linear; zero_init makes it start as identity."""

    def __init__(self, dim: int, dropout: float, zero_init: bool = True) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout),
                               nn.Linear(dim, dim))
        if zero_init:
            nn.init.zeros_(self.f[-1].weight)
            nn.init.zeros_(self.f[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


# ---- heads -------------------------------------------------------------------------------------------------------
class DualAttentionHead(nn.Module):
    """Shared per-view block, then a separate attention over the views and a head for each task."""

    def __init__(self, in_dim: int, hidden: int, heads: int, dropout: float, attn_dropout: float = 0.0,
                 simple: bool = False) -> None:
        super().__init__()
        if simple:  # optimized: one projection with input dropout as feature processing, linear heads
            self.shared = nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, hidden))
            head = linear_head
        else:
            self.shared = shared_block(in_dim, hidden, dropout)
            head = mlp_head
        self.attn_action = AttentionPool(hidden, heads, attn_dropout)
        self.attn_severity = AttentionPool(hidden, heads, attn_dropout)
        self.action = head(hidden, NUM_CLASSES["action"], dropout)
        self.severity = head(hidden, NUM_CLASSES["severity"], dropout)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.shared(feats)
        return {"action": self.action(self.attn_action(h, mask)),
                "severity": self.severity(self.attn_severity(h, mask))}


class SharedAttentionHead(nn.Module):
    """Shared per-view block, one attention over the views, a shared MLP, task-specific linear layers at the end."""

    def __init__(self, in_dim: int, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.shared = shared_block(in_dim, hidden, dropout)
        self.attn = AttentionPool(hidden, heads, 0.0)
        self.trunk = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout))
        self.action = nn.Linear(hidden, NUM_CLASSES["action"])
        self.severity = nn.Linear(hidden, NUM_CLASSES["severity"])

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(self.attn(self.shared(feats), mask))
        return {"action": self.action(z), "severity": self.severity(z)}


class ProgressiveHead(nn.Module):
    """Level 1: shared block -> mean over views -> shared MLP -> linear heads. Level 2 inserts a residual attention
    over the views before the mean; level 3 inserts a residual per-task block before each linear head."""

    def __init__(self, in_dim: int, hidden: int, heads: int, dropout: float, level: int = 1) -> None:
        super().__init__()
        self.hidden, self.heads, self.dropout = hidden, heads, dropout
        self.level = 1
        self.shared = shared_block(in_dim, hidden, dropout)
        self.trunk = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout))
        self.action = nn.Linear(hidden, NUM_CLASSES["action"])
        self.severity = nn.Linear(hidden, NUM_CLASSES["severity"])
        self.attn: ViewAttention | None = None
        self.task_action: Residual | None = None
        self.task_severity: Residual | None = None
        self.set_level(level)

    def set_level(self, level: int) -> None:
        """Grow to `level`, adding the new blocks (on the device of the existing ones) and keeping every trained
        weight; setting a lower level drops the blocks above it."""
        if level not in (1, 2, 3):
            raise ConfigError(located("complexity_level", f"{level} is not 1, 2 or 3", "use 1, 2 or 3"))
        device = self.action.weight.device
        if level >= 2 and self.attn is None:
            self.attn = ViewAttention(self.hidden, self.heads, 0.0, zero_init=True).to(device)
        if level >= 3 and self.task_action is None:
            self.task_action = Residual(self.hidden, self.dropout).to(device)
            self.task_severity = Residual(self.hidden, self.dropout).to(device)
        if level < 3:
            self.task_action = self.task_severity = None
        if level < 2:
            self.attn = None
        self.level = level

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.shared(feats)
        if self.attn is not None:
            h = self.attn(h, mask)
        z = self.trunk(masked_mean(h, mask))
        za = self.task_action(z) if self.task_action is not None else z
        zs = self.task_severity(z) if self.task_severity is not None else z
        return {"action": self.action(za), "severity": self.severity(zs)}


@register_variant("baseline")
def baseline(cfg: TrainingConfig, in_dim: int) -> nn.Module:
    return DualAttentionHead(in_dim, cfg.hidden_dim, cfg.attention_heads, cfg.dropout)


@register_variant("simplified")
def simplified(cfg: TrainingConfig, in_dim: int) -> nn.Module:
    return SharedAttentionHead(in_dim, cfg.hidden_dim, cfg.attention_heads, cfg.dropout)


@register_variant("progressive")
def progressive(cfg: TrainingConfig, in_dim: int) -> nn.Module:
    return ProgressiveHead(in_dim, cfg.hidden_dim, cfg.attention_heads, cfg.dropout, cfg.complexity_level)


@register_variant("optimized")
def optimized(cfg: TrainingConfig, in_dim: int) -> nn.Module:
    dropout = max(cfg.dropout, 0.3)
    return DualAttentionHead(in_dim, cfg.hidden_dim, 4, dropout, attn_dropout=0.1, simple=True)


# ---- the model ---------------------------------------------------------------------------------------------------
class MVFoulsModel(nn.Module):
    """backbone (per view) -> head (over views). `forward` takes clips, `forward_features` cached embeddings."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feature_dim: int, frozen: bool = False,
                 variant: str = "") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = feature_dim
        self.frozen = frozen
        self.variant = variant
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> MVFoulsModel:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def embed(self, clips: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """clips [B, V, C, T, H, W] (uint8, or float already normalized) -> per-view features [B, V, D]; only the
        real views go through the backbone, padded views get zeros."""
        b, v = clips.shape[:2]
        mask = view_mask.bool()
        real = clips[mask]
        if real.dtype == torch.uint8:
            real = normalize_clips(real)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.backbone(real)
        feats = out.new_zeros(b, v, out.shape[-1])
        feats[mask] = out
        return feats

    def forward(self, clips: torch.Tensor, view_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_features(self.embed(clips, view_mask), view_mask)

    def forward_features(self, feats: torch.Tensor, view_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = view_mask.bool()
        return self.head(feats.masked_fill(~mask.unsqueeze(-1), 0.0), mask)


def build_model(cfg: TrainingConfig) -> MVFoulsModel:
    """Backbone from cfg.backbone/cfg.weights, head from the variant registry; frozen mode freezes the backbone."""
    if cfg.variant not in VARIANT_REGISTRY:
        raise ConfigError(located(f"variant={cfg.variant}", "unknown variant",
                                  f"use one of {', '.join(VARIANT_REGISTRY)}"))
    backbone, dim = backbone_from_config(cfg)
    head = VARIANT_REGISTRY[cfg.variant](cfg, dim)
    return MVFoulsModel(backbone, head, dim, frozen=cfg.feature_mode != "end_to_end", variant=cfg.variant)


def has_levels(model: MVFoulsModel) -> bool:
    """Whether the model's head has complexity levels (set_complexity applies): the progressive variant's."""
    return isinstance(model.head, ProgressiveHead)


def set_complexity(model: MVFoulsModel, level: int) -> None:
    """Set the progressive variant's level (1..3). Growing keeps every trained weight and, the new blocks starting
    as the identity, the model's predictions; a lower level drops the blocks above it. Build a new optimizer after
    it (the parameters changed)."""
    if not isinstance(model.head, ProgressiveHead):
        raise ConfigError(located(f"variant={model.variant}", "set_complexity only applies to the progressive variant",
                                  "set variant=progressive or do not grow the model"))
    model.head.set_level(level)


def count_parameters(model: MVFoulsModel) -> dict[str, int]:
    """{"total", "trainable", "backbone", "head"} parameter counts."""
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "backbone": sum(p.numel() for p in model.backbone.parameters()),
        "head": sum(p.numel() for p in model.head.parameters()),
    }
