"""StabilityGuard: unit checks, and fault injection through the real trainer (NaN, spike, OOM, fallback, collapse)."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from mvfouls_ab.config import TrainingConfig
from mvfouls_ab.data.dataset import load_data
from mvfouls_ab.errors import MVFoulsError
from mvfouls_ab.training import trainer as trainer_module
from mvfouls_ab.training.losses import multitask_loss
from mvfouls_ab.training.sources import FeatureSource
from mvfouls_ab.training.stability import STEP_WARMUP, StabilityGuard
from mvfouls_ab.training.trainer import Trainer, is_oom

torch.set_num_threads(1)


# ---- the guard on its own -----------------------------------------------------------------------------------
def test_step_checks_nan_and_spike_after_warmup():
    guard = StabilityGuard(TrainingConfig(spike_factor=2.0))
    guard.begin_epoch(1)
    assert [e.kind for e in guard.check_step(float("nan"))] == ["nan_loss"]
    assert [e.kind for e in guard.check_step(float("inf"))] == ["nan_loss"]
    for _ in range(STEP_WARMUP):
        assert guard.check_step(1.0, 0.5) == []
    assert guard.check_step(5.0) == []                      # below 5 x spike_factor x running mean
    events = guard.check_step(100.0)
    assert [e.kind for e in events] == ["loss_spike"] and events[0].detail["scope"] == "step"
    assert [e.kind for e in guard.check_step(1.0, float("inf"))] == ["grad_norm"]


def test_epoch_spike_is_relative_to_previous_epoch_and_resets_per_phase():
    guard = StabilityGuard(TrainingConfig(spike_factor=2.0))
    assert guard.end_epoch(1.0, 1.0) == []
    assert guard.end_epoch(1.0, 1.9) == []
    assert [e.kind for e in guard.end_epoch(1.0, 4.0)] == ["loss_spike"]
    guard.new_phase()
    assert guard.end_epoch(1.0, 4.0) == []                  # a new phase has a new reference
    assert [e.kind for e in guard.end_epoch(float("nan"), 1.0)] == ["nan_loss"]


def test_class_collapse_after_patience_once_per_streak():
    guard = StabilityGuard(TrainingConfig(collapse_patience=3))
    recalls = {"severity": [0.5, 0.5, 0.5, 0.0], "action": [0.5] * 7 + [float("nan")]}
    kinds = [[e.kind for e in guard.end_epoch(1.0, 1.0, recalls)] for _ in range(5)]
    assert kinds == [[], [], ["class_collapse"], [], []]
    event = next(e for e in guard.events if e.kind == "class_collapse")
    assert event.detail == {"task": "severity", "cls": 3, "epochs": 3}
    guard.end_epoch(1.0, 1.0, {"severity": [0.5, 0.5, 0.5, 0.2]})      # recovered: the streak restarts
    assert guard.collapse_streak["severity"][3] == 0


def test_recover_backs_off_then_falls_back_and_oom_keeps_effective_batch():
    guard = StabilityGuard(TrainingConfig(max_recoveries=2, lr_backoff=0.5, batch_size=8, grad_accum=1))
    assert [e.kind for e in guard.recover("nan_loss")] == ["rollback", "lr_backoff"]
    assert [e.kind for e in guard.recover("nan_loss")] == ["rollback", "lr_backoff"]
    assert guard.lr_scale == 0.25
    assert [e.kind for e in guard.recover("nan_loss")] == ["rollback", "fallback_variant"]
    assert guard.lr_scale == 1.0 and guard.fallbacks == 1
    guard.on_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert (guard.batch_size, guard.grad_accum) == (4, 2)
    state = guard.state_dict()
    other = StabilityGuard(TrainingConfig())
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.state_dict() == state
    one = StabilityGuard(TrainingConfig(batch_size=1))
    with pytest.raises(torch.OutOfMemoryError):
        one.on_oom(torch.OutOfMemoryError("out of memory"))


def test_is_oom_recognises_both_forms():
    assert is_oom(torch.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_oom(RuntimeError("shape mismatch"))


# ---- fault injection through the trainer --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tiny_mvfouls: Path, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    base = TrainingConfig(data_root=str(tiny_mvfouls), cache_dir=str(cache), frame_size=32, num_frames=8,
                          backbone="small3d", feature_mode="frozen", frame_width=0, rep_holdout=0.0, num_phases=1, phase1_epochs=3, batch_size=2, device="cpu", sampler_phase1="none",
                          posthoc_adjust=False, collapse_patience=100)
    data = load_data(base)

    def run(tmp: Path, hook=None, eval_hook=None, **changes):
        trainer = Trainer(base.replace(**changes), data, [], tmp, resume=False)
        with inject_faults(trainer, hook, eval_hook):
            return trainer.run()
    return run


@contextlib.contextmanager
def inject_faults(trainer: Trainer, step_hook=None, eval_hook=None):
    """Faults for the guard to handle: ``step_hook(context, loss) -> loss`` on every training step's loss,
    ``eval_hook(context)`` before every evaluation batch (it may raise torch.OutOfMemoryError)."""
    with pytest.MonkeyPatch.context() as mp:
        if step_hook is not None:
            def loss_with_fault(*args, **kwargs):
                loss, parts = multitask_loss(*args, **kwargs)
                context = {"epoch": trainer.global_epoch, "step": trainer.guard.step, "variant": trainer.variant,
                           "batch_size": trainer.guard.batch_size}
                return step_hook(context, loss), parts
            mp.setattr(trainer_module, "multitask_loss", loss_with_fault)
        if eval_hook is not None:
            batches = FeatureSource.eval_batches

            def eval_with_fault(self, bs, device):
                for forward in batches(self, bs, device):
                    eval_hook({"what": self.name, "batch_size": bs, "device": device.type})
                    yield forward
            mp.setattr(FeatureSource, "eval_batches", eval_with_fault)
        yield


def kinds(result, epoch: int | None = None) -> list[str]:
    return [e["kind"] for e in result.events if epoch is None or e["epoch"] == epoch]


def recorded(run_dir: Path) -> list[str]:
    return [json.loads(line)["kind"] for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_injected_nan_rolls_back_and_backs_off_lr(tiny_run, tmp_path):
    calls = {"n": 0}

    def nan_once(ctx, loss):
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 6 else loss   # a step of epoch 2

    clean = tiny_run(tmp_path / "clean")
    result = tiny_run(tmp_path / "nan", nan_once)
    assert kinds(result) == ["nan_loss", "rollback", "lr_backoff"]
    assert all(e["epoch"] == 2 for e in result.events)
    epoch2 = result.history[1]
    assert [e["kind"] for e in epoch2.events] == ["nan_loss", "rollback", "lr_backoff"]
    assert math.isclose(epoch2.lr, 0.5 * clean.history[1].lr) and epoch2.extra["lr_scale"] == 0.5
    assert all(math.isfinite(r.train_loss) for r in result.history)
    assert recorded(tmp_path / "nan") == kinds(result)


def test_injected_step_spike_rolls_back(tiny_run, tmp_path):
    calls = {"n": 0}

    def spike_once(ctx, loss):
        calls["n"] += 1
        return loss * 1000.0 if calls["n"] == STEP_WARMUP + 5 else loss

    result = tiny_run(tmp_path / "spike", spike_once, batch_size=1, phase1_epochs=4)
    assert kinds(result) == ["loss_spike", "rollback", "lr_backoff"]
    assert result.events[0]["detail"]["scope"] == "step"
    assert len(result.history) == 4 and all(r.train_loss < 100 for r in result.history)


def test_injected_epoch_spike_rolls_back(tiny_run, tmp_path):
    state = {"done": False}

    def spike_epoch3(ctx, loss):   # the whole of epoch 3, first attempt only: epoch loss > 2x epoch 2's
        if ctx["epoch"] == 3 and not state["done"]:
            if ctx["step"] == 3:
                state["done"] = True
            return loss * 50.0
        return loss

    result = tiny_run(tmp_path / "espike", spike_epoch3, grad_clip=1.0)
    assert kinds(result) == ["loss_spike", "rollback", "lr_backoff"]
    assert result.events[0]["detail"]["scope"] == "epoch" and result.events[0]["epoch"] == 3


def test_injected_oom_halves_batch_and_doubles_accumulation(tiny_run, tmp_path):
    state = {"raised": False}

    def oom_once(ctx, loss):
        if ctx["epoch"] == 2 and not state["raised"]:
            state["raised"] = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
        return loss

    result = tiny_run(tmp_path / "oom", oom_once, batch_size=4, grad_accum=1)
    assert kinds(result) == ["oom", "rollback"]
    oom = result.events[0]["detail"]
    assert (oom["batch_before"], oom["accum_before"], oom["batch"], oom["accum"]) == (4, 1, 2, 2)
    assert result.history[0].extra["batch_size"] == 4
    assert [(r.extra["batch_size"], r.extra["grad_accum"]) for r in result.history[1:]] == [(2, 2), (2, 2)]
    assert recorded(tmp_path / "oom") == ["oom", "rollback"]


def test_repeated_failure_falls_back_to_simpler_variant(tiny_run, tmp_path):
    def baseline_diverges(ctx, loss):
        return loss * float("nan") if ctx["variant"] == "baseline" and ctx["epoch"] == 2 else loss

    result = tiny_run(tmp_path / "fallback", baseline_diverges, variant="baseline", max_recoveries=2,
                      fallback_variant="simplified")
    assert kinds(result) == ["nan_loss", "rollback", "lr_backoff"] * 2 + ["nan_loss", "rollback", "fallback_variant"]
    fallback = next(e for e in result.events if e["kind"] == "fallback_variant")
    assert fallback["detail"]["variant"] == "simplified"
    assert fallback["detail"]["kept_tensors"] > 0          # what both variants share is carried over, not re-drawn
    assert result.variant == "simplified" and len(result.history) == 3
    assert "fallback_variant" in recorded(tmp_path / "fallback")


def test_class_collapse_alert_and_targeted_response(tiny_run, tmp_path):
    # lr 0: the model never moves, so it keeps predicting the same class and every other class sits at 0% recall.
    result = tiny_run(tmp_path / "collapse", phase1_lr=0.0, collapse_patience=2, collapse_response=True,
                      loss="weighted_ce", max_weight_phase1=3.0)
    collapses = [e for e in result.events if e["kind"] == "class_collapse"]
    responses = [e for e in result.events if e["kind"] == "collapse_response"]
    assert collapses and all(e["epoch"] == 2 for e in collapses)
    assert len(responses) == len(collapses)
    for r in responses:                                              # the cap: 3x the smallest weight
        d = r["detail"]
        assert d["weight"] == pytest.approx(3.0 * d["weight_min"]) and d["weight"] >= d["weight_before"]
    assert {(c["detail"]["task"], c["detail"]["cls"]) for c in collapses} == \
        {(r["detail"]["task"], r["detail"]["cls"]) for r in responses}


def test_fallbacks_chain_to_strictly_simpler_variants_until_none_is_left(tiny_mvfouls, tmp_path):
    base = TrainingConfig(data_root=str(tiny_mvfouls), cache_dir=str(tmp_path / "cache"), frame_size=32, num_frames=8,
                          backbone="small3d", feature_mode="frozen", frame_width=0, rep_holdout=0.0, num_phases=1,
                          phase1_epochs=3, batch_size=2, device="cpu", sampler_phase1="none", posthoc_adjust=False,
                          variant="baseline", max_recoveries=1, fallback_variant="baseline")   # not simpler than itself
    trainer = Trainer(base, load_data(base), [], tmp_path / "chain", resume=False)
    nan_from_epoch_2 = lambda ctx, loss: loss * float("nan") if ctx["epoch"] >= 2 else loss
    with inject_faults(trainer, nan_from_epoch_2), pytest.raises(MVFoulsError, match="no simpler variant"):
        trainer.run()
    chain = [e.detail["variant"] for e in trainer.guard.events if e.kind == "fallback_variant" and "variant" in
             e.detail and "kept_tensors" in e.detail]
    assert len(chain) >= 2 and "baseline" not in chain and len(set(chain)) == len(chain)


@pytest.mark.slow
def test_out_of_memory_in_evaluation_halves_the_batch_instead_of_failing(tiny_run, tmp_path):
    import torch

    def tight_memory(ctx):
        if ctx["batch_size"] > 512:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    result = tiny_run(tmp_path / "evaloom", eval_hook=tight_memory)
    steps = [e["detail"]["batch"] for e in result.events if e["kind"] == "oom_eval_batch"]
    assert steps and steps[-1] == 512 and len(result.history) == 3
    assert steps == sorted(steps, reverse=True) and len(steps) == len(set(steps))   # found once, then kept
    assert result.official["test"]["leaderboard_value"] >= 0


def test_a_changed_training_subset_is_not_a_loss_spike():
    guard = StabilityGuard(TrainingConfig(spike_factor=2.0))
    guard.new_phase()
    assert guard.end_epoch(1.0, 1.0) == []
    events = guard.end_epoch(1.0, 2.5, subset_changed=True)      # the curriculum added harder samples
    assert [e.kind for e in events] == ["subset_changed"] and not guard.needs_rollback(events)
    assert [e.kind for e in guard.end_epoch(1.0, 6.0)] == ["loss_spike"]   # same subset: a spike again
