"""What the frame-sharded divided block costs, counted at TimeSformer-B width (C = 768, 12
heads) on a 32-frame clip of 49 patches, on 2 and 3 gloo processes: the bytes each rank
hands to the collectives equal the formula of divattn.sequence_parallel (forward and
backward), a Ulysses-style composition of the same block sends about 4x as much, and the
tensors each rank saves for the backward are at most 1.1/P of one process's on the whole
clip."""

import copy

import pytest
import torch

from divattn import sequence_parallel as sp
from divattn.bench.seqpar import SavedBytes, ulysses_divided_block
from divattn.layers.blocks import DividedBlock

from .ranks import ok

B, T, N, C, HEADS = 1, 32, 49, 768, 12


def _costs(rank, world):
    torch.manual_seed(0)
    block = DividedBlock(C, HEADS, T, qkv_bias=True, backend="torch")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1 + N * T, C, generator=g)
    w = torch.randn(B, 1 + N * T, C, generator=g)
    with SavedBytes(block.parameters()) as whole:
        ref = block(x.requires_grad_())
    del ref

    shards = sp.FrameShards(None, T)
    block.num_frames = shards.local_frames
    xs = sp.shard_tokens(x.detach(), num_frames=T, order="hwt", has_cls=True)
    ws = sp.shard_tokens(w, num_frames=T, order="hwt", has_cls=True)
    ulysses = copy.deepcopy(block)
    block.sequence = shards
    with sp.count_communication() as comm, SavedBytes(block.parameters()) as saved:
        out = block(xs.requires_grad_())
        saved_total = saved.total  # before the backward frees them
        (out * ws).sum().backward()
    with sp.count_communication() as comm_u:
        out_u = ulysses_divided_block(ulysses, xs.detach().requires_grad_(), shards)
        (out_u * ws).sum().backward()
    return {"sent": comm.sent, "calls": comm.calls, "formula": sp.divided_block_bytes(B, T, N, C, world, rank),
            "ulysses": comm_u.total, "saved": saved_total, "saved whole clip": whole.total,
            "ulysses output": float((out_u - out).detach().abs().max() / out.detach().abs().max())}


@pytest.mark.parametrize("P", [2, 3])
def test_bytes_sent_and_activations_saved_per_rank(ranks, P):
    for rank, got in enumerate(ok(ranks(P).run(_costs, deadline_s=300))):
        assert got["sent"] == got["formula"], f"rank {rank}"
        # two all-to-alls and the cls all-reduce, forward and backward
        assert got["calls"] == {"all_to_all_single": 4, "all_reduce": 2}
        assert got["ulysses output"] < 1e-5
        ratio = got["ulysses"] / sum(got["sent"].values())
        assert 3.5 < ratio < 4.1, ratio
        assert got["saved"] <= 1.1 / P * got["saved whole clip"], (got["saved"], got["saved whole clip"])
