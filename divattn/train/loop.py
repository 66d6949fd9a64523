"""The training loop: one process or many (``torchrun``), resumable at any checkpoint.

:func:`train` builds the datasets, the model (``divattn.models.create_model``), the
optimizer, schedule, AMP scaler and optional EMA from a config (see
:mod:`divattn.train.config`), trains, evaluates top-1 / top-5 with the multi-view
protocol (``task: next_frame``: the MSE of next-frame prediction beside the
copy-the-last-frame baseline, :func:`evaluate_next_frame`), and writes into the output
directory: ``config.yaml`` (resolved), ``checkpoint.pt`` (atomic, every
``train.checkpoint_every`` steps and at every epoch end), ``train.log``,
``metrics.csv``, ``tb/`` (TensorBoard) and ``summary.json``.

Exact resumption: the data order and every augmentation are functions of ``(seed,
epoch, position)`` (:class:`~divattn.data.EpochSampler`), checkpoints are taken at
optimizer-step boundaries with the model, optimizer, schedule, scaler, EMA, epoch,
step, position in the epoch and every RNG state, so a run resumed from any
checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import EpochSampler, ShardSampler, SyntheticMotion, build_datasets, collate_skipping
from . import distributed
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import diff, dump
from .logs import RunLog

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or inf for ``train.max_nonfinite`` optimizer steps in a row."""


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint."""

    epoch: int = 0  # epochs finished
    position: int = 0  # micro-batches done in the current epoch
    step: int = 0  # optimizer steps attempted (skipped ones included)
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    nonfinite_run: int = 0  # of those, in a row just now
    skipped_items: int = 0  # training items dropped as undecodable (all ranks)
    epoch_loss: float = 0.0  # sums over this epoch's items so far (all ranks)
    epoch_correct: float = 0.0
    epoch_items: float = 0.0


def resolve_backend(backend, device: torch.device):
    """``model.backend`` -> (the value for ``create_model``, a sentence saying why)."""
    if backend == "auto":
        if device.type == "cpu":
            return "torch", ("model.backend=auto on cpu -> 'torch', the reference path (the Triton kernels "
                             "would run in the slow interpreter on CPU; set model.backend=triton to use them anyway)")
        return None, f"model.backend=auto on {device.type} -> divattn's auto dispatch (the first of triton, cuda, torch that fits)"
    return backend, f"model.backend={backend!r} as asked"


def build_model(cfg: dict, num_classes: int, backend) -> nn.Module:
    """The model named by ``cfg['model']`` from the divattn registry, sized by ``cfg['data']``."""
    from ..models import create_model

    m, d = cfg["model"], cfg["data"]
    kw = dict(num_classes=num_classes, num_frames=d["num_frames"], img_size=d["crop_size"],
              patch_size=m["patch_size"], embed_dim=m["embed_dim"], depth=m["depth"], num_heads=m["num_heads"],
              mlp_ratio=m["mlp_ratio"], qkv_bias=m["qkv_bias"], drop_path_rate=m["drop_path_rate"], backend=backend)
    if m["attention_type"] is not None:
        kw["attention_type"] = m["attention_type"]
    if cfg.get("task", "classify") == "next_frame":
        del kw["num_classes"]  # the model predicts pixels
    kw.update(m["kwargs"] or {})
    model = create_model(m["name"], **kw)
    reinit(model, m["reinit"] or {})
    if m["grad_checkpointing"]:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"model.grad_checkpointing: {m['name']} has no set_grad_checkpointing")
        model.set_grad_checkpointing(True)
    return model


def reinit(model: nn.Module, stds: dict) -> None:
    """Draw every parameter whose name ends with a key of ``stds`` from a truncated
    normal with that std; a key that matches nothing is an error."""
    params = dict(model.named_parameters())
    for suffix, std in stds.items():
        hits = [name for name in params if name.endswith(suffix)]
        if not hits:
            raise ValueError(f"model.reinit: no parameter name ends with {suffix!r}")
        with torch.no_grad():
            for name in hits:
                nn.init.trunc_normal_(params[name], std=float(std), a=-2 * float(std), b=2 * float(std))


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases, norms, position/time embeddings and cls tokens."""
    o = cfg["optim"]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(k in name for k in ("pos_embed", "time_embed", "cls_token"))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if o["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]))
    return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=o["momentum"] > 0)


def lr_factor(cfg: dict, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of ``optim.lr`` after ``step`` optimizer steps: linear warmup, then cosine
    to ``schedule.min_lr``, step decay at ``schedule.milestones`` (epochs), or constant."""
    s, base = cfg["schedule"], cfg["optim"]["lr"]
    total = cfg["train"]["epochs"] * steps_per_epoch
    warmup = int(round(s["warmup_epochs"] * steps_per_epoch))
    floor = s["min_lr"] / base if base > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if s["name"] == "cosine":
            t = (step - warmup) / max(1, total - warmup)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        if s["name"] == "step":
            epoch = step / steps_per_epoch
            return s["gamma"] ** sum(1 for m in s["milestones"] if epoch >= m)
        return 1.0

    return factor


def cpu_threads(setting, num_workers: int) -> tuple:
    """``train.threads`` -> (intra-op threads for this process, a sentence saying why)."""
    if setting != "auto":
        return int(setting), f"{setting} CPU threads as asked"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = max(1, cores // procs - num_workers)
    return n, f"{n} CPU thread(s) per process ({cores} cores, {procs} process(es), {num_workers} data worker(s) each)"


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: distributed.Dist, amp: str = "none") -> dict:
    """Top-1 / top-5 (percent) and loss over every item of ``loader`` on all ranks.

    Items with several views ``(B, V, C, T, H, W)`` are scored by the mean of their
    views' softmax probabilities. Counts are summed across ranks, so each item counts
    exactly once (use :class:`~divattn.data.ShardSampler`).
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = count = loss_sum = 0.0
    for batch in loader:
        video = batch["video"].to(dist.device, non_blocking=True)
        labels = batch["label"].to(dist.device)
        with _autocast(dist.device, amp):
            if video.ndim == 6:
                b, v = video.shape[:2]
                probs = model(video.flatten(0, 1)).float().softmax(-1).view(b, v, -1).mean(1)
            else:
                probs = model(video).float().softmax(-1)
        loss_sum += float(F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum"))
        top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices
        correct1 += float((top[:, 0] == labels).sum())
        correct5 += float((top == labels[:, None]).any(-1).sum())
        count += len(labels)
    model.train(was_training)
    c1, c5, n, loss = distributed.all_reduce_sum(dist, [correct1, correct5, count, loss_sum]).tolist()
    if n == 0:
        raise RuntimeError("evaluation saw no items")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "count": int(n)}


def next_frame_loss(pred: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """MSE between ``pred[:, :, t]`` and ``video[:, :, t + 1]`` over ``t < T - 1``, in fp32.

    ``pred`` and ``video`` are ``(B, C, T, H, W)``; ``pred[:, :, t]`` is the model's
    prediction of frame t + 1 from frames ``<= t``.
    """
    return F.mse_loss(pred[:, :, :-1].float(), video[:, :, 1:].float())


@torch.no_grad()
def evaluate_next_frame(model: nn.Module, loader, dist: distributed.Dist, amp: str = "none") -> dict:
    """Next-frame MSE over every item of ``loader`` on all ranks, and the copy-last-frame baseline.

    ``mse`` (also ``loss``) is :func:`next_frame_loss` averaged over all predicted
    pixels; ``baseline_mse`` is the same for predicting frame t + 1 as frame t. Views
    ``(B, V, C, T, H, W)`` count as separate clips.
    """
    was_training = model.training
    model.eval()
    sq = base = count = pixels = 0.0
    for batch in loader:
        video = batch["video"].to(dist.device, non_blocking=True)
        if video.numel() == 0:
            continue
        if video.ndim == 6:
            video = video.flatten(0, 1)
        with _autocast(dist.device, amp):
            pred = model(video)
        target = video[:, :, 1:].float()
        sq += float((pred[:, :, :-1].float() - target).square().sum())
        base += float((video[:, :, :-1].float() - target).square().sum())
        pixels += target.numel()
        count += len(batch["index"])
    model.train(was_training)
    sq, base, n, pixels = distributed.all_reduce_sum(dist, [sq, base, count, pixels]).tolist()
    if n == 0:
        raise RuntimeError("evaluation saw no items")
    return {"mse": sq / pixels, "baseline_mse": base / pixels, "loss": sq / pixels, "count": int(n),
            "top1": None, "top5": None}


def _val_text(val: dict) -> str:
    if val["top1"] is None:
        return (f"val MSE {val['mse']:.4f} (copy-last-frame baseline {val['baseline_mse']:.4f}, "
                f"{val['mse'] / val['baseline_mse']:.3f}x)")
    return f"val top-1 {val['top1']:.2f}% top-5 {val['top5']:.2f}%"


def _describe_batch(dataset, indices) -> str:
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return "files " + ", ".join(samples[i][0] for i in indices)
    return f"items {indices}"


def train(cfg: dict, output_dir: str, *, resume: Optional[str] = None,
          model_fn: Optional[Callable[[dict, int, object], nn.Module]] = None) -> dict:
    """Train as ``cfg`` says, writing into ``output_dir``; returns the summary (rank 0's).

    ``resume``: a checkpoint to continue from. ``model_fn(cfg, num_classes, backend)``
    replaces :func:`build_model` (for models outside the registry).
    """
    dist = distributed.init(cfg["device"])
    log = RunLog(output_dir, enabled=dist.is_main, tensorboard=cfg["log"]["tensorboard"])
    try:
        return _train(cfg, output_dir, resume, model_fn or build_model, dist, log)
    finally:
        log.close()
        distributed.shutdown(dist)


def _train(cfg, output_dir, resume, model_fn, dist, log) -> dict:
    t_start = time.time()
    tcfg, seed = cfg["train"], cfg["seed"]
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None and ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{resume}: not a divattn training checkpoint (format {ckpt.get('format')!r})")

    train_set, val_set, num_classes = build_datasets(cfg["data"])
    next_frame = cfg.get("task", "classify") == "next_frame"
    if next_frame:
        for dataset in (train_set, val_set):
            if isinstance(dataset, SyntheticMotion):
                dataset.labels = False
    run_eval = evaluate_next_frame if next_frame else evaluate
    backend, why = resolve_backend(cfg["model"]["backend"], dist.device)
    threads_why = None
    if dist.device.type == "cpu":
        threads, threads_why = cpu_threads(tcfg["threads"], cfg["data"]["num_workers"])
        torch.set_num_threads(threads)
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = model_fn(cfg, num_classes, backend).to(dist.device)
    torch.manual_seed(seed + dist.rank)
    params = sum(p.numel() for p in model.parameters())
    resolved = {"device": str(dist.device), "backend": backend if backend is not None else "auto-dispatch",
                "world_size": dist.world_size, "num_classes": None if next_frame else num_classes,
                "train_items": len(train_set), "val_items": len(val_set), "parameters": params,
                "cpu_threads": torch.get_num_threads()}
    log.info(f"divattn train -> {output_dir}")
    log.info(f"device {dist.device}, {dist.world_size} process(es); {why}")
    if threads_why:
        log.info(threads_why)
    log.info(f"model {cfg['model']['name']} ({cfg['model']['attention_type']}), {params / 1e6:.2f} M parameters, "
             f"{'next-frame prediction' if next_frame else f'{num_classes} classes'}; "
             f"data {cfg['data']['dataset']}: {len(train_set)} train / {len(val_set)} val items")
    log.write_text("config.yaml", dump({**cfg, "resolved": resolved}))

    ema = None
    if tcfg["ema_decay"] is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tcfg["ema_decay"]), use_buffers=True)
    optimizer = build_optimizer(cfg, model)
    batch_size, accum = tcfg["batch_size"], tcfg["accum_steps"]
    sampler = EpochSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, seed=seed)
    micro_per_epoch = (sampler.num_samples // batch_size) // accum * accum
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training items over {dist.world_size} process(es) do not fill one "
                         f"optimizer step of batch_size {batch_size} x accum_steps {accum}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(dist.device.type) if tcfg["amp"] == "fp16" else None
    state = Progress()

    if ckpt is not None:
        changed = diff(ckpt["config"], cfg)
        if changed:
            log.info("resuming with a changed config: " + "; ".join(changed))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        state = Progress(**ckpt["progress"])
        if state.position > micro_per_epoch:
            raise ValueError(f"{resume}: position {state.position} is past this config's {micro_per_epoch} "
                             "micro-batches per epoch (batch size or data changed?)")
        set_rng_state(ckpt["rng"][dist.rank] if dist.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        log.info(f"resumed from {resume}: epoch {state.epoch}, step {state.step}, "
                 f"{state.position}/{micro_per_epoch} micro-batches into the epoch")

    train_model = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if tcfg["compile"]:
        train_model = torch.compile(train_model)

    def checkpoint() -> None:
        states = [rng_state()]
        if dist.enabled:
            gathered = [None] * dist.world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if dist.is_main:
            save_checkpoint(os.path.join(output_dir, CHECKPOINT), {
                "format": CHECKPOINT_FORMAT, "config": cfg, "progress": asdict(state),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None, "rng": states})
        distributed.barrier(dist)

    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=cfg["eval"]["batch_size"], num_workers=cfg["data"]["num_workers"],
        sampler=ShardSampler(val_set, num_replicas=dist.world_size, rank=dist.rank), collate_fn=collate_skipping,
        pin_memory=dist.device.type == "cuda")
    eval_model = ema.module if ema is not None else model

    train_time = 0.0
    clips_done = 0
    val = None
    epochs = tcfg["epochs"]
    log.info(f"{epochs} epochs x {steps_per_epoch} steps of {batch_size} x {accum} x {dist.world_size} clips")
    for epoch in range(state.epoch, epochs):
        start = state.position
        sampler.set_epoch(epoch, start=start * batch_size)
        generator = torch.Generator()
        generator.manual_seed(seed * 1_000_003 + epoch)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=batch_size, sampler=sampler, num_workers=cfg["data"]["num_workers"],
            collate_fn=collate_skipping, drop_last=True, generator=generator,
            pin_memory=dist.device.type == "cuda")
        model.train()
        bar = log.progress(micro_per_epoch, start, f"epoch {epoch + 1}/{epochs}", cfg["log"]["progress"])
        t_epoch = time.time()
        epoch_clips = 0
        step_bad = step_used = False
        skipped_files = []
        batches = iter(loader)
        for micro in range(start, micro_per_epoch):
            batch = next(batches)
            skipped_files += [(s.path, s.reason) for s in batch["skipped"]]
            labels = batch["label"].to(dist.device, non_blocking=True)
            n = len(labels)
            last_micro = (micro + 1) % accum == 0
            empty = float(n == 0)
            if dist.enabled:
                empty = float(distributed.all_reduce_sum(dist, [empty]).item())
            if empty == 0:
                video = batch["video"].to(dist.device, non_blocking=True)
                sync = contextlib.nullcontext()
                if dist.enabled and not last_micro:
                    sync = train_model.no_sync()
                with sync:
                    with _autocast(dist.device, tcfg["amp"]):
                        logits = train_model(video)
                    loss = next_frame_loss(logits, video) if next_frame else F.cross_entropy(logits.float(), labels)
                    bad = float(not torch.isfinite(loss).item())
                    if dist.enabled:
                        bad = float(distributed.all_reduce_sum(dist, [bad]).item())
                    if bad:
                        step_bad = True
                        log.info(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {state.step + 1}, "
                                 f"batch {micro} of the epoch ({_describe_batch(train_set, batch['index'].tolist())}): "
                                 "step skipped")
                    else:
                        scaled = loss / accum
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        step_used = True
                        state.epoch_loss += loss.item() * n
                        if not next_frame:
                            state.epoch_correct += float((logits.argmax(-1) == labels).sum())
                        state.epoch_items += n
                epoch_clips += n
            if bar is not None:
                bar.update(1)
            if not last_micro:
                continue

            if step_bad:
                optimizer.zero_grad(set_to_none=True)
                state.skipped_steps += 1
                state.nonfinite_run += 1
                if state.nonfinite_run >= tcfg["max_nonfinite"]:
                    raise NonFiniteLossError(
                        f"the loss was not finite for {state.nonfinite_run} optimizer steps in a row, the last at "
                        f"epoch {epoch + 1}, step {state.step + 1}, batch {micro} of the epoch "
                        f"({_describe_batch(train_set, batch['index'].tolist())}); stopping "
                        f"(train.max_nonfinite={tcfg['max_nonfinite']})")
            elif step_used:
                state.nonfinite_run = 0
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg["optim"]["clip_grad"] is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg["optim"]["clip_grad"])
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(model)
            with warnings.catch_warnings():
                # the schedule follows the position in the run, stepped or skipped
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
            state.step += 1
            state.position = micro + 1
            step_bad = step_used = False

            elapsed = time.time() - t_epoch
            rate = epoch_clips * dist.world_size / max(elapsed, 1e-9)
            running = state.epoch_loss / max(state.epoch_items, 1)
            lr = optimizer.param_groups[0]["lr"]
            if bar is not None:
                bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}", refresh=False)
            if state.step % tcfg["log_every"] == 0:
                log.scalars(state.step, {"train/loss": running, "train/lr": lr, "train/clips_per_s": rate})
                if bar is None:
                    log.info(f"epoch {epoch + 1}/{epochs} step {state.step} ({micro + 1}/{micro_per_epoch}): "
                             f"loss {running:.4f} lr {lr:.2e} {rate:.1f} clips/s")
            if tcfg["checkpoint_every"] and state.step % tcfg["checkpoint_every"] == 0 and state.position < micro_per_epoch:
                t_pause = time.time()
                checkpoint()
                t_epoch += time.time() - t_pause
        if bar is not None:
            bar.close()
        epoch_time = time.time() - t_epoch
        train_time += epoch_time
        clips_done += epoch_clips * dist.world_size

        # exact totals over ranks
        skipped_here = len(skipped_files)
        if dist.enabled:
            gathered = [None] * dist.world_size
            torch.distributed.all_gather_object(gathered, skipped_files)
            skipped_files = [x for g in gathered for x in g]
            skipped_here = len(skipped_files)
        for path, reason in skipped_files:
            log.info(f"skipped undecodable training file {path}: {reason}")
        state.skipped_items += skipped_here
        loss_sum, correct, items = distributed.all_reduce_sum(
            dist, [state.epoch_loss, state.epoch_correct, state.epoch_items]).tolist()
        train_loss = loss_sum / max(items, 1)
        train_top1 = 100.0 * correct / max(items, 1)
        state.epoch, state.position = epoch + 1, 0
        state.epoch_loss = state.epoch_correct = state.epoch_items = 0.0

        val = None
        if (epoch + 1) % tcfg["eval_every"] == 0 or epoch + 1 == epochs:
            val = run_eval(eval_model, val_loader, dist, tcfg["amp"])
        rate = epoch_clips * dist.world_size / max(epoch_time, 1e-9)
        msg = (f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}"
               f"{'' if next_frame else f' top-1 {train_top1:.1f}%'}, "
               f"{rate:.1f} clips/s, {epoch_time:.1f} s")
        if val is not None:
            msg += f"; {_val_text(val)} loss {val['loss']:.4f} ({val['count']} items)"
        if skipped_here:
            msg += f"; {skipped_here} undecodable training files skipped"
        log.info(msg)
        log.metrics({"epoch": epoch + 1, "step": state.step, "lr": optimizer.param_groups[0]["lr"],
                     "train_loss": train_loss, "train_top1": train_top1,
                     "val_top1": val and val["top1"], "val_top5": val and val["top5"], "val_loss": val and val["loss"],
                     "clips_per_s": rate, "skipped": skipped_here, "time_s": time.time() - t_start})
        log.scalars(state.step, {"epoch/train_loss": train_loss, "epoch/train_top1": train_top1,
                                 "val/top1": val and val["top1"], "val/top5": val and val["top5"],
                                 "val/loss": val and val["loss"], "val/baseline_mse": val and val.get("baseline_mse")})
        checkpoint()

    if val is None:
        # resumed after the last epoch had finished: evaluate what the checkpoint holds
        val = run_eval(eval_model, val_loader, dist, tcfg["amp"])
    summary = {
        "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"], "val_items": val["count"],
        "epochs": state.epoch, "steps": state.step, "skipped_steps": state.skipped_steps,
        "skipped_train_items": state.skipped_items,
        "clips_per_s": clips_done / train_time if train_time > 0 else None,
        "train_time_s": train_time, "wall_time_s": time.time() - t_start,
        "model": cfg["model"]["name"], "attention_type": cfg["model"]["attention_type"],
        "ema": ema is not None, "task": cfg.get("task", "classify"), **resolved,
    }
    if next_frame:
        summary.update(val_mse=val["mse"], baseline_mse=val["baseline_mse"])
    log.write_json("summary.json", summary)
    log.info(f"done: {_val_text(val)}, "
             f"{summary['wall_time_s']:.0f} s -> {os.path.join(output_dir, 'summary.json')}")
    return summary
