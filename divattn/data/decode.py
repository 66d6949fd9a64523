"""Decode chosen frames of a video file: PyAV, or torchcodec when it imports.

:func:`read_frames` takes a function from the number of frames in the file to the
frame indices wanted, and returns those frames as one ``uint8`` ``(K, H, W, 3)``
tensor. Whatever goes wrong (missing, empty, truncated or corrupt file, no video
stream, fewer frames decoded than the container declares) raises
:class:`VideoDecodeError` naming the file, so the caller can skip it (training) or
stop (evaluation).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch

DECODERS = ("auto", "pyav", "torchcodec")


class VideoDecodeError(RuntimeError):
    """A video file could not be decoded; ``path`` and ``reason`` say which and why.

    With one argument it is a ready message (how a DataLoader worker's error is raised
    again in the main process); ``path`` and ``reason`` are then None.
    """

    def __init__(self, path: str, reason: Optional[str] = None):
        super().__init__(path if reason is None else f"cannot decode {path}: {reason}")
        self.path = None if reason is None else path
        self.reason = reason


@functools.lru_cache(maxsize=None)
def torchcodec_unavailable_reason() -> Optional[str]:
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as e:  # ImportError, or its FFmpeg libraries failing to load
        return f"torchcodec is not importable ({type(e).__name__}: {e})"
    return None


def resolve_decoder(name: str) -> str:
    """``auto`` -> ``torchcodec`` when it imports, else ``pyav``; a forced one must work."""
    if name not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {name!r}")
    if name == "auto":
        return "pyav" if torchcodec_unavailable_reason() else "torchcodec"
    if name == "torchcodec" and torchcodec_unavailable_reason():
        raise RuntimeError(f"decoder 'torchcodec' was asked for but {torchcodec_unavailable_reason()}")
    return name


def read_frames(path: str, choose: Callable[[int], Sequence[int]], decoder: str = "pyav") -> torch.Tensor:
    """Frames ``choose(num_frames)`` of the video at ``path``, as uint8 ``(K, H, W, 3)``.

    ``choose`` gets the number of frames in the file and returns frame indices in
    ``[0, num_frames)`` (any order, repeats allowed); the result follows that order.
    Raises :class:`VideoDecodeError` for any file that cannot give those frames.
    """
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file")
    if decoder == "torchcodec":
        return _read_torchcodec(path, choose)
    if decoder != "pyav":
        raise ValueError(f"decoder must be 'pyav' or 'torchcodec' here, got {decoder!r}")
    return _read_pyav(path, choose)


def _checked_indices(path: str, choose, total: int) -> np.ndarray:
    if total <= 0:
        raise VideoDecodeError(path, "the video stream has no frames")
    wanted = np.asarray(choose(total), dtype=np.int64)
    if wanted.size == 0 or wanted.min() < 0 or wanted.max() >= total:
        raise ValueError(f"frame indices {wanted.tolist()} are outside [0, {total}) for {path}")
    return wanted


def _read_pyav(path: str, choose) -> torch.Tensor:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            declared = int(stream.frames or 0)
            if declared > 0:
                wanted = _checked_indices(path, choose, declared)
                keep = set(wanted.tolist())
                last = int(wanted.max())
                got = {}
                n = 0
                for frame in container.decode(stream):
                    if n in keep:
                        got[n] = frame.to_ndarray(format="rgb24")
                    n += 1
                    if n > last:
                        break
                if n <= last:
                    raise VideoDecodeError(path, f"truncated: the container declares {declared} frames, {n} decoded")
                frames = [got[i] for i in wanted.tolist()]
            else:
                # no frame count in the header: decode everything, then choose
                every = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
                wanted = _checked_indices(path, choose, len(every))
                frames = [every[i] for i in wanted.tolist()]
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, EOFError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    return torch.from_numpy(np.stack(frames))


def _read_torchcodec(path: str, choose) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder

    try:
        dec = VideoDecoder(path, dimension_order="NHWC")
        total = int(dec.metadata.num_frames or 0)
    except (RuntimeError, ValueError) as e:
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    wanted = _checked_indices(path, choose, total)
    try:
        batch = dec.get_frames_at(indices=wanted.tolist())
    except (RuntimeError, ValueError) as e:
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    return batch.data.contiguous()
