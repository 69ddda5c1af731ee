// CPU kernels of the fused optimizer steps (adam_step, sgd_step, lion_step).
//
// One call steps every tensor of the list: the tensors are cut into spans of kSpan elements,
// and the concatenated list of spans is split over the threads (at::parallel_for), so that
// many small tensors and one big tensor both use every core. Each span runs a simple loop of
// the per-element math of fusedreg/optim_math.h that the compiler vectorizes; the loop is
// compiled twice, for baseline x86-64 and for AVX-512, and the AVX-512 one is chosen at run
// time when the CPU has it (the build stays portable, FUSEDREG_CPU_ARCH is not needed).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fusedreg/optim_args.h"
#include "fusedreg/optim_math.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FUSEDREG_HAS_AVX512_CLONE 1
#define FUSEDREG_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")))
#else
#define FUSEDREG_HAS_AVX512_CLONE 0
#define FUSEDREG_TARGET_AVX512
#endif
#define FUSEDREG_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fusedreg {
namespace {

using namespace fusedreg::optim;

constexpr int64_t kSpan = 1 << 15;  // elements per task: 128 KiB of fp32 per stream

struct Span {
  int64_t tensor, begin, end;
};

std::vector<Span> make_spans(at::TensorList params) {
  std::vector<Span> spans;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kSpan) spans.push_back({int64_t(t), b, std::min(n, b + kSpan)});
  }
  return spans;
}

bool cpu_has_avx512() {
#if FUSEDREG_HAS_AVX512_CLONE
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

// Runs fn(span) over all spans in parallel.
template <typename F>
void parallel_spans(const std::vector<Span>& spans, const F& fn) {
  // A grain of 4 spans keeps lists of under ~128K elements on the calling thread: waking
  // the pool costs more than stepping them.
  at::parallel_for(0, int64_t(spans.size()), 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(spans[i]);
  });
}

// ---- the loops (one body, two instruction sets) -----------------------------------------
// p, g: parameter and gradient (T); m, v, vm / buf: state (S); n elements.
template <typename T, typename S, bool AMS, bool L1>
FUSEDREG_ALWAYS_INLINE void adam_loop(const AdamConsts<S>& cref, S nss, S bc2, T* p, const T* g,
                                      S* m, S* v, S* vm, int64_t n) {
  // A local copy: the constants cannot alias the stores, so they stay in registers and the
  // selects on them (lerp's form) are if-converted instead of blocking vectorization.
  const AdamConsts<S> c = cref;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    S pv = static_cast<S>(p[i]);
    S vmv = AMS ? vm[i] : S(0);
    adam_update<S, AMS, L1>(c, nss, bc2, pv, static_cast<S>(g[i]), m[i], v[i], vmv);
    if constexpr (AMS) vm[i] = vmv;
    p[i] = static_cast<T>(pv);
  }
}

template <typename T, typename S, bool MOM, bool L1>
FUSEDREG_ALWAYS_INLINE void sgd_loop(const SgdConsts<S>& cref, T* p, const T* g, S* buf, int64_t n) {
  const SgdConsts<S> c = cref;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    S pv = static_cast<S>(p[i]);
    sgd_update<S, MOM, L1>(c, pv, static_cast<S>(g[i]), MOM ? buf + i : nullptr);
    p[i] = static_cast<T>(pv);
  }
}

template <typename T, typename S, bool L1>
FUSEDREG_ALWAYS_INLINE void lion_loop(const LionConsts<S>& cref, T* p, const T* g, S* m, int64_t n) {
  const LionConsts<S> c = cref;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    S pv = static_cast<S>(p[i]);
    lion_update<S, L1>(c, pv, static_cast<S>(g[i]), m[i]);
    p[i] = static_cast<T>(pv);
  }
}

// ISA::kBase / kAvx512 instantiate the same loop for each instruction set.
#define FUSEDREG_DEFINE_ISA_VARIANTS(NAME, TPARAMS, TARGS, PARAMS, ARGS) \
  template <TPARAMS>                                                    \
  void NAME##_base PARAMS { NAME##_loop<TARGS> ARGS; }                  \
  template <TPARAMS>                                                    \
  FUSEDREG_TARGET_AVX512 void NAME##_avx512 PARAMS { NAME##_loop<TARGS> ARGS; }

#define COMMA ,
FUSEDREG_DEFINE_ISA_VARIANTS(adam, typename T COMMA typename S COMMA bool AMS COMMA bool L1,
                             T COMMA S COMMA AMS COMMA L1,
                             (const AdamConsts<S>& c, S nss, S bc2, T* p, const T* g, S* m, S* v, S* vm, int64_t n),
                             (c, nss, bc2, p, g, m, v, vm, n))
FUSEDREG_DEFINE_ISA_VARIANTS(sgd, typename T COMMA typename S COMMA bool MOM COMMA bool L1,
                             T COMMA S COMMA MOM COMMA L1,
                             (const SgdConsts<S>& c, T* p, const T* g, S* buf, int64_t n),
                             (c, p, g, buf, n))
FUSEDREG_DEFINE_ISA_VARIANTS(lion, typename T COMMA typename S COMMA bool L1, T COMMA S COMMA L1,
                             (const LionConsts<S>& c, T* p, const T* g, S* m, int64_t n),
                             (c, p, g, m, n))
#undef COMMA

// One span with the loop of the best instruction set.
template <typename T, typename S, bool AMS, bool L1>
void adam_span(bool avx512, const AdamConsts<S>& c, S nss, S bc2, T* p, const T* g, S* m, S* v,
               S* vm, int64_t n) {
  avx512 ? adam_avx512<T, S, AMS, L1>(c, nss, bc2, p, g, m, v, vm, n)
         : adam_base<T, S, AMS, L1>(c, nss, bc2, p, g, m, v, vm, n);
}
template <typename T, typename S, bool MOM, bool L1>
void sgd_span(bool avx512, const SgdConsts<S>& c, T* p, const T* g, S* buf, int64_t n) {
  avx512 ? sgd_avx512<T, S, MOM, L1>(c, p, g, buf, n) : sgd_base<T, S, MOM, L1>(c, p, g, buf, n);
}
template <typename T, typename S, bool L1>
void lion_span(bool avx512, const LionConsts<S>& c, T* p, const T* g, S* m, int64_t n) {
  avx512 ? lion_avx512<T, S, L1>(c, p, g, m, n) : lion_base<T, S, L1>(c, p, g, m, n);
}

template <typename S>
S* state_ptr(at::TensorList list, const Span& s) {
  return list.empty() ? nullptr : list[s.tensor].data_ptr<S>() + s.begin;
}

// ---- the ops ----------------------------------------------------------------------------
void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::ArrayRef<double> steps, double lr, double beta1, double beta2, double eps,
                   double weight_decay, double l1, bool amsgrad, bool maximize, bool decoupled,
                   double inv_scale) {
  check_lists("fusedreg::adam_step", at::kCPU, params, grads,
              {exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList()});
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size() &&
                  steps.size() == params.size() && (!amsgrad || max_exp_avg_sqs.size() == params.size()),
              "fusedreg::adam_step: expected one state tensor and one step per parameter");
  if (params.empty()) return;
  const std::vector<Span> spans = make_spans(params);
  const bool avx512 = cpu_has_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_step", [&] {
    using S = at::opmath_type<scalar_t>;
    const AdamConsts<S> c = make_adam_consts<S>(lr, beta1, beta2, eps, weight_decay, l1, maximize,
                                                decoupled, inv_scale);
    std::vector<S> nss(params.size()), bc2(params.size());
    for (size_t t = 0; t < params.size(); ++t) {
      double a, b;
      adam_bias_corrections(lr, beta1, beta2, steps[t], &a, &b);
      nss[t] = S(a);
      bc2[t] = S(b);
    }
    const bool has_l1 = l1 != 0.0;
    parallel_spans(spans, [&](const Span& s) {
      scalar_t* p = params[s.tensor].data_ptr<scalar_t>() + s.begin;
      const scalar_t* g = grads[s.tensor].const_data_ptr<scalar_t>() + s.begin;
      S* m = state_ptr<S>(exp_avgs, s);
      S* v = state_ptr<S>(exp_avg_sqs, s);
      S* vm = amsgrad ? state_ptr<S>(max_exp_avg_sqs, s) : nullptr;
      const int64_t n = s.end - s.begin;
      const S a = nss[s.tensor], b = bc2[s.tensor];
      if (amsgrad) {
        has_l1 ? adam_span<scalar_t, S, true, true>(avx512, c, a, b, p, g, m, v, vm, n)
               : adam_span<scalar_t, S, true, false>(avx512, c, a, b, p, g, m, v, vm, n);
      } else {
        has_l1 ? adam_span<scalar_t, S, false, true>(avx512, c, a, b, p, g, m, v, vm, n)
               : adam_span<scalar_t, S, false, false>(avx512, c, a, b, p, g, m, v, vm, n);
      }
    });
  });
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  double lr, double momentum, double dampening, double weight_decay, double l1,
                  bool nesterov, bool maximize, bool decoupled, bool first_step, double inv_scale) {
  const bool has_momentum = momentum != 0.0;
  check_lists("fusedreg::sgd_step", at::kCPU, params, grads,
              {has_momentum ? momentum_buffers : at::TensorList()});
  TORCH_CHECK(!has_momentum || momentum_buffers.size() == params.size(),
              "fusedreg::sgd_step: momentum needs one buffer per parameter");
  if (params.empty()) return;
  const std::vector<Span> spans = make_spans(params);
  const bool avx512 = cpu_has_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_step", [&] {
    using S = at::opmath_type<scalar_t>;
    const SgdConsts<S> c = make_sgd_consts<S>(lr, momentum, dampening, weight_decay, l1, nesterov,
                                              maximize, decoupled, first_step, inv_scale);
    const bool has_l1 = l1 != 0.0;
    parallel_spans(spans, [&](const Span& s) {
      scalar_t* p = params[s.tensor].data_ptr<scalar_t>() + s.begin;
      const scalar_t* g = grads[s.tensor].const_data_ptr<scalar_t>() + s.begin;
      S* buf = has_momentum ? state_ptr<S>(momentum_buffers, s) : nullptr;
      const int64_t n = s.end - s.begin;
      if (has_momentum) {
        has_l1 ? sgd_span<scalar_t, S, true, true>(avx512, c, p, g, buf, n)
               : sgd_span<scalar_t, S, true, false>(avx512, c, p, g, buf, n);
      } else {
        has_l1 ? sgd_span<scalar_t, S, false, true>(avx512, c, p, g, buf, n)
               : sgd_span<scalar_t, S, false, false>(avx512, c, p, g, buf, n);
      }
    });
  });
}

void lion_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, double lr,
                   double beta1, double beta2, double weight_decay, double l1, bool maximize,
                   double inv_scale) {
  check_lists("fusedreg::lion_step", at::kCPU, params, grads, {exp_avgs});
  TORCH_CHECK(exp_avgs.size() == params.size(), "fusedreg::lion_step: one exp_avg per parameter");
  if (params.empty()) return;
  const std::vector<Span> spans = make_spans(params);
  const bool avx512 = cpu_has_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lion_step", [&] {
    using S = at::opmath_type<scalar_t>;
    const LionConsts<S> c = make_lion_consts<S>(lr, beta1, beta2, weight_decay, l1, maximize, inv_scale);
    const bool has_l1 = l1 != 0.0;
    parallel_spans(spans, [&](const Span& s) {
      scalar_t* p = params[s.tensor].data_ptr<scalar_t>() + s.begin;
      const scalar_t* g = grads[s.tensor].const_data_ptr<scalar_t>() + s.begin;
      S* m = state_ptr<S>(exp_avgs, s);
      const int64_t n = s.end - s.begin;
      has_l1 ? lion_span<scalar_t, S, true>(avx512, c, p, g, m, n)
             : lion_span<scalar_t, S, false>(avx512, c, p, g, m, n);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedreg, CPU, m) {
  m.impl("adam_step", &adam_step_cpu);
  m.impl("sgd_step", &sgd_step_cpu);
  m.impl("lion_step", &lion_step_cpu);
}

}  // namespace fusedreg
