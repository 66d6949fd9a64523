"""The global-memory traffic of the CUDA kernels, counted by the emulator, against the least a
pass can move, at TimeSformer-B head geometry (B=1, 2 heads, T=8, N=196, D=64, fp16, the
qkv projection's (h w t) layout): within 1.25x forward and 1.5x backward. Also: the
tensor-core kernels run their products on mma, feed them with ldmatrix, copy with cp.async
and have no shared-memory bank conflict in any ldmatrix.

Traffic is counted as the Triton backend's is (divattn.kernels_report.traffic): per block,
the distinct 32-byte sectors it reads and writes, summed over blocks and launches. It is a
model of the traffic, not a measurement on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import divattn
from divattn.flops import attention_bytes
from divattn.ops import cuda_emulator, split_qkv

B, T, N, H, D = 1, 8, 196, 2, 64
LIMIT = {"fwd": 1.25, "bwd": 1.5}
TENSOR_CORE_KERNELS = ("attn_fwd_mma_kernel", "attn_bwd_mma_kernel")


def run_pass(op: str, pass_: str, dtype=torch.float16, frames=None) -> list:
    """The launch records of one pass of ``op`` on the cuda backend (``frames``: the real
    frames of each sample of a padded batch, or None)."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, 1 + N * T, 3, H, D, generator=gen).mul(0.5).to(dtype).requires_grad_()
    q, k, v, cls = split_qkv(qkv, T, N, order="hwt", has_cls=True)
    kw = {} if frames is None else dict(frames=frames)

    def forward():
        if op == "temporal":
            return (divattn.temporal_attention(q, k, v, backend="cuda", **kw),)
        if op == "spatial":
            return (divattn.spatial_attention(q, k, v, backend="cuda", **kw),)
        return divattn.spatial_attention(q, k, v, cls, backend="cuda", **kw)

    if pass_ == "fwd":
        with cuda_emulator.counting() as records:
            forward()
        return records
    outs = forward()
    grads = [torch.randn(o.shape, generator=gen).to(dtype) for o in outs]
    with cuda_emulator.counting() as records:
        torch.autograd.grad(outs, qkv, grads)
    return records


def q_shape(op: str) -> tuple:
    return (B, T, N, H, D)


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("op", ["temporal", "spatial", "spatial_cls"])
def test_traffic_is_near_the_minimum(op, pass_):
    records = run_pass(op, pass_)
    minimum = attention_bytes(op, q_shape(op), 2, pass_)
    moved = sum(r["load_sectors"] + r["store_sectors"] for r in records) * 32
    ratio = moved / minimum
    detail = ", ".join(f"{r['kernel']} {(r['load_sectors'] + r['store_sectors']) * 32 / minimum:.3f}" for r in records)
    assert ratio <= LIMIT[pass_], f"{op} {pass_}: {ratio:.3f}x the minimum ({detail})"
    # every input is read: a global access that bypassed gld() would show as too few loads
    reads = {"fwd": 3, "bwd": 5}[pass_] * minimum / {"fwd": 4, "bwd": 8}[pass_]
    assert sum(r["load_sectors"] for r in records) * 32 >= reads * 0.99, detail


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("op", ["temporal", "spatial_cls"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_tensor_core_kernels_use_mma_ldmatrix_and_cp_async_without_bank_conflicts(op, pass_, dtype):
    records = [r for r in run_pass(op, pass_, dtype) if r["kernel"] in TENSOR_CORE_KERNELS]
    assert len(records) == 1, records
    (r,) = records
    assert r["mma"] > 0 and r["ldmatrix"] > 0 and r["cp_async"] > 0, r
    assert r["ldmatrix_wavefronts"] == r["ldmatrix"], f"bank conflicts: {r}"


def moved(records) -> int:
    return sum(r["load_sectors"] + r["store_sectors"] for r in records) * 32


# Half the frames of the sample padding: the kernels read only the real rows and write
# every output and gradient (the zeros of the padding too), so the floor is 2.5 / 4 of the
# unpadded forward's bytes (read q, k, v, write o) and 5.5 / 8 of the backward's (read q, k,
# v, o, dO, write dq, dk, dv), as for the Triton kernels (tests/ops/test_padding_triton.py).
PADDED_FLOOR = {"fwd": 2.5 / 4, "bwd": 5.5 / 8}


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("op", ["temporal", "spatial"])
def test_a_half_padded_batch_moves_the_least_bytes(op, pass_):
    full = moved(run_pass(op, pass_))
    half = moved(run_pass(op, pass_, frames=[T // 2]))
    ratio = half / full
    assert ratio <= 1.06 * PADDED_FLOOR[pass_], f"{op} {pass_}: {ratio:.3f}x the unpadded bytes"


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("op", ["spatial", "spatial_cls"])
def test_a_half_padded_batch_multiplies_half(op, pass_):
    """The tensor-core kernels skip the products of padded frames: half the frames padding,
    about half the mma instructions (the cls row's products against the padded frames'
    cls key remain). Temporal attention over 8 frames does not show it: a sequence of 8
    rows is one 16-row mma tile, half of it padding either way."""
    count = lambda records: sum(r["mma"] for r in records)  # noqa: E731
    ratio = count(run_pass(op, pass_, frames=[T // 2])) / count(run_pass(op, pass_))
    assert ratio <= 0.55, f"{op} {pass_}: {ratio:.3f}x the unpadded mma instructions"
