"""Parameter counts against the papers' tables (models built on the meta device: no memory)."""

import math

import pytest
import torch

from divattn.models import create_model


def count(name, **kw) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, **kw).parameters())


def matches_paper(n: int, paper_millions: float) -> bool:
    """The papers print millions to one decimal, rounded (TimeSformer, ViViT model 2) or cut
    (ViViT models 1 and 4: 88.95M printed as 88.9); accept either, nothing looser."""
    tenths = n / 1e5
    return round(paper_millions * 10) in (round(tenths), math.floor(tenths))


C, HID = 768, 3072
ATTN = 4 * C * C + 4 * C                    # qkv (with bias) + proj
LAYER = ATTN + 2 * C * HID + HID + C + 4 * C  # attention, MLP, two LayerNorms
PATCH = 3 * 16 * 16 * C + C                   # Conv2d patch embedding
POS = 197 * C + C                             # position embeddings (cls + 14 x 14) and the cls token
NORM_HEAD = 2 * C + 174 * C + 174             # final norm and a 174-class head


@pytest.mark.parametrize("attention_type,paper,exact", [
    # TimeSformer Table 1 (174 classes, 8 x 224): divided adds temporal norm, attention and fc.
    ("divided_space_time", 121.4, 12 * (LAYER + 2 * C + ATTN + C * C + C) + PATCH + POS + 8 * C + NORM_HEAD),
    ("joint_space_time", 85.9, 12 * LAYER + PATCH + POS + 8 * C + NORM_HEAD),
    ("space_only", 85.9, 12 * LAYER + PATCH + POS + NORM_HEAD),
], ids=["divided", "joint", "space_only"])
def test_timesformer_matches_paper(attention_type, paper, exact):
    n = count("timesformer_base", num_classes=174, attention_type=attention_type)
    assert n == exact
    assert matches_paper(n, paper), n


TUBELET = 3 * 2 * 16 * 16 * C + C
HEAD = 400 * C + 400


@pytest.mark.parametrize("variant,paper,exact", [
    # ViViT Table 2 (ViViT-B/16x2, 32 frames, 400 classes); 16 x 196 tubelets.
    ("spatio_temporal", 88.9, 12 * LAYER + TUBELET + C + (1 + 16 * 196) * C + 2 * C + HEAD),
    ("factorised_encoder", 115.1, 16 * LAYER + TUBELET + C + 197 * C + 2 * C + C + 17 * C + 2 * C + HEAD),
    ("factorised_self_attention", 117.3, 12 * (LAYER + ATTN + 2 * C) + TUBELET + 16 * 196 * C + 2 * C + HEAD),
    ("factorised_dot_product", 88.9, 12 * LAYER + TUBELET + 16 * 196 * C + 2 * C + HEAD),
], ids=["model1", "model2", "model3", "model4"])
def test_vivit_matches_paper(variant, paper, exact):
    n = count("vivit_base", num_classes=400, num_frames=32, variant=variant)
    assert n == exact
    assert matches_paper(n, paper), n


def test_heads_and_depths_follow_config():
    assert count("vivit_base", variant="factorised_encoder", temporal_depth=2) == \
        count("vivit_base", variant="factorised_encoder") - 2 * LAYER
    assert count("timesformer_base", num_classes=0) == count("timesformer_base", num_classes=400) - HEAD
