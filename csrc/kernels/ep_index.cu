// The local index of a small dispatch in one launch (ep_small_index, ep.cuh).
//
// A decode dispatch (128 tokens x k = 8 slots) is launch-bound: the general local index is
// ep_destination_keys plus two permute index passes (route + scatter, several kernels each),
// about nine launches before the count exchange. For up to kEpSmallIndexSlots slots one block
// computes the same four outputs:
//   expert_rows[s] = the row of slot s in the expert-major order of this rank's slots (the
//                    expert's offset + the slot's rank among that expert's slots in slot order),
//                    -1 for -1 or out-of-range ids;  hist[e] = slots of expert e;
//   dest_rows[s]   = the same over destination ranks, for the first slot of each token on each
//                    destination (-1 for the others);  tok[d] = tokens sent to d.
// Ranks must be stable (slot order), so the block's warps take turns: each warp ranks its 32
// slots with __match_any_sync against the running counters in shared memory, then advances
// them; 32 turns per 1024 slots.
#include "kernels/ep.cuh"
#include "kernels/exception.cuh"
#include "kernels/slot_rank.cuh"

#include <cub/block/block_scan.cuh>

#include <cstdlib>
#include <cstring>

namespace moe_ext::kernels {

namespace {

constexpr int kThreads = 1024;
constexpr int kWarp = 32;
// Dynamic shared memory for the counters: under 48 KiB with room for the scan's static storage.
constexpr int64_t kMaxCountBytes = 40 * 1024;

// Exclusive scan of counts[0, n) in place (shared memory), in chunks of the block.
__device__ void scan_in_place(int* counts, int64_t n) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int carry = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kThreads) {
    const int64_t i = i0 + threadIdx.x;
    const int v = i < n ? counts[i] : 0;
    int excl, total;
    Scan(tmp).ExclusiveSum(v, excl, total);
    __syncthreads();  // every thread has read its counter (and tmp may be reused)
    if (i < n) counts[i] = carry + excl;
    carry += total;
    __syncthreads();
  }
}

template <typename IdxT>
__global__ void __launch_bounds__(kThreads)
    small_index_kernel(const IdxT* __restrict__ idx, int64_t num_tokens, int64_t k, int64_t num_experts,
                       int64_t local_experts, int world, int64_t* __restrict__ expert_rows,
                       int32_t* __restrict__ hist, int64_t* __restrict__ dest_rows, int32_t* __restrict__ tok,
                       IdxT* __restrict__ idx_copy) {
  extern __shared__ int s_count[];  // [num_experts] then [world]
  int* ce = s_count;
  int* cd = s_count + num_experts;
  for (int64_t i = threadIdx.x; i < num_experts + world; i += kThreads) s_count[i] = 0;
  __syncthreads();

  const int64_t n = num_tokens * k;
  const int warp = threadIdx.x / kWarp;
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t s = base + threadIdx.x;
    int e = -1, d = -1;
    if (s < n) {
      const int64_t v = static_cast<int64_t>(idx[s]);
      if (v >= 0 && v < num_experts) {
        e = static_cast<int>(v);
        d = static_cast<int>(v / local_experts);
        const int64_t t0 = s - s % k;  // the token's first slot
        for (int64_t i = t0; i < s && d >= 0; ++i) {  // a token goes to each rank once: its first slot there
          const int64_t f = static_cast<int64_t>(idx[i]);
          if (f >= 0 && f < num_experts && f / local_experts == d) d = -1;
        }
      }
    }
    int re = -1, rd = -1;
    for (int turn = 0; turn < kThreads / kWarp; ++turn) {
      if (warp == turn) {
        re = rank_in_turn(e, ce);
        rd = rank_in_turn(d, cd);
      }
      __syncthreads();
    }
    if (s < n) {
      if (idx_copy != nullptr) idx_copy[s] = idx[s];
      expert_rows[s] = re;  // ranks for now; the offsets are added below
      dest_rows[s] = rd;
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < num_experts; i += kThreads) hist[i] = ce[i];
  for (int i = threadIdx.x; i < world; i += kThreads) tok[i] = cd[i];
  __syncthreads();
  scan_in_place(ce, num_experts);
  scan_in_place(cd, world);
  // NOTE: the same thread wrote these rows above (same slot -> thread mapping): no fence needed.
  for (int64_t s = threadIdx.x; s < n; s += kThreads) {
    const int64_t r = expert_rows[s];
    if (r < 0) continue;
    const int64_t e = static_cast<int64_t>(idx[s]);
    expert_rows[s] = r + ce[e];
    const int64_t rd = dest_rows[s];
    if (rd >= 0) dest_rows[s] = rd + cd[e / local_experts];
  }
}

bool small_index_disabled() {
  static const bool disabled = [] {
    const char* env = std::getenv("MOE_EXT_EP_SMALL_INDEX");
    return env != nullptr && std::strcmp(env, "0") == 0;
  }();
  return disabled;
}

}  // namespace

bool ep_small_index_fits(const EpParams& p) {
  return !small_index_disabled() && p.num_tokens * p.k <= kEpSmallIndexSlots &&
         (p.num_experts + p.world) * static_cast<int64_t>(sizeof(int)) <= kMaxCountBytes;
}

void ep_small_index(const EpParams& p, int64_t* expert_rows, int32_t* hist, int64_t* dest_rows, int32_t* tok,
                    cudaStream_t stream) {
  MOE_HOST_ASSERT(p.num_tokens * p.k <= kEpSmallIndexSlots, "ep_small_index: too many slots for one block");
  MOE_HOST_ASSERT(p.world >= 1 && p.num_experts % p.world == 0, "ep_small_index: bad world / num_experts");
  MOE_HOST_ASSERT(p.num_tokens == 0 || p.idx != nullptr, "ep_small_index: idx is null");
  const size_t smem = static_cast<size_t>(p.num_experts + p.world) * sizeof(int);
  MOE_HOST_ASSERT(static_cast<int64_t>(smem) <= kMaxCountBytes, "ep_small_index: too many experts for the counters");
  const int64_t el = p.num_experts / p.world;
  if (p.idx_is_int64)
    small_index_kernel<int64_t><<<1, kThreads, smem, stream>>>(static_cast<const int64_t*>(p.idx), p.num_tokens,
                                                               p.k, p.num_experts, el, p.world, expert_rows, hist,
                                                               dest_rows, tok, static_cast<int64_t*>(p.idx_copy));
  else
    small_index_kernel<int32_t><<<1, kThreads, smem, stream>>>(static_cast<const int32_t*>(p.idx), p.num_tokens,
                                                               p.k, p.num_experts, el, p.world, expert_rows, hist,
                                                               dest_rows, tok, static_cast<int32_t*>(p.idx_copy));
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe_ext::kernels
