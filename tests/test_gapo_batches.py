"""Training batches: the data position is the step, and encodings are cached exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from anisora_ray.gapo.batches import PairEncoder, pair_rows, step_rows, worker_rows
from anisora_ray.models.families import get_family

FAMILY = get_family("cogvideox_i2v")


def _table(n: int) -> pa.Table:
    return pa.table({
        "prompt_id": [f"p{i:02d}" for i in range(n)][::-1], "prompt": ["a girl waves"] * n,
        "image_uri": [f"i{i}" for i in range(n)], "winner_video_uri": [f"w{i}" for i in range(n)],
        "loser_video_uri": [f"l{i}" for i in range(n)], "winner_reward": [0.9] * n, "loser_reward": [0.1] * n,
        "winner_seed": list(range(n)), "loser_seed": list(range(n, 2 * n)),
    })


def test_rows_are_canonical_split_by_rank_and_reshuffled_per_epoch():
    table = _table(9)
    rows = pair_rows(table)
    assert rows == pair_rows(table.take(list(range(8, -1, -1))))  # order of the table does not matter
    assert [r["prompt_id"] for r in rows] == sorted(r["prompt_id"] for r in rows)
    shards = [worker_rows(rows, r, 2) for r in range(2)]
    assert sorted(x["prompt_id"] for s in shards for x in s) == [r["prompt_id"] for r in rows]
    mine = shards[0]  # 5 rows, 2 per step: 2 steps per epoch
    epoch0 = [r["prompt_id"] for s in range(2) for r in step_rows(mine, s, 2, seed=3)]
    assert len(set(epoch0)) == 4 and set(epoch0) <= {r["prompt_id"] for r in mine}
    assert step_rows(mine, 7, 2, seed=3) == step_rows(mine, 7, 2, seed=3)  # a function of the step only
    epochs = {tuple(r["prompt_id"] for s in range(2 * e, 2 * e + 2) for r in step_rows(mine, s, 2, seed=3)) for e in range(6)}
    assert len(epochs) > 1


def test_a_pair_quarantined_before_a_checkpoint_is_dropped_on_resume_so_the_later_batches_are_the_same():
    """``usable_rows`` checks every micro-batch from the first: a bad pair that only the updates before a checkpoint
    used is dropped again on resume, so the rows (and their shuffle) after it are the uninterrupted run's."""
    from anisora_ray.gapo.batches import usable_rows

    rows = [{"prompt_id": f"p{i}"} for i in range(10)]
    first = step_rows(rows, 0, 1, seed=3)[0]  # the pair micro-batch 0 uses: unreadable

    def check(needed):
        return [(r, f"bad {r['prompt_id']}") for r in needed if r is first]

    kept, records = usable_rows(rows, 6, 1, 3, check)
    assert records == [f"bad {first['prompt_id']}"] and first not in kept and len(kept) == 9
    uninterrupted = [step_rows(kept, i, 1, 3)[0]["prompt_id"] for i in range(6)]
    resumed, _ = usable_rows(rows, 6, 1, 3, check)  # a restarted worker group after update 3: the same rows
    assert [step_rows(resumed, i, 1, 3)[0]["prompt_id"] for i in range(3, 6)] == uninterrupted[3:]
    assert usable_rows(rows, 6, 1, 3, lambda needed: [])[0] == rows  # nothing bad: every row, as given


def test_missing_columns_and_too_few_rows_are_named():
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['loser_reward'\]"):
        pair_rows(_table(2).drop_columns(["loser_reward"]))
    with pytest.raises(ValueError, match="no pair on this worker"):
        step_rows([], 0, 2, seed=0)


def test_a_worker_left_with_fewer_pairs_than_a_step_after_quarantine_trains_on_what_it_has():
    """2 pairs per step and 2 rows on a rank, one unreadable: the rank once failed the whole run (every Ray Train
    retry alike); now its good pair fills its micro-batches, and a rank with none left says so."""
    from anisora_ray.gapo.batches import usable_rows

    rows = [{"prompt_id": "good"}, {"prompt_id": "bad"}]
    kept, records = usable_rows(rows, 4, 2, 3, lambda needed: [(r, "unreadable") for r in needed if r["prompt_id"] == "bad"])
    assert kept == [{"prompt_id": "good"}] and records == ["unreadable"]
    assert [[r["prompt_id"] for r in step_rows(kept, i, 2, 3)] for i in range(4)] == [["good", "good"]] * 4
    three = [{"prompt_id": p} for p in "abc"]  # 3 rows, 4 a step: every row in every micro-batch, reshuffled
    batches = [tuple(r["prompt_id"] for r in step_rows(three, i, 4, 3)) for i in range(6)]
    assert all(len(b) == 4 and set(b) == set("abc") for b in batches) and len(set(batches)) > 1
    assert usable_rows(rows, 4, 2, 3, lambda needed: [(r, "unreadable") for r in needed]) == ([], ["unreadable"] * 2)


def _one_pair(make_config, tmp_path):
    """(config, pretrained path, a pair row): a demo image and two random 9x32x32 clips."""
    from anisora_ray.data.demo import make_demo_set
    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.io.video import write_video
    from anisora_ray.models.pipeline import resolve_pretrained

    cfg = make_config()
    item = read_manifest(make_demo_set(str(tmp_path / "demo"), num_prompts=1, image_size=64, seed=0))[0]
    rng = np.random.default_rng(0)
    for name in ("w", "l"):
        write_video(rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8), str(tmp_path / f"{name}.mp4"), fps=8)
    row = {"prompt_id": "good", "prompt": item.prompt, "image_uri": item.image_uri,
           "winner_video_uri": str(tmp_path / "w.mp4"), "loser_video_uri": str(tmp_path / "l.mp4"),
           "winner_reward": 0.8, "loser_reward": 0.2, "winner_seed": 11, "loser_seed": 12}
    return cfg, resolve_pretrained(cfg.model, cfg.generator), row


def test_encoders_load_only_for_cache_misses_and_cached_encodings_equal_fresh_ones(make_config, tmp_path):
    from anisora_ray.gapo.models import Encoders

    cfg, pretrained, row = _one_pair(make_config, tmp_path)

    def encoder(namespace, cache=None):
        encoders = Encoders(pretrained, cfg, "cpu")
        return encoders, PairEncoder(encoders, FAMILY, namespace, 32, 32, 9, 128, cache)

    _, fresh = encoder(pretrained)
    fresh = fresh.batch([row])
    loaders, cached = encoder(pretrained, str(tmp_path / "cache"))
    cached.prefetch([row])
    assert (cached.misses, cached.hits, loaders.loads) == (5, 0, 1)  # two videos, two image draws and a prompt
    loaders.release()
    first = cached.batch([row])  # from memory: the released encoders are not needed again
    assert not loaders.loaded and loaders.loads == 1
    again_loaders, again = encoder(pretrained, str(tmp_path / "cache"))
    second = again.batch([row])
    assert (again.misses, again.hits, again_loaders.loads) == (0, 5, 0)  # a warm cache never loads the encoders
    for a, b, c in zip(
        (fresh.winner, fresh.loser, fresh.condition["image"], fresh.loser_condition["image"], fresh.prompt_embeds),
        (first.winner, first.loser, first.condition["image"], first.loser_condition["image"], first.prompt_embeds),
        (second.winner, second.loser, second.condition["image"], second.loser_condition["image"], second.prompt_embeds),
        strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(fresh.winner, fresh.loser)
    _, other = encoder("another-model", str(tmp_path / "cache"))
    other.batch([row])
    assert other.hits == 0  # the key includes the encoder's identity


def test_the_latent_cache_namespace_tells_apart_what_changes_the_encoders_output(make_config):
    """Another revision of the checkpoint, or VAE tiling (tiles blend), encodes differently: a run that changes one
    misses the cache instead of training on the other setting's latents."""
    from anisora_ray.gapo.engine import latent_namespace

    base = latent_namespace(make_config(), "ckpt")
    assert latent_namespace(make_config(), "ckpt") == base
    variants = [latent_namespace(make_config("model.revision=abc123"), "ckpt"),
                latent_namespace(make_config("generator.vae_tiling=true"), "ckpt"),
                latent_namespace(make_config("generator.vae_slicing=true"), "ckpt"),
                latent_namespace(make_config("model.dtype=bfloat16"), "ckpt"), latent_namespace(make_config(), "other")]
    assert len({base, *variants}) == 1 + len(variants)


def test_prefetch_quarantines_pairs_with_missing_or_corrupt_files_and_names_them(make_config, tmp_path):
    from anisora_ray.gapo.models import Encoders
    from anisora_ray.io.video import write_video

    cfg, pretrained, good = _one_pair(make_config, tmp_path)
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all" * 50)
    rng = np.random.default_rng(1)
    for name in ("fw", "fl"):  # a pair rendered at another geometry: its two videos agree with each other
        write_video(rng.integers(0, 255, (17, 32, 32, 3), dtype=np.uint8), str(tmp_path / f"{name}.mp4"), fps=8)
    missing = {**good, "prompt_id": "missing", "winner_video_uri": str(tmp_path / "nowhere.mp4")}
    corrupt = {**good, "prompt_id": "corrupt", "loser_video_uri": str(tmp_path / "garbage.mp4")}
    no_image = {**good, "prompt_id": "no-image", "image_uri": str(tmp_path / "nowhere.png")}
    foreign = {**good, "prompt_id": "foreign", "winner_video_uri": str(tmp_path / "fw.mp4"),
               "loser_video_uri": str(tmp_path / "fl.mp4")}
    encoder = PairEncoder(Encoders(pretrained, cfg, "cpu"), FAMILY, pretrained, 32, 32, 9, 128, str(tmp_path / "c"))
    values = {  # rows whose values cannot train: they raised inside the worker or stopped it later, unnamed
        "nan-reward": ({"winner_reward": float("nan")}, "winner_reward is nan, not a normalized reward"),
        "swapped": ({"winner_reward": 0.1, "loser_reward": 0.9}, "winner_reward 0.1 < loser_reward 0.9"),
        "null-reward": ({"loser_reward": None}, "loser_reward is None"),
        "null-video": ({"loser_video_uri": None}, "loser_video_uri is None, not text"),
        "null-prompt": ({"prompt": None}, "prompt is None, not text"),
        "float-seed": ({"winner_seed": 1.5}, "winner_seed is 1.5, not an integer")}
    rows = [{**good, "prompt_id": name, **change} for name, (change, _) in values.items()]
    bad = encoder.prefetch([good, missing, corrupt, no_image, foreign, *rows])
    named = {row["prompt_id"]: record for row, record in bad}
    assert set(named) == {"missing", "corrupt", "no-image", "foreign", *values}
    for name, (_, said) in values.items():
        assert named[name].reason == "ValueError" and f"pair '{name}': {said}" in named[name].detail, named[name]
    assert named["missing"].uri.endswith("nowhere.mp4") and named["corrupt"].uri.endswith("garbage.mp4")
    assert named["corrupt"].reason == "VideoDecodeError" and named["no-image"].uri.endswith("nowhere.png")
    assert named["foreign"].reason == "VideoGeometryError" and named["foreign"].uri.endswith("fw.mp4")
    assert "17x32x32 frames x height x width" in named["foreign"].detail and "is 9x32x32" in named["foreign"].detail
    assert all(r.stage == "gapo" and r.detail for r in named.values())
    assert encoder.batch([good]).winner.shape[0] == 1  # the good pair is encoded and kept
    # the cached latents of a video are keyed by the geometry: a run at 17 frames encodes the foreign pair, and a
    # run at 9 reading the same cache folder still refuses it
    at17 = PairEncoder(Encoders(pretrained, cfg, "cpu"), FAMILY, pretrained, 32, 32, 17, 128, str(tmp_path / "c"))
    assert at17.video(foreign["winner_video_uri"]).shape != encoder.video(good["winner_video_uri"]).shape
    again = PairEncoder(Encoders(pretrained, cfg, "cpu"), FAMILY, pretrained, 32, 32, 9, 128, str(tmp_path / "c"))
    assert [row["prompt_id"] for row, _ in again.prefetch([good, foreign])] == ["foreign"]


def test_training_conditions_on_the_image_latents_the_rollout_used(make_config, tmp_path):
    """The image latents the GAPO worker builds for a pair's video equal those the I2V pipeline fed its
    transformer when it rendered that video (its video_processor, the VAE sample drawn with the seed)."""
    from anisora_ray.gapo.models import Encoders
    from anisora_ray.generation.generator import Generator
    from anisora_ray.types import GenerationRequest, PromptItem

    cfg, pretrained, row = _one_pair(make_config, tmp_path)
    g = cfg.generator
    rollout = Generator(pretrained, cfg.model, g, cfg.video)
    seen = []
    channels = rollout.pipe.transformer.config.in_channels // 2
    rollout.pipe.transformer.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["hidden_states"][:, :, channels:].clone()), with_kwargs=True)
    item = PromptItem("p", row["prompt"], row["image_uri"])
    rollout.render([GenerationRequest(item, (11,))])
    from_rollout = seen[0][:1]  # the conditional half of the first step (classifier-free guidance doubles it)

    encoder = PairEncoder(Encoders(pretrained, cfg, "cpu"), FAMILY, pretrained, g.height, g.width, g.num_frames, 128)
    trained = encoder.condition(row["image_uri"], 11)["image"]
    assert torch.equal(trained, from_rollout[0])
    assert torch.count_nonzero(trained[1:]) == 0
    assert not torch.equal(encoder.condition(row["image_uri"], 12)["image"], trained)  # the draw follows the seed
    batch = encoder.batch([row])  # winner_seed 11, loser_seed 12: each side keeps its own conditioning
    assert torch.equal(batch.condition["image"][0], trained)
    assert not torch.equal(batch.loser_condition["image"][0], trained)
