// Shared by the CPU ops' vectorised row loops (swiglu.cpp, gating.cpp, permute.cpp): the clone
// attribute, e^x in the accumulation type, and branch-free conversions of the 16-bit floats.
#pragma once

#include "kernels/exp_rn.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

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

// ---- 16-bit floats <-> float32 ---------------------------------------------------------------------
// The same bits as c10's software conversions (this build has no -mf16c): round to nearest even;
// a NaN becomes 0x7E00 with its sign (half) or 0x7FC0 (bfloat16) on the way down and a quiet NaN
// with its payload on the way up. Written with selects instead of branches, so that loops of them
// vectorise; c10's own (a call per element in practice) made the float16 rows 3x slower than the
// bfloat16 ones.
// The float32 <-> bits moves of exp_rn (memcpy on the host).
using kernels::exp_rn_detail::bits;
using kernels::exp_rn_detail::from_bits;

inline float half_to_f32(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h) & 0x7FFFu;
  // Normal: the exponent rebiased by 127 - 15 = 112; infinity / NaN: to 255, NaN made quiet.
  uint32_t r = (em << 13) + (112u << 23);
  r = em >= 0x7C00u ? r + (112u << 23) : r;
  r = em > 0x7C00u ? r | 0x00400000u : r;
  // Zero / subnormal: em units of 2^-24, exact in float32.
  const uint32_t sub = bits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  return from_bits(sign | (em < 0x0400u ? sub : r));
}

inline uint16_t f32_to_half(float f) {
  const uint32_t x = bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;
  // Normal half (|f| >= 2^-14): rebias, round the 13 dropped bits to nearest even; a carry out of
  // the mantissa moves to the next binade, 65520 and up to 0x7C00 (infinity).
  uint32_t n = (a - (112u << 23) + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
  n = a >= 0x477FF000u ? 0x7C00u : n;
  // Subnormal half: adding 0.5f leaves |f| rounded (to nearest even) to the float32 ulp of 0.5,
  // 2^-24, the half's subnormal step; the bits above 0.5f count the steps (0x400 = 2^-14 exactly).
  const uint32_t s = bits(from_bits(a) + 0.5f) - bits(0.5f);
  const uint32_t mag = a > 0x7F800000u ? 0x7E00u : (a < 0x38800000u ? s : n);
  return static_cast<uint16_t>(sign | mag);
}

inline float bf16_to_f32(uint16_t b) { return from_bits(static_cast<uint32_t>(b) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

// An element widened to its accumulation type (at::opmath_type), and narrowed back.
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(c10::Half x) { return half_to_f32(x.x); }
inline float widen(c10::BFloat16 x) { return bf16_to_f32(x.x); }

template <typename T>
inline T narrow_to(float x) {
  if constexpr (std::is_same_v<T, c10::Half>) return c10::Half(f32_to_half(x), c10::Half::from_bits());
  else if constexpr (std::is_same_v<T, c10::BFloat16>) return c10::BFloat16(f32_to_bf16(x), c10::BFloat16::from_bits());
  else return static_cast<T>(x);
}

template <typename T>
inline T narrow_to(double x) {
  return static_cast<T>(x);
}

// n 16-bit elements <-> float32, the bits of widen / narrow_to (vec.cpp: float16 through F16C
// where the CPU has it).
void widen_n(const c10::Half* src, float* dst, int64_t n);
void widen_n(const c10::BFloat16* src, float* dst, int64_t n);
void narrow_n(const float* src, c10::Half* dst, int64_t n);
void narrow_n(const float* src, c10::BFloat16* dst, int64_t n);

}  // namespace moe_ext::cpu
