"""What a run learns: one object per ``task`` that owns its loss, its training metric and
its evaluation.

:class:`Classify` (``task: classify``): cross-entropy on the clip's label, top-1 in
training; top-1 / top-5 and the loss over the multi-view protocol in evaluation.
:class:`NextFrame` (``task: next_frame``): the MSE of predicting frame t+1 from frames
``<= t``, evaluated beside the copy-the-last-frame baseline.

Training quantities stay on the device: :meth:`Task.correct` is a 0-d tensor, and
evaluation sums on the device and reads the totals once, after its all-reduce.

With ``sequence`` set (a :class:`~divattn.sequence_parallel.FrameShards`: the model is
parallelized over frames), the model sees this rank's frames of each clip and the losses
and evaluation sums are those of the whole clips, each clip counted once.

A padded batch (``data.variable_frames``: the batch's ``frames``, each clip's own frame
count) reaches the model as ``model(video, frames=frames)``, so the logits are each clip's
own; the next-frame loss counts only the frame pairs within a clip. The two do not meet:
the configuration refuses variable frames with sequence parallelism.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import SyntheticMotion
from . import distributed


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class Classify:
    name = "classify"
    has_top1 = True
    sequence = None

    def prepare(self, train_set, val_set) -> None:
        """Nothing to change: the datasets give labels."""

    def loss(self, out: torch.Tensor, video: torch.Tensor, labels: torch.Tensor,
             frames: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-entropy of the logits (a padded clip's logits are the clip's own: nothing to skip)."""
        return F.cross_entropy(out.float(), labels)

    def correct(self, out: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        return (out.argmax(-1) == labels).sum()

    def evaluate(self, model: nn.Module, loader, dist: distributed.Dist, amp: str = "none") -> dict:
        return evaluate(model, loader, dist, amp, self.sequence)

    def val_text(self, val: dict) -> str:
        return f"val top-1 {val['top1']:.2f}% top-5 {val['top5']:.2f}%"


class NextFrame(Classify):
    name = "next_frame"
    has_top1 = False

    def prepare(self, train_set, val_set) -> None:
        """The clip is its own target: synthetic clips come without their labels."""
        for dataset in (train_set, val_set):
            if isinstance(dataset, SyntheticMotion):
                dataset.labels = False

    def loss(self, out, video, labels, frames=None):
        return next_frame_loss(out, video, frames, self.sequence)

    def correct(self, out, labels):
        return None

    def evaluate(self, model, loader, dist, amp="none"):
        return evaluate_next_frame(model, loader, dist, amp, self.sequence)

    def val_text(self, val):
        return (f"val MSE {val['mse']:.4f} (copy-last-frame baseline {val['baseline_mse']:.4f}, "
                f"{val['mse'] / val['baseline_mse']:.3f}x)")


TASKS = {"classify": Classify, "next_frame": NextFrame}


def make_task(name: str):
    return TASKS[name]()


def run_model(model: nn.Module, video: torch.Tensor, frames: Optional[torch.Tensor], sequence=None) -> torch.Tensor:
    """``model(video)``, or ``model(video, frames=frames)`` for a padded batch; views
    ``(B, V, C, T, H, W)`` are run as ``B*V`` clips (``frames`` repeated per view). With
    ``sequence`` the model gets this rank's frames of each clip."""
    if sequence is not None:
        video = sequence.shard(video)
    if video.ndim == 6:
        video = video.flatten(0, 1)
        if frames is not None:
            frames = frames.repeat_interleave(len(video) // len(frames))
    return model(video) if frames is None else model(video, frames=frames)


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: distributed.Dist, amp: str = "none", sequence=None) -> dict:
    """Top-1 / top-5 (percent) and loss over every item of ``loader`` on all ranks.

    Items with several views ``(B, V, C, T, H, W)`` are scored by the mean of their
    views' softmax probabilities. Counts are summed across ranks, so each item counts
    exactly once (use :class:`~divattn.data.ShardSampler`; with ``sequence``, the model is
    given this rank's frames and only the group's first rank counts).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=dist.device)  # correct1, correct5, count, loss
    for batch in loader:
        video = batch["video"].to(dist.device, non_blocking=True)
        labels = batch["label"].to(dist.device)
        with autocast(dist.device, amp):
            probs = run_model(model, video, batch.get("frames"), sequence).float().softmax(-1)
            if video.ndim == 6:
                probs = probs.view(video.shape[0], video.shape[1], -1).mean(1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices
        sums += _stack((top[:, 0] == labels).sum(), (top == labels[:, None]).any(-1).sum(), len(labels),
                       F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum"))
    model.train(was_training)
    if sequence is not None and sequence.rank != 0:
        sums.zero_()  # the group's logits are the same on every rank
    c1, c5, n, loss = distributed.all_reduce_sum(dist, sums).tolist()
    if n == 0:
        raise RuntimeError("evaluation saw no items")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "count": int(n)}


def next_frame_loss(pred: torch.Tensor, video: torch.Tensor, frames: Optional[torch.Tensor] = None,
                    sequence=None) -> torch.Tensor:
    """MSE between ``pred[:, :, t]`` and ``video[:, :, t + 1]`` over ``t < T - 1``, in fp32.

    ``pred`` and ``video`` are ``(B, C, T, H, W)``; ``pred[:, :, t]`` is the model's
    prediction of frame t + 1 from frames ``<= t``. With ``frames`` ``(B,)`` (a padded
    batch) the mean is over each clip's own pairs, ``t < frames[b] - 1``. With ``sequence``
    (no ``frames``), ``pred`` holds this rank's frames of the clip ``video``, and the loss
    (the same on every rank) is the whole clip's: the squared errors summed over the group
    (forward and backward).
    """
    if sequence is not None:
        return sequence.all_reduce(_frame_errors(pred, video, sequence)[0]) / video[:, :, 1:].numel()
    if frames is None:
        return F.mse_loss(pred[:, :, :-1].float(), video[:, :, 1:].float())
    sq, pairs = _next_frame_sums(pred, video, frames)
    return sq / (pairs * video.shape[1] * video.shape[3] * video.shape[4]).clamp_min(1)


def _frame_errors(pred: torch.Tensor, video: torch.Tensor, sequence):
    """(squared error of ``pred``, of the copy-last-frame baseline, predicted values) over this
    rank's frames that have a next frame; ``pred`` this rank's frames of ``video``."""
    T = video.shape[2]
    start, stop = sequence.start, min(sequence.stop, T - 1)
    target = video[:, :, start + 1: stop + 1].float()
    err = (pred[:, :, : stop - start].float() - target).square().sum()
    base = (video[:, :, start: stop].float() - target).square().sum()
    return err, base, video[:, :, 1:].numel() // (T - 1) * (stop - start)


def _next_frame_sums(pred: torch.Tensor, video: torch.Tensor, frames: Optional[torch.Tensor]):
    """(summed squared error of the predicted frame pairs, pairs counted) over a batch."""
    target = video[:, :, 1:].float()
    err = (pred[:, :, :-1].float() - target).square()
    if frames is None:
        return err.sum(), torch.tensor(err.shape[0] * err.shape[2], device=err.device)
    real = (torch.arange(err.shape[2], device=err.device) < (frames.to(err.device) - 1)[:, None])  # (B, T - 1)
    return (err * real[:, None, :, None, None]).sum(), real.sum()


@torch.no_grad()
def evaluate_next_frame(model: nn.Module, loader, dist: distributed.Dist, amp: str = "none", sequence=None) -> dict:
    """Next-frame MSE over every item of ``loader`` on all ranks, and the copy-last-frame baseline.

    ``mse`` (also ``loss``) is :func:`next_frame_loss` averaged over all predicted
    pixels; ``baseline_mse`` is the same for predicting frame t + 1 as frame t. Views
    ``(B, V, C, T, H, W)`` count as separate clips.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=dist.device)  # squared error, baseline's, clips, pixels
    for batch in loader:
        video = batch["video"].to(dist.device, non_blocking=True)
        if video.numel() == 0:
            continue
        frames = batch.get("frames")
        with autocast(dist.device, amp):
            pred = run_model(model, video, frames, sequence)
        if video.ndim == 6:
            if frames is not None:
                frames = frames.repeat_interleave(video.shape[1])
            video = video.flatten(0, 1)
        if sequence is None:
            sq, pairs = _next_frame_sums(pred, video, frames)
            base, _ = _next_frame_sums(video, video, frames)
            pixels = pairs * video.shape[1] * video.shape[3] * video.shape[4]
            sums += _stack(sq, base, len(batch["index"]), pixels)
        else:  # this rank's frames; the clips counted by one rank of the group
            err, base, values = _frame_errors(pred, video, sequence)
            sums += _stack(err, base, len(batch["index"]) if sequence.rank == 0 else 0, values)
    model.train(was_training)
    sq, base, n, pixels = distributed.all_reduce_sum(dist, sums).tolist()
    if n == 0:
        raise RuntimeError("evaluation saw no items")
    return {"mse": sq / pixels, "baseline_mse": base / pixels, "loss": sq / pixels, "count": int(n),
            "top1": None, "top5": None}


def _stack(*values) -> torch.Tensor:
    """0-d device tensors and host numbers -> one float64 vector on the tensors' device."""
    device = next(v.device for v in values if isinstance(v, torch.Tensor))
    return torch.stack([v.double() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64,
                                                                                     device=device)
                        for v in values])
