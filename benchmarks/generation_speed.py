"""Generation speed: seconds per video for eager vs compiled vs batched, through the project's ``Generator``.

    python benchmarks/generation_speed.py --tiny                       # CPU, the embedded default's model
    python benchmarks/generation_speed.py --model DIR --json out.json  # GPU, e.g. CogVideoX-5B I2V
    python benchmarks/generation_speed.py --build-realsize DIR         # build random-init 5B I2V there first

One ``Generator`` is loaded once; each variant renders one call of B videos (B = candidates x prompts per
call; CFG doubles the transformer's batch) at ``--measure-steps`` denoising steps. A forward hook times every
transformer call (one per step), so a variant reports the median step, the rest of the call (text encoding,
VAE decode, scheduler) and the seconds per video extrapolated to ``--steps`` steps:
``(rest + steps x step) / B``. Compiled variants use ``Generator.compile_transformer`` (regional
``torch.compile``, the code path of ``generator.compile: true``); its compile seconds are reported, and so are
two numerics checks: a seed rendered twice gives identical frames, and how far compiled frames are from eager
ones (uint8 levels). No Ray is imported: a bare GPU machine with torch, diffusers and transformers runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


class StepTimer:
    """Times each forward of a module (synchronizing CUDA), as a forward pre/post hook pair."""

    def __init__(self, module):
        import torch

        self.cuda = torch.cuda.is_available() and next(module.parameters()).is_cuda
        self.times: list[float] = []
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _pre(self, *_):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


CONFIGS = {"cogvideox_i2v": ("local.yaml", "cogvideox5b_i2v.yaml"), "wan_i2v": ("local_wan.yaml", "wan22_ti2v5b.yaml")}


def generator_config(args, measuring: bool = True, extra: list[str] | tuple = ()):
    from anisora_ray.config import load_config

    real = os.path.join(REPO, "configs", CONFIGS[args.family][0 if args.tiny else 1])
    # eager rows run eager and uncached: the real config compiles and caches, this benchmark sets those per row
    overrides = ["ray.address=null", "generator.compile=false", "generator.cache.kind=none"] + (
        [f"generator.num_inference_steps={args.measure_steps}"] if measuring else [])
    if args.tiny:
        overrides += [f"generator.torch_threads={os.cpu_count() or 1}"]
    else:
        overrides += [f"model.pretrained={args.model}", "generator.device=cuda"]
    return load_config(real, overrides + list(args.set) + list(extra))


def measure(generator, timer, request_of, batch: int, args) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer.times.clear()
    began = time.perf_counter()
    frames = generator.render([request_of(batch)])
    total = time.perf_counter() - began
    # a step is one transformer call (CogVideoX batches CFG's two halves) or two (Wan calls cond and uncond apart)
    calls = max(1, len(timer.times) // args.measure_steps)
    step = statistics.median(sum(timer.times[i:i + calls]) for i in range(0, calls * args.measure_steps, calls))
    rest = total - sum(timer.times)
    return {"videos_per_call": batch, "measured_steps": len(timer.times) // calls, "calls_per_step": calls,
            "call_s": total, "step_s": step,
            "rest_s": rest, "seconds_per_video": (rest + args.steps * step) / batch,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "frames": frames}


def run(args) -> dict:
    import numpy as np
    import torch

    from anisora_ray.data.demo import make_demo_set
    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.generation.generator import Generator
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.types import GenerationRequest

    cfg = generator_config(args)
    g = cfg.generator
    pretrained = resolve_pretrained(cfg.model, g)
    item = read_manifest(make_demo_set(os.path.join(args.out, "demo"), num_prompts=1,
                                       image_size=max(g.height, g.width), seed=0))[0]

    def request_of(batch: int):
        return GenerationRequest(item, tuple(range(1, batch + 1)))

    geometry = [g.num_frames, g.height, g.width]
    if not args.batches and not args.compile_batches:  # the variants alone, each on a replica of its own
        device = torch.cuda.get_device_name() if g.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
        print(f"{device}: {g.num_frames}x{g.height}x{g.width}, CFG {g.guidance_scale}", flush=True)
        return {"device": device, "steps": args.steps, "geometry": geometry,
                "variants": variants(args, cfg, pretrained, request_of), "rows": []}
    began = time.perf_counter()
    generator = Generator(pretrained, cfg.model, g, cfg.video)
    load_s = time.perf_counter() - began
    timer = StepTimer(generator.pipe.transformer)  # Wan2.2-A14B: the high-noise expert (the first steps)
    device = torch.cuda.get_device_name() if generator.execution_device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"{device}: {g.num_frames}x{g.height}x{g.width}, CFG {g.guidance_scale}, loaded in {load_s:.0f}s", flush=True)
    deadline = time.monotonic() + args.budget_s
    rows: list[dict] = []

    def record(mode: str, batch: int, extra: dict | None = None) -> dict | None:
        if time.monotonic() > deadline:
            print(f"  {mode} B={batch}: skipped (--budget-s spent)", flush=True)
            return None
        try:
            row = {"mode": mode, **measure(generator, timer, request_of, batch, args), **(extra or {})}
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            row = {"mode": mode, "videos_per_call": batch, "error": f"out of memory: {str(exc)[:200]}"}
        frames = row.pop("frames", None)
        rows.append(row)
        if "error" in row:
            print(f"  {mode:8s} B={batch}: {row['error']}", flush=True)
        else:
            peak = f", peak {row['peak_gpu_gb']:.1f} GB" if row["peak_gpu_gb"] is not None else ""
            print(f"  {mode:8s} B={batch}: step {row['step_s']:.3f}s, rest {row['rest_s']:.2f}s -> "
                  f"{row['seconds_per_video']:.2f} s/video at {args.steps} steps{peak}", flush=True)
        return {"row": row, "frames": frames}

    generator.render([request_of(1)])  # warm-up: allocator, kernels, libraries
    eager = {b: record("eager", b) for b in args.batches}
    result: dict = {"device": device, "load_s": load_s, "steps": args.steps, "geometry": geometry}
    if args.compile_batches:
        first = args.compile_batches[0]
        report = generator.compile_transformer(batch=first)
        result["compile_s"] = report["compile_seconds"]
        print(f"  compiled {report['compiled_blocks']} blocks: warm-up call {report['compile_seconds']:.1f}s", flush=True)
        compiled = {}
        for b in args.compile_batches:
            if b != first:  # a new batch size compiles once more: warm it up outside the timing
                began = time.perf_counter()
                generator.render([request_of(b)])
                print(f"  compiled warm-up at B={b}: {time.perf_counter() - began:.1f}s", flush=True)
            compiled[b] = record("compiled", b)
        again = record("compiled", first)
        if again and compiled.get(first):
            result["compiled_repeatable"] = bool(np.array_equal(again["frames"], compiled[first]["frames"]))
            if eager.get(first):
                diff = np.abs(compiled[first]["frames"].astype(int) - eager[first]["frames"].astype(int))
                result["compiled_vs_eager_max_levels"] = int(diff.max())
                result["compiled_vs_eager_mean_levels"] = float(diff.mean())
            rows.pop()  # the repeat is a check, not a variant
    if args.variant:
        result["variants"] = variants(args, cfg, pretrained, request_of)
    result["rows"] = rows
    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["mode"] == "eager" and r["videos_per_call"] == 1), None)
    if base:
        for r in ok:
            r["speedup_vs_eager_b1"] = base["seconds_per_video"] / r["seconds_per_video"]
    return result


def variants(args, cfg, pretrained: str, request_of) -> list[dict]:
    """Each ``--variant NAME=KEY=VALUE[,KEY=VALUE]`` (generator settings: attention kernel, step cache, ...) on a
    replica of its own, one B=1 video at the full step count (a step cache's savings depend on the whole schedule),
    against the same video eager with the config's settings: seconds per video, peak memory, start-up (load,
    compile, FP8 layers), and the drift of its frames (mean and max absolute uint8 difference, PSNR). Each replica
    warms up with one step (or its start-up compile) before the timed video; variants left once ``--budget-s``
    is spent are reported as skipped."""
    import gc

    import torch

    from anisora_ray.generation.generator import Generator
    from anisora_ray.generation.speed import denoisers, frame_drift

    deadline = time.monotonic() + args.budget_s

    def one(name: str, overrides: list[str]) -> dict:
        extra = [f"generator.num_inference_steps={args.steps}", "generator.candidates_per_prompt=1", *overrides]
        settings = generator_config(args, measuring=False, extra=extra)
        g = settings.generator
        replica = Generator(pretrained, settings.model, g, settings.video)  # compiles (at B=1) when the settings say so
        if not g.compile:
            replica.warm_up(1)  # one step: allocator, kernels
        decisions = count_cache_decisions(replica.pipe.transformer)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        graphs = replica.compiled_graphs()
        calls = []  # denoiser calls of the timed video: steps x 2 with Wan's CFG, steps without CFG
        hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in denoisers(replica.pipe)]
        began = time.perf_counter()
        frames = replica.render([request_of(1)])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        for h in hooks:
            h.remove()
        row = {"variant": name, "settings": overrides, "steps": g.num_inference_steps, "seconds_per_video": seconds,
               "denoiser_calls": len(calls), "guidance_scale": g.guidance_scale,
               "graphs_compiled_in_timed_call": replica.compiled_graphs() - graphs,
               "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               "startup": replica.startup, "cache_decisions": dict(decisions) if decisions else decisions}  # so far
        exact = None
        if args.exact_check and g.cache.kind != "none":  # the cache audit's reference render on this replica
            began = time.perf_counter()
            exact = replica.render([request_of(1)], exact=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            row["exact_seconds_per_video"] = time.perf_counter() - began
        del replica
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"row": row, "frames": frames, "exact": exact}

    reference = None if args.no_reference else one("eager (config)", [])
    rows = [reference["row"]] if reference else []
    if reference:
        print(f"  eager (config): {reference['row']['seconds_per_video']:.2f} s/video", flush=True)
    for spec in args.variant:
        name, _, settings = spec.partition("=")
        if time.monotonic() > deadline:
            rows.append({"variant": name, "settings": settings, "error": "skipped: --budget-s spent"})
            print(f"  {name}: skipped (--budget-s spent)", flush=True)
            continue
        try:
            got = one(name, [s for s in settings.split(",") if s])
        except Exception as exc:  # a kernel this device lacks: reported, the others still run
            rows.append({"variant": name, "settings": settings, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(f"  {name}: {rows[-1]['error']}", flush=True)
            continue
        if reference is None:
            rows.append(got["row"])
            print(f"  {name}: {got['row']['seconds_per_video']:.2f} s/video (no reference)", flush=True)
            continue
        got["row"].update(**frame_drift(got["frames"], reference["frames"]),
                          speedup_vs_config=reference["row"]["seconds_per_video"] / got["row"]["seconds_per_video"])
        if got["exact"] is not None:  # bit for bit the config's frames when the variant differs by its cache only
            got["row"].update({f"exact_{k}": v for k, v in frame_drift(got["exact"], reference["frames"]).items()})
        rows.append(got["row"])
        r = got["row"]
        cached = f"; cache: {r['cache_decisions']}" if r["cache_decisions"] else ""
        if "exact_seconds_per_video" in r:
            cached += (f"; every step computed: {r['exact_seconds_per_video']:.2f} s/video, max "
                       f"{r['exact_drift_max_levels']:.0f} levels from the config's")
        print(f"  {name}: {r['seconds_per_video']:.2f} s/video (x{r['speedup_vs_config']:.2f}), drift mean "
              f"{r['drift_mean_levels']:.2f} max {r['drift_max_levels']:.0f} levels, PSNR {r['psnr_db']:.1f} dB{cached}",
              flush=True)
        if args.json:  # what is measured so far survives a time limit
            write_json(args.json, {"steps": args.steps, "variants": rows, "partial": True})
    return rows


def count_cache_decisions(transformer) -> dict | None:
    """How often a step cache computed and how often it reused or predicted (First Block Cache: the transformer
    calls it decided on; TaylorSeer: the calls of the first module it hooks), or None without either: its decision
    is wrapped, not changed."""
    import torch
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    from anisora_ray.generation.speed import cache_leader_hooks, hooked

    counts = {"computed": 0, "reused": 0}
    leaders, seers = cache_leader_hooks(transformer), hooked(transformer, _TAYLORSEER_CACHE_HOOK)
    if leaders:
        hook, name = leaders[0], "_should_compute_remaining_blocks"
    elif seers:
        hook, name = seers[0][1], "_measure_should_compute"
    else:
        return None
    decide = getattr(hook, name)

    @torch.compiler.disable
    def counted(*args):
        decision = decide(*args)
        counts["computed" if (decision[0] if isinstance(decision, tuple) else decision) else "reused"] += 1
        return decision

    setattr(hook, name, counted)
    return counts


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def build_realsize(folder: str, family: str) -> str:
    from benchmarks.realsize_gpu import build_realsize as build

    began = time.perf_counter()
    build(folder, family)
    print(f"random-init {family} (5B) written to {folder} in {time.perf_counter() - began:.0f}s", flush=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the embedded default's tiny model on the CPU")
    parser.add_argument("--family", default="cogvideox_i2v", choices=sorted(CONFIGS),
                        help="cogvideox_i2v (CogVideoX-5B I2V) or wan_i2v (Wan2.2-TI2V-5B); picks the configs")
    parser.add_argument("--model", help="pipeline folder or HF id (GPU, configs/cogvideox5b_i2v.yaml's geometry)")
    parser.add_argument("--build-realsize", metavar="DIR", help="build random-init CogVideoX-5B I2V in DIR, use it")
    parser.add_argument("--steps", type=int, default=None, help="steps a video is extrapolated to (default: the config's)")
    parser.add_argument("--measure-steps", type=int, default=3, help="denoising steps actually run per call")
    parser.add_argument("--batches", default="1,2,4", help="videos per call, eager")
    parser.add_argument("--compile-batches", default="1,4", help="videos per call, compiled ('' to skip)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip the variants left after this many seconds")
    parser.add_argument("--set", action="append", default=[], help="config override (dotted), repeatable")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=generator.KEY=VALUE[,...]",
                        help="a replica with these generator settings, one video at the full step count, against the "
                             "config's: seconds and drift (repeatable), e.g. fbc=generator.cache.kind=first_block")
    parser.add_argument("--no-reference", action="store_true", help="variants without the eager reference video")
    parser.add_argument("--exact-check", action="store_true",
                        help="a variant with a step cache also renders its video with every step computed (the cache "
                             "audit's reference): its seconds and its drift from the config's video")
    parser.add_argument("--out", default="/tmp/anisora-generation-speed")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.build_realsize:
        args.model = build_realsize(args.build_realsize, args.family)
    if not args.tiny and not args.model:
        parser.error("give --tiny, --model or --build-realsize")
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.compile_batches = [int(b) for b in args.compile_batches.split(",") if b]
    if args.steps is None:
        args.steps = generator_config(args, measuring=False).generator.num_inference_steps
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    print("\nseconds per video (extrapolated to", args.steps, "steps):")
    for r in result["rows"]:
        if "error" not in r:
            print(f"  {r['mode']:8s} B={r['videos_per_call']}: {r['seconds_per_video']:.2f}  "
                  f"(x{r.get('speedup_vs_eager_b1', float('nan')):.2f} vs eager B=1)")
    for key in ("compile_s", "compiled_repeatable", "compiled_vs_eager_max_levels"):
        if key in result:
            print(f"  {key}: {result[key]}")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
