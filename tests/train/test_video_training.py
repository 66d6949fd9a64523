"""Training and evaluation on real MP4 files, some of them broken."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import small_config
from divattn.data import DataError, SyntheticMotion, VideoDecodeError, export_synthetic
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
    # 12 items, 3 steps of 4 per epoch: every broken file is met once per epoch, counted and logged once
    assert summary["skipped_train_items"] == 4
    log = (tmp_path / "train.log").read_text()
    for name in ("empty.mp4", "text.mp4", "truncated.mp4", "corrupt.mp4"):
        assert log.count(f"skipped undecodable training file {video_folder / name}") == 1, name
    assert log.count("; 4 undecodable training files skipped") == 2
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["skipped"] for r in rows] == ["4", "4"]
    progress = load_checkpoint(str(tmp_path / "checkpoint.pt"))["progress"]
    assert sorted(progress["skipped_files"]) == sorted(str(video_folder / n) for n in
                                                       ("corrupt.mp4", "empty.mp4", "text.mp4", "truncated.mp4"))


def test_a_broken_validation_file_stops_the_run_before_the_first_step(tmp_path, video_folder, tiny_model_fn):
    cfg = _video_config(video_folder, "train.txt", "val_bad.txt", epochs=1)
    with pytest.raises(DataError, match=r"the validation set: 1 files do not decode \(\S*corrupt.mp4: .*"
                                        r"data.probe_val=false skips this check"):
        train(cfg, str(tmp_path), model_fn=tiny_model_fn)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_without_the_probe_evaluation_fails_after_the_epoch_checkpoint(tmp_path, video_folder, tiny_model_fn):
    cfg = _video_config(video_folder, "train.txt", "val_bad.txt", epochs=1)
    cfg["data"]["probe_val"] = False
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        train(cfg, str(tmp_path), model_fn=tiny_model_fn)
    progress = load_checkpoint(str(tmp_path / "checkpoint.pt"))["progress"]
    assert progress["epoch"] == 1 and progress["report_pending"]  # the epoch's training is kept


@pytest.mark.parametrize("change, message", [
    ({"root": "/nonexistent/videos"}, r"data.root='/nonexistent/videos' is not a folder"),
    ({"train_file": "/nonexistent/train.txt"}, r"data.train_file='/nonexistent/train.txt': no such file"),
    ({"num_classes": 2}, r"the training set: \d+ labels are outside \[0, 2\) \(\S+clip\d+.mp4 has [23]"),
])
def test_wrong_paths_and_labels_are_one_sentence_before_the_first_step(tmp_path, video_folder, change, message):
    cfg = _video_config(video_folder, "train.txt", "val.txt")
    cfg["data"].update(change)
    with pytest.raises(DataError, match=message):
        train(cfg, str(tmp_path), model_fn=lambda c, n, b: pytest.fail("built a model"))


def test_missing_files_are_counted_and_the_first_named(tmp_path, video_folder):
    listing = tmp_path / "train.txt"
    listing.write_text(open(video_folder / "train.txt").read() + "".join(f"gone{i}.mp4 1\n" for i in range(5)))
    cfg = _video_config(video_folder, str(listing), "val.txt")
    with pytest.raises(DataError, match=r"the training set: 5 of its 13 files are missing \(e.g. \S+gone0.mp4, "
                                        r"\S+gone1.mp4, \S+gone2.mp4\) \(data.root="):
        train(cfg, str(tmp_path), model_fn=lambda c, n, b: pytest.fail("built a model"))


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
