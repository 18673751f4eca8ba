"""The same-node refresh without Ray: how close to memcpy its copies and checks alone get here.

    python benchmarks/refresh_floor.py [--mb 256] [--replicas 2] [--bucket-mb 128] [--window 2] [--repeats 20]

The refresh of ``weights_refresh.py``'s end-to-end figure, run by the project's own code: the sender's
``weights.stream.stream_parts`` over a shared-memory route (each bucket staged once into a slot,
non-finite check, checksum) to replica processes that mix in the replicas' ``WeightsReceiver`` (each
copies a bucket into its tensors while the next is staged, digests what landed, and commits against the
sender's checksum). Only the calls differ: replicas are driven over pipes (``refresh_gpu.PipeReplicas``)
instead of Ray actors. Beside it, a design the project does not use, one copy fewer ("direct"): the
replicas' tensors live in shared memory and the sender copies each bucket straight into them (checks and
checksum on the first copy); each replica then only digests what it holds. Bandwidth = bytes x replicas
/ time, against ``np.copyto`` in one process (as ``weights_refresh.py``). No Ray: it also runs where Ray
is not installed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import torch
from refresh_gpu import PipeReplicas, serve_replica

from anisora_ray.weights.receiver import WeightsReceiver
from anisora_ray.weights.shared import ALIGN, Slots, sender_slots
from anisora_ray.weights.state import Checksum, TensorEntry, dtype_name, group_by_size, refuse_non_finite
from anisora_ray.weights.stream import Route, stream_parts


def _buffers(nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(1)  # fault the pages in: measure the copy, not the allocator
    return src, dst


def _best_copy(src: np.ndarray, dst: np.ndarray, barrier=None, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        if barrier is not None:
            barrier.wait()
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return best


def memcpy_gbps(nbytes: int) -> float:
    """``np.copyto`` of ``nbytes`` into a warm buffer in one process, best of 3: the refresh benchmarks' reference."""
    return nbytes / _best_copy(*_buffers(nbytes)) / 1e9


def _copier(nbytes: int, barrier, results) -> None:
    results.put(_best_copy(*_buffers(nbytes), barrier, repeats=5))


def concurrent_copy_gbps(nbytes: int, processes: int) -> float:
    """Bytes a second that ``processes`` processes copy together, each its own buffers, started together:
    against :func:`memcpy_gbps`, how far the memory bus lets copies on several cores add up."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_copier, args=(nbytes, barrier, results)) for _ in range(processes)]
    for w in workers:
        w.start()
    slowest = max(results.get(timeout=120) for _ in workers)
    for w in workers:
        w.join()
    return processes * nbytes / slowest / 1e9


def arena(shapes: dict[str, tuple[int, ...]]) -> tuple[shared_memory.SharedMemory, dict[str, torch.Tensor]]:
    """Float32 tensors of ``shapes`` in one shared-memory segment (inherited by forked replicas)."""
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += -(-torch.Size(shape).numel() * 4 // ALIGN) * ALIGN
    segment = shared_memory.SharedMemory(create=True, size=total)
    memory = torch.frombuffer(segment.buf, dtype=torch.uint8)
    views = {name: memory[o: o + torch.Size(shapes[name]).numel() * 4].view(torch.float32).view(shapes[name])
             for name, o in offsets.items()}
    for view in views.values():
        view.zero_()
    return segment, views


@dataclass(frozen=True)
class Written:
    """A bucket the sender wrote straight into every replica's tensors ("direct"): only names travel."""

    entries: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


class ArenaSlots(Slots):
    """The "direct" sender: each bucket is copied into every replica's shared tensors, checked and
    checksummed on the first copy."""

    def __init__(self, held: list[dict[str, torch.Tensor]]):
        super().__init__(1)
        self.held = held

    def stage(self, index, chunk, checksum: Checksum | None, where: str):
        for k, tensors in enumerate(self.held):
            for name, tensor in chunk:
                tensors[name].copy_(tensor)
                if k == 0 and checksum is not None:  # while the first copy is in cache
                    refuse_non_finite(name, tensors[name], where)
                    checksum.update(name, tensors[name])
        entries = tuple(TensorEntry(n, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size()) for n, t in chunk)
        return Written(entries), [(n, self.held[0][n]) for n, _ in chunk]


class HostReplica(WeightsReceiver):
    """A replica process's module: float32 tensors (for "direct", views of its shared-memory arena)."""

    def __init__(self, tensors: dict[str, torch.Tensor], index: int):
        self.replica_id = f"host-replica-{index}"
        self.module = torch.nn.ParameterDict({k: torch.nn.Parameter(t, requires_grad=False) for k, t in tensors.items()})

    def receiving_module(self):
        return self.module

    def _parts(self, bucket):
        if isinstance(bucket, Written):  # already in place: copying a tensor onto itself is free, the digest is not
            params = dict(self.module.items())
            return [(e.name, params[e.name]) for e in bucket.entries]
        return super()._parts(bucket)

    def cpu(self) -> float:
        return time.process_time()


def run_replica(conn, shapes: dict, held: dict[str, torch.Tensor] | None, index: int) -> None:
    torch.set_num_threads(1)
    serve_replica(conn, HostReplica(held if held is not None else {k: torch.zeros(s) for k, s in shapes.items()}, index))


def measure(direct: bool, shapes: dict, args) -> tuple[list[float], float, float]:
    """(refresh seconds, sender CPU seconds per refresh, replicas' CPU seconds per refresh in all), the first
    refresh (slots mapped) left out."""
    live = {k: torch.randn(s) for k, s in shapes.items()}
    arenas = [arena(shapes) for _ in range(args.replicas)] if direct else []
    held = [views for _, views in arenas]
    ctx = multiprocessing.get_context("fork")  # "direct" replicas inherit their arena's mapping
    pipes = [ctx.Pipe() for _ in range(args.replicas)]
    workers = [ctx.Process(target=run_replica, args=(child, shapes, held[k] if direct else None, k), daemon=True)
               for k, (_, child) in enumerate(pipes)]
    for worker in workers:
        worker.start()
    conns = [parent for parent, _ in pipes]
    for conn in conns:
        assert conn.recv()[0] == "ready"
    replicas, indices = PipeReplicas(conns), list(range(args.replicas))
    route = Route("direct", indices, ArenaSlots(held)) if direct else Route("shared memory", indices,
                                                                           sender_slots(args.window + 1))

    def replicas_cpu() -> float:
        return sum(replicas.wait(replicas.call(i, "cpu"), 60) for i in indices)

    times, sender_cpu = [], []
    try:
        for version in range(1, args.repeats + 2):
            if version == 2:
                replicas_start = replicas_cpu()
            for tensor in live.values():
                tensor.add_(1e-3)  # a training step
            time.sleep(0.05)
            start, cpu_start = time.perf_counter(), time.process_time()
            meta, reports = stream_parts(replicas, args.replicas, [route], group_by_size(sorted(live.items()),
                                         int(args.bucket_mb * 2**20)), version, "full", window=args.window)
            times.append(time.perf_counter() - start)
            sender_cpu.append(time.process_time() - cpu_start)
            assert {r["loaded"] for r in reports} == {meta.version.checksum}
        replicas_used = replicas_cpu() - replicas_start
    finally:
        for conn in conns:
            conn.send(("stop", ()))
        for worker in workers:
            worker.join()
        for segment, _ in arenas:
            segment.close()
            segment.unlink()
    return times[1:], statistics.mean(sender_cpu[1:]), replicas_used / args.repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=256)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=128)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    count = max(1, int(args.mb * 2**20 / (2**20 * 4)))
    shapes = {f"layer{i:04d}": (1024, 1024) for i in range(count)}
    nbytes = count * 2**22
    results = {"pipes (the project's data path)": measure(False, shapes, args),
               "direct (one copy fewer)": measure(True, shapes, args)}
    copy = memcpy_gbps(nbytes)
    delivered = nbytes * args.replicas / 1e9
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {nbytes / 1e6:.0f} MB to "
          f"{args.replicas} replica(s), buckets of {args.bucket_mb:.0f} MB, window {args.window}; {args.repeats} "
          f"refreshes each; memcpy (1 process) {copy:.2f} GB/s")
    for label, (times, sender, replicas) in results.items():
        fractions = sorted(delivered / t / copy for t in times)
        print(f"  {label}: {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} ms, median "
              f"{statistics.median(times) * 1e3:.1f} ms = {statistics.median(fractions):.0%} of memcpy "
              f"(min-max {fractions[0]:.0%}-{fractions[-1]:.0%}); CPU per refresh: sender {sender * 1e3:.1f} ms, "
              f"replicas {replicas * 1e3:.1f} ms in all")


if __name__ == "__main__":
    main()
