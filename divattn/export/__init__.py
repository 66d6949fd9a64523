"""Export models on divattn: ONNX, and ``torch.export`` / AOTInductor.

While ``torch.export`` traces a model, every divattn attention becomes one
``divattn::attention`` custom op (:mod:`divattn.ops.exported`), whatever its backend,
next to ``divattn::add_after_first``. ``torch.export`` keeps both with their fake
kernels; AOTInductor packages call them, and they run the model's backend (the fused
kernels on a GPU). For ONNX, pass the one extra argument
``custom_translation_table=divattn.export.onnx_translations()`` to
``torch.onnx.export(..., dynamo=True)``, or call :func:`export_onnx`, which does so.

ONNX needs the ``export`` extra (``pip install divattn[export]``: onnx, onnxscript,
onnxruntime); ``torch.export`` and AOTInductor need nothing beyond torch.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class ExportError(RuntimeError):
    """A model or an argument that cannot be exported; the message says what to change."""


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ExportError(f"ONNX export needs {module}, which is not installed: "
                          f"pip install 'divattn[export]' (onnx, onnxscript, onnxruntime)")


def onnx_translations() -> dict:
    """``{op: onnxscript function}`` for ``torch.onnx.export(..., custom_translation_table=)``.

    Translates ``divattn::attention`` (temporal, spatial with and without cls, joint,
    causal) and ``divattn::add_after_first`` into standard ONNX operators (opset 18 and
    later; see :mod:`divattn.export.translations` for the graph they make). Raises
    :class:`ExportError` when onnxscript is not installed.
    """
    _require("onnxscript")
    from . import translations

    return {
        torch.ops.divattn.attention.default: translations.attention,
        torch.ops.divattn.add_after_first.default: translations.add_after_first,
    }


def export_onnx(model: torch.nn.Module, args: tuple, f: Optional[str] = None, *,
                custom_translation_table: Optional[dict] = None, **kwargs: Any):
    """``torch.onnx.export(model, args, f, dynamo=True, **kwargs)`` with the divattn ops translated.

    ``custom_translation_table`` entries are added to (and override) :func:`onnx_translations`.
    Returns the ``torch.onnx.ONNXProgram``.
    """
    if kwargs.get("dynamo", True) is not True:
        raise ExportError("export_onnx: the divattn ops export through torch.onnx's dynamo exporter only; "
                          "drop dynamo=False")
    kwargs.pop("dynamo", None)
    table = {**onnx_translations(), **(custom_translation_table or {})}
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)


# Why transformers' video models fix the frame count at trace time.
_TRANSFORMERS_FRAMES = {
    "timesformer": "transformers' TimesformerEmbeddings decides in Python whether to resize its time embeddings "
                   "(num_frames != time_embeddings.size(1)), which fixes the frame count while tracing",
    "vivit": "transformers' VivitEmbeddings adds position embeddings for config.num_frames // tubelet_size[0] "
             "temporal tokens (interpolate_pos_encoding resizes height and width only)",
}


def dynamic_shapes(model: torch.nn.Module, *, batch: bool = True, frames: bool = True,
                   max_batch: Optional[int] = None, max_frames: Optional[int] = None) -> tuple:
    """``dynamic_shapes`` for exporting ``model`` with a dynamic batch size and frame count.

    For ``torch.export.export(model, (video,), dynamic_shapes=...)``, ``torch.onnx.export``
    and :func:`export_onnx`. ``model`` is a bundled model (video ``(B, C, T, H, W)``) or a
    ``transformers`` Timesformer / Vivit (``pixel_values`` ``(B, T, C, H, W)``), swapped or
    not. Height and width stay as in the example input.

    The frame count is a dynamic dim of at least 2 frames (ViViT: 2 tubelets, a multiple of
    the tubelet size): with one frame the ``(h w t)`` and ``(t h w)`` token layouts
    coincide, and the exported graph holds the layout of several. An ST transformer's
    frames are at most its ``config.num_frames`` (its temporal position embeddings).

    Raises :class:`ExportError` naming the dimension that cannot be dynamic and why: the
    frames of a ``transformers`` model (its embeddings fix them; convert it with
    :func:`divattn.models.from_transformers`, whose frame count exports dynamic, or pass
    ``frames=False``), or ``max_frames`` past what an ST transformer covers.
    """
    from ..models import STTransformer, VideoModel

    config = getattr(model, "config", None)
    if isinstance(model, VideoModel):
        frames_dim, tubelet = 2, config.tubelet_size
        most = config.num_frames if isinstance(model, STTransformer) else None
        if most is not None and max_frames is not None and max_frames > most:
            raise ExportError(f"dynamic_shapes: frames (dim 2 of the video) can be at most {most} for "
                              f"{config.name}: its temporal position embeddings cover config.num_frames = {most} "
                              f"frames; pass max_frames <= {most}")
        max_frames = most if max_frames is None else max_frames
    elif getattr(config, "model_type", None) in _TRANSFORMERS_FRAMES:
        if frames:
            raise ExportError(f"dynamic_shapes: frames (dim 1 of pixel_values) cannot be dynamic for a transformers "
                              f"{type(model).__name__}: {_TRANSFORMERS_FRAMES[config.model_type]}. Pass "
                              f"frames=False (one export per frame count), or convert the model with "
                              f"divattn.models.from_transformers, whose frame count exports dynamic")
        frames_dim, tubelet = 1, 1
    else:
        raise ExportError(f"dynamic_shapes: {type(model).__name__} is neither a bundled divattn model nor a "
                          f"transformers Timesformer / Vivit; write its torch.export.Dim specs directly")
    dims = {}
    if batch:
        dims[0] = torch.export.Dim("batch", min=1, max=max_batch)
    if frames:
        if tubelet == 1:
            dims[frames_dim] = torch.export.Dim("frames", min=2, max=max_frames)
        else:
            top = None if max_frames is None else max_frames // tubelet
            dims[frames_dim] = torch.export.Dim("tubelets", min=2, max=top) * tubelet
    return (dims,)


__all__ = ["ExportError", "onnx_translations", "export_onnx", "dynamic_shapes"]
