"""Training with the DeepSeek-V2 recipe: data, balance losses, device-limited routing and token
dropping, AdamW with step decay, exact-resume checkpoints, metrics and plots."""

from .config import TrainConfig, load_config
from .trainer import TrainingDiverged, train

__all__ = ["TrainConfig", "load_config", "train", "TrainingDiverged"]
