"""``run.keep``: finished rounds lose what the setting says, never what resume, the report or a rollback needs;
what was pruned is recorded and asked-for files fail naming the setting."""

from __future__ import annotations

import os

import pytest

from tests.conftest import LOCAL_CONFIG


def _write(path, size: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def _job(tmp_path, rewards, flagged=(), in_progress=None):
    """An align folder with every file a round writes, and its state: ``rewards`` per finished round."""
    from anisora_ray.loop.state import AlignState, RoundState

    out = tmp_path / "out" / "align"
    state = AlignState(baseline={"row": {"round": 0, "heldout_reward": 0.5}})
    _write(out / "round-0" / "eval" / "videos" / "p0" / "0.mp4", 100)
    for index in range(1, len(rewards) + 1 + (in_progress is not None)):
        base = out / f"round-{index}"
        _write(base / "pairs" / "videos" / "p0" / "0.mp4", 1000 * index)
        _write(base / "pairs" / "pairs-00000.parquet", 10)
        _write(base / "latent-cache" / "ab" / "ab.safetensors", 200)
        _write(tmp_path / "out" / "ray-train" / f"gapo-round-{index}" / "checkpoint_0" / "ds" / "state.pt", 3000)
        _write(base / "weights" / "diffusion_pytorch_model.safetensors", 500)
        _write(base / "eval" / "videos" / "p0" / "0.mp4", 50)
        _write(base / "eval" / "scores.parquet", 10)
        for kind in ("cached", "exact"):  # the cache audit's two renderings (eval/cache_audit.py)
            _write(base / "eval" / "cache_audit" / kind / "videos" / "p0" / "0.mp4", 20)
        _write(base / "eval" / "cache_audit" / "cache_audit.parquet", 10)
        _write(base / "eval" / "cache_audit" / "side_by_side" / "p0-0-cached-vs-exact.mp4", 30)
        finished = index <= len(rewards)
        state.rounds.append(RoundState(
            index, phase="evaluated" if finished else in_progress, pairs_uri=str(base / "pairs"),
            weights_uri=str(base / "weights") if finished or in_progress != "paired" else "",
            metrics={"round": index, "heldout_reward": rewards[index - 1], "guard_fired": float(index in flagged)}
            if finished else {}))
    return out, state


def test_defaults_keep_the_last_rounds_the_rollback_target_and_the_round_in_progress(make_config, tmp_path):
    from anisora_ray.errors import ConfigError
    from anisora_ray.loop.retention import prune
    from anisora_ray.pairs.writer import pairs_table

    cfg = make_config("loop.registered_model=null")
    assert cfg.run.keep.model_dump() == {"candidate_videos": 1, "checkpoints": 0, "weights": 3, "eval_videos": 3}
    # round 2 is the best held-out reward; round 6 is paired, not trained (e.g. overlap generated it already)
    out, state = _job(tmp_path, [0.55, 0.60, 0.52, 0.53, 0.54], in_progress="paired")
    freed = prune(cfg, state, str(out))

    def gone(index, *parts):
        return not os.path.exists(out.joinpath(f"round-{index}", *parts))

    assert [r.index for r in state.rounds if gone(r.index, "pairs", "videos")] == [1, 2, 3, 4]
    assert [r.index for r in state.rounds if gone(r.index, "latent-cache")] == [1, 2, 3, 4]
    assert [i for i in range(1, 7) if not os.path.exists(tmp_path / "out" / "ray-train" / f"gapo-round-{i}")] == [1, 2, 3, 4, 5]
    assert [r.index for r in state.rounds if gone(r.index, "weights")] == [1]  # 3-5 the last three, 2 the best
    assert [r.index for r in state.rounds if gone(r.index, "eval", "videos")] == [1, 2]
    assert not gone(0, "eval", "videos") and all(not gone(i, "eval", "scores.parquet") for i in range(1, 7))
    for kind in ("cached/videos", "exact/videos", "side_by_side"):  # the audit's videos go with the held-out ones ...
        assert [r.index for r in state.rounds if gone(r.index, "eval", "cache_audit", *kind.split("/"))] == [1, 2]
    assert all(not gone(i, "eval", "cache_audit", "cache_audit.parquet") for i in range(1, 7))  # ... its table stays
    assert all(not gone(i, "pairs", "pairs-00000.parquet") for i in range(1, 7))
    assert freed == {"candidate_videos": (1000 + 2000 + 3000 + 4000) + 4 * 200, "checkpoints": 5 * 3000,
                     "weights": 500, "eval_videos": 2 * (50 + 2 * 20 + 30)}
    first = state.rounds[0].pruned
    assert set(first) == {"candidate_videos", "checkpoints", "weights", "eval_videos"}
    assert first["weights"]["setting"] == "run.keep.weights=3" and first["weights"]["bytes"] == 500
    assert state.rounds[5].pruned == {}

    with pytest.raises(ConfigError, match=r"round-1/pairs.*pruned at .* by run\.keep\.candidate_videos=1"):
        pairs_table(str(out / "round-1" / "pairs"))
    assert prune(cfg, state, str(out)) == {}  # recorded: nothing pruned twice

    # the state keeps the records across a save and load (what resume and `anisora-ray report` read)
    from anisora_ray.loop.html_report import pruned_section
    from anisora_ray.loop.state import AlignState

    state.save(str(out / "state.json"))
    loaded = AlignState.load(str(out / "state.json"))
    assert loaded.rounds[0].pruned == first
    page = pruned_section(loaded)
    assert page.count("<tr>") == 1 + 4 + 5 + 1 + 2 and "run.keep.checkpoints=0" in page


def test_a_flagged_round_is_no_rollback_target_and_the_rolled_back_weights_stay(make_config, tmp_path):
    from anisora_ray.loop.retention import prune

    cfg = make_config("loop.registered_model=null", "run.keep.weights=0", "run.keep.candidate_videos=all",
                      "run.keep.checkpoints=all", "run.keep.eval_videos=0")
    out, state = _job(tmp_path, [0.55, 0.60, 0.52], flagged={2})
    prune(cfg, state, str(out))
    # keep 0: only the replicas' weights (round 3) and the best round the guard passed (round 1, not 2)
    assert [r.index for r in state.rounds if not os.path.exists(out / f"round-{r.index}" / "weights")] == [2]
    assert [r.index for r in state.rounds if not os.path.exists(out / f"round-{r.index}" / "eval" / "videos")] == [1, 2]
    assert all(os.path.exists(out / f"round-{i}" / "pairs" / "videos") for i in (1, 2, 3))

    out2, rolled = _job(tmp_path / "rolled", [0.55, 0.60, 0.52])
    rolled.guard = {"action": "rollback", "best_round": 1}  # the replicas went back to round 1's weights
    prune(cfg, rolled, str(out2))
    assert [r.index for r in rolled.rounds if not os.path.exists(out2 / f"round-{r.index}" / "weights")] == [3]


def test_pruned_weights_are_tagged_in_the_registry_and_eval_says_why_it_cannot_regenerate(make_config, tmp_path,
                                                                                         monkeypatch):
    import mlflow

    from anisora_ray.errors import ConfigError
    from anisora_ray.eval.versions import resolve_versions, version_rows
    from anisora_ray.loop.report import register_weights
    from anisora_ray.loop.retention import prune

    cfg = make_config("loop.registered_model=anisora-keep", "run.keep.weights=1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri exports it: restored after the test, so
    mlflow.set_tracking_uri(uri)  # later tests' subprocesses do not log into this store
    out, state = _job(tmp_path, [0.52, 0.51, 0.53])
    experiment = mlflow.create_experiment("keep", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        for rs in state.rounds:
            rs.metrics["model_version"] = float(register_weights("anisora-keep", rs.weights_uri, run.info.run_id,
                                                                 rs.index, rs.index))
    prune(cfg, state, str(out))
    state.save(str(out / "state.json"))
    client = mlflow.MlflowClient()
    tags = {v.version: v.tags.get("anisora.pruned") for v in client.search_model_versions("name='anisora-keep'")}
    assert {str(k): v for k, v in tags.items()} == {"1": "run.keep.weights=1", "2": "run.keep.weights=1", "3": None}

    versions = resolve_versions(["1", "3"], str(out))
    assert versions[0].pruned and "weights" in versions[0].pruned and not versions[1].pruned.get("weights")
    with pytest.raises(ConfigError, match=r"round-1: its weights were pruned at .* by run\.keep\.weights=1"):
        version_rows(cfg, versions[0], [], str(tmp_path / "eval"), None, regenerate=True, progress=False)


def test_keep_accepts_all_or_a_count_and_names_a_bad_value():
    from anisora_ray.config import load_config

    cfg = load_config(LOCAL_CONFIG, ["run.keep.weights=all", "run.keep.candidate_videos=0"])
    assert (cfg.run.keep.weights, cfg.run.keep.candidate_videos) == ("all", 0)
    with pytest.raises(ValueError, match=r"run\.keep\.checkpoints"):
        load_config(LOCAL_CONFIG, ["run.keep.checkpoints=-1"])


def test_free_space_stops_before_a_round_that_would_not_fit_naming_the_setting(make_config, tmp_path):
    import shutil

    from anisora_ray.errors import DiskSpaceError
    from anisora_ray.io import fs
    from anisora_ray.loop.retention import check_free_space, prune, record_sizes, round_started, unrecorded_round
    from anisora_ray.loop.state import AlignState, RoundState

    free = shutil.disk_usage(tmp_path).free / 1e9
    cfg = make_config()
    assert cfg.run.free_space.model_dump() == {"min_gb": 1.0, "rounds": 1.5}
    state = AlignState()
    got = check_free_space(cfg, state, 0)  # this disk's free space, read through a folder that does not exist yet
    assert got == pytest.approx(free, abs=1.0) and not os.path.exists(cfg.run.output_dir)
    with pytest.raises(DiskSpaceError, match=r"round 0 needs .*run\.free_space\.min_gb=.*--resume") as err:
        check_free_space(make_config(f"run.free_space.min_gb={free + 1000:.0f}"), state, 0)
    assert repr(cfg.run.output_dir) in str(err.value)
    assert check_free_space(make_config("run.free_space.min_gb=0", "run.free_space.rounds=0"), state, 0) is None
    assert check_free_space(make_config("run.output_dir=memory://job", f"run.free_space.min_gb={free + 1000:.0f}"),
                            state, 0) is None  # an object store does not fill

    # a finished round's footprint, measured on the real folder: what it added before run.keep pruned it
    pairs = os.path.join(cfg.run.output_dir, "align", "round-1", "pairs")
    rs = RoundState(1, pairs_uri=pairs)
    round_started(cfg, rs)
    _write(os.path.join(pairs, "videos", "p0", "0.mp4"), 300_000)
    assert record_sizes(cfg, rs, {}) == [] and "written_mb" not in rs.metrics  # not evaluated yet
    rs.phase = "evaluated"
    state.rounds.append(rs)
    freed = prune(make_config("run.keep.candidate_videos=0"), state, os.path.join(cfg.run.output_dir, "align"))
    assert freed["candidate_videos"] == 300_000 and not os.path.exists(os.path.join(pairs, "videos"))
    assert record_sizes(cfg, rs, freed) == ["pruned_mb", "output_dir_mb", "written_mb"]
    assert rs.metrics["written_mb"] == pytest.approx(0.3, abs=0.01) and rs.metrics["output_dir_mb"] < 0.01
    remote = RoundState(1, phase="evaluated")  # an object store is not listed whole every round, only what was freed
    assert record_sizes(make_config("run.output_dir=memory://job"), remote, {"weights": 2_000_000}) == ["pruned_mb"]
    assert remote.metrics == {"pruned_mb": 2.0}
    # recorded: a later round's pruning is not booked to this one (every round's was, to round 1, forever)
    assert unrecorded_round(AlignState(rounds=[remote])) is None
    assert check_free_space(cfg, state, 2) == pytest.approx(free, abs=1.0)  # 1.5 x 0.3 MB fits
    state.rounds.append(RoundState(2, phase="evaluated", metrics={"written_mb": free * 1e3}))  # a round as big as the disk
    with pytest.raises(DiskSpaceError, match=r"round 3 needs .*run\.free_space\.rounds=1\.5 x .* GB, the most a round"):
        check_free_space(cfg, state, 3)
    # round 3 resumed after it wrote part of what it needs (its weights, its checkpoints): that part is not asked for
    # again (before, the space the round itself had used up made its resume fail)
    now = shutil.disk_usage(tmp_path).free / 1e9
    near = make_config(f"run.free_space.min_gb={now - 0.025:.6f}", "run.free_space.rounds=0")  # fits, by 25 MB
    state.rounds = [r for r in state.rounds if r.index != 2]
    state.rounds.append(RoundState(3, phase="trained", metrics={"output_dir_start_mb": fs.size(cfg.run.output_dir) / 1e6}))
    assert check_free_space(near, state, 3) is not None
    _write(os.path.join(cfg.run.output_dir, "align", "round-3", "weights", "w.safetensors"), 50_000_000)
    assert check_free_space(near, state, 3) is not None  # 50 MB less free, 50 MB of it written
    state.rounds[-1].metrics.clear()
    with pytest.raises(DiskSpaceError):  # a round with no note of its start is asked for all of it
        check_free_space(near, state, 3)


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_write_that_fails_leaves_no_partial_file(tmp_path, scheme):
    """A full disk, for real: the process's file-size limit makes the write fail part-way (EFBIG, as ENOSPC would).
    A ``file://`` folder is local too (it was written in place, as a remote one is)."""
    import subprocess
    import sys

    target = tmp_path / "state.json"
    target.write_bytes(b"previous")
    code = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from anisora_ray.io import fs
try:
    fs.write_bytes({scheme + str(target)!r}, b"x" * 100_000)
except OSError as exc:
    print("failed:", exc.errno)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.stdout.startswith("failed: 27"), done.stdout + done.stderr  # EFBIG
    assert os.listdir(tmp_path) == ["state.json"] and target.read_bytes() == b"previous"


def test_align_on_a_disk_too_small_stops_before_ray_starts(make_config, monkeypatch):
    from anisora_ray.errors import DiskSpaceError
    from anisora_ray.loop import align

    started = []
    monkeypatch.setattr(align, "init_ray", lambda *a, **k: started.append(1))  # records a start; never reached
    with pytest.raises(DiskSpaceError, match=r"round 0 needs 1000000000\.00 GB \(run\.free_space\.min_gb=1e\+09\)"):
        align.run_alignment(make_config("run.free_space.min_gb=1e9"), progress=False)
    assert started == []


def test_the_free_space_check_asks_for_the_round_a_resumed_job_runs_first_and_none_for_a_finished_job():
    from anisora_ray.loop.align import _next_round
    from anisora_ray.loop.state import AlignState, RoundState

    state = AlignState()
    assert _next_round(state, 3) == 0  # round 0: the untrained generator's held-out evaluation
    state.baseline = {"row": {"round": 0}}
    assert _next_round(state, 3) == 1
    state.rounds = [RoundState(1, phase="evaluated"), RoundState(2, phase="trained")]
    assert _next_round(state, 3) == 2
    state.rounds[1].phase = "evaluated"
    assert _next_round(state, 3) == 3 and _next_round(state, 2) is None  # a finished job only reports
    state.guard = {"action": "stop"}
    assert _next_round(state, 3) is None  # the guard stopped the loop: no round runs


def test_a_resumed_job_attributes_what_it_prunes_to_the_round_whose_end_it_follows(make_config, tmp_path):
    """The driver was lost after round 2's evaluation, before its pruning: the resume prunes while it passes round 1,
    and what it frees (and round 2's growth) goes to round 2, not to round 1."""
    from anisora_ray.io import fs
    from anisora_ray.loop.align import _apply_retention
    from anisora_ray.tracking import mlflow_run

    cfg = make_config(f"run.output_dir={tmp_path / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                      "loop.registered_model=null", "run.keep.candidate_videos=0", "run.keep.checkpoints=0",
                      "run.keep.weights=all", "run.keep.eval_videos=all")
    out, state = _job(tmp_path, [0.55, 0.60])
    one, two = state.rounds
    one.metrics.update(output_dir_start_mb=0.0, output_dir_mb=0.001, written_mb=0.009, pruned_mb=0.004)
    recorded = dict(one.metrics)
    # round 1's own files went at its end: what is left of them is round 2's to prune
    for path in (out / "round-1" / "pairs" / "videos", out / "round-1" / "latent-cache",
                 tmp_path / "out" / "ray-train" / "gapo-round-1"):
        fs.remove(str(path))
    one.pruned = {"candidate_videos": {"bytes": 1200}, "checkpoints": {"bytes": 3000}}
    round_two = 2000 + 10 + 200 + 3000 + 500 + 50 + 10 + 2 * 20 + 10 + 30  # every file _job wrote for round 2
    two.metrics["output_dir_start_mb"] = (fs.size(str(tmp_path / "out")) - round_two) / 1e6
    with mlflow_run(cfg, "retention"):
        _apply_retention(cfg, state, str(out), str(out / "state.json"), 1)  # the resume, passing round 1
        assert one.metrics == recorded
        assert two.metrics["pruned_mb"] == pytest.approx((2000 + 200 + 3000) / 1e6)
        written = two.metrics["written_mb"]
        _apply_retention(cfg, state, str(out), str(out / "state.json"), 2)  # ... then round 2: nothing more to record
    assert one.metrics == recorded and two.metrics["written_mb"] == written
    assert round_two <= written * 1e6 < round_two + 1000  # all it wrote (and the pruning's record of round 1's videos)


@pytest.mark.parametrize("base", ["memory://keep-test", "local"])
def test_remove_deletes_the_folder_named_and_no_other_when_its_name_has_glob_characters(base, tmp_path):
    """Object stores (and memory://) expand ``[ ] * ?`` in ``rm``: ``run[1]`` matched ``run1`` and deleted it, leaving
    itself. ``remove`` (run.keep's pruning) and the write probe delete what they name, on every filesystem."""
    from anisora_ray.io import fs

    root = str(tmp_path) if base == "local" else base
    for name in ("run[1]", "run1", "run*"):
        fs.write_bytes(fs.join(root, name, "weights", "w.bin"), b"x" * 10)
    assert fs.remove(fs.join(root, "run[1]", "weights")) == 10
    assert not fs.exists(fs.join(root, "run[1]", "weights"))
    assert fs.exists(fs.join(root, "run1", "weights", "w.bin")) and fs.exists(fs.join(root, "run*", "weights", "w.bin"))
    assert fs.remove(fs.join(root, "run*")) == 10 and fs.exists(fs.join(root, "run1", "weights", "w.bin"))
    fs.check_writable(fs.join(root, "run1"))  # its probe file goes, nothing else
    assert fs.exists(fs.join(root, "run1", "weights", "w.bin"))
