"""The three-phase trainer on a tiny real-format data set: plan, determinism, resume, prediction files, options."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.data.dataset import load_data
from mvfouls_ab.evaluation.official import official_metrics
from mvfouls_ab.training.phases import phase_plan
from mvfouls_ab.training.trainer import Trainer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tiny_mvfouls: Path, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    base = TrainingConfig(data_root=str(tiny_mvfouls), cache_dir=str(cache), frame_size=32, frame_width=56,
                          num_frames=8, rep_epochs=2, rep_width=8, phase1_epochs=2, phase2_epochs=2,
                          phase3_epochs=2, batch_size=2, device="cpu", curriculum_start=0.5)
    return base, load_data(base)


def summary(history) -> list[tuple]:
    return [(r.phase, r.epoch, r.step, round(r.train_loss, 10), round(r.val_loss, 10), r.leaderboard,
             tuple(r.action_per_class_recall), tuple(r.severity_per_class_recall)) for r in history]


def test_phase_plan_is_data():
    plan = phase_plan(TrainingConfig())
    assert [(p.number, p.name, p.epochs, p.lr, p.cap, p.subset, p.curriculum, p.targeted) for p in plan] == [
        (1, "foundation", 10, 1e-4, 1.5, "balanced", False, False),
        (2, "scaling", 15, 5e-5, 3.0, "full", True, False),
        (3, "optimization", 15, 2e-5, 5.0, "full", False, True)]
    assert plan[0].aug_strength == 0.0 < plan[1].aug_strength < plan[2].aug_strength
    single = phase_plan(TrainingConfig(num_phases=1, phase1_epochs=7, sampler_phase1="none"))
    assert [(p.name, p.epochs, p.lr, p.cap, p.subset, p.curriculum) for p in single] == \
        [("single", 7, 1e-4, 1.5, "full", False)]
    assert [p.number for p in phase_plan(TrainingConfig(phase2_epochs=0))] == [1, 3]
    assert phase_plan(TrainingConfig(pseudo_labels=True))[2].pseudo_labels


def test_three_phases_write_run_folder_and_official_predictions(setup, tmp_path):
    base, data = setup
    result = Trainer(base, data, [], tmp_path).run()
    assert [(r.phase, r.epoch, r.step) for r in result.history] == [
        ("foundation", 0, 0), ("foundation", 1, 1), ("scaling", 0, 2), ("scaling", 1, 3),
        ("optimization", 0, 4), ("optimization", 1, 5)]
    assert [r.lr for r in result.history[::2]] == [1e-4, 5e-5, 2e-5]      # cosine within each phase
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(6))
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "events.jsonl").is_file()
    for split in ("valid", "test", "chall"):
        assert result.predictions[split] == tmp_path / f"predictions_{split}.json"
        actions = json.loads(result.predictions[split].read_text())["Actions"]
        assert len(actions) == len(getattr(data, split).actions)
    # the numbers reported are the official evaluator's, read from the written files
    for split, gt in (("valid", data.valid), ("test", data.test)):
        assert result.official[split] == official_metrics(gt.annotations_path, result.predictions[split])
    saved = json.loads((tmp_path / "official_metrics.json").read_text())
    assert saved["official"]["test"] == result.official["test"]
    # model selection on Valid: best leaderboard, ties broken by the lower val loss
    best_key = max((r.leaderboard, -r.val_loss) for r in result.history)
    assert (result.best.leaderboard, -result.best.val_loss) == best_key
    assert set(result.taus) == {"action", "severity"}
    counts = result.parameters     # frozen mode: only the head trains
    assert counts["total"] == counts["backbone"] + counts["head"] and counts["trainable"] == counts["head"] > 0


def test_same_seed_same_metrics_and_resume_equals_uninterrupted(setup, tmp_path):
    base, data = setup
    cfg = base.replace(seed=3)
    first = Trainer(cfg, data, [], tmp_path / "a").run()
    second = Trainer(cfg, data, [], tmp_path / "b").run()
    assert summary(first.history) == summary(second.history)
    assert summary(Trainer(cfg.replace(seed=4), data, [], tmp_path / "c").run().history) != summary(first.history)

    class Kill:   # stands for a killed process: raises after the epoch's checkpoint is written
        def __init__(self, at_step: int) -> None:
            self.at_step = at_step

        def log(self, record) -> None:
            if record.step == self.at_step:
                raise optuna.TrialPruned()

        def close(self) -> None:
            pass

    run_dir = tmp_path / "killed"
    for step in (1, 2):   # end of phase 1, then mid-phase 2 (curriculum state and optimizer restored)
        with pytest.raises(optuna.TrialPruned):
            Trainer(cfg, data, [Kill(step)], run_dir).run()
    resumed = Trainer(cfg, data, [], run_dir).run()
    assert summary(resumed.history) == summary(first.history)
    assert resumed.official == first.official
    for split in ("valid", "test"):
        assert resumed.predictions[split].read_text() == first.predictions[split].read_text()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 6


def test_pseudo_labels_ensemble_and_progressive_growth(setup, tmp_path):
    base, data = setup
    cfg = base.replace(variant="progressive", progressive_grow=True, complexity_level=1, pseudo_labels=True,
                       pseudo_threshold=0.0, ensemble_top_k=2)
    trainer = Trainer(cfg, data, [], tmp_path)
    result = trainer.run()
    assert trainer.complexity == 3
    assert len(trainer.pool_source) == len(trainer.sources["train"]) + len(data.chall)  # threshold 0: all of Chall
    saved = json.loads((tmp_path / "official_metrics.json").read_text())
    assert len(saved["ensemble"]) == 2 and saved["best_epoch"] == saved["ensemble"][0]
    assert len(list((tmp_path / "checkpoints").glob("model_epoch*.pt"))) == 2
    assert set(result.official) == {"valid", "test"}


def test_end_to_end_mode_trains_the_backbone(setup, tmp_path):
    base, data = setup
    cfg = base.replace(feature_mode="end_to_end", num_phases=1, phase1_epochs=1, sampler_phase1="none",
                       backbone_lr_mult_phase1=1.0, aug_strength_phase1=1.0, phase1_lr=1e-3)
    trainer = Trainer(cfg, data, [], tmp_path)
    result = trainer.run()
    fresh = trainer._build_model(cfg.variant, cfg.complexity_level)
    moved = [not torch.equal(a, b) for a, b in zip(trainer.model.backbone.parameters(), fresh.backbone.parameters())]
    assert any(moved)
    assert len(result.history) == 1 and np.isfinite(result.history[0].train_loss)
    assert result.history[0].samples_per_s > 0
