"""The evaluation and conversion commands of ``anisora-ray`` (``convert-reward``, ``convert-wan``, ``report``,
``annotate``); the parser lives in :mod:`anisora_ray.cli`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os


def convert_reward(args: argparse.Namespace) -> int:
    """Convert the released AnimeReward files once; with --check, load each scorer and score a clip."""
    from anisora_ray.reward.released.convert import convert_all, describe, released_tree

    dimensions = args.dimensions.split(",") if args.dimensions else None
    tree = released_tree(args.source, args.code, dimensions, detector=args.check and not args.detector)
    print(f"released files: {tree.root} ({tree.layout} layout)")
    folders = convert_all(tree, args.out, dimensions, clip_tokenizer=args.clip_tokenizer)
    for name, folder in folders.items():
        print(f"{name:18s} {folder}  ({describe(folder)})")
    if args.check:
        import numpy as np

        from anisora_ray.reward.base import ClipBatch, build_dimension

        rng = np.random.default_rng(0)
        clip = rng.integers(0, 256, (24, 240, 360, 3), dtype=np.uint8)
        batch = ClipBatch(frames=[clip], prompts=["a girl with red hair runs"], images=[clip[0]], references=[None])
        for name, folder in folders.items():
            options = {"checkpoint": folder, "device": args.device}
            if name == "character":
                detector = args.detector or tree.find("character", "detector") or "IDEA-Research/grounding-dino-base"
                options |= {"detector": detector, "segmenter": args.segmenter, "cache_dir": args.cache_dir}
            score = build_dimension(name, "released", **options).score(batch)[0]
            note = " (NaN: no character detected in it)" if np.isnan(score) else ""
            print(f"{name:18s} loads and scores a random clip: {score:.4f}{note}")
    print("set reward.dimensions.<name>.options.checkpoint to these folders (configs/reward/animereward.yaml)")
    return 0


def convert_wan(args: argparse.Namespace) -> int:
    """Wan-format expert weights (AniSora V2/V3) into a diffusers folder for ``model.pretrained``."""
    from anisora_ray.io import hub
    from anisora_ray.models.convert_wan import EXPERTS, weight_files
    from anisora_ray.models.convert_wan import convert_wan as convert

    for source in args.sources:  # named before the base is fetched
        weight_files(source)
    base = args.base
    if not os.path.isdir(base):  # a Hub id: everything but the transformers' weights, which are replaced
        base = hub.snapshot(base, f"--base {base!r}", revision=args.revision,
                            ignore_patterns=[f"{name}/*.safetensors" for name in EXPERTS])
    hub = base != args.base  # fetched into this machine's cache, which the other machines do not see: copied
    report = convert(base, args.sources, args.out, dtype=args.dtype, link=not args.copy and not hub)
    if args.check:  # the replicas' and trainers' loader, on the converted folder
        from anisora_ray.models.families import get_family

        pipe = get_family("wan_i2v").load(args.out, args.dtype, "cpu", None, "trainer")
        count = sum(p.numel() for name in EXPERTS if getattr(pipe, name, None) is not None
                    for p in getattr(pipe, name).parameters())
        print(f"loads as WanImageToVideoPipeline: {count / 1e9:.2f} B transformer parameters")
    print(json.dumps(report, indent=2))
    print(f"set model.pretrained: {os.path.abspath(args.out)} (configs/anisora_v3_*.yaml)")
    return 0


def report(args: argparse.Namespace) -> int:
    from anisora_ray.loop.html_report import build_report, log_report

    embed = False if args.link_videos else None
    path = build_report(args.run, args.out, tracking_uri=args.tracking_uri or _default_tracking(args.run),
                        embed_videos=embed, eval_dir=args.eval)
    print(f"report: {path}")
    if args.mlflow:
        print(f"logged to MLflow run {log_report(args.run, path, args.tracking_uri or _default_tracking(args.run))}")
    return 0


def _default_tracking(align_dir: str) -> str | None:
    """The sqlite store the embedded default writes next to ``align/`` (``<run.output_dir>/mlflow.db``)."""
    db = os.path.join(os.path.dirname(os.path.abspath(align_dir.rstrip("/"))), "mlflow.db")
    return f"sqlite:///{db}" if os.path.isfile(db) else None


def annotate(args: argparse.Namespace) -> int:
    from anisora_ray.errors import ConfigError
    from anisora_ray.eval.annotate import AnnotationStore, build_study, label_of, summarize

    if args.action == "serve":
        from anisora_ray.eval.annotate_server import serve

        store = build_study(args.eval, args.db, baseline=args.baseline or "0", trained=args.trained, seed=args.seed)
        serve(store, host=args.host, port=args.port)
        return 0
    db = args.db or os.path.join(args.eval, "annotations.sqlite")
    if not os.path.isfile(db):
        raise ConfigError(f"{db} does not exist: run `anisora-ray annotate serve --eval {args.eval}` first")
    s = summarize(AnnotationStore(db), judges=args.judges, trained=label_of(args.trained) if args.trained else None,
                  baseline=label_of(args.baseline) if args.baseline else None)
    low, high = s["win_rate_ci"]
    print(f"{s['trained']} vs {s['baseline'] or 'any other version'}: {s['wins']} won, {s['losses']} lost, {s['undecided']} without a majority "
          f"of {s['judged']} comparisons judged by >= {args.judges} annotators ({s['comparisons']} in the study)")
    if s["wins"] + s["losses"]:
        print(f"win rate {s['win_rate']:.3f}, 95% CI [{low:.3f}, {high:.3f}] (Wilson); Fleiss' kappa "
              + ("n/a (no comparison with exactly that many answers)" if math.isnan(s["fleiss_kappa"])
                 else f"{s['fleiss_kappa']:.3f}"))
    else:
        print(f"no win rate yet: no comparison has a majority of >= {args.judges} annotators")
    for name, counts in s["annotators"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.json:
        with open(args.json, "w") as f:  # JSON has no NaN: a value not there yet is null
            json.dump(_json_safe(s), f, indent=2)
    return 0


def _json_safe(value):
    """``value`` with every non-finite float as None (what jq and JavaScript read)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def quiet_ray(cfg, args: argparse.Namespace, folder: str):
    """Progress lines of the job's own loggers; unless --verbose, Ray's and its workers' output go to a log
    file under ``<run.output_dir>/<folder>/logs`` whose path is printed. Returns the config to run with."""
    if not getattr(args, "quiet", False):
        for name in ("anisora_ray.loop", "anisora_ray.models", "anisora_ray.eval"):  # one line per phase
            logging.getLogger(name).setLevel(logging.INFO)
    if args.verbose:
        return cfg
    from anisora_ray.io import fs
    from anisora_ray.runtime import ray_logs_to_file

    cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"log_to_driver": False})})
    base = fs.normalize(cfg.run.output_dir)
    fs.check_writable(fs.join(base, folder))  # a clear error naming run.output_dir, before any log file
    local = base if not fs.is_url(base) else os.path.join(os.getcwd(), "logs")
    print(f"Ray driver log: {ray_logs_to_file(os.path.join(local, folder, 'logs', 'ray-driver.log'))} "
          "(worker logs: the Ray session's logs folder, printed at the end; --verbose shows everything)")
    return cfg


def print_worker_logs(args: argparse.Namespace) -> None:
    if not args.verbose:
        from anisora_ray.runtime import ray_session_logs

        print(f"Ray worker logs: {ray_session_logs()}")


def evaluate(args: argparse.Namespace) -> int:
    """``anisora-ray eval``: versions against a baseline; prints the Markdown table it writes."""
    from anisora_ray.config import load_config
    from anisora_ray.eval.compare import markdown_table, paper_table
    from anisora_ray.eval.versions import evaluate_versions, resolve_versions
    from anisora_ray.io import fs

    cfg = quiet_ray(load_config(args.config, args.overrides), args, "eval")
    versions = resolve_versions([v.strip() for group in args.versions for v in group.split(",") if v.strip()], args.run)
    out = args.out or fs.join(fs.normalize(cfg.run.output_dir), "eval")
    comparison = evaluate_versions(cfg, versions, out, baseline=args.baseline, run=args.run, regenerate=args.regenerate)
    print(paper_table(comparison))
    print(markdown_table(comparison, comparison["human"]))
    print("metric forms: " + "; ".join(f"{k}: {v}" for k, v in comparison["forms"].items()))
    print(f"written: {fs.join(out, 'comparison.md')}, {fs.join(out, 'comparison.json')}; "
          f"human study: anisora-ray annotate serve --eval {out}")
    print_worker_logs(args)
    return 0


def ablate(args: argparse.Namespace) -> int:
    """``anisora-ray ablate``: every variant from the same round-0 generator, pairs and seeds."""
    from anisora_ray.config import load_config
    from anisora_ray.eval.compare import markdown_table, paper_table
    from anisora_ray.io import fs
    from anisora_ray.loop.ablate import run_ablation

    cfg = quiet_ray(load_config(args.config, args.overrides), args, "ablate")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    out = args.out or fs.join(fs.normalize(cfg.run.output_dir), "ablate")
    comparison = run_ablation(cfg, variants, out)
    print(paper_table(comparison))
    print(markdown_table(comparison, comparison["human"]))
    print(f"written: {fs.join(out, 'ablation.md')}")
    print_worker_logs(args)
    return 0
