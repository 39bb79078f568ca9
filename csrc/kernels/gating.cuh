// Fused top-k gating (routing) on the GPU: scores, biased / group-limited top-k selection,
// weights, capacity drops with token-order positions, the balancing losses, and the backward.
// Torch-free launchers: raw pointers, int64 sizes, a cudaStream_t. The semantics are those of the
// CPU op (csrc/cpu/gating.cpp); the design is described at the top of csrc/kernels/gating.cu.
//
// Nothing here synchronises with the host, and every floating-point reduction runs in a fixed
// order (no float atomics): the same inputs give bit-identical outputs on every run, and the
// whole forward and backward can be captured in a CUDA graph.
//
// Limits of the kernels (the op adapter checks them): 1 <= num_experts <= kGatingMaxExperts,
// 1 <= k <= min(kGatingMaxK, num_experts), num_tokens * max(k, num_experts) < 2^31.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moe_ext::kernels {

constexpr int64_t kGatingMaxExperts = 1024;
constexpr int64_t kGatingMaxK = 32;

// Element type of the logits. The accumulation ("acc") type is float64 for kFloat64 and float32
// otherwise: noise, expert_bias, weights, grad_weights and the loss scalars use it.
enum class GatingFloat : int { kFloat32, kFloat64, kFloat16, kBFloat16 };
enum class GatingScore : int { kSoftmax, kSigmoid };

// The routing problem, shared by the forward and the backward.
struct GatingProblem {
  GatingFloat dtype = GatingFloat::kFloat32;
  GatingScore score = GatingScore::kSoftmax;
  const void* logits = nullptr;       // [num_tokens, num_experts] contiguous, dtype
  const void* noise = nullptr;        // [num_tokens, num_experts] contiguous, acc type; null: none
  const void* expert_bias = nullptr;  // [num_experts] acc type, added to the scores for selection; null: none
  int64_t num_tokens = 0;
  int64_t num_experts = 0;
  int64_t k = 0;
  bool renormalize = true;
  int64_t num_groups = 0;   // 0: no group limit; else a divisor of num_experts
  int64_t topk_groups = 0;  // groups allowed per token (with num_groups)
  int64_t seq_len = 0;      // > 0: the sequence aux loss over sequences of seq_len tokens (divides num_tokens)
  // Launch shape, for tuning experiments (bench_gating --tile-rows / --warps); 0: the defaults.
  // tile_rows: tokens per block of the routing kernel, a power of two in [8, 64] (by default it
  // depends only on num_tokens, so that the losses' summation order is the same everywhere);
  // route_warps: warps per routing block, 1 to 8 (default 8, fewer where shared memory is short).
  // The integer outputs and the weights do not depend on them, the losses' last bits do.
  int64_t tile_rows = 0;
  int route_warps = 0;
};

struct GatingForwardParams {
  GatingProblem problem;
  int64_t capacity = 0;  // per-expert capacity (gating_capacity() of checks.h); 0: none

  // Outputs, all contiguous.
  void* weights = nullptr;               // [num_tokens, k] acc type; 0 where dropped
  int32_t* idx = nullptr;                // [num_tokens, k] expert ids, best first; -1 where dropped
  int32_t* positions = nullptr;          // [num_tokens, k] slot's position inside its expert; -1 where dropped
  int32_t* tokens_per_expert = nullptr;  // [num_experts] kept assignments
  void* aux_loss = nullptr;              // [] acc type
  void* seq_aux_loss = nullptr;          // [] acc type (0 without seq_len)
  void* z_loss = nullptr;                // [] acc type
  void* workspace = nullptr;             // gating_forward_workspace_bytes(problem), 256-byte aligned
};

size_t gating_forward_workspace_bytes(const GatingProblem& problem);
void gating_forward(const GatingForwardParams& p, cudaStream_t stream);

struct GatingBackwardParams {
  GatingProblem problem;
  const void* grad_weights = nullptr;       // [num_tokens, k] acc type
  const void* grad_aux_loss = nullptr;      // [] acc type, on the device: read there, never on the host
  const void* grad_seq_aux_loss = nullptr;  // [] acc type, on the device
  const void* grad_z_loss = nullptr;        // [] acc type, on the device
  const int32_t* idx = nullptr;             // [num_tokens, k] the forward's idx (-1 where dropped)
  void* grad_logits = nullptr;              // [num_tokens, num_experts] contiguous, dtype
  void* workspace = nullptr;                // gating_backward_workspace_bytes(problem), 256-byte aligned
};

size_t gating_backward_workspace_bytes(const GatingProblem& problem);
void gating_backward(const GatingBackwardParams& p, cudaStream_t stream);

// Auxiliary-loss-free balancing (DeepSeek-V3), in place and on the device, one launch:
// expert_bias[e] += rate * sign(mean(load) - load[e]) with load = tokens_per_expert, the sign
// taken exactly as sign(sum(load) - E * load[e]) in int64 (as the CPU op computes it).
void update_expert_bias(float* expert_bias, const int64_t* tokens_per_expert, int64_t num_experts, float rate,
                        cudaStream_t stream);

// The MoE layer's load statistics after a forward, one launch: load[e] += tokens_per_expert[e]
// (int64), and the running average's sums load_ema[e] = load_ema[e] * decay + (1 - decay) *
// tokens_per_expert[e] for e < E, load_ema[E] = load_ema[E] * decay + (1 - decay) (the weight seen),
// each product and the sum rounded separately (float64, no FMA) as the CPU op computes them.
void accumulate_load(int64_t* load, double* load_ema, const int32_t* tokens_per_expert, int64_t num_experts,
                     double decay, cudaStream_t stream);

}  // namespace moe_ext::kernels
