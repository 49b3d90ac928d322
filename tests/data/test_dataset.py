from __future__ import annotations

import json
import mmap
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.data import dataset as dataset_module
from mvfouls_ab.data import synthetic
from mvfouls_ab.data.annotations import load_split
from mvfouls_ab.data.dataset import ClipCache, EpochShuffle, MultiViewDataset, load_data, make_loader
from mvfouls_ab.data.video import ClipWindow, decode_clip, write_clip
from mvfouls_ab.errors import AnnotationError, VideoError

WINDOW = ClipWindow(start=63, end=87, num_frames=8, size=32)


def cache_files(cache: ClipCache) -> list:
    return sorted(cache.root.rglob("*")) if cache.root.exists() else []


def forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the decoder was called on a cached clip")
    monkeypatch.setattr(dataset_module, "decode_frames", fail)


def test_cache_decodes_once_then_memory_maps(tiny_mvfouls, tmp_path, monkeypatch):
    clip = load_split(tiny_mvfouls, "Train").actions[0].clips[0]
    cache = ClipCache(tmp_path / "cache")
    first = cache.get(clip, WINDOW)
    assert (cache.hits, cache.misses) == (0, 1)
    np.testing.assert_array_equal(first, decode_clip(clip.path, WINDOW))
    forbid_decoding(monkeypatch)
    again = cache.get(clip, WINDOW)
    base = again
    while isinstance(base, np.ndarray):
        base = base.base
    base = base.obj if isinstance(base, memoryview) else base
    assert isinstance(base, mmap.mmap) and not again.flags.writeable
    assert again.dtype == np.uint8 and again.shape == (3, 8, 32, 32)
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(again, first)
    files = [p for p in cache_files(cache) if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".npy"  # no temporary files left behind


def test_cache_key_follows_file_window_and_size(tiny_mvfouls, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_mvfouls / "Train" / "action_0", root)
    clip_path = root / "clip_0.mp4"
    cache = ClipCache(tmp_path / "cache")
    original = np.array(cache.get(clip_path, WINDOW))
    assert not np.array_equal(np.array(cache.get(clip_path, ClipWindow(start=0, end=20, num_frames=8, size=32))),
                              original)
    assert cache.get(clip_path, ClipWindow(start=63, end=87, num_frames=8, size=16)).shape == (3, 8, 16, 16)
    assert cache.misses == 3
    # Replace the video (new content, new size and mtime): decoded again, never served stale.
    frames = np.full((100, 36, 64, 3), 250, np.uint8)
    write_clip(clip_path, frames)
    os.utime(clip_path, ns=(1, 1))
    replaced = cache.get(clip_path, WINDOW)
    assert cache.misses == 4 and replaced.min() > 200


def test_corrupt_cache_entry_is_decoded_again(tiny_mvfouls, tmp_path):
    clip = load_split(tiny_mvfouls, "Train").actions[0].clips[0]
    cache = ClipCache(tmp_path / "cache")
    good = np.array(cache.get(clip, WINDOW))
    cache.file_for(clip, WINDOW).write_bytes(b"not a numpy file")
    np.testing.assert_array_equal(cache.get(clip, WINDOW), good)
    assert cache.misses == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_warm_decodes_every_missing_clip_once(tiny_mvfouls, tmp_path, monkeypatch, workers):
    split = load_split(tiny_mvfouls, "Valid")
    cache = ClipCache(tmp_path / "cache")
    n_clips = sum(len(a.clips) for a in split.actions)
    cache.get(split.actions[0].clips[0], WINDOW)
    assert cache.warm(split.actions, WINDOW, workers=workers, progress=False) == n_clips - 1
    assert cache.missing(split.actions, WINDOW) == []
    assert cache.warm(split.actions, WINDOW, workers=workers, progress=False) == 0
    forbid_decoding(monkeypatch)
    for action in split.actions:
        for clip in action.clips:
            np.testing.assert_array_equal(cache.get(clip, WINDOW), decode_clip(clip.path, WINDOW))


def test_warm_names_the_bad_clip(tiny_mvfouls, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_mvfouls, root)
    split = load_split(root, "Test")
    bad = split.actions[2].clips[1].path
    bad.write_bytes(b"")
    with pytest.raises(VideoError, match="empty") as exc:
        ClipCache(tmp_path / "cache").warm(split.actions, WINDOW, workers=2, progress=False)
    assert str(bad) in str(exc.value) and f"action {split.actions[2].action_id}" in str(exc.value)


def mmap_backed(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)


def test_packed_split_reads_the_decoded_arrays_from_one_file(tiny_mvfouls, tmp_path, monkeypatch):
    split = load_split(tiny_mvfouls, "Valid")
    clips = [c for a in split.actions for c in a.clips]
    decoded = [decode_clip(c.path, WINDOW) for c in clips]
    cache = ClipCache(tmp_path / "cache")
    cache.get(clips[0], WINDOW)  # one clip cached as a file first, the others decoded by pack
    path = cache.pack(split.actions, WINDOW)
    assert (cache.hits, cache.misses) == (0, len(clips))
    assert path.parent == tmp_path / "cache" / "packs" and sorted(p.name for p in path.parent.iterdir()) == \
        [path.with_suffix(".json").name, path.name]  # no temporary files left behind
    packed = np.load(path)
    assert packed.dtype == np.uint8 and packed.shape == (len(clips), 3, 8, 32, 32)
    for row, want in zip(packed, decoded, strict=True):
        np.testing.assert_array_equal(row, want)
    index = json.loads(path.with_suffix(".json").read_text())
    assert index["keys"] == [cache.key_for(c, WINDOW) for c in clips]
    assert [p for p in cache_files(cache) if p.is_file()] == []  # each window is on disk once, in the pack
    assert cache.missing(split.actions, WINDOW) == []
    # A second cache on the same directory finds the pack without decoding, read-only and memory-mapped.
    forbid_decoding(monkeypatch)
    fresh = ClipCache(tmp_path / "cache")
    assert fresh.missing(split.actions, WINDOW) == []
    for clip, want in zip(clips, decoded, strict=True):
        got = fresh.get(clip, WINDOW)
        np.testing.assert_array_equal(got, want)
        assert mmap_backed(got) and not got.flags.writeable
    assert (fresh.hits, fresh.misses) == (len(clips), 0)
    inode = path.stat().st_ino
    assert fresh.pack(split.actions, WINDOW) == path and path.stat().st_ino == inode  # reused, not rewritten
    # Pickled (spawned loader workers): the mapped pack is left out and loaded again on the first read.
    clone = pickle.loads(pickle.dumps(fresh))
    assert len(pickle.dumps(fresh)) < 10_000 and clone.hits == len(clips)
    np.testing.assert_array_equal(clone.get(clips[-1], WINDOW), decoded[-1])
    # Loader worker processes read through the pack too.
    data = MultiViewDataset(split, WINDOW, fresh, views=None)
    loader = make_loader(data, TrainingConfig(batch_size=4, num_workers=2, seed=0), shuffle=False)
    got = {int(i): c for b in loader for i, c in zip(b["index"], b["clips"], strict=True)}
    start = 0
    for index, action in enumerate(split.actions):
        n = len(action.clips)
        np.testing.assert_array_equal(got[index][:n].numpy(), np.stack(decoded[start:start + n]))
        start += n


def test_replaced_clip_is_decoded_again_not_served_from_the_pack(tiny_mvfouls, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_mvfouls / "Train", root / "Train")
    split = load_split(root, "Train")
    actions = split.actions[:3]
    cache = ClipCache(tmp_path / "cache")
    cache.pack(actions, WINDOW)
    n = sum(len(a.clips) for a in actions)
    assert cache.misses == n
    replaced = actions[1].clips[0]
    write_clip(replaced.path, np.full((100, 36, 64, 3), 250, np.uint8))
    os.utime(replaced.path, ns=(1, 1))
    assert cache.missing(actions, WINDOW) == [(replaced, actions[1].action_id)]
    again = cache.get(replaced, WINDOW)
    assert cache.misses == n + 1 and again.min() > 200
    for clip in actions[0].clips + actions[2].clips:  # the others are still read from the pack
        np.testing.assert_array_equal(cache.get(clip, WINDOW), decode_clip(clip.path, WINDOW))
    assert cache.misses == n + 1
    # Packing again writes a new pack holding the new content.
    fresh = ClipCache(tmp_path / "cache")
    fresh.pack(actions, WINDOW)
    assert fresh.misses == 0 and fresh.get(replaced, WINDOW).min() > 200
    assert len(list((tmp_path / "cache" / "packs").glob("*.npy"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shape", "index of other clips"])
def test_damaged_pack_is_ignored_and_its_clips_decoded_again(tiny_mvfouls, tmp_path, monkeypatch, damage):
    split = load_split(tiny_mvfouls, "Test")
    actions = split.actions[:3]
    clips = [c for a in actions for c in a.clips]
    decoded = [decode_clip(c.path, WINDOW) for c in clips]
    path = ClipCache(tmp_path / "cache").pack(actions, WINDOW)
    index_path = path.with_suffix(".json")
    if damage == "truncated":
        os.truncate(path, path.stat().st_size - 1000)
    elif damage == "garbage":
        path.write_bytes(b"not a numpy file")
    elif damage == "wrong shape":
        np.save(path, np.zeros((len(clips), 3, 8, 16, 16), np.uint8))
    else:
        index = json.loads(index_path.read_text())
        index["keys"] = index["keys"][::-1]
        index_path.write_text(json.dumps(index))
    cache = ClipCache(tmp_path / "cache")
    assert cache.missing(actions, WINDOW) == [(c, a.action_id) for a in actions for c in a.clips]
    for clip, want in zip(clips, decoded, strict=True):
        np.testing.assert_array_equal(cache.get(clip, WINDOW), want)
    assert (cache.hits, cache.misses) == (0, len(clips))
    # Packing again replaces the damaged pack; a fresh cache then reads it without decoding.
    assert cache.pack(actions, WINDOW) == path and cache.misses == len(clips)
    forbid_decoding(monkeypatch)
    fresh = ClipCache(tmp_path / "cache")
    for clip, want in zip(clips, decoded, strict=True):
        np.testing.assert_array_equal(fresh.get(clip, WINDOW), want)
    assert (fresh.hits, fresh.misses) == (len(clips), 0)


def test_training_items_sample_k_views_deterministically(tiny_mvfouls, tmp_path):
    split = load_split(tiny_mvfouls, "Train")
    cache = ClipCache(tmp_path / "cache")
    data = MultiViewDataset(split, WINDOW, cache, views=2, seed=3)
    item = data[2]  # action 2 has 4 views
    assert item["clips"].dtype == torch.uint8 and item["clips"].shape == (2, 3, 8, 32, 32)
    assert item["view_mask"].tolist() == [True, True]
    assert item["action"].dtype == torch.int64 and int(item["action"]) == split.actions[2].action
    assert int(item["severity"]) == split.actions[2].severity and item["index"] == 2
    views = data.view_indices(2)
    for slot, view in enumerate(views):
        np.testing.assert_array_equal(item["clips"][slot].numpy(), cache.get(split.actions[2].clips[view], WINDOW))
    # Same (seed, epoch, index) -> same views, in a fresh dataset too; epochs change them.
    assert MultiViewDataset(split, WINDOW, cache, views=2, seed=3).view_indices(2) == views
    seen = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        seen.add(tuple(data.view_indices(2)))
    assert data.epoch == 11 and len(seen) > 2 and all(len(set(v)) == 2 for v in seen)
    # More views asked than the action has: all of them, padded and masked.
    three = MultiViewDataset(split, WINDOW, cache, views=3)
    assert three[0]["view_mask"].tolist() == [True, True, False] and three[0]["clips"][2].sum() == 0


def test_evaluation_items_hold_all_views_with_a_mask(tiny_mvfouls, tmp_path):
    for name in ("Test", "Chall"):
        split = load_split(tiny_mvfouls, name)
        data = MultiViewDataset(split, WINDOW, ClipCache(tmp_path / "cache"), views=None)
        for index in range(3):
            item = data[index]
            n = len(split.actions[index].clips)
            assert item["clips"].shape == (4, 3, 8, 32, 32)
            assert item["view_mask"].tolist() == [True] * n + [False] * (4 - n)
            assert item["clips"][n:].sum() == 0 and item["clips"][:n].float().mean() > 0
        if name == "Chall":
            assert int(item["action"]) == -1 and int(item["severity"]) == -1


def test_loader_batches_are_the_same_with_workers_and_follow_set_epoch(tiny_mvfouls, tmp_path):
    split = load_split(tiny_mvfouls, "Train")
    cache = ClipCache(tmp_path / "cache")
    cache.warm(split.actions, WINDOW, progress=False)

    def batches(workers: int) -> list[dict]:
        cfg = TrainingConfig(batch_size=3, num_workers=workers, seed=1, pin_memory=True)
        data = MultiViewDataset(split, WINDOW, cache, views=2, seed=5)
        loader = make_loader(data, cfg, shuffle=True)
        epochs = []
        for epoch in range(2):
            data.set_epoch(epoch)
            epochs.append(list(loader))
        return epochs

    serial, parallel = batches(0), batches(2)
    for epoch_a, epoch_b in zip(serial, parallel, strict=True):
        assert [len(b["index"]) for b in epoch_a] == [3, 3, 2]
        for a, b in zip(epoch_a, epoch_b, strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["clips"], b["clips"])
            assert a["clips"].shape[1:] == (2, 3, 8, 32, 32) and a["view_mask"].all()
    # Epoch 1 used other views than epoch 0 for some action (3 or 4 views) in the worker processes too.
    def by_index(epoch):
        return {int(i): c for b in epoch for i, c in zip(b["index"], b["clips"], strict=True)}
    e0, e1 = by_index(parallel[0]), by_index(parallel[1])
    assert any(not torch.equal(e0[i], e1[i]) for i in e0)


def test_epoch_shuffle_depends_only_on_seed_and_epoch(tiny_mvfouls, tmp_path):
    data = MultiViewDataset(load_split(tiny_mvfouls, "Train"), WINDOW, ClipCache(tmp_path), views=2)
    shuffle = EpochShuffle(data, seed=7)
    orders = []
    for epoch in (0, 1, 0):
        data.set_epoch(epoch)
        orders.append(list(shuffle))
    assert sorted(orders[0]) == list(range(8)) and orders[0] == orders[2] and orders[0] != orders[1]
    assert list(EpochShuffle(data, seed=8)) != orders[0]


def test_load_data_reads_every_split(tiny_mvfouls, tmp_path):
    cfg = TrainingConfig(data_root=str(tiny_mvfouls), cache_dir=str(tmp_path / "cache"), frame_size=24,
                         frame_width=40, num_frames=4)
    bundle = load_data(cfg)
    assert [len(s) for s in bundle.splits().values()] == [8, 8, 8, 8]
    assert bundle.chall is not None and not bundle.chall.labelled and bundle.root == tiny_mvfouls
    assert bundle.window == ClipWindow(71, 79, 17, 4, 24, 40, "crop")     # the defaults: aspect kept, centre crop
    assert bundle.dataset("Valid", views=None)[0]["clips"].shape == (4, 3, 4, 24, 40)
    n_clips = sum(len(a.clips) for s in bundle.splits().values() for a in s.actions)
    assert bundle.warm(progress=False) == n_clips - 2 and bundle.warm(progress=False) == 0
    assert "Train: kept 8 of 11" in bundle.summary()
    # warm packed every split: one pack each, no per-clip files left; a new bundle reads them without decoding.
    packs = tmp_path / "cache" / "packs"
    assert len(list(packs.glob("*.npy"))) == 4 and len(list(packs.glob("*.json"))) == 4
    assert sorted(np.load(p, mmap_mode="r").shape[0] for p in packs.glob("*.npy")) == \
        sorted(sum(len(a.clips) for a in s.actions) for s in bundle.splits().values())
    assert not [p for p in cache_files(bundle.cache) if p.is_file()]
    again = load_data(cfg)
    item = again.dataset("Test", views=None)[5]
    assert (again.cache.hits, again.cache.misses) == (len(again.test.actions[5].clips), 0)
    assert torch.equal(item["clips"], bundle.dataset("Test", views=None)[5]["clips"])


def test_load_data_defaults_to_the_synthetic_data_set(tiny_mvfouls, tmp_path, monkeypatch):
    calls = []

    def default_data_root(cache_dir):
        calls.append(cache_dir)
        return tiny_mvfouls

    monkeypatch.setattr(synthetic, "default_data_root", default_data_root)
    bundle = load_data(TrainingConfig(data_root="", cache_dir=str(tmp_path / "c")))
    assert calls == [tmp_path / "c"] and bundle.root == tiny_mvfouls


def test_bad_split_fails_before_anything_is_cached(tiny_mvfouls, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_mvfouls, root)
    path = root / "Test" / "annotations.json"
    doc = json.loads(path.read_text())
    doc["Actions"]["1"]["Severity"] = "6.0"
    path.write_text(json.dumps(doc))
    cache_dir = tmp_path / "cache"
    with pytest.raises(AnnotationError, match="unknown Severity") as exc:
        load_data(TrainingConfig(data_root=str(root), cache_dir=str(cache_dir)))
    assert str(path) in str(exc.value) and "action 1:" in str(exc.value)
    assert not cache_dir.exists()


def test_frame_size_zero_is_the_clips_native_size_capped_at_224_rows(tiny_mvfouls, tmp_path):
    from mvfouls_ab.data.dataset import NATIVE_MAX_HEIGHT, native_size, resolve_frame_size

    cfg = TrainingConfig(data_root=str(tiny_mvfouls), cache_dir=str(tmp_path / "cache"), num_frames=2)
    assert (cfg.frame_size, cfg.frame_width) == (0, 0)               # the default: native
    bundle = load_data(cfg)
    assert native_size(bundle.train.actions[0].clips[0].path) == (36, 64)
    resolved = resolve_frame_size(cfg, bundle)
    assert (resolved.frame_size, resolved.frame_width) == (36, 64) and bundle.window.shape == (3, 2, 36, 64)
    assert resolve_frame_size(resolved, bundle) is resolved           # concrete sizes are kept as they are
    assert bundle.dataset("Train", views=None)[0]["clips"].shape[-2:] == (36, 64)
    big = tmp_path / "big"
    write_clip(big / "Train" / "action_0" / "clip_0.mp4", np.zeros((3, 720, 1280, 3), np.uint8))
    assert native_size(big / "Train" / "action_0" / "clip_0.mp4") == (720, 1280)
    assert NATIVE_MAX_HEIGHT == 224   # 720p -> 224 x 398: the aspect kept, the cost of the 224p release
