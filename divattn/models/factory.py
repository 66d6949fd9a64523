"""``create_model``, as in timm: a registered entry point, then an optional local checkpoint."""

from __future__ import annotations

from torch import nn

from .checkpoint import load_checkpoint
from .registry import model_entrypoint


def create_model(name: str, pretrained: bool = False, checkpoint_path=None, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with config overrides, e.g.
    ``create_model("timesformer_base", num_classes=174, attention_type="joint_space_time")``.

    Keyword names follow timm: ``num_classes, num_frames, img_size, patch_size,
    embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_rate, drop_path_rate,
    attention_type`` (TimeSformer) / ``variant, temporal_depth`` (ViViT), ``backend``.
    ``checkpoint_path`` loads a local checkpoint strictly (see
    :func:`divattn.models.load_checkpoint`). No weights are downloaded, so
    ``pretrained=True`` raises ValueError; unknown keywords raise TypeError.
    """
    entry = model_entrypoint(name)
    if pretrained:
        raise ValueError(
            f"create_model({name!r}, pretrained=True): divattn downloads no weights; "
            "pass checkpoint_path= a local official, divattn or transformers checkpoint"
        )
    model = entry(**kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model
