"""One process or many (``torchrun``): rank, device, the few collectives the trainer needs,
and what a process says when another one of the run fails.

Every collective waits at most ``train.dist_timeout_s`` (the process group's timeout). A
rank that raises tells the others through the rendezvous store (``failed/<rank>``) before
it exits; a rank whose collective fails (a peer died, the wait timed out) or that
``torchrun`` stops with SIGTERM checks in (``here/<rank>``), waits a few seconds for the
others to do the same, and names the ranks that neither failed with a message nor checked
in: those were killed or hung. :func:`peer_failure` turns that into one sentence.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
# Imported before any process group exists: its functions take ``group=group.WORLD`` as a
# default argument, evaluated at import, and one import under a live group (DDP makes it)
# would hold that group past destroy_process_group. A group that outlives it is freed only
# at interpreter exit, where a gloo worker thread that frees a collective's tensor needs the
# GIL and aborts the process ("terminate called without an active exception").
import torch.distributed.nn  # noqa: F401

# how long a rank that met a failure waits for the others to check in before it names the
# missing ones (every live rank meets the failure within about this time: torchrun stops
# the others as soon as one process exits, and a dead peer fails any collective at once);
# a rank on this machine whose process is gone is named at once
CHECK_IN_S = 5.0


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float = 1800.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class PeerFailure(RuntimeError):
    """Another process of the run failed, died or stopped answering; the message names it."""


class Stopped(BaseException):
    """This process got SIGTERM (``torchrun`` stops every process when one fails)."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} was asked for but torch sees no CUDA device")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init(device_name: str, timeout_s: float = 1800.0) -> Dist:
    """Join the process group ``torchrun`` describes in the environment (NCCL on GPUs,
    gloo on CPU) with every collective limited to ``timeout_s`` seconds, or run alone when
    ``WORLD_SIZE`` is unset or 1. Under a process group, SIGTERM raises :class:`Stopped`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        signal.signal(signal.SIGTERM, _raise_stopped)
        store = _store()
        if store is not None:
            store.set(f"pid/{rank}", f"{socket.gethostname()} {os.getpid()}")
    return Dist(rank, world, local_rank, device, timeout_s)


def _raise_stopped(signum, frame):
    raise Stopped()


def shutdown(d: Dist) -> None:
    """Leave the process group. Called once nothing else holds it (the model's DDP wrapper and
    the mesh dropped), destroy_process_group frees the group and joins its worker threads."""
    _STORE.clear()
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass(frozen=True)
class Mesh:
    """The processes as a ``data x sequence`` grid: each row of ``sequence`` ranks shares every clip
    (rank ``r`` is row ``r // sequence``, column ``r % sequence``); ``device_mesh`` is the 2-D
    :class:`~torch.distributed.device_mesh.DeviceMesh` (None without a sequence dimension)."""

    data: int = 1
    sequence: int = 1
    data_rank: int = 0
    sequence_rank: int = 0
    device_mesh: Optional[object] = None

    @property
    def sequence_group(self):
        return self.device_mesh.get_group("sequence")

    @property
    def counts(self) -> bool:
        """Whether this rank counts a clip's items (one rank per sequence group does)."""
        return self.sequence_rank == 0


def mesh(d: Dist, sequence: int) -> Mesh:
    """The ``data x sequence`` mesh of ``d``'s processes; ValueError unless ``sequence`` divides them.

    The subgroups are made with the run's collective timeout (``train.dist_timeout_s``), so a
    sequence-parallel all-to-all waits no longer than any other collective.
    """
    if d.world_size % sequence:
        raise ValueError(f"parallel.sequence={sequence} needs a multiple of {sequence} processes (torchrun "
                         f"--nproc_per_node); this run has {d.world_size}")
    if sequence == 1:
        return Mesh(data=d.world_size, data_rank=d.rank)
    from torch.distributed.device_mesh import DeviceMesh

    rows = d.world_size // sequence
    grid = torch.arange(d.world_size).view(rows, sequence)
    timeout = datetime.timedelta(seconds=d.timeout_s)
    mine = {}
    # every process makes every subgroup, in the same order
    for name, groups in (("data", grid.t().tolist()), ("sequence", grid.tolist())):
        for ranks in groups:
            group = dist.new_group(ranks, timeout=timeout)
            if d.rank in ranks:
                mine[name] = group
    device_mesh = DeviceMesh.from_group([mine["data"], mine["sequence"]], d.device.type, mesh=grid,
                                        mesh_dim_names=("data", "sequence"))
    return Mesh(rows, sequence, d.rank // sequence, d.rank % sequence, device_mesh)


def all_reduce_sum(d: Dist, values) -> torch.Tensor:
    """Sum a list of numbers (or a tensor) over all ranks; float64 on the rank's device.

    A tensor on the device stays there (no host sync); a list is reduced and returned on the CPU.
    """
    on_device = isinstance(values, torch.Tensor) and values.device == d.device
    t = torch.as_tensor(values, dtype=torch.float64)
    if d.enabled:
        t = t.to(d.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t if on_device else t.cpu()


def all_gather_object(d: Dist, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` alone)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


_STORE = []  # the one client of this process, kept until shutdown


def _store() -> Optional[dist.Store]:
    """A client of the run's rendezvous store (torchrun's agent, or rank 0 without it)."""
    if _STORE:
        return _STORE[0]
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=CHECK_IN_S), wait_for_workers=False)
    except (KeyError, ValueError, RuntimeError):
        return None
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    _STORE.append(dist.PrefixStore(f"divattn/{run}/", store))
    return _STORE[0]


def announce_failure(d: Dist, message: str) -> None:
    """Tell the other ranks that this one is stopping because of ``message`` (best effort)."""
    if not d.enabled:
        return
    store = _store()
    if store is not None:
        try:
            store.set(f"failed/{d.rank}", message)
        except RuntimeError:
            pass


def peer_failure(d: Dist, cause: str) -> PeerFailure:
    """After ``cause`` (a failed collective, SIGTERM): which other ranks failed, and why.

    Checks in, waits up to :data:`CHECK_IN_S` seconds for every other rank to check in or
    to have announced a failure, and names the rest as killed or hung.
    """
    store = _store()
    if store is None:
        return PeerFailure(f"rank {d.rank} lost the other processes ({cause}) and cannot reach the rendezvous "
                           "store (rank 0 or torchrun, which hosts it, is gone)")
    failed, silent, gone = {}, [], []
    try:
        store.set(f"here/{d.rank}", "1")
        others = [r for r in range(d.world_size) if r != d.rank]
        deadline = time.monotonic() + CHECK_IN_S
        while True:
            pending = []
            for r in list(others):
                if r in failed:
                    continue
                if store.check([f"failed/{r}"]):
                    failed[r] = store.get(f"failed/{r}").decode(errors="replace")
                elif store.check([f"here/{r}"]):
                    continue
                elif _gone(store, r):
                    gone.append(r)
                    others.remove(r)
                else:
                    pending.append(r)
            if not pending or time.monotonic() > deadline:
                silent = pending
                break
            time.sleep(0.1)
    except RuntimeError:
        return PeerFailure(f"rank {d.rank} lost the other processes ({cause}) and then the rendezvous store "
                           "(rank 0 or torchrun, which hosts it, is gone)")
    parts = [f"rank {r} failed: {msg}" for r, msg in sorted(failed.items())]
    parts += [f"rank {r} was killed (its process is gone)" for r in gone]
    if silent:
        ranks = ", ".join(map(str, silent))
        parts.append(f"rank{'s' if len(silent) > 1 else ''} {ranks} stopped answering (killed, or hung for "
                     f"train.dist_timeout_s={d.timeout_s:g} s)")
    if not parts:
        parts.append(f"every other rank is alive; this one gave up: {cause}")
    return PeerFailure(f"rank {d.rank} stops: " + "; ".join(parts))


def _gone(store, rank: int) -> bool:
    """Rank ``rank`` ran on this machine and its process has exited (or is a zombie)."""
    if not store.check([f"pid/{rank}"]):
        return False
    host, pid = store.get(f"pid/{rank}").decode().rsplit(" ", 1)
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return False
