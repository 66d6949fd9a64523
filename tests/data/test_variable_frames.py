"""Clips of their own length (``data.variable_frames``): short videos padded, not looped; the
collate that pads a batch and says each clip's frames; and decoding that seeks, so a clip
near the end of a long video costs what one near its start does."""

import time

import numpy as np
import pytest
import torch

from divattn.data import SyntheticMotion, collate_skipping, read_frames, write_video
from divattn.data.transforms import clip_frames, train_clip_indices
from divattn.train.tasks import next_frame_loss


def test_clip_frames_keeps_a_short_video_short():
    assert clip_frames(100, 8, 4) == 8  # long enough: the full clip
    assert clip_frames(13, 8, 4) == 4  # frames 0, 4, 8, 12: no repeat
    assert clip_frames(1, 8, 4) == 1
    idx = train_clip_indices(13, clip_frames(13, 8, 4), 4, np.random.default_rng(0))
    assert len(set(idx.tolist())) == len(idx) == 4


def test_synthetic_short_videos_are_padded_by_the_collate_not_looped():
    common = dict(num_frames=6, img_size=16, min_frames=2, seed=3)
    own = SyntheticMotion(8, variable_frames=True, **common)
    looped = SyntheticMotion(8, **common)
    items = [own[i] for i in range(8)]
    lengths = [it[0].shape[1] for it in items]
    assert min(lengths) >= 2 and max(lengths) <= 6 and len(set(lengths)) > 1
    for i, (video, _, _) in enumerate(items):
        loop = looped[i][0]
        assert loop.shape[1] == 6
        torch.testing.assert_close(loop[:, :lengths[i]], video)  # the same clip, then its last frame repeated
        assert (loop[:, lengths[i]:] == loop[:, lengths[i] - 1:lengths[i]]).all()
    batch = collate_skipping(items)
    T = max(lengths)
    assert batch["video"].shape == (8, 3, T, 16, 16)
    assert batch["frames"].tolist() == lengths
    assert batch["mask"].tolist() == [[t < n for t in range(T)] for n in lengths]
    for b, (video, _, _) in enumerate(items):
        assert torch.equal(batch["video"][b, :, :lengths[b]], video)
        assert (batch["video"][b, :, lengths[b]:] == 0).all()
    same = collate_skipping([looped[i] for i in range(3)])
    assert same["frames"] is None and same["mask"] is None and same["video"].shape == (3, 3, 6, 16, 16)


def test_next_frame_loss_counts_each_clips_own_pairs():
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(3, 3, 5, 4, 4, generator=gen)
    pred = torch.randn(video.shape, generator=gen)
    frames = torch.tensor([5, 3, 1])  # 4, 2 and 0 pairs
    loss = next_frame_loss(pred, video, frames)
    poisoned = pred.clone(), video.clone()
    for x in poisoned:
        x[1, :, 3:] = 1e3
        x[2] = -1e3
    torch.testing.assert_close(next_frame_loss(*poisoned, frames), loss)
    sq = sum(((pred[b, :, :t - 1] - video[b, :, 1:t]) ** 2).sum() for b, t in enumerate(frames.tolist()))
    torch.testing.assert_close(loss, sq / (6 * 3 * 4 * 4))


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """60 s of 320x240 at 25 fps with a keyframe every 2 s; frame i is a flat grey of level
    8 * (i % 32), so the decoded level says which frame came back."""
    pytest.importorskip("av")
    levels = (8 * (np.arange(1500) % 32)).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (1500, 240, 320, 3))
    return write_video(str(tmp_path_factory.mktemp("long") / "long.mp4"), frames, fps=25, keyframe_interval=50)


def test_a_clip_near_the_end_decodes_about_as_fast_as_one_near_the_start(long_video):
    """A 16-frame clip (every 4th frame) at 0 s and at 56 s: the right frames either way, the
    same number of frames decoded (the late one seeks), and the late one's decode time
    within 2x of the early one's (each the fastest of 3 tries, interleaved, so a loaded
    machine slows both alike)."""
    clips = {"start": np.arange(0, 61, 4), "end": np.arange(1400, 1461, 4)}
    times = {k: [] for k in clips}
    for _ in range(3):
        for name, idx in clips.items():
            stats = {}
            t0 = time.perf_counter()
            frames = read_frames(long_video, lambda total: idx, "pyav", stats=stats)
            times[name].append(time.perf_counter() - t0)
            levels = frames.float().mean((1, 2, 3)).numpy()
            np.testing.assert_allclose(levels, 8 * (idx % 32), atol=3)
            assert stats["seeked"] == (name == "end")
            assert stats["decoded"] <= 61 + 50  # at most a keyframe interval before the clip
    assert min(times["end"]) < 2 * min(times["start"]), times
