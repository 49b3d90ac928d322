"""View aggregation: per-view features [B, V, D] + view_mask [B, V] (True = real view) -> one vector [B, D].

Padded views (mask False) never influence the result. `build_aggregation(kind, dim, heads, dropout)` with kind in
AGGREGATIONS: max, mean, attention (multi-head self-attention over the views, then a masked mean), affinity
(VARS's pairwise view-affinity weighting, "WeightedAggregate" in sn-mvfoul, with masking).
A row without any real view is treated as if every view were real (it cannot happen with the data layer).
"""
from __future__ import annotations

import torch
from torch import nn


def _valid(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool()
    return mask | ~mask.any(dim=1, keepdim=True)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = _valid(mask).unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~_valid(mask).unsqueeze(-1), float("-inf")).amax(dim=1)


class MaxPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_max(x, mask)


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(x, mask)


class ViewAttention(nn.Module):
    """Pre-norm residual multi-head self-attention over the views (key_padding_mask hides padded views).

    Returns per-view features [B, V, D]; padded positions are zeroed. With `zero_init` the output projection starts
    at zero, so the block starts as the identity (used to grow the progressive variant without changing its output).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, zero_init: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim={dim} must be divisible by attention_heads={heads}")
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        if zero_init:
            nn.init.zeros_(self.attn.out_proj.weight)
            nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = _valid(mask)
        x = x.masked_fill(~valid.unsqueeze(-1), 0.0)
        h = self.norm(x)
        out, _ = self.attn(h, h, h, key_padding_mask=~valid, need_weights=False)
        return (x + self.drop(out)).masked_fill(~valid.unsqueeze(-1), 0.0)


class AttentionPool(nn.Module):
    """ViewAttention, then the masked mean over the real views."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = ViewAttention(dim, heads, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.attention(x, mask), mask)


class AffinityPool(nn.Module):
    """VARS's weighted aggregation: a = x W; view weights from the ReLU'd pairwise affinities a a^T, normalized over
    all (real) pairs and summed per view; output = sum_v w_v a_v. Padded views take part in no pair."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim).uniform_(-1.0, 1.0) / dim ** 0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = _valid(mask)
        a = x.masked_fill(~valid.unsqueeze(-1), 0.0) @ self.weight
        pair = (valid.unsqueeze(2) & valid.unsqueeze(1)).to(a.dtype)
        affinity = torch.relu(a @ a.transpose(1, 2)) * pair
        total = affinity.sum(dim=(1, 2), keepdim=True)
        # When every affinity is 0, fall back to uniform weights over the real pairs (VARS would divide by 0).
        affinity = torch.where(total > 0, affinity, pair)
        weights = (affinity / affinity.sum(dim=(1, 2), keepdim=True)).sum(dim=1)  # [B, V]
        return (a * weights.unsqueeze(-1)).sum(dim=1)


AGGREGATIONS = ("max", "mean", "attention", "affinity")


def build_aggregation(kind: str, dim: int, heads: int = 8, dropout: float = 0.0) -> nn.Module:
    """A module mapping (x [B, V, dim], mask [B, V]) -> [B, dim]."""
    if kind == "max":
        return MaxPool()
    if kind == "mean":
        return MeanPool()
    if kind == "attention":
        return AttentionPool(dim, heads, dropout)
    if kind == "affinity":
        return AffinityPool(dim)
    raise ValueError(f"unknown view aggregation {kind!r}: use one of {', '.join(AGGREGATIONS)}")
