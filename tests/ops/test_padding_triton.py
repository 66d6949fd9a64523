"""The Triton kernels on a padded batch given as counts or as a token mask, with the GPU's
tiles: tiles of padding skipped (counts) or rows of padding not loaded (mask), counted by
the traffic model, and the results those of the reference.

The launches are planned for sm_90 (the H100's tile table) and run by the interpreter,
so the tiles, regimes and loop bounds are those a GPU runs. Half of the frames of every
sample are padding: the kernels still write their zero outputs and gradients, so the
floor is 2.5 / 4 of the unpadded forward's bytes (read q, k, v, write o) and 5.5 / 8 of
the backward's (read q, k, v, o, dO, write dq, dk, dv).
"""

import pytest
import torch

from divattn.kernels_report import traffic
from divattn.ops import functions, reference, split_qkv
from divattn.ops.masks import resolve
from divattn.ops.triton import plan_backward, plan_forward

T, N, H, D = 8, 49, 1, 64
FLOOR = {"fwd": 2.5 / 4, "bwd": 5.5 / 8}


def _run(op: str, qkv: torch.Tensor, frames, form: str = "counts", do_seed: int = 1) -> dict:
    """Forward and backward of ``op`` on the views of ``qkv`` with sm_90 plans, the padding
    ``frames`` given as counts or as the mask they make: the bytes each pass moves, its
    outputs and gradients."""
    q, k, v, _ = split_qkv(qkv, T, N, order="hwt", has_cls=True)
    padding = {}
    if frames is not None:
        real = resolve("test", q, None, frames, None, q.shape[:3])
        if form == "counts":
            padding = dict(counts=real.kernel_counts(op))
        else:
            padding = dict(zip(("mask", "cls_weights"), resolve("test", q, real.dense(), None, None, q.shape[:3])
                               .kernel_mask(False)))
    buf, lse, cls_frames, lse_cls = functions._outputs(op, False, q)
    o = buf.view(q.shape[0], N, T, H, D).transpose(1, 2)  # hwt: the output in q's token order
    scale = D ** -0.5
    fwd = traffic.count(plan_forward(op, q, k, v, o, lse, scale, **padding, target=90))
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(do_seed)).to(o.dtype)
    grad = torch.empty_like(qkv)
    dq, dk, dv, _ = split_qkv(grad, T, N, order="hwt", has_cls=True)
    grad[:, 0] = 0
    bwd = traffic.count(plan_backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, **padding, target=90))
    return dict(fwd=sum(t.bytes for t in fwd), bwd=sum(t.bytes for t in bwd), o=o.clone(), grad=grad, do=do,
                stores=dict(fwd=sum(t.store_sectors for t in fwd), bwd=sum(t.store_sectors for t in bwd)),
                flops=dict(fwd=sum(t.dot_flops for t in fwd), bwd=sum(t.dot_flops for t in bwd)))


@pytest.mark.parametrize("form", ["counts", "mask"])
@pytest.mark.parametrize("op", ["temporal", "spatial"])
def test_half_padded_batch_moves_the_least_bytes(op, form):
    """Half the frames of each sample padding: within 6% of the floor of this contract, forward
    and backward, storing as much as the unpadded batch (the zeros), and the outputs and
    gradients the reference's. As counts, the tiles of padding are skipped; as a mask, their
    rows are not loaded (the mask's own bytes are counted too)."""
    qkv = torch.randn(2, 1 + N * T, 3, H, D, generator=torch.Generator().manual_seed(0)).half()
    full = _run(op, qkv, None)
    half = _run(op, qkv, [T // 2, T // 2], form)
    for pass_ in ("fwd", "bwd"):
        ratio = half[pass_] / full[pass_]
        print(f"{op} {form} {pass_}: {ratio:.3f}x the unpadded bytes")
        assert ratio <= 1.06 * FLOOR[pass_], f"{op} {form} {pass_}: {ratio:.3f}x the unpadded bytes"
        assert half["stores"][pass_] >= 0.99 * full["stores"][pass_]
        # spatial: a frame of padding is a whole sequence, whose tiles do no products; temporal:
        # each sequence's tile holds real and padded frames, multiplied together
        flops = half["flops"][pass_] / full["flops"][pass_]
        print(f"{op} {form} {pass_}: {flops:.3f}x the unpadded tl.dot FLOPs")
        assert flops <= (0.5 if op == "spatial" else 1.0), f"{op} {form} {pass_}: {flops:.3f}x the FLOPs"
    # the same numbers as the reference (fp64) on the padded batch
    ref_qkv = qkv.double().requires_grad_(True)
    q, k, v, _ = split_qkv(ref_qkv, T, N, order="hwt", has_cls=True)
    padding = resolve("test", q, None, [T // 2, T // 2], None, q.shape[:3])
    want = (reference.temporal(q, k, v, D ** -0.5, padding=padding) if op == "temporal"
            else reference.spatial(q, k, v, D ** -0.5, padding=padding))
    (want_grad,) = torch.autograd.grad((want * half["do"].double()).sum(), ref_qkv)
    torch.testing.assert_close(half["o"].double(), want.detach(), rtol=0, atol=2e-3)
    torch.testing.assert_close(half["grad"].double(), want_grad, rtol=0, atol=2e-2)
    assert (half["o"][:, T // 2:] == 0).all()
