// CUDA implementations of permute, unpermute and unpermute_backward: validate with the checks
// the CPU ops use (so errors read the same), then device guard, current stream, outputs, and the
// torch-free launchers of csrc/kernels/permute.cu.
//
// Differences from the CPU ops, all because a check of tensor values would need a host
// synchronisation: with exact=False, expert ids outside [-1, num_experts) are treated as not
// routed (row -1) instead of raising, and unpermute skips row_map entries outside [-1, rows)
// instead of raising. permute with exact=False (the Python wrapper's default for CUDA tensors)
// never synchronises and can be captured in a CUDA graph; exact=True reads the total row count
// back once, and with it the number of invalid ids, and raises as the CPU op does.
#include "kernels/api.cuh"
#include "ops/checks.h"
#include "ops/kernel_float.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace moe_ext {
namespace {

using Tensor = at::Tensor;
using OptTensor = c10::optional<at::Tensor>;

std::tuple<Tensor, Tensor, Tensor> permute_cuda(const Tensor& x, const Tensor& idx_in, int64_t num_experts,
                                                int64_t pad_to, int64_t capacity, bool exact, int64_t max_rows) {
  check_permute(x, idx_in, num_experts, pad_to, capacity, max_rows);
  TORCH_CHECK(x.is_cuda(), "moe_ext.permute: x must be a CUDA tensor here, got ", x.device());
  TORCH_CHECK(num_experts < (int64_t{1} << 31), "moe_ext.permute: num_experts must be < 2^31, got ", num_experts);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const int64_t T = x.size(0), H = x.size(1), k = idx_in.size(1), E = num_experts;
  const Tensor idx = idx_in.contiguous();
  const auto opts = x.options();
  Tensor row_map = at::empty({T, k}, opts.dtype(at::kLong));
  Tensor tokens_per_expert = at::empty({E}, opts.dtype(at::kInt));
  Tensor total = exact ? at::empty({2}, opts.dtype(at::kLong)) : Tensor();  // rows, invalid ids
  Tensor workspace = at::empty({static_cast<int64_t>(kernels::permute_workspace_bytes(T, k, E))}, opts.dtype(at::kByte));

  kernels::PermuteParams p;
  p.idx = idx.data_ptr();
  p.idx_is_int64 = idx.scalar_type() == at::kLong;
  p.num_tokens = T;
  p.k = k;
  p.num_experts = E;
  p.pad_to = pad_to;
  p.capacity = capacity;
  p.max_rows = max_rows;
  p.x = x.data_ptr();
  p.row_bytes = H * static_cast<int64_t>(x.element_size());
  p.x_row_stride = x.stride(0) * static_cast<int64_t>(x.element_size());
  p.row_map = row_map.data_ptr<int64_t>();
  p.tokens_per_expert = tokens_per_expert.data_ptr<int32_t>();
  p.total_rows = exact ? total.data_ptr<int64_t>() : nullptr;
  p.invalid_ids = exact ? total.data_ptr<int64_t>() + 1 : nullptr;
  p.workspace = workspace.data_ptr();
  kernels::permute_route(p, stream);

  // NOTE: exact mode's one device-to-host read (16 bytes); the worst case needs none.
  int64_t rows = max_rows >= 1 ? E * max_rows : permute_max_rows(T, k, E, pad_to, capacity);
  if (exact) {
    const Tensor host = total.cpu();
    rows = host.data_ptr<int64_t>()[0];  // E * max_rows in the masked layout
    const int64_t invalid = host.data_ptr<int64_t>()[1];
    TORCH_CHECK(invalid == 0, "moe_ext.permute: idx holds ", invalid, " expert id(s) outside [-1, num_experts=", E,
                ")");
  }
  Tensor x_perm = at::empty({rows, H}, opts);
  p.x_perm = x_perm.data_ptr();
  p.out_rows = rows;
  kernels::permute_scatter(p, stream);
  return {x_perm, row_map, tokens_per_expert};
}

Tensor unpermute_cuda(const Tensor& y, const Tensor& row_map_in, const OptTensor& weights) {
  check_unpermute(y, row_map_in, weights);
  TORCH_CHECK(y.is_cuda(), "moe_ext.unpermute: y_perm must be a CUDA tensor here, got ", y.device());
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const int64_t T = row_map_in.size(0), k = row_map_in.size(1), H = y.size(1);
  const Tensor row_map = row_map_in.contiguous();
  const Tensor w = weights.has_value() ? weights->to(acc_dtype(y.scalar_type())).contiguous() : Tensor();
  Tensor out = at::empty({T, H}, y.options());

  kernels::UnpermuteParams p;
  p.dtype = kernel_float(y.scalar_type(), "moe_ext.unpermute: y_perm");
  p.y = y.data_ptr();
  p.y_rows = y.size(0);
  p.y_row_stride = y.stride(0);
  p.row_map = row_map.data_ptr<int64_t>();
  p.weights = w.defined() ? w.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.num_tokens = T;
  p.k = k;
  p.hidden = H;
  kernels::unpermute(p, stream);
  return out;
}

std::tuple<Tensor, Tensor> unpermute_backward_cuda(const Tensor& grad_out_in, const Tensor& y,
                                                   const Tensor& row_map_in, const OptTensor& weights) {
  check_unpermute_backward(grad_out_in, y, row_map_in, weights);
  TORCH_CHECK(y.is_cuda(), "moe_ext.unpermute_backward: y_perm must be a CUDA tensor here, got ", y.device());
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const int64_t T = row_map_in.size(0), k = row_map_in.size(1), H = y.size(1), R = y.size(0);
  const Tensor row_map = row_map_in.contiguous();
  const Tensor grad_out = grad_out_in.to(y.scalar_type()).contiguous();
  const Tensor w = weights.has_value() ? weights->to(acc_dtype(y.scalar_type())).contiguous() : Tensor();
  Tensor grad_y = at::empty({R, H}, y.options());
  Tensor grad_w = weights.has_value() ? at::empty({T, k}, weights->options()) : at::empty({0}, y.options());
  // The kernel reduces in float64; the cast to the weights' dtype is the same copy_ the CPU op does.
  Tensor grad_w64 = weights.has_value() ? at::empty({T, k}, y.options().dtype(at::kDouble)) : Tensor();
  Tensor workspace = at::empty({static_cast<int64_t>(kernels::unpermute_backward_workspace_bytes(R))},
                               y.options().dtype(at::kByte));

  kernels::UnpermuteBackwardParams p;
  p.dtype = kernel_float(y.scalar_type(), "moe_ext.unpermute: y_perm");
  p.grad_out = grad_out.data_ptr();
  p.y = y.data_ptr();
  p.y_rows = R;
  p.y_row_stride = y.stride(0);
  p.row_map = row_map.data_ptr<int64_t>();
  p.weights = w.defined() ? w.data_ptr() : nullptr;
  p.grad_y = grad_y.data_ptr();
  p.grad_weights = grad_w64.defined() ? grad_w64.data_ptr<double>() : nullptr;
  p.workspace = workspace.data_ptr();
  p.num_tokens = T;
  p.k = k;
  p.hidden = H;
  kernels::unpermute_backward(p, stream);
  if (grad_w64.defined()) grad_w.copy_(grad_w64);
  return {grad_y, grad_w};
}

// Replica choice: one block for a decode-sized call (one launch, CUDA-graph safe); larger calls run
// the same rule as tensor ops (a stable sort by expert gives each assignment its n). Ids outside
// [-1, E) are treated as not routed (the CPU op raises: the check would need a host sync).
Tensor route_to_replicas_cuda(const Tensor& idx_in, const Tensor& counts_in, const Tensor& slots_in, int64_t rank) {
  check_route_to_replicas(idx_in, counts_in, slots_in, rank);
  TORCH_CHECK(idx_in.is_cuda(), "moe_ext.route_to_replicas: idx must be a CUDA tensor here, got ", idx_in.device());
  const c10::cuda::CUDAGuard guard(idx_in.device());
  const Tensor idx = idx_in.contiguous(), counts = counts_in.contiguous(), slots = slots_in.contiguous();
  const int64_t n = idx.numel(), E = counts.numel(), C = slots.size(1);
  if (n <= kernels::kReplicaRouteMaxSlots && E <= kernels::kReplicaRouteMaxExperts) {
    Tensor phys = at::empty_like(idx);
    kernels::route_to_replicas(idx.data_ptr(), idx.scalar_type() == at::kLong, n, E, counts.data_ptr<int64_t>(),
                               slots.data_ptr<int64_t>(), C, rank, phys.data_ptr(),
                               c10::cuda::getCurrentCUDAStream().stream());
    return phys;
  }
  const Tensor flat = idx.reshape({-1}).to(at::kLong);
  const Tensor routed = flat.ge(0).logical_and(flat.lt(E));
  const Tensor key = at::where(routed, flat, E);
  const Tensor order = std::get<1>(at::sort(key, /*stable=*/true));
  const Tensor seg = at::zeros({E + 1}, flat.options()).scatter_add_(0, key, at::ones_like(key));
  const Tensor start = seg.cumsum(0) - seg;
  Tensor nth = at::empty_like(flat);
  nth.index_put_({order}, at::arange(n, flat.options()) - start.index({key.index({order})}));
  const Tensor e = flat.clamp(0, E - 1);
  const Tensor c = counts.index({e}).clamp_min(1);
  const Tensor phys = at::where(routed, slots.index({e, (nth + rank).remainder(c)}), -1);
  return phys.view(idx.sizes()).to(idx.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("route_to_replicas", &route_to_replicas_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace moe_ext
