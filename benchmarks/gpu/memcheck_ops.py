"""Small cases of every attention kernel, forward and backward, checked against the fp64
reference: the workload the GPU acceptance run puts under ``compute-sanitizer --tool memcheck``.

One case per kernel family (temporal, spatial, spatial with cls, joint) on one backend,
with odd sizes (T=3, N=7, D=40) so every masked tail is exercised, and the same kernels on
a padded batch given as counts or a mask (where the backend takes them: the rows a kernel
skips), in fp16, bf16 and fp32 (on a GPU). Each case is checked with the op tests' own bar
(:func:`tests.ops.cases.assert_close_to_reference`). Run it once without the sanitizer
first to fill the Triton cache: under the sanitizer, compiling is the slow part.

    python benchmarks/gpu/memcheck_ops.py --backend triton
    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/gpu/memcheck_ops.py --backend triton

Exit status: 0 every case matched, 1 a case failed, 3 the backend cannot run here.
Without a GPU the Triton kernels run in the interpreter (fp32 / fp16).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPS = ("temporal", "spatial", "spatial_cls", "joint")
# (op, B, T, N, H, D, order): odd sizes, both token orders.
CASES = (
    ("temporal", 1, 3, 7, 2, 40, "hwt"),
    ("spatial", 1, 3, 7, 2, 40, "thw"),
    ("spatial_cls", 2, 3, 7, 1, 40, "hwt"),
    ("joint", 1, 3, 7, 2, 40, "hwt"),
)
# (op, B, T, N, H, D, order, padding): a padded batch as counts, one sample cut short, in
# the row kernels' two roles (rows are frames; rows are patches, with the cls token), and
# as a random token mask (``mask``: the share of real tokens); three cases only, to keep
# the sanitized run short.
PADDED = (
    ("temporal", 2, 3, 7, 2, 40, "thw", dict(frames=[3, 1])),
    ("spatial_cls", 2, 3, 7, 1, 40, "hwt", dict(frames=[2, 3], patches=[7, 3])),
    ("temporal", 2, 3, 7, 2, 40, "hwt", dict(mask=0.6)),
)


def _padding(padding: dict) -> str:
    return " ".join(f"{k}={v}" if k == "mask" else f"{k}={','.join(map(str, v))}" for k, v in padding.items())


def _op_padding(padding: dict, B: int, T: int, N: int, device) -> dict:
    """The op's keywords of ``padding``: a ``mask`` share becomes a ``(B, T, N)`` bool mask on the device."""
    import torch

    if "mask" not in padding:
        return padding
    real = torch.rand(B, T, N, generator=torch.Generator().manual_seed(0)) < padding["mask"]
    return dict(padding, mask=real.to(device))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", required=True, choices=("triton", "cuda", "torch"), help="divattn backend to check")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--ops", default=",".join(OPS), help="comma list of " + ", ".join(OPS))
    p.add_argument("--dtypes", default=None,
                   help="comma list (default: float16,bfloat16,float32 on a GPU; float32,float16 on a CPU)")
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise SystemExit(f"memcheck_ops: unknown op {', '.join(bad)} (ops: {', '.join(OPS)})")
    cases = [(*c, {}) for c in CASES if c[0] in ops] + [c for c in PADDED if c[0] in ops]
    if args.dry_run:
        for c in cases:
            print("case", "op={} B={} T={} N={} H={} D={} order={}".format(*c[:7]), _padding(c[7]))
        return 0

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT))
    from divattn.ops import BACKENDS

    try:
        from tests.ops import cases as op_cases
    except ImportError as e:  # the op tests' helpers import pytest
        print(f"UNAVAILABLE: the op tests' helpers do not import ({type(e).__name__}: {e})", flush=True)
        return 3

    if op_cases.DEVICE != device:  # the op tests' runner takes its device from tests/conftest.py
        raise SystemExit(f"memcheck_ops: the op tests run on {op_cases.DEVICE} here, asked for {device}")
    default = "float16,bfloat16,float32" if device.type == "cuda" else "float32,float16"
    dtypes = [getattr(torch, d.strip()) for d in (args.dtypes or default).split(",") if d.strip()]
    failed = 0
    run = 0
    for op, B, T, N, H, D, order, padding in cases:
        form = "mask" if "mask" in padding else "counts"
        if padding and form not in BACKENDS[args.backend].features:
            print(f"skip {args.backend} {op} {_padding(padding)}: the backend takes no {form}", flush=True)
            continue
        for dtype in dtypes:
            case = op_cases.Case(op, B, T, N, H, D, order)
            name = f"{args.backend} {case.id} {str(dtype).replace('torch.', '')}" + (
                f" {_padding(padding)}" if padding else "")
            why = BACKENDS[args.backend].not_supported_reasons(op, dtype, device, D)
            if why:
                print(f"UNAVAILABLE {name}: {'; '.join(why)}", flush=True)
                return 3
            start = time.perf_counter()
            run += 1
            try:
                kw = _op_padding(padding, B, T, N, device)
                op_cases.assert_close_to_reference(case, args.backend, dtype, fn=op_cases.case_fn(case, **kw))
            except AssertionError as e:
                failed += 1
                print(f"FAIL {name}: {e}", flush=True)
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"ok {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"memcheck_ops: {run - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
