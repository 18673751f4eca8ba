"""A generation's journal: each finished replica call's records, so an interrupted generation renders only the rest.

``<out_dir>/journal/<call>.json`` holds one call's candidates and quarantined prompts with the recipe they were
rendered with (a digest of the replicas' weights version and checksum, the model, the sampling and video settings
and ``exact``). When the generation runs again into the same folder, a request counts as done when every one of
its seeds has a candidate of the same recipe whose video is still there, or its prompt was quarantined under the
same recipe; only the other requests are rendered. The held-out evaluation uses it: hours of a real round's GPU
time are not rendered twice after a lost driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Sequence

from anisora_ray.config import AnisoraConfig
from anisora_ray.io import fs
from anisora_ray.types import Candidate, GenerationRequest, QuarantineRecord

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
# what a video depends on besides its prompt, image, seed and weights (replica counts, timeouts and actor
# resources do not change a video)
RENDER_SETTINGS = {"num_frames", "height", "width", "fps", "num_inference_steps", "guidance_scale",
                   "max_sequence_length", "prompt_suffix", "negative_prompt", "vae_slicing", "vae_tiling", "compile",
                   "compile_mode", "attention_backend", "cache", "quantize", "scheduler", "flow_shift"}


def recipe(cfg: AnisoraConfig, weights_states: Sequence[dict], exact: bool) -> str:
    """A digest of everything the videos of one generation depend on besides their requests."""
    weights = sorted({(int(s["version"]), str(s.get("checksum"))) for s in weights_states})
    described = {
        "weights": weights,
        "model": cfg.model.model_dump(mode="json", exclude={"cache_dir"}),
        "generator": cfg.generator.model_dump(mode="json", include=RENDER_SETTINGS),
        "video": cfg.video.model_dump(mode="json", include={"codec", "crf"}),
        "exact": exact,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


class GenerationJournal:
    """The journal of the generation into ``out_dir`` with ``recipe``."""

    def __init__(self, out_dir: str, recipe: str):
        self.root = fs.join(out_dir, JOURNAL_DIR)
        self.recipe = recipe

    def record(self, candidates: Sequence[Candidate], quarantined: Sequence[QuarantineRecord]) -> None:
        """One finished call's records (written atomically, one file per call)."""
        body = {"recipe": self.recipe, "candidates": [c.to_dict() for c in candidates],
                "quarantined": [q.to_dict() for q in quarantined]}
        fs.write_bytes(fs.join(self.root, f"{uuid.uuid4().hex}.json"), json.dumps(body).encode())

    def clear(self) -> None:
        """Forget every earlier call (a generation asked to render everything again)."""
        if fs.exists(self.root):
            fs.remove(self.root)

    def _done(self) -> tuple[dict[tuple[str, int], Candidate], dict[str, QuarantineRecord]]:
        """The journal's candidates by (prompt, seed) and quarantined prompts, of this recipe. Entries of another
        recipe are deleted: this generation writes the same video paths, so their videos are about to be replaced
        (kept, they would match again once that recipe came back, over videos of this one)."""
        by_seed: dict[tuple[str, int], Candidate] = {}
        quarantined: dict[str, QuarantineRecord] = {}
        filesystem, root = fs.url_to_fs(self.root)
        if not filesystem.exists(root):
            return by_seed, quarantined
        for path in sorted(filesystem.ls(root, detail=False)):
            name = path.rsplit("/", 1)[-1]
            if not name.endswith(".json"):
                continue
            uri = fs.join(self.root, name)
            try:
                entry = json.loads(fs.read_bytes(uri))
                if entry.get("recipe") != self.recipe:
                    fs.remove(uri)
                    continue
                candidates = [Candidate.from_dict(row) for row in entry["candidates"]]
                set_aside = [QuarantineRecord.from_dict(row) for row in entry["quarantined"]]
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # cut short, or not ours
                log.warning("generation journal %s unreadable (%s: %s): removed, its requests are rendered again", uri,
                            type(exc).__name__, exc)
                fs.remove(uri)
                continue
            by_seed.update({(c.prompt_id, int(c.seed)): c for c in candidates})
            quarantined.update({q.item_id: q for q in set_aside})
        return by_seed, quarantined

    def split(self, requests: Sequence[GenerationRequest]) -> tuple[list[GenerationRequest], list[Candidate],
                                                                    list[QuarantineRecord]]:
        """The requests still to render, and the records of those done (in the journal with this recipe and the same
        prompt text, image and character, every seed's video still there, or the prompt quarantined)."""
        by_seed, quarantined = self._done()
        todo: list[GenerationRequest] = []
        done_candidates: list[Candidate] = []
        done_quarantined: list[QuarantineRecord] = []
        lost = 0  # requests rendered before whose videos are gone
        for request in requests:
            item = request.item
            if (q := quarantined.get(item.prompt_id)) is not None and q.uri == item.image_uri:
                done_quarantined.append(q)
                continue
            found = [by_seed.get((item.prompt_id, int(seed))) for seed in request.seeds]
            if all(c is not None and (c.prompt, c.image_uri, c.character_id) == (item.prompt, item.image_uri,
                                                                                  item.character_id)
                   and fs.exists(c.video_uri) for c in found):  # the same item (a rebuilt manifest keeps its ids)
                done_candidates += found
            else:
                todo.append(request)
                lost += None not in found
        if done_candidates or done_quarantined:
            log.info("generation journal %s: %d of %d request(s) done before (%d quarantined), %d to render (%d of "
                     "them again: a video no longer there)", self.root, len(requests) - len(todo), len(requests),
                     len(done_quarantined), len(todo), lost)
        return todo, done_candidates, done_quarantined
