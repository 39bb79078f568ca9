"""The MoE layer: router -> topk_gating -> dispatch -> grouped GEMM (SwiGLU) -> grouped GEMM -> combine.

Hybrid layouts (moe_ext.parallel): experts split over a TP group (EP x TP), replicated over EP
ranks (EP x DP) with load-based placement, and the weight moves that change the placement.
The chunked EP pipeline (num_chunks) and the sync-free decode path (decode=True) are described
in the MoE docstring.
"""
import contextlib
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import _ipc
from . import parallel as par
from ._ops import ops, swiglu_backward
from .dispatch import _BACKENDS, _COL, _HEADER, _MAGIC, combine, communicator, dispatch, masked_rows
from .gemm import grouped_gemm, grouped_gemm_masked, swiglu
from .permute import permute, unpermute
from .routing import GatingStats, topk_gating, update_expert_bias


def _ep_world(group):
    return par.group_world(group)


def _check_tp_dispatch(tp_dispatch, ep_world, ep_rank, tp_world, tp_rank):
    """tp_dispatch="direct" dispatches over the default group: it must be the EP x TP ranks laid out
    as make_groups does. Collective over the default group (every rank checks every rank's place,
    so that all raise or none)."""
    if tp_dispatch not in ("gather", "direct"):
        raise ValueError(f"moe_ext.MoE: tp_dispatch must be 'gather' or 'direct', got {tp_dispatch!r}")
    if tp_dispatch != "direct" or tp_world == 1:
        return
    places = None
    if dist.is_initialized():
        places = [None] * dist.get_world_size()
        dist.all_gather_object(places, (ep_world, ep_rank, tp_world, tp_rank))
    if places is None or any(p != (ep_world, g // tp_world, tp_world, g % tp_world) for g, p in enumerate(places)):
        raise ValueError("moe_ext.MoE: tp_dispatch='direct' dispatches over the default process group, which must be "
                         "the EP x TP ranks with global rank = ep_rank * tp + tp_rank (the groups of "
                         "moe_ext.parallel.make_groups)")


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (the shared experts): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden, ffn_hidden, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(hidden, ffn_hidden, **kw), nn.Linear(hidden, ffn_hidden, **kw)
        self.down_proj = nn.Linear(ffn_hidden, hidden, **kw)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- the chunked EP pipeline ----------------------------------------------------------------------
# One autograd node for all chunks, so that its backward can order the communication itself:
# every chunk's gradient scatter (combine's backward) starts at once on the communication stream,
# before any expert backward is queued on the compute stream; each chunk's expert backward then
# waits only for its own scatter, and its dispatch backward (the x gradient going home) is
# started asynchronously, in flight during the next chunk's expert backward. (Left to autograd,
# each communication call would wait for every compute kernel queued before it.)
# Chunking also splits each expert's rows over several GEMM calls. The weight gradient, a sum over
# the rows, is therefore computed once over every chunk's rows put back in the order and padding
# of a single unchunked dispatch (a sum of per-chunk sums would round differently).

def _round_up(n, multiple):
    return (n + multiple - 1) // multiple * multiple


def _unchunked_rows(counts, pad_to):
    """Where the rows of one unchunked dispatch lie among the chunks' rows.

    counts [W, n, S] int64: rows source rank r sent to local slot s in chunk c. Dispatch lays out a
    chunk's rows slot by slot, inside a slot by source rank (then token), then padding to pad_to;
    the chunks' rows are concatenated in chunk order. One dispatch of all tokens would hold, per
    slot, the rows by source rank, inside a source by chunk (chunks are contiguous token ranges),
    then padding. Returns (index [R] int64 into the concatenated rows, -1 for a padding row;
    sizes [S] int64 padded rows per slot; per_chunk [n, S] the chunks' padded rows per slot).
    """
    W, n, S = counts.shape
    per_chunk = _round_up(counts.sum(0), pad_to)
    flat = per_chunk.reshape(-1)
    start = (flat.cumsum(0) - flat).view(n, S) + counts.cumsum(0) - counts  # [W, n, S] first row of each block
    lengths = counts.permute(2, 0, 1).reshape(-1)  # blocks in (slot, source, chunk) order
    starts = start.permute(2, 0, 1).reshape(-1)
    total = int(lengths.sum())
    real = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths) + torch.arange(total)
    per_slot = counts.sum((0, 1))
    sizes = _round_up(per_slot, pad_to)
    shift = (sizes.cumsum(0) - sizes) - (per_slot.cumsum(0) - per_slot)  # padded minus unpadded slot start
    index = torch.full((int(sizes.sum()),), -1, dtype=torch.int64)
    index[torch.arange(total) + torch.repeat_interleave(shift, per_slot)] = real
    return index, sizes, per_chunk


def _work(comm):
    work = getattr(comm, "last_work", None)
    return work if work is not None else _Done


class _Done:
    @staticmethod
    def wait():
        return True


@contextlib.contextmanager
def _bounded_sms(layer, device):
    """While the overlapped pipeline runs: the ipc communicator's kernels on at most
    layer.comm_sms SMs, so that the expert GEMMs run beside them (restored afterwards)."""
    comm = None
    if layer.overlap and layer.comm_sms is not None and device.type == "cuda" and layer.backend in ("auto", "ipc"):
        comm = communicator(layer.ep_group, device, backend=layer.backend)
    if not hasattr(comm, "num_sms"):  # gloo / nccl: nothing to bound
        yield
        return
    old, comm.num_sms = comm.num_sms, layer.comm_sms
    try:
        yield
    finally:
        comm.num_sms = old


class _Pipeline(torch.autograd.Function):
    """out [T, H], tokens_per_slot [S] = the routed experts of `layer` over its num_chunks chunks
    (MoE._pipeline); differentiable w.r.t. x2, the routing weights w, w1 and w2. keep_h: keep each
    chunk's up-projection for the backward (MoE.keeps_activation)."""

    @staticmethod
    def forward(ctx, x2, w, w1, w2, slots, layer, keep_h):
        n, T = layer.num_chunks, x2.shape[0]
        layer._agree_on_chunks()
        sizes = [(c + 1) * T // n - c * T // n for c in range(n)]
        ss = slots.split(sizes)
        with _bounded_sms(layer, x2.device):
            chunks = _Pipeline._chunks(x2.split(sizes), ss, w.split(sizes), w1, w2, layer, w.requires_grad, keep_h)
        ctx.layer, ctx.sizes, ctx.chunks = layer, sizes, [c[:7] for c in chunks]
        ctx.counts = layer._chunk_counts(ss)
        ctx.save_for_backward(w, w1, w2)
        tokens_per_slot = torch.stack([c[5] for c in chunks]).sum(0, dtype=torch.int32)
        ctx.mark_non_differentiable(tokens_per_slot)
        return torch.cat([c[7] for c in chunks]), tokens_per_slot

    @staticmethod
    def _chunks(xs, ss, ws, w1, w2, layer, keep_rows, keep_h):
        """Every chunk's dispatch -> experts -> combine: [(handle, recv_x, h, y, rows, tps, pre, out)],
        h = SwiGLU(pre), pre the up-projection (None unless keep_h: the backward recomputes it)."""
        n, overlap = len(xs), layer.overlap
        started, chunks, works = {}, [], []

        def start(c):
            if c < n:  # NOTE: grad mode is off in here; a partial combine must know whether w needs a gradient
                started[c] = layer._dispatch(xs[c], ss[c], ws[c], async_op=overlap, _partial_grad=keep_rows)

        # NOTE: an exact-layout dispatch holds the host until its count exchange is through, and the
        # communication stream runs in call order, so it waits for everything queued there before
        # it. Overlapped, a GEMM is queued ahead of every such wait: chunks 0 and 1 are dispatched
        # first, and dispatch c+1 goes after chunk c's GEMMs but before chunk c's combine (order
        # D0 D1 G0 C0 G1 D2 C1 G2 D3 C2 ...): while the host waits for D(c+1) behind C(c-1), the
        # GPU runs G(c); queued after C(c), it would wait for G(c) with nothing behind it.
        start(0)
        if overlap:
            start(1)
        for c in range(n):
            recv_x, tps, handle = started.pop(c)
            handle.wait()
            pre = ops.grouped_gemm(recv_x, w1, tps, False, "none") if keep_h else None
            h = ops.swiglu(pre) if keep_h else ops.grouped_gemm(recv_x, w1, tps, False, "swiglu")
            y = ops.grouped_gemm(h, w2, tps, False, "none")
            if overlap and c >= 1:
                start(c + 1)
            out, rows = handle.comm.combine(y, ws[c], handle.plan, handle.row_map, keep_rows=keep_rows,
                                            async_op=overlap)  # NOTE: in flight during chunk c+1's GEMMs
            works.append(_work(handle.comm))
            chunks.append((handle, recv_x, h, y, rows, tps, pre, out))
            if not overlap:
                start(c + 1)
        for work in works:
            work.wait()
        return chunks

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_tps):
        with _bounded_sms(ctx.layer, grad_out.device):
            return _Pipeline._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        w, w1, w2 = ctx.saved_tensors
        layer, chunks, n = ctx.layer, ctx.chunks, len(ctx.chunks)
        need_x, need_w, need_w1, need_w2 = ctx.needs_input_grad[:4]
        gs, ws = grad_out.contiguous().split(ctx.sizes), w.split(ctx.sizes)
        # 1. Every chunk's gradient scatter, last chunk first (the order they are consumed), before
        # any compute is queued: each waits only for grad_out.
        scattered = {}
        for c in reversed(range(n)):
            handle, _, _, y, _, _, _ = chunks[c]
            # NOTE: a partial combine's plan brings w's gradient back with grad_y (partial_combine=True)
            grad_y, gw = handle.comm.scatter_grad(gs[c], ws[c], y, handle.plan, async_op=layer.overlap)
            scattered[c] = (grad_y, gw, _work(handle.comm))
        grad_w = None
        if need_w and not layer.partial_combine:
            grad_w = torch.cat([ops.unpermute_backward(gs[c], chunks[c][4], chunks[c][0].row_map, ws[c])[1]
                                for c in range(n)])
        gws = {}
        # 2. Per chunk: its experts' backward, then its x gradient on the way home (async).
        rows, homes = {}, {}
        for c in reversed(range(n)):
            handle, x, h, _, _, tps, pre = chunks[c]
            grad_y, gws[c], work = scattered.pop(c)
            work.wait()
            grad_y = grad_y.contiguous()
            grad_h = ops.grouped_gemm(grad_y, w2, tps, True, "none")
            if pre is None:  # recompute_activation
                pre = ops.grouped_gemm(x, w1, tps, False, "none")
            grad_pre = swiglu_backward(grad_h, pre).contiguous()
            rows[c] = (x, grad_pre, h, grad_y)
            if need_x:
                grad_recv = ops.grouped_gemm(grad_pre, w1, tps, True, "none")
                grad_x, _ = handle.comm.combine(grad_recv, None, handle.plan, handle.row_map,
                                                stage="dispatch-backward", async_op=layer.overlap)
                homes[c] = (grad_x, _work(handle.comm))
        # 3. The weights' gradient once, over every chunk's rows in the unchunked layout.
        grad_w1 = grad_w2 = None
        if need_w1 or need_w2:
            index, sizes, per_chunk = _unchunked_rows(ctx.counts, layer.pad_to)
            if not torch.equal(per_chunk, torch.stack([c[5] for c in chunks]).cpu().long()):
                raise RuntimeError("moe_ext.MoE: a chunk's dispatch returned other per-slot row counts than the "
                                   "layer expected from the routing (dispatch's layout changed?)")
            device = w1.device
            index, sizes = index.to(device), sizes.to(device=device, dtype=torch.int32)

            def unchunked(parts):  # NOTE: index -1 picks the zero row appended last (padding rows)
                return torch.cat(list(parts) + [parts[0].new_zeros(1, parts[0].shape[1])])[index]

            x, grad_pre, h, grad_y = (unchunked(parts) for parts in zip(*(rows[c] for c in range(n))))
            S = sizes.shape[0]
            grad_w1 = ops.grouped_gemm_wgrad(x, grad_pre, sizes, S, False) if need_w1 else None
            grad_w2 = ops.grouped_gemm_wgrad(h, grad_y, sizes, S, False) if need_w2 else None
        grad_x2 = None
        if need_x:
            for c in range(n):
                homes[c][1].wait()
            grad_x2 = torch.cat([homes[c][0] for c in range(n)])
        if need_w and layer.partial_combine:
            grad_w = torch.cat([gws[c] for c in range(n)])
        return grad_x2, grad_w, grad_w1, grad_w2, None, None, None


_PIPELINE_MAGIC = 0x6D6F6570  # "moep": the chunked pipeline's first message (MoE._agree_on_chunks)


def _set_data_new_shape(p, t):
    """p.data = t where t has another shape. torch keeps a parameter's cached gradient accumulator
    (which checks the gradient's shape) across a .data change of the same dtype and device, so a
    graph of an earlier forward still alive (the last step's loss) would make the next backward
    fail on the old shape; a change of dtype drops that cache, hence the detour."""
    p.data = t.new_empty(0, dtype=torch.float64 if t.dtype != torch.float64 else torch.float32)
    p.data = t


class MoE(nn.Module):
    """A Mixture-of-Experts SwiGLU layer with expert parallelism over `ep_group`.

    hidden H, ffn_hidden F (per expert), num_experts E (global), k experts per token.
    ep_group: a torch.distributed ProcessGroup over which the E experts are split (None or a
    group of one: every expert on this rank, no communication). By default in contiguous blocks
    of E / W; `placement` says otherwise (below).
    tp_group: expert tensor parallelism (EP x TP). Every expert slot of this EP rank is split over
    the TP group: w1's gate and up halves by matching columns (F / tp of each), w2 by the same
    rows. tp_dispatch="gather" (default): each rank dispatches its own tokens within its EP group;
    the TP group then all-gathers the rows its ranks received, each runs its shard on all of them,
    and the partial outputs are summed back onto the receiving rank (all-to-all + float32 sum in
    TP-rank order) before combine. tp_dispatch="direct": one dispatch over the default group
    sends each token to every TP shard of its experts, and combine sums the k * tp partial rows
    (each rounded to the dtype). direct moves (tp - 1) x (slots - token/rank pairs) fewer rows
    in all; gather keeps all but one dispatch and one combine of them inside the TP group (on
    NVLink when TP is inside a node, where EP may cross the network): bench/ep_tp_bench.py.
    `moe_ext.parallel.make_groups(ep, tp)` builds both groups (TP innermost; direct needs that
    layout, and building a direct layer is collective over the default group, which checks it).
    placement: which EP ranks hold which experts, with replicas (EP x DP): None, an ExpertLayout,
    a moe_ext.placement.Placement, a [W, E] bool array, a dict {expert: [ranks]} or a list of
    per-rank expert lists. Each rank has S slots (its experts ascending; ranks with fewer experts
    leave slots empty); dispatch sees the W * S physical slots. For each (token, expert) the
    router picks one replica: the n-th assignment to e on this rank, in (token, slot) order, goes
    to replica (n + ep_rank) mod (replicas of e), so every rank spreads its tokens evenly over the
    replicas, deterministically. A layer with replicas is built collectively (replicas start as
    copies of the lowest rank's); call `sync_replica_grads()` after every backward (before
    clipping and the optimizer step) so replicas keep identical weights. Over groups of several
    ranks every layer is built collectively: the constructor checks that all ranks of ep_group and
    tp_group pass the same configuration (placement, routing options, num_chunks, ...; one
    all_gather_object per group, on the current CUDA device for NCCL groups).
    Routing (see moe_ext.topk_gating): score "softmax" | "sigmoid", renormalize, num_groups /
    topk_groups, capacity_factor, noise_std (training only), expert_bias=True for
    auxiliary-loss-free balancing (a float32 buffer updated by `update_expert_bias`),
    routed_scaling_factor multiplies the routing weights. router_dtype: the router's matmul dtype
    (default: float32, or float64 for float64 inputs).
    Activation memory (recompute_activation): when the up-projection needs a gradient, the forward
    runs it as a plain grouped GEMM, keeps its output pre [rows, 2F / tp] for the backward and
    applies SwiGLU (moe_ext.gemm.swiglu) to pre rounded to the dtype, as a plain PyTorch SwiGLU
    does. recompute_activation=True keeps 2F / tp fewer values per row instead: the forward fuses
    SwiGLU into the GEMM and the backward runs the up-projection again (~1/3 more expert FLOPs in
    the backward). Without a gradient (no_grad / inference_mode, or neither x nor w1 requiring
    grad; decode) SwiGLU is always fused, on the float32 accumulator: for 16-bit dtypes such
    outputs differ from the kept-activation training forward by that one rounding of pre
    (float32 and float64: by the last bits of two silu implementations). Chunked or not, the
    choice is the same, made once per forward on the layer's input.
    shared_ffn_hidden > 0 adds a shared SwiGLU expert on every token (DeepSeek/Qwen);
    shared_expert_gate=True scales it by sigmoid(x @ g) per token (Qwen2-MoE).
    Weights: router.weight [E, H]; w1 [S, H, 2F / tp] (gate | up halves of this TP rank's
    columns); w2 [S, F / tp, H]; S = E / W without placement. `load_experts` / `expert_weights`
    convert from / to the logical [E, H, 2F] and [E, F, H] weights.
    After each forward, `layer.stats` holds the GatingStats (aux_loss, seq_aux_loss for [B, S, H]
    inputs, z_loss, tokens_per_expert); the caller chooses the loss coefficients.
    `tokens_per_slot` holds the rows this rank's slots ran in the last forward; `expert_load()`
    the running average of tokens_per_expert over all ranks (decay `load_decay` per forward),
    the input for moe_ext.placement.rebalance; `apply_placement` moves the weights to a new one.

    Chunked EP pipeline (num_chunks, overlap; EP world W > 1, no expert TP): routing runs once on
    the whole batch, then the tokens are split into num_chunks contiguous chunks (the same number
    on every rank; chunks may be empty, e.g. T < num_chunks or T = 0, and still take part in
    every collective, forward and backward). overlap=True pipelines them: chunk c+1 is dispatched
    (async_op) while chunk c's expert GEMMs run (queued after them, before chunk c's combine, so
    that a GEMM is always queued while the host waits for a dispatch's row count), and chunk c's
    combine (async_op) is still in flight during chunk c+1's GEMMs; each handle is waited on just
    before its result is used.
    While it overlaps, the ipc communicator's kernels run on at most comm_sms SMs (default 24;
    None: the communicator's own setting), so that the GEMMs find SMs beside them.
    overlap=False runs the same chunks one after the other (dispatch, GEMMs, combine), each call
    synchronous. With num_chunks=1 (the default), or W = 1 where nothing travels, the layer does
    not chunk; overlap changes nothing then. Chunking does not change what is computed:
    - capacity_factor drops tokens in the router, over this rank's whole batch before chunking,
      so the same tokens are dropped (dispatch's per-call capacity is not used by the layer);
    - each token's k expert rows are summed by combine in float32 in slot order, as unchunked;
    - the expert weights' gradient is computed once over every chunk's rows, reordered and padded
      as one unchunked dispatch lays them out (one small extra all-to-all of per-chunk counts per
      forward), not as a sum over chunks;
    - the aux losses, stats and expert_load come from the whole-batch routing.
    So outputs and the gradients of x and of every parameter are bit-identical to num_chunks=1,
    provided the grouped GEMM gives a row the same bits whatever other rows share its call. The
    CUDA grouped kernels (bf16/fp16) compute tile by tile without splitting the rows' sums, so
    they should (tests/test_cuda_layer.py checks; float32 on CUDA goes through cuBLAS per expert,
    whose kernel choice may depend on the row count). On the CPU, MKL's GEMM gives a row other bits
    depending on how many rows share the call (seen: calls of fewer than 4 rows, and the rows past
    the last multiple of 4), so there bit-identity needs pad_to a multiple of 4; otherwise chunked
    results differ from unchunked ones by rounding only. Every rank must use the same num_chunks
    and overlap (they fix the order of the collective calls). On CUDA the communication runs on
    the backend's own stream. Backward, with overlap=True: every chunk's gradient scatter starts
    before any expert backward is queued, each chunk's expert backward waits only for its own,
    and its x gradient travels home (async) during the next chunk's expert backward.
    partial_combine=True: the layer's combines (and the dispatches' backward) send one row per
    (token, rank) back instead of one per slot (dispatch's partial_combine): fewer bytes wherever
    a token has several experts on one rank. For 16-bit rows one more rounding per partial, so
    results differ from partial_combine=False by rounding; every num_chunks / overlap still gives
    the same bits, and the routing weights' gradient is the per-slot one, bit for bit.

    Decode (max_decode_tokens, decode): forward(x, decode=True) (or layer.decode = True, e.g.
    on every MoE of a model) runs without any host synchronisation, so the whole forward can be
    captured in a torch.cuda.CUDAGraph and replayed: the no-sync dispatch (sync=False, the masked
    [S, max_rows, H] layout, max_rows = W * max_decode_tokens rounded up to pad_to; with W = 1 it is
    built locally from permute), grouped_gemm_masked (SwiGLU, then the second GEMM; rows past an
    expert's valid count ignored) and combine. Every rank passes at most max_decode_tokens tokens
    (the same bound on every rank). decode_partial_combine=True: the decode combine sends one row
    per (token, rank) back instead of one per slot (dispatch's partial_combine: fewer bytes, one
    more rounding per partial; gradients still flow, the router's through w's from the experts'
    ranks). Routing (topk_gating), the aux losses, `load` and the
    expert_load average are device-side updates and stay on; nothing is skipped. Not chunked.
    Limits: no expert TP (its all-gather reads counts back); on CUDA only bf16/fp16 expert weights are capturable (the float32/float64
    masked GEMM reads valid_rows back to the host); W > 1 needs the ipc backend to be capturable
    (run one eager forward first: creating its buffers is a collective; capturing without them, or
    with float32 weights, raises a ValueError). The output equals the normal forward's
    (bit-identical with pad_to=1 on the CPU). Replaying a captured decode forward:
    - a failed exchange (a peer that never replays, or died) cannot raise inside the replay: the
      kernels give up after the communicator's timeout and that replay's output is NaN; after
      reading it, `moe_ext.communicator(ep_group).check()` raises the error naming the rank;
    - replay on the stream the graph was captured on, or one ordered after every earlier
      dispatch/combine (wait for async handles first): the replay and eager calls share the
      communicator's operation counter;
    - `layer.stats` and `tokens_per_slot` are the tensors of the last Python forward: keep the
      ones right after the capture (the graph's own, which every replay refreshes); `load` and
      `expert_load()` are updated in place and follow every replay;
    - `update_expert_bias`, `load_experts` and `apply_placement` (with the same slots per rank and
      replica counts) write in place, so replays use the new values.
    """

    def __init__(self, hidden, ffn_hidden, num_experts, k, ep_group=None, tp_group=None, *, placement=None,
                 score="softmax", renormalize=True, num_groups=None, topk_groups=None, capacity_factor=None,
                 noise_std=0.0, expert_bias=False, routed_scaling_factor=1.0, shared_ffn_hidden=0,
                 shared_expert_gate=False, router_dtype=None, pad_to=1, backend="auto", load_decay=0.9,
                 num_chunks=1, overlap=True, comm_sms=24, max_decode_tokens=None, tp_dispatch="gather",
                 recompute_activation=False, partial_combine=False, decode_partial_combine=False, device=None,
                 dtype=None):
        super().__init__()
        world, rank = _ep_world(ep_group)
        tp_world, tp_rank = _ep_world(tp_group)
        if placement is None and num_experts % world != 0:
            raise ValueError(f"moe_ext.MoE: num_experts={num_experts} must be a multiple of the EP world size {world}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"moe_ext.MoE: k must be in [1, num_experts={num_experts}], got {k}")
        if ffn_hidden % tp_world != 0:
            raise ValueError(f"moe_ext.MoE: ffn_hidden={ffn_hidden} must be a multiple of the TP world size {tp_world}")
        if backend not in _BACKENDS:
            raise ValueError(f"moe_ext.MoE: backend must be one of {_BACKENDS}, got {backend!r}")
        if not 0.0 <= load_decay < 1.0:
            raise ValueError(f"moe_ext.MoE: load_decay must be in [0, 1), got {load_decay}")
        if not (isinstance(num_chunks, int) and num_chunks >= 1):
            raise ValueError(f"moe_ext.MoE: num_chunks must be an int >= 1, got {num_chunks!r}")
        if num_chunks > 1 and tp_world > 1:
            raise ValueError("moe_ext.MoE: num_chunks > 1 is not supported with expert TP (tp_group of "
                             f"{tp_world} ranks)")
        _check_tp_dispatch(tp_dispatch, world, rank, tp_world, tp_rank)
        if comm_sms is not None and not (isinstance(comm_sms, int) and comm_sms >= 0):
            raise ValueError(f"moe_ext.MoE: comm_sms must be None or an int >= 0, got {comm_sms!r}")
        if max_decode_tokens is not None and not (isinstance(max_decode_tokens, int) and max_decode_tokens >= 1):
            raise ValueError(f"moe_ext.MoE: max_decode_tokens must be None or an int >= 1, got {max_decode_tokens!r}")
        self.hidden, self.ffn_hidden, self.num_experts, self.k = hidden, ffn_hidden, num_experts, k
        self.ep_group, self.ep_world, self.ep_rank = ep_group, world, rank
        self.tp_group, self.tp_world, self.tp_rank = tp_group, tp_world, tp_rank
        self.ffn_local = ffn_hidden // tp_world
        self.routing = dict(score=score, renormalize=renormalize, num_groups=num_groups, topk_groups=topk_groups,
                            capacity_factor=capacity_factor)
        self.noise_std, self.routed_scaling_factor = noise_std, routed_scaling_factor
        self.router_dtype, self.pad_to, self.backend = router_dtype, pad_to, backend
        self.load_decay = load_decay
        self.num_chunks, self.overlap, self.comm_sms = num_chunks, overlap, comm_sms
        self.max_decode_tokens, self.decode = max_decode_tokens, False
        self.tp_dispatch = tp_dispatch
        self.recompute_activation = bool(recompute_activation)
        self.partial_combine = bool(partial_combine)
        self.decode_partial_combine = bool(decode_partial_combine)

        kw = dict(device=device, dtype=dtype)
        self.router = nn.Linear(hidden, num_experts, bias=False, **kw)
        self._set_layout(par.ExpertLayout.build(placement, num_experts, world), device)
        S = self.num_local_experts
        self.w1 = nn.Parameter(torch.empty(S, hidden, 2 * self.ffn_local, **kw))
        self.w2 = nn.Parameter(torch.empty(S, self.ffn_local, hidden, **kw))
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device) if expert_bias else None)
        # Kept assignments per expert since the last bias update / reset (this rank's tokens).
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.int64, device=device), persistent=False)
        # Running average of this rank's tokens_per_expert: [E + 1] float64, the last entry the total
        # weight so far (bias correction, as for Adam's moments). Not a buffer: .to(dtype) must not round it.
        self._load_ema = torch.zeros(num_experts + 1, dtype=torch.float64, device=device)
        self.tokens_per_slot: Optional[torch.Tensor] = None
        self.shared = SwiGLU(hidden, shared_ffn_hidden, **kw) if shared_ffn_hidden else None
        self.shared_gate = nn.Linear(hidden, 1, bias=False, **kw) if shared_expert_gate else None
        self.stats: Optional[GatingStats] = None
        self._check_ranks_agree()  # NOTE: first: reset_parameters makes collectives that follow the placement
        self.reset_parameters()

    def _check_ranks_agree(self):
        """Every rank of the EP and TP groups builds the same layer (one all-gather per group): a
        placement or routing option that differed would send tokens to the wrong experts with no
        error anywhere, and the dispatch header cannot see those."""
        config = dict(hidden=self.hidden, ffn_hidden=self.ffn_hidden, num_experts=self.num_experts, k=self.k,
                      placement=self.layout.digest(), routing=self.routing, noise_std=self.noise_std,
                      routed_scaling_factor=self.routed_scaling_factor, pad_to=self.pad_to, backend=self.backend,
                      tp_dispatch=self.tp_dispatch, num_chunks=self.num_chunks, overlap=bool(self.overlap),
                      partial_combine=self.partial_combine, decode_partial_combine=self.decode_partial_combine,
                      max_decode_tokens=self.max_decode_tokens, expert_bias=self.expert_bias is not None,
                      dtype=str(self.w1.dtype))
        for group in (self.ep_group, self.tp_group):
            world, _ = par.group_world(group)
            if world == 1:
                continue
            got = [None] * world
            dist.all_gather_object(got, config, group=group)
            for name in config:
                values = [c[name] for c in got]
                if any(v != values[0] for v in values):
                    ranks = dist.get_process_group_ranks(group)
                    per_rank = ", ".join(f"rank {r}: {v}" for r, v in zip(ranks, values))
                    raise ValueError(f"moe_ext.MoE: the ranks of the group {ranks} disagree on {name} ({per_rank}); "
                                     "every rank must build the same layer")

    def _apply(self, fn, recurse=True):
        # NOTE: the expert bias moves in rate-sized steps (1e-3): it stays float32 when the layer is
        # cast (.bfloat16(), .to(dtype)), as topk_gating requires; only its device follows.
        # The running load (a plain float64 attribute, not state to save) follows the device too, so
        # that expert_load() and a first forward inside graph capture find it where the layer is.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != bias.dtype:
            self.expert_bias = bias.to(self.expert_bias.device)
        self._load_ema = self._load_ema.to(self.router.weight.device)
        return self

    def _set_layout(self, layout, device=None):
        self.layout = layout
        self.num_local_experts = layout.slots_per_rank
        device = device if device is not None else (self.w1.device if hasattr(self, "w1") else None)
        # NOTE: non-persistent buffers, so .to(device) moves the replica tables with the layer. Copies
        # (never the layout's own tensors, which other layers may share). replica_counts is always
        # [E] int64, so only replica_slots [E, most replicas] can change shape; while it does not, both
        # are rewritten in place, since a captured decode graph keeps reading them.
        counts = layout.replica_counts.to(device, copy=True)
        slots = layout.replica_slots.to(device, copy=True)
        old = getattr(self, "replica_slots", None)
        if old is not None and (old.shape, old.device) == (slots.shape, slots.device):
            self.replica_counts.copy_(counts)
            old.copy_(slots)
        else:
            self.register_buffer("replica_counts", counts, persistent=False)
            self.register_buffer("replica_slots", slots, persistent=False)

    @property
    def first_local_expert(self):
        """The first expert of this rank under the default contiguous layout."""
        return self.ep_rank * self.num_local_experts

    @property
    def local_experts(self):
        """The logical expert of each of this rank's slots, [S] (-1 = empty slot)."""
        return self.layout.slot_expert[self.ep_rank].tolist()

    @torch.no_grad()
    def reset_parameters(self):
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for each expert's projections.
        for w, fan_in in ((self.w1, self.hidden), (self.w2, self.ffn_hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            w.uniform_(-bound, bound)
        empty = torch.tensor([e < 0 for e in self.local_experts], device=self.w1.device)
        self.w1[empty] = 0
        self.w2[empty] = 0
        if self.layout.has_replicas:  # NOTE: collective: every replica becomes a copy of the primary one
            self.w1.data, self.w2.data = par.move_slots([self.w1.data, self.w2.data], self.layout, self.layout,
                                                        self.ep_rank, self.ep_group, prefer_local=False)

    def route(self, x2, seq_len=None):
        """x2 [T, H] -> (weights [T, k] float32, idx [T, k] int32 logical experts, GatingStats)."""
        # The router runs in float32 at least (float64 stays float64) unless router_dtype says otherwise.
        rd = self.router_dtype or torch.promote_types(x2.dtype, torch.float32)
        logits = F.linear(x2.to(rd), self.router.weight.to(rd))
        noise_std = self.noise_std if self.training else 0.0
        w, idx, stats = topk_gating(logits, self.k, expert_bias=self.expert_bias, noise_std=noise_std,
                                    seq_len=seq_len, **self.routing)
        if self.routed_scaling_factor != 1.0:
            w = w * self.routed_scaling_factor
        return w, idx, stats

    def physical_slots(self, idx):
        """Logical expert ids [T, k] -> physical slot ids (rank * S + slot) [T, k], one replica each."""
        # NOTE: a captured graph always looks the replicas up, so that apply_placement can change the
        # placement under it (the identity layout's tables give the same slots).
        if self.layout.is_identity and not (idx.is_cuda and torch.cuda.is_current_stream_capturing()):
            return idx
        return par.route_to_replicas(idx, self.replica_counts, self.replica_slots, self.ep_rank)

    def experts(self, recv_x, tokens_per_expert, keep_activation=None):
        """The local experts over their rows: [R, H] grouped by local slot -> [R, H]
        (with TP: this rank's partial output, its shard of every slot). keep_activation: keep the
        up-projection for the backward (None: when a gradient will need it, see keeps_activation)."""
        if keep_activation is None:
            keep_activation = self.keeps_activation(recv_x)
        if keep_activation:
            h = swiglu(grouped_gemm(recv_x, self.w1, tokens_per_expert))
        else:
            h = grouped_gemm(recv_x, self.w1, tokens_per_expert, activation="swiglu")
        return grouped_gemm(h, self.w2, tokens_per_expert)

    def keeps_activation(self, x):
        """Whether a forward on x keeps the up-projection for the backward: when the backward will
        need it (grad mode, and x or w1 requiring grad) and recompute_activation is off. Otherwise
        SwiGLU is fused into the GEMM (and, with recompute_activation, the backward runs it again).
        Decided once per forward on the layer's input, so that every path (chunked or not, EP x TP)
        computes the same thing."""
        needed = torch.is_grad_enabled() and (x.requires_grad or self.w1.requires_grad)
        return needed and not self.recompute_activation

    def forward(self, x, decode=None):
        """x [..., H] -> [..., H]. decode: the sync-free decode path (None: `self.decode`)."""
        shape = x.shape
        if shape[-1] != self.hidden:
            raise ValueError(f"moe_ext.MoE: x must end in hidden={self.hidden}, got shape {tuple(shape)}")
        decode = self.decode if decode is None else decode
        x2 = x.reshape(-1, self.hidden)
        if self.hidden > 1 and x2.stride(1) != 1:  # NOTE: permute moves rows as bytes
            x2 = x2.contiguous()
        if decode:
            self._check_decode(x2)
        seq_len = shape[-2] if x.dim() == 3 and shape[-2] > 0 else None
        keep = self.keeps_activation(x2)
        w, idx, stats = self.route(x2, seq_len)
        slots = self.physical_slots(idx)
        if decode:
            out, tokens_per_slot = self._decode(x2, slots, w)
        elif self.tp_world > 1 and self.tp_dispatch == "direct":
            out, tokens_per_slot = self._direct_tp(x2, slots, w, keep)
        elif self.ep_world == 1:  # NOTE: never the default group's dispatch: this layer's experts are all here
            recv_x, row_map, tokens_per_slot = permute(x2, slots, self.layout.num_slots, pad_to=self.pad_to)
            y, tokens_per_slot = self._experts_here(recv_x, tokens_per_slot, keep)
            out = unpermute(y, row_map, w)
        elif self.num_chunks > 1:
            out, tokens_per_slot = self._pipeline(x2, slots, w, keep)
        else:
            recv_x, tokens_per_slot, handle = self._dispatch(x2, slots, w)
            y, tokens_per_slot = self._experts_here(recv_x, tokens_per_slot, keep)
            out = combine(y, handle)
        if self.shared is not None:
            s = self.shared(x2)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x2)) * s
            out = out + s
        self.stats = stats
        with torch.no_grad():  # NOTE: device-side updates only (no host sync: decode mode captures them)
            tpe = stats.tokens_per_expert.to(self.load.device)
            if self._load_ema.device != tpe.device:
                self._load_ema = self._load_ema.to(tpe.device)
            # load += tpe; _load_ema = d * _load_ema + (1 - d) * [tpe, 1]: one kernel, not six
            ops.accumulate_load_(self.load, self._load_ema, tpe, self.load_decay)
            self.tokens_per_slot = tokens_per_slot.detach()
        return out.view(shape)

    def _experts_here(self, recv_x, tokens_per_slot, keep):
        """(y, tokens per slot run here): the local experts, or with TP this rank's shard over the TP group's rows."""
        if self.tp_world > 1:
            return par.tp_experts(recv_x, tokens_per_slot, lambda x, t: self.experts(x, t, keep), self.tp_rank,
                                  self.tp_group, self.backend)
        return self.experts(recv_x, tokens_per_slot, keep), tokens_per_slot

    def _direct_tp(self, x2, slots, w, keep):
        """EP x TP with tp_dispatch="direct": one dispatch over every rank, each slot to each TP shard
        of its expert (virtual expert (ep_rank * tp + tp_rank) * S + slot), this rank's shard on the
        rows it received, and combine sums the k * tp partial rows of each token with the weights."""
        virtual, wv = par.direct_tp_slots(slots, w, self.num_local_experts, self.tp_world)
        recv_x, tokens_per_slot, handle = dispatch(x2, virtual, wv, self.layout.num_slots * self.tp_world,
                                                   group=dist.group.WORLD, backend=self.backend, pad_to=self.pad_to,
                                                   partial_combine=self.partial_combine)
        return combine(self.experts(recv_x, tokens_per_slot, keep), handle), tokens_per_slot

    def _dispatch(self, x2, slots, w, **kw):
        kw.setdefault("partial_combine", self.partial_combine)
        return dispatch(x2, slots, w, self.layout.num_slots, group=self.ep_group, backend=self.backend,
                        pad_to=self.pad_to, **kw)

    def _pipeline(self, x2, slots, w, keep):
        """The routed experts over num_chunks contiguous token chunks, pipelined (class docstring;
        _Pipeline). Returns (out [T, H], tokens_per_slot [S] summed over the chunks)."""
        return _Pipeline.apply(x2, w, self.w1, self.w2, slots, self, keep)

    def _agree_on_chunks(self):
        """Before the first chunk's dispatch: every rank runs the pipeline with the same num_chunks
        and overlap (attributes a caller may change on one rank only). The message has the shape of
        a dispatch header, which is what a rank running the unchunked path sends first: a rank
        that differs is named on every rank, where mismatched collectives had read messages of
        other sizes (gloo aborts the process) or a header as chunk counts (NaN out)."""
        W = self.ep_world
        row = torch.zeros(len(_HEADER), dtype=torch.int64)
        row[_COL["magic"]], row[1], row[2] = _PIPELINE_MAGIC, self.num_chunks, int(bool(self.overlap))
        recv = self._ep_all_to_all(row.repeat(W, 1))
        ranks = dist.get_process_group_ranks(self.ep_group)
        magic = recv[:, _COL["magic"]].tolist()
        plain = [r for r, m in zip(ranks, magic) if m != _PIPELINE_MAGIC]
        if plain:
            what = "an unchunked dispatch (num_chunks=1)" if _MAGIC in magic else "another collective call"
            raise ValueError(f"moe_ext.MoE: num_chunks={self.num_chunks} here, but global rank(s) {plain} of the EP "
                             f"group {ranks} made {what}: every rank must use the same num_chunks")
        for col, name in ((1, "num_chunks"), (2, "overlap")):
            values = recv[:, col].tolist()
            if len(set(values)) > 1:
                per_rank = ", ".join(f"rank {r}: {v if col == 1 else bool(v)}" for r, v in zip(ranks, values))
                raise ValueError(f"moe_ext.MoE: the ranks of the EP group {ranks} disagree on {name} ({per_rank})")

    def _chunk_counts(self, slot_chunks):
        """[W, n, S] int64 on the CPU: the rows every source rank sends to each of this rank's slots
        in each chunk (one all-to-all over the EP group; every rank calls it, even without grad)."""
        W, S, n = self.ep_world, self.num_local_experts, len(slot_chunks)
        mine = torch.zeros(n, W * S + 1, dtype=torch.int64)
        for c, s in enumerate(slot_chunks):
            s = s.reshape(-1).long().cpu()
            mine[c].index_add_(0, torch.where(s >= 0, s, W * S), torch.ones_like(s))  # NOTE: unrouted -> spare
        return self._ep_all_to_all(mine[:, :-1].reshape(n, W, S).transpose(0, 1))  # [destination, n, S]

    def _ep_all_to_all(self, send):
        """send [W, ...] int64 (row r to EP rank r) -> what each rank sent here, on the CPU."""
        # NOTE: CPU tensors for a gloo group (also what the ipc backend may bootstrap over), CUDA for NCCL.
        device = self.w1.device if dist.get_backend(self.ep_group) == "nccl" else "cpu"
        send = send.to(device).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep_group)
        return recv.cpu()

    def _check_decode(self, x2):
        num_tokens = x2.shape[0]
        if self.max_decode_tokens is None:
            raise ValueError("moe_ext.MoE: decode needs max_decode_tokens (the most tokens any rank passes) set at "
                             "construction")
        # NOTE: with W > 1 the dispatch reports too many tokens on every rank (its header), not here,
        # where the peers would be left waiting for this rank.
        if self.ep_world == 1 and num_tokens > self.max_decode_tokens:
            raise ValueError(f"moe_ext.MoE: decode got {num_tokens} tokens, more than max_decode_tokens="
                             f"{self.max_decode_tokens}")
        if self.tp_world > 1:
            raise ValueError("moe_ext.MoE: decode is not supported with expert TP")
        if x2.is_cuda and torch.cuda.is_current_stream_capturing():  # NOTE: clear errors, not a failed capture
            if self.w1.dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"moe_ext.MoE: capturing decode in a CUDA graph needs bfloat16 or float16 expert "
                                 f"weights (the {self.w1.dtype} masked GEMM reads its row counts back to the host)")
            if self.ep_world > 1 and (self.backend not in ("auto", "ipc")
                                      or not _ipc.has_buffers(self.ep_group, x2.device)):
                raise ValueError("moe_ext.MoE: capturing decode in a CUDA graph over W > 1 ranks needs the ipc "
                                 "backend with its buffers: run one eager decode forward first (choosing the backend "
                                 "and allocating the buffers are collectives); with backend='auto' the ranks must "
                                 "have peer access (moe_ext.describe(group) says which backend auto picks)")

    def _decode(self, x2, slots, w):
        """The sync-free path: masked layout [S, max_rows, H], masked grouped GEMMs, combine.
        Returns (out [T, H], valid rows per slot [S] int32)."""
        if self.ep_world == 1:
            max_rows = masked_rows(1, self.max_decode_tokens, None, self.pad_to)
            recv_x, valid, row_map = self._masked_here(x2, slots, max_rows)
            return unpermute(self._masked_experts(recv_x, valid).view(-1, self.hidden), row_map, w), valid
        recv_x, valid, handle = self._dispatch(x2, slots, w, sync=False, max_tokens=self.max_decode_tokens,
                                               partial_combine=self.decode_partial_combine)
        return combine(self._masked_experts(recv_x, valid), handle), valid

    def _masked_experts(self, recv_x, valid):
        """The local experts over the masked layout [S, max_rows, H]; rows past valid[s] come out zero."""
        h = grouped_gemm_masked(recv_x, self.w1, valid, activation="swiglu")
        return grouped_gemm_masked(h, self.w2, valid)

    def _masked_here(self, x2, slots, max_rows):
        """W = 1: dispatch's masked layout built locally (dispatch itself would use the default group
        when ep_group is None). Returns recv_x [S, max_rows, H] (rows of slot s in token order, then
        zeros), valid rows [S] int32 and row_map [T, k] (row of each slot in recv_x viewed [S * max_rows, H]).
        Device ops only; an expert gets at most one row per token, so T <= max_rows drops nothing."""
        recv_x, row_map, valid = permute(x2, slots, self.layout.num_slots, max_rows=max_rows)
        return recv_x, valid, row_map

    # ---- load statistics ---------------------------------------------------------------------

    @torch.no_grad()
    def global_load(self):
        """Kept assignments per expert since the last update, summed over the EP and TP groups: [E] int64."""
        return par.sum_over_groups(self.load.clone(), (self.ep_group, self.tp_group))

    @torch.no_grad()
    def expert_load(self):
        """Running average of tokens_per_expert per forward, summed over every rank of the EP and
        TP groups: [E] float64, the same bits on every rank (fixed-order sums), so every rank
        computes the same placement from it. Weight of a forward n steps back: (1 - d) d^n,
        normalised by the weights seen so far (d = load_decay). Zeros before the first forward.
        Collective over both groups."""
        avg = self._load_ema[:-1] / self._load_ema[-1].clamp(min=1e-300)  # zeros before the first forward
        return par.sum_over_groups(avg, (self.ep_group, self.tp_group))

    @torch.no_grad()
    def reset_expert_load(self):
        """Forgets the running average (e.g. after a placement change or a phase of training)."""
        self._load_ema.zero_()

    @torch.no_grad()
    def update_expert_bias(self, rate=1e-3):
        """Auxiliary-loss-free balancing step (DeepSeek-V3): bias += rate * sign(mean load - load),
        from the load over the whole EP (and TP) group since the last update; then resets the load.
        Every rank of the groups must call it (it all-gathers the load)."""
        if self.expert_bias is None:
            raise RuntimeError("moe_ext.MoE.update_expert_bias: build the layer with expert_bias=True")
        update_expert_bias(self.expert_bias, self.global_load(), rate)
        self.load.zero_()
        return self.expert_bias

    # ---- replicas and placement ----------------------------------------------------------------

    @torch.no_grad()
    def sync_replica_grads(self):
        """Sums the gradients of every replicated expert over the EP ranks holding its replicas,
        in ascending rank order, so every copy gets the same bits: call it after each backward
        (after the last micro-batch when accumulating), before gradient clipping and the
        optimizer step. Collective over the EP group; a no-op without replicas. Expert weights
        are not data-parallel parameters otherwise: keep w1 and w2 out of any DP all-reduce."""
        if not self.layout.has_replicas:
            return
        grads = []
        for p in (self.w1, self.w2):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        par.sum_replica_grads(grads, self.layout, self.ep_rank, self.ep_group)

    @torch.no_grad()
    def apply_placement(self, placement, optimizer=None):
        """Moves the expert weights so this rank holds exactly its replicas under `placement`
        (any form the constructor takes, e.g. moe_ext.placement.rebalance(...)'s Placement).

        One all-to-all of weight rows over the EP group (per TP rank, shards move with their TP
        index): a new slot copies the rank's own old replica of its expert if there is one, else
        the expert's lowest-rank replica, bit for bit. w1 and w2 stay the same Parameter objects
        (their shape follows the new slots per rank); their .grad is dropped. While the slots per
        rank and the most replicas of any expert stay the same, the weights and the replica tables
        are rewritten in place, so a captured decode graph keeps working with the new placement;
        otherwise they are reallocated (capture such graphs again). optimizer: its state
        tensors shaped like w1 / w2 (momentum, Adam moments) move with the weights. Collective over
        the EP and TP groups; every rank must pass the same placement (checked). Returns self.
        """
        new = par.ExpertLayout.build(placement, self.num_experts, self.ep_world)
        par.check_same_on_all_ranks(new.digest(), "the placement", (self.ep_group, self.tp_group), self.w1.device)
        old = self.layout
        params = [self.w1, self.w2]
        tensors, owners = [p.data for p in params], [(p, None) for p in params]
        if optimizer is not None:
            for p in params:
                for key, value in sorted(optimizer.state.get(p, {}).items()):
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        tensors.append(value)
                        owners.append((p, key))
        moved = par.move_slots(tensors, old, new, self.ep_rank, self.ep_group)
        for (p, key), t in zip(owners, moved):
            if key is None:
                if p.shape == t.shape:
                    p.copy_(t)  # NOTE: in place (a captured decode graph keeps the addresses); bumps the version
                else:
                    _set_data_new_shape(p, t)
                p.grad = None
            else:
                optimizer.state[p][key] = t
        self._set_layout(new, self.w1.device)
        return self

    @torch.no_grad()
    def load_experts(self, w1, w2):
        """Copies this rank's slots and TP shards from the logical weights w1 [E, H, 2F] (gate |
        up) and w2 [E, F, H] (every rank passes the same ones). Empty slots become zero."""
        E, H, F = self.num_experts, self.hidden, self.ffn_hidden
        if tuple(w1.shape) != (E, H, 2 * F) or tuple(w2.shape) != (E, F, H):
            raise ValueError(f"moe_ext.MoE.load_experts: need w1 [{E}, {H}, {2 * F}] and w2 [{E}, {F}, {H}], got "
                             f"{tuple(w1.shape)} and {tuple(w2.shape)}")
        f, t = self.ffn_local, self.tp_rank
        cols = torch.cat([torch.arange(t * f, (t + 1) * f), F + torch.arange(t * f, (t + 1) * f)]).to(w1.device)
        for s, e in enumerate(self.local_experts):
            if e < 0:
                self.w1[s].zero_()
                self.w2[s].zero_()
            else:
                self.w1[s].copy_(w1[e].index_select(1, cols))
                self.w2[s].copy_(w2[e, t * f:(t + 1) * f])

    @torch.no_grad()
    def expert_weights(self):
        """The logical weights (w1 [E, H, 2F], w2 [E, F, H]) on every rank, from each expert's
        lowest-rank replica and every TP shard, bit for bit. Collective over the EP and TP groups;
        memory for all E experts on every rank (meant for checkpoints and tests)."""
        everywhere = par.ExpertLayout([list(range(self.num_experts))] * self.ep_world, self.num_experts)
        w1, w2 = par.move_slots([self.w1.data, self.w2.data], self.layout, everywhere, self.ep_rank,
                                self.ep_group, prefer_local=False)
        w1 = par.gather_shards(w1, 2, self.tp_group)  # [E, H, tp * 2f]: (gate | up) per TP rank
        f = self.ffn_local
        if self.tp_world > 1:
            chunks = w1.split(2 * f, dim=2)
            w1 = torch.cat([c[..., :f] for c in chunks] + [c[..., f:] for c in chunks], dim=2)
        return w1, par.gather_shards(w2, 1, self.tp_group)

    @classmethod
    def from_hf(cls, block, ep_group=None, **kwargs):
        """Builds the layer from a transformers MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE,
        DeepSeek-V3), copying its weights; each rank of ep_group takes its own experts.
        With tp_group or placement, the layer is built from an unsplit copy of the block
        (all E experts on this rank for a moment), then keeps only its slots and shards."""
        from .hf import moe_from_hf

        tp_group, placement = kwargs.pop("tp_group", None), kwargs.pop("placement", None)
        if tp_group is None and placement is None:
            return moe_from_hf(block, ep_group=ep_group, **kwargs)
        full = moe_from_hf(block, ep_group=None, **kwargs)
        return full._shard(ep_group, tp_group, placement)

    @torch.no_grad()
    def _shard(self, ep_group, tp_group, placement):
        """This single-rank layer (all experts here) turned into its part of an EP x TP / replicated
        layout, in place: keeps the slots and shards of this rank. Returns self."""
        if self.ep_world != 1 or self.tp_world != 1:
            raise RuntimeError("moe_ext.MoE._shard: the layer is already distributed")
        w1, w2 = self.w1.detach().clone(), self.w2.detach().clone()
        world, rank = _ep_world(ep_group)
        tp_world, tp_rank = _ep_world(tp_group)
        if self.ffn_hidden % tp_world != 0:
            raise ValueError(f"moe_ext.MoE: ffn_hidden={self.ffn_hidden} must be a multiple of the TP world size "
                             f"{tp_world}")
        _check_tp_dispatch(self.tp_dispatch, world, rank, tp_world, tp_rank)
        self.ep_group, self.ep_world, self.ep_rank = ep_group, world, rank
        self.tp_group, self.tp_world, self.tp_rank = tp_group, tp_world, tp_rank
        self.ffn_local = self.ffn_hidden // tp_world
        self._set_layout(par.ExpertLayout.build(placement, self.num_experts, world), self.w1.device)
        S = self.num_local_experts
        self.w1.data = w1.new_empty(S, self.hidden, 2 * self.ffn_local)
        self.w2.data = w2.new_empty(S, self.ffn_local, self.hidden)
        self.load_experts(w1, w2)
        return self

    def extra_repr(self):
        text = (f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, k={self.k}, "
                f"ep={self.ep_rank}/{self.ep_world}, local_experts={self.num_local_experts}")
        if self.tp_world > 1:
            text += f", tp={self.tp_rank}/{self.tp_world}, tp_dispatch={self.tp_dispatch}"
        if not self.layout.is_identity:
            text += f", slots={self.local_experts}"
        if self.num_chunks > 1:
            text += f", num_chunks={self.num_chunks}, overlap={self.overlap}"
        if self.max_decode_tokens is not None:
            text += f", max_decode_tokens={self.max_decode_tokens}"
        return text
