"""Driver memory during a weight refresh: the replicas stream the trained folder from storage, the driver
reads only its manifest, so the driver's peak RSS does not grow with the model.

Builds a tiny-architecture CogVideoX I2V pipeline whose transformer is about ``--gb`` GB (fp32), writes
a "trained" transformer as numbered shards with a manifest (as the GAPO ranks do), starts 2 generator
replicas and refreshes them twice:

- ``storage``: ``GeneratorReplicas.refresh_from(uri)`` (what the loop and the CLI do);
- ``driver-put`` (for contrast): the driver reads the folder and ``ray.put``s it (``weights.refresh.publish``).

The driver's RSS is sampled every 5 ms during each refresh; printed: bytes refreshed, RSS before, peak
RSS and its growth.

    python benchmarks/refresh_memory.py [--gb 1.0] [--replicas 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()

    def __enter__(self):
        self.before = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def write_trained(pretrained: str, uri: str, shard_mb: float) -> dict:
    """A perturbed copy of the pipeline's transformer, written as the GAPO ranks write it."""
    from diffusers import CogVideoXTransformer3DModel

    from anisora_ray.weights.folder import FolderWriter
    from anisora_ray.weights.state import group_by_size

    model = CogVideoXTransformer3DModel.from_pretrained(pretrained, subfolder="transformer")
    items = sorted(model.state_dict().items())
    chunks = list(group_by_size(items, int(shard_mb * 2**20)))
    writer = FolderWriter(uri, "full", num_shards=len(chunks))
    for chunk in chunks:
        writer.write_shard([(n, t + 0.001) for n, t in chunk])
    with open(os.path.join(uri, "config.json"), "w") as f:
        f.write(model.to_json_string())
    del model, items, chunks
    return writer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0, help="transformer size (fp32) to refresh")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--shard-mb", type=float, default=256)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from anisora_ray.config import load_config
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.weights.refresh import publish

    layers = max(1, round(args.gb * 2**30 / 4 / 12.9e6))  # ~12.9M parameters per block at width 1024
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "local.yaml"), [
            f"run.output_dir={tmp}/out", f"model.cache_dir={tmp}/models", "model.tiny.warm_start_steps=0",
            f"model.tiny.num_layers={layers}", "model.tiny.num_attention_heads=16", "model.tiny.attention_head_dim=64",
            "model.tiny.time_embed_dim=512", f"generator.replicas={args.replicas}", "generator.height=32",
            "generator.width=32", "generator.num_frames=9"])
        pretrained = resolve_pretrained(cfg.model, cfg.generator)
        manifest = write_trained(pretrained, f"{tmp}/trained", args.shard_mb)
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=int(3 * manifest["num_bytes"]) + 2**28,
                 log_to_driver=False, _node_ip_address="127.0.0.1")  # loopback, as runtime.init_ray
        replicas = GeneratorReplicas(cfg, pretrained)
        rows = []
        try:
            with PeakRss() as storage:
                began = time.perf_counter()
                record, _ = replicas.refresh_from(f"{tmp}/trained")
                seconds = time.perf_counter() - began
            rows.append(("storage (replicas stream the folder)", storage, seconds, record.num_bytes))
            with PeakRss() as put:
                began = time.perf_counter()
                update = publish(f"{tmp}/trained", record.version + 1, args.shard_mb)
                replicas.refresh(update)
                seconds = time.perf_counter() - began
                del update
            rows.append(("driver-put (driver reads and ray.puts)", put, seconds, manifest["num_bytes"]))
        finally:
            replicas.shutdown()
            ray.shutdown()
    print(f"refresh of {manifest['num_bytes'] / 1e9:.2f} GB ({manifest['num_tensors']} tensors, "
          f"{len(manifest['files'])} shards) to {args.replicas} replicas, driver RSS sampled every 5 ms:")
    for name, rss, seconds, nbytes in rows:
        print(f"  {name:40s} RSS before {rss.before / 2**20:7.0f} MiB, peak {rss.peak / 2**20:7.0f} MiB, "
              f"growth {(rss.peak - rss.before) / 2**20:7.0f} MiB ({(rss.peak - rss.before) / nbytes:.1%} of the weights), "
              f"{seconds:.1f}s")


if __name__ == "__main__":
    main()
