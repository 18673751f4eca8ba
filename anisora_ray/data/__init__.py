"""Prompt manifests and the procedurally drawn demo set."""
