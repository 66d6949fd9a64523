import copy

import pytest
import torch
from torch import nn

from divattn.train import DEFAULTS
from divattn.train.config import merge


class TinyVideoNet(nn.Module):
    """A small 3-D conv net: fast on CPU, with dropout so the RNG matters on resume."""

    def __init__(self, num_classes, drop=0.2):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, (3, 4, 4), stride=(1, 4, 4))
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(8, num_classes)

    def forward(self, video):
        x = self.conv(video).relu().mean((2, 3, 4))
        return self.head(self.drop(self.norm(x)))


@pytest.fixture
def tiny_model_fn():
    return lambda cfg, num_classes, backend: TinyVideoNet(num_classes)


def small_config(**sections):
    """The defaults shrunk to a few seconds of CPU, then ``sections`` merged in."""
    cfg = copy.deepcopy(DEFAULTS)
    cfg = merge(cfg, {
        "data": {"num_frames": 4, "crop_size": 16, "num_workers": 0,
                 "synthetic": {"train_size": 48, "val_size": 20}},
        "model": {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
        "train": {"epochs": 2, "batch_size": 8, "checkpoint_every": 2, "log_every": 1},
        "eval": {"batch_size": 8},
        "log": {"progress": False, "tensorboard": False},
    })
    return merge(cfg, sections)
