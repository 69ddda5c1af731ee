"""Activations and their derivatives for Triton kernels (codes of fusedreg/_activations.py)."""
import triton
import triton.language as tl


@triton.jit
def activate(z, ACT: tl.constexpr):
    if ACT == 1:
        return tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no cancellation near u = 0
        return z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    elif ACT == 4:
        return z / (1.0 + tl.exp(-z))
    else:
        return z


@triton.jit
def activate_grad(z, ACT: tl.constexpr):
    if ACT == 1:
        return tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        return cdf + z * pdf
    elif ACT == 3:
        # with s = sigmoid(2u) = (1 + tanh(u)) / 2: 1 - tanh(u)^2 = 4 s (1 - s)
        s = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return s + 2.0 * z * s * (1.0 - s) * dinner
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    else:
        return z * 0.0 + 1.0
