"""mp4 video: encode frames to H.264 (PyAV) at any fsspec URL; decode and sample with decord.

A file that is empty, truncated, corrupt or not a video raises :class:`VideoDecodeError` naming it.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from anisora_ray.errors import VideoDecodeError
from anisora_ray.io import fs


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def encode_mp4(frames: np.ndarray, fps: int, codec: str = "libx264", crf: int = 18, threads: int = 0) -> bytes:
    """H.264 mp4 bytes (yuv420p, moov atom first so players can stream it) from uint8 [F, H, W, 3]; ``threads``
    encoder threads at most (0: the encoder's choice, from the machine's cores)."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames of shape [F, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    frames = np.ascontiguousarray(frames)  # PyAV misreads strided views (e.g. a channels-last permute)
    with _scratch_file() as path:
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            stream.codec_context.thread_count = threads
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        with open(path, "rb") as f:
            return f.read()


@contextlib.contextmanager
def _scratch_file():
    """A path the muxer can write and reopen (``+faststart`` moves the index to the front in a second pass). On
    Linux an anonymous in-memory file (memfd), freed with its process however that ends: a replica killed
    mid-encode leaves nothing behind. Elsewhere a temporary directory."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("anisora-enc", os.MFD_CLOEXEC)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="anisora-enc-") as tmp:
        yield os.path.join(tmp, "video.mp4")


def write_video(frames: np.ndarray, uri: str, fps: int, codec: str = "libx264", crf: int = 18, threads: int = 0) -> int:
    """Encode ``frames`` and write the mp4 to ``uri``; returns the number of bytes written."""
    data = encode_mp4(frames, fps=fps, codec=codec, crf=crf, threads=threads)
    fs.write_bytes(uri, data)
    return len(data)


def sample_indices(total: int, num_frames: int, max_frames: int) -> list[int]:
    """At most ``num_frames`` indices over the first ``max_frames`` of ``total`` frames, as the released
    AnimeReward code samples them (24 of the first 144): ``np.arange(0, L, L / num_frames).astype(int)``
    with ``L = min(total, max_frames)`` (floor, first frame included, last one usually not). A window of
    ``num_frames`` or fewer is taken whole, never with repeated frames (repeats read as stutter).
    """
    if total <= 0:
        raise ValueError("a video with no frames cannot be sampled")
    window = min(total, max_frames)
    if window <= num_frames:
        return list(range(window))
    return np.arange(0, window, window / num_frames).astype(int)[:num_frames].tolist()


def _reader(uri: str):
    import decord

    try:
        data = fs.read_bytes(uri)
    except FileNotFoundError:
        raise VideoDecodeError(uri, "file does not exist") from None
    except fs.ITEM_READ_ERRORS as exc:  # a folder, no read permission, an unknown protocol
        raise VideoDecodeError(uri, f"cannot be read ({type(exc).__name__}: {exc})") from None
    if not data:
        raise VideoDecodeError(uri, "file is empty (0 bytes)")
    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord raises RuntimeError or DECORDError with ffmpeg's message
        raise VideoDecodeError(uri, f"not a readable video ({_first_line(exc)})") from None
    if len(reader) == 0:
        raise VideoDecodeError(uri, "video has no frames")
    return reader


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def video_info(uri: str) -> VideoInfo:
    reader = _reader(uri)
    height, width = reader[0].shape[:2]
    return VideoInfo(num_frames=len(reader), fps=float(reader.get_avg_fps()), height=height, width=width)


def read_clip(uri: str, num_frames: int, max_frames: int, size: int | None = None) -> np.ndarray:
    """Decode up to ``num_frames`` frames sampled evenly over the first ``max_frames``: uint8 [N, H, W, 3].

    ``size`` resizes to a square ``size`` x ``size`` (224 for AnimeReward), antialiased bilinear.
    """
    reader = _reader(uri)
    indices = sample_indices(len(reader), num_frames, max_frames)
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception as exc:
        raise VideoDecodeError(uri, f"truncated or corrupt stream ({_first_line(exc)})") from None
    if frames.shape[0] != len(indices) or frames.ndim != 4:
        raise VideoDecodeError(uri, f"decoded {frames.shape} instead of {len(indices)} frames")
    return resize_frames(frames, size) if size else frames


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, size, size, 3]."""
    import torch
    import torch.nn.functional as F

    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_all_frames(uri: str) -> np.ndarray:
    """Every frame of the video, uint8 [F, H, W, 3]."""
    reader = _reader(uri)
    try:
        return reader.get_batch(list(range(len(reader)))).asnumpy()
    except Exception as exc:
        raise VideoDecodeError(uri, f"truncated or corrupt stream ({_first_line(exc)})") from None
