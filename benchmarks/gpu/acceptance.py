"""GPU acceptance: build, test, sanitize and benchmark divattn on one GPU, in one command.

    bash .ci/gpu_acceptance.sh              # the run (about 8 minutes at most)
    bash .ci/gpu_acceptance.sh --dry-run    # the steps, their commands and time limits

Steps, in order (correctness first, so a short budget cuts benchmarks, not tests):

- ``probe``: device, driver, torch / triton / CUDA versions, the tools found, commit, date.
- ``install``: ``pip install --no-deps --no-build-isolation -e .`` (no network needed).
- ``info``: ``python -m divattn info``.
- ``build-cuda``: the CUDA extension for the visible GPU, ahead of time (just in time if
  that fails), in the background while the Triton tests run.
- ``ops-triton``: the op test grid (``tests/ops``) on CUDA tensors, fp16 / bf16 / fp32,
  everything but the ``cuda`` backend, as several pytest processes (Triton compiles on
  the CPU), also in the background; ``ops-cuda``: the ``cuda`` backend's share, once the
  extension is built.
- ``memcheck-triton`` / ``memcheck-cuda``: one small case per kernel (temporal, spatial,
  spatial with cls, joint; forward and backward) under ``compute-sanitizer --tool
  memcheck``, after a run without it that fills the Triton cache; ``racecheck-cuda``: the
  same cases under ``--tool racecheck`` (shared-memory hazards of the CUDA kernels' tiles,
  cp.async double buffers and dS^T exchange).
- ``aoti-package``: the bundled TimeSformer (small) exported with a dynamic batch and frame
  count, compiled into an AOTInductor package and run: the package's logits match the
  eager model's at two shapes, and it launches the Triton kernels (``aoti_package.py``).
- ``sequence-parallel``: with two or more GPUs visible, the sequence-parallel checks on
  NCCL (``sequence_parallel.py``: parallelized models against one GPU, ``divattn train``
  with ``parallel.sequence=2`` under torchrun, the sequence-parallel benchmark); with one
  GPU it says so and is unavailable without changing the exit status.
- ``bench-headline``: ``divattn bench`` on TimeSformer-B 8x224, temporal and spatial with
  cls, forward and forward + backward, every provider but FlexAttention, bf16.
- ``bench-causal``: causal temporal attention at the ST transformer's shape (16 frames,
  256 patches), forward and forward + backward, against the copy-based eager code and SDPA
  with ``is_causal=True``, bf16.
- ``bench-sweep``: frames 1..96, divided (temporal, spatial with cls) against joint.
- ``bench-ragged``: a padded batch (16 clips of up to 16 frames, 60% real): one call with
  the frame counts against the dense call over the padding and one call per clip, per
  backend (``benchmarks/test_ragged.py``; a backend without masks is recorded with its
  reason).
- ``bench-train-step`` / ``bench-train-step-compiled``: the TimeSformer-B training step on
  the bundled model per divattn backend against ``transformers`` eager and
  ``torch.compile``d (and with its attention swapped to divattn).
- ``bench-register-caps``: each tile-table row that caps ptxas's registers, on one problem
  that runs it, timed with the cap and without (``register_caps.py``): the trade of a few
  spilled bytes against resident blocks that the static report cannot price.
- ``kernels``: ``python -m divattn kernels`` for the GPU's architecture (static report).

Benchmarks start once every background step has ended. Every step has its own time
limit, cut to what is left of the run's budget (``--budget``, default 480 s); a step that
fails or times out is recorded and the run goes on; a step that needs a tool or a step
that is missing is recorded as unavailable or skipped, with the reason.

Everything lands in ``benchmarks/results/gpu/<date>-<commit>/`` and, when ``$OUT`` is
set, in ``$OUT/<date>-<commit>/`` as well: ``acceptance.json`` (the environment and every
step: command, limit, status, seconds, what it found), ``summary.txt``,
``environment.json``, benchmark records (``bench_*.json``, the format of
``benchmarks/results``), the op tests' JUnit XML and one log per step.

Exit status: 0 every correctness step passed; 1 a correctness step failed or timed out,
or a divattn provider failed in a benchmark; 2 nothing failed but a correctness step could
not run (a missing tool, or the budget ran out).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu"
BUDGET_S = 480
# Exit status of the helper scripts in this folder when what they need is not here.
UNAVAILABLE_RC = 3
NOT_CHOSEN = "not chosen (--only)"

HEADLINE_PROVIDERS = ("divattn-triton", "divattn-cuda", "divattn-torch", "reference", "sdpa-math", "sdpa-flash",
                      "sdpa-efficient", "sdpa-cudnn")
SWEEP_PROVIDERS = ("divattn-triton", "sdpa-flash", "divattn-cuda", "reference")
TRAIN_PROVIDERS = ("divattn-triton", "transformers-eager", "transformers-divattn-triton", "divattn-cuda")


@dataclass
class Step:
    """One command. ``kind``: ``correctness`` (decides the exit status), ``benchmark``
    or ``info``. ``needs``: steps that must have passed first (else: skipped, saying
    which). ``background``: start it and go on; a step that needs it waits for it."""

    name: str
    kind: str
    cmd: list
    timeout: int
    what: str
    env: dict = field(default_factory=dict)
    needs: tuple = ()
    background: bool = False
    unavailable: Optional[str] = None  # known before running: why it cannot run here
    junit: Optional[str] = None  # JUnit XML the step writes (pytest)
    # unavailable here leaves the exit status alone (a check of what this machine may not have)
    optional: bool = False
    # filled in by the run
    status: str = "pending"
    rc: Optional[int] = None
    seconds: Optional[float] = None
    detail: str = ""
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    limit: float = 0.0
    log: Optional[Path] = None


# Tools -----------------------------------------------------------------------------

def find_nvcc() -> Optional[str]:
    """nvcc: ``$NVCC``, ``$CUDA_HOME/bin``, ``/usr/local/cuda``, the newest ``/usr/local/cuda-*``, PATH."""
    candidates = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), key=_version_key, reverse=True)
    candidates.append(shutil.which("nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def find_sanitizer(nvcc: Optional[str]) -> Optional[str]:
    """compute-sanitizer: ``$COMPUTE_SANITIZER``, PATH, next to nvcc, the usual CUDA folders."""
    candidates = [os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer")]
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        candidates += [str(home / "bin" / "compute-sanitizer"), str(home / "compute-sanitizer" / "compute-sanitizer")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "compute-sanitizer"))
    for root in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True),
                 "/opt/nvidia/cuda", "/usr/lib/nvidia-cuda-toolkit"]:
        candidates += [f"{root}/bin/compute-sanitizer", f"{root}/compute-sanitizer/compute-sanitizer"]
    candidates += sorted(glob.glob("/opt/nvidia/nsight-compute/*/compute-sanitizer/compute-sanitizer"), reverse=True)
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _version_key(path: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", path))


def _git(*args) -> Optional[str]:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


# The plan ----------------------------------------------------------------------------

def plan(run_dir: Path, nvcc: Optional[str], sanitizer: Optional[str], arch: str, jobs: int) -> list:
    """Every step of the run, in order, with its command and time limit."""
    py = sys.executable
    script = lambda name: str(HERE / name)  # noqa: E731
    out = lambda name: str(run_dir / name)  # noqa: E731
    have_pytest = importlib.util.find_spec("pytest") is not None
    no_pytest = None if have_pytest else "pytest is not installed in this Python (the op tests need it)"
    no_sanitizer = None if sanitizer else ("compute-sanitizer not found (looked on PATH, next to nvcc and in "
                                           "/usr/local/cuda*/ and /opt/nvidia/)")
    # Triton compiles on the CPU: the grid runs as several processes, next to the build.
    shards = max(1, min(4, jobs // 4))
    pytest_args = ["-q", "-rfEs", "-p", "no:cacheprovider", "-o", "junit_family=xunit2"]
    sanitize = [sanitizer or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", "--leak-check", "no",
                "--print-limit", "20"]
    # Every tensor its own allocation, so a read past one is outside any allocation.
    no_pool = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    return [
        Step("probe", "info", [py, script("probe.py"), "--out", out("environment.json"),
                               *(["--nvcc", nvcc] if nvcc else []), *(["--sanitizer", sanitizer] if sanitizer else [])],
             60, "device, driver, versions, tools, commit, date"),
        Step("install", "correctness", [py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                                     "--disable-pip-version-check", "-e", "."],
             120, "the package, editable, from this checkout (no network)"),
        Step("info", "info", [py, "-m", "divattn", "info"], 60, "which backends can run, and why not"),
        Step("build-cuda", "correctness", [py, script("build_cuda.py"), "--jobs", str(jobs),
                                           *(["--nvcc", nvcc] if nvcc else [])],
             300, "the CUDA extension for this GPU (ahead of time, else just in time)",
             background=True),
        Step("ops-triton", "correctness",
             [py, script("pytest_shards.py"), "--shards", str(shards), "--junitxml", out("ops-triton.xml"), "--",
              "tests/ops", "-k", "not cuda", *pytest_args],
             240, "op test grid on CUDA tensors (fp16, bf16, fp32): triton and torch backends "
                  f"(pytest processes: {shards})",
             background=True, unavailable=no_pytest, junit=out("ops-triton.xml")),
        Step("memcheck-triton-warmup", "correctness", [py, script("memcheck_ops.py"), "--backend", "triton"],
             120, "the memcheck cases without the sanitizer (fills the Triton cache)"),
        Step("memcheck-triton", "correctness", [*sanitize, py, script("memcheck_ops.py"), "--backend", "triton"],
             150, "compute-sanitizer memcheck: one small case per Triton kernel, fwd + bwd",
             env=no_pool, needs=("memcheck-triton-warmup",), unavailable=no_sanitizer),
        Step("ops-cuda", "correctness",
             [py, "-m", "pytest", "tests/ops", "-k", "cuda", *pytest_args, "--junitxml", out("ops-cuda.xml")],
             180, "op test grid on CUDA tensors (fp16, bf16, fp32): the cuda backend",
             needs=("build-cuda",), unavailable=no_pytest, junit=out("ops-cuda.xml")),
        Step("memcheck-cuda-warmup", "correctness", [py, script("memcheck_ops.py"), "--backend", "cuda"],
             60, "the memcheck cases on the CUDA extension without the sanitizer", needs=("build-cuda",)),
        Step("memcheck-cuda", "correctness", [*sanitize, py, script("memcheck_ops.py"), "--backend", "cuda"],
             120, "compute-sanitizer memcheck: one small case per CUDA kernel, fwd + bwd",
             env=no_pool, needs=("memcheck-cuda-warmup",), unavailable=no_sanitizer),
        Step("racecheck-cuda", "correctness",
             [sanitizer or "compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "1", "--print-limit", "20",
              py, script("memcheck_ops.py"), "--backend", "cuda"],
             120, "compute-sanitizer racecheck: the same cases on the CUDA kernels (shared-memory hazards)",
             needs=("memcheck-cuda-warmup",), unavailable=no_sanitizer),
        Step("aoti-package", "correctness", [py, script("aoti_package.py"), "--backend", "triton",
                                             "--out", out("aoti_package.json")],
             150, "AOTInductor package of the bundled TimeSformer (dynamic batch and frames): the eager logits, "
                  "the Triton kernels launched"),
        Step("sequence-parallel", "correctness", [py, script("sequence_parallel.py"),
                                                  "--out", out("sequence_parallel.json")],
             200, "two GPUs, NCCL: parallelized models against one GPU, divattn train parallel.sequence=2 under "
                  "torchrun, the sequence-parallel benchmark (unavailable with one GPU)", optional=True),
        Step("bench-headline", "benchmark",
             [py, "-m", "divattn", "bench", "--shape", "timesformer_8x224", "--ops", "temporal,spatial_cls",
              "--passes", "fwd,fwd+bwd", "--dtype", "bfloat16", "--providers", ",".join(HEADLINE_PROVIDERS),
              "--quick", "--json", out("bench_headline.json")],
             150, "TimeSformer-B 8x224 temporal and spatial+cls, fwd and fwd+bwd, bf16, every provider but flex"),
        Step("bench-causal", "benchmark",
             [py, "-m", "divattn", "bench", "--shape", "st_causal_16x256", "--ops", "temporal",
              "--passes", "fwd,fwd+bwd", "--dtype", "bfloat16", "--providers", ",".join(HEADLINE_PROVIDERS),
              "--quick", "--json", out("bench_causal.json")],
             60, "causal temporal attention (ST transformer, 16 frames of 256 patches), fwd and fwd+bwd, bf16"),
        Step("bench-sweep", "benchmark",
             [py, script("bench_records.py"), "sweep", "--shape", "timesformer_8x224",
              "--frames", "1,2,4,8,16,32,64,96",
              "--providers", ",".join(SWEEP_PROVIDERS), "--quick", "--out", out("bench_sweep.json")],
             150, "frames 1..96: divided (temporal, spatial+cls) against joint, bf16"),
        Step("bench-ragged", "benchmark",
             [py, "-m", "pytest", "benchmarks/test_ragged.py", "--benchmark-only", "--bench-quick", "--bench-dtype",
              "bfloat16", "--bench-out", out("bench_ragged.json"), *pytest_args],
             90, "padded batch of 16 clips (60% of the frames real): frame counts against the dense call and one "
                 "call per clip, bf16", unavailable=no_pytest),
        Step("bench-train-step", "benchmark",
             [py, script("bench_records.py"), "train-step", "--shape", "timesformer_base_8x224",
              "--providers", ",".join(TRAIN_PROVIDERS), "--quick", "--out", out("bench_train_step.json")],
             150, "TimeSformer-B 8x224 training step: bundled on divattn against transformers eager"),
        Step("bench-train-step-compiled", "benchmark",
             [py, script("bench_records.py"), "train-step", "--shape", "timesformer_base_8x224",
              "--providers", "transformers-compiled", "--quick", "--out", out("bench_train_step_compiled.json")],
             150, "the same training step on torch.compile(transformers model)"),
        Step("bench-register-caps", "benchmark",
             [py, script("register_caps.py"), "--out", out("bench_register_caps.json")],
             90, "the tile table's register-capped rows, timed with the cap and without it (ptxas then "
                 "picks the registers), fp16"),
        Step("kernels", "info", [py, "-m", "divattn", "kernels", "--arch", arch, "--workers", str(max(1, jobs // 2)),
                                 "--json", out("kernels.json")],
             90, "static kernel report (registers, spills, shared memory) for this GPU's architecture"),
    ]


# Running -------------------------------------------------------------------------------

class Run:
    def __init__(self, steps: list, run_dir: Path, mirror: Optional[Path], budget: float):
        self.steps = {s.name: s for s in steps}
        self.order = steps
        self.run_dir = run_dir
        self.mirror = mirror
        self.deadline = time.monotonic() + budget
        self.budget = budget
        self.began = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _blocker(self, step: Step) -> Optional[str]:
        for name in step.needs:
            dep = self.steps[name]
            if dep.proc is not None:
                self._wait(dep)
            if dep.status != "passed":
                return f"needs {name}, which {dep.status}" + (f" ({dep.detail})" if dep.detail else "")
        return None

    def start(self, step: Step) -> None:
        if step.kind == "benchmark":  # timings get the GPU (and the CPU) to themselves
            for other in self.order:
                if other.proc is not None:
                    self._wait(other)
        blocker = self._blocker(step)
        if step.unavailable or blocker:
            step.status = "unavailable" if step.unavailable and step.unavailable != NOT_CHOSEN else "skipped"
            step.detail = step.unavailable or blocker
            self._report(step)
            return
        step.limit = min(step.timeout, self.left() - 5)
        if step.limit < 10:
            step.status, step.detail = "skipped", f"the run's {self.budget:.0f} s budget is spent"
            self._report(step)
            return
        step.log = self.run_dir / f"{step.name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", **step.env)
        print(f"\n=== {step.name} (limit {step.limit:.0f} s): {shlex.join(step.cmd)}", flush=True)
        with open(step.log, "w", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(step.cmd)}\n")
            log.flush()
            step.started = time.monotonic()
            step.proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if not step.background:
            self._wait(step)

    def _wait(self, step: Step) -> None:
        timed_out = False
        try:
            step.proc.wait(timeout=max(1.0, step.started + step.limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(step.proc.pid, signal.SIGTERM)  # the step's own process group
                step.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(step.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                step.proc.wait()
        step.rc, step.proc = step.proc.returncode, None
        step.seconds = round(time.monotonic() - step.started, 1)
        self._judge(step, timed_out)
        self._report(step)

    def _judge(self, step: Step, timed_out: bool) -> None:
        text = step.log.read_text(encoding="utf-8", errors="replace") if step.log else ""
        if timed_out:
            step.status, step.detail = "timeout", f"stopped after {step.limit:.0f} s"
        elif step.rc == UNAVAILABLE_RC and "UNAVAILABLE" in text:
            step.status = "unavailable"
            step.detail = next((ln for ln in text.splitlines() if "UNAVAILABLE" in ln), "exit 3")[:400]
        else:
            step.status = "passed" if step.rc == 0 else "failed"
            step.detail = "" if step.rc == 0 else f"exit {step.rc}: {_last_line(text)}"
        if step.junit and os.path.exists(step.junit):
            counts = junit_counts(step.junit)
            step.detail = (step.detail + "; " if step.detail else "") + ", ".join(f"{v} {k}" for k, v in counts.items())
            if step.status == "passed" and counts["passed"] == 0:
                step.status = "failed"
                step.detail += "; every test skipped: the backend never ran"
        if "compute-sanitizer" in step.cmd[0]:
            m = re.search(r"ERROR SUMMARY: (\d+) error", text)
            if m:
                step.detail = (step.detail + "; " if step.detail else "") + f"sanitizer: {m.group(1)} errors"
        if step.kind == "benchmark" and step.status != "passed" and not timed_out:
            step.detail += " (a divattn provider failed)" if step.rc == 1 else ""

    def _report(self, step: Step) -> None:
        took = f" in {step.seconds:.0f} s" if step.seconds is not None else ""
        print(f"--- {step.name}: {step.status}{took}" + (f": {step.detail}" if step.detail else ""), flush=True)
        self.save()

    def record(self) -> dict:
        env = {}
        env_file = self.run_dir / "environment.json"
        if env_file.exists():
            env = json.loads(env_file.read_text(encoding="utf-8"))
        return {
            "began": self.began,
            "budget_s": self.budget,
            "environment": env,
            "exit_status": exit_status(self.order),
            "steps": [{"name": s.name, "kind": s.kind, "what": s.what, "command": shlex.join(s.cmd),
                       "timeout_s": s.timeout, "status": s.status, "rc": s.rc, "seconds": s.seconds,
                       "detail": s.detail, "log": s.log.name if s.log else None} for s in self.order],
        }

    def save(self) -> None:
        path = self.run_dir / "acceptance.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        if self.mirror is not None:
            shutil.copytree(self.run_dir, self.mirror, dirs_exist_ok=True)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def junit_counts(path: str) -> dict:
    """passed / failed / errors / skipped of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def exit_status(steps: list) -> int:
    correctness = [s for s in steps if s.kind == "correctness"]
    if any(s.status in ("failed", "timeout") for s in correctness):
        return 1
    if any(s.kind == "benchmark" and s.status == "failed" and s.rc == 1 for s in steps):
        return 1
    if any(s.status != "passed" and not (s.optional and s.status == "unavailable") for s in correctness):
        return 2
    return 0


def kernels_arch(env_file: Path) -> str:
    """``divattn kernels --arch`` for the probed GPU: sm_80 for compute 8.x, else sm_90."""
    try:
        capability = json.loads(env_file.read_text(encoding="utf-8")).get("capability", "")
    except (OSError, ValueError):
        capability = ""
    return "sm_80" if str(capability).startswith("8.") else "sm_90"


def summary(run: Run) -> list:
    lines = ["", "GPU acceptance summary", ""]
    env = run.record()["environment"]
    lines.append(f"device {env.get('device', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), "
                 f"triton {env.get('triton', '?')}, commit {str(env.get('commit', '?'))[:12]}, {env.get('date', '?')}")
    width = max(len(s.name) for s in run.order)
    for s in run.order:
        took = f"{s.seconds:6.0f} s" if s.seconds is not None else "       -"
        lines.append(f"  {s.name:{width}s}  {s.kind:11s}  {s.status:11s} {took}  {s.detail}"[:400].rstrip())
    code = exit_status(run.order)
    verdict = {0: "PASSED: every correctness step passed",
               1: "FAILED: a correctness step failed or timed out, or a divattn provider failed",
               2: "INCOMPLETE: nothing failed, but a correctness step could not run"}[code]
    lines += ["", verdict, f"records and logs: {run.run_dir}" + (f" (and {run.mirror})" if run.mirror else "")]
    return lines


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the steps, their commands and limits; run nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S})")
    p.add_argument("--only", default=None, help="comma list of steps to run (the others are skipped)")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="also copy everything here (default: $OUT when set)")
    p.add_argument("--results", default=str(RESULTS), help="where the run's folder goes (default: %(default)s)")
    args = p.parse_args(argv)

    nvcc = find_nvcc()
    sanitizer = find_sanitizer(nvcc)
    jobs = os.cpu_count() or 1
    arch = os.environ.get("DIVATTN_KERNELS_ARCH") or "sm_90"
    commit = _git("rev-parse", "--short", "HEAD") or "nocommit"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stamp}-{commit}"
    run_dir = Path(args.results) / name
    steps = plan(run_dir, nvcc, sanitizer, arch, jobs)
    if args.only:
        chosen = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = chosen - {s.name for s in steps}
        if unknown:
            p.error(f"unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(s.name for s in steps)}")
        for s in steps:
            if s.name not in chosen:
                s.unavailable = NOT_CHOSEN

    if args.dry_run:
        if args.json:
            print(json.dumps({"budget_s": args.budget, "results": str(run_dir), "steps": [
                {"name": s.name, "kind": s.kind, "what": s.what, "cmd": s.cmd, "timeout_s": s.timeout,
                 "env": s.env, "needs": list(s.needs), "background": s.background, "unavailable": s.unavailable}
                for s in steps]}, indent=1))
            return 0
        print(f"GPU acceptance plan (budget {args.budget:.0f} s; records and logs under {run_dir}):")
        for s in steps:
            env = " ".join(f"{k}={v}" for k, v in s.env.items())
            flags = ", ".join(filter(None, ["background" if s.background else "",
                                            f"after {', '.join(s.needs)}" if s.needs else "",
                                            f"unavailable here: {s.unavailable}" if s.unavailable else ""]))
            print(f"\n{s.name} [{s.kind}, limit {s.timeout} s{', ' + flags if flags else ''}]: {s.what}")
            print(f"  $ {env + ' ' if env else ''}{shlex.join(s.cmd)}")
        return 0

    run_dir.mkdir(parents=True, exist_ok=True)
    mirror = Path(args.out) / name if args.out else None
    run = Run(steps, run_dir, mirror, args.budget)
    print(f"GPU acceptance: budget {args.budget:.0f} s, nvcc {nvcc or 'not found'}, "
          f"compute-sanitizer {sanitizer or 'not found'}, records under {run_dir}", flush=True)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        for step in steps:
            if step.name == "kernels" and "DIVATTN_KERNELS_ARCH" not in os.environ:
                step.cmd[step.cmd.index("--arch") + 1] = kernels_arch(run_dir / "environment.json")
            run.start(step)
        for step in steps:  # a background step nothing waited for
            if step.proc is not None:
                run._wait(step)
    except (KeyboardInterrupt, SystemExit):
        for step in steps:  # stop what this run started, then say what happened
            if step.proc is not None:
                try:
                    os.killpg(step.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                step.proc.wait()
                step.proc, step.status, step.detail = None, "timeout", "the run itself was stopped"
    lines = summary(run)
    print("\n".join(lines))
    (run_dir / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run.save()
    return exit_status(steps)


if __name__ == "__main__":
    sys.exit(main())
