"""Real-size GPU check: CogVideoX-5B I2V and its T5-XXL text encoder (``--family cogvideox_i2v``, the default) or
Wan2.2-TI2V-5B and its UMT5-XXL encoder (``--family wan_i2v``), built from their published configs with random
weights (nothing downloaded), run through the project's own generator and GAPO/DeepSpeed code.

Phases, each in its own process (so one phase's GPU memory cannot leak into the next):

- ``generate``: ``anisora_ray.generation.Generator`` renders one video with CFG at the real config's geometry
  (49x480x720 CogVideoX, 121x704x1280 Wan2.2-TI2V-5B; seconds per video, peak GPU memory);
- ``lora``: ``anisora_ray.gapo.engine.GapoWorker`` with ``configs/deepspeed/zero2_bf16.json``, LoRA
  r=64 on to_q/to_k/to_v/to_out.0, gradient checkpointing (seconds per pair update, peak memory);
- ``zero3``: the same worker, full fine-tuning under ``configs/deepspeed/zero3_offload.json``
  (optimizer state on the host, reference model a partitioned ZeRO-3 engine), and the gathered
  bucket-by-bucket export of the trained transformer to a folder.

World size 1 (NCCL on a GPU, gloo on the CPU). It imports no Ray: a bare GPU machine with torch,
diffusers, transformers, peft and DeepSpeed runs it. ``--tiny`` runs the same code at tiny size on the
CPU in seconds (the test suite does, with Ray made unimportable). Within 8 minutes on one H100::

    python benchmarks/realsize_gpu.py --out /tmp/realsize --json realsize.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# THUDM/CogVideoX-5b-I2V, from its published configs (random weights: compute does not depend on them).
TRANSFORMER_5B_I2V = dict(num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, num_layers=42,
                          time_embed_dim=512, text_embed_dim=4096, sample_width=90, sample_height=60, sample_frames=49,
                          patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True,
                          use_learned_positional_embeddings=True)
T5_XXL_ENCODER = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)
VAE_5B_I2V = dict(scaling_factor=0.7)  # the rest: AutoencoderKLCogVideoX's defaults are CogVideoX's VAE
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
# Wan-AI/Wan2.2-TI2V-5B-Diffusers, from its published configs: a 5B transformer (dim 3072 = 24 x 128, 30 layers),
# the Wan2.2 VAE (z 48, 16x space via a 2x2 patchify, 4x time), UMT5-XXL, UniPC with flow shift 5.
WAN22_TI2V_5B = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                     out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
                     qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48,
                 latents_std=[1.0] * 48)
UMT5_XXL_ENCODER = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384,
                        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)
REAL_CONFIGS = {"cogvideox_i2v": "cogvideox5b_i2v.yaml", "wan_i2v": "wan22_ti2v5b.yaml"}
GEOMETRY = {"cogvideox_i2v": (49, 480, 720), "wan_i2v": (121, 704, 1280)}  # frames, height, width of the real configs


def build_realsize_wan(folder: str) -> str:
    """Write a random-init Wan2.2-TI2V-5B pipeline (bf16, safetensors) to ``folder`` (once)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**WAN22_TI2V_5B).to(torch.bfloat16)
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL_ENCODER)).to(torch.bfloat16)
        vae = AutoencoderKLWan(**WAN22_VAE).to(torch.float32)  # Wan runs its VAE in float32
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = WanImageToVideoPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   transformer=transformer, expand_timesteps=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_realsize(folder: str, family: str = "cogvideox_i2v") -> str:
    """Write a random-init CogVideoX-5B I2V (or, ``wan_i2v``, Wan2.2-TI2V-5B) pipeline (bf16, safetensors) to
    ``folder`` (once)."""
    if family == "wan_i2v":
        return build_realsize_wan(folder)
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: minutes faster than on the host
        transformer = CogVideoXTransformer3DModel(**TRANSFORMER_5B_I2V).to(torch.bfloat16)
        text_encoder = T5EncoderModel(T5Config(**T5_XXL_ENCODER)).to(torch.bfloat16)
        vae = AutoencoderKLCogVideoX(**VAE_5B_I2V).to(torch.bfloat16)
    pipe = CogVideoXImageToVideoPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae,
                                         transformer=transformer, scheduler=CogVideoXDDIMScheduler(**SCHEDULER))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny(folder: str, family: str = "cogvideox_i2v") -> str:
    from anisora_ray.config import GeneratorConfig, ModelConfig, TinyModelConfig
    from anisora_ray.models.families import get_family

    model = ModelConfig(family=family, tiny=TinyModelConfig(warm_start_steps=0, wan_variant="wan22_ti2v"))
    return get_family(family).save_tiny(model, GeneratorConfig(height=32, width=32, num_frames=9), folder)


def config(args, folder: str, **gapo):
    from anisora_ray.config import load_config

    size = (["generator.height=32", "generator.width=32", "generator.num_frames=9", "generator.num_inference_steps=3",
             "model.dtype=float32", "generator.max_sequence_length=128", "generator.device=cpu",
             "generator.vae_tiling=false", "generator.vae_slicing=false"] if args.tiny else
            [f"generator.num_inference_steps={args.steps}", "generator.device=cuda"])
    real = os.path.join(REPO, "configs", REAL_CONFIGS[args.family])
    overrides = [f"model.pretrained={folder}", "run.output_dir=" + os.path.join(args.out, "run"),
                 "ray.address=null", "generator.candidates_per_prompt=1", *size]
    overrides += [f"gapo.{k}={v}" for k, v in gapo.items()]
    return load_config(real, overrides)


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def phase_generate(args) -> dict:
    import numpy as np
    import torch

    from anisora_ray.data.demo import make_demo_set
    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.generation.generator import Generator
    from anisora_ray.io.video import read_all_frames, write_video
    from anisora_ray.types import GenerationRequest

    folder = args.model
    cfg = config(args, folder)
    item = read_manifest(make_demo_set(os.path.join(args.out, "demo"), num_prompts=1,
                                       image_size=max(cfg.generator.height, cfg.generator.width), seed=0))[0]
    began = time.perf_counter()
    generator = Generator(folder, cfg.model, cfg.generator, cfg.video)
    load = time.perf_counter() - began
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    began = time.perf_counter()
    candidates, bad = generator.generate([GenerationRequest(item, (1,))], os.path.join(args.out, "gen"))
    seconds = time.perf_counter() - began
    if bad or not candidates:
        raise RuntimeError(f"generation failed: {bad}")
    winner = candidates[0].video_uri  # the loser: the same clip reversed (GAPO compute does not depend on content)
    loser = os.path.join(args.out, "gen", "reversed.mp4")
    write_video(np.ascontiguousarray(read_all_frames(winner)[::-1]), loser, fps=cfg.generator.fps)
    row = {"prompt": item.prompt, "image_uri": item.image_uri, "winner_video_uri": winner, "loser_video_uri": loser,
           "winner_reward": 0.8, "loser_reward": 0.3, "winner_seed": 1, "loser_seed": 2}
    with open(os.path.join(args.out, "pair.json"), "w") as f:
        json.dump(row, f)
    return {"phase": "generate", "load_s": load, "seconds_per_video": seconds, "steps": cfg.generator.num_inference_steps,
            "frames": candidates[0].num_frames, "height": candidates[0].height, "width": candidates[0].width,
            "peak_gpu_gb": _peak_gb()}


def write_pair(folder: str, frames: int = 49, height: int = 480, width: int = 720) -> str:
    """A winner/loser pair of smooth synthetic clips and its image, for ``--pair`` (GAPO compute does not
    depend on content): lets a GPU session time the GAPO phases without carrying a video encoder."""
    import numpy as np
    from PIL import Image

    from anisora_ray.io.video import write_video

    os.makedirs(folder, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]

    def clip(sign: int):
        return np.stack([np.stack([(127 + 100 * np.sin((x + sign * 8 * t) / 60.0)).astype(np.uint8),
                                   (127 + 100 * np.cos((y + sign * 5 * t) / 50.0)).astype(np.uint8),
                                   np.full((height, width), 90, np.uint8)], -1) for t in range(frames)])

    write_video(clip(1), os.path.join(folder, "winner.mp4"), fps=8, crf=28)
    write_video(clip(-1), os.path.join(folder, "loser.mp4"), fps=8, crf=28)
    Image.fromarray(clip(1)[0]).save(os.path.join(folder, "image.png"))
    row = {"prompt": "a girl with red hair waves", "image_uri": os.path.join(folder, "image.png"),
           "winner_video_uri": os.path.join(folder, "winner.mp4"), "loser_video_uri": os.path.join(folder, "loser.mp4"),
           "winner_reward": 0.8, "loser_reward": 0.3, "winner_seed": 1, "loser_seed": 2}
    with open(os.path.join(folder, "pair.json"), "w") as f:
        json.dump(row, f)
    return os.path.join(folder, "pair.json")


def _init_distributed(tiny: bool) -> None:
    import deepspeed

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29561")})
    deepspeed.init_distributed(dist_backend="gloo" if tiny else "nccl")


def phase_gapo(args, mode: str) -> dict:
    import torch

    from anisora_ray.gapo.engine import GapoWorker, deepspeed_config

    _init_distributed(args.tiny)
    with open(os.path.join(args.out, "pair.json")) as f:
        row = json.load(f)
    overrides = {"gradient_accumulation_steps": 1}
    common = {"gradient_checkpointing": "true", "steps": args.gapo_steps + 1, "cache_latents": "false",
              "compile": str(mode in args.gapo_compile.split(",")).lower()}
    if mode == "lora":
        cfg = config(args, args.model, deepspeed_config="configs/deepspeed/zero2_bf16.json",
                     **{"lora.r": 4 if args.tiny else 64, "lora.alpha": 4 if args.tiny else 64}, **common)
    else:
        cfg = config(args, args.model, deepspeed_config="configs/deepspeed/zero3_offload.json", **common)
        if args.tiny:  # at tiny size nothing would be partitioned otherwise
            overrides["zero_optimization"] = {"stage3_param_persistence_threshold": 0}
    ds = deepspeed_config(cfg, REPO)
    ds["gradient_accumulation_steps"] = 1  # one pair per timed update
    ds["zero_optimization"].update(overrides.get("zero_optimization", {}))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    began = time.perf_counter()
    worker = GapoWorker(cfg, args.model, ds, device)
    load = time.perf_counter() - began
    encode = worker.prepare([row])
    worker.train_update()  # warm-up (allocator, kernels)
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    times = []
    for _ in range(args.gapo_steps):
        began = time.perf_counter()
        metrics = worker.train_update()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    peak = _peak_gb()
    began = time.perf_counter()
    manifest = worker.export(os.path.join(args.out, f"weights-{mode}"), 512.0 if not args.tiny else 0.02)
    export = time.perf_counter() - began
    reference = worker.reference.module
    partitioned = hasattr(next(iter(getattr(reference, "module", reference).parameters())), "ds_id")
    return {"phase": mode, "zero_stage": worker.engine.zero_optimization_stage(), "load_s": load, "encode_s": encode,
            "encoder_loads": worker.encoders.loads, "seconds_per_update": sorted(times)[len(times) // 2],
            "loss": metrics["loss"], "peak_gpu_gb": peak, "export_s": export, "export_gb": manifest["num_bytes"] / 1e9,
            "export_files": len(manifest["files"]), "compiled": cfg.gapo.compile, "reference": "adapter off" if mode == "lora" else
            ("ZeRO-3 partitioned engine" if partitioned else "frozen copy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/anisora-realsize")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (what the test suite runs)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of the generated video")
    parser.add_argument("--gapo-steps", type=int, default=2, help="timed GAPO updates after one warm-up")
    parser.add_argument("--phases", default="generate,lora,zero3")
    parser.add_argument("--family", default="cogvideox_i2v", choices=sorted(REAL_CONFIGS),
                        help="cogvideox_i2v: CogVideoX-5B I2V; wan_i2v: Wan2.2-TI2V-5B")
    parser.add_argument("--gapo-compile", default="", help="GAPO phases run with gapo.compile (e.g. lora)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--pair", help="pair.json for the GAPO phases instead of the generate phase's")
    parser.add_argument("--write-pair", metavar="DIR", help="write a synthetic pair at the family's real geometry to DIR and exit")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # a child: one phase, one JSON line
        result = phase_generate(args) if args.phase == "generate" else phase_gapo(args, args.phase)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.write_pair:
        print(write_pair(args.write_pair, *GEOMETRY[args.family]))
        return
    os.makedirs(args.out, exist_ok=True)
    if args.pair:
        import shutil

        shutil.copyfile(args.pair, os.path.join(args.out, "pair.json"))
    began = time.perf_counter()
    model = os.path.join(args.out, "model")
    model = build_tiny(model, args.family) if args.tiny else build_realsize(model, args.family)
    print(f"model built in {time.perf_counter() - began:.0f}s: {model}", flush=True)
    rows = []
    for phase in args.phases.split(","):
        argv = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--model", model, "--out", args.out,
                "--steps", str(args.steps), "--gapo-steps", str(args.gapo_steps), "--family", args.family,
                "--gapo-compile", args.gapo_compile] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(argv, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
            raise SystemExit(f"phase {phase} failed (exit {done.returncode})")
        rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(json.dumps(rows[-1]), flush=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"
    name = {"cogvideox_i2v": "CogVideoX-5B I2V + T5-XXL", "wan_i2v": "Wan2.2-TI2V-5B + UMT5-XXL"}[args.family]
    print(f"\nreal-size check on {device} ({'tiny ' + args.family if args.tiny else name + ', random init'}), "
          f"{time.perf_counter() - began:.0f}s in all")
    for r in rows:
        if r["phase"] == "generate":
            print(f"  generate: {r['seconds_per_video']:.1f} s per {r['frames']}x{r['height']}x{r['width']} video at "
                  f"{r['steps']} steps, peak {r['peak_gpu_gb']:.1f} GB")
        else:
            print(f"  {r['phase']} (ZeRO-{r['zero_stage']}, reference: {r['reference']}): {r['seconds_per_update']:.2f} s "
                  f"per pair update, peak {r['peak_gpu_gb']:.1f} GB; export {r['export_gb']:.2f} GB in "
                  f"{r['export_files']} file(s), {r['export_s']:.1f}s; encoders loaded {r['encoder_loads']}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "family": args.family, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
