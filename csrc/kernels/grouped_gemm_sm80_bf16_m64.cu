// Instantiates the portable grouped GEMM forward (grouped_gemm_sm80_impl.cuh) for __nv_bfloat16 with
// 64-row tiles, all four (trans_b, SwiGLU) variants, in a file of its own so that the
// configurations compile in parallel.
#include "kernels/grouped_gemm_sm80_impl.cuh"

namespace moe_ext::kernels::gemm_detail {

template void launch_fwd<__nv_bfloat16, 64, false, false>(const FwdArgs<__nv_bfloat16>&, int64_t, cudaStream_t);
template void launch_fwd<__nv_bfloat16, 64, false, true>(const FwdArgs<__nv_bfloat16>&, int64_t, cudaStream_t);
template void launch_fwd<__nv_bfloat16, 64, true, false>(const FwdArgs<__nv_bfloat16>&, int64_t, cudaStream_t);
template void launch_fwd<__nv_bfloat16, 64, true, true>(const FwdArgs<__nv_bfloat16>&, int64_t, cudaStream_t);

}  // namespace moe_ext::kernels::gemm_detail
