"""topk_gating on CUDA (csrc/kernels/gating*.cu): against the CPU op and the float64 reference
(reference.py) for every option combination and the shape grid E x k x T; float16/bfloat16/float64
logits; backward against the CPU op; determinism, CUDA graphs, poisoned outputs, limits.

Integer outputs are compared exactly. Inputs are drawn so that no row holds a near-tie: two
different experts (or groups) whose float64 selection keys lie closer than 1e-5 of the row's
scale at a place the selection depends on. Such a pair has no implementation-independent order
in float32 (the kernels' exp is CUDA's expf, the CPU's glibc expf: they may differ in the last bits);
rows with one are redrawn (a few per 65537). Exact ties (equal inputs) are kept: every
implementation gives them to the lower index.
"""
import itertools
import math

import pytest
import torch

import moe_ext
import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ops = torch.ops.moe_ext
DEV = "cuda"
FLOAT_TOL = dict(rtol=1e-5, atol=1e-7)
F64_TOL = dict(rtol=1e-10, atol=1e-12)
_DRAW = DEV if torch.cuda.is_available() else "cpu"  # draw_logits also serves the emulation tests


# ---- inputs without near-ties ---------------------------------------------------------------------

def _kernel_logits(logits, noise):
    """The logits (+ noise) in the accumulation type, added there as the kernels and the CPU op do."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    l = logits.to(acc)
    return l + noise.to(acc) if noise is not None else l


def ambiguous_rows(l, k, score, bias, num_groups, topk_groups, tol):
    """[T] bool: rows whose selection depends on two different values closer than tol * scale."""
    l = l.double()
    T, E = l.shape
    s = torch.softmax(l, -1) if score == "softmax" else torch.sigmoid(l)
    b = bias.double() if bias is not None else torch.zeros(E, dtype=torch.float64, device=l.device)
    key = s + b
    thr = tol * (s.abs() + b.abs()).amax(-1)
    bad = torch.zeros(T, dtype=torch.bool, device=l.device)
    if T == 0:
        return bad

    def near(hi, lo, scale=1.0):
        gap = hi - lo
        limit = scale * (thr[:, None] if gap.dim() == 2 else thr)
        return (gap > 0) & (gap < limit)

    if num_groups and topk_groups < num_groups:
        gs = E // num_groups
        gscore = key.view(T, num_groups, gs).topk(min(2, gs), -1).values.sum(-1)
        gsorted = gscore.sort(-1, descending=True).values
        bad |= near(gsorted[:, topk_groups - 1], gsorted[:, topk_groups], 4.0)
        chosen = ref.stable_topk(gscore, topk_groups)
        allowed = torch.zeros(T, num_groups, dtype=torch.bool, device=l.device).scatter_(1, chosen, True)
        key = key.masked_fill(~allowed.repeat_interleave(gs, 1), -math.inf)
    top = key.sort(-1, descending=True).values[:, : min(k + 1, E)]
    if top.shape[1] > 1:
        bad |= near(top[:, :-1], top[:, 1:]).any(-1)
    return bad


def draw_logits(T, E, k, score="softmax", dtype=torch.float32, scale=2.0, noise=None, expert_bias=None,
                num_groups=None, topk_groups=None, **_):
    """[T, E] CPU logits whose rows have no near-tie (redrawn until none has)."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    logits = (torch.randn(T, E, dtype=torch.float64) * scale).to(dtype)
    for _ in range(100):
        # NOTE: the ops add the noise in float32, the float64 reference in float64: two experts whose
        # float32 sums tie exactly (kept: the lower index wins) can be a near-tie the other way round
        # in float64, so the float64 sums must be free of near-ties too.
        sums = [_kernel_logits(logits, noise)] + ([logits.double() + noise.double()] if noise is not None else [])
        bad = torch.zeros(T, dtype=torch.bool)
        for l in sums:
            bad |= ambiguous_rows(l.to(_DRAW), k, score, None if expert_bias is None else expert_bias.to(_DRAW),
                                  num_groups, topk_groups or 0, tol).cpu()
        if not bad.any():
            return logits
        logits[bad] = (torch.randn(int(bad.sum()), E, dtype=torch.float64) * scale).to(dtype)
    raise AssertionError("could not draw logits without near-ties")


# ---- comparisons ----------------------------------------------------------------------------------

def _to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


def compare(logits, k, against_reference=True, **opts):
    """Runs the CUDA op and the CPU op on the same inputs; checks them against each other and,
    optionally, against the float64 reference. Returns the CUDA outputs."""
    w, idx, st = moe_ext.topk_gating(logits.to(DEV), k, **{n: _to(v, DEV) for n, v in opts.items()})
    cw, cidx, cst = moe_ext.topk_gating(logits, k, **opts)
    f64 = logits.dtype == torch.float64
    assert w.device.type == DEV and w.dtype == (torch.float64 if f64 else torch.float32)
    assert idx.dtype == torch.int32 and st.positions.dtype == torch.int32 and st.tokens_per_expert.dtype == torch.int32
    tol = F64_TOL if f64 else FLOAT_TOL
    assert torch.equal(idx.cpu(), cidx)
    assert torch.equal(st.positions.cpu(), cst.positions)
    assert torch.equal(st.tokens_per_expert.cpu(), cst.tokens_per_expert)
    torch.testing.assert_close(w.cpu(), cw, **tol)
    for name in ("aux_loss", "seq_aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(st, name).cpu(), getattr(cst, name), **tol, msg=name)
    if against_reference:
        r = ref.gating(logits, k, **opts)
        assert torch.equal(idx.cpu().long(), r["idx"])
        assert torch.equal(st.positions.cpu().long(), r["positions"])
        assert torch.equal(st.tokens_per_expert.cpu().long(), r["tokens_per_expert"])
        rtol = F64_TOL if f64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.cpu().double(), r["weights"], **rtol)
        for name in ("aux_loss", "seq_aux_loss", "z_loss"):
            torch.testing.assert_close(getattr(st, name).cpu().double(), r[name], **rtol, msg=name)
    return w, idx, st


def groups_for(E, k):
    """A group limit that restricts (when k allows it): 4 groups for E in {8, 60}, else 8."""
    G = 4 if E in (8, 60) else 8
    if E % G:
        return None, None
    gs = E // G
    tg = min(G - 1, max(G // 2, math.ceil(k / gs)))
    if tg * gs < k:
        tg = G
    return G, tg


# ---- every option combination ------------------------------------------------------------------------

COMBOS = list(itertools.product(["softmax", "sigmoid"], [True, False], [False, True], [False, True],
                                 [None, 0.5, 1.25], [False, True], [None, 512]))


@pytest.mark.parametrize("score,renorm,bias,groups,cf,noise,seq_len", COMBOS,
                         ids=lambda v: str(v))
def test_every_option_combination(seed, score, renorm, bias, groups, cf, noise, seq_len):
    T, E, k = 4096, 64, 6
    opts = dict(score=score, renormalize=renorm, capacity_factor=cf, seq_len=seq_len)
    if bias:
        opts["expert_bias"] = torch.randn(E) * 0.05
    if groups:
        opts.update(num_groups=8, topk_groups=3)
    if noise:
        opts["noise"] = torch.randn(T, E) * 0.5
    logits = draw_logits(T, E, k, **opts)
    compare(logits, k, **opts)


# ---- the shape grid ------------------------------------------------------------------------------------

def _full_options(T, E, k):
    G, tg = groups_for(E, k)
    opts = dict(score="sigmoid", expert_bias=torch.randn(E) * 0.05, capacity_factor=1.25,
                noise=torch.randn(T, E) * 0.3, seq_len=T if T in (1, 7, 65537) else 256)
    if G:
        opts.update(num_groups=G, topk_groups=tg)
    return opts


@pytest.mark.parametrize("T", [0, 1, 7, 4096, 65537])
@pytest.mark.parametrize("k", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("E", [8, 60, 64, 128, 256, 384])
@pytest.mark.parametrize("optset", ["plain", "full"])
def test_shapes(seed, optset, E, k, T):
    opts = {} if optset == "plain" else _full_options(T, E, k)
    logits = draw_logits(T, E, k, **opts)
    # The float64 reference of a 65537-token batch takes seconds: there only for k = 8.
    compare(logits, k, against_reference=T < 65537 or k == 8, **opts)


@pytest.mark.parametrize("E,k,groups", [(1, 1, None), (2, 1, None), (2, 2, None), (2, 1, (2, 1)), (3, 2, None), (33, 5, (3, 2)),
                                        (1000, 16, (8, 3)), (1024, 32, (32, 4)), (1024, 8, (4, 1)), (517, 9, None)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_other_sizes(seed, E, k, groups, score):
    T = 777
    opts = dict(score=score, capacity_factor=1.0, seq_len=111, expert_bias=torch.randn(E) * 0.01)
    if groups:
        opts.update(num_groups=groups[0], topk_groups=groups[1])
    logits = draw_logits(T, E, k, **opts)
    compare(logits, k, **opts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float32])
@pytest.mark.parametrize("E,k", [(256, 8), (60, 6)])
@pytest.mark.parametrize("optset", ["plain", "full"])
def test_logits_dtypes(seed, dtype, E, k, optset):
    T = 4096
    opts = {} if optset == "plain" else _full_options(T, E, k)
    if dtype == torch.float64 and "noise" in opts:
        opts["noise"] = opts["noise"].double()
        opts["expert_bias"] = opts["expert_bias"].double()
    logits = draw_logits(T, E, k, dtype=dtype, **opts)
    if dtype == torch.bfloat16:
        # bfloat16 logits tie exactly and often (the diagonal aside): the lower index must win those.
        head = logits[:64]
        assert (head[:, None, :] == head[:, :, None]).sum() > 64 * E
    compare(logits, k, **opts)


def test_exact_ties_and_group_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    _, idx, _ = compare(logits, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    _, idx, _ = compare(torch.zeros(1, 4), 2, num_groups=2, topk_groups=1)
    assert idx.tolist() == [[0, 1]]
    # Every key equal: the lowest experts of the lowest groups.
    _, idx, _ = compare(torch.zeros(3, 64), 8, num_groups=8, topk_groups=4, score="sigmoid")
    assert idx[0].tolist() == list(range(8))


def test_tiny_scores_keep_their_order():
    # Experts ~90 below the row max have softmax scores near 2^-126: a flush to zero would tie
    # them (lowest index wins) where the CPU still tells them apart.
    logits = torch.tensor([[0.0, -100.0, -95.0, -90.0], [0.0, -90.0, -101.0, -99.5]])
    _, idx, _ = compare(logits, 3, against_reference=False)
    assert idx.tolist() == [[0, 3, 2], [0, 1, 3]]


def test_nan_and_inf_match_cpu(seed):
    for score in ("softmax", "sigmoid"):
        logits = draw_logits(64, 32, 4, score=score)
        logits[3, 5] = float("nan")
        logits[7, :] = float("nan")
        logits[9, 2] = float("inf")
        logits[11, :] = -float("inf")
        w, idx, st = moe_ext.topk_gating(logits.to(DEV), 4, score=score, capacity_factor=1.0)
        cw, cidx, cst = moe_ext.topk_gating(logits, 4, score=score, capacity_factor=1.0)
        assert torch.equal(idx.cpu(), cidx) and torch.equal(st.positions.cpu(), cst.positions)
        torch.testing.assert_close(w.cpu(), cw, equal_nan=True, **FLOAT_TOL)
        torch.testing.assert_close(st.z_loss.cpu(), cst.z_loss, equal_nan=True)


def test_all_tokens_one_expert_capacity(seed):
    T, E, k = 3000, 16, 2
    logits = draw_logits(T, E, k)
    logits[:, 3] += 30  # always first (+100 would push the other scores below float32 normals)
    _, idx, st = compare(logits, k, capacity_factor=1.0, against_reference=False)
    cap = math.ceil(T * k / E)
    assert st.tokens_per_expert[3].item() == cap
    assert (idx[cap:, 0] == -1).all() and st.positions[:cap, 0].tolist() == list(range(cap))


# ---- outputs every element of which is written --------------------------------------------------------

POISON = 0x7F  # int32 0x7f7f7f7f, float32 3.4e38: no legal output has these bits


def _poison_cache(shapes_bytes, copies=6):
    """Leaves freed blocks full of POISON in the caching allocator, where the op's outputs come from."""
    keep = [torch.full((n,), POISON, dtype=torch.uint8, device=DEV) for n in shapes_bytes for _ in range(copies)]
    torch.cuda.synchronize()
    del keep


@pytest.mark.parametrize("T,E,k", [(7, 60, 6), (4096, 256, 8), (65537, 8, 2)])
def test_poisoned_outputs(seed, T, E, k):
    opts = dict(score="sigmoid", capacity_factor=0.8, seq_len=T if T != 4096 else 512)
    logits = draw_logits(T, E, k, **opts)
    _poison_cache([T * k * 4] * 3 + [E * 4, 4, 4, 4, T * E * 4, 1 << 20])
    w, idx, st = compare(logits, k, against_reference=False, **opts)
    for t in (w, idx, st.positions, st.tokens_per_expert):
        assert not (t.view(torch.uint8).view(-1, t.element_size()) == POISON).all(-1).any()
    # The backward's gradient too.
    lg = logits.to(DEV).requires_grad_()
    gw = torch.randn(T, k, device=DEV)
    _poison_cache([T * E * 4] * 2)
    w, _, st = moe_ext.topk_gating(lg, k, **opts)
    (w * gw).sum().backward()
    assert not (lg.grad.view(torch.int32) == 0x7F7F7F7F).any()


# ---- backward -----------------------------------------------------------------------------------------

BACKWARD_OPTS = [
    dict(),
    dict(capacity_factor=0.75),
    dict(num_groups=4, topk_groups=2, expert_bias="rand"),
    dict(seq_len=64, noise="rand"),
    dict(capacity_factor=0.9, num_groups=4, topk_groups=3, expert_bias="rand", seq_len=128, noise="rand"),
]


def _materialise(opts, T, E, dtype):
    opts = dict(opts)
    if opts.get("expert_bias") == "rand":
        opts["expert_bias"] = torch.randn(E, dtype=dtype) * 0.05
    if opts.get("noise") == "rand":
        opts["noise"] = torch.randn(T, E, dtype=dtype) * 0.3
    return opts


def _grad(logits, k, gw, coefs, **opts):
    lg = logits.clone().requires_grad_()
    w, _, st = moe_ext.topk_gating(lg, k, **opts)
    loss = (w * gw).sum()
    for c, name in zip(coefs, ("aux_loss", "seq_aux_loss", "z_loss")):
        if c:
            loss = loss + c * getattr(st, name)
    loss.backward()
    return lg.grad


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("opts", BACKWARD_OPTS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("coefs", [(0, 0, 0), (0.3, 0.7, 0.1)], ids=["weights-only", "all-losses"])
@pytest.mark.parametrize("dtype,E,k", [(torch.float32, 256, 8), (torch.float32, 60, 6), (torch.float64, 60, 6),
                                       (torch.bfloat16, 64, 4)])
def test_backward_matches_cpu(seed, score, renorm, opts, coefs, dtype, E, k):
    T = 1024
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    opts = dict(_materialise(opts, T, E, acc), score=score, renormalize=renorm)
    logits = draw_logits(T, E, k, dtype=dtype, **opts)
    gw = torch.randn(T, k, dtype=acc)
    got = _grad(logits.to(DEV), k, gw.to(DEV), coefs, **{n: _to(v, DEV) for n, v in opts.items()})
    want = _grad(logits, k, gw, coefs, **opts)
    assert got.dtype == logits.dtype and got.device.type == DEV
    got, want = got.cpu().double(), want.double()
    if dtype == torch.bfloat16:
        tol = dict(rtol=1e-2, atol=1e-2 * want.abs().max().item())
    elif dtype == torch.float64:
        tol = dict(rtol=1e-9, atol=1e-12 * want.abs().max().item())
    else:
        tol = dict(rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(got, want, **tol)


def test_backward_op_scalars_stay_on_device(seed):
    """Loss-gradient scalars are read on the device: the op runs inside a CUDA graph."""
    T, E, k = 2048, 64, 4
    logits = draw_logits(T, E, k, score="sigmoid").to(DEV)
    w, idx, *_ = ops.topk_gating(logits, k, "sigmoid", True, None, 0, 0, 1.0, None, 256)
    gw = torch.randn(T, k, device=DEV)
    g = [torch.tensor(v, device=DEV) for v in (0.3, 0.7, 0.1)]
    args = (gw, *g, logits, None, idx, "sigmoid", True, None, 0, 0, 256)
    eager = ops.topk_gating_backward(*args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.topk_gating_backward(*args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.topk_gating_backward(*args)
    for v in (0.5, 0.0):
        g[0].fill_(v)
        eager = ops.topk_gating_backward(*args)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    want = ops.topk_gating_backward(gw.cpu(), *(x.cpu() for x in g), logits.cpu(), None, idx.cpu(), "sigmoid", True,
                                    None, 0, 0, 256)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# ---- determinism, graphs, limits, opcheck ------------------------------------------------------------

def test_bitwise_deterministic(seed):
    T, E, k = 65537, 256, 8
    opts = dict(score="sigmoid", expert_bias=torch.randn(E, device=DEV) * 0.05, num_groups=8, topk_groups=4,
                capacity_factor=1.1, seq_len=T)
    logits = torch.randn(T, E, device=DEV).requires_grad_()
    gw = torch.randn(T, k, device=DEV)
    runs = []
    for _ in range(3):
        logits.grad = None
        w, idx, st = moe_ext.topk_gating(logits, k, **opts)
        ((w * gw).sum() + st.aux_loss + st.seq_aux_loss + st.z_loss).backward()
        runs.append([w, idx, st.positions, st.tokens_per_expert, st.aux_loss, st.seq_aux_loss, st.z_loss,
                     logits.grad.clone()])
    for run in runs[1:]:  # every later run against the first
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("T", [128, 16384])
def test_cuda_graph_forward(seed, T):
    E, k = 256, 8
    bias = torch.randn(E, device=DEV) * 0.05
    args = lambda l: (l, k, "sigmoid", True, bias, 8, 4, 1.25, None, T // 2)  # noqa: E731
    static = torch.randn(T, E, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.topk_gating(*args(static))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.topk_gating(*args(static))
    for _ in range(2):
        static.copy_(torch.randn(T, E, device=DEV))
        graph.replay()
        eager = ops.topk_gating(*args(static))
        torch.cuda.synchronize()
        for a, b in zip(out, eager):
            assert torch.equal(a, b)


def test_cuda_limits():
    with pytest.raises(RuntimeError, match="up to 1024 experts"):
        moe_ext.topk_gating(torch.randn(4, 1025, device=DEV), 2)
    with pytest.raises(RuntimeError, match="k <= 32"):
        moe_ext.topk_gating(torch.randn(4, 64, device=DEV), 33)
    with pytest.raises(RuntimeError, match="same device"):
        moe_ext.topk_gating(torch.randn(4, 64, device=DEV), 2, expert_bias=torch.zeros(64))


def test_opcheck_cuda():
    torch.manual_seed(0)
    samples = []
    for dtype, rg in [(torch.float32, True), (torch.float64, True), (torch.bfloat16, False)]:
        logits = torch.randn(40, 16, dtype=dtype, device=DEV, requires_grad=rg)
        samples.append((logits, 2, "softmax", True, None, 0, 0, 0.0, None, 0))
        samples.append((logits, 3, "sigmoid", False, torch.randn(16, device=DEV), 4, 2, 1.0,
                        torch.randn(40, 16, device=DEV), 8))
    samples.append((torch.randn(0, 8, device=DEV), 2, "softmax", True, None, 0, 0, 1.0, None, 0))
    for args in samples:
        torch.library.opcheck(ops.topk_gating, args)


def test_update_expert_bias_on_device():
    bias = torch.zeros(4, device=DEV)
    moe_ext.update_expert_bias(bias, torch.tensor([10, 0, 5, 5], device=DEV), rate=0.1)
    torch.testing.assert_close(bias.cpu(), torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    # The kernel against the CPU op, bit for bit: E past one block of 1024 threads, counts past 2^31.
    for E in (1, 7, 256, 3000):
        load = torch.randint(0, 3, (E,), dtype=torch.int64) * (2 ** 33)
        bias = torch.randn(E)
        want = moe_ext.update_expert_bias(bias.clone(), load, rate=1e-3)
        got = bias.to(DEV)
        moe_ext.update_expert_bias(got, load.to(DEV), rate=1e-3)
        assert torch.equal(got.cpu(), want), E
