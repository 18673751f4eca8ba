"""AnimeReward: six reward dimensions, each scoring a batch of decoded clips, and their aggregation."""

from anisora_ray.reward import videoscore  # noqa: F401  (registers the `videoscore` backend; torch loads on use)
from anisora_ray.reward.base import DIMENSIONS, ClipBatch, RewardDimension, build_dimension, register

__all__ = ["DIMENSIONS", "ClipBatch", "RewardDimension", "build_dimension", "register"]
