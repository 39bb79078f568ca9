// The ipc backend's launch sequences (csrc/comm/ep_ops.cu) over W emulated ranks in one process:
// each rank's buffer is host memory every rank can write (as the peers' IPC-mapped buffers are),
// and each rank runs its sequence in its own host thread, so the one-sided writes, flags and
// waits of ep.cu interact as they do across GPUs. The per-rank setup mirrors
// comm::SymmetricBuffer and the torch adapter (csrc/ops/ep_ipc.cu); results stay here until
// Python copies them out (emu_ep_get).
#include "emu_cuda.h"
#include "comm/ep_ops.cuh"
#include "kernels/ep.cuh"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace k = moe_ext::kernels;
namespace c = moe_ext::comm;

namespace {

struct Rank {
  char* local = nullptr;
  k::EpControl control{};
  k::EpError error{};
  int64_t host_words[2] = {0, 0};
  // The last dispatch's plan and outputs.
  k::EpParams p;
  std::vector<int64_t> scratch, slot_rows, stage_rows, back_map, slot_map;
  std::vector<int64_t> partial_map, part_rows, part_dst;  // the partial combine's plan
  std::vector<float> part_w, grad_w;
  std::vector<int32_t> tpe;
  std::vector<unsigned char> recv_x, out, back_rows, grad_y, workspace, idx_copy;
  std::vector<float> recv_scale;
  int64_t rows = 0;
  std::string exc;
};

struct Ep {
  int world = 1;
  k::EpLayout layout;
  std::vector<Rank> ranks;
  std::vector<char*> peers;
};

template <typename F>
void run_ranks(Ep& ep, const int* participate, F&& body) {
  std::vector<std::thread> threads;
  for (int r = 0; r < ep.world; ++r) {
    if (!participate[r]) continue;
    threads.emplace_back([&, r] {
      Rank& rank = ep.ranks[r];
      rank.exc.clear();
      try {
        body(r, rank);
      } catch (const std::exception& e) {
        rank.exc = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
}

k::EpParams base_params(Ep& ep, int r, double timeout_s, int num_blocks) {
  Rank& rank = ep.ranks[r];
  k::EpParams p;
  p.world = ep.world;
  p.rank = r;
  p.layout = ep.layout;
  p.local = rank.local;
  p.peers = ep.peers.data();
  p.control = &rank.control;
  p.error = &rank.error;
  p.recv_total_host = rank.host_words;
  p.timeout_ns = static_cast<int64_t>(timeout_s * 1e9);
  p.num_blocks = num_blocks;
  return p;
}

// The last dispatch's plan, for a combine or its backward with this call's timeout and blocks.
k::EpParams plan_params(const Rank& rank, double timeout_s, int num_blocks) {
  k::EpParams p = rank.p;
  p.timeout_ns = static_cast<int64_t>(timeout_s * 1e9);
  p.num_blocks = num_blocks;
  return p;
}

}  // namespace

extern "C" {

void* emu_ep_create(int world, int64_t max_experts, int64_t max_k, int64_t max_tokens, int64_t row_bytes,
                    int64_t scale_cols) {
  auto* ep = new Ep;
  ep->world = world;
  k::EpSizes s;
  s.world = world;
  s.max_experts = max_experts;
  s.max_k = max_k;
  s.max_tokens = max_tokens < 1 ? 1 : max_tokens;
  s.row_bytes = row_bytes;
  s.scale_cols = scale_cols;
  ep->layout = k::ep_layout(s);
  ep->ranks.resize(world);
  for (auto& r : ep->ranks) {
    r.local = static_cast<char*>(std::aligned_alloc(256, (ep->layout.total + 255) / 256 * 256));
    std::memset(r.local, 0xA5, ep->layout.total);  // only the flags and counts start at zero
    std::memset(r.local, 0, ep->layout.meta);
    ep->peers.push_back(r.local);
  }
  return ep;
}

void emu_ep_destroy(void* h) {
  auto* ep = static_cast<Ep*>(h);
  for (auto& r : ep->ranks) std::free(r.local);
  delete ep;
}

int64_t emu_ep_buffer_bytes(void* h) { return static_cast<int64_t>(static_cast<Ep*>(h)->layout.total); }

// Per-rank arrays: participate, num_tokens, idx (+ int64 flag), x, x_scale, dtype_code, bad_input;
// weights (float32 [T, k] each) with partial = 1: the plan of a partial combine too.
int emu_ep_dispatch(void* h, const int* participate, const int64_t* num_tokens, const void* const* idx,
                    const int* idx64, const void* const* x, const void* const* x_scale, int64_t scale_cols,
                    int64_t k_, int64_t row_bytes, int64_t num_experts, int64_t pad_to, int64_t capacity,
                    int64_t max_rows, const int64_t* dtype_code, const int64_t* bad_input, double timeout_s,
                    int num_blocks, const float* const* weights, int partial) {
  // partial: 1 the plan of a partial combine, 2 and of w's gradient through it (part_grad)
  Ep& ep = *static_cast<Ep*>(h);
  run_ranks(ep, participate, [&](int r, Rank& rank) {
    k::EpParams p = base_params(ep, r, timeout_s, num_blocks);
    const int64_t T = num_tokens[r], W = ep.world, El = num_experts / W;
    p.num_tokens = T;
    p.k = k_;
    p.num_experts = num_experts;
    p.pad_to = pad_to;
    p.capacity = capacity;
    p.max_rows = max_rows;
    p.row_bytes = row_bytes;
    p.dtype_code = dtype_code[r];
    p.bad_input = bad_input[r];
    p.idx = idx[r];
    p.idx_is_int64 = idx64[r] != 0;
    p.x = x[r];
    p.x_row_stride = row_bytes;
    if (x_scale[r] != nullptr || scale_cols > 0) {
      p.x_scale = static_cast<const float*>(x_scale[r]);
      p.scale_cols = scale_cols;
    }
    rank.scratch.assign(k::ep_scratch_len(W, num_experts), -7);
    rank.slot_rows.assign(T * k_, -7);
    rank.stage_rows.assign(T * k_, -7);
    rank.slot_map.assign(T * k_, -7);
    rank.tpe.assign(El, -7);  // poisoned: the count exchange zeroes it, failed or not
    rank.workspace.assign(c::ep_dispatch_workspace_bytes(T, k_, num_experts, W), 0xEE);
    p.scratch = rank.scratch.data();
    p.slot_rows = rank.slot_rows.data();
    p.stage_rows = rank.stage_rows.data();
    p.slot_map = rank.slot_map.data();
    const size_t idx_bytes = static_cast<size_t>(T * k_) * (idx64[r] ? 8 : 4);
    rank.idx_copy.assign(idx_bytes + 1, 0xEE);  // (+1: a valid pointer when T = 0)
    p.idx_copy = rank.idx_copy.data();
    p.tokens_per_expert = rank.tpe.data();
    if (partial) {
      const int64_t staged = W * ep.layout.sizes.max_tokens;
      rank.partial_map.assign(T * k_, -7);
      rank.part_rows.assign(staged * k_, -7);
      rank.part_w.assign(staged * k_, -7.0f);
      rank.part_dst.assign(staged, -7);
      p.weights = weights[r];
      p.partial_map = rank.partial_map.data();
      p.part_rows = rank.part_rows.data();
      p.part_w = rank.part_w.data();
      p.part_dst = rank.part_dst.data();
      p.part_count = staged;
      p.part_grad = partial == 2;
    }
    const bool masked = max_rows >= 0;
    cudaEvent_t counted = nullptr;
    if (!masked) cudaEventCreateWithFlags(&counted, cudaEventDisableTiming);
    rank.rows = 0;
    c::ep_dispatch_begin(p, rank.workspace.data(), counted, nullptr);
    const int64_t rows = masked ? El * max_rows : (rank.error.code == k::kEpOk ? rank.host_words[0] : 0);
    rank.recv_x.assign(static_cast<size_t>(rows * row_bytes) + 16, 0xEE);
    rank.back_map.assign(rows, -7);
    if (scale_cols > 0) rank.recv_scale.assign(rows * scale_cols + 1, -7.0f);
    p.recv_x = rank.recv_x.data();
    p.recv_rows = rows;
    p.back_map = rank.back_map.data();
    p.recv_scale = scale_cols > 0 ? rank.recv_scale.data() : nullptr;
    c::ep_dispatch_finish(p, nullptr);
    // The plan's contract: every slot written, a code or -1 (nothing arrived there), none left as
    // it was (-7): the partial kernels read every one of them.
    if (partial && rank.error.code == k::kEpOk)
      for (size_t g = 0; g < rank.part_dst.size(); ++g)
        if (rank.part_dst[g] < -1)
          throw std::runtime_error("ep_dispatch left part_dst[" + std::to_string(g) + "] unwritten");
    // slot_map: the combine's row map, t * k + j on every slot with a row, -1 on the others.
    if (rank.error.code == k::kEpOk)
      for (int64_t i = 0; i < T * k_; ++i)
        if (rank.slot_map[i] != (rank.slot_rows[i] >= 0 ? i : -1))
          throw std::runtime_error("ep_dispatch wrote slot_map[" + std::to_string(i) + "] = " +
                                   std::to_string(rank.slot_map[i]) + " for slot row " +
                                   std::to_string(rank.slot_rows[i]));
    // idx_copy: the plan's idx (what the combine and the backward read), written by the dispatch.
    if (idx_bytes > 0 && std::memcmp(rank.idx_copy.data(), idx[r], idx_bytes) != 0)
      throw std::runtime_error("ep_dispatch left idx_copy unlike idx");
    p.idx = rank.idx_copy.data();
    rank.rows = rows;
    rank.p = p;
  });
  return 0;
}

// dtype: kernels::PermuteFloat (0 float32, 2 float16, 3 bfloat16). y[r]: recv rows x row_bytes.
// partial: the partial combine of a dispatch made with partial = 1: 1 weighted, 2 plain sums (the
// weights travelled with the dispatch; a rank without tokens has none, so it is a flag).
int emu_ep_combine(void* h, const int* participate, const void* const* y, const float* const* weights, int dtype,
                   int keep_rows, double timeout_s, int num_blocks, int partial) {
  Ep& ep = *static_cast<Ep*>(h);
  run_ranks(ep, participate, [&](int r, Rank& rank) {
    k::EpParams p = plan_params(rank, timeout_s, num_blocks);
    p.y = y[r];
    p.y_row_stride = p.row_bytes;
    const int64_t T = p.num_tokens, kk = p.k;
    if (partial) {
      rank.out.assign(static_cast<size_t>(T * p.row_bytes) + 16, 0xEE);
      c::ep_combine_partial(p, static_cast<k::PermuteFloat>(dtype), partial == 1, rank.out.data(), nullptr);
      return;
    }
    rank.out.assign(static_cast<size_t>(T * p.row_bytes) + 16, 0xEE);
    c::ep_combine(p, static_cast<k::PermuteFloat>(dtype), rank.slot_map.data(), weights[r], rank.out.data(), nullptr);
    if (keep_rows) {
      const k::EpSizes& s = ep.layout.sizes;
      rank.back_rows.assign(static_cast<size_t>(T * kk * p.row_bytes), 0);
      for (int64_t i = 0; i < T * kk; ++i)
        std::memcpy(rank.back_rows.data() + i * p.row_bytes, k::ep_back_rows(p) + i * s.row_bytes, p.row_bytes);
    }
  });
  return 0;
}

// dtype: kernels::EpFloat (0 float32, 1 float16, 2 bfloat16). g[r]: [T, row_bytes]; weights float32;
// y[r]: the combine's expert outputs (recv rows x row_bytes; a part_grad plan's w gradient needs them).
int emu_ep_combine_grad(void* h, const int* participate, const void* const* g, const float* const* weights, int dtype,
                        double timeout_s, int num_blocks, const void* const* y) {
  Ep& ep = *static_cast<Ep*>(h);
  run_ranks(ep, participate, [&](int r, Rank& rank) {
    k::EpParams p = plan_params(rank, timeout_s, num_blocks);
    p.x = g[r];
    p.x_row_stride = p.row_bytes;
    p.weights = weights[r];
    p.y = y[r];
    p.y_row_stride = p.row_bytes;
    rank.grad_y.assign(static_cast<size_t>(p.recv_rows * p.row_bytes) + 16, 0xEE);
    rank.grad_w.assign(p.num_tokens * p.k + 1, -7.0f);
    c::ep_combine_grad(p, static_cast<k::EpFloat>(dtype), rank.grad_y.data(), p.recv_rows * p.row_bytes,
                       rank.grad_w.data(), nullptr);
  });
  return 0;
}

int64_t emu_ep_rows(void* h, int r) { return static_cast<Ep*>(h)->ranks[r].rows; }

// what: 0 recv_x, 1 tokens_per_expert, 2 back_map, 3 slot_rows, 4 out, 5 back rows, 6 grad_y,
// 7 recv_scale, 8 stage_rows, 9 the dispatch workspace (local index), 10 the plan scratch, 11 the
// buffer, 12 partial_map, 13 grad_w. Returns the bytes copied (dst null: the size only).
int64_t emu_ep_get(void* h, int r, int what, void* dst) {
  Rank& rank = static_cast<Ep*>(h)->ranks[r];
  const void* src = nullptr;
  int64_t n = 0;
  const int64_t rb = rank.p.row_bytes;
  switch (what) {
    case 0: src = rank.recv_x.data(), n = rank.rows * rb; break;
    case 1: src = rank.tpe.data(), n = rank.tpe.size() * 4; break;
    case 2: src = rank.back_map.data(), n = rank.back_map.size() * 8; break;
    case 3: src = rank.slot_rows.data(), n = rank.slot_rows.size() * 8; break;
    case 4: src = rank.out.data(), n = rank.p.num_tokens * rb; break;
    case 5: src = rank.back_rows.data(), n = rank.back_rows.size(); break;
    case 6: src = rank.grad_y.data(), n = rank.rows * rb; break;
    case 7: src = rank.recv_scale.data(), n = rank.rows * rank.p.scale_cols * 4; break;
    case 8: src = rank.stage_rows.data(), n = rank.stage_rows.size() * 8; break;
    case 9: src = rank.workspace.data(), n = rank.workspace.size(); break;  // the local index
    case 10: src = rank.scratch.data(), n = rank.scratch.size() * 8; break;
    case 11: src = rank.local, n = static_cast<int64_t>(static_cast<Ep*>(h)->layout.total); break;  // the buffer
    case 12: src = rank.partial_map.data(), n = rank.partial_map.size() * 8; break;
    case 13: src = rank.grad_w.data(), n = rank.p.num_tokens * rank.p.k * 4; break;
    default: return -1;
  }
  if (dst != nullptr && n > 0) std::memcpy(dst, src, n);
  return n;
}

// The rank's first recorded error: code, rank, field, phase, value, mine, seq; and the exception
// a launch sequence raised (empty: none).
void emu_ep_error(void* h, int r, int64_t* out) {
  const k::EpError& e = static_cast<Ep*>(h)->ranks[r].error;
  out[0] = e.code, out[1] = e.rank, out[2] = e.field, out[3] = e.phase, out[4] = e.value, out[5] = e.mine,
  out[6] = e.seq;
}
const char* emu_ep_exception(void* h, int r) { return static_cast<Ep*>(h)->ranks[r].exc.c_str(); }
int emu_ep_status(void* h, int r) { return static_cast<Ep*>(h)->ranks[r].control.status; }

}  // extern "C"
