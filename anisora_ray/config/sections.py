"""The config sections: one pydantic model per component, unknown keys forbidden."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from anisora_ray.config.base import ActorResources, LoraConfig, Section
from anisora_ray.config.generation import GeneratorConfig, StepCacheConfig
from anisora_ray.config.training import GapoConfig, RewardTrainingConfig
from anisora_ray.types import DIMENSIONS

__all__ = ["ActorResources", "GapoConfig", "GeneratorConfig", "LoraConfig", "RewardTrainingConfig", "Section",
           "StepCacheConfig"]  # re-exported


Kept = Annotated[int, Field(ge=0)] | Literal["all"]  # the last N finished rounds (0: none), or every round


class KeepConfig(Section):
    """What ``align`` keeps of each finished (evaluated) round (loop/retention.py). What a resume, the report
    and a guard rollback need is kept whatever the setting: the round in progress, the replicas' weights, the
    guard's rollback target, round 0's and the last round's held-out videos. The defaults bound a multi-day
    run's disk: per round only the kept tables (pairs, scores, metrics) and the last N rounds' files remain."""

    candidate_videos: Kept = 1  # round-r/pairs/videos and the round's latent cache (what a retrain would read)
    checkpoints: Kept = 0  # the round's Ray Train checkpoints (resume needs none once its weights are written)
    weights: Kept = 3  # round-r/weights (a pruned round's MLflow model version is tagged anisora.pruned)
    eval_videos: Kept = 3  # round-r/eval/videos (their scores stay)


class FreeSpaceConfig(Section):
    """``align`` stops before a round, its state saved, when the disk of a local ``run.output_dir`` has less free
    than max(``min_gb``, ``rounds`` × the most a finished round of the job wrote): a clear error to act on (free
    space or lower ``run.keep``, then ``--resume``) instead of a write failing mid-round. 0 and 0: no check.
    Object stores (URLs) are not checked."""

    min_gb: float = Field(default=1.0, ge=0)
    rounds: float = Field(default=1.5, ge=0)  # how many rounds' worth of new files must fit


class RunConfig(Section):
    name: str = "anisora-local"
    output_dir: str = "outputs/local"  # local path or fsspec URL
    seed: int = 0
    keep: KeepConfig = KeepConfig()
    free_space: FreeSpaceConfig = FreeSpaceConfig()


class RayConfig(Section):
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:port": join a cluster
    num_cpus: int | None = Field(default=None, ge=1)  # logical CPUs of a local Ray: a scheduling budget
    num_gpus: int | None = Field(default=None, ge=0)
    node_ip_address: str = "127.0.0.1"  # local Ray only: keep it on loopback
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    namespace: str = "anisora-ray"
    log_to_driver: bool = True
    # align: how long to wait for the cluster (e.g. an autoscaler) to offer what the config asks for at peak
    wait_for_resources_s: float = Field(default=60.0, ge=0)
    # Ray Train's watcher of node-preemption notices (spot / preemptible nodes): one more actor per training fit
    # (GAPO, train-reward), with nothing to watch on a single machine (configs/local*.yaml turn it off)
    preemption_watcher: bool = True
    # Ray Train's controller polls its workers this often, and a worker's report (every checkpoint, and the last
    # one) waits for that poll: at tiny sizes the default 2 s per report was a third of a fit (configs/local.yaml)
    train_poll_s: float = Field(default=2.0, gt=0, le=60)


class TinyModelConfig(Section):
    """Sizes of the random-init image-to-video pipeline (of ``model.family``) used on CPU and in tests."""

    num_layers: int = Field(default=1, ge=1)
    num_attention_heads: int = Field(default=2, ge=1)
    attention_head_dim: int = Field(default=16, ge=2)
    time_embed_dim: int = Field(default=32, ge=2)
    text_d_model: int = Field(default=32, ge=8)
    text_layers: int = Field(default=1, ge=1)
    vae_channels: int = Field(default=8, ge=4)
    # VAE blocks: spatial compression 2^(n-1) (4: CogVideoX's 8x); time 4x, or 2x with 2 (more detail).
    vae_blocks: int = Field(default=4, ge=2, le=4)
    latent_channels: int = Field(default=4, ge=1)
    max_text_seq_length: int = Field(default=128, ge=4)
    init_seed: int = 0
    warm_start_steps: int = Field(default=0, ge=0)  # > 0: fit VAE and transformer on drawn clips (models/tiny_warmstart.py)
    warm_start_batch: int = Field(default=4, ge=1)
    warm_start_lr: float = Field(default=2e-3, gt=0)
    # the denoiser's loss on the first latent frame counts this many times a later frame's: an image-to-video
    # model's first frame is its image (16 took first-frame PSNR from 21.4 to 24.3 dB on the demo, 1 block)
    warm_start_first_frame_weight: float = Field(default=16.0, gt=0)
    # the VAE phase: this many single drawn images per step besides the clips, and the clips' first frame weighted
    # this many times a later frame's (the image-to-video first frame is the VAE's reconstruction of the image;
    # the tiny Wan default: 8 images and weight 8 took its held-out first-frame PSNR from 23.4 to 27.1-27.4 dB)
    warm_start_vae_images: int = Field(default=0, ge=0)
    warm_start_vae_first_frame_weight: float = Field(default=1.0, gt=0)
    # wan_i2v only (models/tiny_wan.py): which released structure the tiny Wan mirrors, its sampler's shift,
    # and (wan22_i2v_a14b) the timestep ratio where the low-noise expert takes over
    wan_variant: Literal["wan21_i2v", "wan22_ti2v", "wan22_i2v_a14b"] = "wan21_i2v"
    flow_shift: float = Field(default=3.0, gt=0)
    boundary_ratio: float = Field(default=0.9, gt=0, lt=1)


class ModelConfig(Section):
    # the generator family (anisora_ray/models/families): cogvideox_i2v (AniSora V1, the paper) or wan_i2v
    # (Wan2.1-I2V, Wan2.2-TI2V-5B, Wan2.2-I2V-A14B: AniSora V2/V3; which one the checkpoint's config says)
    family: Literal["cogvideox_i2v", "wan_i2v"] = "cogvideox_i2v"
    pretrained: str = "tiny"  # Hugging Face id, local path, or "tiny" (built from `tiny` and cached)
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache_dir: str = "~/.cache/anisora-ray/models"
    tiny: TinyModelConfig = TinyModelConfig()


class VideoConfig(Section):
    codec: str = "libx264"  # an FFmpeg video encoder PyAV has (checked at load: a typo would fail every video)
    crf: int = Field(default=18, ge=0, le=51)
    sample_frames: int = Field(default=24, ge=1)  # frames sampled evenly ...
    sample_max_frames: int = Field(default=144, ge=1)  # ... over the first this many
    sample_size: int | None = Field(default=224, ge=8)  # square resize for scoring; None keeps size

    @field_validator("codec")
    @classmethod
    def _encoder_exists(cls, codec: str) -> str:
        import av

        try:
            kind = av.codec.Codec(codec, "w").type
        except Exception:  # noqa: BLE001 - PyAV's UnknownCodecError and the like
            raise ValueError("no such encoder in this PyAV/FFmpeg (e.g. libx264)") from None
        if kind != "video":
            raise ValueError(f"an {kind} encoder, not a video one")
        return codec


class CaptionerConfig(Section):
    """``build-manifest`` without captions: a vision-language model writes each prompt (generation/captioning.py)."""

    model: str = "Qwen/Qwen2-VL-7B-Instruct"  # Hugging Face id, folder, or tiny:qwen2-vl (random-init, tests)
    prompt: str | None = None  # the instruction ({media}: what it is shown); None: CAPTION_TEMPLATE (the paper's)
    max_new_tokens: int = Field(default=256, ge=1)
    num_frames: int = Field(default=8, ge=1)  # frames sampled evenly over a clip, given as images in order
    frame_size: int = Field(default=448, ge=28)  # longer side of each frame / image before the processor
    batch_size: int = Field(default=4, ge=1)  # clips per generate call
    concurrency: int = Field(default=1, ge=1)  # captioning actors
    num_gpus: float | None = Field(default=None, ge=0)  # per actor; None: 1 when the cluster has GPUs, else 0
    num_cpus: float = Field(default=1.0, gt=0)


class DataConfig(Section):
    prompts: str | None = "demo"  # manifest URL, or "demo" (the drawn demo set); None: required (real configs)
    demo_prompts: int = Field(default=16, ge=1)
    demo_image_size: int = Field(default=256, ge=16)
    captioner: CaptionerConfig = CaptionerConfig()  # build-manifest without --captions / --prompts


class NormalizeConfig(Section):
    """How one dimension's raw score is mapped to [0, 1] before weighting."""

    # fixed: the configured range | zscore: sigmoid of (score - mean) / std, with mean and std frozen before
    # scoring (reward.statistics_uri, or a calibration sample of the untrained generator) | rank: the rank
    # among the rows scored together: one prompt's candidates when pairing, all candidates in score/evaluate
    kind: Literal["fixed", "zscore", "rank"] = "fixed"
    low: float = 0.0  # fixed: raw score mapped to 0 ...
    high: float = 1.0  # ... and to 1 (clipped outside)

    @model_validator(mode="after")
    def _range(self) -> NormalizeConfig:
        if self.kind == "fixed" and not self.high > self.low:
            raise ValueError(f"normalize.high ({self.high}) must be > normalize.low ({self.low})")
        return self


class DimensionConfig(Section):
    backend: str = "classical"
    weight: float = Field(default=1.0, ge=0)
    replicas: int = Field(default=1, ge=1)  # actors scoring this dimension
    batch_size: int | None = Field(default=None, ge=1)  # clips per backend call at most (None: as sent, reward.batch_size)
    actor: ActorResources = ActorResources(num_cpus=1.0)
    normalize: NormalizeConfig = NormalizeConfig()
    options: dict[str, Any] = Field(default_factory=dict)  # passed to the backend's constructor


def _dimension(low: float, high: float) -> Any:
    return Field(default_factory=lambda: DimensionConfig(normalize=NormalizeConfig(low=low, high=high)))


class RewardDimensionsConfig(Section):
    """One entry per AnimeReward dimension; defaults are the classical backends and their raw ranges."""

    visual_smoothness: DimensionConfig = _dimension(0.9, 1.0)
    visual_motion: DimensionConfig = _dimension(0.0, 0.05)
    visual_appeal: DimensionConfig = _dimension(0.0, 1.0)
    text_video: DimensionConfig = _dimension(0.0, 1.0)
    image_video: DimensionConfig = _dimension(0.0, 1.0)
    character: DimensionConfig = _dimension(0.0, 1.0)

    @model_validator(mode="after")
    def _some_weight(self) -> RewardDimensionsConfig:
        if not any(d.weight > 0 for d in self.as_dict().values()):
            raise ValueError("at least one reward dimension needs a weight above 0")
        return self

    def as_dict(self) -> dict[str, DimensionConfig]:
        return {name: getattr(self, name) for name in DIMENSIONS}


class RewardConfig(Section):
    dimensions: RewardDimensionsConfig = RewardDimensionsConfig()
    batch_size: int = Field(default=8, ge=1)  # clips decoded once and scored on every dimension per call
    batches_in_flight: int = Field(default=2, ge=1)
    max_restarts: int = Field(default=3, ge=-1)  # persistent reward actors: Ray restarts a dead one this often
    batch_timeout_s: float | None = Field(default=600.0, gt=0)  # a batch past this: the actor is killed and restarted
    batch_retries: int = Field(default=3, ge=0)  # a failed or timed-out batch is scored again this often, then the run fails
    # zscore statistics: a stored file (reward-statistics.json); None: align takes them from its round-0 held-out
    # evaluation, `pairs` from a calibration sample of `calibration_prompts` prompts, written next to its output
    statistics_uri: str | None = None
    calibration_prompts: int = Field(default=8, ge=1)
    training: RewardTrainingConfig = RewardTrainingConfig()


class PairsConfig(Section):
    """``anisora-ray pairs``: the streaming generate → score → pair pipeline and its rules."""

    min_gap: float = Field(default=0.0, ge=0, le=1)  # pairs with a smaller normalized gap are dropped (counted)
    ties: Literal["skip", "keep"] = "skip"  # best and worst with equal rewards: skip the prompt, or keep the pair
    keep_scores: bool = False  # also write every candidate's scores (scores-*.parquet) for analysis
    flush_every: int = Field(default=8, ge=1)  # prompts per output shard: an interruption redoes at most these
    max_prompts: int | None = Field(default=None, ge=1)  # prompts paired per round (output folder), drawn per round
    decode_batch_size: int = Field(default=4, ge=1)
    decode_cpus: float = Field(default=1.0, gt=0)
    decode_concurrency: int = Field(default=2, ge=1)
    object_store_memory_mb: int | None = Field(default=None, ge=64)  # Ray Data backpressure budget (None: Ray's)
    # "actors": persistent per-dimension reward actors (kept across rounds) behind one Ray Data forwarding
    # task: no model loads, no worker start-up per round; "pipeline": a Ray Data actor pool per dimension per run.
    reward_stage: Literal["pipeline", "actors"] = "actors"
    reward_forwarders: int = Field(default=2, ge=1)  # "actors": concurrent forwarding workers

    @model_validator(mode="after")
    def _ties_kept_need_no_gap(self) -> PairsConfig:
        if self.ties == "keep" and self.min_gap > 0:  # a tie's gap is 0: min_gap would skip it anyway
            raise ValueError(f"ties='keep' keeps pairs whose rewards are equal, and min_gap={self.min_gap} skips "
                             "every pair below that gap, ties included: set min_gap=0 or ties='skip'")
        return self


class VideoMetricsConfig(Section):
    """VBench-I2V-style metrics of ``anisora-ray eval`` / ``ablate``: learned forms where weights are given,
    weight-free forms otherwise (docs/evaluation.md says which is which)."""

    enabled: bool = True
    subject_backbone: str | None = None  # DINO(v2) HF id or folder: i2v subject consistency; None: pixel features
    aesthetic_backbone: str | None = None  # CLIP ViT-L/14 HF id or folder for the LAION aesthetic head ...
    aesthetic_head: str | None = None  # ... its linear head (.safetensors, or .pth read with weights_only); None: classical
    max_frames: int = Field(default=16, ge=2)  # frames per video fed to the learned backbones
    device: str = "auto"
    num_gpus: float = Field(default=0.0, ge=0)  # per metrics actor
    num_cpus: float = Field(default=1.0, gt=0)
    concurrency: int = Field(default=1, ge=1)  # metrics actors
    cache_dir: str = "~/.cache/anisora-ray"


class VideoScoreEvalConfig(Section):
    """VideoScore (TIGER-Lab) rows of ``anisora-ray eval`` / ``ablate``: five aspects and their mean per video, and
    the weights ``ablate``'s ``reward=videoscore`` variant ranks with (docs/evaluation.md)."""

    checkpoint: str | None = None  # Hub id (TIGER-Lab/VideoScore-v1.1), folder, or tiny:videoscore; None: no VideoScore
    num_frames: int | None = Field(default=None, ge=1)  # None: as released
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: str = "auto"
    num_gpus: float = Field(default=0.0, ge=0)  # per VideoScore actor
    num_cpus: float = Field(default=1.0, gt=0)
    concurrency: int = Field(default=1, ge=1)
    cache_dir: str = "~/.cache/anisora-ray"


class EvalConfig(Section):
    """Held-out evaluation of each round's generator: prompts and images never used in training."""

    prompts: str | None = "demo"  # manifest URL; "demo": drawn with seed run.seed + seed_offset; None: required
    demo_prompts: int = Field(default=8, ge=2)
    seed_offset: int = Field(default=1000, ge=1)
    candidates_per_prompt: int = Field(default=2, ge=1)  # the same seeds every round (paired comparison)
    # true: held-out videos are rendered with every step computed, so a rollout step cache (generator.cache) does not
    # enter what the evaluation reports of the weights; false: as rollouts are (the cache's effect included)
    exact: bool = False
    bootstrap_samples: int = Field(default=2000, ge=100)  # BCa bootstrap resamples (and permutations past 16 prompts)
    sample_videos: int = Field(default=2, ge=0)  # side-by-side winner | loser videos logged per round
    metrics: VideoMetricsConfig = VideoMetricsConfig()  # anisora-ray eval / ablate
    videoscore: VideoScoreEvalConfig = VideoScoreEvalConfig()  # anisora-ray eval / ablate


GUARD_MEASURE = Literal["frame_difference", "first_frame_psnr", "named_hue_share", "subject_consistency",
                        "motion_smoothness", "aesthetic_quality"]
GUARD_MEASURES = ("frame_difference", "first_frame_psnr", "named_hue_share", "subject_consistency",
                  "motion_smoothness", "aesthetic_quality")


class GuardConfig(Section):
    """``loop.guard``: stop or roll back when the held-out reward rises while a guard measure (eval/guard.py),
    one the training reward does not contain, falls over round 0 by more than ``margin`` × its round-0
    mean with a paired permutation p below ``alpha``."""

    enabled: bool = True
    measures: list[GUARD_MEASURE] = Field(default_factory=lambda: list(GUARD_MEASURES))
    action: Literal["warn", "stop", "rollback"] = "rollback"  # rollback: replicas back to the best round, loop stops
    margin: float = Field(default=0.10, ge=0)  # relative to the round-0 mean (docs/evaluation.md: how it was set)
    alpha: float = Field(default=0.05, gt=0, le=1)


class LoopConfig(Section):
    """``anisora-ray align``: rounds of generate → score → pair → train → refresh → evaluate."""

    rounds: int = Field(default=3, ge=1)
    placement: Literal["separate", "shared"] = "separate"  # shared: stop generator + reward actors while training
    registered_model: str | None = "anisora-generator"  # MLflow model name of each round's weights (None: skip)
    guard: GuardConfig = GuardConfig()
    # "live": rank 0 streams the written weights from memory to the replicas (routes: weights.refresh.stream_update);
    # "storage": every replica streams the written folder. Both verify checksums.
    refresh: Literal["live", "storage"] = "live"
    refresh_transport: Literal["auto", "host", "collective", "cuda_ipc"] = "auto"
    # "one_round_off_policy": round r+1 is generated while round r trains (version r-1, then r once written, loaded
    # between two generation calls); pairs record their version, rounds log staleness. "none": on-policy.
    overlap: Literal["none", "one_round_off_policy"] = "none"

    @model_validator(mode="after")
    def _overlap_needs_separate_placement(self) -> LoopConfig:
        if self.overlap != "none" and self.placement == "shared":
            raise ValueError("loop.overlap = one_round_off_policy generates while the trainer runs: it needs "
                             "loop.placement = separate (shared stops the replicas while training)")
        return self


class TrackingConfig(Section):
    tracking_uri: str | None = None  # None: sqlite store in the output dir; MLFLOW_TRACKING_URI wins
    experiment: str = "anisora-ray"


class AnisoraConfig(Section):
    """The whole config tree."""

    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    generator: GeneratorConfig = GeneratorConfig()
    video: VideoConfig = VideoConfig()
    reward: RewardConfig = RewardConfig()
    pairs: PairsConfig = PairsConfig()
    gapo: GapoConfig = GapoConfig()
    eval: EvalConfig = EvalConfig()
    loop: LoopConfig = LoopConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _sample_window(self) -> AnisoraConfig:
        if self.video.sample_max_frames < self.video.sample_frames:
            raise ValueError(
                f"video.sample_max_frames ({self.video.sample_max_frames}) must be >= "
                f"video.sample_frames ({self.video.sample_frames})"
            )
        if self.generator.flow_shift is not None and self.model.family != "wan_i2v":
            raise ValueError(f"generator.flow_shift applies to flow-matching families (wan_i2v); model.family="
                             f"{self.model.family!r} samples with its checkpoint's DDIM (or generator.scheduler=dpm)")
        if self.model.family == "wan_i2v" and self.generator.scheduler == "dpm":
            raise ValueError("generator.scheduler = dpm applies to cogvideox_i2v (DPM-Solver for its DDIM); wan_i2v "
                             "samples with its flow-matching UniPC (generator.flow_shift)")
        if self.model.family == "wan_i2v" and self.generator.cache.kind == "faster_cache":
            raise ValueError("generator.cache.kind = faster_cache needs CFG's two halves in one transformer call; "
                             "wan_i2v calls it twice per step: first_block or taylorseer instead")
        if self.loop.guard.enabled and not self.loop.guard.measures:
            raise ValueError("loop.guard.enabled with no loop.guard.measures: the guard could never fire")
        tiny = self.model.tiny
        if self.model.pretrained == "tiny" and self.generator.max_sequence_length > tiny.max_text_seq_length:
            raise ValueError(
                f"generator.max_sequence_length ({self.generator.max_sequence_length}) must be <= "
                f"model.tiny.max_text_seq_length ({tiny.max_text_seq_length})"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """The resolved config as ``{"dotted.key": value}`` (for tracking params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.model_dump())
        return out
