"""The training loop on the synthetic task: outputs, schedules, AMP, accumulation,
EMA, NaN handling, and exact resumption."""

import csv
import json
import math
import os

import pytest
import torch

from conftest import TinyVideoNet, small_config
from divattn.train import NonFiniteLossError, load_checkpoint, resolve_backend, train
from divattn.train.loop import build_model, build_optimizer, cpu_threads, lr_factor


def test_backend_auto_is_the_reference_path_on_cpu_and_said_so():
    backend, why = resolve_backend("auto", torch.device("cpu"))
    assert backend == "torch" and "interpreter" in why
    backend, why = resolve_backend("auto", torch.device("cuda", 0))
    assert backend is None and "auto dispatch" in why
    assert resolve_backend("triton", torch.device("cpu"))[0] == "triton"


def test_schedules():
    cfg = small_config(train={"epochs": 10}, optim={"lr": 1.0},
                       schedule={"name": "cosine", "warmup_epochs": 1, "min_lr": 0.1})
    f = lr_factor(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(99) == pytest.approx(0.1, abs=1e-3)
    assert all(f(i) >= f(i + 1) for i in range(10, 99))
    cfg["schedule"].update(name="step", warmup_epochs=0, milestones=[3, 6], gamma=0.5)
    f = lr_factor(cfg, steps_per_epoch=10)
    assert [f(0), f(29), f(30), f(60)] == [1.0, 1.0, 0.5, 0.25]
    cfg["schedule"]["name"] = "constant"
    assert lr_factor(cfg, 10)(77) == 1.0


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(4, 4)
    model.norm = torch.nn.LayerNorm(4)
    model.pos_embed = torch.nn.Parameter(torch.zeros(1, 3, 4))
    for name in ("adamw", "sgd"):
        opt = build_optimizer(small_config(optim={"name": name, "weight_decay": 0.3}), model)
        decay, no_decay = opt.param_groups
        assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.3
        assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_a_run_writes_its_outputs(tmp_path, tiny_model_fn):
    cfg = small_config(log={"tensorboard": True})
    summary = train(cfg, str(tmp_path), model_fn=tiny_model_fn)
    for name in ("config.yaml", "checkpoint.pt", "train.log", "metrics.csv", "summary.json"):
        assert (tmp_path / name).exists(), name
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "TensorBoard logs are off" in (tmp_path / "train.log").read_text()
    else:
        assert any((tmp_path / "tb").iterdir())
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == pytest.approx(summary)
    for key in ("val_top1", "val_top5", "epochs", "clips_per_s"):
        assert isinstance(on_disk[key], (int, float)), key
    assert on_disk["epochs"] == 2 and on_disk["val_items"] == 20 and on_disk["steps"] == 12
    assert 0 <= on_disk["val_top1"] <= on_disk["val_top5"] <= 100
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[-1]["val_top1"]
    log = (tmp_path / "train.log").read_text()
    assert "model.backend=auto on cpu -> 'torch'" in log
    assert "backend: torch" in (tmp_path / "config.yaml").read_text()
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pt"))  # weights_only=True
    assert ckpt["progress"]["epoch"] == 2 and ckpt["progress"]["position"] == 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_accumulation_clipping_and_ema(tmp_path, tiny_model_fn, amp):
    cfg = small_config(train={"amp": amp, "accum_steps": 2, "ema_decay": 0.9, "epochs": 1},
                       optim={"clip_grad": 0.5})
    summary = train(cfg, str(tmp_path), model_fn=tiny_model_fn)
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert summary["steps"] == 3 and summary["ema"]
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    assert ckpt["ema"]["n_averaged"].item() == 3
    assert not torch.equal(ckpt["ema"]["module.head.weight"], ckpt["model"]["head.weight"])


class Faulty(TinyVideoNet):
    """Returns ``fault(n, logits)`` from its n-th training forward."""

    def __init__(self, num_classes, fault):
        super().__init__(num_classes)
        self.calls = 0
        self.fault = fault

    def forward(self, video):
        out = super().forward(video)
        if self.training:
            self.calls += 1
            out = self.fault(self.calls, out)
        return out


def nan_every(k):
    return lambda c, n, b: Faulty(n, lambda i, out: out * float("nan") if i % k == 0 else out)


def test_isolated_nonfinite_losses_skip_the_step(tmp_path):
    cfg = small_config(train={"epochs": 1, "max_nonfinite": 2})
    summary = train(cfg, str(tmp_path), model_fn=nan_every(2))
    assert summary["skipped_steps"] == 3 and summary["steps"] == 6
    log = (tmp_path / "train.log").read_text()
    assert "non-finite loss (nan) at epoch 1, step 2, batch 1 of the epoch (items [" in log
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nonfinite_losses_in_a_row_stop_the_run_naming_the_batch(tmp_path):
    cfg = small_config(train={"epochs": 1, "max_nonfinite": 3})
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row, the last at epoch 1, step 3, batch 2"):
        train(cfg, str(tmp_path), model_fn=nan_every(1))


class Preempted(Exception):
    """A stand-in for the process being killed."""


def dies_at(k):
    def fault(i, out):
        if i == k:
            raise Preempted()
        return out

    return lambda c, n, b: Faulty(n, fault)


def _weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("die_at", [4, 10], ids=["mid-epoch-1", "mid-epoch-2"])
def test_resumed_run_ends_with_the_same_weights(tmp_path, tiny_model_fn, die_at):
    cfg = small_config(train={"epochs": 2, "accum_steps": 2, "checkpoint_every": 1, "ema_decay": 0.8},
                       data={"num_workers": 1}, optim={"name": "sgd"})
    whole = tmp_path / "whole"
    train(cfg, str(whole), model_fn=tiny_model_fn)
    broken = tmp_path / "broken"
    with pytest.raises(Preempted):
        train(cfg, str(broken), model_fn=dies_at(die_at))
    progress = load_checkpoint(str(broken / "checkpoint.pt"))["progress"]
    assert 0 < progress["position"] and progress["step"] == (die_at - 1) // 2
    summary = train(cfg, str(broken), resume=str(broken / "checkpoint.pt"), model_fn=tiny_model_fn)
    a, b = _weights(str(whole / "checkpoint.pt")), _weights(str(broken / "checkpoint.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = load_checkpoint(str(whole / "checkpoint.pt")), load_checkpoint(str(broken / "checkpoint.pt"))
    assert all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])
    assert ca["optimizer"]["state"][0]["momentum_buffer"].equal(cb["optimizer"]["state"][0]["momentum_buffer"])
    whole_summary = json.loads((whole / "summary.json").read_text())
    assert summary["val_top1"] == whole_summary["val_top1"] and summary["steps"] == whole_summary["steps"]


def test_registry_model_with_grad_checkpointing(tmp_path):
    cfg = small_config(train={"epochs": 1}, model={"grad_checkpointing": True, "drop_path_rate": 0.1})
    summary = train(cfg, str(tmp_path))
    assert summary["backend"] == "torch" and summary["attention_type"] == "divided_space_time"
    assert math.isfinite(summary["val_loss"])


def test_reinit_draws_the_named_parameters_again():
    cfg = small_config(model={"reinit": {"time_embed": 1.0}})
    model = build_model(cfg, 4, "torch")
    assert 0.5 < model.time_embed.detach().std().item() < 1.5
    cfg = small_config(model={"reinit": {}})
    assert build_model(cfg, 4, "torch").time_embed.detach().abs().max().item() == 0.0
    with pytest.raises(ValueError, match="no parameter name ends with 'nope'"):
        build_model(small_config(model={"reinit": {"nope": 1.0}}), 4, "torch")


def test_cpu_threads_leave_room_for_data_workers():
    n, why = cpu_threads("auto", num_workers=1)
    assert n >= 1 and "data worker" in why
    assert cpu_threads(3, num_workers=1)[0] == 3


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@pytest.mark.parametrize("model_fn, overrides", [
    (lambda c, n, b: TinyVideoNet(n), {"train": {"amp": "fp16", "ema_decay": 0.9}, "optim": {"clip_grad": 0.5}}),
    (nan_every(3), {"train": {"max_nonfinite": 100}, "optim": {"name": "sgd"}}),
], ids=["fp16-ema-clip", "nonfinite-sgd"])
def test_host_syncs_at_most_once_per_log_interval(tmp_path, monkeypatch, model_fn, overrides):
    """Every way a tensor reaches the host is counted; between two optimizer steps there are
    none, except one at each log_every-th step (the sums of the steps since the last one)."""
    from divattn.train import loop

    count = [0]
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    after = []
    original_after = loop._Run._after_step

    def recording(self, micro):
        original_after(self, micro)
        after.append((self.state.step, count[0]))

    monkeypatch.setattr(loop._Run, "_after_step", recording)
    cfg = small_config(train={**overrides.get("train", {}), "epochs": 1, "accum_steps": 2, "log_every": 3,
                              "checkpoint_every": 0},
                       optim=overrides.get("optim", {}), data={"synthetic": {"train_size": 144}})
    summary = train(cfg, str(tmp_path), model_fn=model_fn)
    assert summary["steps"] == 9 and len(after) == 9
    if "max_nonfinite" in cfg["train"] and cfg["train"]["max_nonfinite"] == 100:
        assert summary["skipped_steps"] == 6  # every third forward is NaN: 6 of the 9 steps have one
    per_step = {step: n - before for (step, n), (_, before) in zip(after[1:], after)}
    assert per_step == {s: (1 if s % 3 == 0 else 0) for s in range(2, 10)}, per_step


class FailsFirstEval(TinyVideoNet):
    """Raises from its first evaluation forward: a run killed after an epoch-end checkpoint."""

    failed = False

    def forward(self, video):
        if not self.training and not FailsFirstEval.failed:
            FailsFirstEval.failed = True
            raise Preempted()
        return super().forward(video)


@pytest.mark.parametrize("broken_fn", [dies_at(5), lambda c, n, b: FailsFirstEval(n)],
                         ids=["mid-epoch", "before-evaluation"])
def test_a_resumed_run_reports_what_an_uninterrupted_run_reports(tmp_path, tiny_model_fn, broken_fn):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    timing = {"clips_per_s", "train_time_s", "wall_time_s", "time_s", "train/clips_per_s"}
    cfg = small_config(train={"epochs": 2, "checkpoint_every": 2, "log_every": 2}, log={"tensorboard": True})
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(cfg, str(whole), model_fn=tiny_model_fn)
    FailsFirstEval.failed = False
    with pytest.raises(Preempted):
        train(cfg, str(broken), model_fn=broken_fn)
    train(cfg, str(broken), resume=str(broken / "checkpoint.pt"), model_fn=tiny_model_fn)

    def outputs(folder):
        summary = json.loads((folder / "summary.json").read_text())
        rows = [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(open(folder / "metrics.csv"))]
        acc = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        points = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t not in timing}
        return {k: v for k, v in summary.items() if k not in timing}, rows, points, summary

    a, b = outputs(whole), outputs(broken)
    assert a[:3] == b[:3]
    assert b[3]["train_time_s"] > 0 and b[3]["clips_per_s"] > 0
