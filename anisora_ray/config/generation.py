"""The generator's section: a replica's resources, geometry, sampler, speed settings and failure handling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from anisora_ray.config.base import ActorResources, Section


class StepCacheConfig(Section):
    """diffusers' step cache on the denoiser(s) (generation/speed.py); off by default."""

    kind: Literal["none", "first_block", "faster_cache", "taylorseer"] = "none"
    threshold: float = Field(default=0.05, gt=0)  # first_block: a first-block residual change below this skips the rest
    # faster_cache (FasterCache, AniSora's own; families that batch CFG: cogvideox_i2v): below timestep 681 self-
    # attention is computed every `attention_skip_range` steps (reused in between), and below 781 the unconditional
    # branch every `unconditional_skip_range` steps (in between approximated from the conditional one). A fixed
    # schedule: its saving does not depend on the weights.
    attention_skip_range: int = Field(default=2, ge=1)
    unconditional_skip_range: int = Field(default=5, ge=1)
    # taylorseer (TaylorSeer, any family: its state is kept per CFG branch, so Wan's two calls per step work): the
    # first `warmup_steps` steps compute every attention; after them attention (or with predict=blocks, every
    # transformer block) is computed every `compute_every` steps and predicted in between by a Taylor expansion of
    # order `order` from the last computed outputs. A fixed schedule as well.
    compute_every: int = Field(default=5, ge=1)
    warmup_steps: int = Field(default=3, ge=1)
    order: int = Field(default=1, ge=0, le=2)
    predict: Literal["attention", "blocks"] = "attention"
    # The cache audit (eval/cache_audit.py): at round 0 and every `audit_every` rounds, the first `audit_prompts`
    # held-out prompts get candidates_per_prompt held-out seeds each, rendered twice on the replicas, with the cache
    # and with every step computed: the frames' drift, the reward's change and whether each prompt keeps its best and
    # worst candidate go to MLflow, measured on the weights being trained. 0: no audit (nothing to audit without a cache).
    audit_prompts: int = Field(default=0, ge=0)
    audit_every: int = Field(default=1, ge=1)
    # What align does when the audits show the cache moving the pairs GAPO trains on (loop/cache_policy.py), pooled
    # over every audit so far: the share of audited prompts whose best and worst candidate the cache keeps falls below
    # `min_same_pair`, or the share of the exact pairs' GAPO weight (alpha**r_w - alpha**r_l, exact rewards) that the
    # cache's pairs keep falls below `min_signal_kept` (a near-tie the cache swaps costs little of it, an inverted
    # pair more than all). 0: never.
    # warn: a warning and an MLflow tag; exact: every later rollout computes every step (the cache's saving is given
    # up, the pairs are the weights' own); stop: the job stops before its next round (change the cache, then --resume).
    min_same_pair: float = Field(default=0.0, ge=0, le=1)
    min_signal_kept: float = Field(default=0.0, ge=0, le=1)
    on_moved_pairs: Literal["warn", "exact", "stop"] = "warn"

    @model_validator(mode="after")
    def _policy_needs_audits(self) -> StepCacheConfig:
        if self.kind == "none":  # no cache: nothing to act on (a config may inherit the policy and turn the cache off)
            return self
        if self.on_moved_pairs != "warn" and self.min_same_pair == 0 and self.min_signal_kept == 0:
            raise ValueError(f"on_moved_pairs={self.on_moved_pairs!r} acts when an audited share falls below its "
                             "threshold, and min_same_pair and min_signal_kept are both 0 (never): set one")
        if self.audit_prompts > 0:
            return self
        for name in ("min_same_pair", "min_signal_kept"):
            if getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} acts on the cache audit's pairs, and audit_prompts=0 "
                                 "audits none: set audit_prompts (the number of held-out prompts audited)")
        return self


class GeneratorConfig(Section):
    replicas: int = Field(default=1, ge=1)
    actor: ActorResources = ActorResources()
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    candidates_per_prompt: int = Field(default=4, ge=1)
    prompts_per_call: int = Field(default=1, ge=1)
    max_calls_in_flight: int = Field(default=2, ge=1)  # per replica
    calls_per_task: int = Field(default=1, ge=1)  # calls one forwarding task keeps in flight (fewer processes at scale)
    num_frames: int = Field(default=9, ge=1)
    height: int = Field(default=64, ge=16)
    width: int = Field(default=64, ge=16)
    fps: int = Field(default=8, ge=1)
    num_inference_steps: int = Field(default=8, ge=1)
    guidance_scale: float = Field(default=6.0, ge=0)
    max_sequence_length: int = Field(default=128, ge=1)
    # Appended to every prompt the replicas render and GAPO conditions on, not to the text the rewards score: a
    # checkpoint's control codes, e.g. AniSora V3.x's " aesthetic score: 5.5. motion score: 3.0. There is no text
    # in the video."
    prompt_suffix: str = ""
    # CFG's unconditional branch is conditioned on this text ("": the empty prompt, diffusers' default). Wan's own
    # sampler and AniSora's substitute their long negative prompt for an empty one (configs/wan*.yaml set it), so
    # rollouts and held-out videos match the checkpoint's release; GAPO's loss, which has no CFG, does not read it.
    negative_prompt: str = ""
    device: str = "auto"  # auto: cuda when Ray gave the actor a GPU and torch sees one, else cpu
    torch_threads: int | None = Field(default=None, ge=1)  # default: the actor's num_cpus
    vae_slicing: bool = False
    vae_tiling: bool = False
    # Speed (docs/performance.md): regional torch.compile of the transformer blocks, once per replica at start-up.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # The attention kernel (generation/speed.py): auto | math | flash | efficient | cudnn (torch's SDPA kernel,
    # pinned for every call) | dispatcher:<name> (diffusers' attention dispatcher, e.g. dispatcher:flash; Wan).
    attention_backend: str = "auto"
    cache: StepCacheConfig = StepCacheConfig()
    # fp8: torchao float8 on the transformer blocks' linears (generation/quantize.py; capability >= 8.9, torchao)
    quantize: Literal["none", "fp8"] = "none"
    # Memory: "model" keeps every component on the host and moves each to the GPU only while it runs (diffusers'
    # enable_model_cpu_offload, in the pipeline's order: text encoder, image encoder, each expert, VAE), so a replica
    # needs its largest component plus activations, not their sum: Wan2.2-A14B's two 14 B experts and UMT5-XXL
    # (~68 GB) on an 80 GB GPU. Each call moves every component up and back (docs/performance.md).
    offload: Literal["none", "model"] = "none"
    # The rollout sampler: "pretrained" keeps the checkpoint's (DDIM for CogVideoX); "dpm" swaps in diffusers'
    # CogVideoXDPMScheduler, a multistep solver meant for fewer steps. GAPO's training objective is unchanged.
    scheduler: Literal["pretrained", "dpm"] = "pretrained"
    # Flow-matching families (wan_i2v): the sampler's static shift (UniPC's flow_shift); None keeps the checkpoint's.
    # GAPO draws its training σ on the same shifted grid. Step-distilled checkpoints name theirs: AniSora V3.1 / V3.2
    # sample at 8 steps, shift 5, guidance_scale 1 (no CFG: one transformer call per step).
    flow_shift: float | None = Field(default=None, gt=0)
    # Infrastructure failures (a replica process or node dies, a call hangs) are retried, not quarantined:
    max_restarts: int = Field(default=3, ge=-1)  # Ray restarts a dead replica this often (-1: always)
    call_timeout_s: float | None = Field(default=1800.0, gt=0)  # a call past this: the replica is killed and restarted
    call_retries: int = Field(default=3, ge=0)  # a failed or timed-out call is sent again this often, then the run fails

    @model_validator(mode="after")
    def _faster_cache_needs_cfg(self) -> GeneratorConfig:
        if self.cache.kind == "faster_cache" and self.guidance_scale <= 1:
            raise ValueError(f"generator.cache.kind='faster_cache' approximates CFG's unconditional branch, and "
                             f"guidance_scale={self.guidance_scale} (<= 1) runs no CFG: use 'taylorseer' or no cache")
        return self

    @model_validator(mode="after")
    def _negative_prompt_needs_cfg(self) -> GeneratorConfig:
        if self.negative_prompt and self.guidance_scale <= 1:
            raise ValueError(f"generator.negative_prompt is set and guidance_scale={self.guidance_scale} (<= 1) runs no "
                             "CFG, so nothing reads it: unset it, or raise guidance_scale")
        return self

    @model_validator(mode="after")
    def _offload_composes(self) -> GeneratorConfig:
        if self.offload == "none":
            return self
        if self.quantize != "none":
            raise ValueError(f"generator.offload={self.offload!r} with generator.quantize={self.quantize!r}: torchao's "
                             "float8 layers are not moved between host and GPU here; choose one")
        if self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"generator.offload={self.offload!r} with generator.compile_mode={self.compile_mode!r}: "
                             "CUDA graphs keep the weights' GPU addresses, which offloading changes every call; use "
                             "'default' or 'max-autotune-no-cudagraphs'")
        return self

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"must be a multiple of 16 (VAE factor 8 x patch size 2), got {v}")
        return v

    @field_validator("num_frames")
    @classmethod
    def _frames(cls, v: int) -> int:
        if (v - 1) % 4:
            raise ValueError(f"must be 4k+1 (the VAE compresses time 4x), e.g. 9, 17, 49 (CogVideoX: 8k+1); got {v}")
        return v
