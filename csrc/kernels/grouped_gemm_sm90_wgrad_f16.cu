// Instantiates the Hopper weight gradient (grouped_gemm_sm90_wgrad_impl.cuh) for __half, in a file of
// its own so that the configurations compile in parallel.
#include "kernels/grouped_gemm_sm90_wgrad_impl.cuh"

namespace moe_ext::kernels::gemm_detail {

template void launch_wgrad_sm90<__half>(const WgradArgs<__half>&, int32_t, int64_t, cudaStream_t);

}  // namespace moe_ext::kernels::gemm_detail
