"""GAPO step time vs a plain Diffusion-DPO step (goal: ≤ 1.05×), and SFT for scale.

    python benchmarks/gapo_step.py [--steps 20] [--pairs 2] [--device cpu|cuda] [--set KEY=VALUE ...]

One process, the tiny CogVideoX I2V transformer of configs/local.yaml (``--set model.tiny.*``
and ``generator.*`` scale it): policy with grad + frozen reference, AdamW. A step is loss,
backward and optimizer step on latents encoded once; the three losses are interleaved step by
step so drift in machine speed hits them alike. Prints median step times and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from anisora_ray.config import load_config
from anisora_ray.gapo.diffusion import PairLatents, gapo_step, sft_step
from anisora_ray.models.families import get_family
from anisora_ray.models.pipeline import resolve_pretrained

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "local.yaml")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, [f"model.cache_dir={tmp}", *args.overrides])
        g = cfg.generator
        family = get_family(cfg.model.family)
        pipe = family.load(resolve_pretrained(cfg.model, g), cfg.model.dtype, args.device, None)
        rng = np.random.default_rng(0)
        videos = rng.integers(0, 255, (2 * args.pairs, g.num_frames, g.height, g.width, 3), dtype=np.uint8)
        latents = torch.stack([family.encode_video(pipe, v) for v in videos])
        conditions = [family.encode_condition(pipe, Image.fromarray(v[0]), i, g.height, g.width, g.num_frames)
                      for i, v in enumerate(videos[: args.pairs])]
        embeds = family.encode_prompt(pipe, "a girl waves", family.text_length(pipe, g))
        batch = PairLatents(
            winner=latents[: args.pairs], loser=latents[args.pairs :],
            condition={k: torch.stack([c[k] for c in conditions]) for k in conditions[0]},
            prompt_embeds=torch.stack([embeds] * args.pairs),
            reward_w=torch.full((args.pairs,), 0.8, device=args.device),
            reward_l=torch.full((args.pairs,), 0.3, device=args.device))
        reference = family.trained_module(pipe).eval().requires_grad_(False)
        times: dict[str, list[float]] = {"gapo": [], "dpo": [], "sft": []}
        models = {}
        for name in times:
            model = copy.deepcopy(reference).requires_grad_(True)
            models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5))
        for step in range(args.steps + 2):  # two warm-up steps
            for name, (model, optimizer) in models.items():
                generator = torch.Generator(device=args.device).manual_seed(step)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                if name == "sft":
                    out = sft_step(family, pipe, model, batch, generator)
                else:
                    out = gapo_step(family, pipe, model, reference, batch, generator, beta=cfg.gapo.beta,
                                    alpha=cfg.gapo.alpha, use_gain=name == "gapo")
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if step >= 2:
                    times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in reference.parameters())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}; "
          f"transformer {params / 1e6:.2f}M params, {args.pairs} pairs of {g.num_frames}x{g.height}x{g.width}")
    for k, v in median.items():
        print(f"{k}: median step {v * 1000:.1f} ms over {args.steps} steps")
    print(f"GAPO / DPO step time: {median['gapo'] / median['dpo']:.3f}x (goal <= 1.05x); "
          f"SFT / DPO: {median['sft'] / median['dpo']:.3f}x")


if __name__ == "__main__":
    main()
