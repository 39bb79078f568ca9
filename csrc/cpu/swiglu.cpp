// CPU SwiGLU forward and gradient: the reference of csrc/kernels/swiglu.cu, operation for operation.
// In float32 (also for float16 / bfloat16 rows, computed in float32) the exp is exp_rn, which the
// kernel uses too, so both give the same bits; the row loops are branch-free and vectorise
// (cloned for AVX-512 and AVX2 on x86-64). float64 uses std::exp (the kernel: CUDA's exp).
#include "cpu/cpu_ops.h"
#include "cpu/vec.h"
#include "ops/checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace moe_ext::cpu {
namespace {

int64_t rows_per_task(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// ---- columns of one row, in the accumulation type A --------------------------------------------
template <typename A>
inline void swiglu_cols(const A* __restrict__ gate, const A* __restrict__ up, A* __restrict__ out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const A x = gate[c];
    out[c] = (x / (A(1) + exp_acc(-x))) * up[c];
  }
}

template <typename A>
inline void swiglu_grad_cols(const A* __restrict__ gate, const A* __restrict__ up, const A* __restrict__ g,
                             A* __restrict__ d_gate, A* __restrict__ d_up, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const A x = gate[c], u = up[c], gc = g[c];
    const A sig = A(1) / (A(1) + exp_acc(-x));
    const A silu = x * sig;
    const A dsilu = sig * (A(1) + x * (A(1) - sig));
    d_gate[c] = (gc * u) * dsilu;
    d_up[c] = gc * silu;
  }
}

// float32: cloned for the vector units.
MOE_EXT_VECTOR_CLONES void swiglu_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                      float* __restrict__ out, int64_t n) {
  swiglu_cols(gate, up, out, n);
}

MOE_EXT_VECTOR_CLONES void swiglu_grad_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                           const float* __restrict__ g, float* __restrict__ d_gate,
                                           float* __restrict__ d_up, int64_t n) {
  swiglu_grad_cols(gate, up, g, d_gate, d_up, n);
}

// float16 / bfloat16 columns go through float32 buffers of kChunk columns.
constexpr int64_t kChunk = 256;

template <typename T>
const float* as_f32(const T* src, float* buf, int64_t m) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    widen_n(src, buf, m);
    return buf;
  }
}

template <typename T>
float* out_f32(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) return dst;
  else return buf;
}

template <typename T>
void store(const float* buf, T* dst, int64_t m) {
  if constexpr (!std::is_same_v<T, float>) narrow_n(buf, dst, m);
}

template <typename T>
void swiglu_rows(const T* h, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, rows_per_task(n), [&](int64_t r0, int64_t r1) {
    float bg[kChunk], bu[kChunk], bo[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const T* hr = h + r * 2 * n;
      T* o = out + r * n;
      for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
        const int64_t m = std::min(kChunk, n - c0);
        float* dst = out_f32(o + c0, bo);
        swiglu_f32(as_f32(hr + c0, bg, m), as_f32(hr + n + c0, bu, m), dst, m);
        store(bo, o + c0, m);
      }
    }
  });
}

template <typename TH, typename TG>
void swiglu_backward_rows(const TG* grad, const TH* h, TH* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, rows_per_task(n), [&](int64_t r0, int64_t r1) {
    float bg[kChunk], bu[kChunk], bgr[kChunk], bdg[kChunk], bdu[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const TH* hr = h + r * 2 * n;
      const TG* gr = grad + r * n;
      TH* o = out + r * 2 * n;
      for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
        const int64_t m = std::min(kChunk, n - c0);
        float* dg = out_f32(o + c0, bdg);
        float* du = out_f32(o + n + c0, bdu);
        swiglu_grad_f32(as_f32(hr + c0, bg, m), as_f32(hr + n + c0, bu, m), as_f32(gr + c0, bgr, m), dg, du, m);
        store(bdg, o + c0, m);
        store(bdu, o + n + c0, m);
      }
    }
  });
}

// ---- float64: the same columns, without buffers ---------------------------------------------------
void swiglu_rows(const double* h, double* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, rows_per_task(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) swiglu_cols(h + r * 2 * n, h + r * 2 * n + n, out + r * n, n);
  });
}

void swiglu_backward_rows(const double* grad, const double* h, double* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, rows_per_task(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      swiglu_grad_cols(h + r * 2 * n, h + r * 2 * n + n, grad + r * n, out + r * 2 * n, out + r * 2 * n + n, n);
  });
}

template <typename TH>
void dispatch_grad(const at::Tensor& grad, const at::Tensor& h, at::Tensor& out) {
  const int64_t rows = h.size(0), n = h.size(1) / 2;
  if (grad.scalar_type() == h.scalar_type())
    swiglu_backward_rows(grad.data_ptr<TH>(), h.data_ptr<TH>(), out.data_ptr<TH>(), rows, n);
  else if constexpr (!std::is_same_v<TH, double>)
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

at::Tensor swiglu_any_device(const at::Tensor& h) {
  if (h.device().is_cpu()) return swiglu(h);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("moe_ext::swiglu", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(h);
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
