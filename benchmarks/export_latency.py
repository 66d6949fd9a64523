"""Inference latency of an exported model on a CPU: eager divattn, onnxruntime, and the plain transformers model.

    python benchmarks/export_latency.py                   # records to .benchmarks/divattn/export/cpu.json
    python benchmarks/export_latency.py --update-results  # to benchmarks/results/export/ (cpu.json, summary.md)

The model is the bundled TimeSformer (divided space-time) at a small size (``--config``);
the same architecture as a ``transformers`` ``TimesformerForVideoClassification`` is the
baseline. Each row is one forward pass, fp32, batch ``--batch``:

- ``divattn-torch``: the bundled model, eager, on the torch backend (torch's CPU flash kernel);
- ``onnxruntime``: onnxruntime on the bundled model's ONNX export (:func:`divattn.export.export_onnx`),
  static shapes like the baseline's;
- ``onnxruntime-dynamic``: the same with a dynamic batch and frame count
  (:func:`divattn.export.dynamic_shapes`);
- ``onnxruntime-transformers``: onnxruntime on the plain ``transformers`` model's export
  (``torch.onnx.export(model, (x,), dynamo=True)``, static shapes);
- ``transformers``: the plain ``transformers`` model, eager (context).

torch and onnxruntime both use ``--threads`` threads (default 1). The candidates are timed
interleaved, one call each per round, so that whatever else runs on a shared machine slows
all of them alike; each record keeps the median, the 10th-percentile spread and the probe
of :mod:`divattn.bench.timing`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from divattn.bench import records, timing  # noqa: E402
from divattn.shapes import ModelShape  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "export"
LOCAL = ROOT / ".benchmarks" / "divattn" / "export"

# ViT-Tiny width (192, 3 heads of 64), 4 blocks, 8 frames of 112 px in 16-px patches (N = 49)
CONFIG = dict(num_frames=8, img_size=112, patch_size=16, embed_dim=192, depth=4, num_heads=3, num_classes=10)


def _session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def build(batch: int, threads: int, workdir: Path) -> tuple:
    """``(shape, {provider: fn})``; raises when an onnxruntime session's logits are not the eager model's."""
    import transformers

    import divattn.export as dx
    from divattn.models import create_model

    c = CONFIG
    torch.manual_seed(0)
    model = create_model("timesformer_base", **c, backend="torch").eval()
    hf = transformers.TimesformerForVideoClassification(transformers.TimesformerConfig(
        image_size=c["img_size"], patch_size=c["patch_size"], num_frames=c["num_frames"], hidden_size=c["embed_dim"],
        num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"], intermediate_size=4 * c["embed_dim"],
        num_labels=c["num_classes"], attention_type="divided_space_time")).eval()
    video = torch.randn(batch, 3, c["num_frames"], c["img_size"], c["img_size"], generator=torch.Generator().manual_seed(0))
    frames = video.transpose(1, 2).contiguous()  # transformers' (B, T, C, H, W)

    programs = {
        "onnxruntime": dx.export_onnx(model, (video,)),
        "onnxruntime-dynamic": dx.export_onnx(model, (video,), dynamic_shapes=dx.dynamic_shapes(model)),
        "onnxruntime-transformers": torch.onnx.export(hf, (frames,), dynamo=True),
    }

    def ort_call(name, program, x):
        path = str(workdir / f"{name}.onnx")
        program.save(path)
        sess = _session(path, threads)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        return lambda: sess.run(None, feed)[0]

    def eager(m, x):
        def call():
            with torch.no_grad():
                return m(x)
        return call

    fns = {"divattn-torch": eager(model, video)}
    fns.update({name: ort_call(name, p, frames if name.endswith("transformers") else video)
                for name, p in programs.items()})
    fns["transformers"] = eager(hf, frames)
    with torch.no_grad():
        want = {"divattn": model(video), "transformers": hf(frames).logits}
    for name in programs:
        ref = want["transformers" if name.endswith("transformers") else "divattn"]
        err = (torch.from_numpy(fns[name]()) - ref).abs().max().item()
        if err > 1e-4:
            raise AssertionError(f"{name}: onnxruntime's logits are {err:.2e} from the eager model's")
    shape = ModelShape(f"cpu_timesformer_192x4_{c['num_frames']}x{c['img_size']}", "timesformer_base", B=batch,
                       frames=c["num_frames"], size=c["img_size"], kwargs=c,
                       label=f"CPU stand-in: TimeSformer divided, width {c['embed_dim']}, depth {c['depth']}, "
                             f"{c['num_heads']} heads, {c['num_frames']}x{c['img_size']}")
    return shape, fns


def interleaved(fns: dict, seconds: float, warmup: int = 5, max_rounds: int = 2000) -> dict:
    """{provider: per-call seconds}: each round calls every provider once, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(times[next(iter(fns))]) < max_rounds:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def summary(recs: list) -> str:
    by = {r["provider"]: r for r in recs}
    r0 = recs[0]
    lines = [
        "# Exported model latency (CPU)",
        "",
        f"Rendered by `python benchmarks/export_latency.py --update-results`. {r0['shape']['label']}, batch "
        f"{r0['shape']['B']}, fp32, one forward; {r0['device']}, onnxruntime with the same thread count; "
        f"timed interleaved (load average {r0['load_avg_1m']} at the start); torch {r0['torch']}, "
        f"commit {r0['commit']}{' (uncommitted changes)' if r0['dirty'] else ''}, {r0['date']}.",
        "",
        "| provider | median ms | min ms | spread (median / p10) | rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in recs:
        lines.append(f"| {r['provider']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['spread']:.3f} | "
                     f"{r['rounds']} |")
    eager, theirs = by["divattn-torch"]["median_ms"], by["onnxruntime-transformers"]["median_ms"]
    lines.append("")
    for name in ("onnxruntime", "onnxruntime-dynamic"):
        ours = by[name]["median_ms"]
        lines.append(f"- {name}: {ours / eager:.2f}x the eager divattn model (torch backend), "
                     f"{ours / theirs:.2f}x onnxruntime on the transformers export")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=60.0, help="time spent in the interleaved rounds")
    p.add_argument("--update-results", action="store_true", help="write benchmarks/results/export/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    env = records.environment(device)
    env["malloc"] = timing.pin_malloc()
    with tempfile.TemporaryDirectory() as tmp:
        shape, fns = build(args.batch, args.threads, Path(tmp))
        plan = timing.Plan(warmup=5, rounds=0, inner=1)
        before = timing.probe_ms(device)
        times = interleaved(fns, args.seconds, plan.warmup)
        probe = max(before, timing.probe_ms(device))
    recs = []
    for name, ts in times.items():
        t = timing.from_seconds(ts, plan, probe)
        recs.append(records.make(env, provider=name, op="model", pass_="fwd", shape=shape.as_dict(),
                                 dtype=torch.float32, median_ms=t.median_ms, min_ms=t.min_ms, max_ms=t.max_ms,
                                 rounds=t.rounds, inner=1, spread=round(t.spread, 4), probe_ms=t.probe_ms, attempts=1))
    out = RESULTS if args.update_results else LOCAL
    path = records.write(out / "cpu.json", recs)
    text = summary(recs)
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"records written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
