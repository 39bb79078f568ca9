// grouped_gemm_masked: the "masked" decode layout of the grouped GEMM. a [E, max_rows, K] holds
// expert e's rows in a[e, :valid_rows[e]]; out [E, max_rows, N'] with rows past valid_rows[e]
// zero. Schema, checks and the ATen implementation live in grouped_gemm_masked.cpp; the CUDA
// kernel path in grouped_gemm_cuda.cu (which falls back to the ATen one for float32/float64).
#pragma once

#include "ops/checks.h"

#include <ATen/core/Tensor.h>

#include <string>

namespace moe_ext {

// a [E, max_rows, K], b [E, K, N] (or [E, N, K] with trans_b), valid_rows [E] int32/int64.
// bias [E, N], row_scale [E, max_rows]: the epilogue of grouped_gemm (csrc/ops/checks.h).
void check_grouped_gemm_masked(const at::Tensor& a, const at::Tensor& b, const at::Tensor& valid_rows, bool trans_b,
                               Activation act, const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& row_scale);

// One matmul per expert in float32 (float64 for float64) on the valid rows; reads valid_rows on
// the host and raises for counts outside [0, max_rows]. Works for CPU and CUDA tensors.
at::Tensor grouped_gemm_masked_aten(const at::Tensor& a, const at::Tensor& b, const at::Tensor& valid_rows,
                                    bool trans_b, const std::string& activation,
                                    const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& row_scale);

}  // namespace moe_ext
