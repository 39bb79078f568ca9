"""The `ipc` backend of dispatch/combine: one-sided writes into the peers' symmetric buffers.

Every rank of a group allocates one device buffer of the same layout (csrc/kernels/ep.cuh),
exports a CUDA IPC handle, and the handles go round the user's ProcessGroup (any backend: the
library never starts its own launcher); every rank then opens every peer's buffer. The kernels
(csrc/kernels/ep.cu) exchange counts through the buffers, write each token once per destination
rank straight into that rank's staging rows, signal with flags, and expand the arrived tokens
into the expert-major layout on the receiver; combine writes every kept expert row back into
its source's buffer, which sums the k rows of each token in float32 (moe_ext.unpermute's kernel).

Buffers are sized from (max tokens per rank, hidden bytes, k, experts) and grown when a call
needs more: for the tokens, every rank learns in the count exchange that some rank has more than
the buffer holds, and all ranks grow together before retrying (exact layout). Nothing is sized
by environment variables; `communicator(group).memory_budget` caps the bytes a buffer may take.

All kernels of a communicator run on its own CUDA stream, in call order; the caller's stream
waits for them (or, with async_op=True, at handle.wait()). The masked layout (sync=False) never
synchronises with the host, so dispatch -> grouped GEMM -> combine can be captured in a CUDA
graph once the communicator exists (run one eager call first: creating it is a collective).
"""
import atexit
import socket

import torch
import torch.distributed as dist

_FIELDS = ("magic", "seq", "tokens", "row_bytes", "dtype", "num_experts", "k", "pad_to", "capacity", "max_rows",
           "world", "scale_cols", "bad_input", "partial_combine")
_PHASES = ("count", "barrier", "token", "combine")
_TIMEOUT, _MISMATCH, _TOO_MANY = 1, 2, 3
# The header's bad_input field says what kind of call a rank makes: a real one (0), an
# announcement of invalid inputs (1, _announce_bad_input) or a growth request (2, _agree_to_grow).
_REAL, _BAD_INPUT, _GROW = 0, 1, 2


def require_cuda_build():
    """Raises RuntimeError unless this build of moe_ext has the CUDA backends and a GPU is visible."""
    if not torch.cuda.is_available():
        raise RuntimeError("moe_ext.dispatch: CUDA tensors over several ranks need a visible CUDA device")
    try:
        torch.classes.moe_ext.IpcComm  # noqa: B018  (raises when the class is not registered)
    except (AttributeError, RuntimeError) as e:
        raise RuntimeError("moe_ext.dispatch: this build of moe_ext has no CUDA backends (it was built without "
                           "CUDA); reinstall it with a CUDA build of torch to dispatch CUDA tensors") from e


def _group_key(group):
    return id(group), tuple(dist.get_process_group_ranks(group))


_TOPOLOGY = {}


def peer_access(group, device):
    """(True, why) when every rank of `group` can write into every other's GPU memory (same node,
    and the same GPU or peer access between the GPUs), else (False, why). A collective the first
    time per (group, device); every rank reaches the same answer."""
    device = torch.device(device)
    key = (_group_key(group), device.index)
    if key in _TOPOLOGY:
        return _TOPOLOGY[key]
    ranks = dist.get_process_group_ranks(group)
    mine = {"host": socket.gethostname(), "uuid": str(torch.cuda.get_device_properties(device).uuid)}
    everyone = [None] * len(ranks)
    dist.all_gather_object(everyone, mine, group=group)
    local = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
    problem = None
    for r, peer in zip(ranks, everyone):
        if peer["host"] != mine["host"]:
            problem = f"global rank {r} is on host {peer['host']}, not {mine['host']}"
        elif peer["uuid"] != mine["uuid"]:
            j = local.get(peer["uuid"])
            if j is None:
                problem = f"the GPU of global rank {r} is not visible to this process (CUDA_VISIBLE_DEVICES)"
            elif not torch.cuda.can_device_access_peer(device.index, j):
                problem = f"cuda:{device.index} has no peer access to cuda:{j} (global rank {r})"
        if problem:
            break
    verdicts = [None] * len(ranks)
    dist.all_gather_object(verdicts, problem, group=group)
    bad = [(r, v) for r, v in zip(ranks, verdicts) if v]
    if bad:
        r, v = bad[0]
        answer = (False, f"nccl, because on global rank {r}: {v} (ipc needs every pair of ranks on one node with "
                         "peer access)")
    else:
        gpus = len({p["uuid"] for p in everyone})
        answer = (True, f"ipc: all {len(ranks)} ranks are on host {mine['host']} on {gpus} GPU(s) with peer access; "
                        "tokens are written one-sided into the peers' symmetric buffers (CUDA IPC)")
    _TOPOLOGY[key] = answer
    return answer


class _EventWork:
    """The work of an async_op call: wait() makes the current stream wait for the communication."""

    def __init__(self, event, backend):
        self.event, self.backend = event, backend

    def wait(self, timeout=None):
        torch.cuda.current_stream(self.backend.device).wait_event(self.event)
        self.backend.check()
        return True

    def is_completed(self):
        return self.event.query()


class _IpcPlan:
    """What one ipc dispatch leaves for its combine and backward."""

    def __init__(self, idx, tensors, call, recv_x_scale=None):
        self.idx, self.tensors, self.call, self.recv_x_scale = idx, tensors, call, recv_x_scale
        self.partial = tensors[7].numel() > 0  # a dispatch for the partial combine (part_dst)


class IpcBackend:
    """The ipc communicator of one (group, device): symmetric buffers, its stream, its settings.

    timeout: seconds any wait inside a kernel gives up after (default 60); num_sms: blocks of
    the data kernels (0: one per SM); memory_budget: most bytes the buffer may hold (None: no
    cap). nbytes: device bytes held now. close(): frees everything (every rank of the group).
    """
    name = "ipc"

    def __init__(self, group, world, rank, device):
        self.group, self.world, self.rank, self.device = group, world, rank, torch.device(device)
        self.ranks = dist.get_process_group_ranks(group)
        self._timeout, self._num_sms = 60.0, 0
        self.memory_budget = None
        self.max_tokens_hint = 256  # tokens per rank of the first buffer; grown when a call needs more
        self._c = None
        self._sizes = None  # (world, experts, k, max_tokens, row_bytes, scale_cols)
        self.stream = torch.cuda.Stream(self.device)
        self.broken = None
        self.last_work = None
        self.captured = False  # a CUDA graph holds pointers into the buffers (see _allocate)
        self._retired = []  # outgrown buffers that a CUDA graph captured, kept until close()

    # ---- settings --------------------------------------------------------------------------------
    @property
    def timeout(self):
        return self._timeout

    @timeout.setter
    def timeout(self, seconds):
        if not seconds > 0:
            raise ValueError(f"moe_ext ipc backend: timeout must be > 0 seconds, got {seconds}")
        self._timeout = float(seconds)
        if self._c is not None:
            self._c.configure(self._timeout, self._num_sms)

    @property
    def num_sms(self):
        return self._num_sms

    @num_sms.setter
    def num_sms(self, n):
        if n is None or n < 0:
            raise ValueError(f"moe_ext ipc backend: num_sms must be >= 0 (0: every SM), got {n}")
        self._num_sms = int(n)
        if self._c is not None:
            self._c.configure(self._timeout, self._num_sms)

    @property
    def nbytes(self):
        return sum(int(c.nbytes()) for c in ([self._c] if self._c is not None else []) + self._retired)

    def close(self, collective=True, retired=True):
        """Frees the buffers: a collective, call it on every rank of the group. Every rank first
        unmaps its peers' buffers; after a barrier each frees its own (CUDA forbids freeing an
        exported buffer that another process still maps). collective=False skips the barrier
        (process exit, or a group that is gone). Buffers that a CUDA graph captured and that were
        later outgrown are freed here too (destroy such graphs first)."""
        comms = ([self._c] if self._c is not None else []) + (self._retired if retired else [])
        if comms:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            for c in comms:
                c.close_peers()
            if collective:
                dist.barrier(group=self.group)
            for c in comms:
                c.close()
        self._c, self._sizes, self.captured = None, None, False
        if retired:
            self._retired = []
            self.broken = None  # every buffer that recorded the error is gone: the next call starts over

    # ---- buffers ---------------------------------------------------------------------------------
    def reserve(self, max_tokens, hidden_bytes, k, num_experts, scale_cols=0):
        """Makes sure the buffer holds a call of these sizes (a collective when it (re)allocates:
        every rank must reach it with the same sizes)."""
        want = (self.world, num_experts, k, max(max_tokens, self.max_tokens_hint, 1), hidden_bytes, scale_cols)
        if self._sizes is not None and all(w <= h for w, h in zip(want, self._sizes)):
            return
        if self._sizes is not None:  # grow every dimension to the larger of old and new
            want = tuple(max(w, h) for w, h in zip(want, self._sizes))
            self._agree_to_grow()
        self._allocate(want)

    def _agree_to_grow(self):
        """Before growing (a collective on the host), an empty count exchange on the current buffers
        marked as a growth request. Every rank that grows makes it, so they pass; a peer that instead
        makes a real call (the ranks' sizes differ) or announces invalid inputs disagrees there, and
        every rank raises at once rather than this one waiting in the allocation's collective until
        the process group's timeout. One host synchronisation, only when the buffers grow."""
        if self._c is None or self.broken is not None or torch.cuda.is_current_stream_capturing():
            return  # (no buffers: the allocation is the first collective; capturing: _allocate refuses)
        self._empty_exchange(_GROW)  # exact layout: the host reads the verdict
        self.check()

    def _empty_exchange(self, kind):
        """A dispatch without tokens whose header announces `kind` (_BAD_INPUT or _GROW) to the peers."""
        x0 = torch.zeros((0, 16), dtype=torch.uint8, device=self.device)
        idx0 = torch.zeros((0, 1), dtype=torch.int64, device=self.device)
        cur = self._enter([])
        with torch.cuda.stream(self.stream):
            self._c.dispatch(x0, idx0, None, self.world, 1, -1, -1, 0, kind, None)
        self._leave(cur, [], False)

    def _allocate(self, sizes, problem=None):
        """(Re)allocates the buffers: a collective. Every rank takes part even when it cannot
        allocate (`problem`: its invalid inputs; or a buffer over its memory budget), so that all
        raise together instead of the others waiting for it until the process group's timeout."""
        world, experts, k, max_tokens, row_bytes, scale_cols = sizes
        # NOTE: before anything is closed, and whatever self.captured says (the first capture has
        # not set it yet): allocating is a host collective, which a capture cannot contain. Every
        # rank captures the same calls, so all raise here together.
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("moe_ext ipc backend: a call inside CUDA graph capture needs larger buffers; run "
                               "it once eagerly first with the same sizes (max_tokens, hidden, k), or reserve() "
                               "enough, so that the buffers exist")
        if self.captured and self._c is not None:
            # NOTE: a CUDA graph holds pointers into the current buffers (and their peers'): they stay
            # mapped, with their own operation counter, until close(); every rank retires its own at the
            # same call (growth is collective), so replays keep working on the old ones.
            self._retired.append(self._c)
            self._c, self._sizes, self.captured = None, None, False
        self.close(retired=False)
        if problem is None and self.memory_budget is not None:
            need = int(torch.ops.moe_ext.ep_buffer_bytes(world, experts, k, max_tokens, row_bytes, scale_cols))
            if need > self.memory_budget:
                problem = (
                    f"moe_ext ipc backend: a buffer for {max_tokens} tokens per rank of {row_bytes} bytes, k={k}, "
                    f"{experts} experts over {world} ranks takes {need} bytes, over the memory budget of "
                    f"{self.memory_budget} bytes; pass fewer tokens per call (e.g. more chunks in the MoE layer) or "
                    "raise the budget")
        c = None
        if problem is None:
            c = torch.classes.moe_ext.IpcComm(self.device.index, world, self.rank, experts, k, max_tokens, row_bytes,
                                              scale_cols, self._timeout, self._num_sms)
        handles = [None] * world
        dist.all_gather_object(handles, (None if c is None else c.handle().tolist(), sizes, problem),
                               group=self.group)
        if problem is not None:
            raise ValueError(problem)
        for r, (_, theirs, their_problem) in zip(self.ranks, handles):
            if their_problem is not None:
                c.close()
                raise RuntimeError(f"moe_ext ipc backend: global rank {r} of the group {self.ranks} could not take part "
                                   f"in allocating the buffers, so no rank does: {their_problem}")
            if tuple(theirs) != tuple(sizes):
                c.close()
                raise RuntimeError(f"moe_ext ipc backend: global rank {r} sizes its buffer as {tuple(theirs)}, this "
                                   f"rank as {tuple(sizes)} (world, experts, k, max_tokens, row_bytes, scale_cols): "
                                   "the ranks are not making the same calls")
        c.open(torch.tensor([h for h, _, _ in handles], dtype=torch.uint8))
        self._c, self._sizes, self.broken = c, tuple(sizes), None

    def check(self):
        """Raises the first error the kernels recorded (a timeout, ranks that disagree), as far as
        the kernels have run: it reads host-mapped memory and does not synchronise. Every call
        checks on entry; a CUDA graph replay cannot, so after a replay whose work has completed
        (e.g. once its output was read) call this to learn of a failed exchange, whose combine
        output is NaN."""
        if self.broken is not None:
            raise RuntimeError(self.broken)
        for c in ([self._c] if self._c is not None else []) + self._retired:  # (retired: graph replays)
            code, r, field, phase, value, mine, seq = c.error()
            if code != 0:
                self.broken = self._message(code, r, field, phase, value, mine)
                raise RuntimeError(self.broken)

    def _message(self, code, r, field, phase, value, mine):
        peer = f"global rank {self.ranks[r]} (rank {r} of the group {self.ranks})"
        if code == _TIMEOUT:
            msg = (f"timed out after {self._timeout:g} s in the {_PHASES[phase]} phase waiting for {peer}: it never "
                   "made the matching dispatch/combine call, or it died")
        elif code == _MISMATCH:
            name = _FIELDS[field] if field < len(_FIELDS) else f"field {field}"
            if name == "bad_input" and _BAD_INPUT in (value, mine):
                who = peer if value == _BAD_INPUT else "this rank"
                msg = f"{who} passed invalid inputs (the error on that rank says what); every rank stops"
            elif name == "bad_input":
                grower = peer if value == _GROW else "this rank"
                msg = (f"{grower} had to grow the buffers for this call while {'this rank' if value == _GROW else peer} "
                       "did not: the ranks' calls differ in max_tokens, hidden size, k, num_experts or fp8 scales")
            elif name == "seq":
                msg = f"{peer} is at another dispatch/combine call than this rank (the ranks' calls went out of step)"
            else:
                msg = f"the ranks disagree on {name}: {peer} has {value}, global rank {self.ranks[self.rank]} {mine}"
        else:
            msg = f"error code {code} from {peer}"
        return (f"moe_ext ipc backend (global rank {self.ranks[self.rank]}): {msg}. The communicator is now unusable: "
                "call moe_ext.communicator(group).close() on every rank to start over.")

    # ---- the three movements -------------------------------------------------------------------
    def _run(self, op, *args):
        """op(*args), one of the communicator's calls. If it raises (out of memory for an output,
        after the kernels of the exchange may already be queued), this rank is out of step with its
        peers: every later call raises at once, and the peers time out naming this rank."""
        try:
            return op(*args)
        except Exception as e:
            self.broken = (f"moe_ext ipc backend (global rank {self.ranks[self.rank]}): a dispatch/combine call failed "
                           f"on this rank ({str(e).splitlines()[0] if str(e) else type(e).__name__}), so the ranks' "
                           "calls are out of step. The communicator is now unusable: call "
                           "moe_ext.communicator(group).close() on every rank to start over.")
            raise

    def _enter(self, tensors):
        """Orders the communication stream after the caller's; returns the caller's stream."""
        self.check()
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)
        if torch.cuda.is_current_stream_capturing():
            self.captured = True
        else:  # NOTE: a graph's memory pool lives as long as the graph
            for t in tensors:
                if t is not None and t.is_cuda:
                    t.record_stream(self.stream)
        return cur

    def _leave(self, cur, outputs, async_op):
        if not torch.cuda.is_current_stream_capturing():
            for t in outputs:
                if t is not None and t.is_cuda:
                    t.record_stream(cur)
        if async_op:
            event = torch.cuda.Event()
            event.record(self.stream)
            self.last_work = _EventWork(event, self)
        else:
            cur.wait_stream(self.stream)
            self.last_work = None

    def dispatch(self, x, idx, w, opts):
        from .dispatch import _dtype_code, _input_problem, _scale_rows

        self.check()  # NOTE: before reserve(): a broken communicator must not reach a growth collective
        num_experts = opts.num_experts  # a multiple of the world size: dispatch() checked it
        # NOTE: the value checks of idx read it back to the host: only where the exact layout
        # synchronises anyway; the masked layout treats out-of-range ids as not routed.
        problem = _input_problem(x, idx, w, num_experts, values=opts.sync,
                                 max_tokens=None if opts.sync else opts.max_tokens)
        if problem is None:
            problem = _ipc_problem(x, idx)
        scale = None
        if problem is None and opts.x_scale is not None:
            scale, problem = _scale_rows(opts.x_scale, x)
        if problem is not None:
            if self._c is None:  # NOTE: the peers are allocating the buffers (a collective): take part, then raise
                self._allocate(self._sizes or (self.world, 0, 0, 0, 0, 0), problem=f"moe_ext.dispatch: {problem}")
            self._announce_bad_input(num_experts)
            raise ValueError(f"moe_ext.dispatch: {problem}")
        k, row_bytes = idx.shape[1], x.shape[1] * x.element_size()
        scale_cols = 0 if scale is None else scale.shape[1]
        # NOTE: never this rank's own T here: the ranks must size their buffers alike. A rank with
        # more tokens than the buffer holds is seen by all in the count exchange; all grow then.
        self.reserve(opts.max_tokens or 0, row_bytes, k, num_experts, scale_cols)
        max_rows = -1 if opts.sync else opts.max_rows
        capacity = -1 if opts.capacity is None else opts.capacity
        call = [num_experts, opts.pad_to, capacity, max_rows, _dtype_code(x.dtype)]
        for attempt in range(2):
            cur = self._enter([x, idx, scale, w if opts.partial else None])
            with torch.cuda.stream(self.stream):
                recv_x, recv_scale, tpe, *plan, idx_copy = self._run(
                    self._c.dispatch, x, idx, scale, num_experts, opts.pad_to, capacity, max_rows, call[-1], 0,
                    w.detach() if opts.partial else None, bool(opts.partial and opts.partial_grad))
            code, _, _, _, value, _, _ = self._c.error() if opts.sync else (0,) * 7
            if code != _TOO_MANY or attempt == 1:
                break
            cur.wait_stream(self.stream)
            grown = list(self._sizes)
            grown[3] = max(int(value), (grown[3] * 3 + 1) // 2)
            self._allocate(tuple(grown))
        row_map = plan[8]  # t * k + j where slot (t, j) has a row, else -1: written by the dispatch's kernels
        self._leave(cur, [recv_x, recv_scale, tpe, idx_copy, *plan], opts.async_op)
        if opts.sync:
            self.check()
        # NOTE: the plan keeps the dispatch's copy of idx, not the caller's tensor: combine and the
        # backward re-read it, and an in-place change of the caller's idx in between would misroute them.
        ipc_plan = _IpcPlan(idx_copy, plan, call + [plan[3].shape[0], int(opts.partial and opts.partial_grad)],
                            recv_scale if scale is not None else None)
        return recv_x, tpe, ipc_plan, row_map

    def _announce_bad_input(self, num_experts):
        """Takes part in the count exchange with bad_input set, so every peer fails too instead of
        waiting (once the buffer exists; before that, dispatch takes part in its allocation). A peer
        that must grow its buffer for this call learns it in its growth request (_agree_to_grow)."""
        if self._c is None or self.broken is not None:
            return
        self._empty_exchange(_BAD_INPUT)
        self.broken = ("moe_ext ipc backend: this rank passed invalid inputs to dispatch (see the error raised then); "
                       "call moe_ext.communicator(group).close() on every rank to start over")

    def combine(self, y, w, plan, row_map, keep_rows=False, stage="combine", async_op=False):
        keep_rows = keep_rows and not plan.partial  # NOTE: a partial combine brings no per-slot rows back
        cur = self._enter([y, w])
        with torch.cuda.stream(self.stream):
            out, rows, _ = self._run(self._c.combine, y, plan.idx, w, plan.tensors, plan.call, bool(keep_rows))
        self._leave(cur, [out, rows], async_op)
        return out, (rows if keep_rows else None)

    def scatter_grad(self, g, w, y, plan, async_op=False):
        g = g.to(y.dtype)
        weights_grad = bool(plan.call[6])  # a partial plan made for w's gradient: it comes from the experts' ranks
        cur = self._enter([g, w, y if weights_grad else None])
        with torch.cuda.stream(self.stream):
            grad_y, grad_w = self._run(self._c.combine_grad, g, plan.idx, w.detach(), y if weights_grad else None,
                                       plan.tensors, plan.call)
        self._leave(cur, [grad_y, grad_w], async_op)
        return grad_y, (grad_w.to(w.dtype) if weights_grad else None)


def _ipc_problem(x, idx):
    """What the ipc backend cannot move (None if nothing)."""
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2):
        return f"the ipc backend moves bfloat16, float16, float32 or fp8 rows, got {x.dtype}"
    if x.shape[1] * x.element_size() % 16:
        return (f"the ipc backend moves rows of a multiple of 16 bytes: hidden={x.shape[1]} of {x.dtype} is "
                f"{x.shape[1] * x.element_size()} bytes")
    if x.stride(1) != 1 or x.data_ptr() % 16 or (x.shape[0] > 1 and x.stride(0) * x.element_size() % 16):
        return "x's rows must be contiguous and 16-byte aligned (x.contiguous())"
    if idx.shape[1] > 32:
        return f"idx has k={idx.shape[1]} slots per token; the ipc backend takes at most 32"
    return None


# ---- the communicators, one per (group, device) -----------------------------------------------------

_COMMS = {}


def ipc_backend(group, world, rank, device):
    """The cached ipc communicator of (group, device), created on first use."""
    device = torch.device(device)
    key = (_group_key(group), device.index)
    comm = _COMMS.get(key)
    if comm is None:
        comm = _COMMS[key] = IpcBackend(group, world, rank, device)
    return comm


def has_buffers(group, device):
    """Whether the ipc communicator of (group, device) exists and holds its buffers (no collective)."""
    comm = _COMMS.get((_group_key(group), torch.device(device).index))
    return comm is not None and comm._c is not None


def communicator(group=None, device=None):
    """The ipc communicator of `group` on `device` (created on first use, without buffers until the
    first dispatch or reserve()): set .timeout, .num_sms, .memory_budget, read .nbytes, call
    .reserve(max_tokens, hidden_bytes, k, num_experts) or .close()."""
    from .dispatch import _resolve_group

    group, world, rank = _resolve_group(group)
    if group is None:
        raise ValueError("moe_ext.communicator: a world of one rank has no communicator (no communication)")
    require_cuda_build()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return ipc_backend(group, world, rank, device)


@atexit.register
def _close_all():
    for comm in list(_COMMS.values()):
        try:
            comm.close(collective=False)
        except Exception:  # noqa: BLE001  (process exit: the driver frees what is left)
            pass
    _COMMS.clear()
