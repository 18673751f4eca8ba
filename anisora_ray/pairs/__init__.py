"""Preference pairs: the streaming generate → score → pair pipeline, pair rules, exactly-once output."""

from anisora_ray.pairs.select import select_pair
from anisora_ray.pairs.writer import PairWriter, read_pairs, read_quarantined, read_skipped

__all__ = ["PairWriter", "read_pairs", "read_quarantined", "read_skipped", "select_pair"]
