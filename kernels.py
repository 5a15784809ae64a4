"""The DDPO training step's log-prob and importance ratio, fused: one Triton kernel forward, one backward.

After the UNet call, every DDPO training micro-step computes, per sample b and element i of C*H*W = N:

    out    = eps_u + w * (eps_c - eps_u)       (classifier-free guidance; out = eps_c without it)
    mu     = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - std^2) * eps        (ddpo-notes §2), where
             epsilon prediction: eps = out,                           x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
             v prediction:       eps = sqrt(abar_t) out + sqrt(1 - abar_t) x_t, x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) out
    logp_b = -1 / (2 std^2 N) * sum_i (x_prev - mu)^2  -  log(std sqrt(2 pi))
    ratio_b = exp(logp_b - logp_old_b)

In both parameterisations mu is linear in x_t and out: mu = k_x * x_t + k_e * out, with per-sample
coefficients that the host computes once in float64 (so no cancellation happens in float32):
    epsilon: k_x = sqrt(abar_prev) / sqrt(abar_t),   k_e = dir - sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t)
    v:       k_x = sqrt(abar_prev) sqrt(abar_t) + dir sqrt(1 - abar_t),   k_e = dir sqrt(abar_t) - sqrt(abar_prev) sqrt(1 - abar_t)
with dir = sqrt(1 - abar_prev - std^2). Backward, with G_b = dL/dlogp_b + dL/dratio_b * ratio_b:
    dL/d out_i = G_b * k_e * (x_prev_i - mu_i) / (std^2 N);  dL/d eps_c = w * that, dL/d eps_u = (1 - w) * that.

Order of this file, as in the Triton tutorials: reference in PyTorch -> forward kernel -> backward kernel ->
host wrappers -> autograd.Function -> the public `ddim_logprob_ratio`, whose calling convention matches
ddpo.ddim_step_with_logprob. `python kernels.py` checks the kernels against the reference and prints
bytes moved and launches per call (and times them where a GPU is present).
"""

import math
import warnings

import torch
import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, eager): exactly the fused function, differentiable through autograd.
# ------------------------------------------------------------------------------------------------------
def mean_coefficients(scheduler, timestep, batch_size, eta, device):
    """Per-sample float64 (k_x, k_e, std) with mu = k_x * x_t + k_e * out (see the module docstring)."""
    from ddpo import ddim_coefficients  # the one place the DDIM coefficients are derived

    sqrt_a, sqrt_1ma, sqrt_a_prev, dir_coef, std = ddim_coefficients(scheduler, timestep, batch_size, eta, device)
    if scheduler.config.prediction_type == "epsilon":
        return sqrt_a_prev / sqrt_a, dir_coef - sqrt_a_prev * sqrt_1ma / sqrt_a, std
    if scheduler.config.prediction_type == "v_prediction":
        return sqrt_a_prev * sqrt_a + dir_coef * sqrt_1ma, dir_coef * sqrt_a - sqrt_a_prev * sqrt_1ma, std
    raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported")


def ddim_logprob_ratio_reference(noise_pred_cond, noise_pred_uncond, guidance_scale, k_x, k_e, std, sample,
                                 prev_sample, old_log_prob):
    """Noise predictions (B, ...) in any float dtype; sample, prev_sample (B, ...) float32; k_x, k_e, std,
    old_log_prob (B,). Returns (log_prob, ratio), float32 (B,)."""
    shape = (-1,) + (1,) * (sample.ndim - 1)
    out = noise_pred_cond.float()
    if noise_pred_uncond is not None:
        out = noise_pred_uncond.float() + guidance_scale * (out - noise_pred_uncond.float())
    mean = k_x.float().reshape(shape) * sample.float() + k_e.float().reshape(shape) * out
    sq = ((prev_sample.detach().float() - mean) ** 2).mean(dim=tuple(range(1, sample.ndim)))
    log_prob = -sq / (2 * std.float() ** 2) - (std.double().log() + 0.5 * math.log(2 * math.pi)).float()
    return log_prob, torch.exp(log_prob - old_log_prob.float())


# ------------------------------------------------------------------------------------------------------
# Kernels: one program per sample, a masked loop over its N elements, float32 accumulation, int64 offsets.
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _load_mean(c_ptr, u_ptr, x_ptr, offs, mask, k_x, k_e, w, HAS_CFG: tl.constexpr):
    out = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = u + w * (out - u)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    return k_x * x + k_e * out


@triton.jit
def ddim_logprob_fwd_kernel(c_ptr, u_ptr, x_ptr, xp_ptr, kx_ptr, ke_ptr, inv_two_var_ptr, log_norm_ptr, old_ptr,
                            logp_ptr, ratio_ptr, N, w, HAS_CFG: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * N
    k_x, k_e = tl.load(kx_ptr + b), tl.load(ke_ptr + b)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < N
        offs = base + idx
        mean = _load_mean(c_ptr, u_ptr, x_ptr, offs, mask, k_x, k_e, w, HAS_CFG)
        diff = tl.load(xp_ptr + offs, mask=mask, other=0.0) - mean
        acc += tl.where(mask, diff * diff, 0.0)
    logp = -tl.sum(acc, axis=0) / N * tl.load(inv_two_var_ptr + b) - tl.load(log_norm_ptr + b)
    tl.store(logp_ptr + b, logp)
    tl.store(ratio_ptr + b, tl.exp(logp - tl.load(old_ptr + b)))


@triton.jit
def ddim_logprob_bwd_kernel(c_ptr, u_ptr, x_ptr, xp_ptr, kx_ptr, ke_ptr, inv_var_ptr, ratio_ptr, g_logp_ptr,
                            g_ratio_ptr, gc_ptr, gu_ptr, N, w, HAS_CFG: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * N
    k_x, k_e = tl.load(kx_ptr + b), tl.load(ke_ptr + b)
    g = tl.load(g_logp_ptr + b) + tl.load(g_ratio_ptr + b) * tl.load(ratio_ptr + b)  # dL/dlogp_b
    scale = g * k_e * tl.load(inv_var_ptr + b) / N
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
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


# ------------------------------------------------------------------------------------------------------
# Host wrappers: check, allocate, launch.
# ------------------------------------------------------------------------------------------------------
def _check(cond, uncond, sample, prev_sample, per_sample):
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
    for name, t in per_sample.items():
        if t.shape != (B,) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 of shape ({B},), got {t.dtype} {tuple(t.shape)}")
    devices = {t.device for t in (cond, uncond, sample, prev_sample, *per_sample.values()) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def _flat(t):
    """(B, ...) -> contiguous (B, N). Non-contiguous inputs are copied, never read with wrong strides."""
    return None if t is None else t.reshape(t.shape[0], -1).contiguous()


def fused_forward(cond, uncond, w, k_x, k_e, inv_two_var, log_norm, sample, prev_sample, old_log_prob):
    _check(cond, uncond, sample, prev_sample, dict(k_x=k_x, k_e=k_e, inv_two_var=inv_two_var, log_norm=log_norm,
                                                   old_log_prob=old_log_prob))
    c, u, x, xp = _flat(cond), _flat(uncond), _flat(sample), _flat(prev_sample)
    B, N = x.shape
    logp = torch.empty(B, device=x.device, dtype=torch.float32)
    ratio = torch.empty_like(logp)
    ddim_logprob_fwd_kernel[(B,)](c, u if u is not None else c, x, xp, k_x, k_e, inv_two_var, log_norm,
                                  old_log_prob.contiguous(), logp, ratio, N, float(w), HAS_CFG=u is not None,
                                  BLOCK=BLOCK)
    return logp, ratio


def fused_backward(cond, uncond, w, k_x, k_e, inv_var, ratio, grad_logp, grad_ratio, sample, prev_sample):
    c, u, x, xp = _flat(cond), _flat(uncond), _flat(sample), _flat(prev_sample)
    B, N = x.shape
    grad_c = torch.empty_like(c)
    grad_u = torch.empty_like(u) if u is not None else None
    ddim_logprob_bwd_kernel[(B,)](c, u if u is not None else c, x, xp, k_x, k_e, inv_var, ratio,
                                  grad_logp.float().contiguous(), grad_ratio.float().contiguous(), grad_c,
                                  grad_u if grad_u is not None else grad_c, N, float(w), HAS_CFG=u is not None,
                                  BLOCK=BLOCK)
    return grad_c.view(cond.shape), None if grad_u is None else grad_u.view(cond.shape)


class DDIMLogProbRatio(torch.autograd.Function):
    """(log_prob, ratio) = f(eps_c, eps_u) for fixed x_t, x_prev, coefficients, logp_old:

        out = eps_u + w (eps_c - eps_u);  mu = k_x x_t + k_e out
        log_prob_b = -sum_i (x_prev - mu)^2 / (2 std^2 N) - log(std sqrt(2 pi));  ratio_b = exp(log_prob_b - logp_old_b)

    Backward recomputes mu from the inputs (nothing of size N is saved but the inputs themselves):
        dL/d out_i = (dL/dlogp_b + dL/dratio_b ratio_b) k_e (x_prev_i - mu_i) / (std^2 N),
        dL/d eps_c = w dL/d out,  dL/d eps_u = (1 - w) dL/d out."""

    @staticmethod
    def forward(ctx, cond, uncond, w, k_x, k_e, std, sample, prev_sample, old_log_prob):
        var = std.double() ** 2
        inv_two_var, inv_var = (1 / (2 * var)).float(), (1 / var).float()
        log_norm = (std.double().log() + 0.5 * math.log(2 * math.pi)).float()
        k_x, k_e = k_x.float(), k_e.float()
        logp, ratio = fused_forward(cond, uncond, w, k_x, k_e, inv_two_var, log_norm, sample, prev_sample,
                                    old_log_prob.float())
        ctx.save_for_backward(cond, uncond, k_x, k_e, inv_var, ratio, sample, prev_sample)
        ctx.w = w
        return logp, ratio

    @staticmethod
    def backward(ctx, grad_logp, grad_ratio):
        cond, uncond, k_x, k_e, inv_var, ratio, sample, prev_sample = ctx.saved_tensors
        zeros = torch.zeros_like(ratio)
        grad_c, grad_u = fused_backward(cond, uncond, ctx.w, k_x, k_e, inv_var, ratio,
                                        zeros if grad_logp is None else grad_logp,
                                        zeros if grad_ratio is None else grad_ratio, sample, prev_sample)
        return grad_c, grad_u, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------------
# The public function: the same calling convention as ddpo.ddim_step_with_logprob.
# ------------------------------------------------------------------------------------------------------
_warned = set()


def ddim_logprob_ratio(scheduler, noise_pred_cond, noise_pred_uncond, guidance_scale, timestep, sample,
                       prev_sample, old_log_prob, eta=1.0, fused=None):
    """log p(x_prev | x_t) of the guided DDIM step and the importance ratio exp(log p - old_log_prob).
    noise_pred_uncond=None means no CFG. timestep an int or (B,). Returns float32 (B,) each, differentiable
    with respect to both noise predictions. fused=None: the Triton kernels on CUDA tensors (or anywhere
    under TRITON_INTERPRET=1), else the PyTorch reference; True/False force the choice."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0 (got {eta})")
    B = sample.shape[0]
    k_x, k_e, std = mean_coefficients(scheduler, timestep, B, eta, sample.device)
    if fused is None:
        fused = sample.is_cuda or triton_interpreter_on()
    unsupported = [k for k in ("clip_sample", "thresholding") if scheduler.config.get(k)]
    if fused and unsupported:
        if tuple(unsupported) not in _warned:
            _warned.add(tuple(unsupported))
            warnings.warn(f"the fused DDIM kernel does not do {', '.join(unsupported)}: using the PyTorch "
                          "path (ddpo.ddim_step_with_logprob) for this scheduler")
        return _unfused(scheduler, noise_pred_cond, noise_pred_uncond, guidance_scale, timestep, sample,
                        prev_sample, old_log_prob, eta)
    sample, prev_sample = sample.float(), prev_sample.detach().float()
    if fused:
        return DDIMLogProbRatio.apply(noise_pred_cond, noise_pred_uncond, float(guidance_scale), k_x, k_e, std,
                                      sample, prev_sample, old_log_prob.detach())
    return ddim_logprob_ratio_reference(noise_pred_cond, noise_pred_uncond, guidance_scale, k_x, k_e, std, sample,
                                        prev_sample, old_log_prob.detach())


def _unfused(scheduler, cond, uncond, w, timestep, sample, prev_sample, old_log_prob, eta):
    from ddpo import ddim_step_with_logprob

    out = cond.float() if uncond is None else uncond.float() + w * (cond.float() - uncond.float())
    _, log_prob = ddim_step_with_logprob(scheduler, out, timestep, sample, eta=eta, prev_sample=prev_sample)
    return log_prob, torch.exp(log_prob - old_log_prob.detach().float())


def compile_for_gpu(arch, dtype, has_cfg):
    """Compile both kernels ahead of time for CUDA compute capability `arch` (80 = A100, 90 = H100) with
    noise predictions of `dtype`; no GPU needed. Returns {kernel name: triton CompiledKernel} whose
    .asm holds "ptx" and "cubin". Run it where TRITON_INTERPRET is unset."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tt = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    compiled = {}
    for kernel in (ddim_logprob_fwd_kernel, ddim_logprob_bwd_kernel):
        signature = {name: "*fp32" for name in kernel.arg_names}
        signature.update({"c_ptr": tt, "u_ptr": tt, "gc_ptr": tt, "gu_ptr": tt, "N": "i32", "w": "fp32",
                          "HAS_CFG": "constexpr", "BLOCK": "constexpr"})
        signature = {name: signature[name] for name in kernel.arg_names}
        source = ASTSource(kernel, signature, {"HAS_CFG": has_cfg, "BLOCK": BLOCK})
        compiled[kernel.__name__] = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    return compiled


def triton_interpreter_on():
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
