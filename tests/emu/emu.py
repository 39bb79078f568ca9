"""The CUDA kernels that need no tensor-core TMA / wgmma (gating, permute / unpermute, the portable
grouped GEMM, the ipc backend's dispatch / combine) run on the CPU emulation (emu_cuda.h), with
the torch ops' signatures: test_emu_kernels compares them with the CPU ops, as the GPU tests do
on a device. Each call allocates its outputs the way the op adapters (csrc/ops/*_cuda.cu) do,
poisons them, and surrounds each with guard bytes that must be intact afterwards (a write out of
bounds is an error). The launchers' own code (grids, workspace, kernel choice) runs unchanged.
"""
import ctypes
import math
import os
import tempfile

import torch

from . import build as _build

_lib = None
_GUARD = 64  # bytes on each side of every output


class EmuError(RuntimeError):
    pass


def lib():
    global _lib
    if _lib is None:
        out = os.environ.get("MOE_EXT_EMU_DIR") or os.path.join(tempfile.gettempdir(), f"moe_ext_emu_{os.getuid()}")
        path = _build.build(out)
        L = ctypes.CDLL(str(path))
        L.emu_last_error.restype = ctypes.c_char_p
        for name in ("emu_gating_forward_workspace", "emu_gating_backward_workspace", "emu_permute_workspace",
                     "emu_unpermute_backward_workspace"):
            getattr(L, name).restype = ctypes.c_size_t
        _lib = L
    return _lib


def set_device(sms=132, smem_optin=227 * 1024):
    lib().emu_set_device(sms, smem_optin)


def _i64(v):
    return ctypes.c_int64(int(v))


def _p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _call(name, *args):
    L = lib()
    if getattr(L, name)(*args) != 0:
        raise EmuError(L.emu_last_error().decode())


class _Outputs:
    """Poisoned outputs with guard bytes around each."""

    def __init__(self):
        self._bufs = []

    def new(self, shape, dtype, poison=None):
        n = math.prod(shape)
        esize = torch.empty(0, dtype=dtype).element_size()
        raw = torch.empty(2 * _GUARD + n * esize, dtype=torch.uint8)
        raw[:_GUARD] = 0x5A
        raw[_GUARD + n * esize:] = 0x5A
        t = raw[_GUARD:_GUARD + n * esize].view(dtype).view(shape)
        if poison is not None:
            t.fill_(poison)
        elif dtype.is_floating_point:
            t.fill_(float("nan"))
        else:
            t.fill_(-777 if dtype != torch.uint8 else 0xEE)
        self._bufs.append((raw, n * esize))
        return t

    def check(self):
        for raw, nbytes in self._bufs:
            if (raw[:_GUARD] != 0x5A).any() or (raw[_GUARD + nbytes:] != 0x5A).any():
                raise EmuError("a kernel wrote outside its output")


_GATING_FLOAT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def gating_capacity(capacity_factor, T, k, E):
    """checks.h gating_capacity (0: none)."""
    if not capacity_factor > 0:
        return 0
    return max(1, math.ceil(capacity_factor * T * k / E - 1e-9))


def gating_tuning(tile_rows=0, route_warps=0):
    """GatingProblem's launch-shape knobs (tile_rows, route_warps) for the next gating calls; 0: default."""
    lib().emu_gating_tuning(_i64(tile_rows), int(route_warps))


def topk_gating(logits, k, score="softmax", renormalize=True, expert_bias=None, num_groups=0, topk_groups=0,
                capacity_factor=0.0, noise=None, seq_len=0):
    logits = logits.contiguous()
    T, E = logits.shape
    acc = _acc(logits.dtype)
    noise = noise.to(acc).contiguous() if noise is not None else None
    bias = expert_bias.to(acc).contiguous() if expert_bias is not None else None
    o = _Outputs()
    weights, idx, pos = o.new((T, k), acc), o.new((T, k), torch.int32), o.new((T, k), torch.int32)
    tpe = o.new((E,), torch.int32)
    aux, seq, z = o.new((), acc), o.new((), acc), o.new((), acc)
    dt = _GATING_FLOAT[logits.dtype]
    ws = o.new((lib().emu_gating_forward_workspace(dt, _i64(T), _i64(E), _i64(k), _i64(num_groups),
                                                   _i64(topk_groups), _i64(seq_len)),), torch.uint8)
    cap = min(gating_capacity(capacity_factor, T, k, E), T * k)
    _call("emu_gating_forward", dt, int(score == "sigmoid"), _p(logits), _p(noise), _p(bias), _i64(T), _i64(E),
          _i64(k), int(renormalize), _i64(num_groups), _i64(topk_groups), _i64(seq_len), _i64(cap), _p(weights),
          _p(idx), _p(pos), _p(tpe), _p(aux), _p(seq), _p(z), _p(ws))
    o.check()
    return weights, idx, pos, tpe, aux, seq, z


def topk_gating_backward(grad_weights, grad_aux, grad_seq_aux, grad_z, logits, noise, idx, score="softmax",
                         renormalize=True, expert_bias=None, num_groups=0, topk_groups=0, seq_len=0):
    logits = logits.contiguous()
    T, E = logits.shape
    k = idx.shape[1]
    acc = _acc(logits.dtype)
    noise = noise.to(acc).contiguous() if noise is not None else None
    bias = expert_bias.to(acc).contiguous() if expert_bias is not None else None
    gw = grad_weights.to(acc).contiguous()
    kept = idx.to(torch.int32).contiguous()
    g = [torch.as_tensor(v, dtype=acc).reshape(()).contiguous() for v in (grad_aux, grad_seq_aux, grad_z)]
    o = _Outputs()
    grad = o.new((T, E), logits.dtype)
    if T == 0:
        return grad
    dt = _GATING_FLOAT[logits.dtype]
    ws = o.new((lib().emu_gating_backward_workspace(dt, _i64(T), _i64(E), _i64(k), _i64(num_groups),
                                                    _i64(topk_groups), _i64(seq_len)),), torch.uint8)
    _call("emu_gating_backward", dt, int(score == "sigmoid"), _p(logits), _p(noise), _p(bias), _i64(T), _i64(E),
          _i64(k), int(renormalize), _i64(num_groups), _i64(topk_groups), _i64(seq_len), _p(gw), _p(g[0]),
          _p(g[1]), _p(g[2]), _p(kept), _p(grad), _p(ws))
    o.check()
    return grad


def route_to_replicas(idx, replica_counts, replica_slots, rank):
    idx = idx.contiguous()
    o = _Outputs()
    phys = o.new(tuple(idx.shape), idx.dtype)
    _call("emu_route_to_replicas", _p(idx), int(idx.dtype == torch.int64), _i64(idx.numel()),
          _i64(replica_counts.numel()), _p(replica_counts.contiguous()), _p(replica_slots.contiguous()),
          _i64(replica_slots.shape[1]), _i64(rank), _p(phys))
    o.check()
    return phys


def accumulate_load_(load, load_ema, tokens_per_expert, decay):
    tpe = tokens_per_expert.to(torch.int32).contiguous()
    _call("emu_accumulate_load", _p(load), _p(load_ema), _p(tpe), _i64(load.numel()), ctypes.c_double(decay))
    return load, load_ema


def update_expert_bias_(expert_bias, tokens_per_expert, rate):
    load = tokens_per_expert.to(torch.int64).contiguous()
    _call("emu_update_expert_bias", _p(expert_bias), _p(load), _i64(expert_bias.numel()), ctypes.c_float(rate))
    return expert_bias


def permute_max_rows(T, k, E, pad_to, capacity):
    n = T * k
    if capacity >= 0 and capacity * E < n:
        n = capacity * E
    return n + min(n, E) * (pad_to - 1)


def permute(x, idx, num_experts, pad_to=1, capacity=-1, exact=True, max_rows=-1, small_index=True):
    """Returns (x_perm, row_map, tokens_per_expert, total_rows, invalid_ids); x_perm is
    [num_experts * max_rows, H] in the masked layout (max_rows >= 1). small_index=False forces the
    multi-kernel index on calls the one-block index would take."""
    T, H = x.shape
    k = idx.shape[1]
    idx = idx.contiguous()
    o = _Outputs()
    row_map = o.new((T, k), torch.int64)
    tpe = o.new((num_experts,), torch.int32)
    total = o.new((2,), torch.int64)
    ws = o.new((lib().emu_permute_workspace(_i64(T), _i64(k), _i64(num_experts)),), torch.uint8)
    args = (_p(idx), int(idx.dtype == torch.int64), _i64(T), _i64(k), _i64(num_experts), _i64(pad_to), _i64(capacity),
            _i64(max_rows), int(small_index))
    tot_p = ctypes.c_void_p(total.data_ptr())
    inv_p = ctypes.c_void_p(total.data_ptr() + 8)
    _call("emu_permute_route", *args, _p(row_map), _p(tpe), tot_p, inv_p, _p(ws))
    if max_rows >= 1:
        rows = num_experts * max_rows
    else:
        rows = int(total[0]) if exact else permute_max_rows(T, k, num_experts, pad_to, capacity)
    x_perm = o.new((rows, H), x.dtype)
    es = x.element_size()
    _call("emu_permute_scatter", *args, _p(x), _i64(H * es), _i64(x.stride(0) * es), _p(x_perm), _i64(rows),
          _p(row_map), _p(tpe), _p(ws))
    o.check()
    return x_perm, row_map, tpe, int(total[0]), int(total[1])


def unpermute(y, row_map, weights=None, poison_if=None):
    T, k = row_map.shape
    H = y.shape[1]
    w = weights.to(_acc(y.dtype)).contiguous() if weights is not None else None
    o = _Outputs()
    out = o.new((T, H), y.dtype)
    flag = torch.tensor([int(poison_if)], dtype=torch.int32) if poison_if is not None else None
    _call("emu_unpermute", _GATING_FLOAT[y.dtype], _p(y), _i64(y.shape[0]), _i64(y.stride(0)),
          _p(row_map.contiguous()), _p(w), _p(out), _i64(T), _i64(k), _i64(H), _p(flag))
    o.check()
    return out


def unpermute_backward(grad_out, y, row_map, weights=None):
    T, k = row_map.shape
    R, H = y.shape
    w = weights.to(_acc(y.dtype)).contiguous() if weights is not None else None
    o = _Outputs()
    grad_y = o.new((R, H), y.dtype)
    gw64 = o.new((T, k), torch.float64) if weights is not None else None
    ws = o.new((lib().emu_unpermute_backward_workspace(_i64(R)),), torch.uint8)
    _call("emu_unpermute_backward", _GATING_FLOAT[y.dtype], _p(grad_out.contiguous()), _p(y), _i64(R),
          _i64(y.stride(0)), _p(row_map.contiguous()), _p(w), _p(grad_y), _p(gw64), _p(ws), _i64(T), _i64(k),
          _i64(H))
    o.check()
    gw = gw64.to(weights.dtype) if weights is not None else torch.empty(0, dtype=y.dtype)
    return grad_y, gw


def swiglu(h):
    rows, n = h.shape[0], h.shape[1] // 2
    h = h.contiguous()
    o = _Outputs()
    out = o.new((rows, n), h.dtype)
    _call("emu_swiglu", _GATING_FLOAT[h.dtype], _p(h), _p(out), _i64(rows), _i64(n))
    o.check()
    return out


def swiglu_backward(grad, h):
    """As the CUDA op adapter: grad in h's dtype, or else in the accumulation type."""
    rows, n = h.shape[0], h.shape[1] // 2
    same = grad.dtype == h.dtype
    grad = (grad if same else grad.to(_acc(h.dtype))).contiguous()
    h = h.contiguous()
    o = _Outputs()
    out = o.new((rows, 2 * n), h.dtype)
    _call("emu_swiglu_backward", _GATING_FLOAT[h.dtype], ctypes.c_int(0 if same else 1), _p(grad), _p(h), _p(out),
          _i64(rows), _i64(n))
    o.check()
    return out


# ---- the ipc backend over emulated ranks (emu_ep.cpp) -------------------------------------------

_EP_FLOAT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptrs(ts):
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() if t is not None else 0 for t in ts])


class EpWorld:
    """W ranks of the ipc backend in this process, each running ep_ops.cu's launch sequences in
    its own host thread over buffers the others write into (comm::SymmetricBuffer's layout)."""

    def __init__(self, world, max_experts, max_k, max_tokens, row_bytes, scale_cols=0):
        L = lib()
        L.emu_ep_create.restype = ctypes.c_void_p
        L.emu_ep_exception.restype = ctypes.c_char_p
        L.emu_ep_rows.restype = ctypes.c_int64
        L.emu_ep_get.restype = ctypes.c_int64
        self.world = world
        self.h = ctypes.c_void_p(L.emu_ep_create(world, _i64(max_experts), _i64(max_k), _i64(max_tokens),
                                                 _i64(row_bytes), _i64(scale_cols)))
        self._keep = None

    def close(self):
        if self.h:
            lib().emu_ep_destroy(self.h)
            self.h = None

    def _get(self, r, what, dtype, shape):
        n = lib().emu_ep_get(self.h, r, what, None)
        out = torch.empty(n, dtype=torch.uint8)
        lib().emu_ep_get(self.h, r, what, ctypes.c_void_p(out.data_ptr()))
        return out.view(dtype).view(shape)

    def result(self, r):
        """This rank's error record, exception text and tokens_per_expert after the last call."""
        e = (ctypes.c_int64 * 7)()
        lib().emu_ep_error(self.h, r, e)
        return dict(error=dict(zip(("code", "rank", "field", "phase", "value", "mine", "seq"), list(e))),
                    exc=lib().emu_ep_exception(self.h, r).decode(), status=lib().emu_ep_status(self.h, r))

    def dispatch(self, xs, idxs, num_experts, pad_to=1, capacity=None, max_rows=-1, participate=None,
                 dtype_codes=None, bad_input=None, x_scales=None, timeout_s=120.0, num_blocks=0, weights=None,
                 weights_grad=False):
        """weights ([T, k] per rank): the dispatch of a partial combine (they travel with the tokens);
        weights_grad: its backward brings w's gradient back too (combine_grad's grad_w)."""
        W = self.world
        participate = participate or [1] * W
        xs = [x.contiguous() for x in xs]
        idxs = [i.contiguous() for i in idxs]
        scale_cols = x_scales[0].shape[1] if x_scales is not None else 0
        scales = [s.float().contiguous() for s in x_scales] if x_scales is not None else [None] * W
        ws = [w.float().contiguous() for w in weights] if weights is not None else [None] * W
        self._keep = (xs, idxs, scales, ws)
        H, dtype = xs[0].shape[1], xs[0].dtype
        rb = H * xs[0].element_size()
        k = idxs[0].shape[1]
        _call("emu_ep_dispatch", self.h, (ctypes.c_int * W)(*participate),
              (ctypes.c_int64 * W)(*[x.shape[0] for x in xs]), _ptrs(idxs),
              (ctypes.c_int * W)(*[int(i.dtype == torch.int64) for i in idxs]), _ptrs(xs), _ptrs(scales),
              _i64(scale_cols), _i64(k), _i64(rb), _i64(num_experts), _i64(pad_to),
              _i64(-1 if capacity is None else capacity), _i64(max_rows),
              (ctypes.c_int64 * W)(*(dtype_codes or [7] * W)), (ctypes.c_int64 * W)(*(bad_input or [0] * W)),
              ctypes.c_double(timeout_s), num_blocks, _ptrs(ws),
              (2 if weights_grad else 1) if weights is not None else 0)
        out = []
        El = num_experts // W
        for r in range(W):
            rows = lib().emu_ep_rows(self.h, r)
            d = self.result(r)
            if participate[r]:
                d.update(recv_x=self._get(r, 0, dtype, (rows, H)), tpe=self._get(r, 1, torch.int32, (El,)),
                         back_map=self._get(r, 2, torch.int64, (rows,)),
                         slot_rows=self._get(r, 3, torch.int64, (xs[r].shape[0], k)),
                         stage_rows=self._get(r, 8, torch.int64, (xs[r].shape[0], k)))
                if scale_cols:
                    d["recv_scale"] = self._get(r, 7, torch.float32, (rows, scale_cols))
                if weights is not None:
                    d["partial_map"] = self._get(r, 12, torch.int64, (xs[r].shape[0], k))
            out.append(d)
        self._call_info = (dtype, H, k, [x.shape[0] for x in xs])
        self._weights_grad = weights is not None and weights_grad
        return out

    def combine(self, ys, weights, participate=None, keep_rows=False, timeout_s=120.0, num_blocks=0, partial=False):
        """partial: the partial combine of a dispatch given weights (weighted unless weights is None
        or [None] * W: the rows' plain sums, as the dispatch's backward)."""
        W = self.world
        participate = participate or [1] * W
        dtype, H, k, Ts = self._call_info
        ys = [y.reshape(-1, H).contiguous() if y is not None else None for y in ys]
        ws = [w.float().contiguous() if w is not None else None for w in (weights or [None] * W)]
        self._keep2 = (ys, ws)
        _call("emu_ep_combine", self.h, (ctypes.c_int * W)(*participate), _ptrs(ys), _ptrs(ws),
              _GATING_FLOAT[dtype], int(keep_rows), ctypes.c_double(timeout_s), num_blocks,
              (1 if weights is not None else 2) if partial else 0)
        out = []
        for r in range(W):
            d = self.result(r)
            if participate[r]:
                d["out"] = self._get(r, 4, dtype, (Ts[r], H))
                if keep_rows:
                    d["rows"] = self._get(r, 5, dtype, (Ts[r] * k, H))
            out.append(d)
        return out

    def combine_grad(self, gs, weights, participate=None, timeout_s=120.0, num_blocks=0, ys=None):
        """ys: the combine's expert outputs per rank (a dispatch with weights_grad: d["grad_w"] too)."""
        W = self.world
        participate = participate or [1] * W
        dtype, H, k, Ts = self._call_info
        gs = [g.contiguous() for g in gs]
        ws = [w.float().contiguous() for w in weights]
        ys = [y.reshape(-1, H).contiguous() if y is not None else None for y in (ys or [None] * W)]
        self._keep2 = (gs, ws, ys)
        _call("emu_ep_combine_grad", self.h, (ctypes.c_int * W)(*participate), _ptrs(gs), _ptrs(ws),
              _EP_FLOAT[dtype], ctypes.c_double(timeout_s), num_blocks, _ptrs(ys))
        out = []
        for r in range(W):
            d = self.result(r)
            if participate[r]:
                d["grad_y"] = self._get(r, 6, dtype, (lib().emu_ep_rows(self.h, r), H))
                if self._weights_grad:
                    d["grad_w"] = self._get(r, 13, torch.float32, (Ts[r], k))
            out.append(d)
        return out


# ---- the portable grouped GEMM (emu_gemm.cpp) -----------------------------------------------------

_GEMM_FLOAT = {torch.float16: 0, torch.bfloat16: 1}


def _gemm_forward(a, b, sizes, masked, rows, out_shape, trans_b, activation, bias, row_scale):
    E = b.shape[0]
    K = a.shape[-1]
    N = b.shape[1] if trans_b else b.shape[2]
    swiglu = activation == "swiglu"
    o = _Outputs()
    out = o.new((*out_shape, N // 2 if swiglu else N), a.dtype)
    sizes = sizes.contiguous()
    rs = row_scale.float().contiguous() if row_scale is not None else None
    bias = bias.contiguous() if bias is not None else None
    _call("emu_grouped_gemm", _GEMM_FLOAT[a.dtype], int(masked), _p(sizes), int(sizes.dtype == torch.int64),
          int(not masked and sizes.numel() == E + 1), _i64(E), _i64(rows), _p(a.contiguous()), _p(b.contiguous()),
          _p(out), _i64(K), _i64(N), int(trans_b), int(swiglu), _p(rs), _p(bias))
    o.check()
    return out


def grouped_gemm(a, b, sizes, trans_b=False, activation=None, bias=None, row_scale=None):
    """The contiguous layout: a [M, K], b [E, K, N] ([E, N, K] with trans_b), sizes [E] counts or
    [E+1] offsets."""
    M = a.shape[0]
    return _gemm_forward(a, b, sizes, False, M, (M,), trans_b, activation, bias, row_scale)


def grouped_gemm_masked(a, b, valid_rows, trans_b=False, activation=None, bias=None, row_scale=None):
    """The masked layout: a [E, R, K], valid_rows [E]."""
    E, R = a.shape[:2]
    return _gemm_forward(a, b, valid_rows, True, R, (E, R), trans_b, activation, bias, row_scale)


def grouped_gemm_kernel_name(dtype, masked, E, rows, K, N):
    L = lib()
    L.emu_grouped_gemm_kernel_name.restype = ctypes.c_char_p
    return L.emu_grouped_gemm_kernel_name(_GEMM_FLOAT[dtype], int(masked), _i64(E), _i64(rows), _i64(K),
                                          _i64(N)).decode()


def grouped_gemm_wgrad(a, grad_out, sizes, num_experts, trans_b=False):
    M, K = a.shape
    N = grad_out.shape[1]
    o = _Outputs()
    out = o.new((num_experts, N, K) if trans_b else (num_experts, K, N), a.dtype)
    sizes = sizes.contiguous()
    _call("emu_grouped_gemm_wgrad", _GEMM_FLOAT[a.dtype], 0, _p(sizes), int(sizes.dtype == torch.int64),
          int(sizes.numel() == num_experts + 1), _i64(num_experts), _i64(M), _p(a.contiguous()),
          _p(grad_out.contiguous()), _p(out), _i64(K), _i64(N), int(trans_b))
    o.check()
    return out
