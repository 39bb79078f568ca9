"""The nccl backend's Python half on the CPU: moe_ext._nccl.NcclBackend with its NCCL
communicator replaced by gloo all_to_all_single (the transport is the only thing it changes).

Over spawned gloo worlds, dispatch -> experts -> combine -> backward through NcclBackend must be
bit-identical to the gloo backend (_AllToAllBackend) on the same inputs: the overrides (the
token transport, the header exchange with its agreement checks, the protocol run under x's
device) keep the protocol exactly. In this process: the cache per (group, device), close(), and
the messages of a timed-out or failed exchange. The real communicator is tested on a GPU in
tests/test_cuda_nccl.py.
"""
import contextlib
import importlib
import time

import pytest
import torch
import torch.distributed as dist

import moe_ext
from moe_ext import _nccl
from moe_ext._nccl import NcclBackend

from dist_utils import run_world

dispatch_mod = importlib.import_module("moe_ext.dispatch")  # NOTE: moe_ext.dispatch is also the function
HIDDEN = 8


class FakeComm:
    """The interface of torch.classes.moe_ext.NcclComm that NcclBackend uses, over gloo on the CPU.
    fail: None, or (state, message) to raise on the next alltoallv like an aborted communicator."""

    def __init__(self, group, timeout):
        self.group, self.timeout, self._state, self.fail, self.calls = group, timeout, 1, None, []

    def alltoallv(self, send, recv, send_splits, recv_splits):
        assert send.is_contiguous() and recv.is_contiguous() and send.dtype == recv.dtype
        assert len(send_splits) == len(recv_splits) == dist.get_world_size(self.group)
        self.calls.append((tuple(send.shape), list(send_splits), list(recv_splits)))
        if self.fail is not None:
            self._state, msg = self.fail
            raise RuntimeError(msg)
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)

    def set_timeout(self, seconds):
        self.timeout = seconds

    def state(self):
        return self._state

    def close(self):
        self._state = 2

    def abort(self):
        self._state = 2


class CpuNccl(NcclBackend):
    def _connect(self):
        return FakeComm(self.group, self._timeout)


def make_inputs(world, seed, dtype, k, experts_per_rank, zero_rank=None):
    """Every rank's (x [T, H], idx [T, k], w [T, k] float32, grad_out [T, H]) and the experts' (a, b)."""
    g = torch.Generator().manual_seed(seed)
    num_experts = world * experts_per_rank
    ranks = []
    for r in range(world):
        t = 0 if r == zero_rank else int(torch.randint(1, 12, (1,), generator=g))
        x = torch.randn(t, HIDDEN, generator=g).to(dtype)
        idx = torch.randint(num_experts, (t, k), generator=g)
        idx[torch.rand(t, k, generator=g) < 0.2] = -1
        ranks.append((x, idx.to(torch.int32 if r % 2 else torch.int64), torch.rand(t, k, generator=g),
                      torch.randn(t, HIDDEN, generator=g).to(dtype)))
    a = (1 + torch.rand(num_experts, HIDDEN, generator=g)).to(dtype)
    b = torch.randn(num_experts, HIDDEN, generator=g).to(dtype)
    return ranks, a, b


def run_case(rank, world, seed, dtype, k, epr, pad_to, capacity, sync, use_nccl):
    """dispatch -> y = x * a[e] + b[e] -> combine -> backward on this rank; every result as bytes."""
    ranks, a, b = make_inputs(world, seed, dtype, k, epr, zero_rank=1 % world)
    x0, idx, w0, grad_out = ranks[rank]
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    made = []

    def make(name, group, world_, rank_, device):
        made.append(CpuNccl(group, world_, rank_, device))
        return made[-1]

    original = dispatch_mod._make_backend
    if use_nccl:  # the one seam: the backend object dispatch() moves the tokens with
        dispatch_mod._make_backend = make
    try:
        recv_x, tpe, handle = moe_ext.dispatch(x, idx, w, world * epr, backend="gloo", pad_to=pad_to,
                                               capacity=capacity, sync=sync, max_tokens=16)
        rows = recv_x.reshape(-1, HIDDEN)
        valid = tpe.long() if sync else torch.full_like(tpe.long(), recv_x.shape[1])
        e = rank * epr + torch.repeat_interleave(torch.arange(epr), valid)
        y = (rows * a[e] + b[e]).reshape(recv_x.shape)
        y.retain_grad()
        out = moe_ext.combine(y, handle)
        (out * grad_out).sum().backward()
    finally:
        dispatch_mod._make_backend = original
    if use_nccl:
        assert made and all(isinstance(m, NcclBackend) for m in made) and made[0]._c.calls
    return {name: (t.dtype, tuple(t.shape), bytes(t.detach().contiguous().view(torch.uint8).reshape(-1).tolist()))
            for name, t in [("recv_x", recv_x), ("tpe", tpe), ("out", out), ("grad_x", x.grad), ("grad_w", w.grad),
                            ("grad_y", y.grad)]}


CASES = [  # dtype, k, experts per rank, pad_to, capacity, sync
    (torch.float32, 2, 2, 1, None, True),
    (torch.bfloat16, 4, 3, 4, None, True),
    (torch.float16, 2, 1, 1, 2, True),
    (torch.float32, 3, 2, 2, 3, True),
    (torch.bfloat16, 2, 2, 1, None, False),
    (torch.float32, 2, 2, 1, 1, False),
]


def _world(rank, world, seed):
    for i, case in enumerate(CASES):
        ours = run_case(rank, world, seed + i, *case, use_nccl=True)
        gloo = run_case(rank, world, seed + i, *case, use_nccl=False)
        for name in ours:
            assert ours[name] == gloo[name], f"case {i} {case}: {name} differs from the gloo backend"

    # Disagreements and bad inputs are caught by the overridden header exchange, on every rank.
    backend = CpuNccl(dist.group.WORLD, world, rank, "cpu")
    x, idx, w = torch.randn(3, HIDDEN), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    opts = dispatch_mod._Options(world)
    xh = torch.randn(3, HIDDEN + (rank == 0))
    with pytest.raises(ValueError, match=r"disagree on hidden \(rank 0: 9, rank 1: 8"):
        backend.dispatch(xh, idx, w, opts)
    with pytest.raises(ValueError, match=r"disagree on dtype \(rank 0: torch.float64, rank 1: torch.float32"):
        backend.dispatch(x.double() if rank == 0 else x, idx, w, opts)
    bad = torch.full((3, 1), world if rank == world - 1 else 0, dtype=torch.long)
    match = "outside" if rank == world - 1 else rf"rank\(s\) \[{world - 1}\] .* passed invalid inputs"
    with pytest.raises(ValueError, match=match):
        backend.dispatch(x, bad, w, opts)
    # Still in step afterwards.
    recv_x, tpe, _, _ = backend.dispatch(x, idx, w, opts)
    return int(recv_x.shape[0]), tpe.tolist()


@pytest.mark.parametrize("world", [2, 3])
def test_nccl_protocol_over_gloo_matches_gloo_backend(world, seed):
    results = run_world(_world, world, seed, seed=seed, timeout_s=120)
    assert results[0] == (3 * world, [3 * world])  # every rank's 3 tokens reached expert 0 on rank 0
    assert all(r == (0, [0]) for r in results[1:])


# ---- in this process: a world of one ---------------------------------------------------------------

def test_world_of_one_matches_local(group1, seed):
    ranks, a, b = make_inputs(1, seed, torch.float32, 2, 4)
    x, idx, w, _ = ranks[0]
    backend = CpuNccl(group1, 1, 0, "cpu")
    for opts in [dispatch_mod._Options(4), dispatch_mod._Options(4, pad_to=4, capacity=2)]:
        recv_x, tpe, plan, row_map = backend.dispatch(x, idx, w, opts)
        ref_x, ref_map, ref_tpe = moe_ext.permute(x, idx, 4, pad_to=opts.pad_to, capacity=opts.capacity)
        assert torch.equal(recv_x, ref_x) and torch.equal(tpe, ref_tpe)
        out, _ = backend.combine(recv_x * 2, w, plan, row_map)
        assert torch.equal(out, moe_ext.unpermute(ref_x * 2, ref_map, w))
    # T = 0
    recv_x, tpe, plan, row_map = backend.dispatch(x[:0], idx[:0], w[:0], dispatch_mod._Options(4))
    assert recv_x.shape == (0, HIDDEN) and tpe.tolist() == [0, 0, 0, 0] and row_map.shape == (0, 2)


def test_cache_close_and_failures(group1, monkeypatch):
    monkeypatch.setattr(NcclBackend, "_connect", CpuNccl._connect)
    dev = torch.device("cuda", 0)  # only a cache key here: nothing touches a GPU
    first = _nccl.nccl_backend(group1, 1, 0, dev)
    assert _nccl.nccl_backend(group1, 1, 0, "cuda:0") is first
    assert _nccl.nccl_backend(group1, 1, 0, "cuda:1") is not first
    first.timeout = 5
    assert first._c.timeout == 5 and first.timeout == 5
    with pytest.raises(ValueError, match="timeout must be > 0"):
        first.timeout = 0
    first.close()
    assert first.closed
    second = _nccl.nccl_backend(group1, 1, 0, dev)
    assert second is not first and not second.closed
    first.close()  # twice is fine

    # A timed-out exchange in a world of one: nobody is missing, and the message says so; the
    # aborted backend leaves the cache. (Naming a missing rank: test_timeout_names_the_missing_rank.)
    second._c.fail = (_nccl._TIMED_OUT, "NCCL alltoallv did not complete within 5 s")
    x, idx, w = torch.randn(3, HIDDEN), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    second.device = torch.device("cpu")  # the fake transport moves CPU tensors
    with pytest.raises(RuntimeError) as err:
        second.dispatch(x, idx, w, dispatch_mod._Options(1))
    msg = str(err.value)
    assert "moe_ext.dispatch: the header exchange (nccl backend) did not complete within 60 s" in msg, msg
    assert "group with global ranks [0]" in msg and "every rank reached this exchange" in msg, msg
    assert _nccl.nccl_backend(group1, 1, 0, dev) is not second

    # Any other failure: named as such, with the stage (combine here).
    third = _nccl.nccl_backend(group1, 1, 0, dev)
    third.device = torch.device("cpu")
    recv_x, _, plan, row_map = third.dispatch(x, idx, w, dispatch_mod._Options(1))
    third._c.fail = (_nccl._FAILED, "NCCL send/recv in alltoallv on rank 0: unhandled system error")
    with pytest.raises(RuntimeError, match=r"moe_ext.combine: the combine exchange \(nccl backend\) failed on "
                                           r"global rank 0 .*unhandled system error"):
        third.combine(recv_x, w, plan, row_map)
    assert _nccl.nccl_backend(group1, 1, 0, dev) is not third
    third.close()
    with pytest.raises(RuntimeError, match="the communicator was closed"):
        third.dispatch(x, idx, w, dispatch_mod._Options(1))

    _nccl.close_all()
    assert not _nccl._BACKENDS


def _skip_one_rank(rank, world, skipper):
    """Every rank but `skipper` dispatches; their (fake) exchange times out at once, as NCCL's would
    with a peer missing. Returns the message each one raised (None on the skipper)."""
    msg = None
    if rank != skipper:
        backend = CpuNccl(dist.group.WORLD, world, rank, "cpu")
        backend.timeout = 2  # the store is watched for up to half of it
        backend._c.fail = (_nccl._TIMED_OUT, "NCCL alltoallv did not complete within 2 s")
        x, idx, w = torch.randn(3, HIDDEN), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as err:
            backend.dispatch(x, idx, w, dispatch_mod._Options(world))
        msg = (str(err.value), time.monotonic() - t0)
    dist.barrier()
    return msg


def test_timeout_names_the_missing_rank():
    results = run_world(_skip_one_rank, 3, 1, timeout_s=60)
    assert results[1] is None
    for r in (0, 2):
        msg, took = results[r]
        assert f"did not complete within 2 s on global rank {r}" in msg, msg
        assert "global rank 1 never reached this exchange" in msg, msg
        assert took < 5, took  # the 1 s watch of the store, not a hang


def test_missing_ranks_counts_a_rank_that_gave_up_later(group1):
    # NOTE: NCCL skips the peers a rank swaps no rows with, so a rank can complete the exchange the
    # missing one never reached and give up in a later one: it is present, not missing.
    b = CpuNccl(group1, 1, 0, "cpu")
    b.ranks, b._tag, b._timeout = [0, 1, 2, 3], "t", 0.4  # as rank 0 of 4 (only the store is used)
    store = dist.distributed_c10d._get_default_store()
    store.set("moe_ext/nccl/t/gave-up-in/2", "8")  # gave up in a later exchange
    store.set("moe_ext/nccl/t/gave-up-in/3", "6")  # gave up in an earlier one: it never reached ours
    b._exchanges = 7
    t0 = time.monotonic()
    assert b._missing_ranks() == [1, 3]
    assert 0.15 < time.monotonic() - t0 < 5  # waited half the timeout for the others
    store.set("moe_ext/nccl/t/gave-up-in/1", "7")
    assert b._missing_ranks() == [3]


def test_warns_when_nccl_blocks(group1, monkeypatch):
    monkeypatch.setenv("NCCL_COMM_BLOCKING", "1")
    monkeypatch.setattr(_nccl, "_comm_class", lambda: _CommThatFailsOnRank0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    with pytest.warns(RuntimeWarning, match="NCCL_COMM_BLOCKING=1"), pytest.raises(RuntimeError, match="interface"):
        NcclBackend(group1, 1, 0, "cuda:0")


class _CommThatFailsOnRank0:
    """Stands in for torch.classes.moe_ext.NcclComm: rank 0 cannot make a communicator (say, no
    usable network interface); the others could, but must not be left waiting for its id."""

    def __init__(self, device, world, rank, timeout):
        if rank == 0:
            raise RuntimeError("NCCL: no usable network interface")

    def unique_id(self):
        raise AssertionError("only rank 0 asks for the id")

    def init(self, uid):
        raise AssertionError("no rank may join after rank 0 failed")


def _rank0_cannot_create(rank, world):
    # NOTE: this spawned process only; no GPU here, so no device to switch to either
    _nccl._comm_class = lambda: _CommThatFailsOnRank0
    torch.cuda.device = lambda device: contextlib.nullcontext()
    t0 = time.monotonic()
    try:
        NcclBackend(dist.group.WORLD, world, rank, "cuda:0", timeout=30)
    except RuntimeError as e:
        return str(e), time.monotonic() - t0
    return None


def test_rank0_failure_reaches_every_rank_at_once():
    # NOTE: the ProcessGroup's timeout is 60 s: a rank left waiting in the id broadcast would fail
    # the time limit below (and the world's).
    results = run_world(_rank0_cannot_create, 3, timeout_s=50, pg_timeout_s=60)
    assert "no usable network interface" in results[0][0]
    for r in (1, 2):
        msg, took = results[r]
        assert "global rank 0 (rank 0 of the group with global ranks [0, 1, 2]) could not create" in msg, msg
        assert "no usable network interface" in msg and took < 20, (msg, took)


def _communicator_errors(rank, world):
    out = []
    for kwargs in [dict(device="cpu"), dict(device="cuda:0", backend="bogus")]:
        try:
            moe_ext.communicator(**kwargs)
        except ValueError as e:
            out.append(str(e))
    return out


def test_communicator_bad_arguments(group1):
    with pytest.raises(ValueError, match="a world of one rank has no communicator"):
        moe_ext.communicator(device="cuda:0")
    dist.destroy_process_group()
    try:
        msgs = run_world(_communicator_errors, 2, timeout_s=60)
    finally:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    for m in msgs:
        assert "device must be a CUDA device, got cpu" in m[0], m
        assert "backend must be 'auto', 'ipc' or 'nccl', got 'bogus'" in m[1], m


def test_unavailable_without_cuda_build():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/test_cuda_nccl.py covers the real communicator")
    assert not _nccl.available()
    has_class = True
    try:
        torch.classes.moe_ext.NcclComm  # noqa: B018
    except (AttributeError, RuntimeError):
        has_class = False
    if not has_class:
        with pytest.raises(RuntimeError, match="no CUDA backends"):
            _nccl._comm_class()


# What the nccl backend relies on to run the base protocol on CUDA tensors: every torch function
# the protocol calls either is given idx's device explicitly or follows the device of its inputs
# (a new factory call must be checked for that, then listed here).
FOLLOWS_ITS_INPUTS = {"bincount", "cat", "cumsum", "full_like", "repeat_interleave", "searchsorted", "sort",
                      "where", "stack", "zeros_like", "ones_like", "empty_like"}


def test_base_protocol_makes_tensors_where_the_device_context_says():
    import ast
    import inspect
    import textwrap

    from torch.utils._device import _device_constructors

    redirected = {getattr(f, "__name__", "") for f in _device_constructors()}
    used = set()
    for obj in [dispatch_mod._AllToAllBackend, dispatch_mod.expert_placement, dispatch_mod._view_as,
                dispatch_mod._input_problem]:
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(obj)))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                used.add(node.func.attr)
    unknown = used - redirected - FOLLOWS_ITS_INPUTS
    assert not unknown, (f"moe_ext/dispatch.py's protocol now calls torch.{sorted(unknown)}: check that each makes "
                         "its tensor on idx's device (device=dev), "
                         "then list it here")
    assert {"arange", "zeros", "full", "tensor"} <= used  # the scan sees the protocol
