"""Padded batches in the bundled models: clips of different lengths and sizes in one video.

The acceptance test: each sample's logits (the ST transformer's per-frame predictions) are
those of its clip run alone at its own size, within 1e-5 in fp32, for every TimeSformer
attention type, ViViT's four models with every classifier, and the ST transformer, on
the torch backend and on the Triton kernels. Clips that differ in length only run on the
CUDA kernels too (the divided blocks, and joint blocks whose real tokens are a prefix, pass
whole frames of padding as counts); a token mask (sizes, dropped tokens) runs on every
backend. Pooling ignores the padding, gradients of a padded batch are the sum of the
clips' own, and bad inputs name the argument."""

import pytest
import torch

from divattn.models import create_model

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, backend="torch")
# (frames, height, width) of each clip; the padded video is the largest of each
CLIPS = [(8, 32, 32), (4, 16, 24), (6, 32, 16), (2, 8, 8)]


def _perturbed(model):
    """Random weights everywhere (the init leaves temporal_fc and some embeddings at zero)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _batch(clips, seed=1):
    gen = torch.Generator().manual_seed(seed)
    videos = [torch.randn(1, 3, t, h, w, generator=gen) for t, h, w in clips]
    T, H, W = (max(c[i] for c in clips) for i in range(3))
    padded = torch.full((len(clips), 3, T, H, W), 7.0)  # padding that is not zero, to show it is not read
    for b, (v, (t, h, w)) in enumerate(zip(videos, clips)):
        padded[b, :, :t, :h, :w] = v[0]
    frames = torch.tensor([c[0] for c in clips])
    sizes = torch.tensor([[c[1], c[2]] for c in clips])
    return videos, padded, frames, sizes


MODELS = [
    *[pytest.param("timesformer_base", dict(attention_type=a), id=f"timesformer-{a}")
      for a in ("divided_space_time", "joint_space_time", "space_only")],
    *[pytest.param("vivit_base", dict(variant=v, classifier=c), id=f"vivit-{v}-{c}")
      for v in ("spatio_temporal", "factorised_encoder") for c in ("token", "gap", "gmp", "gsp")],
    *[pytest.param("vivit_base", dict(variant=v, classifier=c), id=f"vivit-{v}-{c}")
      for v in ("factorised_self_attention", "factorised_dot_product") for c in ("gap", "gmp", "gsp")],
]


@pytest.mark.parametrize("name, kw, backend", [
    *[pytest.param(*m.values, "torch", id=m.id) for m in MODELS],
    # the Triton kernels (the interpreter here), where sizes make a token mask
    *[pytest.param(*m.values, "triton", id=f"{m.id}-triton") for m in MODELS]])
def test_each_sample_gives_its_clip_alone(name, kw, backend):
    model = _perturbed(create_model(name, num_frames=8, **{**TINY, "backend": backend}, **kw))
    videos, padded, frames, sizes = _batch(CLIPS)
    with torch.no_grad():
        logits = model(padded, frames=frames, sizes=sizes)
        for b, video in enumerate(videos):
            torch.testing.assert_close(logits[b], model(video)[0], rtol=0, atol=1e-5)
        if backend != "torch":  # frames alone reach the kernels as counts: the test below
            return
        # the frames alone (every clip at the padded size) and the sizes alone
        same_size = padded[..., :32, :32]
        logits = model(same_size, frames=frames)
        for b, t in enumerate(frames.tolist()):
            torch.testing.assert_close(logits[b], model(same_size[b:b + 1, :, :t])[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_st_transformer_predicts_each_clips_own_frames(backend):
    """On triton the frames reach the blocks as counts."""
    model = _perturbed(create_model("st_transformer_tiny", img_size=16, patch_size=8, num_frames=6, depth=2,
                                    embed_dim=32, num_heads=2, backend=backend, residual=False))
    video = torch.randn(3, 3, 6, 16, 16, generator=torch.Generator().manual_seed(0))
    frames = [6, 3, 1]
    with torch.no_grad():
        pred = model(video, frames=frames)
        for b, t in enumerate(frames):
            torch.testing.assert_close(pred[b, :, :t], model(video[b:b + 1, :, :t])[0], rtol=0, atol=1e-5)
            assert (pred[b, :, t:] == 0).all()  # the padded frames' predictions
        if backend != "torch":
            model.set_backend("torch")
            torch.testing.assert_close(pred, model(video, frames=frames), rtol=0, atol=1e-5)


# the models whose blocks take a padding of whole frames as counts (divattn.layers.padding)
COUNTED = [pytest.param("timesformer_base", {}, id="timesformer-divided"),
           pytest.param("timesformer_base", dict(attention_type="space_only"), id="timesformer-space_only"),
           *[pytest.param("vivit_base", dict(variant=v, classifier=c), id=f"vivit-{v}-{c}")
             for v in ("spatio_temporal", "factorised_encoder") for c in ("token", "gap")],
           *[pytest.param("vivit_base", dict(variant=v, classifier="gap"), id=f"vivit-{v}")
             for v in ("factorised_self_attention", "factorised_dot_product")]]


@pytest.mark.parametrize("name, kw, backend", [
    *[pytest.param(*c.values, "triton", id=c.id) for c in COUNTED],
    # the CUDA kernels, emulated on the CPU where there is no GPU
    *[pytest.param(*c.values, "cuda", id=f"{c.id}-cuda") for c in COUNTED if c.id in ("timesformer-divided",
                                                                                       "vivit-spatio_temporal-token")]])
def test_clips_of_different_lengths_run_on_the_kernels(name, kw, backend, monkeypatch):
    """Frames alone (every clip at the video's size) reach the divided blocks as frame counts
    and the joint blocks whose real tokens are a prefix (ViViT models 1 and 2,
    space-only TimeSformer) as lengths, which the Triton and CUDA kernels take: each sample's
    logits are its clip's own on the kernels, and the padded batch's equal the torch
    backend's."""
    if backend == "cuda":
        _cuda_kernels(monkeypatch)
    model = _perturbed(create_model(name, num_frames=8, **{**TINY, "img_size": 16, "backend": backend}, **kw))
    _, padded, frames, _ = _batch([(8, 16, 16), (4, 16, 16), (2, 16, 16)])
    with torch.no_grad():
        logits = model(padded, frames=frames)
        for b, t in enumerate(frames.tolist()):
            torch.testing.assert_close(logits[b], model(padded[b:b + 1, :, :t])[0], rtol=0, atol=1e-5)
        model.set_backend("torch")
        torch.testing.assert_close(logits, model(padded, frames=frames), rtol=0, atol=1e-5)


def _cuda_kernels(monkeypatch):
    """The cuda backend's kernels: on the GPU, else emulated on the CPU (or the test skips)."""
    if torch.cuda.is_available():
        return
    from divattn.ops import cuda_emulator

    if cuda_emulator.unavailable_reason() is not None:
        pytest.skip(cuda_emulator.unavailable_reason())
    monkeypatch.setenv(cuda_emulator.ENV, "1")


@pytest.mark.parametrize("name, kw", [pytest.param("timesformer_base", {}, id="timesformer-divided"),
                                      pytest.param("timesformer_base", dict(attention_type="joint_space_time"),
                                                   id="timesformer-joint_space_time")])
def test_clips_of_different_sizes_run_on_the_cuda_kernels(name, kw, monkeypatch):
    """Sizes (and joint space-time's (h w t) padding) make a token mask, which the CUDA
    kernels take: each sample's logits are its clip's own there too."""
    _cuda_kernels(monkeypatch)
    model = _perturbed(create_model(name, num_frames=8, **{**TINY, "backend": "cuda"}, **kw))
    videos, padded, frames, sizes = _batch(CLIPS[:3])
    with torch.no_grad():
        logits = model(padded, frames=frames, sizes=sizes)
        for b, video in enumerate(videos):
            torch.testing.assert_close(logits[b], model(video)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, kw", [pytest.param("timesformer_base", {}, id="timesformer-divided"),
                                      pytest.param("vivit_base", dict(variant="factorised_self_attention"),
                                                   id="vivit-factorised_self_attention")])
def test_gradients_of_a_padded_batch_are_the_sum_of_the_clips(name, kw):
    """A training step on the padded batch gives every parameter the gradient of the clips'
    summed losses, each clip run alone: the padding contributes nothing."""
    model = _perturbed(create_model(name, num_frames=8, **TINY, **kw))
    videos, padded, frames, sizes = _batch(CLIPS[:3])
    labels = torch.tensor([0, 3, 1])
    loss = torch.nn.functional.cross_entropy(model(padded, frames=frames, sizes=sizes), labels, reduction="sum")
    padded_grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    alone = sum(torch.nn.functional.cross_entropy(model(v), labels[b:b + 1], reduction="sum")
                for b, v in enumerate(videos))
    alone_grads = torch.autograd.grad(alone, list(model.parameters()), allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), padded_grads, alone_grads):
        if a is None or b is None:
            assert a is None and b is None, n
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_a_token_mask_drops_tokens_that_then_never_matter():
    """model(video, mask=keep): the kept tokens' features and the logits do not depend on
    the dropped tokens' pixels, and equal those of the reference backend with the mask."""
    model = _perturbed(create_model("timesformer_base", num_frames=4, **TINY))
    video = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    keep = torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5  # (B, T, h, w)
    pixels = keep.repeat_interleave(8, 2).repeat_interleave(8, 3)[:, None].expand_as(video)
    other = torch.where(pixels, video, torch.randn(video.shape, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        feats = model.forward_features(video, mask=keep)
        kept = torch.cat([torch.ones(2, 1, dtype=torch.bool), keep.flatten(2).transpose(1, 2).reshape(2, -1)], 1)
        torch.testing.assert_close(model.forward_features(other, mask=keep)[kept], feats[kept], rtol=0, atol=1e-5)
        torch.testing.assert_close(model(other, mask=keep), model(video, mask=keep), rtol=0, atol=1e-5)
        model.set_backend("reference")
        torch.testing.assert_close(model.forward_features(video, mask=keep)[kept], feats[kept], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw, error, message", [
    (dict(frames=[9, 4]), ValueError, r"TimeSformer: frames\[0\] = 9 must be in \[1, 8\] \(the video's T\)"),
    (dict(frames=[0, 4]), ValueError, r"frames\[0\] = 0 must be in \[1, 8\]"),
    (dict(frames=[8]), ValueError, r"TimeSformer: frames must have shape \(2,\), got \(1,\)"),
    (dict(frames=torch.tensor([8.0, 4.0])), TypeError, r"frames must hold integers, got dtype torch.float32"),
    (dict(sizes=[[32, 32], [4, 32]]), ValueError, r"sizes\[1\] = \(4, 32\) must be within \[8, 32\] x \[8, 32\]"),
    (dict(sizes=[32, 32]), ValueError, r"sizes must have shape \(2, 2\), got \(2,\)"),
    (dict(mask=torch.ones(2, 8, 4, 4)), TypeError, r"mask must be a bool tensor \(True = keep the token\), got "
                                                   r"torch.float32"),
    (dict(mask=torch.ones(2, 8, 16, dtype=torch.bool)), ValueError,
     r"mask has shape \(2, 8, 16\), expected \(B, T', h, w\) = \(2, 8, 4, 4\)"),
])
def test_bad_padding_is_named(kw, error, message):
    model = create_model("timesformer_base", num_frames=8, **TINY)
    with pytest.raises(error, match=message):
        model(torch.zeros(2, 3, 8, 32, 32), **kw)


def test_vivit_frames_must_fill_whole_tubelets():
    model = create_model("vivit_base", num_frames=8, **TINY)
    with pytest.raises(ValueError, match=r"ViViT: frames\[1\] = 3 must be in \[1, 8\] \(the video's T\) and a "
                                         r"multiple of the tubelet size 2"):
        model(torch.zeros(2, 3, 8, 32, 32), frames=[8, 3])
