"""Data layer: annotations.json -> official labels -> multi-view clips (decoded once, cached). Knows no model.

Names are imported on first use (PEP 562), so torch-free parts (data.folds, data.annotations) load without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "SPLITS": "annotations", "Action": "annotations", "Clip": "annotations", "SplitAnnotations": "annotations",
    "load_split": "annotations", "ClipCache": "dataset", "DataBundle": "dataset", "EpochShuffle": "dataset",
    "MultiViewDataset": "dataset", "default_cache_dir": "paths", "load_data": "dataset", "make_loader": "dataset",
    "SHORT_CLIPS": "video", "ClipWindow": "video", "decode_clip": "video", "write_clip": "video",
}
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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
