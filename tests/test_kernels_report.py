"""The GPU path without a GPU: every planned launch compiles for sm_80 / sm_90, fp16/bf16
builds at D <= 128 do not spill, and the counted memory traffic of each pass stays near
the least it can move.

The launches come from the dispatch code (``plan_forward`` / ``plan_backward`` on the
named benchmark shapes and the coverage layers), never from a list kept here, so a new
kernel or code path is compiled and counted as soon as the plans make it.
"""

import ast
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time

import pytest
import torch

from divattn.shapes import GPU_SHAPES
from divattn.cli import kernels as kernels_cli
from divattn.kernels_report import build, problems, traffic
from divattn.ops.triton import TILES, plan

# The traffic goal (issue 9) at TimeSformer-B head geometry: counted bytes over the minimum.
MAX_RATIO = {"fwd": 1.25, "bwd": 1.5}
DIVIDED = [(op, pass_) for op in ("temporal", "spatial", "spatial_cls") for pass_ in ("fwd", "bwd")]

LOW_PRECISION = kernels_cli.LOW_PRECISION
RECORD_COMMAND = "python -m divattn kernels --exact --update-record benchmarks/results/kernels/builds.json"


def _covered() -> list:
    """What the report covers by default: every head-dim bucket, code path and (B, H) of the
    coverage layers in fp16/bf16, the named shapes also in fp32."""
    return kernels_cli.select()


@pytest.fixture(scope="module")
def builds():
    """Every binary the JIT builds for the covered problems' plans (every code path, in each
    divisibility specialisation its launches get), its resources read from the committed record
    by binary key. Nothing is compiled here: :func:`test_record_matches_a_fresh_compile`
    recompiles a sample."""
    start = time.perf_counter()
    out = build.report(_covered(), archs=problems.ARCHS, exact=True, cache=None, record=build.RECORD,
                       compile_missing=False)
    print(f"\n{len(out)} builds planned and read from the record in {time.perf_counter() - start:.0f} s")
    return out


def test_record_is_current(builds):
    """Every build the plans make is in the record and the record holds nothing else: a change to
    a kernel, the tile table, the plans or Triton changes binary keys and fails here until the
    record is written again."""
    missing = [b for b in builds if not b["error"] and b["registers"] is None]
    assert not missing, (f"{len(missing)} of {len(builds)} builds are not in {build.RECORD} (e.g. {_where(missing[0])}); "
                         f"write it again: {RECORD_COMMAND}")
    assert set(build.load_record(build.RECORD)) == {b["binary"] for b in builds if not b["error"]}


def _sample(builds) -> list:
    """The build with the most registers of each kernel, arch and dtype, and one drawn build (a
    fixed draw) of each kernel and arch."""
    import random

    groups: dict = {}
    for b in builds:
        if not b["error"]:
            groups.setdefault((b["kernel"], b["arch"], b["dtype"]), []).append(b)
    out = [max(bs, key=lambda b: (b["registers"], b["stack_bytes"])) for _, bs in sorted(groups.items())]
    rng = random.Random(22)
    for kernel, arch in sorted({k[:2] for k in groups}):
        out.append(rng.choice([b for (k, a, _), bs in sorted(groups.items()) if (k, a) == (kernel, arch) for b in bs]))
    return list({b["key"]: b for b in out}.values())


def test_record_matches_a_fresh_compile(builds):
    """A sample of the record (:func:`_sample`) compiled here again, with no cache: the same
    resources."""
    sample = _sample(builds)
    by_id = {p.id: p for p in _covered()}
    start = time.perf_counter()
    fresh = build.report([by_id[b["problems"][0]] for b in sample], archs=problems.ARCHS, exact=True, cache=None,
                         record=None, only=[b["key"] for b in sample], workers=max(1, min(2, os.cpu_count() or 1)))
    print(f"\n{len(fresh)} builds compiled in {time.perf_counter() - start:.0f} s")
    fresh = {b["key"]: b for b in fresh}
    assert set(fresh) == {b["key"] for b in sample}
    for b in sample:
        got = {f: fresh[b["key"]][f] for f in build.RECORD_FIELDS}
        assert got == {f: b[f] for f in build.RECORD_FIELDS}, _where(b)


def _where(b) -> str:
    return (f"{b['kernel']} sm_{b['arch']} {b['dtype']} {b['constexprs']} warps={b['num_warps']} "
            f"stages={b['num_stages']} (e.g. {b['problems'][0]})")


def test_every_planned_launch_compiles(builds):
    failed = [f"{_where(b)}: {b['error']}" for b in builds if b["error"]]
    assert not failed, "compile errors:\n" + "\n".join(failed)


def test_report_covers_every_problem_arch_and_dtype(builds):
    wanted = {p.id for p in _covered()}
    got = {pid for b in builds for pid in b["problems"]}
    assert got == wanted
    assert {(b["arch"], b["dtype"]) for b in builds} == {(a, d) for a in problems.ARCHS for d in problems.DTYPES}
    assert all(b["registers"] and 0 < b["blocks_per_sm"] <= 32 for b in builds if not b["error"])


def test_every_head_dim_bucket_regime_and_pass_is_compiled(builds):
    """Each tile-table row (regime, pass, head-dim bucket, arch, cls) serving D <= 128 is used by
    a compiled build, and every head dim of the report reaches both kernels on both archs."""
    rows = {t for b in builds if b["dtype"] in LOW_PRECISION for t in b["tiles"]}
    wanted = {plan._table_row(regime, pass_, bucket, arch, cls)[0]
              for (regime, pass_, bucket, _, arch, cls) in TILES if bucket <= 128
              and not (regime == "packed" and cls and pass_ == "bwd" and bucket > 64)}
    assert wanted - rows == set()
    for arch in problems.ARCHS:
        for kernel in ("_attn_fwd_kernel", "_attn_bwd_kernel"):
            dims = {d for b in builds if b["kernel"] == kernel and b["arch"] == arch for d in b["head_dims"]}
            assert set(problems.HEAD_DIMS) <= dims


def test_builds_name_the_tile_row_they_came_from(builds):
    """A build's tile (rows, warps, stages, register cap) is a candidate of each table row it names."""
    for b in builds:
        if b["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_kernel") and not b["error"]:
            assert b["tiles"], _where(b)
            mine = (b["constexprs"]["GROUP"] * b["constexprs"]["SEQ"], b["num_warps"], b["num_stages"],
                    b["max_registers"])
            shrink = 2 if b["dtype"] == "fp32" else 1  # fp32 tiles take half the rows (plan.tile_candidates)
            for tile in b["tiles"]:
                name, key = tile.split("[", 1)
                candidates = getattr(plan, name)[ast.literal_eval(key[:-1])]
                assert any((max(16, r // shrink), w, s, regs[0] if regs else None) == mine
                           for r, w, s, *regs in candidates), (tile, _where(b))


def test_low_precision_dots_use_tensor_cores(builds):
    """Where an fp16/bf16 kernel calls tl.dot, the SASS has HMMA (sm_80) or HMMA/HGMMA (sm_90)."""
    for arch in problems.ARCHS:
        mma = [b for b in builds if b["arch"] == arch and b["dtype"] in LOW_PRECISION and b["tensor_core_insts"]]
        assert mma, f"no fp16/bf16 build uses tensor cores on sm_{arch}"
        kinds = {k for b in mma for k in b["mma"].split("+")}
        assert kinds <= ({"HMMA"} if arch == 80 else {"HMMA", "HGMMA"})


def test_no_spill_in_low_precision_builds(builds):
    spills = [kernels_cli.spill_line(b) for b in builds if kernels_cli.spills(b) and kernels_cli.must_not_spill(b)]
    assert not spills, "spilling builds:\n" + "\n".join(spills)


@pytest.mark.parametrize("form", ["counts", "mask"])
def test_the_padded_batch_path_compiles_without_spill(form):
    """The COUNTS and MASKED paths (a padded batch given as counts, as a token mask) are not in
    the record: their builds at TimeSformer-B's head geometry (every op and pass, fp16, sm_90)
    are compiled here, with the tile table's rows as they are, and none spills (``divattn
    kernels --counts`` / ``--mask`` check every head dim, arch and code path)."""
    probs = kernels_cli.select(["timesformer_8x224"], [64], ["hwt"], dtypes=["fp16"], **{form: True})
    assert probs and all(getattr(p, form) and f"+{form}" in p.id for p in probs)
    out = build.report(probs, archs=(90,), exact=False, cache=None, record=None,
                       workers=max(1, min(2, os.cpu_count() or 1)))
    attn = [b for b in out if b["kernel"].startswith("_attn_")]
    flag = {"counts": "COUNTS", "mask": "MASKED"}[form]
    assert attn and all(b["constexprs"][flag] for b in attn)
    assert not [b for b in out if b.get("error")]
    spills = [kernels_cli.spill_line(b) for b in out if kernels_cli.spills(b)]
    assert not spills, "spilling builds:\n" + "\n".join(spills)


def test_a_spill_names_the_tile_rows_to_change(builds):
    """What a user with a spilling head dim is told: the build, its resources and the rows of
    divattn/ops/triton/plan.py whose tile it runs."""
    b = dict(next(b for b in builds if b["tiles"]), stack_bytes=8, local_insts=2)
    assert kernels_cli.spills(b)
    line = kernels_cli.spill_line(b)
    assert all(t in line for t in b["tiles"]) and "divattn/ops/triton/plan.py" in line
    assert f"{b['registers']} registers, 8 stack bytes, 2 local loads/stores" in line


def test_capped_rows_reach_the_launch(builds):
    """A row's register cap is what the JIT compiles with: the launch passes it as ``maxnreg``."""
    capped = [b for b in builds if b["max_registers"] is not None and not b["error"]]
    assert capped and all(b["registers"] <= b["max_registers"] for b in capped)

    def launched(launch) -> dict:
        seen = {}

        class Kernel:
            def __getitem__(self, grid):
                return lambda **kw: seen.update(kw)

        dataclasses.replace(launch, kernel=Kernel()).run()
        return seen

    assert launched(plan.Launch(None, (1,), {"X": 1}, {"C": 2}, 8, 1, "frame", max_registers=255)) == {
        "X": 1, "C": 2, "num_warps": 8, "num_stages": 1, "maxnreg": 255}
    assert launched(plan.Launch(None, (1,), {"X": 1}, {}, 4, 2, "frame")) == {"X": 1, "num_warps": 4, "num_stages": 2}


def test_binary_keys_do_not_depend_on_where_triton_is_installed():
    """The record is read in other checkouts and environments (CI): no compile option in a key
    names a path of this one (Triton passes libdevice by absolute path)."""
    import triton

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    options = make_backend(GPUTarget("cuda", 90, 32)).parse_options({"num_warps": 4})
    opts = options.__dict__ if hasattr(options, "__dict__") else dict(options)
    assert os.path.dirname(triton.__file__) in repr(opts)  # what the key must not see
    assert os.path.dirname(triton.__file__) not in repr(build._portable(opts))
    assert build._portable({"extern_libs": (("libdevice", "/a/b/libdevice.10.bc"),), "x": 1}) == {
        "extern_libs": (("libdevice", "libdevice.10.bc"),), "x": 1}


def test_update_record_takes_every_binary(tmp_path):
    from divattn.__main__ import main

    with pytest.raises(SystemExit, match="add --exact"):
        main(["kernels", "--shapes", "timesformer_8x224", "--update-record", str(tmp_path / "r.json")])
    for form in ("--counts", "--mask"):  # the record holds the dense code paths
        with pytest.raises(SystemExit, match="--counts and --mask take no --update-record"):
            main(["kernels", form, "--exact", "--update-record", str(tmp_path / "r.json")])


@pytest.mark.parametrize("arch,regs,threads,smem,blocks", [
    (90, 255, 128, 0, 2),  # 255 -> 256 regs per thread: 8192 per warp, 8 warps fit
    (90, 32, 128, 0, 16),  # the 2048-thread limit
    (80, 32, 32, 0, 32),  # the 32-block limit
    (80, 64, 128, 100 * 1024, 1),  # 100 KB + 1 KB reserved: one block in 164 KB
    (90, 64, 128, 100 * 1024, 2),  # two in 228 KB
    (80, 64, 128, 200 * 1024, 0),  # more than a block may have
])
def test_resident_blocks(arch, regs, threads, smem, blocks):
    assert build.resident_blocks(arch, regs, threads, smem) == blocks


# ------------------------------------------------------------------------------ traffic

interpreting = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="counts traffic of test kernels under TRITON_INTERPRET=1")


def _launch(kernel, grid, args, **constexprs):
    return plan.Launch(kernel, grid, args, constexprs, 4, 1, "test")


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def copy(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def reread(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        a = tl.load(X + offs, mask=offs < n, other=0.0)
        b = tl.load(X + offs, mask=offs < n, other=0.0)
        tl.load(X + offs, mask=offs < 0, other=0.0)  # masked off: touches nothing
        tl.store(Y + tl.program_id(0), tl.sum(a + b, 0))

    return copy, reread


@interpreting
def test_counter_on_a_copy():
    copy, _ = _kernels()
    n = 1000
    x = torch.randn(n, dtype=torch.float16)
    y = torch.empty_like(x)
    (t,) = traffic.count([_launch(copy, (4,), {"X": x, "Y": y, "n": n}, BLOCK=256)])
    assert torch.equal(x, y)
    # 3 programs of 256 halves (16 sectors) and one of 232 (464 bytes: 15 sectors)
    assert (t.programs, t.load_sectors, t.store_sectors) == (4, 63, 63)
    assert (t.unique_load_sectors, t.unique_store_sectors) == (63, 63)
    assert t.bytes == 2 * 63 * 32


@interpreting
def test_counter_counts_distinct_sectors_per_program():
    _, reread = _kernels()
    x = torch.randn(64, dtype=torch.float32)  # 256 bytes: 8 sectors
    y = torch.empty(3, dtype=torch.float32)
    (t,) = traffic.count([_launch(reread, (3,), {"X": x, "Y": y, "n": 64}, BLOCK=64)])
    assert torch.allclose(y, 2 * x.sum().expand(3))
    # read twice in a program: once; read by three programs: three times (one distinct)
    assert (t.programs, t.load_sectors, t.unique_load_sectors) == (3, 24, 8)
    assert (t.store_sectors, t.unique_store_sectors) == (3, 1)


def _goal_shape(**kw):
    return dataclasses.replace(GPU_SHAPES["timesformer_8x224"], B=1, H=1, **kw)


def test_minimum_is_every_input_read_and_every_output_written_once():
    shape = _goal_shape()
    elems = 8 * 196 * 64
    assert traffic.minimum_bytes(problems.Problem(shape, "temporal", "fwd", "fp16")) == 4 * elems * 2
    assert traffic.minimum_bytes(problems.Problem(shape, "spatial", "bwd", "fp32")) == 8 * elems * 4
    assert traffic.minimum_bytes(problems.Problem(shape, "spatial_cls", "fwd", "fp16")) == 4 * (elems + 64) * 2
    assert traffic.modelled_ms(3.35e9, 1.0) == pytest.approx(1.0)
    assert traffic.modelled_ms(1.0, 989e9) == pytest.approx(1.0)


def _goal_problems() -> list:
    return [problems.Problem(_goal_shape(), op, pass_, "fp16") for op, pass_ in DIVIDED]


@pytest.fixture(scope="module", autouse=True)
def _goal_traffic_ahead(request):
    """``traffic.measure`` of the goal problems, started in another process (spawned: same
    environment, so also in the interpreter) as the module starts, where :func:`builds` keeps
    one core busy; None when no selected test needs ``goal_traffic``."""
    if not any("goal_traffic" in getattr(item, "fixturenames", ()) for item in request.session.items
               if getattr(item, "module", None) is request.module):
        yield None
        return
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool.submit(traffic.measure, _goal_problems(), 90)


@pytest.fixture(scope="module")
def goal_traffic(_goal_traffic_ahead):
    """Counted traffic at TimeSformer-B head geometry (T=8, N=196, D=64), B=1, H=1, fp16, sm_90 plans."""
    probs = _goal_problems()
    start = time.perf_counter()
    rows = _goal_traffic_ahead.result() if _goal_traffic_ahead else traffic.measure(probs, target=90)
    print(f"\ntraffic counted (or waited for) in {time.perf_counter() - start:.0f} s:")
    for r in rows:
        print(f"  {r['op']:<12} {r['pass_']}  {r['ratio']:.3f}x the minimum "
              f"({' + '.join(t['kernel'] + 'x' + str(t['programs']) for t in r['launches'])})")
    return {(r["op"], r["pass_"]): r for r in rows}


@pytest.mark.parametrize("op,pass_", DIVIDED)
def test_every_input_is_read_and_every_output_written(goal_traffic, op, pass_):
    """Holds for any correct kernels: the distinct bytes cover the tensors of the minimum."""
    r = goal_traffic[(op, pass_)]
    assert r["launches"]
    n_in, n_out = (3, 1) if pass_ == "fwd" else (5, 3)
    per_tensor = r["min_bytes"] / (n_in + n_out)
    loads = sum(t["unique_load_sectors"] for t in r["launches"]) * 32
    stores = sum(t["unique_store_sectors"] for t in r["launches"]) * 32
    assert stores >= n_out * per_tensor
    # the backward may recompute o instead of reading it
    assert loads >= (n_in - (pass_ == "bwd")) * per_tensor


@pytest.mark.parametrize("op,pass_", DIVIDED)
def test_traffic_goal(goal_traffic, op, pass_):
    r = goal_traffic[(op, pass_)]
    assert r["ratio"] <= MAX_RATIO[pass_], f"{op} {pass_}: {r['ratio']:.2f}x the minimum traffic"


# ------------------------------------------------------------------------------ commands


def test_kernels_command_prints_the_report(capsys):
    from divattn.__main__ import main

    rc = main(["kernels", "--shapes", "timesformer_8x224", "--head-dims", "64", "--orders", "hwt", "--dtypes", "fp16",
               "--passes", "fwd", "--arch", "sm_90", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["builds"] and report["traffic"] is None
    assert {b["arch"] for b in report["builds"]} == {90}
    assert all(b["problems"][0].startswith("timesformer_8x224-hwt-B8H12-D64-") for b in report["builds"])


def test_a_users_head_dim_check_reads_the_record(capsys):
    """The README's check of one head dim: every build read from the record, none spilling in fp16/bf16."""
    from divattn.__main__ import main

    rc = main(["kernels", "--head-dims", "40", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["builds"]
    assert all(b["cached"] == "record" and b["head_dims"] == [40] for b in report["builds"])


def test_bench_writes_modelled_records_to_their_own_file(tmp_path, capsys):
    from divattn.__main__ import main
    from divattn.bench import modelled

    path = tmp_path / "modelled.json"
    rc = main(["bench", "--shape", "cpu_timesformer_8x112", "--patches", "16", "--ops", "temporal,spatial_cls", "--passes", "fwd,fwd+bwd",
               "--dtype", "float16", "--modelled", str(path), "--modelled-only"])
    out = capsys.readouterr().out
    assert rc == 0 and "modelled" in out
    assert [p.name for p in tmp_path.iterdir()] == ["modelled.json"]
    recs = json.loads(path.read_text())
    assert [(r["op"], r["pass"]) for r in recs] == [("temporal", "fwd"), ("temporal", "fwd+bwd"),
                                                    ("spatial_cls", "fwd"), ("spatial_cls", "fwd+bwd")]
    for r in recs:
        assert set(r) == set(modelled.FIELDS) and r["kind"] == "modelled" and "status" not in r
        assert r["bytes"] == pytest.approx(r["traffic_ratio"] * r["min_bytes"], rel=1e-3)
        assert r["modelled_ms"] == pytest.approx(max(r["bytes"] / 3.35e12, r["flops"] / 989e12) * 1e3)
        assert r["floor_ms"] <= r["modelled_ms"] or r["traffic_ratio"] < 1
    table = modelled.markdown(recs).splitlines()
    assert "modelled" in table[0] and len(table) == 2 + len(recs)
