"""The re-sharding steps of divattn.sequence_parallel on 2 and 3 gloo processes: values,
gradients (the backward of each is the other), uneven splits, an empty patch shard, the
cls completion and the shard / gather helpers, against the whole clip in one process."""

import pytest
import torch

from divattn import sequence_parallel as sp

from .ranks import ok

# (T, N, B, C): uneven T and N over 2 and 3 ranks, and N = 2 < 3 (one rank holds no patch)
SHAPES = [(8, 25, 2, 5), (7, 4, 1, 3), (3, 2, 2, 4)]


def _clip(T, N, B, C, has_cls, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, int(has_cls) + N * T, C, generator=g, dtype=torch.float64)


def _patches(x, T, order, has_cls):
    B, L, C = x.shape
    p = x[:, 1:] if has_cls else x
    N = (L - int(has_cls)) // T
    return p.reshape(B, N, T, C).transpose(1, 2) if order == "hwt" else p.reshape(B, T, N, C)


def _switches(rank, world):
    """{case: max abs error} of frames -> patches -> (cumsum over frames) -> frames, forward and backward."""
    out = {}
    for T, N, B, C in SHAPES:
        for order in ("hwt", "thw"):
            for has_cls in (True, False):
                case = f"T{T}-N{N}-B{B}-C{C}-{order}-{'cls' if has_cls else 'nocls'}"
                X = _clip(T, N, B, C, has_cls, seed=T * N)
                W = _clip(T, N, B, C, has_cls, seed=T * N + 1)
                # whole clip, one process
                Xr = X.clone().requires_grad_()
                Y = _patches(Xr, T, order, has_cls).cumsum(1)  # (B, T, N, C): every frame of each patch
                ref = Xr.clone()
                _patches(ref, T, order, has_cls).add_(Y)
                (ref * W).sum().backward()
                # this rank's frames
                shards = sp.FrameShards(None, T)
                x = sp.shard_tokens(X, num_frames=T, order=order, has_cls=has_cls).requires_grad_()
                xp = shards.frames_to_patches(x, order=order, has_cls=has_cls)
                n0 = sum(sp.split_sizes(N, world)[:rank])
                Nr = sp.split_sizes(N, world)[rank]
                want_xp = _patches(X, T, order, has_cls).transpose(0, 1)[:, :, n0:n0 + Nr]
                y = shards.patches_to_frames(xp.cumsum(0), x, residual=True, order=order, has_cls=has_cls)
                w = sp.shard_tokens(W, num_frames=T, order=order, has_cls=has_cls)
                (y * w).sum().backward()
                want_y = sp.shard_tokens(ref.detach(), num_frames=T, order=order, has_cls=has_cls)
                want_g = sp.shard_tokens(Xr.grad, num_frames=T, order=order, has_cls=has_cls)
                s = int(has_cls)
                out[case] = max(float((xp - want_xp).abs().max()) if xp.numel() else 0.0,
                                float((y - want_y).abs().max()),
                                float((x.grad[:, s:] - want_g[:, s:]).abs().max()),
                                float((x.grad[:, :s] - w[:, :s]).abs().max()) if s else 0.0)
                out[case + "-xp-shape"] = tuple(xp.shape) == (T, B, Nr, C)
    return out


def _exact(results, P):
    """Every rank's checks hold: True, or an error within float64 round-off."""
    for rank, errs in enumerate(ok(results)):
        bad = {k: v for k, v in errs.items() if v is not True and (v is False or v > 1e-12)}
        assert not bad, f"P={P} rank {rank}: {bad}"


@pytest.mark.parametrize("P", [2, 3])
def test_switches_forward_and_backward_match_the_whole_clip(ranks, P):
    _exact(ranks(P).run(_switches), P)


def _cls_and_helpers(rank, world):
    out = {}
    T, N, B, C = 8, 5, 2, 3
    shards = sp.FrameShards(None, T)
    # complete_cls: each rank's row is the mean over its frames; the result is the mean over all
    per_frame = torch.randn(B, T, C, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = torch.randn(B, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pf = per_frame.clone().requires_grad_()
    (pf.mean(1) * weight).sum().backward()
    mine = per_frame[:, shards.start:shards.stop].clone().requires_grad_()
    x = torch.zeros(B, 1 + N, C, dtype=torch.float64)
    x = x + torch.cat([mine.mean(1, keepdim=True), torch.zeros(B, N, C, dtype=torch.float64)], 1)
    y = shards.complete_cls(x)
    (y[:, 0] * weight).sum().backward()
    out["cls value"] = float((y[:, 0] - per_frame.mean(1)).abs().max())
    # the mean convention: the group's mean of the per-rank gradients is the whole clip's
    g = sp.gather_frames(mine.grad, num_frames=T, dim=1) / world
    out["cls grad"] = float((g - pf.grad).abs().max())
    # all_reduce: a sum over frames
    s = shards.all_reduce(mine.sum(1))
    out["all_reduce"] = float((s - per_frame.sum(1)).abs().max())
    # shard / gather a clip and a token buffer
    video = torch.randn(B, 3, T, 4, 4, generator=torch.Generator().manual_seed(2))
    part = sp.shard_frames(video)
    out["shard marked"] = sp.shard_of(part) == (rank, world, T)
    out["gather_frames"] = float((sp.gather_frames(part, num_frames=T) - video).abs().max())
    for order in ("hwt", "thw"):
        tok = _clip(T, N, B, C, True, seed=3)
        back = sp.gather_tokens(sp.shard_tokens(tok, num_frames=T, order=order, has_cls=True), num_frames=T,
                                order=order, has_cls=True)
        out[f"gather_tokens {order}"] = float((back - tok).abs().max())
    return out


@pytest.mark.parametrize("P", [2, 3])
def test_cls_completion_all_reduce_and_helpers(ranks, P):
    _exact(ranks(P).run(_cls_and_helpers), P)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 196, 197])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_split_sizes_are_balanced_and_empty_only_when_they_must_be(n, parts):
    sizes = sp.split_sizes(n, parts)
    assert sum(sizes) == n and len(sizes) == parts
    assert max(sizes) - min(sizes) <= 1
    assert list(sizes) == sorted(sizes, reverse=True)
    assert (min(sizes) == 0) == (n < parts)
