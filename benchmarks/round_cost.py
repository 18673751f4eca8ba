"""What a round costs on a GPU cluster (``anisora_ray.loop.cost``), and a simulated round that checks it.

    python benchmarks/round_cost.py [--gpus 8,16,32,64] [--prompts 2000] [--compiled]
    python benchmarks/round_cost.py --simulate --nodes 8 --gpus-per-node 8 [--sim-prompts 512] [--target-s 20]

The model: per-item costs (defaults: the H100 figures of docs/performance.md) and a cluster shape give
the round's wall time by stage, GPU-hours, idle GPU time, and the best split of GPUs between
generation, reward and training, for sequential rounds (separate or shared placement) and for
``loop.overlap: one_round_off_policy``.

The simulation: a ``ray.cluster_utils.Cluster`` of ``--nodes`` nodes with fake GPUs, the best split for
that many GPUs, and every per-item cost divided by one factor (so the pure generation of the round takes
``--target-s`` seconds). Generator replicas are stand-in actors, one per GPU (grouped per node in one process
with one thread per GPU, so 64 fake GPUs fit this machine's memory), that hold their GPU for the
scaled time of each video (and load weights through the replicas' own ``WeightsReceiver``); the six reward
dimensions are the project's ``RewardActors`` with the ``sleep`` backend at their scaled per-batch times
and GPU shares; training is one stand-in actor per training GPU holding it for the scaled time of its
pair updates. The round runs through the project's streaming pairs pipeline (``stream_pairs``: Ray Data,
decode, pairing, writing), its refresh (``stream_update``) and the loop's two schedules: sequential
(pairs, train, refresh) and overlapped (round r + 1's pairs while round r trains and refreshes; its
steady-state round is measured). Printed: measured vs predicted wall time and the ratio to pure generation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from anisora_ray.loop.cost import RoundCosts, best_split, predict  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def video_seconds(args) -> float:
    """Seconds per 49x480x720 video: --video-seconds, else the H100's compiled or eager figure."""
    return args.video_seconds or (72.5 if args.compiled else 94.5)


def model_table(args) -> list[dict]:
    costs = RoundCosts(prompts=args.prompts, video_seconds=video_seconds(args),
                       eval_prompts=args.eval_prompts)
    rows = []
    for total in args.gpus:
        for placement, overlap in (("separate", False), ("shared", False), ("separate", True)):
            shape, p = best_split(total, costs, placement, overlap)
            rows.append({"gpus": total, "schedule": f"{placement}{' + overlap' if overlap else ''}",
                         "generation": shape.generation, "reward": round(sum(shape.reward.values()), 2),
                         "character": shape.reward["character"], "training": shape.training or total,
                         "wall_h": p.wall / 3600, "pure_generation_h": p.pure_generation / 3600,
                         "over_generation": p.over_generation, "gpu_hours": p.gpu_hours, "idle": p.idle_fraction,
                         **{f"{k}_h": v / 3600 for k, v in p.stages.items()}})
    return rows


def print_model(rows: list[dict], args) -> None:
    where = "" if args.video_seconds else " (H100)"
    print(f"one round: {args.prompts} prompts x 4 candidates, {video_seconds(args):g} s per video{where}, LoRA pair "
          f"update 8.87 s, learned reward per docs/performance.md, {args.eval_prompts} held-out prompts")
    print("| GPUs | schedule | generation / reward / training GPUs | generate h | train h | round h | "
          "round / pure generation | GPU-hours | idle |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['gpus']} | {r['schedule']} | {r['generation']} / {r['reward']:.3g} (character {r['character']:.2g}) / "
              f"{r['training']} | {r['generate_h']:.2f} | {r['train_h']:.2f} | {r['wall_h']:.2f} | "
              f"{r['over_generation']:.3f}x | {r['gpu_hours']:.0f} | {r['idle']:.0%} |")


# ---------------------------------------------------------------------------------------------- simulation

def _actors():
    import ray
    import torch

    from anisora_ray.types import Candidate
    from anisora_ray.weights.receiver import WeightsReceiver

    @ray.remote(num_cpus=0)
    class SleepReplica(WeightsReceiver):
        """``gpus`` generator replicas in one process (threads: one call per GPU at a time, each holding it for
        ``seconds`` per video); hands back pre-made videos. One process per group keeps 64 fake GPUs in memory."""

        def __init__(self, templates: list[str], seconds: float, index: int):
            torch.set_num_threads(1)
            self.templates, self.seconds, self.replica_id = templates, seconds, f"sim-{index}"
            self.calls, self.tickets = {}, itertools.count()
            self.module = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(1024))})
            self.gpus = threading.BoundedSemaphore(int(ray.get_runtime_context().get_assigned_resources().get("GPU", 1)))

        def receiving_module(self):
            return self.module

        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def start(self, requests, out_dir, exact=False):  # as a replica's: finish(start(...)), generate_call
            ticket = next(self.tickets)
            self.calls[ticket] = self.generate(requests, out_dir)
            return ticket

        def finish(self, ticket):
            return self.calls.pop(ticket)

        def generate(self, requests, out_dir):
            self.check_complete()
            with self.gpus:  # one of this group's GPUs for the whole call
                time.sleep(self.seconds * sum(len(r.seeds) for r in requests))
            out = []
            for r in requests:
                for index, seed in enumerate(r.seeds):
                    uri = os.path.join(out_dir, "videos", r.item.prompt_id, f"{seed}.mp4")
                    os.makedirs(os.path.dirname(uri), exist_ok=True)
                    shutil.copyfile(self.templates[seed % len(self.templates)], uri)
                    out.append(Candidate(r.item.prompt_id, r.item.prompt, r.item.image_uri, seed, index, uri,
                                         self._weights_version, 9, 32, 32, 8, str(seed % len(self.templates)),
                                         self.replica_id, self.seconds, 0.0, r.item.character_id))
            return out, []

    @ray.remote(num_gpus=1, num_cpus=0)
    class SleepTrainer:
        """One training GPU: holds it for the scaled time of its share of the round's pair updates."""

        def train(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    return SleepReplica, SleepTrainer


def _templates(folder: str, count: int = 8) -> list[str]:
    import numpy as np

    from anisora_ray.io.video import write_video

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):  # distinct clips: the sleep reward scores differ, so prompts pair
        uri = os.path.join(folder, f"template-{i}.mp4")
        write_video(rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8), uri, fps=8, crf=0)
        out.append(uri)
    return out


def simulate(args) -> dict:
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from anisora_ray.config import load_config
    from anisora_ray.data.demo import make_demo_set
    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.pairs.pipeline import stream_pairs
    from anisora_ray.pairs.writer import read_pairs
    from anisora_ray.reward.actors import RewardActors
    from anisora_ray.runtime import LeastLoaded
    from anisora_ray.weights.refresh import stream_update

    total = args.nodes * args.gpus_per_node
    real = RoundCosts(prompts=args.sim_prompts, eval_prompts=0, refresh_seconds=0.0)
    shape, _ = best_split(total, real, "separate", args.split == "overlap")
    shape = replace(shape, overlap=False)  # the sequential schedule's prediction; the overlapped one sets it below
    pure = predict(real, shape).pure_generation
    factor = pure / args.target_s  # every per-item cost divided by it
    costs = replace(real, video_seconds=real.video_seconds / factor, pair_step_seconds=real.pair_step_seconds / factor,
                    reward_clips_per_second={d: r * factor for d, r in real.reward_clips_per_second.items()})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "num_gpus": args.gpus_per_node,
                                                            "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=args.cpus_per_node, num_gpus=args.gpus_per_node)  # idle workers kept <= CPUs
    cluster.wait_for_nodes()
    tmp = tempfile.mkdtemp(prefix="anisora-round-sim-")
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        overrides = [f"run.output_dir={tmp}/out", f"ray.address={cluster.address}", "generator.candidates_per_prompt=4",
                     "generator.prompts_per_call=1", f"generator.max_calls_in_flight={args.calls_in_flight}",
                     f"generator.calls_per_task={args.calls_per_task}", f"reward.batch_size={costs.reward_batch}",
                     f"pairs.decode_batch_size={costs.reward_batch}", "pairs.decode_concurrency=4", "pairs.decode_cpus=0.5",
                     "pairs.reward_forwarders=16", "video.sample_size=32", "video.sample_frames=9", "pairs.flush_every=64",
                     "pairs.reward_stage=actors"]
        for d, share in shape.reward.items():
            replicas, gpus = (int(share), 1.0) if share >= 1 else (1, share)
            seconds = costs.reward_batch / costs.reward_clips_per_second[d] * (1.0 if share >= 1 else 1.0 / share)
            overrides += [f"reward.dimensions.{d}.backend=sleep", f"reward.dimensions.{d}.options={{seconds_per_batch: {seconds}}}",
                          f"reward.dimensions.{d}.replicas={replicas}", f"reward.dimensions.{d}.actor.num_gpus={gpus}",
                          f"reward.dimensions.{d}.actor.num_cpus=0"]
        cfg = load_config(os.path.join(REPO, "configs", "local.yaml"), overrides)
        items = read_manifest(make_demo_set(f"{tmp}/demo", num_prompts=args.sim_prompts, image_size=32, seed=0))
        SleepReplica, SleepTrainer = _actors()
        templates = _templates(tmp)
        print(f"simulated cluster: {args.nodes} nodes x {args.gpus_per_node} GPUs; split: generation {shape.generation}, "
              f"reward {shape.reward}, training {shape.training}; costs / {factor:.0f}", flush=True)
        per = math.ceil(shape.generation / args.nodes)  # replicas per process: one process per node's share
        sizes = [min(per, shape.generation - i) for i in range(0, shape.generation, per)]
        replicas = [SleepReplica.options(num_gpus=n, max_concurrency=4 * n).remote(templates, costs.video_seconds, i)
                    for i, n in enumerate(sizes)]

        nodes = ray.get([r.node.remote() for r in replicas])
        group = type("Replicas", (), {"actors": [a for a, n in zip(replicas, sizes, strict=True) for _ in range(n)],
                                      "router": LeastLoaded.remote(shape.generation)})()  # one entry per GPU
        rewards = RewardActors(cfg.reward)
        trainers = [SleepTrainer.remote() for _ in range(shape.training)]
        ray.get([t.train.remote(0) for t in trainers])
        steps = math.ceil(args.sim_prompts / shape.training)
        version = [0]

        def pairs(index: int) -> float:
            began = time.perf_counter()
            stream_pairs(cfg, items, group, f"{tmp}/round-{index}/pairs", round_index=index, progress=False,
                         reward_actors=rewards)
            return time.perf_counter() - began

        def train_and_refresh() -> float:
            began = time.perf_counter()
            ray.get([t.train.remote(steps * costs.pair_step_seconds) for t in trainers])
            version[0] += 1
            stream_update(replicas, [[("w", torch.full((1024,), float(version[0])))]], version[0], "full", nodes=nodes)
            return time.perf_counter() - began

        began = time.perf_counter()  # pure generation: every call straight to the replicas, two in flight each
        calls = [group.actors[i % len(group.actors)] for i in range(args.sim_prompts)]
        from anisora_ray.generation.seeding import build_requests

        requests = build_requests(items, cfg, 999)
        ray.get([a.generate.remote([r], f"{tmp}/pure") for a, r in zip(calls, requests, strict=True)])
        measured_pure = time.perf_counter() - began

        pairs(1)  # warm-up round: workers start, pages map
        train_and_refresh()
        sequential_pairs = pairs(2)
        sequential = sequential_pairs + train_and_refresh()
        pairs(3)  # the overlapped schedule: round 4's pairs while round 3 trains
        holder: dict = {}
        worker = threading.Thread(target=lambda: holder.update(seconds=pairs(4)))
        began = time.perf_counter()
        worker.start()
        train_part = train_and_refresh()
        worker.join()
        overlapped = time.perf_counter() - began
        versions = sorted({p.weights_version for p in read_pairs(f"{tmp}/round-4/pairs")})
        result = {"nodes": args.nodes, "gpus": total, "factor": factor, "prompts": args.sim_prompts, "split": args.split,
                  "calls_per_task": args.calls_per_task, "calls_in_flight": args.calls_in_flight, "target_s": args.target_s,
                  "shape": {"generation": shape.generation, "reward": shape.reward, "training": shape.training},
                  "predicted_pure": predict(costs, shape).pure_generation, "measured_pure": measured_pure,
                  "sequential": {"predicted": predict(costs, shape).wall, "measured": sequential,
                                 "pairs_measured": sequential_pairs},
                  "overlapped": {"predicted": predict(costs, replace(shape, overlap=True)).wall, "measured": overlapped,
                                 "train_refresh_measured": train_part, "pairs_measured": holder.get("seconds"),
                                 "pair_versions": versions},
                  "pairs_per_round": len(read_pairs(f"{tmp}/round-2/pairs"))}
        for key in ("sequential", "overlapped"):
            r = result[key]
            r["measured_over_predicted"] = r["measured"] / r["predicted"]
            r["over_pure_generation"] = r["measured"] / result["measured_pure"]
        rewards.shutdown()
        return result
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--eval-prompts", type=int, default=0)
    parser.add_argument("--compiled", action="store_true", help="72.5 s per video (generator.compile) instead of 94.5")
    parser.add_argument("--video-seconds", type=float, help="seconds per video measured elsewhere, e.g. 44.3: the real "
                        "config (compile + FasterCache) on an H200, docs/performance.md")
    parser.add_argument("--simulate", action="store_true")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--sim-prompts", type=int, default=512)
    parser.add_argument("--target-s", type=float, default=20.0, help="the simulated round's pure generation time")
    parser.add_argument("--calls-in-flight", type=int, default=1,
                        help="generator.max_calls_in_flight: each in-flight call holds one pooled worker on the head")
    parser.add_argument("--cpus-per-node", type=int, default=8, help="logical CPUs of each simulated non-head node")
    parser.add_argument("--calls-per-task", type=int, default=1,
                        help="generation calls one forwarding task keeps in flight (generator.calls_per_task)")
    parser.add_argument("--split", choices=("sequential", "overlap"), default="sequential",
                        help="simulate the best split for sequential rounds or for overlapped ones")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    out: dict = {"model": model_table(args)}
    print_model(out["model"], args)
    if args.simulate:
        sim = out["simulation"] = simulate(args)
        print(f"\nsimulated round, {sim['gpus']} fake GPUs ({sim['nodes']} nodes), {sim['prompts']} prompts x 4, costs / "
              f"{sim['factor']:.0f}; pure generation {sim['measured_pure']:.2f} s (predicted {sim['predicted_pure']:.2f} s)")
        for key in ("sequential", "overlapped"):
            r = sim[key]
            print(f"  {key:10s}: measured {r['measured']:.2f} s, predicted {r['predicted']:.2f} s "
                  f"(measured / predicted {r['measured_over_predicted']:.3f}); round / pure generation "
                  f"{r['over_pure_generation']:.3f}x")
        print(f"  overlapped round's pairs were generated by weights versions {sim['overlapped']['pair_versions']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
