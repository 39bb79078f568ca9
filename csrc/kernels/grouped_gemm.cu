// Public launchers of the grouped GEMM (declared in grouped_gemm.cuh): check the requirements,
// choose a kernel, and call it (instantiated in grouped_gemm_sm80_*.cu and grouped_gemm_sm90_*.cu).
//
// Kernel choice for the forward: the Hopper kernel (TMA + wgmma) on an sm_90 device when this
// build has sm_90a code, K > 0 and E <= kSm90MaxExperts; else the portable kernel with BM = 64
// rows per tile when the experts are small (decode: M / E <= 96 rows on average in the contiguous
// layout, max_rows <= 128 in the masked one; empty 16-row fragments still issue mma, so small
// experts waste less), else BM = 128. The environment variable MOE_EXT_GROUPED_GEMM_KERNEL =
// auto | portable | sm90 overrides the choice (sm90 raises where it cannot run), so that both
// kernels can be tested and timed on one Hopper GPU.
//
// Kernel choice for the weight gradient: MOE_EXT_GROUPED_WGRAD_KERNEL = auto | portable | sm90,
// read at every call. auto is the Hopper weight gradient (grouped_gemm_sm90_wgrad_impl.cuh) on an
// sm_90 device when this build has sm_90a code and num_experts <= kSm90MaxExperts, else the
// portable one. (Its 111 GPU tests passed on an H100; its speed is not measured yet: the Hopper
// forward built the same way ran at 1.8-1.95x the portable one, bench/RESULTS.md.) sm90 forces it
// and raises where it cannot run.
#include "kernels/exception.cuh"
#include "kernels/grouped_gemm.cuh"
#include "kernels/grouped_gemm_internal.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace moe_ext::kernels {
namespace {

using gemm_detail::DeviceGroups;
using gemm_detail::FwdArgs;
using gemm_detail::WgradArgs;

constexpr int64_t kInt32Limit = int64_t{1} << 31;
// The persistent loops step `tile += gridDim.x` in int: the tile count keeps a grid's headroom.
constexpr int64_t kTileLimit = kInt32Limit - (int64_t{1} << 20);

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Rows of a (and of out) in the layout: M, or E * max_rows.
int64_t total_rows(const GemmGroups& g) {
  return g.layout == GemmLayout::kMasked ? g.num_experts * g.rows : g.rows;
}

const char* groups_unsupported(const GemmGroups& g) {
  if (g.num_experts < 1 || g.num_experts > kGroupedGemmMaxExperts)
    return "grouped_gemm: num_experts must be in [1, 2048] (kGroupedGemmMaxExperts)";
  if (g.sizes == nullptr) return "grouped_gemm: the group sizes pointer is null";
  if (g.rows < 0) return "grouped_gemm: the row count is negative";
  if (g.layout == GemmLayout::kMasked && g.sizes_are_offsets)
    return "grouped_gemm: the masked layout takes [E] valid-row counts, not offsets";
  if (total_rows(g) >= kInt32Limit) return "grouped_gemm: the rows of a must be < 2^31";
  return nullptr;
}

DeviceGroups device_groups(const GemmGroups& g) {
  DeviceGroups d;
  d.sizes = g.sizes;
  d.num_experts = static_cast<int32_t>(g.num_experts);
  d.rows = static_cast<int32_t>(g.rows);
  d.sizes_int64 = g.sizes_int64;
  d.sizes_are_offsets = g.layout == GemmLayout::kContiguous && g.sizes_are_offsets;
  d.masked = g.layout == GemmLayout::kMasked;
  return d;
}

int choose_bm(const GemmGroups& g) {
  if (g.layout == GemmLayout::kMasked) return g.rows <= 128 ? 64 : 128;
  return g.rows <= 96 * g.num_experts ? 64 : 128;
}

// Upper bound of the m-tiles the device schedule can hold: every expert with rows adds at most
// one partial tile to ceil(M / BM); the masked layout has exactly ceil(max_rows / BM) per expert.
int64_t max_m_tiles(const GemmGroups& g, int bm) {
  if (g.layout == GemmLayout::kMasked) return g.num_experts * ceil_div(g.rows, bm);
  return ceil_div(g.rows, bm) + std::min(g.num_experts, g.rows);
}

int64_t n_out_of(const GroupedGemmParams& p) { return p.activation == GemmActivation::kSwiglu ? p.n / 2 : p.n; }

enum class Kernel { kSm90, kPortable64, kPortable128 };

Kernel choose_kernel(const GroupedGemmParams& p) {
  const char* env = std::getenv("MOE_EXT_GROUPED_GEMM_KERNEL");
  const std::string want = env == nullptr ? "auto" : env;
  MOE_HOST_ASSERT(want.empty() || want == "auto" || want == "portable" || want == "sm90",
                  "MOE_EXT_GROUPED_GEMM_KERNEL must be auto, portable or sm90, got '" + want + "'");
  if (want != "portable") {
    // NOTE: TMA strides must stay under 2^40 bytes: one expert's B (N * K 16-bit elements) past
    // that would make cuTensorMapEncodeTiled fail, which CuTe only asserts (gone under NDEBUG).
    const bool fits = p.k > 0 && p.groups.num_experts <= gemm_detail::kSm90MaxExperts &&
                      static_cast<double>(p.n) * static_cast<double>(p.k) * 2.0 < 0x1p39;
    if (fits && gemm_detail::sm90_available()) return Kernel::kSm90;
    MOE_HOST_ASSERT(want != "sm90",
                    "MOE_EXT_GROUPED_GEMM_KERNEL=sm90, but the Hopper kernel cannot run this problem: it needs an "
                    "sm_90 device, an sm_90a build, K > 0, num_experts <= 1024 and one expert's b under 2^39 bytes");
  }
  return choose_bm(p.groups) == 64 ? Kernel::kPortable64 : Kernel::kPortable128;
}

template <typename T, int BM>
void launch_fwd_bm(const FwdArgs<T>& args, bool trans_b, bool swiglu, int64_t max_tiles, cudaStream_t stream) {
  using namespace gemm_detail;
#define MOE_GEMM_FWD_CASE(TRANS, SWIGLU)                                 \
  if (trans_b == TRANS && swiglu == SWIGLU) {                           \
    launch_fwd<T, BM, TRANS, SWIGLU>(args, max_tiles, stream);          \
    return;                                                             \
  }
  MOE_GEMM_FWD_CASE(false, false)
  MOE_GEMM_FWD_CASE(false, true)
  MOE_GEMM_FWD_CASE(true, false)
  MOE_GEMM_FWD_CASE(true, true)
#undef MOE_GEMM_FWD_CASE
}

template <typename T>
void launch_fwd_sm90_typed(const FwdArgs<T>& args, bool trans_b, bool swiglu, int32_t rows_total,
                           int64_t max_tiles, cudaStream_t stream) {
  using namespace gemm_detail;
#define MOE_GEMM_SM90_CASE(TRANS, SWIGLU)                                      \
  if (trans_b == TRANS && swiglu == SWIGLU) {                                 \
    launch_fwd_sm90<T, TRANS, SWIGLU>(args, rows_total, max_tiles, stream);   \
    return;                                                                   \
  }
  MOE_GEMM_SM90_CASE(false, false)
  MOE_GEMM_SM90_CASE(false, true)
  MOE_GEMM_SM90_CASE(true, false)
  MOE_GEMM_SM90_CASE(true, true)
#undef MOE_GEMM_SM90_CASE
}

template <typename T>
void launch_fwd_typed(const GroupedGemmParams& p, cudaStream_t stream) {
  FwdArgs<T> args;
  args.a = static_cast<const T*>(p.a);
  args.b = static_cast<const T*>(p.b);
  args.out = static_cast<T*>(p.out);
  args.row_scale = p.row_scale;
  args.bias = static_cast<const T*>(p.bias);
  args.k = static_cast<int32_t>(p.k);
  args.n = static_cast<int32_t>(p.n);
  args.n_out = static_cast<int32_t>(n_out_of(p));
  args.groups = device_groups(p.groups);
  const bool swiglu = p.activation == GemmActivation::kSwiglu;
  const int64_t cols_per_tile = swiglu ? gemm_detail::kBN / 2 : gemm_detail::kBN;  // the same in both kernels
  static_assert(gemm_detail::kSm90TileN == gemm_detail::kBN, "tile widths");
  switch (choose_kernel(p)) {
    case Kernel::kSm90: {
      const int64_t max_tiles = max_m_tiles(p.groups, gemm_detail::kSm90TileM) * ceil_div(args.n_out, cols_per_tile);
      launch_fwd_sm90_typed<T>(args, p.trans_b, swiglu, static_cast<int32_t>(total_rows(p.groups)), max_tiles,
                               stream);
      break;
    }
    case Kernel::kPortable64:
      launch_fwd_bm<T, 64>(args, p.trans_b, swiglu, max_m_tiles(p.groups, 64) * ceil_div(args.n_out, cols_per_tile),
                           stream);
      break;
    case Kernel::kPortable128:
      launch_fwd_bm<T, 128>(args, p.trans_b, swiglu,
                            max_m_tiles(p.groups, 128) * ceil_div(args.n_out, cols_per_tile), stream);
      break;
  }
}

enum class WgradKernel { kSm90, kPortable };

WgradKernel choose_wgrad_kernel(const GroupedGemmWgradParams& p) {
  const char* env = std::getenv("MOE_EXT_GROUPED_WGRAD_KERNEL");
  const std::string want = env == nullptr ? "auto" : env;
  MOE_HOST_ASSERT(want.empty() || want == "auto" || want == "portable" || want == "sm90",
                  "MOE_EXT_GROUPED_WGRAD_KERNEL must be auto, portable or sm90, got '" + want + "'");
  if (want == "portable") return WgradKernel::kPortable;
  const bool fits = p.groups.num_experts <= gemm_detail::kSm90MaxExperts;
  if (want != "sm90") return fits && gemm_detail::sm90_wgrad_available() ? WgradKernel::kSm90 : WgradKernel::kPortable;
  MOE_HOST_ASSERT(fits && gemm_detail::sm90_wgrad_available(),
                  "MOE_EXT_GROUPED_WGRAD_KERNEL=sm90, but the Hopper weight gradient cannot run this problem: it "
                  "needs an sm_90 device, an sm_90a build and num_experts <= 1024");
  return WgradKernel::kSm90;
}

template <typename T>
void launch_wgrad_typed(const GroupedGemmWgradParams& p, cudaStream_t stream) {
  WgradArgs<T> args;
  // grad_b[e] = x_e^T y_e: (a, grad_out) -> [K, N]; trans_b: (grad_out, a) -> [N, K].
  args.x = static_cast<const T*>(p.trans_b ? p.grad_out : p.a);
  args.y = static_cast<const T*>(p.trans_b ? p.a : p.grad_out);
  args.out = static_cast<T*>(p.grad_b);
  args.m = static_cast<int32_t>(p.trans_b ? p.n : p.k);
  args.n = static_cast<int32_t>(p.trans_b ? p.k : p.n);
  args.groups = device_groups(p.groups);
  if (choose_wgrad_kernel(p) == WgradKernel::kSm90) {
    const int64_t max_tiles = p.groups.num_experts * ceil_div(args.m, gemm_detail::kSm90WgradTileM) *
                              ceil_div(args.n, gemm_detail::kSm90WgradTileN);
    gemm_detail::launch_wgrad_sm90<T>(args, static_cast<int32_t>(total_rows(p.groups)), max_tiles, stream);
    return;
  }
  const int64_t max_tiles = p.groups.num_experts * ceil_div(args.m, 128) * ceil_div(args.n, gemm_detail::kBN);
  gemm_detail::launch_wgrad<T>(args, max_tiles, stream);
}

}  // namespace

const char* grouped_gemm_unsupported(const GroupedGemmParams& p) {
  if (const char* why = groups_unsupported(p.groups)) return why;
  if (p.k < 0 || p.n < 0) return "grouped_gemm: K and N must be >= 0";
  if (p.k % kGroupedGemmAlign != 0) return "grouped_gemm: K must be a multiple of 8 (16-byte rows)";
  if (p.activation == GemmActivation::kSwiglu && p.n % (2 * kGroupedGemmAlign) != 0)
    return "grouped_gemm: with SwiGLU, N must be a multiple of 16 (16-byte rows of each half)";
  if (p.n % kGroupedGemmAlign != 0) return "grouped_gemm: N must be a multiple of 8 (16-byte rows)";
  if (p.k >= kInt32Limit || p.n >= kInt32Limit) return "grouped_gemm: K and N must be < 2^31";
  if (!aligned16(p.a) || !aligned16(p.b) || !aligned16(p.out) || !aligned16(p.bias))
    return "grouped_gemm: a, b, out and bias must be 16-byte aligned";
  if (total_rows(p.groups) > 0 && n_out_of(p) > 0) {
    if (p.out == nullptr) return "grouped_gemm: out is null";
    if (p.k > 0 && (p.a == nullptr || p.b == nullptr)) return "grouped_gemm: a or b is null";
  }
  for (const int bm : {64, 128}) {
    const int64_t cols = p.activation == GemmActivation::kSwiglu ? gemm_detail::kBN / 2 : gemm_detail::kBN;
    if (max_m_tiles(p.groups, bm) * ceil_div(n_out_of(p), cols) >= kTileLimit)
      return "grouped_gemm: too many tiles (>= 2^31 - 2^20)";
  }
  return nullptr;
}

const char* grouped_gemm_wgrad_unsupported(const GroupedGemmWgradParams& p) {
  if (const char* why = groups_unsupported(p.groups)) return why;
  if (p.k < 0 || p.n < 0) return "grouped_gemm_wgrad: K and N must be >= 0";
  if (p.k % kGroupedGemmAlign != 0 || p.n % kGroupedGemmAlign != 0)
    return "grouped_gemm_wgrad: K and N must be multiples of 8 (16-byte rows)";
  if (p.k >= kInt32Limit || p.n >= kInt32Limit) return "grouped_gemm_wgrad: K and N must be < 2^31";
  if (!aligned16(p.a) || !aligned16(p.grad_out) || !aligned16(p.grad_b))
    return "grouped_gemm_wgrad: a, grad_out and grad_b must be 16-byte aligned";
  if (p.k > 0 && p.n > 0 && p.grad_b == nullptr) return "grouped_gemm_wgrad: grad_b is null";
  if (p.groups.num_experts * ceil_div(p.k, 128) * ceil_div(p.n, 128) >= kTileLimit)
    return "grouped_gemm_wgrad: too many tiles (>= 2^31 - 2^20)";
  return nullptr;
}

void grouped_gemm(const GroupedGemmParams& p, cudaStream_t stream) {
  const char* why = grouped_gemm_unsupported(p);
  MOE_HOST_ASSERT(why == nullptr, why == nullptr ? "" : why);
  if (total_rows(p.groups) == 0 || n_out_of(p) == 0) return;  // nothing to write
  switch (p.dtype) {
    case GemmFloat::kBFloat16: launch_fwd_typed<__nv_bfloat16>(p, stream); break;
    case GemmFloat::kFloat16: launch_fwd_typed<__half>(p, stream); break;
    default: MOE_HOST_ASSERT(false, "grouped_gemm: unsupported dtype");
  }
}

const char* grouped_gemm_kernel_name(const GroupedGemmParams& p) {
  switch (choose_kernel(p)) {
    case Kernel::kSm90: return "sm90 (TMA + wgmma, 128x128 tiles)";
    case Kernel::kPortable64: return "portable (mma.sync, 64x128 tiles)";
    case Kernel::kPortable128: return "portable (mma.sync, 128x128 tiles)";
  }
  return "?";
}

const char* grouped_gemm_wgrad_kernel_name(const GroupedGemmWgradParams& p) {
  switch (choose_wgrad_kernel(p)) {
    case WgradKernel::kSm90: return "sm90 (TMA + wgmma, 128x128 tiles, 64-row stages)";
    case WgradKernel::kPortable: return "portable (mma.sync, 128x128 tiles, 32-row stages)";
  }
  return "?";
}

void grouped_gemm_wgrad(const GroupedGemmWgradParams& p, cudaStream_t stream) {
  const char* why = grouped_gemm_wgrad_unsupported(p);
  MOE_HOST_ASSERT(why == nullptr, why == nullptr ? "" : why);
  if (p.k == 0 || p.n == 0) return;  // grad_b is empty
  switch (p.dtype) {
    case GemmFloat::kBFloat16: launch_wgrad_typed<__nv_bfloat16>(p, stream); break;
    case GemmFloat::kFloat16: launch_wgrad_typed<__half>(p, stream); break;
    default: MOE_HOST_ASSERT(false, "grouped_gemm_wgrad: unsupported dtype");
  }
}

}  // namespace moe_ext::kernels
