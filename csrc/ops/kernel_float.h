// The element type code the float kernels take (kernels::PermuteFloat), from a tensor's dtype:
// shared by the CUDA op adapters (permute, ipc combine, SwiGLU).
#pragma once

#include "kernels/permute.cuh"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace moe_ext {

// `what` names the argument in the error for a dtype the kernels do not take.
inline kernels::PermuteFloat kernel_float(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return kernels::PermuteFloat::kFloat32;
    case at::kDouble: return kernels::PermuteFloat::kFloat64;
    case at::kHalf: return kernels::PermuteFloat::kFloat16;
    case at::kBFloat16: return kernels::PermuteFloat::kBFloat16;
    default: TORCH_CHECK(false, what, " must be float32, float64, float16 or bfloat16, got ", t);
  }
}

}  // namespace moe_ext
