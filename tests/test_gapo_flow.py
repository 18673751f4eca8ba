"""GAPO by flow matching (the Wan family's objective): noising, velocity target, the first-frame mask, the
scheduler's σ grid, the two-expert routing, and a few updates that lower the loss on a fixed pair."""

import copy

import pytest
import torch

from anisora_ray.gapo.loss import gapo_loss
from anisora_ray.models.objectives import (
    draw_sigmas,
    expert_grid,
    expert_index,
    first_frame_mask,
    flow_errors,
    masked_error,
    noised,
    scheduler_shift,
)


def test_masked_velocity_errors_equal_a_hand_computation_and_ignore_the_given_first_frame():
    g = torch.Generator().manual_seed(0)
    shape = (2, 2, 3, 2, 2)  # [B, C, F, h, w]
    winner, loser, noise = (torch.randn(shape, generator=g) for _ in range(3))
    sigmas = torch.tensor([0.25, 0.8])
    mask = first_frame_mask(shape)

    def predict(x, t):
        return 0.5 * x + t.view(-1, 1, 1, 1, 1) / 1000

    err_w, err_l = flow_errors(predict, winner, loser, noise, sigmas, sigmas * 1000, mask)
    for b in range(2):
        for x0, got in ((winner, err_w), (loser, err_l)):
            total, count = 0.0, 0
            s = float(sigmas[b])
            for c in range(2):
                for f in range(1, 3):  # frame 0 is the conditioned image: not scored
                    for i in range(2):
                        for j in range(2):
                            x = (1 - s) * float(x0[b, c, f, i, j]) + s * float(noise[b, c, f, i, j])
                            v = float(noise[b, c, f, i, j]) - float(x0[b, c, f, i, j])
                            total += (0.5 * x + s - v) ** 2
                            count += 1
            assert float(got[b]) == pytest.approx(total / count, rel=1e-5)

    # whatever the model predicts on the first frame leaves the error unchanged; elsewhere it counts
    target = noise - winner
    prediction = target.clone()
    prediction[:, :, 0] += 100.0
    assert torch.equal(masked_error(prediction, target, mask), torch.zeros(2))
    prediction[:, :, 1] += 1.0
    assert torch.allclose(masked_error(prediction, target, mask), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="no generated position"):
        masked_error(prediction, target, torch.zeros(1, 1, 3, 2, 2))


def test_bf16_latents_are_noised_at_the_sigma_the_model_is_told():
    """x_t in float32, then bf16: σ = 0.972 rounded to bf16 first (0.97266) left 1 − σ = 0.0273 of x₀, not 0.028."""
    x0, noise = torch.ones(1, 4, dtype=torch.bfloat16), torch.zeros(1, 4, dtype=torch.bfloat16)
    x_t = noised(x0, noise, torch.tensor([0.972]))
    assert x_t.dtype == torch.bfloat16
    assert x_t.float().flatten().tolist() == pytest.approx([0.028] * 4, rel=4e-3)  # bf16's own rounding of 0.028 only


def test_sigmas_come_from_the_schedulers_shifted_training_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    assert scheduler_shift(unipc.config) == 5.0  # Wan2.1-I2V-480P's sampler
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert scheduler_shift(euler.config) == 3.0
    sigmas, timesteps = draw_sigmas(4000, torch.Generator().manual_seed(1), shift=3.0)
    grid = euler.sigmas.double()  # the scheduler's own training grid (float32 there)
    assert float((sigmas.double()[:, None] - grid[None]).abs().min(1).values.max()) < 1e-6
    assert torch.allclose(timesteps, sigmas * 1000)
    assert 0.70 < float((sigmas > 0.5).float().mean()) < 0.80  # shift 3 puts 75% of draws above σ = 0.5
    again, _ = draw_sigmas(4000, torch.Generator().manual_seed(1), shift=3.0)
    assert torch.equal(sigmas, again)


def test_each_timestep_goes_to_the_expert_the_pipeline_uses_at_it():
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0)
    scheduler.set_timesteps(40)
    boundary_ratio = 0.875  # Wan2.2-I2V-A14B
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    pipeline_rule = [0 if t >= boundary else 1 for t in scheduler.timesteps.tolist()]  # pipeline_wan_i2v.py
    assert expert_index(scheduler.timesteps.float(), boundary_ratio).tolist() == pipeline_rule
    assert 0 < sum(pipeline_rule) < len(pipeline_rule)  # both experts are used
    assert expert_index(scheduler.timesteps.float(), None).tolist() == [0] * 40  # one transformer
    # a training draw restricted to one expert's share of the grid lands only where the pipeline uses that expert
    grid = expert_grid(12.0, boundary_ratio)
    for expert in (0, 1):
        _, t = draw_sigmas(500, torch.Generator().manual_seed(expert), 12.0, allowed=grid == expert)
        assert set(expert_index(t, boundary_ratio).tolist()) == {expert}


def test_the_draw_every_rank_shares_is_a_stream_apart_from_each_ranks_noise():
    """Wan-A14B's expert is drawn from the shared stream, the noise from the rank's: on rank 0 the two once had one
    seed, so the expert choice was the noise stream's first uniform."""
    from anisora_ray.gapo.engine import shared_seed, step_seed

    for step in range(50):
        shared = shared_seed(3, step)
        assert shared == shared_seed(3, step) and shared != shared_seed(4, step)  # reproducible, seeded by gapo.seed
        for rank in range(8):
            assert shared != step_seed(3, rank, step)
            first = torch.rand((), generator=torch.Generator().manual_seed(step_seed(3, rank, step)))
            assert first != torch.rand((), generator=torch.Generator().manual_seed(shared))
    assert len({shared_seed(3, step) for step in range(1000)}) == 1000


def test_a_few_gapo_updates_lower_the_flow_loss_on_a_fixed_pair():
    torch.manual_seed(0)
    shape = (2, 4, 3, 4, 4)
    g = torch.Generator().manual_seed(2)
    winner, loser = torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    class Velocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(4, 4, 1)

        def forward(self, x, t):
            return self.conv(x) * (1 + t.view(-1, 1, 1, 1, 1) / 1000)

    policy = Velocity()
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    rewards = torch.tensor([0.9, 0.7]), torch.tensor([0.1, 0.4])
    losses = []
    for _ in range(8):
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(shape, generator=g)
        sigmas, timesteps = draw_sigmas(2, g, shift=3.0)
        mask = first_frame_mask(shape)
        model_w, model_l = flow_errors(policy, winner, loser, noise, sigmas, timesteps, mask)
        with torch.no_grad():
            ref_w, ref_l = flow_errors(reference, winner, loser, noise, sigmas, timesteps, mask)
        out = gapo_loss(model_w, model_l, ref_w, ref_l, *rewards, beta=50.0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss))
    assert losses[0] == pytest.approx(float(torch.mean((2 ** rewards[0] - 2 ** rewards[1]) * torch.log(torch.tensor(2.0)))),
                                      rel=1e-5)  # policy == reference: margin 0, dpo = log 2 per pair
    assert losses[-1] < losses[0] * 0.9 and all(b <= a + 1e-6 for a, b in zip(losses, losses[1:], strict=False))
