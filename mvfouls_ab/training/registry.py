"""The names a config may give to registered things, read from the registries themselves (the only lists): head
variants (models/variants.py ``@register_variant``), backbones (models/backbones.py) and losses
(training/losses.py ``@register_loss``). Adding a variant or a loss is one decorated function in one file.

TrainingConfig stays torch-free and checks only its own choices; the registries live above it, so the commands
(train, study, ab) and the Trainer call :func:`check_registered` on the configs they take in.
"""
from __future__ import annotations

from ..config import TrainingConfig
from ..errors import ConfigError
from ..models.backbones import BACKBONE_NAMES
from ..models.variants import VARIANT_REGISTRY
from .losses import LOSSES


def registered() -> dict[str, tuple[str, ...]]:
    """TrainingConfig field -> the names its registry knows."""
    variants = tuple(VARIANT_REGISTRY)
    return {"variant": variants, "fallback_variant": variants, "backbone": tuple(BACKBONE_NAMES),
            "loss": tuple(LOSSES)}


def check_registered(cfg: TrainingConfig) -> TrainingConfig:
    """cfg, or a ConfigError naming the first field whose value no registry knows."""
    for name, allowed in registered().items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name}={getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    return cfg
