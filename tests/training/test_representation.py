"""The representation stage: learned once per (data, backbone, recipe, seed), cached, resumable, logged to MLflow."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.data.dataset import load_data
from mvfouls_ab.data.folds import holdout_split
from mvfouls_ab.models.backbones import build_backbone
from mvfouls_ab.models.features import weights_id
from mvfouls_ab.training.representation import (
    learn_representation,
    log_representation_run,
    representation_key,
)
from mvfouls_ab.training.sources import FeatureSource, build_sources

SMALL = {"frame_size": 32, "frame_width": 56, "rep_epochs": 2, "rep_width": 8, "rep_batch_size": 4,
         "device": "cpu", "rep_holdout": 0.25}


def small_cfg(root, cache, **over) -> TrainingConfig:
    return TrainingConfig(data_root=str(root), cache_dir=str(cache), **{**SMALL, **over})


def test_frame2d_embeds_every_frame_and_takes_the_max_over_time():
    net, dim = build_backbone("frame2d", cnn_width=8)
    net.eval()
    clips = torch.randn(3, 3, 4, 32, 56)
    out = net(clips)
    assert out.shape == (3, dim) == (3, 32)
    per_frame = net.frames(clips.transpose(1, 2).reshape(12, 3, 32, 56)).view(3, 4, -1)
    assert torch.allclose(out, per_frame.amax(dim=1), atol=1e-6)
    # a frame-level change reaches the embedding only through the frames it touches
    changed = clips.clone()
    changed[0, :, 2] += 3.0
    assert not torch.allclose(net(changed)[0], out[0]) and torch.allclose(net(changed)[1:], out[1:], atol=1e-6)
    # no batch statistics: in training mode too, a clip's embedding does not depend on the rest of its batch
    net.train()
    assert torch.allclose(net(clips[:1]), out[:1], atol=1e-5)


def test_holdout_split_is_stratified_disjoint_and_deterministic():
    rng = np.random.default_rng(0)
    action = rng.choice(8, size=300, p=[.15, .45, .04, .12, .03, .05, .15, .01])
    severity = rng.choice(4, size=300, p=[.13, .56, .30, .01])
    action[:3], severity[:3] = 7, 3          # a rare class with 3 members
    fit, held = holdout_split(action, severity, 0.15)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == 300
    assert 0.12 <= len(held) / 300 <= 0.2
    for y in (action, severity):
        for c in np.unique(y):
            if (y == c).sum() >= 2:          # every class with 2+ examples on both sides
                assert (y[held] == c).any() and (y[fit] == c).any()
    again = holdout_split(action, severity, 0.15)
    assert np.array_equal(again[1], held)
    fit0, held0 = holdout_split(action, severity, 0.0)
    assert len(held0) == 0 and len(fit0) == 300


def test_stage_is_cached_and_invalidated_by_data_backbone_and_recipe(tiny_mvfouls, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_mvfouls, root)
    cfg = small_cfg(root, tmp_path / "cache")
    data = load_data(cfg)
    first = learn_representation(cfg, data, progress=False)
    assert first.computed and first.weights.is_file() and len(first.history) == 2
    assert {"train/loss", "holdout/score", "holdout/action/macro_recall"} <= set(first.history[0])
    again = learn_representation(cfg, data, progress=False)
    assert not again.computed and again.weights == first.weights and again.key == first.key

    key = representation_key(cfg, data)[0]
    assert representation_key(cfg.replace(seed=5), data)[0] == key           # one stage serves every run seed
    assert representation_key(cfg.replace(rep_seed=-1, seed=5), data)[0] != key
    assert representation_key(cfg.replace(rep_recipe="plain"), data)[0] != key
    assert representation_key(cfg.replace(rep_width=16), data)[0] != key
    assert representation_key(cfg.replace(frame_size=40), data)[0] != key
    clip = root / "Train" / "action_0" / "clip_0.mp4"
    stamp = clip.stat().st_mtime_ns + 10**9
    os.utime(clip, ns=(stamp, stamp))                                       # the data changed
    assert representation_key(cfg, load_data(cfg))[0] != key


def test_trials_share_the_stage_and_the_features_follow_its_weights(tiny_mvfouls, tmp_path):
    cfg = small_cfg(tiny_mvfouls, tmp_path / "cache")
    data = load_data(cfg)
    a = build_sources(cfg, data, progress=False)
    b = build_sources(cfg.replace(seed=3, variant="optimized", phase1_lr=1e-3), data, progress=False)
    assert a.representation["computed"] and not b.representation["computed"]
    assert a.weights == b.weights == a.representation["weights"] and a.feature_key == b.feature_key
    assert weights_id(a.weights).startswith("sha1:")
    train, holdout = a["train"], a["holdout"]
    assert isinstance(train, FeatureSource) and isinstance(holdout, FeatureSource)
    assert not set(train.action_ids) & set(holdout.action_ids)
    assert len(train) + len(holdout) == len(data.train)
    views = train.feats[train.mask]                 # standardised with the fit part's statistics
    assert torch.allclose(views.mean(0), torch.zeros(views.shape[1]), atol=1e-4)
    frozen = build_sources(cfg.replace(feature_mode="frozen"), data, progress=False)
    assert frozen.weights == "none" and frozen.feature_key != a.feature_key and not frozen.representation


def test_interrupted_stage_resumes_from_its_checkpoint(tiny_mvfouls, tmp_path):
    cfg = small_cfg(tiny_mvfouls, tmp_path / "cache", rep_epochs=3)
    data = load_data(cfg)

    class Stop(Exception):
        pass

    def stop_after_first(epoch, metrics):
        if epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        learn_representation(cfg, data, progress=False, log_epoch=stop_after_first)
    seen = []
    resumed = learn_representation(cfg, data, progress=False, log_epoch=lambda e, m: seen.append(e))
    assert seen == [1, 2] and len(resumed.history) == 3
    uninterrupted = learn_representation(cfg.replace(cache_dir=str(tmp_path / "other")), load_data(
        cfg.replace(cache_dir=str(tmp_path / "other"))), progress=False)
    assert resumed.history[0]["train/loss"] == pytest.approx(uninterrupted.history[0]["train/loss"])
    assert resumed.history[2]["train/loss"] == pytest.approx(uninterrupted.history[2]["train/loss"], rel=1e-4)


@pytest.mark.slow
def test_stage_is_logged_to_mlflow_as_its_own_run(tiny_mvfouls, tmp_path):
    from mlflow import MlflowClient

    cfg = small_cfg(tiny_mvfouls, tmp_path / "cache")
    rep = learn_representation(cfg, load_data(cfg), progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_representation_run(rep, uri, "rep-test")
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["role"] == "representation" and run.data.tags["representation_key"] == rep.key
    assert run.data.params["rep/recipe"] == "balanced"
    history = MlflowClient(uri).get_metric_history(run_id, "holdout/score")
    assert [m.step for m in history] == [0, 1]
    assert run.info.status == "FINISHED"


def test_a_requested_stop_ends_the_stage_at_an_epoch_and_the_next_run_resumes(tiny_mvfouls, tmp_path):
    from mvfouls_ab import shutdown

    cfg = small_cfg(tiny_mvfouls, tmp_path / "cache", rep_epochs=2)
    data = load_data(cfg)
    seen = []

    def stop_in_first_epoch(epoch, metrics):
        seen.append(epoch)
        shutdown.request()               # what SIGTERM does once shutdown.install() is active

    try:
        with pytest.raises(shutdown.GracefulStop):
            learn_representation(cfg, data, progress=False, log_epoch=stop_in_first_epoch)
    finally:
        shutdown.reset()
    assert seen == [0]
    rep = learn_representation(cfg, data, progress=False, log_epoch=lambda e, m: seen.append(e))
    assert seen == [0, 1] and rep.computed and len(rep.history) == 2


def test_a_stage_checkpoint_it_cannot_read_is_discarded_not_fatal(tiny_mvfouls, tmp_path):
    from mvfouls_ab.training.representation import representation_dir

    cfg = small_cfg(tiny_mvfouls, tmp_path / "cache")
    data = load_data(cfg)
    folder = representation_dir(data, representation_key(cfg, data)[0])
    folder.mkdir(parents=True)
    (folder / "stage.pt").write_bytes(b"not a checkpoint")            # damaged, or from another code version
    with pytest.warns(UserWarning, match="starts over"):
        rep = learn_representation(cfg, data, progress=False)
    assert rep.computed and len(rep.history) == 2 and not (folder / "stage.pt").exists()
