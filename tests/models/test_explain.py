import struct
import zlib

import pytest
import torch

import divattn
from divattn.models.explain import _spatial_matrix, _temporal_matrix, attention_rollout, save_rollout_png

from .helpers import randomize, tiny, video


def test_divided_matrices_reproduce_the_ops():
    """(1+N*T)-square matrices built from the attention probabilities, applied to the
    tokens' values, give what temporal / spatial(+cls) attention computes."""
    B, T, N, D = 2, 3, 5, 4
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, 1 + N * T, 3, 1, D, generator=g, dtype=torch.float64)
    q, k, v, cls = divattn.split_qkv(qkv, T, N, order="hwt", has_cls=True)
    values = qkv[:, :, 2, 0]  # (B, L, D)
    # temporal: (B, N, T, T) probabilities
    pt = (torch.einsum("btnd,bsnd->bnts", q[..., 0, :], k[..., 0, :]) * D ** -0.5).softmax(-1)
    o = divattn.temporal_attention(q, k, v, backend="torch")
    torch.testing.assert_close((_temporal_matrix(pt) @ values)[:, 1:], divattn.tokens_major(o))
    # spatial: (B, T, 1+N, 1+N) probabilities over [cls] + frame t
    qq = torch.cat([cls[0][:, None, None].expand(B, T, 1, 1, D), q], 2)[..., 0, :]
    kk = torch.cat([cls[1][:, None, None].expand(B, T, 1, 1, D), k], 2)[..., 0, :]
    ps = (qq @ kk.transpose(-1, -2) * D ** -0.5).softmax(-1)
    out = divattn.ops.spatial_attention_tokens(q, k, v, cls, backend="torch")
    torch.testing.assert_close(_spatial_matrix(ps) @ values, out.view(B, 1 + N * T, D))


@pytest.mark.parametrize("backend", ["torch", None], ids=["torch", "default"])
@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time", "space_only"])
def test_timesformer_attention_maps(attention_type, backend):
    m = randomize(tiny("timesformer_base", attention_type=attention_type, num_frames=4, backend=backend))
    x = video(T=4)
    maps = m.attention_maps(x)
    assert len(maps) == 2
    expected = {"divided_space_time": {"temporal": (2, 16, 2, 4, 4), "spatial": (2, 4, 2, 17, 17)},
                "joint_space_time": {"joint": (2, 2, 65, 65)},
                "space_only": {"spatial": (2, 4, 2, 17, 17)}}[attention_type]
    for layer in maps:
        assert {k: tuple(v.shape) for k, v in layer.items()} == expected
        for v in layer.values():
            torch.testing.assert_close(v.sum(-1), torch.ones(v.shape[:-1]))
    if attention_type == "divided_space_time":
        blk, x0 = m.blocks[0], m.embed(x)
        xt = x0[:, 1:].reshape(2 * 16, 4, 64)
        q, k, _ = blk.temporal_attn.qkv(blk.temporal_norm1(xt)).view(32, 4, 3, 2, 32).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-1, -2)) * blk.temporal_attn.scale).softmax(-1).view(2, 16, 2, 4, 4)
        torch.testing.assert_close(maps[0]["temporal"], probs)


@pytest.mark.parametrize("variant", ["factorised_encoder", "factorised_self_attention", "factorised_dot_product"])
def test_vivit_attention_maps(variant):
    depth = 1 if variant == "factorised_encoder" else None
    m = randomize(tiny("vivit_base", variant=variant, num_frames=4, depth=1, temporal_depth=depth))
    shapes = [{k: tuple(v.shape) for k, v in layer.items()} for layer in m.attention_maps(video(T=4))]
    assert shapes == {
        "factorised_encoder": [{"spatial": (2, 2, 2, 17, 17)}, {"temporal": (2, 2, 3, 3)}],
        "factorised_self_attention": [{"spatial": (2, 2, 2, 16, 16), "temporal": (2, 16, 2, 2, 2)}],
        "factorised_dot_product": [{"spatial": (2, 2, 1, 16, 16), "temporal": (2, 16, 1, 2, 2)}],
    }[variant]


@pytest.mark.parametrize("name,kw,frames", [
    ("timesformer_base", dict(attention_type="divided_space_time"), 4),
    ("timesformer_base", dict(attention_type="joint_space_time"), 4),
    ("vivit_base", dict(variant="spatio_temporal"), 2),
])
def test_rollout(name, kw, frames):
    m = randomize(tiny(name, num_frames=4, **kw), seed=5)
    rel = attention_rollout(m, video(T=4))
    assert rel.shape == (2, frames, 4, 4)
    assert torch.allclose(rel.flatten(1).amax(1), torch.ones(2)) and torch.allclose(rel.flatten(1).amin(1), torch.zeros(2))


def test_rollout_refuses_unsupported_models():
    with pytest.raises(ValueError, match="attention_rollout: supports"):
        attention_rollout(tiny("vivit_base", variant="factorised_dot_product", num_frames=4), video(T=4))


def read_png(path):
    """(width, height, raw pixel rows) of an 8-bit RGB PNG, checking every chunk's CRC."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert list(chunks)[-1] == b"IEND"
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2)
    return width, height, zlib.decompress(chunks[b"IDAT"])


@pytest.mark.parametrize("name,kw,frames", [
    ("timesformer_base", dict(attention_type="divided_space_time"), 4),
    ("vivit_base", dict(variant="spatio_temporal"), 2),
])
def test_rollout_png_is_a_valid_image_of_the_clip_size(tmp_path, name, kw, frames):
    m = randomize(tiny(name, num_frames=4, **kw), seed=5)
    path = save_rollout_png(m, video(T=4), tmp_path / "rollout.png", sample=1)
    width, height, raw = read_png(path)
    assert (width, height) == (frames * 32, 32)
    assert len(raw) == height * (1 + 3 * width)
    pixels = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(height, 1 + 3 * width)
    assert (pixels[:, 0] == 0).all() and pixels[:, 1:].float().std() > 10
