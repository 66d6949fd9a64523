"""A model parallelized over frames against the same model on the whole clip: the check
behind the gloo tests of ``tests/distributed`` and the GPU acceptance run's multi-GPU one
(``benchmarks/gpu/sequence_parallel.py``). Every rank of the group calls it."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from .. import sequence_parallel as sp
from ..models import STTransformer


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``, in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def parallel_errors(model: torch.nn.Module, video: torch.Tensor, *, seed: int, group=None) -> dict:
    """Relative errors (:func:`relative_error`) of ``model`` parallelized over ``group`` (None:
    the default group) and given this rank's frames of ``video`` ``(B, C, T, H, W)``, against
    a copy of it on the whole clip in this process: ``{"output": e, "grad <name>": e, ...}``.

    Both runs draw their random numbers (stochastic depth) from ``torch.manual_seed(seed)``;
    the loss is the output times weights drawn from seed ``seed + 1``. Logits are compared
    whole; an ST transformer's predicted frames on this rank's frames. The parameter
    gradients compared are the group's mean (:func:`~divattn.sequence_parallel.average_gradients`).
    ``model`` is left parallelized (``model.sequence`` says its frames)."""
    group = dist.group.WORLD if group is None else group
    ref = copy.deepcopy(model)
    torch.manual_seed(seed)
    out = ref(video)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.device)
    (out * weight).sum().backward()

    model.parallelize(group, num_frames=video.shape[2])
    shards = model.sequence
    torch.manual_seed(seed)
    mine = model(shards.shard(video))
    if isinstance(model, STTransformer):  # predicted frames: this rank's
        ts = slice(shards.start, shards.stop)
        shards.all_reduce((mine * weight[:, :, ts]).sum()).backward()
        errors = {"output": relative_error(mine, out[:, :, ts])}
    else:  # logits: the whole clip's, on every rank
        (mine * weight).sum().backward()
        errors = {"output": relative_error(mine, out)}
    sp.average_gradients(model.parameters(), group)
    want = dict(ref.named_parameters())
    errors.update({f"grad {n}": relative_error(p.grad, want[n].grad) for n, p in model.named_parameters()})
    return errors
