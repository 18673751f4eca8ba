"""Prompts written by a vision-language model, streamed through a Ray Data job on GPU actors.

AniSora captions its clips automatically with Qwen2-VL and refines the captions so that the action and
the motion are explicit. ``build-manifest`` without ``--captions`` / ``--prompts`` does the same: a dataset
of the clips (or images) → ``map_batches`` with :class:`CaptionActor` (``data.captioner.concurrency``
actors with ``num_gpus`` each), each loading the model once and captioning a batch per ``generate`` call
→ collected on the driver, in order (:class:`RayCaptioner`, the ``Captioner`` of ``data/clips.py``).

A clip's frames go to the model as images, in order. transformers 5 builds Qwen2-VL's video processor
only with torchvision (huggingface/transformers#48558), so the processor is loaded without it
(:func:`images_only_processor`) and with the PIL image processor: the same tokens and chat template.

Ray Data workers unpickle this module: torch and transformers are imported where they are used.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import pyarrow as pa

from anisora_ray.config import AnisoraConfig
from anisora_ray.config.sections import CaptionerConfig
from anisora_ray.data.clips import CaptionRequest, CaptionResult
from anisora_ray.errors import AnisoraError, ConfigError, InfrastructureError

log = logging.getLogger(__name__)

# Follows AniSora (arXiv:2412.10255), which captions its clips with Qwen2-VL and refines the captions to make the
# action and the motion explicit: one paragraph on the character(s), their appearance, the action, the motion (what
# moves, where, how fast) and the camera, written as an image-to-video prompt. {media} says what the model is shown.
CAPTION_TEMPLATE = (
    "{media} Write one paragraph in English that describes: the character or characters and their appearance "
    "(hair, clothing, expression); the action, what they do; the motion, made explicit: what moves, in which "
    "direction and how fast (slowly, quickly, suddenly); and the camera movement (static, pan, tilt, zoom or "
    "tracking, and its direction). Be concrete and literal, as a prompt for an image-to-video model. Write only "
    "the paragraph: no title, no list, no preamble."
)
CLIP_MEDIA = "These {n} images are frames sampled evenly from one anime clip, in order."
IMAGE_MEDIA = "This image is the first frame of an anime clip; describe the motion that most naturally follows it."
HINT = ("; give --captioner MODEL (a Hugging Face id, a folder, or tiny:qwen2-vl) or write the captions yourself "
        "(--captions FILE with --videos, --prompts FILE with --images)")


def instruction(template: str, kind: str, frames: int) -> str:
    """``template`` with ``{media}`` filled in for a clip of ``frames`` frames or an image."""
    media = CLIP_MEDIA.replace("{n}", str(frames)) if kind == "video" else IMAGE_MEDIA
    return template.replace("{media}", media)


def check_captioner(spec: str, cache_dir: str) -> str:
    """Where to load ``spec`` from, checked on the driver before Ray starts: ``tiny:qwen2-vl`` is built (cached
    under ``cache_dir``); a folder must hold a config.json; a Hub id must be cached or known to the Hub."""
    from anisora_ray.models.tiny_reward import resolve_backbone

    try:
        path = resolve_backbone(spec, cache_dir)
    except ValueError as exc:
        raise ConfigError(f"captioner {spec!r}: {exc}") from None
    if path != spec:
        return path
    folder = os.path.expanduser(spec)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ConfigError(f"captioner folder {spec!r} holds no config.json (not a transformers model)" + HINT)
        return os.path.abspath(folder)
    if spec.startswith(("/", ".", "~")) or spec.count("/") != 1:
        raise ConfigError(f"captioner {spec!r}: no such folder, and not a Hugging Face id (owner/name)" + HINT)
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return spec
    try:
        HfApi().model_info(spec)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no access: say so now, not from every actor
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"captioner {spec!r} is not a folder, not in the Hugging Face cache, and the Hub did not "
                          f"give it ({first})" + HINT) from None
    return spec


def images_only_processor(path: str):
    """The model's Qwen2-VL processor (tokenizer, chat template, PIL image processor) without a video processor."""
    from transformers import Qwen2VLProcessor

    class ImagesOnlyProcessor(Qwen2VLProcessor):  # its attributes are read from this signature
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImagesOnlyProcessor.from_pretrained(path, backend="pil")


class VisionCaptioner:
    """One vision-language model, loaded once; :meth:`caption` writes one caption per request (no Ray)."""

    def __init__(self, path: str, cfg: CaptionerConfig, device: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText

        self.cfg = cfg
        self.template = cfg.prompt or CAPTION_TEMPLATE
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.processor = images_only_processor(path)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row at the same position
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, use_safetensors=True).to(self.device).eval()

    def media(self, request: CaptionRequest) -> list:
        """The PIL images the model sees: ``num_frames`` frames sampled evenly over the clip, or the image."""
        from PIL import Image

        from anisora_ray.io.images import load_image
        from anisora_ray.io.video import read_clip

        if request.kind == "video":
            images = [Image.fromarray(f) for f in read_clip(request.uri, self.cfg.num_frames, sys.maxsize)]
        else:
            images = [load_image(request.uri)]
        for image in images:
            image.thumbnail((self.cfg.frame_size, self.cfg.frame_size))  # keeps the aspect, only shrinks
        return images

    def generate(self, media: list[list], kinds: list[str]) -> list[str]:
        """One ``generate`` call for a batch of items (each a list of images)."""
        import torch

        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [*({"type": "image"} for _ in images),
                                          {"type": "text", "text": instruction(self.template, kind, len(images))}]}],
            tokenize=False, add_generation_prompt=True) for images, kind in zip(media, kinds, strict=True)]
        inputs = self.processor(text=texts, images=media, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def caption(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        """A result per request: the caption, or why there is none (a file missing or unreadable, an item its
        generation refuses or cannot fit). A fault of the device or the storage (any other error) is raised, not
        set down as the items' own: the actor fails and Ray retries it, or the job stops naming it."""
        import torch

        results: list[CaptionResult | None] = [None] * len(requests)
        loaded = []
        for i, request in enumerate(requests):
            try:
                loaded.append((i, self.media(request)))
            except ITEM_ERRORS as exc:  # one unreadable clip is set aside, the rest go on
                results[i] = _failure(exc)
        try:
            texts = self.generate([m for _, m in loaded], [requests[i].kind for i, _ in loaded]) if loaded else []
            for (i, _), text in zip(loaded, texts, strict=True):
                results[i] = CaptionResult(caption=text.strip())
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory on a batch: one at a time
            log.warning("captioning a batch of %d failed (%s); again one by one", len(loaded), exc)
            for i, images in loaded:
                try:
                    results[i] = CaptionResult(caption=self.generate([images], [requests[i].kind])[0].strip())
                except (*ITEM_ERRORS, torch.cuda.OutOfMemoryError) as err:  # this item alone: set aside, with why
                    results[i] = _failure(err)
        return results


# an item's own failures: missing or unreadable files, inputs the processor refuses (anything else is the device's or
# the storage's, and raised)
ITEM_ERRORS = (AnisoraError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError)


def _failure(exc: Exception) -> CaptionResult:
    return CaptionResult(reason=type(exc).__name__, detail=str(exc)[:2000] or type(exc).__name__)


class CaptionActor:
    """Ray Data UDF: loads the model once (on its GPU when Ray gave it one); rows ``index``, ``item_id``,
    ``uri``, ``kind`` → ``index``, ``caption``, ``reason``, ``detail``."""

    def __init__(self, path: str, options: dict):
        import ray
        import torch

        cfg = CaptionerConfig(**options)
        on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        if not on_gpu:
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.captioner = VisionCaptioner(path, cfg, "cuda" if on_gpu else "cpu")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results = self.captioner.caption([CaptionRequest(r["item_id"], r["uri"], r["kind"]) for r in rows])
        return pa.table({"index": [r["index"] for r in rows], "caption": [r.caption for r in results],
                         "reason": [r.reason for r in results], "detail": [r.detail for r in results]})


class RayCaptioner:
    """The ``Captioner`` of ``data/clips.py``: one Ray Data job per call, on :class:`CaptionActor` actors."""

    def __init__(self, cfg: CaptionerConfig, path: str, progress: bool = True):
        self.cfg, self.path, self.progress = cfg, path, progress
        self.model = cfg.model  # as given (a Hub id, a folder, tiny:qwen2-vl), for the review file
        self.template = cfg.prompt or CAPTION_TEMPLATE

    def num_gpus(self) -> float:
        import ray

        if self.cfg.num_gpus is not None:
            return self.cfg.num_gpus
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def __call__(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        import ray
        from tqdm.auto import tqdm

        if not requests:
            return []
        c = self.cfg
        rows = [{"index": i, "item_id": r.item_id, "uri": r.uri, "kind": r.kind} for i, r in enumerate(requests)]
        batches = -(-len(rows) // c.batch_size)
        ds = ray.data.from_items(rows, override_num_blocks=batches)
        ds = ds.map_batches(CaptionActor, batch_format="pyarrow", batch_size=c.batch_size,
                            fn_constructor_kwargs={"path": self.path, "options": c.model_dump()},
                            compute=ray.data.ActorPoolStrategy(size=min(c.concurrency, batches)),
                            num_cpus=c.num_cpus, num_gpus=self.num_gpus() or None)
        ds.context.enable_progress_bars = False  # this dataset's own context: the bar below counts the captions
        got: dict[int, CaptionResult] = {}
        unit = "clip" if requests[0].kind == "video" else "image"
        with tqdm(total=len(rows), desc=f"captions ({self.model})", unit=unit, disable=not self.progress) as bar:
            try:
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    for row in batch.to_pylist():
                        got[row["index"]] = CaptionResult(*(row[k] or "" for k in ("caption", "reason", "detail")))
                    bar.update(batch.num_rows)
            except Exception as exc:  # the actors could not load the model, or kept dying
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                raise InfrastructureError(f"captioning with {self.model!r} failed: {first}") from exc
        if len(got) != len(rows):
            raise InfrastructureError(f"captioning with {self.model!r} returned {len(got)} of {len(rows)} rows")
        return [got[i] for i in range(len(rows))]


def start_captioner(cfg: AnisoraConfig, model: str | None = None, progress: bool = True) -> RayCaptioner:
    """``data.captioner`` (its model replaced by ``model``), checked before Ray starts; then Ray is joined."""
    from anisora_ray.runtime import init_ray

    c = cfg.data.captioner if model is None else cfg.data.captioner.model_copy(update={"model": model})
    path = check_captioner(c.model, cfg.model.cache_dir)
    init_ray(cfg.ray)
    return RayCaptioner(c, path, progress)
