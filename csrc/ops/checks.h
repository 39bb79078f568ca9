// Argument checks and output-shape rules shared by the CPU, CUDA and Meta implementations.
// Every message names the argument it is about. Checks here look only at metadata (dtype,
// shape, device), never at tensor values, so they cost nothing on the device path.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <limits>
#include <string>

namespace moe_ext {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_index_dtype(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "moe_ext: ", b_name, " must be on the same device as ",
              a_name, " (", a_name, " is on ", a.device(), ", ", b_name, " on ", b.device(), ")");
}

// The accumulation type of every op: float64 stays float64 (so gradcheck works), every other float
// type computes in float32 (gating scores and weights, unpermute's sums and weights, GEMM
// accumulators, SwiGLU).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

enum class ScoreFn { kSoftmax, kSigmoid };

inline ScoreFn parse_score(const std::string& score) {
  if (score == "softmax") return ScoreFn::kSoftmax;
  if (score == "sigmoid") return ScoreFn::kSigmoid;
  TORCH_CHECK(false, "moe_ext.topk_gating: score must be 'softmax' or 'sigmoid', got '", score, "'");
}

// topk_gating(logits[T,E], k, ...). num_groups == 0, capacity_factor <= 0 and seq_len == 0 mean "off".
inline void check_topk_gating(const at::Tensor& logits, int64_t k, const std::string& score,
                              const c10::optional<at::Tensor>& expert_bias, int64_t num_groups,
                              int64_t topk_groups, double capacity_factor,
                              const c10::optional<at::Tensor>& noise, int64_t seq_len) {
  TORCH_CHECK(logits.dim() == 2, "moe_ext.topk_gating: logits must be 2-D [num_tokens, num_experts], got ",
              logits.dim(), "-D");
  TORCH_CHECK(is_float_dtype(logits.scalar_type()),
              "moe_ext.topk_gating: logits must be float32, float64, float16 or bfloat16, got ",
              logits.scalar_type());
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts >= 1, "moe_ext.topk_gating: logits must have at least one expert column");
  TORCH_CHECK(k >= 1 && k <= num_experts, "moe_ext.topk_gating: k must be in [1, num_experts=",
              num_experts, "], got k=", k);
  parse_score(score);
  if (expert_bias.has_value()) {
    const auto& b = *expert_bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == num_experts,
                "moe_ext.topk_gating: expert_bias must have shape [num_experts=", num_experts, "], got ",
                b.sizes());
    TORCH_CHECK(b.scalar_type() == at::kFloat || b.scalar_type() == at::kDouble,
                "moe_ext.topk_gating: expert_bias must be float32 or float64, got ", b.scalar_type());
    check_same_device(logits, "logits", b, "expert_bias");
  }
  if (num_groups != 0) {
    TORCH_CHECK(num_groups >= 1 && num_experts % num_groups == 0,
                "moe_ext.topk_gating: num_groups must be a positive divisor of num_experts=", num_experts,
                ", got ", num_groups);
    TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups,
                "moe_ext.topk_gating: topk_groups must be in [1, num_groups=", num_groups, "], got ",
                topk_groups);
    TORCH_CHECK(k <= topk_groups * (num_experts / num_groups),
                "moe_ext.topk_gating: k=", k, " exceeds the experts allowed by topk_groups (",
                topk_groups, " groups of ", num_experts / num_groups, ")");
  } else {
    TORCH_CHECK(topk_groups == 0, "moe_ext.topk_gating: topk_groups needs num_groups");
  }
  TORCH_CHECK(capacity_factor == capacity_factor, "moe_ext.topk_gating: capacity_factor is NaN");
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == logits.sizes(), "moe_ext.topk_gating: noise must have the shape of logits ",
                logits.sizes(), ", got ", noise->sizes());
    TORCH_CHECK(is_float_dtype(noise->scalar_type()), "moe_ext.topk_gating: noise must be a float tensor, got ",
                noise->scalar_type());
    check_same_device(logits, "logits", *noise, "noise");
  }
  TORCH_CHECK(seq_len >= 0, "moe_ext.topk_gating: seq_len must be positive, got ", seq_len);
  if (seq_len > 0) {
    TORCH_CHECK(logits.size(0) % seq_len == 0, "moe_ext.topk_gating: num_tokens=", logits.size(0),
                " is not a multiple of seq_len=", seq_len);
  }
}

// capacity = ceil(capacity_factor * T * k / E); 0 means "no capacity".
inline int64_t gating_capacity(double capacity_factor, int64_t num_tokens, int64_t k, int64_t num_experts) {
  if (!(capacity_factor > 0)) return 0;
  const double c = capacity_factor * static_cast<double>(num_tokens) * static_cast<double>(k) /
                   static_cast<double>(num_experts);
  // A capacity of T * k or more never drops a slot (an expert gets at most T); clamping before
  // the cast keeps a huge or infinite capacity_factor from an out-of-range (undefined) conversion.
  const int64_t slots = num_tokens * k;
  if (!(c < static_cast<double>(slots))) return slots < 1 ? 1 : slots;
  // NOTE: a tiny slack keeps exact products (1.0 * 8 * 2 / 8 = 2) from rounding up to 3.
  const int64_t cap = static_cast<int64_t>(std::ceil(c - 1e-9));
  return cap < 1 ? 1 : cap;
}

// update_expert_bias_: expert_bias [E] float32 (updated in place), tokens_per_expert [E] int64.
inline void check_update_expert_bias(const at::Tensor& expert_bias, const at::Tensor& tokens_per_expert) {
  TORCH_CHECK(expert_bias.dim() == 1 && expert_bias.numel() >= 1,
              "moe_ext.update_expert_bias: expert_bias must be [E] with E >= 1, got shape ", expert_bias.sizes());
  TORCH_CHECK(expert_bias.scalar_type() == at::kFloat && expert_bias.is_contiguous(),
              "moe_ext.update_expert_bias: expert_bias must be a contiguous float32 tensor, got ",
              expert_bias.scalar_type());
  TORCH_CHECK(tokens_per_expert.sizes() == expert_bias.sizes(),
              "moe_ext.update_expert_bias: tokens_per_expert must be [E] like expert_bias ", expert_bias.sizes(),
              ", got ", tokens_per_expert.sizes());
  TORCH_CHECK(tokens_per_expert.scalar_type() == at::kLong,
              "moe_ext.update_expert_bias: tokens_per_expert must be int64, got ", tokens_per_expert.scalar_type());
  TORCH_CHECK(tokens_per_expert.device() == expert_bias.device(),
              "moe_ext.update_expert_bias: tokens_per_expert must be on expert_bias's device ", expert_bias.device(),
              ", got ", tokens_per_expert.device());
}

// route_to_replicas: idx [...] int32/int64 logical expert ids (-1 = not routed), replica_counts
// [E] int64, replica_slots [E, C] int64, all on one device; 0 <= rank < 2^31.
inline void check_route_to_replicas(const at::Tensor& idx, const at::Tensor& counts, const at::Tensor& slots,
                                    int64_t rank) {
  const char* op = "moe_ext.route_to_replicas";
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op,
              ": idx must be int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK(counts.dim() == 1 && counts.numel() >= 1 && counts.scalar_type() == at::kLong, op,
              ": replica_counts must be an int64 [E] tensor with E >= 1, got ", counts.scalar_type(), " of shape ",
              counts.sizes());
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == counts.numel() && slots.size(1) >= 1 &&
                  slots.scalar_type() == at::kLong,
              op, ": replica_slots must be an int64 [E = ", counts.numel(), ", C >= 1] tensor, got ",
              slots.scalar_type(), " of shape ", slots.sizes());
  check_same_device(idx, "idx", counts, "replica_counts");
  check_same_device(idx, "idx", slots, "replica_slots");
  // (a process rank: bounded so that n + rank, the rotation, cannot overflow)
  TORCH_CHECK(rank >= 0 && rank <= std::numeric_limits<int32_t>::max(), op, ": rank must be in [0, 2^31), got ", rank);
}

// accumulate_load_: load [E] int64 and load_ema [E + 1] float64 (both contiguous, updated in place),
// tokens_per_expert [E] int32, all on one device; decay in [0, 1].
inline void check_accumulate_load(const at::Tensor& load, const at::Tensor& load_ema,
                                  const at::Tensor& tokens_per_expert, double decay) {
  const char* op = "moe_ext.accumulate_load_";
  TORCH_CHECK(load.dim() == 1 && load.numel() >= 1 && load.scalar_type() == at::kLong && load.is_contiguous(), op,
              ": load must be a contiguous int64 [E] tensor with E >= 1, got ", load.scalar_type(), " of shape ",
              load.sizes());
  const int64_t E = load.numel();
  TORCH_CHECK(load_ema.dim() == 1 && load_ema.numel() == E + 1 && load_ema.scalar_type() == at::kDouble &&
                  load_ema.is_contiguous(),
              op, ": load_ema must be a contiguous float64 [E + 1 = ", E + 1, "] tensor, got ", load_ema.scalar_type(),
              " of shape ", load_ema.sizes());
  TORCH_CHECK(tokens_per_expert.dim() == 1 && tokens_per_expert.numel() == E &&
                  tokens_per_expert.scalar_type() == at::kInt,
              op, ": tokens_per_expert must be an int32 [E = ", E, "] tensor, got ", tokens_per_expert.scalar_type(),
              " of shape ", tokens_per_expert.sizes());
  check_same_device(load, "load", load_ema, "load_ema");
  check_same_device(load, "load", tokens_per_expert, "tokens_per_expert");
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, op, ": decay must be in [0, 1], got ", decay);
}

inline void check_topk_gating_backward(const at::Tensor& grad_weights, const at::Tensor& grad_aux,
                                       const at::Tensor& grad_seq_aux, const at::Tensor& grad_z,
                                       const at::Tensor& logits, const c10::optional<at::Tensor>& noise,
                                       const at::Tensor& idx, const std::string& score,
                                       const c10::optional<at::Tensor>& expert_bias, int64_t num_groups,
                                       int64_t topk_groups, int64_t seq_len) {
  const char* op = "moe_ext.topk_gating_backward";
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == logits.size(0), op, ": idx must be [num_tokens, k]");
  check_topk_gating(logits, idx.size(1), score, expert_bias, num_groups, topk_groups, 0.0, noise, seq_len);
  TORCH_CHECK(grad_weights.sizes() == idx.sizes(), op, ": grad_weights must have the shape of idx ", idx.sizes(),
              ", got ", grad_weights.sizes());
  for (const at::Tensor* g : {&grad_aux, &grad_seq_aux, &grad_z})
    TORCH_CHECK(g->numel() == 1, op, ": loss gradients must be scalars, got shape ", g->sizes());
  TORCH_CHECK(is_index_dtype(idx.scalar_type()), op, ": idx must be int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK(is_float_dtype(grad_weights.scalar_type()), op, ": grad_weights must be a float tensor, got ",
              grad_weights.scalar_type());
  check_same_device(logits, "logits", idx, "idx");
  check_same_device(logits, "logits", grad_weights, "grad_weights");
}

// idx[T,k] with expert ids in [-1, E): shared by permute and dispatch.
inline void check_routing_idx(const char* op, const at::Tensor& idx, int64_t num_tokens) {
  TORCH_CHECK(idx.dim() == 2, op, ": idx must be 2-D [num_tokens, k], got ", idx.dim(), "-D");
  TORCH_CHECK(is_index_dtype(idx.scalar_type()), op, ": idx must be int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.size(0) == num_tokens, op, ": idx has ", idx.size(0), " rows but x has ", num_tokens,
              " tokens");
  TORCH_CHECK(idx.size(1) >= 1, op, ": idx must have at least one column (k >= 1)");
}

inline void check_rows_tensor(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D [rows, hidden], got ", x.dim(), "-D");
  // NOTE: a tensor without elements is never read, whatever its strides: autograd hands an empty
  // x_perm's gradient over as an expanded zero (stride 0), which .contiguous() leaves as it is
  // (numel 0 counts as contiguous), so permute's backward with T = 0 used to fail here.
  TORCH_CHECK(x.numel() == 0 || x.stride(1) == 1, op, ": ", name,
              " must have a contiguous last dimension (stride 1), got stride ", x.stride(1));
}

// Worst-case rows of permute's output: every routed slot kept, and every non-empty expert padded.
inline int64_t permute_max_rows(int64_t num_tokens, int64_t k, int64_t num_experts, int64_t pad_to,
                                int64_t capacity) {
  int64_t n = num_tokens * k;
  // NOTE: capacity -1 is "none"; 0 is a real capacity (every slot dropped, 0 rows). `> 0` here made
  // the eager ops return T*k + ... rows for capacity 0 while the fake kernel (moe_ext/_ops.py)
  // says 0, a shape mismatch under torch.compile / opcheck. capacity * num_experts < n is tested
  // as capacity < ceil(n / num_experts): the product may overflow for a huge capacity.
  if (capacity >= 0 && capacity < n / num_experts + (n % num_experts != 0)) n = capacity * num_experts;
  const int64_t nonempty = n < num_experts ? n : num_experts;
  return n + nonempty * (pad_to - 1);
}

inline void check_permute(const at::Tensor& x, const at::Tensor& idx, int64_t num_experts, int64_t pad_to,
                          int64_t capacity, int64_t max_rows) {
  check_rows_tensor("moe_ext.permute", x, "x");
  check_routing_idx("moe_ext.permute", idx, x.size(0));
  check_same_device(x, "x", idx, "idx");
  TORCH_CHECK(num_experts >= 1, "moe_ext.permute: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(pad_to >= 1, "moe_ext.permute: pad_to must be >= 1, got ", pad_to);
  // tokens_per_expert (int32) holds an expert's padded rows, at most T * k + pad_to - 1.
  TORCH_CHECK(idx.numel() <= std::numeric_limits<int32_t>::max() - (pad_to - 1),
              "moe_ext.permute: num_tokens * k + pad_to - 1 must be < 2^31 (tokens_per_expert is int32), got "
              "num_tokens * k = ", idx.numel(), " and pad_to = ", pad_to);
  TORCH_CHECK(capacity >= -1, "moe_ext.permute: capacity must be None or >= 0, got ", capacity);
  TORCH_CHECK(max_rows == -1 || max_rows >= 1, "moe_ext.permute: max_rows must be None or >= 1, got ", max_rows);
  TORCH_CHECK(max_rows == -1 || pad_to == 1, "moe_ext.permute: the masked layout (max_rows) takes no pad_to, got pad_to=",
              pad_to);
  TORCH_CHECK(max_rows == -1 || num_experts <= std::numeric_limits<int64_t>::max() / max_rows,
              "moe_ext.permute: num_experts * max_rows overflows int64 (num_experts=", num_experts,
              ", max_rows=", max_rows, ")");
}

inline void check_unpermute(const at::Tensor& y, const at::Tensor& row_map, const c10::optional<at::Tensor>& w) {
  check_rows_tensor("moe_ext.unpermute", y, "y_perm");
  TORCH_CHECK(is_float_dtype(y.scalar_type()), "moe_ext.unpermute: y_perm must be a float tensor, got ",
              y.scalar_type());
  TORCH_CHECK(row_map.dim() == 2, "moe_ext.unpermute: row_map must be 2-D [num_tokens, k], got ",
              row_map.dim(), "-D");
  TORCH_CHECK(row_map.scalar_type() == at::kLong, "moe_ext.unpermute: row_map must be int64, got ",
              row_map.scalar_type());
  check_same_device(y, "y_perm", row_map, "row_map");
  if (w.has_value()) {
    TORCH_CHECK(w->sizes() == row_map.sizes(), "moe_ext.unpermute: weights must have the shape of row_map ",
                row_map.sizes(), ", got ", w->sizes());
    TORCH_CHECK(w->scalar_type() == at::kFloat || w->scalar_type() == y.scalar_type(),
                "moe_ext.unpermute: weights must be float32 or the dtype of y_perm (", y.scalar_type(),
                "), got ", w->scalar_type());
    check_same_device(y, "y_perm", *w, "weights");
  }
}

inline void check_unpermute_backward(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& row_map,
                                     const c10::optional<at::Tensor>& w) {
  check_unpermute(y, row_map, w);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == row_map.size(0) && grad_out.size(1) == y.size(1),
              "moe_ext.unpermute_backward: grad_out must be [num_tokens=", row_map.size(0), ", hidden=", y.size(1),
              "], got ", grad_out.sizes());
  check_same_device(y, "y_perm", grad_out, "grad_out");
}

// h = [gate | up] [rows, 2n]: a float tensor.
inline void check_swiglu_h(const at::Tensor& h, const char* op) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, op, ": h must be 2-D [rows, 2n], got ", h.sizes());
  TORCH_CHECK(is_float_dtype(h.scalar_type()), op, ": h must be float32, float64, float16 or bfloat16, got ",
              h.scalar_type());
}

inline void check_swiglu(const at::Tensor& h) { check_swiglu_h(h, "moe_ext.swiglu"); }

// grad [rows, n] for h [rows, 2n]: float tensors on one device.
inline void check_swiglu_backward(const at::Tensor& grad, const at::Tensor& h) {
  check_swiglu_h(h, "moe_ext.swiglu_backward");
  TORCH_CHECK(is_float_dtype(grad.scalar_type()), "moe_ext.swiglu_backward: grad must be a float tensor, got ",
              grad.scalar_type());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == h.size(0) && grad.size(1) == h.size(1) / 2,
              "moe_ext.swiglu_backward: grad must be [rows=", h.size(0), ", n=", h.size(1) / 2, "], got ", grad.sizes());
  check_same_device(h, "h", grad, "grad");
}

enum class Activation { kNone, kSwiglu };

inline Activation parse_activation(const std::string& activation) {
  if (activation == "none") return Activation::kNone;
  if (activation == "swiglu") return Activation::kSwiglu;
  TORCH_CHECK(false, "moe_ext.grouped_gemm: activation must be None or 'swiglu', got '", activation, "'");
}

// group sizes: [E] counts, or [E+1] offsets starting at 0. Values are checked by the CPU op only.
inline void check_group_sizes(const char* op, const at::Tensor& sizes, int64_t num_groups) {
  TORCH_CHECK(sizes.dim() == 1, op, ": tokens_per_expert must be 1-D ([E] counts or [E+1] offsets), got ",
              sizes.dim(), "-D");
  TORCH_CHECK(is_index_dtype(sizes.scalar_type()), op, ": tokens_per_expert must be int32 or int64, got ",
              sizes.scalar_type());
  TORCH_CHECK(sizes.size(0) == num_groups || sizes.size(0) == num_groups + 1, op,
              ": tokens_per_expert must have E=", num_groups, " counts or E+1=", num_groups + 1,
              " offsets, got ", sizes.size(0));
}

// The optional epilogue inputs of grouped_gemm / grouped_gemm_masked: bias [E, N] in the dtype of
// a (N: b's output width before the activation), added before it; row_scale, one float per output
// row (shape `rows`: [M], or [E, max_rows] for the masked layout), multiplied after it.
inline void check_gemm_epilogue(const char* op, const at::Tensor& a, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& row_scale, int64_t num_experts, int64_t n,
                                at::IntArrayRef rows) {
  if (bias.has_value()) {
    const at::Tensor& t = *bias;
    TORCH_CHECK(t.dim() == 2 && t.size(0) == num_experts && t.size(1) == n, op, ": bias must be [E=", num_experts,
                ", N=", n, "] (N before the activation), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == a.scalar_type(), op, ": bias must have the dtype of a (", a.scalar_type(),
                "), got ", t.scalar_type());
    check_same_device(a, "a", t, "bias");
  }
  if (row_scale.has_value()) {
    const at::Tensor& t = *row_scale;
    TORCH_CHECK(t.sizes() == rows, op, ": row_scale must have one value per output row, shape ", rows, ", got ",
                t.sizes());
    TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": row_scale must be a float tensor, got ", t.scalar_type());
    check_same_device(a, "a", t, "row_scale");
  }
}

// grouped_gemm(a[M,K], b[E,K,N] or trans_b b[E,N,K]) -> [M,N] (or [M,N/2] with swiglu).
inline void check_grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& sizes, bool trans_b,
                               Activation act, const c10::optional<at::Tensor>& bias = c10::nullopt,
                               const c10::optional<at::Tensor>& row_scale = c10::nullopt) {
  const char* op = "moe_ext.grouped_gemm";
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D [M, K], got ", a.dim(), "-D");
  TORCH_CHECK(b.dim() == 3, op, ": b must be 3-D [E, K, N] (or [E, N, K] with trans_b), got ", b.dim(), "-D");
  TORCH_CHECK(is_float_dtype(a.scalar_type()), op, ": a must be float32, float64, float16 or bfloat16, got ",
              a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b must have the dtype of a (", a.scalar_type(),
              "), got ", b.scalar_type());
  check_same_device(a, "a", b, "b");
  check_same_device(a, "a", sizes, "tokens_per_expert");
  TORCH_CHECK(a.is_contiguous(), op, ": a must be contiguous");
  TORCH_CHECK(b.is_contiguous(), op, ": b must be contiguous (pass [E, N, K] weights with trans_b=True)");
  const int64_t k_b = trans_b ? b.size(2) : b.size(1);
  TORCH_CHECK(k_b == a.size(1), op, ": the K of b (", k_b, ", from b of shape ", b.sizes(),
              trans_b ? " with trans_b" : "", ") must equal the K of a (", a.size(1), ")");
  TORCH_CHECK(b.size(0) >= 1, op, ": b must hold at least one expert");
  check_group_sizes(op, sizes, b.size(0));
  if (act == Activation::kSwiglu) {
    const int64_t n = trans_b ? b.size(1) : b.size(2);
    TORCH_CHECK(n % 2 == 0, op, ": activation='swiglu' needs an even N (gate and up halves), got N=", n);
  }
  check_gemm_epilogue(op, a, bias, row_scale, b.size(0), trans_b ? b.size(1) : b.size(2), {a.size(0)});
}

inline void check_grouped_gemm_wgrad(const at::Tensor& a, const at::Tensor& dy, const at::Tensor& sizes,
                                     int64_t num_groups) {
  const char* op = "moe_ext.grouped_gemm_wgrad";
  TORCH_CHECK(a.dim() == 2 && dy.dim() == 2, op, ": a and grad_out must be 2-D");
  TORCH_CHECK(a.size(0) == dy.size(0), op, ": a has ", a.size(0), " rows but grad_out has ", dy.size(0));
  TORCH_CHECK(is_float_dtype(a.scalar_type()) && dy.scalar_type() == a.scalar_type(), op,
              ": a and grad_out must share one float dtype, got ", a.scalar_type(), " and ", dy.scalar_type());
  TORCH_CHECK(a.is_contiguous() && dy.is_contiguous(), op, ": a and grad_out must be contiguous");
  TORCH_CHECK(num_groups >= 1, op, ": num_experts must be >= 1, got ", num_groups);
  check_same_device(a, "a", dy, "grad_out");
  check_same_device(a, "a", sizes, "tokens_per_expert");
  check_group_sizes(op, sizes, num_groups);
}

}  // namespace moe_ext
