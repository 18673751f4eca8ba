"""Training sections: GAPO (``anisora-ray train``) and reward heads (``anisora-ray train-reward``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from anisora_ray.config.base import LoraConfig, Section, ray_request
from anisora_ray.types import DIMENSIONS


class RewardTrainingConfig(Section):
    """``anisora-ray train-reward``: fit one dimension's regression head on human ratings."""

    dimension: str = "visual_appeal"
    label_column: str | None = None  # default: the dimension's name
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    epochs: int = Field(default=200, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    hidden: int = Field(default=256, ge=1)
    num_workers: int = Field(default=1, ge=1)  # Ray Train workers (data-parallel)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    seed: int = 0
    lora: LoraConfig = LoraConfig()

    @field_validator("dimension")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in DIMENSIONS:
            raise ValueError(f"unknown dimension {value!r}; expected one of {DIMENSIONS}")
        return value


class GapoConfig(Section):
    """``anisora-ray train``: GAPO (or the Diffusion-DPO / SFT baselines) with Ray Train + DeepSpeed."""

    loss: Literal["gapo", "dpo", "sft"] = "gapo"  # dpo: gain off (ablation); sft: fit the winners only
    beta: float = Field(default=5000.0, gt=0)
    alpha: float = Field(default=2.0, gt=1)  # the gain α^r̂w − α^r̂l: 1 makes it 0, below 1 it prefers the loser
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # ZeRO stage, optimizer, LR schedule, clipping, precision
    deepspeed_overrides: dict[str, Any] = Field(default_factory=dict)  # nested keys laid over that JSON
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, gt=0)  # with use_gpu; a fraction shares a GPU (configs/*_1gpu.yaml)
    memory_per_worker_gib: float = Field(default=0.0, ge=0)  # host memory Ray reserves per worker (ZeRO offload's state)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # torch.distributed; auto: NCCL with use_gpu, else gloo
    steps: int = Field(default=10, ge=1)  # optimizer updates per training run (each: the JSON's gradient_accumulation_steps micro-batches)
    pairs_per_step: int = Field(default=1, ge=1)  # per worker (= DeepSpeed micro batch)
    gradient_checkpointing: bool = False
    # Regional torch.compile of the policy's transformer blocks (and of a `copy` reference); ZeRO-1/2 only:
    # ZeRO-3 gathers parameters in module hooks, which the compiled blocks cannot hold (docs/performance.md).
    compile: bool = False
    learning_rate: float | None = Field(default=None, gt=0)  # overrides the DeepSpeed JSON's optimizer/scheduler lr
    lora: LoraConfig = LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"])  # r > 0: train an adapter
    # Full fine-tuning's frozen reference: "partitioned" = a ZeRO-3 inference engine whose parameters are
    # sliced across the workers (whatever the training stage); "copy" = a frozen copy on every worker.
    reference: Literal["partitioned", "copy"] = "partitioned"
    # Full fine-tuning's reference weights from round 2 on: "base" = the pretrained model every round (the paper
    # aligns against the base), "previous_round" = the weights the round starts from (a trust region per round).
    # LoRA's reference is always the base (its own transformer with the adapter off).
    reference_weights: Literal["base", "previous_round"] = "base"
    reference_offload: bool = False  # partitioned reference: parameters on the host (ZeRO-3 offload_param)
    checkpoint_every: int = Field(default=0, ge=0)  # optimizer steps between checkpoints (0: the last step only)
    checkpoints_to_keep: int = Field(default=2, ge=1)
    # the last update's DeepSpeed state as a checkpoint too (a run started again after its end restarts there, not at
    # the last checkpoint_every); false saves writing it: full fine-tuning at 5B, ~70 GB a round that nothing reads
    final_checkpoint: bool = True
    cache_latents: bool = True  # VAE / text-encoder outputs cached under <output_dir>/latent-cache
    refresh_replicas: bool = True  # `anisora-ray train`: load the result into the generator replicas
    refresh_bucket_mb: float = Field(default=256.0, gt=0)  # bucket of a weight transfer: object-store bucket, shard, ZeRO-3 gather
    max_failures: int = Field(default=2, ge=-1)  # Ray Train restarts of a failed worker group from its last checkpoint (-1: no limit)
    # A worker group that failed this many times in a row with the same error, no checkpoint reported between, is not
    # restarted again, whatever max_failures (a deterministic error: each restart repeats it; gapo/failures.py); 0: off
    same_failure_limit: int = Field(default=3, ge=0)
    refresh_every: int = Field(default=0, ge=0)  # > 0: also refresh live replicas every N steps during training
    seed: int = 0
    # The timesteps a pair is noised at: "uniform" over the training grid (Diffusion-DPO, the paper); "rollout": only
    # those the rollout sampler visits at generator.num_inference_steps (and flow_shift), e.g. the 8 of a
    # step-distilled checkpoint (AniSora V3.x), so the update stays where the model is sampled.
    timesteps: Literal["uniform", "rollout"] = "uniform"

    def worker_request(self) -> dict[str, float]:
        """What one training worker asks Ray for (Ray Train's ``resources_per_worker``; ``memory`` in bytes)."""
        return ray_request({"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker if self.use_gpu else 0.0},
                           self.memory_per_worker_gib)

    @model_validator(mode="after")
    def _lora_reference_is_the_base(self) -> GapoConfig:
        if self.lora.r > 0 and self.reference_weights != "base":
            raise ValueError("gapo.reference_weights = previous_round needs full fine-tuning: with LoRA "
                             "(gapo.lora.r > 0) the reference is the base model (the adapter switched off)")
        if self.lora.r > 0 and not self.lora.target_modules:  # peft's NoMatchingPeftModuleError at the first fit
            raise ValueError("gapo.lora.target_modules is empty while gapo.lora.r > 0: name the linears the adapter "
                             "goes on (e.g. [to_q, to_k, to_v, to_out.0])")
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker < 1 and self.backend != "gloo":
            raise ValueError(f"gapo.num_workers = {self.num_workers} with gapo.gpus_per_worker = "
                             f"{self.gpus_per_worker} puts several ranks on one GPU, which NCCL refuses: one worker "
                             "per GPU (gpus_per_worker: 1), one worker, or gapo.backend: gloo")
        if self.lora.dropout > 0:  # it would otherwise be ignored without a word
            raise ValueError(f"gapo.lora.dropout = {self.lora.dropout}: GAPO runs the policy in eval mode (dropout "
                             "would mask the winner's, the loser's and the reference's forward differently), so "
                             "LoRA dropout never applies: set 0")
        return self
