"""Frozen-backbone feature cache: computed once per (backbone, weights, data, window), then read from disk."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Self

import numpy as np
import pytest
import torch

from mvfouls_ab.config import PROFILES, TrainingConfig
from mvfouls_ab.data.annotations import load_split
from mvfouls_ab.data.dataset import ClipCache, MultiViewDataset
from mvfouls_ab.data.video import ClipWindow, decode_clip
from mvfouls_ab.models.backbones import Small3D, TorchvisionBackbone, build_backbone, normalize_clips
from mvfouls_ab.models.features import feature_key, feature_path, feature_precision, load_features
from mvfouls_ab.models.variants import build_model


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def small3d_cfg(cache_dir: Path, **changes) -> TrainingConfig:
    """A frozen seeded small3d on tiny square clips (the legacy squash resize)."""
    return TrainingConfig(cache_dir=str(cache_dir), backbone="small3d", feature_mode="frozen", num_frames=4,
                          frame_size=32, frame_width=0, resize="squash", device="cpu", **changes)


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
    cfg = small3d_cfg(tmp_path)
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
    cfg = small3d_cfg(tmp_path)
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


def test_key_follows_resize_and_default_weights(tiny_mvfouls: Path, tmp_path: Path) -> None:
    valid = load_split(tiny_mvfouls, "Valid")
    cfg = small3d_cfg(tmp_path)
    keys = {feature_key(cfg.replace(**change), valid)[0]
            for change in ({}, {"resize": "crop"}, {"frame_width": 56}, {"frame_width": 56, "resize": "crop"})}
    assert len(keys) == 4
    # DEFAULT is keyed by the torchvision weights it names (no download needed to compute the key)
    _, parts = feature_key(cfg.replace(backbone="r2plus1d_18", weights="DEFAULT"), valid)
    assert parts["weights"] == "DEFAULT:R2Plus1D_18_Weights.KINETICS400_V1"


def test_pretrained_features_from_a_weights_file(tiny_mvfouls: Path, tmp_path: Path, r2plus1d_weights: Path) -> None:
    """The pretrained profile's extraction: r2plus1d_18 from a local file, aspect-preserving crop, cached once."""
    cfg = TrainingConfig().replace(**PROFILES["pretrained"]).replace(
        cache_dir=str(tmp_path), weights=str(r2plus1d_weights), num_frames=4, frame_size=32)
    assert (cfg.backbone, cfg.feature_mode, cfg.resize, cfg.device) == ("r2plus1d_18", "frozen", "crop", "cpu")
    split = load_split(tiny_mvfouls, "Valid")
    cache = ClipCache(tmp_path)
    with ForwardCounter(TorchvisionBackbone) as first:
        fs = load_features(cfg, split, cache, progress=False)
    assert first.calls >= 1 and fs.computed and fs.feats.shape == (len(split.actions), 4, 512)
    with ForwardCounter(TorchvisionBackbone) as second:
        again = load_features(cfg, split, ClipCache(tmp_path), progress=False)
    assert second.calls == 0 and not again.computed and torch.equal(again.feats, fs.feats)
    # the cached rows are the file's network on the centre crop of each clip (64x36 frames -> 57x32 -> 32x32)
    window = ClipWindow.from_config(cfg)
    assert window.shape == (3, 4, 32, 32) and window.resize == "crop"
    clip = split.actions[1].clips[0]
    squashed = decode_clip(clip.path, dataclasses.replace(window, resize="squash"))
    cropped = decode_clip(clip.path, window)
    assert not np.array_equal(squashed, cropped)
    backbone, _ = build_backbone("r2plus1d_18", str(r2plus1d_weights))
    with torch.inference_mode():
        direct = backbone.eval()(normalize_clips(torch.from_numpy(cropped)[None]))[0]
    # bf16 autocast on CPUs with native bfloat16 (the cache key says so), fp32 elsewhere
    precision = feature_precision(cfg)
    assert feature_key(cfg, split)[1].get("precision", "fp32") == precision
    tolerance = 3e-2 if precision == "bf16" else 1e-4
    assert float((direct - fs.feats[1, 0]).abs().max()) <= tolerance * float(direct.abs().max())
