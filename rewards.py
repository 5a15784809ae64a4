"""Reward functions for DDPO.

Every reward has one contract:

    fn(images, prompts) -> (scores, info)

    images  float tensor (B, 3, H, W) in [0, 1], on any device
    prompts list of B strings
    scores  float32 tensor (B,) on the CPU, higher is better
    info    dict of per-sample extras for the logs (lists or tensors of length B), may be empty

`get_reward_fn(name)` builds one by name. The definitions follow the DDPO paper (Black et al. 2023) and
the published code: JPEG sizes at quality 95 in kB (bytes / 1000).
"""

import io

import numpy as np
import torch
from PIL import Image


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8, ROUNDED (x*255 truncated would bias dark)."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (bytes / 1000) of each image saved by PIL as a JPEG at `quality`. Returns float32 (B,)."""
    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(images, prompts):
    """Paper task "compressibility": reward = -(JPEG size in kB). Smaller files score higher."""
    kb = jpeg_size_kb(images)
    return -kb, {"jpeg_kb": kb.tolist()}


def jpeg_incompressibility(images, prompts):
    """Paper task "incompressibility": reward = +(JPEG size in kB). Larger files score higher."""
    kb = jpeg_size_kb(images)
    return kb, {"jpeg_kb": kb.tolist()}


def brightness(images, prompts):
    """Diagnostic, not from the paper: mean pixel value in [0, 1]. Cheap, and learnable in seconds, so a
    user can check that the training loop learns anything at all before paying for a real reward."""
    return images.detach().float().mean(dim=(1, 2, 3)).cpu(), {}


def darkness(images, prompts):
    """Diagnostic: 1 - mean pixel value, so that the same check runs in the other direction."""
    scores, info = brightness(images, prompts)
    return 1 - scores, info


REWARDS = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "brightness": brightness,
    "darkness": darkness,
}


def get_reward_fn(name: str, device="cpu", **options):
    """The reward called `name`, under the contract in this module's docstring."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of: {', '.join(REWARDS)}")
    return REWARDS[name]
