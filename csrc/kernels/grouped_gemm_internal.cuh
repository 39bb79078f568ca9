// Internal declarations of the grouped GEMM: kernel arguments and the per-configuration
// launchers of the portable kernel (grouped_gemm_sm80_impl.cuh, instantiated in
// grouped_gemm_sm80_*.cu), of the Hopper kernel (grouped_gemm_sm90_impl.cuh, instantiated in
// grouped_gemm_sm90_{bf16,f16}_*.cu) and of the Hopper weight gradient
// (grouped_gemm_sm90_wgrad_impl.cuh, instantiated in grouped_gemm_sm90_wgrad_*.cu), chosen by the
// public launchers in grouped_gemm.cu. Declarations only, so that every configuration compiles
// once, in its own file. The design is in grouped_gemm.cuh.
#pragma once

#include "kernels/grouped_gemm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_ext::kernels::gemm_detail {

// The portable kernel's threads per CTA and tile shape (the m-extent BM is a template parameter:
// 128 or 64).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kBN = 128;    // columns of B per tile (64 gate + 64 up with SwiGLU)
constexpr int kBK = 32;     // reduction elements per pipeline stage
constexpr int kStages = 4;  // cp.async pipeline depth

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

// The Hopper kernel (sm_90a: TMA + wgmma, warp-specialised): 128 x 128 tiles.
constexpr int kSm90TileM = 128;
constexpr int kSm90TileN = 128;              // columns of B per tile (64 gate + 64 up with SwiGLU)
constexpr int64_t kSm90MaxExperts = 1024;   // its schedule shares shared memory with 4 stages
// rows_total: rows of a and out (M, or E * max_rows).
template <typename T, bool kTransB, bool kSwiglu>
void launch_fwd_sm90(const FwdArgs<T>& args, int32_t rows_total, int64_t max_tiles, cudaStream_t stream);
// Whether the Hopper kernel can run on the current device (sm_90 with sm_90a code in this build).
bool sm90_available();

// The Hopper weight gradient (sm_90a: TMA + wgmma on two MN-major operands, warp-specialised):
// 128 x 128 output tiles of out[e] = x_e^T y_e, the same expert limit as the forward (its schedule
// shares shared memory with 4 stages). rows_total: rows of x and y (M, or E * max_rows).
constexpr int kSm90WgradTileM = 128;
constexpr int kSm90WgradTileN = 128;
template <typename T>
void launch_wgrad_sm90(const WgradArgs<T>& args, int32_t rows_total, int64_t max_tiles, cudaStream_t stream);
// Whether the Hopper weight gradient can run on the current device (sm_90 with sm_90a code).
bool sm90_wgrad_available();

}  // namespace moe_ext::kernels::gemm_detail
