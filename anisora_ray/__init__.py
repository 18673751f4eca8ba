"""anisora-ray: AnimeReward + GAPO preference alignment of image-to-video models on Ray."""

from anisora_ray.types import Candidate, PreferencePair, PromptItem, QuarantineRecord, ScoredCandidate

__version__ = "0.1.0"

__all__ = [
    "Candidate",
    "PreferencePair",
    "PromptItem",
    "QuarantineRecord",
    "ScoredCandidate",
    "__version__",
]
