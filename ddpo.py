"""DDPO: Denoising Diffusion Policy Optimization, in one file.

Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models with Reinforcement Learning" (2023),
arXiv 2305.13301. A denoising trajectory x_T -> ... -> x_0 is an episode; each DDIM step (eta > 0) is a
Gaussian action with an exact log-likelihood; the reward r(x_0, c) arrives at the end. DDPO_IS, the
paper's main method, optimises a PPO-style clipped surrogate of those per-step likelihood ratios.

Read top to bottom: arguments -> DDIM step with log-prob -> advantages -> loss -> the tiny offline
pipeline -> sampling -> training step -> checkpoints -> main loop.

Run it:
    # CPU, offline, minutes: a tiny text-to-image model (pretrained in code, cached) learns a reward
    python ddpo.py --preset tiny                                   # JPEG compressibility
    python ddpo.py --preset tiny --reward jpeg_incompressibility
    python ddpo.py --preset tiny --reward brightness --shuffle-advantages   # a control: must NOT learn
    # One GPU: Stable Diffusion v1.4 + LoRA, the paper's compressibility run (sizes are per process)
    python ddpo.py --preset compressibility
    python ddpo.py --preset compressibility --model /path/to/local/sd --resume auto --run-dir runs/c1
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
import json
import math
import os
import random
import re
import shutil
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import kernels
import rewards as rewards_lib


# ------------------------------------------------------------------------------------------------------
# Arguments. Every field is a --flag (underscores become dashes); its `help` is the --help text.
# The defaults are the published per-GPU settings for Stable Diffusion (ddpo-notes §6, compressibility).
# ------------------------------------------------------------------------------------------------------
def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    preset: str = arg(None, "named set of defaults applied first (explicit flags override): " "see PRESETS")
    # model
    model: str = arg("CompVis/stable-diffusion-v1-4", "hub id or local path of a diffusers SD 1.x/2.x "
                     "checkpoint, or 'tiny' for the offline CPU pipeline pretrained in code (cached)")
    lora_rank: int = arg(4, "LoRA rank on the UNet attention projections; 0 = full fine-tuning")
    mixed_precision: str = arg("fp16", "no | fp16 | bf16: dtype of frozen weights and autocast; "
                               "trainable parameters and stored trajectories stay float32")
    gradient_checkpointing: bool = arg(False, "recompute UNet activations in the backward pass: less "
                                       "memory, more time, the same gradients")
    offload_frozen: bool = arg(False, "keep the VAE and text encoder on the CPU, moving each to the device "
                               "only for its calls (frees their memory while the UNet trains)")
    compile: bool = arg(False, "torch.compile the UNet (for GPUs: the first calls of each new batch shape "
                        "compile for a minute or more)")
    device: str = arg("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    fused_kernel: str = arg("auto", "auto | on | off: the Triton kernel of kernels.py for the training step's "
                            "log-prob (auto = on for CUDA, or on CPU under TRITON_INTERPRET=1)")
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
    prompts: str = arg("imagenet_animals", "built-in prompt set name (see PROMPT_SETS) or a .txt file, "
                       "one prompt per line")
    # sampling (per process)
    resolution: int = arg(512, "image side in pixels")
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
    max_grad_norm: float = arg(1.0, "gradient-norm clip")
    clip_range: float = arg(1e-4, "PPO clip range on the per-step likelihood ratio")
    adv_clip_max: float = arg(5.0, "advantages are clamped to [-adv_clip_max, adv_clip_max]")
    per_prompt_stat_tracking: bool = arg(True, "normalise rewards per prompt (else over the epoch batch)")
    stat_buffer_size: int = arg(16, "per-prompt FIFO length of the stat tracker")
    stat_min_count: int = arg(16, "below this many rewards for a prompt, use the batch statistics")
    shuffle_advantages: bool = arg(False, "CONTROL: permute advantages across samples; a run that "
                                   "still 'learns' with this is not learning the reward")
    # bookkeeping
    seed: int = arg(0, "random seed")
    run_dir: str = arg(None, "directory for config, metrics, images and checkpoints "
                       "(default runs/<reward>-<time>)")
    resume: str = arg(None, "checkpoint directory to resume from, or 'auto' (latest in --run-dir, "
                      "or start fresh if none)")
    save_every: int = arg(10, "checkpoint every N epochs (and always at the end)")
    keep_checkpoints: int = arg(3, "keep only the last K checkpoints")
    image_every: int = arg(5, "write a PNG grid of samples every N epochs (0 = never)")


PRESETS = {
    # CPU, offline: the tiny pipeline pretrained in code. Minutes on 2 cores. Full fine-tuning of its
    # 1.0M-parameter UNet and no CFG: measured to learn faster per CPU second than LoRA or CFG here.
    # clip_range 1e-3: log p is a mean over 12*16*16 = 3072 latent elements instead of SD's 16384, so
    # the ratio is noisier than SD's (sqrt(16384/3072) = 2.3x) and a few CPU minutes need larger steps.
    "tiny": dict(model="tiny", prompts="tiny_shapes", reward="jpeg_compressibility", mixed_precision="no",
                 resolution=32, num_steps=10, guidance_scale=1.0, sample_batch_size=32, sample_num_batches=2,
                 train_batch_size=16, gradient_accumulation_steps=1, timestep_fraction=0.5, num_epochs=120,
                 train_micro_batch=80,  # all 16 x 5 pairs of a step in one UNet call: 2.0 -> 1.0 s/epoch here
                 lora_rank=0, learning_rate=3e-4, clip_range=1e-3, stat_buffer_size=32, stat_min_count=8,
                 save_every=20, image_every=10),
    # ddpo-notes §6 (kvablack/ddpo-pytorch, SD v1.4, LoRA r4, fp16), sizes per GPU for 8 GPUs (6 for alignment).
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


def article(word):
    return "an" if word[0] in "aeiou" else "a"


PROMPT_SETS = {
    "simple_animals": SIMPLE_ANIMALS,
    "imagenet_animals": IMAGENET_ANIMALS,
    "animals_activities": [f"{article(a)} {a} {act}" for a in SIMPLE_ANIMALS for act in ACTIVITIES],
    "tiny_shapes": None,  # filled in below, next to the tiny pipeline's synthetic captions
}


def build_parser():
    parser = argparse.ArgumentParser(description="DDPO fine-tuning of a text-to-image diffusion model.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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


def fail(message):
    """Stop with one clear line (no traceback): bad input is the user's to fix, not a crash."""
    raise SystemExit(f"ddpo.py: error: {message}")


def load_prompts(spec: str) -> list:
    if spec in PROMPT_SETS:
        return list(PROMPT_SETS[spec])
    path = Path(spec)
    if not path.is_file():
        fail(f"--prompts {spec!r} is neither a built-in set ({', '.join(PROMPT_SETS)}) nor an existing file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        fail(f"prompt file {spec!r} has no prompts (one per line expected)")
    return prompts


def validate(args: Args):
    """Every check that needs no model, so that bad input fails in a second, not after loading SD."""
    try:
        rewards_lib.parse_reward_spec(args.reward)
    except rewards_lib.RewardError as e:
        fail(f"--reward: {e}")
    if not args.eta > 0:
        fail(f"--eta must be > 0 (got {args.eta}): at eta = 0 DDIM is deterministic and the policy has "
             "no log-likelihood")
    if args.fused_kernel not in ("auto", "on", "off"):
        fail(f"--fused-kernel must be auto, on or off (got {args.fused_kernel!r})")
    if args.mixed_precision not in ("no", "fp16", "bf16"):
        fail(f"--mixed-precision must be no, fp16 or bf16 (got {args.mixed_precision!r})")
    for name in ("num_steps", "sample_batch_size", "sample_num_batches", "train_batch_size",
                 "gradient_accumulation_steps", "num_inner_epochs", "resolution", "stat_buffer_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.num_epochs < 0 or args.lora_rank < 0 or args.save_every < 1:
        fail("--num-epochs and --lora-rank must be >= 0, --save-every >= 1")
    if args.train_micro_batch < 0:
        fail(f"--train-micro-batch must be >= 0 (got {args.train_micro_batch})")
    if not 0 < args.timestep_fraction <= 1:
        fail(f"--timestep-fraction must be in (0, 1] (got {args.timestep_fraction})")
    if not args.clip_range > 0:
        fail(f"--clip-range must be > 0 (got {args.clip_range})")
    samples = args.sample_batch_size * args.sample_num_batches
    per_step = args.train_batch_size * args.gradient_accumulation_steps
    if samples % per_step:
        fail(f"samples per epoch (sample_batch_size {args.sample_batch_size} x sample_num_batches "
             f"{args.sample_num_batches} = {samples}) must be divisible by train_batch_size "
             f"{args.train_batch_size} x gradient_accumulation_steps {args.gradient_accumulation_steps} "
             f"= {per_step}")
    if args.model != "tiny" and not os.path.isdir(args.model) and rewards_lib.looks_like_path(args.model):
        fail(f"--model {args.model!r}: no such directory")
    if args.resume not in (None, "auto") and not os.path.isdir(args.resume):
        fail(f"--resume {args.resume!r}: no such checkpoint directory")
    if args.resume == "auto" and args.run_dir is None:
        fail("--resume auto needs --run-dir (the run whose latest checkpoint to continue)")
    load_prompts(args.prompts)


# ------------------------------------------------------------------------------------------------------
# The DDIM step with log-prob (ddpo-notes §2). The policy at step t is N(mu, std^2 I).
# ------------------------------------------------------------------------------------------------------
def ddim_coefficients(scheduler, timestep, batch_size, eta, device):
    """Per-sample (B,) float64 coefficients of the DDIM step: sqrt(abar_t), sqrt(1 - abar_t),
    sqrt(abar_prev), the direction coefficient sqrt(1 - abar_prev - std^2), and std = eta * sigma_t.
    float64 because near t = 0, 1 - abar_t / abar_prev ~ 1e-3 cancels badly in float32."""
    t = torch.as_tensor(timestep, device=device).long().reshape(-1).expand(batch_size)  # (B,)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=device, dtype=torch.float64)
    alpha_t = alphas_cumprod[t]  # abar_t
    alpha_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)
    std = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()  # eta * sigma_t
    return alpha_t.sqrt(), (1 - alpha_t).sqrt(), alpha_prev.sqrt(), (1 - alpha_prev - std**2).sqrt(), std


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
    Gradients flow only through mu (x_{t-1} is detached; std does not depend on the model).
    """
    if not eta > 0:
        raise ValueError(f"eta must be > 0 (got {eta}): the step needs a nonzero std to have a log-prob")
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before ddim_step_with_logprob")
    B, device = sample.shape[0], sample.device
    model_output, sample = model_output.float(), sample.float()
    shape = (B,) + (1,) * (sample.ndim - 1)
    coefficients = ddim_coefficients(scheduler, timestep, B, eta, device)  # (B,) float64 each
    std = coefficients[-1]
    sqrt_a, sqrt_1ma, sqrt_a_prev, dir_coef, std32 = (c.float().reshape(shape) for c in coefficients)

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
    mean = sqrt_a_prev * x0 + dir_coef * eps
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32)
        prev_sample = mean + std32 * noise
    prev_sample = prev_sample.detach().float()
    log_norm = (std.log() + 0.5 * math.log(2 * math.pi)).float().reshape(shape)  # log(std sqrt(2 pi))
    log_prob = -((prev_sample - mean) ** 2) / (2 * std32**2) - log_norm
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.ndim)))


# ------------------------------------------------------------------------------------------------------
# Advantages (ddpo-notes §3).
# ------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------
# The clipped surrogate (DDPO_IS, ddpo-notes §4).
# ------------------------------------------------------------------------------------------------------
def ddpo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))), A clamped to +-adv_clip_max,
    ratio = exp(log_prob - old_log_prob). All (B,). Returns (loss, ratio)."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


# ------------------------------------------------------------------------------------------------------
# The tiny offline pipeline: a small SD-shaped model (UNet2DConditionModel, AutoencoderKL, CLIP text
# encoder, byte-level CLIP tokenizer) built from configs. Random weights are a poor RL test bed (any
# update saturates the images), so --model tiny pretrains it in code on synthetic captioned images of
# coloured shapes, about 140 s on 2 CPU cores, once; the result is cached (DDPO_CACHE, default
# ~/.cache/ddpo) as an ordinary diffusers pipeline directory.
# ------------------------------------------------------------------------------------------------------
TINY_VERSION = "tiny-v2"  # bump when the tiny model or its pretraining changes, so caches are rebuilt
COLORS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.25, 0.9),
          "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.2, 0.7), "orange": (1.0, 0.55, 0.1),
          "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08), "grey": (0.5, 0.5, 0.5)}
SHAPES = ("circle", "square", "triangle", "ring")
TEXTURES = ("plain", "striped", "speckled")
PROMPT_SETS["tiny_shapes"] = [f"a {fg} {shape} on {bg}" for fg, shape, bg in
                              [("red", "circle", "blue"), ("yellow", "square", "black"),
                               ("green", "triangle", "white"), ("purple", "ring", "grey"),
                               ("orange", "circle", "green"), ("blue", "square", "yellow"),
                               ("white", "triangle", "purple"), ("black", "ring", "orange")]]


def byte_level_clip_tokenizer(max_length=32):
    """A CLIPTokenizer with the 256 byte symbols (and their end-of-word forms) and no merges: every
    character is a token. Built in code, so no vocabulary file is needed."""
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
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_tiny_pipeline(seed=0):
    """The tiny StableDiffusionPipeline with random weights from `seed`: 32x32 images, a VAE with 2x
    downsampling and 12 latent channels (latents 12x16x16: as many numbers as pixels, so its decoder can
    draw both flat colour and per-pixel texture, the two ends of JPEG size), a 1.0M-parameter UNet with
    cross-attention at 8x8 only, a 2-layer CLIP text encoder, and a DDIM scheduler with Stable
    Diffusion's noise schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = byte_level_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=12, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(sample_size=16, in_channels=12, out_channels=12, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def synthetic_shapes(n, generator, size=32):
    """n captioned 32x32 images: a coloured shape (circle, square, triangle, ring), plain, striped or
    speckled, at a random place and size, on a plain, striped or speckled coloured background; one in
    eight has no shape at all. Returns ((n, 3, H, W) in [0, 1], captions). Captions name what is drawn
    ('a striped red circle on speckled blue', 'striped green'). The empty and the textured backgrounds
    put both ends of JPEG size (flat colour, texture everywhere) inside what the tiny model can draw."""
    g = generator
    names = list(COLORS)
    rgb = torch.tensor([COLORS[c] for c in names])  # (K, 3)
    fg = torch.randint(len(names), (n,), generator=g)
    bg = (fg + torch.randint(1, len(names), (n,), generator=g)) % len(names)  # bg != fg
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    empty = torch.rand(n, generator=g) < 0.125
    texture, bg_texture = torch.randint(len(TEXTURES), (2, n), generator=g)
    cy, cx = (torch.rand(2, n, 1, 1, generator=g) * 12 + 10)  # centre in [10, 22]
    r = torch.rand(n, 1, 1, generator=g) * 5 + 6  # "radius" in [6, 11]
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dy, dx = yy - cy, xx - cx  # (n, H, W)
    dist = (dy**2 + dx**2).sqrt()
    masks = torch.stack([dist < r,
                         torch.maximum(dy.abs(), dx.abs()) < r * 0.85,
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


def pretrain_tiny_pipeline(pipe, seed=0, vae_steps=300, unet_steps=600, batch_size=48, log=print):
    """Make the random tiny pipeline a real (if small) text-to-image model: train the VAE as an
    autoencoder, then the UNet as an epsilon-prediction denoiser on the VAE latents of synthetic captioned
    images, with 10% of captions dropped for classifier-free guidance."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    vae, unet, text_encoder, scheduler = pipe.vae, pipe.unet, pipe.text_encoder, pipe.scheduler
    t0 = time.time()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0)
    for step in range(vae_steps):
        images, _ = synthetic_shapes(batch_size, g)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean + 0.05 * torch.randn(posterior.mean.shape, generator=g)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == vae_steps - 1:
            log(f"  tiny VAE   step {step:4d}/{vae_steps}  recon mse {loss.item():.4f}  {time.time() - t0:.0f}s")
    vae.requires_grad_(False).eval()

    # A fixed pool of encoded images: the UNet then trains without paying for the VAE every step.
    with torch.no_grad():
        images, captions = synthetic_shapes(8192, g)
        latents = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in images.split(512)])
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
        latents = latents * vae.config.scaling_factor
        captions = [c if keep else "" for c, keep in zip(captions, (torch.rand(8192, generator=g) > 0.1).tolist())]
        embeds = torch.cat([encode_prompts(pipe, chunk) for chunk in np.array_split(captions, 16)])

    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=unet_steps, pct_start=0.05)
    for step in range(unet_steps):
        idx = torch.randint(len(latents), (batch_size,), generator=g)
        x0, emb = latents[idx], embeds[idx]
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, emb).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == unet_steps - 1:
            log(f"  tiny UNet  step {step:4d}/{unet_steps}  denoising mse {loss.item():.4f}  {time.time() - t0:.0f}s")
    unet.eval()
    return pipe


def tiny_pretrained_path(seed=0, log=print) -> str:
    """Directory of the pretrained tiny pipeline for `seed`, building and caching it on first use.
    Written to a temporary directory and renamed, so an interrupted build never leaves a broken cache."""
    cache = Path(os.environ.get("DDPO_CACHE", Path.home() / ".cache" / "ddpo")) / f"{TINY_VERSION}-seed{seed}"
    if not (cache / "model_index.json").exists():
        log(f"pretraining the tiny pipeline once (cached in {cache}) ...")
        with torch.random.fork_rng():
            pipe = pretrain_tiny_pipeline(build_tiny_pipeline(seed), seed=seed, log=log)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process finished first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    return str(cache)


# ------------------------------------------------------------------------------------------------------
# Sampling: trajectories with per-step log-probs. The UNet call is shared with training (noise_preds),
# so that re-scoring a stored trajectory with the weights that sampled it gives ratio == 1 exactly.
# ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(pipe, prompts):
    """Text-encoder hidden states (B, L, D) for a list of prompts, padded to the tokenizer's max length."""
    tokens = pipe.tokenizer(list(prompts), padding="max_length", truncation=True,
                            max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    return pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0]


def noise_preds(unet, latents, timesteps, cond_embeds, uncond_embeds, guidance_scale):
    """(eps_cond, eps_uncond) from ONE batched UNet call on [uncond; cond]; eps_uncond is None without CFG
    (guidance_scale <= 1). latents (B, C, h, w) float32, timesteps scalar or (B,), embeds (B, L, D).
    Outputs stay in the model dtype. Sampling and training both call this, under the same autocast."""
    t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
    if guidance_scale <= 1:
        return unet(latents, t, cond_embeds).sample, None
    eps = unet(torch.cat([latents, latents]), torch.cat([t, t]), torch.cat([uncond_embeds, cond_embeds])).sample
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_cond, eps_uncond


def guide(eps_cond, eps_uncond, guidance_scale):
    """Classifier-free guidance in float32: eps_u + w * (eps_c - eps_u)."""
    if eps_uncond is None:
        return eps_cond.float()
    return eps_uncond.float() + guidance_scale * (eps_cond.float() - eps_uncond.float())


@torch.no_grad()
def sample_trajectories(unet, scheduler, cond_embeds, uncond_embeds, latent_shape, args, generator, autocast,
                        timer=contextlib.nullcontext):
    """DDIM trajectories with log-probs, all stored in float32 whatever the model dtype (the ratio must be
    exactly 1 on-policy; fp16 latents would move it by ~1e-4, the size of the clip range). No host sync
    inside the loop. Returns latents (B, T+1, C, h, w) = x_T .. x_0 and log_probs (B, T) of each step."""
    B = cond_embeds.shape[0]
    x = torch.randn((B, *latent_shape), generator=generator, device=cond_embeds.device) * scheduler.init_noise_sigma
    trajectory, log_probs = [x], []
    for t in scheduler.timesteps:
        with timer(), autocast():
            eps_cond, eps_uncond = noise_preds(unet, x, t, cond_embeds, uncond_embeds, args.guidance_scale)
        x, log_prob = ddim_step_with_logprob(scheduler, guide(eps_cond, eps_uncond, args.guidance_scale), t, x,
                                             eta=args.eta, generator=generator)
        trajectory.append(x)
        log_probs.append(log_prob)
    return torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1)


@torch.no_grad()
def decode_images(vae, latents, autocast):
    """VAE latents (B, C, h, w) -> images (B, 3, H, W) float32 in [0, 1]."""
    with autocast():
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------------------------
# Training on one epoch's samples (ddpo-notes §5.4).
# ------------------------------------------------------------------------------------------------------
def train_on_samples(unet, scheduler, samples, uncond_embeds, optimizer, params, scaler, args, generator,
                     autocast, on_step, fused=False, progress=lambda steps: steps, timer=contextlib.nullcontext):
    """Inner epochs over `samples` (dict of (N, ...) tensors): shuffle samples, shuffle time per sample,
    keep the first floor(T * timestep_fraction) time slots, and recompute log p of each kept (sample, slot)
    pair with the current UNet. One optimizer step covers train_batch_size * gradient_accumulation_steps
    samples: its P pairs are packed into UNet calls of `train_micro_batch` pairs (any pairs can share a
    call: per-sample timesteps), each backpropagating its summed loss / P, so the step sees exactly the mean
    loss over its P pairs, as the one-timestep-at-a-time order does (the order this reproduces when
    train_micro_batch = train_batch_size). Then one clipped AdamW step, reported through on_step(metrics).
    fused=True computes log p with the Triton kernels of kernels.py instead of ddim_step_with_logprob;
    progress wraps the loop over optimizer steps (e.g. tqdm); timer() wraps model calls (time/model_s).
    Returns the max |ratio - 1| before the first optimizer step (0 up to round-off when the forward paths
    of sampling and training agree)."""
    N, T = samples["timesteps"].shape
    device = samples["latents"].device
    T_train = max(1, int(T * args.timestep_fraction))
    B, G = args.train_batch_size, args.gradient_accumulation_steps
    micro = args.train_micro_batch or B
    ratio_dev_onpolicy = None
    stats = torch.zeros(4, device=device)  # sums over pairs: loss, approx_kl, clipped, count
    ratio_dev = torch.zeros((), device=device)  # max |ratio - 1| since the last optimizer step
    # The pairs of one optimizer step, in the one-timestep-at-a-time order: for each of its G train
    # batches, for each kept slot j, the batch's B samples. (P,) sample offsets and (P,) slots, P = G*T_train*B.
    offsets = torch.arange(G * B, device=device).view(G, 1, B).expand(G, T_train, B).reshape(-1)
    slots = torch.arange(T_train, device=device).view(1, T_train, 1).expand(G, T_train, B).reshape(-1)
    P = len(offsets)
    for _ in range(args.num_inner_epochs):
        perm = torch.randperm(N, generator=generator).to(device)
        shuffled = {k: v[perm] for k, v in samples.items()}
        time_perm = torch.stack([torch.randperm(T, generator=generator) for _ in range(N)]).to(device)  # (N, T)
        rows = torch.arange(N, device=device)[:, None]
        for key in ("timesteps", "latents", "next_latents", "log_probs"):
            shuffled[key] = shuffled[key][rows, time_perm]
        for first in progress(range(0, N, G * B)):
            for start in range(0, P, micro):
                i, j = first + offsets[start:start + micro], slots[start:start + micro]  # (m,) pairs
                x_t, t, x_prev = shuffled["latents"][i, j], shuffled["timesteps"][i, j], shuffled["next_latents"][i, j]
                old_log_prob, embeds = shuffled["log_probs"][i, j], shuffled["embeds"][i]
                with timer(), autocast():
                    eps_cond, eps_uncond = noise_preds(unet, x_t, t, embeds, uncond_embeds.expand(len(i), -1, -1),
                                                       args.guidance_scale)
                if fused:  # kernels.py: guidance, DDIM mean and log-prob in one Triton kernel each way
                    log_prob, _ = kernels.ddim_logprob_ratio(scheduler, eps_cond, eps_uncond, args.guidance_scale, t,
                                                             x_t, x_prev, old_log_prob, eta=args.eta)
                else:
                    _, log_prob = ddim_step_with_logprob(scheduler, guide(eps_cond, eps_uncond, args.guidance_scale),
                                                         t, x_t, eta=args.eta, prev_sample=x_prev)
                loss, ratio = ddpo_loss(log_prob, old_log_prob, shuffled["advantages"][i], args.clip_range,
                                        args.adv_clip_max)
                with timer():  # the backward pass is the UNet's too
                    scaler.scale(loss * (len(i) / P)).backward()
                with torch.no_grad():
                    stats += torch.stack([loss * len(i), 0.5 * ((log_prob - old_log_prob) ** 2).sum(),
                                          ((ratio - 1).abs() > args.clip_range).float().sum(),
                                          torch.tensor(float(len(i)), device=device)])
                    ratio_dev = torch.maximum(ratio_dev, (ratio - 1).abs().max())
            average_gradients(params)  # torchrun: the mean over processes, identical on every rank
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if distributed():  # the step's metrics over every process's pairs
                torch.distributed.all_reduce(stats)
                torch.distributed.all_reduce(ratio_dev, op=torch.distributed.ReduceOp.MAX)
            loss_sum, kl_sum, clip_sum, count, dev, norm = torch.cat(
                [stats, ratio_dev[None], grad_norm.float().reshape(1).to(device)]).tolist()  # one host sync
            if ratio_dev_onpolicy is None:
                ratio_dev_onpolicy = dev
            on_step({"train/loss": loss_sum / count, "train/approx_kl": kl_sum / count,
                     "train/clipfrac": clip_sum / count, "train/ratio_dev_max": dev, "train/grad_norm": norm,
                     "train/lr": optimizer.param_groups[0]["lr"]})
            stats.zero_()
            ratio_dev.zero_()
    return ratio_dev_onpolicy


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
               "train_batch_size", "gradient_accumulation_steps")  # change these and the state means something else


def trainable_state(unet):
    return {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir, next_epoch, unet, state, args, log=print):
    from diffusers import StableDiffusionPipeline

    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"epoch_{next_epoch:04d}", root / f"epoch_{next_epoch:04d}.tmp"
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
    for old in list_checkpoints(run_dir)[:-args.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log(f"saved checkpoint {final}")


def list_checkpoints(run_dir):
    root = Path(run_dir) / "checkpoints"
    done = [p for p in root.glob("epoch_*") if p.suffix != ".tmp" and (p / "trainer_state.pt").exists()]
    return sorted(done)


def check_resumable(checkpoint, args):
    saved = json.loads((Path(checkpoint) / "config.json").read_text())
    changed = [f"{k} {saved[k]!r} -> {getattr(args, k)!r}" for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
    if changed:
        fail(f"cannot resume from {checkpoint}: the run changed {'; '.join(changed)}. Resume with the "
             "original settings or start a new --run-dir")


def load_checkpoint(checkpoint, unet, args):
    state = torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=False)
    if args.lora_rank > 0:
        weights = state.pop("trainable")
    else:
        from diffusers import UNet2DConditionModel

        weights = UNet2DConditionModel.from_pretrained(Path(checkpoint) / "unet").state_dict()
    missing = set(trainable_state(unet)) - set(weights)
    if missing:
        fail(f"checkpoint {checkpoint} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name in weights:
                p.copy_(weights[name])
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


def save_image_grid(path, images, prompts, scores, info=None, max_images=16, cols=4):
    """A PNG grid: each image (upscaled to at least 128 px) over its prompt, reward and first text info
    (e.g. the LLaVA answer); beside it a .json with every image's prompt, reward and info in full."""
    from PIL import Image, ImageDraw

    info = info or {}
    images = rewards_lib.to_uint8_hwc(images[:max_images])
    texts = [k for k, v in info.items() if v and isinstance(v[0], str)]
    side, caption = max(128, images.shape[1]), 24 + 11 * bool(texts)
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * side, rows * (side + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (array, prompt, score) in enumerate(zip(images, prompts, scores)):
        x, y = (i % cols) * side, (i // cols) * (side + caption)
        grid.paste(Image.fromarray(array).resize((side, side), Image.NEAREST), (x, y))
        draw.text((x + 2, y + side + 1), prompt[: side // 6], fill="black")
        draw.text((x + 2, y + side + 12), f"r = {float(score):.4g}", fill="black")
        if texts:
            draw.text((x + 2, y + side + 23), str(info[texts[0]][i])[: side // 6], fill="gray")
    grid.save(path)
    rows = [{"prompt": p, "reward": float(r), **{k: v[i] for k, v in info.items()}}
            for i, (p, r) in enumerate(zip(prompts, scores))]
    Path(path).with_suffix(".json").write_text(json.dumps(rows, indent=1))


class ModelTimer:
    """Seconds inside model calls (UNet forward and backward, VAE, text encoder): `with timer(): ...`.
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


def score_batch(reward_fn, images, prompts, name):
    """One batch through the reward (in the worker thread): (scores float32 (B,), info), the contract
    checked. Any failure becomes a RewardError naming the reward, so the loop can keep its checkpoint."""
    try:
        result = reward_fn(images, prompts)
    except rewards_lib.RewardError:
        raise
    except Exception as e:  # a bug in the reward: show where, then stop cleanly
        traceback.print_exc()
        raise rewards_lib.RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from None
    scores, info = result if isinstance(result, tuple) and len(result) == 2 else (result, {})
    scores = rewards_lib.check_scores(scores, prompts, name)
    for key, values in info.items():
        if len(values) != len(prompts):
            raise rewards_lib.RewardError(f"reward {name!r}: info[{key!r}] has {len(values)} entries, "
                                          f"expected {len(prompts)} (one per image)")
    return scores, {k: [v.item() if hasattr(v, "item") else v for v in values] for k, values in info.items()}


# ------------------------------------------------------------------------------------------------------
# Models.
# ------------------------------------------------------------------------------------------------------
def load_pipeline(args, device, dtype, log=print):
    """The pipeline from a hub id, a local path, or 'tiny'; its scheduler swapped for DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = tiny_pretrained_path(seed=0, log=log) if args.model == "tiny" else args.model
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except Exception as e:  # hub unreachable, missing files, not a diffusers SD checkpoint
        fail(f"could not load --model {args.model!r} ({rewards_lib.first_line(e)}). Without network access a hub "
             "id cannot be downloaded: pass a local diffusers directory, or --model tiny for the offline pipeline")
    config = dict(pipe.scheduler.config)
    # DDIMScheduler's own defaults clip x0 to [-1, 1] and set alpha_prev = 1 at the last step; SD was
    # trained without either, and a config that lacks the keys would silently get them.
    config.setdefault("clip_sample", False)
    config.setdefault("set_alpha_to_one", False)
    pipe.scheduler = DDIMScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@contextlib.contextmanager
def on_device(module, device):
    """The module on `device` for the duration of the block, back on the CPU after (--offload-frozen)."""
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")


def use_fast_kernels(unet, device):
    """The same math, faster kernels. NHWC activations: cuDNN's tensor-core convolutions on GPUs, and
    oneDNN's convolutions on CPUs (measured here: 12% less time per tiny training call). On CPUs also
    diffusers' plain bmm attention: PyTorch's CPU flash-attention kernel is slow at small head sizes (8 in
    the tiny UNet: 40% of a training call), and bmm attention takes 14% less time overall."""
    unet.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())


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
    if args.compile:  # in place: the module and its state-dict keys stay the same, so checkpoints do too
        unet.compile()
    return params


# ------------------------------------------------------------------------------------------------------
# The main loop (ddpo-notes §5): sample -> score (in a worker thread, overlapping the next batch) ->
# advantages -> train.
# ------------------------------------------------------------------------------------------------------
def precision(args, device):
    """The one dtype switch: (dtype of frozen weights, autocast context factory). Trainable weights and
    trajectories stay float32 whatever this is."""
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    if dtype == torch.float32:
        return dtype, contextlib.nullcontext
    return dtype, lambda: torch.autocast(device.type, dtype=dtype)


def latent_shape_of(pipe, resolution):
    """(C, h, w) of the latents of `resolution`-pixel images."""
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if resolution % vae_factor:
        fail(f"--resolution {resolution} must be a multiple of the VAE's downsampling factor {vae_factor}")
    return pipe.unet.config.in_channels, resolution // vae_factor, resolution // vae_factor


def build_reward(args, device):
    """rewards.get_reward_fn with the model flags that were given; a clear error if a model is missing."""
    options = {k: v for k, v in dict(clip_model=args.clip_model, head=args.aesthetic_head, vlm_model=args.vlm_model,
                                     bertscore_model=args.bertscore_model,
                                     bertscore_layer=args.bertscore_layer).items() if v is not None}
    try:
        return rewards_lib.get_reward_fn(args.reward, device=device, **options)
    except rewards_lib.RewardError as e:
        fail(str(e))


def sample_main(argv):
    """python ddpo.py sample --checkpoint DIR: the base model's images (top row) next to the checkpoint's
    (bottom row), from the same prompts and the same noise, with their rewards under the run's reward."""
    parser = argparse.ArgumentParser(prog="ddpo.py sample", description=sample_main.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory of a run")
    parser.add_argument("--prompts", default=None, help="prompt set or file (default: the run's)")
    parser.add_argument("--num-images", type=int, default=8, help="images per row")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the noise")
    parser.add_argument("--out", default=None, help="PNG path (default: <checkpoint>/samples.png)")
    cli = parser.parse_args(argv)
    checkpoint = Path(cli.checkpoint)
    if not (checkpoint / "config.json").is_file() or not (checkpoint / "trainer_state.pt").is_file():
        fail(f"--checkpoint {cli.checkpoint!r} is not a checkpoint directory of a ddpo.py run")
    fields = {f.name for f in dataclasses.fields(Args)}
    args = Args(**{k: v for k, v in json.loads((checkpoint / "config.json").read_text()).items() if k in fields})
    args = dataclasses.replace(args, prompts=cli.prompts or args.prompts, sample_batch_size=cli.num_images,
                               compile=False, gradient_checkpointing=False)
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
        latents, _ = sample_trajectories(pipe.unet, pipe.scheduler, embeds, uncond, latent_shape, args,
                                         torch.Generator(device).manual_seed(cli.seed), autocast)
        images = decode_images(pipe.vae, latents[:, -1], autocast)
        return images, score_batch(reward_fn, images, prompts, args.reward)[0]

    base_images, base_scores = render()
    setup_trainable(pipe.unet, args)
    load_checkpoint(checkpoint, pipe.unet, args)
    tuned_images, tuned_scores = render()
    out = Path(cli.out or checkpoint / "samples.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(out, torch.cat([base_images, tuned_images]), [f"base: {p}" for p in prompts] +
                    [f"tuned: {p}" for p in prompts], torch.cat([base_scores, tuned_scores]).tolist(),
                    max_images=2 * len(prompts), cols=len(prompts))
    print(f"wrote {out}: reward {base_scores.mean():+.4f} (base) -> {tuned_scores.mean():+.4f} (checkpoint)")
    return out


def main(argv=None):
    from tqdm.auto import tqdm

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sample"]:
        return sample_main(argv[1:])
    args = parse_args(argv)
    validate(args)
    rank, world, device = init_distributed(args.device)  # (0, 1, None) without torchrun
    is_main = rank == 0  # rank 0 alone prints and writes
    log = print if is_main else (lambda *a, **k: None)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
            else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available on this machine")
    kernel_runs_here = device.type == "cuda" or kernels.triton_interpreter_on()
    if args.fused_kernel == "on" and not kernel_runs_here:
        fail("--fused-kernel on needs a CUDA device, or TRITON_INTERPRET=1 to run the kernels on the CPU")
    fused = args.fused_kernel == "on" or (args.fused_kernel == "auto" and kernel_runs_here)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+: free speed, ample precision here
        torch.backends.cudnn.allow_tf32 = True
    reward_slug = re.sub(r"[^\w.-]+", "_", args.reward)  # "aesthetic=1,mod:fn" -> "aesthetic_1_mod_fn"
    run_dir = Path(args.run_dir or f"runs/{reward_slug}-{time.strftime('%Y%m%d-%H%M%S')}")
    checkpoint = None
    if args.resume == "auto":  # the latest complete checkpoint of this run, if any
        checkpoint = (list_checkpoints(run_dir) or [None])[-1]
    elif args.resume is not None:
        checkpoint = Path(args.resume)
    run_dir, checkpoint = all_gather_objects((run_dir, checkpoint))[0]  # rank 0's, on every rank
    if checkpoint is not None:
        check_resumable(checkpoint, args)
    prompts_all = load_prompts(args.prompts)
    # Reward models load now, so that a missing one fails before the policy loads.
    reward_fn = build_reward(args, device if args.reward_device == "auto" else torch.device(args.reward_device))
    dtype, autocast = precision(args, device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same on every rank: LoRA's random init must agree
    rank_seed = args.seed + 1000 * rank  # each process its own prompts, noise and shuffles
    np_rng = np.random.default_rng(rank_seed)  # prompts, control shuffles
    sample_gen = torch.Generator(device).manual_seed(rank_seed)  # sampling noise
    train_gen = torch.Generator().manual_seed(rank_seed + 1)  # training shuffles

    if args.model == "tiny" and world > 1:  # one process pretrains (once, cached); the others wait
        if is_main:
            tiny_pretrained_path(seed=0, log=log)
        torch.distributed.barrier()
    pipe = load_pipeline(args, device, dtype, log)
    frozen = lambda module: on_device(module, device) if args.offload_frozen else contextlib.nullcontext()
    if args.offload_frozen:
        pipe.vae.to("cpu"), pipe.text_encoder.to("cpu")
    unet = pipe.unet
    use_fast_kernels(unet, device)
    params = setup_trainable(unet, args)  # fp32 trainable weights (LoRA or all), frozen ones in `dtype`
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count)
    start_epoch, global_step = 0, 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, unet, args)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        tracker.load_state_dict(state["tracker"])
        if len(state["rng"]) != world:
            fail(f"cannot resume from {checkpoint}: it was written by {len(state['rng'])} process(es), this run "
                 f"has {world}; the batch arithmetic and every process's random state depend on it")
        set_rng_state(state["rng"][rank], np_rng, sample_gen, train_gen)
        start_epoch, global_step = state["next_epoch"], state["global_step"]
        log(f"resumed from {checkpoint} at epoch {start_epoch}, step {global_step}")

    latent_shape = latent_shape_of(pipe, args.resolution)
    pipe.scheduler.set_timesteps(args.num_steps, device=device)
    with frozen(pipe.text_encoder):
        uncond_embeds = encode_prompts(pipe, [""]).to(device)  # (1, L, D), the empty prompt of CFG

    metrics_path = run_dir / "metrics.jsonl"
    if is_main:
        (run_dir / "images").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({**dataclasses.asdict(args), "world_size": world}, indent=2))
        if metrics_path.exists():  # keep what the resumed state has seen; drop epochs it will redo
            keep = [l for l in metrics_path.read_text().splitlines() if l and json.loads(l)["epoch"] < start_epoch]
            metrics_path.write_text("".join(l + "\n" for l in keep))
    metrics_file = open(metrics_path, "a") if is_main else None

    def log_metrics(record):
        if is_main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def checkpoint_state(next_epoch, rngs):  # rngs: every process's RNG states, in rank order
        return {"next_epoch": next_epoch, "global_step": global_step, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "tracker": tracker.state_dict(), "rng": rngs}

    timer = ModelTimer(device)
    # Rewards of batch i are computed while batch i+1 samples. The worker's own CPU torch ops run on one
    # thread: a second OpenMP team competing for the same cores made sampling 2.3x slower on 2 cores.
    executor = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(1,))
    samples_per_epoch = args.sample_batch_size * args.sample_num_batches
    log(f"ddpo: {args.model} | reward {args.reward} | {samples_per_epoch} samples/epoch x {world} process(es) | "
        f"{args.num_epochs} epochs | LoRA rank {args.lora_rank} | {device} {args.mixed_precision} | {run_dir}")
    epoch, rngs_at_epoch_start, saved_epoch, in_training = start_epoch, None, start_epoch, False
    try:
        for epoch in range(start_epoch, args.num_epochs):
            rngs_at_epoch_start = all_gather_objects(rng_state(np_rng, sample_gen, train_gen))
            in_training = False
            t_epoch = time.perf_counter()
            unet.eval()
            batches, futures = [], []
            for _ in tqdm(range(args.sample_num_batches), desc=f"epoch {epoch} sample", leave=False,
                          disable=not is_main):
                prompts = [prompts_all[i] for i in np_rng.integers(len(prompts_all), size=args.sample_batch_size)]
                with timer(), frozen(pipe.text_encoder):
                    embeds = encode_prompts(pipe, prompts).to(device)  # once per batch, reused by training
                latents, log_probs = sample_trajectories(unet, pipe.scheduler, embeds, uncond_embeds.expand(
                    len(prompts), -1, -1), latent_shape, args, sample_gen, autocast, timer)
                with timer(), frozen(pipe.vae):
                    images = decode_images(pipe.vae, latents[:, -1], autocast)
                futures.append(executor.submit(score_batch, reward_fn, images, prompts, args.reward))
                batches.append(dict(prompts=prompts, embeds=embeds, latents=latents, log_probs=log_probs,
                                    images=images))
            t_sampled = time.perf_counter()
            scores, infos, error = [], {}, None
            try:
                for future in futures:
                    score, info = future.result()
                    scores.append(score)
                    for k, v in info.items():
                        infos.setdefault(k, []).extend(v)
            except rewards_lib.RewardError as e:
                error = str(e)
            t_rewarded = time.perf_counter()
            prompts = [p for b in batches for p in b["prompts"]]
            # Every process's prompts and rewards (in rank order), so that the stat tracker sees the global
            # epoch batch; a reward error anywhere stops every process (none is left waiting).
            gathered = all_gather_objects({"prompts": prompts, "scores": None if error else torch.cat(scores).tolist(),
                                           "infos": infos, "error": error})
            errors = [g["error"] for g in gathered if g["error"]]
            if errors:
                raise rewards_lib.RewardError(errors[0])
            all_prompts = [p for g in gathered for p in g["prompts"]]
            rewards = torch.tensor([r for g in gathered for r in g["scores"]], dtype=torch.float32)
            infos = {k: [x for g in gathered for x in g["infos"][k]] for k in infos}
            if args.per_prompt_stat_tracking:
                advantages = tracker.update(all_prompts, rewards.numpy())
            else:
                advantages = batch_advantages(rewards.numpy())
            advantages = advantages[rank * len(prompts):(rank + 1) * len(prompts)]  # this process's samples
            if args.shuffle_advantages:  # the control: same advantage values, no link to the samples
                advantages = advantages[np_rng.permutation(len(advantages))]
            trajectories = torch.cat([b["latents"] for b in batches])  # (N, T+1, C, h, w)
            samples = {"embeds": torch.cat([b["embeds"] for b in batches]),
                       "latents": trajectories[:, :-1], "next_latents": trajectories[:, 1:],
                       "log_probs": torch.cat([b["log_probs"] for b in batches]),
                       "timesteps": pipe.scheduler.timesteps.repeat(len(prompts), 1),
                       "advantages": torch.as_tensor(advantages, dtype=torch.float32, device=device)}
            if is_main and args.image_every and epoch % args.image_every == 0:
                save_image_grid(run_dir / "images" / f"epoch_{epoch:04d}.png", batches[0]["images"],
                                batches[0]["prompts"], scores[0].tolist(),
                                {k: v[:len(batches[0]["prompts"])] for k, v in infos.items()})

            unet.train()
            in_training, step_metrics = True, []

            def on_step(metrics):
                nonlocal global_step
                global_step += 1
                step_metrics.append(metrics)
                log_metrics({"epoch": epoch, "step": global_step, **metrics})

            ratio_dev = train_on_samples(unet, pipe.scheduler, samples, uncond_embeds, optimizer, params, scaler,
                                         args, train_gen, autocast, on_step, fused,
                                         lambda it: tqdm(it, desc=f"epoch {epoch} train", leave=False,
                                                         disable=not is_main), timer)
            t_end = time.perf_counter()
            record = {"epoch": epoch, "step": global_step,
                      "reward/mean": rewards.mean().item(), "reward/std": rewards.std(unbiased=False).item(),
                      "reward/min": rewards.min().item(), "reward/max": rewards.max().item(),
                      "train/ratio_dev_onpolicy": ratio_dev,
                      **{f"reward_info/{k}": float(np.mean(v)) for k, v in infos.items()
                         if all(isinstance(x, (int, float)) for x in v)},  # strings go to images/*.json
                      **{f"{k}_epoch_mean": float(np.mean([m[k] for m in step_metrics])) for k in
                         ("train/loss", "train/approx_kl", "train/clipfrac", "train/grad_norm")},
                      "time/epoch_s": t_end - t_epoch, "time/sample_s": t_sampled - t_epoch,
                      "time/reward_wait_s": t_rewarded - t_sampled, "time/train_s": t_end - t_rewarded,
                      "time/model_s": timer.total(),
                      "samples_per_s": len(all_prompts) / (t_end - t_epoch)}
            log_metrics(record)
            log(f"epoch {epoch:4d} | reward {record['reward/mean']:+.4f} ± {record['reward/std']:.4f} | "
                  f"kl {record['train/approx_kl_epoch_mean']:.2e} | clipfrac {record['train/clipfrac_epoch_mean']:.3f}"
                  f" | ratio-1 on-policy {ratio_dev:.1e} | {record['time/epoch_s']:.1f}s")
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.num_epochs:
                rngs = all_gather_objects(rng_state(np_rng, sample_gen, train_gen))
                if is_main:  # the others go on; they wait for rank 0 at the next epoch's gather
                    save_checkpoint(run_dir, epoch + 1, unet, checkpoint_state(epoch + 1, rngs), args)
                saved_epoch = epoch + 1
    except (rewards_lib.RewardError, KeyboardInterrupt) as e:
        # Weights change only in the training phase: if it has not started, the state is exactly that of
        # the start of this epoch, so keep it rather than lose the epochs since the last checkpoint.
        if is_main and rngs_at_epoch_start is not None and epoch > saved_epoch and not in_training:
            save_checkpoint(run_dir, epoch, unet, checkpoint_state(epoch, rngs_at_epoch_start), args)
        if isinstance(e, rewards_lib.RewardError):
            fail(f"{e}. Stopped at epoch {epoch}; checkpoints are in {run_dir / 'checkpoints'}")
        raise
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        if metrics_file:
            metrics_file.close()
    if distributed():
        torch.distributed.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    main()
