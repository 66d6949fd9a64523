"""The synthetic motion task: reproducible, and its label lives only in the frame order."""

import numpy as np
import pytest
import torch

from divattn.data import EpochSampler, SyntheticMotion


def test_items_are_a_function_of_seed_and_key():
    a = SyntheticMotion(50, seed=3)
    b = SyntheticMotion(50, seed=3)
    for key in (0, 7, (7, 12345)):
        va, la, ia = a[key]
        vb, lb, ib = b[key]
        assert torch.equal(va, vb) and la == lb and ia == ib
    assert not torch.equal(a[7][0], a[(7, 12345)][0])
    assert not torch.equal(a[7][0], SyntheticMotion(50, seed=4)[7][0])
    assert not torch.equal(a[7][0], a[8][0])


def test_item_layout_and_labels():
    ds = SyntheticMotion(400, num_frames=6, img_size=24, num_directions=8, num_speeds=2, seed=1)
    video, label, index = ds[5]
    assert video.shape == (3, 6, 24, 24) and video.dtype == torch.float32 and index == 5
    assert ds.num_classes == 16 and len(ds.class_names) == 16
    counts = np.bincount([ds.params_for(i).label for i in range(400)], minlength=16)
    assert counts.min() > 0
    assert abs(float(video.mean())) < 1.5 and 0.3 < float(video.std()) < 3.0


def test_speed_bins_split_the_speed_range():
    ds = SyntheticMotion(300, num_speeds=2, speed=(1.0, 3.0), seed=2)
    for i in range(300):
        p = ds.params_for(i)
        assert (p.speed < 2.0) == (p.label % 2 == 0)


@pytest.mark.parametrize("num_directions", [2, 4, 8])
def test_reversed_clip_is_the_opposite_direction_with_the_same_frames(num_directions):
    # Time reversal maps class d to class d + K/2 and the start point by a translation of
    # the torus (measure preserving), so both classes produce the same sets of frames
    # with the same probability: no order-invariant function tells them apart.
    ds = SyntheticMotion(20, num_frames=8, img_size=32, num_directions=num_directions, num_objects=2, noise=0.0, seed=9)
    for i in range(20):
        p = ds.params_for(i)
        r = ds.reverse(p)
        assert r.direction == (p.direction + num_directions // 2) % num_directions
        assert r.label != p.label
        np.testing.assert_allclose(ds.render(r), ds.render(p)[::-1], atol=1e-5)
        back = ds.reverse(r)
        assert back.label == p.label
        np.testing.assert_allclose(back.starts, p.starts, atol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="even"):
        SyntheticMotion(10, num_directions=3)
    with pytest.raises(ValueError, match="speed"):
        SyntheticMotion(10, speed=(0.0, 1.0))
    with pytest.raises(IndexError):
        SyntheticMotion(10)[10]


def _gray_clips(n, seed):
    ds = SyntheticMotion(n, seed=seed)
    clips, labels = [], []
    for i in range(n):
        p = ds.params_for(i)
        clips.append(ds.render(p).mean(-1))
        labels.append(p.label)
    return np.stack(clips), np.array(labels)


def _ridge_accuracy(features, labels, n_train):
    mu, sd = features[:n_train].mean(0), features[:n_train].std(0) + 1e-6
    z = np.c_[(features - mu) / sd, np.ones(len(features))]
    targets = np.eye(labels.max() + 1)[labels]
    w = np.linalg.solve(z[:n_train].T @ z[:n_train] + 10 * np.eye(z.shape[1]), z[:n_train].T @ targets[:n_train])
    return float(((z[n_train:] @ w).argmax(1) == labels[n_train:]).mean())


def _spectrum(image):
    ps = np.abs(np.fft.fft2(image - image.mean())) ** 2
    return np.log1p(np.concatenate([ps[:8, :8].ravel(), ps[-8:, :8].ravel()]))


def test_order_solves_the_task_and_order_invariant_features_cannot():
    clips, labels = _gray_clips(1500, seed=5)  # (n, T, H, W)
    # order-aware: one global Lucas-Kanade flow vector per clip
    gy, gx = np.gradient(clips, axis=(2, 3))
    it = np.diff(clips, axis=1)
    gx, gy = gx[:, :-1], gy[:, :-1]
    a = np.stack([np.stack([(gx * gx).sum((1, 2, 3)), (gx * gy).sum((1, 2, 3))], -1),
                  np.stack([(gx * gy).sum((1, 2, 3)), (gy * gy).sum((1, 2, 3))], -1)], -2)
    b = -np.stack([(gx * it).sum((1, 2, 3)), (gy * it).sum((1, 2, 3))], -1)
    flow = np.linalg.solve(a, b[..., None])[..., 0]
    angle = np.arctan2(-flow[:, 1], flow[:, 0])
    predicted = np.round(angle / (np.pi / 2)).astype(int) % 4
    assert (predicted == labels).mean() > 0.9

    # order-invariant: the spectrum of the motion streak (mean |frame - mean frame|)
    # shows the axis of motion, not its sign: about 50%, chance being 25%
    streak = np.abs(clips - clips.mean(1, keepdims=True)).mean(1)
    acc_streak = _ridge_accuracy(np.stack([_spectrum(s) for s in streak]), labels, 1000)
    assert 0.4 < acc_streak < 0.6
    # one frame (the first, where a start-point bias would show): chance
    acc_frame = _ridge_accuracy(np.stack([_spectrum(c[0]) for c in clips]), labels, 1000)
    assert acc_frame < 0.35
    acc_pixels = _ridge_accuracy(clips.mean(1).reshape(len(clips), -1), labels, 1000)
    assert acc_pixels < 0.35


def test_epoch_sampler_draws_new_clips_each_epoch_and_resumes_mid_epoch():
    ds = SyntheticMotion(40, seed=0)
    s = EpochSampler(ds, seed=11)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(i for i, _ in e0) == list(range(40))
    assert [i for i, _ in e0] != [i for i, _ in e1]
    assert {seed for _, seed in e0}.isdisjoint({seed for _, seed in e1})
    s.set_epoch(1, start=13)
    assert list(s) == e1[13:] and len(s) == 27
    shards = []
    for rank in range(3):
        r = EpochSampler(ds, num_replicas=3, rank=rank, seed=11)
        r.set_epoch(1)
        shards.append(list(r))
    assert all(len(x) == 13 for x in shards)
    merged = [item for row in zip(*shards) for item in row]
    assert merged == e1[:39]
