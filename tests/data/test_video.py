"""Real MP4 files written with PyAV: decoding, annotation formats, sampling, transforms,
and what broken files get."""

import json
import os

import numpy as np
import pytest
import torch

from divattn.data import (Skipped, SyntheticMotion, VideoDataset, VideoDecodeError, collate_skipping,
                          export_synthetic, read_frames, read_kinetics_csv, read_path_label_list, read_ssv2,
                          read_ucf101, write_video)
from divattn.data.transforms import eval_clip_indices, eval_transform, train_clip_indices, train_transform

pytest.importorskip("av")


def _counting_frames(n, h=48, w=64):
    """Frame i is a flat grey of level 8*i: the decoded level says which frame came back."""
    return np.stack([np.full((h, w, 3), 8 * i, dtype=np.uint8) for i in range(n)])


@pytest.fixture(scope="module")
def counting_video(tmp_path_factory):
    return write_video(str(tmp_path_factory.mktemp("v") / "count.mp4"), _counting_frames(30))


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory, counting_video):
    d = tmp_path_factory.mktemp("broken")
    data = open(counting_video, "rb").read()
    files = {
        "empty": d / "empty.mp4",
        "text": d / "notes.mp4",
        "truncated": d / "truncated.mp4",
        "corrupt": d / "corrupt.mp4",
        "missing": d / "missing.mp4",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a video\n")
    files["truncated"].write_bytes(data[: len(data) // 2])
    rng = np.random.default_rng(0)
    files["corrupt"].write_bytes(rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes())
    return {k: str(v) for k, v in files.items()}


def test_read_frames_returns_the_chosen_frames_in_order(counting_video):
    seen = []

    def choose(total):
        seen.append(total)
        return [0, 29, 5, 5, 12]

    frames = read_frames(counting_video, choose, "pyav")
    assert seen == [30]
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == torch.uint8
    levels = frames.float().mean((1, 2, 3))
    np.testing.assert_allclose(levels.numpy(), [0, 232, 40, 40, 96], atol=3)


def test_out_of_range_indices_are_a_bug_not_a_bad_file(counting_video):
    with pytest.raises(ValueError, match="outside"):
        read_frames(counting_video, lambda total: [total], "pyav")


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "corrupt", "missing"])
def test_broken_files_raise_decode_error_naming_the_file(broken_files, kind):
    with pytest.raises(VideoDecodeError) as info:
        read_frames(broken_files[kind], lambda total: [0, total - 1], "pyav")
    assert broken_files[kind] in str(info.value)


def test_truncated_stream_with_header_first_is_detected(tmp_path):
    # a header (moov) in front: the container still declares every frame, the data stops early
    import av

    src = write_video(str(tmp_path / "src.mp4"), np.random.default_rng(1).integers(0, 256, (40, 48, 64, 3), dtype=np.uint8))
    fast = str(tmp_path / "fast.mp4")
    with av.open(src) as inp, av.open(fast, "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = open(fast, "rb").read()
    cut = str(tmp_path / "cut.mp4")
    open(cut, "wb").write(data[: len(data) * 2 // 5])
    assert len(read_frames(fast, lambda total: [total - 1], "pyav")) == 1
    with pytest.raises(VideoDecodeError):
        read_frames(cut, lambda total: [total - 1], "pyav")


def test_clip_sampling():
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = train_clip_indices(100, 8, 4, rng)
        assert np.all(np.diff(idx) == 4) and 0 <= idx[0] and idx[-1] < 100
    assert train_clip_indices(10, 8, 4, rng).tolist() == [0, 4, 8, 9, 9, 9, 9, 9]
    (centre,) = eval_clip_indices(100, 8, 4, 1)
    assert centre.tolist() == [35 + 4 * i for i in range(8)]
    clips = eval_clip_indices(100, 8, 4, 3)
    assert [c[0] for c in clips] == [0, 35, 71] and clips[-1][-1] == 99


def _ramp(t=4, h=40, w=80):
    """Pixel value = column index, so a crop's values give its position."""
    col = np.arange(w, dtype=np.uint8)
    return torch.from_numpy(np.broadcast_to(col[None, None, :, None], (t, h, w, 3)).copy())


def test_train_transform_jitters_scale_crops_and_flips():
    frames = _ramp()
    mean, std = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)
    firsts, flipped = set(), 0
    for seed in range(40):
        out = train_transform(frames, np.random.default_rng(seed), crop_size=32, train_scale=(40, 48), flip=True,
                              mean=mean, std=std)
        assert out.shape == (3, 4, 32, 32)
        row = out[0, 0, 0]
        flipped += int(row[0] > row[-1])
        firsts.add(round(float(min(row[0], row[-1]))))
    assert 5 < flipped < 35 and len(firsts) > 5
    for seed in range(10):
        out = train_transform(frames, np.random.default_rng(seed), crop_size=32, train_scale=(40, 48), flip=False,
                              mean=mean, std=std)
        assert out[0, 0, 0, 0] < out[0, 0, 0, -1]


def test_test_transform_takes_three_crops_along_the_long_side():
    views = eval_transform(_ramp(), crop_size=32, test_scale=32, num_crops=3, mean=(0, 0, 0), std=(1 / 255,) * 3)
    assert views.shape == (3, 3, 4, 32, 32)
    # short side 40 -> 32: the long side 80 -> 64, crops start at columns 0, 16, 32 (x 80/64 in the source)
    starts = [float(v[0, 0, 0, 0]) for v in views]
    assert starts[0] < 2 and 18 < starts[1] < 23 and 38 < starts[2] < 43
    tall = eval_transform(_ramp().transpose(1, 2), crop_size=32, test_scale=32, num_crops=3)
    assert tall.shape == (3, 3, 4, 32, 32)
    assert not torch.equal(tall[0], tall[2])


@pytest.fixture(scope="module")
def synthetic_videos(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("synthetic"))
    ds = SyntheticMotion(8, num_frames=16, img_size=48, seed=0)
    return folder, export_synthetic(ds, folder, range(8)), ds


def test_video_dataset_train_and_eval_items(synthetic_videos):
    folder, list_file, ds = synthetic_videos
    samples, _ = read_path_label_list(list_file, folder)
    assert [label for _, label in samples] == [ds.params_for(i).label for i in range(8)]
    kw = dict(num_frames=8, sampling_rate=2, crop_size=32, train_scale=(36, 44), test_scale=32, decoder="pyav")
    train = VideoDataset(samples, train=True, **kw)
    video, label, index = train[(3, 99)]
    assert video.shape == (3, 8, 32, 32) and label == samples[3][1] and index == 3
    assert torch.equal(video, train[(3, 99)][0])
    assert not torch.equal(video, train[(3, 100)][0])
    evals = VideoDataset(samples, train=False, num_clips=2, **kw)
    views, label, index = evals[3]
    assert views.shape == (6, 3, 8, 32, 32)


def test_broken_files_are_skipped_in_training_and_fatal_in_evaluation(synthetic_videos, broken_files):
    folder, list_file, _ = synthetic_videos
    samples, _ = read_path_label_list(list_file, folder)
    mixed = samples[:2] + [(broken_files[k], 0) for k in ("empty", "text", "truncated", "corrupt")] + samples[2:4]
    kw = dict(num_frames=8, sampling_rate=2, crop_size=32, train_scale=(36, 44), test_scale=32, decoder="pyav")
    train = VideoDataset(mixed, train=True, **kw)
    batch = collate_skipping([train[i] for i in range(len(mixed))])
    assert batch["video"].shape == (4, 3, 8, 32, 32)
    assert batch["index"].tolist() == [0, 1, 6, 7]
    assert [s.index for s in batch["skipped"]] == [2, 3, 4, 5]
    assert all(isinstance(s, Skipped) and s.reason for s in batch["skipped"])
    empty = collate_skipping([train[2]])
    assert empty["video"].numel() == 0 and len(empty["skipped"]) == 1
    evals = VideoDataset(mixed, train=False, **kw)
    with pytest.raises(VideoDecodeError, match="empty"):
        evals[2]


def test_annotation_formats(tmp_path):
    (tmp_path / "abseiling").mkdir()
    (tmp_path / "abseiling" / "abc_000010_000020.mp4").write_bytes(b"x")
    (tmp_path / "zumba_000001_000011.mp4").write_bytes(b"x")
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("label,youtube_id,time_start,time_end,split\n"
                        "abseiling,abc,10,20,train\nzumba,zumba,1,11,train\n")
    samples, names = read_kinetics_csv(str(csv_file), str(tmp_path))
    assert names == ["abseiling", "zumba"]
    assert samples == [(str(tmp_path / "abseiling" / "abc_000010_000020.mp4"), 0),
                       (str(tmp_path / "zumba_000001_000011.mp4"), 1)]
    with pytest.raises(ValueError, match="not one of"):
        read_kinetics_csv(str(csv_file), str(tmp_path), class_names=["abseiling"])

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"Holding something": "0", "Pushing something from left to right": "1"}))
    entries = tmp_path / "train.json"
    entries.write_text(json.dumps([{"id": "17", "label": "holding a cup", "template": "Holding [something]"},
                                   {"id": "4", "template": "Pushing [something] from left to right"}]))
    samples, names = read_ssv2(str(entries), str(labels), str(tmp_path))
    assert samples == [(str(tmp_path / "17.webm"), 0), (str(tmp_path / "4.webm"), 1)]
    assert names[1] == "Pushing something from left to right"

    class_ind = tmp_path / "classInd.txt"
    class_ind.write_text("1 ApplyEyeMakeup\n2 Archery\n")
    train_list = tmp_path / "trainlist01.txt"
    train_list.write_text("Archery/v_Archery_g01_c01.avi 2\nApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n")
    test_list = tmp_path / "testlist01.txt"
    test_list.write_text("Archery/v_Archery_g02_c01.avi\n")
    samples, names = read_ucf101(str(train_list), str(class_ind), str(tmp_path))
    assert names == ["ApplyEyeMakeup", "Archery"]
    assert [label for _, label in samples] == [1, 0]
    samples, _ = read_ucf101(str(test_list), str(class_ind), str(tmp_path))
    assert samples == [(str(tmp_path / "Archery" / "v_Archery_g02_c01.avi"), 1)]

    plain = tmp_path / "list.txt"
    plain.write_text("# comment\nclips/a b.mp4 3\n/abs/c.mp4,0\n\n")
    samples, _ = read_path_label_list(str(plain), str(tmp_path))
    assert samples == [(os.path.join(str(tmp_path), "clips/a b.mp4"), 3), ("/abs/c.mp4", 0)]
    plain.write_text("a.mp4 cat\n")
    with pytest.raises(ValueError, match="not an integer"):
        read_path_label_list(str(plain))
