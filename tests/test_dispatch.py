"""dispatch / combine: a world of one in this process, and gloo worlds of 1-4 spawned ranks.

Every spawned rank rebuilds all ranks' inputs from the shared seed, so each checks its own
results against two single-process references: one written here with plain torch ops in
float64 (recv_x and tokens_per_expert exactly, out and the gradients of x, w and y within the
dtype's tolerance), and moe_ext.permute -> unpermute on all ranks' tokens concatenated in rank
order, which the multi-rank results must match bit for bit.
"""
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.distributed as dist

import moe_ext
from moe_ext._ops import ops
from moe_ext.dispatch import _select_backend, expert_placement

from dist_utils import run_world

HIDDEN = 8
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@dataclass
class Case:
    k: int
    experts_per_rank: int
    dtype: torch.dtype
    pad_to: int = 1
    capacity: Optional[int] = None
    skew: bool = False  # every token's first slot goes to one expert
    one_rank_holds_all: bool = False  # every other rank has T = 0
    async_op: bool = False


def cases(world):
    """A grid covering k in {1, 2, 4}, 1..4 experts per rank, three dtypes, pad_to, capacity, skew."""
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    out = [Case(k=(1, 2, 4)[i % 3], experts_per_rank=1 + i % 4, dtype=dtypes[(i // 4) % 3],
                pad_to=(1, 1, 4)[i % 3 if i % 2 else 0], capacity=(None, 2, None, 1)[(i // 3) % 4],
                async_op=i % 5 == 0)
           for i in range(12)]
    out += [Case(k=2, experts_per_rank=2, dtype=torch.float32, skew=True),
            Case(k=4, experts_per_rank=3, dtype=torch.float32, skew=True, capacity=3, pad_to=2),
            Case(k=2, experts_per_rank=2, dtype=torch.float32, one_rank_holds_all=True),
            Case(k=4, experts_per_rank=1, dtype=torch.float64, one_rank_holds_all=True, pad_to=3)]
    return out


def make_inputs(case, world, seed):
    """Every rank's (x [T, H], idx [T, k], w [T, k], grad_out [T, H]) and the experts' (a, b) [E, H]."""
    g = torch.Generator().manual_seed(seed)
    num_experts = world * case.experts_per_rank
    counts = torch.randint(0, 10, (world,), generator=g).tolist()
    if world > 1:
        counts[int(torch.randint(world, (1,), generator=g))] = 0  # some rank always has T = 0
    if case.one_rank_holds_all:
        counts = [0] * world
        counts[int(torch.randint(world, (1,), generator=g))] = 24
    hot = int(torch.randint(num_experts, (1,), generator=g))
    w_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    ranks = []
    for t in counts:
        x = torch.randn(t, HIDDEN, generator=g).to(case.dtype)
        if case.k <= num_experts:
            idx = torch.stack([torch.randperm(num_experts, generator=g)[:case.k] for _ in range(t)]) if t else \
                torch.empty(0, case.k, dtype=torch.long)
        else:  # more slots than experts: some token sends two slots to one expert
            idx = torch.randint(num_experts, (t, case.k), generator=g)
        if case.skew and t:
            idx[:, 0] = hot
        idx[torch.rand(t, case.k, generator=g) < 0.15] = -1
        w = torch.rand(t, case.k, generator=g).to(w_dtype)
        grad_out = torch.randn(t, HIDDEN, generator=g).to(case.dtype)
        ranks.append((x, idx.to(torch.int32 if t % 2 else torch.int64), w, grad_out))
    a = (1 + torch.rand(num_experts, HIDDEN, generator=g)).to(case.dtype)
    b = torch.randn(num_experts, HIDDEN, generator=g).to(case.dtype)
    return ranks, a, b


def experts(recv_x, tokens_per_expert, first_expert, a, b):
    """The experts' per-row function y = x * a[e] + b[e]: padding rows become b[e] != 0, so a combine
    that read them would show."""
    e = first_expert + torch.repeat_interleave(torch.arange(tokens_per_expert.numel()), tokens_per_expert.long())
    return recv_x * a[e] + b[e]


def reference(ranks, a, b, case, world):
    """The contract in float64 with plain loops: per destination rank, recv_x, tokens_per_expert,
    grad_y; per source rank, out, grad_x, grad_w."""
    epr = case.experts_per_rank
    a, b = a.double(), b.double()
    slots = [[] for _ in range(world * epr)]  # per expert, (rank, token, slot) in (rank, token) order
    for r, (_, idx, _, _) in enumerate(ranks):
        for t in range(idx.shape[0]):
            for j in range(case.k):
                if idx[t, j] >= 0:
                    slots[int(idx[t, j])].append((r, t, j))
    kept = set()
    recv = []
    for d in range(world):
        rows, grad_y, tpe = [], [], []
        for e in range(d * epr, (d + 1) * epr):
            keep = slots[e] if case.capacity is None else slots[e][:case.capacity]
            kept.update(keep)
            for r, t, j in keep:
                x, _, w, g = ranks[r]
                rows.append(x[t].double())
                grad_y.append(w[t, j].double() * g[t].double())
            pad = math.ceil(len(keep) / case.pad_to) * case.pad_to - len(keep)
            rows += [torch.zeros(HIDDEN, dtype=torch.float64)] * pad
            grad_y += [torch.zeros(HIDDEN, dtype=torch.float64)] * pad
            tpe.append(len(keep) + pad)
        stack = lambda v: torch.stack(v) if v else torch.zeros(0, HIDDEN, dtype=torch.float64)  # noqa: E731
        recv.append((stack(rows), torch.tensor(tpe, dtype=torch.int32), stack(grad_y)))
    src = []
    for r, (x, idx, w, g) in enumerate(ranks):
        x, w, g = x.double(), w.double(), g.double()
        out, grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(w)
        for t in range(x.shape[0]):
            for j in range(case.k):
                if (r, t, j) in kept:
                    e = int(idx[t, j])
                    y = x[t] * a[e] + b[e]
                    out[t] += w[t, j] * y
                    grad_x[t] += w[t, j] * a[e] * g[t]
                    grad_w[t, j] = (y * g[t]).sum()
        src.append((out, grad_x, grad_w))
    return recv, src


def partial_reference(y, row_map, w, idx, experts_per_rank):
    """The partial combine in one process, bit for bit: for every token and destination rank, the
    unpermute of its kept slots there (w None: their plain sum), rounded to y's dtype; then the
    plain sum of those partials in the order of each destination's first kept slot."""
    T, k = row_map.shape
    dest = torch.where(row_map >= 0, idx.long() // experts_per_rank, -1)
    parts, first = [], torch.full((T, k), -1, dtype=torch.long)
    tokens = torch.arange(T)
    for n, d in enumerate(sorted(set(dest[dest >= 0].tolist()))):
        at_d = dest == d
        parts.append(moe_ext.unpermute(y, torch.where(at_d, row_map, -1), w))
        has = at_d.any(1)
        first[tokens[has], at_d.int().argmax(1)[has]] = n * T + tokens[has]
    stacked = torch.cat(parts) if parts else y.new_zeros((0, y.shape[1]))
    return moe_ext.unpermute(stacked, first)


def assert_near(actual, expected, tol, what):
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = 1 + (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def check_case(case, seed, group, me, world):
    """dispatch -> experts -> combine -> backward on this rank, against both references."""
    ranks, a, b = make_inputs(case, world, seed)
    num_experts, epr = world * case.experts_per_rank, case.experts_per_rank
    x0, idx, w0, grad_out = ranks[me]
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    recv_x, tpe, handle = moe_ext.dispatch(x, idx, w, num_experts, group=group, async_op=case.async_op,
                                           pad_to=case.pad_to, capacity=case.capacity)
    if case.async_op:
        assert handle.wait()
    y = experts(recv_x, tpe, me * epr, a, b)
    y.retain_grad()
    out = moe_ext.combine(y, handle)
    (out * grad_out).sum().backward()

    # Against the float64 reference: the layout exactly, values within the dtype's tolerance.
    recv, src = reference(ranks, a, b, case, world)
    recv_ref, tpe_ref, grad_y_ref = recv[me]
    out_ref, grad_x_ref, grad_w_ref = src[me]
    assert tpe.dtype == torch.int32 and torch.equal(tpe, tpe_ref), f"tokens_per_expert {tpe} != {tpe_ref}"
    assert recv_x.dtype == case.dtype and torch.equal(recv_x.double(), recv_ref), "recv_x differs from the reference"
    tol = TOL[case.dtype]
    assert out.dtype == case.dtype
    assert_near(out, out_ref, tol, "out")
    assert_near(y.grad, grad_y_ref, tol, "grad y")
    assert_near(x.grad, grad_x_ref, tol, "grad x")
    assert_near(w.grad, grad_w_ref, max(tol, TOL[w.dtype]), "grad w")

    # Bit for bit against permute -> unpermute on every rank's tokens in one process.
    X = torch.cat([r[0] for r in ranks]).requires_grad_()
    W = torch.cat([r[2] for r in ranks]).requires_grad_()
    IDX = torch.cat([r[1].long() for r in ranks])
    x_perm, row_map, tpe_all = moe_ext.permute(X, IDX, num_experts, pad_to=case.pad_to, capacity=case.capacity)
    y1 = experts(x_perm, tpe_all, 0, a, b)
    y1.retain_grad()
    out1 = moe_ext.unpermute(y1, row_map, W)
    (out1 * torch.cat([r[3] for r in ranks])).sum().backward()
    bounds = [0] + torch.cumsum(tpe_all.long(), 0).tolist()
    rows = slice(bounds[me * epr], bounds[(me + 1) * epr])
    t0 = sum(r[0].shape[0] for r in ranks[:me])
    toks = slice(t0, t0 + x0.shape[0])
    assert torch.equal(tpe, tpe_all[me * epr:(me + 1) * epr])
    for name, ours, single in [("recv_x", recv_x, x_perm[rows]), ("out", out, out1[toks]),
                               ("grad y", y.grad, y1.grad[rows]), ("grad x", x.grad, X.grad[toks]),
                               ("grad w", w.grad, W.grad[toks])]:
        assert torch.equal(ours, single), f"{name} is not bit-identical to the single-rank permute/unpermute"
    return recv_x.shape[0]


# ---- spawned worlds ------------------------------------------------------------------------------

def _world_checks(rank, world, seed):
    """Everything checked in one spawned world (spawning is the slow part)."""
    summary = {"cases": 0, "rows": 0}
    for i, case in enumerate(cases(world)):
        try:
            summary["rows"] += check_case(case, seed + 7919 * i, None, rank, world)
        except AssertionError as e:
            raise AssertionError(f"case {i} {case} (seed {seed + 7919 * i}): {e}") from e
        summary["cases"] += 1
    summary["describe"] = moe_ext.describe()
    summary["describe_cuda"] = moe_ext.describe(device="cuda")

    if world >= 3:  # a subgroup: rank numbering inside it differs from the global one
        members = [world - 1, 0]
        sub = dist.new_group(sorted(members))
        if rank in members:
            check_case(Case(k=2, experts_per_rank=2, dtype=torch.float32, capacity=2), seed + 1, sub,
                       dist.get_rank(sub), len(members))
            summary["subgroup"] = moe_ext.describe(sub)
        dist.barrier()

    if world > 1:
        x, idx, w = torch.randn(3, HIDDEN), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
        # num_experts not divisible by the world size: raised before any communication.
        with pytest.raises(ValueError, match="multiple of the group's world size"):
            moe_ext.dispatch(x, idx, w, world + 1)
        # One rank with another hidden size: every rank raises, nobody hangs.
        xh = torch.randn(3, HIDDEN + (rank == 0))
        with pytest.raises(ValueError, match=r"disagree on hidden \(rank 0: 9, rank 1: 8"):
            moe_ext.dispatch(xh, idx, w, world)
        # One rank with an expert id out of range: that rank says what, the others that it did.
        bad = torch.full((3, 1), world if rank == world - 1 else 0, dtype=torch.long)
        match = "outside" if rank == world - 1 else rf"rank\(s\) \[{world - 1}\] .* passed invalid inputs"
        with pytest.raises(ValueError, match=match):
            moe_ext.dispatch(x, bad, w, world)
        # requires_grad must agree, or a rank without the backward would leave the others waiting.
        with pytest.raises(ValueError, match="disagree on requires_grad"):
            moe_ext.dispatch(x.requires_grad_(rank == 0), idx, w, world)
        # The group is still in step after those errors.
        summary["rows"] += check_case(Case(k=1, experts_per_rank=1, dtype=torch.float32), seed, None, rank, world)
    return summary


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_dispatch_combine_world(world, seed):
    start = time.monotonic()
    results = run_world(_world_checks, world, seed, seed=seed, timeout_s=100)
    assert all(r["cases"] == len(cases(world)) for r in results)
    assert sum(r["rows"] for r in results) > 0
    if world == 1:
        assert results[0]["describe"].startswith("auto -> local")
    else:
        assert all(r["describe"].startswith("auto -> gloo") and f"{world} ranks" in r["describe"] for r in results)
        # Without a GPU (or a CUDA build) nothing moves CUDA tensors; with one, every rank shares it.
        assert all(("auto -> ipc" in r["describe_cuda"]) if torch.cuda.is_available() else
                   ("auto -> none" in r["describe_cuda"] and "CUDA" in r["describe_cuda"]) for r in results)
    if world >= 3:
        assert "2 ranks [0, " in results[0]["subgroup"]
    print(f"world {world}: {time.monotonic() - start:.1f} s")


def _scales_world(rank, world, seed):
    """x_scale over gloo: every received row's scale is the scale its token was sent with, in the
    exact layout (padding rows zero) and the masked one; ranks disagreeing on S all raise."""
    g = torch.Generator().manual_seed(seed * 31 + rank)
    T, k, E = [5, 0, 9, 4][rank], 2, 2 * world
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    w, scale = torch.rand(T, k, generator=g), torch.rand(T, 3, generator=g) + 0.5  # real scales are never 0
    x = torch.randn(T, HIDDEN, generator=g)
    x[:, 0] = rank * 1000 + torch.arange(T)  # each row names its source: rank * 1000 + token
    scales, routes = [None] * world, [None] * world
    dist.all_gather_object(scales, scale)
    dist.all_gather_object(routes, idx)
    mine = sum(int(((i >= rank * 2) & (i < rank * 2 + 2)).sum()) for i in routes)  # slots for my 2 experts
    for kw in (dict(pad_to=4), dict(sync=False, max_tokens=9)):
        recv, tpe, h = moe_ext.dispatch(x, idx, w, E, x_scale=scale, **kw)
        rows, s = recv.reshape(-1, HIDDEN), h.recv_x_scale
        assert s.dtype == torch.float32 and s.shape == (rows.shape[0], 3), (kw, s.shape)
        valid = torch.ones(rows.shape[0], dtype=torch.bool)
        if "max_tokens" in kw:  # masked: the rows below each expert's count
            valid = (torch.arange(recv.shape[1])[None, :] < tpe.long()[:, None]).reshape(-1)
        real = 0
        for r in valid.nonzero().squeeze(1).tolist():
            if (s[r] == 0).all():  # a padding row: zero in both
                assert (rows[r] == 0).all(), (kw, r)
                continue
            src, tok = divmod(int(rows[r, 0]), 1000)
            assert torch.equal(s[r], scales[src][tok]), (kw, r, src, tok)
            real += 1
        assert real == mine, (kw, real, mine)
    # Ranks disagreeing on S raise together (the count exchange compares it).
    with pytest.raises(ValueError, match="disagree on scale_cols"):
        moe_ext.dispatch(x, idx, w, E, x_scale=scale if rank else scale[:, :2])
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_x_scale_travels_with_its_rows(world, seed):
    assert all(run_world(_scales_world, world, seed, seed=seed, timeout_s=120))


def check_partial_case(case, seed, me, world, sync=True, grad_w=False):
    """dispatch(partial_combine=True) -> experts -> combine, and the backward to x (and to w with
    grad_w), against partial_reference on every rank's tokens in one process (bit for bit), the
    per-slot backward for w's gradient (bit for bit) and the float64 reference (within the dtype's
    tolerance)."""
    ranks, a, b = make_inputs(case, world, seed)
    num_experts, epr = world * case.experts_per_rank, case.experts_per_rank
    x0, idx, w0, grad_out = ranks[me]
    x = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_(grad_w)
    kw = dict(sync=False, max_tokens=24) if not sync else dict(pad_to=case.pad_to)
    recv_x, tpe, handle = moe_ext.dispatch(x, idx, w, num_experts, capacity=case.capacity, partial_combine=True, **kw)
    flat = recv_x.reshape(-1, HIDDEN)
    if sync:
        y = experts(flat, tpe, me * epr, a, b)
    else:  # masked: every expert's max_rows rows, the valid ones first
        e = me * epr + torch.arange(tpe.numel()).repeat_interleave(recv_x.shape[1])
        y = flat * a[e] + b[e]
    out = moe_ext.combine(y.view_as(recv_x), handle)
    (out * grad_out).sum().backward()

    X = torch.cat([r[0] for r in ranks])
    W = torch.cat([r[2] for r in ranks])
    IDX = torch.cat([r[1].long() for r in ranks])
    cap = case.capacity
    if not sync:
        cap = 24 * world if cap is None else min(cap, 24 * world)
    x_perm, row_map, tpe_all = moe_ext.permute(X, IDX, num_experts, pad_to=case.pad_to if sync else 1, capacity=cap)
    x_perm.requires_grad_()
    y1 = experts(x_perm, tpe_all, 0, a, b)
    # The gradient of y is the plain combine's (the partial one sends it back the same way).
    grad_y1 = ops.unpermute_backward(torch.cat([r[3] for r in ranks]), y1.detach(), row_map, W)[0]
    grad_xp = torch.autograd.grad(y1, x_perm, grad_y1)[0]
    out1 = partial_reference(y1.detach(), row_map, W, IDX, epr)
    grad_x1 = partial_reference(grad_xp, row_map, None, IDX, epr)
    t0 = sum(r[0].shape[0] for r in ranks[:me])
    toks = slice(t0, t0 + x0.shape[0])
    assert torch.equal(out, out1[toks]), "partial combine out is not bit-identical to partial_reference"
    assert torch.equal(x.grad, grad_x1[toks]), "partial dispatch backward is not bit-identical to partial_reference"
    _, src = reference(ranks, a, b, case, world)
    if sync:  # (the masked layout's max_rows cap is not in the float64 reference)
        assert_near(out, src[me][0], 2 * TOL[case.dtype], "partial out")
        assert_near(x.grad, src[me][1], 2 * TOL[case.dtype], "partial grad x")
    if grad_w:  # the dot products of the per-slot combine's backward, on the experts' ranks instead
        grad_w1 = ops.unpermute_backward(torch.cat([r[3] for r in ranks]), y1.detach(), row_map, W)[1]
        assert torch.equal(w.grad, grad_w1[toks]), "partial combine's w gradient differs from the per-slot one"
        if sync:
            assert_near(w.grad, src[me][2], 2 * TOL[case.dtype], "partial grad w")
    else:
        assert w.grad is None
    # One partial comes back per (token, destination rank) pair with a kept slot; a pair whose
    # slots were all dropped sends nothing.
    kept = row_map[toks] >= 0
    dest = IDX[toks] // epr
    pairs = torch.zeros(x0.shape[0], world, dtype=torch.bool)
    pairs[torch.arange(x0.shape[0]).unsqueeze(1).expand_as(dest)[kept], dest[kept]] = True
    routed = torch.zeros_like(pairs)
    routed[torch.arange(x0.shape[0]).unsqueeze(1).expand_as(dest)[IDX[toks] >= 0], dest[IDX[toks] >= 0]] = True
    if world > 1 and handle.backend in ("gloo", "nccl"):
        assert sum(handle.plan.partial_recv_splits) == int(pairs.sum()), "partials of dropped pairs came back"
    return int((routed & ~pairs).sum())


def _partial_world(rank, world, seed):
    dropped_pairs = 0
    for i, case in enumerate(cases(world)):
        for sync in (True, False):
            try:
                dropped_pairs += check_partial_case(case, seed + 7919 * i, rank, world, sync, grad_w=i % 2 == 0)
            except AssertionError as e:
                raise AssertionError(f"case {i} {case} sync={sync} (seed {seed + 7919 * i}): {e}") from e
    x, idx = torch.randn(3, HIDDEN), torch.zeros(3, 1, dtype=torch.long)
    w = torch.ones(3, 1, requires_grad=True)
    with torch.no_grad():  # a dispatch made without w's gradient cannot give it later
        y_, _, h = moe_ext.dispatch(x, idx, w, world, partial_combine=True)
    with pytest.raises(ValueError, match="dispatch was made while it did not"):
        moe_ext.combine(y_, h)
    with torch.no_grad():  # without a gradient for w it runs
        assert moe_ext.combine(y_, h).shape == (3, HIDDEN)
    if world > 1:  # every rank must pass the same partial_combine, and agree on w's gradient
        with pytest.raises(ValueError, match="disagree on partial_combine"):
            moe_ext.dispatch(x, idx, w.detach(), world, partial_combine=rank == 0)
        with pytest.raises(ValueError, match="disagree on partial_combine"):
            moe_ext.dispatch(x, idx, w if rank == 0 else w.detach(), world, partial_combine=True)
    return dropped_pairs


@pytest.mark.parametrize("world", [1, 2, 3])
def test_partial_combine_world(world, seed):
    dropped_pairs = run_world(_partial_world, world, seed, seed=seed, timeout_s=150)
    # (the cases' capacities drop every slot of some (token, rank) pair: that path ran)
    assert world == 1 or sum(dropped_pairs) > 0


def _missing_peer(rank, world, pg_timeout_s, done_dir):
    """The last rank never calls dispatch; it waits until the others have failed, then leaves."""
    if rank == world - 1:
        deadline = time.monotonic() + pg_timeout_s + 20
        while len(os.listdir(done_dir)) < world - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    x, idx, w = torch.randn(4, HIDDEN), torch.randint(world, (4, 2)), torch.rand(4, 2)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as err:
            moe_ext.dispatch(x, idx, w, world)
        return time.monotonic() - start, str(err.value)
    finally:
        open(os.path.join(done_dir, str(rank)), "w").close()


def test_missing_peer_raises_after_the_group_timeout(tmp_path, seed):
    world, pg_timeout_s = 3, 2.0
    results = run_world(_missing_peer, world, pg_timeout_s, str(tmp_path), seed=seed, timeout_s=60,
                        pg_timeout_s=pg_timeout_s)
    for elapsed, message in results[:-1]:
        assert elapsed < pg_timeout_s + 3, f"took {elapsed:.1f} s to fail"
        assert "moe_ext.dispatch" in message and "global ranks [0, 1, 2]" in message, message
        assert "no header arrived from global rank(s) [2]" in message, message
        assert "init_process_group(timeout=...)" in message, message


# ---- a world of one in this process ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_world_of_one_without_process_group(dtype, seed):
    assert not dist.is_initialized()
    for i, case in enumerate([Case(k=2, experts_per_rank=3, dtype=dtype),
                              Case(k=4, experts_per_rank=4, dtype=dtype, pad_to=4, capacity=2, async_op=True),
                              Case(k=1, experts_per_rank=2, dtype=dtype, skew=True)]):
        check_case(case, seed + i, None, 0, 1)
    assert moe_ext.describe().startswith("auto -> local")


def test_world_of_one_takes_strided_rows(seed):
    """x with a non-unit last stride: moved like its contiguous copy, as over W > 1 ranks (the world
    of one went straight to permute, which needs stride 1, and raised)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(7, 32, generator=g, requires_grad=True)
    idx, w = torch.randint(-1, 4, (7, 2), generator=g), torch.rand(7, 2, generator=g)
    recv, tpe, h = moe_ext.dispatch(wide[:, ::2], idx, w, 4)
    want, want_tpe, h2 = moe_ext.dispatch(wide.detach()[:, ::2].contiguous(), idx, w, 4)
    assert torch.equal(recv, want) and torch.equal(tpe, want_tpe)
    moe_ext.combine(recv * 2, h).sum().backward()
    assert torch.equal(wide.grad[:, 1::2], torch.zeros(7, 16)) and wide.grad[:, ::2].abs().sum() > 0


def test_bad_inputs():
    x, idx, w = torch.randn(4, HIDDEN), torch.randint(4, (4, 2)), torch.rand(4, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        moe_ext.dispatch(x, idx, w, 4, backend="mpi")
    for backend in ("ipc", "nccl"):
        with pytest.raises(ValueError, match="moves CUDA tensors"):
            moe_ext.dispatch(x, idx, w, 4, backend=backend)
    with pytest.raises(ValueError, match="w must have the shape of idx"):
        moe_ext.dispatch(x, idx, w[:, :1], 4)
    with pytest.raises(ValueError, match="w must be float32"):
        moe_ext.dispatch(x, idx, w.to(torch.float16), 4)
    with pytest.raises(ValueError, match="idx must be"):
        moe_ext.dispatch(x, idx[:3], w[:3], 4)
    with pytest.raises(ValueError, match="outside"):
        moe_ext.dispatch(x, torch.full_like(idx, 4), w, 4)
    with pytest.raises(ValueError, match="pad_to"):
        moe_ext.dispatch(x, idx, w, 4, pad_to=0)
    with pytest.raises(ValueError, match="multiple of the group's world size 4"):
        expert_placement(6, 4)
    assert [t.tolist() for t in expert_placement(6, 3)] == [[0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1]]
    recv_x, _, handle = moe_ext.dispatch(x, idx, w, 4)
    with pytest.raises(ValueError, match="y must be"):
        moe_ext.combine(recv_x[1:], handle)
    with pytest.raises(TypeError, match="DispatchHandle"):
        moe_ext.combine(recv_x, None)
    # Device rules, without a GPU: decided from the device alone.
    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="'gloo' needs CPU tensors"):
        _select_backend("gloo", cuda, 2)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="visible CUDA device"):
            _select_backend("auto", cuda, 2)
    assert _select_backend("auto", cuda, 1) == "local"
    assert _select_backend("auto", "cpu", 4) == "gloo"
