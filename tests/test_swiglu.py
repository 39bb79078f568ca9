"""The SwiGLU ops on the CPU: the forward (moe_ext::swiglu, moe_ext.gemm.swiglu) and its gradient
(moe_ext::swiglu_backward), against the float64 formula and torch autograd, every dtype and the
mixed (float32 grad, 16-bit h) case, odd and empty sizes, non-finite inputs, errors, gradcheck.
The CUDA kernels are checked against these ops in test_cuda_swiglu.py and, without a GPU, in
test_emu_kernels.py."""
import pytest
import torch

from moe_ext._ops import ops, swiglu_backward
from moe_ext.gemm import swiglu

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def reference(grad, h):
    """dL/dh by torch autograd of silu(gate) * up, in float64."""
    h64 = h.double().requires_grad_()
    n = h.shape[1] // 2
    y = torch.nn.functional.silu(h64[:, :n]) * h64[:, n:]
    y.backward(grad.double())
    return h64.grad


def ulp_tol(dtype):
    # float32 arithmetic then one rounding to dtype: a few float32 ulps before the final rounding.
    return {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 1e-6), torch.float16: (1e-3, 1e-4),
            torch.bfloat16: (8e-3, 1e-4)}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1), (7, 3), (33, 8), (130, 24), (5, 1000), (0, 8), (4, 0)])
def test_matches_float64_autograd(seed, dtype, rows, n):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, 2 * n, generator=gen) * 4).to(dtype)
    grad = torch.randn(rows, n, generator=gen).to(dtype)
    got = swiglu_backward(grad, h)
    assert got.dtype == dtype and got.shape == h.shape and got.is_contiguous()
    rtol, atol = ulp_tol(dtype)
    torch.testing.assert_close(got.double(), reference(grad, h), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_grad_with_16_bit_h(seed, dtype):
    """The row-scale path hands a float32 gradient to a 16-bit h: no rounding of grad first."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(64, 48, generator=gen).to(dtype)
    grad = torch.randn(64, 24, generator=gen) * 1e-3 + 1.0  # below 16-bit resolution around 1
    got = swiglu_backward(grad, h)
    rtol, atol = ulp_tol(dtype)
    torch.testing.assert_close(got.double(), reference(grad, h), rtol=rtol, atol=atol)
    # A float64 or float16 grad is taken in float32 too (exact for float16).
    assert torch.equal(swiglu_backward(grad.half(), h), swiglu_backward(grad.half().float(), h))


def test_non_contiguous_inputs_and_extremes():
    h = torch.tensor([[-1e4, 0.0, 88.0, -0.0, 1.0, 2.0, 3.0, 4.0],
                      [float("inf"), float("-inf"), float("nan"), 1.0, 1.0, 1.0, 1.0, 1.0]])
    grad = torch.ones(2, 4)
    got = swiglu_backward(grad, h)
    ref = reference(grad, h)
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite].double(), ref[finite], rtol=2e-6, atol=1e-6)
    assert torch.isnan(got[1, 2])  # NaN in, NaN out
    # Views: a transposed grad and a column slice of a wider h.
    wide = torch.randn(16, 40)
    h = wide[:, 4:36]
    g = torch.randn(16, 16).t().contiguous().t()
    torch.testing.assert_close(swiglu_backward(g, h), swiglu_backward(g.contiguous(), h.contiguous()), rtol=0, atol=0)


def test_bitwise_deterministic(seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(257, 96, generator=gen).bfloat16()
    g = torch.randn(257, 48, generator=gen).bfloat16()
    assert torch.equal(swiglu_backward(g, h), swiglu_backward(g, h))


@pytest.mark.parametrize("case", ["h_odd", "h_1d", "grad_rows", "grad_cols", "h_int", "grad_int"])
def test_errors_name_the_argument(case):
    h, g = torch.randn(4, 8), torch.randn(4, 4)
    bad = {
        "h_odd": (g, torch.randn(4, 7), "h must be 2-D"),
        "h_1d": (g, torch.randn(8), "h must be 2-D"),
        "grad_rows": (torch.randn(3, 4), h, r"grad must be \[rows=4, n=4\]"),
        "grad_cols": (torch.randn(4, 5), h, r"grad must be \[rows=4, n=4\]"),
        "h_int": (g, torch.ones(4, 8, dtype=torch.int32), "h must be float32"),
        "grad_int": (torch.ones(4, 4, dtype=torch.int64), h, "grad must be a float tensor"),
    }[case]
    with pytest.raises(RuntimeError, match=bad[2]):
        ops.swiglu_backward(bad[0], bad[1])


def test_opcheck():
    torch.library.opcheck(ops.swiglu_backward, (torch.randn(5, 6), torch.randn(5, 12)))
    torch.library.opcheck(ops.swiglu_backward, (torch.randn(5, 6), torch.randn(5, 12).bfloat16()))


# ---- the forward ----------------------------------------------------------------------------------

def forward_reference(h):
    n = h.shape[1] // 2
    h64 = h.double()
    return torch.nn.functional.silu(h64[:, :n]) * h64[:, n:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1), (7, 3), (33, 8), (130, 24), (5, 1000), (0, 8), (4, 0)])
def test_forward_matches_float64(seed, dtype, rows, n):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, 2 * n, generator=gen) * 4).to(dtype)
    got = swiglu(h)
    assert got.dtype == dtype and got.shape == (rows, n) and got.is_contiguous()
    rtol, atol = ulp_tol(dtype)
    torch.testing.assert_close(got.double(), forward_reference(h), rtol=rtol, atol=atol)
    if dtype in (torch.float16, torch.bfloat16):  # float32 math, one rounding: as PyTorch's float32 formula
        want = (torch.nn.functional.silu(h[:, :n].float()) * h[:, n:].float()).to(dtype)
        assert (got.float() - want.float()).abs().le(want.float().abs() * 2 * torch.finfo(dtype).eps).all()


def test_forward_views_extremes_and_determinism(seed):
    h = torch.tensor([[-1e4, 0.0, 88.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0,
                       2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    got = swiglu(h)
    assert got[0, 0] == 0 and got[0, 1] == 0 and torch.isnan(got[0, 6])  # silu(-1e4) = -0; NaN in, NaN out
    assert got[0, 4] == float("inf") and got[0, 2] == 88.0 * 2.0
    wide = torch.randn(16, 2 * 24 + 5)
    assert torch.equal(swiglu(wide[:, 2:50]), swiglu(wide[:, 2:50].contiguous()))
    gen = torch.Generator().manual_seed(seed)
    hb = torch.randn(257, 96, generator=gen).bfloat16()
    assert torch.equal(swiglu(hb), swiglu(hb))


@pytest.mark.parametrize("case", ["odd", "1d", "int"])
def test_forward_errors_name_the_argument(case):
    h = {"odd": torch.randn(4, 7), "1d": torch.randn(8), "int": torch.ones(4, 8, dtype=torch.int32)}[case]
    with pytest.raises(RuntimeError, match=r"moe_ext.swiglu: h must be"):
        ops.swiglu(h)


def test_forward_autograd():
    """gradcheck in float64 (the backward is swiglu_backward), and the 16-bit gradient against
    autograd through the float32 formula."""
    h = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h,))
    hb = torch.randn(9, 16).bfloat16().requires_grad_()
    g = torch.randn(9, 8).bfloat16()
    swiglu(hb).backward(g)
    assert torch.equal(hb.grad, swiglu_backward(g, hb.detach()))


def test_forward_opcheck():
    torch.library.opcheck(ops.swiglu, (torch.randn(5, 12),))
    torch.library.opcheck(ops.swiglu, (torch.randn(5, 12, dtype=torch.float64, requires_grad=True),))
    torch.library.opcheck(ops.swiglu, (torch.randn(5, 12).bfloat16(),))


def _ulps(got, want):
    """|got - want| in units of the float32 spacing at want (the smallest subnormal at least)."""
    want32 = want.float()
    spacing = (torch.nextafter(want32.abs(), torch.tensor(float("inf"))) - want32.abs()).double()
    return (got.double() - want).abs() / spacing.clamp_min(2.0 ** -149)


@pytest.mark.parametrize("part", range(4))
def test_float32_exp_over_a_dense_sample(part):
    """float32 SwiGLU uses exp_rn (csrc/kernels/exp_rn.cuh, shared with the CUDA kernel): silu(x) =
    x / (1 + e^-x) stays within 3 ulp of the float64 value over every 64th float32 in [-87, 87]
    (a quarter of them per case; exp_rn alone is within 1.22 ulp over every float32, by an
    exhaustive host run), in the forward and in the gradient's d/d(up)."""
    top = torch.tensor(87.0).view(torch.int32).item()  # the bits of 87.0; -87.0 has the sign bit too
    bits = torch.arange(0, top + 1, 64, dtype=torch.int64)[part::4]
    x = bits.int().view(torch.float32)
    x = torch.cat([-x.flip(0), x])
    h = torch.stack([x, torch.ones_like(x)], 1)
    got = ops.swiglu(h)[:, 0]
    want = torch.nn.functional.silu(x.double())
    assert _ulps(got, want).max().item() <= 3
    # The gradient's d/d(up) = g * silu(gate), there computed as x * (1 / (1 + e^-x)).
    d_up = ops.swiglu_backward(torch.ones(len(x), 1), h)[:, 1]
    assert _ulps(d_up, want).max().item() <= 3
