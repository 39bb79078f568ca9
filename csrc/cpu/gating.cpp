// CPU top-k gating: scores, biased / group-limited top-k selection, weights, capacity drops,
// and the Switch/GShard aux loss, DeepSeek-V3 sequence aux loss and router z-loss; plus the
// backward that recomputes the selection (it is deterministic) instead of saving it.
#include "cpu/cpu_ops.h"
#include "cpu/vec.h"
#include "ops/checks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace moe_ext::cpu {
namespace {

// NOTE: reductions over tokens sum fixed blocks first, then the blocks in order, so the losses
// do not depend on the number of threads. Blocks never straddle a sequence (seq aux loss).
constexpr int64_t kTokenBlock = 128;

// ---- row scores -----------------------------------------------------------------------------
// Sums run over kLanes interleaved partial sums, folded in order: a fixed order (the same bits for
// any thread count and any vector width) that the compiler can vectorise. float32 rows use exp_rn
// in loops cloned for AVX-512 and AVX2 (every clone gives the same bits: -ffp-contract=off).
constexpr int64_t kLanes = 16;

template <typename acc_t>
acc_t fold(const acc_t (&part)[kLanes]) {
  acc_t v = 0;
  for (int64_t i = 0; i < kLanes; ++i) v += part[i];
  return v;
}

// max over the row; NaN never wins (as std::max(m, x) ignores a NaN x), -inf if nothing else.
template <typename acc_t>
acc_t row_max(const acc_t* __restrict__ l, int64_t n) {
  acc_t part[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) part[i] = -std::numeric_limits<acc_t>::infinity();
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes)
    for (int64_t i = 0; i < kLanes; ++i) part[i] = l[e + i] > part[i] ? l[e + i] : part[i];
  for (; e < n; ++e) part[0] = l[e] > part[0] ? l[e] : part[0];
  acc_t m = part[0];
  for (int64_t i = 1; i < kLanes; ++i) m = part[i] > m ? part[i] : m;
  return m;
}

// The row loops below take kLanes columns at a time, the last ones padded with -inf (its terms are
// exp(-inf) = 0 and 1 / (1 + exp(inf)) = 0, which change no sum): column e always adds into
// part[e % kLanes], and a row of fewer than kLanes experts is vectorised too.
template <typename A, typename F>
inline A padded_rows(const A* l, A* out, int64_t n, F&& block) {
  A part[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) block(l + e, out + e, part);
  if (e < n) {
    A lt[kLanes], ot[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) lt[i] = e + i < n ? l[e + i] : -std::numeric_limits<A>::infinity();
    block(lt, ot, part);
    for (int64_t i = 0; e + i < n; ++i) out[e + i] = ot[i];
  }
  return fold(part);
}

// ex[e] = exp(l[e] - m); returns their sum.
template <typename A>
inline A exp_shifted_cols(const A* __restrict__ l, A m, A* __restrict__ ex, int64_t n) {
  return padded_rows(l, ex, n, [m](const A* __restrict__ lb, A* __restrict__ eb, A (&part)[kLanes]) {
    for (int64_t i = 0; i < kLanes; ++i) {
      eb[i] = exp_acc(lb[i] - m);
      part[i] += eb[i];
    }
  });
}

// s[e] = 1 / (1 + exp(-l[e])); returns their sum.
template <typename A>
inline A sigmoid_cols(const A* __restrict__ l, A* __restrict__ s, int64_t n) {
  return padded_rows(l, s, n, [](const A* __restrict__ lb, A* __restrict__ sb, A (&part)[kLanes]) {
    for (int64_t i = 0; i < kLanes; ++i) {
      sb[i] = A(1) / (A(1) + exp_acc(-lb[i]));
      part[i] += sb[i];
    }
  });
}

// float32: cloned for the vector units.
MOE_EXT_VECTOR_CLONES float exp_shifted_f32(const float* l, float m, float* ex, int64_t n) {
  return exp_shifted_cols(l, m, ex, n);
}
MOE_EXT_VECTOR_CLONES float sigmoid_f32(const float* l, float* s, int64_t n) { return sigmoid_cols(l, s, n); }

float exp_shifted(const float* l, float m, float* ex, int64_t n) { return exp_shifted_f32(l, m, ex, n); }
float sigmoid_scores(const float* l, float* s, int64_t n) { return sigmoid_f32(l, s, n); }
double exp_shifted(const double* l, double m, double* ex, int64_t n) { return exp_shifted_cols(l, m, ex, n); }
double sigmoid_scores(const double* l, double* s, int64_t n) { return sigmoid_cols(l, s, n); }

template <typename acc_t>
struct Router {
  int64_t num_experts, k, num_groups, topk_groups;
  ScoreFn fn;
  bool renormalize;
  const acc_t* bias;  // nullptr: no bias

  // Per-thread scratch, sized once.
  std::vector<acc_t> s, ex, key, group_score, top_key;
  std::vector<int64_t> top;
  std::vector<char> group_on;
  acc_t inv_z = 0;  // 1 / sum(ex) of the last row: softmax(l)[e] = ex[e] * inv_z

  Router(int64_t E, int64_t k_, int64_t G, int64_t tg, ScoreFn f, bool renorm, const acc_t* b)
      : num_experts(E), k(k_), num_groups(G), topk_groups(tg), fn(f), renormalize(renorm), bias(b),
        s(E), ex(E), key(E), group_score(G > 0 ? G : 0), top_key(k_), top(k_), group_on(G > 0 ? G : 0) {}

  // Fills s (scores), returns logsumexp of the row; *score_sum receives sum(s). The normalised
  // score of the aux losses is s for softmax and s / sum(s) for sigmoid.
  acc_t scores(const acc_t* l, acc_t* score_sum) {
    const int64_t E = num_experts;
    const acc_t m = row_max(l, E);
    const acc_t z = exp_shifted(l, m, ex.data(), E);
    const acc_t lse = m + std::log(z);
    inv_z = acc_t(1) / z;
    if (fn == ScoreFn::kSoftmax) {
      for (int64_t e = 0; e < E; ++e) s[e] = ex[e] * inv_z;
      *score_sum = 1;
    } else {
      *score_sum = sigmoid_scores(l, s.data(), E);
    }
    return lse;
  }

  // Selects k experts from s (plus bias, within the best groups) into out_idx, best first: larger
  // key first, lower index on ties, NaN ordered as -inf.
  void select(int32_t* out_idx) {
    const int64_t E = num_experts, G = num_groups > 0 ? num_groups : 1, gsize = E / G;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t e = 0; e < E; ++e) {
      const acc_t v = bias ? s[e] + bias[e] : s[e];
      key[e] = v != v ? kNegInf : v;
    }
    if (num_groups > 0) {
      // Group score: the sum of the group's two largest keys (the largest alone for groups of one).
      for (int64_t g = 0; g < num_groups; ++g) {
        acc_t b1 = kNegInf, b2 = kNegInf;
        for (int64_t e = g * gsize; e < (g + 1) * gsize; ++e) {
          const acc_t x = key[e];
          b2 = std::max(b2, std::min(b1, x));
          b1 = std::max(b1, x);
        }
        const acc_t v = gsize >= 2 ? b1 + b2 : b1;  // inf + -inf is NaN: ordered as -inf too
        group_score[g] = v != v ? kNegInf : v;
        group_on[g] = 0;
      }
      for (int64_t i = 0; i < topk_groups; ++i) {  // the best groups, ties to the lower one
        int64_t best = -1;
        for (int64_t g = 0; g < num_groups; ++g)
          if (!group_on[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
        group_on[best] = 1;
      }
    }
    // Top k of the allowed experts by insertion: a candidate goes after every kept one with a key
    // >= its own (the lower index wins ties); most candidates fail the first comparison, with the
    // k-th best so far. k <= the allowed experts (checked).
    int64_t n = 0;
    for (int64_t g = 0; g < G; ++g) {
      if (num_groups > 0 && !group_on[g]) continue;
      for (int64_t e = g * gsize; e < (g + 1) * gsize; ++e) {
        const acc_t x = key[e];
        if (n == k && !(x > top_key[k - 1])) continue;
        int64_t i = n < k ? n++ : k - 1;
        for (; i > 0 && x > top_key[i - 1]; --i) {
          top[i] = top[i - 1];
          top_key[i] = top_key[i - 1];
        }
        top[i] = e;
        top_key[i] = x;
      }
    }
    for (int64_t j = 0; j < k; ++j) out_idx[j] = static_cast<int32_t>(top[j]);
  }
};

struct Layout {
  int64_t T, E, k, seq_len, num_seqs, blocks_per_seq, num_blocks;
  Layout(int64_t T_, int64_t E_, int64_t k_, int64_t seq_len_) : T(T_), E(E_), k(k_) {
    seq_len = seq_len_ > 0 ? seq_len_ : T;
    num_seqs = seq_len > 0 ? T / seq_len : 0;
    blocks_per_seq = (seq_len + kTokenBlock - 1) / kTokenBlock;
    num_blocks = num_seqs * blocks_per_seq;
  }
  int64_t block_begin(int64_t b) const {
    return (b / blocks_per_seq) * seq_len + (b % blocks_per_seq) * kTokenBlock;
  }
  int64_t block_end(int64_t b) const {
    return std::min(block_begin(b) + kTokenBlock, (b / blocks_per_seq + 1) * seq_len);
  }
};

// logits (+ noise) in the accumulation dtype, contiguous.
at::Tensor noisy_logits(const at::Tensor& logits, const c10::optional<at::Tensor>& noise, at::ScalarType acc) {
  at::Tensor l = logits.to(acc).contiguous();
  if (noise.has_value()) l = (l + noise->to(acc)).contiguous();
  return l;
}

c10::optional<at::Tensor> bias_as(const c10::optional<at::Tensor>& bias, at::ScalarType acc) {
  if (!bias.has_value()) return c10::nullopt;
  return bias->to(acc).contiguous();
}

// Selection for every token (pre-drop expert ids) plus, per block, the sums of pnorm and lse^2.
template <typename acc_t>
void route_all(const Layout& L, const acc_t* l, const acc_t* bias, int64_t num_groups, int64_t topk_groups,
               ScoreFn fn, int32_t* sel_idx, acc_t* weights, bool renormalize, double* block_p,
               double* block_lse2) {
  at::parallel_for(0, L.num_blocks, 1, [&](int64_t b0, int64_t b1) {
    Router<acc_t> r(L.E, L.k, num_groups, topk_groups, fn, renormalize, bias);
    for (int64_t b = b0; b < b1; ++b) {
      double* p_acc = block_p ? block_p + b * L.E : nullptr;
      if (p_acc) std::fill(p_acc, p_acc + L.E, 0.0);
      double lse2 = 0;
      for (int64_t t = L.block_begin(b); t < L.block_end(b); ++t) {
        acc_t score_sum;
        const acc_t lse = r.scores(l + t * L.E, &score_sum);
        lse2 += static_cast<double>(lse) * static_cast<double>(lse);
        if (p_acc)
          for (int64_t e = 0; e < L.E; ++e) p_acc[e] += static_cast<double>(r.s[e] / score_sum);
        int32_t* idx_t = sel_idx + t * L.k;
        r.select(idx_t);
        if (weights) {
          acc_t* w = weights + t * L.k;
          acc_t sum = 0;
          for (int64_t j = 0; j < L.k; ++j) {
            w[j] = r.s[idx_t[j]];
            sum += w[j];
          }
          if (renormalize)
            for (int64_t j = 0; j < L.k; ++j) w[j] = w[j] / sum;
        }
      }
      if (block_lse2) block_lse2[b] = lse2;
    }
  });
}

// Pre-drop assignment counts per expert, over all tokens and per sequence ([num_seqs, E]).
void count_routed(const Layout& L, const int32_t* sel_idx, std::vector<int64_t>& routed,
                  std::vector<int64_t>& routed_seq) {
  routed.assign(L.E, 0);
  routed_seq.assign(L.num_seqs * L.E, 0);
  for (int64_t t = 0; t < L.num_seqs * L.seq_len; ++t) {
    int64_t* rs = routed_seq.data() + (t / L.seq_len) * L.E;
    for (int64_t j = 0; j < L.k; ++j) {
      const int32_t e = sel_idx[t * L.k + j];
      ++routed[e];
      ++rs[e];
    }
  }
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gating_impl(
    const at::Tensor& logits, int64_t k, ScoreFn fn, bool renormalize, const c10::optional<at::Tensor>& bias_in,
    int64_t num_groups, int64_t topk_groups, double capacity_factor, const c10::optional<at::Tensor>& noise,
    int64_t seq_len) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = logits.size(0), E = logits.size(1);
  const Layout L(T, E, k, seq_len);
  const at::Tensor l = noisy_logits(logits, noise, acc);
  const c10::optional<at::Tensor> bias = bias_as(bias_in, acc);
  auto opts = logits.options();
  at::Tensor weights = at::empty({T, k}, opts.dtype(acc));
  at::Tensor idx = at::empty({T, k}, opts.dtype(at::kInt));
  at::Tensor positions = at::empty({T, k}, opts.dtype(at::kInt));
  at::Tensor tokens_per_expert = at::zeros({E}, opts.dtype(at::kInt));

  std::vector<double> block_p(L.num_blocks * E), block_lse2(L.num_blocks);
  route_all<acc_t>(L, l.data_ptr<acc_t>(), bias ? bias->data_ptr<acc_t>() : nullptr, num_groups, topk_groups,
                   fn, idx.data_ptr<int32_t>(), weights.data_ptr<acc_t>(), renormalize, block_p.data(),
                   block_lse2.data());

  std::vector<int64_t> routed, routed_seq;
  count_routed(L, idx.data_ptr<int32_t>(), routed, routed_seq);

  // Capacity: each expert keeps its first `capacity` assignments in (token, slot) order.
  const int64_t capacity = gating_capacity(capacity_factor, T, k, E);
  {
    int32_t* ip = idx.data_ptr<int32_t>();
    int32_t* pp = positions.data_ptr<int32_t>();
    acc_t* wp = weights.data_ptr<acc_t>();
    int32_t* kept = tokens_per_expert.data_ptr<int32_t>();
    std::vector<int64_t> seen(E, 0);
    for (int64_t i = 0; i < T * k; ++i) {
      const int32_t e = ip[i];
      const int64_t pos = seen[e]++;
      if (capacity > 0 && pos >= capacity) {
        ip[i] = -1;
        pp[i] = -1;
        wp[i] = 0;
      } else {
        pp[i] = static_cast<int32_t>(pos);
        ++kept[e];
      }
    }
  }

  // Losses from the block sums, reduced in block order.
  double aux = 0, seq_aux = 0, z = 0;
  if (T > 0) {
    std::vector<double> p_total(E, 0.0), p_seq(E);
    for (int64_t b = 0; b < L.num_blocks; ++b) {
      for (int64_t e = 0; e < E; ++e) p_total[e] += block_p[b * E + e];
      z += block_lse2[b];
    }
    z /= static_cast<double>(T);
    for (int64_t e = 0; e < E; ++e)
      aux += static_cast<double>(routed[e]) / static_cast<double>(T * k) * (p_total[e] / static_cast<double>(T));
    aux *= static_cast<double>(E);
    if (seq_len > 0) {
      for (int64_t s = 0; s < L.num_seqs; ++s) {
        std::fill(p_seq.begin(), p_seq.end(), 0.0);
        for (int64_t b = s * L.blocks_per_seq; b < (s + 1) * L.blocks_per_seq; ++b)
          for (int64_t e = 0; e < E; ++e) p_seq[e] += block_p[b * E + e];
        double term = 0;
        for (int64_t e = 0; e < E; ++e)
          term += static_cast<double>(routed_seq[s * E + e]) / static_cast<double>(seq_len * k) *
                  (p_seq[e] / static_cast<double>(seq_len));
        seq_aux += static_cast<double>(E) * term;
      }
      seq_aux /= static_cast<double>(L.num_seqs);
    }
  }
  auto scalar = [&](double v) { return at::scalar_tensor(v, opts.dtype(acc)); };
  return {weights, idx, positions, tokens_per_expert, scalar(aux), scalar(seq_aux), scalar(z)};
}

template <typename acc_t>
at::Tensor gating_backward_impl(const at::Tensor& grad_weights, double g_aux, double g_seq, double g_z,
                                const at::Tensor& logits, const c10::optional<at::Tensor>& noise,
                                const at::Tensor& idx_kept, ScoreFn fn, bool renormalize,
                                const c10::optional<at::Tensor>& bias_in, int64_t num_groups, int64_t topk_groups,
                                int64_t seq_len) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = logits.size(0), E = logits.size(1), k = idx_kept.size(1);
  const Layout L(T, E, k, seq_len);
  const at::Tensor l = noisy_logits(logits, noise, acc);
  const c10::optional<at::Tensor> bias = bias_as(bias_in, acc);
  const at::Tensor gw = grad_weights.to(acc).contiguous();
  const at::Tensor kept = idx_kept.to(at::kInt).contiguous();
  at::Tensor grad = at::empty({T, E}, logits.options().dtype(acc));
  if (T == 0) return grad.to(logits.scalar_type());

  // Pass 1: the pre-drop selection, for the renormalisation sets and the aux-loss counts.
  std::vector<int32_t> sel(T * k);
  route_all<acc_t>(L, l.data_ptr<acc_t>(), bias ? bias->data_ptr<acc_t>() : nullptr, num_groups, topk_groups,
                   fn, sel.data(), nullptr, renormalize, nullptr, nullptr);
  std::vector<int64_t> routed, routed_seq;
  count_routed(L, sel.data(), routed, routed_seq);

  // d loss / d pnorm[t, e] is the same for every token of a sequence.
  const double aux_scale = g_aux * static_cast<double>(E) / (static_cast<double>(T) * T * k);
  const double seq_scale = seq_len > 0 ? g_seq * static_cast<double>(E) /
                                             (static_cast<double>(seq_len) * seq_len * k * L.num_seqs)
                                       : 0.0;
  const double z_scale = 2.0 * g_z / static_cast<double>(T);
  const acc_t* lp = l.data_ptr<acc_t>();
  const acc_t* bp = bias ? bias->data_ptr<acc_t>() : nullptr;
  const acc_t* gwp = gw.data_ptr<acc_t>();
  const int32_t* kp = kept.data_ptr<int32_t>();
  acc_t* gp = grad.data_ptr<acc_t>();

  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    Router<acc_t> r(E, k, num_groups, topk_groups, fn, renormalize, bp);
    std::vector<acc_t> g_s(E), g_pn(E);
    for (int64_t t = t0; t < t1; ++t) {
      acc_t score_sum;
      const acc_t lse = r.scores(lp + t * E, &score_sum);
      const int64_t* rs = routed_seq.data() + (seq_len > 0 ? (t / seq_len) * E : 0);
      for (int64_t e = 0; e < E; ++e) {
        g_s[e] = 0;
        g_pn[e] = static_cast<acc_t>(aux_scale * routed[e] + (seq_len > 0 ? seq_scale * rs[e] : 0.0));
      }
      // Through the weights: w_j = s_j (/ S with S over the k pre-drop choices); a dropped slot's
      // weight is the constant 0.
      const int32_t* st = sel.data() + t * k;
      if (renormalize) {
        acc_t S = 0;
        for (int64_t j = 0; j < k; ++j) S += r.s[st[j]];
        acc_t dot = 0;
        for (int64_t j = 0; j < k; ++j)
          if (kp[t * k + j] >= 0) dot += gwp[t * k + j] * (r.s[st[j]] / S);
        for (int64_t j = 0; j < k; ++j)
          g_s[st[j]] += ((kp[t * k + j] >= 0 ? gwp[t * k + j] : acc_t(0)) - dot) / S;
      } else {
        for (int64_t j = 0; j < k; ++j)
          if (kp[t * k + j] >= 0) g_s[st[j]] += gwp[t * k + j];
      }
      acc_t* g = gp + t * E;
      if (fn == ScoreFn::kSoftmax) {
        acc_t dot = 0;
        for (int64_t e = 0; e < E; ++e) dot += (g_s[e] + g_pn[e]) * r.s[e];
        for (int64_t e = 0; e < E; ++e) g[e] = r.s[e] * (g_s[e] + g_pn[e] - dot);
      } else {
        // pnorm = s / sum(s); s = sigmoid(l).
        acc_t dot = 0;
        for (int64_t e = 0; e < E; ++e) dot += g_pn[e] * (r.s[e] / score_sum);
        for (int64_t e = 0; e < E; ++e) {
          const acc_t gs = g_s[e] + (g_pn[e] - dot) / score_sum;
          g[e] = gs * r.s[e] * (acc_t(1) - r.s[e]);
        }
      }
      if (g_z != 0) {
        const acc_t zs = static_cast<acc_t>(z_scale) * lse;
        for (int64_t e = 0; e < E; ++e) g[e] += zs * (r.ex[e] * r.inv_z);  // zs * softmax(l)
      }
    }
  });
  return grad.to(logits.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_gating(
    const at::Tensor& logits, int64_t k, const std::string& score, bool renormalize,
    const c10::optional<at::Tensor>& expert_bias, int64_t num_groups, int64_t topk_groups,
    double capacity_factor, const c10::optional<at::Tensor>& noise, int64_t seq_len) {
  const ScoreFn fn = parse_score(score);
  if (logits.scalar_type() == at::kDouble)
    return gating_impl<double>(logits, k, fn, renormalize, expert_bias, num_groups, topk_groups, capacity_factor,
                               noise, seq_len);
  return gating_impl<float>(logits, k, fn, renormalize, expert_bias, num_groups, topk_groups, capacity_factor,
                            noise, seq_len);
}

at::Tensor topk_gating_backward(const at::Tensor& grad_weights, const at::Tensor& grad_aux_loss,
                                const at::Tensor& grad_seq_aux_loss, const at::Tensor& grad_z_loss,
                                const at::Tensor& logits, const c10::optional<at::Tensor>& noise,
                                const at::Tensor& idx, const std::string& score, bool renormalize,
                                const c10::optional<at::Tensor>& expert_bias, int64_t num_groups,
                                int64_t topk_groups, int64_t seq_len) {
  const ScoreFn fn = parse_score(score);
  const double ga = grad_aux_loss.item<double>(), gs = grad_seq_aux_loss.item<double>(),
               gz = grad_z_loss.item<double>();
  if (logits.scalar_type() == at::kDouble)
    return gating_backward_impl<double>(grad_weights, ga, gs, gz, logits, noise, idx, fn, renormalize, expert_bias,
                                        num_groups, topk_groups, seq_len);
  return gating_backward_impl<float>(grad_weights, ga, gs, gz, logits, noise, idx, fn, renormalize, expert_bias,
                                     num_groups, topk_groups, seq_len);
}

void update_expert_bias(at::Tensor& expert_bias, const at::Tensor& tokens_per_expert, double rate) {
  const int64_t E = expert_bias.numel();
  const auto load = tokens_per_expert.contiguous();
  const int64_t* l = load.data_ptr<int64_t>();
  float* b = expert_bias.data_ptr<float>();
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) total += l[e];
  const float r = static_cast<float>(rate);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t d = total - E * l[e];  // E * (mean - load[e]), exact
    const float sign = d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f);
    b[e] = b[e] + r * sign;  // r * sign is exact: no contraction can change the sum
  }
}

void accumulate_load(at::Tensor& load, at::Tensor& load_ema, const at::Tensor& tokens_per_expert, double decay) {
  const int64_t E = load.numel();
  const auto tpe = tokens_per_expert.contiguous();
  const int32_t* t = tpe.data_ptr<int32_t>();
  int64_t* l = load.data_ptr<int64_t>();
  double* m = load_ema.data_ptr<double>();
  const double w = 1.0 - decay;
  // NOTE: built with -ffp-contract=off: each product and the sum are rounded, as in the CUDA kernel.
  for (int64_t e = 0; e < E; ++e) {
    l[e] += t[e];
    m[e] = m[e] * decay + static_cast<double>(t[e]) * w;
  }
  m[E] = m[E] * decay + w;
}

}  // namespace moe_ext::cpu
