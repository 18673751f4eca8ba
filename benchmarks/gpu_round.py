"""One alignment round of ``configs/cogvideox5b_i2v_1gpu.yaml`` through Ray, at real model sizes with random
weights built from their configs (nothing downloaded): a compiled CogVideoX-5B I2V replica, the six released
AnimeReward scorers at their released sizes (two Idefics2-8B regressors, BLIP ViT-B heads, ActionCLIP ViT-B/16,
the BLIP ViT-L recognizer with GroundingDINO-base + SAM-base) and a LoRA GAPO worker share one GPU; the adapter
reaches the replica over CUDA IPC. It runs ``anisora-ray align`` itself, with few prompts, candidates and
denoising steps, and writes:

- the wall time of every phase (round-0 evaluation, generate + score + pair, GAPO, refresh, evaluation) and
  the start-up before them (model loads, compilation, conversions), from ``align/state.json``;
- the peak GPU memory of each process (named by Ray's process title: ``ray::GeneratorActor``, the reward
  actors, ``ray::RayTrainWorker``), and the fraction of the run the GPU was busy (NVML, every 0.25 s).

``--tiny`` runs the same round at tiny sizes on the CPU (Ray is told it has one GPU, so the fractional
requests are placed as on the real machine): the test suite's twin of the GPU run.

    python benchmarks/gpu_round.py --out /tmp/round --json round.json            # on the GPU machine
    python benchmarks/gpu_round.py --tiny --out /tmp/round --json round.json     # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
CONFIG = os.path.join(REPO, "configs", "cogvideox5b_i2v_1gpu.yaml")
DIMENSIONS = ("visual_smoothness", "visual_appeal", "visual_motion", "text_video", "image_video", "character")


def reward_overrides(folder: str, tiny: bool) -> list[str]:
    """A released reward tree (code layout) of random weights, and the options that point every scorer at it."""
    from round_models import idefics2_8b

    from anisora_ray.reward.released import synthetic

    tree = os.path.join(folder, "reward")
    if not os.path.isfile(os.path.join(folder, ".written")):
        synthetic.write_released_tree(tree, size="tiny" if tiny else "released")
        if not tiny:  # both Idefics2 dimensions at 8B, sharing one folder (16 GB of disk instead of 32)
            import shutil

            from anisora_ray.reward.released.convert import RELEASED

            smooth = os.path.join(tree, RELEASED["visual_smoothness"]["folder"])
            appeal = os.path.join(tree, RELEASED["visual_appeal"]["folder"])
            for path in (smooth, appeal):
                shutil.rmtree(path)
            idefics2_8b(smooth)
            os.symlink(smooth, appeal)
        open(os.path.join(folder, ".written"), "w").close()
    size = "tiny" if tiny else "random-base"
    device = "cpu" if tiny else "cuda"
    common = f"source: '{tree}', cache_dir: '{os.path.join(folder, 'cache')}', device: {device}"
    options = {d: common for d in DIMENSIONS}
    options["visual_motion"] += f", clip_tokenizer: '{tree}/clip-tokenizer'"
    options["character"] += f", detector: '{size}:grounding-dino', segmenter: '{size}:sam'"
    if tiny:  # random tiny detectors find nothing at the real thresholds; float32 on the CPU
        options["character"] += ", box_threshold: 0.0, text_threshold: 0.0"
        for d in ("visual_smoothness", "visual_appeal"):
            options[d] += ", dtype: float32"
    out = []
    for d, opts in options.items():
        out += [f"reward.dimensions.{d}.options={{{opts}}}"]
        if tiny:  # random scorers' raw scores leave the released ranges
            out += [f"reward.dimensions.{d}.normalize={{kind: rank}}"]
    return out


def round_overrides(args) -> list[str]:
    out = os.path.join(args.out, "run")
    common = [f"run.output_dir={out}", "data.prompts=demo", "eval.prompts=demo", f"data.demo_prompts={args.prompts}",
              f"eval.demo_prompts={max(2, args.prompts)}", "eval.candidates_per_prompt=1", "loop.rounds=1",
              "generator.cache.audit_every=1",  # the cache audit at both evaluations (round 0 and 1)
              f"generator.candidates_per_prompt={args.candidates}", f"generator.num_inference_steps={args.steps}",
              f"gapo.steps={args.gapo_steps}", "gapo.checkpoint_every=0", "eval.bootstrap_samples=200",
              "loop.guard.enabled=false", "loop.registered_model=null", "reward.calibration_prompts=2",
              f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", "pairs.flush_every=1",
              "eval.metrics.aesthetic_backbone=null", "eval.metrics.aesthetic_head=null",  # no LAION head file there
              "run.free_space.min_gb=2"]  # a few prompts, not the config's full round (the lent machine has 64 GB of disk)
    if args.tiny:
        from round_models import TINY_GEOMETRY

        return common + TINY_GEOMETRY + [f"model.cache_dir={os.path.join(args.out, 'models')}", "ray.num_gpus=1",
                                         "ray.num_cpus=8", "gapo.use_gpu=false", "generator.compile=false",
                                         "gapo.deepspeed_config=configs/deepspeed/zero2.json", "gapo.lora.r=4",
                                         "generator.actor.num_cpus=1", "gapo.cpus_per_worker=1",
                                         "loop.refresh_transport=auto", "eval.metrics.subject_backbone=tiny:dinov2",
                                         "eval.metrics.num_gpus=0",
                                         # two candidates ranked on six dimensions tie 3 to 3 as often as not: keep
                                         # them (a zero-gain pair), so every prompt pairs whatever the random scorers say
                                         "pairs.ties=keep"]
    from realsize_gpu import build_realsize

    return common + [f"model.pretrained={build_realsize(os.path.join(args.out, 'models', 'cogvideox5b-i2v'))}",
                     "eval.metrics.subject_backbone=random-base:dinov2"]


class GpuSampler:
    """GPU utilization and each process's GPU memory, every ``period`` seconds, through NVML (None: no GPU)."""

    def __init__(self, period: float = 0.25):
        self.period, self.samples, self.peak_mb = period, [], {}
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML, no GPU: nothing to sample
            self.nvml = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.nvml:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.nvml:
            self.thread.join()

    def _run(self) -> None:
        nv = self.nvml
        while not self._stop.is_set():
            util = nv.nvmlDeviceGetUtilizationRates(self.handle)
            self.samples.append((time.time(), util.gpu, nv.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20))
            for proc in nv.nvmlDeviceGetComputeRunningProcesses(self.handle):
                name = process_title(proc.pid)
                self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), (proc.usedGpuMemory or 0) / 2**20)
            self._stop.wait(self.period)

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu": None}
        busy = [u for _, u, _ in self.samples]
        return {"gpu_busy_fraction": sum(u > 0 for u in busy) / len(busy), "gpu_mean_utilization": sum(busy) / len(busy) / 100,
                "gpu_peak_memory_gb": max(m for *_, m in self.samples) / 1024,
                "peak_memory_gb_per_process": {k: round(v / 1024, 2) for k, v in sorted(self.peak_mb.items())}}


def process_title(pid: int) -> str:
    """Ray names its workers by process title (``ray::GeneratorActor.generate``): the actor class, and the pid."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        title = "?"
    return f"{title.split('.')[0] if title.startswith('ray::') else os.path.basename(title)}[{pid}]"


def phases(state: dict, wall: float) -> dict:
    """Wall seconds per phase from align's state (round 1) and the remainder: start-up, loads, shutdown."""
    base = state["baseline"]  # round 0's wall time: in its row (logged with it), older states beside it
    out = {"round0_eval": base.get("row", {}).get("eval_wall_seconds", base.get("eval_wall_seconds", 0.0))}
    for r in state["rounds"]:
        out.update({f"round{r['index']}_{k.removesuffix('_wall_seconds')}": v for k, v in r["metrics"].items()
                    if k.endswith("_wall_seconds")})
    out["startup_and_other"] = wall - sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--json", help="write the result here too")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (the suite's twin)")
    parser.add_argument("--prompts", type=int, default=2, help="training prompts (held-out: as many, at least 2)")
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per video")
    parser.add_argument("--gapo-steps", type=int, default=1, help="GAPO updates (each: 4 accumulated pairs)")
    parser.add_argument("--timeout", type=float, default=540)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    began = time.perf_counter()
    overrides = round_overrides(args) + reward_overrides(os.path.join(args.out, "models"), args.tiny)
    built = time.perf_counter() - began
    command = [sys.executable, "-m", "anisora_ray.cli", "align", "--config", CONFIG]
    for o in overrides:
        command += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    print(f"models ready in {built:.0f}s; running align (timeout {args.timeout:.0f}s)", flush=True)
    began = time.perf_counter()
    with GpuSampler() as sampler:
        done = subprocess.run(command, cwd=REPO, env=env, timeout=args.timeout, check=False)
    wall = time.perf_counter() - began
    state_uri = os.path.join(args.out, "run", "align", "state.json")
    if done.returncode != 0 or not os.path.isfile(state_uri):
        raise SystemExit(f"align failed (exit {done.returncode}); logs under {args.out}/run/align/logs")
    with open(state_uri) as f:
        state = json.load(f)
    rounds = {r["index"]: r for r in state["rounds"]}
    result = {"tiny": args.tiny, "models_seconds": round(built, 1), "align_seconds": round(wall, 1),
              "phases_seconds": phases(state, wall), **sampler.summary(),
              "round1": {k: rounds[1]["metrics"].get(k) for k in ("pairs", "train_loss", "train_step_seconds",
                                                                  "refresh_seconds", "heldout_reward")},
              # the config's FasterCache against every step computed, on these weights (eval/cache_audit.py)
              "cache_audit": {f"round{i}": {k: v for k, v in row.items() if k.startswith("cache_audit_")}
                              for i, row in ((0, state["baseline"]["row"]), (1, rounds[1]["metrics"]))},
              "settings": {k: getattr(args, k) for k in ("prompts", "candidates", "steps", "gapo_steps")}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
