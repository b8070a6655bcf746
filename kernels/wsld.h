// Shared declarations of the fused WSLD ops (fastkd::wsld, fastkd::wsld_ce, fastkd::wsld_backward).
//
// The math (README.md, "The method"; in plain PyTorch: wsld_reference in fastkd/losses/wsld.py),
// per row i of N x C logits:
//   q = softmax(s / tau), p = softmax(t / tau), ce_i = -sum_c p_c log q_c
//   CE_s = -log softmax(s)_y, CE_t = -log softmax(t)_y
//   w_i = 1 - exp(-max(CE_s / (CE_t + 1e-7), 0))
//   wsld = loss_weight * tau^2 * mean_i(w_i * ce_i);  total = ce_weight * mean_i(CE_s) + wsld
//
// The forward kernels make one pass over each row and write kNumStats statistics per row; the
// backward kernel recomputes q, p (and softmax(s) for the CE term) from them in one more pass.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace fastkd {

// `tensor` in `dtype`: itself when it already is (skipping the dispatcher round trip of
// Tensor::to, which the per-step hot path would pay for nothing), else a converted copy.
inline at::Tensor as_dtype(const at::Tensor& tensor, at::ScalarType dtype) {
  return tensor.scalar_type() == dtype ? tensor : tensor.to(dtype);
}

// Columns of the (N, kNumStats) row-statistics tensor the forward ops return for the backward op.
// Maxima and reciprocal partition sums (rather than log-sum-exps) are stored so that the
// backward recomputes q_c = exp((s_c - max_s) / tau) * inv_z exactly as the forward saw it:
// subtracting a log-sum-exp of magnitude ~1e4 from s_c / tau would cost fp32 digits.
enum StatsColumn : int64_t {
  kStudentMax = 0,        // max_c s_ic
  kTeacherMax = 1,        // max_c t_ic
  kStudentInvZTau = 2,    // 1 / sum_c exp((s_ic - max_s) / tau)
  kTeacherInvZTau = 3,    // 1 / sum_c exp((t_ic - max_t) / tau)
  kStudentInvZ = 4,       // 1 / sum_c exp(s_ic - max_s)          (tau = 1, for the CE term)
  kWeight = 5,            // w_i
  kSoftCrossEntropy = 6,  // ce_i
  kStudentCrossEntropy = 7,  // CE_s_i
  kNumStats = 8,
};

// Added to the teacher's hard-label cross-entropy before dividing, as in mmrazor's WSLD.
constexpr double kWeightEpsilon = 1e-7;

// How the kernels get exp(x) from exp(x / tau): tau == 1 and tau == 2 (the ImageNet recipe) reuse
// the temperature exponential instead of paying for a second one per element.
enum TauMode : int { kTauGeneric = 0, kTauOne = 1, kTauTwo = 2 };

inline TauMode tau_mode(double tau) {
  if (tau == 1.0) return kTauOne;
  if (tau == 2.0) return kTauTwo;
  return kTauGeneric;
}

// Inputs after validation: contiguous logits of one common floating dtype, int64 labels.
struct PreparedInputs {
  at::Tensor student;
  at::Tensor teacher;
  at::Tensor labels;
  int64_t rows = 0;
  int64_t classes = 0;
};

// Validates the arguments of every op (shapes, devices, dtypes, tau) with one clear error each and
// returns contiguous tensors. Label *values* are checked by the kernels (the CUDA one cannot
// raise without synchronizing the host).
PreparedInputs prepare_inputs(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                              const at::Tensor& labels, double tau, const char* op_name);

// Validates the extra arguments of fastkd::wsld_backward against the prepared inputs.
void check_backward_args(const at::Tensor& grad, const at::Tensor& row_stats,
                         const PreparedInputs& inputs);

// What a device's forward computes: the batch means (0-dim) and the per-row statistics.
struct ForwardOutputs {
  at::Tensor total, ce, wsld, weight_mean, row_stats;
};

// A device's forward: (s, t, labels, tau, loss_weight, ce_weight, op_name) -> ForwardOutputs.
using ForwardFn = ForwardOutputs (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     double, double, double, const char*);

// The two forward ops' kernels for one device, from its forward: fastkd::wsld returns the WSLD
// term alone (ce_weight 0), fastkd::wsld_ce every term.
template <ForwardFn Forward>
std::tuple<at::Tensor, at::Tensor> wsld_kernel(const at::Tensor& student_logits,
                                               const at::Tensor& teacher_logits,
                                               const at::Tensor& labels, double tau,
                                               double loss_weight) {
  ForwardOutputs out = Forward(student_logits, teacher_logits, labels, tau, loss_weight,
                               /*ce_weight=*/0.0, "fastkd::wsld");
  return {out.wsld, out.row_stats};
}

template <ForwardFn Forward>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wsld_ce_kernel(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& labels,
    double tau, double loss_weight, double ce_weight) {
  ForwardOutputs out = Forward(student_logits, teacher_logits, labels, tau, loss_weight, ce_weight,
                               "fastkd::wsld_ce");
  return {out.total, out.ce, out.wsld, out.weight_mean, out.row_stats};
}

// The dtype the kernels accumulate in and return statistics and losses in: float64 for float64
// inputs (gradcheck), float32 for everything else.
inline at::ScalarType accumulate_type(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace cpu {

// Plain-pointer descriptions of one kernel launch, so that the per-ISA translation units
// (kernels/wsld_cpu_kernel.h compiled once per CPU capability) see no ATen types.
enum class DType : int { kFloat, kDouble, kHalf, kBFloat16 };

struct ForwardRows {
  DType dtype;
  const void* student;     // rows x classes, contiguous
  const void* teacher;     // rows x classes, contiguous
  const int64_t* labels;   // rows, validated to lie in [0, classes)
  void* row_stats;         // rows x kNumStats of the accumulate type
  int64_t rows;
  int64_t classes;
  double tau;
};

struct BackwardRows {
  DType dtype;
  const void* student;
  const void* teacher;
  const int64_t* labels;
  const void* row_stats;
  void* grad_student;      // rows x classes, contiguous, same dtype as the logits
  int64_t rows;
  int64_t classes;
  double tau;
  double wsld_scale;       // grad * loss_weight * tau / N  (multiplied by w_i per row)
  double ce_scale;         // grad * ce_weight / N          (0 skips the CE term)
};

// One implementation per CPU capability; wsld.cpp picks one at run time.
namespace DEFAULT {
void forward_rows(const ForwardRows& args);
void backward_rows(const BackwardRows& args);
}  // namespace DEFAULT

namespace AVX2 {
bool compiled();  // false when the compiler could not build the AVX2 variant
void forward_rows(const ForwardRows& args);
void backward_rows(const BackwardRows& args);
}  // namespace AVX2

}  // namespace cpu
}  // namespace fastkd
