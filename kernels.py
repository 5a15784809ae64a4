"""The DDPO training step's log-prob and importance ratio, fused: one Triton kernel forward, one backward.

Standalone: this file needs torch, triton and a diffusers-style DDIM scheduler (`alphas_cumprod`,
`final_alpha_cumprod`, `num_inference_steps`, `config.num_train_timesteps`, `config.prediction_type`), and
nothing else of this project. Copy it into your own code as it is.

After the UNet call, every DDPO training micro-step computes, per sample b and element i of N = C*H*W:

    out    = eps_u + w * (eps_c - eps_u)         classifier-free guidance (out = eps_c without it)
    x0     = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                     DDIM paper, eq. (12)
    mu     = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps             the mean of eq. (12)
    std    = eta * sigma_t,  sigma_t^2 = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)   eq. (16)
    logp_b = -1 / (2 std^2 N) * sum_i (x_prev - mu)^2  -  log(std sqrt(2 pi))   (the MEAN over N elements)
    ratio_b = exp(logp_b - logp_old_b)
where eps = out for epsilon prediction, and for v prediction eps = sqrt(abar_t) out + sqrt(1 - abar_t) x_t,
x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) out.

In both parameterisations mu is linear in x_t and out: mu = k_x * x_t + k_e * out, with per-timestep
coefficients derived once in float64 (so nothing cancels in float32), dir = sqrt(1 - abar_prev - std^2):
    epsilon: k_x = sqrt(abar_prev) / sqrt(abar_t),   k_e = dir - sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t)
    v:       k_x = sqrt(abar_prev) sqrt(abar_t) + dir sqrt(1 - abar_t),   k_e = dir sqrt(abar_t) - sqrt(abar_prev) sqrt(1 - abar_t)
Backward, with G_b = dL/dlogp_b + dL/dratio_b * ratio_b:
    dL/d out_i = G_b * k_e * (x_prev_i - mu_i) / (std^2 N);  dL/d eps_c = w * that, dL/d eps_u = (1 - w) * that.

Order of this file, as in the Triton tutorials: reference in PyTorch -> forward kernel -> backward kernel ->
host wrappers -> autograd.Function -> the public `ddim_logprob_ratio`. `python kernels.py` checks the kernels
against the reference, counts bytes and launches, and on a GPU times the kernels alone (CUDA graphs) and the
host overhead of a call separately.
"""

import functools
import math
import os
import warnings
import weakref

import torch
import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, eager): the DDIM step's formulas as written above, differentiable by autograd.
# ------------------------------------------------------------------------------------------------------
def ddim_step_coefficients(scheduler, timestep, batch_size, eta, device):
    """Per-sample (B,) float64 sqrt(abar_t), sqrt(1 - abar_t), sqrt(abar_prev), dir, std of the DDIM step
    t -> t - num_train_timesteps // num_inference_steps (abar_prev = final_alpha_cumprod below t = 0)."""
    t = torch.as_tensor(timestep, device=device).long().reshape(-1).expand(batch_size)  # (B,)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=device, dtype=torch.float64)
    abar_t, abar_prev = abar[t], torch.where(prev_t >= 0, abar[prev_t.clamp(min=0)], final)
    std = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()  # eta * sigma_t, eq. (16)
    return abar_t.sqrt(), (1 - abar_t).sqrt(), abar_prev.sqrt(), (1 - abar_prev - std**2).sqrt(), std


def linear_coefficients(scheduler, timestep, batch_size, eta, device):
    """Per-sample float64 (k_x, k_e, std) with mu = k_x * x_t + k_e * out (see the module docstring)."""
    sqrt_a, sqrt_1ma, sqrt_a_prev, dir_coef, std = ddim_step_coefficients(scheduler, timestep, batch_size, eta,
                                                                          device)
    if scheduler.config.prediction_type == "epsilon":
        return sqrt_a_prev / sqrt_a, dir_coef - sqrt_a_prev * sqrt_1ma / sqrt_a, std
    if scheduler.config.prediction_type == "v_prediction":
        return sqrt_a_prev * sqrt_a + dir_coef * sqrt_1ma, dir_coef * sqrt_a - sqrt_a_prev * sqrt_1ma, std
    raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported")


def ddim_logprob_ratio_reference(scheduler, noise_pred_cond, noise_pred_uncond, guidance_scale, timestep, sample,
                                 prev_sample, old_log_prob, eta=1.0):
    """(log_prob, ratio), float32 (B,), computed as written (x0, then eps, then mu), in float32 with float64
    coefficients. Also handles what the kernels do not: schedulers that clip or threshold x0."""
    shape = (-1,) + (1,) * (sample.ndim - 1)
    out = noise_pred_cond.float()
    if noise_pred_uncond is not None:
        out = noise_pred_uncond.float() + guidance_scale * (out - noise_pred_uncond.float())
    x_t = sample.float()
    coefficients = ddim_step_coefficients(scheduler, timestep, x_t.shape[0], eta, x_t.device)
    sqrt_a, sqrt_1ma, sqrt_a_prev, dir_coef, std = (c.float().reshape(shape) for c in coefficients)
    if scheduler.config.prediction_type == "epsilon":
        eps, x0 = out, (x_t - sqrt_1ma * out) / sqrt_a
    elif scheduler.config.prediction_type == "v_prediction":
        eps, x0 = sqrt_a * out + sqrt_1ma * x_t, sqrt_a * x_t - sqrt_1ma * out
    else:
        raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported")
    if scheduler.config.get("thresholding"):
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.get("clip_sample"):
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    mean = sqrt_a_prev * x0 + dir_coef * eps
    log_norm = (coefficients[-1].log() + 0.5 * math.log(2 * math.pi)).float().reshape(shape)  # log(std sqrt(2 pi))
    log_prob = (-((prev_sample.detach().float() - mean) ** 2) / (2 * std**2) - log_norm).mean(
        dim=tuple(range(1, x_t.ndim)))
    return log_prob, torch.exp(log_prob - old_log_prob.detach().float())


# ------------------------------------------------------------------------------------------------------
# Kernels. Launch grid (B, S): each sample's N elements are split into S chunks of CHUNK elements (a multiple
# of BLOCK), one program per chunk, so that a small batch still fills the GPU. Per-timestep coefficients come
# from a table (see coefficient_table), so each direction is exactly one launch.
# ------------------------------------------------------------------------------------------------------
TABLE_COLUMNS = tl.constexpr(5)  # k_x, k_e, 1 / (2 std^2), 1 / std^2, log(std sqrt(2 pi))


@triton.jit
def _load_mean(c_ptr, u_ptr, x_ptr, offs, mask, k_x, k_e, w, HAS_CFG: tl.constexpr):
    """mu = k_x * x_t + k_e * out at `offs`, in float32 (out guided when HAS_CFG)."""
    out = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = u + w * (out - u)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    return k_x * x + k_e * out


@triton.jit
def ddim_logprob_fwd_kernel(
    c_ptr,        # (B, N) eps_cond (or the only prediction without CFG): fp32, fp16 or bf16
    u_ptr,        # (B, N) eps_uncond, same dtype (not read unless HAS_CFG)
    x_ptr,        # (B, N) x_t, fp32
    xp_ptr,       # (B, N) x_prev, the stored x_{t-1}, fp32
    t_ptr,        # (B,) int64 timesteps: row of the coefficient table
    table_ptr,    # (num_train_timesteps, 5) fp32 coefficient table
    old_ptr,      # (B,) fp32 old log-probs
    partial_ptr,  # (B, S) fp32 scratch: each chunk's sum of squares
    count_ptr,    # (B,) int32 arrival counters: zero on entry, left at zero on exit
    logp_ptr,     # (B,) fp32 out: log p
    ratio_ptr,    # (B,) fp32 out: exp(log p - old log p)
    N,            # elements per sample
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK (compile-time: the loop's bound)
    w,            # guidance scale
    S: tl.constexpr, HAS_CFG: tl.constexpr, BLOCK: tl.constexpr,
):
    b, s = tl.program_id(0), tl.program_id(1)
    base = b.to(tl.int64) * N
    row = table_ptr + tl.load(t_ptr + b).to(tl.int64) * TABLE_COLUMNS  # this sample's timestep
    k_x, k_e = tl.load(row + 0), tl.load(row + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # This program's chunk of the sample, BLOCK elements at a time; blocks past N are all masked. The loop's
    # bounds are compile-time constants: Triton 3.6's interpreter turns a runtime bound into a Python int with a
    # NumPy conversion that NumPy 2.4 refuses (triton-lang/triton#9171).
    for start in range(0, CHUNK, BLOCK):
        idx = s * CHUNK + start + tl.arange(0, BLOCK)
        mask = idx < N
        offs = base + idx
        mean = _load_mean(c_ptr, u_ptr, x_ptr, offs, mask, k_x, k_e, w, HAS_CFG)
        diff = tl.load(xp_ptr + offs, mask=mask, other=0.0) - mean
        acc += tl.where(mask, diff * diff, 0.0)
    tl.store(partial_ptr + b * S + s, tl.sum(acc, axis=0))
    # The last of the sample's S programs to arrive adds the S partial sums, always in the same order (so
    # the result does not depend on which program came last), and resets the counter for the next launch.
    arrived = tl.atomic_add(count_ptr + b, 1, sem="acq_rel")
    if arrived == S - 1:
        total = tl.sum(tl.load(partial_ptr + b * S + tl.arange(0, S), volatile=True), axis=0)
        logp = -total / N * tl.load(row + 2) - tl.load(row + 4)
        tl.store(logp_ptr + b, logp)
        tl.store(ratio_ptr + b, tl.exp(logp - tl.load(old_ptr + b)))
        tl.store(count_ptr + b, 0)


@triton.jit
def ddim_logprob_bwd_kernel(
    c_ptr, u_ptr, x_ptr, xp_ptr,  # (B, N) as in the forward kernel
    t_ptr, table_ptr,             # timesteps and coefficient table, as in the forward kernel
    ratio_ptr,                    # (B,) fp32 the forward's ratio
    g_logp_ptr, g_ratio_ptr,      # (B,) fp32 upstream gradients dL/dlogp, dL/dratio
    gc_ptr, gu_ptr,               # (B, N) out: dL/d eps_c, dL/d eps_u, in the predictions' dtype
    N, CHUNK: tl.constexpr, w,    # as in the forward kernel
    HAS_CFG: tl.constexpr, BLOCK: tl.constexpr,
):
    b, s = tl.program_id(0), tl.program_id(1)
    base = b.to(tl.int64) * N
    row = table_ptr + tl.load(t_ptr + b).to(tl.int64) * TABLE_COLUMNS
    k_x, k_e = tl.load(row + 0), tl.load(row + 1)
    g = tl.load(g_logp_ptr + b) + tl.load(g_ratio_ptr + b) * tl.load(ratio_ptr + b)  # dL/dlogp_b
    scale = g * k_e * tl.load(row + 3) / N
    for start in range(0, CHUNK, BLOCK):  # this program's chunk, as in the forward kernel
        idx = s * CHUNK + start + tl.arange(0, BLOCK)
        mask = idx < N
        offs = base + idx
        mean = _load_mean(c_ptr, u_ptr, x_ptr, offs, mask, k_x, k_e, w, HAS_CFG)
        grad_out = scale * (tl.load(xp_ptr + offs, mask=mask, other=0.0) - mean)
        if HAS_CFG:
            tl.store(gc_ptr + offs, (w * grad_out).to(gc_ptr.dtype.element_ty), mask=mask)
            tl.store(gu_ptr + offs, ((1 - w) * grad_out).to(gu_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(gc_ptr + offs, grad_out.to(gc_ptr.dtype.element_ty), mask=mask)


BLOCK = 1024  # elements per loop iteration: 4 warps x 32 threads x 8 elements
TARGET_PROGRAMS = 512  # split each sample's N so that B * S reaches about this many programs (H100: 132 SMs)
# Compiler options of every launch: a * b + c contracted into one fused multiply-add (one rounding), as Triton
# has done by default and every GPU timing in the README was measured with. Triton 3.9 warns that 3.10 turns
# that default off; stated here, the kernels compute the same on either, without the warning.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


@functools.lru_cache(maxsize=None)
def launch_split(B, N):
    """(S, CHUNK): S chunks per sample (a power of two, at most 64) of CHUNK elements (a multiple of BLOCK).
    Plain integer arithmetic, cached: triton.cdiv and next_power_of_2 called from the host cost ~15 us each."""
    blocks = -(-N // BLOCK)
    next_power_of_2 = lambda n: 1 << (n - 1).bit_length()
    S = min(64, next_power_of_2(max(1, TARGET_PROGRAMS // B)), next_power_of_2(blocks))
    CHUNK = -(-blocks // S) * BLOCK
    return S, CHUNK


# ------------------------------------------------------------------------------------------------------
# Host wrappers: check, allocate, launch.
# ------------------------------------------------------------------------------------------------------
def coefficient_table(scheduler, eta, device):
    """(num_train_timesteps, 5) float32: for every timestep t, the columns k_x, k_e, 1 / (2 std^2),
    1 / std^2, log(std sqrt(2 pi)) of the DDIM step t -> t - step, derived in float64. Cached per scheduler,
    inference step count, eta and device."""
    key = (scheduler.num_inference_steps, float(eta), str(device))
    cache = _tables.setdefault(scheduler, {})
    if key not in cache:
        t = torch.arange(scheduler.config.num_train_timesteps, device=device)  # every timestep t -> t - step
        k_x, k_e, std = linear_coefficients(scheduler, t, len(t), eta, device)
        var = std**2
        cache[key] = torch.stack([k_x, k_e, 1 / (2 * var), 1 / var, std.log() + 0.5 * math.log(2 * math.pi)], 1).float()
    return cache[key]


_tables = weakref.WeakKeyDictionary()  # scheduler -> {(steps, eta, device): table}
_counters = {}  # device -> int32 arrival counters, zero between launches (each launch resets what it uses)


def arrival_counters(B, device):
    """(B,) int32 zeros for the forward kernel, allocated once per device and grown as needed. Launches on one
    stream run in order, and each leaves its counters at zero."""
    key = str(device)
    if key not in _counters or len(_counters[key]) < B:
        _counters[key] = torch.zeros(max(B, 256), dtype=torch.int32, device=device)
    return _counters[key]


def _check(cond, uncond, sample, prev_sample, timesteps, old_log_prob):
    B = sample.shape[0]
    for name, t in (("noise_pred_cond", cond), ("noise_pred_uncond", uncond)):
        if t is None:
            continue
        if t.shape != sample.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, sample has {tuple(sample.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if uncond is not None and uncond.dtype != cond.dtype:
        raise TypeError(f"noise predictions must share a dtype ({cond.dtype} vs {uncond.dtype})")
    for name, t in (("sample", sample), ("prev_sample", prev_sample)):
        if t.dtype != torch.float32 or t.shape != sample.shape:
            raise TypeError(f"{name} must be float32 of shape {tuple(sample.shape)}")
    if timesteps.shape != (B,) or timesteps.dtype != torch.int64:
        raise TypeError(f"timesteps must be int64 of shape ({B},), got {timesteps.dtype} {tuple(timesteps.shape)}")
    if old_log_prob.shape != (B,) or old_log_prob.dtype != torch.float32:
        raise TypeError(f"old_log_prob must be float32 of shape ({B},)")
    devices = {t.device for t in (cond, uncond, sample, prev_sample, timesteps, old_log_prob) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def _flat(t):
    """(B, ...) -> contiguous (B, N). Non-contiguous inputs are copied, never read with wrong strides."""
    return None if t is None else t.reshape(t.shape[0], -1).contiguous()


def fused_forward(cond, uncond, w, table, timesteps, sample, prev_sample, old_log_prob):
    """Check, flatten, allocate, launch the forward kernel. Returns (log_prob, ratio), float32 (B,), and
    flat: the (B, N) contiguous eps_c, eps_u (or None), x_t, x_prev that the kernel read, for the backward."""
    _check(cond, uncond, sample, prev_sample, timesteps, old_log_prob)
    flat = c, u, x, xp = _flat(cond), _flat(uncond), _flat(sample), _flat(prev_sample)
    B, N = x.shape
    S, CHUNK = launch_split(B, N)
    logp = torch.empty(B, device=x.device, dtype=torch.float32)
    ratio = torch.empty_like(logp)
    partial = torch.empty((B, S), device=x.device, dtype=torch.float32)
    ddim_logprob_fwd_kernel[(B, S)](c, u if u is not None else c, x, xp, timesteps, table, old_log_prob, partial,
                                    arrival_counters(B, x.device), logp, ratio, N, CHUNK, float(w), S=S,
                                    HAS_CFG=u is not None, BLOCK=BLOCK, **COMPILE_OPTIONS)
    return logp, ratio, flat


def fused_backward(c, u, x, xp, w, table, timesteps, ratio, grad_logp, grad_ratio):
    """Launch the backward kernel on fused_forward's flat inputs (nothing is checked or copied again).
    Returns (dL/d eps_c, dL/d eps_u or None), (B, N) in the predictions' dtype."""
    B, N = x.shape
    S, CHUNK = launch_split(B, N)
    grad_c = torch.empty_like(c)
    grad_u = torch.empty_like(u) if u is not None else None
    ddim_logprob_bwd_kernel[(B, S)](c, u if u is not None else c, x, xp, timesteps, table, ratio,
                                    grad_logp.float().contiguous(), grad_ratio.float().contiguous(), grad_c,
                                    grad_u if grad_u is not None else grad_c, N, CHUNK, float(w),
                                    HAS_CFG=u is not None, BLOCK=BLOCK, **COMPILE_OPTIONS)
    return grad_c, grad_u


class DDIMLogProbRatio(torch.autograd.Function):
    """(log_prob, ratio) = f(eps_c, eps_u) for fixed x_t, x_prev, timesteps, logp_old:

        out = eps_u + w (eps_c - eps_u);  mu = k_x x_t + k_e out
        log_prob_b = -sum_i (x_prev - mu)^2 / (2 std^2 N) - log(std sqrt(2 pi));  ratio_b = exp(log_prob_b - logp_old_b)

    (k_x, k_e, std per sample, from `table` at the sample's timestep.) Backward recomputes mu from the
    inputs (nothing of size N is saved but the inputs themselves):
        dL/d out_i = (dL/dlogp_b + dL/dratio_b ratio_b) k_e (x_prev_i - mu_i) / (std^2 N),
        dL/d eps_c = w dL/d out,  dL/d eps_u = (1 - w) dL/d out."""

    @staticmethod
    def forward(ctx, cond, uncond, w, table, timesteps, sample, prev_sample, old_log_prob):
        logp, ratio, flat = fused_forward(cond, uncond, w, table, timesteps, sample, prev_sample, old_log_prob)
        ctx.save_for_backward(table, timesteps, ratio, *flat)  # the flat copies: the backward copies nothing
        ctx.w, ctx.shape = w, cond.shape
        return logp, ratio

    @staticmethod
    def backward(ctx, grad_logp, grad_ratio):
        table, timesteps, ratio, c, u, x, xp = ctx.saved_tensors
        # autograd materialises the gradient of an unused output as zeros, so neither is None here
        grad_c, grad_u = fused_backward(c, u, x, xp, ctx.w, table, timesteps, ratio, grad_logp, grad_ratio)
        return grad_c.view(ctx.shape), None if grad_u is None else grad_u.view(ctx.shape), None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------------
# The public function.
# ------------------------------------------------------------------------------------------------------
_warned = set()


def ddim_logprob_ratio(scheduler, noise_pred_cond, noise_pred_uncond, guidance_scale, timestep, sample,
                       prev_sample, old_log_prob, eta=1.0, fused=None):
    """log p(x_prev | x_t) of the guided DDIM step and the importance ratio exp(log p - old_log_prob).

    scheduler          a diffusers DDIMScheduler after set_timesteps (epsilon or v prediction)
    noise_pred_cond    (B, ...) the UNet's prediction for the prompt, fp32/fp16/bf16, channels-last allowed
    noise_pred_uncond  (B, ...) for the empty prompt, or None without classifier-free guidance
    guidance_scale     w of out = eps_u + w (eps_c - eps_u)
    timestep           int or (B,) integer tensor: timesteps may differ per sample
    sample, prev_sample (B, ...) x_t and the stored x_{t-1}
    old_log_prob       (B,) log p of the same step under the weights that sampled it
    Returns (log_prob, ratio), float32 (B,) each, differentiable with respect to both noise predictions.
    fused=None: the Triton kernels on CUDA tensors (or anywhere under TRITON_INTERPRET=1), else the PyTorch
    reference; True/False force the choice. Schedulers that clip or threshold x0 always take the reference
    (with a one-time warning), since mu is then not linear in the prediction."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0 (got {eta})")
    B = sample.shape[0]
    if fused is None:
        fused = sample.is_cuda or triton_interpreter_on()
    unsupported = [k for k in ("clip_sample", "thresholding") if scheduler.config.get(k)]
    if fused and unsupported:
        if tuple(unsupported) not in _warned:
            _warned.add(tuple(unsupported))
            warnings.warn(f"the fused DDIM kernel does not do {', '.join(unsupported)}: using the PyTorch "
                          "reference for this scheduler")
        fused = False
    if not fused:
        return ddim_logprob_ratio_reference(scheduler, noise_pred_cond, noise_pred_uncond, guidance_scale, timestep,
                                            sample, prev_sample, old_log_prob, eta)
    sample, prev_sample, old_log_prob = sample.float(), prev_sample.detach().float(), old_log_prob.detach().float()
    timesteps = torch.as_tensor(timestep, device=sample.device).long().reshape(-1).expand(B).contiguous()
    return DDIMLogProbRatio.apply(noise_pred_cond, noise_pred_uncond, float(guidance_scale),
                                  coefficient_table(scheduler, eta, sample.device), timesteps, sample, prev_sample,
                                  old_log_prob)


def compile_for_gpu(arch, dtype, has_cfg, B=32, N=4 * 64 * 64):
    """Compile both kernels ahead of time for CUDA compute capability `arch` (80 = A100, 90 = H100, 100 = B200,
    120 = RTX 50) with noise predictions of `dtype`, for the split of a (B, N) call; no GPU needed. Returns
    {kernel name: triton CompiledKernel} whose .asm holds "ptx" and "cubin". Run it where TRITON_INTERPRET is unset."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tt = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    S, CHUNK = launch_split(B, N)
    compiled = {}
    for kernel in (ddim_logprob_fwd_kernel, ddim_logprob_bwd_kernel):
        signature = {name: "*fp32" for name in kernel.arg_names}
        signature.update({"c_ptr": tt, "u_ptr": tt, "gc_ptr": tt, "gu_ptr": tt, "t_ptr": "*i64", "count_ptr": "*i32",
                          "N": "i32", "CHUNK": "constexpr", "w": "fp32", "S": "constexpr", "HAS_CFG": "constexpr",
                          "BLOCK": "constexpr"})
        signature = {name: signature[name] for name in kernel.arg_names}  # only this kernel's arguments
        constexprs = {k: v for k, v in {"S": S, "CHUNK": CHUNK, "HAS_CFG": has_cfg, "BLOCK": BLOCK}.items() if k in kernel.arg_names}
        compiled[kernel.__name__] = triton.compile(ASTSource(kernel, signature, constexprs),
                                                   target=GPUTarget("cuda", arch, 32), options=COMPILE_OPTIONS)
    return compiled


def triton_interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------------------
# python kernels.py: check against the reference, count bytes and launches, time on a GPU.
# ------------------------------------------------------------------------------------------------------
def count_aten_ops(fn):
    """Run fn() and count what eager PyTorch launches: every aten op that is not a view is one kernel;
    its tensor inputs are read and its outputs written. Returns (launches, bytes, fn's result)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Counter(TorchDispatchMode):
        launches, nbytes = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not any(r.alias_info is not None for r in func._schema.returns):  # views move no data
                tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
                Counter.launches += 1
                Counter.nbytes += sum(t.numel() * t.element_size() for t in tensors)
            return out

    with Counter():
        result = fn()
    return Counter.launches, Counter.nbytes, result


def fused_traffic(B, N, dtype, cfg):
    """Bytes each fused kernel moves, from its code: forward reads eps_c (, eps_u), x_t, x_prev once, and
    per sample the timestep (8), 4 table entries and logp_old (4 each), per program a partial sum and the
    counter (written and read back); writes log p and ratio. Backward reads the same N-sized inputs, per
    sample the timestep, 3 table entries, ratio and the two upstream gradients; writes the gradient(s) in the
    input dtype."""
    s, preds = torch.empty((), dtype=dtype).element_size(), 2 if cfg else 1
    S, _ = launch_split(B, N)
    forward = B * N * (preds * s + 8) + B * (8 + 4 * 5) + B * 4 * 2 + B * S * (4 + 4) * 2
    backward = B * N * (preds * s + 8) + B * (8 + 4 * 6) + B * N * preds * s
    return forward, backward


def bench_inputs(B, N, dtype, device, cfg=True):
    """A 50-step SD scheduler and random (B, 4, h, w) inputs with N = 4 h w, predictions requiring grad."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    shape = (B, 4, int(math.isqrt(N // 4)), int(math.isqrt(N // 4)))
    make = lambda dt: torch.randn(shape, generator=g).to(device=device, dtype=dt)
    cond, uncond = make(dtype).requires_grad_(), (make(dtype).requires_grad_() if cfg else None)
    x_t, x_prev = make(torch.float32), make(torch.float32)
    t = scheduler.timesteps[torch.randint(50, (B,), generator=g)].to(device)
    with torch.no_grad():
        old, _ = ddim_logprob_ratio(scheduler, cond, uncond, 5.0, t, x_t, x_prev, torch.zeros(B, device=device),
                                    fused=False)
    return scheduler, cond, uncond, t, x_t, x_prev, old


class _Nothing(torch.autograd.Function):
    """The floor of any autograd.Function on this host: takes the two predictions, returns two (B,) tensors,
    and gives back gradients allocated beforehand. No kernel, no check, no allocation of size N."""

    @staticmethod
    def forward(ctx, cond, uncond, grads):
        ctx.grads = grads
        return cond.new_empty(cond.shape[0], dtype=torch.float32), cond.new_empty(cond.shape[0], dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_logp, grad_ratio):
        return *ctx.grads, None


def time_on_gpu(B, N, dtype):
    """Microseconds per call on the current CUDA device: the forward kernel alone and the backward kernel
    alone (each replayed 100 times in a CUDA graph, so no launch or Python cost is counted); one
    ddim_logprob_ratio forward + backward through autograd (`torch.autograd.grad` on the two predictions;
    wall time of 200 calls, CPU-bound); the same through a do-nothing autograd.Function (the floor that
    autograd itself costs on this host); the two host wrappers called directly, without autograd; and what one
    more call adds, ours and the do-nothing one, when 9 share one backward pass (in_backward_us). Returns a dict."""
    scheduler, cond, uncond, t, x_t, x_prev, old = bench_inputs(B, N, dtype, "cuda")
    table = coefficient_table(scheduler, 1.0, x_t.device)
    logp, ratio, flat = fused_forward(cond.detach(), uncond.detach(), 5.0, table, t, x_t, x_prev, old)
    ones = torch.ones_like(logp)

    def graph_us(fn, reps=100):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()  # warm-up outside the graph (compiles)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / (10 * reps)

    fwd = graph_us(lambda: fused_forward(cond.detach(), uncond.detach(), 5.0, table, t, x_t, x_prev, old))
    bwd = graph_us(lambda: fused_backward(*flat, 5.0, table, t, ratio, ones, ones))

    # k calls (forward + one torch.autograd.grad on the two predictions): ours, and the do-nothing Function
    zeros = (torch.zeros_like(cond), torch.zeros_like(uncond))
    ours = call_in_one_backward(lambda: ddim_logprob_ratio(scheduler, cond, uncond, 5.0, t, x_t, x_prev, old,
                                                           fused=True), (cond, uncond), ones)
    nothing = call_in_one_backward(lambda: _Nothing.apply(cond, uncond, zeros), (cond, uncond), ones)

    def launches():  # the host wrappers alone: checks, allocations and the launches, no autograd
        _, ratio_, flat_ = fused_forward(cond.detach(), uncond.detach(), 5.0, table, t, x_t, x_prev, old)
        fused_backward(*flat_, 5.0, table, t, ratio_, ones, ones)

    call_us, floor_us, launch_us = wall_us(ours(1)), wall_us(nothing(1)), wall_us(launches)
    forward_bytes, backward_bytes = fused_traffic(B, N, dtype, True)
    return {"fwd_us": fwd, "bwd_us": bwd, "fwd_GBps": forward_bytes / fwd / 1e3, "bwd_GBps": backward_bytes / bwd / 1e3,
            "call_us": call_us, "host_us": max(0.0, call_us - fwd - bwd), "floor_us": floor_us,
            "launch_us": launch_us, "in_backward_us": in_backward_us(ours, wall_us, call_us),
            "floor_in_backward_us": in_backward_us(nothing, wall_us, floor_us)}


def call_in_one_backward(fn, inputs, grad):
    """k -> a function that makes k calls of fn() (each returning tensors of grad's shape) and backpropagates
    all of them in one torch.autograd.grad, as a training step's backward does with its one loss."""
    def make(k):
        def run():
            outputs = [out for _ in range(k) for out in fn()]
            return torch.autograd.grad(outputs, inputs, [grad] * len(outputs))
        return run
    return make


def in_backward_us(make, wall, one_us, k=9):
    """Wall microseconds that one more call adds when k calls share one backward pass: (T(k) - T(1)) / (k - 1),
    T(1) = one_us, already measured.
    What a call costs inside a training step, whose one backward pass starts autograd's engine once for all its
    calls (on a GPU the engine hands CUDA work to its per-device thread and waits for it, once per pass)."""
    return (wall(make(k)) - one_us) / (k - 1)


def wall_us(fn, reps=200):
    """Microseconds of wall time per fn() call, synchronised, after 10 warm-up calls: on a GPU, for calls
    whose kernels are short, the host's cost."""
    import time

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def misaligned(t):
    """A copy of t whose data starts one element past a 16-byte boundary (Triton compiles another variant)."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return buffer[1:].view(t.shape).copy_(t).requires_grad_(t.requires_grad)


def fused_minus_reference(scheduler, cond, uncond, guidance_scale, timestep, sample, prev_sample, old_log_prob,
                          eta=1.0):
    """The kernels against the PyTorch reference on one call: [(name, max |fused - reference|, max |reference|)]
    for log p, the ratio, and the gradients of log p + ratio with respect to each noise prediction (cond and
    uncond, or None without CFG, must require grad)."""
    predictions = [e for e in (cond, uncond) if e is not None]
    results = []
    for fused in (True, False):
        logp, ratio = ddim_logprob_ratio(scheduler, cond, uncond, guidance_scale, timestep, sample, prev_sample,
                                         old_log_prob, eta=eta, fused=fused)
        results.append((logp, ratio, *torch.autograd.grad((logp + ratio).sum(), predictions)))
    return [(name, (a - b).abs().max().item(), b.abs().max().item())
            for name, a, b in zip(("log p", "ratio", "d eps_c", "d eps_u"), *results)]


def check(device, N):
    """Fused vs reference at an SD shape, forward and gradients, on aligned inputs and on inputs off a
    16-byte boundary (for which Triton compiles another variant of each kernel)."""
    scheduler, cond, uncond, t, x_t, x_prev, old = bench_inputs(2, N, torch.float32, device)
    for label in ("aligned", "misaligned"):
        if label == "misaligned":
            cond, uncond, x_t, x_prev = map(misaligned, (cond, uncond, x_t, x_prev))
        results = fused_minus_reference(scheduler, cond, uncond, 5.0, t, x_t, x_prev, old)
        print(f"  check {label}: max |fused - reference| = "
              + ", ".join(f"{diff:.2e} ({name})" for name, diff, _ in results))
    print("  (scales: " + ", ".join(f"{scale:.2e} ({name})" for name, _, scale in results) + ")")


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused_available = device == "cuda" or triton_interpreter_on()
    print(f"device {device}; fused kernels {'on' if fused_available else 'off (set TRITON_INTERPRET=1 on CPU)'}")
    N = 4 * 64 * 64  # Stable Diffusion latents at 512 px
    if fused_available:
        check(device, N)
    print(f"\nper call at N = {N} (4x64x64), CFG, fp16 noise predictions, B samples; eager = the reference above")
    print(f"{'B':>3} {'eager fwd':>22} {'eager fwd+bwd':>22} {'fused fwd':>20} {'fused fwd+bwd':>20}")
    for B in (1, 2, 4, 8, 16, 32):
        scheduler, cond, uncond, t, x_t, x_prev, old = bench_inputs(B, N, torch.float16, "cpu")

        def eager(backward):
            logp, ratio = ddim_logprob_ratio(scheduler, cond, uncond, 5.0, t, x_t, x_prev, old, fused=False)
            if backward:
                torch.autograd.grad((logp + ratio).sum(), (cond, uncond))

        l_f, b_f, _ = count_aten_ops(lambda: eager(False))
        l_fb, b_fb, _ = count_aten_ops(lambda: eager(True))
        fwd, bwd = fused_traffic(B, N, torch.float16, True)
        print(f"{B:>3} {b_f / 1e6:8.2f} MB {l_f:4d} launches {b_fb / 1e6:8.2f} MB {l_fb:4d} launches "
              f"{fwd / 1e6:7.2f} MB {1:3d} launches {(fwd + bwd) / 1e6:7.2f} MB {2:3d} launches")
    print("(eager includes the float64 derivation of the (B,) coefficients on every call; the fused path reads\n"
          " them from a per-timestep table built once per scheduler, so each direction is one launch)")
    if device != "cuda":
        print("\nno GPU here: kernel timings need one (CUDA graphs of the kernels alone, and the host overhead)")
        return
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; fp16 predictions, CFG")
    print(f"{'B':>3} {'S':>3} {'fwd us':>8} {'fwd GB/s':>9} {'bwd us':>8} {'bwd GB/s':>9} {'call us':>8} {'host us':>8} "
          f"{'floor us':>9} {'launch us':>9} {'in-bwd us':>9} {'floor in-bwd':>12}")
    for B in (1, 4, 16, 32):
        r = time_on_gpu(B, N, torch.float16)
        print(f"{B:>3} {launch_split(B, N)[0]:>3} {r['fwd_us']:8.2f} {r['fwd_GBps']:9.0f} {r['bwd_us']:8.2f} "
              f"{r['bwd_GBps']:9.0f} {r['call_us']:8.1f} {r['host_us']:8.1f} {r['floor_us']:9.1f} {r['launch_us']:9.1f} "
              f"{r['in_backward_us']:9.1f} {r['floor_in_backward_us']:12.1f}")
    print("(fwd/bwd us: the kernel alone, 100 launches replayed in a CUDA graph; call us: one ddim_logprob_ratio\n"
          " forward + torch.autograd.grad, wall time; host us = call - kernels; floor us: the same through a\n"
          " do-nothing autograd.Function, what autograd alone costs on this host; launch us: fused_forward +\n"
          " fused_backward called directly, wall time: the wrappers and Triton's launcher without autograd;\n"
          " in-bwd us: what one more call adds when 9 share one backward, as in a training step; floor in-bwd:\n"
          " the same for the do-nothing Function)")


if __name__ == "__main__":
    main()
