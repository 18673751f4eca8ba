"""Training checkpoints (DeepSpeed engine state) and the trained weights a refresh publishes.

A checkpoint folder holds ``ds/`` (DeepSpeed's model, optimizer and scheduler state, one optimizer
partition per rank; Ray Train merges the ranks' folders), ``trainer_state.json`` (the step: the
data position follows from it, see :mod:`anisora_ray.gapo.batches`) and ``weights/`` (the
transformer as safetensors, or the LoRA adapter). DeepSpeed's files are read back with
``torch.load(weights_only=True)``, allowing only the few DeepSpeed classes they contain.
"""

from __future__ import annotations

import json
import os

import torch

from anisora_ray.config import LoraConfig
from anisora_ray.weights import lora as lora_io

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"
WEIGHTS_DIR = "weights"


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


def save_training_state(engine, folder: str, step: int, lora: bool) -> None:
    """Every rank writes its part of the DeepSpeed state into ``folder`` (its own local folder)."""
    engine.save_checkpoint(folder, tag=DS_TAG, client_state={"step": step}, exclude_frozen_parameters=lora)
    if engine.global_rank == 0:
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump({"step": step, "lora": lora}, f)


def load_training_state(engine, folder: str, lora: bool) -> int:
    """Restore model, optimizer and scheduler from a checkpoint folder; returns the step it was taken at."""
    with open(os.path.join(folder, STATE_FILE)) as f:
        state = json.load(f)
    if bool(state["lora"]) != lora:
        raise ValueError(f"checkpoint {folder} was trained with lora={state['lora']}, this run has lora={lora}")
    path, _ = engine.load_checkpoint(folder, tag=DS_TAG, load_module_strict=not lora)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed state under {folder}/{DS_TAG}")
    return int(state["step"])


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The trained module's full state on every rank (ZeRO-3 partitions gathered)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def save_weights(engine, folder: str, lora: LoraConfig | None) -> None:
    """Rank 0 writes the publishable weights: the adapter (LoRA) or the whole transformer (safetensors)."""
    state = None if lora else full_state_dict(engine)  # collective under ZeRO-3: every rank takes part
    if engine.global_rank != 0:
        return
    if lora:
        lora_io.save_adapter(engine.module, lora, folder)
        return
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    engine.module.save_config(folder)  # config.json: the folder loads with from_pretrained
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
