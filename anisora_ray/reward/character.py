"""Character consistency, learned backend: detect, segment, crop, embed, compare with a gallery.

As in the released code (GroundingDINO + SAMURAI crops, BLIP retrieval against a gallery), per frame:
GroundingDINO finds the best box for the text query ``character.``; SAM (optional) segments it and
the background is blacked out; the crop is embedded with a CLIP-family image encoder; the score is
the top-1 cosine similarity to *this prompt's character* — the gallery entries of the clip's
``character_id`` — averaged over ``frames`` frames. The gallery is a safetensors file of one
embedding per character id (``anisora-ray build-gallery``); a clip whose character has no entry (or
no gallery at all) is compared with its reference (or first-frame) image.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import torch

from anisora_ray.io import fs
from anisora_ray.io.images import load_image
from anisora_ray.models.pipeline import DTYPES, pick_device
from anisora_ray.models.tiny_reward import resolve_backbone
from anisora_ray.reward.base import ClipBatch, register
from anisora_ray.reward.encoders import Backbone, l2
from anisora_ray.reward.learned import even_indices

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class CharacterDetector:
    """GroundingDINO boxes for a text query, and (optionally) SAM masks inside them, frame by frame."""

    def __init__(self, detector: str, segmenter: str | None, query: str = "character.", box_threshold: float = 0.35,
                 text_threshold: float = 0.25, device: str = "auto", dtype: str = "float32",
                 cache_dir: str = "~/.cache/anisora-ray", model_batch: int = 32, detector_size: int | None = None):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor

        self.device, dtype_ = pick_device(device), DTYPES[dtype]
        det = resolve_backbone(detector, cache_dir)
        self.det_processor = AutoProcessor.from_pretrained(det)
        self.detector = AutoModelForZeroShotObjectDetection.from_pretrained(det, dtype=dtype_, use_safetensors=True)
        self.detector.eval().requires_grad_(False).to(self.device)
        self.segmenter = self.seg_processor = None
        if segmenter:
            seg = resolve_backbone(segmenter, cache_dir)
            self.seg_processor = SamProcessor.from_pretrained(seg)
            self.segmenter = SamModel.from_pretrained(seg, dtype=dtype_, use_safetensors=True)
            self.segmenter.eval().requires_grad_(False).to(self.device)
        self.query = query
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        self.model_batch = int(model_batch)  # frames per GroundingDINO / SAM call
        # The detector's input size (shortest edge); None keeps its processor's (800 for GroundingDINO).
        self.detector_kwargs = {} if detector_size is None else {
            "size": {"shortest_edge": int(detector_size), "longest_edge": int(detector_size) * 1333 // 800}}

    @torch.no_grad()
    def boxes(self, frames: np.ndarray) -> list[list[float] | None]:
        """The best box [x0, y0, x1, y1] for the query in each frame, or None."""
        if len(frames) > self.model_batch:
            return [b for i in range(0, len(frames), self.model_batch) for b in self.boxes(frames[i : i + self.model_batch])]
        images = list(frames)
        inputs = self.det_processor(images=images, text=[self.query] * len(images), return_tensors="pt",
                                    **self.detector_kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.detector.dtype)
        outputs = self.detector(**inputs)
        results = self.det_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[f.shape[:2] for f in images])
        out: list[list[float] | None] = []
        for r in results:
            out.append(r["boxes"][int(r["scores"].argmax())].tolist() if len(r["scores"]) else None)
        return out

    @torch.no_grad()
    def masks(self, frames: np.ndarray, boxes: list[list[float]]) -> list[np.ndarray]:
        if len(frames) > self.model_batch:
            step = self.model_batch
            return [m for i in range(0, len(frames), step) for m in self.masks(frames[i : i + step], boxes[i : i + step])]
        inputs = self.seg_processor(images=list(frames), input_boxes=[[b] for b in boxes], return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.segmenter.dtype)
        outputs = self.segmenter(**inputs, multimask_output=False)
        masks = self.seg_processor.image_processor.post_process_masks(
            outputs.pred_masks.float().cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())
        return [m[0, 0].numpy() for m in masks]

    def regions(self, frames: np.ndarray) -> list[tuple[tuple[int, int, int, int], np.ndarray | None] | None]:
        """Per frame: the character's integer box (x0, y0, x1, y1) and its mask (None without a segmenter),
        or None when nothing was detected."""
        boxes = self.boxes(frames)
        found = [i for i, b in enumerate(boxes) if b is not None]
        masks = dict(zip(found, self.masks(frames[found], [boxes[i] for i in found]), strict=True)) if (
            self.segmenter is not None and found) else {}
        out = []
        for i, frame in enumerate(frames):
            if boxes[i] is None:
                out.append(None)
                continue
            h, w = frame.shape[:2]
            x0, y0, x1, y1 = boxes[i]
            x0, y0 = int(np.clip(np.floor(x0), 0, w - 1)), int(np.clip(np.floor(y0), 0, h - 1))
            x1, y1 = int(np.clip(np.ceil(x1), x0 + 1, w)), int(np.clip(np.ceil(y1), y0 + 1, h))
            out.append(((x0, y0, x1, y1), masks.get(i)))
        return out


@register("character", "grounded")
class GroundedCharacter:
    name = "character"

    def __init__(self, detector: str = "IDEA-Research/grounding-dino-tiny", segmenter: str | None = "facebook/sam-vit-base",
                 embedder: str = "openai/clip-vit-large-patch14", gallery: str | None = None, query: str = "character.",
                 box_threshold: float = 0.35, text_threshold: float = 0.25, frames: int = 8,
                 on_no_detection: str = "full_frame", device: str = "auto", dtype: str = "float32",
                 cache_dir: str = "~/.cache/anisora-ray", max_images: int = 256, model_batch: int = 32,
                 detector_size: int | None = None):
        if on_no_detection not in ("full_frame", "skip"):
            raise ValueError(f"on_no_detection must be 'full_frame' or 'skip', got {on_no_detection!r}")
        self.detect = CharacterDetector(detector, segmenter, query, box_threshold, text_threshold, device, dtype,
                                        cache_dir, model_batch, detector_size)
        self.device = self.detect.device
        self.embedder = Backbone(embedder, device=device, dtype=dtype, cache_dir=cache_dir, max_images=max_images, text=False)
        self.frames = int(frames)
        self.on_no_detection = on_no_detection
        self.gallery_ids, self.gallery = ([], None) if gallery is None else load_gallery(gallery, self.device)

    def crops(self, frames: np.ndarray, return_kept: bool = False):
        """One square crop per frame with a character (all frames with ``on_no_detection='full_frame'``)."""
        size = self.embedder.image_size
        out, kept = [], []
        for i, (frame, region) in enumerate(zip(frames, self.detect.regions(frames), strict=True)):
            if region is None:
                if self.on_no_detection == "skip":
                    continue
                crop = frame
            else:
                (x0, y0, x1, y1), mask = region
                if mask is not None and not mask[y0:y1, x0:x1].any():  # SAM found nothing in the box: the box, as
                    mask = None                                       # released (a black crop still embeds)
                crop = frame * mask[..., None] if mask is not None else frame
                crop = np.ascontiguousarray(crop[y0:y1, x0:x1]).astype(np.uint8)
            out.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
            kept.append(i)
        return (out, kept) if return_kept else out

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """l2-normalized embeddings [M, D] of the character crops of ``images`` (uint8 [N, H, W, 3]), M ≤ N."""
        return self.embed_many(images)[0]

    @torch.no_grad()
    def score(self, batch: ClipBatch) -> np.ndarray:
        """Each clip against its own character: the gallery entries of its ``character_id``, or (no
        gallery, or no entry for that id) its reference or first-frame image. All sampled frames of
        the batch and the needed references go through detection, SAM and the embedder together."""
        picked = [clip[even_indices(len(clip), min(self.frames, len(clip)))] for clip in batch.frames]
        owners = np.concatenate([np.full(len(p), i) for i, p in enumerate(picked)])
        frames = np.concatenate(picked)
        own = [self.gallery_rows(cid) for cid in batch.character_ids]
        by_image = [i for i, rows in enumerate(own) if rows is None]
        if by_image:  # these clips' reference (or first-frame) image is their gallery
            refs = [batch.references[i] if batch.references[i] is not None else batch.images[i] for i in by_image]
            refs = [cv2.resize(r, frames.shape[2:0:-1], interpolation=cv2.INTER_AREA) for r in refs]
            frames = np.concatenate([frames, np.stack(refs)])
            owners = np.concatenate([owners, -1 - np.asarray(by_image)])  # -1 - i: clip i's reference
        embeddings, kept = self.embed_many(frames)
        owners = owners[kept]
        out = np.full(len(batch), np.nan)  # no character in any frame (or reference) → NaN, quarantined
        for i in range(len(batch)):
            query = embeddings[torch.from_numpy(owners == i).to(embeddings.device)]
            gallery = self.gallery[own[i]] if own[i] is not None else embeddings[
                torch.from_numpy(owners == -1 - i).to(embeddings.device)]
            if len(query) and len(gallery):
                out[i] = float((query @ gallery.T).max(dim=1).values.mean())
        return out

    def gallery_rows(self, character_id: str | None) -> list[int] | None:
        """Rows of the gallery that show ``character_id``; None when it has none (or there is no gallery)."""
        if self.gallery is None or character_id is None:
            return None
        rows = [j for j, gid in enumerate(self.gallery_ids) if gid == character_id]
        return rows or None

    def embed_many(self, images: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Embeddings of the images that yield a crop, and the indices of those images."""
        crops, kept = self.crops(images, return_kept=True)
        if not crops:
            return torch.zeros(0, 1, device=self.device), np.zeros(0, np.int64)
        return l2(self.embedder.image_features(np.stack(crops))), np.asarray(kept)


def load_gallery(uri: str, device: torch.device | str = "cpu") -> tuple[list[str], torch.Tensor]:
    from safetensors.torch import load

    tensors = load(fs.read_bytes(uri))
    meta = json.loads(fs.read_bytes(uri + ".json"))
    return list(meta["ids"]), tensors["embeddings"].to(device)


def build_gallery(scorer: GroundedCharacter, references_uri: str, out_uri: str) -> dict:
    """Embed every reference image under ``references_uri/<character_id>/`` and save one mean embedding per id."""
    from safetensors.torch import save

    filesystem, root = fs.url_to_fs(references_uri)
    ids, embeddings, counts = [], [], {}
    for entry in sorted(filesystem.ls(root, detail=False)):
        if not filesystem.isdir(entry):
            continue
        files = sorted(p for p in filesystem.ls(entry, detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            continue
        images = [np.asarray(load_image(filesystem.unstrip_protocol(p))) for p in files]
        with torch.no_grad():
            feats = [f for f in (scorer.embed(im[None]) for im in images) if f.numel()]
        if not feats:
            continue
        feats = torch.cat(feats)
        ids.append(entry.rstrip("/").rsplit("/", 1)[-1])
        embeddings.append(l2(feats.mean(0)))
        counts[ids[-1]] = len(files)
    if not ids:
        raise ValueError(f"no reference images found under {references_uri!r} (expected <character_id>/*.png)")
    fs.write_bytes(out_uri, save({"embeddings": torch.stack(embeddings).cpu().contiguous()}))
    meta = {"ids": ids, "images": counts, "embedder": scorer.embedder.spec}
    fs.write_bytes(out_uri + ".json", json.dumps(meta, indent=2).encode())
    return meta
