"""Weights on the move without Ray: checksums, buckets, verified loading, LoRA adapters."""

from __future__ import annotations

import os
import time

import pytest
import torch

from anisora_ray.config import LoraConfig
from anisora_ray.errors import WeightsError
from anisora_ray.types import WeightsVersion
from anisora_ray.weights import lora as lora_io
from anisora_ray.weights.folder import FolderWriter, read_manifest, read_safetensors
from anisora_ray.weights.state import (
    bucket_tensors,
    copy_into,
    pack_buckets,
    tensors_checksum,
)
from anisora_ray.weights.update import UpdateMeta, folder_update, load_folder, load_update, read_folder


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(7, generator=g).to(torch.bfloat16)),
            ("c", torch.arange(4)), ("d", torch.randn(200, generator=g))]


def test_checksum_covers_names_dtypes_shapes_and_bytes():
    base = tensors_checksum(_tensors())
    assert base == tensors_checksum(_tensors())
    changed = _tensors()
    changed[0][1][0, 0] += 1e-6
    assert tensors_checksum(changed) != base
    assert tensors_checksum([("z", t) if n == "a" else (n, t) for n, t in _tensors()]) != base
    assert tensors_checksum([(n, t.reshape(5, 3)) if n == "a" else (n, t) for n, t in _tensors()]) != base
    assert tensors_checksum([(n, t.double()) if n == "d" else (n, t) for n, t in _tensors()]) != base


@pytest.mark.parametrize(("bucket_bytes", "expected_buckets"), [(1, 4), (64, 3), (10**6, 1)])
def test_buckets_round_trip_exactly_at_any_bucket_size(bucket_bytes, expected_buckets):
    tensors = _tensors()  # 60, 14, 32 and 800 bytes
    buckets = list(pack_buckets(tensors, bucket_bytes))
    assert len(buckets) == expected_buckets
    assert sum(b.nbytes for b in buckets) == sum(t.numel() * t.element_size() for _, t in tensors)
    back = list(bucket_tensors(buckets))
    assert [n for n, _ in back] == [n for n, _ in tensors]
    for (_, got), (_, want) in zip(back, tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_copy_into_verifies_and_names_the_culprit():
    model = torch.nn.Linear(4, 3)
    new = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    report = copy_into(model.state_dict(), sorted(new.items()), require_all=True)
    assert torch.all(model.weight == 0.5) and report["loaded"] == report["received"]
    with pytest.raises(WeightsError, match="'extra'"):
        copy_into(model.state_dict(), [("extra", torch.zeros(1))], require_all=False)
    with pytest.raises(WeightsError, match=r"'weight': update shape \(4, 3\) != model \(3, 4\)"):
        copy_into(model.state_dict(), [("weight", torch.zeros(4, 3))], require_all=False)
    with pytest.raises(WeightsError, match="misses 1 tensor"):
        copy_into(model.state_dict(), [("weight", torch.zeros(3, 4))], require_all=True)


def _meta(version, tensors, kind="full", lora=None):
    record = WeightsVersion(version=version, kind=kind, uri="mem://", checksum=tensors_checksum(tensors),
                            num_bytes=0, num_tensors=len(tensors))
    return UpdateMeta(record, lora)


def test_load_update_refuses_stale_versions_and_corrupt_transfers():
    model = torch.nn.Linear(4, 3)
    tensors = sorted((k, torch.randn_like(v)) for k, v in model.state_dict().items())
    report = load_update(model, _meta(2, tensors), bucket_tensors(pack_buckets(tensors, 16)), current_version=1)
    assert report["version"] == 2 and torch.equal(model.weight, dict(tensors)["weight"])
    with pytest.raises(WeightsError, match="not newer"):
        load_update(model, _meta(2, tensors), bucket_tensors(pack_buckets(tensors, 16)), current_version=2)
    corrupt = [(n, t + 1) for n, t in tensors]
    with pytest.raises(WeightsError, match="received checksum .* != published"):
        load_update(model, _meta(3, tensors), bucket_tensors(pack_buckets(corrupt, 16)), current_version=2)


def test_bf16_replica_verifies_a_float32_update():
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    tensors = sorted((k, torch.randn(v.shape)) for k, v in model.state_dict().items())
    report = load_update(model, _meta(1, tensors), bucket_tensors(pack_buckets(tensors, 1 << 20)), current_version=0)
    assert model.weight.dtype == torch.bfloat16 and torch.equal(model.weight, dict(tensors)["weight"].bfloat16())
    assert report["loaded"] == tensors_checksum((n, t.bfloat16()) for n, t in tensors) != report["received"]


@pytest.fixture
def load_transformer(make_config):
    from diffusers import CogVideoXTransformer3DModel

    from anisora_ray.models.pipeline import resolve_pretrained

    cfg = make_config()
    path = resolve_pretrained(cfg.model, cfg.generator)
    return lambda: CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer").eval()


def test_lora_adapter_save_publish_format_and_load(load_transformer, tmp_path):
    tiny_transformer = load_transformer()
    cfg = LoraConfig(r=2, alpha=4, target_modules=["to_q", "to_v"])
    lora_io.add_adapter(tiny_transformer, cfg)
    state = lora_io.adapter_state(tiny_transformer)
    assert state and all("lora_" in k for k in state)
    targets = lora_io.adapter_targets(tiny_transformer)
    assert set(targets) == set(state)
    with torch.no_grad():
        for t in targets.values():
            t.normal_()
    lora_io.save_adapter(tiny_transformer, cfg, str(tmp_path / "adapter"))
    keys = [k for k, _ in read_safetensors(str(tmp_path / "adapter"))]
    assert all(k.startswith("transformer.") for k in keys)  # diffusers' load_lora_weights format
    assert lora_io.read_lora_config(str(tmp_path / "adapter")) == cfg

    fresh = load_transformer()
    report = load_folder(fresh, str(tmp_path / "adapter"))
    assert report["num_tensors"] == len(state)
    for name, tensor in lora_io.adapter_state(fresh).items():
        assert torch.equal(tensor, state[name])


def test_publish_refuses_non_finite_weights_and_counts_bytes(ray_cluster, tmp_path):
    from safetensors.torch import save_file

    from anisora_ray.weights.refresh import publish

    good = {"a": torch.ones(1000), "b": torch.zeros(3, dtype=torch.int64)}
    save_file(good, str(tmp_path / "model.safetensors"))
    update = publish(str(tmp_path), version=1, bucket_mb=0.001)
    assert update.meta.version.num_bytes == 4024 and update.meta.version.num_tensors == 2 and len(update.buckets) == 2
    assert update.meta.version.checksum == tensors_checksum(sorted(good.items()))
    save_file({**good, "a": torch.tensor([1.0, float("nan")])}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="'a' has non-finite values"):
        publish(str(tmp_path), version=2)
    with pytest.raises(WeightsError, match="nowhere does not exist"):
        publish(str(tmp_path / "nowhere"), version=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no .safetensors file"):
        publish(str(tmp_path / "empty"), version=2)


def test_sharded_folder_streams_back_in_order_with_the_manifest_checksum(load_transformer, tmp_path):
    """A full transformer written shard by shard (sorted names) reads back with the checksum the writer
    recorded, loads with diffusers' from_pretrained (index json), and into a replica model via load_folder."""
    from diffusers import CogVideoXTransformer3DModel

    from anisora_ray.weights.update import base_targets

    source = load_transformer()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    items = sorted(source.state_dict().items())
    writer = FolderWriter(str(tmp_path / "w"), "full", num_shards=3)
    for part in (items[:5], items[5:20], items[20:]):
        writer.write_shard(part)
    (tmp_path / "w" / "config.json").write_text(source.to_json_string())
    manifest = writer.close({"step": 7})
    assert manifest == read_manifest(str(tmp_path / "w"))
    assert manifest["num_tensors"] == len(items) and len(manifest["files"]) == 3 and manifest["step"] == 7
    kind, _, tensors = read_folder(str(tmp_path / "w"))
    assert kind == "full" and [n for n, _ in tensors] == [n for n, _ in items]
    assert tensors_checksum(read_safetensors(str(tmp_path / "w"))) == manifest["checksum"] == tensors_checksum(items)
    loaded = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "w"))
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in items)
    replica = load_transformer()
    meta = folder_update(str(tmp_path / "w"), version=3)
    assert meta.version.checksum == manifest["checksum"] and meta.version.kind == "full"
    report = load_update(replica, meta, read_folder(str(tmp_path / "w"))[2], current_version=0)
    assert report["received"] == manifest["checksum"]
    assert all(torch.equal(base_targets(replica)[n], t) for n, t in items)


def test_folder_writer_refuses_disorder_non_finite_and_missing_shards(tmp_path):
    writer = FolderWriter(str(tmp_path / "a"), "full", num_shards=2)
    writer.write_shard([("b", torch.ones(2))])
    with pytest.raises(WeightsError, match="'a' out of order"):
        writer.write_shard([("a", torch.ones(2))])
    with pytest.raises(WeightsError, match="1 of 2 shard"):
        writer.close()
    with pytest.raises(WeightsError, match="'x' has non-finite values"):
        FolderWriter(str(tmp_path / "b"), "full").write_shard([("x", torch.tensor([0.0, float("inf")]))])
    assert read_manifest(str(tmp_path / "b")) is None  # nothing claims a finished folder


def test_a_folder_without_manifest_is_checked_by_agreement_only(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(3, 4), "bias": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    meta = folder_update(str(tmp_path), version=1)
    assert meta.version.kind == "full" and meta.version.checksum == ""
    model = torch.nn.Linear(4, 3)
    report = load_update(model, meta, read_folder(str(tmp_path))[2], current_version=0)
    assert report["version"] == 1 and torch.all(model.weight == 1)


def _receiver_class():
    import ray

    from anisora_ray.weights.receiver import WeightsReceiver

    @ray.remote(num_cpus=0)
    class Receiver(WeightsReceiver):
        def __init__(self, shapes: dict):
            self.module = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(s)) for k, s in shapes.items()})

        def receiving_module(self):
            return self.module

        def state(self) -> dict:
            return {k: v.detach().clone() for k, v in self.module.items()}

        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def run(self) -> str:  # what a replica does before generating
            self.check_complete()
            return "ok"

        def fail_at_part(self, n: int, die: bool = False) -> None:  # a fault: the n-th part from now raises
            self.parts_left, self.die = n, die  # ... or the process dies there, before taking its part

        def load_part(self, version, bucket):
            self.parts_left = getattr(self, "parts_left", 0) - 1
            if self.parts_left == 0:
                if getattr(self, "die", False):
                    os._exit(1)
                if hasattr(bucket, "group"):  # a group member takes its part of the broadcast, then fails
                    list(self._weights_group.receive(bucket))
                raise RuntimeError("part 2 refused")
            return super().load_part(version, bucket)

    return Receiver


def _receivers_here_and_elsewhere(shapes: dict) -> tuple[list, list[str]]:
    """A receiver on this process's node and one on another node, and their node ids."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)
    receiver = _receiver_class()
    actors = [receiver.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(shapes)
              for node in (here, other)]
    nodes = ray.get([a.node.remote() for a in actors])
    assert nodes == [here, other]
    return actors, nodes


def test_stream_update_reaches_same_node_and_remote_replicas_verified(ray_cluster):
    """Live tensors → a replica on this node (shared-memory slots) and one on the other node (object store),
    bucket by bucket; both verify against the sender's checksum; slots are reused from refresh to refresh."""
    import ray

    from anisora_ray.weights.refresh import stream_update
    from anisora_ray.weights.shared import sender_slots
    from anisora_ray.weights.state import group_by_size

    shapes = {f"w{i}": (64, 65) for i in range(7)} | {"bias": (3,)}
    actors, nodes = _receivers_here_and_elsewhere(shapes)
    g = torch.Generator().manual_seed(0)
    live = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    meta, reports = stream_update(actors, group_by_size(sorted(live.items()), 40_000), 1, "full", nodes=nodes, window=1)
    assert meta.version.num_tensors == 8 and meta.version.checksum == tensors_checksum(sorted(live.items()))
    assert {r["received"] for r in reports} == {r["loaded"] for r in reports} == {meta.version.checksum}
    for state in ray.get([a.state.remote() for a in actors]):
        assert all(torch.equal(state[k], live[k]) for k in live)
    names = [s.name for s in sender_slots(2).segments if s is not None]
    assert len(names) == 2  # window 1: two slots, reused below
    for tensor in live.values():
        tensor.mul_(2)
    meta, _ = stream_update(actors, group_by_size(sorted(live.items()), 40_000), 2, "full", nodes=nodes, window=1)
    assert [s.name for s in sender_slots(2).segments if s is not None] == names
    assert ray.get([a.get_weights_version.remote() for a in actors]) == [2, 2]
    assert all(torch.equal(ray.get(actors[1].state.remote())[k], live[k]) for k in live)

    # a bucket with NaN after earlier buckets loaded: refused, nobody claims version 3, both refuse to run
    live["w5"][0, 0] = float("nan")
    with pytest.raises(WeightsError, match="'w5' has non-finite values"):
        stream_update(actors, group_by_size(sorted(live.items()), 40_000), 3, "full", nodes=nodes)
    assert ray.get([a.get_weights_version.remote() for a in actors]) == [2, 2]
    for actor in actors:
        with pytest.raises(ray.exceptions.RayTaskError, match="holds part of weights version 3"):
            ray.get(actor.run.remote())
    # a whole update repairs them; a stale or mixed-up stream is refused by name
    live["w5"][0, 0] = 0.0
    stream_update(actors, group_by_size(sorted(live.items()), 40_000), 4, "full", nodes=nodes)
    assert ray.get([a.run.remote() for a in actors]) == ["ok", "ok"]
    with pytest.raises(WeightsError, match="failed on 2 of 2 replica.*not newer than the loaded version 4"):
        stream_update(actors, group_by_size(sorted(live.items()), 40_000), 4, "full", nodes=nodes)
    with pytest.raises(ray.exceptions.RayTaskError, match="a part of weights version 9 arrived, but the update in progress is None"):
        ray.get(actors[0].load_part.remote(9, next(iter(pack_buckets(sorted(live.items()), 1 << 20)))))


def test_stream_update_over_a_broadcast_group_and_a_failed_member(ray_cluster):
    """transport collective: the sender and both replicas (one per node) form a gloo group of their own;
    every bucket is one broadcast, verified as by the other routes; a new group per update. A replica that
    fails mid-update breaks the group: the update fails for every member, by name, without hanging."""
    import ray

    from anisora_ray.weights.refresh import stream_update
    from anisora_ray.weights.state import group_by_size

    shapes = {f"w{i}": (64, 65) for i in range(5)} | {"bias": (3,)}
    actors, nodes = _receivers_here_and_elsewhere(shapes)
    g = torch.Generator().manual_seed(1)
    live = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for version in (1, 2):
        meta, reports = stream_update(actors, group_by_size(sorted(live.items()), 40_000), version, "full", nodes=nodes,
                                      transport="collective", window=1, timeout_s=30)
        assert meta.version.checksum == tensors_checksum(sorted(live.items()))  # gloo stages on the host: xxh3
        assert {r["received"] for r in reports} == {r["loaded"] for r in reports} == {meta.version.checksum}
        for state in ray.get([a.state.remote() for a in actors]):
            assert all(torch.equal(state[k], live[k]) for k in live)
        assert ray.get([a.in_weights_group.remote() for a in actors]) == [False, False]  # left (and its buffer) at commit
        live = {k: v * 3 for k, v in live.items()}

    # replica 1 fails on its second part (it takes no part in that broadcast): the whole group fails
    ray.get(actors[1].fail_at_part.remote(2))
    with pytest.raises(WeightsError, match=r"failed on 2 of 2 replica.*replica 0: gloo group broken by a failed replica; replica 1: .*part 2 refused"):
        stream_update(actors, group_by_size(sorted(live.items()), 40_000), 3, "full", nodes=nodes,
                      transport="collective", timeout_s=20)
    assert ray.get([a.get_weights_version.remote() for a in actors]) == [2, 2]
    stream_update(actors, group_by_size(sorted(live.items()), 40_000), 4, "full", nodes=nodes, transport="collective",
                  timeout_s=30)  # a fresh group repairs both
    assert ray.get([a.run.remote() for a in actors]) == ["ok", "ok"]


def test_a_group_member_that_dies_mid_broadcast_fails_the_update_by_name_and_fast(ray_cluster):
    """A replica process that dies before its part of a gloo broadcast (its socket closes under the sender):
    the update fails well inside the group's timeout, naming the dead replica, and no survivor moves to
    that version; a new group without the dead replica updates the survivor."""
    import ray

    from anisora_ray.weights.refresh import stream_update
    from anisora_ray.weights.state import group_by_size

    shapes = {f"w{i}": (64, 65) for i in range(5)}
    actors, nodes = _receivers_here_and_elsewhere(shapes)
    live = {k: torch.full(s, 1.0) for k, s in shapes.items()}
    stream_update(actors, group_by_size(sorted(live.items()), 40_000), 1, "full", nodes=nodes, transport="collective",
                  window=1, timeout_s=60)
    ray.get(actors[1].fail_at_part.remote(2, True))
    began = time.monotonic()
    with pytest.raises(WeightsError, match=r"weights refresh to version 2 failed on 2 of 2 replica.*replica 1: [A-Za-z]*(Died|Unavailable)"):
        stream_update(actors, group_by_size(sorted({k: v * 2 for k, v in live.items()}.items()), 40_000), 2, "full",
                      nodes=nodes, transport="collective", window=1, timeout_s=60)
    assert time.monotonic() - began < 45  # the closed connection ends it, not the 60 s group timeout
    assert ray.get(actors[0].get_weights_version.remote(), timeout=60) == 1
    with pytest.raises(ray.exceptions.RayTaskError, match="holds part of weights version 2"):
        ray.get(actors[0].run.remote(), timeout=60)
    stream_update(actors[:1], group_by_size(sorted(live.items()), 40_000), 3, "full", nodes=nodes[:1],
                  transport="collective", window=1, timeout_s=60)
    assert ray.get(actors[0].run.remote()) == "ok" and ray.get(actors[0].get_weights_version.remote()) == 3


def test_fp_checksum_is_exact_on_any_layout_and_catches_swaps_and_flips():
    """Scheme fp (the GPU routes'): integer row and column sums of the bytes, hashed with name, dtype, shape."""
    from anisora_ray.weights.state import Checksum, TensorCopier, digests, fingerprint_vector, scheme_of

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g).to(torch.bfloat16)  # 5000 int64 words: 4 rows of 1024 and a tail of 904
    assert fingerprint_vector(x).shape == (4 + 1024 + 904,)
    base = digests([("x", x)], "fp")[0]
    assert digests([("x", x.clone())], "fp")[0] == base and digests([("y", x)], "fp")[0] != base
    assert digests([("x", x.view(200, 100))], "fp")[0] != base  # shape is covered
    swapped = x.clone()
    swapped[[5, 700]] = x[[700, 5]]  # same row: only a column sum changes
    flipped = x.view(torch.int16).clone()
    flipped[19000] ^= 1  # one bit in the tail
    across = x.clone()
    across[[5, 4101]] = x[[4101, 5]]  # same column (word 1 and word 1025), other row
    assert len({base, *digests([("x", swapped), ("x", flipped.view(torch.bfloat16)), ("x", across)], "fp")}) == 4
    checksum = Checksum("fp")
    checksum.update_many([("x", x)])
    assert scheme_of(checksum.hexdigest()) == "fp" and scheme_of(Checksum().hexdigest()) == "xxh3"

    # a copier with scheme fp: one digest of the target serves as received and loaded; a cast is checked too
    targets = {"x": torch.zeros(20000, dtype=torch.bfloat16), "y": torch.zeros(7, dtype=torch.bfloat16)}
    copier = TensorCopier(targets, "fp")
    y32 = torch.randn(7, generator=g)
    copier.add([("x", x), ("y", y32)])
    report = copier.report(require_all=True)
    assert torch.equal(targets["x"], x) and torch.equal(targets["y"], y32.to(torch.bfloat16))
    sent = Checksum("fp")
    sent.update_many([("x", x), ("y", y32)])
    assert report["received"] == sent.hexdigest() and report["received"] != report["loaded"]
    with pytest.raises(WeightsError, match="update shape"):
        TensorCopier(targets, "fp").add([("x", x[:10])])


def test_folder_writer_records_the_fp_checksum_that_gpu_routes_verify_with(tmp_path):
    from anisora_ray.weights.folder import FolderWriter
    from anisora_ray.weights.state import Checksum

    tensors = [("a", torch.arange(5000, dtype=torch.float32)), ("b", torch.ones(3, 7, dtype=torch.bfloat16))]
    writer = FolderWriter(str(tmp_path / "w"), "full", fingerprint=True)
    writer.write_shard(tensors)
    manifest = writer.close()
    expected = Checksum("fp")
    expected.update_many(tensors)
    assert manifest["checksum_fp"] == expected.hexdigest() and manifest["checksum"] == tensors_checksum(tensors)
    plain = FolderWriter(str(tmp_path / "v"), "full")
    plain.write_shard(tensors)
    assert "checksum_fp" not in plain.close()


def test_write_through_writes_every_shard_whatever_the_stream_does(tmp_path):
    """The trainer's one walk (gapo.export.write_through): each bucket is written, then streamed; a stream
    that breaks off leaves the folder whole and is returned as the error; a refused write raises, and the
    source is exhausted either way (under ZeRO-3 its gathers are collectives)."""
    from anisora_ray.gapo.export import write_through
    from anisora_ray.weights.folder import FolderWriter, read_manifest, read_safetensors

    chunks = [[(f"w{i}", torch.full((4, 4), float(i)))] for i in range(4)]
    pulled = []

    def source():
        for chunk in chunks:
            pulled.append(chunk[0][0])
            yield chunk

    def broken(tee):  # a stream that takes two buckets, then fails
        next(tee)
        next(tee)
        raise WeightsError("replica 1 died")

    writer = FolderWriter(str(tmp_path / "a"), "full", num_shards=4)
    result, error = write_through(source(), writer.write_shard, broken)
    manifest = writer.close()
    assert result is None and "replica 1 died" in str(error) and pulled == ["w0", "w1", "w2", "w3"]
    assert read_manifest(str(tmp_path / "a"))["checksum"] == manifest["checksum"] == tensors_checksum(
        [c[0] for c in chunks])
    assert [name for name, _ in read_safetensors(str(tmp_path / "a"))] == ["w0", "w1", "w2", "w3"]

    streamed = []
    writer = FolderWriter(str(tmp_path / "b"), "full", num_shards=4)
    result, error = write_through(iter(chunks), writer.write_shard, lambda tee: [streamed.append(c[0][0]) for c in tee])
    assert error is None and len(result) == 4 and streamed == ["w0", "w1", "w2", "w3"]

    pulled.clear()
    chunks[1] = [("w1", torch.tensor([float("nan")]))]
    writer = FolderWriter(str(tmp_path / "c"), "full", num_shards=4)
    with pytest.raises(WeightsError, match="'w1' has non-finite values"):
        write_through(source(), writer.write_shard, lambda tee: list(tee))
    assert pulled == ["w0", "w1", "w2", "w3"]

    pulled.clear()  # the stream broke off first; a write of a bucket it never asked for fails: still exhausted
    chunks[1], chunks[2] = [("w1", torch.ones(1))], [("w2", torch.tensor([float("inf")]))]
    writer = FolderWriter(str(tmp_path / "d"), "full", num_shards=4)
    with pytest.raises(WeightsError, match="'w2' has non-finite values"):
        write_through(source(), writer.write_shard, broken)
    assert pulled == ["w0", "w1", "w2", "w3"]


def test_export_exhausts_the_gathers_when_a_shard_cannot_be_written(tmp_path, monkeypatch):
    """Under ZeRO-3 every rank walks the same gathers: rank 0's failed write must not leave the others waiting."""
    from types import SimpleNamespace

    from anisora_ray.gapo import export

    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    engine = SimpleNamespace(module=model, global_rank=0, zero_optimization_stage=lambda: 3)
    entered, real = [], export.gathered
    monkeypatch.setattr(export, "gathered", lambda tensors: (entered.append(len(tensors)), real([]))[1])  # counted
    with pytest.raises(WeightsError, match="non-finite"):
        export.export_weights(engine, str(tmp_path / "w"), None, bucket_mb=1e-4)
    assert len(entered) == len(export.plan(engine, None, 1e-4)) > 2


SLOT_SENDER = """
import sys, time, torch
from anisora_ray.weights.shared import SharedSlots
bucket, _ = SharedSlots(1).stage(0, [("w", torch.ones(8))], None, "test")
print(bucket.segment, flush=True)
time.sleep(600)
"""


def test_slots_of_a_killed_sender_are_swept_and_a_live_senders_are_kept():
    """A sender killed with its process group (as Ray kills a worker) leaves its slot in /dev/shm; the next
    sender on the node unlinks it, and never a slot whose sender is alive."""
    import signal
    import subprocess
    import sys

    from anisora_ray.weights.shared import SHM_DIR, SharedSlots, sweep_orphaned_slots

    if not os.path.isdir(SHM_DIR):
        pytest.skip(f"no {SHM_DIR} here")
    sender = subprocess.Popen([sys.executable, "-c", SLOT_SENDER], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    orphan = sender.stdout.readline().strip()
    os.killpg(sender.pid, signal.SIGKILL)  # its resource tracker too: nothing is left to unlink the slot
    sender.wait()
    assert orphan.startswith("anisora-") and os.path.exists(os.path.join(SHM_DIR, orphan))
    live = SharedSlots(1)
    try:
        mine, _ = live.stage(0, [("w", torch.zeros(8))], None, "test")
        assert not os.path.exists(os.path.join(SHM_DIR, orphan))  # creating slots swept it
        assert mine.segment not in sweep_orphaned_slots() and os.path.exists(os.path.join(SHM_DIR, mine.segment))
    finally:
        live.close()
    assert not os.path.exists(os.path.join(SHM_DIR, mine.segment))


def test_refresh_floor_benchmark_delivers_verified_weights_by_both_designs():
    """benchmarks/refresh_floor.py (no Ray): every replica's checksum equals the sender's, or it fails."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "refresh_floor.py"), "--mb", "8",
                           "--bucket-mb", "2", "--repeats", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pipes (the project's data path)" in done.stdout and "direct (one copy fewer)" in done.stdout


def test_update_hooks_run_in_pairs_and_a_failed_after_update_blocks_the_model():
    """``before_update``/``after_update`` (a quantized replica's dequantize/quantize) run around every update, also
    one refused before anything is copied; an ``after_update`` that fails leaves the model blocked, and so does a
    streamed update begun (layers dequantized) that stops before its first part."""
    from anisora_ray.weights.receiver import WeightsReceiver
    from anisora_ray.weights.state import pack_buckets, tensors_checksum
    from anisora_ray.weights.update import UpdateMeta

    class Receiver(WeightsReceiver):
        def __init__(self):
            self.module, self.calls, self.fail_after = torch.nn.Linear(4, 3), [], False

        def receiving_module(self):
            return self.module

        def before_update(self, kind):
            self.calls.append(("before", kind))
            return True  # dequantized

        def after_update(self, kind):
            self.calls.append(("after", kind))
            if self.fail_after:
                raise WeightsError("re-quantization failed")

    def update(version: int):
        tensors = [("bias", torch.full((3,), float(version))), ("weight", torch.full((3, 4), float(version)))]
        record = WeightsVersion(version=version, kind="full", uri="mem://", checksum=tensors_checksum(tensors),
                                num_bytes=0, num_tensors=2)
        return UpdateMeta(record), list(pack_buckets(tensors, 1 << 20))

    r = Receiver()
    r.load_weights(*update(1))
    assert r.calls == [("before", "full"), ("after", "full")] and r.weights_version == 1
    with pytest.raises(WeightsError, match="not newer"):
        r.load_weights(*update(1))
    assert r.calls[2:] == [("before", "full"), ("after", "full")]  # refused: restored before anything was copied
    r.check_complete()
    r.fail_after = True
    with pytest.raises(WeightsError, match="re-quantization failed"):
        r.load_weights(*update(2))
    with pytest.raises(WeightsError, match="holds part of weights version 2"):
        r.check_complete()  # blocked: not generating with half-settled weights
    assert r.weights_version == 1
    r.fail_after = False
    r.load_weights(*update(3))
    r.check_complete()
    assert r.weights_version == 3 and torch.all(r.module.weight == 3)
    r.begin_update(4, "full")  # the sender dies before the first part: the layers stay dequantized
    with pytest.raises(WeightsError, match="holds part of weights version 4"):
        r.check_complete()
    meta, buckets = update(5)  # the fallback refresh from storage (here: a whole update) replaces it
    r.load_weights(meta, buckets)
    r.check_complete()
    assert r.weights_version == 5 and r.calls[-2:] == [("before", "full"), ("after", "full")]


def test_a_lora_update_does_not_unblock_a_base_left_half_way_by_a_full_update(load_transformer):
    """A full update that stops half-way leaves the base a mix of versions; a LoRA update only touches the adapter,
    so it is refused and the replica stays blocked until a whole full update replaces the base."""
    from anisora_ray.weights.receiver import WeightsReceiver

    class Receiver(WeightsReceiver):
        def __init__(self):
            self.module = load_transformer()

        def receiving_module(self):
            return self.module

    r = Receiver()
    base = sorted((k, torch.randn_like(v)) for k, v in r.module.state_dict().items())
    r.begin_update(1, "full")
    r.load_part(1, next(iter(pack_buckets(base[:3], 1 << 30))))  # three tensors in, then the sender is gone
    with pytest.raises(WeightsError, match="holds part of weights version 1"):
        r.check_complete()
    cfg = LoraConfig(r=2, alpha=4, target_modules=["to_q", "to_v"])
    other = load_transformer()
    lora_io.add_adapter(other, cfg)
    adapter = sorted((k, torch.randn_like(v)) for k, v in lora_io.adapter_state(other).items())
    r.begin_update(2, "full")  # a new full update begins ... and its sender is gone before its first part
    with pytest.raises(WeightsError, match="holds part of weights version 2"):
        r.check_complete()  # still blocked: beginning an update does not undo the mix the last one left
    with pytest.raises(WeightsError, match=r"base holds part of a full update \(version 2 or before\)"):
        r.load_weights(_meta(3, adapter, "lora", cfg.model_dump()), pack_buckets(adapter, 1 << 20))
    with pytest.raises(WeightsError, match="holds part of weights version 2"):
        r.check_complete()  # still blocked: the base is a mix
    assert r.weights_version == 0
    r.load_weights(_meta(4, base), pack_buckets(base, 1 << 20))  # a whole full update replaces the base
    r.check_complete()
    r.load_weights(_meta(5, adapter, "lora", cfg.model_dump()), pack_buckets(adapter, 1 << 20))
    r.check_complete()
    assert r.weights_version == 5
    assert all(torch.equal(lora_io.adapter_state(r.module)[k], t) for k, t in adapter)
    r.load_weights(_meta(6, base), pack_buckets(base, 1 << 20))  # full weights: the adapter is switched off
    r.check_complete()
    r.begin_update(7, "lora", cfg.model_dump())  # switches version 5's adapter back on over version 6's base ...
    with pytest.raises(WeightsError, match="holds part of weights version 7"):
        r.check_complete()  # ... so it is blocked until version 7's adapter is in, though no part arrived
