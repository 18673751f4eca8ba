"""``anisora-ray convert-wan``: Wan-format expert weights (AniSora V2/V3 releases) into a diffusers folder. At tiny
size: a tiny Wan's transformers (each released structure), perturbed (so the result cannot be the base's own weights), are written in Wan's
original layout (names inverted from diffusers' mapping here; the conversion itself is diffusers') as sharded
safetensors or a .pt file; the converted folder loads through the replicas' path bit for bit and renders; inputs
that do not fit are refused naming the source."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from anisora_ray.cli import main
from anisora_ray.data.manifest import read_manifest
from anisora_ray.errors import ConfigError
from anisora_ray.models.convert_wan import convert_wan
from anisora_ray.models.families import get_family
from anisora_ray.models.pipeline import resolve_pretrained
from anisora_ray.types import GenerationRequest

WAN = get_family("wan_i2v")
TO_WAN = [  # diffusers -> Wan's WanModel names (image embedder first: its norm2 is not a block's)
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), (".norm2.", ".norm3."), (".scale_shift_table", ".modulation"),
]


def to_wan_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key == "scale_shift_table":
            name = "head.modulation"
        elif key.startswith("proj_out."):
            name = "head.head." + key.removeprefix("proj_out.")
        else:
            name = key
            for a, b in TO_WAN:
                name = name.replace(a, b)
        out[name] = value
    return out


def wan_format_experts(pipe, folder, as_pt: tuple[int, ...] = ()) -> tuple[list[str], dict[str, dict]]:
    """Each transformer of ``pipe`` perturbed and written in Wan's layout: two safetensors shards in a folder, or one
    .pt file for the experts in ``as_pt``. Returns the sources (pipeline order) and the perturbed diffusers states."""
    sources, expected = [], {}
    for i, name in enumerate(n for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None):
        g = torch.Generator().manual_seed(i)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pipe.components[name].state_dict().items()}
        expected[name], wan = state, to_wan_names(state)
        assert "head.head.weight" in wan and not any("attn1" in k or "to_q" in k for k in wan)  # Wan's names
        if i in as_pt:
            path = os.path.join(folder, f"expert{i}.pt")
            torch.save(wan, path)
        else:
            path = os.path.join(folder, f"expert{i}")
            os.makedirs(path)
            keys = sorted(wan)
            for shard, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
                save_file({k: wan[k].contiguous() for k in part}, os.path.join(path, f"diffusion_pytorch_model-0000{shard}-of-00002.safetensors"))
        sources.append(path)
    return sources, expected


@pytest.mark.parametrize("variant", ["wan21_i2v", "wan22_ti2v", "wan22_i2v_a14b"])
def test_wan_format_experts_convert_to_a_folder_the_replicas_load_bit_for_bit(make_config, demo_manifest, tmp_path,
                                                                              variant, capsys):
    from anisora_ray.generation.generator import Generator

    cfg = make_config("model.family=wan_i2v", f"model.tiny.wan_variant={variant}")
    base = resolve_pretrained(cfg.model, cfg.generator)
    sources, expected = wan_format_experts(WAN.load(base, "float32", "cpu", None, "trainer"), str(tmp_path), as_pt=(1,))
    assert len(sources) == (2 if variant == "wan22_i2v_a14b" else 1)
    out = tmp_path / "converted"
    assert main(["convert-wan", *sources, "--base", base, "--out", str(out), "--dtype", "float32", "--check"]) == 0
    assert "loads as WanImageToVideoPipeline" in capsys.readouterr().out
    assert os.path.islink(out / "vae") and os.path.isfile(out / "anisora_conversion.json")
    assert not any(f.endswith((".bin", ".pt")) for _, _, fs in os.walk(out / "transformer") for f in fs)
    replica = Generator(str(out), cfg.model, cfg.generator, cfg.video)
    for name, state in expected.items():  # high-noise expert first: transformer, then transformer_2
        landed = replica.pipe.components[name].state_dict()
        assert landed.keys() == state.keys() and all(torch.equal(landed[k], state[k]) for k in state), name
    request = GenerationRequest(read_manifest(demo_manifest)[0], (3,))
    converted = replica.render([request])
    assert not np.array_equal(converted, Generator(base, cfg.model, cfg.generator, cfg.video).render([request]))


def test_weights_that_do_not_fit_the_base_are_refused_naming_the_source(make_config, tmp_path):
    a14b = make_config("model.family=wan_i2v", "model.tiny.wan_variant=wan22_i2v_a14b")
    wan21 = make_config("model.family=wan_i2v", "model.tiny.wan_variant=wan21_i2v")
    a14b_base, wan21_base = (resolve_pretrained(c.model, c.generator) for c in (a14b, wan21))
    os.makedirs(tmp_path / "a14b")
    (high, low), _ = wan_format_experts(WAN.load(a14b_base, "float32", "cpu", None, "trainer"), str(tmp_path / "a14b"))
    with pytest.raises(ConfigError, match="has 2 denoiser"):  # one expert given for two
        convert_wan(a14b_base, [high], str(tmp_path / "one"))
    os.makedirs(tmp_path / "wan21")
    (clip_conditioned,), _ = wan_format_experts(WAN.load(wan21_base, "float32", "cpu", None, "trainer"),
                                                str(tmp_path / "wan21"))
    with pytest.raises(ConfigError, match=f"{clip_conditioned}: not the weights of .*unexpected"):  # img_emb: Wan2.1's
        convert_wan(a14b_base, [high, clip_conditioned], str(tmp_path / "mixed"))
    first_shard = sorted(os.listdir(low))[0]
    os.remove(os.path.join(low, first_shard))  # a truncated download: half the tensors
    with pytest.raises(ConfigError, match=f"{low}: not the weights of .*parameters missing"):
        convert_wan(a14b_base, [high, low], str(tmp_path / "truncated"))
    assert not os.path.exists(tmp_path / "truncated")  # the first expert was written, but to <out>.partial only
    with pytest.raises(ConfigError, match="no such file or folder"):
        convert_wan(a14b_base, [high, str(tmp_path / "nowhere")], str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a diffusers pipeline folder"):
        convert_wan(str(tmp_path), [high], str(tmp_path / "nobase"))


def test_a_model_folder_that_is_not_there_is_named_before_anything_starts(make_config, tmp_path):
    """``model.pretrained`` written as a path (a converted AniSora folder not made yet) is refused by ``align`` before
    Ray starts, and by every stage that resolves it, naming the key and ``convert-wan``; Hub ids pass through."""
    from anisora_ray.loop.align import run_alignment

    missing = str(tmp_path / "Index-anisora-V3.2-diffusers")
    cfg = make_config("model.family=wan_i2v", f"model.pretrained={missing}")
    with pytest.raises(ConfigError, match=f"model.pretrained = '{missing}' is not a folder.*anisora-ray convert-wan"):
        run_alignment(cfg, progress=False)
    assert not os.path.exists(os.path.join(cfg.run.output_dir, "align"))  # said before its first write, before Ray
    with pytest.raises(ConfigError, match="is not a folder"):
        resolve_pretrained(cfg.model, cfg.generator)
    os.makedirs(missing)
    with pytest.raises(ConfigError, match="has no model_index.json: not a diffusers pipeline folder"):
        resolve_pretrained(cfg.model, cfg.generator)
    import shutil

    tiny = make_config("model.family=wan_i2v")
    shutil.copytree(resolve_pretrained(tiny.model, tiny.generator), missing, dirs_exist_ok=True)
    assert resolve_pretrained(cfg.model, cfg.generator) == missing  # once it exists
    # converted elsewhere with links into that machine's Hugging Face cache: refused before anything loads
    shutil.rmtree(os.path.join(missing, "vae"))
    os.symlink(str(tmp_path / "another-machines-cache" / "vae"), os.path.join(missing, "vae"))
    with pytest.raises(ConfigError, match=r"\['vae'\] are links to nothing here .*convert-wan --copy"):
        resolve_pretrained(cfg.model, cfg.generator)
    os.remove(os.path.join(missing, "model_index.json"))  # converted without --copy, it is a link too
    os.symlink(str(tmp_path / "another-machines-cache" / "model_index.json"), os.path.join(missing, "model_index.json"))
    with pytest.raises(ConfigError, match=r"\['model_index.json'\] are links to nothing here"):
        resolve_pretrained(cfg.model, cfg.generator)
    hub = make_config("model.pretrained=Wan-AI/Wan2.2-I2V-A14B-Diffusers")
    assert resolve_pretrained(hub.model, hub.generator) == "Wan-AI/Wan2.2-I2V-A14B-Diffusers"


def test_sources_are_named_before_the_base_is_fetched_and_a_hub_that_cannot_give_it_is_one_line(tmp_path, capsys,
                                                                                                 monkeypatch):
    """`convert-wan` fetched a Hub base first (a 90-line traceback offline, the missing source never named); the
    released-reward conversion's Hub download says the same in one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without the Hub gets, at once
    hub = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
    assert main(["convert-wan", str(tmp_path / "nope"), "--base", hub, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"anisora-ray: error: {tmp_path / 'nope'}: no such file or folder"
    source = tmp_path / "experts"
    source.mkdir()
    save_file({"x": torch.zeros(1)}, str(source / "model.safetensors"))
    assert main(["convert-wan", str(source), "--base", hub, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--base '{hub}' is no local folder, and the Hugging Face Hub did not give it" in err
    assert main(["convert-reward", "--source", "IndexTeam/Index-anisora", "--out", str(tmp_path / "reward")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is no local folder, and the Hugging Face Hub did not give it" in err
