"""Tiny configs and an independent re-implementation of the official TimeSformer forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from divattn.models import create_model

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_frames=8, num_classes=4)


def tiny(name: str, **kw):
    """A tiny bundled model in eval mode on the reference backend (explicit, since the
    test session runs the Triton interpreter and auto-dispatch would pick it)."""
    torch.manual_seed(0)
    return create_model(name, **{**TINY, "backend": "torch", **kw}).eval()


def randomize(model, seed: int = 0):
    """Give every parameter (zero-initialised ones included) random values, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def video(B: int = 2, T: int = 8, size: int = 32, seed: int = 0, C: int = 3) -> torch.Tensor:
    return torch.randn(B, C, T, size, size, generator=torch.Generator().manual_seed(seed))


def _mhsa(attn, x):
    """Official ``Attention.forward``: eager softmax attention over dim 1 of ``x``."""
    B, L, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, L, 3, H, C // H).permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(B, L, C))


def _official_block(blk, x, B, T, W, attention_type):
    """The official ``Block.forward(x, B, T, W)`` with einops rearranges spelled out."""
    if attention_type != "divided_space_time":
        x = x + _mhsa(blk.attn, blk.norm1(x))
        return x + blk.mlp(blk.norm2(x))
    C = x.shape[-1]
    N = (x.shape[1] - 1) // T
    # temporal: 'b (h w t) m -> (b h w) t m'
    xt = x[:, 1:].reshape(B * N, T, C)
    res_t = _mhsa(blk.temporal_attn, blk.temporal_norm1(xt)).reshape(B, N * T, C)
    xt = x[:, 1:] + blk.temporal_fc(res_t)
    # spatial: 'b (h w t) m -> (b t) (h w) m', cls repeated per frame
    init_cls = x[:, :1]
    cls = init_cls.repeat(1, T, 1).reshape(B * T, 1, C)
    xs = xt.reshape(B, N, T, C).permute(0, 2, 1, 3).reshape(B * T, N, C)
    res_s = _mhsa(blk.attn, blk.norm1(torch.cat([cls, xs], 1)))
    cls = res_s[:, 0].reshape(B, T, C).mean(1, keepdim=True)
    res_s = res_s[:, 1:].reshape(B, T, N, C).permute(0, 2, 1, 3).reshape(B, N * T, C)
    x = torch.cat([init_cls, xt], 1) + torch.cat([cls, res_s], 1)
    return x + blk.mlp(blk.norm2(x))


def official_timesformer(model, video):
    """Logits of the official ``VisionTransformer.forward`` computed with ``model``'s parameters.

    Position / time embeddings are resized with nearest interpolation when the clip's
    size differs from the model's, as the official code does at run time.
    """
    c = model.config
    B, C, T, Hpx, Wpx = video.shape
    x = model.patch_embed.proj(video.permute(0, 2, 1, 3, 4).reshape(B * T, C, Hpx, Wpx))
    W = x.size(-1)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(x.size(0), -1, -1), x], 1)
    pos = model.pos_embed
    if x.size(1) != pos.size(1):
        other = pos[0, 1:].unsqueeze(0).transpose(1, 2)
        P = int(other.size(2) ** 0.5)
        other = F.interpolate(other.reshape(1, x.size(2), P, P), size=(x.size(1) // W, W), mode="nearest")
        pos = torch.cat([pos[:, :1], other.flatten(2).transpose(1, 2)], 1)
    x = x + pos
    if c.attention_type != "space_only":
        cls = x[:B, 0].unsqueeze(1)
        N, D = x.shape[1] - 1, x.shape[2]
        x = x[:, 1:].reshape(B, T, N, D).permute(0, 2, 1, 3).reshape(B * N, T, D)
        time = model.time_embed
        if T != time.size(1):
            time = F.interpolate(time.transpose(1, 2), size=T, mode="nearest").transpose(1, 2)
        x = (x + time).reshape(B, N * T, D)
        x = torch.cat([cls, x], 1)
    for blk in model.blocks:
        x = _official_block(blk, x, B, T, W, c.attention_type)
    if c.attention_type == "space_only":
        x = x.reshape(B, T, *x.shape[1:]).mean(1)
    return model.head(model.norm(x)[:, 0])


def _gelu_tanh_mlp(blk, x):
    return blk.mlp.fc2(F.gelu(blk.mlp.fc1(x), approximate="tanh"))


def _vit_layer(blk, x):
    x = x + _mhsa(blk.attn, blk.norm1(x))
    return x + _gelu_tanh_mlp(blk, blk.norm2(x))


def _dot_product_layer(blk, x, B, T, N):
    """Model 4 written out: heads split in two halves, the halves concatenated, projected."""
    C = x.shape[-1]
    H = blk.attn.num_heads
    h, D = H // 2, C // H
    q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(B, T, N, 3, H, D).permute(3, 0, 4, 1, 2, 5)  # (B, H, T, N, D)
    sp = ((q[:, :h] @ k[:, :h].transpose(-1, -2)) * blk.attn.scale).softmax(-1) @ v[:, :h]
    qt, kt, vt = (t[:, h:].transpose(2, 3) for t in (q, k, v))  # (B, h, N, T, D)
    tp = (((qt @ kt.transpose(-1, -2)) * blk.attn.scale).softmax(-1) @ vt).transpose(2, 3)
    o = torch.cat([sp, tp], 1).permute(0, 2, 3, 1, 4).reshape(B, T * N, C)
    x = x + blk.attn.proj(o)
    return x + _gelu_tanh_mlp(blk, blk.norm2(x))


def reference_vivit(model, video):
    """Logits of ``model`` (a bundled ViViT, clip of the config's size) computed with eager,
    copy-heavy code that follows the paper's description of each variant."""
    c = model.config
    g = model.patch_embed.proj(video)  # (B, C, T, h, w)
    B, C, T = g.shape[:3]
    x = g.flatten(2).transpose(1, 2)  # (B, T*N, C), (t h w)
    N = x.shape[1] // T
    if c.variant == "spatio_temporal":
        x = torch.cat([model.cls_token.expand(B, -1, -1), x], 1) + model.pos_embed
        for blk in model.blocks:
            x = _vit_layer(blk, x)
        return model.head(model.norm(x)[:, 0])
    if c.variant == "factorised_encoder":
        x = x.reshape(B * T, N, C)
        x = torch.cat([model.cls_token.expand(B * T, -1, -1), x], 1) + model.pos_embed
        for blk in model.blocks:
            x = _vit_layer(blk, x)
        x = model.spatial_norm(x)[:, 0].reshape(B, T, C)
        x = torch.cat([model.temporal_cls_token.expand(B, -1, -1), x], 1) + model.temporal_pos_embed
        for blk in model.temporal_blocks:
            x = _vit_layer(blk, x)
        return model.head(model.norm(x)[:, 0])
    x = x + model.pos_embed
    for blk in model.blocks:
        if c.variant == "factorised_dot_product":
            x = _dot_product_layer(blk, x, B, T, N)
            continue
        s = x.reshape(B * T, N, C)
        s = s + _mhsa(blk.attn, blk.norm1(s))
        t = s.reshape(B, T, N, C).transpose(1, 2).reshape(B * N, T, C)
        t = t + _mhsa(blk.temporal_attn, blk.temporal_norm1(t))
        x = t.reshape(B, N, T, C).transpose(1, 2).reshape(B, T * N, C)
        x = x + _gelu_tanh_mlp(blk, blk.norm2(x))
    return model.head(model.norm(x).mean(1))
