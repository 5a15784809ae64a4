"""Tests for ddpo.py and rewards.py. Every number is checked against an independent reference: a float64
re-derivation of the formulas in ddpo-notes, a hand-worked example, or a second code path.

    pytest -q test_ddpo.py            # everything (the first run pretrains the tiny model once, ~2-3 min)
"""

import io
import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

import ddpo
import rewards


def sd_scheduler(steps=50, prediction_type="epsilon"):
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    s.set_timesteps(steps)
    return s


def reference_step64(scheduler, model_output, t, x_t, x_prev, eta):
    """ddpo-notes §2 in float64, written from the formulas, per sample (t may differ per sample)."""
    abar = scheduler.alphas_cumprod.double()
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    out, x_t, x_prev = model_output.double(), x_t.double(), x_prev.double()
    means, stds, logps = [], [], []
    for i, ti in enumerate(t.tolist()):
        a_t = abar[ti]
        a_prev = abar[ti - step] if ti - step >= 0 else abar[0]  # set_alpha_to_one=False -> abar[0]
        if scheduler.config.prediction_type == "epsilon":
            eps = out[i]
            x0 = (x_t[i] - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        else:
            x0 = math.sqrt(a_t) * x_t[i] - math.sqrt(1 - a_t) * out[i]
            eps = math.sqrt(a_t) * out[i] + math.sqrt(1 - a_t) * x_t[i]
        sigma2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * math.sqrt(sigma2)
        mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
        logp = (-(x_prev[i] - mu) ** 2 / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean()
        means.append(mu), stds.append(std), logps.append(logp)
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64), torch.stack(logps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_matches_float64_formulas(prediction_type, eta):
    scheduler = sd_scheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    ts = scheduler.timesteps
    t = torch.stack([ts[0], ts[1], ts[25], ts[-2], ts[-1]])  # first, last and between: differs per sample
    x_t = torch.randn(5, 4, 8, 8, generator=g)
    out = torch.randn(5, 4, 8, 8, generator=g)
    x_prev = torch.randn(5, 4, 8, 8, generator=g)
    mu, std, logp64 = reference_step64(scheduler, out, t, x_t, x_prev, eta)
    _, logp = ddpo.ddim_step_with_logprob(scheduler, out, t, x_t, eta=eta, prev_sample=x_prev)
    assert logp.dtype == torch.float32 and logp.shape == (5,)
    torch.testing.assert_close(logp.double(), logp64, rtol=1e-5, atol=0)
    # and the same as torch.distributions on the float64 mean and std
    normal = torch.distributions.Normal(mu, std.reshape(5, 1, 1, 1))
    torch.testing.assert_close(logp.double(), normal.log_prob(x_prev.double()).mean(dim=(1, 2, 3)), rtol=1e-5, atol=0)
    # an int timestep is the same as a (B,) tensor of it
    _, a = ddpo.ddim_step_with_logprob(scheduler, out, int(ts[3]), x_t, eta=eta, prev_sample=x_prev)
    _, b = ddpo.ddim_step_with_logprob(scheduler, out, ts[3].repeat(5), x_t, eta=eta, prev_sample=x_prev)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("index", [0, 49])
def test_ddim_sampled_prev_sample_has_the_policy_mean_and_std(index):
    scheduler = sd_scheduler()
    g = torch.Generator().manual_seed(2)
    t = scheduler.timesteps[index].repeat(2)
    x_t, out = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 4, 64, 64, generator=g)
    x_prev, _ = ddpo.ddim_step_with_logprob(scheduler, out, t, x_t, eta=1.0, generator=g)
    mu, std, _ = reference_step64(scheduler, out, t, x_t, x_prev, 1.0)
    z = (x_prev.double() - mu) / std.reshape(2, 1, 1, 1)  # 32768 standard normals if the step is right
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())
    assert abs(z.std().item() - 1) < 0.02


def test_ddim_log_prob_gradient_flows_only_through_the_mean():
    scheduler = sd_scheduler()
    out = torch.randn(3, 4, 8, 8, requires_grad=True)
    x_prev = torch.randn(3, 4, 8, 8, requires_grad=True)
    _, logp = ddpo.ddim_step_with_logprob(scheduler, out, scheduler.timesteps[10], torch.randn(3, 4, 8, 8),
                                          prev_sample=x_prev)
    logp.sum().backward()
    assert x_prev.grad is None and out.grad.abs().sum() > 0


def test_ddim_step_rejects_eta_zero():
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddpo.ddim_step_with_logprob(sd_scheduler(), torch.zeros(1, 4, 2, 2), 1, torch.zeros(1, 4, 2, 2), eta=0.0)


def test_stat_tracker_hand_worked_example():
    tracker = ddpo.PerPromptStatTracker(buffer_size=3, min_count=2)
    # epoch 1: "a" has 2 rewards (>= min_count): its own stats, mean 2, std 1. "b" has 1: the batch's,
    # mean 3, population std sqrt(8/3). Integer rewards must still give float advantages.
    adv = tracker.update(["a", "b", "a"], [1, 5, 3])
    assert adv.dtype == np.float64
    np.testing.assert_allclose(adv, [-1 / (1 + 1e-6), 2 / (math.sqrt(8 / 3) + 1e-6), 1 / (1 + 1e-6)], rtol=1e-12)
    # epoch 2: "a"'s FIFO [1, 3, 5, 7] keeps the last 3 = [3, 5, 7]: mean 5, std sqrt(8/3).
    # "b" now holds [5, 9]: mean 7, std 2.
    state = tracker.state_dict()
    adv = tracker.update(["a", "a", "b"], [5, 7, 9])
    np.testing.assert_allclose(adv, [0, 2 / (math.sqrt(8 / 3) + 1e-6), 2 / (2 + 1e-6)], rtol=1e-12, atol=1e-15)
    # restoring the state replays epoch 2 exactly
    restored = ddpo.PerPromptStatTracker(1, 1)
    restored.load_state_dict(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(restored.update(["a", "a", "b"], [5, 7, 9]), adv)


def test_batch_advantages():
    np.testing.assert_allclose(ddpo.batch_advantages([1, 2, 3]), np.array([-1, 0, 1]) / (math.sqrt(2 / 3) + 1e-8))


def test_clipped_loss_hand_values_and_gradients():
    eps = 0.2
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 10.0])
    ratio = torch.tensor([1.1, 1.5, 1.5, 0.5, 0.5, 1.0])
    old = torch.zeros(6)
    logp = ratio.log().requires_grad_()
    loss, r = ddpo.ddpo_loss(logp, old, adv, clip_range=eps, adv_clip_max=5.0)
    # per sample max(-A r, -A clip(r)): inside; clipped (A>0, r>1+eps); unclipped (A<0, r>1+eps);
    # clipped (A<0, r<1-eps); unclipped (A>0, r<1-eps); A clamped to 5
    per_sample = torch.tensor([-1.1, -1.2, 1.5, 0.8, -0.5, -5.0])
    torch.testing.assert_close(loss, per_sample.mean())
    torch.testing.assert_close(r, ratio)
    loss.backward()
    # d/dlogp of -A r = -A r where unclipped, 0 where the clipped term wins
    expected = torch.tensor([-1.1, 0.0, 1.5, 0.0, -0.5, -5.0]) / 6
    torch.testing.assert_close(logp.grad, expected)


# ------------------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------------------
def test_jpeg_sizes_match_pil_and_rank_flat_below_noise():
    g = torch.Generator().manual_seed(0)
    flat, noise = torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64, generator=g)
    images = torch.cat([flat, noise])
    kb = rewards.jpeg_size_kb(images)
    for image, size in zip(images, kb):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        assert round(size.item() * 1000) == buffer.tell()  # kB = bytes / 1000, exactly the bytes PIL wrote
    assert kb[1] > 3 * kb[0]
    scores, info = rewards.jpeg_compressibility(images, ["x", "y"])
    torch.testing.assert_close(scores, -kb)
    assert info["jpeg_kb"] == kb.tolist()
    torch.testing.assert_close(rewards.jpeg_incompressibility(images, ["x", "y"])[0], kb)


def test_uint8_conversion_rounds_rather_than_truncates():
    x = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 254.5 / 255 + 1e-6, 1.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert rewards.to_uint8_hwc(x)[0, 0, :, 0].tolist() == [0, 0, 1, 255, 255]


def test_brightness_rewards():
    images = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 1.0)])
    torch.testing.assert_close(rewards.brightness(images, ["a", "b"])[0], torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(rewards.darkness(images, ["a", "b"])[0], torch.tensor([0.75, 0.0]))
