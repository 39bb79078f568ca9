// Instantiates the portable k-grouped weight-gradient kernel (grouped_gemm_sm80_impl.cuh) for
// bf16 and fp16.
#include "kernels/grouped_gemm_sm80_impl.cuh"

namespace moe_ext::kernels::gemm_detail {

template void launch_wgrad<__nv_bfloat16>(const WgradArgs<__nv_bfloat16>&, int64_t, cudaStream_t);
template void launch_wgrad<__half>(const WgradArgs<__half>&, int64_t, cudaStream_t);

}  // namespace moe_ext::kernels::gemm_detail
