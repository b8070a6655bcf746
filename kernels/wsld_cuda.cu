// CUDA implementation of the fused WSLD ops (schemas in wsld.cpp, math in wsld.h).
//
// Forward: a warp per row when the row fits in a few 16-byte loads per lane, a block per row
// otherwise. Each thread keeps an online softmax state (maxima and partition sums, rebased when a
// larger maximum arrives), so every logit is read from memory exactly once; warp shuffles (and
// shared memory across warps) merge the states, and one thread writes the row's statistics. A
// one-block kernel then reduces the rows to the batch means in a fixed order (deterministic).
// Backward: the same row mapping, recomputing q, p and softmax(s) from the saved statistics.
//
// Everything is accumulated in fp32, runs on the current stream, and never synchronizes with
// the host: the upstream gradient is read from device memory, and a label outside [0, C) trips a
// device-side assertion (as in PyTorch's own nll_loss) instead of a host-side check. Only
// sm_70-era features are used (shuffles, 128-bit loads), so the file builds for sm_70 with
// CUDA 12 as well as for sm_80/sm_90 with CUDA 13.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "wsld.h"

namespace fastkd {
namespace {

constexpr int kBlockThreads = 256;
// Resident blocks per SM the row kernels are compiled for (__launch_bounds__): 3 x 256 threads
// leaves ptxas up to 80 registers (no spills for any dtype) while keeping ~48 KiB of loads in
// flight per SM, enough to cover DRAM latency.
constexpr int kMinBlocksPerSM = 3;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;
// Independent 16-byte loads per tensor a thread issues before the math that consumes them.
constexpr int kUnroll = 2;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

static_assert(kStudentMax == 0 && kTeacherMax == 1 && kStudentInvZTau == 2 &&
                  kTeacherInvZTau == 3 && kStudentInvZ == 4 && kWeight == 5 &&
                  kSoftCrossEntropy == 6 && kStudentCrossEntropy == 7 && kNumStats == 8,
              "the kernels write and read row_stats as two float4 in this column order");

// 16 bytes of logits move as one uint4 (one 128-bit load or store); these convert them to and
// from fp32 in registers. (A struct of eight c10::Half built element by element ends up in
// local memory on sm_80.)
template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int kSize = 4;
  __device__ __forceinline__ static void unpack(const uint4& raw, float (&out)[kSize]) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&in)[kSize]) {
    return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]),
                      __float_as_uint(in[3]));
  }
};

// Two 16-bit floats per 32-bit word, the lower address in the low half (little endian).
template <typename T>
struct Vec16Half2 {
  static constexpr int kSize = 8;
  __device__ __forceinline__ static void unpack(const uint4& raw, float (&out)[kSize]) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = T::low(words[i]);
      out[2 * i + 1] = T::high(words[i]);
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&in)[kSize]) {
    return make_uint4(T::pair(in[0], in[1]), T::pair(in[2], in[3]), T::pair(in[4], in[5]),
                      T::pair(in[6], in[7]));
  }
};

struct HalfBits {
  __device__ __forceinline__ static float from_bits(uint32_t bits) {
    return static_cast<float>(c10::Half(static_cast<unsigned short>(bits), c10::Half::from_bits()));
  }
  __device__ __forceinline__ static float low(uint32_t w) { return from_bits(w & 0xffffu); }
  __device__ __forceinline__ static float high(uint32_t w) { return from_bits(w >> 16); }
  __device__ __forceinline__ static uint32_t pair(float lo, float hi) {
    return static_cast<uint32_t>(c10::Half(lo).x) | (static_cast<uint32_t>(c10::Half(hi).x) << 16);
  }
};

struct BFloat16Bits {
  // bf16 is the top half of an fp32: widening is a shift, exactly.
  __device__ __forceinline__ static float low(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ __forceinline__ static float high(uint32_t w) {
    return __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static uint32_t pair(float lo, float hi) {
    // c10::BFloat16(float) rounds to nearest even and keeps NaN a NaN.
    return static_cast<uint32_t>(c10::BFloat16(lo).x) |
           (static_cast<uint32_t>(c10::BFloat16(hi).x) << 16);
  }
};

template <>
struct Vec16<c10::Half> : Vec16Half2<HalfBits> {};
template <>
struct Vec16<c10::BFloat16> : Vec16Half2<BFloat16Bits> {};

// Online softmax state of one thread's share of a row. Sums are relative to the maxima;
// cross = sum_c exp((t_c - max_t) / tau) * (s_c - max_s). The empty state has maxima -inf and
// zero sums, and merging with it is exact.
struct RowState {
  float max_s, max_t, z_s, z_s_tau, z_t, z_t_tau, cross;
};

__device__ __forceinline__ RowState empty_state() {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  return {neg_inf, neg_inf, 0.f, 0.f, 0.f, 0.f, 0.f};
}

// exp(x) given exp(x / tau) (and x): reused outright for tau = 1, squared for tau = 2.
template <int kMode>
__device__ __forceinline__ float exp_one(float x, float exp_tau) {
  if constexpr (kMode == kTauOne) {
    return exp_tau;
  } else if constexpr (kMode == kTauTwo) {
    return exp_tau * exp_tau;
  } else {
    return exp2f(x * kLog2e);
  }
}

// Rebases a state on maxima at least as large as its own (k_tau = log2(e) / tau).
template <int kMode>
__device__ __forceinline__ void raise_maxima(RowState& st, float new_max_s, float new_max_t,
                                             float k_tau) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (new_max_s > st.max_s) {
    if (st.max_s != neg_inf) {  // an empty state has nothing to rescale (and -inf - x is NaN-prone)
      const float delta = st.max_s - new_max_s;
      const float f_tau = exp2f(delta * k_tau);
      st.z_s_tau *= f_tau;
      st.z_s *= exp_one<kMode>(delta, f_tau);
      st.cross = fmaf(delta, st.z_t_tau, st.cross);
    }
    st.max_s = new_max_s;
  }
  if (new_max_t > st.max_t) {
    if (st.max_t != neg_inf) {
      const float delta = st.max_t - new_max_t;
      const float f_tau = exp2f(delta * k_tau);
      st.z_t_tau *= f_tau;
      st.z_t *= exp_one<kMode>(delta, f_tau);
      st.cross *= f_tau;
    }
    st.max_t = new_max_t;
  }
}

template <int kMode>
__device__ __forceinline__ void add_element(RowState& st, float s, float t, float k_tau) {
  const float xs = s - st.max_s;
  const float xt = t - st.max_t;
  const float es_tau = exp2f(xs * k_tau);
  const float et_tau = exp2f(xt * k_tau);
  st.z_s += exp_one<kMode>(xs, es_tau);
  st.z_s_tau += es_tau;
  st.z_t += exp_one<kMode>(xt, et_tau);
  st.z_t_tau += et_tau;
  st.cross = fmaf(et_tau, xs, st.cross);
}

template <int kMode>
__device__ __forceinline__ void add_scalar(RowState& st, float s, float t, float k_tau) {
  raise_maxima<kMode>(st, s, t, k_tau);
  add_element<kMode>(st, s, t, k_tau);
}

// One rebase per 16-byte vector rather than per element.
template <int kMode, typename T>
__device__ __forceinline__ void add_vector(RowState& st, const uint4& s_raw, const uint4& t_raw,
                                           float k_tau) {
  constexpr int kSize = Vec16<T>::kSize;
  float sf[kSize], tf[kSize];
  Vec16<T>::unpack(s_raw, sf);
  Vec16<T>::unpack(t_raw, tf);
  float vec_max_s = sf[0], vec_max_t = tf[0];
#pragma unroll
  for (int k = 1; k < kSize; ++k) {
    vec_max_s = fmaxf(vec_max_s, sf[k]);
    vec_max_t = fmaxf(vec_max_t, tf[k]);
  }
  raise_maxima<kMode>(st, vec_max_s, vec_max_t, k_tau);
#pragma unroll
  for (int k = 0; k < kSize; ++k) add_element<kMode>(st, sf[k], tf[k], k_tau);
}

// Brings `part` onto the maxima (max_s, max_t) and adds it to `acc` (already on them).
template <int kMode>
__device__ __forceinline__ void add_rebased(RowState& acc, const RowState& part, float k_tau) {
  if (part.max_s == -std::numeric_limits<float>::infinity()) return;  // empty: adds nothing
  const float ds = part.max_s - acc.max_s;
  const float dt = part.max_t - acc.max_t;
  const float fs_tau = exp2f(ds * k_tau);
  const float ft_tau = exp2f(dt * k_tau);
  acc.z_s += part.z_s * exp_one<kMode>(ds, fs_tau);
  acc.z_s_tau += part.z_s_tau * fs_tau;
  acc.z_t += part.z_t * exp_one<kMode>(dt, ft_tau);
  acc.z_t_tau += part.z_t_tau * ft_tau;
  acc.cross += fmaf(ds, part.z_t_tau, part.cross) * ft_tau;
}

template <int kMode>
__device__ __forceinline__ RowState merge(const RowState& a, const RowState& b, float k_tau) {
  RowState out{fmaxf(a.max_s, b.max_s), fmaxf(a.max_t, b.max_t), 0.f, 0.f, 0.f, 0.f, 0.f};
  add_rebased<kMode>(out, a, k_tau);
  add_rebased<kMode>(out, b, k_tau);
  return out;
}

template <int kMode>
__device__ __forceinline__ RowState warp_merge(RowState st, float k_tau) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    RowState other;
    other.max_s = __shfl_xor_sync(kFullMask, st.max_s, offset);
    other.max_t = __shfl_xor_sync(kFullMask, st.max_t, offset);
    other.z_s = __shfl_xor_sync(kFullMask, st.z_s, offset);
    other.z_s_tau = __shfl_xor_sync(kFullMask, st.z_s_tau, offset);
    other.z_t = __shfl_xor_sync(kFullMask, st.z_t, offset);
    other.z_t_tau = __shfl_xor_sync(kFullMask, st.z_t_tau, offset);
    other.cross = __shfl_xor_sync(kFullMask, st.cross, offset);
    st = merge<kMode>(st, other, k_tau);
  }
  return st;
}

// Number of leading elements of a row before its first 16-byte boundary. The host guarantees
// 16-byte aligned base pointers, so student, teacher and gradient rows share this offset.
template <typename T>
__device__ __forceinline__ int64_t row_head(const T* row, int64_t classes) {
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16) /
                             static_cast<int64_t>(sizeof(T));
  const int64_t head = misaligned == 0 ? 0 : Vec16<T>::kSize - misaligned;
  return head < classes ? head : classes;
}

template <typename T, int kMode, int kThreadsPerRow>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    wsld_forward_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                        const int64_t* __restrict__ labels, float* __restrict__ row_stats,
                        int64_t rows, int64_t classes, float inv_tau) {
  static_assert(kThreadsPerRow == kWarpSize || kThreadsPerRow == kBlockThreads,
                "a row is handled by one warp or one block");
  constexpr int kRowsPerBlock = kBlockThreads / kThreadsPerRow;
  constexpr int kVec = Vec16<T>::kSize;
  __shared__ RowState warp_states[kWarpsPerBlock];

  const float k_tau = inv_tau * kLog2e;
  const int lane = static_cast<int>(threadIdx.x) % kThreadsPerRow;
  const int64_t first_row =
      static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;

  // Every thread of a row's warp/block runs the same iterations, so the shuffles and
  // __syncthreads below are reached uniformly.
  for (int64_t row = first_row; row < rows; row += row_stride) {
    const T* s_row = student + row * classes;
    const T* t_row = teacher + row * classes;
    RowState st = empty_state();

    const int64_t head = row_head(s_row, classes);
    for (int64_t c = lane; c < head; c += kThreadsPerRow) {
      add_scalar<kMode>(st, static_cast<float>(s_row[c]), static_cast<float>(t_row[c]), k_tau);
    }
    const int64_t vectors = (classes - head) / kVec;
    const auto* s_vectors = reinterpret_cast<const uint4*>(s_row + head);
    const auto* t_vectors = reinterpret_cast<const uint4*>(t_row + head);
    for (int64_t base = lane; base < vectors; base += kThreadsPerRow * kUnroll) {
      uint4 s_buf[kUnroll], t_buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = base + u * kThreadsPerRow;
        if (idx < vectors) {
          s_buf[u] = s_vectors[idx];
          t_buf[u] = t_vectors[idx];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kThreadsPerRow < vectors) {
          add_vector<kMode, T>(st, s_buf[u], t_buf[u], k_tau);
        }
      }
    }
    for (int64_t c = head + vectors * kVec + lane; c < classes; c += kThreadsPerRow) {
      add_scalar<kMode>(st, static_cast<float>(s_row[c]), static_cast<float>(t_row[c]), k_tau);
    }

    st = warp_merge<kMode>(st, k_tau);
    if constexpr (kThreadsPerRow == kBlockThreads) {
      const int warp = threadIdx.x / kWarpSize;
      if (lane % kWarpSize == 0) warp_states[warp] = st;
      __syncthreads();
      if (warp == 0) {
        st = lane < kWarpsPerBlock ? warp_states[lane] : empty_state();
        st = warp_merge<kMode>(st, k_tau);
      }
      __syncthreads();  // warp_states is rewritten by the next row of this block
    }

    if (lane == 0) {
      const int64_t label = labels[row];
      const bool valid = label >= 0 && label < classes;
      CUDA_KERNEL_ASSERT(valid && "fastkd::wsld: a label is outside [0, num_classes)");
      // Never read outside the row, even where device asserts are compiled out.
      const float nan = std::numeric_limits<float>::quiet_NaN();
      const float s_label = valid ? static_cast<float>(s_row[label]) : nan;
      const float t_label = valid ? static_cast<float>(t_row[label]) : nan;
      // (max - x_y) first: for logits ~1e4 that difference is exact, the log-sum-exp is not.
      const float ce_student = (st.max_s - s_label) + logf(st.z_s);
      const float ce_teacher = (st.max_t - t_label) + logf(st.z_t);
      const float soft_ce = logf(st.z_s_tau) - st.cross * inv_tau / st.z_t_tau;
      const float ratio = ce_student / (ce_teacher + static_cast<float>(kWeightEpsilon));
      // 1 - exp(-max(ratio, 0)) via expm1 (no cancellation for small ratios); NaN stays NaN,
      // which fmaxf alone would turn into 0.
      const float clamped = isnan(ratio) ? ratio : fmaxf(ratio, 0.f);
      const float weight = -expm1f(-clamped);
      auto* out = reinterpret_cast<float4*>(row_stats + row * kNumStats);
      out[0] = make_float4(st.max_s, st.max_t, 1.f / st.z_s_tau, 1.f / st.z_t_tau);
      out[1] = make_float4(1.f / st.z_s, weight, soft_ce, ce_student);
    }
  }
}

constexpr int kReduceThreads = 512;

__device__ __forceinline__ double warp_sum(double value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  return value;
}

// Batch means from the row statistics, by one block in a fixed order (deterministic). Always
// launched, also for N = 0, where it writes zeros.
__global__ void __launch_bounds__(kReduceThreads)
    wsld_reduce_kernel(const float* __restrict__ row_stats, int64_t rows, double loss_scale,
                       double ce_weight, float* __restrict__ total, float* __restrict__ ce,
                       float* __restrict__ wsld, float* __restrict__ weight_mean) {
  __shared__ double partial[3][kReduceThreads / kWarpSize];
  double weighted = 0.0, ce_sum = 0.0, weight_sum = 0.0;
  for (int64_t row = threadIdx.x; row < rows; row += kReduceThreads) {
    const float* r = row_stats + row * kNumStats;
    weighted += static_cast<double>(r[kWeight]) * static_cast<double>(r[kSoftCrossEntropy]);
    ce_sum += r[kStudentCrossEntropy];
    weight_sum += r[kWeight];
  }
  weighted = warp_sum(weighted);
  ce_sum = warp_sum(ce_sum);
  weight_sum = warp_sum(weight_sum);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    partial[0][warp] = weighted;
    partial[1][warp] = ce_sum;
    partial[2][warp] = weight_sum;
  }
  __syncthreads();
  if (warp == 0) {
    constexpr int kWarps = kReduceThreads / kWarpSize;
    weighted = warp_sum(lane < kWarps ? partial[0][lane] : 0.0);
    ce_sum = warp_sum(lane < kWarps ? partial[1][lane] : 0.0);
    weight_sum = warp_sum(lane < kWarps ? partial[2][lane] : 0.0);
    if (lane == 0) {
      // N = 0 gives 0, not the NaN of an empty mean (see wsld.cpp).
      const double inv_rows = rows > 0 ? 1.0 / static_cast<double>(rows) : 0.0;
      const double wsld_value = loss_scale * weighted * inv_rows;
      const double ce_value = ce_sum * inv_rows;
      *wsld = static_cast<float>(wsld_value);
      *ce = static_cast<float>(ce_value);
      const double total_value = ce_weight != 0.0 ? ce_weight * ce_value + wsld_value : wsld_value;
      *total = static_cast<float>(total_value);
      *weight_mean = static_cast<float>(weight_sum * inv_rows);
    }
  }
}

template <int kMode>
__device__ __forceinline__ float grad_element(float s, float t, bool is_label, const float* st,
                                              float a, float b, bool with_ce, float k_tau) {
  const float xs = s - st[kStudentMax];
  const float es_tau = exp2f(xs * k_tau);
  const float q = es_tau * st[kStudentInvZTau];
  const float p = exp2f((t - st[kTeacherMax]) * k_tau) * st[kTeacherInvZTau];
  float g = a * (q - p);
  if (with_ce) {
    const float softmax = exp_one<kMode>(xs, es_tau) * st[kStudentInvZ];
    g = fmaf(b, softmax - (is_label ? 1.f : 0.f), g);
  }
  return g;
}

template <typename T, int kMode, int kThreadsPerRow>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    wsld_backward_kernel(const float* __restrict__ grad_loss, const T* __restrict__ student,
                         const T* __restrict__ teacher, const int64_t* __restrict__ labels,
                         const float* __restrict__ row_stats, T* __restrict__ grad_student,
                         int64_t rows, int64_t classes, float inv_tau, float wsld_scale,
                         float ce_scale) {
  constexpr int kRowsPerBlock = kBlockThreads / kThreadsPerRow;
  constexpr int kVec = Vec16<T>::kSize;
  const float k_tau = inv_tau * kLog2e;
  const float g = *grad_loss;  // device memory: no host round trip for the upstream gradient
  const float b = g * ce_scale;
  const bool with_ce = ce_scale != 0.f;  // uniform over the grid: no divergence
  const int lane = static_cast<int>(threadIdx.x) % kThreadsPerRow;
  const int64_t first_row =
      static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;

  for (int64_t row = first_row; row < rows; row += row_stride) {
    float st[kNumStats];
    const auto* stats4 = reinterpret_cast<const float4*>(row_stats + row * kNumStats);
    const float4 lo = stats4[0], hi = stats4[1];
    st[0] = lo.x, st[1] = lo.y, st[2] = lo.z, st[3] = lo.w;
    st[4] = hi.x, st[5] = hi.y, st[6] = hi.z, st[7] = hi.w;
    const float a = g * wsld_scale * st[kWeight];
    // An invalid label already tripped the forward's assertion; here it only matches nothing.
    const int64_t label = labels[row];

    const T* s_row = student + row * classes;
    const T* t_row = teacher + row * classes;
    T* g_row = grad_student + row * classes;
    const int64_t head = row_head(s_row, classes);
    for (int64_t c = lane; c < head; c += kThreadsPerRow) {
      g_row[c] = static_cast<T>(grad_element<kMode>(static_cast<float>(s_row[c]),
                                                       static_cast<float>(t_row[c]), c == label,
                                                       st, a, b, with_ce, k_tau));
    }
    const int64_t vectors = (classes - head) / kVec;
    const auto* s_vectors = reinterpret_cast<const uint4*>(s_row + head);
    const auto* t_vectors = reinterpret_cast<const uint4*>(t_row + head);
    auto* g_vectors = reinterpret_cast<uint4*>(g_row + head);
    for (int64_t base = lane; base < vectors; base += kThreadsPerRow * kUnroll) {
      uint4 s_buf[kUnroll], t_buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = base + u * kThreadsPerRow;
        if (idx < vectors) {
          s_buf[u] = s_vectors[idx];
          t_buf[u] = t_vectors[idx];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = base + u * kThreadsPerRow;
        if (idx < vectors) {
          float sf[kVec], tf[kVec], out[kVec];
          Vec16<T>::unpack(s_buf[u], sf);
          Vec16<T>::unpack(t_buf[u], tf);
          const int64_t first = head + idx * kVec;
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            out[k] = grad_element<kMode>(sf[k], tf[k], first + k == label, st, a, b, with_ce,
                                         k_tau);
          }
          g_vectors[idx] = Vec16<T>::pack(out);
        }
      }
    }
    for (int64_t c = head + vectors * kVec + lane; c < classes; c += kThreadsPerRow) {
      g_row[c] = static_cast<T>(grad_element<kMode>(static_cast<float>(s_row[c]),
                                                       static_cast<float>(t_row[c]), c == label,
                                                       st, a, b, with_ce, k_tau));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

// Fresh CUDA allocations are 512-byte aligned; only views with an odd storage offset are not,
// and those are copied once so that every row of every tensor shares one 16-byte phase.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t : t.clone();
}

template <typename T>
bool warp_per_row(int64_t classes) {
  // Up to 8 packs per lane a warp is enough; wider rows need a block to keep loads in flight.
  return classes <= static_cast<int64_t>(kWarpSize) * 8 * Vec16<T>::kSize;
}

int64_t grid_size(int64_t rows, int rows_per_block) {
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  return blocks < std::numeric_limits<int32_t>::max() ? blocks
                                                      : std::numeric_limits<int32_t>::max();
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* op_name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kHalf:
      return fn(c10::Half{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    default:
      TORCH_CHECK_TYPE(false, op_name,
                       ": float64 logits are supported on the CPU only (for gradcheck); use "
                       "float32, float16 or bfloat16 on CUDA, got ",
                       dtype);
  }
}

template <typename T, int kMode>
void launch_forward(const at::Tensor& student, const at::Tensor& teacher,
                    const at::Tensor& labels, at::Tensor& row_stats, int64_t rows,
                    int64_t classes, double tau, cudaStream_t stream) {
  const auto* s = reinterpret_cast<const T*>(student.const_data_ptr());
  const auto* t = reinterpret_cast<const T*>(teacher.const_data_ptr());
  const int64_t* y = labels.const_data_ptr<int64_t>();
  float* out = row_stats.mutable_data_ptr<float>();
  const float inv_tau = static_cast<float>(1.0 / tau);
  if (warp_per_row<T>(classes)) {
    const auto grid = static_cast<unsigned>(grid_size(rows, kWarpsPerBlock));
    wsld_forward_kernel<T, kMode, kWarpSize>
        <<<grid, kBlockThreads, 0, stream>>>(s, t, y, out, rows, classes, inv_tau);
  } else {
    const auto grid = static_cast<unsigned>(grid_size(rows, 1));
    wsld_forward_kernel<T, kMode, kBlockThreads>
        <<<grid, kBlockThreads, 0, stream>>>(s, t, y, out, rows, classes, inv_tau);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kMode>
void launch_backward(const at::Tensor& grad, const at::Tensor& student,
                     const at::Tensor& teacher, const at::Tensor& labels,
                     const at::Tensor& row_stats, at::Tensor& grad_student, int64_t rows,
                     int64_t classes, double tau, double wsld_scale, double ce_scale,
                     cudaStream_t stream) {
  const float* g = grad.const_data_ptr<float>();
  const auto* s = reinterpret_cast<const T*>(student.const_data_ptr());
  const auto* t = reinterpret_cast<const T*>(teacher.const_data_ptr());
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const float* st = row_stats.const_data_ptr<float>();
  auto* out = reinterpret_cast<T*>(grad_student.mutable_data_ptr());
  const float inv_tau = static_cast<float>(1.0 / tau);
  const auto ws = static_cast<float>(wsld_scale);
  const auto cs = static_cast<float>(ce_scale);
  if (warp_per_row<T>(classes)) {
    const auto grid = static_cast<unsigned>(grid_size(rows, kWarpsPerBlock));
    wsld_backward_kernel<T, kMode, kWarpSize>
        <<<grid, kBlockThreads, 0, stream>>>(g, s, t, y, st, out, rows, classes, inv_tau, ws, cs);
  } else {
    const auto grid = static_cast<unsigned>(grid_size(rows, 1));
    wsld_backward_kernel<T, kMode, kBlockThreads>
        <<<grid, kBlockThreads, 0, stream>>>(g, s, t, y, st, out, rows, classes, inv_tau, ws, cs);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Fn>
void dispatch_mode(double tau, Fn&& fn) {
  switch (tau_mode(tau)) {
    case kTauOne:
      return fn(std::integral_constant<int, kTauOne>{});
    case kTauTwo:
      return fn(std::integral_constant<int, kTauTwo>{});
    default:
      return fn(std::integral_constant<int, kTauGeneric>{});
  }
}

ForwardOutputs forward_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                            const at::Tensor& labels, double tau, double loss_weight,
                            double ce_weight, const char* op_name) {
  PreparedInputs in = prepare_inputs(student_logits, teacher_logits, labels, tau, op_name);
  const c10::cuda::CUDAGuard guard(in.student.device());
  const at::Tensor student = aligned16(in.student);
  const at::Tensor teacher = aligned16(in.teacher);
  const auto options = student.options().dtype(at::kFloat);
  ForwardOutputs out{at::empty({}, options), at::empty({}, options), at::empty({}, options),
                     at::empty({}, options), at::empty({in.rows, kNumStats}, options)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(student.scalar_type(), op_name, [&](auto tag) {
    using T = decltype(tag);
    if (in.rows == 0) return;
    dispatch_mode(tau, [&](auto mode) {
      launch_forward<T, decltype(mode)::value>(student, teacher, in.labels, out.row_stats, in.rows,
                                               in.classes, tau, stream);
    });
  });
  wsld_reduce_kernel<<<1, kReduceThreads, 0, stream>>>(
      out.row_stats.const_data_ptr<float>(), in.rows, loss_weight * tau * tau, ce_weight,
      out.total.mutable_data_ptr<float>(), out.ce.mutable_data_ptr<float>(),
      out.wsld.mutable_data_ptr<float>(), out.weight_mean.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor wsld_backward_cuda(const at::Tensor& grad, const at::Tensor& student_logits,
                              const at::Tensor& teacher_logits, const at::Tensor& labels,
                              const at::Tensor& row_stats, double tau, double loss_weight,
                              double ce_weight) {
  constexpr const char* op = "fastkd::wsld_backward";
  PreparedInputs in = prepare_inputs(student_logits, teacher_logits, labels, tau, op);
  check_backward_args(grad, row_stats, in);
  const c10::cuda::CUDAGuard guard(in.student.device());
  const at::Tensor student = aligned16(in.student);
  const at::Tensor teacher = aligned16(in.teacher);
  const at::Tensor stats = aligned16(row_stats.contiguous());
  const at::Tensor grad_value = as_dtype(grad, at::kFloat).contiguous();
  at::Tensor grad_student = at::empty({in.rows, in.classes}, student.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(student.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if (in.rows == 0) return;
    const double inv_rows = 1.0 / static_cast<double>(in.rows);
    dispatch_mode(tau, [&](auto mode) {
      launch_backward<T, decltype(mode)::value>(grad_value, student, teacher, in.labels, stats,
                                                grad_student, in.rows, in.classes, tau,
                                                loss_weight * tau * inv_rows, ce_weight * inv_rows,
                                                stream);
    });
  });
  return as_dtype(grad_student, student_logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("wsld", &wsld_kernel<&forward_cuda>);
  m.impl("wsld_ce", &wsld_ce_kernel<&forward_cuda>);
  m.impl("wsld_backward", &wsld_backward_cuda);
}

}  // namespace fastkd
