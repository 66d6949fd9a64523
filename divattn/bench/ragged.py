"""The padded-batch benchmark: three ways to attend over clips of different lengths.

A :class:`~divattn.shapes.RaggedShape` is a batch of B clips padded to T frames, sample b
holding ``frames[b]`` real ones. Each provider starts from the packed qkv projection
output of the padded batch, ``(B, T*N, 3, H, D)``, and returns the padded output tokens
``(B, T*N, H*D)`` (padded tokens zero where the provider knows them):

- ``divattn-<backend>-frames``: one call with the per-sample frame counts (``frames=``,
  the cheap form of the mask: no mask tensor is read);
- ``divattn-<backend>-padded``: one call over the whole padded batch, as if every frame
  were real (what a model without masks computes; the padding's results are thrown
  away, and the real tokens' are not those of the clips alone);
- ``divattn-<backend>-one-by-one``: one call per clip on its own frames (views of the
  padded qkv), the outputs padded back into one batch (the loop users write today).

Every provider is counted by the same useful work: the FLOPs of the real (query, key)
pairs (:func:`divattn.flops.attention_flops` with ``frames``) and the bytes of the real
tokens, so a provider that computes the padding shows it as a lower rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import flops as flop_model
from .. import ops as divattn_ops
from ..ops import dispatch
from ..shapes import RaggedShape

BACKENDS = ("triton", "cuda", "torch")
VARIANTS = ("frames", "padded", "one-by-one")


@dataclass(frozen=True)
class RaggedProvider:
    name: str
    backend: str
    variant: str
    ours: bool = True

    def why_not(self, op: str, pass_: str, device: torch.device, dtype: torch.dtype,
                shape: RaggedShape) -> Optional[str]:
        """None when this provider can run here, else why not (the backend's own reasons)."""
        be = dispatch.BACKENDS[self.backend]
        if device.type == "cpu" and be.cpu_needs_interpreter:
            return ("on a CPU the Triton kernels run only in the Triton interpreter (TRITON_INTERPRET=1), "
                    "a correctness tool, not a speed: not timed")
        features = ("counts",) if self.variant == "frames" else ()
        why = be.not_supported_reasons(op, dtype, device, shape.D, features)
        return f"divattn backend {self.backend!r} cannot run here: " + "; ".join(why) if why else None

    def build(self, op: str, shape: RaggedShape, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn(qkv) -> (B, T*N, H*D)`` for ``op`` (``"temporal"`` or ``"spatial"``)."""
        attend = divattn_ops.temporal_attention if op == "temporal" else divattn_ops.spatial_attention
        backend, T, N = self.backend, shape.T, shape.N
        counts = shape.frames()
        frames = torch.tensor(counts)  # on the host: the ops check counts there, with no device sync

        def views(qkv):
            return divattn_ops.split_qkv(qkv, T, N, order=shape.order, has_cls=False)[:3]

        if self.variant == "frames":
            def fn(qkv):
                return divattn_ops.tokens_major(attend(*views(qkv), backend=backend, frames=frames))
        elif self.variant == "padded":
            def fn(qkv):
                return divattn_ops.tokens_major(attend(*views(qkv), backend=backend))
        else:
            def fn(qkv):
                q, k, v = views(qkv)
                outs = []
                for b, t in enumerate(counts):
                    o = attend(q[b:b + 1, :t], k[b:b + 1, :t], v[b:b + 1, :t], backend=backend)
                    outs.append(F.pad(o, (0, 0, 0, 0, 0, 0, 0, T - t)))  # (1, T, N, H, D), zero frames after t
                o = torch.cat(outs)  # (B, T, N, H, D)
                return (o.transpose(1, 2) if shape.order == "hwt" else o).reshape(shape.B, T * N, -1)
        return fn


PROVIDERS = {p.name: p for p in (RaggedProvider(f"divattn-{b}-{v}", b, v) for b in BACKENDS for v in VARIANTS)}


def useful_work(op: str, shape: RaggedShape, pass_: str, itemsize: int) -> tuple:
    """(FLOPs of the real pairs, bytes of the real tokens) of ``op`` on ``shape``."""
    q_shape = shape.q_shape(op)
    frames = torch.tensor(shape.frames())
    n_flops = flop_model.attention_flops(op, q_shape, pass_, frames=frames)
    real = sum(shape.frames()) / (shape.B * shape.T)
    return n_flops, int(round(flop_model.attention_bytes(op, q_shape, itemsize, pass_) * real))
