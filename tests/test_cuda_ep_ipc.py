"""The ipc backend on one GPU shared by 2, 4 and 8 processes (run them under MPS: GPU.md).

Every spawned rank runs each case twice over the same gloo group: with CPU tensors (the gloo
backend, the reference) and with CUDA tensors (ipc). recv_x, tokens_per_expert, out and the
gradients of x and y must be bit-identical (the CUDA unpermute rounds exactly like the CPU op);
the weights' gradient (a float64-accumulated dot) within float32 rounding. Outputs are never
pre-zeroed by the tests: the kernels must write every row (in the masked layout: every row
below each expert's count; the rows past it are left unwritten, see _valid_rows).
Skipped without CUDA or without the CUDA build of moe_ext.
"""
import time

import pytest
import torch

import moe_ext

from dist_utils import run_world


def _cuda_build():
    if not torch.cuda.is_available():
        return False
    try:
        torch.classes.moe_ext.IpcComm  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


pytestmark = pytest.mark.skipif(not _cuda_build(), reason="needs a GPU and the CUDA build of moe_ext")

CASES = [  # (dtype, hidden, k, experts per rank, max T, pad_to, capacity)
    (torch.bfloat16, 64, 2, 2, 33, 1, None),
    (torch.float32, 40, 1, 1, 17, 1, None),
    (torch.float16, 256, 8, 4, 65, 16, None),
    (torch.bfloat16, 7168, 8, 32, 129, 1, None),
    (torch.bfloat16, 128, 4, 3, 50, 1, 5),
    (torch.float32, 8, 3, 2, 9, 4, 2),
]


def _device(rank):
    return torch.device("cuda", rank % torch.cuda.device_count())


def _inputs(world, rank, seed, dtype, hidden, k, epr, max_t, skew=False, min_t=1):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    E = world * epr
    k = min(k, E)
    T = 0 if rank == world - 1 else int(torch.randint(min_t, max_t + 1, (1,), generator=g))
    x = torch.randn(T, hidden, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    idx = idx.long()
    if skew and T:
        idx[:, 0] = 0  # every token's first slot on expert 0
        idx[:, 1:] = torch.where(idx[:, 1:] == 0, torch.full_like(idx[:, 1:], E - 1), idx[:, 1:])
    if T > 2:
        idx[1, -1] = -1  # unrouted slot
    w = torch.rand(T, k, generator=g)
    gout = torch.randn(T, hidden, generator=g).to(dtype)
    return E, x, idx, w, gout


def _run(x, idx, w, gout, E, backend, clobber_idx=False, **kw):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    recv, tpe, h = moe_ext.dispatch(x, idx, w, E, backend=backend, **kw)
    if kw.get("async_op"):
        h.wait()
    if clobber_idx:  # the plan keeps the dispatch's own copy: combine and backward must not see this
        idx.fill_(-1)
    # NOTE: not detached: x's gradient flows back through it (dispatch's backward, a combine)
    y = (recv.float() * 1.5 - 0.25).to(recv.dtype)  # an "expert"
    y.retain_grad()
    out = moe_ext.combine(y, h)
    (out.float() * gout.float()).sum().backward()
    return [t.detach().cpu() for t in (recv, tpe, out, x.grad, w.grad, y.grad)]


def _valid_rows(recv, tpe):
    """The masked layout's rows below each expert's count, [sum(tpe), H]: the rows past it are
    not written by the ipc backend (zeroing E_local * max_rows rows would cost more than the
    decode dispatch itself), and the masked grouped GEMM and combine never read them."""
    keep = torch.arange(recv.shape[1])[None, :] < tpe.long()[:, None]
    return recv[keep]


def _compare(ref, got, what, masked=False):
    names = ("recv_x", "tokens_per_expert", "out", "grad_x", "grad_w", "grad_y")
    if masked:
        assert ref[0].shape == got[0].shape and torch.equal(ref[1], got[1]), f"{what}: recv_x / tokens_per_expert"
        ref, got = [_valid_rows(ref[0], ref[1])] + list(ref[1:]), [_valid_rows(got[0], got[1])] + list(got[1:])
    for name, a, b in zip(names, ref, got):
        assert a.shape == b.shape, f"{what}: {name} shape {tuple(b.shape)} != {tuple(a.shape)}"
        if name == "grad_w":
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"{what}: {name}")
        else:
            assert torch.equal(a, b), f"{what}: {name} differs (max {(a.double() - b.double()).abs().max()})"


def _world_cases(rank, world, seed):
    dev = _device(rank)
    torch.cuda.set_device(dev)
    for i, (dtype, hidden, k, epr, max_t, pad_to, cap) in enumerate(CASES):
        for skew in (False, True):
            E, x, idx, w, gout = _inputs(world, rank, seed + i, dtype, hidden, k, epr, max_t, skew and k > 1)
            what = f"case {i} skew={skew} rank {rank}/{world}"
            ref = _run(x, idx, w, gout, E, "gloo", pad_to=pad_to, capacity=cap)
            got = _run(x.to(dev), idx.to(dev), w.to(dev), gout.to(dev), E, "ipc", pad_to=pad_to, capacity=cap,
                       clobber_idx=True)
            _compare(ref, got, what + " exact")
            mt = max_t
            ref = _run(x, idx, w, gout, E, "gloo", capacity=cap, sync=False, max_tokens=mt)
            got = _run(x.to(dev), idx.to(dev), w.to(dev), gout.to(dev), E, "ipc", capacity=cap, sync=False,
                       max_tokens=mt)
            _compare(ref, got, what + " masked", masked=True)
            # async: the same results once waited for
            E2, x2, idx2, w2, gout2 = _inputs(world, rank, seed + 99 + i, dtype, hidden, k, epr, max_t)
            recv_a, _, h = moe_ext.dispatch(x2.to(dev), idx2.to(dev), w2.to(dev), E2, backend="ipc", async_op=True)
            h.wait()
            recv_s, _, _ = moe_ext.dispatch(x2, idx2, w2, E2, backend="gloo")
            assert torch.equal(recv_a.cpu(), recv_s), what + " async"
            # an async dispatch, then combine and the backward (the weights' gradient reads the
            # handle's row_map, made on the communicator's stream)
            ref = _run(x2, idx2, w2, gout2, E2, "gloo")
            got = _run(x2.to(dev), idx2.to(dev), w2.to(dev), gout2.to(dev), E2, "ipc", async_op=True)
            _compare(ref, got, what + " async combine and backward")
    comm = moe_ext.communicator(device=dev)
    assert comm.nbytes > 0
    line = moe_ext.describe(device=dev)
    return line


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ipc_matches_gloo(world, seed):
    lines = run_world(_world_cases, world, seed, timeout_s=240, pg_timeout_s=120)
    assert all(line.startswith("auto -> ipc") for line in lines), lines


def _decode_inputs(seed, rank, T, H, k, E, dev, dtype=torch.bfloat16):
    """Static decode inputs (x, idx, w) for a captured graph, and load(i): new values, seeded per rank."""
    x_s = torch.zeros(T, H, device=dev, dtype=dtype)
    idx_s = torch.zeros(T, k, dtype=torch.long, device=dev)
    w_s = torch.zeros(T, k, device=dev)

    def load(i):
        gi = torch.Generator().manual_seed(seed + 100 * i + rank)
        x_s.copy_(torch.randn(T, H, generator=gi))
        idx_s.copy_(torch.stack([torch.randperm(E, generator=gi)[:k] for _ in range(T)]))
        w_s.copy_(torch.rand(T, k, generator=gi))

    return x_s, idx_s, w_s, load


def _capture(fn, dev):
    """fn() once eagerly on a side stream (creates the communicator and its buffers: a collective, not
    capturable), then captured: (graph, its static output)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _check_replay(graph, out_s, fn, dev, what):
    """A replay gives what an eager fn() gives for the inputs loaded now."""
    graph.replay()
    torch.cuda.synchronize(dev)
    replayed = out_s.clone()
    eager = fn()
    assert torch.equal(replayed, eager), f"{what}: {(replayed - eager).abs().max()}"


def _run_partial(x, idx, w, gout, E, backend, w_grad=False, **kw):
    """A partial combine and its backward to x and y (and to w with w_grad)."""
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(w_grad)
    recv, tpe, h = moe_ext.dispatch(x, idx, w, E, backend=backend, partial_combine=True, **kw)
    y = (recv.float() * 1.5 - 0.25).to(recv.dtype)
    y.retain_grad()
    out = moe_ext.combine(y, h)
    (out.float() * gout.float()).sum().backward()
    return [t.detach().cpu() for t in (recv, tpe, out, x.grad, w.grad if w_grad else torch.zeros(0), y.grad)]


def _partial_cases(rank, world, seed):
    dev = _device(rank)
    torch.cuda.set_device(dev)
    for i, (dtype, hidden, k, epr, max_t, pad_to, cap) in enumerate(CASES):
        E, x, idx, w, gout = _inputs(world, rank, seed + i, dtype, hidden, k, epr, max_t, k > 1)
        what = f"partial case {i} rank {rank}/{world}"
        w_grad = i % 2 == 0  # w's gradient comes back from the experts' ranks
        dev_in = (x.to(dev), idx.to(dev), w.to(dev), gout.to(dev))
        ref = _run_partial(x, idx, w, gout, E, "gloo", w_grad, pad_to=pad_to, capacity=cap)
        got = _run_partial(*dev_in, E, "ipc", w_grad, pad_to=pad_to, capacity=cap)
        _compare(ref, got, what + " exact")
        if w_grad:  # the same dot products as the per-slot combine's backward on the source: the same bits
            per_slot = _run(*dev_in, E, "ipc", pad_to=pad_to, capacity=cap)
            assert torch.equal(got[4], per_slot[4]), f"{what}: partial grad_w differs from the per-slot one"
            assert torch.equal(got[5], per_slot[5]), f"{what}: partial grad_y differs from the per-slot one"
        ref = _run_partial(x, idx, w, gout, E, "gloo", w_grad, capacity=cap, sync=False, max_tokens=max_t)
        got = _run_partial(*dev_in, E, "ipc", w_grad, capacity=cap, sync=False, max_tokens=max_t)
        _compare(ref, got, what + " masked", masked=True)
    # Decode: the no-sync partial dispatch -> combine captured in a graph, replayed with new routing.
    T, H, k, E = 16, 64, 4, 4 * world
    x_s, idx_s, w_s, load = _decode_inputs(seed, rank, T, H, k, E, dev)

    def step():
        recv, _, h = moe_ext.dispatch(x_s, idx_s, w_s, E, backend="ipc", sync=False, max_tokens=T, partial_combine=True)
        return moe_ext.combine(recv * 2, h)

    load(0)
    graph, out_s = _capture(step, dev)
    for j in range(1, 4):
        load(j)
        _check_replay(graph, out_s, step, dev, f"partial replay {j}")
    del graph
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_ipc_partial_combine_matches_gloo(world, seed):
    assert all(run_world(_partial_cases, world, seed, timeout_s=240, pg_timeout_s=120))


def _fp8(rank, world, seed):
    dev = _device(rank)
    torch.cuda.set_device(dev)
    E, x, idx, w, _ = _inputs(world, rank, seed, torch.float32, 64, 2, 2, 20)
    scale = x.abs().amax(1).clamp(min=1e-6) / 448
    x8 = (x / scale[:, None]).to(torch.float8_e4m3fn)
    recv, tpe, h = moe_ext.dispatch(x8.to(dev), idx.to(dev), w.to(dev), E, backend="ipc", x_scale=scale.to(dev))
    ref, ref_tpe, rh = moe_ext.dispatch(x8.view(torch.uint8), idx, w, E, backend="gloo", x_scale=scale)
    assert torch.equal(recv.cpu().view(torch.uint8), ref)
    assert torch.equal(h.recv_x_scale.cpu(), rh.recv_x_scale)  # gloo: the same scales, bit for bit
    return int(tpe.sum())


def test_ipc_fp8_rows_with_scales(seed):
    run_world(_fp8, 2, seed, timeout_s=150)


def _graph(rank, world, seed):
    dev = _device(rank)
    torch.cuda.set_device(dev)
    H, F, epr, k, T = 64, 32, 2, 2, 16
    E = world * epr
    g = torch.Generator().manual_seed(seed)
    # NOTE: bfloat16: float32 masked GEMMs on CUDA take the ATen path, which reads valid_rows back to
    # the host (not capturable); the bf16/fp16 kernels never do.
    bf = torch.bfloat16
    w1 = (torch.randn(epr, H, 2 * F, generator=g) / 8).to(dev, bf)
    w2 = (torch.randn(epr, F, H, generator=g) / 8).to(dev, bf)
    x_s, idx_s, w_s, load = _decode_inputs(seed, rank, T, H, k, E, dev, bf)

    def layer():
        recv, tpe, h = moe_ext.dispatch(x_s, idx_s, w_s, E, backend="ipc", sync=False, max_tokens=T)
        hid = moe_ext.gemm.grouped_gemm_masked(recv, w1, tpe, activation="swiglu")
        y = moe_ext.gemm.grouped_gemm_masked(hid, w2, tpe)
        return moe_ext.combine(y, h)

    load(0)
    graph, out_s = _capture(layer, dev)
    for i in range(1, 4):
        load(i)
        _check_replay(graph, out_s, layer, dev, f"replay {i}")
    # A later call that outgrows the buffers: new ones for it, the captured ones stay for the graph.
    comm = moe_ext.communicator(device=dev)
    held = comm.nbytes
    big = torch.randn(40 * T, H, device=dev, dtype=bf)
    big_idx = torch.randint(0, E, (40 * T, k), device=dev)
    moe_ext.dispatch(big, big_idx, torch.rand(40 * T, k, device=dev), E, backend="ipc", max_tokens=40 * T)
    assert comm.nbytes > held and comm._retired, "the captured buffers should have been kept"
    load(4)
    _check_replay(graph, out_s, layer, dev, "replay after growth")  # the eager call on the new buffers
    del graph
    comm.close()
    assert comm.nbytes == 0
    return True


def test_ipc_cuda_graph_dispatch_gemm_combine(seed):
    run_world(_graph, 2, seed, timeout_s=150)


def _replay_failure(rank, world, seed):
    """A replayed graph cannot raise: when a peer skips the replay, this rank's kernels give up
    after the timeout captured with them, the combine output is NaN (never the last replay's
    rows), and comm.check() then raises naming the missing rank."""
    dev = _device(rank)
    torch.cuda.set_device(dev)
    E, x, idx, w, _ = _inputs(world, rank, seed, torch.bfloat16, 64, 2, 2, 12, min_t=12)
    x, idx, w = x.to(dev), idx.to(dev), w.to(dev)

    def layer():
        recv, tpe, h = moe_ext.dispatch(x, idx, w, E, backend="ipc", sync=False, max_tokens=12)
        return moe_ext.combine(recv * 2, h)

    layer()  # buffers exist (a collective)
    comm = moe_ext.communicator(device=dev)
    comm.timeout = 3.0  # NOTE: before the capture: the kernels' arguments hold it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer()
    graph.replay()
    torch.cuda.synchronize(dev)
    assert torch.isfinite(out).all()
    good = out.clone()
    if rank == 1:
        time.sleep(10)  # alive (its buffer mapped) but never replays again
        del graph
        return None
    graph.replay()
    torch.cuda.synchronize(dev)
    assert torch.isnan(out).all(), "a failed replay must give NaN, not the last good rows"
    assert not torch.equal(out, good)
    with pytest.raises(RuntimeError, match="timed out after 3 s .* global rank 1"):
        comm.check()
    del graph
    return True


def test_ipc_failed_replay_gives_nan_and_check_raises(seed):
    assert run_world(_replay_failure, 2, seed, timeout_s=120)[0]


def _timeout(rank, world, seed):
    dev = _device(rank)
    torch.cuda.set_device(dev)
    E, x, idx, w, _ = _inputs(world, rank, seed, torch.bfloat16, 64, 2, 2, 20)
    moe_ext.dispatch(x.to(dev), idx.to(dev), w.to(dev), E, backend="ipc")  # every rank: buffers exist
    comm = moe_ext.communicator(device=dev)
    comm.timeout = 5.0
    if rank == 1:
        time.sleep(8)  # alive (its buffer mapped) but never makes the second call
        return None
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 5 s .* global rank 1"):
        moe_ext.dispatch(x.to(dev), idx.to(dev), w.to(dev), E, backend="ipc")
    return time.monotonic() - start


def test_ipc_missing_peer_times_out(seed):
    took = run_world(_timeout, 2, seed, timeout_s=120)
    assert took[0] < 10.0


def _rank0_bad_ids(rank, dev, x, idx, w, E, bad_id, peer_error, **kw):
    """Rank 0 passes expert id bad_id (its own ValueError); every other rank must raise a
    RuntimeError matching peer_error instead of waiting for it."""
    if rank == 0:
        idx = idx.clone()
        idx[0, 0] = bad_id
        with pytest.raises(ValueError, match="outside"):
            moe_ext.dispatch(x.to(dev), idx.to(dev), w.to(dev), E, backend="ipc", **kw)
    else:
        with pytest.raises(RuntimeError, match=peer_error):
            moe_ext.dispatch(x.to(dev), idx.to(dev), w.to(dev), E, backend="ipc", **kw)


def _peers_other_hidden(rank, world, seed, dev, hidden, error):
    """Rank 0 dispatches rows of 64 columns, its peers of `hidden`: every rank raises `error`."""
    E, x, idx, w, _ = _inputs(world, 0, seed, torch.bfloat16, 64 if rank == 0 else hidden, 2, 2, 20)
    with pytest.raises(RuntimeError, match=error):
        moe_ext.dispatch(x.to(dev), idx.to(dev), w.to(dev), E, backend="ipc")


def _mismatch(rank, world, seed):
    dev = _device(rank)
    torch.cuda.set_device(dev)
    comm = moe_ext.communicator(device=dev)
    comm.reserve(64, 2 * 128, 2, 4)
    _peers_other_hidden(rank, world, seed, dev, 128, "disagree on row_bytes")
    comm.close()
    # A rank with bad inputs raises ValueError; the others learn it in the count exchange.
    E, x, idx, w, _ = _inputs(world, 0, seed, torch.bfloat16, 64, 2, 2, 20)
    moe_ext.dispatch(x.to(dev), idx.to(dev), w.to(dev), E, backend="ipc")
    _rank0_bad_ids(rank, dev, x, idx, w, E, E + 3, "invalid inputs")
    # Before any buffer exists, the bad rank takes part in allocating them (a collective), so the
    # others raise too instead of waiting for it until the process group's timeout.
    comm.close()
    _rank0_bad_ids(rank, dev, x, idx, w, E, E + 3, "could not take part in allocating the buffers.*outside")
    # A rank that must grow its buffers (a collective) first asks its peers on the current ones, so
    # a peer making a call that fits, or announcing invalid inputs, makes every rank raise at once
    # instead of leaving the grower in the allocation until the process group's timeout.
    comm.reserve(64, 2 * 64, 2, 2 * world)
    start = time.monotonic()
    _peers_other_hidden(rank, world, seed, dev, 4096, "had to grow the buffers")
    comm.close()
    E, x, idx, w, _ = _inputs(world, 0, seed, torch.bfloat16, 64, 2, 2, 20)
    moe_ext.dispatch(x.to(dev), idx.to(dev), w.to(dev), E, backend="ipc")
    _rank0_bad_ids(rank, dev, x, idx, w, E, -7, "invalid inputs", max_tokens=5000)  # the peer must grow
    assert time.monotonic() - start < 20, "a growth request waited instead of failing"
    comm.close()
    # The same for a memory budget only one rank cannot meet.
    E, x, idx, w, _ = _inputs(world, 0, seed, torch.bfloat16, 64, 2, 2, 20)
    comm.memory_budget = 1 if rank == 1 else None
    with pytest.raises(ValueError if rank == 1 else RuntimeError, match="memory budget"):
        moe_ext.dispatch(x.to(dev), idx.to(dev), w.to(dev), E, backend="ipc")
    comm.memory_budget = None
    return True


def test_ipc_mismatch_and_bad_input_raise_everywhere(seed):
    run_world(_mismatch, 2, seed, timeout_s=150)


def _grow(rank, world, seed):
    dev = _device(rank)
    torch.cuda.set_device(dev)
    comm = moe_ext.communicator(device=dev)
    sizes = []
    for min_t, max_t in ((1, 8), (1000, 3000), (1, 20)):  # NOTE: >= 1000 tokens: past the first buffer's 256
        E, x, idx, w, gout = _inputs(world, rank, seed + max_t, torch.bfloat16, 128, 4, 2, max_t, min_t=min_t)
        ref = _run(x, idx, w, gout, E, "gloo")
        got = _run(x.to(dev), idx.to(dev), w.to(dev), gout.to(dev), E, "ipc")
        _compare(ref, got, f"T up to {max_t}")
        sizes.append(comm.nbytes)
    comm.memory_budget = sizes[-1] // 2
    comm.close()
    E, x, idx, w, _ = _inputs(world, rank, seed, torch.bfloat16, 128, 4, 2, 8)
    with pytest.raises(ValueError, match="memory budget"):
        moe_ext.dispatch(x.to(dev), idx.to(dev), w.to(dev), E, backend="ipc", max_tokens=3000)
    return sizes


def test_ipc_buffers_grow_and_respect_budget(seed):
    sizes = run_world(_grow, 2, seed, timeout_s=150)
    assert sizes[0][1] > sizes[0][0]


def _capture_needs_growth(rank, world, seed):
    """A capture whose call needs larger buffers raises on every rank (growing is a host
    collective), before the current buffers are touched; eager calls then work and grow."""
    dev = _device(rank)
    torch.cuda.set_device(dev)
    E, x, idx, w, gout = _inputs(world, rank, seed, torch.bfloat16, 128, 2, 2, 20)
    xd, idxd, wd = x.to(dev), idx.to(dev), w.to(dev)
    moe_ext.dispatch(xd, idxd, wd, E, backend="ipc", sync=False, max_tokens=20)  # the buffers exist
    before = moe_ext.communicator(device=dev).nbytes
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="inside CUDA graph capture needs larger buffers"):
        with torch.cuda.graph(graph):
            moe_ext.dispatch(xd, idxd, wd, E, backend="ipc", sync=False, max_tokens=2000)  # > the 256 first sized
    assert moe_ext.communicator(device=dev).nbytes == before
    ref = _run(x, idx, w, gout, E, "gloo", sync=False, max_tokens=2000)
    got = _run(xd, idxd, wd, gout.to(dev), E, "ipc", sync=False, max_tokens=2000)
    _compare(ref, got, "after a refused capture", masked=True)
    return moe_ext.communicator(device=dev).nbytes > before


def test_ipc_capture_refuses_to_grow(seed):
    assert all(run_world(_capture_needs_growth, 2, seed, timeout_s=150))
