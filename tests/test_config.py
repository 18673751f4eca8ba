import pytest

from anisora_ray.config import AnisoraConfig, load_config, parse_override
from anisora_ray.errors import ConfigError
from tests.conftest import LOCAL_CONFIG, REPO


def test_shipped_configs_load():
    local = load_config(LOCAL_CONFIG)
    real = load_config(f"{REPO}/configs/cogvideox5b_i2v.yaml")
    assert local.model.pretrained == "tiny" and local.ray.address is None
    assert real.model.pretrained == "THUDM/CogVideoX-5b-I2V"
    assert (real.generator.num_frames, real.generator.width, real.generator.height) == (49, 720, 480)
    assert real.model.dtype == "bfloat16" and real.generator.actor.num_gpus == 1


def test_every_shipped_config_asks_only_for_step_caches_its_family_supports():
    """FasterCache (the CogVideoX config's) approximates CFG's unconditional half inside one batched call: a config
    that includes the CogVideoX one for another family (Wan calls the transformer twice per step) must turn it off."""
    import glob
    import os

    from anisora_ray.models.families import get_family

    checked = {}
    for path in sorted(glob.glob(f"{REPO}/configs/*.yaml")):
        cfg = load_config(path)
        checked[os.path.basename(path)] = cfg.generator.cache.kind
        if cfg.generator.cache.kind == "faster_cache":
            assert get_family(cfg.model.family).batched_cfg_layout is not None, path
    assert checked["cogvideox5b_i2v.yaml"] == "faster_cache" and checked["wan22_ti2v5b.yaml"] == "none"


def test_overrides_apply_with_yaml_typed_values():
    cfg = load_config(LOCAL_CONFIG, ["generator.replicas=3", "generator.actor.num_gpus=0.5", "ray.address=auto",
                                     "generator.actor.resources={accel: 1}", "tracking.tracking_uri=null"])
    assert cfg.generator.replicas == 3
    assert cfg.generator.actor.num_gpus == 0.5
    assert cfg.ray.address == "auto"
    assert cfg.generator.actor.resources == {"accel": 1.0}
    assert cfg.tracking.tracking_uri is None


def test_yaml_quirks_do_not_change_a_value_silently(tmp_path):
    """PyYAML's YAML 1.1: on/off/yes/no are booleans (a number field would take them as 1/0), ``1e-5`` is a string
    (DeepSpeed's JSON would get a str), and `` #`` starts a comment (``run.name=exp #2`` lost its number)."""
    for override in ("run.keep.weights=off", "generator.replicas=yes", "generator.guidance_scale=no"):
        with pytest.raises(ConfigError, match=f"{override.split('=')[0]} = (True|False): expected a number, got the "
                                              "boolean"):
            load_config(LOCAL_CONFIG, [override])
    cfg = load_config(LOCAL_CONFIG, ["gapo.deepspeed_overrides.optimizer.params.lr=1e-5", "run.name=exp #2",
                                     "generator.compile=yes"])
    assert cfg.gapo.deepspeed_overrides == {"optimizer": {"params": {"lr": 1e-5}}}
    assert cfg.run.name == "exp #2" and cfg.generator.compile is True  # a boolean field still reads yes as true
    path = tmp_path / "c.yaml"
    path.write_text("gapo:\n  deepspeed_overrides: {optimizer: {params: {lr: 3e-6}}}\n")
    assert load_config(str(path)).gapo.deepspeed_overrides["optimizer"]["params"]["lr"] == 3e-6
    # integers as YAML 1.2 reads them: a leading zero is decimal (1.1: octal, run.seed=010 became 8), and base 60
    # (1.1: 1:30 was 90) is no number at all
    cfg = load_config(LOCAL_CONFIG, ["run.seed=010", "generator.replicas=0x2", "run.name=1:30"])
    assert (cfg.run.seed, cfg.generator.replicas, cfg.run.name) == (10, 2, "1:30")
    path.write_text("run:\n  seed: 0017\n")
    assert load_config(str(path)).run.seed == 17
    with pytest.raises(ConfigError) as err:  # a union field's members: one line, named by the key
        load_config(LOCAL_CONFIG, ["run.keep.weights=x"])
    assert "run.keep.weights = 'x': Input should be a valid integer" in str(err.value)
    assert "or Input should be 'all'" in str(err.value) and "constrained-int" not in str(err.value)


def test_bad_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(LOCAL_CONFIG, ["generator.replicaz=2"])
    msg = str(err.value)
    assert "generator.replicaz" in msg and "unknown key" in msg and "'generator.replicas'" in msg


def test_bad_type_names_key_value_and_expectation():
    with pytest.raises(ConfigError) as err:
        load_config(LOCAL_CONFIG, ["generator.replicas=two"])
    msg = str(err.value)
    assert "generator.replicas = 'two'" in msg and "valid integer" in msg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("generator.height=50", "generator.height = 50: must be a multiple of 16"),
        ("generator.num_frames=10", "generator.num_frames = 10: must be 4k+1"),
        ("generator.replicas=0", "generator.replicas = 0: Input should be greater than or equal to 1"),
        ("model.dtype=int8", "model.dtype = 'int8'"),
        ("video.sample_frames=500", "video.sample_max_frames (144) must be >= video.sample_frames (500)"),
        ("generator.flow_shift=5", "generator.flow_shift applies to flow-matching families (wan_i2v); "
                                   "model.family='cogvideox_i2v'"),
        ("gapo.timesteps=sampler", "gapo.timesteps = 'sampler'"),
        ("gapo.lora.dropout=0.1", "gapo.lora.dropout = 0.1: GAPO runs the policy in eval mode"),
        ("generator.guidance_scale=1;generator.cache.kind=faster_cache",
         "generator.cache.kind='faster_cache' approximates CFG's unconditional branch, and guidance_scale=1.0"),
        # a typo once quarantined every rendered video, and the skipped prompts counted as done
        ("video.codec=libx246", "video.codec = 'libx246': no such encoder in this PyAV/FFmpeg"),
        ("video.codec=aac", "video.codec = 'aac': an audio encoder, not a video one"),
        ("gapo.alpha=1", "gapo.alpha = 1"),
    ],
)
def test_bad_values_name_key_and_value(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(LOCAL_CONFIG, override.split(";"))
    assert expected in str(err.value)


def test_several_errors_reported_together_and_file_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("generator:\n  replicas: -1\n  fps: fast\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    for part in ("generator.replicas = -1", "generator.fps = 'fast'", "bogus = 1: unknown key"):
        assert part in msg


@pytest.mark.parametrize("text", ["generator.replicas", "=3", "a..b=1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override(text)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="generator.replicas is a value"):
        load_config(LOCAL_CONFIG, ["generator.replicas.count=2"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_flat_lists_every_leaf():
    flat = AnisoraConfig().flat()
    assert flat["generator.replicas"] == 1
    assert flat["model.tiny.num_layers"] == 1
    assert "generator.actor" not in flat and "generator.actor.num_gpus" in flat


def test_a_config_file_includes_others_and_its_own_keys_win(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "a.yaml").write_text("include: b.yaml\ngenerator: {replicas: 3, fps: 12}\n")
    (tmp_path / "presets" / "b.yaml").write_text("generator: {replicas: 5, num_frames: 17}\nrun: {seed: 7}\n")
    (tmp_path / "main.yaml").write_text("include: [presets/a.yaml]\ngenerator: {fps: 6}\n")
    cfg = load_config(tmp_path / "main.yaml", ["run.seed=9"])
    assert (cfg.generator.replicas, cfg.generator.fps, cfg.generator.num_frames, cfg.run.seed) == (3, 6, 17, 9)
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "broken.yaml").write_text("include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml' does not exist \\(included by .*broken.yaml"):
        load_config(tmp_path / "broken.yaml")


def test_the_one_gpu_config_fits_one_gpu_with_everything_resident():
    from anisora_ray.loop.placement import resource_demand

    one = load_config(f"{REPO}/configs/cogvideox5b_i2v_1gpu.yaml")
    demand = resource_demand(one)
    assert one.loop.placement == "separate" and one.ray.address is None and one.gapo.lora.r > 0
    # replica + six scorers + trainer + the held-out metrics actor: fractions summing to one GPU
    assert abs(demand["peak"]["GPU"] - 1.0) < 1e-9 and demand["metrics"]["GPU"] == one.eval.metrics.num_gpus > 0
    assert all(0 < demand[k]["GPU"] < 1 for k in ("generator", "reward", "trainer"))
    assert one.loop.refresh_transport == "cuda_ipc" and one.model.pretrained == "THUDM/CogVideoX-5b-I2V"


def test_the_anisora_v3_configs_keep_their_release_protocol_on_their_base_structure():
    """AniSora V3.1 / V3.2 are step-distilled Wan checkpoints: 8 steps, shift 5, no CFG, the control suffix; rollouts
    and training follow that protocol, everything else is the base structure's config."""
    for name, base_name in (("anisora_v3_1", "wan21_i2v14b"), ("anisora_v3_2", "wan22_i2v_a14b")):
        cfg, base = load_config(f"{REPO}/configs/{name}.yaml"), load_config(f"{REPO}/configs/{base_name}.yaml")
        g = cfg.generator
        assert (g.num_inference_steps, g.guidance_scale, g.flow_shift, cfg.gapo.timesteps) == (8, 1.0, 5.0, "rollout")
        assert g.prompt_suffix.endswith("There is no text in the video.") and "motion score" in g.prompt_suffix
        assert (base.generator.guidance_scale > 1, base.generator.flow_shift, base.gapo.timesteps) == (True, None, "uniform")
        for section in ("model.family", "generator.num_frames", "generator.height", "generator.width",
                        "gapo.deepspeed_config", "gapo.reference", "run.free_space.min_gb"):
            assert cfg.flat()[section] == base.flat()[section], (name, section)


def test_an_infinite_or_nan_number_is_refused_naming_the_key():
    """An infinite dimension weight made every reward NaN and every prompt a skip with an empty reason; an infinite
    α made every GAPO loss NaN."""
    for override in ("reward.dimensions.visual_smoothness.weight=.inf", "reward.dimensions.visual_motion.normalize.low=-.inf",
                     "gapo.alpha=.inf", "gapo.beta=.nan"):
        with pytest.raises(ConfigError, match=f"{override.split('=')[0]} = .*finite number"):
            load_config(LOCAL_CONFIG, [override])


def test_yaml_1_2_has_no_timestamps_nor_base_60_floats_and_empty_sections_and_cycles_are_said(tmp_path):
    cfg = load_config(LOCAL_CONFIG, ["run.name=2024-12-06"])  # YAML 1.1: a date, refused by the text field
    assert cfg.run.name == "2024-12-06"
    with pytest.raises(ConfigError, match=r"ray.wait_for_resources_s = '1:30.0'"):  # 1.1: ninety seconds, silently
        load_config(LOCAL_CONFIG, ["ray.wait_for_resources_s=1:30.0"])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "self.yaml").write_text("include: ../sub/self.yaml\n")  # itself, spelled another way
    with pytest.raises(ConfigError, match="includes itself"):  # was OSError: file name too long
        load_config(tmp_path / "sub" / "self.yaml")
    (tmp_path / "empty.yaml").write_text("loop:\n  # rounds: 3\ntracking:\n")  # every key commented out
    assert load_config(tmp_path / "empty.yaml", ["loop.rounds=5"]).loop.rounds == 5


@pytest.mark.parametrize("overrides, said", [
    (["model.family=wan_i2v", "generator.scheduler=dpm"], "generator.scheduler = dpm applies to cogvideox_i2v"),
    (["model.family=wan_i2v", "generator.cache.kind=faster_cache"], "wan_i2v calls it twice per step"),
    (["loop.guard.enabled=true", "loop.guard.measures=[]"], "the guard could never fire"),
    (["gapo.lora.r=4", "gapo.lora.target_modules=[]"], "gapo.lora.target_modules is empty"),
    (["gapo.use_gpu=true", "gapo.num_workers=2", "gapo.gpus_per_worker=0.5"], "which NCCL refuses"),
])
def test_settings_that_fail_late_or_do_nothing_are_refused_at_load(overrides, said):
    with pytest.raises(ConfigError, match=said):
        load_config(LOCAL_CONFIG, overrides)


def test_align_refuses_a_live_refresh_the_placement_would_drop():
    from anisora_ray.loop.align import check_inputs

    cfg = load_config(LOCAL_CONFIG, ["gapo.refresh_every=2", "loop.placement=shared"])
    with pytest.raises(ConfigError, match="loop.placement = shared stops them while the trainer runs"):
        check_inputs(cfg)
    check_inputs(load_config(LOCAL_CONFIG, ["gapo.refresh_every=2"]))  # separate: the replicas are there


def test_a_later_file_that_changes_a_dimensions_backend_replaces_its_options_and_actor(tmp_path):
    """The real config's header: the zero-shot preset included after it. Merged, every zero-shot dimension kept the
    released scorer's options (refused: unknown option 'source') and its GPU (a CPU scorer reserving one)."""
    from anisora_ray.reward.base import check_reward_options

    (tmp_path / "zs.yaml").write_text(f"include: [{REPO}/configs/cogvideox5b_i2v.yaml, "
                                      f"{REPO}/configs/reward/zero-shot.yaml]\n")
    dims = load_config(tmp_path / "zs.yaml").reward.dimensions.as_dict()
    check_reward_options(load_config(tmp_path / "zs.yaml").reward)
    assert dims["visual_smoothness"].backend == "classical" and dims["visual_smoothness"].options == {}
    assert dims["visual_smoothness"].actor.num_gpus == 0 and "source" not in dims["character"].options
    (tmp_path / "same.yaml").write_text(f"include: {REPO}/configs/cogvideox5b_i2v.yaml\n"
                                        "reward: {dimensions: {character: {backend: released, options: {identity: own}}}}\n")
    kept = load_config(tmp_path / "same.yaml").reward.dimensions.as_dict()["character"]  # same backend: merged
    assert kept.options["identity"] == "own" and kept.options["source"] == "IndexTeam/Index-anisora"
    (tmp_path / "base.yaml").write_text("reward: {dimensions: {visual_smoothness: {actor: {num_cpus: 8}}}}\n")
    (tmp_path / "restated.yaml").write_text("include: base.yaml\nreward: {dimensions: {visual_smoothness: "
                                            "{backend: classical, weight: 2}}}\n")  # the default backend, said again
    assert load_config(tmp_path / "restated.yaml").reward.dimensions.as_dict()["visual_smoothness"].actor.num_cpus == 8


def test_a_text_field_takes_an_override_as_written_where_yaml_would_read_a_number():
    cfg = load_config(LOCAL_CONFIG, ["model.revision=0123456", "run.name=1.10"])  # refused as 123456 and 1.1
    assert (cfg.model.revision, cfg.run.name) == ("0123456", "1.10")
    assert load_config(LOCAL_CONFIG, ["model.revision=8e12345"]).model.revision == "8e12345"  # was inf
    cfg = load_config(LOCAL_CONFIG, ["generator.replicas=3", "data.prompts=null"])  # numbers and null stay themselves
    assert cfg.generator.replicas == 3 and cfg.data.prompts is None
