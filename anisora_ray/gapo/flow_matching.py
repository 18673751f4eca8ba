"""The flow-matching side of GAPO (the Wan family, issue 28): noising, target, masked error, expert routing.

Rectified flow as Wan trains and samples it: x_σ = (1 − σ)·x₀ + σ·ε, the model predicts the velocity
v = ε − x₀, and σ is drawn on the scheduler's training grid with its static shift
(σ' = shift·s / (1 + (shift − 1)·s), s = i/N, timestep = σ'·N, as ``FlowMatchEulerDiscreteScheduler`` builds it).
Winner, loser and reference share σ and ε. Latents that are given, not generated (the conditioned first frame
of Wan2.2-TI2V's ``expand_timesteps``), are left out of the error by a mask — a mean over the generated positions
only, not a mean that counts them as zero. Wan2.2-A14B's two experts split the timesteps at
``boundary_ratio · N``: ``transformer`` at t ≥ boundary (high noise), ``transformer_2`` below, as the pipeline
routes them. Layout: [B, C, F, h, w] (diffusers' Wan); no Ray, no diffusers import.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from anisora_ray.gapo.loss import GapoLoss, gapo_loss, prediction_error

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy latents [B,C,F,h,w], timesteps [B]) → v


def scheduler_shift(config) -> float:
    """The static shift of a flow scheduler's config (UniPC's ``flow_shift``, FlowMatchEuler's ``shift``)."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    if get("use_dynamic_shifting", False):
        raise ValueError("a flow scheduler with use_dynamic_shifting has no fixed training shift: set its shift")
    return float(get("flow_shift", None) or get("shift", None) or 1.0)


def draw_sigmas(batch: int, generator: torch.Generator, shift: float = 1.0, num_train_timesteps: int = 1000,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """σ [B] drawn uniformly from the shifted training grid, and the matching timesteps σ·N [B]."""
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    index = torch.randint(1, num_train_timesteps + 1, (batch,), generator=generator, device=generator.device)
    s = index.double() / num_train_timesteps
    sigmas = (shift * s / (1 + (shift - 1) * s)).float().to(device)
    return sigmas, sigmas * num_train_timesteps


def noised(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def masked_error(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean squared error in float32 over the positions where ``mask`` is 1 ([B|1, 1, F, h, w],
    broadcast over channels): [B, C, F, h, w] → [B]. No mask: every position."""
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


def flow_errors(predict: Predict, winner: torch.Tensor, loser: torch.Tensor, noise: torch.Tensor,
                sigmas: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity errors of winners and losers [B] each, in one batched call with shared σ and ε."""
    x0 = torch.cat([winner, loser])
    eps, s2, t2 = torch.cat([noise, noise]), torch.cat([sigmas, sigmas]), torch.cat([timesteps, timesteps])
    errors = masked_error(predict(noised(x0, eps, s2), t2), eps - x0, mask)
    return errors[: winner.shape[0]], errors[winner.shape[0]:]


def flow_gapo_step(model: Predict, reference: Predict, winner: torch.Tensor, loser: torch.Tensor,
                   reward_w: torch.Tensor, reward_l: torch.Tensor, generator: torch.Generator, *, shift: float = 1.0,
                   num_train_timesteps: int = 1000, mask: torch.Tensor | None = None, beta: float = 5000.0,
                   alpha: float = 2.0, use_gain: bool = True) -> GapoLoss:
    """One GAPO loss by flow matching: shared σ and ε for the pair, the policy with grad, the reference without."""
    noise = torch.randn(winner.shape, generator=generator, device=generator.device).to(winner.device, winner.dtype)
    sigmas, timesteps = draw_sigmas(winner.shape[0], generator, shift, num_train_timesteps, winner.device)
    model_w, model_l = flow_errors(model, winner, loser, noise, sigmas, timesteps, mask)
    with torch.no_grad():
        ref_w, ref_l = flow_errors(reference, winner, loser, noise, sigmas, timesteps, mask)
    return gapo_loss(model_w, model_l, ref_w, ref_l, reward_w, reward_l, beta=beta, alpha=alpha, use_gain=use_gain)
