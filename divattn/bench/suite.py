"""One benchmark case, from inputs to record; shared by ``pytest benchmarks/`` and ``divattn bench``.

A :class:`Case` is a provider, an op (``temporal``, ``spatial``, ``spatial_cls``,
``joint``, or ``model``), a pass (``fwd``, ``fwd+bwd``, ``train_step``), a shape, a
dtype and a device. A ragged shape (:class:`~divattn.shapes.RaggedShape`) takes the
padded-batch providers of :mod:`divattn.bench.ragged`. :func:`prepare` builds the
callable to time and its FLOP and byte counts (raising
:class:`~divattn.bench.providers.Unavailable` with the provider's reason), and :func:`run`
times it and returns a record.
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .. import flops as flop_model
from . import ragged, records, timing
from .providers import MODEL_BACKENDS, PROVIDERS, Unavailable, model_reason
from .roofline import Peaks, roofline
from ..shapes import AttnShape, ModelShape, RaggedShape

ATTENTION_PASSES = ("fwd", "fwd+bwd")
MODEL_PASSES = ("train_step",)


@dataclass(frozen=True)
class Case:
    provider: str
    op: str
    pass_: str
    shape: Union[AttnShape, ModelShape]
    dtype: torch.dtype
    device: torch.device

    @property
    def id(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.shape.name}-B{self.shape.B}-{self.op}-{self.pass_}-{dtype}-{self.provider}"

    @property
    def ours(self) -> bool:
        found = (ragged.PROVIDERS if isinstance(self.shape, RaggedShape) else PROVIDERS).get(self.provider)
        return found is not None and found.ours


@dataclass
class Prepared:
    fn: Callable[[], object]
    flops: int
    bytes: int
    existing: list = field(default_factory=list)
    attention_flops: Optional[int] = None
    # Compiled code does not run under the CPU memory tracker (a dispatch mode).
    trackable: bool = True


def _attention(case: Case) -> Prepared:
    shape, op = case.shape, case.op
    padded_batch = isinstance(shape, RaggedShape)
    provider = (ragged.PROVIDERS if padded_batch else PROVIDERS)[case.provider]
    why = provider.why_not(op, case.pass_, case.device, case.dtype, shape)
    if why:
        raise Unavailable(why)
    gen = torch.Generator(device=case.device).manual_seed(0)
    qkv = torch.randn(shape.B, shape.tokens, 3, shape.H, shape.D, device=case.device, dtype=case.dtype, generator=gen)
    fn = provider.build(op, shape, case.device)
    q_shape = shape.q_shape(op)
    itemsize = qkv.element_size()
    if case.pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(qkv)
        existing = [qkv]
    else:
        qkv.requires_grad_(True)
        grad = torch.randn_like(fn(qkv))

        def call():
            return torch.autograd.grad(fn(qkv), qkv, grad)
        existing = [qkv, grad]
    if padded_batch:
        return Prepared(call, *ragged.useful_work(op, shape, case.pass_, itemsize), existing)
    causal = op == "temporal" and shape.causal
    return Prepared(call, flop_model.attention_flops(op, q_shape, case.pass_, causal=causal),
                    flop_model.attention_bytes(op, q_shape, itemsize, case.pass_), existing,
                    trackable=not provider.compiles)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def _model(case: Case) -> Prepared:
    """A training step of a bundled model: forward under autocast (fp16/bf16; fp32 is
    plain), cross-entropy, backward, AdamW step. Parameters stay fp32."""
    from ..models import create_model

    shape = case.shape
    kwargs = {**shape.kwargs, "backend": MODEL_BACKENDS[case.provider]}
    with torch.device("meta"):
        c = create_model(shape.model, **kwargs).config
    why = model_reason(case.provider, case.device, case.dtype, c.embed_dim // c.num_heads)
    if why:
        raise Unavailable(why)
    model = create_model(shape.model, **kwargs).to(case.device).train()
    gen = torch.Generator(device=case.device).manual_seed(0)
    video_shape = shape.video_shape(c.in_chans)
    video = torch.randn(video_shape, device=case.device, generator=gen)
    labels = torch.randint(0, max(1, c.num_classes), (shape.B,), device=case.device, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(case.device, case.dtype):
            loss = F.cross_entropy(model(video), labels)
        loss.backward()
        opt.step()

    step()  # creates the optimizer state, so the memory count below sees it as existing
    params = list(model.parameters())
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    # A lower bound on the traffic: weights read in forward and backward, gradients
    # written, AdamW reading weight, gradient and two moments and writing three; the
    # clip read once. Activations are not counted, so the floor is the matmul time.
    nbytes = 10 * param_bytes + video.numel() * video.element_size()
    count = flop_model.count_macs(model, video_shape, implementation="bundled")
    attention = flop_model.MacCount(attention=count.attention).train_step_flops()
    return Prepared(step, count.train_step_flops(), nbytes, [*params, *state, video, labels], attention)


def prepare(case: Case) -> Prepared:
    if case.op == "model":
        if case.provider not in MODEL_BACKENDS:
            raise Unavailable(model_reason(case.provider, case.device, case.dtype, 64))
        return _model(case)
    known = ragged.PROVIDERS if isinstance(case.shape, RaggedShape) else PROVIDERS
    if case.provider not in known:
        raise ValueError(f"unknown provider {case.provider!r}; choose from {', '.join(known)}")
    return _attention(case)


def _error_text(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" (at {last[0].name}, line {last[0].lineno})" if last else ""
    text = " ".join(str(e).split())[:500]
    return f"{type(e).__name__}: {text}{where}"


Measure = Callable[[Callable[[], object], torch.device, timing.Budget], Optional[timing.Timing]]


def freeze_heap() -> None:
    """Leave the objects alive now (modules, the test session) out of the ``gc.collect()``
    each case ends with (:func:`gc.freeze`): it then scans what the cases made, not the
    whole heap (126 ms a case with torch and transformers imported, 4 ms frozen). Once
    frozen, each case freezes what outlives it too (the modules and caches its provider
    brought in: 150 ms a case again otherwise). :func:`thaw_heap` undoes it, so that the
    interpreter frees those objects at exit."""
    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    gc.unfreeze()


def run(case: Case, env: dict, peaks: Optional[Peaks], budget: Optional[timing.Budget] = None,
        measure: Measure = timing.measure) -> Optional[dict]:
    """Time ``case`` and return its record (status ok, unavailable or error).

    ``measure(fn, device, budget)`` returns a :class:`~divattn.bench.timing.Timing`, or
    None when timing is switched off (then no record: None is returned).
    """
    budget = budget or timing.Budget.for_device(case.device)
    common = dict(provider=case.provider, op=case.op, pass_=case.pass_, shape=case.shape.as_dict(), dtype=case.dtype)
    if peaks is not None:
        common.update(peak_copy_gbps=peaks.copy_gbps, peak_matmul_tflops=peaks.matmul_tflops)
    prepared = None
    try:
        prepared = prepare(case)
        t = measure(prepared.fn, case.device, budget)
        if t is None:
            return None
        if prepared.trackable or case.device.type == "cuda":
            mem, method = timing.peak_memory_mb(prepared.fn, case.device, prepared.existing)
        else:
            mem, method = None, "not measured: compiled code does not run under the CPU tracker"
        n_flops, n_bytes, n_attention = prepared.flops, prepared.bytes, prepared.attention_flops
    except Unavailable as e:
        return records.make(env, status="unavailable", error=str(e), **common)
    except Exception as e:  # recorded as this provider's failure; the caller decides whether it is a bug
        return records.make(env, status="error", error=_error_text(e), **common)
    finally:
        del prepared
        gc.collect()
        if gc.get_freeze_count():  # the caller froze the heap (freeze_heap): keep what outlives the case out too
            gc.freeze()
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    rates = roofline(peaks, n_flops, n_bytes, t.median_ms)
    return records.make(env, median_ms=t.median_ms, min_ms=t.min_ms, max_ms=t.max_ms, rounds=t.rounds,
                        inner=t.inner, spread=round(t.spread, 4), probe_ms=t.probe_ms, attempts=1, flops=n_flops,
                        bytes=n_bytes, attention_flops=n_attention, peak_mem_mb=mem,
                        peak_mem_method=method,
                        **rates, **common)


def retime(timed: list, env: dict, peaks_for: Callable, budget: timing.Budget, measure: Measure = timing.measure,
           max_attempts: int = 3) -> int:
    """Time the disturbed cases among ``timed`` (``(case, record)`` pairs, see
    :func:`divattn.bench.timing.disturbed`) again, most disturbed first, while
    ``budget.retime_s`` lasts, up to ``max_attempts`` timings a case. A record takes the
    new timing when its median is lower (whatever slowed the first down is gone, or less
    of it), and counts its attempts. Returns how many timings ran.
    """
    deadline = time.perf_counter() + budget.retime_s
    ran = 0
    while True:
        probes = [rec["probe_ms"] for _, rec in timed if rec["status"] == "ok" and rec["probe_ms"]]
        best = min(probes) if probes else None
        todo = sorted(((case, rec) for case, rec in timed if rec["status"] == "ok" and rec["attempts"] < max_attempts
                       and timing.disturbed(rec["spread"], rec["probe_ms"], best)),
                      key=lambda item: -timing.disturbance(item[1]["spread"], item[1]["probe_ms"], best))
        if not todo or time.perf_counter() >= deadline:
            return ran
        for case, rec in todo:
            if time.perf_counter() >= deadline:
                return ran
            new = run(case, env, peaks_for(case.dtype), budget, measure)
            ran += 1
            attempts = rec["attempts"] + 1
            if new is not None and new["status"] == "ok" and new["median_ms"] < rec["median_ms"]:
                rec.update(new)
            rec["attempts"] = attempts
