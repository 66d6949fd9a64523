"""TimeSformer (Bertasius et al., 2021) on the divattn ops, with the official parameter names.

Follows facebookresearch/TimeSformer ``timesformer/models/vit.py``: per-frame patch
embedding, a cls token, spatial position embeddings shared by all frames, time
embeddings shared by all patches, patch tokens in ``(h w t)`` order, and one of three
attention types:

- ``divided_space_time``: :class:`~divattn.layers.blocks.DividedBlock` (temporal then
  spatial attention, on the fused ops);
- ``joint_space_time``: one attention over all ``1 + N*T`` tokens;
- ``space_only``: a ViT over each frame (its own cls token, no time embedding); the
  frames' tokens are averaged before the final norm.

State-dict keys are the official ones (``cls_token, pos_embed, time_embed,
patch_embed.proj, blocks.<i>.{norm1, attn.qkv, attn.proj, temporal_norm1,
temporal_attn.qkv, temporal_attn.proj, temporal_fc, norm2, mlp.fc1, mlp.fc2}, norm,
head``), so official checkpoints load after stripping their ``model.`` prefix;
``transformers`` ``Timesformer*`` state dicts load through :func:`transformers_to_timesformer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..layers.blocks import Block, DividedBlock
from ..layers.embed import PatchEmbed, check_video
from ..ops.masks import with_real_cls
from ..sequence_parallel import SequenceParallelError
from .base import (
    VideoModel,
    VideoModelConfig,
    choice,
    collect_attention_maps,
    drop_path_rates,
    init_weights,
    resolve_config,
)
from .base import masked_mean
from .checkpoint import is_transformers_state_dict, layer_rules, rename_keys, top_rules
from .pos_embed import resize_pos_embed, resize_time_embed
from .ragged import Ragged
from .registry import register_model

ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only")

_TRANSFORMERS_KEYS = [
    *top_rules(r"(?:timesformer\.)?", {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.time_embeddings": "time_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }),
    *top_rules("", {"classifier.weight": "head.weight", "classifier.bias": "head.bias"}),
    *layer_rules(r"^(?:timesformer\.)?encoder\.layer\.(\d+)\.", {
        "layernorm_before": "norm1",
        "attention.attention.qkv": "attn.qkv",
        "attention.output.dense": "attn.proj",
        "temporal_layernorm": "temporal_norm1",
        "temporal_attention.attention.qkv": "temporal_attn.qkv",
        "temporal_attention.output.dense": "temporal_attn.proj",
        "temporal_dense": "temporal_fc",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    }),
]


def transformers_to_timesformer(sd: dict) -> dict:
    """Rename a ``transformers`` ``Timesformer*`` state dict to the official keys; keys the map
    does not know keep their names, so a strict load reports them."""
    return rename_keys(dict(sd), _TRANSFORMERS_KEYS)


@dataclass
class TimeSformerConfig(VideoModelConfig):
    """:class:`~divattn.models.base.VideoModelConfig` plus ``attention_type`` (one of
    ``divided_space_time``, ``joint_space_time``, ``space_only``). ``tubelet_size`` is 1."""

    name: str = "timesformer_base"
    attention_type: str = "divided_space_time"

    def __post_init__(self):
        super().__post_init__()
        choice(self.name, "attention_type", self.attention_type, ATTENTION_TYPES)
        if self.tubelet_size != 1:
            raise ValueError(f"{self.name}: TimeSformer embeds each frame (tubelet_size 1), got {self.tubelet_size}")


class TimeSformer(VideoModel):
    """TimeSformer for video ``(B, C, T, H, W)``; see the module docstring.

    Build it with :func:`divattn.models.create_model` (``timesformer_base``,
    ``timesformer_hr``, ``timesformer_large``) or from a :class:`TimeSformerConfig` /
    its fields. A clip with another frame count or resolution than the config gets its
    time / position embeddings resized (``config.interpolation``; the official code uses
    nearest). The temporal_fc of every divided block but the first starts at zero, as
    in the official init.
    """

    def __init__(self, config: Optional[TimeSformerConfig] = None, **kwargs):
        super().__init__(resolve_config(TimeSformerConfig, config, kwargs))
        c = self.config
        dim = c.embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.grid[0] * c.grid[1], dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        if c.attention_type != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(1, c.num_frames, dim))
            self.time_drop = nn.Dropout(c.drop_rate)
        dpr = drop_path_rates(c.drop_path_rate, c.depth)
        common = dict(mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, drop=c.drop_rate, act=c.act, norm_eps=c.norm_eps,
                      backend=c.backend)
        if c.attention_type == "divided_space_time":
            blocks = [DividedBlock(dim, c.num_heads, c.num_frames, drop_path=p, token_order="hwt", **common)
                      for p in dpr]
        else:
            blocks = [Block(dim, c.num_heads, drop_path=p, **common) for p in dpr]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=c.norm_eps)
        self.head = self._make_head(c.num_classes)
        self._init_weights()
        self.set_memory(self.config.memory)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)
        for i, blk in enumerate(self.blocks):
            if i > 0 and isinstance(blk, DividedBlock):
                nn.init.zeros_(blk.temporal_fc.weight)
                nn.init.zeros_(blk.temporal_fc.bias)

    def _check_parallel(self) -> None:
        if self.config.attention_type == "joint_space_time":
            raise SequenceParallelError(f"{self.config.name}: joint_space_time attends over every token of the clip "
                                        "at once; sharding frames serves divided_space_time and space_only")

    def checkpoint_filter_fn(self, state_dict: dict) -> dict:
        """A ``transformers`` state dict renamed (:func:`transformers_to_timesformer`); others as they are."""
        return transformers_to_timesformer(state_dict) if is_transformers_state_dict(state_dict) else state_dict

    def embed(self, video: torch.Tensor, ragged: Optional[Ragged] = None) -> torch.Tensor:
        """Tokens entering the first block: ``(B, 1 + N*T, C)`` in ``(h w t)`` order
        (space_only: ``(B*T, 1 + N, C)``, one sequence per frame); parallelized, for this
        rank's T frames. A padded batch (``ragged``) gets each sample's position and time
        embeddings resized to its own size."""
        c = self.config
        check_video(video, c.in_chans, c.patch_size)
        B, _, T, H, W = video.shape
        _, frames, start = self._frames(video)
        x = self.patch_embed(video)  # (B*T, N, C)
        grid = (H // c.patch_size, W // c.patch_size)
        pos = resize_pos_embed(self.pos_embed, grid, old_grid=c.grid, mode=c.interpolation)
        cls = self.cls_token + pos[:, :1]
        if ragged is None:
            x = x + pos[:, 1:]
        else:
            per_sample = ragged.grid_embed(self.pos_embed[:, 1:], c.grid, c.interpolation)  # (B, N, C)
            x = x + per_sample[:, None].expand(B, T, *per_sample.shape[1:]).reshape(x.shape)
        if c.attention_type == "space_only":
            return self.pos_drop(torch.cat([cls.expand(B * T, -1, -1), x], 1))
        N, C = x.shape[1], x.shape[2]
        if ragged is None:
            time = resize_time_embed(self.time_embed, frames, mode=c.interpolation)[:, start: start + T]
        else:
            time = ragged.time_embed(self.time_embed, c.interpolation)  # (B, T, C)
        # (B*T, N, C) -> (B, N, T, C): time varies fastest, the official (h w t) order
        x = self.pos_drop(x).view(B, T, N, C).transpose(1, 2) + time[:, None]
        x = self.time_drop(x).reshape(B, N * T, C)
        return torch.cat([self.pos_drop(cls.expand(B, -1, -1)), x], 1)

    def _pool_frames(self, x: torch.Tensor, num_frames: int, ragged: Optional[Ragged] = None) -> torch.Tensor:
        if self.config.attention_type != "space_only":
            return x
        x = x.view(-1, num_frames, *x.shape[1:])
        if self.sequence is not None:
            return self.sequence.all_reduce(x.sum(1)) / self.sequence.num_frames
        if ragged is None:
            return x.mean(1)
        # the mean over the frames that hold a real patch (the clip's own frames)
        return masked_mean(x.flatten(2), ragged.real_frames()).view(x.shape[0], *x.shape[2:])

    def _block_mask(self, ragged: Ragged):
        """The real tokens as the blocks take them (see :mod:`divattn.layers.blocks`): divided
        blocks a padding of whole frames as :class:`~divattn.layers.padding.Frames`, space-only
        blocks as :class:`~divattn.layers.padding.Lengths`."""
        if self.config.attention_type == "divided_space_time":
            return ragged.divided()
        if self.config.attention_type == "space_only" and ragged.whole_frames:
            return ragged.lengths(1, per_frame=True)  # each frame's [cls] + N tokens
        real = ragged.tokens()  # (B, T, N)
        B, T, N = real.shape
        if self.config.attention_type == "space_only":
            return with_real_cls(real.reshape(B * T, N))
        return with_real_cls(real.transpose(1, 2).reshape(B, N * T))  # (h w t) tokens

    def forward_features(self, video: torch.Tensor, frames=None, sizes=None, mask=None) -> torch.Tensor:
        """Token features after the final norm: ``(B, 1 + N*T, C)`` (space_only: ``(B, 1 + N, C)``,
        the frames averaged before the norm as in the official code); token 0 is cls. A padded
        batch's ``frames``, ``sizes``, ``mask``: :mod:`divattn.models.ragged` (padded tokens'
        features are not the clip's; the cls token's are)."""
        return self._features(video, self.ragged(video, frames, sizes, mask))

    def _features(self, video: torch.Tensor, ragged: Optional[Ragged]) -> torch.Tensor:
        T = video.shape[2]
        if ragged is None:
            x = self._run_blocks(self.blocks, self.embed(video), num_frames=T)
            return self.norm(self._pool_frames(x, T))
        x = self._run_blocks(self.blocks, self.embed(video, ragged), num_frames=T, mask=self._block_mask(ragged))
        return self.norm(self._pool_frames(x, T, ragged))

    @torch.no_grad()
    def attention_maps(self, video: torch.Tensor) -> list:
        """Per block, a dict of attention probabilities (reference softmax, fp32).

        divided: ``"temporal"`` ``(B, N, H, T, T)`` and ``"spatial"`` ``(B, T, H, 1+N, 1+N)``
        (cls first); joint: ``"joint"`` ``(B, H, L, L)`` over ``[cls] + (h w t)`` tokens;
        space_only: ``"spatial"`` ``(B, T, H, 1+N, 1+N)``.
        """
        self._single_process("attention_maps")
        T = video.shape[2]
        x = self.embed(video)
        self._sync_frames(self.blocks, T)
        rename = None
        if self.config.attention_type == "space_only":
            def rename(m):
                return {"spatial": m["joint"].view(-1, T, *m["joint"].shape[1:])}
        return collect_attention_maps(self.blocks, x, rename)[0]


def _create(name: str, defaults: dict, kwargs: dict) -> TimeSformer:
    return TimeSformer(TimeSformerConfig(name=name, **{**defaults, **kwargs}))


@register_model
def timesformer_base(**kwargs) -> TimeSformer:
    """TimeSformer: ViT-B/16, 8 frames at 224 px (the paper's default model)."""
    return _create("timesformer_base", dict(num_frames=8, img_size=224), kwargs)


@register_model
def timesformer_hr(**kwargs) -> TimeSformer:
    """TimeSformer-HR: ViT-B/16, 16 frames at 448 px."""
    return _create("timesformer_hr", dict(num_frames=16, img_size=448), kwargs)


@register_model
def timesformer_large(**kwargs) -> TimeSformer:
    """TimeSformer-L: ViT-B/16, 96 frames at 224 px."""
    return _create("timesformer_large", dict(num_frames=96, img_size=224), kwargs)
