"""What the job asks of the cluster: GPUs and CPUs per worker group, and at peak for the placement mode."""

from __future__ import annotations

import time

from anisora_ray.config import AnisoraConfig
from anisora_ray.config.base import amount, readable
from anisora_ray.errors import ConfigError
from anisora_ray.reward.aggregate import active_dimensions

KEYS = ("GPU", "CPU", "memory")  # memory: host memory Ray reserves (bytes), from <actor>.memory_gib


def resource_demand(cfg: AnisoraConfig) -> dict[str, dict[str, float]]:
    """GPUs, CPUs and reserved host memory of the generator replicas, the reward actors and the trainer, and the peak.

    ``loop.placement: separate`` keeps all three at once (peak = sum); ``shared`` stops the
    generator and reward actors while the trainer runs (peak = max of the phases). The held-out evaluation adds the
    guard's metrics actors (``eval.metrics``) to the replicas and the persistent reward actors.
    """
    g = cfg.generator
    dims = cfg.reward.dimensions.as_dict()

    def times(count: int, actor) -> dict[str, float]:
        request = actor.request()
        return {k: count * request.get(k, 0.0) for k in KEYS}

    generator = times(g.replicas, g.actor)
    reward = dict.fromkeys(KEYS, 0.0)
    for name in active_dimensions(dims):
        pool = times(dims[name].replicas, dims[name].actor)
        reward = {k: v + pool[k] for k, v in reward.items()}
    t = cfg.gapo
    worker = t.worker_request()
    trainer = {k: t.num_workers * worker.get(k, 0.0) for k in KEYS}
    sampling = {k: generator[k] + reward[k] for k in KEYS}
    m = cfg.eval.metrics  # the guard's metrics actors, while the replicas (and persistent reward actors) stay up
    metrics = {"GPU": m.concurrency * m.num_gpus, "CPU": m.concurrency * m.num_cpus, "memory": 0.0} \
        if cfg.loop.guard.enabled else dict.fromkeys(KEYS, 0.0)
    persistent = cfg.pairs.reward_stage == "actors"  # else released before the guard measures (loop.align.Workers)
    evaluation = {k: generator[k] + (reward[k] if persistent else 0.0) + metrics[k] for k in KEYS}
    busiest = {k: max(sampling[k], evaluation[k]) for k in KEYS}
    if cfg.loop.placement == "separate":
        peak = {k: busiest[k] + trainer[k] for k in KEYS}
    else:
        peak = {k: max(busiest[k], trainer[k]) for k in KEYS}
    return {"generator": generator, "reward": reward, "trainer": trainer, "metrics": metrics, "peak": peak}


def single_requests(cfg: AnisoraConfig) -> dict[str, dict[str, float]]:
    """What one actor of each kind asks of a single node (a replica, a reward actor, a training worker)."""
    dims = cfg.reward.dimensions.as_dict()
    out = {"generator.actor": cfg.generator.actor.request()}
    out |= {f"reward.dimensions.{n}.actor": dims[n].actor.request() for n in active_dimensions(dims)}
    out["gapo worker"] = cfg.gapo.worker_request()
    if cfg.loop.guard.enabled:
        m = cfg.eval.metrics
        out["eval.metrics actor"] = {"CPU": m.num_cpus, **({"GPU": m.num_gpus} if m.num_gpus else {})}
    return out


def fit_no_node(requests: dict[str, dict[str, float]], nodes: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """The requests that no single node's total resources can hold (the cluster's sum may still cover them)."""
    return {what: r for what, r in requests.items()
            if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in r.items()) for node in nodes)}


def check_cluster_fits(cfg: AnisoraConfig, wait_s: float | None = None) -> dict[str, float]:
    """Wait up to ``ray.wait_for_resources_s`` for the cluster to offer the config's peak demand, else
    raise :class:`ConfigError` naming what is missing and which settings ask for it (rather than
    waiting silently for placement groups that cannot be placed)."""
    import ray

    demand = resource_demand(cfg)
    need = demand["peak"]
    wait_s = cfg.ray.wait_for_resources_s if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while True:
        have = ray.cluster_resources()
        short = {k: v for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v}
        too_big = fit_no_node(single_requests(cfg), [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        if not short and not too_big:
            return have
        if time.monotonic() >= deadline and too_big and not short:
            largest = {k: max(n["Resources"].get(k, 0.0) for n in ray.nodes() if n.get("Alive"))
                       for r in too_big.values() for k in r}
            raise ConfigError(
                "no node of the cluster can hold " + "; ".join(f"one {w} ({readable(r)})" for w, r in too_big.items())
                + f": the largest node offers {readable(largest)} (waited {wait_s:g}s, ray.wait_for_resources_s). "
                "Lower those settings or add a larger node")
        if time.monotonic() >= deadline:
            groups = ", ".join(f"{g} {demand[g]['GPU']:g} GPU / {demand[g]['CPU']:g} CPU"
                               + (f" / {amount('memory', demand[g]['memory'])} memory" if demand[g]["memory"] else "")
                               for g in ("generator", "reward", "trainer"))
            missing = ", ".join(f"{k}: needs {amount(k, v)}, the cluster has {amount(k, have.get(k, 0.0))}"
                                for k, v in short.items())
            raise ConfigError(
                f"the cluster cannot run this config ({missing}; waited {wait_s:g}s, ray.wait_for_resources_s). "
                f"At peak with loop.placement = {cfg.loop.placement!r} it asks for {groups}: add nodes, or lower "
                "generator.replicas / generator.actor, reward.dimensions.<name>.replicas / .actor, gapo.num_workers")
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
