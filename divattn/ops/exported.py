"""The op that exported programs hold: ``divattn::attention``, one custom op for every backend.

While ``torch.export`` traces a model (``torch.compiler.is_exporting()``; also under
``torch.onnx.export(..., dynamo=True)``), the public ops call :func:`attention` instead
of their backend: the exported graph then holds one ``divattn::attention`` node per
attention, with the backend's name as an argument, whatever that backend is. Its fake
implementation gives the output's shape, so no backend code (and none of its
shape-dependent Python) runs while tracing and dynamic batch and frame counts stay
symbolic. Run eagerly (``ExportedProgram.module()``) or from an AOTInductor package,
the op calls the named backend, so a package built on a GPU runs the fused kernels
(``triton``, ``cuda``) and one built on a CPU the ``torch`` backend. The ONNX exporter
translates it with :func:`divattn.export.onnx_translations`.

The op returns the token buffer the public op's output is a view of: ``(B, [1 +] T*N,
H, D)`` token-major in ``order`` (``"hwt"`` or ``"thw"``, q's token order, fixed at
trace time: ONNX values have no strides to tell it), with the mean cls output as token
0 for spatial attention with cls; ``(B, L, H, D)`` for joint attention. It is an
inference op: its backward raises (train the model itself, eager or ``torch.compile``d).
The kernel backends' own ops (``divattn::attn_fwd`` / ``attn_bwd``) do not appear in
exported programs; ``divattn::attention`` calls them when it runs.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dispatch import BACKENDS, Backend
from .layout import is_hwt, patch_view


def _never() -> bool:
    return False


# True while torch.export traces (torch < 2.5 has no torch.compiler.is_exporting: never then)
exporting = getattr(torch.compiler, "is_exporting", _never)


def order_of(q: torch.Tensor) -> str:
    """q's token order: ``"hwt"`` or ``"thw"`` (the same layout when T or N is 1)."""
    return "hwt" if is_hwt(q) else "thw"


@torch.library.custom_op("divattn::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_cls: Optional[torch.Tensor],
              k_cls: Optional[torch.Tensor], v_cls: Optional[torch.Tensor], op: str, order: str, scale: float,
              causal: bool, backend: str) -> torch.Tensor:
    """``op`` (``"temporal"``, ``"spatial"``, ``"joint"``) on ``backend``; the cls q, k, v are
    None or ``(B, H, D)`` each (spatial only). Returns the token buffer (module docstring)."""
    be = BACKENDS[backend]
    if op == "joint":
        return be.joint(q, k, v, scale).contiguous()
    if order != order_of(q):
        raise ValueError(f"divattn::attention: q has strides {q.stride()} for shape {tuple(q.shape)}, which is "
                         f"{order_of(q)!r} token order; the exported graph was traced with {order!r}")
    if op == "temporal":
        o = be.temporal(q, k, v, scale, causal)
    elif q_cls is not None:
        return be.spatial(q, k, v, scale, (q_cls, k_cls, v_cls)).contiguous()
    else:
        o = be.spatial(q, k, v, scale, None)
    B, T, N, H, D = o.shape
    tokens = o.transpose(1, 2) if order == "hwt" else o
    return tokens.reshape(B, T * N, H, D).contiguous()


@attention.register_fake
def _(q, k, v, q_cls, k_cls, v_cls, op, order, scale, causal, backend):
    if op == "joint":
        return q.new_empty(q.shape)
    B, T, N, H, D = q.shape
    return q.new_empty((B, int(q_cls is not None) + T * N, H, D))


def _no_backward(ctx, grad):
    raise RuntimeError("divattn::attention is the inference op of exported programs and has no backward: train the "
                       "model itself (eager or torch.compile) and export it for inference")


torch.library.register_autograd("divattn::attention", _no_backward)


class Exported:
    """A backend's ops as :func:`attention` calls, for ``torch.export`` to keep: what the
    public ops run instead of the backend :func:`divattn.ops.dispatch.select` chose while a
    model is exported."""

    def __init__(self, backend: Backend):
        self.name = backend.name

    def temporal(self, q, k, v, scale: float, causal: bool) -> torch.Tensor:
        buf = attention(q, k, v, None, None, None, "temporal", order_of(q), scale, causal, self.name)
        return patch_view(buf, q, has_cls=False)

    def spatial(self, q, k, v, scale: float, cls) -> torch.Tensor:
        buf = attention(q, k, v, *(cls or (None, None, None)), "spatial", order_of(q), scale, False, self.name)
        return buf if cls else patch_view(buf, q, has_cls=False)

    def joint(self, q, k, v, scale: float) -> torch.Tensor:
        return attention(q, k, v, None, None, None, "joint", "thw", scale, False, self.name)


_EXPORTED: dict = {}


def exported(backend: Backend) -> Exported:
    """``backend``'s ops as :func:`attention` calls (one :class:`Exported` per backend name)."""
    out = _EXPORTED.get(backend.name)
    if out is None:
        out = _EXPORTED[backend.name] = Exported(backend)
    return out
