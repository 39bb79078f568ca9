// Instantiates the gating row kernels (gating_impl.cuh) for double logits, in a file of their own
// so that the four logits types compile in parallel.
#include "kernels/gating_impl.cuh"

namespace moe_ext::kernels::gating_detail {

template void launch_route<double>(RouteArgs<Types<double>::acc_t>, cudaStream_t);
template void launch_grad<double>(GradArgs<Types<double>::acc_t>, cudaStream_t);

}  // namespace moe_ext::kernels::gating_detail
