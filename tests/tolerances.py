"""Tolerances of the tests, per dtype, each with its reason.

The rule (DESIGN.md §4): a fused result's error against a float64 reference is at most
``FACTOR`` times the error of PyTorch's own eager op at the same dtype, plus ``atol``.
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
                                                 # the Triton interpreter truncates (TOOLCHAIN.md)
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
