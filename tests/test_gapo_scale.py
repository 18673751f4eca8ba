"""GAPO with the settings of the real configuration, on tiny models (real Ray Train + DeepSpeed on CPU):
ZeRO-3 with parameters partitioned as at 5B (full and LoRA) exports the trainer's weights and the
replicas load them bit for bit; ``gapo.steps`` counts optimizer updates under gradient accumulation;
a SIGKILLed training worker is restarted from its last checkpoint."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest
import torch

from tests.conftest import REPO

# The shipped ZeRO-3 JSON (bf16, optimizer offload, 4 micro-batches per update); with the default
# persistence threshold a tiny model's parameters are never partitioned, so ZeRO-3 would not be exercised.
ZERO3 = ("gapo.deepspeed_config=configs/deepspeed/zero3_offload.json",
         "gapo.deepspeed_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}",
         "gapo.refresh_bucket_mb=0.02")  # several gather buckets and shards even at tiny size


def history(cfg, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    from anisora_ray.tracking import tracking_uri

    return {m.step: m.value for m in MlflowClient(tracking_uri(cfg)).get_metric_history(run_id, key)}


def _fp32_from_checkpoint(checkpoint: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights DeepSpeed's own tool rebuilds from a (partitioned) ZeRO checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag="ds")


def _replicas_load(cfg, uri: str, manifest_checksum: str, dtype=torch.float32):
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.weights.folder import read_safetensors
    from anisora_ray.weights.lora import PREFIX
    from anisora_ray.weights.state import tensors_checksum

    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        record, reports = replicas.refresh_from(uri)
        assert record.version == 1 and replicas.weights_versions() == [1, 1]
        assert {r["received"] for r in reports} == {manifest_checksum}
        # each replica's transformer holds the exported tensors (in its own dtype) bit for bit
        expected = tensors_checksum((n.removeprefix(PREFIX), t.to(dtype)) for n, t in read_safetensors(uri))
        assert {s["checksum"] for s in replicas.weights_states()} == {expected}
    finally:
        replicas.shutdown()


def test_zero3_full_exports_the_trainers_weights_counts_updates_and_replicas_load_them(gapo_pairs):
    from anisora_ray.gapo.trainer import deepspeed_config, train_gapo
    from anisora_ray.weights.folder import read_manifest, read_safetensors

    cfg = gapo_pairs["make"](*ZERO3, "gapo.steps=6", "gapo.checkpoint_every=3", "gapo.learning_rate=1e-3",
                             "generator.replicas=2", "generator.candidates_per_prompt=1")
    result = train_gapo(cfg, gapo_pairs["table"], str(gapo_pairs["root"] / "zero3-full"), root=REPO, run_name="zero3")
    run = result["mlflow_run_id"]
    # gapo.steps = optimizer updates: 6 updates of 4 micro-batches; LR, checkpoints and logs at update boundaries
    assert history(cfg, run, "optimizer_steps") == {k: float(k) for k in range(1, 7)}
    assert history(cfg, run, "micro_batches")[6] == 24
    warmup = deepspeed_config(cfg, REPO)["scheduler"]["params"]["warmup_num_steps"]  # counted in updates
    lr = history(cfg, run, "lr")  # the rate each update stepped at: WarmupLR's log warm-up (its first two at 0), then flat
    assert lr == pytest.approx({k: 1e-3 * min(1.0, math.log(max(k - 1, 1)) / math.log(warmup)) for k in range(1, 7)},
                               rel=1e-6, abs=1e-12)
    assert sorted(result["checkpoints"]) == [3, 6]

    manifest = read_manifest(result["weights_uri"])
    assert manifest["kind"] == "full" and manifest["step"] == 6 and len(manifest["files"]) > 1  # gathered shard by shard
    exported = dict(read_safetensors(result["weights_uri"]))
    master = _fp32_from_checkpoint(result["checkpoint_uri"])
    assert set(master) <= set(exported)
    for name, tensor in master.items():  # the bf16 weights are the final fp32 master weights, rounded
        assert exported[name].shape == tensor.shape, name  # (buffers such as pos_embedding stay fp32)
        assert torch.equal(exported[name], tensor.to(exported[name].dtype)), name
    assert sum(t.dtype == torch.bfloat16 for t in exported.values()) > len(exported) // 2
    base = {n: t for n, t in read_safetensors(os.path.join(_pretrained(cfg), "transformer"))}
    assert any(not torch.equal(exported[n], base[n].to(torch.bfloat16)) for n in master)  # training moved them
    _replicas_load(cfg, result["weights_uri"], manifest["checksum"])


def _pretrained(cfg) -> str:
    from anisora_ray.models.pipeline import resolve_pretrained

    return resolve_pretrained(cfg.model, cfg.generator)


def test_zero3_lora_exports_whole_adapter_tensors_and_replicas_load_them(gapo_pairs):
    import pyarrow as pa

    from anisora_ray.gapo.trainer import train_gapo
    from anisora_ray.io import fs
    from anisora_ray.types import QuarantineRecord
    from anisora_ray.weights.folder import read_manifest, read_safetensors

    cfg = gapo_pairs["make"](*ZERO3, "gapo.steps=3", "gapo.lora.r=4", "gapo.lora.alpha=8", "gapo.learning_rate=1e-2",
                             "generator.replicas=2", "generator.candidates_per_prompt=1")
    table = gapo_pairs["table"]  # plus a pair whose winner video is gone: quarantined, training goes on
    lost = str(gapo_pairs["root"] / "gone" / "winner.mp4")
    broken = {**table.slice(0, 1).to_pylist()[0], "prompt_id": "zz-broken", "winner_video_uri": lost}
    table = pa.concat_tables([table, pa.Table.from_pylist([broken], schema=table.schema)])
    result = train_gapo(cfg, table, str(gapo_pairs["root"] / "zero3-lora"), root=REPO, run_name="zero3-lora")
    assert result["quarantined_pairs"] == 1
    records = QuarantineRecord.from_table(pa.concat_tables(
        [fs.read_table(fs.join(result["quarantine_uri"], n)) for n in sorted(os.listdir(result["quarantine_uri"]))]))
    assert [(q.item_id, q.uri, q.stage) for q in records] == [("zz-broken", lost, "gapo")] and records[0].reason
    manifest = read_manifest(result["weights_uri"])
    adapter = dict(read_safetensors(result["weights_uri"]))
    assert manifest["kind"] == "lora" and manifest["num_tensors"] == len(adapter) > 0
    r, dim = 4, 32  # tiny transformer: 2 heads x 16
    for name, tensor in adapter.items():  # whole tensors, not the empty partitions ZeRO-3 holds per rank
        assert tensor.shape == ((r, dim) if ".lora_A." in name else (dim, r)), (name, tensor.shape)
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if ".lora_B." in n)  # B starts at zero: it moved
    _replicas_load(cfg, result["weights_uri"], manifest["checksum"])


def _training_worker_pids() -> list[int]:
    from ray._private.state import actors  # the GCS actor table (the state API needs a dashboard)

    return sorted(a["Pid"] for a in actors().values()
                  if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a["Pid"])


def _registered_steps(run_dir) -> list[int]:
    """Updates of the checkpoints Ray Train has registered (its snapshot in the run's storage)."""
    import json

    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            return [int(r["metrics"]["step"]) for r in json.load(f)["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def _kill_a_worker_after(cfg, run_id: str, run_dir, killed: list, timeout_s: float = 300) -> None:
    """SIGKILL a training worker once a checkpoint is registered and training has gone past it."""
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            logged, registered = history(cfg, run_id, "loss"), _registered_steps(run_dir)
            if logged and registered and max(logged) > max(registered):
                pids = _training_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append((max(logged), pids[-1]))
                    return
            time.sleep(0.1)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        killed.append(exc)


def test_a_sigkilled_training_worker_restarts_from_the_last_checkpoint(gapo_pairs):
    """... and refreshes the replicas on from there: the updates it replays were streamed before the kill (every
    update refreshes here), and a replica refuses a version it holds, so they are not sent again (before, every
    restart failed at its first replayed refresh)."""
    from anisora_ray.gapo.trainer import train_gapo
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.tracking import new_run

    steps = 40
    cfg = gapo_pairs["make"]("gapo.deepspeed_config=configs/deepspeed/zero2_bf16.json", f"gapo.steps={steps}",
                             "gapo.checkpoint_every=5", "gapo.max_failures=2", "gapo.learning_rate=1e-3",
                             "gapo.refresh_every=1", "generator.replicas=1", "generator.candidates_per_prompt=1")
    run_id = new_run(cfg, "killed-worker")
    killed: list = []
    run_dir = gapo_pairs["root"] / "out" / "ray-train" / "killed-worker"
    killer = threading.Thread(target=_kill_a_worker_after, args=(cfg, run_id, run_dir, killed), daemon=True)
    killer.start()
    replicas = GeneratorReplicas(cfg, _pretrained(cfg))
    try:
        result = train_gapo(cfg, gapo_pairs["table"], str(gapo_pairs["root"] / "killed"), root=REPO,
                            run_name="killed-worker", storage_name="killed-worker", mlflow_run_id=run_id,
                            replicas=replicas.actors, replicas_version=0)
        assert replicas.weights_versions() == [steps - 1]  # refreshed at every update but the last, across the restart
    finally:
        replicas.shutdown()
    killer.join(timeout=5)
    assert killed and isinstance(killed[0], tuple), f"no training worker was killed: {killed}"
    assert killed[0][0] < steps, f"the worker was killed only after the last update ({killed})"
    assert result["step"] == steps and result["optimizer_steps"] == steps
    assert 5 <= result["resumed_from_update"] < steps  # the restarted group began at a checkpoint, not at 0
    losses = history(cfg, run_id, "loss")
    assert sorted(losses) == list(range(1, steps + 1)) and all(math.isfinite(v) for v in losses.values())
    from mlflow.tracking import MlflowClient

    from anisora_ray.tracking import tracking_uri

    logged = MlflowClient(tracking_uri(cfg)).get_metric_history(run_id, "loss")
    assert len(logged) == steps  # no update logged twice across the restart


def test_training_goes_on_when_a_live_refresh_fails_on_a_replica(gapo_pairs):
    """A replica that dies during training fails the periodic refreshes it is sent (on rank 0 alone, after the
    collective gathers): they are said and training goes on (before, rank 0 raised and the attempt was lost, and
    every restart met the same dead replica), the weights version is logged only where the refresh landed."""
    import ray

    from anisora_ray.gapo.trainer import train_gapo
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.tracking import new_run

    cfg = gapo_pairs["make"]("gapo.steps=3", "gapo.refresh_every=1", "gapo.max_failures=0", "generator.replicas=2",
                             "generator.candidates_per_prompt=1", "gapo.final_checkpoint=false", "gapo.checkpoint_every=0")
    run_id = new_run(cfg, "dead-replica")
    replicas = GeneratorReplicas(cfg, _pretrained(cfg))
    try:
        ray.kill(replicas.actors[1], no_restart=True)
        result = train_gapo(cfg, gapo_pairs["table"], str(gapo_pairs["root"] / "dead-replica"), root=REPO,
                            run_name="dead-replica", storage_name="dead-replica", mlflow_run_id=run_id,
                            replicas=replicas.actors, replicas_version=0)
    finally:
        replicas.shutdown()
    assert result["step"] == 3 and result["optimizer_steps"] == 3
    assert sorted(history(cfg, run_id, "loss")) == [1, 2, 3]
    # gapo.final_checkpoint=false: the last update's metrics come back without its DeepSpeed state being written
    assert result["checkpoint_uri"] == "" and result["checkpoints"] == {}
    run_dir = gapo_pairs["root"] / "out" / "ray-train" / "dead-replica"
    assert run_dir.is_dir() and not [p for p in run_dir.rglob("checkpoint_*") if p.is_dir()]
    assert history(cfg, run_id, "weights_version") == {}  # neither refresh reached every replica
