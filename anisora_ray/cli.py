"""``anisora-ray`` command line: parse, then call one stage's entry function."""

from __future__ import annotations

import argparse
import logging
import sys

from anisora_ray.errors import AnisoraError


def _with_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/local.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, repeatable, e.g. --set generator.replicas=2",
    )


def _generate(args: argparse.Namespace) -> int:
    from anisora_ray.config import load_config
    from anisora_ray.generation.stage import run_generation

    cfg = load_config(args.config, args.overrides)
    result = run_generation(cfg, args.prompts, args.out, progress=not args.quiet)
    print(f"{len(result.candidates)} candidates -> {result.candidates_uri}")
    if result.quarantined:
        print(f"{len(result.quarantined)} quarantined -> {result.quarantine_uri}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from anisora_ray.config import load_config
    from anisora_ray.reward.stage import run_scoring

    cfg = load_config(args.config, args.overrides)
    result = run_scoring(cfg, args.candidates, args.out, progress=not args.quiet)
    print(f"{len(result.scored) - len(result.quarantined)} scored, {len(result.quarantined)} quarantined -> {result.scores_uri}")
    return 0


def _make_demo(args: argparse.Namespace) -> int:
    from anisora_ray.data.demo import make_demo_set

    print(make_demo_set(args.out, num_prompts=args.num, image_size=args.image_size, seed=args.seed, prefix=args.prefix))
    return 0


def _build_manifest(args: argparse.Namespace) -> int:
    from anisora_ray.data.manifest import build_manifest

    items = build_manifest(args.images, args.prompts, args.out)
    print(f"{len(items)} prompts -> {args.out}")
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from anisora_ray.config import load_config
    from anisora_ray.models.tiny import save_tiny_i2v_pipeline

    cfg = load_config(args.config, args.overrides)
    g = cfg.generator
    print(save_tiny_i2v_pipeline(cfg.model.tiny, g.height, g.width, g.num_frames, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anisora-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="K candidate videos per prompt on the generator replicas")
    _with_config(p)
    p.add_argument("--prompts", help="manifest URL (default: data.prompts; 'demo' draws the demo set)")
    p.add_argument("--out", help="output folder or URL (default: <run.output_dir>/generate)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_generate)

    p = sub.add_parser("score", help="score candidates on the six AnimeReward dimensions")
    _with_config(p)
    p.add_argument("--candidates", required=True, help="candidates.parquet from `generate`")
    p.add_argument("--out", help="scores parquet URL (default: <run.output_dir>/score/scores.parquet)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_score)

    p = sub.add_parser("make-demo", help="draw the demo prompt set (images + manifest)")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="demo")
    p.set_defaults(func=_make_demo)

    p = sub.add_parser("build-manifest", help="manifest from a folder of images and a prompts file")
    p.add_argument("--images", required=True, help="folder of first-frame images")
    p.add_argument("--prompts", required=True, help=".csv/.jsonl (image, prompt[, prompt_id, character_id]) or .txt")
    p.add_argument("--out", required=True, help="manifest parquet URL")
    p.set_defaults(func=_build_manifest)

    p = sub.add_parser("tiny-model", help="build the tiny random-init pipeline of a config and save it")
    _with_config(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except AnisoraError as exc:
        print(f"anisora-ray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
