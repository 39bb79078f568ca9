"""moe_ext.MoE's chunked EP pipeline (num_chunks, overlap) and its sync-free decode path, on the CPU.

Chunking must not change a bit: the output, the gradient of x and of every parameter, and the
routing stats equal num_chunks=1's exactly, over gloo worlds of 2 and 4 ranks with ranks holding
0 tokens or fewer tokens than chunks. The layers use pad_to=4: MKL's CPU GEMM gives a row other
bits depending on how many rows share its call (fewer than 4, or past the last multiple of 4), so
that is what bit-identity needs on the CPU (MoE docstring); with pad_to=1 chunking only rounds.
Decode mode (masked layout, masked GEMMs, no host synchronisation) equals the normal forward.
"""
import contextlib
import importlib

import pytest
import torch
import torch.distributed as dist

import moe_ext
import moe_ext.layer
import reference as ref
from dist_utils import run_world

H, F = 16, 12
CHUNKS = (1, 2, 3, 5)


def _inputs(seed, counts, dtype, three_d=False):
    """Every rank's (x, output gradient), the same on every rank (one generator)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in counts:
        x = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
        gout = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
        out.append((x.view(1, T, H), gout.view(1, T, H)) if three_d else (x, gout))
    return out


@contextlib.contextmanager
def _counting(name):
    """Counts the layer's calls of moe_ext.layer.<name> (dispatch, grouped_gemm_masked, ...)."""
    real, calls = getattr(moe_ext.layer, name), []

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    setattr(moe_ext.layer, name, wrapper)
    try:
        yield calls
    finally:
        setattr(moe_ext.layer, name, real)


def _layer(group, seed, dtype, **kw):
    torch.manual_seed(seed)  # NOTE: the same weights on every rank and for every num_chunks
    layer = moe_ext.MoE(H, F, kw.pop("E", 8), kw.pop("k", 2), group, dtype=dtype, **kw)
    with torch.no_grad():
        layer.router.weight.normal_()
    return layer


def _step(layer, x, gout, num_chunks=1, overlap=True, x_grad=True, **fwd):
    """One forward + backward; returns every result that must not depend on the chunking."""
    layer.num_chunks, layer.overlap = num_chunks, overlap
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(x_grad)
    out = layer(x, **fwd)
    st = layer.stats
    loss = (out * gout).sum() + 0.1 * st.aux_loss + 0.01 * st.z_loss + 0.1 * st.seq_aux_loss
    loss.backward()
    got = {"out": out.detach(), "grad x": x.grad if x_grad else torch.zeros(()), "aux_loss": st.aux_loss.detach(),
           "seq_aux_loss": st.seq_aux_loss.detach(), "z_loss": st.z_loss.detach(),
           "tokens_per_expert": st.tokens_per_expert}
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        got[f"grad {name}"] = p.grad
    return got


def _assert_identical(got, want, what):
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, f"{what}: {name}"
        assert torch.equal(got[name], value), (
            f"{what}: {name} differs (max {(got[name].double() - value.double()).abs().max().item():.3g})")


# ---- the pipeline over gloo worlds ---------------------------------------------------------------

CONFIGS = [  # (layer options, dtype, 3-D input)
    (dict(pad_to=4, shared_ffn_hidden=8, shared_expert_gate=True), torch.float64, True),
    (dict(pad_to=4, k=3, score="sigmoid", expert_bias=True, capacity_factor=0.75, recompute_activation=True),
     torch.float32, False),
    (dict(pad_to=8, k=1, E=4 * 2, routed_scaling_factor=2.0), torch.bfloat16, False),
]


def _check_chunks(rank, world, seed, counts, group, layer_kw, dtype, three_d, x_grad=True):
    layer = _layer(group, seed, dtype, **layer_kw)
    if layer_kw.get("expert_bias"):
        with torch.no_grad():
            layer.expert_bias.copy_(torch.linspace(-0.2, 0.2, layer.num_experts))
    x, gout = _inputs(seed, counts, dtype, three_d)[rank]
    want = _step(layer, x, gout, x_grad=x_grad)
    for n in CHUNKS[1:]:
        for overlap in (True, False):
            with _counting("dispatch") as calls:
                got = _step(layer, x, gout, n, overlap, x_grad)
            assert len(calls) == (n if world > 1 else 0)
            assert all(c.get("async_op") == overlap for c in calls)
            _assert_identical(got, want, f"rank {rank}, num_chunks={n}, overlap={overlap}")
    # Without a gradient too (SwiGLU fused into the GEMM, chunked or not).
    layer.num_chunks = 1
    with torch.no_grad():
        want_eval = layer(x)
        for n in CHUNKS[1:]:
            layer.num_chunks = n
            assert torch.equal(layer(x), want_eval), f"rank {rank}, no_grad, num_chunks={n}"
    return want


def _check_call_order(rank, world, seed, counts, group):
    """With overlap=True, forward queues chunk c+1's dispatch before chunk c's combine, and
    backward every chunk's gradient scatter (last chunk first) before any x gradient goes home,
    all asynchronously: what lets the communication overlap the expert GEMMs on CUDA (each call
    orders the communication stream after all compute queued before it, and an exact-layout
    dispatch holds the host until its count exchange is through). overlap=False: one chunk after
    the other, synchronously."""
    backend = importlib.import_module("moe_ext.dispatch")._AllToAllBackend  # (moe_ext.dispatch: the function)
    real_dispatch, real_scatter, real_combine, log = backend.dispatch, backend.scatter_grad, backend.combine, []

    def dispatch(self, x, idx, w, opts):
        log.append(("dispatch", x.shape[0], opts.async_op))
        return real_dispatch(self, x, idx, w, opts)

    def scatter_grad(self, g, w, y, plan, async_op=False):
        log.append(("scatter", g.shape[0], async_op))
        return real_scatter(self, g, w, y, plan, async_op)

    def combine(self, y, w, plan, row_map, keep_rows=False, stage="combine", async_op=False):
        log.append((stage, row_map.shape[0], async_op))
        return real_combine(self, y, w, plan, row_map, keep_rows, stage, async_op)

    backend.dispatch, backend.scatter_grad, backend.combine = dispatch, scatter_grad, combine
    try:
        layer = _layer(group, seed, torch.float64, pad_to=4)
        x, gout = _inputs(seed, counts, torch.float64)[rank]
        for overlap in (True, False):
            log.clear()
            _step(layer, x, gout, 3, overlap)
            T = x.shape[0]
            sizes = [(c + 1) * T // 3 - c * T // 3 for c in range(3)]
            if overlap:  # D0 D1 C0 D2 C1 C2 (the GEMMs, not logged, go before each combine)
                forward = [("dispatch", sizes[0], True), ("dispatch", sizes[1], True), ("combine", sizes[0], True),
                           ("dispatch", sizes[2], True), ("combine", sizes[1], True), ("combine", sizes[2], True)]
            else:
                forward = [call for n in sizes for call in (("dispatch", n, False), ("combine", n, False))]
            assert log == (forward + [("scatter", n, overlap) for n in sizes[::-1]]
                           + [("dispatch-backward", n, overlap) for n in sizes[::-1]]), log
    finally:
        backend.dispatch, backend.scatter_grad, backend.combine = real_dispatch, real_scatter, real_combine


def _check_against_reference(rank, world, seed, counts, group):
    """The chunked layer against the plain-torch reference over every rank's tokens (float64)."""
    layer = _layer(group, seed, torch.float64, pad_to=4, num_chunks=3)
    w1, w2 = layer.expert_weights()
    xs = _inputs(seed, counts, torch.float64)
    x_all = torch.cat([x for x, _ in xs])
    ref_out = ref.moe_layer(x_all, layer.router.weight.detach(), w1, w2, 2)
    start = sum(counts[:rank])
    out = layer(xs[rank][0])
    torch.testing.assert_close(out.detach(), ref_out[start:start + counts[rank]], rtol=1e-12, atol=1e-12)


def _check_rounding_only(rank, world, seed, counts, group):
    """pad_to=1: chunked results differ from unchunked ones by rounding at most."""
    layer = _layer(group, seed, torch.float64)
    x, gout = _inputs(seed, counts, torch.float64)[rank]
    want = _step(layer, x, gout)
    got = _step(layer, x, gout, 3)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-12, msg=name)


def _check_partial_combine(rank, world, seed, counts, group):
    """partial_combine=True: every chunking gives the same bits (bfloat16, with pad_to=4 and capacity
    drops), and in float64 the results are the per-slot layer's up to the order of the sums, the
    router's gradient bit for bit (w's gradient is the same dot products)."""
    _check_chunks(rank, world, seed, counts, group, dict(pad_to=4, k=3, capacity_factor=0.75, partial_combine=True),
                  torch.bfloat16, False)
    x, gout = _inputs(seed, counts, torch.float64)[rank]
    want = _step(_layer(group, seed, torch.float64, pad_to=4, k=3), x, gout)
    for n in (1, 3):
        got = _step(_layer(group, seed, torch.float64, pad_to=4, k=3, partial_combine=True), x, gout, n)
        assert torch.equal(got["grad router.weight"], want["grad router.weight"]), f"rank {rank}, num_chunks={n}"
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-12, msg=f"{name}, num_chunks={n}")


def _pipeline_world(rank, world, seed, counts):
    group = dist.group.WORLD
    for i, (kw, dtype, three_d) in enumerate(CONFIGS):
        _check_chunks(rank, world, seed + i, counts, group, kw, dtype, three_d)
    kw, dtype, three_d = CONFIGS[0]  # x without a gradient: no dispatch backward, the weights' still exact
    _check_chunks(rank, world, seed, counts, group, kw, dtype, three_d, x_grad=False)
    _check_call_order(rank, world, seed, counts, group)
    _check_against_reference(rank, world, seed, counts, group)
    _check_partial_combine(rank, world, seed, counts, group)
    _check_rounding_only(rank, world, seed, counts, group)
    if world == 4:  # replicated experts: replicas are chosen on the whole batch, before chunking
        placement = {0: [0, 3], 1: [1], 2: [2, 0], 3: [3], 4: [0], 5: [1, 2], 6: [2], 7: [3, 1]}
        _check_chunks(rank, world, seed, counts, group, dict(pad_to=4, placement=placement), torch.float64, False)
    if world == 2:  # expert TP is not chunked
        with pytest.raises(ValueError, match="num_chunks > 1 is not supported with expert TP"):
            moe_ext.MoE(H, F, 4, 2, None, tp_group=group, num_chunks=2)
    return True


@pytest.mark.parametrize("world,counts", [(2, (7, 0)), (2, (2, 13)), (4, (9, 0, 3, 14))])
def test_chunks_bit_identical_gloo(world, counts, seed):
    assert all(run_world(_pipeline_world, world, seed, counts, seed=seed, timeout_s=240))


def test_chunks_world_of_one(seed):
    """W = 1: nothing travels, so the layer does not chunk; every num_chunks gives the same bits."""
    for i, (kw, dtype, three_d) in enumerate(CONFIGS):
        _check_chunks(0, 1, seed + i, (11,), None, kw, dtype, three_d)
        _check_chunks(0, 1, seed + i, (0,), None, kw, dtype, three_d)


def test_bad_chunk_arguments():
    with pytest.raises(ValueError, match="num_chunks must be an int >= 1"):
        moe_ext.MoE(H, F, 4, 2, num_chunks=0)
    with pytest.raises(ValueError, match="max_decode_tokens must be None or an int >= 1"):
        moe_ext.MoE(H, F, 4, 2, max_decode_tokens=0)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="comm_sms must be None or an int >= 0"):
            moe_ext.MoE(H, F, 4, 2, comm_sms=bad)


def _disagreeing_ranks(rank, world, seed):
    """Settings that differ between ranks: a clear ValueError on every rank, never a silent wrong
    output (a placement), NaN (a header read as chunk counts) or an aborted process (gloo reading a
    message of another size); the group stays usable afterwards."""
    group = dist.group.WORLD
    mine = [[0, 1], [2, 3]] if rank == 0 else [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match=r"disagree on placement"):
        moe_ext.MoE(H, F, 4, 2, group, placement=mine)
    with pytest.raises(ValueError, match=r"disagree on num_chunks \(rank 0: 1, rank 1: 2\)"):
        moe_ext.MoE(H, F, 4, 2, group, num_chunks=1 + rank)
    layer = _layer(group, seed, torch.float32, E=4)
    x = _inputs(seed, (5, 3), torch.float32)[rank][0]
    want = layer(x)
    for chunks, overlap, pattern in (
            ((2, 3), (True, True), r"disagree on num_chunks \(rank 0: 2, rank 1: 3\)"),
            ((2, 2), (True, False), r"disagree on overlap \(rank 0: True, rank 1: False\)"),
            ((1, 2), (True, True), r"not a moe_ext.dispatch header" if rank == 0 else r"made an unchunked dispatch")):
        layer.num_chunks, layer.overlap = chunks[rank], overlap[rank]
        with pytest.raises((ValueError, RuntimeError), match=pattern):
            layer(x)
    layer.num_chunks, layer.overlap = 2, True
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    return True


def test_disagreeing_ranks_raise_clear_errors(seed):
    assert all(run_world(_disagreeing_ranks, 2, seed, seed=seed, timeout_s=120))


# ---- decode ----------------------------------------------------------------------------------------

def _check_decode(rank, world, seed, counts, group, dtype, max_tokens, **kw):
    """decode=True against the normal forward: output and stats bit-identical (pad_to=1), gradients close."""
    layer = _layer(group, seed, dtype, max_decode_tokens=max_tokens, **kw)
    x, gout = _inputs(seed, counts, dtype)[rank]
    want = _step(layer, x, gout)
    want_rows = layer.tokens_per_slot.clone()
    load = layer.load.clone()
    with _counting("grouped_gemm_masked") as gemms, _counting("dispatch") as dispatches:
        got = _step(layer, x, gout, decode=True)
    assert len(gemms) == 2 and [c.get("sync") for c in dispatches] == ([False] if layer.ep_world > 1 else [])
    assert torch.equal(layer.tokens_per_slot, want_rows)  # valid rows per slot = the exact counts
    assert torch.equal(layer.load, 2 * load)  # the bookkeeping still runs
    for name in ("out", "aux_loss", "z_loss", "tokens_per_expert"):
        assert torch.equal(got[name], want[name]), f"rank {rank}: decode {name} differs"
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, **tol, msg=name)
    layer.decode = True  # the attribute, as for a whole patched model
    with torch.no_grad():
        assert torch.equal(layer(x), want["out"])
        with pytest.raises(ValueError, match=f"more than max_(decode_)?tokens={max_tokens}"):
            layer(torch.zeros(max_tokens + 1, H, dtype=dtype))
        # Only the last rank over the limit: every rank raises (through the dispatch's header).
        over = max_tokens + (layer.ep_rank == layer.ep_world - 1)
        with pytest.raises(ValueError, match=f"more than max_(decode_)?tokens={max_tokens}|passed invalid inputs"):
            layer(torch.zeros(over, H, dtype=dtype))
        assert torch.equal(layer(x, decode=False), want["out"])
    return True


def _decode_world(rank, world, seed, counts):
    group = dist.group.WORLD
    _check_decode(rank, world, seed, counts, group, torch.float64, 9, shared_ffn_hidden=8)
    _check_decode(rank, world, seed + 1, counts, group, torch.float32, 16, k=3, capacity_factor=1.0)
    # ep_group=None inside a world of several ranks: all experts here, no dispatch over the world
    _check_decode(rank, world, seed + 2, counts, None, torch.float64, 9)
    # decode_partial_combine: the same output up to the order of the float64 sums, and with a
    # gradient the same gradients (the router's through w's, which comes back from the experts' ranks).
    layer = _layer(group, seed + 3, torch.float64, max_decode_tokens=9, decode_partial_combine=True)
    x = _inputs(seed + 3, counts, torch.float64)[rank][0]
    with torch.no_grad():
        torch.testing.assert_close(layer(x, decode=True), layer(x), rtol=1e-12, atol=1e-12)
    grads = []
    for decode in (True, False):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = layer(xg, decode=decode)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([xg.grad, layer.router.weight.grad] + [p.grad for p in layer.parameters()])
    if x.shape[0]:
        assert grads[0][1].abs().sum() > 0, "no gradient reached the router"
    for got, want in zip(*grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="decode is not supported with expert TP"):
        moe_ext.MoE(H, F, 4, 2, None, tp_group=group, max_decode_tokens=4)(torch.zeros(2, H), decode=True)
    return True


def test_decode_equals_forward_gloo(seed):
    assert all(run_world(_decode_world, 2, seed, (5, 0), seed=seed, timeout_s=180))


@pytest.mark.parametrize("T", [0, 1, 6])
def test_decode_world_of_one(T, seed):
    _check_decode(0, 1, seed, (T,), None, torch.float64, 6, shared_ffn_hidden=8, shared_expert_gate=True)
    _check_decode(0, 1, seed, (T,), None, torch.float32, 8, pad_to=1, k=1)


def test_decode_needs_max_tokens():
    layer = moe_ext.MoE(H, F, 4, 2)
    with pytest.raises(ValueError, match="decode needs max_decode_tokens"):
        layer(torch.zeros(3, H), decode=True)
