"""Linear layers that recompute their elementwise-cheap input in the backward.

``memory="min"`` (:data:`MEMORY_MODES`) trades a few elementwise FLOPs for activation
memory: a Linear normally saves its input for the weight gradient, so a LayerNorm
followed by a Linear keeps the normalised tokens, and GELU followed by ``fc2`` keeps
the activations (4C values per token). Here the pair is one autograd node that saves
what the backward needs anyway (the LayerNorm's input and statistics; ``fc1``'s output)
and recomputes the rest, bitwise as the forward computed it:

- :func:`norm_linear` ``linear(norm(x))``: saves ``x``, the mean and 1/std (one value
  per token each); recomputes ``norm(x)`` (about 8 FLOPs per value) for the weight
  gradient;
- :func:`gelu_linear` ``linear(gelu(h))``: saves ``h``; recomputes ``gelu(h)`` (about
  10 FLOPs per value);
- :func:`linear_linear` ``second(s * first(o))``, the divided block's temporal output
  projection and ``temporal_fc`` with its stochastic-depth scale ``s``: saves ``o``;
  recomputes ``first(o)``, one ``C x C`` matmul (2C^2 FLOPs per token).

A divided TimeSformer block then saves 15 instead of 23 values of width C per token; the
recomputation adds about 2% to a training step's FLOPs (the block's matmuls are about
34C^2 FLOPs per token forward, twice that backward). ``memory="fast"`` (the default) keeps the plain modules:
on a GPU the recomputation is an extra pass over memory in the backward, the saved
tensor a read.

Under autocast the matmuls run in the dtype autocast chose in the forward, as
``nn.Linear`` does, and the parameters' gradients come back in their own dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MEMORY_MODES = ("fast", "min")


def check_memory(mode: str) -> str:
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {mode!r}")
    return mode


def _linear_backward(dout: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """Gradients of ``F.linear(inp, weight, bias)``: (d_inp, d_weight, d_bias)."""
    w = weight.to(dout.dtype)
    d_inp = dout @ w
    flat_out, flat_in = dout.reshape(-1, dout.shape[-1]), inp.to(dout.dtype).reshape(-1, inp.shape[-1])
    d_weight = (flat_out.t() @ flat_in).to(weight.dtype)
    d_bias = flat_out.sum(0).to(weight.dtype) if has_bias else None
    return d_inp, d_weight, d_bias


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        C = x.shape[-1]
        y, mean, rstd = torch.native_layer_norm(x, (C,), norm_weight, norm_bias, eps)
        out = F.linear(y, weight, bias)
        ctx.eps, ctx.has_bias = eps, bias is not None
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        C = x.shape[-1]
        y = torch.native_layer_norm(x, (C,), norm_weight, norm_bias, ctx.eps)[0]
        dy, d_weight, d_bias = _linear_backward(dout, y, weight, ctx.has_bias)
        dx, d_nw, d_nb = torch.ops.aten.native_layer_norm_backward(
            dy.to(y.dtype), x, [C], mean, rstd, norm_weight, norm_bias, [True, True, True])
        return dx, d_nw, d_nb, None, d_weight, d_bias


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, approximate, weight, bias):
        g = F.gelu(h, approximate=approximate)
        out = F.linear(g, weight, bias)
        ctx.approximate, ctx.has_bias = approximate, bias is not None
        ctx.save_for_backward(h, weight)
        return out

    @staticmethod
    def backward(ctx, dout):
        h, weight = ctx.saved_tensors
        g = F.gelu(h, approximate=ctx.approximate)
        dg, d_weight, d_bias = _linear_backward(dout, g, weight, ctx.has_bias)
        dh = torch.ops.aten.gelu_backward(dg.to(h.dtype), h, approximate=ctx.approximate)
        return dh, None, d_weight, d_bias


class _LinearLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, w1, b1, w2, b2, scale):
        h = F.linear(o, w1, b1)
        if scale is not None:
            h = h * scale
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.save_for_backward(o, w1, b1, w2, scale)
        return F.linear(h, w2, b2)

    @staticmethod
    def backward(ctx, dout):
        o, w1, b1, w2, scale = ctx.saved_tensors
        h = F.linear(o.to(dout.dtype), w1.to(dout.dtype), None if b1 is None else b1.to(dout.dtype))
        g = h if scale is None else h * scale.to(h.dtype)
        dg, d_w2, d_b2 = _linear_backward(dout, g, w2, ctx.has_b2)
        dh = dg if scale is None else dg * scale.to(dg.dtype)
        do, d_w1, d_b1 = _linear_backward(dh, o, w1, ctx.has_b1)
        return do.to(o.dtype), d_w1, d_b1, d_w2, d_b2, None


def norm_linear(x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
    """``linear(norm(x))`` saving ``x`` and the norm's statistics, not ``norm(x)``."""
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1 or norm.weight is None:
        raise TypeError(f"norm_linear: expected a LayerNorm over the last dim with weights, got {norm}")
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


def gelu_linear(h: torch.Tensor, act: nn.GELU, linear: nn.Linear) -> torch.Tensor:
    """``linear(act(h))`` for a GELU ``act``, saving ``h``, not ``act(h)``."""
    return _GeluLinear.apply(h, act.approximate, linear.weight, linear.bias)


def linear_linear(o: torch.Tensor, first: nn.Linear, second: nn.Linear, scale=None) -> torch.Tensor:
    """``second(scale * first(o))`` saving ``o``, not ``first(o)``; ``scale`` (broadcast over
    ``first(o)``, e.g. a per-sample stochastic-depth factor) or None."""
    return _LinearLinear.apply(o, first.weight, first.bias, second.weight, second.bias, scale)
