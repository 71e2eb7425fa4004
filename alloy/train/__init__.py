"""Training runs people can live with: config, data, tokenizer, checkpoints, resume, logs."""

from alloy.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
