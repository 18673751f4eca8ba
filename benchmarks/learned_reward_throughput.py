"""Per-dimension scoring throughput (clips/s) of the learned backends, on whatever device is there.

    python benchmarks/learned_reward_throughput.py [--size tiny|random-base] [--clips 32] [--batch 8]
                                                    [--dtype float32|bfloat16] [--device auto]
    python benchmarks/learned_reward_throughput.py --family released [--size tiny|released]

``--family released`` times the released AnimeReward scorers, converted from a synthetic released
tree (``reward.released.synthetic``) with random weights: ``tiny``, or ``released`` for the BLIP /
CLIP scorers at their released sizes (ViT-B/16 + BERT-base, CLIP ViT-B/16 + adapter, ViT-L/16); the
two Mantis-Idefics2-8B regressors are tiny in both (8B random weights are a GPU machine's job).

``random-base`` builds the released base architectures with random weights (CLIP ViT-B/32, SigLIP
B/16, X-CLIP B/32, GroundingDINO Swin-T, SAM ViT-B): the speed of the real checkpoints of those
sizes, where they cannot be downloaded. Clips are 24 frames at 224², as decoded for scoring.
Heads of appeal and smoothness are random (speed only).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from anisora_ray.reward import DIMENSIONS, ClipBatch, build_dimension
from anisora_ray.reward.encoders import RegressionHead
from anisora_ray.reward.learned import token_dim

BACKENDS = {
    "visual_smoothness": ("learned", {"backbone": "clip"}),
    "visual_motion": ("xclip", {"backbone": "xclip"}),
    "visual_appeal": ("siglip", {"backbone": "siglip"}),
    "text_video": ("clip", {"backbone": "clip"}),
    "image_video": ("clip", {"backbone": "clip"}),
    "character": ("grounded", {"detector": "grounding-dino", "segmenter": "sam", "embedder": "clip",
                               "box_threshold": 0.0, "text_threshold": 0.0}),
}


def options_for(name: str, size: str, cache: str, device: str, dtype: str) -> tuple[str, dict]:
    backend, spec = BACKENDS[name]
    opts = {k: f"{size}:{v}" if k in ("backbone", "detector", "segmenter", "embedder") else v for k, v in spec.items()}
    opts.update(cache_dir=cache, device=device, dtype=dtype)
    if name in ("visual_smoothness", "visual_appeal"):
        probe = build_dimension(name, backend, training=True, **opts)
        opts["head"] = RegressionHead(token_dim(probe), hidden=256).save(os.path.join(cache, f"head-{name}"))
    return backend, opts


def released_folders(args) -> dict[str, str]:
    """The released scorers converted from a synthetic released tree of ``args.size`` (built once, cached)."""
    from anisora_ray.reward.released.convert import convert_all
    from anisora_ray.reward.released.synthetic import write_released_tree

    root = os.path.join(args.cache, f"released-{args.size}")
    listing = os.path.join(root, "folders.json")
    if not os.path.isfile(listing):
        write_released_tree(os.path.join(root, "reward"), size="tiny" if args.size == "tiny" else "released")
        folders = convert_all(os.path.join(root, "reward"), os.path.join(root, "out"),
                              clip_tokenizer=os.path.join(root, "reward", "clip-tokenizer"))
        with open(listing, "w") as f:
            json.dump(folders, f)
    with open(listing) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="learned", choices=["learned", "released"])
    parser.add_argument("--size", default="tiny", choices=["tiny", "random-base", "released"])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "anisora-bench-backbones"))
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--detector-size", type=int, help="character: GroundingDINO input size (default: its 800)")
    parser.add_argument("--dimensions", nargs="+", default=list(DIMENSIONS), choices=DIMENSIONS)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (args.frames, args.res, args.res, 3), dtype=np.uint8) for _ in range(args.clips)]
    batches = [ClipBatch(clips[i : i + args.batch], ["a girl with pink hair waves"] * len(clips[i : i + args.batch]),
                         [c[0] for c in clips[i : i + args.batch]], [None] * len(clips[i : i + args.batch]))
               for i in range(0, len(clips), args.batch)]
    results = {}
    released = released_folders(args) if args.family == "released" else {}
    for name in args.dimensions:
        if released:
            backend, opts = "released", {"checkpoint": released[name], "device": args.device, "dtype": args.dtype}
            if name == "character":
                opts |= {"detector": "tiny:grounding-dino" if args.size == "tiny" else "random-base:grounding-dino",
                         "segmenter": "tiny:sam" if args.size == "tiny" else "random-base:sam",
                         "cache_dir": args.cache, "box_threshold": 0.0, "text_threshold": 0.0}
        else:
            backend, opts = options_for(name, args.size, args.cache, args.device, args.dtype)
        if name == "character" and args.detector_size:
            opts["detector_size"] = args.detector_size
        dim = build_dimension(name, backend, **opts)
        dim.score(batches[0])  # warm-up (kernels, allocator)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for b in batches:
            out = dim.score(b)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert np.isfinite(out).all() or name == "character", f"{name}: non-finite scores"
        results[name] = args.clips / seconds
        print(f"{name:18s} {backend:9s} {results[name]:9.1f} clips/s", flush=True)
        del dim
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    slowest = min(results, key=results.get)
    print(f"device={device} family={args.family} size={args.size} dtype={args.dtype} batch={args.batch} clips={args.clips} "
          f"frames={args.frames}x{args.res}^2; bottleneck {slowest} at {results[slowest]:.1f} clips/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "args": vars(args), "clips_per_s": results}, f, indent=2)


if __name__ == "__main__":
    main()
