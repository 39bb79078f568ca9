// Expert-parallel dispatch / combine over symmetric buffers (the `ipc` backend): torch-free
// launchers, raw pointers, int64 sizes, a cudaStream_t.
//
// Every rank holds one buffer of the same layout (EpLayout), opened by every peer through CUDA
// IPC; kernels write one-sided into the peers' buffers and signal with 64-bit flags (release
// store at system scope on the writer, acquire load on the reader). Flags carry the sequence
// number of the operation, kept on the device (EpControl::seq), so every launch is capturable
// in a CUDA graph and a replay runs the protocol again.
//
// One dispatch, on every rank (W ranks, E experts, El = E / W local experts per rank):
//   0. local index (the caller, with moe_ext::kernels::permute_route/permute_scatter on idx and
//      on ep_destination_keys, or ep_small_index in one launch for a small call): each slot's
//      position among this rank's slots of its expert, each token's position among the tokens
//      this rank sends to a destination.
//   1. ep_exchange_counts (one block): header + per-destination token counts + per-expert slot
//      counts to every peer, wait for every peer's, check that the ranks agree, then the plan:
//      where every slot of this rank lands on its expert's rank, and this rank's receive layout.
//   2. ep_send_tokens: each token once per destination rank into the peer's staging rows
//      (source rank, source token order), with the rows its slots take there; then the flag.
//   3. ep_wait(kEpData): every source's flag.
//   4. ep_expand: staged tokens -> recv_x rows (expert-major, by (source rank, source token)),
//      the map back to (source rank, slot), padding rows zeroed.
// combine: ep_wait(kEpReady, signal) (peers are done with their back staging), ep_send_back
// (each kept expert row to its source's back staging at row t * k + j), ep_wait(kEpBack), then
// the caller reduces the k rows of each token with moe_ext::kernels::unpermute.
// The combine's backward (the gradient travelling to the experts) is ep_wait(kEpReady, signal),
// ep_send_tokens(grad), ep_wait(kEpData), ep_expand_grad.
// Partial combine (a dispatch made with weights and the part_* plan): each expert rank sums, in
// float32 and slot order, the weighted rows of a token's slots it holds and sends one row per
// (token, rank) instead of one per slot: ep_wait(kEpReady, signal), ep_send_partials (to the
// source's back staging at the row of the token's first kept slot there), ep_wait(kEpBack), then
// the caller sums each token's partials with unpermute over partial_map, without weights. Its
// backward with w's gradient (part_grad): ep_wait(kEpReady, signal), ep_send_tokens(grad),
// ep_wait(kEpData), ep_expand_grad_partial (grad_y, and each slot's dot product to its source),
// ep_wait(kEpBack), ep_gather_slot_dots.
//
// Failures: every wait gives up after timeout_ns; the first error (timeout, ranks that
// disagree, a rank with more tokens than the buffer holds) is recorded in EpControl::status
// and in the host-mapped EpError, and every later kernel of the communicator returns at once.
// The host reads EpError at its next synchronisation point and raises.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moe_ext::kernels {

constexpr int kEpMaxWorld = 1024;
constexpr int64_t kEpMagic = 0x6D6F65657063LL;  // "moeepc"

enum EpPhase : int { kEpCount = 0, kEpReady = 1, kEpData = 2, kEpBack = 3, kEpNumPhases = 4 };

// Fields of the header each rank sends in the count exchange (int64 each).
enum EpHeader : int {
  kHdrMagic = 0,
  kHdrSeq,
  kHdrTokens,
  kHdrRowBytes,
  kHdrDtype,
  kHdrExperts,
  kHdrK,
  kHdrPadTo,
  kHdrCapacity,
  kHdrMaxRows,
  kHdrWorld,
  kHdrScaleCols,
  kHdrBadInput,  // the kind of call: 0 real, 1 this rank's inputs are invalid (it says why itself),
                 // 2 a request to grow the buffers (moe_ext/_ipc.py); compared first
  kHdrPartial,   // 1: a dispatch for the partial combine (part_dst given), 2: and w's gradient (part_grad)
  kHdrLen = 16
};

enum EpErrorCode : int {
  kEpOk = 0,
  kEpTimeout = 1,    // rank: the peer whose flag never came; field: the phase
  kEpMismatch = 2,   // rank: the first peer that disagrees; field: the EpHeader field; value: its value
  kEpTooMany = 3,    // rank: the first peer with more tokens than max_tokens; value: the most of any rank
};

// The first error seen by this rank's kernels. Lives in host-mapped pinned memory: the device
// writes it, the host reads it after synchronising.
struct EpError {
  int32_t code;
  int32_t rank;
  int32_t field;
  int32_t phase;
  int64_t value;
  int64_t mine;  // this rank's value of the field that disagrees
  int64_t seq;
};

// Per-rank device state, not shared with peers.
struct EpControl {
  unsigned long long seq;   // the operation number, the same on every rank
  unsigned int done_blocks; // last-block detection of the data kernels (reset by the last block)
  int status;               // 0, or the EpErrorCode of the first error
};

// What every rank's buffer holds room for; the same on every rank (the buffer is symmetric).
struct EpSizes {
  int64_t world = 1;
  int64_t max_experts = 1;   // E
  int64_t max_k = 1;
  int64_t max_tokens = 1;    // per rank and call
  int64_t row_bytes = 16;    // payload bytes per token row (a multiple of 16)
  int64_t scale_cols = 0;    // float32 scales per row (fp8 payloads)
};

// Byte offsets of the regions of one buffer (every region 256-byte aligned).
struct EpLayout {
  EpSizes sizes;
  int64_t count_row = 0;  // int64 per count row: kHdrLen + world + max_experts
  size_t flags = 0;       // uint64 [kEpNumPhases][world], written by the peers
  size_t counts = 0;      // int64 [2][world][count_row], slot [seq & 1][source]
  size_t meta = 0;        // int64 [world * max_tokens][max_k + 1]: each slot's row here, then the token
  size_t weights = 0;     // float [world * max_tokens][max_k]: routing weights (gradient sends)
  size_t scales = 0;      // float [world * max_tokens][scale_cols]
  size_t payload = 0;     // [world * max_tokens][row_bytes]: staged tokens, source s at s * max_tokens
  size_t back = 0;        // [max_tokens * max_k][row_bytes]: expert outputs back, slot (t, j) at t * k + j
  size_t total = 0;
};

EpLayout ep_layout(const EpSizes& sizes);

// int64 entries of the plan scratch of one dispatch (kept by the caller for its combine).
int64_t ep_scratch_len(int64_t world, int64_t num_experts);

struct EpParams {
  // The communicator.
  int world = 1;
  int rank = 0;
  EpLayout layout;
  char* local = nullptr;              // this rank's buffer
  char* const* peers = nullptr;       // device array [world]: every rank's buffer (own included)
  EpControl* control = nullptr;       // device
  EpError* error = nullptr;           // host-mapped, device pointer
  int64_t timeout_ns = 60'000'000'000LL;
  int num_blocks = 0;                 // blocks of the data kernels (0: one per SM)

  // The call (the same on every rank, except num_tokens).
  int64_t num_tokens = 0;
  int64_t k = 1;
  int64_t num_experts = 1;
  int64_t pad_to = 1;
  int64_t capacity = -1;   // -1: none
  int64_t max_rows = -1;   // rows per local expert of the masked layout; -1: exact layout
  int64_t row_bytes = 0;   // payload bytes per row, a multiple of 16, <= layout.sizes.row_bytes
  int64_t dtype_code = 0;  // anything identifying the payload's element type, compared across ranks
  int64_t scale_cols = 0;
  int64_t bad_input = 0;   // kHdrBadInput: 1 announces invalid inputs, 2 a growth request (num_tokens 0);
                           // a peer making another kind of call fails, and so does every rank

  // This rank's tokens.
  const void* idx = nullptr;  // [T, k] int32 or int64 global expert ids, -1 = not routed
  bool idx_is_int64 = true;
  void* idx_copy = nullptr;   // [T, k] like idx, or null: the dispatch copies idx here (the plan the
                              // combine reads, safe from later changes to the caller's idx); the
                              // one-block index writes it as it reads idx, else a device copy
  const void* x = nullptr;    // [T] rows of row_bytes, x_row_stride bytes apart (16-byte aligned)
  int64_t x_row_stride = 0;
  const float* x_scale = nullptr;  // [T, scale_cols] or null
  const float* weights = nullptr;  // [T, k] float32: gradient sends, and dispatches for a partial combine

  // Local index (step 0) and the plan.
  const int64_t* expert_rows = nullptr;  // [T, k] permute row_map over the E global experts
  const int64_t* dest_rows = nullptr;    // [T, k] permute row_map of ep_destination_keys over W
  const int32_t* hist = nullptr;         // [E] this rank's slots per expert (tokens_per_expert of the first)
  const int32_t* tok = nullptr;          // [W] this rank's tokens per destination (of the second)
  int64_t* scratch = nullptr;            // [ep_scratch_len], written by ep_exchange_counts
  int64_t* slot_rows = nullptr;          // [T, k]: each slot's row on its expert's rank, -1 dropped / none
  int64_t* stage_rows = nullptr;         // [T, k]: on its first slot there, the token's position among
                                         // this rank's tokens to that destination (else -1)
  int64_t* partial_map = nullptr;        // [T, k] or null: t * k + j on each destination's first kept
                                         // slot of the token, else -1 (the partial combine's row map)
  int64_t* slot_map = nullptr;           // [T, k] or null: t * k + j where the slot has a row (slot_rows
                                         // >= 0), else -1 (the per-slot combine's row map; dispatch)

  // Receiving side.
  void* recv_x = nullptr;             // exact: [recv_rows] rows; masked: [El * max_rows] rows
  int64_t recv_rows = 0;              // rows allocated in recv_x / back_map (bounds)
  float* recv_scale = nullptr;        // [recv_rows, scale_cols] or null
  int64_t* back_map = nullptr;        // [recv_rows]: source rank << 40 | (t * k + j), -1 padding
  int32_t* tokens_per_expert = nullptr;  // [El]: padded segments (exact) or valid rows (masked)
  int64_t* recv_total = nullptr;      // [1] device, optional: rows of the exact layout
  int64_t* recv_total_host = nullptr; // [1] host-mapped, optional: the same, for the one host read
  // Partial combine plan (null without it), per staged token g < part_count (world * max_tokens
  // of the dispatch's buffer): its recv rows [g, k] (-1: not here or dropped), their weights [g, k],
  // and where its partial goes: source rank << 40 | t * k + j of its first kept slot here, or -1.
  int64_t* part_rows = nullptr;
  float* part_w = nullptr;
  int64_t* part_dst = nullptr;
  int64_t part_count = 0;
  bool part_grad = false;  // the combine's backward brings w's gradient back (agreed in the header)

  // Combine.
  const void* y = nullptr;  // expert outputs in recv_x's layout, rows y_row_stride bytes apart
  int64_t y_row_stride = 0;
};

// dest_keys[t, j] = the destination rank of slot j if it is token t's first slot there, else -1.
void ep_destination_keys(const EpParams& p, int64_t* dest_keys, cudaStream_t stream);
// The whole local index of a small dispatch (T * k <= kEpSmallIndexSlots) in one launch
// (ep_index.cu): the expert_rows / hist and dest_rows / tok that ep_destination_keys and two
// permute index passes give, and p.idx_copy when set. ep_small_index_fits: whether it applies
// (MOE_EXT_EP_SMALL_INDEX=0 turns it off).
constexpr int64_t kEpSmallIndexSlots = 2048;
bool ep_small_index_fits(const EpParams& p);
void ep_small_index(const EpParams& p, int64_t* expert_rows, int32_t* hist, int64_t* dest_rows, int32_t* tok,
                    cudaStream_t stream);
void ep_exchange_counts(const EpParams& p, cudaStream_t stream);
// grad = false: dispatch (x rows; writes slot_rows and stage_rows). grad = true: x holds the
// gradient rows and weights the routing weights; slot_rows and stage_rows are read.
void ep_send_tokens(const EpParams& p, bool grad, cudaStream_t stream);
// Waits until every peer's flag of `phase` reached this operation; signal: first raise this
// rank's flag of `phase` on every peer (a barrier).
void ep_wait(const EpParams& p, EpPhase phase, bool signal, bool new_op, cudaStream_t stream);
void ep_expand(const EpParams& p, cudaStream_t stream);
enum class EpFloat : int { kFloat32, kFloat16, kBFloat16 };
// grad_y[row] = cast(w * g) for every staged gradient row and each of its slots (grad_y zeroed
// by the caller): the receiving half of the combine's backward, as unpermute_backward computes it.
void ep_expand_grad(const EpParams& p, EpFloat dtype, void* grad_y, cudaStream_t stream);
void ep_send_back(const EpParams& p, cudaStream_t stream);
// The partial combine's backward on the experts' side (a plan made with part_grad): grad_y as
// ep_expand_grad, and every kept slot's dot(y[row], g) (unpermute_backward's, bit for bit) into the
// first 4 bytes of its row t * k + j in its source's back staging; then raises kEpBack. p.y: the
// combine's expert outputs.
void ep_expand_grad_partial(const EpParams& p, EpFloat dtype, void* grad_y, cudaStream_t stream);
// After ep_wait(kEpBack): grad_w [T, k] float32 = those dots on the kept slots, 0 elsewhere.
void ep_gather_slot_dots(const EpParams& p, float* grad_w, cudaStream_t stream);
// The partial combine's send: every staged token's weighted (or, weighted = false, plain) float32
// sum of its rows here, cast to `dtype`, into its source's back staging (p.y / y_row_stride: the
// expert outputs; p.part_*: the dispatch's partial plan).
void ep_send_partials(const EpParams& p, EpFloat dtype, bool weighted, cudaStream_t stream);

// The back staging of this rank as [max_tokens * max_k] rows (row stride layout.sizes.row_bytes).
inline char* ep_back_rows(const EpParams& p) { return p.local + p.layout.back; }

}  // namespace moe_ext::kernels
