"""The released AnimeReward (bilibili/Index-anisora ``reward/``): converters from the released
checkpoints and scorers registered as the ``released`` backend of each dimension."""

from anisora_ray.reward.released import blip  # noqa: F401  (registers image_video / text_video)
from anisora_ray.reward.released import actionclip  # noqa: F401,E402  (registers visual_motion)
from anisora_ray.reward.released import character  # noqa: F401,E402  (registers character)
from anisora_ray.reward.released import idefics2  # noqa: F401,E402  (registers visual_smoothness / visual_appeal)
