"""What the op tests of tests/ops do not cover on the emulated cuda backend (they run it
too, emulated, through tests/ops/conftest.py): the tensor-core kernels' fp16 and bf16 on
the isolation and causal cases, and sequences longer than a block, padded ones too."""

import math

import pytest
import torch

from ..ops.cases import (
    causal_case,
    CAUSAL_CASES,
    ISOLATION_CASES,
    Case,
    assert_causal_close_to_reference,
    assert_close_to_reference,
    case_fn,
    isolation_run,
    poisoned_qkv,
)

dtype_ids = lambda d: str(d).replace("torch.", "")  # noqa: E731


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_ids)
@pytest.mark.parametrize("op,N,order,where,value", [c for c in ISOLATION_CASES if c.values[3] in ("k", "v", "q_cls")])
def test_non_finite_stays_in_its_sequence_low_precision(op, N, order, where, value, dtype):
    """The tensor-core kernels: non-finite exactly where the fp64 reference is."""
    qkv, grad = poisoned_qkv(op, N, order, where, value, torch.float64)
    ref_o, ref_g = isolation_run(op, N, order, qkv, grad, "reference")
    got_o, got_g = isolation_run(op, N, order, qkv.to(dtype), grad.to(dtype), "cuda")
    assert torch.equal(~torch.isfinite(got_o), ~torch.isfinite(ref_o))
    assert torch.equal(~torch.isfinite(got_g), ~torch.isfinite(ref_g))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_ids)
@pytest.mark.parametrize("cc", [pytest.param(c, id=c.id) for c in CAUSAL_CASES])
def test_causal_low_precision_matches_reference(cc, dtype):
    assert_causal_close_to_reference(cc, "cuda", dtype)


def test_values_really_were_poisoned():
    """The NaN fill of fresh memory is active here (the grid relies on it)."""
    assert math.isnan(torch.empty(3)[0].item())


# Sequences longer than a block: at D = 128 a block holds 8 warps (128 rows), so a 197-key
# frame takes two blocks (the backward sums dq, the cls row's too, from fp32 partials) and
# causal attention over 140 frames starts and stops each block at the diagonal.
LONG = [
    Case("spatial_cls", 1, 2, 196, 1, 128, "hwt"),
    Case("joint", 1, 4, 80, 1, 64, "thw"),  # 320 rows: two blocks at D = 64 too
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_ids)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LONG])
def test_sequences_longer_than_a_block_match_reference(case, dtype):
    assert_close_to_reference(case, "cuda", dtype)


@pytest.mark.parametrize("tq", [140, 7], ids=["Tq140", "Tq7"])
def test_causal_over_more_frames_than_a_block_matches_reference(tq):
    assert_causal_close_to_reference(causal_case(140, tq, 1, 1, 128, "hwt", B=1), "cuda", torch.float16)


@pytest.mark.parametrize("case, padding", [
    # rows cut short in the second block of keys / queries, and a sample with none
    pytest.param(Case("spatial", 2, 2, 300, 1, 64, "thw"), dict(patches=[300, 70]), id="spatial-patches"),
    pytest.param(Case("spatial_cls", 2, 2, 196, 1, 128, "hwt"), dict(frames=[2, 1], patches=[150, 196]),
                 id="spatial_cls-frames-patches"),
    pytest.param(Case("joint", 2, 4, 80, 1, 64, "thw"), dict(lengths=[320, 0]), id="joint-lengths"),
    # D = 40 (a padded head dim) and an odd batch x heads, counts and a mask together
    pytest.param(Case("spatial_cls", 3, 5, 7, 5, 40, "thw"),
                 dict(frames=[5, 2, 0], mask=torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(3)) < 0.6),
                 id="spatial_cls-D40-B3-H5-frames-mask"),
])
def test_padded_sequences_longer_than_a_block_match_reference(case, padding):
    assert_close_to_reference(case, "cuda", torch.float16, fn=case_fn(case, **padding))


@pytest.mark.parametrize("tq, causal", [(140, True), (7, True), (60, False)], ids=["Tq140", "Tq7", "Tq60-full"])
def test_padded_causal_over_more_frames_than_a_block_matches_reference(tq, causal):
    cc = causal_case(140, tq, 1, 1, 128, "hwt", B=2, causal=causal)
    assert_causal_close_to_reference(cc, "cuda", torch.float16, frames=[140, 101])
