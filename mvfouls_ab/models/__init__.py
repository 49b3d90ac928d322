"""Models: video backbones, view aggregation, the registered variants, and the frozen-feature cache."""
from .aggregation import AGGREGATIONS, build_aggregation
from .backbones import BACKBONE_NAMES, build_backbone, normalize_clips
from .features import FeatureSet, load_features
from .variants import (
                       VARIANT_REGISTRY,
                       MVFoulsModel,
                       build_model,
                       count_parameters,
                       register_variant,
                       set_complexity,
)

__all__ = [
    "AGGREGATIONS",
    "BACKBONE_NAMES",
    "VARIANT_REGISTRY",
    "FeatureSet",
    "MVFoulsModel",
    "build_aggregation",
    "build_backbone",
    "build_model",
    "count_parameters",
    "load_features",
    "normalize_clips",
    "register_variant",
    "set_complexity",
]
