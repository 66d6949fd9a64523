"""Padded batches: token masks and per-sample frame / patch counts in every op.

The fp64 reference defines the semantics (a padded token is never a key, its output row
and its q/k/v gradients are zero, an empty query row is zero and never NaN, the cls
output averages over the frames holding a real patch); a padded batch gives each
sample what the sample gives alone. The torch backend matches the reference in the
forward and every gradient on both its paths (the CPU flash kernel and the SDPA
composition), both token orders, causal temporal included, and so does every backend
that declares counts (triton, cuda) for the counts and a mask (cuda) for the mask;
backends that do not declare a form refuse it with the dispatcher's sentence."""

import dataclasses
import math


import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import divattn
from divattn import BackendError, flops
from divattn.ops import BACKENDS, dispatch, split_qkv, torch_backend

from ..conftest import DEVICE
from .cases import Case, assert_close_to_reference, make_views

MASKED = [name for name, be in BACKENDS.items() if "mask" in be.features and name != "reference"]
COUNTED = [name for name, be in BACKENDS.items() if "counts" in be.features and name != "reference"]
COUNT_FORMS = ("frames", "patches")  # the forms that reach a backend as counts; "mask" and "all" hold a mask


def _paths(names) -> list:
    """``names`` with the torch backend's second path: "torch" (the CPU flash kernel) and
    "torch-sdpa" (the SDPA composition that GPUs, torch.compile and torch.func run)."""
    return [p for n in names for p in ((n, "torch-sdpa") if n == "torch" else (n,))]


@pytest.fixture
def backend(request, monkeypatch) -> str:
    """The backend a test runs (parametrized indirectly with :func:`_paths`); "torch-sdpa"
    runs the torch backend with the flash kernel hidden."""
    if request.param == "torch-sdpa" or (request.param == "torch" and DEVICE.type != "cpu"):
        monkeypatch.setattr(torch_backend, "_FLASH", None)
    return request.param.removesuffix("-sdpa")


def _padding(form: str, case: Case, gen: torch.Generator) -> dict:
    """The op keyword arguments of one padding form for ``case``: counts from the
    generator (at least one sample fully real, one with padding), or a random mask."""
    B, T, N = case.B, case.T, case.N
    frames = [T] + torch.randint(0, T + 1, (B - 1,), generator=gen).tolist()
    patches = torch.randint(0, N + 1, (B,), generator=gen).tolist()
    mask = torch.rand(B, T, N, generator=gen) < 0.6
    if form == "frames":
        return dict(frames=frames)
    if form == "patches":
        return dict(patches=torch.tensor(patches))
    if form == "mask":
        return dict(mask=mask.to(DEVICE))
    return dict(mask=mask.to(DEVICE), frames=torch.tensor(frames), patches=patches)


def _joint_padding(form: str, case: Case, gen: torch.Generator) -> dict:
    B, L = case.B, int(case.layout in ("packed", "sliced")) + case.T * case.N
    if form == "frames":
        return dict(lengths=[L] + torch.randint(0, L + 1, (B - 1,), generator=gen).tolist())
    return dict(mask=(torch.rand(B, L, generator=gen) < 0.6).to(DEVICE))


def _fn(case: Case, kw_of, causal: bool = False, tq=None):
    """``fn(leaves, backend)`` running the case's op with the padding ``kw_of(case)``
    (the same for every backend and dtype: built once)."""
    kw = kw_of(case)

    def fn(leaves, backend):
        q, k, v, cls = make_views(case, leaves)
        if case.op == "joint":
            return (divattn.joint_attention(q, k, v, backend=backend, **kw),)
        if case.op == "temporal":
            q = q if tq is None else q[:, case.T - tq:]
            return (divattn.temporal_attention(q, k, v, causal=causal, backend=backend, **kw),)
        if case.op == "spatial":
            return (divattn.spatial_attention(q, k, v, backend=backend, **kw),)
        return divattn.spatial_attention(q, k, v, cls, backend=backend, **kw)
    return fn


C = Case
GRID = [
    C("temporal", 3, 8, 5, 2, 16, "hwt"),
    C("temporal", 3, 5, 7, 2, 24, "thw", "separate"),
    C("temporal", 2, 13, 3, 1, 16, "hwt", "transposed"),
    C("spatial", 3, 4, 9, 2, 16, "thw"),
    C("spatial", 3, 3, 13, 2, 24, "hwt", "sliced"),
    C("spatial_cls", 3, 5, 7, 2, 16, "hwt"),
    C("spatial_cls", 3, 4, 9, 1, 24, "thw", "expanded"),
    C("spatial_cls", 2, 3, 16, 2, 16, "hwt", "transposed"),
    C("joint", 3, 3, 7, 2, 16, "hwt"),
    C("joint", 2, 4, 5, 1, 24, "hwt", "separate"),
]
FORMS = ["frames", "patches", "mask", "all"]


@pytest.mark.parametrize("case, form, backend", [
    # joint attention takes a (B, L) mask or lengths (its "frames" form)
    pytest.param(c, f, b, id=f"{c.id}-{f}-{b}") for c in GRID for f in FORMS if c.op != "joint" or f in ("frames", "mask")
    for b in _paths(COUNTED if f in COUNT_FORMS else MASKED)], indirect=["backend"])
def test_matches_reference(case, form, backend):
    gen = torch.Generator().manual_seed(hash((case.id, form)) % 2**31)
    kw_of = _joint_padding if case.op == "joint" else _padding
    assert_close_to_reference(case, backend, torch.float32, fn=_fn(case, lambda c: kw_of(form, c, gen)))


# Sequences longer than the interpreter's 32-row Triton tile: its frame and long regimes,
# whose loops skip tiles of padding given as counts and read a mask per row.
LONG = [
    C("temporal", 2, 40, 2, 1, 16, "hwt"),
    C("spatial_cls", 2, 2, 40, 1, 16, "thw"),
    C("joint", 2, 3, 100, 1, 16, "hwt"),
]


@pytest.mark.parametrize("case, form, backend", [
    pytest.param(c, f, b, id=f"{c.id}-{f}-{b}") for c in LONG for f in ("frames", "mask", "all")
    if c.op != "joint" or f != "all" for b in _paths(COUNTED if f in COUNT_FORMS else MASKED)], indirect=["backend"])
def test_sequences_longer_than_a_tile_match_reference(case, form, backend):
    gen = torch.Generator().manual_seed(11)
    kw_of = _joint_padding if case.op == "joint" else _padding
    assert_close_to_reference(case, backend, torch.float32, fn=_fn(case, lambda c: kw_of(form, c, gen)))


CAUSAL = [  # (case, Tq, causal)
    (C("temporal", 3, 8, 5, 2, 16, "hwt"), 8, True),
    (C("temporal", 3, 8, 5, 2, 16, "thw", "separate"), 8, True),
    (C("temporal", 3, 7, 4, 2, 16, "thw"), 3, True),
    (C("temporal", 3, 7, 4, 1, 16, "hwt", "transposed"), 2, False),
]


@pytest.mark.parametrize("form, backend", [pytest.param(f, b, id=f"{f}-{b}") for f in ("frames", "mask")
                                           for b in _paths(COUNTED if f in COUNT_FORMS else MASKED)],
                         indirect=["backend"])
@pytest.mark.parametrize("case, tq, causal", [pytest.param(*c, id=f"{c[0].id}-Tq{c[1]}-{c[2]}") for c in CAUSAL])
def test_causal_and_fewer_queries_match_reference(case, tq, causal, form, backend):
    gen = torch.Generator().manual_seed(7)
    assert_close_to_reference(case, backend, torch.float32, fn=_fn(case, lambda c: _padding(form, c, gen), causal, tq))


@pytest.mark.parametrize("form, backend", [pytest.param(f, b, id=f"{f}-{b}") for f in ("frames", "mask")
                                           for b in _paths(COUNTED if f in COUNT_FORMS else MASKED)],
                         indirect=["backend"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in (GRID[0], GRID[5], GRID[8])])
def test_matches_reference_fp16(case, form, backend):
    gen = torch.Generator().manual_seed(3)
    kw_of = _joint_padding if case.op == "joint" else _padding
    assert_close_to_reference(case, backend, torch.float16, fn=_fn(case, lambda c: kw_of(form, c, gen)))


# The semantics, on the reference (which defines them) and on every masking backend ---------

def _qkv(B, T, N, H, D, order, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1 + N * T, 3, H, D, generator=gen, dtype=dtype).to(DEVICE)


@pytest.mark.parametrize("backend", ["reference", *COUNTED], indirect=True)
@pytest.mark.parametrize("order", ["hwt", "thw"])
@pytest.mark.parametrize("op", ["temporal", "causal", "spatial", "spatial_cls"])
def test_a_padded_batch_gives_each_sample_what_it_gives_alone(op, order, backend):
    """Samples of (T_b frames, N_b patches) padded to (T, N), with frames and patches:
    each sample's outputs and q/k/v gradients are those of the sample alone (its own
    qkv of 1 + N_b*T_b tokens), and the padding's are zero."""
    T, N, H, D = 6, 7, 2, 8
    sizes = [(6, 7), (4, 3), (1, 7), (2, 1)]
    B = len(sizes)
    dtype = torch.float64 if backend in ("reference", "torch") else torch.float32  # the kernels: fp32
    base = _qkv(B, T, N, H, D, order, dtype=dtype).requires_grad_(True)
    frames, patches = [t for t, _ in sizes], [n for _, n in sizes]
    causal = op == "causal"

    def run(qkv, Tb, Nb, kw):
        q, k, v, cls = split_qkv(qkv, Tb, Nb, order=order, has_cls=True)
        if op in ("temporal", "causal"):
            return [divattn.temporal_attention(q, k, v, causal=causal, backend=backend, **kw)], None
        if op == "spatial":
            return [divattn.spatial_attention(q, k, v, backend=backend, **kw)], None
        o, o_cls = divattn.spatial_attention(q, k, v, cls, backend=backend, **kw)
        return [o], o_cls

    outs, o_cls = run(base, T, N, dict(frames=frames, patches=patches))
    g = torch.randn(outs[0].shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    g_cls = torch.randn(B, H, D, dtype=dtype, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    loss = (outs[0] * g).sum() + (0 if o_cls is None else (o_cls * g_cls).sum())
    (grad,) = torch.autograd.grad(loss, base)
    q_full = split_qkv(base, T, N, order=order, has_cls=True)
    real = torch.zeros(B, T, N, dtype=torch.bool)
    for b, (Tb, Nb) in enumerate(sizes):
        real[b, :Tb, :Nb] = True
        # sample b alone: its real tokens gathered into a qkv of its own size
        alone = torch.cat([base[b:b + 1, :1], _gather(base[b:b + 1], q_full[0][b:b + 1], Tb, Nb, order)], 1)
        alone = alone.detach().requires_grad_(True)
        o_b, cls_b = run(alone, Tb, Nb, {})
        loss_b = (o_b[0] * g[b:b + 1, :Tb, :Nb]).sum() + (0 if cls_b is None else (cls_b * g_cls[b:b + 1]).sum())
        (grad_b,) = torch.autograd.grad(loss_b, alone)
        tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[0][b, :Tb, :Nb], o_b[0][0], **tol)
        if o_cls is not None:
            torch.testing.assert_close(o_cls[b], cls_b[0], **tol)
        torch.testing.assert_close(_gather(grad[b:b + 1], q_full[0][b:b + 1], Tb, Nb, order), grad_b[:, 1:], **tol)
        torch.testing.assert_close(grad[b, 0], grad_b[0, 0], **tol)  # the cls row's (zero without cls)
    assert (outs[0][~real.to(DEVICE)] == 0).all()
    tokens = real.transpose(1, 2).reshape(B, -1) if order == "hwt" else real.reshape(B, -1)
    assert (grad[:, 1:][~tokens.to(DEVICE)] == 0).all()


def _gather(qkv, q, Tb, Nb, order):
    """The tokens ``(1, Nb*Tb, ...)`` of frames ``< Tb`` and patches ``< Nb`` of a
    ``(1, 1 + N*T, ...)`` qkv (or its gradient) in ``order``, in that order."""
    T, N = q.shape[1], q.shape[2]
    p = qkv[:, 1:]
    if order == "hwt":
        return p.reshape(1, N, T, *p.shape[2:])[:, :Nb, :Tb].reshape(1, Nb * Tb, *p.shape[2:])
    return p.reshape(1, T, N, *p.shape[2:])[:, :Tb, :Nb].reshape(1, Nb * Tb, *p.shape[2:])


@pytest.mark.parametrize("form, backend", [pytest.param(f, b, id=f"{f}-{b}") for f in ("counts", "mask")
                                           for b in ["reference", *(COUNTED if f == "counts" else MASKED)]],
                         indirect=["backend"])
@pytest.mark.parametrize("op", ["temporal", "spatial_cls", "joint"])
def test_a_padded_token_is_never_a_key_and_nan_there_never_leaks(op, form, backend):
    """Padded tokens' q, k and v set to NaN (then to other numbers): the real outputs are
    the same and finite, the padded ones zero, and their gradients zero."""
    B, T, N, H, D = 2, 5, 6, 2, 8
    gen = torch.Generator().manual_seed(0)
    if form == "mask":
        real = torch.rand(B, T, N, generator=gen) < 0.6
        real[1, 2] = False  # a whole frame of padding
        kw = dict(mask=real.to(DEVICE))
    else:
        frames, patches = [5, 3], [4, 6]
        real = (torch.arange(T)[None, :, None] < torch.tensor(frames)[:, None, None]) & \
            (torch.arange(N)[None, None, :] < torch.tensor(patches)[:, None, None])
        kw = dict(frames=frames, patches=patches)
    tokens = torch.cat([torch.ones(B, 1, dtype=torch.bool), real.transpose(1, 2).reshape(B, -1)], 1)  # hwt
    if op == "joint" and form == "counts":  # joint counts: the first lengths[b] tokens are real
        lengths = [1 + N * T, 17]
        tokens = torch.arange(1 + N * T)[None, :] < torch.tensor(lengths)[:, None]
        kw = dict(lengths=lengths)
    elif op == "joint":
        kw = dict(mask=tokens.to(DEVICE))
    results = []
    for fill in (math.nan, 3.0):
        qkv = _qkv(B, T, N, H, D, "hwt", dtype=torch.float32)
        qkv[~tokens.to(DEVICE)] = fill
        qkv.requires_grad_(True)
        q, k, v, cls = split_qkv(qkv, T, N, order="hwt", has_cls=True)
        if op == "temporal":
            out = divattn.tokens_major(divattn.temporal_attention(q, k, v, **kw, backend=backend))
        elif op == "spatial_cls":
            out = divattn.ops.spatial_attention_tokens(q, k, v, cls, **kw, backend=backend).flatten(2)
        else:
            out = divattn.joint_attention(*qkv.unbind(2), **kw, backend=backend).flatten(2)
        (grad,) = torch.autograd.grad(out.sum(), qkv)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        patches = out[:, -T * N:]  # temporal attention's output has no cls row
        assert (patches[~tokens[:, 1:].to(DEVICE)] == 0).all()
        assert (grad[~tokens.to(DEVICE)] == 0).all()
        results.append((out, grad))
    # the torch backend computes inputs holding NaN on the reference path, the others on its kernels
    tol = dict(rtol=0, atol=0) if backend == "reference" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    torch.testing.assert_close(results[0][1], results[1][1], **tol)


@pytest.mark.parametrize("backend", ["reference", *COUNTED], indirect=True)
def test_a_sample_with_no_real_token(backend):
    """Allowed: its outputs are zero, o_cls is v_cls, and only v_cls gets a gradient (the
    upstream o_cls gradient); the other sample is unaffected."""
    B, T, N, H, D = 2, 3, 4, 2, 8
    qkv = _qkv(B, T, N, H, D, "thw", dtype=torch.float32).requires_grad_(True)
    q, k, v, cls = split_qkv(qkv, T, N, order="thw", has_cls=True)
    o, o_cls = divattn.spatial_attention(q, k, v, cls, frames=[T, 0], backend=backend)
    t = divattn.temporal_attention(q, k, v, patches=[N, 0], backend=backend)
    j = divattn.joint_attention(*qkv.unbind(2), lengths=[1 + N * T, 0], backend=backend)
    assert (o[1] == 0).all() and (t[1] == 0).all() and (j[1] == 0).all()
    torch.testing.assert_close(o_cls[1], cls[2][1], rtol=1e-6, atol=1e-6)  # the mean of T copies of v_cls
    g = torch.randn(B, H, D, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    (grad,) = torch.autograd.grad((o_cls * g).sum() + o.sum() + t.sum() + j.sum(), qkv)
    torch.testing.assert_close(grad[1, 0, 2], g[1], rtol=1e-6, atol=1e-6)
    assert (grad[1, 1:] == 0).all()  # the padded tokens'
    # the cls query and key: a softmax over the one cls key has zero derivative (to rounding)
    torch.testing.assert_close(grad[1, 0, :2], torch.zeros_like(grad[1, 0, :2]), rtol=0, atol=1e-6)
    assert (grad[0] != 0).any()


@pytest.mark.parametrize("backend", ["reference", *MASKED], indirect=True)
def test_counts_and_masks_combine_and_give_the_same_as_the_dense_mask(backend):
    B, T, N, H, D = 3, 4, 5, 2, 8
    dtype = torch.float64 if backend in ("reference", "torch") else torch.float32  # the kernels: fp32
    q, k, v, cls = split_qkv(_qkv(B, T, N, H, D, "hwt", dtype=dtype), T, N, order="hwt", has_cls=True)
    m = torch.rand(B, T, N, generator=torch.Generator().manual_seed(0)) < 0.7
    frames, patches = [4, 2, 3], [5, 5, 1]
    dense = m.clone()
    for b in range(B):
        dense[b, frames[b]:] = False
        dense[b, :, patches[b]:] = False
    a = divattn.spatial_attention(q, k, v, cls, mask=m.to(DEVICE), frames=frames, patches=patches, backend=backend)
    b = divattn.spatial_attention(q, k, v, cls, mask=dense.to(DEVICE), backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# Dispatch ------------------------------------------------------------------------------

def test_backends_refuse_a_padding_form_they_do_not_declare_with_the_dispatchers_sentence(monkeypatch):
    """A mask needs "mask", counts "counts"; a backend without the feature (here the kernel
    backends with it taken away) refuses with the dispatcher's sentence, and auto picks the
    first of triton, cuda, torch that declares it."""
    q, k, v, cls = split_qkv(_qkv(2, 3, 4, 2, 16, "hwt", dtype=torch.float32), 3, 4, order="hwt", has_cls=True)
    m = torch.ones(2, 3, 4, dtype=torch.bool, device=DEVICE)
    forms = {"mask": (dict(mask=m), "a padded batch given as a token mask"),
             "counts": (dict(frames=[3, 1]), "a padded batch given as per-sample frame, patch or token counts")}
    for be in ("triton", "cuda"):
        for feature, (kw, sentence) in forms.items():
            declared = BACKENDS[be]
            assert feature in declared.features
            monkeypatch.setitem(BACKENDS, be, dataclasses.replace(
                declared, features=tuple(f for f in declared.features if f != feature)))
            with pytest.raises(BackendError, match=rf"backend='{be}' cannot run temporal attention \({feature}\) "
                                                   rf".*\n(.*\n)*  {be}: .*{sentence} is not implemented"):
                divattn.temporal_attention(q, k, v, backend=be, **kw)
            monkeypatch.setitem(BACKENDS, be, declared)
    for feature, (kw, _) in forms.items():  # the first that declares the feature and runs here
        name = next(n for n in dispatch.AUTO_ORDER if feature in BACKENDS[n].features
                    and not BACKENDS[n].not_supported_reasons("spatial_cls", torch.float32, DEVICE, 16, (feature,)))
        assert dispatch.select("spatial_cls", torch.float32, DEVICE, 16, None, (feature,)).name == name
        o = divattn.spatial_attention(q, k, v, cls, **kw)
        torch.testing.assert_close(o[0], divattn.spatial_attention(q, k, v, cls, backend="reference", **kw)[0],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["temporal", "spatial", "spatial_cls", "joint"])
def test_unpadded_calls_are_unchanged(op, kernel_calls):
    """No padding argument: auto still picks a kernel backend (triton under the interpreter),
    and its output is what the padded path gives with every token real (the torch backend's),
    to fp32 rounding."""
    B, T, N, H, D = 2, 3, 4, 2, 16
    qkv = _qkv(B, T, N, H, D, "hwt", dtype=torch.float32)
    q, k, v, cls = split_qkv(qkv, T, N, order="hwt", has_cls=True)
    every = torch.ones(B, T, N, dtype=torch.bool, device=DEVICE)
    if op == "joint":
        xs = qkv[:, 1:].unbind(2)
        out = divattn.joint_attention(*xs)
        want = divattn.joint_attention(*xs, mask=every.flatten(1), backend="torch")
    elif op == "temporal":
        out = divattn.temporal_attention(q, k, v)
        want = divattn.temporal_attention(q, k, v, mask=every, backend="torch")
    else:
        c = cls if op == "spatial_cls" else None
        out = divattn.spatial_attention(q, k, v, c)
        want = divattn.spatial_attention(q, k, v, c, mask=every, backend="torch")
    assert kernel_calls == [op.removesuffix("_cls")]  # the kernel op of spatial attention with cls is "spatial"
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


# Bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, error, message", [
    (dict(mask=torch.ones(2, 3, 4)), TypeError, r"temporal_attention: mask must be a bool tensor \(True = real "
                                                 r"token\), got dtype torch.float32"),
    (dict(mask=torch.ones(2, 4, 3, dtype=torch.bool)), ValueError,
     r"temporal_attention: mask has shape \(2, 4, 3\), expected \(B, T, N\) = \(2, 3, 4\)"),
    (dict(mask=[[True]]), TypeError, r"mask must be a \(B, T, N\) bool tensor .* got list"),
    (dict(frames=[3, 4]), ValueError, r"temporal_attention: frames\[1\] = 4 is outside \[0, 3\] \(real frames of a "
                                      r"sample, of the 3 the inputs hold\)"),
    (dict(frames=[-1, 2]), ValueError, r"frames\[0\] = -1 is outside \[0, 3\]"),
    (dict(frames=[3]), ValueError, r"frames must have shape \(B,\) = \(2,\), one count per sample, got \(1,\)"),
    (dict(frames=torch.tensor([1.0, 2.0])), TypeError, r"frames must hold integers \(real frames per sample\), got "
                                                       r"dtype torch.float32"),
    (dict(patches=[4, 5]), ValueError, r"patches\[1\] = 5 is outside \[0, 4\] \(real patches per frame"),
    (dict(patches="ab"), TypeError, r"patches must be a \(B,\) integer tensor or a sequence of ints, got str"),
])
def test_bad_padding_is_named(kw, error, message):
    q, k, v = (torch.randn(2, 3, 4, 1, 8) for _ in range(3))
    with pytest.raises(error, match=message):
        divattn.temporal_attention(q, k, v, backend="torch", **kw)


def test_bad_joint_padding_is_named():
    q = torch.randn(2, 5, 1, 8)
    with pytest.raises(ValueError, match=r"joint_attention: mask has shape \(2, 4\), expected \(B, L\) = \(2, 5\)"):
        divattn.joint_attention(q, q, q, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"joint_attention: lengths\[0\] = 6 is outside \[0, 5\] \(real tokens"):
        divattn.joint_attention(q, q, q, lengths=[6, 1])


def test_fewer_queries_pad_the_key_frames():
    """With Tq < Tk the mask covers the Tk key frames (the queries are the last Tq)."""
    q, k, v = (torch.randn(2, 5, 3, 1, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"expected \(B, T, N\) = \(2, 5, 3\)"):
        divattn.temporal_attention(q[:, 3:], k, v, mask=torch.ones(2, 2, 3, dtype=torch.bool), backend="torch")
    o = divattn.temporal_attention(q[:, 3:], k, v, causal=True, frames=[4, 5], backend="torch")
    assert (o[0, 1] == 0).all() and (o[0, 0] != 0).any()


def test_export_refuses_padding_with_a_sentence():
    class M(torch.nn.Module):
        def forward(self, q):
            return divattn.temporal_attention(q, q, q, frames=[2, 1], backend="torch")

    with pytest.raises(BackendError, match="with a mask or counts cannot be exported yet"):
        torch.export.export(M(), (torch.randn(2, 3, 4, 1, 8),))


# FLOPs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", MASKED, indirect=True)
@pytest.mark.parametrize("op", ["temporal", "causal", "fewer", "spatial", "spatial_cls", "joint"])
def test_flop_counter_counts_the_real_pairs(op, backend):
    """FlopCounterMode on every backend that takes a mask counts, for a padded batch, what
    divattn.flops.attention_flops counts for the padding: the real pairs only, forward and
    backward (on a kernel backend, through its custom ops' formulas)."""
    B, T, N, H, D = 3, 5, 6, 2, 8
    qkv = _qkv(B, T, N, H, D, "hwt", dtype=torch.float32).requires_grad_(True)
    q, k, v, cls = split_qkv(qkv, T, N, order="hwt", has_cls=True)
    m = (torch.rand(B, T, N, generator=torch.Generator().manual_seed(0)) < 0.6).to(DEVICE)
    with FlopCounterMode(display=False) as counter:
        if op == "joint":
            lm = m.reshape(B, -1)
            out = divattn.joint_attention(*qkv[:, 1:].unbind(2), mask=lm, backend=backend)
            want = flops.attention_flops("joint", (B, T * N, H, D), "fwd+bwd", mask=lm)
            dense = flops.attention_flops("joint", (B, T * N, H, D), "fwd+bwd")
        elif op == "spatial_cls":
            out = divattn.ops.spatial_attention_tokens(q, k, v, cls, mask=m, backend=backend)
            want = flops.attention_flops("spatial_cls", q.shape, "fwd+bwd", mask=m)
            dense = flops.attention_flops("spatial_cls", q.shape, "fwd+bwd")
        elif op == "spatial":
            out = divattn.spatial_attention(q, k, v, frames=[5, 2, 0], patches=[6, 3, 6], backend=backend)
            want = flops.attention_flops("spatial", q.shape, "fwd+bwd", frames=[5, 2, 0], patches=[6, 3, 6])
            dense = flops.attention_flops("spatial", q.shape, "fwd+bwd")
        else:
            tq = 2 if op == "fewer" else T
            causal = op != "temporal"
            out = divattn.temporal_attention(q[:, T - tq:], k, v, causal=causal, mask=m, backend=backend)
            want = flops.attention_flops("temporal", (B, tq, N, H, D), "fwd+bwd", causal=causal, kv_frames=T, mask=m)
            dense = flops.attention_flops("temporal", (B, tq, N, H, D), "fwd+bwd", causal=causal, kv_frames=T)
        out.sum().backward()
    assert counter.get_total_flops() == want
    assert 0 < want < dense


def test_real_pairs_by_hand():
    m = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 0, 0]]], dtype=torch.bool)  # (B=1, T=3, N=3)
    # temporal: patch 0 has frames {0, 1} real (4 pairs), patch 1 frame {0} (1), patch 2 none
    assert flops.real_pairs("temporal", (1, 3, 3, 1, 8), mask=m) == 5
    # causal: patch 0: frame 0 sees 0, frame 1 sees 0, 1 -> 3 pairs; patch 1: 1
    assert flops.real_pairs("temporal", (1, 3, 3, 1, 8), mask=m, causal=True) == 4
    # spatial: frames of 2, 1, 0 real patches; with cls (1 + r)^2 for r > 0
    assert flops.real_pairs("spatial", (1, 3, 3, 1, 8), mask=m) == 4 + 1
    assert flops.real_pairs("spatial_cls", (1, 3, 3, 1, 8), mask=m) == 9 + 4
    assert flops.real_pairs("joint", (2, 6, 1, 8), patches=[6, 2]) == 36 + 4
    assert flops.attention_macs("spatial", (1, 3, 3, 2, 8), mask=m) == 2 * 2 * 5 * 8
    with pytest.raises(ValueError, match=r"frames\[0\] = 4 is outside \[0, 3\]"):
        flops.real_pairs("temporal", (1, 3, 3, 1, 8), frames=[4])


@pytest.mark.parametrize("backend", COUNTED, indirect=True)
@pytest.mark.parametrize("op", ["temporal", "causal", "fewer", "spatial", "spatial_cls", "joint"])
def test_flop_counter_counts_the_real_pairs_of_counts(op, backend):
    """Counts reach a kernel backend's custom ops as per-sequence counts: FlopCounterMode
    counts their real pairs, as divattn.flops does for the same counts, forward and backward."""
    B, T, N, H, D = 3, 5, 6, 2, 16
    qkv = _qkv(B, T, N, H, D, "hwt", dtype=torch.float32).requires_grad_(True)
    q, k, v, cls = split_qkv(qkv, T, N, order="hwt", has_cls=True)
    frames, patches = [5, 2, 0], [6, 3, 6]
    with FlopCounterMode(display=False) as counter:
        if op == "joint":
            lengths = [1 + T * N, 7, 0]
            out = divattn.joint_attention(*qkv.unbind(2), lengths=lengths, backend=backend)
            want = flops.attention_flops("joint", (B, 1 + T * N, H, D), "fwd+bwd", patches=lengths)
            dense = flops.attention_flops("joint", (B, 1 + T * N, H, D), "fwd+bwd")
        elif op in ("spatial", "spatial_cls"):
            c = cls if op == "spatial_cls" else None
            out = divattn.ops.spatial_attention_tokens(q, k, v, c, frames=frames, patches=patches, backend=backend) \
                if c is not None else divattn.spatial_attention(q, k, v, frames=frames, patches=patches, backend=backend)
            want = flops.attention_flops(op, q.shape, "fwd+bwd", frames=frames, patches=patches)
            dense = flops.attention_flops(op, q.shape, "fwd+bwd")
        else:
            tq = 2 if op == "fewer" else T
            causal = op != "temporal"
            out = divattn.temporal_attention(q[:, T - tq:], k, v, causal=causal, frames=frames, patches=patches,
                                             backend=backend)
            kw = dict(causal=causal, kv_frames=T)
            want = flops.attention_flops("temporal", (B, tq, N, H, D), "fwd+bwd", frames=frames, patches=patches, **kw)
            dense = flops.attention_flops("temporal", (B, tq, N, H, D), "fwd+bwd", **kw)
        out.sum().backward()
    assert counter.get_total_flops() == want
    assert 0 < want < dense
