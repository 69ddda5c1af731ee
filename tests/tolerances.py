"""Tolerances of the tests, per dtype, each with its reason.

The rule (docs/design.md, "Numerics"): a fused result's error against a float64 reference is
at most ``FACTOR`` times the error of PyTorch's own eager op at the same dtype, plus ``atol``.
Where an op has no PyTorch twin (bias_dropout is compared with the fp32-math reference),
the (atol, rtol) below bound the difference of two fp32-math implementations rounded once
to the output dtype.
"""
import torch

FACTOR = 2.0

# Same math in fp32 on both sides, one final rounding each: outputs may differ by one
# rounding of the output dtype (bf16: 2^-8 relative, fp16: 2^-11) plus fp32 noise from a
# different evaluation order of erf/tanh/exp (~1e-6 relative).
ELEMENTWISE = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),  # libm vs torch's vectorized transcendental
    torch.float32: dict(atol=1e-6, rtol=1e-5),   # erff/expf of different libraries, ~4 ulp
    torch.float16: dict(atol=1e-3, rtol=1e-3),   # one fp16 rounding (2^-11 ≈ 4.9e-4) each side
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),  # one bf16 rounding (2^-8 ≈ 3.9e-3) each side;
                                                 # the Triton interpreter truncates instead of
                                                 # rounding: one more ulp
}

# A sum over many rows (grad of a bias, of a norm weight) in fp32, in a different order:
# relative error grows like sqrt(rows) * 2^-24; the output rounding dominates below fp32.
REDUCTION = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=5e-2, rtol=1.6e-2),
}

# ---- optimizers (fusedreg.optim) ----------------------------------------------------------
# Parity with torch's optimizers after 100 steps of a small model (parameters O(0.1..1),
# lr ≤ 1e-2). The reference backend runs torch's own ops in torch's order and must match
# bit for bit; fused backends evaluate the same formulas element by element in fp32, where
# torch's vectorized kernels may fuse or reorder (lerp with fma, addcdiv): a few fp32 ulps per
# step, compounding over 100 steps through the moments into parameter differences of ~1e-6.
OPTIM_PARITY = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=5e-6, rtol=2e-5),
}
# One step of a fused backend against the reference on fp16/bf16 parameters (fp32 state):
# the same fp32 math, one final rounding to the parameter dtype (1 ulp, the Triton
# interpreter truncates instead of rounding) — plus fp32 noise on the state. The fp32 state
# of such runs is compared at the same tolerance: it is fed the parameters (L2 decay) of the
# earlier steps, rounded to the low dtype.
OPTIM_LOWP = {
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

# A patched model's output against the same model unpatched (fusedreg.patch): the fused
# norms reduce mean and variance in another order than torch's (~1e-6 relative per norm in
# fp32), and the differences pass through a few Linear layers and norms of the test models.
PATCHED_MODEL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
}

# layer_norm / rms_norm / dropout_add_layer_norm against a float64 reference (docs/design.md,
# "Numerics"):
#   err(fusedreg) <= FACTOR * err(torch at the same dtype) + NORM_ATOL[pass][dtype]
# with err = max |out - ref64| / max(max |ref64|, 1) (errors relative to the output's scale,
# so that one table serves y, h and the row-sum gradients of weight and bias).
NORM_ATOL = {
    "fwd": {
        torch.float64: 1e-12,  # different summation order of mean/var: ~N * 2^-53
        torch.float32: 2e-6,   # two-level vs torch's cascade sums: a few fp32 ulps (2^-24)
        torch.float16: 1e-3,   # one fp16 rounding of y (2^-11) and of h on either side
        torch.bfloat16: 8e-3,  # one bf16 rounding (2^-8); the Triton interpreter truncates
                               # instead of rounding: one more ulp
    },
    # Backward is looser: grad_x goes through two row sums (mean(g), mean(g * xhat)) and
    # grad_weight/grad_bias through a column sum over M rows in another order than torch's.
    "bwd": {
        torch.float64: 1e-10,
        torch.float32: 1e-5,
        torch.float16: 2e-3,   # dy, weight rounded to fp16; grads rounded once more
        torch.bfloat16: 1.6e-2,  # two bf16 roundings (2 * 2^-8), interpreter truncation
    },
}

# The GPU backends against the reference backend on the same CUDA tensors (both at the input
# dtype, no float64 oracle; test_layer_norm.test_gpu_backends_match_reference). Half-precision
# results carry one rounding on either side (bf16 2^-8 ≈ 3.9e-3 relative, fp16 2^-11): rtol
# 2e-2 is that twice with a 2.5x margin (fp16 shares bf16's bound); atol covers results near
# zero, whose error comes from the fp32 row statistics of inputs of magnitude ~3 to 10.
# float32: another order of the row sums (mean and variance over up to 262,144 elements, about
# sqrt(N) * 2^-24 ≈ 3e-5 relative at worst) and of the column sums of grad weight and bias.
NORM_GPU = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# batch_norm's GPU backends against the reference backend on the same CUDA tensors
# (test_batch_norm.test_gpu_backends_match_reference): half-precision outputs carry one
# rounding on either side (bf16 2^-8, fp16 2^-11) of values of magnitude ~1 to 5; float32:
# per-channel sums over up to 50,176 values in another order (about sqrt(n) * 2^-24 relative,
# ~4e-6) for the statistics, amplified in grad_x by the two backward sums.
BATCH_NORM_GPU = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
}


def check_norm_error(name, out, ref64, twin, dtype, pass_):
    """The norms' error rule: ``out`` has torch's shape and dtype (``twin`` is torch's own result
    at that dtype) and its error against the float64 ``ref64``, relative to max(|ref64|, 1), is
    at most FACTOR x torch's own error + NORM_ATOL[pass_][dtype]."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == twin.dtype, f"{name}: dtype {out.dtype} != torch's {twin.dtype}"
    if ref64.numel() == 0:
        return
    scale = max(ref64.abs().max().item(), 1.0)
    err = (out.double() - ref64).abs().max().item() / scale
    terr = (twin.double() - ref64).abs().max().item() / scale
    bound = FACTOR * terr + NORM_ATOL[pass_][dtype]
    assert err <= bound, f"{name} ({pass_}): error {err:.3g} > {FACTOR} x torch's {terr:.3g} + atol"
