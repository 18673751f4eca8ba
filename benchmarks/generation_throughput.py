"""Generation throughput (videos/s) with 1 vs 2 generator replicas on the tiny model.

    python benchmarks/generation_throughput.py [--prompts 32] [--set KEY=VALUE ...]

Each replica is a Ray actor with one torch thread (generator.actor.num_cpus=1). Prints the
machine, each run's videos/s and the 2-vs-1 ratio; record the numbers in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from anisora_ray.config import load_config
from anisora_ray.data.demo import make_demo_set
from anisora_ray.data.manifest import read_manifest
from anisora_ray.generation.replicas import GeneratorReplicas
from anisora_ray.generation.stage import generate_candidates
from anisora_ray.models.pipeline import resolve_pretrained
from anisora_ray.runtime import init_ray

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "local.yaml")


def measure(cfg, items, out_dir: str) -> float:
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        generate_candidates(cfg, items[:2], os.path.join(out_dir, "warmup"), replicas, progress=False)
        start = time.perf_counter()
        result = generate_candidates(cfg, items, os.path.join(out_dir, "run"), replicas, progress=False)
        elapsed = time.perf_counter() - start
    finally:
        replicas.shutdown()
    return len(result.candidates) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        items = read_manifest(make_demo_set(os.path.join(tmp, "demo"), num_prompts=args.prompts))
        rates = {}
        for n in (1, 2):
            cfg = load_config(CONFIG, [f"generator.replicas={n}", "generator.actor.num_cpus=1", *args.overrides])
            init_ray(cfg.ray)
            rates[n] = measure(cfg, items, os.path.join(tmp, f"r{n}"))
            print(f"replicas={n}: {rates[n]:.2f} videos/s")
    g = cfg.generator
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"tiny model {g.num_frames}x{g.height}x{g.width}, {g.num_inference_steps} steps, "
        f"{args.prompts} prompts x {g.candidates_per_prompt} candidates"
    )
    print(f"ratio 2 replicas / 1 replica: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
