"""GAPO with Ray Train + DeepSpeed ZeRO-2 on CPU (gloo), two workers, on pairs from the real pairs pipeline;
then the trained weights refresh two generator replicas."""

from __future__ import annotations

import math
import os

import pytest

from tests.conftest import REPO, ControllerEnv, preemption_watchers

STEPS = 6


@pytest.fixture(scope="module")
def trained(gapo_pairs):
    """One full fine-tune of STEPS steps with a checkpoint every 3, on pairs from `run_pairs`."""
    from anisora_ray.gapo.trainer import train_gapo

    cfg = gapo_pairs["make"](f"gapo.steps={STEPS}", "gapo.checkpoint_every=3", "gapo.memory_per_worker_gib=0.25")
    with LeastFreeMemory() as least:
        result = train_gapo(cfg, gapo_pairs["table"], str(gapo_pairs["root"] / "weights"), root=REPO, run_name="full")
    return {**gapo_pairs, "cfg": cfg, "result": result, "least_free_memory": least}


class LeastFreeMemory(dict):
    """The cluster's ``memory`` resource while a block runs: ``total``, ``before`` (free) and ``least`` (free)."""

    def __enter__(self):
        import threading

        import ray

        self.update(total=ray.cluster_resources()["memory"], before=ray.available_resources().get("memory", 0.0))
        self["least"] = self["before"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        import ray

        while not self._stop.wait(0.2):
            self["least"] = min(self["least"], ray.available_resources().get("memory", 0.0))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def history(cfg, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    from anisora_ray.tracking import tracking_uri

    return {m.step: m.value for m in MlflowClient(tracking_uri(cfg)).get_metric_history(run_id, key)}


def test_two_worker_zero2_run_logs_every_step_and_the_loss_falls(trained):
    from safetensors.torch import load_file

    cfg, result = trained["cfg"], trained["result"]
    assert result["step"] == STEPS and result["kind"] == "full" and sorted(result["checkpoints"]) == [3, 6]
    memory = trained["least_free_memory"]  # gapo.memory_per_worker_gib: Ray held 0.25 GiB for each of the 2 workers
    assert memory["before"] == memory["total"] and memory["least"] <= memory["total"] - 2 * 2**28, memory
    losses = history(cfg, result["mlflow_run_id"], "loss")
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    first, last = (losses[1] + losses[2]) / 2, (losses[STEPS - 1] + losses[STEPS]) / 2
    assert last < first, losses
    for key in ("dpo", "gain", "implicit_accuracy", "grad_norm", "lr", "step_seconds"):
        values = history(cfg, result["mlflow_run_id"], key)
        assert len(values) == STEPS and all(math.isfinite(v) for v in values.values()), key
    misses = history(cfg, result["mlflow_run_id"], "latent_cache_misses")  # all encoded up front, before update 1
    hits = history(cfg, result["mlflow_run_id"], "latent_cache_hits")
    assert misses[1] == misses[STEPS] and hits[1] == hits[STEPS] and misses[1] + hits[1] > 0
    assert history(cfg, result["mlflow_run_id"], "encoder_loads")[STEPS] == (1 if misses[1] else 0)
    weights = load_file(os.path.join(result["weights_uri"], "diffusion_pytorch_model.safetensors"))
    assert weights and all(t.isfinite().all() for t in weights.values())
    assert os.path.isfile(os.path.join(result["weights_uri"], "config.json"))


def test_resume_from_a_checkpoint_continues_exactly(trained):
    from anisora_ray.gapo.trainer import train_gapo

    cfg, result = trained["cfg"], trained["result"]
    watchers = preemption_watchers()
    resumed = train_gapo(cfg, trained["table"], str(trained["root"] / "resumed"), root=REPO,
                         resume_from=result["checkpoints"][3], run_name="resumed")
    assert resumed["step"] == STEPS
    assert cfg.ray.preemption_watcher is False and preemption_watchers() == watchers  # off in configs/local.yaml
    before, after = history(cfg, result["mlflow_run_id"], "loss"), history(cfg, resumed["mlflow_run_id"], "loss")
    assert sorted(after) == [4, 5, 6]  # steps 1-3 were restored, not redone
    assert history(cfg, resumed["mlflow_run_id"], "encoder_loads")[6] == 0  # every latent came from the cache
    assert history(cfg, resumed["mlflow_run_id"], "latent_cache_hits")[6] > 0
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(before[step], rel=1e-5, abs=1e-7), (step, before, after)


def test_a_worker_group_failing_the_same_way_at_the_same_update_is_not_restarted_forever(trained, tmp_path):
    """``gapo.max_failures=-1`` (an unattended run) with a deterministic error: a corrupt folder to start from failed
    every restart the same way, without end. ``gapo.same_failure_limit`` ends the fit at the second such failure."""
    import shutil

    from anisora_ray.gapo.failures import RepeatedFailureError
    from anisora_ray.gapo.trainer import train_gapo

    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained["result"]["weights_uri"], corrupt)
    shard = next(corrupt.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    cfg = trained["make"]("gapo.steps=2", "gapo.max_failures=-1", "gapo.same_failure_limit=2")
    with pytest.raises(RepeatedFailureError, match=r"failed 2 times in a row before any checkpoint .* "
                                                   r"WeightsError: cannot read weights file .*corrupt"):
        train_gapo(cfg, trained["table"], str(tmp_path / "out"), root=REPO, init_uri=str(corrupt), run_name="corrupt")


def test_the_stop_counts_one_error_at_one_update_and_leaves_dead_processes_to_max_failures():
    """``RepeatedFailureStop`` in Ray Train's controller: only the same error (numbers aside) at the same update, in
    attempts one after the other, counts; a new update reported or a process that died starts the count again."""
    from ray.exceptions import RayError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from anisora_ray.gapo.failures import RepeatedFailureError, RepeatedFailureStop

    def fail(stop, *errors):
        stop.after_exception(None, dict(enumerate(errors)))

    stop = RepeatedFailureStop(3)
    fail(stop, ValueError("pair 7 at 0x7f00 cannot train"))
    fail(stop, ValueError("pair 7 at 0x7f9a cannot train"), RuntimeError("gloo: connection reset by [10.0.0.2]:4411"))
    stop.after_report(None, [{"step": 4}, {"step": 4}], None)  # progress: the next failure is a new streak
    fail(stop, ValueError("pair 7 at 0x7f00 cannot train"))
    fail(stop, ValueError("pair 8 cannot train"), RuntimeError("gloo: connection reset by [10.0.0.3]:5123"))
    fail(stop, RayError("the actor died"), RuntimeError("gloo: connection reset by [10.0.0.3]:5123"))  # left to Ray
    for _ in range(3):  # a dead worker as Ray Train's controller hands it over (a preemption, an OOM kill): not counted
        fail(stop, WorkerHealthCheckFailedError("The actor experienced an error before finishing this task.",
                                                RayError("the actor died")), RuntimeError("nccl: remote process exited"))
    fail(stop, RuntimeError("gloo: connection reset by [10.0.0.3]:6000"))
    fail(stop, RuntimeError("gloo: connection reset by [10.0.0.4]:6001"))
    with pytest.raises(RepeatedFailureError, match=r"3 times in a row since its checkpoint of update 4 .*rank 1: "
                                                   r"RuntimeError: gloo"):
        fail(stop, TypeError("another"), RuntimeError("gloo: connection reset by [10.0.0.1]:7000"))
    off = RepeatedFailureStop(0)
    for _ in range(5):
        fail(off, ValueError("same"))


def test_lora_trains_only_the_adapter(trained):
    from anisora_ray.gapo.trainer import train_gapo
    from anisora_ray.weights.folder import MANIFEST, read_safetensors
    from anisora_ray.weights.lora import CONFIG_NAME, WEIGHTS_NAME

    # configs/local.yaml turns Ray Train's preemption watcher off (test_resume_...: none started); on here
    before = preemption_watchers()
    cfg = trained["make"]("gapo.steps=4", "gapo.lora.r=4", "gapo.lora.alpha=8", "gapo.learning_rate=1e-2",
                          "ray.preemption_watcher=true", "ray.train_poll_s=0.3")
    keys = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    with ControllerEnv(keys) as controllers:
        result = train_gapo(cfg, trained["table"], str(trained["root"] / "adapter"), root=REPO, run_name="lora")
    assert preemption_watchers() == before + 1
    # ray.train_poll_s reached the fit's controller, which polls its workers (and takes their reports) that often
    assert list(controllers.values()) == [dict(zip(keys, ("1", "0.3")))], controllers
    assert not any(key in os.environ for key in keys)  # set for the fit only
    assert result["kind"] == "lora"
    assert sorted(os.listdir(result["weights_uri"])) == sorted([CONFIG_NAME, WEIGHTS_NAME, MANIFEST])
    tensors = dict(read_safetensors(result["weights_uri"]))
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if ".lora_B." in k)  # B starts at zero: it moved
    losses = history(cfg, result["mlflow_run_id"], "loss")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses.values())
    assert (losses[3] + losses[4]) < (losses[1] + losses[2]), losses
    trained["adapter_uri"] = result["weights_uri"]


def test_refresh_reaches_both_replicas_and_changes_their_videos(trained):
    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.errors import WeightsError
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.generation.seeding import build_requests
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.weights.refresh import publish

    cfg = trained["make"]("generator.replicas=2", "generator.candidates_per_prompt=1")
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        requests = build_requests(read_manifest(trained["manifest"])[:1], cfg)
        out = str(trained["root"] / "videos")

        def videos(tag):  # the same request on each replica, one after the other
            return [r.generate.remote(requests, f"{out}/{tag}{i}") for i, r in enumerate(replicas.actors)]

        import ray

        before = [c[0][0] for c in ray.get(videos("v0-"))]
        version, reports = replicas.refresh_from(trained["result"]["weights_uri"])
        assert version.version == 1 and version.kind == "full" and replicas.weights_versions() == [1, 1]
        assert {r["loaded"] for r in reports} == {reports[0]["loaded"]} and reports[0]["received"] == version.checksum
        after = [c[0][0] for c in ray.get(videos("v1-"))]
        assert all(a.weights_version == 1 for a in after)
        assert before[0].frames_sha256 == before[1].frames_sha256  # same weights, same seed
        assert after[0].frames_sha256 == after[1].frames_sha256
        assert after[0].frames_sha256 != before[0].frames_sha256  # the trained weights generate differently

        if "adapter_uri" in trained:  # LoRA: only the adapter moves
            lora_version, _ = replicas.refresh_from(trained["adapter_uri"])
            assert lora_version.kind == "lora" and replicas.weights_versions() == [2, 2]
            assert lora_version.num_bytes * 20 < version.num_bytes
            with_adapter = [c[0][0] for c in ray.get(videos("v2-"))]
            assert with_adapter[0].frames_sha256 == with_adapter[1].frames_sha256 != before[0].frames_sha256
            replicas.refresh_from(trained["result"]["weights_uri"])  # full weights again: the adapter is off
            again = [c[0][0] for c in ray.get(videos("v3-"))]
            assert again[0].frames_sha256 == again[1].frames_sha256 == after[0].frames_sha256

        stale = publish(trained["result"]["weights_uri"], version=max(replicas.weights_versions()))
        with pytest.raises(WeightsError, match="failed on 2 of 2 replica"):
            replicas.refresh(stale)
        current = replicas.weights_versions()
        corrupt = publish(trained["result"]["weights_uri"], version=current[0] + 1)
        object.__setattr__(corrupt.meta.version, "checksum", "0" * 64)
        with pytest.raises(WeightsError, match="received checksum"):
            replicas.refresh(corrupt)
        assert replicas.weights_versions() == current  # nobody claims the version it could not verify
    finally:
        replicas.shutdown()


def test_a_missing_deepspeed_config_is_named(make_config):
    from anisora_ray.errors import ConfigError
    from anisora_ray.gapo.trainer import deepspeed_config

    cfg = make_config("gapo.deepspeed_config=configs/deepspeed/zero9.json", "gapo.pairs_per_step=2")
    with pytest.raises(ConfigError, match="gapo.deepspeed_config = 'configs/deepspeed/zero9.json'"):
        deepspeed_config(cfg, REPO)
    ds = deepspeed_config(make_config("gapo.pairs_per_step=2", "gapo.learning_rate=0.5"), REPO)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no op compile
    assert ds["optimizer"]["params"]["lr"] == 0.5 and ds["scheduler"]["params"]["warmup_max_lr"] == 0.5


def test_a_fit_whose_every_update_the_scheduler_runs_at_lr_0_is_said(make_config, caplog):
    """The shipped WarmupLR JSONs start at warmup_min_lr 0: DeepSpeed steps a fit's first two updates at lr 0, so
    ``train --set gapo.steps=2`` wrote the base weights back without a word. Counted with DeepSpeed's own scheduler."""
    import logging

    from anisora_ray.gapo.engine import deepspeed_config, still_updates

    for name in ("zero2", "zero2_bf16", "zero3_offload"):
        cfg = make_config(f"gapo.deepspeed_config=configs/deepspeed/{name}.json")
        assert still_updates(deepspeed_config(cfg, REPO), 30) == 2, name
    with caplog.at_level(logging.INFO, logger="anisora_ray.gapo.engine"):
        deepspeed_config(make_config("gapo.steps=2"), REPO)
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "first 2 of a fit's 2 update(s) at learning rate 0: this fit will not change the weights" in caplog.text
        caplog.clear()
        deepspeed_config(make_config("gapo.steps=5"), REPO)
        assert [r.levelname for r in caplog.records] == ["INFO"] and "first 2 of a fit's 5" in caplog.text
    warm = make_config('gapo.deepspeed_overrides={"scheduler": {"params": {"warmup_min_lr": 1e-6}}}')
    assert still_updates(deepspeed_config(warm, REPO), 30) == 0


def test_deepspeed_overrides_that_a_gapo_key_would_overwrite_are_refused(make_config):
    """They were dropped without a word: the micro batch is gapo.pairs_per_step; an lr beside gapo.learning_rate is
    replaced by it; an optimizer lr alone is not what WarmupLR steps to (its warmup_max_lr is)."""
    from anisora_ray.errors import ConfigError
    from anisora_ray.gapo.trainer import deepspeed_config

    for overrides, said in (
            (["gapo.deepspeed_overrides.train_micro_batch_size_per_gpu=4"], "gapo.pairs_per_step sets the micro batch"),
            (["gapo.learning_rate=1e-4", "gapo.deepspeed_overrides.optimizer.params.lr=5e-5"],
             "gapo.learning_rate \\(0.0001\\) replaces"),
            (["gapo.learning_rate=null", "gapo.deepspeed_overrides.optimizer.params.lr=5e-5"],
             "optimizer lr \\(5e-05\\) is not its scheduler's warmup_max_lr \\(0.0001\\)")):
        with pytest.raises(ConfigError, match=said):
            deepspeed_config(make_config(*overrides), REPO)
    both = ["gapo.learning_rate=null", "gapo.deepspeed_overrides={optimizer: {params: {lr: 5e-5}}, scheduler: {params: "
            "{warmup_max_lr: 5e-5}}}"]
    assert deepspeed_config(make_config(*both), REPO)["scheduler"]["params"]["warmup_max_lr"] == 5e-5


def test_gapo_compile_is_refused_under_zero3_naming_the_json(make_config):
    from anisora_ray.errors import ConfigError
    from anisora_ray.gapo.trainer import deepspeed_config

    assert deepspeed_config(make_config("gapo.compile=true"), REPO)["zero_optimization"]["stage"] == 2
    cfg = make_config("gapo.compile=true", "gapo.deepspeed_config=configs/deepspeed/zero3_offload.json")
    with pytest.raises(ConfigError, match="gapo.compile needs ZeRO-1/2, .*zero3_offload.json is ZeRO-3"):
        deepspeed_config(cfg, REPO)
