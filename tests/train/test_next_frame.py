"""``task: next_frame``: the ST transformer regresses frame t+1 from frames <= t on the
synthetic motion clips, and a short run of the built-in ``st_next_frame`` config beats
the copy-the-last-frame baseline on validation."""

import json

import torch
from torch import nn

from divattn.__main__ import main
from divattn.data import SyntheticMotion, collate_skipping
from divattn.train import distributed
from divattn.train.loop import evaluate_next_frame, next_frame_loss


class Shifted(nn.Module):
    """Predicts frame t+1 as ``a * frame t+1 + (1 - a) * frame t``: it peeks (a test oracle)."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, video):
        nxt = torch.cat([video[:, :, 1:], video[:, :, -1:]], 2)
        return self.a * nxt + (1 - self.a) * video


def test_loss_and_baseline_align_frame_t_with_frame_t_plus_1():
    data = SyntheticMotion(6, num_frames=4, img_size=16, labels=False)
    video, label, index = data[0]
    assert label == -1 and index == 0 and video.shape == (3, 4, 16, 16)
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate_skipping)
    dist = distributed.init("cpu")
    oracle = evaluate_next_frame(Shifted(1.0), loader, dist)
    copy = evaluate_next_frame(Shifted(0.0), loader, dist)
    half = evaluate_next_frame(Shifted(0.5), loader, dist)
    assert oracle["count"] == 6 and oracle["mse"] == 0.0
    assert copy["mse"] == copy["baseline_mse"] > 0
    torch.testing.assert_close(half["mse"], 0.25 * copy["baseline_mse"])
    clip = video[None]
    assert next_frame_loss(Shifted(1.0)(clip), clip) == 0


def test_short_run_beats_copy_last_frame(tmp_path):
    out = tmp_path / "run"
    # the built-in config cut to one short epoch (two blocks, 12 steps of 16 clips, a quick warmup)
    rc = main(["train", "--config", "st_next_frame", "-o", str(out), "model.depth=2", "train.epochs=1",
               "data.synthetic.train_size=192", "data.synthetic.val_size=64", "optim.lr=2e-3",
               "schedule.warmup_epochs=0.25", "data.num_workers=0", "log.tensorboard=false", "log.progress=false"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "next_frame" and summary["model"] == "st_transformer_tiny"
    assert summary["val_items"] == 64 and summary["val_top1"] is None
    assert summary["val_mse"] == summary["val_loss"]
    assert summary["val_mse"] < 0.97 * summary["baseline_mse"], summary
    log = (out / "train.log").read_text()
    assert "copy-last-frame baseline" in log
