// SwiGLU over h = [gate | up] (the pre-activation, [rows, 2n]), as a stage of its own: the forward
// a = silu(gate) * up ([rows, n]) for a layer that keeps h for its backward instead of running the
// up-projection again (the grouped GEMM's fused "swiglu" epilogue writes only a), and the gradient.
//
// The gradient: given h = [gate | up] (the pre-activation, [rows, 2n]) and the gradient g of
// silu(gate) * up ([rows, n]), writes dL/dh = [g * up * silu'(gate) | g * silu(gate)] ([rows, 2n],
// h's dtype), computed in float32 (float64 for float64) in the order of the CPU op
// (csrc/cpu/swiglu.cpp), every product and sum rounded on its own (no fused multiply-add).
//
// One pass over memory: reads g and h, writes the result. The eager torch formula it replaces ran
// ~12 kernels over float32 temporaries (at rows = 32768, n = 14336: ~40 GB of traffic against
// 4.7 GB here, 1.6 ms at the H100's 2.95 TB/s copy ceiling).
#pragma once

#include "kernels/permute.cuh"  // PermuteFloat: the row element types

#include <cuda_runtime.h>

#include <cstdint>

namespace moe_ext::kernels {

struct SwigluForwardParams {
  PermuteFloat dtype = PermuteFloat::kBFloat16;  // of h and of the result
  const void* h = nullptr;  // [rows, 2n], contiguous
  void* out = nullptr;      // [rows, n], contiguous; may not alias h
  int64_t rows = 0;
  int64_t n = 0;
};

// out = silu(gate) * up, computed in float32 (float64 for float64) with the grouped GEMM
// epilogue's formula (silu(x) = x / (1 + exp(-x)), then one product, rounded once to dtype) and
// the CPU op's operations (csrc/cpu/swiglu.cpp): in float32 the exp is exp_rn (exp_rn.cuh), so
// the CPU op gives the same bits; the GEMM epilogue keeps CUDA's expf (within 2 ulp of each
// other). Reads h once, writes out once: at rows = 32768, n = 14336, 2.8 GB, 0.96 ms at the copy
// ceiling. Asynchronous on `stream`; CUDA-graph capturable.
void swiglu_forward(const SwigluForwardParams& p, cudaStream_t stream);

struct SwigluBackwardParams {
  PermuteFloat dtype = PermuteFloat::kBFloat16;  // of h and of the result
  bool grad_is_acc = false;  // g in the accumulation type (float32; float64 for float64) instead of dtype
  const void* grad = nullptr;  // [rows, n], contiguous
  const void* h = nullptr;     // [rows, 2n], contiguous
  void* out = nullptr;         // [rows, 2n], contiguous; may not alias grad or h
  int64_t rows = 0;
  int64_t n = 0;
};

// Asynchronous on `stream`; no host synchronisation, CUDA-graph capturable. Nothing for rows * n == 0.
void swiglu_backward(const SwigluBackwardParams& p, cudaStream_t stream);

}  // namespace moe_ext::kernels
