"""Build the training and evaluation datasets named by a ``data`` config section."""

from __future__ import annotations

from typing import Tuple

from .checks import DataError, check_inputs
from .datasets import VideoDataset, read_kinetics_csv, read_path_label_list, read_ssv2, read_ucf101
from .synthetic import SyntheticMotion

DATASETS = ("synthetic", "list", "kinetics", "ssv2", "ucf101")


def build_datasets(cfg: dict) -> Tuple[object, object, int]:
    """``(train_set, val_set, num_classes)`` for the ``data`` section ``cfg``.

    ``cfg["dataset"]`` is one of :data:`DATASETS`; see ``configs/`` for every key.
    """
    kind = cfg["dataset"]
    if kind == "synthetic":
        s = cfg["synthetic"]
        common = dict(num_frames=cfg["num_frames"], img_size=cfg["crop_size"], num_directions=s["num_directions"],
                      num_speeds=s["num_speeds"], speed=s["speed"], num_objects=s["num_objects"], radius=s["radius"],
                      contrast=s["contrast"], texture=s["texture"], noise=s["noise"], min_frames=s["min_frames"],
                      variable_frames=cfg["variable_frames"])
        if s["min_frames"] is not None and s["min_frames"] > cfg["num_frames"]:
            raise DataError(f"data.synthetic.min_frames={s['min_frames']} is more than data.num_frames="
                            f"{cfg['num_frames']}")
        train = SyntheticMotion(s["train_size"], seed=s["seed"], **common)
        val = SyntheticMotion(s["val_size"], seed=s["seed"] + 1_000_003, **common)
        return train, val, train.num_classes
    if kind not in DATASETS:
        raise DataError(f"data.dataset must be one of {DATASETS}, got {kind!r}")
    for key in ("train_file", "val_file"):
        if not cfg.get(key):
            raise DataError(f"data.dataset={kind!r} needs data.{key}")
    check_inputs(cfg)
    root = cfg.get("root")
    if kind == "list":
        train_samples, names = read_path_label_list(cfg["train_file"], root)
        val_samples, _ = read_path_label_list(cfg["val_file"], root)
    elif kind == "kinetics":
        train_samples, names = read_kinetics_csv(cfg["train_file"], root)
        val_samples, _ = read_kinetics_csv(cfg["val_file"], root, class_names=names)
    else:
        if not cfg.get("labels_file"):
            raise DataError(f"data.dataset={kind!r} needs data.labels_file "
                             + ("(something-something-v2-labels.json)" if kind == "ssv2" else "(classInd.txt)"))
        if kind == "ssv2":
            train_samples, names = read_ssv2(cfg["train_file"], cfg["labels_file"], root)
            val_samples, _ = read_ssv2(cfg["val_file"], cfg["labels_file"], root)
        else:
            train_samples, names = read_ucf101(cfg["train_file"], cfg["labels_file"], root)
            val_samples, _ = read_ucf101(cfg["val_file"], cfg["labels_file"], root)
    flip = cfg["flip"]
    if flip == "auto":
        flip = kind != "ssv2"
    common = dict(num_frames=cfg["num_frames"], sampling_rate=cfg["sampling_rate"], crop_size=cfg["crop_size"],
                  train_scale=cfg["train_scale"], test_scale=cfg["test_scale"], num_crops=cfg["test_crops"],
                  num_clips=cfg["test_clips"], flip=bool(flip), mean=cfg["mean"], std=cfg["std"],
                  decoder=cfg["decoder"], class_names=names, variable_frames=cfg["variable_frames"])
    train = VideoDataset(train_samples, train=True, **common)
    val = VideoDataset(val_samples, train=False, **common)
    num_classes = cfg.get("num_classes") or max(train.num_classes, val.num_classes)
    return train, val, int(num_classes)
