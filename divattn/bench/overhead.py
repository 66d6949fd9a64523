"""What the op call path costs: per-call time over the kernel it ends in, and its depth.

:func:`call_overhead` times a public op on a tiny input (``B=1, T=2, N=4, H=1, D=8``:
the attention itself is a few microseconds) against ``F.scaled_dot_product_attention``
called directly on the same sequences already laid out as it wants them, interleaving
the two call by call so that a disturbance of the machine hits both; the difference of
the medians is what the path adds. :func:`frames_to_launch` counts the Python frames
from the public function down to the call that launches the kernel (a Triton launch,
the CPU flash attention op, or SDPA): a structural figure, the same on every machine.

:func:`kernel_path_overhead` times the kernel backends' path with launchers that do
nothing: the Python a call of the Triton or CUDA backend costs before and after its
kernels, which a GPU kernel of a few tens of microseconds waits on.

``python -m divattn bench --overhead`` prints all three.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

TINY = dict(B=1, T=2, N=4, H=1, D=8)


def _tiny_inputs(requires_grad: bool, order: str, generator: Optional[torch.Generator] = None):
    """q, k, v views of one ``(B, N*T, 3, H, D)`` qkv in ``order``, and the same temporal
    sequences as contiguous ``(B*N, H, T, D)`` tensors for SDPA."""
    from ..ops import split_qkv

    B, T, N, H, D = TINY.values()
    qkv = torch.randn(B, T * N, 3, H, D, generator=generator, requires_grad=requires_grad)
    q, k, v = split_qkv(qkv, T, N, order=order, has_cls=False)
    seqs = [x.detach().permute(0, 2, 3, 1, 4).reshape(B * N, H, T, D).requires_grad_(requires_grad)
            for x in (q, k, v)]
    return qkv, (q, k, v), seqs


def call_overhead(backend: str = "torch", *, order: str = "hwt", rounds: int = 2000, warmup: int = 200,
                  passes: tuple = ("fwd", "fwd+grad", "fwd+bwd")) -> dict:
    """{pass: (median µs of divattn.temporal_attention, median µs of SDPA, difference)}.

    ``fwd``: inference (no autograd recording); ``fwd+grad``: a forward that autograd
    records; ``fwd+bwd``: forward and ``backward()`` of the output's sum. In ``"hwt"``
    order (TimeSformer's) the temporal output is the kernel's own; in ``"thw"`` order it
    is copied into q's token order, which SDPA's caller would also have to do.
    """
    from .. import temporal_attention

    out = {}
    for pass_ in passes:
        grad = pass_ != "fwd"
        qkv, (q, k, v), seqs = _tiny_inputs(grad, order, torch.Generator().manual_seed(0))

        def ours():
            o = temporal_attention(q, k, v, backend=backend)
            if pass_ == "fwd+bwd":
                o.sum().backward()

        def theirs():
            o = F.scaled_dot_product_attention(*seqs)
            if pass_ == "fwd+bwd":
                o.sum().backward()

        ctx = torch.no_grad() if pass_ == "fwd" else torch.enable_grad()
        with ctx:
            for _ in range(warmup):
                ours()
                theirs()
            a, b = [], []
            clock = time.perf_counter_ns
            for _ in range(rounds):
                t0 = clock()
                ours()
                t1 = clock()
                theirs()
                t2 = clock()
                a.append(t1 - t0)
                b.append(t2 - t1)
        ma, mb = statistics.median(a) / 1e3, statistics.median(b) / 1e3
        out[pass_] = (ma, mb, ma - mb)
    return out


def kernel_path_overhead(backend: str = "triton", *, rounds: int = 2000, warmup: int = 200) -> dict:
    """{pass: median µs of ``divattn.temporal_attention`` on the tiny input} with ``backend``'s
    launchers replaced by ones that return at once (nothing is computed)."""
    from .. import temporal_attention
    from ..ops import functions

    class NoKernels:
        @staticmethod
        def forward(*args, **kwargs):
            return None

        backward = forward

    real = functions.KERNELS[backend]
    functions.KERNELS[backend] = NoKernels
    try:
        out = {}
        for pass_ in ("fwd", "fwd+grad", "fwd+bwd"):
            grad = pass_ != "fwd"
            _, (q, k, v), _ = _tiny_inputs(grad, "hwt", torch.Generator().manual_seed(0))

            def call():
                o = temporal_attention(q, k, v, backend=backend)
                if pass_ == "fwd+bwd":
                    o.sum().backward()

            with torch.no_grad() if pass_ == "fwd" else torch.enable_grad():
                for _ in range(warmup):
                    call()
                times = []
                for _ in range(rounds):
                    t0 = time.perf_counter_ns()
                    call()
                    times.append(time.perf_counter_ns() - t0)
            out[pass_] = statistics.median(times) / 1e3
        return out
    finally:
        functions.KERNELS[backend] = real


def _launch_codes() -> tuple:
    """Code objects whose call is a kernel launch, and builtins whose call is one."""
    codes = [torch._ops.OpOverload.__call__.__code__]
    try:
        from triton.runtime import jit

        codes.append(jit.JITFunction.run.__code__)
        from triton.runtime import interpreter

        codes.append(interpreter.InterpretedFunction.run.__code__)
    except Exception:  # no triton: only the torch backend's launches exist
        pass
    builtins = [F.scaled_dot_product_attention]
    flash = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None:
        builtins.append(flash)
    return tuple(codes), tuple(builtins)


def frames_to_launch(call: Callable[[], object], public: Callable, *,
                     skip_ops: tuple = ("aten::", "divattn::")) -> Optional[int]:
    """Python frames from ``public`` (counted) to the frame that launches the first kernel
    (counted), while ``call()`` runs; None if no launch happened below ``public``.

    A launch is a Triton kernel's ``run``, a call of ``F.scaled_dot_product_attention`` or
    of torch's CPU flash attention, or of a ``torch.ops`` op that computes attention.
    The divattn custom ops are the path, not a launch: frames inside them count.
    """
    target = getattr(public, "__wrapped__", public).__code__
    codes, builtins = _launch_codes()
    found: list = []

    def depth(frame) -> Optional[int]:
        n = 0
        while frame is not None and frame.f_code is not target:
            n += 1
            frame = frame.f_back
        return None if frame is None else n + 1

    def is_attention_op(frame) -> bool:
        op = frame.f_locals.get("self")
        name = getattr(op, "_name", "")
        return "attention" in name and name.startswith("aten::")

    def profile(frame, event, arg):
        if found:
            return
        if event == "call" and frame.f_code in codes:
            if frame.f_code is codes[0] and not is_attention_op(frame):
                return
            d = depth(frame.f_back)
            if d is not None:
                found.append(d)
        elif event == "c_call" and arg in builtins:
            d = depth(frame)
            if d is not None:
                found.append(d)

    old = sys.getprofile()
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(old)
    return found[0] if found else None


def report(backends=("torch", "triton")) -> list:
    """Lines for ``divattn bench --overhead``."""
    from ..ops.dispatch import BACKENDS

    B, T, N, H, D = TINY.values()
    lines = [f"tiny input: B={B}, T={T}, N={N}, H={H}, D={D}, fp32, (h w t) order, medians of interleaved calls (µs)"]
    for pass_, (ours, sdpa, diff) in call_overhead("torch").items():
        lines.append(f"  torch backend {pass_:9s} {ours:8.1f}   SDPA alone {sdpa:8.1f}   overhead {diff:8.1f}")
    runs = [b for b in backends
            if not BACKENDS[b].not_supported_reasons("temporal", torch.float32, torch.device("cpu"), TINY["D"])]
    for backend in runs:
        if backend == "torch":
            continue
        for pass_, t in kernel_path_overhead(backend).items():
            lines.append(f"  {backend} path, launchers doing nothing, {pass_:9s} {t:8.1f}")
    for backend in sorted(set(backends) - set(runs)):
        lines.append(f"  {backend}: not run here (" + "; ".join(BACKENDS[backend].not_supported_reasons(
            "temporal", torch.float32, torch.device("cpu"), TINY["D"])) + ")")
    depths = path_depths(tuple(runs))
    lines.append("Python frames from the public op to the kernel launch: "
                 + ", ".join(f"{b} {op} {d}" for (b, op), d in depths.items()))
    return lines


def path_depths(backends=("torch",)) -> dict:
    """{(backend, op): frames from the public op to its kernel launch} on tiny inputs."""
    import divattn
    from ..ops import split_qkv

    B, T, N, H, D = TINY.values()
    out = {}
    for backend in backends:
        qkv = torch.randn(B, 1 + T * N, 3, H, D)
        q, k, v, cls = split_qkv(qkv, T, N, order="hwt", has_cls=True)
        calls = {
            "temporal": (divattn.temporal_attention, lambda: divattn.temporal_attention(q, k, v, backend=backend)),
            "spatial_cls": (divattn.spatial_attention,
                            lambda: divattn.spatial_attention(q, k, v, cls=cls, backend=backend)),
            "joint": (divattn.joint_attention,
                      lambda: divattn.joint_attention(*qkv.unbind(2), backend=backend)),
        }
        for op, (fn, call) in calls.items():
            out[(backend, op)] = frames_to_launch(call, fn)
    return out
