// Instantiates the portable grouped GEMM forward (grouped_gemm_sm80_impl.cuh) for __half with
// 128-row tiles, all four (trans_b, SwiGLU) variants, in a file of its own so that the
// configurations compile in parallel.
#include "kernels/grouped_gemm_sm80_impl.cuh"

namespace moe_ext::kernels::gemm_detail {

template void launch_fwd<__half, 128, false, false>(const FwdArgs<__half>&, int64_t, cudaStream_t);
template void launch_fwd<__half, 128, false, true>(const FwdArgs<__half>&, int64_t, cudaStream_t);
template void launch_fwd<__half, 128, true, false>(const FwdArgs<__half>&, int64_t, cudaStream_t);
template void launch_fwd<__half, 128, true, true>(const FwdArgs<__half>&, int64_t, cudaStream_t);

}  // namespace moe_ext::kernels::gemm_detail
