// CUDA implementations of topk_gating and topk_gating_backward: the CPU op's checks (so errors
// read the same), the CUDA kernels' limits, then device guard, current stream, outputs and the
// torch-free launchers of csrc/kernels/gating.cu.
//
// Neither op synchronises with the host: the loss-gradient scalars of the backward are read on
// the device, and every size is known from the shapes, so both can be captured in a CUDA graph.
// Differences from the CPU op: num_experts <= 1024 and k <= 32 (an error names the limit); idx
// passed to the backward must be the forward's output for this logits (the CPU op recomputes the
// choice of every row, these kernels only of rows with a dropped slot); integer outputs equal the
// CPU op's except where two experts' float32 keys lie within rounding of each other (see
// csrc/kernels/gating.cu).
#include "kernels/api.cuh"
#include "ops/checks.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

namespace moe_ext {
namespace {

using Tensor = at::Tensor;
using OptTensor = c10::optional<at::Tensor>;
using GatingOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

kernels::GatingFloat gating_float(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::GatingFloat::kFloat32;
    case at::kDouble: return kernels::GatingFloat::kFloat64;
    case at::kHalf: return kernels::GatingFloat::kFloat16;
    case at::kBFloat16: return kernels::GatingFloat::kBFloat16;
    default: TORCH_CHECK(false, "moe_ext.topk_gating: logits must be float32, float64, float16 or bfloat16, got ", t);
  }
}

void check_cuda_limits(const char* op, const Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor here, got ", logits.device());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E <= kernels::kGatingMaxExperts, op, ": the CUDA kernels support up to ", kernels::kGatingMaxExperts,
              " experts, got num_experts=", E, " (route such a layer with CPU tensors)");
  TORCH_CHECK(k <= kernels::kGatingMaxK, op, ": the CUDA kernels support k <= ", kernels::kGatingMaxK, ", got k=", k);
  TORCH_CHECK(T * std::max(k, E) < (int64_t{1} << 31), op,
              ": num_tokens * max(k, num_experts) must be < 2^31, got num_tokens=", T, ", num_experts=", E,
              ", k=", k);
}

// Inputs in the layouts the kernels read: logits contiguous in their dtype; noise and
// expert_bias contiguous in the accumulation dtype (the CPU op converts them the same way).
struct GatingInputs {
  Tensor logits, noise, bias;
  kernels::GatingProblem problem;
};

GatingInputs gating_inputs(const Tensor& logits_in, const OptTensor& noise, const OptTensor& expert_bias, int64_t k,
                           const std::string& score, bool renormalize, int64_t num_groups, int64_t topk_groups,
                           int64_t seq_len) {
  const at::ScalarType acc = acc_dtype(logits_in.scalar_type());
  GatingInputs in;
  in.logits = logits_in.contiguous();
  if (noise.has_value()) in.noise = noise->to(acc).contiguous();
  if (expert_bias.has_value()) in.bias = expert_bias->to(acc).contiguous();
  kernels::GatingProblem& q = in.problem;
  q.dtype = gating_float(in.logits.scalar_type());
  q.score = parse_score(score) == ScoreFn::kSigmoid ? kernels::GatingScore::kSigmoid : kernels::GatingScore::kSoftmax;
  q.logits = in.logits.data_ptr();
  q.noise = in.noise.defined() ? in.noise.data_ptr() : nullptr;
  q.expert_bias = in.bias.defined() ? in.bias.data_ptr() : nullptr;
  q.num_tokens = in.logits.size(0);
  q.num_experts = in.logits.size(1);
  q.k = k;
  q.renormalize = renormalize;
  q.num_groups = num_groups;
  q.topk_groups = topk_groups;
  q.seq_len = seq_len;
  return in;
}

GatingOut topk_gating_cuda(const Tensor& logits, int64_t k, c10::string_view score, bool renormalize,
                           const OptTensor& expert_bias, int64_t num_groups, int64_t topk_groups,
                           double capacity_factor, const OptTensor& noise, int64_t seq_len) {
  const std::string s(score);
  check_topk_gating(logits, k, s, expert_bias, num_groups, topk_groups, capacity_factor, noise, seq_len);
  check_cuda_limits("moe_ext.topk_gating", logits, k);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const GatingInputs in = gating_inputs(logits, noise, expert_bias, k, s, renormalize, num_groups, topk_groups, seq_len);
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto o = logits.options();
  const at::ScalarType acc = acc_dtype(logits.scalar_type());
  Tensor weights = at::empty({T, k}, o.dtype(acc));
  Tensor idx = at::empty({T, k}, o.dtype(at::kInt));
  Tensor positions = at::empty({T, k}, o.dtype(at::kInt));
  Tensor tokens_per_expert = at::empty({E}, o.dtype(at::kInt));
  Tensor aux = at::empty({}, o.dtype(acc)), seq_aux = at::empty({}, o.dtype(acc)), z = at::empty({}, o.dtype(acc));
  Tensor workspace =
      at::empty({static_cast<int64_t>(kernels::gating_forward_workspace_bytes(in.problem))}, o.dtype(at::kByte));

  kernels::GatingForwardParams p;
  p.problem = in.problem;
  p.capacity = std::min(gating_capacity(capacity_factor, T, k, E), T * k);
  p.weights = weights.data_ptr();
  p.idx = idx.data_ptr<int32_t>();
  p.positions = positions.data_ptr<int32_t>();
  p.tokens_per_expert = tokens_per_expert.data_ptr<int32_t>();
  p.aux_loss = aux.data_ptr();
  p.seq_aux_loss = seq_aux.data_ptr();
  p.z_loss = z.data_ptr();
  p.workspace = workspace.data_ptr();
  kernels::gating_forward(p, stream);
  return {weights, idx, positions, tokens_per_expert, aux, seq_aux, z};
}

Tensor topk_gating_backward_cuda(const Tensor& grad_weights, const Tensor& grad_aux, const Tensor& grad_seq_aux,
                                 const Tensor& grad_z, const Tensor& logits, const OptTensor& noise, const Tensor& idx,
                                 c10::string_view score, bool renormalize, const OptTensor& expert_bias,
                                 int64_t num_groups, int64_t topk_groups, int64_t seq_len) {
  const char* op = "moe_ext.topk_gating_backward";
  const std::string s(score);
  check_topk_gating_backward(grad_weights, grad_aux, grad_seq_aux, grad_z, logits, noise, idx, s, expert_bias,
                             num_groups, topk_groups, seq_len);
  const int64_t k = idx.size(1);
  check_cuda_limits(op, logits, k);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const GatingInputs in = gating_inputs(logits, noise, expert_bias, k, s, renormalize, num_groups, topk_groups, seq_len);
  const at::ScalarType acc = acc_dtype(logits.scalar_type());
  const Tensor gw = grad_weights.to(acc).contiguous();
  const Tensor kept = idx.to(at::kInt).contiguous();
  // NOTE: the loss-gradient scalars stay on the device (a CPU scalar is copied over, never read here).
  const Tensor g_aux = grad_aux.to(logits.device(), acc).contiguous();
  const Tensor g_seq = grad_seq_aux.to(logits.device(), acc).contiguous();
  const Tensor g_z = grad_z.to(logits.device(), acc).contiguous();
  Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (logits.size(0) == 0) return grad;
  Tensor workspace = at::empty({static_cast<int64_t>(kernels::gating_backward_workspace_bytes(in.problem))},
                               logits.options().dtype(at::kByte));

  kernels::GatingBackwardParams p;
  p.problem = in.problem;
  p.grad_weights = gw.data_ptr();
  p.grad_aux_loss = g_aux.data_ptr();
  p.grad_seq_aux_loss = g_seq.data_ptr();
  p.grad_z_loss = g_z.data_ptr();
  p.idx = kept.data_ptr<int32_t>();
  p.grad_logits = grad.data_ptr();
  p.workspace = workspace.data_ptr();
  kernels::gating_backward(p, stream);
  return grad;
}

void update_expert_bias_cuda(Tensor& expert_bias, const Tensor& tokens_per_expert, double rate) {
  check_update_expert_bias(expert_bias, tokens_per_expert);
  const c10::cuda::CUDAGuard guard(expert_bias.device());
  const Tensor load = tokens_per_expert.contiguous();
  kernels::update_expert_bias(expert_bias.data_ptr<float>(), load.data_ptr<int64_t>(), expert_bias.numel(),
                              static_cast<float>(rate), c10::cuda::getCurrentCUDAStream().stream());
}

void accumulate_load_cuda(Tensor& load, Tensor& load_ema, const Tensor& tokens_per_expert, double decay) {
  check_accumulate_load(load, load_ema, tokens_per_expert, decay);
  const c10::cuda::CUDAGuard guard(load.device());
  const Tensor tpe = tokens_per_expert.contiguous();
  kernels::accumulate_load(load.data_ptr<int64_t>(), load_ema.data_ptr<double>(), tpe.data_ptr<int32_t>(), load.numel(),
                           decay, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("topk_gating", &topk_gating_cuda);
  m.impl("topk_gating_backward", &topk_gating_backward_cuda);
  m.impl("update_expert_bias_", &update_expert_bias_cuda);
  m.impl("accumulate_load_", &accumulate_load_cuda);
}

}  // namespace moe_ext
