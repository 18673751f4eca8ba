"""What a GAPO fit costs beyond its updates on a small machine, and what ``ray.train_poll_s`` changes.

    python benchmarks/fit_overhead.py [--fits 4] [--steps 4] [--checkpoint-every 1] [--polls 2.0,0.2]

Every ``ray.train.report`` (each checkpoint, and the last report) waits until Ray Train's controller takes it, and
the controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by default; ``ray.train_poll_s``
sets it for a fit). On the embedded default's tiny model a fit is seconds of updates and many seconds of start-up,
so a tiny run pays that wait at every checkpoint. This runs ``train_gapo`` on a local Ray (tiny model, a two-pair
table of random videos) ``--fits`` times per poll setting, interleaved (so drift in the machine's load hits both),
and prints each setting's seconds per fit and the ratio to the first setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def pairs_table(root: str):
    """Two pairs of 9x32x32 random videos over two demo prompts (what the fit reads; their content is irrelevant)."""
    import numpy as np

    from anisora_ray.data.demo import make_demo_set
    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.io.video import write_video
    from anisora_ray.types import PreferencePair

    rng = np.random.default_rng(0)
    for name in ("w", "l"):
        write_video(rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8), os.path.join(root, f"{name}.mp4"), fps=8)
    items = read_manifest(make_demo_set(os.path.join(root, "demo"), num_prompts=2, image_size=64, seed=0))
    return PreferencePair.to_table([PreferencePair(
        prompt_id=it.prompt_id, prompt=it.prompt, image_uri=it.image_uri, winner_video_uri=os.path.join(root, "w.mp4"),
        loser_video_uri=os.path.join(root, "l.mp4"), winner_seed=1, loser_seed=2, winner_reward=0.9, loser_reward=0.1,
        reward_gap=0.8, weights_version=0) for it in items])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=4, help="fits per poll setting (after one warm-up fit)")
    parser.add_argument("--steps", type=int, default=4, help="GAPO updates per fit")
    parser.add_argument("--checkpoint-every", type=int, default=1, help="gapo.checkpoint_every")
    parser.add_argument("--polls", default="2.0,0.2", help="ray.train_poll_s settings, the first is the reference")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test-only Ray (real clusters keep token auth)

    from anisora_ray.config import load_config
    from anisora_ray.gapo.trainer import train_gapo
    from anisora_ray.runtime import init_ray

    root = args.out or tempfile.mkdtemp(prefix="fit-overhead-")
    table = pairs_table(root)
    polls = [float(p) for p in args.polls.split(",")]
    base = [f"run.output_dir={root}/out", f"model.cache_dir={root}/models", "model.tiny.warm_start_steps=0",
            "gapo.pairs_per_step=1", "gapo.num_workers=1", f"gapo.steps={args.steps}",
            f"gapo.checkpoint_every={args.checkpoint_every}"]
    config = os.path.join(REPO, "configs", "local.yaml")
    init_ray(load_config(config, base).ray)
    seconds: dict[float, list[float]] = {p: [] for p in polls}
    for i in range(args.fits + 1):  # the first round warms the model cache and the imports up: not counted
        for p in polls:
            cfg = load_config(config, [*base, f"ray.train_poll_s={p}"])
            began = time.perf_counter()
            train_gapo(cfg, table, os.path.join(root, f"weights-{i}-{p}"), root=REPO, run_name=f"fit-{i}-{p}")
            took = time.perf_counter() - began
            if i:
                seconds[p].append(took)
            print(f"fit {i} poll {p:g} s: {took:.1f} s{'' if i else ' (warm-up, not counted)'}", flush=True)
    ref = statistics.median(seconds[polls[0]])
    rows = [{"train_poll_s": p, "seconds": [round(s, 1) for s in seconds[p]], "median_s": statistics.median(seconds[p]),
             "ratio_to_first": statistics.median(seconds[p]) / ref} for p in polls]
    print(f"\n{args.steps} updates, a checkpoint every {args.checkpoint_every}, {args.fits} fits per setting "
          f"({os.cpu_count()} CPUs, {platform.machine()}):")
    for r in rows:
        print(f"  train_poll_s {r['train_poll_s']:>4g}: median {r['median_s']:.1f} s per fit "
              f"(runs {', '.join(f'{s:.1f}' for s in r['seconds'])}), {r['ratio_to_first']:.2f}x the first setting")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "checkpoint_every": args.checkpoint_every, "cpus": os.cpu_count(),
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
