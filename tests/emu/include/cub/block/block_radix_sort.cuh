// cub::BlockRadixSort (keys and values, blocked arrangement) for the CPU emulation: a stable sort
// on key bits [begin_bit, end_bit), as the radix sort is; thread 0 sorts between two barriers.
#pragma once

#include "../../../emu_cuda.h"

#include <algorithm>
#include <numeric>

namespace cub {

template <typename K, int BLOCK_THREADS, int ITEMS, typename V = int, int RADIX_BITS = 4, bool MEMOIZE = true,
          int ALGO = 0, int SMEM = 0, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1>
class BlockRadixSort {
  static constexpr int kN = BLOCK_THREADS * BLOCK_DIM_Y * BLOCK_DIM_Z * ITEMS;

 public:
  struct TempStorage {
    K keys[kN];
    V vals[kN];
    K out_keys[kN];
    V out_vals[kN];
  };
  explicit BlockRadixSort(TempStorage& s) : s_(s) {}

  void Sort(K (&keys)[ITEMS], V (&vals)[ITEMS], int begin_bit = 0, int end_bit = sizeof(K) * 8) {
    const int me = static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
    if (static_cast<int>(blockDim.x * blockDim.y * blockDim.z) * ITEMS != kN)
      emu::fail("cub::BlockRadixSort: BLOCK_THREADS differs from the launch's block size");
    for (int i = 0; i < ITEMS; ++i) s_.keys[me * ITEMS + i] = keys[i], s_.vals[me * ITEMS + i] = vals[i];
    __syncthreads();
    if (me == 0) {
      const int width = end_bit - begin_bit;
      auto field = [&](K k) {
        using U = std::make_unsigned_t<K>;
        U u = static_cast<U>(k) >> begin_bit;
        if (width < static_cast<int>(sizeof(K) * 8)) u &= (U(1) << width) - 1;
        return u;
      };
      int order[kN];
      std::iota(order, order + kN, 0);
      std::stable_sort(order, order + kN, [&](int a, int b) { return field(s_.keys[a]) < field(s_.keys[b]); });
      for (int j = 0; j < kN; ++j) s_.out_keys[j] = s_.keys[order[j]], s_.out_vals[j] = s_.vals[order[j]];
    }
    __syncthreads();
    for (int i = 0; i < ITEMS; ++i) keys[i] = s_.out_keys[me * ITEMS + i], vals[i] = s_.out_vals[me * ITEMS + i];
  }

 private:
  TempStorage& s_;
};

}  // namespace cub
