// The moe_ext operator library: every schema, and the CPU implementations.
// CUDA implementations register themselves from csrc/ops/*_cuda.cu (TORCH_LIBRARY_IMPL, CUDA key).
// The fake (Meta) implementations live in Python (moe_ext/_ops.py): they must handle symbolic
// and data-dependent sizes (permute's row count depends on the routing), which C++ checks that
// read concrete sizes cannot.
#include "cpu/cpu_ops.h"
#include "ops/checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace moe_ext {
namespace {

using Tensor = at::Tensor;
using OptTensor = c10::optional<at::Tensor>;
using GatingOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// ---- CPU: validate, then run the reference implementation -----------------------------------

GatingOut topk_gating_cpu(const Tensor& logits, int64_t k, c10::string_view score, bool renormalize,
                          const OptTensor& expert_bias, int64_t num_groups, int64_t topk_groups,
                          double capacity_factor, const OptTensor& noise, int64_t seq_len) {
  const std::string s(score);
  check_topk_gating(logits, k, s, expert_bias, num_groups, topk_groups, capacity_factor, noise, seq_len);
  return cpu::topk_gating(logits, k, s, renormalize, expert_bias, num_groups, topk_groups, capacity_factor, noise,
                          seq_len);
}

Tensor topk_gating_backward_cpu(const Tensor& grad_weights, const Tensor& grad_aux, const Tensor& grad_seq_aux,
                                const Tensor& grad_z, const Tensor& logits, const OptTensor& noise, const Tensor& idx,
                                c10::string_view score, bool renormalize, const OptTensor& expert_bias,
                                int64_t num_groups, int64_t topk_groups, int64_t seq_len) {
  const std::string s(score);
  check_topk_gating_backward(grad_weights, grad_aux, grad_seq_aux, grad_z, logits, noise, idx, s, expert_bias,
                             num_groups, topk_groups, seq_len);
  return cpu::topk_gating_backward(grad_weights, grad_aux, grad_seq_aux, grad_z, logits, noise, idx, s, renormalize,
                                   expert_bias, num_groups, topk_groups, seq_len);
}

std::tuple<Tensor, Tensor, Tensor> permute_cpu(const Tensor& x, const Tensor& idx, int64_t num_experts,
                                               int64_t pad_to, int64_t capacity, bool exact, int64_t max_rows) {
  check_permute(x, idx, num_experts, pad_to, capacity, max_rows);
  return cpu::permute(x, idx, num_experts, pad_to, capacity, exact, max_rows);
}

Tensor unpermute_cpu(const Tensor& y, const Tensor& row_map, const OptTensor& weights) {
  check_unpermute(y, row_map, weights);
  return cpu::unpermute(y, row_map, weights);
}

std::tuple<Tensor, Tensor> unpermute_backward_cpu(const Tensor& grad_out, const Tensor& y, const Tensor& row_map,
                                                  const OptTensor& weights) {
  check_unpermute_backward(grad_out, y, row_map, weights);
  return cpu::unpermute_backward(grad_out, y, row_map, weights);
}

Tensor grouped_gemm_aten(const Tensor& a, const Tensor& b, const Tensor& sizes, bool trans_b,
                        c10::string_view activation, const OptTensor& bias, const OptTensor& row_scale) {
  const std::string act(activation);
  check_grouped_gemm(a, b, sizes, trans_b, parse_activation(act), bias, row_scale);
  return cpu::grouped_gemm(a, b, sizes, trans_b, act, bias, row_scale);
}

Tensor grouped_gemm_wgrad_aten(const Tensor& a, const Tensor& grad_out, const Tensor& sizes, int64_t num_experts,
                              bool trans_b) {
  check_grouped_gemm_wgrad(a, grad_out, sizes, num_experts);
  return cpu::grouped_gemm_wgrad(a, grad_out, sizes, num_experts, trans_b);
}

void accumulate_load_cpu(Tensor& load, Tensor& load_ema, const Tensor& tokens_per_expert, double decay) {
  check_accumulate_load(load, load_ema, tokens_per_expert, decay);
  cpu::accumulate_load(load, load_ema, tokens_per_expert, decay);
}

Tensor route_to_replicas_cpu(const Tensor& idx, const Tensor& counts, const Tensor& slots, int64_t rank) {
  check_route_to_replicas(idx, counts, slots, rank);
  return cpu::route_to_replicas(idx, counts, slots, rank);
}

void update_expert_bias_cpu(Tensor& expert_bias, const Tensor& tokens_per_expert, double rate) {
  check_update_expert_bias(expert_bias, tokens_per_expert);
  cpu::update_expert_bias(expert_bias, tokens_per_expert, rate);
}

Tensor swiglu_cpu(const Tensor& h) {
  check_swiglu(h);
  return cpu::swiglu(h);
}

Tensor swiglu_backward_cpu(const Tensor& grad, const Tensor& h) {
  check_swiglu_backward(grad, h);
  return cpu::swiglu_backward(grad, h);
}

}  // namespace

TORCH_LIBRARY(moe_ext, m) {
  m.def(
      "topk_gating(Tensor logits, int k, str score, bool renormalize, Tensor? expert_bias, int num_groups, "
      "int topk_groups, float capacity_factor, Tensor? noise, int seq_len) -> "
      "(Tensor weights, Tensor idx, Tensor positions, Tensor tokens_per_expert, Tensor aux_loss, "
      "Tensor seq_aux_loss, Tensor z_loss)");
  m.def(
      "topk_gating_backward(Tensor grad_weights, Tensor grad_aux_loss, Tensor grad_seq_aux_loss, "
      "Tensor grad_z_loss, Tensor logits, Tensor? noise, Tensor idx, str score, bool renormalize, "
      "Tensor? expert_bias, int num_groups, int topk_groups, int seq_len) -> Tensor");
  m.def("update_expert_bias_(Tensor(a!) expert_bias, Tensor tokens_per_expert, float rate) -> ()");
  m.def("accumulate_load_(Tensor(a!) load, Tensor(b!) load_ema, Tensor tokens_per_expert, float decay) -> ()");
  m.def(
      "permute(Tensor x, Tensor idx, int num_experts, int pad_to, int capacity, bool exact, int max_rows=-1) -> "
      "(Tensor x_perm, Tensor row_map, Tensor tokens_per_expert)");
  m.def("unpermute(Tensor y, Tensor row_map, Tensor? weights) -> Tensor");
  m.def("route_to_replicas(Tensor idx, Tensor replica_counts, Tensor replica_slots, int rank) -> Tensor");
  m.def(
      "unpermute_backward(Tensor grad_out, Tensor y, Tensor row_map, Tensor? weights) -> "
      "(Tensor grad_y, Tensor grad_weights)");
  m.def(
      "grouped_gemm(Tensor a, Tensor b, Tensor tokens_per_expert, bool trans_b, str activation, Tensor? bias=None, "
      "Tensor? row_scale=None) -> Tensor");
  m.def(
      "grouped_gemm_wgrad(Tensor a, Tensor grad_out, Tensor tokens_per_expert, int num_experts, bool trans_b) "
      "-> Tensor");
  m.def("swiglu(Tensor h) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor h) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("topk_gating", &topk_gating_cpu);
  m.impl("topk_gating_backward", &topk_gating_backward_cpu);
  m.impl("update_expert_bias_", &update_expert_bias_cpu);
  m.impl("accumulate_load_", &accumulate_load_cpu);
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("route_to_replicas", &route_to_replicas_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
  m.impl("grouped_gemm", &grouped_gemm_aten);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_aten);
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace moe_ext
