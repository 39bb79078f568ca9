// bench_gating: the fused top-k gating of csrc/kernels/gating.cu (forward, optionally backward),
// timed on its own: no torch in this process. bench/gating_bench.py compares the op with torch's
// softmax + topk + renormalise in one run.
//
//   bench_gating -d fp32                                  # the issue's four cases (below)
//   bench_gating -d fp32 -s 16384x256x8x8x4,4096x64x6x0x0 # T x E x k x groups x topk_groups
//   bench_gating -d bf16 -b 128 -e 64K -E 256 -k 8 -g 8 -G 4 --backward 1
//   bench_gating -d fp32 --tile-rows 8,16,32,64 --warps 4,8  # launch shapes of the routing kernel
//
// Default cases: T = 16384 and 128 (decode) for E=256 k=8 with 8 groups / 4 chosen (DeepSeek-V3:
// sigmoid scores, expert bias) and E=8 k=2 (Mixtral: softmax). --score/--bias/--cf override.
//
// Bytes (the floor): logits read + weights, idx and positions written + bias and
// tokens_per_expert; '%ceil' = floor time at the 2.95 TB/s copy ceiling / measured time.
// Memory floor and prediction on the H100 for fp32 logits (written before any GPU run; see the
// performance model in csrc/kernels/gating.cu and bench/RESULTS.md for what was measured):
//   T=16384 E=256 k=8 g=8/4: 16.8 MB + 1.6 MB = 18.4 MB -> 6.2 us floor; predicted 10-11 us
//                            (%ceil ~55-60); the target is <= 15 us (2.5x the floor, 15x torch's 237 us).
//   T=128   E=256 k=8:       0.13 MB -> 0.05 us floor; launch-bound, predicted ~3.5 us (target < 5 us).
//   T=16384 E=8   k=2:       0.52 MB + 0.4 MB -> 0.3 us floor; predicted ~4 us (three launches,
//                            one warp per row with 8 of 32 lanes busy).
//   T=128   E=8   k=2:       predicted ~3 us.
// --tile-rows / --warps: every combination of rows per tile and warps per routing block is timed
// (GatingProblem's tuning knobs; 0 = the default, which --tile-rows 0 --warps 0 times): is the
// routing kernel latency-bound (more, smaller tiles help) or issue-bound (they do not)?
// '#wrong' compares with a float64 host reference: indices exactly (rows whose float64 keys hold
// a near-tie closer than 1e-5 of the row's scale at a place the choice depends on are not
// compared: float32 has no defined order there), positions and tokens_per_expert exactly,
// weights to 1e-5 and the losses to 1e-4 relative.
#include "common.cuh"
#include "kernels/api.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace {

using moe_bench::DeviceBuffer;
namespace mk = moe_ext::kernels;

struct Case {
  int64_t T, E, k, groups, topk_groups;
};

struct Config {
  std::string score = "auto";  // auto: sigmoid + bias with groups (DeepSeek-V3), softmax without
  int64_t bias = -1;           // -1: auto (with sigmoid)
  double capacity_factor = 0;
  bool backward = false;
  int64_t tile_rows = 0;  // GatingProblem::tile_rows / route_warps of this run (0: default)
  int64_t warps = 0;
};

constexpr uint64_t kSeed = 1234;

// ---- the float64 host reference ------------------------------------------------------------------
struct HostResult {
  std::vector<int32_t> idx, positions, tokens_per_expert;
  std::vector<double> weights;
  double aux = 0, z = 0;
  int64_t ambiguous_rows = 0;
};

// Expected outputs. A row whose choice is ambiguous (a near-tie at a decision point) takes the
// device's choice where the device kept a slot (any order within rounding is right there).
HostResult reference(const std::vector<double>& logits, const std::vector<double>& bias, const Case& c, bool sigmoid,
                     bool renormalize, int64_t capacity, const std::vector<int32_t>& dev_idx) {
  const int64_t T = c.T, E = c.E, k = c.k;
  HostResult r;
  r.idx.assign(T * k, -1), r.positions.assign(T * k, -1), r.tokens_per_expert.assign(E, 0), r.weights.assign(T * k, 0);
  std::vector<int32_t> pre(T * k);
  std::vector<double> s(E), key(E), p_sum(E, 0.0), pre_w(T * k);
  std::vector<int> order(E), gorder;
  double z = 0;
  for (int64_t t = 0; t < T; ++t) {
    const double* l = logits.data() + t * E;
    const double m = *std::max_element(l, l + E);
    double sum_exp = 0;
    for (int64_t e = 0; e < E; ++e) sum_exp += std::exp(l[e] - m);
    const double lse = m + std::log(sum_exp);
    z += lse * lse;
    double ssum = 0;
    for (int64_t e = 0; e < E; ++e) {
      s[e] = sigmoid ? 1.0 / (1.0 + std::exp(-l[e])) : std::exp(l[e] - lse);
      ssum += s[e];
    }
    double scale = 0;
    for (int64_t e = 0; e < E; ++e) {
      p_sum[e] += s[e] / ssum;
      key[e] = s[e] + (bias.empty() ? 0.0 : bias[e]);
      scale = std::max(scale, std::fabs(s[e]) + (bias.empty() ? 0.0 : std::fabs(bias[e])));
    }
    const double thr = 1e-5 * scale;
    bool ambiguous = false;
    std::vector<char> allowed(E, 1);
    if (c.groups > 0 && c.topk_groups < c.groups) {
      const int64_t gs = E / c.groups;
      std::vector<double> gscore(c.groups);
      for (int64_t g = 0; g < c.groups; ++g) {
        std::vector<double> v(key.begin() + g * gs, key.begin() + (g + 1) * gs);
        std::sort(v.begin(), v.end(), std::greater<double>());
        gscore[g] = v[0] + (gs >= 2 ? v[1] : 0.0);
      }
      gorder.resize(c.groups);
      std::iota(gorder.begin(), gorder.end(), 0);
      std::stable_sort(gorder.begin(), gorder.end(), [&](int a, int b) { return gscore[a] > gscore[b]; });
      const double gap = gscore[gorder[c.topk_groups - 1]] - gscore[gorder[c.topk_groups]];
      ambiguous |= gap > 0 && gap < 4 * thr;
      std::fill(allowed.begin(), allowed.end(), 0);
      for (int64_t i = 0; i < c.topk_groups; ++i)
        for (int64_t e = gorder[i] * gs; e < (gorder[i] + 1) * gs; ++e) allowed[e] = 1;
    }
    int n = 0;
    for (int64_t e = 0; e < E; ++e)
      if (allowed[e]) order[n++] = static_cast<int>(e);
    std::stable_sort(order.begin(), order.begin() + n, [&](int a, int b) { return key[a] > key[b]; });
    for (int64_t j = 0; j < std::min<int64_t>(k, n - 1); ++j) {
      const double gap = key[order[j]] - key[order[j + 1]];
      ambiguous |= gap > 0 && gap < thr;
    }
    r.ambiguous_rows += ambiguous;
    double wsum = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t dev = dev_idx[t * k + j];
      pre[t * k + j] = (ambiguous && dev >= 0 && dev < E) ? dev : order[j];
      wsum += s[pre[t * k + j]];
    }
    for (int64_t j = 0; j < k; ++j) pre_w[t * k + j] = s[pre[t * k + j]] / (renormalize ? wsum : 1.0);
  }
  // Capacity in (token, slot) order; the aux loss from the pre-drop counts.
  std::vector<int64_t> seen(E, 0);
  for (int64_t i = 0; i < T * k; ++i) {
    const int32_t e = pre[i];
    const int64_t pos = seen[e]++;
    if (capacity > 0 && pos >= capacity) continue;
    r.idx[i] = e, r.positions[i] = static_cast<int32_t>(pos), r.weights[i] = pre_w[i];
    ++r.tokens_per_expert[e];
  }
  for (int64_t e = 0; e < E; ++e) r.aux += static_cast<double>(seen[e]) * p_sum[e];
  r.aux *= static_cast<double>(E) / (static_cast<double>(T) * T * k);
  r.z = z / static_cast<double>(T);
  return r;
}

template <class Elem>
int run_case(moe_bench::Bench& bench, const Case& c, const Config& cfg, mk::GatingFloat dtype) {
  const moe_bench::Options& o = bench.options();
  const bool sigmoid = cfg.score == "sigmoid" || (cfg.score == "auto" && c.groups > 0);
  const bool with_bias = cfg.bias >= 0 ? cfg.bias != 0 : sigmoid;
  const int64_t T = c.T, E = c.E, k = c.k;
  const int64_t capacity =
      cfg.capacity_factor > 0 ? std::max<int64_t>(1, static_cast<int64_t>(std::ceil(cfg.capacity_factor * T * k / E - 1e-9)))
                              : 0;

  DeviceBuffer<Elem> logits(T * E);
  moe_bench::fill_uniform(logits.get(), logits.size(), -4.0f, 4.0f, kSeed, bench.stream());
  std::vector<float> bias_h;
  DeviceBuffer<float> bias;
  if (with_bias) {
    bias_h.resize(E);
    for (int64_t e = 0; e < E; ++e) bias_h[e] = moe_bench::uniform_at(kSeed + 1, e, -0.05f, 0.05f);
    bias = DeviceBuffer<float>(E);
    bias.from_host(bias_h);
  }
  DeviceBuffer<float> weights(T * k), aux(1), seq_aux(1), z(1);
  DeviceBuffer<int32_t> idx(T * k), positions(T * k), tpe(E);

  mk::GatingProblem q;
  q.dtype = dtype;
  q.score = sigmoid ? mk::GatingScore::kSigmoid : mk::GatingScore::kSoftmax;
  q.logits = logits.get();
  q.expert_bias = with_bias ? bias.get() : nullptr;
  q.num_tokens = T, q.num_experts = E, q.k = k;
  q.renormalize = true;
  q.num_groups = c.groups, q.topk_groups = c.topk_groups;
  q.tile_rows = cfg.tile_rows, q.route_warps = static_cast<int>(cfg.warps);
  DeviceBuffer<uint8_t> ws(mk::gating_forward_workspace_bytes(q));
  mk::GatingForwardParams p;
  p.problem = q;
  p.capacity = capacity;
  p.weights = weights.get(), p.idx = idx.get(), p.positions = positions.get(), p.tokens_per_expert = tpe.get();
  p.aux_loss = aux.get(), p.seq_aux_loss = seq_aux.get(), p.z_loss = z.get();
  p.workspace = ws.get();

  const moe_bench::Timing t = bench.time([&] { mk::gating_forward(p, bench.stream()); });
  int64_t wrong = -1;
  if (o.check) {
    MOE_CUDA_CHECK(cudaStreamSynchronize(bench.stream()));
    std::vector<double> l(T * E);
    for (int64_t i = 0; i < T * E; ++i)
      l[i] = moe_bench::to_float(moe_bench::from_float<Elem>(moe_bench::uniform_at(kSeed, i, -4.0f, 4.0f)));
    std::vector<double> b(bias_h.begin(), bias_h.end());
    const std::vector<int32_t> dev_idx = idx.to_host();
    const HostResult r = reference(l, b, c, sigmoid, true, capacity, dev_idx);
    wrong = 0;
    for (size_t i = 0; i < dev_idx.size(); ++i) wrong += dev_idx[i] != r.idx[i];
    const std::vector<int32_t> dev_pos = positions.to_host(), dev_tpe = tpe.to_host();
    for (size_t i = 0; i < dev_pos.size(); ++i) wrong += dev_pos[i] != r.positions[i];
    for (size_t i = 0; i < dev_tpe.size(); ++i) wrong += dev_tpe[i] != r.tokens_per_expert[i];
    wrong += moe_bench::count_wrong(weights.to_host(), r.weights, 1e-7, 1e-5);
    wrong += moe_bench::count_wrong(aux.to_host(), std::vector<double>{r.aux}, 1e-7, 1e-4);
    wrong += moe_bench::count_wrong(z.to_host(), std::vector<double>{r.z}, 1e-7, 1e-4);
  }
  const double esize = static_cast<double>(sizeof(Elem));
  const double bytes = T * E * esize + T * k * 12.0 + E * (with_bias ? 8.0 : 4.0);
  std::string shape = "T=" + std::to_string(T) + " E=" + std::to_string(E) + " k=" + std::to_string(k);
  if (c.groups > 0) shape += " g=" + std::to_string(c.groups) + "/" + std::to_string(c.topk_groups);
  shape += sigmoid ? " sig" : " smax";
  if (cfg.tile_rows > 0 || cfg.warps > 0)
    shape += " rows=" + std::to_string(cfg.tile_rows) + " warps=" + std::to_string(cfg.warps);
  bench.row(shape + " fwd", t, bytes, 0, wrong);

  if (cfg.backward) {
    DeviceBuffer<float> gw(T * k), gscalars(3);
    moe_bench::fill_uniform(gw.get(), gw.size(), -1.0f, 1.0f, kSeed + 2, bench.stream());
    gscalars.from_host({0.01f, 0.0f, 0.001f});
    DeviceBuffer<Elem> grad(T * E);
    DeviceBuffer<uint8_t> bws(mk::gating_backward_workspace_bytes(q));
    mk::GatingBackwardParams bp;
    bp.problem = q;
    bp.grad_weights = gw.get();
    bp.grad_aux_loss = gscalars.get(), bp.grad_seq_aux_loss = gscalars.get() + 1, bp.grad_z_loss = gscalars.get() + 2;
    bp.idx = idx.get();
    bp.grad_logits = grad.get();
    bp.workspace = bws.get();
    const moe_bench::Timing tb = bench.time([&] { mk::gating_backward(bp, bench.stream()); });
    // Reads logits twice (counting pass and gradient pass), grad_weights and idx; writes the gradient.
    const double bbytes = 3 * T * E * esize + T * k * 8.0;
    bench.row(shape + " bwd", tb, bbytes, 0, -1);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  moe_bench::Cli cli("bench_gating", "fused top-k gating: scores, selection, weights, capacity, losses (sizes: tokens)");
  Config cfg;
  int64_t experts = 256, k = 8, groups = 8, topk_groups = 4, backward = 0;
  cli.add_int("-E", "--experts", &experts, "experts of the -b/-e sweep");
  cli.add_int("-k", "--topk", &k, "k of the sweep");
  cli.add_int("-g", "--groups", &groups, "groups of the sweep (0: no group limit)");
  cli.add_int("-G", "--topk_groups", &topk_groups, "groups chosen per token in the sweep");
  cli.add_string("", "--score", &cfg.score, "softmax, sigmoid or auto (sigmoid + bias with groups)");
  cli.add_int("", "--bias", &cfg.bias, "expert bias: 1, 0, or -1 for auto (with sigmoid)");
  cli.add_double("", "--cf", &cfg.capacity_factor, "capacity factor (0: no capacity)");
  cli.add_int("", "--backward", &backward, "also time the backward (1)");
  std::string tile_rows = "0", warps = "0";
  cli.add_string("", "--tile-rows", &tile_rows, "rows per routing tile, a list (8..64, powers of two; 0: default)");
  cli.add_string("", "--warps", &warps, "warps per routing block, a list (1..8; 0: default)");
  const moe_bench::Options opts = cli.parse(argc, argv, /*min=*/0, /*max=*/0);
  cfg.backward = backward != 0;
  return moe_bench::guarded_main([&] {
    moe_bench::Bench bench(opts, cli, moe_bench::Ceiling::kCopy);
    std::vector<Case> cases;
    for (const auto& s : opts.shapes) {
      if (s.size() != 5 && s.size() != 3) throw std::runtime_error("-s wants TxExk or TxExkxGROUPSxTOPK_GROUPS");
      cases.push_back({s[0], s[1], s[2], s.size() == 5 ? s[3] : 0, s.size() == 5 ? s[4] : 0});
    }
    for (int64_t t : opts.sweep()) cases.push_back({t, experts, k, groups, topk_groups});
    if (cases.empty())
      cases = {{16384, 256, 8, 8, 4}, {128, 256, 8, 8, 4}, {16384, 8, 2, 0, 0}, {128, 8, 2, 0, 0}};
    for (const Case& c : cases)
      for (const int64_t rows : moe_bench::parse_list(tile_rows, "--tile-rows"))
        for (const int64_t w : moe_bench::parse_list(warps, "--warps")) {
          Config run = cfg;
          run.tile_rows = rows, run.warps = w;
          switch (opts.dtype) {
            case moe_bench::DType::kF32: run_case<float>(bench, c, run, mk::GatingFloat::kFloat32); break;
            case moe_bench::DType::kBF16: run_case<__nv_bfloat16>(bench, c, run, mk::GatingFloat::kBFloat16); break;
            case moe_bench::DType::kF16: run_case<__half>(bench, c, run, mk::GatingFloat::kFloat16); break;
          }
        }
    return bench.finish();
  });
}
