// CPU implementations of every moe_ext op: the reference semantics the CUDA kernels are tested
// against, and what CPU users run. Arguments are validated by csrc/ops before these are called.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace moe_ext::cpu {

// Auxiliary-loss-free balancing, in place: expert_bias[e] += rate * sign(mean - load[e]), the sign
// taken exactly (sum(load) - E * load[e] in int64).
void update_expert_bias(at::Tensor& expert_bias, const at::Tensor& tokens_per_expert, double rate);
// The n-th assignment to expert e in (token, slot) order goes to replica (n + rank) % counts[e]:
// its physical slot, -1 where idx is -1; same shape and dtype as idx.
at::Tensor route_to_replicas(const at::Tensor& idx, const at::Tensor& replica_counts, const at::Tensor& replica_slots,
                             int64_t rank);
void accumulate_load(at::Tensor& load, at::Tensor& load_ema, const at::Tensor& tokens_per_expert, double decay);

// -> (weights[T,k], idx[T,k] int32, positions[T,k] int32, tokens_per_expert[E] int32,
//     aux_loss, seq_aux_loss, z_loss)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_gating(
    const at::Tensor& logits, int64_t k, const std::string& score, bool renormalize,
    const c10::optional<at::Tensor>& expert_bias, int64_t num_groups, int64_t topk_groups,
    double capacity_factor, const c10::optional<at::Tensor>& noise, int64_t seq_len);

at::Tensor topk_gating_backward(const at::Tensor& grad_weights, const at::Tensor& grad_aux_loss,
                                const at::Tensor& grad_seq_aux_loss, const at::Tensor& grad_z_loss,
                                const at::Tensor& logits, const c10::optional<at::Tensor>& noise,
                                const at::Tensor& idx, const std::string& score, bool renormalize,
                                const c10::optional<at::Tensor>& expert_bias, int64_t num_groups,
                                int64_t topk_groups, int64_t seq_len);

// -> (x_perm[R,H], row_map[T,k] int64, tokens_per_expert[E] int32 (segment sizes, padded)); with
// max_rows >= 1 the masked layout: R = E * max_rows, expert e's kept rows from e * max_rows, the
// rest of its segment zero, tokens_per_expert the kept rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x, const at::Tensor& idx,
                                                       int64_t num_experts, int64_t pad_to, int64_t capacity,
                                                       bool exact, int64_t max_rows = -1);

at::Tensor unpermute(const at::Tensor& y, const at::Tensor& row_map, const c10::optional<at::Tensor>& weights);

// -> (grad_y[R,H], grad_weights[T,k] or an empty tensor without weights)
std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                      const at::Tensor& row_map,
                                                      const c10::optional<at::Tensor>& weights);

// bias [E, N] is added before the activation, row_scale [M] multiplies each output row after it.
at::Tensor grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& group_sizes, bool trans_b,
                        const std::string& activation, const c10::optional<at::Tensor>& bias = c10::nullopt,
                        const c10::optional<at::Tensor>& row_scale = c10::nullopt);

at::Tensor grouped_gemm_wgrad(const at::Tensor& a, const at::Tensor& grad_out, const at::Tensor& group_sizes,
                              int64_t num_experts, bool trans_b);

// SwiGLU: silu(gate) * up for h = [gate | up] [rows, 2n], with silu(x) = x / (1 + exp(-x)) in float32
// (float64 for float64), rounded once to h's dtype: [rows, n].
at::Tensor swiglu(const at::Tensor& h);

// The same through the dispatcher on any device: the fused "swiglu" epilogue of the ATen grouped
// GEMMs (the CPU ops, and float32 / float64 on CUDA) is the SwiGLU op itself, so a fused forward
// and an unfused one give the same bits.
at::Tensor swiglu_any_device(const at::Tensor& h);

// The SwiGLU gradient: dL/dh = [g * up * silu'(gate) | g * silu(gate)] for h = [gate | up] [rows, 2n]
// and g [rows, n]; in float32 (float64 for float64), h's dtype out.
at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& h);

}  // namespace moe_ext::cpu
