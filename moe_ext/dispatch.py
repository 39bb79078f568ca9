"""Expert-parallel dispatch / combine.

With a world of one rank (no group, or a group of size 1) dispatch is permute and combine is
unpermute with the routing weights: no communication at all. With W > 1 ranks the tokens move
through a backend object chosen by `backend` ("auto" picks; see `describe`). Today that is
`gloo` for CPU tensors: the protocol below over torch.distributed all_to_all_single. The CUDA
backends (`ipc`, `nccl`) implement the same three movements (`dispatch`, `combine_rows`,
`scatter_grad` of `_AllToAllBackend`) and slot in at `_make_backend`.

Protocol of one dispatch, on every rank (W ranks, E experts, E_local = E / W per rank):
  1. Plan: for each destination rank, the unique tokens that have at least one slot there, in
     token order, and per such token the local expert id of each of its k slots there (-1 for
     the slots that go elsewhere). A token crosses to a rank once however many experts it
     has there.
  2. Header exchange (all_to_all_single, one int64 row per peer): the row count each peer will
     get, plus hidden size, x's and w's dtypes, num_experts, k, pad_to, capacity, requires_grad
     and an invalid-input flag, so disagreements raise the same error on every rank instead of hanging.
  3. Token exchange (all_to_all_single with uneven splits, rows packed as bytes with their
     expert ids): the received tokens are laid out by (source rank, source token), so a
     permute of them by local expert id gives recv_x expert-major and, inside an expert,
     ordered by (source rank, source token); pad_to and capacity apply there, per local expert.
  4. With a capacity only: every receiver tells each source which of its slots were kept.
combine sends every kept expert row back to its token's source rank (one row per slot, not
pre-summed); the source sums them in slot order j = 0..k-1 in float32 with the weights
(moe_ext.unpermute), so the result is bit-identical to the single-rank permute -> unpermute.

Autograd: the backward of dispatch is a combine without weights; the backward of combine is a
dispatch of the gradient (once per token and destination, with the weights) scaled on the
receiver, and the weights' gradient (row-wise dot of the returned y rows and the gradient) on
the source. Every rank of the group must run the backward through the same dispatch/combine
calls, as with any collective.

Failures: every exchange waits at most the ProcessGroup's timeout (set with
init_process_group(timeout=...) or new_group(timeout=...)); a rank that never calls dispatch
makes the others raise a RuntimeError naming the group's ranks and, for the header exchange,
the ranks whose header never arrived.
"""
import zlib
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._ops import ops
from .permute import permute, unpermute

_BACKENDS = ("auto", "ipc", "nccl", "gloo")
_MAGIC = 0x6D6F6565  # "moee": marks a header row that really came from moe_ext.dispatch
_HEADER = ("magic", "tokens", "hidden", "dtype", "weights_dtype", "num_experts", "k", "pad_to", "capacity",
           "requires_grad", "bad_input")
_COL = {name: i for i, name in enumerate(_HEADER)}


# ---- placement and backend choice -------------------------------------------------------------

def expert_placement(num_experts, world_size):
    """Where every global expert lives: (owner [E] int64 rank in the group, local [E] int64 id on it).

    Contiguous blocks: expert e lives on rank e // (E / W) as its local expert e % (E / W).
    The one place that decides placement, so replicated or other placements can plug in here.
    """
    if num_experts < 1 or num_experts % world_size != 0:
        raise ValueError(f"moe_ext.dispatch: num_experts={num_experts} must be a positive multiple of the "
                         f"group's world size {world_size} (each rank holds num_experts / world_size experts)")
    per_rank = num_experts // world_size
    experts = torch.arange(num_experts)
    return experts // per_rank, experts % per_rank


def _resolve_group(group):
    """(group or None, world size, rank in the group). None stands for a world of one."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1, 0
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("moe_ext.dispatch: this process is not a member of the given group")
    return group, dist.get_world_size(group), rank


def _select_backend(backend, device, world_size):
    """The backend name for tensors on `device` over `world_size` ranks ("local" for a world of one).

    Raises ValueError for a backend that cannot move tensors of that device and
    NotImplementedError where the backend that would do it is not built yet.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"moe_ext.dispatch: backend must be one of {_BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if device.type == "cpu":
        if backend in ("ipc", "nccl"):
            raise ValueError(f"moe_ext.dispatch: backend {backend!r} moves CUDA tensors, but x is on the CPU; "
                             "use backend='gloo' or 'auto' for CPU tensors")
        return "local" if world_size == 1 else "gloo"
    if device.type == "cuda":
        if backend == "gloo":
            raise ValueError(f"moe_ext.dispatch: backend 'gloo' needs CPU tensors, but x is on {device}; "
                             "use backend='auto' (or move x, idx and w to the CPU)")
        if world_size == 1:
            return "local"
        raise NotImplementedError(
            f"moe_ext.dispatch: CUDA tensors over {world_size} ranks need the 'ipc' or 'nccl' backend, which "
            "are not built yet (they come with the GPU work of issue 7); use CPU tensors with backend='gloo', "
            "or a world of one rank")
    raise ValueError(f"moe_ext.dispatch: tensors on {device} are not supported (CPU or CUDA only)")


def describe(group=None, device=None):
    """Which backend `backend="auto"` picks for tensors on `device` over `group`, and why.

    group: a ProcessGroup (None = the default group if initialised, else a world of one).
    device: where x lives; None = the current CUDA device if CUDA is available, else the CPU.
    Returns one line of text.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    group, world, rank = _resolve_group(group)
    if group is None:
        where = "a world of one rank"
    else:
        where = f"rank {rank} of a group of {world} ranks {dist.get_process_group_ranks(group)}"
    try:
        name = _select_backend("auto", device, world)
    except (ValueError, NotImplementedError) as e:
        return f"auto -> none for {device.type} tensors on {where}: {e}"
    if name == "local":
        return (f"auto -> local for {device.type} tensors on {where}: dispatch is a permute and combine an "
                "unpermute, no communication")
    return (f"auto -> gloo for cpu tensors on {where}: tokens move with torch.distributed all_to_all_single "
            f"over the group ({dist.get_backend(group)}), the only backend for CPU tensors")


# ---- the handle --------------------------------------------------------------------------------

class _CompletedWork:
    """The work object of a synchronous exchange: already complete, wait() returns at once."""

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


@dataclass
class _Plan:
    """The layout of one multi-rank dispatch, as seen from this rank (all splits in rows, per rank)."""
    send_tokens: torch.Tensor  # [N_send] int64: source token of each row sent, ordered by (dest, token)
    send_splits: List[int]  # rows sent to each destination
    recv_splits: List[int]  # rows received from each source
    recv_row_map: torch.Tensor  # [N_recv, k] int64: row in recv_x of each arrived (token, slot), -1 if none
    back_rows: torch.Tensor  # [M_send] int64: rows of y sent back by combine, ordered by (source, token, slot)
    back_send_splits: List[int]  # rows combine sends back to each source
    back_recv_splits: List[int]  # rows combine gets back from each destination


@dataclass
class DispatchHandle:
    """What combine needs to send expert outputs back: the layout of this dispatch.

    row_map [T, k] int64: for a world of one, the row of each (token, slot) in recv_x; with
    W > 1, its row in the per-slot buffer combine brings back; -1 if not routed or dropped.
    """
    row_map: torch.Tensor
    weights: torch.Tensor  # [T, k] routing weights (autograd flows to them through combine)
    num_tokens: int
    world_size: int = 1
    group: Optional[object] = None
    backend: str = "local"
    hidden: int = 0
    dtype: Optional[torch.dtype] = None
    num_rows: int = 0  # rows of recv_x, i.e. of the y combine expects
    plan: Optional[_Plan] = None
    comm: Optional[object] = field(default=None, repr=False)  # the backend object (W > 1)
    work: object = field(default_factory=_CompletedWork, repr=False)

    def wait(self):
        """Completes the exchange started by dispatch(async_op=True); recv_x is valid after it.

        The gloo backend and a world of one run synchronously: their work is already complete.
        """
        return self.work.wait()


# ---- inputs ------------------------------------------------------------------------------------

def _input_problem(x, idx, w, num_experts):
    """What is wrong with this rank's x, idx, w (None if nothing). Data-dependent, so with W > 1
    it travels in the header and every rank raises, instead of one rank raising and the others
    waiting for it."""
    if x.dim() != 2:
        return f"x must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}"
    if idx.dim() != 2 or idx.shape[0] != x.shape[0] or idx.shape[1] < 1:
        return f"idx must be [num_tokens={x.shape[0]}, k >= 1], got shape {tuple(idx.shape)}"
    if idx.dtype not in (torch.int32, torch.int64):
        return f"idx must be int32 or int64, got {idx.dtype}"
    if w.shape != idx.shape:
        return f"w must have the shape of idx {tuple(idx.shape)}, got {tuple(w.shape)}"
    if w.dtype not in (torch.float32, x.dtype) or not w.is_floating_point():
        return f"w must be float32 (or x's dtype {x.dtype}), got {w.dtype}"
    if not (x.device == idx.device == w.device):
        return f"x, idx and w must be on one device, got {x.device}, {idx.device}, {w.device}"
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= num_experts):
        return (f"idx holds expert ids in [{int(idx.min())}, {int(idx.max())}], outside [-1, "
                f"num_experts={num_experts})")
    return None


def _dtype_code(dtype):
    return zlib.crc32(str(dtype).encode()) & 0x7FFFFFFF


def _dtype_name(code):
    names = {_dtype_code(d): str(d) for d in vars(torch).values() if isinstance(d, torch.dtype)}
    return names.get(code, f"dtype#{code}")


def _view_as(t, dtype):
    """The rows of 2-D `t` reinterpreted as `dtype` (the last dimension rescaled), as a contiguous tensor."""
    if t.stride() != (t.shape[1], 1):  # NOTE: view(dtype) needs plain row-major strides, even for 0 or 1 rows
        t = torch.empty(t.shape, dtype=t.dtype).copy_(t)
    return t.view(dtype)


# ---- the protocol over all_to_all_single ---------------------------------------------------------

class _AllToAllBackend:
    """dispatch/combine over torch.distributed all_to_all_single with uneven splits.

    The three movements a backend provides (a CUDA backend overrides them with its kernels):
      dispatch(x, idx, ...) -> recv_x, tokens_per_expert, plan, row_map   (tokens to experts)
      combine_rows(y, plan) -> [M, H] every kept slot's row back on its source rank (also the
                               backward of dispatch, without weights)
      scatter_grad(g, w, y, plan) -> grad_y: g and w sent once per (token, destination),
                                    scaled into the dispatch layout on the receiver
    """
    name = "gloo"

    def __init__(self, group, world, rank):
        self.group, self.world, self.rank = group, world, rank
        self.ranks = dist.get_process_group_ranks(group)

    def _fail(self, stage, err, extra=""):
        op = "combine" if stage.startswith("combine") else "dispatch"
        return RuntimeError(
            f"moe_ext.{op}: the {stage} exchange failed on rank {self.rank} of the group with global ranks "
            f"{self.ranks}{extra}. Every rank of the group must make the same dispatch/combine calls; a missing "
            f"peer is given up on after the ProcessGroup's timeout (init_process_group(timeout=...)). Cause: {err}")

    def _all_to_all(self, send, send_splits, recv_splits, stage):
        recv = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
        try:
            dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        except RuntimeError as e:
            raise self._fail(stage, e) from e
        return recv

    def _exchange(self, parts, send_splits, recv_splits, stage):
        """Sends row-aligned 2-D tensors together as raw bytes (any dtype); returns them received."""
        send = torch.cat([_view_as(p, torch.uint8) for p in parts], dim=1)
        recv = self._all_to_all(send, send_splits, recv_splits, stage)
        out, col = [], 0
        for p in parts:
            width = p.shape[1] * p.element_size()
            out.append(_view_as(recv[:, col:col + width], p.dtype))
            col += width
        return out

    def _exchange_header(self, row, problem=None):
        """Sends `row` (one int64 per header field, "tokens" per destination) to every peer; checks
        that every rank agrees. Returns the rows received, [W, len(_HEADER)]. `problem`: what is
        wrong with this rank's inputs, raised here once the peers know."""
        send = row.contiguous()
        recv = torch.full_like(send, -1)  # NOTE: rows still -1 after a failure never arrived
        try:
            dist.all_to_all_single(recv, send, group=self.group)
        except RuntimeError as e:
            missing = [self.ranks[s] for s in range(self.world) if int(recv[s, _COL["magic"]]) != _MAGIC]
            raise self._fail("header", e, f"; no header arrived from global rank(s) {missing}") from e
        if not bool((recv[:, _COL["magic"]] == _MAGIC).all()):
            raise RuntimeError(f"moe_ext.dispatch: a peer of the group {self.ranks} sent something that is not a "
                               "moe_ext.dispatch header: the ranks are not making the same collective calls")
        if problem is not None:
            raise ValueError(f"moe_ext.dispatch: {problem}")
        bad = [self.ranks[s] for s in range(self.world) if int(recv[s, _COL["bad_input"]])]
        if bad:
            raise ValueError(f"moe_ext.dispatch: global rank(s) {bad} of the group {self.ranks} passed invalid "
                             "inputs (the error on those ranks says what); every rank stops")
        for name in _HEADER[2:-1]:
            values = recv[:, _COL[name]].tolist()
            if len(set(values)) > 1:
                shown = [_dtype_name(v) for v in values] if name.endswith("dtype") else values
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in zip(self.ranks, shown))
                raise ValueError(f"moe_ext.dispatch: the ranks of the group disagree on {name} ({per_rank})")
        return recv

    def dispatch(self, x, idx, w, num_experts, pad_to, capacity, requires_grad):
        world = self.world
        problem = _input_problem(x, idx, w, num_experts)
        k = idx.shape[1] if idx.dim() == 2 else 0
        hidden = x.shape[1] if x.dim() == 2 else 0
        row = torch.tensor([_MAGIC, 0, hidden, _dtype_code(x.dtype), _dtype_code(w.dtype), num_experts, k, pad_to,
                            -1 if capacity is None else capacity, int(requires_grad), int(problem is not None)],
                           dtype=torch.int64).repeat(world, 1)
        if problem is not None:
            self._exchange_header(row, problem)  # tells the peers, then raises

        # 1. Plan: rows to send ordered by (destination, token); the local expert of each slot there.
        owner, local = expert_placement(num_experts, world)
        num_tokens = x.shape[0]
        idx = idx.long()
        routed = idx >= 0
        safe = idx.clamp(min=0)
        dest = torch.where(routed, owner[safe], -1)  # [T, k] destination rank of each slot
        tokens = torch.arange(num_tokens).unsqueeze(1).expand(-1, k)
        goes = torch.zeros(world, num_tokens, dtype=torch.bool)
        goes[dest[routed], tokens[routed]] = True
        send_dest, send_tokens = goes.nonzero(as_tuple=True)
        send_splits = goes.sum(1)
        slot_here = dest[send_tokens] == send_dest.unsqueeze(1)
        send_experts = torch.where(slot_here, local[safe[send_tokens]], -1).to(torch.int32)  # [N_send, k]

        # 2. Header, 3. tokens with their local expert ids, then the permute into recv_x.
        row[:, _COL["tokens"]] = send_splits
        recv_splits = self._exchange_header(row)[:, _COL["tokens"]].tolist()
        send_splits = send_splits.tolist()
        recv_tok, recv_experts = self._exchange([x[send_tokens], send_experts], send_splits, recv_splits, "token")
        recv_x, recv_row_map, tokens_per_expert = permute(recv_tok, recv_experts, num_experts // world,
                                                          pad_to=pad_to, capacity=capacity, sync=True)

        # Slots that arrived here, by (source, token, slot); which were kept (capacity drops the rest).
        source = torch.repeat_interleave(torch.arange(world), torch.tensor(recv_splits, dtype=torch.long))
        arrived = recv_experts >= 0
        arrived_source = source.unsqueeze(1).expand(-1, k)[arrived]
        arrived_kept = recv_row_map[arrived] >= 0
        # This rank's routed slots, ordered by (destination, token, slot): the order rows come back in.
        flat_dest = dest.reshape(-1)
        slots = routed.reshape(-1).nonzero().squeeze(1)
        slots = slots[torch.sort(flat_dest[slots], stable=True).indices]
        if capacity is None:
            slot_kept = torch.ones(slots.numel(), dtype=torch.bool)
        else:  # 4. Each receiver tells each source which of its slots it kept.
            (flags,) = self._exchange([arrived_kept.to(torch.uint8).unsqueeze(1)],
                                      torch.bincount(arrived_source, minlength=world).tolist(),
                                      torch.bincount(flat_dest[slots], minlength=world).tolist(), "capacity")
            slot_kept = flags.squeeze(1).bool()
        kept_slots = slots[slot_kept]
        row_map = torch.full((num_tokens * k,), -1, dtype=torch.long)
        row_map[kept_slots] = torch.arange(kept_slots.numel())

        flat_recv_map = recv_row_map.reshape(-1)
        plan = _Plan(
            send_tokens=send_tokens, send_splits=send_splits, recv_splits=recv_splits, recv_row_map=recv_row_map,
            back_rows=flat_recv_map[flat_recv_map >= 0],
            back_send_splits=torch.bincount(arrived_source[arrived_kept], minlength=world).tolist(),
            back_recv_splits=torch.bincount(flat_dest[kept_slots], minlength=world).tolist())
        return recv_x, tokens_per_expert, plan, row_map.view(num_tokens, k)

    def combine_rows(self, y, plan, stage="combine"):
        (rows,) = self._exchange([y[plan.back_rows]], plan.back_send_splits, plan.back_recv_splits, stage)
        return rows

    def scatter_grad(self, g, w, y, plan):
        g_recv, w_recv = self._exchange([g.to(y.dtype)[plan.send_tokens], w[plan.send_tokens]],
                                        plan.send_splits, plan.recv_splits, "combine-backward")
        grad_y, _ = ops.unpermute_backward(g_recv, y, plan.recv_row_map, w_recv)
        return grad_y


def _make_backend(name, group, world, rank):
    if name == "gloo":
        return _AllToAllBackend(group, world, rank)
    raise NotImplementedError(f"moe_ext.dispatch: backend {name!r} is not built yet")  # ipc / nccl go here


# ---- autograd ----------------------------------------------------------------------------------

class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, w, num_experts, pad_to, capacity, requires_grad, handle):
        recv_x, tokens_per_expert, plan, row_map = handle.comm.dispatch(
            x, idx, w, num_experts, pad_to, capacity, requires_grad)
        handle.plan, handle.row_map, handle.num_rows = plan, row_map, recv_x.shape[0]
        ctx.handle = handle
        ctx.mark_non_differentiable(tokens_per_expert)
        return recv_x, tokens_per_expert

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_recv_x, _grad_tpe):
        # NOTE: runs on every rank (grads are materialised), so the exchange is always collective.
        handle = ctx.handle
        rows = handle.comm.combine_rows(grad_recv_x.contiguous(), handle.plan, "dispatch-backward")
        return unpermute(rows, handle.row_map, None), None, None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, w, handle):
        rows = handle.comm.combine_rows(y, handle.plan)
        ctx.handle = handle
        ctx.save_for_backward(y, w, rows)
        return unpermute(rows, handle.row_map, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, w, rows = ctx.saved_tensors
        handle = ctx.handle
        grad_out = grad_out.contiguous()
        grad_y = handle.comm.scatter_grad(grad_out, w, y, handle.plan)
        grad_w = ops.unpermute_backward(grad_out, rows, handle.row_map, w)[1] if ctx.needs_input_grad[1] else None
        return grad_y, grad_w, None


# ---- public API --------------------------------------------------------------------------------

def dispatch(x, idx, w, num_experts, group=None, backend="auto", async_op=False, pad_to=1, capacity=None):
    """Sends every token to the ranks owning its experts; rows arrive grouped by local expert.

    x: [T, H] (T may differ per rank and be 0); idx: [T, k] int32/int64 global expert ids
    (-1 = not routed); w: [T, k] float32 routing weights (kept in the handle for combine).
    num_experts: E, a multiple of the group's size W; rank e // (E / W) holds expert e.
    group: a ProcessGroup (None = the default group if initialised, else a world of one).
    backend: "auto" | "gloo" (CPU tensors) | "ipc" | "nccl" (CUDA, not built yet for W > 1).
    pad_to, capacity: per local expert on the receiver; capacity keeps the first rows in
    (source rank, source token) order, a dropped slot contributes 0 to combine's output.
    async_op: the handle's wait() completes the exchange (already complete for gloo).
    Returns recv_x [R, H] in x's dtype (expert-major; inside an expert by (source rank, source
    token); padding rows zero), tokens_per_expert [E / W] int32 (padded segment sizes) and the
    handle for combine. Differentiable w.r.t. x (and w, through combine).
    """
    group, world, rank = _resolve_group(group)
    if pad_to < 1:
        raise ValueError(f"moe_ext.dispatch: pad_to must be >= 1, got {pad_to}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"moe_ext.dispatch: capacity must be >= 0 or None, got {capacity}")
    name = _select_backend(backend, x.device, world)
    if name == "local":
        problem = _input_problem(x, idx, w, num_experts)
        if problem is not None:
            raise ValueError(f"moe_ext.dispatch: {problem}")
        recv_x, row_map, tokens_per_expert = permute(x, idx, num_experts, pad_to=pad_to, capacity=capacity)
        handle = DispatchHandle(row_map, w, x.shape[0], world, group, name, hidden=x.shape[1], dtype=x.dtype,
                                num_rows=recv_x.shape[0])
        return recv_x, tokens_per_expert, handle
    expert_placement(num_experts, world)  # E divisible by W: checked before any communication
    handle = DispatchHandle(None, w, x.shape[0] if x.dim() else 0, world, group, name,
                            hidden=x.shape[1] if x.dim() == 2 else 0, dtype=x.dtype)
    handle.comm = _make_backend(name, group, world, rank)
    # NOTE: every rank must agree on requires_grad (a rank without the backward would leave the
    # others waiting in theirs); a Function's forward runs without grad mode, so it is read here.
    requires_grad = torch.is_grad_enabled() and x.requires_grad
    recv_x, tokens_per_expert = _Dispatch.apply(x, idx, w, num_experts, pad_to, capacity, requires_grad, handle)
    return recv_x, tokens_per_expert, handle


def combine(y, handle):
    """out[t] = sum_j w[t, j] * y[row of (t, j)], back on the rank that sent token t.

    y: [R, H] expert outputs in the layout dispatch returned (recv_x's shape and dtype); padding
    rows are ignored. Returns out [T, H] in y's dtype, summed in float32 (float64 for float64) in
    slot order j = 0..k-1: bit-identical to the single-rank permute -> unpermute.
    Differentiable w.r.t. y and the weights given to dispatch.
    """
    if not isinstance(handle, DispatchHandle):
        raise TypeError("moe_ext.combine: handle must be the DispatchHandle returned by moe_ext.dispatch")
    if y.dim() != 2 or y.shape[0] != handle.num_rows or y.shape[1] != handle.hidden or y.dtype != handle.dtype:
        raise ValueError(f"moe_ext.combine: y must be [R={handle.num_rows}, H={handle.hidden}] {handle.dtype} like "
                         f"recv_x, got {tuple(y.shape)} {y.dtype}")
    if handle.plan is None:
        return unpermute(y, handle.row_map, handle.weights)
    return _Combine.apply(y, handle.weights, handle)
