"""``divattn train`` as a user runs it: in a subprocess, killed with SIGKILL and resumed,
and under ``torchrun`` with two CPU processes (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from divattn.__main__ import main
from divattn.train import ConfigError, load_checkpoint, load_config
from divattn.train.config import get

SMALL = ["data.num_frames=4", "data.crop_size=16", "data.num_workers=0", "model.patch_size=8",
         "model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.drop_path_rate=0.1",
         "train.batch_size=8", "eval.batch_size=16", "log.tensorboard=false", "log.progress=false"]


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "divattn", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_print_config_resolves_file_and_overrides(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n")
    assert main(["train", "--config", str(path), "optim.lr=2e-4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 3" in printed and "lr: 0.0002" in printed
    assert main(["train", "train.epochz=3"]) == 2
    assert "did you mean train.epochs" in capsys.readouterr().err


def test_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    args = SMALL + ["train.epochs=2", "data.synthetic.train_size=480", "data.synthetic.val_size=32",
                    "train.checkpoint_every=1"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    reference = _run(["-o", str(whole), *args])

    victim = _run(["-o", str(broken), *args])
    ckpt_path = broken / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if ckpt_path.exists() and load_checkpoint(str(ckpt_path))["progress"]["step"] >= 40:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read()
    at_kill = load_checkpoint(str(ckpt_path))["progress"]
    assert at_kill["epoch"] < 2 and at_kill["step"] < 60

    resumed = _run(["-o", str(broken), *args, "--resume"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from {ckpt_path}" in out
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    a = load_checkpoint(str(whole / "checkpoint.pt"))
    b = load_checkpoint(str(broken / "checkpoint.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(torch.equal(a["optimizer"]["state"][i][key], b["optimizer"]["state"][i][key])
                   for i in a["optimizer"]["state"])
    sa = json.loads((whole / "summary.json").read_text())
    sb = json.loads((broken / "summary.json").read_text())
    assert (sa["val_top1"], sa["val_loss"], sa["steps"]) == (sb["val_top1"], sb["val_loss"], sb["steps"])
    assert [f for f in os.listdir(broken) if f.startswith(".tmp")] == []


# ``divattn train`` in a process that then counts the gloo worker threads still alive
_TRAIN_THEN_COUNT = """
import os, sys
from divattn.__main__ import main
code = main(sys.argv[1:])
alive = [t for t in os.listdir("/proc/self/task") if open(f"/proc/self/task/{t}/comm").read().startswith("pt_gloo")]
print(f"rank {os.environ['RANK']}: {len(alive)} gloo worker thread(s) after train", flush=True)
sys.exit(code)
"""


def test_torchrun_two_processes_on_cpu(tmp_path):
    out_dir = tmp_path / "ddp"
    args = SMALL + ["train.epochs=2", "data.synthetic.train_size=64", "data.synthetic.val_size=37",
                    "train.checkpoint_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "train_then_count.py"
    script.write_text(_TRAIN_THEN_COUNT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), "train", "-o", str(out_dir), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    # the process group and its worker threads are gone before the interpreter exits: a
    # group left to interpreter exit aborts a process now and then (a worker needing the GIL)
    if os.path.isdir("/proc/self/task"):
        for rank in (0, 1):
            assert f"rank {rank}: 0 gloo worker thread(s) after train" in proc.stdout, proc.stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["val_items"] == 37  # 19 + 18: every item once, none padded
    assert summary["steps"] == 2 * 4  # 64 items / 2 ranks / batch 8, per epoch
    log = (out_dir / "train.log").read_text()
    assert log.count("divattn train ->") == 1 and "2 process(es)" in log
    assert len((out_dir / "metrics.csv").read_text().strip().splitlines()) == 3

    # the counts summed over ranks are exactly those of one process on the same weights
    from divattn.data import ShardSampler, build_datasets, collate_skipping
    from divattn.train.distributed import Dist
    from divattn.train.loop import build_model, evaluate

    ckpt = load_checkpoint(str(out_dir / "checkpoint.pt"))
    cfg = load_config(None, args)
    assert get(ckpt["config"], "data.synthetic.val_size") == 37
    _, val_set, num_classes = build_datasets(cfg["data"])
    model = build_model(cfg, num_classes, "torch")
    model.load_state_dict(ckpt["model"])
    loader = torch.utils.data.DataLoader(val_set, batch_size=16, collate_fn=collate_skipping)
    single = evaluate(model, loader, Dist(0, 1, 0, torch.device("cpu")))
    assert single["count"] == 37
    assert single["top1"] == pytest.approx(summary["val_top1"]) and single["top5"] == pytest.approx(summary["val_top5"])
    assert single["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def _one_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("divattn train: ")
    return err.strip()


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    out = str(tmp_path / "run")
    missing = str(tmp_path / "nope.csv")
    assert main(["train", "-o", out, "data.dataset=kinetics", f"data.train_file={missing}",
                 f"data.val_file={missing}", f"data.root={tmp_path}"]) == 2
    assert _one_line(capsys) == f"divattn train: data.train_file={missing!r}: no such file"
    assert main(["train", "-o", out, "data.num_workers=abc"]) == 2
    assert "data.num_workers='abc' (str): expected an integer >= 0" in _one_line(capsys)
    assert main(["train", "-o", out, "--resume-from", missing]) == 2
    assert "no such file" in _one_line(capsys)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["train", "-o", out, "--resume-from", str(junk)]) == 2
    assert "not a readable checkpoint" in _one_line(capsys)
    with pytest.raises(ConfigError):  # --debug: the traceback
        main(["train", "-o", out, "data.num_workers=abc", "--debug"])


def test_a_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = SMALL + ["train.epochs=1", "data.synthetic.train_size=16", "data.synthetic.val_size=8"]
    assert main(["train", "-o", str(out), *args]) == 0
    capsys.readouterr()
    assert main(["train", "-o", str(out), "--resume", "model.embed_dim=32"]) == 2
    assert "does not fit this config's model or optimizer" in _one_line(capsys)
