"""Activations and their derivatives for Triton kernels (codes of fusedreg/_activations.py).

The formulas and their special-value guards are those of csrc/include/fusedreg/activation.h:
the exact limits at +-inf (act(+inf) = +inf, act(-inf) = 0, act'(+inf) = 1, act'(-inf) = 0),
saturation for huge finite |z|, NaN propagated; relu(NaN) = NaN and relu'(NaN) = 1 as torch
gives. Each guard is a select on a value the formula already has (0 * inf, inf / inf would
be NaN otherwise); a NaN fails every comparison and takes the formula.
"""
import triton
import triton.language as tl


@triton.jit
def activate(z, ACT: tl.constexpr):
    if ACT == 1:
        return tl.where(z <= 0, 0.0, z)
    elif ACT == 2:
        c = 1.0 + tl.math.erf(z * 0.7071067811865476)
        return tl.where(c == 0.0, -0.0, 0.5 * z * c)
    elif ACT == 3:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no cancellation near u = 0
        s = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
        return tl.where(s == 0.0, -0.0, z * s)
    elif ACT == 4:
        d = 1.0 + tl.exp(-z)
        return tl.where(d == float("inf"), -0.0, z / d)
    else:
        return z


@triton.jit
def activate_grad(z, ACT: tl.constexpr):
    if ACT == 1:
        return tl.where(z <= 0, 0.0, 1.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        return tl.where(pdf == 0.0, cdf, cdf + z * pdf)
    elif ACT == 3:
        # with s = sigmoid(2u) = (1 + tanh(u)) / 2: 1 - tanh(u)^2 = 4 s (1 - s)
        s = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        q = s * (1.0 - s)
        return tl.where(q == 0.0, s, s + 2.0 * z * q * dinner)
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-z))
        c = 1.0 - s
        return tl.where((s == 0.0) | (c == 0.0), s, s * (1.0 + z * c))
    else:
        return tl.zeros_like(z) + 1.0
