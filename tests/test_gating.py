"""topk_gating (CPU) against the float64 reference in reference.py."""
import itertools
import math

import pytest
import torch
from torch.autograd import gradcheck

import moe_ext
import reference as ref

OPTIONS = [
    dict(),
    dict(renormalize=False),
    dict(capacity_factor=1.0),
    dict(capacity_factor=0.5, renormalize=False),
    dict(num_groups=4, topk_groups=2),
    dict(expert_bias="rand"),
    dict(expert_bias="rand", num_groups=4, topk_groups=3, capacity_factor=1.25),
    dict(seq_len="half"),
]


def _materialise(opts, T, E):
    opts = dict(opts)
    if opts.get("expert_bias") == "rand":
        opts["expert_bias"] = torch.randn(E) * 0.05
    if opts.get("seq_len") == "half":
        opts["seq_len"] = T // 2 if T >= 2 and T % 2 == 0 else None
    return opts


def _check(logits, k, exact_idx=True, **opts):
    w, idx, st = moe_ext.topk_gating(logits, k, **opts)
    r = ref.gating(logits, k, noise=st.noise, **{o: v for o, v in opts.items() if o not in ("noise_std", "generator")})
    assert w.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert idx.dtype == torch.int32 and st.tokens_per_expert.dtype == torch.int32
    if exact_idx:
        assert torch.equal(idx.long(), r["idx"])
        assert torch.equal(st.positions.long(), r["positions"])
        assert torch.equal(st.tokens_per_expert.long(), r["tokens_per_expert"])
    tol = dict(rtol=1e-5, atol=1e-6) if logits.dtype != torch.float64 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.double(), r["weights"], **tol)
    for name in ("aux_loss", "seq_aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(st, name).double(), r[name], **tol)
    return w, idx, st


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 8, 2), (7, 60, 6), (129, 64, 8), (300, 8, 1), (257, 384, 4)])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{a}={b}" for a, b in o.items()) or "plain")
def test_matches_reference_float64(seed, score, T, E, k, opts):
    opts = _materialise(opts, T, E)
    if opts.get("num_groups") and k > opts["topk_groups"] * (E // opts["num_groups"]):
        pytest.skip("k larger than the allowed groups")
    _check(torch.randn(T, E, dtype=torch.float64) * 2, k, score=score, **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_low_precision_logits(seed, dtype, score):
    """Float32 math inside: weights and losses to 1e-5, indices exact. Rows whose top-(k+1) scores
    hold a near-tie that float32 cannot order like float64 are left out (exact ties are kept)."""
    T, E, k = 600, 64, 6
    logits = (torch.randn(T, E) * 3).to(dtype)
    s = torch.softmax(logits.double(), -1) if score == "softmax" else torch.sigmoid(logits.double())
    top = torch.sort(s, -1, descending=True).values[:, : k + 1]
    gaps = top[:, :-1] - top[:, 1:]
    ambiguous = ((gaps > 0) & (gaps < 1e-5 * top[:, :-1])).any(-1)
    assert ambiguous.float().mean() < 0.1
    _check(logits[~ambiguous], k, score=score, capacity_factor=1.5, seq_len=None)


def test_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    _, idx, _ = moe_ext.topk_gating(logits, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    # Group ties too: groups {0,1} and {2,3} score the same; the lower group wins.
    logits = torch.zeros(1, 4, dtype=torch.float64)
    _, idx, _ = moe_ext.topk_gating(logits, 2, num_groups=2, topk_groups=1)
    assert idx.tolist() == [[0, 1]]


def test_group_limited_excludes_other_groups():
    # Expert 7 has the best single score but group 0 has the best top-2 sum.
    logits = torch.log(torch.tensor([[0.20, 0.20, 0.0, 0.0, 0.0, 0.0, 0.0, 0.30]], dtype=torch.float64) + 1e-3)
    _, idx, _ = moe_ext.topk_gating(logits, 1, num_groups=4, topk_groups=1)
    assert idx.tolist() == [[0]]
    _, idx, _ = moe_ext.topk_gating(logits, 1)
    assert idx.tolist() == [[7]]


def test_bias_selects_but_does_not_weight():
    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 10.0])
    w, idx, _ = moe_ext.topk_gating(logits, 1, expert_bias=bias, renormalize=False)
    assert idx.tolist() == [[2]]
    torch.testing.assert_close(w, torch.softmax(logits, -1)[:, 2:3])


def test_all_tokens_one_expert_capacity(seed):
    T, E, k = 64, 8, 2
    logits = torch.randn(T, E, dtype=torch.float64)
    logits[:, 3] += 100
    w, idx, st = _check(logits, k, capacity_factor=1.0)
    cap = math.ceil(T * k / E)
    assert st.tokens_per_expert[3] == cap
    assert (idx[:, 0] == 3).sum() == cap and (idx[cap:, 0] == -1).all()
    assert (w[idx == -1] == 0).all()
    assert st.positions[:cap, 0].tolist() == list(range(cap))


@pytest.mark.parametrize("cf", [1e18, 1e300, math.inf])
def test_huge_capacity_factor_drops_nothing(seed, cf):
    """A capacity past int64 (or infinite) keeps every slot, as no capacity does (it became 1)."""
    logits = torch.randn(6, 8)
    want_w, want_idx, want = moe_ext.topk_gating(logits, 2)
    w, idx, st = moe_ext.topk_gating(logits, 2, capacity_factor=cf)
    assert torch.equal(idx, want_idx) and torch.equal(w, want_w)
    assert torch.equal(st.positions, want.positions)
    assert torch.equal(st.tokens_per_expert, want.tokens_per_expert)


def test_noise_reproducible_from_generator(seed):
    logits = torch.randn(50, 16)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = moe_ext.topk_gating(logits, 2, noise_std=1.0, generator=g1)
    b = moe_ext.topk_gating(logits, 2, noise_std=1.0, generator=g2)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) and a[2].noise is not None
    # The noise used is returned; passing it back reproduces the routing exactly.
    c = moe_ext.topk_gating(logits, 2, noise=a[2].noise)
    assert torch.equal(a[1], c[1])
    _check(logits.double(), 2, noise_std=0.5, generator=torch.Generator().manual_seed(3))


def test_deterministic_across_thread_counts(seed):
    logits = torch.randn(3000, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = moe_ext.topk_gating(logits, 4, seq_len=300, capacity_factor=1.1)
        torch.set_num_threads(max(2, before))
        b = moe_ext.topk_gating(logits, 4, seq_len=300, capacity_factor=1.1)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for x, y in zip(a[2][:4], b[2][:4]):
        assert torch.equal(x, y)


GRAD_CASES = list(itertools.product(
    ["softmax", "sigmoid"], [True, False],
    [dict(), dict(capacity_factor=0.75), dict(num_groups=3, topk_groups=2), dict(expert_bias="rand"), dict(seq_len=3)]))


@pytest.mark.parametrize("score,renormalize,opts", GRAD_CASES)
def test_gradcheck(seed, score, renormalize, opts):
    T, E, k = 12, 6, 2
    opts = _materialise(opts, T, E)
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    weights_w = torch.randn(T, k, dtype=torch.float64)

    def f(lg):
        w, _, st = moe_ext.topk_gating(lg, k, score=score, renormalize=renormalize, **opts)
        return (w * weights_w).sum(), st.aux_loss, st.seq_aux_loss, st.z_loss

    assert gradcheck(f, (logits,))


def test_backward_matches_autograd_of_reference(seed):
    T, E, k = 40, 16, 4
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    gw = torch.randn(T, k, dtype=torch.float64)
    w, idx, st = moe_ext.topk_gating(logits, k, score="sigmoid", seq_len=10, capacity_factor=1.0)
    ((w * gw).sum() + 0.3 * st.aux_loss + 0.7 * st.seq_aux_loss + 0.1 * st.z_loss).backward()
    l2 = logits.detach().clone().requires_grad_()
    r = ref.gating(l2, k, score="sigmoid", seq_len=10, capacity_factor=1.0)
    ((r["weights"] * gw).sum() + 0.3 * r["aux_loss"] + 0.7 * r["seq_aux_loss"] + 0.1 * r["z_loss"]).backward()
    torch.testing.assert_close(logits.grad, l2.grad)


def test_update_expert_bias():
    bias = torch.zeros(4)
    moe_ext.update_expert_bias(bias, torch.tensor([10, 0, 5, 5]), rate=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


@pytest.mark.parametrize("E", [1, 3, 256, 1025])
@pytest.mark.parametrize("counts_dtype", [torch.int32, torch.int64, torch.float32])
def test_update_expert_bias_random(E, counts_dtype, seed):
    # Counts whose mean is often exactly some expert's load (ties give sign 0), and huge ones
    # (float32 sums would round: the sign must still be exact).
    load = torch.randint(0, 4, (E,)) * (2 ** 40 if counts_dtype == torch.int64 else 1)
    load = load.to(counts_dtype)
    bias = torch.randn(E)
    sign = torch.sign(load.double().sum() - E * load.double())  # exact for these sizes
    want = bias + torch.tensor(0.01) * sign.float()  # float32, as documented
    got = moe_ext.update_expert_bias(bias.clone(), load, rate=0.01)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    mean = load.double().mean()
    assert torch.equal(got > bias, load.double() < mean) and torch.equal(got < bias, load.double() > mean)


def test_update_expert_bias_op_checks():
    bias = torch.zeros(4)
    with pytest.raises(RuntimeError, match="tokens_per_expert must be int64"):
        torch.ops.moe_ext.update_expert_bias_(bias, torch.zeros(4, dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match="expert_bias must be a contiguous float32"):
        torch.ops.moe_ext.update_expert_bias_(bias.double(), torch.zeros(4, dtype=torch.long), 0.1)
    with pytest.raises(RuntimeError, match=r"tokens_per_expert must be \[E\] like expert_bias"):
        torch.ops.moe_ext.update_expert_bias_(bias, torch.zeros(5, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="must both be"):
        moe_ext.update_expert_bias(bias, torch.zeros(5, dtype=torch.long))
    torch.library.opcheck(torch.ops.moe_ext.update_expert_bias_, (bias, torch.tensor([3, 1, 0, 4]), 0.5))
