"""Reading scenic (google-research/scenic, Flax) ViViT checkpoints without JAX.

A scenic checkpoint file is what ``flax.training.checkpoints.save_checkpoint`` writes
(its msgpack format, ``flax.serialization.to_bytes`` of the train state): a msgpack
map whose arrays are ext type 1 holding a msgpack-packed ``(shape, dtype name, raw C
order bytes)``, ext type 3 a numpy scalar packed the same way, ext type 2 a complex
number ``(real, imag)``; lists and tuples are maps with string-integer keys; arrays
over 1 GiB are split into ``{"__msgpack_chunked_array__": True, "shape": ...,
"chunks": {"0": ..., ...}}``. :func:`read_flax_msgpack` reads that with the ``msgpack``
package alone; :func:`scenic_params` finds the parameters inside the train state
(``params``, or ``optimizer.target`` in the checkpoints released with the paper);
:func:`scenic_to_divattn` renames them to the bundled :class:`~divattn.models.ViViT`'s
state dict. :func:`scenic_checkpoint` does all three for
:meth:`ViViT.convert_checkpoint <divattn.models.ViViT.convert_checkpoint>`, so
:func:`divattn.models.load_checkpoint` reads such a file or tree.

Layouts (Flax -> torch): ``Dense`` kernels ``(in, out)`` -> ``weight`` ``(out, in)``;
attention ``query`` / ``key`` / ``value`` kernels ``(in, heads, head_dim)`` and biases
``(heads, head_dim)`` -> one fused ``qkv`` ``(3 * heads * head_dim, in)``, rows
``[q; k; v]``, heads contiguous; ``out`` kernel ``(heads, head_dim, out)`` -> ``proj``;
``Conv`` ``(t, h, w, in, out)`` -> ``Conv3d`` ``(out, in, t, h, w)`` (a 2-D
``(h, w, in, out)`` kernel, scenic's ``temporal_sampling`` embedding, becomes a
one-frame tubelet); ``LayerNorm`` ``scale`` -> ``weight``.

Names (scenic -> bundled), per variant:

- models 1, 3, 4 (``ViViT``): ``embedding`` -> ``patch_embed.proj``, ``cls`` ->
  ``cls_token``, ``Transformer/posembed_input/pos_embedding`` -> ``pos_embed``,
  ``Transformer/encoderblock_<i>`` -> ``blocks.<i>``, ``Transformer/encoder_norm`` ->
  ``norm``;
- model 2 (``SpaceTimeViViT``): ``SpatialTransformer`` -> ``blocks``, ``pos_embed``,
  ``spatial_norm``, ``cls_SpatialTransformer`` -> ``cls_token``;
  ``TemporalTransformer`` -> ``temporal_blocks``, ``temporal_pos_embed``, ``norm``,
  ``cls_TemporalTransformer`` -> ``temporal_cls_token``;
- in a block: ``LayerNorm_0`` / ``MultiHeadDotProductAttention_0`` / ``LayerNorm_1`` /
  ``MlpBlock_0/Dense_{0,1}`` -> ``norm1`` / ``attn`` / ``norm2`` / ``mlp.fc{1,2}``;
  model 3: ``LayerNorm_space`` / ``MultiHeadDotProductAttention_space`` ->
  ``norm1`` / ``attn``, ``LayerNorm_time`` / ``MultiHeadDotProductAttention_time`` ->
  ``temporal_norm1`` / ``temporal_attn``, ``LayerNorm_mlp`` / ``MlpBlock`` ->
  ``norm2`` / ``mlp``;
- ``pre_logits`` -> ``pre_logits.fc``, ``output_projection`` -> ``head``.

Model 4's head order needs no permutation: the bundled block gives heads
``[0, H/2)`` to time and ``[H/2, H)`` to space, as scenic does. Model 1 pooled by
``gap`` / ``gmp`` / ``gsp`` and model 4 have the same parameters, so such a checkpoint
cannot tell which of them it is: build the model with the variant (and classifier,
``representation_size``, model 2's temporal depth / heads / MLP width) it was trained
with; anything else that differs is named by the strict load.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .checkpoint import CheckpointMismatchError, ConvertedCheckpoint

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
_DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64, "bool": torch.bool,
    "complex64": torch.complex64, "complex128": torch.complex128,
}


class ScenicCheckpointError(RuntimeError):
    """A file or tree that is not a readable scenic / Flax msgpack checkpoint."""


@dataclass(frozen=True)
class FlaxArray:
    """One array of a Flax msgpack checkpoint, kept as its bytes until :meth:`tensor` is called.

    ``shape`` and ``dtype`` (numpy's dtype name, e.g. ``"float32"``, ``"bfloat16"``)
    as Flax wrote them; ``data`` the C-order little-endian bytes; ``scalar`` True for a
    numpy scalar (ext type 3) rather than an array.
    """

    shape: tuple
    dtype: str
    data: bytes
    scalar: bool = False

    def tensor(self) -> torch.Tensor:
        """The array as a CPU tensor (a copy). ScenicCheckpointError for a dtype torch lacks."""
        if self.dtype not in _DTYPES:
            raise ScenicCheckpointError(f"array of dtype {self.dtype!r} (shape {self.shape}) has no torch dtype")
        dtype = _DTYPES[self.dtype]
        count = 1
        for n in self.shape:
            count *= n
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(self.data) != count * itemsize:
            raise ScenicCheckpointError(f"array {self.shape} {self.dtype} holds {len(self.data)} bytes, "
                                        f"expected {count * itemsize}")
        if count == 0:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape)


def _ext_hook(code: int, data: bytes):
    import msgpack

    if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
        shape, dtype, buffer = msgpack.unpackb(data, raw=True)
        dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
        return FlaxArray(tuple(shape), dtype, bytes(buffer), scalar=code == _EXT_NPSCALAR)
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _unchunk(node: dict) -> FlaxArray:
    shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
    chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
    if not chunks or not all(isinstance(c, FlaxArray) for c in chunks):
        raise ScenicCheckpointError("a chunked array whose chunks are not arrays")
    return FlaxArray(shape, chunks[0].dtype, b"".join(c.data for c in chunks))


def _unchunk_tree(node):
    if isinstance(node, dict):
        if node.get(_CHUNKED) is True:
            return _unchunk(node)
        return {k: _unchunk_tree(v) for k, v in node.items()}
    return node


def is_flax_msgpack_file(path: Union[str, os.PathLike]) -> bool:
    """True when the file starts like a msgpack map (what Flax writes for a train state),
    not like a ``torch.save`` zip archive or pickle."""
    with open(path, "rb") as f:
        head = f.read(1)
    return bool(head) and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


def read_flax_msgpack(source: Union[str, os.PathLike, bytes]) -> dict:
    """The tree of a Flax msgpack checkpoint (a path or its bytes), with :class:`FlaxArray` leaves.

    Reads what ``flax.serialization.msgpack_serialize`` / ``to_bytes`` (and so the
    legacy ``flax.training.checkpoints.save_checkpoint``) write; chunked arrays are
    joined. Needs the ``msgpack`` package, not JAX.
    """
    try:
        import msgpack
    except ImportError as e:  # pragma: no cover - msgpack is a dependency
        raise ImportError("reading scenic / Flax checkpoints needs the msgpack package: pip install msgpack") from e
    if isinstance(source, (str, os.PathLike)):
        if os.path.isdir(source):
            raise ScenicCheckpointError(
                f"{os.fspath(source)} is a directory: pass the checkpoint file inside it (scenic writes "
                f"checkpoint_<step>); Orbax checkpoint directories are not read")
        with open(source, "rb") as f:
            source = f.read()
    try:
        tree = msgpack.unpackb(source, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as e:
        raise ScenicCheckpointError(f"not a Flax msgpack checkpoint: {e}") from e
    if not isinstance(tree, dict):
        raise ScenicCheckpointError(f"not a Flax checkpoint: its top level is a {type(tree).__name__}, not a map")
    return _unchunk_tree(tree)


_PARAM_ROOTS = ("embedding", "Transformer", "SpatialTransformer")


def _is_params(node) -> bool:
    return isinstance(node, Mapping) and any(isinstance(node.get(k), Mapping) for k in _PARAM_ROOTS)


def scenic_params(tree: Mapping) -> Optional[Mapping]:
    """The ViViT parameter tree inside a restored scenic train state, or None.

    Looks in ``params`` (scenic's ``TrainState``), ``optimizer.target`` (the
    ``flax.optim`` train state of the released checkpoints) and ``target``, or takes
    ``tree`` itself when it holds ``embedding`` / ``Transformer`` /
    ``SpatialTransformer``.
    """
    node = tree
    for _ in range(4):
        if _is_params(node):
            return node
        if not isinstance(node, Mapping):
            return None
        if isinstance(node.get("params"), Mapping):
            node = node["params"]
        elif isinstance(node.get("optimizer"), Mapping) and isinstance(node["optimizer"].get("target"), Mapping):
            node = node["optimizer"]["target"]
        elif isinstance(node.get("target"), Mapping):
            node = node["target"]
        else:
            return None
    return None


def _flatten(node: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def _tensor(value, path: str) -> torch.Tensor:
    if isinstance(value, FlaxArray):
        return value.tensor()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        import numpy as np

        return torch.as_tensor(np.asarray(value))
    except Exception as e:
        raise ScenicCheckpointError(f"{path}: a {type(value).__name__}, not an array") from e


_ENCODERS = {
    "Transformer": ("blocks", "pos_embed", "norm"),
    "SpatialTransformer": ("blocks", "pos_embed", "spatial_norm"),
    "TemporalTransformer": ("temporal_blocks", "temporal_pos_embed", "norm"),
}
_BLOCK_MODULES = {
    "LayerNorm_0": "norm1", "LayerNorm_1": "norm2", "MultiHeadDotProductAttention_0": "attn", "MlpBlock_0": "mlp",
    "LayerNorm_space": "norm1", "MultiHeadDotProductAttention_space": "attn",
    "LayerNorm_time": "temporal_norm1", "MultiHeadDotProductAttention_time": "temporal_attn",
    "LayerNorm_mlp": "norm2", "MlpBlock": "mlp",
}
_TOP = {"cls": "cls_token", "cls_SpatialTransformer": "cls_token", "cls_TemporalTransformer": "temporal_cls_token"}
_DENSE = {"pre_logits": "pre_logits.fc", "output_projection": "head", "embedding": "patch_embed.proj"}
_LEAF = re.compile(r"^(?P<enc>Transformer|SpatialTransformer|TemporalTransformer)/(?:"
                   r"posembed_input/pos_embedding|encoder_norm/(?P<norm>scale|bias)|"
                   r"encoderblock_(?P<i>\d+)/(?P<mod>[A-Za-z]+_(?:\d+|space|time|mlp)|MlpBlock)/(?P<rest>.+))$")
_QKV = ("query", "key", "value")


@dataclass
class ScenicConversion:
    """What :func:`scenic_to_divattn` made: ``state_dict`` (bundled keys; leaves it could not
    place keep their scenic path), ``names`` (bundled key -> scenic path(s) it came from),
    ``problems`` (sentences about parameters whose layout does not fit the model)."""

    state_dict: dict
    names: dict
    problems: list


def _kernel(t: torch.Tensor) -> torch.Tensor:
    """Dense ``(in, out)`` -> Linear ``(out, in)``; Conv ``(t, h, w, in, out)`` -> Conv3d
    ``(out, in, t, h, w)``; 2-D Conv ``(h, w, in, out)`` -> ``(out, in, 1, h, w)``."""
    if t.dim() == 2:
        return t.t().contiguous()
    if t.dim() == 5:
        return t.permute(4, 3, 0, 1, 2).contiguous()
    if t.dim() == 4:
        return t.permute(3, 2, 0, 1).unsqueeze(2).contiguous()
    return t


def _module_heads(model: nn.Module, name: str) -> Optional[int]:
    try:
        return getattr(model.get_submodule(name), "num_heads", None)
    except AttributeError:
        return None


def scenic_to_divattn(params: Mapping, model: nn.Module) -> ScenicConversion:
    """Rename a scenic ViViT parameter tree (see the module docstring) to ``model``'s keys.

    ``params`` is the tree :func:`scenic_params` returns (leaves :class:`FlaxArray`,
    numpy or JAX arrays, or tensors). The attention kernels' head counts are checked
    against ``model``'s modules (``problems`` names each that differs). Leaves no rule
    knows keep their scenic path, so a strict load names them.
    """
    flat = _flatten(params)
    sd, names, problems = {}, {}, []
    attn_parts: dict = {}

    def put(key: str, value: torch.Tensor, path) -> None:
        sd[key] = value
        names[key] = path

    for path, value in flat.items():
        top, _, rest = path.partition("/")
        if path in _TOP:
            put(_TOP[path], _tensor(value, path), path)
            continue
        if top in _DENSE and rest in ("kernel", "bias"):
            t = _tensor(value, path)
            put(f"{_DENSE[top]}.{'weight' if rest == 'kernel' else 'bias'}", _kernel(t) if rest == "kernel" else t,
                path)
            continue
        m = _LEAF.match(path)
        if m is None:
            put(path, _tensor(value, path), path)
            continue
        blocks, pos, norm = _ENCODERS[m["enc"]]
        if m["i"] is None:
            if m["norm"] is None:
                put(pos, _tensor(value, path), path)
            else:
                put(f"{norm}.{'weight' if m['norm'] == 'scale' else 'bias'}", _tensor(value, path), path)
            continue
        module = _BLOCK_MODULES.get(m["mod"])
        prefix = f"{blocks}.{m['i']}.{module}"
        rest = m["rest"]
        t = _tensor(value, path)
        if module is None:
            put(path, t, path)
        elif module.endswith("norm1") or module == "norm2":
            if rest in ("scale", "bias"):
                put(f"{prefix}.{'weight' if rest == 'scale' else 'bias'}", t, path)
            else:
                put(path, t, path)
        elif module == "mlp":
            dense = {"Dense_0/kernel": "fc1.weight", "Dense_0/bias": "fc1.bias",
                     "Dense_1/kernel": "fc2.weight", "Dense_1/bias": "fc2.bias"}.get(rest)
            if dense is None:
                put(path, t, path)
            else:
                put(f"{prefix}.{dense}", _kernel(t) if dense.endswith("weight") else t, path)
        else:
            part, _, leaf = rest.partition("/")
            if part in _QKV and leaf in ("kernel", "bias"):
                attn_parts.setdefault((prefix, leaf), {})[part] = (path, t)
            elif part == "out" and leaf == "kernel":
                if t.dim() != 3:
                    problems.append(f"{path}: expected an (heads, head_dim, out) kernel, got {tuple(t.shape)}")
                    put(path, t, path)
                    continue
                _check_heads(model, prefix, path, t.shape[0], t.shape[1], problems)
                put(f"{prefix}.proj.weight", t.reshape(-1, t.shape[-1]).t().contiguous(), path)
            elif part == "out" and leaf == "bias":
                put(f"{prefix}.proj.bias", t, path)
            else:
                put(path, t, path)
    for (prefix, leaf), got in sorted(attn_parts.items()):
        if set(got) != set(_QKV):
            have = ", ".join(p for p in _QKV if p in got)
            problems.append(f"{next(iter(got.values()))[0].rsplit('/', 2)[0]}: the checkpoint has {have} {leaf} "
                            f"but not all of query, key, value")
            for path, t in got.values():
                put(path, t, path)
            continue
        paths = [got[p][0] for p in _QKV]
        tensors = [got[p][1] for p in _QKV]
        layout = "(in, heads, head_dim)" if leaf == "kernel" else "(heads, head_dim)"
        if any(t.dim() != layout.count(",") + 1 for t in tensors) or len({tuple(t.shape) for t in tensors}) != 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            problems.append(f"{paths[0].rsplit('/', 2)[0]}: the query / key / value {leaf} must each be {layout}, "
                            f"all of one shape, got {shapes}")
            for path, t in zip(paths, tensors):
                put(path, t, path)
            continue
        heads, head_dim = tensors[0].shape[-2:]
        if leaf == "kernel":
            _check_heads(model, prefix, paths[0], heads, head_dim, problems)
            fused = torch.cat([t.reshape(t.shape[0], -1).t() for t in tensors], 0).contiguous()
            put(f"{prefix}.qkv.weight", fused, paths)
        else:
            put(f"{prefix}.qkv.bias", torch.cat([t.reshape(-1) for t in tensors], 0), paths)
    return ScenicConversion(sd, names, problems)


def _check_heads(model: nn.Module, prefix: str, path: str, heads: int, head_dim: int, problems: list) -> None:
    want = _module_heads(model, prefix)
    if want is not None and want != heads:
        problems.append(f"{path}: the checkpoint has {heads} heads of {head_dim}, the model's {prefix} has {want}")


_MODEL_KEY = re.compile(r"^(?P<blocks>blocks|temporal_blocks)\.(?P<i>\d+)\.(?P<mod>[a-z_0-9]+)\.(?P<rest>.+)$")
_SCENIC_BLOCK = {"norm1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_0", "norm2": "LayerNorm_1",
                 "mlp": "MlpBlock_0"}
_SCENIC_BLOCK_3 = {"norm1": "LayerNorm_space", "attn": "MultiHeadDotProductAttention_space",
                   "temporal_norm1": "LayerNorm_time", "temporal_attn": "MultiHeadDotProductAttention_time",
                   "norm2": "LayerNorm_mlp", "mlp": "MlpBlock"}
_SCENIC_LEAF = {"qkv.weight": "{query,key,value}/kernel", "qkv.bias": "{query,key,value}/bias",
                "proj.weight": "out/kernel", "proj.bias": "out/bias", "fc1.weight": "Dense_0/kernel",
                "fc1.bias": "Dense_0/bias", "fc2.weight": "Dense_1/kernel", "fc2.bias": "Dense_1/bias",
                "weight": "scale", "bias": "bias"}


def scenic_name(key: str, model: nn.Module) -> str:
    """The scenic parameter path a bundled ViViT key loads from (for error messages)."""
    variant = getattr(model.config, "variant", "")
    factorised = variant == "factorised_encoder"
    encoders = {"blocks": "SpatialTransformer" if factorised else "Transformer",
                "temporal_blocks": "TemporalTransformer"}
    tops = {"cls_token": "cls_SpatialTransformer" if factorised else "cls",
            "temporal_cls_token": "cls_TemporalTransformer",
            "pos_embed": f"{encoders['blocks']}/posembed_input/pos_embedding",
            "temporal_pos_embed": "TemporalTransformer/posembed_input/pos_embedding"}
    if key in tops:
        return tops[key]
    for norm, enc in (("spatial_norm", "SpatialTransformer"), ("norm", encoders["temporal_blocks" if factorised
                                                                                 else "blocks"])):
        if key in (f"{norm}.weight", f"{norm}.bias"):
            return f"{enc}/encoder_norm/{'scale' if key.endswith('weight') else 'bias'}"
    for dense, torch_name in _DENSE.items():
        if key.startswith(torch_name + "."):
            return f"{dense}/{'kernel' if key.endswith('weight') else 'bias'}"
    m = _MODEL_KEY.match(key)
    if m is None:
        return key
    mods = _SCENIC_BLOCK_3 if variant == "factorised_self_attention" else _SCENIC_BLOCK
    block = f"{encoders[m['blocks']]}/encoderblock_{m['i']}/{mods.get(m['mod'], m['mod'])}"
    return f"{block}/{_SCENIC_LEAF.get(m['rest'], m['rest'])}"


def is_scenic_checkpoint(checkpoint) -> bool:
    """True for a Flax msgpack file (:func:`is_flax_msgpack_file`) or a mapping holding ViViT
    parameters (:func:`scenic_params`)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        return os.path.isfile(checkpoint) and is_flax_msgpack_file(checkpoint)
    return isinstance(checkpoint, Mapping) and scenic_params(checkpoint) is not None


def scenic_checkpoint(checkpoint, model: nn.Module) -> ConvertedCheckpoint:
    """A scenic checkpoint file or restored tree in ``model``'s keys: read
    (:func:`read_flax_msgpack`), its parameters found (:func:`scenic_params`) and renamed
    (:func:`scenic_to_divattn`); errors name each key with its scenic path.

    Raises CheckpointMismatchError for a file that cannot be read or holds no ViViT
    parameters.
    """
    try:
        tree = read_flax_msgpack(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
        params = scenic_params(tree)
        if params is None:
            raise CheckpointMismatchError(
                f"found no ViViT parameters in the Flax checkpoint: none of params, optimizer.target, target holds "
                f"embedding / Transformer / SpatialTransformer; its keys are {sorted(map(str, tree))[:20]}")
        conv = scenic_to_divattn(params, model)
    except ScenicCheckpointError as e:
        raise CheckpointMismatchError(f"cannot read the scenic checkpoint: {e}") from e

    def describe(key: str) -> str:
        source = conv.names.get(key) or scenic_name(key, model)
        source = "+".join(source) if isinstance(source, list) else source
        return key if source == key else f"{key} (scenic {source})"

    return ConvertedCheckpoint(conv.state_dict, conv.problems, describe)
