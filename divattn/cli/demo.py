"""``python -m divattn demo``: the fused ops on a TimeSformer-shaped input, checked.

Builds a random packed qkv ``(B, 1 + N*T, 3, H, D)`` in TimeSformer's ``(h w t)``
token order, runs temporal attention and spatial attention with the cls token through
the kernel backend (Triton on a GPU, or the Triton interpreter on a CPU) forward and
backward, and compares outputs and gradients with the fp64 reference. Exits non-zero
if they disagree. Nothing is downloaded.
"""

from __future__ import annotations

import os
import sys
import time


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8, help="T (TimeSformer: 8)")
    parser.add_argument("--patches", type=int, default=196, help="N (224 px / 16 = 14x14 = 196)")
    parser.add_argument("--heads", type=int, default=2, help="H (TimeSformer-B: 12)")
    parser.add_argument("--head-dim", type=int, default=64, help="D (TimeSformer-B: 64)")
    parser.add_argument("--order", choices=("hwt", "thw"), default="hwt")
    parser.add_argument("--backend", choices=("triton", "cuda"), default="triton")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when it is imported, which importing divattn did.
        print("no CUDA device: running the Triton kernels in the Triton interpreter (TRITON_INTERPRET=1)",
              flush=True)
        rest = sys.argv[sys.argv.index("demo") + 1:] if "demo" in sys.argv else []
        argv = [sys.executable, "-m", "divattn", "demo", *rest]
        os.execve(sys.executable, argv, dict(os.environ, TRITON_INTERPRET="1"))
    import divattn
    from divattn.ops import reference, split_qkv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    B, T, N, H, D = args.batch, args.frames, args.patches, args.heads, args.head_dim
    gen = torch.Generator().manual_seed(args.seed)
    qkv64 = torch.randn(B, 1 + N * T, 3, H, D, generator=gen, dtype=torch.float64)
    print(f"qkv (B, 1 + N*T, 3, H, D) = {tuple(qkv64.shape)}, order {args.order}, {dtype}, {device}")

    def run(qkv, backend):
        q, k, v, cls = split_qkv(qkv, T, N, order=args.order, has_cls=True)
        o_t = divattn.temporal_attention(q, k, v, backend=backend)
        o_s, o_cls = divattn.spatial_attention(q, k, v, cls, backend=backend)
        return o_t, o_s, o_cls

    grads = [torch.randn(B, T, N, H, D, generator=gen, dtype=torch.float64) for _ in range(2)]
    grads.append(torch.randn(B, H, D, generator=gen, dtype=torch.float64))

    def forward_backward(qkv, backend):
        qkv = qkv.detach().requires_grad_(True)
        outs = run(qkv, backend)
        loss = sum((o * g.to(o)).sum() for o, g in zip(outs, grads))
        loss.backward()
        return outs, qkv.grad

    start = time.perf_counter()
    outs, dqkv = forward_backward(qkv64.to(device, dtype), args.backend)
    if device == "cuda":
        torch.cuda.synchronize()
    took = time.perf_counter() - start
    ref_outs, ref_dqkv = forward_backward(qkv64, "torch")
    names = ("temporal o", "spatial o", "spatial o_cls", "d qkv")
    ok = True
    tol = {torch.float32: 1e-4, torch.float16: 1e-2}[dtype]
    for name, got, ref in zip(names, (*outs, dqkv), (*ref_outs, ref_dqkv)):
        err = (got.double().cpu() - ref).abs().max().item()
        rel = err / max(ref.abs().max().item(), 1e-12)
        good = rel <= tol
        ok &= good
        print(f"  {name:<14} max abs err {err:.2e}  (relative {rel:.1e}, limit {tol:.0e})  {'ok' if good else 'MISMATCH'}")
    print(f"{args.backend} forward+backward of both ops took {took:.2f} s"
          + (" in the interpreter (correctness only, not speed)" if device == "cpu" else ""))
    print("fused ops match the reference" if ok else "fused ops DO NOT match the reference")
    return 0 if ok else 1
