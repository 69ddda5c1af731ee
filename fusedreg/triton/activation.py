"""Activations and their derivatives for Triton kernels (codes of fusedreg/_activations.py)."""
import triton
import triton.language as tl


@triton.jit
def _one_plus_tanh_and_sech2(v):
    # 1 + tanh(v) and 1 - tanh(v)^2 from e = exp(-2|v|) in (0, 1]: no overflow and no
    # cancellation. Forming them from t = tanh(v) loses up to ~2e-7 absolute near |t| = 1
    # (1 + t and 1 - t*t), which made gelu_tanh's gradient miss fp32 tolerances by 2-3x.
    e = tl.exp(-2.0 * tl.abs(v))
    r = 1.0 / (1.0 + e)
    one_plus_t = tl.where(v >= 0, 2.0 * r, 2.0 * e * r)
    return one_plus_t, 4.0 * e * r * r


@triton.jit
def activate(z, ACT: tl.constexpr):
    if ACT == 1:
        return tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        one_plus_t, _ = _one_plus_tanh_and_sech2(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * z * one_plus_t
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
        one_plus_t, sech2 = _one_plus_tanh_and_sech2(0.7978845608028654 * (z + 0.044715 * z * z * z))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * one_plus_t + 0.5 * z * sech2 * dinner
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    else:
        return z * 0.0 + 1.0
