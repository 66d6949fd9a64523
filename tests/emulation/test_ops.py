"""The op grid, the isolation of non-finite values and causal attention of tests/ops on the
cuda backend, its kernels emulated on the CPU: every output and gradient against the fp64
reference, in fp32 (the scalar kernels), fp16 and bf16 (the tensor-core kernels)."""

import math

import pytest
import torch

from ..ops import test_causal as causal
from ..ops import test_isolation as isolation
from ..ops import test_ops as grid
from ..ops.cases import Case, assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
dtype_ids = lambda d: str(d).replace("torch.", "")  # noqa: E731


# bf16 runs the fp16 kernels with another conversion and mma type: every third case of the grid.
GRID = [(c, d) for i, c in enumerate(grid.CASES) for d in DTYPES if d != torch.bfloat16 or i % 3 == 0]


@pytest.mark.parametrize("case,dtype", [pytest.param(c, d, id=f"{c.id}-{dtype_ids(d)}") for c, d in GRID])
def test_op_grid_matches_reference(case, dtype):
    assert_close_to_reference(case, "cuda", dtype)


@pytest.mark.parametrize("op,N,order,where,value", isolation.CASES)
def test_non_finite_stays_in_its_sequence(op, N, order, where, value):
    isolation.test_non_finite_stays_in_its_sequence(op, N, order, where, value, "cuda", "interpreter")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_ids)
@pytest.mark.parametrize("op,N,order,where,value", [c for c in isolation.CASES if c.values[3] in ("k", "v", "q_cls")])
def test_non_finite_stays_in_its_sequence_low_precision(op, N, order, where, value, dtype):
    """The tensor-core kernels: non-finite exactly where the fp64 reference is."""
    qkv, grad = isolation._qkv(op, N, order, where, value, torch.float64)
    ref_o, ref_g = isolation._run(op, N, order, qkv, grad, None)
    got_o, got_g = isolation._run(op, N, order, qkv.to(dtype), grad.to(dtype), "cuda")
    assert torch.equal(~torch.isfinite(got_o), ~torch.isfinite(ref_o))
    assert torch.equal(~torch.isfinite(got_g), ~torch.isfinite(ref_g))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("cc", [pytest.param(c, id=c.id) for c in causal.CASES])
def test_causal_matches_reference(cc, dtype):
    causal._assert_close_to_reference(cc, "cuda", dtype)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("order", ["hwt", "thw"])
def test_causal_generation_frame_by_frame(order, chunk):
    causal.test_generation_frame_by_frame_equals_the_full_causal_forward("cuda", order, chunk)


def test_causal_one_query_frame_and_no_query_frames():
    causal.test_one_query_frame_causal_is_the_non_causal_op("cuda")
    causal.test_no_query_frames("cuda")


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
    causal._assert_close_to_reference(causal.C(140, tq, 1, 1, 128, "hwt", B=1), "cuda", torch.float16)
