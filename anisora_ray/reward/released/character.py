"""Released character consistency: detect and segment the character, crop, embed with the released
BLIP ViT-L recognizer (``animate_recoginzer.pth``), and compare with a gallery of known characters.

Released math (``infer_retrieval_pretrain_v2.py``): raw (un-normalised) ``vision_proj`` embeddings;
the dot products of each of 8 crops with every gallery image are averaged per (lower-cased) name, a
softmax runs over names, the probabilities are averaged over the crops. The released score is the
top-1 probability (``identity: top1``): "does the clip look like *some* known character". By
default (``identity: own``) the score is the probability of *this prompt's* character
(``character_id``); a character with no gallery entry is represented by its first-frame image,
added as one more identity, so the clip is scored against itself at frame 0.

Crops as in ``load_rgb_frames``: the mask's bounding box, background blacked out, zero-padded to a
square (centred), bilinear to the recognizer's size, CLIP statistics. Differences, said plainly: the
released code tracks up to 5 objects with SAMURAI (SAM 2.1) from boxes on frame 0 and needs 8
tracked frames per object; here the best GroundingDINO box per frame is segmented with SAM and the
crops come from up to 8 of the frames with a detection (the fewer there are, the fewer crops).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from anisora_ray.reward.base import ClipBatch, register
from anisora_ray.reward.character import CharacterDetector
from anisora_ray.reward.released.blip import BlipRetrievalModel, convert_retrieval
from anisora_ray.reward.released.common import (
    CheckpointError,
    load_strict,
    read_converted,
    released_pixels,
    write_converted,
)

FAMILY = "blip_retrieval"
GALLERY = "gallery.safetensors"


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


def convert_character(recognizer: str, gallery_json: str, gallery_root: str, out_dir: str, heads: int | None = None,
                      batch: int = 64) -> str:
    """The released recognizer and gallery (``gallerys.json`` entries ``{"image", "caption"}`` under
    ``gallery_root``) → a converted folder with the gallery embedded once (names lower-cased)."""
    from PIL import Image
    from safetensors.torch import save_file

    config, model = convert_retrieval(recognizer, heads)
    try:
        with open(gallery_json) as f:
            entries = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"character gallery {gallery_json} cannot be read: {exc}") from exc
    names, embeddings = [], []
    size = config["vision"]["image_size"]
    for i in range(0, len(entries), batch):
        chunk = entries[i : i + batch]
        images = []
        for e in chunk:
            path = os.path.join(gallery_root, e["image"])
            try:
                images.append(np.asarray(Image.open(path).convert("RGB")))
            except OSError as exc:
                raise CheckpointError(f"character gallery image {path} ({e.get('caption')!r}) cannot be read: {exc}") from exc
            names.append(str(e["caption"]).lower())
        with torch.no_grad():
            embeddings.append(model(released_pixels(images, size, "cpu")))
    if len(set(names)) < 2:
        raise CheckpointError(f"character gallery {gallery_json}: {len(set(names))} name(s); the softmax needs at least 2")
    config["gallery_names"] = names
    write_converted(out_dir, config, model.state_dict())
    save_file({"embeddings": torch.cat(embeddings).contiguous()}, os.path.join(out_dir, GALLERY))
    return out_dir


@register("character", "released")
class ReleasedCharacter:
    """Released character consistency (``checkpoint``: a folder written by ``anisora-ray convert-reward``)."""

    name = "character"

    def __init__(self, checkpoint: str | None = None, source: str = "IndexTeam/Index-anisora",
                 detector: str = "IDEA-Research/grounding-dino-base",
                 segmenter: str | None = "facebook/sam-vit-base", query: str = "character.", box_threshold: float = 0.5,
                 text_threshold: float = 0.5, crops: int = 8, identity: str = "own", device: str = "auto",
                 dtype: str = "float32", cache_dir: str = "~/.cache/anisora-ray", model_batch: int = 32,
                 detector_size: int | None = None):
        from safetensors.torch import load_file

        if identity not in ("own", "top1"):
            raise ValueError(f"identity must be 'own' (this prompt's character) or 'top1' (as released), got {identity!r}")
        from anisora_ray.reward.released.convert import resolve_checkpoint

        checkpoint = resolve_checkpoint(self.name, checkpoint, source, cache_dir)
        config, tensors = read_converted(checkpoint, FAMILY)
        self.detect = CharacterDetector(detector, segmenter, query, box_threshold, text_threshold, device, dtype,
                                        cache_dir, model_batch, detector_size)
        self.device = self.detect.device
        self.model = load_strict(BlipRetrievalModel(config), tensors, checkpoint).to(self.device).eval()
        self.size, self.crops, self.identity = config["vision"]["image_size"], int(crops), identity
        self.names = list(config["gallery_names"])
        self.gallery = load_file(os.path.join(checkpoint, GALLERY))["embeddings"].to(self.device)

    def crop_pixels(self, frames: np.ndarray, limit: int | None) -> torch.Tensor:
        """Crops of up to ``limit`` frames with a detection, spread as ``frames[::len // limit][:limit]``."""
        found = [(f, r) for f, r in zip(frames, self.detect.regions(frames), strict=True) if r is not None]
        if limit:
            found = found[:: max(1, len(found) // limit)][:limit]
        crops = [square_crop(f, *r) for f, r in found]
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
