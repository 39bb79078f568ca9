"""grouped_gemm_masked (the masked decode layout) on CPU: float64 reference, agreement with the
contiguous grouped_gemm, gradients, opcheck, torch.compile and clear errors."""
import pytest
import torch
from torch.autograd import gradcheck

import moe_ext  # noqa: F401
from moe_ext.gemm import grouped_gemm, grouped_gemm_masked

ops = torch.ops.moe_ext


def _reference(a, b, valid, trans_b=False, activation=None, bias=None, row_scale=None):
    """float64 loop over experts, written without moe_ext."""
    E, R, _ = a.shape
    outs = []
    for e in range(E):
        w = b[e].double().t() if trans_b else b[e].double()
        h = torch.zeros(R, w.shape[1], dtype=torch.float64)
        v = int(valid[e])
        h[:v] = a[e, :v].double() @ w
        if bias is not None:
            h[:v] += bias[e].double()
        if activation == "swiglu":
            n = h.shape[1] // 2
            h = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
        if row_scale is not None:
            h = h * row_scale[e].double().unsqueeze(1)
        outs.append(h)
    return torch.stack(outs)


def _weights(E, K, N, trans_b, dtype):
    b = torch.randn(E, K, N, dtype=torch.float64) / K ** 0.5
    return (b.transpose(1, 2).contiguous() if trans_b else b).to(dtype)


def _valid(E, R, kind):
    if kind == "full":
        return torch.full((E,), R)
    if kind == "zero":
        return torch.zeros(E, dtype=torch.long)
    v = torch.randint(0, R + 1, (E,))
    v[0] = 0
    if E > 1:
        v[-1] = R
    return v


@pytest.mark.parametrize("E,R,K,N", [(1, 1, 8, 6), (3, 5, 8, 6), (8, 17, 24, 10), (16, 4, 9, 4), (2, 0, 8, 6)])
@pytest.mark.parametrize("kind", ["random", "full", "zero"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_matches_reference_float64(seed, E, R, K, N, kind, trans_b, activation, index_dtype):
    a = torch.randn(E, R, K, dtype=torch.float64)
    b = _weights(E, K, N, trans_b, torch.float64)
    valid = _valid(E, R, kind).to(index_dtype)
    y = grouped_gemm_masked(a, b, valid, trans_b=trans_b, activation=activation)
    assert y.shape == (E, R, N // 2 if activation == "swiglu" else N)
    torch.testing.assert_close(y, _reference(a, b, valid, trans_b, activation))


def test_rows_past_valid_are_zero_even_with_nan_inputs(seed):
    E, R, K, N = 4, 6, 8, 8
    a = torch.randn(E, R, K, dtype=torch.float64)
    valid = torch.tensor([0, 3, 6, 1])
    for e in range(E):
        a[e, int(valid[e]):] = float("nan")
    y = grouped_gemm_masked(a, _weights(E, K, N, False, torch.float64), valid)
    assert torch.isfinite(y).all()
    for e in range(E):
        assert (y[e, int(valid[e]):] == 0).all()


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_equals_contiguous_layout(seed, trans_b, activation):
    E, R, K, N = 5, 7, 16, 12
    a = torch.randn(E, R, K, dtype=torch.float64)
    b = _weights(E, K, N, trans_b, torch.float64)
    valid = _valid(E, R, "random")
    y = grouped_gemm_masked(a, b, valid, trans_b=trans_b, activation=activation)
    packed = torch.cat([a[e, :int(valid[e])] for e in range(E)])
    y_c = grouped_gemm(packed, b, valid, trans_b=trans_b, activation=activation)
    start = 0
    for e in range(E):
        v = int(valid[e])
        torch.testing.assert_close(y[e, :v], y_c[start:start + v])
        start += v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_error_within_twice_torch(seed, dtype, activation):
    E, R, K, N = 6, 40, 96, 64
    a = torch.randn(E, R, K).to(dtype)
    b = _weights(E, K, N, False, dtype)
    valid = _valid(E, R, "random")
    expect = _reference(a, b, valid, False, activation)
    ours = grouped_gemm_masked(a, b, valid, activation=activation).double()
    outs = []
    for e in range(E):
        h = torch.zeros(R, N, dtype=dtype)
        v = int(valid[e])
        h[:v] = a[e, :v] @ b[e]
        if activation == "swiglu":
            h = torch.nn.functional.silu(h[:, :N // 2]) * h[:, N // 2:]
        outs.append(h)
    err_torch = (torch.stack(outs).double() - expect).abs().max().item()
    err_ours = (ours - expect).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_gradcheck(seed, trans_b, activation):
    E, R, K, N = 3, 4, 5, 6
    a = torch.randn(E, R, K, dtype=torch.float64, requires_grad=True)
    b = _weights(E, K, N, trans_b, torch.float64).requires_grad_()
    valid = torch.tensor([2, 0, 4])
    assert gradcheck(lambda a_, b_: grouped_gemm_masked(a_, b_, valid, trans_b=trans_b, activation=activation),
                     (a, b))


@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_grad_ignores_rows_past_valid(seed, activation):
    """NaN in a's unused rows and in the incoming gradient's unused rows must not reach grad_b."""
    E, R, K, N = 3, 5, 8, 6
    valid = torch.tensor([2, 0, 5])
    a = torch.randn(E, R, K, dtype=torch.float64)
    a[0, 2:] = float("nan")
    a[1] = float("nan")
    a.requires_grad_()
    b = _weights(E, K, N, False, torch.float64).requires_grad_()
    y = grouped_gemm_masked(a, b, valid, activation=activation)
    g = torch.randn_like(y)
    g[0, 2:] = float("nan")
    y.backward(g)
    assert torch.isfinite(b.grad).all()
    assert (a.grad[0, 2:] == 0).all() and (a.grad[1] == 0).all()
    # Against the same gradient computed on the valid rows only.
    a2 = a.detach().clone()
    a2[0, 2:] = 0
    a2[1] = 0
    a2.requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    g2 = torch.where(torch.isnan(g), torch.zeros_like(g), g)
    grouped_gemm_masked(a2, b2, valid, activation=activation).backward(g2)
    torch.testing.assert_close(b.grad, b2.grad)
    torch.testing.assert_close(a.grad[0, :2], a2.grad[0, :2])
    torch.testing.assert_close(a.grad[2], a2.grad[2])


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_epilogue_matches_reference_and_contiguous(seed, trans_b, activation):
    E, R, K, N = 4, 6, 8, 10
    a = torch.randn(E, R, K, dtype=torch.float64)
    a[0, 3:] = float("nan")  # rows past valid_rows never reach the output, scaled or not
    b = _weights(E, K, N, trans_b, torch.float64)
    valid = torch.tensor([3, 0, 6, 2])
    bias, scale = torch.randn(E, N, dtype=torch.float64), torch.rand(E, R, dtype=torch.float64) + 0.5
    y = grouped_gemm_masked(a, b, valid, trans_b=trans_b, activation=activation, bias=bias, row_scale=scale)
    torch.testing.assert_close(y, _reference(torch.nan_to_num(a), b, valid, trans_b, activation, bias, scale))
    keep = torch.arange(R)[None, :] < valid[:, None]
    flat = grouped_gemm(a[keep], b, valid, trans_b=trans_b, activation=activation, bias=bias, row_scale=scale[keep])
    assert torch.equal(y[keep], flat)


@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_epilogue_grad_ignores_rows_past_valid(seed, activation):
    """NaN in the unused rows of a and of row_scale must not reach any gradient."""
    E, R, K, N = 3, 5, 8, 6
    valid = torch.tensor([2, 0, 5])
    a = torch.randn(E, R, K, dtype=torch.float64)
    scale = torch.rand(E, R, dtype=torch.float64) + 0.5
    a[0, 2:], a[1], scale[0, 2:], scale[1] = float("nan"), float("nan"), float("nan"), float("nan")
    a.requires_grad_()
    scale.requires_grad_()
    b = _weights(E, K, N, False, torch.float64).requires_grad_()
    bias = torch.randn(E, N, dtype=torch.float64, requires_grad=True)
    grouped_gemm_masked(a, b, valid, activation=activation, bias=bias, row_scale=scale).square().sum().backward()
    for name, t in (("a", a), ("b", b), ("bias", bias), ("row_scale", scale)):
        assert torch.isfinite(t.grad).all(), name
    assert (scale.grad[0, 2:] == 0).all() and (scale.grad[1] == 0).all()


@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_gradcheck_epilogue(seed, activation):
    E, R, K, N = 3, 4, 5, 6
    a = torch.randn(E, R, K, dtype=torch.float64, requires_grad=True)
    b = _weights(E, K, N, False, torch.float64).requires_grad_()
    bias = torch.randn(E, N, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(E, R, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([2, 0, 4])
    assert gradcheck(lambda *t: grouped_gemm_masked(t[0], t[1], valid, activation=activation, bias=t[2],
                                                    row_scale=t[3]), (a, b, bias, scale))


@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_backward_of_empty_shapes(activation):
    b = torch.randn(2, 8, 6, requires_grad=True)
    for a in (torch.randn(2, 0, 8, requires_grad=True), torch.randn(2, 3, 8, requires_grad=True)):
        grouped_gemm_masked(a, b, torch.tensor([0, 0]), activation=activation, bias=torch.zeros(2, 6),
                            row_scale=torch.ones(a.shape[:2])).sum().backward()
        assert a.grad.shape == a.shape and (a.grad == 0).all()
    a = torch.randn(0, 8, requires_grad=True)
    grouped_gemm(a, b, torch.tensor([0, 0]), activation=activation, row_scale=torch.ones(0)).sum().backward()
    assert a.grad.shape == (0, 8) and (b.grad == 0).all()


def _samples():
    torch.manual_seed(0)
    a = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 8, 6, dtype=torch.float64, requires_grad=True)
    bt = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([3, 0, 4])
    bias = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    return [(a, b, valid, False, "none"), (a, bt, valid.int(), True, "swiglu"),
            (torch.randn(3, 4, 8).bfloat16(), torch.randn(3, 8, 6).bfloat16(), valid, False, "none"),
            (a, b, valid, False, "swiglu", bias, scale), (a, bt, valid, True, "none", None, torch.rand(3, 4))]


def test_opcheck():
    for args in _samples():
        torch.library.opcheck(ops.grouped_gemm_masked.default, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(seed, backend):
    torch._dynamo.reset()
    E, R, K, N = 3, 4, 8, 12
    a = torch.randn(E, R, K, dtype=torch.float64, requires_grad=True)
    b = _weights(E, K, N, False, torch.float64).requires_grad_()
    valid = torch.tensor([1, 4, 0])

    def f(a_, b_):
        return grouped_gemm_masked(a_, b_, valid, activation="swiglu").square().sum()

    got = torch.compile(f, fullgraph=True, backend=backend, dynamic=False)(a, b)
    ga, gb = torch.autograd.grad(got, (a, b))
    want = f(a, b)
    wa, wb = torch.autograd.grad(want, (a, b))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ga, wa)
    torch.testing.assert_close(gb, wb)


A = torch.randn(3, 4, 8)
B = torch.randn(3, 8, 6)
V = torch.tensor([1, 2, 3])
BAD = {
    "valid too large": (lambda: grouped_gemm_masked(A, B, torch.tensor([1, 5, 0])), r"valid_rows\[1\] = 5 is outside"),
    "valid negative": (lambda: grouped_gemm_masked(A, B, torch.tensor([-1, 0, 0])), r"valid_rows\[0\] = -1"),
    "valid length": (lambda: grouped_gemm_masked(A, B, torch.tensor([1, 2])), r"valid_rows must be \[E=3\]"),
    "valid float": (lambda: grouped_gemm_masked(A, B, V.float()), "valid_rows must be int32 or int64"),
    "a 2-D": (lambda: grouped_gemm_masked(A[0], B, V), "a must be 3-D"),
    "b 2-D": (lambda: grouped_gemm_masked(A, B[0], V), "b must be 3-D"),
    "expert count": (lambda: grouped_gemm_masked(A[:2], B, V), "a has 2 experts"),
    "K mismatch": (lambda: grouped_gemm_masked(A, torch.randn(3, 5, 6), V), r"the K of b \(5"),
    "dtype": (lambda: grouped_gemm_masked(A, B.double(), V), "b must have the dtype of a"),
    "a strided": (lambda: grouped_gemm_masked(torch.randn(3, 4, 16)[:, :, ::2], B, V), "a must be contiguous"),
    "swiglu odd": (lambda: grouped_gemm_masked(A, torch.randn(3, 8, 5), V, activation="swiglu"), "even N"),
    "activation": (lambda: grouped_gemm_masked(A, B, V, activation="gelu"), "activation must be None or 'swiglu'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_clear_error(name):
    fn, pattern = BAD[name]
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        fn()
