// fastkd._C: the schemas of the fused WSLD ops, their CPU implementation, and the Python module
// whose import registers them as torch.ops.fastkd.*.
//
//   wsld(s, t, labels, tau, loss_weight) -> (loss, row_stats)
//   wsld_ce(s, t, labels, tau, loss_weight, ce_weight) -> (total, ce, wsld, weight_mean, row_stats)
//   wsld_backward(grad, s, t, labels, row_stats, tau, loss_weight, ce_weight) -> grad_student
//
// The autograd formula of the two forward ops is registered here, in C++, for the Autograd
// dispatch key (device-agnostic): eager training then runs forward and backward without entering
// Python, and torch.compile's AOTAutograd traces the same formula (its forward redispatches to
// the op, its backward calls fastkd::wsld_backward). The fake (meta) implementations are
// registered from Python (fastkd/losses/ops.py). The CUDA implementation lives in wsld_cuda.cu.
#include <Python.h>  // first, as Python requires; only used for the module object below

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "wsld.h"

// The portable build of the CPU row kernels (see wsld_cpu_avx2.cpp for the AVX2 one).
#define FASTKD_CPU_NS DEFAULT
#include "wsld_cpu_kernel.h"
#undef FASTKD_CPU_NS

#ifndef FASTKD_WITH_CUDA
#define FASTKD_WITH_CUDA 0
#endif
#ifndef FASTKD_CUDA_TOOLKIT_FOUND
#define FASTKD_CUDA_TOOLKIT_FOUND 0
#endif

namespace fastkd {

PreparedInputs prepare_inputs(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                              const at::Tensor& labels, double tau, const char* op_name) {
  TORCH_CHECK_VALUE(student_logits.dim() == 2, op_name,
                    ": student_logits must be 2-D (N, C), got shape ", student_logits.sizes());
  TORCH_CHECK_VALUE(teacher_logits.sizes() == student_logits.sizes(), op_name,
                    ": teacher_logits has shape ", teacher_logits.sizes(),
                    " but student_logits has shape ", student_logits.sizes());
  const int64_t rows = student_logits.size(0);
  const int64_t classes = student_logits.size(1);
  TORCH_CHECK_VALUE(classes >= 1, op_name, ": logits need at least one class, got shape ",
                    student_logits.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == rows, op_name,
                    ": labels must have shape (", rows, ",) to match the logits, got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(
      teacher_logits.device() == student_logits.device() &&
          labels.device() == student_logits.device(),
      op_name, ": all inputs must be on one device, got student_logits on ",
      student_logits.device(), ", teacher_logits on ", teacher_logits.device(), ", labels on ",
      labels.device());
  for (const at::Tensor* logits : {&student_logits, &teacher_logits}) {
    const auto dtype = logits->scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                         dtype == at::kDouble,
                     op_name, ": logits must be float32, float16, bfloat16 or float64, got ",
                     dtype);
  }
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), op_name,
                   ": labels must be an integer tensor of class indices, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0.0, op_name,
                    ": tau must be a positive finite number, got ", tau);

  // Mixed precisions (say a float32 teacher and a bfloat16 student) meet at the wider type, so
  // neither is rounded below what the caller passed.
  auto dtype = student_logits.scalar_type();
  if (teacher_logits.scalar_type() != dtype) {
    dtype = (dtype == at::kDouble || teacher_logits.scalar_type() == at::kDouble) ? at::kDouble
                                                                                  : at::kFloat;
  }
  PreparedInputs prepared;
  prepared.student = as_dtype(student_logits, dtype).contiguous();
  prepared.teacher = as_dtype(teacher_logits, dtype).contiguous();
  prepared.labels = as_dtype(labels, at::kLong).contiguous();
  prepared.rows = rows;
  prepared.classes = classes;
  return prepared;
}

void check_backward_args(const at::Tensor& grad, const at::Tensor& row_stats,
                         const PreparedInputs& inputs) {
  constexpr const char* op = "fastkd::wsld_backward";
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must hold one value (the loss is a scalar), ",
                    "got shape ", grad.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), op, ": grad must be floating point");
  const auto acc = accumulate_type(inputs.student.scalar_type());
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == inputs.rows &&
                        row_stats.size(1) == kNumStats,
                    op, ": row_stats must have shape (", inputs.rows, ", ", kNumStats,
                    ") as returned by the forward op, got ", row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == acc, op, ": row_stats must be ", acc, ", got ",
                   row_stats.scalar_type());
  TORCH_CHECK_VALUE(
      grad.device() == inputs.student.device() && row_stats.device() == inputs.student.device(),
      op, ": grad and row_stats must be on ", inputs.student.device());
}

namespace {

cpu::DType cpu_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return cpu::DType::kFloat;
    case at::kDouble:
      return cpu::DType::kDouble;
    case at::kHalf:
      return cpu::DType::kHalf;
    case at::kBFloat16:
      return cpu::DType::kBFloat16;
    default:
      TORCH_INTERNAL_ASSERT(false, "unreachable: dtype validated by prepare_inputs");
  }
}

bool cpu_has_avx2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool avx2_available() {
  static const bool available = cpu::AVX2::compiled() && cpu_has_avx2();
  return available;
}

// FASTKD_CPU_CAPABILITY=default|avx2 pins the CPU kernel (tests run both); unset picks the best
// one this CPU supports. Read per call so a test can switch it; getenv costs nanoseconds.
bool use_avx2() {
  const char* requested = std::getenv("FASTKD_CPU_CAPABILITY");
  if (requested == nullptr || requested[0] == '\0') return avx2_available();
  if (std::strcmp(requested, "default") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(requested, "avx2") == 0,
                    "FASTKD_CPU_CAPABILITY must be 'default' or 'avx2', got '", requested, "'");
  TORCH_CHECK_VALUE(avx2_available(),
                    "FASTKD_CPU_CAPABILITY=avx2 but this build or CPU has no AVX2 kernel");
  return true;
}

void check_labels_cpu(const at::Tensor& labels, int64_t classes, const char* op_name) {
  const int64_t* values = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i) {
    TORCH_CHECK_VALUE(values[i] >= 0 && values[i] < classes, op_name, ": labels[", i, "] = ",
                      values[i], " is out of range for ", classes, " classes");
  }
}

at::Tensor scalar_tensor(double value, const at::TensorOptions& options) {
  at::Tensor out = at::empty({}, options);
  if (out.scalar_type() == at::kDouble) {
    *out.mutable_data_ptr<double>() = value;
  } else {
    *out.mutable_data_ptr<float>() = static_cast<float>(value);
  }
  return out;
}

ForwardOutputs forward_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                           const at::Tensor& labels, double tau, double loss_weight,
                           double ce_weight, const char* op_name) {
  PreparedInputs in = prepare_inputs(student_logits, teacher_logits, labels, tau, op_name);
  check_labels_cpu(in.labels, in.classes, op_name);
  const auto options = in.student.options().dtype(accumulate_type(in.student.scalar_type()));
  at::Tensor row_stats = at::empty({in.rows, kNumStats}, options);

  if (in.rows > 0) {
    const cpu::ForwardRows args{cpu_dtype(in.student.scalar_type()),
                                in.student.const_data_ptr(),
                                in.teacher.const_data_ptr(),
                                in.labels.const_data_ptr<int64_t>(),
                                row_stats.mutable_data_ptr(),
                                in.rows,
                                in.classes,
                                tau};
    if (use_avx2()) {
      cpu::AVX2::forward_rows(args);
    } else {
      cpu::DEFAULT::forward_rows(args);
    }
  }

  // The batch means, summed in double in row order: deterministic for any thread count.
  double weighted_sum = 0.0, ce_sum = 0.0, weight_sum = 0.0;
  auto accumulate = [&](const auto* stats) {
    for (int64_t row = 0; row < in.rows; ++row) {
      const auto* r = stats + row * kNumStats;
      weighted_sum += static_cast<double>(r[kWeight]) * static_cast<double>(r[kSoftCrossEntropy]);
      ce_sum += static_cast<double>(r[kStudentCrossEntropy]);
      weight_sum += static_cast<double>(r[kWeight]);
    }
  };
  if (row_stats.scalar_type() == at::kDouble) {
    accumulate(row_stats.const_data_ptr<double>());
  } else {
    accumulate(row_stats.const_data_ptr<float>());
  }
  // N = 0 gives 0 rather than the NaN of a mean over nothing: an empty batch (say the tail of a
  // sharded evaluation) must not poison a running sum of losses.
  const double inv_rows = in.rows > 0 ? 1.0 / static_cast<double>(in.rows) : 0.0;
  const double wsld = loss_weight * tau * tau * weighted_sum * inv_rows;
  const double ce = ce_sum * inv_rows;
  // ce_weight = 0 leaves ce out entirely, so an infinite CE cannot make the total NaN.
  const double total = ce_weight != 0.0 ? ce_weight * ce + wsld : wsld;
  return {scalar_tensor(total, options), scalar_tensor(ce, options),
          scalar_tensor(wsld, options), scalar_tensor(weight_sum * inv_rows, options),
          row_stats};
}

at::Tensor wsld_backward_cpu(const at::Tensor& grad, const at::Tensor& student_logits,
                             const at::Tensor& teacher_logits, const at::Tensor& labels,
                             const at::Tensor& row_stats, double tau, double loss_weight,
                             double ce_weight) {
  constexpr const char* op = "fastkd::wsld_backward";
  PreparedInputs in = prepare_inputs(student_logits, teacher_logits, labels, tau, op);
  check_backward_args(grad, row_stats, in);
  check_labels_cpu(in.labels, in.classes, op);
  const at::Tensor stats = row_stats.contiguous();
  at::Tensor grad_student = at::empty({in.rows, in.classes}, in.student.options());
  if (in.rows > 0) {
    const double g = grad.item<double>();  // a CPU tensor: reading it synchronizes nothing
    const double inv_rows = 1.0 / static_cast<double>(in.rows);
    const cpu::BackwardRows args{cpu_dtype(in.student.scalar_type()),
                                 in.student.const_data_ptr(),
                                 in.teacher.const_data_ptr(),
                                 in.labels.const_data_ptr<int64_t>(),
                                 stats.const_data_ptr(),
                                 grad_student.mutable_data_ptr(),
                                 in.rows,
                                 in.classes,
                                 tau,
                                 g * loss_weight * tau * inv_rows,
                                 g * ce_weight * inv_rows};
    if (use_avx2()) {
      cpu::AVX2::backward_rows(args);
    } else {
      cpu::DEFAULT::backward_rows(args);
    }
  }
  // Mixed-dtype inputs were computed in the wider type; the gradient matches the student.
  return as_dtype(grad_student, student_logits.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Autograd. The backward is one fused op: grad_s = g * (loss_weight * tau / N * w * (q - p) +
// ce_weight / N * (softmax(s) - onehot)), recomputed from the saved row statistics. The teacher,
// labels and floats get no gradient (the teacher as if detached, as in mmrazor's WSLD).

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using WsldSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&, double, double);
using WsldCeSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double);
using WsldBackwardSignature =
    at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
               const at::Tensor&, double, double, double);

// Dispatcher handles of the ops, looked up once for the life of the process.
const c10::TypedOperatorHandle<WsldSignature>& wsld_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastkd::wsld", "").typed<WsldSignature>();
  return handle;
}

const c10::TypedOperatorHandle<WsldCeSignature>& wsld_ce_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fastkd::wsld_ce", "")
                                 .typed<WsldCeSignature>();
  return handle;
}

const c10::TypedOperatorHandle<WsldBackwardSignature>& wsld_backward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("fastkd::wsld_backward", "")
                                 .typed<WsldBackwardSignature>();
  return handle;
}

void save_for_backward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                       const at::Tensor& labels, const at::Tensor& row_stats, double tau,
                       double loss_weight, double ce_weight) {
  ctx->save_for_backward({student, teacher, labels, row_stats});
  ctx->saved_data["tau"] = tau;
  ctx->saved_data["loss_weight"] = loss_weight;
  ctx->saved_data["ce_weight"] = ce_weight;
}

// The gradients of (student, teacher, labels, tau, loss_weight[, ce_weight]): only the student's
// is ever defined.
variable_list backward_from_saved(AutogradContext* ctx, const at::Tensor& grad_loss,
                                  size_t num_inputs) {
  variable_list grads(num_inputs);
  if (!ctx->needs_input_grad(0)) return grads;
  const variable_list saved = ctx->get_saved_variables();
  grads[0] = wsld_backward_op().call(grad_loss, saved[0], saved[1], saved[2], saved[3],
                       ctx->saved_data["tau"].toDouble(),
                       ctx->saved_data["loss_weight"].toDouble(),
                       ctx->saved_data["ce_weight"].toDouble());
  return grads;
}

class WsldFunction : public torch::autograd::Function<WsldFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student,
                               const at::Tensor& teacher, const at::Tensor& labels, double tau,
                               double loss_weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, row_stats] =
        wsld_op().call(student, teacher, labels, tau, loss_weight);
    ctx->mark_non_differentiable({row_stats});
    save_for_backward(ctx, student, teacher, labels, row_stats, tau, loss_weight, 0.0);
    return {loss, row_stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return backward_from_saved(ctx, grad_outputs[0], 5);
  }
};

class WsldCeFunction : public torch::autograd::Function<WsldCeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student,
                               const at::Tensor& teacher, const at::Tensor& labels, double tau,
                               double loss_weight, double ce_weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [total, ce, wsld, weight_mean, row_stats] =
        wsld_ce_op().call(student, teacher, labels, tau, loss_weight, ce_weight);
    // ce, wsld and weight_mean are for logging: only the total carries a gradient.
    ctx->mark_non_differentiable({ce, wsld, weight_mean, row_stats});
    save_for_backward(ctx, student, teacher, labels, row_stats, tau, loss_weight, ce_weight);
    return {total, ce, wsld, weight_mean, row_stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return backward_from_saved(ctx, grad_outputs[0], 6);
  }
};

std::tuple<at::Tensor, at::Tensor> wsld_autograd(const at::Tensor& student_logits,
                                                 const at::Tensor& teacher_logits,
                                                 const at::Tensor& labels, double tau,
                                                 double loss_weight) {
  variable_list out =
      WsldFunction::apply(student_logits, teacher_logits, labels, tau, loss_weight);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wsld_ce_autograd(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& labels,
    double tau, double loss_weight, double ce_weight) {
  variable_list out = WsldCeFunction::apply(student_logits, teacher_logits, labels, tau,
                                            loss_weight, ce_weight);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY(fastkd, m) {
  m.def(
      "wsld(Tensor student_logits, Tensor teacher_logits, Tensor labels, float tau, "
      "float loss_weight) -> (Tensor loss, Tensor row_stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "wsld_ce(Tensor student_logits, Tensor teacher_logits, Tensor labels, float tau, "
      "float loss_weight, float ce_weight) -> (Tensor total, Tensor ce, Tensor wsld, "
      "Tensor weight_mean, Tensor row_stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "wsld_backward(Tensor grad, Tensor student_logits, Tensor teacher_logits, Tensor labels, "
      "Tensor row_stats, float tau, float loss_weight, float ce_weight) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("wsld", &wsld_kernel<&forward_cpu>);
  m.impl("wsld_ce", &wsld_ce_kernel<&forward_cpu>);
  m.impl("wsld_backward", &wsld_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastkd, Autograd, m) {
  m.impl("wsld", &wsld_autograd);
  m.impl("wsld_ce", &wsld_ce_autograd);
  // No double backward: differentiating the gradient raises "derivative for
  // fastkd::wsld_backward is not implemented" rather than silently giving zero.
  m.impl("wsld_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastkd

// The extension module itself: nothing but build facts; importing it runs the registrations.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "fastkd._C",
      "Fused WSLD ops; importing this module registers torch.ops.fastkd.*",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const char* capabilities = fastkd::avx2_available() ? "default,avx2" : "default";
  if (PyModule_AddIntConstant(module, "with_cuda", FASTKD_WITH_CUDA) < 0 ||
      PyModule_AddIntConstant(module, "cuda_toolkit_found", FASTKD_CUDA_TOOLKIT_FOUND) < 0 ||
      PyModule_AddStringConstant(module, "cpu_capabilities", capabilities) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
