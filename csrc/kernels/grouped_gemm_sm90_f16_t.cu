// Instantiates the Hopper grouped GEMM (grouped_gemm_sm90_impl.cuh) for __half with
// trans_b=true, without and with SwiGLU, in a file of its own so that the configurations compile
// in parallel.
#include "kernels/grouped_gemm_sm90_impl.cuh"

namespace moe_ext::kernels::gemm_detail {

template void launch_fwd_sm90<__half, true, false>(const FwdArgs<__half>&, int32_t, int64_t,
                                                           cudaStream_t);
template void launch_fwd_sm90<__half, true, true>(const FwdArgs<__half>&, int32_t, int64_t,
                                                           cudaStream_t);

}  // namespace moe_ext::kernels::gemm_detail
