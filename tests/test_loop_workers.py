"""The controller's worker groups: released and restarted (shared placement, resume) at the latest weights."""

from __future__ import annotations


def test_restarted_replicas_come_back_at_the_latest_weights_version(ray_cluster, make_config, tmp_path):
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from anisora_ray.loop.align import Workers
    from anisora_ray.loop.state import RoundState
    from anisora_ray.models.pipeline import resolve_pretrained

    cfg = make_config("generator.replicas=2", "loop.placement=shared", "pairs.reward_stage=pipeline")
    transformer = CogVideoXTransformer3DModel.from_pretrained(resolve_pretrained(cfg.model, cfg.generator),
                                                              subfolder="transformer")
    transformer.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    with torch.no_grad():  # stands in for round 3's result: other weights than the base's
        for p in transformer.parameters():
            p.add_(0.01)
    transformer.save_pretrained(str(tmp_path / "weights"), safe_serialization=True)
    workers = Workers(cfg)
    try:
        workers.start(None)
        assert workers.replicas.weights_versions() == [0, 0] and workers.rewards is None  # pipeline brings its pools
        workers.start(None, rewards=True)
        assert workers.rewards is not None
        workers.release_rewards()
        assert workers.rewards is None
        workers.stop()  # what shared placement does while the trainer holds the GPUs
        assert workers.replicas is None
        latest = RoundState(index=3, phase="refreshed", weights_uri=str(tmp_path / "weights"), weights_version=3)
        workers.start(latest)
        assert workers.replicas.weights_versions() == [3, 3]
        round3 = {s["checksum"] for s in workers.replicas.weights_states()}
        workers.replicas.refresh_from(str(tmp_path / "base"), 4)  # what the base's weights check as, loaded alike
        base = {s["checksum"] for s in workers.replicas.weights_states()}
        assert len(round3) == 1 and len(base) == 1 and round3 != base  # round 3's weights came back, not the base's
    finally:
        workers.stop()
