"""Sequence parallelism on the GPUs of this machine: the acceptance run's multi-GPU check.

With two or more GPUs visible, one process per GPU (two by default) in an NCCL group:

- ``models``: a divided TimeSformer (with cls, stochastic depth, in training) and the
  causal ST transformer, each parallelized over the group (``model.parallelize``) and given
  its frame shard of one clip; the logits (predicted frames) and every parameter's
  gradient (the group's mean) against the same model on the whole clip on the rank's own
  GPU, fp32 with TF32 off, the frames uneven over the ranks;
- ``train``: ``divattn train`` under ``torchrun --nproc_per_node 2`` with
  ``parallel.sequence=2`` (a 1 x 2 data x sequence mesh) for a few steps, which must end
  with exit 0 and ``sequence_parallel: 2`` in its summary;
- ``bench``: ``divattn bench --sequence-parallel 1,2 --device cuda --quick`` (one
  TimeSformer-B-width block on a long clip; wall time and bytes per rank), its records
  written beside the result.

NCCL runs the same code as the gloo tests of ``tests/distributed`` (which run on a CPU in
CI). With fewer than two GPUs it prints ``UNAVAILABLE`` with the count and runs nothing
(exit 3). ``--device cpu`` runs the ``models`` check on gloo processes instead (how it is
tested without a GPU).

    python benchmarks/gpu/sequence_parallel.py --out result.json
    python benchmarks/gpu/sequence_parallel.py --device cpu --only models

Exit status: 0 every check passed, 1 one failed, 3 it cannot run here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ("models", "train", "bench")
TOL = 1e-4  # fp32, TF32 off: the two kernels' summation orders differ
# (model, create_model keywords, frames, output is per frame)
MODELS = {
    "timesformer-divided": ("timesformer_base", dict(img_size=48, num_frames=7, num_classes=5, drop_path_rate=0.2)),
    "st-causal": ("st_transformer_tiny", dict(img_size=48, num_frames=7, drop_path_rate=0.2)),
}
SMALL = dict(embed_dim=64, depth=2, num_heads=2, patch_size=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="processes (one GPU each); default 2")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="cuda (default when GPUs are visible) or cpu (gloo, the models check only)")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks of {','.join(CHECKS)}")
    p.add_argument("--out", default=None, help="write the result as JSON here (bench records beside it)")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    return p.parse_args(argv)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models_rank(rank: int, world: int, device_type: str, port: int, results) -> None:
    """One rank of the ``models`` check: the worst relative error of each model's output and gradients."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from divattn.models import create_model
    from divattn.testing.sequence_parallel import parallel_errors

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        errors = {}
        for case, (name, kw) in MODELS.items():
            torch.manual_seed(0)
            model = create_model(name, **SMALL, **kw).to(device).train()
            T, size = kw["num_frames"], kw["img_size"]
            video = torch.randn(2, 3, T, size, size, generator=torch.Generator().manual_seed(1)).to(device)
            worst = max(parallel_errors(model, video, seed=2).values())
            errors[case] = {"frames_per_rank": list(model.sequence.frame_sizes), "worst_relative_error": worst}
        results.put((rank, errors))
    except BaseException as e:  # reported, not swallowed
        results.put((rank, {"error": f"{type(e).__name__}: {e}"}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_models(world: int, device_type: str, timeout_s: float = 300.0) -> dict:
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_models_rank, args=(r, world, device_type, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        while len(got) < world:
            try:
                rank, value = results.get(timeout=timeout_s)
            except queue.Empty:
                break
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {v['error']}" for r, v in sorted(got.items()) if "error" in v]
    errors += [f"rank {r} gave no result in {timeout_s:.0f} s" for r in range(world) if r not in got]
    if errors:
        return {"status": "failed", "error": "; ".join(errors)}
    cases = {case: {"frames_per_rank": got[0][case]["frames_per_rank"],
                    "worst_relative_error": max(got[r][case]["worst_relative_error"] for r in range(world))}
             for case in MODELS}
    ok = all(c["worst_relative_error"] <= TOL for c in cases.values())
    return {"status": "passed" if ok else "failed", "tolerance": TOL, "cases": cases}


def _run(cmd: list, timeout_s: float, env=None) -> tuple:
    print("$ " + " ".join(cmd), flush=True)
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    print(r.stdout[-4000:] + r.stderr[-4000:], flush=True)
    return r.returncode, (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]


def check_train(world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "divattn", "train", "-o", tmp, f"parallel.sequence={world}", "device=cuda", "train.epochs=1",
               "data.num_frames=8", "data.synthetic.train_size=64", "data.synthetic.val_size=32",
               "train.batch_size=8", "data.num_workers=0", "log.tensorboard=false", "log.progress=false"]
        rc, last = _run(cmd, 240)
        summary_path = Path(tmp) / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    ok = rc == 0 and summary.get("sequence_parallel") == world
    return {"status": "passed" if ok else "failed", "rc": rc, "last_line": last,
            "sequence_parallel": summary.get("sequence_parallel"), "val_top1": summary.get("val_top1")}


def check_bench(world: int, out: str | None) -> dict:
    records = str(Path(out).with_name("bench_sequence_parallel.json")) if out else None
    cmd = [sys.executable, "-m", "divattn", "bench", "--sequence-parallel", f"1,{world}", "--device", "cuda",
           "--quick", *(["--json", records] if records else [])]
    rc, last = _run(cmd, 240)
    return {"status": "passed" if rc == 0 else "failed", "rc": rc, "last_line": last, "records": records}


def main(argv=None) -> int:
    args = parse_args(argv)
    checks = [c for c in args.only.split(",") if c]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        print(f"sequence_parallel: unknown checks {unknown}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"sequence_parallel: {', '.join(checks)} on {args.gpus} GPUs (NCCL); models {list(MODELS)}")
        return 0

    import torch

    device = args.device or "cuda"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and gpus < args.gpus:
        print(f"UNAVAILABLE: {gpus} GPU(s) visible; the sequence-parallel checks need {args.gpus} "
              "(nothing ran; tests/distributed runs the same code on gloo in CI)", flush=True)
        return 3
    if device == "cpu" and checks != ["models"]:
        print("sequence_parallel: --device cpu runs the models check only (--only models)", file=sys.stderr)
        return 1
    result = {"device": device, "processes": args.gpus, "torch": torch.__version__}
    if device == "cuda":
        result["gpus"] = [torch.cuda.get_device_name(i) for i in range(args.gpus)]
    for check in checks:
        result[check] = {"models": lambda: check_models(args.gpus, device),
                         "train": lambda: check_train(args.gpus),
                         "bench": lambda: check_bench(args.gpus, args.out)}[check]()
        print(f"--- {check}: {result[check]['status']}", flush=True)
    ok = all(result[c]["status"] == "passed" for c in checks)
    result["status"] = "passed" if ok else "failed"
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
