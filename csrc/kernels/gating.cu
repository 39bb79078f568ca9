// Top-k gating on the GPU (declared in gating.cuh). The row-level device code is in
// gating_impl.cuh and is instantiated per logits type in gating_{f32,bf16,f16,f64}.cu; this file
// has the host launchers and the small cross-tile kernels.
//
// Forward, for T tokens cut into tiles of 8..64 consecutive tokens (a tile never straddles a
// sequence; the tiling depends only on T and seq_len, so reduction orders never depend on the GPU):
//   1. route_kernel   one block per tile, one warp per token row at a time, the row's experts
//                     spread over the lanes (VPT = ceil(E/32) rounded up to a power of two, the
//                     chunk in registers, loaded with 16-byte vectors while the warp computes the
//                     previous row). Noise is added on load; max, sum(exp), logsumexp and the
//                     scores in fp32 (fp64 for fp64 logits); selection keys = scores + bias as
//                     order-preserving integer codes; group scores (top-2 sums: in registers and
//                     a butterfly when each lane's chunk lies inside one group, as for E=256 with
//                     8 groups; through shared memory otherwise) and the best groups by warp
//                     argmax; k rounds of warp argmax over the keys (redux.sync max on the code,
//                     then min on the expert index: ties to the lower index). Weights from the
//                     unbiased scores. Per tile: per-expert counts and every slot's rank among the
//                     tile's slots of its expert, in token order (a 64-bit row mask per expert,
//                     popc), the tile's sums of the normalised scores and of lse^2 (fixed order:
//                     per warp, then warps in order).
//   2. scan_kernel    one block per 32 experts: exclusive scan of the tile counts across tiles
//                     (the base of every tile inside every expert), the totals, tokens_per_expert
//                     (kept = min(total, capacity)), and per 32 experts the partial sums
//                     sum_e count_e * P_e (aux loss) and sum_s sum_e count_se * P_se (sequence aux
//                     loss), each over tiles / sequences in order; block 0 also sums lse^2.
//   3. fixup_kernel   one thread per slot: position = tile base + rank; past capacity the slot
//                     becomes idx -1, weight 0, position -1. Block 0 writes the three losses.
//   For small problems (<= 64 tiles and <= 16K slots, e.g. decode) 2 and 3 are one kernel of
//   one block, scan_small_kernel, a thread per expert: two launches in all.
// No host synchronisation, no atomics on floats: outputs are bit-identical from run to run.
//
// Backward: route_kernel again in counting mode (pre-drop tile counts only; skipped on the device
// when the aux and sequence-aux gradients are both 0), scan_kernel in counting mode (per-expert
// and per-sequence totals), then grad_kernel: one warp per row recomputes the scores, takes the
// chosen experts from idx (recomputing the selection only in rows where a slot was dropped and
// renormalize needs the pre-drop choice) and writes the gradient row, reading the loss-gradient
// scalars on the device.
//
// Integer outputs equal the CPU op's whenever the float32 selection keys are ordered the same
// way. A key computed here and on the CPU may differ in the last bits (fp32 exp here is
// ex2.approx, within ~2e-7 relative for any expert that can be chosen; glibc's expf is correctly
// rounded nearly always; sums run in another order), so two different experts whose keys lie
// within rounding of each other (a tie only to float precision) may be ordered differently.
// Exact ties (equal inputs) always go to the lower index, as on the CPU.
//
// Performance model (H100 SXM, T=16384, E=256, k=8, 8 groups / 4, fp32 logits; see
// bench/bench_gating.cu): the memory floor is 16.8 MB of logits + 1.6 MB of outputs = 18.4 MB,
// 6.2 us at 2.95 TB/s. route_kernel issues about 480 warp instructions per row (scores ~110,
// keys ~40, groups ~80, selection ~200: a top-2 scan of the chunk, 8 rounds of 2 redux + ~10,
// ~0.7 rescans; weights and bookkeeping ~50): 16384 rows over 528 schedulers is ~15K issue
// cycles, ~8.5 us at 1.75 GHz; the per-row dependency chain (~1.5K cycles, mostly the ~20
// redux/shuffle reductions in sequence) over 24 resident warps per SM (80 registers at VPT 8:
// 3 blocks of 8 warps) hides behind that. scan + fixup ~2 us. Predicted 10-11 us in all (0.55-0.6
// of the copy ceiling's bandwidth, under 2x the floor); T=128: ~3.5 us (two launches, one row
// per warp on 16 SMs). Levers if the H100 disagrees: rows per tile / warps per block, 2 rows per
// warp for E <= 16, __launch_bounds__ minimum blocks.
#include "kernels/gating_impl.cuh"

#include <algorithm>
#include <cstdint>

namespace moe_ext::kernels {
namespace gating_detail {
namespace {

constexpr int kScanThreads = 1024;
constexpr int kScanWarps = kScanThreads / kWarp;
constexpr int kFixupThreads = 256;
constexpr int64_t kSmallMaxTiles = 64;  // (scan_small_kernel sizes its reductions for at most 64 tiles)
constexpr int64_t kSmallMaxSlots = 16384;

inline size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

template <typename acc_t>
struct ScanArgs {
  Layout L;
  int E = 0, k = 0;
  int64_t capacity = 0;
  int64_t seq_len_arg = 0;
  bool backward = false;
  int32_t* counts = nullptr;  // [num_tiles, E] tile counts in, tile bases out (forward)
  const acc_t* tile_p = nullptr;
  const double* tile_lse2 = nullptr;
  // forward
  int32_t* tokens_per_expert = nullptr;
  double* part_aux = nullptr;  // [num_chunks]
  double* part_seq = nullptr;  // [num_chunks]
  double* z_total = nullptr;   // [1]
  int32_t* idx = nullptr;
  int32_t* positions = nullptr;
  acc_t* weights = nullptr;
  acc_t* aux_out = nullptr;
  acc_t* seq_out = nullptr;
  acc_t* z_out = nullptr;
  // backward
  int32_t* routed = nullptr;      // [E]
  int32_t* routed_seq = nullptr;  // [num_seqs, E]
  const acc_t* grad_aux = nullptr;
  const acc_t* grad_seq = nullptr;
};

// Sum of v over threads [0, n) in a fixed tree (n a power of two, 32 <= n <= blockDim.x): the
// same order on every run, and the same bits for any n covering every nonzero v (the levels
// above it add exact zeros), so a caller may size n to its data. The levels below 32 are warp
// shuffles in the shared-memory tree's pairing (lane i adds lane i + s): fewer barriers. All
// threads call it; all get the sum.
__device__ double block_reduce(double* red, double v, int n) {
  __syncthreads();  // red may still be read after a previous call
  if (threadIdx.x < n) red[threadIdx.x] = v;
  __syncthreads();
  for (int s = n / 2; s >= kWarp; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x < kWarp) {
    double x = red[threadIdx.x];
#pragma unroll
    for (int s = kWarp / 2; s > 0; s >>= 1) x += __shfl_down_sync(kFull, x, s);
    if (threadIdx.x == 0) red[0] = x;
  }
  __syncthreads();
  return red[0];
}

// Sum over i in [0, count) of x[i]: thread-strided partial sums, then block_reduce over n threads
// (count <= n, or n = blockDim.x).
__device__ double block_sum(double* red, const double* x, int64_t count, int n) {
  double v = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) v += x[i];
  return block_reduce(red, v, n);
}

// aux = E * sum_e count_e * P_e / (T^2 k); seq = E * sum_s sum_e count_se * P_se / (S L^2 k);
// z = sum lse^2 / T: the CPU op's formulas with the 1/(T k), 1/T factors pulled out.
template <typename acc_t>
__device__ void write_losses_from(const ScanArgs<acc_t>& a, double sum_aux, double sum_seq, double sum_z) {
  const double T = static_cast<double>(a.L.num_tokens), E = a.E, k = a.k;
  *a.aux_out = static_cast<acc_t>(E * sum_aux / (T * T * k));
  const double L = static_cast<double>(a.seq_len_arg);
  *a.seq_out =
      static_cast<acc_t>(a.seq_len_arg > 0 ? E * sum_seq / (static_cast<double>(a.L.num_seqs) * L * L * k) : 0.0);
  *a.z_out = static_cast<acc_t>(sum_z / T);
}

template <typename acc_t>
__device__ void write_losses(const ScanArgs<acc_t>& a) {
  const int chunks = (a.E + kWarp - 1) / kWarp;
  double sa = 0, sq = 0;
  for (int c = 0; c < chunks; ++c) sa += a.part_aux[c], sq += a.part_seq[c];
  write_losses_from(a, sa, sq, *a.z_total);
}

template <typename acc_t>
__device__ __forceinline__ void fixup_slot(const ScanArgs<acc_t>& a, int64_t i) {
  const uint32_t t = static_cast<uint32_t>(i) / static_cast<uint32_t>(a.k);  // T * k < 2^31
  const int e = a.idx[i];
  const int32_t pos = a.positions[i] + a.counts[static_cast<int64_t>(a.L.tile_of32(t)) * a.E + e];
  if (a.capacity > 0 && pos >= a.capacity) {
    a.idx[i] = -1;
    a.positions[i] = -1;
    a.weights[i] = acc_t(0);
  } else {
    a.positions[i] = pos;
  }
}

// Block c handles experts [32c, 32c + 32), lane = expert; the 32 warps split the tiles into
// contiguous ranges (totals, bases). Per-sequence sums: sequences of >= 32 tiles one at a time,
// the warps splitting its tiles; shorter ones a whole sequence per warp, round-robin. Every sum
// runs in a fixed order. Block 0 also sums lse^2 over the tiles.
template <typename acc_t>
__global__ void __launch_bounds__(kScanThreads) scan_kernel(const ScanArgs<acc_t> a) {
  __shared__ int s_cnt[kScanWarps][kWarp + 1];
  __shared__ double s_p[kScanWarps][kWarp + 1];
  __shared__ double s_q[kScanWarps][kWarp + 1];
  __shared__ double s_red[kScanThreads];
  if (a.backward && !needs_counts(a.grad_aux, a.grad_seq, a.seq_len_arg)) return;

  const int w = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int E = a.E;
  const int64_t NT = a.L.num_tiles, S = a.L.num_seqs, tps = a.L.tiles_per_seq;
  const int c = static_cast<int>(blockIdx.x);
  const int64_t per = (NT + kScanWarps - 1) / kScanWarps;
  const int64_t i0 = std::min<int64_t>(NT, w * per), i1 = std::min<int64_t>(NT, i0 + per);
  {
    const int e = c * kWarp + lane;
    const bool ok = e < E;
    int cnt = 0;
    double p = 0, q = 0;
    if (ok) {
#pragma unroll 4
      for (int64_t i = i0; i < i1; ++i) {
        cnt += a.counts[i * E + e];
        if (!a.backward) p += static_cast<double>(a.tile_p[i * E + e]);
      }
    }
    // Per-sequence sums (s_cnt and s_p serve as scratch here: they are filled below).
    if (a.seq_len_arg > 0 && tps >= kScanWarps) {
      for (int64_t s = 0; s < S; ++s) {
        int n = 0;
        double ps = 0;
        if (ok) {
#pragma unroll 4
          for (int64_t i = s * tps + w; i < (s + 1) * tps; i += kScanWarps) {
            n += a.counts[i * E + e];
            if (!a.backward) ps += static_cast<double>(a.tile_p[i * E + e]);
          }
        }
        s_cnt[w][lane] = n;
        s_p[w][lane] = ps;
        __syncthreads();
        if (w == 0 && ok) {
          int N = 0;
          double P = 0;
          for (int v = 0; v < kScanWarps; ++v) N += s_cnt[v][lane], P += s_p[v][lane];
          if (a.backward) a.routed_seq[s * E + e] = N;
          else q += static_cast<double>(N) * P;
        }
        __syncthreads();
      }
    } else if (a.seq_len_arg > 0 && ok) {
      for (int64_t s = w; s < S; s += kScanWarps) {
        int n = 0;
        double ps = 0;
        for (int64_t i = s * tps; i < (s + 1) * tps; ++i) {
          n += a.counts[i * E + e];
          if (!a.backward) ps += static_cast<double>(a.tile_p[i * E + e]);
        }
        if (a.backward) a.routed_seq[s * E + e] = n;
        else q += static_cast<double>(n) * ps;
      }
    }
    s_cnt[w][lane] = cnt;
    s_p[w][lane] = p;
    s_q[w][lane] = q;
    __syncthreads();  // NOTE: every read of the tile counts above happens before they become bases below
    if (!a.backward && ok) {
      int base = 0;
      for (int v = 0; v < w; ++v) base += s_cnt[v][lane];
      for (int64_t i = i0; i < i1; ++i) {
        const int v = a.counts[i * E + e];
        a.counts[i * E + e] = base;
        base += v;
      }
    }
    if (w == 0) {
      int total = 0;
      double P = 0, Q = 0;
      for (int v = 0; v < kScanWarps; ++v) total += s_cnt[v][lane], P += s_p[v][lane], Q += s_q[v][lane];
      if (a.backward) {
        if (ok) a.routed[e] = total;
      } else {
        if (ok)
          a.tokens_per_expert[e] =
              a.capacity > 0 ? static_cast<int32_t>(std::min<int64_t>(total, a.capacity)) : total;
        const double ae = warp_sum(ok ? static_cast<double>(total) * P : 0.0);
        const double qe = warp_sum(ok ? Q : 0.0);
        if (lane == 0) a.part_aux[c] = ae, a.part_seq[c] = qe;
      }
    }
  }
  if (a.backward || blockIdx.x != 0) return;
  const double z = block_sum(s_red, a.tile_lse2, NT, kScanThreads);
  if (threadIdx.x == 0) *a.z_total = z;
}

// Small problems (<= kSmallMaxTiles tiles), one block: thread e owns expert e and walks every
// tile in order (bases, totals, score sums, per-sequence products), the block reduces the
// per-expert loss terms in a fixed tree, then fixes up every slot. One launch after the routing.
template <typename acc_t>
__global__ void __launch_bounds__(kScanThreads) scan_small_kernel(const ScanArgs<acc_t> a) {
  __shared__ double s_red[kScanThreads];
  const int e = threadIdx.x, E = a.E;
  const int64_t NT = a.L.num_tiles, tps = a.L.tiles_per_seq;
  double aux_e = 0, seq_e = 0;
  if (e < E) {
    int run = 0, n = 0;
    double P = 0, ps = 0;
    int64_t left = tps;  // tiles left in the current sequence
#pragma unroll 8
    for (int64_t i = 0; i < NT; ++i) {
      const int v = a.counts[i * E + e];
      const double pv = static_cast<double>(a.tile_p[i * E + e]);
      a.counts[i * E + e] = run;
      run += v, n += v, ps += pv;
      if (--left == 0) {
        P += ps;
        seq_e += static_cast<double>(n) * ps;
        n = 0, ps = 0, left = tps;
      }
    }
    a.tokens_per_expert[e] = a.capacity > 0 ? static_cast<int32_t>(std::min<int64_t>(run, a.capacity)) : run;
    aux_e = static_cast<double>(run) * P;
  }
  // Nonzero terms: the E experts' and the NT <= kSmallMaxTiles tiles' (at most 64).
  int n = 64;
  while (n < E) n *= 2;
  const double aux = block_reduce(s_red, aux_e, n);
  const double seq = block_reduce(s_red, seq_e, n);
  const double z = block_sum(s_red, a.tile_lse2, NT, n);
  if (threadIdx.x == 0) write_losses_from(a, aux, a.seq_len_arg > 0 ? seq : 0.0, z);
  __syncthreads();  // NOTE: the bases above, written by every thread, are read by any thread below
  const int64_t slots = a.L.num_tokens * a.k;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < slots; i += kScanThreads) fixup_slot(a, i);
}

template <typename acc_t>
__global__ void __launch_bounds__(kFixupThreads) fixup_kernel(const ScanArgs<acc_t> a) {
  if (blockIdx.x == 0 && threadIdx.x == 0) write_losses(a);
  const int64_t slots = a.L.num_tokens * a.k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kFixupThreads + threadIdx.x; i < slots;
       i += static_cast<int64_t>(gridDim.x) * kFixupThreads)
    fixup_slot(a, i);
}

__global__ void __launch_bounds__(1024) bias_update_kernel(float* bias, const int64_t* load, int E, float rate) {
  __shared__ long long s_sum[1024];
  long long sum = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) sum += load[e];
  s_sum[threadIdx.x] = sum;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) s_sum[threadIdx.x] += s_sum[threadIdx.x + s];
    __syncthreads();
  }
  const long long total = s_sum[0];
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const long long d = total - static_cast<long long>(E) * load[e];  // E * (mean - load[e]), exact
    const float sign = d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f);
    bias[e] = __fadd_rn(bias[e], __fmul_rn(rate, sign));
  }
}

// ---- workspace ---------------------------------------------------------------------------------
template <typename acc_t>
struct ForwardWorkspace {
  int32_t* counts;
  acc_t* tile_p;
  double* tile_lse2;
  double* part_aux;
  double* part_seq;
  double* z_total;

  static size_t bytes(const Layout& L, int64_t E) {
    const int64_t chunks = (E + kWarp - 1) / kWarp;
    return align_up(sizeof(int32_t) * L.num_tiles * E) + align_up(sizeof(acc_t) * L.num_tiles * E) +
           align_up(sizeof(double) * L.num_tiles) + 2 * align_up(sizeof(double) * chunks) + align_up(sizeof(double));
  }
  static ForwardWorkspace carve(void* base, const Layout& L, int64_t E) {
    const int64_t chunks = (E + kWarp - 1) / kWarp;
    char* p = static_cast<char*>(base);
    ForwardWorkspace w;
    w.counts = reinterpret_cast<int32_t*>(p), p += align_up(sizeof(int32_t) * L.num_tiles * E);
    w.tile_p = reinterpret_cast<acc_t*>(p), p += align_up(sizeof(acc_t) * L.num_tiles * E);
    w.tile_lse2 = reinterpret_cast<double*>(p), p += align_up(sizeof(double) * L.num_tiles);
    w.part_aux = reinterpret_cast<double*>(p), p += align_up(sizeof(double) * chunks);
    w.part_seq = reinterpret_cast<double*>(p), p += align_up(sizeof(double) * chunks);
    w.z_total = reinterpret_cast<double*>(p);
    return w;
  }
};

struct BackwardWorkspace {
  int32_t* counts;
  int32_t* routed;
  int32_t* routed_seq;

  static size_t bytes(const Layout& L, int64_t E, bool seq) {
    return align_up(sizeof(int32_t) * L.num_tiles * E) + align_up(sizeof(int32_t) * E) +
           (seq ? align_up(sizeof(int32_t) * L.num_seqs * E) : 0);
  }
  static BackwardWorkspace carve(void* base, const Layout& L, int64_t E, bool seq) {
    char* p = static_cast<char*>(base);
    BackwardWorkspace w;
    w.counts = reinterpret_cast<int32_t*>(p), p += align_up(sizeof(int32_t) * L.num_tiles * E);
    w.routed = reinterpret_cast<int32_t*>(p), p += align_up(sizeof(int32_t) * E);
    w.routed_seq = seq ? reinterpret_cast<int32_t*>(p) : nullptr;
    return w;
  }
};

void check_problem(const GatingProblem& q) {
  MOE_HOST_ASSERT(q.num_tokens >= 0, "topk_gating: num_tokens must be >= 0");
  MOE_HOST_ASSERT(q.num_experts >= 1 && q.num_experts <= kGatingMaxExperts,
                  "topk_gating: the CUDA kernels support 1 <= num_experts <= 1024, got " +
                      std::to_string(q.num_experts));
  MOE_HOST_ASSERT(q.k >= 1 && q.k <= std::min<int64_t>(kGatingMaxK, q.num_experts),
                  "topk_gating: the CUDA kernels support 1 <= k <= min(32, num_experts), got k=" + std::to_string(q.k));
  MOE_HOST_ASSERT(q.num_tokens * std::max(q.k, q.num_experts) < (int64_t{1} << 31),
                  "topk_gating: num_tokens * max(k, num_experts) must be < 2^31");
  if (q.num_groups > 0) {
    MOE_HOST_ASSERT(q.num_experts % q.num_groups == 0 && q.topk_groups >= 1 && q.topk_groups <= q.num_groups &&
                        q.k <= q.topk_groups * (q.num_experts / q.num_groups),
                    "topk_gating: bad num_groups / topk_groups");
  }
  MOE_HOST_ASSERT(q.seq_len >= 0 && (q.seq_len == 0 || q.num_tokens % q.seq_len == 0),
                  "topk_gating: seq_len must divide num_tokens");
  MOE_HOST_ASSERT(q.tile_rows == 0 || (q.tile_rows >= kMinTileRows && q.tile_rows <= kMaxTileRows &&
                                       (q.tile_rows & (q.tile_rows - 1)) == 0),
                  "topk_gating: tile_rows must be 0 or a power of two in [8, 64]");
  MOE_HOST_ASSERT(q.route_warps >= 0 && q.route_warps <= kRouteWarps, "topk_gating: route_warps must be in [0, 8]");
}

// The fields both row kernels read.
template <typename acc_t>
void set_row_args(RowArgs<acc_t>& a, const GatingProblem& q, const Layout& L) {
  a.logits = q.logits;
  a.noise = static_cast<const acc_t*>(q.noise);
  a.bias = static_cast<const acc_t*>(q.expert_bias);
  a.L = L;
  a.E = static_cast<int>(q.num_experts);
  a.k = static_cast<int>(q.k);
  a.sigmoid = q.score == GatingScore::kSigmoid;
  a.renormalize = q.renormalize;
  a.groups = make_groups(q.num_experts, q.num_groups, q.topk_groups);
  a.seq_len_arg = q.seq_len;
  if (q.route_warps > 0) a.warps = q.route_warps;
}

// T = 0: tokens_per_expert and the three losses are zero (one launch; a rank without tokens in an
// EP decode step calls this every step).
template <typename acc_t>
__global__ void __launch_bounds__(1024) zero_outputs_kernel(int32_t* tpe, int E, acc_t* aux, acc_t* seq, acc_t* z) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) tpe[e] = 0;
  if (threadIdx.x == 0) *aux = *seq = *z = acc_t(0);
}

__global__ void __launch_bounds__(256) load_accumulate_kernel(int64_t* load, double* ema, const int32_t* tpe,
                                                              int64_t E, double decay, double weight) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < E) {
    load[e] += tpe[e];
    ema[e] = __dadd_rn(__dmul_rn(ema[e], decay), __dmul_rn(static_cast<double>(tpe[e]), weight));
  } else if (e == E) {
    ema[E] = __dadd_rn(__dmul_rn(ema[E], decay), weight);
  }
}

template <typename scalar_t>
void forward_typed(const GatingForwardParams& p, cudaStream_t stream) {
  using acc_t = typename Types<scalar_t>::acc_t;
  const GatingProblem& q = p.problem;
  const Layout L = make_layout(q.num_tokens, q.seq_len, q.tile_rows);
  const ForwardWorkspace<acc_t> ws = ForwardWorkspace<acc_t>::carve(p.workspace, L, q.num_experts);

  RouteArgs<acc_t> r;
  set_row_args(r, q, L);
  r.weights = static_cast<acc_t*>(p.weights);
  r.idx = p.idx;
  r.positions = p.positions;
  r.tile_counts = ws.counts;
  r.tile_p = ws.tile_p;
  r.tile_lse2 = ws.tile_lse2;
  launch_route<scalar_t>(r, stream);

  ScanArgs<acc_t> s;
  s.L = L;
  s.E = static_cast<int>(q.num_experts);
  s.k = static_cast<int>(q.k);
  s.capacity = p.capacity;
  s.seq_len_arg = q.seq_len;
  s.counts = ws.counts;
  s.tile_p = ws.tile_p;
  s.tile_lse2 = ws.tile_lse2;
  s.tokens_per_expert = p.tokens_per_expert;
  s.part_aux = ws.part_aux;
  s.part_seq = ws.part_seq;
  s.z_total = ws.z_total;
  s.idx = p.idx;
  s.positions = p.positions;
  s.weights = static_cast<acc_t*>(p.weights);
  s.aux_out = static_cast<acc_t*>(p.aux_loss);
  s.seq_out = static_cast<acc_t*>(p.seq_aux_loss);
  s.z_out = static_cast<acc_t*>(p.z_loss);
  const int64_t slots = q.num_tokens * q.k;
  if (L.num_tiles <= kSmallMaxTiles && slots <= kSmallMaxSlots) {
    scan_small_kernel<acc_t><<<1, kScanThreads, 0, stream>>>(s);
    MOE_CUDA_CHECK(cudaGetLastError());
  } else {
    const unsigned chunks = static_cast<unsigned>((q.num_experts + kWarp - 1) / kWarp);
    scan_kernel<acc_t><<<chunks, kScanThreads, 0, stream>>>(s);
    MOE_CUDA_CHECK(cudaGetLastError());
    const int64_t blocks = std::min<int64_t>((slots + kFixupThreads - 1) / kFixupThreads, 65535);
    fixup_kernel<acc_t><<<static_cast<unsigned>(blocks), kFixupThreads, 0, stream>>>(s);
    MOE_CUDA_CHECK(cudaGetLastError());
  }
}

template <typename scalar_t>
void backward_typed(const GatingBackwardParams& p, cudaStream_t stream) {
  using acc_t = typename Types<scalar_t>::acc_t;
  const GatingProblem& q = p.problem;
  const Layout L = make_layout(q.num_tokens, q.seq_len, q.tile_rows);
  const bool seq = q.seq_len > 0;
  const BackwardWorkspace ws = BackwardWorkspace::carve(p.workspace, L, q.num_experts, seq);
  const acc_t* g_aux = static_cast<const acc_t*>(p.grad_aux_loss);
  const acc_t* g_seq = static_cast<const acc_t*>(p.grad_seq_aux_loss);

  // Pre-drop counts, only when a balancing-loss gradient is nonzero (decided on the device).
  RouteArgs<acc_t> r;
  set_row_args(r, q, L);
  r.tile_counts = ws.counts;
  r.grad_aux = g_aux;
  r.grad_seq = g_seq;
  launch_route<scalar_t>(r, stream);

  ScanArgs<acc_t> s;
  s.L = L;
  s.E = static_cast<int>(q.num_experts);
  s.k = static_cast<int>(q.k);
  s.seq_len_arg = q.seq_len;
  s.backward = true;
  s.counts = ws.counts;
  s.routed = ws.routed;
  s.routed_seq = ws.routed_seq;
  s.grad_aux = g_aux;
  s.grad_seq = g_seq;
  const unsigned chunks = static_cast<unsigned>((q.num_experts + kWarp - 1) / kWarp);
  scan_kernel<acc_t><<<chunks, kScanThreads, 0, stream>>>(s);
  MOE_CUDA_CHECK(cudaGetLastError());

  GradArgs<acc_t> g;
  set_row_args(g, q, L);
  g.grad_weights = static_cast<const acc_t*>(p.grad_weights);
  g.grad_aux = g_aux;
  g.grad_seq = g_seq;
  g.grad_z = static_cast<const acc_t*>(p.grad_z_loss);
  g.idx = p.idx;
  g.routed = ws.routed;
  g.routed_seq = ws.routed_seq;
  g.grad_logits = p.grad_logits;
  launch_grad<scalar_t>(g, stream);
}

}  // namespace
}  // namespace gating_detail

using namespace gating_detail;

size_t gating_forward_workspace_bytes(const GatingProblem& q) {
  const Layout L = make_layout(q.num_tokens, q.seq_len, q.tile_rows);
  return q.dtype == GatingFloat::kFloat64 ? ForwardWorkspace<double>::bytes(L, q.num_experts)
                                          : ForwardWorkspace<float>::bytes(L, q.num_experts);
}

size_t gating_backward_workspace_bytes(const GatingProblem& q) {
  return BackwardWorkspace::bytes(make_layout(q.num_tokens, q.seq_len, q.tile_rows), q.num_experts, q.seq_len > 0);
}

void gating_forward(const GatingForwardParams& p, cudaStream_t stream) {
  const GatingProblem& q = p.problem;
  check_problem(q);
  if (q.num_tokens == 0) {
    const int E = static_cast<int>(q.num_experts);
    if (q.dtype == GatingFloat::kFloat64)
      zero_outputs_kernel<double><<<1, 1024, 0, stream>>>(p.tokens_per_expert, E, static_cast<double*>(p.aux_loss),
                                                          static_cast<double*>(p.seq_aux_loss),
                                                          static_cast<double*>(p.z_loss));
    else
      zero_outputs_kernel<float><<<1, 1024, 0, stream>>>(p.tokens_per_expert, E, static_cast<float*>(p.aux_loss),
                                                         static_cast<float*>(p.seq_aux_loss),
                                                         static_cast<float*>(p.z_loss));
    MOE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  switch (q.dtype) {
    case GatingFloat::kFloat32: forward_typed<float>(p, stream); break;
    case GatingFloat::kFloat64: forward_typed<double>(p, stream); break;
    case GatingFloat::kFloat16: forward_typed<__half>(p, stream); break;
    case GatingFloat::kBFloat16: forward_typed<__nv_bfloat16>(p, stream); break;
    default: MOE_HOST_ASSERT(false, "topk_gating: unsupported logits dtype");
  }
}

void gating_backward(const GatingBackwardParams& p, cudaStream_t stream) {
  const GatingProblem& q = p.problem;
  check_problem(q);
  if (q.num_tokens == 0) return;
  switch (q.dtype) {
    case GatingFloat::kFloat32: backward_typed<float>(p, stream); break;
    case GatingFloat::kFloat64: backward_typed<double>(p, stream); break;
    case GatingFloat::kFloat16: backward_typed<__half>(p, stream); break;
    case GatingFloat::kBFloat16: backward_typed<__nv_bfloat16>(p, stream); break;
    default: MOE_HOST_ASSERT(false, "topk_gating_backward: unsupported logits dtype");
  }
}

void update_expert_bias(float* expert_bias, const int64_t* tokens_per_expert, int64_t num_experts, float rate,
                        cudaStream_t stream) {
  MOE_HOST_ASSERT(num_experts >= 1 && num_experts < (int64_t{1} << 31), "update_expert_bias: bad num_experts");
  bias_update_kernel<<<1, 1024, 0, stream>>>(expert_bias, tokens_per_expert, static_cast<int>(num_experts), rate);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void accumulate_load(int64_t* load, double* load_ema, const int32_t* tokens_per_expert, int64_t num_experts,
                     double decay, cudaStream_t stream) {
  MOE_HOST_ASSERT(num_experts >= 1 && num_experts < (int64_t{1} << 31), "accumulate_load: bad num_experts");
  const unsigned blocks = static_cast<unsigned>((num_experts + 1 + 255) / 256);
  load_accumulate_kernel<<<blocks, 256, 0, stream>>>(load, load_ema, tokens_per_expert, num_experts, decay,
                                                     1.0 - decay);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe_ext::kernels
