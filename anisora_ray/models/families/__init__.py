"""Generator families: everything that differs between image-to-video model families, behind one interface.

A family module owns the pipeline class and how it is loaded (whole, for training, or only its encoders),
the tiny random-init model built from ``model.tiny``, the latent layout, the image conditioning, the noising
and training target, the module a weights refresh publishes (the transformer, or both experts), and how a
rollout is called. Generation, pairs, GAPO, export, refresh, compile, guard, eval and the CLI only talk to a
:class:`GeneratorFamily` (``family_of(cfg.model)``). A third family is one module here plus a config:
subclass :class:`GeneratorFamily`, implement its abstract methods, add it to :data:`FAMILIES`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch

from anisora_ray.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_pipeline(pipeline_class, pretrained: str, dtype: str, device: str, revision: str | None, skip: dict):
    """``pipeline_class.from_pretrained`` (safetensors only, progress bars off) without the components named in
    ``skip``; every loaded torch module moved to ``device`` in eval mode."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = pipeline_class.from_pretrained(pretrained, dtype=DTYPES[dtype], revision=revision, use_safetensors=True,
                                          **skip)
    target = pick_device(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.to(target).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class NoiseDraw:
    """What winner, loser and reference share in one GAPO evaluation."""

    noise: torch.Tensor  # latent-shaped, [B, ...]
    timesteps: torch.Tensor  # [B]
    sigmas: torch.Tensor | None = None  # [B], flow matching
    expert: int = 0  # the expert every sample of this draw goes to (two-expert models)

    def doubled(self) -> NoiseDraw:
        """The same draw for ``[winners; losers]``."""
        sig = None if self.sigmas is None else torch.cat([self.sigmas, self.sigmas])
        return NoiseDraw(torch.cat([self.noise, self.noise]), torch.cat([self.timesteps, self.timesteps]), sig,
                         self.expert)


class GeneratorFamily(abc.ABC):
    """One image-to-video model family. Stateless: one instance serves every pipeline of the family."""

    name: str = ""
    description: str = ""

    # ---- models -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def tiny_builders(self):
        """``(fingerprint, save)`` of the family's tiny model, both called with ``(tiny, height, width, num_frames)``
        (``save`` also with ``out_dir``): a hash of everything the tiny model depends on, and the build (warm-started
        when configured) saved as safetensors, atomically, keeping an existing folder."""

    def tiny_key(self, model, generator) -> str:
        fingerprint, _ = self.tiny_builders()
        return fingerprint(model.tiny, generator.height, generator.width, generator.num_frames)

    def save_tiny(self, model, generator, out_dir: str) -> str:
        _, save = self.tiny_builders()
        return save(model.tiny, generator.height, generator.width, generator.num_frames, out_dir)

    def tiny_cache_path(self, model, generator) -> str:
        """Where :meth:`tiny_folder` keeps the tiny pipeline of this config under ``model.cache_dir``."""
        import os

        name = f"tiny-{self.name.replace('_', '-')}-{self.tiny_key(model, generator)}"
        return os.path.join(os.path.expanduser(model.cache_dir), name)

    def tiny_folder(self, model, generator) -> str:
        """The tiny pipeline's folder under ``model.cache_dir``, built on first use."""
        return self.save_tiny(model, generator, self.tiny_cache_path(model, generator))

    attention_dispatcher = False  # its attention goes through diffusers' dispatcher (set_attention_backend)
    # The latents' layout ("BFCHW", "BCFHW") when the pipeline runs CFG's two branches as one batch (FasterCache
    # approximates the unconditional half from the conditional one); None: two calls per step (Wan)
    batched_cfg_layout: str | None = None

    @abc.abstractmethod
    def load(self, pretrained: str, dtype: str, device: str, revision: str | None, parts: str = "all"):
        """``from_pretrained`` (safetensors only) in eval mode. ``parts``: ``all`` (a replica), ``trainer``
        (the trained modules and the scheduler only), ``encoders`` (what encodes videos, images and prompts)."""

    @abc.abstractmethod
    def trained_module(self, pipe) -> torch.nn.Module:
        """The module GAPO trains and a refresh publishes (its parameter names are the weights' names)."""

    def use_sampler(self, pipe, generator) -> None:
        """Set the rollout sampler from ``generator`` (a ``GeneratorConfig``): ``scheduler`` (``pretrained`` keeps the
        checkpoint's) and ``flow_shift``. Replicas and GAPO workers both call it, so both see one sampler."""
        if generator.scheduler != "pretrained":
            raise ValueError(f"generator.scheduler={generator.scheduler!r} is not available for model.family={self.name!r}")
        if generator.flow_shift is not None:
            raise ValueError(f"generator.flow_shift applies to flow-matching families; model.family={self.name!r} is not one")

    def rollout_timesteps(self, pipe, steps: int) -> torch.Tensor:
        """The timesteps a rollout of ``steps`` denoising steps calls the denoiser at, as the pipeline sets them on
        ``pipe``'s scheduler (a copy of it, so the pipeline's own state is untouched): [steps], on the CPU."""
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps, device="cpu")
        return scheduler.timesteps.detach().clone().cpu()

    # ---- rollouts -----------------------------------------------------------------------------------
    def geometry_problems(self, pipe, cfg) -> list[str]:
        """What in ``cfg`` (a ``GeneratorConfig``) the loaded pipeline cannot render as asked: the size must be a
        multiple of the VAE's spatial factor × the transformer's patch (diffusers would round it down with a
        warning, and the videos would not have the size GAPO trains at)."""
        patch = getattr(pipe.transformer.config, "patch_size", 1)
        patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
        step = int(getattr(pipe, "vae_scale_factor_spatial", 1) or 1) * int(patch or 1)
        bad = [f"generator.{k} = {v}" for k, v in (("height", cfg.height), ("width", cfg.width)) if v % step]
        return [f"{' and '.join(bad)}: must be a multiple of {step} (VAE factor x patch size)"] if bad else []

    def check_geometry(self, pipe, cfg, pretrained: str) -> None:
        problems = self.geometry_problems(pipe, cfg)
        if problems:
            raise ConfigError(f"model.pretrained={pretrained!r} cannot render what the config asks: " + "; ".join(problems))

    @abc.abstractmethod
    def render(self, pipe, images: list, prompts: list[str], generators: list[torch.Generator], cfg,
               steps: int | None = None) -> np.ndarray:
        """Videos for (image, prompt, generator) triples as float [N, F, H, W, 3] in [0, 1]."""

    def prompt_tokens(self, pipe, text: str) -> int:
        return len(pipe.tokenizer(text, add_special_tokens=True).input_ids)

    # ---- training -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def text_length(self, pipe, cfg) -> int:
        """The prompt-embedding length the transformer is trained with."""

    @abc.abstractmethod
    def encode_video(self, encoders, frames: np.ndarray) -> torch.Tensor:
        """uint8 [F, H, W, 3] → the latents the model generates (posterior mode; no batch dimension)."""

    @abc.abstractmethod
    def encode_condition(self, encoders, image, seed: int, height: int, width: int, num_frames: int
                         ) -> dict[str, torch.Tensor]:
        """The conditioning tensors of one rollout (no batch dimension), computed as the pipeline does."""

    def condition_uses_seed(self) -> bool:
        """Whether the condition depends on the rollout's seed (a sampled posterior) or only on the image."""
        return False

    @abc.abstractmethod
    def encode_prompt(self, encoders, text: str, length: int) -> torch.Tensor:
        """[L, D] prompt embeddings."""

    @abc.abstractmethod
    def draw(self, pipe, shape: tuple[int, ...], generator: torch.Generator, shared: torch.Generator | None = None,
             device=None, timesteps: torch.Tensor | None = None) -> NoiseDraw:
        """Noise and timesteps for ``shape`` latents ([B, ...]); ``shared`` is seeded alike on every rank
        (what must agree across ranks, e.g. which expert trains). ``timesteps``: draw only from these
        (:meth:`rollout_timesteps`, ``gapo.timesteps: rollout``); None: the whole training grid."""

    @abc.abstractmethod
    def errors(self, pipe, model, latents: torch.Tensor, condition: dict[str, torch.Tensor],
               prompt_embeds: torch.Tensor, draw: NoiseDraw, frame_weights: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Per-sample training error [B] of ``model`` (called like :meth:`trained_module`) on noised
        ``latents``; ``frame_weights`` [F'] weighs latent frames (the warm start)."""

    @abc.abstractmethod
    def warm_start_loss(self, pipe, clips: np.ndarray, prompts: list[str], first_frame_weight: float,
                        text_length: int) -> torch.Tensor:
        """The denoising loss of the whole pipeline on clean uint8 clips [B, F, H, W, 3] (the tiny warm start),
        the first latent frame weighted ``first_frame_weight`` times a later one, prompts embedded at
        ``text_length``."""


def family_names() -> list[str]:
    return sorted(FAMILIES)


def get_family(name: str) -> GeneratorFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model.family {name!r}; known: {family_names()}")
    return FAMILIES[name]


def family_of(model) -> GeneratorFamily:
    """The family of a ``ModelConfig``."""
    return get_family(model.family)


def _registry() -> dict[str, GeneratorFamily]:
    from anisora_ray.models.families.cogvideox_i2v import CogVideoXI2V
    from anisora_ray.models.families.wan_i2v import WanI2V

    return {f.name: f for f in (CogVideoXI2V(), WanI2V())}


FAMILIES: dict[str, GeneratorFamily] = _registry()
