// Instantiates the gating row kernels (gating_impl.cuh) for __nv_bfloat16 logits, in a file of their own
// so that the four logits types compile in parallel.
#include "kernels/gating_impl.cuh"

namespace moe_ext::kernels::gating_detail {

template void launch_route<__nv_bfloat16>(RouteArgs<Types<__nv_bfloat16>::acc_t>, cudaStream_t);
template void launch_grad<__nv_bfloat16>(GradArgs<Types<__nv_bfloat16>::acc_t>, cudaStream_t);

}  // namespace moe_ext::kernels::gating_detail
