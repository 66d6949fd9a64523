"""The one-command GPU acceptance run (.ci/gpu_acceptance.sh), checked without a GPU.

The script is valid bash; its dry run lists every required step with a command and a
time limit inside the 8-minute budget; every command it would run exists and accepts
its options (helper scripts validate their arguments with ``--dry-run``, the divattn
subcommands parse them, pytest collects its selection, pip knows its flags); the small
memcheck workload runs in the Triton interpreter; and the run's bookkeeping (JUnit
counts, exit status, records written here and mirrored to ``$OUT``) works.
"""

import concurrent.futures
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu_acceptance.sh"
HELPERS = ROOT / "benchmarks" / "gpu"

# What issue 9 asks of the run: build, op grid (triton and cuda), memcheck per kernel
# family and backend, the headline benchmarks.
REQUIRED = {
    "probe": "info", "install": "correctness", "build-cuda": "correctness",
    "ops-triton": "correctness", "ops-cuda": "correctness",
    "memcheck-triton": "correctness", "memcheck-cuda": "correctness", "aoti-package": "correctness",
    "bench-headline": "benchmark", "bench-sweep": "benchmark",
    "bench-train-step": "benchmark", "bench-train-step-compiled": "benchmark",
}


def _env():
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    return env


@pytest.fixture(scope="module")
def plan():
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--json"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@functools.lru_cache(maxsize=None)
def _acceptance():
    """benchmarks/gpu/acceptance.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_acceptance", HELPERS / "acceptance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(cmd, env=None):
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=300)


def _run_all(cmds, env=None) -> list:
    """``_run`` of each command, a few at a time (each starts its own interpreter), in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(functools.partial(_run, env=env), cmds))


def test_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_dry_run_lists_every_required_step_with_a_limit(plan):
    steps = {s["name"]: s for s in plan["steps"]}
    for name, kind in REQUIRED.items():
        assert name in steps, f"the dry run has no {name} step"
        assert steps[name]["kind"] == kind, (name, steps[name]["kind"])
    assert plan["budget_s"] <= 8 * 60
    for s in plan["steps"]:
        assert 0 < s["timeout_s"] <= plan["budget_s"], s
        assert set(s["needs"]) <= set(steps), s
    # correctness before benchmarks: a short budget cuts timings, not tests
    order = [s["name"] for s in plan["steps"]]
    last_check = max(i for i, s in enumerate(plan["steps"]) if s["kind"] == "correctness")
    assert all(order.index(n) > last_check for n, k in REQUIRED.items() if k == "benchmark")


def test_human_dry_run_prints_each_step_command_and_limit():
    out = _run(["bash", str(SCRIPT), "--dry-run"])
    assert out.returncode == 0, out.stderr[-3000:]
    for name in REQUIRED:
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith(f"{name} [")), None)
        assert line is not None and "limit" in line, f"{name} missing from:\n{out.stdout}"
    assert out.stdout.count("\n  $ ") == len(_acceptance().plan(Path("/r"), None, None, "sm_90", 1))


def test_the_memcheck_steps_run_the_workload_under_the_sanitizer(plan):
    steps = {s["name"]: s for s in plan["steps"]}
    for backend in ("triton", "cuda"):
        cmd = steps[f"memcheck-{backend}"]["cmd"]
        assert cmd[0].endswith("compute-sanitizer") and cmd[1:3] == ["--tool", "memcheck"]
        assert "--error-exitcode" in cmd
        assert cmd[-2:] == ["--backend", backend]
        warm = steps[f"memcheck-{backend}-warmup"]["cmd"]
        assert warm == cmd[cmd.index(warm[0]):], "the warm-up must run the same workload (fills the Triton cache)"
        assert f"memcheck-{backend}-warmup" in steps[f"memcheck-{backend}"]["needs"]
    assert "build-cuda" in steps["ops-cuda"]["needs"]
    ops = {n: steps[n]["cmd"] for n in ("ops-triton", "ops-cuda")}
    assert ops["ops-triton"][ops["ops-triton"].index("-k") + 1] == "not cuda"
    assert ops["ops-cuda"][ops["ops-cuda"].index("-k") + 1] == "cuda"


def _commands(plan):
    for s in plan["steps"]:
        cmd = list(s["cmd"])
        if "compute-sanitizer" in cmd[0]:
            cmd = cmd[cmd.index(sys.executable):] if sys.executable in cmd else cmd[-4:]
        yield s["name"], cmd


def test_every_helper_script_accepts_its_arguments(plan):
    seen = set()
    runs = []
    for name, cmd in _commands(plan):
        if len(cmd) > 1 and cmd[1].startswith(str(HELPERS)):
            assert Path(cmd[1]).is_file(), cmd[1]
            args = cmd[1:]
            args.insert(args.index("--") if "--" in args else len(args), "--dry-run")
            runs.append((name, cmd, [sys.executable, *args]))
    for (name, cmd, _), out in zip(runs, _run_all([r[2] for r in runs])):
        assert out.returncode == 0, f"{name}: {cmd}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        seen.add(Path(cmd[1]).name)
    assert seen == {"probe.py", "build_cuda.py", "memcheck_ops.py", "bench_records.py", "pytest_shards.py",
                    "aoti_package.py", "sequence_parallel.py", "register_caps.py"}


def test_every_divattn_subcommand_accepts_its_options(plan):
    from divattn import shapes
    from divattn.bench import providers

    found = [(name, cmd) for name, cmd in _commands(plan) if cmd[1:3] == ["-m", "divattn"]]
    # every subcommand's --help and every bench command's --list, run together up front
    runs = [[sys.executable, "-m", "divattn", cmd[3], "--help"] for _, cmd in found]
    runs += [[sys.executable, "-m", "divattn", *cmd[3:], "--list"] for _, cmd in found if cmd[3] == "bench"]
    outs = dict(zip(map(tuple, runs), _run_all(runs)))
    for name, cmd in found:
        sub = cmd[3]
        help_text = outs[(sys.executable, "-m", "divattn", sub, "--help")].stdout
        for token in cmd[4:]:
            if token.startswith("--"):
                assert token in help_text, f"{name}: divattn {sub} has no option {token}"
        if sub == "bench":
            value = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
            shape = shapes.lookup(value("--shape"))
            assert set(value("--ops").split(",")) <= set(shape.ops())
            providers.select(value("--providers").split(","))
            # unknown options or bad values fail here; --list then exits before any timing
            out = outs[(sys.executable, "-m", "divattn", *cmd[3:], "--list")]
            assert out.returncode == 0, out.stderr[-2000:]
    assert len(found) == 4  # info, bench (headline and causal), kernels


def _collected(*selections) -> list:
    """The test ids pytest collects for each selection (the collections run together)."""
    outs = _run_all([[sys.executable, "-m", "pytest", *args, "--collect-only"] for args in selections],
                    env=dict(_env(), PYTHONPATH=str(HELPERS)))
    for args, out in zip(selections, outs):
        assert out.returncode == 0, f"{args}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return [[ln for ln in out.stdout.splitlines() if "::" in ln] for out in outs]


def test_pytest_steps_collect_their_selection_and_shards_cover_it(plan, tmp_path):
    steps = {s["name"]: s["cmd"] for s in plan["steps"]}
    cuda = steps["ops-cuda"][3:]
    cuda[cuda.index("--junitxml") + 1] = str(tmp_path / "cuda.xml")
    triton = steps["ops-triton"]
    assert triton[1].endswith("pytest_shards.py")
    selection = triton[triton.index("--") + 1:]
    cuda_ids, whole, *shards = _collected(cuda, selection,
                                          *([*selection, "-p", "pytest_shards", f"--shard={i}/3"] for i in (1, 2, 3)))
    assert cuda_ids
    assert sorted(sum(shards, [])) == sorted(whole) and all(shards)
    assert not set(whole) & set(cuda_ids), "a test in both the triton and the cuda step"


def test_pip_knows_the_install_flags(plan):
    steps = {s["name"]: s["cmd"] for s in plan["steps"]}
    help_text = _run([sys.executable, "-m", "pip", "install", "--help"]).stdout
    for flag in ("--no-index", "--no-deps", "--no-build-isolation", "--disable-pip-version-check", "-e"):
        assert flag in steps["install"] and flag in help_text


def test_memcheck_workload_runs_in_the_interpreter():
    out = _run([sys.executable, str(HELPERS / "memcheck_ops.py"), "--backend", "triton",
                "--ops", "temporal,spatial_cls", "--dtypes", "float32"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # two plain cases, two padded by counts and one by a mask
    assert out.stdout.count("\nok triton") + out.stdout.startswith("ok triton") == 5, out.stdout


def _helper(name):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", HELPERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row_key(row):
    """``(regime, pass, bucket)`` of a row name such as ``_HOPPER[('frame', 'bwd', 72)]``."""
    import ast

    return ast.literal_eval(row[row.index("[") + 1:-1])


@pytest.mark.parametrize("arch", [80, 90])
def test_register_caps_time_every_capped_row_with_and_without_its_cap(arch):
    """register_caps.py has a case for every capped candidate the planner can pick on the arch,
    on a problem whose plan runs it, and its uncapped variant drops that launch's cap only."""
    from divattn.kernels_report.problems import plans
    from divattn.ops.triton import plan as tile_plan

    caps = _helper("register_caps")
    rows = caps.capped_rows(arch)
    assert rows, "no capped row: the step would time nothing"
    assert all(len(c) == 4 for _, c in rows)
    if arch == 80:
        assert any(r.startswith("_AMPERE") for r, _ in rows)
    else:
        assert not any(r.startswith("_AMPERE") for r, _ in rows)
    found = caps.cases(arch)
    assert [(c["row"], tuple(c["candidate"])) for c in found] == rows
    for case in found:
        launches = plans(case["problem"], target=arch)[case["choice"]]
        hits = [lc for lc in launches if caps._runs(lc, case["row"], tuple(case["candidate"]))]
        assert len(hits) == 1 and hits[0].max_registers == case["candidate"][3]
        assert tile_plan._table_row(*_row_key(case["row"]), arch, case["problem"].has_cls)[0] == case["row"]
        un = caps.uncapped(launches, case["row"], tuple(case["candidate"]))
        assert [lc.max_registers for lc in un] == [None if lc is hits[0] else lc.max_registers for lc in launches]
        assert all(a.args is b.args and a.kernel is b.kernel for a, b in zip(un, launches))


def test_junit_counts_and_exit_status(tmp_path):
    acc = _acceptance()
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="10" failures="1" errors="0" skipped="3"/></testsuites>')
    assert acc.junit_counts(str(xml)) == {"passed": 6, "failed": 1, "errors": 0, "skipped": 3}

    def step(kind, status, rc=0, optional=False):
        s = acc.Step("s", kind, ["x"], 1, "", optional=optional)
        s.status, s.rc = status, rc
        return s

    assert acc.exit_status([step("correctness", "passed"), step("benchmark", "timeout")]) == 0
    assert acc.exit_status([step("correctness", "passed"), step("correctness", "unavailable")]) == 2
    assert acc.exit_status([step("correctness", "timeout"), step("correctness", "unavailable")]) == 1
    assert acc.exit_status([step("correctness", "passed"), step("benchmark", "failed", 1)]) == 1
    # the multi-GPU check: unavailable with one GPU leaves the status alone, a failure does not
    assert acc.exit_status([step("correctness", "passed"), step("correctness", "unavailable", 3, True)]) == 0
    assert acc.exit_status([step("correctness", "passed"), step("correctness", "failed", 1, True)]) == 1


def test_the_sequence_parallel_check_says_when_there_are_too_few_gpus():
    out = _run([sys.executable, str(HELPERS / "sequence_parallel.py"), "--gpus", "64"])
    assert out.returncode == 3 and "UNAVAILABLE" in out.stdout and "need 64" in out.stdout, out.stdout + out.stderr


def test_a_partial_run_writes_records_here_and_to_out(tmp_path):
    out = _run(["bash", str(SCRIPT), "--only", "probe,info", "--budget", "120", "--results", str(tmp_path / "res"),
                "--out", str(tmp_path / "out")])
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]  # the other checks did not run
    assert "INCOMPLETE" in out.stdout
    (run,) = (tmp_path / "res").iterdir()
    record = json.loads((run / "acceptance.json").read_text())
    env = record["environment"]
    for key in ("device", "torch", "triton", "commit", "date", "nvcc", "compute_sanitizer", "transformers"):
        assert env.get(key), key
    status = {s["name"]: s["status"] for s in record["steps"]}
    assert status["probe"] == status["info"] == "passed"
    assert status["ops-triton"] == "skipped"
    assert sorted(p.name for p in (tmp_path / "out" / run.name).iterdir()) == sorted(p.name for p in run.iterdir())


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no nvcc on this machine")
def test_nvcc_is_found_where_it_is():
    assert _acceptance().find_nvcc() is not None
