"""Bad input gets an exception naming the tensor, what was expected and what came."""

import math

import numpy as np
import pytest
import torch

import divattn
from divattn import BackendError
from divattn.ops import dispatch


def qkv(B=1, T=2, N=3, H=2, D=8, dtype=torch.float32):
    return [torch.randn(B, T, N, H, D, dtype=dtype) for _ in range(3)]


def test_mismatched_dtype_names_the_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"temporal_attention: v has dtype torch.float16, expected torch.float32 like q"):
        divattn.temporal_attention(q, k, v.half(), backend="torch")


def test_mismatched_device_names_the_tensor():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k is on device meta, expected cpu like q"):
        divattn.spatial_attention(q, k.to("meta"), v, backend="torch")


def test_mismatched_shape_names_the_tensor():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 4, 2, 8\), expected \(1, 2, 3, 2, 8\) like q"):
        divattn.temporal_attention(q, torch.randn(1, 2, 4, 2, 8), v, backend="torch")


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"joint_attention: q must be 4-D \(B, L, H, D\), got 5-D"):
        divattn.joint_attention(q, k, v)


def test_cls_shape_and_type():
    q, k, v = qkv()
    c = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match=r"k_cls has shape \(1, 3, 8\), expected \(B, H, D\) = \(1, 2, 8\)"):
        divattn.spatial_attention(q, k, v, (c, torch.randn(1, 3, 8), c), backend="torch")
    with pytest.raises(TypeError, match="cls must be a tuple"):
        divattn.spatial_attention(q, k, v, c, backend="torch")
    with pytest.raises(ValueError, match="T = 0"):
        e = torch.randn(1, 0, 3, 2, 8)
        divattn.spatial_attention(e, e, e, (c, c, c), backend="torch")


@pytest.mark.parametrize("slot", [0, 1, 2], ids=["q_cls", "k_cls", "v_cls"])
def test_cls_tensors_are_named(slot):
    """The cls vectors are checked like q, k and v, each under its own name."""
    q, k, v = qkv()
    name = ("q_cls", "k_cls", "v_cls")[slot]

    def cls_with(bad):
        cls = [torch.randn(1, 2, 8) for _ in range(3)]
        cls[slot] = bad
        return tuple(cls)

    bad = {
        TypeError: [(2.0, rf"{name} must be a torch.Tensor, got float"),
                    (torch.randn(1, 2, 8, dtype=torch.float64), rf"{name} has dtype torch.float64, expected "
                                                                  rf"torch.float32 like q")],
        ValueError: [(torch.randn(1, 2, 8, device="meta"), rf"{name} is on device meta, expected cpu like q"),
                     (torch.randn(1, 2, 16)[..., ::2], rf"{name} must have a contiguous last dim")],
    }
    for error, cases in bad.items():
        for x, message in cases:
            with pytest.raises(error, match=message):
                divattn.spatial_attention(q, k, v, cls_with(x), backend="torch")


def test_last_dim_must_be_contiguous():
    q, k, v = qkv()
    bad = torch.randn(1, 2, 3, 2, 16)[..., ::2]
    with pytest.raises(ValueError, match=r"v must have a contiguous last dim \(stride\(-1\) == 1\), got shape "
                                         r"\(1, 2, 3, 2, 8\).*strides \(192, 96, 32, 16, 2\)"):
        divattn.temporal_attention(q, k, bad, backend="torch")


@pytest.mark.parametrize("D", [0, 257])
def test_head_dim_out_of_range(D):
    q, k, v = qkv(D=D)
    with pytest.raises(ValueError, match=rf"head dim \(last dim of q\) must be in \[1, 256\], got {D}"):
        divattn.temporal_attention(q, k, v, backend="torch")


def test_non_float_inputs():
    q = torch.ones(1, 2, 3, 2, 8, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating-point"):
        divattn.temporal_attention(q, q, q)


def test_forced_backend_that_cannot_run_lists_every_reason():
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(BackendError) as e:
        divattn.temporal_attention(q, k, v, backend="triton")
    msg = str(e.value)
    assert "backend='triton' cannot run temporal attention on inputs of dtype torch.float64" in msg
    for name in dispatch.BACKENDS:
        assert f"\n  {name}: " in msg
    assert "dtype torch.float64 is not supported" in msg
    assert "torch: available" in msg


def test_cuda_backend_on_cpu_tensors_says_why():
    q, k, v = qkv()
    with pytest.raises(BackendError, match=r"cuda: .*device type 'cpu' is not supported"):
        divattn.spatial_attention(q, k, v, backend="cuda")


def test_unknown_backend_names():
    q, k, v = qkv()
    with pytest.raises(BackendError, match="backend='fast' is not a backend"):
        divattn.temporal_attention(q, k, v, backend="fast")


def test_env_var_sets_the_default_backend(monkeypatch):
    q, k, v = qkv(dtype=torch.float64)
    monkeypatch.setenv("DIVATTN_BACKEND", "triton")
    with pytest.raises(BackendError, match="backend='triton'"):
        divattn.temporal_attention(q, k, v)
    monkeypatch.setenv("DIVATTN_BACKEND", "torch")
    divattn.temporal_attention(q, k, v)
    monkeypatch.setenv("DIVATTN_BACKEND", "nope")
    with pytest.raises(BackendError, match="DIVATTN_BACKEND='nope' is not a backend"):
        divattn.temporal_attention(q, k, v)


def test_cpu_without_interpreter_is_refused_by_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(BackendError, match="CPU tensors run only under TRITON_INTERPRET=1"):
        divattn.temporal_attention(q, k, v, backend="triton")
    # auto-dispatch takes the next backend that fits, the reference
    assert dispatch.select("temporal", torch.float32, torch.device("cpu"), 8).name == "torch"


def test_bf16_in_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(BackendError, match="interpreter computes tl.dot wrongly for torch.bfloat16"):
        divattn.temporal_attention(q, k, v, backend="triton")


def test_a_tiny_scale_is_respected():
    """A scale near 0 means near-uniform attention (the default is used only for None)."""
    q, k, v = qkv()
    o = divattn.temporal_attention(q, k, v, scale=1e-30, backend="torch")
    torch.testing.assert_close(o, v.mean(1, keepdim=True).expand_as(v))


@pytest.mark.parametrize("scale", [0.0, -0.125, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_scale_must_be_finite_and_positive(scale, backend):
    q, k, v = qkv()
    for call in (lambda: divattn.temporal_attention(q, k, v, scale=scale, backend=backend),
                 lambda: divattn.spatial_attention(q, k, v, scale=scale, backend=backend),
                 lambda: divattn.joint_attention(q[:, 0], k[:, 0], v[:, 0], scale=scale, backend=backend)):
        with pytest.raises(ValueError, match=r"_attention: scale must be finite and positive, got "):
            call()


@pytest.mark.parametrize("scale", ["abc", "0.125", [0.125], torch.tensor(0.125), True])
def test_scale_must_be_a_number(scale):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"temporal_attention: scale must be a real number or None, got "):
        divattn.temporal_attention(q, k, v, scale=scale, backend="torch")


def test_numpy_and_int_scales_are_numbers():
    q, k, v = qkv()
    want = divattn.temporal_attention(q, k, v, scale=0.5, backend="torch")
    torch.testing.assert_close(divattn.temporal_attention(q, k, v, scale=np.float32(0.5), backend="torch"), want)
    torch.testing.assert_close(divattn.temporal_attention(q, k, v, scale=1, backend="torch"),
                               divattn.temporal_attention(q, k, v, scale=1.0, backend="torch"))


@pytest.mark.parametrize("cls_len", [0, 2, 4])
def test_cls_of_the_wrong_length_says_so(cls_len):
    q, k, v = qkv()
    B, _, _, H, D = q.shape
    cls = tuple(torch.randn(B, H, D) for _ in range(cls_len))
    with pytest.raises(ValueError, match=rf"spatial_attention: cls must hold three tensors \(q_cls, k_cls, v_cls\), "
                                         rf"got a tuple of {cls_len}"):
        divattn.spatial_attention(q, k, v, cls=cls, backend="torch")
    with pytest.raises(TypeError, match="spatial_attention: cls must be a tuple .* got Tensor"):
        divattn.spatial_attention(q, k, v, cls=torch.randn(3, B, H, D), backend="torch")
