"""Candidate generation: a diffusers image-to-video pipeline hosted by persistent Ray actors."""
