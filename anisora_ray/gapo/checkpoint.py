"""Training checkpoints: DeepSpeed engine state and the optimizer step it was taken at.

A checkpoint folder holds ``ds/`` (DeepSpeed's model, optimizer and scheduler state, one partition
per rank; Ray Train merges the ranks' folders in the run's storage) and ``trainer_state.json``
(the optimizer step: the data position follows from it, see :mod:`anisora_ray.gapo.batches`).
Checkpoints stay in storage: the publishable weights are written separately by
:mod:`anisora_ray.gapo.export`. DeepSpeed's files are read back with
``torch.load(weights_only=True)``, allowing only the few DeepSpeed classes they contain.
"""

from __future__ import annotations

import json
import os

import torch

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_checkpoint_engine(engine):
    """Make ``engine`` read its checkpoints with ``weights_only=True`` (DeepSpeed's default unpickles anything)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    previous = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
    engine.checkpoint_engine.zipfile_serialization = getattr(previous, "zipfile_serialization", False)
    return engine


def save_training_state(engine, folder: str, step: int, lora: bool, metrics: dict | None = None) -> None:
    """Every rank writes its part of the DeepSpeed state into ``folder`` (its own local folder)."""
    engine.save_checkpoint(folder, tag=DS_TAG, client_state={"step": step}, exclude_frozen_parameters=lora)
    if engine.global_rank == 0:
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump({"step": step, "lora": lora, "metrics": metrics or {}}, f)


def read_training_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)


def load_training_state(engine, folder: str, lora: bool) -> int:
    """Restore model, optimizer and scheduler from a checkpoint folder; returns the step it was taken at."""
    state = read_training_state(folder)
    if bool(state["lora"]) != lora:
        raise ValueError(f"checkpoint {folder} was trained with lora={state['lora']}, this run has lora={lora}")
    path, _ = engine.load_checkpoint(folder, tag=DS_TAG, load_module_strict=not lora)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed state under {folder}/{DS_TAG}")
    return int(state["step"])
