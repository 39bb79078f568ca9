// The portable grouped GEMM kernels (sm_80 and later): mma.sync m16n8k16 from ldmatrix, a
// cp.async multi-stage pipeline, a persistent device-side tile schedule. Included only by the
// instantiation files grouped_gemm_sm80_*.cu; the design is described in grouped_gemm.cuh.
//
// Shared-memory layouts (16-byte chunks, XOR-swizzled so that both the cp.async stores of a warp
// and the eight row addresses of every ldmatrix phase hit distinct banks):
//   "K-major"  [rows][kBK = 32]: 4 chunks (64 bytes) a row; chunk c of row r sits at
//              r * 4 + (c ^ ((r >> 1) & 3)). Rows r and r + 1 share a 128-byte line, so 8
//              consecutive rows at one logical chunk land on 8 distinct 16-byte bank groups.
//              Used for A (forward) and for B with trans_b ([n][k]).
//   "row-major" [kBK = 32][128]: 16 chunks (256 bytes) a row; chunk c of row r sits at
//              r * 16 + (c ^ (r & 7)). Used for B without trans_b ([k][n]) and for both operands
//              of the weight gradient ([rows][m] and [rows][n]); read with ldmatrix.trans.
// Fragments (PTX ISA, mma.m16n8k16 with .bf16/.f16): g = lane / 4, t = lane % 4;
//   A a0..a3 = (row g, k 2t..2t+1), (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8)
//   B b0, b1 = (k 2t..2t+1, col g), (k 2t + 8.., col g)
//   C c0..c3 = (row g, col 2t..2t+1), (row g + 8, col 2t..2t+1)
// Each ldmatrix.x4 loads four 8x8 matrices; lanes 8i..8i+7 give the row addresses of matrix i,
// and register i of every lane receives matrix i (transposed with .trans).
#pragma once

#include "kernels/exception.cuh"
#include "kernels/grouped_gemm_internal.cuh"
#include "kernels/grouped_gemm_schedule.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

namespace moe_ext::kernels::gemm_detail {

// ---- small device helpers -----------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with valid == false nothing is read and the 16 bytes are zeroed
// (src-size 0). src must still be a valid address: callers pass the tensor's base then.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Element-type traits: the mma instruction and the fp32 <-> pair conversions.
template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t bits) {
    __nv_bfloat162 v;
    *reinterpret_cast<uint32_t*>(&v) = bits;
    return __bfloat1622float2(v);
  }
};

template <>
struct Elem<__half> {
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t bits) {
    __half2 v;
    *reinterpret_cast<uint32_t*>(&v) = bits;
    return __half22float2(v);
  }
};

// Swizzled chunk index (16-byte units) of the two shared-memory layouts (see the top).
__device__ __forceinline__ int kmajor_chunk(int row, int chunk) { return row * 4 + (chunk ^ ((row >> 1) & 3)); }
__device__ __forceinline__ int rowmajor_chunk(int row, int chunk) { return row * 16 + (chunk ^ (row & 7)); }

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// ---- tile stores ------------------------------------------------------------------------------------

// Writes the first `rows` x `cols` of a BM x kCols tile at dst (row pitch ld elements) with 16-byte
// stores: rows < valid_rows from the staging buffer (pitch kCols + 8), the rest zeros. cols is a
// multiple of 8.
template <typename T, int BM, int kCols>
__device__ __forceinline__ void store_tile(T* dst, int64_t ld, int rows, int cols, int valid_rows, const T* stage) {
  constexpr int kChunks = kCols / 8;
  constexpr int kPitch = kCols + 8;
  for (int id = threadIdx.x; id < BM * kChunks; id += kThreads) {
    const int r = id / kChunks, q = id % kChunks;
    if (r < rows && q * 8 < cols) {
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < valid_rows) v = *reinterpret_cast<const uint4*>(stage + r * kPitch + q * 8);
      *reinterpret_cast<uint4*>(dst + r * ld + q * 8) = v;
    }
  }
}

// ---- the warp's mma over one pipeline stage ----------------------------------------------------------

// acc[mi][ni]: the warp's (BM/2) x 32 sub-tile, MI = BM / 32 fragments of 16 rows, 4 of 8 columns.
// kAMMajor: A is stored [kBK][BM] (the weight gradient) instead of [BM][kBK]; kBKMajor: B is
// stored [kBN][kBK] (trans_b) instead of [kBK][kBN].
template <typename T, int BM, bool kAMMajor, bool kBKMajor>
__device__ __forceinline__ void mma_stage(float (&acc)[BM / 32][4][4], uint32_t a_base, uint32_t b_base, int wm,
                                          int wn, int lane) {
  constexpr int MI = BM / 32;
  static_assert(!kAMMajor || BM == 128, "the [kBK][BM] A layout is 16 chunks wide");
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk) {
    uint32_t af[MI][4];
    uint32_t bf[4][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int m_base = wm * (BM / 2) + mi * 16;
      if constexpr (!kAMMajor) {
        const int row = m_base + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int chunk = kk * 2 + (lane >> 4);
        ldmatrix_x4(af[mi], a_base + kmajor_chunk(row, chunk) * 16);
      } else {
        const int krow = kk * 16 + (lane & 7) + (lane >> 4) * 8;
        const int chunk = m_base / 8 + ((lane >> 3) & 1);
        ldmatrix_x4_trans(af[mi], a_base + rowmajor_chunk(krow, chunk) * 16);
      }
    }
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      const int n_base = wn * 32 + np * 16;
      uint32_t r[4];
      if constexpr (kBKMajor) {
        const int nrow = n_base + (lane & 7) + (lane >> 4) * 8;
        const int chunk = kk * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(r, b_base + kmajor_chunk(nrow, chunk) * 16);
      } else {
        const int krow = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int chunk = n_base / 8 + (lane >> 4);
        ldmatrix_x4_trans(r, b_base + rowmajor_chunk(krow, chunk) * 16);
      }
      bf[2 * np][0] = r[0];
      bf[2 * np][1] = r[1];
      bf[2 * np + 1][0] = r[2];
      bf[2 * np + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) Elem<T>::mma(acc[mi][ni], af[mi], bf[ni]);
    }
  }
}

// The multi-stage cp.async pipeline over num_k stages: load(slot, kt) issues the copies of stage
// kt into slot; compute(slot) consumes one. Ends with every copy landed and every warp past its
// last read of shared memory.
template <typename Load, typename Compute>
__device__ __forceinline__ void pipeline(int num_k, Load&& load, Compute&& compute) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_k) load(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < num_k; ++kt) {
    cp_async_wait<kStages - 2>();  // stage kt has landed (this thread's copies) ...
    __syncthreads();               // ... everyone's, and everyone is done with slot (kt - 1) % kStages
    const int pf = kt + kStages - 1;
    if (pf < num_k) load(pf % kStages, pf);
    cp_async_commit();
    compute(kt % kStages);
  }
  cp_async_wait<0>();
  __syncthreads();
}

template <int BM>
constexpr int fwd_pipe_bytes() {
  return kStages * (BM * kBK * 2 + kBK * kBN * 2);
}
constexpr int kWgradPipeBytes = kStages * (kBK * 128 * 2 + kBK * kBN * 2);

// ---- forward kernel -----------------------------------------------------------------------------------

template <typename T, int BM, bool kTransB, bool kSwiglu>
__global__ void __launch_bounds__(kThreads, 2) grouped_gemm_fwd_kernel(const FwdArgs<T> args) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int64_t scan_tmp[kWarps];
  constexpr int MI = BM / 32;
  constexpr int kAStage = BM * kBK * 2;
  constexpr int kBStage = kBK * kBN * 2;
  constexpr int kColsOut = kSwiglu ? kBN / 2 : kBN;  // output columns per tile
  constexpr int kNiOut = kSwiglu ? 2 : 4;            // output fragments per warp
  constexpr int kWarpColsOut = kColsOut / kWarpsN;   // 32, or 16 with SwiGLU
  constexpr int kPitch = kColsOut + 8;
  constexpr int kAIters = BM * (kBK / 8) / kThreads;   // A chunks per thread per stage
  constexpr int kBIters = kBK * (kBN / 8) / kThreads;  // B chunks per thread per stage (2)
  static_assert(kAIters >= 1 && kBIters == 2, "tile shape");
  static_assert(BM * kPitch * 2 <= fwd_pipe_bytes<BM>(), "the staging tile must fit in the pipeline");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int E = args.groups.num_experts;
  const int K = args.k, N = args.n, n_out = args.n_out;

  const Schedule sched = carve_schedule(smem + fwd_pipe_bytes<BM>(), E);
  build_schedule<kThreads>(args.groups, BM, sched, scan_tmp);

  const uint32_t a_smem = smem_addr(smem);
  const uint32_t b_smem = a_smem + kStages * kAStage;
  T* const stage = reinterpret_cast<T*>(smem);
  const int num_nt = ceil_div_i(n_out, kColsOut);
  const int num_mt = sched.prefix[E];
  const int num_tiles = num_mt * num_nt;
  const int num_k = ceil_div_i(K, kBK);

  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    int gmt, nt;
    band_order(tile, num_mt, num_nt, &gmt, &nt);
    const int e = find_expert(sched.prefix, E, gmt);
    const int m0 = (gmt - sched.prefix[e]) * BM;  // first row of the tile inside the expert
    const int row0 = sched.row_begin[e] + m0;      // ... in a and out
    const int rows_store = min(BM, sched.span[e] - m0);
    const int rows_valid = max(0, min(BM, sched.valid[e] - m0));
    const int n0 = nt * kColsOut;  // first output column
    const int cols_store = min(kColsOut, n_out - n0);
    T* const out_tile = args.out + static_cast<int64_t>(row0) * n_out + n0;

    if (rows_valid == 0) {  // rows past the expert's data: zeros, no loads (uniform per CTA)
      store_tile<T, BM, kColsOut>(out_tile, n_out, rows_store, cols_store, 0, stage);
      continue;
    }

    // Per-thread sources of this tile, fixed across the K loop.
    const T* a_src[kAIters];
    bool a_ok[kAIters];
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int r = (tid + i * kThreads) >> 2;
      a_ok[i] = r < rows_valid;
      a_src[i] = args.a + static_cast<int64_t>(row0 + (a_ok[i] ? r : 0)) * K;
    }
    // Tile column tc -> column of b (SwiGLU: 16 gate columns, then the 16 matching up columns,
    // per warp) and whether it exists.
    auto b_column = [&](int tc, bool* ok) -> int {
      if constexpr (kSwiglu) {
        const int cc = tc & 31;
        const int oc = n0 + (tc >> 5) * 16 + (cc & 15);
        *ok = oc < n_out;
        return cc < 16 ? oc : n_out + oc;
      } else {
        const int gc = n0 + tc;
        *ok = gc < N;
        return gc;
      }
    };
    const T* const b_e = args.b + static_cast<int64_t>(e) * K * N;
    const T* b_src[kBIters];
    bool b_ok[kBIters];
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int id = tid + i * kThreads;
      if constexpr (kTransB) {  // [kBN][kBK]: row id / 4 is a column of b
        const int gc = b_column(id >> 2, &b_ok[i]);
        b_src[i] = b_e + static_cast<int64_t>(b_ok[i] ? gc : 0) * K;
      } else {  // [kBK][kBN]: chunk id % 16 of row id / 16
        const int gc = b_column((id & 15) * 8, &b_ok[i]);
        b_src[i] = b_e + (b_ok[i] ? gc : 0);
      }
    }

    auto load = [&](int slot, int kt) {
      const int k0 = kt * kBK;
#pragma unroll
      for (int i = 0; i < kAIters; ++i) {
        const int id = tid + i * kThreads;
        const int r = id >> 2, c = id & 3;
        const bool ok = a_ok[i] && k0 + c * 8 < K;
        cp_async_16(a_smem + slot * kAStage + kmajor_chunk(r, c) * 16, ok ? a_src[i] + k0 + c * 8 : args.a, ok);
      }
#pragma unroll
      for (int i = 0; i < kBIters; ++i) {
        const int id = tid + i * kThreads;
        if constexpr (kTransB) {
          const int r = id >> 2, c = id & 3;
          const bool ok = b_ok[i] && k0 + c * 8 < K;
          cp_async_16(b_smem + slot * kBStage + kmajor_chunk(r, c) * 16, ok ? b_src[i] + k0 + c * 8 : args.b, ok);
        } else {
          const int r = id >> 4, c = id & 15;
          const bool ok = b_ok[i] && k0 + r < K;
          cp_async_16(b_smem + slot * kBStage + rowmajor_chunk(r, c) * 16,
                      ok ? b_src[i] + static_cast<int64_t>(k0 + r) * N : args.b, ok);
        }
      }
    };

    float acc[MI][4][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.f;

    pipeline(num_k, load, [&](int slot) {
      mma_stage<T, BM, false, kTransB>(acc, a_smem + slot * kAStage, b_smem + slot * kBStage, wm, wn, lane);
    });

    // Epilogue in registers: bias, activation, row scale; staged as the element type.
    const int g = lane >> 2, t4 = lane & 3;
    float2 bias_lo[kNiOut], bias_hi[kNiOut];  // gate (or only) half, up half
#pragma unroll
    for (int ni = 0; ni < kNiOut; ++ni) {
      bias_lo[ni] = bias_hi[ni] = make_float2(0.f, 0.f);
      const int oc = n0 + wn * kWarpColsOut + ni * 8 + 2 * t4;
      if (args.bias != nullptr && oc < n_out) {
        const T* be = args.bias + static_cast<int64_t>(e) * N;
        bias_lo[ni] = Elem<T>::unpack(*reinterpret_cast<const uint32_t*>(be + oc));
        if constexpr (kSwiglu) bias_hi[ni] = Elem<T>::unpack(*reinterpret_cast<const uint32_t*>(be + n_out + oc));
      }
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * (BM / 2) + mi * 16 + g + 8 * h;
        float scale = 1.f;
        if (args.row_scale != nullptr && r < rows_valid) scale = args.row_scale[row0 + r];
#pragma unroll
        for (int ni = 0; ni < kNiOut; ++ni) {
          float v0 = acc[mi][ni][2 * h] + bias_lo[ni].x;
          float v1 = acc[mi][ni][2 * h + 1] + bias_lo[ni].y;
          if constexpr (kSwiglu) {
            const float u0 = acc[mi][ni + 2][2 * h] + bias_hi[ni].x;
            const float u1 = acc[mi][ni + 2][2 * h + 1] + bias_hi[ni].y;
            v0 = silu(v0) * u0;
            v1 = silu(v1) * u1;
          }
          const int c = wn * kWarpColsOut + ni * 8 + 2 * t4;
          *reinterpret_cast<uint32_t*>(stage + r * kPitch + c) = Elem<T>::pack(v0 * scale, v1 * scale);
        }
      }
    }
    __syncthreads();
    store_tile<T, BM, kColsOut>(out_tile, n_out, rows_store, cols_store, rows_valid, stage);
    __syncthreads();  // the staging tile is the next tile's pipeline
  }
}

// ---- weight-gradient kernel -----------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) grouped_gemm_wgrad_kernel(const WgradArgs<T> args) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int64_t scan_tmp[kWarps];
  constexpr int BM = 128;
  constexpr int MI = BM / 32;
  constexpr int kStage = kBK * 128 * 2;  // both operands: [kBK][128]
  constexpr int kPitch = kBN + 8;
  static_assert(BM * kPitch * 2 <= kWgradPipeBytes, "the staging tile must fit in the pipeline");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int E = args.groups.num_experts;
  const int M = args.m, N = args.n;

  const Schedule sched = carve_schedule(smem + kWgradPipeBytes, E);
  build_schedule<kThreads>(args.groups, 0, sched, scan_tmp);

  const uint32_t x_smem = smem_addr(smem);
  const uint32_t y_smem = x_smem + kStages * kStage;
  T* const stage = reinterpret_cast<T*>(smem);
  const int num_mt = ceil_div_i(M, BM), num_nt = ceil_div_i(N, kBN);
  const int per_expert = num_mt * num_nt;
  const int num_tiles = E * per_expert;

  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int e = tile / per_expert;
    int mt, nt;
    band_order(tile - e * per_expert, num_mt, num_nt, &mt, &nt);
    const int m0 = mt * BM, n0 = nt * kBN;
    const int rows = sched.valid[e];  // the reduction length
    const int row0 = sched.row_begin[e];
    const int rows_store = min(BM, M - m0), cols_store = min(kBN, N - n0);
    T* const out_tile = args.out + static_cast<int64_t>(e) * M * N + static_cast<int64_t>(m0) * N + n0;

    if (rows == 0) {  // an expert without rows: dW_e = 0
      store_tile<T, BM, kBN>(out_tile, N, rows_store, cols_store, 0, stage);
      continue;
    }

    // Each thread copies chunk (tid & 15) of rows tid / 16 and tid / 16 + 16 of both operands.
    const int c = tid & 15;
    const bool x_col_ok = m0 + c * 8 < M, y_col_ok = n0 + c * 8 < N;
    const T* const x_col = args.x + static_cast<int64_t>(row0) * M + (x_col_ok ? m0 + c * 8 : 0);
    const T* const y_col = args.y + static_cast<int64_t>(row0) * N + (y_col_ok ? n0 + c * 8 : 0);
    auto load = [&](int slot, int kt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = (tid >> 4) + i * 16;
        const int k = kt * kBK + r;
        const bool row_ok = k < rows;
        const int dst = rowmajor_chunk(r, c) * 16;
        const bool xo = row_ok && x_col_ok, yo = row_ok && y_col_ok;
        cp_async_16(x_smem + slot * kStage + dst, xo ? x_col + static_cast<int64_t>(k) * M : args.x, xo);
        cp_async_16(y_smem + slot * kStage + dst, yo ? y_col + static_cast<int64_t>(k) * N : args.y, yo);
      }
    };

    float acc[MI][4][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.f;

    pipeline(ceil_div_i(rows, kBK), load, [&](int slot) {
      mma_stage<T, BM, true, false>(acc, x_smem + slot * kStage, y_smem + slot * kStage, wm, wn, lane);
    });

    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * (BM / 2) + mi * 16 + g + 8 * h;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int col = wn * 32 + ni * 8 + 2 * t4;
          *reinterpret_cast<uint32_t*>(stage + r * kPitch + col) =
              Elem<T>::pack(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        }
      }
    }
    __syncthreads();
    store_tile<T, BM, kBN>(out_tile, N, rows_store, cols_store, BM, stage);
    __syncthreads();
  }
}

// ---- host side ------------------------------------------------------------------------------------------

template <typename T, int BM, bool kTransB, bool kSwiglu>
void launch_fwd(const FwdArgs<T>& args, int64_t max_tiles, cudaStream_t stream) {
  if (max_tiles <= 0) return;
  constexpr auto kernel = grouped_gemm_fwd_kernel<T, BM, kTransB, kSwiglu>;
  const int smem = fwd_pipe_bytes<BM>() + schedule_bytes(args.groups.num_experts);
  const int max_smem = fwd_pipe_bytes<BM>() + schedule_bytes(static_cast<int>(kGroupedGemmMaxExperts));
  const int device = current_device();
  const unsigned grid = persistent_grid(
      max_tiles, device, resident_ctas<kernel>(kThreads, device, smem, max_smem, schedule_bucket(args.groups.num_experts)));
  kernel<<<grid, kThreads, smem, stream>>>(args);
  MOE_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_wgrad(const WgradArgs<T>& args, int64_t max_tiles, cudaStream_t stream) {
  if (max_tiles <= 0) return;
  constexpr auto kernel = grouped_gemm_wgrad_kernel<T>;
  const int smem = kWgradPipeBytes + schedule_bytes(args.groups.num_experts);
  const int max_smem = kWgradPipeBytes + schedule_bytes(static_cast<int>(kGroupedGemmMaxExperts));
  const int device = current_device();
  const unsigned grid = persistent_grid(
      max_tiles, device, resident_ctas<kernel>(kThreads, device, smem, max_smem, schedule_bucket(args.groups.num_experts)));
  kernel<<<grid, kThreads, smem, stream>>>(args);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe_ext::kernels::gemm_detail
