// bench_ep: dispatch and combine over N ranks forked from this process, torch-free: the ipc
// backend (csrc/comm/ep_ops.cuh) on every run, and the nccl protocol (below) when every rank has
// its own GPU. All ranks on one GPU (run it under MPS, bench/README.md) or, with
// --one-gpu-per-rank, rank r on device r.
//
// Bootstrap: before any CUDA call, an anonymous MAP_SHARED page holds a process-shared barrier
// (atomics, with an abort flag), the ranks' CUDA IPC handles, the NCCL unique id and their
// results. Each rank makes a comm::SymmetricBuffer sized for the largest case (max tokens per
// rank, hidden * element size, k, E), publishes its handle there, opens every peer's; with one
// GPU per rank, rank 0 also makes an NCCL unique id that the page carries to every rank, and each
// joins a comm::NcclComm. Then the ranks run the cases. The parent probes for a GPU in a child (a
// CUDA call in the parent would make CUDA unusable in the forked ranks), then only supervises: a
// rank that crashes or fails makes the parent stop the others (abort flag, then SIGKILL after a
// grace period), and no barrier completing for --timeout-s seconds kills every rank, so nothing
// hangs.
//
// One iteration, on every rank (each rank has the same T tokens; its routing is k distinct
// uniformly drawn experts per token and its data uniform in [-1, 1), both seeded by rank):
//   barrier; event; dispatch; event; wait for it; barrier; event; combine; event; wait for it
// with, for the ipc rows:
//   dispatch = ep_dispatch_begin, then in the exact layout cudaEventSynchronize(counted) +
//     SymmetricBuffer::recv_total() + recv_x grown if needed, then ep_dispatch_finish
//   (the dispatch's kernels also write the combine's row map, EpParams::slot_map)
//   combine = ep_combine(y = the unmodified recv_x, float32 weights)
// so the exact layout's host read of the row count is inside the dispatch time. --masked uses
// the no-sync layout, max_rows = ranks * T rows per local expert (every row fits: a token has
// distinct experts): nothing synchronises inside the timed region. Every synchronisation is
// followed by SymmetricBuffer::error(); an EpError is printed (code, the rank it names, phase)
// and the rank exits 3. Time = max over ranks of each rank's median over the timed iterations.
//
// The nccl rows (--one-gpu-per-rank only: NCCL refuses two ranks on one GPU; exact layout only,
// so not with --masked): the protocol of the Python nccl/gloo backend (moe_ext/dispatch.py,
// _AllToAllBackend._dispatch / combine_rows) with the torch-free kernels, on a comm::NcclComm:
//   dispatch, sender: ep_destination_keys (each token's first slot on each destination rank) and
//     each slot's owner rank; index passes (permute_route/permute_scatter without rows) over both
//     give the tokens and slots per destination, and the order the slots' rows come back in;
//     1. count exchange: (tokens, slots) per peer, an alltoall of 2 x W int64, one host read.
//        (The slot counts size recv_x exactly; the Python backend reads the row count a second
//        time inside permute(sync=True) instead.)
//     2. permute_scatter of x by destination key: the rows to send, destination-major and in
//        token order, one per (token, destination); with each, the token's k local expert ids
//        at that destination (-1 for slots elsewhere); alltoallv of the rows, then of the ids.
//     3. receiver: permute of the arrived rows by their ids = recv_x, expert-major and inside an
//        expert by (source rank, source token), as the ipc layout; an index pass over "this slot
//        arrived" keys numbers the arrived slots in (source, token, slot) order: where each
//        expert row goes in the combine's send buffer.
//   combine: every kept expert row gathered into that order, alltoallv back to its source, and
//     unpermute there (the k rows of a token summed in float32 with the weights, slot order).
//   The two extra index passes are the plan a combine needs, so they count in the dispatch time
//   (the ipc dispatch writes its combine map in its send kernel). Every wait is NcclComm::wait,
//   bounded by --ep-timeout-s.
//
// Bytes (issue 7, "Target"), the same for both backends:
//   dispatch: the payload bytes the ranks send: one row (hidden * element size) per (token,
//             destination rank) pair, the token's own rank included, summed over ranks.
//   combine:  one row per kept (token, slot) pair, summed over ranks (every slot is kept here:
//             no capacity, no unrouted slots).
//   (The nccl rows also move counts and k int32 expert ids per row sent: not counted.)
// algbw = bytes / time. busbw = 2 * bytes / time: the ranks share one GPU's HBM, so each counted
// byte is read once and written once, the count of the 2.95 TB/s device-to-device copy ceiling
// (../shared/GPU.md) it is compared with. floor = 2 * bytes / 2950 GB/s, %floor = floor / time
// (= busbw / ceiling). With one GPU per rank the bytes cross links instead and this floor is
// only a reference.
// Floors: 8 ranks, T=4096, H=7168, k=8 of E=256, bf16 (5.29 destination ranks per token
// expected): dispatch 2.49 GB -> 1686 us, combine 3.76 GB -> 2548 us. T=128: dispatch 78 MB ->
// 53 us, combine 117 MB -> 80 us. 2 ranks, T=128 (1.99 per token): dispatch 7.3 MB -> 5.0 us,
// combine 29 MB -> 19.9 us.
// NOTE: the counted bytes are the issue's, not all the traffic of this protocol on one GPU.
// Dispatch stages one row per pair (read + write) and then expands it on the receiver (at least
// one read per pair, one write per slot): 3 * pairs + slots rows for a floor of 2 * pairs, so
// at most 44% of the floor at 8 ranks (5.3 pairs and 8 slots per token), 29% at 2 ranks.
// Combine sends each slot's row back (read + write) and the weighted sum reads k rows and writes
// one per token: 3 * slots + tokens rows for a floor of 2 * slots, at most 64%.
//
// Check (-c 1, the default; after the timed iterations, one more run with the outputs poisoned
// first): every rank rebuilds every rank's routing and data from the seeds and compares, bit for
// bit, its recv_x with the expected exact layout (rows grouped by local expert, inside an expert
// by (source rank, source token), pad_to 1, no capacity) or the masked one (expert el's rows
// from el * max_rows), the map back from each row to its (source rank, token, slot) (ipc: the
// back_map; nccl: derived from the receiver's row map), tokens_per_expert and the row (and, for
// nccl, arrived token) totals; and combine's out [T, H] with a host float32 reference of
// sum_j w[t, j] * x[t] (products and sums rounded in slot order, as the kernel does), within
// rtol 2^-7 for bf16 (2^-10 fp16, 1e-6 fp32) + atol 1e-5. '#wrong' = wrong rows (plus wrong
// counts) summed over ranks, dispatch + combine.
//
// Exit status: 0 all good (or no GPU: "skipped"), 1 wrong results, 2 an error (CUDA error,
// NCCL error or timeout, EpError, a crashed or killed rank, a timeout).
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "comm/ep_ops.cuh"
#include "comm/nccl_comm.cuh"
#include "comm/symmetric.cuh"
#include "common.cuh"
#include "kernels/ep.cuh"
#include "kernels/permute.cuh"

namespace {

namespace kernels = moe_ext::kernels;
namespace comm = moe_ext::comm;
using moe_bench::DeviceBuffer;
using moe_bench::DType;

constexpr int kMaxRanks = 64;  // forked on one node; a 64-bit mask of destinations per token
constexpr double kAtol = 1e-5;

enum ExitCode : int { kExitOk = 0, kExitWrong = 1, kExitError = 2, kExitEpError = 3, kExitAborted = 4 };

struct Case {
  int64_t tokens, hidden, k, experts;
};

struct Config {
  moe_bench::Options opts;
  std::string name, what;
  int ranks = 2;
  bool one_gpu_per_rank = false;
  bool masked = false;
  bool nccl = true;  // also the nccl rows, where they can run
  double timeout_s = 60, ep_timeout_s = 10;
  int64_t blocks = 0;
  int crash_rank = -1;
  std::vector<Case> cases;
};

// Why the nccl rows do not run ("" when they do); the same answer on every rank.
std::string nccl_skip_reason(const Config& cfg) {
  if (!cfg.nccl) return "--nccl 0";
  if (!cfg.one_gpu_per_rank) return "needs one GPU per rank";
  if (cfg.masked) return "--masked: the nccl backend has no no-sync layout";
  return "";
}

// ---- the shared page -------------------------------------------------------------------------

// One rank's numbers of one case and backend, read by rank 0.
struct RankReport {
  double dispatch_us, dispatch_min_us, dispatch_sd_us;
  double combine_us, combine_min_us, combine_sd_us;
  int64_t wrong_dispatch, wrong_combine;  // -1: not checked
};

struct Shared {
  std::atomic<int> arrived{0};
  std::atomic<int> generation{0};
  std::atomic<int> abort{0};            // set by the parent when a rank failed
  std::atomic<long long> progress{0};   // completed barriers: the parent's sign of life
  int device_count = 0;                 // the probe's answer
  char probe_message[200] = {};
  int skip_case = 0;                    // rank 0's decision for the current case
  char skip_reason[200] = {};
  comm::IpcHandle handles[kMaxRanks];
  comm::NcclUniqueId nccl_id{};         // rank 0's, for every rank's NcclComm::init
  RankReport reports[kMaxRanks];
};
static_assert(std::atomic<int>::is_always_lock_free && std::atomic<long long>::is_always_lock_free,
              "the shared barrier needs address-free (lock-free) atomics");

struct Aborted {};  // another rank failed: leave quietly

struct EpFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Sense-reversing barrier over the shared page. Spins (ranks must leave it together: the
// skew is part of the time of whoever left first), then yields; at once when the ranks
// outnumber the cores, where spinning would only delay the ranks still on their way.
// NOTE: the acq_rel arrival and the release of the new generation also publish everything a
// rank wrote to the page before the barrier (handles, unique id, reports) to every rank after it.
void barrier(Shared* sh, int world) {
  static const uint64_t spins_before_yield = world < sysconf(_SC_NPROCESSORS_ONLN) ? 1u << 14 : 0;
  const int gen = sh->generation.load(std::memory_order_acquire);
  if (sh->arrived.fetch_add(1, std::memory_order_acq_rel) == world - 1) {
    sh->arrived.store(0, std::memory_order_relaxed);
    sh->progress.fetch_add(1, std::memory_order_relaxed);
    sh->generation.store(gen + 1, std::memory_order_release);
    return;
  }
  for (uint64_t spin = 0;; ++spin) {
    if (sh->generation.load(std::memory_order_acquire) != gen) return;
    if (sh->abort.load(std::memory_order_relaxed)) throw Aborted{};
    if (spin >= spins_before_yield) sched_yield();
    else cpu_relax();
  }
}

double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

// ---- deterministic inputs -------------------------------------------------------------------

enum SeedKind : uint64_t { kSeedRouting = 0, kSeedX = 1, kSeedWeights = 2 };

uint64_t seed_of(int case_id, int rank, SeedKind kind) {
  return 0x5EEDull + static_cast<uint64_t>(case_id) * 1000003ull + static_cast<uint64_t>(rank) * 1009ull + kind;
}

// k distinct experts per token, uniform over [0, E): rejection over a counter hash, then the
// smallest unused expert if 64 draws were not enough (k close to E).
std::vector<int32_t> make_routing(int64_t T, int64_t k, int64_t E, uint64_t seed) {
  std::vector<int32_t> idx(static_cast<size_t>(T * k));
  for (int64_t t = 0; t < T; ++t) {
    int32_t* row = idx.data() + t * k;
    for (int64_t j = 0; j < k; ++j) {
      auto used = [&](int32_t e) {
        for (int64_t i = 0; i < j; ++i)
          if (row[i] == e) return true;
        return false;
      };
      int32_t e = -1;
      for (uint64_t draw = 0; draw < 64 && e < 0; ++draw) {
        const float u = moe_bench::uniform_at(seed, static_cast<uint64_t>(t * k + j) * 64 + draw, 0.f, 1.f);
        const int32_t c = std::min<int32_t>(static_cast<int32_t>(u * E), static_cast<int32_t>(E - 1));
        if (!used(c)) e = c;
      }
      for (int32_t c = 0; e < 0 && c < E; ++c)
        if (!used(c)) e = c;
      row[j] = e;
    }
  }
  return idx;
}

std::vector<float> make_weights(int64_t T, int64_t k, uint64_t seed) {
  std::vector<float> w(static_cast<size_t>(T * k));
  for (size_t i = 0; i < w.size(); ++i) w[i] = moe_bench::uniform_at(seed, i, 0.f, 1.f);
  return w;
}

// The payload element type, on the host: x rows are generated here (never on the device) so that
// every rank regenerates any rank's rows bit for bit.
struct ElemOps {
  size_t size;
  void (*make_row)(uint64_t seed, int64_t t, int64_t hidden, void* out);
  double (*load)(const void* p, int64_t i);
  double (*round)(float v);  // v rounded to the element type
  kernels::PermuteFloat permute_float;
  double rtol;
  int64_t code;  // EpParams::dtype_code
};

template <class T>
void make_row_t(uint64_t seed, int64_t t, int64_t hidden, void* out) {
  T* o = static_cast<T*>(out);
  for (int64_t h = 0; h < hidden; ++h)
    o[h] = moe_bench::from_float<T>(moe_bench::uniform_at(seed, static_cast<uint64_t>(t * hidden + h), -1.f, 1.f));
}
template <class T>
double load_t(const void* p, int64_t i) { return moe_bench::to_double(static_cast<const T*>(p)[i]); }
template <class T>
double round_t(float v) { return moe_bench::to_double(moe_bench::from_float<T>(v)); }

ElemOps elem_ops(DType t) {
  switch (t) {
    case DType::kBF16:
      return {2, make_row_t<__nv_bfloat16>, load_t<__nv_bfloat16>, round_t<__nv_bfloat16>,
              kernels::PermuteFloat::kBFloat16, 1.0 / 128, 1};
    case DType::kF16:
      return {2, make_row_t<__half>, load_t<__half>, round_t<__half>, kernels::PermuteFloat::kFloat16, 1.0 / 1024, 2};
    default:
      return {4, make_row_t<float>, load_t<float>, round_t<float>, kernels::PermuteFloat::kFloat32, 1e-6, 3};
  }
}

// ---- what every rank knows of a case --------------------------------------------------------

// Everyone's routing, and what it implies: the bytes, and this rank's expected receive layout.
struct Plan {
  std::vector<std::vector<int32_t>> idx;  // [rank][T * k]
  int64_t dest_pairs = 0;                 // (token, destination rank) pairs, all ranks
  int64_t kept_slots = 0;                 // (token, slot) pairs, all ranks
  int64_t most_recv_rows = 0;             // the largest exact receive layout of any rank
  // This rank's receive layout: per local expert, the (source rank, token, slot) of each row.
  struct Src {
    int32_t rank, slot;
    int64_t token;
  };
  std::vector<std::vector<Src>> rows;  // [El]
  int64_t recv_rows = 0;
  // The tokens that come to this rank, each once, in (source rank, source token) order: the
  // nccl receiver's staging order.
  std::vector<std::pair<int32_t, int64_t>> arrivals;
};

Plan make_plan(const Case& c, int world, int me, int case_id) {
  Plan p;
  const int64_t T = c.tokens, k = c.k, E = c.experts, El = E / world;
  p.idx.resize(world);
  for (int s = 0; s < world; ++s) p.idx[s] = make_routing(T, k, E, seed_of(case_id, s, kSeedRouting));
  p.rows.assign(static_cast<size_t>(El), {});
  std::vector<int64_t> per_rank(world, 0);
  for (int s = 0; s < world; ++s) {
    for (int64_t t = 0; t < T; ++t) {
      uint64_t dests = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = p.idx[s][t * k + j];
        if (e < 0) continue;
        const int64_t owner = e / El;
        dests |= 1ull << owner;
        ++per_rank[owner];
        ++p.kept_slots;
        if (owner == me) p.rows[e - me * El].push_back({s, static_cast<int32_t>(j), t});
      }
      p.dest_pairs += __builtin_popcountll(dests);
      if (dests >> me & 1) p.arrivals.push_back({s, t});
    }
  }
  for (int r = 0; r < world; ++r) p.most_recv_rows = std::max(p.most_recv_rows, per_rank[r]);
  p.recv_rows = per_rank[me];
  return p;
}

// back_map's encoding of a row's origin (kernels/ep.cu): source rank << 40 | slot (t * k + j).
inline int64_t back_code(int64_t rank, int64_t token, int64_t k, int64_t slot) {
  return (rank << 40) | (token * k + slot);
}

// ---- the nccl rows' kernels (one step each; the index passes are permute's) ------------------

constexpr int kThreads = 256;
constexpr int kWarp = 32;

inline unsigned grid_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, 4096)));
}

// keys[t, j] = the rank that owns slot j's expert, -1 if not routed. An index pass over them
// orders this rank's slots by (owner, token, slot): the order their rows come back in.
__global__ void owner_keys_kernel(const int32_t* __restrict__ idx, int64_t n, int64_t num_experts,
                                  int64_t local_experts, int64_t* __restrict__ keys) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = idx[i];
    keys[i] = (e >= 0 && e < num_experts) ? e / local_experts : -1;
  }
}

// counts[d] = (tokens, slots) this rank sends to rank d, as the int64 pairs of the count exchange.
__global__ void pair_counts_kernel(const int32_t* __restrict__ tokens, const int32_t* __restrict__ slots, int world,
                                   int64_t* __restrict__ counts) {
  for (int d = threadIdx.x; d < world; d += blockDim.x) {
    counts[2 * d] = tokens[d];
    counts[2 * d + 1] = slots[d];
  }
}

// For each token's first slot on a destination d (dest_keys[t, j] == d): at the token's row among
// the rows sent, its k expert ids local to d, -1 for the slots whose experts live elsewhere.
__global__ void pack_ids_kernel(const int32_t* __restrict__ idx, const int64_t* __restrict__ dest_keys,
                                const int64_t* __restrict__ dest_rows, int64_t num_tokens, int64_t k,
                                int64_t num_experts, int64_t local_experts, int32_t* __restrict__ ids) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_tokens * k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = dest_keys[i], r = dest_rows[i];
    if (d < 0 || r < 0) continue;
    const int32_t* slots = idx + (i / k) * k;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = slots[j];
      const bool there = e >= 0 && e < num_experts && e / local_experts == d;
      ids[r * k + j] = there ? static_cast<int32_t>(e - d * local_experts) : -1;
    }
  }
}

// keys = 0 for a slot that arrived with a local expert, -1 otherwise. An index pass over them
// numbers the arrived slots in (source rank, source token, slot) order: each one's row in the
// combine's send buffer, which is the order its source expects them back in.
__global__ void arrived_keys_kernel(const int32_t* __restrict__ ids, int64_t n, int32_t* __restrict__ keys) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    keys[i] = ids[i] >= 0 ? 0 : -1;
}

// back[pos[i]] = y[rows[i]] for every arrived slot i (one warp per slot, 16-byte vectors: rows are
// a multiple of 16 bytes and the buffers come from cudaMalloc).
__global__ void gather_rows_kernel(const char* __restrict__ y, const int64_t* __restrict__ rows,
                                   const int64_t* __restrict__ pos, int64_t n, int64_t row_bytes,
                                   char* __restrict__ back) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) + threadIdx.x / kWarp; i < n; i += warps) {
    const int64_t r = rows[i], d = pos[i];
    if (r < 0 || d < 0) continue;
    const uint4* src = reinterpret_cast<const uint4*>(y + r * row_bytes);
    uint4* dst = reinterpret_cast<uint4*>(back + d * row_bytes);
    for (int64_t v = lane; v < row_bytes / 16; v += kWarp) dst[v] = src[v];
  }
}

// Grows b to at least n elements (contents not kept). The routing of a case is fixed, so the
// sizing run grows every buffer once and the timed runs never allocate.
template <class T>
void ensure(DeviceBuffer<T>& b, int64_t n) {
  if (static_cast<size_t>(n) > b.size()) b = DeviceBuffer<T>(static_cast<size_t>(n));
}

// The first n elements of b on the host.
template <class T>
std::vector<T> head(const DeviceBuffer<T>& b, int64_t n) {
  std::vector<T> h(static_cast<size_t>(std::min<int64_t>(n, static_cast<int64_t>(b.size()))));
  if (!h.empty()) MOE_CUDA_CHECK(cudaMemcpy(h.data(), b.get(), h.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// ---- one rank ---------------------------------------------------------------------------------

std::string ep_error_text(const kernels::EpError& e) {
  static const char* phases[] = {"count exchange", "ready barrier", "data", "back"};
  const char* phase = e.phase >= 0 && e.phase < kernels::kEpNumPhases ? phases[e.phase] : "?";
  char buf[320];
  switch (e.code) {
    case kernels::kEpTimeout:
      std::snprintf(buf, sizeof(buf), "EpError %d (timeout): rank %d never arrived (phase %d, %s; operation %lld)",
                    e.code, e.rank, e.phase, phase, static_cast<long long>(e.seq));
      break;
    case kernels::kEpMismatch:
      std::snprintf(buf, sizeof(buf),
                    "EpError %d (mismatch): rank %d disagrees on header field %d: %lld there, %lld here "
                    "(operation %lld)",
                    e.code, e.rank, e.field, static_cast<long long>(e.value), static_cast<long long>(e.mine),
                    static_cast<long long>(e.seq));
      break;
    case kernels::kEpTooMany:
      std::snprintf(buf, sizeof(buf),
                    "EpError %d (too many tokens): rank %d; the most tokens of any rank %lld, the buffer holds %lld",
                    e.code, e.rank, static_cast<long long>(e.value), static_cast<long long>(e.mine));
      break;
    default:
      std::snprintf(buf, sizeof(buf), "EpError %d: rank %d, field %d, phase %d, value %lld, mine %lld, operation %lld",
                    e.code, e.rank, e.field, e.phase, static_cast<long long>(e.value),
                    static_cast<long long>(e.mine), static_cast<long long>(e.seq));
  }
  return buf;
}

struct Row {  // one table row, rank 0's
  std::string backend;
  Case c;
  double dispatch_us, combine_us, dispatch_bytes, combine_bytes, dests_per_token;
  int64_t wrong;  // -1: not checked
  std::vector<double> dispatch_per_rank, combine_per_rank;
};

// This rank's inputs of one case, shared by both backends.
struct Inputs {
  const std::vector<int32_t>* idx_h;
  std::vector<float> w_h;
  std::vector<char> x_h;
  DeviceBuffer<int32_t> idx;
  DeviceBuffer<float> w;
  DeviceBuffer<char> x, out;
};

class RankRunner {
 public:
  RankRunner(const Config& cfg, Shared* sh, int rank)
      : cfg_(cfg), o_(cfg.opts), sh_(sh), rank_(rank), world_(cfg.ranks), ops_(elem_ops(cfg.opts.dtype)) {}

  int run() {
    device_ = cfg_.one_gpu_per_rank ? rank_ : static_cast<int>(o_.device);
    MOE_CUDA_CHECK(cudaSetDevice(device_));
    MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop_, device_));
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    for (cudaEvent_t& e : ev_) MOE_CUDA_CHECK(cudaEventCreate(&e));
    MOE_CUDA_CHECK(cudaEventCreateWithFlags(&counted_, cudaEventDisableTiming));
    if (o_.flush_l2) {
      flush_bytes_ = 2 * static_cast<size_t>(std::max(prop_.l2CacheSize, 1 << 20));
      flush_ = DeviceBuffer<char>(flush_bytes_);
    }

    // The buffer holds the largest case.
    kernels::EpSizes sizes;
    sizes.world = world_;
    for (const Case& c : cfg_.cases) {
      sizes.max_tokens = std::max(sizes.max_tokens, c.tokens);
      sizes.row_bytes = std::max<int64_t>(sizes.row_bytes, c.hidden * static_cast<int64_t>(ops_.size));
      sizes.max_k = std::max(sizes.max_k, c.k);
      sizes.max_experts = std::max(sizes.max_experts, c.experts);
    }
    sizes.row_bytes = (sizes.row_bytes + 15) / 16 * 16;
    comm::SymmetricBuffer buf(device_, world_, rank_, sizes);
    buf_ = &buf;
    sh_->handles[rank_] = buf.handle();
    barrier(sh_, world_);
    buf.open(std::vector<comm::IpcHandle>(sh_->handles, sh_->handles + world_));
    barrier(sh_, world_);
    if (nccl_skip_reason(cfg_).empty()) join_nccl();
    if (rank_ == 0) print_header(buf);

    int status = kExitOk;
    for (size_t i = 0; i < cfg_.cases.size(); ++i) {
      const int s = run_case(cfg_.cases[i], static_cast<int>(i));
      status = std::max(status, s);
    }
    // NOTE: every rank, before anything is freed: finalize completes the peers' operations too.
    if (nccl_) nccl_->destroy();
    // NOTE: CUDA requires every importer to unmap before the exporter frees: unmap, barrier, free.
    buf.close_peers();
    barrier(sh_, world_);
    if (rank_ == 0) status = std::max(status, finish());
    buf.close();
    buf_ = nullptr;
    return status;
  }

  ~RankRunner() {
    nccl_.reset();  // aborts a communicator that was not destroyed (a failure), before its stream goes
    if (host_counts_) cudaFreeHost(host_counts_);
    for (cudaEvent_t e : ev_)
      if (e) cudaEventDestroy(e);
    if (counted_) cudaEventDestroy(counted_);
    if (stream_) cudaStreamDestroy(stream_);
  }

 private:
  void check_ep(const char* where) const {
    const kernels::EpError e = buf_->error();
    if (e.code != kernels::kEpOk) throw EpFailure(std::string(where) + ": " + ep_error_text(e));
  }

  // Rank 0's unique id travels through the page; init() returns once every rank has joined, or
  // throws (a rank that never joins).
  void join_nccl() {
    // NOTE: the library loaded at run time may be older than the headers: nonblocking
    // communicators and ncclCommFinalize (comm::NcclComm) came with NCCL 2.14.
    const int version = comm::NcclComm::version();
    if (version < 21400)
      throw std::runtime_error("the nccl rows need NCCL >= 2.14 (nonblocking communicators); the loaded "
                               "libnccl reports version code " + std::to_string(version));
    if (rank_ == 0) sh_->nccl_id = comm::NcclComm::unique_id();
    barrier(sh_, world_);
    // Joining can take seconds on many GPUs: bounded by the supervisor's --timeout-s; every later
    // wait by --ep-timeout-s, like the EP kernels' (the supervisor's grace after a failure).
    nccl_ = std::make_unique<comm::NcclComm>(device_, world_, rank_, cfg_.timeout_s);
    nccl_->init(sh_->nccl_id);
    nccl_->set_timeout(cfg_.ep_timeout_s);
    MOE_CUDA_CHECK(cudaMallocHost(&host_counts_, sizeof(int64_t) * 4 * world_));
    for (std::vector<int64_t>& v : a2a_) v.assign(world_, 0);
    barrier(sh_, world_);
  }

  void print_header(const comm::SymmetricBuffer& buf) const {
    std::printf("# %s: %s\n# command: %s\n", cfg_.name.c_str(),
                "dispatch + combine: ipc backend (csrc/comm/ep_ops.cuh), nccl protocol (comm::NcclComm)",
                o_.command_line.c_str());
    if (cfg_.one_gpu_per_rank)
      std::printf("# ranks: %d processes, one GPU each (devices 0..%d; rank 0's: %s, %d SMs)\n", world_, world_ - 1,
                  prop_.name, prop_.multiProcessorCount);
    else
      std::printf("# ranks: %d processes sharing device %d: %s, sm_%d%d, %d SMs, L2 %d MB, %.0f GB\n", world_, device_,
                  prop_.name, prop_.major, prop_.minor, prop_.multiProcessorCount, prop_.l2CacheSize >> 20,
                  prop_.totalGlobalMem / 1e9);
    const char* pipe = std::getenv("CUDA_MPS_PIPE_DIRECTORY");
    const std::string control = std::string(pipe ? pipe : "/tmp/nvidia-mps") + "/control";
    const bool mps = access(control.c_str(), F_OK) == 0;
    if (!cfg_.one_gpu_per_rank && world_ > 1)
      std::printf("# MPS: %s %s%s\n", control.c_str(), mps ? "found" : "not found",
                  mps ? "" : " -- without MPS the ranks' kernels take turns in time slices: times are not meaningful");
    const kernels::EpSizes& s = buf.layout().sizes;
    std::printf("# ipc: symmetric buffer %.1f MB per rank (max tokens %lld, row %lld B, k %lld, E %lld); layout %s; "
                "data kernels: %s blocks; EP kernel timeout %g s\n",
                buf.bytes() / 1e6, static_cast<long long>(s.max_tokens), static_cast<long long>(s.row_bytes),
                static_cast<long long>(s.max_k), static_cast<long long>(s.max_experts),
                cfg_.masked ? "masked (max_rows = ranks * T)" : "exact",
                cfg_.blocks > 0 ? std::to_string(cfg_.blocks).c_str() : "one per SM", cfg_.ep_timeout_s);
    if (nccl_) {
      const int v = comm::NcclComm::version();
      std::printf("# nccl: NCCL %d.%d.%d, one communicator of %d ranks; exact layout; count exchange of (tokens, "
                  "slots) per peer + one host read, then rows and expert ids by alltoallv; waits bounded by %g s\n",
                  v / 10000, v / 100 % 100, v % 100, world_, cfg_.ep_timeout_s);
    } else {
      std::printf("# nccl: skipped (%s)\n", nccl_skip_reason(cfg_).c_str());
    }
    std::printf("# dtype %s, pad_to 1, no capacity; 1 sizing run + %lld warm-up + %lld timed iterations per case "
                "and backend, L2 %s, check %s\n",
                moe_bench::dtype_name(o_.dtype), static_cast<long long>(o_.warmup), static_cast<long long>(o_.iters),
                o_.flush_l2 ? "flushed before each iteration" : "warm", o_.check ? "on" : "off");
    std::printf("# time: max over ranks of the rank's median, CUDA events on its stream (exact layouts: the host\n"
                "#   read of the counts included); ranks start each stage together (shared-memory barrier)\n");
    std::printf("# bytes (both backends): dispatch = one row per (token, destination rank) pair, own rank included;\n"
                "#   combine = one row per kept (token, slot); both summed over ranks. algbw = bytes / time; busbw =\n"
                "#   2 * bytes / time (read + written in the shared HBM); floor = 2 * bytes / %.0f GB/s; %%floor =\n"
                "#   floor / time\n",
                o_.ceil_bw_gbps);
    std::printf("#\n#%7s %5s %6s %6s %3s %4s %7s | %9s %8s %8s %8s %6s | %9s %8s %8s %8s %6s | %6s\n", "backend",
                "ranks", "tokens", "hidden", "k", "E", "dst/tok", "dispatch", "algbw", "busbw", "floor", "%floor",
                "combine", "algbw", "busbw", "floor", "%floor", "#wrong");
    std::printf("#%7s %5s %6s %6s %3s %4s %7s | %9s %8s %8s %8s %6s | %9s %8s %8s %8s %6s | %6s\n", "", "", "/rank",
                "", "", "", "", "(us)", "(GB/s)", "(GB/s)", "(us)", "(%)", "(us)", "(GB/s)", "(GB/s)", "(us)", "(%)",
                "");
    std::fflush(stdout);
  }

  // Whether the case can run: checked alike on every rank (no communication needed).
  std::string invalid(const Case& c) const {
    if (c.tokens < 0 || c.hidden < 1 || c.k < 1 || c.experts < 1) return "sizes must be positive";
    if (c.experts % world_ != 0) return "E must be a multiple of the number of ranks";
    if (c.k > c.experts || c.k > 32) return "k must be <= E and <= 32";
    if (c.hidden * static_cast<int64_t>(ops_.size) % 16 != 0) return "a row must be a multiple of 16 bytes";
    return "";
  }

  // Device bytes one rank's buffers take for a case (the large ones), per backend: the backends
  // run one after the other, each freeing its buffers before the next.
  double bytes_needed(const Case& c, const Plan& plan, bool nccl) const {
    const double T = static_cast<double>(c.tokens), k = static_cast<double>(c.k);
    const double rb = static_cast<double>(c.hidden) * ops_.size, R = static_cast<double>(plan.most_recv_rows);
    if (!nccl) {
      const double recv_cap = cfg_.masked ? static_cast<double>(c.experts) * T : R;  // El * ranks * T
      return T * rb * 2 + recv_cap * (rb + 8) + T * k * 32 +
             static_cast<double>(comm::ep_dispatch_workspace_bytes(c.tokens, c.k, c.experts, world_));
    }
    // x, out; rows sent (<= T * min(k, ranks)); arrived tokens (<= R), recv_x, rows sent back
    // (R each); rows received back (T * k); the index arrays.
    return rb * (2 * T + T * std::min<double>(k, world_) + 3 * R + T * k) + T * k * 32 + R * k * 24;
  }

  int run_case(const Case& c, int case_id) {
    const int64_t T = c.tokens, H = c.hidden, k = c.k, E = c.experts;
    const int64_t rb = H * static_cast<int64_t>(ops_.size);
    const std::string bad = invalid(c);
    if (!bad.empty()) {
      if (rank_ == 0)
        std::printf("# skipped T=%lld H=%lld k=%lld E=%lld: %s\n", static_cast<long long>(T), static_cast<long long>(H),
                    static_cast<long long>(k), static_cast<long long>(E), bad.c_str());
      return kExitOk;
    }
    const Plan plan = make_plan(c, world_, rank_, case_id);

    // Room on the GPU (every rank's buffers of the previous case are freed at this barrier).
    barrier(sh_, world_);
    if (rank_ == 0) {
      const double need =
          std::max(bytes_needed(c, plan, false), nccl_ ? bytes_needed(c, plan, true) : 0.0) + 2.0 * T * k * 8;
      const int sharing = cfg_.one_gpu_per_rank ? 1 : world_;
      size_t free_b = 0, total_b = 0;
      MOE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
      sh_->skip_case = need * sharing > 0.92 * free_b;
      if (sh_->skip_case)
        std::snprintf(sh_->skip_reason, sizeof(sh_->skip_reason), "needs %.1f GB per rank x %d on one GPU, %.1f GB free",
                      need / 1e9, sharing, free_b / 1e9);
    }
    barrier(sh_, world_);
    if (sh_->skip_case) {
      if (rank_ == 0)
        std::printf("# skipped T=%lld H=%lld k=%lld E=%lld %s: %s\n", static_cast<long long>(T),
                    static_cast<long long>(H), static_cast<long long>(k), static_cast<long long>(E),
                    cfg_.masked ? "masked" : "exact", sh_->skip_reason);
      return kExitOk;
    }

    // This rank's inputs.
    Inputs in;
    in.idx_h = &plan.idx[rank_];
    in.w_h = make_weights(T, k, seed_of(case_id, rank_, kSeedWeights));
    in.x_h.resize(static_cast<size_t>(T * rb));
    const uint64_t seed_x = seed_of(case_id, rank_, kSeedX);
    for (int64_t t = 0; t < T; ++t) ops_.make_row(seed_x, t, H, in.x_h.data() + t * rb);
    in.idx = DeviceBuffer<int32_t>(in.idx_h->size());
    in.w = DeviceBuffer<float>(in.w_h.size());
    in.x = DeviceBuffer<char>(in.x_h.size());
    in.out = DeviceBuffer<char>(in.x_h.size());
    in.idx.from_host(*in.idx_h);
    in.w.from_host(in.w_h);
    in.x.from_host(in.x_h);
    // NOTE: a cudaMemcpy from pageable memory may return before its DMA has landed, and stream_
    // (non-blocking) does not wait for the legacy stream it ran on: the first dispatch could
    // read idx or x half-written.
    MOE_CUDA_CHECK(cudaDeviceSynchronize());

    int status = publish("ipc", c, plan, measure_ipc(c, plan, case_id, in));
    if (nccl_) status = std::max(status, publish("nccl", c, plan, measure_nccl(c, plan, case_id, in)));
    return status;
  }

  // Hands this rank's numbers to rank 0, which prints the row; this rank's exit status for them.
  int publish(const char* backend, const Case& c, const Plan& plan, const RankReport& rep) {
    sh_->reports[rank_] = rep;
    barrier(sh_, world_);
    if (rank_ == 0) report(backend, c, plan);
    barrier(sh_, world_);  // the reports are read before the next backend or case overwrites them
    return (rep.wrong_dispatch > 0 || rep.wrong_combine > 0) ? kExitWrong : kExitOk;
  }

  // One dispatch + combine: the ranks start each stage together (barrier), the stage is timed
  // with a pair of CUDA events on this rank's stream, then `*_done` waits for it (bounded: an
  // EpError or the NCCL timeout ends a wait for a rank that is gone). times: the two stage times
  // in us, or null.
  template <class Dispatch, class DispatchDone, class Combine, class CombineDone>
  void iteration(double* times, Dispatch&& dispatch, DispatchDone&& dispatch_done, Combine&& combine,
                 CombineDone&& combine_done) {
    if (flush_.get()) MOE_CUDA_CHECK(cudaMemsetAsync(flush_.get(), 0, flush_bytes_, stream_));
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    barrier(sh_, world_);
    if (rank_ == cfg_.crash_rank) {
      std::fprintf(stderr, "[rank %d] --crash-rank: aborting at the start of a dispatch\n", rank_);
      std::fflush(stderr);
      std::abort();
    }
    MOE_CUDA_CHECK(cudaEventRecord(ev_[0], stream_));
    dispatch();
    MOE_CUDA_CHECK(cudaEventRecord(ev_[1], stream_));
    dispatch_done();
    barrier(sh_, world_);
    MOE_CUDA_CHECK(cudaEventRecord(ev_[2], stream_));
    combine();
    MOE_CUDA_CHECK(cudaEventRecord(ev_[3], stream_));
    combine_done();
    if (times) {
      float ms = 0;
      MOE_CUDA_CHECK(cudaEventElapsedTime(&ms, ev_[0], ev_[1]));
      times[0] = 1e3 * ms;
      MOE_CUDA_CHECK(cudaEventElapsedTime(&ms, ev_[2], ev_[3]));
      times[1] = 1e3 * ms;
    }
  }

  // The sizing run (grows the receive buffers of the exact layout), -w warm-up runs, -n timed runs.
  template <class One>
  void time_iterations(One&& one, std::vector<double>* d_us, std::vector<double>* c_us) {
    one(nullptr);
    for (int64_t i = 0; i < o_.warmup; ++i) one(nullptr);
    d_us->assign(o_.iters, 0);
    c_us->assign(o_.iters, 0);
    for (int64_t i = 0; i < o_.iters; ++i) {
      double t2[2];
      one(t2);
      (*d_us)[i] = t2[0], (*c_us)[i] = t2[1];
    }
  }

  RankReport make_report(const std::vector<double>& d_us, const std::vector<double>& c_us, int64_t wrong_d,
                         int64_t wrong_c) const {
    const moe_bench::Timing td = moe_bench::summarize(d_us), tc = moe_bench::summarize(c_us);
    return {td.median_us, td.min_us, td.stddev_us, tc.median_us, tc.min_us, tc.stddev_us, wrong_d, wrong_c};
  }

  // Before the check run: nothing stale from the timed iterations can pass.
  template <class T>
  void poison(DeviceBuffer<T>& b) {
    if (b.size()) MOE_CUDA_CHECK(cudaMemsetAsync(b.get(), 0xff, b.size() * sizeof(T), stream_));
  }

  // ---- the ipc backend ----

  RankReport measure_ipc(const Case& c, const Plan& plan, int case_id, Inputs& in) {
    const int64_t T = c.tokens, H = c.hidden, k = c.k, E = c.experts, El = E / world_;
    const int64_t rb = H * static_cast<int64_t>(ops_.size);
    const int64_t max_rows = cfg_.masked ? world_ * T : -1;
    DeviceBuffer<int32_t> tpe(static_cast<size_t>(El));
    DeviceBuffer<char> ws(comm::ep_dispatch_workspace_bytes(T, k, E, world_));
    DeviceBuffer<int64_t> scratch(static_cast<size_t>(kernels::ep_scratch_len(world_, E)));
    DeviceBuffer<int64_t> slot_rows(static_cast<size_t>(T * k)), stage_rows(static_cast<size_t>(T * k));
    DeviceBuffer<int64_t> combine_map(static_cast<size_t>(T * k));
    DeviceBuffer<char> recv_x;
    DeviceBuffer<int64_t> back_map;

    kernels::EpParams p = buf_->params();
    p.timeout_ns = static_cast<int64_t>(cfg_.ep_timeout_s * 1e9);
    p.num_blocks = static_cast<int>(cfg_.blocks);
    p.num_tokens = T;
    p.k = k;
    p.num_experts = E;
    p.pad_to = 1;
    p.capacity = -1;
    p.max_rows = max_rows;
    p.row_bytes = rb;
    p.dtype_code = ops_.code;
    p.idx = in.idx.get();
    p.idx_is_int64 = false;
    p.x = in.x.get();
    p.x_row_stride = rb;
    p.scratch = scratch.get();
    p.slot_rows = slot_rows.get();
    p.stage_rows = stage_rows.get();
    p.slot_map = combine_map.get();
    p.tokens_per_expert = tpe.get();
    if (cfg_.masked) {
      const int64_t cap = El * max_rows;
      recv_x = DeviceBuffer<char>(static_cast<size_t>(cap * rb));
      back_map = DeviceBuffer<int64_t>(static_cast<size_t>(cap));
      p.recv_x = recv_x.get(), p.recv_rows = cap, p.back_map = back_map.get();
    }

    auto dispatch = [&] {
      comm::ep_dispatch_begin(p, ws.get(), cfg_.masked ? nullptr : counted_, stream_);
      if (!cfg_.masked) {
        MOE_CUDA_CHECK(cudaEventSynchronize(counted_));
        check_ep("dispatch (count exchange)");
        const int64_t rows = buf_->recv_total();
        ensure(recv_x, rows * rb);
        ensure(back_map, rows);
        p.recv_x = recv_x.get();
        p.recv_rows = rows;
        p.back_map = back_map.get();
      }
      comm::ep_dispatch_finish(p, stream_);
    };
    auto dispatch_done = [&] {
      MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      check_ep("dispatch");
    };
    auto combine = [&] {
      p.y = p.recv_x;
      p.y_row_stride = rb;
      comm::ep_combine(p, ops_.permute_float, combine_map.get(), in.w.get(), in.out.get(), stream_);
    };
    auto combine_done = [&] {
      MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      check_ep("combine");
    };
    auto one = [&](double* times) { iteration(times, dispatch, dispatch_done, combine, combine_done); };

    std::vector<double> d_us, c_us;
    time_iterations(one, &d_us, &c_us);
    int64_t wrong_d = -1, wrong_c = -1;
    if (o_.check) {
      poison(recv_x), poison(back_map), poison(tpe), poison(in.out);
      one(nullptr);
      wrong_d = check_dispatch(c, plan, case_id, cfg_.masked, p.recv_rows, recv_x, back_map.to_host(), tpe);
      wrong_c = check_combine(c, in);
    }
    return make_report(d_us, c_us, wrong_d, wrong_c);
  }

  // ---- the nccl protocol ----

  // alltoallv of rows packed in peer order: rows_out[p] rows of row_bytes to peer p, rows_in[p]
  // rows from it.
  void exchange(const void* send, const std::vector<int64_t>& rows_out, void* recv, const std::vector<int64_t>& rows_in,
                int64_t row_bytes) {
    std::vector<int64_t>&send_bytes = a2a_[0], &send_off = a2a_[1], &recv_bytes = a2a_[2], &recv_off = a2a_[3];
    int64_t s = 0, r = 0;
    for (int p = 0; p < world_; ++p) {
      send_bytes[p] = rows_out[p] * row_bytes, send_off[p] = s, s += send_bytes[p];
      recv_bytes[p] = rows_in[p] * row_bytes, recv_off[p] = r, r += recv_bytes[p];
    }
    nccl_->alltoallv(send, send_bytes.data(), send_off.data(), recv, recv_bytes.data(), recv_off.data(), stream_);
  }

  RankReport measure_nccl(const Case& c, const Plan& plan, int case_id, Inputs& in) {
    const int64_t T = c.tokens, H = c.hidden, k = c.k, E = c.experts, W = world_, El = E / W;
    const int64_t rb = H * static_cast<int64_t>(ops_.size);
    const int64_t slots = T * k;
    // Sender side, sized by this rank's tokens.
    DeviceBuffer<int64_t> dest_keys(slots), dest_rows(slots), owner_keys(slots), combine_map(slots);
    DeviceBuffer<int32_t> tok_to(W), slots_to(W), tpe(El), arrived_count(1);
    DeviceBuffer<int64_t> counts(4 * W);  // [sent | received][peer][tokens, slots]
    DeviceBuffer<int64_t> scratch(static_cast<size_t>(kernels::ep_scratch_len(W, E)));
    DeviceBuffer<char> ws_send(kernels::permute_workspace_bytes(T, k, W));
    // Sized by the count exchange: grown by the sizing run.
    DeviceBuffer<char> send_x, staged_x, recv_x, back_send, back_recv, ws_recv;
    DeviceBuffer<int32_t> send_ids, staged_ids, arrived_keys;
    DeviceBuffer<int64_t> recv_map, back_pos;
    // Per peer, from the count exchange.
    std::vector<int64_t> send_tok(W), send_slots(W), recv_tok(W), recv_slots(W), ones(W, 1);
    int64_t sent_tok = 0, sent_slots = 0, arrived_tok = 0, arrived_slots = 0;

    // NOTE: ep_destination_keys is the ipc backend's launcher and checks EpParams' communicator
    // fields: this rank's ipc buffer supplies them; nothing of that buffer is read or written.
    kernels::EpParams q = buf_->params();
    q.scratch = scratch.get();
    q.num_tokens = T;
    q.k = k;
    q.num_experts = E;
    q.idx = in.idx.get();
    q.idx_is_int64 = false;
    // route before the count exchange (the counts), scatter with the rows after it (their number)
    kernels::PermuteParams by_dest =
        kernels::permute_index_params(dest_keys.get(), true, T, k, W, dest_rows.get(), tok_to.get(), ws_send.get());

    auto dispatch = [&] {
      // Sender: each token's destinations and each slot's owner; an index pass over the owners
      // gives the slots per destination and, as combine_map, the order their rows come back in.
      if (slots > 0) {
        kernels::ep_destination_keys(q, dest_keys.get(), stream_);
        owner_keys_kernel<<<grid_for(slots, kThreads), kThreads, 0, stream_>>>(in.idx.get(), slots, E, El,
                                                                              owner_keys.get());
        MOE_CUDA_CHECK(cudaGetLastError());
      }
      kernels::PermuteParams by_owner =
          kernels::permute_index_params(owner_keys.get(), true, T, k, W, combine_map.get(), slots_to.get(),
                                        ws_send.get());
      kernels::permute_route(by_owner, stream_);
      kernels::permute_scatter(by_owner, stream_);
      kernels::permute_route(by_dest, stream_);
      pair_counts_kernel<<<1, 64, 0, stream_>>>(tok_to.get(), slots_to.get(), W, counts.get());
      MOE_CUDA_CHECK(cudaGetLastError());

      // 1. Count exchange and the one host read: every size below follows from it.
      exchange(counts.get(), ones, counts.get() + 2 * W, ones, 2 * sizeof(int64_t));
      MOE_CUDA_CHECK(cudaMemcpyAsync(host_counts_, counts.get(), sizeof(int64_t) * 4 * W, cudaMemcpyDeviceToHost,
                                     stream_));
      nccl_->wait(stream_, "dispatch (count exchange)");
      sent_tok = sent_slots = arrived_tok = arrived_slots = 0;
      for (int p = 0; p < W; ++p) {
        send_tok[p] = host_counts_[2 * p], send_slots[p] = host_counts_[2 * p + 1];
        recv_tok[p] = host_counts_[2 * W + 2 * p], recv_slots[p] = host_counts_[2 * W + 2 * p + 1];
        sent_tok += send_tok[p], sent_slots += send_slots[p];
        arrived_tok += recv_tok[p], arrived_slots += recv_slots[p];
      }
      ensure(send_x, sent_tok * rb), ensure(send_ids, sent_tok * k);
      ensure(staged_x, arrived_tok * rb), ensure(staged_ids, arrived_tok * k);
      ensure(recv_x, arrived_slots * rb), ensure(recv_map, arrived_tok * k);
      ensure(arrived_keys, arrived_tok * k), ensure(back_pos, arrived_tok * k);
      ensure(back_send, arrived_slots * rb), ensure(back_recv, sent_slots * rb);
      ensure(ws_recv, static_cast<int64_t>(std::max(kernels::permute_workspace_bytes(arrived_tok, k, El),
                                                    kernels::permute_workspace_bytes(arrived_tok, k, 1))));

      // 2. The rows to send (destination-major, token order, one per (token, destination)) with
      // their expert ids local to the destination; rows then ids, each in one grouped alltoallv.
      by_dest.x = in.x.get();
      by_dest.row_bytes = rb;
      by_dest.x_row_stride = rb;
      by_dest.x_perm = send_x.get();
      by_dest.out_rows = sent_tok;
      kernels::permute_scatter(by_dest, stream_);
      if (slots > 0) {
        pack_ids_kernel<<<grid_for(slots, kThreads), kThreads, 0, stream_>>>(in.idx.get(), dest_keys.get(),
                                                                            dest_rows.get(), T, k, E, El,
                                                                            send_ids.get());
        MOE_CUDA_CHECK(cudaGetLastError());
      }
      exchange(send_x.get(), send_tok, staged_x.get(), recv_tok, rb);
      exchange(send_ids.get(), send_tok, staged_ids.get(), recv_tok, k * static_cast<int64_t>(sizeof(int32_t)));

      // 3. Receiver: the arrived tokens, in (source rank, source token) order, permuted by their
      // local expert ids into recv_x; then each arrived slot's place in the combine's send order.
      kernels::PermuteParams by_expert =
          kernels::permute_index_params(staged_ids.get(), false, arrived_tok, k, El, recv_map.get(), tpe.get(),
                                        ws_recv.get());
      by_expert.x = staged_x.get();
      by_expert.row_bytes = rb;
      by_expert.x_row_stride = rb;
      by_expert.x_perm = recv_x.get();
      by_expert.out_rows = arrived_slots;
      kernels::permute_route(by_expert, stream_);
      kernels::permute_scatter(by_expert, stream_);
      if (arrived_tok > 0) {
        arrived_keys_kernel<<<grid_for(arrived_tok * k, kThreads), kThreads, 0, stream_>>>(
            staged_ids.get(), arrived_tok * k, arrived_keys.get());
        MOE_CUDA_CHECK(cudaGetLastError());
      }
      kernels::PermuteParams by_arrival = kernels::permute_index_params(
          arrived_keys.get(), false, arrived_tok, k, 1, back_pos.get(), arrived_count.get(), ws_recv.get());
      kernels::permute_route(by_arrival, stream_);
      kernels::permute_scatter(by_arrival, stream_);
    };
    auto combine = [&] {
      // Every expert row back to its source, in the (source, token, slot) order it expects ...
      if (arrived_tok > 0) {
        gather_rows_kernel<<<grid_for(arrived_tok * k, kThreads / kWarp), kThreads, 0, stream_>>>(
            recv_x.get(), recv_map.get(), back_pos.get(), arrived_tok * k, rb, back_send.get());
        MOE_CUDA_CHECK(cudaGetLastError());
      }
      exchange(back_send.get(), recv_slots, back_recv.get(), send_slots, rb);
      // ... and there the weighted sum of each token's k rows (combine_map: the owner order).
      kernels::UnpermuteParams u;
      u.dtype = ops_.permute_float;
      u.y = back_recv.get();
      u.y_rows = sent_slots;
      u.y_row_stride = H;
      u.row_map = combine_map.get();
      u.weights = in.w.get();
      u.out = in.out.get();
      u.num_tokens = T;
      u.k = k;
      u.hidden = H;
      kernels::unpermute(u, stream_);
    };
    auto one = [&](double* times) {
      iteration(times, dispatch, [&] { nccl_->wait(stream_, "dispatch"); }, combine,
                [&] { nccl_->wait(stream_, "combine"); });
    };

    std::vector<double> d_us, c_us;
    time_iterations(one, &d_us, &c_us);
    int64_t wrong_d = -1, wrong_c = -1;
    if (o_.check) {
      poison(recv_x), poison(recv_map), poison(tpe), poison(in.out);
      one(nullptr);
      // The origin of every recv_x row in back_map's encoding, from the receiver's row map of
      // each arrived (token, slot); -2 where two slots claim one row.
      wrong_d = std::llabs(arrived_tok - static_cast<int64_t>(plan.arrivals.size()));
      std::vector<int64_t> codes(static_cast<size_t>(arrived_slots), -1);
      if (wrong_d == 0) {
        const std::vector<int64_t> map = head(recv_map, arrived_tok * k);
        for (int64_t i = 0; i < arrived_tok; ++i) {
          for (int64_t j = 0; j < k; ++j) {
            const int64_t r = map[i * k + j];
            if (r < 0 || r >= arrived_slots) continue;  // the row it should name stays -1: counted
            const int64_t code = back_code(plan.arrivals[i].first, plan.arrivals[i].second, k, j);
            codes[r] = codes[r] == -1 ? code : -2;
          }
        }
      }
      wrong_d += check_dispatch(c, plan, case_id, /*masked=*/false, arrived_slots, recv_x, codes, tpe);
      wrong_c = check_combine(c, in);
    }
    return make_report(d_us, c_us, wrong_d, wrong_c);
  }

  // ---- checks ----

  // Wrong rows of recv_x (bytes, or the origin `codes` gives the row, in back_map's encoding),
  // plus wrong tokens_per_expert entries, plus rows missing from or added to the exact layout
  // (recv_rows: the row count the device side reported).
  int64_t check_dispatch(const Case& c, const Plan& plan, int case_id, bool masked, int64_t recv_rows,
                         const DeviceBuffer<char>& recv_x, const std::vector<int64_t>& codes,
                         const DeviceBuffer<int32_t>& tpe) const {
    const int64_t H = c.hidden, El = c.experts / world_;
    const int64_t rb = H * static_cast<int64_t>(ops_.size);
    int64_t wrong = 0;
    const std::vector<int32_t> tpe_h = tpe.to_host();
    for (int64_t el = 0; el < El; ++el) wrong += tpe_h[el] != static_cast<int64_t>(plan.rows[el].size());
    if (!masked) wrong += std::llabs(recv_rows - plan.recv_rows);
    // Rows the device wrote in this run (a shorter exact layout was counted above).
    const int64_t written = std::min<int64_t>(static_cast<int64_t>(codes.size()),
                                              static_cast<int64_t>(recv_x.size()) / rb);
    const int64_t limit = masked ? written : std::min(recv_rows, written);
    std::vector<char> got;
    std::vector<char> want(static_cast<size_t>(rb));
    int64_t base = 0;
    for (int64_t el = 0; el < El; ++el) {
      const int64_t n = static_cast<int64_t>(plan.rows[el].size());
      const int64_t start = masked ? el * c.tokens * world_ : base;  // masked: max_rows = ranks * T
      base += n;
      const int64_t have = std::max<int64_t>(0, std::min<int64_t>(n, limit - start));
      if (have > 0) {
        got.resize(static_cast<size_t>(have * rb));
        MOE_CUDA_CHECK(cudaMemcpy(got.data(), recv_x.get() + start * rb, got.size(), cudaMemcpyDeviceToHost));
      }
      for (int64_t i = 0; i < have; ++i) {
        const Plan::Src& src = plan.rows[el][i];
        ops_.make_row(seed_of(case_id, src.rank, kSeedX), src.token, H, want.data());
        const bool row_ok = std::memcmp(got.data() + i * rb, want.data(), static_cast<size_t>(rb)) == 0;
        const bool map_ok = codes[start + i] == back_code(src.rank, src.token, c.k, src.slot);
        wrong += !(row_ok && map_ok);
      }
    }
    return wrong;
  }

  // Rows of out [T, H] outside the tolerance of the float32 reference (NaN counts as wrong).
  int64_t check_combine(const Case& c, const Inputs& in) const {
    const int64_t T = c.tokens, H = c.hidden, k = c.k;
    const int64_t rb = H * static_cast<int64_t>(ops_.size);
    const std::vector<int32_t>& idx = *in.idx_h;
    const std::vector<char> got = in.out.to_host();
    std::vector<float> acc(static_cast<size_t>(H)), xf(static_cast<size_t>(H));
    int64_t wrong = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t h = 0; h < H; ++h) xf[h] = static_cast<float>(ops_.load(in.x_h.data() + t * rb, h));
      for (int64_t j = 0; j < k; ++j) {
        if (idx[t * k + j] < 0) continue;
        const float wj = in.w_h[t * k + j];
        for (int64_t h = 0; h < H; ++h) {
          const float prod = wj * xf[h];
          acc[h] = acc[h] + prod;  // NOTE: rounded separately, in slot order, as the kernel does
        }
      }
      bool ok = true;
      for (int64_t h = 0; h < H && ok; ++h) {
        const double want = ops_.round(acc[h]), g = ops_.load(got.data() + t * rb, h);
        ok = std::fabs(g - want) <= kAtol + ops_.rtol * std::fabs(want);
      }
      wrong += !ok;
    }
    return wrong;
  }

  // ---- rank 0's table ----

  void report(const char* backend, const Case& c, const Plan& plan) {
    Row r;
    r.backend = backend;
    r.c = c;
    r.dispatch_us = r.combine_us = 0;
    r.wrong = o_.check ? 0 : -1;
    for (int s = 0; s < world_; ++s) {
      const RankReport& rep = sh_->reports[s];
      r.dispatch_us = std::max(r.dispatch_us, rep.dispatch_us);
      r.combine_us = std::max(r.combine_us, rep.combine_us);
      r.dispatch_per_rank.push_back(rep.dispatch_us);
      r.combine_per_rank.push_back(rep.combine_us);
      if (o_.check) r.wrong += std::max<int64_t>(rep.wrong_dispatch, 0) + std::max<int64_t>(rep.wrong_combine, 0);
    }
    const double rb = static_cast<double>(c.hidden) * ops_.size;
    r.dispatch_bytes = plan.dest_pairs * rb;
    r.combine_bytes = plan.kept_slots * rb;
    r.dests_per_token = c.tokens > 0 ? static_cast<double>(plan.dest_pairs) / (c.tokens * world_) : 0;
    const double ceil = o_.ceil_bw_gbps * 1e9;
    auto stage = [&](double bytes, double us) {
      const double s = us * 1e-6, floor_us = 2 * bytes / ceil * 1e6;
      std::printf("%9.2f %8.1f %8.1f %8.2f %6.1f", us, s > 0 ? bytes / s / 1e9 : 0, s > 0 ? 2 * bytes / s / 1e9 : 0,
                  floor_us, us > 0 ? 100 * floor_us / us : 0);
    };
    std::printf("%8s %5d %6lld %6lld %3lld %4lld %7.2f | ", backend, world_, static_cast<long long>(c.tokens),
                static_cast<long long>(c.hidden), static_cast<long long>(c.k), static_cast<long long>(c.experts),
                r.dests_per_token);
    stage(r.dispatch_bytes, r.dispatch_us);
    std::printf(" | ");
    stage(r.combine_bytes, r.combine_us);
    std::printf(" | %6s\n", r.wrong < 0 ? "N/A" : std::to_string(r.wrong).c_str());
    if (r.wrong > 0)
      for (int s = 0; s < world_; ++s)
        if (sh_->reports[s].wrong_dispatch > 0 || sh_->reports[s].wrong_combine > 0)
          std::printf("#   %s rank %d: %lld wrong in dispatch (recv rows, counts), %lld wrong combine rows\n", backend,
                      s, static_cast<long long>(sh_->reports[s].wrong_dispatch),
                      static_cast<long long>(sh_->reports[s].wrong_combine));
    std::fflush(stdout);
    rows_.push_back(std::move(r));
  }

  // Footer and JSON (rank 0).
  int finish() const {
    int64_t wrong = 0;
    for (const Row& r : rows_) wrong += std::max<int64_t>(r.wrong, 0);
    std::printf("# rows: %zu, wrong: %s\n", rows_.size(), o_.check ? std::to_string(wrong).c_str() : "not checked");
    const double ceil = o_.ceil_bw_gbps * 1e9;
    for (const char* backend : {"ipc", "nccl"}) {
      double d_frac = 0, c_frac = 0;
      int n = 0;
      for (const Row& r : rows_) {
        if (r.backend != backend) continue;
        ++n;
        if (r.dispatch_us > 0) d_frac += 2 * r.dispatch_bytes / ceil * 1e6 / r.dispatch_us;
        if (r.combine_us > 0) c_frac += 2 * r.combine_bytes / ceil * 1e6 / r.combine_us;
      }
      if (n > 0)
        std::printf("# avg %%floor %s: dispatch %.1f, combine %.1f\n", backend, 100 * d_frac / n, 100 * c_frac / n);
    }
    std::fflush(stdout);
    if (!o_.json_path.empty()) write_json();
    return wrong > 0 ? kExitWrong : kExitOk;
  }

  void write_json() const {
    FILE* f = std::fopen(o_.json_path.c_str(), "w");
    if (f == nullptr) throw std::runtime_error("cannot write " + o_.json_path);
    auto quoted = [](const std::string& s) {
      std::string out = "\"";
      for (char ch : s) {
        if (ch == '"' || ch == '\\') out += '\\';
        if (static_cast<unsigned char>(ch) >= 0x20) out += ch;
      }
      return out + "\"";
    };
    const std::string nccl = nccl_ ? "ran" : "skipped: " + nccl_skip_reason(cfg_);
    std::fprintf(f, "{\n  \"benchmark\": %s,\n  \"command\": %s,\n  \"device\": %s,\n", quoted(cfg_.name).c_str(),
                 quoted(o_.command_line).c_str(), quoted(prop_.name).c_str());
    std::fprintf(f, "  \"ranks\": %d,\n  \"one_gpu_per_rank\": %s,\n  \"layout\": \"%s\",\n  \"nccl\": %s,\n"
                    "  \"dtype\": \"%s\",\n",
                 world_, cfg_.one_gpu_per_rank ? "true" : "false", cfg_.masked ? "masked" : "exact",
                 quoted(nccl).c_str(), moe_bench::dtype_name(o_.dtype));
    std::fprintf(f, "  \"iters\": %lld,\n  \"warmup\": %lld,\n  \"flush_l2\": %s,\n  \"ceiling_gbps\": %.6g,\n",
                 static_cast<long long>(o_.iters), static_cast<long long>(o_.warmup), o_.flush_l2 ? "true" : "false",
                 o_.ceil_bw_gbps);
    std::fprintf(f, "  \"bytes\": \"dispatch: one row per (token, destination rank) pair; combine: one row per kept "
                    "(token, slot); summed over ranks; busbw = 2 * bytes / time\",\n  \"rows\": [");
    auto list = [&](const std::vector<double>& v) {
      std::string s = "[";
      for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + moe_bench::Cli::fmt("%.4f", v[i]);
      return s + "]";
    };
    for (size_t i = 0; i < rows_.size(); ++i) {
      const Row& r = rows_[i];
      std::fprintf(f,
                   "%s\n    {\"backend\": \"%s\", \"tokens\": %lld, \"hidden\": %lld, \"k\": %lld, \"experts\": %lld, "
                   "\"dests_per_token\": %.4f, \"dispatch_us\": %.4f, \"dispatch_bytes\": %.17g, "
                   "\"combine_us\": %.4f, \"combine_bytes\": %.17g, \"dispatch_us_per_rank\": %s, "
                   "\"combine_us_per_rank\": %s, \"wrong\": %s}",
                   i ? "," : "", r.backend.c_str(), static_cast<long long>(r.c.tokens),
                   static_cast<long long>(r.c.hidden), static_cast<long long>(r.c.k),
                   static_cast<long long>(r.c.experts), r.dests_per_token, r.dispatch_us, r.dispatch_bytes,
                   r.combine_us, r.combine_bytes, list(r.dispatch_per_rank).c_str(), list(r.combine_per_rank).c_str(),
                   r.wrong < 0 ? "null" : std::to_string(r.wrong).c_str());
    }
    std::fprintf(f, "\n  ]\n}\n");
    std::fclose(f);
  }

  const Config& cfg_;
  const moe_bench::Options& o_;
  Shared* sh_;
  int rank_, world_;
  ElemOps ops_;
  int device_ = 0;
  cudaDeviceProp prop_{};
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ev_[4] = {};
  cudaEvent_t counted_ = nullptr;
  DeviceBuffer<char> flush_;
  size_t flush_bytes_ = 0;
  comm::SymmetricBuffer* buf_ = nullptr;
  std::unique_ptr<comm::NcclComm> nccl_;  // with one GPU per rank only
  int64_t* host_counts_ = nullptr;        // pinned: the count exchange's [sent | received][peer][tokens, slots]
  std::vector<int64_t> a2a_[4];           // alltoallv arguments: send bytes, offsets, recv bytes, offsets
  std::vector<Row> rows_;
};

// A forked rank: its exit status.
int rank_main(const Config& cfg, Shared* sh, int rank) {
  try {
    RankRunner runner(cfg, sh, rank);
    return runner.run();
  } catch (const Aborted&) {
    return kExitAborted;
  } catch (const EpFailure& e) {
    std::fprintf(stderr, "# [rank %d] %s\n", rank, e.what());
    return kExitEpError;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "# [rank %d] error: %s\n", rank, e.what());
    return kExitError;
  }
}

// ---- the parent -------------------------------------------------------------------------------

// Forks f() and returns its pid; the child exits with f()'s value and dies with the parent.
template <class F>
pid_t spawn(F&& f) {
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    // NOTE: a parent that died before the prctl sends no signal: the child is then adopted.
    if (getppid() != parent) _exit(kExitAborted);
    const int status = f();
    std::fflush(stdout);
    std::fflush(stderr);
    _exit(status);
  }
  return pid;
}

std::string describe_status(int st) {
  if (WIFSIGNALED(st)) return std::string("killed by signal ") + std::to_string(WTERMSIG(st)) + " (" +
                              strsignal(WTERMSIG(st)) + ")";
  const int code = WEXITSTATUS(st);
  const char* what = code == kExitWrong ? "wrong results" : code == kExitError ? "error" :
                     code == kExitEpError ? "EpError" : code == kExitAborted ? "stopped: another rank failed" : "?";
  return "exit " + std::to_string(code) + " (" + what + ")";
}

// Runs the ranks and waits for them; the process's exit status.
int supervise(const Config& cfg, Shared* sh) {
  const int W = cfg.ranks;
  std::vector<pid_t> pids(W, -1);
  std::vector<int> status(W, 0);
  std::vector<bool> done(W, false);
  for (int r = 0; r < W; ++r) pids[r] = spawn([&cfg, sh, r] { return rank_main(cfg, sh, r); });

  int alive = W;
  bool timed_out = false;
  long long seen = sh->progress.load();
  double last_progress = now_s(), kill_at = 1e300;
  while (alive > 0) {
    int st = 0;
    const pid_t pid = waitpid(-1, &st, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < W; ++r) {
        if (pids[r] != pid) continue;
        done[r] = true, status[r] = st, --alive;
        const bool failed = WIFSIGNALED(st) || (WIFEXITED(st) && WEXITSTATUS(st) != 0);
        if (failed && WIFEXITED(st) && WEXITSTATUS(st) == kExitWrong) continue;  // finishes its cases
        if (failed && !sh->abort.exchange(1)) {
          // The others get time to report their own EpError (a peer that never arrives) first.
          const double grace = std::min(cfg.timeout_s, cfg.ep_timeout_s + 5);
          kill_at = now_s() + grace;
          std::fprintf(stderr, "# bench_ep: rank %d %s; stopping the other ranks (killed in %.0f s)\n", r,
                       describe_status(st).c_str(), grace);
        }
      }
      continue;
    }
    if (pid < 0 && errno != EINTR) break;
    const double t = now_s();
    const long long p = sh->progress.load();
    if (p != seen) seen = p, last_progress = t;
    if (t - last_progress > cfg.timeout_s && !timed_out) {
      timed_out = true;
      std::fprintf(stderr, "# bench_ep: no progress for %.0f s (--timeout-s): killing the ranks\n", cfg.timeout_s);
      kill_at = t;
    }
    if (t >= kill_at) {
      sh->abort.store(1);
      for (int r = 0; r < W; ++r)
        if (!done[r]) kill(pids[r], SIGKILL);
      kill_at = 1e300;
    }
    usleep(10000);
  }

  int worst = kExitOk;
  for (int r = 0; r < W; ++r) {
    const int st = status[r];
    const bool ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
    if (ok) continue;
    std::fprintf(stderr, "# bench_ep: rank %d: %s\n", r, describe_status(st).c_str());
    worst = std::max<int>(worst, WIFEXITED(st) && WEXITSTATUS(st) == kExitWrong ? kExitWrong : kExitError);
  }
  if (timed_out) worst = kExitError;
  return worst;
}

// The help text of the bytes, shown by -h.
const char* kWhat =
    "dispatch and combine over --ranks forked processes on one GPU (run under MPS) or --one-gpu-per-rank:\n"
    "  the ipc backend (csrc/comm/ep_ops.cuh) always; the nccl protocol (comm::NcclComm, exact layout) too\n"
    "  with one GPU per rank. Cases: --tokens (per rank) x --hidden x --k x --experts, or -s TxHxkxE,...;\n"
    "  or a -b/-e sweep of tokens per rank.\n"
    "  Bytes (both backends): dispatch = the payload rows the ranks send, one row (hidden * element size)\n"
    "  per (token, destination rank) pair, the token's own rank included, summed over ranks; combine = one\n"
    "  row per kept (token, slot), summed over ranks. algbw = bytes / time; busbw = 2 * bytes / time (on one\n"
    "  GPU each byte is read and written in the shared HBM, the count of the copy ceiling); floor = 2 * bytes /\n"
    "  --ceil_bw; %floor = floor / time. time = max over ranks of the rank's median.\n"
    "  Exit status: 0 ok (or 'skipped' without a GPU), 1 wrong results, 2 errors (EpError, NCCL, crash, timeout)";

// Lets the boolean flags be given bare: "--masked" -> "--masked=1".
std::vector<char*> bare_flags(int argc, char** argv, std::vector<std::string>* storage) {
  static const char* bare[] = {"--masked", "--one-gpu-per-rank", "--check", "--nccl"};
  storage->reserve(argc);
  std::vector<char*> out;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    for (const char* b : bare) {
      const bool valued = i + 1 < argc && (std::strcmp(argv[i + 1], "0") == 0 || std::strcmp(argv[i + 1], "1") == 0);
      if (a == b && !valued) a += "=1";
    }
    storage->push_back(a);
  }
  for (std::string& s : *storage) out.push_back(&s[0]);
  return out;
}

bool parse_list(const std::string& text, std::vector<int64_t>* out) {
  out->clear();
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    int64_t v;
    if (!moe_bench::parse_size(text.substr(pos, comma - pos), &v)) return false;
    out->push_back(v);
    pos = comma + 1;
  }
  return !out->empty();
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  cfg.name = "bench_ep";
  moe_bench::Cli cli(cfg.name, kWhat);
  int64_t ranks = 2, hidden = 7168, topk = 8, experts = 256, warmup = -1, crash_rank = -1;
  bool one_gpu = false, masked = false, nccl = true;
  std::string tokens = "128,4096";
  cli.add_int("-r", "--ranks", &ranks, "number of ranks (forked processes)");
  cli.add_bool("", "--one-gpu-per-rank", &one_gpu, "rank r on device r (when there are enough GPUs)");
  cli.add_string("-T", "--tokens", &tokens, "tokens per rank, comma-separated (unless -b/-e or -s)");
  cli.add_int("-H", "--hidden", &hidden, "hidden size");
  cli.add_int("-k", "--k", &topk, "experts per token");
  cli.add_int("-E", "--experts", &experts, "number of experts (a multiple of the ranks)");
  cli.add_bool("", "--masked", &masked, "no-sync masked layout, max_rows = ranks * tokens (ipc rows only)");
  cli.add_bool("", "--nccl", &nccl, "also the nccl rows (they need --one-gpu-per-rank; 0: ipc only)");
  cli.add_int("", "--warmup", &warmup, "same as -w");
  cli.add_double("", "--timeout-s", &cfg.timeout_s, "kill every rank when no barrier completes for this long");
  cli.add_double("", "--ep-timeout-s", &cfg.ep_timeout_s,
                 "timeout of every wait in the EP kernels and of every NCCL wait (joining: --timeout-s)");
  cli.add_int("", "--blocks", &cfg.blocks, "blocks of the data kernels (EpParams::num_blocks; 0: one per SM)");
  cli.add_int("", "--crash-rank", &crash_rank, "test the failure path: this rank aborts at its first dispatch");
  std::vector<std::string> storage;
  std::vector<char*> args = bare_flags(argc, argv, &storage);
  // -b/-e default to 0: no sweep unless asked for.
  cfg.opts = cli.parse(static_cast<int>(args.size()), args.data(), 0, 0);
  if (warmup >= 0) cfg.opts.warmup = warmup;
  if (cfg.opts.min_size > 0 && cfg.opts.max_size < cfg.opts.min_size) cfg.opts.max_size = cfg.opts.min_size;
  if (cfg.opts.max_size > 0 && cfg.opts.min_size <= 0) cfg.opts.min_size = cfg.opts.max_size;
  cfg.ranks = static_cast<int>(ranks);
  cfg.one_gpu_per_rank = one_gpu;
  cfg.masked = masked;
  cfg.nccl = nccl;
  cfg.crash_rank = static_cast<int>(crash_rank);
  cfg.what = kWhat;
  if (ranks < 1 || ranks > kMaxRanks) {
    std::fprintf(stderr, "bench_ep: --ranks must be in [1, %d]\n", kMaxRanks);
    return 1;
  }
  if (!(cfg.timeout_s > 0) || !(cfg.ep_timeout_s > 0) || cfg.blocks < 0) {
    std::fprintf(stderr, "bench_ep: --timeout-s and --ep-timeout-s must be > 0, --blocks >= 0\n");
    return 1;
  }
  if (!cfg.opts.shapes.empty()) {
    for (const auto& s : cfg.opts.shapes) {
      if (s.size() < 3 || s.size() > 4) {
        std::fprintf(stderr, "bench_ep: -s takes TxHxk or TxHxkxE\n");
        return 1;
      }
      cfg.cases.push_back({s[0], s[1], s[2], s.size() == 4 ? s[3] : experts});
    }
  } else {
    std::vector<int64_t> list = cfg.opts.sweep();
    if (list.empty() && !parse_list(tokens, &list)) {
      std::fprintf(stderr, "bench_ep: bad --tokens %s\n", tokens.c_str());
      return 1;
    }
    for (int64_t t : list) cfg.cases.push_back({t, hidden, topk, experts});
  }

  // The shared page, before any fork (and before any CUDA call: see the top of the file).
  void* page = mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) {
    std::fprintf(stderr, "bench_ep: mmap: %s\n", std::strerror(errno));
    return 2;
  }
  Shared* sh = new (page) Shared();

  // Is there a GPU? Asked in a child: CUDA initialised here would not work in the forked ranks.
  const pid_t probe = spawn([sh] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    sh->device_count = err == cudaSuccess ? n : 0;
    std::snprintf(sh->probe_message, sizeof(sh->probe_message), "%s",
                  err == cudaSuccess ? (n ? "ok" : "no device") : cudaGetErrorString(err));
    return 0;
  });
  int st = 0;
  const double probe_deadline = now_s() + cfg.timeout_s;
  while (waitpid(probe, &st, WNOHANG) == 0) {
    if (now_s() > probe_deadline) {
      kill(probe, SIGKILL);
      waitpid(probe, &st, 0);
      std::fprintf(stderr, "bench_ep: the GPU probe did not answer in %.0f s\n", cfg.timeout_s);
      return 2;
    }
    usleep(10000);
  }
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    std::fprintf(stderr, "bench_ep: the GPU probe failed (%s)\n", describe_status(st).c_str());
    return 2;
  }
  if (sh->device_count == 0) {
    std::printf("# bench_ep: no CUDA device (cudaGetDeviceCount: %s): skipped\n", sh->probe_message);
    return 0;
  }
  if (cfg.one_gpu_per_rank && sh->device_count < cfg.ranks) {
    std::printf("# bench_ep: %d GPU(s) for %d ranks: --one-gpu-per-rank ignored, all ranks on device %lld\n",
                sh->device_count, cfg.ranks, static_cast<long long>(cfg.opts.device));
    cfg.one_gpu_per_rank = false;
  }
  if (!cfg.one_gpu_per_rank && cfg.opts.device >= sh->device_count) {
    std::fprintf(stderr, "bench_ep: -D %lld but only %d device(s)\n", static_cast<long long>(cfg.opts.device),
                 sh->device_count);
    return 2;
  }
  return supervise(cfg, sh);
}
