"""Hybrid expert parallelism: EP x TP process groups, replicated expert layouts (EP x DP) and the
collectives behind them. `moe_ext.MoE(..., ep_group, tp_group, placement)` is built on this.

Groups
------
W = ep * tp ranks, TP innermost: global rank g is EP index g // tp and TP index g % tp, so a TP
group is tp consecutive ranks (one node's NVLink domain when tp <= GPUs per node) and an EP group
is the ranks with the same TP index. `make_groups(ep, tp)` builds them. Every rank has its own
tokens; each rank dispatches over its EP group.

Physical slots (replication)
----------------------------
An `ExpertLayout` says which logical expert each of a rank's S expert slots holds:
slot_expert [R, S] int64, -1 for an empty slot (a rank holding fewer experts than the fullest
rank); inside a rank, slots are in ascending expert order. Physical slot p = r * S + s. The
layer rewrites each (token, logical expert) into a physical slot, so dispatch sees R * S
"experts" in contiguous blocks of S: its protocol, its ordering guarantees and its backends are
unchanged. The default layout (contiguous blocks of E / R, no replicas) is the identity map.

Choosing a replica (`route_to_replicas`): the n-th assignment to expert e on this rank, counting
in (token, slot) order, goes to replica (n + ep_rank) mod c_e of e's c_e replicas, ordered by
rank. Deterministic (integers only; the same on CPU and CUDA; no communication, no dependence on
timing), and each source splits its tokens of e evenly over the replicas (within one), the
rotation by rank spreading the remainders. So each replica carries load / c_e, the model
`moe_ext.placement.rebalance` optimises. There is no preference for a local replica.

Expert TP
---------
Each expert's FFN is split over the TP group: w1 [H, 2F] by columns, each TP rank holding the
matching F / tp columns of both the gate and the up half (SwiGLU stays local), w2 [F, H] by the
same rows. The layer dispatches within its EP group, then `tp_experts` all-gathers the received
rows of the whole TP group (every TP rank runs its shard on the same rows, grouped by slot),
and sums the partial outputs back onto the rank that received each row: a reduce-scatter, in
float32 (float64 for float64) in TP-rank order, so the sum order is fixed and every run gives
the same bits. Both go through dispatch / combine over the TP group (the TP ranks as the
"experts", weights 1), so they use the same transports as EP (ipc between GPUs with peer
access, also for ranks sharing one GPU; nccl; gloo for CPU tensors). The backward of the
all-gather is that reduce-scatter and vice versa. Why this and not a dispatch straight to every rank of the group:
a token crosses the EP links once and fans out over the TP links (NVLink inside a node), and
combine brings back one summed row per slot instead of tp partial rows. On gloo the two
measured within noise of each other (W = 4 as 2 x 2 on 2 shared CPU cores, E = 8, k = 2, float32
forward + backward per step: 85-113 ms here vs 79-95 ms for the direct dispatch at 256 tokens per
rank, H = 256, F = 512; 667-1088 ms vs 836-895 ms at 1024 tokens, H = 512, F = 1024): loopback
gloo measures memory copies, not links, so the choice rests on the bytes above.

Gradients of replicas
---------------------
`sum_replica_grads` sums the gradients of all replicas of an expert over the ranks holding them
(all-to-all, then a fixed-order sum in ascending rank order), so every copy gets the same bits
and identical optimizer steps keep the copies identical.

Moving weights
--------------
`move_slots` re-lays per-slot tensors (weights, optimizer state) from one layout to another with
one all-to-all: every new slot takes its expert's rows from the rank's own old copy when it has
one, else from the expert's primary replica (the lowest rank holding it). Rows move as raw bytes,
so they arrive bit for bit.
"""
import zlib
from typing import List, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._ipc import _ipc_problem
from ._ops import ops
from .dispatch import _view_as, combine, dispatch


def group_world(group):
    """(world size, rank) of this process in `group`; (1, 0) for None."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def make_groups(ep, tp):
    """(ep_group, tp_group) of this rank for W = ep * tp ranks of the default group, TP innermost.

    Rank g is EP index g // tp and TP index g % tp: its TP group is ranks [g // tp * tp, +tp),
    its EP group the ranks with the same g % tp. Collective: every rank of the default group must
    call it (torch.distributed.new_group is), with the same ep and tp. A size-1 group is returned
    as a group too (the layer treats it as a world of one).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("moe_ext.parallel.make_groups: initialise torch.distributed first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep < 1 or tp < 1 or ep * tp != world:
        raise ValueError(f"moe_ext.parallel.make_groups: ep * tp must equal the world size {world}, got ep={ep}, "
                         f"tp={tp}")
    ep_group = tp_group = None
    for t in range(tp):
        ranks = [i * tp + t for i in range(ep)]
        g = dist.new_group(ranks)
        if rank in ranks:
            ep_group = g
    for i in range(ep):
        ranks = list(range(i * tp, (i + 1) * tp))
        g = dist.new_group(ranks)
        if rank in ranks:
            tp_group = g
    return ep_group, tp_group


# ---- layouts -----------------------------------------------------------------------------------

class ExpertLayout:
    """Which logical expert each physical slot holds.

    slot_expert: [R, S] int64, -1 = empty slot; every expert at least once, at most once per rank.
    Derived: replica_counts [E] int64; replica_slots [E, C] int64 physical slot ids (r * S + s)
    of each expert's replicas in ascending rank order, -1 past replica_counts[e].
    """

    def __init__(self, slot_expert, num_experts):
        se = torch.as_tensor(slot_expert, dtype=torch.int64).cpu().clone()
        if se.dim() != 2 or se.shape[0] < 1 or se.shape[1] < 1:
            raise ValueError(f"moe_ext.ExpertLayout: slot_expert must be [num_ranks, slots], got {tuple(se.shape)}")
        if int(se.min()) < -1 or int(se.max()) >= num_experts:
            raise ValueError(f"moe_ext.ExpertLayout: expert ids must be in [-1, {num_experts}), got "
                             f"[{int(se.min())}, {int(se.max())}]")
        R, S = se.shape
        holds = torch.zeros(R, num_experts, dtype=torch.int64)
        for r in range(R):
            row = se[r][se[r] >= 0]
            holds[r].index_add_(0, row, torch.ones_like(row))
        if int(holds.max()) > 1:
            r = int((holds > 1).any(1).nonzero()[0])
            raise ValueError(f"moe_ext.ExpertLayout: rank {r} holds an expert twice ({se[r].tolist()}); replicas of "
                             "an expert live on different ranks")
        counts = holds.sum(0)
        if int(counts.min()) < 1:
            missing = (counts == 0).nonzero().squeeze(1).tolist()
            raise ValueError(f"moe_ext.ExpertLayout: expert(s) {missing} have no replica")
        self.num_experts, self.num_ranks, self.slots_per_rank = num_experts, R, S
        self.slot_expert = se
        self.holds = holds.bool()  # [R, E]
        self.replica_counts = counts
        phys = torch.arange(R * S).view(R, S)
        C = int(counts.max())
        self.replica_slots = torch.full((num_experts, C), -1, dtype=torch.int64)
        fill = torch.zeros(num_experts, dtype=torch.int64)
        for r in range(R):  # ascending rank order
            for s in range(S):
                e = int(se[r, s])
                if e >= 0:
                    self.replica_slots[e, fill[e]] = phys[r, s]
                    fill[e] += 1
        self.is_identity = R * S == num_experts and bool((se.reshape(-1) == torch.arange(num_experts)).all())

    @property
    def num_slots(self):
        return self.num_ranks * self.slots_per_rank

    @property
    def has_replicas(self):
        return int(self.replica_counts.max()) > 1

    def rank_experts(self) -> List[List[int]]:
        """Logical experts held by each rank, in slot order (ascending)."""
        return [[e for e in row if e >= 0] for row in self.slot_expert.tolist()]

    def holders(self, e) -> List[int]:
        """Ranks holding a replica of expert e, ascending."""
        return self.holds[:, e].nonzero().squeeze(1).tolist()

    def slot_of(self, rank, e):
        """The slot of expert e on `rank`, or -1."""
        hit = (self.slot_expert[rank] == e).nonzero()
        return int(hit[0]) if hit.numel() else -1

    def digest(self):
        """A checksum of the layout (to check every rank agrees)."""
        data = np.ascontiguousarray(self.slot_expert.numpy()).tobytes()
        return zlib.crc32(data + bytes(str((self.num_experts, self.num_ranks, self.slots_per_rank)), "ascii"))

    def __eq__(self, other):
        return (isinstance(other, ExpertLayout) and self.num_experts == other.num_experts
                and torch.equal(self.slot_expert, other.slot_expert))

    def __repr__(self):
        return f"ExpertLayout(num_experts={self.num_experts}, rank_experts={self.rank_experts()})"

    @classmethod
    def contiguous(cls, num_experts, num_ranks):
        """The default: rank r holds experts [r * E / R, (r + 1) * E / R)."""
        if num_experts % num_ranks:
            raise ValueError(f"moe_ext.ExpertLayout: num_experts={num_experts} must be a multiple of the EP world "
                             f"size {num_ranks}")
        return cls(torch.arange(num_experts).view(num_ranks, -1), num_experts)

    @classmethod
    def from_rank_experts(cls, rank_experts: Sequence[Sequence[int]], num_experts, slots_per_rank=None):
        """From the experts each rank holds (sorted into ascending slot order, padded with -1)."""
        lists = [sorted(int(e) for e in row) for row in rank_experts]
        S = max(len(row) for row in lists) if slots_per_rank is None else slots_per_rank
        if S < max(len(row) for row in lists):
            raise ValueError(f"moe_ext.ExpertLayout: slots_per_rank={S} is fewer than a rank's experts")
        return cls([row + [-1] * (S - len(row)) for row in lists], num_experts)

    @classmethod
    def build(cls, placement, num_experts, num_ranks):
        """An ExpertLayout from any of the ways to say where experts live.

        placement: None (contiguous blocks); an ExpertLayout; a moe_ext.placement.Placement (its
        `holds` [R, E]); a [R, E] bool array/tensor; a dict {expert: [ranks]} covering every
        expert; or a sequence of R lists, the experts each rank holds.
        """
        if placement is None:
            return cls.contiguous(num_experts, num_ranks)
        if isinstance(placement, ExpertLayout):
            layout = placement
        elif isinstance(placement, dict):
            rank_experts = [[] for _ in range(num_ranks)]
            if sorted(placement) != list(range(num_experts)):
                raise ValueError(f"moe_ext.ExpertLayout: the placement dict must have every expert "
                                 f"0..{num_experts - 1} as a key, got {sorted(placement)}")
            for e, ranks in placement.items():
                ranks = [ranks] if isinstance(ranks, int) else list(ranks)
                for r in ranks:
                    if not 0 <= r < num_ranks:
                        raise ValueError(f"moe_ext.ExpertLayout: expert {e} placed on rank {r}, outside "
                                         f"[0, {num_ranks})")
                    rank_experts[r].append(int(e))
            layout = cls.from_rank_experts(rank_experts, num_experts)
        else:
            holds = getattr(placement, "holds", placement)
            is_holds = isinstance(holds, (np.ndarray, torch.Tensor)) and holds.ndim == 2
            if is_holds and holds.dtype in (np.bool_, torch.bool):
                holds = np.asarray(holds.cpu() if isinstance(holds, torch.Tensor) else holds)
                if holds.shape[1] != num_experts:
                    raise ValueError(f"moe_ext.ExpertLayout: the placement holds {holds.shape[1]} experts, the layer "
                                     f"{num_experts}")
                layout = cls.from_rank_experts([np.nonzero(row)[0].tolist() for row in holds], num_experts)
            else:
                layout = cls.from_rank_experts(list(placement), num_experts)
        if layout.num_experts != num_experts or layout.num_ranks != num_ranks:
            raise ValueError(f"moe_ext.ExpertLayout: the placement is for {layout.num_experts} experts over "
                             f"{layout.num_ranks} ranks, the layer has {num_experts} experts over {num_ranks} EP ranks")
        return layout


def route_to_replicas(idx, replica_counts, replica_slots, rank):
    """Logical expert ids [T, k] -> physical slot ids [T, k] (same dtype; -1 stays -1).

    The n-th assignment to expert e in (token, slot) order goes to replica (n + rank) mod
    replica_counts[e] (replica_slots[e] lists them by rank). replica_counts / replica_slots:
    the ExpertLayout's tables on idx's device. No host synchronisation: on CUDA a decode-sized
    call (<= 2048 slots) is one kernel (csrc/kernels/replicas.cu), a captured decode graph's
    lookup included.
    """
    return ops.route_to_replicas(idx, replica_counts, replica_slots, int(rank))


# ---- row exchanges -----------------------------------------------------------------------------

def _exchange_rows(x, send_splits, recv_splits, group):
    """all_to_all_single of the rows of x (any dtype, moved as bytes) with uneven splits."""
    shape = tuple(x.shape[1:])
    if group is None or dist.get_world_size(group) == 1:
        return x.clone()
    flat = x.reshape(x.shape[0], int(np.prod(shape, dtype=np.int64)))
    send = _view_as(flat, torch.uint8)
    recv = send.new_empty((sum(recv_splits), send.shape[1]))
    dist.all_to_all_single(recv, send, list(recv_splits), list(send_splits), group=group)
    return _view_as(recv, x.dtype).view((-1,) + shape)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# The TP all-gather and reduce-scatter as collectives over the TP group: for rows the ipc kernels do
# not move (CUDA float64, rows not a multiple of 16 bytes, TP > 32; tp_experts), and the
# reference the dispatch / combine route is tested against.

def _sum_in_order(chunks):
    """sum of the chunks in list order, accumulated in float32 (float64 for float64)."""
    acc = chunks[0].to(_acc_dtype(chunks[0].dtype), copy=True)
    for c in chunks[1:]:
        acc += c
    return acc.to(chunks[0].dtype)


class _GatherRows(torch.autograd.Function):
    """[R_me, H] -> [sum R, H], every TP rank's rows in TP-rank order; backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        tp = len(sizes)
        return _exchange_rows(x.repeat((tp,) + (1,) * (x.dim() - 1)), [x.shape[0]] * tp, sizes, group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _reduce_scatter(grad.contiguous(), ctx.sizes, ctx.rank, ctx.group), None, None, None


def _reduce_scatter(y, sizes, rank, group):
    tp, mine = len(sizes), sizes[rank]
    recv = _exchange_rows(y, sizes, [mine] * tp, group)
    return _sum_in_order(list(recv.split(mine))) if mine else recv[:0]


class _ReduceScatterRows(torch.autograd.Function):
    """[sum R, H] partial rows on every TP rank -> [R_me, H] summed in TP-rank order; backward: all-gather."""

    @staticmethod
    def forward(ctx, y, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _reduce_scatter(y, sizes, rank, group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        tp = len(ctx.sizes)
        g = grad.contiguous()
        return (_exchange_rows(g.repeat((tp,) + (1,) * (g.dim() - 1)), [g.shape[0]] * tp, ctx.sizes, ctx.group),
                None, None, None)


def tp_experts(recv_x, tokens_per_slot, experts, tp_rank, tp_group, backend="auto", collectives=None):
    """The experts of a TP group over the rows every rank of the group received.

    recv_x [R_me, H] grouped by local slot (dispatch's layout), tokens_per_slot [S] int32;
    experts(x, tokens_per_slot) -> partial y: this rank's shard of the slots' FFNs.
    Returns y [R_me, H] (the group's partials summed in TP-rank order for this rank's rows) and
    the tokens per slot this rank ran, summed over the group [S] int32.
    The rows travel through moe_ext.dispatch / combine over the TP group (`backend`: "auto" picks
    ipc between GPUs with peer access, as for EP), each TP rank standing for one "expert": the
    all-gather is a dispatch of every row to all tp ranks (they arrive in (source rank, row)
    order, i.e. TP-rank order), the reduce-scatter a combine with weights 1 (float32 sum, float64
    for float64, in TP-rank order, one rounding), and their backwards are each other. With ipc the
    TP group has a communicator of its own (its buffers sized from these calls: see its nbytes).
    CUDA rows the ipc kernels do not move (float64, rows not a multiple of 16 bytes, TP > 32) go
    through torch.distributed collectives over the TP group instead (the same sums);
    collectives=True/False forces one route (the tests compare them).
    """
    # NOTE: the counts travel on recv_x's device (an NCCL group needs CUDA tensors); one read-back.
    info = torch.cat([torch.tensor([recv_x.shape[0]], device=tokens_per_slot.device), tokens_per_slot.detach().long()])
    gathered = [torch.empty_like(info) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(gathered, info, group=tp_group)
    infos = torch.stack(gathered).cpu()
    sizes, tpes = infos[:, 0].tolist(), infos[:, 1:]  # [tp], [tp, S]
    tp, R = len(sizes), recv_x.shape[0]
    recv_x = recv_x.contiguous()
    to_all = torch.arange(tp, dtype=torch.int32, device=recv_x.device).expand(R, tp).contiguous()
    if collectives is None:  # NOTE: from the dtype, hidden size and tp only: the same on every TP rank
        collectives = recv_x.is_cuda and _ipc_problem(recv_x, to_all) is not None
    if collectives:
        x_all = _GatherRows.apply(recv_x, sizes, tp_rank, tp_group)
    else:
        ones = torch.ones(R, tp, dtype=torch.float32, device=recv_x.device)
        x_all, _, handle = dispatch(recv_x, to_all, ones, tp, group=tp_group, backend=backend)
    # Slot-major order over the gathered chunks: slot s's rows of TP rank 0, then of TP rank 1, ...
    chunk_start = torch.tensor([0] + sizes[:-1]).cumsum(0)
    seg_start = chunk_start[:, None] + torch.cumsum(tpes, 1) - tpes  # [tp, S]
    lens, starts = tpes.t().reshape(-1), seg_start.t().reshape(-1)
    total = int(lens.sum())
    first = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    order = (torch.repeat_interleave(starts, lens) + torch.arange(total) - first).to(recv_x.device)
    tpe_all = tpes.sum(0).to(torch.int32).to(tokens_per_slot.device)
    y_sorted = experts(x_all.index_select(0, order), tpe_all)
    y_all = y_sorted.new_zeros((x_all.shape[0],) + tuple(y_sorted.shape[1:])).index_copy(0, order, y_sorted)
    if collectives:
        return _ReduceScatterRows.apply(y_all, sizes, tp_rank, tp_group), tpe_all
    return combine(y_all, handle), tpe_all


def direct_tp_slots(slots, w, slots_per_rank, tp):
    """EP x TP's direct dispatch: each slot s [T, k] (EP rank s // S, its slot s % S there) becomes
    tp slots, one per TP shard, on the virtual experts (ep_rank * tp + tp_rank) * S + s % S of a
    dispatch over the make_groups world (global rank ep_rank * tp + tp_rank); -1 stays -1. Returns
    (virtual slots [T, k * tp] int64, their weights [T, k * tp], each slot's weight repeated)."""
    S = slots_per_rank
    s = slots.long()[:, :, None]
    u = torch.arange(tp, device=slots.device)
    virtual = torch.where(s >= 0, ((s // S) * tp + u) * S + s % S, -1).flatten(1)
    return virtual, w[:, :, None].expand(-1, -1, tp).flatten(1)


# ---- replicas: gradient sums and moving weights ------------------------------------------------

def _row_bytes(t):
    return int(np.prod(t.shape[1:], dtype=np.int64)) * t.element_size()


def _flat_rows(tensors, rows):
    """[rows, bytes]: the per-slot tensors (any dtypes) side by side as raw bytes."""
    parts = [_view_as(t.reshape(rows, -1), torch.uint8) for t in tensors]
    return torch.cat(parts, 1) if parts else torch.empty(rows, 0, dtype=torch.uint8)


def _unflat_rows(buf, tensors, rows):
    """The inverse of _flat_rows for `rows` rows shaped like `tensors`."""
    out, col = [], 0
    for t in tensors:
        width = _row_bytes(t)
        out.append(_view_as(buf[:, col:col + width], t.dtype).view((rows,) + tuple(t.shape[1:])))
        col += width
    return out


@torch.no_grad()
def sum_replica_grads(grads, layout, rank, group):
    """Sums, in place, each replicated expert's gradients over the ranks holding it.

    grads: list of [S, ...] tensors of one dtype (this rank's slots); rank, group: the EP group.
    The sum runs in ascending rank order (float32 for 16-bit, float64 for float64) on every
    holder, so every replica ends with the same bits. Collective over the EP group when the layout
    has replicas; a no-op otherwise.
    """
    if not layout.has_replicas:
        return
    R, S = layout.num_ranks, layout.slots_per_rank
    se, holds = layout.slot_expert.tolist(), layout.holds.tolist()
    flat = torch.cat([g.reshape(S, -1) for g in grads], 1)
    # Rows sent to rank d: my slots whose expert d also holds, in slot order; received from rank
    # r: r's slots whose expert this rank holds, in r's slot order.
    send_slots, send_splits, recv_splits = [], [], []
    where = {(rank, e): s for s, e in enumerate(se[rank]) if e >= 0}  # row of each (rank, expert) in `stack`
    row = S
    for d in range(R):
        mine = [s for s, e in enumerate(se[rank]) if e >= 0 and d != rank and holds[d][e]]
        send_slots += mine
        send_splits.append(len(mine))
        theirs = [e for e in se[d] if e >= 0 and d != rank and holds[rank][e]]
        recv_splits.append(len(theirs))
        for e in theirs:
            where[(d, e)] = row
            row += 1
    recv = _exchange_rows(flat[torch.tensor(send_slots, dtype=torch.long, device=flat.device)], send_splits,
                          recv_splits, group)
    stack = torch.cat([flat, recv])
    C = int(layout.replica_counts.max())
    table = torch.full((S, C), -1, dtype=torch.long)
    for s, e in enumerate(se[rank]):
        if e >= 0 and int(layout.replica_counts[e]) > 1:
            for j, h in enumerate(layout.holders(e)):
                table[s, j] = where[(h, e)]
    replicated = (table[:, 0] >= 0).nonzero().squeeze(1)
    if replicated.numel() == 0:
        return
    table = table[replicated].to(flat.device)
    acc = torch.zeros(replicated.numel(), flat.shape[1], dtype=_acc_dtype(flat.dtype), device=flat.device)
    for j in range(C):  # NOTE: holder order, the same on every holder: identical sums
        ok = table[:, j] >= 0
        acc[ok] += stack[table[ok, j]]
    summed = acc.to(flat.dtype)
    col = 0
    for g in grads:
        width = int(np.prod(g.shape[1:], dtype=np.int64))
        g.view(S, -1)[replicated.to(g.device)] = summed[:, col:col + width]
        col += width


@torch.no_grad()
def move_slots(tensors, old, new, rank, group, prefer_local=True):
    """Re-lays this rank's per-slot tensors from layout `old` to layout `new` (one all-to-all).

    tensors: list of [S_old, ...] tensors (any dtypes). Each new slot holding expert e takes e's
    rows from this rank's old copy when there is one and prefer_local, else from e's primary
    replica (the lowest rank holding e in `old`). Returns [S_new, ...] tensors, bit-exact copies;
    empty slots are zero. Collective over the EP group (old and new must be the same on every rank).
    """
    R, S_old, S_new = old.num_ranks, old.slots_per_rank, new.slots_per_rank
    if new.num_ranks != R or new.num_experts != old.num_experts:
        raise ValueError("moe_ext.parallel.move_slots: the layouts disagree on experts or ranks")
    primary = [old.holders(e)[0] for e in range(old.num_experts)]
    slot_on = {(r, e): s for r in range(R) for s, e in enumerate(old.slot_expert[r].tolist()) if e >= 0}
    source = [[None] * S_new for _ in range(R)]
    for d in range(R):
        for s, e in enumerate(new.slot_expert[d].tolist()):
            if e >= 0:
                source[d][s] = d if prefer_local and (d, e) in slot_on else primary[e]
    send_rows, send_splits, recv_slots, recv_splits = [], [], [], []
    for d in range(R):
        rows = [slot_on[(rank, int(new.slot_expert[d, s]))] for s in range(S_new) if source[d][s] == rank]
        send_rows += rows
        send_splits.append(len(rows))
    for r in range(R):
        slots = [s for s in range(S_new) if source[rank][s] == r]
        recv_slots += slots
        recv_splits.append(len(slots))
    buf = _flat_rows(tensors, S_old)
    device = buf.device
    recv = _exchange_rows(buf[torch.tensor(send_rows, dtype=torch.long, device=device)], send_splits, recv_splits,
                          group)
    out = torch.zeros(S_new, buf.shape[1], dtype=torch.uint8, device=device)
    out[torch.tensor(recv_slots, dtype=torch.long, device=device)] = recv
    return _unflat_rows(out, tensors, S_new)


def check_same_on_all_ranks(value, what, groups, device=None):
    """Raises ValueError on every rank when the ranks of any of `groups` disagree on int `value`
    (device: where the check travels, the CUDA device for NCCL groups)."""
    for group in groups:
        world, _ = group_world(group)
        if world == 1:
            continue
        mine = torch.tensor([value], dtype=torch.int64, device=device)
        got = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(got, mine, group=group)
        values = [int(v) for v in got]
        if len(set(values)) > 1:
            raise ValueError(f"moe_ext: the ranks of the group {dist.get_process_group_ranks(group)} disagree on "
                             f"{what}; every rank must pass the same one")


def sum_over_groups(t, groups):
    """t summed over the ranks of each group in turn, in rank order (the same bits on every rank)."""
    for group in groups:
        world, _ = group_world(group)
        if world == 1:
            continue
        got = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(got, t.contiguous(), group=group)
        t = got[0].clone()
        for g in got[1:]:
            t += g
    return t


def gather_shards(t, dim, tp_group):
    """All TP ranks' shards of `t` concatenated along `dim`, in TP-rank order (on every rank)."""
    world, _ = group_world(tp_group)
    if world == 1:
        return t
    flat = _view_as(t.contiguous().reshape(1, -1), torch.uint8)
    got = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(got, flat, group=tp_group)
    return torch.cat([_view_as(g, t.dtype).view(t.shape) for g in got], dim)


__all__ = ["ExpertLayout", "make_groups", "move_slots", "route_to_replicas", "sum_replica_grads", "tp_experts"]
