"""dispatch(sync=False): the masked [E_local, max_rows, H] layout (the decode path).

On the CPU it is built from the exact layout (gloo synchronises anyway); the contract it must
meet is the one the ipc backend's kernels meet without a host synchronisation: expert e's rows
are its exact-layout rows (pad_to=1) in the same order, then zeros; tokens_per_expert counts
the valid rows; an expert keeps its first max_rows rows (capacity if smaller); combine and every
gradient equal the exact layout's bit for bit.
"""
import pytest
import torch

import moe_ext

from dist_utils import run_world


def _inputs(world, seed, k, experts_per_rank, dtype, max_tokens):
    g = torch.Generator().manual_seed(seed)
    E = world * experts_per_rank
    k = min(k, E)
    out = []
    for r in range(world):
        T = 0 if r == world - 1 and world > 1 else int(torch.randint(1, max_tokens + 1, (1,), generator=g))
        x = torch.randn(T, 8, generator=g).to(dtype)
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
        idx = idx.long()
        if T:
            idx[0, 0] = -1  # an unrouted slot
        w = torch.rand(T, k, generator=g)
        gout = torch.randn(T, 8, generator=g).to(dtype)
        out.append((x, idx, w, gout))
    return E, out


def _run(x, idx, w, gout, E, group, sync, max_tokens, capacity):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    recv, tpe, h = moe_ext.dispatch(x, idx, w, E, group=group, sync=sync, max_tokens=max_tokens, capacity=capacity)
    y = recv * 2 + 1  # an expert: any row-wise function
    out = moe_ext.combine(y, h)
    (out * gout).sum().backward()
    return recv.detach(), tpe, out.detach(), x.grad, w.grad, h


def _check(world, rank, seed, k, experts_per_rank, dtype, max_tokens, capacity):
    E, inputs = _inputs(world, seed, k, experts_per_rank, dtype, max_tokens)
    x, idx, w, gout = inputs[rank]
    group = None if world == 1 else torch.distributed.group.WORLD
    exact_cap = capacity
    rows = moe_ext.masked_rows(world, max_tokens, capacity)
    if capacity is None or capacity > rows:
        exact_cap = rows if capacity is None else min(capacity, rows)
    ex_recv, ex_tpe, ex_out, ex_gx, ex_gw, _ = _run(x, idx, w, gout, E, group, True, None, exact_cap)
    m_recv, m_tpe, m_out, m_gx, m_gw, h = _run(x, idx, w, gout, E, group, False, max_tokens, capacity)
    El = E // world
    assert m_recv.shape == (El, rows, 8) and h.max_rows == rows
    assert m_tpe.dtype == torch.int32 and m_tpe.tolist() == ex_tpe.tolist()
    at = 0
    for e in range(El):
        n = int(m_tpe[e])
        assert torch.equal(m_recv[e, :n], ex_recv[at:at + n])
        assert not m_recv[e, n:].any()
        at += n
    assert torch.equal(m_out, ex_out)
    assert torch.equal(m_gx, ex_gx)
    assert torch.equal(m_gw, ex_gw)
    return int(m_tpe.sum())


def _world(rank, world, seed):
    total = 0
    for i, (k, epr, dtype, max_tokens, cap) in enumerate([(2, 2, torch.float32, 9, None), (1, 1, torch.float64, 5, 2),
                                                          (4, 3, torch.bfloat16, 7, None), (3, 2, torch.float32, 6, 3)]):
        total += _check(world, rank, seed + i, k, epr, dtype, max_tokens, cap)
    # One rank with more tokens than max_tokens: every rank raises at once (the peers had waited for
    # it until the group's timeout), and the group still works afterwards.
    x, idx, w = torch.randn(4 + (rank == world - 1), 8), torch.zeros(4 + (rank == world - 1), 1, dtype=torch.long), \
        torch.ones(4 + (rank == world - 1), 1)
    mine = "x has 5 tokens, more than max_tokens=4" if rank == world - 1 else \
        rf"global rank\(s\) \[{world - 1}\] .* passed invalid inputs"
    with pytest.raises(ValueError, match=mine if world > 1 else "more than max_tokens=4"):
        moe_ext.dispatch(x, idx, w, 2 * world, sync=False, max_tokens=4)
    total += _check(world, rank, seed + 9, 2, 2, torch.float32, 9, None)
    return total


@pytest.mark.parametrize("world", [2, 3])
def test_masked_layout_gloo(world, seed):
    counts = run_world(_world, world, seed)
    assert sum(counts) > 0


def test_masked_layout_world_of_one(seed):
    assert _world(0, 1, seed) > 0


def test_masked_needs_max_tokens():
    x, idx, w = torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(ValueError, match="max_tokens"):
        moe_ext.dispatch(x, idx, w, 2, sync=False)
    with pytest.raises(ValueError, match="more than max_tokens"):
        moe_ext.dispatch(x, idx, w, 2, sync=False, max_tokens=2)
    with pytest.raises(ValueError, match="x_scale must be"):
        moe_ext.dispatch(x, idx, w, 2, x_scale=torch.ones(4))
    recv, tpe, h = moe_ext.dispatch(x, idx, w, 2, sync=False, max_tokens=4, x_scale=torch.arange(3.0) + 1)
    assert h.recv_x_scale.shape == (8, 1) and h.recv_x_scale[:3, 0].tolist() == [1.0, 2.0, 3.0]
    assert (h.recv_x_scale[3:] == 0).all()
    recv, tpe, h = moe_ext.dispatch(x, idx, w, 2, sync=False, max_tokens=4)
    assert recv.shape == (2, 4, 8) and tpe.tolist() == [3, 0]
    with pytest.raises(ValueError, match="y must be"):
        moe_ext.combine(recv.reshape(8, 8), h)
