"""``python -m divattn kernels``: compile the GPU kernels ahead of time and report what they use.

No GPU is needed. Every launch that GPU dispatch plans for the named benchmark shapes
and for the coverage layers (:data:`divattn.kernels_report.problems.COVERAGE`: every
code path dispatch can reach, at several batch and head counts) is compiled with
Triton's own compiler for each ``--arch``, at every head dim of ``--head-dims``
(default: a representative of every head-dim bucket, D = 16 ... 128), both token
orders, fp16/bf16 (and fp32 on the named shapes), forward and backward. One build per
code path: the kernel, constexprs, warps, stages, register cap and argument types
(size-1 integers included) of a launch, compiled with the fewest divisibility hints the
JIT gives any of its launches (``--exact``: every divisibility specialisation, about 2.4x
the builds). Builds are compiled in parallel; their resources are read from the
checkout's record (``--record``; ``--exact --update-record`` writes it) or an on-disk
cache, both by binary key, where they are already there. The summary gives per kernel
the head dims covered and the worst registers, stack (spill) bytes and resident blocks
per SM; ``--table`` lists every build. A spilling build is printed with the tile-table
rows that gave it its tile. ``--traffic`` also counts, under the Triton interpreter, the
global-memory traffic of each pass at a small batch against the least it could move.
Exit status 1 when a build fails to compile or an fp16/bf16 build at D <= 128 spills.
"""

from __future__ import annotations

import json
import os
import sys
import time

LOW_PRECISION = ("fp16", "bf16")
COVERAGE = "coverage"


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
    from ..kernels_report.problems import BATCH_HEADS, HEAD_DIMS

    parser.add_argument("--arch", default="sm_80,sm_90", help="comma list of sm_80, sm_90 (default: both)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma list of named GPU shapes (see divattn bench --list) and/or {COVERAGE!r}, the "
                             "layers that reach every code path (default: all of them)")
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)),
                        help=f"comma list of D (default: {','.join(map(str, HEAD_DIMS))})")
    parser.add_argument("--batch-heads", default=",".join(f"{b}x{h}" for b, h in BATCH_HEADS),
                        help="comma list of BxH the coverage layers take (named shapes keep theirs; default: "
                             f"{','.join(f'{b}x{h}' for b, h in BATCH_HEADS)})")
    parser.add_argument("--dtypes", default=None,
                        help="comma list of fp16, bf16, fp32 (default: all three on the named shapes, fp16 and bf16 "
                             "on the coverage layers)")
    parser.add_argument("--orders", default="hwt,thw", help="token orders (default: hwt,thw)")
    parser.add_argument("--passes", default="fwd,bwd", help="comma list of fwd, bwd (default: both)")
    parser.add_argument("--counts", action="store_true",
                        help="the padded-batch code path (COUNTS: per-sample counts) of every problem instead of the "
                             "dense one; not in the record")
    parser.add_argument("--mask", action="store_true",
                        help="the token-mask code path (MASKED) of every problem instead of the dense one (with "
                             "--counts: both); not in the record")
    parser.add_argument("--exact", action="store_true",
                        help="compile every divisibility specialisation the JIT makes, not one build per code path")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="compile processes (default: one per CPU)")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile everything, ignoring the cache (DIVATTN_KERNEL_CACHE, default ~/.cache/divattn/"
                             "kernels)")
    parser.add_argument("--record", default="default", metavar="PATH",
                        help="read builds already compiled from this record (default: the checkout's "
                             "benchmarks/results/kernels/builds.json where there is one; 'none': do not)")
    parser.add_argument("--update-record", default=None, metavar="PATH",
                        help="with --exact: write this run's builds as a record to PATH (the checkout's, "
                             "benchmarks/results/kernels/builds.json, is written again after changing a kernel, "
                             "the tile table, the plans or Triton)")
    parser.add_argument("--table", action="store_true", help="print every build, not the summary per kernel")
    parser.add_argument("--traffic", action="store_true",
                        help="also count each pass's global-memory traffic under the interpreter (B=1, H=2, fp16, "
                             "the first named --shapes entry or timesformer_8x224, the first head dim)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the report as JSON to PATH (or stdout) instead of the tables")


def _constexprs(c: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in c.items())


def _table(header: tuple, body: list) -> list:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *body)]


def build_table(builds: list) -> list:
    header = ("kernel", "sm", "dtype", "D", "regime", "constexprs", "warps", "stages", "regs", "stack B", "smem KB",
              "blocks/SM", "MMA", "launches")
    body = []
    for b in sorted(builds, key=lambda b: (b["arch"], b["dtype"], b["kernel"], json.dumps(b["constexprs"]))):
        dims = ",".join(map(str, sorted(b["head_dims"])))
        row = (b["kernel"], b["arch"], b["dtype"], dims, b["regime"], _constexprs(b["constexprs"]), b["num_warps"],
               b["num_stages"])
        if b.get("error"):
            body.append((*row, "ERROR", "", "", "", "", len(b["problems"])))
            continue
        smem = (b["shared_static"] or 0) + (b["shared_dynamic"] or 0)
        mma = f"{b['tensor_core_insts']} {b['mma'] or ''}".strip()
        body.append((*row, b["registers"], b["stack_bytes"], f"{smem / 1024:.1f}", b["blocks_per_sm"], mma,
                     len(b["problems"])))
    return _table(header, body)


def summary_table(builds: list) -> list:
    """Per kernel, arch and dtype: builds, head dims covered, worst registers / stack, fewest blocks per SM."""
    groups: dict = {}
    for b in builds:
        if not b.get("error"):
            groups.setdefault((b["kernel"], b["arch"], b["dtype"]), []).append(b)
    header = ("kernel", "sm", "dtype", "builds", "head dims", "max regs", "max stack B", "spilling", "min blocks/SM")
    body = []
    for (kernel, arch, dtype), bs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        dims = sorted({d for b in bs for d in b["head_dims"]})
        body.append((kernel, arch, dtype, len(bs), ",".join(map(str, dims)), max(b["registers"] for b in bs),
                     max(b["stack_bytes"] for b in bs), sum(1 for b in bs if spills(b)),
                     min(b["blocks_per_sm"] for b in bs)))
    return _table(header, body)


def spills(build: dict) -> bool:
    return not build.get("error") and bool(build["stack_bytes"] or build["local_insts"])


def must_not_spill(build: dict) -> bool:
    """The project's rule: no fp16/bf16 build at D <= 128 spills."""
    return build["dtype"] in LOW_PRECISION and min(build["head_dims"]) <= 128


def spill_line(b: dict) -> str:
    """A spilling build and the tile-table row to change."""
    where = (f"{b['kernel']} sm_{b['arch']} {b['dtype']} D={','.join(map(str, sorted(b['head_dims'])))} "
             f"{b['regime']} {_constexprs(b['constexprs'])} warps={b['num_warps']} stages={b['num_stages']}: "
             f"{b['registers']} registers, {b['stack_bytes']} stack bytes, {b['local_insts']} local loads/stores "
             f"(e.g. {b['problems'][0]})")
    if b.get("tiles"):
        return (f"{where}\n    change tile row {' / '.join(b['tiles'])} in divattn/ops/triton/plan.py (fewer rows, "
                "more warps for the same rows, or a register cap ptxas may not trade for occupancy), or give this "
                "head dim a finer bucket")
    return where


def traffic_table(rows: list) -> list:
    header = ("problem", "loads MB", "stores MB", "distinct MB", "minimum MB", "ratio", "launches")
    body = [(r["problem"], f"{r['load_bytes'] / 1e6:.3f}", f"{r['store_bytes'] / 1e6:.3f}",
             f"{r['unique_bytes'] / 1e6:.3f}", f"{r['min_bytes'] / 1e6:.3f}", f"{r['ratio']:.2f}",
             " + ".join(f"{t['kernel']}x{t['programs']}" for t in r["launches"])) for r in rows]
    return _table(header, body)


def _traffic(args, archs) -> list:
    import dataclasses

    from ..shapes import GPU_SHAPES
    from ..kernels_report import problems, traffic

    name = next((n for n in _csv(args.shapes) or () if n != COVERAGE), "timesformer_8x224")
    D = int(_csv(args.head_dims)[0])
    shape = dataclasses.replace(GPU_SHAPES[name], B=1, H=2, D=D)
    probs = list(problems.problems([shape], passes=_csv(args.passes), dtypes=("fp16",)))
    return traffic.measure(probs, target=max(archs))


def _batch_heads(value) -> list:
    out = []
    for item in _csv(value) or []:
        b, _, h = item.lower().partition("x")
        if not (b.isdigit() and h.isdigit() and int(b) > 0 and int(h) > 0):
            raise SystemExit(f"divattn kernels: --batch-heads takes BxH pairs such as 8x12, got {item!r}")
        out.append((int(b), int(h)))
    return out


def _check(args) -> None:
    from ..shapes import GPU_SHAPES
    from ..kernels_report import problems

    for flag, values, known in (("--shapes", _csv(args.shapes), (*GPU_SHAPES, COVERAGE)),
                                ("--dtypes", _csv(args.dtypes), tuple(problems.DTYPES)),
                                ("--orders", _csv(args.orders), problems.ORDERS),
                                ("--passes", _csv(args.passes), problems.PASSES)):
        bad = [v for v in values or () if v not in known]
        if bad:
            raise SystemExit(f"divattn kernels: unknown {flag} {', '.join(bad)} (choose from {', '.join(known)})")
    dims = _csv(args.head_dims) or []
    if not dims or not all(d.isdigit() and 1 <= int(d) <= 256 for d in dims):
        raise SystemExit(f"divattn kernels: --head-dims takes head dims in [1, 256], got {args.head_dims!r}")


def select(shapes=None, head_dims=None, orders=None, batch_heads=None, dtypes=None, passes=None,
           counts: bool = False, mask: bool = False) -> list:
    """The problems the report covers: each named shape (default: all, and the coverage layers;
    ``COVERAGE`` names those) at each head dim and token order, the coverage layers also at
    each (B, H) of ``batch_heads``; every pass. ``dtypes`` default: fp16, bf16 and fp32 on the
    named shapes, fp16 and bf16 on the coverage layers (fp32 is reported, not held to the
    no-spill rule: its builds add compile time, not evidence)."""
    from ..shapes import GPU_SHAPES
    from ..kernels_report import problems

    names = list(shapes or [*GPU_SHAPES, COVERAGE])
    dims, orders = head_dims or problems.HEAD_DIMS, orders or problems.ORDERS
    passes = passes or problems.PASSES
    named = [v for n in names if n != COVERAGE for v in problems.variants(GPU_SHAPES[n], dims, orders)]
    padding = dict(counts=(counts,), masks=(mask,))
    out = list(problems.problems(named, passes=passes, dtypes=dtypes or tuple(problems.DTYPES), **padding))
    if COVERAGE in names:
        layers = problems.coverage(dims, orders, batch_heads or problems.BATCH_HEADS)
        out += problems.problems(layers, passes=passes, dtypes=dtypes or LOW_PRECISION, **padding)
    return out


def main(args) -> int:
    from ..kernels_report import build

    _check(args)
    if args.update_record and not args.exact:
        raise SystemExit("divattn kernels: --update-record writes every binary the JIT builds: add --exact")
    if args.update_record and (args.counts or args.mask):
        raise SystemExit("divattn kernels: the record holds the dense code paths: --counts and --mask take no "
                         "--update-record")
    archs = _archs(args.arch)
    start = time.perf_counter()
    probs = select(_csv(args.shapes), [int(d) for d in _csv(args.head_dims)], _csv(args.orders),
                   _batch_heads(args.batch_heads), _csv(args.dtypes), _csv(args.passes), args.counts,
                   args.mask)
    record = build.RECORD if args.record == "default" else None if args.record.lower() == "none" else args.record
    if args.no_cache and args.record == "default":
        record = None
    builds = build.report(probs, archs=archs, workers=max(1, args.workers),
                          exact=args.exact, cache=None if args.no_cache else "default", record=record,
                          progress=True)
    seconds = time.perf_counter() - start
    if args.update_record:
        build.write_record(args.update_record, builds, build.record_meta(sys.argv[1:], len(probs), archs))
    traffic_rows = _traffic(args, archs) if args.traffic else None
    failed = [b for b in builds if b.get("error")]
    bad = [b for b in builds if spills(b) and must_not_spill(b)]
    if args.json is not None:
        text = json.dumps({"builds": builds, "traffic": traffic_rows}, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    else:
        print("\n".join(build_table(builds) if args.table else summary_table(builds)))
        read = {w: sum(1 for b in builds if b.get("cached") == w) for w in ("record", "cache")}
        print(f"\n{len(builds)} builds ({len(builds) - sum(read.values())} compiled, {read['record']} from the record, "
              f"{read['cache']} from the cache; {seconds:.0f} s), {len(failed)} failed to compile, "
              f"{sum(1 for b in builds if spills(b))} spill ({len(bad)} in fp16/bf16 at D <= 128)")
        for b in failed:
            print(f"  compile error: {b['kernel']} sm_{b['arch']} {b['dtype']} {_constexprs(b['constexprs'])}: "
                  f"{b['error']}", file=sys.stderr)
        for b in sorted((b for b in builds if spills(b)), key=lambda b: not must_not_spill(b)):
            print(("spill: " if must_not_spill(b) else "spill (fp32 or D > 128, reported): ") + spill_line(b))
        if traffic_rows is not None:
            print("\nglobal-memory traffic (interpreter, per program distinct 32-byte sectors, summed):")
            print("\n".join(traffic_table(traffic_rows)))
    return 1 if failed or bad else 0
