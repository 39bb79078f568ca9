// CPU permute / unpermute: the expert-major token layout and its inverse.
// permute is a counting sort of the (token, slot) pairs by expert, stable in token order; rows
// are copied as raw bytes, so every dtype (fp8 included) travels unchanged.
#include "cpu/cpu_ops.h"
#include "cpu/vec.h"
#include "ops/checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
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

// ---- unpermute's rows, vectorised (one clone per instruction set) ---------------------------------
template <typename T, typename A>
MOE_EXT_VECTOR_CLONES void add_scaled_row(A* __restrict__ acc, A w, const T* __restrict__ y, int64_t n) {
  for (int64_t h = 0; h < n; ++h) acc[h] += w * widen(y[h]);
}

template <typename T, typename A>
MOE_EXT_VECTOR_CLONES void add_row(A* __restrict__ acc, const T* __restrict__ y, int64_t n) {
  for (int64_t h = 0; h < n; ++h) acc[h] += widen(y[h]);
}

template <typename T, typename A>
MOE_EXT_VECTOR_CLONES void store_row(const A* __restrict__ acc, T* __restrict__ out, int64_t n) {
  for (int64_t h = 0; h < n; ++h) out[h] = narrow_to<T>(acc[h]);
}

template <typename T, typename A>
MOE_EXT_VECTOR_CLONES void scale_row(const T* __restrict__ g, A w, T* __restrict__ out, int64_t n) {
  for (int64_t h = 0; h < n; ++h) out[h] = narrow_to<T>(w * widen(g[h]));
}

// float16 rows: converted in blocks through float32 buffers (vec.h's widen_n / narrow_n, F16C where
// the CPU has it; an element-wise float16 conversion is ~15 operations), then the float32 loops
// above: the same arithmetic on the same values.
constexpr int64_t kBlock = 512;

// f(yb, b, m) for each block [b, b + m) of the float16 row y, widened into yb.
template <typename F>
void widened_blocks(const c10::Half* y, int64_t n, F&& f) {
  float buf[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    widen_n(y + b, buf, m);
    f(static_cast<const float*>(buf), b, m);
  }
}

void add_scaled_row(float* acc, float w, const c10::Half* y, int64_t n) {
  widened_blocks(y, n, [&](const float* yb, int64_t b, int64_t m) { add_scaled_row(acc + b, w, yb, m); });
}

void add_row(float* acc, const c10::Half* y, int64_t n) {
  widened_blocks(y, n, [&](const float* yb, int64_t b, int64_t m) { add_row(acc + b, yb, m); });
}

void store_row(const float* acc, c10::Half* out, int64_t n) { narrow_n(acc, out, n); }

void scale_row(const c10::Half* g, float w, c10::Half* out, int64_t n) {
  widened_blocks(g, n, [&](const float* gb, int64_t b, int64_t m) {
    float ob[kBlock];
    scale_row(gb, w, ob, m);
    narrow_n(ob, out + b, m);
  });
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// dot(y, g) in float64, added in the order of the CUDA kernel (permute.cu, unpermute_backward_kernel),
// so that the weights' gradient has its bits: lane l of a warp takes the VEC-element vectors l, l+32,
// l+64, ..., sums each vector's products in order and adds the sum to its total; then a butterfly
// over the 32 lanes. (Products of float32 values are exact in float64.) 32 independent sums are
// also what a CPU pipeline wants, where one running sum waits on every add.
constexpr int kLanes = 32;

// Adds rows y, g of n elements (a multiple of VEC) to the lanes' sums, vector 0 on lane 0. Inlined
// into each caller's clone, where `lane` is a local array that stays in registers.
template <int VEC, typename T>
__attribute__((always_inline)) inline void lane_dot_chunks(double (&lane)[kLanes], const T* __restrict__ y,
                                                           const T* __restrict__ g, int64_t n) {
  double prod[kLanes * VEC], part[kLanes];
  const int64_t nv = n / VEC;
  for (int64_t v0 = 0; v0 < nv; v0 += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, nv - v0));
    const T* yb = y + v0 * VEC;
    const T* gb = g + v0 * VEC;
    // Products first (contiguous, vectorised), then each lane's sum in element order.
    for (int i = 0; i < lanes * VEC; ++i) prod[i] = static_cast<double>(widen(yb[i])) * static_cast<double>(widen(gb[i]));
    for (int i = lanes * VEC; i < kLanes * VEC; ++i) prod[i] = 0.0;
    for (int l = 0; l < kLanes; ++l) part[l] = 0.0;
    for (int e = 0; e < VEC; ++e)
      for (int l = 0; l < kLanes; ++l) part[l] += prod[l * VEC + e];
    // Lanes past the row's last vector add nothing (0.0 + 0.0 keeps their +0.0).
    for (int l = 0; l < kLanes; ++l) lane[l] += part[l];
  }
}

inline double lane_butterfly(double (&lane)[kLanes]) {
  for (int off = kLanes / 2; off > 0; off /= 2)
    for (int l = 0; l < off; ++l) lane[l] += lane[l + off];
  return lane[0];
}

template <int VEC, typename T>
MOE_EXT_VECTOR_CLONES double lane_dot_vec(const T* __restrict__ y, const T* __restrict__ g, int64_t n) {
  double lane[kLanes] = {};
  lane_dot_chunks<VEC>(lane, y, g, n);
  return lane_butterfly(lane);
}

// float16 in blocks of float32 (kBlock is a multiple of kLanes * VEC: each block starts on lane 0).
template <int VEC>
MOE_EXT_VECTOR_CLONES double lane_dot_vec(const c10::Half* y, const c10::Half* g, int64_t n) {
  static_assert(kBlock % (kLanes * VEC) == 0);
  double lane[kLanes] = {};
  float yb[kBlock], gb[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    widen_n(y + b, yb, m);
    widen_n(g + b, gb, m);
    lane_dot_chunks<VEC>(lane, static_cast<const float*>(yb), static_cast<const float*>(gb), m);
  }
  return lane_butterfly(lane);
}

template <typename T>
double lane_dot(const T* y, const T* g, int64_t n, int vec) {
  switch (vec) {
    case 8: return lane_dot_vec<8>(y, g, n);
    case 4: return lane_dot_vec<4>(y, g, n);
    case 2: return lane_dot_vec<2>(y, g, n);
    default: return lane_dot_vec<1>(y, g, n);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x, const at::Tensor& idx_in,
                                                       int64_t num_experts, int64_t pad_to, int64_t capacity,
                                                       bool exact, int64_t max_rows) {
  const int64_t T = x.size(0), H = x.size(1), k = idx_in.size(1), E = num_experts;
  const bool masked = max_rows >= 1;
  if (masked) capacity = capacity < 0 ? max_rows : std::min(capacity, max_rows);
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
    const int64_t seg = masked ? max_rows : (kept[e] + pad_to - 1) / pad_to * pad_to;
    offset[e + 1] = offset[e] + seg;
    tpe[e] = static_cast<int32_t>(masked ? kept[e] : seg);
  }
  const int64_t total = offset[E];
  const int64_t rows = exact || masked ? total : permute_max_rows(T, k, E, pad_to, capacity);
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

at::Tensor route_to_replicas(const at::Tensor& idx_in, const at::Tensor& replica_counts,
                             const at::Tensor& replica_slots, int64_t rank) {
  const at::Tensor idx = idx_in.to(at::kLong).contiguous();
  const at::Tensor counts = replica_counts.contiguous(), slots = replica_slots.contiguous();
  const int64_t n = idx.numel(), E = counts.numel(), C = slots.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  at::Tensor phys = at::empty({n}, idx.options());
  int64_t* out = phys.data_ptr<int64_t>();
  std::vector<int64_t> seen(E, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = ip[i];
    TORCH_CHECK(e >= -1 && e < E, "moe_ext.route_to_replicas: idx holds expert ", e, " at flat position ", i,
                ", outside [-1, num_experts=", E, ")");
    if (e < 0) {
      out[i] = -1;
      continue;
    }
    TORCH_CHECK(cp[e] >= 1 && cp[e] <= C, "moe_ext.route_to_replicas: replica_counts[", e, "] = ", cp[e],
                " is outside [1, C=", C, "]");
    out[i] = sp[e * C + (seen[e]++ + rank) % cp[e]];
  }
  return phys.view(idx_in.sizes()).to(idx_in.scalar_type());
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
          if (wp) add_scaled_row(acc.data(), wp[t * k + j], yp + r * ys, H);
          else add_row(acc.data(), yp + r * ys, H);
        }
        store_row(acc.data(), op + t * H, H);
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
  at::Tensor grad_y = at::empty({R, H}, y.options());
  at::Tensor grad_w = weights.has_value() ? at::empty({T, k}, weights->options()) : at::empty({0}, y.options());
  // Rows no slot maps to get zeros at the end (written once, not zeroed and then overwritten). A
  // row used twice would need its gradients added (permute's row_map never does it): an error,
  // not the last writer's gradient.
  std::vector<uint8_t> touched(R, 0);
  const int64_t* rm_all = row_map.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t r = rm_all[i];
    if (r < 0) continue;
    TORCH_CHECK(!touched[r], "moe_ext.unpermute_backward: row_map uses row ", r, " twice (again at token ", i / k,
                ", slot ", i % k, "); the gradient takes each row at most once, as permute's row_map has it");
    touched[r] = 1;
  }
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
    // The CUDA kernel's vector width for these pointers and strides: its dot products add in that order.
    const int64_t es = static_cast<int64_t>(sizeof(scalar_t));
    const bool wide = (H * es) % 16 == 0 && (R <= 1 || (ys * es) % 16 == 0) && aligned16(yp) && aligned16(gp) &&
                      aligned16(gyp);
    const int vec = wide ? static_cast<int>(16 / es) : 1;
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
            scale_row(g, wp[t * k + j], gy, H);
            gwp[t * k + j] = lane_dot(yp + r * ys, g, H, vec);
          } else {
            std::memcpy(gy, g, H * sizeof(scalar_t));
          }
        }
      }
    });
    if (gw.defined()) grad_w.copy_(gw);
  });
  char* gy_bytes = static_cast<char*>(grad_y.data_ptr());
  const int64_t row_bytes = H * grad_y.element_size();
  at::parallel_for(0, R, row_grain(row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      if (!touched[r]) std::memset(gy_bytes + r * row_bytes, 0, row_bytes);
  });
  return {grad_y, grad_w};
}

}  // namespace moe_ext::cpu
