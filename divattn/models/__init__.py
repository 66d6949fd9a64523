"""Bundled TimeSformer and ViViT models on the divattn ops, and their registry.

``create_model(name, **kw)`` builds a registered model (``timesformer_base``,
``timesformer_hr``, ``timesformer_large``, ``vivit_base``, ``vivit_large``,
``st_transformer_tiny`` / ``_small`` / ``_base`` / ``_large``);
``list_models()`` names them. ``load_checkpoint`` loads official, divattn and
``transformers`` checkpoints strictly, ``from_transformers`` converts a
``transformers`` model, ``init_from_vit`` starts from image ViT weights, and
``attention_rollout`` / ``save_rollout_png`` show where a model looks.
"""

from . import st_transformer, timesformer, vivit
from .base import VideoModel, VideoModelConfig
from .checkpoint import CheckpointMismatchError, LoadReport, load_checkpoint, read_state_dict
from .explain import attention_rollout, save_rollout_png
from .factory import create_model
from .hf import config_from_transformers, from_transformers, transformers_to_divattn
from .init_vit import ViTInitReport, init_from_vit
from .registry import is_model, list_models, register_model
from .st_transformer import STTransformer, STTransformerConfig
from .timesformer import TimeSformer, TimeSformerConfig
from .vivit import ViViT, ViViTConfig

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "is_model",
    "load_checkpoint",
    "read_state_dict",
    "transformers_to_divattn",
    "CheckpointMismatchError",
    "LoadReport",
    "from_transformers",
    "init_from_vit",
    "attention_rollout",
    "save_rollout_png",
    "ViTInitReport",
    "config_from_transformers",
    "VideoModel",
    "VideoModelConfig",
    "TimeSformer",
    "TimeSformerConfig",
    "ViViT",
    "ViViTConfig",
    "STTransformer",
    "STTransformerConfig",
    "st_transformer",
    "timesformer",
    "vivit",
]
