// The ipc backend's kernels: count exchange and plan, token send, flag waits, expansion into the
// expert-major layout, expert outputs back. Protocol and buffer layout: ep.cuh.
#include "kernels/ep.cuh"
#include "kernels/device_info.cuh"
#include "kernels/exception.cuh"
#include "kernels/float_cast.cuh"

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <type_traits>

namespace moe_ext::kernels {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kCountThreads = 512;  // (1024 capped the count exchange at 64 registers: it spilled ~200 bytes)
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / kWarp;
// back_map entries: source rank << kBackShift | slot (t * k + j). Independent of the buffer's
// sizes, so a plan stays valid after the buffers grow between a dispatch and its combine.
constexpr int kBackShift = 40;

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// ---- memory-model helpers ----------------------------------------------------------------------

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t* flag_ptr(char* base, const EpLayout& L, int phase, int src) {
  return reinterpret_cast<uint64_t*>(base + L.flags) + static_cast<int64_t>(phase) * L.sizes.world + src;
}

__device__ __forceinline__ int64_t* count_row(char* base, const EpLayout& L, uint64_t seq, int src) {
  return reinterpret_cast<int64_t*>(base + L.counts) +
         (static_cast<int64_t>(seq & 1) * L.sizes.world + src) * L.count_row;
}

// Records the first error of this rank (later ones are dropped) and stops the communicator.
__device__ void record_error(const EpParams& p, int code, int rank, int field, int phase, int64_t value,
                             int64_t mine, uint64_t seq) {
  if (atomicCAS(&p.control->status, 0, code) != 0) return;
  volatile EpError* e = p.error;
  e->rank = rank;
  e->field = field;
  e->phase = phase;
  e->value = value;
  e->mine = mine;
  e->seq = static_cast<int64_t>(seq);
  __threadfence_system();
  e->code = code;
  __threadfence_system();
}

__device__ __forceinline__ bool failed(const EpParams& p) {
  return *reinterpret_cast<volatile int*>(&p.control->status) != 0;
}

// Thread `src` of the block waits for the flag of `phase` from rank `src`; false on timeout.
__device__ bool wait_flag(const EpParams& p, int phase, int src, uint64_t seq, uint64_t start) {
  const uint64_t* f = flag_ptr(p.local, p.layout, phase, src);
  unsigned spins = 0;  // NOTE: unsigned: a long timeout may spin past 2^31 times
  while (load_acquire_sys(f) < seq) {
    if (++spins % 64 == 0) {
      if (global_ns() - start > static_cast<uint64_t>(p.timeout_ns)) return false;
      if (failed(p)) return true;  // another wait of this rank already failed: give up quietly
    }
  }
  return true;
}

// Every thread has finished its one-sided writes: the block's last thread to arrive at the
// grid-wide counter raises this rank's flag of `phase` on every peer.
__device__ void signal_when_done(const EpParams& p, int phase, uint64_t seq) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned prev = atomicAdd(&p.control->done_blocks, 1u);
    if (prev == gridDim.x - 1) {
      p.control->done_blocks = 0;
      if (failed(p)) return;  // a broken operation raises no flags: the peers time out too
      __threadfence_system();
      for (int d = 0; d < p.world; ++d) store_release_sys(flag_ptr(p.peers[d], p.layout, phase, p.rank), seq);
    }
  }
}

template <typename IdxT>
__device__ __forceinline__ int64_t expert_of(const void* idx, int64_t i, int64_t num_experts) {
  const int64_t e = static_cast<int64_t>(static_cast<const IdxT*>(idx)[i]);
  return (e >= 0 && e < num_experts) ? e : -1;
}

__device__ __forceinline__ int64_t load_expert(const EpParams& p, int64_t i) {
  return p.idx_is_int64 ? expert_of<int64_t>(p.idx, i, p.num_experts) : expert_of<int32_t>(p.idx, i, p.num_experts);
}

// Copies `bytes` (a multiple of 16) from src to dst with the lanes of one warp.
__device__ __forceinline__ void warp_copy(char* __restrict__ dst, const char* __restrict__ src, int64_t bytes,
                                          int lane) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
  const int64_t n = bytes / 16;
  int64_t v = lane;
  for (; v + 3 * kWarp < n; v += 4 * kWarp) {
    const uint4 a = s[v], b = s[v + kWarp], c = s[v + 2 * kWarp], e = s[v + 3 * kWarp];
    d[v] = a;
    d[v + kWarp] = b;
    d[v + 2 * kWarp] = c;
    d[v + 3 * kWarp] = e;
  }
  for (; v < n; v += kWarp) d[v] = s[v];
}

// 16 bytes of T moved as one access. An aggregate of T, not a uint4 read through a T pointer:
// that punning breaks strict aliasing, and a host compiler (the emulation) does reorder it.
template <typename T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};

__device__ __forceinline__ void warp_zero(char* dst, int64_t bytes, int lane) {
  uint4* d = reinterpret_cast<uint4*>(dst);
  for (int64_t v = lane; v < bytes / 16; v += kWarp) d[v] = make_uint4(0, 0, 0, 0);
}

// ---- plan scratch ----------------------------------------------------------------------------
// int64: slot_base[E], cap_limit[E], own_off[E], tok_off[W], recv_tok[W], recv_kept[El],
// recv_base[El], recv_seg[El], total[1].
struct Scratch {
  int64_t *slot_base, *cap_limit, *own_off, *tok_off, *recv_tok, *recv_kept, *recv_base, *recv_seg, *total;
};

__host__ __device__ inline Scratch carve_scratch(int64_t* s, int64_t world, int64_t num_experts) {
  const int64_t el = num_experts / world;
  Scratch c;
  c.slot_base = s;
  c.cap_limit = c.slot_base + num_experts;
  c.own_off = c.cap_limit + num_experts;
  c.tok_off = c.own_off + num_experts;
  c.recv_tok = c.tok_off + world;
  c.recv_kept = c.recv_tok + world;
  c.recv_base = c.recv_kept + el;
  c.recv_seg = c.recv_base + el;
  c.total = c.recv_seg + el;
  return c;
}

// ---- kernels -----------------------------------------------------------------------------------

template <typename IdxT>
__global__ void __launch_bounds__(kRowThreads)
    destination_keys_kernel(const IdxT* __restrict__ idx, int64_t num_tokens, int64_t k, int64_t num_experts,
                            int64_t local_experts, int64_t* __restrict__ keys) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = static_cast<int64_t>(idx[t * k + j]);
      int64_t d = (e >= 0 && e < num_experts) ? e / local_experts : -1;
      for (int64_t i = 0; i < j && d >= 0; ++i) {  // a token goes to each rank once
        const int64_t f = static_cast<int64_t>(idx[t * k + i]);
        if (f >= 0 && f < num_experts && f / local_experts == d) d = -1;
      }
      keys[t * k + j] = d;
    }
  }
}

__global__ void __launch_bounds__(kCountThreads) exchange_counts_kernel(EpParams p) {
  __shared__ uint64_t s_seq;
  __shared__ int s_bad;
  using Scan = cub::BlockScan<int64_t, kCountThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  const EpLayout& L = p.layout;
  const int W = p.world, me = p.rank;
  const int64_t E = p.num_experts, El = E / W;
  const uint64_t start = global_ns();
  if (threadIdx.x == 0) {
    s_seq = ++p.control->seq;
    s_bad = 0;
  }
  // NOTE: zero first, failed or not: a no-sync caller runs its expert GEMMs on these counts before
  // it can see an error (at its next call), and zero counts make them compute nothing.
  if (p.tokens_per_expert != nullptr)
    for (int64_t el = threadIdx.x; el < El; el += blockDim.x) p.tokens_per_expert[el] = 0;
  __syncthreads();
  const uint64_t seq = s_seq;
  if (failed(p)) return;

  // 1. This rank's row (header, tokens per destination, slots per expert) into every peer.
  for (int d = 0; d < W; ++d) {
    int64_t* row = count_row(p.peers[d], L, seq, me);
    for (int64_t i = threadIdx.x; i < L.count_row; i += blockDim.x) {
      int64_t v = 0;
      if (i < kHdrLen) {
        switch (static_cast<int>(i)) {
          case kHdrMagic: v = kEpMagic; break;
          case kHdrSeq: v = static_cast<int64_t>(seq); break;
          case kHdrTokens: v = p.num_tokens; break;
          case kHdrRowBytes: v = p.row_bytes; break;
          case kHdrDtype: v = p.dtype_code; break;
          case kHdrExperts: v = E; break;
          case kHdrK: v = p.k; break;
          case kHdrPadTo: v = p.pad_to; break;
          case kHdrCapacity: v = p.capacity; break;
          case kHdrMaxRows: v = p.max_rows; break;
          case kHdrWorld: v = W; break;
          case kHdrScaleCols: v = p.scale_cols; break;
          case kHdrBadInput: v = p.bad_input; break;
          case kHdrPartial: v = p.part_dst == nullptr ? 0 : 1 + p.part_grad; break;
          default: break;
        }
      } else if (i < kHdrLen + W) {
        v = p.tok[i - kHdrLen];
      } else if (i < kHdrLen + W + E) {
        v = p.hist[i - kHdrLen - W];
      }
      row[i] = v;
    }
  }
  __threadfence_system();
  __syncthreads();
  for (int d = threadIdx.x; d < W; d += blockDim.x) store_release_sys(flag_ptr(p.peers[d], L, kEpCount, me), seq);

  // 2. Every peer's row.
  for (int s = threadIdx.x; s < W; s += blockDim.x) {
    if (!wait_flag(p, kEpCount, s, seq, start)) {
      record_error(p, kEpTimeout, s, 0, kEpCount, 0, 0, seq);
      s_bad = 1;
    }
  }
  __syncthreads();
  if (s_bad || failed(p)) return;

  // 3. The ranks must agree on everything but their token counts; those must fit the buffer.
  // One thread walks the peers in rank order, so that the error names the first peer that
  // disagrees whatever the threads' timing (W * kHdrLen compares).
  if (threadIdx.x == 0) {
    const int64_t* mine = count_row(p.local, L, seq, me);
    for (int s = 0; s < W && !s_bad; ++s) {
      const int64_t* theirs = count_row(p.local, L, seq, s);
      // NOTE: invalid inputs first: a rank that announces them may disagree on everything else.
      for (int i = 0; i < kHdrLen; ++i) {
        const int f = i == 0 ? kHdrBadInput : (i == kHdrBadInput ? 0 : i);
        if (f == kHdrTokens) continue;
        if (theirs[f] != mine[f]) {
          record_error(p, kEpMismatch, s, f, kEpCount, theirs[f], mine[f], seq);
          s_bad = 1;
          break;
        }
      }
    }
  }
  __syncthreads();
  if (s_bad || failed(p)) return;
  // NOTE: too many tokens only once no header disagrees. A disagreement is seen by every rank
  // (each differs from some rank), but which of the two errors a rank recorded first would
  // otherwise depend on its threads' timing: a rank recording kEpTooMany grows its buffer and
  // retries (a collective) while one recording kEpMismatch (e.g. a peer's bad_input) raises,
  // and the first then waits in that collective until the process group's own timeout.
  if (threadIdx.x == 0) {
    int64_t most = 0;
    int first = -1;  // the first rank with too many, named whatever the timing
    for (int r = 0; r < W; ++r) {
      const int64_t t = count_row(p.local, L, seq, r)[kHdrTokens];
      most = max(most, t);
      if (first < 0 && t > L.sizes.max_tokens) first = r;
    }
    if (first >= 0) {
      record_error(p, kEpTooMany, first, kHdrTokens, kEpCount, most, L.sizes.max_tokens, seq);
      s_bad = 1;
    }
  }
  __syncthreads();
  if (s_bad || failed(p)) return;

  // 4. The plan. Per global expert e: this rank's offset in its own expert-major order (own),
  // the slots of ranks before this one (prefix) and of all ranks (total).
  const Scratch sc = carve_scratch(p.scratch, W, E);
  const int64_t hist_at = kHdrLen + W;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t prefix = 0, total = 0;
    for (int s = 0; s < W; ++s) {
      const int64_t c = count_row(p.local, L, seq, s)[hist_at + e];
      if (s < me) prefix += c;
      total += c;
    }
    sc.slot_base[e] = prefix;
    sc.cap_limit[e] = total;
  }
  int64_t carry = 0;
  for (int64_t e0 = 0; e0 < E; e0 += kCountThreads) {
    const int64_t e = e0 + threadIdx.x;
    const int64_t v = e < E ? static_cast<int64_t>(p.hist[e]) : 0;
    int64_t excl, aggregate;
    Scan(scan_tmp).ExclusiveSum(v, excl, aggregate);
    if (e < E) sc.own_off[e] = carry + excl;
    carry += aggregate;
    __syncthreads();
  }
  // Per owner d, its local experts' segments: kept rows, padded size, base. A slot of this rank
  // at position pos of expert e (own row r = own_off + pos) lands at base + prefix + pos =
  // r + slot_base on its owner, and is kept while prefix + pos < cap, i.e. r < cap_limit.
  int64_t cap = p.capacity;
  if (p.max_rows >= 0) cap = cap < 0 ? p.max_rows : min(cap, p.max_rows);
  const bool masked = p.max_rows >= 0;
  for (int d = threadIdx.x; d < W; d += blockDim.x) {
    int64_t base = 0;
    for (int64_t el = 0; el < El; ++el) {
      const int64_t e = d * El + el;
      const int64_t prefix = sc.slot_base[e], total = sc.cap_limit[e];
      const int64_t kept = cap < 0 ? total : min(total, cap);
      const int64_t seg = masked ? p.max_rows : (kept + p.pad_to - 1) / p.pad_to * p.pad_to;
      if (d == me) {
        sc.recv_kept[el] = kept;
        sc.recv_base[el] = base;
        sc.recv_seg[el] = masked ? kept : seg;
        p.tokens_per_expert[el] = static_cast<int32_t>(masked ? kept : seg);
      }
      sc.slot_base[e] = base + prefix - sc.own_off[e];
      sc.cap_limit[e] = cap < 0 ? INT64_MAX : sc.own_off[e] + cap - prefix;
      base += seg;
    }
    if (d == me) {
      *sc.total = base;
      if (p.recv_total != nullptr) *p.recv_total = base;
      if (p.recv_total_host != nullptr) *reinterpret_cast<volatile int64_t*>(p.recv_total_host) = base;
    }
  }
  if (threadIdx.x == 0) {
    int64_t off = 0;
    for (int d = 0; d < W; ++d) {
      sc.tok_off[d] = off;
      off += p.tok[d];
    }
  }
  for (int s = threadIdx.x; s < W; s += blockDim.x) sc.recv_tok[s] = count_row(p.local, L, seq, s)[kHdrLen + me];
  if (p.recv_total_host != nullptr) __threadfence_system();
}

// One warp per token: its rows to each destination it has slots on, once per destination.
__global__ void __launch_bounds__(kRowThreads) send_tokens_kernel(EpParams p, bool grad) {
  const EpLayout& L = p.layout;
  const uint64_t seq = *reinterpret_cast<volatile unsigned long long*>(&p.control->seq);
  if (!failed(p)) {
    const Scratch sc = carve_scratch(p.scratch, p.world, p.num_experts);
    const int lane = threadIdx.x % kWarp;
    const int64_t El = p.num_experts / p.world;
    const int64_t meta_cols = L.sizes.max_k + 1;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp; t < p.num_tokens;
         t += warps) {
      // Lane j: slot j's destination, its row there, and the staging row if it is the first.
      int64_t dest = -1, row = -1, stage = -1;
      if (lane < p.k) {
        const int64_t s = t * p.k + lane;
        const int64_t e = load_expert(p, s);
        if (e >= 0) dest = e / El;
        if (grad) {
          row = p.slot_rows[s];
          stage = p.stage_rows[s];
        } else {
          if (e >= 0) {
            const int64_t r = p.expert_rows[s];
            row = r < sc.cap_limit[e] ? r + sc.slot_base[e] : -1;
            if (p.dest_rows[s] >= 0) stage = p.dest_rows[s] - sc.tok_off[dest];  // position among those to dest
          }
          p.slot_rows[s] = row;
          p.stage_rows[s] = stage;
          if (p.slot_map != nullptr) p.slot_map[s] = row >= 0 ? s : -1;
        }
      }
      if (!grad && p.partial_map != nullptr) {
        // The partial combine sums the token's kept slots on each destination into the row of the
        // first of them (the other lanes' keys are unique, so they match nothing).
        const int key = row >= 0 ? static_cast<int>(dest) : -2 - lane;
        const unsigned same = __match_any_sync(kFull, key);
        if (lane < p.k) p.partial_map[t * p.k + lane] = row >= 0 && __ffs(same) - 1 == lane ? t * p.k + lane : -1;
      }
      unsigned firsts = __ballot_sync(kFull, stage >= 0);
      while (firsts) {
        const int j = __ffs(firsts) - 1;
        firsts &= firsts - 1;
        const int64_t d = __shfl_sync(kFull, dest, j);
        // NOTE: the staging row from the buffer's current sizes (they may have grown since the
        // dispatch whose plan a gradient send reuses).
        const int64_t st = p.rank * L.sizes.max_tokens + __shfl_sync(kFull, stage, j);
        char* peer = p.peers[d];
        warp_copy(peer + L.payload + st * L.sizes.row_bytes,
                  static_cast<const char*>(p.x) + t * p.x_row_stride, p.row_bytes, lane);
        int64_t* meta = reinterpret_cast<int64_t*>(peer + L.meta) + st * meta_cols;
        if (lane < p.k) meta[lane] = dest == d ? row : -1;
        if (lane == 0) meta[L.sizes.max_k] = t;
        if (p.weights != nullptr && lane < p.k)
          reinterpret_cast<float*>(peer + L.weights)[st * L.sizes.max_k + lane] = p.weights[t * p.k + lane];
        if (p.x_scale != nullptr) {
          float* sdst = reinterpret_cast<float*>(peer + L.scales) + st * L.sizes.scale_cols;
          for (int64_t c = lane; c < p.scale_cols; c += kWarp) sdst[c] = p.x_scale[t * p.scale_cols + c];
        }
      }
    }
  }
  signal_when_done(p, kEpData, seq);
}

// Every byte of [base, base + bytes) set to 0xFF (NaN in every float payload dtype); bytes a
// multiple of 16 and base 16-byte aligned (payload rows are).
__device__ void poison_rows(void* base, int64_t bytes) {
  uint4* v = static_cast<uint4*>(base);
  const uint4 ones = make_uint4(~0u, ~0u, ~0u, ~0u);
  const int64_t n = bytes / 16, threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += threads) v[i] = ones;
}

__global__ void __launch_bounds__(kCountThreads) wait_kernel(EpParams p, int phase, bool signal, bool new_op) {
  __shared__ uint64_t s_seq;
  const uint64_t start = global_ns();
  if (threadIdx.x == 0) s_seq = new_op ? ++p.control->seq : p.control->seq;
  __syncthreads();
  const uint64_t seq = s_seq;
  if (!failed(p)) {
    if (signal)
      for (int d = threadIdx.x; d < p.world; d += blockDim.x)
        store_release_sys(flag_ptr(p.peers[d], p.layout, phase, p.rank), seq);
    for (int s = threadIdx.x; s < p.world; s += blockDim.x)
      if (!wait_flag(p, phase, s, seq, start)) record_error(p, kEpTimeout, s, 0, phase, 0, 0, seq);
  }
  if (phase != kEpBack) return;
  __syncthreads();
  // NOTE: combine's keep_rows copies these rows for the weights' gradient: after a failure they
  // must be NaN, not the rows of an earlier combine.
  if (failed(p)) poison_rows(p.local + p.layout.back, p.num_tokens * p.k * p.layout.sizes.row_bytes);
}

// Items (segment s, index i < count(s)) of consecutive segments, spread over the grid's warps in
// (segment, index) order: f(s, i). NOTE: the walk costs O(segments + items / warps) per warp, never
// a visit (or a division) per slot of a worst-case-sized layout: a buffer grown for a long prefill,
// or one hot expert's rows setting the width of every expert, must not make the kernels walk the
// empty slots.
template <typename C, typename F>
__device__ __forceinline__ void for_each_in_segments(int64_t segments, C&& count, F&& f) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  int64_t s = 0, base = 0, n = segments > 0 ? count(0) : 0;  // v's segment, its first index, its count
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;; v += warps) {
    while (s < segments && v >= base + n) {
      base += n;
      n = ++s < segments ? count(s) : 0;
    }
    if (s >= segments) return;
    f(s, v - base);
  }
}

// The staged tokens that arrived: f(g, s, i) for staging slot g = s * max_tokens + i, i < recv_tok[s].
template <typename F>
__device__ __forceinline__ void for_each_received(const int64_t* recv_tok, int64_t world, int64_t max_tokens, F&& f) {
  for_each_in_segments(world, [&](int64_t s) { return recv_tok[s]; },
                       [&](int64_t s, int64_t i) { f(s * max_tokens + i, s, i); });
}

// The warp's share g = w, w + warps, ... of [0, count), 32 of them read at once: f(g, code) for
// each with code = codes[g] >= 0, in increasing g. Empty entries cost a lane, not a warp iteration.
template <typename F>
__device__ __forceinline__ void for_each_coded(const int64_t* codes, int64_t count, F&& f) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t g0 = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp; g0 < count;
       g0 += warps * kWarp) {
    const int64_t mine = g0 + lane * warps;
    const int64_t code = mine < count ? codes[mine] : -1;
    for (unsigned live = __ballot_sync(kFull, code >= 0); live != 0; live &= live - 1) {
      const int b = __ffs(live) - 1;
      f(g0 + b * warps, __shfl_sync(kFull, code, b));
    }
  }
}

// One warp per staged token: copied into the recv rows of each of its slots here.
__global__ void __launch_bounds__(kRowThreads) expand_kernel(EpParams p) {
  if (failed(p)) {
    // NOTE: all-ones bytes are NaN in every payload dtype (fp32, fp16, bf16, fp8), so a failed
    // exchange never hands out plausible rows (in the masked layout too: a failure in the data
    // phase leaves real counts in tokens_per_expert).
    poison_rows(p.recv_x, p.recv_rows * p.row_bytes);
    if (p.part_dst != nullptr) {  // nothing to send back: the combine's sum is NaN (poison_if) anyway
      const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
      for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < p.part_count; g += threads)
        p.part_dst[g] = -1;
    }
    return;
  }
  const EpLayout& L = p.layout;
  const Scratch sc = carve_scratch(p.scratch, p.world, p.num_experts);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t meta_cols = L.sizes.max_k + 1;
  if (p.part_dst != nullptr) {  // the plan's slots that nothing arrived in
    const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t s = 0; s < p.world; ++s)
      for (int64_t i = sc.recv_tok[s] + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
           i < L.sizes.max_tokens; i += threads)
        p.part_dst[s * L.sizes.max_tokens + i] = -1;
  }
  for_each_received(sc.recv_tok, p.world, L.sizes.max_tokens, [&](int64_t g, int64_t s, int64_t) {
    const int64_t* meta = reinterpret_cast<const int64_t*>(p.local + L.meta) + g * meta_cols;
    const int64_t t = meta[L.sizes.max_k];
    const int64_t mine = lane < p.k ? meta[lane] : -1;
    unsigned rows = __ballot_sync(kFull, mine >= 0 && mine < p.recv_rows);
    if (p.part_dst != nullptr) {
      // The partial combine's plan: this staging is overwritten by the next dispatch, the plan is
      // the caller's. The partial goes to the row of the first slot kept here, as the source's
      // partial_map expects (its slot_rows are these rows).
      const bool ok = (rows >> lane) & 1u;
      if (lane < p.k) {
        p.part_rows[g * p.k + lane] = ok ? mine : -1;
        p.part_w[g * p.k + lane] = reinterpret_cast<const float*>(p.local + L.weights)[g * L.sizes.max_k + lane];
      }
      if (lane == 0) p.part_dst[g] = rows ? (s << kBackShift) | (t * p.k + __ffs(rows) - 1) : -1;
    }
    while (rows) {
      const int j = __ffs(rows) - 1;
      rows &= rows - 1;
      const int64_t r = __shfl_sync(kFull, mine, j);
      warp_copy(static_cast<char*>(p.recv_x) + r * p.row_bytes, p.local + L.payload + g * L.sizes.row_bytes,
                p.row_bytes, lane);
      if (lane == 0) p.back_map[r] = (s << kBackShift) | (t * p.k + j);
      if (p.recv_scale != nullptr) {
        const float* ssrc = reinterpret_cast<const float*>(p.local + L.scales) + g * L.sizes.scale_cols;
        for (int64_t c = lane; c < p.scale_cols; c += kWarp) p.recv_scale[r * p.scale_cols + c] = ssrc[c];
      }
    }
  });
  if (p.max_rows >= 0) return;  // masked: rows past each expert's count are never read
  // Exact layout: the padding rows of each expert are zero and map back nowhere.
  const int64_t El = p.num_experts / p.world;
  for (int64_t el = blockIdx.x; el < El; el += gridDim.x) {
    const int64_t lo = sc.recv_base[el] + sc.recv_kept[el], hi = sc.recv_base[el] + sc.recv_seg[el];
    for (int64_t r = lo + warp; r < hi && r < p.recv_rows; r += kRowWarps) {
      warp_zero(static_cast<char*>(p.recv_x) + r * p.row_bytes, p.row_bytes, lane);
      if (lane == 0) p.back_map[r] = -1;
      if (p.recv_scale != nullptr)
        for (int64_t c = lane; c < p.scale_cols; c += kWarp) p.recv_scale[r * p.scale_cols + c] = 0.f;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) expand_grad_kernel(EpParams p, T* __restrict__ grad_y) {
  if (failed(p)) {  // NOTE: NaN rather than the zeroed rows: a failed exchange must not look like a zero gradient
    poison_rows(grad_y, p.recv_rows * p.row_bytes);
    return;
  }
  const EpLayout& L = p.layout;
  const Scratch sc = carve_scratch(p.scratch, p.world, p.num_experts);
  const int lane = threadIdx.x % kWarp;
  const int64_t meta_cols = L.sizes.max_k + 1;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const int64_t vecs = p.row_bytes / 16;  // NOTE: rows are a multiple of 16 bytes (check_params)
  for_each_received(sc.recv_tok, p.world, L.sizes.max_tokens, [&](int64_t g, int64_t, int64_t) {
    const int64_t* meta = reinterpret_cast<const int64_t*>(p.local + L.meta) + g * meta_cols;
    const float* w = reinterpret_cast<const float*>(p.local + L.weights) + g * L.sizes.max_k;
    const char* src = p.local + L.payload + g * L.sizes.row_bytes;
    for (int j = 0; j < p.k; ++j) {
      const int64_t r = meta[j];
      if (r < 0 || r >= p.recv_rows) continue;
      const float wj = w[j];
      char* dst = reinterpret_cast<char*>(grad_y) + r * p.row_bytes;
      // 16-byte vectors (the element-wise loop issued 8x the memory instructions for 16-bit rows).
      for (int64_t v = lane; v < vecs; v += kWarp) {
        const Vec16<T> x = *reinterpret_cast<const Vec16<T>*>(src + v * 16);
        Vec16<T> o;
#pragma unroll
        for (int e = 0; e < kVec; ++e) o.v[e] = from_acc<T>(mul_rn(wj, to_acc(x.v[e])));
        *reinterpret_cast<Vec16<T>*>(dst + v * 16) = o;
      }
    }
  });
}

// One warp per kept row of each local expert: back to its source's back staging.
__global__ void __launch_bounds__(kRowThreads) send_back_kernel(EpParams p) {
  const EpLayout& L = p.layout;
  const uint64_t seq = *reinterpret_cast<volatile unsigned long long*>(&p.control->seq);
  if (!failed(p)) {
    const Scratch sc = carve_scratch(p.scratch, p.world, p.num_experts);
    const int lane = threadIdx.x % kWarp;
    const int64_t El = p.num_experts / p.world;
    // The kept rows of every local expert (at most max_rows each in the masked layout).
    const auto kept = [&](int64_t el) {
      return p.max_rows >= 0 ? min(sc.recv_kept[el], p.max_rows) : sc.recv_kept[el];
    };
    for_each_in_segments(El, kept, [&](int64_t el, int64_t i) {
      const int64_t r = sc.recv_base[el] + i;
      const int64_t code = p.back_map[r];
      if (code < 0) return;
      const int64_t s = code >> kBackShift, slot = code & ((int64_t{1} << kBackShift) - 1);
      warp_copy(p.peers[s] + L.back + slot * L.sizes.row_bytes, static_cast<const char*>(p.y) + r * p.y_row_stride,
                p.row_bytes, lane);
    });
  }
  signal_when_done(p, kEpBack, seq);
}

// One warp per staged token with rows here: the float32 sum, in slot order, of its rows (weighted:
// times the slot's routing weight), each element rounded as unpermute rounds it (so the partial
// is the unpermute of the token's slots here), cast to T and written into its source's back
// staging. Lanes take 16-byte column vectors; up to four of the token's rows are loaded at once.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) send_partials_kernel(EpParams p, bool weighted) {
  using Acc = acc_type<T>;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kLoads = 4;
  const EpLayout& L = p.layout;
  const uint64_t seq = *reinterpret_cast<volatile unsigned long long*>(&p.control->seq);
  if (!failed(p)) {
    const int lane = threadIdx.x % kWarp;
    const int64_t vecs = p.row_bytes / 16;
    for_each_coded(p.part_dst, p.part_count, [&](int64_t g, int64_t code) {
      int64_t row = -1;
      Acc w = Acc(1);
      if (lane < p.k) {
        row = p.part_rows[g * p.k + lane];
        if (weighted) w = p.part_w[g * p.k + lane];
      }
      const unsigned here = __ballot_sync(kFull, row >= 0);
      char* dst = p.peers[code >> kBackShift] + L.back + (code & ((int64_t{1} << kBackShift) - 1)) * L.sizes.row_bytes;
      for (int64_t v0 = 0; v0 < vecs; v0 += kWarp) {
        const int64_t v = v0 + lane;
        Acc acc[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] = Acc(0);
        for (unsigned m = here; m != 0;) {  // m is the same on every lane
          int64_t r[kLoads];
          Acc wj[kLoads];
          Vec16<T> buf[kLoads];
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            r[u] = -1;
            wj[u] = Acc(0);
            if (m != 0) {
              const int j = __ffs(m) - 1;
              m &= m - 1;
              r[u] = __shfl_sync(kFull, row, j);
              wj[u] = __shfl_sync(kFull, w, j);
            }
          }
#pragma unroll
          for (int u = 0; u < kLoads; ++u)
            if (r[u] >= 0 && v < vecs)
              buf[u] = *reinterpret_cast<const Vec16<T>*>(static_cast<const char*>(p.y) + r[u] * p.y_row_stride + v * 16);
#pragma unroll
          for (int u = 0; u < kLoads; ++u) {
            if (r[u] < 0 || v >= vecs) continue;
#pragma unroll
            for (int e = 0; e < kVec; ++e)
              acc[e] = add_rn(acc[e], weighted ? mul_rn(wj[u], to_acc(buf[u].v[e])) : to_acc(buf[u].v[e]));
          }
        }
        if (v < vecs) {
          Vec16<T> out;
#pragma unroll
          for (int e = 0; e < kVec; ++e) out.v[e] = cast_out<T>(acc[e]);
          *reinterpret_cast<Vec16<T>*>(dst + v * 16) = out;
        }
      }
    });
  }
  signal_when_done(p, kEpBack, seq);
}

// The partial combine's backward on the experts' side, one warp per staged gradient row with
// rows here: grad_y[row] = cast(w * g) for each of its slots here (as expand_grad), and each
// slot's dot(y[row], g), into the first 4 bytes of the slot's row t * k + j in its source's back
// staging. The dot is unpermute_backward's, bit for bit: float64 products, each lane adding its
// 16-byte vectors' parts in increasing order, then a butterfly over the warp, rounded to float32.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) expand_grad_partial_kernel(EpParams p, T* __restrict__ grad_y) {
  using Acc = acc_type<T>;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const EpLayout& L = p.layout;
  const uint64_t seq = *reinterpret_cast<volatile unsigned long long*>(&p.control->seq);
  if (failed(p)) {  // NaN rather than zeros; no flag: the sources time out or have failed themselves
    poison_rows(grad_y, p.recv_rows * p.row_bytes);
  } else {
    const int lane = threadIdx.x % kWarp;
    const int64_t vecs = p.row_bytes / 16;
    // NOTE: the plan indexes staging rows by the dispatch's max_tokens; the gradient was staged
    // with the buffer's current one (it may have grown since).
    const int64_t plan_tokens = p.part_count / p.world;
    for_each_coded(p.part_dst, p.part_count, [&](int64_t g, int64_t code) {
      const int64_t staged = (g / plan_tokens) * L.sizes.max_tokens + g % plan_tokens;
      const T* src = reinterpret_cast<const T*>(p.local + L.payload + staged * L.sizes.row_bytes);
      const int64_t mine = lane < p.k ? p.part_rows[g * p.k + lane] : -1;
      const unsigned here = __ballot_sync(kFull, mine >= 0);
      // The partial went to the first slot here, t * k + j0: the token's slots start j0 before it.
      const int64_t slot0 = (code & ((int64_t{1} << kBackShift) - 1)) - (__ffs(here) - 1);
      char* back = p.peers[code >> kBackShift] + L.back;
      for (unsigned m = here; m != 0; m &= m - 1) {
        const int j = __ffs(m) - 1;
        const int64_t r = __shfl_sync(kFull, mine, j);
        const Acc wj = p.part_w[g * p.k + j];
        const T* yr = reinterpret_cast<const T*>(static_cast<const char*>(p.y) + r * p.y_row_stride);
        T* dst = grad_y + r * (p.row_bytes / static_cast<int64_t>(sizeof(T)));
        double dot = 0.0;
        for (int64_t v = lane; v < vecs; v += kWarp) {
          const Vec16<T> gv = *reinterpret_cast<const Vec16<T>*>(src + v * kVec);
          const Vec16<T> yv = *reinterpret_cast<const Vec16<T>*>(yr + v * kVec);
          Vec16<T> o;
          double part = 0.0;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const Acc ge = to_acc(gv.v[e]);
            o.v[e] = cast_out<T>(mul_rn(wj, ge));
            // No FMA (float64 rows): unpermute_backward_kernel's and the CPU op's rounding.
            part = add_rn(part, mul_rn(static_cast<double>(to_acc(yv.v[e])), static_cast<double>(ge)));
          }
          dot = add_rn(dot, part);
          *reinterpret_cast<Vec16<T>*>(dst + v * kVec) = o;
        }
#pragma unroll
        for (int off = kWarp / 2; off > 0; off /= 2) dot += __shfl_xor_sync(kFull, dot, off);
        if (lane == 0) *reinterpret_cast<float*>(back + (slot0 + j) * L.sizes.row_bytes) = static_cast<float>(dot);
      }
    });
  }
  signal_when_done(p, kEpBack, seq);
}

// grad_w[t, j] = the dot an expert rank wrote for kept slot (t, j), 0 for the others; NaN after a
// failure (the back staging is poisoned then too).
__global__ void __launch_bounds__(kRowThreads) gather_slot_dots_kernel(EpParams p, float* __restrict__ grad_w) {
  const bool bad = failed(p);
  const int64_t n = p.num_tokens * p.k, threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += threads) {
    const float d = *reinterpret_cast<const float*>(p.local + p.layout.back + i * p.layout.sizes.row_bytes);
    grad_w[i] = bad ? __int_as_float(0x7fffffff) : (p.slot_rows[i] >= 0 ? d : 0.f);
  }
}

// Calls f(tag) with tag a null T* for the element type T of `dtype` (the row kernels' template argument).
template <typename F>
void with_ep_type(EpFloat dtype, F&& f) {
  switch (dtype) {
    case EpFloat::kFloat32: f(static_cast<float*>(nullptr)); break;
    case EpFloat::kFloat16: f(static_cast<__half*>(nullptr)); break;
    case EpFloat::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

unsigned data_grid(const EpParams& p, int64_t items) {
  const int64_t most = p.num_blocks > 0 ? p.num_blocks : sm_count();
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(most, (items + kRowWarps - 1) / kRowWarps)));
}

void check_params(const EpParams& p) {
  MOE_HOST_ASSERT(p.world >= 1 && p.world <= kEpMaxWorld && p.world == p.layout.sizes.world,
                  "ep: world must be in [1, 1024] and match the buffer");
  MOE_HOST_ASSERT(p.rank >= 0 && p.rank < p.world, "ep: rank out of range");
  MOE_HOST_ASSERT(p.num_experts >= p.world && p.num_experts % p.world == 0 &&
                      p.num_experts <= p.layout.sizes.max_experts,
                  "ep: num_experts must be a multiple of world within the buffer's max_experts");
  MOE_HOST_ASSERT(p.k >= 1 && p.k <= p.layout.sizes.max_k && p.k <= kWarp, "ep: k must be in [1, min(32, max_k)]");
  // NOTE: num_tokens may exceed the buffer's max_tokens: the count exchange tells every rank
  // (kEpTooMany) and the data kernels then write nothing, so that all ranks can grow together.
  MOE_HOST_ASSERT(p.num_tokens >= 0, "ep: negative num_tokens");
  MOE_HOST_ASSERT(p.row_bytes % 16 == 0 && p.row_bytes <= p.layout.sizes.row_bytes,
                  "ep: row_bytes must be a multiple of 16 within the buffer's row_bytes");
  MOE_HOST_ASSERT(p.scale_cols <= p.layout.sizes.scale_cols, "ep: scale_cols over the buffer's");
  MOE_HOST_ASSERT(p.local && p.peers && p.control && p.error && p.scratch, "ep: communicator pointers missing");
}

}  // namespace

EpLayout ep_layout(const EpSizes& s) {
  MOE_HOST_ASSERT(s.world >= 1 && s.world <= kEpMaxWorld, "ep_layout: world must be in [1, 1024]");
  MOE_HOST_ASSERT(s.max_experts >= 1 && s.max_k >= 1 && s.max_tokens >= 1, "ep_layout: sizes must be >= 1");
  MOE_HOST_ASSERT(s.row_bytes >= 16 && s.row_bytes % 16 == 0, "ep_layout: row_bytes must be a positive multiple of 16");
  EpLayout L;
  L.sizes = s;
  L.count_row = kHdrLen + s.world + s.max_experts;
  const int64_t staged = s.world * s.max_tokens;
  size_t at = 0;
  L.flags = at;
  at += align256(sizeof(uint64_t) * kEpNumPhases * s.world);
  L.counts = at;
  at += align256(sizeof(int64_t) * 2 * s.world * L.count_row);
  L.meta = at;
  at += align256(sizeof(int64_t) * staged * (s.max_k + 1));
  L.weights = at;
  at += align256(sizeof(float) * staged * s.max_k);
  L.scales = at;
  at += align256(sizeof(float) * staged * s.scale_cols);
  L.payload = at;
  at += align256(static_cast<size_t>(staged) * s.row_bytes);
  L.back = at;
  at += align256(static_cast<size_t>(s.max_tokens) * s.max_k * s.row_bytes);
  L.total = at;
  return L;
}

int64_t ep_scratch_len(int64_t world, int64_t num_experts) {
  return 3 * num_experts + 2 * world + 3 * (num_experts / world) + 1;
}

void ep_destination_keys(const EpParams& p, int64_t* dest_keys, cudaStream_t stream) {
  check_params(p);
  if (p.num_tokens == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((p.num_tokens + kRowThreads - 1) / kRowThreads, 4096));
  const int64_t el = p.num_experts / p.world;
  if (p.idx_is_int64)
    destination_keys_kernel<int64_t><<<grid, kRowThreads, 0, stream>>>(
        static_cast<const int64_t*>(p.idx), p.num_tokens, p.k, p.num_experts, el, dest_keys);
  else
    destination_keys_kernel<int32_t><<<grid, kRowThreads, 0, stream>>>(
        static_cast<const int32_t*>(p.idx), p.num_tokens, p.k, p.num_experts, el, dest_keys);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void ep_exchange_counts(const EpParams& p, cudaStream_t stream) {
  check_params(p);
  MOE_HOST_ASSERT(p.tok && p.hist && p.tokens_per_expert, "ep_exchange_counts: tok, hist, tokens_per_expert needed");
  exchange_counts_kernel<<<1, kCountThreads, 0, stream>>>(p);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void ep_send_tokens(const EpParams& p, bool grad, cudaStream_t stream) {
  check_params(p);
  MOE_HOST_ASSERT(p.num_tokens == 0 || (p.x && p.idx && p.slot_rows && p.stage_rows),
                  "ep_send_tokens: x, idx, slot_rows, stage_rows needed");
  MOE_HOST_ASSERT(grad || p.num_tokens == 0 || (p.expert_rows && p.dest_rows), "ep_send_tokens: the local index is needed");
  MOE_HOST_ASSERT(!grad || p.num_tokens == 0 || p.weights, "ep_send_tokens: weights needed for a gradient send");
  // NOTE: the stride matters only with two rows or more (row t at t * x_row_stride), as in the
  // Python check (_ipc_problem); asserting it for one row would throw here, after this rank's
  // count exchange went out, and leave the peers waiting for its tokens until they time out.
  MOE_HOST_ASSERT(p.num_tokens <= 1 || p.x_row_stride % 16 == 0, "ep_send_tokens: x rows must be 16-byte aligned");
  // NOTE: at least one block, even without tokens: the flag must still be raised.
  send_tokens_kernel<<<data_grid(p, p.num_tokens), kRowThreads, 0, stream>>>(p, grad);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void ep_wait(const EpParams& p, EpPhase phase, bool signal, bool new_op, cudaStream_t stream) {
  check_params(p);
  wait_kernel<<<1, std::min(kCountThreads, std::max(kWarp, (p.world + kWarp - 1) / kWarp * kWarp)), 0, stream>>>(
      p, static_cast<int>(phase), signal, new_op);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void ep_expand(const EpParams& p, cudaStream_t stream) {
  check_params(p);
  MOE_HOST_ASSERT(p.recv_rows == 0 || (p.recv_x && p.back_map), "ep_expand: recv_x and back_map needed");
  const int64_t staged = p.world * p.layout.sizes.max_tokens;
  expand_kernel<<<data_grid(p, staged), kRowThreads, 0, stream>>>(p);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void ep_expand_grad(const EpParams& p, EpFloat dtype, void* grad_y, cudaStream_t stream) {
  check_params(p);
  const unsigned grid = data_grid(p, p.world * p.layout.sizes.max_tokens);
  with_ep_type(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    expand_grad_kernel<T><<<grid, kRowThreads, 0, stream>>>(p, static_cast<T*>(grad_y));
  });
  MOE_CUDA_CHECK(cudaGetLastError());
}

void ep_send_back(const EpParams& p, cudaStream_t stream) {
  check_params(p);
  MOE_HOST_ASSERT(p.y_row_stride % 16 == 0, "ep_send_back: y rows must be 16-byte aligned");
  const int64_t rows = p.max_rows >= 0 ? (p.num_experts / p.world) * p.max_rows : p.recv_rows;
  send_back_kernel<<<data_grid(p, rows), kRowThreads, 0, stream>>>(p);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void ep_expand_grad_partial(const EpParams& p, EpFloat dtype, void* grad_y, cudaStream_t stream) {
  check_params(p);
  MOE_HOST_ASSERT(p.y_row_stride % 16 == 0, "ep_expand_grad_partial: y rows must be 16-byte aligned");
  MOE_HOST_ASSERT(p.part_count % p.world == 0 && (p.part_count == 0 || (p.part_rows && p.part_w && p.part_dst)),
                  "ep_expand_grad_partial: the dispatch's partial plan is needed");
  // NOTE: at least one block, even with nothing to expand: the flag must still be raised.
  const unsigned grid = data_grid(p, p.part_count);
  with_ep_type(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    expand_grad_partial_kernel<T><<<grid, kRowThreads, 0, stream>>>(p, static_cast<T*>(grad_y));
  });
  MOE_CUDA_CHECK(cudaGetLastError());
}

void ep_gather_slot_dots(const EpParams& p, float* grad_w, cudaStream_t stream) {
  check_params(p);
  const int64_t n = p.num_tokens * p.k;
  if (n == 0) return;
  MOE_HOST_ASSERT(grad_w && p.slot_rows, "ep_gather_slot_dots: grad_w and slot_rows needed");
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((n + kRowThreads - 1) / kRowThreads, 4096));
  gather_slot_dots_kernel<<<grid, kRowThreads, 0, stream>>>(p, grad_w);
  MOE_CUDA_CHECK(cudaGetLastError());
}

void ep_send_partials(const EpParams& p, EpFloat dtype, bool weighted, cudaStream_t stream) {
  check_params(p);
  MOE_HOST_ASSERT(p.y_row_stride % 16 == 0, "ep_send_partials: y rows must be 16-byte aligned");
  MOE_HOST_ASSERT(p.part_count == 0 || (p.part_rows && p.part_w && p.part_dst),
                  "ep_send_partials: the dispatch's partial plan is needed");
  // NOTE: at least one block, even with nothing to send: the flag must still be raised.
  const unsigned grid = data_grid(p, p.part_count);
  with_ep_type(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    send_partials_kernel<T><<<grid, kRowThreads, 0, stream>>>(p, weighted);
  });
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe_ext::kernels
