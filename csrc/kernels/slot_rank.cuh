// Stable ranking of a small block's slots by key, shared by the one-block index kernels of
// permute (permute.cu), the replica choice (replicas.cu) and the ipc dispatch (ep_index.cu).
#pragma once

#include <cuda_runtime.h>

namespace moe_ext::kernels {

// Ranks `key` (-1: none) among the block's slots with the same key, in slot order, against the
// running counters `count` (shared memory). Warps call it in turns, lower warps (earlier slots)
// first, one warp per turn with __syncthreads between turns: the warp whose turn it is reads the
// counters and advances them by its own slots. Returns -1 for key -1.
__device__ __forceinline__ int rank_in_turn(int key, int* count) {
  const int lane = threadIdx.x % 32;
  const unsigned peers = __match_any_sync(0xffffffffu, key);
  const int before = __popc(peers & ((1u << lane) - 1u));
  const int r = key >= 0 ? count[key] + before : -1;
  __syncwarp();  // every lane has read its counter before the group's first lane advances it
  if (key >= 0 && before == 0) count[key] += __popc(peers);
  return r;
}

// One round of a block of kThreads threads, one key per thread (thread i holds slot base + i):
// every warp ranks its keys in its turn. All threads call it (it synchronises the block); returns
// this thread's rank (-1 for key -1).
template <int kThreads>
__device__ __forceinline__ int rank_block_round(int key, int* count) {
  const int warp = threadIdx.x / 32;
  int r = -1;
#pragma unroll 1
  for (int turn = 0; turn < kThreads / 32; ++turn) {
    if (warp == turn) r = rank_in_turn(key, count);
    __syncthreads();
  }
  return r;
}

}  // namespace moe_ext::kernels
