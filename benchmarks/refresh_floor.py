"""The same-node refresh's data path without Ray: how close to memcpy its copies and checks alone get here.

    python benchmarks/refresh_floor.py [--mb 256] [--replicas 2] [--bucket-mb 128] [--window 2] [--repeats 20]

The work of ``weights_refresh.py``'s end-to-end figure, done by the project's own pieces: the sender
stages each bucket with ``SharedSlots.stage`` (one copy into a shared-memory slot, non-finite check,
checksum) while the replica processes copy the previous ones into their tensors with ``TensorCopier``
(copy, digest of what landed), at most ``--window`` buckets behind; every replica's checksum must equal
the sender's. Only the calls differ: a pipe per replica instead of Ray actor calls. Beside it, a design
the project does not use, one copy fewer ("direct"): the replicas' tensors live in shared memory and
the sender copies each bucket straight into them (checks and checksum on the first copy); each replica
then digests what it holds. Bandwidth = bytes x replicas / time, against ``np.copyto`` in one process
(as ``weights_refresh.py``). No Ray: it also runs where Ray is not installed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time
from collections import deque
from multiprocessing import shared_memory

import numpy as np
import torch

from anisora_ray.weights.shared import ALIGN, SharedSlots, shared_tensors
from anisora_ray.weights.state import Checksum, TensorCopier, group_by_size, refuse_non_finite


def memcpy_gbps(nbytes: int) -> float:
    """``np.copyto`` into a warm buffer in one process, best of 3 (``weights_refresh.py``'s reference)."""
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.ones_like(src)
    best = min(_timed(np.copyto, dst, src) for _ in range(3))
    return nbytes / best / 1e9


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


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


def replica(conn, shapes: dict, held: dict[str, torch.Tensor] | None) -> None:
    """A replica's loop: ``begin``, then buckets (loaded, or for ``held`` digested in place), then ``commit``."""
    torch.set_num_threads(1)
    targets = held if held is not None else {k: torch.zeros(s) for k, s in shapes.items()}
    cpu = 0.0
    while (message := conn.recv()) is not None:
        start = time.thread_time()
        if message == "begin":
            copier, digest = TensorCopier(targets), Checksum()
        elif message == "commit":
            reply = digest.hexdigest() if held is not None else copier.report(require_all=True)["loaded"]
        elif held is not None:  # the sender wrote the tensors: digest what this replica holds
            for name in message:
                digest.update(name, targets[name])
        else:
            copier.add(shared_tensors(message))
        cpu += time.thread_time() - start
        conn.send(reply if message == "commit" else cpu)


def refresh(conns, live: dict[str, torch.Tensor], slots: SharedSlots, held: list[dict] | None, bucket: int,
            window: int) -> None:
    for conn in conns:
        conn.send("begin")
    for conn in conns:
        conn.recv()
    checksum, in_flight = Checksum(), deque()
    for index, chunk in enumerate(group_by_size(sorted(live.items()), bucket)):
        while len(in_flight) > window:
            for conn in conns:
                conn.recv()
            in_flight.popleft()
        if held is None:
            message, _ = slots.stage(index, chunk, checksum, "refresh floor")
        else:
            for k, tensors in enumerate(held):
                for name, tensor in chunk:
                    tensors[name].copy_(tensor)
                    if k == 0:  # checked and checksummed while the first copy is in cache
                        refuse_non_finite(name, tensors[name], "refresh floor")
                        checksum.update(name, tensors[name])
            message = [name for name, _ in chunk]
        for conn in conns:
            conn.send(message)
        in_flight.append(index)
    while in_flight:
        for conn in conns:
            conn.recv()
        in_flight.popleft()
    for conn in conns:
        conn.send("commit")
    loaded = {conn.recv() for conn in conns}
    assert loaded == {checksum.hexdigest()}, "a replica's checksum differs from the sender's"


def measure(direct: bool, shapes: dict, args) -> tuple[list[float], float, float]:
    """(refresh seconds, sender CPU seconds per refresh, replicas' CPU seconds per refresh in all)."""
    live = {k: torch.randn(s) for k, s in shapes.items()}
    arenas = [arena(shapes) for _ in range(args.replicas)] if direct else []
    held = [views for _, views in arenas] if direct else None
    ctx = multiprocessing.get_context("fork")
    conns, workers = [], []
    for k in range(args.replicas):
        mine, theirs = ctx.Pipe()
        workers.append(ctx.Process(target=replica, args=(theirs, shapes, held[k] if direct else None)))
        workers[-1].start()
        conns.append(mine)
    slots, times, sender_cpu = SharedSlots(args.window + 1), [], []
    try:
        for _ in range(args.repeats + 1):
            for tensor in live.values():
                tensor.add_(1e-3)  # a training step
            time.sleep(0.05)
            start, cpu_start = time.perf_counter(), time.process_time()
            refresh(conns, live, slots, held, int(args.bucket_mb * 2**20), args.window)
            times.append(time.perf_counter() - start)
            sender_cpu.append(time.process_time() - cpu_start)
        for conn in conns:
            conn.send("begin")
        replicas_cpu = sum(conn.recv() for conn in conns)
    finally:
        for conn in conns:
            conn.send(None)
        for worker in workers:
            worker.join()
        slots.close()
        for segment, _ in arenas:
            segment.close()
            segment.unlink()
    return times[1:], statistics.mean(sender_cpu[1:]), replicas_cpu / (args.repeats + 1)


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
