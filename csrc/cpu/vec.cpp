// vec.h's bulk 16-bit conversions. float16 uses the F16C instructions where the CPU has them (8
// elements per instruction; the element-wise selects cost ~15 operations each), with the same
// bits as the selects, hence as c10: F16C rounds to nearest even too and keeps a NaN's payload on
// the way up; on the way down a NaN is first made 0x7FC00000 with its sign, which F16C turns into
// 0x7E00 with that sign, as c10 does.
#include "cpu/vec.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__INTEL_COMPILER)
#include <immintrin.h>
#define MOE_EXT_HAVE_F16C_PATH 1
#endif

namespace moe_ext::cpu {
namespace {

template <typename T>
MOE_EXT_VECTOR_CLONES void widen_loop(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}

template <typename T>
MOE_EXT_VECTOR_CLONES void narrow_loop(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = narrow_to<T>(src[i]);
}

#ifdef MOE_EXT_HAVE_F16C_PATH
bool have_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}

__attribute__((target("avx,f16c"))) void half_to_f32_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_to_f32(src[i].x);
}

__attribute__((target("avx,f16c"))) void f32_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256 qnan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    v = _mm256_blendv_ps(v, _mm256_or_ps(_mm256_and_ps(v, sign), qnan), nan);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = narrow_to<c10::Half>(src[i]);
}
#endif

}  // namespace

void widen_n(const c10::Half* src, float* dst, int64_t n) {
#ifdef MOE_EXT_HAVE_F16C_PATH
  if (have_f16c()) return half_to_f32_f16c(src, dst, n);
#endif
  widen_loop(src, dst, n);
}

void widen_n(const c10::BFloat16* src, float* dst, int64_t n) { widen_loop(src, dst, n); }

void narrow_n(const float* src, c10::Half* dst, int64_t n) {
#ifdef MOE_EXT_HAVE_F16C_PATH
  if (have_f16c()) return f32_to_half_f16c(src, dst, n);
#endif
  narrow_loop(src, dst, n);
}

void narrow_n(const float* src, c10::BFloat16* dst, int64_t n) { narrow_loop(src, dst, n); }

}  // namespace moe_ext::cpu
