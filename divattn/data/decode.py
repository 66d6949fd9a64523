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


def read_frames(path: str, choose: Callable[[int], Sequence[int]], decoder: str = "pyav",
                stats: Optional[dict] = None) -> torch.Tensor:
    """Frames ``choose(num_frames)`` of the video at ``path``, as uint8 ``(K, H, W, 3)``.

    ``choose`` gets the number of frames in the file and returns frame indices in
    ``[0, num_frames)`` (any order, repeats allowed); the result follows that order.
    Raises :class:`VideoDecodeError` for any file that cannot give those frames.

    PyAV seeks to the keyframe before the first wanted frame when that frame is more
    than :data:`SEEK_AFTER_S` into the video, so a clip near the end of a long video
    costs about what one near its start does (the frames from that keyframe on are
    decoded, not every frame from the start); frames are told apart by their timestamps
    then. A file whose frames carry no timestamps, or where the seek lands after the
    wanted frame, is decoded from the start. ``stats`` (a dict) gets ``"decoded"``, the
    frames decoded, and ``"seeked"``.
    """
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file")
    stats = {} if stats is None else stats
    if decoder == "torchcodec":
        return _read_torchcodec(path, choose)
    if decoder != "pyav":
        raise ValueError(f"decoder must be 'pyav' or 'torchcodec' here, got {decoder!r}")
    return _read_pyav(path, choose, stats)


def _checked_indices(path: str, choose, total: int) -> np.ndarray:
    if total <= 0:
        raise VideoDecodeError(path, "the video stream has no frames")
    wanted = np.asarray(choose(total), dtype=np.int64)
    if wanted.size == 0 or wanted.min() < 0 or wanted.max() >= total:
        raise ValueError(f"frame indices {wanted.tolist()} are outside [0, {total}) for {path}")
    return wanted


# Seek when the first wanted frame is further than this into the video (decoding a
# keyframe interval from the start costs less than a seek).
SEEK_AFTER_S = 1.0


def _seek_to(container, stream, first: int):
    """Seek to the keyframe at or before frame ``first``; returns the frame-index function
    of a decoded frame (from its timestamp), or None when the stream cannot say it."""
    rate, tb = stream.average_rate or stream.guessed_rate, stream.time_base
    if not rate or not tb or first < SEEK_AFTER_S * rate:
        return None
    start = stream.start_time or 0
    container.seek(start + int(first / rate / tb), stream=stream, backward=True, any_frame=False)
    return lambda frame: None if frame.pts is None else round((frame.pts - start) * tb * rate)


def _decode(container, stream, keep: set, first: int, last: int, stats: dict, seek: bool):
    """Frames ``keep`` (indices, ``first`` the least, ``last`` the largest) as ``{index: rgb}``,
    and the number of the frames in the file reached. With ``seek``, from the keyframe
    before ``first`` (:func:`_seek_to`), else from where the container is; None when a seek
    cannot be trusted (no timestamps, or it landed after ``first``)."""
    index_of = _seek_to(container, stream, first) if seek else None
    stats["seeked"] = index_of is not None
    got, n = {}, 0
    for frame in container.decode(stream):
        stats["decoded"] = stats.get("decoded", 0) + 1
        if index_of is not None:
            i = index_of(frame)
            if i is None or (not got and i > first):
                return None
            n = i
        if n in keep:
            got[n] = frame.to_ndarray(format="rgb24")
        n += 1
        if n > last:
            break
    return got, n


def _read_pyav(path: str, choose, stats: dict) -> torch.Tensor:
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
                first, last = int(wanted.min()), int(wanted.max())
                found = _decode(container, stream, keep, first, last, stats, seek=True)
                if found is None:  # the seek cannot be trusted: decode from the start
                    container.seek(stream.start_time or 0, stream=stream, backward=True, any_frame=False)
                    found = _decode(container, stream, keep, first, last, stats, seek=False)
                got, n = found
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
