"""Video datasets from annotation files: Kinetics CSV, Something-Something-v2 JSON,
UCF101 split files, and plain ``path label`` lists.

Each reader returns ``(samples, class_names)`` with ``samples`` a list of
``(path, label)``; :class:`VideoDataset` decodes and transforms them. In training a
file that cannot be decoded gives a :class:`Skipped` item that
:func:`collate_skipping` drops and counts; in evaluation it raises
:class:`~divattn.data.decode.VideoDecodeError`.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .checks import DataError
from .decode import VideoDecodeError, read_frames, resolve_decoder
from .sampling import split_key
from .transforms import (KINETICS_MEAN, KINETICS_STD, clip_frames, eval_clip_indices, eval_transform,
                         train_clip_indices, train_transform)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")

Samples = List[Tuple[str, int]]


def _resolve(root: Optional[str], path: str) -> str:
    return path if root is None or os.path.isabs(path) else os.path.join(root, path)


def read_path_label_list(list_file: str, root: Optional[str] = None) -> Tuple[Samples, Optional[list]]:
    """A plain list: one ``path label`` per line (label an int; space, tab or comma between).

    Paths are relative to ``root`` (or absolute); blank lines and ``#`` lines are ignored.
    """
    samples = []
    with open(list_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = re.fullmatch(r"(.+?)[\s,]+(\S+)", line)
            if m is None:
                raise DataError(f"{list_file}:{n}: expected 'path label', got {line!r}")
            try:
                samples.append((_resolve(root, m.group(1)), int(m.group(2))))
            except ValueError:
                raise DataError(f"{list_file}:{n}: label {m.group(2)!r} is not an integer") from None
    return samples, None


def read_kinetics_csv(csv_file: str, root: Optional[str] = None,
                      class_names: Optional[Sequence[str]] = None) -> Tuple[Samples, list]:
    """Kinetics annotations: ``label,youtube_id,time_start,time_end[,split,...]`` with a header.

    The clip ``{youtube_id}_{time_start:06d}_{time_end:06d}`` is looked for as
    ``root/<label>/<clip><ext>`` then ``root/<clip><ext>`` for the usual extensions. A
    CSV with ``path`` and ``label`` columns is read as is. Class indices follow
    ``class_names`` (give the training set's to an evaluation set) or the sorted labels.
    """
    with open(csv_file, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{csv_file}: no rows")
    columns = set(rows[0])
    if "label" not in columns or not ({"youtube_id", "time_start", "time_end"} <= columns or "path" in columns):
        raise DataError(f"{csv_file}: expected columns label,youtube_id,time_start,time_end or path,label; got {sorted(columns)}")
    names = list(class_names) if class_names is not None else sorted({r["label"] for r in rows})
    index = {name: i for i, name in enumerate(names)}
    samples = []
    for n, r in enumerate(rows, 2):
        if r["label"] not in index:
            raise DataError(f"{csv_file}:{n}: label {r['label']!r} is not one of the {len(names)} classes")
        if "path" in columns and r.get("path"):
            path = _resolve(root, r["path"])
        else:
            clip = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
            path = _find_clip(root or ".", r["label"], clip)
        samples.append((path, index[r["label"]]))
    return samples, names


def _find_clip(root: str, label: str, clip: str) -> str:
    for folder in (os.path.join(root, label), root):
        for ext in VIDEO_EXTENSIONS:
            path = os.path.join(folder, clip + ext)
            if os.path.exists(path):
                return path
    return os.path.join(root, label, clip + VIDEO_EXTENSIONS[0])


def read_ssv2(json_file: str, labels_file: str, root: Optional[str] = None,
              extension: str = ".webm") -> Tuple[Samples, list]:
    """Something-Something-v2: a list of ``{"id", "template", ...}`` and the labels file.

    ``labels_file`` maps each template (without the ``[...]`` brackets) to its index, as
    ``something-something-v2-labels.json`` does. Videos are ``root/<id><extension>``.
    """
    label_map = {k: int(v) for k, v in _read_json(labels_file).items()}
    names = [None] * len(label_map)
    for name, i in label_map.items():
        names[i] = name
    entries = _read_json(json_file)
    samples = []
    for e in entries:
        if "template" not in e:
            raise DataError(f"{json_file}: entry {e.get('id')!r} has no 'template' (a test split without labels?)")
        template = e["template"].replace("[", "").replace("]", "")
        if template not in label_map:
            raise DataError(f"{json_file}: entry {e['id']!r}: template {template!r} is not in {labels_file}")
        samples.append((_resolve(root, f"{e['id']}{extension}"), label_map[template]))
    return samples, names


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None


def read_ucf101(split_file: str, class_ind_file: str, root: Optional[str] = None) -> Tuple[Samples, list]:
    """UCF101 ``trainlist0N.txt`` (``Class/v_x.avi 12``, 1-based) or ``testlist0N.txt``
    (``Class/v_x.avi``, label from the folder) with ``classInd.txt`` (``12 Class``)."""
    names = {}
    with open(class_ind_file, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                i, name = line.split()
                names[int(i) - 1] = name
    ordered = [names[i] for i in range(len(names))]
    by_name = {name: i for i, name in names.items()}
    samples = []
    with open(split_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 1:
                label = int(parts[1]) - 1
            else:
                folder = parts[0].replace("\\", "/").split("/")[0]
                if folder not in by_name:
                    raise DataError(f"{split_file}:{n}: class folder {folder!r} is not in {class_ind_file}")
                label = by_name[folder]
            samples.append((_resolve(root, parts[0]), label))
    return samples, ordered


@dataclass(frozen=True)
class Skipped:
    """A training item whose file could not be decoded."""

    index: int
    path: str
    reason: str


class VideoDataset(torch.utils.data.Dataset):
    """Decoded, sampled and transformed clips of ``(path, label)`` samples.

    Training items (``train=True``) are ``(video, label, index)`` with ``video`` float32
    ``(C, T, S, S)``: one clip of ``num_frames`` frames ``sampling_rate`` apart at a
    random start, scale jitter, random crop, horizontal flip when ``flip``. A ``(i,
    seed)`` key (see :class:`~divattn.data.EpochSampler`) seeds the randomness; an int
    key uses ``i``. Evaluation items are ``(views, label, index)`` with ``views``
    ``(num_clips * num_crops, C, T, S, S)`` whose scores the evaluator averages. With
    ``variable_frames`` a video shorter than a clip's span gives a clip of the frames it
    has (:func:`~divattn.data.transforms.clip_frames`, T < ``num_frames``), which
    :func:`collate_skipping` pads, instead of repeating its last frame.
    """

    def __init__(self, samples: Samples, *, train: bool, num_frames: int = 8, sampling_rate: int = 32,
                 crop_size: int = 224, train_scale: Sequence[int] = (256, 320), test_scale: int = 224,
                 num_crops: int = 3, num_clips: int = 1, flip: bool = True,
                 mean: Sequence[float] = KINETICS_MEAN, std: Sequence[float] = KINETICS_STD,
                 decoder: str = "auto", class_names: Optional[Sequence[str]] = None, variable_frames: bool = False):
        if not samples:
            raise DataError("VideoDataset: no samples")
        self.samples = list(samples)
        self.train = train
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.crop_size = crop_size
        self.train_scale = tuple(train_scale)
        self.test_scale = test_scale
        self.num_crops = num_crops
        self.num_clips = num_clips
        self.flip = flip
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.decoder = resolve_decoder(decoder)
        self.class_names = list(class_names) if class_names is not None else None
        self.variable_frames = bool(variable_frames)

    def _frames(self, total: int) -> int:
        """The frames of a clip of a ``total``-frame video."""
        return clip_frames(total, self.num_frames, self.sampling_rate) if self.variable_frames else self.num_frames

    @property
    def num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        return max(label for _, label in self.samples) + 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = split_key(key)
        path, label = self.samples[index]
        if self.train:
            rng = np.random.default_rng(index if seed is None else seed)
            try:
                frames = read_frames(path, lambda total: train_clip_indices(total, self._frames(total),
                                                                            self.sampling_rate, rng), self.decoder)
            except VideoDecodeError as e:
                return Skipped(index, path, e.reason)
            video = train_transform(frames, rng, crop_size=self.crop_size, train_scale=self.train_scale,
                                    flip=self.flip, mean=self.mean, std=self.std)
            return video, label, index
        frames = read_frames(path, lambda total: np.concatenate(
            eval_clip_indices(total, self._frames(total), self.sampling_rate, self.num_clips)), self.decoder)
        views = [eval_transform(clip, crop_size=self.crop_size, test_scale=self.test_scale, num_crops=self.num_crops,
                                mean=self.mean, std=self.std)
                 for clip in frames.split(len(frames) // self.num_clips)]
        return torch.cat(views), label, index


def collate_skipping(items):
    """Stack ``(video, label, index)`` items, dropping :class:`Skipped` ones.

    Returns a dict: ``video`` ``(B, ...)``, ``label`` and ``index`` ``(B,)`` int64 (``B``
    may be 0), ``indices``, the same indices as a list (for messages, without reading a
    tensor), and ``skipped``, the list of dropped :class:`Skipped` items. Clips of
    different frame counts (variable frames; T is dim -3 of an item, ``(C, T, H, W)`` or
    ``(V, C, T, H, W)``) are padded with zeros at the end to the longest: then ``frames``
    ``(B,)`` int64 holds each clip's own count and ``mask`` ``(B, T)`` bool its real frames
    (the models' and losses' ``frames``); both are None when no clip is padded.
    """
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    frames = mask = None
    if not good:
        video = torch.empty(0)
    elif len({it[0].shape[-3] for it in good}) == 1:
        video = torch.stack([it[0] for it in good])
    else:
        lengths = [it[0].shape[-3] for it in good]
        shape = list(good[0][0].shape)
        shape[-3] = max(lengths)
        video = good[0][0].new_zeros((len(good), *shape))
        for b, it in enumerate(good):
            video[b, ..., :lengths[b], :, :] = it[0]
        frames = torch.tensor(lengths, dtype=torch.int64)
        mask = torch.arange(shape[-3]) < frames[:, None]
    return {
        "video": video,
        "label": torch.tensor([it[1] for it in good], dtype=torch.int64),
        "index": torch.tensor([it[2] for it in good], dtype=torch.int64),
        "indices": [int(it[2]) for it in good],
        "skipped": skipped,
        "frames": frames,
        "mask": mask,
    }
