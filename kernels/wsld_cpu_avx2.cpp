// The AVX2+FMA build of the CPU row kernels (kernels/wsld_cpu_kernel.h), selected at run time by
// wsld.cpp when the CPU supports it, so that the extension still loads on any x86-64 CPU.
//
// The target pragma (rather than -mavx2 for the whole extension) keeps AVX2 code out of every
// other translation unit; CPU_CAPABILITY gives at::vec::Vectorized its own inline namespace here,
// as in ATen's per-capability builds. setup.py lists this file after wsld.cpp so that the linker
// keeps the portable copy of any inline function both files instantiate.
//
// Kept because it pays for its files and switch: 6-8x the portable build for forward + backward
// at 256x1000, 1024x1000 and 128x21843, fp32 and bf16, one thread (2.4-5.6x with two contended
// threads), measured interleaved on an AMD EPYC on 2026-12-02 (benchmarks/RESULTS.md, "CPU kernel
// builds"; rerun with `bench_loss.py --cpu-kernels default,avx2`).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTKD_BUILD_AVX2 1
#pragma GCC target("avx2,fma,f16c")
// g++ does not define the ISA macros for a target pragma (gcc does); Sleef's header declares its
// 256-bit functions only when it sees them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
// Functions taking or returning __m256 change ABI without -mavx; they are all inline in this
// file (namespace AVX2), so no call crosses that boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define FASTKD_BUILD_AVX2 0
#endif

#if FASTKD_BUILD_AVX2

#define FASTKD_CPU_NS AVX2
#include "wsld_cpu_kernel.h"

namespace fastkd::cpu::AVX2 {
bool compiled() { return true; }
}  // namespace fastkd::cpu::AVX2

#else  // another compiler or architecture: only the portable kernels exist

#include <c10/util/Exception.h>

#include "wsld.h"

namespace fastkd::cpu::AVX2 {
bool compiled() { return false; }
void forward_rows(const ForwardRows&) { TORCH_INTERNAL_ASSERT(false, "AVX2 kernels not built"); }
void backward_rows(const BackwardRows&) { TORCH_INTERNAL_ASSERT(false, "AVX2 kernels not built"); }
}  // namespace fastkd::cpu::AVX2

#endif
