"""grouped_gemm (CPU) against the float64 reference in reference.py."""
import pytest
import torch
from torch.autograd import gradcheck

import moe_ext
import reference as ref


def _counts(M, E, kind):
    if kind == "one":  # every row on the last expert
        c = torch.zeros(E, dtype=torch.int64)
        c[-1] = M
        return c
    c = torch.multinomial(torch.ones(E), M, replacement=True).bincount(minlength=E) if M else torch.zeros(E)
    if kind == "empty" and E > 1:  # move expert 0's rows to expert 1
        c[1] += c[0]
        c[0] = 0
    return c.long()


def _weights(E, K, N, trans_b, dtype):
    b = torch.randn(E, K, N, dtype=torch.float64) / K ** 0.5
    return (b.transpose(1, 2).contiguous() if trans_b else b).to(dtype)


@pytest.mark.parametrize("M,E,K,N", [(0, 3, 8, 6), (1, 1, 5, 3), (37, 8, 24, 10), (200, 3, 16, 32), (65, 16, 9, 4)])
@pytest.mark.parametrize("kind", ["random", "empty", "one"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_matches_reference_float64(seed, M, E, K, N, kind, trans_b, activation):
    if activation == "swiglu" and N % 2:
        pytest.skip("swiglu needs an even N (tested as a bad input)")
    a = torch.randn(M, K, dtype=torch.float64)
    b = _weights(E, K, N, trans_b, torch.float64)
    counts = _counts(M, E, kind)
    y = moe_ext.grouped_gemm(a, b, counts, trans_b=trans_b, activation=activation)
    torch.testing.assert_close(y, ref.grouped_gemm(a, b, counts, trans_b, activation))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_error_within_twice_torch(seed, dtype, activation):
    M, E, K, N = 300, 6, 96, 64
    a = torch.randn(M, K).to(dtype)
    b = _weights(E, K, N, False, dtype)
    counts = _counts(M, E, "random")
    expect = ref.grouped_gemm(a, b, counts, False, activation)
    ours = moe_ext.grouped_gemm(a, b, counts, activation=activation).double()
    # torch in the same dtype, one matmul per expert.
    outs, start = [], 0
    for e, m in enumerate(counts.tolist()):
        h = a[start:start + m] @ b[e]
        if activation == "swiglu":
            h = torch.nn.functional.silu(h[:, : N // 2]) * h[:, N // 2:]
        outs.append(h)
        start += m
    err_torch = (torch.cat(outs).double() - expect).abs().max().item()
    err_ours = (ours - expect).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


def test_offsets_equal_counts(seed):
    M, E, K, N = 50, 5, 8, 8
    a, b = torch.randn(M, K, dtype=torch.float64), _weights(E, K, N, False, torch.float64)
    counts = _counts(M, E, "empty")
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).int()
    assert torch.equal(moe_ext.grouped_gemm(a, b, counts.int()), moe_ext.grouped_gemm(a, b, offsets))


def test_rows_past_last_expert_are_zero(seed):
    M, E, K, N = 40, 4, 8, 6
    a, b = torch.randn(M, K, dtype=torch.float64), _weights(E, K, N, False, torch.float64)
    counts = torch.tensor([5, 0, 10, 7])
    y = moe_ext.grouped_gemm(a, b, counts)
    assert (y[22:] == 0).all()
    torch.testing.assert_close(y[:22], ref.grouped_gemm(a[:22], b, counts))


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("kind", ["random", "empty"])
def test_gradcheck(seed, trans_b, activation, kind):
    M, E, K, N = 11, 3, 4, 6
    a = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    b = _weights(E, K, N, trans_b, torch.float64).requires_grad_()
    counts = _counts(M, E, kind)
    assert gradcheck(lambda a_, b_: moe_ext.grouped_gemm(a_, b_, counts, trans_b=trans_b, activation=activation), (a, b))


@pytest.mark.parametrize("M,E,K,N", [(0, 3, 8, 6), (37, 8, 24, 10), (65, 16, 9, 4)])
@pytest.mark.parametrize("kind", ["random", "empty", "one"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("epilogue", ["bias", "scale", "both"])
def test_epilogue_matches_reference_float64(seed, M, E, K, N, kind, trans_b, activation, epilogue):
    a = torch.randn(M + 3, K, dtype=torch.float64)  # NOTE: 3 rows past the last expert stay zero
    b = _weights(E, K, N, trans_b, torch.float64)
    counts = _counts(M, E, kind)
    bias = torch.randn(E, N, dtype=torch.float64) if epilogue != "scale" else None
    scale = torch.rand(M + 3, dtype=torch.float64) + 0.5 if epilogue != "bias" else None
    y = moe_ext.grouped_gemm(a, b, counts, trans_b=trans_b, activation=activation, bias=bias, row_scale=scale)
    torch.testing.assert_close(y, ref.grouped_gemm(a, b, counts, trans_b, activation, bias, scale))
    assert (y[M:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_epilogue_rounds_once(seed, dtype, activation):
    # bias and row scale run on the float32 accumulator: the result equals the unfused float32
    # computation rounded once to dtype, not a chain of dtype roundings.
    M, E, K, N = 90, 5, 32, 24
    a, b = torch.randn(M, K).to(dtype), _weights(E, K, N, False, dtype)
    counts = _counts(M, E, "random")
    bias, scale = torch.randn(E, N).to(dtype), torch.rand(M) + 0.5
    y = moe_ext.grouped_gemm(a, b, counts, activation=activation, bias=bias, row_scale=scale)
    h = moe_ext.grouped_gemm(a.float(), b.float(), counts, activation=activation, bias=bias.float(), row_scale=scale)
    assert torch.equal(y, h.to(dtype))


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("kind", ["random", "empty"])
def test_gradcheck_epilogue(seed, trans_b, activation, kind):
    M, E, K, N = 11, 3, 4, 6
    a = torch.randn(M + 2, K, dtype=torch.float64, requires_grad=True)
    b = _weights(E, K, N, trans_b, torch.float64).requires_grad_()
    bias = torch.randn(E, N, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(M + 2, dtype=torch.float64, requires_grad=True)
    counts = _counts(M, E, kind)
    assert gradcheck(lambda *t: moe_ext.grouped_gemm(t[0], t[1], counts, trans_b=trans_b, activation=activation,
                                                     bias=t[2], row_scale=t[3]), (a, b, bias, scale))


def test_epilogue_grads_match_torch_autograd_float32(seed):
    # the float32 gradients (the bias one through the k-grouped GEMM) against autograd of the
    # unfused float64 reference
    M, E, K, N = 70, 4, 16, 12
    counts = _counts(M, E, "empty")
    a = torch.randn(M, K, requires_grad=True)
    b = _weights(E, K, N, False, torch.float32).requires_grad_()
    bias = torch.randn(E, N, requires_grad=True)
    scale = (torch.rand(M) + 0.5).requires_grad_()
    g = torch.randn(M, N // 2)
    y = moe_ext.grouped_gemm(a, b, counts, activation="swiglu", bias=bias, row_scale=scale)
    got = torch.autograd.grad((y * g).sum(), (a, b, bias, scale))
    leaves = [t.detach().double().requires_grad_() for t in (a, b, bias, scale)]
    r = ref.grouped_gemm(leaves[0], leaves[1], counts, False, "swiglu", leaves[2], leaves[3])
    want = torch.autograd.grad((r * g.double()).sum(), leaves)
    for name, x, w in zip(("a", "b", "bias", "row_scale"), got, want):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), w, rtol=1e-4, atol=1e-4, msg=name)


def test_epilogue_bad_inputs():
    a, b, counts = torch.randn(10, 8), torch.randn(3, 8, 6), torch.tensor([3, 3, 4])
    with pytest.raises(RuntimeError, match=r"bias must be \[E=3, N=6\]"):
        moe_ext.grouped_gemm(a, b, counts, bias=torch.randn(3, 3))
    with pytest.raises(RuntimeError, match="bias must have the dtype of a"):
        moe_ext.grouped_gemm(a, b, counts, bias=torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="row_scale must have one value per output row"):
        moe_ext.grouped_gemm(a, b, counts, row_scale=torch.rand(9))
    with pytest.raises(RuntimeError, match="row_scale must be a float tensor"):
        moe_ext.grouped_gemm(a, b, counts, row_scale=torch.ones(10, dtype=torch.int64))


def test_wgrad_matches_reference(seed):
    M, E, K, N = 60, 4, 7, 5
    a, dy = torch.randn(M, K, dtype=torch.float64), torch.randn(M, N, dtype=torch.float64)
    counts = _counts(M, E, "empty")
    dw = torch.ops.moe_ext.grouped_gemm_wgrad(a, dy, counts, E, False)
    starts = [0] + counts.cumsum(0).tolist()
    for e in range(E):
        torch.testing.assert_close(dw[e], a[starts[e]:starts[e + 1]].t() @ dy[starts[e]:starts[e + 1]])
    assert (dw[0] == 0).all()
    dw_t = torch.ops.moe_ext.grouped_gemm_wgrad(a, dy, counts, E, True)
    torch.testing.assert_close(dw_t, dw.transpose(1, 2))
