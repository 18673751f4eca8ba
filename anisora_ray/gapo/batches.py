"""Pairs into training batches: a deterministic order per worker and step, and cached encodings.

The batch of step ``s`` on worker ``r`` depends on (rows, seed, r, world, s) only, so a run
resumed at step ``s`` sees exactly the data an uninterrupted run would (the data position is the
step). Each worker keeps rows ``i % world == r`` of the pairs sorted by prompt and videos, and
reshuffles them every epoch with ``seed + epoch``.

Encodings (VAE latents of videos, the image conditions, prompt embeddings) are deterministic for a
frozen encoder, so with a cache folder they are computed once and read back as safetensors,
keyed by the sha256 of the encoder's identity and the input's bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import torch

from anisora_ray.errors import ImageLoadError, VideoDecodeError, VideoGeometryError
from anisora_ray.gapo.diffusion import PairLatents
from anisora_ray.io import fs
from anisora_ray.io.images import load_image
from anisora_ray.io.video import read_all_frames
from anisora_ray.types import QuarantineRecord

REQUIRED = ("prompt", "image_uri", "winner_video_uri", "loser_video_uri", "winner_reward", "loser_reward",
            "winner_seed", "loser_seed")


def pair_rows(table: pa.Table) -> list[dict]:
    """The pairs as dicts in a canonical order (independent of how the table was assembled)."""
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"pairs table lacks column(s) {missing}; has {table.column_names}")
    rows = table.select(list(REQUIRED) + (["prompt_id"] if "prompt_id" in table.column_names else [])).to_pylist()
    return sorted(rows, key=lambda r: (r.get("prompt_id", ""), r["winner_video_uri"], r["loser_video_uri"]))


def row_problem(row: dict) -> str | None:
    """What makes a pair row untrainable (checked before any file is read), or None: text fields that are text,
    integer seeds, finite normalized rewards with the winner's not below the loser's (GAPO's gain is α^r̂w − α^r̂l)."""
    for key in ("prompt", "image_uri", "winner_video_uri", "loser_video_uri"):
        if not isinstance(row.get(key), str) or not row[key]:
            return f"{key} is {row.get(key)!r}, not text"
    for key in ("winner_seed", "loser_seed"):
        if isinstance(row.get(key), bool) or not isinstance(row.get(key), int):
            return f"{key} is {row.get(key)!r}, not an integer"
    rewards = []
    for key in ("winner_reward", "loser_reward"):
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:  # NaN fails too
            return f"{key} is {value!r}, not a normalized reward in [0, 1]"
        rewards.append(value)
    if rewards[0] < rewards[1]:
        return f"winner_reward {rewards[0]} < loser_reward {rewards[1]} (winner and loser swapped?)"
    return None


def worker_rows(rows: list[dict], rank: int, world: int) -> list[dict]:
    return rows[rank::world]


def step_rows(rows: list[dict], step: int, per_step: int, seed: int) -> list[dict]:
    """The rows of (0-based) micro-batch ``step``: epoch-wise reshuffled, ``per_step`` at a time. A worker left with
    fewer rows than that (its other pairs quarantined: the trainer refuses fewer to begin with) repeats them, each
    micro-batch a new shuffle, so training goes on."""
    if not rows:
        raise ValueError(f"no pair on this worker (pairs_per_step = {per_step})")
    per_epoch = len(rows) // per_step
    if per_epoch == 0:
        order = np.random.default_rng(seed + step).permutation(len(rows))
        return [rows[order[j % len(rows)]] for j in range(per_step)]
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(len(rows))
    return [rows[j] for j in order[index * per_step : (index + 1) * per_step]]


def usable_rows(rows: list[dict], micro_steps: int, per_step: int, seed: int, check) -> tuple[list[dict], list]:
    """``rows`` without the bad ones among those the first ``micro_steps`` micro-batches use, and their records:
    ``check(rows)`` returns ``(row, record)`` per row that cannot be used; dropping one reshuffles the rest, so this
    repeats until every row used is good. Always from micro-step 0: a resumed run drops what the uninterrupted run
    dropped before the checkpoint, so its later batches are the same (cached latents make the re-check cheap)."""
    rows, records = list(rows), []
    while rows:  # none left: the caller records them and says so
        needed = {id(r): r for i in range(micro_steps) for r in step_rows(rows, i, per_step, seed)}
        bad = check(list(needed.values()))
        if not bad:
            return rows, records
        records += [record for _, record in bad]
        dropped = {id(row) for row, _ in bad}
        rows = [r for r in rows if id(r) not in dropped]
    return rows, records


class PairEncoder:
    """Encodes pair rows into :class:`PairLatents`: from memory, else the cache, else the encoders.

    ``encoders()`` returns a pipeline with the VAE and text encoder; it is called only for a latent
    missing from both memory and the cache (see :class:`anisora_ray.gapo.models.Encoders`).
    :meth:`prefetch` encodes a worker's rows up front so the encoders can be released before training.
    """

    def __init__(self, encoders, family, namespace: str, height: int, width: int, num_frames: int, text_length: int,
                 cache_uri: str | None = None, device: torch.device | str = "cpu", prompt_suffix: str = ""):
        self.encoders, self.family, self.prompt_suffix = encoders, family, prompt_suffix
        self.height, self.width, self.num_frames, self.text_length = height, width, num_frames, text_length
        self.namespace, self.cache_uri, self.device = namespace, cache_uri, torch.device(device)
        self.memory: dict[str, torch.Tensor] = {}  # key -> host tensor
        self._digests: dict[str, str] = {}  # uri -> sha256 of its content
        self.hits = self.misses = 0

    def _key(self, kind: str, payload: bytes) -> str:
        return hashlib.sha256(f"{self.namespace}|{kind}|".encode() + payload).hexdigest()

    def _file_key(self, kind: str, uri: str) -> str:
        """The key of (``kind``, the file's content); each file is read and hashed once per run (training
        steps take it from memory)."""
        if uri not in self._digests:
            self._digests[uri] = hashlib.sha256(fs.read_bytes(uri)).hexdigest()
        return self._key(kind, self._digests[uri].encode())

    def _cached(self, key: str, compute) -> dict[str, torch.Tensor]:
        """Named tensors of ``key``: from memory, else the cache folder, else ``compute()`` (then stored)."""
        if key not in self.memory:
            from safetensors.torch import load, save

            uri = fs.join(self.cache_uri, key[:2], f"{key}.safetensors") if self.cache_uri else None
            if uri and fs.exists(uri):
                self.hits += 1
                value = load(fs.read_bytes(uri))
            else:
                self.misses += 1
                value = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
                if uri:
                    fs.write_bytes(uri, save(value))
            self.memory[key] = value
        return {k: v.to(self.device) for k, v in self.memory[key].items()}

    def video(self, uri: str) -> torch.Tensor:
        """Latents of one video in the family's layout (VAE posterior mode); a video of another geometry than
        the run's raises :class:`VideoGeometryError` (the key holds the geometry, so a cached latent was checked)."""
        geometry = (self.num_frames, self.height, self.width)
        key = self._file_key("video{}x{}x{}".format(*geometry), uri)
        return self._cached(key, lambda: {"t": self.family.encode_video(self.encoders(), self._frames(uri))})["t"]

    def _frames(self, uri: str):
        frames = read_all_frames(uri)
        expected = (self.num_frames, self.height, self.width)
        if tuple(frames.shape[:3]) != expected:  # pairs rendered at another geometry: quarantined by prefetch
            raise VideoGeometryError(uri, tuple(frames.shape[:3]), expected, "generator.num_frames x height x width")
        return frames

    def condition(self, uri: str, seed: int) -> dict[str, torch.Tensor]:
        """What the rollout of ``seed`` was conditioned on, computed as the family's pipeline does; when the
        family samples it with the seed, the draw depends on the device's random stream (part of the key)."""
        seeded = f"seed{int(seed)}|{self.device.type}" if self.family.condition_uses_seed() else "any-seed"
        key = self._file_key(f"condition{self.num_frames}|{seeded}", uri)
        return self._cached(key, lambda: self.family.encode_condition(
            self.encoders(), load_image(uri), seed, self.height, self.width, self.num_frames))

    def prompt(self, text: str) -> torch.Tensor:
        return self._cached(self._key(f"prompt{self.text_length}", text.encode()),
                            lambda: {"t": self.family.encode_prompt(self.encoders(), text, self.text_length)})["t"]

    def prefetch(self, rows: list[dict], on_progress=None) -> list[tuple[dict, QuarantineRecord]]:
        """Encode every row once (memory, cache or encoders), so training needs no encoder. Each pair
        whose video or image is missing, unreadable or of another shape comes back with a quarantine
        record naming the file and the reason (the caller drops it and trains on the rest)."""
        bad = []
        for done, row in enumerate(rows, 1):
            problem = row_problem(row)
            try:
                if problem:
                    raise ValueError(f"pair {row.get('prompt_id') or row.get('winner_video_uri')!r}: {problem}")
                self.batch([row])
            except (VideoDecodeError, ImageLoadError, FileNotFoundError, ValueError) as exc:
                culprit = getattr(exc, "uri", None) or getattr(exc, "filename", None) or row.get("winner_video_uri")
                bad.append((row, QuarantineRecord(stage="gapo", reason=type(exc).__name__, uri=str(culprit),
                                                  item_id=str(row.get("prompt_id") or row.get("winner_video_uri")),
                                                  detail=str(exc)[:2000])))
            if on_progress:
                on_progress(done, len(rows))
        return bad

    def batch(self, rows: list[dict]) -> PairLatents:
        winners = torch.stack([self.video(r["winner_video_uri"]) for r in rows])
        losers = torch.stack([self.video(r["loser_video_uri"]) for r in rows])
        if winners.shape != losers.shape:
            raise ValueError(f"winner latents {tuple(winners.shape)} != loser latents {tuple(losers.shape)}")
        device = winners.device

        def stacked(seed_column: str) -> dict[str, torch.Tensor]:
            parts = [self.condition(r["image_uri"], r[seed_column]) for r in rows]
            return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}

        return PairLatents(
            winner=winners, loser=losers, condition=stacked("winner_seed"),
            loser_condition=stacked("loser_seed") if self.family.condition_uses_seed() else None,
            prompt_embeds=torch.stack([self.prompt(r["prompt"] + self.prompt_suffix) for r in rows]),  # as rendered
            reward_w=torch.tensor([float(r["winner_reward"]) for r in rows], device=device),
            reward_l=torch.tensor([float(r["loser_reward"]) for r in rows], device=device),
        )
