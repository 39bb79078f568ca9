// Grouped GEMM through ATen: every expert's rows times its own weight, fp32 accumulation for
// 16-bit inputs, the epilogue (bias, SwiGLU, row scale) on the fp32 accumulator and one rounding,
// as the CUDA kernels do; and the k-grouped weight gradient.
// The CPU op, and the CUDA path for float32/float64 (one cuBLAS matmul per expert, group sizes
// read back to the host): csrc/ops/grouped_gemm_cuda.cu sends bf16/fp16 to the grouped kernels.
#include "cpu/cpu_ops.h"
#include "ops/checks.h"

#include <ATen/ATen.h>

#include <vector>

namespace moe_ext::cpu {
namespace {

// [E] counts or [E+1] offsets -> E+1 offsets in 64 bits, validated against the rows of a.
std::vector<int64_t> group_offsets(const char* op, const at::Tensor& sizes_in, int64_t num_groups, int64_t rows) {
  const at::Tensor sizes = sizes_in.to(at::kCPU, at::kLong).contiguous();
  const int64_t* s = sizes.data_ptr<int64_t>();
  std::vector<int64_t> off(num_groups + 1, 0);
  if (sizes.numel() == num_groups) {
    for (int64_t e = 0; e < num_groups; ++e) {
      TORCH_CHECK(s[e] >= 0, op, ": tokens_per_expert[", e, "] is negative (", s[e], ")");
      TORCH_CHECK(!__builtin_add_overflow(off[e], s[e], &off[e + 1]), op, ": tokens_per_expert sums past int64 at [",
                  e, "]=", s[e], ", far more than the ", rows, " rows of a");
    }
  } else {
    TORCH_CHECK(s[0] == 0, op, ": offsets (E+1 entries) must start at 0, got ", s[0]);
    for (int64_t e = 0; e < num_groups; ++e) {
      TORCH_CHECK(s[e + 1] >= s[e], op, ": offsets must be non-decreasing, got offsets[", e, "]=", s[e],
                  " > offsets[", e + 1, "]=", s[e + 1]);
      off[e + 1] = s[e + 1];
    }
  }
  // NOTE: rows past the last group are allowed (worst-case-sized buffers); their output is zero.
  TORCH_CHECK(off[num_groups] <= rows, op, ": tokens_per_expert sums to ", off[num_groups], " rows but a has only ",
              rows, " rows");
  return off;
}

}  // namespace

at::Tensor grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& group_sizes, bool trans_b,
                        const std::string& activation, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& row_scale) {
  const char* op = "moe_ext.grouped_gemm";
  const Activation act = parse_activation(activation);
  const int64_t M = a.size(0), E = b.size(0);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  const int64_t n_out = act == Activation::kSwiglu ? N / 2 : N;
  const std::vector<int64_t> off = group_offsets(op, group_sizes, E, M);
  const at::ScalarType acc = acc_dtype(a.scalar_type());
  at::Tensor out = at::empty({M, n_out}, a.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    const at::Tensor a_e = a.narrow(0, off[e], rows).to(acc);
    const at::Tensor b_e = trans_b ? b[e].t().to(acc) : b[e].to(acc);
    at::Tensor out_e = out.narrow(0, off[e], rows);
    // Written in place where the output is the accumulator (float32 / float64, no SwiGLU): the
    // same product, bias and scale, without a temporary and a copy.
    const bool direct = acc == a.scalar_type() && act != Activation::kSwiglu;
    at::Tensor h = direct ? at::mm_out(out_e, a_e, b_e) : at::mm(a_e, b_e);
    if (bias.has_value()) h.add_((*bias)[e].to(acc));
    if (act == Activation::kSwiglu) h = cpu::swiglu_any_device(h);
    if (row_scale.has_value()) h.mul_(row_scale->narrow(0, off[e], rows).to(acc).unsqueeze(1));
    if (!direct) out_e.copy_(h);
  }
  if (off[E] < M) out.narrow(0, off[E], M - off[E]).zero_();
  return out;
}

at::Tensor grouped_gemm_wgrad(const at::Tensor& a, const at::Tensor& grad_out, const at::Tensor& group_sizes,
                              int64_t num_experts, bool trans_b) {
  const char* op = "moe_ext.grouped_gemm_wgrad";
  const int64_t M = a.size(0), K = a.size(1), N = grad_out.size(1), E = num_experts;
  const std::vector<int64_t> off = group_offsets(op, group_sizes, E, M);
  const at::ScalarType acc = acc_dtype(a.scalar_type());
  at::Tensor out = trans_b ? at::empty({E, N, K}, a.options()) : at::empty({E, K, N}, a.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) {
      out[e].zero_();
      continue;
    }
    const at::Tensor a_e = a.narrow(0, off[e], rows).to(acc);
    const at::Tensor g_e = grad_out.narrow(0, off[e], rows).to(acc);
    if (acc == a.scalar_type()) {
      at::Tensor out_e = out[e];
      trans_b ? at::mm_out(out_e, g_e.t(), a_e) : at::mm_out(out_e, a_e.t(), g_e);
    } else {
      out[e].copy_(trans_b ? at::mm(g_e.t(), a_e) : at::mm(a_e.t(), g_e));
    }
  }
  return out;
}

}  // namespace moe_ext::cpu
