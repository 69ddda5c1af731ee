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

# layer_norm / rms_norm / dropout_add_layer_norm against a float64 reference (DESIGN.md §4):
#   err(fusedreg) <= FACTOR * err(torch at the same dtype) + NORM_ATOL[pass][dtype]
# with err = max |out - ref64| / max(max |ref64|, 1) (errors relative to the output's scale,
# so that one table serves y, h and the row-sum gradients of weight and bias).
NORM_ATOL = {
    "fwd": {
        torch.float64: 1e-12,  # different summation order of mean/var: ~N * 2^-53
        torch.float32: 2e-6,   # two-level vs torch's cascade sums: a few fp32 ulps (2^-24)
        torch.float16: 1e-3,   # one fp16 rounding of y (2^-11) and of h on either side
        torch.bfloat16: 8e-3,  # one bf16 rounding (2^-8); the Triton interpreter truncates
                               # instead of rounding (TOOLCHAIN.md): one more ulp
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
