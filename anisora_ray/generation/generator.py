"""The generator: one image-to-video pipeline that turns prompts into candidate videos.

Plain Python (no Ray): :mod:`anisora_ray.generation.replicas` hosts it in Ray actors.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import logging
import time
import uuid

import numpy as np
import torch
from PIL import Image

from anisora_ray.config import GeneratorConfig, ModelConfig, VideoConfig
from anisora_ray.errors import AnisoraError, WeightsError
from anisora_ray.generation.quantize import check_fp8, dequantize_fp8, quantize_fp8
from anisora_ray.generation.speed import (
    attention_checked,
    attention_context,
    cache_hooks_outside_graphs,
    denoisers,
    exact_forced,
    frame_drift,
    reset_step_cache,
    reuse_forced,
    use_attention_backend,
    use_step_cache,
    warm_up_steps,
)
from anisora_ray.io import fs
from anisora_ray.io.images import load_image
from anisora_ray.io.video import write_video
from anisora_ray.models.compile import compile_blocks, compiled_graphs
from anisora_ray.models.families import get_family, pick_device
from anisora_ray.types import Candidate, GenerationRequest, QuarantineRecord
from anisora_ray.weights.receiver import WeightsReceiver

log = logging.getLogger(__name__)
# diffusers logs the truncated part of a long prompt (kilobytes, every call) after _warn_if_truncated said it once
logging.getLogger("diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video").addFilter(
    lambda record: "was truncated because `max_sequence_length`" not in record.getMessage())
CONTENT_ERRORS = (AnisoraError, ValueError)  # failures of the item itself; everything else is infrastructure
ENCODE_BACKLOG = 2  # calls whose frames may wait for the encoding thread (each: a call's videos as uint8)


def video_uri(out_dir: str, prompt_id: str, seed: int) -> str:
    return fs.join(out_dir, "videos", prompt_id, f"{seed}.mp4")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1] -> uint8 [F, H, W, 3]."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


class Generator(WeightsReceiver):
    """Hosts the pipeline, keeps its weights version, writes each candidate's mp4."""

    def __init__(
        self,
        pretrained: str,
        model: ModelConfig,
        generator: GeneratorConfig,
        video: VideoConfig,
        weights_version: int = 0,
        warm_up_later: bool = False,
    ):
        """``warm_up_later``: compile and warm up at the first :meth:`ready` (or call) instead, in the thread that
        runs the calls (a Ray actor with concurrency groups constructs in another; CUDA graphs are per thread)."""
        threads = generator.torch_threads or max(1, int(generator.actor.num_cpus))
        torch.set_num_threads(threads)
        self.cfg = generator
        self.video = video
        self.replica_id = uuid.uuid4().hex[:12]
        start = time.perf_counter()
        self.family = get_family(model.family)
        offloaded = generator.offload != "none"  # loaded on the host: the components never sit on the GPU together
        self.pipe = self.family.load(pretrained, model.dtype, "cpu" if offloaded else generator.device, model.revision)
        self.family.check_geometry(self.pipe, generator, pretrained)  # at start-up, not quarantining every video
        if generator.vae_slicing:
            self.pipe.vae.enable_slicing()
        if generator.vae_tiling:
            self.pipe.vae.enable_tiling()
        self.family.use_sampler(self.pipe, generator)
        if generator.quantize == "fp8":  # before the cache's hooks and compilation, which see the FP8 layers
            check_fp8(self.execution_device, self.receiving_module().dtype)
            self.fp8_layers = [quantize_fp8(m) for m in denoisers(self.pipe)]
            log.info("replica %s: FP8 on %s block linears", self.replica_id, self.fp8_layers)
        use_attention_backend(self.pipe, generator.attention_backend, self.family)  # checked before any round
        use_step_cache(self.pipe, generator.cache, self.family)
        if offloaded:  # after the cache's hooks: accelerate's wrap them and put them back at every call's end
            self.pipe.enable_model_cpu_offload(device=self.execution_device)
        self.startup = {"load_seconds": time.perf_counter() - start}
        if generator.quantize == "fp8":
            self.startup["fp8_layers"] = sum(self.fp8_layers)
        self._weights_version = weights_version
        self._warmed_up = False
        if not warm_up_later:
            self.ready()
        self._encoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self._encodes: dict[int, concurrent.futures.Future] = {}  # ticket -> (candidates, quarantined) being written
        self._tickets = itertools.count()

    def ready(self) -> dict:
        """Compiles and warms up once (``generator.compile``, or a pinned attention kernel checked on this model);
        returns the start-up report."""
        if not self._warmed_up:
            self._warmed_up = True  # the warm-up's own call renders
            try:
                if self.cfg.compile:
                    self.startup.update(self.compile_transformer())
                elif self.cfg.attention_backend != "auto":
                    self.startup["warm_up_seconds"] = self.warm_up(1)  # the pinned kernel on this model's attention
            except BaseException:
                self._warmed_up = False
                raise
        return self.startup

    def compile_transformer(self, batch: int | None = None) -> dict:
        """Compile the transformer blocks and warm up at the configured geometry and ``batch`` videos (default: a
        full call's), so the first round does not pay the compilation: one denoising step, or with a step cache
        ``warm_up_steps`` steps that take every path of the cache (First Block Cache: twice)."""
        before = compiled_graphs()
        mode = None if self.cfg.compile_mode == "default" else self.cfg.compile_mode
        cache_hooks_outside_graphs(self.pipe, self.cfg.cache.kind, mode=mode, dynamic=False)
        # A step cache decides on the host whether to run blocks or attention: graph breaks, so no fullgraph
        blocks = compile_blocks(self.receiving_module(), fullgraph=self.cfg.cache.kind == "none", mode=mode)
        c = self.cfg
        n = batch or c.candidates_per_prompt * c.prompts_per_call
        prompts = 1 if batch else c.prompts_per_call  # a call's requests: a family may render each one apart (Wan)
        if self.cfg.cache.kind == "none":
            seconds = self.warm_up(n, prompts=prompts)
        else:
            calls = 2 if c.cache.kind == "first_block" else 1  # First Block Cache's second call: after a reset
            with reuse_forced(self.pipe):  # every path of the cache compiles
                seconds = sum(self.warm_up(n, steps=warm_up_steps(c.cache), prompts=prompts) for _ in range(calls))
        log.info("replica %s compiled %d transformer blocks (%d graph(s)) in %.1fs (warm-up call, batch %d)",
                 self.replica_id, blocks, compiled_graphs() - before, seconds, n)
        return {"compile_seconds": seconds, "compiled_blocks": blocks}

    def warm_up(self, batch: int, steps: int = 1, prompts: int = 1) -> float:
        """``steps`` denoising steps of ``batch`` videos of grey images at the configured geometry (allocator, kernels,
        compilation), as a call of ``prompts`` requests renders them (each its own image: the batch shapes a real
        call has); returns its seconds."""
        c = self.cfg
        device = self.execution_device
        images = [Image.new("RGB", (c.width, c.height), (127, 127, 127)) for _ in range(prompts)]
        per = -(-batch // prompts)
        start = time.perf_counter()
        with attention_checked(c.attention_backend, device):
            self._run([images[i // per] for i in range(batch)], [""] * batch,
                      [torch.Generator(device=device).manual_seed(i) for i in range(batch)], steps=steps)
        return time.perf_counter() - start

    def before_update(self, kind: str) -> bool:
        """A full update is copied into plain weights: FP8 layers are dequantized first (the replica is blocked
        from then until the update commits)."""
        if self.cfg.quantize == "fp8" and kind == "full":
            for m in denoisers(self.pipe):
                dequantize_fp8(m)
            return True
        return False

    def after_update(self, kind: str) -> None:
        """The new weights are quantized again and checked layer by layer (a LoRA update needs nothing: its
        adapter runs beside the FP8 layers in the model's dtype)."""
        if self.cfg.quantize == "fp8" and kind == "full":
            layers = [quantize_fp8(m) for m in denoisers(self.pipe)]
            if layers != self.fp8_layers:
                raise WeightsError(f"replica {self.replica_id}: {layers} FP8 layers after a refresh, {self.fp8_layers} "
                                   "before")

    def compiled_graphs(self) -> int:
        """Graphs compiled in this process so far: a refresh or prompt that recompiles raises it."""
        return compiled_graphs()

    def startup_report(self) -> dict:
        return {"replica_id": self.replica_id, **self.startup}

    def receiving_module(self):
        return self.family.trained_module(self.pipe)

    @property
    def execution_device(self) -> torch.device:
        """Where the denoiser runs, whether its weights rest there or on the host (``generator.offload``). A GPU
        always with its index: a broadcast group sets it as the process's device."""
        device = pick_device(self.cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def compute_device(self) -> torch.device:  # the receiver's hook (weights/receiver.py): where broadcasts land
        return self.execution_device

    def _warn_if_truncated(self, item) -> None:
        """The text encoder reads ``max_sequence_length`` tokens; say so when a prompt is longer."""
        tokens = self.family.prompt_tokens(self.pipe, item.prompt + self.cfg.prompt_suffix)
        if tokens > self.cfg.max_sequence_length:
            log.warning("prompt %s has %d tokens; the text encoder takes %d (generator.max_sequence_length): "
                        "the rest is truncated", item.prompt_id, tokens, self.cfg.max_sequence_length)

    def render(self, requests: list[GenerationRequest], exact: bool = False) -> np.ndarray:
        """Run the pipeline once for all (prompt, seed) pairs: uint8 [N, F, H, W, 3], N = total seeds.

        Every video gets its own torch.Generator, so each depends on its own seed only. ``exact``: every step
        computed, as without ``generator.cache`` (the cache audit's reference).
        """
        images, prompts, generators = [], [], []
        device = self.execution_device
        for request in requests:
            image = load_image(request.item.image_uri)  # any size or mode: RGB here, resized by the pipeline
            self._warn_if_truncated(request.item)
            for seed in request.seeds:
                images.append(image)
                prompts.append(request.item.prompt + self.cfg.prompt_suffix)  # what GAPO conditions on too
                generators.append(torch.Generator(device=device).manual_seed(int(seed)))
        return self._run(images, prompts, generators, exact=exact)

    def _run(self, images: list, prompts: list[str], generators: list[torch.Generator], steps: int | None = None,
             exact: bool = False) -> np.ndarray:
        try:
            with torch.inference_mode(), attention_context(self.cfg.attention_backend), \
                    exact_forced(self.pipe) if exact else contextlib.nullcontext():
                return to_uint8(self.family.render(self.pipe, images, prompts, generators, self.cfg, steps))
        except BaseException:
            self.pipe.maybe_free_model_hooks()  # offloaded: every component back on the host, as after a whole call
            raise
        finally:
            reset_step_cache(self.pipe)

    def generate(self, requests: list[GenerationRequest], out_dir: str, exact: bool = False,
                 ) -> tuple[list[Candidate], list[QuarantineRecord]]:
        """Candidates for every request; a request whose input is bad (``CONTENT_ERRORS``: a missing or
        unreadable image, a bad value) is quarantined and the others go on. Anything else (CUDA or host
        out of memory, a broken device, a full disk) is raised: the caller retries it elsewhere or later.
        ``exact``: every step computed, whatever ``generator.cache`` (``eval.exact``)."""
        return self.finish(self.start(requests, out_dir, exact))

    def start(self, requests: list[GenerationRequest], out_dir: str, exact: bool = False) -> int:
        """:meth:`generate`'s rendering; its mp4 encoding goes to this generator's encoding thread. Returns the
        ticket :meth:`finish` redeems. A replica takes its next call while this one encodes (the GPU is not
        idle through the encoding); at most ``ENCODE_BACKLOG`` calls' frames wait to be encoded."""
        self.check_complete()  # mixed weights: raised, not a verdict on the prompts
        self.ready()
        pending = [f for f in list(self._encodes.values()) if not f.done()]  # one copy: finish() pops in its thread
        if len(pending) >= ENCODE_BACKLOG:
            concurrent.futures.wait(pending[:1])
        rendered, quarantined = self._render_isolating(requests, exact)
        ticket = next(self._tickets)
        self._encodes[ticket] = self._encoder.submit(self._write_isolating, rendered, quarantined, out_dir,
                                                     self._weights_version)  # the version it rendered with
        return ticket

    @property
    def encode_threads(self) -> int:
        """Encoder threads: the replica's CPUs (``generator.actor.num_cpus``) but the one its rendering runs on,
        so encoding beside the next render does not crowd out the thread that drives the GPU."""
        return max(1, int(self.cfg.actor.num_cpus) - 1)

    def finish(self, ticket: int) -> tuple[list[Candidate], list[QuarantineRecord]]:
        """The candidates (videos written) and quarantined requests of :meth:`start`'s call ``ticket``."""
        return self._encodes.pop(ticket).result()

    def _render_isolating(self, requests: list[GenerationRequest], exact: bool,
                          ) -> tuple[list[tuple[list[GenerationRequest], np.ndarray, float]], list[QuarantineRecord]]:
        """``(requests, videos, seconds)`` rendered in one pipeline run, or, when a request's input is bad, one run
        per request with the bad ones quarantined."""
        try:
            start = time.perf_counter()
            return [(requests, self.render(requests, exact=exact), time.perf_counter() - start)], []
        except CONTENT_ERRORS as exc:
            if len(requests) == 1:
                return [], [self._quarantine(requests[0], exc)]
            log.warning("batch of %d prompts failed (%s); retrying one by one", len(requests), exc)
        rendered, quarantined = [], []
        for request in requests:  # isolate the bad item(s)
            r, q = self._render_isolating([request], exact)
            rendered += r
            quarantined += q
        return rendered, quarantined

    def _write_isolating(self, rendered: list, quarantined: list[QuarantineRecord], out_dir: str, version: int,
                         ) -> tuple[list[Candidate], list[QuarantineRecord]]:
        """Encode what :meth:`_render_isolating` rendered; a request whose videos cannot be encoded (a bad value)
        is quarantined, the others are written."""
        candidates, quarantined = [], list(quarantined)
        for requests, videos, seconds in rendered:
            per_video, n = seconds / max(1, len(videos)), 0
            for request in requests:
                count = len(request.seeds)
                try:
                    candidates += self._write(request, videos[n: n + count], per_video * count, out_dir, version)
                except CONTENT_ERRORS as exc:
                    quarantined.append(self._quarantine(request, exc))
                n += count
        return candidates, quarantined

    @staticmethod
    def _quarantine(request: GenerationRequest, exc: Exception) -> QuarantineRecord:
        log.warning("quarantined prompt %s: %s", request.item.prompt_id, exc)
        return QuarantineRecord(
            stage="generation",
            item_id=request.item.prompt_id,
            reason=type(exc).__name__,
            uri=request.item.image_uri,
            detail=str(exc)[:2000],
        )

    def audit(self, requests: list[GenerationRequest], out_dir: str) -> tuple[list[Candidate], list[Candidate],
                                                                             list[dict], list[QuarantineRecord]]:
        """The cache audit (eval/cache_audit.py): each request rendered as rollouts are (``generator.cache`` on) and
        exactly (every step computed), at the same seeds. Returns the candidates of each (videos under
        ``out_dir``/cached and ``out_dir``/exact), each video's drift from its exact twin (raw frames, before the
        codec), and the requests quarantined for bad input or videos that cannot be encoded. The videos are encoded
        in the encoding thread while the next request renders."""
        self.check_complete()
        self.ready()
        written, quarantined = [], []  # per request rendered: (request, its drift rows, its two encodings)
        for request in requests:  # one at a time: a bad item is quarantined alone
            try:
                rendered = {}
                for name, flag in (("cached", False), ("exact", True)):
                    start = time.perf_counter()
                    rendered[name] = (self.render([request], exact=flag), time.perf_counter() - start)
            except CONTENT_ERRORS as exc:
                quarantined.append(self._quarantine(request, exc))
                continue
            drift = [{"prompt_id": request.item.prompt_id, "seed": int(seed), **frame_drift(c, e)}
                     for seed, c, e in zip(request.seeds, rendered["cached"][0], rendered["exact"][0])]
            written.append((request, drift, {name: self._encoder.submit(self._write, request, videos, seconds,
                                                                        fs.join(out_dir, name), self._weights_version)
                                             for name, (videos, seconds) in rendered.items()}))
        cached, exact, drift = [], [], []
        for request, rows, encodings in written:
            concurrent.futures.wait(encodings.values())
            try:
                got = {name: f.result() for name, f in encodings.items()}
            except CONTENT_ERRORS as exc:  # both renderings or neither: the audit compares twins
                quarantined.append(self._quarantine(request, exc))
                continue
            cached, exact, drift = cached + got["cached"], exact + got["exact"], drift + rows
        return cached, exact, drift, quarantined

    def _write(self, request: GenerationRequest, videos: np.ndarray, seconds: float, out_dir: str,
               version: int) -> list[Candidate]:
        """Encode ``request``'s rendered videos (one per seed) to their ``video_uri`` under ``out_dir``: the records
        of candidates rendered with weights ``version``."""
        per_video = seconds / max(1, len(videos))
        candidates = []
        for index, (seed, frames) in enumerate(zip(request.seeds, videos, strict=True)):
            t0 = time.perf_counter()
            uri = video_uri(out_dir, request.item.prompt_id, seed)
            write_video(frames, uri, fps=self.cfg.fps, codec=self.video.codec, crf=self.video.crf,
                        threads=self.encode_threads)
            candidates.append(
                Candidate(
                    prompt_id=request.item.prompt_id,
                    prompt=request.item.prompt,
                    image_uri=request.item.image_uri,
                    seed=int(seed),
                    candidate_index=index,
                    video_uri=uri,
                    weights_version=version,
                    num_frames=int(frames.shape[0]),
                    height=int(frames.shape[1]),
                    width=int(frames.shape[2]),
                    fps=self.cfg.fps,
                    frames_sha256=hashlib.sha256(frames.tobytes()).hexdigest(),
                    replica_id=self.replica_id,
                    generate_seconds=per_video,
                    encode_seconds=time.perf_counter() - t0,
                    character_id=request.item.character_id,
                )
            )
        return candidates
