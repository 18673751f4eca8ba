"""The GAPO loss (Gap-Aware Preference Optimization, Index-AniSora).

Per pair i, with e the mean squared error of the prediction target (v for CogVideoX, ε for epsilon
models, velocity for flow matching) at the **same noise and timestep** for winner and loser, and
the frozen reference's errors computed under no_grad:

    logit_i = -beta/2 * ((e_model_w - e_ref_w) - (e_model_l - e_ref_l))   # implicit reward margin
    dpo_i   = -logsigmoid(logit_i)                                          # Diffusion-DPO
    gain_i  = alpha ** r_w - alpha ** r_l                                   # r in [0, 1]
    loss    = mean_i(gain_i * dpo_i)                                        # per pair, not mean·mean

Defaults: beta = 5000 (Diffusion-DPO), alpha = 2 (the released Index-AniSora code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GapoLoss:
    loss: torch.Tensor  # scalar, differentiable
    dpo: torch.Tensor  # [B] Diffusion-DPO term per pair
    gain: torch.Tensor  # [B] reward gain per pair (ones when the gain is off)
    margin: torch.Tensor  # [B] implicit reward margin (the DPO logit)
    expert: int = 0  # the expert the draw trained (two-expert models)

    def metrics(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "dpo": float(self.dpo.detach().mean()),
            "gain": float(self.gain.detach().mean()),
            "margin": float(self.margin.detach().mean()),
            "implicit_accuracy": float((self.margin.detach() > 0).float().mean()),
        }


def gapo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    reward_w: torch.Tensor,
    reward_l: torch.Tensor,
    *,
    beta: float = 5000.0,
    alpha: float = 2.0,
    use_gain: bool = True,
) -> GapoLoss:
    """GAPO over a batch of B pairs (every argument [B]); ``use_gain=False`` is plain Diffusion-DPO."""
    named = {"model_err_w": model_err_w, "model_err_l": model_err_l, "ref_err_w": ref_err_w,
             "ref_err_l": ref_err_l, "reward_w": reward_w, "reward_l": reward_l}
    shape = model_err_w.shape
    for name, t in named.items():
        if t.ndim != 1 or t.shape != shape:
            raise ValueError(f"gapo_loss: {name} has shape {tuple(t.shape)}; every argument must be [B] = {tuple(shape)}")
    for name in ("reward_w", "reward_l"):
        r = named[name].detach()
        if not torch.isfinite(r).all() or (r < 0).any() or (r > 1).any():
            raise ValueError(f"gapo_loss: {name} must be normalized rewards in [0, 1], got {r.tolist()}")
    swapped = (reward_w.detach() < reward_l.detach()).nonzero().flatten().tolist()
    if swapped:
        raise ValueError(f"gapo_loss: pair(s) {swapped} have reward_w < reward_l (winner and loser swapped?)")
    if beta <= 0:
        raise ValueError(f"gapo_loss: beta ({beta}) must be > 0")
    if use_gain and alpha <= 1:  # α^r̂w − α^r̂l is 0 for α = 1 and negative below: the loser would be preferred
        raise ValueError(f"gapo_loss: alpha ({alpha}) must be > 1 (1 zeroes every gain; the DPO ablation is "
                         "use_gain=False)")
    model_diff = model_err_w - model_err_l
    ref_diff = (ref_err_w - ref_err_l).detach()
    margin = -0.5 * beta * (model_diff - ref_diff)
    dpo = -F.logsigmoid(margin)
    if use_gain:
        gain = (alpha ** reward_w.detach().double() - alpha ** reward_l.detach().double()).to(dpo.dtype)
    else:
        gain = torch.ones_like(dpo)
    return GapoLoss(loss=(gain * dpo).mean(), dpo=dpo, gain=gain, margin=margin)
