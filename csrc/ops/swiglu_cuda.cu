// CUDA implementations of swiglu and swiglu_backward: the CPU ops' checks, then the launchers of
// csrc/kernels/swiglu.cu on the current stream (no host synchronisation).
#include "kernels/swiglu.cuh"
#include "ops/checks.h"
#include "ops/kernel_float.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace moe_ext {
namespace {

at::Tensor swiglu_cuda(const at::Tensor& h_in) {
  check_swiglu(h_in);
  TORCH_CHECK(h_in.is_cuda(), "moe_ext.swiglu: h must be a CUDA tensor here, got ", h_in.device());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  at::Tensor out = at::empty({h.size(0), h.size(1) / 2}, h.options());
  kernels::SwigluForwardParams p;
  p.dtype = kernel_float(h.scalar_type(), "moe_ext.swiglu: h");
  p.h = h.data_ptr();
  p.out = out.data_ptr();
  p.rows = h.size(0);
  p.n = h.size(1) / 2;
  kernels::swiglu_forward(p, c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& h_in) {
  check_swiglu_backward(grad_in, h_in);
  TORCH_CHECK(h_in.is_cuda(), "moe_ext.swiglu_backward: h must be a CUDA tensor here, got ", h_in.device());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  // g in h's dtype, or else in the accumulation type (exact for every narrower float type), as the CPU op.
  const bool same = grad_in.scalar_type() == h.scalar_type();
  const at::Tensor grad = (same ? grad_in : grad_in.to(acc_dtype(h.scalar_type()))).contiguous();
  at::Tensor out = at::empty_like(h);

  kernels::SwigluBackwardParams p;
  p.dtype = kernel_float(h.scalar_type(), "moe_ext.swiglu_backward: h");
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

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace moe_ext
