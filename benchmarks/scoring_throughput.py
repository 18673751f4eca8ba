"""Per-dimension scoring throughput (clips/s) of the classical backends, and the share of time decoding.

    python benchmarks/scoring_throughput.py [--clips 64] [--frames 49] [--size 224]

Writes synthetic moving-character clips as mp4, decodes them as the scorer does (24 of the first
144 frames, resized), then times each dimension on the decoded batch in-process.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import cv2
import numpy as np

from anisora_ray.io.video import read_clip, write_video
from anisora_ray.reward import DIMENSIONS, ClipBatch, build_dimension


def synthetic_clip(seed: int, frames: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(60, 160, (size // 8, size // 8, 3), dtype=np.uint8), (size, size))
    speed = rng.uniform(0, 4)
    out = []
    for t in range(frames):
        f = base.copy()
        x = int(size * 0.2 + speed * t) % (size - size // 4)
        cv2.circle(f, (x + size // 8, size // 2), size // 8, (246, 143, 181), -1)
        out.append(f)
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uris = []
        for i in range(args.clips):
            uri = os.path.join(tmp, f"{i}.mp4")
            write_video(synthetic_clip(i, args.frames, args.size), uri, fps=8)
            uris.append(uri)
        start = time.perf_counter()
        clips = [read_clip(u, 24, 144, args.size) for u in uris]
        decode_s = time.perf_counter() - start
    batch = ClipBatch(clips, ["an anime pink cat dances"] * len(clips), [c[0] for c in clips], [None] * len(clips))
    times = {}
    for name in DIMENSIONS:
        scorer = build_dimension(name, "classical")
        start = time.perf_counter()
        scorer.score(batch)
        times[name] = time.perf_counter() - start
    total = decode_s + sum(times.values())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.clips} clips of {args.frames} frames at "
          f"{args.size}x{args.size}, 24 frames sampled")
    print(f"decode: {args.clips / decode_s:.1f} clips/s")
    for name, t in times.items():
        print(f"{name}: {args.clips / t:.1f} clips/s")
    print(f"all six dimensions in one process: {args.clips / total:.1f} clips/s; decoding share {decode_s / total:.0%}")


if __name__ == "__main__":
    main()
