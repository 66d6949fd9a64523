"""The tile table's register caps on a GPU: each capped row timed with its cap and without.

Some rows of the tile table (``divattn/ops/triton/plan.py``) give ptxas a register cap
(``maxnreg``): without one it spills 8 to 32 bytes on some of their builds to keep two or
three blocks resident; with one it allocates what the code needs, and those builds run
fewer blocks per SM. Which is faster has to be timed. For each capped row that applies to
the visible GPU's architecture, this takes one problem of the kernel report that runs the
row's capped tile (fp16; a named model shape first, then a B x H = 8 x 12 batch, then the
fewest tokens), runs its launches as planned and with the cap removed from that row's
launch, and records, for both, the median time (``triton.testing.do_bench``) and the
registers, stack bytes and resident blocks per SM of the compiled kernel (from the cubin,
as ``divattn kernels`` reads them).

    python benchmarks/gpu/register_caps.py --out register_caps.json
    python benchmarks/gpu/register_caps.py --arch 90 --dry-run   # the cases, no GPU needed

Exit status: 0 every case ran; 1 a case failed; 3 no CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def capped_rows(arch: int) -> list:
    """``(row name, candidate)`` of every tile-table candidate with a register cap that the
    planner can pick on ``sm_<arch>`` (candidate: ``(rows, warps, stages, cap)``)."""
    from divattn.ops.triton import plan

    out = []
    for name in ("_HOPPER", "_AMPERE", "_CLS"):
        for key, candidates in getattr(plan, name).items():
            row = f"{name}[{key!r}]"
            reachable = any(plan._table_row(*key, arch, cls)[0] == row for cls in (False, True))
            out += [(row, tuple(c)) for c in candidates if len(c) == 4 and reachable]
    return out


def _runs(launch, row: str, candidate: tuple) -> bool:
    rows, warps, stages, cap = candidate
    c = launch.constexprs
    return (launch.tile == row and launch.max_registers == cap and launch.num_warps == warps
            and launch.num_stages == stages and c["GROUP"] * c["SEQ"] == max(16, rows))


def cases(arch: int) -> list:
    """One case per capped row of :func:`capped_rows`: ``{"row", "candidate", "problem",
    "choice"}``, ``choice`` the index of the problem's tile candidate that runs the row."""
    from divattn.cli import kernels as kernels_cli
    from divattn.kernels_report.problems import plans

    todo = capped_rows(arch)
    from divattn.shapes import GPU_SHAPES

    probs = kernels_cli.select(dtypes=("fp16",))
    # a named model shape, then a training batch, then the fewest tokens
    probs.sort(key=lambda p: (p.shape.name not in GPU_SHAPES, (p.shape.B, p.shape.H) != (8, 12),
                              p.shape.B * p.shape.T * p.shape.N))
    found = {}
    for p in probs:
        if len(found) == len(todo):
            break
        for c, launches in enumerate(plans(p, target=arch)):
            for row, candidate in todo:
                if (row, candidate) not in found and any(_runs(lc, row, candidate) for lc in launches):
                    found[(row, candidate)] = {"row": row, "candidate": list(candidate), "problem": p, "choice": c}
    missing = [r for r in todo if r not in found]
    if missing:
        raise RuntimeError(f"no problem of the kernel report runs the capped candidate(s) {missing} on sm_{arch}")
    return [found[r] for r in todo]


def uncapped(launches: list, row: str, candidate: tuple) -> list:
    """``launches`` with the cap of the row's launch removed (ptxas picks the registers)."""
    return [dataclasses.replace(lc, max_registers=None) if _runs(lc, row, candidate) else lc for lc in launches]


def _measure(case: dict, sm: int) -> dict:
    import triton.testing

    from divattn.kernels_report import build
    from divattn.kernels_report.problems import plans

    row, candidate = case["row"], tuple(case["candidate"])
    capped = plans(case["problem"], target=None, device="cuda")[case["choice"]]
    variants = {"capped": capped, "uncapped": uncapped(capped, row, candidate)}
    out = {"row": row, "candidate": list(candidate), "problem": case["problem"].id}
    for name, launches in variants.items():
        kernel = next(lc for lc in launches if lc.tile == row)
        res = build.compile_launch(kernel, sm)
        ms = triton.testing.do_bench(lambda ls=launches: [lc.run() for lc in ls], warmup=25, rep=100)
        out[name] = {"ms": ms, "registers": res["registers"], "stack_bytes": res["stack_bytes"],
                     "blocks_per_sm": res["blocks_per_sm"]}
    out["uncapped_over_capped"] = out["uncapped"]["ms"] / out["capped"]["ms"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the records (JSON) here")
    p.add_argument("--arch", type=int, default=None, help="with --dry-run: the SM to list cases for (default 90)")
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.dry_run:
        arch = args.arch or 90
        for case in cases(arch):
            print(f"sm_{arch} {case['row']} {tuple(case['candidate'])}: {case['problem'].id} (candidate {case['choice']})")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("UNAVAILABLE: no CUDA device (torch.cuda.is_available() is False)", flush=True)
        return 3
    major, minor = torch.cuda.get_device_capability()
    sm = major * 10 + minor
    arch = 90 if sm >= 90 else 80  # the tile table's columns
    records, failed = [], 0
    for case in cases(arch):
        try:
            rec = _measure(case, sm)
        except Exception as e:  # a failed case is a record, and the exit status
            failed += 1
            rec = {"row": case["row"], "candidate": case["candidate"], "problem": case["problem"].id,
                   "error": f"{type(e).__name__}: {e}"}
        rec.update(gpu=torch.cuda.get_device_name(), sm=sm, table=arch)
        records.append(rec)
        if "error" in rec:
            print(f"{rec['row']} {tuple(rec['candidate'])}: FAILED {rec['error']}", flush=True)
        else:
            print(f"{rec['row']} {tuple(rec['candidate'])} on {rec['problem']}: capped {rec['capped']['ms']:.4f} ms "
                  f"({rec['capped']['registers']} regs, {rec['capped']['blocks_per_sm']} blocks), uncapped "
                  f"{rec['uncapped']['ms']:.4f} ms ({rec['uncapped']['registers']} regs, "
                  f"{rec['uncapped']['stack_bytes']} B stack, {rec['uncapped']['blocks_per_sm']} blocks): "
                  f"uncapped / capped {rec['uncapped_over_capped']:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
