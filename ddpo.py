"""DDPO: Denoising Diffusion Policy Optimization, in one file.

Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models with Reinforcement Learning" (ICLR 2024,
arXiv 2305.13301). A denoising trajectory x_T -> ... -> x_0 is an episode (paper §4.3); each DDIM step with
eta > 0 is a Gaussian action with an exact log-likelihood; the reward r(x_0, c) arrives at the end. DDPO_IS,
the paper's main method (§4.3), takes PPO-style clipped steps on the per-step likelihood ratios; the same
loop runs the paper's other methods (--method ddpo_sf | rwr | rwr_sparse) and the GRPO-era options (k
images per prompt, a KL term to the reference model, a timestep window, EMA weights, held-out evaluation).

Reading order (the file is in this order):
    1. ddim_step_with_logprob   one DDIM step x_t -> x_{t-1} and its log-probability (the policy)
    2. PerPromptStatTracker     rewards -> advantages, normalised per prompt (group_advantages: per k-group)
    3. ddpo_loss                the clipped surrogate (beside it DDPO_SF's, RWR's weights and loss, the KL)
    4. sample_trajectories      trajectories with the log-prob of every step
    5. micro_batch_loss         the training step: UNet call -> log p -> loss; training_plan, optimizer_step
    6. train                    the epoch loop: sample, reward, advantages, train, log
    ---- infrastructure ----    arguments and validation, the run (devices, models, resume, stopping),
                                rewards worker, distributed, checkpoints, logging, the `sample` command,
                                and last the tiny offline test bed.

Run it:
    # CPU, offline, minutes: a tiny text-to-image model (pretrained in code, cached) learns a reward
    python ddpo.py --preset tiny                                   # JPEG compressibility
    python ddpo.py --preset tiny --reward jpeg_incompressibility
    python ddpo.py --preset tiny --reward brightness --shuffle-advantages   # a control: must NOT learn
    python ddpo.py --preset tiny --method rwr                      # the paper's baselines: ddpo_sf, rwr, rwr_sparse
    python ddpo.py --preset tiny --samples-per-prompt 4 --kl-coef 1 --ema-decay 0.9 --eval-every 10
    # One GPU: Stable Diffusion v1.4 + LoRA, the paper's compressibility run (sizes are per process)
    python ddpo.py --preset compressibility
    python ddpo.py --preset compressibility --model /path/to/local/sd --resume auto --run-dir runs/c1
    python ddpo.py --preset compressibility --compile  # ~2 minutes of compiling, then 1.4x faster epochs (H200)
    python ddpo.py --preset compressibility --wandb ddpo --tensorboard   # optional trackers (pip install them)
    python ddpo.py --preset aesthetic --reward aesthetic=1.0,jpeg_compressibility=0.05
    python ddpo.py --preset alignment --reward-device cuda:1      # LLaVA + BERTScore on a second GPU
    # Several GPUs: the same flags; sizes are per process; rank 0 writes
    torchrun --nproc_per_node 8 ddpo.py --preset aesthetic --run-dir runs/aes8
    # Base model vs a checkpoint, same prompts and noise
    python ddpo.py sample --checkpoint runs/aes8/checkpoints/epoch_0100
"""

import argparse
import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import types
import warnings
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import kernels
import rewards as rewards_lib


# ======================================================================================================
# 1. The policy: one DDIM step and its log-likelihood.
#    DDIM (Song, Meng, Ermon 2021), eq. (12): x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2)
#    eps_hat + sigma_t z, with sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
#    (eq. 16). With eta > 0 it is a Gaussian N(mu, sigma_t^2 I): DDPO's policy pi(x_{t-1} | x_t, c).
# ======================================================================================================
def ddim_coefficients(scheduler, timestep, batch_size, eta, device):
    """Per-sample (B,) float64 coefficients of the DDIM step: sqrt(abar_t), sqrt(1 - abar_t),
    sqrt(abar_prev), the direction coefficient sqrt(1 - abar_prev - std^2), and std = eta * sigma_t.
    float64 because near t = 0, 1 - abar_t / abar_prev ~ 1e-3 cancels badly in float32."""
    t = torch.as_tensor(timestep, device=device).long().reshape(-1).expand(batch_size)  # (B,)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=device, dtype=torch.float64)
    alpha_t = alphas_cumprod[t]  # abar_t
    alpha_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)  # abar at t - step
    std = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()  # eta * sigma_t, eq. (16)
    return alpha_t.sqrt(), (1 - alpha_t).sqrt(), alpha_prev.sqrt(), (1 - alpha_prev - std**2).sqrt(), std


def ddim_mean_std(scheduler, model_output, timestep, sample, eta):
    """The policy's Gaussian at one DDIM step: (mean (B, C, H, W) float32, std (B,) float64).
    Arguments as in ddim_step_with_logprob."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0 (got {eta}): the step needs a nonzero std to have a log-prob")
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before ddim_step_with_logprob")
    B, device = sample.shape[0], sample.device
    model_output, sample = model_output.float(), sample.float()
    shape = (B,) + (1,) * (sample.ndim - 1)  # broadcast (B,) over (B, C, H, W)
    # 1. The step's coefficients, per sample, in float64 (eq. 16 for std).
    sqrt_a, sqrt_1ma, sqrt_a_prev, dir_coef, std = ddim_coefficients(scheduler, timestep, B, eta, device)
    sqrt_a, sqrt_1ma, sqrt_a_prev, dir_coef = (c.float().reshape(shape) for c in (sqrt_a, sqrt_1ma, sqrt_a_prev, dir_coef))
    # 2. The predicted x_0 and noise (eq. 12's "predicted x_0"; v-prediction rewritten in eps and x_0).
    if scheduler.config.prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    elif scheduler.config.prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    else:
        raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported")
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    # 3. The policy's mean: eq. (12) without its noise term.
    return sqrt_a_prev * x0 + dir_coef * eps, std


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, std^2 I) per sample, float32 (B,): the MEAN over the C*H*W elements of
    -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi). x, mean (B, C, H, W); std (B,) float64."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    log_norm = (std.log() + 0.5 * math.log(2 * math.pi)).float().reshape(shape)  # log(std sqrt(2 pi))
    log_prob = -((x - mean) ** 2) / (2 * std.float().reshape(shape) ** 2) - log_norm
    return log_prob.mean(dim=tuple(range(1, x.ndim)))


def ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None,
                           generator=None):
    """One DDIM step x_t -> x_{t-1} and its Gaussian log-likelihood.

    scheduler    diffusers DDIMScheduler after set_timesteps
    model_output (B, C, H, W) the UNet's prediction (epsilon or v, per scheduler.config.prediction_type)
    timestep     int or (B,) LongTensor: timesteps may differ per sample
    sample       (B, C, H, W) x_t
    prev_sample  (B, C, H, W) x_{t-1} to score (a stored transition); None = sample it
    Returns (prev_sample, log_prob): log_prob float32 (B,), the MEAN over C*H*W of
        -(x_{t-1} - mu)^2 / (2 std^2) - log std - log sqrt(2 pi)
    (the mean, not the sum, as in the paper's code: the ratio is then a per-element geometric mean, which
    is why the clip range is as small as 1e-4). Gradients flow only through mu (x_{t-1} is detached; std
    does not depend on the model).
    """
    # 1-3. The policy's mean and std (ddim_mean_std).
    mean, std = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    # 4. Sample x_{t-1} = mu + std * z, unless a stored one is being scored.
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = mean + std.float().reshape(-1, *(1,) * (sample.ndim - 1)) * noise
    prev_sample = prev_sample.detach().float()
    # 5. The Gaussian log-density of x_{t-1}, averaged over the C*H*W elements.
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


# ======================================================================================================
# 2. Advantages (paper §4.3 and appendix: rewards normalised per prompt, over a buffer of recent epochs).
# ======================================================================================================
class PerPromptStatTracker:
    """Per-prompt reward normalisation. For each prompt, a FIFO of its last `buffer_size` rewards (kept
    across epochs). update() adds this epoch's rewards first, then normalises each prompt's rewards with
    the FIFO's mean and std, or, while the FIFO holds fewer than `min_count`, with the whole batch's.
    std is the population std + 1e-6."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers = {}  # prompt -> deque of rewards

    def update(self, prompts, rewards) -> np.ndarray:
        prompts = np.asarray(prompts, dtype=object)
        rewards = np.asarray(rewards, dtype=np.float64)  # integer rewards must still give float advantages
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts.tolist()):  # unique, in order of first appearance
            mask = prompts == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            stats = rewards if len(buffer) < self.min_count else np.asarray(buffer)
            advantages[mask] = (rewards[mask] - stats.mean()) / (stats.std() + 1e-6)
        return advantages

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict):
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: deque(b, maxlen=self.buffer_size) for p, b in state["buffers"].items()}


def batch_advantages(rewards) -> np.ndarray:
    """Without per-prompt tracking: normalise over the epoch batch."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-8)


def group_advantages(prompts, rewards, global_std=False):
    """GRPO-style advantages (Shao et al. 2024; Flow-GRPO, Liu et al. 2025) for k samples per prompt: the
    epoch's samples of one prompt form a group, A = (r - group mean) / (group std + 1e-6), or divided by the
    std of the whole epoch batch with global_std. No memory across epochs. A group whose rewards are all
    equal gets A = 0 (no signal). Returns (advantages (N,) float64, fraction of such groups)."""
    prompts = np.asarray(prompts, dtype=object)
    rewards = np.asarray(rewards, dtype=np.float64)
    advantages, flat = np.zeros_like(rewards), 0
    groups = list(dict.fromkeys(prompts.tolist()))
    for prompt in groups:
        group = rewards[prompts == prompt]
        flat += bool(np.all(group == group[0]))
        std = rewards.std() if global_std else group.std()
        advantages[prompts == prompt] = (group - group.mean()) / (std + 1e-6)
    return advantages, flat / len(groups)


# ======================================================================================================
# 3. The clipped surrogate of DDPO_IS (paper §4.3, with PPO's clipping, Schulman et al. 2017).
# ======================================================================================================
def ddpo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))), A clamped to +-adv_clip_max,
    ratio = exp(log_prob - old_log_prob). All (B,). Returns (loss, ratio)."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


# The paper's other methods (§4.1-4.2, §6.1), on the same loop. DDPO_SF is the plain score-function
# gradient; it needs on-policy samples, so it takes one optimizer step per epoch. RWR and sparse RWR are
# the reward-weighted regression baselines: the ordinary denoising loss on the model's own samples.
def ddpo_sf_loss(log_prob, advantages, adv_clip_max):
    """DDPO_SF: loss = -mean(A * log p), A clamped to +-adv_clip_max. All (B,). Its gradient is the
    REINFORCE estimate -mean(A * grad log p) only at the weights that sampled (one step per epoch)."""
    return -(advantages.clamp(-adv_clip_max, adv_clip_max) * log_prob).mean()


def rwr_weights(advantages, beta, sparse=False, top_fraction=0.1) -> np.ndarray:
    """Per-sample weights of reward-weighted regression over the epoch batch, mean 1. RWR: N * softmax(beta
    * A) (exponential weights, Peters and Schaal 2007), on the normalised rewards A so that beta means the
    same for every reward. Sparse RWR: the top ceil(top_fraction * N) samples by A, weight 1 / top_fraction
    each (ties broken by order), the rest 0: filtered supervised learning on the best samples."""
    advantages = np.asarray(advantages, dtype=np.float64)
    N = len(advantages)
    if sparse:
        kept, weights = math.ceil(top_fraction * N), np.zeros(N)
        weights[np.argsort(-advantages, kind="stable")[:kept]] = N / kept
        return weights
    z = beta * advantages
    exp = np.exp(z - z.max())
    return N * exp / exp.sum()


def weighted_denoising_loss(prediction, target, weights):
    """RWR's loss: mean over the m pairs of weight * mean over elements of (prediction - target)^2.
    prediction, target (m, C, h, w); weights (m,)."""
    mse = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))  # (m,)
    return (weights * mse).mean()


def gaussian_kl(mean, mean_ref, std):
    """KL(N(mean, std^2) || N(mean_ref, std^2)) of one step, averaged over the C*H*W elements like log p:
    (mean - mean_ref)^2 / (2 std^2). mean, mean_ref (B, C, h, w); std (B,) float64. Returns (B,) float32.
    The KL-to-reference regulariser of DPOK (Fan et al. 2023) and Flow-GRPO; not in the DDPO paper."""
    shape = (mean.shape[0],) + (1,) * (mean.ndim - 1)
    return ((mean - mean_ref) ** 2 / (2 * std.float().reshape(shape) ** 2)).mean(dim=tuple(range(1, mean.ndim)))


# ======================================================================================================
# 4. Sampling: trajectories with the log-prob of every step. Training calls the UNet exactly as sampling
#    does (predict_noise), so scoring a stored trajectory with the weights that sampled it gives ratio 1.
# ======================================================================================================
@torch.no_grad()
def encode_prompts(pipe, prompts):
    """Text-encoder hidden states (B, L, D) for a list of prompts, padded to the tokenizer's max length."""
    tokens = pipe.tokenizer(list(prompts), padding="max_length", truncation=True,
                            max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    return pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0]


def predict_noise(unet, latents, timesteps, cond_embeds, uncond_embeds, guidance_scale):
    """(eps_cond, eps_uncond) from ONE batched UNet call on [uncond; cond]; eps_uncond is None without CFG
    (guidance_scale <= 1). latents (B, C, h, w) float32, timesteps scalar or (B,), embeds (B, L, D).
    Outputs stay in the model dtype. Sampling and training both call this, under the same autocast."""
    t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
    if guidance_scale <= 1:
        return unet(latents, t, cond_embeds).sample, None
    eps = unet(torch.cat([latents, latents]), torch.cat([t, t]), torch.cat([uncond_embeds, cond_embeds])).sample
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_cond, eps_uncond


def classifier_free_guidance(eps_cond, eps_uncond, guidance_scale):
    """Classifier-free guidance (Ho and Salimans 2022) in float32: eps_u + w * (eps_c - eps_u)."""
    if eps_uncond is None:
        return eps_cond.float()
    return eps_uncond.float() + guidance_scale * (eps_cond.float() - eps_uncond.float())


@torch.no_grad()
def sample_trajectories(unet, scheduler, cond_embeds, uncond_embeds, latent_shape, guidance_scale, eta, generator,
                        autocast=contextlib.nullcontext, timer=contextlib.nullcontext):
    """DDIM trajectories with log-probs, all stored in float32 whatever the model dtype (the ratio must be
    exactly 1 on-policy; fp16 latents would move it by ~1e-4, the size of the clip range). No host sync
    inside the loop. cond_embeds, uncond_embeds (B, L, D); latent_shape (C, h, w).
    Returns latents (B, T+1, C, h, w) = x_T .. x_0 and log_probs (B, T) of each step."""
    B = cond_embeds.shape[0]
    x = torch.randn((B, *latent_shape), generator=generator, device=cond_embeds.device) * scheduler.init_noise_sigma
    trajectory, log_probs = [x], []
    for t in scheduler.timesteps:
        with timer(), autocast():
            eps_cond, eps_uncond = predict_noise(unet, x, t, cond_embeds, uncond_embeds, guidance_scale)
        x, log_prob = ddim_step_with_logprob(scheduler, classifier_free_guidance(eps_cond, eps_uncond, guidance_scale),
                                             t, x, eta=eta, generator=generator)
        trajectory.append(x)
        log_probs.append(log_prob)
    return torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1)


@torch.no_grad()
def decode_images(vae, latents, autocast=contextlib.nullcontext):
    """VAE latents (B, C, h, w) -> images (B, 3, H, W) float32 in [0, 1]."""
    with autocast():
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


# ======================================================================================================
# 5. The training step. The loss is a mean over (sample, timestep) pairs, so any pairs can share a UNet
#    call (timesteps differ per sample): micro_batch_loss scores m pairs in one call, training_plan decides
#    which pairs go together, optimizer_step accumulates them into one clipped AdamW step.
# ======================================================================================================
def micro_batch_loss(unet, scheduler, batch, uncond_embeds, guidance_scale, eta, clip_range, adv_clip_max,
                     method="ddpo_is", kl_coef=0.0, reference=None, fused=False, autocast=contextlib.nullcontext):
    """The policy-gradient loss of m (sample, timestep) pairs: one UNet call -> log p of the stored step ->
    DDPO_IS's clipped surrogate (method "ddpo_is") or DDPO_SF's -A log p ("ddpo_sf"), plus kl_coef x the KL
    to the reference model. batch: x_t (m, C, h, w), t (m,), x_prev (m, C, h, w), old_log_prob (m,) or None
    (before any update in exact-ratio mode: this forward's own log p, detached, so the ratio is exactly 1),
    embeds (m, L, D), advantages (m,). uncond_embeds (1, L, D). reference: a context manager yielding the
    reference UNet (needed when kl_coef > 0). fused=True computes log p with the Triton kernels of
    kernels.py (the same math). Returns (loss, stats): loss the mean over the m pairs; stats of (m,)
    tensors: log_prob, old_log_prob, ratio, and kl_ref (None when kl_coef = 0)."""
    m = len(batch["t"])
    uncond = uncond_embeds.expand(m, -1, -1)
    with autocast():
        eps_cond, eps_uncond = predict_noise(unet, batch["x_t"], batch["t"], batch["embeds"], uncond, guidance_scale)
    def guided_step(eps):  # (mean, std) of the guided DDIM step for (eps_cond, eps_uncond)
        return ddim_mean_std(scheduler, classifier_free_guidance(*eps, guidance_scale), batch["t"], batch["x_t"], eta)

    mean = std = None
    old_log_prob = batch["old_log_prob"]
    if fused:  # (its ratio output is not used: ddpo_loss forms the ratio, so any old log p will do here)
        kernel_old = torch.zeros(m, device=batch["x_t"].device) if old_log_prob is None else old_log_prob
        log_prob, _ = kernels.ddim_logprob_ratio(scheduler, eps_cond, eps_uncond, guidance_scale, batch["t"],
                                                 batch["x_t"], batch["x_prev"], kernel_old, eta=eta)
    else:
        mean, std = guided_step((eps_cond, eps_uncond))
        log_prob = gaussian_log_prob(batch["x_prev"], mean, std)
    if old_log_prob is None:  # exact-ratio mode before any update: this forward is the sampling policy's own
        old_log_prob = log_prob.detach()
    if method == "ddpo_sf":
        loss, ratio = ddpo_sf_loss(log_prob, batch["advantages"], adv_clip_max), torch.exp(log_prob - old_log_prob)
    else:
        loss, ratio = ddpo_loss(log_prob, old_log_prob, batch["advantages"], clip_range, adv_clip_max)
    kl_ref = None
    if kl_coef > 0:  # the same step's Gaussian under the reference weights: same std, its own mean
        if mean is None:  # the fused kernels give log p, not the mean
            mean, std = guided_step((eps_cond, eps_uncond))
        with torch.no_grad(), reference() as reference_unet, autocast():
            eps_ref = predict_noise(reference_unet, batch["x_t"], batch["t"], batch["embeds"], uncond, guidance_scale)
        mean_ref, _ = guided_step(eps_ref)
        kl_ref = gaussian_kl(mean, mean_ref, std)
        loss = loss + kl_coef * kl_ref.mean()
    return loss, {"log_prob": log_prob, "old_log_prob": old_log_prob, "ratio": ratio, "kl_ref": kl_ref}


def rwr_micro_batch_loss(unet, scheduler, batch, generator, autocast=contextlib.nullcontext):
    """RWR and sparse RWR (paper §6.1 baselines): the denoising loss on the model's own samples. Each pair's
    final latent x_0 (m, C, h, w) is noised afresh to the pair's timestep t by the forward process,
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, the UNet predicts eps (or v) from (x_t, t, c) without
    guidance, and the squared error is weighted by batch["advantages"] (here rwr_weights). The stored
    trajectory's x_t is not used. Returns (loss, stats) with no log p. Fitting a model to its own samples
    drifts whatever the weights: on the tiny model, held-out alignment 0.89 -> 0.07 in 40 epochs with the
    weights shuffled (README, "The paper's four methods in miniature")."""
    x0, t = batch["x_0"], batch["t"]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)  # (m, C, h, w), a CPU generator
    abar = scheduler.alphas_cumprod.to(x0.device)[t].float().reshape(-1, *(1,) * (x0.ndim - 1))
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with autocast():
        prediction = unet(x_t, t, batch["embeds"]).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v (Salimans and Ho 2022)
    else:
        target = noise
    return weighted_denoising_loss(prediction, target, batch["advantages"]), {}


def training_plan(num_samples, num_steps, batch_size, accumulation, timestep_fraction, micro_batch, generator,
                  window=None):
    """One inner epoch's schedule (paper appendix: samples shuffled, and time shuffled per sample): a list of
    optimizer steps, each a list of micro-batches, each a pair (i, j) of (m,) index tensors: sample i, step j
    of its trajectory. A step covers batch_size * accumulation samples and the first
    floor(W * timestep_fraction) of each one's shuffled steps, listed in the published order (for each
    train batch, for each kept step, the batch's samples) and cut into micro-batches of `micro_batch` pairs.
    window (a, b): only trajectory steps a..b-1 are trained (W = b - a); default all T."""
    N = num_samples
    a, b = window or (0, num_steps)
    T_train = max(1, int((b - a) * timestep_fraction))
    perm = torch.randperm(N, generator=generator)  # (N,) samples shuffled
    time_perm = a + torch.stack([torch.randperm(b - a, generator=generator) for _ in range(N)])  # (N, W), per sample
    B, G = batch_size, accumulation
    # Offsets within a step's G*B samples and kept slots, in the published order: (P,) each, P = G*T_train*B.
    offsets = torch.arange(G * B).view(G, 1, B).expand(G, T_train, B).reshape(-1)
    slots = torch.arange(T_train).view(1, T_train, 1).expand(G, T_train, B).reshape(-1)
    plan = []
    for first in range(0, N, G * B):
        rows = perm[first + offsets]  # (P,) sample of each pair
        steps = time_perm[first + offsets, slots]  # (P,) trajectory step of each pair
        plan.append([(rows[k:k + micro_batch], steps[k:k + micro_batch]) for k in range(0, len(rows), micro_batch)])
    return plan


def gather_pairs(samples, i, j):
    """The micro-batch of pairs (sample i, step j) from an epoch's samples (dict of (N, ...) tensors)."""
    i, j = i.to(samples["latents"].device), j.to(samples["latents"].device)
    return {"x_t": samples["latents"][i, j], "x_prev": samples["next_latents"][i, j], "t": samples["timesteps"][i, j],
            "old_log_prob": samples["log_probs"][i, j], "embeds": samples["embeds"][i],
            "advantages": samples["advantages"][i], "x_0": samples["final_latents"][i]}


def optimizer_step(loss_fn, samples, micro_batches, optimizer, params, scaler, max_grad_norm, clip_range,
                   own_old_log_probs=False):
    """One optimizer step over the pairs of `micro_batches` (see training_plan): each micro-batch
    backpropagates its loss * m / P, so the step sees exactly the mean loss over its P pairs, however they
    are packed. Gradients averaged over processes, norm clipped, one step. loss_fn(batch) -> (loss, stats)
    as micro_batch_loss. own_old_log_probs (exact-ratio mode, the epoch's first step, whose weights are
    still the sampling weights): each forward's own log p is its old log p. Returns un-synced (7,) float32
    sums: loss * pairs, approx_kl * pairs, clipped pairs, pairs, kl_ref * pairs, max |ratio - 1|, and the
    gradient norm before clipping (the log-prob terms are 0 for losses without log p, RWR's)."""
    P = sum(len(i) for i, _ in micro_batches)
    sums = torch.zeros(6, device=samples["latents"].device)
    for i, j in micro_batches:
        batch = gather_pairs(samples, i, j)
        if own_old_log_probs:
            batch["old_log_prob"] = None
        loss, stats = loss_fn(batch)
        scaler.scale(loss * (len(i) / P)).backward()
        with torch.no_grad():
            sums[0] += loss * len(i)
            sums[3] += len(i)
            if stats.get("log_prob") is not None:
                deviation = (stats["ratio"] - 1).abs()
                sums[1] += 0.5 * ((stats["log_prob"] - stats["old_log_prob"]) ** 2).sum()
                sums[2] += (deviation > clip_range).float().sum()
                sums[5] = torch.maximum(sums[5], deviation.max())
            if stats.get("kl_ref") is not None:
                sums[4] += stats["kl_ref"].sum()
    average_gradients(params)  # torchrun: the mean over processes, identical on every rank
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return torch.cat([sums, grad_norm.float().reshape(1).to(sums.device)])


def ema_update(ema, params, decay):
    """EMA of the trainable weights after an optimizer step: ema <- decay * ema + (1 - decay) * theta."""
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)


@contextlib.contextmanager
def swapped_weights(params, replacement):
    """Inside: `params` hold `replacement`'s values (e.g. the EMA weights for evaluation); restored after."""
    if replacement is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_([p.data for p in params], replacement)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], saved)


def rescore_old_log_probs(loss_fn, samples, plan):
    """Exact-ratio mode: before the first update, replace the sampled log-probs of the pairs in `plan` by
    those of the training forward itself (same micro-batches, train mode, autograd on, nothing kept). With
    the same weights, inputs and kernels, training then computes the same numbers, so the on-policy ratio
    is exactly 1 whatever the precision or the kernels' batch-size dependence. Costs one forward per pair,
    so train() re-scores only the pairs after the first optimizer step: that step's own forwards, taken
    before any update, are the re-scores of its pairs (optimizer_step's own_old_log_probs)."""
    log_probs = samples["log_probs"].clone()
    for micro_batches in plan:
        for i, j in micro_batches:
            # One statement: this forward's graph (its activations) is freed before the next one is built;
            # kept in a variable, two graphs would be alive at once (1.8x the memory of training on a GPU).
            log_probs[i.to(log_probs.device), j.to(log_probs.device)] = \
                loss_fn(gather_pairs(samples, i, j))[1]["log_prob"].detach()
    return {**samples, "log_probs": log_probs}


# ======================================================================================================
# 6. The epoch loop (paper §4.3, appendix): sample -> reward -> advantages -> train -> log.
# ======================================================================================================
def train(args):
    """DDPO (args.method: DDPO_IS, DDPO_SF, RWR or sparse RWR) on `args`. Everything that is not the algorithm
    (devices, models, run directory, resume, evaluation, logging, stopping cleanly) is in Run, below the line."""
    run = Run(args)
    unet, scheduler = run.unet, run.pipe.scheduler
    if args.method in ("rwr", "rwr_sparse"):
        loss_fn = functools.partial(rwr_micro_batch_loss, run.train_unet, scheduler, generator=run.train_gen,
                                    autocast=run.autocast)
    else:
        loss_fn = functools.partial(micro_batch_loss, run.train_unet, scheduler, uncond_embeds=run.uncond_embeds,
                                    guidance_scale=args.guidance_scale, eta=args.eta, clip_range=args.clip_range,
                                    adv_clip_max=args.adv_clip_max, method=args.method, kl_coef=args.kl_coef,
                                    reference=run.reference, fused=run.fused, autocast=run.autocast)
    with run.stop_guard():
        for epoch in range(run.start_epoch, args.num_epochs):
            run.begin_epoch(epoch)  # and, every --eval-every epochs, the held-out evaluation

            # Sample: B trajectories per batch (k per prompt), with the log-prob of every step; each batch's
            # rewards are computed in a worker thread while the next batch samples.
            unet.eval()
            batches = []
            for _ in run.progress(range(args.sample_num_batches), f"epoch {epoch} sample"):
                prompts = run.draw_prompts(args.sample_batch_size, args.samples_per_prompt)
                embeds = run.encode(prompts)  # (B, L, D), reused by training
                latents, log_probs = sample_trajectories(  # (B, T+1, C, h, w), (B, T)
                    run.sample_unet, scheduler, embeds, run.uncond_embeds.expand(len(prompts), -1, -1),
                    run.latent_shape, args.guidance_scale, args.eta, run.sample_gen, run.autocast, run.timer)
                images = run.decode(latents[:, -1])  # (B, 3, H, W) in [0, 1]
                batches.append(dict(prompts=prompts, embeds=embeds, latents=latents, log_probs=log_probs,
                                    images=images, reward=run.reward_worker.submit(images, prompts)))
            run.mark("sampled")

            # Reward: every process's prompts and rewards, so that advantages see the global epoch batch.
            all_prompts, rewards, infos = run.gather_rewards(batches)
            run.mark("rewarded")
            run.save_samples_grid(batches, rewards, infos)  # every --image-every epochs

            # Advantages: per group of k samples of a prompt, per prompt over recent epochs, or over the
            # batch; RWR turns them into regression weights. This process keeps its own slice.
            if args.samples_per_prompt > 1:
                advantages, run.flat_group_fraction = group_advantages(all_prompts, rewards.numpy(), args.global_std)
            elif args.per_prompt_stat_tracking:
                advantages = run.tracker.update(all_prompts, rewards.numpy())
            else:
                advantages = batch_advantages(rewards.numpy())
            if args.method in ("rwr", "rwr_sparse"):
                advantages = rwr_weights(advantages, args.rwr_beta, args.method == "rwr_sparse", args.rwr_top_fraction)
            n = args.sample_batch_size * args.sample_num_batches
            advantages = advantages[run.rank * n:(run.rank + 1) * n]
            if args.shuffle_advantages:  # the control: same advantage values, no link to the samples
                advantages = advantages[run.np_rng.permutation(len(advantages))]
            trajectories = torch.cat([b["latents"] for b in batches])  # (N, T+1, C, h, w)
            samples = {"embeds": torch.cat([b["embeds"] for b in batches]),  # (N, L, D)
                       "latents": trajectories[:, :-1], "next_latents": trajectories[:, 1:],  # x_t, x_{t-1}
                       "final_latents": trajectories[:, -1],  # x_0, for RWR's denoising loss
                       "log_probs": torch.cat([b["log_probs"] for b in batches]),  # (N, T)
                       "timesteps": scheduler.timesteps.repeat(n, 1),  # (N, T)
                       "advantages": torch.as_tensor(advantages, dtype=torch.float32, device=run.device)}  # (N,)

            # Train: shuffled (sample, step) pairs of the --train-timesteps window, one AdamW step per
            # train_batch_size * gradient_accumulation_steps samples (DDPO_SF: the whole epoch, on-policy).
            unet.train()
            plans = [training_plan(n, args.num_steps, args.train_batch_size, args.gradient_accumulation_steps,
                                   args.timestep_fraction, args.train_micro_batch or args.train_batch_size,
                                   run.train_gen, run.window) for _ in range(args.num_inner_epochs)]
            exact = run.exact_ratio and args.method == "ddpo_is"
            run.mark("rescoring")
            if exact:  # old log p of every pair trained after the first update, from the training forward
                with run.timer():
                    samples = rescore_old_log_probs(loss_fn, samples, run.progress(plans[0][1:],
                                                                                   f"epoch {epoch} re-score"))
            run.mark("rescored")
            for k, plan in enumerate(plans):
                for s, micro_batches in enumerate(run.progress(plan, f"epoch {epoch} train")):
                    with run.timer():
                        sums = optimizer_step(loss_fn, samples, micro_batches, run.optimizer, run.params,
                                              run.scaler, args.max_grad_norm, args.clip_range,
                                              own_old_log_probs=exact and k == 0 and s == 0)
                        if run.ema is not None:
                            ema_update(run.ema, run.params, args.ema_decay)
                    run.log_step(epoch, sums)  # stops the run if the loss, gradient or weights are not finite

            # Log: the epoch's rewards, train metrics and timings; a checkpoint every save_every epochs.
            run.end_epoch(epoch, rewards, infos)
        run.finish()  # the final evaluation and curves.png
    return run.run_dir


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sample"]:
        return sample_main(argv[1:])
    args = parse_args(argv)
    validate(args)  # every check that needs no model: bad input fails in a second
    args = on_policy_settings(args, print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a: None))
    try:
        return train(args)
    except KeyboardInterrupt:  # while loading, before the first epoch (later ones are Run.stop_guard's)
        print("ddpo.py: interrupted while starting; nothing was trained", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # the same, for running out of memory while the models load
        if not out_of_memory(e):
            raise
        fail(f"out of memory while loading the models ({rewards_lib.first_line(e)}). Less to hold: --mixed-precision "
             "fp16 or bf16 halves the frozen weights, --reward-device puts the reward's models on another device")


# ══════════════════════════════════════════════════════════════════════════════════════════════════════
# Infrastructure below this line: arguments, the run (devices, models, run directory, resume, logging,
# stopping), the reward worker, distributed, checkpoints, the `sample` command, the tiny offline test bed.
# ══════════════════════════════════════════════════════════════════════════════════════════════════════
def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    """Every field is a --flag (underscores become dashes); its help is the --help text. The defaults are
    the paper's published per-GPU settings for Stable Diffusion (compressibility task)."""
    preset: str = arg(None, "named set of defaults applied first (explicit flags override); names below")
    # model
    model: str = arg("CompVis/stable-diffusion-v1-4", "hub id or local path of a diffusers SD 1.x/2.x "
                     "checkpoint, or 'tiny' for the offline CPU pipeline pretrained in code (cached)")
    lora_rank: int = arg(4, "LoRA rank on the UNet attention projections; 0 = full fine-tuning")
    mixed_precision: str = arg("fp16", "no | fp16 | bf16: dtype of frozen weights and autocast; "
                               "trainable parameters and stored trajectories stay float32")
    tf32: bool = arg(False, "allow TF32 matmuls and convolutions on Ampere+ GPUs (faster fp32, but ~1e-4 "
                     "noise in the ratio; --exact-ratio auto then re-scores)")
    exact_ratio: str = arg("auto", "auto | on | off: re-score the sampled log-probs with the training forward "
                           "before each epoch's first update, so the on-policy ratio is exactly 1 (one extra "
                           "forward per trained pair). auto = on with fp16, bf16 or --tf32")
    gradient_checkpointing: bool = arg(False, "recompute UNet activations in the backward pass: less "
                                       "memory, more time, the same gradients")
    offload_frozen: bool = arg(False, "keep the VAE and text encoder on the CPU, moving each to the device "
                               "only for its calls (frees their memory while the UNet trains)")
    compile: bool = arg(False, "torch.compile the UNet's ResNet and transformer blocks (GPUs: on an H200 at SD scale, "
                        "with the default CUDA graphs, 29.7 -> 21.0 s per epoch, after about 2 minutes of compiling "
                        "with cold caches and --compile-workers auto; the compiled code is cached in "
                        "DDPO_CACHE/inductor, unless TORCHINDUCTOR_CACHE_DIR is set, for later runs and resumes)")
    compile_workers: str = arg("auto", "auto | N: --compile compiles the blocks' graphs in N processes at once before "
                               "the first epoch, into inductor's cache, from which the run then loads them (skipped "
                               "when the cache holds them already; static shapes, so some more graphs); 0 = off: the "
                               "first epoch compiles them one after another. Each process loads the model on the GPU. "
                               "auto = one per 2 CPU cores, at most 6, as many as the GPU's free memory holds, on a "
                               "CUDA device; 0 on the CPU (no faster on 2 cores). On an H200 (16 cores): 6 processes "
                               "compiled SD's 40 block variants in 74 s; without them the first epoch compiled for "
                               "4-4.5 minutes")
    cuda_graphs: str = arg("auto", "auto | all | on | off: replay the UNet's calls from CUDA graphs (one capture, "
                           "then one launch per call instead of thousands). 'on': the training step's forward and "
                           "backward; 'all': those and the sampling loop's calls; auto = all for LoRA on a CUDA "
                           "device without --gradient-checkpointing (with --compile, the compiled blocks' kernels "
                           "are captured). Measured on H200s at SD scale: eager 45.8 -> 'on' 30.2 s per epoch, peak "
                           "memory 11.7 -> 10.0 GB; on another, 'on' 31.4 -> 'all' 29.7 s (sampling 9.0 -> 7.1 s), "
                           "10.0 GB")
    device: str = arg("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    fused_kernel: str = arg("auto", "auto | on | off: the Triton kernels of kernels.py for the training step's "
                            "log-prob, checked at the start on one small call against the PyTorch reference (auto = "
                            "on for CUDA if that passes, else the reference with a note; 'on' stops if it fails; on "
                            "CPU tensors 'on' needs TRITON_INTERPRET=1, for tests)")
    # task
    reward: str = arg("jpeg_compressibility", "a reward of rewards.REWARDS (jpeg_compressibility, "
                      "jpeg_incompressibility, aesthetic, llava_bertscore, brightness, darkness), your own "
                      "module:function, or a weighted sum: aesthetic=1.0,jpeg_compressibility=0.05")
    reward_device: str = arg("auto", "device of the reward models (auto = the policy's); e.g. cuda:1 to "
                             "keep LLaVA off the policy's GPU")
    clip_model: str = arg(None, "aesthetic: CLIP hub id or local path (default openai/clip-vit-large-patch14)")
    aesthetic_head: str = arg(None, "aesthetic: LAION head .pth file, directory or hub id "
                              "(default trl-lib/ddpo-aesthetic-predictor)")
    vlm_model: str = arg(None, "llava_bertscore: LLaVA hub id or local path (default llava-hf/llava-1.5-7b-hf)")
    bertscore_model: str = arg(None, "llava_bertscore: BERTScore model (default microsoft/deberta-xlarge-mnli)")
    bertscore_layer: int = arg(None, "llava_bertscore: BERTScore layer, hidden_states[L] (default 40)")
    prompts: str = arg("imagenet_animals", "a built-in prompt set (imagenet_animals, simple_animals, "
                       "animals_activities, tiny_shapes) or a UTF-8 .txt file, one prompt per line")
    # sampling (per process)
    resolution: int = arg(None, "image side in pixels (default: the model's own, UNet sample size x VAE factor)")
    num_steps: int = arg(50, "DDIM steps T per trajectory")
    eta: float = arg(1.0, "DDIM eta > 0: the policy's std is eta * sigma_t")
    guidance_scale: float = arg(5.0, "classifier-free guidance weight w (<= 1 disables CFG)")
    sample_batch_size: int = arg(8, "images per sampling batch, per process")
    sample_num_batches: int = arg(4, "sampling batches per epoch, per process")
    # training (per process)
    num_epochs: int = arg(100, "epochs: one epoch = sample, score, train")
    train_batch_size: int = arg(4, "trajectories per training batch, per process")
    train_micro_batch: int = arg(0, "(sample, timestep) pairs per UNet call in training; any pairs can share "
                                 "a call and the step's mean loss is unchanged (0 = train_batch_size, one "
                                 "timestep of one batch per call, the memory of published code)")
    gradient_accumulation_steps: int = arg(2, "training batches per optimizer step (each over all kept "
                                           "timesteps)")
    num_inner_epochs: int = arg(1, "passes over each epoch's samples")
    timestep_fraction: float = arg(1.0, "fraction of each trajectory's timesteps trained on (shuffled "
                                   "per sample)")
    learning_rate: float = arg(3e-4, "AdamW learning rate (constant)")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2")
    adam_weight_decay: float = arg(1e-4, "AdamW weight decay")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon")
    max_grad_norm: float = arg(1.0, "gradient-norm clip (inf = no clipping)")
    clip_range: float = arg(1e-4, "PPO clip range on the per-step likelihood ratio")
    adv_clip_max: float = arg(5.0, "advantages are clamped to [-adv_clip_max, adv_clip_max]")
    per_prompt_stat_tracking: bool = arg(True, "normalise rewards per prompt (else over the epoch batch)")
    stat_buffer_size: int = arg(16, "per-prompt FIFO length of the stat tracker")
    stat_min_count: int = arg(16, "below this many rewards for a prompt, use the batch statistics")
    shuffle_advantages: bool = arg(False, "CONTROL: permute advantages across samples; a run that "
                                   "still 'learns' with this is not learning the reward")
    # the method (paper §4, §6.1) and the GRPO-era options
    method: str = arg("ddpo_is", "ddpo_is | ddpo_sf | rwr | rwr_sparse: DDPO with importance sampling and "
                      "clipping (the paper's best), DDPO's plain score-function gradient (on-policy: one optimizer "
                      "step per epoch, set for you), reward-weighted regression, or its sparse variant")
    rwr_beta: float = arg(1.0, "rwr: inverse temperature of the weights N * softmax(beta * A) on the "
                          "normalised rewards A")
    rwr_top_fraction: float = arg(0.1, "rwr_sparse: the fraction of each epoch's samples trained on (the best)")
    samples_per_prompt: int = arg(1, "k: each sampling batch holds k images of each of its prompts, and "
                                  "advantages are normalised within each prompt's group of the epoch (GRPO); "
                                  "1 = one image per drawn prompt and the per-prompt tracker")
    global_std: bool = arg(False, "with --samples-per-prompt > 1: divide by the epoch's std, not the group's")
    kl_coef: float = arg(0.0, "beta: add beta x the KL from the policy's step to the reference model's "
                         "(the UNet with LoRA disabled; in full fine-tuning, a frozen copy of the initial "
                         "weights), logged as train/kl_ref (0 = off)")
    train_timesteps: str = arg(None, "a:b: train only on trajectory steps a..b-1 (step 0 is the first, "
                               "noisiest); --timestep-fraction then picks within the window")
    ema_decay: float = arg(0.0, "keep an EMA of the trainable weights with this decay, used for evaluation "
                           "and saved in checkpoints (0 = off)")
    eval_every: int = arg(0, "every N epochs and at the end, sample the --eval-prompts from fixed noise "
                          "(the EMA weights if any) and log eval/* (0 = never)")
    eval_prompts: str = arg(None, "prompt set or UTF-8 file for evaluation (default: the held-out set of a "
                            "built-in --prompts, disjoint from it)")
    # bookkeeping
    seed: int = arg(0, "random seed, in [0, 2^31)")
    run_dir: str = arg(None, "directory for config, metrics, images and checkpoints "
                       "(default runs/<reward>-<time>); it must not hold another run unless --overwrite")
    overwrite: bool = arg(False, "start fresh in a --run-dir that holds a run, deleting its metrics, images and "
                          "checkpoints")
    resume: str = arg(None, "checkpoint directory to resume from, or 'auto' (latest good checkpoint in "
                      "--run-dir, or start fresh if none)")
    save_every: int = arg(10, "checkpoint every N epochs (and always at the end)")
    keep_checkpoints: int = arg(3, "keep only the last K >= 1 checkpoints")
    image_every: int = arg(5, "write a PNG grid of samples every N epochs (0 = never)")
    wandb: str = arg(None, "also log metrics and image grids to Weights & Biases, in this project (optional: "
                     "pip install wandb; WANDB_MODE=offline works without a network; a resumed run continues "
                     "the same W&B run)")
    tensorboard: bool = arg(False, "also write metrics and image grids as TensorBoard events in "
                            "<run-dir>/tensorboard (optional: pip install tensorboard)")


PRESETS = {
    # CPU, offline: the tiny pipeline pretrained in code. Minutes on 2 cores. Full fine-tuning of its
    # 0.37M-parameter UNet and no CFG: measured (README) to learn faster per CPU second than LoRA or CFG.
    # clip_range 1e-3: log p is a mean over 12*16*16 = 3072 latent elements instead of SD's 16384, so
    # the ratio is noisier than SD's (sqrt(16384/3072) = 2.3x) and a few CPU minutes need larger steps.
    "tiny": dict(model="tiny", prompts="tiny_shapes", reward="jpeg_compressibility", mixed_precision="no",
                 num_steps=10, guidance_scale=1.0, sample_batch_size=32, sample_num_batches=2,
                 train_batch_size=16, gradient_accumulation_steps=1, timestep_fraction=0.5, num_epochs=120,
                 train_micro_batch=80,  # all 16 x 5 pairs of a step in one UNet call
                 lora_rank=0, learning_rate=3e-4, clip_range=1e-3, stat_buffer_size=32, stat_min_count=8,
                 save_every=20, image_every=10),
    # The paper's runs (SD v1.4, LoRA r4, fp16), sizes per GPU for 8 GPUs (6 for alignment).
    "compressibility": dict(reward="jpeg_compressibility", prompts="imagenet_animals", num_epochs=100,
                            sample_batch_size=8, sample_num_batches=4, train_batch_size=4,
                            gradient_accumulation_steps=2, stat_buffer_size=16, stat_min_count=16),
    "incompressibility": dict(reward="jpeg_incompressibility", prompts="imagenet_animals", num_epochs=100,
                              sample_batch_size=8, sample_num_batches=4, train_batch_size=4,
                              gradient_accumulation_steps=2, stat_buffer_size=16, stat_min_count=16),
    "aesthetic": dict(reward="aesthetic", prompts="simple_animals", num_epochs=200, sample_batch_size=8,
                      sample_num_batches=4, train_batch_size=4, gradient_accumulation_steps=4,
                      stat_buffer_size=32, stat_min_count=16),
    "alignment": dict(reward="llava_bertscore", prompts="animals_activities", num_epochs=200,
                      sample_batch_size=8, sample_num_batches=6, train_batch_size=4,
                      gradient_accumulation_steps=6, stat_buffer_size=32, stat_min_count=16),
}

SIMPLE_ANIMALS = ("cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon "
                  "fox wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake "
                  "turtle frog chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog "
                  "kangaroo").split()
# A short ImageNet-style animal list (the published run used 398 ImageNet animal classes).
IMAGENET_ANIMALS = SIMPLE_ANIMALS + ("golden retriever|tabby cat|red fox|grey whale|king penguin|goldfish|"
                                     "great white shark|bald eagle|tree frog|box turtle|green lizard|"
                                     "tarantula|ladybug|monarch butterfly|hamster|hippopotamus|"
                                     "african elephant|giant panda|koala|otter|meerkat|flamingo|"
                                     "peacock|ostrich|jellyfish|starfish|lobster|hermit crab").split("|")
ACTIVITIES = ["washing the dishes", "riding a bike", "playing chess"]
PROMPT_SETS = {
    "simple_animals": SIMPLE_ANIMALS,
    "imagenet_animals": IMAGENET_ANIMALS,
    "animals_activities": [f"{'an' if a[0] in 'aeiou' else 'a'} {a} {act}" for a in SIMPLE_ANIMALS
                           for act in ACTIVITIES],
    # captions of the tiny test bed's synthetic images (see synthetic_shapes, at the end of the file)
    "tiny_shapes": ["a red circle on blue", "a yellow square on black", "a green triangle on white",
                    "a purple ring on grey", "a orange circle on green", "a blue square on yellow",
                    "a white triangle on purple", "a black ring on orange"],
}
# Held-out evaluation prompts, disjoint from their training sets (--eval-prompts' defaults).
HELD_OUT_ANIMALS = "alpaca beaver bison cheetah donkey elk giraffe hyena jaguar lemur lynx moose".split()
PROMPT_SETS.update({
    "animals_heldout": HELD_OUT_ANIMALS,
    "animals_activities_heldout": [f"{'an' if a[0] in 'aeiou' else 'a'} {a} {act}" for a in HELD_OUT_ANIMALS[:8]
                                   for act in ACTIVITIES],
    "tiny_shapes_heldout": ["a blue circle on yellow", "a red square on white", "a green ring on black",
                            "a yellow triangle on blue", "a white circle on red", "a orange square on purple",
                            "a purple triangle on green", "a grey ring on red"],
})
HELD_OUT = {"simple_animals": "animals_heldout", "imagenet_animals": "animals_heldout",
            "animals_activities": "animals_activities_heldout", "tiny_shapes": "tiny_shapes_heldout"}
METHODS = ("ddpo_is", "ddpo_sf", "rwr", "rwr_sparse")
EVAL_SEED = 20240101  # evaluation noise: the same in every evaluation of every run


def build_parser():
    parser = argparse.ArgumentParser(
        description="DDPO fine-tuning of a text-to-image diffusion model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"presets: {', '.join(PRESETS)}. prompt sets: {', '.join(PROMPT_SETS)}. "
               "Also: 'python ddpo.py sample --checkpoint DIR' renders the base model beside a checkpoint "
               "(see 'python ddpo.py sample --help').")
    for f in dataclasses.fields(Args):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str)
                                                                else f.type.__name__, str)
            parser.add_argument(name, type=typ, default=f.default, help=f.metadata["help"])
    return parser


def parse_args(argv=None) -> Args:
    """Preset first, then explicit flags override it."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset is not None:
        if known.preset not in PRESETS:
            fail(f"unknown preset {known.preset!r}; choose one of: {', '.join(PRESETS)}")
        parser.set_defaults(**PRESETS[known.preset])
    return Args(**vars(parser.parse_args(argv)))


class RunStopped(Exception):
    """The run cannot go on (diverged, a reward broke, a checkpoint could not be written): one line for the
    user, raised where it is found and reported by Run.stop_guard."""


def fail(message):
    """Stop with one clear line (no traceback): bad input is the user's to fix, not a crash."""
    raise SystemExit(f"ddpo.py: error: {message}")


def load_prompts(spec: str, flag="--prompts") -> list:
    """A built-in prompt set by name, or a UTF-8 file of one prompt per line; errors name `flag`."""
    if spec in PROMPT_SETS:
        return list(PROMPT_SETS[spec])
    path = Path(spec)
    if not path.is_file():
        fail(f"{flag} {spec!r} is neither a built-in set ({', '.join(PROMPT_SETS)}) nor an existing file")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        fail(f"{flag} {spec!r} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not prompts:
        fail(f"{flag} file {spec!r} has no prompts (one per line expected)")
    return prompts


def check_device(flag, value):
    """'auto', 'cpu', 'cuda' or 'cuda:N' that exists here; anything else fails in one line."""
    if value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        fail(f"{flag} {value!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        fail(f"{flag} {value!r}: only cpu and cuda devices are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"{flag} {value!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        fail(f"{flag} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def validate(args: Args):
    """Every check that needs no model, so that bad input fails in a second, not after loading SD. Each
    message names the flag and the value."""
    def need(ok, flag, value, what):
        if not ok:
            fail(f"--{flag.replace('_', '-')} must be {what} (got {value!r})")

    try:
        rewards_lib.parse_reward_spec(args.reward)
    except rewards_lib.RewardError as e:
        fail(f"--reward: {e}")
    for flag, choices in (("fused_kernel", ("auto", "on", "off")), ("exact_ratio", ("auto", "on", "off")),
                          ("cuda_graphs", ("auto", "on", "all", "off")), ("mixed_precision", ("no", "fp16", "bf16"))):
        need(getattr(args, flag) in choices, flag, getattr(args, flag), " or ".join(choices))
    need(args.eta > 0 and math.isfinite(args.eta), "eta", args.eta,
         "> 0 and finite: at eta = 0 DDIM is deterministic and the policy has no log-likelihood")
    for flag in ("num_steps", "sample_batch_size", "sample_num_batches", "train_batch_size", "num_epochs",
                 "gradient_accumulation_steps", "num_inner_epochs", "stat_buffer_size", "stat_min_count",
                 "save_every", "keep_checkpoints"):
        need(getattr(args, flag) >= 1, flag, getattr(args, flag), ">= 1")
    for flag in ("lora_rank", "train_micro_batch", "image_every"):
        need(getattr(args, flag) >= 0, flag, getattr(args, flag), ">= 0")
    need(args.compile_workers == "auto" or re.fullmatch(r"\d+", args.compile_workers), "compile_workers",
         args.compile_workers, "auto or a number >= 0")
    need(args.compile or args.compile_workers in ("auto", "0"), "compile_workers", args.compile_workers,
         "auto or 0 without --compile (its processes compile --compile's graphs)")
    need(args.resolution is None or args.resolution >= 1, "resolution", args.resolution, ">= 1")
    need(args.num_steps <= 1000, "num_steps", args.num_steps, "<= 1000, the diffusion's training timesteps")
    need(args.stat_min_count <= args.stat_buffer_size, "stat_min_count", args.stat_min_count,
         f"<= --stat-buffer-size {args.stat_buffer_size} (the buffer could never hold that many)")
    need(0 < args.timestep_fraction <= 1, "timestep_fraction", args.timestep_fraction, "in (0, 1]")
    for flag in ("learning_rate", "clip_range", "adam_epsilon"):
        need(0 < getattr(args, flag) < math.inf, flag, getattr(args, flag), "> 0 and finite")
    for flag in ("max_grad_norm", "adv_clip_max"):  # inf: no clipping
        need(getattr(args, flag) > 0, flag, getattr(args, flag), "> 0 (inf for no clipping)")
    need(0 <= args.adam_weight_decay < math.inf, "adam_weight_decay", args.adam_weight_decay, ">= 0 and finite")
    for flag in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(args, flag) < 1, flag, getattr(args, flag), "in [0, 1)")
    need(math.isfinite(args.guidance_scale) and args.guidance_scale >= 0, "guidance_scale", args.guidance_scale,
         ">= 0 and finite")
    need(0 <= args.seed < 2**31, "seed", args.seed, "in [0, 2^31)")
    samples = args.sample_batch_size * args.sample_num_batches
    per_step = args.train_batch_size * args.gradient_accumulation_steps
    if samples % per_step:
        fail(f"samples per epoch (sample_batch_size {args.sample_batch_size} x sample_num_batches "
             f"{args.sample_num_batches} = {samples}) must be divisible by train_batch_size "
             f"{args.train_batch_size} x gradient_accumulation_steps {args.gradient_accumulation_steps} "
             f"= {per_step}")
    need(args.method in METHODS, "method", args.method, " or ".join(METHODS))
    need(0 < args.rwr_beta < math.inf, "rwr_beta", args.rwr_beta, "> 0 and finite")
    need(0 < args.rwr_top_fraction <= 1, "rwr_top_fraction", args.rwr_top_fraction, "in (0, 1]")
    need(args.samples_per_prompt >= 1 and args.sample_batch_size % args.samples_per_prompt == 0,
         "samples_per_prompt", args.samples_per_prompt, f">= 1 and divide --sample-batch-size {args.sample_batch_size}")
    need(not args.global_std or args.samples_per_prompt > 1, "global_std", args.global_std,
         "used with --samples-per-prompt > 1 (it divides group advantages by the epoch's std)")
    need(0 <= args.kl_coef < math.inf, "kl_coef", args.kl_coef, ">= 0 and finite")
    need(args.kl_coef == 0 or args.method in ("ddpo_is", "ddpo_sf"), "kl_coef", args.kl_coef,
         "0 with --method rwr or rwr_sparse (the KL term is on the policy's DDIM step)")
    need(0 <= args.ema_decay < 1, "ema_decay", args.ema_decay, "in [0, 1) (0 = off)")
    need(args.eval_every >= 0, "eval_every", args.eval_every, ">= 0")
    timestep_window(args)
    if args.eval_every and args.eval_prompts is None and args.prompts not in HELD_OUT:
        fail(f"--eval-every needs --eval-prompts with --prompts {args.prompts!r} (held-out sets are known only "
             f"for the built-in {', '.join(HELD_OUT)})")
    check_device("--device", args.device)
    if args.cuda_graphs in ("on", "all"):
        need(not args.gradient_checkpointing, "cuda_graphs", args.cuda_graphs, "off or auto with "
             "--gradient-checkpointing (checkpointing saves the RNG state for its recomputation, which captures "
             "have refused: pytorch#83148)")
        if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
            fail(f"--cuda-graphs {args.cuda_graphs} needs a CUDA device (--device {args.device}"
                 f"{', and CUDA is not available' if args.device == 'auto' else ''})")
    check_device("--reward-device", args.reward_device)
    if args.model != "tiny" and not os.path.isdir(args.model):
        first = args.model.split("/")[0]
        if rewards_lib.looks_like_path(args.model) or (first != args.model and os.path.isdir(first)):
            fail(f"--model {args.model!r}: no such directory")
    if args.resume == "auto" and args.run_dir is None:
        fail("--resume auto needs --run-dir (the run whose latest checkpoint to continue)")
    if args.resume not in (None, "auto"):
        missing = missing_checkpoint_files(args.resume)
        if missing:
            fail(f"--resume {args.resume!r} is not a checkpoint directory (no {' or '.join(missing)})")
    if args.run_dir is not None:
        check_run_dir(Path(args.run_dir), fresh=args.resume is None, overwrite=args.overwrite)
    check_trackers(args)
    prompts = load_prompts(args.prompts) + (load_prompts(args.eval_prompts or HELD_OUT[args.prompts], "--eval-prompts")
                                            if args.eval_every else [])
    if "tiny_alignment" in [name for name, _ in rewards_lib.parse_reward_spec(args.reward)]:
        odd = [p for p in prompts if caption_attributes(p) is None]
        need(not odd, "prompts", args.prompts, f"tiny-world captions for --reward tiny_alignment "
             f"('a red circle on blue'; {odd[0]!r} is not one)" if odd else "")


def check_trackers(args):
    """--wandb and --tensorboard need their (optional) packages: a missing one fails here, not after an epoch."""
    if args.wandb is not None and not args.wandb.strip():
        fail(f"--wandb needs a project name (got {args.wandb!r})")
    for flag, module, package in (("--wandb", "wandb", "wandb"), ("--tensorboard", "torch.utils.tensorboard",
                                                                    "tensorboard")):
        if getattr(args, flag[2:]):
            try:
                __import__(module)
            except ImportError as e:
                fail(f"{flag} needs the {package} package, which does not import ({e}): pip install {package}")


def timestep_window(args):
    """--train-timesteps 'a:b' -> (a, b), or None for the whole trajectory; a bad window fails in one line."""
    if args.train_timesteps is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", args.train_timesteps)
    a, b = (int(match[1]), int(match[2])) if match else (None, None)
    if match is None or not 0 <= a < b <= args.num_steps:
        fail(f"--train-timesteps must be a:b with 0 <= a < b <= --num-steps {args.num_steps} (got "
             f"{args.train_timesteps!r})")
    return a, b


def on_policy_settings(args: Args, log=print) -> Args:
    """DDPO_SF's gradient is unbiased only at the weights that sampled: one optimizer step per epoch and one
    inner epoch. Sets gradient_accumulation_steps (and num_inner_epochs) so, and says so."""
    if args.method != "ddpo_sf":
        return args
    accumulation = args.sample_batch_size * args.sample_num_batches // args.train_batch_size
    if (args.gradient_accumulation_steps, args.num_inner_epochs) != (accumulation, 1):
        log(f"--method ddpo_sf is on-policy: one optimizer step per epoch, so --gradient-accumulation-steps "
            f"{args.gradient_accumulation_steps} -> {accumulation} and --num-inner-epochs {args.num_inner_epochs} -> 1")
    return dataclasses.replace(args, gradient_accumulation_steps=accumulation, num_inner_epochs=1)


def cuda_graphs_mode(args: Args, device: torch.device) -> str:
    """--cuda-graphs: 'all' (the training step's calls and the sampling loop's), 'on' (the training step's),
    'off', as given (validated: CUDA, no --gradient-checkpointing), or for 'auto' where graphs were measured
    to pay: 'all' for LoRA on a CUDA device (README, "On a GPU"), with --compile too (whose blocks' kernels the
    captures record: the fastest epoch measured). Full fine-tuning stays eager under auto: its capture would
    hold a static gradient buffer for every UNet weight (unmeasured)."""
    if args.cuda_graphs != "auto":
        return args.cuda_graphs
    return "all" if device.type == "cuda" and args.lora_rank > 0 and not args.gradient_checkpointing else "off"


def compile_workers(args: Args, device: torch.device, cpus: int, free_bytes: int, per_worker_bytes: int) -> int:
    """--compile-workers as a number: as given, or for 'auto' (with --compile on a CUDA device) one process per 2
    CPU cores, at most 6, and no more than `free_bytes` of GPU memory holds at `per_worker_bytes` each (each
    loads the model). On an H200 host with 16 cores, 6 processes compiled SD's 40 block variants in 74 s
    (README). 0 on the CPU: on 2 cores no faster (inductor's C++ builds keep the cores busy already)."""
    if args.compile_workers != "auto":
        return int(args.compile_workers)
    if not args.compile or device.type != "cuda":
        return 0
    return max(0, min(6, cpus // 2, free_bytes // per_worker_bytes))


def check_run_dir(run_dir: Path, fresh: bool, overwrite: bool):
    """A run directory must be creatable and writable, and belongs to one run: a fresh start in one that
    holds a run (config, metrics or checkpoints) is refused unless --overwrite."""
    if run_dir.exists() and not run_dir.is_dir():
        fail(f"--run-dir {str(run_dir)!r} is a file, not a directory")
    existing = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        fail(f"--run-dir {str(run_dir)!r}: {str(existing)!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--run-dir {str(run_dir)!r}: {str(existing)!r} is not writable")
    held = [name for name in ("config.json", "metrics.jsonl", "checkpoints") if (run_dir / name).exists()]
    if fresh and held and not overwrite:
        fail(f"--run-dir {str(run_dir)!r} already holds a run ({', '.join(held)}): continue it with --resume auto, "
             "choose another --run-dir, or pass --overwrite to replace it")


# ------------------------------------------------------------------------------------------------------
# The run: everything train() needs that is not the algorithm.
# ------------------------------------------------------------------------------------------------------
class Run:
    """Devices, models, optimizer, run directory, resume, reward worker, logging and stopping for train().
    Rank 0 alone prints and writes."""

    def __init__(self, args: Args):
        self.args = args
        self.rank, self.world, device = init_distributed(args.device)  # (0, 1, None) without torchrun
        self.is_main = self.rank == 0
        self.log = print if self.is_main else (lambda *a, **k: None)
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
                else torch.device(args.device)
        self.device = device
        if args.fused_kernel == "on" and not (device.type == "cuda" or kernels.triton_interpreter_on()):
            fail("--fused-kernel on needs a CUDA device, or TRITON_INTERPRET=1 to run the kernels on the CPU")
        if args.compile:  # before anything compiles: inductor fixes its cache directory at its first use
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ddpo_cache_dir() / "inductor"))
        problem = compile_problem(device) if args.compile else ""  # now, not at the first epoch's first UNet call
        if problem:
            fail(f"--compile: torch.compile does not work here ({problem}); without --compile the run does the "
                 "same math")
        # TF32 moves what enters the ratio by about the clip range (README): off unless asked for.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        self.exact_ratio = args.exact_ratio == "on" or (
            args.exact_ratio == "auto" and (args.mixed_precision != "no" or (args.tf32 and device.type == "cuda")))
        graphs = cuda_graphs_mode(args, device)
        self.cuda_graphs, self.sampling_graphs = graphs != "off", graphs == "all"  # 'all': the sampling calls too

        # Run directory and checkpoint: rank 0 decides, every rank follows.
        slug = re.sub(r"[^\w.-]+", "_", args.reward)  # "aesthetic=1,mod:fn" -> "aesthetic_1_mod_fn"
        run_dir = Path(args.run_dir or f"runs/{slug}-{time.strftime('%Y%m%d-%H%M%S')}")
        if self.is_main and args.overwrite and args.resume is None:
            clear_run_dir(run_dir)
        checkpoint, state = find_checkpoint(args, run_dir, self.log) if self.is_main else (None, None)
        self.run_dir, checkpoint = all_gather_objects((run_dir, checkpoint))[0]
        if checkpoint is not None and not self.is_main:
            state = read_checkpoint(checkpoint)
        if state is not None and state["next_epoch"] >= args.num_epochs:
            self.log(f"{checkpoint} has trained {state['next_epoch']} epochs already, --num-epochs is "
                     f"{args.num_epochs}: nothing to do (raise --num-epochs to train on)")
            raise SystemExit(0)
        self.trackers = Trackers(args, self.run_dir, self.is_main)  # --wandb: W&B before any model loads
        self.prompts = load_prompts(args.prompts)
        # Reward models load now, so that a missing one fails before the policy loads.
        self.reward_fn = build_reward(args, device if args.reward_device == "auto" else torch.device(args.reward_device))
        self.dtype, self.autocast = precision(args, device, cache=not self.cuda_graphs)  # graphs need no cache

        random.seed(args.seed)
        torch.manual_seed(args.seed)  # the same on every rank: LoRA's random init must agree
        rank_seed = args.seed + 1000 * self.rank  # each process its own prompts, noise and shuffles
        self.np_rng = np.random.default_rng(rank_seed)  # prompts, control shuffles
        self.sample_gen = torch.Generator(device).manual_seed(rank_seed)  # sampling noise
        self.train_gen = torch.Generator().manual_seed(rank_seed + 1)  # training shuffles

        if args.model == "tiny" and self.world > 1:  # one process pretrains (once, cached); the others wait
            if self.is_main:
                tiny_pretrained_path(seed=0, log=self.log)
                tiny_classifier(log=self.log)
            torch.distributed.barrier()
        self.pipe = pipe = load_pipeline(args, device, self.dtype, self.log)
        if args.num_steps > pipe.scheduler.config.num_train_timesteps:
            fail(f"--num-steps {args.num_steps} exceeds the model's {pipe.scheduler.config.num_train_timesteps} "
                 "diffusion timesteps")
        if args.offload_frozen:
            pipe.vae.to("cpu"), pipe.text_encoder.to("cpu")
        self.unet = pipe.unet
        select_unet_kernels(self.unet, device)
        self.params = setup_trainable(self.unet, args)  # fp32 trainable weights (LoRA or all), frozen ones in dtype
        self.timer = ModelTimer(device)
        self.latent_shape = latent_shape_of(pipe, args.resolution)
        self.uncond_embeds = self.encode([""])  # (1, L, D), the empty prompt of CFG
        if args.compile:
            self.compile_unet()
        # The UNet of the training step's calls: the UNet itself, or its CUDA-graph replays (--cuda-graphs).
        self.train_unet = GraphedUNet(self.unet, self.autocast, sampling=self.sampling_graphs) \
            if self.cuda_graphs else self.unet
        self.sample_unet = self.train_unet if self.sampling_graphs else self.unet  # the sampling loop's
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        # A stop saves the epoch's starting state only while the weights still hold it: until the epoch's first
        # optimizer step begins (one stopped halfway may have moved some weights and not others).
        self.optimizer.register_step_pre_hook(lambda *_: setattr(self, "updated", True))
        self.tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count)
        # The KL reference (before restore: it is the initial model) and the EMA of the trainable weights.
        self.reference = reference_model(self.unet, args) if args.kl_coef > 0 else None
        self.ema = [p.detach().clone() for p in self.params] if args.ema_decay > 0 else None
        self.window, self.flat_group_fraction = timestep_window(args), None
        self.eval_prompts = load_prompts(args.eval_prompts or HELD_OUT[args.prompts], "--eval-prompts") \
            if args.eval_every else None
        # Tiny runs on the tiny world's captions log every image's alignment and diversity beside the reward
        # (reward_info/alignment, eval/alignment, ...): optimising a reward can cost what the prompt asked for.
        captions = self.prompts + (self.eval_prompts or [])
        self.monitor = tiny_monitor() if args.model == "tiny" and args.resolution in (None, 32) and \
            all(map(caption_attributes, captions)) else None  # (its classifier reads the tiny model's 32 px images)
        self.start_epoch, self.global_step = 0, 0
        if state is not None:
            self.restore(checkpoint, state)
        pipe.scheduler.set_timesteps(args.num_steps, device=device)
        # --fused-kernel: Triton compiles the kernels now (it needs a C compiler), not after the first sampling
        self.fused = use_fused_kernels(args.fused_kernel, device, self.log, lambda: fused_kernel_problem(
            pipe.scheduler, self.latent_shape, args.guidance_scale, args.eta, device))
        warn_truncated_prompts(pipe.tokenizer, self.prompts, self.log)

        if self.is_main:
            (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(
                json.dumps({**dataclasses.asdict(args), "world_size": self.world,
                            "resolution_used": self.latent_shape[1] * vae_factor(pipe)}, indent=2))
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl", self.start_epoch, self.is_main, self.log)
        self.trackers.start(self.global_step, self.metrics.records)  # --tensorboard
        self.metrics.mirror = self.trackers.log  # every record from here on, to W&B and TensorBoard
        self.reward_worker = RewardWorker(self.reward_fn, args.reward, self.monitor, one_thread=device.type == "cpu")
        self.saved_epoch, self.epoch, self.updated = self.start_epoch, None, False
        self.epoch_start, self.times, self.epoch_seconds = None, {}, deque(maxlen=5)
        self.warned_ratio = False
        self.log(f"ddpo: {args.model} | reward {args.reward} | {args.sample_batch_size * args.sample_num_batches} "
                 f"samples/epoch x {self.world} process(es) | {args.num_epochs} epoch{'s' * (args.num_epochs != 1)} | "
                 f"{f'LoRA rank {args.lora_rank}' if args.lora_rank else 'full fine-tuning'} | {device} "
                 f"{'fp32' if args.mixed_precision == 'no' else args.mixed_precision}"
                 f"{' exact-ratio' if self.exact_ratio else ''}"
                 f"{' cuda-graphs' if self.cuda_graphs else ''}{' all' if self.sampling_graphs else ''} | "
                 f"{self.run_dir}")
        note = cpu_note(device, args.device, self.unet)
        if note:
            self.log(note)
        if args.compile:  # minutes without a line of output otherwise (README, "A seventh H200 machine")
            self.log("--compile: the first epoch compiles each block variant the run uses, or loads it from inductor's "
                     "cache (at SD scale on an H200 with cold caches: 4-4.5 minutes of compiling in the first epoch "
                     "alone, about 2 minutes in all with 6 --compile-workers), later epochs nothing; inductor's "
                     f"cache, which later runs and resumes reuse: {os.environ['TORCHINDUCTOR_CACHE_DIR']} "
                     "(TORCHINDUCTOR_CACHE_DIR)")

    # --- models ---
    def compile_unet(self):
        """--compile: the UNet's blocks compiled in place (compile_blocks), after --compile-workers processes have
        compiled their graphs into inductor's cache (precompile_blocks, from one call of each kind an epoch makes)."""
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
        # A process's share, budgeted (not measured): 3x the UNet's weights (the pipeline it loads, whose text encoder
        # and VAE add a quarter at SD scale, and what compiling allocates) and 1 GiB of CUDA context.
        per_worker = 3 * sum(p.numel() * p.element_size() for p in self.unet.parameters()) + 2**30
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(all_gather_objects(compile_workers(self.args, self.device, cpus, free, per_worker)))  # all agree
        if workers > 0:
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # once per node: the cache is on its disk
                precompile_blocks(self.args, self.device, self.unet, self.epoch_calls, workers, self.log)
            if self.world > 1:
                torch.distributed.barrier()
        compile_blocks(self.unet, static=workers > 0)

    def epoch_calls(self):
        """One UNet call of each kind an epoch makes, on zeros of its shapes (precompile_blocks' probe): sampling
        (eval mode, no autograd; the evaluation's too), a training micro-batch with its backward (the re-score's
        forward is the same), the step's shorter last micro-batch if it has one, and with --kl-coef and LoRA the
        reference's forward (adapters off). (Full fine-tuning's KL reference, a copy, compiles in the first epoch.)"""
        args, rwr = self.args, self.args.method in ("rwr", "rwr_sparse")

        def call(rows, guidance_scale):  # (rows, C, h, w) latents, (rows,) timesteps, (rows, L, D) embeddings
            x = torch.zeros(rows, *self.latent_shape, device=self.device)
            t = torch.zeros(rows, dtype=torch.long, device=self.device)
            uncond = self.uncond_embeds.expand(rows, -1, -1)
            with self.autocast():
                eps = predict_noise(self.unet, x, t, uncond.contiguous(), uncond, guidance_scale)
            return [e.float().sum() for e in eps if e is not None]

        self.unet.eval()
        with torch.no_grad():
            call(args.sample_batch_size, args.guidance_scale)
        self.unet.train()
        plan = training_plan(args.sample_batch_size * args.sample_num_batches, args.num_steps, args.train_batch_size,
                             args.gradient_accumulation_steps, args.timestep_fraction,
                             args.train_micro_batch or args.train_batch_size, torch.Generator(), timestep_window(args))
        guidance_scale = 1.0 if rwr else args.guidance_scale  # RWR's denoising loss calls the UNet unguided
        for rows in sorted({len(i) for micro_batches in plan for i, _ in micro_batches}):  # the micro-batch sizes
            torch.autograd.backward(call(rows, guidance_scale))
            if args.kl_coef > 0 and args.lora_rank > 0 and not rwr:
                with torch.no_grad(), reference_model(self.unet, args)():
                    call(rows, guidance_scale)
        self.unet.zero_grad(set_to_none=True)  # the backwards' gradients, in no optimizer step

    def offloaded(self, module):
        return on_device(module, self.device) if self.args.offload_frozen else contextlib.nullcontext()

    def encode(self, prompts):
        with self.timer(), self.offloaded(self.pipe.text_encoder):
            return encode_prompts(self.pipe, prompts).to(self.device)

    def decode(self, latents):
        with self.timer(), self.offloaded(self.pipe.vae):
            return decode_images(self.pipe.vae, latents, self.autocast)

    def draw_prompts(self, n, k=1):
        """n prompts: n / k drawn at random, each repeated k times in a row."""
        return [self.prompts[i] for i in self.np_rng.integers(len(self.prompts), size=n // k) for _ in range(k)]

    def progress(self, iterable, desc):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, disable=not self.is_main)

    def restore(self, checkpoint, state):
        """Weights, optimizer, scaler, stat tracker, RNG states, epoch and step from a checkpoint. The
        optimizer's hyperparameters are this run's flags (e.g. a lower --learning-rate on resume)."""
        load_trainable_weights(checkpoint, self.unet, self.args, state)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group.update(lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                         weight_decay=self.args.adam_weight_decay, eps=self.args.adam_epsilon)
        self.scaler.load_state_dict(state["scaler"])
        self.tracker.load_state_dict(state["tracker"])
        if self.ema is not None and state.get("ema") is not None:  # else the EMA starts from the weights
            torch._foreach_copy_(self.ema, [t.to(self.device) for t in state["ema"]])
        if len(state["rng"]) != self.world:
            fail(f"cannot resume from {checkpoint}: it was written by {len(state['rng'])} process(es), this run "
                 f"has {self.world}; the batch arithmetic and every process's random state depend on it")
        set_rng_state(state["rng"][self.rank], self.np_rng, self.sample_gen, self.train_gen)
        self.start_epoch, self.global_step = state["next_epoch"], state["global_step"]
        self.log(f"resumed from {checkpoint} at epoch {self.start_epoch}, step {self.global_step}")

    # --- the epoch's phases ---
    def begin_epoch(self, epoch):
        # What a stop before the epoch's first update saves (stop_guard): the RNG states and the stat tracker
        # as they are now (the tracker takes the epoch's rewards before training starts).
        self.epoch_start = {"rngs": all_gather_objects(rng_state(self.np_rng, self.sample_gen, self.train_gen)),
                            "tracker": self.tracker.state_dict()}
        self.epoch, self.updated = epoch, False
        self.times, self.step_metrics, self.ratio_dev_onpolicy = {"start": time.perf_counter()}, [], None
        if self.args.eval_every and epoch % self.args.eval_every == 0:
            self.evaluate(epoch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # mem/peak_gb is this epoch's
        self.mark("start")

    def evaluate(self, epoch):
        """Held-out evaluation: the eval prompts, cycled to one epoch's number of images, from the same noise
        every time (and in every run), with the EMA weights if any. Every process renders the same images
        (no communication); rank 0 logs eval/* and writes images/eval_<epoch>.png. Returns (images, rewards)."""
        args, n = self.args, self.args.sample_batch_size * self.args.sample_num_batches
        prompts = [self.eval_prompts[i % len(self.eval_prompts)] for i in range(n)]
        generator = torch.Generator(self.device).manual_seed(EVAL_SEED)
        images, scores, infos = [], [], {}
        self.unet.eval()
        with swapped_weights(self.params, self.ema):
            for first in range(0, n, args.sample_batch_size):
                chunk = prompts[first:first + args.sample_batch_size]
                latents, _ = sample_trajectories(self.sample_unet, self.pipe.scheduler, self.encode(chunk),
                                                 self.uncond_embeds.expand(len(chunk), -1, -1), self.latent_shape,
                                                 args.guidance_scale, args.eta, generator, self.autocast)
                images.append(self.decode(latents[:, -1]))
                try:
                    score, info = score_batch(self.reward_fn, images[-1], chunk, args.reward, self.monitor)
                except rewards_lib.RewardError as e:
                    raise RunStopped(f"evaluation: {e}") from None
                scores.append(score)
                for k, v in info.items():
                    infos.setdefault(k, []).extend(v)
        images, rewards = torch.cat(images), torch.cat(scores)
        self.timer.total()  # drop evaluation's model time: time/model_s is the epoch's
        self.metrics.write({"epoch": epoch, "step": self.global_step, "eval/reward_mean": rewards.mean().item(),
                            "eval/reward_std": rewards.std(unbiased=False).item(),
                            **{f"eval/{k}": float(np.mean(v)) for k, v in infos.items()
                               if all(isinstance(x, (int, float)) for x in v)}})
        if self.is_main:
            self.save_grid("eval", epoch, images, prompts, rewards.tolist(), infos)
        self.log(f"eval  {epoch:4d} | reward {rewards.mean().item():+.4f} ± {rewards.std(unbiased=False).item():.4f}"
                 f" | {len(prompts)} images of {len(self.eval_prompts)} held-out prompts{' (EMA)' if self.ema else ''}")
        return images, rewards

    def finish(self):
        """After the last epoch: the final evaluation (if any) and curves.png."""
        if self.args.eval_every and self.epoch is not None:
            self.evaluate(self.args.num_epochs)
        if self.is_main:
            plot_curves(self.metrics.records, self.run_dir / "curves.png")

    def mark(self, phase):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the phase's kernels are done: its time is theirs
        self.times[phase] = time.perf_counter()

    def gather_rewards(self, batches):
        """(all prompts, rewards float32 (N_all,), infos) over every process, in rank order. A reward error on
        any process stops every process (none is left waiting in a collective)."""
        prompts = [p for b in batches for p in b["prompts"]]
        scores, infos, error = [], {}, None
        try:
            for b in batches:
                score, info = b["reward"].result()
                scores.append(score)
                for k, v in info.items():
                    infos.setdefault(k, []).extend(v)
        except rewards_lib.RewardError as e:
            error = str(e)
        gathered = all_gather_objects({"prompts": prompts, "scores": None if error else torch.cat(scores).tolist(),
                                       "infos": infos, "error": error})
        errors = [g["error"] for g in gathered if g["error"]]
        if errors:
            raise RunStopped(errors[0])
        all_prompts = [p for g in gathered for p in g["prompts"]]
        rewards = torch.tensor([r for g in gathered for r in g["scores"]], dtype=torch.float32)
        return all_prompts, rewards, {k: [x for g in gathered for x in g["infos"][k]] for k in infos}

    def save_samples_grid(self, batches, rewards, infos):
        """Every --image-every epochs, the grid of the epoch's first sampling batch with its rewards."""
        epoch, args = self.epoch, self.args
        if self.is_main and args.image_every and epoch % args.image_every == 0:
            n = len(batches[0]["prompts"])
            self.save_grid("epoch", epoch, batches[0]["images"], batches[0]["prompts"], rewards[:n].tolist(),
                           {k: v[:n] for k, v in infos.items()})

    def save_grid(self, kind, epoch, images, prompts, scores, infos):
        """images/<kind>_<epoch>.png (+ .json), and to the trackers as images/train or images/eval."""
        path = self.run_dir / "images" / f"{kind}_{epoch:04d}.png"
        save_image_grid(path, images, prompts, scores, infos)
        self.trackers.image("images/eval" if kind == "eval" else "images/train", path, epoch, self.global_step)

    def log_step(self, epoch, sums):
        """One optimizer step's metrics (over every process's pairs), one host sync. A non-finite loss,
        gradient norm or weight stops the run here, before it is logged or saved."""
        if distributed():
            torch.distributed.all_reduce(sums[:5])
            torch.distributed.all_reduce(sums[5:6], op=torch.distributed.ReduceOp.MAX)
        finite_weights = torch.isfinite(torch.stack(torch._foreach_norm(self.params))).all()
        loss_sum, kl_sum, clipped, count, kl_ref_sum, deviation, grad_norm, weights_ok = \
            torch.cat([sums, finite_weights.float().reshape(1).to(sums.device)]).tolist()
        self.global_step += 1
        self.updated = True  # (also after a step the fp16 scaler skipped: the scale, EMA and step count moved)
        grad_skipped = self.scaler.is_enabled() and not math.isfinite(grad_norm)  # fp16: the scaler skips the step
        if not (math.isfinite(loss_sum) and (math.isfinite(grad_norm) or grad_skipped) and weights_ok):
            what = "loss" if not math.isfinite(loss_sum) else "gradient norm" if weights_ok else "weights"
            raise RunStopped(f"diverged: the {what} became non-finite at epoch {epoch}, step {self.global_step} "
                             f"(loss {loss_sum / count}, gradient norm {grad_norm}); nothing of it was saved. "
                             "Lower --learning-rate, or check --guidance-scale and the reward")
        policy = self.args.method in ("ddpo_is", "ddpo_sf")  # RWR has no log p, hence no ratio
        if self.ratio_dev_onpolicy is None and policy:
            self.ratio_dev_onpolicy = deviation
        metrics = {"train/loss": loss_sum / count, "train/approx_kl": kl_sum / count if policy else None,
                   "train/clipfrac": clipped / count if policy else None,
                   "train/ratio_dev_max": deviation if policy else None,
                   "train/kl_ref": kl_ref_sum / count if self.args.kl_coef > 0 else None,
                   "train/grad_norm": None if grad_skipped else grad_norm, "train/lr": self.optimizer.param_groups[0]["lr"]}
        self.step_metrics.append(metrics)
        self.metrics.write({"epoch": epoch, "step": self.global_step, **metrics})

    def end_epoch(self, epoch, rewards, infos):
        args, t = self.args, self.times
        self.mark("end")
        t_end = t["end"]
        record = {"epoch": epoch, "step": self.global_step,
                  "reward/mean": rewards.mean().item(), "reward/std": rewards.std(unbiased=False).item(),
                  "reward/min": rewards.min().item(), "reward/max": rewards.max().item(),
                  "train/ratio_dev_onpolicy": self.ratio_dev_onpolicy,
                  **{f"reward_info/{k}": float(np.mean(v)) for k, v in infos.items()
                     if all(isinstance(x, (int, float)) for x in v)},  # strings go to images/*.json
                  **{f"{k}_epoch_mean": mean_of_numbers([m[k] for m in self.step_metrics]) for k in
                     ("train/loss", "train/approx_kl", "train/clipfrac", "train/kl_ref", "train/grad_norm")},
                  "train/flat_group_fraction": self.flat_group_fraction,
                  "time/epoch_s": t_end - t["start"], "time/sample_s": t["sampled"] - t["start"],
                  "time/reward_wait_s": t["rewarded"] - t["sampled"], "time/train_s": t_end - t["rewarded"],
                  "time/rescore_s": t["rescored"] - t["rescoring"],  # part of train_s: exact-ratio re-scoring
                  "mem/peak_gb": torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None,
                  "time/model_s": self.timer.total(), "samples_per_s": len(rewards) / (t_end - t["start"])}
        self.metrics.write(record)
        shown = {"align {:+.2f}": "reward_info/alignment", "kl {:.2e}": "train/approx_kl_epoch_mean", "clipfrac {:.3f}": "train/clipfrac_epoch_mean",
                 "kl_ref {:.2e}": "train/kl_ref_epoch_mean", "ratio-1 on-policy {:.1e}": "train/ratio_dev_onpolicy"}
        self.epoch_seconds.append(record["time/epoch_s"])
        left = args.num_epochs - epoch - 1  # the median of the last 5 epochs: the first may compile, some evaluate
        eta = [f"eta {duration_text(left * float(np.median(self.epoch_seconds)))}"] if left else []
        self.log(" | ".join([f"epoch {epoch:4d}", f"reward {record['reward/mean']:+.4f} ± {record['reward/std']:.4f}",
                             *[f.format(record[k]) for f, k in shown.items() if record.get(k) is not None],
                             f"{record['time/epoch_s']:.1f}s", *eta]))
        if args.method == "ddpo_is" and self.ratio_dev_onpolicy > 0.1 * args.clip_range and not self.warned_ratio:
            self.warned_ratio = True
            self.log(f"warning: on-policy |ratio - 1| = {self.ratio_dev_onpolicy:.2e} exceeds 0.1 x --clip-range "
                     f"{args.clip_range:g}: numerical noise, not learning, is moving the clipped objective. Use "
                     "--exact-ratio on (re-scores the samples with the training forward)")
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.num_epochs:
            self.save(epoch + 1, all_gather_objects(rng_state(self.np_rng, self.sample_gen, self.train_gen)),
                      self.tracker.state_dict())

    def save(self, next_epoch, rngs, tracker):
        if self.is_main:  # the others go on; they wait for rank 0 at the next epoch's gather
            state = {"next_epoch": next_epoch, "global_step": self.global_step,
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "tracker": tracker, "rng": rngs,
                     "ema": None if self.ema is None else [t.detach().cpu().clone() for t in self.ema]}
            save_checkpoint(self.run_dir, next_epoch, self.unet, state, self.args, self.log)
            plot_curves(self.metrics.records, self.run_dir / "curves.png")
        self.saved_epoch = next_epoch

    @contextlib.contextmanager
    def stop_guard(self):
        """Whatever stops the run ends it with a line naming the epoch and the latest checkpoint: one line and a
        non-zero exit for a reward, divergence, a full disk, Ctrl-C, SIGTERM or running out of memory; for any
        other exception (a bug) the line, then its traceback. Before the epoch's first optimizer step its starting
        state is saved first, so no finished epoch is lost."""
        previous = signal.signal(signal.SIGTERM, raise_interrupt) if threading.current_thread() is \
            threading.main_thread() else None
        finished = False
        try:
            yield
            finished = True
        except (KeyboardInterrupt, Exception) as e:  # not SystemExit: fail() has said what to fix
            if out_of_memory(e):
                traceback.clear_frames(e.__traceback__)  # free the failed call's tensors before saving
            reason, one_line = self.stop_reason(e)
            if self.epoch is not None and not self.updated and self.epoch > self.saved_epoch:
                try:
                    self.save(self.epoch, **self.epoch_start)
                except RunStopped as save_error:  # the disk
                    reason += f"; {save_error}"
                except Exception as save_error:  # e.g. a device left unusable by what stopped the run
                    reason += f"; its starting state could not be saved ({rewards_lib.first_line(save_error)})"
            latest = list_checkpoints(self.run_dir)
            message = f"ddpo.py: stopped at epoch {self.epoch}: {reason}. " + (
                f"latest checkpoint: {latest[-1]}" if latest else "no checkpoint was written")
            if isinstance(e, KeyboardInterrupt):
                print(message, file=sys.stderr)
                raise SystemExit(143 if str(e) == "SIGTERM" else 130) from None  # 128 + the signal, as shells report
            if one_line:
                raise SystemExit(message) from None  # printed to stderr, exit status 1, like fail()
            print(message, file=sys.stderr)
            raise  # a bug: its traceback follows
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.reward_worker.close()
            self.metrics.close()
            self.trackers.close(failed=not finished)
            if distributed():
                torch.distributed.destroy_process_group()

    def stop_reason(self, error):
        """(what stopped the run, in words; whether that one line says it all, or a traceback must follow: a bug).
        Out of memory: torch's own first line (what was asked, what is free), and the flags that lower the peak
        of the phase that ran out."""
        args = self.args
        if isinstance(error, (RunStopped, KeyboardInterrupt)):
            return (str(error) if isinstance(error, RunStopped) else f"interrupted ({str(error) or 'SIGINT'})"), True
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):  # metrics, images
            return f"could not write {error.filename or 'a file'} ({error.strerror})", True
        if not out_of_memory(error):
            return f"{type(error).__name__}: {rewards_lib.first_line(error)} (traceback below)", False
        why, micro = rewards_lib.first_line(error), args.train_micro_batch or args.train_batch_size
        if "rewarded" in self.times and "end" not in self.times:
            return (f"out of memory while training ({why}). Fewer (sample, timestep) pairs per UNet call lower the "
                    f"peak: --train-micro-batch (now {micro}), or --gradient-checkpointing, --offload-frozen"), True
        return (f"out of memory while sampling ({why}). Fewer images per UNet call lower the peak: --sample-batch-size "
                f"(now {args.sample_batch_size}; --sample-num-batches keeps the epoch's samples), or "
                "--offload-frozen"), True


def out_of_memory(error):
    """torch's out-of-memory error (CUDA), its CPU allocator's (a RuntimeError), or Python's MemoryError."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error))


def duration_text(seconds):
    """45 -> '45s', 192 -> '3m12s', 3840 -> '1h04m': a run's remaining time at a glance."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def mean_of_numbers(values):
    """The mean of the values that are numbers (None: a step the fp16 scaler skipped), or None."""
    numbers = [v for v in values if v is not None]
    return float(np.mean(numbers)) if numbers else None


def raise_interrupt(signum, frame):
    """SIGTERM (what `timeout`, `kill` and job schedulers send) stops the run like Ctrl-C."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def clear_run_dir(run_dir):
    """--overwrite: delete what a previous run left in run_dir (its config, metrics, images, checkpoints and
    tracker files: a new W&B run, TensorBoard events from step 1)."""
    for name in ("metrics.jsonl", "config.json", "checkpoints", "images", "tensorboard", "wandb", "wandb_id"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def find_checkpoint(args, run_dir, log):
    """(checkpoint, its trainer state) to resume from, or (None, None) for a fresh start. --resume auto takes
    the latest checkpoint that reads back, skipping damaged ones with one line each."""
    if args.resume is None:
        return None, None
    candidates = list_checkpoints(run_dir)[::-1] if args.resume == "auto" else [Path(args.resume)]
    for checkpoint in candidates:
        check_resumable(checkpoint, args)
        try:
            return checkpoint, read_checkpoint(checkpoint)
        except RunStopped as e:
            if args.resume != "auto":
                fail(str(e))
            log(f"skipping {checkpoint}: {e}")
    return None, None


# ------------------------------------------------------------------------------------------------------
# Rewards: scored in a worker thread while the next batch samples; every result checked.
# ------------------------------------------------------------------------------------------------------
class RewardWorker:
    """One daemon thread that runs the reward on each batch in order; submit() returns a Future. A daemon
    thread, so that Ctrl-C or SIGTERM during a reward that hangs ends the process at once. With a CPU policy
    (one_thread) its own torch ops run on one thread: a second OpenMP team competing for the same cores slows
    sampling (README). With a GPU policy it leaves torch's thread count alone: torch.compile guards on it,
    and the change recompiled every compiled block (measured on an H200: the first epoch of --compile
    took 222 s with it, and the recompiles were gone without it)."""

    def __init__(self, reward_fn, name, monitor=None, one_thread=True):
        import queue

        self.reward_fn, self.name, self.monitor, self.jobs = reward_fn, name, monitor, queue.Queue()
        threading.Thread(target=self._work, args=(one_thread,), daemon=True, name="reward").start()

    def _work(self, one_thread):
        if one_thread:
            torch.set_num_threads(1)
        while (job := self.jobs.get()) is not None:
            future, images, prompts = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(score_batch(self.reward_fn, images, prompts, self.name, self.monitor))
                except BaseException as e:
                    future.set_exception(e)

    def submit(self, images, prompts) -> Future:
        future = Future()
        self.jobs.put((future, images, prompts))
        return future

    def close(self):
        self.jobs.put(None)


def score_batch(reward_fn, images, prompts, name, monitor=None):
    """One batch through the reward: (scores float32 (B,), info), the contract checked for the scores and
    for every extra (a list of B numbers or strings, numbers finite). Any failure becomes a RewardError
    naming the reward, so the loop can keep its checkpoint (images holding NaN are refused first, so that the
    sampling, not the reward, is blamed). `monitor(images, prompts)` (tiny runs: see tiny_monitor) adds its own
    per-image numbers to info."""
    broken = (~torch.isfinite(images.flatten(1))).any(1).nonzero().flatten().tolist()  # before the reward sees them
    if broken:
        raise rewards_lib.RewardError(
            f"sampling produced images with NaN or inf ({len(broken)} of {len(images)}, the first for prompt "
            f"{prompts[broken[0]]!r}), before reward {name!r} scored them: the UNet's outputs overflowed (fp16's range "
            "ends at 65504: try --mixed-precision bf16) or the model diverged (lower --learning-rate)")
    try:
        result = reward_fn(images, prompts)
    except rewards_lib.RewardError:
        raise
    except Exception as e:  # a bug in the reward: show where, then stop cleanly
        if out_of_memory(e):  # its models share a device with the policy's
            raise rewards_lib.RewardError(f"reward {name!r} ran out of memory ({rewards_lib.first_line(e)}); "
                                          "--reward-device puts its models on another device (cuda:N or cpu)") from None
        traceback.print_exc()
        raise rewards_lib.RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from None
    scores, info = result if isinstance(result, tuple) and len(result) == 2 else (result, {})
    scores = rewards_lib.check_scores(scores, prompts, name)
    if not isinstance(info, dict):
        raise rewards_lib.RewardError(f"reward {name!r}: info must be a dict, got {type(info).__name__}")
    checked = {}
    for key, values in info.items():
        values = values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else values
        if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
            raise rewards_lib.RewardError(f"reward {name!r}: info[{key!r}] must be a list of {len(prompts)} "
                                          f"entries (one per image), got {type(values).__name__}"
                                          f"{f' of {len(values)}' if hasattr(values, '__len__') else ''}")
        values = [v.item() if isinstance(v, (np.generic, np.ndarray, torch.Tensor)) and np.prod(v.shape) == 1 else v
                  for v in values]
        for i, v in enumerate(values):
            if not isinstance(v, (bool, int, float, str)) or (isinstance(v, float) and not math.isfinite(v)):
                raise rewards_lib.RewardError(f"reward {name!r}: info[{key!r}][{i}] is {str(v)[:60]!r} "
                                              f"({type(v).__name__}); extras must be finite numbers or strings")
        checked[key] = values
    return scores, {**checked, **(monitor(images, prompts) if monitor else {})}


def build_reward(args, device):
    """rewards.get_reward_fn with the model flags that were given; a clear error if a model is missing."""
    options = {k: v for k, v in dict(clip_model=args.clip_model, head=args.aesthetic_head, vlm_model=args.vlm_model,
                                     bertscore_model=args.bertscore_model,
                                     bertscore_layer=args.bertscore_layer).items() if v is not None}
    try:
        return rewards_lib.get_reward_fn(args.reward, device=device, **options)
    except rewards_lib.RewardError as e:
        fail(str(e))


# ------------------------------------------------------------------------------------------------------
# Several processes (torchrun): detected from the environment. Each process samples and trains on its own
# trajectories; rewards are gathered so that advantages come from the global epoch batch; gradients are
# averaged once per optimizer step; rank 0 alone writes. Without torchrun all of this is a no-op.
# ------------------------------------------------------------------------------------------------------
def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(device_arg):
    """(rank, world_size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, None
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not distributed():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def all_gather_objects(obj):
    """[obj of rank 0, ..., obj of the last rank] on every rank; [obj] in a single process."""
    if not distributed():
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def average_gradients(params):
    """Mean gradient over all processes, once per optimizer step (after all accumulation micro-steps)."""
    if not distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    handles = [torch.distributed.all_reduce(p.grad, async_op=True) for p in params]  # in flight together
    for handle in handles:
        handle.wait()
    for p in params:
        p.grad /= torch.distributed.get_world_size()


# ------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary directory and renamed, so a crash mid-write never costs the
# previous one. A checkpoint named epoch_K resumes at epoch K with the exact state of a run that got there
# without stopping (weights, optimizer, stat tracker, every RNG).
# ------------------------------------------------------------------------------------------------------
RESUME_KEYS = ("model", "lora_rank", "resolution", "num_steps", "sample_batch_size", "sample_num_batches",
               "train_batch_size", "gradient_accumulation_steps", "stat_buffer_size", "stat_min_count",
               "seed")  # change these and the saved state means something else


def trainable_state(unet):
    return {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir, next_epoch, unet, state, args, log=print):
    from diffusers import StableDiffusionPipeline

    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"epoch_{next_epoch:04d}", root / f"epoch_{next_epoch:04d}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if args.lora_rank > 0:  # diffusers' LoRA format: pipeline.load_lora_weights(dir) loads it
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora, safe_serialization=True)
            state = {**state, "trainable": trainable_state(unet)}
        else:
            unet.save_pretrained(tmp / "unet")
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException as e:  # nothing half-written stays; the previous checkpoint is kept
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, quota, permissions: say so
            raise RunStopped(f"could not write checkpoint {final} ({e.strerror or e})") from None
        raise
    for old in list_checkpoints(run_dir)[:-args.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log(f"saved checkpoint {final}")


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, oldest first, by epoch number (epoch_10000 after epoch_9999)."""
    root = Path(run_dir) / "checkpoints"
    done = [p for p in root.glob("epoch_*") if re.fullmatch(r"epoch_\d+", p.name) and (p / "trainer_state.pt").exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def check_resumable(checkpoint, args):
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError) as e:
        fail(f"cannot resume from {checkpoint}: its config.json does not read ({e})")
    changed = [f"{k} {saved.get(k)!r} -> {getattr(args, k)!r}" for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
    if changed:
        fail(f"cannot resume from {checkpoint}: the run changed {'; '.join(changed)}. Resume with the "
             "original settings or start a new --run-dir")


def missing_checkpoint_files(path):
    """The files of a checkpoint directory that `path` lacks (none: it is one)."""
    return [f for f in ("config.json", "trainer_state.pt") if not (Path(path) / f).is_file()]


def read_checkpoint(checkpoint):
    """The checkpoint's trainer state, or RunStopped if it is damaged: the state file does not load, or (full
    fine-tuning) a weights file of unet/ is cut short (safetensors checks its header against the file's size,
    without reading the weights)."""
    from safetensors import safe_open

    name = "trainer_state.pt"
    try:
        state = torch.load(Path(checkpoint) / name, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "next_epoch" not in state:
            raise ValueError("not a ddpo.py trainer state")
        for path in sorted((Path(checkpoint) / "unet").glob("*.safetensors")):
            name = f"unet/{path.name}"
            with safe_open(path, "pt"):
                pass
    except Exception as e:
        raise RunStopped(f"checkpoint {checkpoint} is damaged: {name} does not load "
                         f"({rewards_lib.first_line(e)})") from None
    return state


def load_trainable_weights(checkpoint, unet, args, state):
    if args.lora_rank > 0:
        weights = state.pop("trainable")
    else:
        from diffusers import UNet2DConditionModel

        try:
            weights = UNet2DConditionModel.from_pretrained(Path(checkpoint) / "unet").state_dict()
        except Exception as e:
            fail(f"checkpoint {checkpoint} is damaged: its unet/ does not load ({rewards_lib.first_line(e)})")
    missing = set(trainable_state(unet)) - set(weights)
    if missing:
        fail(f"checkpoint {checkpoint} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name in weights:
                p.copy_(weights[name])


def load_checkpoint(checkpoint, unet, args):
    """Load a checkpoint's trainable weights into `unet` (set up by setup_trainable); returns its state."""
    state = read_checkpoint(checkpoint)
    load_trainable_weights(checkpoint, unet, args, state)
    return state


def rng_state(np_rng, sample_gen, train_gen):
    return {"python": random.getstate(), "numpy": np_rng.bit_generator.state, "torch": torch.get_rng_state(),
            "sample_gen": sample_gen.get_state(), "train_gen": train_gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state, np_rng, sample_gen, train_gen):
    random.setstate(state["python"])
    np_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    sample_gen.set_state(state["sample_gen"])
    train_gen.set_state(state["train_gen"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------
# Logging: metrics.jsonl, image grids, time spent in model calls.
# ------------------------------------------------------------------------------------------------------
class MetricsFile:
    """metrics.jsonl, one JSON object per line, appended and flushed line by line (rank 0 only). On resume
    it keeps what the resumed state has seen and drops the epochs it will redo, and a damaged line (a run
    killed mid-write) with a note. Values must be finite: the file stays valid JSON."""

    def __init__(self, path, start_epoch, is_main, log):
        self.file, self.records, self.mirror = None, [], None  # records: every line kept or written, for curves.png
        if not is_main:
            return
        if path.exists():
            keep, damaged = [], 0
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["epoch"] < start_epoch:
                        keep.append(line)
                        self.records.append(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    damaged += 1
            if damaged:
                log(f"dropped {damaged} damaged line(s) of {path}")
            tmp = path.with_name(path.name + ".tmp")  # written aside, then renamed: a full disk loses nothing
            try:
                tmp.write_text("".join(line + "\n" for line in keep))
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                fail(f"could not rewrite {path} for the resumed run ({e.strerror or e}); it is unchanged")
        self.file = open(path, "a")

    def write(self, record):
        if self.file:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()
            self.records.append(record)
            if self.mirror:
                self.mirror(record)  # --wandb, --tensorboard

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


class Trackers:
    """--wandb PROJECT and --tensorboard (rank 0): every metrics.jsonl record and image grid, mirrored. Both
    packages are optional, imported only when asked for (check_trackers() tries them before anything loads).
    W&B gets each record as one row, with the optimizer step ("step") as every chart's x-axis; a resumed run
    continues the same W&B run (its id is kept in <run-dir>/wandb_id), and the steps it redoes are logged again,
    with the same values (a resume is bitwise exact; only time/* differs). TensorBoard gets each value at its
    step (not "epoch": an evaluation shares its step with the epoch before it); on resume it drops its events
    from the resumed step on (purge_step) and takes that step's kept records again: each step once."""

    def __init__(self, args, run_dir, is_main):
        """W&B, at the start (a login problem fails before any model loads)."""
        self.args, self.run_dir, self.is_main = args, run_dir, is_main
        self.wandb = self.tensorboard = None
        if is_main and args.wandb:
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            id_file = run_dir / "wandb_id"
            resumed = {"id": id_file.read_text().strip(), "resume": "allow"} if id_file.exists() else {}
            try:
                self.wandb = wandb.init(project=args.wandb, name=run_dir.name, dir=str(run_dir),
                                        config=dataclasses.asdict(args), **resumed)
            except Exception as e:  # not logged in, no network, a bad project name
                fail(f"--wandb {args.wandb!r}: wandb.init failed: {type(e).__name__}: {e}".replace("\n", " "))
            id_file.write_text(self.wandb.id + "\n")
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")
            self.wandb_image = wandb.Image

    def start(self, start_step, kept_records):
        """TensorBoard, once metrics.jsonl is trimmed for a resume, so that both drop the same records: the
        events from the resumed step on, then that step's kept records (the last epoch's) go back in."""
        if self.is_main and self.args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step or None,
                                             flush_secs=10)  # written within 10 s (the default waits 2 minutes)
            for record in kept_records if start_step else []:
                if record["step"] == start_step:
                    self.tensorboard_scalars(record)

    def log(self, record):
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if v is not None})
        if self.tensorboard:
            self.tensorboard_scalars(record)

    def tensorboard_scalars(self, record):
        for key, value in record.items():
            if key not in ("step", "epoch") and value is not None:
                self.tensorboard.add_scalar(key, value, record["step"])

    def image(self, tag, path, epoch, step):
        """A PNG written by save_image_grid, under `tag` (images/train, images/eval)."""
        if self.wandb:
            self.wandb.log({tag: self.wandb_image(str(path)), "epoch": epoch, "step": step})
        if self.tensorboard:
            from PIL import Image

            with Image.open(path) as image:
                self.tensorboard.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self, failed=False):
        if self.wandb:
            self.wandb.finish(exit_code=1 if failed else 0)
        if self.tensorboard:
            self.tensorboard.close()
        self.wandb = self.tensorboard = None


def save_image_grid(path, images, prompts, scores, info=None, max_images=16, cols=4):
    """A PNG grid: each image (upscaled to at least 128 px) over its whole prompt (wrapped to the image's
    width), its reward and its first text info (e.g. the LLaVA answer, cut to one line); beside it a .json
    with every image's prompt, reward and info in full."""
    import textwrap

    from PIL import Image, ImageDraw

    info = info or {}
    images = rewards_lib.to_uint8_hwc(images[:max_images])
    texts = [k for k, v in info.items() if v and isinstance(v[0], str)]
    side = max(128, images.shape[1])
    width = (side - 4) // 6  # characters per line of PIL's default font (6 px each)
    lines = [textwrap.wrap(p, width) or [""] for p in prompts[:len(images)]]
    caption = 11 * (max(map(len, lines)) + 1 + bool(texts)) + 2  # prompt lines, the reward, the info
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * side, rows * (side + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (array, prompt_lines, score) in enumerate(zip(images, lines, scores)):
        x, y = (i % cols) * side, (i // cols) * (side + caption)
        grid.paste(Image.fromarray(array).resize((side, side), Image.NEAREST), (x, y))
        for k, line in enumerate(prompt_lines + [f"r = {float(score):.4g}"]):
            draw.text((x + 2, y + side + 1 + 11 * k), line, fill="black")
        if texts:
            draw.text((x + 2, y + side + 1 + 11 * (len(prompt_lines) + 1)), str(info[texts[0]][i])[:width], fill="gray")
    grid.save(path)
    rows = [{"prompt": p, "reward": float(r), **{k: v[i] for k, v in info.items()}}
            for i, (p, r) in enumerate(zip(prompts, scores))]
    Path(path).with_suffix(".json").write_text(json.dumps(rows, indent=1))


def plot_curves(records, path, size=(360, 220)):
    """curves.png from metrics records, drawn with PIL: reward mean and spread (mean +- std) per epoch, the
    eval reward, train/kl_ref and train/clipfrac (epoch means), and in tiny runs the alignment and diversity,
    one panel each; a panel with nothing logged says so. Returns the PIL image."""
    from PIL import Image, ImageDraw

    def series(key):
        return [(r["epoch"], r[key]) for r in records if r.get(key) is not None]

    panels = [("reward: mean, mean +- std", series("reward/mean"), series("reward/std")),
              ("eval reward (held-out prompts)", series("eval/reward_mean"), []),
              ("train/kl_ref (KL to the reference)", series("train/kl_ref_epoch_mean"), []),
              ("train/clipfrac", series("train/clipfrac_epoch_mean"), [])]
    if series("reward_info/alignment"):  # tiny runs: what the prompt asked for, beside the reward
        panels += [("alignment (tiny_alignment, mean p)", series("reward_info/alignment"), []),
                   ("diversity across prompts (RMS pixels)", series("reward_info/diversity"), [])]
    W, H = size
    image = Image.new("RGB", (2 * W, (len(panels) + 1) // 2 * H), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, points, spread) in enumerate(panels):
        x0, y0 = (p % 2) * W, (p // 2) * H
        left, top, right, bottom = x0 + 50, y0 + 20, x0 + W - 10, y0 + H - 25  # the plot area
        draw.text((x0 + 50, y0 + 4), title, fill="black")
        draw.rectangle((left, top, right, bottom), outline="gray")
        if not points:
            draw.text((left + 10, (top + bottom) // 2), "not logged in this run", fill="gray")
            continue
        std = dict(spread)
        lows = [v - std.get(e, 0) for e, v in points]
        highs = [v + std.get(e, 0) for e, v in points]
        e_min, e_max = points[0][0], max(points[-1][0], points[0][0] + 1)
        v_min, v_max = min(lows), max(highs)
        if v_max - v_min < 1e-12:
            v_min, v_max = v_min - 1, v_max + 1

        def xy(e, v):
            return (left + (e - e_min) / (e_max - e_min) * (right - left),
                    bottom - (v - v_min) / (v_max - v_min) * (bottom - top))

        if std:
            band = [xy(e, h) for (e, _), h in zip(points, highs)] + [xy(e, l) for (e, _), l in zip(points[::-1], lows[::-1])]
            draw.polygon(band, fill=(200, 215, 240))
        draw.line([xy(e, v) for e, v in points], fill=(20, 60, 200), width=2)
        for value, y in ((v_max, top), (v_min, bottom)):
            draw.text((x0 + 2, y - 6), f"{value:.4g}", fill="black")
        draw.text((left, bottom + 6), f"epoch {e_min}", fill="black")
        draw.text((right - 60, bottom + 6), f"epoch {e_max}", fill="black")
    image.save(path)
    return image


class ModelTimer:
    """Seconds inside model calls (sampling's UNet, VAE and text-encoder calls; training's whole optimizer
    steps, UNet forward and backward included): `with timer(): ...`.
    On CUDA it records events instead of synchronising (no host sync in the loops) and adds them up in
    total(), once per epoch; on the CPU it reads the clock."""

    def __init__(self, device):
        self.cuda, self.seconds, self.events = device.type == "cuda", 0.0, []

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - t0

    def total(self) -> float:
        """Seconds since the last total() (and reset)."""
        if self.events:
            torch.cuda.synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000
        seconds, self.seconds, self.events = self.seconds, 0.0, []
        return seconds


def warn_truncated_prompts(tokenizer, prompts, log):
    """One line if some prompts are longer than the text encoder reads (they would be cut silently)."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False).input_ids]
    long = [p for p, n in zip(prompts, lengths) if n > tokenizer.model_max_length]
    if long:
        log(f"warning: {len(long)} of {len(prompts)} prompts are longer than the text encoder's "
            f"{tokenizer.model_max_length} tokens and are cut, e.g. {long[0][:80]!r}")


# ------------------------------------------------------------------------------------------------------
# Models.
# ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_loading():
    """No progress bars while models load, and none of transformers' import-time warnings about image
    processors falling back from torchvision (diffusers imports them; the pipeline never uses them)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar(), transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
        diffusers_logging.enable_progress_bar(), transformers_logging.enable_progress_bar()


def load_pipeline(args, device, dtype, log=print):
    """The pipeline from a hub id, a local path, or 'tiny'; its scheduler swapped for DDIM."""
    with quiet_loading():
        from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = tiny_pretrained_path(seed=0, log=log) if args.model == "tiny" else args.model
    try:
        with quiet_loading():
            pipe = rewards_lib.from_hub_or_cache(lambda **k: StableDiffusionPipeline.from_pretrained(
                path, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **k),
                path)
    except Exception as e:  # hub unreachable, missing files, not a diffusers SD checkpoint
        if args.model == "tiny":
            fail(f"the cached tiny pipeline {path} does not load ({rewards_lib.first_line(e)}): delete that "
                 "directory and it is rebuilt on the next run")
        fail(f"could not load --model {args.model!r} ({rewards_lib.first_line(e)}). Without network access a hub "
             "id cannot be downloaded: pass a local diffusers directory, or --model tiny for the offline pipeline")
    config = dict(pipe.scheduler.config)
    # DDIMScheduler's own defaults clip x0 to [-1, 1] and set alpha_prev = 1 at the last step; SD was
    # trained without either, and a config that lacks the keys would silently get them.
    config.setdefault("clip_sample", False)
    config.setdefault("set_alpha_to_one", False)
    pipe.scheduler = DDIMScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    # diffusers warns that an fp16 pipeline on the CPU "will fail"; torch runs fp16 on the CPU (tested), slowly
    return pipe.to(device, silence_dtype_warnings=True)


@contextlib.contextmanager
def on_device(module, device):
    """The module on `device` for the duration of the block, back on the CPU after (--offload-frozen)."""
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")


def cpu_note(device, requested, unet):
    """One line when a UNet of Stable Diffusion's size is to run on the CPU, saying why (most often a CPU-only
    torch on a GPU machine), or None: the tiny model is meant for the CPU. An SD v1.5 UNet call costs 0.8 TFLOP
    per image at 512 px, and an epoch's sampling at the presets makes 3,200 of them (32 x 50 steps x 2 for CFG)."""
    params = sum(p.numel() for p in unet.parameters())
    if device.type != "cpu" or params < 100e6:
        return None
    why = ("--device cpu" if requested == "cpu" else f"torch {torch.__version__} is a CPU-only build"
           if torch.version.cuda is None else "torch finds no CUDA device")
    return (f"note: the {params / 1e6:.0f}M-parameter UNet runs on the CPU ({why}); at this size an epoch takes "
            "hours there. For a GPU: a CUDA build of torch and --device cuda")


def select_unet_kernels(unet, device):
    """The same math, faster kernels, on CPUs: NHWC activations for oneDNN's convolutions, and diffusers'
    plain bmm attention (PyTorch's CPU flash-attention kernel is slow at small head sizes). GPUs keep
    the default NCHW: at SD scale on an H200, NHWC made the published order's training call slower
    (134 ms against 118) and sampling too (73 against 69 ms). The README has the measurements."""
    if device.type == "cpu":
        from diffusers.models.attention_processor import AttnProcessor

        unet.to(memory_format=torch.channels_last)
        unet.set_attn_processor(AttnProcessor())


def compile_problem(device):
    """'' if torch.compile compiles and runs a small function on `device` as eager does, else why not, in one
    line (its default backend, inductor, needs a C++ compiler for CPU code, and Triton, which needs a C compiler,
    for GPU code)."""
    x = torch.arange(8.0, device=device)
    try:
        same = torch.equal(torch.compile(lambda v: v * 2 + 1)(x), x * 2 + 1)
    except Exception as e:
        e = getattr(e, "inner_exception", None) or e  # dynamo wraps its backend's own error (InductorError)
        return f"{type(e).__name__}: {rewards_lib.first_line(e)}"
    return "" if same else "a compiled function's result differs from eager's"


def use_fused_kernels(setting, device, log, problem):
    """--fused-kernel: 'off'; 'on' (CUDA, or the Triton interpreter on the CPU: for tests), which stops in one
    line if problem() finds that the kernels do not work here; 'auto': on for CUDA devices where they work, else
    the PyTorch reference (the same math, slower), with a note. problem() -> '' or why not."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return False
    why = problem()
    if why and setting == "on":
        fail(f"--fused-kernel on: the Triton kernels do not work here ({why})")
    if why:
        log(f"note: the fused Triton kernels do not work here ({why}); training computes log p with the PyTorch "
            "reference instead (the same math, slower). --fused-kernel off skips this check")
    return not why


def fused_kernel_problem(scheduler, latent_shape, guidance_scale, eta, device):
    """'' if the fused kernels run on `device` and agree with the PyTorch reference on one small call (two
    samples at the first and last timesteps: log p, the ratio and their gradients), else why not, in one line.
    Triton compiles each kernel at its first call, which needs a C compiler (CC) and a GPU that Triton supports."""
    g = torch.Generator().manual_seed(0)
    cond, uncond, x, x_prev = (torch.randn(2, *latent_shape, generator=g).to(device) for _ in range(4))
    uncond = uncond.requires_grad_() if guidance_scale > 1 else None  # as micro_batch_loss calls it
    try:
        results = kernels.fused_minus_reference(scheduler, cond.requires_grad_(), uncond, guidance_scale,
                                                scheduler.timesteps[[0, -1]], x, x_prev, torch.zeros(2, device=device),
                                                eta=eta)
    except Exception as e:
        return f"{type(e).__name__}: {rewards_lib.first_line(e)}"
    # relative to the reference's scale; a ratio can underflow to 0 in both (no difference, then)
    worst = max(diff / scale if scale else (math.inf if diff else 0.0) for _, diff, scale in results)
    return "" if worst < 1e-3 else f"they differ from the PyTorch reference by {worst:.1e} of its scale"


COMPILED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")  # --compile's regions: nearly all of the UNet's FLOPs


def setup_trainable(unet, args):
    """LoRA adapters (peft) on the attention projections, or the whole UNet; trainable params in fp32."""
    unet.requires_grad_(False)
    if args.lora_rank > 0:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    else:
        unet.requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # active only in train() mode, i.e. not while sampling
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def compile_blocks(unet, static=False):
    """--compile: regional torch.compile, in place, of each ResNet and transformer block (blocks of one kind
    share graphs, so it compiles far faster than the whole UNet); the state-dict keys stay the same, so
    checkpoints do too. Each block's channel count and mode (sampling, training) is its own graph, ~30 for
    SD's UNet: more than dynamo's default limit per function (8), past which it silently runs the rest eagerly.
    static=True (--compile-workers): static shapes, so that a graph depends on its call alone, not on which
    calls compiled before it (by default dynamo makes a block's dimensions symbolic once it has seen two
    sizes: fewer graphs, but each shaped by the calls before it, which a worker process cannot know)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for module in unet.modules():
        if type(module).__name__ in COMPILED_BLOCKS:
            module.compile(dynamic=False if static else None)


# --compile-workers: the blocks' graphs compiled by several processes at once, before the run compiles them.
# The run records each distinct block call of its first epoch (probe_block_calls, on the eager UNet, from
# calls of the epoch's shapes), hands a share of them to each worker process, which builds the same UNet and
# makes its calls on random inputs of the same layouts, so that inductor's on-disk cache holds every graph;
# the run's own compilation then loads them. Calls travel as plain tuples and dicts (pickled to a file).
PLAIN = (bool, int, float, str, type(None))


def tensor_specs(value):
    """value with each tensor replaced by ("tensor", shape, stride, storage offset, dtype, requires_grad), what a
    graph depends on, in tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(map(tensor_specs, value))
    if isinstance(value, dict):
        return {k: tensor_specs(v) for k, v in value.items()}
    return value


def from_specs(value, device):
    """tensor_specs inverted: random tensors of the recorded shapes, strides, offsets, dtypes and requires_grad."""
    if isinstance(value, tuple) and value[:1] == ("tensor",):
        _, shape, stride, offset, dtype, requires_grad = value
        size = offset + 1 + sum((n - 1) * st for n, st in zip(shape, stride))
        data = torch.randn(size, device=device).to(dtype) if dtype.is_floating_point \
            else torch.zeros(size, dtype=dtype, device=device)
        return data.as_strided(shape, stride, offset).detach().requires_grad_(requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(from_specs(v, device) for v in value)
    if isinstance(value, dict):
        return {k: from_specs(v, device) for k, v in value.items()}
    return value


def probe_block_calls(unet, make_calls, device_type):
    """Each distinct call of a --compile block that make_calls() makes on the (not yet compiled) UNet:
    {variant: call}, a call being a dict of the block's name, its state (plain attributes of it and its
    submodules: train mode, peft's adapter switches, ...; its parameters' requires_grad), the grad and autocast
    modes, and its inputs as tensor_specs. A variant is what dynamo guards a graph on: all of that but the name,
    and the parameters' shapes and dtypes (a block variant reappearing at another depth of the UNet is one)."""
    found, hooks = {}, []

    def record(block, args, kwargs, name):
        state = ({sub: {k: v for k, v in vars(m).items() if isinstance(v, PLAIN)} for sub, m in block.named_modules()},
                 {n: p.requires_grad for n, p in block.named_parameters()})
        autocast = dict(enabled=torch.is_autocast_enabled(device_type), dtype=torch.get_autocast_dtype(device_type),
                        cache_enabled=torch.is_autocast_cache_enabled())
        call = dict(state=state, grad=torch.is_grad_enabled(), autocast=autocast, args=tensor_specs(args),
                    kwargs=tensor_specs(kwargs))
        params = [(n, tuple(p.shape), p.dtype) for n, p in block.named_parameters()]
        found.setdefault(repr((type(block).__name__, params, call)), dict(name=name, **call))

    for name, block in unet.named_modules():
        if type(block).__name__ in COMPILED_BLOCKS:
            hooks.append(block.register_forward_pre_hook(functools.partial(record, name=name), with_kwargs=True))
    try:
        make_calls()
    finally:
        for hook in hooks:
            hook.remove()
    return found


def precompile_worker(path):
    """One --compile-workers process (`python -c "import ddpo; ddpo.precompile_worker(path)"`): from the pickle
    at `path`, the run's arguments (a dict), device and a share of its block calls. The run's UNet, built as the
    run builds it, compiled block by block, and each call made once on random inputs, with a backward where
    autograd was on: inductor's on-disk cache then holds their forward and backward graphs."""
    import torch._inductor.config

    with open(path, "rb") as f:
        job = pickle.load(f)
    args, device = Args(**job["args"]), torch.device(job["device"])
    torch.set_num_threads(job["threads"])  # dynamo guards on it
    torch._inductor.config.compile_threads = job["compile_threads"]  # this process's share of the cores
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    unet = load_pipeline(args, device, precision(args, device)[0], log=lambda *a, **k: None).unet
    select_unet_kernels(unet, device)
    setup_trainable(unet, args)
    compile_blocks(unet, static=True)
    blocks = dict(unet.named_modules())
    for call in job["calls"]:
        block = blocks[call["name"]]
        attributes, requires_grad = call["state"]
        for sub, m in block.named_modules():
            vars(m).update(attributes[sub])
        for n, p in block.named_parameters():
            p.requires_grad_(requires_grad[n])
        with torch.set_grad_enabled(call["grad"]), torch.autocast(device.type, **call["autocast"]):
            out = block(*from_specs(call["args"], device), **from_specs(call["kwargs"], device))
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


def start_worker(path, env):
    """A --compile-workers process on the job file at `path` (a Popen: .poll() is its exit code once it ends)."""
    import subprocess

    return subprocess.Popen([sys.executable, "-c", "import sys, ddpo; ddpo.precompile_worker(sys.argv[1])", path],
                            env=env)


def precompile_blocks(args, device, unet, make_calls, workers, log=print):
    """--compile-workers: the block variants that make_calls() uses, compiled into inductor's cache by `workers`
    processes at once (each builds its own UNet) before the run compiles them itself. Nothing when inductor's
    cache directory holds a note that these variants were compiled there, with this torch and device."""
    import hashlib
    import tempfile

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        variants = probe_block_calls(unet, make_calls, device.type)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    digest = hashlib.sha256(repr((sorted(variants), torch.__version__, where)).encode()).hexdigest()[:16]
    note = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / f"ddpo-precompiled-{digest}"
    if note.exists():
        log(f"--compile: inductor's cache holds this run's {len(variants)} block variants (compiled before)")
        return
    calls = sorted(variants.values(), key=lambda c: not c["grad"])  # training's (forward and backward) first
    workers = min(workers, len(calls))
    log(f"--compile: compiling the UNet's {len(calls)} block variants in {workers} processes ...")
    start = time.perf_counter()
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        processes = []
        try:
            for k in range(workers):
                path = os.path.join(tmp, f"job{k}.pickle")
                with open(path, "wb") as f:  # plain values only: run as a script, this module is __main__
                    pickle.dump({"args": dataclasses.asdict(args), "device": str(device), "calls": calls[k::workers],
                                 "threads": torch.get_num_threads(),
                                 "compile_threads": max(1, (os.cpu_count() or 1) // workers)}, f)
                processes.append(start_worker(path, env))
            running, failed = set(range(workers)), []
            while running:  # a line as each finishes: minutes pass otherwise without one
                for k in sorted(k for k in running if processes[k].poll() is not None):
                    running.discard(k)
                    code = processes[k].poll()
                    failed += [code] if code else []
                    log(f"--compile: process {k + 1} of {workers} {'failed, exit code %d' % code if code else 'done'} "
                        f"({len(calls[k::workers])} variants) at {duration_text(time.perf_counter() - start)}")
                time.sleep(0.2)
        finally:  # stopped (Ctrl-C) or failed here: no worker left behind
            for p in processes:
                if p.poll() is None:
                    p.kill()
    seconds = time.perf_counter() - start
    if failed:
        log(f"--compile: {len(failed)} of {workers} compile processes failed (exit codes {failed}) after "
            f"{duration_text(seconds)}; the first epoch compiles what they did not")
        return
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(json.dumps({"variants": len(calls), "workers": workers, "torch": torch.__version__,
                                "device": where, "seconds": round(seconds, 1)}))
    log(f"--compile: {len(calls)} block variants compiled in {duration_text(seconds)}")


CAPTURE_STREAM_WARNING = "The AccumulateGrad node's stream does not match"  # see GraphedUNet.capture


class GraphedUNet:
    """--cuda-graphs (auto: all for LoRA on CUDA): the UNet of the training step, replayed from CUDA graphs. The first
    call in train mode with autograd on is captured (torch.cuda.make_graphed_callables: the forward one graph, the
    backward another), and every later call of that shape replays them: two launches instead of the thousands of
    kernels a UNet call issues from Python. Any other call runs the UNet eagerly: other shapes (a step's last,
    shorter micro-batch), sampling (eval mode, no autograd) unless sampling=True (--cuda-graphs all: then the first
    sampling call is captured too, by sampling_graph, and later ones of its shape replay it: on an H200 an epoch's
    sampling 9.0 -> 7.1 s), the KL reference (the raw UNet, its adapters toggled in Python, which a graph could
    not see). The graphs read the weights where they are, so in-place updates (optimizer steps, EMA swaps) are
    seen. The training forward and the exact-ratio re-score both replay the same graph, so they agree bitwise. With
    --compile ('on' or 'all'), make_graphed_callables' warm-up calls compile the blocks and the capture records
    their kernels (on an H200: 92.5 -> 75.9 ms per call).
    On an H200, SD v1.5, 8 rows: 118 -> 88 ms per forward + backward, 46 -> 37.5 ms per re-scoring forward, log p
    bitwise equal to eager; a whole epoch at the published settings 45.8 -> 30.2 s, peak memory 11.7 -> 10.0 GB
    (README)."""

    def __init__(self, unet, autocast, make_graphed=None, sampling=False, make_sampling_graph=None):
        self.unet, self.autocast, self.key, self.graphed = unet, autocast, None, None
        self.make_graphed = make_graphed or torch.cuda.make_graphed_callables
        self.sampling, self.sampling_key, self.sampling_graphed = sampling, None, None
        self.make_sampling_graph = make_sampling_graph or sampling_graph

    def __call__(self, sample, timestep, encoder_hidden_states):
        args = (sample, timestep, encoder_hidden_states)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if self.unet.training and torch.is_grad_enabled():  # a training call
            if self.graphed is None:
                self.capture(args)
                self.key = key
            if key == self.key:
                return types.SimpleNamespace(sample=self.graphed(*args))
        elif self.sampling and not (self.unet.training or torch.is_grad_enabled()):  # a sampling call
            if self.sampling_graphed is None:
                self.sampling_graphed, self.sampling_key = self.make_sampling_graph(self.unet, args, self.autocast), key
            if key == self.sampling_key:
                return types.SimpleNamespace(sample=self.sampling_graphed(*args))
        return self.unet(*args)

    def capture(self, args):
        class Noise(torch.nn.Module):  # make_graphed_callables takes tensors in, tensors out
            def __init__(self, unet):
                super().__init__()
                self.unet = unet

            def forward(self, *a):
                return self.unet(*a).sample

        # make_graphed_callables warms up on one side stream and captures on another while the warm-up's autograd
        # graph is still referenced, then keeps the captured forward's graph: the AccumulateGrad node of each
        # trainable weight belongs to a stream other than the one that produces its gradient, in the capture and
        # in every later backward (default stream). The engine joins the streams before a backward returns, and
        # PyTorch >= 2.10 warns about the mismatch: nothing a user can act on (README, "A seventh H200 machine").
        warnings.filterwarnings("ignore", message=CAPTURE_STREAM_WARNING, category=UserWarning)
        with self.autocast():  # captured under the autocast it is called under (without its cast cache)
            # allow_unused_input: a trainable weight that the forward does not use is not an error
            self.graphed = self.make_graphed(Noise(self.unet), args, allow_unused_input=True)
        # The backward graph returns each weight's gradient in its own static memory, which the next replay
        # overwrites; autograd would keep that very tensor as p.grad when p.grad is None (PyTorch issue
        # #181723). A copy goes there.
        for p in self.unet.parameters():
            if p.requires_grad:
                p.register_hook(torch.clone)


def sampling_graph(unet, args, autocast):
    """--cuda-graphs all: the sampling call unet(*args).sample (eval mode, no autograd) as one CUDA graph. Returns
    replay(*inputs), which copies the inputs into the captured ones, replays, and returns the captured output:
    the same memory every time, overwritten by the next replay (the sampling loop reads it at once)."""
    static = tuple(a.clone() for a in args)  # device tensors: predict_noise moves the timesteps there
    side = torch.cuda.Stream()  # warm up outside the capture (cuDNN and cuBLAS set themselves up on first use),
    side.wait_stream(torch.cuda.current_stream())  # as often as make_graphed_callables does
    with torch.cuda.stream(side), autocast():
        for _ in range(3):
            unet(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast():  # the autocast it is called under, without its cast cache
        out = unet(*static).sample

    def replay(*inputs):
        for captured, x in zip(static, inputs):
            captured.copy_(x)
        graph.replay()
        return out
    return replay


def reference_model(unet, args):
    """The KL reference as a context manager factory yielding a UNet: with LoRA, the same UNet with its
    adapters disabled (peft's toggle: no second copy); in full fine-tuning, a frozen copy of the weights
    as they are now (call before loading a checkpoint: the reference is the initial model)."""
    if args.lora_rank > 0:
        @contextlib.contextmanager
        def adapters_disabled():
            unet.disable_adapters()
            try:
                yield unet
            finally:
                unet.enable_adapters()
        return adapters_disabled
    import copy

    frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    return lambda: contextlib.nullcontext(frozen)


def precision(args, device, cache=True):
    """The one dtype switch: (dtype of frozen weights, autocast context factory). Trainable weights and
    trajectories stay float32 whatever this is. cache=False: autocast re-casts the weights at every use
    (CUDA graph captures need that: a cached cast would be captured as a stale tensor)."""
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    if dtype == torch.float32:
        return dtype, contextlib.nullcontext
    return dtype, lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def vae_factor(pipe):
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def latent_shape_of(pipe, resolution=None):
    """(C, h, w) of the latents of `resolution`-pixel images (default: the model's own resolution)."""
    factor = vae_factor(pipe)
    resolution = resolution or pipe.unet.config.sample_size * factor
    if resolution % factor:
        fail(f"--resolution {resolution} must be a multiple of the VAE's downsampling factor {factor}")
    return pipe.unet.config.in_channels, resolution // factor, resolution // factor


# ------------------------------------------------------------------------------------------------------
# python ddpo.py sample --checkpoint DIR
# ------------------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def sample_main(argv):
    """python ddpo.py sample --checkpoint DIR: the base model's images (top row) next to the checkpoint's
    (bottom row), from the same prompts and the same noise, with their rewards under the run's reward."""
    parser = argparse.ArgumentParser(prog="ddpo.py sample", description=sample_main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory of a run")
    parser.add_argument("--prompts", default=None, help="prompt set or file (default: the run's)")
    parser.add_argument("--num-images", type=int, default=8, help="images per row (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the noise (default: 0)")
    parser.add_argument("--out", default=None, help="image path (default: <checkpoint>/samples.png)")
    parser.add_argument("--ema", action="store_true", help="render the checkpoint's EMA weights (a run with "
                        "--ema-decay) instead of its trained weights")
    cli = parser.parse_args(argv)
    checkpoint = Path(cli.checkpoint)
    if missing_checkpoint_files(checkpoint):
        fail(f"--checkpoint {cli.checkpoint!r} is not a checkpoint directory of a ddpo.py run")
    if cli.num_images < 1:
        fail(f"--num-images must be >= 1 (got {cli.num_images})")
    if not 0 <= cli.seed < 2**31:
        fail(f"--seed must be in [0, 2^31) (got {cli.seed})")
    out = Path(cli.out or checkpoint / "samples.png")
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        fail(f"--out {str(out)!r} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    fields = {f.name for f in dataclasses.fields(Args)}
    args = Args(**{k: v for k, v in json.loads((checkpoint / "config.json").read_text()).items() if k in fields})
    args = dataclasses.replace(args, prompts=cli.prompts or args.prompts, sample_batch_size=cli.num_images,
                               compile=False, gradient_checkpointing=False)
    if cli.ema and args.ema_decay == 0:
        fail(f"--ema: the run of {cli.checkpoint!r} kept no EMA (it was trained without --ema-decay)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, autocast = precision(args, device)
    prompts_all = load_prompts(args.prompts)
    prompts = [prompts_all[i] for i in np.random.default_rng(cli.seed).integers(len(prompts_all), size=cli.num_images)]
    reward_fn = build_reward(args, device)
    pipe = load_pipeline(args, device, dtype)
    pipe.scheduler.set_timesteps(args.num_steps, device=device)
    latent_shape = latent_shape_of(pipe, args.resolution)
    embeds, uncond = encode_prompts(pipe, prompts), encode_prompts(pipe, [""]).expand(len(prompts), -1, -1)

    def render():  # the same noise for both rows
        latents, _ = sample_trajectories(pipe.unet, pipe.scheduler, embeds, uncond, latent_shape, args.guidance_scale,
                                         args.eta, torch.Generator(device).manual_seed(cli.seed), autocast)
        images = decode_images(pipe.vae, latents[:, -1], autocast)
        try:
            return images, score_batch(reward_fn, images, prompts, args.reward)[0]
        except rewards_lib.RewardError as e:
            fail(str(e))

    base_images, base_scores = render()
    params = setup_trainable(pipe.unet, args)
    try:
        state = load_checkpoint(checkpoint, pipe.unet, args)
    except RunStopped as e:
        fail(str(e))
    with swapped_weights(params, [t.to(device) for t in state["ema"]] if cli.ema else None):
        tuned_images, tuned_scores = render()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(out, torch.cat([base_images, tuned_images]), [f"base: {p}" for p in prompts] +
                    [f"tuned: {p}" for p in prompts], torch.cat([base_scores, tuned_scores]).tolist(),
                    max_images=2 * len(prompts), cols=len(prompts))
    print(f"wrote {out}: reward {base_scores.mean():+.4f} (base) -> {tuned_scores.mean():+.4f} (checkpoint)")
    return out


# ------------------------------------------------------------------------------------------------------
# The tiny offline test bed: a small SD-shaped model (UNet2DConditionModel, AutoencoderKL, CLIP text
# encoder, byte-level CLIP tokenizer) built from configs. Random weights are a poor RL test bed (any
# update saturates the images), so --model tiny pretrains it in code on synthetic captioned images of
# coloured shapes, about 5 minutes on 2 CPU cores, once; the result is cached (DDPO_CACHE, default
# ~/.cache/ddpo) as an ordinary diffusers pipeline directory.
# ------------------------------------------------------------------------------------------------------
TINY_VERSION = "tiny-v9"  # bump when the tiny model or its pretraining changes, so caches are rebuilt
TINY_SAVE_EVERY = 250  # UNet steps between the tiny build's progress saves (about 20 s of work)
COLORS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.25, 0.9),
          "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.2, 0.7), "orange": (1.0, 0.55, 0.1),
          "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08), "grey": (0.5, 0.5, 0.5)}
SHAPES = ("circle", "square", "triangle", "ring")
TEXTURES = ("plain", "striped", "speckled")
TINY_WORDS = ("a", "on", *COLORS, *SHAPES, *TEXTURES)  # one token each in the tiny tokenizer


def byte_level_clip_tokenizer(max_length=32, words=()):
    """A CLIPTokenizer over the 256 byte symbols (and their end-of-word forms), so every character is a
    token, plus the BPE merges that make each of `words` one token, as SD's CLIP tokenizer makes common
    English words one token. Built in code, so no vocabulary file is needed."""
    from transformers import CLIPTokenizer

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte -> unicode table
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codes]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    merges = bpe_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def bpe_merges(words):
    """BPE training on a word list: merge the most frequent adjacent pair of symbols (first seen on a tie)
    until every word is one symbol. Returns the merges in order: [('r', 'e'), ('re', 'd</w>'), ...]."""
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        pairs = Counter(pair for w in words for pair in zip(w, w[1:]))
        if not pairs:
            return merges
        a, b = max(pairs, key=pairs.get)
        merges.append((a, b))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [a + b]
                i += 1


def build_tiny_pipeline(seed=0):
    """The tiny StableDiffusionPipeline with random weights from `seed`: 32x32 images, a VAE with 2x
    downsampling and 12 latent channels (latents 12x16x16: as many numbers as pixels, so its decoder can
    draw both flat colour and per-pixel texture, the two ends of JPEG size), a 0.37M-parameter UNet (32
    channels at 16x16 and at 8x8: version 8's 64 at 8x8 took 1.7x the build time to draw the shapes about
    as often; README, "Version 9") with cross-attention at 8x8 and the prompt's pooled embedding added to
    the timestep's (diffusers' addition_embed_type "text": every block sees the prompt), a 2-layer CLIP text
    encoder over a tokenizer that makes each word of the tiny world one token (with characters, background
    colours stayed near chance: README, "The tiny world"), and a DDIM scheduler with Stable Diffusion's noise
    schedule and v-prediction (SD 2's): its target holds the clean image at high noise, where the prompt
    decides what is drawn (README, "The tiny world")."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = byte_level_clip_tokenizer(words=TINY_WORDS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=12, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(sample_size=16, in_channels=12, out_channels=12, block_out_channels=(32, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2,  # diffusers reads it as the number of heads: 2 of 16
                                norm_num_groups=8, addition_embed_type="text",
                                addition_embed_type_num_heads=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def synthetic_shapes(n, generator, size=32):
    """n captioned 32x32 images: a coloured shape (circle, square, triangle, ring), plain (half of them),
    striped or speckled, near the centre and at a random size, on a plain (half), striped or speckled
    coloured background; one in eight has no shape at all. Returns ((n, 3, H, W) in [0, 1], captions).
    Captions name what is drawn ('a striped red circle on speckled blue', 'striped green'). The empty and
    the textured backgrounds put both ends of JPEG size (flat colour, texture everywhere) inside what the
    tiny model can draw."""
    g = generator
    names = list(COLORS)
    rgb = torch.tensor([COLORS[c] for c in names])  # (K, 3)
    fg = torch.randint(len(names), (n,), generator=g)
    bg = (fg + torch.randint(1, len(names), (n,), generator=g)) % len(names)  # bg != fg
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    empty = torch.rand(n, generator=g) < 0.125
    u = torch.rand(2, n, generator=g)
    texture, bg_texture = (u >= 0.5).long() + (u >= 0.75).long()  # plain 1/2, striped 1/4, speckled 1/4
    cy, cx = (torch.rand(2, n, 1, 1, generator=g) * 8 + 12)  # centre in [12, 20]
    r = torch.rand(n, 1, 1, generator=g) * 3 + 8  # "radius" in [8, 11]
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dy, dx = yy - cy, xx - cx  # (n, H, W)
    dist = (dy**2 + dx**2).sqrt()
    masks = torch.stack([dist < r,
                         torch.maximum(dy.abs(), dx.abs()) < r,
                         (dy > -r) & (dy < r * 0.8) & (dx.abs() < (dy + r) * 0.55),
                         (dist < r) & (dist > r * 0.55)], 1)  # (n, 4, H, W)
    mask = (masks[torch.arange(n), shape] & ~empty.reshape(n, 1, 1)).unsqueeze(1).float()  # (n, 1, H, W)

    def shading(tex):  # (n,) texture ids -> (n, H, W) brightness factors
        angle = torch.rand(n, 1, 1, generator=g) * math.pi
        stripes = (torch.sin((dx * angle.cos() + dy * angle.sin()) * 1.6) > 0).float()
        speckle = torch.rand(n, size, size, generator=g)
        shade = torch.ones(n, size, size)
        shade = torch.where((tex == 1).reshape(n, 1, 1), 0.35 + 0.65 * stripes, shade)
        return torch.where((tex == 2).reshape(n, 1, 1), 0.4 + 0.6 * speckle, shade)

    fg_img = rgb[fg].reshape(n, 3, 1, 1) * shading(texture).unsqueeze(1)
    bg_img = rgb[bg].reshape(n, 3, 1, 1) * shading(bg_texture).unsqueeze(1)
    images = mask * fg_img + (1 - mask) * bg_img

    def textured(t, colour):
        return colour if TEXTURES[t] == "plain" else f"{TEXTURES[t]} {colour}"

    captions = [textured(bt, names[b]) if e else f"a {textured(t, names[f])} {SHAPES[s]} on {textured(bt, names[b])}"
                for e, t, f, s, bt, b in zip(empty.tolist(), texture.tolist(), fg.tolist(), shape.tolist(),
                                             bg_texture.tolist(), bg.tolist())]
    return images.clamp(0, 1), captions


def pretrain_tiny_pipeline(pipe, seed=0, vae_steps=300, unet_steps=3000, batch_size=16, pool_size=8192,
                           progress=None, save_every=TINY_SAVE_EVERY, log=print):
    """Make the random tiny pipeline a real (if small) text-to-image model: train the VAE as an autoencoder
    whose latents stay close to the pixels themselves (pixel_unshuffle: 2x2 patches as 12 channels, so the
    decoder is nearly a reshuffle and draws clean colour from the UNet's latents), then the UNet as a
    v-prediction denoiser on the VAE latents of synthetic captioned images, together with the text encoder
    (10% of captions dropped for classifier-free guidance). The UNet's timesteps are drawn with density
    proportional to t, so more of its steps fall at high noise, where the prompt decides which shape is drawn
    (README, "The tiny world": version 9, 3000 steps of 16, draws the shapes 68-82% of the time across three
    builds; version 8, with a wider UNet, 67-84% across four; version 7, whose squares were smaller than its
    circles, 43-61% after 2500 steps; uniform timesteps, 33-41% after 2000).

    progress: a file for the UNet phase's state (every `save_every` steps, written atomically). A build that
    finds one of the same recipe resumes from it, and ends with the same weights, bit for bit, as a build
    that was never interrupted (on the same machine and thread count)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    vae, unet, scheduler, text_encoder = pipe.vae, pipe.unet, pipe.scheduler, pipe.text_encoder
    recipe = dict(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size, pool_size=pool_size)
    state = read_progress(progress, recipe, log)
    t0 = time.time()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0)
    for step in range(vae_steps if state is None else 0):
        images, _ = synthetic_shapes(batch_size, g)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean + 0.05 * torch.randn(posterior.mean.shape, generator=g)).sample
        loss = F.mse_loss(recon, x) + F.mse_loss(posterior.mean, F.pixel_unshuffle(x, 2)) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == vae_steps - 1:
            log(f"  tiny VAE   step {step:4d}/{vae_steps}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    if state is not None:
        vae.load_state_dict(state["vae"])
    vae.requires_grad_(False).eval()

    # A fixed pool of encoded images: the UNet then trains without paying for the VAE every step. (A resumed
    # build draws it again from the same generator state, with the same VAE: the same pool.)
    pool_rng = g.get_state() if state is None else state["pool_rng"]
    g.set_state(pool_rng)
    with torch.no_grad():
        images, captions = synthetic_shapes(pool_size, g)
        latents = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in images.split(512)])
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
        latents = latents * vae.config.scaling_factor
        captions = [c if keep else "" for c, keep in zip(captions, (torch.rand(pool_size, generator=g) > 0.1).tolist())]
        tokens = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids

    params = [*unet.parameters(), *text_encoder.parameters()]
    text_encoder.requires_grad_(True).train()
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=unet_steps, pct_start=0.05)
    start = 0
    if state is not None:
        for module, key in ((unet, "unet"), (text_encoder, "text_encoder"), (opt, "opt"), (sched, "sched")):
            module.load_state_dict(state[key])
        g.set_state(state["rng"])
        start = state["step"]
        log(f"  resuming the tiny pipeline's pretraining at UNet step {start}/{unet_steps} ({progress})")
    t_unet = time.time()
    for step in range(start, unet_steps):
        idx = torch.randint(len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        t = (torch.rand(batch_size, generator=g).sqrt() * scheduler.config.num_train_timesteps).long()  # p(t) ~ t
        noise = torch.randn(x0.shape, generator=g)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, text_encoder(tokens[idx])[0]).sample
        loss = F.mse_loss(prediction, scheduler.get_velocity(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if progress and (step + 1) % save_every == 0 and step + 1 < unet_steps:
            torch_save_atomically(dict(
                recipe=recipe, step=step + 1, rng=g.get_state(), pool_rng=pool_rng, vae=vae.state_dict(),
                unet=unet.state_dict(), text_encoder=text_encoder.state_dict(), opt=opt.state_dict(),
                sched=sched.state_dict()), progress)
        if step % 250 == 0 or step == unet_steps - 1:
            left = (time.time() - t_unet) / (step + 1 - start) * (unet_steps - step - 1)
            log(f"  tiny UNet  step {step:4d}/{unet_steps}  v-prediction mse {loss.item():.4f}  {time.time() - t0:.0f}s"
                f" (about {left / 60:.0f} min left)")
    unet.eval()
    text_encoder.requires_grad_(False).eval()
    return pipe


def torch_save_atomically(obj, path):
    """torch.save to a temporary file, then rename: a process killed mid-write leaves the previous file whole."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_progress(path, recipe, log):
    """The saved state of an interrupted tiny pretraining with this recipe, or None."""
    if not path or not os.path.exists(path):
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # unreadable: start again rather than fail
        log(f"  ignoring the unreadable tiny pretraining progress file {path} ({type(e).__name__}: {e})")
        return None
    if state.get("recipe") != recipe:
        log(f"  ignoring {path}: saved by another recipe ({state.get('recipe')}, now {recipe})")
        return None
    return state


def ddpo_cache_dir() -> Path:
    """DDPO_CACHE (default ~/.cache/ddpo): the tiny models, their classifier, and --compile's inductor cache
    unless TORCHINDUCTOR_CACHE_DIR says otherwise (inductor's own default is in the temporary directory, which
    many clusters empty after each job)."""
    return Path(os.environ.get("DDPO_CACHE", Path.home() / ".cache" / "ddpo"))


def tiny_pretrained_path(seed=0, log=print) -> str:
    """Directory of the pretrained tiny pipeline for `seed`, building and caching it on first use.
    Written to a temporary directory and renamed, so an interrupted build never leaves a broken cache; its
    progress file lets the next call resume it."""
    cache = ddpo_cache_dir() / f"{TINY_VERSION}-seed{seed}"
    if not (cache / "model_index.json").exists():
        progress = cache.with_name(f"{cache.name}.progress.pt")
        cache.parent.mkdir(parents=True, exist_ok=True)
        log(f"pretraining the tiny pipeline once (about 5 minutes on 2 CPU cores; cached in {cache}; if it is "
            f"interrupted, the next build resumes from {progress.name}, saved every {TINY_SAVE_EVERY} UNet steps) ...")
        with torch.random.fork_rng():
            pipe = pretrain_tiny_pipeline(build_tiny_pipeline(seed), seed=seed, progress=progress, log=log)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process finished first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        progress.unlink(missing_ok=True)
    return str(cache)


# ------------------------------------------------------------------------------------------------------
# The tiny world's judge: a classifier of what synthetic_shapes draws, trained in code on fresh synthetic
# images (a minute on 2 cores, once; cached beside the tiny pipeline). It scores the tiny `tiny_alignment`
# reward (rewards.py), the miniature of the paper's prompt-alignment task, and the alignment that every
# tiny run logs beside its own reward, so that over-optimisation shows.
# ------------------------------------------------------------------------------------------------------
ATTRIBUTES = {"colour": list(COLORS), "shape": [*SHAPES, "none"], "background": list(COLORS)}


def caption_attributes(caption):
    """'a striped red circle on speckled blue' -> {'colour': 'red', 'shape': 'circle', 'background': 'blue'};
    a caption without a shape ('striped green') -> {'shape': 'none', 'background': 'green'}. None if the
    caption is not of the tiny world's grammar. Textures are not judged."""
    words = [w for w in caption.split() if w not in TEXTURES]
    if len(words) == 5 and words[0] in ("a", "an") and words[1] in COLORS and words[2] in SHAPES \
            and words[3] == "on" and words[4] in COLORS:
        return {"colour": words[1], "shape": words[2], "background": words[4]}
    if len(words) == 1 and words[0] in COLORS:
        return {"shape": "none", "background": words[0]}
    return None


class ShapeClassifier(torch.nn.Module):
    """A small CNN on 32x32 images in [0, 1] with one head per attribute: logits for the shape's colour
    (9), the shape (4 + none) and the background colour (9)."""

    def __init__(self):
        super().__init__()
        conv = lambda i, o, s: [torch.nn.Conv2d(i, o, 3, s, 1), torch.nn.GroupNorm(8, o), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*conv(3, 32, 1), *conv(32, 32, 2), *conv(32, 64, 2), *conv(64, 64, 2),
                                        torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 128), torch.nn.SiLU())
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(128, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, images):  # (B, 3, 32, 32) -> {attribute: (B, K) logits}
        features = self.body(images * 2 - 1)
        return {k: head(features) for k, head in self.heads.items()}


def attribute_targets(captions):
    """{attribute: (B,) class indices}, -100 (ignored by cross_entropy) where the caption does not say."""
    parsed = [caption_attributes(c) or {} for c in captions]
    return {k: torch.tensor([names.index(p[k]) if k in p else -100 for p in parsed]) for k, names in ATTRIBUTES.items()}


def train_shape_classifier(seed=0, steps=800, batch_size=64, log=print):
    """ShapeClassifier trained on fresh synthetic_shapes batches (never the same image twice)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed + 7)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        images, captions = synthetic_shapes(batch_size, g)
        logits, targets = model(images), attribute_targets(captions)
        loss = sum(F.cross_entropy(logits[k], targets[k], ignore_index=-100) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"  tiny classifier step {step:4d}/{steps}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    return model.eval().requires_grad_(False)


def tiny_classifier(seed=0, log=print) -> ShapeClassifier:
    """The trained ShapeClassifier, training and caching it (DDPO_CACHE) on first use."""
    path = ddpo_cache_dir() / f"{TINY_VERSION}-classifier-seed{seed}.pt"
    if path.exists():
        model = ShapeClassifier().eval().requires_grad_(False)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    log(f"training the tiny world's classifier once (cached in {path}) ...")
    with torch.random.fork_rng():
        model = train_shape_classifier(seed, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_save_atomically(model.state_dict(), path)
    return model


@torch.no_grad()
def attribute_accuracy(model, images, captions):
    """{attribute: fraction of the images whose caption states it that the classifier gets right}."""
    logits, targets = model(images), attribute_targets(captions)
    return {k: (logits[k].argmax(1) == targets[k])[targets[k] >= 0].float().mean().item() for k in ATTRIBUTES}


def prompt_diversity(images, prompts):
    """Per image: its mean RMS pixel distance to the batch's images of other prompts (0 if there are none).
    Images that ignore their prompts (every prompt the same flat field) score 0."""
    x = images.detach().float().flatten(1)  # (B, 3*H*W)
    distance = torch.cdist(x, x) / math.sqrt(x.shape[1])  # (B, B) RMS distances
    other = torch.tensor([[p != q for q in prompts] for p in prompts], dtype=x.dtype, device=x.device)
    return ((distance * other).sum(1) / other.sum(1).clamp(min=1)).tolist()


def tiny_monitor():
    """fn(images, prompts) -> per-image {alignment, accuracy, shape_accuracy, diversity}: the tiny_alignment
    reward and its info (rewards.py), and prompt_diversity. Logged in every tiny run, whatever its reward."""
    alignment = rewards_lib.make_tiny_alignment()

    def monitor(images, prompts):
        scores, info = alignment(images, prompts)
        return {"alignment": scores.tolist(), **info, "diversity": prompt_diversity(images, prompts)}

    return monitor


if __name__ == "__main__":
    main()
