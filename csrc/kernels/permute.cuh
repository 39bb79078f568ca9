// permute / unpermute: the expert-major token layout, its inverse with the weighted sum, and the
// backward of that sum. Torch-free launchers: raw pointers, int64 sizes, a cudaStream_t.
//
// permute runs in two halves so that a caller may read the exact row count in between:
//   permute_route   histogram of the (token, slot) pairs per expert and tile, scan across tiles,
//                   per-expert kept counts (capacity), padded segment sizes and their 64-bit
//                   offsets; writes tokens_per_expert and (optionally) the total row count.
//   permute_scatter stable in-tile ranks -> row_map, the rows copied with vector loads/stores,
//                   padding rows and the unused tail of the output zeroed.
// Neither half synchronises with the host: with a worst-case out_rows the whole permute can be
// captured in a CUDA graph. permute_scatter consumes the workspace that permute_route filled
// (the per-tile bases advance in place): run route before every scatter.
//
// Out-of-range expert ids (anything outside [-1, num_experts)) are treated as not routed: their
// slot gets row -1 and they count nowhere. Rows in row_map outside [-1, rows) are skipped the
// same way by unpermute and unpermute_backward (the CPU ops raise an error for both; on the
// device that check would need a host synchronisation).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moe_ext::kernels {

struct PermuteParams {
  // Routing: idx[num_tokens, k] contiguous, int32 or int64 expert ids, -1 = not routed.
  const void* idx = nullptr;
  bool idx_is_int64 = false;
  int64_t num_tokens = 0;
  int64_t k = 0;
  int64_t num_experts = 0;
  int64_t pad_to = 1;     // each expert's segment is rounded up to a multiple of this
  int64_t capacity = -1;  // each expert keeps its first `capacity` slots in token order; -1: all
  // The masked layout (the grouped GEMM's decode input) when >= 1: expert e's rows are
  // [e * max_rows, e * max_rows + kept_e), every segment max_rows long (its unused rows zero),
  // each expert keeps at most max_rows slots (with capacity: at most min(capacity, max_rows)),
  // tokens_per_expert holds the kept (valid) rows, and out_rows must be num_experts * max_rows.
  // Needs pad_to 1. -1: the contiguous layout.
  int64_t max_rows = -1;
  // Calls of at most 2048 slots run their index in one block (the decode case); false forces the
  // multi-kernel index (the same results: for tests and comparisons), as does the environment
  // variable MOE_EXT_PERMUTE_SMALL_INDEX=0 for every call.
  bool small_index = true;

  // Rows: x is [num_tokens] rows of row_bytes bytes, x_row_stride bytes apart; they move as raw
  // bytes (any element type). The widest access in {16, 8, 4, 2, 1} bytes that divides
  // row_bytes, x_row_stride and both base addresses is used.
  const void* x = nullptr;
  int64_t row_bytes = 0;
  int64_t x_row_stride = 0;
  void* x_perm = nullptr;  // [out_rows, row_bytes] contiguous; only permute_scatter writes it
  int64_t out_rows = 0;    // the exact total, or the worst case (permute_max_rows)

  // Outputs and scratch.
  int64_t* row_map = nullptr;            // [num_tokens, k]: the row of each slot, -1 if none
  int32_t* tokens_per_expert = nullptr;  // [num_experts]: padded segment sizes
  int64_t* total_rows = nullptr;         // [1] on the device, optional: sum of tokens_per_expert
  int64_t* invalid_ids = nullptr;        // [1] on the device, optional: ids outside [-1, num_experts),
                                         // counted by permute_route (which zeroes it first)
  void* workspace = nullptr;             // permute_workspace_bytes(num_tokens, k, num_experts)
};

// An index-only pass (no rows): row_map = each slot's position in the key-major, token-order
// layout of `keys` [num_tokens, k]; counts = slots per key.
inline PermuteParams permute_index_params(const void* keys, bool keys_int64, int64_t num_tokens, int64_t k,
                                          int64_t num_keys, int64_t* row_map, int32_t* counts, void* workspace) {
  PermuteParams q;
  q.idx = keys;
  q.idx_is_int64 = keys_int64;
  q.num_tokens = num_tokens;
  q.k = k;
  q.num_experts = num_keys;
  q.row_map = row_map;
  q.tokens_per_expert = counts;
  q.workspace = workspace;
  return q;
}

size_t permute_workspace_bytes(int64_t num_tokens, int64_t k, int64_t num_experts);
void permute_route(const PermuteParams& p, cudaStream_t stream);
void permute_scatter(const PermuteParams& p, cudaStream_t stream);

// Element types of unpermute's rows. Accumulation is float32 (float64 for kFloat64); weights
// are passed in the accumulation type.
enum class PermuteFloat : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// out[t] = sum over j = 0..k-1 in order of weights[t, j] * y[row_map[t, j]] (a plain sum without
// weights): a separately rounded multiply and add per slot, so that the result is bit-identical
// to the CPU op; slots with row -1 (or out of range) add nothing.
struct UnpermuteParams {
  PermuteFloat dtype = PermuteFloat::kBFloat16;
  const void* y = nullptr;  // [y_rows, hidden], rows y_row_stride elements apart
  int64_t y_rows = 0;
  int64_t y_row_stride = 0;
  const int64_t* row_map = nullptr;  // [num_tokens, k] contiguous
  const void* weights = nullptr;     // [num_tokens, k] contiguous in the accumulation type, or null
  void* out = nullptr;               // [num_tokens, hidden] contiguous
  int64_t num_tokens = 0;
  int64_t k = 0;
  int64_t hidden = 0;
  // Null, or a device int that is nonzero when y is void (the ipc combine's status word after a
  // failed exchange): then every element of out is NaN, so no caller gets a plausible wrong sum.
  const int* poison_if = nullptr;
};

void unpermute(const UnpermuteParams& p, cudaStream_t stream);

// grad_y[row] = cast(weights[t, j] * grad_out[t]) (grad_out[t] itself without weights) for every
// slot (t, j) with a row, zero for rows no slot points to; grad_weights[t, j] = dot(y[row],
// grad_out[t]) accumulated in float64 (0 for slots without a row), in a fixed order that the CPU
// op reproduces: lane l of a warp sums the products of 16-byte vectors l, l+32, ... (each vector's
// in element order, no FMA), then a butterfly over the lanes.
struct UnpermuteBackwardParams {
  PermuteFloat dtype = PermuteFloat::kBFloat16;
  const void* grad_out = nullptr;  // [num_tokens, hidden] contiguous, the element type of y
  const void* y = nullptr;         // [y_rows, hidden], rows y_row_stride elements apart
  int64_t y_rows = 0;
  int64_t y_row_stride = 0;
  const int64_t* row_map = nullptr;  // [num_tokens, k] contiguous
  const void* weights = nullptr;     // [num_tokens, k] in the accumulation type, or null
  void* grad_y = nullptr;            // [y_rows, hidden] contiguous
  double* grad_weights = nullptr;    // [num_tokens, k]; needs weights; null: not computed
  void* workspace = nullptr;         // unpermute_backward_workspace_bytes(y_rows)
  int64_t num_tokens = 0;
  int64_t k = 0;
  int64_t hidden = 0;
};

size_t unpermute_backward_workspace_bytes(int64_t y_rows);
void unpermute_backward(const UnpermuteBackwardParams& p, cudaStream_t stream);

}  // namespace moe_ext::kernels
