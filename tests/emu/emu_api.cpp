// C entry points (ctypes) to the torch-free kernel launchers, run on the CPU emulation: the
// kernels' own code, unchanged. Each returns 0, or -1 with the message in emu_last_error().
#include "emu_cuda.h"
#include "emu_api.h"
#include "kernels/gating.cuh"
#include "kernels/permute.cuh"
#include "kernels/replicas.cuh"
#include "kernels/swiglu.cuh"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace k = moe_ext::kernels;

std::string emu_api_error;

namespace {

// GatingProblem's launch-shape knobs for the next gating calls (emu_gating_tuning).
int64_t g_tile_rows = 0;
int g_route_warps = 0;

k::GatingProblem problem(int dtype, int score, const void* logits, const void* noise, const void* bias, int64_t T,
                         int64_t E, int64_t kk, int renorm, int64_t G, int64_t TG, int64_t seq_len) {
  k::GatingProblem q;
  q.dtype = static_cast<k::GatingFloat>(dtype);
  q.score = static_cast<k::GatingScore>(score);
  q.logits = logits;
  q.noise = noise;
  q.expert_bias = bias;
  q.num_tokens = T;
  q.num_experts = E;
  q.k = kk;
  q.renormalize = renorm != 0;
  q.num_groups = G;
  q.topk_groups = TG;
  q.seq_len = seq_len;
  q.tile_rows = g_tile_rows;
  q.route_warps = g_route_warps;
  return q;
}
}  // namespace

extern "C" {

const char* emu_last_error() { return emu_api_error.c_str(); }

int emu_set_device(int sms, int smem_optin) {
  static std::vector<std::pair<int, int>> configs = {{132, 227 * 1024}};
  const std::pair<int, int> c{sms, smem_optin};
  auto it = std::find(configs.begin(), configs.end(), c);
  if (it == configs.end()) {
    if (configs.size() >= 64) return -1;
    it = configs.insert(configs.end(), c);
  }
  emu::device = static_cast<int>(it - configs.begin());
  emu::sm_count = sms;
  emu::smem_optin = smem_optin;
  return 0;
}

void emu_gating_tuning(int64_t tile_rows, int route_warps) {
  g_tile_rows = tile_rows;
  g_route_warps = route_warps;
}

size_t emu_gating_forward_workspace(int dtype, int64_t T, int64_t E, int64_t kk, int64_t G, int64_t TG,
                                    int64_t seq_len) {
  return k::gating_forward_workspace_bytes(problem(dtype, 0, nullptr, nullptr, nullptr, T, E, kk, 1, G, TG, seq_len));
}

int emu_gating_forward(int dtype, int score, const void* logits, const void* noise, const void* bias, int64_t T,
                       int64_t E, int64_t kk, int renorm, int64_t G, int64_t TG, int64_t seq_len, int64_t capacity,
                       void* weights, int32_t* idx, int32_t* positions, int32_t* tpe, void* aux, void* seq_aux,
                       void* z, void* workspace) {
  return emu_guarded([&] {
    k::GatingForwardParams p;
    p.problem = problem(dtype, score, logits, noise, bias, T, E, kk, renorm, G, TG, seq_len);
    p.capacity = capacity;
    p.weights = weights;
    p.idx = idx;
    p.positions = positions;
    p.tokens_per_expert = tpe;
    p.aux_loss = aux;
    p.seq_aux_loss = seq_aux;
    p.z_loss = z;
    p.workspace = workspace;
    k::gating_forward(p, nullptr);
  });
}

size_t emu_gating_backward_workspace(int dtype, int64_t T, int64_t E, int64_t kk, int64_t G, int64_t TG,
                                     int64_t seq_len) {
  return k::gating_backward_workspace_bytes(problem(dtype, 0, nullptr, nullptr, nullptr, T, E, kk, 1, G, TG, seq_len));
}

int emu_gating_backward(int dtype, int score, const void* logits, const void* noise, const void* bias, int64_t T,
                        int64_t E, int64_t kk, int renorm, int64_t G, int64_t TG, int64_t seq_len,
                        const void* grad_weights, const void* g_aux, const void* g_seq, const void* g_z,
                        const int32_t* idx, void* grad_logits, void* workspace) {
  return emu_guarded([&] {
    k::GatingBackwardParams p;
    p.problem = problem(dtype, score, logits, noise, bias, T, E, kk, renorm, G, TG, seq_len);
    p.grad_weights = grad_weights;
    p.grad_aux_loss = g_aux;
    p.grad_seq_aux_loss = g_seq;
    p.grad_z_loss = g_z;
    p.idx = idx;
    p.grad_logits = grad_logits;
    p.workspace = workspace;
    k::gating_backward(p, nullptr);
  });
}

int emu_update_expert_bias(float* bias, const int64_t* load, int64_t E, float rate) {
  return emu_guarded([&] { k::update_expert_bias(bias, load, E, rate, nullptr); });
}

int emu_route_to_replicas(const void* idx, int idx64, int64_t n, int64_t E, const int64_t* counts,
                          const int64_t* slots, int64_t C, int64_t rank, void* phys) {
  return emu_guarded([&] { k::route_to_replicas(idx, idx64 != 0, n, E, counts, slots, C, rank, phys, nullptr); });
}

int emu_accumulate_load(int64_t* load, double* ema, const int32_t* tpe, int64_t E, double decay) {
  return emu_guarded([&] { k::accumulate_load(load, ema, tpe, E, decay, nullptr); });
}

size_t emu_permute_workspace(int64_t T, int64_t kk, int64_t E) { return k::permute_workspace_bytes(T, kk, E); }

// The index fields through permute.cuh's own helper; the caller adds what its half reads.
static k::PermuteParams permute_params(const void* idx, int idx64, int64_t T, int64_t kk, int64_t E, int64_t pad_to,
                                       int64_t capacity, int64_t max_rows, int small_index, int64_t* row_map,
                                       int32_t* tpe, void* workspace) {
  k::PermuteParams p = k::permute_index_params(idx, idx64 != 0, T, kk, E, row_map, tpe, workspace);
  p.pad_to = pad_to;
  p.capacity = capacity;
  p.max_rows = max_rows;
  p.small_index = small_index != 0;
  return p;
}

int emu_permute_route(const void* idx, int idx64, int64_t T, int64_t kk, int64_t E, int64_t pad_to, int64_t capacity,
                      int64_t max_rows, int small_index, int64_t* row_map, int32_t* tpe, int64_t* total, int64_t* invalid, void* workspace) {
  return emu_guarded([&] {
    k::PermuteParams p =
        permute_params(idx, idx64, T, kk, E, pad_to, capacity, max_rows, small_index, row_map, tpe, workspace);
    p.total_rows = total;
    p.invalid_ids = invalid;
    k::permute_route(p, nullptr);
  });
}

int emu_permute_scatter(const void* idx, int idx64, int64_t T, int64_t kk, int64_t E, int64_t pad_to,
                        int64_t capacity, int64_t max_rows, int small_index, const void* x, int64_t row_bytes, int64_t x_row_stride, void* x_perm,
                        int64_t out_rows, int64_t* row_map, int32_t* tpe, void* workspace) {
  return emu_guarded([&] {
    k::PermuteParams p =
        permute_params(idx, idx64, T, kk, E, pad_to, capacity, max_rows, small_index, row_map, tpe, workspace);
    p.x = x;
    p.row_bytes = row_bytes;
    p.x_row_stride = x_row_stride;
    p.x_perm = x_perm;
    p.out_rows = out_rows;
    k::permute_scatter(p, nullptr);
  });
}

int emu_unpermute(int dtype, const void* y, int64_t y_rows, int64_t y_row_stride, const int64_t* row_map,
                  const void* weights, void* out, int64_t T, int64_t kk, int64_t H, const int* poison_if) {
  return emu_guarded([&] {
    k::UnpermuteParams p;
    p.dtype = static_cast<k::PermuteFloat>(dtype);
    p.y = y;
    p.y_rows = y_rows;
    p.y_row_stride = y_row_stride;
    p.row_map = row_map;
    p.weights = weights;
    p.out = out;
    p.num_tokens = T;
    p.k = kk;
    p.hidden = H;
    p.poison_if = poison_if;
    k::unpermute(p, nullptr);
  });
}

size_t emu_unpermute_backward_workspace(int64_t y_rows) { return k::unpermute_backward_workspace_bytes(y_rows); }

int emu_unpermute_backward(int dtype, const void* grad_out, const void* y, int64_t y_rows, int64_t y_row_stride,
                           const int64_t* row_map, const void* weights, void* grad_y, double* grad_weights,
                           void* workspace, int64_t T, int64_t kk, int64_t H) {
  return emu_guarded([&] {
    k::UnpermuteBackwardParams p;
    p.dtype = static_cast<k::PermuteFloat>(dtype);
    p.grad_out = grad_out;
    p.y = y;
    p.y_rows = y_rows;
    p.y_row_stride = y_row_stride;
    p.row_map = row_map;
    p.weights = weights;
    p.grad_y = grad_y;
    p.grad_weights = grad_weights;
    p.workspace = workspace;
    p.num_tokens = T;
    p.k = kk;
    p.hidden = H;
    k::unpermute_backward(p, nullptr);
  });
}

int emu_swiglu(int dtype, const void* h, void* out, int64_t rows, int64_t n) {
  return emu_guarded([&] {
    k::SwigluForwardParams p;
    p.dtype = static_cast<k::PermuteFloat>(dtype);
    p.h = h;
    p.out = out;
    p.rows = rows;
    p.n = n;
    k::swiglu_forward(p, nullptr);
  });
}

int emu_swiglu_backward(int dtype, int grad_is_acc, const void* grad, const void* h, void* out, int64_t rows,
                        int64_t n) {
  return emu_guarded([&] {
    k::SwigluBackwardParams p;
    p.dtype = static_cast<k::PermuteFloat>(dtype);
    p.grad_is_acc = grad_is_acc != 0;
    p.grad = grad;
    p.h = h;
    p.out = out;
    p.rows = rows;
    p.n = n;
    k::swiglu_backward(p, nullptr);
  });
}

}  // extern "C"
