"""ViViT (Arnab et al., 2021) on the divattn ops: the paper's four model variants.

The official code (google-research/scenic, ``projects/vivit``) is the spec. Tubelet
embedding (``Conv3d``, ``tubelet_size`` frames x ``patch_size``^2 pixels), tokens in
``(t h w)`` order, pre-norm blocks with tanh-approximated GELU (as Flax / scenic) and
LayerNorm eps 1e-6. With T' = num_frames / tubelet_size temporal tokens and N patches
per frame:

- ``spatio_temporal`` (model 1): [cls +] T'*N tokens, position embeddings for all of
  them, joint attention over everything (with the cls token: the layout of
  ``transformers``' ``VivitModel``).
- ``factorised_encoder`` (model 2): a spatial ViT over each frame's [cls +] N tokens
  (``blocks``, ``spatial_norm``), pooled per frame, then a temporal transformer over
  the T' frame features with its own [cls token and] position embeddings
  (``temporal_blocks``: ``temporal_depth`` layers, 4 by default, with
  ``temporal_num_heads`` heads and ``temporal_mlp_dim`` MLP width, by default those
  of the spatial blocks).
- ``factorised_self_attention`` (model 3): each block runs spatial MSA, then temporal
  MSA (``attention_order="space_time"``, the paper's; ``"time_space"`` the other way
  round), then the MLP; no cls token.
- ``factorised_dot_product`` (model 4): each block's heads are split, the first half
  attend over time and the second half over space (scenic's assignment), on views of
  one qkv; no cls token.

Classifier (scenic's ``classifier``): ``"token"`` pools by the cls token (models 1 and
2; their default, as in the paper), ``"gap"`` / ``"gmp"`` / ``"gsp"`` by the mean / max
/ sum over tokens and have no cls token (``"gap"`` is the default of models 3 and 4,
which have no token). Model 2 pools both its spatial and its temporal transformer this
way. ``representation_size`` adds scenic's pre-logits layer (``Linear`` + ``tanh``,
``pre_logits.fc``) before the head.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import nn

from ..layers.blocks import ATTENTION_ORDERS, Block, FactorisedDotProductBlock, FactorisedSelfAttentionBlock
from ..layers.embed import TubeletEmbed, check_video
from ..ops.masks import with_real_cls
from ..sequence_parallel import SequenceParallelError
from .base import (
    VideoModel,
    VideoModelConfig,
    choice,
    collect_attention_maps,
    drop_path_rates,
    init_weights,
    masked_mean,
    resolve_config,
)
from .checkpoint import ConvertedCheckpoint, is_transformers_state_dict, layer_rules, rename_keys, top_rules
from .pos_embed import resize_pos_embed, resize_pos_embed_3d, resize_time_embed
from .ragged import Ragged
from .registry import register_model
from .scenic import is_scenic_checkpoint, scenic_checkpoint

VARIANTS = ("spatio_temporal", "factorised_encoder", "factorised_self_attention", "factorised_dot_product")
CLASSIFIERS = ("token", "gap", "gmp", "gsp")
_POOL_NAMES = {"token": "token", "gap": "avg", "gmp": "max", "gsp": "sum"}


# transformers >= 5 names ViViT layers ``layers.<i>`` with q/k/v/o projections; earlier
# versions (and the checkpoints on the Hub) use ``encoder.layer.<i>`` with query/key/value.
_TRANSFORMERS_LAYER = r"^(?:vivit\.)?(?:layers|encoder\.layer)\.(\d+)\."
_TRANSFORMERS_KEYS = [
    *top_rules(r"(?:vivit\.)?", {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }),
    *top_rules("", {"classifier.weight": "head.weight", "classifier.bias": "head.bias"}),
    *layer_rules(_TRANSFORMERS_LAYER, {
        "layernorm_before": "norm1",
        "attention.o_proj": "attn.proj",
        "attention.output.dense": "attn.proj",
        "layernorm_after": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    }),
]
_TRANSFORMERS_QKV = re.compile(_TRANSFORMERS_LAYER +
                               r"attention\.(?:(q|k|v)_proj|attention\.(query|key|value))\.(weight|bias)$")


def _fuse_qkv(sd: dict) -> dict:
    """Concatenate transformers' separate q, k, v projections into ``blocks.<i>.attn.qkv``."""
    parts, out = {}, {}
    for key, value in sd.items():
        m = _TRANSFORMERS_QKV.match(key)
        if m is None:
            out[key] = value
            continue
        which = "qkv"[("q", "k", "v", "query", "key", "value").index(m.group(2) or m.group(3)) % 3]
        parts.setdefault((m.group(1), m.group(4)), {})[which] = (key, value)
    for (layer, param), got in parts.items():
        if set(got) == {"q", "k", "v"}:
            out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([got[w][1] for w in "qkv"], 0)
        else:
            out.update(dict(got.values()))
    return out


def transformers_to_vivit(sd: dict) -> dict:
    """Rename a ``transformers`` ``Vivit*`` state dict to the bundled keys, q/k/v fused; keys the
    map does not know (a pooler, say) keep their names, so a strict load reports them."""
    return rename_keys(_fuse_qkv(dict(sd)), _TRANSFORMERS_KEYS)


def _positive_int(name: str, field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: {field} must be a positive int, got {value!r}")


@dataclass
class ViViTConfig(VideoModelConfig):
    """:class:`~divattn.models.base.VideoModelConfig` plus the ViViT fields (scenic's
    names in brackets):

    - ``variant``: one of :data:`VARIANTS` (``attention_config.type``).
    - ``temporal_depth``: layers of model 2's temporal transformer (4 by default, 0 for
      the other variants); ``temporal_num_heads`` / ``temporal_mlp_dim`` its heads and
      MLP width (``temporal_transformer.num_heads`` / ``.mlp_dim``; default
      ``num_heads`` / ``int(embed_dim * mlp_ratio)``; None for the other variants).
    - ``attention_order``: model 3's ``"space_time"`` (default, the paper's) or
      ``"time_space"`` (``attention_config.attention_order``).
    - ``classifier``: one of :data:`CLASSIFIERS` (``classifier``); default ``"token"``
      for models 1 and 2, ``"gap"`` for models 3 and 4 (which cannot use ``"token"``).
    - ``representation_size``: width of the pre-logits ``Linear`` + ``tanh`` layer, or
      None for none (``representation_size``).
    """

    name: str = "vivit_base"
    num_frames: int = 32
    tubelet_size: int = 2
    act: str = "gelu_tanh"
    interpolation: str = "bicubic"
    variant: str = "spatio_temporal"
    temporal_depth: Optional[int] = None
    temporal_num_heads: Optional[int] = None
    temporal_mlp_dim: Optional[int] = None
    attention_order: str = "space_time"
    classifier: Optional[str] = None
    representation_size: Optional[int] = None

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
        for field in ("temporal_num_heads", "temporal_mlp_dim"):
            if not factorised and getattr(self, field) is not None:
                raise ValueError(f"{self.name}: {field} applies to factorised_encoder only, got "
                                 f"{getattr(self, field)} with variant {self.variant!r}")
        if factorised:
            if self.temporal_num_heads is None:
                self.temporal_num_heads = self.num_heads
            if self.temporal_mlp_dim is None:
                self.temporal_mlp_dim = int(self.embed_dim * self.mlp_ratio)
            _positive_int(self.name, "temporal_num_heads", self.temporal_num_heads)
            _positive_int(self.name, "temporal_mlp_dim", self.temporal_mlp_dim)
            if self.embed_dim % self.temporal_num_heads != 0:
                raise ValueError(f"{self.name}: embed_dim {self.embed_dim} is not divisible by temporal_num_heads "
                                 f"{self.temporal_num_heads}")
        choice(self.name, "attention_order", self.attention_order, ATTENTION_ORDERS)
        if self.attention_order != "space_time" and self.variant != "factorised_self_attention":
            raise ValueError(f"{self.name}: attention_order applies to factorised_self_attention only, got "
                             f"{self.attention_order!r} with variant {self.variant!r}")
        has_token = self.variant in ("spatio_temporal", "factorised_encoder")
        if self.classifier is None:
            self.classifier = "token" if has_token else "gap"
        choice(self.name, "classifier", self.classifier, CLASSIFIERS)
        if self.classifier == "token" and not has_token:
            raise ValueError(f"{self.name}: {self.variant} has no cls token; classifier must be one of "
                             f"{CLASSIFIERS[1:]}, got 'token'")
        if self.representation_size is not None:
            _positive_int(self.name, "representation_size", self.representation_size)

    @property
    def temporal_tokens(self) -> int:
        return self.num_frames // self.tubelet_size


class ViViT(VideoModel):
    """ViViT for video ``(B, C, T, H, W)``; see the module docstring for the variants.

    Build it with :func:`divattn.models.create_model` (``vivit_base``, ``vivit_large``,
    ``variant=...``) or from a :class:`ViViTConfig` / its fields. Clips with another
    frame count or resolution get their position embeddings resized
    (``config.interpolation``). :func:`divattn.models.load_checkpoint` loads scenic
    checkpoints of all four variants (and ``transformers``' ``Vivit*``, model 1).
    """

    def __init__(self, config: Optional[ViViTConfig] = None, **kwargs):
        super().__init__(resolve_config(ViViTConfig, config, kwargs))
        c = self.config
        dim, Tt, N = c.embed_dim, c.temporal_tokens, c.grid[0] * c.grid[1]
        self.variant = c.variant
        self.global_pool = _POOL_NAMES[c.classifier]
        self.has_cls = c.classifier == "token"
        prefix = int(self.has_cls)
        self.patch_embed = TubeletEmbed(c.patch_size, c.tubelet_size, c.in_chans, dim)
        common = dict(qkv_bias=c.qkv_bias, drop=c.drop_rate, act=c.act, norm_eps=c.norm_eps, backend=c.backend)
        dpr = drop_path_rates(c.drop_path_rate, c.depth)
        if self.has_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if c.variant in ("spatio_temporal", "factorised_encoder"):
            tokens = prefix + (N if c.variant == "factorised_encoder" else Tt * N)
            self.blocks = nn.ModuleList([Block(dim, c.num_heads, c.mlp_ratio, drop_path=p, **common) for p in dpr])
        else:
            tokens = Tt * N
            if c.variant == "factorised_self_attention":
                block = partial(FactorisedSelfAttentionBlock, attention_order=c.attention_order)
            else:
                block = FactorisedDotProductBlock
            self.blocks = nn.ModuleList([block(dim, c.num_heads, Tt, c.mlp_ratio, drop_path=p, **common)
                                         for p in dpr])
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        if c.variant == "factorised_encoder":
            self.spatial_norm = nn.LayerNorm(dim, eps=c.norm_eps)
            if self.has_cls:
                self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.temporal_pos_embed = nn.Parameter(torch.zeros(1, prefix + Tt, dim))
            tdpr = drop_path_rates(c.drop_path_rate, c.temporal_depth)
            self.temporal_blocks = nn.ModuleList([Block(dim, c.temporal_num_heads, mlp_dim=c.temporal_mlp_dim,
                                                        drop_path=p, **common) for p in tdpr])
        self.norm = nn.LayerNorm(dim, eps=c.norm_eps)
        if c.representation_size is not None:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(dim, c.representation_size), act=nn.Tanh()))
            self.num_features = c.representation_size
        else:
            self.pre_logits = nn.Identity()
        self.head = self._make_head(c.num_classes)
        self._init_weights()
        self.set_memory(self.config.memory)

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("pos_embed"):
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights)

    def _check_parallel(self) -> None:
        c = self.config
        if c.variant == "spatio_temporal":
            raise SequenceParallelError(f"{c.name}: spatio_temporal (model 1) attends over every token of the clip at "
                                        "once; sharding frames serves factorised_encoder, factorised_self_attention "
                                        "and factorised_dot_product")
        if c.classifier == "gmp" and c.variant != "factorised_encoder":
            raise SequenceParallelError(f"{c.name}: classifier 'gmp' (a max over the clip's tokens) is not supported "
                                        "on frame shards; 'gap' and 'gsp' are")

    def convert_checkpoint(self, checkpoint) -> ConvertedCheckpoint:
        """A scenic checkpoint file or tree read and renamed by
        :func:`~divattn.models.scenic.scenic_checkpoint`; anything else as
        :meth:`VideoModel.convert_checkpoint <divattn.models.VideoModel.convert_checkpoint>` reads it."""
        if is_scenic_checkpoint(checkpoint):
            return scenic_checkpoint(checkpoint, self)
        return super().convert_checkpoint(checkpoint)

    def checkpoint_filter_fn(self, state_dict: dict) -> dict:
        """A ``transformers`` state dict renamed and q/k/v fused (:func:`transformers_to_vivit`);
        others as they are."""
        return transformers_to_vivit(state_dict) if is_transformers_state_dict(state_dict) else state_dict

    def _grid(self, video: torch.Tensor) -> tuple:
        c = self.config
        check_video(video, c.in_chans, c.patch_size, c.tubelet_size)
        _, _, T, H, W = video.shape
        return T // c.tubelet_size, H // c.patch_size, W // c.patch_size

    def embed(self, video: torch.Tensor, ragged: Optional[Ragged] = None) -> torch.Tensor:
        """Tokens entering the first block: ``(B, [1 +] T'*N, C)`` in ``(t h w)`` order
        (factorised_encoder: ``(B*T', [1 +] N, C)``, one sequence per frame); parallelized, for
        this rank's T' temporal tokens. A padded batch (``ragged``) gets each sample's position
        embeddings resized to its own size."""
        c = self.config
        Tt, h, w = self._grid(video)
        _, frames, start = self._frames(video)
        g = self.patch_embed(video)  # (B, C, T', h, w)
        B, C = g.shape[:2]
        prefix = int(self.has_cls)
        if self.variant == "factorised_encoder":
            pos = resize_pos_embed(self.pos_embed, (h, w), num_prefix=prefix, old_grid=c.grid, mode=c.interpolation)
            patch_pos = pos[:, prefix:]
            if ragged is not None:
                patch_pos = ragged.grid_embed(self.pos_embed[:, prefix:], c.grid, c.interpolation)  # (B, N, C)
                patch_pos = patch_pos[:, None].expand(B, Tt, h * w, C).reshape(B * Tt, h * w, C)
            x = g.flatten(3).permute(0, 2, 3, 1).reshape(B * Tt, h * w, C) + patch_pos
            if self.has_cls:
                x = torch.cat([(self.cls_token + pos[:, :1]).expand(B * Tt, -1, -1), x], 1)
            return self.pos_drop(x)
        x = g.flatten(2).transpose(1, 2)
        if self.has_cls:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1)
        if ragged is None:
            pos = resize_pos_embed_3d(self.pos_embed, (c.temporal_tokens, *c.grid), (frames, h, w), num_prefix=prefix,
                                      mode=c.interpolation)
            if Tt != frames:
                pos = pos[:, start * h * w: (start + Tt) * h * w]  # this rank's frames (no cls: model 1 is refused)
        else:
            pos = ragged.grid3d_embed(self.pos_embed, (c.temporal_tokens, *c.grid), prefix, c.interpolation)
        return self.pos_drop(x + pos)

    def pool(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, L, C)`` tokens -> ``(B, C)`` by ``config.classifier``: the cls token (first),
        or the mean / max / sum over the L tokens (with ``mask`` ``(B, L)``, over the real ones;
        0 for a sample with none)."""
        if self.global_pool == "token":
            return x[:, 0]
        if mask is None:
            if self.global_pool == "avg":
                return x.mean(1)
            if self.global_pool == "max":
                return x.amax(1)
            return x.sum(1)
        if self.global_pool == "avg":
            return masked_mean(x, mask)
        keep = mask[..., None]
        if self.global_pool == "max":
            return torch.where(keep.any(1), x.masked_fill(~keep, -torch.inf).amax(1), 0.0)
        return (x * keep.to(x.dtype)).sum(1)

    def _temporal_tokens(self, frames: torch.Tensor, ragged: Optional[Ragged] = None) -> torch.Tensor:
        """Model 2: the temporal transformer's input from the pooled frame features ``(B, T', C)``."""
        B, Tt, _ = frames.shape
        pos = self.temporal_pos_embed
        prefix = int(self.has_cls)
        if ragged is None:
            time = resize_time_embed(pos[:, prefix:], Tt, mode=self.config.interpolation)
        else:
            time = ragged.time_embed(pos[:, prefix:], self.config.interpolation)  # (B, T', C)
        pos = torch.cat([pos[:, :prefix].expand(time.shape[0], -1, -1), time], 1)
        if self.has_cls:
            frames = torch.cat([self.temporal_cls_token.expand(B, -1, -1), frames], 1)
        return self.pos_drop(frames + pos)

    def _frame_features(self, x: torch.Tensor, B: int, Tt: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Model 2: the spatial transformer's output ``(B*T', [1 +] N, C)`` -> pooled ``(B, T', C)``
        (``mask``: its real tokens)."""
        return self.pool(self.spatial_norm(x), mask).view(B, Tt, -1)

    def _masks(self, ragged: Ragged) -> tuple:
        """The real tokens as the blocks take them (see :mod:`divattn.layers.blocks`), and those
        of ``forward_features``' output: model 2 ``((B*T', [1+]N), (B, [1+]T'))`` for its
        spatial and its temporal blocks."""
        real = ragged.tokens()  # (B, T', N)
        B, Tt, N = real.shape
        cls = with_real_cls if self.has_cls else (lambda m: m)
        if self.variant == "factorised_encoder":
            return cls(real.reshape(B * Tt, N)), cls(ragged.real_frames())
        tokens = cls(real.reshape(B, Tt * N))
        if self.variant == "spatio_temporal":
            # a padding of whole frames leaves each clip's [cls] + (t h w) tokens a prefix
            blocks = ragged.lengths(int(self.has_cls)) if ragged.whole_frames else tokens
            return blocks, tokens
        return ragged.divided(), tokens

    def feature_mask(self, ragged: Optional[Ragged]) -> Optional[torch.Tensor]:
        return None if ragged is None else self._masks(ragged)[1]

    def forward_features(self, video: torch.Tensor, frames=None, sizes=None, mask=None) -> torch.Tensor:
        """Token features after the final norm: ``(B, [1 +] T'*N, C)``; factorised_encoder:
        the temporal transformer's ``(B, [1 +] T', C)``. A padded batch's ``frames``,
        ``sizes``, ``mask``: :mod:`divattn.models.ragged` (:meth:`feature_mask` gives the
        output's real tokens)."""
        return self._features(video, self.ragged(video, frames, sizes, mask))

    def _features(self, video: torch.Tensor, ragged: Optional[Ragged]) -> torch.Tensor:
        Tt = self._grid(video)[0]
        x = self.embed(video, ragged)
        blocks, out = (None, None) if ragged is None else self._masks(ragged)
        if self.variant != "factorised_encoder":
            return self.norm(self._run_blocks(self.blocks, x, num_frames=Tt, mask=blocks))
        spatial, temporal = blocks, out
        if ragged is not None and ragged.whole_frames:  # the blocks take counts, the pooling the masks
            prefix = int(self.has_cls)
            spatial, temporal = ragged.lengths(prefix, per_frame=True), ragged.lengths(prefix, frame_tokens=1)
        x = self._frame_features(self._run_blocks(self.blocks, x, mask=spatial), video.shape[0], Tt, blocks)
        if self.sequence is not None:
            x = self.sequence.gather(x, 1)  # every frame's features: the temporal transformer runs on every rank
        return self.norm(self._run_blocks(self.temporal_blocks, self._temporal_tokens(x, ragged), mask=temporal))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pool the ``forward_features`` tokens (:meth:`pool`, over the real ones with ``mask``),
        then the pre-logits layer when ``representation_size`` is set; ``pre_logits=True``
        returns that ``(B, num_features)``. Parallelized, models 3 and 4 pool over the tokens
        of every rank."""
        if self.sequence is not None and self.variant != "factorised_encoder":
            total = self.sequence.all_reduce(x.sum(1))
            x = total / (x.shape[1] // self.sequence.local_frames * self.sequence.num_frames) \
                if self.global_pool == "avg" else total
        else:
            x = self.pool(x, mask)
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    @torch.no_grad()
    def attention_maps(self, video: torch.Tensor) -> list:
        """Per block, a dict of attention probabilities (reference softmax, fp32).

        spatio_temporal: ``"joint"`` ``(B, H, L, L)``; factorised_encoder: the spatial
        blocks' ``"spatial"`` ``(B, T', H, [1+]N, [1+]N)``, then the temporal blocks'
        ``"temporal"`` ``(B, H_t, [1+]T', [1+]T')``; factorised_self_attention: ``"spatial"``
        ``(B, T', H, N, N)`` and ``"temporal"`` ``(B, N, H, T', T')``;
        factorised_dot_product: the same with H/2 heads each (temporal: heads
        ``[0, H/2)``, spatial: ``[H/2, H)``).
        """
        self._single_process("attention_maps")
        Tt = self._grid(video)[0]
        x = self.embed(video)
        if self.variant != "factorised_encoder":
            self._sync_frames(self.blocks, Tt)
            return collect_attention_maps(self.blocks, x)[0]

        def per_frame(m):
            return {"spatial": m["joint"].view(-1, Tt, *m["joint"].shape[1:])}

        spatial, x = collect_attention_maps(self.blocks, x, per_frame)
        x = self._temporal_tokens(self._frame_features(x, video.shape[0], Tt))
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
