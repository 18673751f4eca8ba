"""Weight refresh on one GPU through CUDA IPC (the colocated path), vs a device-to-device memcpy. No Ray.

    python benchmarks/refresh_gpu.py [--blocks 42] [--replicas 2] [--bucket-mb 512] [--repeats 4] [--json F]

A trainer process holds bf16 tensors shaped like CogVideoX-5B's transformer blocks (``--blocks``
blocks of 3072-wide attention and a 4x feed-forward: ~9.5 GB at 42) on the GPU; ``--replicas``
processes on the same GPU hold zeros of the same shapes and mix in the replicas' own
``WeightsReceiver``. The project's ``weights.stream.stream_parts`` sends every bucket through the
trainer's CUDA IPC slots (``weights.cuda_ipc``): one device copy into a slot, the non-finite check
and the ``fp`` fingerprint there, then every replica copies it into its tensors and fingerprints
what landed; the update counts once every replica committed with the sender's checksum.
Bandwidth = bytes x replicas / time; the reference is one process copying the same tensors device
to device. Also: the host route from the same GPU tensors (device-to-host into shared memory,
``xxh3``), a refused NaN bucket, and the ``fp`` fingerprint on the GPU vs the CPU. Replicas are
driven over pipes (``Replicas`` protocol) instead of Ray actors: the GPU machine has no Ray.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import statistics
import time

import torch

from anisora_ray.errors import WeightsError
from anisora_ray.weights import state
from anisora_ray.weights.cuda_ipc import device_slots
from anisora_ray.weights.receiver import WeightsReceiver
from anisora_ray.weights.shared import sender_slots
from anisora_ray.weights.state import digests, group_by_size, refuse_non_finite_many
from anisora_ray.weights.stream import Route, stream_parts

WIDTH = 3072


def shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for b in range(blocks):
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            out[f"blocks.{b:02d}.attn.{proj}.weight"] = (WIDTH, WIDTH)
            out[f"blocks.{b:02d}.attn.{proj}.bias"] = (WIDTH,)
        out[f"blocks.{b:02d}.ff.up.weight"] = (4 * WIDTH, WIDTH)
        out[f"blocks.{b:02d}.ff.down.weight"] = (WIDTH, 4 * WIDTH)
        out[f"blocks.{b:02d}.norm.linear.weight"] = (6 * WIDTH, 512)
    return out


class Replica(WeightsReceiver):
    def __init__(self, shapes_: dict, index: int):
        self.replica_id = f"gpu-replica-{index}"
        self.module = torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(
            torch.zeros(s, dtype=torch.bfloat16, device=DEVICE), requires_grad=False) for k, s in shapes_.items()})

    def receiving_module(self):
        return self.module


def serve(conn, shapes_: dict, index: int, acc: str = "int64") -> None:
    state.FP_ACCUMULATE = getattr(torch, acc)
    serve_replica(conn, Replica(shapes_, index))


def serve_replica(conn, replica) -> None:
    """Answer a :class:`PipeReplicas` sender's calls on ``replica``, in order, until ``stop``."""
    conn.send(("ready", None))
    while True:
        method, args = conn.recv()
        if method == "stop":
            return
        try:
            conn.send(("ok", getattr(replica, method)(*args)))
        except Exception as exc:  # noqa: BLE001 - sent back to the sender, which raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class PipeReplicas:
    """``weights.stream.Replicas`` over pipes to processes that serve a ``Replica`` each (calls run in order)."""

    def __init__(self, conns):
        self.conns = conns
        self.sent = [0] * len(conns)
        self.done = [0] * len(conns)
        self.results: dict[tuple[int, int], tuple] = {}

    def call(self, index: int, method: str, *args):
        self.conns[index].send((method, args))
        self.sent[index] += 1
        return index, self.sent[index]

    def wait(self, handle, timeout_s: float):
        index, ticket = handle
        while self.done[index] < ticket:
            if not self.conns[index].poll(timeout_s):
                raise TimeoutError(f"replica {index} did not answer in {timeout_s}s")
            self.done[index] += 1
            self.results[(index, self.done[index])] = self.conns[index].recv()
        status, value = self.results.pop(handle)
        if status == "error":
            raise RuntimeError(value)
        return value


def d2d_gbps(live: dict[str, torch.Tensor]) -> float:
    dst = {k: torch.empty_like(v) for k, v in live.items()}
    nbytes = sum(v.numel() * v.element_size() for v in live.values())
    rates = []
    for _ in range(4):
        sync()
        start = time.perf_counter()
        for k, v in live.items():
            dst[k].copy_(v)
        sync()
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    del dst
    return statistics.median(rates[1:])


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a dry run of the same script (shared memory)


def primary(count: int, window: int) -> Route:
    if DEVICE == "cuda":
        return Route("cuda ipc", list(range(count)), device_slots(window + 1, torch.device("cuda")))
    return Route("shared memory", list(range(count)), sender_slots(window + 1))


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=42)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", default="")
    parser.add_argument("--host-runs", type=int, default=2, help="refreshes over the host route, for comparison")
    parser.add_argument("--fp-acc", default="int64", help="integer type of the fp fingerprint's sums")
    parser.add_argument("--sweep", default="", help="more CUDA IPC configs after the main one, as MB:window,... "
                        "(e.g. 1024:2,2048:2,1024:4): the chain of per-bucket latencies vs bucket size and depth")
    args = parser.parse_args()

    state.FP_ACCUMULATE = getattr(torch, args.fp_acc)
    sizes = shapes(args.blocks)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    live = {k.replace(".", "_"): (torch.randn(s, generator=g, device=DEVICE) * 0.02).to(torch.bfloat16)
            for k, s in sizes.items()}
    nbytes = sum(v.numel() * v.element_size() for v in live.values())
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(args.replicas)]
    procs = [ctx.Process(target=serve, args=(child, sizes, i, args.fp_acc), daemon=True) for i, (_, child) in enumerate(pipes)]
    for p in procs:
        p.start()
    conns = [parent for parent, _ in pipes]
    for c in conns:
        assert c.recv()[0] == "ready"
    replicas = PipeReplicas(conns)
    copy = d2d_gbps(live)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU dry run"
    print(f"{name}: {len(live)} bf16 tensors, {nbytes / 1e9:.2f} GB, {args.replicas} replicas "
          f"on the same GPU, buckets {args.bucket_mb:.0f} MB, window {args.window}; memcpy D2D (1 process) {copy:.0f} GB/s")
    bucket = int(args.bucket_mb * 2**20)
    phases = {}
    first = next(iter(group_by_size(sorted(live.items()), bucket)))
    for label, fn in (("copy", lambda: [torch.empty_like(t).copy_(t) for _, t in first]),
                      ("non-finite check", lambda: refuse_non_finite_many(first, "x")),
                      ("fp int64", lambda: (setattr(state, "FP_ACCUMULATE", torch.int64), digests(first, "fp"))),
                      ("fp int32", lambda: (setattr(state, "FP_ACCUMULATE", torch.int32), digests(first, "fp")))):
        times = []
        for _ in range(5):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        phases[label] = statistics.median(times[1:]) * 1e3
    state.FP_ACCUMULATE = getattr(torch, args.fp_acc)
    print("one bucket, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    result = {"device": name, "gb": nbytes / 1e9, "replicas": args.replicas,
              "memcpy_d2d_gbps": copy, "fp_acc": args.fp_acc, "bucket_phases_ms": phases, "ipc_seconds": [], "host_seconds": []}
    counter = itertools.count(1)  # weights versions

    def ipc_refresh(bucket_bytes: int, window: int) -> tuple[float, str]:
        """One refresh through CUDA IPC after a training step changed the weights: (seconds, checksum)."""
        for v in live.values():
            v.add_(0.001)
        sync()
        start = time.perf_counter()
        meta, reports = stream_parts(replicas, args.replicas, [primary(args.replicas, window)],
                                     group_by_size(sorted(live.items()), bucket_bytes), next(counter), "full",
                                     scheme="fp", window=window, timeout_s=300)
        seconds = time.perf_counter() - start
        assert {x["loaded"] for x in reports} == {meta.version.checksum} and meta.version.checksum.startswith("fp:")
        return seconds, meta.version.checksum

    for r in range(args.repeats):
        seconds, expect = ipc_refresh(bucket, args.window)
        result["ipc_seconds"].append(seconds)
        print(f"  cuda ipc, refresh {r + 1}: {seconds * 1e3:.0f} ms, {nbytes * args.replicas / seconds / 1e9:.1f} GB/s, "
              f"{nbytes * args.replicas / seconds / 1e9 / copy:.1%} of memcpy{' (first: slots mapped)' if r == 0 else ''}")
    steady = result["ipc_seconds"][1:] or result["ipc_seconds"]
    fractions = [nbytes * args.replicas / t / 1e9 / copy for t in steady]
    result["ipc_fraction_of_memcpy"] = [min(fractions), statistics.median(fractions), max(fractions)]
    print(f"END TO END, cuda ipc: {min(fractions):.1%}-{max(fractions):.1%} of memcpy (median "
          f"{statistics.median(fractions):.1%}), {nbytes * args.replicas / statistics.median(steady) / 1e9:.0f} GB/s")

    result["sweep"] = []
    for config in filter(None, args.sweep.split(",")):
        mb, window = float(config.split(":")[0]), int(config.split(":")[1])
        times = [ipc_refresh(int(mb * 2**20), window)[0] for _ in range(args.repeats)]
        steady = times[1:] or times
        fractions = sorted(nbytes * args.replicas / t / 1e9 / copy for t in steady)
        result["sweep"].append({"bucket_mb": mb, "window": window, "seconds": times,
                                "fraction_of_memcpy": [fractions[0], statistics.median(fractions), fractions[-1]]})
        print(f"  sweep: buckets {mb:.0f} MB, window {window}: {min(steady) * 1e3:.0f}-{max(steady) * 1e3:.0f} ms, "
              f"{fractions[0]:.1%}-{fractions[-1]:.1%} of memcpy (median {statistics.median(fractions):.1%}; first, "
              f"slots grown: {times[0] * 1e3:.0f} ms)")

    # the host route from the same GPU tensors (what a GPU trainer would do without IPC)
    for r in range(args.host_runs):
        version = next(counter)
        sync()
        start = time.perf_counter()
        routes = [Route("shared memory", list(range(args.replicas)), sender_slots(args.window + 1))]
        meta, reports = stream_parts(replicas, args.replicas, routes, group_by_size(sorted(live.items()), bucket),
                                     version, "full", scheme="xxh3", window=args.window, timeout_s=600)
        result["host_seconds"].append(time.perf_counter() - start)
        print(f"  host route (D2H into shared memory, xxh3), refresh {r + 1}: {result['host_seconds'][-1]:.2f} s")
    # a NaN bucket is refused and nobody moves to that version
    version = next(counter)
    bad = dict(live)
    name = sorted(bad)[len(bad) // 2]
    bad[name] = bad[name].clone()
    bad[name].view(-1)[0] = float("nan")
    try:
        stream_parts(replicas, args.replicas, [primary(args.replicas, args.window)],
                     group_by_size(sorted(bad.items()), bucket), version, "full", scheme="fp", window=args.window)
        result["nan_refused"] = False
    except WeightsError as exc:
        result["nan_refused"] = name in str(exc)
    versions = [replicas.wait(replicas.call(i, "get_weights_version"), 60) for i in range(args.replicas)]
    result["versions_after_nan"] = versions
    # the fp fingerprint is the same on the GPU and on the CPU (a checksum can be checked anywhere)
    sample = sorted(live.items())[:6]
    result["fp_gpu_equals_cpu"] = digests(sample, "fp") == digests([(k, v.cpu()) for k, v in sample], "fp")
    print(f"NaN bucket refused by name: {result['nan_refused']}; versions after it {versions} (last good "
          f"{version - 1}); fp GPU == CPU: {result['fp_gpu_equals_cpu']}; last checksum {expect[:15]}")
    for c in conns:
        c.send(("stop", ()))
    for p in procs:
        p.join(timeout=30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
