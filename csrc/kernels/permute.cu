// permute / unpermute kernels (declared in permute.cuh).
//
// permute, for N = num_tokens * k slots in (token, slot) order, cut into tiles of whole
// kRankChunk-slot chunks (one block per tile):
//   1. count_kernel       per-tile histogram of expert ids (warp-aggregated with __match_any_sync;
//                         shared-memory counters up to kSmemHistExperts experts, global above)
//                         into counts[e][tile].
//   2. expert_scan_kernel one warp per expert: exclusive scan of counts[e][*] across tiles in
//                         place (the tile's first position inside expert e), and the kept count
//                         min(count, capacity).
//   3. offsets_kernel     one block: padded segment sizes, their exclusive scan in int64
//                         (offsets[E+1]), tokens_per_expert and the total. In the masked
//                         layout (max_rows) every segment is max_rows long and
//                         tokens_per_expert holds the kept rows.
//   4. rank_kernel        per tile, per chunk: a stable block radix sort of (expert, local slot)
//                         gives each slot its rank among the chunk's slots of the same expert in
//                         token order; position = tile base + rank; past capacity -> row -1,
//                         else row = offsets[e] + position. The tile bases advance by the
//                         chunk's run lengths, so chunks of one tile chain in order.
//   5. scatter_kernel     one warp per token: the row is read once (16-byte loads where the
//                         alignment allows) and stored to each of its k rows.
//   6. zero_rows_kernel   padding rows [offsets[e] + kept[e], offsets[e+1]) and the tail
//                         [offsets[E], out_rows) of a worst-case-sized output are zeroed.
// Small calls (num_tokens * k <= kSmallSlots, the decode case, and E <= kSmallMaxExperts) run
// steps 1-4 as one block instead (small_index_kernel): warps rank their slots in turns against
// shared-memory counters, then the block scans the segments; 3 launches in all instead of 6.
// Every position comes from counts and stable ranks, never from the order atomics happen to
// run in: the output is deterministic and equal to the CPU op's.
//
// unpermute: one warp per token; each lane owns a vector of hidden columns and gathers the k
// rows' vectors for it (loads issued 8 slots at a time before any is used), accumulating in slot
// order with __fmul_rn / __fadd_rn (no FMA contraction) exactly as the CPU op does.
// unpermute_backward: one warp per token writes grad_y for its k rows and reduces the k dot
// products; a byte per row marks the rows written, and a last kernel zeroes the others.
#include "kernels/device_info.cuh"
#include "kernels/exception.cuh"
#include "kernels/float_cast.cuh"
#include "kernels/permute.cuh"
#include "kernels/slot_rank.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda/functional>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace moe_ext::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Index stage: blocks of 256 threads; the rank kernel sorts 256 x 4 = 1024 slots at a time.
constexpr int kIndexThreads = 256;
constexpr int kRankItems = 4;
constexpr int64_t kRankChunk = kIndexThreads * kRankItems;
constexpr int64_t kMaxTiles = 1024;               // blocks of the count and rank kernels
constexpr int64_t kMaxCountEntries = int64_t{1} << 22;  // E * tiles int64 counters (32 MiB)
constexpr int64_t kSmemHistExperts = 12288;       // 48 KiB of int32 counters
constexpr int kScanPerLane = 8;                   // expert_scan_kernel: tiles per lane per round
constexpr int kOffsetsThreads = 512;

// Row stages: blocks of 8 warps, one token (or row) per warp.
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / kWarpSize;
constexpr int kScatterUnroll = 4;  // vectors loaded per lane before they are stored
constexpr int kSlotChunk = 8;      // unpermute: slots whose loads are in flight together
constexpr int kGatherMinBlocks = 2;  // unpermute kernels: <= 128 registers, >= 16 warps per SM

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

// Grid of row blocks for `items` warp-sized work items: enough blocks to fill the device, then
// the kernels stride.
unsigned row_grid(int64_t items) {
  const int64_t cap = int64_t{sm_count()} * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(items, kRowWarps), cap)));
}

// ---- permute: index stage -------------------------------------------------------------------------

struct Tiling {
  int64_t tile = kRankChunk;  // slots per tile (a multiple of kRankChunk)
  int64_t num_tiles = 0;
};

Tiling make_tiling(int64_t num_slots, int64_t num_experts) {
  Tiling t;
  if (num_slots <= 0) return t;
  const int64_t chunks = ceil_div(num_slots, kRankChunk);
  const int64_t max_tiles = std::max<int64_t>(1, std::min(kMaxTiles, kMaxCountEntries / num_experts));
  t.tile = ceil_div(chunks, max_tiles) * kRankChunk;
  t.num_tiles = ceil_div(num_slots, t.tile);
  return t;
}

// Workspace: counts[E * num_tiles], kept[E], offsets[E + 1], all int64, each 256-byte aligned.
struct Workspace {
  int64_t* counts;
  int64_t* kept;
  int64_t* offsets;
};

size_t workspace_bytes(int64_t num_experts, int64_t num_tiles) {
  return align_up(sizeof(int64_t) * num_experts * num_tiles) + align_up(sizeof(int64_t) * num_experts) +
         align_up(sizeof(int64_t) * (num_experts + 1));
}

Workspace carve(void* base, int64_t num_experts, int64_t num_tiles) {
  char* p = static_cast<char*>(base);
  Workspace w;
  w.counts = reinterpret_cast<int64_t*>(p);
  p += align_up(sizeof(int64_t) * num_experts * num_tiles);
  w.kept = reinterpret_cast<int64_t*>(p);
  p += align_up(sizeof(int64_t) * num_experts);
  w.offsets = reinterpret_cast<int64_t*>(p);
  return w;
}

// Expert id -> sort key: [0, E) stays, anything else (-1, out of range) becomes E ("no expert").
template <typename IdxT>
__device__ __forceinline__ uint32_t expert_key(IdxT e, int64_t num_experts) {
  const int64_t v = static_cast<int64_t>(e);
  return (v >= 0 && v < num_experts) ? static_cast<uint32_t>(v) : static_cast<uint32_t>(num_experts);
}

template <typename IdxT, bool kSmemHist>
__global__ void __launch_bounds__(kIndexThreads)
    count_kernel(const IdxT* __restrict__ idx, int64_t num_slots, int64_t num_experts, int64_t tile,
                 int64_t num_tiles, int64_t* __restrict__ counts, int64_t* __restrict__ invalid_ids) {
  extern __shared__ int32_t s_hist[];
  const int64_t b = blockIdx.x;
  const int64_t begin = b * tile, end = min(begin + tile, num_slots);
  const int lane = threadIdx.x % kWarpSize;
  if constexpr (kSmemHist) {
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) s_hist[e] = 0;
    __syncthreads();
  }
  // NOTE: the loop bound is uniform across the block, so every lane takes part in the match.
  for (int64_t s0 = begin; s0 < end; s0 += blockDim.x) {
    const int64_t s = s0 + threadIdx.x;
    const int64_t raw = s < end ? static_cast<int64_t>(idx[s]) : -1;
    const uint32_t key = expert_key(raw, num_experts);
    if (invalid_ids != nullptr) {  // exact mode: the caller reads this with the row count and raises
      const unsigned bad = __ballot_sync(kFullMask, raw < -1 || raw >= num_experts);
      if (bad != 0u && lane == 0)
        atomicAdd(reinterpret_cast<unsigned long long*>(invalid_ids), static_cast<unsigned long long>(__popc(bad)));
    }
    const unsigned peers = __match_any_sync(kFullMask, key);
    if (key < num_experts && lane == __ffs(peers) - 1) {
      const int n = __popc(peers);
      if constexpr (kSmemHist) {
        atomicAdd(&s_hist[key], n);
      } else {
        atomicAdd(reinterpret_cast<unsigned long long*>(&counts[key * num_tiles + b]),
                  static_cast<unsigned long long>(n));
      }
    }
  }
  if constexpr (kSmemHist) {
    __syncthreads();
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e * num_tiles + b] = s_hist[e];
  }
}

__global__ void __launch_bounds__(kIndexThreads)
    expert_scan_kernel(int64_t* __restrict__ counts, int64_t num_experts, int64_t num_tiles, int64_t capacity,
                       int64_t* __restrict__ kept) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (e >= num_experts) return;  // whole warps leave together
  int64_t* c = counts + e * num_tiles;
  int64_t running = 0;
  for (int64_t b0 = 0; b0 < num_tiles; b0 += kWarpSize * kScanPerLane) {
    int64_t v[kScanPerLane];
    int64_t sum = 0;
#pragma unroll
    for (int i = 0; i < kScanPerLane; ++i) {
      const int64_t b = b0 + lane * kScanPerLane + i;
      v[i] = b < num_tiles ? c[b] : 0;
      sum += v[i];
    }
    int64_t incl = sum;
#pragma unroll
    for (int off = 1; off < kWarpSize; off *= 2) {
      const int64_t up = __shfl_up_sync(kFullMask, incl, off);
      if (lane >= off) incl += up;
    }
    int64_t base = running + incl - sum;
#pragma unroll
    for (int i = 0; i < kScanPerLane; ++i) {
      const int64_t b = b0 + lane * kScanPerLane + i;
      if (b < num_tiles) c[b] = base;
      base += v[i];
    }
    running += __shfl_sync(kFullMask, incl, kWarpSize - 1);
  }
  if (lane == 0) kept[e] = capacity >= 0 ? min(running, capacity) : running;
}

// An expert's segment in the output: its kept rows rounded up to pad_to, or max_rows each in the
// masked layout; tokens_per_expert reports the segment, or the kept (valid) rows when masked.
__device__ __forceinline__ int64_t segment_rows(int64_t kept, int64_t pad_to, int64_t max_rows) {
  return max_rows >= 1 ? max_rows : (kept + pad_to - 1) / pad_to * pad_to;
}
__device__ __forceinline__ int32_t reported_rows(int64_t kept, int64_t seg, int64_t max_rows) {
  return static_cast<int32_t>(max_rows >= 1 ? kept : seg);
}

__global__ void __launch_bounds__(kOffsetsThreads)
    offsets_kernel(const int64_t* __restrict__ kept, int64_t num_experts, int64_t pad_to, int64_t max_rows,
                   int64_t* __restrict__ offsets, int32_t* __restrict__ tokens_per_expert,
                   int64_t* __restrict__ total_rows) {
  using Scan = cub::BlockScan<int64_t, kOffsetsThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int64_t carry = 0;
  for (int64_t e0 = 0; e0 < num_experts; e0 += kOffsetsThreads) {
    const int64_t e = e0 + threadIdx.x;
    const int64_t seg = e < num_experts ? segment_rows(kept[e], pad_to, max_rows) : 0;
    int64_t excl, aggregate;
    Scan(tmp).ExclusiveSum(seg, excl, aggregate);
    if (e < num_experts) {
      offsets[e] = carry + excl;
      tokens_per_expert[e] = reported_rows(kept[e], seg, max_rows);
    }
    carry += aggregate;
    __syncthreads();  // tmp is reused by the next chunk
  }
  if (threadIdx.x == 0) {
    offsets[num_experts] = carry;
    if (total_rows != nullptr) *total_rows = carry;
  }
}

template <typename IdxT>
__global__ void __launch_bounds__(kIndexThreads)
    rank_kernel(const IdxT* __restrict__ idx, int64_t num_slots, int64_t num_experts, int64_t capacity, int64_t tile,
                int64_t num_tiles, int end_bit, int64_t* __restrict__ bases, const int64_t* __restrict__ offsets,
                int64_t* __restrict__ row_map) {
  using Sort = cub::BlockRadixSort<uint32_t, kIndexThreads, kRankItems, int32_t>;
  using Scan = cub::BlockScan<int32_t, kIndexThreads>;
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ uint32_t s_keys[kRankChunk];

  const int64_t b = blockIdx.x;
  const int64_t begin = b * tile, end = min(begin + tile, num_slots);
  for (int64_t c0 = begin; c0 < end; c0 += kRankChunk) {
    // Blocked arrangement: thread i holds local slots i*kRankItems ..; the sort is stable in
    // that order, i.e. in token order.
    uint32_t keys[kRankItems];
    int32_t local[kRankItems];
#pragma unroll
    for (int i = 0; i < kRankItems; ++i) {
      local[i] = threadIdx.x * kRankItems + i;
      const int64_t s = c0 + local[i];
      keys[i] = s < end ? expert_key(idx[s], num_experts) : static_cast<uint32_t>(num_experts);
    }
    Sort(tmp.sort).Sort(keys, local, 0, end_bit);
#pragma unroll
    for (int i = 0; i < kRankItems; ++i) s_keys[threadIdx.x * kRankItems + i] = keys[i];
    __syncthreads();

    // Start of each run of equal keys (max-scan of the run heads); rank = position - start.
    int32_t start[kRankItems];
#pragma unroll
    for (int i = 0; i < kRankItems; ++i) {
      const int p = threadIdx.x * kRankItems + i;
      start[i] = (p == 0 || s_keys[p - 1] != keys[i]) ? p : 0;
    }
    Scan(tmp.scan).InclusiveScan(start, start, cuda::maximum<>{});
#pragma unroll
    for (int i = 0; i < kRankItems; ++i) {
      const int p = threadIdx.x * kRankItems + i;
      const int64_t s = c0 + local[i];
      if (s >= end) continue;
      int64_t row = -1;
      if (keys[i] < num_experts) {
        const int64_t pos = bases[keys[i] * num_tiles + b] + (p - start[i]);
        if (capacity < 0 || pos < capacity) row = offsets[keys[i]] + pos;
      }
      row_map[s] = row;
    }
    __syncthreads();  // every base read before any advances; tmp free again

    // The last slot of each run advances its expert's base for the next chunk of this tile.
#pragma unroll
    for (int i = 0; i < kRankItems; ++i) {
      const int p = threadIdx.x * kRankItems + i;
      if (keys[i] < num_experts && (p == kRankChunk - 1 || s_keys[p + 1] != keys[i]))
        bases[keys[i] * num_tiles + b] += p - start[i] + 1;
    }
    __syncthreads();  // advanced bases visible to the block; s_keys free
  }
}

// Steps 1-4 for a small call in one block of kSmallThreads: the rank of every slot among its
// expert's slots in slot order (rank_in_turn), kept counts, segments and their int64 offsets, and
// row_map, all as the multi-kernel path computes them.
constexpr int kSmallThreads = 512;  // (1024 threads would cap registers at 64: the int64 scan spilled)
constexpr int64_t kSmallSlots = 2048;
constexpr int64_t kSmallMaxExperts = 10240;  // int32 counters: 40 KiB of shared memory

template <typename IdxT>
__global__ void __launch_bounds__(kSmallThreads)
    small_index_kernel(const IdxT* __restrict__ idx, int64_t num_slots, int64_t num_experts, int64_t capacity,
                       int64_t pad_to, int64_t max_rows, int64_t* __restrict__ kept, int64_t* __restrict__ offsets,
                       int32_t* __restrict__ tokens_per_expert, int64_t* __restrict__ total_rows,
                       int64_t* __restrict__ invalid_ids, int64_t* __restrict__ row_map) {
  extern __shared__ int s_count[];  // [num_experts]
  __shared__ int s_invalid;
  using Scan = cub::BlockScan<int64_t, kSmallThreads>;
  __shared__ typename Scan::TempStorage tmp;
  for (int64_t e = threadIdx.x; e < num_experts; e += kSmallThreads) s_count[e] = 0;
  if (threadIdx.x == 0) s_invalid = 0;
  __syncthreads();

  for (int64_t base = 0; base < num_slots; base += kSmallThreads) {
    const int64_t s = base + threadIdx.x;
    const int64_t raw = s < num_slots ? static_cast<int64_t>(idx[s]) : -1;
    const int key = (raw >= 0 && raw < num_experts) ? static_cast<int>(raw) : -1;
    if (raw < -1 || raw >= num_experts) atomicAdd(&s_invalid, 1);
    const int r = rank_block_round<kSmallThreads>(key, s_count);
    if (s < num_slots) row_map[s] = (r >= 0 && (capacity < 0 || r < capacity)) ? r : -1;  // the offset comes below
  }
  __syncthreads();

  int64_t carry = 0;
  for (int64_t e0 = 0; e0 < num_experts; e0 += kSmallThreads) {
    const int64_t e = e0 + threadIdx.x;
    int64_t k_e = 0, seg = 0;
    if (e < num_experts) {
      k_e = capacity >= 0 ? min(static_cast<int64_t>(s_count[e]), capacity) : s_count[e];
      seg = segment_rows(k_e, pad_to, max_rows);
    }
    int64_t excl, aggregate;
    Scan(tmp).ExclusiveSum(seg, excl, aggregate);
    if (e < num_experts) {
      kept[e] = k_e;
      offsets[e] = carry + excl;
      tokens_per_expert[e] = reported_rows(k_e, seg, max_rows);
    }
    carry += aggregate;
    __syncthreads();  // tmp is reused by the next chunk
  }
  if (threadIdx.x == 0) {
    offsets[num_experts] = carry;
    if (total_rows != nullptr) *total_rows = carry;
    if (invalid_ids != nullptr) *invalid_ids = s_invalid;
  }
  __syncthreads();  // NOTE: the offsets written above are read by other threads of the block
  for (int64_t s = threadIdx.x; s < num_slots; s += kSmallThreads) {
    const int64_t r = row_map[s];
    if (r >= 0) row_map[s] = r + offsets[static_cast<int64_t>(idx[s])];
  }
}

// ---- permute: row stage --------------------------------------------------------------------------

template <int kBytes>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<4> {
  using type = unsigned int;
};
template <>
struct RawVec<2> {
  using type = unsigned short;
};
template <>
struct RawVec<1> {
  using type = unsigned char;
};

// Largest access width in {16, 8, 4, 2, 1} bytes dividing every value of `parts`.
int vec_bytes(std::initializer_list<uint64_t> parts) {
  uint64_t all = 16;
  for (uint64_t v : parts) all |= v;
  return static_cast<int>(all & (~all + 1));  // lowest set bit, at most 16
}

template <typename V>
__global__ void __launch_bounds__(kRowThreads)
    scatter_kernel(const char* __restrict__ x, int64_t x_row_stride, int64_t num_tokens, int64_t k,
                   int64_t row_vecs, const int64_t* __restrict__ row_map, int64_t out_rows,
                   char* __restrict__ x_perm) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  const int64_t row_bytes = row_vecs * static_cast<int64_t>(sizeof(V));
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize; t < num_tokens;
       t += warps) {
    const V* src = reinterpret_cast<const V*>(x + t * x_row_stride);
    for (int64_t j0 = 0; j0 < k; j0 += kWarpSize) {
      // Lane j holds the row of slot j0 + j; broadcast below.
      int64_t my_row = -1;
      if (j0 + lane < k) {
        const int64_t r = row_map[t * k + j0 + lane];
        my_row = (r >= 0 && r < out_rows) ? r : -1;
      }
      const int nj = static_cast<int>(min(static_cast<int64_t>(kWarpSize), k - j0));
      // NOTE: the loop starts at 0 for every lane (not at `lane`) so that its trip count is the
      // same across the warp: the full-mask __shfl_sync below must be reached by all 32 lanes.
      // Starting at `lane` left lanes >= row_vecs out of it for narrow rows (row_vecs < 32),
      // which is undefined behaviour (hang or rows broadcast from another token).
      for (int64_t v0 = 0; v0 < row_vecs; v0 += kWarpSize * kScatterUnroll) {
        V buf[kScatterUnroll];
#pragma unroll
        for (int u = 0; u < kScatterUnroll; ++u) {
          const int64_t v = v0 + lane + u * kWarpSize;
          if (v < row_vecs) buf[u] = __ldg(src + v);
        }
        for (int j = 0; j < nj; ++j) {
          const int64_t r = __shfl_sync(kFullMask, my_row, j);
          if (r < 0) continue;
          V* dst = reinterpret_cast<V*>(x_perm + r * row_bytes);
#pragma unroll
          for (int u = 0; u < kScatterUnroll; ++u) {
            const int64_t v = v0 + lane + u * kWarpSize;
            if (v < row_vecs) dst[v] = buf[u];
          }
        }
      }
    }
  }
}

template <typename V>
__device__ __forceinline__ void zero_row(char* __restrict__ base, int64_t row, int64_t row_vecs, int lane) {
  V* dst = reinterpret_cast<V*>(base + row * row_vecs * static_cast<int64_t>(sizeof(V)));
  const V zero{};
  for (int64_t v = lane; v < row_vecs; v += kWarpSize) dst[v] = zero;
}

template <typename V>
__global__ void __launch_bounds__(kRowThreads)
    zero_rows_kernel(const int64_t* __restrict__ offsets, const int64_t* __restrict__ kept, int64_t num_experts,
                     bool padding, int64_t out_rows, int64_t row_vecs, char* __restrict__ x_perm) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (padding) {
    for (int64_t e = blockIdx.x; e < num_experts; e += gridDim.x) {
      const int64_t hi = min(offsets[e + 1], out_rows);
      for (int64_t r = offsets[e] + kept[e] + warp; r < hi; r += kRowWarps) zero_row<V>(x_perm, r, row_vecs, lane);
    }
  }
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t r = offsets[num_experts] + static_cast<int64_t>(blockIdx.x) * kRowWarps + warp; r < out_rows;
       r += warps)
    zero_row<V>(x_perm, r, row_vecs, lane);
}

template <int kBytes>
void launch_rows(const PermuteParams& p, const Workspace& ws, cudaStream_t stream) {
  using V = typename RawVec<kBytes>::type;
  const int64_t row_vecs = p.row_bytes / kBytes;
  if (p.num_tokens > 0) {
    scatter_kernel<V><<<row_grid(p.num_tokens), kRowThreads, 0, stream>>>(
        static_cast<const char*>(p.x), p.x_row_stride, p.num_tokens, p.k, row_vecs, p.row_map, p.out_rows,
        static_cast<char*>(p.x_perm));
    MOE_CUDA_CHECK(cudaGetLastError());
  }
  // NOTE: launched even when nothing may need zeroing: the tail [total, out_rows) of a
  // worst-case-sized output is only known on the device.
  if (p.out_rows > 0) {
    const unsigned grid = static_cast<unsigned>(std::max<int64_t>(
        1, std::min<int64_t>(int64_t{sm_count()} * 8, std::max(p.num_experts, ceil_div(p.out_rows, kRowWarps)))));
    zero_rows_kernel<V><<<grid, kRowThreads, 0, stream>>>(ws.offsets, ws.kept, p.num_experts,
                                                          p.pad_to > 1 || p.max_rows >= 1, p.out_rows, row_vecs,
                                                          static_cast<char*>(p.x_perm));
    MOE_CUDA_CHECK(cudaGetLastError());
  }
}

void check_permute_params(const PermuteParams& p) {
  MOE_HOST_ASSERT(p.num_tokens >= 0 && p.k >= 0, "permute: negative num_tokens or k");
  MOE_HOST_ASSERT(p.num_experts >= 1 && p.num_experts < (int64_t{1} << 31),
                  "permute: num_experts must be in [1, 2^31)");
  MOE_HOST_ASSERT(p.pad_to >= 1, "permute: pad_to must be >= 1");
  MOE_HOST_ASSERT(p.capacity >= -1, "permute: capacity must be -1 (none) or >= 0");
  MOE_HOST_ASSERT(p.max_rows == -1 || (p.max_rows >= 1 && p.pad_to == 1),
                  "permute: max_rows must be -1 (contiguous layout) or >= 1 with pad_to 1");
  MOE_HOST_ASSERT(p.workspace != nullptr, "permute: workspace is null");
  MOE_HOST_ASSERT(p.num_tokens * p.k == 0 || (p.idx != nullptr && p.row_map != nullptr),
                  "permute: idx and row_map are required");
  MOE_HOST_ASSERT(p.tokens_per_expert != nullptr, "permute: tokens_per_expert is null");
}

// The capacity the index kernels apply: the masked layout's segments hold max_rows slots at most.
int64_t kept_limit(const PermuteParams& p) {
  if (p.max_rows < 1) return p.capacity;
  return p.capacity < 0 ? p.max_rows : std::min(p.capacity, p.max_rows);
}

bool small_index_disabled() {
  static const bool disabled = [] {
    const char* env = std::getenv("MOE_EXT_PERMUTE_SMALL_INDEX");
    return env != nullptr && std::strcmp(env, "0") == 0;
  }();
  return disabled;
}

bool small_index(const PermuteParams& p) {
  return p.small_index && !small_index_disabled() && p.num_tokens * p.k <= kSmallSlots &&
         p.num_experts <= kSmallMaxExperts;
}

template <typename IdxT>
void route_impl(const PermuteParams& p, cudaStream_t stream) {
  const int64_t num_slots = p.num_tokens * p.k, E = p.num_experts;
  const Tiling tiling = make_tiling(num_slots, E);
  const Workspace ws = carve(p.workspace, E, tiling.num_tiles);
  if (small_index(p)) {
    small_index_kernel<IdxT><<<1, kSmallThreads, E * sizeof(int), stream>>>(
        static_cast<const IdxT*>(p.idx), num_slots, E, kept_limit(p), p.pad_to, p.max_rows, ws.kept, ws.offsets,
        p.tokens_per_expert, p.total_rows, p.invalid_ids, p.row_map);
    MOE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  if (p.invalid_ids != nullptr) MOE_CUDA_CHECK(cudaMemsetAsync(p.invalid_ids, 0, sizeof(int64_t), stream));
  if (tiling.num_tiles > 0) {
    const IdxT* idx = static_cast<const IdxT*>(p.idx);
    if (E <= kSmemHistExperts) {
      count_kernel<IdxT, true><<<static_cast<unsigned>(tiling.num_tiles), kIndexThreads, E * sizeof(int32_t), stream>>>(
          idx, num_slots, E, tiling.tile, tiling.num_tiles, ws.counts, p.invalid_ids);
    } else {
      MOE_CUDA_CHECK(cudaMemsetAsync(ws.counts, 0, sizeof(int64_t) * E * tiling.num_tiles, stream));
      count_kernel<IdxT, false><<<static_cast<unsigned>(tiling.num_tiles), kIndexThreads, 0, stream>>>(
          idx, num_slots, E, tiling.tile, tiling.num_tiles, ws.counts, p.invalid_ids);
    }
    MOE_CUDA_CHECK(cudaGetLastError());
  }
  const int64_t scan_blocks = ceil_div(E * kWarpSize, kIndexThreads);
  expert_scan_kernel<<<static_cast<unsigned>(scan_blocks), kIndexThreads, 0, stream>>>(
      ws.counts, E, tiling.num_tiles, kept_limit(p), ws.kept);
  MOE_CUDA_CHECK(cudaGetLastError());
  offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(ws.kept, E, p.pad_to, p.max_rows, ws.offsets,
                                                    p.tokens_per_expert, p.total_rows);
  MOE_CUDA_CHECK(cudaGetLastError());
}

template <typename IdxT>
void rank_impl(const PermuteParams& p, cudaStream_t stream) {
  const int64_t num_slots = p.num_tokens * p.k, E = p.num_experts;
  const Tiling tiling = make_tiling(num_slots, E);
  if (tiling.num_tiles == 0 || small_index(p)) return;  // (the small kernel wrote row_map whole)
  const Workspace ws = carve(p.workspace, E, tiling.num_tiles);
  int end_bit = 0;  // keys are in [0, E]: enough bits for E itself
  while ((int64_t{1} << end_bit) <= E) ++end_bit;
  rank_kernel<IdxT><<<static_cast<unsigned>(tiling.num_tiles), kIndexThreads, 0, stream>>>(
      static_cast<const IdxT*>(p.idx), num_slots, E, kept_limit(p), tiling.tile, tiling.num_tiles, end_bit, ws.counts,
      ws.offsets, p.row_map);
  MOE_CUDA_CHECK(cudaGetLastError());
}

// ---- unpermute -----------------------------------------------------------------------------------

template <PermuteFloat kType>
struct FloatTraits;
template <>
struct FloatTraits<PermuteFloat::kFloat32> {
  using T = float;
  using Acc = float;
};
template <>
struct FloatTraits<PermuteFloat::kFloat64> {
  using T = double;
  using Acc = double;
};
template <>
struct FloatTraits<PermuteFloat::kFloat16> {
  using T = __half;
  using Acc = float;
};
template <>
struct FloatTraits<PermuteFloat::kBFloat16> {
  using T = __nv_bfloat16;
  using Acc = float;
};

// kVec elements of T moved as one access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  using Raw = typename RawVec<sizeof(T) * kVec>::type;
  static_assert(sizeof(Raw) == sizeof(Pack<T, kVec>), "one access per pack");
  // NOTE: memcpy, not a store through a Raw lvalue into the pack: reading that back as T breaks
  // strict aliasing (the host-compiled emulation may reorder it); on the GPU it is register moves.
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(p));
  Pack<T, kVec> pack;
  memcpy(&pack, &raw, sizeof(pack));
  return pack;
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& pack) {
  *reinterpret_cast<Pack<T, kVec>*>(p) = pack;
}

// The rows (and weights) of slots j0 .. j0 + kSlotChunk - 1 of token t; -1 for slots past k, not
// routed, or out of range.
template <typename Acc, bool kWeights>
__device__ __forceinline__ void load_slots(const int64_t* __restrict__ row_map, const Acc* __restrict__ w, int64_t t,
                                           int64_t k, int64_t j0, int64_t y_rows, int64_t (&rows)[kSlotChunk],
                                           Acc (&ws)[kSlotChunk]) {
#pragma unroll
  for (int jj = 0; jj < kSlotChunk; ++jj) {
    rows[jj] = -1;
    ws[jj] = Acc(0);
    const int64_t j = j0 + jj;
    if (j < k) {
      const int64_t r = __ldg(row_map + t * k + j);
      if (r >= 0 && r < y_rows) rows[jj] = r;
      if constexpr (kWeights) ws[jj] = __ldg(w + t * k + j);
    }
  }
}

// kHoist: k <= kSlotChunk, so the token's rows and weights are loaded once, outside the column
// loop; otherwise they are re-read (from L1) per chunk of slots. kU (hoisted only, k <= kSlotChunk
// / kU): each lane works on kU column vectors at once, so that kU * k loads are in flight, not k.
// NOTE: at 16 warps per SM (the register budget) k = 2 kept only ~2 MB in flight on an H100:
// unpermute at T=16384 H=4096 k=2 ran at 1.29 TB/s (44%), against 2.73 TB/s (93%) at k = 8.
template <typename T, int kVec, bool kWeights, bool kHoist, int kU>
__global__ void __launch_bounds__(kRowThreads, kGatherMinBlocks)
    unpermute_kernel(const T* __restrict__ y, int64_t y_rows, int64_t y_row_stride,
                     const int64_t* __restrict__ row_map,
                     const acc_type<T>* __restrict__ w,
                     T* __restrict__ out, int64_t num_tokens, int64_t k, int64_t hidden, const int* poison_if) {
  using Acc = acc_type<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  const int64_t num_vecs = hidden / kVec;
  const bool poison = poison_if != nullptr && *reinterpret_cast<const volatile int*>(poison_if) != 0;
  const Acc nan = static_cast<Acc>(__int_as_float(0x7fc00000));
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize; t < num_tokens;
       t += warps) {
    int64_t rows[kSlotChunk];
    Acc ws[kSlotChunk];
    T* out_row = out + t * hidden;
    if constexpr (kHoist) load_slots<Acc, kWeights>(row_map, w, t, k, 0, y_rows, rows, ws);
    constexpr int kK = kSlotChunk / kU;  // slots per chunk (k <= kK when kU > 1: one chunk)
    for (int64_t v0 = lane; v0 < num_vecs; v0 += int64_t{kWarpSize} * kU) {
      Acc acc[kU][kVec];
#pragma unroll
      for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[u][e] = Acc(0);
      for (int64_t j0 = 0; j0 < k; j0 += kK) {
        if constexpr (!kHoist) load_slots<Acc, kWeights>(row_map, w, t, k, j0, y_rows, rows, ws);
        Pack<T, kVec> buf[kU][kK];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int64_t v = v0 + u * kWarpSize;
#pragma unroll
          for (int jj = 0; jj < kK; ++jj)
            if (v < num_vecs && rows[jj] >= 0) buf[u][jj] = load_pack<T, kVec>(y + rows[jj] * y_row_stride + v * kVec);
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (v0 + u * kWarpSize >= num_vecs) break;
#pragma unroll
          for (int jj = 0; jj < kK; ++jj) {  // NOTE: slot order, as the CPU op: the same bits for any kU
            if (rows[jj] < 0) continue;
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              const Acc val = to_acc(buf[u][jj].v[e]);
              acc[u][e] = add_rn(acc[u][e], kWeights ? mul_rn(ws[jj], val) : val);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t v = v0 + u * kWarpSize;
        if (v >= num_vecs) break;
        Pack<T, kVec> o;
#pragma unroll
        for (int e = 0; e < kVec; ++e) o.v[e] = cast_out<T>(poison ? nan : acc[u][e]);
        store_pack<T, kVec>(out_row + v * kVec, o);
      }
    }
  }
}

// kU: column vectors a lane works on at once (k <= kSlotChunk / kU), as unpermute_kernel; the dot
// products still add the lane's vectors in increasing order, so every kU gives the same bits.
template <typename T, int kVec, bool kWeights, int kU>
__global__ void __launch_bounds__(kRowThreads, kGatherMinBlocks)
    unpermute_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ y, int64_t y_rows,
                              int64_t y_row_stride, const int64_t* __restrict__ row_map,
                              const acc_type<T>* __restrict__ w,
                              T* __restrict__ grad_y, double* __restrict__ grad_w, uint8_t* __restrict__ touched,
                              int64_t num_tokens, int64_t k, int64_t hidden) {
  using Acc = acc_type<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  const int64_t num_vecs = hidden / kVec;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize; t < num_tokens;
       t += warps) {
    const T* g_row = grad_out + t * hidden;
    for (int64_t j0 = 0; j0 < k; j0 += kSlotChunk) {
      int64_t rows[kSlotChunk];
      Acc ws[kSlotChunk];
      load_slots<Acc, kWeights>(row_map, w, t, k, j0, y_rows, rows, ws);
      double dot[kSlotChunk];
#pragma unroll
      for (int jj = 0; jj < kSlotChunk; ++jj) dot[jj] = 0.0;
      constexpr int kK = kSlotChunk / kU;  // slots per chunk (k <= kK when kU > 1)
      for (int64_t v0 = lane; v0 < num_vecs; v0 += int64_t{kWarpSize} * kU) {
        Pack<T, kVec> g[kU];
        Pack<T, kVec> ybuf[kU][kK];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int64_t v = v0 + u * kWarpSize;
          if (v >= num_vecs) continue;
          g[u] = load_pack<T, kVec>(g_row + v * kVec);
          if constexpr (kWeights) {
#pragma unroll
            for (int jj = 0; jj < kK; ++jj)
              if (rows[jj] >= 0) ybuf[u][jj] = load_pack<T, kVec>(y + rows[jj] * y_row_stride + v * kVec);
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int64_t v = v0 + u * kWarpSize;
          if (v >= num_vecs) break;
#pragma unroll
          for (int jj = 0; jj < kK; ++jj) {
            if (rows[jj] < 0) continue;
            T* dst = grad_y + rows[jj] * hidden + v * kVec;
            if constexpr (kWeights) {
              Pack<T, kVec> o;
              // The dot in float64 throughout, as permute.cuh promises, in the order the CPU op adds
              // it (products of float32 values are exact in float64; float64 products are rounded
              // on their own: no FMA, as on the CPU).
              double part = 0.0;
#pragma unroll
              for (int e = 0; e < kVec; ++e) {
                const Acc gv = to_acc(g[u].v[e]);
                o.v[e] = cast_out<T>(mul_rn(ws[jj], gv));
                part = add_rn(part, mul_rn(static_cast<double>(to_acc(ybuf[u][jj].v[e])), static_cast<double>(gv)));
              }
              dot[jj] = add_rn(dot[jj], part);
              store_pack<T, kVec>(dst, o);
            } else {
              store_pack<T, kVec>(dst, g[u]);
            }
          }
        }
      }
#pragma unroll
      for (int jj = 0; jj < kSlotChunk; ++jj) {
        if (j0 + jj >= k) break;
        if constexpr (kWeights) {
          double d = dot[jj];
#pragma unroll
          for (int off = kWarpSize / 2; off > 0; off /= 2) d += __shfl_xor_sync(kFullMask, d, off);
          if (lane == 0 && grad_w != nullptr) grad_w[t * k + j0 + jj] = rows[jj] >= 0 ? d : 0.0;
        }
        if (lane == 0 && rows[jj] >= 0) touched[rows[jj]] = 1;
      }
    }
  }
}

template <typename V>
__global__ void __launch_bounds__(kRowThreads)
    zero_untouched_kernel(const uint8_t* __restrict__ touched, int64_t num_rows, int64_t row_vecs,
                          char* __restrict__ base) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize; r < num_rows; r += warps)
    if (!touched[r]) zero_row<V>(base, r, row_vecs, lane);
}

// Column vectors a lane of the unpermute kernels works on at once: about kSlotChunk loads in
// flight whatever k (at most 4 vectors: the accumulators cost registers).
inline int lane_vectors(int64_t k) { return k <= 2 ? 4 : (k <= 4 ? 2 : 1); }

// Calls f(vec, with_weights, u) with compile-time constants: vec = kWide (16-byte accesses) or 1,
// with_weights, and u = lanes' column vectors (4, 2 or 1): the template arguments of the unpermute
// kernels.
template <int kWide, typename F>
void with_row_kernel_params(bool wide, bool weights, int vectors, F&& f) {
  const auto with_u = [&](auto vec, auto w) {
    switch (vectors) {
      case 4: return f(vec, w, std::integral_constant<int, 4>{});
      case 2: return f(vec, w, std::integral_constant<int, 2>{});
      default: return f(vec, w, std::integral_constant<int, 1>{});
    }
  };
  const auto with_w = [&](auto vec) {
    return weights ? with_u(vec, std::true_type{}) : with_u(vec, std::false_type{});
  };
  return wide ? with_w(std::integral_constant<int, kWide>{}) : with_w(std::integral_constant<int, 1>{});
}

template <PermuteFloat kType>
void unpermute_impl(const UnpermuteParams& p, cudaStream_t stream) {
  using T = typename FloatTraits<kType>::T;
  using Acc = typename FloatTraits<kType>::Acc;
  constexpr int kWide = 16 / static_cast<int>(sizeof(T));
  const bool wide = vec_bytes({static_cast<uint64_t>(p.hidden * sizeof(T)),
                               static_cast<uint64_t>(p.y_rows > 1 ? p.y_row_stride * sizeof(T) : 0),
                               reinterpret_cast<uint64_t>(p.y), reinterpret_cast<uint64_t>(p.out)}) == 16;
  const T* y = static_cast<const T*>(p.y);
  const Acc* w = static_cast<const Acc*>(p.weights);
  T* out = static_cast<T*>(p.out);
  const unsigned grid = row_grid(p.num_tokens);
  const bool hoist = p.k <= kSlotChunk;
  const auto launch = [&](auto vec, auto with_weights, auto u) {
    constexpr int V = decltype(vec)::value, U = decltype(u)::value;
    constexpr bool W = decltype(with_weights)::value;
    if (hoist)
      unpermute_kernel<T, V, W, true, U><<<grid, kRowThreads, 0, stream>>>(
          y, p.y_rows, p.y_row_stride, p.row_map, w, out, p.num_tokens, p.k, p.hidden, p.poison_if);
    else  // k > kSlotChunk: U is 1 there
      unpermute_kernel<T, V, W, false, 1><<<grid, kRowThreads, 0, stream>>>(
          y, p.y_rows, p.y_row_stride, p.row_map, w, out, p.num_tokens, p.k, p.hidden, p.poison_if);
  };
  with_row_kernel_params<kWide>(wide, p.weights != nullptr, lane_vectors(p.k), launch);
  MOE_CUDA_CHECK(cudaGetLastError());
}

template <PermuteFloat kType>
void unpermute_backward_impl(const UnpermuteBackwardParams& p, cudaStream_t stream) {
  using T = typename FloatTraits<kType>::T;
  using Acc = typename FloatTraits<kType>::Acc;
  constexpr int kWide = 16 / static_cast<int>(sizeof(T));
  const int64_t row_bytes = p.hidden * static_cast<int64_t>(sizeof(T));
  const bool wide = vec_bytes({static_cast<uint64_t>(row_bytes),
                               static_cast<uint64_t>(p.y_rows > 1 ? p.y_row_stride * sizeof(T) : 0),
                               reinterpret_cast<uint64_t>(p.y), reinterpret_cast<uint64_t>(p.grad_out),
                               reinterpret_cast<uint64_t>(p.grad_y)}) == 16;
  const T* g = static_cast<const T*>(p.grad_out);
  const T* y = static_cast<const T*>(p.y);
  const Acc* w = static_cast<const Acc*>(p.weights);
  T* grad_y = static_cast<T*>(p.grad_y);
  uint8_t* touched = static_cast<uint8_t*>(p.workspace);
  MOE_CUDA_CHECK(cudaMemsetAsync(touched, 0, static_cast<size_t>(p.y_rows), stream));
  if (p.num_tokens > 0) {
    const unsigned grid = row_grid(p.num_tokens);
    const auto launch = [&](auto vec, auto with_weights, auto u) {
      constexpr int V = decltype(vec)::value, U = decltype(u)::value;
      constexpr bool W = decltype(with_weights)::value;
      unpermute_backward_kernel<T, V, W, U><<<grid, kRowThreads, 0, stream>>>(
          g, y, p.y_rows, p.y_row_stride, p.row_map, w, grad_y, p.grad_weights, touched, p.num_tokens, p.k, p.hidden);
    };
    with_row_kernel_params<kWide>(wide, p.weights != nullptr, lane_vectors(p.k), launch);
    MOE_CUDA_CHECK(cudaGetLastError());
  }
  const unsigned zgrid = row_grid(p.y_rows);
  char* base = static_cast<char*>(p.grad_y);
  if (wide) {
    zero_untouched_kernel<uint4><<<zgrid, kRowThreads, 0, stream>>>(touched, p.y_rows, row_bytes / 16, base);
  } else {
    using Raw = typename RawVec<sizeof(T)>::type;
    zero_untouched_kernel<Raw><<<zgrid, kRowThreads, 0, stream>>>(touched, p.y_rows, p.hidden, base);
  }
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------------

size_t permute_workspace_bytes(int64_t num_tokens, int64_t k, int64_t num_experts) {
  MOE_HOST_ASSERT(num_tokens >= 0 && k >= 0 && num_experts >= 1, "permute_workspace_bytes: bad sizes");
  return workspace_bytes(num_experts, make_tiling(num_tokens * k, num_experts).num_tiles);
}

void permute_route(const PermuteParams& p, cudaStream_t stream) {
  check_permute_params(p);
  if (p.idx_is_int64) route_impl<int64_t>(p, stream);
  else route_impl<int32_t>(p, stream);
}

void permute_scatter(const PermuteParams& p, cudaStream_t stream) {
  check_permute_params(p);
  MOE_HOST_ASSERT(p.row_bytes >= 0 && p.out_rows >= 0, "permute: negative row_bytes or out_rows");
  MOE_HOST_ASSERT(p.row_bytes == 0 || p.out_rows == 0 || p.x_perm != nullptr, "permute: x_perm is null");
  MOE_HOST_ASSERT(p.row_bytes == 0 || p.num_tokens == 0 || p.x != nullptr, "permute: x is null");
  MOE_HOST_ASSERT(p.max_rows < 1 || p.out_rows == p.num_experts * p.max_rows,
                  "permute: the masked layout has num_experts * max_rows rows");
  if (p.idx_is_int64) rank_impl<int64_t>(p, stream);
  else rank_impl<int32_t>(p, stream);
  if (p.row_bytes == 0) return;
  const Workspace ws = carve(p.workspace, p.num_experts, make_tiling(p.num_tokens * p.k, p.num_experts).num_tiles);
  const int bytes = vec_bytes({static_cast<uint64_t>(p.row_bytes),
                               static_cast<uint64_t>(p.num_tokens > 1 ? p.x_row_stride : 0),
                               reinterpret_cast<uint64_t>(p.x), reinterpret_cast<uint64_t>(p.x_perm)});
  switch (bytes) {
    case 16: launch_rows<16>(p, ws, stream); break;
    case 8: launch_rows<8>(p, ws, stream); break;
    case 4: launch_rows<4>(p, ws, stream); break;
    case 2: launch_rows<2>(p, ws, stream); break;
    default: launch_rows<1>(p, ws, stream); break;
  }
}

void unpermute(const UnpermuteParams& p, cudaStream_t stream) {
  MOE_HOST_ASSERT(p.num_tokens >= 0 && p.k >= 0 && p.hidden >= 0 && p.y_rows >= 0, "unpermute: negative size");
  if (p.num_tokens == 0 || p.hidden == 0) return;
  MOE_HOST_ASSERT(p.out != nullptr && (p.k == 0 || p.row_map != nullptr), "unpermute: null pointer");
  switch (p.dtype) {
    case PermuteFloat::kFloat32: unpermute_impl<PermuteFloat::kFloat32>(p, stream); break;
    case PermuteFloat::kFloat64: unpermute_impl<PermuteFloat::kFloat64>(p, stream); break;
    case PermuteFloat::kFloat16: unpermute_impl<PermuteFloat::kFloat16>(p, stream); break;
    case PermuteFloat::kBFloat16: unpermute_impl<PermuteFloat::kBFloat16>(p, stream); break;
    default: MOE_HOST_ASSERT(false, "unpermute: unsupported element type");
  }
}

size_t unpermute_backward_workspace_bytes(int64_t y_rows) {
  MOE_HOST_ASSERT(y_rows >= 0, "unpermute_backward_workspace_bytes: negative rows");
  return align_up(static_cast<size_t>(std::max<int64_t>(y_rows, 1)));
}

void unpermute_backward(const UnpermuteBackwardParams& p, cudaStream_t stream) {
  MOE_HOST_ASSERT(p.num_tokens >= 0 && p.k >= 0 && p.hidden >= 0 && p.y_rows >= 0,
                  "unpermute_backward: negative size");
  MOE_HOST_ASSERT(p.grad_weights == nullptr || p.weights != nullptr, "unpermute_backward: grad_weights needs weights");
  if (p.hidden == 0) {
    // Rows of zero bytes: only the weights' gradient (a dot over nothing) remains.
    if (p.grad_weights != nullptr && p.num_tokens * p.k > 0)
      MOE_CUDA_CHECK(cudaMemsetAsync(p.grad_weights, 0, sizeof(double) * p.num_tokens * p.k, stream));
    return;
  }
  if (p.y_rows == 0 && p.num_tokens == 0) return;
  MOE_HOST_ASSERT(p.workspace != nullptr, "unpermute_backward: workspace is null");
  switch (p.dtype) {
    case PermuteFloat::kFloat32: unpermute_backward_impl<PermuteFloat::kFloat32>(p, stream); break;
    case PermuteFloat::kFloat64: unpermute_backward_impl<PermuteFloat::kFloat64>(p, stream); break;
    case PermuteFloat::kFloat16: unpermute_backward_impl<PermuteFloat::kFloat16>(p, stream); break;
    case PermuteFloat::kBFloat16: unpermute_backward_impl<PermuteFloat::kBFloat16>(p, stream); break;
    default: MOE_HOST_ASSERT(false, "unpermute_backward: unsupported element type");
  }
}

}  // namespace moe_ext::kernels
