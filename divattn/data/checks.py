"""Checks a dataset passes before the first training step, each failure one sentence.

:func:`check_inputs` (the ``data`` config's root and annotation files exist) runs before
the annotation files are read; :func:`find_problems` looks at the items of a dataset
(every listed file exists, labels in range, and optionally each file's header and first
frame decode) and :func:`describe` turns what it found, over every rank, into one
:class:`DataError` message: a count and the first few names.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from .decode import VideoDecodeError, read_frames

FIRST_FEW = 3


class DataError(ValueError):
    """A dataset that cannot train or evaluate: missing or unreadable annotation files,
    listed videos that are missing, labels out of range, validation videos that do not decode."""


def check_inputs(cfg: dict) -> None:
    """``data.root`` is a folder and the annotation files its dataset needs exist."""
    root = cfg.get("root")
    if root is not None and not os.path.isdir(root):
        raise DataError(f"data.root={root!r} is not a folder")
    for key in ("train_file", "val_file", "labels_file"):
        path = cfg.get(key)
        if path is not None and not os.path.isfile(path):
            raise DataError(f"data.{key}={path!r}: no such file")


def find_problems(dataset, indices: Iterable[int], num_classes: int, probe: bool) -> dict:
    """What is wrong with items ``indices`` of a :class:`~divattn.data.VideoDataset`:
    ``{"missing": [path], "labels": [(path, label)], "undecodable": [(path, reason)]}``.

    ``probe`` decodes each existing file's first frame (its header and first packet).
    Datasets without files (``samples``) have nothing to check.
    """
    found = {"missing": [], "labels": [], "undecodable": []}
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return found
    for i in indices:
        path, label = samples[i]
        if not 0 <= label < num_classes:
            found["labels"].append((path, label))
        if not os.path.isfile(path):
            found["missing"].append(path)
        elif probe:
            try:
                read_frames(path, lambda total: [0], dataset.decoder)
            except VideoDecodeError as e:
                found["undecodable"].append((path, e.reason))
    return found


def describe(name: str, found: Iterable[dict], total: int, num_classes: int,
             hint: Optional[str] = None) -> Optional[str]:
    """One sentence for the problems ``found`` (one dict per shard) in the ``total`` items of
    the ``name`` set, or None when there are none."""
    merged = {"missing": [], "labels": [], "undecodable": []}
    for part in found:
        for key in merged:
            merged[key] += part[key]
    parts = []
    if merged["missing"]:
        names = ", ".join(merged["missing"][:FIRST_FEW])
        parts.append(f"{len(merged['missing'])} of its {total} files are missing (e.g. {names})")
    if merged["labels"]:
        shown = ", ".join(f"{p} has {lab}" for p, lab in merged["labels"][:FIRST_FEW])
        parts.append(f"{len(merged['labels'])} labels are outside [0, {num_classes}) ({shown})")
    if merged["undecodable"]:
        shown = "; ".join(f"{p}: {why}" for p, why in merged["undecodable"][:FIRST_FEW])
        parts.append(f"{len(merged['undecodable'])} files do not decode ({shown})")
    if not parts:
        return None
    return f"the {name} set: " + "; ".join(parts) + (f" ({hint})" if hint else "")
