"""GAPO: the Diffusion-DPO loss weighted per pair by the reward gain alpha**r_w - alpha**r_l."""

from anisora_ray.gapo.loss import GapoLoss, gapo_loss
from anisora_ray.models.objectives import prediction_error

__all__ = ["GapoLoss", "gapo_loss", "prediction_error"]
