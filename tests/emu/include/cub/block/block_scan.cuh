// cub::BlockScan for the CPU emulation: the same interface and blocking behaviour (no barrier
// after the result is read, so a caller that reuses TempStorage without __syncthreads races here
// as it does with cub), computed plainly from every thread's posted items.
#pragma once

#include "../../../emu_cuda.h"

namespace cub {

template <typename T, int BLOCK_THREADS, int ALGORITHM = 0, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1>
class BlockScan {
  static constexpr int kThreads = BLOCK_THREADS * BLOCK_DIM_Y * BLOCK_DIM_Z;
  static constexpr int kMaxItems = 8;

 public:
  struct TempStorage {
    T vals[kThreads * kMaxItems];
    int items;
  };
  explicit BlockScan(TempStorage& s) : s_(s) {}

  void ExclusiveSum(T in, T& out) {
    T agg;
    ExclusiveSum(in, out, agg);
  }
  void ExclusiveSum(T in, T& out, T& aggregate) {
    T a[1] = {in}, o[1];
    scan<1>(a, o, aggregate, [](T x, T y) { return x + y; }, true, T(0));
    out = o[0];
  }
  template <int N>
  void ExclusiveSum(T (&in)[N], T (&out)[N]) {
    T agg;
    scan<N>(in, out, agg, [](T x, T y) { return x + y; }, true, T(0));
  }
  template <int N>
  void ExclusiveSum(T (&in)[N], T (&out)[N], T& aggregate) {
    scan<N>(in, out, aggregate, [](T x, T y) { return x + y; }, true, T(0));
  }
  void InclusiveSum(T in, T& out) {
    T agg;
    InclusiveSum(in, out, agg);
  }
  void InclusiveSum(T in, T& out, T& aggregate) {
    T a[1] = {in}, o[1];
    scan<1>(a, o, aggregate, [](T x, T y) { return x + y; }, false, T(0));
    out = o[0];
  }
  template <int N>
  void InclusiveSum(T (&in)[N], T (&out)[N]) {
    T agg;
    scan<N>(in, out, agg, [](T x, T y) { return x + y; }, false, T(0));
  }
  template <typename Op>
  void InclusiveScan(T in, T& out, Op op) {
    T a[1] = {in}, o[1], agg;
    scan<1>(a, o, agg, op, false, T(0));
    out = o[0];
  }
  template <typename Op>
  void InclusiveScan(T in, T& out, Op op, T& aggregate) {
    T a[1] = {in}, o[1];
    scan<1>(a, o, aggregate, op, false, T(0));
    out = o[0];
  }
  template <int N, typename Op>
  void InclusiveScan(T (&in)[N], T (&out)[N], Op op) {
    T agg;
    scan<N>(in, out, agg, op, false, T(0));
  }
  template <typename Op>
  void ExclusiveScan(T in, T& out, T init, Op op) {
    T a[1] = {in}, o[1], agg;
    scan<1>(a, o, agg, op, true, init);
    out = o[0];
  }
  template <typename Op>
  void ExclusiveScan(T in, T& out, T init, Op op, T& aggregate) {
    T a[1] = {in}, o[1];
    scan<1>(a, o, aggregate, op, true, init);
    out = o[0];
  }

 private:
  template <int N, typename Op>
  void scan(const T* in, T* out, T& aggregate, Op op, bool exclusive, T init) {
    static_assert(N <= kMaxItems, "emulated BlockScan: too many items per thread");
    const int me = static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
    if (static_cast<int>(blockDim.x * blockDim.y * blockDim.z) != kThreads)
      emu::fail("cub::BlockScan: BLOCK_THREADS differs from the launch's block size");
    T tmp[N];
    for (int i = 0; i < N; ++i) tmp[i] = in[i];  // in and out may alias
    for (int i = 0; i < N; ++i) s_.vals[me * N + i] = tmp[i];
    __syncthreads();
    // An inclusive fold from the block's first item, in item order (cub's order for sums of
    // integers; for the max-scan it does not matter).
    T run = exclusive ? init : T{};
    bool have = exclusive;
    for (int j = 0; j < me * N; ++j) {
      run = have ? op(run, s_.vals[j]) : s_.vals[j];
      have = true;
    }
    for (int i = 0; i < N; ++i) {
      const T next = have ? op(run, tmp[i]) : tmp[i];
      out[i] = exclusive ? run : next;
      run = next;
      have = true;
    }
    T all = T{};
    bool h = false;
    for (int j = 0; j < kThreads * N; ++j) {
      all = h ? op(all, s_.vals[j]) : s_.vals[j];
      h = true;
    }
    aggregate = all;
  }
  TempStorage& s_;
};

}  // namespace cub
