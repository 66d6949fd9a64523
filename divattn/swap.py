"""``swap_attention``: run the attention of models users already have on the divattn ops.

One generic walker over ``named_children`` and a small per-architecture table. A
matching module is replaced on its parent by a new module that holds the *same*
submodules (so the same Parameter objects and the same state-dict keys) and computes
the same function with the divattn ops; library classes and globals are never
patched. Modules that already run on divattn (the bundled models, divattn layers,
modules swapped before) only get their backend set.

- transformers ``TimesformerLayer`` with ``divided_space_time`` becomes
  :class:`TimesformerDividedLayer`: fused temporal + spatial attention on views of the
  qkv projections, no rearranges;
- transformers ``TimesformerSelfAttention`` (joint / space_only layers) becomes
  :class:`TimesformerJointSelfAttention`;
- transformers ``VivitAttention`` becomes :class:`VivitJointAttention`;
- bundled models, divattn layers and modules swapped before get their backend set.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .layers.attention import Attention
from .layers.divided import DividedSpaceTimeAttention
from .ops import joint_attention

_NO_ATTENTION_MAPS = ("the divattn ops do not materialise attention probabilities; use the eager model, or "
                      "divattn.models.from_transformers(model).attention_maps(video)")


def _attention_view(hf_attention: nn.Module, dim: int, num_heads: int, qkv_bias: bool) -> Attention:
    """A divattn :class:`Attention` whose ``qkv`` / ``proj`` are a transformers ``TimeSformerAttention``'s."""
    with torch.device("meta"):
        attn = Attention(dim, num_heads, qkv_bias)
    attn.qkv = hf_attention.attention.qkv
    attn.proj = hf_attention.output.dense
    attn.proj_drop = hf_attention.output.dropout
    attn.scale = hf_attention.attention.scale
    return attn


class TimesformerDividedLayer(nn.Module):
    """Drop-in for a ``transformers`` ``TimesformerLayer`` with ``attention_type="divided_space_time"``.

    Holds the layer's own submodules under their own names (``layernorm_before``,
    ``attention``, ``temporal_layernorm``, ``temporal_attention``, ``temporal_dense``,
    ``layernorm_after``, ``intermediate``, ``output``, ``drop_path``) and computes the
    layer with :class:`~divattn.layers.DividedSpaceTimeAttention` reading them, so the
    weights, state-dict keys and outputs are the original layer's. Returns
    ``(hidden_states,)`` as the original does; ``output_attentions=True`` raises.
    Honours transformers' gradient checkpointing flags.
    """

    def __init__(self, layer: nn.Module, backend: Optional[str] = None):
        super().__init__()
        for name, child in layer.named_children():  # in the layer's order, so state-dict keys keep theirs
            setattr(self, name, child)
        self.config = layer.config
        self.attention_type = layer.attention_type
        self.gradient_checkpointing = getattr(layer, "gradient_checkpointing", False)
        if hasattr(layer, "_gradient_checkpointing_func"):
            self._gradient_checkpointing_func = layer._gradient_checkpointing_func
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

    def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.divided(hidden_states)
        return x + self.drop_path(self.output(self.intermediate(self.layernorm_after(x))))

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False, **kwargs):
        if output_attentions:
            raise ValueError(f"TimesformerDividedLayer: output_attentions=True: {_NO_ATTENTION_MAPS}")
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return (self._gradient_checkpointing_func(self._forward, hidden_states),)
        return (self._forward(hidden_states),)


class TimesformerJointSelfAttention(nn.Module):
    """Drop-in for ``transformers`` ``TimesformerSelfAttention`` (joint / space_only layers):
    the same ``qkv`` Linear, attention over all tokens by :func:`divattn.joint_attention`."""

    def __init__(self, module: nn.Module, backend: Optional[str] = None):
        super().__init__()
        self.qkv = module.qkv
        self.attn_drop = module.attn_drop
        self.num_heads = module.num_heads
        self.scale = module.scale
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        if output_attentions:
            raise ValueError(f"TimesformerJointSelfAttention: output_attentions=True: {_NO_ATTENTION_MAPS}")
        B, L, C = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(B, L, 3, self.num_heads, C // self.num_heads).unbind(2)
        return (joint_attention(q, k, v, scale=self.scale, backend=self.backend).view(B, L, C),)


class VivitJointAttention(nn.Module):
    """Drop-in for ``transformers`` ``VivitAttention``: the same ``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``; attention by :func:`divattn.joint_attention`. Returns
    ``(output, None)``; an attention mask raises (ViViT never builds one)."""

    def __init__(self, module: nn.Module, backend: Optional[str] = None):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, getattr(module, name))
        self.config = module.config
        self.num_attention_heads = module.num_attention_heads
        self.head_dim = module.head_dim
        self.scaling = module.scaling
        self.attention_dropout = module.attention_dropout
        self.is_causal = False
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if attention_mask is not None:
            raise ValueError("VivitJointAttention: attention masks are not supported by the divattn ops")
        B, L, _ = hidden_states.shape
        q, k, v = (p(hidden_states).view(B, L, self.num_attention_heads, self.head_dim)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = joint_attention(q, k, v, scale=self.scaling, backend=self.backend)
        return self.o_proj(o.reshape(B, L, -1)), None


def _from_transformers(class_name: str) -> Callable[[nn.Module], bool]:
    def matches(m: nn.Module) -> bool:
        return type(m).__name__ == class_name and type(m).__module__.startswith("transformers.")

    return matches


def _divided_layer(m: nn.Module) -> bool:
    return _from_transformers("TimesformerLayer")(m) and m.attention_type == "divided_space_time"


def _vivit_attention(m: nn.Module) -> bool:
    # transformers < 5 nests query/key/value in a VivitSelfAttention instead; not swapped.
    return _from_transformers("VivitAttention")(m) and hasattr(m, "q_proj")


def _timesformer_dropout(m: nn.Module) -> float:
    return float(m.config.attention_probs_dropout_prob)


@dataclass(frozen=True)
class Rule:
    """One row of the table: which modules, what they become, what stops a swap."""

    name: str
    matches: Callable[[nn.Module], bool]
    replace: Callable[[nn.Module, Optional[str]], nn.Module]
    attention_dropout: Callable[[nn.Module], float] = lambda m: 0.0


RULES = (
    Rule("transformers TimesformerLayer (divided_space_time)", _divided_layer, TimesformerDividedLayer,
         _timesformer_dropout),
    Rule("transformers TimesformerSelfAttention", _from_transformers("TimesformerSelfAttention"),
         TimesformerJointSelfAttention, lambda m: float(m.attn_drop.p)),
    Rule("transformers VivitAttention (q/k/v/o projections)", _vivit_attention, VivitJointAttention,
         lambda m: float(m.attention_dropout)),
)


def _on_divattn(m: nn.Module) -> bool:
    from .layers.blocks import Block, FactorisedDotProductBlock, FactorisedSelfAttentionBlock
    from .models.base import VideoModel

    return isinstance(m, (VideoModel, DividedSpaceTimeAttention, Block, FactorisedSelfAttentionBlock,
                          FactorisedDotProductBlock, Attention, TimesformerDividedLayer,
                          TimesformerJointSelfAttention, VivitJointAttention))


def _set_backend(m: nn.Module, backend: Optional[str]) -> int:
    from .models.base import VideoModel

    if isinstance(m, VideoModel):
        return m.set_backend(backend)
    m.backend = backend
    return 1


def swap_attention(model: nn.Module, backend: Optional[str] = None) -> int:
    """Run the attention of ``model`` on the divattn ops, in place; returns how many modules.

    Walks ``model.named_children()`` recursively. ``transformers`` Timesformer layers /
    attentions and Vivit attentions are replaced by modules holding the same
    submodules (same Parameter objects, same state-dict keys); divided Timesformer
    layers get the fused divided attention, which reads q/k/v as views of the qkv
    projections (no rearrange copies). Bundled models and divattn modules, and modules
    swapped by an earlier call, get ``backend`` set. Outputs are unchanged up to
    floating-point rounding.

    Args:
        model: any ``nn.Module``.
        backend: ``None`` (auto), ``"triton"``, ``"cuda"`` or ``"torch"``, for every
            swapped or divattn module.

    Returns:
        The number of attention modules now running on divattn with ``backend``:
        modules replaced plus modules (re)configured. Calling it twice returns the same
        number and changes nothing else. 0, with a warning, when nothing matched.

    Modules whose attention-probability dropout is non-zero are left as they are, with
    a warning (the ops have no such dropout); set it to 0 to swap them.
    """
    if backend is not None:
        from .models.base import check_backend

        check_backend(backend)
    if _on_divattn(model):
        return _set_backend(model, backend)
    count, skipped = _walk(model, backend, "")
    if skipped:
        warnings.warn("swap_attention: left modules with attention dropout > 0 as they are: " + ", ".join(skipped),
                      stacklevel=2)
    if count == 0 and not skipped:
        warnings.warn(f"swap_attention: found no attention to swap in {type(model).__name__} (known: "
                      + ", ".join(r.name for r in RULES) + ", and divattn models / layers)", stacklevel=2)
    return count


def _walk(module: nn.Module, backend: Optional[str], prefix: str):
    count, skipped = 0, []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if _on_divattn(child):
            count += _set_backend(child, backend)
            continue
        rule = next((r for r in RULES if r.matches(child)), None)
        if rule is None:
            n, s = _walk(child, backend, path + ".")
            count, skipped = count + n, skipped + s
        elif rule.attention_dropout(child) > 0:
            skipped.append(path)
        else:
            setattr(module, name, rule.replace(child, backend))
            count += 1
    return count, skipped
