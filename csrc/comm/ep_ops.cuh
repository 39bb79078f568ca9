// The ipc backend's operations as launch sequences over a SymmetricBuffer, torch-free: the torch
// adapter (csrc/ops/ep_ipc.cpp) and the C++ benchmark (bench/bench_ep.cu) run exactly these.
//
// dispatch:  ep_dispatch_begin (local index, count exchange [-> `counted` event], token send,
//            wait for every source), then, in the exact layout, the host reads the row count
//            (SymmetricBuffer::recv_total after synchronising on `counted`) and allocates recv_x,
//            then ep_dispatch_finish (expansion into recv_x).
// combine:   ep_combine (barrier, expert rows back, wait, the weighted sum of each token's k rows).
// backward of combine: ep_combine_grad (barrier, gradient rows out, wait, expansion with weights;
//            for a partial plan with w's gradient, also each slot's dot product back to its source).
// partial combine: ep_combine_partial (barrier, one summed row per (token, rank) back, wait, the
//            plain sum of each token's partials).
#pragma once

#include "comm/symmetric.cuh"
#include "kernels/ep.cuh"
#include "kernels/permute.cuh"

namespace moe_ext::comm {

// Device scratch of one dispatch's local index, caller-owned, ep_dispatch_workspace_bytes large.
size_t ep_dispatch_workspace_bytes(int64_t num_tokens, int64_t k, int64_t num_experts, int64_t world);

// The plan a dispatch leaves for its combine and backward (caller-owned device memory):
//   scratch   [kernels::ep_scratch_len(world, num_experts)] int64
//   slot_rows [T, k] int64, stage_rows [T, k] int64   (sender side)
//   back_map  [recv_rows] int64                         (receiver side)
// and, for a partial combine (p.weights = w [T, k] float32 set for the dispatch too):
//   partial_map [T, k] int64                            (sender side)
//   part_rows [part_count, k] int64, part_w [part_count, k] float32, part_dst [part_count] int64
//                                     (receiver side; part_count = world * the buffer's max_tokens)
// p: the call's fields (num_tokens, k, num_experts, pad_to, capacity, max_rows, row_bytes,
// dtype_code, idx, x, x_row_stride, x_scale, scale_cols) and the plan pointers (scratch,
// slot_rows, stage_rows, tokens_per_expert). Writes the local-index fields of p.
void ep_dispatch_begin(kernels::EpParams& p, void* workspace, cudaEvent_t counted, cudaStream_t stream);
// p additionally: recv_x, recv_rows, recv_scale, back_map.
void ep_dispatch_finish(const kernels::EpParams& p, cudaStream_t stream);

// out [T, hidden] = sum_j w[t, j] * (row of slot (t, j) sent back), float32 accumulation
// (plain sum without weights). p: the dispatch's params with y / y_row_stride set.
// combine_map [T, k]: t * k + j where the dispatch's slot_rows[t, j] >= 0, else -1 (the caller
// derives it once per dispatch; the torch adapter with at::where).
void ep_combine(const kernels::EpParams& p, kernels::PermuteFloat dtype, const int64_t* combine_map,
                const float* weights, void* out, cudaStream_t stream);

// The partial combine: out [T, hidden] = the plain float32 sum, in slot order, of the rows the
// experts' ranks sent back, one per (token, rank): each the float32 sum (weighted: by the routing
// weights the dispatch carried) of the token's rows there, cast to the row dtype. p: the
// dispatch's params with y / y_row_stride set and partial_map, part_* / part_count from a
// dispatch made with weights and them.
void ep_combine_partial(const kernels::EpParams& p, kernels::PermuteFloat dtype, bool weighted, void* out,
                        cudaStream_t stream);

// grad_y (zeroed here) = the dispatch layout of g [T, hidden] scaled by each slot's weight.
// p: the dispatch's params with x = g (y's dtype), weights = w [T, k] float32. With part_grad (a
// partial plan made for w's gradient; p.y = the combine's y) also grad_w [T, k] float32, each kept
// slot's dot(y row, g[t]) computed on its expert's rank (ep.cuh); grad_w unused otherwise.
void ep_combine_grad(const kernels::EpParams& p, kernels::EpFloat dtype, void* grad_y, int64_t grad_y_bytes,
                     float* grad_w, cudaStream_t stream);

}  // namespace moe_ext::comm
