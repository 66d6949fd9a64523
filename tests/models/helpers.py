"""Tiny configs and independent re-implementations of the official TimeSformer and ViViT forwards."""

from __future__ import annotations

import math

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
    """Model 4 written out: heads split in two halves (the first over time, the second over
    space, as the official code assigns them), the halves concatenated, projected."""
    C = x.shape[-1]
    H = blk.attn.num_heads
    h, D = H // 2, C // H
    q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(B, T, N, 3, H, D).permute(3, 0, 4, 1, 2, 5)  # (B, H, T, N, D)
    sp = ((q[:, h:] @ k[:, h:].transpose(-1, -2)) * blk.attn.scale).softmax(-1) @ v[:, h:]
    qt, kt, vt = (t[:, :h].transpose(2, 3) for t in (q, k, v))  # (B, h, N, T, D)
    tp = (((qt @ kt.transpose(-1, -2)) * blk.attn.scale).softmax(-1) @ vt).transpose(2, 3)
    o = torch.cat([tp, sp], 1).permute(0, 2, 3, 1, 4).reshape(B, T * N, C)
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


# ViViT as scenic (google-research/scenic, projects/vivit/model.py and model_utils.py)
# computes it, restated line by line in torch on a bundled ViViT's parameters. Flax
# names in the comments; arrays are channels-last as there.


def _flax_dot_product_attention(query, key, value):
    """``flax.linen.dot_product_attention``: ``(batch..., L, heads, D)``, attention over L."""
    query = query / math.sqrt(query.shape[-1])
    weights = torch.einsum("...qhd,...khd->...hqk", query, key).softmax(-1)
    return torch.einsum("...hqk,...khd->...qhd", weights, value)


def scenic_factorized_dot_product_attention(query, key, value):
    """scenic ``model_utils.factorized_dot_product_attention`` on ``(bs, t, hw, heads, c)``:
    the heads are split into as many groups as there are attention axes (2), in order;
    group ``i`` attends over axis ``i + 1`` (1: time, 2: space), the groups' outputs are
    concatenated on the head axis."""
    query = query / math.sqrt(query.shape[-1])
    prefix_str = "abcdefghijk"
    num_attn_dimensions = query.dim() - 3
    queries = torch.chunk(query, num_attn_dimensions, dim=-2)
    keys = torch.chunk(key, num_attn_dimensions, dim=-2)
    values = torch.chunk(value, num_attn_dimensions, dim=-2)
    outputs = []
    for i, (q, k, v) in enumerate(zip(queries, keys, values)):
        axis = i + 1
        batch_dims = prefix_str[:axis]
        attn_logits = torch.einsum(f"{batch_dims}x...z,{batch_dims}y...z->{batch_dims}x...y", q, k)
        attn_weights = attn_logits.softmax(-1)
        outputs.append(torch.einsum(f"{batch_dims}x...y,{batch_dims}y...z->{batch_dims}x...z", attn_weights, v))
    return torch.cat(outputs, dim=-2)


def _flax_mha(attn, x, attention_fn=_flax_dot_product_attention):
    """``nn.MultiHeadDotProductAttention`` with ``attn``'s parameters: query / key / value
    ``DenseGeneral`` to ``(..., heads, D)``, ``attention_fn``, ``out`` over ``(heads, D)``."""
    H = attn.num_heads
    C = x.shape[-1]
    q, k, v = (t.reshape(*x.shape[:-1], H, C // H) for t in attn.qkv(x).chunk(3, -1))
    return attn.proj(attention_fn(q, k, v).reshape(*x.shape[:-1], C))


def _flax_mlp(mlp, x):
    """``attention_layers.MlpBlock`` (``nn.gelu``: the tanh approximation)."""
    return mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))


def scenic_encoder_block(blk, inputs, attention_fn=_flax_dot_product_attention):
    """``EncoderBlock``: LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0."""
    x = blk.norm1(inputs)
    x = _flax_mha(blk.attn, x, attention_fn)
    x = x + inputs
    y = blk.norm2(x)
    y = _flax_mlp(blk.mlp, y)
    return y + x


def _reshape_to_1d_factorized(x, axis):
    batch_size, height, width, channel = x.shape
    if axis == 1:
        return x.transpose(1, 2).reshape(batch_size * width, height, channel)
    return x.reshape(batch_size * height, width, channel)


def _reshape_to_2d_factorized(x, axis, two_d_shape):
    batch_size, height, width, channel = two_d_shape
    if axis == 1:
        return x.reshape(batch_size, width, height, channel).transpose(1, 2)
    return x.reshape(two_d_shape)


def _scenic_factorized_self_attention_block(blk, inputs, temporal_dims, attention_order):
    """``EncoderFactorizedSelfAttentionBlock``: axis 1 (time) uses LayerNorm_time /
    MultiHeadDotProductAttention_time, axis 2 (space) the ``_space`` ones."""
    b, thw, d = inputs.shape
    inputs = inputs.reshape(b, temporal_dims, thw // temporal_dims, d)
    attention_axes = {"time_space": (1, 2), "space_time": (2, 1)}[attention_order]
    modules = {1: (blk.temporal_norm1, blk.temporal_attn), 2: (blk.norm1, blk.attn)}
    x = inputs
    two_d_shape = inputs.shape
    for axis in attention_axes:
        norm, attn = modules[axis]
        y = _reshape_to_1d_factorized(x, axis)
        z = _flax_mha(attn, norm(y)) + y
        x = _reshape_to_2d_factorized(z, axis, two_d_shape)
    x = x.reshape(b, thw, d)
    return x + _flax_mlp(blk.mlp, blk.norm2(x))


def _scenic_pool(x, classifier):
    if classifier == "token":
        return x[:, 0]
    fn = {"gap": torch.mean, "gmp": torch.amax, "gsp": torch.sum}[classifier]
    return fn(x, dim=tuple(range(1, x.dim() - 1)))


def _scenic_head(model, x):
    """``pre_logits`` (Dense + tanh when representation_size is set), ``output_projection``."""
    if model.config.representation_size is not None:
        x = torch.tanh(model.pre_logits.fc(x))
    return model.head(x)


def scenic_vivit(model, video):
    """Logits of scenic's ``ViViT`` / ``SpaceTimeViViT`` (3d_conv tubelets, eval mode) with the
    parameters of ``model``, a bundled ViViT (clip of the config's size).

    The config maps to scenic's: variant -> ``attention_config.type``, classifier,
    representation_size, attention_order, temporal_{depth,num_heads,mlp_dim} ->
    ``temporal_transformer.{num_layers,num_heads,mlp_dim}``.
    """
    c = model.config
    x = model.patch_embed.proj(video).permute(0, 2, 3, 4, 1)  # nn.Conv 'embedding': (n, t, h, w, c)
    n, t, h, w, ch = x.shape
    if c.variant == "factorised_encoder":
        x = x.reshape(n, t, h * w, ch)

        def vit_body(x, cls, pos, blocks, norm):
            if c.classifier == "token":
                x = torch.cat([cls.expand(x.shape[0], 1, ch), x], 1)
            x = x + pos  # posembed_input
            for blk in blocks:
                x = scenic_encoder_block(blk, x)
            return _scenic_pool(norm(x), c.classifier)  # encoder_norm

        frames = torch.stack([vit_body(x[:, i], getattr(model, "cls_token", None), model.pos_embed, model.blocks,
                                       model.spatial_norm) for i in range(t)], 1)  # vmap over time
        x = vit_body(frames, getattr(model, "temporal_cls_token", None), model.temporal_pos_embed,
                     model.temporal_blocks, model.norm)
        return _scenic_head(model, x)
    x = x.reshape(n, t * h * w, ch)
    if c.classifier == "token":
        x = torch.cat([model.cls_token.expand(n, 1, ch), x], 1)
    x = x + model.pos_embed
    if c.variant == "factorised_dot_product":
        b, thw, d = x.shape
        x = x.reshape(b, t, thw // t, d)
    for blk in model.blocks:
        if c.variant == "factorised_self_attention":
            x = _scenic_factorized_self_attention_block(blk, x, t, c.attention_order)
        elif c.variant == "factorised_dot_product":
            x = scenic_encoder_block(blk, x, scenic_factorized_dot_product_attention)
        else:
            x = scenic_encoder_block(blk, x)
    if c.variant == "factorised_dot_product":
        x = x.reshape(b, thw, d)
    x = model.norm(x)
    return _scenic_head(model, _scenic_pool(x, c.classifier))


def flax_params(model):
    """``model``'s (a bundled ViViT) parameters as the scenic parameter tree of numpy arrays
    (Flax layouts: Dense ``(in, out)``, attention ``(in, heads, head_dim)`` / ``(heads,
    head_dim, out)``, Conv ``(t, h, w, in, out)``), written independently of the loader."""
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def dense(prefix):
        return {"kernel": sd[prefix + ".weight"].T.copy(), "bias": sd[prefix + ".bias"]}

    def norm(prefix):
        return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}

    def mha(prefix, heads):
        C = sd[prefix + ".proj.weight"].shape[0]
        w, b = sd[prefix + ".qkv.weight"], sd[prefix + ".qkv.bias"]
        out = {name: {"kernel": w[i * C:(i + 1) * C].T.reshape(C, heads, C // heads).copy(),
                      "bias": b[i * C:(i + 1) * C].reshape(heads, C // heads)}
               for i, name in enumerate(("query", "key", "value"))}
        out["out"] = {"kernel": sd[prefix + ".proj.weight"].T.reshape(heads, C // heads, C).copy(),
                      "bias": sd[prefix + ".proj.bias"]}
        return out

    def block(prefix, heads):
        mlp = {"Dense_0": dense(prefix + ".mlp.fc1"), "Dense_1": dense(prefix + ".mlp.fc2")}
        if c.variant == "factorised_self_attention":
            return {"LayerNorm_space": norm(prefix + ".norm1"),
                    "MultiHeadDotProductAttention_space": mha(prefix + ".attn", heads),
                    "LayerNorm_time": norm(prefix + ".temporal_norm1"),
                    "MultiHeadDotProductAttention_time": mha(prefix + ".temporal_attn", heads),
                    "LayerNorm_mlp": norm(prefix + ".norm2"), "MlpBlock": mlp}
        return {"LayerNorm_0": norm(prefix + ".norm1"), "MultiHeadDotProductAttention_0": mha(prefix + ".attn", heads),
                "LayerNorm_1": norm(prefix + ".norm2"), "MlpBlock_0": mlp}

    def encoder(blocks, depth, heads, pos, final_norm):
        tree = {f"encoderblock_{i}": block(f"{blocks}.{i}", heads) for i in range(depth)}
        tree["posembed_input"] = {"pos_embedding": sd[pos]}
        tree["encoder_norm"] = norm(final_norm)
        return tree

    conv = sd["patch_embed.proj.weight"]
    params = {"embedding": {"kernel": conv.transpose(2, 3, 4, 1, 0).copy(), "bias": sd["patch_embed.proj.bias"]}}
    if c.variant == "factorised_encoder":
        params["SpatialTransformer"] = encoder("blocks", c.depth, c.num_heads, "pos_embed", "spatial_norm")
        params["TemporalTransformer"] = encoder("temporal_blocks", c.temporal_depth, c.temporal_num_heads,
                                                "temporal_pos_embed", "norm")
        if c.classifier == "token":
            params["cls_SpatialTransformer"] = sd["cls_token"]
            params["cls_TemporalTransformer"] = sd["temporal_cls_token"]
    else:
        params["Transformer"] = encoder("blocks", c.depth, c.num_heads, "pos_embed", "norm")
        if c.classifier == "token":
            params["cls"] = sd["cls_token"]
    if c.representation_size is not None:
        params["pre_logits"] = dense("pre_logits.fc")
    if c.num_classes:
        params["output_projection"] = dense("head")
    return params


def to_numpy_tree(tree):
    """A tree read by ``divattn.models.scenic.read_flax_msgpack`` with numpy leaves, as Flax
    restores it (arrays, numpy scalars for ext type 3)."""
    import numpy as np

    from divattn.models.scenic import FlaxArray

    if isinstance(tree, dict):
        return {k: to_numpy_tree(v) for k, v in tree.items()}
    if isinstance(tree, FlaxArray):
        arr = np.frombuffer(tree.data, dtype=np.dtype(tree.dtype)).reshape(tree.shape)
        return arr[()] if tree.scalar else arr
    return tree


def flax_msgpack_bytes(tree) -> bytes:
    """``flax.serialization.to_bytes(tree)`` (what ``flax.training.checkpoints.save_checkpoint``
    writes) restated with msgpack alone, for trees of dicts with numpy array / numpy scalar /
    complex / plain leaves and no array over 1 GiB: arrays are ext type 1, numpy scalars ext
    type 3, each a msgpack-packed ``(shape, dtype name, C-order bytes)``; complex numbers ext
    type 2 ``(real, imag)``; dict keys in their order (``msgpack_serialize`` sorts them)."""
    import msgpack
    import numpy as np

    def ext(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
        if isinstance(x, np.generic):
            a = np.asarray(x)
            return msgpack.ExtType(3, msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True))
        if isinstance(x, complex):
            return msgpack.ExtType(2, msgpack.packb((x.real, x.imag)))
        raise TypeError(f"cannot serialize a {type(x).__name__}")

    return msgpack.packb(tree, default=ext, strict_types=True)
