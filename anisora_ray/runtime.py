"""Connect to Ray: join a cluster (``ray.address``) or start a local one bound to loopback."""

from __future__ import annotations

import logging
import os

import ray

from anisora_ray.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once; a driver that already connected (a test) is kept.

    ``ray.address``, else ``RAY_ADDRESS`` (what a ``ray job submit`` driver gets), is joined; with
    neither, a local Ray bound to loopback is started.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set for drivers started by `ray job submit`
    if address:
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=cfg.log_to_driver)
        return
    ray.init(
        address="local",  # a new local instance, even when another Ray runs on this machine
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        namespace=cfg.namespace,
        include_dashboard=cfg.include_dashboard,
        dashboard_host=cfg.dashboard_host,
        log_to_driver=cfg.log_to_driver,
        _node_ip_address=cfg.node_ip_address,
    )
    log.info("started a local Ray: %s", ray.cluster_resources())


def actor_placement() -> dict:
    """Where the calling actor runs: actor id, node id, the GPU ids Ray gave it, pid."""
    ctx = ray.get_runtime_context()
    return {
        "actor_id": ctx.get_actor_id(),
        "node_id": ctx.get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "pid": os.getpid(),
    }
