"""One typed config tree, loaded from ``configs/*.yaml`` with dotted overrides.

    cfg = load_config("configs/local.yaml", ["generator.replicas=2"])

Every section forbids unknown keys; a validation error names the dotted key, the value given
and what was expected, e.g. ``generator.replicas = 'two': expected a valid integer``.
"""

from anisora_ray.config.loading import (
    parse_override,
    apply_overrides,
    build_config,
    load_config,
)
from anisora_ray.config.sections import (
    Section,
    RunConfig,
    RayConfig,
    TinyModelConfig,
    ModelConfig,
    ActorResources,
    GeneratorConfig,
    VideoConfig,
    DataConfig,
    NormalizeConfig,
    DimensionConfig,
    RewardDimensionsConfig,
    LoraConfig,
    RewardTrainingConfig,
    RewardConfig,
    PairsConfig,
    GapoConfig,
    EvalConfig,
    LoopConfig,
    TrackingConfig,
    AnisoraConfig,
)

__all__ = ['ActorResources', 'AnisoraConfig', 'DataConfig', 'DimensionConfig', 'EvalConfig', 'GapoConfig', 'GeneratorConfig', 'LoopConfig', 'LoraConfig', 'ModelConfig', 'NormalizeConfig', 'PairsConfig', 'RayConfig', 'RewardConfig', 'RewardDimensionsConfig', 'RewardTrainingConfig', 'RunConfig', 'Section', 'TinyModelConfig', 'TrackingConfig', 'VideoConfig', 'apply_overrides', 'build_config', 'load_config', 'parse_override']
