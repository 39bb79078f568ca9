"""The SwiGLU CUDA kernels (csrc/kernels/swiglu.cu: the forward and the gradient) against the CPU
ops and the float64 formulas: every dtype, the float32-grad case, odd widths (the scalar path) and aligned
ones (16-byte vectors), views, sizes past 2^31 elements, CUDA-graph capture. Outputs are poisoned
through the caching allocator (freed NaN-filled blocks of the output's size)."""
import pytest
import torch

import moe_ext.gemm
from moe_ext._ops import ops
from test_swiglu import DTYPES, forward_reference, reference, ulp_tol

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _poison(nbytes):
    bufs = [torch.full((max(int(nbytes), 1),), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(2)]
    torch.cuda.synchronize()
    del bufs


def _cpu_tol(dtype):
    """Against the CPU op: the same operations. In float32 (the accumulation type of the 16-bit
    dtypes too) both take exp from exp_rn.cuh, so the bits are equal; float64 uses each side's
    own exp, a last bit apart at most."""
    return dict(rtol=1e-15, atol=0) if dtype == torch.float64 else dict(rtol=0, atol=0)


def _run(grad, h):
    _poison(h.numel() * h.element_size())
    return ops.swiglu_backward(grad.cuda(), h.cuda())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1), (7, 3), (33, 8), (130, 24), (5, 1000), (1000, 7), (0, 8), (4, 0),
                                    (3000, 2048)])
def test_matches_cpu_and_float64(seed, dtype, rows, n):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, 2 * n, generator=gen) * 4).to(dtype)
    grad = torch.randn(rows, n, generator=gen).to(dtype)
    got = _run(grad, h).cpu()
    rtol, atol = ulp_tol(dtype)
    torch.testing.assert_close(got.double(), reference(grad, h), rtol=rtol, atol=atol)
    torch.testing.assert_close(got, ops.swiglu_backward(grad, h), **_cpu_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [8, 13])
def test_float32_grad_with_16_bit_h(seed, dtype, n):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(300, 2 * n, generator=gen).to(dtype)
    grad = torch.randn(300, n, generator=gen) * 1e-3 + 1.0
    got = _run(grad, h).cpu()
    rtol, atol = ulp_tol(dtype)
    torch.testing.assert_close(got.double(), reference(grad, h), rtol=rtol, atol=atol)
    torch.testing.assert_close(got, ops.swiglu_backward(grad, h), **_cpu_tol(dtype))


def test_views_and_misaligned_storage(seed):
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(64, 2 * 32 + 3, generator=gen).bfloat16().cuda()
    h = wide[:, 1:65]  # not contiguous, and one element off 16 bytes
    g = torch.randn(64, 32, generator=gen).bfloat16().cuda()
    g_off = torch.empty(64 * 32 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(64, 32).copy_(g)  # misaligned
    want = ops.swiglu_backward(g, h.contiguous())
    assert torch.equal(ops.swiglu_backward(g_off, h), want)
    assert torch.equal(ops.swiglu_backward(g.t().contiguous().t(), h), want)


def test_bitwise_deterministic_and_graph_capture(seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(513, 256, generator=gen).bfloat16().cuda()
    g = torch.randn(513, 128, generator=gen).bfloat16().cuda()
    eager = ops.swiglu_backward(g, h)
    assert torch.equal(eager, ops.swiglu_backward(g, h))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.swiglu_backward(g, h)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.swiglu_backward(g, h)
    h.copy_(torch.randn(513, 256, generator=gen).bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.swiglu_backward(g, h))


def test_past_int32_elements():
    """rows * 2n > 2^31: 64-bit offsets (about 4.3 GB of bfloat16 in all)."""
    if torch.cuda.get_device_properties(0).total_memory < 24 << 30:
        pytest.skip("needs 24 GiB")
    rows, n = (1 << 20) + 3, 1024
    h = torch.randn(rows, 2 * n, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    out = ops.swiglu_backward(g, h)
    tail = slice(rows - 5, rows)
    rtol, atol = ulp_tol(torch.bfloat16)
    torch.testing.assert_close(out[tail].cpu().double(), reference(g[tail].cpu(), h[tail].cpu()), rtol=rtol, atol=atol)
    del out, h, g
    torch.cuda.empty_cache()


def test_errors_match_cpu():
    h, g = torch.randn(4, 8, device="cuda"), torch.randn(4, 5, device="cuda")
    with pytest.raises(RuntimeError, match=r"grad must be \[rows=4, n=4\]"):
        ops.swiglu_backward(g, h)
    with pytest.raises(RuntimeError, match="same device"):
        ops.swiglu_backward(torch.randn(4, 4), h)


# ---- the forward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1), (7, 3), (33, 8), (130, 24), (5, 1000), (1000, 7), (0, 8), (4, 0),
                                    (3000, 2048)])
def test_forward_matches_cpu_and_float64(seed, dtype, rows, n):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, 2 * n, generator=gen) * 4).to(dtype)
    _poison(rows * n * h.element_size())
    got = ops.swiglu(h.cuda()).cpu()
    assert got.shape == (rows, n) and got.dtype == dtype
    rtol, atol = ulp_tol(dtype)
    torch.testing.assert_close(got.double(), forward_reference(h), rtol=rtol, atol=atol)
    torch.testing.assert_close(got, ops.swiglu(h), **_cpu_tol(dtype))


def test_forward_views_misaligned_graph_and_autograd(seed):
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(64, 2 * 32 + 3, generator=gen).bfloat16().cuda()
    h = wide[:, 1:65]  # not contiguous, one element off 16 bytes
    want = ops.swiglu(h.contiguous())
    assert torch.equal(ops.swiglu(h), want)
    off = torch.empty(64 * 64 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(64, 64).copy_(h)
    assert torch.equal(ops.swiglu(off), want)  # misaligned storage: the scalar path
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.swiglu(off)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.swiglu(off)
    off.copy_(torch.randn(64, 64, generator=gen).bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.swiglu(off))
    hg = off.detach().clone().requires_grad_()
    g = torch.randn(64, 32, generator=gen).bfloat16().cuda()
    moe_ext.gemm.swiglu(hg).backward(g)
    assert torch.equal(hg.grad, ops.swiglu_backward(g, off))


def test_forward_past_int32_elements():
    if torch.cuda.get_device_properties(0).total_memory < 24 << 30:
        pytest.skip("needs 24 GiB")
    rows, n = (1 << 20) + 3, 1024
    h = torch.randn(rows, 2 * n, device="cuda", dtype=torch.bfloat16)
    out = ops.swiglu(h)
    tail = slice(rows - 5, rows)
    rtol, atol = ulp_tol(torch.bfloat16)
    torch.testing.assert_close(out[tail].cpu().double(), forward_reference(h[tail].cpu()), rtol=rtol, atol=atol)
    del out, h
    torch.cuda.empty_cache()
