"""``swap_attention``: run the attention of models users already have on the divattn ops.

One generic walker over ``named_children`` and a small per-architecture table
(:data:`RULES`). A matching module is replaced on its parent by a module that
subclasses its class, holds the *same* submodules (so the same Parameter objects and the
same state-dict keys) and computes the same function with the divattn ops; library
classes and globals are never patched. Modules that already run on divattn (the bundled
models, divattn layers, modules swapped before) only get their backend set.

- transformers ``TimesformerLayer`` with ``divided_space_time`` becomes
  :class:`~divattn.swap_transformers.TimesformerDividedLayer`: fused temporal + spatial
  attention on views of the qkv projections, no rearranges;
- transformers ``TimesformerSelfAttention`` (joint / space_only layers) becomes
  :class:`~divattn.swap_transformers.TimesformerJointSelfAttention`;
- transformers ``VivitAttention`` becomes :class:`~divattn.swap_transformers.VivitJointAttention`.

What a swapped model does differently is listed in :mod:`divattn.swap_transformers`
and in the README ("What swapping changes").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .layers.attention import Attention
from .layers.divided import DividedSpaceTimeAttention


def _from_transformers(class_name: str) -> Callable[[nn.Module], bool]:
    def matches(m: nn.Module) -> bool:
        return type(m).__name__ == class_name and type(m).__module__.startswith("transformers.")

    return matches


def _divided_layer(m: nn.Module) -> bool:
    return _from_transformers("TimesformerLayer")(m) and m.attention_type == "divided_space_time"


def _vivit_attention(m: nn.Module) -> bool:
    # transformers < 5 nests query/key/value in a VivitSelfAttention instead; not swapped.
    return _from_transformers("VivitAttention")(m) and hasattr(m, "q_proj")


def _replacement(class_name: str) -> Callable[[nn.Module, Optional[str]], nn.Module]:
    def replace(module: nn.Module, backend: Optional[str]) -> nn.Module:
        from . import swap_transformers  # imports transformers: only when a transformers model is swapped

        return getattr(swap_transformers, class_name)(module, backend)

    return replace


@dataclass(frozen=True)
class Rule:
    """One row of the table: which modules, and what they become."""

    name: str
    matches: Callable[[nn.Module], bool]
    replace: Callable[[nn.Module, Optional[str]], nn.Module]


RULES = (
    Rule("transformers TimesformerLayer (divided_space_time)", _divided_layer, _replacement("TimesformerDividedLayer")),
    Rule("transformers TimesformerSelfAttention", _from_transformers("TimesformerSelfAttention"),
         _replacement("TimesformerJointSelfAttention")),
    Rule("transformers VivitAttention (q/k/v/o projections)", _vivit_attention, _replacement("VivitJointAttention")),
)


def _on_divattn(m: nn.Module) -> bool:
    from .layers.blocks import Block, FactorisedDotProductBlock, FactorisedSelfAttentionBlock
    from .models.base import VideoModel

    return getattr(m, "divattn_swapped", False) or isinstance(
        m, (VideoModel, DividedSpaceTimeAttention, Block, FactorisedSelfAttentionBlock, FactorisedDotProductBlock,
            Attention))


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

    A swapped module runs the replaced module's own code for a call the ops cannot
    compute exactly: ``output_attentions``, attention dropout in training, a Vivit
    ``attention_mask`` (see :mod:`divattn.swap_transformers`).
    """
    if backend is not None:
        from .models.base import check_backend

        check_backend(backend)
    if _on_divattn(model):
        return _set_backend(model, backend)
    count = _walk(model, backend)
    if count == 0:
        warnings.warn(f"swap_attention: found no attention to swap in {type(model).__name__} (known: "
                      + ", ".join(r.name for r in RULES) + ", and divattn models / layers)", stacklevel=2)
    return count


def _walk(module: nn.Module, backend: Optional[str]) -> int:
    count = 0
    for name, child in module.named_children():
        if _on_divattn(child):
            count += _set_backend(child, backend)
            continue
        rule = next((r for r in RULES if r.matches(child)), None)
        if rule is None:
            count += _walk(child, backend)
        else:
            setattr(module, name, rule.replace(child, backend))
            count += 1
    return count
