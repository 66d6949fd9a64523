"""What :func:`divattn.swap_attention` puts in place of ``transformers`` attention modules.

Each replacement subclasses the ``transformers`` class it replaces and holds that
module's own submodules, so the weights, state-dict keys, ``isinstance`` checks,
output capturing, gradient checkpointing (``GradientCheckpointingLayer``,
``every_n_layers``, ``use_reentrant``) and ``save_pretrained`` / ``from_pretrained`` are
the original's. It runs the divattn ops when they compute exactly what the original
computes, and the original's own code for a call that needs what the ops do not have:

- ``output_attentions``: the probabilities, on the eager path for that call (as
  ``transformers`` does for SDPA), also when the model is configured for SDPA;
- attention dropout in training (``attention_probs_dropout_prob > 0``): the original,
  with a one-time warning (in eval the dropout is off and the ops run);
- a Vivit ``attention_mask``: the original, with a one-time warning.

Imported by :mod:`divattn.swap` only when a ``transformers`` model is swapped.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from transformers.models.timesformer.modeling_timesformer import TimesformerLayer, TimesformerSelfAttention
from transformers.models.vivit.modeling_vivit import VivitAttention, eager_attention_forward

from .layers.attention import Attention
from .layers.divided import DividedSpaceTimeAttention
from .ops import joint_attention

_WARNED: set = set()


def _warn_once(kind: str, message: str) -> None:
    if kind not in _WARNED:
        _WARNED.add(kind)
        warnings.warn(message, stacklevel=4)


def _dropout_warning(cls: type, p: float) -> None:
    _warn_once(f"dropout-{cls.__name__}", f"{cls.__name__}: attention dropout {p} in training runs on the "
               "transformers eager path (the divattn ops have no dropout on attention probabilities); "
               "evaluation runs on the ops")


def _attention_view(hf_attention: nn.Module, dim: int, num_heads: int, qkv_bias: bool) -> Attention:
    """A divattn :class:`Attention` whose ``qkv`` / ``proj`` are a transformers ``TimeSformerAttention``'s."""
    with torch.device("meta"):
        attn = Attention(dim, num_heads, qkv_bias)
    attn.qkv = hf_attention.attention.qkv
    attn.proj = hf_attention.output.dense
    attn.proj_drop = hf_attention.output.dropout
    attn.scale = hf_attention.attention.scale
    return attn


def _adopt(new: nn.Module, old: nn.Module) -> None:
    """Initialise ``new`` as a bare Module holding ``old``'s submodules in order, with its
    training mode and gradient-checkpointing state."""
    nn.Module.__init__(new)
    new.training = old.training
    for name, child in old.named_children():  # in order, so that state-dict keys keep theirs
        setattr(new, name, child)
    for name in ("gradient_checkpointing", "_gradient_checkpointing_func"):
        if name in old.__dict__:
            setattr(new, name, old.__dict__[name])


class TimesformerDividedLayer(TimesformerLayer):
    """A ``TimesformerLayer`` with ``attention_type="divided_space_time"`` on the fused ops:
    :class:`~divattn.layers.DividedSpaceTimeAttention` reads the layer's own submodules,
    q/k/v as views of its qkv projections (no rearranges)."""

    divattn_swapped = True

    def __init__(self, layer: TimesformerLayer, backend: Optional[str] = None):
        _adopt(self, layer)
        self.config = layer.config
        self.attention_type = layer.attention_type
        cfg = layer.config
        dim, heads = cfg.hidden_size, cfg.num_attention_heads
        with torch.device("meta"):
            divided = DividedSpaceTimeAttention(dim, heads, cfg.num_frames, token_order="hwt", backend=backend)
        divided.temporal_norm1 = self.temporal_layernorm
        divided.temporal_attn = _attention_view(self.temporal_attention, dim, heads, cfg.qkv_bias)
        divided.temporal_fc = self.temporal_dense
        divided.norm1 = self.layernorm_before
        divided.attn = _attention_view(self.attention, dim, heads, cfg.qkv_bias)
        divided.drop_path = self.drop_path
        # Kept out of the module tree: it only re-reads submodules registered above.
        self.__dict__["divided"] = divided

    @property
    def backend(self) -> Optional[str]:
        return self.divided.backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self.divided.backend = value

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        p = self.config.attention_probs_dropout_prob
        if output_attentions or (self.training and p > 0):
            if not output_attentions:
                _dropout_warning(TimesformerLayer, p)
            return super().forward(hidden_states, output_attentions)
        x = self.divided(hidden_states)
        return (x + self.drop_path(self.output(self.intermediate(self.layernorm_after(x)))),)


class TimesformerJointSelfAttention(TimesformerSelfAttention):
    """A ``TimesformerSelfAttention`` (joint and space-only layers) on
    :func:`divattn.joint_attention`, with the same ``qkv`` Linear."""

    divattn_swapped = True

    def __init__(self, module: TimesformerSelfAttention, backend: Optional[str] = None):
        _adopt(self, module)
        self.num_heads = module.num_heads
        self.scale = module.scale
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        p = self.attn_drop.p
        if output_attentions or (self.training and p > 0):
            if not output_attentions:
                _dropout_warning(TimesformerSelfAttention, p)
            return super().forward(hidden_states, output_attentions)
        B, L, C = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(B, L, 3, self.num_heads, C // self.num_heads).unbind(2)
        return (joint_attention(q, k, v, scale=self.scale, backend=self.backend).view(B, L, C),)


class VivitJointAttention(VivitAttention):
    """A ``VivitAttention`` on :func:`divattn.joint_attention`, with the same ``q_proj``,
    ``k_proj``, ``v_proj`` and ``o_proj``; q/k/v are views of the projections' outputs."""

    divattn_swapped = True

    def __init__(self, module: VivitAttention, backend: Optional[str] = None):
        _adopt(self, module)
        self.config = module.config
        self.num_attention_heads = module.num_attention_heads
        self.head_dim = module.head_dim
        self.attention_dropout = module.attention_dropout
        self.scaling = module.scaling
        self.is_causal = module.is_causal
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
            return self._eager(hidden_states, attention_mask)
        if attention_mask is not None or (self.training and self.attention_dropout > 0):
            if attention_mask is not None:
                _warn_once("vivit-mask", "VivitJointAttention: a call with an attention_mask runs on the "
                           "transformers attention it replaced (an attention_mask masks scores; the divattn "
                           "ops take a token mask)")
            else:
                _dropout_warning(VivitAttention, self.attention_dropout)
            return super().forward(hidden_states, attention_mask, **kwargs)
        B, L, _ = hidden_states.shape
        q, k, v = (p(hidden_states).view(B, L, self.num_attention_heads, self.head_dim)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = joint_attention(q, k, v, scale=self.scaling, backend=self.backend)
        return self.o_proj(o.reshape(B, L, -1)), None

    def _eager(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        """The original forward on transformers' eager attention, which returns the probabilities."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # an SDPA-style mask: True attends
            attention_mask = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attention_mask, torch.finfo(q.dtype).min)
        o, weights = eager_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling,
                                             dropout=self.attention_dropout if self.training else 0.0)
        return self.o_proj(o.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights
