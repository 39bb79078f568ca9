// Shared by the CPU ops' vectorised row loops (swiglu.cpp, gating.cpp): the clone attribute and
// e^x in the accumulation type.
#pragma once

#include "kernels/exp_rn.cuh"

#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__INTEL_COMPILER)
// Clones for AVX-512 and AVX2 beside the default one, picked once at load time. Every clone gives
// the same bits: IEEE operations, each rounded on its own (-ffp-contract=off).
#define MOE_EXT_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOE_EXT_VECTOR_CLONES
#endif

namespace moe_ext::cpu {

// float32: exp_rn, branch-free (so the loops vectorise) and the SwiGLU kernel's own exp; float64:
// std::exp.
inline float exp_acc(float x) { return kernels::exp_rn(x); }
inline double exp_acc(double x) { return std::exp(x); }

}  // namespace moe_ext::cpu
