"""ONNX translations of the divattn custom ops, as onnxscript functions (opset 18).

torch.onnx's dynamo exporter calls each function with the op's inputs as ONNX values
and its other arguments as Python values, and records the ONNX nodes it makes.

``divattn::attention`` (:mod:`divattn.ops.exported`) becomes the attention it computes,
in standard operators: ``MatMul`` of q and the transposed keys, ``Mul`` by the scale,
``Softmax`` over the keys (a ``Where`` sets the keys a causal query may not see to
-inf), ``MatMul`` with the values. q, k and v reach it as logical ``(B, T, N, H, D)``
tensors; each is transposed so that the attended dim is second-to-last (temporal:
``(B, N, H, T, D)``, spatial: ``(B, T, H, N, D)``) and the MatMuls batch over all the
other dims as they are: no reshape to a ``(B·N, T, ·)`` or ``(B·T, N, ·)`` batch, no
repeat. The output is transposed back into q's token order and reshaped into the token
buffer.

What is a copy. ONNX values have no strides, so where the op reads q/k/v in place the
graph moves data; in onnxruntime every ``Transpose``, ``Slice``, ``Split`` and ``Concat``
writes a new tensor (a ``Reshape`` or ``Squeeze`` does not). Per attention onnxruntime
runs: the model's own ``Slice`` of the patch tokens where a cls token leads (one copy of
the qkv rows), its ``Split`` into q, k and v (one copy), one ``Transpose`` of each of q,
k and v (its graph optimiser merges the model's transpose of the (h w t) view into this
one, and folds the scale into its fused MatMul), and one ``Transpose`` of the output.
That is about the traffic of the official code's rearrange and permute copies, which the
fused kernels avoid and no ONNX opset can: it has no strided views. The opset-23
``Attention`` operator is not used: torch.onnx exports opset 20 unless told otherwise (an
opset-23 node then fails its conversion), and it would need the same copies, since it
takes q, k and v with one batch dim.

With a cls token every frame's keys and values are ``[cls] + its N patches``: the cls key
and value are broadcast to every frame and concatenated in front of the patches (one
copy of k and v, as the torch backend makes); the patch queries and the cls query (also
broadcast to every frame) attend to them in two MatMul pairs, and the mean over frames of
the cls query's outputs is concatenated in front of the patch outputs (one copy of the
output). fp16 / bf16 inputs are computed in fp32 and the output cast back, as the torch
backend does on a CPU.

``divattn::add_after_first`` (:func:`divattn.layers.divided.add_after_first`) becomes a
``Pad`` of the residual by one zero token in front and an ``Add``.
"""

from __future__ import annotations

from onnxscript import ir
from onnxscript import opset18 as op

_LOW_PRECISION = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _ints(values) -> ir.Value:
    return op.Constant(value_ints=list(values))


def _dims(x, start: int, end: int):
    """Dims ``start:end`` of ``x`` as a 1-D int64 tensor (a constant when they are static)."""
    return op.Shape(x, start=start, end=end)


def _transpose(x, perm):
    return x if list(perm) == list(range(len(perm))) else op.Transpose(x, perm=list(perm))


def _attend(q, k, v, scale: float, rank: int, keep=None):
    """``softmax(q @ k^T * scale) @ v`` over the second-to-last dim of rank-``rank`` ``(..., L, D)``
    values; ``keep`` (bool, broadcast against the scores) marks the pairs that count."""
    swap = [*range(rank - 2), rank - 1, rank - 2]
    s = op.Mul(op.MatMul(q, op.Transpose(k, perm=swap)), op.CastLike(op.Constant(value_float=scale), q))
    if keep is not None:
        s = op.Where(keep, s, op.CastLike(op.Constant(value_float=float("-inf")), s))
    return op.MatMul(op.Softmax(s, axis=-1), v)


def _causal_keep(q, k):
    """``(Tq, Tk)`` bool: query frame i (frame ``Tk - Tq + i``) sees key frames ``<= Tk - Tq + i``."""
    tq, tk = (op.Squeeze(_dims(x, 1, 2), _ints([0])) for x in (q, k))
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    rows = op.Add(op.Unsqueeze(op.Range(zero, tq, one), _ints([1])), op.Sub(tk, tq))
    return op.LessOrEqual(op.Unsqueeze(op.Range(zero, tk, one), _ints([0])), rows)


def _tokens(o, perm, q):
    """The ``(B, [..], H, D)``-shaped ``o`` transposed by ``perm`` to ``(B, a, b, H, D)`` and
    reshaped to the ``(B, a*b, H, D)`` token buffer."""
    o = _transpose(o, perm)
    return op.Reshape(o, op.Concat(_dims(q, 0, 1), _ints([-1]), _dims(q, 3, 5), axis=0))


def attention(q, k, v, q_cls, k_cls, v_cls, op_name: str, order: str, scale: float, causal: bool, backend: str):
    """``divattn::attention``: the token buffer of one divided attention op (module docstring)."""
    dtype = q.dtype
    cls = [] if q_cls is None else [q_cls, k_cls, v_cls]
    if dtype in _LOW_PRECISION:
        q, k, v = (op.Cast(x, to=ir.DataType.FLOAT) for x in (q, k, v))
        cls = [op.Cast(x, to=ir.DataType.FLOAT) for x in cls]
    if op_name == "joint":
        # (B, L, H, D) -> (B, H, L, D)
        o = _transpose(_attend(*(op.Transpose(x, perm=[0, 2, 1, 3]) for x in (q, k, v)), scale, 4), [0, 2, 1, 3])
    elif op_name == "temporal":
        # (B, T, N, H, D) -> (B, N, H, T, D): one sequence of T frames per (b, n, h)
        seq = [op.Transpose(x, perm=[0, 2, 3, 1, 4]) for x in (q, k, v)]
        o = _attend(*seq, scale, 5, _causal_keep(q, k) if causal else None)
        # (B, N, H, T, D) -> (B, N, T, H, D) in (h w t) order, (B, T, N, H, D) in (t h w)
        o = _tokens(o, [0, 1, 3, 2, 4] if order == "hwt" else [0, 3, 1, 2, 4], q)
    else:
        # (B, T, N, H, D) -> (B, T, H, N, D): one sequence of N patches per (b, t, h)
        seq = [op.Transpose(x, perm=[0, 1, 3, 2, 4]) for x in (q, k, v)]
        if cls:
            # (B, H, D) -> (B, T, H, 1, D): the cls query, key and value in every frame
            frames = op.Concat(_ints([1]), _dims(q, 1, 2), _ints([1, 1, 1]), axis=0)
            q_cls, k_cls, v_cls = (op.Expand(op.Unsqueeze(c, _ints([1, 3])), frames) for c in cls)
            # every frame's keys and values: [cls] + its N patches
            keys, values = (op.Concat(c, x, axis=3) for c, x in ((k_cls, seq[1]), (v_cls, seq[2])))
            o = _attend(seq[0], keys, values, scale, 5)
            # the cls query's per-frame outputs, averaged over frames: (B, T, H, 1, D) -> (B, 1, H, D)
            o_cls = op.ReduceMean(_attend(q_cls, keys, values, scale, 5), _ints([1]), keepdims=0)
            o_cls = op.Transpose(o_cls, perm=[0, 2, 1, 3])
        else:
            o = _attend(*seq, scale, 5)
        # (B, T, H, N, D) -> (B, N, T, H, D) in (h w t) order, (B, T, N, H, D) in (t h w)
        o = _tokens(o, [0, 3, 1, 2, 4] if order == "hwt" else [0, 1, 3, 2, 4], q)
        if cls:
            o = op.Concat(o_cls, o, axis=1)
    if dtype in _LOW_PRECISION:
        o = op.Cast(o, to=dtype)
    return o


def add_after_first(x, res):
    """``divattn::add_after_first``: ``x`` ``(B, 1 + L, ...)`` plus ``res`` ``(B, L, ...)``
    on every token but the first, as ``x + pad(res)`` with one zero token in front."""
    rank = len(x.shape)
    pads = [0, 1] + [0] * (rank - 2) + [0] * rank
    return op.Add(x, op.Pad(res, _ints(pads)))
