"""Trained weights on the move: checksummed buckets, LoRA adapters, verified refresh of replicas."""
