"""The bundled ST transformer: against an eager restatement (outputs and every gradient),
causality of the whole model, frame-by-frame rollout with the key/value caches, and the
Triton kernels (interpreter) against the reference path."""

import copy

import pytest
import torch

from divattn.layers.st import KVCache, STBlock
from divattn.models import STTransformer, create_model, list_models

from .helpers import randomize

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_frames=6, in_chans=3)


def tiny(**kw) -> STTransformer:
    torch.manual_seed(0)
    return randomize(create_model("st_transformer_tiny", **{**TINY, "backend": "torch", **kw}).eval())


def clip(B=2, T=6, size=16, seed=0):
    return torch.randn(B, 3, T, size, size, generator=torch.Generator().manual_seed(seed))


def _mhsa(attn, x, causal=False):
    """Eager softmax attention over dim 1 of ``x`` ``(B', L, C)`` with ``attn``'s parameters."""
    Bp, L, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(Bp, L, 3, H, C // H).permute(2, 0, 3, 1, 4)
    s = (q @ k.transpose(-2, -1)) * attn.scale
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    return attn.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(Bp, L, C))


def eager_forward(model: STTransformer, video: torch.Tensor) -> torch.Tensor:
    """The model restated with copies: every attention runs on a rearranged ``(B', L, C)`` batch."""
    c = model.config
    B, _, T, Hpx, Wpx = video.shape
    p, h, w = c.patch_size, Hpx // c.patch_size, Wpx // c.patch_size
    N = h * w
    # 'b c t (h p) (w q) -> b t (h w) (c p q)', then the conv as a matmul
    patches = video.reshape(B, 3, T, h, p, w, p).permute(0, 2, 3, 5, 1, 4, 6).reshape(B, T, N, 3 * p * p)
    x = patches @ model.patch_embed.proj.weight.reshape(c.embed_dim, -1).T + model.patch_embed.proj.bias
    x = x + model.pos_embed[:, None] + model.time_embed[:, :T, None]
    C = x.shape[-1]
    for blk in model.blocks:
        # spatial: 'b t n c -> (b t) n c'
        xs = x.reshape(B * T, N, C)
        x = x + _mhsa(blk.attn, blk.norm1(xs)).reshape(B, T, N, C)
        # temporal: 'b t n c -> (b n) t c', frame t sees frames <= t
        xt = x.permute(0, 2, 1, 3).reshape(B * N, T, C)
        res = _mhsa(blk.temporal_attn, blk.temporal_norm1(xt), causal=True)
        x = x + res.reshape(B, N, T, C).permute(0, 2, 1, 3)
        x = x + blk.mlp(blk.norm2(x))
    out = model.head(model.norm(x))
    # 'b t (h w) (p q c) -> b c t (h p) (w q)'
    out = out.reshape(B, T, h, w, p, p, 3).permute(0, 6, 1, 2, 4, 3, 5).reshape(B, 3, T, Hpx, Wpx)
    return out + video if c.residual else out


def assert_close_fp32(actual, expected, what=""):
    """``actual`` (fp32) within a few fp32 ulps, relative to ``expected``'s (fp64) scale."""
    expected = expected.to(actual.dtype)
    bound = 2e-5 * expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def test_registered_sizes():
    assert list_models("st_transformer_*") == [
        "st_transformer_base", "st_transformer_large", "st_transformer_small", "st_transformer_tiny"]
    m = create_model("st_transformer_tiny", img_size=32, num_frames=4)
    assert (m.config.embed_dim, m.config.depth, m.config.num_heads) == (192, 12, 3)
    assert m.set_backend("torch") == 12


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "pixels"])
def test_matches_eager_outputs_and_grads(residual):
    model = tiny(residual=residual).train()
    video = clip()
    ref = copy.deepcopy(model).double()
    out = model(video)
    expected = eager_forward(ref, video.double())
    assert_close_fp32(out, expected, "output")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    expected.backward(g.double())
    ref_params = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert_close_fp32(param.grad, ref_params[name].grad, name)


def test_whole_model_is_causal():
    model = tiny()
    video = clip(seed=2)
    out = model(video)
    for t in range(video.shape[2] - 1):
        changed = video.clone()
        changed[:, :, t + 1:] = torch.randn(changed[:, :, t + 1:].shape, generator=torch.Generator().manual_seed(t))
        new = model(changed)
        torch.testing.assert_close(new[:, :, :t + 1], out[:, :, :t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(new[:, :, t + 1:], out[:, :, t + 1:])
    # and no gradient flows from a frame's output to later input frames, some to every earlier one
    video.requires_grad_(True)
    model(video)[:, :, 2].sum().backward()
    assert video.grad[:, :, 3:].abs().max() == 0
    assert (video.grad[:, :, :3].abs().amax((0, 1, 3, 4)) > 0).all()


@pytest.mark.parametrize("pieces", [[1] * 6, [2, 1, 3], [6]], ids=["frame-by-frame", "2-1-3", "whole"])
def test_step_equals_full_causal_forward(pieces):
    model = tiny()
    video = clip(seed=3)
    with torch.no_grad():
        full = model(video)
    cache = model.new_cache()
    outs, t = [], 0
    for n in pieces:
        outs.append(model.step(video[:, :, t:t + n], cache))
        t += n
    assert [len(kv) for kv in cache] == [6, 6]
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-5, atol=1e-5)


def test_generate_rolls_out_the_causal_forward():
    model = tiny()
    context = clip(T=2, seed=4)
    new = model.generate(context, 5)
    assert new.shape == (2, 3, 5, 16, 16)
    with torch.no_grad():
        # every generated frame is the full forward's prediction from all frames before it
        full = model(torch.cat([context, new[:, :, :4]], 2))
    torch.testing.assert_close(new, full[:, :, 1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="time positions"):
        model.generate(context, 6)


def test_cache_appends_without_history_and_grows():
    cache = KVCache(capacity=2)
    qkv = torch.randn(1, 3, 4, 3, 2, 8)
    k, v = cache.append(qkv[:, :1, :, 1:])
    buffer = cache.buffer
    assert buffer.shape[1] == 2 and torch.equal(k, qkv[:, :1, :, 1]) and torch.equal(v, qkv[:, :1, :, 2])
    k, v = cache.append(qkv[:, 1:, :, 1:])  # past the capacity: the buffer grows
    assert cache.buffer is not buffer and len(cache) == 3
    assert torch.equal(k, qkv[:, :, :, 1]) and torch.equal(v, qkv[:, :, :, 2])
    assert k.stride(-1) == 1 and k.data_ptr() == cache.buffer.data_ptr()
    with pytest.raises(ValueError, match="do not fit"):
        cache.append(torch.randn(2, 1, 4, 2, 2, 8))
    cache.reset()
    k, _ = cache.append(torch.randn(2, 1, 4, 2, 2, 8))
    assert k.shape == (2, 1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="no_grad"):
        cache.append(torch.randn(2, 1, 4, 2, 2, 8, requires_grad=True))


def test_block_attention_maps_are_causal():
    blk = STBlock(16, 2, backend="torch")
    maps = blk.attention_maps(torch.randn(1, 4, 3, 16))
    assert maps["spatial"].shape == (1, 4, 2, 3, 3) and maps["temporal"].shape == (1, 3, 2, 4, 4)
    assert maps["temporal"].triu(1).abs().max() == 0
    torch.testing.assert_close(maps["temporal"].sum(-1), torch.ones(1, 3, 2, 4))


def test_bad_configs_and_clips():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("st_transformer_tiny", num_classes=10)
    model = tiny()
    with pytest.raises(ValueError, match="num_frames"):
        model(clip(T=7))
    with pytest.raises(ValueError, match="img_size"):
        model(clip(size=20))
    with pytest.raises(TypeError, match="classifier"):
        model.reset_classifier(3)


def test_triton_matches_torch(kernel_calls):
    model = tiny(img_size=8, depth=1, num_frames=4)
    video = clip(B=1, T=4, size=8, seed=5)

    def outputs_and_grads():
        model.zero_grad()
        out = model(video)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_out, ref_grads = outputs_and_grads()
    assert kernel_calls == []
    assert model.set_backend("triton") == 1
    out, grads = outputs_and_grads()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    assert kernel_calls, "the Triton backend was never called"
    with torch.no_grad():
        cache = model.new_cache()
        stepped = torch.cat([model.step(video[:, :, t:t + 1], cache) for t in range(4)], 2)
    torch.testing.assert_close(stepped, ref_out, rtol=1e-4, atol=1e-5)
