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
           "requires_grad", "scale_cols", "partial_combine", "bad_input")
_COL = {name: i for i, name in enumerate(_HEADER)}


# ---- placement and backend choice -------------------------------------------------------------

def expert_placement(num_experts, world_size, device=None):
    """Where every global expert lives: (owner [E] int64 rank in the group, local [E] int64 id on it).

    Contiguous blocks: expert e lives on rank e // (E / W) as its local expert e % (E / W).
    The one place that decides placement, so replicated or other placements can plug in here.
    """
    if num_experts < 1 or num_experts % world_size != 0:
        raise ValueError(f"moe_ext.dispatch: num_experts={num_experts} must be a positive multiple of the "
                         f"group's world size {world_size} (each rank holds num_experts / world_size experts)")
    per_rank = num_experts // world_size
    experts = torch.arange(num_experts, device=device)
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


def _choose(backend, device, world_size, group=None):
    """(backend name, why) for tensors on `device` over `world_size` ranks ("local" for a world of one).

    Raises ValueError for a backend that cannot move tensors of that device, and RuntimeError
    where the CUDA backends are missing from this build. For "auto" on CUDA with W > 1 it asks
    every rank of `group` once (a collective, cached) which GPUs can reach each other.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"moe_ext.dispatch: backend must be one of {_BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if device.type == "cpu":
        if backend in ("ipc", "nccl"):
            raise ValueError(f"moe_ext.dispatch: backend {backend!r} moves CUDA tensors, but x is on the CPU; "
                             "use backend='gloo' or 'auto' for CPU tensors")
        if world_size == 1:
            return "local", "dispatch is a permute and combine an unpermute, no communication"
        return "gloo", ("tokens move with torch.distributed all_to_all_single over the group, the only backend "
                        "for CPU tensors")
    if device.type != "cuda":
        raise ValueError(f"moe_ext.dispatch: tensors on {device} are not supported (CPU or CUDA only)")
    if backend == "gloo":
        raise ValueError(f"moe_ext.dispatch: backend 'gloo' needs CPU tensors, but x is on {device}; "
                         "use backend='auto' (or move x, idx and w to the CPU)")
    if world_size == 1:
        return "local", "dispatch is a permute and combine an unpermute, no communication"
    from . import _ipc
    _ipc.require_cuda_build()
    if backend != "auto":
        return backend, "asked for by name"
    ok, why = _ipc.peer_access(group, device)
    return ("ipc" if ok else "nccl"), why


def _select_backend(backend, device, world_size, group=None):
    """The backend name for tensors on `device` over `world_size` ranks (see _choose)."""
    return _choose(backend, device, world_size, group)[0]


def describe(group=None, device=None):
    """Which backend `backend="auto"` picks for tensors on `device` over `group`, and why.

    group: a ProcessGroup (None = the default group if initialised, else a world of one).
    device: where x lives; None = the current CUDA device if CUDA is available, else the CPU.
    For CUDA over W > 1 ranks this is a collective the first time (every rank of the group must
    call it, or dispatch, together). Returns one line of text.
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
        name, why = _choose("auto", device, world, group)
    except (ValueError, RuntimeError) as e:
        return f"auto -> none for {device.type} tensors on {where}: {e}"
    return f"auto -> {name} for {device.type} tensors on {where}: {why}"


def communicator(group=None, device=None, backend="auto"):
    """The communicator that dispatch/combine use for CUDA tensors on `device` over `group`: one per
    (group, device, backend), created on first use (a collective: every rank of the group calls it
    or its first dispatch together) and cached; dispatch(..., backend=the same) uses this object.

    backend: "auto" (what dispatch's "auto" picks: see describe()), "ipc" or "nccl".
    Both have .timeout (seconds every wait gives up after; default 60), .nbytes (device bytes held)
    and .close() (every rank; the next dispatch makes a new one). The ipc one also has .num_sms,
    .memory_budget and .reserve(max_tokens, hidden_bytes, k, num_experts).
    """
    group, world, rank = _resolve_group(group)
    if group is None or world == 1:
        raise ValueError("moe_ext.communicator: a world of one rank has no communicator (no communication)")
    if device is None:
        if not torch.cuda.is_available():
            raise ValueError("moe_ext.communicator: the communicators move CUDA tensors and this machine has no "
                             "CUDA device (CPU tensors go through gloo, which needs none)")
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"moe_ext.communicator: device must be a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if backend not in ("auto", "ipc", "nccl"):
        raise ValueError(f"moe_ext.communicator: backend must be 'auto', 'ipc' or 'nccl', got {backend!r}")
    name = _select_backend(backend, device, world, group)
    return _make_backend(name, group, world, rank, device)


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
    recv_x_scale: Optional[torch.Tensor] = None  # x_scale's rows in recv_x's layout (x_scale= given)
    # Partial combine only: the routing weights of every arrived token [N_recv, k], and per sent
    # slot the row of its token's partial among the rows combine brings back (on each
    # destination's first kept slot of the token, else -1) [T, k].
    recv_w: Optional[torch.Tensor] = None
    partial_map: Optional[torch.Tensor] = None
    # With a gradient for the weights: per kept slot [T, k] its token's row among the partials
    # coming back from the slot's rank (where the slot's dot product comes back from), else -1.
    partial_pair: Optional[torch.Tensor] = None
    # Which arrived tokens [N_recv] have a kept slot here (only they send a partial back), and the
    # partials' splits: sent to each source, received from each destination.
    partial_live: Optional[torch.Tensor] = None
    partial_send_splits: Optional[List[int]] = None
    partial_recv_splits: Optional[List[int]] = None


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
    num_rows: int = 0  # rows of recv_x, i.e. of the y combine expects (E_local * max_rows if masked)
    max_rows: Optional[int] = None  # rows per expert of the masked layout (sync=False), else None
    recv_x_scale: Optional[torch.Tensor] = None  # x_scale's rows [num_rows, S], next to recv_x (x_scale= given)
    async_op: bool = False
    partial: bool = False  # partial_combine=True: one row per (token, rank) comes back
    partial_grad: bool = False  # ... and the backward brings w's gradient from the experts' ranks
    plan: Optional[object] = None
    comm: Optional[object] = field(default=None, repr=False)  # the backend object (W > 1)
    work: object = field(default_factory=_CompletedWork, repr=False)

    def wait(self):
        """Completes the exchange started with async_op=True (dispatch: recv_x, combine: out are
        valid after it, on the current stream). The gloo backend and a world of one run
        synchronously: their work is already complete.
        """
        return self.work.wait()


@dataclass
class _Options:
    """The arguments of one dispatch that every backend reads."""
    num_experts: int
    pad_to: int = 1
    capacity: Optional[int] = None
    requires_grad: bool = False
    sync: bool = True
    max_tokens: Optional[int] = None
    max_rows: Optional[int] = None
    x_scale: Optional[torch.Tensor] = None
    async_op: bool = False
    partial: bool = False
    partial_grad: bool = False  # partial and w needs a gradient (agreed across ranks)


# ---- inputs ------------------------------------------------------------------------------------

def _input_problem(x, idx, w, num_experts, values=True, max_tokens=None):
    """What is wrong with this rank's x, idx, w (None if nothing). Data-dependent, so with W > 1
    it travels in the header and every rank raises, instead of one rank raising and the others
    waiting for it. values=False skips the one check that reads idx back to the host (its range):
    what the no-sync paths can afford. max_tokens: the no-sync layout's bound on x's tokens."""
    if x.dim() != 2:
        return f"x must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}"
    if max_tokens is not None and x.shape[0] > max_tokens:
        return f"x has {x.shape[0]} tokens, more than max_tokens={max_tokens}"
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
    if values and idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= num_experts):
        return (f"idx holds expert ids in [{int(idx.min())}, {int(idx.max())}], outside [-1, "
                f"num_experts={num_experts})")
    return None


def _scale_rows(x_scale, x):
    """(x_scale as [T, S] float32 contiguous, None) or (None, what is wrong). [T] is [T, 1].

    NOTE: S comes from x_scale's own shape, never reshape(T, -1): with T = 0 (a rank without
    tokens) that is ambiguous and raises on that rank alone, while its peers wait for it in the
    count exchange; every rank must also announce the same S there."""
    if x_scale.dim() < 1 or x_scale.shape[0] != x.shape[0]:
        return None, f"x_scale must be [num_tokens={x.shape[0]}] or [num_tokens, S], got shape {tuple(x_scale.shape)}"
    if x_scale.device != x.device:
        return None, f"x_scale must be on x's device {x.device}, got {x_scale.device}"
    cols = 1
    for n in x_scale.shape[1:]:
        cols *= n
    return x_scale.reshape(x.shape[0], cols).float().contiguous(), None


def _dtype_code(dtype):
    return zlib.crc32(str(dtype).encode()) & 0x7FFFFFFF


def _dtype_name(code):
    names = {_dtype_code(d): str(d) for d in vars(torch).values() if isinstance(d, torch.dtype)}
    return names.get(code, f"dtype#{code}")


def _view_as(t, dtype):
    """The rows of 2-D `t` reinterpreted as `dtype` (the last dimension rescaled), as a contiguous tensor."""
    if t.stride() != (t.shape[1], 1):  # NOTE: view(dtype) needs plain row-major strides, even for 0 or 1 rows
        t = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
    return t.view(dtype)


# ---- the protocol over all_to_all_single ---------------------------------------------------------

class _AllToAllBackend:
    """dispatch/combine over torch.distributed all_to_all_single with uneven splits.

    The three movements a backend provides (a CUDA backend overrides them with its kernels):
      dispatch(x, idx, ...) -> recv_x, tokens_per_expert, plan, row_map   (tokens to experts)
      combine_rows(y, plan) -> [M, H] every kept slot's row back on its source rank (also the
                               backward of dispatch, without weights)
      scatter_grad(g, w, y, plan) -> grad_y, grad_w: g and w sent once per (token, destination),
                                    scaled into the dispatch layout on the receiver; grad_w (a
                                    partial plan for w's gradient, else None) from the receivers
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
        return self._check_header(self._header_all_to_all(row), problem)

    def _header_all_to_all(self, row):
        """The header rows of every rank, [W, len(_HEADER)] on the CPU (the transport half)."""
        send = row.contiguous()
        recv = torch.full_like(send, -1)  # NOTE: rows still -1 after a failure never arrived
        try:
            dist.all_to_all_single(recv, send, group=self.group)
        except RuntimeError as e:
            missing = [self.ranks[s] for s in range(self.world) if int(recv[s, _COL["magic"]]) != _MAGIC]
            raise self._fail("header", e, f"; no header arrived from global rank(s) {missing}") from e
        return recv

    def _check_header(self, recv, problem):
        """Every rank agrees (or all raise the same error); `problem`: this rank's own, raised here."""
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

    def dispatch(self, x, idx, w, opts):
        """-> recv_x, tokens_per_expert, plan, row_map; the masked layout when opts.sync is False."""
        if opts.sync:
            return self._dispatch(x, idx, w, opts.num_experts, opts.pad_to, opts.capacity, opts.requires_grad,
                                  opts.x_scale, opts.partial, opts.partial_grad)
        # NOTE: the capacity the header carries is the effective one, so that ranks with different
        # max_tokens (hence max_rows) disagree in the exchange rather than mis-size their layouts.
        cap = opts.max_rows if opts.capacity is None else min(opts.capacity, opts.max_rows)
        return self._dispatch(x, idx, w, opts.num_experts, 1, cap, opts.requires_grad, opts.x_scale, opts.partial,
                              opts.partial_grad, max_rows=opts.max_rows, max_tokens=opts.max_tokens)

    def _dispatch(self, x, idx, w, num_experts, pad_to, capacity, requires_grad, x_scale=None, partial=False,
                  partial_grad=False, max_rows=None, max_tokens=None):
        """The exact layout, or with max_rows the masked one (straight from the receiver's permute:
        every row index of the plan is then a row of recv_x viewed [E_local * max_rows, H])."""
        world = self.world
        problem = _input_problem(x, idx, w, num_experts, max_tokens=max_tokens)
        scale = None
        if problem is None and x_scale is not None:
            scale, problem = _scale_rows(x_scale, x)
        k = idx.shape[1] if idx.dim() == 2 else 0
        hidden = x.shape[1] if x.dim() == 2 else 0
        scale_cols = 0 if scale is None else scale.shape[1]
        row = torch.tensor([_MAGIC, 0, hidden, _dtype_code(x.dtype), _dtype_code(w.dtype), num_experts, k, pad_to,
                            -1 if capacity is None else capacity, int(requires_grad), scale_cols,
                            int(partial) + int(partial and partial_grad),
                            int(problem is not None)], dtype=torch.int64).repeat(world, 1)
        if problem is not None:
            self._exchange_header(row, problem)  # tells the peers, then raises

        # 1. Plan: rows to send ordered by (destination, token); the local expert of each slot there.
        dev = idx.device
        owner, local = expert_placement(num_experts, world, dev)
        num_tokens = x.shape[0]
        idx = idx.long()
        routed = idx >= 0
        safe = idx.clamp(min=0)
        dest = torch.where(routed, owner[safe], -1)  # [T, k] destination rank of each slot
        tokens = torch.arange(num_tokens, device=dev).unsqueeze(1).expand(-1, k)
        goes = torch.zeros(world, num_tokens, dtype=torch.bool, device=dev)
        goes[dest[routed], tokens[routed]] = True
        send_dest, send_tokens = goes.nonzero(as_tuple=True)
        send_splits = goes.sum(1)
        slot_here = dest[send_tokens] == send_dest.unsqueeze(1)
        send_experts = torch.where(slot_here, local[safe[send_tokens]], -1).to(torch.int32)  # [N_send, k]

        # 2. Header, 3. tokens with their local expert ids, then the permute into recv_x.
        row[:, _COL["tokens"]] = send_splits
        recv_splits = self._exchange_header(row)[:, _COL["tokens"]].tolist()
        send_splits = send_splits.tolist()
        # NOTE: the scales (x_scale=) travel in the same exchange, as more bytes of each row, and so
        # do the routing weights of a partial combine.
        parts = [x[send_tokens], send_experts] + ([scale[send_tokens]] if scale is not None else [])
        parts += [w[send_tokens]] if partial else []
        recv_tok, recv_experts, *rest = self._exchange(parts, send_splits, recv_splits, "token")
        recv_w = rest.pop() if partial else None
        recv_scale = rest
        recv_x, recv_row_map, tokens_per_expert, *recv_x_scale = permute(
            recv_tok, recv_experts, num_experts // world, pad_to=pad_to, capacity=capacity, sync=True,
            x_scale=recv_scale[0] if recv_scale else None, max_rows=max_rows)

        # Slots that arrived here, by (source, token, slot); which were kept (capacity drops the rest).
        source = torch.repeat_interleave(torch.arange(world, device=dev),
                                         torch.tensor(recv_splits, dtype=torch.long, device=dev))
        arrived = recv_experts >= 0
        arrived_source = source.unsqueeze(1).expand(-1, k)[arrived]
        arrived_kept = recv_row_map[arrived] >= 0
        # This rank's routed slots, ordered by (destination, token, slot): the order rows come back in.
        flat_dest = dest.reshape(-1)
        slots = routed.reshape(-1).nonzero().squeeze(1)
        slots = slots[torch.sort(flat_dest[slots], stable=True).indices]
        if capacity is None:
            slot_kept = torch.ones(slots.numel(), dtype=torch.bool, device=dev)
        else:  # 4. Each receiver tells each source which of its slots it kept.
            (flags,) = self._exchange([arrived_kept.to(torch.uint8).unsqueeze(1)],
                                      torch.bincount(arrived_source, minlength=world).tolist(),
                                      torch.bincount(flat_dest[slots], minlength=world).tolist(), "capacity")
            slot_kept = flags.squeeze(1).bool()
        kept_slots = slots[slot_kept]
        row_map = torch.full((num_tokens * k,), -1, dtype=torch.long, device=dev)
        row_map[kept_slots] = torch.arange(kept_slots.numel(), device=dev)

        partial_map = partial_pair = partial_live = None
        partial_send_splits = partial_recv_splits = None
        if partial:
            # Only the (destination, token) pairs with a kept slot send a partial back (a pair whose
            # slots were all dropped would send a row of zeros): here, the arrived tokens with a kept
            # slot; on the source, each such pair's row among those coming back, in (destination,
            # token) order.
            partial_live = (recv_row_map >= 0).any(1)
            partial_send_splits = torch.bincount(source[partial_live], minlength=world).tolist()
            kept_pairs = torch.zeros(world, num_tokens, dtype=torch.bool, device=dev)
            kept_pairs[flat_dest[kept_slots], kept_slots // k] = True
            live_dest, live_tokens = kept_pairs.nonzero(as_tuple=True)
            partial_recv_splits = kept_pairs.sum(1).tolist()
            pos = torch.full((world, num_tokens), -1, dtype=torch.long, device=dev)
            pos[live_dest, live_tokens] = torch.arange(live_tokens.numel(), device=dev)
            kept_map = row_map.view(num_tokens, k)
            partial_map = _first_kept_per_rank(kept_map, dest, pos)
            if partial_grad:
                partial_pair = torch.where(kept_map >= 0, pos[dest.clamp(min=0), tokens], -1)
        flat_recv_map = recv_row_map.reshape(-1)
        plan = _Plan(
            send_tokens=send_tokens, send_splits=send_splits, recv_splits=recv_splits, recv_row_map=recv_row_map,
            back_rows=flat_recv_map[flat_recv_map >= 0],
            back_send_splits=torch.bincount(arrived_source[arrived_kept], minlength=world).tolist(),
            back_recv_splits=torch.bincount(flat_dest[kept_slots], minlength=world).tolist(),
            recv_x_scale=recv_x_scale[0] if recv_x_scale else None, recv_w=recv_w, partial_map=partial_map,
            partial_pair=partial_pair, partial_live=partial_live, partial_send_splits=partial_send_splits,
            partial_recv_splits=partial_recv_splits)
        return recv_x, tokens_per_expert, plan, row_map.view(num_tokens, k)

    def combine_rows(self, y, plan, stage="combine"):
        (rows,) = self._exchange([y[plan.back_rows]], plan.back_send_splits, plan.back_recv_splits, stage)
        return rows

    def combine(self, y, w, plan, row_map, keep_rows=False, stage="combine", async_op=False):
        """out [T, H] = the weighted (w) or plain (w None) sum of every kept slot's row, sent back
        from the experts' ranks; also those rows [M, H] when keep_rows (the weights' gradient).
        A partial plan sends back one row per (token, rank) instead (see dispatch's partial_combine;
        the dispatch carried the weights, w only says whether to use them; no rows are kept)."""
        if plan.partial_map is not None:
            live = plan.partial_live
            part = unpermute(y, plan.recv_row_map[live], plan.recv_w[live] if w is not None else None)
            (rows,) = self._exchange([part], plan.partial_send_splits, plan.partial_recv_splits, stage)
            return unpermute(rows, plan.partial_map), None
        rows = self.combine_rows(y, plan, stage)
        return unpermute(rows, row_map, w), (rows if keep_rows else None)

    def scatter_grad(self, g, w, y, plan, async_op=False):
        """-> (grad_y, grad_w): grad_w [T, k] only for a partial plan made with partial_grad (else None;
        the per-slot combine computes it on the source from the rows it kept)."""
        g_recv, w_recv = self._exchange([g.to(y.dtype)[plan.send_tokens], w[plan.send_tokens]],
                                        plan.send_splits, plan.recv_splits, "combine-backward")
        grad_y, dots = ops.unpermute_backward(g_recv, y, plan.recv_row_map, w_recv)
        if plan.partial_pair is None:
            return grad_y, None
        # Each arrived slot's dot(y row, g) (0 for the token's slots elsewhere) goes back with its
        # (token, rank) pair: the same products and order as the per-slot combine's backward on the
        # source, so the same bits.
        (back,) = self._exchange([dots[plan.partial_live]], plan.partial_send_splits, plan.partial_recv_splits,
                                 "combine-backward")
        pair = plan.partial_pair  # NOTE: -1 (not kept) picks an appended zero row: back may have no rows
        back = torch.cat([back, back.new_zeros((1, back.shape[1]))])
        pair = torch.where(pair >= 0, pair, back.shape[0] - 1)
        return grad_y, back[pair, torch.arange(pair.shape[1], device=pair.device).expand_as(pair)]


def _first_kept_per_rank(row_map, dest, rows):
    """[T, k]: on the first kept slot (row_map >= 0) of each token on each destination rank
    dest [T, k], rows[destination, token]; -1 on every other slot (the partial combine's map)."""
    T, k = row_map.shape
    kept = row_map >= 0
    key = torch.where(kept, dest, -1)
    earlier = torch.ones(k, k, dtype=torch.bool, device=dest.device).tril(-1)  # [j, i]: i < j
    dup = ((key.unsqueeze(2) == key.unsqueeze(1)) & kept.unsqueeze(1) & earlier).any(2)
    first = kept & ~dup
    tokens = torch.arange(T, device=dest.device).unsqueeze(1).expand(T, k)
    return torch.where(first, rows[key.clamp(min=0), tokens], -1)


def _make_backend(name, group, world, rank, device):
    """The backend object moving tensors on `device` over `group` (CUDA ones are cached per group and
    device: they hold buffers and communicators)."""
    if name == "gloo":
        return _AllToAllBackend(group, world, rank)
    if name == "nccl":
        from ._nccl import nccl_backend
        return nccl_backend(group, world, rank, device)
    from ._ipc import ipc_backend
    return ipc_backend(group, world, rank, device)


# ---- autograd ----------------------------------------------------------------------------------

class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, w, opts, handle):
        recv_x, tokens_per_expert, plan, row_map = handle.comm.dispatch(x, idx, w, opts)
        handle.plan, handle.row_map = plan, row_map
        handle.num_rows = recv_x.shape[0] * (recv_x.shape[1] if recv_x.dim() == 3 else 1)
        handle.recv_x_scale = getattr(plan, "recv_x_scale", None)
        handle.work = getattr(handle.comm, "last_work", None) or _CompletedWork()
        ctx.handle = handle
        ctx.mark_non_differentiable(tokens_per_expert)
        return recv_x, tokens_per_expert

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_recv_x, _grad_tpe):
        # NOTE: runs on every rank (grads are materialised), so the exchange is always collective.
        handle = ctx.handle
        grad = grad_recv_x.reshape(-1, handle.hidden).contiguous()
        grad_x, _ = handle.comm.combine(grad, None, handle.plan, handle.row_map, stage="dispatch-backward")
        return grad_x, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, w, handle):
        out, rows = handle.comm.combine(y, w, handle.plan, handle.row_map, keep_rows=w.requires_grad,
                                        async_op=handle.async_op)
        handle.work = getattr(handle.comm, "last_work", None) or _CompletedWork()
        ctx.handle = handle
        ctx.save_for_backward(y, w, rows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, w, rows = ctx.saved_tensors
        handle = ctx.handle
        grad_out = grad_out.contiguous()
        grad_y, grad_w = handle.comm.scatter_grad(grad_out, w, y, handle.plan)
        if not ctx.needs_input_grad[1]:
            grad_w = None
        elif grad_w is None:
            grad_w = ops.unpermute_backward(grad_out, rows, handle.row_map, w)[1]
        return grad_y, grad_w, None


# ---- the masked (no-sync) layout ---------------------------------------------------------------

# A tile alignment, not a size: the bound keeps padded per-expert counts (int32) from wrapping.
_MAX_PAD_TO = 1 << 16


def masked_rows(world_size, max_tokens, capacity=None, pad_to=1):
    """Rows per local expert of the masked [E_local, max_rows, H] layout (sync=False).

    capacity if given, else world_size * max_tokens (every token of every rank), rounded up to
    pad_to. An expert keeps its first max_rows rows in (source rank, source token) order.
    """
    rows = capacity if capacity is not None else world_size * max_tokens
    return max(1, -(-rows // pad_to) * pad_to)


# ---- public API --------------------------------------------------------------------------------

_PARTIAL_NO_GRAD = ("moe_ext.combine: w needs a gradient, but the partial combine's dispatch was made while it did not "
                    "(under torch.no_grad(), or before w.requires_grad_()): dispatch again with w as it will be used")


def _check_modes(sync, max_tokens):
    if not sync:
        if max_tokens is None or max_tokens < 1:
            raise ValueError("moe_ext.dispatch: sync=False (the masked no-sync layout) needs max_tokens >= 1, the "
                             "most tokens any rank passes (the same number on every rank); got "
                             f"max_tokens={max_tokens}")


def dispatch(x, idx, w, num_experts, group=None, backend="auto", async_op=False, pad_to=1, capacity=None,
             sync=True, max_tokens=None, x_scale=None, partial_combine=False, *, _partial_grad=None):
    """Sends every token to the ranks owning its experts; rows arrive grouped by local expert.

    x: [T, H] (T may differ per rank and be 0); idx: [T, k] int32/int64 global expert ids
    (-1 = not routed); w: [T, k] float32 routing weights (kept in the handle for combine).
    num_experts: E, a multiple of the group's size W; rank e // (E / W) holds expert e.
    group: a ProcessGroup (None = the default group if initialised, else a world of one).
    backend: "auto" | "gloo" (CPU tensors) | "ipc" (CUDA, one-sided writes into the peers'
    symmetric buffers; GPUs with peer access) | "nccl" (CUDA, NCCL send/recv). describe() says
    which "auto" picks and why.
    pad_to (1 to 65536), capacity: per local expert on the receiver; capacity keeps the first rows in
    (source rank, source token) order, a dropped slot contributes 0 to combine's output.
    sync: True (exact): recv_x is [R, H], R read back to the host once (training).
    False (no-sync, decode): recv_x is the masked layout [E / W, max_rows, H] with
    max_rows = masked_rows(W, max_tokens, capacity, pad_to), tokens_per_expert the valid rows of
    each expert (on the device, unpadded); the rows past them are unspecified with the ipc
    backend (never written: zeroing E / W * max_rows rows would cost more than the decode
    dispatch; grouped_gemm_masked and combine never read them; gloo leaves zeros there). No
    host synchronisation with the ipc backend, so the call can be captured in a CUDA graph. max_tokens: the most tokens any rank passes, the same
    on every rank (needed for sync=False; sizes the ipc buffers otherwise).
    async_op: the tokens may still be moving when dispatch returns; handle.wait() makes the
    current stream wait for them (the gloo backend and a world of one are already complete).
    x_scale: [T] or [T, S] per-token scales (e.g. of fp8 rows; any backend), delivered as float32
    in handle.recv_x_scale [rows of recv_x, S], each next to its row (zero on padding rows; in
    the masked layout, rows past each expert's count are as unspecified as recv_x's).
    partial_combine: combine (and this dispatch's backward) sends back one row per (token, rank)
    instead of one per slot: each expert rank sums, in float32 and slot order, the token's
    weighted rows it holds (w travels with the tokens), rounds that partial to y's dtype, and the
    source adds the partials in float32 in the order of their first slots. Fewer bytes (k rows per
    token become one per destination rank); for 16-bit rows one more rounding per partial, so out
    is no longer bit-identical to the single-rank unpermute (it still is across backends and runs;
    a world of one gives exactly the unpermute). The gradients: x's comes back the same way
    (unweighted partials); y's and w's are bit-identical to the per-slot combine's (w's from
    the dot products of y and the gradient on the experts' ranks, sent back per slot when w
    needs a gradient at dispatch time: every rank must agree on that, as on the option itself).
    Returns recv_x in x's dtype (expert-major; inside an expert by (source rank, source token);
    padding rows zero), tokens_per_expert [E / W] int32 (padded segment sizes; valid rows when
    sync=False) and the handle for combine. Differentiable w.r.t. x (and w, through combine).
    """
    group, world, rank = _resolve_group(group)
    if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()  # NOTE: rows are moved as bytes; any strides, at every world size alike
    if not 1 <= pad_to <= _MAX_PAD_TO:
        raise ValueError(f"moe_ext.dispatch: pad_to must be in [1, {_MAX_PAD_TO}], got {pad_to}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"moe_ext.dispatch: capacity must be >= 0 or None, got {capacity}")
    name = _select_backend(backend, x.device, world, group)
    _check_modes(sync, max_tokens)
    # NOTE: decided here, once, and agreed in the header: the combine's backward then brings w's
    # gradient back from the experts' ranks on every rank alike.
    # (_partial_grad: the same decision made by a caller running without grad mode, MoE's pipeline.)
    if _partial_grad is None:
        _partial_grad = torch.is_grad_enabled() and isinstance(w, torch.Tensor) and w.requires_grad
    partial_grad = bool(partial_combine) and bool(_partial_grad)
    max_rows = masked_rows(world, max_tokens, capacity, pad_to) if not sync else None
    if name == "local":
        problem = _input_problem(x, idx, w, num_experts, max_tokens=None if sync else max_tokens)
        scale = None
        if problem is None and x_scale is not None:
            scale, problem = _scale_rows(x_scale, x)
        if problem is not None:
            raise ValueError(f"moe_ext.dispatch: {problem}")
        if sync:
            # NOTE: sync=True explicitly: permute's own default on CUDA is the worst-case size.
            recv_x, row_map, tokens_per_expert, *s = permute(x, idx, num_experts, pad_to=pad_to, capacity=capacity,
                                                             sync=True, x_scale=scale)
        else:  # NOTE: the masked layout straight from permute's kernels (no host sync, as on the ipc backend)
            recv_x, row_map, tokens_per_expert, *s = permute(x, idx, num_experts, capacity=capacity, x_scale=scale,
                                                             max_rows=max_rows)
        handle = DispatchHandle(row_map, w, x.shape[0], world, group, name, hidden=x.shape[1], dtype=x.dtype,
                                num_rows=recv_x.reshape(-1, x.shape[1]).shape[0], max_rows=max_rows,
                                recv_x_scale=s[0] if s else None, partial=bool(partial_combine),
                                partial_grad=partial_grad)
        return recv_x, tokens_per_expert, handle
    expert_placement(num_experts, world)  # E divisible by W: checked before any communication
    handle = DispatchHandle(None, w, x.shape[0] if x.dim() else 0, world, group, name,
                            hidden=x.shape[1] if x.dim() == 2 else 0, dtype=x.dtype, max_rows=max_rows,
                            partial=bool(partial_combine), partial_grad=partial_grad)
    handle.comm = _make_backend(name, group, world, rank, x.device)
    # NOTE: every rank must agree on requires_grad (a rank without the backward would leave the
    # others waiting in theirs); a Function's forward runs without grad mode, so it is read here.
    requires_grad = torch.is_grad_enabled() and x.requires_grad
    opts = _Options(num_experts, pad_to, capacity, requires_grad, sync, max_tokens, max_rows, x_scale, async_op,
                    bool(partial_combine), partial_grad)
    recv_x, tokens_per_expert = _Dispatch.apply(x, idx, w, opts, handle)
    return recv_x, tokens_per_expert, handle


def combine(y, handle, async_op=False):
    """out[t] = sum_j w[t, j] * y[row of (t, j)], back on the rank that sent token t.

    y: expert outputs in the layout dispatch returned (recv_x's shape and dtype: [R, H], or the
    masked [E / W, max_rows, H] with sync=False); padding rows and rows past an expert's valid
    count are ignored. Returns out [T, H] in y's dtype, summed in float32 (float64 for float64)
    in slot order j = 0..k-1: bit-identical to the single-rank permute -> unpermute on the same
    device. async_op: out is valid once handle.wait() returns (CUDA backends; the others finish
    before returning). Differentiable w.r.t. y and the weights given to dispatch.
    """
    if not isinstance(handle, DispatchHandle):
        raise TypeError("moe_ext.combine: handle must be the DispatchHandle returned by moe_ext.dispatch")
    want = ((handle.num_rows // handle.max_rows, handle.max_rows, handle.hidden) if handle.max_rows
            else (handle.num_rows, handle.hidden))
    if tuple(y.shape) != want or y.dtype != handle.dtype:
        raise ValueError(f"moe_ext.combine: y must be {list(want)} {handle.dtype} like recv_x, got "
                         f"{list(y.shape)} {y.dtype}")
    if handle.partial and not handle.partial_grad and torch.is_grad_enabled() and handle.weights.requires_grad:
        raise ValueError(_PARTIAL_NO_GRAD)
    if handle.plan is None:
        return unpermute(y.reshape(-1, handle.hidden), handle.row_map, handle.weights)
    handle.async_op = async_op
    return _Combine.apply(y.reshape(-1, handle.hidden), handle.weights, handle)
