"""``data.variable_frames``: the built-in ``synthetic_variable_frames`` config (synthetic
videos of 3 to 8 frames, each clip its own length) trains briefly; the batches reach the
model padded, with each clip's frame count, in training and in evaluation."""

import json

import pytest
import torch

from divattn.__main__ import main
from divattn.train import loop, tasks
from divattn.train.config import ConfigError


def test_variable_frames_config_trains_on_padded_batches(tmp_path, monkeypatch):
    seen = []
    run_model = tasks.run_model

    def recording(model, video, frames, sequence=None):
        seen.append(None if frames is None else frames.tolist())
        return run_model(model, video, frames, sequence)

    monkeypatch.setattr(loop, "run_model", recording)
    monkeypatch.setattr(tasks, "run_model", recording)
    out = tmp_path / "run"
    rc = main(["train", "--config", "synthetic_variable_frames", "-o", str(out), "train.epochs=1",
               "train.batch_size=16", "data.synthetic.train_size=64", "data.synthetic.val_size=32",
               "data.num_workers=0", "log.tensorboard=false", "log.progress=false"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_items"] == 32 and summary["val_loss"] == summary["val_loss"]  # finite, not NaN
    assert len(seen) == 4 + 1  # 4 training steps of 16, the 32 validation clips in one batch
    assert all(f is not None and min(f) >= 3 and max(f) <= 8 and len(set(f)) > 1 for f in seen), seen


def test_run_model_repeats_frames_per_view():
    class Echo(torch.nn.Module):
        def forward(self, video, frames=None):
            return frames

    video = torch.zeros(2, 3, 1, 4, 1, 1)  # (B, V, C, T, H, W)
    assert tasks.run_model(Echo(), video, torch.tensor([4, 2])).tolist() == [4, 4, 4, 2, 2, 2]
    assert tasks.run_model(Echo(), video, None) is None


def test_variable_frames_with_sequence_parallelism_is_refused(tmp_path, capsys):
    """Padded batches run in one process; a sequence group's ranks hold equal frame shards."""
    args = ["train", "--config", "synthetic_variable_frames", "-o", str(tmp_path / "run"), "parallel.sequence=2",
            "data.num_workers=0", "log.tensorboard=false", "log.progress=false"]
    assert main(args) == 2
    assert "parallel.sequence > 1 with data.variable_frames=true" in capsys.readouterr().err
    with pytest.raises(ConfigError):  # --debug: the traceback
        main(args + ["--debug"])
