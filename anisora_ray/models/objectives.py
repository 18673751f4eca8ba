"""The training objectives of the generator families, as math on tensors: the error of a prediction and the
two noising schemes (no Ray, no diffusers, no model specifics).

- **v-prediction DDPM** (CogVideoX): noising and target come from the scheduler (``add_noise``,
  ``get_velocity``); t is drawn uniformly from its training timesteps.
- **Rectified flow** (the Wan family): x_σ = (1 − σ)·x₀ + σ·ε, the model predicts the velocity
  v = ε − x₀, and σ is drawn on the scheduler's training grid with its static shift
  (σ' = shift·s / (1 + (shift − 1)·s), s = i/N, timestep = σ'·N, as ``FlowMatchEulerDiscreteScheduler`` builds it).
  Latents the pipeline overwrites with the condition (Wan2.2-TI2V's first frame under ``expand_timesteps``)
  are left out of the error by a mask — a mean over the generated positions only, not a mean that counts them
  as zero. Wan2.2-A14B's two experts split the timesteps at ``boundary_ratio · N``: ``transformer`` at
  t ≥ boundary (high noise), ``transformer_2`` below, as ``pipeline_wan_i2v.py`` routes them.

Winner, loser and reference share the noise and the timestep (the caller draws once).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy latents [B,C,F,h,w], timesteps [B]) → v


def prediction_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over every non-batch dimension, in float32: [B, ...] → [B]."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def masked_error(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weighted mean squared error in float32, weights ``mask`` (broadcast to the prediction:
    1 counts a position, 0 leaves it out, other values weigh it): [B, ...] → [B]. No mask: every position."""
    if mask is None:
        return prediction_error(prediction, target)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    squared = (prediction.float() - target.float()).pow(2)
    weight = mask.float().expand_as(squared)
    counted = weight.flatten(1).sum(1)
    if (counted == 0).any():
        raise ValueError("the mask leaves no generated position to score")
    return (squared * weight).flatten(1).sum(1) / counted


def ddpm_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The scheduler's prediction target: v for v-prediction (CogVideoX), ε for epsilon models."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "epsilon":
        return noise
    raise ValueError(f"unsupported prediction_type {kind!r}")


def scheduler_shift(config) -> float:
    """The static shift of a flow scheduler's config (UniPC's ``flow_shift``, FlowMatchEuler's ``shift``)."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    if get("use_dynamic_shifting", False):
        raise ValueError("a flow scheduler with use_dynamic_shifting has no fixed training shift: set its shift")
    return float(get("flow_shift", None) or get("shift", None) or 1.0)


def shifted_grid(shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """σ of training index i = 1..N on the shifted grid, float64 [N]."""
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    s = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return shift * s / (1 + (shift - 1) * s)


def draw_sigmas(batch: int, generator: torch.Generator, shift: float = 1.0, num_train_timesteps: int = 1000,
                device: torch.device | str = "cpu", allowed: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """σ [B] drawn uniformly from the shifted training grid (or from its ``allowed`` indices, a bool mask [N]),
    and the matching timesteps σ·N [B]."""
    grid = shifted_grid(shift, num_train_timesteps)
    pool = torch.arange(num_train_timesteps) if allowed is None else allowed.nonzero().flatten()
    if pool.numel() == 0:
        raise ValueError("no training timestep to draw from")
    pick = torch.randint(0, pool.numel(), (batch,), generator=generator, device=generator.device).cpu()
    sigmas = grid[pool[pick]].float().to(device)
    return sigmas, sigmas * num_train_timesteps


def noised(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − σ)·x₀ + σ·ε, computed in float32 and returned in x₀'s dtype: σ rounded to bf16 first (8 bits of
    mantissa) noised up to ~2 timesteps away from the one the model is told (t = 972 at σ 0.9727, not 0.972)."""
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).float()
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def first_frame_mask(shape: tuple[int, ...], device=None) -> torch.Tensor:
    """1 over generated latents, 0 over the first latent frame (the given image): [1, 1, F, h, w]."""
    _, _, frames, h, w = shape
    mask = torch.ones((1, 1, frames, h, w), device=device)
    mask[:, :, 0] = 0
    return mask


def expert_index(timesteps: torch.Tensor, boundary_ratio: float | None, num_train_timesteps: int = 1000) -> torch.Tensor:
    """0 (``transformer``) where t ≥ boundary_ratio·N or without a boundary, 1 (``transformer_2``) below: [B]."""
    if boundary_ratio is None:
        return torch.zeros_like(timesteps, dtype=torch.long)
    return (timesteps < boundary_ratio * num_train_timesteps).long()


def expert_grid(shift: float, boundary_ratio: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """For each training index, the expert that generates at its timestep: long [N]."""
    return expert_index(shifted_grid(shift, num_train_timesteps) * num_train_timesteps, boundary_ratio,
                        num_train_timesteps)


def flow_errors(predict: Predict, winner: torch.Tensor, loser: torch.Tensor, noise: torch.Tensor,
                sigmas: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity errors of winners and losers [B] each, in one batched call with shared σ and ε."""
    x0 = torch.cat([winner, loser])
    eps, s2, t2 = torch.cat([noise, noise]), torch.cat([sigmas, sigmas]), torch.cat([timesteps, timesteps])
    errors = masked_error(predict(noised(x0, eps, s2), t2), eps - x0, mask)
    return errors[: winner.shape[0]], errors[winner.shape[0]:]
