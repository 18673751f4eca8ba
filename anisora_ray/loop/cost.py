"""What an alignment round costs on a cluster: a model of its wall time by stage, GPU-hours and idle GPU
time, and the split of GPUs between generation, reward and training that makes a round fastest.

No Ray, no models: numbers in, numbers out (``benchmarks/round_cost.py`` prints them and checks them
against a simulated round on a ``ray.cluster_utils.Cluster``). The defaults are the measured figures of
docs/performance.md: CogVideoX-5B I2V at 49×480×720, 50 steps (94.5 s a video eager, 72.5 s compiled,
one H100), a LoRA GAPO pair update 8.87 s, and the learned reward's clips/s per H100 (the character
dimension, GroundingDINO + SAM + CLIP, dominates at ~0.5 clip/s).

A round streams generation into scoring (the pairs phase lasts as long as its slower side, plus the
time the first video and its scores take), then trains on one pair per prompt, refreshes the replicas
and evaluates on held-out prompts. ``overlap=True`` (``loop.overlap: one_round_off_policy``) trains
round r while round r + 1 generates, so the steady-state round lasts the longer of the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

REWARD_CLIPS_PER_SECOND = {  # one H100, bf16 (docs/performance.md, learned backends)
    "visual_smoothness": 294.0, "visual_motion": 554.0, "visual_appeal": 593.0,
    "text_video": 333.0, "image_video": 414.0, "character": 0.5,
}


@dataclass(frozen=True)
class RoundCosts:
    """Per-item costs of a round (seconds on one GPU) and its size."""

    prompts: int = 2000
    candidates: int = 4
    video_seconds: float = 94.5  # one video, one GPU (72.5 with generator.compile)
    videos_per_call: int = 4  # one prompt's candidates per generator call
    reward_clips_per_second: dict[str, float] = field(default_factory=lambda: dict(REWARD_CLIPS_PER_SECOND))
    reward_batch: int = 16  # clips per reward call
    pair_step_seconds: float = 8.87  # one GAPO update of one pair per GPU
    pairs_per_step: int = 1
    refresh_seconds: float = 2.0  # weights to every replica (LoRA: 0.13 GB)
    eval_prompts: int = 0  # held-out prompts generated and scored every round
    eval_candidates: int = 1
    # a fixed cost per round, not per item: starting the round's streaming dataset (measured on 2 cores: the
    # first pair after ~1.9 s where its own work is ~0.7 s; benchmarks/pairs_pipeline.py, rounds 2+)
    stream_start_seconds: float = 1.2
    startup_seconds: float = 60.0  # shared placement: replicas load again every round (5B load ~18-40 s + compile 21 s)


@dataclass(frozen=True)
class ClusterShape:
    """GPUs per role; ``shared``: the trainer uses every GPU while the replicas and reward actors are stopped."""

    generation: int
    reward: dict[str, float]  # per dimension; below 1: a share of one GPU (Ray's fractional num_gpus)
    training: int
    placement: str = "separate"  # or "shared"
    overlap: bool = False

    @property
    def reward_gpus(self) -> int:
        return math.ceil(sum(self.reward.values()) - 1e-9)

    @property
    def total(self) -> int:
        if self.placement == "shared":
            return self.generation + self.reward_gpus
        return self.generation + self.reward_gpus + self.training


@dataclass(frozen=True)
class RoundPrediction:
    stages: dict[str, float]  # seconds: generate, reward (slowest dimension), pairs (streamed), train, refresh, eval
    wall: float  # one round, steady state
    pure_generation: float  # generating the round's candidates alone on the generation GPUs
    gpu_hours: float
    idle_fraction: float  # GPU time reserved but not used

    @property
    def over_generation(self) -> float:
        return self.wall / self.pure_generation


def _calls(videos: int, per_call: int) -> int:
    return math.ceil(videos / per_call)


def generation_seconds(videos: int, gpus: int, c: RoundCosts) -> float:
    """Whole calls of ``videos_per_call`` videos spread over ``gpus`` replicas."""
    return math.ceil(_calls(videos, c.videos_per_call) / gpus) * c.videos_per_call * c.video_seconds


def reward_seconds(clips: int, gpus: dict[str, float], c: RoundCosts) -> dict[str, float]:
    """Each dimension's time over ``clips``: whole batches per actor (one per GPU), or a share of one GPU."""
    batches = math.ceil(clips / c.reward_batch)
    out = {}
    for d, rate in c.reward_clips_per_second.items():
        g = gpus.get(d, 1.0)
        out[d] = math.ceil(batches / max(1, math.floor(g))) * c.reward_batch / (rate * min(g, 1.0))
    return out


def predict(c: RoundCosts, shape: ClusterShape) -> RoundPrediction:
    videos = c.prompts * c.candidates
    gen = generation_seconds(videos, shape.generation, c)
    rewards = reward_seconds(videos, shape.reward, c)
    reward = max(rewards.values())
    first = c.videos_per_call * c.video_seconds + max(c.reward_batch / r for r in c.reward_clips_per_second.values())
    pairs = max(gen, reward) + min(first, gen) + c.stream_start_seconds  # the slower side, plus filling the pipeline
    trainers = shape.total if shape.placement == "shared" else shape.training
    train = math.ceil(c.prompts / (trainers * c.pairs_per_step)) * c.pair_step_seconds
    eval_videos = c.eval_prompts * c.eval_candidates
    evaluation = (generation_seconds(eval_videos, shape.generation, c) + max(reward_seconds(eval_videos, shape.reward, c).values())
                  if eval_videos else 0.0)
    startup = c.startup_seconds if shape.placement == "shared" else 0.0
    if shape.overlap:  # round r + 1's pairs while round r trains and refreshes
        wall = max(pairs, train + c.refresh_seconds) + evaluation + startup
    else:
        wall = pairs + train + c.refresh_seconds + evaluation + startup
    busy = (videos + eval_videos) * c.video_seconds + sum(
        (videos + eval_videos) / rate for rate in c.reward_clips_per_second.values()) + train * trainers
    reserved = shape.total * wall
    stages = {"generate": gen, "reward": reward, "pairs": pairs, "train": train, "refresh": c.refresh_seconds,
              "eval": evaluation, "startup": startup}
    return RoundPrediction(stages, wall, gen, reserved / 3600, max(0.0, 1 - busy / reserved))


def split_reward(gpus: int, clips: int, c: RoundCosts) -> dict[str, float]:
    """``gpus`` for the reward: one shared by every dimension, then whole GPUs one at a time to the slowest."""
    out = dict.fromkeys(c.reward_clips_per_second, 1.0 / len(c.reward_clips_per_second))
    for _ in range(gpus - 1):
        times = reward_seconds(clips, out, c)
        slowest = max(times, key=times.get)
        out[slowest] = math.floor(out[slowest]) + 1.0
    return out


def best_split(total: int, c: RoundCosts, placement: str = "separate", overlap: bool = False) -> tuple[ClusterShape, RoundPrediction]:
    """The split of ``total`` GPUs that gives the shortest round (ties: fewer GPU-hours)."""
    videos = c.prompts * c.candidates
    best = None
    for reward in range(1, total):
        for training in ([0] if placement == "shared" else range(1, total - reward)):
            generation = total - reward - training
            if generation < 1:
                continue
            shape = ClusterShape(generation, split_reward(reward, videos, c), max(training, 1) if placement != "shared" else 0,
                                 placement, overlap)
            if placement == "shared":
                shape = replace(shape, training=0)
            p = predict(c, shape)
            if best is None or (p.wall, p.gpu_hours) < (best[1].wall, best[1].gpu_hours):
                best = (shape, p)
    if best is None:
        raise ValueError(f"{total} GPU(s) cannot hold the reward, a generator and a trainer")
    return best
