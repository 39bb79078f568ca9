// torch.classes.moe_ext.IpcComm: the ipc backend's communicator for one (group, device), a thin
// adapter over comm::SymmetricBuffer and the launch sequences of comm/ep_ops.cuh. The Python
// side (moe_ext/_ipc.py) moves the IPC handles through the user's ProcessGroup, keeps each
// dispatch's plan tensors, sets the communication stream as current, and turns EpError records
// into exceptions naming the ranks.
//
// Every method runs on the current CUDA stream. dispatch() in the exact layout synchronises the
// host once (the received row count); in the masked layout (max_rows >= 0) nothing synchronises
// and the whole call can be captured in a CUDA graph, like combine() and combine_grad().
#include "comm/ep_ops.cuh"
#include "comm/symmetric.cuh"
#include "kernels/api.cuh"
#include "kernels/ep.cuh"
#include "ops/kernel_float.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <memory>

namespace moe_ext {
namespace {

using Tensor = at::Tensor;

kernels::PermuteFloat combine_float(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "moe_ext ipc backend: combine needs float32, float16 or bfloat16 rows, got ", t);
  return kernel_float(t, "moe_ext ipc backend: combine's rows");
}

// The buffer's sizes from a call's (at least one token: an empty buffer has no layout).
kernels::EpSizes ep_sizes(int64_t world, int64_t max_experts, int64_t max_k, int64_t max_tokens, int64_t row_bytes,
                          int64_t scale_cols) {
  kernels::EpSizes s;
  s.world = world;
  s.max_experts = max_experts;
  s.max_k = max_k;
  s.max_tokens = std::max<int64_t>(max_tokens, 1);
  s.row_bytes = row_bytes;
  s.scale_cols = scale_cols;
  return s;
}

// The kernels move rows with 16-byte vector accesses (ep.cu warp_copy): a contiguous view whose
// first element is not 16-byte aligned (a slice starting mid-row) would fault on the device with a
// misaligned address, a sticky error that kills this rank's context while its peers wait for it.
// Such rows are copied to a fresh (aligned) allocation instead.
Tensor aligned_rows(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

// The expert outputs y in recv_x's layout as the kernels read them ([recv_rows, H], 16-byte aligned
// rows), bound to p (combine, and the partial combine's backward for w's gradient).
Tensor bind_y(kernels::EpParams& p, const Tensor& y_in, const char* who) {
  const Tensor y = aligned_rows(y_in.reshape({-1, y_in.size(-1)}).contiguous());
  TORCH_CHECK(y.size(0) == p.recv_rows, "moe_ext ipc backend: ", who, "'s y has ", y.size(0),
              " rows, the dispatch delivered ", p.recv_rows);
  p.y = y.data_ptr();
  p.y_row_stride = y.size(1) * y.element_size();
  return y;
}

kernels::EpFloat ep_float(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::EpFloat::kFloat32;
    case at::kHalf: return kernels::EpFloat::kFloat16;
    case at::kBFloat16: return kernels::EpFloat::kBFloat16;
    default: TORCH_CHECK(false, "moe_ext ipc backend: gradients need float32, float16 or bfloat16 rows, got ", t);
  }
}

class IpcComm : public torch::CustomClassHolder {
 public:
  IpcComm(int64_t device, int64_t world, int64_t rank, int64_t max_experts, int64_t max_k, int64_t max_tokens,
          int64_t row_bytes, int64_t scale_cols, double timeout_s, int64_t num_blocks)
      : device_(device), timeout_s_(timeout_s), num_blocks_(num_blocks) {
    TORCH_CHECK(world >= 1 && world <= kernels::kEpMaxWorld, "moe_ext ipc backend: world size must be in [1, ",
                kernels::kEpMaxWorld, "], got ", world);
    TORCH_CHECK(row_bytes > 0 && row_bytes % 16 == 0, "moe_ext ipc backend: a row must be a positive multiple of "
                "16 bytes (hidden * element size), got ", row_bytes);
    TORCH_CHECK(max_k >= 1 && max_k <= 32, "moe_ext ipc backend: k must be in [1, 32], got ", max_k);
    const kernels::EpSizes s = ep_sizes(world, max_experts, max_k, max_tokens, row_bytes, scale_cols);
    try {
      buf_ = std::make_unique<comm::SymmetricBuffer>(static_cast<int>(device), static_cast<int>(world),
                                                     static_cast<int>(rank), s);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "moe_ext ipc backend: cannot allocate the symmetric buffer of ",
                  kernels::ep_layout(s).total, " bytes on cuda:", device, ": ", e.what());
    }
  }

  Tensor handle() {
    const comm::IpcHandle h = buf().handle();
    Tensor out = at::empty({static_cast<int64_t>(h.size())}, at::kByte);
    std::memcpy(out.data_ptr(), h.data(), h.size());
    return out;
  }

  void open(const Tensor& handles) {
    const Tensor h = handles.to(at::kCPU).contiguous();
    TORCH_CHECK(h.scalar_type() == at::kByte && h.dim() == 2 && h.size(1) == sizeof(cudaIpcMemHandle_t),
                "moe_ext ipc backend: handles must be uint8 [world, ", sizeof(cudaIpcMemHandle_t), "]");
    std::vector<comm::IpcHandle> all(h.size(0));
    for (int64_t r = 0; r < h.size(0); ++r) std::memcpy(all[r].data(), h[r].data_ptr(), all[r].size());
    try {
      buf().open(all);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, e.what());
    }
  }

  void close_peers() {
    if (buf_) buf_->close_peers();
  }

  void close() {
    if (buf_) buf_->close();
    buf_.reset();
  }

  int64_t nbytes() { return buf_ ? static_cast<int64_t>(buf_->bytes()) : 0; }

  std::vector<int64_t> sizes() {
    const kernels::EpSizes& s = buf().layout().sizes;
    return {s.world, s.max_experts, s.max_k, s.max_tokens, s.row_bytes, s.scale_cols};
  }

  // [code, rank, field, phase, value, mine, seq] of the first error (code 0: none).
  std::vector<int64_t> error() {
    if (!buf_) return {0, 0, 0, 0, 0, 0, 0};
    const kernels::EpError e = buf_->error();
    return {e.code, e.rank, e.field, e.phase, e.value, e.mine, e.seq};
  }

  void configure(double timeout_s, int64_t num_blocks) {
    TORCH_CHECK(timeout_s > 0, "moe_ext ipc backend: timeout must be > 0 seconds, got ", timeout_s);
    TORCH_CHECK(num_blocks >= 0, "moe_ext ipc backend: num_sms must be >= 0 (0: all), got ", num_blocks);
    timeout_s_ = timeout_s;
    num_blocks_ = num_blocks;
  }

  // -> [recv_x, recv_scale (empty without x_scale), tokens_per_expert, scratch, slot_rows,
  //     stage_rows, back_map, partial_map, part_rows, part_w, part_dst, slot_map] (partial_map to
  //     part_dst empty without `weights`: given, they travel with the tokens for a partial
  //     combine; slot_map: t * k + j where slot (t, j) has a row, else -1, the per-slot
  //     combine's row map, written by the dispatch's kernels rather than three more launches), then
  //     idx_copy (idx as the plan keeps it: the caller may change its own afterwards). An error
  //     recorded by the kernels leaves recv_x with 0 rows (exact layout): the caller reads error().
  std::vector<Tensor> dispatch(const Tensor& x, const Tensor& idx_in, const c10::optional<Tensor>& x_scale,
                               int64_t num_experts, int64_t pad_to, int64_t capacity, int64_t max_rows,
                               int64_t dtype_code, int64_t bad_input, const c10::optional<Tensor>& weights,
                               bool part_grad) {
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    TORCH_CHECK(x.is_cuda() && x.dim() == 2, "moe_ext ipc backend: x must be a 2-D CUDA tensor");
    TORCH_CHECK(x.stride(1) == 1, "moe_ext ipc backend: x's rows must be contiguous");
    const Tensor idx = idx_in.contiguous();
    const int64_t T = x.size(0), k = idx.size(1), W = buf().layout().sizes.world, El = num_experts / W;
    kernels::EpParams p = call_params(T, k, num_experts, pad_to, capacity, max_rows, x.size(1) * x.element_size(),
                                      dtype_code);
    p.bad_input = bad_input;
    p.idx = idx.data_ptr();
    p.idx_is_int64 = idx.scalar_type() == at::kLong;
    p.x = x.data_ptr();
    p.x_row_stride = x.stride(0) * x.element_size();
    Tensor scale;
    if (x_scale.has_value()) {
      // NOTE: [T] or [T, S...] -> [T, S]; S from the scale's own shape, not reshape({T, -1}),
      // which cannot infer S when T = 0 (a rank without tokens must still announce the same S).
      int64_t cols = 1;
      for (int64_t d = 1; d < x_scale->dim(); ++d) cols *= x_scale->size(d);
      scale = x_scale->to(at::kFloat).reshape({T, cols}).contiguous();
      p.x_scale = scale.data_ptr<float>();
      p.scale_cols = scale.size(1);
    }
    const auto iopt = x.options().dtype(at::kLong);
    Tensor scratch = at::empty({kernels::ep_scratch_len(W, num_experts)}, iopt);
    Tensor slot_rows = at::empty({T, k}, iopt), stage_rows = at::empty({T, k}, iopt), slot_map = at::empty({T, k}, iopt);
    // NOTE: the count exchange zeroes it before anything can fail (no memset launch here): a
    // no-sync caller runs its expert GEMMs before it sees an error, on zero counts then.
    Tensor tpe = at::empty({El}, x.options().dtype(at::kInt));
    Tensor workspace = at::empty(
        {static_cast<int64_t>(comm::ep_dispatch_workspace_bytes(T, k, num_experts, W))}, x.options().dtype(at::kByte));
    p.scratch = scratch.data_ptr<int64_t>();
    p.slot_rows = slot_rows.data_ptr<int64_t>();
    p.stage_rows = stage_rows.data_ptr<int64_t>();
    p.slot_map = slot_map.data_ptr<int64_t>();
    Tensor idx_copy = at::empty({T, k}, idx.options());
    p.idx_copy = idx_copy.data_ptr();
    p.tokens_per_expert = tpe.data_ptr<int32_t>();
    Tensor w, partial_map, part_rows, part_w, part_dst;
    if (weights.has_value()) {
      TORCH_CHECK(weights->dim() == 2 && weights->size(0) == T && weights->size(1) == k,
                  "moe_ext ipc backend: weights must be [num_tokens, k] like idx");
      const int64_t staged = W * buf().layout().sizes.max_tokens;
      w = weights->to(x.device(), at::kFloat).contiguous();
      partial_map = at::empty({T, k}, iopt);
      part_rows = at::empty({staged, k}, iopt);
      part_w = at::empty({staged, k}, x.options().dtype(at::kFloat));
      part_dst = at::empty({staged}, iopt);
      p.weights = w.data_ptr<float>();
      p.partial_map = partial_map.data_ptr<int64_t>();
      p.part_rows = part_rows.data_ptr<int64_t>();
      p.part_w = part_w.data_ptr<float>();
      p.part_dst = part_dst.data_ptr<int64_t>();
      p.part_count = staged;
      p.part_grad = part_grad;
    }
    const bool masked = max_rows >= 0;
    cudaEvent_t counted = nullptr;
    if (!masked) C10_CUDA_CHECK(cudaEventCreateWithFlags(&counted, cudaEventDisableTiming));
    try {
      comm::ep_dispatch_begin(p, workspace.data_ptr(), counted, stream);
    } catch (const std::exception& e) {
      if (counted) cudaEventDestroy(counted);
      TORCH_CHECK(false, "moe_ext ipc backend: ", e.what());
    }
    int64_t rows = masked ? El * max_rows : 0;
    if (!masked) {
      const cudaError_t err = cudaEventSynchronize(counted);  // the one host read of the exact layout
      cudaEventDestroy(counted);
      C10_CUDA_CHECK(err);
      rows = buf().error().code == kernels::kEpOk ? buf().recv_total() : 0;
    }
    Tensor recv_x = at::empty({rows, x.size(1)}, x.options());
    Tensor back_map = at::empty({rows}, iopt);
    // NOTE: x_scale.has_value(), not p.x_scale: a rank with T = 0 has a null scale pointer but
    // still receives its peers' rows and their scales.
    Tensor recv_scale = x_scale.has_value() ? at::empty({rows, p.scale_cols}, x.options().dtype(at::kFloat)) : Tensor();
    p.recv_x = recv_x.data_ptr();
    p.recv_rows = rows;
    p.back_map = back_map.data_ptr<int64_t>();
    p.recv_scale = x_scale.has_value() ? recv_scale.data_ptr<float>() : nullptr;
    comm::ep_dispatch_finish(p, stream);
    if (masked) recv_x = recv_x.view({El, max_rows, x.size(1)});
    const Tensor none = at::empty({0}, iopt);
    return {recv_x, recv_scale.defined() ? recv_scale : at::empty({0}, x.options().dtype(at::kFloat)), tpe, scratch,
            slot_rows, stage_rows, back_map, partial_map.defined() ? partial_map : none,
            part_rows.defined() ? part_rows : none, part_w.defined() ? part_w : none, part_dst.defined() ? part_dst : none,
            slot_map, idx_copy};
  }

  // out [T, H] = sum_j w[t, j] * y[row of (t, j)] (plain sum without weights); also the k rows
  // per token that came back ([T * k, H], rows of unrouted or dropped slots undefined) when
  // keep_rows, for the weights' gradient.
  // With a partial plan (a dispatch given weights): one row per (token, rank) comes back, each the
  // weighted (weights given; their values travelled with the dispatch) or plain sum of the
  // token's rows there; out is the plain sum of those. keep_rows does not apply.
  std::vector<Tensor> combine(const Tensor& y_in, const Tensor& idx, const c10::optional<Tensor>& weights,
                              const std::vector<Tensor>& plan, const std::vector<int64_t>& call, bool keep_rows) {
    const c10::cuda::CUDAGuard guard(y_in.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    kernels::EpParams p = plan_params(idx, plan, call, y_in.size(-1) * y_in.element_size());
    const Tensor y = bind_y(p, y_in, "combine");
    const int64_t T = p.num_tokens, k = p.k;
    if (p.part_dst != nullptr) {
      TORCH_CHECK(!keep_rows, "moe_ext ipc backend: a partial combine keeps no per-slot rows");
      Tensor out = at::empty({T, y.size(1)}, y.options());
      try {
        comm::ep_combine_partial(p, combine_float(y.scalar_type()), weights.has_value(), out.data_ptr(), stream);
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "moe_ext ipc backend: ", e.what());
      }
      return {out, at::empty({0, y.size(1)}, y.options()), plan[4]};
    }
    const Tensor& combine_map = plan[8];
    Tensor w;
    if (weights.has_value()) w = weights->to(at::kFloat).contiguous();
    Tensor out = at::empty({T, y.size(1)}, y.options());
    try {
      comm::ep_combine(p, combine_float(y.scalar_type()), combine_map.data_ptr<int64_t>(),
                       w.defined() ? w.data_ptr<float>() : nullptr, out.data_ptr(), stream);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "moe_ext ipc backend: ", e.what());
    }
    Tensor rows;
    if (keep_rows) {
      const kernels::EpSizes& s = buf().layout().sizes;
      const Tensor staging = at::from_blob(kernels::ep_back_rows(p), {s.max_tokens * s.max_k, s.row_bytes},
                                           y.options().dtype(at::kByte));
      rows = staging.narrow(0, 0, T * k).narrow(1, 0, p.row_bytes).clone().view(y.scalar_type());
    }
    return {out, rows.defined() ? rows : at::empty({0, y.size(1)}, y.options()), combine_map};
  }

  // The combine's backward on the experts' side: grad_y in the dispatch layout (recv_x's rows),
  // grad_y[row of (t, j)] = cast(w[t, j] * g[t]), zero elsewhere. For a partial plan made for w's
  // gradient (y = the combine's y, needed then), also grad_w [T, k] float32 from the experts'
  // ranks (else an empty tensor).
  std::vector<Tensor> combine_grad(const Tensor& g_in, const Tensor& idx, const Tensor& weights,
                                   const c10::optional<Tensor>& y_in, const std::vector<Tensor>& plan,
                                   const std::vector<int64_t>& call) {
    const c10::cuda::CUDAGuard guard(g_in.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const Tensor g = aligned_rows(g_in.contiguous());
    const Tensor w = weights.to(at::kFloat).contiguous();
    kernels::EpParams p = plan_params(idx, plan, call, g.size(1) * g.element_size());
    p.x = g.data_ptr();
    p.x_row_stride = g.size(1) * g.element_size();
    p.weights = w.data_ptr<float>();
    Tensor grad_y = at::empty({p.recv_rows, g.size(1)}, g.options());
    Tensor y, grad_w = at::empty({p.part_grad ? p.num_tokens : 0, p.k}, g.options().dtype(at::kFloat));
    if (p.part_grad) {
      TORCH_CHECK(y_in.has_value(), "moe_ext ipc backend: the partial combine's backward needs y for w's gradient");
      y = bind_y(p, *y_in, "combine_grad");
      TORCH_CHECK(y.size(1) == g.size(1) && y.scalar_type() == g.scalar_type(),
                  "moe_ext ipc backend: y must be the combine's, in recv_x's layout");
    }
    try {
      comm::ep_combine_grad(p, ep_float(g.scalar_type()), grad_y.data_ptr(), grad_y.numel() * grad_y.element_size(),
                            p.part_grad ? grad_w.data_ptr<float>() : nullptr, stream);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "moe_ext ipc backend: ", e.what());
    }
    return {grad_y, grad_w};
  }

 private:
  comm::SymmetricBuffer& buf() {
    TORCH_CHECK(buf_ != nullptr, "moe_ext ipc backend: the communicator is closed");
    return *buf_;
  }

  kernels::EpParams call_params(int64_t T, int64_t k, int64_t E, int64_t pad_to, int64_t capacity, int64_t max_rows,
                                int64_t row_bytes, int64_t dtype_code) {
    kernels::EpParams p = buf().params();
    p.timeout_ns = static_cast<int64_t>(timeout_s_ * 1e9);
    p.num_blocks = static_cast<int>(num_blocks_);
    p.num_tokens = T;
    p.k = k;
    p.num_experts = E;
    p.pad_to = pad_to;
    p.capacity = capacity;
    p.max_rows = max_rows;
    p.row_bytes = row_bytes;
    p.dtype_code = dtype_code;
    return p;
  }

  // plan = [scratch, slot_rows, stage_rows, back_map, partial_map, part_rows, part_w, part_dst,
  // slot_map] (partial_map to part_dst empty without a partial plan); call = [num_experts, pad_to,
  // capacity, max_rows, dtype_code, recv_rows, part_grad].
  kernels::EpParams plan_params(const Tensor& idx, const std::vector<Tensor>& plan, const std::vector<int64_t>& call,
                                int64_t row_bytes) {
    TORCH_CHECK(plan.size() == 9 && call.size() == 7, "moe_ext ipc backend: malformed plan");
    const Tensor& slot_rows = plan[1];
    kernels::EpParams p = call_params(slot_rows.size(0), slot_rows.size(1), call[0], call[1], call[2], call[3],
                                      row_bytes, call[4]);
    TORCH_CHECK(idx.is_contiguous() && idx.size(0) == p.num_tokens, "moe_ext ipc backend: idx must be the dispatch's");
    p.idx = idx.data_ptr();
    p.idx_is_int64 = idx.scalar_type() == at::kLong;
    p.scratch = plan[0].data_ptr<int64_t>();
    p.slot_rows = plan[1].data_ptr<int64_t>();
    p.stage_rows = plan[2].data_ptr<int64_t>();
    p.back_map = plan[3].data_ptr<int64_t>();
    p.recv_rows = call[5];
    if (plan[7].numel() > 0) {
      p.partial_map = plan[4].data_ptr<int64_t>();
      p.part_rows = plan[5].data_ptr<int64_t>();
      p.part_w = plan[6].data_ptr<float>();
      p.part_dst = plan[7].data_ptr<int64_t>();
      p.part_count = plan[7].numel();
      p.part_grad = call[6] != 0;
    }
    return p;
  }

  int64_t device_;
  double timeout_s_;
  int64_t num_blocks_;
  std::unique_ptr<comm::SymmetricBuffer> buf_;
};

int64_t ep_buffer_bytes(int64_t world, int64_t max_experts, int64_t max_k, int64_t max_tokens, int64_t row_bytes,
                        int64_t scale_cols) {
  return static_cast<int64_t>(kernels::ep_layout(ep_sizes(world, max_experts, max_k, max_tokens, row_bytes,
                                                           scale_cols)).total);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ext, m) {
  // The bytes of one rank's symmetric buffer (a memory budget is checked before allocating).
  m.def("ep_buffer_bytes(int world, int max_experts, int max_k, int max_tokens, int row_bytes, int scale_cols) -> int",
        &ep_buffer_bytes);
  m.class_<IpcComm>("IpcComm")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t>())
      .def("handle", &IpcComm::handle)
      .def("open", &IpcComm::open)
      .def("close_peers", &IpcComm::close_peers)
      .def("close", &IpcComm::close)
      .def("nbytes", &IpcComm::nbytes)
      .def("sizes", &IpcComm::sizes)
      .def("error", &IpcComm::error)
      .def("configure", &IpcComm::configure)
      .def("dispatch", &IpcComm::dispatch)
      .def("combine", &IpcComm::combine)
      .def("combine_grad", &IpcComm::combine_grad);
}

}  // namespace moe_ext
