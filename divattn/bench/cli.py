"""``divattn bench``: time the attention providers on one shape and print a short table.

For users who do not run pytest. The shape is a named one (``--shape``, see
:mod:`divattn.shapes`) or given by its sizes (``--frames --patches --heads
--head-dim``); a model shape times a whole training step instead. Providers that
cannot run on this machine are listed once with the reason. ``--json`` writes the
records in the format of ``benchmarks/results``; ``--modelled`` writes modelled
H100 records (:mod:`divattn.bench.modelled`) to a file of their own.
``--sequence-parallel 1,2`` times one TimeSformer-B-width divided block with the clip's
frames sharded over 1, 2, ... processes instead (:mod:`divattn.bench.seqpar`).
"""

from __future__ import annotations

import dataclasses


def add_arguments(parser) -> None:
    parser.add_argument("--shape", default=None,
                        help="a named shape (default: timesformer_8x224 on a GPU, cpu_timesformer_8x112 on a CPU)")
    parser.add_argument("--list", action="store_true", help="list the named shapes and providers, and exit")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the shape's)")
    parser.add_argument("--frames", type=int, default=None, help="T: override the shape's frames")
    parser.add_argument("--patches", type=int, default=None, help="N: override the shape's patches per frame")
    parser.add_argument("--heads", type=int, default=None, help="H: override the shape's heads")
    parser.add_argument("--head-dim", type=int, default=None, help="D: override the shape's head dim")
    parser.add_argument("--ops", default=None,
                        help="comma list of temporal, spatial, spatial_cls, joint (default: all)")
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd (default: both)")
    parser.add_argument("--providers", default=None, help="comma list (default: all)")
    parser.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: bfloat16 on a GPU, "
                                                      "float32 on a CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--quick", action="store_true", help="shorter timing")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the records to PATH")
    parser.add_argument("--modelled", default=None, metavar="PATH",
                        help="also write modelled H100 records (counted traffic, no GPU) to PATH, a file of their own")
    parser.add_argument("--modelled-only", action="store_true", help="with --modelled: write them and time nothing")
    parser.add_argument("--sequence-parallel", default=None, metavar="P,P",
                        help="time one TimeSformer-B-width divided block, forward + backward, with the clip's frames "
                             "sharded over each number of processes (gloo on cpu, nccl on cuda), against the same "
                             "block re-sharded by heads (Ulysses), and count the bytes each rank sends; "
                             "--batch/--frames/--patches set the clip, --threads the threads per rank (default 1)")
    parser.add_argument("--memory", nargs="?", const="timesformer_b,timesformer_hr,timesformer_l", default=None,
                        metavar="GEOMETRIES",
                        help="print the activation memory a training forward saves, per block and per model, for "
                             "each implementation at TimeSformer geometries (comma list of timesformer_b, "
                             "timesformer_hr, timesformer_l; default: all), and exit")
    parser.add_argument("--overhead", action="store_true",
                        help="print what the op call path costs on a tiny input (per-call time over SDPA, the "
                             "kernel backends' Python with launchers that do nothing, frames to the launch), and exit")


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _shape(args, device):
    from .. import shapes

    if args.shape is None:
        shape = shapes.defaults(device.type)["attention"][0]
    else:
        shape = shapes.lookup(args.shape)
    shape = shape.with_batch(args.batch)
    if isinstance(shape, shapes.AttnShape):
        changes = {k: v for k, v in (("T", args.frames), ("N", args.patches), ("H", args.heads), ("D", args.head_dim))
                   if v is not None}
        if changes:
            shape = dataclasses.replace(shape, name=shape.name + "-custom", **changes)
    return shape


def _describe(shape) -> str:
    from ..shapes import AttnShape

    if isinstance(shape, AttnShape):
        return (f"B={shape.B} T={shape.T} N={shape.N} H={shape.H} D={shape.D}, {shape.order} tokens"
                + (", cls" if shape.cls else ""))
    return f"{shape.model} {shape.kwargs or ''} on a (B={shape.B}, T={shape.frames}, {shape.size}x{shape.size}) clip"


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(rows: list) -> list:
    """Lines of a plain-text table of ok records, then the providers that did not run and why."""
    ok = [r for r in rows if r["status"] == "ok"]
    header = ("provider", "op", "pass", "median ms", "TFLOP/s", "GB/s", "roofline", "peak MB")
    body = [(r["provider"], r["op"], r["pass"], _fmt(r["median_ms"], ".3f"), _fmt(r["tflops"], ".3f"),
             _fmt(r["gbps"], ".1f"), _fmt(r["roofline_fraction"], ".2f"), _fmt(r["peak_mem_mb"], ".1f")) for r in ok]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *body)]
    reasons: dict = {}
    for r in rows:
        if r["status"] != "ok":
            key = (r["provider"], r["status"], r["error"])
            reasons.setdefault(key, []).append(f"{r['op']} {r['pass']}")
    if reasons:
        lines.append("")
        lines.append("not timed:")
        for (provider, status, error), cases in reasons.items():
            lines.append(f"  {provider} ({status}, {', '.join(cases)}): {error}")
    return lines


def main(args) -> int:
    import torch

    from .. import shapes
    from . import providers, records, roofline, suite, timing

    if args.memory:
        from . import memory

        recs = memory.rows(_csv(args.memory))
        print("saved for backward (counted, batch 1; divattn on the CPU with the torch backend, transformers on "
              "the meta device); batches by this count with 16 B per parameter of optimizer state:")
        print("\n".join(memory.table(recs)))
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump(recs, f, indent=1)
            print(f"records written to {args.json}")
        return 0
    if args.overhead:
        from . import overhead

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        print("\n".join(overhead.report()))
        return 0
    if args.list:
        for name, s in {**shapes.ALL_SHAPES, **shapes.ALL_MODELS}.items():
            print(f"{name:32s} {s.label}")
        print("providers: " + ", ".join(providers.PROVIDERS))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.sequence_parallel:
        return _sequence_parallel(args, device)
    if args.threads is not None and device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    shape = _shape(args, device)
    names = [p.name for p in providers.select(_csv(args.providers))]
    if isinstance(shape, shapes.ModelShape):
        plan = [("model", "train_step")]
        names = [n for n in names if n in providers.MODEL_BACKENDS]
    else:
        ops = _csv(args.ops) or list(shape.ops())
        bad = [op for op in ops if op not in shape.ops()]
        if bad:
            raise SystemExit(f"divattn bench: {shape.name} has no op {', '.join(bad)} (ops: {', '.join(shape.ops())})")
        passes = _csv(args.passes)
        bad = [p for p in passes if p not in suite.ATTENTION_PASSES]
        if bad:
            known = ", ".join(suite.ATTENTION_PASSES)
            raise SystemExit(f"divattn bench: unknown pass {', '.join(bad)} (passes: {known})")
        plan = [(op, p) for op in ops for p in passes]
    env = records.environment(device)
    if device.type == "cpu":
        env["malloc"] = timing.pin_malloc()
    if args.modelled:
        if isinstance(shape, shapes.ModelShape):
            raise SystemExit("divattn bench: --modelled takes an attention shape, not a model shape")
        from . import modelled

        recs = modelled.records(shape, plan, dtype, env)
        print("modelled (not measured) H100, traffic counted under the Triton interpreter:")
        print("\n".join(modelled.table(recs)))
        print(f"modelled records written to {records.write(args.modelled, recs)}")
        if args.modelled_only:
            return 0
    elif args.modelled_only:
        raise SystemExit("divattn bench: --modelled-only needs --modelled PATH")
    peaks = roofline.measure_peaks(device, dtype)
    label = "CPU, " if device.type == "cpu" else ""
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
          f"{' (dirty)' if env['dirty'] else ''}")
    print(f"{label}{shape.name} ({shape.label or 'custom'}): {_describe(shape)}, {str(dtype).replace('torch.', '')}")
    print(f"measured: copy {peaks.copy_gbps:.1f} GB/s, matmul {peaks.matmul_tflops:.3f} TFLOP/s "
          f"(roofline = floor / median; 1.0 is the floor)")
    budget = timing.Budget.for_device(device, quick=args.quick)
    cases = [suite.Case(n, op, p, shape, dtype, device) for op, p in plan for n in names]
    suite.freeze_heap()
    try:
        rows = [suite.run(case, env, peaks, budget) for case in cases]
        suite.retime(list(zip(cases, rows)), env, lambda _dtype: peaks, budget)
    finally:
        suite.thaw_heap()
    print("\n".join(table(rows)))
    if args.json:
        print(f"records written to {records.write(args.json, rows)}")
    failed = [r for r in rows if r["status"] == "error" and providers.PROVIDERS.get(r["provider"]) is not None
              and providers.PROVIDERS[r["provider"]].ours]
    return 1 if failed else 0


def _sequence_parallel(args, device) -> int:
    import torch

    from . import records, seqpar

    try:
        worlds = [int(p) for p in _csv(args.sequence_parallel)]
    except ValueError:
        raise SystemExit(f"divattn bench: --sequence-parallel takes process counts, e.g. 1,2; got "
                         f"{args.sequence_parallel!r}") from None
    if not worlds or min(worlds) < 1:
        raise SystemExit("divattn bench: --sequence-parallel takes positive process counts, e.g. 1,2")
    if device.type == "cuda" and max(worlds) > torch.cuda.device_count():
        raise SystemExit(f"divattn bench: --sequence-parallel {max(worlds)} needs as many GPUs; "
                         f"{torch.cuda.device_count()} visible")
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    env = records.environment(device)
    print(f"{env['device']}, torch {env['torch']}, commit {env['commit']}{' (dirty)' if env['dirty'] else ''}")
    rows = seqpar.main(worlds, B=args.batch, T=args.frames, N=args.patches, rounds=2 if args.quick else 5,
                       threads=args.threads or 1, device_type=device.type, dtype=dtype)
    if args.json:
        print(f"records written to {records.write(args.json, [{**env, **r} for r in rows])}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0
