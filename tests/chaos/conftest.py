"""The chaos cases' shared undisturbed round: the same prompts, seeds and sizes that every disturbed round
(in this process, or on the node test's own cluster) must reproduce."""

from __future__ import annotations

import os

import pytest

from tests.conftest import LOCAL_CONFIG, config_overrides

PROMPTS = 6
CHAOS = ("generator.height=128", "generator.width=128", "generator.replicas=2", "generator.candidates_per_prompt=3",
         "pairs.keep_scores=true", "pairs.flush_every=2", "generator.call_retries=3", "reward.batch_retries=3")


@pytest.fixture(scope="session")
def chaos(ray_cluster, tmp_path_factory, model_cache):
    from anisora_ray.config import load_config
    from anisora_ray.data.demo import make_demo_set
    from anisora_ray.pairs.stage import run_pairs

    root = tmp_path_factory.mktemp("chaos")
    manifest = make_demo_set(str(root / "demo"), num_prompts=PROMPTS, image_size=128, seed=3)

    def make(*overrides):
        return load_config(LOCAL_CONFIG, [*config_overrides(root, model_cache), *CHAOS, *overrides])

    undisturbed = run_pairs(make(), manifest, str(root / "undisturbed"), progress=False)
    assert undisturbed.pairs == PROMPTS
    return {"make": make, "manifest": manifest, "root": root, "expected": outcome(str(root / "undisturbed"))}


def outcome(out_uri: str) -> dict[str, tuple]:
    """prompt id -> (winner seed, loser seed, winner frames hash, loser frames hash)."""
    from anisora_ray.io import fs
    from anisora_ray.pairs.writer import read_pairs
    from anisora_ray.types import ScoredCandidate

    frames = {}
    for name in sorted(os.listdir(out_uri)):
        if name.startswith("scores-"):
            for c in ScoredCandidate.from_table(fs.read_table(os.path.join(out_uri, name))):
                frames[(c.prompt_id, c.seed)] = c.frames_sha256
    pairs = read_pairs(out_uri)
    ids = [p.prompt_id for p in pairs]
    assert len(ids) == len(set(ids)), f"a prompt was paired twice: {ids}"
    return {p.prompt_id: (p.winner_seed, p.loser_seed, frames[(p.prompt_id, p.winner_seed)],
                          frames[(p.prompt_id, p.loser_seed)]) for p in pairs}


def videos(out_uri: str) -> int:
    return sum(name.endswith(".mp4") for _, _, names in os.walk(os.path.join(out_uri, "videos")) for name in names)
