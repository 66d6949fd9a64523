"""pytest-benchmark suites: divided versus joint attention, divattn versus the alternatives.

``pytest benchmarks/ --benchmark-only`` runs on the machine it finds: on a GPU the
papers' shapes in fp16 and bf16 with every provider; on a CPU small stand-in shapes in
fp32 (labelled CPU in every record), where the Triton kernels are recorded as
unavailable (they run only in the interpreter there). Every case ends as a record (see
:mod:`divattn.bench.records`): timed, unavailable with the reason, or failed with the
error. A plain run writes them to ``.benchmarks/divattn/<device>.json`` (untracked;
the path is printed at the end); ``--bench-update-results`` writes the committed
``benchmarks/results/<device>.json`` instead, ``--bench-out PATH`` any file.

Options: ``--bench-device``, ``--bench-dtype``, ``--bench-batch``, ``--bench-shapes``,
``--bench-models``, ``--bench-providers``, ``--bench-sweep-providers``,
``--bench-frames``, ``--bench-threads``, ``--bench-quick``, ``--bench-out``,
``--bench-update-results``. Under ``CI=true`` each case gets three short rounds after one
warmup call (CI checks that every case runs; its records are no timing and are not kept:
committed records come from ``--bench-update-results``, never quick).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from divattn import shapes
from divattn.bench import providers, ragged, records, roofline, suite, timing

RESULTS = Path(__file__).resolve().parent / "results"  # the committed records
LOCAL = Path(__file__).resolve().parent.parent / ".benchmarks" / "divattn"  # a plain run's records (git-ignored)

# The T sweep leaves FlexAttention out unless asked: it compiles once per frame count.
SWEEP_DEFAULT_EXCLUDE = ("flex",)


def pytest_addoption(parser):
    g = parser.getgroup("divattn benchmarks")
    g.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda when available)")
    g.addoption("--bench-dtype", default=None,
                help="comma list of dtypes (default: float16,bfloat16 on a GPU, float32 on a CPU)")
    g.addoption("--bench-batch", default=None,
                help="comma list of batch sizes, each run on every shape (default: each shape's own)")
    g.addoption("--bench-shapes", default=None, help="comma list of attention shapes (default: the device's)")
    g.addoption("--bench-models", default=None, help="comma list of model shapes (default: the device's)")
    g.addoption("--bench-providers", default=None, help="comma list of providers (default: all)")
    g.addoption("--bench-sweep-providers", default=None,
                help="providers of the frames sweep (default: all but " + ", ".join(SWEEP_DEFAULT_EXCLUDE) + ")")
    g.addoption("--bench-frames", default=None, help="comma list of frame counts for the sweep (default: 1..96)")
    g.addoption("--bench-threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    g.addoption("--bench-quick", action="store_true", help="shorter timing (fewer rounds)")
    g.addoption("--bench-out", default=None, help="records JSON (default: .benchmarks/divattn/<device>.json)")
    g.addoption("--bench-update-results", action="store_true",
                help="write the records to the committed benchmarks/results/<device>.json")


def pytest_configure(config):
    if config.getoption("--bench-out") and config.getoption("--bench-update-results"):
        raise pytest.UsageError("--bench-out and --bench-update-results both say where the records go: pick one")


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _device(config) -> torch.device:
    name = config.getoption("--bench-device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _dtypes(config, device):
    names = _csv(config.getoption("--bench-dtype"))
    if names is None:
        names = ["float32"] if device.type == "cpu" else ["float16", "bfloat16"]
    return [getattr(torch, n) for n in names]


class Session:
    """What the run shares: device, environment, measured peaks (per dtype), records."""

    def __init__(self, config):
        self.config = config
        self.device = _device(config)
        threads = config.getoption("--bench-threads")
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.env = records.environment(self.device)
        if self.device.type == "cpu":
            self.env["malloc"] = timing.pin_malloc()
        # CI=true (a test machine checking that the suite runs; its records are not kept): three
        # short rounds a case, unless --bench-quick or --bench-update-results ask for a timing
        quick = config.getoption("--bench-quick")
        smoke = os.environ.get("CI") == "true" and not quick and not config.getoption("--bench-update-results")
        self.budget = timing.Budget.for_device(self.device, quick=quick, smoke=smoke)
        self.peaks: dict = {}
        self.frozen = False
        self.records: list = []
        self.timed: list = []  # (case, record) of what was timed, for timing disturbed cases again
        out = config.getoption("--bench-out")
        root = RESULTS if config.getoption("--bench-update-results") else LOCAL
        self.out = Path(out) if out else records.default_path(root, self.device)

    def peaks_for(self, dtype):
        if dtype not in self.peaks:
            self.peaks[dtype] = roofline.measure_peaks(self.device, dtype)
        return self.peaks[dtype]

    def run(self, case: suite.Case, benchmark):
        """Time ``case`` through pytest-benchmark, keep its record, and skip or fail as it says."""
        if not self.frozen:  # once, with the session's modules and collected items alive
            suite.freeze_heap()
            self.frozen = True
        benchmark.group = f"{case.op} {case.pass_} {case.shape.name} B{case.shape.B} {case.dtype}".replace("torch.", "")

        def measure(fn, device, budget):
            if benchmark.disabled:
                fn()
                return None
            p = timing.plan(fn, device, budget)
            _, probe = timing.with_probe(device, lambda: benchmark.pedantic(
                timing.timed(fn, device, p.inner), rounds=p.rounds, iterations=1, warmup_rounds=0))
            return timing.from_seconds([t / p.inner for t in benchmark.stats.stats.data], p, probe)

        rec = suite.run(case, self.env, self.peaks_for(case.dtype), self.budget, measure)
        if rec is None:
            return None
        self.records.append(rec)
        self.timed.append((case, rec))
        if rec["status"] == "ok":
            benchmark.extra_info.update({k: rec[k] for k in ("flops", "tflops", "bytes", "gbps", "roofline_fraction",
                                                             "peak_mem_mb")})
        elif rec["status"] == "unavailable":
            pytest.skip(rec["error"])
        elif case.ours:
            pytest.fail(f"divattn provider {case.provider} failed: {rec['error']}")
        else:
            pytest.skip(f"{case.provider} failed (recorded): {rec['error']}")
        return rec


_SESSION: list = []


def _session(config) -> Session:
    if not _SESSION:
        _SESSION.append(Session(config))
    return _SESSION[0]


@pytest.fixture(scope="session")
def bench(pytestconfig) -> Session:
    return _session(pytestconfig)


def _batches(config):
    return [int(b) for b in _csv(config.getoption("--bench-batch")) or []] or [None]


def _shapes(config, device, option, kind, default):
    names = _csv(config.getoption(option))
    found = [shapes.lookup(n) for n in names] if names else shapes.defaults(device.type)[default]
    return [s.with_batch(b) for s in found if isinstance(s, kind) and not isinstance(s, shapes.RaggedShape)
            for b in _batches(config)]


def _providers(config, sweep=False):
    names = _csv(config.getoption("--bench-sweep-providers")) if sweep else None
    if names is None:
        names = _csv(config.getoption("--bench-providers"))
    if names is None:
        names = [n for n in providers.PROVIDERS if not (sweep and n in SWEEP_DEFAULT_EXCLUDE)]
    return [p.name for p in providers.select(names)]


def _cases(metafunc):
    config = metafunc.config
    device = _device(config)
    dtypes = _dtypes(config, device)
    if "attn_case" in metafunc.fixturenames:
        return "attn_case", [
            suite.Case(p, op, pass_, shape, dtype, device)
            for shape in _shapes(config, device, "--bench-shapes", shapes.AttnShape, "attention")
            for dtype in dtypes for op in shape.ops()
            for pass_ in suite.ATTENTION_PASSES for p in _providers(config)
        ]
    if "sweep_case" in metafunc.fixturenames:
        bases = [shapes.defaults(device.type)["sweep"].with_batch(b) for b in _batches(config)]
        frames = [int(t) for t in _csv(config.getoption("--bench-frames")) or shapes.FRAMES]
        names = _providers(config, sweep=True)
        return "sweep_case", [
            suite.Case(p, op, pass_, base.with_frames(t), dtype, device)
            for base in bases for dtype in dtypes for pass_ in suite.ATTENTION_PASSES for t in frames
            for op in ("temporal", "spatial_cls", "joint") for p in names
        ]
    if "ragged_case" in metafunc.fixturenames:
        names = _csv(config.getoption("--bench-providers"))
        named = _csv(config.getoption("--bench-shapes"))
        bases = [s for s in map(shapes.lookup, named) if isinstance(s, shapes.RaggedShape)] if named else \
            shapes.defaults(device.type)["ragged"]
        return "ragged_case", [
            suite.Case(p, op, pass_, base.with_batch(b), dtype, device)
            for base in bases for b in _batches(config) for dtype in dtypes for op in base.ops()
            for pass_ in suite.ATTENTION_PASSES for p in ragged.PROVIDERS if names is None or p in names
        ]
    if "model_case" in metafunc.fixturenames:
        names = _providers(config)
        return "model_case", [
            suite.Case(p, "model", "train_step", shape, dtype, device)
            for shape in _shapes(config, device, "--bench-models", shapes.ModelShape, "models") for dtype in dtypes
            for p in names if p in providers.MODEL_BACKENDS
        ]
    return None, []


def pytest_generate_tests(metafunc):
    name, cases = _cases(metafunc)
    if name is not None:
        metafunc.parametrize(name, cases, ids=[c.id for c in cases])


def pytest_sessionfinish(session, exitstatus):
    try:
        _finish(session)
    finally:
        if _SESSION and _SESSION[0].frozen:
            suite.thaw_heap()


def _finish(session):
    if _SESSION and _SESSION[0].records:
        s = _SESSION[0]
        retimed = suite.retime(s.timed, s.env, s.peaks_for, s.budget)
        path = records.write(s.out, s.records)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            if retimed:
                reporter.write_line(f"divattn: timed disturbed cases again ({retimed} timings, "
                                    f"at most {s.budget.retime_s:.0f} s); a record keeps its lower median")
            note = ""
            if path.parent == LOCAL:
                note = (f" (untracked; render them with python benchmarks/render.py --results {LOCAL} --out {LOCAL}, "
                        "or rerun with --bench-update-results to update the committed benchmarks/results/)")
            reporter.write_line(f"divattn: {len(_SESSION[0].records)} benchmark records written to {path}{note}")
