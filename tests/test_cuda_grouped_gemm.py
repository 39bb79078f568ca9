"""CUDA grouped GEMM (csrc/kernels/grouped_gemm*.cu) against float64 references and the CPU op.

Floating outputs are judged the way flash-attention's tests do: the kernel's error against a
float64 reference must be at most twice the error of PyTorch doing the same in the same dtype
(one torch.matmul per expert; torch._grouped_mm too where it exists), plus a tiny atol. Rows no
expert owns must be exactly zero. Outputs are allocated by the ops, so "poisoned" outputs are
poisoned through the caching allocator: blocks of the outputs' sizes are filled with 0xFF (NaN in
bf16/fp16) and freed just before the call, so any element the kernel forgets to write shows up.
"""
import math

import pytest
import torch

import moe_ext
from moe_ext.gemm import grouped_gemm_masked

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ops = torch.ops.moe_ext
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(params=["portable", "sm90"])
def kernel(request, monkeypatch):
    """Runs the test with each forward kernel (MOE_EXT_GROUPED_GEMM_KERNEL; read at every call).
    The weight gradient keeps its default (portable) here, so that a failure names one kernel; its
    Hopper version is tested by the wgrad tests (wgrad_kernel)."""
    if request.param == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernel needs an sm_90 device")
    monkeypatch.setenv("MOE_EXT_GROUPED_GEMM_KERNEL", request.param)
    return request.param


@pytest.fixture(params=["portable", "sm90"])
def wgrad_kernel(request, monkeypatch):
    """Runs the test with each weight-gradient kernel (MOE_EXT_GROUPED_WGRAD_KERNEL; read at every
    call; auto is the portable kernel until the Hopper one has been verified on a GPU)."""
    if request.param == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper weight gradient needs an sm_90 device")
    monkeypatch.setenv("MOE_EXT_GROUPED_WGRAD_KERNEL", request.param)
    return request.param


# ---- helpers ---------------------------------------------------------------------------------------

def _counts(total, E, kind, gen):
    """[E] int64 counts summing to `total` (on the CPU)."""
    if kind == "one":  # every row on one expert in the middle
        c = torch.zeros(E, dtype=torch.int64)
        c[E // 2] = total
        return c
    if kind == "odd":  # every count odd (needs total >= E and total - E even; callers pick totals so)
        base = torch.ones(E, dtype=torch.int64)
        extra = total - E
        assert extra >= 0 and extra % 2 == 0
        pairs = torch.multinomial(torch.ones(E), extra // 2, replacement=True, generator=gen).bincount(minlength=E)
        return base + 2 * pairs
    weights = torch.ones(E)
    if kind == "zipf":
        weights = 1.0 / torch.arange(1, E + 1, dtype=torch.float64).pow(1.2)
        weights = weights[torch.randperm(E, generator=gen)].float()
    c = torch.multinomial(weights, total, replacement=True, generator=gen).bincount(minlength=E) if total else \
        torch.zeros(E, dtype=torch.int64)
    if kind == "empty" and E > 1:  # experts 0 and E // 2 lose their rows to expert 1
        for e in {0, E // 2} - {1}:
            c[1] += c[e]
            c[e] = 0
    return c.long()


def _weights(E, K, N, trans_b, dtype, device="cuda"):
    b = torch.randn(E, K, N, device=device) / math.sqrt(K)
    return (b.transpose(1, 2).contiguous() if trans_b else b).to(dtype)


def _swiglu(h):
    n = h.shape[-1] // 2
    return torch.nn.functional.silu(h[..., :n]) * h[..., n:]


def _ref64(a, b, counts, trans_b=False, activation=None, bias=None, scale=None):
    """float64 on the CPU: rows of each expert through its weight; rows past the groups zero."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    counts = counts.cpu().long()
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.zeros(a.shape[0], N // 2 if activation == "swiglu" else N, dtype=torch.float64)
    start = 0
    for e, m in enumerate(counts.tolist()):
        w = b[e].t() if trans_b else b[e]
        h = a[start:start + m] @ w
        if bias is not None:
            h = h + bias[e].double().cpu()
        if activation == "swiglu":
            h = _swiglu(h)
        if scale is not None:
            h = h * scale[start:start + m, None].double().cpu()
        out[start:start + m] = h
        start += m
    return out


def _torch_per_expert(a, b, counts, trans_b=False, activation=None):
    """What a user writes in plain torch, in the inputs' dtype: one matmul per expert."""
    N = b.shape[1] if trans_b else b.shape[2]
    out = torch.zeros(a.shape[0], N // 2 if activation == "swiglu" else N, dtype=a.dtype, device=a.device)
    start = 0
    for e, m in enumerate(counts.tolist()):
        w = b[e].t() if trans_b else b[e]
        h = a[start:start + m] @ w
        out[start:start + m] = _swiglu(h) if activation == "swiglu" else h
        start += m
    return out


def _torch_grouped_mm(a, b, counts, trans_b=False, activation=None):
    """torch._grouped_mm where it exists and accepts the problem, else None."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None or a.dtype != torch.bfloat16:
        return None
    try:
        offs = counts.cumsum(0).to(torch.int32).to(a.device)
        w = b.transpose(1, 2) if trans_b else b
        h = fn(a, w, offs=offs)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    if activation == "swiglu":
        h = _swiglu(h)
    total = int(counts.sum())
    h = h.clone()
    h[total:] = 0
    return h


def _max_err(x, ref):
    return (x.detach().double().cpu() - ref).abs().max().item() if ref.numel() else 0.0


def _assert_within_torch_error(ours, ref, baselines, what, atol=1e-5):
    err = _max_err(ours, ref)
    for name, base in baselines.items():
        if base is None:
            continue
        err_t = _max_err(base, ref)
        assert err <= 2 * err_t + atol, f"{what}: our error {err:.3e} > 2 x {name}'s {err_t:.3e}"
    return err


def _poison(*shapes_dtypes):
    """Fills blocks of these sizes with 0xFF (NaN in bf16/fp16) and frees them, so the next
    allocations of the same sizes (the op's outputs) start as NaN rather than zeros."""
    bufs = []
    for shape, dtype in shapes_dtypes:
        n = max(1, math.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        bufs += [torch.full((n,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(2)]
    torch.cuda.synchronize()
    del bufs


def _run(a, b, counts, trans_b, activation):
    N = b.shape[1] if trans_b else b.shape[2]
    n_out = N // 2 if activation == "swiglu" else N
    _poison(((a.shape[0], n_out), a.dtype))
    return moe_ext.grouped_gemm(a, b, counts, trans_b=trans_b, activation=activation)


# ---- forward ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("E", [1, 8, 32, 128, 256])
@pytest.mark.parametrize("kind", ["random", "odd", "empty", "one", "zipf"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_float64(kernel, seed, E, kind, trans_b, activation, dtype):
    gen = torch.Generator().manual_seed(seed)
    # K and N multiples of 8 but not of the 32 / 128 tile; M odd; 3 rows past the last group.
    K, N = 72, (272 if activation == "swiglu" else 136)
    total = 2 * E + 1001 if kind != "odd" else E + 2 * 500
    M = total + 3
    a = torch.randn(M, K, device="cuda").to(dtype)
    b = _weights(E, K, N, trans_b, dtype)
    counts = _counts(total, E, kind, gen)
    ref = _ref64(a, b, counts, trans_b, activation)
    y = _run(a, b, counts.cuda(), trans_b, activation)
    assert y.dtype == dtype and y.shape == ref.shape and y.device == a.device
    assert not torch.isnan(y).any(), "an output element was never written"
    assert (y[total:] == 0).all(), "rows past the last group must be zero"
    _assert_within_torch_error(y, ref, {
        "torch.matmul per expert": _torch_per_expert(a, b, counts, trans_b, activation),
        "torch._grouped_mm": _torch_grouped_mm(a, b, counts, trans_b, activation),
    }, f"E={E} {kind} trans_b={trans_b} {activation} {dtype}")


# Larger problems: many K stages, many tiles per persistent CTA, both tile heights (M / E > 96
# takes 128-row tiles, smaller experts 64-row tiles), N tails inside a 128-column tile.
BIG = [
    # M, E, K, N, kind
    (4099, 8, 1024, 2056, "random"),
    (4099, 8, 1032, 1024, "zipf"),
    (8192, 64, 512, 776, "zipf"),
    (2048, 64, 2048, 512, "random"),   # 32 rows per expert: 64-row tiles
    (777, 1, 4096, 136, "one"),
    (3000, 32, 264, 4104, "empty"),
]


@pytest.mark.parametrize("M,E,K,N,kind", BIG)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_forward_large_shapes(kernel, seed, M, E, K, N, kind, trans_b, activation):
    if activation == "swiglu" and N % 16:
        N += 8
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = _weights(E, K, N, trans_b, torch.bfloat16)
    counts = _counts(M - 5, E, kind, gen)
    ref = _ref64(a, b, counts, trans_b, activation)
    y = _run(a, b, counts.cuda(), trans_b, activation)
    assert not torch.isnan(y).any()
    assert (y[M - 5:] == 0).all()
    _assert_within_torch_error(y, ref, {
        "torch.matmul per expert": _torch_per_expert(a, b, counts, trans_b, activation),
        "torch._grouped_mm": _torch_grouped_mm(a, b, counts, trans_b, activation),
    }, f"M={M} E={E} K={K} N={N} {kind}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_cpu_op_closely(kernel, seed, dtype):
    """Same dtype on both sides: the CPU op also accumulates in float32 and rounds once."""
    M, E, K, N = 1500, 16, 256, 384
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K).to(dtype)
    b = _weights(E, K, N, False, dtype, device="cpu")
    counts = _counts(M - 7, E, "zipf", gen)
    for act in (None, "swiglu"):
        want = moe_ext.grouped_gemm(a, b, counts, activation=act)
        got = moe_ext.grouped_gemm(a.cuda(), b.cuda(), counts.cuda(), activation=act).cpu()
        # One rounding of a float32 sum in another order: at most 1 ulp apart almost everywhere.
        torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_offsets_equal_counts_bitwise(kernel, seed, index_dtype):
    M, E, K, N = 999, 12, 64, 96
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = _weights(E, K, N, False, torch.bfloat16)
    counts = _counts(M - 9, E, "empty", gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    y_counts = moe_ext.grouped_gemm(a, b, counts.to(index_dtype).cuda())
    y_offsets = moe_ext.grouped_gemm(a, b, offsets.to(index_dtype).cuda())
    assert torch.equal(y_counts, y_offsets)
    assert torch.equal(y_counts, moe_ext.grouped_gemm(a, b, counts.long().cuda()))


def test_rows_past_groups_are_zero_and_never_read(kernel, seed):
    """The rows past offsets[E] hold NaN (a worst-case buffer): their output is 0 and no NaN leaks."""
    M, E, K, N = 600, 6, 128, 128
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    counts = torch.tensor([50, 0, 100, 3, 0, 200])
    used = int(counts.sum())
    a[used:] = float("nan")
    b = _weights(E, K, N, False, torch.bfloat16)
    for act in (None, "swiglu"):
        y = _run(a, b, counts.cuda(), False, act)
        assert (y[used:] == 0).all()
        assert torch.isfinite(y[:used]).all()
        _assert_within_torch_error(y[:used], _ref64(a[:used], b, counts, False, act),
                                   {"torch.matmul": _torch_per_expert(a[:used], b, counts, False, act)}, "tail")


def test_all_experts_empty_gives_zeros(kernel):
    a = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    b = _weights(5, 64, 32, False, torch.bfloat16)
    y = _run(a, b, torch.zeros(5, dtype=torch.int32, device="cuda"), False, None)
    assert (y == 0).all()


def test_k_zero_gives_zeros_and_m_zero_gives_empty():
    """K = 0 (auto: the portable kernel; the Hopper one needs K > 0)."""
    b = torch.randn(3, 0, 16, device="cuda", dtype=torch.bfloat16)
    y = moe_ext.grouped_gemm(torch.randn(10, 0, device="cuda", dtype=torch.bfloat16), b,
                             torch.tensor([4, 0, 6], device="cuda"))
    assert y.shape == (10, 16) and (y == 0).all()
    y = moe_ext.grouped_gemm(torch.randn(0, 16, device="cuda", dtype=torch.bfloat16),
                             _weights(3, 16, 8, False, torch.bfloat16), torch.zeros(3, dtype=torch.int64, device="cuda"))
    assert y.shape == (0, 8)


def test_clamps_values_it_cannot_check(kernel, seed):
    """Negative counts and counts past M are not checked on the device (that would need a host
    sync): they are clamped, every output row is still written once, and nothing is read out of
    bounds (compute-sanitizer would flag it)."""
    M, E, K, N = 100, 4, 32, 16
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = _weights(E, K, N, False, torch.bfloat16)
    counts = torch.tensor([30, -5, 50, 1000])
    y = _run(a, b, counts.cuda(), False, None)
    clamped = torch.tensor([30, 0, 50, 20])  # the last group ends at M
    _assert_within_torch_error(y, _ref64(a, b, clamped), {"torch.matmul": _torch_per_expert(a, b, clamped)}, "clamp")


def test_unaligned_view_is_handled(kernel, seed):
    """A contiguous view whose data starts mid-vector is copied once, not misread."""
    M, E, K, N = 64, 2, 16, 16
    buf = torch.randn(M * K + 1, device="cuda", dtype=torch.bfloat16)
    a = buf[1:].view(M, K)
    assert a.data_ptr() % 16 != 0
    b = _weights(E, K, N, False, torch.bfloat16)
    counts = torch.tensor([20, 44])
    y = moe_ext.grouped_gemm(a, b, counts.cuda())
    _assert_within_torch_error(y, _ref64(a, b, counts), {"torch.matmul": _torch_per_expert(a, b, counts)}, "view")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_float64_take_the_aten_path(seed, dtype):
    M, E, K, N = 77, 3, 12, 10  # no alignment needed on this path
    a = torch.randn(M, K, device="cuda", dtype=dtype)
    b = _weights(E, K, N, False, dtype)
    counts = torch.tensor([10, 0, 60])
    y = moe_ext.grouped_gemm(a, b, counts.cuda(), activation="swiglu")
    torch.testing.assert_close(y.cpu(), moe_ext.grouped_gemm(a.cpu(), b.cpu(), counts, activation="swiglu"))
    dw = ops.grouped_gemm_wgrad(a, torch.randn(M, N, device="cuda", dtype=dtype), counts.cuda(), E, False)
    assert dw.shape == (E, K, N)


def test_many_experts_and_kernel_override(seed, monkeypatch):
    """More experts than the Hopper kernel's schedule holds run on the portable kernel (auto); a
    bad MOE_EXT_GROUPED_GEMM_KERNEL is an error; forcing sm90 where it cannot run is an error."""
    M, E, K, N = 3000, 1500, 64, 64
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = _weights(E, K, N, False, torch.bfloat16)
    counts = _counts(M, E, "zipf", gen)
    y = _run(a, b, counts.cuda(), False, None)
    _assert_within_torch_error(y, _ref64(a, b, counts), {"torch.matmul": _torch_per_expert(a, b, counts)}, "E=1500")
    monkeypatch.setenv("MOE_EXT_GROUPED_GEMM_KERNEL", "bogus")
    with pytest.raises(RuntimeError, match="MOE_EXT_GROUPED_GEMM_KERNEL must be auto, portable or sm90"):
        moe_ext.grouped_gemm(a, b, counts.cuda())
    monkeypatch.setenv("MOE_EXT_GROUPED_GEMM_KERNEL", "sm90")
    with pytest.raises(RuntimeError, match="the Hopper kernel cannot run this problem"):
        moe_ext.grouped_gemm(a, b, counts.cuda())  # E > 1024 (and on other GPUs: not sm_90)


# ---- errors --------------------------------------------------------------------------------------------

def test_clear_errors_for_misaligned_k_and_n():
    bf = dict(device="cuda", dtype=torch.bfloat16)
    c = torch.tensor([3, 4], device="cuda")
    with pytest.raises(RuntimeError, match=r"K \(a.size\(1\) = 12\) to be a multiple of 8"):
        moe_ext.grouped_gemm(torch.randn(7, 12, **bf), torch.randn(2, 12, 16, **bf), c)
    with pytest.raises(RuntimeError, match=r"N \(b.size\(2\) = 20\) to be a multiple of 8"):
        moe_ext.grouped_gemm(torch.randn(7, 16, **bf), torch.randn(2, 16, 20, **bf), c)
    with pytest.raises(RuntimeError, match=r"N \(b.size\(1\) = 20\) to be a multiple of 8"):
        moe_ext.grouped_gemm(torch.randn(7, 16, **bf), torch.randn(2, 20, 16, **bf), c, trans_b=True)
    with pytest.raises(RuntimeError, match=r"swiglu.*N \(b.size\(2\) = 24\) to be a multiple of 16"):
        moe_ext.grouped_gemm(torch.randn(7, 16, **bf), torch.randn(2, 16, 24, **bf), c, activation="swiglu")
    with pytest.raises(RuntimeError, match=r"grouped_gemm_wgrad.*grad_out.size\(1\) = 12"):
        ops.grouped_gemm_wgrad(torch.randn(7, 16, **bf), torch.randn(7, 12, **bf), c, 2, False)
    with pytest.raises(RuntimeError, match=r"grouped_gemm_masked.*K \(a.size\(2\) = 12\)"):
        grouped_gemm_masked(torch.randn(2, 4, 12, **bf), torch.randn(2, 12, 16, **bf), c)
    with pytest.raises(RuntimeError, match="supports up to 2048 experts"):
        moe_ext.grouped_gemm(torch.randn(7, 16, **bf), torch.randn(2049, 16, 8, **bf),
                             torch.zeros(2049, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="tokens_per_expert must be on the same device as a"):
        moe_ext.grouped_gemm(torch.randn(7, 16, **bf), torch.randn(2, 16, 8, **bf), torch.tensor([3, 4]))


# ---- weight gradient ---------------------------------------------------------------------------------

def _wgrad_ref64(a, dy, counts, E, trans_b):
    a, dy = a.double().cpu(), dy.double().cpu()
    K, N = a.shape[1], dy.shape[1]
    out = torch.zeros(E, N, K) if trans_b else torch.zeros(E, K, N)
    out = out.double()
    start = 0
    for e, m in enumerate(counts.tolist()):
        w = a[start:start + m].t() @ dy[start:start + m]
        out[e] = w.t() if trans_b else w
        start += m
    return out


def _wgrad_torch(a, dy, counts, E, trans_b):
    K, N = a.shape[1], dy.shape[1]
    out = torch.zeros((E, N, K) if trans_b else (E, K, N), dtype=a.dtype, device=a.device)
    start = 0
    for e, m in enumerate(counts.tolist()):
        out[e] = dy[start:start + m].t() @ a[start:start + m] if trans_b else a[start:start + m].t() @ dy[start:start + m]
        start += m
    return out


@pytest.mark.parametrize("E", [1, 8, 32, 128, 256])
@pytest.mark.parametrize("kind", ["random", "odd", "empty", "one", "zipf"])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_wgrad_matches_float64(wgrad_kernel, seed, E, kind, trans_b, dtype):
    gen = torch.Generator().manual_seed(seed)
    K, N = 136, 72
    total = 2 * E + 1001 if kind != "odd" else E + 2 * 500
    M = total + 3
    a = torch.randn(M, K, device="cuda").to(dtype)
    dy = torch.randn(M, N, device="cuda").to(dtype)
    counts = _counts(total, E, kind, gen)
    _poison(((E, K, N), dtype))
    dw = ops.grouped_gemm_wgrad(a, dy, counts.cuda(), E, trans_b)
    assert dw.shape == ((E, N, K) if trans_b else (E, K, N))
    assert not torch.isnan(dw).any()
    for e in (counts == 0).nonzero().flatten().tolist():
        assert (dw[e] == 0).all(), f"expert {e} has no rows: its gradient must be zero"
    ref = _wgrad_ref64(a, dy, counts, E, trans_b)
    _assert_within_torch_error(dw, ref, {"torch.matmul per expert": _wgrad_torch(a, dy, counts, E, trans_b)},
                               f"wgrad E={E} {kind} trans_b={trans_b}")


@pytest.mark.parametrize("M,E,K,N", [(8192, 8, 1024, 2056), (4099, 64, 264, 1032), (33000, 2, 128, 128)])
def test_wgrad_large(wgrad_kernel, seed, M, E, K, N):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    counts = _counts(M, E, "zipf", gen)
    for trans_b in (False, True):
        dw = ops.grouped_gemm_wgrad(a, dy, counts.cuda(), E, trans_b)
        _assert_within_torch_error(dw, _wgrad_ref64(a, dy, counts, E, trans_b),
                                   {"torch.matmul": _wgrad_torch(a, dy, counts, E, trans_b)}, f"wgrad M={M}")


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes_format", ["counts_int32", "offsets_int64"])
def test_wgrad_expert_boundaries_exact(wgrad_kernel, seed, trans_b, dtype, sizes_format):
    """Row counts that are not multiples of the k-blocks (32 rows portable, 64 Hopper), experts
    without rows first, last and between non-empty ones, and NaN rows past the groups (a worst-case
    buffer). Inputs are small integers, so every partial sum is exact in float32 whatever the order:
    the result must equal the float64 reference rounded once to dtype, bit for bit. One row leaking
    in from a neighbouring expert, or a NaN from the tail, changes it; poisoned outputs (NaN) catch
    elements never written."""
    counts = torch.tensor([0, 1, 63, 0, 65, 127, 0, 64, 129, 31, 200, 0, 3, 0])
    E, used = counts.numel(), int(counts.sum())
    M = used + 61
    K, N = 200, 136  # m and n tails: partial 128-tiles, a second 64-wide half past the end
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (M, K), generator=gen).to(dtype)
    dy = torch.randint(-2, 3, (M, N), generator=gen).to(dtype)
    a[used:] = float("nan")
    dy[used:] = float("nan")
    if sizes_format == "counts_int32":
        sizes = counts.to(torch.int32)
    else:
        sizes = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    want = _wgrad_ref64(a[:used], dy[:used], counts, E, trans_b).to(dtype)
    _poison(((E, K, N), dtype))
    dw = ops.grouped_gemm_wgrad(a.cuda(), dy.cuda(), sizes.cuda(), E, trans_b)
    assert dw.shape == want.shape and dw.dtype == dtype
    assert not torch.isnan(dw).any(), "an element was never written, or a NaN row leaked in"
    got = dw.cpu()
    for e in range(E):
        assert torch.equal(got[e], want[e]), (
            f"expert {e} ({int(counts[e])} rows): {(got[e] != want[e]).sum().item()} elements differ")


def test_wgrad_kernel_override(seed, monkeypatch):
    """A bad MOE_EXT_GROUPED_WGRAD_KERNEL is an error; sm90 where the Hopper weight gradient cannot
    run (E > 1024; any problem on a GPU that is not sm_90) is an error; auto runs the Hopper kernel
    where it can (on sm_90, E <= 1024), else the portable one: bitwise equal to the one it picks."""
    E, M, K, N = 1500, 300, 16, 8
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    counts = _counts(M, E, "zipf", gen).cuda()
    monkeypatch.setenv("MOE_EXT_GROUPED_WGRAD_KERNEL", "bogus")
    with pytest.raises(RuntimeError, match="MOE_EXT_GROUPED_WGRAD_KERNEL must be auto, portable or sm90"):
        ops.grouped_gemm_wgrad(a, dy, counts, E, False)
    monkeypatch.setenv("MOE_EXT_GROUPED_WGRAD_KERNEL", "sm90")
    with pytest.raises(RuntimeError, match="the Hopper weight gradient cannot run this problem"):
        ops.grouped_gemm_wgrad(a, dy, counts, E, False)
    monkeypatch.setenv("MOE_EXT_GROUPED_WGRAD_KERNEL", "portable")
    portable = ops.grouped_gemm_wgrad(a[:, :16], dy, counts[:8].clone(), 8, True)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    if hopper:
        monkeypatch.setenv("MOE_EXT_GROUPED_WGRAD_KERNEL", "sm90")
        sm90 = ops.grouped_gemm_wgrad(a[:, :16], dy, counts[:8].clone(), 8, True)
    monkeypatch.setenv("MOE_EXT_GROUPED_WGRAD_KERNEL", "auto")
    assert torch.equal(ops.grouped_gemm_wgrad(a[:, :16], dy, counts[:8].clone(), 8, True), sm90 if hopper else portable)
    # More experts than the Hopper kernel takes: auto falls back to the portable one.
    auto_many = ops.grouped_gemm_wgrad(a, dy, counts, E, False)
    monkeypatch.setenv("MOE_EXT_GROUPED_WGRAD_KERNEL", "portable")
    assert torch.equal(auto_many, ops.grouped_gemm_wgrad(a, dy, counts, E, False))


# ---- autograd ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matches_cpu(kernel, seed, trans_b, activation, dtype):
    """Gradients of a and b on CUDA against the CPU op's autograd in float64 (the reference), and
    no worse than twice the CPU op's error in the same dtype."""
    M, E, K, N = 700, 8, 128, 256
    gen = torch.Generator().manual_seed(seed)
    counts = _counts(M - 4, E, "empty", gen)
    a0 = torch.randn(M, K).to(dtype)
    b0 = _weights(E, K, N, trans_b, dtype, device="cpu")
    g0 = torch.randn(M, N // 2 if activation == "swiglu" else N).to(dtype)

    def grads(a, b, g, c):
        a = a.clone().requires_grad_()
        b = b.clone().requires_grad_()
        moe_ext.grouped_gemm(a, b, c, trans_b=trans_b, activation=activation).backward(g)
        return a.grad, b.grad

    ga, gb = grads(a0.cuda(), b0.cuda(), g0.cuda(), counts.cuda())
    ra, rb = grads(a0.double(), b0.double(), g0.double(), counts)
    ca, cb = grads(a0, b0, g0, counts)  # the CPU op in the same dtype
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    _assert_within_torch_error(ga, ra, {"CPU op": ca}, "grad a")
    _assert_within_torch_error(gb, rb, {"CPU op": cb}, "grad b")


# ---- masked layout --------------------------------------------------------------------------------------

@pytest.mark.parametrize("E,R", [(1, 1), (8, 37), (32, 128), (128, 16), (256, 9)])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_masked_matches_cpu_and_zeroes_rows(kernel, seed, E, R, trans_b, activation):
    K, N = 72, 272
    a = torch.randn(E, R, K, device="cuda", dtype=torch.bfloat16)
    valid = torch.randint(0, R + 1, (E,))
    valid[0] = R
    if E > 1:
        valid[1] = 0
    for e in range(E):
        a[e, int(valid[e]):] = float("nan")  # a worst-case buffer: garbage past the valid rows
    b = _weights(E, K, N, trans_b, torch.bfloat16)
    _poison(((E, R, N // 2 if activation == "swiglu" else N), torch.bfloat16))
    y = grouped_gemm_masked(a, b, valid.cuda().int(), trans_b=trans_b, activation=activation)
    assert not torch.isnan(y).any()
    for e in range(E):
        assert (y[e, int(valid[e]):] == 0).all()
    a_clean = torch.where(torch.isnan(a), torch.zeros_like(a), a)
    want = grouped_gemm_masked(a_clean.cpu(), b.cpu(), valid, trans_b=trans_b, activation=activation)
    packed = torch.cat([a_clean[e, :int(valid[e])] for e in range(E)])
    ref_packed = _ref64(packed, b, valid, trans_b, activation)
    got_packed = torch.cat([y[e, :int(valid[e])] for e in range(E)])
    want_packed = torch.cat([want[e, :int(valid[e])] for e in range(E)])
    _assert_within_torch_error(got_packed, ref_packed, {"CPU op (bf16)": want_packed}, "masked")


def test_masked_clamps_valid_rows(kernel):
    E, R, K, N = 3, 8, 16, 16
    a = torch.randn(E, R, K, device="cuda", dtype=torch.bfloat16)
    b = _weights(E, K, N, False, torch.bfloat16)
    y = grouped_gemm_masked(a, b, torch.tensor([-3, 100, 4], device="cuda"))
    want = grouped_gemm_masked(a.cpu(), b.cpu(), torch.tensor([0, R, 4]))
    torch.testing.assert_close(y.cpu(), want, rtol=2 ** -7, atol=1e-3)


def test_masked_autograd_matches_cpu(kernel, seed):
    E, R, K, N = 4, 24, 64, 128
    valid = torch.tensor([24, 0, 7, 13])
    a0 = torch.randn(E, R, K).bfloat16()
    b0 = _weights(E, K, N, False, torch.bfloat16, device="cpu")
    g0 = torch.randn(E, R, N // 2).bfloat16()

    def grads(a, b, g, v):
        a = a.clone().requires_grad_()
        b = b.clone().requires_grad_()
        grouped_gemm_masked(a, b, v, activation="swiglu").backward(g)
        return a.grad, b.grad

    ga, gb = grads(a0.cuda(), b0.cuda(), g0.cuda(), valid.cuda())
    ra, rb = grads(a0.double(), b0.double(), g0.double(), valid)
    ca, cb = grads(a0, b0, g0, valid)
    _assert_within_torch_error(ga, ra, {"CPU op": ca}, "masked grad a")
    _assert_within_torch_error(gb, rb, {"CPU op": cb}, "masked grad b")


# ---- fused epilogue: bias before the activation, row scale after it ---------------------------------

def _epilogue_inputs(E, N, rows, epilogue, dtype, gen):
    bias = (torch.randn(E, N, generator=gen) * 0.5).to(dtype).cuda() if epilogue != "scale" else None
    scale = (torch.rand(rows, generator=gen) + 0.25).cuda() if epilogue != "bias" else None
    return bias, scale


@pytest.mark.parametrize("E,kind", [(8, "random"), (32, "empty"), (128, "zipf")])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("epilogue", ["bias", "scale", "both"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_epilogue_matches_float64(kernel, seed, E, kind, trans_b, activation, epilogue, dtype):
    """The kernels' epilogue against the float64 reference, no worse than twice the error of the
    CPU op in the same dtype (which also runs it on the fp32 accumulator and rounds once)."""
    gen = torch.Generator().manual_seed(seed)
    K, N = 72, (272 if activation == "swiglu" else 136)
    total = 2 * E + 1001
    M = total + 3
    a = torch.randn(M, K, device="cuda").to(dtype)
    b = _weights(E, K, N, trans_b, dtype)
    counts = _counts(total, E, kind, gen)
    bias, scale = _epilogue_inputs(E, N, M, epilogue, dtype, gen)
    ref = _ref64(a, b, counts, trans_b, activation, bias, scale)
    _poison(((M, N // 2 if activation == "swiglu" else N), dtype))
    y = moe_ext.grouped_gemm(a, b, counts.cuda(), trans_b=trans_b, activation=activation, bias=bias, row_scale=scale)
    assert not torch.isnan(y).any(), "an output element was never written"
    assert (y[total:] == 0).all(), "rows past the last group must be zero"
    cpu = moe_ext.grouped_gemm(a.cpu(), b.cpu(), counts, trans_b=trans_b, activation=activation,
                               bias=None if bias is None else bias.cpu(), row_scale=None if scale is None else scale.cpu())
    _assert_within_torch_error(y, ref, {"CPU op": cpu}, f"E={E} {kind} trans_b={trans_b} {activation} {epilogue}")


@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_epilogue_autograd_matches_cpu(kernel, seed, activation, dtype):
    """Gradients of a, b, bias and row_scale on CUDA against float64 CPU autograd, within twice the
    CPU op's error in the same dtype."""
    M, E, K, N = 700, 8, 128, 256
    gen = torch.Generator().manual_seed(seed)
    counts = _counts(M - 4, E, "empty", gen)
    a0 = torch.randn(M, K, generator=gen).to(dtype)
    b0 = _weights(E, K, N, False, dtype, device="cpu")
    bias0 = (torch.randn(E, N, generator=gen) * 0.5).to(dtype)
    scale0 = torch.rand(M, generator=gen) + 0.25
    g0 = torch.randn(M, N // 2 if activation == "swiglu" else N, generator=gen).to(dtype)

    def grads(*t):
        a, b, bias, scale, g, c = [x.clone() for x in t]
        leaves = [x.requires_grad_() for x in (a, b, bias, scale)]
        moe_ext.grouped_gemm(a, b, c, activation=activation, bias=bias, row_scale=scale).backward(g)
        return [x.grad for x in leaves]

    got = grads(a0.cuda(), b0.cuda(), bias0.cuda(), scale0.cuda(), g0.cuda(), counts.cuda())
    ref = grads(a0.double(), b0.double(), bias0.double(), scale0.double(), g0.double(), counts)
    cpu = grads(a0, b0, bias0, scale0, g0, counts)
    for name, x, r, c in zip(("a", "b", "bias", "row_scale"), got, ref, cpu):
        assert torch.isfinite(x).all(), name
        _assert_within_torch_error(x, r, {"CPU op": c}, f"grad {name}", atol=1e-4)


@pytest.mark.parametrize("activation", [None, "swiglu"])
def test_masked_epilogue_matches_cpu(kernel, seed, activation):
    E, R, K, N = 8, 37, 72, 272
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(E, R, K, generator=gen).bfloat16().cuda()
    valid = torch.randint(0, R + 1, (E,), generator=gen)
    valid[1] = 0
    for e in range(E):
        a[e, int(valid[e]):] = float("nan")
    b = _weights(E, K, N, False, torch.bfloat16)
    bias, scale = _epilogue_inputs(E, N, E * R, "both", torch.bfloat16, gen)
    scale = scale.view(E, R)
    _poison(((E, R, N // 2 if activation == "swiglu" else N), torch.bfloat16))
    y = grouped_gemm_masked(a, b, valid.cuda(), activation=activation, bias=bias, row_scale=scale)
    assert not torch.isnan(y).any()
    for e in range(E):
        assert (y[e, int(valid[e]):] == 0).all()
    keep = torch.arange(R)[None, :] < valid[:, None]
    packed = torch.nan_to_num(a.cpu())[keep]
    ref = _ref64(packed, b, valid, False, activation, bias, scale.cpu()[keep])
    cpu = moe_ext.grouped_gemm(packed, b.cpu(), valid, activation=activation, bias=bias.cpu(),
                               row_scale=scale.cpu()[keep])
    _assert_within_torch_error(y.cpu()[keep], ref, {"CPU op (bf16)": cpu}, "masked epilogue")


# ---- CUDA graphs: nothing reads the counts on the host ------------------------------------------------

def test_cuda_graph_capture_and_replay_with_new_counts(kernel, seed):
    M, E, K, N = 1024, 8, 256, 512
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = _weights(E, K, N, False, torch.bfloat16)
    b2 = _weights(E, N // 2, K, False, torch.bfloat16)
    counts = torch.zeros(E, dtype=torch.int32, device="cuda")
    valid = torch.zeros(E, dtype=torch.int32, device="cuda")
    a_masked = torch.randn(E, 64, K, device="cuda", dtype=torch.bfloat16)

    def step():
        h = moe_ext.grouped_gemm(a, b, counts, activation="swiglu")
        y = moe_ext.grouped_gemm(h, b2, counts)
        dw = ops.grouped_gemm_wgrad(a, y, counts, E, False)
        ym = grouped_gemm_masked(a_masked, b, valid, activation="swiglu")
        return y, dw, ym

    gen = torch.Generator().manual_seed(seed)
    counts.copy_(_counts(M, E, "random", gen))
    step()  # warm-up outside the capture (kernel attributes, allocator)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host synchronisation inside would raise here
        y, dw, ym = step()
    for kind in ("zipf", "empty", "one"):
        new = _counts(M - 11, E, kind, gen)
        new_valid = torch.randint(0, 65, (E,), generator=gen)
        counts.copy_(new)
        valid.copy_(new_valid)
        graph.replay()
        torch.cuda.synchronize()
        h_ref = _ref64(a, b, new, False, "swiglu")
        y_ref = _ref64(h_ref, b2, new)
        y_eager, dw_eager, ym_eager = step()
        torch.testing.assert_close(y, y_eager, rtol=0, atol=0)  # the same kernels on the same inputs
        torch.testing.assert_close(dw, dw_eager, rtol=0, atol=0)
        torch.testing.assert_close(ym, ym_eager, rtol=0, atol=0)
        assert (y[M - 11:] == 0).all()
        rel = _max_err(y, y_ref) / max(y_ref.abs().max().item(), 1e-6)
        assert rel < 3e-2, rel
        for e in range(E):
            assert (ym[e, int(new_valid[e]):] == 0).all()


# ---- torch.library plumbing on CUDA tensors ------------------------------------------------------------

def test_opcheck_cuda():
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    a = torch.randn(40, 16, **bf)
    b = torch.randn(3, 16, 32, **bf)
    c = torch.tensor([7, 0, 30], device="cuda")
    for args in [(a, b, c, False, "none"), (a, b.transpose(1, 2).contiguous(), c, True, "swiglu"),
                 (a, b, torch.tensor([0, 7, 7, 37], device="cuda", dtype=torch.int32), False, "swiglu")]:
        torch.library.opcheck(ops.grouped_gemm.default, args)
    torch.library.opcheck(ops.grouped_gemm_wgrad.default, (a, torch.randn(40, 24, **bf), c, 3, False))
    torch.library.opcheck(ops.grouped_gemm_masked.default,
                          (torch.randn(3, 5, 16, **bf), b, torch.tensor([5, 0, 2], device="cuda"), False, "none"))


def test_compile_fullgraph_cuda(kernel, seed):
    torch._dynamo.reset()
    M, E, K, N = 256, 4, 64, 128
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = _weights(E, K, N, False, torch.bfloat16).requires_grad_()
    w2 = _weights(E, N // 2, K, False, torch.bfloat16).requires_grad_()
    counts = torch.tensor([100, 0, 56, 100], device="cuda")

    def f(a_, w1_, w2_):
        return moe_ext.grouped_gemm(moe_ext.grouped_gemm(a_, w1_, counts, activation="swiglu"), w2_, counts)

    got = torch.compile(f, fullgraph=True, dynamic=False)(a, w1, w2)
    want = f(a, w1, w2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(got)
    ga = torch.autograd.grad(got, (a, w1, w2), g)
    wa = torch.autograd.grad(want, (a, w1, w2), g)
    for x, y in zip(ga, wa):  # the compiled SwiGLU backward may round its elementwise math differently
        # NOTE: (Triton's exp, FMA contraction): a 1-ulp bf16 difference in a few elements of the
        # intermediate gradient moves GEMM sums that nearly cancel far past the default bf16 rtol, so
        # the bound is on each gradient's scale (2^-7: one bf16 rounding).
        torch.testing.assert_close(x, y, rtol=2 ** -7, atol=2 ** -7 * y.abs().max().item())
