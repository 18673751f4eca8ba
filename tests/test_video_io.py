import os
import time

import numpy as np
import pytest

from anisora_ray.errors import VideoDecodeError
from anisora_ray.io import fs
from anisora_ray.io.video import read_all_frames, read_clip, sample_indices, video_info, write_video


def moving_square(num_frames=9, size=32):
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    frames[..., 2] = 60
    for t in range(num_frames):
        x = 2 + 2 * t
        frames[t, 10:20, x : x + 10] = (250, 200, 40)
    return frames


def _released_indices(n: int) -> list[int]:
    """bilibili/Index-anisora reward/reward_infer.py: 24 of the first 144 frames, or all of a short video."""
    if n > 24:
        window = min(n, 144)
        return np.arange(0, window, window / 24).astype(int).tolist()
    return list(range(n))


def test_sample_indices_are_the_released_ones():
    for n in range(1, 400):
        assert sample_indices(n, 24, 144) == _released_indices(n), n
    # a 49-frame CogVideoX clip: every other frame from 0 to 46 (linspace would end on 48)
    assert sample_indices(49, 24, 144) == list(range(0, 47, 2))
    assert sample_indices(300, 24, 144)[-1] == 138
    assert sample_indices(9, 3, 144) == [0, 3, 6]
    assert sample_indices(9, 24, 144) == list(range(9))  # a short video is taken whole, no repeats
    assert sample_indices(300, 24, 20) == list(range(20))
    with pytest.raises(ValueError):
        sample_indices(0, 4, 8)


@pytest.mark.parametrize("base", ["local", "memory://videos"])
def test_write_then_decode(tmp_path, base):
    root = str(tmp_path) if base == "local" else base
    uri = fs.join(root, "a", "clip.mp4")
    frames = moving_square()
    assert write_video(frames, uri, fps=8) > 0
    info = video_info(uri)
    assert (info.num_frames, info.height, info.width, info.fps) == (9, 32, 32, 8.0)
    decoded = read_all_frames(uri)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6  # H.264 is lossy, not wrong
    clip = read_clip(uri, num_frames=24, max_frames=144, size=16)
    assert clip.shape == (9, 16, 16, 3) and clip.dtype == np.uint8
    assert read_clip(uri, num_frames=3, max_frames=144).shape == (3, 32, 32, 3)


def test_encoding_is_deterministic(tmp_path):
    frames = moving_square()
    write_video(frames, str(tmp_path / "a.mp4"), fps=8)
    write_video(frames, str(tmp_path / "b.mp4"), fps=8)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_encode_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        write_video(np.zeros((4, 32, 32), np.uint8), str(tmp_path / "x.mp4"), fps=8)
    with pytest.raises(ValueError, match="even"):
        write_video(np.zeros((4, 31, 32, 3), np.uint8), str(tmp_path / "x.mp4"), fps=8)


@pytest.mark.parametrize("keep", [0.0, 0.05, 0.5, 0.9, 0.99])
def test_truncated_and_empty_files_raise_naming_the_file(tmp_path, keep):
    good = tmp_path / "good.mp4"
    write_video(moving_square(), str(good), fps=8)
    data = good.read_bytes()
    bad = tmp_path / f"cut-{keep}.mp4"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(VideoDecodeError) as err:
        read_clip(str(bad), num_frames=24, max_frames=144)
    assert err.value.uri == str(bad) and str(bad) in str(err.value)
    if keep == 0.0:
        assert "empty" in err.value.reason


@pytest.mark.parametrize("content", [b"not a video at all " * 50, None])
def test_garbage_and_missing_files(tmp_path, content):
    path = tmp_path / "x.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoDecodeError, match="x.mp4"):
        read_clip(str(path), num_frames=4, max_frames=8)


def test_a_folder_where_a_video_should_be_is_the_items_fault_named(tmp_path):
    (tmp_path / "x.mp4").mkdir()  # IsADirectoryError was no content error: one such row stopped the round
    with pytest.raises(VideoDecodeError, match=r"x.mp4.*IsADirectoryError"):
        read_clip(str(tmp_path / "x.mp4"), num_frames=4, max_frames=8)


def test_strided_frames_encode_like_their_contiguous_copy(tmp_path):
    channels_first = np.ascontiguousarray(moving_square().transpose(0, 3, 1, 2))
    view = channels_first.transpose(0, 2, 3, 1)  # a channels-last view, as a permute gives
    assert not view.flags["C_CONTIGUOUS"]
    write_video(view, str(tmp_path / "view.mp4"), fps=8)
    write_video(np.ascontiguousarray(view), str(tmp_path / "copy.mp4"), fps=8)
    assert (tmp_path / "view.mp4").read_bytes() == (tmp_path / "copy.mp4").read_bytes()


def test_an_encoder_killed_mid_video_leaves_no_file_behind(tmp_path):
    """The mp4 is muxed in an anonymous in-memory file: a replica SIGKILLed while it encodes (chaos, a node lost,
    `ray stop`) leaves nothing in its temporary folder, and a finished video still has its index first (streamable)."""
    import signal
    import subprocess
    import sys

    from anisora_ray.io.video import encode_mp4

    data = encode_mp4(moving_square(), fps=8)
    assert 0 < data.find(b"moov") < data.find(b"mdat")  # +faststart: players start before the whole file arrives
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", "import numpy as np, sys\n"
         "from anisora_ray.io.video import encode_mp4\n"
         "frames = np.random.default_rng(0).integers(0, 256, (48, 128, 128, 3), dtype=np.uint8)\n"
         "encode_mp4(frames, fps=8)\nprint('encoding', flush=True)\n"
         "while True:\n    encode_mp4(frames, fps=8, threads=1)\n"],
        env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "encoding"
        time.sleep(1.0)  # mid-video: one takes ~0.3 s here, so the kill lands inside an encode
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("width", [96, 160, 480])
def test_a_side_by_side_of_any_width_the_config_allows_encodes(tmp_path, width):
    """Widths whose 1/32 is odd once gave an odd total width, which yuv420p refuses: the round's sample videos
    failed after all its generation, and again on every resume."""
    from anisora_ray.io.video import read_all_frames, write_video
    from anisora_ray.loop.report import side_by_side_videos

    rng = np.random.default_rng(0)
    for name in ("w", "l"):
        write_video(rng.integers(0, 255, (5, 32, width, 3), dtype=np.uint8), str(tmp_path / f"{name}.mp4"), fps=8)
    out = side_by_side_videos(str(tmp_path / "w.mp4"), str(tmp_path / "l.mp4"), str(tmp_path / "sbs.mp4"), fps=8)
    frames = read_all_frames(out)
    assert frames.shape[0] == 5 and frames.shape[2] % 2 == 0 and frames.shape[2] > 2 * width
