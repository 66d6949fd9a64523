"""The spatiotemporal (ST) transformer of video world models, predicting the next frame.

As in Genie (Bruce et al., 2024) and its open reproductions: per-frame patch
embedding, learned spatial and temporal position embeddings, a stack of pre-norm
:class:`~divattn.layers.st.STBlock` (spatial attention within each frame, causal
temporal attention over the frames so far, MLP; no cls token), a final norm and a
linear head that regresses the pixels of each patch in the *next* frame. Tokens are
kept frame-major (``(t h w)`` order), so a new frame's tokens append to the per-layer
key/value caches that :meth:`STTransformer.step` and :meth:`STTransformer.generate`
use to roll out one frame at a time.

State-dict keys: ``patch_embed.proj, pos_embed (1, N, C), time_embed (1, T, C),
blocks.<i>.{norm1, attn.qkv, attn.proj, temporal_norm1, temporal_attn.qkv,
temporal_attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.embed import PatchEmbed, check_video
from ..layers.st import KVCache, STBlock
from .base import VideoModel, VideoModelConfig, drop_path_rates, init_weights, resolve_config
from .ragged import Ragged
from .registry import register_model


@dataclass
class STTransformerConfig(VideoModelConfig):
    """:class:`~divattn.models.base.VideoModelConfig` for a next-frame predictor.

    ``num_frames`` is the longest clip (the temporal position embeddings), ``img_size``
    the frame size the spatial position embeddings are made for (clips must have it).
    There are no classes: ``num_classes`` must be 0, and the head predicts
    ``patch_size**2 * in_chans`` pixels per token. With ``residual`` (default) the head
    predicts the change from the current frame (prediction = frame t + head output, the
    head starting at zero), so an untrained model is the copy-the-last-frame baseline;
    otherwise it predicts the pixels outright. ``tubelet_size`` is 1.
    """

    name: str = "st_transformer_base"
    num_classes: int = 0
    num_frames: int = 16
    residual: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes != 0:
            raise ValueError(f"{self.name}: an ST transformer predicts the next frame's pixels; num_classes must "
                             f"be 0, got {self.num_classes}")
        if self.tubelet_size != 1:
            raise ValueError(f"{self.name}: the ST transformer embeds each frame (tubelet_size 1), "
                             f"got {self.tubelet_size}")


class STTransformer(VideoModel):
    """Next-frame prediction on video ``(B, C, T, H, W)``; see the module docstring.

    ``forward(video)`` returns ``(B, C, T, H, W)``: output frame t is the prediction
    of input frame t + 1 from frames ``<= t`` (the last one predicts the frame after
    the clip)::

        x = patch_embed(video) + pos_embed + time_embed      # (B, T, N, C)
        x = norm(blocks(x))
        pred = unpatchify(head(x)) (+ video when config.residual) Build it with :func:`divattn.models.create_model`
    (``st_transformer_tiny``, ``_small``, ``_base``, ``_large``) or from a
    :class:`STTransformerConfig` / its fields.

    Rolling out: ``caches = model.new_cache()``, then ``model.step(frames, caches)``
    with the next frames in turn gives the outputs of ``forward`` on all frames so far
    for those frames; :meth:`generate` extends a context clip frame by frame.
    """

    global_pool = "avg"

    def __init__(self, config: Optional[STTransformerConfig] = None, **kwargs):
        super().__init__(resolve_config(STTransformerConfig, config, kwargs))
        c = self.config
        dim = c.embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.grid[0] * c.grid[1], dim))
        self.time_embed = nn.Parameter(torch.zeros(1, c.num_frames, dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        self.blocks = nn.ModuleList(
            STBlock(dim, c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, drop=c.drop_rate, drop_path=p,
                    act=c.act, norm_eps=c.norm_eps, backend=c.backend)
            for p in drop_path_rates(c.drop_path_rate, c.depth))
        self.norm = nn.LayerNorm(dim, eps=c.norm_eps)
        self.head = nn.Linear(dim, c.patch_size * c.patch_size * c.in_chans)
        self._init_weights()
        self.set_memory(self.config.memory)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.time_embed, std=0.02)
        self.apply(init_weights)
        if self.config.residual:
            nn.init.zeros_(self.head.weight)

    def reset_classifier(self, num_classes: int) -> None:
        raise TypeError(f"{self.config.name}: the head predicts pixels; there is no classifier to reset")

    def embed(self, video: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Tokens entering the first block, ``(B, T, N, C)``, for frames ``start .. start + T - 1``
        (parallelized: this rank's frames of the clip)."""
        c = self.config
        check_video(video, c.in_chans, c.patch_size)
        B, _, T, H, W = video.shape
        start += self._frames(video)[2]
        if (H, W) != (c.img_size, c.img_size):
            raise ValueError(f"{c.name}: frames are {H}x{W}, the position embeddings are for "
                             f"{c.img_size}x{c.img_size} (config img_size)")
        if start + T > c.num_frames:
            raise ValueError(f"{c.name}: frames {start}..{start + T - 1} are past the {c.num_frames} frames the "
                             "temporal position embeddings cover (config num_frames)")
        x = self.patch_embed(video)  # (B*T, N, C), frames in (b t) order
        x = x.view(B, T, *x.shape[1:]) + self.pos_embed[:, None] + self.time_embed[:, start:start + T, None]
        return self.pos_drop(x)

    def forward_features(self, video: torch.Tensor, frames=None) -> torch.Tensor:
        """Token features after the final norm: ``(B, T, N, C)``, frame t's from frames ``<= t``.
        ``frames`` ``(B,)``: a padded batch, sample b its first ``frames[b]`` frames
        (:mod:`divattn.models.ragged`; the padding's features are not used by any real frame)."""
        return self._features(video, self.ragged(video, frames))

    def _features(self, video: torch.Tensor, ragged: Optional[Ragged]) -> torch.Tensor:
        x = self.embed(video)
        mask = None if ragged is None else ragged.divided()
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, None, mask, use_reentrant=False)
            else:
                x = blk(x) if mask is None else blk(x, mask=mask)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, T, N, C)`` features -> the head's output as frames ``(B, C, T, H, W)`` (with
        ``config.residual``, the change from each input frame to the next)
        (``pre_logits=True``: the features pooled over tokens, ``(B, C)``)."""
        if pre_logits:
            if self.sequence is None:
                return x.mean((1, 2))
            return self.sequence.all_reduce(x.sum((1, 2))) / (self.sequence.num_frames * x.shape[2])
        return self.unpatchify(self.head(x))

    def predict(self, features: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """Next frames ``(B, C, T, H, W)`` from the features of the frames of ``video``."""
        out = self.forward_head(features)
        return out + video if self.config.residual else out

    def forward(self, video: torch.Tensor, frames=None) -> torch.Tensor:
        """Predicted next frames ``(B, C, T, H, W)``: output t from input frames ``<= t``. With
        ``frames`` (a padded batch of clips of ``frames[b]`` frames), each sample's predictions
        are its clip's own, and zero on its padded frames."""
        ragged = self.ragged(video, frames)
        pred = self.predict(self._features(video, ragged), video)
        if ragged is None:
            return pred
        real = ragged.real_frames()  # (B, T)
        return pred * real[:, None, :, None, None].to(pred.dtype)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, T, N, p*p*C)`` patch pixels (channels last within a patch) -> ``(B, C, T, H, W)``."""
        c = self.config
        B, T = patches.shape[:2]
        h, w = c.grid
        p = c.patch_size
        x = patches.view(B, T, h, w, p, p, c.in_chans)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, c.in_chans, T, h * p, w * p)

    def new_cache(self) -> list:
        """One empty :class:`~divattn.layers.st.KVCache` per block, sized for ``num_frames`` frames."""
        return [KVCache(self.config.num_frames) for _ in self.blocks]

    @torch.no_grad()
    def step(self, frames: torch.Tensor, cache: list) -> torch.Tensor:
        """Feed the next frames ``(B, C, t, H, W)`` and return their outputs ``(B, C, t, H, W)``.

        ``cache`` (from :meth:`new_cache`) holds every earlier frame's keys and values
        and gets these frames' appended; output frame i predicts the frame after input
        frame i. Feeding a clip in pieces gives the outputs of :meth:`forward` on the
        whole clip, up to round-off.
        """
        self._single_process("step")
        if len(cache) != len(self.blocks):
            raise ValueError(f"{self.config.name}.step: {len(cache)} caches for {len(self.blocks)} blocks; "
                             "use model.new_cache()")
        x = self.embed(frames, start=len(cache[0]))
        for blk, kv in zip(self.blocks, cache):
            x = blk(x, kv)
        return self.predict(self.norm(x), frames)

    @torch.no_grad()
    def generate(self, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Roll out ``num_frames`` new frames after ``context`` ``(B, C, T0, H, W)``, one at a time.

        Each generated frame is the prediction from every frame before it (context and
        generated) and is fed back as the next input; the context is encoded once.
        Returns the new frames ``(B, C, num_frames, H, W)``. ``T0 + num_frames - 1`` must
        not exceed ``config.num_frames``.
        """
        self._single_process("generate")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"generate: num_frames must be a positive int, got {num_frames!r}")
        check_video(context, self.config.in_chans, self.config.patch_size)
        T0 = context.shape[2]
        if T0 + num_frames - 1 > self.config.num_frames:
            raise ValueError(f"generate: {T0} context + {num_frames} new frames need {T0 + num_frames - 1} time "
                             f"positions; the model has {self.config.num_frames} (config num_frames)")
        cache = self.new_cache()
        frame = self.step(context, cache)[:, :, -1:]
        out = [frame]
        for _ in range(num_frames - 1):
            frame = self.step(frame, cache)
            out.append(frame)
        return torch.cat(out, 2)

    def attention_maps(self, video: torch.Tensor) -> list:
        """Per block, ``{"spatial": (B, T, H, N, N), "temporal": (B, N, H, T, T)}`` (reference softmax, fp32)."""
        self._single_process("attention_maps")
        maps = []
        x = self.embed(video)
        with torch.no_grad():
            for blk in self.blocks:
                maps.append(blk.attention_maps(x))
                x = blk(x)
        return maps


def _create(name: str, defaults: dict, kwargs: dict) -> STTransformer:
    return STTransformer(STTransformerConfig(name=name, **{**defaults, **kwargs}))


@register_model
def st_transformer_tiny(**kwargs) -> STTransformer:
    """ST transformer, ViT-Ti widths (192 wide, 12 blocks, 3 heads), 16 frames at 224 px, 16 px patches."""
    return _create("st_transformer_tiny", dict(embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def st_transformer_small(**kwargs) -> STTransformer:
    """ST transformer, ViT-S widths (384 wide, 12 blocks, 6 heads), 16 frames at 224 px, 16 px patches."""
    return _create("st_transformer_small", dict(embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def st_transformer_base(**kwargs) -> STTransformer:
    """ST transformer, ViT-B widths (768 wide, 12 blocks, 12 heads), 16 frames at 224 px, 16 px patches."""
    return _create("st_transformer_base", dict(embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def st_transformer_large(**kwargs) -> STTransformer:
    """ST transformer, ViT-L widths (1024 wide, 24 blocks, 16 heads), 16 frames at 224 px, 16 px patches."""
    return _create("st_transformer_large", dict(embed_dim=1024, depth=24, num_heads=16), kwargs)
