"""The sequence-parallel case of ``divattn bench``: one divided block on a long clip over P processes.

``divattn bench --sequence-parallel 1,2`` times one TimeSformer-B-width divided block
(C = 768, 12 heads, MLP 4C), forward and backward, with the clip's frames sharded over P
processes of a gloo group on this machine (each rank one CPU thread), and counts the bytes
each rank hands to the collectives (:func:`divattn.sequence_parallel.count_communication`):
the frame-sharded block of :mod:`divattn.sequence_parallel` beside
:func:`ulysses_divided_block`, the same block with q, k, v and o of both attentions
re-sharded by heads (DeepSpeed-Ulysses' layout) on the same ops. On a GPU machine with
NCCL the same code runs with ``--device cuda`` (one GPU per rank).
"""

from __future__ import annotations

import datetime
import os
import queue
import statistics
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist

from .. import sequence_parallel as sp
from ..layers.blocks import DividedBlock
from ..layers.divided import add_after_first
from ..ops import spatial_attention_tokens, temporal_attention


def _qkv_patches(qkv: torch.Tensor, T: int, order: str) -> torch.Tensor:
    """``(B, 1 + N*T, 3, H, D)`` qkv with cls -> the patch tokens ``(B, T, N, 3, H, D)`` (a view)."""
    B, L, _, H, D = qkv.shape
    p = qkv[:, 1:]
    N = (L - 1) // T
    return p.view(B, N, T, 3, H, D).transpose(1, 2) if order == "hwt" else p.view(B, T, N, 3, H, D)


def _frames_to_heads(qkv5: torch.Tensor, shards: sp.FrameShards) -> torch.Tensor:
    """This rank's frames of every head ``(B, T_r, N, 3, H, D)`` -> every frame of its heads,
    time-major ``(T, B, N, 3, H/P, D)``; one differentiable all-to-all. The send buffer is
    packed in one copy: per destination s, its heads of this rank's frames ``(T_r, B, N, 3, H/P, D)``."""
    B, Tr, N, _, H, D = qkv5.shape
    P, Hr = shards.size, H // shards.size
    send = qkv5.unflatten(4, (P, Hr)).permute(4, 1, 0, 2, 3, 5, 6).reshape(-1)
    recv = sp.all_to_all(send, [send.numel() // P] * P, [Ts * B * N * 3 * Hr * D for Ts in shards.frame_sizes],
                         shards.group)
    return recv.view(shards.num_frames, B, N, 3, Hr, D)


def _heads_to_frames(o: torch.Tensor, shards: sp.FrameShards) -> torch.Tensor:
    """Every frame of this rank's heads, time-major ``(T, B, N, H/P, D)`` -> this rank's frames
    of every head ``(T_r, B, N, H, D)``; one differentiable all-to-all. The send buffer is ``o``
    itself (one run of frames per destination), copied once where it is not contiguous."""
    _, B, N, Hr, D = o.shape
    per = B * N * Hr * D
    recv = sp.all_to_all(o.reshape(-1), [Ts * per for Ts in shards.frame_sizes],
                         [shards.local_frames * per] * shards.size, shards.group)
    return torch.cat(recv.view(shards.size, shards.local_frames, B, N, Hr, D).unbind(0), -2)


def _frame_tokens(x: torch.Tensor, order: str) -> torch.Tensor:
    """``(B, T, N, H, D)`` -> ``(B, N*T, H*D)`` tokens in ``order``."""
    B, T, N, H, D = x.shape
    x = x.transpose(1, 2) if order == "hwt" else x
    return x.reshape(B, T * N, H * D)


def ulysses_divided_block(block: DividedBlock, x: torch.Tensor, shards: sp.FrameShards) -> torch.Tensor:
    """:class:`~divattn.layers.blocks.DividedBlock` on this rank's frames ``x`` ``(B, 1 + N*T_r, C)``,
    DeepSpeed-Ulysses style: for each attention, q, k and v of this rank's frames go to the
    ranks that own their heads (all frames of H/P heads each), the attention runs there on the
    divattn ops, and its output comes back (four all-to-alls of C values per token per
    attention, eight per block; the cls output's heads are all-gathered). For counting
    against the frame-sharded block; its outputs are the block's."""
    order, T = block.token_order, shards.num_frames
    attn, tattn = block.attn, block.temporal_attn
    B = x.shape[0]
    qkv = _frames_to_heads(_qkv_patches(tattn.qkv_heads(x, block.temporal_norm1), shards.local_frames, order), shards)
    _, _, N, _, Hr, D = qkv.shape
    q, k, v = qkv.view(1, T, B * N, 3, Hr, D).unbind(3)
    o = temporal_attention(q, k, v, scale=tattn.scale, backend=block.backend).view(T, B, N, Hr, D)
    o = _heads_to_frames(o, shards).transpose(0, 1)  # (B, T_r, N, H, D)
    x = add_after_first(x, block._temporal_residual(_frame_tokens(o, order)))

    qkv_all = attn.qkv_heads(x, block.norm1)
    qkv = _frames_to_heads(_qkv_patches(qkv_all, shards.local_frames, order), shards)
    q, k, v = qkv.transpose(0, 1).unbind(3)
    heads = slice(shards.rank * Hr, (shards.rank + 1) * Hr)
    cls = tuple(c[:, heads] for c in qkv_all[:, 0].unbind(1))
    o = spatial_attention_tokens(q, k, v, cls, scale=attn.scale, backend=block.backend)
    patches = o[:, 1:].view(B, T, N, Hr, D).transpose(0, 1)  # time-major: one run of frames per destination
    patches = _heads_to_frames(patches, shards).transpose(0, 1)  # (B, T_r, N, H, D)
    o_cls = sp.all_gather(o[:, :1], 2, shards.group)  # (B, 1, H, D): the mean over every frame, all heads
    tokens = torch.cat([o_cls.flatten(2), _frame_tokens(patches, order)], 1)
    x = x + block.drop_path(attn.out(tokens))
    return x + block.drop_path(block.mlp(x, block.norm2))


# -- the benchmark -----------------------------------------------------------------------------

DEFAULTS = {"cpu": dict(B=1, T=32, N=49), "cuda": dict(B=1, T=96, N=196)}
WIDTH = dict(dim=768, heads=12)  # TimeSformer-B


def _block(T_local: int, device, dtype) -> DividedBlock:
    torch.manual_seed(0)
    return DividedBlock(WIDTH["dim"], WIDTH["heads"], T_local, qkv_bias=True, backend=None).to(device, dtype)


def _step(fn, x: torch.Tensor, w: torch.Tensor) -> None:
    xs = x.detach().requires_grad_()
    (fn(xs) * w).sum().backward()


def _variant(variant: str, shape: dict, device, dtype):
    """``(fn, x, w)``: the block step of ``variant`` on this rank's input and loss weights."""
    B, T, N = shape["B"], shape["T"], shape["N"]
    C = WIDTH["dim"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1 + N * T, C, generator=g).to(device, dtype)
    w = torch.randn(B, 1 + N * T, C, generator=g).to(device, dtype)
    if variant == "single":
        return _block(T, device, dtype), x, w
    shards = sp.FrameShards(None, T)
    block = _block(shards.local_frames, device, dtype)
    x, w = (sp.shard_tokens(t, num_frames=T, order="hwt", has_cls=True) for t in (x, w))
    if variant == "frames":
        block.sequence = shards
        return block, x, w

    def ulysses(t):
        return ulysses_divided_block(block, t, shards)

    return ulysses, x, w


def measure(variant: str, shape: dict, rounds: int, device, dtype) -> dict:
    """On every rank of the default group: ``{"times": [s per step], "sent": {kind: bytes},
    "calls": {kind: n}}`` for ``rounds`` forward + backward steps of ``variant`` (the bytes of one)."""
    fn, x, w = _variant(variant, shape, device, dtype)
    _step(fn, x, w)  # warm-up
    with sp.count_communication() as comm:
        _step(fn, x, w)
    times = []
    for _ in range(rounds):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _step(fn, x, w)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"times": times, "sent": dict(comm.sent), "calls": dict(comm.calls)}


def _rank(rank: int, world: int, store: str, variants: list, shape: dict, rounds: int, threads: int,
          device_type: str, dtype, results) -> None:
    """One rank: for each variant, time ``rounds`` forward + backward steps and count one step's bytes."""
    torch.set_num_threads(threads)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
        for variant in variants:
            results.put((rank, variant, measure(variant, shape, rounds, device, dtype)))
    except BaseException as e:
        results.put((rank, None, {"error": f"{type(e).__name__}: {e}"}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def record(variant: str, world: int, shape: dict, got: dict, rounds: int, threads: int, dtype) -> dict:
    """The record of one variant from ``{rank: measure(...) or {"error": ...}}``."""
    record = {"variant": variant, "P": world, **shape, "C": WIDTH["dim"], "heads": WIDTH["heads"],
              "threads_per_rank": threads, "dtype": str(dtype).replace("torch.", "")}
    errors = [f"rank {r}: {v['error']}" for r, v in sorted(got.items()) if "error" in v]
    missing = sorted(set(range(world)) - set(got))
    if errors or missing:
        record.update(status="error", error="; ".join(errors + [f"rank {r} gave no result" for r in missing]))
        return record
    # a step ends when its slowest rank does
    per_step = [max(got[r]["times"][i] for r in got) for i in range(rounds)]
    sent = [sum(v["sent"].values()) for _, v in sorted(got.items())]
    record.update(status="ok", median_s=statistics.median(per_step), times_s=per_step, bytes_per_rank=sent,
                  by_kind=got[0]["sent"], calls=got[0]["calls"])
    if variant == "frames":
        record["formula_bytes_per_rank"] = [
            sum(sp.divided_block_bytes(shape["B"], shape["T"], shape["N"], WIDTH["dim"], world, r,
                                       element_size=torch.empty(0, dtype=dtype).element_size()).values())
            for r in range(world)]
    return record


def run_cases(variants: list, world: int, shape: dict, *, rounds: int = 3, threads: int = 1,
              device_type: str = "cpu", dtype=torch.float32, timeout_s: float = 1800.0) -> list:
    """One record per variant (``"single"``, ``"frames"``, ``"ulysses"``), all on one group of
    ``world`` processes, in turn."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    got = {v: {} for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank, args=(r, world, store, variants, shape, rounds, threads, device_type,
                                                 dtype, results)) for r in range(world)]
        for p in procs:
            p.start()
        try:
            deadline = time.monotonic() + timeout_s
            while any(len(g) < world for g in got.values()) and time.monotonic() < deadline:
                try:
                    rank, variant, value = results.get(timeout=1.0)
                except queue.Empty:
                    if all(p.exitcode is not None for p in procs):
                        break
                    continue
                for v in ([variant] if variant is not None else [v for v in variants if rank not in got[v]]):
                    got[v][rank] = value
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [record(v, world, shape, got[v], rounds, threads, dtype) for v in variants]


def plan(worlds) -> list:
    """``(P, variants)`` for each P: one process alone; the frame-sharded block and the Ulysses one."""
    return [(P, ["single"] if P == 1 else ["frames", "ulysses"]) for P in worlds]


def table(records: list) -> list:
    header = ("variant", "P", "median s", "MB sent / rank", "formula MB", "vs frames")
    frames = {r["P"]: r for r in records if r["variant"] == "frames" and r["status"] == "ok"}
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append((r["variant"], str(r["P"]), "error", r["error"][:60], "", ""))
            continue
        mb = max(r["bytes_per_rank"]) / 1e6
        formula = f"{max(r['formula_bytes_per_rank']) / 1e6:.2f}" if "formula_bytes_per_rank" in r else "-"
        ref = frames.get(r["P"])
        ratio = f"{max(r['bytes_per_rank']) / max(ref['bytes_per_rank']):.2f}x" if ref and r["P"] > 1 else "-"
        rows.append((r["variant"], str(r["P"]), f"{r['median_s']:.3f}", f"{mb:.2f}", formula, ratio))
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *rows)]


def main(worlds, *, B: Optional[int] = None, T: Optional[int] = None, N: Optional[int] = None, rounds: int = 3,
         threads: int = 1, device_type: str = "cpu", dtype=torch.float32) -> list:
    """Run and print the cases; returns the records."""
    shape = dict(DEFAULTS[device_type])
    shape.update({k: v for k, v in (("B", B), ("T", T), ("N", N)) if v is not None})
    print(f"one divided block, C = {WIDTH['dim']}, {WIDTH['heads']} heads, MLP 4C; clip B={shape['B']} "
          f"T={shape['T']} N={shape['N']} ({shape['B'] * shape['T'] * shape['N']} tokens), forward + backward, "
          f"{str(dtype).replace('torch.', '')} on {device_type}, {threads} thread(s) per rank, median of {rounds}")
    records = [r for P, variants in plan(worlds)
               for r in run_cases(variants, P, shape, rounds=rounds, threads=threads, device_type=device_type,
                                  dtype=dtype)]
    print("\n".join(table(records)))
    return records


class SavedBytes:
    """Bytes of the tensors autograd saves for the backward while inside (``with SavedBytes(params)
    as saved: ...; saved.total``), counted once per storage, parameters (not activations) left out."""

    def __init__(self, parameters=()):
        self.skip = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())
