"""The released AnimeReward (bilibili/Index-anisora ``reward/``): converters from the released
checkpoints and scorers registered as the ``released`` backend of each dimension."""

from anisora_ray.reward.released import actionclip, blip, character, idefics2  # noqa: F401  (register the backends)
