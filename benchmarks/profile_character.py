"""Where the character dimension's time goes: detection, segmentation, embedding (one batch).

    python benchmarks/profile_character.py [--size random-base] [--clips 16] [--frames 8] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from anisora_ray.reward import build_dimension


def timed(label: str, fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"{label:22s} {time.perf_counter() - start:8.3f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny", choices=["tiny", "random-base"])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--detector-size", type=int)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "anisora-bench-backbones"))
    args = parser.parse_args()
    dim = build_dimension("character", "grounded", detector=f"{args.size}:grounding-dino", segmenter=f"{args.size}:sam",
                          embedder=f"{args.size}:clip", cache_dir=args.cache, dtype=args.dtype,
                          box_threshold=0.0, text_threshold=0.0, detector_size=args.detector_size)
    det = dim.detect
    frames = np.random.default_rng(0).integers(0, 255, (args.clips * args.frames, args.res, args.res, 3), dtype=np.uint8)
    det.boxes(frames[: det.model_batch])  # warm-up
    inputs = timed("detector preprocess", lambda: det.det_processor(images=list(frames), text=[det.query] * len(frames),
                                                                     return_tensors="pt", **det.detector_kwargs))
    boxes = timed("detect (all)", lambda: det.boxes(frames))
    found = [b for b in boxes if b is not None]
    timed("sam preprocess", lambda: det.seg_processor(images=list(frames[: len(found)]), input_boxes=[[b] for b in found],
                                                       return_tensors="pt"))
    timed("segment (all)", lambda: det.masks(frames[: len(found)], found))
    crops = timed("crops (detect+segment)", lambda: dim.crops(frames))
    timed("embed crops", lambda: dim.embedder.image_features(np.stack(crops)))
    print(f"{len(frames)} frames of {args.res}^2, {len(found)} with a box; detector input {tuple(inputs['pixel_values'].shape)}")


if __name__ == "__main__":
    main()
