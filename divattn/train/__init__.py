"""The trainer behind ``divattn train``: config, loop, checkpoints, distributed helpers."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DEFAULTS, ConfigError, load_config
from .loop import NonFiniteLossError, build_model, evaluate, resolve_backend, train

__all__ = ["DEFAULTS", "ConfigError", "load_config", "load_checkpoint", "save_checkpoint", "NonFiniteLossError",
           "build_model", "evaluate", "resolve_backend", "train"]
