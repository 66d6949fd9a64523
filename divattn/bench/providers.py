"""Who computes the attention: divattn's backends and what users would otherwise run.

Every provider starts from the same input, the packed qkv projection output
``(B, [1 +] T*N, 3, H, D)`` in the shape's token order, and returns what the output
projection reads next: ``(B, L_out, H*D)`` tokens in q's token order (spatial with cls:
the mean cls output first, then the patches). Whatever layout work a provider needs to
get there is part of its time. A ``causal`` shape's temporal attention lets frame t see
frames ``<= t``, as each provider spells it: ``causal=True``, a mask, ``is_causal=True``.

Providers are data (:data:`PROVIDERS`): a name, the ops served, a function that says
why the provider cannot run here (or None), and a builder. The model pass uses the
bundled models with the divattn backend named in :data:`MODEL_BACKENDS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops as divattn_ops
from ..ops import dispatch
from ..shapes import AttnShape


class Unavailable(Exception):
    """A provider cannot run this case here; the message says why."""


@dataclass(frozen=True)
class Provider:
    """``reason(op, pass_, device, dtype, shape)`` is None when the provider can run, else
    a sentence; ``build(op, shape, device)`` returns ``fn(qkv) -> out``. ``ours``: a failure
    is a divattn bug (the suite fails) rather than a recorded limitation of someone else's
    code. ``compiles``: the first call compiles (kept out of the timing)."""

    name: str
    description: str
    ops: tuple
    reason: Callable
    build: Callable
    ours: bool = False
    compiles: bool = False

    def why_not(self, op: str, pass_: str, device: torch.device, dtype: torch.dtype,
                shape: AttnShape) -> Optional[str]:
        if op not in self.ops:
            return f"{self.name} does not compute {op} attention"
        return self.reason(op, pass_, device, dtype, shape)


def _views(qkv: torch.Tensor, shape: AttnShape):
    """q, k, v ``(B, T, N, H, D)`` views of the patch tokens, and the cls ``(B, H, D)`` views."""
    out = divattn_ops.split_qkv(qkv, shape.T, shape.N, order=shape.order, has_cls=shape.cls)
    return (out[0], out[1], out[2], out[3] if shape.cls else None)


def _to_tokens(o: torch.Tensor, shape: AttnShape) -> torch.Tensor:
    """``(B, T, N, H, D)`` (any strides) -> ``(B, T*N, H*D)`` tokens in the shape's order (a copy)."""
    B, T, N, H, D = o.shape
    x = o.transpose(1, 2) if shape.order == "hwt" else o
    return x.reshape(B, T * N, H * D)


def _with_cls(o_cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """``cat([o_cls, patches])`` along tokens: ``(B, H, D)`` + ``(B, T*N, H*D)``."""
    return torch.cat([o_cls.reshape(o_cls.shape[0], 1, -1), patches], 1)


# divattn ---------------------------------------------------------------------------

def _divattn_reason(backend: str):
    def reason(op, pass_, device, dtype, shape):
        if device.type == "cpu" and dispatch.BACKENDS[backend].cpu_needs_interpreter:
            return ("on a CPU the Triton kernels run only in the Triton interpreter (TRITON_INTERPRET=1), "
                    "a correctness tool, not a speed: not timed")
        why = dispatch.BACKENDS[backend].not_supported_reasons(op, dtype, device, shape.D)
        if why:
            return f"divattn backend {backend!r} cannot run here: " + "; ".join(why)
        return None
    return reason


def _divattn_build(backend: str):
    def build(op, shape, device):
        def fn(qkv):
            if op == "joint":
                q, k, v = qkv.unbind(2)
                return divattn_ops.joint_attention(q, k, v, backend=backend).flatten(2)
            q, k, v, cls = _views(qkv, shape)
            if op == "temporal":
                o = divattn_ops.temporal_attention(q, k, v, causal=shape.causal, backend=backend)
                return divattn_ops.tokens_major(o)
            if op == "spatial":
                return divattn_ops.tokens_major(divattn_ops.spatial_attention(q, k, v, backend=backend))
            return divattn_ops.spatial_attention_tokens(q, k, v, cls, backend=backend).flatten(2)
        return fn
    return build


# The official code: rearrange + eager attention ------------------------------------

def _eager(qkv_rows: torch.Tensor, scale: float, causal: bool = False) -> torch.Tensor:
    """The official ``Attention.forward`` core on ``(B', L, 3, H, D)`` rows -> ``(B', L, H*D)``
    (``causal``: scores above the diagonal masked to -inf before the softmax)."""
    Bp, L, _, H, D = qkv_rows.shape
    q, k, v = qkv_rows.permute(2, 0, 3, 1, 4)
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    attn = s.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(Bp, L, H * D)


def _reference_build(op, shape, device):
    """facebookresearch/TimeSformer ``Block.forward``'s attention, on the qkv rows: the
    ``rearrange`` calls are reshapes/permutes (copies where the order changes), the cls
    token is repeated per frame and concatenated, the cls outputs averaged and concatenated
    back."""
    scale = shape.D ** -0.5
    B, T, N, H, D, c = shape.B, shape.T, shape.N, shape.H, shape.D, int(shape.cls)

    def fn(qkv):
        if op == "joint":
            return _eager(qkv, scale)
        patches = qkv[:, c:]
        # 'b (h w t) m -> b t (h w) m' (or the identity for (t h w) tokens)
        if shape.order == "hwt":
            frames = patches.reshape(B, N, T, 3, H, D).transpose(1, 2)
        else:
            frames = patches.reshape(B, T, N, 3, H, D)
        if op == "temporal":
            # '-> (b h w) t m'
            rows = frames.transpose(1, 2).reshape(B * N, T, 3, H, D)
            o = _eager(rows, scale, shape.causal).reshape(B, N, T, H * D)
            return (o if shape.order == "hwt" else o.transpose(1, 2)).reshape(B, T * N, H * D)
        # '-> (b t) (h w) m'
        rows = frames.reshape(B * T, N, 3, H, D)
        if op == "spatial_cls":
            cls = qkv[:, :1].repeat(1, T, 1, 1, 1).reshape(B * T, 1, 3, H, D)
            rows = torch.cat([cls, rows], 1)
        o = _eager(rows, scale)
        if op == "spatial_cls":
            o_cls, o = o[:, 0].reshape(B, T, H * D).mean(1, keepdim=True), o[:, 1:]
        o = o.reshape(B, T, N, H * D)
        o = (o.transpose(1, 2) if shape.order == "hwt" else o).reshape(B, T * N, H * D)
        return torch.cat([o_cls, o], 1) if op == "spatial_cls" else o
    return fn


# permute().contiguous() + F.scaled_dot_product_attention ---------------------------

SDPA_BACKENDS = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}


def _sdpa_kernel(kind: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[kind])])


@functools.lru_cache(maxsize=None)
def _sdpa_probe(kind: str, backward: bool, device_type: str, dtype: torch.dtype, D: int) -> Optional[str]:
    """Why this SDPA backend cannot run a small ``(1, 2, 64, D)`` attention here, or None."""
    try:
        x = torch.randn(1, 2, 64, D, device=device_type, dtype=dtype, requires_grad=backward)
        with _sdpa_kernel(kind):
            o = F.scaled_dot_product_attention(x, x, x)
            if backward:
                o.sum().backward()
    except Exception as e:  # each SDPA backend refuses in its own words
        what = "forward + backward" if backward else "forward"
        return f"SDPA backend {kind!r} cannot run the {what} for {dtype} on {device_type}: {_short(e)}"
    return None


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _sdpa_reason(kind: str):
    def reason(op, pass_, device, dtype, shape):
        return _sdpa_probe(kind, pass_ != "fwd", device.type, dtype, shape.D)
    return reason


def _sdpa_build(kind: str):
    def build(op, shape, device):
        B, T, N, H, D = shape.B, shape.T, shape.N, shape.H, shape.D

        def attend(q, k, v, causal=False):
            with _sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def fn(qkv):
            if op == "joint":
                q, k, v = (x.transpose(1, 2).contiguous() for x in qkv.unbind(2))
                return attend(q, k, v).transpose(1, 2).reshape(B, shape.tokens, H * D)
            q, k, v, cls = _views(qkv, shape)
            if op == "temporal":
                # (B, T, N, H, D) -> (B*N, H, T, D)
                q, k, v = (x.permute(0, 2, 3, 1, 4).contiguous().view(B * N, H, T, D) for x in (q, k, v))
                o = attend(q, k, v, shape.causal).view(B, N, H, T, D).permute(0, 3, 1, 2, 4)
                return _to_tokens(o, shape)
            # (B, T, N, H, D) -> (B*T, H, N, D)
            q, k, v = (x.permute(0, 1, 3, 2, 4).contiguous() for x in (q, k, v))
            if op == "spatial_cls":
                q, k, v = (torch.cat([c[:, None, :, None].expand(B, T, H, 1, D), x], 3) for c, x in zip(cls, (q, k, v)))
            Lk = q.shape[3]
            o = attend(*(x.view(B * T, H, Lk, D) for x in (q, k, v))).view(B, T, H, Lk, D)
            if op == "spatial":
                return _to_tokens(o.transpose(2, 3), shape)
            return _with_cls(o[:, :, :, 0].mean(1), _to_tokens(o[:, :, :, 1:].transpose(2, 3), shape))
        return fn
    return build


# FlexAttention with a block mask ---------------------------------------------------

@functools.lru_cache(maxsize=None)
def _compile_probe(backward: bool, device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Why ``torch.compile(flex_attention)`` does not work here, or None."""
    try:
        x = torch.randn(1, 1, 128, 16, device=device_type, dtype=dtype, requires_grad=backward)
        o = _compiled_flex()(x, x, x)
        if backward:
            o.sum().backward()
    except Exception as e:  # a missing compiler, an unsupported dtype, no backward on this device, ...
        what = "forward + backward" if backward else "forward"
        return f"torch.compile(flex_attention) cannot run the {what} for {dtype} on {device_type}: {_short(e)}"
    return None


def _flex_reason(op, pass_, device, dtype, shape):
    if op == "spatial_cls":
        return ("the cls query's T per-frame softmaxes, averaged over frames, are not one masked attention: "
                "FlexAttention cannot express the official cls semantics")
    return _compile_probe(pass_ != "fwd", device.type, dtype)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _group_mask(op: str, shape: AttnShape):
    """mask_mod over the patch tokens: same patch (temporal; causal: and a key frame no
    later than the query's) or same frame (spatial)."""
    T, N = shape.T, shape.N
    if op == "temporal" and shape.causal:
        if shape.order == "hwt":
            def mask(b, h, q_idx, kv_idx):
                return (q_idx // T == kv_idx // T) & (kv_idx <= q_idx)
        else:
            def mask(b, h, q_idx, kv_idx):
                return (q_idx % N == kv_idx % N) & (kv_idx <= q_idx)
        return mask
    if (op == "temporal") == (shape.order == "hwt"):
        div = T if shape.order == "hwt" else N

        def mask(b, h, q_idx, kv_idx):
            return q_idx // div == kv_idx // div
    else:
        mod = T if shape.order == "hwt" else N

        def mask(b, h, q_idx, kv_idx):
            return q_idx % mod == kv_idx % mod
    return mask


def _flex_build(op, shape, device):
    """flex_attention over the token sequence, reading q/k/v as ``(B, H, L, D)`` views of the
    qkv (no permute copies); temporal and spatial attention are block masks over it."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, H, D, c = shape.B, shape.H, shape.D, int(shape.cls)
    flex = _compiled_flex()
    if op == "joint":
        block_mask, start = None, 0
    else:
        L = shape.T * shape.N
        block_mask, start = create_block_mask(_group_mask(op, shape), None, None, L, L, device=device.type), c

    def fn(qkv):
        q, k, v = (x.transpose(1, 2) for x in qkv[:, start:].unbind(2))
        o = flex(q, k, v, block_mask=block_mask)
        return o.transpose(1, 2).reshape(B, q.shape[2], H * D)
    return fn


def _no_reason(op, pass_, device, dtype, shape):
    return None


ALL_OPS = ("temporal", "spatial", "spatial_cls", "joint")

PROVIDERS = {
    p.name: p for p in [
        Provider("divattn-triton", "divattn fused Triton kernels (strided views, no copies)", ALL_OPS,
                 _divattn_reason("triton"), _divattn_build("triton"), ours=True),
        Provider("divattn-cuda", "divattn CUDA C++ extension", ALL_OPS,
                 _divattn_reason("cuda"), _divattn_build("cuda"), ours=True),
        Provider("divattn-torch", "divattn pure-PyTorch reference ops (fp32 softmax; the CPU path)", ALL_OPS,
                 _divattn_reason("torch"), _divattn_build("torch"), ours=True),
        Provider("reference", "official TimeSformer code: rearrange copies + eager softmax attention", ALL_OPS,
                 _no_reason, _reference_build),
        *[Provider(f"sdpa-{kind}", f"permute().contiguous() + F.scaled_dot_product_attention ({kind} backend)",
                   ALL_OPS, _sdpa_reason(kind), _sdpa_build(kind)) for kind in SDPA_BACKENDS],
        Provider("flex", "torch.compile(flex_attention) with a block mask over the token sequence", ALL_OPS,
                 _flex_reason, _flex_build, compiles=True),
    ]
}

# The whole-model pass runs the bundled models; a provider is the divattn backend they use.
MODEL_BACKENDS = {"divattn-triton": "triton", "divattn-cuda": "cuda", "divattn-torch": "torch"}


def model_reason(provider: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why the bundled models cannot run on ``provider`` here, or None."""
    if provider not in MODEL_BACKENDS:
        return f"{provider} is not a backend of the bundled models (whole-model rows: {', '.join(MODEL_BACKENDS)})"
    backend = MODEL_BACKENDS[provider]
    return _divattn_reason(backend)("spatial_cls", "fwd+bwd", device, dtype, AttnShape("", 1, 1, 1, 1, head_dim))


def select(names=None) -> list:
    """Providers by name (all of them when ``names`` is None); ValueError for an unknown name."""
    if names is None:
        return list(PROVIDERS.values())
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}")
    return [PROVIDERS[n] for n in names]
