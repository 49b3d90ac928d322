"""Where the data lives: the cache folder, and the data root a config names (the real data set, or the synthetic
one, generated on first use). The one place both defaults are resolved; dataset.load_data reads the root from here,
so the loader never decides to generate data, and synthetic.py stays a leaf (it imports nothing of the loader)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import synthetic


def default_cache_dir(cfg: Any | None = None) -> Path:
    """cfg.cache_dir, else $MVFOULS_AB_CACHE, else ~/.cache/mvfouls_ab: the one place the default is resolved."""
    configured = (getattr(cfg, "cache_dir", "") if cfg is not None else "") or os.environ.get("MVFOULS_AB_CACHE", "")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mvfouls_ab"


def data_root(cfg: Any) -> Path:
    """cfg.data_root, or ("" there) the cached synthetic MVFouls data set under the cache folder, generated on
    first use (synthetic.default_data_root)."""
    if cfg.data_root:
        return Path(cfg.data_root).expanduser()
    return Path(synthetic.default_data_root(default_cache_dir(cfg)))
