// Pieces shared by the two Hopper grouped GEMMs (grouped_gemm_sm90_impl.cuh, the forward and
// dgrad; grouped_gemm_sm90_wgrad_impl.cuh, the weight gradient): element types for CuTe, the
// 16-bit pair packing of the epilogues, the consumer warpgroup barrier, and the test whether the
// device runs a kernel's sm_90a body. Kernel-free, so including it instantiates nothing.
#pragma once

#include "kernels/device_info.cuh"
#include "kernels/exception.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cutlass/numeric_types.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace moe_ext::kernels::gemm_sm90_common {

template <typename T>
struct CuteElem;
template <>
struct CuteElem<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CuteElem<__half> {
  using type = cutlass::half_t;
};

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// A barrier among the 128 threads of one consumer warpgroup (ids 1 and 2; 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_barrier(int consumer) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + consumer) : "memory");
}

constexpr int kMaxDevices = 64;

// Whether this build has sm_90a code for `kernel` and the current device runs it; `cache` holds
// the answer per device (0 unknown, 1 yes, 2 no). The code the driver loaded for the device is
// the real kernel only if it was built for sm_90a: every other build (sm_90 without `a`, or PTX
// of an older target JIT-compiled here) is the fallback body, which has static shared memory (the
// marker); the real one has none. cudaFuncGetAttributes is no stream operation: safe inside a
// CUDA-graph capture.
inline bool runs_sm90a_body(const void* kernel, std::atomic<int> (&cache)[kMaxDevices]) {
  const int device = current_device();
  if (device >= 0 && device < kMaxDevices) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v != 0) return v == 1;
  }
  int major = 0, minor = 0;
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  bool ok = major == 9 && minor == 0;
  if (ok) {
    cudaFuncAttributes attr{};
    ok = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.sharedSizeBytes == 0;
    (void)cudaGetLastError();
  }
  if (device >= 0 && device < kMaxDevices) cache[device].store(ok ? 1 : 2, std::memory_order_relaxed);
  return ok;
}

// CuTe encodes the TMA descriptors with the driver API (cuTensorMapEncodeTiled), which needs a
// current context. A thread that only ever called cudaGetDevice has none: torch's autograd thread
// runs the backward that way, and the encoding failed there (CUDA_ERROR_INVALID_CONTEXT, then
// CuTe's assert aborted the process). cudaSetDevice binds the device's primary context to the
// calling thread at once; it is no stream operation, so it is safe inside a graph capture.
inline void bind_primary_context() {
  int device = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  MOE_CUDA_CHECK(cudaSetDevice(device));
}

// How many wgmma batches a consumer warpgroup keeps in flight across K-stages: 0 waits for each
// stage's batch before releasing its slot (what ran on the H100 in session 8); 1 issues stage
// k+1's batch before waiting for stage k's and releases slot k then (CUTLASS's mainloop), so the
// tensor cores do not drain between stages. MOE_EXT_SM90_MMA_IN_FLIGHT = 0 | 1, read at every
// launch; 0 until the H100 has tested and timed 1 (bench/RESULTS.md).
inline int mma_in_flight() {
  const char* env = std::getenv("MOE_EXT_SM90_MMA_IN_FLIGHT");
  if (env == nullptr || env[0] == '\0' || (env[0] == '0' && env[1] == '\0')) return 0;
  MOE_HOST_ASSERT(env[0] == '1' && env[1] == '\0', std::string("MOE_EXT_SM90_MMA_IN_FLIGHT must be 0 or 1, got '") +
                                                     env + "'");
  return 1;
}

}  // namespace moe_ext::kernels::gemm_sm90_common
