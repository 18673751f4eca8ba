"""Chaos: a round of pairs survives SIGKILLed generator replicas and reward actors (real Ray, tiny models).

Each case runs the same prompts and seeds as an undisturbed round, kills a process once the round is
under way, and asserts: one pair per prompt, no prompt twice, nothing skipped for an infrastructure
reason, and the same winners and losers (prompt id, seeds and the hash of the generated frames). Clips
are 128 px: x264 output is not bit-stable below that, and scores come from the decoded mp4s. Each case
prints ``case: lost=.. duplicated=.. retried=.. seconds=..`` (docs/reliability.md collects them).
"""

from __future__ import annotations

import os
import signal
import threading
import time

from tests.chaos.conftest import PROMPTS, outcome, videos


def _kill_when(out_uri: str, pid_of, killed: list, after_videos: int = 4, timeout_s: float = 300,
               sig: int = signal.SIGKILL) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if videos(out_uri) >= after_videos:
            pid = pid_of()
            os.kill(pid, sig)
            killed.append(pid)
            return
        time.sleep(0.05)


def placement_once_back(actor) -> dict:
    """The replica's placement once Ray has restarted it: a failed call goes to another replica, so the round can
    finish while the killed one is still coming back."""
    from anisora_ray.runtime import call_with_retries

    return call_with_retries(lambda: actor.placement.remote(), what="the restarted replica", retries=0)[0]


def _run_disturbed(chaos, name: str, pid_of, *overrides, replicas=None, reward_actors=None, sig=signal.SIGKILL):
    from anisora_ray.pairs.stage import run_pairs
    from anisora_ray.pairs.writer import read_skipped

    cfg = chaos["make"](*overrides)
    out = str(chaos["root"] / name)
    killed: list = []
    killer = threading.Thread(target=_kill_when, args=(out, pid_of, killed), kwargs={"sig": sig}, daemon=True)
    began = time.perf_counter()
    killer.start()
    result = run_pairs(cfg, chaos["manifest"], out, replicas=replicas, reward_actors=reward_actors, progress=False)
    seconds = time.perf_counter() - began
    killer.join(timeout=5)
    assert killed, f"{name}: nothing was killed"
    got, expected = outcome(out), chaos["expected"]
    lost = len(set(expected) - set(got))
    duplicated = result.pairs - len(got)
    print(f"\n{name}: lost={lost} duplicated={duplicated} retried={result.retried_candidates} seconds={seconds:.1f}")
    assert read_skipped(out) == [] and result.pairs == PROMPTS
    assert got == expected  # same winners and losers, same frames
    return result


def test_sigkill_a_generator_replica_mid_round(chaos):
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.models.pipeline import resolve_pretrained

    cfg = chaos["make"]()
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        before = replicas.placements()[0]["pid"]
        result = _run_disturbed(chaos, "generator-replica", lambda: before, replicas=replicas)
        assert result.retried_candidates > 0  # the dead replica's call was sent again
        after = placement_once_back(replicas.actors[0])["pid"]
        assert after != before and replicas.weights_versions() == [0, 0]  # restarted, same weights
    finally:
        replicas.shutdown()


def test_a_hung_generator_replica_is_killed_after_its_call_timeout_and_replaced(chaos):
    """SIGSTOP freezes the replica mid-call (as a wedged CUDA kernel or a deadlock would): no error
    comes back, only the timeout notices. The replica is killed, Ray restarts it, the call is sent again."""
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.models.pipeline import resolve_pretrained

    # a tiny call takes ~1 s here, several on a loaded machine (8 s killed healthy calls there); real: 30 min
    timeout = "generator.call_timeout_s=15"
    cfg = chaos["make"](timeout)
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:

        before = replicas.placements()[0]["pid"]
        result = _run_disturbed(chaos, "hung-generator-replica", lambda: before, timeout, replicas=replicas,
                                sig=signal.SIGSTOP)
        assert result.retried_candidates > 0
        assert placement_once_back(replicas.actors[0])["pid"] != before  # killed and restarted
    finally:
        replicas.shutdown()


def test_a_replica_hung_in_a_drivers_call_is_killed_after_its_call_timeout_and_the_call_finishes_elsewhere(chaos):
    """The driver's own calls (held-out evaluation, calibration, cache audits, ``generate``) hold the same timeout
    as the pairs stage: a frozen replica once stalled them for good."""
    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.generation.seeding import build_requests
    from anisora_ray.models.pipeline import resolve_pretrained

    cfg = chaos["make"]("generator.call_timeout_s=15")
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        requests = build_requests(read_manifest(chaos["manifest"]), cfg)
        frozen = replicas.placements()[0]["pid"]
        os.kill(frozen, signal.SIGSTOP)
        began = time.perf_counter()
        candidates, quarantined = replicas.generate(requests, str(chaos["root"] / "hung-in-generate"))
        print(f"\nhung replica in generate: {len(candidates)} videos in {time.perf_counter() - began:.1f} s")
        assert len(candidates) == sum(len(r.seeds) for r in requests) and not quarantined
        assert placement_once_back(replicas.actors[0])["pid"] != frozen  # killed and restarted
    finally:
        replicas.shutdown()


def test_sigkill_a_persistent_reward_actor_mid_round(chaos):
    from anisora_ray.reward.actors import RewardActors

    cfg = chaos["make"]("pairs.reward_stage=actors")
    rewards = RewardActors(cfg.reward)
    try:
        import ray

        index = next(i for i, p in enumerate(rewards.placements()) if p["dimension"] == "visual_motion")
        motion = rewards.placements()[index]["pid"]
        _run_disturbed(chaos, "reward-actor", lambda: motion, "pairs.reward_stage=actors", reward_actors=rewards)
        actor = rewards.pools["visual_motion"][0]
        assert ray.get(actor.placement.remote())["pid"] != motion  # Ray restarted it (reward.max_restarts)
    finally:
        rewards.shutdown()


def test_sigkill_a_ray_data_reward_worker_mid_round(chaos):
    from ray._private.state import actors  # the GCS actor table (the state API needs a dashboard)

    def scorer_pid() -> int:  # the pool may still be starting when the first videos are written
        deadline = time.time() + 120
        while time.time() < deadline:
            alive = [a for a in actors().values() if "ScoreDimension" in a["ActorClassName"] and a["State"] == "ALIVE"]
            if alive and alive[0]["Pid"]:
                return alive[0]["Pid"]
            time.sleep(0.05)
        raise TimeoutError("no ScoreDimension actor came up")

    _run_disturbed(chaos, "ray-data-reward-worker", scorer_pid, "pairs.reward_stage=pipeline")


def test_a_call_to_a_restarting_replica_waits_for_it_without_spending_a_retry(chaos):
    """Generation outside the pairs pipeline (held-out evaluation, `generate`): a replica killed mid-call comes back
    through Ray's restart; with no retries allowed the call still succeeds, because waiting for a restarting actor
    is not a failure (the soak found this path counting it as one)."""
    import ray

    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.generation.seeding import build_requests
    from anisora_ray.models.pipeline import resolve_pretrained

    cfg = chaos["make"]("generator.call_retries=0", "generator.replicas=1")
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    out = str(chaos["root"] / "restarting")
    try:
        before = replicas.placements()[0]["pid"]
        killed: list = []
        killer = threading.Thread(target=_kill_when, args=(out, lambda: before, killed), kwargs={"after_videos": 1},
                                  daemon=True)
        killer.start()
        requests = build_requests(read_manifest(chaos["manifest"]), cfg)
        candidates, quarantined = replicas.generate(requests, out)
        killer.join(timeout=5)
        assert killed == [before] and not quarantined
        assert len(candidates) == PROMPTS * cfg.generator.candidates_per_prompt
        assert ray.get(replicas.actors[0].placement.remote())["pid"] != before
    finally:
        replicas.shutdown()
