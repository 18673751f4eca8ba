"""gapo_loss against hand-computed values, its DPO special case, per-pair weighting, gradient direction."""

from __future__ import annotations

import math

import pytest
import torch

from anisora_ray.gapo import gapo_loss, prediction_error

T = torch.tensor


def case():
    return dict(model_err_w=T([0.10, 0.20]), model_err_l=T([0.12, 0.18]), ref_err_w=T([0.11, 0.20]),
                ref_err_l=T([0.11, 0.20]), reward_w=T([1.0, 0.5]), reward_l=T([0.0, 0.5]))


def test_hand_computed_values():
    out = gapo_loss(**case(), beta=100.0, alpha=2.0)
    # pair 0: logit = -50 * (-0.02 - 0) = 1, dpo = log(1 + e^-1), gain = 2^1 - 2^0 = 1
    # pair 1: logit = -50 * (0.02 - 0) = -1, dpo = log(1 + e^1),  gain = 2^0.5 - 2^0.5 = 0
    torch.testing.assert_close(out.margin, T([1.0, -1.0]))
    torch.testing.assert_close(out.dpo, T([math.log1p(math.exp(-1)), math.log1p(math.exp(1))]))
    torch.testing.assert_close(out.gain, T([1.0, 0.0]))
    assert float(out.loss) == pytest.approx(math.log1p(math.exp(-1)) / 2, rel=1e-6)
    assert out.metrics()["implicit_accuracy"] == 0.5


def test_gain_of_one_is_exactly_diffusion_dpo():
    args = case()
    dpo = gapo_loss(**args, beta=100.0, use_gain=False)
    plain = -torch.nn.functional.logsigmoid(-0.5 * 100.0 * ((args["model_err_w"] - args["ref_err_w"])
                                                           - (args["model_err_l"] - args["ref_err_l"]))).mean()
    torch.testing.assert_close(dpo.loss, plain)
    torch.testing.assert_close(dpo.gain, torch.ones(2))
    # alpha = 1 would make every gain 0 (1**r_w - 1**r_l) and alpha < 1 negative (the loser preferred): refused,
    # here and at config load; the DPO ablation is use_gain=False
    for alpha in (1.0, 0.5):
        with pytest.raises(ValueError, match=rf"alpha \({alpha}\) must be > 1"):
            gapo_loss(**args, alpha=alpha)
    assert float(gapo_loss(**args, beta=100.0, alpha=0.5, use_gain=False).loss) == float(dpo.loss)  # alpha unused
    from anisora_ray.config import load_config
    from anisora_ray.errors import ConfigError
    from tests.conftest import LOCAL_CONFIG

    with pytest.raises(ConfigError, match="gapo.alpha"):
        load_config(LOCAL_CONFIG, ["gapo.alpha=0.5"])


def test_weighting_is_per_pair_not_batch_mean():
    out = gapo_loss(**case(), beta=100.0)
    batch_mean = float(out.gain.mean() * out.dpo.mean())
    assert float(out.loss) != pytest.approx(batch_mean)  # gaps differ across pairs here
    assert float(out.loss) == pytest.approx(float((out.gain * out.dpo).mean()))


def test_bad_inputs_are_named():
    args = case()
    with pytest.raises(ValueError, match="ref_err_l has shape"):
        gapo_loss(**{**args, "ref_err_l": T([0.1])})
    with pytest.raises(ValueError, match=r"reward_w must be normalized rewards in \[0, 1\]"):
        gapo_loss(**{**args, "reward_w": T([float("nan"), 0.5])})
    with pytest.raises(ValueError, match=r"pair\(s\) \[0\] have reward_w < reward_l"):
        gapo_loss(**{**args, "reward_w": T([0.0, 0.5]), "reward_l": T([1.0, 0.5])})
    with pytest.raises(ValueError, match="differ in shape"):
        prediction_error(torch.zeros(2, 3), torch.zeros(2, 4))


def test_steps_on_one_pair_raise_its_margin():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    reference = torch.nn.Linear(8, 8)
    reference.load_state_dict(model.state_dict())
    reference.requires_grad_(False)
    noisy_w, noisy_l = torch.randn(1, 8), torch.randn(1, 8)  # the same noise/timestep would give these inputs
    target_w, target_l = torch.randn(1, 8), torch.randn(1, 8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    margins = []
    for _ in range(5):
        with torch.no_grad():
            ref_w, ref_l = prediction_error(reference(noisy_w), target_w), prediction_error(reference(noisy_l), target_l)
        out = gapo_loss(prediction_error(model(noisy_w), target_w), prediction_error(model(noisy_l), target_l),
                        ref_w, ref_l, T([0.9]), T([0.2]), beta=50.0)
        margins.append(float(out.margin.detach()))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # model == reference at the start
    assert all(b > a for a, b in zip(margins, margins[1:], strict=False))
