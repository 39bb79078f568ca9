// The portable grouped GEMM (sm_80 and later): kernel arguments and the per-configuration
// launchers. Declarations only: the kernels are in grouped_gemm_sm80_impl.cuh, instantiated once
// per configuration in grouped_gemm_sm80_*.cu (so that they compile in parallel), and chosen by
// the public launchers in grouped_gemm.cu. The design is described in grouped_gemm.cuh.
#pragma once

#include "kernels/grouped_gemm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_ext::kernels::gemm_detail {

// Threads per CTA and the tile shape (the m-extent BM is a template parameter: 128 or 64).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kBN = 128;    // columns of B per tile (64 gate + 64 up with SwiGLU)
constexpr int kBK = 32;     // reduction elements per pipeline stage
constexpr int kStages = 4;  // cp.async pipeline depth
constexpr int kBandM = 16;  // m-tiles per raster band of the tile order

// Group sizes as the kernels read them (the host has checked every value fits in int32).
struct DeviceGroups {
  const void* sizes = nullptr;
  int32_t num_experts = 0;
  int32_t rows = 0;  // contiguous: M; masked: max_rows
  bool sizes_int64 = false;
  bool sizes_are_offsets = false;
  bool masked = false;
};

template <typename T>
struct FwdArgs {
  const T* a = nullptr;
  const T* b = nullptr;
  T* out = nullptr;
  const float* row_scale = nullptr;
  const T* bias = nullptr;
  int32_t k = 0;
  int32_t n = 0;      // columns of b
  int32_t n_out = 0;  // columns of out: n, or n / 2 with SwiGLU
  DeviceGroups groups;
};

// out[e] ([m, n]) = x_e^T y_e with x [rows, m] and y [rows, n] row-major: the weight gradient
// with (x, y) = (a, grad_out), or (grad_out, a) for trans_b.
template <typename T>
struct WgradArgs {
  const T* x = nullptr;
  const T* y = nullptr;
  T* out = nullptr;
  int32_t m = 0;
  int32_t n = 0;
  DeviceGroups groups;
};

// Launch with a persistent grid of min(max_tiles, resident CTAs); max_tiles is an upper bound of
// the tiles the schedule can hold (the device knows the exact count).
template <typename T, int BM, bool kTransB, bool kSwiglu>
void launch_fwd(const FwdArgs<T>& args, int64_t max_tiles, cudaStream_t stream);

template <typename T>
void launch_wgrad(const WgradArgs<T>& args, int64_t max_tiles, cudaStream_t stream);

}  // namespace moe_ext::kernels::gemm_detail
