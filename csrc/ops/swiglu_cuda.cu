// CUDA implementation of swiglu_backward: the CPU op's checks, then the launcher of
// csrc/kernels/swiglu.cu on the current stream (no host synchronisation).
#include "kernels/swiglu.cuh"
#include "ops/checks.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace moe_ext {
namespace {

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& h_in) {
  check_swiglu_backward(grad_in, h_in);
  TORCH_CHECK(h_in.is_cuda(), "moe_ext.swiglu_backward: h must be a CUDA tensor here, got ", h_in.device());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const at::ScalarType acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // g in h's dtype, or else in the accumulation type (exact for every narrower float type), as the CPU op.
  const bool same = grad_in.scalar_type() == h.scalar_type();
  const at::Tensor grad = (same ? grad_in : grad_in.to(acc)).contiguous();
  at::Tensor out = at::empty_like(h);

  kernels::SwigluBackwardParams p;
  switch (h.scalar_type()) {
    case at::kFloat: p.dtype = kernels::PermuteFloat::kFloat32; break;
    case at::kDouble: p.dtype = kernels::PermuteFloat::kFloat64; break;
    case at::kHalf: p.dtype = kernels::PermuteFloat::kFloat16; break;
    default: p.dtype = kernels::PermuteFloat::kBFloat16; break;  // the checks allow no other
  }
  p.grad_is_acc = !same;
  p.grad = grad.data_ptr();
  p.h = h.data_ptr();
  p.out = out.data_ptr();
  p.rows = h.size(0);
  p.n = h.size(1) / 2;
  kernels::swiglu_backward(p, c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) { m.impl("swiglu_backward", &swiglu_backward_cuda); }

}  // namespace moe_ext
