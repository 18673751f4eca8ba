"""Weight refresh from a trainer's live tensors to verified replicas vs a single-process memcpy (goal >= 50%).

    python benchmarks/weights_refresh.py [--mb 256] [--replicas 2] [--bucket-mb 128] [--window 2] [--lora-rank 64]

The end-to-end figure: tensors of ``--mb`` MB (fp32 layers) held in this process, as rank 0 of a trainer
holds its weights, go to ``--replicas`` actors through ``weights.refresh.stream_update`` (per bucket:
one copy into a shared-memory slot, non-finite check and checksum of the staged bytes; the replicas, on
this node, copy each bucket into their parameters while the next one is staged, and verify) until every
replica has committed the version with the same checksum; the same through the object store (one
``ray.put`` per bucket), the path to replicas on other nodes. Bandwidth = bytes x replicas / time; the
reference is ``np.copyto`` of the same bytes into a warm buffer in one process. Beside it, the phases:
the sender alone (checks + put), the replicas alone (load + verify of buckets already in the object
store), the transport alone (fetch + copy, no checks), and the previous path (publish from a safetensors
file, then load); and what bounds it here: the CPU a refresh uses, its fixed cost (16 bytes through the
same calls), and how far two processes copying at once add up on this machine's memory bus.
LoRA vs full: CogVideoX-5B's transformer built on the meta device, with and without a rank
``--lora-rank`` adapter on to_q/to_k/to_v/to_out.0.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time

import ray
import torch
from refresh_floor import concurrent_copy_gbps, memcpy_gbps

from anisora_ray.config import LoraConfig
from anisora_ray.weights.receiver import WeightsReceiver
from anisora_ray.weights.refresh import publish, publish_tensors, refresh_actors, stream_update
from anisora_ray.weights.state import group_by_size, unpack_bucket


@ray.remote(num_cpus=1)
class Holder(WeightsReceiver):
    """A replica stand-in: a module of the benchmark's shape, refreshed through the replicas' own receiver."""

    def __init__(self, shapes: dict):
        torch.set_num_threads(1)
        self.module = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(s)) for k, s in shapes.items()})

    def receiving_module(self):
        return self.module

    def copy_only(self, refs) -> int:
        """The transport alone: fetch each bucket and copy it into the parameters, no checksums."""
        params, n = dict(self.module.named_parameters()), 0
        with torch.no_grad():
            for ref in refs:
                for name, tensor in unpack_bucket(ray.get(ref)):
                    params[name].copy_(tensor)
                    n += tensor.numel() * tensor.element_size()
        return n

    def load_weights(self, meta, refs):  # the object refs arrive unresolved inside a list
        return super().load_weights(meta, (ray.get(r) for r in refs))

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def cpu(self) -> float:
        return time.process_time()


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


def settle() -> None:
    """Each phase starts on a quiet machine: the object store frees the previous phase's objects in the background."""
    time.sleep(0.5)


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=256)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=128)
    parser.add_argument("--window", type=int, default=2, help="buckets being loaded while the next one is put")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # this process plays a trainer rank: one CPU (gapo.cpus_per_worker), like the replicas
    layer = 1024 * 1024  # 4 MiB fp32 per tensor
    count = max(1, int(args.mb * 2**20 / (layer * 4)))
    shapes = {f"layer{i:04d}": (1024, 1024) for i in range(count)}
    ray.init(num_cpus=args.replicas + 1, include_dashboard=False, object_store_memory=int(4 * args.mb * 2**20) + 2**28,
             log_to_driver=False, _node_ip_address="127.0.0.1")  # loopback, as runtime.init_ray
    actors = [Holder.remote(shapes) for _ in range(args.replicas)]
    nbytes = count * layer * 4
    live = {k: torch.randn(s) for k, s in shapes.items()}  # the trainer's weights, in memory
    bucket = int(args.bucket_mb * 2**20)
    rows: dict[str, list[float]] = {k: [] for k in ("shared", "store", "send", "load", "transport", "file", "fixed")}
    nodes = ray.get([a.node.remote() for a in actors])
    versions = itertools.count(1)

    def step() -> int:  # a training step changed the weights; the next version
        for tensor in live.values():
            tensor.add_(1e-3)
        settle()
        return next(versions)

    def streamed(where, version: int) -> tuple[float, float]:
        """One end-to-end refresh: (wall seconds, CPU seconds of this process, Ray's threads included)."""
        start, cpu_start = time.perf_counter(), time.process_time()
        meta, reports = stream_update(actors, group_by_size(sorted(live.items()), bucket), version, "full",
                                      nodes=where, window=args.window)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        assert {r["loaded"] for r in reports} == {meta.version.checksum}
        return seconds, cpu_seconds

    with tempfile.TemporaryDirectory() as tmp:
        save_file(live, os.path.join(tmp, "model.safetensors"))
        # each phase's refreshes one after another on a quiet machine (the object store's phases after the rest)
        rows["shared"].append(streamed(nodes, step())[0])  # same node: shared memory (the first maps the slots)
        replica_cpu, sender_cpu = ray.get([a.cpu.remote() for a in actors]), []
        for _ in range(args.repeats - 1):
            seconds, cpu_seconds = streamed(nodes, step())
            rows["shared"].append(seconds)
            sender_cpu.append(cpu_seconds)
        cpu = {"sender": statistics.mean(sender_cpu),
               "replicas": sum(b - a for a, b in zip(replica_cpu, ray.get([a.cpu.remote() for a in actors]),
                                                     strict=True)) / (args.repeats - 1)}
        for _ in range(args.repeats):
            rows["store"].append(streamed(None, step())[0])  # other nodes: the object store
        for _ in range(args.repeats):
            version = step()
            start = time.perf_counter()
            update = publish_tensors(sorted(live.items()), version, "full", bucket_mb=args.bucket_mb)
            rows["send"].append(time.perf_counter() - start)
            start = time.perf_counter()
            refresh_actors(actors, update)
            rows["load"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert ray.get([a.copy_only.remote(update.buckets) for a in actors]) == [nbytes] * args.replicas
            rows["transport"].append(time.perf_counter() - start)
            del update
        for _ in range(args.repeats):
            version = step()
            start = time.perf_counter()
            refresh_actors(actors, publish(tmp, version, args.bucket_mb))
            rows["file"].append(time.perf_counter() - start)
    # a refresh's fixed cost: the same calls (begin, one part, commit) for 16 bytes to as many replicas
    tiny = [Holder.options(num_cpus=0).remote({"w": (4,)}) for _ in range(args.replicas)]
    tiny_nodes, small = ray.get([a.node.remote() for a in tiny]), {"w": torch.zeros(4)}
    for version in range(1, args.repeats + 2):
        small["w"].add_(1)
        start = time.perf_counter()
        stream_update(tiny, group_by_size(list(small.items()), bucket), version, "full", nodes=tiny_nodes,
                      window=args.window)
        rows["fixed"].append(time.perf_counter() - start)
    ray.shutdown()
    copy = memcpy_gbps(nbytes)
    together = concurrent_copy_gbps(nbytes, 2)
    delivered = nbytes * args.replicas / 1e9
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}")
    print(f"{nbytes / 1e6:.0f} MB to {args.replicas} replica(s), buckets of {args.bucket_mb:.0f} MB, window "
          f"{args.window}; {args.repeats} refreshes, the first apart (min-max of the others); memcpy (1 process) {copy:.2f} GB/s")
    labels = {"shared": "END TO END, same node: live tensors -> all replicas verified (stream_update, shared memory)",
              "store": "end to end, object store (the path to replicas on other nodes)",
              "send": "sender alone: non-finite check + checksum + put (publish_tensors)",
              "load": "replicas alone: load + verify buckets already put (refresh_actors)",
              "transport": "transport alone: fetch + copy into the parameters, no checks",
              "file": "previous path: publish from the safetensors file, then load"}
    for key, label in labels.items():
        times = rows[key][1:]  # the first refresh maps the slots and warms the object store: reported below
        fractions = [delivered / t / copy for t in times]
        print(f"  {label}: {spread([t * 1e3 for t in times])} ms = {spread([delivered / t for t in times])} GB/s = "
              f"{min(fractions):.0%}-{max(fractions):.0%} of memcpy (median {statistics.median(fractions):.0%})")
    print(f"end-to-end refresh from live tensors, same node: median "
          f"{statistics.median([delivered / t / copy for t in rows['shared'][1:]]):.0%} of memcpy (goal >= 50%); "
          f"first refresh (slots not yet mapped) {rows['shared'][0] * 1e3:.0f} ms")
    floor = (cpu["sender"] + cpu["replicas"]) / (os.cpu_count() or 1)
    print(f"CPU per same-node refresh (process time, Ray's threads included): sender {cpu['sender'] * 1e3:.1f} ms, "
          f"replicas {cpu['replicas'] * 1e3:.1f} ms in all; "
          f"spread perfectly over {os.cpu_count()} cores that is {floor * 1e3:.1f} ms = {delivered / floor / copy:.0%} of "
          f"memcpy, the most this machine allows (measured: median {statistics.median(rows['shared'][1:]) / floor:.2f}x that)")
    fixed = statistics.median(rows["fixed"][1:])
    print(f"fixed cost of a refresh (16 bytes to {args.replicas} replicas: begin, one part, commit): median "
          f"{fixed * 1e3:.1f} ms; memory bus: 2 processes copying at once move {together:.2f} GB/s together = "
          f"{together / copy:.2f}x one process")
    full, lora = cogvideox5b_bytes(args.lora_rank)
    print(f"CogVideoX-5B I2V transformer (bf16): full refresh {full / 1e9:.2f} GB, LoRA r={args.lora_rank} adapter "
          f"{lora / 1e6:.1f} MB ({full / lora:.0f}x fewer bytes)")


if __name__ == "__main__":
    main()
