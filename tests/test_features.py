"""Frozen-backbone feature cache: computed once per (backbone, weights, data, window), then read from disk."""
from __future__ import annotations

from pathlib import Path
from typing import Self

import numpy as np
import pytest
import torch

from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.data.annotations import load_split
from mvfouls_ab.data.dataset import ClipCache, MultiViewDataset
from mvfouls_ab.data.video import ClipWindow
from mvfouls_ab.models.backbones import Small3D, build_backbone
from mvfouls_ab.models.features import feature_path, load_features
from mvfouls_ab.models.variants import build_model


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class ForwardCounter:
    """Counts forward calls of one module class, through torch's global forward hook (no patching)."""

    def __init__(self, kind: type) -> None:
        self.kind, self.calls = kind, 0

    def __enter__(self) -> Self:
        def hook(module, args, output):
            if isinstance(module, self.kind):
                self.calls += 1
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_features_are_computed_once_then_read(tiny_mvfouls: Path, tmp_path: Path) -> None:
    cfg = TrainingConfig(cache_dir=str(tmp_path), num_frames=4, frame_size=32, device="cpu")
    split = load_split(tiny_mvfouls, "Train")
    cache = ClipCache(tmp_path)
    with ForwardCounter(Small3D) as first:
        fs = load_features(cfg, split, cache, progress=False)
    assert first.calls >= 1 and fs.computed
    n = len(split.actions)
    assert fs.feats.shape == (n, 4, 512) and fs.feats.dtype == torch.float32
    assert fs.view_mask.tolist() == [[v < len(a.clips) for v in range(4)] for a in split.actions]
    assert torch.all(fs.feats[~fs.view_mask] == 0) and fs.feats[fs.view_mask].abs().sum(dim=1).min() > 0
    assert fs.action_ids == [a.action_id for a in split.actions]
    assert fs.action.tolist() == split.targets()["action"].tolist()
    assert fs.severity.tolist() == split.targets()["severity"].tolist()
    path = feature_path(cache, fs.key, "Train")
    assert path.is_file() and (path.parent / "meta.json").is_file()

    with ForwardCounter(Small3D) as second:
        again = load_features(cfg, split, ClipCache(tmp_path), progress=False)
    assert second.calls == 0 and not again.computed
    assert again.key == fs.key and torch.equal(again.feats, fs.feats)

    # The cached embeddings are what the model's own backbone gives for the evaluation samples.
    model = build_model(cfg).eval()
    item = MultiViewDataset(split, ClipWindow.from_config(cfg), cache, views=None)[1]
    with torch.inference_mode():
        direct = model.embed(item["clips"][None], item["view_mask"][None])[0]
    assert torch.allclose(direct, fs.feats[1], atol=1e-5)


def test_key_follows_window_weights_and_data(tiny_mvfouls: Path, tmp_path: Path) -> None:
    cfg = TrainingConfig(cache_dir=str(tmp_path), num_frames=4, frame_size=32, device="cpu")
    cache = ClipCache(tmp_path)
    valid = load_split(tiny_mvfouls, "Valid")
    base = load_features(cfg, valid, cache, progress=False)
    bigger = load_features(cfg.replace(frame_size=48), valid, cache, progress=False)
    assert bigger.computed and bigger.key != base.key
    backbone, _ = build_backbone("small3d")
    backbone.stem.weight.data.mul_(2.0)
    torch.save(backbone.state_dict(), tmp_path / "w.pth")
    weighted = load_features(cfg.replace(weights=str(tmp_path / "w.pth")), valid, cache, progress=False)
    assert weighted.computed and weighted.key != base.key
    assert not torch.allclose(weighted.feats, base.feats)
    test = load_features(cfg, load_split(tiny_mvfouls, "Test"), cache, progress=False)
    assert test.key != base.key
    chall = load_features(cfg, load_split(tiny_mvfouls, "Chall"), cache, progress=False)
    assert (chall.action == -1).all() and (chall.severity == -1).all()
    # A cache file for other actions (e.g. written for an older annotations.json) is recomputed, not trusted.
    path = feature_path(cache, base.key, "Valid")
    with np.load(path) as data:
        arrays = dict(data)
    arrays["action_ids"] = arrays["action_ids"][::-1]
    np.savez(path, **arrays)
    assert load_features(cfg, valid, cache, progress=False).computed
