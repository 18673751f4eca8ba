"""The generation stage's entry function: prompts in, candidate videos and their records out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from anisora_ray.config import AnisoraConfig
from anisora_ray.generation.journal import GenerationJournal, recipe
from anisora_ray.generation.replicas import GeneratorReplicas
from anisora_ray.generation.seeding import build_requests  # noqa: F401  (re-exported)
from anisora_ray.io import fs
from anisora_ray.types import Candidate, PromptItem, QuarantineRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    candidates: list[Candidate]
    quarantined: list[QuarantineRecord]
    candidates_uri: str
    quarantine_uri: str


def generate_candidates(
    cfg: AnisoraConfig,
    items: Sequence[PromptItem],
    out_dir: str,
    replicas: GeneratorReplicas,
    round_index: int = 0,
    progress: bool = True,
    exact: bool = False,
    resume: bool = False,
) -> GenerationResult:
    """K candidates per prompt on the replicas; writes ``candidates.parquet`` and ``quarantine.parquet``.
    ``exact``: every step computed, whatever ``generator.cache``. Each finished call is journalled
    (``generation/journal.py``); ``resume``: requests the journal has with the same weights and settings are not
    rendered again (without it the journal starts empty)."""
    out_dir = fs.normalize(out_dir)
    requests = build_requests(items, cfg, round_index)
    journal = GenerationJournal(out_dir, recipe(cfg, replicas.weights_states(), exact))
    if resume:
        requests, candidates, quarantined = journal.split(requests)
    else:
        journal.clear()
        candidates, quarantined = [], []
    total = sum(len(r.seeds) for r in requests)
    with tqdm(total=total, desc="generate", unit="video", disable=not progress) as bar:
        rendered, set_aside = replicas.generate(requests, out_dir, on_progress=bar.update, exact=exact,
                                                on_call=journal.record)
    candidates = sorted(candidates + rendered, key=lambda c: (c.prompt_id, c.candidate_index))
    quarantined = quarantined + set_aside
    candidates_uri = fs.join(out_dir, "candidates.parquet")
    quarantine_uri = fs.join(out_dir, "quarantine.parquet")
    fs.write_table(Candidate.to_table(candidates), candidates_uri)
    fs.write_table(QuarantineRecord.to_table(quarantined), quarantine_uri)
    if quarantined:
        log.warning("%d prompt(s) quarantined; reasons in %s", len(quarantined), quarantine_uri)
    return GenerationResult(candidates, quarantined, candidates_uri, quarantine_uri)


def resolve_prompts(cfg: AnisoraConfig, prompts: str | None = None) -> str:
    """The manifest URL to use: ``prompts``, else ``data.prompts``; "demo" draws the demo set."""
    from anisora_ray.data.demo import ensure_demo_set
    from anisora_ray.data.manifest import require_prompts

    uri = prompts or cfg.data.prompts
    require_prompts(uri)
    if uri == "demo":
        return ensure_demo_set(
            fs.join(fs.normalize(cfg.run.output_dir), "demo"),
            cfg.data.demo_prompts,
            cfg.data.demo_image_size,
            cfg.run.seed,
            settings="data.demo_prompts, data.demo_image_size, run.seed",
        )
    return uri


def run_generation(cfg: AnisoraConfig, prompts: str | None, out_dir: str | None, progress: bool = True) -> GenerationResult:
    """What ``anisora-ray generate`` does: start replicas, generate every prompt's candidates, stop."""
    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.runtime import init_ray

    items = read_manifest(resolve_prompts(cfg, prompts))
    out_dir = fs.check_writable(out_dir or fs.join(fs.normalize(cfg.run.output_dir), "generate"), "the generate output")
    init_ray(cfg.ray)
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        return generate_candidates(cfg, items, out_dir, replicas, progress=progress)
    finally:
        replicas.shutdown()
