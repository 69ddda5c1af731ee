// Per-element update math of the fused optimizers (docs/design.md, "Optimizers"), in the
// compute type S (float for fp32/fp16/bf16 parameters, double for float64), shared by
// csrc/cpu/optim.cpp and csrc/cuda/optim.cu so that the CPU tests exercise the arithmetic the
// GPU runs.
//
// One element's step, in torch's order (so that l1 = 0 reproduces torch to fp32 rounding):
//   g ← g·gscale + wd_l2·p          gscale = ±1/grad_scale (− when maximize); wd_l2 = L2 decay
//   p ← p·decay                     decay = 1 − lr·weight_decay when decoupled, else 1
//   p ← p − lr·update(g, state)     the algorithm
//   p ← sign(p)·max(|p| − thr, 0)   thr = lr·l1, only when L1 (soft threshold, exact zeros)
// The "identity" constants (gscale = 1, wd_l2 = 0, decay = 1) leave values bit-unchanged, so
// the loops need no branches for maximize / decay / grad scaling and vectorize cleanly.
// The host computes every constant in double (as torch's Python does) and rounds once to S
// (make_*_consts, fusedreg/optim_args.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#if !defined(__CUDACC__)
#include <bit>
#endif

#include "fusedreg/macros.h"

// The update functions are force-inlined (FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE): they are
// called once per element inside the CPU's vectorized loops, compiled for each instruction
// set (fusedreg/cpu/isa.h), and inside CUDA's unrolled ones.

namespace fusedreg {
namespace optim {

namespace detail {
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE float sqrt_(float v) { return sqrtf(v); }
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE double sqrt_(double v) { return sqrt(v); }
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE float fma_(float a, float b, float c) { return fmaf(a, b, c); }
}  // namespace detail

// c ? a : b for values both already computed. On the host, for float, a bit mask rather
// than a select: GCC (under its default -ftrapping-math) does not if-convert every float
// select in every loop these functions are inlined into — it sinks one side's computation
// into a branch — and a loop left with control flow stays scalar (the bfloat16 loops with
// l1 or bf16 state did, 5-25x slower). double keeps the select (its loops vectorize with
// it, and the 64-bit masks made float64 SGD 2x slower). Exact either way: the result is
// one of the two values, bit for bit.
template <typename S>
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE S pick(bool c, S a, S b) {
#if defined(__CUDACC__)
  return c ? a : b;
#else
  if constexpr (sizeof(S) == 4) {
    const uint32_t mask = 0u - uint32_t(c);  // all ones when c
    return std::bit_cast<S>((std::bit_cast<uint32_t>(a) & mask) |
                            (std::bit_cast<uint32_t>(b) & ~mask));
  } else {
    return c ? a : b;  // double: the float64 loops vectorize with the selects as they are
  }
#endif
}

// sign(p)·max(|p| − thr, 0), thr ≥ 0 (a NaN p gives 0). Written with selects, no copysign:
// branch-free.
template <typename S>
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE S soft_threshold(S p, S thr) {
  const S shrunk_pos = p - thr;  // used when p > thr
  const S shrunk_neg = p + thr;  // used when p < −thr
  return pick(p > thr, shrunk_pos, pick(p < -thr, shrunk_neg, S(0)));
}

// torch.lerp's formula (ATen/native/Lerp.h): a + w·(b − a) when |w| < 0.5, else
// b − (b − a)·(1 − w). Written as base + coef·(b − a) with (base, coef) = (a, w) or
// (b, −(1 − w)) — the same roundings, since negation is exact — so that the only select is
// between two loaded values and the loops still vectorize.
template <typename S>
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE S lerp(S a, S b, S coef, bool w_small) {
  return pick(w_small, a, b) + coef * (b - a);
}

// Adam / AdamW (torch.optim.Adam single-tensor path). Per tensor: neg_step_size = −lr/bc1,
// bc2_sqrt = sqrt(1 − beta2^step).
template <typename S>
struct AdamConsts {
  S gscale, wd_l2, decay, w1_coef, beta2, omb2, eps, thr;  // w1_coef: lerp's coef, omb2 = 1 − beta2
  bool w1_small;
};

// Adam's per-call constants from the hyperparameters: double math, one rounding to S. The
// host computes them once per call (make_adam_consts, fusedreg/optim_args.h); the capturable
// CUDA kernel computes them per block from the lr and inv_scale it reads on the device.
template <typename S>
FUSEDREG_INLINE AdamConsts<S> adam_consts(double lr, double inv_scale, double beta1, double beta2,
                                          double eps, double weight_decay, double l1,
                                          bool l1_lr_scaled, bool maximize, bool decoupled) {
  const S w1 = S(1.0 - beta1);  // torch rounds the lerp weight to the tensor's type
  const bool w1_small = w1 < S(0.5) && w1 > S(-0.5);
  return AdamConsts<S>{S(maximize ? -inv_scale : inv_scale),
                       S(decoupled ? 0.0 : weight_decay),
                       S(decoupled ? 1.0 - lr * weight_decay : 1.0),
                       w1_small ? w1 : -(S(1) - w1), S(beta2), S(1.0 - beta2), S(eps),
                       S(l1_lr_scaled ? lr * l1 : l1), w1_small};
}

// Adam's per-tensor scalars from its (already incremented) step count, in double:
// −lr/(1 − beta1^step) and sqrt(1 − beta2^step).
struct AdamBiasCorrection {
  double neg_step_size;
  double bc2_sqrt;
};

FUSEDREG_INLINE AdamBiasCorrection adam_bias_correction(double lr, double beta1, double beta2,
                                                        double step) {
  return {-(lr / (1.0 - pow(beta1, step))), sqrt(1.0 - pow(beta2, step))};
}

// x / c without a division: q0 = x·rc, then Markstein's correction q0 + (x − q0·c)·rc (two
// FMAs), which is x / c rounded to nearest when rc is 1/c rounded to nearest and q0 is within
// an ulp of x / c (the residual x − q0·c is then exact). That the result equals the division
// for every x is checked, not proved: over every float significand, for the test's constants
// (tests/test_optim.py) and, once, for 80,000 more (significands next to 1 and 2, and random)
// with no difference — the divider is the bottleneck of the float32 Adam
// step (it also takes the square root and m / denom). For float only, and for what Adam
// divides by bc2_sqrt: x a square root (±0, positive and never subnormal, +inf or NaN), c in
// [2^-20, 1] (the host falls back to the division otherwise: adam_rcp_ok). x = ±0, +inf and
// NaN are returned as they are — which is what x / c gives them (the correction would turn
// +inf into NaN). The CPU kernels use it where the CPU has FMA (tests/test_optim.py compares
// it bit for bit with the division over every float significand for a range of constants).
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE float div_by_recip(float x, float c, float rc) {
  const float q0 = x * rc;
  const float r = detail::fma_(-q0, c, x);
  const float q1 = detail::fma_(r, rc, q0);
  return pick((x > 0.0f) & (x < INFINITY), q1, x);
}

// Whether div_by_recip(x, c, 1 / c) is x / c for every x Adam gives it.
FUSEDREG_INLINE bool adam_rcp_ok(float c) { return c >= 0x1p-20f && c <= 1.0f; }

// RCP (float only): sqrt(v) / bc2_sqrt through div_by_recip with bc2_rcp = 1 / bc2_sqrt (the
// same bits as the division).
template <typename S, bool AMSGRAD, bool L1, bool RCP = false>
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE void adam_update(const AdamConsts<S>& c, S neg_step_size, S bc2_sqrt, S& p, S g,
                                 S& m, S& v, S& vmax, S bc2_rcp = S(0)) {
  g = g * c.gscale + c.wd_l2 * p;
  p = p * c.decay;
  m = lerp(m, g, c.w1_coef, c.w1_small);
  v = v * c.beta2 + c.omb2 * g * g;
  S v_used = v;
  if (AMSGRAD) {
    v_used = pick(vmax > v, vmax, v);
    vmax = v_used;
  }
  S scaled;
  if constexpr (RCP) {
    static_assert(std::is_same_v<S, float>, "the reciprocal form is for float");
    scaled = div_by_recip(detail::sqrt_(v_used), bc2_sqrt, bc2_rcp);
  } else {
    scaled = detail::sqrt_(v_used) / bc2_sqrt;
  }
  const S denom = scaled + c.eps;
  p = p + neg_step_size * (m / denom);
  if (L1) p = soft_threshold(p, c.thr);
}

// SGD (torch.optim.SGD): buf ← g on the first step, else momentum·buf + (1 − dampening)·g;
// the update is g + momentum·buf with nesterov, else buf.
template <typename S>
struct SgdConsts {
  S gscale, wd_l2, decay, neg_lr, momentum, damp1, thr;  // damp1 = 1 − dampening
  bool first, nesterov;
};

template <typename S, bool MOMENTUM, bool L1>
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE void sgd_update(const SgdConsts<S>& c, S& p, S g, S* buf) {
  g = g * c.gscale + c.wd_l2 * p;
  p = p * c.decay;
  S d = g;
  if (MOMENTUM) {
    const S b = pick(c.first, g, *buf * c.momentum + c.damp1 * g);
    *buf = b;
    d = pick(c.nesterov, g + c.momentum * b, b);
  }
  p = p + c.neg_lr * d;
  if (L1) p = soft_threshold(p, c.thr);
}

// Lion (Chen et al. 2023), decoupled decay first as in the paper's Algorithm 2:
//   u = sign(beta1·m + (1 − beta1)·g);  p ← p·decay − lr·u;  m ← beta2·m + (1 − beta2)·g
template <typename S>
struct LionConsts {
  S gscale, decay, neg_lr, beta1, omb1, beta2, omb2, thr;
};

template <typename S, bool L1>
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE void lion_update(const LionConsts<S>& c, S& p, S g, S& m) {
  g = g * c.gscale;
  p = p * c.decay;
  const S u = m * c.beta1 + g * c.omb1;
  const S sgn = pick(u > S(0), S(1), pick(u < S(0), S(-1), S(0)));
  p = p + c.neg_lr * sgn;
  m = m * c.beta2 + g * c.omb2;
  if (L1) p = soft_threshold(p, c.thr);
}

}  // namespace optim
}  // namespace fusedreg
