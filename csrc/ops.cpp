// The schemas of every fusedreg op, defined once. Implementations live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL per dispatch key);
// fake functions and autograd live in fusedreg/ops/<op>.py.
//
// Conventions: tensors are made contiguous by the Python wrappers; a dropout seed is a
// 0-dim int64 CPU tensor holding the 64 bits of the seed (read on the host, so a CUDA
// kernel launch never waits on it); `activation` is the code of fusedreg/_activations.py.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "fusedreg/activation.h"
#include "fusedreg/batch_norm_host.h"
#include "fusedreg/cpu/direct.h"
#include "fusedreg/cpu/rows.h"

namespace fusedreg {
PyMethodDef* optim_direct_methods();  // csrc/cpu/optim.cpp

// ---- direct calls of the row ops on CPU --------------------------------------------------
// fusedreg._C.<op>(positional arguments in the schema's order) runs the op's registered CPU
// kernel (its own checks first) with the arguments parsed here, without torch.ops' Python
// argument parsing and boxed dispatch: about 4 us a call, half of a (1, 768) layer_norm_fwd
// call through torch.ops. It declines — returns None
// before anything runs — unless every tensor is a plain CPU torch.Tensor or Parameter and no
// dispatch or torch-function mode, functorch layer or tracer is active: then the call would
// reach the CPU kernel through the dispatcher too, and the caller makes that torch.ops call.
namespace {

using cpu::plain_cpu_tensor;

// The registered op kName's typed handle, found once (the kernels register when the library
// loads).
template <typename Sig, const char* kName>
const c10::TypedOperatorHandle<Sig>& typed_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").typed<Sig>();
  return op;
}

// A redispatch with these keys goes straight to the CPU kernel.
const c10::DispatchKeySet kCpuKeys{c10::DispatchKey::CPU};

// One positional argument by the kernel's parameter type: parse() is false (nothing raised)
// when the object is not what the direct call takes.
template <typename T>
struct RowArg;

template <>
struct RowArg<const at::Tensor&> {
  PyObject* obj = nullptr;
  bool parse(PyObject* o) {
    obj = o;
    return plain_cpu_tensor(o);
  }
  const at::Tensor& get() const { return THPVariable_Unpack(obj); }
};

template <>
struct RowArg<const std::optional<at::Tensor>&> {
  std::optional<at::Tensor> value;
  bool parse(PyObject* o) {
    if (o == Py_None) return true;
    if (!plain_cpu_tensor(o)) return false;
    value = THPVariable_Unpack(o);
    return true;
  }
  const std::optional<at::Tensor>& get() const { return value; }
};

template <>
struct RowArg<double> {
  double value = 0.0;
  bool parse(PyObject* o) {
    if (!PyFloat_CheckExact(o)) return false;  // ints and the rest: torch.ops' conversions
    value = PyFloat_AS_DOUBLE(o);
    return true;
  }
  double get() const { return value; }
};

template <>
struct RowArg<int64_t> {
  int64_t value = 0;
  bool parse(PyObject* o) {
    if (!PyLong_CheckExact(o)) return false;
    int overflow = 0;
    value = PyLong_AsLongLongAndOverflow(o, &overflow);
    return overflow == 0;  // out of int64's range: declined (torch.ops raises)
  }
  int64_t get() const { return value; }
};

template <>
struct RowArg<bool> {
  bool value = false;
  bool parse(PyObject* o) {
    if (!PyBool_Check(o)) return false;
    value = o == Py_True;
    return true;
  }
  bool get() const { return value; }
};

template <>
struct RowArg<at::ScalarType> {
  at::ScalarType value = at::ScalarType::Undefined;
  bool parse(PyObject* o) {
    if (!THPDtype_Check(o)) return false;
    value = reinterpret_cast<THPDtype*>(o)->scalar_type;
    return true;
  }
  at::ScalarType get() const { return value; }
};

PyObject* wrap(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }

template <typename... T>
PyObject* wrap(std::tuple<T...> ts) {
  PyObject* out = PyTuple_New(Py_ssize_t(sizeof...(T)));
  if (out == nullptr) return nullptr;
  Py_ssize_t i = 0;
  bool ok = true;
  std::apply(
      [&](auto&... t) {
        ((ok = ok && [&] {
           PyObject* v = THPVariable_Wrap(std::move(t));
           if (v == nullptr) return false;
           PyTuple_SET_ITEM(out, i++, v);
           return true;
         }()),
         ...);
      },
      ts);
  if (!ok) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

// The direct call of the registered op kName whose CPU kernel has the signature R(A...).
template <typename F>
struct RowDirect;

template <typename R, typename... A>
struct RowDirect<R(A...)> {
  template <const char* kName>
  static PyObject* call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    HANDLE_TH_ERRORS
    if (nargs != Py_ssize_t(sizeof...(A)) || !cpu::direct_call_allowed()) Py_RETURN_NONE;
    std::tuple<RowArg<A>...> parsed;
    const bool ok = std::apply(
        [&](auto&... arg) {
          Py_ssize_t i = 0;
          return (arg.parse(args[i++]) && ...);  // left to right, stops at the first miss
        },
        parsed);
    if (!ok) Py_RETURN_NONE;
    const auto& op = typed_op<R(A...), kName>();
    RECORD_FUNCTION(kName, std::vector<c10::IValue>());
    R out = [&] {
      pybind11::gil_scoped_release no_gil;
      return std::apply(
          [&](const auto&... arg) {
            return op.redispatch(kCpuKeys, arg.get()...);
          },
          parsed);
    }();
    return wrap(std::move(out));
    END_HANDLE_TH_ERRORS
  }
};

using Opt = const std::optional<at::Tensor>&;
using Ten = const at::Tensor&;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// The CPU kernels' signatures (csrc/cpu/<op>.cpp), as the schemas below define them.
using LayerNormFwd = Tensor4(Ten, Opt, Opt, Opt, double, double, Ten, bool, at::ScalarType, bool);
using LayerNormBwd = Tensor4(Ten, Opt, Ten, Opt, Opt, Ten, Ten, double, Ten, bool, at::ScalarType,
                             bool, bool, bool);
using BiasDropoutFwd = at::Tensor(Ten, Opt, Opt, double, int64_t, Ten);
using BiasDropoutBwd =
    std::tuple<at::Tensor, at::Tensor>(Ten, Opt, Opt, double, int64_t, Ten, bool);

constexpr char kLayerNormFwd[] = "fusedreg::layer_norm_fwd";
constexpr char kLayerNormBwd[] = "fusedreg::layer_norm_bwd";
constexpr char kBiasDropoutFwd[] = "fusedreg::bias_dropout_fwd";
constexpr char kBiasDropoutBwd[] = "fusedreg::bias_dropout_bwd";

// fusedreg._C.draw_seed(): torch.randint(2**63 - 1, ()) — the same op on torch's default CPU
// generator, so the same value — without Python's argument parsing (half a small call's
// seed cost), or None (declined) under a mode, functorch layer or tracer, where the caller
// makes the torch.randint call those see.
PyObject* draw_seed(PyObject*, PyObject* const*, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 0 || !cpu::direct_call_allowed()) Py_RETURN_NONE;
  return THPVariable_Wrap(at::randint(std::numeric_limits<int64_t>::max(), {}, at::kLong));
  END_HANDLE_TH_ERRORS
}

// A saved tensor as an op's optional argument: undefined (saved as absent) is nullopt.
inline std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// ---- bias_dropout with autograd, in C++ ----------------------------------------------------
// fusedreg._C.bias_dropout_train(x, bias, residual, p, activation, seed): what
// fusedreg.ops.bias_dropout.BiasDropoutFunction.apply(x, bias, residual, seed, config) computes
// for the cpu backend — the same kernels, the same saved tensors, the same gradients — as a C++
// autograd node: the Python Function's apply, its ctx and its Python backward cost about 10 us
// of a small dropout's forward + backward, more than torch's own dropout takes there. Declines
// (None, nothing ran) as the direct calls above do. A backward with create_graph=True calls
// fusedreg.ops.bias_dropout._differentiable_backward (differentiable torch ops), as the Python
// Function does.
struct BiasDropoutNode : public torch::autograd::Function<BiasDropoutNode> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, const at::Tensor& seed,
                            double p, int64_t activation) {
    const auto& fwd = typed_op<BiasDropoutFwd, kBiasDropoutFwd>();
    at::Tensor out = fwd.redispatch(kCpuKeys, x, bias, residual,
                                    p, activation, seed);
    // needs_input_grad counts the tensor inputs only: x, then the bias and the residual
    // where given, then the seed
    const int64_t bias_edge = bias ? 1 : -1, residual_edge = residual ? 1 + (bias ? 1 : 0) : -1;
    ctx->saved_data["p"] = p;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["bias_edge"] = bias_edge;
    ctx->saved_data["residual_edge"] = residual_edge;
    const bool need_x = ctx->needs_input_grad(0),
               need_bias = bias_edge >= 0 && ctx->needs_input_grad(bias_edge);
    if (need_x || need_bias) {
      // x and the bias enter the backward only through act'(x + bias); without an activation
      // the bias is kept only for grad_bias's shape and dtype
      const bool act = activation != 0;
      ctx->save_for_backward({act ? x : at::Tensor(),
                              (bias && (act || need_bias)) ? *bias : at::Tensor(), seed});
    }
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    const int64_t bias_edge = ctx->saved_data["bias_edge"].toInt();
    const int64_t residual_edge = ctx->saved_data["residual_edge"].toInt();
    const bool need_x = ctx->needs_input_grad(0),
               need_bias = bias_edge >= 0 && ctx->needs_input_grad(bias_edge),
               need_residual = residual_edge >= 0 && ctx->needs_input_grad(residual_edge);
    at::Tensor grad_x, grad_bias;
    if ((need_x || need_bias) && grad_out.defined()) {
      const auto saved = ctx->get_saved_variables();
      const double p = ctx->saved_data["p"].toDouble();
      const int64_t activation = ctx->saved_data["activation"].toInt();
      const bool want_bias = need_bias;
      if (at::GradMode::is_enabled()) {  // create_graph: a differentiable backward
        pybind11::gil_scoped_acquire gil;
        // looked up per call (a sys.modules hit): a function-local static initialized under
        // the GIL can deadlock against another thread's import
        const pybind11::module_ module = pybind11::module_::import("fusedreg.ops.bias_dropout");
        pybind11::object config = module.attr("BiasDropoutConfig")(p, activation, "cpu");
        pybind11::tuple r = module.attr("_differentiable_backward")(
            grad_out, opt(saved[0]), opt(saved[1]), saved[2], config, need_x, want_bias);
        if (!r[0].is_none()) grad_x = r[0].cast<at::Tensor>();
        if (!r[1].is_none()) grad_bias = r[1].cast<at::Tensor>();
      } else {
        const auto& bwd = typed_op<BiasDropoutBwd, kBiasDropoutBwd>();
        // a plain call reaches the CPU kernel straight; under a mode or functorch layer the
        // dispatcher's full call lets them see the op, as the Python Function's call would
        std::tie(grad_x, grad_bias) =
            cpu::direct_call_allowed() && cpu::plain_cpu(grad_out)
                ? bwd.redispatch(kCpuKeys, grad_out,
                                 opt(saved[0]), opt(saved[1]), p, activation, saved[2], want_bias)
                : bwd.call(grad_out, opt(saved[0]), opt(saved[1]), p, activation, saved[2],
                           want_bias);
        if (!need_x) grad_x = at::Tensor();
        if (!want_bias) grad_bias = at::Tensor();
      }
    }
    return {grad_x, grad_bias, need_residual ? grad_out : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

PyObject* bias_dropout_train(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6 || !cpu::direct_call_allowed()) Py_RETURN_NONE;
  RowArg<const at::Tensor&> x, seed;
  RowArg<const std::optional<at::Tensor>&> bias, residual;
  RowArg<double> p;
  RowArg<int64_t> activation;
  if (!(x.parse(args[0]) && bias.parse(args[1]) && residual.parse(args[2]) && p.parse(args[3]) &&
        activation.parse(args[4]) && seed.parse(args[5])))
    Py_RETURN_NONE;
  RECORD_FUNCTION(kBiasDropoutFwd, std::vector<c10::IValue>());
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = BiasDropoutNode::apply(x.get(), bias.get(), residual.get(), seed.get(), p.get(),
                                 activation.get());
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// ---- layer_norm with autograd, in C++ ------------------------------------------------------
// fusedreg._C.layer_norm_train(x, residual, weight, bias, seed, ndim, eps, p, rms, h_dtype,
// prenorm): what fusedreg.ops.layer_norm.LayerNormFunction.apply(x, residual, weight, bias,
// seed, LayerNormConfig(ndim, eps, p, rms, h_dtype, prenorm, "cpu")) computes — the same
// views, kernels, saved tensors, outputs (y, h, mean, rstd) and gradients — as a C++ autograd
// node: the Python Function's apply, ctx and Python backward cost about 4 us of a small norm's
// forward, more than its kernel. Declines (None, nothing ran) as bias_dropout_train does, and
// for a config LayerNormFunction's check would refuse (ndim outside [1, x.dim()], a non-finite
// eps, p outside [0, 1]), whose error the Function then raises. A backward with
// create_graph=True calls fusedreg.ops.layer_norm._differentiable_backward, as the Function.

// The edges of a node's optional tensor operands: needs_input_grad counts the tensor inputs
// only — x, then the residual, weight and bias where given (then the others) — so an operand's
// index depends on which of those before it are given (-1: not given).
struct OptionalOperands {
  bool has_residual = false, has_weight = false, has_bias = false;
  int64_t residual_edge() const { return has_residual ? 1 : -1; }
  int64_t weight_edge() const { return has_weight ? 1 + has_residual : -1; }
  int64_t bias_edge() const { return has_bias ? 1 + has_residual + has_weight : -1; }
};

// The node's non-tensor state in one saved int64 (saved_data is a hash map: one entry, not
// nine, on a small call's path).
struct LayerNormState : OptionalOperands {
  int64_t ndim = 1;
  bool rms = false, prenorm = false, store_h = false;
  at::ScalarType h_dtype = at::kFloat, x_dtype = at::kFloat, residual_dtype = at::kFloat;

  int64_t pack() const {
    return (ndim & 0xffff) | int64_t(rms) << 16 | int64_t(prenorm) << 17 |
           int64_t(store_h) << 18 | int64_t(has_residual) << 19 | int64_t(has_weight) << 20 |
           int64_t(has_bias) << 21 | int64_t(uint8_t(h_dtype)) << 24 |
           int64_t(uint8_t(x_dtype)) << 32 | int64_t(uint8_t(residual_dtype)) << 40;
  }
  static LayerNormState unpack(int64_t v) {
    LayerNormState s;
    s.ndim = v & 0xffff;
    s.rms = v >> 16 & 1;
    s.prenorm = v >> 17 & 1;
    s.store_h = v >> 18 & 1;
    s.has_residual = v >> 19 & 1;
    s.has_weight = v >> 20 & 1;
    s.has_bias = v >> 21 & 1;
    s.h_dtype = at::ScalarType(v >> 24 & 0xff);
    s.x_dtype = at::ScalarType(v >> 32 & 0xff);
    s.residual_dtype = at::ScalarType(v >> 40 & 0xff);
    return s;
  }
};

// x's leading dims as rows, the last ndim as columns (LayerNormFunction's run_forward)
std::pair<int64_t, int64_t> rows_cols(at::IntArrayRef shape, int64_t ndim) {
  const int64_t nd = int64_t(shape.size()) - ndim;
  int64_t M = 1, N = 1;
  for (int64_t i = 0; i < int64_t(shape.size()); ++i) (i < nd ? M : N) *= shape[i];
  return {M, N};
}

struct LayerNormNode : public torch::autograd::Function<LayerNormNode> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x,
      const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& seed, int64_t ndim, double eps,
      double p, bool rms, at::ScalarType h_dtype, bool prenorm) {
    const auto& fwd = typed_op<LayerNormFwd, kLayerNormFwd>();
    LayerNormState s;
    s.ndim = ndim;
    s.rms = rms;
    s.prenorm = prenorm;
    s.has_residual = residual.has_value();
    s.has_weight = weight.has_value();
    s.has_bias = bias.has_value();
    s.h_dtype = h_dtype;
    s.x_dtype = x.scalar_type();
    s.residual_dtype = residual ? residual->scalar_type() : h_dtype;
    // h is stored when it differs from x (backward normalizes it again) or is returned
    s.store_h = prenorm || residual || p > 0.0 || h_dtype != x.scalar_type();
    const bool flat = x.dim() == 2 && ndim == 1;  // already (M, N): no views to make
    at::Tensor x2 = x;
    std::optional<at::Tensor> r2 = residual, w = weight, b = bias;
    if (!flat) {
      const auto [M, N] = rows_cols(x.sizes(), ndim);
      x2 = x.reshape({M, N});
      if (residual) r2 = residual->reshape({M, N});
      if (weight && weight->dim() != 1) w = weight->reshape({N});
      if (bias && bias->dim() != 1) b = bias->reshape({N});
    }
    // the ops take the residual in h's dtype (a bf16 residual with residual_in_fp32 is cast)
    if (r2 && r2->scalar_type() != h_dtype) r2 = r2->to(h_dtype);
    auto [y, h, mean, rstd] = fwd.redispatch(kCpuKeys, x2, r2,
                                             w, b, eps, p, seed, rms, h_dtype, s.store_h);
    if (!flat) {
      y = y.view(x.sizes());
      if (s.store_h) h = h.view(x.sizes());
    }
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["p"] = p;
    ctx->saved_data["state"] = s.pack();
    // A stored h stays differentiable even when it is not returned (prenorm=False): the
    // backward saves it, and a differentiable backward (create_graph=True) reaches x and the
    // residual through it, its grad arriving as dh_out.
    if (s.store_h) {
      ctx->mark_non_differentiable({mean, rstd});
    } else {
      ctx->mark_non_differentiable({h, mean, rstd});
    }
    ctx->set_materialize_grads(false);
    const bool need_bias = bias && ctx->needs_input_grad(s.bias_edge());
    if (ctx->needs_input_grad(0) || (residual && ctx->needs_input_grad(s.residual_edge())) ||
        (weight && ctx->needs_input_grad(s.weight_edge())) || need_bias) {
      // the bias enters the backward only through grad_bias's shape and dtype
      ctx->save_for_backward({s.store_h ? h : x, weight ? *weight : at::Tensor(),
                              need_bias ? *bias : at::Tensor(), mean, rstd, seed});
    }
    return {y, h, mean, rstd};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const LayerNormState s = LayerNormState::unpack(ctx->saved_data["state"].toInt());
    torch::autograd::variable_list out(11);  // one per forward argument
    at::Tensor dy = grads[0];
    // h is an empty placeholder unless stored: a grad for it carries nothing
    at::Tensor dh_out = s.store_h ? grads[1] : at::Tensor();
    const bool need_x = ctx->needs_input_grad(0),
               need_residual = s.has_residual && ctx->needs_input_grad(s.residual_edge()),
               need_w = s.has_weight && ctx->needs_input_grad(s.weight_edge()),
               need_b = s.has_bias && ctx->needs_input_grad(s.bias_edge());
    if (!(need_x || need_residual || need_w || need_b) || (!dy.defined() && !dh_out.defined()))
      return out;
    const auto saved = ctx->get_saved_variables();
    at::Tensor h = saved[0];
    const double p = ctx->saved_data["p"].toDouble();
    if (at::GradMode::is_enabled()) {  // create_graph: a differentiable backward
      pybind11::gil_scoped_acquire gil;
      // looked up per call (a sys.modules hit): a function-local static initialized under the
      // GIL can deadlock against another thread's import
      const pybind11::module_ module = pybind11::module_::import("fusedreg.ops.layer_norm");
      const auto dtype = [](at::ScalarType t) {
        return pybind11::reinterpret_borrow<pybind11::object>(
            reinterpret_cast<PyObject*>(torch::getTHPDtype(t)));
      };
      pybind11::object config = module.attr("LayerNormConfig")(
          s.ndim, ctx->saved_data["eps"].toDouble(), p, s.rms, dtype(s.h_dtype), s.prenorm,
          "cpu");
      pybind11::tuple r = module.attr("_differentiable_backward")(
          config, dtype(s.x_dtype), s.has_residual ? dtype(s.residual_dtype) : pybind11::none(),
          opt(dy), opt(dh_out), h, opt(saved[1]), opt(saved[2]), saved[5], need_x,
          need_residual, need_w, need_b);
      for (int i = 0; i < 4; ++i)
        if (!r[i].is_none()) out[i] = r[i].cast<at::Tensor>();
      return out;
    }
    const auto& bwd = typed_op<LayerNormBwd, kLayerNormBwd>();
    RECORD_FUNCTION(kLayerNormBwd, std::vector<c10::IValue>());
    const at::IntArrayRef x_shape = saved[0].sizes();
    const bool flat = x_shape.size() == 2 && s.ndim == 1;  // x was (M, N): no views to make
    std::optional<at::Tensor> w = opt(saved[1]), b = opt(saved[2]);
    if (!flat) {
      const auto [M, N] = rows_cols(x_shape, s.ndim);
      h = h.reshape({M, N});
      if (w) w = w->reshape({N});
      if (b) b = b->reshape({N});
    }
    if (!dy.defined()) {
      dy = at::zeros_like(h, h.options().dtype(s.x_dtype));
    } else if (!flat) {
      dy = dy.reshape(h.sizes());
    }
    if (dh_out.defined() && !flat) dh_out = dh_out.reshape(h.sizes());
    // grad_residual equals the grad of h; the op writes it separately only when it differs
    // from grad_x (dropout, or another dtype)
    const bool separate = need_residual && (p > 0.0 || h.scalar_type() != s.x_dtype);
    const at::Tensor& mean = saved[3];
    const at::Tensor& rstd = saved[4];
    const at::Tensor& seed = saved[5];
    // a plain call reaches the CPU kernel straight; under a mode or functorch layer, or for a
    // tensor a saved-tensor hook made into something else, the dispatcher's full call lets
    // them see the op, as the Python Function's call would
    const auto plain = [](const std::optional<at::Tensor>& t) {
      return !t || !t->defined() || cpu::plain_cpu(*t);
    };
    const bool direct = cpu::direct_call_allowed() && cpu::plain_cpu(dy) && plain(opt(dh_out)) &&
                        cpu::plain_cpu(h) && plain(w) && plain(b) && cpu::plain_cpu(mean) &&
                        cpu::plain_cpu(rstd) && cpu::plain_cpu(seed);
    auto [gx, gr, gw, gb] =
        direct ? bwd.redispatch(kCpuKeys, dy, opt(dh_out), h,
                                w, b, mean, rstd, p, seed, s.rms, s.x_dtype, separate, need_w,
                                need_b)
               : bwd.call(dy, opt(dh_out), h, w, b, mean, rstd, p, seed, s.rms, s.x_dtype,
                          separate, need_w, need_b);
    at::Tensor grad_residual;
    if (need_residual) {
      grad_residual = separate ? gr : gx;
      if (grad_residual.scalar_type() != s.residual_dtype)
        grad_residual = grad_residual.to(s.residual_dtype);
    }
    if (flat) {
      out[0] = need_x ? gx : at::Tensor();
      out[1] = grad_residual;
      out[2] = need_w ? gw : at::Tensor();
      out[3] = need_b ? gb : at::Tensor();
      return out;
    }
    if (need_x) out[0] = gx.view(x_shape);
    if (need_residual) out[1] = grad_residual.view(x_shape);
    if (need_w) out[2] = gw.view(saved[1].sizes());
    if (need_b) out[3] = gb.view(saved[2].sizes());
    return out;
  }
};

PyObject* layer_norm_train(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 11 || !cpu::direct_call_allowed()) Py_RETURN_NONE;
  RowArg<const at::Tensor&> x, seed;
  RowArg<const std::optional<at::Tensor>&> residual, weight, bias;
  RowArg<int64_t> ndim;
  RowArg<double> eps, p;
  RowArg<bool> rms, prenorm;
  RowArg<at::ScalarType> h_dtype;
  if (!(x.parse(args[0]) && residual.parse(args[1]) && weight.parse(args[2]) &&
        bias.parse(args[3]) && seed.parse(args[4]) && ndim.parse(args[5]) && eps.parse(args[6]) &&
        p.parse(args[7]) && rms.parse(args[8]) && h_dtype.parse(args[9]) &&
        prenorm.parse(args[10])))
    Py_RETURN_NONE;
  // what LayerNormFunction's config check refuses: its error, from the Function
  const at::ScalarType hd = h_dtype.get();
  if (!(ndim.get() >= 1 && ndim.get() <= x.get().dim() && std::isfinite(eps.get()) &&
        p.get() >= 0.0 && p.get() <= 1.0 &&
        (hd == at::kFloat || hd == at::kDouble || hd == at::kHalf || hd == at::kBFloat16)))
    Py_RETURN_NONE;
  RECORD_FUNCTION(kLayerNormFwd, std::vector<c10::IValue>());
  torch::autograd::variable_list out;
  {
    pybind11::gil_scoped_release no_gil;
    out = LayerNormNode::apply(x.get(), residual.get(), weight.get(), bias.get(), seed.get(),
                               ndim.get(), eps.get(), p.get(), rms.get(), h_dtype.get(),
                               prenorm.get());
  }
  return wrap(std::make_tuple(std::move(out[0]), std::move(out[1]), std::move(out[2]),
                              std::move(out[3])));
  END_HANDLE_TH_ERRORS
}

// torch_norm's fused call (below): None where its checks decline.
PyObject* fused_plain_norm(const at::Tensor& x, int64_t n, const std::optional<at::Tensor>& w,
                           const std::optional<at::Tensor>& b, std::optional<double> eps, bool rms,
                           PyObject* seed_obj, bool grad) {
  const at::ScalarType dtype = x.scalar_type();
  const auto param_ok = [&](const std::optional<at::Tensor>& t) {
    return !t || (t->dim() == 1 && t->size(0) == n && t->scalar_type() == dtype);
  };
  if (!cpu::plain_cpu_tensor(seed_obj) || x.dim() < 1 || n < 1 || x.size(-1) != n ||
      !param_ok(w) || !param_ok(b) || (rms && b))
    Py_RETURN_NONE;
  double e = 0.0;
  if (eps) {
    e = *eps;
    if (!std::isfinite(e)) Py_RETURN_NONE;
  } else {  // rms_norm's default: the compute type's epsilon (float32 / float64 here)
    if (!rms) Py_RETURN_NONE;
    e = dtype == at::kFloat ? double(std::numeric_limits<float>::epsilon())
                            : std::numeric_limits<double>::epsilon();
  }
  const at::Tensor& seed = THPVariable_Unpack(seed_obj);
  RECORD_FUNCTION(kLayerNormFwd, std::vector<c10::IValue>());
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    if (grad) {
      y = LayerNormNode::apply(x, std::nullopt, w, b, seed, 1, e, 0.0, rms, dtype, false)[0];
    } else {
      const auto& fwd = typed_op<LayerNormFwd, kLayerNormFwd>();
      const bool flat = x.dim() == 2;  // already (M, N): no views to make (run_forward)
      const at::Tensor x2 = flat ? x : x.reshape({x.numel() / n, n});
      y = std::get<0>(fwd.redispatch(kCpuKeys, x2, std::nullopt,
                                     w, b, e, 0.0, seed, rms, dtype, false));
      if (!flat) y = y.view(x.sizes());
    }
  }
  return THPVariable_Wrap(std::move(y));
}

// fusedreg._C.torch_norm(x, n, weight, bias, eps, rms, limit, limit_grad[, seed]): under auto,
// a small plain norm served by torch's own op (fusedreg.functional: _torch_small_norm) —
// at::layer_norm(x, (n,), weight, bias, eps), or at::rms_norm(x, (n,), weight, eps) with eps
// None meaning x's dtype's epsilon — called through the dispatcher (its autograd, autocast and
// profiler keys, as torch.layer_norm's Python call reaches them) without Python's argument
// parsing and the Python attribute reads of the checks. It serves float32/float64 x with
// fewer elements than `limit` (`limit_grad` when grad mode is on and x, weight or bias
// requires grad); from the limit up False — nothing ran — or, given `seed` (the functional
// API's unused seed, when the call's backend is cpu with its built-in kernels), the fused
// call the functional API would make: the cpu kernel without autograd (no grad needed, as
// run_forward) or the LayerNormNode above (as layer_norm_train), for x with n columns and
// weight and bias (n,) of x's dtype; limits (0, 0) make every such call the fused one (the
// cpu backend named). A float16/bfloat16 layer_norm (not rms_norm, not under CPU autocast) is
// served likewise, weight and bias then of x's dtype for the fused call (the Python path owns
// float32 ones). None — nothing ran — for any other call:
// a tensor that is not a plain CPU one, another dtype, a mode, functorch layer or tracer, or arguments torch's op (or the
// fused call's checks here) refuses; the caller then checks and routes the call as always.
PyObject* torch_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if ((nargs != 8 && nargs != 9) || !cpu::direct_call_allowed()) Py_RETURN_NONE;
  RowArg<const at::Tensor&> x;
  RowArg<int64_t> n, limit, limit_grad;
  RowArg<const std::optional<at::Tensor>&> weight, bias;
  RowArg<double> eps;
  RowArg<bool> rms;
  const bool default_eps = args[4] == Py_None;
  if (!(x.parse(args[0]) && n.parse(args[1]) && weight.parse(args[2]) && bias.parse(args[3]) &&
        (default_eps || eps.parse(args[4])) && rms.parse(args[5]) && limit.parse(args[6]) &&
        limit_grad.parse(args[7])))
    Py_RETURN_NONE;
  const at::Tensor& t = x.get();
  const at::ScalarType dtype = t.scalar_type();
  // float16/bfloat16: layer_norm's torch op alone (the caller passes the "layer_norm_half"
  // limits; from them up it takes the fused path itself), outside CPU autocast
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  if (half ? rms.get() || at::autocast::is_autocast_enabled(at::kCPU)
           : dtype != at::kFloat && dtype != at::kDouble)
    Py_RETURN_NONE;
  const std::optional<at::Tensor>& w = weight.get();
  const std::optional<at::Tensor>& b = bias.get();
  const bool grad = at::GradMode::is_enabled() &&
                    (t.requires_grad() || (w && w->requires_grad()) || (b && b->requires_grad()));
  if (t.numel() >= (grad ? limit_grad.get() : limit.get())) {
    if (nargs != 9 || args[8] == Py_None) Py_RETURN_FALSE;
    return fused_plain_norm(t, n.get(), w, b, default_eps ? std::nullopt : std::optional(eps.get()),
                            rms.get(), args[8], grad);
  }
  // torch's rms_norm takes a weight of any dtype, with another result dtype than fusedreg's
  // rule (the caller's checks then decide); torch's layer_norm refuses one itself
  if (rms.get() && w && w->scalar_type() != dtype) Py_RETURN_NONE;
  double e = eps.get();
  if (default_eps) {
    if (!rms.get()) Py_RETURN_NONE;
    e = dtype == at::kFloat ? double(std::numeric_limits<float>::epsilon())
                            : std::numeric_limits<double>::epsilon();
  }
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    const int64_t shape[1] = {n.get()};
    try {
      y = rms.get() ? at::rms_norm(t, shape, w, e) : at::layer_norm(t, shape, w, b, e, false);
    } catch (const std::exception&) {  // c10::Error and the rest: nothing was written
      y = at::Tensor();  // refused: the caller's checks raise fusedreg's error
    }
  }
  if (!y.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// ---- batch_norm with autograd, in C++ ------------------------------------------------------
// fusedreg._C.batch_norm_train(x, running_mean, running_var, weight, bias, momentum, eps,
// residual, activation): what fusedreg.functional.batch_norm_act computes for a local (not
// SyncBatchNorm) training call without dropout on the cpu backend — the storage views of
// fusedreg.ops.batch_norm.batch_norm_act, BatchNormFunction's kernels, saved tensors, outputs
// and gradients, and the running-stat update of fusedreg.functional._update_running — as a
// C++ autograd node: the Python path (views, Function apply, ctx, Python backward) cost about
// 25 us of a small BatchNorm's forward and 30 of its backward, more than the kernels at a
// ResNet's last stages. Returns y, or None (nothing ran, nothing written) where the direct
// calls decline (a mode, functorch layer or tracer; a tensor that is not a plain CPU one) and
// for every call outside the common case that the Python checks own: x of another dtype or
// fewer than 2 dims or no elements, one value per channel, vectors that are not 1-D of C
// elements in the compute type (float32; float64 for float64 x) — or, for a float16/bfloat16
// x, in x's dtype (converted to float32 as the Python path converts them, the weight's and
// bias's gradients rounded back to it) —, running stats that need a gradient, a residual of another shape or dtype, an unknown activation, a non-finite
// momentum, eps not in (0, inf). A backward with create_graph=True calls
// fusedreg.ops.batch_norm._node_differentiable_backward, as BatchNormFunction's does.
// fusedreg._C.batch_norm_eval(x, running_mean, running_var, weight, bias, eps, residual,
// activation): an eval call without dropout, plain or with a residual and/or activation
// (fusedreg.functional._cpu_eval_batch_norm), y or None likewise: without a backward to
// record the kernel alone, else the node above in eval (BatchNormFunction's eval forward and
// backward: the running stats copied as constants; the Python path cost about 50 us of a
// small call's forward and backward).

using BnStats = std::tuple<at::Tensor, at::Tensor>(Ten, bool);
using BnFwd = at::Tensor(Ten, Opt, Opt, Opt, Ten, Ten, int64_t, double, Ten, bool);
using BnFwdNcs = Tensor4(Ten, Opt, Opt, Opt, double, int64_t);
using BnOneOpBwd = Tensor4(Ten, Ten, Opt, Opt, Opt, Ten, Ten, int64_t, Ten, bool, bool);
using BnBwdReduce = std::tuple<at::Tensor, at::Tensor>(Ten, Ten, Opt, Opt, Opt, Ten, Ten, int64_t,
                                                       double, Ten, bool);
using BnBwdElemt = std::tuple<at::Tensor, at::Tensor>(Ten, Ten, Opt, Opt, Opt, Ten, Ten, Ten, Ten,
                                                      double, int64_t, double, Ten, bool, bool,
                                                      bool, bool);

constexpr char kBnStats[] = "fusedreg::batch_norm_stats";
constexpr char kBnFwd[] = "fusedreg::batch_norm_fwd";
constexpr char kBnFwdNcs[] = "fusedreg::batch_norm_fwd_ncs";
constexpr char kBnBwdNcs[] = "fusedreg::batch_norm_bwd_ncs";
constexpr char kBnBwdCl[] = "fusedreg::batch_norm_bwd_cl";
constexpr char kBnBwdReduce[] = "fusedreg::batch_norm_bwd_reduce";
constexpr char kBnBwdElemt[] = "fusedreg::batch_norm_bwd_elemt";

// fusedreg._seed.unused_seed's value: the seed of a call without dropout, never read.
const at::Tensor& unused_seed_tensor() {
  static const at::Tensor seed = at::zeros({}, at::kLong);
  return seed;
}

// fusedreg.ops.batch_norm.storage_layout: x is viewed (N, S, C) — channels-last memory, or one
// value per (n, c) — rather than (N, C, S).
bool bn_channels_last(const at::Tensor& x) {
  if (x.dim() == 2 || x.numel() / (x.size(0) * x.size(1)) == 1) return true;
  if (x.dim() != 4 && x.dim() != 5) return false;
  const auto fmt = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  return !x.is_contiguous() && x.is_contiguous(fmt);
}

// fusedreg.ops.batch_norm.to_storage / from_storage (x of shape (N, C, *spatial), non-empty).
at::Tensor bn_to_storage(const at::Tensor& t, bool cl) {
  const int64_t N = t.size(0), C = t.size(1), S = t.numel() / (N * C);
  if (!cl) return t.reshape({N, C, S}).contiguous();
  if (t.dim() == 2) return t.reshape({N, S, C}).contiguous();
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < t.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return t.permute(perm).reshape({N, S, C}).contiguous();
}

at::Tensor bn_from_storage(const at::Tensor& s, at::IntArrayRef shape, bool cl) {
  const int64_t nd = int64_t(shape.size());
  int64_t S = 1;
  for (int64_t d = 2; d < nd; ++d) S *= shape[d];
  if (!cl || S == 1) return s.view(shape);
  std::vector<int64_t> stored{shape[0]}, perm{0, nd - 1};
  for (int64_t d = 2; d < nd; ++d) {
    stored.push_back(shape[d]);
    perm.push_back(d - 1);
  }
  stored.push_back(shape[1]);
  return s.view(stored).permute(perm);
}

// x's dtype is one the kernels take; its compute type is fusedreg::bn_compute_type's
// (fusedreg/batch_norm_host.h).
bool bn_x_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A per-channel vector the fast paths take as it is: 1-D, C elements, the compute type
// (contiguity is the ops' business: they make their own contiguous copies).
bool bn_vector_ok(const std::optional<at::Tensor>& t, int64_t C, at::ScalarType ct) {
  return !t || (t->dim() == 1 && t->size(0) == C && t->scalar_type() == ct);
}

// A per-channel vector of x's own (half-precision) dtype where the compute type is float: the
// Python checks take it (fp32 or x's dtype), and the Python path converts it, as
// fusedreg.ops.batch_norm._vec does, before the kernels (bn_as_compute).
bool bn_vector_x_dtype(const std::optional<at::Tensor>& t, int64_t C, at::ScalarType xt) {
  return t && t->dim() == 1 && t->size(0) == C && t->scalar_type() == xt;
}

std::optional<at::Tensor> bn_as_compute(const std::optional<at::Tensor>& t, at::ScalarType ct) {
  if (!t || t->scalar_type() == ct) return t;
  return t->to(ct).contiguous();
}

// fusedreg.functional._update_running: r <- r + momentum * (stat - r) with the unbiased
// variance, by lerp_ for buffers in the compute type, else in the compute type and rounded to
// the buffer's dtype (the Python expressions, so the same values).
void bn_update_running(at::Tensor rm, at::Tensor rv, const at::Tensor& mean, const at::Tensor& var,
                       int64_t count, double m) {
  const at::Tensor unbiased = count > 1 ? var * (double(count) / double(count - 1)) : var;
  if (rm.scalar_type() == mean.scalar_type() && rv.scalar_type() == mean.scalar_type()) {
    rm.lerp_(mean, m);
    rv.lerp_(unbiased, m);
    return;
  }
  for (auto [r, stat] : {std::pair<at::Tensor, at::Tensor>{rm, mean}, {rv, unbiased}}) {
    if (stat.scalar_type() == at::kFloat && r.is_contiguous() && stat.is_contiguous() &&
        (r.scalar_type() == at::kHalf || r.scalar_type() == at::kBFloat16)) {
      // the expression's own values in one loop (a small call's dozen ops cost ~8 us): torch
      // multiplies a float tensor by a Python float as float(t) * float(scalar), adds the two
      // products with one rounding, and rounds to the buffer's dtype as c10 does; the
      // extension is compiled without FMA contraction (ISO C++, baseline x86-64)
      const float keep = static_cast<float>(1.0 - m), take = static_cast<float>(m);
      const float* sp = stat.const_data_ptr<float>();
      AT_DISPATCH_REDUCED_FLOATING_TYPES(r.scalar_type(), "bn_update_running", [&] {
        scalar_t* rp = r.data_ptr<scalar_t>();
        for (int64_t c = 0; c < r.numel(); ++c) {
          const float a = static_cast<float>(rp[c]) * keep;
          const float b = sp[c] * take;
          rp[c] = static_cast<scalar_t>(a + b);
        }
      });
      continue;
    }
    r.copy_((r.to(stat.scalar_type()) * (1.0 - m) + stat * m).to(r.scalar_type()));
  }
}

// The node's non-tensor state in one saved int64.
struct BatchNormState : OptionalOperands {
  bool cl = false;
  bool training = true;  // batch statistics; else the running stats (eval)
  // weight / bias of x's half dtype (else the compute type): the kernels take float32 copies,
  // and the gradients are rounded to the parameter's dtype, as BatchNormFunction does
  bool half_weight = false, half_bias = false;
  int64_t activation = 0;
  int64_t pack() const {
    return int64_t(cl) | int64_t(has_residual) << 1 | int64_t(has_weight) << 2 |
           int64_t(has_bias) << 3 | int64_t(!training) << 4 | int64_t(half_weight) << 5 |
           int64_t(half_bias) << 6 | activation << 8;
  }
  static BatchNormState unpack(int64_t v) {
    BatchNormState s;
    s.cl = v & 1;
    s.has_residual = v >> 1 & 1;
    s.has_weight = v >> 2 & 1;
    s.has_bias = v >> 3 & 1;
    s.training = !(v >> 4 & 1);
    s.half_weight = v >> 5 & 1;
    s.half_bias = v >> 6 & 1;
    s.activation = v >> 8;
    return s;
  }
};

// The training forward without dropout (BatchNormFunction's, with fusedreg.ops.batch_norm's
// storage views of x and the residual, `cl` saying which): (y in x's shape and layout, a view
// of the kernel's storage tensor; mean, biased var, invstd).
Tensor4 bn_train_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, double eps, int64_t activation,
                         bool cl) {
  const at::Tensor xs = bn_to_storage(x, cl);
  std::optional<at::Tensor> rs;
  if (residual) rs = bn_to_storage(*residual, cl);
  at::Tensor y, mean, var, invstd;
  if (!cl) {  // the one-op forward (fusedreg.ops.batch_norm._forward)
    std::tie(y, mean, var, invstd) =
        typed_op<BnFwdNcs, kBnFwdNcs>().redispatch(kCpuKeys, xs, rs, weight, bias, eps, activation);
  } else {
    std::tie(mean, var) = typed_op<BnStats, kBnStats>().redispatch(kCpuKeys, xs, true);
    invstd = at::rsqrt(var + eps);
    y = typed_op<BnFwd, kBnFwd>().redispatch(kCpuKeys, xs, rs, weight, bias, mean, invstd,
                                             activation, 0.0, unused_seed_tensor(), true);
  }
  return {bn_from_storage(y, x.sizes(), cl), mean, var, invstd};
}

// A float32 copy of a contiguous float32 / float16 / bfloat16 vector: the CPU kernels' exact
// widening (fusedreg/cpu/rows.h), the values of c10's static_cast.
void bn_widen_into(const at::Tensor& v, float* dst) {
  const int64_t n = v.numel();
  if (v.scalar_type() == at::kFloat) {
    std::copy_n(v.const_data_ptr<float>(), n, dst);
  } else if (v.scalar_type() == at::kBFloat16) {
    cpu::row_to_float(v.const_data_ptr<c10::BFloat16>(), dst, n);
  } else {
    TORCH_INTERNAL_ASSERT(v.scalar_type() == at::kHalf);
    cpu::row_to_float(v.const_data_ptr<c10::Half>(), dst, n);
  }
}

// The eval forward's float32 vectors in one pass over the channels where x computes in float
// and every vector is contiguous float32 or x's half dtype (else nullopt): a small call's
// to() copies, `var + eps` and rsqrt are a dispatched op each, about 1.5 us apiece. The values
// are those ops': mean = running_mean.to(float) (the buffer itself where it is float and
// copy_stats is false), var likewise, invstd = rsqrt(var + eps) with eps rounded to float and
// added with one rounding (ATen's CPU add of a scalar) and 1 / sqrt (ATen's CPU rsqrt, both
// correctly rounded), weight and bias .to(float).
struct BnEvalVectors {
  at::Tensor mean, var, invstd;
  std::optional<at::Tensor> weight, bias;
};
std::optional<BnEvalVectors> bn_eval_vectors(const at::Tensor& running_mean,
                                             const at::Tensor& running_var,
                                             const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& bias, double eps,
                                             bool copy_stats) {
  const auto plain = [](const at::Tensor& v) {
    const at::ScalarType t = v.scalar_type();
    return v.is_contiguous() && (t == at::kFloat || t == at::kHalf || t == at::kBFloat16);
  };
  if (!plain(running_mean) || !plain(running_var) || (weight && !plain(*weight)) ||
      (bias && !plain(*bias)))
    return std::nullopt;
  const int64_t C = running_var.numel();
  const auto opts = running_var.options().dtype(at::kFloat);
  const auto as_float = [&](const at::Tensor& v, bool copy) {
    if (v.scalar_type() == at::kFloat && !copy) return v;
    at::Tensor f = at::empty({C}, opts);
    bn_widen_into(v, f.mutable_data_ptr<float>());
    return f;
  };
  const auto as_float_opt = [&](const std::optional<at::Tensor>& v) -> std::optional<at::Tensor> {
    if (!v) return std::nullopt;
    return as_float(*v, false);
  };
  BnEvalVectors out{as_float(running_mean, copy_stats), as_float(running_var, copy_stats),
                    at::empty({C}, opts), as_float_opt(weight), as_float_opt(bias)};
  const float e = static_cast<float>(eps);
  const float* var = out.var.const_data_ptr<float>();
  float* invstd = out.invstd.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0f / std::sqrt(var[c] + e);
  return out;
}

// The eval forward (BatchNormFunction's with the running stats: them in the compute type as
// mean and var, invstd = rsqrt(var + eps), then batch_norm_fwd, with weight and bias in the
// compute type): (y in x's shape and layout; mean, var, invstd). copy_stats: mean and var
// copies even in the compute type (the node's outputs must not be its inputs); without it they
// may be the running stats themselves.
Tensor4 bn_eval_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                        int64_t activation, bool cl, bool copy_stats = true) {
  const at::ScalarType ct = bn_compute_type(x.scalar_type());
  const at::Tensor xs = bn_to_storage(x, cl);
  std::optional<at::Tensor> rs;
  if (residual) rs = bn_to_storage(*residual, cl);
  std::optional<BnEvalVectors> v;
  if (ct == at::kFloat) v = bn_eval_vectors(running_mean, running_var, weight, bias, eps, copy_stats);
  if (!v) {
    at::Tensor var = running_var.to(ct, /*non_blocking=*/false, /*copy=*/copy_stats);
    v = BnEvalVectors{running_mean.to(ct, /*non_blocking=*/false, /*copy=*/copy_stats), var,
                      at::rsqrt(var + eps), bn_as_compute(weight, ct), bn_as_compute(bias, ct)};
  }
  const at::Tensor y = typed_op<BnFwd, kBnFwd>().redispatch(kCpuKeys, xs, rs, v->weight, v->bias,
                                                            v->mean, v->invstd, activation, 0.0,
                                                            unused_seed_tensor(), cl);
  return {bn_from_storage(y, x.sizes(), cl), v->mean, v->var, v->invstd};
}

// Called only when grad mode is on and an input requires grad (the node's needs_input_grad
// is defined only then). Training (batch statistics) or, with running_mean and running_var
// and training false, eval (running statistics, constants to the gradient).
struct BatchNormNode : public torch::autograd::Function<BatchNormNode> {
  // -> (y in x's shape and layout, mean, biased var)
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& x,
                                                const std::optional<at::Tensor>& residual,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, double eps,
                                                int64_t activation,
                                                const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var,
                                                bool training) {
    BatchNormState s;
    s.cl = bn_channels_last(x);
    s.training = training;
    s.has_residual = residual.has_value();
    s.has_weight = weight.has_value();
    s.has_bias = bias.has_value();
    s.activation = activation;
    const at::ScalarType ct = bn_compute_type(x.scalar_type());
    s.half_weight = weight && weight->scalar_type() != ct;
    s.half_bias = bias && bias->scalar_type() != ct;
    auto [y, mean, var, invstd] =
        training ? bn_train_forward(x, residual, bn_as_compute(weight, ct), bn_as_compute(bias, ct),
                                    eps, activation, s.cl)
                 : bn_eval_forward(x, residual, weight, bias, *running_mean, *running_var, eps,
                                   activation, s.cl);
    ctx->saved_data["state"] = s.pack();
    ctx->saved_data["eps"] = eps;  // for the differentiable backward's statistics
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    // z (so the residual and bias) is needed only for act'(z). The inputs themselves, not
    // their storage views (made again in backward): a differentiable backward must reach them,
    // and the views, made here without grad, have no history
    const bool act = activation != 0;
    ctx->save_for_backward({x, act && residual ? *residual : at::Tensor(),
                            weight ? *weight : at::Tensor(), act && bias ? *bias : at::Tensor(),
                            mean, invstd});
    // y as a tensor of its own in x's shape (detach: not a view of the op's output), so that
    // an in-place op on it (ResNet's relu_) is an ordinary in-place op on a node output
    return {y.detach(), mean, var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const BatchNormState s = BatchNormState::unpack(ctx->saved_data["state"].toInt());
    torch::autograd::variable_list out(9);  // one per forward argument
    const at::Tensor& dy = grads[0];  // in x's shape (y's)
    const bool need_x = ctx->needs_input_grad(0),
               need_r = s.has_residual && ctx->needs_input_grad(s.residual_edge()),
               need_w = s.has_weight && ctx->needs_input_grad(s.weight_edge()),
               need_b = s.has_bias && ctx->needs_input_grad(s.bias_edge());
    if (!dy.defined() || !(need_x || need_r || need_w || need_b)) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &mean = saved[4], &invstd = saved[5];
    // the parameters as saved (a differentiable backward must reach them), as the kernels take
    // them (compute-type copies of half ones) further down
    const std::optional<at::Tensor> w0 = opt(saved[2]), b0 = opt(saved[3]);
    // the storage views (differentiable ones under create_graph)
    const at::Tensor xs = bn_to_storage(saved[0], s.cl);
    std::optional<at::Tensor> rs;
    if (saved[1].defined()) rs = bn_to_storage(saved[1], s.cl);
    if (at::GradMode::is_enabled()) {  // create_graph: a differentiable backward
      pybind11::gil_scoped_acquire gil;
      // looked up per call (a sys.modules hit), as the other nodes' backwards do
      const pybind11::module_ module = pybind11::module_::import("fusedreg.ops.batch_norm");
      pybind11::tuple r = module.attr("_node_differentiable_backward")(
          dy, xs, rs, w0, b0, mean, invstd, ctx->saved_data["eps"].toDouble(), s.activation, s.cl,
          need_x, need_r, need_w, need_b, s.training, s.half_weight, s.half_bias);
      for (int i = 0; i < 4; ++i)
        if (!r[i].is_none()) out[i] = r[i].cast<at::Tensor>();
      return out;
    }
    RECORD_FUNCTION(s.cl ? kBnBwdCl : kBnBwdNcs, std::vector<c10::IValue>());
    const std::optional<at::Tensor> w = bn_as_compute(w0, mean.scalar_type()),
                                    b = bn_as_compute(b0, mean.scalar_type());
    const at::Tensor dys = bn_to_storage(dy, s.cl);
    const at::Tensor& seed = unused_seed_tensor();
    // a plain call reaches the CPU kernel straight; under a mode or functorch layer, or for a
    // tensor a saved-tensor hook made into something else, the dispatcher's full call
    const auto plain = [](const std::optional<at::Tensor>& t) { return !t || cpu::plain_cpu(*t); };
    const bool direct = cpu::direct_call_allowed() && cpu::plain_cpu(dys) && cpu::plain_cpu(xs) &&
                        plain(rs) && plain(w) && plain(b) && cpu::plain_cpu(mean) &&
                        cpu::plain_cpu(invstd);
    // grad_residual is dz: dy itself without an activation
    const bool plain_act = s.activation == 0;
    const bool want_gr = need_r && !plain_act;
    at::Tensor sum_dz, sum_dzx, gx, gr;
    if (s.training && need_x) {  // the cpu backend's local training backward in one op
      const auto& op = s.cl ? typed_op<BnOneOpBwd, kBnBwdCl>() : typed_op<BnOneOpBwd, kBnBwdNcs>();
      std::tie(sum_dz, sum_dzx, gx, gr) =
          direct ? op.redispatch(kCpuKeys, dys, xs, rs, w, b, mean, invstd, s.activation, seed,
                                 true, want_gr)
                 : op.call(dys, xs, rs, w, b, mean, invstd, s.activation, seed, true, want_gr);
    } else {
      // BatchNormFunction's two ops, as it runs them in eval (the statistics constants) and in
      // training without grad_x
      if (need_w || need_b) {
        const auto& op = typed_op<BnBwdReduce, kBnBwdReduce>();
        std::tie(sum_dz, sum_dzx) =
            direct ? op.redispatch(kCpuKeys, dys, xs, rs, w, b, mean, invstd, s.activation, 0.0,
                                   seed, s.cl)
                   : op.call(dys, xs, rs, w, b, mean, invstd, s.activation, 0.0, seed, s.cl);
      }
      if (need_x || want_gr) {  // need_x here: eval
        const at::Tensor none = mean.new_empty({0});
        const at::Tensor& s1 = sum_dz.defined() ? sum_dz : none;
        const at::Tensor& s2 = sum_dzx.defined() ? sum_dzx : none;
        const auto& op = typed_op<BnBwdElemt, kBnBwdElemt>();
        std::tie(gx, gr) =
            direct ? op.redispatch(kCpuKeys, dys, xs, rs, w, b, mean, invstd, s1, s2, 0.0,
                                   s.activation, 0.0, seed, s.cl, s.training, need_x, want_gr)
                   : op.call(dys, xs, rs, w, b, mean, invstd, s1, s2, 0.0, s.activation, 0.0,
                             seed, s.cl, s.training, need_x, want_gr);
      }
    }
    if (need_x) out[0] = bn_from_storage(gx, dy.sizes(), s.cl);
    if (need_r) out[1] = plain_act ? dy : bn_from_storage(gr, dy.sizes(), s.cl);
    // in the parameters' dtypes: x's half dtype rounded from float32, as the Function's
    if (need_w) out[2] = s.half_weight ? sum_dzx.to(dy.scalar_type()) : sum_dzx;
    if (need_b) out[3] = s.half_bias ? sum_dz.to(dy.scalar_type()) : sum_dz;
    return out;
  }
};

PyObject* batch_norm_train(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9 || !cpu::direct_call_allowed()) Py_RETURN_NONE;
  RowArg<const at::Tensor&> x;
  RowArg<const std::optional<at::Tensor>&> running_mean, running_var, weight, bias, residual;
  RowArg<double> momentum, eps;
  RowArg<int64_t> activation;
  if (!(x.parse(args[0]) && running_mean.parse(args[1]) && running_var.parse(args[2]) &&
        weight.parse(args[3]) && bias.parse(args[4]) && momentum.parse(args[5]) &&
        eps.parse(args[6]) && residual.parse(args[7]) && activation.parse(args[8])))
    Py_RETURN_NONE;
  const at::Tensor& t = x.get();
  if (!bn_x_dtype_ok(t.scalar_type()) || t.dim() < 2 || t.numel() == 0) Py_RETURN_NONE;
  const at::ScalarType ct = bn_compute_type(t.scalar_type());
  const int64_t C = t.size(1);
  const auto& rm = running_mean.get();
  const auto& rv = running_var.get();
  const auto& r = residual.get();
  const double e = eps.get(), m = momentum.get();
  const auto &w0 = weight.get(), &b0 = bias.get();
  const bool grad = at::GradMode::is_enabled() &&
                    (t.requires_grad() || (r && r->requires_grad()) ||
                     (w0 && w0->requires_grad()) || (b0 && b0->requires_grad()));
  // vectors in the compute type or x's half dtype (the running stats updated, the weight and
  // bias converted and their gradients rounded, as the Python path does)
  const auto vec_ok = [&](const std::optional<at::Tensor>& v) {
    return bn_vector_ok(v, C, ct) || bn_vector_x_dtype(v, C, t.scalar_type());
  };
  if (t.numel() == C || rm.has_value() != rv.has_value() || !vec_ok(rm) || !vec_ok(rv) ||
      (rm && (rm->requires_grad() || rv->requires_grad())) || !vec_ok(w0) || !vec_ok(b0) ||
      (r && (r->sizes() != t.sizes() || r->scalar_type() != t.scalar_type())) ||
      activation.get() < 0 || activation.get() > 4 || !std::isfinite(m) || !(e > 0.0) ||
      !std::isfinite(e))
    Py_RETURN_NONE;
  RECORD_FUNCTION(kBnFwdNcs, std::vector<c10::IValue>());
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    torch::autograd::variable_list out;
    if (grad) {
      out = BatchNormNode::apply(t, r, w0, b0, e, activation.get(), std::nullopt, std::nullopt,
                                 true);
    } else {  // nothing records a backward: the forward alone
      auto [ys, mean, var, invstd] = bn_train_forward(t, r, bn_as_compute(w0, ct), bn_as_compute(b0, ct),
                                                      e, activation.get(), bn_channels_last(t));
      out = {ys, mean, var};
    }
    y = std::move(out[0]);
    if (rm) bn_update_running(*rm, *rv, out[1], out[2], t.numel() / C, m);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyObject* batch_norm_eval(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8 || !cpu::direct_call_allowed()) Py_RETURN_NONE;
  RowArg<const at::Tensor&> x, running_mean, running_var;
  RowArg<const std::optional<at::Tensor>&> weight, bias, residual;
  RowArg<double> eps;
  RowArg<int64_t> activation;
  if (!(x.parse(args[0]) && running_mean.parse(args[1]) && running_var.parse(args[2]) &&
        weight.parse(args[3]) && bias.parse(args[4]) && eps.parse(args[5]) &&
        residual.parse(args[6]) && activation.parse(args[7])))
    Py_RETURN_NONE;
  const at::Tensor& t = x.get();
  if (!bn_x_dtype_ok(t.scalar_type()) || t.dim() < 2 || t.numel() == 0) Py_RETURN_NONE;
  const at::ScalarType ct = bn_compute_type(t.scalar_type());
  const int64_t C = t.size(1);
  const at::Tensor &rm = running_mean.get(), &rv = running_var.get();
  const auto &w = weight.get(), &b = bias.get();
  const auto& r = residual.get();
  const double e = eps.get();
  const int64_t act = activation.get();
  const bool grad = at::GradMode::is_enabled() &&
                    (t.requires_grad() || (w && w->requires_grad()) || (b && b->requires_grad()) ||
                     (r && r->requires_grad()));
  // vectors in the compute type or x's half dtype (converted, as the Python path does)
  const auto vec_ok = [&](const std::optional<at::Tensor>& v) {
    return bn_vector_ok(v, C, ct) || bn_vector_x_dtype(v, C, t.scalar_type());
  };
  if (!vec_ok(rm) || !vec_ok(rv) || !vec_ok(w) || !vec_ok(b) ||
      (r && (r->sizes() != t.sizes() || r->scalar_type() != t.scalar_type())) || act < 0 ||
      act > 4 || !(e > 0.0) || !std::isfinite(e) ||
      (at::GradMode::is_enabled() && (rm.requires_grad() || rv.requires_grad())))
    Py_RETURN_NONE;
  RECORD_FUNCTION(kBnFwd, std::vector<c10::IValue>());
  at::Tensor y;
  if (grad) {  // the node in eval: its backward takes the running stats as constants
    pybind11::gil_scoped_release no_gil;
    y = BatchNormNode::apply(t, r, w, b, e, act, rm, rv, false)[0];
  } else {
    pybind11::gil_scoped_release no_gil;
    y = std::get<0>(bn_eval_forward(t, r, w, b, rm, rv, e, act, bn_channels_last(t),
                                    /*copy_stats=*/false));
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// fusedreg._C.torch_batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
// eps, residual, activation, limit, limit_grad): under auto, a small BatchNorm served by
// torch's ops (fusedreg.functional._torch_small_batch_norm) — at::batch_norm(x, weight, bias,
// running_mean, running_var, training, momentum, eps, false), then add_(residual) where given
// and the activation (fusedreg::Activation's code: relu_ in place; gelu, gelu "tanh" and silu
// out of place, as their backwards read their input) — called through the dispatcher (its autograd and profiler keys, as
// torch.batch_norm's Python call reaches them) without Python's argument parsing and the
// Python checks: y, or None (nothing ran, nothing written) for a call with `limit` or more
// elements (`limit_grad` when grad mode is on and x, weight, bias or the residual requires
// grad), no elements, one value per channel in training, and anything outside the common case
// that the caller's checks own: a tensor that is not a plain CPU one, x not float32/float64/
// float16/bfloat16 (the caller passes the "_f16" / "_bf16" entries' limits for those) or under 2
// dims, vectors not 1-D, one running stat without the other (or none in eval), a
// residual of another dtype or shape, a non-finite momentum, eps outside (0, inf), a mode,
// functorch layer or tracer, or arguments torch's op refuses (it checks before it writes).
PyObject* torch_batch_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 12 || !cpu::direct_call_allowed()) Py_RETURN_NONE;
  RowArg<const at::Tensor&> x;
  RowArg<const std::optional<at::Tensor>&> running_mean, running_var, weight, bias, residual;
  RowArg<bool> training;
  RowArg<double> momentum, eps;
  RowArg<int64_t> activation, limit, limit_grad;
  if (!(x.parse(args[0]) && running_mean.parse(args[1]) && running_var.parse(args[2]) &&
        weight.parse(args[3]) && bias.parse(args[4]) && training.parse(args[5]) &&
        momentum.parse(args[6]) && eps.parse(args[7]) && residual.parse(args[8]) &&
        activation.parse(args[9]) && limit.parse(args[10]) && limit_grad.parse(args[11])))
    Py_RETURN_NONE;
  const at::Tensor& t = x.get();
  const auto &rm = running_mean.get(), &rv = running_var.get(), &w = weight.get(),
             &b = bias.get(), &r = residual.get();
  const at::ScalarType dtype = t.scalar_type();
  const double m = momentum.get(), e = eps.get();
  const int64_t act = activation.get();
  const auto vec = [](const std::optional<at::Tensor>& v) { return !v || v->dim() == 1; };
  if (act < 0 || act > 4 || !bn_x_dtype_ok(dtype) || t.dim() < 2 || !std::isfinite(m) ||
      !(e > 0.0) || !std::isfinite(e) || !vec(w) || !vec(b) || !vec(rm) || !vec(rv) ||
      rm.has_value() != rv.has_value() || (!rm && !training.get()) ||
      (r && (r->scalar_type() != dtype || r->sizes() != t.sizes())))
    Py_RETURN_NONE;
  const bool grad = at::GradMode::is_enabled() &&
                    (t.requires_grad() || (w && w->requires_grad()) ||
                     (b && b->requires_grad()) || (r && r->requires_grad()));
  const int64_t numel = t.numel();
  if (numel >= (grad ? limit_grad.get() : limit.get()) || numel == 0 ||
      (training.get() && numel == t.size(1)))
    Py_RETURN_NONE;
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    try {
      y = at::batch_norm(t, w, b, rm, rv, training.get(), m, e, false);
    } catch (const std::exception&) {  // c10::Error and the rest: nothing was written
      y = at::Tensor();  // refused: the caller's checks raise fusedreg's error
    }
    if (y.defined()) {
      if (r) y.add_(*r);  // y is torch's fresh output; its backward does not read it
      switch (static_cast<Activation>(act)) {
        case Activation::kNone:
          break;
        case Activation::kRelu:
          y.relu_();
          break;
        case Activation::kGelu:
          y = at::gelu(y);
          break;
        case Activation::kGeluTanh:
          y = at::gelu(y, "tanh");
          break;
        case Activation::kSilu:
          y = at::silu(y);
          break;
      }
    }
  }
  if (!y.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

template <PyObject* (*F)(PyObject*, PyObject* const*, Py_ssize_t)>
PyCFunction as_method() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(F));
}

const PyMethodDef kRowMethods[] = {
    {"layer_norm_fwd", as_method<&RowDirect<LayerNormFwd>::call<kLayerNormFwd>>(), METH_FASTCALL,
     "fusedreg::layer_norm_fwd's CPU kernel on plain CPU tensors, or None (declined)"},
    {"layer_norm_bwd", as_method<&RowDirect<LayerNormBwd>::call<kLayerNormBwd>>(), METH_FASTCALL,
     "fusedreg::layer_norm_bwd's CPU kernel on plain CPU tensors, or None (declined)"},
    {"bias_dropout_fwd", as_method<&RowDirect<BiasDropoutFwd>::call<kBiasDropoutFwd>>(),
     METH_FASTCALL, "fusedreg::bias_dropout_fwd's CPU kernel on plain CPU tensors, or None"},
    {"bias_dropout_bwd", as_method<&RowDirect<BiasDropoutBwd>::call<kBiasDropoutBwd>>(),
     METH_FASTCALL, "fusedreg::bias_dropout_bwd's CPU kernel on plain CPU tensors, or None"},
    {"torch_norm", as_method<&torch_norm>(), METH_FASTCALL,
     "under auto, torch's layer_norm / rms_norm for a small plain norm on plain CPU tensors, "
     "or None (declined)"},
    {"bias_dropout_train", as_method<&bias_dropout_train>(), METH_FASTCALL,
     "BiasDropoutFunction.apply for the cpu backend as a C++ autograd node, or None"},
    {"layer_norm_train", as_method<&layer_norm_train>(), METH_FASTCALL,
     "LayerNormFunction.apply for the cpu backend as a C++ autograd node, or None"},
    {"torch_batch_norm", as_method<&torch_batch_norm>(), METH_FASTCALL,
     "under auto, torch's batch_norm (+ residual, relu) for a small call on plain CPU tensors, "
     "or None (declined)"},
    {"batch_norm_train", as_method<&batch_norm_train>(), METH_FASTCALL,
     "a local training batch_norm without dropout for the cpu backend as a C++ autograd node "
     "(running stats updated), or None"},
    {"batch_norm_eval", as_method<&batch_norm_eval>(), METH_FASTCALL,
     "an eval batch_norm that records no backward, by the cpu kernel, or None"},
    {"draw_seed", as_method<&draw_seed>(), METH_FASTCALL,
     "a dropout seed drawn as torch.randint(2**63 - 1, ()) draws it, or None (declined)"},
};

// The module's functions: the optimizers' direct calls and the ones above.
PyMethodDef* module_methods() {
  static std::vector<PyMethodDef> methods = [] {
    std::vector<PyMethodDef> all(std::begin(kRowMethods), std::end(kRowMethods));
    for (PyMethodDef* m = optim_direct_methods(); m->ml_name != nullptr; ++m) all.push_back(*m);
    all.push_back({nullptr, nullptr, 0, nullptr});
    return all;
  }();
  return methods.data();
}

}  // namespace
}  // namespace fusedreg

// Importing fusedreg._C runs the static registrations below. The module's only functions are
// direct CPU calls: the optimizers' (csrc/cpu/optim.cpp says why they exist), the row ops',
// draw_seed and torch_norm (above); every op is also reached through torch.ops.fusedreg.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          fusedreg::module_methods()};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fusedreg, m) {
  // ---- bias_dropout: out = residual + dropout(act(x + bias)) ----------------------------
  m.def(
      "bias_dropout_fwd(Tensor x, Tensor? bias, Tensor? residual, float p, int activation, "
      "Tensor seed) -> Tensor");
  // x is needed only with an activation; grad_bias is empty unless need_grad_bias.
  m.def(
      "bias_dropout_bwd(Tensor grad_out, Tensor? x, Tensor? bias, float p, int activation, "
      "Tensor seed, bool need_grad_bias) -> (Tensor grad_x, Tensor grad_bias)");
  // The mask's uniforms u(seed, i) for i in [start, start + count), float32 on `device_like`'s
  // device: lets tests check the kernels' Philox at any index (e.g. beyond 2^34) cheaply.
  m.def("dropout_uniform(Tensor seed, int start, int count, Tensor device_like) -> Tensor");

  // ---- layer_norm (LayerNorm, RMSNorm, dropout + residual + norm) -----------------------
  // x, residual, h: (M, N) rows; weight, bias: (N,). h = residual + dropout(x) rounded to
  // h_dtype, y = norm(h) * weight + bias. h is returned only when store_h (else empty); mean
  // is empty for rms. mean and rstd are float32 (float64 for float64 x).
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "float p, Tensor seed, bool rms, ScalarType h_dtype, bool store_h) "
      "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  // dh_out is the grad of the returned h (prenorm); grad_residual (h's dtype) is written only
  // when need_grad_residual, grad_weight/grad_bias only when asked (else empty tensors).
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor? dh_out, Tensor h, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor rstd, float p, Tensor seed, bool rms, ScalarType x_dtype, "
      "bool need_grad_residual, bool need_grad_weight, bool need_grad_bias) "
      "-> (Tensor grad_x, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");

  // ---- optimizers ---------------------------------------------------------------------
  // One call steps a list of parameters of one device and dtype (multi-tensor), in place.
  // The hyperparameters are keyword-only (after `*`): several are adjacent floats that a
  // positional call could swap unnoticed. Both backends turn them into one named struct and
  // check their ranges before any write (fusedreg/optim_args.h).
  // params/grads: same dtype and shape; state tensors (exp_avgs, ...) all in one dtype, the
  // compute type (float32 for fp16/bf16/fp32 params, float64 for float64) or the params'.
  // Each param is dense and non-overlapping in any layout (contiguous, channels_last,
  // transposed); its grad and state tensors have its strides: the kernels step the storage.
  // steps: Adam's step count per parameter, torch's state["step"] (1-element float32 CPU
  // tensors, read and written on the host, so a CUDA launch never waits), incremented by the
  // op after its checks (one call counts and steps); inv_scale: 1/grad_scale (1 without AMP); l1: the L1 proximal
  // strength (threshold lr·l1 after the update; l1 itself when not l1_lr_scaled);
  // decoupled: weight decay as p·(1 − lr·wd) instead of L2 added to the gradient. max_exp_avg_sqs is empty unless amsgrad,
  // momentum_buffers empty when momentum == 0; first_step: buffers are new (buf ← g).
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, *, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, float l1, bool l1_lr_scaled, "
      "bool amsgrad, bool maximize, bool decoupled, float inv_scale) -> ()");
  // adam_step for capturable=True: the values that change from step to step are device
  // tensors read by the kernel, never on the host (a CUDA graph replays the capture):
  // steps (1-element float32, already incremented), lr_tensor (None: the float lr),
  // grad_scale (None: 1) and found_inf (None: 0; non-zero: nothing is written). CUDA only.
  m.def(
      "adam_step_capturable(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] steps, "
      "Tensor? lr_tensor, Tensor? grad_scale, Tensor? found_inf, *, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, float l1, bool l1_lr_scaled, bool amsgrad, "
      "bool maximize, bool decoupled) -> ()");
  m.def(
      "sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, "
      "float lr, float momentum, float dampening, float weight_decay, float l1, "
      "bool l1_lr_scaled, bool nesterov, bool maximize, bool decoupled, bool first_step, "
      "float inv_scale) -> ()");
  m.def(
      "lion_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, *, float lr, "
      "float beta1, float beta2, float weight_decay, float l1, bool l1_lr_scaled, bool maximize, "
      "float inv_scale) -> ()");

  // ---- batch_norm: y = dropout(act((x - mean) * invstd * weight + bias + residual)) ------------
  // x (and residual, dy, the grads) stored as contiguous (N, C, S), or (N, S, C) when
  // channels_last; mean, invstd, weight, bias and the backward sums are (C,) in the compute type
  // (float32, float64 for float64 x). The dropout mask index is the flat index in the logical
  // (N, C, S) tensor. stats: per-channel mean and biased variance; bwd_reduce: sum dz and
  // sum dz * xhat (dz = dy * keep * scale * act'(z)); bwd_elemt: grad_x (training: with the
  // sums over `count` values per channel; eval: without) and grad_residual = dz, each empty
  // unless asked for.
  m.def("batch_norm_stats(Tensor x, bool channels_last) -> (Tensor mean, Tensor var)");
  m.def(
      "batch_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, int activation, float p, Tensor seed, bool channels_last) -> Tensor");
  m.def(
      "batch_norm_bwd_reduce(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, int activation, float p, Tensor seed, bool channels_last) "
      "-> (Tensor sum_dz, Tensor sum_dz_xhat)");
  m.def(
      "batch_norm_bwd_elemt(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, Tensor sum_dz, Tensor sum_dz_xhat, float count, int activation, "
      "float p, Tensor seed, bool channels_last, bool training, bool need_grad_input, "
      "bool need_grad_residual) -> (Tensor grad_x, Tensor grad_residual)");
  // The cpu backend's local training passes on NCS storage without dropout in one op each
  // (csrc/cpu/batch_norm.cpp): fwd_ncs = stats, invstd and fwd; bwd_ncs = bwd_reduce then
  // bwd_elemt (training), one channel at a time while its rows are in cache.

  m.def(
      "batch_norm_fwd_ncs(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, int activation) "
      "-> (Tensor y, Tensor mean, Tensor var, Tensor invstd)");
  m.def(
      "batch_norm_bwd_ncs(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, int activation, Tensor seed, bool need_grad_input, bool need_grad_residual) "
      "-> (Tensor sum_dz, Tensor sum_dz_xhat, Tensor grad_x, Tensor grad_residual)");
  // ... and of channels-last (N, S, C) storage: bwd_cl = bwd_reduce then bwd_elemt (training),
  // grad_residual written by the reduce pass
  m.def(
      "batch_norm_bwd_cl(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, int activation, Tensor seed, bool need_grad_input, bool need_grad_residual) "
      "-> (Tensor sum_dz, Tensor sum_dz_xhat, Tensor grad_x, Tensor grad_residual)");
}
