"""Benchmark records for the GPU acceptance run, without pytest-benchmark.

Two record sets the headline ``divattn bench`` table does not cover, built from the same
pieces (:func:`divattn.bench.suite.run`, :mod:`divattn.bench.records`):

``sweep``       latency versus frames T on one shape: divided attention (temporal,
                spatial with cls) against joint attention over all ``1 + N*T`` tokens.
``train-step``  a whole training step of TimeSformer (forward under autocast,
                cross-entropy, backward, AdamW) on the bundled model per divattn backend,
                and on ``transformers``' ``TimesformerForVideoClassification`` of the same
                config: eager, ``torch.compile``d, and with its attention swapped to divattn
                (:func:`divattn.swap_attention`). Without ``transformers`` those rows are
                recorded as unavailable with the reason.

Records are written after every case, so a run stopped by its time limit keeps what it
measured. ``--dry-run`` validates the arguments and lists the cases without running them.
Exit status: 1 when a divattn provider failed (a bug), else 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SWEEP_OPS = ("temporal", "spatial_cls", "joint")
HF_PROVIDERS = ("transformers-eager", "transformers-compiled", "transformers-divattn-triton")


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sweep", "train-step"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True, help="records JSON to write")
        s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
        s.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
        s.add_argument("--providers", required=True, help="comma list, in the order to run")
        s.add_argument("--quick", action="store_true", help="shorter timing")
        s.add_argument("--dry-run", action="store_true", help="validate, list the cases, run nothing")
    sweep = sub.choices["sweep"]
    sweep.add_argument("--shape", default="timesformer_8x224", help="the attention shape whose T is swept")
    sweep.add_argument("--frames", default="1,2,4,8,16,32,64,96", help="comma list of T")
    sweep.add_argument("--ops", default=",".join(SWEEP_OPS), help="comma list of " + ", ".join(SWEEP_OPS))
    sweep.add_argument("--passes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    train = sub.choices["train-step"]
    train.add_argument("--shape", default="timesformer_base_8x224", help="a TimeSformer model shape")
    return p.parse_args(argv)


def _validate(args):
    """The cases to run as (provider, op, pass, shape); SystemExit naming what is wrong."""
    from divattn import shapes
    from divattn.bench import providers, suite

    try:
        shape = shapes.lookup(args.shape)
    except ValueError as e:
        raise SystemExit(f"bench_records: {e}")
    names = _csv(args.providers)
    if args.command == "sweep":
        if not isinstance(shape, shapes.AttnShape):
            raise SystemExit(f"bench_records: sweep takes an attention shape, got model shape {args.shape}")
        try:
            providers.select(names)
        except ValueError as e:
            raise SystemExit(f"bench_records: {e}")
        ops, passes = _csv(args.ops), _csv(args.passes)
        bad = [o for o in ops if o not in SWEEP_OPS] + [p for p in passes if p not in suite.ATTENTION_PASSES]
        if bad or not shape.cls and "spatial_cls" in ops:
            raise SystemExit(f"bench_records: cannot sweep {', '.join(bad) or 'spatial_cls without a cls token'}")
        frames = [int(t) for t in _csv(args.frames)]
        return [(n, op, p, shape.with_frames(t)) for n in names for p in passes for t in frames for op in ops]
    if not isinstance(shape, shapes.ModelShape) or not shape.model.startswith("timesformer"):
        raise SystemExit(f"bench_records: train-step takes a TimeSformer model shape, got {args.shape}")
    known = [*providers.MODEL_BACKENDS, *HF_PROVIDERS]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"bench_records: unknown train-step provider {', '.join(bad)} (known: {', '.join(known)})")
    return [(n, "model", "train_step", shape) for n in names]


def _hf_config(shape, num_classes_default: int = 400):
    """A ``transformers`` TimesformerConfig equal to the bundled model of ``shape``."""
    import torch
    from transformers import TimesformerConfig

    from divattn.models import create_model

    with torch.device("meta"):
        c = create_model(shape.model, **shape.kwargs).config
    return TimesformerConfig(
        image_size=c.img_size, patch_size=c.patch_size, num_channels=c.in_chans, num_frames=c.num_frames,
        hidden_size=c.embed_dim, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
        intermediate_size=int(c.embed_dim * c.mlp_ratio), hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=c.norm_eps, qkv_bias=c.qkv_bias,
        attention_type=c.attention_type, num_labels=c.num_classes or num_classes_default,
    ), c


def _hf_record(provider, shape, dtype, device, env, peaks, budget):
    """One transformers train-step record (ok, unavailable or error)."""
    import torch
    import torch.nn.functional as F

    from divattn import flops as flop_model
    from divattn.bench import records, roofline, suite, timing
    from divattn.models import create_model

    common = dict(provider=provider, op="model", pass_="train_step", shape=shape.as_dict(), dtype=dtype)
    if peaks is not None:
        common.update(peak_copy_gbps=peaks.copy_gbps, peak_matmul_tflops=peaks.matmul_tflops)
    try:
        import transformers
        from transformers import TimesformerForVideoClassification
    except Exception as e:  # absent, or broken against this torch
        return records.make(env, status="unavailable", error=f"transformers is not importable here: "
                                                              f"{type(e).__name__}: {e}", **common)
    if provider == "transformers-divattn-triton":
        from divattn.bench.providers import model_reason

        with torch.device("meta"):
            c = create_model(shape.model, **shape.kwargs).config
        why = model_reason("divattn-triton", device, dtype, c.embed_dim // c.num_heads)
        if why:
            return records.make(env, status="unavailable", error=why, **common)
    try:
        cfg, c = _hf_config(shape)
        torch.manual_seed(0)
        model = TimesformerForVideoClassification(cfg).to(device).train()
        if provider == "transformers-divattn-triton":
            from divattn import swap_attention

            swap_attention(model, backend="triton")
        gen = torch.Generator(device=device).manual_seed(0)
        # transformers takes (B, T, C, H, W)
        video = torch.randn(shape.B, c.num_frames, c.in_chans, c.img_size, c.img_size, device=device, generator=gen)
        labels = torch.randint(0, cfg.num_labels, (shape.B,), device=device, generator=gen)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        forward = torch.compile(model) if provider == "transformers-compiled" else model

        def step():
            opt.zero_grad(set_to_none=True)
            with suite._autocast(device, dtype):
                loss = F.cross_entropy(forward(pixel_values=video).logits, labels)
            loss.backward()
            opt.step()

        step()
        t = timing.measure(step, device, budget)
        params = list(model.parameters())
        state = [x for s in opt.state.values() for x in s.values() if isinstance(x, torch.Tensor)]
        mem, method = timing.peak_memory_mb(step, device, [*params, *state, video, labels]) \
            if device.type == "cuda" or provider != "transformers-compiled" else (None, "not measured")
        with torch.device("meta"):
            bundled = create_model(shape.model, **shape.kwargs)
        count = flop_model.count_macs(bundled, shape.video_shape(c.in_chans), implementation="bundled")
        n_flops = count.train_step_flops()
        n_bytes = 10 * sum(p.numel() * p.element_size() for p in params) + video.numel() * video.element_size()
        attention = flop_model.MacCount(attention=count.attention).train_step_flops()
    except Exception as e:  # recorded: someone else's model failing here is a finding, not our bug
        return records.make(env, status="error", error=f"transformers {transformers.__version__}: "
                                                       f"{suite._error_text(e)}", **common)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records.make(env, median_ms=t.median_ms, min_ms=t.min_ms, max_ms=t.max_ms, rounds=t.rounds,
                        inner=t.inner, flops=n_flops, bytes=n_bytes, attention_flops=attention, peak_mem_mb=mem,
                        peak_mem_method=method, **roofline.roofline(peaks, n_flops, n_bytes, t.median_ms), **common)


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = _validate(args)
    if args.dry_run:
        for provider, op, pass_, shape in cases:
            print(f"case {provider} {op} {pass_} {shape.name} B{shape.B}")
        return 0

    import torch

    from divattn.bench import providers, records, roofline, suite, timing

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    env = records.environment(device)
    peaks = roofline.measure_peaks(device, dtype)
    budget = timing.Budget.for_device(device, quick=args.quick)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
          f"{len(cases)} cases -> {args.out}", flush=True)
    out, failed = [], 0
    for provider, op, pass_, shape in cases:
        start = time.perf_counter()
        if provider in HF_PROVIDERS:
            rec = _hf_record(provider, shape, dtype, device, env, peaks, budget)
        else:
            rec = suite.run(suite.Case(provider, op, pass_, shape, dtype, device), env, peaks, budget)
        out.append(rec)
        records.write(args.out, out)
        ours = provider in providers.PROVIDERS and providers.PROVIDERS[provider].ours
        failed += rec["status"] == "error" and ours
        value = f"{rec['median_ms']:.3f} ms" if rec["status"] == "ok" else f"{rec['status']}: {rec['error']}"
        print(f"{provider:28s} {op:11s} {pass_:10s} {shape.name:28s} {value} "
              f"[{time.perf_counter() - start:.1f} s]", flush=True)
    print(f"bench_records: {len(out)} records written to {args.out}; {failed} divattn failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
