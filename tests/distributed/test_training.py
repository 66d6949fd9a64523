"""``divattn train`` with ``parallel.sequence=2`` on 2 gloo processes (torchrun's environment)
against one process: the same loss at each of 20 steps (within 1e-5) with the same seed and
global batch, a resumed run ending with the weights of one that never stopped, the same for
next-frame prediction with the causal ST transformer (10 steps), 4 processes as a 2 x 2
data x sequence mesh against 2 data-parallel ones (5 steps), and a sequence size that does
not divide the processes refused. About 70 s on the loaded 2-core machine."""

import os
import socket

import pytest
import torch

from .ranks import ok, run

OVERRIDES = {
    "data": {"num_frames": 5, "crop_size": 24, "num_workers": 0, "synthetic": {"train_size": 40, "val_size": 8}},
    "model": {"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2, "drop_path_rate": 0.1,
              "backend": "torch"},
    "optim": {"lr": 1e-3},
    "schedule": {"name": "constant", "warmup_epochs": 0},
    "train": {"epochs": 2, "batch_size": 4, "checkpoint_every": 5, "log_every": 5, "threads": 1,
              "dist_timeout_s": 60},
    "eval": {"batch_size": 8},
    "log": {"progress": False, "tensorboard": False},
}


def _ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _train(rank, world, runs):
    """Each ``(overrides, out_dir, resume, port)`` of ``runs`` in turn; the losses of its steps."""
    from divattn.train import DEFAULTS, train
    from divattn.train.config import merge
    from divattn.train.tasks import Classify, NextFrame

    losses = []

    def recorded(real):
        def loss(self, out, video, labels, frames=None):
            value = real(self, out, video, labels, frames)
            losses[-1].append(float(value.detach()))
            return value
        return loss

    for task in (Classify, NextFrame):
        task.loss = recorded(task.loss)
    out = []
    for overrides, out_dir, resume, port in runs:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        losses.append([])
        summary = train(merge(merge(DEFAULTS, OVERRIDES), overrides), out_dir, resume=resume)
        out.append({"losses": losses[-1], "summary": summary})
    return out


def _weights(path):
    from divattn.train import load_checkpoint

    return load_checkpoint(str(path))["model"]


def test_two_process_sequence_parallel_training_equals_one_process_and_resumes_exactly(tmp_path):
    p = _ports(3)
    sp = {"parallel": {"sequence": 2}}
    (single,), = ok(run(_train, 1, [({}, str(tmp_path / "one"), None, p[0])], group=False, deadline_s=240))
    # 2 processes: 20 steps; then 10 steps (one epoch) and a resume for the other 10
    whole, first, resumed = ok(run(_train, 2, [
        (sp, str(tmp_path / "two"), None, p[1]),
        ({**sp, "train": {"epochs": 1}}, str(tmp_path / "split"), None, p[2]),
        (sp, str(tmp_path / "split"), str(tmp_path / "split" / "checkpoint.pt"), p[0]),
    ], group=False, deadline_s=300))[0]
    one = single["losses"]
    assert len(one) == 20
    worst = max(abs(a - b) / abs(b) for a, b in zip(whole["losses"], one))
    assert len(whole["losses"]) == 20 and worst <= 1e-5, (worst, whole["losses"], one)
    assert whole["summary"]["sequence_parallel"] == 2 and whole["summary"]["data_parallel"] == 1
    assert whole["summary"]["val_items"] == single["summary"]["val_items"] == 8
    assert abs(whole["summary"]["val_loss"] - single["summary"]["val_loss"]) <= 1e-5
    # the resumed run: the same steps, and at the end the same weights, as the run that never stopped
    assert first["losses"] + resumed["losses"] == whole["losses"]
    a, b = _weights(tmp_path / "two" / "checkpoint.pt"), _weights(tmp_path / "split" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # checkpoints and logs from one rank
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


NEXT_FRAME = {"task": "next_frame", "train": {"epochs": 1},
              "model": {"name": "st_transformer_tiny", "attention_type": None, "reinit": {}}}


def test_next_frame_prediction_sequence_parallel_equals_one_process(tmp_path):
    """The ST transformer's predicted frames stay on their rank: the loss and the validation MSE
    are summed over the group (tasks.next_frame_loss with a FrameShards)."""
    p = _ports(2)
    (single,), = ok(run(_train, 1, [(NEXT_FRAME, str(tmp_path / "one"), None, p[0])], group=False, deadline_s=180))
    got = ok(run(_train, 2, [({**NEXT_FRAME, "parallel": {"sequence": 2}}, str(tmp_path / "two"), None, p[1])],
                 group=False, deadline_s=180))
    one = single["losses"]
    assert len(one) == 10
    for (two,) in got:  # both ranks see the whole clip's loss
        worst = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one))
        assert len(two["losses"]) == 10 and worst <= 1e-5, (worst, two["losses"], one)
    summary, ref = got[0][0]["summary"], single["summary"]
    for key in ("val_mse", "baseline_mse"):
        assert abs(summary[key] - ref[key]) <= 1e-5 * abs(ref[key]), (key, summary[key], ref[key])
    assert summary["val_items"] == ref["val_items"] == 8


def test_a_data_by_sequence_mesh_equals_data_parallelism(tmp_path):
    """4 processes as a 2 x 2 data x sequence mesh against 2 data-parallel processes: the same
    clips per data rank, so each rank's loss (of its data rank's clips) is the same at each step."""
    p = _ports(2)
    run_cfg = {"train": {"epochs": 1}}
    dp = ok(run(_train, 2, [(run_cfg, str(tmp_path / "dp"), None, p[0])], group=False, deadline_s=180))
    mesh = ok(run(_train, 4, [({**run_cfg, "parallel": {"sequence": 2}}, str(tmp_path / "mesh"), None, p[1])],
                  group=False, deadline_s=240))
    for rank, (got,) in enumerate(mesh):
        want = dp[rank // 2][0]["losses"]
        worst = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], want))
        assert len(got["losses"]) == len(want) == 5 and worst <= 1e-5, (rank, worst, got["losses"], want)
    summary = mesh[0][0]["summary"]
    assert summary["data_parallel"] == 2 and summary["sequence_parallel"] == 2
    assert abs(summary["val_loss"] - dp[0][0]["summary"]["val_loss"]) <= 1e-5


def test_a_sequence_size_that_does_not_divide_the_processes_is_refused(tmp_path):
    results = run(_train, 2, [({"parallel": {"sequence": 3}}, str(tmp_path), None, _ports(1)[0])], group=False,
                  deadline_s=120)
    for r in results:
        assert r.type == "ConfigError" and "parallel.sequence=3 needs a multiple of 3 processes" in r.message, r
