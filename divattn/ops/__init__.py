"""Divided space-time attention ops and their backends."""

from .api import joint_attention, spatial_attention, spatial_attention_tokens, temporal_attention
from .dispatch import BACKENDS, BackendError
from .layout import split_qkv, tokens_major

__all__ = [
    "temporal_attention",
    "spatial_attention",
    "spatial_attention_tokens",
    "joint_attention",
    "split_qkv",
    "tokens_major",
    "BACKENDS",
    "BackendError",
]
