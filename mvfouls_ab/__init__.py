"""mvfouls-ab: experiment-tracking-centric A/B testing for SoccerNet MVFouls multi-view foul recognition."""
from .config import TrainingConfig, load_config
from .errors import MVFoulsError

__all__ = ["MVFoulsError", "TrainingConfig", "load_config"]
__version__ = "0.1.0"
