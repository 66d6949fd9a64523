"""What every bundled video model shares: config, head, backend, gradient checkpointing, checkpoint conversion."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.attention import Attention
from ..layers.mlp import ACTIVATIONS, Mlp
from ..layers.recompute import check_memory
from ..ops import BACKENDS
from ..sequence_parallel import FrameShards, SequenceParallelError, shard_of
from .checkpoint import ConvertedCheckpoint, is_transformers_state_dict, read_state_dict
from .pos_embed import MODES
from .ragged import Ragged, ragged_batch
from .scenic import is_scenic_checkpoint


@dataclass
class VideoModelConfig:
    """Architecture of a bundled video model; ``dataclasses.asdict(config)`` gives a plain dict.

    ``tubelet_size`` is the temporal patch size (1: per-frame patches), ``act`` the MLP
    activation (``"gelu"`` exact, ``"gelu_tanh"``), ``interpolation`` how position /
    time embeddings are resized when a clip or checkpoint has another size
    (``"nearest"``, ``"bilinear"``, ``"bicubic"``), ``backend`` the divattn backend of
    every attention (None: auto / ``DIVATTN_BACKEND``), ``memory`` what the blocks save
    for the backward: ``"fast"`` (every input of a matmul) or ``"min"`` (recompute the
    LayerNorm and GELU outputs in the backward instead; :mod:`divattn.layers.recompute`).
    """

    name: str = ""
    num_classes: int = 400
    num_frames: int = 8
    img_size: int = 224
    patch_size: int = 16
    tubelet_size: int = 1
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    act: str = "gelu"
    interpolation: str = "nearest"
    backend: Optional[str] = None
    memory: str = "fast"

    def __post_init__(self):
        for field in ("num_frames", "img_size", "patch_size", "tubelet_size", "in_chans", "embed_dim", "depth",
                      "num_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.name or 'config'}: {field} must be a positive int, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"{self.name}: num_classes must be an int >= 0 (0: no head), got {self.num_classes!r}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"{self.name}: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(f"{self.name}: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_frames % self.tubelet_size != 0:
            raise ValueError(f"{self.name}: num_frames {self.num_frames} is not a multiple of "
                             f"tubelet_size {self.tubelet_size}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"{self.name}: act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.interpolation not in MODES:
            raise ValueError(f"{self.name}: interpolation must be one of {MODES}, got {self.interpolation!r}")
        check_backend(self.backend)
        check_memory(self.memory)
        for field in ("drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{self.name}: {field} must be in [0, 1), got {getattr(self, field)!r}")

    @property
    def grid(self) -> tuple:
        """``(h, w)`` patches per frame at ``img_size``."""
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_backend(backend: Optional[str]) -> None:
    """ValueError unless ``backend`` is None or a divattn backend name."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {tuple(BACKENDS)}, got {backend!r}")


def resolve_config(config_type: type, config: Optional[VideoModelConfig], kwargs: dict) -> VideoModelConfig:
    """``config``, or a ``config_type`` built from ``kwargs``; TypeError when both are given."""
    if config is None:
        return config_type(**kwargs)
    if kwargs:
        raise TypeError(f"pass either a {config_type.__name__} or keyword arguments, not both")
    return config


def choice(name: str, field: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}: {field} must be one of {allowed}, got {value!r}")


def drop_path_rates(rate: float, depth: int) -> list:
    """Stochastic depth rising linearly from 0 at the first block to ``rate`` at the last."""
    return torch.linspace(0, rate, depth, device="cpu").tolist()


def init_weights(module: nn.Module) -> None:
    """timm / official ViT init: Linear weights trunc-normal(0.02), biases 0, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def collect_attention_maps(blocks: Iterable[nn.Module], x: torch.Tensor, rename: Optional[Callable] = None):
    """``([rename(blk.attention_maps(x_i)) for each block], output)``, running the blocks in turn."""
    maps = []
    for blk in blocks:
        m = blk.attention_maps(x)
        maps.append(rename(m) if rename is not None else m)
        x = blk(x)
    return maps, x


class VideoModel(nn.Module):
    """Base of the bundled models: ``forward(video)`` with video ``(B, C, T, H, W)``.

    Subclasses build ``head`` and the blocks and implement ``forward_features`` (token
    features after the final norm), ``_features`` (the same from a resolved padded batch,
    what ``forward`` calls) and ``attention_maps``; ``global_pool`` is ``"token"`` (the cls
    token) or ``"avg"`` (mean over tokens).

    :meth:`parallelize` shards each clip's frames over a process group (``sequence``, a
    :class:`~divattn.sequence_parallel.FrameShards`, is then set on the model and its blocks).

    A padded batch of clips of different lengths and sizes is one video plus ``frames``,
    ``sizes`` and / or a token ``mask`` (:mod:`divattn.models.ragged`): each sample's
    output is that of the clip alone at its own size.
    """

    global_pool = "token"
    sequence: Optional[FrameShards] = None

    def __init__(self, config: VideoModelConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = self.embed_dim = config.embed_dim
        self.grad_checkpointing = False

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        init_weights(head)
        return head

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised ``Linear(num_features, num_classes)`` (0: none)."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"reset_classifier: num_classes must be an int >= 0, got {num_classes!r}")
        ref = next(self.parameters())
        self.head = self._make_head(num_classes).to(device=ref.device, dtype=ref.dtype)
        self.num_classes = self.config.num_classes = num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of storing them."""
        self.grad_checkpointing = bool(enable)

    def attention_layers(self) -> list:
        """The blocks whose attention runs on the divattn ops, in order."""
        return [m for m in self.modules() if m is not self and hasattr(m, "attention_maps")]

    def set_backend(self, backend: Optional[str]) -> int:
        """Run every attention on ``backend`` (None: auto); returns the number of attention layers."""
        check_backend(backend)
        for m in self.modules():
            if m is not self and hasattr(m, "backend"):
                m.backend = backend
        self.config.backend = backend
        return len(self.attention_layers())

    def set_memory(self, mode: str) -> None:
        """``"fast"`` or ``"min"``: what every block saves for the backward (see the config)."""
        check_memory(mode)
        for m in self.modules():
            if isinstance(m, (Attention, Mlp)):
                m.memory = mode
        self.config.memory = mode

    def parallelize(self, group, *, num_frames: Optional[int] = None, check_inputs: bool = True) -> "VideoModel":
        """Run on one shard of each clip's frames per rank of ``group`` (None: undo); returns the model.

        Every rank of ``group`` calls this with the same model (the same config and weights,
        checked with one all-gather) and then gives the model its frames of the same clip,
        ``model.sequence.shard(video)`` (:class:`~divattn.sequence_parallel.FrameShards`):
        rank r gets frames ``[start, stop)`` of ``num_frames`` (default ``config.num_frames``;
        a clip of another length needs another ``parallelize``). The outputs are those of the
        whole clip: logits and pooled features on every rank, token features and the ST
        transformer's predicted frames for this rank's frames. Parameter gradients: the
        mean over the group of the ranks' gradients is the whole clip's
        (:func:`~divattn.sequence_parallel.average_gradients`, or DDP over every rank).

        Spatial attention runs on the local frames; temporal attention on all frames of
        this rank's patches, between two all-to-alls of C values per token per block; the
        TimeSformer cls token's mean over frames is completed with an all-reduce. Per-token
        dropout (``drop_rate > 0``) is refused in training (stochastic depth is fine: the
        ranks draw alike when seeded alike); joint attention over the whole clip and
        KV-cached generation are refused. ``check_inputs`` (default on) gathers every
        rank's input shape at each forward, so that a rank given the wrong shard stops the
        whole group with one :class:`~divattn.sequence_parallel.SequenceParallelError`.
        """
        if group is None:
            shards = None
        else:
            self._check_parallel()
            c = self.config
            frames = c.num_frames if num_frames is None else num_frames
            if not isinstance(frames, int) or frames % c.tubelet_size:
                raise SequenceParallelError(f"parallelize: num_frames must be a multiple of tubelet_size "
                                            f"{c.tubelet_size}, got {frames!r}")
            shards = FrameShards(group, frames // c.tubelet_size, tubelet_size=c.tubelet_size,
                                 check_inputs=check_inputs)
            with torch.no_grad():
                checksum = sum(float(p.double().square().sum() + p.double().sum()) for p in self.parameters())
            shards.agree({"model": type(self).__name__, "config": c.to_dict(), "weights": checksum})
        for m in self.modules():
            if hasattr(type(m), "sequence"):
                m.sequence = shards
        return self

    def _check_parallel(self) -> None:
        """Raise :class:`~divattn.sequence_parallel.SequenceParallelError` when this model's
        configuration cannot run on frame shards."""

    def _frames(self, video: torch.Tensor) -> tuple:
        """``(T_local, T, start)`` in temporal tokens for the clip or shard ``video`` ``(B, C, T, H, W)``:
        this input's, the whole clip's, and the first of this input's (``(T, T, 0)`` unparallelized)."""
        shards = self.sequence
        if shards is None:
            mark = shard_of(video)
            if mark is not None:
                raise SequenceParallelError(
                    f"{type(self).__name__} is not parallelized but was given rank {mark[0]}'s frame shard of a clip "
                    f"split over {mark[1]} ranks; call model.parallelize(group) on every rank first")
            T = video.shape[2] // self.config.tubelet_size
            return T, T, 0
        if self.training:
            dropout = [(n, m.p) for n, m in self.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
            if dropout:
                raise SequenceParallelError(
                    f"{type(self).__name__}: per-token dropout ({dropout[0][0]}, p={dropout[0][1]}) in training on "
                    "frame shards: the ranks would drop different values of what they hold alike (the cls token, "
                    "pooled features); set drop_rate=0 (drop_path_rate is fine)")
        shards.check_input(video, 2)
        return shards.local_frames, shards.num_frames, shards.start

    def _single_process(self, what: str) -> None:
        if self.sequence is not None:
            raise SequenceParallelError(f"{type(self).__name__}.{what} runs in one process; this model is "
                                        "parallelized over frames (model.parallelize(None) undoes it)")

    def no_weight_decay(self) -> set:
        """Names of the embedding parameters (timm convention: no weight decay on these)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("cls_token", "pos_embed", "time_embed"))}

    @staticmethod
    def _sync_frames(blocks: nn.ModuleList, num_frames: int) -> None:
        """Tell the blocks that split tokens by frame how many frames this clip has."""
        for blk in blocks:
            if getattr(blk, "num_frames", num_frames) != num_frames:
                blk.num_frames = num_frames

    def ragged(self, video: torch.Tensor, frames=None, sizes=None, mask=None) -> Optional[Ragged]:
        """The padded batch's real tokens (:func:`~divattn.models.ragged.ragged_batch`), or None."""
        c = self.config
        if self.sequence is not None and (frames is not None or sizes is not None or mask is not None):
            raise SequenceParallelError(f"{type(self).__name__}: a padded batch (frames / sizes / mask) runs in one "
                                        "process; this model is parallelized over frames (its ranks hold frame "
                                        "shards of equal length)")
        return ragged_batch(video, frames=frames, sizes=sizes, mask=mask, patch_size=c.patch_size,
                            tubelet_size=c.tubelet_size, who=type(self).__name__)

    def feature_mask(self, ragged: Optional[Ragged]) -> Optional[torch.Tensor]:
        """The real tokens ``(B, L)`` of ``forward_features``' output for a padded batch, for
        pooling over them; None where the pooling needs none (the cls token)."""
        return None

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, num_frames: Optional[int] = None,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None:  # a padded batch: the blocks' attention takes its real tokens
            if num_frames is not None:
                self._sync_frames(blocks, num_frames)
            for blk in blocks:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(blk, x, mask, use_reentrant=False)
                else:
                    x = blk(x, mask)
            return x
        if isinstance(num_frames, torch.SymInt):
            # a dynamic frame count while torch.export traces: the blocks hold it for this trace only
            saved = [(blk, blk.num_frames) for blk in blocks if hasattr(blk, "num_frames")]
            try:
                for blk, _ in saved:
                    blk.num_frames = num_frames
                return self._run_blocks(blocks, x)
            finally:
                for blk, frames in saved:
                    blk.num_frames = frames
        if num_frames is not None:
            self._sync_frames(blocks, num_frames)
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def convert_checkpoint(self, checkpoint) -> ConvertedCheckpoint:
        """``checkpoint`` (a path or a mapping) in this model's state-dict keys; what
        :func:`~divattn.models.load_checkpoint` loads.

        The state dict :func:`~divattn.models.read_state_dict` finds, passed through
        :meth:`checkpoint_filter_fn`. A scenic checkpoint raises TypeError (only
        :class:`~divattn.models.ViViT` reads one).
        """
        if is_scenic_checkpoint(checkpoint):
            raise TypeError(f"load_checkpoint: a scenic checkpoint holds a ViViT, not a {type(self).__name__}")
        return ConvertedCheckpoint(self.checkpoint_filter_fn(read_state_dict(checkpoint)))

    def checkpoint_filter_fn(self, state_dict: dict) -> dict:
        """Rename another codebase's keys to this model's (timm's ``checkpoint_filter_fn``).

        The identity here; a ``transformers`` state dict raises TypeError (only
        :class:`~divattn.models.TimeSformer` and :class:`~divattn.models.ViViT` convert one).
        """
        if is_transformers_state_dict(state_dict):
            raise TypeError(f"load_checkpoint: expected a bundled TimeSformer or ViViT, got {type(self).__name__}")
        return state_dict

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _features(self, video: torch.Tensor, ragged: Optional[Ragged]) -> torch.Tensor:
        """``forward_features`` of a padded batch whose real tokens are resolved (None: no padding)."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pool the ``forward_features`` tokens; ``pre_logits=True`` returns the pooled ``(B, C)``
        features. ``mask`` ``(B, L)`` (:meth:`feature_mask`): average over the real tokens only."""
        if self.global_pool == "token":
            x = x[:, 0]
        else:
            x = x.mean(1) if mask is None else masked_mean(x, mask)
        return x if pre_logits else self.head(x)

    def forward(self, video: torch.Tensor, frames=None, sizes=None, mask=None) -> torch.Tensor:
        """Logits ``(B, num_classes)`` (pooled features when ``num_classes == 0``) for ``(B, C, T, H, W)``;
        of a padded batch with ``frames``, ``sizes`` and / or ``mask`` (:mod:`divattn.models.ragged`)."""
        ragged = self.ragged(video, frames, sizes, mask)
        return self.forward_head(self._features(video, ragged), mask=self.feature_mask(ragged))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` ``(B, L, C)`` over the tokens where ``mask`` ``(B, L)`` is True (0 where none is)."""
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1)
