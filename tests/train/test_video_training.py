"""Training and evaluation on real MP4 files, some of them broken."""

import json

import numpy as np
import pytest
import torch

from conftest import small_config
from divattn.data import SyntheticMotion, VideoDecodeError, export_synthetic
from divattn.train import load_checkpoint, train

pytest.importorskip("av")


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    ds = SyntheticMotion(12, num_frames=12, img_size=24, seed=0)
    train_list = export_synthetic(ds, str(folder), range(8), list_name="train.txt")
    val_list = export_synthetic(ds, str(folder), range(8, 12), list_name="val.txt")
    good = (folder / "clip000000.mp4").read_bytes()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("not a video")
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, len(good), dtype=np.uint8).tobytes())
    broken = ["empty.mp4 0", "text.mp4 1", "truncated.mp4 2", "corrupt.mp4 3"]
    mixed = folder / "train_mixed.txt"
    mixed.write_text(open(train_list).read() + "\n".join(broken) + "\n")
    bad_val = folder / "val_bad.txt"
    bad_val.write_text(open(val_list).read() + "corrupt.mp4 1\n")
    return folder


def _video_config(folder, train_file, val_file, **train):
    return small_config(
        data={"dataset": "list", "root": str(folder), "train_file": str(folder / train_file),
              "val_file": str(folder / val_file), "num_classes": 4, "num_frames": 4, "sampling_rate": 2,
              "crop_size": 16, "train_scale": [18, 22], "test_scale": 16, "test_crops": 3, "decoder": "pyav",
              "num_workers": 1},
        train={"epochs": 2, "batch_size": 4, **train})


def test_training_skips_and_counts_broken_files_and_evaluates_three_crops(tmp_path, video_folder, tiny_model_fn):
    cfg = _video_config(video_folder, "train_mixed.txt", "val.txt")
    summary = train(cfg, str(tmp_path), model_fn=tiny_model_fn)
    assert summary["val_items"] == 4 and summary["epochs"] == 2
    # 12 items, 3 steps of 4 per epoch: every broken file is met once per epoch
    assert summary["skipped_train_items"] == 8
    log = (tmp_path / "train.log").read_text()
    for name in ("empty.mp4", "text.mp4", "truncated.mp4", "corrupt.mp4"):
        assert log.count(f"skipped undecodable training file {video_folder / name}") == 2, name
    assert "4 undecodable training files skipped" in log
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["progress"]["skipped_items"] == 8


def test_a_broken_file_in_evaluation_is_an_error(tmp_path, video_folder, tiny_model_fn):
    cfg = _video_config(video_folder, "train.txt", "val_bad.txt", epochs=1)
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        train(cfg, str(tmp_path), model_fn=tiny_model_fn)


def test_multi_view_scores_are_the_mean_of_the_views_softmax(video_folder):
    from divattn.data import collate_skipping
    from divattn.data.build import build_datasets
    from divattn.train.distributed import Dist
    from divattn.train.loop import evaluate

    cfg = _video_config(video_folder, "train.txt", "val.txt")
    _, val_set, _ = build_datasets(cfg["data"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool3d((1, 2, 2)), torch.nn.Flatten(), torch.nn.Linear(12, 4))
    loader = torch.utils.data.DataLoader(val_set, batch_size=3, collate_fn=collate_skipping)
    result = evaluate(model, loader, Dist(0, 1, 0, torch.device("cpu")))

    top1 = top5 = loss = 0.0
    for i in range(len(val_set)):
        views, label, _ = val_set[i]
        assert views.shape == (3, 3, 4, 16, 16)
        with torch.no_grad():
            probs = model(views).softmax(-1).mean(0)
        top1 += float(probs.argmax() == label)
        top5 += 1.0
        loss -= float(probs[label].log())
    assert result["count"] == 4
    assert result["top1"] == pytest.approx(100 * top1 / 4)
    assert result["top5"] == pytest.approx(100 * top5 / 4)
    assert result["loss"] == pytest.approx(loss / 4, rel=1e-5)
