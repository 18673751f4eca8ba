"""The released AnimeReward as published: the Hub's layout (``reward/weights``, ``reward/IP_checkpoints``,
``reward/videos.tar.gz``; ``gallerys.json`` only in the GitHub code) and the code's layout convert alike,
from a folder, a Hub repo id, or the CLI; the character gallery is extracted safely, embedded once by
the first scorer on its device and cached beside the weights."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from anisora_ray.reward.base import ClipBatch, build_dimension
from anisora_ray.reward.released import synthetic
from anisora_ray.reward.released.common import CheckpointError, released_pixels
from anisora_ray.reward.released.convert import RELEASED, convert_all, find_tree, hub_patterns

DETECTOR = {"detector": "tiny:grounding-dino", "segmenter": "tiny:sam", "box_threshold": 0.0, "text_threshold": 0.0,
            "device": "cpu"}


def crops(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, 256, (36, 40, 3), dtype=np.uint8) for name in ("Alice", "alice", "Bob", "Carol")}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A synthetic snapshot of IndexTeam/Index-anisora and a clone of the code holding gallerys.json."""
    root = tmp_path_factory.mktemp("hub")
    snapshot = synthetic.write_released_tree(str(root / "snapshot"), crops(), layout="hub", code=str(root / "Index-anisora"))
    return snapshot, str(root / "Index-anisora")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    return str(tmp_path_factory.mktemp("backbones"))


def test_layouts_are_told_apart_and_errors_name_the_file_the_layout_and_where_gallerys_json_is(hub, tmp_path):
    snapshot, code = hub
    assert (find_tree(snapshot).layout, find_tree(snapshot).root) == ("hub", os.path.join(snapshot, "reward"))
    assert find_tree(os.path.join(snapshot, "reward")).layout == "hub"
    (tmp_path / "clone" / "reward" / "character" / "BLIP").mkdir(parents=True)  # a clone: code, no weights yet
    assert find_tree(str(tmp_path / "clone")).layout == "code"
    with pytest.raises(CheckpointError, match=r"character/IP_checkpoints/blip_checkpoints/animate_recoginzer.pth \(code "
                                              r"layout\) is not under .*clone/reward"):
        find_tree(str(tmp_path / "clone")).path("character", "file")
    (tmp_path / "snap" / "reward" / "IP_checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"the released file videos.tar.gz \(hub layout\)"):
        find_tree(str(tmp_path / "snap")).path("character", "gallery_root")
    with pytest.raises(CheckpointError, match=r"gallerys.json not found .* not on the Hub: it is in the GitHub repository "
                                              r"bilibili/Index-anisora at reward/character/BLIP/data/gallerys.json.*--code"):
        find_tree(snapshot).path("character", "gallery")
    assert find_tree(snapshot, code).path("character", "gallery") == os.path.join(
        code, "reward", "character", "BLIP", "data", "gallerys.json")
    json_file = find_tree(snapshot, code).path("character", "gallery")
    assert find_tree(snapshot, json_file).path("character", "gallery") == json_file  # or the file itself
    with pytest.raises(CheckpointError, match="code .*nowhere does not exist"):
        find_tree(snapshot, str(tmp_path / "nowhere")).path("character", "gallery")


def test_a_hub_repo_id_downloads_the_hub_layout_and_converts_like_the_code_layout(hub, tmp_path, monkeypatch):
    """The download patterns are the Hub's paths (a fake Hub serving the synthetic snapshot's files that
    match them); the code layout of the same release converts to the same folders."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    snapshot, code = hub
    files = [os.path.relpath(os.path.join(d, n), snapshot) for d, _, names in os.walk(snapshot) for n in names]

    def snapshot_download(repo_id, allow_patterns):
        assert repo_id == "IndexTeam/Index-anisora"
        local = tmp_path / "hub-cache"
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
            os.makedirs(local / os.path.dirname(rel), exist_ok=True)
            shutil.copy(os.path.join(snapshot, rel), local / rel)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub_patterns(["character"]) == ["reward/IP_checkpoints/blip_checkpoints/animate_recoginzer.pth",
                                           "reward/videos.tar.gz"]
    tokenizer = os.path.join(snapshot, "clip-tokenizer")
    from_hub = convert_all("IndexTeam/Index-anisora", str(tmp_path / "from-hub"), code=code, clip_tokenizer=tokenizer)
    assert sorted(from_hub) == sorted(RELEASED)

    # The code's layout, as the READMEs say: IP_checkpoints under character/, the tarball extracted to character/videos
    tree = str(tmp_path / "reward")
    shutil.copytree(os.path.join(snapshot, "reward", "weights"), os.path.join(tree, "weights"))
    shutil.copytree(os.path.join(snapshot, "reward", "IP_checkpoints"), os.path.join(tree, "character", "IP_checkpoints"))
    shutil.copytree(os.path.join(code, "reward", "character", "BLIP"), os.path.join(tree, "character", "BLIP"))
    with tarfile.open(os.path.join(snapshot, "reward", "videos.tar.gz")) as tar:
        tar.extractall(os.path.join(tree, "character"), filter="data")
    from_code = convert_all(tree, str(tmp_path / "from-code"), ["character", "image_video"])
    for name, folder in from_code.items():
        for rel in ("config.json", "model.safetensors", "gallery/clip2/mask_crop/object1_img0.png")[: 3 if name == "character" else 2]:
            with open(os.path.join(folder, rel), "rb") as a, open(os.path.join(from_hub[name], rel), "rb") as b:
                assert a.read() == b.read(), (name, rel)
    config = json.loads((tmp_path / "from-hub" / "character" / "config.json").read_text())
    assert config["gallery_names"] == ["alice", "alice", "bob", "carol"]


def tarball(path, members: dict[str, bytes], links: dict[str, str] | None = None) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return str(path)


def test_the_gallery_tarball_is_extracted_with_or_without_a_videos_folder_and_nothing_escapes(tmp_path):
    from PIL import Image

    from anisora_ray.reward.released.gallery import collect

    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
    entries = [{"image": "c0/mask_crop/object1_img0.png", "caption": "Alice"}, {"image": "c1/x.png", "caption": "Bob"}]
    (tmp_path / "gallerys.json").write_text(json.dumps(entries))
    for i, prefix in enumerate(("videos/", "", "./")):
        members = {f"{prefix}{e['image']}": png.getvalue() for e in entries} | {"../escape.png": b"x", "/abs.png": b"x",
                                                                               f"{prefix}c0/frames/0.jpg": b"x"}
        out = tmp_path / f"out{i}"
        got = collect(str(tmp_path / "gallerys.json"), tarball(tmp_path / f"v{i}.tar.gz", members), str(out))
        assert got == [{"image": "gallery/c0/mask_crop/object1_img0.png", "name": "alice"},
                       {"image": "gallery/c1/x.png", "name": "bob"}]
        assert sorted(os.path.relpath(os.path.join(d, n), out) for d, _, ns in os.walk(out) for n in ns) == [
            "gallery/c0/mask_crop/object1_img0.png", "gallery/c1/x.png"]  # only the gallery's crops
    assert not (tmp_path / "escape.png").exists() and not os.path.exists("/abs.png")
    # A link standing in for a crop is not followed; the crop is then missing, by name
    linked = tarball(tmp_path / "link.tar.gz", {"videos/c0/mask_crop/object1_img0.png": png.getvalue()},
                     links={"videos/c1/x.png": "/etc/hostname"})
    with pytest.raises(CheckpointError, match=r"1 image\(s\) of gallerys.json are not in .*link.tar.gz .*\['c1/x.png'\]"):
        collect(str(tmp_path / "gallerys.json"), linked, str(tmp_path / "linked"))
    (tmp_path / "evil.json").write_text(json.dumps([{"image": "../../etc/passwd", "caption": "a"}, *entries]))
    with pytest.raises(CheckpointError, match=r"image paths outside the gallery: \['../../etc/passwd'\]"):
        collect(str(tmp_path / "evil.json"), linked, str(tmp_path / "evil"))


def test_the_first_scorer_embeds_the_gallery_and_caches_it_the_next_loads_it_and_scores_match_the_reference(
        hub, backbones, tmp_path):
    from safetensors import safe_open

    snapshot, code = hub
    options = dict(source=snapshot, code=code, cache_dir=str(tmp_path / "cache"), **DETECTOR)
    first = build_dimension("character", "released", **options)  # converts from the Hub layout on first use
    (folder,) = (tmp_path / "cache" / "animereward").glob("*/character")
    cache = folder / "gallery.safetensors"
    assert first.gallery_embedded and cache.is_file()
    with safe_open(str(cache), "pt") as f:
        assert len(f.metadata()["key"]) == 64
    stamp = cache.stat().st_mtime_ns
    second = build_dimension("character", "released", **options)
    assert not second.gallery_embedded and cache.stat().st_mtime_ns == stamp
    assert torch.equal(first.gallery, second.gallery)

    # The released math (reference.py): the gallery's crops bicubic, the query crops bilinear, top-1 probability
    model, names = synthetic.retrieval(), [n.lower() for n in crops()]
    gallery = model.embed(released_pixels(list(crops().values()), 32, "cpu"))
    torch.testing.assert_close(second.gallery, gallery, atol=1e-5, rtol=0)
    rng = np.random.default_rng(2)
    clip = np.stack([crops()["Bob"]] * 3 + [rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)] * 3)
    expected = model.score(second.crop_pixels(clip, 8)[None], gallery, names)
    got = second.score(ClipBatch(frames=[clip], prompts=["p"], images=[clip[0]], references=[None]))
    np.testing.assert_allclose(got, [float(expected[0])], atol=1e-5)

    # A changed gallery list (or recognizer) is embedded again
    config = json.loads((folder / "config.json").read_text())
    config["gallery_names"][-1] = "dave"
    (folder / "config.json").write_text(json.dumps(config))
    third = build_dimension("character", "released", checkpoint=str(folder), **DETECTOR, cache_dir=str(tmp_path / "cache"))
    assert third.gallery_embedded and cache.stat().st_mtime_ns != stamp


def test_convert_reward_cli_converts_and_checks_both_layouts(hub, backbones, tmp_path, capsys):
    from anisora_ray.cli import main

    snapshot, code = hub
    check = ["--check", "--device", "cpu", "--detector", "tiny:grounding-dino", "--segmenter", "tiny:sam",
             "--cache-dir", backbones, "--clip-tokenizer", os.path.join(snapshot, "clip-tokenizer")]
    assert main(["convert-reward", "--source", snapshot, "--out", str(tmp_path / "no-code"), "--dimensions", "character"]) == 2
    assert "gallerys.json not found" in capsys.readouterr().err
    assert main(["convert-reward", "--source", snapshot, "--code", code, "--out", str(tmp_path / "hub"), *check]) == 0
    printed = capsys.readouterr().out
    assert f"({os.path.join(snapshot, 'reward')} (hub layout)" in printed.replace("released files: ", "(")
    assert sum("loads and scores a random clip" in line for line in printed.splitlines()) == 6
    assert (tmp_path / "hub" / "character" / "gallery.safetensors").is_file()  # embedded by --check, once

    tree = synthetic.write_released_tree(str(tmp_path / "reward"), crops(), layout="code")
    dims = ["--dimensions", "character,image_video"]
    assert main(["convert-reward", "--source", tree, "--out", str(tmp_path / "code"), *dims, *check]) == 0
    printed = capsys.readouterr().out
    assert "(code layout)" in printed and sum("loads and scores" in line for line in printed.splitlines()) == 2


def test_a_hub_sourced_character_without_code_fails_on_the_driver_naming_the_option(tmp_path):
    """The preset's own shape (source: the Hub id, code: null) is refused before any actor starts."""
    from anisora_ray.config import load_config
    from anisora_ray.errors import ConfigError
    from anisora_ray.reward.base import check_reward_options
    from tests.conftest import REPO

    cfg = load_config(f"{REPO}/configs/cogvideox5b_i2v.yaml", ["reward.dimensions.character.options.code=null"])
    with pytest.raises(ConfigError, match=r"options.code is not set .* gallerys.json"):
        check_reward_options(cfg.reward)
    with pytest.raises(ConfigError, match=r"options.code '/mnt/anisora-ray/Index-anisora' does not exist: clone"):
        check_reward_options(load_config(f"{REPO}/configs/cogvideox5b_i2v.yaml").reward)  # the shared volume's
    clone = tmp_path / "Index-anisora"
    clone.mkdir()
    fixed = load_config(f"{REPO}/configs/cogvideox5b_i2v.yaml", [f"reward.dimensions.character.options.code={clone}"])
    check_reward_options(fixed.reward)
