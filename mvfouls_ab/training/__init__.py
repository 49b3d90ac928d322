"""Training: the three-phase Trainer, its phases (data), the StabilityGuard and checkpoints.

Component modules (losses, rebalance, curriculum) are imported from their own modules.
"""
from .phases import PHASES, PhaseSpec, phase_plan
from .stability import Event, StabilityGuard
from .trainer import RunResult, Trainer

__all__ = ["PHASES", "Event", "PhaseSpec", "RunResult", "StabilityGuard", "Trainer", "phase_plan"]
