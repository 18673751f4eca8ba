"""What the job asks of the cluster: GPUs and CPUs per worker group, and at peak for the placement mode."""

from __future__ import annotations

from anisora_ray.config import AnisoraConfig
from anisora_ray.reward.aggregate import active_dimensions


def resource_demand(cfg: AnisoraConfig) -> dict[str, dict[str, float]]:
    """GPUs and CPUs of the generator replicas, the reward actors and the trainer, and the peak.

    ``loop.placement: separate`` keeps all three at once (peak = sum); ``shared`` stops the
    generator and reward actors while the trainer runs (peak = max of the two phases).
    """
    g = cfg.generator
    dims = cfg.reward.dimensions.as_dict()
    generator = {"GPU": g.replicas * g.actor.num_gpus, "CPU": g.replicas * g.actor.num_cpus}
    reward = {"GPU": 0.0, "CPU": 0.0}
    for name in active_dimensions(dims):
        d = dims[name]
        reward["GPU"] += d.replicas * d.actor.num_gpus
        reward["CPU"] += d.replicas * d.actor.num_cpus
    t = cfg.gapo
    trainer = {"GPU": float(t.num_workers if t.use_gpu else 0), "CPU": t.num_workers * t.cpus_per_worker}
    sampling = {k: generator[k] + reward[k] for k in ("GPU", "CPU")}
    if cfg.loop.placement == "separate":
        peak = {k: sampling[k] + trainer[k] for k in ("GPU", "CPU")}
    else:
        peak = {k: max(sampling[k], trainer[k]) for k in ("GPU", "CPU")}
    return {"generator": generator, "reward": reward, "trainer": trainer, "peak": peak}
