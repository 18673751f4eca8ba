"""The main job: iterative alignment rounds (generate → score → pair → train → refresh → evaluate)."""
