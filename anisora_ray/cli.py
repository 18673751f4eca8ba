"""``anisora-ray`` command line: parse, then call one stage's entry function."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from anisora_ray import cli_eval, cli_tools
from anisora_ray.errors import AnisoraError, ConfigError


def _with_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/local.yaml",
                        help="YAML config (default: %(default)s, relative to the current folder: the checkout's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable, e.g. --set generator.replicas=2")


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


def _pairs(args: argparse.Namespace) -> int:
    from anisora_ray.config import load_config
    from anisora_ray.pairs.stage import run_pairs

    cfg = load_config(args.config, args.overrides)
    if args.candidates and args.prompts:
        raise ConfigError("pairs: --prompts generates candidates, --candidates scores ones already made: give one")
    if args.candidates:
        from anisora_ray.io import fs
        from anisora_ray.pairs.pipeline import pair_candidates
        from anisora_ray.reward.statistics import configured_statistics
        from anisora_ray.runtime import init_ray
        from anisora_ray.storage_check import check_storage
        from anisora_ray.types import Candidate

        statistics = configured_statistics(cfg.reward)
        init_ray(cfg.ray)
        out = fs.normalize(args.out or fs.join(fs.normalize(cfg.run.output_dir), "pairs"))
        check_storage(out, "the pairs output", progress=not args.quiet)
        result = pair_candidates(cfg, Candidate.from_table(fs.read_table(args.candidates)), out, progress=not args.quiet,
                                 statistics=statistics)
    else:
        result = run_pairs(cfg, args.prompts, args.out, progress=not args.quiet)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(result.skipped.items())) or "none"
    print(f"{result.pairs} pairs written ({result.already_done} prompts already done; skipped: {skipped}; "
          f"{result.quarantined_candidates} of {result.candidates} candidates quarantined) -> {result.out_uri}")
    return 0


def _start_replicas(cfg):
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.runtime import init_ray
    from anisora_ray.storage_check import check_storage

    init_ray(cfg.ray)
    check_storage(cfg.run.output_dir)  # before the replicas load the model
    return GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))


def _train(args: argparse.Namespace) -> int:
    from anisora_ray.config import load_config
    from anisora_ray.gapo.trainer import train_gapo
    from anisora_ray.io import fs
    from anisora_ray.pairs.writer import pairs_table

    cfg = load_config(args.config, args.overrides)
    table = pairs_table(args.pairs)
    for flag, uri in (("--init", args.init), ("--resume", args.resume)):
        if uri and not fs.exists(uri):  # it failed in every Ray Train restart, minutes later
            raise ConfigError(f"train {flag} {uri}: no such folder")
    refresh = cfg.gapo.refresh_replicas and not args.no_refresh
    replicas = _start_replicas(cfg) if refresh and cfg.gapo.refresh_every else None  # live during training
    try:
        m = train_gapo(cfg, table, args.out, init_uri=args.init, resume_from=args.resume,
                       replicas=replicas.actors if replicas else None)
    except BaseException:
        if replicas:
            replicas.shutdown()
        raise
    print(f"step {m['step']}: loss {m['loss']:.4f}, dpo {m['dpo']:.4f}, gain {m['gain']:.4f}, "
          f"implicit accuracy {m['implicit_accuracy']:.2f} -> {m['kind']} weights {m['weights_uri']} "
          f"(checkpoint {m['checkpoint_uri']}, MLflow run {m['mlflow_run_id']})")
    if refresh:
        replicas = replicas or _start_replicas(cfg)
        try:
            version, reports = replicas.refresh_from(m["weights_uri"])  # each replica streams the folder
        finally:
            replicas.shutdown()
        fs.write_bytes(fs.join(m["weights_uri"], "weights_version.json"), json.dumps(version.to_dict(), indent=2).encode())
        print(f"refreshed {len(reports)} replica(s) to weights version {version.version} ({version.kind}, "
              f"{version.num_bytes / 1e6:.1f} MB, checksum {version.checksum[:12]}, "
              f"{max(r['seconds'] for r in reports):.2f}s)")
    return 0


def _align(args: argparse.Namespace) -> int:
    from anisora_ray.config import load_config
    from anisora_ray.loop.align import check_inputs, run_alignment
    from anisora_ray.tracking import tracking_uri

    check_inputs(cfg := load_config(args.config, args.overrides))  # before the output folder's log file is made
    cfg = cli_eval.quiet_ray(cfg, args, "align")
    result = run_alignment(cfg, resume=args.resume, progress=not args.quiet)
    print("round  held-out reward  gain vs round 0 [95% CI]      p      weights")
    for row in result.rows:
        gain = (f"{row['mean_diff']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]  {row['p_value']:.3f}"
                if "mean_diff" in row else f"{'':>34}")
        print(f"{row['round']:>5}  {row['heldout_reward']:>15.4f}  {gain}  v{row['weights_version']}")
    if result.guard:
        fell = ", ".join(f"{f['measure']} {f['before']:.4f} -> {f['after']:.4f} (p={f['p_value']:.3f})"
                         for f in result.guard["findings"] if f["fell"])
        back = f"; replicas back to round {result.guard['best_round']}" if "best_round" in result.guard else ""
        print(f"guard: fired at round {result.guard['round']} ({fell}): {result.guard['action']}{back}")
    elif "guard_frame_difference" in result.rows[-1]:
        print("guard: passed every round (no guard measure fell beyond the margin while the reward rose)")
    print(f"reward curve: {result.curve_uri}\nstate: {result.state_uri}\n"
          f"MLflow: mlflow ui --backend-store-uri {tracking_uri(cfg)}  (run {result.parent_run_id})")
    cli_eval.print_worker_logs(args)
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

    p = sub.add_parser("pairs", help="stream prompts through generation and the reward into preference pairs")
    _with_config(p)
    p.add_argument("--prompts", help="manifest URL (default: data.prompts; 'demo' draws the demo set)")
    p.add_argument("--candidates", help="pair candidates.parquet from `generate` instead of generating")
    p.add_argument("--out", help="pairs folder or URL (default: <run.output_dir>/pairs); re-running resumes it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_pairs)

    p = sub.add_parser("train", help="GAPO (gapo.loss: gapo | dpo | sft) on a pairs folder with Ray Train + DeepSpeed")
    _with_config(p)
    p.add_argument("--pairs", required=True, help="folder written by `anisora-ray pairs`")
    p.add_argument("--out", help="trained weights folder (default: <run.output_dir>/gapo/weights)")
    p.add_argument("--init", help="start from this trained folder (a previous run's weights or adapter)")
    p.add_argument("--resume", help="checkpoint URI of an interrupted run to resume (same config)")
    p.add_argument("--no-refresh", action="store_true", help="do not load the result into generator replicas")
    p.set_defaults(func=_train)

    p = sub.add_parser("align", help="the main job: rounds of generate, score, pair, GAPO train, refresh, held-out eval")
    _with_config(p)
    p.add_argument("--resume", action="store_true", help="continue the job in run.output_dir from its last finished phase")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's and its workers' output here (default: in log files, their paths printed)")
    p.set_defaults(func=_align)

    p = sub.add_parser("make-demo", help="draw the demo prompt set (images + manifest)")
    p.add_argument("--out", required=True, help="folder for images/ and the manifest")
    p.add_argument("--num", type=int, default=16, help="prompts (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=256, help="square first-frame images, pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed (default: %(default)s)")
    p.add_argument("--prefix", default="demo", help="prompt_id prefix (default: %(default)s)")
    p.set_defaults(func=cli_tools.make_demo)

    p = sub.add_parser("build-manifest", help="manifest from a folder of clips (first frames) or of images, and "
                                              "captions (given, or written by a vision-language model)")
    _with_config(p)  # data.captioner, ray: used only when captions are generated
    p.add_argument("--videos", help="folder of clips: the first frame of each is its image (docs/data.md)")
    p.add_argument("--captions", help="with --videos: .csv/.jsonl (video, caption[, prompt_id, character_id]) or .txt; "
                                      "without it the captioner writes them")
    p.add_argument("--images-out", help="with --videos: where the first frames go (default: first-frames/ beside --out)")
    p.add_argument("--images", help="folder of first-frame images")
    p.add_argument("--prompts", help="with --images: .csv/.jsonl (image, prompt[, prompt_id, character_id]) or .txt; "
                                     "without it the captioner writes them")
    p.add_argument("--captioner", help="vision-language model that writes missing captions: Hugging Face id, folder "
                                       "or tiny:qwen2-vl (default: data.captioner.model, Qwen/Qwen2-VL-7B-Instruct)")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.add_argument("--out", required=True, help="manifest parquet URL")
    p.set_defaults(func=cli_tools.build_manifest)

    p = sub.add_parser("tiny-model", help="build the tiny random-init pipeline of a config and save it")
    _with_config(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cli_tools.tiny_model)

    p = sub.add_parser("train-reward", help="fit a reward dimension's head on rated clips with Ray Train")
    _with_config(p)
    p.add_argument("--annotations", required=True, help="parquet: video_uri, prompt, image_uri, one column per dimension")
    p.add_argument("--dimension", help="default: reward.training.dimension")
    p.add_argument("--out", help="head folder or URL (default: <run.output_dir>/reward-heads/<dimension>)")
    p.set_defaults(func=cli_tools.train_reward)

    p = sub.add_parser("build-gallery", help="character embeddings from reference images (<dir>/<character_id>/*.png)")
    _with_config(p)
    p.add_argument("--references", required=True)
    p.add_argument("--out", required=True, help="gallery .safetensors URL")
    p.set_defaults(func=cli_tools.build_gallery)

    p = sub.add_parser("convert-reward", help="convert the released AnimeReward checkpoints to safetensors folders")
    p.add_argument("--source", default="IndexTeam/Index-anisora",
                   help="a Hugging Face repo id (IndexTeam/Index-anisora), a local snapshot of it, or the code's reward/ "
                        "folder with the weights placed as its READMEs say")
    p.add_argument("--code", help="a clone of bilibili/Index-anisora (or its reward/character/BLIP/data/gallerys.json): "
                                  "the character gallery's names, not on the Hub")
    p.add_argument("--out", required=True, help="folder for <out>/<dimension>/")
    p.add_argument("--dimensions", help="comma-separated (default: all six)")
    p.add_argument("--clip-tokenizer", default="openai/clip-vit-base-patch16", help="tokenizer of the motion scorer")
    p.add_argument("--check", action="store_true", help="load each converted scorer and score a random clip")
    p.add_argument("--device", default="auto")
    p.add_argument("--detector", help="character detector for --check (default: the released grouding-dino-base folder)")
    p.add_argument("--segmenter", default="facebook/sam-vit-base", help="character segmenter for --check")
    p.add_argument("--cache-dir", default="~/.cache/anisora-ray", help="where detector / segmenter ids are cached")
    p.set_defaults(func=cli_eval.convert_reward)

    p = sub.add_parser("convert-wan", help="Wan-format transformer weights (AniSora V2/V3) into a diffusers folder")
    p.add_argument("sources", nargs="+", help="one weights folder (safetensors shards) or file per expert, in the "
                                             "base's order: high-noise first (V3.2: high_noise_model low_noise_model)")
    p.add_argument("--base", required=True, help="the matching diffusers folder or Hub id, e.g. "
                                                 "Wan-AI/Wan2.2-I2V-A14B-Diffusers (its VAE, encoders and scheduler)")
    p.add_argument("--revision", help="of a Hub --base")
    p.add_argument("--out", required=True, help="new folder (model.pretrained)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--copy", action="store_true", help="copy the base's other components instead of symlinking them (always, for a Hub --base)")
    p.add_argument("--check", action="store_true", help="load the result through the trainers' loader")
    p.set_defaults(func=cli_eval.convert_wan)

    p = sub.add_parser("report", help="one self-contained HTML page for an alignment job (tables, curves, videos)")
    p.add_argument("--run", required=True, help="the job's align/ folder (<run.output_dir>/align)")
    p.add_argument("--out", help="HTML file (default: <run>/report.html)")
    p.add_argument("--tracking-uri", help="MLflow store of the job (default: <run.output_dir>/mlflow.db when there)")
    p.add_argument("--link-videos", action="store_true", help="link the videos instead of embedding them")
    p.add_argument("--eval", help="an `anisora-ray eval` folder whose comparison and human study to include "
                                  "(default: <run.output_dir>/eval when there)")
    p.add_argument("--mlflow", action="store_true", help="also log the page to the job's MLflow run")
    p.set_defaults(func=cli_eval.report)

    p = sub.add_parser("eval", help="weights versions against a baseline on the held-out prompts and seeds "
                                    "(AnimeReward per dimension, VBench-style metrics, win rates)")
    _with_config(p)
    p.add_argument("--run", help="the align job's folder (<run.output_dir>/align): its rounds and frozen statistics")
    p.add_argument("--versions", required=True, action="append", help="comma-separated (repeatable: lists join): "
                   "round numbers of --run (0 = untrained) and/or name=weights_folder, name=base")
    p.add_argument("--baseline", help="the version the others are compared with (default: the first)")
    p.add_argument("--out", help="output folder (default: <run.output_dir>/eval)")
    p.add_argument("--regenerate", action="store_true", help="generate and score again what an earlier run kept")
    p.set_defaults(func=cli_eval.evaluate)

    p = sub.add_parser("ablate", help="GAPO vs Diffusion-DPO vs SFT (and reward ablations) from the same round-0 "
                                      "generator, pairs and seeds")
    _with_config(p)
    p.add_argument("--variants", default="gapo,dpo,sft",
                   help="comma-separated: gapo, dpo, sft, no-<dimension> (GAPO with that dimension's weight 0), "
                        "reward=<preset> (GAPO on pairs ranked by configs/reward/<preset>.yaml, e.g. videoscore)")
    p.add_argument("--out", help="output folder (default: <run.output_dir>/ablate)")
    p.set_defaults(func=cli_eval.ablate)

    p = sub.add_parser("annotate", help="blind human side-by-side evaluation: serve the page, or summarize")
    p.add_argument("action", choices=["serve", "summarize"])
    p.add_argument("--eval", required=True, help="an align/ folder, or an `anisora-ray eval --out` folder")
    p.add_argument("--db", help="SQLite file of the study (default: <eval>/annotations.sqlite)")
    p.add_argument("--baseline", help="version shown against the trained one (serve: 0; summarize: the last study's)")
    p.add_argument("--trained", help="version to judge (default: the last evaluated; summarize: the last study's)")
    p.add_argument("--seed", type=int, default=0, help="draws which side shows which version")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you open it on purpose)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--judges", type=int, default=3, help="summarize: annotators per comparison (a majority wins it)")
    p.add_argument("--json", help="summarize: also write the summary here")
    p.set_defaults(func=cli_eval.annotate)

    p = sub.add_parser("tiny-reward", help="save a tiny random-init reward backbone (clip, siglip, xclip, grounding-dino, sam, "
                                            "dinov2, videoscore, qwen2-vl)")
    p.add_argument("--kind", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cli_tools.tiny_reward)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except AnisoraError as exc:
        print(f"anisora-ray: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # an input the command line named; --verbose keeps the traceback
        if args.verbose:
            raise
        said = f"no such file or folder: {exc.filename}" if exc.filename else f"{type(exc).__name__}: {exc}"
        print(f"anisora-ray: error: {said} (--verbose: the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a hundred lines of traceback said nothing more
        if args.verbose:
            raise
        go_on = {"align": "; continue with --resume", "ablate": "; the same command continues it",
                 "pairs": "; the same --out continues it"}.get(args.command, "")
        print(f"anisora-ray: interrupted; what finished is kept{go_on}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
