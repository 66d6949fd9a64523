"""Render benchmark records into a markdown summary and PNG plots.

    python benchmarks/render.py                      # benchmarks/results/*.json -> benchmarks/results/
    python benchmarks/render.py --results DIR --out DIR [--no-plots]

One records file is one machine (``cpu.json``, ``nvidia-h100-80gb-hbm3.json``, ...).
For each it writes, next to the others in ``--out``:

- ``summary.md``: per machine, the attention-core table (median ms, TFLOP/s, GB/s,
  roofline fraction, peak memory), the whole-model train steps, the frames sweep
  (divided = temporal + spatial with cls, against joint), the padded batches (each way
  against the dense call over the padding), and every provider that did not run with
  its reason. CPU sections say that they are CPU stand-in shapes.
- ``frames_<machine>.png``: latency versus frames T, divided against joint, per provider.
- ``roofline_<machine>.png``: roofline fraction per op and provider, one panel per pass.

Plots need matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from divattn.bench import records as rec_io  # noqa: E402
from divattn.bench.providers import PROVIDERS  # noqa: E402
from divattn.bench.ragged import VARIANTS as RAGGED_VARIANTS  # noqa: E402

HERE = Path(__file__).resolve().parent
OP_ORDER = ("temporal", "spatial", "spatial_cls", "joint")


def _f(value, spec):
    return "–" if value is None else format(value, spec)


def _gflop(flops) -> str:
    return _f(None if flops is None else flops / 1e9, ".2f")


def _machine_title(rs: list, sep: str = "; ") -> str:
    r = rs[0]
    where = "CPU stand-in shapes, not GPU numbers" if r["device_type"] == "cpu" else "GPU"
    if r.get("load_avg_1m") is not None:
        where += f" (load average {r['load_avg_1m']:g} at the start)"
    if r.get("malloc"):
        where += f", {r['malloc']}"
    again = sum(1 for x in rs if (x.get("attempts") or 1) > 1)
    if again:
        where += f", {again} disturbed cases timed again (the lower median kept)"
    dirty = " (uncommitted changes)" if r.get("dirty") else ""
    return (f"{r['device']} — {where}{sep}torch {r['torch']}, triton {r['triton']}, "
            f"commit {r['commit']}{dirty}, {r['date']}")


def _color(plt, provider: str):
    names = list(PROVIDERS)
    return plt.get_cmap("tab10")((names.index(provider) if provider in names else len(names)) % 10)


def _shape_text(shape: dict) -> str:
    text = f"N={shape['N']} H={shape['H']} D={shape['D']} B={shape['B']}, {shape['order']} tokens"
    return text + (", cls" if shape["cls"] else "")


def _is_sweep(r) -> bool:
    return "@T" in r["shape"].get("name", "")


def _is_ragged(r) -> bool:
    return r["shape"].get("kind") == "ragged"


def _table(rows: list, columns: list) -> list:
    """Markdown table lines; ``columns`` are ``(header, right_aligned, cell(record))``."""
    out = ["| " + " | ".join(h for h, _, _ in columns) + " |",
           "|" + "|".join("---:" if right else "---" for _, right, _ in columns) + "|"]
    return out + ["| " + " | ".join(cell(r) for _, _, cell in columns) + " |" for r in rows]


def _shape_cell(r) -> str:
    s = r["shape"]
    name = s["label"] or s["name"] if s.get("kind") == "model" else s["name"]
    return f"{name} (B{s['B']})"


MEASURED = [
    ("TFLOP/s", True, lambda r: _f(r["tflops"], ".3f")),
    ("roofline", True, lambda r: _f(r["roofline_fraction"], ".2f")),
    ("peak MB", True, lambda r: _f(r["peak_mem_mb"], ".1f")),
]


def attention_table(rs: list) -> list:
    rows = [r for r in rs if r["status"] == "ok" and r["op"] != "model" and not _is_sweep(r) and not _is_ragged(r)]
    rows.sort(key=lambda r: (r["shape"]["name"], r["dtype"], r["pass"], OP_ORDER.index(r["op"]), r["median_ms"]))
    return _table(rows, [
        ("shape", False, _shape_cell), ("dtype", False, lambda r: r["dtype"]), ("pass", False, lambda r: r["pass"]),
        ("op", False, lambda r: r["op"]), ("provider", False, lambda r: r["provider"]),
        ("median ms", True, lambda r: _f(r["median_ms"], ".3f")), ("GB/s", True, lambda r: _f(r["gbps"], ".1f")),
        *MEASURED,
    ])


def ragged_table(rs: list) -> list:
    """Padded batches: each provider's time against the dense call over the padding (same
    backend, op, pass); rates count only the real pairs and tokens."""
    rows = [r for r in rs if r["status"] == "ok" and _is_ragged(r)]

    def key(r, variant):  # the same case on the provider's backend with another variant
        backend = next(r["provider"][:-len(v) - 1] for v in RAGGED_VARIANTS if r["provider"].endswith("-" + v))
        return (r["shape"]["name"], r["shape"]["B"], r["dtype"], r["pass"], r["op"], f"{backend}-{variant}")

    padded = {key(r, "padded"): r["median_ms"] for r in rows if r["provider"].endswith("-padded")}

    def versus(r):
        ms = padded.get(key(r, "padded"))
        return _f(r["median_ms"] / ms if ms else None, ".2f")

    rows.sort(key=lambda r: (r["shape"]["name"], r["dtype"], r["pass"], OP_ORDER.index(r["op"]), r["provider"]))
    return _table(rows, [
        ("shape", False, _shape_cell),
        ("real frames", True, lambda r: _f(r["shape"].get("real_fraction"), ".0%")),
        ("dtype", False, lambda r: r["dtype"]), ("pass", False, lambda r: r["pass"]), ("op", False, lambda r: r["op"]),
        ("provider", False, lambda r: r["provider"]), ("median ms", True, lambda r: _f(r["median_ms"], ".3f")),
        ("x padded", True, versus), ("useful TFLOP/s", True, lambda r: _f(r["tflops"], ".4f")),
        ("peak MB", True, lambda r: _f(r["peak_mem_mb"], ".1f")),
    ])


def model_table(rs: list) -> list:
    rows = [r for r in rs if r["status"] == "ok" and r["op"] == "model"]
    rows.sort(key=lambda r: (r["shape"]["name"], r["dtype"], r["median_ms"]))
    return _table(rows, [
        ("model", False, _shape_cell), ("dtype", False, lambda r: r["dtype"]),
        ("provider", False, lambda r: r["provider"]), ("train step ms", True, lambda r: _f(r["median_ms"], ".2f")),
        ("GFLOP (attention)", True, lambda r: f"{_gflop(r['flops'])} ({_gflop(r.get('attention_flops'))})"),
        *MEASURED,
    ])


def sweep_series(rs: list) -> dict:
    """{(pass, dtype, B, provider, "divided" | "joint"): [(T, ms)]}; divided = temporal + spatial_cls."""
    by = defaultdict(dict)
    for r in rs:
        if _is_sweep(r) and r["status"] == "ok":
            by[(r["pass"], r["dtype"], r["shape"]["B"], r["provider"], r["shape"]["T"])][r["op"]] = r["median_ms"]
    series = defaultdict(list)
    for (*key, T), ops in sorted(by.items()):
        if "temporal" in ops and "spatial_cls" in ops:
            series[(*key, "divided")].append((T, ops["temporal"] + ops["spatial_cls"]))
        if "joint" in ops:
            series[(*key, "joint")].append((T, ops["joint"]))
    return dict(series)


def sweep_table(rs: list) -> list:
    series = sweep_series(rs)
    if not series:
        return []
    frames = sorted({T for pts in series.values() for T, _ in pts})
    out = ["| pass | dtype | B | provider | attention | " + " | ".join(f"T={T}" for T in frames) + " |",
           "|---|---|---:|---|---|" + "---:|" * len(frames)]
    for (pass_, dtype, B, provider, kind), pts in sorted(series.items()):
        ms = dict(pts)
        out.append(f"| {pass_} | {dtype} | {B} | {provider} | {kind} | "
                   + " | ".join(_f(ms.get(T), ".3f") for T in frames) + " |")
    return out


def not_run(rs: list) -> list:
    seen = {}
    for r in rs:
        if r["status"] != "ok":
            seen.setdefault((r["provider"], r["status"], r["error"]), 0)
            seen[(r["provider"], r["status"], r["error"])] += 1
    return [f"- **{p}** ({status}, {n} cases): {error}" for (p, status, error), n in sorted(seen.items())]


def summary(files: dict) -> str:
    lines = ["# Benchmark results", "",
             "Rendered by `python benchmarks/render.py` from the records in this folder "
             "(`pytest benchmarks/ --benchmark-only`). `roofline` is the floor "
             "max(bytes / measured copy bandwidth, FLOPs / measured matmul peak) over the median time: "
             "1.0 is the floor.", ""]
    for name, rs in files.items():
        lines += [f"## {name}: {_machine_title(rs)}", ""]
        if rs[0]["device_type"] == "cpu":
            lines += ["CPU run: small stand-in shapes in fp32; the Triton kernels run only in the interpreter on a "
                      "CPU and are not timed. These numbers say nothing about GPU performance.", ""]
        for title, table in (("Attention core", attention_table(rs)), ("Whole-model train step", model_table(rs)),
                             ("Frames sweep (ms): divided = temporal + spatial with cls, joint = all tokens",
                              sweep_table(rs)),
                             ("Padded batches: per-sample frame counts, the dense call over the padding, one call "
                              "per clip", ragged_table(rs))):
            if len(table) > 2:
                lines += [f"### {title}", "", *table, ""]
        missing = not_run(rs)
        if missing:
            lines += ["### Not timed here", "", *missing, ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, axes, title: str, path: Path) -> bool:
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_frames(rs: list, path: Path, title: str) -> bool:
    plt = _pyplot()
    series = sweep_series(rs)
    if not series:
        return False
    # One dtype and batch per picture (the first); summary.md has them all.
    dtype, B = min((k[1], k[2]) for k in series)
    series = {k: v for k, v in series.items() if (k[1], k[2]) == (dtype, B)}
    passes = sorted({k[0] for k in series}, key=lambda p: ("fwd", "fwd+bwd").index(p))
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    shape = next(r["shape"] for r in rs if _is_sweep(r) and r["shape"]["B"] == B)
    frames = sorted({T for pts in series.values() for T, _ in pts})
    for ax, pass_ in zip(axes[0], passes):
        for (ps, _, _, provider, kind), pts in sorted(series.items()):
            if ps != pass_:
                continue
            T, ms = zip(*pts)
            ax.plot(T, ms, "-o" if kind == "divided" else "--s", color=_color(plt, provider), markersize=3,
                    label=f"{kind} · {provider} · {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(frames, [str(T) for T in frames])
        ax.set_xlabel("frames T")
        ax.set_ylabel("median ms")
        ax.set_title(f"{pass_}: divided (temporal + spatial with cls) vs joint\n{_shape_text(shape)}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    return _save(plt, fig, axes, title, path)


def plot_roofline(rs: list, path: Path, title: str) -> bool:
    plt = _pyplot()
    ok = [r for r in rs if r["status"] == "ok" and r["op"] != "model" and not _is_sweep(r) and not _is_ragged(r)
          and r["roofline_fraction"] is not None]
    if not ok:
        return False
    shape = ok[0]["shape"]["name"]
    ok = [r for r in ok if r["shape"]["name"] == shape and r["dtype"] == ok[0]["dtype"]]
    passes = [p for p in ("fwd", "fwd+bwd") if any(r["pass"] == p for r in ok)]
    providers = sorted({r["provider"] for r in ok})
    ops = [op for op in OP_ORDER if any(r["op"] == op for r in ok)]
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.2), squeeze=False)
    width = 0.8 / max(1, len(providers))
    top = max(1.05, 1.1 * max(r["roofline_fraction"] for r in ok))
    for ax, pass_ in zip(axes[0], passes):
        for i, provider in enumerate(providers):
            vals = {r["op"]: r["roofline_fraction"] for r in ok if r["pass"] == pass_ and r["provider"] == provider}
            if not vals:
                continue
            xs = [j + i * width for j, op in enumerate(ops) if op in vals]
            ax.bar(xs, [vals[op] for op in ops if op in vals], width, label=provider, color=_color(plt, provider))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))], ops)
        ax.set_ylabel("roofline fraction (floor / median)")
        ax.set_ylim(0, top)
        ax.set_title(f"{pass_} · {shape} · {ok[0]['dtype']}\n{_shape_text(ok[0]['shape'])}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, axes, title, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(HERE / "results"), help="folder of records JSON files")
    parser.add_argument("--out", default=None, help="where to write (default: the results folder)")
    parser.add_argument("--no-plots", action="store_true", help="only the markdown summary")
    args = parser.parse_args(argv)
    results, out = Path(args.results), Path(args.out or args.results)
    files = {f.stem: rec_io.load([f]) for f in sorted(results.glob("*.json"))}
    files = {k: v for k, v in files.items() if v}
    if not files:
        print(f"no records in {results}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary(files) + "\n", encoding="utf-8")
    written = [out / "summary.md"]
    if not args.no_plots:
        if importlib.util.find_spec("matplotlib") is None:
            print("plots need matplotlib: pip install matplotlib (or pass --no-plots)", file=sys.stderr)
            return 2
        for name, rs in files.items():
            title = _machine_title(rs, sep="\n")
            for kind, plot in (("frames", plot_frames), ("roofline", plot_roofline)):
                path = out / f"{kind}_{name}.png"
                if plot(rs, path, title):
                    written.append(path)
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
