"""The nccl backend on a GPU: moe_ext._nccl.NcclBackend over its own NCCL communicator.

NCCL refuses two ranks on one GPU, so on a one-GPU machine the backend runs with a world of one
rank (a gloo ProcessGroup over a FileStore, in this process). dispatch() sends a world of one to
the "local" path, so these tests force the backend in (dispatch's _select_backend answers
"nccl") and also call the backend object directly; the results must match:
  - the local path on the same GPU (permute -> unpermute) bit for bit: recv_x, tokens_per_expert,
    out and every gradient;
  - the gloo/local path on the CPU: recv_x bit for bit, out and gradients within the dtype's
    rounding (CPU and GPU round their float32 sums differently).
The 2-rank tests need two GPUs (one rank each) and are skipped otherwise.
"""
import importlib
import os
import time

import pytest
import torch
import torch.distributed as dist

import moe_ext
from moe_ext import _nccl

from dist_utils import run_world

dispatch_mod = importlib.import_module("moe_ext.dispatch")  # NOTE: moe_ext.dispatch is also the function

pytestmark = pytest.mark.skipif(not _nccl.available(),
                                reason="needs a CUDA device and a CUDA build of moe_ext (the nccl backend)")
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="NCCL needs one GPU per rank: two ranks need two GPUs")

HIDDEN = 64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
CASES = [  # (num_tokens, k, num_experts, pad_to, capacity, skew)
    (37, 2, 4, 1, None, False),
    (50, 4, 6, 4, 3, False),  # padding and capacity drops
    (29, 3, 5, 1, None, True),  # uneven: every token's first slot on one expert
    (0, 2, 4, 2, None, False),  # T = 0
]


def bits(t):
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def make_inputs(case, dtype, seed, device):
    T, k, E, _, _, skew = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, HIDDEN, generator=g).to(dtype)
    idx = torch.randint(E, (T, k), generator=g)
    if skew and T:
        idx[:, 0] = 1
    idx[torch.rand(T, k, generator=g) < 0.15] = -1
    w = torch.rand(T, k, generator=g)
    grad_out = torch.randn(T, HIDDEN, generator=g).to(dtype)
    a = (1 + torch.rand(E, HIDDEN, generator=g)).to(dtype)
    b = torch.randn(E, HIDDEN, generator=g).to(dtype)
    return [t.to(device) for t in (x, idx, w, grad_out, a, b)]


def pipeline(case, dtype, seed, device, backend="auto", sync=True, async_op=False):
    """dispatch -> y = x * a[e] + b[e] -> combine -> backward; every result."""
    x, idx, w, grad_out, a, b = make_inputs(case, dtype, seed, device)
    _, _, E, pad_to, capacity, _ = case
    x.requires_grad_()
    w.requires_grad_()
    recv_x, tpe, handle = moe_ext.dispatch(x, idx, w, E, backend=backend, pad_to=pad_to, capacity=capacity,
                                           sync=sync, max_tokens=max(x.shape[0], 1), async_op=async_op)
    if async_op:
        assert handle.wait()
    rows = recv_x.reshape(-1, HIDDEN)
    valid = tpe.long() if sync else torch.full_like(tpe.long(), recv_x.shape[1])
    e = torch.repeat_interleave(torch.arange(E, device=device), valid)
    y = (rows * a[e] + b[e]).reshape(recv_x.shape)
    y.retain_grad()
    out = moe_ext.combine(y, handle, async_op=async_op)
    if async_op:
        assert handle.wait()
    (out * grad_out).sum().backward()
    return {"recv_x": recv_x, "tpe": tpe, "out": out, "grad_x": x.grad, "grad_w": w.grad, "grad_y": y.grad}


@pytest.fixture
def force_nccl(monkeypatch):
    """dispatch() with the nccl backend even for a world of one; returns the backends it used."""
    used = []
    make = dispatch_mod._make_backend

    def making(name, *args):
        used.append(make(name, *args))
        return used[-1]

    monkeypatch.setattr(dispatch_mod, "_select_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(dispatch_mod, "_make_backend", making)
    return used


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_world_of_one_through_dispatch(group1, force_nccl, case, dtype, seed):
    dev = torch.device("cuda", torch.cuda.current_device())
    for sync, async_op in [(True, False), (True, True), (False, False)]:
        with pytest.MonkeyPatch.context() as m:  # the references: the local path, no nccl
            m.setattr(dispatch_mod, "_select_backend", lambda *a, **k: "local")
            gpu = pipeline(case, dtype, seed, dev, sync=sync)
            cpu = pipeline(case, dtype, seed, "cpu", sync=sync)
        ours = pipeline(case, dtype, seed, dev, backend="nccl", sync=sync, async_op=async_op)
        what = f"sync={sync} async_op={async_op}"
        for name in ours:
            assert ours[name].device == dev, f"{what}: {name} is on {ours[name].device}"
            assert ours[name].shape == gpu[name].shape, f"{what}: {name} shape"
            assert torch.equal(bits(ours[name]), bits(gpu[name])), f"{what}: {name} differs from the local GPU path"
        assert torch.equal(bits(ours["recv_x"]), bits(cpu["recv_x"])), f"{what}: recv_x differs from the CPU's"
        assert torch.equal(ours["tpe"].cpu(), cpu["tpe"])
        for name in ("out", "grad_x", "grad_w", "grad_y"):
            torch.testing.assert_close(ours[name].cpu().float(), cpu[name].float(), rtol=RTOL[dtype],
                                       atol=RTOL[dtype], msg=lambda m: f"{what}: {name} vs the CPU: {m}")
    assert force_nccl and all(isinstance(b, _nccl.NcclBackend) for b in force_nccl)
    assert len({id(b) for b in force_nccl}) == 1  # cached per (group, device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_world_of_one_backend_object(group1, dtype, seed):
    """The three movements of the backend object against the gloo backend object on the CPU."""
    dev = torch.device("cuda", torch.cuda.current_device())
    ours = _nccl.nccl_backend(group1, 1, 0, dev)
    gloo = dispatch_mod._AllToAllBackend(group1, 1, 0)
    for i, case in enumerate(CASES):
        x, idx, w, g, a, b = make_inputs(case, dtype, seed + i, dev)
        _, _, E, pad_to, capacity, _ = case
        opts = dispatch_mod._Options(E, pad_to=pad_to, capacity=capacity, requires_grad=True)
        recv_x, tpe, plan, row_map = ours.dispatch(x, idx, w, opts)
        ref_x, ref_tpe, ref_plan, ref_map = gloo.dispatch(x.cpu(), idx.cpu(), w.cpu(), opts)
        assert torch.equal(bits(recv_x), bits(ref_x)) and torch.equal(tpe.cpu(), ref_tpe)
        assert torch.equal(row_map.cpu(), ref_map)
        assert (plan.send_splits, plan.recv_splits, plan.back_send_splits, plan.back_recv_splits) == (
            ref_plan.send_splits, ref_plan.recv_splits, ref_plan.back_send_splits, ref_plan.back_recv_splits)
        for name in ("send_tokens", "recv_row_map", "back_rows"):
            assert getattr(plan, name).device == dev, f"plan.{name} is not on the GPU"
            assert torch.equal(getattr(plan, name).cpu(), getattr(ref_plan, name)), f"plan.{name}"
        y = recv_x * 3
        out, rows = ours.combine(y, w, plan, row_map, keep_rows=True)
        ref_out, ref_rows = gloo.combine(y.cpu(), w.cpu(), ref_plan, ref_map, keep_rows=True)
        assert torch.equal(bits(rows), bits(ref_rows))
        torch.testing.assert_close(out.cpu().float(), ref_out.float(), rtol=RTOL[dtype], atol=RTOL[dtype])
        local_x, local_map, _ = moe_ext.permute(x, idx, E, pad_to=pad_to, capacity=capacity)
        assert torch.equal(bits(out), bits(moe_ext.unpermute(local_x * 3, local_map, w)))
        grad_y, _ = ours.scatter_grad(g, w, y, plan)
        ref_grad_y, _ = gloo.scatter_grad(g.cpu(), w.cpu(), y.cpu(), ref_plan)
        torch.testing.assert_close(grad_y.cpu().float(), ref_grad_y.float(), rtol=RTOL[dtype], atol=RTOL[dtype])
    assert ours.last_work is None


def test_world_of_one_settings_errors_and_close(group1):
    dev = torch.device("cuda", torch.cuda.current_device())
    backend = _nccl.nccl_backend(group1, 1, 0, dev)
    assert _nccl.nccl_backend(group1, 1, 0, dev) is backend
    assert backend._c.version() >= 21400
    backend.timeout = 5
    assert backend._c.timeout() == 5.0
    with pytest.raises(ValueError, match="timeout must be > 0"):
        backend.timeout = -1
    x, w = torch.randn(4, HIDDEN, device=dev), torch.rand(4, 1, device=dev)
    with pytest.raises(ValueError, match="outside"):  # found before the header exchange, raised after it
        backend.dispatch(x, torch.full((4, 1), 9, device=dev), w, dispatch_mod._Options(4))
    recv_x, tpe, _, _ = backend.dispatch(x, torch.zeros(4, 1, dtype=torch.long, device=dev), w,
                                         dispatch_mod._Options(4))  # still in step
    assert recv_x.shape == (4, HIDDEN) and tpe.tolist() == [4, 0, 0, 0]
    # The adapter's own checks.
    with pytest.raises(RuntimeError, match="send must be on"):
        backend._c.alltoallv(torch.zeros(1, 4), torch.zeros(1, 4, device=dev), [1], [1])
    with pytest.raises(RuntimeError, match="send_splits sum to 2 rows"):
        backend._c.alltoallv(torch.zeros(1, 4, device=dev), torch.zeros(2, 4, device=dev), [2], [2])
    backend.close()
    assert backend.closed
    again = _nccl.nccl_backend(group1, 1, 0, dev)
    assert again is not backend and not again.closed
    recv_x, _, _, _ = again.dispatch(x, torch.zeros(4, 1, dtype=torch.long, device=dev), w, dispatch_mod._Options(4))
    assert torch.equal(recv_x, x)


# ---- two ranks, one GPU each -------------------------------------------------------------------

def _two_ranks(rank, world, seed):
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    for i, case in enumerate(CASES):
        T, k, E, pad_to, capacity, skew = case
        E = 2 * E
        for dtype in DTYPES:
            x, idx, w, g, a, b = make_inputs((T + 5 * rank, k, E, pad_to, capacity, skew), dtype,
                                             seed + 31 * i + rank, "cpu")
            results = {}
            for name, device in (("nccl", dev), ("gloo", torch.device("cpu"))):
                xd = x.to(device).requires_grad_()
                wd = w.to(device).requires_grad_()
                recv_x, tpe, handle = moe_ext.dispatch(xd, idx.to(device), wd, E, backend=name, pad_to=pad_to,
                                                       capacity=capacity)
                y = recv_x * 2
                y.retain_grad()
                out = moe_ext.combine(y, handle)
                (out * g.to(device)).sum().backward()
                results[name] = (recv_x, tpe, out, xd.grad, wd.grad, y.grad)
            ours, ref = results["nccl"], results["gloo"]
            assert torch.equal(bits(ours[0]), bits(ref[0])), f"case {i} {dtype}: recv_x"
            assert torch.equal(ours[1].cpu(), ref[1]), f"case {i} {dtype}: tokens_per_expert"
            for j, name in enumerate(("out", "grad_x", "grad_w", "grad_y"), start=2):
                torch.testing.assert_close(ours[j].cpu().float(), ref[j].float(), rtol=RTOL[dtype],
                                           atol=RTOL[dtype], msg=lambda m: f"case {i} {dtype} {name}: {m}")
    x, idx, w = torch.randn(3, HIDDEN + (rank == 0), device=dev), torch.zeros(3, 1, dtype=torch.long, device=dev), \
        torch.ones(3, 1, device=dev)
    with pytest.raises(ValueError, match=r"disagree on hidden"):
        moe_ext.dispatch(x, idx, w, 2, backend="nccl")
    return True


@two_gpus
def test_two_ranks_match_gloo(seed):
    assert run_world(_two_ranks, 2, seed, seed=seed, timeout_s=150) == [True, True]


def _missing_peer(rank, world, done_dir):
    """Rank 1 skips the second dispatch; rank 0 must raise within its 5 s timeout, not hang."""
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    x, idx, w = torch.randn(4, HIDDEN, device=dev), torch.randint(2, (4, 1), device=dev), torch.rand(4, 1, device=dev)
    moe_ext.dispatch(x, idx, w, 2, backend="nccl")  # makes the communicator, on both ranks
    comm = moe_ext.communicator(device=dev, backend="nccl")
    assert comm is _nccl.nccl_backend(dist.group.WORLD, world, rank, dev) and comm.nbytes == 0
    comm.timeout = 5
    if rank == 1:
        deadline = time.monotonic() + 60
        while not os.listdir(done_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as err:
            moe_ext.dispatch(x, idx, w, 2, backend="nccl")
        return time.monotonic() - start, str(err.value)
    finally:
        open(os.path.join(done_dir, "0"), "w").close()


@two_gpus
def test_missing_peer_times_out(tmp_path, seed):
    elapsed, message = run_world(_missing_peer, 2, str(tmp_path), seed=seed, timeout_s=120)[0]
    assert elapsed < 10, f"took {elapsed:.1f} s to fail"
    assert "did not complete within 5 s" in message and "global ranks [0, 1]" in message, message
    assert "global rank 1 never reached this exchange" in message, message
