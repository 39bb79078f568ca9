// grouped_gemm_masked: schema (a fragment of the moe_ext library), argument checks and the CPU
// implementation of the masked decode layout (see grouped_gemm_masked.h). The CUDA
// implementation registers itself from grouped_gemm_cuda.cu; the fake and the autograd formula
// are in moe_ext/_gemm_masked.py.
#include "ops/grouped_gemm_masked.h"

#include "cpu/cpu_ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace moe_ext {

void check_grouped_gemm_masked(const at::Tensor& a, const at::Tensor& b, const at::Tensor& valid_rows, bool trans_b,
                               Activation act, const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& row_scale) {
  const char* op = "moe_ext.grouped_gemm_masked";
  TORCH_CHECK(a.dim() == 3, op, ": a must be 3-D [E, max_rows, K], got ", a.dim(), "-D");
  TORCH_CHECK(b.dim() == 3, op, ": b must be 3-D [E, K, N] (or [E, N, K] with trans_b), got ", b.dim(), "-D");
  TORCH_CHECK(is_float_dtype(a.scalar_type()), op, ": a must be float32, float64, float16 or bfloat16, got ",
              a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b must have the dtype of a (", a.scalar_type(), "), got ",
              b.scalar_type());
  check_same_device(a, "a", b, "b");
  check_same_device(a, "a", valid_rows, "valid_rows");
  TORCH_CHECK(a.is_contiguous(), op, ": a must be contiguous");
  TORCH_CHECK(b.is_contiguous(), op, ": b must be contiguous (pass [E, N, K] weights with trans_b=True)");
  TORCH_CHECK(b.size(0) >= 1, op, ": b must hold at least one expert");
  TORCH_CHECK(a.size(0) == b.size(0), op, ": a has ", a.size(0), " experts (a.size(0)) but b has ", b.size(0));
  const int64_t k_b = trans_b ? b.size(2) : b.size(1);
  TORCH_CHECK(k_b == a.size(2), op, ": the K of b (", k_b, ", from b of shape ", b.sizes(),
              trans_b ? " with trans_b" : "", ") must equal the K of a (", a.size(2), ")");
  TORCH_CHECK(valid_rows.dim() == 1 && valid_rows.size(0) == b.size(0), op, ": valid_rows must be [E=", b.size(0),
              "], got shape ", valid_rows.sizes());
  TORCH_CHECK(is_index_dtype(valid_rows.scalar_type()), op, ": valid_rows must be int32 or int64, got ",
              valid_rows.scalar_type());
  if (act == Activation::kSwiglu) {
    const int64_t n = trans_b ? b.size(1) : b.size(2);
    TORCH_CHECK(n % 2 == 0, op, ": activation='swiglu' needs an even N (gate and up halves), got N=", n);
  }
  check_gemm_epilogue(op, a, bias, row_scale, b.size(0), trans_b ? b.size(1) : b.size(2), {a.size(0), a.size(1)});
}

at::Tensor grouped_gemm_masked_aten(const at::Tensor& a, const at::Tensor& b, const at::Tensor& valid_rows,
                                    bool trans_b, const std::string& activation,
                                    const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& row_scale) {
  const char* op = "moe_ext.grouped_gemm_masked";
  const Activation act = parse_activation(activation);
  const int64_t E = a.size(0), R = a.size(1);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  const int64_t n_out = act == Activation::kSwiglu ? N / 2 : N;
  const at::Tensor valid = valid_rows.to(at::kCPU, at::kLong).contiguous();
  const int64_t* v = valid.data_ptr<int64_t>();
  const at::ScalarType acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({E, R, n_out}, a.options());
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(v[e] >= 0 && v[e] <= R, op, ": valid_rows[", e, "] = ", v[e], " is outside [0, max_rows=", R, "]");
    if (v[e] == 0) continue;
    const at::Tensor a_e = a[e].narrow(0, 0, v[e]).to(acc);
    const at::Tensor b_e = trans_b ? b[e].t().to(acc) : b[e].to(acc);
    at::Tensor h = at::mm(a_e, b_e);
    if (bias.has_value()) h.add_((*bias)[e].to(acc));
    if (act == Activation::kSwiglu) h = cpu::swiglu_any_device(h);
    if (row_scale.has_value()) h.mul_((*row_scale)[e].narrow(0, 0, v[e]).to(acc).unsqueeze(1));
    out[e].narrow(0, 0, v[e]).copy_(h);
  }
  return out;
}

namespace {

at::Tensor grouped_gemm_masked_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& valid_rows,
                                   bool trans_b, c10::string_view activation, const c10::optional<at::Tensor>& bias,
                                   const c10::optional<at::Tensor>& row_scale) {
  const std::string act(activation);
  check_grouped_gemm_masked(a, b, valid_rows, trans_b, parse_activation(act), bias, row_scale);
  return grouped_gemm_masked_aten(a, b, valid_rows, trans_b, act, bias, row_scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ext, m) {
  m.def(
      "grouped_gemm_masked(Tensor a, Tensor b, Tensor valid_rows, bool trans_b, str activation, Tensor? bias=None, "
      "Tensor? row_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) { m.impl("grouped_gemm_masked", &grouped_gemm_masked_cpu); }

}  // namespace moe_ext
