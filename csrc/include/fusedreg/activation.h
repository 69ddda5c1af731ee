// Activations and their derivatives, evaluated in the compute type T (float for
// fp32/fp16/bf16 inputs, double for float64), shared by the CPU and CUDA backends.
//
// The backends run these formulas as written; they differ only in the exp and erf behind
// them (the math policy M): CUDA uses StdMath (expf/erff, exp/erf), the CPU uses
// cpu::VecMath, whose float32 exp and erf are vectorizable polynomials (fusedreg/cpu/vmath.h:
// exp within 2 ulp, erf within 2e-7 absolute, both with libm's limits at +-inf) and whose
// float64 ones are libm's. Two exceptions, both in the CPU bias_dropout kernels and float32:
// the backward evaluates GELU's derivative in a one-exp form of the same function
// (cpu::gelu_grad_t, vmath.h), and the forward at the AVX-512 level GELU itself from a table
// of polynomials for Phi (cpu::gelu_avx512, vmath.h).
// tests/test_cpu_math.py bounds the CPU results against these formulas evaluated in float64
// (its docstring states the error model).
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedreg/macros.h"

namespace fusedreg {

enum class Activation : int64_t { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4 };

// The transcendental functions the formulas need. StdMath calls libm / CUDA's math
// library; the CPU kernels pass a policy whose float functions vectorize
// (fusedreg/cpu/vmath.h). The formulas below are written once for every backend.
struct StdMath {
  FUSEDREG_HOST_DEVICE static float erf(float v) { return erff(v); }
  FUSEDREG_HOST_DEVICE static double erf(double v) { return ::erf(v); }
  FUSEDREG_HOST_DEVICE static float exp(float v) { return expf(v); }
  FUSEDREG_HOST_DEVICE static double exp(double v) { return ::exp(v); }
};

// Constants of the GELU forms: 1/sqrt(2), 1/sqrt(2*pi), sqrt(2/pi), 0.044715.
template <typename T>
struct GeluConst {
  static constexpr T kInvSqrt2 = T(0.70710678118654752440);
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
  static constexpr T kSqrt2OverPi = T(0.79788456080286535588);
  static constexpr T kCoeff = T(0.044715);
};

// Special values (docs/design.md, "Numerics"): each formula gives the exact limit at +-inf
// (act(+inf) = +inf, act(-inf) = 0, act'(+inf) = 1, act'(-inf) = 0), saturates for huge
// finite |z| (e^x is inf or 0 there, never clamped), and propagates NaN; relu(NaN) = NaN and
// relu'(NaN) = 1, as torch's relu and its backward give. The guards below are selects on
// values the formula already has (0 * inf and inf / inf would give NaN otherwise); a NaN
// fails every comparison and so takes the formula.
//
// gelu_tanh uses 0.5 * (1 + tanh(u)) == sigmoid(2u), which has no cancellation near u = 0,
// and 1 - tanh(u)^2 == 4 s (1 - s) with s = sigmoid(2u).
template <Activation A, typename T, typename M = StdMath>
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE T activate(T z) {
  if constexpr (A == Activation::kNone) {
    return z;
  } else if constexpr (A == Activation::kRelu) {
    return z <= T(0) ? T(0) : z;
  } else if constexpr (A == Activation::kGelu) {
    const T c = T(1) + M::erf(z * GeluConst<T>::kInvSqrt2);
    return c == T(0) ? T(-0.0) : T(0.5) * z * c;  // c == 0: z below about -5.6 (float), -inf
  } else if constexpr (A == Activation::kGeluTanh) {
    const T u = GeluConst<T>::kSqrt2OverPi * (z + GeluConst<T>::kCoeff * z * z * z);
    const T d = T(1) + M::exp(T(-2) * u);
    return d == T(INFINITY) ? T(-0.0) : z / d;  // d == inf: z very negative or -inf
  } else {  // kSilu
    const T d = T(1) + M::exp(-z);
    return d == T(INFINITY) ? T(-0.0) : z / d;
  }
}

// d act(z) / dz
template <Activation A, typename T, typename M = StdMath>
FUSEDREG_INLINE FUSEDREG_ALWAYS_INLINE T activate_grad(T z) {
  if constexpr (A == Activation::kNone) {
    return T(1);
  } else if constexpr (A == Activation::kRelu) {
    return z <= T(0) ? T(0) : T(1);
  } else if constexpr (A == Activation::kGelu) {
    const T cdf = T(0.5) * (T(1) + M::erf(z * GeluConst<T>::kInvSqrt2));
    const T pdf = GeluConst<T>::kInvSqrt2Pi * M::exp(T(-0.5) * z * z);
    return pdf == T(0) ? cdf : cdf + z * pdf;  // pdf == 0: |z| huge or inf (z * pdf -> 0)
  } else if constexpr (A == Activation::kGeluTanh) {
    const T u = GeluConst<T>::kSqrt2OverPi * (z + GeluConst<T>::kCoeff * z * z * z);
    const T s = T(1) / (T(1) + M::exp(T(-2) * u));
    const T du = GeluConst<T>::kSqrt2OverPi * (T(1) + T(3) * GeluConst<T>::kCoeff * z * z);
    const T q = s * (T(1) - s);  // 0 once s rounds to 0 or 1: the term's limit is 0 too
    return q == T(0) ? s : s + T(2) * z * q * du;
  } else {  // kSilu
    const T s = T(1) / (T(1) + M::exp(-z));
    const T c = T(1) - s;
    const T zc = c == T(0) ? T(0) : z * c;  // 0 at z = +inf (not inf * 0)
    const T g = s * (T(1) + zc);
    return s == T(0) ? T(0) : g;            // 0 at z = -inf (not 0 * -inf)
  }
}

// Dispatches a runtime activation code to a compile-time template argument.
#define FUSEDREG_DISPATCH_ACTIVATION(act, NAME, ...)                                  \
  [&] {                                                                                \
    switch (act) {                                                                     \
      case ::fusedreg::Activation::kNone: {                                            \
        constexpr auto NAME = ::fusedreg::Activation::kNone;                           \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::fusedreg::Activation::kRelu: {                                            \
        constexpr auto NAME = ::fusedreg::Activation::kRelu;                           \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::fusedreg::Activation::kGelu: {                                            \
        constexpr auto NAME = ::fusedreg::Activation::kGelu;                           \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::fusedreg::Activation::kGeluTanh: {                                        \
        constexpr auto NAME = ::fusedreg::Activation::kGeluTanh;                       \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      default: {                                                                       \
        constexpr auto NAME = ::fusedreg::Activation::kSilu;                           \
        return __VA_ARGS__();                                                          \
      }                                                                                \
    }                                                                                  \
  }()

}  // namespace fusedreg
