"""Modelled benchmark records: counted memory traffic and the H100 time it implies.

Nothing here is measured on a GPU. For each op and pass of an attention shape the
Triton launches that an H100 (sm_90) would run are executed under the Triton
interpreter at a small batch (B=1, H at most 2; the shape's T, N, D, token order and
cls) and their global-memory traffic counted (:mod:`divattn.kernels_report.traffic`:
distinct 32-byte sectors per program, summed over programs). The ratio of that traffic
to the least the pass can move (read every input once, write every output once) is
applied to the full shape's minimum to give the modelled bytes, and

    modelled_ms = max(bytes / 3.35 TB/s, flops / 989 TFLOP/s)

(H100 SXM HBM3 bandwidth and dense bf16 tensor-core peak), beside ``floor_ms``, the
same formula on the minimum bytes. Records carry ``"kind": "modelled"`` and are
written to their own file: they are never mixed with measured records. Traffic is
counted in fp16 for fp16 and bf16 (same bytes; the interpreter's bf16 ``tl.dot`` is
unreliable) and in fp32 for fp32.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Optional, Sequence

from .. import flops as flop_model
from ..kernels_report import traffic
from ..kernels_report.problems import Problem
from ..shapes import AttnShape

KIND = "modelled"
DEVICE = "H100 SXM (modelled: 3.35 TB/s, 989 TFLOP/s)"
TARGET = 90
PASSES = {"fwd": ("fwd",), "bwd": ("bwd",), "fwd+bwd": ("fwd", "bwd")}
FIELDS = ("kind", "device", "target", "op", "pass", "shape", "dtype", "counted_at", "bytes", "min_bytes",
          "traffic_ratio", "unique_ratio", "flops", "modelled_ms", "floor_ms", "launches", "triton", "commit", "date")

_DTYPE = {"float16": "fp16", "bfloat16": "fp16", "float32": "fp32"}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def counted_shape(shape: AttnShape) -> AttnShape:
    """The small shape the traffic is counted on: B=1, at most 2 heads, the rest as ``shape``."""
    return dataclasses.replace(shape, B=1, H=min(shape.H, 2), name=shape.name)


def records(shape: AttnShape, plan: Sequence[tuple], dtype, env: Optional[dict] = None) -> list:
    """One modelled record per ``(op, pass)`` of ``plan`` (passes ``fwd``, ``bwd``, ``fwd+bwd``)."""
    small = counted_shape(shape)
    counted_dtype = _DTYPE[_dtype_name(dtype)]
    wanted = sorted({(op, p) for op, pass_ in plan for p in PASSES[pass_]})
    measured = traffic.measure([Problem(small, op, p, counted_dtype) for op, p in wanted], target=TARGET)
    by_key = {(m["op"], m["pass_"]): m for m in measured}
    env = env or {}
    out = []
    itemsize = {"fp16": 2, "fp32": 4}[counted_dtype]
    for op, pass_ in plan:
        parts = [by_key[(op, p)] for p in PASSES[pass_]]
        q_shape = shape.q_shape(op)
        min_bytes = sum(flop_model.attention_bytes(op, q_shape, itemsize, p) for p in PASSES[pass_])
        counted_min = sum(m["min_bytes"] for m in parts)
        ratio = sum(m["bytes"] for m in parts) / counted_min
        unique_ratio = sum(m["unique_bytes"] for m in parts) / counted_min
        causal = {"causal": True} if getattr(shape, "causal", False) and op == "temporal" else {}
        flops = sum(flop_model.attention_flops(op, q_shape, p, **causal) for p in PASSES[pass_])
        nbytes = int(round(ratio * min_bytes))
        out.append({
            "kind": KIND, "device": DEVICE, "target": f"sm_{TARGET}", "op": op, "pass": pass_,
            "shape": shape.as_dict(), "dtype": _dtype_name(dtype),
            "counted_at": {"B": small.B, "H": small.H, "dtype": counted_dtype},
            "bytes": nbytes, "min_bytes": min_bytes, "traffic_ratio": round(ratio, 4),
            "unique_ratio": round(unique_ratio, 4), "flops": flops,
            "modelled_ms": traffic.modelled_ms(nbytes, flops), "floor_ms": traffic.modelled_ms(min_bytes, flops),
            "launches": [f"{t['kernel']}x{t['programs']}" for m in parts for t in m["launches"]],
            "triton": env.get("triton"), "commit": env.get("commit"),
            "date": env.get("date") or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
    return out


def table(recs: Sequence[dict]) -> list:
    """Plain-text lines of modelled records."""
    header = ("op", "pass", "traffic / minimum", "modelled ms", "floor ms", "modelled / floor")
    body = [(r["op"], r["pass"], f"{r['traffic_ratio']:.2f}", f"{r['modelled_ms']:.4f}", f"{r['floor_ms']:.4f}",
             f"{r['modelled_ms'] / r['floor_ms']:.2f}") for r in recs]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *body)]


def markdown(recs: Sequence[dict]) -> str:
    """A markdown table of modelled records (for the README), labelled as modelled."""
    lines = ["| shape | op | pass | traffic / minimum | modelled H100 ms | floor ms |",
             "|---|---|---|---:|---:|---:|"]
    for r in recs:
        s = r["shape"]
        lines.append(f"| {s['name']} (B={s['B']}, H={s['H']}, D={s['D']}, {r['dtype']}) | {r['op']} | {r['pass']} "
                     f"| {r['traffic_ratio']:.2f} | {r['modelled_ms']:.4f} | {r['floor_ms']:.4f} |")
    return "\n".join(lines)


__all__ = ["records", "table", "markdown", "counted_shape", "KIND", "DEVICE", "FIELDS"]
