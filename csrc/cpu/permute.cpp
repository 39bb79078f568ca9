// CPU permute / unpermute: the expert-major token layout and its inverse.
// permute is a counting sort of the (token, slot) pairs by expert, stable in token order; rows
// are copied as raw bytes, so every dtype (fp8 included) travels unchanged.
#include "cpu/cpu_ops.h"
#include "ops/checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace moe_ext::cpu {
namespace {

// Grain (in rows) so a parallel chunk moves at least ~64 KiB.
int64_t row_grain(int64_t row_bytes) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, row_bytes)); }

void check_row_map_values(const char* op, const at::Tensor& row_map, int64_t num_rows) {
  const int64_t* rm = row_map.data_ptr<int64_t>();
  for (int64_t i = 0; i < row_map.numel(); ++i)
    TORCH_CHECK(rm[i] >= -1 && rm[i] < num_rows, op, ": row_map holds row ", rm[i], " at flat position ", i,
                ", outside [-1, ", num_rows, ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x, const at::Tensor& idx_in,
                                                       int64_t num_experts, int64_t pad_to, int64_t capacity,
                                                       bool exact) {
  const int64_t T = x.size(0), H = x.size(1), k = idx_in.size(1), E = num_experts;
  const at::Tensor idx = idx_in.to(at::kLong).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();

  // Position of each (token, slot) inside its expert, in token order; drops past capacity.
  at::Tensor row_map = at::empty({T, k}, x.options().dtype(at::kLong));
  int64_t* rm = row_map.data_ptr<int64_t>();
  std::vector<int64_t> seen(E, 0);
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t e = ip[i];
    TORCH_CHECK(e >= -1 && e < E, "moe_ext.permute: idx holds expert ", e, " at (token ", i / k, ", slot ", i % k,
                "), outside [-1, num_experts=", E, ")");
    if (e < 0) {
      rm[i] = -1;
      continue;
    }
    const int64_t pos = seen[e]++;
    rm[i] = (capacity >= 0 && pos >= capacity) ? -1 : pos;
  }

  // Segment sizes (padded) and their exclusive scan, in 64 bits.
  std::vector<int64_t> kept(E), offset(E + 1, 0);
  at::Tensor tokens_per_expert = at::empty({E}, x.options().dtype(at::kInt));
  int32_t* tpe = tokens_per_expert.data_ptr<int32_t>();
  for (int64_t e = 0; e < E; ++e) {
    kept[e] = capacity >= 0 ? std::min(seen[e], capacity) : seen[e];
    const int64_t seg = (kept[e] + pad_to - 1) / pad_to * pad_to;
    offset[e + 1] = offset[e] + seg;
    tpe[e] = static_cast<int32_t>(seg);
  }
  const int64_t total = offset[E];
  const int64_t rows = exact ? total : permute_max_rows(T, k, E, pad_to, capacity);
  for (int64_t i = 0; i < T * k; ++i)
    if (rm[i] >= 0) rm[i] += offset[ip[i]];

  at::Tensor x_perm = at::empty({rows, H}, x.options());
  const int64_t es = x.element_size(), row_bytes = H * es, x_stride = x.stride(0) * es;
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(x_perm.data_ptr());
  at::parallel_for(0, T, row_grain(row_bytes * k), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = rm[t * k + j];
        if (r >= 0) std::memcpy(dst + r * row_bytes, src + t * x_stride, row_bytes);
      }
  });
  // Padding rows of each segment, and the unused tail of a worst-case-sized output, are zero.
  for (int64_t e = 0; e < E; ++e)
    std::memset(dst + (offset[e] + kept[e]) * row_bytes, 0, (offset[e + 1] - offset[e] - kept[e]) * row_bytes);
  std::memset(dst + total * row_bytes, 0, (rows - total) * row_bytes);
  return {x_perm, row_map, tokens_per_expert};
}

at::Tensor unpermute(const at::Tensor& y, const at::Tensor& row_map_in, const c10::optional<at::Tensor>& weights) {
  const int64_t T = row_map_in.size(0), k = row_map_in.size(1), H = y.size(1), R = y.size(0);
  const at::Tensor row_map = row_map_in.contiguous();
  check_row_map_values("moe_ext.unpermute", row_map, R);
  at::Tensor out = at::empty({T, H}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_ext_unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights.has_value() ? weights->to(c10::CppTypeToScalarType<acc_t>::value).contiguous()
                                             : at::Tensor();
    const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    const int64_t* rm = row_map.data_ptr<int64_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t ys = y.stride(0);
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H * k * sizeof(scalar_t)), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(H);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        // NOTE: slots are summed in order j = 0..k-1 with a separate multiply and add (no FMA), the
        // order and rounding the CUDA kernel reproduces to be bit-exact.
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = rm[t * k + j];
          if (r < 0) continue;
          const scalar_t* yr = yp + r * ys;
          if (wp) {
            const acc_t wj = wp[t * k + j];
            for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<acc_t>(yr[h]);
          } else {
            for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<acc_t>(yr[h]);
          }
        }
        for (int64_t h = 0; h < H; ++h) op[t * H + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_out_in, const at::Tensor& y,
                                                      const at::Tensor& row_map_in,
                                                      const c10::optional<at::Tensor>& weights) {
  const int64_t T = row_map_in.size(0), k = row_map_in.size(1), H = y.size(1), R = y.size(0);
  const at::Tensor row_map = row_map_in.contiguous();
  check_row_map_values("moe_ext.unpermute_backward", row_map, R);
  const at::Tensor grad_out = grad_out_in.to(y.scalar_type()).contiguous();
  at::Tensor grad_y = at::zeros({R, H}, y.options());
  at::Tensor grad_w = weights.has_value() ? at::empty({T, k}, weights->options()) : at::empty({0}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_ext_unpermute_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights.has_value() ? weights->to(c10::CppTypeToScalarType<acc_t>::value).contiguous()
                                             : at::Tensor();
    const at::Tensor gw = weights.has_value() ? at::empty({T, k}, y.options().dtype(at::kDouble)) : at::Tensor();
    const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    double* gwp = gw.defined() ? gw.data_ptr<double>() : nullptr;
    const int64_t* rm = row_map.data_ptr<int64_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t ys = y.stride(0);
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H * k * sizeof(scalar_t)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* g = gp + t * H;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = rm[t * k + j];
          if (r < 0) {
            if (gwp) gwp[t * k + j] = 0;
            continue;
          }
          scalar_t* gy = gyp + r * H;
          if (wp) {
            const acc_t wj = wp[t * k + j];
            for (int64_t h = 0; h < H; ++h) gy[h] = static_cast<scalar_t>(wj * static_cast<acc_t>(g[h]));
            const scalar_t* yr = yp + r * ys;
            double dot = 0;
            for (int64_t h = 0; h < H; ++h) dot += static_cast<double>(yr[h]) * static_cast<double>(g[h]);
            gwp[t * k + j] = dot;
          } else {
            std::memcpy(gy, g, H * sizeof(scalar_t));
          }
        }
      }
    });
    if (gw.defined()) grad_w.copy_(gw);
  });
  return {grad_y, grad_w};
}

}  // namespace moe_ext::cpu
