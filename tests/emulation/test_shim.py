"""The emulator's shim on its own (shim_kernels.cu): every fragment layout it implements
against a plain matmul, the loaders of mma.cuh, shuffles, cp.async, the fp16 / bf16
conversions against torch's, and what the emulator reports about broken kernels."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from divattn.ops import cuda_emulator

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "shim_kernels.cu", cuda_emulator.CSRC / "emulator" / "runtime.cpp"]


def load(sources=SOURCES, include=cuda_emulator.CSRC) -> "Shim":
    return Shim(cuda_emulator.library_path(sources, include, name="divattn_shim_tests"))


class Shim:
    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        self.lib.test_error.restype = ctypes.c_char_p
        self.lib.divattn_emu_add_range.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def call(self, name, *args, inputs=(), outputs=()):
        """Run an entry point with only ``inputs`` readable and ``outputs`` writable; returns
        (status, the emulator's sentence)."""
        self.lib.divattn_emu_clear_ranges()
        for t, writable in [(t, 0) for t in inputs] + [(t, 1) for t in outputs]:
            self.lib.divattn_emu_add_range(t.data_ptr(), t.numel() * t.element_size(), writable)
        conv = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
        err = getattr(self.lib, name)(*conv)
        return err, self.lib.test_error(err).decode()


@pytest.fixture(scope="module")
def shim():
    why = cuda_emulator.unavailable_reason()
    if why is not None:
        pytest.skip(why)
    return load()


HALF = [torch.float16, torch.bfloat16]
ids = lambda d: str(d).replace("torch.", "")  # noqa: E731


def rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=ids)
def test_mma_fragments_in_registers_match_a_matmul(shim, dtype):
    A, B = rand(16, 16, dtype=dtype, seed=1), rand(16, 8, dtype=dtype, seed=2)
    C = rand(16, 8, dtype=torch.float32, seed=3)
    D = torch.full((16, 8), float("nan"))
    err, msg = shim.call("test_mma_registers", int(dtype == torch.bfloat16), A, B, C, D, inputs=(A, B, C), outputs=(D,))
    assert err == 0, msg
    want = A.double() @ B.double() + C.double()
    torch.testing.assert_close(D.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF, ids=ids)
def test_ldmatrix_loaders_and_chained_accumulators_match_matmuls(shim, dtype):
    A, X, Y = (rand(16, 16, dtype=dtype, seed=s) for s in (4, 5, 6))
    D = torch.full((4, 16, 16), float("nan"))
    err, msg = shim.call("test_mma_shared", int(dtype == torch.bfloat16), A, X, Y, D, inputs=(A, X, Y), outputs=(D,))
    assert err == 0, msg
    a, x, y = A.double(), X.double(), Y.double()
    ax = a @ x
    for got, want in zip(D.double(), (a @ x.T, ax, a.T @ x, ax.to(dtype).double() @ y)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * max(1.0, want.abs().max().item()))


def test_shuffles(shim):
    out = torch.full((128,), -1, dtype=torch.int32)
    err, msg = shim.call("test_shuffles", out, outputs=(out,))
    assert err == 0, msg
    lane, warp = torch.arange(64) % 32, torch.arange(64) // 32
    assert out[:64].tolist() == (100 * warp + (lane ^ 5)).tolist()
    assert out[64:].tolist() == (100 * warp + (7 * lane + 3) % 32).tolist()


def test_cp_async_lands_at_the_wait_and_zero_fills(shim):
    src = rand(256, dtype=torch.float16, seed=7)
    out = torch.zeros(512)
    err, msg = shim.call("test_cp_async", src, out, inputs=(src,), outputs=(out,))
    assert err == 0, msg
    assert out[:256].isnan().all(), "the destination must read as NaN until the group is waited for"
    assert torch.equal(out[256:384], src[:128].float())
    assert (out[384:] == 0).all()


def test_half_and_bfloat16_conversions_match_torch(shim):
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    as_half, as_bf16 = torch.empty(65536), torch.empty(65536)
    shim.lib.test_from_half(ctypes.c_void_p(bits.data_ptr()), ctypes.c_void_p(as_half.data_ptr()),
                            ctypes.c_void_p(as_bf16.data_ptr()), 65536)
    for got, dtype in ((as_half, torch.float16), (as_bf16, torch.bfloat16)):
        want = bits.view(dtype).float()
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~want.isnan()], want[~want.isnan()])
    g = torch.Generator().manual_seed(8)
    x = torch.cat([torch.randn(200000, generator=g) * 10.0 ** torch.randint(-9, 6, (200000,), generator=g),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                                 float("inf"), -float("inf"), float("nan"), 3.4e38, 1e-45])])
    half, bf16 = torch.empty(len(x), dtype=torch.int16), torch.empty(len(x), dtype=torch.int16)
    shim.lib.test_to_half(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(half.data_ptr()),
                          ctypes.c_void_p(bf16.data_ptr()), len(x))
    for got, dtype in ((half, torch.float16), (bf16, torch.bfloat16)):
        want = x.to(dtype)
        got = got.view(dtype)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~want.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))


def test_a_missing_barrier_shows(shim):
    out = torch.zeros(128)
    err, msg = shim.call("test_neighbours", out, 128, 1, outputs=(out,))
    assert err == 0, msg
    assert out.tolist() == [float((i + 1) % 128) for i in range(128)]
    err, msg = shim.call("test_neighbours", out, 128, 0, outputs=(out,))
    assert err == 0, msg
    assert out.isnan().any(), "without the barrier some thread reads a value not yet written"


def test_deadlock_divergence_out_of_bounds_and_shared_memory_are_reported(shim):
    out = torch.zeros(64, dtype=torch.int32)
    err, msg = shim.call("test_deadlock", out, outputs=(out,))
    assert err != 0 and "deadlock: 48 threads wait at __syncthreads, 16 at a warp collective" in msg, msg
    err, msg = shim.call("test_divergent", out, outputs=(out,))
    assert err != 0 and "divergent warp" in msg, msg
    x, y = torch.zeros(40), torch.zeros(64)
    err, msg = shim.call("test_read", x, y, 64, inputs=(x,), outputs=(y,))
    assert err != 0 and "read_kernel: block (0, 0, 0) thread 40" in msg and "outside every tensor" in msg, msg
    err, msg = shim.call("test_read", x, x, 32, inputs=(x,))
    assert err != 0 and "global write" in msg and "only reads" in msg, msg
    err, msg = shim.call("test_big_smem", y, 64 * 1024, outputs=(y,))
    assert err != 0 and "65536 bytes of dynamic shared memory" in msg and "cudaFuncSetAttribute" in msg, msg
