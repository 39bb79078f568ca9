// Instantiates the gating row kernels (gating_impl.cuh) for float logits, in a file of their own
// so that the four logits types compile in parallel.
#include "kernels/gating_impl.cuh"

namespace moe_ext::kernels::gating_detail {

template void launch_route<float>(RouteArgs<Types<float>::acc_t>, cudaStream_t);
template void launch_grad<float>(GradArgs<Types<float>::acc_t>, cudaStream_t);

}  // namespace moe_ext::kernels::gating_detail
