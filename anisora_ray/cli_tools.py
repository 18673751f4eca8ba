"""``anisora-ray`` subcommands that prepare data and models: demo sets, manifests, tiny models, reward heads,
character galleries (``cli.py`` parses; these call the stage's entry function)."""

from __future__ import annotations

import argparse

from anisora_ray.errors import ConfigError


def make_demo(args: argparse.Namespace) -> int:
    from anisora_ray.data.demo import make_demo_set

    print(make_demo_set(args.out, num_prompts=args.num, image_size=args.image_size, seed=args.seed, prefix=args.prefix))
    return 0


def build_manifest(args: argparse.Namespace) -> int:
    if bool(args.images) == bool(args.videos):
        raise ConfigError("build-manifest: give --videos DIR [--captions FILE] or --images DIR [--prompts FILE]")
    other = {"--captions": args.captions, "--images-out": args.images_out} if args.images else {"--prompts": args.prompts}
    if stray := [flag for flag, value in other.items() if value]:  # unused, a captioning model would write the prompts
        raise ConfigError(f"build-manifest: {' and '.join(stray)} do(es) not go with {'--images' if args.images else '--videos'}"
                          ": --videos DIR [--captions FILE] [--images-out DIR], or --images DIR [--prompts FILE]")
    if args.images and args.prompts:
        from anisora_ray.data.manifest import build_manifest

        items = build_manifest(args.images, args.prompts, args.out)
        print(f"{len(items)} prompts -> {args.out}")
        return 0
    from anisora_ray.data import clips

    captioner = None
    if not args.captions:  # no captions given: a vision-language model writes them
        from anisora_ray.config import load_config
        from anisora_ray.generation.captioning import start_captioner

        captioner = start_captioner(load_config(args.config, args.overrides), args.captioner, progress=not args.quiet)
    if args.images:
        items, bad = clips.build_manifest_from_images(args.images, args.out, captioner)
    else:
        def progress(done: int, total: int) -> None:
            print(f"\rfirst frames: {done}/{total}", end="", flush=True)

        items, bad = clips.build_manifest_from_videos(args.videos, args.captions, args.out, args.images_out,
                                                      on_progress=None if args.quiet else progress, captioner=captioner)
    aside = f"; {len(bad)} set aside: {clips.quarantine_uri(args.out)}" if bad else ""
    review = f"; captions by {captioner.model} for review: {clips.captions_uri(args.out)}" if captioner else ""
    print(f"\n{len(items)} prompts -> {args.out}{aside}{review}")
    return 0


def tiny_model(args: argparse.Namespace) -> int:
    import os
    import shutil

    from anisora_ray.config import load_config
    from anisora_ray.models.families import family_of

    cfg = load_config(args.config, args.overrides)
    family = family_of(cfg.model)
    if not os.path.isdir(family.tiny_cache_path(cfg.model, cfg.generator)):  # else copied at once
        print(f"building the tiny {family.name} model (with model.tiny.warm_start_steps: minutes, once: then cached "
              f"under {cfg.model.cache_dir})", flush=True)
    shutil.copytree(family.tiny_folder(cfg.model, cfg.generator), args.out, dirs_exist_ok=True)
    print(args.out)
    return 0


def train_reward(args: argparse.Namespace) -> int:
    from anisora_ray.config import load_config
    from anisora_ray.reward.training import train_reward

    overrides = list(args.overrides) + ([f"reward.training.dimension={args.dimension}"] if args.dimension else [])
    summary = train_reward(load_config(args.config, overrides), args.annotations, args.out)
    print(" ".join(f"{k}={v:.4f}" for k, v in summary.items() if k.startswith("holdout_")))
    print(f"head -> {summary['head_uri']} (set reward.dimensions.{summary['dimension']}.options.head to use it)")
    return 0


def build_gallery(args: argparse.Namespace) -> int:
    from anisora_ray.config import load_config
    from anisora_ray.reward.base import build_dimension
    from anisora_ray.reward.character import build_gallery

    character = load_config(args.config, args.overrides).reward.dimensions.character
    if character.backend != "grounded":
        raise ConfigError(f"reward.dimensions.character.backend = {character.backend!r}: build-gallery needs 'grounded'")
    options = {k: v for k, v in character.options.items() if k != "gallery"}
    meta = build_gallery(build_dimension("character", "grounded", **options), args.references, args.out)
    print(f"{len(meta['ids'])} characters -> {args.out} (set reward.dimensions.character.options.gallery to use it)")
    return 0


def tiny_reward(args: argparse.Namespace) -> int:
    from anisora_ray.models.tiny_reward import save_tiny_backbone

    print(save_tiny_backbone(args.kind, args.out, seed=args.seed))
    return 0
