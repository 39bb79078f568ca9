// Instantiates the gating row kernels (gating_impl.cuh) for __half logits, in a file of their own
// so that the four logits types compile in parallel.
#include "kernels/gating_impl.cuh"

namespace moe_ext::kernels::gating_detail {

template void launch_route<__half>(RouteArgs<Types<__half>::acc_t>, cudaStream_t);
template void launch_grad<__half>(GradArgs<Types<__half>::acc_t>, cudaStream_t);

}  // namespace moe_ext::kernels::gating_detail
