"""The CUDA kernels without tensor-core TMA / wgmma code (gating, permute / unpermute, the
portable grouped GEMM, the ipc backend's dispatch / combine), run without a GPU on the CPU
emulation (tests/emu): the kernels' own code and launchers, against the CPU ops and the float64
references, on the grids of the GPU suites.

What this checks that the nvcc compile check cannot: the kernels' indexing and arithmetic, their
launch configurations, that every __syncthreads / warp-synchronous op is reached by every thread
or lane it names (a miss is reported as a deadlock), that results do not depend on the order in
which blocks and threads run (the emulation shuffles both; determinism tests run each input
twice), that no kernel writes outside its outputs (guard bytes) or touches memory outside any
buffer (the AddressSanitizer run), and the ipc protocol between emulated ranks (host threads).
What it cannot: speed, the memory model, the Hopper kernels (TMA + wgmma), CUDA IPC, NCCL, the
op adapters and the Python CUDA paths; those wait for the GPU suites (tests/test_cuda_*.py).
"""
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

import reference as ref

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or platform.system() != "Linux",
                                reason="the kernel emulation runs on x86-64 Linux")

ops = torch.ops.moe_ext
FLOAT_TOL = dict(rtol=1e-5, atol=1e-7)
F64_TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def emu():
    from emu import emu as e
    e.lib()
    yield e
    e.set_device()


@pytest.fixture
def small_gpu(emu):
    """A GPU with 3 SMs and 99 KiB of shared memory per block (sm_86's opt-in limit)."""
    emu.set_device(sms=3, smem_optin=99 * 1024)
    yield
    emu.set_device()


# ---- gating ------------------------------------------------------------------------------------------

def _draw(*a, **kw):
    from test_cuda_gating import draw_logits
    return draw_logits(*a, **kw)


def _gating_args(opts):
    return dict(score=opts.get("score", "softmax"), renormalize=opts.get("renormalize", True),
                expert_bias=opts.get("expert_bias"), num_groups=opts.get("num_groups") or 0,
                topk_groups=opts.get("topk_groups") or 0, capacity_factor=opts.get("capacity_factor") or 0.0,
                noise=opts.get("noise"), seq_len=opts.get("seq_len") or 0)


def compare_gating(emu, logits, k, against_reference=True, **opts):
    a = _gating_args(opts)
    w, idx, pos, tpe, aux, seq, z = emu.topk_gating(logits, k, **a)
    cw, cidx, cpos, ctpe, caux, cseq, cz = ops.topk_gating(logits, k, a["score"], a["renormalize"], a["expert_bias"],
                                                           a["num_groups"], a["topk_groups"], a["capacity_factor"],
                                                           a["noise"], a["seq_len"])
    f64 = logits.dtype == torch.float64
    tol = F64_TOL if f64 else FLOAT_TOL
    assert torch.equal(idx, cidx)
    assert torch.equal(pos, cpos)
    assert torch.equal(tpe, ctpe)
    torch.testing.assert_close(w, cw, **tol)
    for name, x, y in (("aux_loss", aux, caux), ("seq_aux_loss", seq, cseq), ("z_loss", z, cz)):
        torch.testing.assert_close(x, y, **tol, msg=name)
    if against_reference:
        r = ref.gating(logits, k, **opts)
        assert torch.equal(idx.long(), r["idx"])
        assert torch.equal(pos.long(), r["positions"])
        assert torch.equal(tpe.long(), r["tokens_per_expert"])
        rtol = F64_TOL if f64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.double(), r["weights"], **rtol)
    return w, idx, pos, tpe, (aux, seq, z)


def _combos():
    from test_cuda_gating import COMBOS
    return [c[:-1] + ((128 if c[-1] else None),) for c in COMBOS]  # shorter sequences: T is 384 here


@pytest.mark.parametrize("score,renorm,bias,groups,cf,noise,seq_len", _combos(), ids=lambda v: str(v))
def test_gating_every_option_combination(emu, seed, score, renorm, bias, groups, cf, noise, seq_len):
    T, E, k = 384, 64, 6
    opts = dict(score=score, renormalize=renorm, capacity_factor=cf, seq_len=seq_len)
    if bias:
        opts["expert_bias"] = torch.randn(E) * 0.05
    if groups:
        opts.update(num_groups=8, topk_groups=3)
    if noise:
        opts["noise"] = torch.randn(T, E) * 0.5
    compare_gating(emu, _draw(T, E, k, **opts), k, against_reference=False, **opts)


@pytest.mark.parametrize("T", [0, 1, 7, 1100])
@pytest.mark.parametrize("k", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("E", [8, 60, 64, 128, 256, 384])
@pytest.mark.parametrize("optset", ["plain", "full"])
def test_gating_shapes(emu, seed, optset, E, k, T):
    from test_cuda_gating import _full_options
    opts = {} if optset == "plain" else _full_options(T, E, k)
    if opts and T == 1100:
        opts["seq_len"] = 275
    compare_gating(emu, _draw(T, E, k, **opts), k, against_reference=T < 1100, **opts)


@pytest.mark.parametrize("E,k,groups", [(1, 1, None), (2, 1, None), (2, 2, None), (2, 1, (2, 1)), (3, 2, None),
                                        (33, 5, (3, 2)), (1000, 16, (8, 3)), (1024, 32, (32, 4)), (1024, 8, (4, 1)),
                                        (517, 9, None)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gating_other_sizes(emu, seed, E, k, groups, score):
    T = 201
    opts = dict(score=score, capacity_factor=1.0, seq_len=67, expert_bias=torch.randn(E) * 0.01)
    if groups:
        opts.update(num_groups=groups[0], topk_groups=groups[1])
    compare_gating(emu, _draw(T, E, k, **opts), k, **opts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float32])
@pytest.mark.parametrize("E,k", [(256, 8), (60, 6), (1024, 4)])
def test_gating_logits_dtypes(emu, seed, dtype, E, k):
    from test_cuda_gating import _full_options
    T = 300
    opts = _full_options(T, E, k)
    opts["seq_len"] = 100
    if dtype == torch.float64:
        opts["noise"] = opts["noise"].double()
        opts["expert_bias"] = opts["expert_bias"].double()
    compare_gating(emu, _draw(T, E, k, dtype=dtype, **opts), k, **opts)


def test_gating_small_gpu(emu, small_gpu, seed):
    # Fewer warps per block where the shared-memory budget is short (E=1024 float64), few SMs.
    for dtype, E, k in ((torch.float64, 1024, 8), (torch.float32, 1024, 32), (torch.bfloat16, 384, 6)):
        opts = dict(score="sigmoid", capacity_factor=1.1, seq_len=40, num_groups=8, topk_groups=3,
                    expert_bias=torch.randn(E, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * 0.01)
        compare_gating(emu, _draw(120, E, k, dtype=dtype, **opts), k, **opts)


def test_gating_ties_nan_inf(emu):
    _, idx, *_ = compare_gating(emu, torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]]), 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    _, idx, *_ = compare_gating(emu, torch.zeros(3, 64), 8, num_groups=8, topk_groups=4, score="sigmoid")
    assert idx[0].tolist() == list(range(8))
    logits = torch.randn(40, 32)
    logits[3, 5] = float("nan")
    logits[7, :] = float("nan")
    logits[9, 2] = float("inf")
    logits[11, :] = -float("inf")
    for score in ("softmax", "sigmoid"):
        w, idx, pos, tpe, aux, seq, z = emu.topk_gating(logits, 4, score=score, capacity_factor=1.0)
        c = ops.topk_gating(logits, 4, score, True, None, 0, 0, 1.0, None, 0)
        assert torch.equal(idx, c[1]) and torch.equal(pos, c[2]) and torch.equal(tpe, c[3])
        torch.testing.assert_close(w, c[0], equal_nan=True, **FLOAT_TOL)
        torch.testing.assert_close(z, c[6], equal_nan=True)


def test_gating_all_tokens_one_expert(emu, seed):
    T, E, k = 1500, 16, 2
    logits = _draw(T, E, k)
    logits[:, 3] += 30
    _, idx, pos, tpe, _ = compare_gating(emu, logits, k, capacity_factor=1.0, against_reference=False)
    cap = math.ceil(T * k / E)
    assert tpe[3].item() == cap
    assert (idx[cap:, 0] == -1).all() and pos[:cap, 0].tolist() == list(range(cap))


def test_gating_deterministic(emu, seed):
    # Every launch runs its blocks and threads in a new random order.
    T, E, k = 700, 256, 8
    opts = dict(score="sigmoid", capacity_factor=0.9, seq_len=350, num_groups=8, topk_groups=4,
                expert_bias=torch.randn(E) * 0.02, noise=torch.randn(T, E) * 0.2)
    logits = _draw(T, E, k, **opts)
    a = emu.topk_gating(logits, k, **_gating_args(opts))
    b = emu.topk_gating(logits, k, **_gating_args(opts))
    for x, y in zip(a, b):
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
    gw = torch.randn(T, k)
    args = _gating_args(opts)
    del args["capacity_factor"], args["noise"]
    g1 = emu.topk_gating_backward(gw, 0.3, 0.2, 0.1, logits, opts["noise"], a[1], **args)
    g2 = emu.topk_gating_backward(gw, 0.3, 0.2, 0.1, logits, opts["noise"], a[1], **args)
    assert torch.equal(g1, g2)


def test_gating_launch_shapes_agree(emu, seed):
    """GatingProblem's tuning knobs (rows per tile, warps per routing block; bench_gating sweeps
    them) move no routing decision: idx, positions, counts and weights equal the default launch's
    bits, the losses (other summation orders) agree to rounding, and so does the backward."""
    T, E, k = 1000, 256, 8
    opts = dict(score="sigmoid", capacity_factor=0.9, seq_len=500, num_groups=8, topk_groups=4,
                expert_bias=torch.randn(E) * 0.02)
    logits = _draw(T, E, k, **opts)
    args = _gating_args(opts)
    bargs = {n: v for n, v in args.items() if n not in ("capacity_factor", "noise")}
    gw = torch.randn(T, k)
    want = emu.topk_gating(logits, k, **args)
    want_g = emu.topk_gating_backward(gw, 0.3, 0.2, 0.1, logits, None, want[1], **bargs)
    try:
        for rows, warps in [(8, 8), (16, 3), (32, 1), (64, 8)]:
            emu.gating_tuning(rows, warps)
            got = emu.topk_gating(logits, k, **args)
            for name, a, b in zip(("weights", "idx", "positions", "tokens_per_expert"), got[:4], want[:4]):
                assert torch.equal(a, b), f"{name} differs with {rows} rows per tile, {warps} warps"
            for a, b in zip(got[4:], want[4:]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
            g = emu.topk_gating_backward(gw, 0.3, 0.2, 0.1, logits, None, got[1], **bargs)
            torch.testing.assert_close(g, want_g, rtol=1e-6, atol=1e-9)
        for rows, warps, name in [(5, 0, "tile_rows"), (0, 9, "route_warps")]:
            emu.gating_tuning(rows, warps)
            with pytest.raises(emu.EmuError, match=name):
                emu.topk_gating(logits, k, **args)
    finally:
        emu.gating_tuning(0, 0)


BACKWARD_OPTS = [
    dict(),
    dict(capacity_factor=0.75),
    dict(num_groups=4, topk_groups=2, expert_bias="rand"),
    dict(seq_len=64, noise="rand"),
    dict(capacity_factor=0.9, num_groups=4, topk_groups=3, expert_bias="rand", seq_len=128, noise="rand"),
]


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("opts", BACKWARD_OPTS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("dtype,E,k", [(torch.float32, 256, 8), (torch.float32, 60, 6), (torch.float64, 60, 6),
                                       (torch.bfloat16, 64, 2), (torch.float16, 1024, 16)])
def test_gating_backward_matches_cpu(emu, seed, score, renorm, opts, dtype, E, k):
    T = 256
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    opts = dict(opts)
    if opts.get("expert_bias") == "rand":
        opts["expert_bias"] = torch.randn(E, dtype=acc) * 0.05
    if opts.get("noise") == "rand":
        opts["noise"] = torch.randn(T, E, dtype=acc) * 0.3
    opts.update(score=score, renormalize=renorm)
    logits = _draw(T, E, k, dtype=dtype, **opts)
    args = _gating_args(opts)
    c = ops.topk_gating(logits, k, args["score"], args["renormalize"], args["expert_bias"], args["num_groups"],
                        args["topk_groups"], args["capacity_factor"], args["noise"], args["seq_len"])
    idx = c[1]
    gw = torch.randn(T, k, dtype=acc)
    coefs = [torch.tensor(v, dtype=acc) for v in (0.3, 0.7, 0.1)]
    del args["capacity_factor"]
    noise = args.pop("noise")
    g = emu.topk_gating_backward(gw, *coefs, logits, noise, idx, **args)
    cg = ops.topk_gating_backward(gw, *coefs, logits, noise, idx, args["score"], args["renormalize"],
                                  args["expert_bias"], args["num_groups"], args["topk_groups"], args["seq_len"])
    tol = F64_TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    if dtype in (torch.bfloat16, torch.float16):
        tol = dict(rtol=1e-2, atol=1e-3)  # the gradient is rounded to the logits' type
    torch.testing.assert_close(g, cg, **tol)


def test_update_expert_bias(emu, seed):
    E = 300
    bias = torch.randn(E)
    load = torch.randint(0, 50, (E,))
    load[7] = int(load.float().mean().round())
    expect = bias.clone()
    ops.update_expert_bias_(expect, load, 0.01)
    got = emu.update_expert_bias_(bias.clone(), load, 0.01)
    assert torch.equal(got, expect)


def test_route_to_replicas(emu, seed):
    # The one-block replica choice: the CPU op's slots for every (token, slot), int32 and int64 ids,
    # up to its 2048 slots; poisoned outputs.
    from moe_ext.parallel import ExpertLayout
    for ranks, per_rank, T, k in ((1, 4, 0, 2), (2, 3, 1, 1), (4, 3, 300, 4), (8, 5, 256, 8), (3, 4, 2048, 1)):
        E = ranks * per_rank - (ranks > 1)  # with several ranks the first expert gets a second replica
        layout = ExpertLayout.build([[(r * per_rank + j) % E for j in range(per_rank)] for r in range(ranks)], E,
                                    ranks)
        for dtype in (torch.int32, torch.int64):
            idx = torch.randint(-1, E, (T, k), dtype=dtype)
            if T > 4:
                idx[: T // 2, 0] = 0  # a hot expert with replicas
            for rank in range(ranks):
                want = ops.route_to_replicas(idx, layout.replica_counts, layout.replica_slots, rank)
                got = emu.route_to_replicas(idx, layout.replica_counts, layout.replica_slots, rank)
                assert got.dtype == dtype and torch.equal(got, want), (ranks, T, k, rank)


@pytest.mark.parametrize("E", [1, 8, 255, 256, 300])
def test_accumulate_load(emu, seed, E):
    # The layer's load statistics in one launch: the same bits as the CPU op, which the Python
    # reference below reproduces (float ops in Python round each product and sum).
    load = torch.randint(0, 10 ** 6, (E,))
    ema = torch.rand(E + 1, dtype=torch.float64) * 100
    tpe = torch.randint(0, 5000, (E,), dtype=torch.int32)
    for decay in (0.9, 0.0, 0.37):
        want_load, want_ema = load.clone(), ema.clone()
        ops.accumulate_load_(want_load, want_ema, tpe, decay)
        got_load, got_ema = emu.accumulate_load_(load.clone(), ema.clone(), tpe, decay)
        assert torch.equal(got_load, want_load) and torch.equal(got_ema, want_ema)
        w = 1.0 - decay
        ref = [float(m) * decay + float(t) * w for m, t in zip(ema[:E].tolist(), tpe.tolist())]
        ref.append(float(ema[E]) * decay + w)
        assert want_ema.tolist() == ref and torch.equal(want_load, load + tpe)


# ---- permute / unpermute -----------------------------------------------------------------------------

def _route(T, k, E, dtype=torch.int64, unrouted=0.1, skew=False):
    if skew:
        idx = torch.zeros(T, k, dtype=torch.int64)
        idx[:, 1:] = torch.randint(0, E, (T, k - 1))
        idx = torch.where(torch.rand(T, k) < 0.7, torch.zeros_like(idx), idx)
    else:
        idx = torch.stack([torch.randperm(E)[:k] if k <= E else torch.randint(0, E, (k,)) for _ in range(T)]) \
            if T else torch.empty(0, k, dtype=torch.int64)
    if T and unrouted:
        idx[torch.rand(T, k) < unrouted] = -1
    return idx.to(dtype)


def _rows(T, H, dtype):
    if dtype == torch.uint8:  # e.g. float8 rows: moved as bytes
        return torch.randint(0, 256, (T, H), dtype=torch.uint8)
    return torch.randn(T, H, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.float64])
@pytest.mark.parametrize("T", [0, 1, 3, 1100])
@pytest.mark.parametrize("H", [8, 40, 136])
@pytest.mark.parametrize("k,E", [(1, 1), (2, 8), (8, 256), (3, 5)])
def test_permute_matches_cpu(emu, seed, dtype, T, H, k, E):
    for pad_to, capacity, idx_dtype, skew in ((1, -1, torch.int64, False), (16, -1, torch.int32, True),
                                             (128, max(1, T * k // (2 * E)), torch.int64, True)):
        idx = _route(T, k, E, idx_dtype, skew=skew and E > 1)
        x = _rows(T, H, dtype)
        xp, rm, tpe, total, invalid = emu.permute(x, idx, E, pad_to, capacity, exact=True)
        cx, crm, ctpe = ops.permute(x, idx, E, pad_to, capacity, True)
        assert torch.equal(rm, crm) and torch.equal(tpe, ctpe)
        assert total == cx.shape[0] and invalid == 0
        assert torch.equal(xp.view(torch.uint8), cx.view(torch.uint8))
        # The worst-case (no-sync) size: the same rows, then zeros.
        xw, rmw, tpew, _, _ = emu.permute(x, idx, E, pad_to, capacity, exact=False)
        assert torch.equal(rmw, crm) and torch.equal(tpew, ctpe)
        assert torch.equal(xw[:total].view(torch.uint8), cx.view(torch.uint8))
        assert (xw[total:].view(torch.uint8) == 0).all()


@pytest.mark.parametrize("sms", [2, 132])
def test_permute_masked_layout_matches_cpu(emu, seed, sms):
    # The masked layout (max_rows): each expert's segment max_rows long from e * max_rows, its
    # unused rows zero (the outputs are poisoned first), kept rows in tokens_per_expert.
    emu.set_device(sms=sms)
    try:
        for T, H, k, E, max_rows, cap, skew in ((0, 8, 2, 4, 3, -1, False), (1, 40, 1, 1, 1, -1, False),
                                                (300, 16, 8, 64, 40, -1, True), (5000, 8, 2, 8, 5000, -1, True),
                                                (700, 24, 4, 13000, 2, 1, False), (257, 136, 2, 5, 60, 90, True)):
            idx = _route(T, k, E, skew=skew and E > 1)
            x = _rows(T, H, torch.bfloat16)
            xp, rm, tpe, total, invalid = emu.permute(x, idx, E, 1, cap, exact=False, max_rows=max_rows)
            cx, crm, ctpe = ops.permute(x, idx, E, 1, cap, True, max_rows)
            assert xp.shape == (E * max_rows, H) and total == E * max_rows and invalid == 0
            assert torch.equal(rm, crm) and torch.equal(tpe, ctpe)
            assert torch.equal(xp.view(torch.uint8), cx.view(torch.uint8))
    finally:
        emu.set_device()


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_permute_small_index_equals_general(emu, seed, idx_dtype):
    # Calls of <= 2048 slots (decode) index in one block: every output, the row count and the
    # invalid-id count equal the multi-kernel index's and the CPU op's, for every layout option.
    cases = ((0, 4, 1, -1, -1), (1, 1, 1, -1, -1), (128, 8, 1, -1, -1), (256, 8, 16, 3, -1), (2048, 1, 128, -1, -1),
             (100, 2, 1, -1, 7), (100, 2, 1, 4, 7), (700, 2, 8, 50, -1), (31, 3, 4, 0, -1))
    for (T, k, pad_to, cap, max_rows), E in zip(cases, (8, 256, 13, 10240, 1, 3, 64, 10241, 5)):
        idx = _route(T, k, E, idx_dtype, skew=E > 1)
        if T > 2:
            idx[1, 0], idx[2, k - 1] = E, -7  # out of range: not routed, and counted
        x = _rows(T, 24, torch.bfloat16)
        small = emu.permute(x, idx, E, pad_to, cap, exact=True, max_rows=max_rows)
        general = emu.permute(x, idx, E, pad_to, cap, exact=True, max_rows=max_rows, small_index=False)
        for a, b in zip(small[:3], general[:3]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert small[3:] == general[3:] and small[4] == (2 if T > 2 else 0)
        clean = idx.clone()
        clean[(clean < -1) | (clean >= E)] = -1
        cx, crm, ctpe = ops.permute(x, clean, E, pad_to, cap, True, max_rows)
        assert torch.equal(small[1], crm) and torch.equal(small[2], ctpe)
        assert torch.equal(small[0].view(torch.uint8), cx.view(torch.uint8))


def test_permute_strided_rows_and_invalid_ids(emu, seed):
    T, H, k, E = 500, 48, 4, 32
    big = torch.randn(T, 2 * H).bfloat16()
    x = big[:, 8:8 + H]  # rows 2H apart, 16-byte aligned start
    idx = _route(T, k, E)
    xp, rm, tpe, total, invalid = emu.permute(x, idx, E, 8, -1)
    cx, crm, ctpe = ops.permute(x.contiguous(), idx, E, 8, -1, True)
    assert torch.equal(xp.view(torch.int16), cx.view(torch.int16)) and torch.equal(rm, crm)
    x = big[:, 1:1 + H]  # 2-byte aligned: the narrowest access
    xp, rm, *_ = emu.permute(x, idx, E, 8, -1)
    cx, crm, _ = ops.permute(x.contiguous(), idx, E, 8, -1, True)
    assert torch.equal(xp.view(torch.int16), cx.view(torch.int16))
    # Ids outside [-1, E) count nowhere, get row -1, and are counted.
    bad = idx.clone()
    bad[0, 0], bad[5, 2], bad[9, 1] = E, -5, 10 ** 6
    xp, rm, tpe, total, invalid = emu.permute(torch.randn(T, H), bad, E, 1, -1)
    assert invalid == 3 and rm[0, 0] == -1 and rm[5, 2] == -1 and rm[9, 1] == -1
    ok = bad.clone()
    ok[0, 0] = ok[5, 2] = ok[9, 1] = -1
    _, crm, ctpe = ops.permute(torch.randn(T, H), ok, E, 1, -1, True)
    assert torch.equal(rm, crm) and torch.equal(tpe, ctpe)


@pytest.mark.parametrize("sms", [1, 3, 132])
def test_permute_many_tiles_and_experts(emu, seed, sms):
    # Tiles of several 1024-slot chunks (few SMs), experts past the shared-memory histogram.
    emu.set_device(sms=sms)
    try:
        for T, k, E in ((5000, 8, 64), (300, 2, 13000), (4097, 1, 1)):
            idx = _route(T, k, E, skew=E > 1)
            x = torch.randn(T, 16)
            xp, rm, tpe, total, _ = emu.permute(x, idx, E, 4, -1)
            cx, crm, ctpe = ops.permute(x, idx, E, 4, -1, True)
            assert torch.equal(rm, crm) and torch.equal(tpe, ctpe) and torch.equal(xp, cx)
            cap = max(1, T * k // E)
            xp, rm, tpe, total, _ = emu.permute(x, idx, E, 1, cap)
            cx, crm, ctpe = ops.permute(x, idx, E, 1, cap, True)
            assert torch.equal(rm, crm) and torch.equal(tpe, ctpe) and torch.equal(xp, cx)
    finally:
        emu.set_device()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("H", [8, 40, 1000, 2056])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 11])  # 4, 4, 2 and 1 column vectors per lane; 11: not hoisted
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_matches_cpu(emu, seed, dtype, H, k, weighted):
    T, E = 67, 16
    idx = _route(T, k, E)
    _, row_map, _ = ops.permute(torch.randn(T, 8), idx, E, 4, -1, True)
    R = int(row_map.max()) + 1 if T else 0
    y = _rows(R + 3, H, dtype)
    w = torch.rand(T, k, dtype=torch.float64 if dtype == torch.float64 else torch.float32) if weighted else None
    out = emu.unpermute(y, row_map, w)
    assert torch.equal(out, ops.unpermute(y, row_map, w))
    g = _rows(T, H, dtype)
    gy, gw = emu.unpermute_backward(g, y, row_map, w)
    cgy, cgw = ops.unpermute_backward(g, y, row_map, w)
    assert torch.equal(gy, cgy)
    if weighted:  # the CPU op adds the dot products in the kernel's lane order: the same bits
        assert torch.equal(gw, cgw)


def test_unpermute_strided_empty_and_poison(emu, seed):
    T, H, k = 50, 64, 2
    row_map = torch.full((T, k), -1, dtype=torch.int64)
    row_map.view(-1)[torch.randperm(T * k)[:30]] = torch.randperm(40)[:30]  # each row at most once
    big = torch.randn(40, 3 * H)
    y = big[:, :H]  # rows 3H apart
    w = torch.rand(T, k)
    assert torch.equal(emu.unpermute(y, row_map, w), ops.unpermute(y.contiguous(), row_map, w))
    g = torch.randn(T, H)
    gy, gw = emu.unpermute_backward(g, y, row_map, w)
    cgy, cgw = ops.unpermute_backward(g, y.contiguous(), row_map, w)
    assert torch.equal(gy, cgy)
    # y's rows lie 3H apart there, y.contiguous() here: both 16-byte aligned, the same lane order.
    assert torch.equal(gw, cgw)
    out = emu.unpermute(y, row_map, w, poison_if=1)
    assert out.isnan().all()
    assert torch.equal(emu.unpermute(y, row_map, w, poison_if=0), ops.unpermute(y.contiguous(), row_map, w))
    # Zero tokens, zero rows.
    assert emu.unpermute(torch.randn(0, H), torch.empty(0, k, dtype=torch.int64), None).shape == (0, H)
    gy, _ = emu.unpermute_backward(torch.randn(T, H), torch.randn(0, H), torch.full((T, k), -1), w)
    assert gy.shape == (0, H)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("rows,n", [(1, 1), (9, 3), (33, 8), (20, 72), (3, 1000), (0, 8), (5, 0)])
def test_swiglu_backward_matches_cpu(emu, seed, dtype, rows, n):
    """The same operations as the CPU op, the same exp: bit-identical, on the 16-byte vector path
    (n a multiple of 16 bytes of h) and the scalar one."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, 2 * n, generator=gen) * 4).to(dtype)
    g = torch.randn(rows, n, generator=gen).to(dtype)
    assert torch.equal(emu.swiglu_backward(g, h), ops.swiglu_backward(g, h))
    if dtype in (torch.bfloat16, torch.float16):  # a float32 gradient (the row-scale path)
        g32 = torch.randn(rows, n, generator=gen)
        assert torch.equal(emu.swiglu_backward(g32, h), ops.swiglu_backward(g32, h))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("rows,n", [(1, 1), (9, 3), (33, 8), (20, 72), (3, 1000), (0, 8), (5, 0)])
def test_swiglu_matches_cpu(emu, seed, dtype, rows, n):
    """The forward: the same operations as the CPU op, bit-identical on both paths."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, 2 * n, generator=gen) * 4).to(dtype)
    assert torch.equal(emu.swiglu(h), ops.swiglu(h))
    h = torch.tensor([[-1e4, 0.0, 88.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0]])
    got, want = emu.swiglu(h), ops.swiglu(h)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_swiglu_backward_views_and_extremes(emu):
    wide = torch.randn(16, 2 * 24 + 5)
    h = wide[:, 2:50]  # a strided view (the wrapper copies it, as the adapter does)
    g = torch.randn(16, 24)
    assert torch.equal(emu.swiglu_backward(g, h), ops.swiglu_backward(g, h))
    h = torch.tensor([[-1e4, 0.0, 88.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0]])
    got = emu.swiglu_backward(torch.ones(1, 4), h)
    want = ops.swiglu_backward(torch.ones(1, 4), h)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_permute_deterministic(emu, seed):
    T, k, E = 3000, 8, 64
    idx = _route(T, k, E, skew=True)
    x = torch.randn(T, 24)
    a = emu.permute(x, idx, E, 16, 200)
    b = emu.permute(x, idx, E, 16, 200)
    assert all(torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q for p, q in zip(a, b))


# ---- the ipc backend (ep.cu, ep_index.cu, comm/ep_ops.cu) over emulated ranks -------------------

def _ep_world(emu, xs, idxs, num_experts, scale_cols=0, max_tokens=None):
    k = idxs[0].shape[1]
    maxT = max_tokens or max(1, max(x.shape[0] for x in xs))
    return emu.EpWorld(len(xs), num_experts, k, maxT, xs[0].shape[1] * xs[0].element_size(), scale_cols)


def _single_process(xs, idxs, ws, gs, num_experts, pad_to, capacity, fn):
    """permute -> fn -> unpermute (and its backward) on every rank's tokens in one process."""
    X, IDX, W = torch.cat(xs), torch.cat([i.long() for i in idxs]), torch.cat(ws)
    x_perm, row_map, tpe = ops.permute(X, IDX, num_experts, pad_to, -1 if capacity is None else capacity, True)
    y = fn(x_perm, tpe, 0)
    out = ops.unpermute(y, row_map, W)
    grad_y, _ = ops.unpermute_backward(torch.cat(gs), y, row_map, W)
    return x_perm, tpe, y, out, grad_y


def _check_ep_case(emu, world, xs, idxs, ws, gs, a, b, num_experts, pad_to=1, capacity=None, num_blocks=0,
                   max_tokens=None):
    from test_dispatch import experts
    epr = num_experts // world
    fn = lambda x, t, first: experts(x, t, first, a, b)  # noqa: E731
    x_perm, tpe_all, y_all, out_all, grad_y_all = _single_process(xs, idxs, ws, gs, num_experts, pad_to, capacity, fn)
    bounds = [0] + torch.cumsum(tpe_all.long(), 0).tolist()
    ep = _ep_world(emu, xs, idxs, num_experts, max_tokens=max_tokens)
    try:
        callers = [i.clone() for i in idxs]
        res = ep.dispatch(xs, callers, num_experts, pad_to=pad_to, capacity=capacity, num_blocks=num_blocks)
        for i in callers:  # the plan reads the dispatch's own copy of idx (EpParams::idx_copy), not these
            i.fill_(-1)
        ys = []
        for r, d in enumerate(res):
            assert d["exc"] == "" and d["error"]["code"] == 0, (r, d["exc"], d["error"])
            rows = slice(bounds[r * epr], bounds[(r + 1) * epr])
            assert torch.equal(d["tpe"], tpe_all[r * epr:(r + 1) * epr])
            assert torch.equal(d["recv_x"], x_perm[rows]), f"rank {r}: recv_x"
            ys.append(fn(d["recv_x"], d["tpe"], r * epr))
        cres = ep.combine(ys, ws, keep_rows=True, num_blocks=num_blocks)
        gres = ep.combine_grad(gs, ws, num_blocks=num_blocks)
        t0 = 0
        for r in range(world):
            T = xs[r].shape[0]
            assert cres[r]["exc"] == "" and cres[r]["error"]["code"] == 0, cres[r]
            assert torch.equal(cres[r]["out"], out_all[t0:t0 + T]), f"rank {r}: combine out"
            rows = slice(bounds[r * epr], bounds[(r + 1) * epr])
            assert torch.equal(gres[r]["grad_y"], grad_y_all[rows]), f"rank {r}: combine grad"
            # keep_rows: each kept slot's expert row came back (for the weights' gradient).
            slot_rows = res[r]["slot_rows"]
            kept = (slot_rows >= 0).view(-1)
            back = cres[r]["rows"][kept]
            owner = idxs[r].long().view(-1)[kept] // epr
            for i, (o, row) in enumerate(zip(owner.tolist(), slot_rows.view(-1)[kept].tolist())):
                assert torch.equal(back[i], ys[o][row]), f"rank {r}: back row {i}"
            t0 += T
    finally:
        ep.close()


def _check_ep_partial(emu, world, xs, idxs, ws, a, b, num_experts, pad_to=1, capacity=None, num_blocks=0, gs=None,
                      max_tokens=None):
    """The partial combine (weighted) and its unweighted form (the dispatch's backward) against the
    single-process reference of test_dispatch, bit for bit; with gs, the combine's backward with w's
    gradient too (grad_y and grad_w equal to the per-slot unpermute_backward's, bit for bit)."""
    from test_dispatch import experts, partial_reference
    epr = num_experts // world
    X, IDX, W = torch.cat(xs), torch.cat([i.long() for i in idxs]), torch.cat(ws)
    x_perm, row_map, tpe_all = ops.permute(X, IDX, num_experts, pad_to, -1 if capacity is None else capacity, True)
    y_all = experts(x_perm, tpe_all, 0, a, b)
    want = partial_reference(y_all, row_map, W, IDX, epr)
    want_sum = partial_reference(y_all, row_map, None, IDX, epr)
    bounds = [0] + torch.cumsum(tpe_all.long(), 0).tolist()
    ep = _ep_world(emu, xs, idxs, num_experts, max_tokens=max_tokens)
    try:
        res = ep.dispatch(xs, idxs, num_experts, pad_to=pad_to, capacity=capacity, num_blocks=num_blocks, weights=ws,
                          weights_grad=gs is not None)
        ys = []
        for r, d in enumerate(res):
            assert d["exc"] == "" and d["error"]["code"] == 0, (r, d["exc"], d["error"])
            ys.append(experts(d["recv_x"], d["tpe"], r * epr, a, b))
        for weighted, ref in ((True, want), (False, want_sum)):
            cres = ep.combine(ys, ws if weighted else None, num_blocks=num_blocks, partial=True)
            t0 = 0
            for r in range(world):
                T = xs[r].shape[0]
                assert cres[r]["exc"] == "" and cres[r]["error"]["code"] == 0, cres[r]
                assert torch.equal(cres[r]["out"], ref[t0:t0 + T]), f"rank {r}: partial combine, weighted={weighted}"
                t0 += T
        if gs is None:
            return
        grad_y_all, grad_w_all = ops.unpermute_backward(torch.cat(gs), y_all, row_map, W)
        gres = ep.combine_grad(gs, ws, num_blocks=num_blocks, ys=ys)
        t0 = 0
        for r in range(world):
            T = xs[r].shape[0]
            assert gres[r]["exc"] == "" and gres[r]["error"]["code"] == 0, gres[r]
            rows = slice(bounds[r * epr], bounds[(r + 1) * epr])
            assert torch.equal(gres[r]["grad_y"], grad_y_all[rows]), f"rank {r}: partial combine's grad y"
            assert torch.equal(gres[r]["grad_w"], grad_w_all[t0:t0 + T]), f"rank {r}: partial combine's grad w"
            t0 += T
    finally:
        ep.close()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ep_ipc_partial_combine(emu, seed, world):
    from test_dispatch import cases, make_inputs
    for i, case in enumerate(cases(world)):
        ranks, a, b = make_inputs(case, world, seed + i)
        dt = torch.float32 if case.dtype == torch.float64 else case.dtype
        _check_ep_partial(emu, world, [r[0].to(dt) for r in ranks], [r[1] for r in ranks], [r[2].float() for r in ranks],
                          a.to(dt), b.to(dt), world * case.experts_per_rank, case.pad_to, case.capacity,
                          num_blocks=(0, 1, 3)[i % 3], gs=[r[3].to(dt) for r in ranks] if i % 2 == 0 else None)


@pytest.mark.parametrize("world", [2, 3])
def test_ep_ipc_oversized_buffer(emu, seed, world):
    """A buffer sized for far more tokens than arrive (grown by an earlier, longer call): the
    kernels walk only the staged tokens that arrived, and the partial plan marks every other
    slot empty; one or two blocks, so each warp crosses from source to source."""
    from test_dispatch import cases, make_inputs
    for i, case in enumerate(cases(world)[:4]):
        ranks, a, b = make_inputs(case, world, seed + i)
        dt = torch.float32 if case.dtype == torch.float64 else case.dtype
        xs, idxs = [r[0].to(dt) for r in ranks], [r[1] for r in ranks]
        ws, gs = [r[2].float() for r in ranks], [r[3].to(dt) for r in ranks]
        big = 5 * max(1, max(x.shape[0] for x in xs)) + 3
        E = world * case.experts_per_rank
        blocks = 1 + i % 2
        _check_ep_case(emu, world, xs, idxs, ws, gs, a.to(dt), b.to(dt), E, case.pad_to, case.capacity,
                       num_blocks=blocks, max_tokens=big)
        _check_ep_partial(emu, world, xs, idxs, ws, a.to(dt), b.to(dt), E, case.pad_to, case.capacity,
                          num_blocks=blocks, gs=gs, max_tokens=big)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ep_ipc_dispatch_combine(emu, seed, world):
    from test_dispatch import cases, make_inputs
    for i, case in enumerate(cases(world)):
        ranks, a, b = make_inputs(case, world, seed + i)
        dt = torch.float32 if case.dtype == torch.float64 else case.dtype
        xs = [r[0].to(dt) for r in ranks]
        idxs = [r[1] for r in ranks]
        ws = [r[2].float() for r in ranks]
        gs = [r[3].to(dt) for r in ranks]
        _check_ep_case(emu, world, xs, idxs, ws, gs, a.to(dt), b.to(dt), world * case.experts_per_rank,
                       case.pad_to, case.capacity, num_blocks=(0, 1, 3)[i % 3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ep_ipc_large_calls(emu, seed, dtype):
    # More slots than the one-block local index takes (T * k > 2048), skewed routing, H = 136.
    world, E, k, H = 2, 16, 4, 136
    Ts = [700, 515]
    xs = [torch.randn(T, H).to(dtype) for T in Ts]
    idxs = []
    for T in Ts:
        idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
        idx[torch.rand(T) < 0.5, 0] = 3
        idx[torch.rand(T, k) < 0.1] = -1
        idxs.append(idx)
    ws = [torch.rand(T, k) for T in Ts]
    gs = [torch.randn(T, H).to(dtype) for T in Ts]
    a, b = (1 + torch.rand(E, H)).to(dtype), torch.randn(E, H).to(dtype)
    _check_ep_case(emu, world, xs, idxs, ws, gs, a, b, E, pad_to=8, capacity=300)


def _check_masked_case(ep, world, xs, idxs, ws, E, cap, max_rows, tag="", partial=False):
    """A masked (no-sync) dispatch and its combine (partial: the partial combine) against the exact
    layout in one process."""
    from test_dispatch import partial_reference
    H = xs[0].shape[1]
    res = ep.dispatch(xs, idxs, E, capacity=cap, max_rows=max_rows, weights=ws if partial else None)
    X, IDX = torch.cat(xs), torch.cat([i.long() for i in idxs])
    x_perm, row_map, tpe = ops.permute(X, IDX, E, 1, -1 if cap is None else cap, True)
    kept = tpe.clamp(max=max_rows)
    starts = [0] + torch.cumsum(tpe.long(), 0).tolist()
    ys = []
    for r, d in enumerate(res):
        assert d["error"]["code"] == 0 and d["exc"] == "", (tag, r, d["error"], d["exc"])
        recv = d["recv_x"].view(E // world, max_rows, H)
        for el in range(E // world):
            e = r * (E // world) + el
            assert d["tpe"][el] == kept[e], (tag, r, el)
            assert torch.equal(recv[el, :kept[e]], x_perm[starts[e]:starts[e] + kept[e]]), (tag, r, el)
        ys.append(d["recv_x"] * 2 + 1)
    cres = ep.combine(ys, ws, partial=partial)
    # The same rows through the exact layout: rows past an expert's max_rows are dropped.
    Y = torch.zeros_like(x_perm)
    drop = torch.zeros_like(row_map, dtype=torch.bool)
    for e in range(E):
        Y[starts[e]:starts[e] + kept[e]] = x_perm[starts[e]:starts[e] + kept[e]] * 2 + 1
        drop |= (row_map >= starts[e] + kept[e]) & (row_map < starts[e + 1])
    if partial:
        out = partial_reference(Y, row_map.masked_fill(drop, -1), torch.cat(ws), IDX, E // world)
    else:
        out = ops.unpermute(Y, row_map.masked_fill(drop, -1), torch.cat(ws))
    t0 = 0
    for r in range(world):
        T = xs[r].shape[0]
        assert torch.equal(cres[r]["out"], out[t0:t0 + T]), (tag, r)
        t0 += T


def _routes(Ts, E, k, gen, unrouted=0.0, hot=None):
    out = []
    for T in Ts:
        if T == 0:
            out.append(torch.empty(0, k, dtype=torch.long))
            continue
        if k <= E:
            idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
        else:  # more slots than experts: a token sends several slots to one expert
            idx = torch.randint(E, (T, k), generator=gen)
        if hot is not None:
            idx[:, 0] = hot
        if unrouted:
            idx[torch.rand(T, k, generator=gen) < unrouted] = -1
        out.append(idx)
    return out


def test_ep_ipc_masked_and_repeated(emu, seed):
    # The no-sync layout ([El, max_rows] rows, valid counts on the device), three operations in a
    # row on the same buffers (the count rows alternate with the operation number).
    from moe_ext.dispatch import masked_rows
    world, E, k, H, maxT = 3, 6, 2, 8, 40
    gen = torch.Generator().manual_seed(seed)
    ep = emu.EpWorld(world, E, k, maxT, H * 4)
    try:
        for it in range(3):
            Ts = [int(t) for t in torch.randint(0, maxT + 1, (world,), generator=gen)]
            Ts[it % world] = 0
            xs = [torch.randn(T, H, generator=gen) for T in Ts]
            ws = [torch.rand(T, k, generator=gen) for T in Ts]
            cap = (None, 5, 30)[it]
            _check_masked_case(ep, world, xs, _routes(Ts, E, k, gen), ws, E, cap, masked_rows(world, maxT, cap), it)
    finally:
        ep.close()


@pytest.mark.parametrize("trial", range(12))
def test_ep_ipc_random_configs(emu, seed, trial):
    # Random worlds, expert counts, k (also above E), dtypes, hidden sizes, token counts (zeros
    # included), skew, pad_to, capacity, block counts, exact and masked layouts.
    from moe_ext.dispatch import masked_rows
    gen = torch.Generator().manual_seed(seed * 1000 + trial)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    world, epr, k = pick([2, 3, 4, 5, 6]), pick([1, 2, 3, 4]), pick([1, 2, 3, 4, 6, 8])
    E = world * epr
    dtype, H = pick([torch.float32, torch.bfloat16, torch.float16]), pick([8, 24, 64])
    Ts = [pick([0, 1, 3, 17, 40]) for _ in range(world)]
    idxs = _routes(Ts, E, k, gen, unrouted=pick([0.0, 0.2]), hot=pick([None, int(torch.randint(E, (1,)))]))
    idxs = [i.int() if pick([False, True]) else i for i in idxs]
    xs = [torch.randn(T, H, generator=gen).to(dtype) for T in Ts]
    ws = [torch.rand(T, k, generator=gen) for T in Ts]
    cap = pick([None, 1, 4, 20])
    tag = dict(world=world, E=E, k=k, dtype=dtype, H=H, Ts=Ts, cap=cap)
    if trial % 3 == 2:
        maxT = max(1, max(Ts))
        ep = emu.EpWorld(world, E, k, maxT, H * xs[0].element_size())
        try:
            _check_masked_case(ep, world, xs, idxs, ws, E, cap, masked_rows(world, maxT, cap), tag,
                               partial=pick([False, True]))
        finally:
            ep.close()
    else:
        gs = [torch.randn(T, H, generator=gen).to(dtype) for T in Ts]
        a, b = (1 + torch.rand(E, H, generator=gen)).to(dtype), torch.randn(E, H, generator=gen).to(dtype)
        pad_to, blocks = pick([1, 2, 4, 8]), pick([0, 1, 2, 5])
        _check_ep_case(emu, world, xs, idxs, ws, gs, a, b, E, pad_to, cap, num_blocks=blocks)
        _check_ep_partial(emu, world, xs, idxs, ws, a, b, E, pad_to, cap, num_blocks=blocks,
                          gs=gs if pick([False, True]) else None)


def test_ep_ipc_scales_travel_with_rows(emu, seed):
    world, E, k, H = 2, 4, 2, 16
    Ts = [9, 5]
    xs = [torch.randint(0, 256, (T, H), dtype=torch.uint8) for T in Ts]  # float8 rows, as bytes
    idxs = [torch.stack([torch.randperm(E)[:k] for _ in range(T)]) for T in Ts]
    scales = [torch.rand(T, 3) for T in Ts]
    ep = emu.EpWorld(world, E, k, 9, H, scale_cols=3)
    try:
        res = ep.dispatch(xs, idxs, E, x_scales=scales)
        X, IDX, S = torch.cat(xs), torch.cat(idxs), torch.cat(scales)
        x_perm, row_map, tpe = ops.permute(X, IDX, E, 1, -1, True)
        s_perm, _, _ = ops.permute(S, IDX, E, 1, -1, True)
        bounds = [0] + torch.cumsum(tpe.long(), 0).tolist()
        for r, d in enumerate(res):
            rows = slice(bounds[r * 2], bounds[r * 2 + 2])
            assert torch.equal(d["recv_x"], x_perm[rows]) and torch.equal(d["recv_scale"], s_perm[rows])
    finally:
        ep.close()


def test_ep_ipc_failures_name_the_rank(emu, seed):
    world, E, k, H = 3, 6, 2, 8
    Ts = [4, 6, 5]
    xs = [torch.randn(T, H) for T in Ts]
    idxs = [torch.stack([torch.randperm(E)[:k] for _ in range(T)]) for T in Ts]
    # A rank that never comes: the others time out naming it, within the timeout.
    ep = emu.EpWorld(world, E, k, 8, H * 4)
    try:
        import time
        t = time.time()
        res = ep.dispatch(xs, idxs, E, participate=[1, 1, 0], timeout_s=0.3)
        assert time.time() - t < 10
        for r in (0, 1):
            assert res[r]["error"]["code"] == 1 and res[r]["error"]["rank"] == 2, res[r]
            assert res[r]["recv_x"].shape[0] == 0
            assert (res[r]["tpe"] == 0).all()  # poisoned before: a no-sync caller's GEMMs then compute nothing
        # The communicator stays broken: combine's output is NaN, never a plausible sum.
        cres = ep.combine([res[0]["recv_x"], res[1]["recv_x"], None], [torch.rand(T, k) for T in Ts],
                          participate=[1, 1, 0], timeout_s=0.3)
        assert cres[0]["out"].isnan().all() and cres[1]["out"].isnan().all()
    finally:
        ep.close()
    # Ranks that disagree (rank 1's rows are of another dtype): every rank reports a mismatch and
    # names the first peer it disagrees with, whatever the threads' timing.
    for _ in range(3):
        ep = emu.EpWorld(world, E, k, 8, H * 4)
        try:
            res = ep.dispatch(xs, idxs, E, dtype_codes=[7, 8, 7], timeout_s=5)
            for r in range(world):
                assert res[r]["error"]["code"] == 2 and res[r]["error"]["field"] == 4, res[r]
            assert [res[r]["error"]["rank"] for r in range(world)] == [1, 0, 1]
            assert res[1]["error"]["value"] == 7 and res[1]["error"]["mine"] == 8
        finally:
            ep.close()
    # A rank that announces invalid inputs (kHdrBadInput = 12) is named by the others, the field
    # compared first even where other fields differ too.
    ep = emu.EpWorld(world, E, k, 8, H * 4)
    try:
        res = ep.dispatch(xs, idxs, E, bad_input=[0, 1, 0], dtype_codes=[7, 9, 7], timeout_s=5)
        for r in (0, 2):
            e = res[r]["error"]
            assert e["code"] == 2 and e["rank"] == 1 and e["field"] == 12 and e["value"] == 1, e
        assert res[1]["error"]["field"] == 12 and res[1]["error"]["mine"] == 1
        assert all(d["recv_x"].shape[0] == 0 and (d["tpe"] == 0).all() for d in res)
    finally:
        ep.close()
    # A rank that misses a combine after a good dispatch: the others time out naming it, and their
    # outputs are NaN.
    ep = emu.EpWorld(world, E, k, 8, H * 4)
    try:
        res = ep.dispatch(xs, idxs, E, timeout_s=5)
        assert all(d["error"]["code"] == 0 for d in res)
        cres = ep.combine([d["recv_x"] for d in res], [torch.rand(T, k) for T in Ts], participate=[1, 0, 1],
                          timeout_s=0.3)
        for r in (0, 2):
            assert cres[r]["error"]["code"] == 1 and cres[r]["error"]["rank"] == 1, cres[r]
            assert cres[r]["out"].isnan().all()
    finally:
        ep.close()
    # More tokens than the buffers hold: every rank says so, with the largest count.
    ep = emu.EpWorld(world, E, k, 5, H * 4)
    try:
        res = ep.dispatch(xs, idxs, E, timeout_s=5)
        for r in range(world):
            assert res[r]["error"]["code"] == 3 and res[r]["error"]["value"] == 6, res[r]
            assert res[r]["error"]["rank"] == 1
    finally:
        ep.close()


# ---- the portable grouped GEMM (grouped_gemm_sm80*.cu: cp.async, ldmatrix, mma.sync) ----------

def _gemm_helpers():
    import test_cuda_grouped_gemm as g
    return g


# M / E <= 96 picks 64-row tiles, larger experts 128-row ones: both kernels run.
GEMM_SHAPES = [(1, 37, 64, 128), (8, 300, 96, 80), (5, 129, 40, 272), (32, 500, 32, 48), (2, 400, 64, 144),
               (3, 700, 40, 80)]


def test_grouped_gemm_shapes_cover_both_tile_heights(emu):
    names = {emu.grouped_gemm_kernel_name(torch.bfloat16, False, E, M, K, N) for E, M, K, N in GEMM_SHAPES}
    assert len(names) == 2 and all("portable" in n for n in names), names


@pytest.mark.parametrize("E,M,K,N", GEMM_SHAPES)
@pytest.mark.parametrize("kind", ["random", "odd", "empty", "one"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_gemm_portable(emu, seed, E, M, K, N, kind, trans_b, activation, dtype):
    g = _gemm_helpers()
    gen = torch.Generator().manual_seed(seed)
    if kind == "odd" and (M - E) % 2:
        M += 1
    counts = g._counts(M, E, kind, gen)
    a = torch.randn(M + 3, K).to(dtype)  # rows past the groups: never read, their output zero
    b = g._weights(E, K, N, trans_b, dtype, device="cpu")
    bias = torch.randn(E, N).to(dtype) if kind == "random" else None
    scale = torch.rand(M + 3) if kind in ("random", "one") else None
    out = emu.grouped_gemm(a, b, counts, trans_b, activation, bias, scale)
    ref = g._ref64(a, b, counts, trans_b, activation, bias, scale)
    base = g._torch_per_expert(a, b, counts, trans_b, activation)
    if bias is None and scale is None:
        g._assert_within_torch_error(out, ref, {"torch per-expert matmul": base}, "forward", atol=1e-2)
    else:  # the epilogue in the dtype: compare with the float64 reference's rounding
        tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        err = g._max_err(out, ref)
        assert err <= 2 * tol * (1 + ref.abs().max().item()), err
    assert (out[int(counts.sum()):] == 0).all()
    # Offsets instead of counts, int32: bit-identical.
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).int()
    assert torch.equal(emu.grouped_gemm(a, b, offs, trans_b, activation, bias, scale), out)


@pytest.mark.parametrize("E,M,K,N", [(1, 37, 64, 128), (8, 300, 96, 72), (32, 500, 40, 48)])
@pytest.mark.parametrize("kind", ["random", "empty", "one"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_gemm_wgrad_portable(emu, seed, E, M, K, N, kind, trans_b, dtype):
    g = _gemm_helpers()
    gen = torch.Generator().manual_seed(seed)
    counts = g._counts(M, E, kind, gen)
    a = torch.randn(M, K).to(dtype)
    dy = torch.randn(M, N).to(dtype)
    out = emu.grouped_gemm_wgrad(a, dy, counts, E, trans_b)
    ref = g._wgrad_ref64(a, dy, counts, E, trans_b)
    base = g._wgrad_torch(a, dy, counts, E, trans_b)
    g._assert_within_torch_error(out, ref, {"torch per-expert matmul": base}, "wgrad", atol=1e-2)
    for e in range(E):
        if counts[e] == 0:
            assert (out[e] == 0).all()


@pytest.mark.parametrize("R", [40, 200])  # 64- and 128-row tiles
@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_masked_portable(emu, seed, activation, trans_b, R):
    g = _gemm_helpers()
    E, K, N = 6, 64, 96
    valid = torch.tensor([0, R, 7, 1, R - 7, 16], dtype=torch.int32)
    a = torch.randn(E, R, K).bfloat16()
    b = g._weights(E, K, N, trans_b, torch.bfloat16, device="cpu")
    scale = torch.rand(E * R)
    out = emu.grouped_gemm_masked(a, b, valid, trans_b, activation, None, scale)
    for e in range(E):
        v = int(valid[e])
        if v == 0:
            continue
        rows = a[e, :v]
        ref = g._ref64(rows, b[e:e + 1], torch.tensor([v]), trans_b, activation, None, scale[e * R:e * R + v])
        assert g._max_err(out[e, :v], ref) <= 2 ** -6 * (1 + ref.abs().max().item())


def test_permute_past_2_31_elements(emu, seed):
    # x_perm has T * k * H > 2^31 elements (one-byte rows, 2.1 GB): every offset must be 64-bit.
    T, k, H, E = 16400, 8, 16384, 64
    idx = torch.randint(0, E, (T, k))
    x = torch.randint(0, 256, (T, H), dtype=torch.uint8)
    xp, rm, tpe, total, _ = emu.permute(x, idx, E, 1, -1)
    assert xp.numel() > 2 ** 31 and total == T * k
    _, crm, ctpe = ops.permute(x[:, :16], idx, E, 1, -1, True)
    assert torch.equal(rm, crm) and torch.equal(tpe, ctpe)
    for t0 in range(0, T, 2048):
        t1 = min(T, t0 + 2048)
        assert torch.equal(xp[rm[t0:t1].reshape(-1)], x[t0:t1].repeat_interleave(k, 0))


@pytest.mark.parametrize("world", [8, 64])
def test_ep_ipc_large_worlds(emu, seed, world):
    # The "any world size up to at least 64": 2 experts per rank, a rank with T = 0.
    E, k, H = 2 * world, 4, 8
    Ts = [int(t) for t in torch.randint(0, 6, (world,))]
    Ts[1] = 0
    xs = [torch.randn(T, H) for T in Ts]
    idxs = [torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.long)
            for T in Ts]
    ws = [torch.rand(T, k) for T in Ts]
    gs = [torch.randn(T, H) for T in Ts]
    _check_ep_case(emu, world, xs, idxs, ws, gs, 1 + torch.rand(E, H), torch.randn(E, H), E, pad_to=2, num_blocks=2)


def test_gating_many_tokens(emu, seed):
    # 65537 tokens: the widest tiles, thousands of them, the multi-block scan and fixup.
    T, E, k = 65537, 8, 2
    opts = dict(score="softmax", capacity_factor=1.1, seq_len=T, expert_bias=torch.randn(E) * 0.02)
    logits = _draw(T, E, k, **opts)
    compare_gating(emu, logits, k, against_reference=False, **opts)
    args = _gating_args(opts)
    idx = ops.topk_gating(logits, k, args["score"], True, args["expert_bias"], 0, 0, 1.1, None, T)[1]
    del args["capacity_factor"], args["noise"]
    gw = torch.randn(T, k)
    g = emu.topk_gating_backward(gw, 0.5, 0.25, 0.125, logits, None, idx, **args)
    cg = ops.topk_gating_backward(gw, torch.tensor(0.5), torch.tensor(0.25), torch.tensor(0.125), logits, None, idx,
                                  args["score"], True, args["expert_bias"], 0, 0, T)
    torch.testing.assert_close(g, cg, rtol=1e-5, atol=1e-6)


# ---- the same kernels under AddressSanitizer ------------------------------------------------------

ASAN_SUBSET = ("permute_matches_cpu and 136 or unpermute_matches_cpu and 1000 or strided or ep_ipc_dispatch_combine "
               "or ep_ipc_large_calls or ep_ipc_masked or ep_ipc_scales or gemm_portable and empty and dtype0 or "
               "wgrad_portable and one and dtype0 or masked_portable or gating_shapes and full and 1100 and 256 or "
               "gating_backward_matches_cpu and dtype0 and full or swiglu_backward_matches_cpu and dtype0 or "
               "swiglu_matches_cpu and dtype0 or "
               "swiglu_backward_views")


@pytest.mark.skipif(os.environ.get("MOE_EXT_EMU_ASAN") == "1", reason="this is the run under the sanitizer")
def test_kernels_under_address_sanitizer(tmp_path):
    # A memcheck without a GPU: the emulated kernels built with -fsanitize=address, in a child
    # pytest with libasan preloaded; a read or write outside any tensor or buffer aborts it with
    # a report. (Writes just past an output land in its guard bytes, checked by every test.)
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(asan) or not os.path.exists(asan):
        pytest.skip("gcc's libasan is not installed")
    import moe_ext
    # The child imports the moe_ext this process did (the installed one in CI): it runs in tmp_path,
    # so that `python -m` does not put the source tree first on its path.
    path = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(moe_ext.__file__))),
                            os.environ.get("PYTHONPATH", "")])
    # (The sanitized library is cached beside the plain one: the build hash includes the flag.)
    env = dict(os.environ, MOE_EXT_EMU_ASAN="1", LD_PRELOAD=asan,
               ASAN_OPTIONS=f"detect_leaks=0:log_path={tmp_path / 'asan'}", PYTHONPATH=path)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                        "-k", ASAN_SUBSET], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    reports = sorted(tmp_path.glob("asan*"))
    assert not reports, reports[0].read_text()[:4000]
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert " passed" in r.stdout.splitlines()[-1], r.stdout[-500:]
