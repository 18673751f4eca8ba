"""Weight refresh bandwidth vs a single-process memcpy of the same bytes (goal ≥ 50%), and LoRA vs full bytes.

    python benchmarks/weights_refresh.py [--mb 256] [--replicas 2] [--bucket-mb 64] [--lora-rank 64]

A model of ``--mb`` MB (fp32 linear layers, safetensors on disk) is published (read, checksummed,
packed into buckets, ``ray.put``) and loaded by ``--replicas`` actors through the replicas' code
path (``weights.update.load_update``: fetch one bucket at a time, checksum, copy, bitwise check).
Bandwidth = bytes × replicas / time. The reference is ``np.copyto`` of the same bytes into a
warm buffer in one process. LoRA vs full: CogVideoX-5B's transformer built on the meta device
(no weights), with and without a rank ``--lora-rank`` adapter on to_q/to_k/to_v/to_out.0.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import ray
import torch

from anisora_ray.config import LoraConfig
from anisora_ray.weights.refresh import publish, refresh_actors
from anisora_ray.weights.update import load_update


@ray.remote(num_cpus=1)
class Holder:
    """A replica stand-in: holds a module of the benchmark's shape and loads updates like GeneratorActor."""

    def __init__(self, shapes: dict):
        torch.set_num_threads(1)
        self.module = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(s)) for k, s in shapes.items()})
        self.version = 0

    def copy_only(self, refs) -> int:
        """The transport alone: fetch each bucket and copy it into the parameters, no checksums."""
        from anisora_ray.weights.state import unpack_bucket

        params, n = dict(self.module.named_parameters()), 0
        with torch.no_grad():
            for ref in refs:
                for name, tensor in unpack_bucket(ray.get(ref)):
                    params[name].copy_(tensor)
                    n += tensor.numel() * tensor.element_size()
        return n

    def load_weights(self, meta, refs):
        report = load_update(self.module, meta, (ray.get(r) for r in refs), self.version)
        self.version = meta.version.version
        return report


def memcpy_gbps(nbytes: int) -> float:
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(1)  # fault the pages in: measure the copy, not the allocator
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def cogvideox5b_bytes(rank: int) -> tuple[int, int]:
    """(full transformer bytes in bf16, LoRA adapter bytes in bf16) of CogVideoX-5B I2V."""
    from diffusers import CogVideoXTransformer3DModel

    from anisora_ray.weights.lora import adapter_state, add_adapter

    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(
            num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, num_layers=42,
            time_embed_dim=512, text_embed_dim=4096, sample_width=90, sample_height=60,
            use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
        full = sum(p.numel() for p in model.parameters()) * 2
        add_adapter(model, LoraConfig(r=rank, alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        lora = sum(t.numel() for t in adapter_state(model).values()) * 2
    return full, lora


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=256)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=64)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from safetensors.torch import save_file

    layer = 1024 * 1024  # 4 MiB fp32 per tensor
    count = max(1, int(args.mb * 2**20 / (layer * 4)))
    shapes = {f"layer{i:04d}": (1024, 1024) for i in range(count)}
    ray.init(num_cpus=args.replicas + 1, include_dashboard=False, object_store_memory=int(4 * args.mb * 2**20) + 2**28,
             log_to_driver=False)
    actors = [Holder.remote(shapes) for _ in range(args.replicas)]
    nbytes = count * layer * 4
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: torch.randn(s) for k, s in shapes.items()}, os.path.join(tmp, "model.safetensors"))
        rows = []
        for version in range(1, args.repeats + 1):
            start = time.perf_counter()
            update = publish(tmp, version, args.bucket_mb)
            published = time.perf_counter()
            reports = refresh_actors(actors, update)
            done = time.perf_counter()
            assert len({r["loaded"] for r in reports}) == 1
            began = time.perf_counter()
            assert ray.get([a.copy_only.remote(update.buckets) for a in actors]) == [nbytes] * args.replicas
            rows.append((published - start, done - published, done - start, time.perf_counter() - began))
            del update
    ray.shutdown()
    copy = memcpy_gbps(nbytes)
    pub, load, total, transport = (min(r[i] for r in rows) for i in range(4))
    delivered = nbytes * args.replicas / 1e9
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}")
    print(f"{nbytes / 1e6:.0f} MB to {args.replicas} replica(s), buckets of {args.bucket_mb:.0f} MB, best of {args.repeats}:")
    print(f"  publish (read + checksum + pack + put): {pub:.2f}s; replicas load + verify: {load:.2f}s; total {total:.2f}s")
    print(f"  memcpy (1 process): {copy:.2f} GB/s")
    print(f"  transport alone (fetch + copy into the parameters, no checksum): {delivered / transport:.2f} GB/s = "
          f"{delivered / transport / copy:.0%} of memcpy")
    print(f"  refresh bandwidth, load phase: {delivered / load:.2f} GB/s = {delivered / load / copy:.0%} of memcpy "
          f"(goal >= 50%)")
    print(f"  refresh bandwidth, publish + load: {delivered / total:.2f} GB/s = {delivered / total / copy:.0%} of memcpy")
    full, lora = cogvideox5b_bytes(args.lora_rank)
    print(f"CogVideoX-5B I2V transformer (bf16): full refresh {full / 1e9:.2f} GB, LoRA r={args.lora_rank} adapter "
          f"{lora / 1e6:.1f} MB ({full / lora:.0f}x fewer bytes)")


if __name__ == "__main__":
    main()
