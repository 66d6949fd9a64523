"""An AOTInductor package of the bundled TimeSformer, built and run on the GPU: the acceptance run's export check.

The model (divided space-time, width 192, 4 blocks, 8 frames of 112 px; random weights)
is exported with a dynamic batch and frame count (``divattn.export.dynamic_shapes``),
compiled with ``torch._inductor.aoti_compile_and_package`` and loaded back. The package's
logits must match the eager model's (same backend and dtype) at the example's shape and
at another batch and frame count, and the package must have run the backend's fused
kernels: every attention of the exported program is a ``divattn::attention`` call, and the
kernel module's launches are counted while the package runs.

    python benchmarks/gpu/aoti_package.py --backend triton
    python benchmarks/gpu/aoti_package.py --backend triton --device cpu --dtype float32   # interpreter, slow

Exit status: 0 the package matched and launched the kernels, 1 it did not, 3 it cannot
run here (no GPU, or the backend unavailable: printed as ``UNAVAILABLE``, nothing built).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = dict(num_frames=8, img_size=112, patch_size=16, embed_dim=192, depth=4, num_heads=3, num_classes=10)
SHAPES = ((2, 8), (3, 4))  # (batch, frames): the example, then another


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="triton", choices=("triton", "cuda"), help="divattn kernel backend")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print(f"aoti_package: timesformer_base {CONFIG} on backend {args.backend}, shapes (batch, frames) {SHAPES}")
        return 0

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("UNAVAILABLE: no CUDA device (torch.cuda.is_available() is False); no package was built", flush=True)
        return 3
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    sys.path.insert(0, str(ROOT))
    import divattn.export as dx
    from divattn.models import create_model
    from divattn.ops import BACKENDS

    why = BACKENDS[args.backend].not_supported_reasons("spatial_cls", dtype, device, CONFIG["embed_dim"] // 3)
    if why:
        print(f"UNAVAILABLE: backend {args.backend} cannot run here: {'; '.join(why)}; no package was built", flush=True)
        return 3

    torch.manual_seed(0)
    model = create_model("timesformer_base", **CONFIG, backend=args.backend).eval().to(device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    clips = [torch.randn(B, 3, T, CONFIG["img_size"], CONFIG["img_size"], device=device, dtype=dtype, generator=gen)
             for B, T in SHAPES]
    result = {"backend": args.backend, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "torch": torch.__version__, "config": CONFIG}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)

    start = time.perf_counter()
    ep = torch.export.export(model, (clips[0],), dynamic_shapes=dx.dynamic_shapes(model))
    calls = [n for n in ep.graph.nodes if n.target is torch.ops.divattn.attention.default]
    result["exported_attention_calls"] = len(calls)
    result["export_s"] = round(time.perf_counter() - start, 1)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp, "model.pt2"))
        result["compile_s"] = round(time.perf_counter() - start, 1)
        package = torch._inductor.aoti_load_package(path)

        kernels = BACKENDS[args.backend].kernels()
        launches = []
        forward = kernels.forward

        def counted(op, *a, **kw):
            launches.append(op)
            return forward(op, *a, **kw)

        kernels.forward = counted
        errors, launched = [], []
        try:
            for clip in clips:
                with torch.no_grad():
                    before = len(launches)
                    got = package(clip)
                    launched.append(len(launches) - before)
                    want = model(clip)
                scale = max(1.0, want.abs().max().item())
                errors.append((got.float() - want.float()).abs().max().item() / scale)
        finally:
            kernels.forward = forward
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    result.update(relative_errors=errors, tolerance=tol, package_kernel_launches=launched)
    ok = len(calls) == 2 * CONFIG["depth"] and all(e <= tol for e in errors) and launched == [len(calls)] * len(clips)
    result["status"] = "passed" if ok else "failed"
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if not ok:
        print(f"FAIL: {len(calls)} divattn::attention calls exported (want {2 * CONFIG['depth']}), relative errors "
              f"{errors} (tolerance {tol}), kernel launches per package call {launched} (want {len(calls)} each)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
