// The SwiGLU forward and gradient kernels (declared in swiglu.cuh): elementwise, memory-bound, one
// grid-stride loop over vectors of V columns of one row (16 bytes of h when n allows it, else one
// column).
#include "kernels/device_info.cuh"
#include "kernels/exception.cuh"
#include "kernels/exp_rn.cuh"
#include "kernels/float_cast.cuh"
#include "kernels/swiglu.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace moe_ext::kernels {
namespace {

constexpr int kThreads = 256;

// NOTE: every operation rounded on its own (float_cast.cuh's *_rn), and in float32 exp_rn
// (exp_rn.cuh), which the CPU op calls too: the same sequence, so the two give the same bits.
// float64 uses exp, as the CPU op uses the host's: they may differ in the last bit.
__device__ __forceinline__ float exp_(float a) { return exp_rn(a); }
__device__ __forceinline__ double exp_(double a) { return ::exp(a); }

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Calls f(r, c, gate, up) for every vector of V columns c of every row r of h = [gate | up]
// ([rows, 2n]): one grid-stride loop with 64-bit indices and offsets.
template <typename T, int V, typename F>
__device__ __forceinline__ void for_each_vector(const T* __restrict__ h, int64_t rows, int64_t n, F&& f) {
  const int64_t per_row = n / V;
  const int64_t total = rows * per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / per_row;
    const int64_t c = (i - r * per_row) * V;
    const T* hr = h + r * 2 * n;
    f(r, c, *reinterpret_cast<const Vec<T, V>*>(hr + c), *reinterpret_cast<const Vec<T, V>*>(hr + n + c));
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(const T* __restrict__ h, T* __restrict__ out, int64_t rows, int64_t n) {
  using acc_t = acc_type<T>;
  for_each_vector<T, V>(h, rows, n, [&](int64_t r, int64_t c, const Vec<T, V>& gate, const Vec<T, V>& up) {
    Vec<T, V> a;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t x = to_acc(gate.v[j]);
      a.v[j] = cast_out<T>(mul_rn(div_rn(x, add_rn(acc_t(1), exp_(-x))), to_acc(up.v[j])));
    }
    *reinterpret_cast<Vec<T, V>*>(out + r * n + c) = a;
  });
}

template <typename TH, typename TG, int V>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const TG* __restrict__ grad, const TH* __restrict__ h, TH* __restrict__ out,
                           int64_t rows, int64_t n) {
  using acc_t = acc_type<TH>;
  for_each_vector<TH, V>(h, rows, n, [&](int64_t r, int64_t c, const Vec<TH, V>& gate, const Vec<TH, V>& up) {
    const Vec<TG, V> g = *reinterpret_cast<const Vec<TG, V>*>(grad + r * n + c);
    Vec<TH, V> d_gate, d_up;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t x = to_acc(gate.v[j]), u = to_acc(up.v[j]), gj = to_acc(g.v[j]);
      const acc_t sig = div_rn(acc_t(1), add_rn(acc_t(1), exp_(-x)));
      const acc_t silu = mul_rn(x, sig);
      // g * up * (sig * (1 + x * (1 - sig))), left to right as the CPU op.
      const acc_t dsilu = mul_rn(sig, add_rn(acc_t(1), mul_rn(x, sub_rn(acc_t(1), sig))));
      d_gate.v[j] = cast_out<TH>(mul_rn(mul_rn(gj, u), dsilu));
      d_up.v[j] = cast_out<TH>(mul_rn(gj, silu));
    }
    TH* o = out + r * 2 * n;
    *reinterpret_cast<Vec<TH, V>*>(o + c) = d_gate;
    *reinterpret_cast<Vec<TH, V>*>(o + n + c) = d_up;
  });
}

int grid_blocks(int64_t work) {
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * (2048 / kThreads);
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
}

bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

template <typename T>
void launch_forward(const SwigluForwardParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const auto* h = static_cast<const T*>(p.h);
  auto* out = static_cast<T*>(p.out);
  // Vectors need both halves of every h row and every out row on 16-byte boundaries.
  const bool vec = p.n % kVec == 0 && aligned16(h) && aligned16(out);
  const int blocks = grid_blocks(p.rows * (vec ? p.n / kVec : p.n));
  if (vec)
    swiglu_forward_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(h, out, p.rows, p.n);
  else
    swiglu_forward_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(h, out, p.rows, p.n);
  MOE_CUDA_CHECK(cudaGetLastError());
}

template <typename TH, typename TG>
void launch_backward(const SwigluBackwardParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(TH);  // 16 bytes of h per load
  const auto* grad = static_cast<const TG*>(p.grad);
  const auto* h = static_cast<const TH*>(p.h);
  auto* out = static_cast<TH*>(p.out);
  // Vectors need every row's halves on 16-byte boundaries (n % kVec == 0 and aligned bases); g's
  // vectors are then aligned too (kVec * sizeof(TG) bytes apart from an allocation's start).
  const bool vec = p.n % kVec == 0 && aligned16(h) && aligned16(out) &&
                   reinterpret_cast<uintptr_t>(grad) % (kVec * sizeof(TG)) == 0;
  const int blocks = grid_blocks(p.rows * (vec ? p.n / kVec : p.n));
  if (vec)
    swiglu_backward_kernel<TH, TG, kVec><<<blocks, kThreads, 0, stream>>>(grad, h, out, p.rows, p.n);
  else
    swiglu_backward_kernel<TH, TG, 1><<<blocks, kThreads, 0, stream>>>(grad, h, out, p.rows, p.n);
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void swiglu_forward(const SwigluForwardParams& p, cudaStream_t stream) {
  MOE_HOST_ASSERT(p.rows >= 0 && p.n >= 0, "swiglu_forward: rows and n must be >= 0");
  if (p.rows == 0 || p.n == 0) return;
  MOE_HOST_ASSERT(p.h != nullptr && p.out != nullptr, "swiglu_forward: null pointer");
  switch (p.dtype) {
    case PermuteFloat::kFloat32: return launch_forward<float>(p, stream);
    case PermuteFloat::kFloat64: return launch_forward<double>(p, stream);
    case PermuteFloat::kFloat16: return launch_forward<__half>(p, stream);
    case PermuteFloat::kBFloat16: return launch_forward<__nv_bfloat16>(p, stream);
  }
  MOE_HOST_ASSERT(false, "swiglu_forward: unknown dtype");
}

void swiglu_backward(const SwigluBackwardParams& p, cudaStream_t stream) {
  MOE_HOST_ASSERT(p.rows >= 0 && p.n >= 0, "swiglu_backward: rows and n must be >= 0");
  if (p.rows == 0 || p.n == 0) return;
  MOE_HOST_ASSERT(p.grad != nullptr && p.h != nullptr && p.out != nullptr, "swiglu_backward: null pointer");
  switch (p.dtype) {
    case PermuteFloat::kFloat32: return launch_backward<float, float>(p, stream);
    case PermuteFloat::kFloat64: return launch_backward<double, double>(p, stream);
    case PermuteFloat::kFloat16:
      return p.grad_is_acc ? launch_backward<__half, float>(p, stream) : launch_backward<__half, __half>(p, stream);
    case PermuteFloat::kBFloat16:
      return p.grad_is_acc ? launch_backward<__nv_bfloat16, float>(p, stream)
                           : launch_backward<__nv_bfloat16, __nv_bfloat16>(p, stream);
  }
  MOE_HOST_ASSERT(false, "swiglu_backward: unknown dtype");
}

}  // namespace moe_ext::kernels
