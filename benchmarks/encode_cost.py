"""What a replica's mp4 encoding costs per video at the real configs' geometries (CPU only, no model).

    python benchmarks/encode_cost.py [--videos 3] [--geometry 49x480x720 --geometry 81x480x832]

A replica renders a call's videos on its GPU, then encodes each to mp4 (``io.video.write_video``: libx264,
``video.crf`` 18) before it takes the next call, so these seconds are GPU idle time per video unless encoding
overlaps the next render. The frames are synthetic motion with detail (a textured background the camera pans over,
moving discs, grain): x264's cost depends on the content, so treat the numbers as its order of magnitude (the MB
printed say how much detail x264 found; a generated 480p clip at crf 18 is typically a few MB); ``--noise`` encodes
uniform noise, x264's worst case.
Prints the machine, and seconds per video for each geometry (each video timed alone; spread over the runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np

from anisora_ray.io.video import write_video


def frames(num: int, height: int, width: int, seed: int) -> np.ndarray:
    """Moving content with detail: a textured background the camera pans over, three moving discs, grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    coarse = rng.uniform(0, 255, size=(height // 8 + 2, (width + 4 * num) // 8 + 2, 3)).astype(np.float32)
    texture = coarse.repeat(8, axis=0).repeat(8, axis=1)  # blocks of detail, wide enough to pan across
    out = np.empty((num, height, width, 3), np.uint8)
    centres = rng.uniform(0.2, 0.8, size=(3, 2)) * (height, width)
    speeds = rng.uniform(-3, 3, size=(3, 2))
    colours = rng.uniform(0, 255, size=(3, 3))
    for t in range(num):
        img = texture[:height, 4 * t: 4 * t + width].copy()
        for (cy, cx), (vy, vx), colour in zip(centres, speeds, colours, strict=True):
            disc = (y - cy - vy * t) ** 2 + (x - cx - vx * t) ** 2 < (height / 8) ** 2
            img[disc] = colour
        img += rng.normal(0, 3, size=img.shape).astype(np.float32)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--geometry", action="append", help="FRAMESxHEIGHTxWIDTH (default: CogVideoX's and Wan's)")
    parser.add_argument("--crf", type=int, default=18)
    parser.add_argument("--threads", type=int, default=0, help="encoder threads (0: x264's choice; a replica uses "
                        "generator.actor.num_cpus - 1)")
    parser.add_argument("--noise", action="store_true", help="uniform noise frames: x264's worst case, an upper bound")
    args = parser.parse_args()
    geometries = args.geometry or ["49x480x720", "81x480x832"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}")
    with tempfile.TemporaryDirectory() as tmp:
        for geometry in geometries:
            num, height, width = (int(v) for v in geometry.split("x"))
            seconds, sizes = [], []
            for i in range(args.videos):
                video = (np.random.default_rng(i).integers(0, 256, (num, height, width, 3), dtype=np.uint8) if args.noise
                         else frames(num, height, width, seed=i))
                began = time.perf_counter()
                sizes.append(write_video(video, os.path.join(tmp, f"{geometry}-{i}.mp4"), fps=16, crf=args.crf,
                                         threads=args.threads))
                seconds.append(time.perf_counter() - began)
            print(f"{geometry}: {statistics.median(seconds):.2f} s per video (median; {min(seconds):.2f}-"
                  f"{max(seconds):.2f} over {len(seconds)}), {statistics.mean(sizes) / 1e6:.1f} MB, crf {args.crf}"
                  + (", noise" if args.noise else "") + f", threads {args.threads or 'auto'}")


if __name__ == "__main__":
    main()
