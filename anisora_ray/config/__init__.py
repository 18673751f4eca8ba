"""One typed config tree, loaded from ``configs/*.yaml`` with dotted overrides.

    cfg = load_config("configs/local.yaml", ["generator.replicas=2"])

Every section forbids unknown keys; a validation error names the dotted key, the value given
and what was expected, e.g. ``generator.replicas = 'two': expected a valid integer``.
"""

from anisora_ray.config.loading import (
    apply_overrides,
    build_config,
    load_config,
    parse_override,
)
from anisora_ray.config.sections import (
    ActorResources,
    AnisoraConfig,
    DataConfig,
    DimensionConfig,
    EvalConfig,
    GapoConfig,
    GeneratorConfig,
    KeepConfig,
    LoopConfig,
    LoraConfig,
    ModelConfig,
    NormalizeConfig,
    PairsConfig,
    RayConfig,
    RewardConfig,
    RewardDimensionsConfig,
    RewardTrainingConfig,
    RunConfig,
    Section,
    TinyModelConfig,
    TrackingConfig,
    VideoConfig,
)

__all__ = ['ActorResources', 'AnisoraConfig', 'DataConfig', 'DimensionConfig', 'EvalConfig', 'GapoConfig', 'GeneratorConfig', 'KeepConfig', 'LoopConfig', 'LoraConfig', 'ModelConfig', 'NormalizeConfig', 'PairsConfig', 'RayConfig', 'RewardConfig', 'RewardDimensionsConfig', 'RewardTrainingConfig', 'RunConfig', 'Section', 'TinyModelConfig', 'TrackingConfig', 'VideoConfig', 'apply_overrides', 'build_config', 'load_config', 'parse_override']
