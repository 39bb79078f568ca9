// The device-side tile schedule shared by the grouped GEMM kernels (portable and Hopper): every
// CTA reads the E group sizes once and builds, in its own shared memory, each expert's row range,
// the output rows it owns, and the prefix of m-tiles per expert; a linear tile index then maps to
// (expert, m-tile, n-tile) with a binary search. No workspace, no extra launch, no host sync.
#pragma once

#include "kernels/device_info.cuh"
#include "kernels/exception.cuh"
#include "kernels/grouped_gemm_internal.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

namespace moe_ext::kernels::gemm_detail {

// NOTE: not (a + b - 1) / b, which overflows for a row count near the 2^31 the host allows.
__host__ __device__ constexpr int ceil_div_i(int a, int b) { return a / b + (a % b != 0); }

// m-tiles per raster band of the tile order.
constexpr int kScheduleBandM = 16;

// Per-expert arrays in the CTA's shared memory (int32; E entries, prefix E + 1):
//   row_begin  first row of the expert in a and out
//   valid      rows of the expert that hold data (the GEMM's rows)
//   span       output rows the expert owns: valid rows, then rows that are written as zeros
//              (contiguous: the rows past offsets[E] belong to the last expert; masked: max_rows)
//   prefix     exclusive prefix of ceil(span / BM) m-tiles (forward only)
struct Schedule {
  int32_t* row_begin;
  int32_t* valid;
  int32_t* span;
  int32_t* prefix;
};

// Bytes of the schedule region for E experts, rounded up to a bucket of 256 experts so that
// launches see few distinct shared-memory sizes.
__host__ __device__ constexpr int schedule_bytes(int num_experts) {
  return (ceil_div_i(num_experts, 256) * 256) * 16 + 16;
}

__device__ __forceinline__ Schedule carve_schedule(uint8_t* base, int num_experts) {
  const int cap = ceil_div_i(num_experts, 256) * 256;
  int32_t* p = reinterpret_cast<int32_t*>(base);
  return Schedule{p, p + cap, p + 2 * cap, p + 3 * cap};
}

__device__ __forceinline__ int64_t load_size(const DeviceGroups& g, int i) {
  return g.sizes_int64 ? static_cast<const int64_t*>(g.sizes)[i]
                       : static_cast<int64_t>(static_cast<const int32_t*>(g.sizes)[i]);
}

// Exclusive block-wide sum over the kNumThreads threads of the CTA; every thread gets the block
// total. tmp: kNumThreads / 32 int64 in shared memory. Contains two __syncthreads: call it from
// all threads.
template <int kNumThreads>
__device__ __forceinline__ int64_t block_exclusive_sum(int64_t v, int64_t* total, int64_t* tmp) {
  constexpr int kNumWarps = kNumThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t incl = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int64_t up = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += up;
  }
  if (lane == 31) tmp[warp] = incl;
  __syncthreads();
  int64_t before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) {
    const int64_t x = tmp[w];
    before += w < warp ? x : 0;
    sum += x;
  }
  __syncthreads();  // tmp may be reused by the next call
  *total = sum;
  return before + incl - v;
}

// Fills the schedule from the group sizes (all kNumThreads threads of the CTA take part). tile_m:
// rows per m-tile for the prefix (0: no prefix). Values the host cannot check are clamped
// (grouped_gemm.cuh).
template <int kNumThreads>
__device__ inline void build_schedule(const DeviceGroups& g, int tile_m, const Schedule& s, int64_t* tmp) {
  const int E = g.num_experts;
  const int64_t R = g.rows;
  if (g.masked) {
    const int mt = tile_m > 0 ? ceil_div_i(g.rows, tile_m) : 0;
    for (int e = threadIdx.x; e < E; e += kNumThreads) {
      s.row_begin[e] = e * g.rows;
      s.valid[e] = static_cast<int32_t>(min(max(load_size(g, e), int64_t{0}), R));
      s.span[e] = g.rows;
      s.prefix[e] = e * mt;
    }
    if (threadIdx.x == 0) s.prefix[E] = E * mt;
    __syncthreads();
    return;
  }
  // Pass 1: counts (clamped to [0, M]) -> row_begin = min(exclusive sum, M), valid.
  int64_t carry = 0;
  for (int base = 0; base < E; base += kNumThreads) {
    const int e = base + threadIdx.x;
    int64_t c = 0;
    if (e < E) {
      if (g.sizes_are_offsets) {
        const int64_t lo = e == 0 ? 0 : min(max(load_size(g, e), int64_t{0}), R);
        const int64_t hi = min(max(load_size(g, e + 1), int64_t{0}), R);
        c = max(hi - lo, int64_t{0});
      } else {
        c = min(max(load_size(g, e), int64_t{0}), R);
      }
    }
    int64_t total;
    const int64_t excl = block_exclusive_sum<kNumThreads>(c, &total, tmp);
    if (e < E) {
      const int64_t rb = min(carry + excl, R);
      s.row_begin[e] = static_cast<int32_t>(rb);
      s.valid[e] = static_cast<int32_t>(min(c, R - rb));
    }
    carry += total;
  }
  __syncthreads();
  // Pass 2: spans (up to the next expert's first row; the last expert owns the tail) and the
  // prefix of m-tiles.
  carry = 0;
  for (int base = 0; base < E; base += kNumThreads) {
    const int e = base + threadIdx.x;
    int64_t tiles = 0;
    if (e < E) {
      const int32_t end = e + 1 < E ? s.row_begin[e + 1] : g.rows;
      s.span[e] = end - s.row_begin[e];
      tiles = tile_m > 0 ? ceil_div_i(s.span[e], tile_m) : 0;
    }
    int64_t total;
    const int64_t excl = block_exclusive_sum<kNumThreads>(tiles, &total, tmp);
    if (e < E) s.prefix[e] = static_cast<int32_t>(carry + excl);
    carry += total;
  }
  if (threadIdx.x == 0) s.prefix[E] = static_cast<int32_t>(carry);
  __syncthreads();
}

// Linear tile index -> (m-tile in band order, n-tile): bands of kBandM consecutive m-tiles; inside
// a band the m-tile varies fastest, so the CTAs live at one time share a few A row panels and B
// column panels.
__device__ __forceinline__ void band_order(int tile, int num_mt, int num_nt, int* mt, int* nt) {
  constexpr int kBandM = kScheduleBandM;
  const int band_tiles = kBandM * num_nt;
  const int band = tile / band_tiles;
  const int idx = tile - band * band_tiles;
  const int mt0 = band * kBandM;
  const int height = min(kBandM, num_mt - mt0);
  *nt = idx / height;
  *mt = mt0 + idx % height;
}

// The expert owning global m-tile gmt: the largest e with prefix[e] <= gmt (empty experts have
// prefix[e] == prefix[e + 1], so the search lands on the one that owns tiles).
__device__ __forceinline__ int find_expert(const int32_t* prefix, int num_experts, int gmt) {
  int lo = 0, hi = num_experts;  // prefix[lo] <= gmt < prefix[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (prefix[mid] <= gmt) lo = mid;
    else hi = mid;
  }
  return lo;
}

// ---- host-side launch helpers ----------------------------------------------------------------------

// NOTE: current_device and device_sm_count live in kernels/device_info.cuh, shared with the
// other stages.
using ::moe_ext::kernels::current_device;
using ::moe_ext::kernels::device_sm_count;

// Resident CTAs per SM of kKernel launched with `threads` threads and `smem` bytes of dynamic
// shared memory; the first call per device raises the kernel's shared-memory limit to max_smem.
// Cached per (kernel, device, bucket): the bucket (ceil(E / 256) - 1) determines smem for a given
// kernel. NOTE: the kernel itself is the template argument, so that every kernel has its own
// cache (kernels with the same signature share a function-pointer type).
template <auto kKernel>
int resident_ctas(int threads, int device, int smem, int max_smem, int bucket) {
  constexpr int kMaxDevices = 64, kBuckets = 16;
  static std::atomic<int> configured[kMaxDevices] = {};
  static std::atomic<int> cache[kMaxDevices][kBuckets] = {};
  const bool cacheable = device >= 0 && device < kMaxDevices && bucket >= 0 && bucket < kBuckets;
  if (cacheable) {
    const int v = cache[device][bucket].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  if (!cacheable || configured[device].load(std::memory_order_acquire) == 0) {
    MOE_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    if (cacheable) configured[device].store(1, std::memory_order_release);
  }
  int blocks = 0;
  MOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kKernel, threads, smem));
  MOE_HOST_ASSERT(blocks >= 1, "grouped_gemm: the kernel does not fit on an SM (" + std::to_string(smem) +
                                   " bytes of shared memory)");
  if (cacheable) cache[device][bucket].store(blocks, std::memory_order_relaxed);
  return blocks;
}

inline int schedule_bucket(int num_experts) { return ceil_div_i(num_experts, 256) - 1; }

inline unsigned persistent_grid(int64_t max_tiles, int device, int ctas_per_sm) {
  const int64_t resident = int64_t{device_sm_count(device)} * ctas_per_sm;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(max_tiles, resident)));
}

}  // namespace moe_ext::kernels::gemm_detail
