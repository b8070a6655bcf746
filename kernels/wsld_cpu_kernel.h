// CPU row kernels of the fused WSLD ops, written once against at::vec::Vectorized and compiled
// once per CPU capability: wsld.cpp includes this file for the portable build (namespace DEFAULT)
// and wsld_cpu_avx2.cpp for AVX2+FMA (namespace AVX2), the way ATen builds its own CPU kernels.
//
// The includer defines FASTKD_CPU_NS (the namespace to put the kernels in) and, for the AVX2
// build, CPU_CAPABILITY / CPU_CAPABILITY_AVX2 before any ATen header.
#pragma once

#ifndef FASTKD_CPU_NS
#error "define FASTKD_CPU_NS before including wsld_cpu_kernel.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "wsld.h"

namespace fastkd::cpu::FASTKD_CPU_NS {
namespace {

using at::vec::Vectorized;

// Rows are processed in chunks: the chunk's maxima first, then its exponentials, both on data
// that is still in L1. This reads each row from memory once (an online softmax at chunk
// granularity) while the inner loops stay branch-free and vectorized.
constexpr int64_t kChunk = 1024;

// Rows per parallel task: enough elements that OpenMP's fork/join is amortized.
constexpr int64_t kElementsPerTask = 16384;

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Per-task scratch for converted logits; a single element when the logits need no conversion.
template <typename scalar_t>
struct ChunkBuffer {
  static constexpr int64_t kSize = std::is_same_v<scalar_t, acc_t<scalar_t>> ? 1 : kChunk;
  alignas(64) acc_t<scalar_t> data[kSize];
};

// exp of arguments <= 0 (logits minus their row maximum). For float, ATen's polynomial exp_u20:
// 1.8x the speed of Sleef's exp on AVX2, and within 3.7e-7 relative of exp on [-80, 0] (measured;
// below that the terms vanish next to the row maximum's exp(0) = 1 anyway). A scalar std::exp
// loop in the portable build. Doubles (gradcheck) keep the 1-ulp exp.
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// Converts n logits to the accumulate type. Returns src itself when no conversion is needed.
template <typename scalar_t, typename acc_type>
inline const acc_type* load_chunk(const scalar_t* src, int64_t n, acc_type* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_type>) {
    return src;
  } else {
    using SVec = Vectorized<scalar_t>;
    using FVec = Vectorized<float>;
    int64_t i = 0;
    for (; i + SVec::size() <= n; i += SVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(SVec::loadu(src + i));
      lo.store(buffer + i);
      hi.store(buffer + i + FVec::size());
    }
    for (; i < n; ++i) buffer[i] = static_cast<float>(src[i]);
    return buffer;
  }
}

// Writes n gradient values in the logits' dtype (a no-op when the kernel wrote them in place).
template <typename scalar_t, typename acc_type>
inline void store_chunk(const acc_type* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_type>) {
    (void)src, (void)n, (void)dst;
  } else {
    using SVec = Vectorized<scalar_t>;
    using FVec = Vectorized<float>;
    int64_t i = 0;
    for (; i + SVec::size() <= n; i += SVec::size()) {
      auto lo = FVec::loadu(src + i);
      auto hi = FVec::loadu(src + i + FVec::size());
      at::vec::convert_from_float<scalar_t>(lo, hi).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

template <typename T>
inline T chunk_max(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  T result = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if (n >= Vec::size()) {
    Vec running = Vec::loadu(x);
    for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size()) {
      running = at::vec::maximum(running, Vec::loadu(x + i));
    }
    result = at::vec::vec_reduce_all<T>(
        [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, running);
  }
  // A masked vector load would zero-fill the tail, which is wrong for a maximum: finish scalar.
  for (; i < n; ++i) result = std::max(result, x[i]);
  return result;
}

template <typename T>
inline T vec_sum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>(
      [](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, v);
}

// Running state of one row: maxima and the partition sums relative to them, plus
// cross = sum_c exp((t_c - max_t) / tau) * (s_c - max_s), from which the soft cross-entropy
// follows as log(z_s_tau) - cross / (tau * z_t_tau).
template <typename T>
struct RowState {
  T max_s = -std::numeric_limits<T>::infinity();
  T max_t = -std::numeric_limits<T>::infinity();
  T z_s = 0, z_s_tau = 0, z_t = 0, z_t_tau = 0, cross = 0;

  // Re-bases the sums on larger maxima. The student shift comes first because `cross` and
  // z_t_tau must be on the same teacher scale when combined.
  void raise_maxima(T new_max_s, T new_max_t, T inv_tau) {
    constexpr T kNegInf = -std::numeric_limits<T>::infinity();
    if (new_max_s > max_s) {
      if (max_s != kNegInf) {  // an empty state has all-zero sums: nothing to rescale
        const T delta = max_s - new_max_s;
        z_s *= std::exp(delta);
        z_s_tau *= std::exp(delta * inv_tau);
        cross += delta * z_t_tau;
      }
      max_s = new_max_s;
    }
    if (new_max_t > max_t) {
      if (max_t != kNegInf) {
        const T delta = max_t - new_max_t;
        const T factor = std::exp(delta * inv_tau);
        z_t *= std::exp(delta);
        z_t_tau *= factor;
        cross *= factor;
      }
      max_t = new_max_t;
    }
  }
};

template <typename T, int kMode>
inline void exp_pair(T x, T inv_tau, T& e_tau, T& e_one) {
  e_tau = std::exp(x * inv_tau);
  if constexpr (kMode == kTauOne) {
    e_one = e_tau;
  } else if constexpr (kMode == kTauTwo) {
    e_one = e_tau * e_tau;
  } else {
    e_one = std::exp(x);
  }
}

template <typename T, int kMode>
inline void vexp_pair(const Vectorized<T>& x, const Vectorized<T>& inv_tau, Vectorized<T>& e_tau,
                      Vectorized<T>& e_one) {
  e_tau = vexp(x * inv_tau);
  if constexpr (kMode == kTauOne) {
    e_one = e_tau;
  } else if constexpr (kMode == kTauTwo) {
    e_one = e_tau * e_tau;
  } else {
    e_one = vexp(x);
  }
}

// Adds n elements (already on the state's maxima) to the state's sums.
template <typename T, int kMode>
inline void accumulate_chunk(const T* s, const T* t, int64_t n, T inv_tau, RowState<T>& state) {
  using Vec = Vectorized<T>;
  const Vec max_s(state.max_s), max_t(state.max_t), inv_tau_vec(inv_tau);
  Vec z_s(T(0)), z_s_tau(T(0)), z_t(T(0)), z_t_tau(T(0)), cross(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec xs = Vec::loadu(s + i) - max_s;
    const Vec xt = Vec::loadu(t + i) - max_t;
    Vec es_tau, es, et_tau, et;
    vexp_pair<T, kMode>(xs, inv_tau_vec, es_tau, es);
    vexp_pair<T, kMode>(xt, inv_tau_vec, et_tau, et);
    z_s = z_s + es;
    z_s_tau = z_s_tau + es_tau;
    z_t = z_t + et;
    z_t_tau = z_t_tau + et_tau;
    cross = at::vec::fmadd(et_tau, xs, cross);
  }
  T tail_z_s = 0, tail_z_s_tau = 0, tail_z_t = 0, tail_z_t_tau = 0, tail_cross = 0;
  for (; i < n; ++i) {
    const T xs = s[i] - state.max_s;
    const T xt = t[i] - state.max_t;
    T es_tau, es, et_tau, et;
    exp_pair<T, kMode>(xs, inv_tau, es_tau, es);
    exp_pair<T, kMode>(xt, inv_tau, et_tau, et);
    tail_z_s += es;
    tail_z_s_tau += es_tau;
    tail_z_t += et;
    tail_z_t_tau += et_tau;
    tail_cross += et_tau * xs;
  }
  state.z_s += vec_sum(z_s) + tail_z_s;
  state.z_s_tau += vec_sum(z_s_tau) + tail_z_s_tau;
  state.z_t += vec_sum(z_t) + tail_z_t;
  state.z_t_tau += vec_sum(z_t_tau) + tail_z_t_tau;
  state.cross += vec_sum(cross) + tail_cross;
}

template <typename scalar_t, int kMode>
void forward_rows_typed(const ForwardRows& args) {
  using T = acc_t<scalar_t>;
  const auto* student = static_cast<const scalar_t*>(args.student);
  const auto* teacher = static_cast<const scalar_t*>(args.teacher);
  auto* stats = static_cast<T*>(args.row_stats);
  const int64_t classes = args.classes;
  const T inv_tau = static_cast<T>(1.0 / args.tau);
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / classes);

  at::parallel_for(0, args.rows, grain, [&](int64_t begin, int64_t end) {
    ChunkBuffer<scalar_t> s_buffer, t_buffer;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* s_row = student + row * classes;
      const scalar_t* t_row = teacher + row * classes;
      RowState<T> state;
      for (int64_t start = 0; start < classes; start += kChunk) {
        const int64_t n = std::min(kChunk, classes - start);
        const T* s = load_chunk<scalar_t, T>(s_row + start, n, s_buffer.data);
        const T* t = load_chunk<scalar_t, T>(t_row + start, n, t_buffer.data);
        state.raise_maxima(chunk_max(s, n), chunk_max(t, n), inv_tau);
        accumulate_chunk<T, kMode>(s, t, n, inv_tau, state);
      }
      const int64_t label = args.labels[row];
      const T s_label = static_cast<T>(s_row[label]);
      const T t_label = static_cast<T>(t_row[label]);
      // (max - x_y) first: both are ~1e4 for huge logits, their difference is exact.
      const T ce_student = (state.max_s - s_label) + std::log(state.z_s);
      const T ce_teacher = (state.max_t - t_label) + std::log(state.z_t);
      const T soft_ce = std::log(state.z_s_tau) - state.cross * inv_tau / state.z_t_tau;
      const T ratio = ce_student / (ce_teacher + static_cast<T>(kWeightEpsilon));
      // -expm1(-x) == 1 - exp(-x), without the cancellation when x is small. std::max keeps a
      // NaN ratio (its first argument) so that bad logits surface as NaN, as in the reference.
      const T weight = -std::expm1(-std::max(ratio, T(0)));
      T* out = stats + row * kNumStats;
      out[kStudentMax] = state.max_s;
      out[kTeacherMax] = state.max_t;
      out[kStudentInvZTau] = T(1) / state.z_s_tau;
      out[kTeacherInvZTau] = T(1) / state.z_t_tau;
      out[kStudentInvZ] = T(1) / state.z_s;
      out[kWeight] = weight;
      out[kSoftCrossEntropy] = soft_ce;
      out[kStudentCrossEntropy] = ce_student;
    }
  });
}

// grad_c = a * (q_c - p_c) + b * softmax(s)_c for n elements; the caller subtracts b at the label.
template <typename T, int kMode, bool kWithCE>
inline void backward_chunk(const T* s, const T* t, int64_t n, const T* row, T inv_tau, T a, T b,
                           T* grad) {
  using Vec = Vectorized<T>;
  const Vec max_s(row[kStudentMax]), max_t(row[kTeacherMax]), inv_tau_vec(inv_tau);
  const Vec inv_z_s_tau(row[kStudentInvZTau]), inv_z_t_tau(row[kTeacherInvZTau]);
  const Vec inv_z_s(row[kStudentInvZ]), a_vec(a), b_vec(b);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec xs = Vec::loadu(s + i) - max_s;
    const Vec xt = Vec::loadu(t + i) - max_t;
    Vec es_tau, es;
    vexp_pair<T, kWithCE ? kMode : kTauOne>(xs, inv_tau_vec, es_tau, es);
    const Vec q = es_tau * inv_z_s_tau;
    const Vec p = vexp(xt * inv_tau_vec) * inv_z_t_tau;
    Vec g = a_vec * (q - p);
    if constexpr (kWithCE) g = at::vec::fmadd(b_vec, es * inv_z_s, g);
    g.store(grad + i);
  }
  for (; i < n; ++i) {
    const T xs = s[i] - row[kStudentMax];
    T es_tau, es;
    exp_pair<T, kWithCE ? kMode : kTauOne>(xs, inv_tau, es_tau, es);
    const T q = es_tau * row[kStudentInvZTau];
    const T p = std::exp((t[i] - row[kTeacherMax]) * inv_tau) * row[kTeacherInvZTau];
    T g = a * (q - p);
    if constexpr (kWithCE) g += b * es * row[kStudentInvZ];
    grad[i] = g;
  }
}

template <typename scalar_t, int kMode, bool kWithCE>
void backward_rows_typed(const BackwardRows& args) {
  using T = acc_t<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, T>;
  const auto* student = static_cast<const scalar_t*>(args.student);
  const auto* teacher = static_cast<const scalar_t*>(args.teacher);
  const auto* stats = static_cast<const T*>(args.row_stats);
  auto* grad = static_cast<scalar_t*>(args.grad_student);
  const int64_t classes = args.classes;
  const T inv_tau = static_cast<T>(1.0 / args.tau);
  const T ce_scale = static_cast<T>(args.ce_scale);
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / classes);

  at::parallel_for(0, args.rows, grain, [&](int64_t begin, int64_t end) {
    ChunkBuffer<scalar_t> s_buffer, t_buffer, g_buffer;
    for (int64_t row = begin; row < end; ++row) {
      const T* row_stats = stats + row * kNumStats;
      const T a = static_cast<T>(args.wsld_scale) * row_stats[kWeight];
      const int64_t label = args.labels[row];
      const scalar_t* s_row = student + row * classes;
      const scalar_t* t_row = teacher + row * classes;
      scalar_t* g_row = grad + row * classes;
      for (int64_t start = 0; start < classes; start += kChunk) {
        const int64_t n = std::min(kChunk, classes - start);
        const T* s = load_chunk<scalar_t, T>(s_row + start, n, s_buffer.data);
        const T* t = load_chunk<scalar_t, T>(t_row + start, n, t_buffer.data);
        T* g;
        if constexpr (kSameType) {
          g = g_row + start;
        } else {
          g = g_buffer.data;
        }
        backward_chunk<T, kMode, kWithCE>(s, t, n, row_stats, inv_tau, a, ce_scale, g);
        // The one-hot part of the CE gradient, applied before rounding to the logits' dtype.
        if (kWithCE && label >= start && label < start + n) g[label - start] -= ce_scale;
        store_chunk<scalar_t, T>(g, n, g_row + start);
      }
    }
  });
}

template <typename scalar_t>
void forward_rows_dtype(const ForwardRows& args) {
  switch (tau_mode(args.tau)) {
    case kTauOne:
      return forward_rows_typed<scalar_t, kTauOne>(args);
    case kTauTwo:
      return forward_rows_typed<scalar_t, kTauTwo>(args);
    default:
      return forward_rows_typed<scalar_t, kTauGeneric>(args);
  }
}

template <typename scalar_t, bool kWithCE>
void backward_rows_ce(const BackwardRows& args) {
  switch (tau_mode(args.tau)) {
    case kTauOne:
      return backward_rows_typed<scalar_t, kTauOne, kWithCE>(args);
    case kTauTwo:
      return backward_rows_typed<scalar_t, kTauTwo, kWithCE>(args);
    default:
      return backward_rows_typed<scalar_t, kTauGeneric, kWithCE>(args);
  }
}

template <typename scalar_t>
void backward_rows_dtype(const BackwardRows& args) {
  if (args.ce_scale != 0.0) {
    backward_rows_ce<scalar_t, true>(args);
  } else {
    backward_rows_ce<scalar_t, false>(args);
  }
}

}  // namespace

void forward_rows(const ForwardRows& args) {
  switch (args.dtype) {
    case DType::kFloat:
      return forward_rows_dtype<float>(args);
    case DType::kDouble:
      return forward_rows_dtype<double>(args);
    case DType::kHalf:
      return forward_rows_dtype<c10::Half>(args);
    case DType::kBFloat16:
      return forward_rows_dtype<c10::BFloat16>(args);
  }
}

void backward_rows(const BackwardRows& args) {
  switch (args.dtype) {
    case DType::kFloat:
      return backward_rows_dtype<float>(args);
    case DType::kDouble:
      return backward_rows_dtype<double>(args);
    case DType::kHalf:
      return backward_rows_dtype<c10::Half>(args);
    case DType::kBFloat16:
      return backward_rows_dtype<c10::BFloat16>(args);
  }
}

}  // namespace fastkd::cpu::FASTKD_CPU_NS
