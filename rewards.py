"""Reward functions for DDPO: the paper's four (JPEG compressibility and incompressibility, LAION aesthetic,
LLaVA + BERTScore prompt alignment), prompt alignment in miniature for the tiny test bed, two diagnostics,
and a user's own.

Every reward has one contract:

    fn(images, prompts) -> (scores, info)

    images  float tensor (B, 3, H, W) in [0, 1], on any device
    prompts list of B strings
    scores  float32 tensor (B,) on the CPU, higher is better
    info    dict of per-sample extras for the logs (lists of length B: numbers, or strings such as the
            LLaVA answers), may be empty

`get_reward_fn(spec, device=..., **options)` builds one:
    "jpeg_compressibility"                      a reward by name (see REWARDS)
    "my_module:my_fn"                           a user's own function under the same contract
    "aesthetic=1.0,jpeg_compressibility=0.05"   a weighted sum of any of the above
Models load when the reward is built (once; nothing at import), on `device`, so a missing model fails before
any sampling. Definitions follow the DDPO paper (Black et al. 2023), §5 and its appendix.
"""

import functools
import importlib
import inspect
import io
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class RewardError(Exception):
    """A reward that cannot be built or broke its contract; the message names the reward."""


def check_scores(scores, prompts, name) -> torch.Tensor:
    """The reward contract, enforced: one finite number per image, returned as float32 (B,) on the CPU,
    or a RewardError naming the reward and the first bad sample."""
    try:
        scores = torch.as_tensor(scores).detach()
    except Exception as e:
        raise RewardError(f"reward {name!r} returned scores that are not a tensor of numbers ({e})") from None
    if scores.shape != (len(prompts),):
        raise RewardError(f"reward {name!r} returned scores of shape {tuple(scores.shape)}, expected "
                          f"({len(prompts)},): one score per image")
    if scores.dtype.is_complex:
        raise RewardError(f"reward {name!r} returned scores of dtype {scores.dtype}, expected real numbers")
    scores = scores.float().cpu()
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"reward {name!r} returned {scores[bad[0]].item()} for sample {bad[0]} "
                          f"(prompt {prompts[bad[0]]!r}); {len(bad)} of {len(prompts)} scores are not finite")
    return scores


def first_line(error: Exception) -> str:
    """The first line of an exception's message (or its type), for one-line error messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str:
    """Why the model hub cannot be reached ('' if it may be): HF_HUB_OFFLINE, or its host does not resolve.
    One DNS lookup, because offline a download retries for about a minute before it fails."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
        return ""
    except OSError as e:
        return f"no network: {host} does not resolve ({e.strerror or e})"


def from_hub_or_cache(load, name):
    """load(local_files_only=...) for a hub id: from the local cache if it is there, else downloaded, unless
    the hub is unreachable (then at once, with the reason, instead of after a minute of retries)."""
    if os.path.isdir(os.path.expanduser(name)):
        return load(local_files_only=False)
    try:
        return load(local_files_only=True)
    except Exception:
        if hub_unreachable():
            raise OSError(f"{hub_unreachable()}, and {name!r} is not in the local cache") from None
    return load(local_files_only=False)


def load_pretrained(cls, name_or_path, what, flag, **kwargs):
    """cls.from_pretrained with an error that says what failed and how to fix it offline."""
    if looks_like_path(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise RewardError(f"{flag} {name_or_path!r}: no such directory (the {what})")
    try:
        return from_hub_or_cache(lambda **k: cls.from_pretrained(name_or_path, **k, **kwargs), name_or_path)
    except Exception as e:  # hub unreachable, missing files, wrong architecture
        raise RewardError(f"could not load the {what} {name_or_path!r} ({first_line(e)}). Without network "
                          f"access a hub id cannot be downloaded: pass a local directory with {flag}") from None


def model_dtype(device, dtype=None):
    """fp16 for reward models on a GPU (they are frozen; the paper ran them in half precision), else fp32."""
    return dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)


# ------------------------------------------------------------------------------------------------------
# JPEG (paper tasks "compressibility" and "incompressibility") and two diagnostics.
# ------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------
# Aesthetic (paper task "aesthetic quality"): CLIP ViT-L/14 image embedding -> LAION MLP head.
# ------------------------------------------------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, shared by all its models
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size) CLIP pixel values, computed on the tensor the way
    CLIPImageProcessor does it on PIL images: shortest side to `size` (bicubic, antialiased; the long side
    floored as transformers does), centre crop, normalise with CLIP's mean and std."""
    h, w = images.shape[-2:]
    if min(h, w) != size:
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
        images = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)  # PIL clamps to the pixel range too
        h, w = new_h, new_w
    top, left = (h - size) // 2, (w - size) // 2
    images = images[..., top:top + size, left:left + size].float()
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


class AestheticHead(torch.nn.Module):
    """The LAION "improved aesthetic predictor" MLP: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts between
    the first layers (inactive in eval), no nonlinearities. Layer names match the published state dict
    (`layers.{0,2,4,6,7}.{weight,bias}`)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, embeds):  # (B, dim) L2-normalised CLIP image embeddings -> (B,)
        return self.layers(embeds).squeeze(-1)


def load_aesthetic_head(head: str, device) -> AestheticHead:
    """The head from a .pth file, a directory holding aesthetic-model.pth, or a hub repo id."""
    path = Path(head) / "aesthetic-model.pth" if Path(head).is_dir() else Path(head)
    if not path.is_file():
        if Path(head).is_dir() or looks_like_path(head) or path.suffix == ".pth":
            raise RewardError(f"--aesthetic-head: {str(path)!r}: no such file")
        try:  # a hub repo id
            from huggingface_hub import hf_hub_download
            path = from_hub_or_cache(lambda **k: hf_hub_download(head, "aesthetic-model.pth", **k), head)
        except Exception as e:
            raise RewardError(f"could not download the aesthetic head {head!r} ({first_line(e)}). Without "
                              "network access pass a local aesthetic-model.pth with --aesthetic-head") from None
    model = AestheticHead()
    # Published tensors were saved on a CUDA device: map them; weights_only because .pth files run code.
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False).to(device)


def make_aesthetic(device="cpu", clip_model="openai/clip-vit-large-patch14",
                   head="trl-lib/ddpo-aesthetic-predictor", dtype=None, batch_size=32):
    """Paper reward "aesthetic quality": the LAION aesthetic score (typically 4-8) of each image."""
    from transformers import CLIPModel

    dtype = model_dtype(device, dtype)
    clip = load_pretrained(CLIPModel, clip_model, "CLIP model", "--clip-model", dtype=dtype)
    vision, projection = clip.vision_model, clip.visual_projection  # the text tower is not needed
    vision.eval().requires_grad_(False).to(device)
    projection.eval().requires_grad_(False).to(device)
    del clip
    mlp = load_aesthetic_head(head, device)
    size = vision.config.image_size

    @torch.no_grad()
    def aesthetic(images, prompts):
        scores = []
        for chunk in images.split(batch_size):
            pixels = clip_preprocess(chunk.to(device), size).to(dtype)  # (b, 3, 224, 224)
            embeds = projection(vision(pixel_values=pixels).pooler_output).float()  # (b, 768)
            scores.append(mlp(embeds / embeds.norm(dim=-1, keepdim=True)))
        return torch.cat(scores).float().cpu(), {}

    return aesthetic


# ------------------------------------------------------------------------------------------------------
# Prompt alignment (paper task "prompt-image alignment"): LLaVA describes the image, BERTScore recall of
# its answer against "The image contains {prompt}".
# ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_text_encoder(model: str, device: str):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, model, "BERTScore tokenizer", "--bertscore-model")
    encoder = load_pretrained(AutoModel, model, "BERTScore model", "--bertscore-model")
    return tokenizer, encoder.eval().requires_grad_(False).to(device)


@torch.no_grad()
def bert_score(candidates, references, model="microsoft/deberta-xlarge-mnli", layer=40, device="cpu",
               batch_size=64):
    """BERTScore (Zhang et al. 2020) of each candidate against its reference, without idf weighting or
    baseline rescaling. Returns (precision, recall, f1), each a float32 (B,) tensor on the CPU.

    Tokens are embedded by `model` at layer `layer` (hidden_states[layer]: the output of the layer-th
    transformer layer, as the bert_score package counts) and L2-normalised; with S the cosine-similarity
    matrix of candidate tokens x reference tokens,
        recall    = mean over reference tokens r of max_c S[c, r]
        precision = mean over candidate tokens c of max_r S[c, r]
    As in the bert_score package, the special tokens ([CLS], [SEP], ...) are excluded from these means
    (weight 0) but may still be the best match of another token. An empty sentence scores 0."""
    device = str(device)
    tokenizer, encoder = load_text_encoder(model, device)
    if not 0 <= layer <= encoder.config.num_hidden_layers:
        raise RewardError(f"BERTScore layer {layer} out of range: {model!r} has "
                          f"{encoder.config.num_hidden_layers} layers")

    def embed(sentences):  # -> (B, T, D) unit vectors, (B, T) bool "is a token", (B, T) mean weights
        enc = tokenizer([s.strip() for s in sentences], padding=True, truncation=True, return_tensors="pt",
                        return_special_tokens_mask=True).to(device)
        special = enc.pop("special_tokens_mask").bool()
        hidden = encoder(**enc, output_hidden_states=True).hidden_states[layer].float()
        valid = enc["attention_mask"].bool()
        weight = (valid & ~special).float()
        return F.normalize(hidden, dim=-1), valid, weight / weight.sum(1, keepdim=True).clamp(min=1)

    precision, recall = [], []
    for i in range(0, len(candidates), batch_size):
        c, c_valid, c_weight = embed(candidates[i:i + batch_size])
        r, r_valid, r_weight = embed(references[i:i + batch_size])
        sim = torch.einsum("bcd,brd->bcr", c, r)  # (B, Tc, Tr)
        sim = sim.masked_fill(~(c_valid[:, :, None] & r_valid[:, None, :]), -2.0)  # padding never matches
        precision.append((sim.max(dim=2).values * c_weight).sum(1))
        recall.append((sim.max(dim=1).values * r_weight).sum(1))
        empty = (c_weight.sum(1) == 0) | (r_weight.sum(1) == 0)  # no real token: 0, as bert_score does
        precision[-1], recall[-1] = precision[-1].masked_fill(empty, 0), recall[-1].masked_fill(empty, 0)
    precision, recall = torch.cat(precision).cpu(), torch.cat(recall).cpu()
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall))
    return precision, recall, f1


LLAVA_QUESTION = "Answer concisely: what is going on in this image?"


def llava_prompt(processor) -> str:
    """The question in the model's chat format: its own chat template when it ships one, else LLaVA-1.5's."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": LLAVA_QUESTION}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: <image>\n{LLAVA_QUESTION} ASSISTANT:"


def make_llava_bertscore(device="cpu", vlm_model="llava-hf/llava-1.5-7b-hf",
                         bertscore_model="microsoft/deberta-xlarge-mnli", bertscore_layer=40, dtype=None,
                         batch_size=8, max_new_tokens=64):
    """Paper reward "prompt-image alignment": LLaVA answers the question (greedy, at most 64 new tokens);
    the reward is the BERTScore recall of that answer against "The image contains {prompt}"."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dtype = model_dtype(device, dtype)
    processor = load_pretrained(AutoProcessor, vlm_model, "LLaVA processor", "--vlm-model")
    processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
    vlm = load_pretrained(LlavaForConditionalGeneration, vlm_model, "LLaVA model", "--vlm-model", dtype=dtype)
    vlm = vlm.eval().requires_grad_(False).to(device)
    prompt = llava_prompt(processor)
    load_text_encoder(bertscore_model, str(device))  # fail now, not after the first sampling batch

    @torch.no_grad()
    def llava_bertscore(images, prompts):
        answers = []
        arrays = to_uint8_hwc(images)  # (B, H, W, 3) uint8, what the processor expects of an image
        for i in range(0, len(arrays), batch_size):
            chunk = list(arrays[i:i + batch_size])
            inputs = processor(images=chunk, text=[prompt] * len(chunk), padding=True,
                               return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            out = vlm.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]  # left padding: the answer starts here for all
            answers += [a.strip() for a in processor.batch_decode(new_tokens, skip_special_tokens=True)]
        references = [f"The image contains {p}" for p in prompts]
        _, recall, _ = bert_score(answers, references, model=bertscore_model, layer=bertscore_layer,
                                  device=device)
        return recall, {"answer": answers}

    return llava_bertscore


# ------------------------------------------------------------------------------------------------------
# Tiny alignment: the prompt-alignment task in miniature, for the tiny test bed (`--model tiny`). The tiny
# world's classifier (ddpo.tiny_classifier: colour, shape and background, trained on its synthetic images)
# stands in for LLaVA + BERTScore: it reads the image, and the caption says what should be there.
# ------------------------------------------------------------------------------------------------------
def make_tiny_alignment(device="cpu"):
    """reward = mean over the attributes the caption states of p(stated value | image) under the classifier,
    in [0, 1]; 1 is a certain match. Bounded, like the paper's BERTScore recall: a log-probability's long
    negative tail (a few hopeless images at -15 nats) would set every prompt's advantage scale. info:
    `accuracy` (fraction of the stated attributes the classifier reads as stated) and `shape_accuracy` (1 if
    it reads the shape as stated, 'none' included: every caption states it), the attribute hardest to draw."""
    from ddpo import attribute_targets, caption_attributes, tiny_classifier  # the tiny world lives in ddpo.py

    model = tiny_classifier().to(device)

    @torch.no_grad()
    def tiny_alignment(images, prompts):
        bad = [p for p in prompts if caption_attributes(p) is None]
        if bad:
            raise RewardError(f"reward 'tiny_alignment' judges captions of the tiny world ('a red circle on blue', "
                              f"'striped green'); got {bad[0]!r}. Use it with --prompts tiny_shapes")
        if images.shape[-2:] != (32, 32):
            raise RewardError(f"reward 'tiny_alignment' judges 32x32 images (the tiny model's); got "
                              f"{tuple(images.shape[-2:])}")
        logits = model(images.detach().float().to(device))
        targets = attribute_targets(prompts)
        p, right, stated = torch.zeros(len(prompts)), torch.zeros(len(prompts)), torch.zeros(len(prompts))
        for k, target in targets.items():
            says = target >= 0  # (B,) the caption states this attribute
            chosen = target.clamp(min=0).to(device)
            p += torch.where(says, logits[k].softmax(1).gather(1, chosen[:, None])[:, 0].cpu(), 0.0)
            right += (says & (logits[k].argmax(1).cpu() == target)).float()
            stated += says.float()
        shape_right = logits["shape"].argmax(1).cpu() == targets["shape"]
        return p / stated, {"accuracy": (right / stated).tolist(), "shape_accuracy": shape_right.float().tolist()}

    return tiny_alignment


# ------------------------------------------------------------------------------------------------------
# Building rewards: by name, a user's own module:function, or a weighted sum.
# ------------------------------------------------------------------------------------------------------
REWARDS = {  # name -> factory(device, **options) -> reward fn. Options are keyword arguments of the factory.
    "jpeg_compressibility": lambda device: jpeg_compressibility,
    "jpeg_incompressibility": lambda device: jpeg_incompressibility,
    "aesthetic": make_aesthetic,
    "llava_bertscore": make_llava_bertscore,
    "tiny_alignment": make_tiny_alignment,
    "brightness": lambda device: brightness,
    "darkness": lambda device: darkness,
}


def parse_reward_spec(spec: str) -> list:
    """'a' -> [('a', 1.0)]; 'a=1.0,b=0.05' -> [('a', 1.0), ('b', 0.05)]. Names are REWARDS keys or
    module:function. Checks names and weights (cheap, no model loads), so bad input fails at once."""
    terms = []
    for part in spec.split(","):
        name, _, weight = part.strip().rpartition("=") if "=" in part else (part.strip(), "", "1")
        try:
            weight = float(weight)
        except ValueError:
            raise RewardError(f"reward {spec!r}: weight {weight!r} of {name!r} is not a number") from None
        if not math.isfinite(weight) or weight == 0:
            raise RewardError(f"reward {spec!r}: weight {weight} of {name!r} must be finite and nonzero")
        if ":" in name:
            import_user_fn(name)
        elif name not in REWARDS:
            raise RewardError(f"unknown reward {name!r}; choose one of: {', '.join(REWARDS)}, or "
                              "module:function for your own, or name=weight,... for a weighted sum")
        terms.append((name, weight))
    return terms


def import_user_fn(name: str):
    """'my_module:my_fn' -> the function, importable from the working directory too."""
    module_name, _, fn_name = name.partition(":")
    if not module_name or not fn_name:
        raise RewardError(f"reward {name!r}: write your own reward as module:function, e.g. my_rewards:score")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {name!r}: cannot import it ({e})") from None
    except Exception as e:  # the module itself is broken: a SyntaxError, or it raises at import
        raise RewardError(f"reward {name!r}: cannot import it ({type(e).__name__}: {first_line(e)})") from None
    try:
        fn = getattr(module, fn_name)
    except AttributeError as e:
        raise RewardError(f"reward {name!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise RewardError(f"reward {name!r} is not a function")
    return fn


def get_reward_fn(spec: str, device="cpu", **options):
    """The reward described by `spec` (see the module docstring) under the common contract. `options`
    name models and settings of the factories that take them (e.g. clip_model=, head= for aesthetic;
    vlm_model=, bertscore_model=, bertscore_layer= for llava_bertscore); an option no term uses is an error."""
    terms = parse_reward_spec(spec)
    fns, used = [], set()
    for name, weight in terms:
        if ":" in name:
            fns.append((name, weight, import_user_fn(name)))
            continue
        factory = REWARDS[name]
        accepted = {k: v for k, v in options.items() if k in inspect.signature(factory).parameters}
        used |= accepted.keys()
        fns.append((name, weight, factory(device=device, **accepted)))
    if set(options) - used:
        raise RewardError(f"reward {spec!r} does not use the option(s) {', '.join(sorted(set(options) - used))}")
    if len(fns) == 1 and fns[0][1] == 1.0 and ":" not in fns[0][0]:
        return fns[0][2]

    def combined(images, prompts):
        """sum_k weight_k * reward_k; each term checked, its scores and info logged under its name."""
        total, info = torch.zeros(len(prompts)), {}
        for name, weight, fn in fns:
            result = fn(images, prompts)
            scores, extra = result if isinstance(result, tuple) else (result, {})
            scores = check_scores(scores, prompts, name)
            total += weight * scores
            if len(fns) > 1:
                info[name] = scores.tolist()
            info.update({(f"{name}/{k}" if len(fns) > 1 else k): v for k, v in extra.items()})
        return total, info

    return combined
