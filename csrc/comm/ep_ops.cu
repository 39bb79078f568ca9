// Launch sequences of the ipc backend. See ep_ops.cuh.
#include "comm/ep_ops.cuh"
#include "kernels/exception.cuh"

#include <algorithm>

namespace moe_ext::comm {

namespace {

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

struct DispatchWorkspace {
  int64_t* dest_keys;
  int64_t* expert_rows;
  int64_t* dest_rows;
  int32_t* hist;
  int32_t* tok;
  void* permute;
};

DispatchWorkspace carve(void* base, int64_t T, int64_t k, int64_t E, int64_t W) {
  char* at = static_cast<char*>(base);
  DispatchWorkspace w;
  const size_t slots = align256(sizeof(int64_t) * std::max<int64_t>(T * k, 1));
  w.dest_keys = reinterpret_cast<int64_t*>(at);
  at += slots;
  w.expert_rows = reinterpret_cast<int64_t*>(at);
  at += slots;
  w.dest_rows = reinterpret_cast<int64_t*>(at);
  at += slots;
  w.hist = reinterpret_cast<int32_t*>(at);
  at += align256(sizeof(int32_t) * E);
  w.tok = reinterpret_cast<int32_t*>(at);
  at += align256(sizeof(int32_t) * W);
  w.permute = at;
  return w;
}

// Index only (row_bytes 0): row_map = each slot's row in the key-major order of its keys.
void index_pass(const void* idx, bool idx_int64, int64_t T, int64_t k, int64_t keys, int64_t* row_map,
                int32_t* counts, void* workspace, cudaStream_t stream) {
  const kernels::PermuteParams q =
      kernels::permute_index_params(idx, idx_int64, T, k, keys, row_map, counts, workspace);
  kernels::permute_route(q, stream);
  kernels::permute_scatter(q, stream);
}

// out = unpermute of this rank's back staging (the rows the experts' ranks sent) over row_map.
void sum_back_rows(const kernels::EpParams& p, kernels::PermuteFloat dtype, const int64_t* row_map,
                   const float* weights, void* out, cudaStream_t stream) {
  kernels::UnpermuteParams u;
  u.dtype = dtype;
  u.y = kernels::ep_back_rows(p);
  u.y_rows = p.layout.sizes.max_tokens * p.layout.sizes.max_k;
  const int64_t elt = dtype == kernels::PermuteFloat::kFloat32 ? 4 : 2;
  u.y_row_stride = p.layout.sizes.row_bytes / elt;
  u.row_map = row_map;
  u.weights = weights;
  u.out = out;
  u.num_tokens = p.num_tokens;
  u.k = p.k;
  u.hidden = p.row_bytes / elt;
  u.poison_if = &p.control->status;  // NOTE: a failed exchange gives NaN, also in a CUDA graph replay
  kernels::unpermute(u, stream);
}

}  // namespace

size_t ep_dispatch_workspace_bytes(int64_t T, int64_t k, int64_t E, int64_t W) {
  const size_t slots = align256(sizeof(int64_t) * std::max<int64_t>(T * k, 1));
  return 3 * slots + align256(sizeof(int32_t) * E) + align256(sizeof(int32_t) * W) +
         std::max(kernels::permute_workspace_bytes(T, k, E), kernels::permute_workspace_bytes(T, k, W));
}

void ep_dispatch_begin(kernels::EpParams& p, void* workspace, cudaEvent_t counted, cudaStream_t stream) {
  MOE_HOST_ASSERT(workspace != nullptr, "ep_dispatch_begin: workspace is null");
  const DispatchWorkspace w = carve(workspace, p.num_tokens, p.k, p.num_experts, p.world);
  p.expert_rows = w.expert_rows;
  p.dest_rows = w.dest_rows;
  p.hist = w.hist;
  p.tok = w.tok;
  // 0. Local index: each slot's rank among this rank's slots of its expert, each token's rank
  // among this rank's tokens to a destination (keys: its first slot on each destination).
  // A small call (decode) does it in one launch instead of about nine.
  if (kernels::ep_small_index_fits(p)) {
    kernels::ep_small_index(p, w.expert_rows, w.hist, w.dest_rows, w.tok, stream);  // (and idx_copy)
  } else {
    if (p.idx_copy != nullptr && p.num_tokens * p.k > 0)
      MOE_CUDA_CHECK(cudaMemcpyAsync(p.idx_copy, p.idx, (p.idx_is_int64 ? 8 : 4) * p.num_tokens * p.k,
                                     cudaMemcpyDeviceToDevice, stream));
    kernels::ep_destination_keys(p, w.dest_keys, stream);
    index_pass(p.idx, p.idx_is_int64, p.num_tokens, p.k, p.num_experts, w.expert_rows, w.hist, w.permute, stream);
    index_pass(w.dest_keys, true, p.num_tokens, p.k, p.world, w.dest_rows, w.tok, w.permute, stream);
  }
  // 1-3. Counts, plan, tokens out, every source in.
  kernels::ep_exchange_counts(p, stream);
  if (counted != nullptr) MOE_CUDA_CHECK(cudaEventRecord(counted, stream));
  kernels::ep_send_tokens(p, false, stream);
  kernels::ep_wait(p, kernels::kEpData, false, false, stream);
}

void ep_dispatch_finish(const kernels::EpParams& p, cudaStream_t stream) { kernels::ep_expand(p, stream); }

void ep_combine(const kernels::EpParams& p, kernels::PermuteFloat dtype, const int64_t* combine_map,
                const float* weights, void* out, cudaStream_t stream) {
  kernels::ep_wait(p, kernels::kEpReady, true, true, stream);  // every source is done with its back rows
  kernels::ep_send_back(p, stream);
  kernels::ep_wait(p, kernels::kEpBack, false, false, stream);
  sum_back_rows(p, dtype, combine_map, weights, out, stream);
}

void ep_combine_partial(const kernels::EpParams& p, kernels::PermuteFloat dtype, bool weighted, void* out,
                        cudaStream_t stream) {
  MOE_HOST_ASSERT(p.partial_map != nullptr || p.num_tokens == 0, "ep_combine_partial: the dispatch's partial_map is needed");
  MOE_HOST_ASSERT(dtype != kernels::PermuteFloat::kFloat64, "ep_combine_partial: rows of float32, float16 or bfloat16");
  const kernels::EpFloat ef = dtype == kernels::PermuteFloat::kFloat32   ? kernels::EpFloat::kFloat32
                              : dtype == kernels::PermuteFloat::kFloat16 ? kernels::EpFloat::kFloat16
                                                                          : kernels::EpFloat::kBFloat16;
  kernels::ep_wait(p, kernels::kEpReady, true, true, stream);  // every source is done with its back rows
  kernels::ep_send_partials(p, ef, weighted, stream);
  kernels::ep_wait(p, kernels::kEpBack, false, false, stream);
  sum_back_rows(p, dtype, p.partial_map, nullptr, out, stream);
}

void ep_combine_grad(const kernels::EpParams& p, kernels::EpFloat dtype, void* grad_y, int64_t grad_y_bytes,
                     float* grad_w, cudaStream_t stream) {
  MOE_HOST_ASSERT(!p.part_grad || p.part_dst != nullptr || p.part_count == 0,
                  "ep_combine_grad: part_grad needs the dispatch's partial plan");
  // NOTE: every rank agreed on part_grad in the dispatch's count exchange, so all take one path.
  kernels::ep_wait(p, kernels::kEpReady, true, true, stream);  // every receiver is done with its staging
  kernels::ep_send_tokens(p, true, stream);
  kernels::ep_wait(p, kernels::kEpData, false, false, stream);
  if (grad_y_bytes > 0) MOE_CUDA_CHECK(cudaMemsetAsync(grad_y, 0, static_cast<size_t>(grad_y_bytes), stream));
  if (!p.part_grad) {
    kernels::ep_expand_grad(p, dtype, grad_y, stream);
    return;
  }
  kernels::ep_expand_grad_partial(p, dtype, grad_y, stream);
  kernels::ep_wait(p, kernels::kEpBack, false, false, stream);
  kernels::ep_gather_slot_dots(p, grad_w, stream);
}

}  // namespace moe_ext::comm
