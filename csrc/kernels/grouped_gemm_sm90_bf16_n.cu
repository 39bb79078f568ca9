// Instantiates the Hopper grouped GEMM (grouped_gemm_sm90_impl.cuh) for __nv_bfloat16 with
// trans_b=false, without and with SwiGLU, in a file of its own so that the configurations compile
// in parallel.
#include "kernels/grouped_gemm_sm90_impl.cuh"

namespace moe_ext::kernels::gemm_detail {

template void launch_fwd_sm90<__nv_bfloat16, false, false>(const FwdArgs<__nv_bfloat16>&, int32_t, int64_t,
                                                           cudaStream_t);
template void launch_fwd_sm90<__nv_bfloat16, false, true>(const FwdArgs<__nv_bfloat16>&, int32_t, int64_t,
                                                           cudaStream_t);

bool sm90_available() { return gemm_sm90::available(); }

}  // namespace moe_ext::kernels::gemm_detail
