// CPU SwiGLU forward and gradient: the reference of csrc/kernels/swiglu.cu, operation for operation.
#include "cpu/cpu_ops.h"
#include "ops/checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace moe_ext::cpu {
namespace {

int64_t rows_per_task(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

template <typename T>
void swiglu_rows(const T* h, T* out, int64_t rows, int64_t n) {
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, rows, rows_per_task(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* hr = h + r * 2 * n;
      T* o = out + r * n;
      for (int64_t c = 0; c < n; ++c) {
        const acc_t x = static_cast<acc_t>(hr[c]);
        o[c] = static_cast<T>((x / (acc_t(1) + std::exp(-x))) * static_cast<acc_t>(hr[n + c]));
      }
    }
  });
}

template <typename TH, typename TG>
void swiglu_backward_rows(const TG* grad, const TH* h, TH* out, int64_t rows, int64_t n) {
  using acc_t = at::opmath_type<TH>;
  at::parallel_for(0, rows, rows_per_task(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const TH* hr = h + r * 2 * n;
      const TG* gr = grad + r * n;
      TH* o = out + r * 2 * n;
      for (int64_t c = 0; c < n; ++c) {
        const acc_t x = static_cast<acc_t>(hr[c]), u = static_cast<acc_t>(hr[n + c]), g = static_cast<acc_t>(gr[c]);
        const acc_t sig = acc_t(1) / (acc_t(1) + std::exp(-x));
        const acc_t silu = x * sig;
        const acc_t dsilu = sig * (acc_t(1) + x * (acc_t(1) - sig));
        o[c] = static_cast<TH>((g * u) * dsilu);
        o[n + c] = static_cast<TH>(g * silu);
      }
    }
  });
}

template <typename TH>
void dispatch_grad(const at::Tensor& grad, const at::Tensor& h, at::Tensor& out) {
  const int64_t rows = h.size(0), n = h.size(1) / 2;
  if (grad.scalar_type() == h.scalar_type())
    swiglu_backward_rows<TH, TH>(grad.data_ptr<TH>(), h.data_ptr<TH>(), out.data_ptr<TH>(), rows, n);
  else
    swiglu_backward_rows<TH, float>(grad.data_ptr<float>(), h.data_ptr<TH>(), out.data_ptr<TH>(), rows, n);
}

}  // namespace

at::Tensor swiglu(const at::Tensor& h_in) {
  const at::Tensor h = h_in.contiguous();
  const int64_t rows = h.size(0), n = h.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "moe_ext_swiglu", [&] {
    swiglu_rows(h.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n);
  });
  return out;
}

at::Tensor swiglu_backward(const at::Tensor& grad_in, const at::Tensor& h_in) {
  const at::Tensor h = h_in.contiguous();
  // g in h's dtype, or else in the accumulation type (exact for every narrower float type).
  const at::Tensor grad =
      (grad_in.scalar_type() == h.scalar_type() ? grad_in : grad_in.to(acc_dtype(h.scalar_type()))).contiguous();
  at::Tensor out = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "moe_ext_swiglu_backward",
                                  [&] { dispatch_grad<scalar_t>(grad, h, out); });
  return out;
}

}  // namespace moe_ext::cpu
