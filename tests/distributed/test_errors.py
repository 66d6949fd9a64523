"""Bad input to a parallelized model gets a named error on every rank, and nothing hangs: a
rank that fails leaves the others a bounded wait (the group's timeout) or, once its process
is gone, none."""

import os

import pytest
import torch
import torch.distributed as dist

from divattn.models import create_model
from divattn.sequence_parallel import FrameShards, SequenceParallelError, shard_frames

from .ranks import Failed, ok, run

SMALL = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3, backend="torch")


def _model(**kw):
    torch.manual_seed(0)
    return create_model("timesformer_base", **{**SMALL, **kw}).eval()


def _clip(T=4):
    return torch.randn(1, 3, T, 16, 16, generator=torch.Generator().manual_seed(0))


def _error(fn):
    try:
        fn()
    except SequenceParallelError as e:
        return str(e)
    return None


def _setup_errors(rank, world):
    out = {}
    out["more ranks than frames"] = _error(lambda: _model(num_frames=1).parallelize(dist.group.WORLD))
    out["frames differ between ranks"] = _error(
        lambda: _model(num_frames=8).parallelize(dist.group.WORLD, num_frames=4 + 2 * (rank == 1)))
    torch.manual_seed(rank)
    other_weights = create_model("timesformer_base", **SMALL, num_frames=4)
    out["weights differ between ranks"] = _error(lambda: other_weights.parallelize(dist.group.WORLD))
    out["joint attention"] = _error(
        lambda: _model(num_frames=4, attention_type="joint_space_time").parallelize(dist.group.WORLD))
    out["vivit model 1"] = _error(lambda: create_model("vivit_base", **SMALL, num_frames=4).parallelize(
        dist.group.WORLD))
    out["not parallelized, given a shard"] = _error(lambda: _model(num_frames=4)(shard_frames(_clip())))
    model = _model(num_frames=4).parallelize(dist.group.WORLD)
    out["attention_maps"] = _error(lambda: model.attention_maps(model.sequence.shard(_clip())))
    out["the whole clip, not a shard"] = _error(lambda: model(_clip()))
    # one rank given a wrong shard: every rank stops, none waits in a collective
    out["one rank's shard is wrong"] = _error(lambda: model(_clip()[:, :, :3] if rank == 1 else model.sequence.shard(
        _clip())))
    out["one rank's clip is larger"] = _error(lambda: model(model.sequence.shard(
        torch.cat([_clip()] * (1 + rank)))))
    out["dropout in training"] = _error(lambda: _model(num_frames=4, drop_rate=0.1).parallelize(dist.group.WORLD)
                                        .train()(model.sequence.shard(_clip())))
    out["a padded batch"] = _error(lambda: model(model.sequence.shard(torch.cat([_clip()] * 2)),
                                                 frames=torch.tensor([4, 3])))
    st = create_model("st_transformer_tiny", **{**SMALL, "num_classes": 0}, num_frames=4).parallelize(
        dist.group.WORLD)
    out["generation"] = _error(lambda: st.generate(_clip(2), 2))
    out["ok after all that"] = _model(num_frames=4).parallelize(dist.group.WORLD)(
        model.sequence.shard(_clip())).shape == (1, 3)
    return out


EXPECT = {
    "more ranks than frames": "needs at least 2 temporal tokens",
    "frames differ between ranks": "set up differently",
    "weights differ between ranks": "weights=",
    "joint attention": "joint_space_time",
    "vivit model 1": "spatio_temporal",
    "not parallelized, given a shard": "not parallelized",
    "attention_maps": "runs in one process",
    "the whole clip, not a shard": "rank 0 has 4 frames, expected 2",
    "one rank's shard is wrong": "rank 1 has 3 frames, expected 2",
    "one rank's clip is larger": "clips differ in other dims",
    "dropout in training": "per-token dropout",
    "generation": "runs in one process",
    "a padded batch": "a padded batch (frames / sizes / mask) runs in one process",
}


def test_bad_setups_and_inputs_get_named_errors_on_every_rank(ranks):
    results = ok(ranks(2).run(_setup_errors))
    for rank, got in enumerate(results):
        assert got.pop("ok after all that") is True
        for case, text in EXPECT.items():
            assert got[case] is not None, f"rank {rank}: {case}: no SequenceParallelError"
            assert text in got[case], f"rank {rank}: {case}: {got[case]}"


def _one_rank_fails(rank, world, exit_process):
    model = _model(num_frames=4).parallelize(dist.group.WORLD, check_inputs=False)
    clip = model.sequence.shard(_clip())
    if rank == 1:
        if exit_process:
            os._exit(3)  # the script of a failing rank ends
        raise RuntimeError("rank 1 fails before its first collective")
    return model(clip)


@pytest.mark.parametrize("exit_process", [False, True], ids=["rank-alive", "rank-exits"])
def test_a_failing_rank_leaves_the_others_an_error_not_a_hang(exit_process):
    """Without the input check, rank 0 enters the first all-to-all alone: it gets gloo's error
    when the group's timeout (5 s here) runs out, or as soon as rank 1's process is gone."""
    results = run(_one_rank_fails, 2, exit_process, collective_s=5, deadline_s=60)
    assert isinstance(results[0], Failed), results[0]
    if exit_process:
        assert results[1].type == "ProcessExited"
        assert "Timed out" not in results[0].message, results[0]  # the closed connection, not the timeout
    else:
        assert isinstance(results[1], Failed) and "rank 1 fails" in results[1].message
        assert "Timed out" in results[0].message, results[0]


def test_frame_shards_need_a_process_group():
    if dist.is_initialized():
        pytest.skip("this process has a group")
    with pytest.raises(SequenceParallelError, match="init_process_group"):
        FrameShards(None, 4)
