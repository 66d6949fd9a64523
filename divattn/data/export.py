"""Write clips to video files with PyAV, e.g. the synthetic task as a real dataset."""

from __future__ import annotations

import os
from typing import Iterable, Optional

import numpy as np


def write_video(path: str, frames: np.ndarray, fps: int = 25, codec: Optional[str] = None,
                keyframe_interval: Optional[int] = None) -> str:
    """Encode uint8 ``(T, H, W, 3)`` RGB frames (H, W even) to ``path``; returns ``path``.

    ``codec`` defaults to H.264 where PyAV's FFmpeg has it, else MPEG-4 part 2;
    ``keyframe_interval``: frames between keyframes (default: the encoder's, 250 for H.264).
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {frames.shape[1:3]}")
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if keyframe_interval is not None:
            stream.codec_context.gop_size = int(keyframe_interval)
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def export_synthetic(dataset, folder: str, indices: Iterable[int], list_name: str = "list.txt") -> str:
    """Write items ``indices`` of a :class:`~divattn.data.SyntheticMotion` as MP4 files
    in ``folder`` plus a ``path label`` list file (paths relative to ``folder``);
    returns the list file's path."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i in indices:
        p = dataset.params_for(i)
        frames = (dataset.render(p) * 255.0 + 0.5).astype(np.uint8)
        name = f"clip{i:06d}.mp4"
        write_video(os.path.join(folder, name), frames)
        lines.append(f"{name} {p.label}\n")
    list_file = os.path.join(folder, list_name)
    with open(list_file, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return list_file
