"""The CUDA C++ backend (divattn/csrc/, divattn.ops.cuda_ext): its state, its build, its kernels.

On a CPU machine: the backend says in one sentence why it cannot run, forcing it raises
BackendError with every backend's reason, the reasons never start a build, and the
dispatcher picks it when Triton cannot run. The kernel tests run on the GPU, or without
one on CPU tensors under the emulator (``kernel_device``; tests/emulation has the op grid
there): every output element written, a deterministic backward, the binding's input
checks, cls over many frames, causal attention. GPU only: the awkward-shape grid, 64-bit
addressing, the built architectures.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys

import pytest
import torch

import divattn
from divattn.ops import cuda_emulator, cuda_ext, dispatch, reference, split_qkv

from .ops.cases import Case, assert_causal_close_to_reference, assert_close_to_reference, causal_case

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def kernel_device(monkeypatch):
    """Where the CUDA kernels run: the GPU, or without one the CPU, emulated."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    why = cuda_emulator.unavailable_reason()
    if why is not None:
        pytest.skip(why)
    monkeypatch.setenv(cuda_emulator.ENV, "1")
    return torch.device("cpu")


def one_sentence(text: str) -> bool:
    return bool(text) and "\n" not in text and not re.search(r"[.!?]\s+[A-Z]", text)


@pytest.fixture
def fresh_state(monkeypatch):
    """cuda_ext with no extension loaded and its cached reasons cleared (restored after)."""
    monkeypatch.setattr(cuda_ext, "_module", None)
    monkeypatch.setattr(cuda_ext, "_mode", None)
    monkeypatch.setattr(cuda_ext, "_build_error", None)
    monkeypatch.setattr(cuda_ext, "_prebuilt", lambda: (None, None))
    cuda_ext.extension_reason.cache_clear()
    yield
    cuda_ext.extension_reason.cache_clear()


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if anything starts a just-in-time build."""
    from torch.utils import cpp_extension

    def load(*args, **kwargs):
        raise AssertionError("torch.utils.cpp_extension.load was called")

    monkeypatch.setattr(cpp_extension, "load", load)


# ------------------------------------------------------------------- state and dispatch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the backend may be available")
def test_info_reports_cuda_unavailable_in_one_sentence():
    reason = cuda_ext.unavailable_reason()
    assert reason is not None and one_sentence(reason), reason
    if torch.version.cuda is None:
        assert "torch is a CPU build (torch.version.cuda is None)" in reason
    out = subprocess.run([sys.executable, "-m", "divattn", "info"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    cuda_line = next(line for line in lines if line.strip().startswith("cuda "))
    assert cuda_line.split(None, 1) == ["cuda", f"not available: {reason}"]
    assert any(line.strip().startswith("extension: ") for line in lines), out.stdout
    assert any(line.strip().startswith("nvcc: ") for line in lines), out.stdout


def _forced(fn):
    with pytest.raises(divattn.BackendError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("op", ["temporal", "spatial_cls", "joint"])
def test_forcing_cuda_on_unsupported_inputs_names_every_backends_reason(op):
    q = torch.randn(1, 3, 5, 2, 16)
    if op == "temporal":
        msg = _forced(lambda: divattn.temporal_attention(q, q, q, backend="cuda"))
    elif op == "spatial_cls":
        c = torch.randn(1, 2, 16)
        msg = _forced(lambda: divattn.spatial_attention(q, q, q, (c, c, c), backend="cuda"))
    else:
        x = torch.randn(1, 15, 2, 16)
        msg = _forced(lambda: divattn.joint_attention(x, x, x, backend="cuda"))
    assert msg.startswith("backend='cuda' cannot run")
    for name, be in dispatch.BACKENDS.items():
        reasons = be.not_supported_reasons(op, torch.float32, torch.device("cpu"), 16)
        assert f"  {name}: " + ("; ".join(reasons) or "available") in msg, msg
    assert "device type 'cpu' is not supported (supported: cuda)" in msg
    why = cuda_ext.unavailable_reason()
    if why is not None:
        assert why in msg


@pytest.mark.parametrize(
    "env, expected",
    [
        (dict(cuda=None), "torch is a CPU build (torch.version.cuda is None)"),
        (dict(cuda="12.4", gpu=False), "no CUDA device is visible (torch.cuda.is_available() is False)"),
        (dict(cuda="12.4", gpu=True, cuda_home=None), "nvcc not found (set CUDA_HOME or put nvcc on PATH)"),
        (dict(cuda="12.4", gpu=True, ninja=False), "ninja is not installed (pip install ninja)"),
        (dict(cuda="12.4", gpu=True, archs="ampere"), "'ampere' is not a CUDA architecture"),
    ],
    ids=["cpu-torch", "no-gpu", "no-nvcc", "no-ninja", "bad-archs"],
)
def test_reason_names_what_is_missing(env, expected, monkeypatch, fresh_state, no_build, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", env["cuda"])
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: env.get("gpu", False))
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", env.get("cuda_home", str(home)))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: env.get("ninja", True))
    monkeypatch.setenv("DIVATTN_CUDA_ARCHS", env.get("archs", "80;90"))
    reason = cuda_ext.unavailable_reason()
    assert reason is not None and expected in reason, reason
    assert reason.startswith("the CUDA extension is not built (DIVATTN_BUILD_CUDA=1) and cannot be built just in time")
    assert one_sentence(reason), reason


def test_reason_is_cached_and_never_builds(monkeypatch, fresh_state, no_build):
    calls = []
    monkeypatch.setattr(cuda_ext, "_jit_blocker", lambda: calls.append(1))  # buildable: returns None
    monkeypatch.setenv("DIVATTN_CUDA_ARCHS", "80;90")
    for _ in range(3):
        assert cuda_ext.unavailable_reason() is None
        assert dispatch.BACKENDS["cuda"].unavailable_reason() is None
    assert len(calls) == 1
    lines = cuda_ext.build_info()
    assert "extension: built just in time on first use for sm_80, sm_90, cached under" in "\n".join(lines)


def test_a_failed_build_is_reported_and_refused_afterwards(monkeypatch, fresh_state):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cuda_ext, "_jit_blocker", lambda: None)
    monkeypatch.setenv("DIVATTN_CUDA_ARCHS", "90")
    seen = {}

    def load(name, sources, extra_cflags, extra_cuda_cflags, verbose):
        seen.update(name=name, sources=sources, cflags=extra_cflags, cuda=extra_cuda_cflags)
        raise RuntimeError("Error building extension 'divattn_C'\nlong compiler output")

    monkeypatch.setattr(cpp_extension, "load", load)
    with pytest.raises(RuntimeError, match=r"building the CUDA extension just in time failed \(RuntimeError: Error "):
        cuda_ext.forward("temporal", *[None] * 5, 1.0)
    assert seen["name"] == "divattn_C"
    assert sorted(map(lambda p: p.rsplit("/", 1)[-1], seen["sources"])) == [
        "attn_bwd.cu", "attn_bwd_mma.cu", "attn_fwd.cu", "attn_fwd_mma.cu", "bindings.cpp", "cls.cu"]
    assert "-DDIVATTN_ARCHS=sm_90" in seen["cflags"]
    assert "-gencode=arch=compute_90,code=sm_90" in seen["cuda"]
    reason = cuda_ext.unavailable_reason()
    assert reason.startswith("the just-in-time build of the CUDA extension failed") and one_sentence(reason)
    with pytest.raises(divattn.BackendError, match="just-in-time build of the CUDA extension failed"):
        dispatch.select("temporal", torch.float16, torch.device("cuda"), 64, backend="cuda")


@pytest.mark.parametrize(
    "text, archs",
    [("80;90", ["80", "90"]), ("8.0 9.0", ["80", "90"]), ("sm_90a,100", ["90a", "100"]),
     ("8.6+PTX;8.6", ["86"]), (" 75 ", ["75"])],
)
def test_parse_archs(text, archs):
    assert cuda_ext.parse_archs(text) == archs


@pytest.mark.parametrize("text", ["", "ampere", "8", "80;sm90x"])
def test_parse_archs_rejects_nonsense(text):
    with pytest.raises(ValueError, match="DIVATTN_CUDA_ARCHS"):
        cuda_ext.parse_archs(text)


def test_gencode_has_machine_code_for_each_arch_and_ptx_for_the_newest():
    assert cuda_ext.gencode_flags(["100", "80", "90"]) == [
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_100,code=compute_100",
    ]


@pytest.mark.parametrize(
    "capability, archs, runs",
    [((8, 0), ["80", "90"], True), ((8, 6), ["80", "90"], True), ((9, 0), ["80", "90"], True),
     ((12, 0), ["80", "90"], True),  # PTX of compute_90
     ((7, 5), ["80", "90"], False), ((8, 6), ["90"], False), ((9, 0), ["90a"], True), ((10, 0), ["90a"], False)],
    ids=lambda x: str(x).replace(" ", ""),
)
def test_arch_reason(capability, archs, runs):
    reason = cuda_ext.arch_reason(capability, archs)
    if runs:
        assert reason is None
    else:
        device = capability[0] * 10 + capability[1]
        assert reason.endswith(f"has no code for sm_{device} (rebuild with DIVATTN_CUDA_ARCHS={device})")
        assert one_sentence(reason)


def _without_triton(monkeypatch):
    triton = dispatch.BACKENDS["triton"]
    monkeypatch.setitem(
        dispatch.BACKENDS, "triton",
        dataclasses.replace(triton, runtime_reason=lambda: "triton is not importable (ModuleNotFoundError)"),
    )


def _pretend_gpu(monkeypatch, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_auto_dispatch_picks_cuda_when_triton_cannot_run(monkeypatch):
    _without_triton(monkeypatch)
    _pretend_gpu(monkeypatch)
    monkeypatch.setattr(cuda_ext, "unavailable_reason", lambda: None)
    gpu = torch.device("cuda", 0)
    for op in dispatch.OPS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            assert dispatch.select(op, dtype, gpu, 72).name == "cuda"
    assert dispatch.select("temporal", torch.float16, gpu, 160).name == "torch"  # D > 128
    assert dispatch.select("temporal", torch.float64, gpu, 64).name == "torch"


def test_auto_dispatch_refuses_gpus_older_than_declared(monkeypatch):
    _pretend_gpu(monkeypatch, capability=(7, 0))
    monkeypatch.setattr(cuda_ext, "unavailable_reason", lambda: None)
    reasons = dispatch.BACKENDS["triton"].not_supported_reasons("temporal", torch.float16, torch.device("cuda", 0), 64)
    assert any("compute capability 7.0 is older than the 8.0 it needs" in r for r in reasons)
    assert dispatch.select("temporal", torch.float16, torch.device("cuda", 0), 64).name == "torch"


def test_no_gpu_is_a_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reasons = dispatch.BACKENDS["torch"].not_supported_reasons("joint", torch.float16, torch.device("cuda", 0), 64)
    assert reasons == ["no CUDA device is available (torch.cuda.is_available() is False)"]


def test_auto_dispatch_skips_an_unavailable_cuda_backend(monkeypatch):
    _without_triton(monkeypatch)
    _pretend_gpu(monkeypatch)
    monkeypatch.setattr(cuda_ext, "unavailable_reason", lambda: "nvcc not found (set CUDA_HOME)")
    assert dispatch.select("spatial_cls", torch.float16, torch.device("cuda", 0), 64).name == "torch"


# ------------------------------------------------------------------------ GPU kernels

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
AWKWARD = [
    Case(op, B, T, N, H, D, order)
    for op in ("temporal", "spatial", "spatial_cls")
    for B, H in ((1, 2),)
    for T in (1, 3, 13)
    for N in (1, 49, 197)
    for D, order in ((40, "hwt"), (64, "thw"), (72, "hwt"), (128, "thw"))
] + [
    Case("temporal", 2, 8, 196, 3, 64, "thw"),
    Case("spatial_cls", 2, 8, 196, 3, 64, "hwt"),
    Case("spatial_cls", 1, 3, 197, 2, 80, "thw", "transposed"),
    Case("temporal", 2, 40, 7, 2, 72, "hwt", "separate"),
    Case("joint", 1, 3, 97, 2, 128, "hwt"),
    Case("joint", 2, 1, 5, 3, 40, "hwt", "sliced"),
]


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in AWKWARD])
def test_kernels_match_reference_on_awkward_shapes(case, dtype):
    assert_close_to_reference(case, "cuda", dtype)


def _poisoned_call(op, B, T, N, H, D, order, has_cls, dtype, dev):
    """Run forward and backward straight on NaN-filled outputs; return what they wrote."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, int(has_cls) + T * N, 3, H, D, generator=gen).to(dev, dtype)
    dqkv = torch.full_like(qkv, math.nan)
    if op == "joint":
        (q, k, v), (dq, dk, dv), cls, d_cls = qkv.unbind(2), dqkv.unbind(2), None, None
    else:
        q, k, v, *cls = split_qkv(qkv, T, N, order=order, has_cls=has_cls)
        dq, dk, dv, *d_cls = split_qkv(dqkv, T, N, order=order, has_cls=has_cls)
        cls, d_cls = (cls[0], d_cls[0]) if has_cls else (None, None)
    nan = dict(fill_value=math.nan, device=dev)
    o = torch.full(q.shape, dtype=dtype, **nan)
    lse = torch.full((q.numel() // D,), **nan)  # one per row of every sequence
    extra = {}
    if has_cls:
        extra = dict(o_cls=torch.full((B, H, D), dtype=dtype, **nan), cls_frames=torch.full((B, H, T, D), **nan),
                     lse_cls=torch.full((B, H, T), **nan))
    scale = D ** -0.5
    cuda_ext.forward(op, q, k, v, o, lse, scale, cls=cls, **extra)
    do = torch.randn(q.shape, generator=gen).to(dev, dtype)
    bwd = {}
    if has_cls:
        bwd = dict(cls=cls, d_cls=d_cls, do_cls=torch.randn(B, H, D, generator=gen).to(dev, dtype),
                   cls_frames=extra["cls_frames"], lse_cls=extra["lse_cls"])
    grads = []
    for _ in range(2):
        dqkv.fill_(math.nan)
        cuda_ext.backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, **bwd)
        grads.append(dqkv.clone())
    return q, k, scale, o, lse, extra, grads


POISON = [
    ("temporal", 2, 13, 7, 3, 64, "hwt", False),
    ("temporal", 1, 3, 5, 2, 40, "thw", False),
    ("spatial", 1, 3, 197, 2, 72, "thw", False),
    ("spatial", 2, 2, 49, 3, 128, "hwt", True),
    ("spatial", 1, 1, 1, 1, 80, "hwt", True),
    ("joint", 1, 1, 100, 2, 80, "thw", False),
]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("args", POISON, ids=lambda a: f"{a[0]}-T{a[2]}-N{a[3]}-D{a[5]}-{a[6]}" + "-cls" * a[7])
def test_every_output_written_and_backward_deterministic(args, dtype, kernel_device):
    op, has_cls = args[0], args[7]
    q, k, scale, o, lse, extra, grads = _poisoned_call(*args, dtype, kernel_device)
    assert not o.isnan().any() and not lse.isnan().any()
    for name, x in extra.items():
        assert not x.isnan().any(), name
    assert not grads[0].isnan().any()
    assert torch.equal(grads[0], grads[1]), "two backward passes differ"
    if op == "temporal":  # lse: base 2, scale included
        s = torch.einsum("btnhd,bsnhd->bnhts", q.double(), k.double()) * scale
        expected = (torch.logsumexp(s, -1) / math.log(2)).reshape(-1)
        assert (expected - lse.double()).abs().max().item() < 1e-2


@needs_gpu
def test_offsets_beyond_32_bits():
    """Views whose element offsets pass 2**31 (a large strided storage)."""
    dev = torch.device("cuda")
    B, T, N, H, D = 3, 4, 5, 2, 64
    step = 2**30 + 7  # batch stride in elements: batch 2 starts past 2**31
    try:
        storage = torch.zeros(2 * step + 3 * T * N * H * D, dtype=torch.float16, device=dev)
    except torch.OutOfMemoryError:
        pytest.skip("needs about 4.3 GB of GPU memory")
    gen = torch.Generator(device=dev).manual_seed(0)
    strides = (step, N * H * D * 3, H * D * 3, D * 3, 1)  # q, k, v interleaved per head, (t h w)-like
    views = []
    for i in range(3):
        view = storage.as_strided((B, T, N, H, D), strides, storage_offset=i * D)
        view.copy_(torch.randn(B, T, N, H, D, device=dev, generator=gen).half())
        views.append(view)
    q, k, v = views
    o = divattn.temporal_attention(q, k, v, backend="cuda")
    ref = divattn.temporal_attention(*(x.float() for x in views), backend="torch")
    assert (o.float() - ref).abs().max().item() < 5e-3
    do = torch.randn(B, T, N, H, D, device=dev, generator=gen).half()
    lse = torch.empty(B * N * H * T, device=dev)
    o2 = torch.empty_like(do)
    cuda_ext.forward("temporal", q, k, v, o2, lse, D ** -0.5)
    dq, dk, dv = (torch.empty_like(do) for _ in range(3))
    cuda_ext.backward("temporal", q, k, v, o2, do, lse, dq, dk, dv, D ** -0.5)
    leaves = [x.detach().float().requires_grad_() for x in views]
    out = divattn.temporal_attention(*leaves, backend="torch")
    torch.autograd.backward(out, do.float())
    for got, leaf in zip((dq, dk, dv), leaves):
        assert (got.float() - leaf.grad).abs().max().item() < 2e-2


def _direct_inputs(dev):
    q = torch.randn(1, 2, 3, 2, 16, device=dev)
    return q, torch.empty_like(q), torch.empty(12, device=dev)


BAD_INPUTS = {
    "lse-dtype": (lambda q, o, lse: ("temporal", q, q, q, o, lse.double(), 0.25), ["lse", "float32", "Double"]),
    "k-shape": (lambda q, o, lse: ("temporal", q, q[:, :1], q, o, lse, 0.25), ["k must have shape", "[1, 1, 3, 2, 16]"]),
    "v-dtype": (lambda q, o, lse: ("temporal", q, q, q.half(), o, lse, 0.25), ["v must have dtype Float", "Half"]),
    "q-stride": (lambda q, o, lse: ("temporal", q.transpose(-1, -2).contiguous().transpose(-1, -2), q, q, o, lse, 0.25),
                 ["q must have a contiguous last dim"]),
    "head-dim": (lambda q, o, lse: ("temporal", *(torch.zeros(1, 2, 3, 2, 130, device=q.device),) * 4, lse, 0.25),
                 ["head dim", "[1, 128]", "130"]),
    "o-overlap": (lambda q, o, lse: ("temporal", q, q, q, o[:, :, :1].expand(1, 2, 3, 2, 16), lse, 0.25),
                  ["o is written and must not have overlapping elements"]),
    "device-k": (lambda q, o, lse: ("temporal", q, _elsewhere(q), q, o, lse, 0.25), ["k must be on", " like q"]),
    "op": (lambda q, o, lse: ("sideways", q, q, q, o, lse, 0.25), ["op must be 'temporal', 'spatial' or 'joint'"]),
}


def _elsewhere(x):
    """x on another device than its own (the CPU for a CUDA tensor, meta for a CPU one)."""
    return x.to("meta") if x.device.type == "cpu" else x.cpu()


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_binding_names_the_bad_tensor(name, kernel_device):
    make, words = BAD_INPUTS[name]
    args = make(*_direct_inputs(kernel_device))
    with pytest.raises(RuntimeError) as info:
        cuda_ext.forward(*args)
    msg = str(info.value)
    for word in words:
        assert word in msg, msg


@needs_gpu
def test_build_info_after_use_names_the_architectures():
    q = torch.randn(1, 2, 3, 2, 16, device="cuda")
    divattn.temporal_attention(q, q, q, backend="cuda")
    text = "\n".join(cuda_ext.build_info())
    assert re.search(r"extension: built (ahead of time|just in time) \(.*\), compiled for sm_\d+", text), text


# cls over many frames: one block per frame, per-frame buffers summed over t in order.
CLS_FRAMES = [
    Case("spatial_cls", 2, 8, 7, 3, 40, "hwt"),  # N = 7 rows: two frames share a block
    Case("spatial_cls", 1, 8, 16, 2, 64, "thw"),
    Case("spatial_cls", 2, 5, 49, 2, 72, "hwt"),
    Case("spatial_cls", 1, 16, 1, 2, 128, "thw"),
]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CLS_FRAMES])
def test_cls_over_many_frames_matches_reference(case, dtype, kernel_device):
    assert_close_to_reference(case, "cuda", dtype)


def cls_frames_call(B, T, N, H, D, order, device, seed=0):
    """Forward (into NaN-filled buffers) and two backward passes of spatial attention with cls.

    Returns the inputs, the forward buffers and the two qkv gradients.
    """
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1 + T * N, 3, H, D, generator=gen).to(device)
    dqkv = torch.full_like(qkv, math.nan)
    q, k, v, cls = split_qkv(qkv, T, N, order=order, has_cls=True)
    dq, dk, dv, d_cls = split_qkv(dqkv, T, N, order=order, has_cls=True)
    nan = dict(fill_value=math.nan, device=device)
    out = dict(o=torch.full(q.shape, **nan), lse=torch.full((q.numel() // D,), **nan),
               o_cls=torch.full((B, H, D), **nan), cls_frames=torch.full((B, H, T, D), **nan),
               lse_cls=torch.full((B, H, T), **nan))
    scale = D ** -0.5
    cuda_ext.forward("spatial", q, k, v, out["o"], out["lse"], scale, cls=cls, o_cls=out["o_cls"],
                     cls_frames=out["cls_frames"], lse_cls=out["lse_cls"])
    do = torch.randn(q.shape, generator=gen).to(device)
    do_cls = torch.randn(B, H, D, generator=gen).to(device)
    grads = []
    for _ in range(2):
        dqkv.fill_(math.nan)
        cuda_ext.backward("spatial", q, k, v, out["o"], do, out["lse"], dq, dk, dv, scale, cls=cls, d_cls=d_cls,
                          do_cls=do_cls, cls_frames=out["cls_frames"], lse_cls=out["lse_cls"])
        grads.append(dqkv.clone())
    return (q, k, v, cls), out, grads


def check_cls_frames(B, T, N, H, D, order, device):
    (q, k, v, (qc, kc, vc)), out, grads = cls_frames_call(B, T, N, H, D, order, device)
    for name, x in out.items():
        assert not x.isnan().any(), f"{name} has unwritten (NaN) elements"
    # every frame's cls query attends to [cls] + that frame's patches, softmax of its own
    qc, kc, vc, k, v = (x.double() for x in (qc, kc, vc, k, v))
    s_cls = (qc * kc).sum(-1)[:, :, None, None].expand(B, H, T, 1)
    s = torch.cat([s_cls, torch.einsum("bhd,btnhd->bhtn", qc, k)], -1) * D ** -0.5
    vals = torch.cat([vc[:, :, None, None].expand(B, H, T, 1, D), v.permute(0, 3, 1, 2, 4)], 3)
    frames = torch.einsum("bhtn,bhtnd->bhtd", s.softmax(-1), vals)
    assert (out["cls_frames"].double() - frames).abs().max().item() < 1e-4
    assert (out["lse_cls"].double() - torch.logsumexp(s, -1) / math.log(2)).abs().max().item() < 1e-4
    assert (out["o_cls"].double() - frames.mean(2)).abs().max().item() < 1e-4
    assert not grads[0].isnan().any(), "a gradient element was not written"
    assert torch.equal(grads[0], grads[1]), "two backward passes differ"


@pytest.mark.parametrize("T,N,order", [pytest.param(T, N, order, id=f"T{T}-N{N}-{order}")
                                       for T, N, order in ((8, 7, "hwt"), (3, 49, "thw"), (16, 1, "hwt"),
                                                           (1, 16, "thw"))])
def test_cls_per_frame_buffers_and_deterministic_backward(T, N, order, kernel_device):
    check_cls_frames(2, T, N, 3, 40, order, kernel_device)


# ------------------------------------------------------------------ causal temporal attention

# Query frames are the last Tq of Tk; T over 1 .. 40 (two 32-row tiles), N and D awkward.
CAUSAL = [(T, tq, N, D, order) for T, tq, N, D, order in (
    (1, 1, 7, 40, "thw"), (13, 13, 3, 72, "hwt"), (8, 3, 5, 64, "thw"), (13, 1, 49, 128, "hwt"),
    (40, 40, 2, 40, "hwt"), (40, 9, 3, 64, "thw"), (40, 33, 2, 80, "hwt"),
)]


def causal_call(B, T, tq, N, H, D, order, causal, device, dtype=torch.float32):
    """Forward (into NaN-filled buffers) and two backward passes of temporal attention from
    the last ``tq`` of ``T`` frames, straight through the launchers.

    Returns (q, k, v), o, lse, do and the two qkv gradients (NaN where nothing was written).
    """
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, 1 + T * N, 3, H, D, generator=gen).to(device, dtype)
    dqkv = torch.full_like(qkv, math.nan)
    q, k, v, _ = split_qkv(qkv, T, N, order=order, has_cls=True)
    dq, dk, dv, _ = split_qkv(dqkv, T, N, order=order, has_cls=True)
    q, dq = q[:, T - tq:], dq[:, T - tq:]
    o = torch.full(q.shape, math.nan, dtype=dtype, device=device)
    lse = torch.full((q.numel() // D,), math.nan, device=device)
    scale = D ** -0.5
    cuda_ext.forward("temporal", q, k, v, o, lse, scale, causal=causal)
    do = torch.randn(q.shape, generator=gen).to(device, dtype)
    grads = []
    for _ in range(2):
        dqkv.fill_(math.nan)
        cuda_ext.backward("temporal", q, k, v, o, do, lse, dq, dk, dv, scale, causal=causal)
        grads.append(dqkv.clone())
    return (q, k, v), o, lse, do, grads


def check_causal(T, tq, N, D, order, device, causal=True, dtype=torch.float32, B=2, H=2):
    """Every output written, the fp64 masked reference matched, and a deterministic backward."""
    (q, k, v), o, lse, do, grads = causal_call(B, T, tq, N, H, D, order, causal, device, dtype)
    assert not o.isnan().any() and not lse.isnan().any(), "an output element was not written"
    q, k, v, do = (x.detach().double().cpu().requires_grad_() for x in (q, k, v, do))
    s = torch.einsum("btnhd,bsnhd->bnhts", q, k) * D ** -0.5
    if causal:
        s = s.masked_fill(~reference.causal_mask(tq, T), -math.inf)
    ref = torch.einsum("bnhts,bsnhd->btnhd", s.softmax(-1), v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2}[dtype]
    assert (o.double().cpu() - ref).abs().max().item() < tol * (1 + ref.abs().max().item())
    expected = (torch.logsumexp(s, -1) / math.log(2)).reshape(-1)
    assert (lse.double().cpu() - expected).abs().max().item() < tol * (1 + expected.abs().max().item())
    g = grads[0].double().cpu()
    gq, gk, gv, _ = split_qkv(g, T, N, order=order, has_cls=True)
    for name, got, want in zip("qkv", (gq[:, T - tq:], gk, gv), ref_grads):
        assert not got.isnan().any(), f"d{name}: an element was not written"
        assert (got - want).abs().max().item() < tol * (1 + want.abs().max().item()), f"d{name}"
    if tq < T:
        assert torch.isnan(gq[:, :T - tq]).all(), "dq written outside the query frames"
    assert torch.equal(grads[0].nan_to_num(7.0), grads[1].nan_to_num(7.0)), "two backward passes differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,tq,N,D,order", [pytest.param(*c, id=f"T{c[0]}-Tq{c[1]}-N{c[2]}-D{c[3]}-{c[4]}")
                                            for c in CAUSAL])
def test_causal_and_fewer_queries_write_every_output_and_match_reference(T, tq, N, D, order, causal, dtype,
                                                                         kernel_device):
    check_causal(T, tq, N, D, order, kernel_device, causal, dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("tq", [13, 4, 1], ids=lambda t: f"Tq{t}")
def test_causal_through_the_public_op_matches_reference(tq, dtype, kernel_device):
    assert_causal_close_to_reference(causal_case(13, tq, 49, 2, 72, "hwt", "transposed"), "cuda", dtype)


def test_binding_refuses_causal_spatial_and_more_query_frames(kernel_device):
    q, o, lse = _direct_inputs(kernel_device)
    with pytest.raises(RuntimeError, match="causal is only supported by temporal attention"):
        cuda_ext.forward("spatial", q, q, q, o, lse, 0.25, causal=True)
    with pytest.raises(RuntimeError, match=r"k must have shape \(B, Tk, N, H, D\) with Tk >= the Tq = 2"):
        cuda_ext.forward("temporal", q, q[:, :1], q[:, :1], o, lse, 0.25, causal=True)
    k = torch.randn(1, 5, 3, 2, 16, device=q.device)
    with pytest.raises(RuntimeError, match="dk must have shape"):
        cuda_ext.backward("temporal", q, k, k, o, o, lse, torch.empty_like(q), torch.empty_like(q), k.clone(), 0.25)


def test_the_emulator_serves_cpu_tensors_only_when_asked(monkeypatch):
    """DIVATTN_CUDA_EMULATE=1 lets the cuda backend take CPU tensors (and only those)."""
    cpu = torch.device("cpu")
    monkeypatch.delenv(cuda_emulator.ENV, raising=False)
    reasons = dispatch.BACKENDS["cuda"].not_supported_reasons("temporal", torch.float16, cpu, 64)
    assert "device type 'cpu' is not supported (supported: cuda)" in reasons
    monkeypatch.setenv(cuda_emulator.ENV, "1")
    assert cuda_ext.unavailable_reason() == cuda_emulator.unavailable_reason()
    why = cuda_ext.device_reason(torch.device("cuda", 0))
    assert why == "DIVATTN_CUDA_EMULATE=1 runs the cuda backend's kernels emulated on CPU tensors only"
    if cuda_emulator.unavailable_reason() is None:
        assert dispatch.BACKENDS["cuda"].not_supported_reasons("temporal", torch.float16, cpu, 64) == []
        q = torch.empty(1, 2, 3, 2, 16, device="meta")
        with pytest.raises(RuntimeError, match="q must be a CPU tensor \\(the CUDA kernels run emulated on the host\\)"):
            cuda_ext.forward("temporal", q, q, q, q, torch.empty(12, device="meta"), 0.25)
