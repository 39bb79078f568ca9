// C++ test of ep_small_index (csrc/kernels/ep_index.cu), the one-launch local index of a small
// dispatch, against a host reference: random ids with -1 and out-of-range values, tokens with
// several slots on one expert or one destination, T = 0, world 1 to 64, int32 and int64 ids.
// Exit status 0 = pass (or no CUDA device: skipped), 1 = wrong elements, 2 = a CUDA error
// (registered with CTest).
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "common.cuh"
#include "kernels/ep.cuh"
#include "kernels/permute.cuh"

namespace mk = moe_ext::kernels;

namespace {

struct Index {
  std::vector<int64_t> expert_rows, dest_rows;
  std::vector<int32_t> hist, tok;
};

Index reference(const std::vector<int64_t>& idx, int64_t T, int64_t k, int64_t E, int64_t W) {
  Index r;
  const int64_t el = E / W, n = T * k;
  r.expert_rows.assign(n, -1);
  r.dest_rows.assign(n, -1);
  r.hist.assign(E, 0);
  r.tok.assign(W, 0);
  std::vector<int64_t> dkey(n, -1);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = idx[s];
    if (e < 0 || e >= E) continue;
    r.expert_rows[s] = r.hist[e]++;  // rank among the expert's slots, in slot order
    int64_t d = e / el;
    for (int64_t i = s - s % k; i < s; ++i)
      if (idx[i] >= 0 && idx[i] < E && idx[i] / el == d) d = -1;
    dkey[s] = d;
    if (d >= 0) r.dest_rows[s] = r.tok[d]++;
  }
  std::vector<int64_t> eoff(E, 0), doff(W, 0);
  for (int64_t e = 1; e < E; ++e) eoff[e] = eoff[e - 1] + r.hist[e - 1];
  for (int64_t d = 1; d < W; ++d) doff[d] = doff[d - 1] + r.tok[d - 1];
  for (int64_t s = 0; s < n; ++s) {
    if (r.expert_rows[s] >= 0) r.expert_rows[s] += eoff[idx[s]];
    if (r.dest_rows[s] >= 0) r.dest_rows[s] += doff[dkey[s]];
  }
  return r;
}

template <typename T>
int64_t differ(const std::vector<T>& got, const std::vector<T>& want) {
  int64_t n = 0;
  for (size_t i = 0; i < want.size(); ++i) n += got[i] != want[i];
  return n;
}

template <typename IdxT>
int64_t run_case(int64_t T, int64_t k, int64_t E, int64_t W, double unrouted, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int64_t> expert(0, E - 1), hot(0, std::min<int64_t>(E - 1, 3));
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<int64_t> idx(T * k);
  for (auto& v : idx) {
    const double r = u(gen);
    // NOTE: out-of-range ids on both sides (E + 5 and -3): anything outside [-1, E) is not routed.
    v = r < unrouted ? -1
        : r < unrouted + 0.01 ? E + 5
        : r < unrouted + 0.02 ? -3
        : r < 0.5 ? hot(gen) : expert(gen);  // skewed, repeats
  }
  const Index want = reference(idx, T, k, E, W);

  std::vector<IdxT> idx_t(idx.begin(), idx.end());
  moe_bench::DeviceBuffer<IdxT> d_idx(idx_t.size());
  d_idx.from_host(idx_t);
  const size_t n = static_cast<size_t>(std::max<int64_t>(T * k, 1));
  moe_bench::DeviceBuffer<int64_t> expert_rows(n), dest_rows(n);
  moe_bench::DeviceBuffer<int32_t> hist(E), tok(W);
  // Poisoned outputs: every element must be written.
  MOE_CUDA_CHECK(cudaMemset(expert_rows.get(), 0x7f, n * sizeof(int64_t)));
  MOE_CUDA_CHECK(cudaMemset(dest_rows.get(), 0x7f, n * sizeof(int64_t)));
  MOE_CUDA_CHECK(cudaMemset(hist.get(), 0x7f, E * sizeof(int32_t)));
  MOE_CUDA_CHECK(cudaMemset(tok.get(), 0x7f, W * sizeof(int32_t)));

  mk::EpParams p;
  p.world = static_cast<int>(W);
  p.num_tokens = T;
  p.k = k;
  p.num_experts = E;
  p.idx = d_idx.get();
  p.idx_is_int64 = sizeof(IdxT) == 8;
  MOE_HOST_ASSERT(T * k <= mk::kEpSmallIndexSlots, "test case too large for the small index");
  mk::ep_small_index(p, expert_rows.get(), hist.get(), dest_rows.get(), tok.get(), nullptr);
  MOE_CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<int64_t> er = expert_rows.to_host(), dr = dest_rows.to_host();
  er.resize(T * k);
  dr.resize(T * k);
  int64_t wrong = differ(er, want.expert_rows) + differ(dr, want.dest_rows) + differ(hist.to_host(), want.hist) +
                  differ(tok.to_host(), want.tok);

  // The general path the ipc backend takes for larger calls (ep_ops.cu: destination keys, then a
  // permute index pass over experts and one over destinations), on the same ids: it must give the
  // same four outputs. ep_destination_keys checks communicator fields it never touches: dummies.
  {
    moe_bench::DeviceBuffer<int64_t> keys(n), g_er(n), g_dr(n);
    moe_bench::DeviceBuffer<int32_t> g_hist(E), g_tok(W);
    moe_bench::DeviceBuffer<char> ws(
        std::max(mk::permute_workspace_bytes(T, k, E), mk::permute_workspace_bytes(T, k, W)));
    static char dummy[64];
    mk::EpParams q = p;
    q.layout.sizes.world = W;
    q.layout.sizes.max_experts = E;
    q.layout.sizes.max_k = k;
    q.layout.sizes.row_bytes = 16;
    q.row_bytes = 16;
    q.local = dummy;
    q.peers = reinterpret_cast<char* const*>(dummy);
    q.control = reinterpret_cast<mk::EpControl*>(dummy);
    q.error = reinterpret_cast<mk::EpError*>(dummy);
    q.scratch = reinterpret_cast<int64_t*>(dummy);
    auto index_pass = [&](const void* ids, bool is64, int64_t keys_n, int64_t* row_map, int32_t* counts) {
      const mk::PermuteParams r = mk::permute_index_params(ids, is64, T, k, keys_n, row_map, counts, ws.get());
      mk::permute_route(r, nullptr);
      mk::permute_scatter(r, nullptr);
    };
    mk::ep_destination_keys(q, keys.get(), nullptr);
    index_pass(d_idx.get(), sizeof(IdxT) == 8, E, g_er.get(), g_hist.get());
    index_pass(keys.get(), true, W, g_dr.get(), g_tok.get());
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<int64_t> ger = g_er.to_host(), gdr = g_dr.to_host();
    ger.resize(T * k);
    gdr.resize(T * k);
    if (T > 0)  // (with no tokens the general path launches nothing: its outputs stay unwritten)
      wrong += differ(ger, er) + differ(gdr, dr) + differ(g_hist.to_host(), hist.to_host()) +
               differ(g_tok.to_host(), tok.to_host());
  }
  if (wrong)
    std::printf("FAILED: T=%lld k=%lld E=%lld W=%lld idx int%d: %lld wrong\n", static_cast<long long>(T),
                static_cast<long long>(k), static_cast<long long>(E), static_cast<long long>(W),
                static_cast<int>(8 * sizeof(IdxT)), static_cast<long long>(wrong));
  return wrong;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_ep_index: no CUDA device, skipped\n");
    return 0;
  }
  return moe_bench::guarded_main([] {
    struct Case { int64_t T, k, E, W; double unrouted; };
    const Case cases[] = {{0, 8, 256, 8, 0.1},  {1, 1, 2, 2, 0.0},    {128, 8, 256, 8, 0.05}, {128, 8, 256, 2, 0.0},
                          {7, 16, 60, 4, 0.2},  {256, 8, 1024, 64, 0.1}, {2048, 1, 8, 1, 0.0}, {341, 6, 384, 3, 0.3},
                          {100, 2, 8, 8, 0.5},  {64, 32, 64, 16, 0.1},
                          // NOTE: E + W = 10240 counters = 40 KiB, the most ep_small_index_fits allows: the
                          // launch at the shared-memory bound and the multi-chunk (E > 1024) scan with its carry.
                          {512, 4, 10176, 64, 0.1}};
    int64_t wrong = 0;
    uint32_t seed = 1;
    for (const Case& c : cases) {
      wrong += run_case<int64_t>(c.T, c.k, c.E, c.W, c.unrouted, seed++);
      wrong += run_case<int32_t>(c.T, c.k, c.E, c.W, c.unrouted, seed++);
    }
    std::printf("test_ep_index: %zu cases, %lld wrong\n", 2 * sizeof(cases) / sizeof(cases[0]),
                static_cast<long long>(wrong));
    return wrong ? 1 : 0;
  });
}
