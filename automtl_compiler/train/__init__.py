"""Training: AutoMTL's three stages, configs, checkpoints and gradient schedulers."""

from .config import DEFAULTS, load_config
from .settings import TrainConfig
from .trainer import Trainer

__all__ = ["DEFAULTS", "TrainConfig", "Trainer", "load_config"]
