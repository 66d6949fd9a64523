"""A literal restatement of the official TimeSformer divided block's attention half.

facebookresearch/TimeSformer ``timesformer/models/vit.py``, ``Block.forward`` with
``attention_type='divided_space_time'``, up to (not including) the MLP; each
``rearrange`` is written out as the reshape/permute it performs. Patch tokens are in
``(h w t)`` order. ``p`` maps the official parameter names to tensors.
"""

import torch
import torch.nn.functional as F


def attention(x, p, prefix, num_heads):
    """The official ``Attention.forward`` (with_qkv=True, no dropout)."""
    B, N, C = x.shape
    qkv = F.linear(x, p[f"{prefix}.qkv.weight"], p.get(f"{prefix}.qkv.bias"))
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (C // num_heads) ** -0.5
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(x, p[f"{prefix}.proj.weight"], p[f"{prefix}.proj.bias"])


def layer_norm(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])


def divided_block_attention(x, p, T, num_heads):
    B, L, m = x.shape
    HW = (L - 1) // T
    # Temporal
    xt = x[:, 1:, :]
    xt = xt.reshape(B * HW, T, m)  # 'b (h w t) m -> (b h w) t m'
    res_temporal = attention(layer_norm(xt, p, "temporal_norm1"), p, "temporal_attn", num_heads)
    res_temporal = res_temporal.reshape(B, HW * T, m)  # '(b h w) t m -> b (h w t) m'
    res_temporal = F.linear(res_temporal, p["temporal_fc.weight"], p["temporal_fc.bias"])
    xt = x[:, 1:, :] + res_temporal
    # Spatial
    init_cls_token = x[:, 0, :].unsqueeze(1)
    cls_token = init_cls_token.repeat(1, T, 1)
    cls_token = cls_token.reshape(B * T, m).unsqueeze(1)  # 'b t m -> (b t) m'
    xs = xt
    xs = xs.reshape(B, HW, T, m).permute(0, 2, 1, 3).reshape(B * T, HW, m)  # 'b (h w t) m -> (b t) (h w) m'
    xs = torch.cat((cls_token, xs), 1)
    res_spatial = attention(layer_norm(xs, p, "norm1"), p, "attn", num_heads)
    # Taking care of CLS token
    cls_token = res_spatial[:, 0, :]
    cls_token = cls_token.reshape(B, T, m)  # '(b t) m -> b t m'
    cls_token = torch.mean(cls_token, 1, True)  # averaging for every frame
    res_spatial = res_spatial[:, 1:, :]
    res_spatial = res_spatial.reshape(B, T, HW, m).permute(0, 2, 1, 3).reshape(B, HW * T, m)  # '(b t) (h w) m -> b (h w t) m'
    res = res_spatial
    x = xt
    return torch.cat((init_cls_token, x), 1) + torch.cat((cls_token, res), 1)
