// The Hopper k-grouped weight gradient (sm_90a): out[e] = x_e^T y_e for every expert, with x
// [rows, m] and y [rows, n] row-major and the reduction over the expert's rows (the tokens):
// (x, y) = (a, grad_out) gives grad_b [E, K, N]; (grad_out, a) gives the trans_b [E, N, K]. The
// same machinery as the forward kernel (grouped_gemm_sm90_impl.cuh): TMA loads into a 4-stage
// shared-memory ring, wgmma from shared-memory descriptors, one producer warpgroup and two
// consumer warpgroups synchronised by mbarriers, a persistent CTA walking a device-side schedule
// built from the group sizes (grouped_gemm_schedule.cuh). Included only by the instantiation
// files grouped_gemm_sm90_wgrad_*.cu. The portable kernel (grouped_gemm_sm80_impl.cuh,
// grouped_gemm_wgrad_kernel) is the reference semantics: fp32 accumulation, one rounding to the
// element type, zeros for experts without rows.
//
// Operands. The reduction runs along the rows of both x and y, so for wgmma both are "MN-major":
// a stage holds rows [r, r + 64) of the expert, and in x (and y) consecutive m (n) elements are
// contiguous. Shared memory uses CuTe's GMMA::Layout_MN_SW128_Atom (64 MN-elements = 128 bytes by
// 8 rows, 128-byte swizzle) tiled with the row atoms fastest (Step<_2, _1, _3>, as CUTLASS does for
// MN-major operands), so each 64-wide half of a 128-wide tile is one contiguous 8 KB block that one
// TMA box (64 elements x 64 rows) writes exactly. wgmma m64n128k16 with both operands transposed
// (tnspA = tnspB = MN, allowed for 16-bit types).
//
// CTA: 384 threads = 3 warpgroups, one CTA per SM (~213 KB of shared memory at E = 1024), output
// tile 128 (m) x 128 (n), 64 rows per stage.
//   warpgroup 0  producer: thread 0 issues, per stage, two boxes of x (columns m0 + [0, 64) and
//                m0 + [64, 128)) and two of y, rows [row, row + 64), completing on the stage's
//                `full` mbarrier; the other 127 threads exit after the setup. A second half that
//                lies wholly past m (or n) is not loaded (its stale shared memory only feeds
//                output rows / columns that are never stored).
//   warpgroups 1, 2  consumers: output rows [0, 64) and [64, 128) of the tile (x half 0 / 1,
//                both halves of y); per stage: wait `full`, 4 wgmma, wait for them, arrive on
//                `empty` (256 arrivals).
// Tensor maps: one 2-D map over x ([rows_total, m]: M rows contiguous, or E * max_rows masked)
// and one over y; a box starts at any row (TMA takes element coordinates), so an expert's first
// k-block starts exactly at its first row.
//
// NOTE: expert boundaries along the reduction. An expert's rows [row_begin, row_begin + valid)
// are walked in k-blocks of 64 from row_begin; the last block generally runs past the expert's
// end into the NEXT expert's rows (or, for the last expert, into rows past offsets[E] that a
// worst-case buffer may fill with garbage, NaN included). TMA zero-fills only outside the whole
// tensor, so those rows arrive in shared memory as real data and would be summed into this
// expert's gradient. Options considered:
//   (a) a tensor map per expert whose row extent ends at its last row (built on the host it would
//       need the counts there: a host sync; built on the device, tensormap.replace plus proxy
//       fences per expert, and a 128-byte map per expert in global memory): heavy and untestable
//       here.
//   (b) smaller boxes for the tail: the boxes are fixed per map, and rows of a tail that is not a
//       multiple of 8 would land mid swizzle atom.
//   (c) zero the rows past the expert's end in shared memory after the TMA lands and before the
//       wgmma reads them. Chosen: only the last k-block of an (expert, tile) pair does it, and
//       only when valid % 64 != 0. Both operands are zeroed (zeroing one is not enough: 0 * NaN
//       is NaN). Consumer c zeroes those rows of x half c and of y half c (16-byte stores at
//       addresses taken from the CuTe layout itself, so the swizzle is the layout's), then every
//       writing thread issues fence.proxy.async.shared::cta (wgmma reads shared memory through
//       the async proxy), then both consumer warpgroups meet at a 256-thread named barrier
//       (consumer 0 reads y half 1 that consumer 1 zeroed, and vice versa) before the wgmma.
//       The empty-barrier arrival after the wgmma orders these writes before the producer's next
//       TMA into the slot. Rows past the end of the whole tensor are zero-filled by TMA anyway.
// Experts without rows own zero tiles: the producer loads nothing for them and the consumers
// only store zeros (the gradient of an unused expert is 0, as in the portable kernel).
//
// Schedule: tiles are numbered expert-major, (m-tile, n-tile) inside an expert in raster bands of
// 16 m-tiles (as the portable weight gradient), walked by tile = blockIdx.x, + gridDim.x, ...;
// producer and consumers decode the same tiles and run the same number of k-blocks per non-zero
// tile, so their ring positions agree without any exchange.
// Epilogue per consumer warpgroup: accumulators to an fp32 staging tile by their (row, column)
// coordinates, then 16-byte stores of 8 converted columns (rows < m - m0, columns < n - n0).
#pragma once

#include "kernels/exception.cuh"
#include "kernels/grouped_gemm_internal.cuh"
#include "kernels/grouped_gemm_sm90_common.cuh"
#include "kernels/grouped_gemm_schedule.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>  // first: the other CuTe headers assume it
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

namespace moe_ext::kernels::gemm_sm90_wgrad {

using namespace cute;
using gemm_sm90_common::CuteElem;
using gemm_sm90_common::pack2;
using gemm_sm90_common::warpgroup_barrier;
using gemm_detail::Schedule;
using gemm_detail::WgradArgs;

constexpr int kBM = gemm_detail::kSm90WgradTileM;  // 128 output rows (m)
constexpr int kBN = gemm_detail::kSm90WgradTileN;  // 128 output columns (n)
constexpr int kBK = 64;                            // reduction rows per stage: one 8-row atom x 8
constexpr int kHalf = 64;                          // m (n) elements per TMA box: one 128-byte swizzle row
constexpr int kStages = 4;
constexpr int kConsumers = 2;
constexpr int kThreads = 128 * (1 + kConsumers);  // 384
constexpr int kRowsPerConsumer = kBM / kConsumers;  // 64
constexpr int kStagePitch = kBN + 4;               // floats per staged accumulator row
constexpr uint32_t kBoxBytes = kHalf * kBK * 2;    // one TMA box, 8 KB
constexpr int kConsumersBarrier = 3;               // named barrier of the 256 consumer threads (1, 2: per consumer)

static_assert(kBM == 128 && kBN == 128 && kRowsPerConsumer == kHalf, "one x half per consumer warpgroup");

struct SmemPlan {
  static constexpr int kX = 0;
  static constexpr int kY = kX + kStages * kBM * kBK * 2;
  static constexpr int kStaging = kY + kStages * kBN * kBK * 2;
  static constexpr int kBarriers = kStaging + kConsumers * kRowsPerConsumer * kStagePitch * 4;
  static constexpr int kScan = kBarriers + 2 * kStages * 8;
  static constexpr int kSchedule = kScan + (kThreads / 32) * 8;
  static constexpr int kFixedBytes = 1024 + kSchedule;  // + the alignment slack
};
static_assert(SmemPlan::kSchedule % 16 == 0, "schedule alignment");
static_assert(SmemPlan::kFixedBytes + gemm_detail::schedule_bytes(static_cast<int>(gemm_detail::kSm90MaxExperts)) <=
                  227 * 1024,
              "shared memory of one CTA at the largest expert count");




template <typename E>
struct Config {
  using Atom = GMMA::Layout_MN_SW128_Atom<E>;  // (64 MN, 8 rows)
  // (128 MN, 64 rows, stages); rows fastest: each 64-wide MN half of a stage is 8 contiguous KB.
  using SmemLayout = decltype(tile_to_shape(Atom{}, Shape<Int<kBM>, Int<kBK>, Int<kStages>>{}, Step<_2, _1, _3>{}));
  using SmemLayoutHalf = decltype(tile_to_shape(Atom{}, Shape<Int<kHalf>, Int<kBK>>{}, Step<_2, _1>{}));
  using MmaOp = std::conditional_t<std::is_same_v<E, cutlass::bfloat16_t>,
                                   SM90::GMMA::MMA_64x128x16_F32BF16BF16_SS<GMMA::Major::MN, GMMA::Major::MN>,
                                   SM90::GMMA::MMA_64x128x16_F32F16F16_SS<GMMA::Major::MN, GMMA::Major::MN>>;
  using TiledMma = decltype(make_tiled_mma(MmaOp{}, Layout<Shape<Int<kConsumers>, _1, _1>>{}));
};

// TMA descriptor (host) over a row-major [rows, cols] operand, as (cols, rows) coordinates with
// cols contiguous; boxes of 64 cols x 64 rows.
template <typename E>
auto make_tma_operand(const E* p, int cols, int rows) {
  Tensor m = make_tensor(make_gmem_ptr(p), make_shape(cols, rows), make_stride(_1{}, static_cast<int64_t>(cols)));
  return make_tma_copy(SM90_TMA_LOAD{}, m, typename Config<E>::SmemLayoutHalf{});
}

template <typename T>
struct Params {
  using E = typename CuteElem<T>::type;
  using Tma = decltype(make_tma_operand<E>(nullptr, 8, 1));
  Tma tma_x;
  Tma tma_y;
  WgradArgs<T> args;
  int32_t rows_total;
};

// A barrier among the 256 threads of both consumer warpgroups.
__device__ __forceinline__ void consumers_barrier() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kConsumersBarrier), "n"(128 * kConsumers) : "memory");
}

// Where tile `tile` lies (the same decode in the producer and the consumers).
struct TileInfo {
  int e;           // expert
  int row0;        // first row of the expert in x and y
  int rows;        // the expert's rows: the reduction length (0: a zero tile)
  int m0, n0;      // first output row and column inside out[e]
  int rows_store;  // output rows of the tile inside m
  int cols_store;  // output columns of the tile inside n
};

__device__ __forceinline__ TileInfo decode_tile(const Schedule& s, int tile, int num_mt, int num_nt, int m, int n) {
  const int per_expert = num_mt * num_nt;
  TileInfo t;
  t.e = tile / per_expert;
  int mt, nt;
  gemm_detail::band_order(tile - t.e * per_expert, num_mt, num_nt, &mt, &nt);
  t.row0 = s.row_begin[t.e];
  t.rows = s.valid[t.e];
  t.m0 = mt * kBM;
  t.n0 = nt * kBN;
  t.rows_store = min(kBM, m - t.m0);
  t.cols_store = min(kBN, n - t.n0);
  return t;
}

// Stores output rows [r_lo, r_lo + 64) of a tile (those < rows_store, columns < cols_store) from
// the consumer's fp32 staging tile, or zeros when zero is set. 128 threads of one consumer.
template <typename T>
__device__ __forceinline__ void store_rows(const WgradArgs<T>& args, const TileInfo& t, int r_lo, const float* staged,
                                           bool zero, int ltid) {
  constexpr int kChunks = kBN / 8;
  T* const out_e = args.out + static_cast<int64_t>(t.e) * args.m * args.n;
  for (int id = ltid; id < kRowsPerConsumer * kChunks; id += 128) {
    const int r = id / kChunks, q = id % kChunks;
    const int tr = r_lo + r;
    if (tr >= t.rows_store || q * 8 >= t.cols_store) continue;
    uint4 packed = make_uint4(0, 0, 0, 0);
    if (!zero) {
      const float* src = staged + r * kStagePitch + q * 8;
      const float4 v0 = *reinterpret_cast<const float4*>(src);
      const float4 v1 = *reinterpret_cast<const float4*>(src + 4);
      packed.x = pack2<T>(v0.x, v0.y);
      packed.y = pack2<T>(v0.z, v0.w);
      packed.z = pack2<T>(v1.x, v1.y);
      packed.w = pack2<T>(v1.z, v1.w);
    }
    *reinterpret_cast<uint4*>(out_e + static_cast<int64_t>(t.m0 + tr) * args.n + t.n0 + q * 8) = packed;
  }
}

// kInFlight: wgmma batches a consumer keeps in flight across K-stages (gemm_sm90_common::mma_in_flight).
template <typename T, int kInFlight>
__global__ void __launch_bounds__(kThreads, 1) grouped_gemm_wgrad_sm90_kernel(const __grid_constant__ Params<T> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using E = typename CuteElem<T>::type;
  using Cfg = Config<E>;
  using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;

  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  uint8_t* const smem = smem_raw + ((1024 - (raw_addr & 1023)) & 1023);
  E* const sX_ptr = reinterpret_cast<E*>(smem + SmemPlan::kX);
  E* const sY_ptr = reinterpret_cast<E*>(smem + SmemPlan::kY);
  float* const staging = reinterpret_cast<float*>(smem + SmemPlan::kStaging);
  uint64_t* const full = reinterpret_cast<uint64_t*>(smem + SmemPlan::kBarriers);
  uint64_t* const empty = full + kStages;
  int64_t* const scan_tmp = reinterpret_cast<int64_t*>(smem + SmemPlan::kScan);

  const WgradArgs<T>& args = p.args;
  const int num_experts = args.groups.num_experts;
  const Schedule sched = gemm_detail::carve_schedule(smem + SmemPlan::kSchedule, num_experts);
  gemm_detail::build_schedule<kThreads>(args.groups, 0, sched, scan_tmp);  // no m-tile prefix; ends with __syncthreads
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      FullBarrier::init(&full[s], 1);                   // the producer's arrive_and_expect_tx
      EmptyBarrier::init(&empty[s], kConsumers * 128);  // every consumer thread
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  // NOTE: no CTA-wide barrier below this line: producer threads leave early.

  const int M = args.m, N = args.n;
  const int num_mt = gemm_detail::ceil_div_i(M, kBM), num_nt = gemm_detail::ceil_div_i(N, kBN);
  const int num_tiles = num_experts * num_mt * num_nt;
  const int warpgroup = threadIdx.x / 128;

  if (warpgroup == 0) {
    // ---- producer: one thread issues every TMA.
    if (threadIdx.x != 0) return;
    prefetch_tma_descriptor(p.tma_x.get_tma_descriptor());
    prefetch_tma_descriptor(p.tma_y.get_tma_descriptor());
    Tensor mX = p.tma_x.get_tma_tensor(make_shape(M, p.rows_total));  // (m, rows) coordinates
    Tensor mY = p.tma_y.get_tma_tensor(make_shape(N, p.rows_total));  // (n, rows)
    Tensor sX = make_tensor(make_smem_ptr(sX_ptr), typename Cfg::SmemLayout{});  // (BM, BK, stages)
    Tensor sY = make_tensor(make_smem_ptr(sY_ptr), typename Cfg::SmemLayout{});  // (BN, BK, stages)
    using HalfStages = Shape<Int<kHalf>, Int<kBK>, Int<kStages>>;
    Tensor sX0 = local_tile(sX, HalfStages{}, make_coord(0, 0, 0));
    Tensor sX1 = local_tile(sX, HalfStages{}, make_coord(1, 0, 0));
    Tensor sY0 = local_tile(sY, HalfStages{}, make_coord(0, 0, 0));
    Tensor sY1 = local_tile(sY, HalfStages{}, make_coord(1, 0, 0));
    using Box = Shape<Int<kHalf>, Int<kBK>>;
    int stage = 0;
    uint32_t phase = 0;
    for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
      const TileInfo t = decode_tile(sched, tile, num_mt, num_nt, M, N);
      if (t.rows == 0) continue;  // a zero tile: the consumers store zeros, nothing to load
      // Boxes of this tile: columns m0 (+ 64) of x and n0 (+ 64) of y, rows row0 + 64 kt + [0, 64).
      Tensor gX0 = local_tile(domain_offset(make_coord(t.m0, t.row0), mX), Box{}, make_coord(0, _));  // (64, 64, kt)
      Tensor gX1 = local_tile(domain_offset(make_coord(t.m0 + kHalf, t.row0), mX), Box{}, make_coord(0, _));
      Tensor gY0 = local_tile(domain_offset(make_coord(t.n0, t.row0), mY), Box{}, make_coord(0, _));
      Tensor gY1 = local_tile(domain_offset(make_coord(t.n0 + kHalf, t.row0), mY), Box{}, make_coord(0, _));
      auto [tX0g, tX0s] =
          tma_partition(p.tma_x, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sX0), group_modes<0, 2>(gX0));
      auto [tX1g, tX1s] =
          tma_partition(p.tma_x, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sX1), group_modes<0, 2>(gX1));
      auto [tY0g, tY0s] =
          tma_partition(p.tma_y, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sY0), group_modes<0, 2>(gY0));
      auto [tY1g, tY1s] =
          tma_partition(p.tma_y, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sY1), group_modes<0, 2>(gY1));
      // NOTE: a second half starting at or past m (n) would be a box wholly outside the tensor:
      // not loaded (see the top).
      const bool load_x1 = t.m0 + kHalf < M, load_y1 = t.n0 + kHalf < N;
      const uint32_t tx_bytes = kBoxBytes * (2 + (load_x1 ? 1 : 0) + (load_y1 ? 1 : 0));
      const int num_k = gemm_detail::ceil_div_i(t.rows, kBK);
      for (int kt = 0; kt < num_k; ++kt) {
        EmptyBarrier::wait(&empty[stage], phase ^ 1);  // the consumers have released this slot
        FullBarrier::arrive_and_expect_tx(&full[stage], tx_bytes);
        copy(p.tma_x.with(full[stage]), tX0g(_, kt), tX0s(_, stage));
        if (load_x1) copy(p.tma_x.with(full[stage]), tX1g(_, kt), tX1s(_, stage));
        copy(p.tma_y.with(full[stage]), tY0g(_, kt), tY0s(_, stage));
        if (load_y1) copy(p.tma_y.with(full[stage]), tY1g(_, kt), tY1s(_, stage));
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  // ---- consumers: warpgroup 1 owns output rows [0, 64) of the tile, warpgroup 2 rows [64, 128).
  const int ctid = threadIdx.x - 128;  // 0..255 across both consumer warpgroups
  const int consumer = ctid / 128;
  const int ltid = ctid % 128;
  const int r_lo = consumer * kRowsPerConsumer;
  typename Cfg::TiledMma mma;
  auto thr = mma.get_thread_slice(ctid);
  Tensor sX = make_tensor(make_smem_ptr(sX_ptr), typename Cfg::SmemLayout{});
  Tensor sY = make_tensor(make_smem_ptr(sY_ptr), typename Cfg::SmemLayout{});
  Tensor tCrA = thr.make_fragment_A(thr.partition_A(sX));  // (MMA, MMA_M, MMA_K, stages) descriptors
  Tensor tCrB = thr.make_fragment_B(thr.partition_B(sY));  // (MMA, MMA_N, MMA_K, stages) descriptors
  Tensor tCcC = thr.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));  // (row, col) per element
  Tensor accum = thr.make_fragment_C(tCcC);                                            // fp32
  float* const staged = staging + consumer * kRowsPerConsumer * kStagePitch;

  int stage = 0;
  uint32_t phase = 0;
  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const TileInfo t = decode_tile(sched, tile, num_mt, num_nt, M, N);
    if (t.rows == 0) {
      store_rows<T>(args, t, r_lo, staged, /*zero=*/true, ltid);  // an expert without rows: zeros
      continue;
    }
    const int num_k = gemm_detail::ceil_div_i(t.rows, kBK);
    const int tail = t.rows - (num_k - 1) * kBK;  // rows of the last k-block that are this expert's, 1..64
    clear(accum);
    [[maybe_unused]] int held = -1;  // kInFlight = 1: the slot of the batch still in flight
    for (int kt = 0; kt < num_k; ++kt) {
      FullBarrier::wait(&full[stage], phase);
      if (kt == num_k - 1 && tail < kBK) {
        // Rows [tail, 64) of this block belong to the next expert (or lie past the groups):
        // zero them in x half `consumer` and y half `consumer` (see the NOTE at the top).
        for (int i = ltid; i < (kBK - tail) * (kHalf / 8); i += 128) {
          const int r = tail + i / (kHalf / 8);
          const int c = r_lo + (i % (kHalf / 8)) * 8;  // 8 MN-consecutive elements: one 16-byte chunk
          *reinterpret_cast<uint4*>(&sX(c, r, stage)) = make_uint4(0, 0, 0, 0);
          *reinterpret_cast<uint4*>(&sY(c, r, stage)) = make_uint4(0, 0, 0, 0);
        }
        cutlass::arch::fence_view_async_shared();  // generic-proxy writes before the wgmma's async-proxy reads
        consumers_barrier();                       // ... of both consumer warpgroups
      }
      warpgroup_fence_operand(accum);
      warpgroup_arrive();
      gemm(mma, tCrA(_, _, _, stage), tCrB(_, _, _, stage), accum);
      warpgroup_commit_batch();
      warpgroup_wait<kInFlight>();  // as the forward
      warpgroup_fence_operand(accum);
      if constexpr (kInFlight == 0) {
        EmptyBarrier::arrive(&empty[stage]);
      } else {
        if (held >= 0) EmptyBarrier::arrive(&empty[held]);
        held = stage;
      }
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
    if constexpr (kInFlight == 1) {  // NOTE: num_k >= 1 (t.rows > 0), so the last batch is in flight here
      warpgroup_wait<0>();
      warpgroup_fence_operand(accum);
      EmptyBarrier::arrive(&empty[held]);
    }
    CUTE_UNROLL
    for (int i = 0; i < size(accum); ++i) {
      const int r = get<0>(tCcC(i)) - r_lo;
      const int c = get<1>(tCcC(i));
      staged[r * kStagePitch + c] = accum(i);
    }
    warpgroup_barrier(consumer);
    store_rows<T>(args, t, r_lo, staged, /*zero=*/false, ltid);
    warpgroup_barrier(consumer);  // the staging tile is rewritten by the next tile
  }
#else
  // NOTE: code for any other target (sm_80, or sm_90 without the `a` features that wgmma needs).
  // The static shared marker makes this body visible to the host (available() below reads the
  // kernel's static shared size), so the launcher never picks it; the trap is a second guard.
  __shared__ volatile int not_sm90a_marker[4];
  not_sm90a_marker[threadIdx.x & 3] = 1;
  MOE_DEVICE_ASSERT(false && "grouped_gemm_wgrad_sm90_kernel needs an sm_90a build");
#endif
}

// ---- host side ------------------------------------------------------------------------------------------

template <typename T, int kInFlight>
void launch_kernel(const Params<T>& params, int64_t max_tiles, cudaStream_t stream);

template <typename T>
void launch(const WgradArgs<T>& args, int32_t rows_total, int64_t max_tiles, cudaStream_t stream) {
  if (max_tiles <= 0 || args.m == 0 || args.n == 0) return;
  if (rows_total == 0) {
    // No rows at all: every expert's gradient is zero. (TMA descriptors need a non-empty tensor.)
    MOE_CUDA_CHECK(cudaMemsetAsync(args.out, 0,
                                   static_cast<size_t>(args.groups.num_experts) * args.m * args.n * sizeof(T), stream));
    return;
  }
  using E = typename CuteElem<T>::type;
  gemm_sm90_common::bind_primary_context();
  const Params<T> params{make_tma_operand<E>(reinterpret_cast<const E*>(args.x), args.m, rows_total),
                         make_tma_operand<E>(reinterpret_cast<const E*>(args.y), args.n, rows_total), args,
                         rows_total};
  if (gemm_sm90_common::mma_in_flight())
    launch_kernel<T, 1>(params, max_tiles, stream);
  else
    launch_kernel<T, 0>(params, max_tiles, stream);
}

template <typename T, int kInFlight>
void launch_kernel(const Params<T>& params, int64_t max_tiles, cudaStream_t stream) {
  const WgradArgs<T>& args = params.args;
  constexpr auto kernel = grouped_gemm_wgrad_sm90_kernel<T, kInFlight>;
  const int smem = SmemPlan::kFixedBytes + gemm_detail::schedule_bytes(args.groups.num_experts);
  const int max_smem =
      SmemPlan::kFixedBytes + gemm_detail::schedule_bytes(static_cast<int>(gemm_detail::kSm90MaxExperts));
  const int device = gemm_detail::current_device();
  const int per_sm = gemm_detail::resident_ctas<kernel>(kThreads, device, smem, max_smem,
                                                        gemm_detail::schedule_bucket(args.groups.num_experts));
  const unsigned grid = gemm_detail::persistent_grid(max_tiles, device, per_sm);
  kernel<<<grid, kThreads, smem, stream>>>(params);
  MOE_CUDA_CHECK(cudaGetLastError());
}

// Whether this build has sm_90a code for the kernel and the current device runs it.
inline bool available() {
  static std::atomic<int> cache[gemm_sm90_common::kMaxDevices] = {};
  return gemm_sm90_common::runs_sm90a_body(
      reinterpret_cast<const void*>(grouped_gemm_wgrad_sm90_kernel<__nv_bfloat16, 0>), cache);
}

}  // namespace moe_ext::kernels::gemm_sm90_wgrad

namespace moe_ext::kernels::gemm_detail {

template <typename T>
void launch_wgrad_sm90(const WgradArgs<T>& args, int32_t rows_total, int64_t max_tiles, cudaStream_t stream) {
  gemm_sm90_wgrad::launch<T>(args, rows_total, max_tiles, stream);
}

}  // namespace moe_ext::kernels::gemm_detail
