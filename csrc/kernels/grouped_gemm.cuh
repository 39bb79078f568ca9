// Grouped expert GEMM on the GPU: every expert's rows times that expert's weight, in one launch,
// with the group sizes read on the device (no host synchronisation, CUDA-graph safe), and the
// k-grouped weight gradient. Torch-free launchers: raw pointers, int64 sizes, a cudaStream_t.
// The semantics are those of the CPU op (csrc/cpu/grouped_gemm.cpp).
//
// ---- Layouts -----------------------------------------------------------------------------------
//   contiguous  a [M, K]: the rows of all experts back to back; group_sizes [E] counts or [E+1]
//               offsets (int32 or int64, on the device). Rows past the last group (worst-case
//               sized buffers) get zero output rows.
//   masked      a [E, max_rows, K]: expert e's rows are a[e, :valid_rows[e]] (decode, DeepEP's
//               low-latency layout); group_sizes [E] = valid_rows on the device; the output is
//               [E, max_rows, N'] with rows past valid_rows[e] zero. The grid depends only on
//               shapes, so a captured graph stays valid whatever the counts are at replay.
// b is [E, K, N] (row-major, N contiguous) or, with trans_b, [E, N, K] (K contiguous: nn.Linear
// weights). The output has N' = N columns, or N/2 with SwiGLU.
//
// ---- Epilogue (on the fp32 accumulator h = a_e @ b_e, per output element) --------------------
//   h += bias[e, :]                     optional bias [E, N] in the element type (before the
//                                       activation; both gate and up halves with SwiGLU)
//   y  = h                              activation none
//   y  = silu(h[:, j]) * h[:, N/2 + j]  activation swiglu (gate half first, as the CPU op)
//   y *= row_scale[row]                 optional float32 per output row (the routing weight)
//   out = cast(y)                       in the element type of a
//
// ---- Values the device cannot check -----------------------------------------------------------
// The CPU op raises on negative counts, offsets that decrease or do not start at 0, and counts
// that sum past M; checking that here would need a host synchronisation. The kernels instead
// clamp: negative counts (and decreasing offsets) count as 0 rows, offsets[0] is taken as 0, rows
// past M are dropped, and valid_rows is clamped to [0, max_rows]. Every output row is still
// written exactly once.
//
// ---- Requirements (the op adapter checks them first, with messages naming the argument) -------
//   dtype bf16 or fp16 (fp32/fp64 take the ATen path in the adapter); K % 8 == 0 and N' % 8 == 0
//   (16-byte rows; with SwiGLU N % 16 == 0); a, b, out, bias 16-byte aligned; 1 <= E <=
//   kGroupedGemmMaxExperts; every row count and K, N < 2^31.
//
// ---- The portable kernel (sm_80 and later; grouped_gemm_sm80_impl.cuh) -----------------------
// mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) fed by ldmatrix from XOR-swizzled shared
// memory, a 4-stage cp.async pipeline (K tiles of 32), 256 threads as 2 x 4 warps. Tiles are
// BM x 128 (BM = 128, or 64 when the experts are small: decode). Each CTA is persistent: it first
// reads the E group sizes and builds, in its own shared memory, every expert's row range, the
// rows it owns in the output and the prefix of m-tiles per expert (block scans; ~E/256 rounds);
// then it walks the linear tile index t = blockIdx.x, + gridDim.x, ... over (m-tile, n-tile)
// pairs of all experts (raster bands of 16 m-tiles so that live tiles share A and B in L2), and
// finds a tile's expert by binary search in that prefix. Empty experts own no m-tiles and cost
// nothing; a tile that straddles the end of its expert's rows zero-fills the loads of the rows
// past it (cp.async with src-size 0) and does not store them (they belong to the next expert).
// K tails zero-fill, N tails are predicated. SwiGLU: the 128 B columns of a tile are 64 gate
// columns and the 64 matching up columns, interleaved in 16-column groups so that each thread's
// accumulator fragments hold matching gate/up pairs; the epilogue combines them in registers.
// The output tile is staged through shared memory and written with 16-byte stores.
// The weight gradient uses the same schedule with the reduction over each expert's rows:
// dW_e = A_e^T dY_e ([K, N]) or, with trans_b, dY_e^T A_e ([N, K]); both operands are row-major
// [rows, *] so both are read with ldmatrix.trans; an expert without rows writes zeros.
//
// ---- The Hopper kernel (sm_90a; grouped_gemm_sm90_impl.cuh) -----------------------------------
// Chosen automatically on sm_90 devices when the build has sm_90a code, K > 0 and E <= 1024 (its
// schedule shares shared memory with the pipeline); MOE_EXT_GROUPED_GEMM_KERNEL = auto | portable
// | sm90 overrides. 384 threads: a producer warpgroup whose thread 0 issues TMA loads (A box
// 128 x 64 from one 2-D tensor map at the tile's first row, any row; B as two 64 x 64 boxes from
// one 3-D tensor map over [E, K, N] / [E, N, K], the expert a coordinate) into a 4-stage ring with
// full/empty mbarriers, and two consumer warpgroups running wgmma m64n128k16 from shared-memory
// descriptors (CuTe builds the descriptors, the swizzled layouts and the tensor maps). SwiGLU
// needs no interleaving here: the two B boxes are the gate and the up columns, and a consumer's
// fragments span all 128 columns. Same device schedule as the portable kernel; epilogue through
// a fp32 staging tile per consumer (bias, SwiGLU, row scale, 16-byte stores).
// MOE_EXT_SM90_MMA_IN_FLIGHT=1 (both Hopper kernels) keeps one wgmma batch in flight per
// consumer (wait<1>, release the previous stage); written in session 9, not yet run on a GPU, so
// 0 (wait for each stage's batch) stays the default until it is tested and timed.
// Next steps, measured first: 128 x 256 tiles (N = 256 atoms, 2 x 64-row consumers, setmaxnreg 240/40);
// overlap a consumer's epilogue with its next tile (or ping-pong consumers on alternate tiles);
// TMA multicast of B across a 2-CTA cluster for experts with many m-tiles.
//
// ---- The Hopper weight gradient (sm_90a; grouped_gemm_sm90_wgrad_impl.cuh) --------------------
// Chosen automatically on sm_90 devices with an sm_90a build and E <= 1024 (its 111 GPU tests
// passed on an H100 in session 8; not timed yet). MOE_EXT_GROUPED_WGRAD_KERNEL = auto | portable |
// sm90 (read at every call) overrides; sm90 raises where it cannot run. Same CTA as the forward: a producer thread
// issuing TMA boxes of 64 columns x 64 rows from one 2-D tensor map over x [rows, m] and one over
// y [rows, n] ((x, y) = (a, grad_out), or (grad_out, a) with trans_b), both MN-major operands of
// wgmma m64n128k16 (transposed shared-memory descriptors, CuTe's Layout_MN_SW128_Atom), a 4-stage
// mbarrier ring, two consumer warpgroups, 128 x 128 output tiles walked expert-major by a
// persistent CTA, 64 rows of the expert per stage starting at its first row. The last stage of
// an expert runs into the next expert's rows (TMA zero-fills only outside the whole tensor): the
// consumers zero those shared-memory rows of both operands (fence.proxy.async, a 256-thread
// barrier) before the wgmma reads them. Experts without rows store zeros.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moe_ext::kernels {

// The schedule of every CTA lives in its shared memory (16 bytes per expert).
constexpr int64_t kGroupedGemmMaxExperts = 2048;
// K and the output's N must be multiples of this (16-byte rows of bf16/fp16).
constexpr int64_t kGroupedGemmAlign = 8;

enum class GemmFloat : int { kFloat16, kBFloat16 };
enum class GemmActivation : int { kNone, kSwiglu };
enum class GemmLayout : int { kContiguous, kMasked };

// How the group sizes on the device describe the experts' rows.
struct GemmGroups {
  GemmLayout layout = GemmLayout::kContiguous;
  const void* sizes = nullptr;     // contiguous: [E] counts or [E+1] offsets; masked: [E] valid rows
  bool sizes_int64 = false;        // int64 (else int32)
  bool sizes_are_offsets = false;  // contiguous only: [E+1] offsets starting at 0
  int64_t num_experts = 0;
  int64_t rows = 0;  // contiguous: M, the rows of a and out; masked: max_rows per expert
};

struct GroupedGemmParams {
  GemmFloat dtype = GemmFloat::kBFloat16;
  GemmGroups groups;
  const void* a = nullptr;  // contiguous [M, K]; masked [E, max_rows, K]
  const void* b = nullptr;  // [E, K, N], or [E, N, K] with trans_b
  void* out = nullptr;      // contiguous [M, N']; masked [E, max_rows, N']; N' = N or N/2 (swiglu)
  int64_t k = 0;
  int64_t n = 0;  // columns of b (both halves with SwiGLU)
  bool trans_b = false;
  GemmActivation activation = GemmActivation::kNone;
  const float* row_scale = nullptr;  // [rows of out] float32, or null
  const void* bias = nullptr;        // [E, N] element type, or null
};

// out = epilogue(a_e @ b_e) for every expert; rows no expert owns are zero. Never synchronises.
void grouped_gemm(const GroupedGemmParams& p, cudaStream_t stream);

// The k-grouped weight gradient: grad_b[e] = a_e^T grad_out_e ([K, N]) or, with trans_b,
// grad_out_e^T a_e ([N, K]), fp32 accumulation over the expert's rows, zero for experts without
// rows. a [rows, K] and grad_out [rows, N] in the layout of `groups` (masked: [E, max_rows, *]).
struct GroupedGemmWgradParams {
  GemmFloat dtype = GemmFloat::kBFloat16;
  GemmGroups groups;
  const void* a = nullptr;
  const void* grad_out = nullptr;
  void* grad_b = nullptr;  // [E, K, N], or [E, N, K] with trans_b
  int64_t k = 0;
  int64_t n = 0;
  bool trans_b = false;
};

void grouped_gemm_wgrad(const GroupedGemmWgradParams& p, cudaStream_t stream);

// Which kernel grouped_gemm() runs for p on the current device (for benchmarks and logs).
const char* grouped_gemm_kernel_name(const GroupedGemmParams& p);
// ... and grouped_gemm_wgrad() (throws as grouped_gemm_wgrad does where a forced kernel cannot run).
const char* grouped_gemm_wgrad_kernel_name(const GroupedGemmWgradParams& p);

// Host-side check of the requirements above: nullptr if the problem can run, else why not (the
// launchers throw moe_ext::Error with the same text).
const char* grouped_gemm_unsupported(const GroupedGemmParams& p);
const char* grouped_gemm_wgrad_unsupported(const GroupedGemmWgradParams& p);

}  // namespace moe_ext::kernels
