"""The command line as a user runs it (in-process, on the session's Ray cluster)."""

import json
import os
import re

from anisora_ray.cli import main
from anisora_ray.data.manifest import read_manifest
from anisora_ray.io import fs
from anisora_ray.io.video import read_all_frames
from anisora_ray.types import Candidate
from tests.conftest import LOCAL_CONFIG

SMALL = ["--set", "generator.height=32", "--set", "generator.width=32", "--set", "generator.num_inference_steps=2",
         "--set", "data.demo_prompts=2", "--set", "data.demo_image_size=64", "--set", "generator.candidates_per_prompt=2",
         "--set", "model.tiny.warm_start_steps=0", "--set", "video.sample_size=32"]


def test_generate_on_the_demo_set(ray_cluster, tmp_path, model_cache, capsys):
    out = tmp_path / "run"
    code = main(["generate", "--config", LOCAL_CONFIG, "--quiet", *SMALL,
                 "--set", f"run.output_dir={out}", "--set", f"model.cache_dir={model_cache}"])
    assert code == 0
    candidates = Candidate.from_table(fs.read_table(str(out / "generate" / "candidates.parquet")))
    prompts = read_manifest(str(out / "demo" / "prompts.parquet"))
    assert len(prompts) == 2 and len(candidates) == 4
    assert {c.prompt_id for c in candidates} == {p.prompt_id for p in prompts}
    for c in candidates:
        assert read_all_frames(c.video_uri).shape == (9, 32, 32, 3)
    assert "4 candidates" in capsys.readouterr().out


def test_bad_config_key_exits_2_and_names_it(capsys):
    assert main(["generate", "--config", LOCAL_CONFIG, "--set", "generator.replcas=2"]) == 2
    err = capsys.readouterr().err
    assert "generator.replcas" in err and "did you mean 'generator.replicas'" in err


def test_missing_inputs_named_on_the_command_line_fail_at_once_in_one_line(tmp_path, capsys):
    """Before Ray starts: `train` with a pairs folder, --init or --resume that is not there (a missing --resume failed
    in every Ray Train restart, two minutes of tracebacks); `score` with no candidates file (a raw traceback)."""
    os.makedirs(tmp_path / "pairs")
    for args, said in ((["train", "--pairs", str(tmp_path / "nope")], "pairs folder .*nope does not exist"),
                       (["train", "--pairs", str(tmp_path / "pairs"), "--init", str(tmp_path / "nowhere")],
                        "train --init .*nowhere: no such folder"),
                       (["train", "--pairs", str(tmp_path / "pairs"), "--resume", str(tmp_path / "no-ckpt")],
                        "train --resume .*no-ckpt: no such folder"),
                       (["score", "--candidates", str(tmp_path / "nope.parquet")],
                        r"(no such file or folder|FileNotFoundError): .*nope.parquet \(--verbose: the traceback\)")):
        assert main([*args, "--config", LOCAL_CONFIG, "--set", f"run.output_dir={tmp_path / 'out'}"]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(f"^anisora-ray: error: {said}", err), err


def test_an_unknown_tiny_reward_kind_lists_the_kinds(tmp_path, capsys):
    assert main(["tiny-reward", "--kind", "bogus", "--out", str(tmp_path / "x")]) == 2  # a ValueError traceback
    assert "unknown tiny backbone 'bogus'; expected one of clip, siglip" in capsys.readouterr().err


def test_ctrl_c_during_align_is_one_line_that_says_how_to_go_on(tmp_path, model_cache):
    """SIGINT (Ctrl-C) while the job runs: exit 130 and one line (a hundred-line KeyboardInterrupt traceback before)."""
    import signal
    import subprocess
    import sys
    import time

    job = subprocess.Popen([sys.executable, "-m", "anisora_ray.cli", "align", "--config", LOCAL_CONFIG, "--set",
                            f"run.output_dir={tmp_path}", "--set", f"model.cache_dir={model_cache}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    time.sleep(10)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=180)
    assert job.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "anisora-ray: interrupted; what finished is kept; continue with --resume"


def test_make_demo_then_build_manifest(tmp_path, capsys):
    assert main(["make-demo", "--out", str(tmp_path / "demo"), "--num", "2", "--image-size", "32"]) == 0
    items = read_manifest(str(tmp_path / "demo" / "prompts.parquet"))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"image": f"{i.prompt_id}.png", "prompt": i.prompt}) for i in items))
    assert main(["build-manifest", "--images", str(tmp_path / "demo" / "images"), "--prompts", str(tmp_path / "p.jsonl"),
                 "--out", "memory://cli/m.parquet"]) == 0
    assert [i.prompt for i in read_manifest("memory://cli/m.parquet")] == [i.prompt for i in items]
    assert main(["build-manifest", "--images", str(tmp_path / "nowhere"), "--prompts", str(tmp_path / "p.jsonl"),
                 "--out", "memory://cli/m2.parquet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a flag of the other source is refused, not dropped (a captioning model would write the prompts instead)
    for source, stray in (("--videos", ["--prompts", "p.jsonl"]), ("--images", ["--captions", "c.csv"]),
                          ("--images", ["--images-out", "frames"])):
        assert main(["build-manifest", source, str(tmp_path / "demo" / "images"), *stray,
                     "--out", "memory://cli/m3.parquet"]) == 2
        assert f"{stray[0]} do(es) not go with {source}" in capsys.readouterr().err


def test_build_manifest_from_a_folder_of_clips_takes_first_frames_and_sets_bad_clips_aside(tmp_path, capsys):
    import numpy as np

    from anisora_ray.io.images import load_image
    from anisora_ray.io.video import write_video
    from anisora_ray.types import QuarantineRecord

    clips = tmp_path / "clips"
    clips.mkdir()
    firsts = {}
    y, x = np.mgrid[0:32, 0:32]
    for k, name in enumerate(("b_walk", "a_wave")):
        first = np.stack([x * 8, y * 8, np.full_like(x, 60 + 100 * k)], -1).astype(np.uint8)  # smooth: x264-friendly
        frames = np.stack([first] + [255 - first] * 4)  # later frames differ: the image must be frame 0
        write_video(frames, str(clips / f"{name}.mp4"), fps=8, crf=0)
        firsts[name] = first
    (clips / "c_broken.mp4").write_bytes(b"\x00\x00\x00 ftypisom truncated")
    (tmp_path / "captions.txt").write_text("a girl waves\na boy walks\nnever decoded\n")  # sorted: a_, b_, c_
    out = tmp_path / "data" / "train.parquet"
    assert main(["build-manifest", "--videos", str(clips), "--captions", str(tmp_path / "captions.txt"),
                 "--out", str(out)]) == 0
    assert "2 prompts" in capsys.readouterr().out
    items = read_manifest(str(out))
    assert [(i.prompt_id, i.prompt) for i in items] == [("a_wave", "a girl waves"), ("b_walk", "a boy walks")]
    for item in items:
        image = np.asarray(load_image(item.image_uri))
        assert item.image_uri.startswith(str(tmp_path / "data" / "first-frames"))
        assert np.abs(image.astype(int) - firsts[item.prompt_id]).mean() < 8  # frame 0 (lossless x264, yuv420)
    bad = QuarantineRecord.from_table(fs.read_table(str(tmp_path / "data" / "train.quarantine.parquet")))
    assert [(q.item_id, q.reason) for q in bad] == [("c_broken", "VideoDecodeError")]
    (clips / "c_broken.mp4").unlink()  # fixed by removing it: the rerun sets nothing aside, and says so by no file
    (tmp_path / "captions.txt").write_text("a girl waves\na boy walks\n")
    assert main(["build-manifest", "--videos", str(clips), "--captions", str(tmp_path / "captions.txt"),
                 "--out", str(out)]) == 0
    assert not (tmp_path / "data" / "train.quarantine.parquet").exists() and len(read_manifest(str(out))) == 2
    missing = str(tmp_path / "no-such-captioner")  # no captions and no captioner model: said before Ray starts
    assert main(["build-manifest", "--videos", str(clips), "--out", str(out), "--captioner", missing]) == 2
    assert "--captions" in capsys.readouterr().err


def test_align_on_the_real_config_without_data_fails_at_once_naming_the_key(capsys):
    from tests.conftest import REPO

    assert main(["align", "--config", f"{REPO}/configs/cogvideox5b_i2v.yaml"]) == 2
    err = capsys.readouterr().err
    assert "data.prompts and eval.prompts are not set" in err and "build-manifest --videos" in err  # both, at once
    assert "docs/data.md" in err
    # with what else the shared volume lacks: one error, not one resubmission per missing file
    assert "3 things to fix" in err and "options.code '/mnt/anisora-ray/Index-anisora' does not exist" in err
    assert "aesthetic_head '/mnt/anisora-ray/eval/sa_0_4_vit_l_14_linear.pth' does not exist" in err
    assert main(["align", "--config", f"{REPO}/configs/cogvideox5b_i2v.yaml", "--set", "data.prompts=m.parquet"]) == 2
    err = capsys.readouterr().err
    assert "eval.prompts is not set" in err and "data.prompts = 'm.parquet' do(es) not exist" in err


def test_pairs_and_align_with_one_candidate_per_prompt_fail_at_once_naming_the_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a remote run.output_dir keeps the driver's log under ./logs
    for command in ("pairs", "align", "ablate"):
        argv = [command, "--config", LOCAL_CONFIG, "--set", f"run.output_dir={tmp_path / command}",
                "--set", "generator.candidates_per_prompt=1"] + (["--variants", "gapo"] if command == "ablate" else [])
        assert main(argv) == 2, command
        assert "generator.candidates_per_prompt = 1: pairs need two candidates" in capsys.readouterr().err, command
    # what training would refuse after round 0's evaluation and round 1's rollouts is refused before Ray starts
    for command, setting, said in (
            ("align", "gapo.deepspeed_config=configs/deepspeed/nowhere.json", "cannot read a JSON file"),
            ("ablate", "gapo.compile=true", "gapo.compile needs ZeRO-1/2"),
            ("align", "run.output_dir=memory://bucket/run", "is remote: set tracking.tracking_uri")):
        extra = ["--set", "gapo.deepspeed_config=configs/deepspeed/zero3_offload.json"] if "compile" in setting else []
        argv = [command, "--config", LOCAL_CONFIG, "--set", f"run.output_dir={tmp_path / 'early'}", *extra,
                "--set", setting] + (["--variants", "gapo"] if command == "ablate" else [])
        assert main(argv) == 2, setting
        assert said in capsys.readouterr().err, setting
    assert os.listdir(tmp_path / "logs" / "align" / "logs") == ["ray-driver.log"]  # not in the checkout


def test_build_gallery_from_the_command_line(tmp_path, capsys):
    from PIL import Image

    from anisora_ray.io.images import save_image

    for cid, colour in [("aki", (250, 120, 170)), ("ren", (60, 90, 220))]:
        save_image(Image.new("RGB", (48, 48), colour), str(tmp_path / "refs" / cid / "a.png"))
    cache = str(tmp_path / "backbones")
    character = ["--set", "reward.dimensions.character.backend=grounded", "--set",
                 "reward.dimensions.character.options={detector: 'tiny:grounding-dino', segmenter: 'tiny:sam', "
                 f"embedder: 'tiny:clip', box_threshold: 0.0, text_threshold: 0.0, cache_dir: '{cache}'}}"]
    out = str(tmp_path / "gallery.safetensors")
    assert main(["build-gallery", "--config", LOCAL_CONFIG, *character, "--references", str(tmp_path / "refs"), "--out", out]) == 0
    assert "2 characters" in capsys.readouterr().out and fs.exists(out + ".json")
    # The classical character backend has no gallery: a clear error, exit 2.
    assert main(["build-gallery", "--config", LOCAL_CONFIG, "--references", str(tmp_path / "refs"), "--out", out]) == 2
    assert "build-gallery needs 'grounded'" in capsys.readouterr().err


def test_pairs_command_writes_and_resumes(ray_cluster, tmp_path, model_cache, capsys):
    from anisora_ray.pairs import read_pairs

    out = tmp_path / "pairs"
    args = ["pairs", "--config", LOCAL_CONFIG, "--quiet", *SMALL, "--set", f"run.output_dir={tmp_path / 'run'}",
            "--set", f"model.cache_dir={model_cache}", "--set", "generator.replicas=1", "--out", str(out)]
    assert main(args) == 0
    assert "2 pairs written (0 prompts already done" in capsys.readouterr().out
    assert len(read_pairs(str(out))) == 2
    assert main(args) == 0
    assert "0 pairs written (2 prompts already done" in capsys.readouterr().out
    # ... and `train` fits GAPO on those pairs, logs to MLflow and refreshes the generator replicas
    weights = tmp_path / "weights"
    assert main(["train", "--config", LOCAL_CONFIG, *SMALL, "--set", f"run.output_dir={tmp_path / 'run'}",
                 "--set", f"model.cache_dir={model_cache}", "--set", "gapo.steps=2", "--set", "generator.replicas=2",
                 "--set", "gapo.refresh_every=1", "--pairs", str(out), "--out", str(weights)]) == 0
    printed = capsys.readouterr().out
    # version 1 reached the live replicas after step 1 (gapo.refresh_every), version 2 is the final weights
    assert "step 2: loss" in printed and "refreshed 2 replica(s) to weights version 2 (full" in printed
    version = json.loads(fs.read_bytes(str(weights / "weights_version.json")))
    assert version["version"] == 2 and version["kind"] == "full" and len(version["checksum"]) == 64
    import mlflow

    from anisora_ray.config import load_config
    from anisora_ray.tracking import tracking_uri

    cfg = load_config(LOCAL_CONFIG, [f"run.output_dir={tmp_path / 'run'}"])
    client = mlflow.MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    gapo = [r for r in runs if r.data.tags.get("anisora.stage") == "gapo"]
    assert len(gapo) == 1 and len(client.get_metric_history(gapo[0].info.run_id, "loss")) == 2
    assert [(m.step, m.value) for m in client.get_metric_history(gapo[0].info.run_id, "weights_version")] == [(1, 1.0)]


def test_tiny_model_command_writes_the_family_of_the_config(tmp_path, capsys):
    """``tiny-model`` builds the tiny pipeline of ``model.family``: the Wan default's is a Wan2.2-TI2V-structured
    ``WanImageToVideoPipeline`` folder of safetensors."""
    import os

    from tests.conftest import REPO

    out = tmp_path / "tiny-wan"
    args = ["tiny-model", "--config", os.path.join(REPO, "configs", "local_wan.yaml"), "--set",
            "model.tiny.warm_start_steps=0", "--set", f"model.cache_dir={tmp_path / 'cache'}"]
    assert main([*args, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("building the tiny wan_i2v model") and said.strip().endswith(str(out))
    # the same config again: the cached build copied (it built again, a warm start of minutes, without a word)
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "again")
    assert (tmp_path / "again" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["expand_timesteps"] is True
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").exists()


def test_flags_that_would_be_dropped_are_joined_or_refused(capsys):
    """``eval --versions 0,3 --versions mine=W`` kept only the last list (the README showed it so); ``pairs`` with both
    --prompts and --candidates ignored the manifest. Now the lists join, and two sources are refused, named."""
    from anisora_ray.cli import build_parser

    args = build_parser().parse_args(["eval", "--versions", "0,3", "--versions", "mine=/w"])
    assert [v for group in args.versions for v in group.split(",")] == ["0", "3", "mine=/w"]
    assert main(["pairs", "--prompts", "m.parquet", "--candidates", "c.parquet"]) == 2
    assert "--prompts generates candidates, --candidates scores ones already made: give one" in capsys.readouterr().err
