"""The DDPO training step's log-prob and importance ratio, as one function.

After the UNet call, every DDPO training micro-step computes, per sample b and element i of C*H*W:

    eps    = eps_u + w * (eps_c - eps_u)              (classifier-free guidance; eps = eps_c without it)
    x0     = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)                        (epsilon prediction)
    mu     = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - std^2) * eps
    logp_b = mean_i [ -(x_prev - mu)^2 / (2 std^2) ] - log(std) - log(sqrt(2 pi))
    ratio_b = exp(logp_b - logp_old_b)

This file holds the pure-PyTorch reference of exactly that function. The fused Triton kernels (one
forward, one backward) that replace it on GPUs are the subject of the kernels issue and not written yet;
until then ddpo.py computes the same thing through ddim_step_with_logprob.
"""

import math

import torch


def ddim_logprob_ratio_reference(noise_pred_cond, noise_pred_uncond, guidance_scale, sqrt_alpha,
                                 sqrt_one_minus_alpha, sqrt_alpha_prev, dir_coef, std, sample, prev_sample,
                                 old_log_prob, prediction_type="epsilon"):
    """Reference of the fused function; the coefficients come from ddpo.ddim_coefficients. Noise predictions (B, ...) in any float dtype; sample/prev_sample
    (B, ...) float32; coefficients and old_log_prob (B,). Returns (log_prob, ratio), float32 (B,),
    differentiable with respect to both noise predictions."""
    shape = (-1,) + (1,) * (sample.ndim - 1)
    a, s1, ap, d, sd = (c.float().reshape(shape) for c in (sqrt_alpha, sqrt_one_minus_alpha, sqrt_alpha_prev,
                                                           dir_coef, std))
    out = noise_pred_cond.float()
    if noise_pred_uncond is not None:
        uncond = noise_pred_uncond.float()
        out = uncond + guidance_scale * (out - uncond)
    x_t = sample.float()
    if prediction_type == "epsilon":
        eps = out
        x0 = (x_t - s1 * eps) / a
    elif prediction_type == "v_prediction":
        x0 = a * x_t - s1 * out
        eps = a * out + s1 * x_t
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported")
    mean = ap * x0 + d * eps
    log_norm = (std.double().log() + 0.5 * math.log(2 * math.pi)).float()
    log_prob = (-((prev_sample.detach().float() - mean) ** 2) / (2 * sd**2)).mean(dim=tuple(range(1, x_t.ndim)))
    log_prob = log_prob - log_norm
    return log_prob, torch.exp(log_prob - old_log_prob.float())
