// Conversions between the row element types and their accumulation type (float32; float64 for
// float64), and arithmetic rounded step by step, shared by the kernels that rescale or combine
// rows (unpermute, the ipc gradient expansion, SwiGLU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace moe_ext::kernels {

// The accumulation type of a row element type: float64 for float64, float32 otherwise.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// acc_type<T> -> T, rounded to nearest: from_acc, with float64 as well.
template <typename T>
__device__ __forceinline__ T cast_out(acc_type<T> v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return from_acc<T>(v);
  }
}

// NOTE: each product and sum rounded on its own: nvcc must not contract them into an FMA, or a
// result would differ from the CPU op's (which computes the same sequence) in the last bit.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

}  // namespace moe_ext::kernels
