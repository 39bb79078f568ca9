// e^x for float32 from float32 additions and multiplications only, each rounded on its own: the
// CPU ops (csrc/cpu, built with -ffp-contract=off), the CUDA kernels (__fadd_rn / __fmul_rn, which
// nvcc never contracts) and their CPU emulation compute the same bits. Branch-free, so a host
// compiler vectorises a loop of it (glibc's expf is a call per element).
//
// Used by SwiGLU (CPU op and kernel: bit-identical outputs) and by the CPU gating op. Error: at
// most 2 ulp against the exact e^x over every float32 input (tests/test_swiglu.py checks a dense
// sample of them against float64), results in the subnormal range included.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOE_EXT_EXP_FN __host__ __device__ __forceinline__
#else
#define MOE_EXT_EXP_FN inline
#endif

namespace moe_ext::kernels {
namespace exp_rn_detail {

MOE_EXT_EXP_FN float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MOE_EXT_EXP_FN float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

MOE_EXT_EXP_FN uint32_t bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
#endif
}

MOE_EXT_EXP_FN float from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
#endif
}

}  // namespace exp_rn_detail

// x = n ln2 + r with n = round(x / ln2) and |r| <= ~0.35; e^r by its Taylor series to r^7
// (truncation under 0.1 ulp there); the result scaled by 2^n in two steps, each factor a normal
// float, so that a subnormal result is rounded once. Inputs are clamped to [-104, 89], outside of
// which e^x rounds to 0 or overflows to inf anyway; NaN passes through (both comparisons fail).
MOE_EXT_EXP_FN float exp_rn(float x) {
  namespace d = exp_rn_detail;
  constexpr float kLog2e = 1.44269502f;
  constexpr float kShift = 12582912.0f;      // 1.5 * 2^23: v + kShift rounds v to an integer (|v| < 2^22)
  constexpr float kLn2Hi = 0.693359375f;     // ln 2 in 9 bits: n * kLn2Hi is exact for |n| < 2^15
  constexpr float kLn2Lo = -2.12194440e-4f;  // ln 2 - kLn2Hi
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  const float t = d::add(d::mul(x, kLog2e), kShift);
  const float n = d::add(t, -kShift);
  // x - n * kLn2Hi is exact (Sterbenz: the two lie within a factor 2 of each other, or n = 0).
  const float r = d::add(d::add(x, -d::mul(n, kLn2Hi)), -d::mul(n, kLn2Lo));
  float p = 1.0f / 5040.0f;
  p = d::add(d::mul(p, r), 1.0f / 720.0f);
  p = d::add(d::mul(p, r), 1.0f / 120.0f);
  p = d::add(d::mul(p, r), 1.0f / 24.0f);
  p = d::add(d::mul(p, r), 1.0f / 6.0f);
  p = d::add(d::mul(p, r), 0.5f);
  p = d::add(d::mul(p, r), 1.0f);
  p = d::add(d::mul(p, r), 1.0f);
  // n in [-150, 128] is the low bits of t; halves n1 = floor(n / 2), n2 = n - n1 lie in [-75, 64].
  // Unsigned arithmetic: a NaN input gives arbitrary bits here, and a NaN result from p anyway.
  const uint32_t nu = d::bits(t) - d::bits(kShift);
  const uint32_t n1 = static_cast<uint32_t>(static_cast<int32_t>(nu) >> 1), n2 = nu - n1;
  return d::mul(d::mul(p, d::from_bits((n1 + 127u) << 23)), d::from_bits((n2 + 127u) << 23));
}

}  // namespace moe_ext::kernels

#undef MOE_EXT_EXP_FN
