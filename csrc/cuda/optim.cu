// CUDA kernels of the fused optimizer steps (adam_step, adam_step_capturable, sgd_step,
// lion_step): multi-tensor apply. The host packs the addresses of up to kTensors<DEPTH> parameters (DEPTH tensors
// each: p, g, state...) and a (tensor, chunk) pair for each of up to kBlocks blocks into the
// kernel's argument struct, and launches whenever one of them is full — a handful of launches
// for any number of tensors. Each block steps one chunk of kChunk elements of one tensor;
// each thread 4 elements per iteration (coalesced, stride blockDim), in fp32 (fp64 for
// float64 parameters) with the math of fusedreg/optim_math.h, on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "fusedreg/optim_args.h"

namespace fusedreg {
namespace {

using namespace fusedreg::optim;

constexpr int kThreads = 512;
constexpr int kILP = 4;                 // elements per thread per iteration
constexpr int64_t kChunk = 1 << 16;     // elements per block
constexpr int kBlocks = 320;            // (tensor, chunk) pairs per launch
// Tensors per launch, by depth: keeps the argument struct under the classic 4 KiB limit.
template <int DEPTH>
constexpr int kTensors = DEPTH <= 3 ? 48 : 30;

// The kernel argument: everything a launch needs, passed by value (no device table).
template <int DEPTH>
struct TensorListArgs {
  void* addr[DEPTH][kTensors<DEPTH>];      // addr[k][t]: the k-th tensor of parameter t
  int64_t numel[kTensors<DEPTH>];
  double scalar[2][kTensors<DEPTH>];       // per-tensor scalars (Adam: −lr/bc1, sqrt(bc2))
  unsigned char block_tensor[kBlocks];     // block b steps tensor block_tensor[b] ...
  int block_chunk[kBlocks];                // ... from element block_chunk[b] * kChunk
};
static_assert(sizeof(TensorListArgs<5>) + 64 <= 4096 && sizeof(TensorListArgs<3>) + 64 <= 4096 &&
                  sizeof(TensorListArgs<6>) + sizeof(AdamHyper) + 64 <= 4096,
              "kernel arguments must fit in 4 KiB");

// Launches `launch(args, n_blocks)` as often as needed to cover every chunk of every tensor.
// lists[k][t] is the k-th tensor of parameter t; an empty list (unused state) passes nullptrs.
template <int DEPTH, typename Launch>
void multi_tensor_apply(const std::vector<at::TensorList>& lists, const std::vector<double>* s0,
                        const std::vector<double>* s1, const Launch& launch) {
  const at::TensorList params = lists[0];
  TensorListArgs<DEPTH> args;
  int n_tensors = 0, n_blocks = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t numel = params[t].numel();
    if (numel == 0) continue;
    for (int k = 0; k < DEPTH; ++k)
      args.addr[k][n_tensors] = lists[k].empty() ? nullptr : lists[k][t].data_ptr();
    args.numel[n_tensors] = numel;
    args.scalar[0][n_tensors] = s0 ? (*s0)[t] : 0.0;
    args.scalar[1][n_tensors] = s1 ? (*s1)[t] : 0.0;
    ++n_tensors;
    const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < n_chunks; ++c) {
      args.block_tensor[n_blocks] = static_cast<unsigned char>(n_tensors - 1);
      args.block_chunk[n_blocks] = static_cast<int>(c);
      ++n_blocks;
      const bool blocks_full = n_blocks == kBlocks;
      const bool tensors_full = n_tensors == kTensors<DEPTH> && c == n_chunks - 1;
      if (blocks_full || tensors_full) {
        launch(args, n_blocks);
        n_blocks = 0;
        if (c == n_chunks - 1) {
          n_tensors = 0;  // this tensor is done: start the next launch empty
        } else {          // more chunks of this tensor: it becomes tensor 0 of the next launch
          for (int k = 0; k < DEPTH; ++k) args.addr[k][0] = args.addr[k][n_tensors - 1];
          args.numel[0] = args.numel[n_tensors - 1];
          args.scalar[0][0] = args.scalar[0][n_tensors - 1];
          args.scalar[1][0] = args.scalar[1][n_tensors - 1];
          n_tensors = 1;
        }
      }
    }
  }
  if (n_blocks > 0) launch(args, n_blocks);
}

// Block-level loop: calls f(t, i) for each element index i of this block's chunk of tensor
// slot t, 4 per thread per iteration.
template <int DEPTH, typename F>
__device__ __forceinline__ void for_chunk(const TensorListArgs<DEPTH>& args, const F& f) {
  const int t = args.block_tensor[blockIdx.x];
  const int64_t begin = int64_t(args.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(begin + kChunk, args.numel[t]);
  for (int64_t base = begin + threadIdx.x; base < end; base += int64_t(kThreads) * kILP) {
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      const int64_t i = base + int64_t(j) * kThreads;
      if (i < end) f(t, i);
    }
  }
}

// Element i of tensor t: load p, g and the moments (addr[0..4]), one adam_update in S, store.
template <typename T, typename S, typename M, bool AMS, bool L1, int N>
__device__ __forceinline__ void adam_element(const TensorListArgs<N>& args, int t, int64_t i,
                                             const AdamConsts<S>& c, S neg_step_size, S bc2_sqrt) {
  T* p = static_cast<T*>(args.addr[0][t]);
  const T* g = static_cast<const T*>(args.addr[1][t]);
  M* m = static_cast<M*>(args.addr[2][t]);
  M* v = static_cast<M*>(args.addr[3][t]);
  M* vm = static_cast<M*>(args.addr[4][t]);
  S pv = static_cast<S>(p[i]), mv = static_cast<S>(m[i]), vv = static_cast<S>(v[i]);
  S vmv = AMS ? static_cast<S>(vm[i]) : S(0);
  adam_update<S, AMS, L1>(c, neg_step_size, bc2_sqrt, pv, static_cast<S>(g[i]), mv, vv, vmv);
  p[i] = static_cast<T>(pv);
  m[i] = static_cast<M>(mv);
  v[i] = static_cast<M>(vv);
  if (AMS) vm[i] = static_cast<M>(vmv);
}

// T: parameter and gradient type; S: compute type; M: state storage type (S, or T when the
// state is kept in the parameter's dtype). Element i is the i-th of the tensor's storage
// (dense in any layout; p, g and state share strides, checked on the host).
template <typename T, typename S, typename M, bool AMS, bool L1>
__global__ void __launch_bounds__(kThreads) adam_kernel(TensorListArgs<5> args, AdamConsts<S> c) {
  for_chunk<5>(args, [&](int t, int64_t i) {
    adam_element<T, S, M, AMS, L1>(args, t, i, c, S(args.scalar[0][t]), S(args.scalar[1][t]));
  });
}

// capturable=True: the same update, with everything that changes between two replays of a
// captured step read on the device. addr[5][t] is parameter t's step count (float32, already
// incremented); dyn = (inv_scale, lr, found_inf) in double. Each thread computes the
// constants and the bias corrections of its block's tensor from them with the host path's
// double math (fusedreg/optim_math.h), rounded once to S. found_inf != 0: nothing is written.
template <typename T, typename S, typename M, bool AMS, bool L1>
__global__ void __launch_bounds__(kThreads)
    adam_capturable_kernel(TensorListArgs<6> args, AdamHyper h, const double* __restrict__ dyn) {
  if (dyn[2] != 0.0) return;
  const double inv_scale = dyn[0], lr = dyn[1];
  const AdamConsts<S> c = adam_consts<S>(lr, inv_scale, h.beta1, h.beta2, h.eps, h.weight_decay,
                                         h.l1, h.l1_lr_scaled, h.maximize, h.decoupled);
  const int slot = args.block_tensor[blockIdx.x];
  const double step = static_cast<double>(*static_cast<const float*>(args.addr[5][slot]));
  const AdamBiasCorrection bc = adam_bias_correction(lr, h.beta1, h.beta2, step);
  const S nss = S(bc.neg_step_size), bc2 = S(bc.bc2_sqrt);
  for_chunk<6>(args, [&](int t, int64_t i) {
    adam_element<T, S, M, AMS, L1>(args, t, i, c, nss, bc2);
  });
}

template <typename T, typename S, typename M, bool MOM, bool L1>
__global__ void __launch_bounds__(kThreads) sgd_kernel(TensorListArgs<3> args, SgdConsts<S> c) {
  for_chunk<3>(args, [&](int t, int64_t i) {
    T* p = static_cast<T*>(args.addr[0][t]);
    const T* g = static_cast<const T*>(args.addr[1][t]);
    M* buf = static_cast<M*>(args.addr[2][t]);
    S pv = static_cast<S>(p[i]);
    S bv = MOM ? static_cast<S>(buf[i]) : S(0);
    sgd_update<S, MOM, L1>(c, pv, static_cast<S>(g[i]), &bv);
    p[i] = static_cast<T>(pv);
    if (MOM) buf[i] = static_cast<M>(bv);
  });
}

template <typename T, typename S, typename M, bool L1>
__global__ void __launch_bounds__(kThreads) lion_kernel(TensorListArgs<3> args, LionConsts<S> c) {
  for_chunk<3>(args, [&](int t, int64_t i) {
    T* p = static_cast<T*>(args.addr[0][t]);
    const T* g = static_cast<const T*>(args.addr[1][t]);
    M* m = static_cast<M*>(args.addr[2][t]);
    S pv = static_cast<S>(p[i]), mv = static_cast<S>(m[i]);
    lion_update<S, L1>(c, pv, static_cast<S>(g[i]), mv);
    p[i] = static_cast<T>(pv);
    m[i] = static_cast<M>(mv);
  });
}

// Calls f(std::integral_constant<bool, B>) for the runtime bool b.
template <typename F>
void bool_dispatch(bool b, const F& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList steps, const AdamHyper& h) {
  const bool amsgrad = h.amsgrad;
  const at::ScalarType sdtype =
      check_lists("fusedreg::adam_step", at::kCUDA, params, grads,
                  {exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList()});
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size() &&
                  steps.size() == params.size() && (!amsgrad || max_exp_avg_sqs.size() == params.size()),
              "fusedreg::adam_step: expected one state tensor and one step per parameter");
  if (params.empty()) return;
  const std::vector<double> counts = increment_steps(steps);  // every check has passed
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::vector<double> nss(params.size()), bc2(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const AdamBiasCorrection bc = adam_bias_correction(h, counts[t]);
    nss[t] = bc.neg_step_size;
    bc2[t] = bc.bc2_sqrt;
  }
  const std::vector<at::TensorList> lists = {params, grads, exp_avgs, exp_avg_sqs,
                                             amsgrad ? max_exp_avg_sqs : at::TensorList()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_step", [&] {
    using S = at::opmath_type<scalar_t>;
    const AdamConsts<S> c = make_adam_consts<S>(h);
    with_state_type<scalar_t, S>(sdtype, [&](auto state_type) {
      using M = typename decltype(state_type)::type;
      bool_dispatch(amsgrad, [&](auto ams) {
        bool_dispatch(h.l1 != 0.0, [&](auto has_l1) {
          multi_tensor_apply<5>(lists, &nss, &bc2, [&](const TensorListArgs<5>& a, int n_blocks) {
            adam_kernel<scalar_t, S, M, decltype(ams)::value, decltype(has_l1)::value>
                <<<n_blocks, kThreads, 0, stream>>>(a, c);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  });
}

// The device values of a capturable step as one float64 vector (inv_scale, lr, found_inf),
// made by device ops only (fills and device-to-device copies: nothing read on the host,
// nothing copied from it, so the step can be captured in a CUDA graph).
at::Tensor capturable_values(const at::Tensor& like, const std::optional<at::Tensor>& lr_tensor,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, double lr) {
  at::Tensor dyn = at::empty({3}, like.options().dtype(at::kDouble));
  if (grad_scale.has_value() && grad_scale->defined()) {
    dyn.select(0, 0).copy_(grad_scale->reshape({})).reciprocal_();
  } else {
    dyn.select(0, 0).fill_(1.0);
  }
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    dyn.select(0, 1).copy_(lr_tensor->reshape({}));
  } else {
    dyn.select(0, 1).fill_(lr);
  }
  if (found_inf.has_value() && found_inf->defined()) {
    dyn.select(0, 2).copy_(found_inf->reshape({}));
  } else {
    dyn.select(0, 2).fill_(0.0);
  }
  return dyn;
}

void adam_step_capturable_cuda(at::TensorList params, at::TensorList grads,
                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                               at::TensorList max_exp_avg_sqs, at::TensorList steps,
                               const std::optional<at::Tensor>& lr_tensor,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf, const AdamHyper& h) {
  const bool amsgrad = h.amsgrad;
  const at::ScalarType sdtype =
      check_lists("fusedreg::adam_step_capturable", at::kCUDA, params, grads,
                  {exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList()});
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size() &&
                  (!amsgrad || max_exp_avg_sqs.size() == params.size()),
              "fusedreg::adam_step_capturable: expected one state tensor per parameter");
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor dyn = capturable_values(params[0], lr_tensor, grad_scale, found_inf, h.lr);
  const double* dyn_ptr = dyn.const_data_ptr<double>();
  const std::vector<at::TensorList> lists = {params, grads, exp_avgs, exp_avg_sqs,
                                             amsgrad ? max_exp_avg_sqs : at::TensorList(), steps};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "adam_step_capturable", [&] {
    using S = at::opmath_type<scalar_t>;
    with_state_type<scalar_t, S>(sdtype, [&](auto state_type) {
      using M = typename decltype(state_type)::type;
      bool_dispatch(amsgrad, [&](auto ams) {
        bool_dispatch(h.l1 != 0.0, [&](auto has_l1) {
          multi_tensor_apply<6>(lists, nullptr, nullptr, [&](const TensorListArgs<6>& a, int n_blocks) {
            adam_capturable_kernel<scalar_t, S, M, decltype(ams)::value, decltype(has_l1)::value>
                <<<n_blocks, kThreads, 0, stream>>>(a, h, dyn_ptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  });
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   const SgdHyper& h) {
  const bool has_momentum = h.momentum != 0.0;
  const at::ScalarType sdtype = check_lists("fusedreg::sgd_step", at::kCUDA, params, grads,
                                            {has_momentum ? momentum_buffers : at::TensorList()});
  TORCH_CHECK(!has_momentum || momentum_buffers.size() == params.size(),
              "fusedreg::sgd_step: momentum needs one buffer per parameter");
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<at::TensorList> lists = {params, grads,
                                             has_momentum ? momentum_buffers : at::TensorList()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_step", [&] {
    using S = at::opmath_type<scalar_t>;
    const SgdConsts<S> c = make_sgd_consts<S>(h);
    with_state_type<scalar_t, S>(sdtype, [&](auto state_type) {
      using M = typename decltype(state_type)::type;
      bool_dispatch(has_momentum, [&](auto mom) {
        bool_dispatch(h.l1 != 0.0, [&](auto has_l1) {
          multi_tensor_apply<3>(lists, nullptr, nullptr, [&](const TensorListArgs<3>& a, int n_blocks) {
            sgd_kernel<scalar_t, S, M, decltype(mom)::value, decltype(has_l1)::value>
                <<<n_blocks, kThreads, 0, stream>>>(a, c);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  });
}

void lion_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    const LionHyper& h) {
  const at::ScalarType sdtype =
      check_lists("fusedreg::lion_step", at::kCUDA, params, grads, {exp_avgs});
  TORCH_CHECK(exp_avgs.size() == params.size(), "fusedreg::lion_step: one exp_avg per parameter");
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<at::TensorList> lists = {params, grads, exp_avgs};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lion_step", [&] {
    using S = at::opmath_type<scalar_t>;
    const LionConsts<S> c = make_lion_consts<S>(h);
    with_state_type<scalar_t, S>(sdtype, [&](auto state_type) {
      using M = typename decltype(state_type)::type;
      bool_dispatch(h.l1 != 0.0, [&](auto has_l1) {
        multi_tensor_apply<3>(lists, nullptr, nullptr, [&](const TensorListArgs<3>& a, int n_blocks) {
          lion_kernel<scalar_t, S, M, decltype(has_l1)::value><<<n_blocks, kThreads, 0, stream>>>(a, c);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedreg, CUDA, m) {
  m.impl("adam_step", &adam_step_op<adam_step_cuda>);
  m.impl("adam_step_capturable", &adam_step_capturable_op<adam_step_capturable_cuda>);
  m.impl("sgd_step", &sgd_step_op<sgd_step_cuda>);
  m.impl("lion_step", &lion_step_op<lion_step_cuda>);
}

}  // namespace fusedreg
