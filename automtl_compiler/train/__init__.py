"""Training: AutoMTL's three stages, configs, checkpoints and gradient schedulers."""

from .config import DEFAULTS, load_config
from .trainer import Trainer

__all__ = ["DEFAULTS", "Trainer", "load_config"]
