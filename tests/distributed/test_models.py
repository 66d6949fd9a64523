"""Parallelized models on 2 and 3 gloo processes against the same model on the whole clip in
one process: outputs and every parameter's gradient (mean over the group) within 1e-5
relative, fp32. TimeSformer (divided, with cls and stochastic depth in training, memory="min"; space_only;
gradient checkpointing; fewer patches than ranks), the divided block in both token
orders, ViViT models 2, 3 (both attention orders) and 4, and the causal ST transformer;
T and N uneven over the ranks."""

import copy

import pytest
import torch

from divattn import sequence_parallel as sp
from divattn.layers.blocks import DividedBlock
from divattn.models import create_model
from divattn.testing.sequence_parallel import parallel_errors, relative_error

from ..models.helpers import randomize
from .ranks import ok

TOL = 1e-5
SMALL = dict(embed_dim=24, depth=2, num_heads=2, patch_size=8, backend="torch")

# name: (model, create_model keywords, frames, (H, W) of the clip, train mode)
CASES = {
    "timesformer-divided-train": ("timesformer_base", dict(img_size=40, num_frames=7, num_classes=5,
                                                            drop_path_rate=0.3), 7, (40, 40), True),
    "timesformer-memory-min-train": ("timesformer_base", dict(img_size=40, num_frames=7, num_classes=5, memory="min",
                                                               drop_path_rate=0.3), 7, (40, 40), True),
    "timesformer-grad-checkpointing": ("timesformer_base", dict(img_size=40, num_frames=7, num_classes=5), 7,
                                       (40, 40), False),
    "timesformer-space-only": ("timesformer_base", dict(img_size=24, num_frames=7, num_classes=5,
                                                        attention_type="space_only"), 7, (24, 24), True),
    "timesformer-2-patches": ("timesformer_base", dict(img_size=16, num_frames=6, num_classes=5), 6, (16, 8), False),
    "vivit-2": ("vivit_base", dict(img_size=24, num_frames=10, num_classes=5, variant="factorised_encoder",
                                   temporal_depth=1), 10, (24, 24), True),
    "vivit-3": ("vivit_base", dict(img_size=40, num_frames=10, num_classes=5,
                                   variant="factorised_self_attention"), 10, (40, 40), True),
    "vivit-3-time-space-gsp": ("vivit_base", dict(img_size=24, num_frames=10, num_classes=5, classifier="gsp",
                                                  variant="factorised_self_attention", attention_order="time_space",
                                                  drop_path_rate=0.2), 10, (24, 24), True),
    "vivit-4": ("vivit_base", dict(img_size=40, num_frames=10, num_classes=5, num_heads=4,
                                   variant="factorised_dot_product"), 10, (40, 40), True),
    "st-causal": ("st_transformer_tiny", dict(img_size=24, num_frames=7, drop_path_rate=0.2), 7, (24, 24), True),
}


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _model_case(rank, world, case):
    name, kw, T, (H, W), train = CASES[case]
    torch.manual_seed(0)
    model = randomize(create_model(name, **{**SMALL, **kw}), seed=1)
    if case == "timesformer-grad-checkpointing":
        model.set_grad_checkpointing(True)
    model.train(train)
    video = torch.randn(2, 3, T, H, W, generator=torch.Generator().manual_seed(2))
    return parallel_errors(model, video, seed=3)


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_parallelized_model_equals_the_whole_clip(ranks, P, case):
    for rank, errors in enumerate(ok(ranks(P).run(_model_case, case))):
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOL, f"P={P} rank {rank}: {worst} off by {errors[worst]:.2e} (relative)"


def _block_case(rank, world, order):
    """The divided block alone on frame-sharded tokens, either token order."""
    T, N, B, C = 7, 10, 2, 16
    torch.manual_seed(0)
    block = randomize(DividedBlock(C, 2, T, qkv_bias=True, token_order=order, backend="torch"), seed=1)
    x = torch.randn(B, 1 + N * T, C, generator=torch.Generator().manual_seed(2))
    w = torch.randn(B, 1 + N * T, C, generator=torch.Generator().manual_seed(3))
    ref = copy.deepcopy(block)
    xr = x.clone().requires_grad_()
    out = ref(xr)
    (out * w).sum().backward()

    shards = sp.FrameShards(None, T)
    block.sequence, block.num_frames = shards, shards.local_frames
    xs = sp.shard_tokens(x, num_frames=T, order=order, has_cls=True).requires_grad_()
    ws = sp.shard_tokens(w, num_frames=T, order=order, has_cls=True)
    mine = block(xs)
    # the cls row is the whole clip's on every rank; the patches are this rank's frames
    loss = shards.all_reduce((mine[:, 1:] * ws[:, 1:]).sum()) + (mine[:, 0] * ws[:, 0]).sum()
    loss.backward()
    sp.average_gradients(block.parameters())
    want = sp.shard_tokens(out.detach(), num_frames=T, order=order, has_cls=True)
    want_g = sp.shard_tokens(xr.grad, num_frames=T, order=order, has_cls=True)
    cls_grad = shards.all_reduce(xs.grad[:, 0]) / world  # a value every rank holds: the mean of its gradients
    errors = {"output": relative_error(mine, want),
              "input grad": relative_error(xs.grad[:, 1:] / world, want_g[:, 1:]),
              "cls grad": relative_error(cls_grad, xr.grad[:, 0])}
    ref_grads = _grads(ref)
    errors.update({f"grad {n}": relative_error(g, ref_grads[n]) for n, g in _grads(block).items()})
    return errors


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("order", ["hwt", "thw"])
def test_divided_block_on_frame_shards_either_token_order(ranks, P, order):
    for rank, errors in enumerate(ok(ranks(P).run(_block_case, order))):
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOL, f"P={P} rank {rank}: {worst} off by {errors[worst]:.2e} (relative)"
