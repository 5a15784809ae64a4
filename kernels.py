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
import os
import warnings
import weakref

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
    from ddpo import guide  # eps_u + w (eps_c - eps_u) in float32; eps_c alone without CFG

    shape = (-1,) + (1,) * (sample.ndim - 1)
    out = guide(noise_pred_cond, noise_pred_uncond, guidance_scale)
    mean = k_x.float().reshape(shape) * sample.float() + k_e.float().reshape(shape) * out
    sq = ((prev_sample.detach().float() - mean) ** 2).mean(dim=tuple(range(1, sample.ndim)))
    log_prob = -sq / (2 * std.float() ** 2) - (std.double().log() + 0.5 * math.log(2 * math.pi)).float()
    return log_prob, torch.exp(log_prob - old_log_prob.float())


# ------------------------------------------------------------------------------------------------------
# Kernels: one program per sample, a masked loop over its N elements, float32 accumulation, int64 offsets.
# Per-sample coefficients come from a table indexed by timestep (see coefficient_table), so each
# direction is exactly one launch: no small per-call ops to derive them.
# ------------------------------------------------------------------------------------------------------
TABLE_COLUMNS = tl.constexpr(5)  # k_x, k_e, 1 / (2 std^2), 1 / std^2, log(std sqrt(2 pi))


@triton.jit
def _load_mean(c_ptr, u_ptr, x_ptr, offs, mask, k_x, k_e, w, HAS_CFG: tl.constexpr):
    out = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = u + w * (out - u)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    return k_x * x + k_e * out


@triton.jit
def ddim_logprob_fwd_kernel(c_ptr, u_ptr, x_ptr, xp_ptr, t_ptr, table_ptr, old_ptr, logp_ptr, ratio_ptr, N, w,
                            HAS_CFG: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * N
    row = table_ptr + tl.load(t_ptr + b).to(tl.int64) * TABLE_COLUMNS  # this sample's timestep
    k_x, k_e = tl.load(row + 0), tl.load(row + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < N
        offs = base + idx
        mean = _load_mean(c_ptr, u_ptr, x_ptr, offs, mask, k_x, k_e, w, HAS_CFG)
        diff = tl.load(xp_ptr + offs, mask=mask, other=0.0) - mean
        acc += tl.where(mask, diff * diff, 0.0)
    logp = -tl.sum(acc, axis=0) / N * tl.load(row + 2) - tl.load(row + 4)
    tl.store(logp_ptr + b, logp)
    tl.store(ratio_ptr + b, tl.exp(logp - tl.load(old_ptr + b)))


@triton.jit
def ddim_logprob_bwd_kernel(c_ptr, u_ptr, x_ptr, xp_ptr, t_ptr, table_ptr, ratio_ptr, g_logp_ptr, g_ratio_ptr,
                            gc_ptr, gu_ptr, N, w, HAS_CFG: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * N
    row = table_ptr + tl.load(t_ptr + b).to(tl.int64) * TABLE_COLUMNS
    k_x, k_e = tl.load(row + 0), tl.load(row + 1)
    g = tl.load(g_logp_ptr + b) + tl.load(g_ratio_ptr + b) * tl.load(ratio_ptr + b)  # dL/dlogp_b
    scale = g * k_e * tl.load(row + 3) / N
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
def coefficient_table(scheduler, eta, device):
    """(num_train_timesteps, 5) float32: for every timestep t, the columns k_x, k_e, 1 / (2 std^2),
    1 / std^2, log(std sqrt(2 pi)) of the DDIM step t -> t - step, derived in float64. Cached per scheduler,
    inference step count, eta and device."""
    key = (scheduler.num_inference_steps, float(eta), str(device))
    cache = _tables.setdefault(scheduler, {})
    if key not in cache:
        t = torch.arange(scheduler.config.num_train_timesteps, device=device)  # every timestep t -> t - step
        k_x, k_e, std = mean_coefficients(scheduler, t, len(t), eta, device)
        var = std**2
        cache[key] = torch.stack([k_x, k_e, 1 / (2 * var), 1 / var, std.log() + 0.5 * math.log(2 * math.pi)], 1).float()
    return cache[key]


_tables = weakref.WeakKeyDictionary()  # scheduler -> {(steps, eta, device): table}


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
    _check(cond, uncond, sample, prev_sample, timesteps, old_log_prob)
    c, u, x, xp = _flat(cond), _flat(uncond), _flat(sample), _flat(prev_sample)
    B, N = x.shape
    logp = torch.empty(B, device=x.device, dtype=torch.float32)
    ratio = torch.empty_like(logp)
    ddim_logprob_fwd_kernel[(B,)](c, u if u is not None else c, x, xp, timesteps, table, old_log_prob, logp, ratio,
                                  N, float(w), HAS_CFG=u is not None, BLOCK=BLOCK)
    return logp, ratio


def fused_backward(cond, uncond, w, table, timesteps, ratio, grad_logp, grad_ratio, sample, prev_sample):
    c, u, x, xp = _flat(cond), _flat(uncond), _flat(sample), _flat(prev_sample)
    B, N = x.shape
    grad_c = torch.empty_like(c)
    grad_u = torch.empty_like(u) if u is not None else None
    ddim_logprob_bwd_kernel[(B,)](c, u if u is not None else c, x, xp, timesteps, table, ratio,
                                  grad_logp.float().contiguous(), grad_ratio.float().contiguous(), grad_c,
                                  grad_u if grad_u is not None else grad_c, N, float(w), HAS_CFG=u is not None,
                                  BLOCK=BLOCK)
    return grad_c.view(cond.shape), None if grad_u is None else grad_u.view(cond.shape)


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
        logp, ratio = fused_forward(cond, uncond, w, table, timesteps, sample, prev_sample, old_log_prob)
        ctx.save_for_backward(cond, uncond, table, timesteps, ratio, sample, prev_sample)
        ctx.w = w
        return logp, ratio

    @staticmethod
    def backward(ctx, grad_logp, grad_ratio):
        cond, uncond, table, timesteps, ratio, sample, prev_sample = ctx.saved_tensors
        # autograd materialises the gradient of an unused output as zeros, so neither is None here
        grad_c, grad_u = fused_backward(cond, uncond, ctx.w, table, timesteps, ratio, grad_logp, grad_ratio,
                                        sample, prev_sample)
        return grad_c, grad_u, None, None, None, None, None, None


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
    sample, prev_sample, old_log_prob = sample.float(), prev_sample.detach().float(), old_log_prob.detach().float()
    if fused:
        timesteps = torch.as_tensor(timestep, device=sample.device).long().reshape(-1).expand(B).contiguous()
        return DDIMLogProbRatio.apply(noise_pred_cond, noise_pred_uncond, float(guidance_scale),
                                      coefficient_table(scheduler, eta, sample.device), timesteps, sample,
                                      prev_sample, old_log_prob)
    k_x, k_e, std = mean_coefficients(scheduler, timestep, B, eta, sample.device)
    return ddim_logprob_ratio_reference(noise_pred_cond, noise_pred_uncond, guidance_scale, k_x, k_e, std, sample,
                                        prev_sample, old_log_prob)


def _unfused(scheduler, cond, uncond, w, timestep, sample, prev_sample, old_log_prob, eta):
    from ddpo import ddim_step_with_logprob, guide

    _, log_prob = ddim_step_with_logprob(scheduler, guide(cond, uncond, w), timestep, sample, eta=eta,
                                         prev_sample=prev_sample)
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
        signature.update({"c_ptr": tt, "u_ptr": tt, "gc_ptr": tt, "gu_ptr": tt, "t_ptr": "*i64", "N": "i32", "w": "fp32",
                          "HAS_CFG": "constexpr", "BLOCK": "constexpr"})
        signature = {name: signature[name] for name in kernel.arg_names}  # only this kernel's arguments
        source = ASTSource(kernel, signature, {"HAS_CFG": has_cfg, "BLOCK": BLOCK})
        compiled[kernel.__name__] = triton.compile(source, target=GPUTarget("cuda", arch, 32))
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
    per sample the timestep (8), 4 table entries and logp_old (4 each); writes log p and ratio. Backward
    reads the same N-sized inputs, per sample the timestep, 3 table entries, ratio and the two upstream
    gradients; writes the gradient(s) in the input dtype."""
    s, preds = torch.empty((), dtype=dtype).element_size(), 2 if cfg else 1
    forward = B * N * (preds * s + 8) + B * (8 + 4 * 5) + B * 4 * 2
    backward = B * N * (preds * s + 8) + B * (8 + 4 * 6) + B * N * preds * s
    return forward, backward


def _bench_inputs(B, N, dtype, device, cfg=True):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    shape = (B, 4, int(math.isqrt(N // 4)), int(math.isqrt(N // 4)))
    make = lambda dt: torch.randn(shape, generator=g).to(device=device, dtype=dt)
    cond, uncond = make(dtype).requires_grad_(), (make(dtype).requires_grad_() if cfg else None)
    x_t, x_prev = make(torch.float32), make(torch.float32)
    t = scheduler.timesteps[torch.randint(50, (B,), generator=g)]
    with torch.no_grad():
        old, _ = ddim_logprob_ratio(scheduler, cond, uncond, 5.0, t, x_t, x_prev, torch.zeros(B, device=device),
                                    fused=False)
    return scheduler, cond, uncond, t, x_t, x_prev, old


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused_available = device == "cuda" or triton_interpreter_on()
    print(f"device {device}; fused kernels {'on' if fused_available else 'off (set TRITON_INTERPRET=1 on CPU)'}")
    N = 4 * 64 * 64  # Stable Diffusion latents at 512 px
    if fused_available:  # check: fused vs reference at an SD shape, forward and gradients
        scheduler, cond, uncond, t, x_t, x_prev, old = _bench_inputs(2, N, torch.float32, device)
        results = []
        for fused in (True, False):
            logp, ratio = ddim_logprob_ratio(scheduler, cond, uncond, 5.0, t, x_t, x_prev, old, fused=fused)
            grads = torch.autograd.grad((logp + ratio).sum(), (cond, uncond))
            results.append((logp, ratio, *grads))
        for name, a, b in zip(("log p", "ratio", "d eps_c", "d eps_u"), *results):
            print(f"  check {name:8s} max |fused - reference| = {(a - b).abs().max().item():.2e} "
                  f"(scale {b.abs().max().item():.2e})")
    print(f"\nper call at N = {N} (4x64x64), CFG, fp16 noise predictions, B samples; eager = the reference above")
    print(f"{'B':>3} {'eager fwd':>22} {'eager fwd+bwd':>22} {'fused fwd':>20} {'fused fwd+bwd':>20}")
    for B in (1, 2, 4, 8, 16):
        scheduler, cond, uncond, t, x_t, x_prev, old = _bench_inputs(B, N, torch.float16, "cpu")

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
        print("\nno GPU here: timings need one (triton.testing.do_bench on CUDA)")
        return
    print(f"\n{'B':>3} {'eager fwd ms':>13} {'fused fwd ms':>13} {'fused GB/s':>11} {'eager f+b ms':>13} "
          f"{'fused f+b ms':>13} {'fused GB/s':>11}")
    for B in (1, 2, 4, 8, 16):
        scheduler, cond, uncond, t, x_t, x_prev, old = _bench_inputs(B, N, torch.float16, device)
        run = lambda fused: ddim_logprob_ratio(scheduler, cond, uncond, 5.0, t, x_t, x_prev, old, fused=fused)
        both = lambda fused: torch.autograd.grad(sum(o.sum() for o in run(fused)), (cond, uncond))
        ms = {(kind, fused): triton.testing.do_bench(lambda: fn(fused), return_mode="median")
              for kind, fn in (("f", run), ("fb", both)) for fused in (True, False)}
        fwd, bwd = fused_traffic(B, N, torch.float16, True)
        print(f"{B:>3} {ms['f', False]:13.4f} {ms['f', True]:13.4f} {fwd / ms['f', True] / 1e6:11.1f} "
              f"{ms['fb', False]:13.4f} {ms['fb', True]:13.4f} {(fwd + bwd) / ms['fb', True] / 1e6:11.1f}")


if __name__ == "__main__":
    main()
