"""The streaming pairs pipeline against its stages run one after another, and against its slowest stage.

    python benchmarks/pairs_pipeline.py [--mode real|fixed|both] [--prompts 64] [--k 4] [--rounds 3] [--reward-stage actors|pipeline]

Same run, same machine. Each round is a new dataset on the same persistent workers (as ``align`` runs
rounds): the ratio of rounds 2+ is the one without start-up. Stages: generation on the persistent replicas, decode, and one stage per
reward dimension; each "alone" time is that stage over the whole round with its inputs ready
(generation writes the videos; decode runs over the candidates; each dimension over clips decoded
and materialized beforehand). Streaming = prompts → pairs written, generation included.

- real: the tiny generator and the classical reward backends (all CPU-bound: on 2 cores they compete).
- fixed: each stage holds its actor for a fixed time per batch without using the CPU (generation
  by stand-in replica actors that copy pre-made videos; rewards by the ``sleep`` backend), so the
  pipeline's own overhead is what is measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace
from types import SimpleNamespace

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from anisora_ray.config import load_config  # noqa: E402
from anisora_ray.data.demo import make_demo_set  # noqa: E402
from anisora_ray.data.manifest import read_manifest  # noqa: E402
from anisora_ray.generation.replicas import GeneratorReplicas  # noqa: E402
from anisora_ray.generation.stage import build_requests  # noqa: E402
from anisora_ray.models.pipeline import resolve_pretrained  # noqa: E402
from anisora_ray.pairs.pipeline import ScoreDimension, candidates_dataset, decode_clips, stream_pairs  # noqa: E402
from anisora_ray.reward.actors import RewardActors  # noqa: E402
from anisora_ray.reward.aggregate import active_dimensions  # noqa: E402
from anisora_ray.reward.base import ClipBatch  # noqa: E402
from anisora_ray.runtime import LeastLoaded, init_ray  # noqa: E402
from anisora_ray.types import DIMENSIONS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@ray.remote(num_cpus=0.1)
class FixedTimeReplica:
    """Stands in for a GPU generator replica: waits a fixed time per call, hands back pre-made videos."""

    def __init__(self, made: dict, seconds_per_call: float):
        self.made, self.seconds = made, seconds_per_call  # (prompt id, candidate index) -> candidate

    def generate(self, requests, out_dir):
        time.sleep(self.seconds)
        out = []
        for r in requests:
            for index, seed in enumerate(r.seeds):  # any round's seeds: the pre-made video of that candidate index
                c = self.made[(r.item.prompt_id, index)]
                uri = os.path.join(out_dir, "videos", c.prompt_id, f"{seed}.mp4")
                os.makedirs(os.path.dirname(uri), exist_ok=True)
                shutil.copyfile(c.video_uri, uri)
                out.append(replace(c, video_uri=uri, seed=seed))
        return out, []


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(mode: str, args, tmp: str) -> None:
    overrides = [f"run.output_dir={tmp}/{mode}", f"generator.candidates_per_prompt={args.k}",
                 f"generator.replicas={args.replicas}", "pairs.flush_every=8", f"reward.batch_size={args.batch}",
                 f"pairs.decode_batch_size={args.batch}"]
    overrides.append(f"pairs.reward_stage={args.reward_stage}")
    if mode == "fixed":
        for name in DIMENSIONS:
            overrides += [f"reward.dimensions.{name}.backend=sleep",
                          f"reward.dimensions.{name}.options={{seconds_per_batch: {args.dim_seconds}}}",
                          f"reward.dimensions.{name}.actor.num_cpus=0.25"]
    cfg = load_config(os.path.join(REPO, "configs", "local.yaml"), overrides)
    init_ray(cfg.ray)
    items = read_manifest(make_demo_set(f"{tmp}/demo", num_prompts=args.prompts, image_size=64, seed=0))
    real = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    requests = build_requests(items, cfg)
    real.generate(requests[:1], f"{tmp}/{mode}/warmup")  # model warm-up
    t_gen, (candidates, _) = timed(lambda: real.generate(requests, f"{tmp}/{mode}/alone"))
    replicas = real
    if mode == "fixed":
        made = {(c.prompt_id, c.candidate_index): c for c in candidates}
        replicas = SimpleNamespace(actors=[FixedTimeReplica.remote(made, args.gen_seconds) for _ in range(args.replicas)],
                                   router=LeastLoaded.remote(args.replicas))
        calls = -(-len(requests) // cfg.generator.prompts_per_call)
        t_gen = calls * args.gen_seconds / args.replicas  # what the stand-ins take alone, by construction
    stages = {"generate": t_gen}
    p = cfg.pairs
    decode = lambda ds: ds.map_batches(decode_clips, batch_format="numpy", batch_size=p.decode_batch_size,  # noqa: E731
                                       fn_kwargs={"video": cfg.video.model_dump()}, num_cpus=p.decode_cpus,
                                       compute=ray.data.TaskPoolStrategy(size=p.decode_concurrency))
    stages["decode"], decoded = timed(lambda: decode(candidates_dataset(candidates)).materialize())
    dims = cfg.reward.dimensions.as_dict()
    reward_actors = RewardActors(cfg.reward) if args.reward_stage == "actors" else None
    if reward_actors is not None:  # persistent, started before the clock like the generator replicas
        rows = list(decoded.iter_rows())
        batches = [ray.put(ClipBatch([r["frames"] for r in rows[i: i + args.batch]], [r["prompt"] for r in rows[i: i + args.batch]],
                                     [r["image"][0] for r in rows[i: i + args.batch]], [None] * len(rows[i: i + args.batch])))
                   for i in range(0, len(rows), args.batch)]
        for name, pool in reward_actors.pools.items():
            stages[name], _ = timed(lambda: ray.get([pool[0].score.remote(b) for b in batches]))
    for name in active_dimensions(dims) if reward_actors is None else []:
        d = dims[name]
        stages[name], _ = timed(lambda: decoded.map_batches(
            ScoreDimension, batch_format="numpy", batch_size=cfg.reward.batch_size,
            compute=ray.data.ActorPoolStrategy(size=d.replicas),
            fn_constructor_kwargs={"name": name, "dimension": d.model_dump()}, num_cpus=d.actor.num_cpus).materialize())
    total, slowest = sum(stages.values()), max(stages, key=stages.get)
    print(f"\n[{mode}, rewards in {args.reward_stage}] {args.prompts} prompts x {args.k} candidates, "
          f"{args.replicas} replicas, batch {args.batch}; {args.rounds} round(s) on the same workers")
    for name, seconds in stages.items():
        print(f"  {name:18s} alone {seconds:7.2f} s")
    print(f"  sum of stages      {total:7.2f} s")
    for round_index in range(1, args.rounds + 1):  # a new dataset per round, as align runs them
        done: list[float] = []
        start = time.perf_counter()
        t_stream, result = timed(lambda: stream_pairs(cfg, items, replicas, f"{tmp}/{mode}/pairs-{round_index}",  # noqa: B023
                                                      round_index=round_index, progress=False,
                                                      on_prompt=lambda _: done.append(time.perf_counter() - start),  # noqa: B023
                                                      reward_actors=reward_actors))
        # Steady state: the rate between the first and the last pair, over the whole round (start-up excluded).
        steady = (done[-1] - done[0]) * len(done) / max(1, len(done) - 1)
        print(f"  round {round_index}: {result.pairs} pairs; streaming {t_stream:6.2f} s (first pair after {done[0]:.2f} s; "
              f"steady {steady:.2f} s); streaming / slowest stage ({slowest}) = {t_stream / stages[slowest]:.2f}x   "
              f"streaming / sum = {t_stream / total:.2f}x   steady / slowest = {steady / stages[slowest]:.2f}x")
    real.shutdown()
    if reward_actors is not None:
        reward_actors.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="both", choices=["real", "fixed", "both"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds streamed one after another on the same workers")
    parser.add_argument("--reward-stage", default="actors", choices=["pipeline", "actors"],
                        help="reward dimensions as Ray Data pools per run, or persistent actors started beforehand")
    parser.add_argument("--gen-seconds", type=float, default=0.4, help="fixed mode: per generation call (one prompt)")
    parser.add_argument("--dim-seconds", type=float, default=0.3, help="fixed mode: per reward batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anisora-bench-") as tmp:
        for mode in (["real", "fixed"] if args.mode == "both" else [args.mode]):
            run(mode, args, tmp)


if __name__ == "__main__":
    main()
