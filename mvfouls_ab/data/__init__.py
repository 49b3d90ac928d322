"""Data layer: annotations.json -> official labels -> multi-view clips (decoded once, cached). Knows no model."""
from .annotations import SPLITS, Action, Clip, SplitAnnotations, load_split
from .dataset import (
    ClipCache,
    DataBundle,
    EpochShuffle,
    MultiViewDataset,
    default_cache_dir,
    load_data,
    make_loader,
)
from .video import SHORT_CLIPS, ClipWindow, decode_clip, write_clip

__all__ = [
    "SHORT_CLIPS",
    "SPLITS",
    "Action",
    "Clip",
    "ClipCache",
    "ClipWindow",
    "DataBundle",
    "EpochShuffle",
    "MultiViewDataset",
    "SplitAnnotations",
    "decode_clip",
    "default_cache_dir",
    "load_data",
    "load_split",
    "make_loader",
    "write_clip",
]
