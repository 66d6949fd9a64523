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
import multiprocessing
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, List, Optional

import torch
from torch import nn

from ..data import DataError, EpochSampler, ShardSampler, build_datasets, collate_skipping
from ..data.checks import describe, find_problems
from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, diff, dump
from .logs import CHECKPOINT, RunLog
from .tasks import autocast, evaluate, evaluate_next_frame, make_task, next_frame_loss, run_model  # noqa: F401

CHECKPOINT_FORMAT = 2  # 1: before the run-wide sums, timings and distinct skipped files


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or inf for ``train.max_nonfinite`` optimizer steps in a row."""


@dataclass
class Progress:
    """Where a run is, and everything it reports that is not recomputed; saved in every
    checkpoint, the same on every rank (sums are over all ranks)."""

    epoch: int = 0  # epochs finished
    position: int = 0  # micro-batches done in the current epoch
    step: int = 0  # optimizer steps attempted (skipped ones included)
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    nonfinite_run: int = 0  # of those, in a row just now
    epoch_loss: float = 0.0  # sums over this epoch's items so far (all ranks)
    epoch_correct: float = 0.0
    epoch_items: float = 0.0
    skipped_files: List[str] = field(default_factory=list)  # distinct undecodable training files (all ranks)
    epoch_skipped: List[str] = field(default_factory=list)  # of those, the ones met in this epoch
    report_pending: bool = False  # epoch `epoch` has finished but its evaluation and report are not written
    val: Optional[dict] = None  # the last evaluation
    train_time_s: float = 0.0  # whole run, across resumes
    wall_time_s: float = 0.0
    clips: int = 0  # clips trained on (all ranks)

    @classmethod
    def load(cls, saved: dict) -> "Progress":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


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
              mlp_ratio=m["mlp_ratio"], qkv_bias=m["qkv_bias"], drop_path_rate=m["drop_path_rate"], backend=backend,
              memory=m["memory"])
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
    """Fused AdamW or SGD; no weight decay on biases, norms, position/time embeddings and cls tokens."""
    o = cfg["optim"]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(k in name for k in ("pos_embed", "time_embed", "cls_token"))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: the step reads the skip flag (``found_inf``) on the device, so skipping a step
    # whose loss was not finite needs no host sync
    if o["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), fused=True)
    opt = torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=o["momentum"] > 0, fused=True)
    if o["momentum"] > 0:
        # the fused first step would leave its new momentum buffers unset when that step is
        # skipped; zero buffers make every step the same update (buf = 0 * m + g on the first)
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


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


def train(cfg: dict, output_dir: str, *, resume: Optional[str] = None,
          model_fn: Optional[Callable[[dict, int, object], nn.Module]] = None) -> dict:
    """Train as ``cfg`` says, writing into ``output_dir``; returns the summary (rank 0's).

    ``resume``: a checkpoint to continue from. ``model_fn(cfg, num_classes, backend)``
    replaces :func:`build_model` (for models outside the registry). Under ``torchrun``, a
    rank that raises tells the others, and a rank whose collective fails or times out raises
    :class:`~divattn.train.distributed.PeerFailure` naming the rank that failed.
    """
    dist = distributed.init(cfg["device"], cfg["train"]["dist_timeout_s"])
    log = RunLog(output_dir, enabled=dist.is_main, tensorboard=cfg["log"]["tensorboard"])
    run = None
    try:
        run = _Run(cfg, output_dir, resume, model_fn or build_model, dist, log)
        return run.run()
    except distributed.Stopped:
        raise distributed.peer_failure(dist, "stopped by SIGTERM") from None
    except (RuntimeError, OSError) as e:
        if dist.enabled and _is_collective_error(e):
            raise distributed.peer_failure(dist, " ".join(str(e).split())[:200]) from e
        distributed.announce_failure(dist, _one_line(e))
        raise
    except BaseException as e:
        distributed.announce_failure(dist, _one_line(e))
        raise
    finally:
        if run is not None:
            run.close()
            run = None  # its DDP wrapper and mesh hold the process groups shutdown frees
        log.close()
        distributed.shutdown(dist)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300]


def _is_collective_error(e: BaseException) -> bool:
    """A failed or timed-out collective (gloo, NCCL), as opposed to this rank's own error."""
    backend_error = getattr(torch.distributed, "DistBackendError", None)
    if backend_error is not None and isinstance(e, backend_error):
        return True
    text = str(e)
    return any(k in text for k in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "Timed out waiting", "timed out", "ProcessGroupGloo", "NCCL"))


@dataclass
class _StepRecord:
    """One optimizer step awaiting the next host sync: its stats summed over ranks, on the device."""

    epoch: int
    step: int
    micro: int  # the step's last micro-batch in the epoch
    index: list  # that micro-batch's item indices
    stats: torch.Tensor  # (loss sum, correct, items, non-finite micro-batches), float64
    losses: list  # this rank's (micro, index, loss) of the step


def _worker_context(num_workers: int):
    """Data workers start from a fork server, never by forking the trainer: a fork of a process
    with other threads (the process group's, the previous loader's queue feeder, TensorBoard's
    writer) copies whatever lock one of them held, and the worker can hang on it forever."""
    if num_workers == 0:
        return None
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


class _Run:
    """One ``divattn train`` process: setup, then micro-steps, optimizer steps, epoch ends, summary.

    Host syncs happen only in :meth:`sync` (every ``train.log_every`` steps, at checkpoints
    and epoch ends) and in evaluation; everything else stays on the device.
    """

    def __init__(self, cfg, output_dir, resume, model_fn, dist, log):
        self.t_start = time.time()
        self.cfg, self.output_dir, self.dist, self.log = cfg, output_dir, dist, log
        self.tcfg = tcfg = cfg["train"]
        self.task = make_task(cfg.get("task", "classify"))
        seed = cfg["seed"]
        log.info(f"divattn train -> {output_dir}")
        ckpt = load_checkpoint(resume) if resume else None
        if ckpt is not None and ckpt.get("format") not in (1, CHECKPOINT_FORMAT):
            raise CheckpointError(f"{resume}: not a divattn training checkpoint (format {ckpt.get('format')!r})")

        self.train_set, self.val_set, num_classes = build_datasets(cfg["data"])
        self.task.prepare(self.train_set, self.val_set)
        self._check_data(num_classes if self.task.has_top1 else None)
        backend, why = resolve_backend(cfg["model"]["backend"], dist.device)
        threads_why = None
        if dist.device.type == "cpu":
            threads, threads_why = cpu_threads(tcfg["threads"], cfg["data"]["num_workers"])
            torch.set_num_threads(threads)
        self.mesh = mesh = self._mesh()
        torch.manual_seed(seed)  # identical initial weights on every rank
        self.model = model = model_fn(cfg, num_classes, backend).to(dist.device)
        # the ranks of a sequence group draw alike (the same stochastic depth for their shared clips)
        torch.manual_seed(seed + mesh.data_rank)
        if mesh.sequence > 1:
            self._parallelize(model)
        params = sum(p.numel() for p in model.parameters())
        next_frame = not self.task.has_top1
        self.resolved = {"device": str(dist.device), "backend": backend if backend is not None else "auto-dispatch",
                         "world_size": dist.world_size, "num_classes": None if next_frame else num_classes,
                         "train_items": len(self.train_set), "val_items": len(self.val_set), "parameters": params,
                         "cpu_threads": torch.get_num_threads(), "data_parallel": mesh.data,
                         "sequence_parallel": mesh.sequence}
        log.info(f"device {dist.device}, {dist.world_size} process(es); {why}")
        if mesh.sequence > 1:
            shards = model.sequence
            log.info(f"parallel.sequence={mesh.sequence}: a {mesh.data} x {mesh.sequence} (data x sequence) mesh; "
                     f"the {mesh.sequence} ranks of a sequence group share each clip, holding "
                     f"{', '.join(str(s * shards.tubelet_size) for s in shards.frame_sizes)} of its frames")
        if threads_why:
            log.info(threads_why)
        log.info(f"model {cfg['model']['name']} ({cfg['model']['attention_type']}), {params / 1e6:.2f} M parameters, "
                 f"{'next-frame prediction' if next_frame else f'{num_classes} classes'}; "
                 f"data {cfg['data']['dataset']}: {len(self.train_set)} train / {len(self.val_set)} val items")
        log.write_text("config.yaml", dump({**cfg, "resolved": self.resolved}))

        self.ema = None
        if tcfg["ema_decay"] is not None:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(model, use_buffers=True)
        self.optimizer = build_optimizer(cfg, model)
        self.batch_size, self.accum = tcfg["batch_size"], tcfg["accum_steps"]
        self.sampler = EpochSampler(self.train_set, num_replicas=mesh.data, rank=mesh.data_rank, seed=seed)
        self.micro_per_epoch = (self.sampler.num_samples // self.batch_size) // self.accum * self.accum
        self.steps_per_epoch = self.micro_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.train_set)} training items over {mesh.data} data-parallel process group(s) "
                            f"do not fill "
                            f"one optimizer step of train.batch_size {self.batch_size} x train.accum_steps {self.accum}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(dist.device.type) if tcfg["amp"] == "fp16" else None
        self.state = Progress()
        if ckpt is not None:
            self._restore(ckpt, resume)

        self.train_model = model
        if dist.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        if tcfg["compile"]:
            self.train_model = torch.compile(self.train_model)
        workers = cfg["data"]["num_workers"]
        context = _worker_context(workers)
        self.train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=collate_skipping, drop_last=True, generator=torch.Generator().manual_seed(seed),
            pin_memory=dist.device.type == "cuda", multiprocessing_context=context, persistent_workers=workers > 0)
        self.val_loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=cfg["eval"]["batch_size"], num_workers=workers,
            sampler=ShardSampler(self.val_set, num_replicas=mesh.data, rank=mesh.data_rank),
            collate_fn=collate_skipping, generator=torch.Generator().manual_seed(seed),
            pin_memory=dist.device.type == "cuda", multiprocessing_context=context, persistent_workers=workers > 0)
        self.eval_model = self.ema.module if self.ema is not None else model
        # an item-less micro-batch under DDP still runs the model (with weight 0) so that
        # every rank joins the same gradient all-reduces
        d = cfg["data"]
        self.placeholder = (torch.zeros(1, 3, d["num_frames"], d["crop_size"], d["crop_size"], device=dist.device),
                            torch.zeros(1, dtype=torch.int64, device=dist.device))

        self.acc = self._zeros()  # this step's (loss sum, correct, items, non-finite) on this rank
        self.losses = []  # this step's (micro, index, loss) on this rank
        self.backward_ran = False
        self.window: List[_StepRecord] = []  # steps since the last sync
        self.new_skips = []  # (path, reason) met on this rank since the last checkpoint
        self.known_skips = set(self.state.skipped_files)
        self.wall_base = self.state.wall_time_s
        self.t_segment = None  # when the current stretch of training began (None: paused)
        self.epoch_time = 0.0
        self.epoch_clips = self.clips_counted = 0
        self.bar = None

        s = self.state
        if s.report_pending:
            log.start(keep_epochs=s.epoch - 1, purge_step=s.step)
        else:
            log.start(keep_epochs=s.epoch, purge_step=s.step + 1 if ckpt is not None else 0)

    # -- setup helpers ---------------------------------------------------------------------

    def _mesh(self) -> distributed.Mesh:
        """The data x sequence mesh ``parallel.sequence`` asks for (ConfigError when it cannot be)."""
        sequence = self.cfg["parallel"]["sequence"]
        if sequence > 1 and self.tcfg["compile"]:
            raise ConfigError("parallel.sequence > 1 with train.compile=true: compiling a model parallelized over "
                              "frames is not supported yet; set train.compile=false")
        if sequence > 1 and self.cfg["data"]["variable_frames"]:
            raise ConfigError("parallel.sequence > 1 with data.variable_frames=true: a padded batch of clips of "
                              "different lengths runs in one process (the ranks of a sequence group hold equal "
                              "frame shards); set one of them back")
        try:
            return distributed.mesh(self.dist, sequence)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _parallelize(self, model: nn.Module) -> None:
        """Shard each clip's frames over this rank's sequence group (the model's ``parallelize``)."""
        from ..sequence_parallel import SequenceParallelError

        if not hasattr(model, "parallelize"):
            raise ConfigError(f"parallel.sequence={self.mesh.sequence}: {type(model).__name__} has no parallelize(); "
                              "sequence parallelism serves the bundled video models")
        try:
            model.parallelize(self.mesh.sequence_group, num_frames=self.cfg["data"]["num_frames"])
        except SequenceParallelError as e:
            raise ConfigError(f"parallel.sequence={self.mesh.sequence}: {e}") from None
        self.task.sequence = model.sequence

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(4, dtype=torch.float64, device=self.dist.device)

    def _check_data(self, num_classes: Optional[int]) -> None:
        """Every listed file exists, labels are in range, validation headers decode (on all
        ranks together, each checking its share); raises :class:`DataError` before any step."""
        d, dist = self.cfg["data"], self.dist
        t0 = time.time()
        mine = [find_problems(ds, range(dist.rank, len(ds), dist.world_size), num_classes or 2**62,
                              probe=probe and d["probe_val"])
                for ds, probe in ((self.train_set, False), (self.val_set, True))]
        found = distributed.all_gather_object(dist, mine)
        hint = f"data.root={d['root']!r}" if d.get("root") else None
        for k, (name, ds) in enumerate((("training", self.train_set), ("validation", self.val_set))):
            message = describe(name, [f[k] for f in found], len(ds), num_classes, hint)
            if message:
                if k == 1 and any(f[1]["undecodable"] for f in found):
                    message += "; data.probe_val=false skips this check"
                raise DataError(message)
        if hasattr(self.val_set, "samples"):
            probed = " (validation headers decoded)" if d["probe_val"] else ""
            self.log.info(f"data checked in {time.time() - t0:.1f} s: every listed file exists{probed}")

    def _restore(self, ckpt: dict, resume: str) -> None:
        changed = diff(ckpt["config"], self.cfg)
        if changed:
            self.log.info("resuming with a changed config: " + "; ".join(changed))
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.ema is not None and ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = " ".join(str(e).split())
            raise CheckpointError(f"{resume} does not fit this config's model or optimizer "
                                  f"({first[:240]}{'...' if len(first) > 240 else ''})") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        state = Progress.load(ckpt["progress"])
        if state.position > self.micro_per_epoch:
            raise CheckpointError(f"{resume}: position {state.position} is past this config's "
                                  f"{self.micro_per_epoch} micro-batches per epoch (batch size or data changed?)")
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
        self.state = state
        self.log.info(f"resumed from {resume}: epoch {state.epoch}, step {state.step}, "
                      f"{state.position}/{self.micro_per_epoch} micro-batches into the epoch")

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> dict:
        s, epochs = self.state, self.tcfg["epochs"]
        self.log.info(f"{epochs} epochs x {self.steps_per_epoch} steps of {self.batch_size} x {self.accum} x "
                      f"{self.mesh.data} clips")
        if s.report_pending:
            # killed between the epoch-end checkpoint and the end of its report: report again
            if s.step % self.tcfg["log_every"] == 0:
                self._log_step(self.micro_per_epoch, 0.0)
            self._report_epoch()
        for epoch in range(s.epoch, epochs):
            self._train_epoch(epoch)
            self._end_epoch()
        return self._summary()

    def _train_epoch(self, epoch: int) -> None:
        s, accum = self.state, self.accum
        start = s.position
        self.sampler.set_epoch(epoch, start=start * self.batch_size)
        self.model.train()
        bar = self.log.progress(self.micro_per_epoch, start, f"epoch {epoch + 1}/{self.tcfg['epochs']}",
                                self.cfg["log"]["progress"])
        self.bar = bar
        self.epoch_time, self.epoch_clips, self.clips_counted = 0.0, 0, 0
        self.t_segment = time.time()
        batches = iter(self.train_loader)
        for micro in range(start, self.micro_per_epoch):
            self._micro_step(next(batches), micro, last=(micro + 1) % accum == 0)
            if bar is not None:
                bar.update(1)
            if (micro + 1) % accum == 0:
                self._optimizer_step(epoch, micro)
                self._after_step(micro)
        del batches
        if bar is not None:
            bar.close()
        self.bar = None

    def _micro_step(self, batch: dict, micro: int, last: bool) -> None:
        """Forward and backward of one micro-batch; its loss, correct count, item count and
        finiteness are added to this step's sums on the device."""
        n = len(batch["label"])
        self.new_skips += [(s.path, s.reason) for s in batch["skipped"]]
        self.epoch_clips += n * self.mesh.data
        self.last_index = batch["indices"]
        if n == 0 and not self.dist.enabled:
            return
        frames = batch.get("frames") if n else None  # a padded batch: each clip's own frame count
        if n:
            video = batch["video"].to(self.dist.device, non_blocking=True)
            labels = batch["label"].to(self.dist.device, non_blocking=True)
        else:
            video, labels = self.placeholder
        sync = self.train_model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
        with sync:
            with autocast(self.dist.device, self.tcfg["amp"]):
                out = run_model(self.train_model, video, frames, self.task.sequence)
            loss = self.task.loss(out, video, labels, frames)
            scaled = loss / self.accum if n else loss * 0.0
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.backward_ran = True
        if n and self.mesh.counts:  # a sequence group's ranks have the same loss: one counts it
            ok = torch.isfinite(loss)
            correct = self.task.correct(out, labels)
            zero = torch.zeros((), dtype=torch.float64, device=loss.device)
            self.acc += torch.stack([torch.where(ok, loss.double() * n, zero),
                                     zero if correct is None else torch.where(ok, correct.double(), zero),
                                     ok.double() * n, (~ok).double()])
            self.losses.append((micro, batch["indices"], loss.detach()))

    def _optimizer_step(self, epoch: int, micro: int) -> None:
        """One all-reduce of the step's sums, then the update, skipped on the device (the fused
        optimizer's ``found_inf``) when any micro-batch's loss was not finite or no rank had items."""
        stats = distributed.all_reduce_sum(self.dist, self.acc)
        skip = (stats[3] > 0) | (stats[2] == 0)
        opt, scaler, clip = self.optimizer, self.scaler, self.cfg["optim"]["clip_grad"]
        if self.backward_ran:
            if scaler is not None:
                scaler.unscale_(opt)
            if clip is not None or scaler is not None:
                norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip is not None else math.inf)
                if scaler is not None:
                    skip = skip | ~torch.isfinite(norm)
            opt.found_inf = skip.float()
            opt.step()
            opt.found_inf = None
            if scaler is not None:
                scaler.update()
            opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                self._update_ema(1.0 - skip.float())
        with warnings.catch_warnings():
            # the schedule follows the position in the run, stepped or skipped
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.state.step += 1
        self.state.position = micro + 1
        self.window.append(_StepRecord(epoch, self.state.step, micro, self.last_index, stats, self.losses))
        self.acc, self.losses, self.backward_ran = self._zeros(), [], False

    @torch.no_grad()
    def _update_ema(self, keep: torch.Tensor) -> None:
        """``ema += w * (model - ema)`` with ``w = (1 - decay) * keep`` (1 on the first update: a
        copy), all on the device; a skipped step (``keep`` 0) leaves it as it was."""
        ema, decay = self.ema, self.tcfg["ema_decay"]
        first = ema.n_averaged == 0
        w = torch.where(first, 1.0, 1.0 - decay).float() * keep
        for e, p in zip(list(ema.module.parameters()) + list(ema.module.buffers()),
                        list(self.model.parameters()) + list(self.model.buffers())):
            if e.is_floating_point():
                e.lerp_(p.detach(), w.to(e.dtype))
            else:
                e.copy_(torch.where(keep > 0, p, e))
        ema.n_averaged += keep.long()

    def _after_step(self, micro: int) -> None:
        """The step's log line and TensorBoard points, and its checkpoint, when due (host syncs)."""
        s, t = self.state, self.tcfg
        due_log = s.step % t["log_every"] == 0
        due_checkpoint = t["checkpoint_every"] and s.step % t["checkpoint_every"] == 0 and s.position < self.micro_per_epoch
        if due_log or due_checkpoint:
            self.sync()
        if due_log:
            self._log_step(micro + 1, self.epoch_clips / max(self._epoch_elapsed(), 1e-9))
        if due_checkpoint:
            self._pause()
            self._checkpoint()
            self._go_on()

    def sync(self) -> None:
        """Read the sums of the steps since the last sync (one host sync): add them to the
        epoch's totals, log the skipped steps, and stop after ``train.max_nonfinite`` in a row."""
        if not self.window:
            return
        stats = torch.stack([r.stats for r in self.window])
        losses = [loss for r in self.window for _, _, loss in r.losses]
        flat = torch.cat([stats.flatten()] + ([torch.stack(losses).double()] if losses else [])).tolist()
        rows = [flat[4 * i: 4 * i + 4] for i in range(len(self.window))]
        loss_values = iter(flat[4 * len(self.window):])
        s, t = self.state, self.tcfg
        for record, (loss_sum, correct, items, nonfinite) in zip(self.window, rows):
            s.epoch_loss += loss_sum
            s.epoch_correct += correct
            s.epoch_items += items
            mine = [(micro, index, next(loss_values)) for micro, index, _ in record.losses]
            if nonfinite:
                s.skipped_steps += 1
                s.nonfinite_run += 1
                bad = [(micro, index, value) for micro, index, value in mine if not math.isfinite(value)]
                where = f"at epoch {record.epoch + 1}, step {record.step}"
                for micro, index, value in bad:
                    self.log.info(f"non-finite loss ({value}) {where}, batch {micro} of the epoch "
                                  f"({_describe_batch(self.train_set, index)}): step skipped")
                if not bad:
                    self.log.info(f"non-finite loss on another process {where}: step skipped")
                if s.nonfinite_run >= t["max_nonfinite"]:
                    self.window = []
                    raise NonFiniteLossError(
                        f"the loss was not finite for {s.nonfinite_run} optimizer steps in a row, the last {where}, "
                        f"batch {record.micro} of the epoch "
                        f"({_describe_batch(self.train_set, record.index)}); stopping "
                        f"(train.max_nonfinite={t['max_nonfinite']})")
            elif items > 0:
                s.nonfinite_run = 0
        self.window = []

    def _log_step(self, micro_done: int, rate: float) -> None:
        s = self.state
        running = s.epoch_loss / max(s.epoch_items, 1)
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.scalars(s.step, {"train/loss": running, "train/lr": lr, "train/clips_per_s": rate})
        bar = self.bar
        if bar is not None:
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}", refresh=False)
        else:
            self.log.info(f"epoch {s.epoch + 1 if not s.report_pending else s.epoch}/{self.tcfg['epochs']} "
                          f"step {s.step} ({micro_done}/{self.micro_per_epoch}): "
                          f"loss {running:.4f} lr {lr:.2e} {rate:.1f} clips/s")

    # -- clocks: training time excludes checkpoints and evaluation ---------------------------------

    def _epoch_elapsed(self) -> float:
        return self.epoch_time + (time.time() - self.t_segment if self.t_segment is not None else 0.0)

    def _pause(self) -> None:
        if self.t_segment is not None:
            spent = time.time() - self.t_segment
            self.epoch_time += spent
            self.state.train_time_s += spent
            self.t_segment = None
        self.state.clips += self.epoch_clips - self.clips_counted
        self.clips_counted = self.epoch_clips

    def _go_on(self) -> None:
        self.t_segment = time.time()

    # -- epoch end, checkpoints, summary ---------------------------------------------------------

    def _end_epoch(self) -> None:
        self._pause()
        self.sync()
        s = self.state
        s.epoch, s.position, s.report_pending = s.epoch + 1, 0, True
        self._checkpoint()  # before evaluation: a failing evaluation loses nothing
        self._report_epoch()

    def _report_epoch(self) -> None:
        s, t, epochs = self.state, self.tcfg, self.tcfg["epochs"]
        train_loss = s.epoch_loss / max(s.epoch_items, 1)
        train_top1 = 100.0 * s.epoch_correct / max(s.epoch_items, 1)
        val = None
        if s.epoch % t["eval_every"] == 0 or s.epoch == epochs:
            val = self.task.evaluate(self.eval_model, self.val_loader, self.dist, t["amp"])
            s.val = val
        rate = self.epoch_clips / max(self.epoch_time, 1e-9)
        msg = (f"epoch {s.epoch}/{epochs}: train loss {train_loss:.4f}"
               f"{f' top-1 {train_top1:.1f}%' if self.task.has_top1 else ''}, "
               f"{rate:.1f} clips/s, {self.epoch_time:.1f} s")
        if val is not None:
            msg += f"; {self.task.val_text(val)} loss {val['loss']:.4f} ({val['count']} items)"
        if s.epoch_skipped:
            msg += f"; {len(s.epoch_skipped)} undecodable training files skipped"
        self.log.info(msg)
        self.log.metrics({"epoch": s.epoch, "step": s.step, "lr": self.optimizer.param_groups[0]["lr"],
                          "train_loss": train_loss, "train_top1": train_top1,
                          "val_top1": val and val["top1"], "val_top5": val and val["top5"],
                          "val_loss": val and val["loss"], "clips_per_s": rate, "skipped": len(s.epoch_skipped),
                          "time_s": self.wall_base + time.time() - self.t_start})
        self.log.scalars(s.step, {"epoch/train_loss": train_loss, "epoch/train_top1": train_top1,
                                  "val/top1": val and val["top1"], "val/top5": val and val["top5"],
                                  "val/loss": val and val["loss"], "val/baseline_mse": val and val.get("baseline_mse")})
        s.epoch_loss = s.epoch_correct = s.epoch_items = 0.0
        s.epoch_skipped = []
        s.report_pending = False

    def _merge_skips(self, gathered: list) -> None:
        """Add the undecodable files every rank met to the run's distinct list; log each once."""
        s = self.state
        for skips in gathered:
            for path, reason in skips:
                if path not in self.known_skips:
                    self.known_skips.add(path)
                    s.skipped_files.append(path)
                    self.log.info(f"skipped undecodable training file {path}: {reason}")
                if path not in s.epoch_skipped:
                    s.epoch_skipped.append(path)
        self.new_skips = []

    def _checkpoint(self) -> None:
        """Every rank's RNG state and undecodable files to rank 0, which writes the checkpoint
        atomically; the others wait for it (a barrier), so no rank runs ahead of a checkpoint."""
        gathered = distributed.all_gather_object(self.dist, (rng_state(), self.new_skips))
        self._merge_skips([skips for _, skips in gathered])
        s = self.state
        s.wall_time_s = self.wall_base + time.time() - self.t_start
        if self.dist.is_main:
            save_checkpoint(os.path.join(self.output_dir, CHECKPOINT), {
                "format": CHECKPOINT_FORMAT, "config": self.cfg, "progress": asdict(s),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": [r for r, _ in gathered]})
        distributed.barrier(self.dist)

    def _summary(self) -> dict:
        s, val = self.state, self.state.val
        if val is None:
            raise RuntimeError("the run ended without an evaluation")
        wall = self.wall_base + time.time() - self.t_start
        summary = {
            "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"], "val_items": val["count"],
            "epochs": s.epoch, "steps": s.step, "skipped_steps": s.skipped_steps,
            "skipped_train_items": len(s.skipped_files),
            "clips_per_s": s.clips / s.train_time_s if s.train_time_s > 0 else None,
            "train_time_s": s.train_time_s, "wall_time_s": wall,
            "model": self.cfg["model"]["name"], "attention_type": self.cfg["model"]["attention_type"],
            "ema": self.ema is not None, "task": self.task.name, **self.resolved,
        }
        if not self.task.has_top1:
            summary.update(val_mse=val["mse"], baseline_mse=val["baseline_mse"])
        self.log.write_json("summary.json", summary)
        self.log.info(f"done: {self.task.val_text(val)}, "
                      f"{wall:.0f} s -> {os.path.join(self.output_dir, 'summary.json')}")
        return summary

    def close(self) -> None:
        """Stop the persistent data workers."""
        for name in ("train_loader", "val_loader"):
            loader = getattr(self, name, None)
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None:
                iterator._shutdown_workers()


def _describe_batch(dataset, indices) -> str:
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return "files " + ", ".join(samples[i][0] for i in indices)
    return f"items {indices}"
