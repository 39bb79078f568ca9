// CUDA implementations of grouped_gemm, grouped_gemm_wgrad and grouped_gemm_masked: the CPU
// ops' checks (so errors read the same), the kernel's requirements, then device guard, current
// stream, outputs and the torch-free launchers of csrc/kernels/grouped_gemm.cu.
//
// bfloat16 / float16 run the grouped kernel: group sizes stay on the device (no host
// synchronisation, CUDA-graph safe), one launch for all experts. float32 / float64 take the ATen
// per-expert path (one matmul per expert, group sizes read back to the host).
// Differences from the CPU op, all because a check of tensor values would need a host
// synchronisation: counts and offsets are not validated but clamped (negative counts and
// decreasing offsets count as 0 rows, offsets[0] is taken as 0, rows past M are dropped,
// valid_rows is clamped to [0, max_rows]); see csrc/kernels/grouped_gemm.cuh.
// The kernel needs 16-byte rows: K and N (N/2 with SwiGLU) multiples of 8; an error says so.
// The epilogue inputs (bias, row_scale) go to the kernel as it reads them (see epilogue_inputs).
#include "cpu/cpu_ops.h"
#include "kernels/api.cuh"
#include "ops/checks.h"
#include "ops/grouped_gemm_masked.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

namespace moe_ext {
namespace {

using Tensor = at::Tensor;

bool kernel_dtype(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

kernels::GemmFloat gemm_float(at::ScalarType t) {
  return t == at::kHalf ? kernels::GemmFloat::kFloat16 : kernels::GemmFloat::kBFloat16;
}

// The kernel reads 16-byte vectors: a contiguous tensor whose data does not start on a 16-byte
// boundary (a view into a larger buffer) is copied once.
Tensor aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_kernel_limits(const char* op, int64_t num_experts, int64_t rows, int64_t k, const char* k_name,
                         int64_t n, const char* n_name, Activation act) {
  TORCH_CHECK(k % kernels::kGroupedGemmAlign == 0, op, ": the CUDA kernel needs K (", k_name, " = ", k,
              ") to be a multiple of 8 for bfloat16/float16 (16-byte rows); pad K, or use float32");
  if (act == Activation::kSwiglu) {
    TORCH_CHECK(n % (2 * kernels::kGroupedGemmAlign) == 0, op, ": with activation='swiglu' the CUDA kernel needs N (",
                n_name, " = ", n, ") to be a multiple of 16 (each half a multiple of 8) for bfloat16/float16; pad N, "
                "or use float32");
  } else {
    TORCH_CHECK(n % kernels::kGroupedGemmAlign == 0, op, ": the CUDA kernel needs N (", n_name, " = ", n,
                ") to be a multiple of 8 for bfloat16/float16 (16-byte rows); pad N, or use float32");
  }
  TORCH_CHECK(num_experts <= kernels::kGroupedGemmMaxExperts, op, ": the CUDA kernel supports up to ",
              kernels::kGroupedGemmMaxExperts, " experts, got ", num_experts);
  TORCH_CHECK(rows < (int64_t{1} << 31) && k < (int64_t{1} << 31) && n < (int64_t{1} << 31), op,
              ": the CUDA kernel needs fewer than 2^31 rows, K and N");
}

kernels::GemmGroups contiguous_groups(const Tensor& sizes, int64_t num_experts, int64_t rows) {
  kernels::GemmGroups g;
  g.layout = kernels::GemmLayout::kContiguous;
  g.sizes = sizes.data_ptr();
  g.sizes_int64 = sizes.scalar_type() == at::kLong;
  g.sizes_are_offsets = sizes.size(0) == num_experts + 1;
  g.num_experts = num_experts;
  g.rows = rows;
  return g;
}

using OptTensor = c10::optional<Tensor>;

// The epilogue inputs as the kernel reads them: bias contiguous and 16-byte aligned in the
// element type, row_scale contiguous float32. Kept alive by the caller until the launch.
struct Epilogue {
  Tensor bias, row_scale;
};

Epilogue epilogue_inputs(const OptTensor& bias, const OptTensor& row_scale) {
  Epilogue ep;
  if (bias.has_value()) ep.bias = aligned16(bias->contiguous());
  if (row_scale.has_value()) ep.row_scale = row_scale->to(at::kFloat).contiguous();
  return ep;
}

void run_forward(kernels::GroupedGemmParams& p, const Tensor& a, const Tensor& b, const Tensor& out, bool trans_b,
                 Activation act, int64_t k, int64_t n, const Epilogue& ep) {
  p.dtype = gemm_float(a.scalar_type());
  p.bias = ep.bias.defined() ? ep.bias.data_ptr() : nullptr;
  p.row_scale = ep.row_scale.defined() ? ep.row_scale.data_ptr<float>() : nullptr;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.out = out.data_ptr();
  p.k = k;
  p.n = n;
  p.trans_b = trans_b;
  p.activation = act == Activation::kSwiglu ? kernels::GemmActivation::kSwiglu : kernels::GemmActivation::kNone;
  kernels::grouped_gemm(p, c10::cuda::getCurrentCUDAStream().stream());
}

Tensor grouped_gemm_cuda(const Tensor& a_in, const Tensor& b_in, const Tensor& sizes_in, bool trans_b,
                         c10::string_view activation, const OptTensor& bias, const OptTensor& row_scale) {
  const char* op = "moe_ext.grouped_gemm";
  const std::string act_name(activation);
  const Activation act = parse_activation(act_name);
  check_grouped_gemm(a_in, b_in, sizes_in, trans_b, act, bias, row_scale);
  TORCH_CHECK(a_in.is_cuda(), op, ": a must be a CUDA tensor here, got ", a_in.device());
  if (!kernel_dtype(a_in.scalar_type()))
    return cpu::grouped_gemm(a_in, b_in, sizes_in, trans_b, act_name, bias, row_scale);

  const int64_t M = a_in.size(0), K = a_in.size(1), E = b_in.size(0);
  const int64_t N = trans_b ? b_in.size(1) : b_in.size(2);
  const int64_t n_out = act == Activation::kSwiglu ? N / 2 : N;
  check_kernel_limits(op, E, M, K, "a.size(1)", N, trans_b ? "b.size(1)" : "b.size(2)", act);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const Tensor a = aligned16(a_in), b = aligned16(b_in), sizes = sizes_in.contiguous();
  const Epilogue ep = epilogue_inputs(bias, row_scale);
  Tensor out = at::empty({M, n_out}, a.options());
  kernels::GroupedGemmParams p;
  p.groups = contiguous_groups(sizes, E, M);
  run_forward(p, a, b, out, trans_b, act, K, N, ep);
  return out;
}

Tensor grouped_gemm_wgrad_cuda(const Tensor& a_in, const Tensor& grad_out_in, const Tensor& sizes_in,
                               int64_t num_experts, bool trans_b) {
  const char* op = "moe_ext.grouped_gemm_wgrad";
  check_grouped_gemm_wgrad(a_in, grad_out_in, sizes_in, num_experts);
  TORCH_CHECK(a_in.is_cuda(), op, ": a must be a CUDA tensor here, got ", a_in.device());
  if (!kernel_dtype(a_in.scalar_type()))
    return cpu::grouped_gemm_wgrad(a_in, grad_out_in, sizes_in, num_experts, trans_b);

  const int64_t M = a_in.size(0), K = a_in.size(1), N = grad_out_in.size(1), E = num_experts;
  check_kernel_limits(op, E, M, K, "a.size(1)", N, "grad_out.size(1)", Activation::kNone);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const Tensor a = aligned16(a_in), grad_out = aligned16(grad_out_in), sizes = sizes_in.contiguous();
  Tensor grad_b = trans_b ? at::empty({E, N, K}, a.options()) : at::empty({E, K, N}, a.options());
  kernels::GroupedGemmWgradParams p;
  p.dtype = gemm_float(a.scalar_type());
  p.groups = contiguous_groups(sizes, E, M);
  p.a = a.data_ptr();
  p.grad_out = grad_out.data_ptr();
  p.grad_b = grad_b.data_ptr();
  p.k = K;
  p.n = N;
  p.trans_b = trans_b;
  kernels::grouped_gemm_wgrad(p, c10::cuda::getCurrentCUDAStream().stream());
  return grad_b;
}

Tensor grouped_gemm_masked_cuda(const Tensor& a_in, const Tensor& b_in, const Tensor& valid_in, bool trans_b,
                                c10::string_view activation, const OptTensor& bias, const OptTensor& row_scale) {
  const char* op = "moe_ext.grouped_gemm_masked";
  const std::string act_name(activation);
  const Activation act = parse_activation(act_name);
  check_grouped_gemm_masked(a_in, b_in, valid_in, trans_b, act, bias, row_scale);
  TORCH_CHECK(a_in.is_cuda(), op, ": a must be a CUDA tensor here, got ", a_in.device());
  if (!kernel_dtype(a_in.scalar_type()))
    return grouped_gemm_masked_aten(a_in, b_in, valid_in, trans_b, act_name, bias, row_scale);

  const int64_t E = a_in.size(0), R = a_in.size(1), K = a_in.size(2);
  const int64_t N = trans_b ? b_in.size(1) : b_in.size(2);
  const int64_t n_out = act == Activation::kSwiglu ? N / 2 : N;
  check_kernel_limits(op, E, E * R, K, "a.size(2)", N, trans_b ? "b.size(1)" : "b.size(2)", act);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const Tensor a = aligned16(a_in), b = aligned16(b_in), valid = valid_in.contiguous();
  const Epilogue ep = epilogue_inputs(bias, row_scale);
  Tensor out = at::empty({E, R, n_out}, a.options());
  kernels::GroupedGemmParams p;
  p.groups.layout = kernels::GemmLayout::kMasked;
  p.groups.sizes = valid.data_ptr();
  p.groups.sizes_int64 = valid.scalar_type() == at::kLong;
  p.groups.num_experts = E;
  p.groups.rows = R;
  run_forward(p, a, b, out, trans_b, act, K, N, ep);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cuda);
  m.impl("grouped_gemm_masked", &grouped_gemm_masked_cuda);
}

}  // namespace moe_ext
