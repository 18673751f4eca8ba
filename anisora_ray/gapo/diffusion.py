"""The diffusion side of GAPO, for any generator family: pair latents in, per-sample errors and the loss out.

Winner and loser of a pair are noised with the **same noise and timestep** (one :class:`NoiseDraw` of the
family), each conditioned as its own rollout was (its image condition; for families whose condition is
sampled with the video's seed, the loser's differs), and passed through the trained module in one batched
call (``[winners; losers]``); the error is the family's training target (v-prediction for CogVideoX, flow
matching for Wan). The reference runs the same inputs under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from anisora_ray.gapo.loss import GapoLoss, gapo_loss
from anisora_ray.models.families import GeneratorFamily, NoiseDraw


@dataclass(frozen=True)
class PairLatents:
    winner: torch.Tensor  # [B, ...] latents in the family's layout
    loser: torch.Tensor  # [B, ...]
    condition: dict[str, torch.Tensor]  # the winner's conditioning tensors, each [B, ...]
    prompt_embeds: torch.Tensor  # [B, L, D]
    reward_w: torch.Tensor  # [B] normalized rewards
    reward_l: torch.Tensor  # [B]
    loser_condition: dict[str, torch.Tensor] | None = None  # the loser's (None: ``condition``)

    def both_conditions(self) -> dict[str, torch.Tensor]:
        loser = self.condition if self.loser_condition is None else self.loser_condition
        return {k: torch.cat([v, loser[k]]) for k, v in self.condition.items()}


def draw_for(family: GeneratorFamily, pipe, batch: PairLatents, generator: torch.Generator,
             shared: torch.Generator | None = None, timesteps: torch.Tensor | None = None) -> NoiseDraw:
    return family.draw(pipe, tuple(batch.winner.shape), generator, shared, batch.winner.device, timesteps)


def pair_errors(family: GeneratorFamily, pipe, model, batch: PairLatents, draw: NoiseDraw
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample errors of winners and losers, in one batched call with the shared draw."""
    errors = family.errors(pipe, model, torch.cat([batch.winner, batch.loser]), batch.both_conditions(),
                           torch.cat([batch.prompt_embeds] * 2), draw.doubled())
    b = batch.winner.shape[0]
    return errors[:b], errors[b:]


def gapo_step(family: GeneratorFamily, pipe, model, reference, batch: PairLatents, generator: torch.Generator, *,
              shared: torch.Generator | None = None, beta: float = 5000.0, alpha: float = 2.0,
              use_gain: bool = True, timesteps: torch.Tensor | None = None) -> GapoLoss:
    """One GAPO loss evaluation: one draw shared by the pair (from ``timesteps`` when given), model errors with
    grad, reference without."""
    draw = draw_for(family, pipe, batch, generator, shared, timesteps)
    model_w, model_l = pair_errors(family, pipe, model, batch, draw)
    with torch.no_grad():
        ref_w, ref_l = pair_errors(family, pipe, reference, batch, draw)
    return replace(gapo_loss(model_w, model_l, ref_w, ref_l, batch.reward_w, batch.reward_l, beta=beta, alpha=alpha,
                             use_gain=use_gain), expert=draw.expert)


def sft_step(family: GeneratorFamily, pipe, model, batch: PairLatents, generator: torch.Generator,
             shared: torch.Generator | None = None, timesteps: torch.Tensor | None = None) -> GapoLoss:
    """The paper's SFT baseline: the diffusion loss on the winners alone."""
    draw = draw_for(family, pipe, batch, generator, shared, timesteps)
    err_w, _ = pair_errors(family, pipe, model, batch, draw)
    zero = torch.zeros_like(err_w)
    return GapoLoss(loss=err_w.mean(), dpo=err_w, gain=torch.ones_like(err_w), margin=zero, expert=draw.expert)
