// CPU SwiGLU forward and gradient: the reference of csrc/kernels/swiglu.cu, operation for operation.
#include "cpu/cpu_ops.h"
#include "ops/checks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace moe_ext::cpu {
namespace {

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

int64_t rows_per_task(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

template <typename T>
void swiglu_rows(const T* h, T* out, int64_t rows, int64_t n) {
  using acc_t = acc_of<T>;
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
  using acc_t = acc_of<TH>;
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
  switch (h.scalar_type()) {
    case at::kFloat: swiglu_rows(h.data_ptr<float>(), out.data_ptr<float>(), rows, n); break;
    case at::kDouble: swiglu_rows(h.data_ptr<double>(), out.data_ptr<double>(), rows, n); break;
    case at::kHalf: swiglu_rows(h.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, n); break;
    case at::kBFloat16: swiglu_rows(h.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, n); break;
    default: TORCH_CHECK(false, "moe_ext.swiglu: h must be float32, float64, float16 or bfloat16");
  }
  return out;
}

at::Tensor swiglu_backward(const at::Tensor& grad_in, const at::Tensor& h_in) {
  const at::Tensor h = h_in.contiguous();
  // g in h's dtype, or else in the accumulation type (exact for every narrower float type).
  const at::Tensor grad =
      (grad_in.scalar_type() == h.scalar_type() ? grad_in : grad_in.to(acc_dtype(h.scalar_type()))).contiguous();
  at::Tensor out = at::empty_like(h);
  switch (h.scalar_type()) {
    case at::kFloat: dispatch_grad<float>(grad, h, out); break;
    case at::kDouble: dispatch_grad<double>(grad, h, out); break;
    case at::kHalf: dispatch_grad<c10::Half>(grad, h, out); break;
    case at::kBFloat16: dispatch_grad<c10::BFloat16>(grad, h, out); break;
    default: TORCH_CHECK(false, "moe_ext.swiglu_backward: h must be float32, float64, float16 or bfloat16");
  }
  return out;
}

}  // namespace moe_ext::cpu
