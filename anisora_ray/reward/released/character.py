"""Released character consistency: detect and segment the character, crop, embed with the released
BLIP ViT-L recognizer (``animate_recoginzer.pth``), and compare with a gallery of known characters.

Released math (``infer_retrieval_pretrain_v2.py``): raw (un-normalised) ``vision_proj`` embeddings;
the dot products of each of 8 crops with every gallery image are averaged per (lower-cased) name, a
softmax runs over names, the probabilities are averaged over the crops. The score (``identity``):
``top1``, the default and the released score, is the top-1 probability ("does the clip look like
*some* known character"); ``own`` is the probability of *this prompt's* character
(``character_id``), where a character with no gallery entry is represented by its first-frame
image, added as one more identity, so the clip is scored against itself at frame 0.

Crops as in ``load_rgb_frames``: the mask's bounding box, background blacked out, zero-padded to a
square (centred), bilinear to the recognizer's size, CLIP statistics. Differences, said plainly: the
released code tracks up to 5 objects with SAMURAI (SAM 2.1) from boxes on frame 0 and crops 8 of
each object's tracked frames (``frames[::len // 8][:8]``); here that rule picks up to 8 of the
sampled frames first, and only those are detected (the best GroundingDINO box) and segmented (SAM):
a frame without a detection gives no crop. The gallery is embedded once by the scorer, on its
device, and cached beside the weights (:mod:`.gallery`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from anisora_ray.errors import ConfigError
from anisora_ray.reward.base import ClipBatch, register
from anisora_ray.reward.character import CharacterDetector
from anisora_ray.reward.released import gallery
from anisora_ray.reward.released.blip import BlipRetrievalModel, convert_retrieval
from anisora_ray.reward.released.common import load_strict, read_converted, released_pixels, write_converted

FAMILY = "blip_retrieval"


def square_crop(frame: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray | None) -> np.ndarray:
    """The masked character on black, cut to the mask's bounding box and zero-padded to a centred square."""
    m = np.zeros(frame.shape[:2], bool)
    x0, y0, x1, y1 = box
    if mask is None:
        m[y0:y1, x0:x1] = True
    else:
        m = mask.astype(bool)
        if not m.any():  # SAM found nothing inside the box: the box stands in
            m[y0:y1, x0:x1] = True
    ys, xs = np.nonzero(m)
    cut = (frame * m[..., None])[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = cut.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side, 3), np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = cut
    return out


def identity_probabilities(query: torch.Tensor, gallery: torch.Tensor, names: list[str]) -> torch.Tensor:
    """query [n, E], gallery [G, E] (raw) → [N] probabilities over the unique ``names`` (order of first use)."""
    unique = list(dict.fromkeys(names))
    index = torch.tensor([unique.index(n) for n in names], device=query.device)
    sims = query @ gallery.T  # [n, G]
    per_name = torch.zeros(len(query), len(unique), device=query.device, dtype=sims.dtype)
    per_name.index_add_(1, index, sims)
    per_name = per_name / torch.bincount(index, minlength=len(unique)).to(sims.dtype)
    return per_name.softmax(dim=-1).mean(dim=0)


def convert_character(recognizer: str, gallery_json: str, gallery_source: str, out_dir: str,
                      heads: int | None = None) -> str:
    """The released recognizer and gallery (``gallerys.json`` entries ``{"image", "caption"}``, the crops in
    ``gallery_source``: the code's ``character/videos/`` or the Hub's ``videos.tar.gz``) → a converted
    folder with the crops copied into ``gallery/`` (names lower-cased); the scorer embeds them."""
    config, model = convert_retrieval(recognizer, heads)
    entries = gallery.collect(gallery_json, gallery_source, out_dir)
    config["gallery_images"] = [e["image"] for e in entries]
    config["gallery_names"] = [e["name"] for e in entries]
    write_converted(out_dir, config, model.state_dict())
    return out_dir


@register("character", "released")
class ReleasedCharacter:
    """Released character consistency (``checkpoint``: a folder written by ``anisora-ray convert-reward``;
    else converted from ``source`` on first use, ``code`` naming a clone of bilibili/Index-anisora or its
    ``gallerys.json`` when ``source`` is the Hub). ``identity``: ``top1`` (as released) or ``own``."""

    name = "character"

    @staticmethod
    def check_options(options: dict) -> None:
        """On the driver, before any actor starts: the Hub has no ``gallerys.json``, so a Hub source needs ``code``."""
        source = options.get("source", "IndexTeam/Index-anisora")
        if not options.get("checkpoint") and not options.get("code") and not os.path.exists(os.path.expanduser(source)):
            raise ConfigError(
                f"reward.dimensions.character.options.code is not set while source = {source!r} is the Hugging Face "
                "Hub, which lacks the gallery's names (gallerys.json is only in github.com/bilibili/Index-anisora, at "
                "reward/character/BLIP/data/gallerys.json): clone that repository where every node sees it and set "
                "options.code to the clone (or to gallerys.json), or convert once with `anisora-ray convert-reward "
                "--source ... --code ... --out DIR` and set options.checkpoint = DIR/character")
        code = options.get("code")
        if code and not options.get("checkpoint") and "://" not in code and not os.path.exists(os.path.expanduser(code)):
            raise ConfigError(
                f"reward.dimensions.character.options.code {code!r} does not exist: clone github.com/bilibili/Index-anisora "
                "there (`git clone --depth 1 https://github.com/bilibili/Index-anisora`), where every node sees it, or "
                "point it at the clone or its reward/character/BLIP/data/gallerys.json")

    def __init__(self, checkpoint: str | None = None, source: str = "IndexTeam/Index-anisora", code: str | None = None,
                 detector: str = "IDEA-Research/grounding-dino-base",
                 segmenter: str | None = "facebook/sam-vit-base", query: str = "character.", box_threshold: float = 0.5,
                 text_threshold: float = 0.5, crops: int = 8, identity: str = "top1", device: str = "auto",
                 dtype: str = "float32", cache_dir: str = "~/.cache/anisora-ray", model_batch: int = 32,
                 detector_size: int | None = None, gallery_batch: int = 64):
        if identity not in ("own", "top1"):
            raise ValueError(f"identity must be 'top1' (as released) or 'own' (this prompt's character), got {identity!r}")
        from anisora_ray.reward.released.convert import resolve_checkpoint

        checkpoint = resolve_checkpoint(self.name, checkpoint, source, cache_dir, code=code)
        config, tensors = read_converted(checkpoint, FAMILY)
        self.detect = CharacterDetector(detector, segmenter, query, box_threshold, text_threshold, device, dtype,
                                        cache_dir, model_batch, detector_size)
        self.device = self.detect.device
        self.model = load_strict(BlipRetrievalModel(config), tensors, checkpoint).to(self.device).eval()
        self.size, self.crops, self.identity = config["vision"]["image_size"], int(crops), identity
        self.names = list(config["gallery_names"])
        self.gallery, self.gallery_embedded = gallery.gallery_embeddings(self.model, checkpoint, config, self.device,
                                                                         cache_dir, gallery_batch)

    def crop_pixels(self, frames: np.ndarray, limit: int | None) -> torch.Tensor:
        """Crops of up to ``limit`` frames spread as ``frames[::len // limit][:limit]``: only those are
        detected and segmented; a frame without a detection gives no crop."""
        if limit:
            frames = frames[:: max(1, len(frames) // limit)][:limit]
        crops = [square_crop(f, *r) for f, r in zip(frames, self.detect.regions(frames), strict=True) if r is not None]
        if not crops:
            return torch.zeros(0, 3, self.size, self.size, device=self.device)
        return released_pixels(crops, self.size, self.device, resample="bilinear")

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str]]:
        """Identity probabilities of crops (and the names), with ``extra`` [E] as one more identity."""
        gallery, names = self.gallery, self.names
        if extra is not None:
            gallery, names = torch.cat([gallery, extra[None]]), [*names, "\0first-frame"]
        return identity_probabilities(self.model(pixels), gallery, names), list(dict.fromkeys(names))

    @torch.no_grad()
    def score(self, batch: ClipBatch) -> np.ndarray:
        out = np.full(len(batch), np.nan)  # no character detected → NaN, quarantined with its reason
        for i, clip in enumerate(batch.frames):
            pixels = self.crop_pixels(clip, self.crops)
            if not len(pixels):
                continue
            own = (batch.character_ids[i] or "").lower()
            if self.identity == "top1":
                out[i] = float(self.probabilities(pixels)[0].max())
            elif own in self.names:
                probs, names = self.probabilities(pixels)
                out[i] = float(probs[names.index(own)])
            else:  # no gallery entry: the first-frame image's character is the identity to keep
                image = batch.references[i] if batch.references[i] is not None else batch.images[i]
                ref = self.crop_pixels(image[None], 1)
                if not len(ref):
                    ref = released_pixels([image], self.size, self.device, resample="bilinear")
                probs, _ = self.probabilities(pixels, extra=self.model(ref)[0])
                out[i] = float(probs[-1])
        return out
