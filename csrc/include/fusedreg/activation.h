// Activations and their derivatives, evaluated in the compute type T (float for
// fp32/fp16/bf16 inputs, double for float64), shared by the CPU and CUDA backends.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedreg/macros.h"

namespace fusedreg {

enum class Activation : int64_t { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4 };

namespace detail {
FUSEDREG_INLINE float erf_(float v) { return erff(v); }
FUSEDREG_INLINE double erf_(double v) { return erf(v); }
FUSEDREG_INLINE float exp_(float v) { return expf(v); }
FUSEDREG_INLINE double exp_(double v) { return exp(v); }
FUSEDREG_INLINE float tanh_(float v) { return tanhf(v); }
FUSEDREG_INLINE double tanh_(double v) { return tanh(v); }
FUSEDREG_INLINE float abs_(float v) { return fabsf(v); }
FUSEDREG_INLINE double abs_(double v) { return fabs(v); }

// 1 + tanh(v) and 1 - tanh(v)^2 from e = exp(-2|v|) in (0, 1]: no overflow and no
// cancellation. Formed from t = tanh(v) they lose ~1e-7 absolute near |t| = 1 (more with
// CUDA's tanhf, 2 ulp), which gelu_tanh's gradient multiplies by z * dinner (~10).
template <typename T>
FUSEDREG_INLINE void tanh_parts(T v, T* one_plus_t, T* sech2) {
  const T e = exp_(T(-2) * abs_(v));
  const T r = T(1) / (T(1) + e);
  *one_plus_t = v >= T(0) ? T(2) * r : T(2) * e * r;
  *sech2 = T(4) * e * r * r;
}
}  // namespace detail

// Constants of the GELU forms: 1/sqrt(2), 1/sqrt(2*pi), sqrt(2/pi), 0.044715.
template <typename T>
struct GeluConst {
  static constexpr T kInvSqrt2 = T(0.70710678118654752440);
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
  static constexpr T kSqrt2OverPi = T(0.79788456080286535588);
  static constexpr T kCoeff = T(0.044715);
};

template <Activation A, typename T>
FUSEDREG_INLINE T activate(T z) {
  if constexpr (A == Activation::kNone) {
    return z;
  } else if constexpr (A == Activation::kRelu) {
    return z > T(0) ? z : T(0);
  } else if constexpr (A == Activation::kGelu) {
    return T(0.5) * z * (T(1) + detail::erf_(z * GeluConst<T>::kInvSqrt2));
  } else if constexpr (A == Activation::kGeluTanh) {
    const T inner = GeluConst<T>::kSqrt2OverPi * (z + GeluConst<T>::kCoeff * z * z * z);
    T one_plus_t, sech2;
    detail::tanh_parts(inner, &one_plus_t, &sech2);
    return T(0.5) * z * one_plus_t;
  } else {  // kSilu
    return z / (T(1) + detail::exp_(-z));
  }
}

// d act(z) / dz
template <Activation A, typename T>
FUSEDREG_INLINE T activate_grad(T z) {
  if constexpr (A == Activation::kNone) {
    return T(1);
  } else if constexpr (A == Activation::kRelu) {
    return z > T(0) ? T(1) : T(0);
  } else if constexpr (A == Activation::kGelu) {
    const T cdf = T(0.5) * (T(1) + detail::erf_(z * GeluConst<T>::kInvSqrt2));
    const T pdf = GeluConst<T>::kInvSqrt2Pi * detail::exp_(T(-0.5) * z * z);
    return cdf + z * pdf;
  } else if constexpr (A == Activation::kGeluTanh) {
    const T inner = GeluConst<T>::kSqrt2OverPi * (z + GeluConst<T>::kCoeff * z * z * z);
    T one_plus_t, sech2;
    detail::tanh_parts(inner, &one_plus_t, &sech2);
    const T dinner = GeluConst<T>::kSqrt2OverPi * (T(1) + T(3) * GeluConst<T>::kCoeff * z * z);
    return T(0.5) * one_plus_t + T(0.5) * z * sech2 * dinner;
  } else {  // kSilu
    const T s = T(1) / (T(1) + detail::exp_(-z));
    return s * (T(1) + z * (T(1) - s));
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
