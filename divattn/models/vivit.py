"""ViViT (Arnab et al., 2021) on the divattn ops: the paper's four model variants.

Tubelet embedding (``Conv3d``, ``tubelet_size`` frames x ``patch_size``^2 pixels),
tokens in ``(t h w)`` order, pre-norm blocks with tanh-approximated GELU (as Flax /
scenic) and LayerNorm eps 1e-6. With T' = num_frames / tubelet_size temporal tokens
and N patches per frame:

- ``spatio_temporal`` (model 1): cls + T'*N tokens, position embeddings for all of
  them, joint attention over everything; pooled by the cls token (the layout of
  ``transformers``' ``VivitModel``).
- ``factorised_encoder`` (model 2): a spatial ViT over each frame's cls + N tokens
  (``blocks``, ``spatial_norm``), then a temporal transformer over the frames' cls
  outputs with its own cls token and position embeddings (``temporal_blocks``,
  ``temporal_depth`` layers, 4 by default), pooled by its cls token.
- ``factorised_self_attention`` (model 3): each block runs spatial MSA, then temporal
  MSA, then the MLP; no cls token, tokens averaged after the final norm.
- ``factorised_dot_product`` (model 4): each block's heads are split, half attend
  over space and half over time, on views of one qkv; no cls, averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..layers.blocks import Block, FactorisedDotProductBlock, FactorisedSelfAttentionBlock
from ..layers.embed import TubeletEmbed, check_video
from .base import (
    VideoModel,
    VideoModelConfig,
    choice,
    collect_attention_maps,
    drop_path_rates,
    init_weights,
    resolve_config,
)
from .pos_embed import resize_pos_embed, resize_pos_embed_3d, resize_time_embed
from .registry import register_model

VARIANTS = ("spatio_temporal", "factorised_encoder", "factorised_self_attention", "factorised_dot_product")


@dataclass
class ViViTConfig(VideoModelConfig):
    """:class:`~divattn.models.base.VideoModelConfig` plus ``variant`` (one of
    :data:`VARIANTS`) and ``temporal_depth`` (layers of model 2's temporal transformer:
    4 by default, 0 for the other variants)."""

    name: str = "vivit_base"
    num_frames: int = 32
    tubelet_size: int = 2
    act: str = "gelu_tanh"
    interpolation: str = "bicubic"
    variant: str = "spatio_temporal"
    temporal_depth: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        choice(self.name, "variant", self.variant, VARIANTS)
        factorised = self.variant == "factorised_encoder"
        if self.temporal_depth is None:
            self.temporal_depth = 4 if factorised else 0
        if factorised and (not isinstance(self.temporal_depth, int) or self.temporal_depth < 1):
            raise ValueError(f"{self.name}: factorised_encoder needs temporal_depth >= 1, got {self.temporal_depth!r}")
        if not factorised and self.temporal_depth != 0:
            raise ValueError(f"{self.name}: temporal_depth applies to factorised_encoder only, got "
                             f"{self.temporal_depth} with variant {self.variant!r}")

    @property
    def temporal_tokens(self) -> int:
        return self.num_frames // self.tubelet_size


class ViViT(VideoModel):
    """ViViT for video ``(B, C, T, H, W)``; see the module docstring for the variants.

    Build it with :func:`divattn.models.create_model` (``vivit_base``, ``vivit_large``,
    ``variant=...``) or from a :class:`ViViTConfig` / its fields. Clips with another
    frame count or resolution get their position embeddings resized
    (``config.interpolation``).
    """

    def __init__(self, config: Optional[ViViTConfig] = None, **kwargs):
        super().__init__(resolve_config(ViViTConfig, config, kwargs))
        c = self.config
        dim, Tt, N = c.embed_dim, c.temporal_tokens, c.grid[0] * c.grid[1]
        self.variant = c.variant
        self.patch_embed = TubeletEmbed(c.patch_size, c.tubelet_size, c.in_chans, dim)
        common = dict(mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, drop=c.drop_rate, act=c.act, norm_eps=c.norm_eps,
                      backend=c.backend)
        dpr = drop_path_rates(c.drop_path_rate, c.depth)
        if c.variant in ("spatio_temporal", "factorised_encoder"):
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            tokens = 1 + (N if c.variant == "factorised_encoder" else Tt * N)
            self.blocks = nn.ModuleList([Block(dim, c.num_heads, drop_path=p, **common) for p in dpr])
        else:
            self.global_pool = "avg"
            tokens = Tt * N
            block = {"factorised_self_attention": FactorisedSelfAttentionBlock,
                     "factorised_dot_product": FactorisedDotProductBlock}[c.variant]
            self.blocks = nn.ModuleList([block(dim, c.num_heads, Tt, drop_path=p, **common) for p in dpr])
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        if c.variant == "factorised_encoder":
            self.spatial_norm = nn.LayerNorm(dim, eps=c.norm_eps)
            self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.temporal_pos_embed = nn.Parameter(torch.zeros(1, 1 + Tt, dim))
            tdpr = drop_path_rates(c.drop_path_rate, c.temporal_depth)
            self.temporal_blocks = nn.ModuleList([Block(dim, c.num_heads, drop_path=p, **common) for p in tdpr])
        self.norm = nn.LayerNorm(dim, eps=c.norm_eps)
        self.head = self._make_head(c.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("pos_embed"):
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights)

    def _grid(self, video: torch.Tensor) -> tuple:
        c = self.config
        check_video(video, c.in_chans, c.patch_size, c.tubelet_size)
        _, _, T, H, W = video.shape
        return T // c.tubelet_size, H // c.patch_size, W // c.patch_size

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """Tokens entering the first block: ``(B, [1 +] T'*N, C)`` in ``(t h w)`` order
        (factorised_encoder: ``(B*T', 1 + N, C)``, one sequence per frame)."""
        c = self.config
        Tt, h, w = self._grid(video)
        g = self.patch_embed(video)  # (B, C, T', h, w)
        B, C = g.shape[:2]
        if self.variant == "factorised_encoder":
            pos = resize_pos_embed(self.pos_embed, (h, w), old_grid=c.grid, mode=c.interpolation)
            x = g.flatten(3).permute(0, 2, 3, 1).reshape(B * Tt, h * w, C) + pos[:, 1:]
            return self.pos_drop(torch.cat([(self.cls_token + pos[:, :1]).expand(B * Tt, -1, -1), x], 1))
        x = g.flatten(2).transpose(1, 2)
        has_cls = self.variant == "spatio_temporal"
        if has_cls:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1)
        pos = resize_pos_embed_3d(self.pos_embed, (c.temporal_tokens, *c.grid), (Tt, h, w), num_prefix=int(has_cls),
                                  mode=c.interpolation)
        return self.pos_drop(x + pos)

    def _temporal_tokens(self, frame_cls: torch.Tensor) -> torch.Tensor:
        """Model 2: the temporal transformer's input from the frames' cls outputs ``(B, T', C)``."""
        B, Tt, _ = frame_cls.shape
        pos = self.temporal_pos_embed
        pos = torch.cat([pos[:, :1], resize_time_embed(pos[:, 1:], Tt, mode=self.config.interpolation)], 1)
        return self.pos_drop(torch.cat([self.temporal_cls_token.expand(B, -1, -1), frame_cls], 1) + pos)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """Token features after the final norm: ``(B, [1 +] T'*N, C)``; factorised_encoder:
        the temporal transformer's ``(B, 1 + T', C)``."""
        Tt = self._grid(video)[0]
        x = self.embed(video)
        if self.variant != "factorised_encoder":
            return self.norm(self._run_blocks(self.blocks, x, num_frames=Tt))
        x = self._run_blocks(self.blocks, x)
        x = self.spatial_norm(x[:, 0]).view(video.shape[0], Tt, -1)
        return self.norm(self._run_blocks(self.temporal_blocks, self._temporal_tokens(x)))

    @torch.no_grad()
    def attention_maps(self, video: torch.Tensor) -> list:
        """Per block, a dict of attention probabilities (reference softmax, fp32).

        spatio_temporal: ``"joint"`` ``(B, H, L, L)``; factorised_encoder: the spatial
        blocks' ``"spatial"`` ``(B, T', H, 1+N, 1+N)``, then the temporal blocks'
        ``"temporal"`` ``(B, H, 1+T', 1+T')``; factorised_self_attention: ``"spatial"``
        ``(B, T', H, N, N)`` and ``"temporal"`` ``(B, N, H, T', T')``;
        factorised_dot_product: the same with H/2 heads each.
        """
        Tt = self._grid(video)[0]
        x = self.embed(video)
        if self.variant != "factorised_encoder":
            self._sync_frames(self.blocks, Tt)
            return collect_attention_maps(self.blocks, x)[0]

        def per_frame(m):
            return {"spatial": m["joint"].view(-1, Tt, *m["joint"].shape[1:])}

        spatial, x = collect_attention_maps(self.blocks, x, per_frame)
        x = self._temporal_tokens(self.spatial_norm(x[:, 0]).view(video.shape[0], Tt, -1))
        temporal, _ = collect_attention_maps(self.temporal_blocks, x, lambda m: {"temporal": m["joint"]})
        return spatial + temporal


def _create(name: str, defaults: dict, kwargs: dict) -> ViViT:
    return ViViT(ViViTConfig(name=name, **{**defaults, **kwargs}))


@register_model
def vivit_base(**kwargs) -> ViViT:
    """ViViT-B/16x2: ViT-Base, 16x16 patches x 2 frames per tubelet, 32 frames at 224 px."""
    return _create("vivit_base", dict(embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vivit_large(**kwargs) -> ViViT:
    """ViViT-L/16x2: ViT-Large, 16x16 patches x 2 frames per tubelet, 32 frames at 224 px."""
    return _create("vivit_large", dict(embed_dim=1024, depth=24, num_heads=16), kwargs)
