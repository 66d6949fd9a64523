"""The reference path is the official TimeSformer block, pinned against its literal code."""

import torch

import divattn
from divattn.ops import spatial_attention_tokens, split_qkv, tokens_major

from ..official import attention, divided_block_attention, layer_norm

import torch.nn.functional as F


def _params(C, gen):
    p = {}
    for prefix in ("temporal_attn", "attn"):
        p[f"{prefix}.qkv.weight"] = torch.randn(3 * C, C, generator=gen, dtype=torch.float64) * C ** -0.5
        p[f"{prefix}.qkv.bias"] = torch.randn(3 * C, generator=gen, dtype=torch.float64) * 0.1
        p[f"{prefix}.proj.weight"] = torch.randn(C, C, generator=gen, dtype=torch.float64) * C ** -0.5
        p[f"{prefix}.proj.bias"] = torch.randn(C, generator=gen, dtype=torch.float64) * 0.1
    for name in ("temporal_norm1", "norm1"):
        p[f"{name}.weight"] = 1 + 0.1 * torch.randn(C, generator=gen, dtype=torch.float64)
        p[f"{name}.bias"] = 0.1 * torch.randn(C, generator=gen, dtype=torch.float64)
    p["temporal_fc.weight"] = torch.randn(C, C, generator=gen, dtype=torch.float64) * C ** -0.5
    p["temporal_fc.bias"] = torch.randn(C, generator=gen, dtype=torch.float64) * 0.1
    return p


def _block_with_reference_ops(x, p, T, H):
    """The same block written on the divattn ops (backend="torch"), tokens never rearranged."""
    B, L, C = x.shape
    N = (L - 1) // T
    qkv = F.linear(layer_norm(x, p, "temporal_norm1"), p["temporal_attn.qkv.weight"], p["temporal_attn.qkv.bias"])
    q, k, v, _ = split_qkv(qkv.view(B, L, 3, H, C // H), T, N, order="hwt", has_cls=True)
    o = tokens_major(divattn.temporal_attention(q, k, v, backend="torch"))
    res_t = F.linear(F.linear(o, p["temporal_attn.proj.weight"], p["temporal_attn.proj.bias"]),
                     p["temporal_fc.weight"], p["temporal_fc.bias"])
    x = torch.cat([x[:, :1], x[:, 1:] + res_t], 1)
    qkv = F.linear(layer_norm(x, p, "norm1"), p["attn.qkv.weight"], p["attn.qkv.bias"])
    q, k, v, cls = split_qkv(qkv.view(B, L, 3, H, C // H), T, N, order="hwt", has_cls=True)
    toks = spatial_attention_tokens(q, k, v, cls, backend="torch").view(B, L, C)
    return x + F.linear(toks, p["attn.proj.weight"], p["attn.proj.bias"])


def test_reference_ops_reproduce_the_official_block():
    gen = torch.Generator().manual_seed(0)
    for B, T, N, H, C in [(2, 8, 9, 3, 48), (1, 3, 49, 2, 32), (2, 1, 4, 1, 16)]:
        x = torch.randn(B, 1 + N * T, C, generator=gen, dtype=torch.float64)
        p = _params(C, gen)
        want = divided_block_attention(x, p, T, H)
        got = _block_with_reference_ops(x, p, T, H)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_official_attention_helper_is_plain_attention():
    """Guard the restatement itself: its Attention equals SDPA on the same projections."""
    gen = torch.Generator().manual_seed(1)
    p = _params(16, gen)
    x = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    q, k, v = F.linear(x, p["attn.qkv.weight"], p["attn.qkv.bias"]).view(2, 5, 3, 2, 8).unbind(2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    want = F.linear(o.transpose(1, 2).reshape(2, 5, 16), p["attn.proj.weight"], p["attn.proj.bias"])
    torch.testing.assert_close(attention(x, p, "attn", 2), want)
