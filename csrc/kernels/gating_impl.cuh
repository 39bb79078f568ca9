// Private to the gating kernels (gating.cu, gating_f32.cu, gating_bf16.cu, gating_f16.cu,
// gating_f64.cu): the row-level device code shared by the forward routing kernel and the backward
// gradient kernel, templated on the logits type and on VPT, the experts each lane holds. The
// templates are instantiated once per logits type, one .cu file per type, so that they compile
// in parallel. See gating.cu for the design.
#pragma once

#include "kernels/device_info.cuh"
#include "kernels/exception.cuh"
#include "kernels/gating.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace moe_ext::kernels::gating_detail {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kRouteWarps = 8;        // warps per block of the routing and gradient kernels (fewer when smem is short)
constexpr int64_t kMinTileRows = 8;
constexpr int64_t kMaxTileRows = 64;  // in-tile ranks: one 64-bit row mask per expert
constexpr size_t kSmemBudget = 160 * 1024;

// ---- token tiles -------------------------------------------------------------------------------
// The forward works on tiles of consecutive tokens, one block each. A tile never straddles a
// sequence (seq_len, or all T tokens without it), exactly like the CPU op's blocks, so that the
// per-tile partial sums add up to per-sequence sums. rows_per_tile depends only on T: the tiling,
// hence every floating-point reduction order, is the same on every GPU.
struct Layout {
  int64_t num_tokens = 0;
  int64_t rows_per_tile = kMinTileRows;
  int64_t seq_len = 0;  // effective: the seq_len argument, or num_tokens without it
  int64_t num_seqs = 0;
  int64_t tiles_per_seq = 0;
  int64_t num_tiles = 0;

  __host__ __device__ int64_t tile_begin(int64_t b) const {
    return (b / tiles_per_seq) * seq_len + (b % tiles_per_seq) * rows_per_tile;
  }
  __host__ __device__ int64_t tile_end(int64_t b) const {
    const int64_t end = tile_begin(b) + rows_per_tile, seq_end = (b / tiles_per_seq + 1) * seq_len;
    return end < seq_end ? end : seq_end;
  }
  __host__ __device__ int64_t tile_of(int64_t t) const {
    const int64_t s = t / seq_len;
    return s * tiles_per_seq + (t - s * seq_len) / rows_per_tile;
  }
  // The same in 32-bit arithmetic (num_tokens < 2^31 is checked on the host).
  __device__ uint32_t tile_of32(uint32_t t) const {
    const uint32_t L = static_cast<uint32_t>(seq_len), s = t / L;
    return s * static_cast<uint32_t>(tiles_per_seq) + (t - s * L) / static_cast<uint32_t>(rows_per_tile);
  }
};

inline Layout make_layout(int64_t num_tokens, int64_t seq_len, int64_t tile_rows = 0) {
  Layout L;
  L.num_tokens = num_tokens;
  // About 256 tiles when T allows (two per SM on an H100), between 8 and 64 rows each.
  int64_t rows = kMinTileRows;
  while (rows < kMaxTileRows && rows * 2 * 256 <= num_tokens) rows *= 2;
  if (tile_rows > 0) rows = tile_rows;  // (a tuning experiment's choice, checked by the caller)
  L.rows_per_tile = rows;
  L.seq_len = seq_len > 0 ? seq_len : num_tokens;
  L.num_seqs = L.seq_len > 0 ? num_tokens / L.seq_len : 0;
  L.tiles_per_seq = (L.seq_len + rows - 1) / rows;
  L.num_tiles = L.num_seqs * L.tiles_per_seq;
  return L;
}

// Group-limited routing: G groups of `size` consecutive experts, `topk` of them allowed. G = 0
// when off (also when topk == G: every group is allowed, nothing to compute). `team` lanes (a
// power of two) compute one group's score together.
struct GroupArgs {
  int G = 0, topk = 0, size = 0, team = 1;
  int lanes = 0;  // > 0: every lane's chunk lies inside one group of `lanes` lanes (a power of two)
};

// The aligned layout: group size a multiple of VPT, lanes per group a power of two (E=256 with 8
// groups: VPT 8, 4 lanes per group). 0 when the generic shared-memory path is needed.
inline int aligned_group_lanes(const GroupArgs& g, int vpt) {
  if (g.G == 0 || g.size % vpt != 0) return 0;
  const int lanes = g.size / vpt;
  return (lanes & (lanes - 1)) == 0 && lanes <= 32 ? lanes : 0;
}

inline GroupArgs make_groups(int64_t num_experts, int64_t num_groups, int64_t topk_groups) {
  GroupArgs g;
  if (num_groups <= 0 || topk_groups >= num_groups) return g;
  g.G = static_cast<int>(num_groups);
  g.topk = static_cast<int>(topk_groups);
  g.size = static_cast<int>(num_experts / num_groups);
  g.team = 1;
  if (g.G <= kWarp)
    while (g.team * 2 * g.G <= kWarp) g.team *= 2;
  return g;
}

// ---- element types ------------------------------------------------------------------------------
// Rows travel as raw bits (16, 32 or 64-bit words) so that a prefetched row costs registers only;
// they become the accumulation type where they are used.
template <typename scalar_t>
struct Types;
template <>
struct Types<float> {
  using acc_t = float;
  using bits_t = uint32_t;
};
template <>
struct Types<double> {
  using acc_t = double;
  using bits_t = unsigned long long;
};
template <>
struct Types<__half> {
  using acc_t = float;
  using bits_t = unsigned short;
};
template <>
struct Types<__nv_bfloat16> {
  using acc_t = float;
  using bits_t = unsigned short;
};

template <typename scalar_t>
__device__ __forceinline__ typename Types<scalar_t>::acc_t to_acc(typename Types<scalar_t>::bits_t b);
template <>
__device__ __forceinline__ float to_acc<float>(uint32_t b) { return __uint_as_float(b); }
template <>
__device__ __forceinline__ double to_acc<double>(unsigned long long b) {
  return __longlong_as_double(static_cast<long long>(b));
}
template <>
__device__ __forceinline__ float to_acc<__half>(unsigned short b) { return __half2float(__ushort_as_half(b)); }
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(unsigned short b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

template <typename scalar_t>
__device__ __forceinline__ typename Types<scalar_t>::bits_t from_acc(typename Types<scalar_t>::acc_t v);
template <>
__device__ __forceinline__ uint32_t from_acc<float>(float v) { return __float_as_uint(v); }
template <>
__device__ __forceinline__ unsigned long long from_acc<double>(double v) {
  return static_cast<unsigned long long>(__double_as_longlong(v));
}
template <>
__device__ __forceinline__ unsigned short from_acc<__half>(float v) { return __half_as_ushort(__float2half_rn(v)); }
template <>
__device__ __forceinline__ unsigned short from_acc<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// Element j of a vector held as 32-bit words, and the reverse.
template <typename bits_t>
__device__ __forceinline__ bits_t word_extract(const uint32_t* w, int j) {
  if constexpr (sizeof(bits_t) == 2) return static_cast<bits_t>(w[j >> 1] >> ((j & 1) * 16));
  else if constexpr (sizeof(bits_t) == 4) return static_cast<bits_t>(w[j]);
  else return (static_cast<bits_t>(w[2 * j + 1]) << 32) | static_cast<bits_t>(w[2 * j]);
}
template <typename bits_t>
__device__ __forceinline__ void word_insert(uint32_t* w, int j, bits_t b) {
  if constexpr (sizeof(bits_t) == 2) w[j >> 1] |= static_cast<uint32_t>(b) << ((j & 1) * 16);
  else if constexpr (sizeof(bits_t) == 4) w[j] = static_cast<uint32_t>(b);
  else {
    w[2 * j] = static_cast<uint32_t>(b);
    w[2 * j + 1] = static_cast<uint32_t>(b >> 32);
  }
}

// A lane's chunk of a row: elements [base, base + VPT). Global loads are 16/8/4-byte vectors when
// the whole chunk is inside the row and the caller says the row start is aligned for them.
template <typename bits_t, int VPT>
struct Chunk {
  static constexpr int kBytes = VPT * static_cast<int>(sizeof(bits_t));
  static constexpr int kVec = kBytes % 16 == 0 ? 16 : kBytes % 8 == 0 ? 8 : kBytes % 4 == 0 ? 4 : 0;
  static constexpr int kWords = kVec / 4;
  static constexpr int kPerVec = kVec ? kVec / static_cast<int>(sizeof(bits_t)) : 1;
  static constexpr int kNumVec = kVec ? kBytes / kVec : 0;

  // Whether rows of n elements starting at p allow the vector path.
  static bool aligned(const void* p, int64_t n) {
    constexpr int kDiv = kVec ? kVec : 1;
    return kVec != 0 && reinterpret_cast<uintptr_t>(p) % kDiv == 0 &&
           (n * static_cast<int64_t>(sizeof(bits_t))) % kDiv == 0;
  }

  __device__ __forceinline__ static void load(const bits_t* row, int base, int n, bool vec, bits_t (&out)[VPT]) {
    if constexpr (kVec != 0) {
      if (vec && base + VPT <= n) {
        const char* p = reinterpret_cast<const char*>(row + base);
#pragma unroll
        for (int v = 0; v < kNumVec; ++v) {
          uint32_t w[kWords];
          if constexpr (kVec == 16) {
            const uint4 q = __ldg(reinterpret_cast<const uint4*>(p) + v);
            w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
          } else if constexpr (kVec == 8) {
            const uint2 q = __ldg(reinterpret_cast<const uint2*>(p) + v);
            w[0] = q.x, w[1] = q.y;
          } else {
            w[0] = __ldg(reinterpret_cast<const unsigned int*>(p) + v);
          }
#pragma unroll
          for (int j = 0; j < kPerVec; ++j) out[v * kPerVec + j] = word_extract<bits_t>(w, j);
        }
        return;
      }
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) out[i] = base + i < n ? __ldg(row + base + i) : bits_t(0);
  }

  __device__ __forceinline__ static void store(bits_t* row, int base, int n, bool vec, const bits_t (&in)[VPT]) {
    if constexpr (kVec != 0) {
      if (vec && base + VPT <= n) {
        char* p = reinterpret_cast<char*>(row + base);
#pragma unroll
        for (int v = 0; v < kNumVec; ++v) {
          uint32_t w[kWords];
#pragma unroll
          for (int j = 0; j < kWords; ++j) w[j] = 0;
#pragma unroll
          for (int j = 0; j < kPerVec; ++j) word_insert<bits_t>(w, j, in[v * kPerVec + j]);
          if constexpr (kVec == 16) reinterpret_cast<uint4*>(p)[v] = make_uint4(w[0], w[1], w[2], w[3]);
          else if constexpr (kVec == 8) reinterpret_cast<uint2*>(p)[v] = make_uint2(w[0], w[1]);
          else reinterpret_cast<unsigned int*>(p)[v] = w[0];
        }
        return;
      }
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (base + i < n) row[base + i] = in[i];
  }
};

// Shared-memory chunks of 32- or 64-bit values, 16-byte accesses where the chunk allows.
template <typename T>
__device__ __forceinline__ T from_bits(unsigned long long b) {
  if constexpr (std::is_same_v<T, float>) return __uint_as_float(static_cast<uint32_t>(b));
  else if constexpr (std::is_same_v<T, double>) return __longlong_as_double(static_cast<long long>(b));
  else return static_cast<T>(b);
}
template <typename T>
__device__ __forceinline__ unsigned long long to_bits(T v) {
  if constexpr (std::is_same_v<T, float>) return __float_as_uint(v);
  else if constexpr (std::is_same_v<T, double>) return static_cast<unsigned long long>(__double_as_longlong(v));
  else return static_cast<unsigned long long>(v);
}

template <typename T, int VPT>
__device__ __forceinline__ void lds_chunk(const T* p, T (&out)[VPT]) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- or 64-bit values");
  if constexpr ((VPT * sizeof(T)) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < VPT / kPer; ++v) {
      const uint4 q = reinterpret_cast<const uint4*>(p)[v];
      if constexpr (sizeof(T) == 4) {
        out[4 * v + 0] = from_bits<T>(q.x), out[4 * v + 1] = from_bits<T>(q.y);
        out[4 * v + 2] = from_bits<T>(q.z), out[4 * v + 3] = from_bits<T>(q.w);
      } else {
        out[2 * v + 0] = from_bits<T>((static_cast<unsigned long long>(q.y) << 32) | q.x);
        out[2 * v + 1] = from_bits<T>((static_cast<unsigned long long>(q.w) << 32) | q.z);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) out[i] = p[i];
  }
}

template <typename T, int VPT>
__device__ __forceinline__ void sts_chunk(T* p, const T (&in)[VPT]) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- or 64-bit values");
  if constexpr ((VPT * sizeof(T)) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < VPT / kPer; ++v) {
      uint4 q;
      if constexpr (sizeof(T) == 4) {
        q.x = static_cast<uint32_t>(to_bits(in[4 * v + 0])), q.y = static_cast<uint32_t>(to_bits(in[4 * v + 1]));
        q.z = static_cast<uint32_t>(to_bits(in[4 * v + 2])), q.w = static_cast<uint32_t>(to_bits(in[4 * v + 3]));
      } else {
        const unsigned long long a = to_bits(in[2 * v]), b = to_bits(in[2 * v + 1]);
        q.x = static_cast<uint32_t>(a), q.y = static_cast<uint32_t>(a >> 32);
        q.z = static_cast<uint32_t>(b), q.w = static_cast<uint32_t>(b >> 32);
      }
      reinterpret_cast<uint4*>(p)[v] = q;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) p[i] = in[i];
  }
}

// ---- arithmetic in the accumulation type ---------------------------------------------------------
// Selection keys are order-preserving unsigned codes of the biased scores: a larger score gets a
// larger code, NaN gets the code of -inf (the CPU op orders NaN as -inf), -0 that of +0, and the
// code 0, below every real code, marks an expert that is not a candidate (taken, outside the
// allowed groups, padding). Ties between equal codes go to the lower expert index.
// NOTE: __fadd_rn / __fmul_rn keep nvcc from contracting score * (1/z) + bias into one FMA: the
// keys are rounded exactly like the CPU op's s + bias.
template <typename acc_t>
struct Math;

// NOTE: a key is never -0 (scores are >= +0 or NaN, and +0 + -0 = +0), so encode need not fold
// -0 into +0; the row max it is also used for may be -0, where either sign gives the same exp.
template <>
struct Math<float> {
  using key_t = uint32_t;
  __device__ __forceinline__ static key_t encode(float v) {
    const uint32_t u = __float_as_uint(v == v ? v : -INFINITY);
    return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
  }
  __device__ __forceinline__ static float decode(key_t c) {
    return __uint_as_float((c & 0x80000000u) ? (c & 0x7fffffffu) : ~c);
  }
  __device__ __forceinline__ static float add(float a, float b) { return __fadd_rn(a, b); }
  __device__ __forceinline__ static float sub(float a, float b) { return __fsub_rn(a, b); }
  __device__ __forceinline__ static float mul(float a, float b) { return __fmul_rn(a, b); }
  __device__ __forceinline__ static float div(float a, float b) { return __fdiv_rn(a, b); }
  __device__ __forceinline__ static float rcp(float a) { return __frcp_rn(a); }
  // NOTE: expf, not __expf: the fast one flushes results below 2^-126 to 0 (and loses |a| * 6e-8
  // relative), so experts ~88 below the row max would tie on the GPU and be told apart on the CPU
  // (logits [0, -100, -95, -90], k=3). A few more instructions per score; the pass is memory-bound.
  __device__ __forceinline__ static float exp(float a) { return expf(a); }
  __device__ __forceinline__ static float log(float a) { return logf(a); }
  __device__ __forceinline__ static float max(float a, float b) { return fmaxf(a, b); }
};

template <>
struct Math<double> {
  using key_t = unsigned long long;
  __device__ __forceinline__ static key_t encode(double v) {
    const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(v == v ? v : -INFINITY));
    return u ^ (static_cast<unsigned long long>(static_cast<long long>(u) >> 63) | 0x8000000000000000ull);
  }
  __device__ __forceinline__ static double decode(key_t c) {
    return __longlong_as_double(static_cast<long long>((c >> 63) ? (c & 0x7fffffffffffffffull) : ~c));
  }
  __device__ __forceinline__ static double add(double a, double b) { return __dadd_rn(a, b); }
  __device__ __forceinline__ static double sub(double a, double b) { return __dsub_rn(a, b); }
  __device__ __forceinline__ static double mul(double a, double b) { return __dmul_rn(a, b); }
  __device__ __forceinline__ static double div(double a, double b) { return __ddiv_rn(a, b); }
  __device__ __forceinline__ static double rcp(double a) { return __drcp_rn(a); }
  __device__ __forceinline__ static double exp(double a) { return ::exp(a); }
  __device__ __forceinline__ static double log(double a) { return ::log(a); }
  __device__ __forceinline__ static double max(double a, double b) { return fmax(a, b); }
};

// ---- warp reductions (all lanes get the same bits: xor butterflies add commutatively) ----------
__device__ __forceinline__ uint32_t warp_max_key(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFull, v);
#else
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
#endif
}
__device__ __forceinline__ unsigned long long warp_max_key(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ uint32_t warp_min_u32(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_min_sync(kFull, v);
#else
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFull, v, o));
  return v;
#endif
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = v + __shfl_xor_sync(kFull, v, o);
  return v;
}
template <typename acc_t>
__device__ __forceinline__ acc_t warp_max_value(acc_t v) {
  return Math<acc_t>::decode(warp_max_key(Math<acc_t>::encode(v)));
}

// ---- one row: scores ----------------------------------------------------------------------------
template <typename acc_t, int VPT>
struct RowScores {
  acc_t s[VPT];   // softmax or sigmoid scores; 0 for padding
  acc_t ex[VPT];  // exp(l - max); 0 for padding
  acc_t lse;      // logsumexp(l) (the z-loss needs it for sigmoid too)
  acc_t inv_z;    // 1 / sum(exp(l - max))
  acc_t score_sum;  // sum of the scores (1 for softmax)
};

// l: the lane's chunk of logits (+ noise) in the accumulation type, -inf past the last expert
// (padding then adds exp(-inf) = 0 everywhere; only a row whose max is -inf, all -inf or NaN, gets
// NaN from it, and the CPU op's sum is NaN there too).
template <typename acc_t, int VPT>
__device__ __forceinline__ void row_scores(const acc_t (&l)[VPT], bool sigmoid, RowScores<acc_t, VPT>& r) {
  using M = Math<acc_t>;
  acc_t m = -INFINITY;
#pragma unroll
  for (int i = 0; i < VPT; ++i) m = M::max(m, l[i]);  // NaN never wins, as with std::max on the CPU
  m = warp_max_value(m);
  acc_t z = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    r.ex[i] = M::exp(M::sub(l[i], m));
    z = M::add(z, r.ex[i]);
  }
  z = warp_sum(z);
  r.lse = M::add(m, M::log(z));
  r.inv_z = M::rcp(z);
  if (!sigmoid) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) r.s[i] = M::mul(r.ex[i], r.inv_z);
    r.score_sum = 1;
  } else {
    acc_t sum = 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      r.s[i] = M::rcp(M::add(acc_t(1), M::exp(-l[i])));  // 0 for padding: 1 / (1 + inf)
      sum = M::add(sum, r.s[i]);
    }
    r.score_sum = warp_sum(sum);
  }
}

// ---- one row: selection --------------------------------------------------------------------------
// The best two remaining keys of a chunk, as (code, position), in the order (key desc, position
// asc); 0 = none.
template <int VPT, typename key_t>
__device__ __forceinline__ void chunk_top2(const key_t (&c)[VPT], key_t& b1, int& i1, key_t& b2, int& i2) {
  b1 = 0, i1 = 0, b2 = 0, i2 = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const key_t x = c[i];
    const bool gt1 = x > b1, gt2 = x > b2;
    b2 = gt1 ? b1 : (gt2 ? x : b2);
    i2 = gt1 ? i1 : (gt2 ? i : i2);
    b1 = gt1 ? x : b1;
    i1 = gt1 ? i : i1;
  }
}

// k rounds of a warp argmax over the row's keys: the warp takes the largest code among the lanes'
// current bests (redux.sync max on sm_80+) and, among the lanes holding it, the lowest expert
// index (redux.sync min): ties go to the lower index. Every lane caches its chunk's best two keys;
// the winner clears its key in kbuf (this warp's copy of the keys) and moves to its cached second,
// and a lane that wins again before rescanning rescans its chunk from kbuf (about 0.7 rescans per
// row for E=256, k=8). Lanes read and write only their own chunk of kbuf.
// Returns, on lane j < k, the j-th choice (best first); -1 on the other lanes.
template <int VPT, typename key_t>
__device__ __forceinline__ int warp_topk(key_t* kbuf, const key_t (&key)[VPT], int lane, int k) {
  const int base = lane * VPT;
  key_t b1, b2;
  int i1, i2;
  chunk_top2(key, b1, i1, b2, i2);
  bool has2 = true;
  int mine = -1;
  for (int j = 0; j < k; ++j) {
    const key_t top = warp_max_key(b1);
    const bool holds = b1 == top && b1 != 0;
    const uint32_t idx = static_cast<uint32_t>(base + i1);
    const uint32_t win = warp_min_u32(holds ? idx : 0xffffffffu);
    if (lane == j) mine = static_cast<int>(win);
    bool rescan = false;
    if (holds && idx == win) {
      kbuf[win] = 0;
      if (has2) b1 = b2, i1 = i2, has2 = false;
      else rescan = true;
    }
    if (__any_sync(kFull, rescan) && rescan) {
      key_t c[VPT];
      lds_chunk<key_t, VPT>(kbuf + base, c);
      chunk_top2(c, b1, i1, b2, i2);
      has2 = true;
    }
  }
  return mine;
}

// Group scores into gbuf[G] as keys: the sum of the group's two largest keys (the largest alone
// for groups of one), NaN ordering as -inf, added in the accumulation type like the CPU op.
// A team of lanes scans one group's keys with a stride, then combines its top-2 pairs.
template <typename acc_t, typename key_t>
__device__ __forceinline__ void group_scores(const key_t* kbuf, key_t* gbuf, const GroupArgs& g, int lane) {
  using M = Math<acc_t>;
  const int per_pass = kWarp / g.team;
  for (int g0 = 0; g0 < g.G; g0 += per_pass) {
    const int grp = g0 + lane / g.team, r = lane & (g.team - 1);
    key_t b1 = 0, b2 = 0;
    if (grp < g.G) {
      const key_t* p = kbuf + static_cast<int64_t>(grp) * g.size;
      for (int j = r; j < g.size; j += g.team) {
        const key_t x = p[j];
        b2 = max(b2, min(b1, x));
        b1 = max(b1, x);
      }
    }
    for (int off = 1; off < g.team; off <<= 1) {
      const key_t p1 = __shfl_xor_sync(kFull, b1, off), p2 = __shfl_xor_sync(kFull, b2, off);
      b2 = max(max(b2, p2), min(b1, p1));
      b1 = max(b1, p1);
    }
    if (grp < g.G && r == 0) {
      acc_t v = M::decode(b1);
      if (g.size >= 2) v = M::add(v, M::decode(b2));
      gbuf[grp] = M::encode(v);
    }
  }
}

// The best g.topk groups (ties to the lower group): their entries of gbuf become 0.
template <typename key_t>
__device__ __forceinline__ void select_groups(key_t* gbuf, const GroupArgs& g, int lane) {
  const int per = (g.G + kWarp - 1) / kWarp;
  const int b0 = min(lane * per, g.G), b1 = min(b0 + per, g.G);
  for (int j = 0; j < g.topk; ++j) {
    key_t best = 0;
    int bi = -1;
    for (int i = b0; i < b1; ++i) {
      const key_t x = gbuf[i];
      if (x > best) best = x, bi = i;
    }
    const key_t top = warp_max_key(best);
    const bool holds = bi >= 0 && best == top;
    const uint32_t win = warp_min_u32(holds ? static_cast<uint32_t>(bi) : 0xffffffffu);
    if (holds && static_cast<uint32_t>(bi) == win) gbuf[win] = 0;
  }
}

// Per-lane group position of its first expert, computed once per kernel.
struct LaneGroup {
  int first = 0, bound = 0;
  __device__ LaneGroup(const GroupArgs& g, int base) {
    if (g.G > 0) {
      first = base / g.size;
      bound = (first + 1) * g.size;
    }
  }
};

// Selects the row's k experts from its keys (in registers, this lane's chunk). kbuf/gbuf: this
// warp's shared buffers. Returns on lane j < k the j-th choice. Ends with the warp converged but
// without a trailing __syncwarp (the caller adds one before it reuses the buffers).
template <typename acc_t, int VPT>
__device__ __forceinline__ int select_experts(typename Math<acc_t>::key_t (&key)[VPT],
                                              typename Math<acc_t>::key_t* kbuf,
                                              typename Math<acc_t>::key_t* gbuf, const GroupArgs& g,
                                              const LaneGroup& lg, int lane, int E, int k) {
  using M = Math<acc_t>;
  using key_t = typename M::key_t;
  const int base = lane * VPT;
  if (g.G > 0 && g.lanes > 0) {
    // Aligned: the group's top-2 from the lanes' own chunks and a butterfly over its lanes; then
    // g.topk rounds of warp argmax over the lanes' group scores (the lowest lane holding the
    // best score belongs to the lowest such group).
    const int grp = lane / g.lanes;
    key_t b1 = 0, b2 = 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      b2 = max(b2, min(b1, key[i]));
      b1 = max(b1, key[i]);
    }
    for (int off = 1; off < g.lanes; off <<= 1) {
      const key_t p1 = __shfl_xor_sync(kFull, b1, off), p2 = __shfl_xor_sync(kFull, b2, off);
      b2 = max(max(b2, p2), min(b1, p1));
      b1 = max(b1, p1);
    }
    acc_t v = M::decode(b1);
    if (g.size >= 2) v = M::add(v, M::decode(b2));
    key_t gval = grp < g.G ? M::encode(v) : key_t(0);
    bool chosen = false;
    for (int j = 0; j < g.topk; ++j) {
      const key_t top = warp_max_key(gval);
      const uint32_t first = warp_min_u32(gval == top && gval != 0 ? static_cast<uint32_t>(lane) : 32u);
      if (grp == static_cast<int>(first) / g.lanes) chosen = true, gval = 0;
    }
    if (!chosen) {
#pragma unroll
      for (int i = 0; i < VPT; ++i) key[i] = 0;
    }
  } else if (g.G > 0) {
    sts_chunk<key_t, VPT>(kbuf + base, key);
    __syncwarp();
    group_scores<acc_t>(kbuf, gbuf, g, lane);
    __syncwarp();
    select_groups(gbuf, g, lane);
    __syncwarp();
    // Keys outside the chosen groups stop being candidates.
    int grp = lg.first, bound = lg.bound;
    bool ok = grp < g.G && gbuf[grp] == 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (base + i < E) {
        if (base + i >= bound) {
          ++grp;
          bound += g.size;
          ok = grp < g.G && gbuf[grp] == 0;
        }
        if (!ok) key[i] = 0;
      }
    }
  }
  sts_chunk<key_t, VPT>(kbuf + base, key);
  return warp_topk<VPT>(kbuf, key, lane, k);
}

template <typename acc_t, int VPT>
__device__ __forceinline__ void make_keys(const acc_t (&s)[VPT], const acc_t (&bias)[VPT], bool has_bias, int base,
                                          int E, typename Math<acc_t>::key_t (&key)[VPT]) {
  using M = Math<acc_t>;
  if (has_bias) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) key[i] = M::encode(M::add(s[i], bias[i]));
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) key[i] = M::encode(s[i]);
  }
  if (base + VPT > E) {  // only the lane holding the last expert, and lanes past it
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (base + i >= E) key[i] = 0;
  }
}

// Per-warp shared memory of the row kernels: keys, scores, (backward) score gradients, group keys.
template <typename acc_t>
struct WarpSmem {
  using key_t = typename Math<acc_t>::key_t;
  static size_t bytes(int vpt, int groups, bool grad) {
    const size_t n = static_cast<size_t>(vpt) * kWarp;
    size_t b = n * sizeof(key_t) + n * sizeof(acc_t) + (grad ? n * sizeof(acc_t) : 0) +
               static_cast<size_t>((groups + 3) / 4 * 4) * sizeof(key_t);
    return (b + 15) / 16 * 16;
  }
};

// ---- what both row kernels read ----------------------------------------------------------------
template <typename acc_t>
struct RowArgs {
  const void* logits = nullptr;
  const acc_t* noise = nullptr;
  const acc_t* bias = nullptr;
  Layout L;
  int E = 0, k = 0;
  bool sigmoid = false, renormalize = true;
  GroupArgs groups;
  int warps = kRouteWarps;  // the routing kernel: at most this many (RowArgs from GatingProblem::route_warps)
  size_t warp_smem = 0;  // bytes per warp (WarpSmem::bytes)
  int64_t seq_len_arg = 0;
};

// This lane's chunk of expert_bias (0 past E or without a bias).
template <typename acc_t, int VPT>
__device__ __forceinline__ void lane_bias(const acc_t* bias, int base, int E, acc_t (&out)[VPT]) {
#pragma unroll
  for (int i = 0; i < VPT; ++i) out[i] = (bias != nullptr && base + i < E) ? bias[base + i] : acc_t(0);
}

// This lane's chunk of a row's logits in the accumulation type, the noise added (when given);
// -inf past E, where no expert is.
template <typename scalar_t, int VPT>
__device__ __forceinline__ void lane_logits(const typename Types<scalar_t>::bits_t (&raw)[VPT],
                                            const typename Types<typename Types<scalar_t>::acc_t>::bits_t (&noise)[VPT],
                                            bool has_noise, int base, int E,
                                            typename Types<scalar_t>::acc_t (&l)[VPT]) {
  using acc_t = typename Types<scalar_t>::acc_t;
#pragma unroll
  for (int i = 0; i < VPT; ++i) l[i] = to_acc<scalar_t>(raw[i]);
  if (has_noise) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) l[i] = Math<acc_t>::add(l[i], to_acc<acc_t>(noise[i]));
  }
  if (base + VPT > E) {
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (base + i >= E) l[i] = -INFINITY;
  }
}

// ---- the routing kernel (forward, and the backward's counting pass) -----------------------------
template <typename acc_t>
struct RouteArgs : RowArgs<acc_t> {
  // Outputs; null ones are skipped. The backward's counting pass sets only tile_counts.
  acc_t* weights = nullptr;     // [T, k] before drops
  int32_t* idx = nullptr;       // [T, k] before drops
  int32_t* positions = nullptr; // [T, k] rank inside the expert within the tile
  int32_t* tile_counts = nullptr;  // [num_tiles, E]
  acc_t* tile_p = nullptr;         // [num_tiles, E] sums of the normalised scores
  double* tile_lse2 = nullptr;     // [num_tiles] sums of lse^2
  // Counting pass only: skip the whole pass when neither loss gradient needs the counts.
  const acc_t* grad_aux = nullptr;
  const acc_t* grad_seq = nullptr;
};

// The backward needs pre-drop counts only when a balancing-loss gradient can be nonzero.
template <typename acc_t>
__device__ __forceinline__ bool needs_counts(const acc_t* grad_aux, const acc_t* grad_seq, int64_t seq_len) {
  return !(*grad_aux == acc_t(0) && (seq_len == 0 || *grad_seq == acc_t(0)));
}

__host__ __device__ inline size_t route_block_smem(const Layout& L, int E, int k, int warps) {
  size_t b = sizeof(double) * warps + sizeof(uint32_t) * 2 * static_cast<size_t>(E) +
             sizeof(int32_t) * static_cast<size_t>(L.rows_per_tile) * k;
  return (b + 15) / 16 * 16;
}

// One block per tile, `warps` warps, each warp routing rows warp, warp + warps, ... of the tile
// with the next row's loads in flight while it computes the current one. Then, per tile: the
// per-expert counts and every slot's rank inside its expert (from one 64-bit row mask per expert,
// set with shared-memory atomicOr, read with popc: token order, whatever order the warps ran in),
// the sums of the normalised scores and of lse^2 (per warp in registers, then across warps in
// warp order).
template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kRouteWarps* kWarp)
    route_kernel(const RouteArgs<typename Types<scalar_t>::acc_t> a, bool vec_logits, bool vec_noise) {
  using acc_t = typename Types<scalar_t>::acc_t;
  using bits_t = typename Types<scalar_t>::bits_t;
  using abits_t = typename Types<acc_t>::bits_t;
  using M = Math<acc_t>;
  using key_t = typename M::key_t;
  extern __shared__ __align__(16) unsigned char smem[];

  if (a.grad_aux != nullptr && !needs_counts(a.grad_aux, a.grad_seq, a.seq_len_arg)) return;

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int E = a.E, k = a.k, W = a.warps;
  const int64_t tile = blockIdx.x;
  const int64_t t0 = a.L.tile_begin(tile);
  const int rows = static_cast<int>(a.L.tile_end(tile) - t0);

  double* lse2_w = reinterpret_cast<double*>(smem);
  uint32_t* masks = reinterpret_cast<uint32_t*>(lse2_w + W);
  int32_t* sel = reinterpret_cast<int32_t*>(masks + 2 * E);
  unsigned char* wbase = smem + route_block_smem(a.L, E, k, W) + a.warp_smem * warp;
  key_t* kbuf = reinterpret_cast<key_t*>(wbase);
  acc_t* sbuf = reinterpret_cast<acc_t*>(kbuf + VPT * kWarp);
  key_t* gbuf = reinterpret_cast<key_t*>(sbuf + VPT * kWarp);

  for (int i = threadIdx.x; i < 2 * E; i += blockDim.x) masks[i] = 0;

  const int base = lane * VPT;
  acc_t bias[VPT];
  lane_bias(a.bias, base, E, bias);
  const LaneGroup lg(a.groups, base);
  acc_t pacc[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) pacc[i] = 0;
  double lse2 = 0;
  __syncthreads();

  const scalar_t* logits = static_cast<const scalar_t*>(a.logits);
  bits_t cur[VPT], nxt[VPT];
  abits_t ncur[VPT], nnxt[VPT];
  auto load_row = [&](int r, bits_t (&lo)[VPT], abits_t (&no)[VPT]) {
    const int64_t off = (t0 + r) * static_cast<int64_t>(E);
    Chunk<bits_t, VPT>::load(reinterpret_cast<const bits_t*>(logits + off), base, E, vec_logits, lo);
    if (a.noise != nullptr)
      Chunk<abits_t, VPT>::load(reinterpret_cast<const abits_t*>(a.noise + off), base, E, vec_noise, no);
  };
  if (warp < rows) load_row(warp, cur, ncur);

  for (int r = warp; r < rows; r += W) {
    if (r + W < rows) load_row(r + W, nxt, nnxt);
    const int64_t t = t0 + r;

    acc_t l[VPT];
    lane_logits<scalar_t>(cur, ncur, a.noise != nullptr, base, E, l);
    RowScores<acc_t, VPT> sc;
    row_scores(l, a.sigmoid, sc);
    if (a.tile_p != nullptr) {
      const acc_t inv_sum = a.sigmoid ? M::rcp(sc.score_sum) : acc_t(1);
#pragma unroll
      for (int i = 0; i < VPT; ++i) pacc[i] += a.sigmoid ? sc.s[i] * inv_sum : sc.s[i];
      if (lane == 0) lse2 += static_cast<double>(sc.lse) * static_cast<double>(sc.lse);
    }
    if (a.weights != nullptr) sts_chunk<acc_t, VPT>(sbuf + base, sc.s);

    key_t key[VPT];
    make_keys(sc.s, bias, a.bias != nullptr, base, E, key);
    const int mine = select_experts<acc_t, VPT>(key, kbuf, gbuf, a.groups, lg, lane, E, k);
    __syncwarp();

    if (a.weights != nullptr) {
      acc_t w = lane < k ? sbuf[mine] : acc_t(0);
      const acc_t sum = warp_sum(w);
      if (lane < k) {
        if (a.renormalize) w = M::div(w, sum);
        a.weights[t * k + lane] = w;
      }
    }
    if (lane < k) {
      if (a.idx != nullptr) a.idx[t * k + lane] = mine;
      sel[r * k + lane] = mine;
      atomicOr(&masks[2 * mine + (r >> 5)], 1u << (r & 31));
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < VPT; ++i) cur[i] = nxt[i], ncur[i] = nnxt[i];
  }

  // ---- tile epilogue
  if (a.tile_p != nullptr) {
    sts_chunk<acc_t, VPT>(sbuf + base, pacc);  // this warp's slab of the score sums
    if (lane == 0) lse2_w[warp] = lse2;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    if (a.tile_p != nullptr) {
      acc_t p = 0;
      for (int w = 0; w < W; ++w)
        p += reinterpret_cast<const acc_t*>(smem + route_block_smem(a.L, E, k, W) + a.warp_smem * w +
                                            sizeof(key_t) * VPT * kWarp)[e];
      a.tile_p[tile * E + e] = p;
    }
    a.tile_counts[tile * E + e] = __popc(masks[2 * e]) + __popc(masks[2 * e + 1]);
  }
  if (a.tile_lse2 != nullptr && threadIdx.x == 0) {
    double z = 0;
    for (int w = 0; w < W; ++w) z += lse2_w[w];
    a.tile_lse2[tile] = z;
  }
  if (a.positions != nullptr) {
    for (int slot = threadIdx.x; slot < rows * k; slot += blockDim.x) {
      const int r = slot / k;
      const int e = sel[slot];
      const unsigned long long m =
          (static_cast<unsigned long long>(masks[2 * e + 1]) << 32) | static_cast<unsigned long long>(masks[2 * e]);
      a.positions[t0 * k + slot] = __popcll(m & ((1ull << r) - 1ull));
    }
  }
}

// ---- the gradient kernel ------------------------------------------------------------------------
template <typename acc_t>
struct GradArgs : RowArgs<acc_t> {
  const acc_t* grad_weights = nullptr;  // [T, k]
  const acc_t* grad_aux = nullptr;      // [] each, read on the device
  const acc_t* grad_seq = nullptr;
  const acc_t* grad_z = nullptr;
  const int32_t* idx = nullptr;         // [T, k] kept choices, -1 where dropped
  const int32_t* routed = nullptr;      // [E] pre-drop assignments (valid when needs_counts)
  const int32_t* routed_seq = nullptr;  // [num_seqs, E] per sequence (valid when needs_counts and seq_len)
  void* grad_logits = nullptr;          // [T, E]
};

// One warp per token row. The scores are recomputed from the logits; the chosen experts are the
// forward's idx, except in a row where a slot was dropped and renormalize is on: there the
// pre-drop choice (whose score is in the renormalising sum) is recomputed too.
template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kRouteWarps* kWarp)
    grad_kernel(const GradArgs<typename Types<scalar_t>::acc_t> a, bool vec_logits, bool vec_noise) {
  using acc_t = typename Types<scalar_t>::acc_t;
  using bits_t = typename Types<scalar_t>::bits_t;
  using abits_t = typename Types<acc_t>::bits_t;
  using M = Math<acc_t>;
  using key_t = typename M::key_t;
  extern __shared__ __align__(16) unsigned char smem[];

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * a.warps + warp;
  if (t >= a.L.num_tokens) return;
  const int E = a.E, k = a.k;
  const int base = lane * VPT;

  unsigned char* wbase = smem + a.warp_smem * warp;
  key_t* kbuf = reinterpret_cast<key_t*>(wbase);
  acc_t* sbuf = reinterpret_cast<acc_t*>(kbuf + VPT * kWarp);
  acc_t* gsbuf = sbuf + VPT * kWarp;
  key_t* gbuf = reinterpret_cast<key_t*>(gsbuf + VPT * kWarp);

  // Loss-gradient scalars: on the device, as the CPU op scales them (the same double expressions).
  const double T = static_cast<double>(a.L.num_tokens);
  const double g_aux = static_cast<double>(*a.grad_aux), g_seq = static_cast<double>(*a.grad_seq),
               g_z = static_cast<double>(*a.grad_z);
  const bool counts = needs_counts(a.grad_aux, a.grad_seq, a.seq_len_arg);
  const double aux_scale = g_aux * static_cast<double>(E) / (T * a.L.num_tokens * k);
  const double seq_scale = a.seq_len_arg > 0 ? g_seq * static_cast<double>(E) /
                                                   (static_cast<double>(a.seq_len_arg) * a.seq_len_arg * k *
                                                    a.L.num_seqs)
                                             : 0.0;
  const double z_scale = 2.0 * g_z / T;

  // The row.
  const int64_t off = t * static_cast<int64_t>(E);
  bits_t raw[VPT];
  Chunk<bits_t, VPT>::load(reinterpret_cast<const bits_t*>(static_cast<const scalar_t*>(a.logits) + off), base, E,
                           vec_logits, raw);
  abits_t nraw[VPT];
  if (a.noise != nullptr)
    Chunk<abits_t, VPT>::load(reinterpret_cast<const abits_t*>(a.noise + off), base, E, vec_noise, nraw);
  acc_t l[VPT];
  lane_logits<scalar_t>(raw, nraw, a.noise != nullptr, base, E, l);
  RowScores<acc_t, VPT> sc;
  row_scores(l, a.sigmoid, sc);

  int kept = -1;
  acc_t gw = 0;
  if (lane < k) {
    kept = a.idx[t * k + lane];
    gw = a.grad_weights[t * k + lane];
  }
  // NOTE: idx must be the forward's output (the CPU op recomputes every row; rows without a drop
  // give the same choice). A row with a dropped slot, or an id that is not an expert, is
  // recomputed: the pre-drop choice is in the renormalising sum, and ids index shared memory.
  int chosen = kept;
  if (__any_sync(kFull, lane < k && (kept < 0 || kept >= E))) {
    acc_t bias[VPT];
    lane_bias(a.bias, base, E, bias);
    const LaneGroup lg(a.groups, base);
    key_t key[VPT];
    make_keys(sc.s, bias, a.bias != nullptr, base, E, key);
    chosen = select_experts<acc_t, VPT>(key, kbuf, gbuf, a.groups, lg, lane, E, k);
    __syncwarp();
  }

  // d loss / d score through the weights: w_j = s_j (/ S, S over the k pre-drop choices); a dropped
  // slot's weight is the constant 0.
  sts_chunk<acc_t, VPT>(sbuf + base, sc.s);
  acc_t zero[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) zero[i] = 0;
  sts_chunk<acc_t, VPT>(gsbuf + base, zero);
  __syncwarp();
  if (a.renormalize) {
    const acc_t sj = lane < k ? sbuf[chosen] : acc_t(0);
    const acc_t S = warp_sum(sj);
    const bool is_kept = lane < k && kept >= 0;
    const acc_t dot = warp_sum(is_kept ? M::mul(gw, M::div(sj, S)) : acc_t(0));
    if (lane < k) gsbuf[chosen] = M::div(M::sub(is_kept ? gw : acc_t(0), dot), S);
  } else if (lane < k && kept >= 0) {
    gsbuf[chosen] = gw;
  }
  __syncwarp();
  acc_t gs[VPT];
  lds_chunk<acc_t, VPT>(gsbuf + base, gs);

  // d loss / d pnorm, the same for every token of a sequence.
  acc_t gpn[VPT];
  const int32_t* rs = (counts && a.seq_len_arg > 0) ? a.routed_seq + (t / a.seq_len_arg) * E : nullptr;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = base + i;
    // Without counts both scales are 0, and so is this (as on the CPU).
    const double v = (counts && e < E) ? aux_scale * a.routed[e] + (rs != nullptr ? seq_scale * rs[e] : 0.0) : 0.0;
    gpn[i] = static_cast<acc_t>(v);
  }

  acc_t g[VPT];
  if (!a.sigmoid) {
    acc_t dot = 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) dot += base + i < E ? (gs[i] + gpn[i]) * sc.s[i] : acc_t(0);
    dot = warp_sum(dot);
#pragma unroll
    for (int i = 0; i < VPT; ++i) g[i] = sc.s[i] * (gs[i] + gpn[i] - dot);
  } else {
    // pnorm = s / sum(s); s = sigmoid(l).
    const acc_t ssum = sc.score_sum;
    acc_t dot = 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) dot += base + i < E ? gpn[i] * (sc.s[i] / ssum) : acc_t(0);
    dot = warp_sum(dot);
#pragma unroll
    for (int i = 0; i < VPT; ++i) g[i] = (gs[i] + (gpn[i] - dot) / ssum) * sc.s[i] * (acc_t(1) - sc.s[i]);
  }
  if (g_z != 0) {
    const acc_t zs = static_cast<acc_t>(z_scale) * sc.lse;
#pragma unroll
    for (int i = 0; i < VPT; ++i) g[i] += zs * (sc.ex[i] * sc.inv_z);
  }

  bits_t out[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) out[i] = from_acc<scalar_t>(g[i]);
  Chunk<bits_t, VPT>::store(reinterpret_cast<bits_t*>(static_cast<scalar_t*>(a.grad_logits) + off), base, E,
                            vec_logits, out);
}

// ---- launchers per logits type (instantiated in gating_<type>.cu) -------------------------------
// VPT: experts per lane, the smallest supported value with 32 * VPT >= E.
inline int pick_vpt(int64_t num_experts) {
  int v = 1;
  while (v * kWarp < num_experts) v *= 2;
  return v;
}

#define MOE_GATING_SWITCH_VPT(vpt, ...)                                                          \
  switch (vpt) {                                                                                 \
    case 1: { constexpr int kVPT = 1; __VA_ARGS__; break; }                                      \
    case 2: { constexpr int kVPT = 2; __VA_ARGS__; break; }                                      \
    case 4: { constexpr int kVPT = 4; __VA_ARGS__; break; }                                      \
    case 8: { constexpr int kVPT = 8; __VA_ARGS__; break; }                                      \
    case 16: { constexpr int kVPT = 16; __VA_ARGS__; break; }                                    \
    case 32: { constexpr int kVPT = 32; __VA_ARGS__; break; }                                    \
    default: MOE_HOST_ASSERT(false, "topk_gating: unsupported experts per lane (num_experts > 1024)"); \
  }

// Opts a kernel into more than 48 KiB of dynamic shared memory, once per device and size.
inline void allow_smem(const void* kernel, size_t bytes, int* configured) {
  int device = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= 0 && device < 64 && configured[device] >= static_cast<int>(bytes)) return;
  if (bytes > 48 * 1024)
    MOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  if (device >= 0 && device < 64) configured[device] = static_cast<int>(bytes);
}

// The shared-memory budget of a block on the current device: kSmemBudget, or less where the
// device's opt-in limit is lower. NOTE: a fixed 160 KiB exceeds the opt-in limit of sm_86/sm_89
// (99 KiB) and sm_75 (64 KiB), where large E (E=1024: ~112 KiB for float) made
// cudaFuncSetAttribute / the launch fail; on sm_80 (163 KiB) and sm_90 (227 KiB) nothing changes.
// (Where it is lower, fewer warps per block sum a tile's scores in another order: the aux losses
// may then differ in the last bits from those of other GPUs, still the same from run to run.)
inline size_t smem_budget() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const int device = current_device();
  int optin = (device >= 0 && device < kMaxDevices) ? cache[device].load(std::memory_order_relaxed) : 0;
  if (optin <= 0) {
    MOE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (device >= 0 && device < kMaxDevices) cache[device].store(optin, std::memory_order_relaxed);
  }
  return std::min(kSmemBudget, static_cast<size_t>(std::max(optin, 0)));
}

// Warps per block that fit the shared-memory budget.
inline int fit_warps(size_t block_bytes, size_t warp_bytes) {
  const size_t budget = smem_budget();
  int w = kRouteWarps;
  while (w > 1 && block_bytes + warp_bytes * w > budget) --w;
  return w;
}

template <typename scalar_t>
void launch_route(RouteArgs<typename Types<scalar_t>::acc_t> a, cudaStream_t stream) {
  using acc_t = typename Types<scalar_t>::acc_t;
  using bits_t = typename Types<scalar_t>::bits_t;
  using abits_t = typename Types<acc_t>::bits_t;
  if (a.L.num_tiles == 0) return;
  MOE_GATING_SWITCH_VPT(pick_vpt(a.E), {
    a.groups.lanes = aligned_group_lanes(a.groups, kVPT);
    a.warp_smem = WarpSmem<acc_t>::bytes(kVPT, a.groups.lanes ? 0 : a.groups.G, false);
    a.warps = std::min(a.warps, fit_warps(route_block_smem(a.L, a.E, a.k, kRouteWarps), a.warp_smem));
    const size_t smem = route_block_smem(a.L, a.E, a.k, a.warps) + a.warp_smem * a.warps;
    static int configured[64] = {};
    auto kernel = route_kernel<scalar_t, kVPT>;
    allow_smem(reinterpret_cast<const void*>(kernel), smem, configured);
    const bool vec_logits = Chunk<bits_t, kVPT>::aligned(a.logits, a.E);
    const bool vec_noise = a.noise != nullptr && Chunk<abits_t, kVPT>::aligned(a.noise, a.E);
    kernel<<<static_cast<unsigned>(a.L.num_tiles), a.warps * kWarp, smem, stream>>>(a, vec_logits, vec_noise);
    MOE_CUDA_CHECK(cudaGetLastError());
  });
}

template <typename scalar_t>
void launch_grad(GradArgs<typename Types<scalar_t>::acc_t> a, cudaStream_t stream) {
  using acc_t = typename Types<scalar_t>::acc_t;
  using bits_t = typename Types<scalar_t>::bits_t;
  using abits_t = typename Types<acc_t>::bits_t;
  if (a.L.num_tokens == 0) return;
  MOE_GATING_SWITCH_VPT(pick_vpt(a.E), {
    a.groups.lanes = aligned_group_lanes(a.groups, kVPT);
    a.warp_smem = WarpSmem<acc_t>::bytes(kVPT, a.groups.lanes ? 0 : a.groups.G, true);
    a.warps = fit_warps(0, a.warp_smem);
    const size_t smem = a.warp_smem * a.warps;
    static int configured[64] = {};
    auto kernel = grad_kernel<scalar_t, kVPT>;
    allow_smem(reinterpret_cast<const void*>(kernel), smem, configured);
    const bool vec_logits = Chunk<bits_t, kVPT>::aligned(a.logits, a.E) &&
                            Chunk<bits_t, kVPT>::aligned(a.grad_logits, a.E);
    const bool vec_noise = a.noise != nullptr && Chunk<abits_t, kVPT>::aligned(a.noise, a.E);
    const int64_t blocks = (a.L.num_tokens + a.warps - 1) / a.warps;
    kernel<<<static_cast<unsigned>(blocks), a.warps * kWarp, smem, stream>>>(a, vec_logits, vec_noise);
    MOE_CUDA_CHECK(cudaGetLastError());
  });
}

extern template void launch_route<float>(RouteArgs<float>, cudaStream_t);
extern template void launch_route<double>(RouteArgs<double>, cudaStream_t);
extern template void launch_route<__half>(RouteArgs<float>, cudaStream_t);
extern template void launch_route<__nv_bfloat16>(RouteArgs<float>, cudaStream_t);
extern template void launch_grad<float>(GradArgs<float>, cudaStream_t);
extern template void launch_grad<double>(GradArgs<double>, cudaStream_t);
extern template void launch_grad<__half>(GradArgs<float>, cudaStream_t);
extern template void launch_grad<__nv_bfloat16>(GradArgs<float>, cudaStream_t);

}  // namespace moe_ext::kernels::gating_detail
