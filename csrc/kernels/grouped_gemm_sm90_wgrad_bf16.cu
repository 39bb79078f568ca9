// Instantiates the Hopper weight gradient (grouped_gemm_sm90_wgrad_impl.cuh) for __nv_bfloat16, in a
// file of its own so that the configurations compile in parallel.
#include "kernels/grouped_gemm_sm90_wgrad_impl.cuh"

namespace moe_ext::kernels::gemm_detail {

template void launch_wgrad_sm90<__nv_bfloat16>(const WgradArgs<__nv_bfloat16>&, int32_t, int64_t, cudaStream_t);

bool sm90_wgrad_available() { return gemm_sm90_wgrad::available(); }

}  // namespace moe_ext::kernels::gemm_detail
