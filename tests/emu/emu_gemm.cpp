// The portable (sm_80) grouped GEMM on the emulation: C entry points, and stubs for the Hopper
// kernels (TMA + wgmma cannot be emulated here; the launchers then pick the portable kernel).
#include "emu_cuda.h"
#include "emu_api.h"
#include "kernels/grouped_gemm.cuh"
#include "kernels/grouped_gemm_internal.cuh"

namespace moe_ext::kernels::gemm_detail {

bool sm90_available() { return false; }
bool sm90_wgrad_available() { return false; }

template <typename T, bool kTransB, bool kSwiglu>
void launch_fwd_sm90(const FwdArgs<T>&, int32_t, int64_t, cudaStream_t) {
  emu::fail("the sm90 grouped GEMM is not emulated");
}
template <typename T>
void launch_wgrad_sm90(const WgradArgs<T>&, int32_t, int64_t, cudaStream_t) {
  emu::fail("the sm90 grouped GEMM weight gradient is not emulated");
}

#define EMU_SM90_STUB(T)                                                                        \
  template void launch_fwd_sm90<T, false, false>(const FwdArgs<T>&, int32_t, int64_t, cudaStream_t); \
  template void launch_fwd_sm90<T, false, true>(const FwdArgs<T>&, int32_t, int64_t, cudaStream_t);  \
  template void launch_fwd_sm90<T, true, false>(const FwdArgs<T>&, int32_t, int64_t, cudaStream_t);  \
  template void launch_fwd_sm90<T, true, true>(const FwdArgs<T>&, int32_t, int64_t, cudaStream_t);   \
  template void launch_wgrad_sm90<T>(const WgradArgs<T>&, int32_t, int64_t, cudaStream_t);
EMU_SM90_STUB(__nv_bfloat16)
EMU_SM90_STUB(__half)

}  // namespace moe_ext::kernels::gemm_detail

namespace k = moe_ext::kernels;

namespace {
k::GemmGroups groups(int masked, const void* sizes, int sizes64, int offsets, int64_t E, int64_t rows) {
  k::GemmGroups g;
  g.layout = masked ? k::GemmLayout::kMasked : k::GemmLayout::kContiguous;
  g.sizes = sizes;
  g.sizes_int64 = sizes64 != 0;
  g.sizes_are_offsets = offsets != 0;
  g.num_experts = E;
  g.rows = rows;
  return g;
}
}  // namespace

extern "C" {

// dtype: 0 float16, 1 bfloat16.
int emu_grouped_gemm(int dtype, int masked, const void* sizes, int sizes64, int offsets, int64_t E, int64_t rows,
                     const void* a, const void* b, void* out, int64_t K, int64_t N, int trans_b, int swiglu,
                     const float* row_scale, const void* bias) {
  return emu_guarded([&] {
    k::GroupedGemmParams p;
    p.dtype = static_cast<k::GemmFloat>(dtype);
    p.groups = groups(masked, sizes, sizes64, offsets, E, rows);
    p.a = a;
    p.b = b;
    p.out = out;
    p.k = K;
    p.n = N;
    p.trans_b = trans_b != 0;
    p.activation = swiglu ? k::GemmActivation::kSwiglu : k::GemmActivation::kNone;
    p.row_scale = row_scale;
    p.bias = bias;
    if (const char* why = k::grouped_gemm_unsupported(p)) emu::fail(why);
    k::grouped_gemm(p, nullptr);
  });
}

// The kernel the launcher picks for a contiguous / masked problem of these sizes.
const char* emu_grouped_gemm_kernel_name(int dtype, int masked, int64_t E, int64_t rows, int64_t K, int64_t N) {
  k::GroupedGemmParams p;
  p.dtype = static_cast<k::GemmFloat>(dtype);
  p.groups = groups(masked, nullptr, 0, 0, E, rows);
  p.k = K;
  p.n = N;
  return k::grouped_gemm_kernel_name(p);
}

int emu_grouped_gemm_wgrad(int dtype, int masked, const void* sizes, int sizes64, int offsets, int64_t E,
                           int64_t rows, const void* a, const void* grad_out, void* grad_b, int64_t K, int64_t N,
                           int trans_b) {
  return emu_guarded([&] {
    k::GroupedGemmWgradParams p;
    p.dtype = static_cast<k::GemmFloat>(dtype);
    p.groups = groups(masked, sizes, sizes64, offsets, E, rows);
    p.a = a;
    p.grad_out = grad_out;
    p.grad_b = grad_b;
    p.k = K;
    p.n = N;
    p.trans_b = trans_b != 0;
    if (const char* why = k::grouped_gemm_wgrad_unsupported(p)) emu::fail(why);
    k::grouped_gemm_wgrad(p, nullptr);
  });
}

}  // extern "C"
