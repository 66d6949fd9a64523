"""The trainer behind ``divattn train``: config, loop, checkpoints, distributed helpers.

Names load on first use (PEP 562), so that ``divattn train --help``, ``--list-configs``
and ``--print-config`` run without importing torch.
"""

from .. import _lazy_names

_WHERE = {
    "DEFAULTS": "config", "ConfigError": "config", "load_config": "config",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint", "CheckpointError": "checkpoint",
    "NonFiniteLossError": "loop", "build_model": "loop", "evaluate": "loop", "resolve_backend": "loop",
    "train": "loop",
}

__all__ = ["DEFAULTS", "ConfigError", "load_config", "load_checkpoint", "save_checkpoint", "CheckpointError",
           "NonFiniteLossError", "build_model", "evaluate", "resolve_backend", "train"]

__getattr__, __dir__ = _lazy_names(__name__, _WHERE, globals())
