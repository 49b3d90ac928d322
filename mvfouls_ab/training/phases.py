"""The training phases as registered data (design: Progressive Training Manager).

A phase is a PhaseSpec record, not a class: the trainer runs whatever phase_plan(cfg) returns, top to bottom.
PHASES holds what is fixed about each phase (its role); the numbers (epochs, lr, cap, sampler, backbone LR
multiplier, augmentation strength) come from TrainingConfig fields ``phase{n}_*`` / ``*_phase{n}``.

  1 foundation    class-balanced subset (equal samples per class, both tasks), minimal augmentation,
                  lr 1e-4, class-weight cap 1.5
  2 scaling       full data, moderate rebalancing (cap 3.0), progressive augmentation + curriculum, lr 5e-5
  3 optimization  full data, targeted rebalancing of classes still weak (cap 5.0), lr 2e-5;
                  optional pseudo-labels from Chall and a top-k checkpoint ensemble

num_phases=1 is the single-phase mode of the A/B control recipes: one phase with the phase-1 settings on the
full data (no subset, no curriculum, no targeting). num_phases=2 runs phases 1 and 2.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainingConfig


@dataclass(frozen=True)
class PhaseRole:
    name: str
    subset: str          # "balanced" | "full"
    curriculum: bool     # uses the curriculum learner (when cfg.curriculum)
    targeted: bool       # targeted rebalancing for classes still weak at phase start


PHASES: dict[int, PhaseRole] = {
    1: PhaseRole("foundation", subset="balanced", curriculum=False, targeted=False),
    2: PhaseRole("scaling", subset="full", curriculum=True, targeted=False),
    3: PhaseRole("optimization", subset="full", curriculum=False, targeted=True),
}
SINGLE = PhaseRole("single", subset="full", curriculum=False, targeted=False)


@dataclass(frozen=True)
class PhaseSpec:
    number: int
    name: str
    epochs: int
    lr: float
    cap: float
    sampler: str
    backbone_lr_mult: float
    aug_strength: float
    curriculum: bool
    subset: str
    targeted: bool
    pseudo_labels: bool = False


def phase_plan(cfg: TrainingConfig) -> list[PhaseSpec]:
    """The phases a run goes through, in order (phases with 0 epochs are left out)."""
    plan = []
    for number in range(1, cfg.num_phases + 1):
        role = SINGLE if cfg.num_phases == 1 else PHASES[number]
        curriculum = cfg.curriculum and (role.curriculum or (number == 3 and cfg.curriculum_phase3))
        spec = PhaseSpec(
            number=number, name=role.name, epochs=cfg.phase_value("epochs", number), lr=cfg.phase_value("lr", number),
            cap=cfg.phase_value("max_weight", number), sampler=cfg.phase_value("sampler", number),
            backbone_lr_mult=cfg.phase_value("backbone_lr_mult", number),
            aug_strength=cfg.phase_value("aug_strength", number), curriculum=curriculum, subset=role.subset,
            targeted=role.targeted, pseudo_labels=cfg.pseudo_labels and number == 3,
        )
        if spec.epochs > 0:
            plan.append(spec)
    return plan
