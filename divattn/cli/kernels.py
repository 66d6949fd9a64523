"""``python -m divattn kernels``: compile the GPU kernels ahead of time and report what they use.

No GPU is needed. Every launch that GPU dispatch plans for the named benchmark shapes
(at D = 64, 128 and 72, both token orders, fp16/bf16/fp32, forward and backward) is
compiled with Triton's own compiler for each ``--arch``; each distinct build is
printed once with its registers, stack (spill) bytes, shared memory, resident blocks
per SM and tensor-core instructions. ``--traffic`` also counts, under the Triton
interpreter, the global-memory traffic of each pass at a small batch against the
least it could move. Exit status 1 when a build fails to compile.
"""

from __future__ import annotations

import json
import sys


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _archs(value) -> list:
    out = []
    for a in _csv(value) or []:
        digits = a.lower().removeprefix("sm_").removeprefix("sm").replace(".", "")
        if not digits.isdigit() or int(digits) not in (80, 90):
            raise SystemExit(f"divattn kernels: --arch takes sm_80 and/or sm_90, got {a!r}")
        out.append(int(digits))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma list of sm_80, sm_90 (default: both)")
    parser.add_argument("--shapes", default=None, help="comma list of named GPU shapes (default: all; see divattn "
                                                       "bench --list)")
    parser.add_argument("--head-dims", default="64,128,72", help="comma list of D (default: 64,128,72)")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma list of fp16, bf16, fp32 (default: all)")
    parser.add_argument("--orders", default="hwt,thw", help="token orders (default: hwt,thw)")
    parser.add_argument("--passes", default="fwd,bwd", help="comma list of fwd, bwd (default: both)")
    parser.add_argument("--exact", action="store_true",
                        help="compile every integer/pointer divisibility specialisation, not one per code path")
    parser.add_argument("--workers", type=int, default=1, help="compile processes (default: 1)")
    parser.add_argument("--traffic", action="store_true",
                        help="also count each pass's global-memory traffic under the interpreter (B=1, H=2, fp16, "
                             "the first --shapes entry or timesformer_8x224, the first head dim)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the report as JSON to PATH (or stdout) instead of the table")


def _constexprs(c: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in c.items())


def build_table(builds: list) -> list:
    header = ("kernel", "sm", "dtype", "D", "regime", "constexprs", "warps", "stages", "regs", "stack B", "smem KB",
              "blocks/SM", "MMA", "launches")
    body = []
    for b in sorted(builds, key=lambda b: (b["arch"], b["dtype"], b["kernel"], json.dumps(b["constexprs"]))):
        dims = ",".join(map(str, sorted(b["head_dims"])))
        if b.get("error"):
            body.append((b["kernel"], b["arch"], b["dtype"], dims, b["regime"], _constexprs(b["constexprs"]),
                         b["num_warps"], b["num_stages"], "ERROR", "", "", "", "", len(b["problems"])))
            continue
        smem = (b["shared_static"] or 0) + (b["shared_dynamic"] or 0)
        mma = f"{b['tensor_core_insts']} {b['mma'] or ''}".strip()
        body.append((b["kernel"], b["arch"], b["dtype"], dims, b["regime"], _constexprs(b["constexprs"]),
                     b["num_warps"], b["num_stages"], b["registers"], b["stack_bytes"], f"{smem / 1024:.1f}",
                     b["blocks_per_sm"], mma, len(b["problems"])))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *body)]


def traffic_table(rows: list) -> list:
    header = ("problem", "loads MB", "stores MB", "distinct MB", "minimum MB", "ratio", "launches")
    body = [(r["problem"], f"{r['load_bytes'] / 1e6:.3f}", f"{r['store_bytes'] / 1e6:.3f}",
             f"{r['unique_bytes'] / 1e6:.3f}", f"{r['min_bytes'] / 1e6:.3f}", f"{r['ratio']:.2f}",
             " + ".join(f"{t['kernel']}x{t['programs']}" for t in r["launches"])) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *body)]


def _traffic(args, archs) -> list:
    import dataclasses

    from ..shapes import GPU_SHAPES
    from ..kernels_report import problems, traffic

    name = (_csv(args.shapes) or ["timesformer_8x224"])[0]
    D = int((_csv(args.head_dims) or ["64"])[0])
    shape = dataclasses.replace(GPU_SHAPES[name], B=1, H=2, D=D)
    probs = list(problems.problems([shape], passes=_csv(args.passes), dtypes=("fp16",)))
    return traffic.measure(probs, target=max(archs))


def _check(args) -> None:
    from ..shapes import GPU_SHAPES
    from ..kernels_report import problems

    for flag, values, known in (("--shapes", _csv(args.shapes), tuple(GPU_SHAPES)),
                                ("--dtypes", _csv(args.dtypes), tuple(problems.DTYPES)),
                                ("--orders", _csv(args.orders), problems.ORDERS),
                                ("--passes", _csv(args.passes), problems.PASSES)):
        bad = [v for v in values or () if v not in known]
        if bad:
            raise SystemExit(f"divattn kernels: unknown {flag} {', '.join(bad)} (choose from {', '.join(known)})")
    dims = _csv(args.head_dims) or []
    if not dims or not all(d.isdigit() and 1 <= int(d) <= 256 for d in dims):
        raise SystemExit(f"divattn kernels: --head-dims takes head dims in [1, 256], got {args.head_dims!r}")


def main(args) -> int:
    from ..kernels_report import build

    _check(args)
    archs = _archs(args.arch)
    builds = build.report(shapes=_csv(args.shapes), head_dims=[int(d) for d in _csv(args.head_dims)],
                          orders=_csv(args.orders), dtypes=_csv(args.dtypes), passes=_csv(args.passes), archs=archs,
                          workers=args.workers, exact=args.exact)
    traffic_rows = _traffic(args, archs) if args.traffic else None
    failed = [b for b in builds if b.get("error")]
    if args.json is not None:
        text = json.dumps({"builds": builds, "traffic": traffic_rows}, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    else:
        print("\n".join(build_table(builds)))
        spills = [b for b in builds if not b.get("error") and (b["stack_bytes"] or b["local_insts"])]
        print(f"\n{len(builds)} builds, {len(failed)} failed to compile, {len(spills)} spill")
        for b in failed:
            print(f"  compile error: {b['kernel']} sm_{b['arch']} {b['dtype']} {_constexprs(b['constexprs'])}: "
                  f"{b['error']}", file=sys.stderr)
        if traffic_rows is not None:
            print("\nglobal-memory traffic (interpreter, per program distinct 32-byte sectors, summed):")
            print("\n".join(traffic_table(traffic_rows)))
    return 1 if failed else 0
