import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anisora_ray.data.demo import make_demo_set
from anisora_ray.data.manifest import build_manifest, read_manifest, write_manifest
from anisora_ray.errors import ConfigError, ImageLoadError, ManifestError
from anisora_ray.io import fs
from anisora_ray.io.images import load_image
from anisora_ray.types import PromptItem

ITEMS = [
    PromptItem("a", "a cat waves", "memory://imgs/a.png", character_id="cat-1"),
    PromptItem("b", "a dog runs", "memory://imgs/b.png"),
]


def test_manifest_round_trip_through_memory_fs():
    write_manifest(ITEMS, "memory://manifests/m.parquet")
    assert read_manifest("memory://manifests/m.parquet") == ITEMS


def test_relative_image_paths_resolve_against_the_manifest():
    table = pa.table({"prompt_id": ["x"], "prompt": ["p"], "image_uri": ["imgs/x.png"]})
    fs.write_table(table, "memory://rel/m.parquet")
    assert read_manifest("memory://rel/m.parquet")[0].image_uri == "memory://rel/imgs/x.png"


def test_one_image_has_one_name_so_the_held_out_check_sees_it_in_both_manifests(tmp_path, make_config):
    """``../images/a.png`` from two folders named the same file two ways: a training image passed as held-out."""
    from anisora_ray.eval.heldout import heldout_items

    for name in ("train", "eval"):
        (tmp_path / name).mkdir()
        table = pa.table({"prompt_id": [f"{name}-0"], "prompt": ["p"], "image_uri": ["../images/./a.png"]})
        fs.write_table(table, str(tmp_path / name / "prompts.parquet"))
    train = read_manifest(str(tmp_path / "train" / "prompts.parquet"))
    assert train[0].image_uri == str(tmp_path / "images" / "a.png")
    assert read_manifest(str(tmp_path / "eval" / "prompts.parquet"))[0].image_uri == train[0].image_uri
    with pytest.raises(ConfigError, match="held-out must be unseen"):
        heldout_items(make_config(f"eval.prompts={tmp_path / 'eval' / 'prompts.parquet'}"),
                      str(tmp_path / "train" / "prompts.parquet"))
    fs.write_table(pa.table({"prompt_id": ["u"], "prompt": ["p"], "image_uri": ["s3://b/x/../y/./i.png"]}),
                   "memory://urls/m.parquet")
    assert read_manifest("memory://urls/m.parquet")[0].image_uri == "s3://b/y/i.png"


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"prompt_id": ["x"], "prompt": ["p"]}, r"lacks column\(s\) \['image_uri'\]"),
        ({"prompt_id": ["x", "x"], "prompt": ["p", "q"], "image_uri": ["i", "j"]}, "row 1: duplicate prompt_id 'x'"),
        ({"prompt_id": ["x"], "prompt": [""], "image_uri": ["i"]}, "row 0: empty prompt"),
    ],
)
def test_bad_manifests_name_the_problem(columns, message):
    fs.write_table(pa.table(columns), "memory://bad/m.parquet")
    with pytest.raises(ManifestError, match=message):
        read_manifest("memory://bad/m.parquet")


def test_a_manifest_written_by_pandas_keeps_integer_ids_as_the_gallery_names_them():
    """pandas stores an integer column with a missing value as floats (and the missing value as NaN): character 3
    is "3", not "3.0", so it still selects its gallery entry; NaN is no character."""
    table = pa.table({"prompt_id": [1.0, 2.0, 3.5], "prompt": ["p", "q", "r"], "image_uri": ["i", "j", "k"],
                      "character_id": [3.0, float("nan"), 12.0]})
    fs.write_table(table, "memory://pandas/m.parquet")
    items = read_manifest("memory://pandas/m.parquet")
    assert [(i.prompt_id, i.character_id) for i in items] == [("1", "3"), ("2", None), ("3.5", "12")]


def test_missing_and_non_parquet_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(tmp_path / "none.parquet"))
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(ManifestError, match="not a readable parquet"):
        read_manifest(str(tmp_path / "text.parquet"))


def test_demo_set_is_deterministic_and_loadable(tmp_path):
    a = read_manifest(make_demo_set(str(tmp_path / "a"), num_prompts=5, image_size=64, seed=3))
    b = read_manifest(make_demo_set(str(tmp_path / "b"), num_prompts=5, image_size=64, seed=3))
    assert [(i.prompt, i.character_id) for i in a] == [(i.prompt, i.character_id) for i in b]
    assert len({i.prompt_id for i in a}) == 5 and all(i.character_id for i in a)
    assert load_image(a[0].image_uri).size == (64, 64)
    assert fs.read_bytes(a[2].image_uri) == fs.read_bytes(b[2].image_uri)


def test_a_demo_set_is_reused_only_by_a_config_asking_for_the_same_draw(make_config):
    """``eval.demo_prompts=32`` (or another ``run.seed``) on a folder holding an 8-prompt draw was ignored: the old
    prompts were evaluated without a word. Now the draw is recorded and another one is refused, naming the settings."""
    from anisora_ray.errors import ConfigError
    from anisora_ray.eval.heldout import heldout_items
    from anisora_ray.generation.stage import resolve_prompts

    cfg = make_config("data.demo_prompts=3", "eval.demo_prompts=2")
    train = resolve_prompts(cfg)
    assert [i.prompt_id for i in heldout_items(cfg, train)] == ["heldout-0000", "heldout-0001"]
    assert resolve_prompts(make_config("data.demo_prompts=3", "eval.demo_prompts=2")) == train  # the same draw: reused
    with pytest.raises(ConfigError, match=r"drawn with .*'num_prompts': 2.*asks for .*'num_prompts': 4.*eval\.demo_prompts"):
        heldout_items(make_config("data.demo_prompts=3", "eval.demo_prompts=4"), train)
    with pytest.raises(ConfigError, match=r"'seed': 0.*'seed': 7.*data\.demo_prompts, data\.demo_image_size, run\.seed"):
        resolve_prompts(make_config("data.demo_prompts=3", "run.seed=7"))


def test_images_a_prompts_file_leaves_out_are_said(tmp_path, caplog):
    """A .csv/.jsonl may name a subset of the folder on purpose; one left out by mistake is said, named."""
    demo = read_manifest(make_demo_set(str(tmp_path / "d"), num_prompts=3, image_size=32))
    (tmp_path / "images").mkdir()
    for name, item in zip(["one.png", "two.png", "three.png"], demo):
        (tmp_path / "images" / name).write_bytes(fs.read_bytes(item.image_uri))
    (tmp_path / "p.jsonl").write_text(json.dumps({"image": "two.png", "prompt": "second"}))
    with caplog.at_level("WARNING", logger="anisora_ray.data.manifest"):
        items = build_manifest(str(tmp_path / "images"), str(tmp_path / "p.jsonl"), str(tmp_path / "m.parquet"))
    assert [i.prompt_id for i in items] == ["two"]
    assert "2 image(s) in" in caplog.text and "are left out of the manifest: one.png, three.png" in caplog.text


def test_build_manifest_from_folder(tmp_path):
    images = tmp_path / "images"
    demo = read_manifest(make_demo_set(str(tmp_path / "d"), num_prompts=2, image_size=32))
    images.mkdir()
    for name, item in zip(["one.png", "two.png"], demo):
        (images / name).write_bytes(fs.read_bytes(item.image_uri))
    rows = [{"image": "two.png", "prompt": "second", "character_id": "c2"}, {"image": "one.png", "prompt": "first"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = build_manifest(str(images), str(tmp_path / "p.jsonl"), str(tmp_path / "m.parquet"))
    assert [(i.prompt_id, i.prompt, i.character_id) for i in items] == [("two", "second", "c2"), ("one", "first", None)]
    assert read_manifest(str(tmp_path / "m.parquet")) == items
    (tmp_path / "p.txt").write_text("first line\nsecond line\n")  # plain text pairs with sorted images
    items = build_manifest(str(images), str(tmp_path / "p.txt"), str(tmp_path / "m2.parquet"))
    assert [(i.prompt_id, i.prompt) for i in items] == [("one", "first line"), ("two", "second line")]
    # numeric ids in a .jsonl are ids as text: character 0 stays linked to its gallery entry, prompt 0 is "0"
    rows = [{"image": "one.png", "prompt": "first", "prompt_id": 0, "character_id": 0},
            {"image": "two.png", "prompt": "second", "prompt_id": 7, "character_id": 12}]
    (tmp_path / "n.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = build_manifest(str(images), str(tmp_path / "n.jsonl"), str(tmp_path / "m3.parquet"))
    assert [(i.prompt_id, i.character_id) for i in items] == [("0", "0"), ("7", "12")]
    assert read_manifest(str(tmp_path / "m3.parquet")) == items


def test_build_manifest_names_missing_image(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "p.csv").write_text("image,prompt\nghost.png,boo\n")
    with pytest.raises(ManifestError, match="image 'ghost.png' is not in"):
        build_manifest(str(tmp_path / "images"), str(tmp_path / "p.csv"), str(tmp_path / "m.parquet"))


def test_missing_or_broken_image_is_named(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png"):
        load_image(str(tmp_path / "nope.png"))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ImageLoadError, match="bad.png.*not a readable image"):
        load_image(str(tmp_path / "bad.png"))
    # a valid 1x1 PNG whose header claims 20000x10000 pixels: PIL's DecompressionBombError, a content error too
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", 20000, 10000) + bytes(png[24:29])  # width, height, then depth .. interlace as saved
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (tmp_path / "bomb.png").write_bytes(bytes(png))
    with pytest.raises(ImageLoadError, match="bomb.png.*DecompressionBombError"):
        load_image(str(tmp_path / "bomb.png"))
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:40])  # truncated inside its pixel data
    with pytest.raises(ImageLoadError, match="cut.png.*not a readable image"):
        load_image(str(tmp_path / "cut.png"))


def test_a_folder_or_an_unknown_protocol_is_the_items_fault_named(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageLoadError, match=r"dir.png.*IsADirectoryError"):  # was IsADirectoryError: infrastructure
        load_image(str(tmp_path / "dir.png"))
    with pytest.raises(ImageLoadError, match=r"nope://a.png.*Protocol not known"):
        load_image("nope://a.png")


def test_every_image_mode_reaches_the_models_as_its_picture_in_8_bit_rgb(tmp_path):
    from PIL import Image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")  # opens as I;16: convert("RGB") clipped 99.6% of it to white
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    grey = np.asarray(load_image(str(tmp_path / "g16.png")))
    assert grey.shape == (64, 64, 3) and grey.dtype == np.uint8
    assert np.abs(grey[..., 0].astype(int) - np.round(ramp / 257)).max() <= 1 and (grey == 255).mean() < 0.01
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red hidden under fully transparent pixels, but for one opaque green pixel
    rgba[2, 3] = (0, 255, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "cutout.png")
    flat = np.asarray(load_image(str(tmp_path / "cutout.png")))
    assert (flat[0, 0] == 255).all() and tuple(flat[2, 3]) == (0, 255, 0)  # flattened onto white, not the hidden red
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert tuple(np.asarray(load_image(str(tmp_path / "opaque.png")))[0, 0]) == (255, 0, 0)
    keyed = Image.fromarray(np.full((4, 4, 3), (10, 20, 30), np.uint8))  # an RGB PNG with a colour key (tRNS)
    keyed.save(tmp_path / "keyed.png", transparency=(10, 20, 30))
    assert tuple(np.asarray(load_image(str(tmp_path / "keyed.png")))[0, 0]) == (255, 255, 255)
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "float.tiff")  # convert("RGB"): all black
    with pytest.raises(ImageLoadError, match=r"float.tiff.*floating-point image \(mode F\)"):
        load_image(str(tmp_path / "float.tiff"))


def test_ids_that_would_name_a_path_outside_the_output_are_refused(tmp_path):
    from anisora_ray.data.clips import build_manifest_from_videos
    from anisora_ray.io.video import write_video

    for bad in ("../../escaped", "/tmp/abs", "a\\b", "..", "tab\there"):
        with pytest.raises(ValueError, match="prompt_id"):  # every PromptItem, whatever made it
            PromptItem(bad, "p", "a.png")
    pq.write_table(pa.table({"prompt_id": ["ok", "../../escaped"], "prompt": ["a", "b"],
                                     "image_uri": ["a.png", "b.png"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"m.parquet' row 1: prompt_id '../../escaped' contains a path separator"):
        read_manifest(str(tmp_path / "m.parquet"))
    (tmp_path / "clips").mkdir()
    write_video(np.zeros((2, 16, 16, 3), np.uint8), str(tmp_path / "clips" / "a.mp4"), fps=8)
    (tmp_path / "c.csv").write_text("video,caption,prompt_id\na.mp4,hello,../../ESCAPED\n")
    with pytest.raises(ManifestError, match=r"c.csv' entry 0: prompt_id '../../ESCAPED'"):
        build_manifest_from_videos(str(tmp_path / "clips"), str(tmp_path / "c.csv"), str(tmp_path / "out" / "m.parquet"))
    assert not list(tmp_path.rglob("ESCAPED*"))  # refused before its first frame was written (it was, outside)


def test_a_column_of_the_wrong_type_is_named_not_turned_into_its_repr(tmp_path):
    def manifest(**columns):
        table = {"prompt_id": ["a"], "prompt": ["x"], "image_uri": ["a.png"], **columns}
        pq.write_table(pa.table(table), tmp_path / "m.parquet")
        return read_manifest(str(tmp_path / "m.parquet"))

    with pytest.raises(ManifestError, match=r"column 'prompt' holds list<element: string>, expected text"):
        manifest(prompt=[["a cat", "jumps"]])  # was the prompt "['a cat', 'jumps']"
    with pytest.raises(ManifestError, match=r"column 'image_uri' holds binary"):
        manifest(image_uri=[b"a.png"])
    with pytest.raises(ManifestError, match=r"column 'prompt_id' holds bool, expected text or integers"):
        manifest(prompt_id=[True])
    assert manifest(prompt_id=[7], character_id=[3])[0].prompt_id == "7"  # integer ids stay accepted
    assert manifest(prompt_id=pa.array(["c"]).dictionary_encode())[0].prompt_id == "c"  # pandas' categorical
    if hasattr(pa, "string_view"):  # Arrow's newer text layout
        assert manifest(prompt_id=pa.array(["v"], type=pa.string_view()))[0].prompt_id == "v"


def test_prompts_files_with_a_byte_order_mark_or_a_non_object_line(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "p.csv").write_bytes("\ufeffimage,prompt\na.png,hello\n".encode())  # Excel's "CSV UTF-8"
    items = build_manifest(str(tmp_path / "images"), str(tmp_path / "p.csv"), str(tmp_path / "m.parquet"))
    assert [(i.prompt_id, i.prompt) for i in items] == [("a", "hello")]
    (tmp_path / "p.jsonl").write_text('{"image": "a.png", "prompt": "ok"}\n"just a string"\n')
    with pytest.raises(ManifestError, match=r"p.jsonl' line 2: expected a JSON object, got str"):
        build_manifest(str(tmp_path / "images"), str(tmp_path / "p.jsonl"), str(tmp_path / "m.parquet"))
    (tmp_path / "p.jsonl").write_text('{"image": "a.png", "prompt": ["a cat", "jumps"]}\n')
    with pytest.raises(ManifestError, match=r"entry 0: 'prompt' must be text"):
        build_manifest(str(tmp_path / "images"), str(tmp_path / "p.jsonl"), str(tmp_path / "m.parquet"))
